//! Page sharing, the mechanism (docs/sharing.md; SH-1, SH-2, SH-4): one
//! frame backing gfns of several domains, read-only, with an exact count of
//! references. Which pages are shared, and when a writer gets its own copy,
//! is decided by the EPT owner (the altp2m service) for the sharing
//! service; these only do it, as `EptOp`s on the host p2m.
//!
//! - A **shared frame** is a slot of [`Table::frames`]: its address, its
//!   references and a generation. Services name it by an opaque id (slot
//!   and generation), never by its address; an id whose slot was freed or
//!   taken again is refused (`NoSuchShare`).
//! - A **back** records a gfn of a domain whose host-p2m entry maps a frame
//!   other than the domain's own RAM frame for it: a shared frame, or a
//!   frame of its own made by a copy-on-write break. The RAM frame a gfn had
//!   when it came to map a shared frame is freed then.
//! - A domain never holds more frames than its RAM has pages: a copy is
//!   made only for a gfn whose shared frame has other references, which
//!   each freed a frame when they came to map it.
//! - SH-2 in the mechanism: no entry that maps a shared frame is ever
//!   writable or armed (`restrict`, and the checks in `ops`), no gfn other
//!   than a shared one maps it, and every entry of an alternate view that
//!   mapped a frame whose gfn changes frames is emptied, so no view keeps a
//!   frame that was freed or is shared now.

use super::domain::Domain;
use super::memory::{DomainTables, KernelTables, free_frame};
use crate::mem::{FRAMES as POOL, phys_to_virt};
use ipc_schema::syscall::{EptOpError, EptResult, Perms};
use platform::PAGE_SIZE;
use platform::ept::{Ept, PageSize};
use spin::Mutex;

/// Shared frames at once, all domains together.
pub const FRAMES: usize = 1024;
/// Gfns backed by a frame other than their own RAM frame, all domains.
pub const BACKS: usize = 4096;
const DOMAINS: usize = ipc_schema::manifest::MAX_DOMAINS + 1;
const INDEX_BITS: u32 = 10;

#[derive(Clone, Copy)]
struct Frame {
    hpa: u64,
    /// 0: the slot is free.
    refs: u32,
    generation: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Slot of a shared frame.
    Shared(u16),
    /// A frame of the domain's own that is not its RAM frame for the gfn.
    Own(u64),
}

#[derive(Clone, Copy)]
struct Back {
    domain: u16,
    gfn: u64,
    kind: Kind,
}

struct Table {
    frames: [Frame; FRAMES],
    backs: heapless::Vec<Back, BACKS>,
    /// Backs per domain id (a domain with none skips every look-up).
    per_domain: [u32; DOMAINS],
    generation: u32,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    frames: [Frame {
        hpa: 0,
        refs: 0,
        generation: 0,
    }; FRAMES],
    backs: heapless::Vec::new(),
    per_domain: [0; DOMAINS],
    generation: 0,
});

impl Table {
    fn back(&self, domain: u16, gfn: u64) -> Option<usize> {
        if self
            .per_domain
            .get(usize::from(domain))
            .is_none_or(|&n| n == 0)
        {
            return None;
        }
        self.backs
            .iter()
            .position(|b| b.domain == domain && b.gfn == gfn)
    }

    fn kind(&self, domain: u16, gfn: u64) -> Option<Kind> {
        self.back(domain, gfn).map(|i| self.backs[i].kind)
    }

    fn id(&self, slot: usize) -> u32 {
        self.frames[slot].generation << INDEX_BITS | slot as u32
    }

    /// The slot an id names, if it names a live shared frame.
    fn slot(&self, id: u32) -> Option<usize> {
        let slot = (id & ((1 << INDEX_BITS) - 1)) as usize;
        let f = self.frames.get(slot)?;
        (f.refs > 0 && f.generation == id >> INDEX_BITS).then_some(slot)
    }

    fn result(&self, slot: usize) -> EptResult {
        EptResult::Shared {
            frame: self.id(slot),
            refs: self.frames[slot].refs,
            free: free_frames(),
        }
    }

