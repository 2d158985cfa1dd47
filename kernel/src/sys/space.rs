//! User address spaces: one 4-level page-table tree per service.
//!
//! The upper half (PML4 entries 256-511: the direct map and the kernel image)
//! is shared with the kernel's own tables and is supervisor-only; the lower
//! half is the service's, built page by page. The kernel never touches user
//! memory through user addresses: it translates them through the service's
//! tables (checking present, user and writable bits) and copies through the
//! direct map, so a service can only ever hand the kernel its own pages.

use crate::mem::phys_to_virt;
use crate::vm::memory::{alloc_zeroed_frame, free_frame};
use ipc_schema::syscall::layout::USER_END;
use platform::PAGE_SIZE;
use platform::span;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
/// Software bit: the frame belongs to this space (freed with it).
const OWNED: u64 = 1 << 9;
const NO_EXECUTE: u64 = 1 << 63;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// The kernel's PML4, whose upper half every space shares.
static KERNEL_PML4: spin::Once<u64> = spin::Once::new();

/// Records the kernel's PML4 (the boot tables, current at boot).
pub fn init() {
    KERNEL_PML4.call_once(|| {
        x86_64::registers::control::Cr3::read_raw()
            .0
            .start_address()
            .as_u64()
    });
}

/// The kernel's own PML4 (no user mappings).
pub fn kernel_pml4() -> u64 {
    *KERNEL_PML4.get().expect("space::init ran at boot")
}

fn table(pa: u64) -> &'static mut [u64; 512] {
    // Safety: every table address handled here is a frame this module
    // allocated (or the kernel PML4), 4 KiB aligned, in the direct map; the
    // kernel runs on one CPU with interrupts off while it edits them.
    unsafe { &mut *phys_to_virt(pa).cast::<[u64; 512]>() }
}

/// How a page may be used.
#[derive(Clone, Copy, Debug)]
pub struct PageFlags {
    pub writable: bool,
    pub executable: bool,
    /// The frame belongs to the space and is freed with it.
    pub owned: bool,
    /// Device memory: caching off (PCD, PWT).
    pub uncached: bool,
}

/// Why a mapping failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum SpaceError {
    /// Not a canonical lower-half, page-aligned address.
    BadAddress,
    AlreadyMapped,
    NotMapped,
    OutOfMemory,
}

/// One service's address space.
#[derive(Debug)]
pub struct AddressSpace {
    pml4: u64,
    /// The last page translated and its leaf entry (`u64::MAX`: none).
    last: core::cell::Cell<(u64, u64)>,
    /// The last [`AddressSpace::answer_and_buffer`] of each kind (0: a
    /// REPLY_RECV's, 1: a CALL's) that found both spans (a receive loop, a
    /// client, asks the same one every time): the two addresses, one more
    /// than the bytes readable and writable from each in its page (0:
    /// nothing kept), and their direct-map addresses. Both cleared when a
    /// mapping of this space changes.
    kept: [core::cell::Cell<[u64; 6]>; 2],
}

impl AddressSpace {
    /// An empty lower half and the kernel's upper half.
    pub fn new() -> Option<Self> {
        let pml4 = alloc_zeroed_frame()?;
        let kernel = table(kernel_pml4());
        table(pml4)[256..].copy_from_slice(&kernel[256..]);
        Some(Self {
            pml4,
            last: core::cell::Cell::new((u64::MAX, 0)),
            kept: Default::default(),
        })
    }

    /// Forgets the translations kept (a mapping changes).
    fn forget(&self) {
        self.last.set((u64::MAX, 0));
        self.kept.iter().for_each(|k| k.set([0; 6]));
    }

    /// The value for CR3.
    pub fn cr3(&self) -> u64 {
        self.pml4
    }

    /// Maps the 4 KiB page at `va` to the frame at `pa`.
    pub fn map(&mut self, va: u64, pa: u64, flags: PageFlags) -> Result<(), SpaceError> {
        self.forget();
        if !va.is_multiple_of(PAGE_SIZE) || va >= USER_END || !pa.is_multiple_of(PAGE_SIZE) {
            return Err(SpaceError::BadAddress);
        }
        let mut t = self.pml4;
        for level in (1..4).rev() {
            let e = &mut table(t)[index(va, level + 1)];
            if *e & PRESENT == 0 {
                let next = alloc_zeroed_frame().ok_or(SpaceError::OutOfMemory)?;
                *e = next | PRESENT | WRITABLE | USER;
            }
            t = *e & ADDRESS;
        }
        let leaf = &mut table(t)[index(va, 1)];
        if *leaf & PRESENT != 0 {
            return Err(SpaceError::AlreadyMapped);
        }
        *leaf = pa
            | PRESENT
            | USER
            | if flags.writable { WRITABLE } else { 0 }
            | if flags.executable { 0 } else { NO_EXECUTE }
            | if flags.owned { OWNED } else { 0 }
            | if flags.uncached { 0b11 << 3 } else { 0 };
        Ok(())
    }

