//! VM entry and exit.
//!
//! [`enter`] saves the callee-saved host registers and the pointer to the
//! vCPU's [`GuestRegs`] on the kernel stack, records that stack position as
//! the VMCS host RSP, loads the guest's general registers and executes
//! VMLAUNCH or VMRESUME. At the next VM exit the CPU jumps to `vmx_exit`
//! (the VMCS host RIP) with that stack: it stores every guest register back
//! into `GuestRegs` and returns from `enter` as if from a call. Everything
//! else (RSP, RIP, RFLAGS, segment and control state) is in the VMCS.
//!
//! This is the whole hot path of a VM exit, so it stays minimal: 15 stores,
//! 15 loads, six callee-saved pushes and pops, one VMWRITE.

use super::{VmxError, vmread};
use ipc_schema::vmexit::GuestRegs;
use platform::vmx::fields::{HOST_RSP, VM_INSTRUCTION_ERROR};

unsafe extern "C" {
    /// The VMCS host RIP: where every VM exit lands.
    fn vmx_exit();
}

/// The address to put in the VMCS host-RIP field.
pub fn exit_landing() -> u64 {
    vmx_exit as unsafe extern "C" fn() as usize as u64
}

/// `op` (on `\r` and `[rdi + at]`) for every register of `GuestRegs` but
/// RDI, at its offset.
macro_rules! guest_regs {
    ($op:literal) => {
        concat!(
            ".set at, 0\n.irp r, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15\n",
            ".ifnc \\r, rdi\n", $op, "\n.endif\n.set at, at + 8\n.endr"
        )
    };
}

#[unsafe(naked)]
unsafe extern "C" fn vmx_enter(regs: *mut GuestRegs, launched: u64) -> u64 {
    core::arch::naked_asm!(
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        "mov rax, {host_rsp}",
        "vmwrite rax, rsp",
        "test rsi, rsi",
        // Every guest register from `GuestRegs` (in its order, 8 bytes
        // apart), RDI, the pointer, last.
        guest_regs!("mov \\r, [rdi + at]"),
        "mov rdi, [rdi + 40]",
        "jnz 2f",
        "vmlaunch",
        "jmp 3f",
        "2:",
        "vmresume",
        // Only reached when the entry failed: CF (invalid) or ZF (valid).
        "3:",
        "setc cl",
        "setz dl",
        "movzx eax, cl",
        "movzx edx, dl",
        "lea eax, [rax + 2 * rdx]",
        "jmp 4f",
        // The VMCS host RIP: every VM exit lands here, on the stack above.
        ".global vmx_exit",
        "vmx_exit:",
        "push rdi",
        "mov rdi, [rsp + 8]",
        guest_regs!("mov [rdi + at], \\r"),
        "pop qword ptr [rdi + 40]",
        "xor eax, eax",
        // Both ways out: the `GuestRegs` pointer dropped, the host's
        // callee-saved registers back.
        "4:",
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        host_rsp = const HOST_RSP,
    )
}

/// Runs the guest whose VMCS is current until its next VM exit; `regs` holds
/// its general registers before and after.
///
/// # Safety
/// The current VMCS must be fully initialised with `exit_landing()` as its
/// host RIP and this CPU's kernel state as its host state; `launched` must say
/// whether this VMCS has been launched since its last VMCLEAR.
#[inline(always)]
pub unsafe fn enter(regs: &mut GuestRegs, launched: bool) -> Result<(), VmxError> {
    // Safety: the caller's contract; `regs` outlives the call.
    match unsafe { vmx_enter(regs, u64::from(launched)) } {
        0 => Ok(()),
        code => Err(entry_error(code)),
    }
}

#[cold]
fn entry_error(code: u64) -> VmxError {
    if code == 1 {
        VmxError::FailInvalid
    } else {
        // Safety: VMfailValid: the VMCS is current and holds the error.
        VmxError::FailValid(unsafe { vmread(VM_INSTRUCTION_ERROR) } as u32)
    }
}
