//! DMA remapping (VT-d): the mechanism only (issue 12). At boot every unit
//! the DMAR lists gets an empty root table and translation on, so a device
//! nobody attached has no context entry and no DMA. The rest is done under
//! capabilities: IoSpaces (DMA page tables with a domain id) are created,
//! devices attached to them, and a domain's RAM frames mapped at bus frame
//! numbers a service chooses; an unmap returns only once the IOTLB
//! invalidation that removes it has completed (IO-3). Who maps what for
//! whom is the `iommu` service's business. A recorded fault raises
//! [`FAULT_VECTOR`], which notifies whoever bound it (`sys::irq`); a
//! device's holder may reset it (DEVICE_RESET, `platform::pci::reset`).
//! The driver and the formats are `platform::vtd` (host-tested); this is
//! its registers and memory.

use crate::mem::phys_to_virt;
use crate::vm::memory::{alloc_zeroed_frame, free_frame};
use platform::acpi::dmar::Dmar;
use platform::ept::ENTRIES;
use platform::vtd::driver::{Enabled, Host, MAX_SPACES};

pub use platform::pci::ConfigRefusal as Refusal;
pub use platform::vtd::driver::IommuError;

/// Polls of a register or status word before a unit is given up on.
const SPINS: u32 = 50_000_000;

/// The kernel's side of the driver: units' registers through the direct
/// map, frames from the frame allocator.
pub struct Kernel;

pub type Iommu = platform::vtd::driver::Iommu<'static, Kernel>;

pub static IOMMU: spin::Mutex<Option<Iommu>> = spin::Mutex::new(None);

fn register<T>(base: u64, off: usize) -> *mut T {
    phys_to_virt(base).wrapping_add(off).cast::<T>()
}

impl Host for Kernel {
    fn read32(&self, base: u64, off: usize) -> u32 {
        // Safety: `base` is a unit's register block (4 KiB, below 4 GiB:
        // checked in `init`, in the direct map); `off` one of its registers.
        unsafe { register::<u32>(base, off).read_volatile() }
    }
    fn write32(&mut self, base: u64, off: usize, value: u32) {
        // Safety: as `read32`.
        unsafe { register::<u32>(base, off).write_volatile(value) }
    }
    fn read64(&self, base: u64, off: usize) -> u64 {
        // Safety: as `read32`; 64-bit registers are 8-byte aligned.
        unsafe { register::<u64>(base, off).read_volatile() }
    }
    fn write64(&mut self, base: u64, off: usize, value: u64) {
        // Safety: as `read64`.
        unsafe { register::<u64>(base, off).write_volatile(value) }
    }
    fn alloc_frame(&mut self) -> Option<u64> {
        alloc_zeroed_frame()
    }
    fn free_frame(&mut self, frame: u64) {
        free_frame(frame);
    }
    fn frame(&self, frame: u64) -> &[u64; ENTRIES] {
        // Safety: a frame the driver allocated (root, context and IoSpace
        // tables, the queue, the status word), in the direct map, touched
        // only under `IOMMU`'s lock.
        unsafe { &*phys_to_virt(frame).cast::<[u64; ENTRIES]>() }
    }
    fn frame_mut(&mut self, frame: u64) -> &mut [u64; ENTRIES] {
        // Safety: as `frame`; `&mut self` serialises writers.
        unsafe { &mut *phys_to_virt(frame).cast::<[u64; ENTRIES]>() }
    }
    fn flush_caches(&mut self) {
        // Safety: WBINVD writes back and invalidates caches; it changes no
        // memory contents.
        unsafe { core::arch::asm!("wbinvd", options(nostack)) };
    }
    fn wait(&mut self, done: &mut dyn FnMut(&Self) -> bool) -> bool {
        (0..SPINS).any(|_| {
            core::hint::spin_loop();
            done(self)
        })
    }
    fn pci_read(&self, segment: u16, source: u16, offset: u8) -> u32 {
        if segment != 0 {
            return u32::MAX;
        }
        // Safety: as in `check_device`: nobody else uses the configuration
        // ports while the kernel runs (the address port kept for init).
        keeping_address(|| unsafe { platform::pci::read(source, offset) })
    }
}

