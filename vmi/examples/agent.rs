//! vmi-rs on Parallax: attaches to the `agent` guest of the default system,
//! reads its registers and memory through `VmiCore`, hides a breakpoint in
//! a shadow page through a view, and watches the page the guest announces,
//! printing each write as a vmi-rs memory-access event.
//!
//! ```text
//! cargo hv run --no-watch          # the default system, its agent left to us
//! # the log says: agent: watch me: gfn 0x10f (gpa 0x10f000); waiting to be put in a view
//! cargo run -p vmi-driver-parallax --example agent -- --socket target/hv/work/ctl.sock --gfn 0x10f
//! ```
//!
//! Options: `--socket PATH` (default `target/hv/work/ctl.sock`), `--domain
//! NAME` (default `agent`), `--gfn GFN` (the page to watch; without it no
//! events are awaited), `--events N` (default 4, the agent's `watch=4`),
//! `--wait S` (seconds to wait for each event, default 60).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmi_arch_amd64::EventReason;
use vmi_core::{
    AccessContext, Architecture as _, Gfn, MemoryAccess, Pa, Va, VcpuId, VmiCore, VmiError,
    VmiEventResponse, VmiWrite as _,
};
use vmi_driver_parallax::ParallaxDriver;

struct Options {
    socket: PathBuf,
    domain: String,
    gfn: Option<u64>,
    events: u32,
    wait: u64,
}

fn number(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("{s:?} is not a number (decimal or 0x-prefixed hex)"))
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        socket: "target/hv/work/ctl.sock".into(),
        domain: "agent".into(),
        gfn: None,
        events: 4,
        wait: 60,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => o.socket = value()?.into(),
            "--domain" => o.domain = value()?,
            "--gfn" => o.gfn = Some(number(&value()?)?),
            "--events" => o.events = number(&value()?)? as u32,
            "--wait" => o.wait = number(&value()?)?,
            _ => {
                return Err(format!(
                    "unknown argument {a:?} (--socket PATH, --domain NAME, --gfn GFN, --events N, --wait S)"
                ));
            }
        }
    }
    Ok(o)
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&o) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Options) -> Result<(), VmiError> {
    type Arch = vmi_arch_amd64::Amd64;
    let driver = ParallaxDriver::connect(&o.socket, &o.domain)?;
    let domain = driver.domain();
    let vmi = VmiCore::new(driver)?;
    let info = vmi.info()?;
    println!(
        "attached to domain {domain} ({}): {} vCPU, gfns 0 to {:#x}",
        o.domain, info.vcpus, info.max_gfn.0
    );

    // Registers, read while the domain is paused.
    let regs = {
        let _paused = vmi.pause_guard()?;
        vmi.registers(VcpuId(0))?
    };
    println!(
        "registers: rip {:#x} rsp {:#x} cr3 {:#x} efer {:#x} cs {:#x} ({}-bit code)",
        regs.rip,
        regs.rsp,
        regs.cr3.0,
        regs.msr_efer.0,
        regs.cs.selector.0,
        if regs.cs.access.long_mode() { 64 } else { 32 }
    );

    // Memory at RIP through the guest's own page tables (vmi-rs walks them,
    // reading each table page through the driver).
    let t = Instant::now();
    let at_rip = AccessContext::paging(Va(regs.rip), Pa(regs.cr3.0));
    let mut code = [0u8; 16];
    vmi.read(at_rip, &mut code)?;
    let pa = vmi.translate_access_context(at_rip)?;
    println!(
        "code at rip (gpa {:#x}, read through the guest's page tables in {:.1} s): {}",
        pa.0,
        t.elapsed().as_secs_f64(),
        hex(&code)
    );

    // A breakpoint hidden in a shadow page: a copy of the code page with
    // INT3 at RIP, mapped at the code's gfn in a view of its own.
    let code_gfn = Arch::gfn_from_pa(pa);
    let offset = Arch::pa_offset(pa);
    let shadow = vmi.allocate_gfn()?;
    let page = vmi.read_page(code_gfn)?;
    vmi.driver().write_page(shadow, 0, &page)?;
    vmi.write(
        AccessContext::direct(Arch::pa_from_gfn(shadow) + offset),
        Arch::BREAKPOINT,
    )?;
    let bp_view = vmi.create_view(MemoryAccess::RWX)?;
    vmi.change_view_gfn(bp_view, code_gfn, shadow)?;
    let mut seen = [0u8; 1];
    vmi.driver().read_physical(pa.0, &mut seen)?;
    let mut hidden = [0u8; 1];
    vmi.driver()
        .read_physical(Arch::pa_from_gfn(shadow).0 + offset, &mut hidden)?;
    println!(
        "breakpoint: shadow gfn {:#x} holds {:#04x} at rip's offset and view {bp_view} maps it at gfn {:#x}; view 0 (the guest's) still reads {:#04x} there",
        shadow.0, hidden[0], code_gfn.0, seen[0]
    );
    println!(
        "  (the guest is not switched into view {bp_view}: Parallax reports no breakpoint events, so the INT3 would reach the guest)"
    );

    // Events: the guest's page read-execute in a view of its own, the
    // guest put there; each write is an event.
    if let Some(gfn) = o.gfn {
        let view = vmi.create_view(MemoryAccess::RWX)?;
        vmi.set_memory_access(Gfn(gfn), view, MemoryAccess::RX)?;
        println!(
            "watching gfn {gfn:#x} through view {view}, where it is {}",
            vmi.memory_access(Gfn(gfn), view)?
        );
        vmi.switch_to_view(view)?;
        for n in 1..=o.events {
            let last = n == o.events;
            vmi.wait_for_event(Duration::from_secs(o.wait), |event| {
                let EventReason::MemoryAccess(m) = event.reason() else {
                    unreachable!("Parallax reports memory accesses only")
                };
                let response = if last {
                    VmiEventResponse::default().with_view(vmi.default_view())
                } else {
                    VmiEventResponse::fast_singlestep(vmi.default_view())
                };
                println!(
                    "event {n}: {} at gpa {:#x} (va {:#x}, rip {:#x}) in view {}, vCPU {}, flags {:?}: answered {}",
                    m.access,
                    m.pa.0,
                    m.va.0,
                    event.registers().rip,
                    event.view().map_or(0, |v| v.0),
                    event.vcpu_id(),
                    m.flags,
                    if last {
                        "back to the default view"
                    } else {
                        "fast single-step (let through once)"
                    }
                );
                response
            })?;
        }
        println!(
            "{} event(s) handled; the driver's own time on them: {:.2} s",
            o.events,
            vmi.event_processing_overhead().as_secs_f64()
        );
    }
    match vmi.reset_state() {
        Ok(()) => println!("back in view 0; views destroyed, listener detached"),
        // The agent guest ends after its last write, which reset_state
        // counts as reset (its views went with it); the default system
        // halts with it, though, and then there is no one left to ask.
        Err(e) if o.gfn.is_some() => println!("not reset ({e}): the system has ended"),
        Err(e) => return Err(e),
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
