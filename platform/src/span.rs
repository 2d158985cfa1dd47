//! Spans of addresses that come from someone the kernel does not trust: a
//! service's pointer and length, a port and an access size, a guest frame
//! and a count. Each question ("does `[start, start + len)` lie inside this
//! range, inside this page?") is answered without arithmetic that can wrap:
//! no `start + len` is ever computed unless it is known to fit, so a span
//! that runs past the top of the address space, or starts below the range
//! it is compared with, is refused instead of wrapping into a small number
//! that passes the check.

use crate::PAGE_SIZE;

/// The end of `[start, start + len)`, or `None` when it would pass the top
/// of the 64-bit address space.
pub const fn end(start: u64, len: u64) -> Option<u64> {
    start.checked_add(len)
}

/// Whether `[start, start + len)` lies inside `[base, limit)`. An empty span
/// lies inside when `start` is in `[base, limit]`. False when `base > limit`.
pub const fn within(start: u64, len: u64, base: u64, limit: u64) -> bool {
    // `start <= limit` first, so that `limit - start` cannot wrap; `len` is
    // compared with the room left instead of being added to `start`.
    start >= base && start <= limit && len <= limit - start
}

/// Whether `[addr, addr + len)` lies inside the one page that holds `addr`.
pub const fn in_one_page(addr: u64, len: u64) -> bool {
    // addr % PAGE_SIZE < PAGE_SIZE: the subtraction cannot wrap.
    len <= PAGE_SIZE - addr % PAGE_SIZE
}

/// The offset of `addr` in the page that starts at `page` (page-aligned),
/// if the whole span `[addr, addr + len)` lies inside that page; `None` for
/// a span that starts in another page (below it, however little) or runs
/// past its end.
pub const fn offset_in_page(page: u64, addr: u64, len: u64) -> Option<u64> {
    if addr < page {
        return None;
    }
    let offset = addr - page;
    if offset < PAGE_SIZE && len <= PAGE_SIZE - offset {
        Some(offset)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The same questions in 128-bit arithmetic, which cannot wrap here.
    fn within_ref(start: u64, len: u64, base: u64, limit: u64) -> bool {
        let (s, l, b, lim) = (
            u128::from(start),
            u128::from(len),
            u128::from(base),
            u128::from(limit),
        );
        s >= b && s + l <= lim
    }

    fn offset_ref(page: u64, addr: u64, len: u64) -> Option<u64> {
        let (p, a, l, size) = (
            u128::from(page),
            u128::from(addr),
            u128::from(len),
            u128::from(PAGE_SIZE),
        );
        (a >= p && a < p + size && a + l <= p + size).then(|| (a - p) as u64)
    }

    #[test]
    fn a_buffer_just_below_a_page_is_not_in_it() {
        // The REPLY_RECV case: the receive buffer four bytes below the page
        // of the answer. `buf.wrapping_sub(page) + len` wraps to len - 4,
        // which passed the old check.
        let page = 0x7fff_f000;
        assert_eq!(offset_in_page(page, page - 4, 200), None);
        assert_eq!(offset_in_page(page, page - 4, 4), None);
        assert_eq!(offset_in_page(page, page - 1, 0), None);
        assert_eq!(offset_in_page(page, 0, 8), None);
        let wrapped = (page - 4).wrapping_sub(page).wrapping_add(200);
        assert!(wrapped <= PAGE_SIZE, "the old check passed it: {wrapped}");
    }

    #[test]
    fn spans_inside_a_page_have_their_offset() {
        let page = 0x40_0000;
        assert_eq!(offset_in_page(page, page, PAGE_SIZE), Some(0));
        assert_eq!(offset_in_page(page, page + 0xf00, 0x100), Some(0xf00));
        assert_eq!(offset_in_page(page, page + 0xf00, 0x101), None);
        assert_eq!(offset_in_page(page, page + PAGE_SIZE, 0), None);
        assert_eq!(offset_in_page(page, page + PAGE_SIZE, 8), None);
        assert_eq!(offset_in_page(page, page + 8, u64::MAX), None);
        // The last page of the address space: its end is 2^64.
        let top = !(PAGE_SIZE - 1);
        assert_eq!(offset_in_page(top, u64::MAX - 3, 4), Some(0xffc));
        assert_eq!(offset_in_page(top, u64::MAX - 3, 8), None);
    }

    #[test]
    fn spans_that_wrap_are_not_in_one_page() {
        assert!(!in_one_page(u64::MAX - 3, 8));
        assert!(in_one_page(u64::MAX - 3, 4));
        assert!(!in_one_page(0x1ffc, 8));
        assert!(in_one_page(0x1ff8, 8));
        assert!(!in_one_page(0x1000, u64::MAX));
        assert!(!in_one_page(0x1004, u64::MAX - 3));
        assert!(in_one_page(0x1000, PAGE_SIZE));
        assert!(!in_one_page(0x1001, PAGE_SIZE));
    }

    #[test]
    fn spans_that_wrap_are_not_within_a_range() {
        // A port near u64::MAX with a size that wraps `port + size` to 2:
        // the old check `port + size > base + count` passed it.
        assert!(!within(u64::MAX - 1, 4, 0x2f8, 0x300));
        assert!(!within(u64::MAX - 3, 8, 0, u64::MAX));
        assert!(within(u64::MAX - 3, 3, 0, u64::MAX));
        assert!(within(0x2f8, 8, 0x2f8, 0x300));
        assert!(!within(0x2f8, 9, 0x2f8, 0x300));
        assert!(!within(0x2f7, 1, 0x2f8, 0x300));
        assert!(within(0x300, 0, 0x2f8, 0x300));
        assert!(!within(0x301, 0, 0x2f8, 0x300));
        assert!(!within(5, 0, 6, 4));
        assert_eq!(end(u64::MAX - 3, 4), None);
        assert_eq!(end(u64::MAX - 3, 3), Some(u64::MAX));
    }

    proptest! {
        #[test]
        fn within_agrees_with_wide_arithmetic(
            start in prop_oneof![any::<u64>(), (u64::MAX - 8192)..=u64::MAX, 0u64..8192],
            len in prop_oneof![any::<u64>(), 0u64..8192, (u64::MAX - 8192)..=u64::MAX],
            base in prop_oneof![any::<u64>(), 0u64..4096],
            limit in prop_oneof![any::<u64>(), (u64::MAX - 4096)..=u64::MAX, 0u64..8192],
        ) {
            prop_assert_eq!(within(start, len, base, limit), within_ref(start, len, base, limit));
        }

        #[test]
        fn page_offsets_agree_with_wide_arithmetic(
            page in prop_oneof![Just(0u64), Just(!(PAGE_SIZE - 1)), any::<u64>().prop_map(|p| p & !(PAGE_SIZE - 1))],
            delta in -8192i64..8192,
            far in any::<u64>(),
            len in prop_oneof![0u64..=8192, any::<u64>(), (u64::MAX - 8192)..=u64::MAX],
            use_far in any::<bool>(),
        ) {
            let addr = if use_far { far } else { page.wrapping_add_signed(delta) };
            prop_assert_eq!(offset_in_page(page, addr, len), offset_ref(page, addr, len));
            let one = in_one_page(addr, len);
            prop_assert_eq!(one, offset_ref(addr & !(PAGE_SIZE - 1), addr, len).is_some());
        }
    }
}
