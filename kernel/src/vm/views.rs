//! Views: the EPT table sets of a domain. View 0 is the host p2m (the
//! domain's RAM as the kernel allocated it); alternate views are further
//! table sets a vCPU can run on instead. The kernel keeps them, their EPT
//! pointers, and the EPTP list that VMFUNC switches through; what goes into
//! an alternate view is decided by whoever handles the domain's exits.

use super::memory::{DomainTables, alloc_zeroed_frame, free_frame};
use crate::mem::phys_to_virt;
use crate::vmx::InveptType;
use ipc_schema::hypercall::{HcError, MAX_VIEWS};
use platform::ept::Ept;

/// One view.
pub struct View {
    pub ept: Ept,
    /// Reachable by VMFUNC (its EPTP is in the EPTP list).
    pub visible: bool,
    /// A gfn may map another gfn's frame here (an `EptOp::Map` remapped
    /// one since the view was last a copy of the host p2m): page sharing
    /// then looks for a frame in all of the view, not only at its gfn.
    pub remaps: bool,
}

/// All views of a domain.
pub struct Views {
    slots: [Option<View>; MAX_VIEWS as usize],
    /// One past the highest slot that holds a view: the loops over every
    /// view stop there (a copy on write's flush looks at one view, not
    /// 512 slots).
    end: usize,
    /// The EPTP list page (512 entries), where the CPU has VMFUNC.
    eptp_list: Option<u64>,
    /// The CPU has EPT accessed/dirty flags.
    ad_supported: bool,
    /// They are on in every EPT pointer: only while PML logs, which needs
    /// them. With them on, the CPU takes a guest's page-table walk for an
    /// EPT write, so a walk through a write-protected page would fault.
    accessed_dirty: bool,
    invept: InveptType,
    /// Every table of every view, counted against the domain's quota.
    pub tables: DomainTables,
    /// The gfns whose frames some view maps at another gfn (`EptOp::Map`
    /// remaps), or `None` once there were too many to list: page sharing
    /// searches the views for a frame that changes only when its gfn is
    /// one of these (docs/sharing.md).
    pub remap_sources: Option<heapless::Vec<u64, 32>>,
}

impl Views {
    /// View 0, empty, and (with VMFUNC) an EPTP list where only view 0 is
    /// reachable.
    pub fn new(vmfunc: bool, ad_supported: bool, invept: InveptType) -> Option<Self> {
        let mut tables = DomainTables::new();
        let host = Ept::new(&mut tables).ok()?;
        let eptp_list = if vmfunc {
            Some(alloc_zeroed_frame()?)
        } else {
            None
        };
        let mut views = Views {
            slots: [const { None }; MAX_VIEWS as usize],
            end: 1,
            eptp_list,
            ad_supported,
            accessed_dirty: false,
            invept,
            tables,
            remap_sources: Some(heapless::Vec::new()),
        };
        views.slots[0] = Some(View {
            ept: host,
            visible: true,
            remaps: false,
        });
        views.write_list_entry(0);
        Some(views)
    }

    /// The host p2m.
    pub fn host(&self) -> &Ept {
        &self.slots[0]
            .as_ref()
            .expect("view 0 lives as long as the domain")
            .ept
    }

    /// A view's tables (view 0's, the host p2m's, live as long as the
    /// domain), and the domain's table memory to change them with.
    pub fn ept_mut(&mut self, view: u16) -> Result<(&mut Ept, &mut DomainTables), HcError> {
        let v = self
            .slots
            .get_mut(usize::from(view))
            .and_then(Option::as_mut)
            .ok_or(HcError::NoSuchView { view })?;
        Ok((&mut v.ept, &mut self.tables))
    }

    pub fn get(&self, view: u16) -> Result<&View, HcError> {
        self.slots
            .get(usize::from(view))
            .and_then(Option::as_ref)
            .ok_or(HcError::NoSuchView { view })
    }

    /// Both the host p2m and another view, for copying from one to the
    /// other, and the domain's table memory.
    pub fn host_and(&mut self, view: u16) -> Result<(&Ept, &mut Ept, &mut DomainTables), HcError> {
        if view == 0 {
            return Err(HcError::HostView);
        }
        let (first, rest) = self.slots.split_at_mut(1);
        let host = &first[0]
            .as_ref()
            .expect("view 0 lives as long as the domain")
            .ept;
        let other = rest
            .get_mut(usize::from(view) - 1)
            .and_then(Option::as_mut)
            .ok_or(HcError::NoSuchView { view })?;
        Ok((host, &mut other.ept, &mut self.tables))
    }

    /// A new, empty alternate view in the lowest free slot (not visible).
    pub fn create(&mut self) -> Result<u16, HcError> {
        let slot = (1..self.slots.len())
            .find(|&i| self.slots[i].is_none())
            .ok_or(HcError::TooManyViews)?;
        let ept = Ept::new(&mut self.tables).map_err(|_| HcError::OutOfMemory)?;
        self.slots[slot] = Some(View {
            ept,
            visible: false,
            remaps: false,
        });
        self.end = self.end.max(slot + 1);
        Ok(slot as u16)
    }

