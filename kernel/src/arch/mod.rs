//! x86-64 architecture code: per-CPU descriptor tables and stacks, the
//! interrupt table and trap entry, and small CPU helpers.

pub mod idt;
pub mod percpu;

/// Disables interrupts and returns whether they were enabled.
pub fn interrupts_disable() -> bool {
    let was = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::disable();
    was
}

/// Re-enables interrupts if `was_enabled`.
pub fn interrupts_restore(was_enabled: bool) {
    if was_enabled {
        x86_64::instructions::interrupts::enable();
    }
}

/// Lets pending host interrupts in for one instruction (their handlers run
/// as kernel-mode traps), then disables them again.
pub fn interrupt_window() {
    x86_64::instructions::interrupts::enable();
    x86_64::instructions::nop();
    x86_64::instructions::interrupts::disable();
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Reads CR2 (the address of the last page fault).
pub fn cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// Turns on the protections user space needs: no-execute pages (EFER.NXE),
/// and, where the CPU has them, SMEP and SMAP (the kernel neither executes
/// nor, by accident, touches user pages: it reaches user memory through the
/// direct map only).
pub fn protect_kernel(cpu: &platform::cpu::CpuInfo) {
    use x86_64::registers::control::{Cr4, Cr4Flags};
    if cpu.nx {
        // Safety: EFER exists on every x86-64 CPU; NXE only makes bit 63 of
        // page-table entries meaningful, and no kernel mapping sets it.
        unsafe { platform::cpu::wrmsr(0xc000_0080, platform::cpu::rdmsr(0xc000_0080) | (1 << 11)) };
    }
    let leaf7 = platform::cpu::cpuid(7, 0);
    let mut cr4 = Cr4::read();
    if leaf7.ebx & (1 << 7) != 0 {
        cr4 |= Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION;
    }
    if leaf7.ebx & (1 << 20) != 0 {
        cr4 |= Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION;
    }
    // Safety: SMEP/SMAP only forbid what the kernel never does (run or
    // touch user pages through user addresses); the CPU has them (CPUID).
    unsafe { Cr4::write(cr4) };
    defmt::info!(
        "protection: NX {=bool}, SMEP {=bool}, SMAP {=bool}",
        cpu.nx,
        leaf7.ebx & (1 << 7) != 0,
        leaf7.ebx & (1 << 20) != 0
    );
}