/// Turns every unit on with nothing attached (all DMA blocked).
/// `registers_only`: `iommu=register` on the command line, to use
/// register-based invalidation even where the unit has a queue.
pub fn init(dmar: &Dmar<'static>, registers_only: bool) {
    let mut iommu = Iommu::new(Kernel, dmar.clone());
    for (i, d) in dmar.drhds().enumerate() {
        if d.register_base >= crate::mem::DIRECT_MAP_END || d.register_base % 4096 != 0 {
            defmt::warn!(
                "IOMMU: unit at {=u64:#x} is outside the direct map; its devices stay as the firmware left them",
                d.register_base
            );
            continue;
        }
        let (levels, version) = match iommu.enable(i, registers_only) {
            Enabled::On { levels, version } => (levels, version),
            other => {
                defmt::warn!(
                    "IOMMU: unit at {=u64:#x} not used: {=str}",
                    d.register_base,
                    match other {
                        Enabled::Unusable => "it does not answer, or walks neither 3 nor 4 levels",
                        Enabled::NoAnswer => "a command did not complete",
                        _ => "out of memory",
                    }
                );
                continue;
            }
        };
        let u = iommu.units.last().expect("the unit just enabled");
        defmt::info!(
            "IOMMU: unit at {=u64:#x} (version {=u32:#x}): {=u32} domain ids, {=u8}-level tables, {=str} invalidation, caching mode {=bool}, coherent {=bool}: translation on, every device blocked until attached",
            d.register_base,
            version,
            u.cap.domains(),
            levels,
            if u.queue.is_some() {
                "queued"
            } else {
                "register-based"
            },
            u.cap.caching_mode(),
            u.ecap.coherent()
        );
    }
    if !iommu.units.is_empty() {
        *IOMMU.lock() = Some(iommu);
    }
}

/// The vector of the units' fault events (IO-6), after the 16 ISA lines.
pub const FAULT_VECTOR: u8 = 0x40;

/// Has every unit raise [`FAULT_VECTOR`] at the boot CPU's local APIC
/// (`apic_id`) when it records a fault; the interrupt notifies whoever
/// bound it (`sys::irq`), which reads the records (IOMMU_FAULTS).
pub fn fault_interrupts(apic_id: u32) {
    if let Some(i) = IOMMU.lock().as_mut() {
        i.fault_interrupts(
            0xfee0_0000 | (apic_id & 0xff) << 12,
            u32::from(FAULT_VECTOR),
        );
        defmt::info!(
            "IOMMU: fault events raise vector {=u8:#x} at local APIC {=u32} (IO-6)",
            FAULT_VECTOR,
            apic_id
        );
    }
}

/// Configuration space through the ports, and a TSC clock.
struct Ports;

impl platform::pci::Config for Ports {
    fn read(&mut self, source: u16, offset: u8) -> u32 {
        // Safety: as in `check_device`.
        unsafe { platform::pci::read(source, offset) }
    }
    fn write(&mut self, source: u16, offset: u8, value: u32) {
        // Safety: as in `check_device`; the function is the caller's, and
        // the bridge a bus reset goes through has nothing else below it.
        unsafe { platform::pci::write(source, offset, value) }
    }
    fn write_sized(&mut self, source: u16, offset: u8, size: u8, value: u32) {
        // Safety: as `write`; DEVICE_CONFIG checked the write first.
        unsafe { platform::pci::write_sized(source, offset, size, value) }
    }
    fn sleep_ms(&mut self, ms: u32) {
        if crate::time::tsc_hz().is_none() {
            // No clock: spin (longer than needed on any CPU).
            (0..u64::from(ms) * 1_000_000).for_each(|_| core::hint::spin_loop());
            return;
        }
        let end = crate::time::micros() + 1000 * u64::from(ms);
        while crate::time::micros() < end {
            core::hint::spin_loop();
        }
    }
}

/// Runs `f` with the configuration address port (0xcf8) as it found it
/// afterwards: init, which programs devices through its two port calls,
/// may have been preempted between them.
fn keeping_address<R>(f: impl FnOnce() -> R) -> R {
    // Safety: reading and writing back the address port changes nothing.
    let address = unsafe { platform::port::inl(0xcf8) };
    let r = f();
    // Safety: as above.
    unsafe { platform::port::outl(0xcf8, address) };
    r
}

/// Resets under way (DEVICE_RESET in steps), with the time (µs since
/// boot) from which their next step may run.
static RESETS: spin::Mutex<[Option<(platform::pci::Resetting, u64)>; 8]> =
    spin::Mutex::new([None; 8]);

