//! Guests: domains built from the manifest, run round-robin on this CPU.
//!
//! The kernel owns a few exits outright, handled on the fast path below
//! without building a message: the null, exit-count and view-switch
//! hypercalls (benchmarks and EPT-pointer switching are kernel business),
//! external interrupts, the preemption timer, a full PML buffer, and the
//! CR0/CR4 bits VMX requires. Every other exit is decoded into an
//! `ipc_schema::vmexit::Exit` and answered by the domain's exit handler
//! (`crate::vmm`), whose `Response` the kernel carries out.

pub mod dirty;
pub mod domain;
pub mod memory;
pub mod vcpu;
pub mod views;

use crate::arch::percpu::MAX_CPUS;
use crate::bootinfo::BootInfo;
use crate::vmx::{self, InveptType};
use domain::{Domain, DomainState};
use ipc_schema::halt::HaltStatus;
use ipc_schema::hypercall::{HC_EXIT_COUNT, HC_NULL, HC_VIEW_SWITCH, Status};
use ipc_schema::manifest::{MAX_DOMAINS, Manifest};
use ipc_schema::vmexit::{Exit, Then};
use ipc_schema::wire::Record;
use platform::ept::PageSize;
use platform::vmx::VmxCaps;
use platform::vmx::fields::{self, reason};
use vcpu::{RawExit, VcpuState};

/// Console bytes buffered per domain before a line is sent.
pub const MAX_CONSOLE: usize = 120;

/// What the CPU offers, as the domains use it.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct Features {
    pub vmfunc: bool,
    pub ve: bool,
    pub pml: bool,
    pub ept_ad: bool,
    pub invept: InveptType,
    /// Preemption-timer ticks per time slice, where the CPU has the timer.
    pub slice: Option<u32>,
}

impl defmt::Format for InveptType {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            InveptType::SingleContext => defmt::write!(f, "single-context"),
            InveptType::AllContexts => defmt::write!(f, "all-contexts"),
        }
    }
}

static CAPS: spin::Once<(VmxCaps, Features)> = spin::Once::new();

/// The CPU's VMX capabilities and the features in use (set by [`run`]).
pub fn caps() -> &'static (VmxCaps, Features) {
    CAPS.get()
        .expect("vm::run sets the capabilities before any domain runs")
}

/// Builds every domain of the manifest and runs them until all have ended.
pub fn run(manifest: &Manifest<'static>, boot: &BootInfo, caps: VmxCaps) -> HaltStatus {
    let f = &caps.features;
    let slice = f.preemption_timer.then(|| {
        let ticks = crate::time::tsc_hz().unwrap_or(100_000_000) / 100; // 10 ms
        (ticks >> caps.preemption_timer_rate).min(u64::from(u32::MAX)) as u32
    });
    let features = Features {
        vmfunc: f.vmfunc_eptp_switching,
        ve: f.ept_violation_ve,
        pml: f.pml,
        ept_ad: f.ept_ad,
        invept: if f.invept_single {
            InveptType::SingleContext
        } else {
            InveptType::AllContexts
        },
        slice,
    };
    let (caps, features) = CAPS.call_once(|| (caps, features));
    defmt::info!("vm: {}", features);

    match enable_this_cpu(0, caps) {
        Ok(region) => defmt::info!(
            "vm: VMX operation on CPU 0 (VMXON region {=u64:#x})",
            region
        ),
        Err(e) => {
            defmt::error!("vm: cannot enter VMX operation on CPU 0: {}", e);
            return HaltStatus::Unsupported;
        }
    }

    let mut domains: heapless::Vec<Domain, MAX_DOMAINS> = heapless::Vec::new();
    let mut failed_builds = 0;
    for (i, spec) in manifest.domains.iter().enumerate() {
        let id = i as u16 + 1;
        let Some(image) = boot.module(spec.guest) else {
            // read_manifest checked every module; this cannot happen.
            failed_builds += 1;
            continue;
        };
        match Domain::build(id, spec, image.bytes(), caps, features) {
            Ok(d) => {
                let (mut large, mut small) = (0u32, 0u32);
                d.views
                    .host()
                    .for_each_leaf(&memory::KernelTables, 0, d.ram_bytes, |m| match m.size {
                        PageSize::Size4K => small += 1,
                        _ => large += 1,
                    });
                defmt::info!(
                    "domain {=u16} ({=str}): guest {=str}, {=u32} MiB in {=u32} 2 MiB + {=u32} 4 KiB pages, entry {=u64:#x}",
                    id,
                    spec.name,
                    spec.guest,
                    spec.memory_mib,
                    large,
                    small,
                    d.vcpu.read(fields::GUEST_RIP)
                );
                let _ = domains.push(d);
            }
            Err(e) => {
                defmt::error!(
                    "domain {=u16} ({=str}) could not be built: {}",
                    id,
                    spec.name,
                    e
                );
                failed_builds += 1;
            }
        }
    }

    // Round robin until nothing can run.
    let mut next = 0;
    loop {
        let n = domains.len();
        let Some(i) = (0..n)
            .map(|k| (next + k) % n.max(1))
            .find(|&i| runnable(&domains[i]))
        else {
            break;
        };
        let others = (0..n).any(|j| j != i && runnable(&domains[j]));
        run_slice(&mut domains[i], others);
        next = i + 1;
    }

    let mut status = if failed_builds > 0 {
        HaltStatus::GuestFailed
    } else {
        HaltStatus::Success
    };
    for d in domains {
        match d.state {
            DomainState::Exited(0) => {}
            _ => status = HaltStatus::GuestFailed,
        }
        d.destroy();
    }
    status
}

