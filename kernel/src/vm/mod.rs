//! Guests under VMX: the mechanisms. Domains (`domain`), their views
//! (`views`), vCPUs (`vcpu`), memory for all of them (`memory`), and exits
//! sent to handlers as IPC calls (`exits`).
//!
//! The kernel owns a few exits outright, handled on the fast path below
//! without a message: the null, exit-count and view-switch hypercalls,
//! external interrupts, the preemption timer, and the CR0/CR4 bits VMX
//! requires. Every other exit is decoded into an
//! `ipc_schema::vmexit::Exit` and sent as a call to the vCPU's exit endpoint
//! (EPT violations to its violation endpoint, a full PML buffer to the
//! endpoint PML was started with); the vCPU waits for the reply.

pub mod cpustate;
pub mod domain;
pub mod exits;
pub mod memory;
mod ops;
pub mod shared;
pub mod vcpu;
pub mod views;

use crate::arch::percpu::MAX_CPUS;
use crate::sys::{Kernel, Runnable};
use crate::vmx::{self, InveptType};
use domain::Domain;
use ipc_schema::hypercall::{HC_EXIT_COUNT, HC_NULL};
use ipc_schema::syscall::DomainState;
pub use ops::{drop_lifted, drop_writes, ept_op, peek_lifted, peek_writes, vcpu_control};
use platform::vmx::VmxCaps;
use platform::vmx::fields::{EXIT_INTERRUPTION_INFO, reason};
use vcpu::{RawExit, VcpuState};

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
    /// The APIC-access frame, where the CPU virtualizes the xAPIC page
    /// (TPR shadow, APIC-access virtualization and APIC-register
    /// virtualization): every domain's host p2m maps it at
    /// [`domain::XAPIC_GFN`]. The CPU never reads or writes it; guests'
    /// accesses there go to their vCPU's virtual-APIC page or exit.
    pub apic_access: Option<u64>,
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

/// The CPU's VMX capabilities and the features in use, once VMX is on.
pub fn caps() -> &'static (VmxCaps, Features) {
    CAPS.get().expect("vm::init ran before any domain exists")
}

/// Whether guests can run (VMX is on).
pub fn available() -> bool {
    CAPS.get().is_some()
}

/// The features domains use: without VMX, none. A domain is still built
/// (RAM, host p2m, devices) and reachable by services; only its vCPUs need
/// VMX (issue 12: the IOMMU tests run on QEMU, which has no VMX).
pub fn features() -> Features {
    CAPS.get().map_or(
        Features {
            vmfunc: false,
            ve: false,
            pml: false,
            ept_ad: false,
            invept: InveptType::AllContexts,
            slice: None,
            apic_access: None,
        },
        |c| c.1,
    )
}

/// Turns VMX on for this CPU and records what guests will use.
pub fn init(caps: VmxCaps) -> Result<(), EnableError> {
    let f = &caps.features;
    let slice = f.preemption_timer.then(|| {
        let ticks = crate::time::slice();
        (ticks >> caps.preemption_timer_rate).min(u64::from(u32::MAX)) as u32
    });
    let xapic = platform::vmx::proc2::VIRTUALIZE_APIC_ACCESSES
        | platform::vmx::proc2::APIC_REGISTER_VIRTUALIZATION;
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
        apic_access: (caps.proc1.allows(platform::vmx::proc1::USE_TPR_SHADOW)
            && caps.proc2.allows(xapic))
        .then(memory::alloc_zeroed_frame)
        .flatten(),
    };
    let xcr0 = cpustate::init();
    defmt::info!(
        "vm: guest FPU state saved with {=str} (XCR0 {=u64:#x})",
        if xcr0 == 0 { "FXSAVE" } else { "XSAVE" },
        xcr0
    );
    let region = enable_this_cpu(0, &caps)?;
    let (_, features) = CAPS.call_once(|| (caps, features));
    defmt::info!(
        "vm: VMX operation on CPU 0 (VMXON region {=u64:#x}); {}",
        region,
        features
    );
    Ok(())
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

/// What the fast path did with an exit.
enum Fast {
    /// Handled; enter the guest again.
    Handled,
    /// Handled; let others run (the vCPU stays runnable).
    Yield,
    /// A host interrupt arrived (its vector): the kernel must handle it.
    Interrupt(u8),
    /// The slice ended and nobody else waits: the host takes any interrupt
    /// pending, then the guest goes on unless someone woke.
    Window,
    /// The TSC reached the deadline the vCPU's handler set.
    Deadline,
    /// Not the kernel's: send it to the handler.
    No,
}

/// Why a run of the guest stopped.
enum Stop {
    Yield,
    Interrupt(u8),
    Window,
    /// An exit for the handler (kept in `Domain::pending_raw`).
    Handler,
}

