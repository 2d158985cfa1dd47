//! Device interrupts as notifications. A legacy (ISA) line is routed
//! through the IOAPIC to vector 0x30 + line; when it fires, the kernel sets
//! the bits of the notification bound to it and signals end of interrupt.
//! The service that owns the device does the rest.

use super::Kernel;
use crate::mem::phys_to_virt;
use core::cell::UnsafeCell;

/// Vector of ISA line 0.
pub const IRQ_BASE: u8 = 0x30;

/// The IOAPIC and the lines' routing, from ACPI.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub ioapic: u64,
    pub gsi_base: u32,
    /// ISA line -> (GSI, MPS flags) where the MADT overrides the identity.
    pub overrides: [Option<(u32, u16)>; 16],
    pub apic_id: u32,
}

struct State {
    routing: Option<Routing>,
    bound: [Option<(u16, u64)>; 16],
    /// The IOMMU's fault interrupt ([`crate::iommu::FAULT_VECTOR`]): the
    /// notification it sets.
    faults: Option<(u16, u64)>,
}

struct Cell(UnsafeCell<State>);

// Safety: used by the one CPU with interrupts off (see `sys`).
unsafe impl Sync for Cell {}

static STATE: Cell = Cell(UnsafeCell::new(State {
    routing: None,
    bound: [None; 16],
    faults: None,
}));

fn state() -> &'static mut State {
    // Safety: see `impl Sync for Cell`.
    unsafe { &mut *STATE.0.get() }
}

/// Records where the IOAPIC is (boot, after ACPI).
pub fn init(routing: Routing) {
    state().routing = Some(routing);
}

/// Why a line cannot be bound.
#[derive(Debug)]
pub enum IrqError {
    NoIoApic,
    BadLine,
}

/// Routes ISA line `irq` to notification `note`, setting `bits`.
pub fn bind(irq: u8, note: u16, bits: u64) -> Result<(), IrqError> {
    let s = state();
    let r = s.routing.ok_or(IrqError::NoIoApic)?;
    let slot = s.bound.get_mut(usize::from(irq)).ok_or(IrqError::BadLine)?;
    *slot = Some((note, bits));
    let (gsi, flags) = r.overrides[usize::from(irq)].unwrap_or((u32::from(irq), 0));
    let pin = gsi.checked_sub(r.gsi_base).ok_or(IrqError::BadLine)?;
    // MPS flags: polarity bits 1:0 (3 = active low), trigger bits 3:2 (3 = level).
    let low_active = flags & 3 == 3;
    let level = (flags >> 2) & 3 == 3;
    let low = u32::from(IRQ_BASE + irq) | (u32::from(low_active) << 13) | (u32::from(level) << 15);
    // Safety: the IOAPIC's registers (from the MADT) are in the direct map
    // and belong to the kernel; this writes one redirection entry.
    unsafe {
        write_ioapic(r.ioapic, 0x10 + 2 * pin + 1, r.apic_id << 24);
        write_ioapic(r.ioapic, 0x10 + 2 * pin, low);
    }
    defmt::info!(
        "irq: ISA line {=u8} (GSI {=u32}) -> vector {=u8}",
        irq,
        gsi,
        IRQ_BASE + irq
    );
    Ok(())
}

/// # Safety
/// `base` is the IOAPIC's MMIO base.
unsafe fn write_ioapic(base: u64, reg: u32, value: u32) {
    let p = phys_to_virt(base).cast::<u32>();
    // Safety: forwarded; IOREGSEL at +0, IOWIN at +0x10.
    unsafe {
        p.write_volatile(reg);
        p.add(4).write_volatile(value);
    }
}

/// Routes the IOMMU's fault interrupt to notification `note` (IO-6):
/// its holder reads the fault records when notified.
pub fn bind_faults(note: u16, bits: u64) {
    state().faults = Some((note, bits));
}

/// Whether any line is bound (an interrupt could still wake a service).
/// The IOMMU's fault interrupt does not count: it only reports DMA some
/// service programmed, and waking the iommu service to log it ends no
/// wait of the others.
pub fn any_bound() -> bool {
    state().bound.iter().any(Option::is_some)
}

/// An interrupt on `vector`: notify, then end of interrupt.
pub fn handle(k: &mut Kernel, vector: u8) {
    let s = state();
    let bound = if vector == crate::iommu::FAULT_VECTOR {
        s.faults
    } else {
        vector
            .checked_sub(IRQ_BASE)
            .and_then(|irq| s.bound.get(usize::from(irq)).copied().flatten())
    };
    if let Some((note, bits)) = bound {
        k.notify(note, bits);
    }
    crate::apic::end_of_interrupt();
}