    /// Removes the page at `va`, returning its frame (the caller frees owned
    /// frames; the TLB is flushed by the next CR3 load or here for the
    /// current space).
    pub fn unmap(&mut self, va: u64) -> Result<u64, SpaceError> {
        self.forget();
        let leaf = self.leaf(va).ok_or(SpaceError::NotMapped)?;
        let pa = *leaf & ADDRESS;
        if *leaf & OWNED != 0 {
            free_frame(pa);
        }
        *leaf = 0;
        if x86_64::registers::control::Cr3::read_raw()
            .0
            .start_address()
            .as_u64()
            == self.pml4
        {
            x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(va));
        }
        Ok(pa)
    }

    /// Removes every page mapped in `[va, end)` (page-aligned, in the lower
    /// half). A table that is not there is skipped whole, so the work is
    /// bounded by what is mapped, not by the size of the range.
    pub fn unmap_range(&mut self, va: u64, end: u64) {
        let mut at = va;
        while at < end && at < USER_END {
            // The first level, from the top, whose entry for `at` is empty.
            let mut t = self.pml4;
            let mut empty = None;
            for level in (2..=4).rev() {
                let e = table(t)[index(at, level)];
                if e & PRESENT == 0 || e & HUGE != 0 {
                    empty = Some(level);
                    break;
                }
                t = e & ADDRESS;
            }
            let step = match empty {
                // Nothing under this entry: on to the next one's start.
                Some(level) => {
                    let size = 1u64 << (12 + 9 * (level - 1));
                    size - at % size
                }
                None => {
                    let _ = self.unmap(at);
                    PAGE_SIZE
                }
            };
            match at.checked_add(step) {
                Some(next) => at = next,
                None => break,
            }
        }
    }

    fn leaf(&self, va: u64) -> Option<&'static mut u64> {
        if va >= USER_END {
            return None;
        }
        let mut t = self.pml4;
        for level in (1..4).rev() {
            let e = table(t)[index(va, level + 1)];
            if e & PRESENT == 0 || e & HUGE != 0 {
                return None;
            }
            t = e & ADDRESS;
        }
        let leaf = &mut table(t)[index(va, 1)];
        if *leaf & PRESENT == 0 {
            None
        } else {
            Some(leaf)
        }
    }

    /// The physical address of `va` in the page of leaf entry `e`, if the
    /// service may access it (user, and writable when `write`).
    #[inline(always)]
    fn permitted(e: u64, va: u64, write: bool) -> Option<u64> {
        if e & USER == 0 || (write && e & WRITABLE == 0) {
            return None;
        }
        Some((e & ADDRESS) + va % PAGE_SIZE)
    }

    /// The physical address of the byte at `va`, if the service may access
    /// it (present, user, and writable when `write`).
    #[inline(always)]
    pub fn translate(&self, va: u64, write: bool) -> Option<u64> {
        let (page, (p, e)) = (va & !(PAGE_SIZE - 1), self.last.get());
        let e = if p == page { e } else { *self.leaf(page)? };
        self.last.set((page, e));
        Self::permitted(e, va, write)
    }

    /// For a receive loop's answer and next receive buffer together (or a
    /// call's message and reply buffer, `kind` 1): the direct-map address of
    /// the `len` bytes at `va` (read), if they lie in one page, and of the
    /// `buf_len` bytes at `buf` (written) if they do too, else 0. The pair
    /// found last of each kind is kept (`kept`): the same buffers again
    /// cost four comparisons.
    #[inline(always)]
    pub fn answer_and_buffer(
        &self,
        va: u64,
        len: usize,
        buf: u64,
        buf_len: usize,
        kind: usize,
    ) -> Option<(*const u8, u64)> {
        let kept = &self.kept[kind & 1];
        let [v, b, v_limit, b_limit, at, next] = kept.get();
        if v == va && b == buf && (len as u64) < v_limit && (buf_len as u64) < b_limit {
            return Some((at as *const u8, next));
        }
        let answer = self.in_one_page(va, len, false)?.cast_const();
        let next = self.in_one_page(buf, buf_len, true).map_or(0, |p| p as u64);
        if next != 0 {
            let room = |a: u64| PAGE_SIZE - a % PAGE_SIZE + 1;
            kept.set([va, buf, room(va), room(buf), answer as u64, next]);
        }
        Some((answer, next))
    }

    /// The direct-map address of the `len` bytes at the service's `va`, if
    /// they lie within one page the service may read (and write, with
    /// `write`): the kernel can then use them where they are, without a copy.
    #[inline]
    pub fn in_one_page(&self, va: u64, len: usize, write: bool) -> Option<*mut u8> {
        if !span::in_one_page(va, len as u64) {
            return None;
        }
        let pa = self.translate(va, write)?;
        Some(phys_to_virt(pa))
    }

    /// Copies `out.len()` bytes from the service's `va`.
    pub fn read(&self, va: u64, out: &mut [u8]) -> Result<(), SpaceError> {
        let mut done = 0;
        while done < out.len() {
            let at = va.checked_add(done as u64).ok_or(SpaceError::BadAddress)?;
            let pa = self.translate(at, false).ok_or(SpaceError::NotMapped)?;
            let n = (out.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
            // Safety: `pa` is a frame mapped into this space, in the direct
            // map; n stays within its page.
            unsafe {
                core::ptr::copy_nonoverlapping(phys_to_virt(pa), out[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Ok(())
    }

    /// Copies `bytes` to the service's `va` (which must be writable).
    pub fn write(&self, va: u64, bytes: &[u8]) -> Result<(), SpaceError> {
        let end = va
            .checked_add(bytes.len() as u64)
            .ok_or(SpaceError::BadAddress)?;
        // Within one page (IPC messages, nearly always): one translation.
        if span::in_one_page(va, bytes.len() as u64) {
            let pa = self.translate(va, true).ok_or(SpaceError::NotMapped)?;
            // Safety: as in `read`, and the page is writable by the service.
            unsafe {
                core::ptr::copy_nonoverlapping(bytes.as_ptr(), phys_to_virt(pa), bytes.len())
            };
            return Ok(());
        }
        // Check every page first, so that a failure writes nothing.
        let mut at = va & !(PAGE_SIZE - 1);
        while at < end {
            self.translate(at, true).ok_or(SpaceError::NotMapped)?;
            at += PAGE_SIZE;
        }
        let mut done = 0;
        while done < bytes.len() {
            let at = va + done as u64;
            let pa = self.translate(at, true).ok_or(SpaceError::NotMapped)?;
            let n = (bytes.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
            // Safety: as in `read`, and the page is writable by the service.
            unsafe { core::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), phys_to_virt(pa), n) };
            done += n;
        }
        Ok(())
    }

    /// Frees the lower half's tables and every owned frame.
    pub fn destroy(self) {
        // The kernel may still run on this tree (a service that ended
        // itself): it moves to its own before the frames go back.
        let current = x86_64::registers::control::Cr3::read_raw()
            .0
            .start_address()
            .as_u64();
        if current == self.pml4 {
            // Safety: the kernel's PML4 maps the whole kernel (the upper half
            // every space shares) and stays for as long as the kernel runs.
            unsafe {
                x86_64::registers::control::Cr3::write_raw(
                    x86_64::structures::paging::PhysFrame::containing_address(
                        x86_64::PhysAddr::new(kernel_pml4()),
                    ),
                    0,
                )
            };
        }
        fn walk(t: u64, level: u32) {
            for &e in table(t).iter() {
                if e & PRESENT == 0 {
                    continue;
                }
                if level == 1 {
                    if e & OWNED != 0 {
                        free_frame(e & ADDRESS);
                    }
                } else {
                    walk(e & ADDRESS, level - 1);
                    free_frame(e & ADDRESS);
                }
            }
        }
        let root = table(self.pml4);
        // The lower half only: the upper half is the kernel's, shared.
        for &e in &root[..256] {
            if e & PRESENT != 0 {
                walk(e & ADDRESS, 3);
                free_frame(e & ADDRESS);
            }
        }
        free_frame(self.pml4);
    }
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}