/// Runs domain slot `slot`'s vCPU until it needs its handler, ends, or
/// should let others run.
pub fn run_vcpu(k: &mut Kernel, slot: u16) {
    let others_waiting = !k.ready.is_empty();
    loop {
        wake_due(k);
        let Some(d) = k.domains[usize::from(slot)].as_mut() else {
            return;
        };
        if d.state != DomainState::Running || d.awaiting_reply {
            return;
        }
        let Some(v) = d.vcpu.as_mut() else { return };
        if v.state != VcpuState::Runnable {
            return;
        }
        if let Err(e) = v.load() {
            defmt::error!("domain {=u16}: cannot load its VMCS: {}", d.id, e);
            exits::crash(k, slot, None);
            return;
        }
        if !d.started {
            // Before its first instruction the exit handler hears that the
            // vCPU starts: whatever it kept for an earlier domain of this id
            // goes.
            d.started = true;
            d.pending_raw = Some(RawExit::START);
            crate::sys::fastpath::exit(k, slot);
            exits::to_handler(k, slot);
            return;
        }
        if !run_loaded(k, slot, others_waiting) {
            return;
        }
    }
}

/// Runs domain slot `slot`'s vCPU, which may run (the domain runs, nothing
/// is pending, its VMCS is current: the checks of [`run_vcpu`] were made),
/// until it needs its handler or someone else. True if it may run again at
/// once (an interrupt was handled and nobody else is ready).
#[inline(always)]
pub fn run_loaded(k: &mut Kernel, slot: u16, others_waiting: bool) -> bool {
    let Some(d) = k.domains[usize::from(slot)].as_mut() else {
        return false;
    };
    match run_until_handler(d, others_waiting) {
        Stop::Yield => {
            k.make_ready(Runnable::Vcpu(slot));
            false
        }
        stop @ (Stop::Interrupt(_) | Stop::Window) => {
            match stop {
                Stop::Interrupt(vector) => crate::sys::irq::handle(k, vector),
                // Bochs 2.7 keeps host interrupts masked for a guest entered
                // with RFLAGS.IF clear, external-interrupt exiting or not,
                // until the host itself sets IF (docs/security.md): a guest
                // spinning with interrupts off would deafen the host. One
                // instruction with interrupts on takes what is pending
                // through the host's IDT.
                _ => crate::arch::interrupt_window(),
            }
            if k.ready.is_empty() {
                return true;
            }
            k.make_ready(Runnable::Vcpu(slot));
            false
        }
        Stop::Handler => {
            crate::sys::fastpath::exit(k, slot);
            exits::to_handler(k, slot);
            false
        }
    }
}

/// Enters the guest repeatedly, handling the kernel's own exits, until one
/// needs the kernel's attention or someone else.
///
/// A slice is wall time while others wait, whatever the guest does: the
/// preemption timer ends a run of guest instructions, and each exit the
/// kernel answers itself checks the clock, so a guest looping on such exits
/// (whose handling the timer does not count) gets no more than others.
#[inline(always)]
fn run_until_handler(d: &mut Domain, others_waiting: bool) -> Stop {
    if others_waiting && d.slice_end == 0 {
        d.slice_end = platform::cpu::rdtsc().saturating_add(crate::time::slice());
    }
    loop {
        let Some(v) = d.vcpu.as_mut() else {
            return Stop::Handler;
        };
        let raw = v.enter();
        if raw.vmx_failed() {
            d.pending_raw = Some(raw);
            return Stop::Handler;
        }
        match fast_path(d, raw, others_waiting) {
            Fast::Handled if !others_waiting || platform::cpu::rdtsc() < d.slice_end => continue,
            Fast::Handled | Fast::Yield => {
                end_slice(d);
                return Stop::Yield;
            }
            Fast::Interrupt(vector) => return Stop::Interrupt(vector),
            Fast::Window => return Stop::Window,
            Fast::Deadline => {
                d.pending_raw = Some(RawExit::DEADLINE);
                return Stop::Handler;
            }
            // Out of `fast_path`, so that the null hypercall's code stays
            // as it is.
            Fast::No
                if raw.reason() == reason::EPT_VIOLATION
                    && (lift_on_write(d) || copy_on_write(d)) =>
            {
                if !others_waiting || platform::cpu::rdtsc() < d.slice_end {
                    continue;
                }
                end_slice(d);
                return Stop::Yield;
            }
            Fast::No => {
                d.pending_raw = Some(raw);
                return Stop::Handler;
            }
        }
    }
}

