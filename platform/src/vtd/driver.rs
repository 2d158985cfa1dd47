//! The remapping units as the kernel drives them: each unit turned on with
//! an empty root table (every device blocked), IoSpaces (second-level tables
//! with a domain id), context entries pointing devices at them, batches of
//! maps and unmaps, IOTLB invalidation (queued where the unit has it,
//! register-based otherwise) waited for, fault records taken. Mechanism
//! only; what is mapped for whom is decided in ring 3 (docs/iommu.md).
//!
//! The kernel supplies registers and memory through [`Host`]; the host
//! tests supply a model of a unit.

use super::{Cap, Ecap, FaultRecord, IoError, IoTable, desc, fsts, gcmd, reg};
use crate::acpi::dmar::Dmar;
use crate::ept::{ENTRIES, TableMemory};
use core::sync::atomic::{Ordering, fence};

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;

/// A store the unit reads (by DMA): never elided or merged.
fn store(slot: &mut u64, value: u64) {
    // Safety: `slot` is a valid, aligned, exclusive reference.
    unsafe { core::ptr::write_volatile(slot, value) }
}

/// A load of what the unit writes (by DMA): read every time.
fn load(slot: &u64) -> u64 {
    // Safety: `slot` is a valid, aligned reference.
    unsafe { core::ptr::read_volatile(slot) }
}

pub const MAX_UNITS: usize = 16;
pub const MAX_SPACES: usize = 64;
pub const MAX_ATTACHED: usize = 64;
/// Table frames all IoSpaces together may use (16 MiB).
pub const TABLE_QUOTA: u32 = 4096;

/// What the driver needs from the kernel.
pub trait Host {
    /// A register of the unit whose block is at physical `base`.
    fn read32(&self, base: u64, off: usize) -> u32;
    fn write32(&mut self, base: u64, off: usize, value: u32);
    fn read64(&self, base: u64, off: usize) -> u64;
    fn write64(&mut self, base: u64, off: usize, value: u64);
    /// A zeroed 4 KiB frame of kernel memory.
    fn alloc_frame(&mut self) -> Option<u64>;
    fn free_frame(&mut self, frame: u64);
    /// The 512 u64s of a frame this driver allocated (volatile-safe: units
    /// read and write them).
    fn frame(&self, frame: u64) -> &[u64; ENTRIES];
    fn frame_mut(&mut self, frame: u64) -> &mut [u64; ENTRIES];
    /// Writes back the CPU caches (for units that do not snoop them).
    fn flush_caches(&mut self);
    /// Polls a condition until it holds: `false` once the host gives up.
    fn wait(&mut self, done: &mut dyn FnMut(&Self) -> bool) -> bool;
    /// A PCI configuration dword of function `source` in `segment` (all
    /// ones where nothing answers or the host cannot look): device scopes'
    /// paths cross bridges by their secondary bus numbers.
    fn pci_read(&self, segment: u16, source: u16, offset: u8) -> u32;
}

/// Why an operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
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

/// One unit.
#[derive(Debug)]
pub struct Unit {
    pub base: u64,
    pub segment: u16,
    pub include_all: bool,
    /// The DRHD's index in the DMAR (for its device scopes).
    pub drhd: usize,
    pub cap: Cap,
    pub ecap: Ecap,
    root: u64,
    /// The invalidation queue (one page, 256 descriptors) and its tail.
    pub queue: Option<(u64, u64)>,
    /// The frame the unit writes its wait descriptors' status into.
    status: u64,
    sequence: u32,
}

/// What turning a unit on found (for the kernel's log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enabled {
    On {
        version: u32,
        levels: u8,
    },
    /// Its registers read all ones or zeros, or it walks neither 3 nor 4
    /// levels.
    Unusable,
    /// A command did not complete.
    NoAnswer,
    OutOfMemory,
}

/// One IoSpace.
#[derive(Debug)]
pub struct Space {
    pub table: IoTable,
    pub did: u16,
    /// Pages mapped now.
    pub pages: u64,
}

