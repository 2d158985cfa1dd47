//! vmi-rs on a running system (issue 13, point 5): the
//! `vmi-driver-parallax` crate under `VmiCore`, against two `agent` guests
//! on Bochs. The first (`introspect`) is read physically and through its
//! own page tables, has its mailbox written, its registers read and set
//! (with the refusals), and is put in a view that maps a hidden shadow page
//! at its marker, then answers a violation with a register set and has
//! its state reset while it runs; the second (`watch=5`) is the example's: its registers
//! and code read, a breakpoint hidden in a shadow page, and its writes to
//! a read-execute page handled as vmi-rs memory-access events: the first
//! by a run of the example killed after it (the control proxy ends its
//! listen; with the domain's policy `pause`, the next write waits for the
//! next listener), the others by the run that follows (as many events as
//! writes are left, the last answered back in view 0).

use image_builder::emulator::Machine;
use ipc_schema::altp2m::{AltRequest, NoListener};
use ipc_schema::halt::HaltStatus;
use parallax_tests::{boot_live, hex_after, introspect_marker, system};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmi_driver_parallax::ParallaxDriver;
use vmi_driver_parallax::vmi_arch_amd64::{Cr2, EventMonitor, Interrupt, Selector};
use vmi_driver_parallax::vmi_core::arch::Registers as _;
use vmi_driver_parallax::vmi_core::{
    AccessContext, Gfn, MemoryAccess, Pa, Va, VcpuId, VmiCore, VmiError, VmiEventResponse,
};

fn refused(result: Result<impl std::fmt::Debug, VmiError>, says: &str) {
    match result {
        Err(e) => assert!(e.to_string().contains(says), "{e}"),
        Ok(v) => panic!("succeeded ({v:?}); expected a refusal saying {says:?}"),
    }
}