    /// Frees an alternate view's tables. The caller checked that no vCPU
    /// runs on it.
    pub fn destroy(&mut self, view: u16) -> Result<(), HcError> {
        if view == 0 {
            return Err(HcError::HostView);
        }
        let v = self
            .slots
            .get_mut(usize::from(view))
            .and_then(Option::take)
            .ok_or(HcError::NoSuchView { view })?;
        let eptp = v.ept.eptp(self.accessed_dirty);
        v.ept.destroy(&mut self.tables);
        while self.end > 1 && self.slots[self.end - 1].is_none() {
            self.end -= 1;
        }
        self.write_list_entry(view);
        self.flush_eptp(eptp);
        Ok(())
    }

    /// Makes a view reachable by VMFUNC, or not.
    pub fn set_visible(&mut self, view: u16, visible: bool) -> Result<(), HcError> {
        self.ept_mut(view)?;
        if let Some(v) = self.slots[usize::from(view)].as_mut() {
            v.visible = visible;
        }
        self.write_list_entry(view);
        Ok(())
    }

    /// Turns EPT accessed/dirty flags on or off (where the CPU has them)
    /// in every EPT pointer, the EPTP list's included. Returns whether
    /// that changed anything; the caller points the vCPU at its view again.
    pub fn set_accessed_dirty(&mut self, on: bool) -> bool {
        if self.accessed_dirty == (on && self.ad_supported) {
            return false;
        }
        self.accessed_dirty = on && self.ad_supported;
        (0..MAX_VIEWS).for_each(|view| self.write_list_entry(view));
        invept(InveptType::AllContexts, 0);
        true
    }

    /// The EPT pointer of a view.
    pub fn eptp(&self, view: u16) -> Result<u64, HcError> {
        Ok(self.get(view)?.ept.eptp(self.accessed_dirty))
    }

    pub fn eptp_list(&self) -> Option<u64> {
        self.eptp_list
    }

    /// Frees every alternate view (a domain that ended keeps only its host
    /// p2m, for a look at its memory, until it is destroyed). Returns how
    /// many there were.
    pub fn destroy_alternates(&mut self) -> usize {
        (1..self.end as u16)
            .rev()
            .filter(|&view| self.destroy(view).is_ok())
            .count()
    }

    fn write_list_entry(&mut self, view: u16) {
        let Some(list) = self.eptp_list else { return };
        let value = self.get(view).ok().filter(|v| v.visible);
        let value = value.map_or(0, |v| v.ept.eptp(self.accessed_dirty));
        // Safety: the list page is a frame this domain owns, 512 u64 entries,
        // in the direct map; `view` < 512.
        unsafe {
            phys_to_virt(list)
                .cast::<u64>()
                .add(usize::from(view))
                .write_volatile(value)
        };
    }

    /// Calls `f` with each alternate view's tables and the domain's table
    /// memory.
    pub fn each_alternate(&mut self, mut f: impl FnMut(&mut View, &mut DomainTables)) {
        for v in self.slots[..self.end].iter_mut().skip(1).flatten() {
            f(v, &mut self.tables);
        }
    }

    /// Notes that a view maps `gfn`'s frame at another gfn.
    pub fn remapped_from(&mut self, gfn: u64) {
        if let Some(list) = self.remap_sources.as_mut()
            && !list.contains(&gfn)
            && list.push(gfn).is_err()
        {
            self.remap_sources = None;
        }
    }

    /// Whether a view may map `gfn`'s frame at another gfn.
    pub fn may_remap_from(&self, gfn: u64) -> bool {
        self.remap_sources.as_ref().is_none_or(|l| l.contains(&gfn))
    }

    /// Notes whether `view` may now map a gfn to another gfn's frame.
    pub fn set_remaps(&mut self, view: u16, remaps: bool) {
        if let Some(Some(v)) = self.slots.get_mut(usize::from(view)) {
            v.remaps = remaps;
        }
    }

    /// Drops cached translations of every view.
    pub fn flush_all(&self) {
        for v in self.slots[..self.end].iter().flatten() {
            self.flush_eptp(v.ept.eptp(self.accessed_dirty));
        }
    }

    /// Drops cached translations of a view after its tables changed.
    pub fn flush(&self, view: u16) {
        let _ = self.eptp(view).map(|eptp| self.flush_eptp(eptp));
    }

    fn flush_eptp(&self, eptp: u64) {
        invept(self.invept, eptp);
    }

    /// Frees every view and the list.
    pub fn destroy_all(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(v) = slot.take() {
                v.ept.destroy(&mut self.tables);
            }
        }
        if let Some(list) = self.eptp_list.take() {
            free_frame(list);
        }
        invept(InveptType::AllContexts, 0);
    }
}

/// INVEPT, where VMX is on (without it no CPU ever used the tables).
fn invept(kind: InveptType, eptp: u64) {
    if super::available() {
        // Safety: VMX operation is on; the type was checked at boot.
        let _ = unsafe { crate::vmx::invept(kind, eptp) };
    }
}
