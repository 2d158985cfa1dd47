//! DMA remapping (VT-d): the mechanism only (issue 12). At boot every unit
//! the DMAR lists gets an empty root table and translation on, so a device
//! nobody attached has no context entry and no DMA. The rest is done under
//! capabilities: IoSpaces (DMA page tables with a domain id) are created,
//! devices attached to them, and a domain's RAM frames mapped at bus frame
//! numbers a service chooses; an unmap returns only once the IOTLB
//! invalidation that removes it has completed (IO-3). Who maps what for
//! whom is the `iommu` service's business. Formats: `platform::vtd`.

use crate::mem::phys_to_virt;
use crate::vm::memory::{alloc_zeroed_frame, free_frame};
use platform::acpi::dmar::Dmar;
use platform::ept::{ENTRIES, TableMemory};
use platform::vtd::{self, Cap, Ecap, FaultRecord, IoError, IoTable, desc, fsts, gcmd, reg};

pub const MAX_UNITS: usize = 16;
pub const MAX_SPACES: usize = 64;
pub const MAX_ATTACHED: usize = 64;
/// Table frames all IoSpaces together may use (16 MiB).
const TABLE_QUOTA: u32 = 4096;
/// Polls of a register or status word before a unit is given up on.
const SPINS: u32 = 50_000_000;

struct Unit {
    regs: *mut u8,
    segment: u16,
    include_all: bool,
    /// The DRHD's index in the DMAR (for its device scopes).
    drhd: usize,
    cap: Cap,
    ecap: Ecap,
    root: u64,
    /// The invalidation queue (one page, 256 descriptors) and its tail,
    /// where the unit has one (and `iommu=register` did not turn it off).
    queue: Option<(u64, u64)>,
    /// The frame the unit writes its wait descriptors' status into.
    status: u64,
    sequence: u32,
}

// Safety: the register pointer is the direct map of the unit's registers;
// the kernel touches it with the kernel state locked, on one CPU.
unsafe impl Send for Unit {}

/// One IoSpace.
pub struct Space {
    pub table: IoTable,
    pub did: u16,
    /// Pages mapped now.
    pub pages: u64,
}

pub struct Iommu {
    units: heapless::Vec<Unit, MAX_UNITS>,
    dmar: Dmar<'static>,
    pub spaces: [Option<Space>; MAX_SPACES],
    /// (segment, source id, space index) of every attached device.
    attached: heapless::Vec<(u16, u16, u16), MAX_ATTACHED>,
    levels: u8,
    /// The fewest domain ids any unit supports.
    domain_ids: u32,
    tables: u32,
    pub invalidations: u64,
    pub lost_faults: u64,
}

pub static IOMMU: spin::Mutex<Option<Iommu>> = spin::Mutex::new(None);

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum IommuError {
    /// No unit's scope covers the device, nor an INCLUDE_PCI_ALL unit of
    /// its segment.
    NotCovered,
    NoDevice,
    Busy,
    NoResources,
    Io(IoError),
    NotMapped {
        bfn: u64,
    },
    /// A unit did not complete a command.
    Timeout,
}

fn read32(u: &Unit, off: usize) -> u32 {
    // Safety: `off` is a register of the unit's block (4 KiB, direct map).
    unsafe { u.regs.add(off).cast::<u32>().read_volatile() }
}
fn write32(u: &Unit, off: usize, v: u32) {
    // Safety: as `read32`.
    unsafe { u.regs.add(off).cast::<u32>().write_volatile(v) }
}
fn read64(u: &Unit, off: usize) -> u64 {
    // Safety: as `read32`; 64-bit registers are 8-byte aligned.
    unsafe { u.regs.add(off).cast::<u64>().read_volatile() }
}
fn write64(u: &Unit, off: usize, v: u64) {
    // Safety: as `read64`.
    unsafe { u.regs.add(off).cast::<u64>().write_volatile(v) }
}

