//! The iommu service's logic: every backend's DMA mappings and the
//! references they hold on client domains' frames (IO-1..IO-5,
//! docs/iommu.md). The binary (`main.rs`) implements [`Kernel`] with the
//! IOSPACE calls; the tests with a model of the unit that remembers what
//! the IOTLB may still hold.
//!
//! The rules every operation keeps:
//! - a backend sees bus frame numbers only, chosen here, never host
//!   frames (IO-1);
//! - a frame's reference count is the number of bus frames mapping it, and
//!   the last reference goes ([`Kernel::released`]) only after the kernel's
//!   unmap returned, which is after the IOTLB invalidation completed
//!   (IO-2, IO-3); a failed unmap keeps every reference;
//! - map and unmap take batches, one kernel call (one IOTLB invalidation)
//!   each;
//! - a backend maps only its clients' memory; the list changes at run time,
//!   and removing a client, the backend's death or restart, or the
//!   domain's end tears its mappings down (IO-4, IO-5).

#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use ipc_schema::iommu::{IommuError, MAX_BATCH};

#[cfg(test)]
mod tests;

/// The first bus frame handed out (bus address 1 MiB: a DMA to a small
/// address, the classic bug, hits nothing).
pub const BUS_FIRST: u64 = 0x100;
/// One past the last (256 MiB: within a 28-bit DMA mask, as QEMU's edu has).
pub const BUS_END: u64 = 0x1_0000;
/// Pages one backend may hold mapped.
pub const QUOTA: u64 = 16 * 1024;

/// A (segment, source id) PCI function.
pub type Device = (u16, u16);

/// What the service needs from the kernel.
pub trait Kernel {
    /// A new IoSpace with `devices` attached; its number (`None`: refused,
    /// the kernel's log says why).
    fn space_for(&mut self, devices: &[Device]) -> Option<u32>;
    /// Maps each (gfn, bfn) of `domain`, all or none; `Err(Some(i))` where
    /// pair `i`'s gfn is not RAM, `Err(None)` for any other refusal.
    fn map(
        &mut self,
        space: u32,
        domain: u16,
        pairs: &[(u64, u64)],
        writable: bool,
    ) -> Result<(), Option<usize>>;
    /// Unmaps every bfn, all or none, and returns once the IOTLB
    /// invalidation completed: the invalidations it took.
    fn unmap(&mut self, space: u32, bfns: &[u64]) -> Result<u32, UnmapError>;
    /// The last reference to a frame was dropped: nothing maps it for DMA.
    fn released(&mut self, domain: u16, gfn: u64);
    /// Whether domain `domain` is live (building, running or paused), and
    /// its birth (an id is given again to a new domain, a birth never);
    /// `None` when there is no such domain.
    fn domain(&mut self, domain: u16) -> Option<(bool, u64)>;
}

/// Why the kernel refused an unmap (it changed nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmapError {
    /// A bfn is not mapped: the kernel took it itself (it unmaps a
    /// destroyed domain's pages, and invalidates, before the domain goes).
    NotMapped,
    /// The invalidation did not complete: the pages may still be reached.
    Failed,
}

/// One backend (a service, by badge).
#[derive(Debug, Default)]
pub struct Backend {
    pub devices: Vec<Device>,
    pub clients: Vec<u16>,
    pub generation: u32,
    pub space: Option<u32>,
    /// bfn -> (domain, gfn).
    pub maps: BTreeMap<u64, (u16, u64)>,
}

#[derive(Debug, Default)]
pub struct Iommu {
    pub backends: BTreeMap<u64, Backend>,
    /// (domain, gfn) -> bus frames mapping it.
    pub refs: BTreeMap<(u16, u64), u32>,
    /// IOTLB invalidations the service's unmaps took.
    pub invalidations: u64,
    /// The birth of each domain mapped ([`Iommu::forget_ended`]).
    births: service_runtime::births::Births,
}

impl Iommu {
    /// Records what the supervisor says a backend is. A new generation (a
    /// restart) starts with no mappings: the old instance's go first.
    pub fn register<K: Kernel>(
        &mut self,
        k: &mut K,
        badge: u64,
        devices: &[Device],
        clients: &[u16],
        generation: u32,
    ) {
        let space = match self.backends.get(&badge) {
            Some(b) if b.generation == generation => return,
            Some(b) => {
                let space = b.space;
                self.teardown_backend(k, badge);
                space
            }
            None => None,
        };
        self.backends.insert(
            badge,
            Backend {
                devices: devices.to_vec(),
                clients: clients.to_vec(),
                generation,
                space,
                maps: BTreeMap::new(),
            },
        );
    }

