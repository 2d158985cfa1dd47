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