    /// Records that `gfn` of domain `d` maps `kind` (`None`: its own RAM
    /// frame again). The caller checked there is room.
    fn set(&mut self, d: &Domain, gfn: u64, kind: Option<Kind>) {
        let kind = kind.filter(|&k| Some(k) != d.ram_frame(gfn).map(Kind::Own));
        match (self.back(d.id, gfn), kind) {
            (Some(i), Some(k)) => self.backs[i].kind = k,
            (Some(i), None) => {
                self.backs.swap_remove(i);
                self.per_domain[usize::from(d.id)] -= 1;
            }
            (None, Some(kind)) => {
                if self
                    .backs
                    .push(Back {
                        domain: d.id,
                        gfn,
                        kind,
                    })
                    .is_ok()
                {
                    self.per_domain[usize::from(d.id)] += 1;
                }
            }
            (None, None) => {}
        }
    }

    /// One reference less on `slot`; the frame is freed with the last.
    fn unref(&mut self, slot: usize) {
        let f = &mut self.frames[slot];
        f.refs = f.refs.saturating_sub(1);
        if f.refs == 0 {
            free_frame(f.hpa);
        }
    }

    fn room(&self, d: &Domain, gfn: u64) -> bool {
        self.back(d.id, gfn).is_some() || !self.backs.is_full()
    }
}

fn free_frames() -> u64 {
    POOL.lock().as_ref().map_or(0, |f| f.free_frames())
}

/// The frame the host p2m maps at `gfn` when it is not the domain's RAM
/// frame for it: `Some(Some(frame))` a frame of its own, `Some(None)` a
/// shared frame (no service may map it writable), `None` no such record.
pub fn backing(domain: u16, gfn: u64) -> Option<Option<u64>> {
    match TABLE.lock().kind(domain, gfn)? {
        Kind::Own(hpa) => Some(Some(hpa)),
        Kind::Shared(_) => Some(None),
    }
}

/// The gfn of `domain` whose recorded backing frame is `hpa`, and whether
/// `gfn` (when given) has a backing record at all.
pub fn gfn_backed_by(domain: u16, hpa: u64) -> Option<u64> {
    let t = TABLE.lock();
    if t.per_domain
        .get(usize::from(domain))
        .is_none_or(|&n| n == 0)
    {
        return None;
    }
    t.backs.iter().find_map(|b| {
        let frame = match b.kind {
            Kind::Own(h) => h,
            Kind::Shared(s) => t.frames[usize::from(s)].hpa,
        };
        (b.domain == domain && frame == hpa).then_some(b.gfn)
    })
}

/// Whether `hpa` is a shared frame now.
pub fn is_shared_frame(hpa: u64) -> bool {
    let t = TABLE.lock();
    !t.backs.is_empty() && t.frames.iter().any(|f| f.refs > 0 && f.hpa == hpa)
}

/// Whether `gfn` of domain `d` maps a shared frame.
pub fn is_shared_gfn(d: &Domain, gfn: u64) -> bool {
    matches!(TABLE.lock().kind(d.id, gfn), Some(Kind::Shared(_)))
}

/// The guest-physical address of `gfn`, if it is RAM; `Busy` if the page
/// may not change frames now (foreign mappings of the domain exist: they
/// would keep a frame that is freed; it is the #VE information page, which
/// the CPU writes around the EPT).
fn changeable(d: &mut Domain, gfn: u64) -> Result<u64, EptOpError> {
    if !d.is_ram(gfn) {
        return Err(EptOpError::NotRam);
    }
    let gpa = gfn * PAGE_SIZE;
    let ve = d.ve_info_frame().map_err(|()| EptOpError::Busy)?;
    let frame = d
        .views
        .host()
        .query(&KernelTables, gpa)
        .and_then(|m| m.hpa_of(gpa));
    // (A frame a device may reach by DMA would be freed or written behind
    // the sharing's back.)
    if d.foreign_pages != 0
        || ve.is_some() && ve == frame
        || d.forks != 0
        || frame.is_some_and(|f| crate::iommu::maps_any(|hpa| hpa == f))
    {
        return Err(EptOpError::Busy);
    }
    // A fork's page that maps its parent's frame is not its to give.
    if forked(d, gfn) {
        return Err(EptOpError::Shared);
    }
    Ok(gpa)
}