/// Cuts the vCPU's preemption timer short where its handler's deadline
/// comes before the timer would end (to 0 where it has passed: the vCPU
/// exits before its first instruction), when the deadline is set and when
/// a slice is renewed: the timer keeps counting down across the exits the
/// kernel answers itself, so nothing is checked on the way into the guest.
/// Without the timer a running vCPU's deadline is not seen (a waiting
/// one's is).
pub fn clamp_to_deadline(v: &mut vcpu::Vcpu) {
    if v.deadline == u64::MAX || caps().1.slice.is_none() {
        return;
    }
    let rate = caps().0.preemption_timer_rate;
    let ticks = v.deadline.saturating_sub(platform::cpu::rdtsc()) >> rate;
    let left = v.read(platform::vmx::fields::PREEMPTION_TIMER_VALUE);
    if ticks < left {
        // Safety: the VMCS is current; any timer value is valid.
        unsafe { v.write(platform::vmx::fields::PREEMPTION_TIMER_VALUE, ticks) };
    }
}

/// The earliest deadline of a vCPU that waits (`Then::BlockUntil`), or
/// `u64::MAX`.
static NEXT_WAKE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(u64::MAX);

/// A vCPU now waits until the TSC reaches `deadline`.
pub fn wake_at(deadline: u64) {
    NEXT_WAKE.fetch_min(deadline, core::sync::atomic::Ordering::Relaxed);
}

/// The earliest TSC at which a waiting vCPU wakes (`u64::MAX`: none).
pub fn next_wake() -> u64 {
    NEXT_WAKE.load(core::sync::atomic::Ordering::Relaxed)
}

/// Sends each waiting vCPU whose deadline has come its `Deadline` exit.
/// One comparison when none is due.
#[inline]
pub fn wake_due(k: &mut Kernel) {
    use core::sync::atomic::Ordering::Relaxed;
    let now = platform::cpu::rdtsc();
    if now < NEXT_WAKE.load(Relaxed) {
        return;
    }
    let mut next = u64::MAX;
    for slot in 0..k.domains.len() {
        let Some(d) = k.domains[slot].as_mut() else {
            continue;
        };
        let Some(v) = d.vcpu.as_mut() else { continue };
        if v.state != VcpuState::Blocked || v.deadline == u64::MAX {
            continue;
        }
        // A paused domain's vCPU wakes once it is unpaused.
        if v.deadline > now || d.state != DomainState::Running {
            next = next.min(v.deadline);
            continue;
        }
        v.deadline = u64::MAX;
        v.state = VcpuState::Runnable;
        if v.load().is_err() {
            continue;
        }
        d.pending_raw = Some(RawExit::DEADLINE);
        let slot = slot as u16;
        crate::sys::fastpath::exit(k, slot);
        exits::to_handler(k, slot);
    }
    NEXT_WAKE.store(next, Relaxed);
}

/// The vCPU gives way: its next run starts a new slice.
#[cold]
fn end_slice(d: &mut Domain) {
    d.slice_end = 0;
    if let Some(v) = d.vcpu.as_mut() {
        renew_timer(v);
    }
}

/// A full slice on the vCPU's preemption timer (or less, to its handler's
/// deadline).
fn renew_timer(v: &mut vcpu::Vcpu) {
    if let Some(ticks) = caps().1.slice {
        // Safety: the VMCS is current; any timer value is valid.
        unsafe {
            v.write(
                platform::vmx::fields::PREEMPTION_TIMER_VALUE,
                u64::from(ticks),
            )
        };
        clamp_to_deadline(v);
    }
}

/// Whether the vCPU's VMCALL is the view-switch hypercall, which goes to
/// the owner of the domain's p2m (its violation endpoint, as EPT
/// violations do) rather than to its exit handler: routing, not a decision
/// about views (docs/p2m.md).
#[inline(always)]
pub fn p2m_hypercall(d: &Domain) -> bool {
    d.vcpu
        .as_ref()
        .is_some_and(|v| v.regs.rax == ipc_schema::hypercall::HC_VIEW_SWITCH)
}

