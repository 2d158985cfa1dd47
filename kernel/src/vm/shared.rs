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
//!   frame of its own made by a copy-on-write break (a VM fork's every
//!   written page). The RAM frame a gfn had when it came to map a shared
//!   frame is freed then. Each domain keeps its own backs
//!   ([`Domain::backs`], `platform::records`), in frames counted against
//!   its own table quota: one domain's copies never take another's room.
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

impl Kind {
    /// As a record's value: a frame's address (4 KiB aligned) or a slot
    /// with bit 0 set.
    fn encode(self) -> u64 {
        match self {
            Kind::Own(hpa) => hpa,
            Kind::Shared(slot) => u64::from(slot) << 1 | 1,
        }
    }

    fn decode(value: u64) -> Kind {
        if value & 1 == 1 {
            Kind::Shared((value >> 1) as u16)
        } else {
            Kind::Own(value)
        }
    }
}

struct Table {
    frames: [Frame; FRAMES],
    /// Slots with references (none: no frame is shared, no look-up).
    live: u32,
    generation: u32,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    frames: [Frame {
        hpa: 0,
        refs: 0,
        generation: 0,
    }; FRAMES],
    live: 0,
    generation: 0,
});

/// What `gfn` of `d` maps, if not its own RAM frame.
fn kind(d: &Domain, gfn: u64) -> Option<Kind> {
    if d.backs.is_empty() {
        return None;
    }
    d.backs
        .find(&d.views.tables, gfn)
        .map(|(_, v)| Kind::decode(v))
}

/// Records that `gfn` of `d` maps `kind` (`None`: its own RAM frame
/// again). The caller made room ([`room`]).
fn set(d: &mut Domain, gfn: u64, kind: Option<Kind>) {
    let kind = kind.filter(|&k| Some(k) != d.ram_frame(gfn).map(Kind::Own));
    let found = d.backs.find(&d.views.tables, gfn);
    let mem = &mut d.views.tables;
    match (found, kind) {
        (Some((i, _)), Some(k)) => d.backs.set(mem, i, k.encode()),
        (Some((i, _)), None) => {
            d.backs.remove(mem, i);
        }
        (None, Some(k)) => {
            let _ = d.backs.insert(mem, gfn, k.encode());
        }
        (None, None) => {}
    }
}

/// Room for one more record of `d`'s (a frame from its quota if needed).
fn room(d: &mut Domain) -> bool {
    d.backs.reserve(&mut d.views.tables).is_ok()
}

impl Table {
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

    /// One reference less on `slot`; the frame is freed with the last.
    fn unref(&mut self, slot: usize) {
        let f = &mut self.frames[slot];
        if f.refs == 0 {
            return;
        }
        f.refs -= 1;
        if f.refs == 0 {
            free_frame(f.hpa);
            self.live -= 1;
        }
    }
}

fn free_frames() -> u64 {
    POOL.lock().as_ref().map_or(0, |f| f.free_frames())
}

/// The frame the host p2m maps at `gfn` when it is not the domain's RAM
/// frame for it: `Some(Some(frame))` a frame of its own, `Some(None)` a
/// shared frame (no service may map it writable), `None` no such record.
pub fn backing(d: &Domain, gfn: u64) -> Option<Option<u64>> {
    match kind(d, gfn)? {
        Kind::Own(hpa) => Some(Some(hpa)),
        Kind::Shared(_) => Some(None),
    }
}

/// The gfn of `d` whose recorded backing frame is `hpa`.
pub fn gfn_backed_by(d: &Domain, hpa: u64) -> Option<u64> {
    if d.backs.is_empty() {
        return None;
    }
    let t = TABLE.lock();
    let i = d.backs.position(&d.views.tables, |_, v| {
        let frame = match Kind::decode(v) {
            Kind::Own(h) => h,
            Kind::Shared(s) => t.frames[usize::from(s)].hpa,
        };
        frame == hpa
    })?;
    Some(d.backs.get(&d.views.tables, i).0)
}

/// Whether `hpa` is a shared frame now.
pub fn is_shared_frame(hpa: u64) -> bool {
    let t = TABLE.lock();
    t.live != 0 && t.frames.iter().any(|f| f.refs > 0 && f.hpa == hpa)
}

