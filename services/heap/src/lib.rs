//! A heap for services that need one: `service_heap::heap!(BYTES)` in
//! the binary makes `alloc` (Box, Vec, BTreeMap) work, from a fixed arena
//! in the service's own memory. Services run on one thread, so the lock is
//! a formality; running out of heap is an allocation failure (the service
//! faults and its supervisor decides), never memory taken from elsewhere.

#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

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
    };
}