/// The example agent, built (as `cargo run` would) where cargo says.
fn example_agent() -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .current_dir(image_builder::paths::repo())
        .args([
            "build",
            "-q",
            "-p",
            "vmi-driver-parallax",
            "--example",
            "agent",
        ])
        .arg("--message-format=json")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    let line = json
        .lines()
        .find(|l| l.contains(r#""kind":["example"]"#) && l.contains(r#""executable":""#))
        .unwrap_or_else(|| panic!("cargo named no example binary:\n{json}"));
    let at = line.find(r#""executable":""#).unwrap() + r#""executable":""#.len();
    PathBuf::from(&line[at..at + line[at..].find('"').unwrap()])
}

/// The example `agent` (its binary) on the domain named `agent` through
/// `live`'s socket, watching `gfn` for `events` events.
fn example_run(agent: &Path, live: &parallax_tests::Live, gfn: u64, events: u64) -> Command {
    let mut c = Command::new(agent);
    c.arg("--socket").arg(live.socket()).args([
        "--gfn",
        &format!("{gfn:#x}"),
        "--events",
        &events.to_string(),
        "--wait",
        "240",
    ]);
    c
}

/// A run of the example on domain 2, watching `gfn`, SIGKILLed as it
/// handles the guest's first write (the answer sent or not): no `Drop`,
/// nothing undone by itself. Returns what it printed.
fn killed_agent(agent: &Path, live: &mut parallax_tests::Live, gfn: u64) -> String {
    let mut child = example_run(agent, live, gfn, 5)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the example starts");
    let mut said = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    while !said.contains("event 1:") {
        let before = said.len();
        out.read_line(&mut said).unwrap();
        assert!(said.len() > before, "the example ended early:\n{said}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    said
}

#[test]
fn vmi_rs_reads_sets_hides_and_watches_running_guests() {
    let img = system(
        "vmi",
        concat!(
            "name = \"vmi\"\n",
            "[[domain]]\nname = \"intro\"\nguest = \"agent\"\nmemory_mib = 32\ncmdline = \"introspect vmi\"\n",
            "[[domain]]\nname = \"agent\"\nguest = \"agent\"\nmemory_mib = 32\ncmdline = \"watch=5 wait=3000\"\n",
        ),
    );
    let mut example = String::new();
    let mut watched = 0;
    // The writes left to the example's second run.
    let mut left = 0;
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            let (gpa, alias, cr3, _) = introspect_marker(live);
            let watch = live
                .wait_for("dom2", "waiting to be put in a view", 120)
                .text
                .clone();
            watched = hex_after(&watch, "gfn");
            let started = Instant::now();
            {
                let driver = ParallaxDriver::new(live.control(), "intro").unwrap();
                assert_eq!(driver.domain(), 1);
                let vmi = VmiCore::new(driver).unwrap();
                let info = vmi.info().unwrap();
                assert_eq!((info.vcpus, info.max_gfn), (1, Gfn(0x1fff)));

                // The marker: guest-physically, and through the guest's own
                // tables (vmi-rs walks them: 4 KiB pages under PML4 slot 1).
                let mut m = [0u8; 16];
                vmi.read(AccessContext::direct(Pa(gpa)), &mut m).unwrap();
                assert_eq!(&m, b"parallax-marker!");
                let through = AccessContext::paging(Va(alias), Pa(cr3));
                let mut m = [0u8; 16];
                vmi.read(through, &mut m).unwrap();
                assert_eq!(&m, b"parallax-marker!");
                assert_eq!(
                    vmi.translate_address((Va(alias + 0x18), Pa(cr3))).unwrap(),
                    Pa(gpa + 0x18)
                );

                // Registers while it runs: CR3 as the guest printed it,
                // 64-bit code, long mode active.
                let regs = vmi.registers(VcpuId(0)).unwrap();
                assert_eq!(regs.cr3.0, cr3);
                assert!(regs.cs.access.long_mode(), "{:?}", regs.cs);
                assert!(regs.msr_efer.long_mode_active());
                refused(vmi.registers(VcpuId(3)), "no such vCPU");

                // The mailbox written through the alias (VmiCore::write on a
                // guest-virtual address).
                vmi.write_u64(through + 0x100, 0x005e_ed0f_1a7e).unwrap();
                live.wait_for("dom1", "introspect: mailbox 0x5eed0f1a7e", 120);
                let mut ready = false;
                for _ in 0..60 {
                    let mut word = [0u8; 8];
                    vmi.driver().read_physical(gpa + 0x200, &mut word).unwrap();
                    if u64::from_le_bytes(word) == 1 {
                        ready = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                assert!(ready, "the guest never set its ready word");

                // Sets: refused while it runs, and for what Parallax cannot
                // set; unsupported operations refused by name.
                let mut want = vmi.registers(VcpuId(0)).unwrap();
                want.r12 = 0x77;
                refused(vmi.set_registers(VcpuId(0), want), "must be paused");
                vmi.pause().unwrap();
                let now = vmi.registers(VcpuId(0)).unwrap();
                let mut bad = now;
                bad.cr2 = Cr2(0x1234);
                bad.ds.selector = Selector(0x10);
                refused(
                    vmi.set_registers(VcpuId(0), bad),
                    "cannot set cr2, ds.selector",
                );
                vmi.set_registers(VcpuId(0), now).unwrap(); // nothing differs
                refused(vmi.allocate_gfn_at(Gfn(0x3000)), "places shadow pages");
                refused(vmi.free_gfn(Gfn(0x2000)), "stay with the domain");
                refused(
                    vmi.inject_interrupt(VcpuId(0), Interrupt::breakpoint(1)),
                    "cannot inject",
                );
                refused(
                    vmi.monitor_enable(EventMonitor::Singlestep),
                    "memory-access violations only",
                );

                // A hidden shadow page at the marker's gfn, in a view the
                // vCPU is put in.
                let shadow = vmi.allocate_gfn().unwrap();
                assert_eq!(shadow, Gfn(0x2000));
                vmi.write(
                    AccessContext::direct(Pa(0x2000 << 12)),
                    b"vmi-shadow-page!\xcc",
                )
                .unwrap();
                let view = vmi.create_view(MemoryAccess::RWX).unwrap();
                let marker = Gfn(gpa >> 12);
                vmi.change_view_gfn(view, marker, shadow).unwrap();
                vmi.set_memory_access(marker, view, MemoryAccess::RX)
                    .unwrap();
                assert_eq!(vmi.memory_access(marker, view).unwrap(), MemoryAccess::RX);
                vmi.set_memory_access(marker, view, MemoryAccess::RWX)
                    .unwrap();
                assert_eq!(vmi.memory_access(marker, view).unwrap(), MemoryAccess::RWX);
                refused(
                    vmi.memory_access(marker, vmi_driver_parallax::vmi_core::View(77)),
                    "view not found",
                );
                vmi.switch_to_view(view).unwrap();
                // R12 set while paused; seen by the guest once resumed.
                want = vmi.registers(VcpuId(0)).unwrap();
                want.r12 = 0x77;
                vmi.set_registers(VcpuId(0), want).unwrap();
                assert_eq!(vmi.registers(VcpuId(0)).unwrap().r12, 0x77);
                // View 0 (the host p2m) still holds the marker.
                let mut m = [0u8; 16];
                vmi.driver().read_physical(gpa, &mut m).unwrap();
                assert_eq!(&m, b"parallax-marker!");
                vmi.resume().unwrap();
                live.wait_for("dom1", "introspect: marker now vmi-shadow-page!", 120);

                // A response that carries registers: the guest writes its
                // page until R13 is set; the page read-only in its view, the
                // write's event is answered with R13 = 0x99 and the write
                // let through once.
                vmi.driver().listen().unwrap();
                vmi.set_memory_access(marker, view, MemoryAccess::RX)
                    .unwrap();
                let mut at = None;
                vmi.wait_for_event(Duration::from_secs(120), |event| {
                    let mut gp = event.registers().gp_registers();
                    at = Some((event.view(), gp.r13));
                    gp.r13 = 0x99;
                    VmiEventResponse::emulate().with_registers(gp)
                })
                .unwrap();
                assert_eq!(
                    at,
                    Some((Some(view), 0)),
                    "the event came from the view, R13 zero"
                );
                live.wait_for("dom1", "introspect: r13 0x99", 120);
                // reset_state on the running domain: back in view 0, its
                // views destroyed, the listener gone; the guest reads its
                // own marker again, and ends (maybe before reset_state's
                // last step, which is then done: its views went with it).
                vmi.reset_state().unwrap();
                live.wait_for("dom1", "introspect: marker back parallax-marker!", 120);
                live.wait_for("kernel", "domain 1 (intro) exited with status 0", 120);
                // An ended domain: a view request is refused saying so (not
                // "view not found"), and a reset has nothing left to do.
                refused(vmi.memory_access(marker, view), "domain 1 has ended");
                refused(vmi.create_view(MemoryAccess::RWX), "domain 1 has ended");
                vmi.reset_state().unwrap();
            }
            eprintln!(
                "vmi: the driver's checks on domain 1 took {:.1} s",
                started.elapsed().as_secs_f64()
            );

            // The example, on the watched guest: a first run killed after
            // the first write, its listen ended by the proxy (without, the
            // second write's vCPU would wait for ever for its answer)...
            let pause = AltRequest::SetNoListener {
                domain: 2,
                policy: NoListener::Pause,
            };
            live.control().altp2m_done(pause).unwrap();
            let agent = example_agent();
            let killed = killed_agent(&agent, live, watched);
            eprintln!("vmi: the killed example said:\n{killed}");
            live.wait_for("altp2m", "domain 2: listener detached", 120);
            let waits = live.wait_for("altp2m", "no listener, so vCPU 0 waits for one", 120);
            assert!(waits.text.contains("domain 2:"), "{waits}");
            // The write that waits (the guest writes word i of the page):
            // the first, its answer lost with the agent, or (a later one,
            // where the test was slow to kill it) the next.
            let waiting = (hex_after(&waits.text, "write of") & 0xfff) / 8;
            assert!((1..=5).contains(&waiting), "{waits}");
            left = 5 - waiting + 1;
            // ... then a second that takes over the waiting write.
            let started = Instant::now();
            let out = example_run(&agent, live, watched, left)
                .output()
                .expect("the example runs");
            example = String::from_utf8_lossy(&out.stdout).into_owned();
            eprintln!(
                "vmi: the example took {:.1} s:\n{example}",
                started.elapsed().as_secs_f64()
            );
            assert!(
                out.status.success(),
                "the example failed:\n{example}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            live.wait_for("dom2", "agent: done", 120);
        },
    );
    assert!(
        example.contains("attached to domain 2 (agent)"),
        "{example}"
    );
    assert!(example.contains("64-bit code"), "{example}");
    // (Its second shadow page: the killed run made the first.)
    assert!(
        example.contains("breakpoint: shadow gfn 0x2001 holds 0xcc"),
        "{example}"
    );
    let events: Vec<&str> = example
        .lines()
        .filter(|l| l.starts_with("event "))
        .collect();
    assert_eq!(events.len() as u64, left, "{example}");
    for e in &events {
        // The write's address in the page (the guest writes word i), its
        // linear address valid.
        assert!(e.contains(&format!(": -w- at gpa {watched:#x}")), "{e}");
        assert!(e.contains("GLA_VALID"), "{e}");
    }
    assert!(
        events[events.len() - 1].contains("back to the default view"),
        "{example}"
    );
    run.expect_console(1, "introspect: r12 0x77")
        .expect_console(1, "introspect: marker now vmi-shadow-page!")
        .expect_console(1, "introspect: r13 0x99")
        .expect_console(1, "introspect: marker back parallax-marker!")
        .expect_console(2, "agent: write 5 done")
        .expect_console(2, "agent: done")
        .expect_from("altp2m", "domain 2: listener attached")
        .expect_no("FAIL")
        .expect_status(HaltStatus::Success);
    // The requests after domain 1 ended made no new records of it (they
    // were freed once, when it ended).
    assert_eq!(
        run.log()
            .matches("altp2m: domain 1 ended; its records are freed")
            .count(),
        1,
        "{}",
        run.log()
    );
}