/// Every unit and IoSpace.
pub struct Iommu<'a, H: Host> {
    pub host: H,
    pub units: heapless::Vec<Unit, MAX_UNITS>,
    dmar: Dmar<'a>,
    pub spaces: [Option<Space>; MAX_SPACES],
    /// (segment, source id, space index, unit) of every attached device.
    attached: heapless::Vec<(u16, u16, u16, usize), MAX_ATTACHED>,
    levels: u8,
    /// The fewest domain ids any unit supports.
    domain_ids: u32,
    tables: u32,
    pub invalidations: u64,
    pub lost_faults: u64,
}

/// IoSpace tables in host frames, counted against [`TABLE_QUOTA`].
struct Tables<'h, H: Host>(&'h mut H, &'h mut u32);

impl<H: Host> TableMemory for Tables<'_, H> {
    fn alloc_table(&mut self) -> Option<u64> {
        if *self.1 >= TABLE_QUOTA {
            return None;
        }
        let t = self.0.alloc_frame()?;
        *self.1 += 1;
        Some(t)
    }
    fn free_table(&mut self, table: u64) {
        *self.1 = self.1.saturating_sub(1);
        self.0.free_frame(table);
    }
    fn entries(&self, table: u64) -> &[u64; ENTRIES] {
        self.0.frame(table)
    }
    fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES] {
        self.0.frame_mut(table)
    }
}

impl<H: Host> Iommu<'_, H> {
    /// Sets a global command bit and waits for its status.
    fn command(&mut self, unit: usize, bit: u32) -> Result<(), IommuError> {
        let base = self.units[unit].base;
        let status = self.host.read32(base, reg::GSTS) & !gcmd::ONE_SHOT;
        self.host.write32(base, reg::GCMD, status | bit);
        self.wait(|h| h.read32(base, reg::GSTS) & bit != 0)
    }

    fn wait(&mut self, mut done: impl FnMut(&H) -> bool) -> Result<(), IommuError> {
        if self.host.wait(&mut done) {
            Ok(())
        } else {
            Err(IommuError::Timeout)
        }
    }

    /// Runs the invalidation (context cache too with `context`; the IOTLB
    /// of domain id `did`, or all of it) on a unit, and waits for it.
    fn invalidate(
        &mut self,
        unit: usize,
        context: bool,
        did: Option<u16>,
    ) -> Result<(), IommuError> {
        self.invalidations += 1;
        let u = &self.units[unit];
        if !u.ecap.coherent() {
            self.host.flush_caches();
        }
        // Table and queue writes before the unit is told.
        fence(Ordering::SeqCst);
        let (dw, dr) = u.cap.drain();
        let (base, iotlb_at) = (u.base, u.ecap.iotlb_offset() + 8);
        let Some((queue, tail)) = u.queue else {
            if context {
                self.host.write64(base, reg::CCMD, super::ccmd_global());
                self.wait(|h| h.read64(base, reg::CCMD) & (1 << 63) == 0)?;
            }
            let cmd = did.map_or(super::iotlb_global(), |d| super::iotlb_domain(d, dw, dr));
            self.host.write64(base, iotlb_at, cmd);
            return self.wait(|h| h.read64(base, iotlb_at) & (1 << 63) == 0);
        };
        let u = &mut self.units[unit];
        u.sequence = u.sequence.wrapping_add(1);
        let (status, want) = (u.status, u.sequence);
        let iotlb = did.map_or(desc::iotlb_global(dw, dr), |d| {
            desc::iotlb_domain(d, dw, dr)
        });
        let context = context.then(desc::context_global);
        let mut t = tail;
        for (lo, hi) in context.into_iter().chain([iotlb, desc::wait(status, want)]) {
            let q = self.host.frame_mut(queue);
            store(&mut q[2 * t as usize], lo);
            store(&mut q[2 * t as usize + 1], hi);
            t = (t + 1) % 256;
        }
        self.units[unit].queue = Some((queue, t));
        fence(Ordering::SeqCst);
        self.host.write64(base, reg::IQT, t << 4);
        let r = self.wait(|h| {
            load(&h.frame(status)[0]) as u32 == want || h.read32(base, reg::FSTS) & fsts::IQE != 0
        });
        if self.host.read32(base, reg::FSTS) & fsts::IQE != 0 {
            return Err(IommuError::Timeout);
        }
        r
    }
}

