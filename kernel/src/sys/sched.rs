//! What runs next, and getting there.
//!
//! The kernel has one stack per CPU and no threads of its own. A service's
//! registers live in its `Process::frame`: before the kernel enters a
//! service it points the TSS's RSP0 at the end of that frame, so a trap
//! from ring 3 saves the registers there, in place; the kernel then starts
//! again at the top of its stack, does what the trap asks, and either
//! enters the same service again ([`resume`], straight from its frame) or
//! goes to [`run`], which picks the next runnable: a service, or a vCPU
//! (entered with VMX; its exits come back here).
//!
//! An IPC wake-up (a call runs its server, a reply its caller, an exit its
//! handler, an answer its vCPU) is a hand-off: it is run next, before the
//! queue (`Kernel::next`, see [`Kernel::make_ready_next`]).

use super::process::{Process, State};
use super::{Kernel, Runnable, kernel};
use crate::arch::idt::TrapFrame;
use ipc_schema::halt::HaltStatus;

/// Runs services and vCPUs until the system halts.
pub fn run() -> ! {
    loop {
        let k = kernel();
        k.current = None;
        if let Some(code) = k.halt.take() {
            crate::halt::stop(HaltStatus::from_code(code).unwrap_or(HaltStatus::KernelFault));
        }
        crate::vm::wake_due(k);
        let next = match k.next.take() {
            Some(r) => Some(r),
            None => k.ready.pop_front(),
        };
        match next {
            Some(Runnable::Process(pid)) => {
                if k.processes[usize::from(pid)]
                    .as_ref()
                    .is_some_and(|p| p.runnable())
                {
                    resume(k, pid);
                }
            }
            Some(Runnable::Vcpu(slot)) => crate::vm::run_vcpu(k, slot),
            None => idle(),
        }
    }
}

/// Nothing is runnable: wait for an interrupt, if one can come.
fn idle() {
    let wake = crate::vm::next_wake();
    if wake != u64::MAX {
        // A vCPU waits for a deadline (a guest's HLT): the local APIC's
        // timer ends the wait; without its TSC-deadline mode, the CPU
        // waits for the TSC with PAUSE.
        if !crate::apic::arm_deadline(wake) {
            while platform::cpu::rdtsc() < wake {
                core::hint::spin_loop();
            }
            return;
        }
    } else if !super::irq::any_bound() {
        defmt::error!("nothing can run: every service waits and no interrupt can wake one");
        crate::halt::stop(HaltStatus::Stuck);
    }
    // The interrupt's handler (a kernel-mode trap) queues whoever it wakes.
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}

/// Enters process `pid` in ring 3 with its saved registers.
pub fn resume(k: &mut Kernel, pid: u16) -> ! {
    k.current = Some(pid);
    enter(
        k.processes[usize::from(pid)]
            .as_mut()
            .expect("checked by the caller"),
    )
}

/// Enters `p`, the current process (`Kernel::current`), in ring 3 with its
/// saved registers.
#[inline(always)]
pub fn enter(p: &mut Process) -> ! {
    let cr3 = p
        .space
        .as_ref()
        .expect("a runnable process has a space")
        .cr3();
    let frame: *const TrapFrame = &p.frame;
    // Its next trap saves its registers into this same frame.
    crate::arch::percpu::set_trap_frame_end(&p.frame);
    // Safety: `cr3` is the process's own table tree, whose upper half is the
    // kernel's; the frame is a complete ring-3 frame (only the CPU writes
    // its CS, SS and RFLAGS, at a trap from ring 3, and `empty_frame`: ring
    // 3, interrupts on), in the kernel's static state, which nothing
    // changes before the `iretq`.
    unsafe { user_return(frame, cr3) }
}

/// Returns to ring 3 in the address space `cr3` (loaded only when it is
/// not the current one: the same tree needs no TLB flush) through `frame`,
/// used as the stack for its own pops.
#[unsafe(naked)]
pub unsafe extern "C" fn user_return(frame: *const TrapFrame, cr3: u64) -> ! {
    core::arch::naked_asm!(
        "mov rax, cr3",
        "cmp rax, rsi",
        "je 2f",
        "mov cr3, rsi",
        "2:",
        "mov rsp, rdi",
        // `idt::push_all`'s pops.
        ".irp r, r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax\npop \\r\n.endr",
        "add rsp, 16",
        "iretq",
    )
}

/// A trap from ring 3: a system call, a fault, or an interrupt. `frame` is
/// where the CPU saved the registers: the running service's own frame, or an
/// interrupt stack (NMI, double fault, machine check), copied in here.
pub extern "C" fn user_trap(frame: *mut TrapFrame) -> ! {
    let k = kernel();
    let Some(pid) = k.current else {
        defmt::error!("a trap from ring 3 with no current service");
        crate::halt::stop(HaltStatus::KernelFault);
    };
    let Some(p) = k.processes[usize::from(pid)].as_mut() else {
        run()
    };
    if !core::ptr::eq(frame, &p.frame) {
        // Safety: the CPU and `trap_common` wrote a whole frame there.
        p.frame = unsafe { *frame };
    }
    match p.frame.vector {
        0x80 => {
            match super::syscall::dispatch(k, pid) {
                super::syscall::Outcome::Continue
                    if k.processes[usize::from(pid)]
                        .as_ref()
                        .is_some_and(|p| matches!(p.state, State::Ready)) =>
                {
                    // Straight back into the caller.
                    resume(k, pid)
                }
                _ => run(),
            }
        }
        0..=31 => {
            k.fault(pid);
            run()
        }
        vector => {
            super::irq::handle(k, vector as u8);
            // Let whoever the interrupt woke run; this service waits its turn.
            k.make_ready(Runnable::Process(pid));
            run()
        }
    }
}
