//! A copy for the kernel's IPC fast paths, where most messages are a few
//! bytes (a ping, a plain answer) and the general `memmove`'s set-up costs
//! more than the copy.

/// Copies `len` bytes from `from` to `to`, as `core::ptr::copy` does (the
/// two may overlap). Up to 16 bytes go as two loads and two stores of the
/// widest size that fits (overlapping each other when `len` is not a
/// power of two), every load before any store, so an overlap of the two
/// spans changes nothing; longer copies go to `core::ptr::copy`.
///
/// # Safety
/// As `core::ptr::copy`: `from` valid for reads and `to` for writes of
/// `len` bytes.
#[inline(always)]
pub unsafe fn copy_message(from: *const u8, to: *mut u8, len: usize) {
    // Safety: the caller's contract, and each `two` gets a `len` from
    // `size_of::<T>()` to twice that.
    unsafe {
        if len > 16 {
            core::ptr::copy(from, to, len);
        } else if len >= 8 {
            two::<u64>(from, to, len);
        } else if len >= 4 {
            two::<u32>(from, to, len);
        } else if len >= 2 {
            two::<u16>(from, to, len);
        } else if len == 1 {
            to.write(from.read());
        }
    }
}

/// Copies `len` bytes, `size_of::<T>()` to twice that, as two `T`s (the
/// first and the last, overlapping where `len` is less than twice), both
/// read before either is written.
///
/// # Safety
/// As [`copy_message`], with `len` in that range.
#[inline(always)]
unsafe fn two<T: Copy>(from: *const u8, to: *mut u8, len: usize) {
    let last = len - core::mem::size_of::<T>();
    // Safety: both accesses lie inside the caller's `len` bytes (`last` is
    // at most `len - size_of::<T>()`); unaligned reads and writes are
    // allowed.
    unsafe {
        let (a, b) = (
            from.cast::<T>().read_unaligned(),
            from.add(last).cast::<T>().read_unaligned(),
        );
        to.cast::<T>().write_unaligned(a);
        to.add(last).cast::<T>().write_unaligned(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The same bytes as `core::ptr::copy`, for every length up to 40
        /// and every placement of the two spans in one buffer, overlapping
        /// or not, in either order.
        #[test]
        fn copies_as_ptr_copy_does(
            seed in proptest::collection::vec(any::<u8>(), 96),
            len in 0usize..=40,
            from in 0usize..48,
            to in 0usize..48,
        ) {
            let mut ours = seed.clone();
            let mut reference = seed;
            // Safety: both spans lie inside the 96-byte buffers.
            unsafe {
                let p = ours.as_mut_ptr();
                copy_message(p.add(from), p.add(to), len);
                let r = reference.as_mut_ptr();
                core::ptr::copy(r.add(from), r.add(to), len);
            }
            prop_assert_eq!(ours, reference);
        }
    }
}