fn spin_until(mut done: impl FnMut() -> bool) -> Result<(), IommuError> {
    for _ in 0..SPINS {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(IommuError::Timeout)
}

/// Sets a global command bit and waits for its status.
fn command(u: &Unit, bit: u32) -> Result<(), IommuError> {
    let status = read32(u, reg::GSTS) & !gcmd::ONE_SHOT;
    write32(u, reg::GCMD, status | bit);
    spin_until(|| read32(u, reg::GSTS) & bit != 0)
}

/// Makes table writes visible to a unit that does not snoop the caches.
fn flush_caches(u: &Unit) {
    if !u.ecap.coherent() {
        // Safety: WBINVD writes back and invalidates caches; it changes no
        // memory contents.
        unsafe { core::arch::asm!("wbinvd", options(nostack)) };
    }
}

impl Unit {
    /// Runs invalidation descriptors (queued) or their register form, and
    /// waits for them to complete.
    fn invalidate(&mut self, context: bool, did: Option<u16>) -> Result<(), IommuError> {
        flush_caches(self);
        let (dw, dr) = self.cap.drain();
        if let Some((base, tail)) = self.queue {
            self.sequence = self.sequence.wrapping_add(1);
            let iotlb = match did {
                Some(d) => desc::iotlb_domain(d, dw, dr),
                None => desc::iotlb_global(dw, dr),
            };
            let mut descs: heapless::Vec<(u64, u64), 3> = heapless::Vec::new();
            if context {
                let _ = descs.push(desc::context_global());
            }
            let _ = descs.push(iotlb);
            let _ = descs.push(desc::wait(self.status, self.sequence));
            let mut t = tail;
            for (lo, hi) in descs {
                // Safety: the queue is a page the kernel owns, 256 slots of
                // 16 bytes; `t` < 256.
                unsafe {
                    let slot = phys_to_virt(base).cast::<u64>().add(2 * t as usize);
                    slot.write_volatile(lo);
                    slot.add(1).write_volatile(hi);
                }
                t = (t + 1) % 256;
            }
            self.queue = Some((base, t));
            write64(self, reg::IQT, t << 4);
            let (status, want) = (self.status, self.sequence);
            // Safety: the status word is a frame the kernel owns.
            let word = unsafe { &*phys_to_virt(status).cast::<core::sync::atomic::AtomicU32>() };
            let r = spin_until(|| {
                word.load(core::sync::atomic::Ordering::Acquire) == want
                    || read32(self, reg::FSTS) & fsts::IQE != 0
            });
            if read32(self, reg::FSTS) & fsts::IQE != 0 {
                defmt::error!("IOMMU: the unit refused an invalidation descriptor");
                return Err(IommuError::Timeout);
            }
            r
        } else {
            if context {
                write64(self, reg::CCMD, vtd::ccmd_global());
                spin_until(|| read64(self, reg::CCMD) & (1 << 63) == 0)?;
            }
            let at = self.ecap.iotlb_offset() + 8;
            let cmd = match did {
                Some(d) => vtd::iotlb_domain(d, dw, dr),
                None => vtd::iotlb_global(),
            };
            write64(self, at, cmd);
            spin_until(|| read64(self, at) & (1 << 63) == 0)
        }
    }

    /// The context entry of a source id, its table made where asked.
    fn context_slot(&mut self, source: u16, make: bool) -> Option<*mut u64> {
        let bus = usize::from(source >> 8);
        // Safety: the root table is a frame of 256 16-byte entries.
        let root = unsafe { phys_to_virt(self.root).cast::<u64>().add(2 * bus) };
        // Safety: as above.
        let mut entry = unsafe { root.read_volatile() };
        if entry & 1 == 0 {
            if !make {
                return None;
            }
            let table = alloc_zeroed_frame()?;
            entry = vtd::root_entry(table);
            // Safety: as above.
            unsafe { root.write_volatile(entry) };
        }
        let table = entry & !0xfff;
        // Safety: a context table the kernel made: 256 16-byte entries.
        Some(unsafe {
            phys_to_virt(table)
                .cast::<u64>()
                .add(2 * usize::from(source & 0xff))
        })
    }
}

/// Table memory for IoSpaces: kernel frames, counted against one quota.
struct IoMemory<'a>(&'a mut u32);

impl TableMemory for IoMemory<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        if *self.0 >= TABLE_QUOTA {
            return None;
        }
        let t = alloc_zeroed_frame()?;
        *self.0 += 1;
        Some(t)
    }
    fn free_table(&mut self, table: u64) {
        *self.0 = self.0.saturating_sub(1);
        free_frame(table);
    }
    fn entries(&self, table: u64) -> &[u64; ENTRIES] {
        crate::vm::memory::KernelTables.entries(table)
    }
    fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES] {
        // Safety: an IoSpace table frame the kernel allocated, in the direct
        // map, written only under the kernel state's lock.
        unsafe { &mut *phys_to_virt(table).cast::<[u64; ENTRIES]>() }
    }
}

