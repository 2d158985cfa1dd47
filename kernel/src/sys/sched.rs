//! What runs next, and getting there.
//!
//! The kernel has one stack per CPU and no threads of its own: a trap from
//! ring 3 saves the service's registers in its `Process`, the kernel does
//! what the trap asks, and then either returns to the same service
//! (`iretq` with the same frame) or enters [`run`], which picks the next
//! runnable: a service (loaded into ring 3 with [`resume`], leaving the
//! kernel stack behind) or a vCPU (entered with VMX; its exits come back
//! here). IPC wake-ups go to the front of the queue, so a call runs its
//! server next and a reply runs its caller next.

use super::process::{State, USER_CS, USER_SS};
use super::{Kernel, Runnable, kernel};
use crate::arch::idt::TrapFrame;
use crate::arch::percpu::BSP_STACK;
use ipc_schema::halt::HaltStatus;

/// Size of a trap frame on the stack.
const FRAME_BYTES: u64 = core::mem::size_of::<TrapFrame>() as u64;

/// Runs services and vCPUs until the system halts.
pub fn run() -> ! {
    loop {
        let k = kernel();
        k.current = None;
        if let Some(code) = k.halt.take() {
            crate::halt::stop(HaltStatus::from_code(code).unwrap_or(HaltStatus::KernelFault));
        }
        match k.ready.pop_front() {
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
    if !super::irq::any_bound() {
        defmt::error!("nothing can run: every service waits and no interrupt can wake one");
        crate::halt::stop(HaltStatus::Stuck);
    }
    // The interrupt's handler (a kernel-mode trap) queues whoever it wakes.
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}

/// Enters process `pid` in ring 3 with its saved registers.
fn resume(k: &mut Kernel, pid: u16) -> ! {
    k.current = Some(pid);
    let p = k.processes[usize::from(pid)]
        .as_mut()
        .expect("checked by the caller");
    let cr3 = p
        .space
        .as_ref()
        .expect("a runnable process has a space")
        .cr3();
    // Whatever the frame says, return to ring 3 with interrupts on.
    p.frame.cs = USER_CS;
    p.frame.ss = USER_SS;
    p.frame.rflags = (p.frame.rflags & 0xcd5) | 0x202;
    let frame: *const TrapFrame = &p.frame;
    // Safety: `cr3` is the process's own table tree, whose upper half is the
    // kernel's; the frame is a complete ring-3 frame; the kernel stack's top
    // (RSP0) is free: nothing on it is needed once we leave for ring 3.
    unsafe {
        x86_64::registers::control::Cr3::write_raw(
            x86_64::structures::paging::PhysFrame::containing_address(x86_64::PhysAddr::new(cr3)),
            0,
        );
        user_return(frame, BSP_STACK.top().as_u64())
    }
}

/// Copies `frame` to the top of the kernel stack and returns through it.
#[unsafe(naked)]
unsafe extern "C" fn user_return(frame: *const TrapFrame, stack_top: u64) -> ! {
    core::arch::naked_asm!(
        "mov rsp, rsi",
        "sub rsp, {bytes}",
        "mov rsi, rdi",
        "mov rdi, rsp",
        "mov ecx, {words}",
        "rep movsq",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop r11",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rbp",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rbx",
        "pop rax",
        "add rsp, 16",
        "iretq",
        bytes = const FRAME_BYTES,
        words = const FRAME_BYTES / 8,
    )
}

/// A trap from ring 3: a system call, a fault, or an interrupt.
pub fn user_trap(frame: &mut TrapFrame) {
    let k = kernel();
    let Some(pid) = k.current else {
        defmt::error!("a trap from ring 3 with no current service");
        crate::halt::stop(HaltStatus::KernelFault);
    };
    let Some(p) = k.processes[usize::from(pid)].as_mut() else {
        run()
    };
    p.frame = *frame;
    match frame.vector {
        0x80 => match super::syscall::dispatch(k, pid, frame) {
            super::syscall::Outcome::Continue
                if k.processes[usize::from(pid)]
                    .as_ref()
                    .is_some_and(|p| matches!(p.state, State::Ready)) =>
            {
                // Straight back into the caller.
                *frame = k.processes[usize::from(pid)]
                    .as_ref()
                    .expect("checked above")
                    .frame;
            }
            _ => run(),
        },
        0..=31 => {
            k.fault(pid, frame);
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
