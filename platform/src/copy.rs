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
    // Safety: the caller's contract covers `[from, from + len)` and
    // `[to, to + len)`; each access below lies inside those spans (`len - N`
    // with `len >= N`), unaligned reads and writes are allowed, and all
    // reads come before the first write.
    unsafe {
        if len > 16 {
            core::ptr::copy(from, to, len);
        } else if len >= 8 {
            let (a, b) = (
                from.cast::<u64>().read_unaligned(),
                from.add(len - 8).cast::<u64>().read_unaligned(),
            );
            to.cast::<u64>().write_unaligned(a);
            to.add(len - 8).cast::<u64>().write_unaligned(b);
        } else if len >= 4 {
            let (a, b) = (
                from.cast::<u32>().read_unaligned(),
                from.add(len - 4).cast::<u32>().read_unaligned(),
            );
            to.cast::<u32>().write_unaligned(a);
            to.add(len - 4).cast::<u32>().write_unaligned(b);
        } else if len >= 2 {
            let (a, b) = (
                from.cast::<u16>().read_unaligned(),
                from.add(len - 2).cast::<u16>().read_unaligned(),
            );
            to.cast::<u16>().write_unaligned(a);
            to.add(len - 2).cast::<u16>().write_unaligned(b);
        } else if len == 1 {
            to.write(from.read());
        }
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
