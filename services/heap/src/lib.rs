//! A heap for services that need one: `service_heap::heap!(BYTES)` in
//! the binary makes `alloc` (Box, Vec, BTreeMap) work, from a fixed arena
//! in the service's own memory. Services run on one thread, so the lock is
//! a formality. Running out of heap is never memory taken from elsewhere;
//! in a collection that cannot report it (`BTreeMap`, `Vec::push`) it is
//! an allocation failure, which faults the service. A service whose state
//! grows from what others ask checks `heap_room` (which `heap!` defines:
//! [`room_in`] its heap) before a change, uses `try_reserve` where it can,
//! and refuses the change instead.

#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

/// Whether `heap` has `bytes` free in one piece now: a real allocation,
/// given back at once (an allocator that cannot serve a request returns
/// null; only the collections turn that into a fault).
///
/// It calls the allocator itself, not `alloc::alloc::alloc`: the compiler
/// may remove an allocation through the global allocator functions that is
/// never used, and take it as having succeeded (which is how a first
/// version of this check always said yes).
pub fn room_in(heap: &impl core::alloc::GlobalAlloc, bytes: usize) -> bool {
    let Ok(layout) = core::alloc::Layout::from_size_align(bytes.max(1), 8) else {
        return false;
    };
    // Safety: `layout` has a nonzero size; the block is given back to the
    // allocator it came from, with the same layout, and never used.
    unsafe {
        let p = heap.alloc(layout);
        if p.is_null() {
            return false;
        }
        heap.dealloc(p, layout);
    }
    true
}

pub use talc::source::Claim;

/// The lock of a single-threaded service: taking it never waits.
pub struct NoLock(core::sync::atomic::AtomicBool);

// Safety: `lock` sets the flag and `unlock` clears it; a service has one
// thread, so a second `lock` while held can only be re-entry from the
// allocator itself, which does not happen (it reports it as a bug).
unsafe impl talc::lock_api::RawMutex for NoLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = NoLock(core::sync::atomic::AtomicBool::new(false));
    type GuardMarker = talc::lock_api::GuardNoSend;

    fn lock(&self) {
        if self.0.swap(true, core::sync::atomic::Ordering::Acquire) {
            panic!("the heap was entered twice");
        }
    }

    fn try_lock(&self) -> bool {
        !self.0.swap(true, core::sync::atomic::Ordering::Acquire)
    }

    unsafe fn unlock(&self) {
        self.0.store(false, core::sync::atomic::Ordering::Release);
    }
}

/// The allocator `heap!` installs.
pub type Heap = talc::TalcLock<NoLock, Claim>;

/// Gives the service a heap of `$bytes` bytes (in its data segment).
#[macro_export]
macro_rules! heap {
    ($bytes:expr) => {
        static mut __PARALLAX_ARENA: [u8; $bytes] = [0; $bytes];
        #[global_allocator]
        static __PARALLAX_HEAP: $crate::Heap =
            // Safety: the arena is used by this allocator alone.
            $crate::Heap::new(unsafe { $crate::Claim::array(&raw mut __PARALLAX_ARENA) });

        /// Whether the heap has `bytes` free in one piece now
        /// (`service_heap::room_in`).
        #[allow(dead_code)]
        fn heap_room(bytes: usize) -> bool {
            $crate::room_in(&__PARALLAX_HEAP, bytes)
        }
    };
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::alloc::{GlobalAlloc, Layout};

    #[test]
    fn room_says_whether_a_block_fits_now() {
        static mut ARENA: [u8; 16 << 10] = [0; 16 << 10];
        // Safety: the arena is used by this allocator alone.
        let heap = super::Heap::new(unsafe { super::Claim::array(&raw mut ARENA) });
        assert!(super::room_in(&heap, 4096));
        let big = Layout::from_size_align(12 << 10, 8).unwrap();
        // Safety: a nonzero layout; given back below with the same layout.
        let p = unsafe { heap.alloc(big) };
        assert!(!p.is_null());
        assert!(!super::room_in(&heap, 8192), "12 KiB of 16 are taken");
        assert!(super::room_in(&heap, 1024));
        // Safety: `p` came from this allocator with this layout.
        unsafe { heap.dealloc(p, big) };
        assert!(super::room_in(&heap, 8192));
    }
}