/// Each CPU's VMXON region, once it is in VMX operation.
static VMXON: [spin::Once<u64>; MAX_CPUS] = [const { spin::Once::new() }; MAX_CPUS];

/// Why a CPU could not enter VMX operation.
#[derive(Debug, defmt::Format)]
pub enum EnableError {
    OutOfMemory,
    Vmx(vmx::VmxError),
}

/// Puts CPU `cpu` (the one running this) in VMX operation, once.
pub fn enable_this_cpu(cpu: usize, caps: &VmxCaps) -> Result<u64, EnableError> {
    if let Some(&region) = VMXON[cpu].get() {
        return Ok(region);
    }
    let region = memory::alloc_zeroed_frame().ok_or(EnableError::OutOfMemory)?;
    // Safety: `caps` was read from this CPU; the region is a frame kept for
    // as long as the kernel runs; VMXON[cpu] is unset, so the CPU is not in
    // VMX operation yet.
    unsafe { vmx::enable(caps, region, crate::mem::phys_to_virt(region)) }
        .map_err(EnableError::Vmx)?;
    Ok(*VMXON[cpu].call_once(|| region))
}

fn runnable(d: &Domain) -> bool {
    d.state == DomainState::Running && d.vcpu.state == VcpuState::Runnable
}

/// What the fast path did with an exit.
enum Fast {
    /// Handled; enter the guest again.
    Handled,
    /// Handled; let another domain run.
    Yield,
    /// Not the kernel's: ask the handler.
    No,
}

/// Runs a domain's vCPU until it blocks, ends, or (when others are waiting)
/// its time slice runs out.
fn run_slice(d: &mut Domain, others_waiting: bool) {
    if let Err(e) = d.vcpu.load() {
        crash(d, None);
        defmt::error!("domain {=u16}: cannot load its VMCS: {}", d.id, e);
        return;
    }
    loop {
        let raw = d.vcpu.enter();
        if raw.vmx_failed() {
            defmt::error!(
                "domain {=u16} ({=str}): VM entry failed: {}",
                d.id,
                d.name,
                d.vcpu.vmx_error
            );
            crash(d, None);
            return;
        }
        match fast_path(d, &raw, others_waiting) {
            Fast::Handled => continue,
            Fast::Yield => return,
            Fast::No => {}
        }
        let exit = d.vcpu.decode(d.id, &raw);
        if raw.entry_failure() {
            defmt::error!(
                "domain {=u16} ({=str}): VM entry failed: {=str} (exit reason {=u16}, qualification {=u64:#x})",
                d.id,
                d.name,
                reason::name(raw.reason()),
                raw.reason(),
                d.vcpu.qualification()
            );
            crash(d, Some(&exit));
            return;
        }
        let response = crate::vmm::handle(d, &exit);
        d.vcpu.apply(&response);
        match response.then {
            Then::Resume => {}
            Then::Block => {
                d.vcpu.state = VcpuState::Blocked;
                flush_console(d);
                defmt::error!(
                    "domain {=u16} ({=str}) halted with nothing to wake it (HLT at {=u64:#x}); stopped",
                    d.id,
                    d.name,
                    exit.rip
                );
                d.state = DomainState::Crashed;
                return;
            }
            Then::Exit { status } => {
                flush_console(d);
                d.state = DomainState::Exited(status);
                d.vcpu.state = VcpuState::Stopped;
                if status == 0 {
                    defmt::info!("domain {=u16} ({=str}) exited with status 0", d.id, d.name);
                } else {
                    defmt::warn!(
                        "domain {=u16} ({=str}) exited with status {=u32}",
                        d.id,
                        d.name,
                        status
                    );
                }
                return;
            }
            Then::Crash => {
                crash(d, Some(&exit));
                return;
            }
        }
    }
}