/// Turns every unit on with nothing attached (all DMA blocked).
/// `registers_only`: `iommu=register` on the command line, to use
/// register-based invalidation even where the unit has a queue.
pub fn init(dmar: &Dmar<'static>, registers_only: bool) {
    let mut units = heapless::Vec::new();
    let (mut levels, mut domain_ids) = (4u8, u32::MAX);
    for (i, d) in dmar.drhds().enumerate() {
        if d.register_base >= crate::mem::DIRECT_MAP_END || d.register_base % 4096 != 0 {
            defmt::warn!(
                "IOMMU: unit at {=u64:#x} is outside the direct map; its devices stay as the firmware left them",
                d.register_base
            );
            continue;
        }
        let regs = phys_to_virt(d.register_base);
        let (Some(root), Some(status)) = (alloc_zeroed_frame(), alloc_zeroed_frame()) else {
            defmt::error!("IOMMU: out of memory for the root table");
            return;
        };
        let probe = Unit {
            regs,
            segment: d.segment,
            include_all: d.include_pci_all,
            drhd: i,
            cap: Cap(0),
            ecap: Ecap(0),
            root,
            queue: None,
            status,
            sequence: 0,
        };
        let mut u = Unit {
            cap: Cap(read64(&probe, reg::CAP)),
            ecap: Ecap(read64(&probe, reg::ECAP)),
            ..probe
        };
        // Nothing there reads as all ones (or zeros, as QEMU gives).
        let l = u.cap.levels().filter(|_| u.cap.0 != u64::MAX);
        let Some(l) = l else {
            defmt::warn!(
                "IOMMU: unit at {=u64:#x} does not answer or walks neither 3 nor 4 levels; not used",
                d.register_base
            );
            continue;
        };
        levels = levels.min(l);
        domain_ids = domain_ids.min(u.cap.domains());
        write64(&u, reg::RTADDR, root);
        let mut ok = command(&u, gcmd::SRTP);
        if ok.is_ok() && u.ecap.queued_invalidation() && !registers_only {
            match alloc_zeroed_frame() {
                Some(q) => {
                    write64(&u, reg::IQT, 0);
                    write64(&u, reg::IQA, q);
                    u.queue = Some((q, 0));
                    ok = command(&u, gcmd::QIE);
                }
                None => u.queue = None,
            }
        }
        let ok = ok
            .and_then(|()| u.invalidate(true, None))
            .and_then(|()| command(&u, gcmd::TE));
        defmt::info!(
            "IOMMU: unit at {=u64:#x} (version {=u32:#x}): {=u32} domain ids, {=u8}-level tables, {=str} invalidation, caching mode {=bool}, coherent {=bool}: {=str}",
            d.register_base,
            read32(&u, reg::VER),
            u.cap.domains(),
            l,
            if u.queue.is_some() {
                "queued"
            } else {
                "register-based"
            },
            u.cap.caching_mode(),
            u.ecap.coherent(),
            if ok.is_ok() {
                "translation on, every device blocked until attached"
            } else {
                "did not answer; left off"
            }
        );
        if ok.is_ok() {
            let _ = units.push(u);
        }
    }
    if units.is_empty() {
        return;
    }
    *IOMMU.lock() = Some(Iommu {
        units,
        dmar: dmar.clone(),
        spaces: [const { None }; MAX_SPACES],
        attached: heapless::Vec::new(),
        levels,
        domain_ids,
        tables: 0,
        invalidations: 0,
        lost_faults: 0,
    });
}

/// PCI configuration read (segment 0).
pub fn config_read(bdf: u16, offset: u8) -> u32 {
    // Safety: init, the only other user of the configuration ports, cannot
    // run while the kernel does.
    unsafe { platform::pci::read(bdf, offset) }
}

impl Iommu {
    /// The unit that translates the device's DMA.
    fn unit_of(&self, segment: u16, source: u16) -> Option<usize> {
        let (bus, dev, func) = (
            (source >> 8) as u8,
            ((source >> 3) & 31) as u8,
            (source & 7) as u8,
        );
        let drhds: heapless::Vec<_, 64> = self.dmar.drhds().take(64).collect();
        let listed = self.units.iter().position(|u| {
            u.segment == segment
                && drhds.get(u.drhd).is_some_and(|d| {
                    d.scopes
                        .iter()
                        .any(|s| s.direct_bdf() == Some((bus, dev, func)))
                })
        });
        listed.or_else(|| {
            self.units
                .iter()
                .position(|u| u.segment == segment && u.include_all)
        })
    }

