//! CPU instructions the guests use: CPUID, RDTSC, HLT, and the exit port.

use core::arch::asm;

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// CPUID with EAX = `leaf`, ECX = `subleaf`. Under a hypervisor this is a
/// VM exit.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // Safety: CPUID only writes the four registers named here; RBX, which
    // LLVM reserves, is saved in a scratch register and restored.
    unsafe {
        asm!(
            "mov {rbx_save:r}, rbx",
            "cpuid",
            "xchg {rbx_save:r}, rbx",
            rbx_save = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags),
        )
    };
    Cpuid { eax, ebx, ecx, edx }
}

/// The time-stamp counter. Not serializing, and a compiler barrier: memory
/// accesses are not moved across it.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // Safety: RDTSC only writes EDX:EAX.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes HLT once. Interrupts stay disabled in the guests, so on a bare
/// CPU this returns only after an NMI or SMI; under a hypervisor HLT exits
/// and the hypervisor decides.
pub fn hlt() {
    // Safety: HLT changes no state the program relies on.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// The I/O port of QEMU's `isa-debug-exit` device (iosize 4), which
/// Parallax also treats as "this domain ends with status v".
pub const EXIT_PORT: u16 = 0xf4;

/// Ends the guest with `status`: waits for the UART to drain, writes the
/// status to port 0xf4 (QEMU then exits with `(status << 1) | 1`; under
/// Parallax the domain ends with `status`), and halts for good.
pub fn exit(status: u32) -> ! {
    crate::serial::flush();
    // Safety: a write to the exit port; nothing in memory changes.
    unsafe {
        asm!("out dx, eax", in("dx") EXIT_PORT, in("eax") status, options(nomem, nostack, preserves_flags))
    };
    loop {
        // Safety: stopping the CPU for good is what this function is for.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