/// The exits the kernel handles itself.
#[inline(always)]
fn fast_path(d: &mut Domain, raw: RawExit, others_waiting: bool) -> Fast {
    // VMCALL first: the null hypercall is the path benchmarks measure.
    if raw.is(reason::VMCALL) {
        let Some(v) = d.vcpu.as_mut() else {
            return Fast::No;
        };
        return match v.regs.rax {
            HC_NULL => {
                v.regs.rax = 0;
                v.skip_instruction();
                Fast::Handled
            }
            HC_EXIT_COUNT => {
                v.regs.rax = 0;
                v.regs.rbx = v.exits;
                v.skip_instruction();
                Fast::Handled
            }
            // Every hypercall that reaches a service is the guest kernel's:
            // from user mode (SS.DPL is the CPL) it is refused here, so that
            // a guest's user process cannot reach views, services or the
            // host. (The two above touch nothing but the caller's registers.)
            _ if v.read(platform::vmx::fields::GUEST_SS_ACCESS) & (3 << 5) != 0 => {
                v.regs.rax = ipc_schema::hypercall::Status::NotPermitted as u64;
                v.skip_instruction();
                Fast::Handled
            }
            _ => Fast::No,
        };
    }
    // Then EPT violations, none of them answered here (`run_until_handler`).
    if raw.entry_failure() || raw.is(reason::EPT_VIOLATION) {
        return Fast::No;
    }
    let Some(v) = d.vcpu.as_mut() else {
        return Fast::No;
    };
    match raw.reason() {
        reason::PREEMPTION_TIMER => {
            v.exits = v.exits.wrapping_sub(1); // not the guest's doing
            if v.deadline != u64::MAX && platform::cpu::rdtsc() >= v.deadline {
                // The timer was cut short for the handler's deadline: the
                // exit goes to the handler, and the vCPU gets a new slice.
                v.deadline = u64::MAX;
                renew_timer(v);
                return Fast::Deadline;
            }
            // The guest's share of the slice is spent (the timer's value is
            // saved at every exit, so exits do not renew it): others get
            // their turn (`end_slice` renews the timer), or the guest a new
            // slice.
            if others_waiting {
                Fast::Yield
            } else {
                renew_timer(v);
                Fast::Window
            }
        }
        // The window its handler asked for: once is enough.
        reason::INTERRUPT_WINDOW => {
            v.set_window(&caps().0, false);
            Fast::No
        }
        reason::EXTERNAL_INTERRUPT => {
            v.exits = v.exits.wrapping_sub(1); // not the guest's doing
            let info = v.read(EXIT_INTERRUPTION_INFO);
            Fast::Interrupt(info as u8)
        }
        // A full PML buffer goes to whoever started PML (`exits`); without
        // one (PML was never started by a service) it is only reset.
        reason::PML_FULL if d.pml_endpoint.is_none() => {
            let _ = v.pml_swap();
            v.reinject_interrupted_event();
            Fast::Handled
        }
        reason::CR_ACCESS => {
            if v.control_register_write(v.qualification()) {
                Fast::Handled
            } else {
                Fast::No
            }
        }
        _ => Fast::No,
    }
}

/// An EPT violation that write alone was missing for (the access's kinds
/// are bits 2:0 of the qualification, what the entry allowed bits 5:3):
/// its guest-physical address and the view it happened in.
fn write_alone(d: &Domain) -> Option<(u64, u16)> {
    let v = d.vcpu.as_ref()?;
    let q = v.qualification();
    let (access, allowed) = (q & 7, (q >> 3) & 7);
    (access & 2 != 0 && access & !(allowed | 2) == 0).then(|| {
        (
            v.read(platform::vmx::fields::GUEST_PHYSICAL_ADDRESS),
            v.active_view(),
        )
    })
}

/// The violation was resolved in the kernel: any event it interrupted is
/// delivered again on resume (true).
fn resolved(d: &mut Domain) -> bool {
    if let Some(v) = d.vcpu.as_mut() {
        v.reinject_interrupted_event();
    }
    true
}

/// An EPT violation: a fork's write to a page of its parent's, in its host
/// p2m, where the entry is armed for a copy (docs/sharing.md): the page is
/// copied and the guest resumed without a message. Out of line, as
/// [`lift_on_write`].
#[inline(never)]
fn copy_on_write(d: &mut Domain) -> bool {
    match d.parent.and_then(|_| write_alone(d)) {
        Some((gpa, 0)) => shared::copy_on_write(d, gpa) && resolved(d),
        _ => false,
    }
}

/// An EPT violation: a write to an entry the EPT owner armed to be lifted on
/// write (`EptOp::ArmLift`, dirty tracking) is made writable and recorded
/// here, without a message (docs/p2m.md); anything else goes to the owner
/// (at once in a domain none of whose entries was ever armed).
/// Out of line, so that the null hypercall's path stays as it is.
#[inline(never)]
fn lift_on_write(d: &mut Domain) -> bool {
    let armed = d.lift_armed && !d.lifted.is_full();
    let Some((gpa, view)) = armed.then(|| write_alone(d)).flatten() else {
        return false;
    };
    let lifted = d.views.ept_mut(view).ok().and_then(|(e, t)| e.lift(t, gpa));
    let Some(hpa) = lifted else { return false };
    let frame = d.gfn_of_frame(hpa).unwrap_or(gpa / platform::PAGE_SIZE);
    let _ = d.lifted.push(frame);
    resolved(d)
}