    /// Reserved region `index` (RMRR-1): (first byte, last byte), its
    /// directly named device scopes into `scopes` (segment << 16 | source).
    pub fn rmrr(&self, index: u64, scopes: &mut heapless::Vec<u32, 64>) -> Option<(u64, u64)> {
        let r = self.dmar.rmrrs().nth(usize::try_from(index).ok()?)?;
        for s in r.scopes.iter() {
            if let Some((bus, dev, func)) = s.direct_bdf() {
                let source = u32::from(bus) << 8 | u32::from(dev) << 3 | u32::from(func);
                let _ = scopes.push(u32::from(r.segment) << 16 | source);
            }
        }
        Some((r.base, r.limit))
    }

    /// Checks that a device can be handed out: a unit covers it and (on
    /// segment 0, where the kernel can look) something answers there.
    pub fn check_device(&self, segment: u16, source: u16) -> Result<(), IommuError> {
        self.unit_of(segment, source)
            .ok_or(IommuError::NotCovered)?;
        if segment == 0 && config_read(source, 0) & 0xffff == 0xffff {
            return Err(IommuError::NoDevice);
        }
        Ok(())
    }

    pub fn create_space(&mut self) -> Result<u16, IommuError> {
        let slot = self
            .spaces
            .iter()
            .position(Option::is_none)
            .ok_or(IommuError::NoResources)?;
        // Domain id 0 is reserved where the unit caches not-present entries.
        let did = slot as u16 + 1;
        if u32::from(did) >= self.domain_ids {
            return Err(IommuError::NoResources);
        }
        let table =
            IoTable::new(&mut IoMemory(&mut self.tables), self.levels).map_err(IommuError::Io)?;
        self.spaces[slot] = Some(Space {
            table,
            did,
            pages: 0,
        });
        Ok(slot as u16)
    }

    /// Points the device's context entry at the space (`Some`) or clears it.
    pub fn attach(
        &mut self,
        space: u16,
        segment: u16,
        source: u16,
        on: bool,
    ) -> Result<(), IommuError> {
        let unit = self
            .unit_of(segment, source)
            .ok_or(IommuError::NotCovered)?;
        let at = self
            .attached
            .iter()
            .position(|a| a.0 == segment && a.1 == source);
        let s = self.spaces[usize::from(space)]
            .as_ref()
            .ok_or(IommuError::NoResources)?;
        let entry = vtd::context_entry(s.table.root(), s.table.levels(), s.did);
        match (on, at) {
            (true, Some(i)) if self.attached[i].2 == space => return Ok(()),
            (true, Some(_)) => return Err(IommuError::Busy),
            (false, Some(i)) if self.attached[i].2 == space => {}
            (false, _) => return Err(IommuError::Busy),
            (true, None) => {}
        }
        let u = &mut self.units[unit];
        let slot = u.context_slot(source, on).ok_or(IommuError::NoResources)?;
        if on {
            self.attached
                .push((segment, source, space))
                .map_err(|_| IommuError::NoResources)?;
            // Safety: `slot` is the device's 16-byte context entry; the high
            // half is written before the present bit.
            unsafe {
                slot.add(1).write_volatile(entry.1);
                slot.write_volatile(entry.0);
            }
        } else {
            self.attached.retain(|a| !(a.0 == segment && a.1 == source));
            // Safety: as above; the present bit goes first.
            unsafe {
                slot.write_volatile(0);
                slot.add(1).write_volatile(0);
            }
        }
        self.invalidations += 1;
        self.units[unit].invalidate(true, None)
    }

    /// Maps each (bfn, frame) of `pairs`, all or none.
    pub fn map(
        &mut self,
        space: u16,
        pairs: &[(u64, u64)],
        write: bool,
    ) -> Result<(), (usize, IommuError)> {
        let s = self.spaces[usize::from(space)]
            .as_mut()
            .ok_or((0, IommuError::NoResources))?;
        let mut mem = IoMemory(&mut self.tables);
        for (i, &(bfn, hpa)) in pairs.iter().enumerate() {
            if let Err(e) = s.table.map(&mut mem, bfn, hpa, write) {
                for &(b, _) in &pairs[..i] {
                    s.table.unmap(&mut mem, b);
                }
                return Err((i, IommuError::Io(e)));
            }
        }
        s.pages += pairs.len() as u64;
        let did = s.did;
        // A unit in caching mode may hold the not-present entries.
        self.flush(did, true).map_err(|e| (0, e))
    }