/// Resets segment-0 function `source` (its owner asked, DEVICE_RESET), a
/// step per call: how, and the µs its caller waits before calling again
/// (0: done, the header written back). A call before the wait is over
/// changes nothing and answers what is left of it. Without a clock the
/// whole reset is done at once (spinning through its waits).
pub fn reset(source: u16) -> Result<(platform::pci::Reset, u64), ipc_schema::syscall::SysError> {
    use platform::pci::Resetting;
    if crate::time::tsc_hz().is_none() {
        let how = keeping_address(|| platform::pci::reset(&mut Ports, source));
        return how
            .map(|h| (h, 0))
            .ok_or(ipc_schema::syscall::SysError::Busy);
    }
    let mut resets = RESETS.lock();
    let now = crate::time::micros();
    let slot = match resets
        .iter()
        .position(|r| r.is_some_and(|(r, _)| r.source == source))
    {
        Some(i) => i,
        None => {
            let free = resets
                .iter()
                .position(Option::is_none)
                .ok_or(ipc_schema::syscall::SysError::NoResources)?;
            let (r, wait) = keeping_address(|| Resetting::start(&mut Ports, source))
                .ok_or(ipc_schema::syscall::SysError::Busy)?;
            let Some(ms) = wait else {
                return Ok((r.how, 0));
            };
            resets[free] = Some((r, now + 1000 * u64::from(ms)));
            return Ok((r.how, 1000 * u64::from(ms)));
        }
    };
    let Some((r, due)) = resets[slot].as_mut() else {
        return Err(ipc_schema::syscall::SysError::Busy);
    };
    let how = r.how;
    if now < *due {
        return Ok((how, *due - now));
    }
    match keeping_address(|| r.step(&mut Ports)) {
        Some(ms) => {
            *due = now + 1000 * u64::from(ms);
            Ok((how, 1000 * u64::from(ms)))
        }
        None => {
            resets[slot] = None;
            Ok((how, 0))
        }
    }
}

/// DEVICE_CONFIG on segment-0 function `source` (its holder asked): a
/// read, a write the platform's checks allow, or a BAR probe.
pub fn config(source: u16, offset: u64, size: u64, op: u64, value: u64) -> Result<u32, Refusal> {
    use ipc_schema::syscall::device_config as ops;
    use platform::pci::{Config, check_access, check_write, probe_bar};
    let at = check_access(offset, size)?;
    let size = size as u8;
    keeping_address(|| match op {
        ops::READ => {
            let v = Ports.read(source, at) >> (8 * u32::from(at & 3));
            Ok(if size == 4 {
                v
            } else {
                v & ((1 << (8 * size)) - 1)
            })
        }
        ops::WRITE => {
            check_write(&mut Ports, source, at, size, value as u32)?;
            Ports.write_sized(source, at, size, value as u32);
            Ok(0)
        }
        ops::PROBE if size == 4 => probe_bar(&mut Ports, source, at),
        ops::PROBE => Err(Refusal::NotABar),
        _ => Err(Refusal::Op),
    })
}

/// Checks that a device can be handed out: a unit covers it and (on
/// segment 0, where the kernel can look) something answers there.
pub fn check_device(iommu: &Iommu, segment: u16, source: u16) -> Result<(), IommuError> {
    iommu
        .unit_of(segment, source)
        .ok_or(IommuError::NotCovered)?;
    if segment == 0 {
        // Safety: init, the only other user of the configuration ports,
        // cannot run while the kernel does (the address port kept for it).
        let id = keeping_address(|| unsafe { platform::pci::read(source, 0) });
        if id & 0xffff == 0xffff {
            return Err(IommuError::NoDevice);
        }
    }
    Ok(())
}

/// A memory BAR of a segment-0 function: (address, bytes).
pub fn bar(source: u16, index: u8) -> Option<(u64, u64)> {
    // Safety: as in `check_device`; the device's driver, if any, is the
    // service that asks for its BAR, blocked in this call.
    keeping_address(|| unsafe { platform::pci::memory_bar(source, index) })
}

/// Whether a device may reach a frame `claimed` claims through an IoSpace
/// (DMA into a frame that sharing would free or make read-only, or into a
/// fork's parent).
pub fn maps_any(claimed: impl Fn(u64) -> bool) -> bool {
    IOMMU.lock().as_mut().is_some_and(|i| i.maps_any(claimed))
}

/// A domain being destroyed: every IoSpace page that maps its RAM is
/// unmapped and the IOTLB invalidated first (IO-4), so no device keeps a
/// way into frames the domain no longer owns.
pub fn drop_domain(d: &Option<crate::vm::domain::Domain>) {
    let Some(d) = d else { return };
    let mut guard = IOMMU.lock();
    let Some(iommu) = guard.as_mut() else { return };
    for s in 0..MAX_SPACES as u16 {
        let n = iommu.unmap_where(s, |hpa| d.gfn_of_frame(hpa).is_some());
        if n > 0 {
            defmt::info!(
                "IOMMU: domain {=u16} ends: {=u64} page(s) of it unmapped from IoSpace {=u16}",
                d.id,
                n,
                s
            );
        }
    }
}