impl<'a, H: Host> Iommu<'a, H> {
    /// No units yet.
    pub fn new(host: H, dmar: Dmar<'a>) -> Self {
        Self {
            host,
            units: heapless::Vec::new(),
            dmar,
            spaces: [const { None }; MAX_SPACES],
            attached: heapless::Vec::new(),
            levels: 4,
            domain_ids: u32::MAX,
            tables: 0,
            invalidations: 0,
            lost_faults: 0,
        }
    }

    /// Turns DRHD `drhd` on: an empty root table (every device blocked),
    /// the invalidation queue where it has one (unless `registers_only`),
    /// caches invalidated, translation on. A unit that fails is not kept.
    pub fn enable(&mut self, drhd: usize, registers_only: bool) -> Enabled {
        let Some(d) = self.dmar.drhds().nth(drhd) else {
            return Enabled::Unusable;
        };
        let (base, segment, include_all) = (d.register_base, d.segment, d.include_pci_all);
        let (cap, ecap) = (
            Cap(self.host.read64(base, reg::CAP)),
            Ecap(self.host.read64(base, reg::ECAP)),
        );
        // Nothing there reads as all ones (or zeros, as QEMU gives).
        let Some(levels) = cap.levels().filter(|_| cap.0 != u64::MAX) else {
            return Enabled::Unusable;
        };
        let (Some(root), Some(status)) = (self.host.alloc_frame(), self.host.alloc_frame()) else {
            return Enabled::OutOfMemory;
        };
        let unit = Unit {
            base,
            segment,
            include_all,
            drhd,
            cap,
            ecap,
            root,
            queue: None,
            status,
            sequence: 0,
        };
        if self.units.push(unit).is_err() {
            return Enabled::OutOfMemory;
        }
        let i = self.units.len() - 1;
        self.host.write64(base, reg::RTADDR, root);
        let mut ok = self.command(i, gcmd::SRTP);
        if ok.is_ok()
            && ecap.queued_invalidation()
            && !registers_only
            && let Some(q) = self.host.alloc_frame()
        {
            self.host.write64(base, reg::IQT, 0);
            self.host.write64(base, reg::IQA, q);
            self.units[i].queue = Some((q, 0));
            ok = self.command(i, gcmd::QIE);
        }
        let ok = ok
            .and_then(|()| self.invalidate(i, true, None))
            .and_then(|()| self.command(i, gcmd::TE));
        if ok.is_err() {
            self.units.pop();
            return Enabled::NoAnswer;
        }
        self.levels = self.levels.min(levels);
        self.domain_ids = self.domain_ids.min(cap.domains());
        Enabled::On {
            version: self.host.read32(base, reg::VER),
            levels,
        }
    }

    /// The unit that translates the device's DMA: one whose device scope
    /// names it (its path followed through the bridges' secondary bus
    /// numbers; a sub-hierarchy covers the buses below its bridge), else an
    /// INCLUDE_PCI_ALL unit of its segment.
    pub fn unit_of(&self, segment: u16, source: u16) -> Option<usize> {
        let config = |src: u16, offset: u8| self.host.pci_read(segment, src, offset);
        let listed = self.units.iter().position(|u| {
            u.segment == segment
                && self.dmar.drhds().nth(u.drhd).is_some_and(|d| {
                    d.scopes
                        .iter()
                        .filter_map(|s| s.resolve(&config))
                        .any(|r| r.covers(source))
                })
        });
        listed.or_else(|| {
            self.units
                .iter()
                .position(|u| u.segment == segment && u.include_all)
        })
    }