    /// Maps `count` frames of `domain` from `gfn` at consecutive bus frames;
    /// returns the first.
    pub fn map<K: Kernel>(
        &mut self,
        k: &mut K,
        badge: u64,
        domain: u16,
        gfn: u64,
        count: u32,
        writable: bool,
    ) -> Result<u64, IommuError> {
        let b = self.backends.get_mut(&badge).ok_or(IommuError::NoDevice)?;
        if b.devices.is_empty() {
            return Err(IommuError::NoDevice);
        }
        if !b.clients.contains(&domain) {
            return Err(IommuError::NotAClient { domain });
        }
        if count == 0 || count > MAX_BATCH {
            return Err(IommuError::BadCount { count });
        }
        let Some(end) = gfn.checked_add(u64::from(count)) else {
            return Err(IommuError::NotRam { gfn });
        };
        if b.maps.len() as u64 + u64::from(count) > QUOTA {
            return Err(IommuError::Quota { limit: QUOTA });
        }
        let first = free_range(&b.maps, u64::from(count)).ok_or(IommuError::NoBusSpace)?;
        let space = match b.space {
            Some(s) => s,
            None => {
                let s = k.space_for(&b.devices).ok_or(IommuError::Kernel)?;
                b.space = Some(s);
                s
            }
        };
        let pairs: Vec<(u64, u64)> = (gfn..end).zip(first..).collect();
        k.map(space, domain, &pairs, writable)
            .map_err(|e| match e {
                Some(i) => IommuError::NotRam { gfn: pairs[i].0 },
                None => IommuError::Kernel,
            })?;
        for &(g, bfn) in &pairs {
            b.maps.insert(bfn, (domain, g));
            *self.refs.entry((domain, g)).or_default() += 1;
        }
        Ok(first)
    }

    /// Unmaps bus frames `bfn .. bfn + count`, all the caller's.
    pub fn unmap<K: Kernel>(
        &mut self,
        k: &mut K,
        badge: u64,
        bfn: u64,
        count: u32,
    ) -> Result<(u32, u32), IommuError> {
        if count == 0 || count > MAX_BATCH {
            return Err(IommuError::BadCount { count });
        }
        let b = self.backends.get(&badge).ok_or(IommuError::NoDevice)?;
        let bfns: Vec<u64> = (0..u64::from(count))
            .map(|i| bfn.checked_add(i).ok_or(IommuError::NotMapped { bfn }))
            .collect::<Result<_, _>>()?;
        if let Some(&missing) = bfns.iter().find(|f| !b.maps.contains_key(f)) {
            return Err(IommuError::NotMapped { bfn: missing });
        }
        let n = self.unmap_bfns(k, badge, &bfns)?;
        Ok((count, n))
    }

    /// Unmaps `bfns` (mapped by the backend) in kernel batches, then drops
    /// their references: only after the kernel answered, so after the
    /// invalidation (IO-3). A refused batch keeps its references.
    fn unmap_bfns<K: Kernel>(
        &mut self,
        k: &mut K,
        badge: u64,
        bfns: &[u64],
    ) -> Result<u32, IommuError> {
        let Some(b) = self.backends.get_mut(&badge) else {
            return Ok(0);
        };
        let Some(space) = b.space else { return Ok(0) };
        let mut invalidations = 0;
        for chunk in bfns.chunks(MAX_BATCH as usize) {
            match k.unmap(space, chunk) {
                Ok(n) => invalidations += n,
                // A page the kernel took itself is no longer reachable: its
                // reference goes. Only a lone page is known to be one.
                Err(UnmapError::NotMapped) if chunk.len() == 1 => {}
                Err(_) => return Err(IommuError::Kernel),
            }
            for bfn in chunk {
                if let Some((domain, gfn)) = b.maps.remove(bfn) {
                    drop_ref(&mut self.refs, k, domain, gfn);
                }
            }
        }
        self.invalidations += u64::from(invalidations);
        Ok(invalidations)
    }

