//! Interrupt controllers: the legacy 8259 PICs are remapped out of the
//! exception vectors and masked; the local APIC runs in x2APIC mode where the
//! CPU has it (xAPIC otherwise), with its timer off until a user needs it.

use crate::arch::idt::{APIC_ERROR_VECTOR, SPURIOUS_VECTOR};
use core::cell::UnsafeCell;
use platform::port::outb;
use x2apic::lapic::{LocalApic, LocalApicBuilder};

/// The vector the local APIC timer will use.
pub const TIMER_VECTOR: u8 = 0x20;

struct BspApic(UnsafeCell<Option<LocalApic>>);

// Safety: only the bootstrap processor touches its own local APIC; other
// CPUs will get their own slot when they are brought up.
unsafe impl Sync for BspApic {}

static BSP_APIC: BspApic = BspApic(UnsafeCell::new(None));

/// Which local APIC mode is in use.
#[derive(Debug, defmt::Format)]
pub enum ApicMode {
    X2Apic { id: u32 },
    XApic { id: u32 },
}

/// Masks the PICs and enables this CPU's local APIC.
pub fn init(x2apic: bool) -> Result<ApicMode, &'static str> {
    // Safety: the 8259 pair at 0x20/0xa0 belongs to the kernel. Remap their
    // vectors to 0x20..0x2f (ICW1-ICW4) so that a stray interrupt cannot look
    // like an exception, then mask every line.
    unsafe {
        outb(0x20, 0x11);
        outb(0xa0, 0x11);
        outb(0x21, 0x20);
        outb(0xa1, 0x28);
        outb(0x21, 0x04);
        outb(0xa1, 0x02);
        outb(0x21, 0x01);
        outb(0xa1, 0x01);
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
    // Safety: IA32_APIC_BASE exists on every x86-64 CPU.
    let xapic_phys = unsafe { x2apic::lapic::xapic_base() };
    let mut apic = LocalApicBuilder::new()
        .timer_vector(usize::from(TIMER_VECTOR))
        .error_vector(usize::from(APIC_ERROR_VECTOR))
        .spurious_vector(usize::from(SPURIOUS_VECTOR))
        .set_xapic_base(crate::mem::phys_to_virt(xapic_phys) as u64)
        .build()?;
    // Safety: the vectors above have IDT entries; the xAPIC page is in the
    // direct map (below 4 GiB) and is device memory the kernel owns.
    let id = unsafe {
        apic.enable();
        apic.disable_timer();
        apic.id()
    };
    // Safety: see `impl Sync for BspApic`.
    unsafe { *BSP_APIC.0.get() = Some(apic) };
    Ok(if x2apic {
        ApicMode::X2Apic { id }
    } else {
        ApicMode::XApic { id }
    })
}

/// Arms this CPU's local APIC timer to interrupt (on [`TIMER_VECTOR`]) once
/// the TSC reaches `tsc`, in TSC-deadline mode; false where the CPU lacks
/// that mode.
pub fn arm_deadline(tsc: u64) -> bool {
    // CPUID.1:ECX bit 24: TSC-deadline mode.
    if platform::cpu::cpuid(1, 0).ecx & (1 << 24) == 0 {
        return false;
    }
    // Safety: see `impl Sync for BspApic`; the timer's vector has an IDT
    // entry, and IA32_TSC_DEADLINE (0x6e0) exists where CPUID says so.
    unsafe {
        let Some(apic) = (*BSP_APIC.0.get()).as_mut() else {
            return false;
        };
        apic.set_timer_mode(x2apic::lapic::TimerMode::TscDeadline);
        apic.enable_timer();
        x86_64::registers::model_specific::Msr::new(0x6e0).write(tsc.max(1));
    }
    true
}

/// Signals end of interrupt to this CPU's local APIC.
pub fn end_of_interrupt() {
    // Safety: see `impl Sync for BspApic`; EOI has no other effect.
    unsafe {
        if let Some(apic) = (*BSP_APIC.0.get()).as_mut() {
            apic.end_of_interrupt();
        }
    }
}