    /// Reserved region `index` (RMRR-1): (first byte, last byte), the
    /// functions its device scopes lead to (paths resolved through bridges)
    /// into `scopes` (segment << 16 | source).
    pub fn rmrr<const N: usize>(
        &self,
        index: u64,
        scopes: &mut heapless::Vec<u32, N>,
    ) -> Option<(u64, u64)> {
        let r = self.dmar.rmrrs().nth(usize::try_from(index).ok()?)?;
        let config = |src: u16, offset: u8| self.host.pci_read(r.segment, src, offset);
        for s in r.scopes.iter() {
            if let Some(resolved) = s.resolve(&config) {
                let _ = scopes.push(u32::from(r.segment) << 16 | u32::from(resolved.source));
            }
        }
        Some((r.base, r.limit))
    }

    /// A new IoSpace: its index.
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
        let table = IoTable::new(&mut Tables(&mut self.host, &mut self.tables), self.levels)
            .map_err(IommuError::Io)?;
        self.spaces[slot] = Some(Space {
            table,
            did,
            pages: 0,
        });
        Ok(slot as u16)
    }

    /// Points the device's context entry at the space (`on`) or clears it
    /// (its DMA blocked again); the context cache and IOTLB invalidated.
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
        let s = self
            .spaces
            .get(usize::from(space))
            .and_then(Option::as_ref)
            .ok_or(IommuError::NoResources)?;
        let entry = super::context_entry(s.table.root(), s.table.levels(), s.did);
        match (on, at) {
            (true, Some(i)) if self.attached[i].2 == space => return Ok(()),
            (true, Some(_)) => return Err(IommuError::Busy),
            (false, Some(i)) if self.attached[i].2 == space => {}
            (false, _) => return Err(IommuError::Busy),
            (true, None) => {}
        }
        // The context table of the device's bus, made where needed.
        let root = self.units[unit].root;
        let bus = 2 * usize::from(source >> 8);
        if self.host.frame(root)[bus] & 1 == 0 {
            let table = self.host.alloc_frame().ok_or(IommuError::NoResources)?;
            self.host.frame_mut(root)[bus] = super::root_entry(table);
        }
        let table = self.host.frame(root)[bus] & !0xfff;
        let slot = 2 * usize::from(source & 0xff);
        if on {
            self.attached
                .push((segment, source, space, unit))
                .map_err(|_| IommuError::NoResources)?;
            // The high half before the present bit.
            let t = self.host.frame_mut(table);
            store(&mut t[slot + 1], entry.1);
            store(&mut t[slot], entry.0);
        } else {
            self.attached.retain(|a| !(a.0 == segment && a.1 == source));
            let t = self.host.frame_mut(table);
            store(&mut t[slot], 0);
            store(&mut t[slot + 1], 0);
        }
        self.invalidate(unit, true, None)
    }

    /// Maps each (bfn, frame) of `pairs`, all or none: `Err((i, why))`
    /// names the pair.
    pub fn map(
        &mut self,
        space: u16,
        pairs: &[(u64, u64)],
        write: bool,
    ) -> Result<(), (usize, IommuError)> {
        let s = self
            .spaces
            .get_mut(usize::from(space))
            .and_then(Option::as_mut)
            .ok_or((0, IommuError::NoResources))?;
        let mut mem = Tables(&mut self.host, &mut self.tables);
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
        self.flush(space, did, true).map_err(|e| (0, e))
    }

    /// Unmaps every bfn (all must be mapped, else nothing changes), then
    /// invalidates the IOTLB for the space's domain id and waits (IO-3).
    pub fn unmap(&mut self, space: u16, bfns: &[u64]) -> Result<(), (usize, IommuError)> {
        let s = self
            .spaces
            .get_mut(usize::from(space))
            .and_then(Option::as_mut)
            .ok_or((0, IommuError::NoResources))?;
        let mut mem = Tables(&mut self.host, &mut self.tables);
        if let Some(i) = bfns
            .iter()
            .position(|&b| s.table.translate(&mem, b).is_none())
        {
            return Err((i, IommuError::NotMapped { bfn: bfns[i] }));
        }
        for &b in bfns {
            // A bfn twice in the batch is unmapped once.
            s.pages -= u64::from(s.table.unmap(&mut mem, b).is_some());
        }
        let did = s.did;
        self.flush(space, did, false).map_err(|e| (0, e))
    }

    /// Whether any space maps a frame `claimed` claims (a frame that must
    /// not change or be freed under DMA: a page to be shared, a fork's
    /// parent's memory).
    pub fn maps_any(&mut self, claimed: impl Fn(u64) -> bool) -> bool {
        let mem = Tables(&mut self.host, &mut self.tables);
        let mut found = false;
        for s in self.spaces.iter().flatten() {
            s.table.for_each(&mem, |_, hpa| found |= claimed(hpa));
            if found {
                return true;
            }
        }
        false
    }

    /// Unmaps every page of the space whose frame `owned` claims (a domain
    /// being destroyed), then invalidates. Returns the pages unmapped.
    pub fn unmap_where(&mut self, space: u16, owned: impl Fn(u64) -> bool) -> u64 {
        let Some(s) = self
            .spaces
            .get_mut(usize::from(space))
            .and_then(Option::as_mut)
        else {
            return 0;
        };
        let mut mem = Tables(&mut self.host, &mut self.tables);
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
            let _ = self.flush(space, did, false);
        }
        total
    }

    /// Invalidates the IOTLB of domain id `did` on every unit a device of
    /// the space is attached behind (after maps, only units in caching
    /// mode need it).
    fn flush(&mut self, space: u16, did: u16, after_map: bool) -> Result<(), IommuError> {
        let mut r = Ok(());
        for i in 0..self.units.len() {
            let used = self
                .attached
                .iter()
                .any(|&(_, _, sp, unit)| sp == space && unit == i);
            if after_map && !self.units[i].cap.caching_mode() {
                if !self.units[i].ecap.coherent() {
                    self.host.flush_caches();
                }
            } else if used {
                r = r.and(self.invalidate(i, false, Some(did)));
            }
        }
        r
    }

    /// Has every unit raise MSI `data` at `address` (a local APIC's
    /// address, the upper half 0) when it records a primary fault: the
    /// fault event registers set, the interrupt unmasked (FECTL.IM clear).
    pub fn fault_interrupts(&mut self, address: u32, data: u32) {
        for i in 0..self.units.len() {
            let base = self.units[i].base;
            self.host.write32(base, reg::FEDATA, data);
            self.host.write32(base, reg::FEADDR, address);
            self.host.write32(base, reg::FEUADDR, 0);
            self.host.write32(base, reg::FECTL, 0);
        }
    }

    /// Takes every unit's fault records (and clears them), each with its
    /// unit's index and segment, while `f` accepts them.
    pub fn faults(&mut self, mut f: impl FnMut(usize, u16, FaultRecord) -> bool) {
        for i in 0..self.units.len() {
            let (base, segment, cap) =
                (self.units[i].base, self.units[i].segment, self.units[i].cap);
            if self.host.read32(base, reg::FSTS) & fsts::PFO != 0 {
                self.lost_faults += 1;
            }
            for r in 0..cap.fault_records() {
                let at = cap.fault_offset() + 16 * r;
                let (lo, hi) = (self.host.read64(base, at), self.host.read64(base, at + 8));
                let Some(rec) = FaultRecord::decode(lo, hi) else {
                    continue;
                };
                if !f(i, segment, rec) {
                    return;
                }
                // F is write-1-to-clear, in the record's last dword.
                self.host.write32(base, at + 12, 1 << 31);
            }
            self.host.write32(base, reg::FSTS, fsts::PFO);
        }
    }
}