/// The exits the kernel handles itself.
#[inline(always)]
fn fast_path(d: &mut Domain, raw: &RawExit, others_waiting: bool) -> Fast {
    // VMCALL first: the null hypercall is the path benchmarks measure.
    if raw.reason() == reason::VMCALL && !raw.entry_failure() {
        return match d.vcpu.regs.rax {
            HC_NULL => {
                d.vcpu.regs.rax = 0;
                d.vcpu.skip_instruction();
                Fast::Handled
            }
            HC_EXIT_COUNT => {
                d.vcpu.regs.rax = 0;
                d.vcpu.regs.rbx = d.vcpu.exits;
                d.vcpu.skip_instruction();
                Fast::Handled
            }
            HC_VIEW_SWITCH => {
                let view = d.vcpu.regs.rbx as u16;
                d.vcpu.regs.rax = match d.views.eptp(view) {
                    Ok(eptp) if d.vcpu.regs.rbx <= u64::from(u16::MAX) => {
                        d.vcpu.set_view(view, eptp);
                        Status::Ok as u64
                    }
                    _ => Status::Refused as u64,
                };
                d.vcpu.skip_instruction();
                Fast::Handled
            }
            _ => Fast::No,
        };
    }
    if raw.entry_failure() {
        return Fast::No;
    }
    match raw.reason() {
        reason::PREEMPTION_TIMER => {
            d.vcpu.exits -= 1; // not the guest's doing
            if others_waiting {
                Fast::Yield
            } else {
                Fast::Handled
            }
        }
        reason::EXTERNAL_INTERRUPT => {
            d.vcpu.exits -= 1; // not the guest's doing
            crate::apic::end_of_interrupt();
            Fast::Handled
        }
        reason::PML_FULL => {
            let n = dirty::drain_pml(&mut d.vcpu, &mut d.dirty);
            defmt::debug!(
                "domain {=u16}: PML buffer full, {=u32} entries drained",
                d.id,
                n
            );
            d.vcpu.reinject_interrupted_event();
            Fast::Handled
        }
        reason::CR_ACCESS => {
            if d.vcpu.control_register_write(d.vcpu.qualification()) {
                Fast::Handled
            } else {
                Fast::No
            }
        }
        _ => Fast::No,
    }
}

/// Sends the domain's pending console bytes as one record.
pub fn flush_console(d: &mut Domain) {
    if !d.console.is_empty() {
        crate::log::emit(&Record::Console {
            domain: d.id,
            bytes: &d.console,
        });
        d.console.clear();
    }
}

/// Stops a domain and reports its state.
pub fn crash(d: &mut Domain, exit: Option<&Exit>) {
    flush_console(d);
    d.state = DomainState::Crashed;
    d.vcpu.state = VcpuState::Stopped;
    let r = &d.vcpu.regs;
    let v = &d.vcpu;
    defmt::error!(
        "domain {=u16} ({=str}) crashed at rip {=u64:#x} in view {=u16}: rsp {=u64:#x} rflags {=u64:#x} cr0 {=u64:#x} cr3 {=u64:#x} cr4 {=u64:#x} efer {=u64:#x}",
        d.id,
        d.name,
        v.read(fields::GUEST_RIP),
        exit.map_or(0, |e| e.view),
        v.read(fields::GUEST_RSP),
        v.read(fields::GUEST_RFLAGS),
        v.read(fields::GUEST_CR0),
        v.read(fields::GUEST_CR3),
        v.read(fields::GUEST_CR4),
        v.read(fields::GUEST_IA32_EFER)
    );
    defmt::error!(
        "domain {=u16} registers: rax {=u64:#x} rbx {=u64:#x} rcx {=u64:#x} rdx {=u64:#x} rsi {=u64:#x} rdi {=u64:#x} rbp {=u64:#x}",
        d.id,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp
    );
}