/// The host p2m's 4 KiB leaf at `gpa`, a large page split first.
fn leaf(
    ept: &mut Ept,
    tables: &mut DomainTables,
    gpa: u64,
) -> Result<platform::ept::Mapping, EptOpError> {
    let m = ept.query(&KernelTables, gpa).ok_or(EptOpError::NotRam)?;
    if m.size != PageSize::Size4K {
        ept.split_to_4k(tables, gpa, gpa + PAGE_SIZE)
            .map_err(crate::sys::syscall::ept_error)?;
    }
    ept.query(&KernelTables, gpa).ok_or(EptOpError::NotRam)
}

fn read_only(p: platform::ept::Perms) -> platform::ept::Perms {
    platform::ept::Perms::new(p.read, false, p.execute)
}

/// SH-1: the frame behind `gfn` becomes shared (one reference), or is
/// named again if it is shared already.
pub fn nominate(d: &mut Domain, gfn: u64) -> Result<EptResult, EptOpError> {
    let gpa = changeable(d, gfn)?;
    let mut t = TABLE.lock();
    if let Some(Kind::Shared(slot)) = t.kind(d.id, gfn) {
        return Ok(t.result(usize::from(slot)));
    }
    let slot = t.frames.iter().position(|f| f.refs == 0);
    let (Some(slot), true) = (slot, t.room(d, gfn)) else {
        return Err(EptOpError::Busy);
    };
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let m = leaf(ept, tables, gpa)?;
    ept.protect(tables, gpa, read_only(m.perms))
        .map_err(crate::sys::syscall::ept_error)?;
    t.generation = (t.generation + 1) & ((1 << (32 - INDEX_BITS)) - 1);
    t.generation = t.generation.max(1);
    let generation = t.generation;
    t.frames[slot] = Frame {
        hpa: m.hpa,
        refs: 1,
        generation,
    };
    t.set(d, gfn, Some(Kind::Shared(slot as u16)));
    let result = t.result(slot);
    drop(t);
    forget_in_views(d, gfn, m.hpa);
    Ok(result)
}

/// SH-1: `gfn` comes to map shared frame `id` read-only; the frame it had
/// is released.
pub fn share(d: &mut Domain, gfn: u64, id: u32) -> Result<EptResult, EptOpError> {
    let gpa = changeable(d, gfn)?;
    let mut t = TABLE.lock();
    let slot = t.slot(id).ok_or(EptOpError::NoSuchShare)?;
    let frame = t.frames[slot].hpa;
    if !t.room(d, gfn) {
        return Err(EptOpError::Busy);
    }
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let m = leaf(ept, tables, gpa)?;
    if m.hpa == frame {
        return Err(EptOpError::AlreadyShared);
    }
    ept.replace(tables, gpa, frame, read_only(m.perms))
        .map_err(crate::sys::syscall::ept_error)?;
    match t.kind(d.id, gfn) {
        Some(Kind::Shared(old)) => t.unref(usize::from(old)),
        // Its own frame (its RAM frame, or a copy): nothing else maps it.
        _ => free_frame(m.hpa),
    }
    t.frames[slot].refs += 1;
    t.set(d, gfn, Some(Kind::Shared(slot as u16)));
    let result = t.result(slot);
    drop(t);
    forget_in_views(d, gfn, m.hpa);
    Ok(result)
}

