//! Host tests of the fuzzer's menus and of its rule against waiting for ever.

extern crate std;

use crate::*;
use std::collections::BTreeSet;
use std::vec::Vec;

service_runtime::host_logger!();

#[test]
fn the_same_seed_gives_the_same_numbers() {
    let a: Vec<u64> = {
        let mut r = Rng::new(SEED);
        (0..100).map(|_| r.next_u64()).collect()
    };
    let b: Vec<u64> = {
        let mut r = Rng::new(SEED);
        (0..100).map(|_| r.next_u64()).collect()
    };
    assert_eq!(a, b);
    let distinct: BTreeSet<u64> = a.iter().copied().collect();
    assert_eq!(distinct.len(), 100, "no repeats in 100 draws");
    let mut zero = Rng::new(0);
    assert_ne!(zero.next_u64(), 0, "a zero seed still gives numbers");
}

#[test]
fn pointers_cover_the_edges_and_never_name_the_fuzzers_own_data() {
    let mem = Memory::new();
    let mut r = Rng::new(7);
    let (mut below_page, mut wraps, mut kernel, mut scratch, mut top_of_user) = (0, 0, 0, 0, 0);
    for _ in 0..20_000 {
        let p = mem.pointer(&mut r);
        if mem.in_scratch(p, 0) {
            scratch += 1;
            if (p + 4).is_multiple_of(PAGE) {
                below_page += 1;
            }
        }
        if p > u64::MAX - 16 {
            wraps += 1;
        }
        if (0xffff_8000_0000_0000..u64::MAX - 16).contains(&p) {
            kernel += 1;
        }
        if (USER_END - 16..USER_END).contains(&p) {
            top_of_user += 1;
        }
        // The fuzzer's stack, statics and image: never given (a random
        // 64-bit number lands there with odds of 2^-40 or less).
        let own = IMAGE_BASE..STACK_TOP;
        let stack_guard = STACK_TOP - STACK_SIZE - PAGE..STACK_TOP - STACK_SIZE;
        assert!(
            !own.contains(&p)
                || stack_guard.contains(&p)
                || (STARTUP_INFO..STARTUP_INFO + PAGE).contains(&p),
            "{p:#x} is in the fuzzer's own memory"
        );
    }
    for (what, n) in [
        ("just below a page", below_page),
        ("wrapping", wraps),
        ("kernel", kernel),
        ("scratch", scratch),
        ("end of user space", top_of_user),
    ] {
        assert!(n > 200, "{what}: only {n} of 20000");
    }
}

#[test]
fn readability_is_what_the_window_and_the_startup_page_give() {
    let m = Memory::new();
    assert!(m.readable(m.scratch, SCRATCH_PAGES * PAGE));
    assert!(!m.readable(m.scratch, SCRATCH_PAGES * PAGE + 1));
    assert!(!m.readable(m.scratch - 4, 8), "starts below the window");
    assert!(!m.readable(m.scratch_end() - 4, 8), "runs past the window");
    assert!(m.readable(m.scratch_end() - 4, 4));
    assert!(!m.readable(u64::MAX - 3, 8), "wraps");
    assert!(!m.readable(u64::MAX - 3, u64::MAX), "wraps far");
    assert!(m.readable(STARTUP_INFO + PAGE - 7, 7));
    assert!(!m.readable(STARTUP_INFO + PAGE - 7, 8));
    assert!(
        m.readable(0xffff_8000_0000_0000, 0),
        "zero bytes read from anywhere"
    );
    assert!(!m.readable(0x1000, 7));
}

#[test]
fn answer_places_say_truly_whether_they_can_be_read() {
    let m = Memory::new();
    let mut r = Rng::new(11);
    let (mut good, mut bad, mut across) = (0, 0, 0);
    for _ in 0..5000 {
        let len = r.pick(&[7u64, 39, 256]);
        let (va, readable) = m.answer_place(&mut r, len);
        assert_eq!(readable, m.readable(va, len), "{va:#x}+{len}");
        if readable {
            good += 1;
            if va / PAGE != (va + len - 1) / PAGE {
                across += 1;
            }
        } else {
            bad += 1;
        }
    }
    assert!(
        good > 1000 && bad > 1000 && across > 200,
        "{good} {bad} {across}"
    );
}