/// Whether `gfn` of domain `d` maps a shared frame.
pub fn is_shared_gfn(d: &Domain, gfn: u64) -> bool {
    matches!(kind(d, gfn), Some(Kind::Shared(_)))
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
    if let Some(Kind::Shared(slot)) = kind(d, gfn) {
        return Ok(t.result(usize::from(slot)));
    }
    let slot = t.frames.iter().position(|f| f.refs == 0);
    let (Some(slot), true) = (slot, room(d)) else {
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
    t.live += 1;
    set(d, gfn, Some(Kind::Shared(slot as u16)));
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
    if !room(d) {
        return Err(EptOpError::Busy);
    }
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let m = leaf(ept, tables, gpa)?;
    if m.hpa == frame {
        return Err(EptOpError::AlreadyShared);
    }
    ept.replace(tables, gpa, frame, read_only(m.perms))
        .map_err(crate::sys::syscall::ept_error)?;
    match kind(d, gfn) {
        Some(Kind::Shared(old)) => t.unref(usize::from(old)),
        // Its own frame (its RAM frame, or a copy): nothing else maps it.
        _ => free_frame(m.hpa),
    }
    t.frames[slot].refs += 1;
    set(d, gfn, Some(Kind::Shared(slot as u16)));
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
    let found = kind(d, gfn);
    if d.parent.is_some() && found.is_none() {
        return break_fork(d, gfn, perms);
    }
    let Some(Kind::Shared(slot)) = found else {
        return Err(EptOpError::NotShared);
    };
    let mut t = TABLE.lock();
    let slot = usize::from(slot);
    let (id, old) = (t.id(slot), t.frames[slot].hpa);
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let own = if t.frames[slot].refs == 1 {
        ept.protect(tables, gpa, perms)
            .map_err(crate::sys::syscall::ept_error)?;
        t.frames[slot].refs = 0;
        t.live -= 1;
        old
    } else {
        let new = copy_to_new(ept, tables, gpa, old, perms)?;
        t.frames[slot].refs -= 1;
        new
    };
    let refs = t.frames[slot].refs;
    drop(t);
    set(d, gfn, Some(Kind::Own(own)));
    let result = EptResult::Shared {
        frame: id,
        refs,
        free: free_frames(),
    };
    forget_in_views(d, gfn, old);
    Ok(result)
}

/// Whether `gfn` of fork `d` still maps its parent's frame (read-only in
/// every view, like a shared frame; its first write copies it).
pub fn forked(d: &Domain, gfn: u64) -> bool {
    d.parent.is_some() && d.is_ram(gfn) && kind(d, gfn).is_none()
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
    d.parent.is_some() && gfn_backed_by(d, hpa).is_none()
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
    if !room(d) {
        return Err(EptOpError::OutOfMemory);
    }
    let (ept, tables) = d.views.ept_mut(0).map_err(|_| EptOpError::NoSuchView)?;
    let m = leaf(ept, tables, gpa)?;
    let new = copy_to_new(ept, tables, gpa, m.hpa, perms)?;
    set(d, gfn, Some(Kind::Own(new)));
    forget_in_views(d, gfn, m.hpa);
    Ok(EptResult::Shared {
        frame: 0,
        refs: 0,
        free: free_frames(),
    })
}

/// VM fork's copy on write in the kernel, on a write violation of fork
/// `d` at `gpa` in its host p2m (view 0): where the entry is armed
/// ([`platform::ept::bits::COPY`]: written by [`fork`] or [`reset`] where
/// the parent's entry could be written, and no permission set on it
/// since), the page gets its copy as for `EptOp::Unshare`, with the
/// entry's permissions and write. The owner of the entries decided
/// nothing differently here: an entry it changed is not armed and its
/// violation goes to it. Returns whether the page was copied (false:
/// not armed, or no frame or record left: the owner hears the violation).
pub fn copy_on_write(d: &mut Domain, gpa: u64) -> bool {
    let Ok((ept, tables)) = d.views.ept_mut(0) else {
        return false;
    };
    let Some(m) = ept.copy_armed(tables, gpa) else {
        return false;
    };
    let perms = platform::ept::Perms::new(m.perms.read, true, m.perms.execute);
    break_fork(d, gpa / PAGE_SIZE, perms).is_ok()
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
            if failed.is_some() || m.gpa == super::domain::XAPIC_GFN * PAGE_SIZE {
                return;
            }
            // Read-only; where the parent could write, armed: the fork's
            // first write copies the page in the kernel ([`copy_on_write`]).
            if let Err(e) = ept.map_for_fork(tables, m.gpa, m.hpa, m.size, m.perms, m.memory_type) {
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
    while let Some((gfn, value)) = d.backs.pop(&mut d.views.tables) {
        let kind = Kind::decode(value);
        let gpa = gfn * PAGE_SIZE;
        let theirs = parent
            .views
            .host()
            .query(&KernelTables, gpa)
            .and_then(|t| Some((t.hpa_of(gpa)?, t.perms.write)));
        // The frame the record names leaves every entry before it is
        // released: the parent's frame back where there is one to put back,
        // else no entry at all (never an entry of a freed frame).
        let mut frame = match kind {
            Kind::Own(hpa) => Some(hpa),
            Kind::Shared(_) => None,
        };
        if let Ok((ept, tables)) = d.views.ept_mut(0)
            && let Some(mine) = ept.query(&KernelTables, gpa)
        {
            frame = mine.hpa_of(gpa).or(frame);
            match theirs {
                Some((from, writable))
                    if ept
                        .replace(tables, gpa, from, read_only(mine.perms))
                        .is_ok() =>
                {
                    if writable {
                        ept.arm_copy(tables, gpa);
                    }
                }
                _ => {
                    let _ = ept.unmap(tables, gpa);
                }
            }
        }
        if let Some(hpa) = frame {
            forget_in_views(d, gfn, hpa);
        }
        match kind {
            Kind::Own(hpa) => free_frame(hpa),
            Kind::Shared(slot) => TABLE.lock().unref(usize::from(slot)),
        }
        pages += 1;
    }
    pages
}

/// SH-2: takes write (and the armed bit) from `view`'s entries of the
/// shared gfns among `[start, end)` gfns, after an operation that set
/// permissions over a range.
pub fn restrict(d: &mut Domain, view: u16, start: u64, end: u64) {
    if d.parent.is_some() {
        restrict_forked(d, view, start, end);
    }
    // Record by record (protecting an entry does not change the records).
    for i in 0..d.backs.len() {
        let (gfn, value) = d.backs.get(&d.views.tables, i);
        if !matches!(Kind::decode(value), Kind::Shared(_)) || !(start..end).contains(&gfn) {
            continue;
        }
        let Ok((ept, tables)) = d.views.ept_mut(view) else {
            return;
        };
        let gpa = gfn * PAGE_SIZE;
        if let Some(m) = ept.query(&KernelTables, gpa) {
            let _ = ept.protect(tables, gpa, read_only(m.perms));
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
        let Ok(v) = d.views.get(view) else {
            return;
        };
        let mut next = end;
        v.ept.for_each_leaf(&KernelTables, at, end, |m| {
            if m.perms.write && next == end && found.push((m.gpa, m.size)).is_err() {
                next = m.gpa;
            }
        });
        for &(gpa, size) in &found {
            let own = size == PageSize::Size4K && kind(d, gpa / PAGE_SIZE).is_some();
            let Ok((ept, tables)) = d.views.ept_mut(view) else {
                return;
            };
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
                unmap_4k(ept, tables, gpa, m.size);
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
                unmap_4k(ept, tables, gpa, size);
            }
        }
    });
    d.views.flush_all();
}

/// SH-4: what a destroyed domain held: one reference less on each shared
/// frame it mapped (the last frees it), and its own copies freed.
pub fn release(d: &mut Domain) {
    while let Some((_, value)) = d.backs.pop(&mut d.views.tables) {
        match Kind::decode(value) {
            Kind::Shared(slot) => TABLE.lock().unref(usize::from(slot)),
            Kind::Own(hpa) => free_frame(hpa),
        }
    }
    d.backs.clear(&mut d.views.tables);
}

/// Empties the entry for the 4 KiB page at `gpa` in `ept`, whose leaf there
/// is `size`: a large page is split first, or emptied whole where there are
/// no tables for the split.
fn unmap_4k(ept: &mut Ept, tables: &mut DomainTables, gpa: u64, size: PageSize) {
    if size != PageSize::Size4K {
        let _ = ept.split_to_4k(tables, gpa, gpa + PAGE_SIZE);
    }
    let _ = ept.unmap(tables, gpa);
}