/// SH-2, the copy-on-write break: `gfn` gets a frame of its own with the
/// shared frame's contents, mapped with `perms` (the last reference keeps
/// the shared frame itself).
pub fn unshare(d: &mut Domain, gfn: u64, perms: Perms) -> Result<EptResult, EptOpError> {
    if !d.is_ram(gfn) {
        return Err(EptOpError::NotRam);
    }
    let gpa = gfn * PAGE_SIZE;
    let perms = platform::ept::Perms::new(perms.read, perms.write, perms.execute);
    if perms.write && !perms.read {
        return Err(EptOpError::WriteWithoutRead);
    }
    let mut t = TABLE.lock();
    if d.parent.is_some() && t.kind(d.id, gfn).is_none() {
        drop(t);
        return break_fork(d, gfn, perms);
    }
    let Some(Kind::Shared(slot)) = t.kind(d.id, gfn) else {
        return Err(EptOpError::NotShared);
    };
    let slot = usize::from(slot);
    let (id, old) = (t.id(slot), t.frames[slot].hpa);
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let own = if t.frames[slot].refs == 1 {
        ept.protect(tables, gpa, perms)
            .map_err(crate::sys::syscall::ept_error)?;
        t.frames[slot].refs = 0;
        old
    } else {
        let new = copy_to_new(ept, tables, gpa, old, perms)?;
        t.frames[slot].refs -= 1;
        new
    };
    t.set(d, gfn, Some(Kind::Own(own)));
    let result = EptResult::Shared {
        frame: id,
        refs: t.frames[slot].refs,
        free: free_frames(),
    };
    drop(t);
    forget_in_views(d, gfn, old);
    Ok(result)
}

/// Whether `gfn` of fork `d` still maps its parent's frame (read-only in
/// every view, like a shared frame; its first write copies it).
pub fn forked(d: &Domain, gfn: u64) -> bool {
    d.parent.is_some() && d.is_ram(gfn) && TABLE.lock().kind(d.id, gfn).is_none()
}

/// A copy on write: a frame from the pool with `old`'s contents, mapped
/// with `perms` at `gpa` (a 4 KiB leaf) in place of `old`.
fn copy_to_new(
    ept: &mut Ept,
    tables: &mut DomainTables,
    gpa: u64,
    old: u64,
    perms: platform::ept::Perms,
) -> Result<u64, EptOpError> {
    let new = POOL
        .lock()
        .as_mut()
        .and_then(|f| f.alloc())
        .ok_or(EptOpError::OutOfMemory)?;
    // Safety: `old` is a shared frame or a fork's parent's (readable RAM in
    // the direct map, written by nobody while shared, or while the parent
    // is paused with forks) and `new` a frame just taken from the pool,
    // owned by nothing else: two distinct 4 KiB frames.
    unsafe {
        core::ptr::copy_nonoverlapping(phys_to_virt(old), phys_to_virt(new), PAGE_SIZE as usize)
    };
    if let Err(e) = ept.replace(tables, gpa, new, perms) {
        free_frame(new);
        return Err(crate::sys::syscall::ept_error(e));
    }
    Ok(new)
}

/// Whether `hpa`, a frame an entry of fork `d` maps, is its parent's (not
/// one of its own copies): never writable.
pub fn parents_frame(d: &Domain, hpa: u64) -> bool {
    d.parent.is_some() && gfn_backed_by(d.id, hpa).is_none()
}

/// VM fork's copy on write: `gfn` of fork `d` gets a frame of its own with
/// its parent's contents, mapped with `perms`. The parent's frame is never
/// written: the parent stays paused while it has forks.
fn break_fork(
    d: &mut Domain,
    gfn: u64,
    perms: platform::ept::Perms,
) -> Result<EptResult, EptOpError> {
    let gpa = gfn * PAGE_SIZE;
    let mut t = TABLE.lock();
    if !t.room(d, gfn) {
        return Err(EptOpError::OutOfMemory);
    }
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let m = leaf(ept, tables, gpa)?;
    let new = copy_to_new(ept, tables, gpa, m.hpa, perms)?;
    t.set(d, gfn, Some(Kind::Own(new)));
    drop(t);
    forget_in_views(d, gfn, m.hpa);
    Ok(EptResult::Shared {
        frame: 0,
        refs: 0,
        free: free_frames(),
    })
}

