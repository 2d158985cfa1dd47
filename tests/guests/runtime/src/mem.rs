//! Page-aligned static buffers: memory a guest knows the frames of.
//!
//! The guest runs identity-mapped, so an address in the guest is its
//! guest-physical address and `address >> 12` its guest frame number (gfn).
//! The buffers are accessed only through volatile reads and writes of raw
//! pointers, never through references: what a page holds may change under
//! the program (another memory view, the hypervisor), and exception
//! handlers may touch a buffer the main code is using.
//!
//! ```ignore
//! static A: Pages<1> = Pages::new();   // in .bss, 4 KiB aligned
//! A.write_u64(0, 0, 0xaaaa);
//! let gfn = A.gfn(0);
//! ```

use core::cell::UnsafeCell;

pub const PAGE_SIZE: usize = 4096;
pub const LARGE_PAGE_SIZE: usize = 2 * 1024 * 1024;

/// The guest frame number of a guest address.
pub fn gfn_of(address: u64) -> u64 {
    address >> 12
}

/// The guest frame number of the page holding `x`.
pub fn gfn_of_ref<T: ?Sized>(x: &T) -> u64 {
    gfn_of(x as *const T as *const u8 as u64)
}

/// Checks an access of `size` bytes at `offset` in page `page` of a buffer
/// of `pages` pages and returns its byte offset.
fn checked(pages: usize, page: usize, offset: usize, size: usize) -> usize {
    assert!(
        page < pages && offset.is_multiple_of(size) && offset + size <= PAGE_SIZE,
        "buffer access out of bounds: page {page} of {pages}, offset {offset}, {size} bytes"
    );
    page * PAGE_SIZE + offset
}

macro_rules! page_buffer_methods {
    () => {
        /// The guest(-physical) address of the buffer.
        pub fn addr(&self) -> u64 {
            self.base() as u64
        }

        /// The address of page `page`.
        pub fn page_addr(&self, page: usize) -> u64 {
            assert!(page < Self::PAGES, "page {page} of {}", Self::PAGES);
            self.addr() + (page * PAGE_SIZE) as u64
        }

        /// The guest frame number of page `page`.
        pub fn gfn(&self, page: usize) -> u64 {
            gfn_of(self.page_addr(page))
        }

        fn ptr(&self, page: usize, offset: usize, size: usize) -> *mut u8 {
            let at = checked(Self::PAGES, page, offset, size);
            // `at` is inside the buffer (checked above).
            self.base().wrapping_add(at)
        }

        /// Reads the u64 at byte `offset` (8-aligned) of page `page`.
        pub fn read_u64(&self, page: usize, offset: usize) -> u64 {
            let p = self.ptr(page, offset, 8).cast::<u64>();
            // Safety: `p` is an aligned u64 inside this static buffer, which
            // is only ever accessed through volatile raw-pointer operations.
            unsafe { p.read_volatile() }
        }

        /// Writes the u64 at byte `offset` (8-aligned) of page `page`.
        pub fn write_u64(&self, page: usize, offset: usize, value: u64) {
            let p = self.ptr(page, offset, 8).cast::<u64>();
            // Safety: as in `read_u64`; the buffer is in writable .bss/.data.
            unsafe { p.write_volatile(value) }
        }

        /// Writes `value` in one instruction to the 8 bytes from 4 before
        /// the end of page `page`: half in it, half in the next page.
        pub fn write_straddling_u64(&self, page: usize, value: u64) {
            assert!(page + 1 < Self::PAGES, "page {page} has no next page");
            let at = (page + 1) * PAGE_SIZE - 4;
            let p = self.base().wrapping_add(at).cast::<u64>();
            // Safety: the 8 bytes from `at` lie inside this static buffer
            // (pages `page` and `page + 1`); an unaligned write is allowed.
            unsafe { p.write_unaligned(value) }
        }

        /// Reads the u32 at byte `offset` (4-aligned) of page `page`.
        pub fn read_u32(&self, page: usize, offset: usize) -> u32 {
            let p = self.ptr(page, offset, 4).cast::<u32>();
            // Safety: as in `read_u64`.
            unsafe { p.read_volatile() }
        }

        /// Writes the u32 at byte `offset` (4-aligned) of page `page`.
        pub fn write_u32(&self, page: usize, offset: usize, value: u32) {
            let p = self.ptr(page, offset, 4).cast::<u32>();
            // Safety: as in `write_u64`.
            unsafe { p.write_volatile(value) }
        }

        /// Reads the byte at `offset` of page `page`.
        pub fn read_u8(&self, page: usize, offset: usize) -> u8 {
            let p = self.ptr(page, offset, 1);
            // Safety: as in `read_u64`.
            unsafe { p.read_volatile() }
        }

        /// Writes the byte at `offset` of page `page`.
        pub fn write_u8(&self, page: usize, offset: usize, value: u8) {
            let p = self.ptr(page, offset, 1);
            // Safety: as in `write_u64`.
            unsafe { p.write_volatile(value) }
        }

        /// Fills page `page` with `value` (u64 by u64).
        pub fn fill_u64(&self, page: usize, value: u64) {
            for offset in (0..PAGE_SIZE).step_by(8) {
                self.write_u64(page, offset, value);
            }
        }
    };
}