#[test]
fn receive_buffers_include_the_one_just_below_a_page() {
    let m = Memory::new();
    let mut r = Rng::new(3);
    let below = (0..2000)
        .map(|_| m.receive_place(&mut r, 80).0)
        .filter(|b| m.in_scratch(*b, 0) && (b + 4).is_multiple_of(PAGE))
        .count();
    assert!(below > 200, "{below}");
}

#[test]
fn random_calls_never_block_or_end_the_fuzzer() {
    let mut r = Rng::new(5);
    let numbers: BTreeSet<u64> = (0..50_000).map(|_| call_number(&mut r)).collect();
    for reserved in [nr::RECV, nr::REPLY_RECV, nr::WAIT, nr::EXIT] {
        assert!(!numbers.contains(&reserved), "{reserved} drawn");
    }
    assert!(numbers.contains(&nr::CALL) && numbers.contains(&nr::EPT_OPS));
    assert!(
        numbers.iter().any(|&n| n > 64),
        "numbers the kernel does not have"
    );
}

#[test]
fn a_receive_that_could_wait_for_ever_is_seen() {
    let r = Receivers {
        inbox: 0,
        note: 2,
        lifecycle: Some(5),
    };
    assert_eq!(r.receive(0, true, true), Receive::Refused);
    assert_eq!(
        r.receive(1 << 1, true, true),
        Receive::Refused,
        "the echo handle"
    );
    assert_eq!(r.receive(1 | 1 << 63, true, true), Receive::Refused);
    assert_eq!(r.receive(1, false, true), Receive::Returns);
    assert_eq!(
        r.receive(1, true, false),
        Receive::MayWait,
        "bits, not asked for"
    );
    assert_eq!(r.receive(1 << 2, true, false), Receive::Returns);
    assert_eq!(r.receive(1 << 2, false, true), Receive::MayWait);
    assert_eq!(
        r.receive(1 << 5, true, true),
        Receive::MayWait,
        "lifecycle only"
    );
    assert_eq!(r.receive(1 | 1 << 5, false, false), Receive::MayWait);
    let mut rng = Rng::new(9);
    let refused = (0..1000)
        .filter(|_| r.receive(r.mask(&mut rng), true, true) == Receive::Refused)
        .count();
    assert!((50..400).contains(&refused), "{refused}");
}

#[test]
fn the_tally_counts_each_status_and_the_unknown() {
    let mut t = Tally::default();
    for s in [0, 0, 5, 14, 15, 99, u64::MAX] {
        t.add(s);
    }
    assert_eq!((t.total(), t.done(), t.unknown()), (7, 2, 3));
    assert_eq!(t.by_status[5], 1);
}

#[test]
fn lengths_and_slots_reach_the_edges() {
    let mut r = Rng::new(1);
    let lens: BTreeSet<u64> = (0..20_000).map(|_| length(&mut r)).collect();
    for l in [
        0,
        255,
        256,
        257,
        4095,
        4096,
        4097,
        u64::MAX,
        u64::from(u32::MAX),
    ] {
        assert!(lens.contains(&l), "length {l}");
    }
    let slots: BTreeSet<u64> = (0..20_000).map(|_| handle_slot(&mut r, 6)).collect();
    for s in [0, 5, 6, 63, 64, u64::MAX] {
        assert!(slots.contains(&s), "slot {s}");
    }
}

#[test]
fn the_name_says_how_many_calls() {
    assert_eq!(calls_for("fuzz"), Some(100_000));
    assert_eq!(calls_for("fuzz-25000"), Some(25_000));
    assert_eq!(calls_for("fuzz-echo"), None);
    assert_eq!(calls_for("fuzz-client"), None);
    assert_eq!(calls_for("fuzz-"), None);
    assert_eq!(calls_for("fuzz-+5"), None);
    assert_eq!(calls_for("fuzz-99999999999999999999999"), None, "too large");
    assert_eq!(calls_for("probe"), None);
}