/// VM fork: the child's host p2m maps every page of `parent`'s read-only
/// (its large pages stay large until a write splits one). Nothing is
/// copied: a page is copied at its first write ([`break_fork`]).
pub fn fork(parent: &Domain, child: &mut Domain) -> Result<(), EptOpError> {
    let (ept, tables) = child.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let pages = parent.ram_bytes / PAGE_SIZE;
    let more = u32::try_from(pages / 512 + 1).unwrap_or(u32::MAX);
    tables.limit = tables
        .limit
        .saturating_add(more.saturating_mul(DomainTables::PER_2M));
    let mut failed = None;
    parent
        .views
        .host()
        .for_each_leaf(&KernelTables, 0, 1 << 46, |m| {
            // (The xAPIC page is the child's own: `create_vcpu` maps it.)
            if failed.is_none()
                && m.gpa != super::domain::XAPIC_GFN * PAGE_SIZE
                && let Err(e) = ept.map(
                    tables,
                    m.gpa,
                    m.hpa,
                    m.size,
                    read_only(m.perms),
                    m.memory_type,
                )
            {
                failed = Some(e);
            }
        });
    if let Some(e) = failed {
        return Err(crate::sys::syscall::ept_error(e));
    }
    child.ram_bytes = parent.ram_bytes;
    child.parent = Some(parent.id);
    Ok(())
}

/// VM fork's reset: every page fork `d` has written maps its parent's
/// frame again, read-only, and its copies are freed. Takes time in
/// proportion to the pages written (the table's records of `d`), not to
/// its RAM. Returns the pages reset.
pub fn reset(d: &mut Domain, parent: &Domain) -> usize {
    let mut pages = 0;
    loop {
        let mut taken: heapless::Vec<(u64, Kind), 64> = heapless::Vec::new();
        {
            let mut t = TABLE.lock();
            let mut i = 0;
            while i < t.backs.len() && !taken.is_full() {
                let b = t.backs[i];
                if b.domain == d.id {
                    let _ = taken.push((b.gfn, b.kind));
                    t.backs.swap_remove(i);
                    t.per_domain[usize::from(d.id)] -= 1;
                } else {
                    i += 1;
                }
            }
        }
        if taken.is_empty() {
            return pages;
        }
        for (gfn, kind) in taken {
            let gpa = gfn * PAGE_SIZE;
            let Ok((ept, tables)) = d.views.ept_mut(0) else {
                continue;
            };
            let (Some(from), Some(mine)) = (
                parent.views.host().translate(&KernelTables, gpa),
                ept.query(&KernelTables, gpa),
            ) else {
                continue;
            };
            let _ = ept.replace(tables, gpa, from, read_only(mine.perms));
            match kind {
                Kind::Own(hpa) => free_frame(hpa),
                Kind::Shared(slot) => TABLE.lock().unref(usize::from(slot)),
            }
            forget_in_views(d, gfn, mine.hpa);
            pages += 1;
        }
    }
}

/// SH-2: takes write (and the armed bit) from `view`'s entries of the
/// shared gfns among `[start, end)` gfns, after an operation that set
/// permissions over a range.
pub fn restrict(d: &mut Domain, view: u16, start: u64, end: u64) {
    if d.parent.is_some() {
        restrict_forked(d, view, start, end);
    }
    // In chunks of the table (nothing changes it meanwhile: one system
    // call at a time), so that every shared gfn of the range is taken.
    let mut at = 0;
    loop {
        let mut shared: heapless::Vec<u64, 64> = heapless::Vec::new();
        let done = {
            let t = TABLE.lock();
            if t.per_domain.get(usize::from(d.id)).is_none_or(|&n| n == 0) {
                return;
            }
            while at < t.backs.len() && !shared.is_full() {
                let b = t.backs[at];
                at += 1;
                if b.domain == d.id
                    && matches!(b.kind, Kind::Shared(_))
                    && (start..end).contains(&b.gfn)
                {
                    let _ = shared.push(b.gfn);
                }
            }
            at >= t.backs.len()
        };
        let Ok((ept, tables)) = d.views.ept_mut(view) else {
            return;
        };
        for gfn in shared {
            let gpa = gfn * PAGE_SIZE;
            if let Some(m) = ept.query(&KernelTables, gpa) {
                let _ = ept.protect(tables, gpa, read_only(m.perms));
            }
        }
        if done {
            return;
        }
    }
}