/// `N` page-aligned pages, for a `static` (zero-filled, in .bss).
#[repr(C, align(4096))]
pub struct Pages<const N: usize>(UnsafeCell<[[u8; PAGE_SIZE]; N]>);

// Safety: the guest has one CPU and the buffer is only accessed through
// volatile raw-pointer reads and writes (no references are handed out), so
// sharing it (with exception handlers) cannot create aliasing references.
unsafe impl<const N: usize> Sync for Pages<N> {}

impl<const N: usize> Pages<N> {
    pub const PAGES: usize = N;

    pub const fn new() -> Self {
        Pages(UnsafeCell::new([[0; PAGE_SIZE]; N]))
    }

    fn base(&self) -> *mut u8 {
        self.0.get().cast()
    }

    page_buffer_methods!();
}

impl<const N: usize> Default for Pages<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Pages a [`LargePage`] reserves: enough to hold a 2 MiB-aligned 2 MiB
/// window wherever the linker puts it.
const LARGE_RESERVED: usize = 2 * (LARGE_PAGE_SIZE / PAGE_SIZE) - 1;

/// A 2 MiB-aligned, 2 MiB area (512 pages), for a `static`: a region a
/// hypervisor may map with one large page.
///
/// The static itself is only 4 KiB-aligned (a 2 MiB-aligned section would
/// make the linker align the image's file offset to 2 MiB too, pushing the
/// multiboot header out of the file's first 8 KiB); it reserves 4 MiB - 4 KiB
/// and the area is the 2 MiB-aligned window inside it. Page `i` and
/// [`LargePage::addr`] refer to that window.
#[repr(C, align(4096))]
pub struct LargePage(UnsafeCell<[[u8; PAGE_SIZE]; LARGE_RESERVED]>);

// Safety: as for `Pages`.
unsafe impl Sync for LargePage {}

impl LargePage {
    pub const PAGES: usize = LARGE_PAGE_SIZE / PAGE_SIZE;

    pub const fn new() -> Self {
        LargePage(UnsafeCell::new([[0; PAGE_SIZE]; LARGE_RESERVED]))
    }

    /// The start of the 2 MiB-aligned window.
    fn base(&self) -> *mut u8 {
        let start = self.0.get().cast::<u8>();
        let pad = (start as usize).next_multiple_of(LARGE_PAGE_SIZE) - start as usize;
        // At most 511 pages of padding: the window ends inside the buffer.
        start.wrapping_add(pad)
    }

    page_buffer_methods!();
}

impl Default for LargePage {
    fn default() -> Self {
        Self::new()
    }
}