    /// Every mapping of a backend (it died, restarted, or lost a client:
    /// `only` that domain's). Returns the pages unmapped.
    fn teardown<K: Kernel>(&mut self, k: &mut K, badge: u64, only: Option<u16>) -> u64 {
        let Some(b) = self.backends.get(&badge) else {
            return 0;
        };
        let bfns: Vec<u64> = b
            .maps
            .iter()
            .filter(|(_, (d, _))| only.is_none_or(|o| o == *d))
            .map(|(&bfn, _)| bfn)
            .collect();
        if self.unmap_bfns(k, badge, &bfns).is_err() {
            // One by one: a kernel that already took some (a destroyed
            // domain's) refuses the batch, not each of the others.
            for bfn in &bfns {
                let _ = self.unmap_bfns(k, badge, core::slice::from_ref(bfn));
            }
        }
        bfns.len() as u64
    }

    /// A backend died or restarted: its mappings go.
    pub fn teardown_backend<K: Kernel>(&mut self, k: &mut K, badge: u64) -> u64 {
        self.teardown(k, badge, None)
    }

    /// A domain ended: every backend's mappings of it go.
    pub fn teardown_domain<K: Kernel>(&mut self, k: &mut K, domain: u16) -> u64 {
        let badges: Vec<u64> = self.backends.keys().copied().collect();
        badges
            .into_iter()
            .map(|b| self.teardown(k, b, Some(domain)))
            .sum()
    }

    /// IO-4: tears down every backend's mappings of each domain that
    /// ended or is gone, or whose id a new domain has been given since they
    /// were made (its birth is not the one noted): the new domain is not
    /// charged with them, nor loses its own to the old one's end. (domain,
    /// pages) for each.
    pub fn forget_ended<K: Kernel>(&mut self, k: &mut K) -> Vec<(u16, u64)> {
        let ended = self.births.ended(&self.mapped_domains(), |d| k.domain(d));
        ended
            .into_iter()
            .map(|d| (d, self.teardown_domain(k, d)))
            .collect()
    }

    /// Notes the birth of each domain mapped (after each request).
    pub fn note_births<K: Kernel>(&mut self, k: &mut K) {
        let mapped = self.mapped_domains();
        self.births.note(&mapped, |d| k.domain(d).map(|(_, b)| b));
    }

    /// Every domain some backend maps, lowest first.
    fn mapped_domains(&self) -> Vec<u16> {
        let mut ids: Vec<u16> = self.refs.keys().map(|&(d, _)| d).collect();
        ids.dedup();
        ids
    }

    /// IO-5: a client added at run time.
    pub fn add_client(&mut self, badge: u64, domain: u16) -> Result<(), IommuError> {
        let b = self
            .backends
            .get_mut(&badge)
            .ok_or(IommuError::NoSuchBackend)?;
        if !b.clients.contains(&domain) {
            b.clients.push(domain);
        }
        Ok(())
    }

    /// IO-5: a client removed at run time; the backend's mappings of it
    /// are torn down first.
    pub fn remove_client<K: Kernel>(
        &mut self,
        k: &mut K,
        badge: u64,
        domain: u16,
    ) -> Result<u64, IommuError> {
        if !self.backends.contains_key(&badge) {
            return Err(IommuError::NoSuchBackend);
        }
        let n = self.teardown(k, badge, Some(domain));
        if let Some(b) = self.backends.get_mut(&badge) {
            b.clients.retain(|&d| d != domain);
        }
        Ok(n)
    }

    /// A frame's references (bus frames mapping it).
    pub fn references(&self, domain: u16, gfn: u64) -> u32 {
        self.refs.get(&(domain, gfn)).copied().unwrap_or(0)
    }

    /// The backend that drives a device, if any.
    pub fn owner(&self, device: Device) -> Option<u64> {
        self.backends
            .iter()
            .find(|(_, b)| b.devices.contains(&device))
            .map(|(&badge, _)| badge)
    }
}

fn drop_ref<K: Kernel>(refs: &mut BTreeMap<(u16, u64), u32>, k: &mut K, domain: u16, gfn: u64) {
    if let Some(r) = refs.get_mut(&(domain, gfn)) {
        *r -= 1;
        if *r == 0 {
            refs.remove(&(domain, gfn));
            k.released(domain, gfn);
        }
    }
}

/// The first run of `count` free bus frames in `BUS_FIRST .. BUS_END`.
fn free_range(maps: &BTreeMap<u64, (u16, u64)>, count: u64) -> Option<u64> {
    let mut start = BUS_FIRST;
    for &used in maps.keys() {
        if used >= start + count {
            break;
        }
        if used >= start {
            start = used + 1;
        }
    }
    (start + count <= BUS_END).then_some(start)
}