    /// Unmaps every bfn (all must be mapped, else nothing changes), then
    /// invalidates the IOTLB for the space's domain id and waits.
    pub fn unmap(&mut self, space: u16, bfns: &[u64]) -> Result<(), (usize, IommuError)> {
        let s = self.spaces[usize::from(space)]
            .as_mut()
            .ok_or((0, IommuError::NoResources))?;
        let mut mem = IoMemory(&mut self.tables);
        if let Some(i) = bfns
            .iter()
            .position(|&b| s.table.translate(&mem, b).is_none())
        {
            return Err((i, IommuError::NotMapped { bfn: bfns[i] }));
        }
        let mut done = 0;
        for &b in bfns {
            // A bfn twice in the batch is unmapped once.
            done += u64::from(s.table.unmap(&mut mem, b).is_some());
        }
        s.pages -= done;
        let did = s.did;
        self.flush(did, false).map_err(|e| (0, e))
    }

    /// Unmaps every page of the space whose frame `owned` claims (a domain
    /// being destroyed), then invalidates. Returns the pages unmapped.
    pub fn unmap_where(&mut self, space: u16, owned: impl Fn(u64) -> bool) -> u64 {
        let Some(s) = self.spaces[usize::from(space)].as_mut() else {
            return 0;
        };
        let mut mem = IoMemory(&mut self.tables);
        let mut total = 0;
        loop {
            let mut batch: heapless::Vec<u64, 64> = heapless::Vec::new();
            s.table.for_each(&mem, |bfn, hpa| {
                if owned(hpa) {
                    let _ = batch.push(bfn);
                }
            });
            if batch.is_empty() {
                break;
            }
            for &b in &batch {
                s.table.unmap(&mut mem, b);
            }
            total += batch.len() as u64;
        }
        s.pages -= total;
        let did = s.did;
        if total > 0 {
            let _ = self.flush(did, false);
        }
        total
    }

    /// Invalidates the IOTLB of domain id `did` on every unit that has a
    /// device attached to it (with `only_caching`, only units in caching
    /// mode: after maps).
    fn flush(&mut self, did: u16, only_caching: bool) -> Result<(), IommuError> {
        let space = did - 1;
        let mut r = Ok(());
        for i in 0..self.units.len() {
            let used = self
                .attached
                .iter()
                .any(|&(seg, src, sp)| sp == space && self.unit_of(seg, src) == Some(i));
            let u = &mut self.units[i];
            if only_caching && !u.cap.caching_mode() {
                flush_caches(u);
                continue;
            }
            if used {
                self.invalidations += 1;
                r = r.and(u.invalidate(false, Some(did)));
            }
        }
        r
    }

    /// Takes every unit's fault records (and clears them).
    pub fn faults(&mut self, mut f: impl FnMut(ipc_schema::syscall::IoFault) -> bool) {
        for (i, u) in self.units.iter().enumerate() {
            let status = read32(u, reg::FSTS);
            if status & fsts::PFO != 0 {
                self.lost_faults += 1;
            }
            for r in 0..u.cap.fault_records() {
                let at = u.cap.fault_offset() + 16 * r;
                let (lo, hi) = (read64(u, at), read64(u, at + 8));
                let Some(rec) = FaultRecord::decode(lo, hi) else {
                    continue;
                };
                if !f(ipc_schema::syscall::IoFault {
                    address: rec.address,
                    source: rec.source,
                    segment: u.segment,
                    reason: rec.reason,
                    write: rec.write,
                    unit: i as u8,
                }) {
                    return;
                }
                // F is write-1-to-clear, in the record's last dword.
                write32(u, at + 12, 1 << 31);
            }
            write32(u, reg::FSTS, fsts::PFO);
        }
    }
}

/// A memory BAR of a segment-0 function: (address, bytes).
pub fn bar(source: u16, index: u8) -> Option<(u64, u64)> {
    // Safety: as `config_read`; the device's driver, if any, is the
    // service that asks for its BAR, blocked in this call.
    unsafe { platform::pci::memory_bar(source, index) }
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