/// [`restrict`] for a fork: its entries in `[start, end)` that map its
/// parent's frames (every large leaf, and each 4 KiB leaf it has not
/// written) lose write.
fn restrict_forked(d: &mut Domain, view: u16, start: u64, end: u64) {
    let (mut at, end) = (start * PAGE_SIZE, end.saturating_mul(PAGE_SIZE));
    while at < end {
        let mut found: heapless::Vec<(u64, PageSize), 64> = heapless::Vec::new();
        let Ok((ept, tables)) = d.views.ept_mut(view) else {
            return;
        };
        let mut next = end;
        ept.for_each_leaf(&KernelTables, at, end, |m| {
            if m.perms.write && next == end && found.push((m.gpa, m.size)).is_err() {
                next = m.gpa;
            }
        });
        for &(gpa, size) in &found {
            let own =
                size == PageSize::Size4K && TABLE.lock().kind(d.id, gpa / PAGE_SIZE).is_some();
            if !own && let Some(m) = ept.query(&KernelTables, gpa) {
                let _ = ept.protect(tables, gpa, read_only(m.perms));
            }
        }
        at = next;
    }
}

/// Empties every alternate view's entry that maps `hpa`, the frame `gfn`
/// had (a large page is split, or emptied whole where there are no tables
/// for that), and flushes every view: the owner fills them again from the
/// host p2m. A view can map the frame elsewhere than at `gfn` only if it
/// remaps a gfn and `gfn`'s frame was once remapped (a shared frame is never
/// remapped to: `ops`); only such views are searched leaf by leaf.
fn forget_in_views(d: &mut Domain, gfn: u64, hpa: u64) {
    let end = d.ram_bytes;
    let gpa = gfn * PAGE_SIZE;
    let searched = d.views.may_remap_from(gfn);
    d.views.each_alternate(|view, tables| {
        let ept = &mut view.ept;
        if !(view.remaps && searched) {
            if let Some(m) = ept.query(&KernelTables, gpa)
                && m.hpa_of(gpa) == Some(hpa)
            {
                if m.size != PageSize::Size4K
                    && ept.split_to_4k(tables, gpa, gpa + PAGE_SIZE).is_err()
                {
                    let _ = ept.unmap(tables, gpa);
                    return;
                }
                let _ = ept.unmap(tables, gpa);
            }
            return;
        }
        loop {
            let mut found: heapless::Vec<(u64, PageSize), 8> = heapless::Vec::new();
            ept.for_each_leaf(&KernelTables, 0, end, |m| {
                if hpa >= m.hpa && hpa < m.hpa + m.size.bytes() {
                    let _ = found.push((m.gpa + (hpa - m.hpa), m.size));
                }
            });
            if found.is_empty() {
                break;
            }
            for (gpa, size) in found {
                if size != PageSize::Size4K
                    && ept.split_to_4k(tables, gpa, gpa + PAGE_SIZE).is_err()
                {
                    let _ = ept.unmap(tables, gpa);
                    continue;
                }
                let _ = ept.unmap(tables, gpa);
            }
        }
    });
    d.views.flush_all();
}

/// SH-4: what a destroyed domain held: one reference less on each shared
/// frame it mapped (the last frees it), and its own copies freed.
pub fn release(domain: u16) {
    let mut t = TABLE.lock();
    let mut i = 0;
    while i < t.backs.len() {
        let b = t.backs[i];
        if b.domain != domain {
            i += 1;
            continue;
        }
        match b.kind {
            Kind::Shared(slot) => t.unref(usize::from(slot)),
            Kind::Own(hpa) => free_frame(hpa),
        }
        t.backs.swap_remove(i);
    }
    if let Some(n) = t.per_domain.get_mut(usize::from(domain)) {
        *n = 0;
    }
}
