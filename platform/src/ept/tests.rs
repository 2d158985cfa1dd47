use super::*;
use proptest::prelude::*;
use std::boxed::Box;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;
const WB: MemoryType = MemoryType::WRITE_BACK;
const UC: MemoryType = MemoryType::UNCACHEABLE;
use PageSize::{Size1G, Size2M, Size4K};

/// Fake physical addresses of tables start here, far from the test frames.
const FAKE_BASE: u64 = 0x8000_0000_0000;

/// Tables as boxed arrays at made-up addresses. Freed addresses are never
/// handed out again, so a use after free or a double free panics instead of
/// aliasing a newer table.
#[derive(Default)]
struct FakeMemory {
    tables: Vec<Option<Box<[u64; ENTRIES]>>>,
    live: usize,
    /// At most this many live tables.
    limit: Option<usize>,
    /// Calls to `entries` and `entries_mut`: the work of a walk.
    touches: Cell<usize>,
}

impl FakeMemory {
    fn limited(limit: usize) -> Self {
        Self {
            limit: Some(limit),
            ..Self::default()
        }
    }

    fn index(table: u64) -> usize {
        assert_eq!(table % K4, 0, "table {table:#x} not aligned");
        ((table - FAKE_BASE) / K4) as usize
    }
}

impl TableMemory for FakeMemory {
    fn alloc_table(&mut self) -> Option<u64> {
        if self.limit.is_some_and(|l| self.live >= l) {
            return None;
        }
        // Garbage, as a frame fresh from an allocator may hold: Ept must fill it.
        self.tables
            .push(Some(Box::new([0x7ff0_0000_0000_00ff; ENTRIES])));
        self.live += 1;
        Some(FAKE_BASE + (self.tables.len() as u64 - 1) * K4)
    }

    fn free_table(&mut self, table: u64) {
        let slot = &mut self.tables[Self::index(table)];
        assert!(slot.is_some(), "double free of {table:#x}");
        *slot = None;
        self.live -= 1;
    }

    fn entries(&self, table: u64) -> &[u64; ENTRIES] {
        self.touches.set(self.touches.get() + 1);
        self.tables[Self::index(table)]
            .as_deref()
            .unwrap_or_else(|| panic!("read of freed table {table:#x}"))
    }

    fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES] {
        self.touches.set(self.touches.get() + 1);
        self.tables[Self::index(table)]
            .as_deref_mut()
            .unwrap_or_else(|| panic!("write to freed table {table:#x}"))
    }
}

/// Walks the tables with its own reading of the format: counts the tables
/// reachable from the root and checks that none but the root is all empty.
fn reachable_tables(mem: &FakeMemory, table: u64, level: u8) -> usize {
    let entries = mem.entries(table);
    if level < 4 {
        assert!(
            entries.iter().any(|&e| e != bits::EMPTY),
            "table {table:#x} at level {level} holds nothing but was kept"
        );
    }
    let mut n = 1;
    for &e in entries {
        let is_table = level > 1 && e & 7 != 0 && e & (1 << 7) == 0;
        if is_table {
            assert_eq!(e & !bits::ADDRESS, 7, "non-leaf entry {e:#x}");
            n += reachable_tables(mem, e & bits::ADDRESS, level - 1);
        }
    }
    n
}

fn setup() -> (FakeMemory, Ept) {
    let mut mem = FakeMemory::default();
    let ept = Ept::new(&mut mem).unwrap();
    (mem, ept)
}

#[test]
fn a_new_ept_is_one_table_of_empty_entries() {
    let (mut mem, ept) = setup();
    assert_eq!(mem.live, 1);
    assert!(mem.entries(ept.root()).iter().all(|&e| e == 1 << 63));
    assert_eq!(ept.query(&mem, 0), None);
    assert_eq!(
        ept.raw_entry(&mem, 0x1234_5000),
        Ok(RawEntry {
            level: 4,
            table: ept.root(),
            slot: 0,
            value: 1 << 63
        })
    );
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn eptp_bit_layout() {
    let ept = Ept { root: 0x123_4000 };
    assert_eq!(ept.eptp(true), 0x123_405e);
    assert_eq!(ept.eptp(false), 0x123_401e);
}

#[test]
fn map_query_translate_each_size() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 0x5000, 0x9_9000, Size4K, Perms::READ_WRITE, WB)
        .unwrap();
    ept.map(
        &mut mem,
        4 * M2,
        0x4000_0000,
        Size2M,
        Perms::READ_EXECUTE,
        UC,
    )
    .unwrap();
    ept.map(&mut mem, 3 * G1, 7 * G1, Size1G, Perms::ALL, WB)
        .unwrap();

    let m = ept.query(&mem, 0x5abc).unwrap();
    assert_eq!(
        m,
        Mapping {
            gpa: 0x5000,
            hpa: 0x9_9000,
            size: Size4K,
            perms: Perms::READ_WRITE,
            memory_type: WB,
            accessed: false,
            dirty: false,
            suppress_ve: true,
        }
    );
    assert_eq!(ept.translate(&mem, 0x5abc), Some(0x9_9abc));
    assert_eq!(ept.query(&mem, 0x6000), None);
    assert_eq!(ept.query(&mem, 0x4fff), None);

    let m = ept.query(&mem, 4 * M2 + 0x12_3456).unwrap();
    assert_eq!((m.gpa, m.hpa, m.size), (4 * M2, 0x4000_0000, Size2M));
    assert_eq!((m.perms, m.memory_type), (Perms::READ_EXECUTE, UC));
    assert_eq!(ept.translate(&mem, 4 * M2 + 0x12_3456), Some(0x4012_3456));
    assert_eq!(ept.translate(&mem, 5 * M2), None);

    let m = ept.query(&mem, 3 * G1 + 0x3fff_ffff).unwrap();
    assert_eq!((m.gpa, m.hpa, m.size), (3 * G1, 7 * G1, Size1G));
    assert_eq!(ept.translate(&mem, 3 * G1 + 0x3fff_ffff), Some(8 * G1 - 1));

    // The raw entries, bit by bit.
    let raw = ept.raw_entry(&mem, 0x5000).unwrap();
    assert_eq!(raw.level, 1);
    assert_eq!(raw.value, 0x9_9000 | 0b011 | 6 << 3 | 1 << 52 | 1 << 63);
    let raw = ept.raw_entry(&mem, 4 * M2).unwrap();
    assert_eq!(raw.level, 2);
    assert_eq!(raw.value, 0x4000_0000 | 0b101 | 1 << 7 | 1 << 52 | 1 << 63);
    let raw = ept.raw_entry(&mem, 3 * G1).unwrap();
    assert_eq!(raw.level, 3);
    assert_eq!(
        raw.value,
        (7 * G1) | 0b111 | 6 << 3 | 1 << 7 | 1 << 52 | 1 << 63
    );
    // Non-leaf entries: all rights, nothing else.
    let pml4e = mem.entries(ept.root())[0];
    assert_eq!(pml4e & !bits::ADDRESS, 7);

    // root, PDPT, the PD for 0..1G holding a PT and a 2M leaf, the PT.
    assert_eq!(mem.live, 4);
    assert_eq!(reachable_tables(&mem, ept.root(), 4), 4);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn refuses_misaligned_out_of_range_and_write_only() {
    let (mut mem, mut ept) = setup();
    assert_eq!(
        ept.map(&mut mem, 0x1800, 0x2000, Size4K, Perms::READ, WB),
        Err(EptError::Misaligned {
            gpa: 0x1800,
            hpa: 0x2000,
            size: Size4K
        })
    );
    assert_eq!(
        ept.map(&mut mem, M2, 0x1000, Size2M, Perms::READ, WB),
        Err(EptError::Misaligned {
            gpa: M2,
            hpa: 0x1000,
            size: Size2M
        })
    );
    assert_eq!(
        ept.map(&mut mem, M2, 0, Size1G, Perms::READ, WB),
        Err(EptError::Misaligned {
            gpa: M2,
            hpa: 0,
            size: Size1G
        })
    );
    assert_eq!(
        ept.map(&mut mem, 1 << 48, 0, Size4K, Perms::READ, WB),
        Err(EptError::OutOfRange { gpa: 1 << 48 })
    );
    assert_eq!(
        ept.map(&mut mem, 0, 1 << 52, Size4K, Perms::READ, WB),
        Err(EptError::HpaOutOfRange { hpa: 1 << 52 })
    );
    assert_eq!(
        ept.map(&mut mem, 0, !(G1 - 1), Size1G, Perms::READ, WB),
        Err(EptError::HpaOutOfRange { hpa: !(G1 - 1) })
    );
    let write_only = Perms::new(false, true, false);
    assert_eq!(
        ept.map(&mut mem, 0, 0, Size4K, write_only, WB),
        Err(EptError::WriteWithoutRead { gpa: 0 })
    );
    // The highest page there is works.
    let top = (1 << 48) - K4;
    ept.map(&mut mem, top, (1 << 52) - K4, Size4K, Perms::READ, WB)
        .unwrap();
    assert_eq!(ept.translate(&mem, (1 << 48) - 1), Some((1 << 52) - 1));
    // Nothing else was built for the refusals.
    assert_eq!(mem.live, 4);

    // Every operation answers out-of-range addresses with an error.
    for gpa in [1 << 48, u64::MAX] {
        let e = Some(EptError::OutOfRange { gpa });
        assert_eq!(ept.query(&mem, gpa), None);
        assert_eq!(ept.translate(&mem, gpa), None);
        assert_eq!(ept.raw_entry(&mem, gpa).err(), e);
        assert_eq!(ept.unmap(&mut mem, gpa).err(), e);
        assert_eq!(ept.protect(&mut mem, gpa, Perms::ALL).err(), e);
        assert_eq!(ept.set_suppress_ve(&mut mem, gpa, false).err(), e);
        assert_eq!(ept.split(&mut mem, gpa).err(), e);
    }
    let mut seen = 0;
    ept.for_each_leaf(&mem, u64::MAX - 5, u64::MAX, |_| seen += 1);
    ept.for_each_leaf(&mem, 5, 1, |_| seen += 1);
    ept.take_accessed_dirty(&mut mem, 0, u64::MAX, |_, _, _, _| seen += 1);
    assert_eq!(seen, 0);
    assert_eq!(ept.split_to_4k(&mut mem, u64::MAX - 1, u64::MAX), Ok(()));
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn memory_types_are_the_five_ept_allows() {
    let valid: Vec<u8> = (0..=255)
        .filter(|&b| MemoryType::new(b).is_some())
        .collect();
    assert_eq!(valid, [0, 1, 4, 5, 6]);
    assert_eq!(MemoryType::new(6), Some(MemoryType::WRITE_BACK));
}

#[test]
fn never_overwrites_a_mapping() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, M2 + 3 * K4, 0x1000, Size4K, Perms::ALL, WB)
        .unwrap();
    ept.map(&mut mem, 4 * M2, 0, Size2M, Perms::ALL, WB)
        .unwrap();
    ept.map(&mut mem, G1, 0, Size1G, Perms::ALL, WB).unwrap();
    let live = mem.live;

    // The same 4K slot.
    assert_eq!(
        ept.map(&mut mem, M2 + 3 * K4, 0x5000, Size4K, Perms::ALL, WB),
        Err(EptError::AlreadyMapped {
            gpa: M2 + 3 * K4,
            existing: M2 + 3 * K4,
            size: Size4K
        })
    );
    // A 2M page over an existing 4K page.
    assert_eq!(
        ept.map(&mut mem, M2, 0, Size2M, Perms::ALL, WB),
        Err(EptError::AlreadyMapped {
            gpa: M2,
            existing: M2 + 3 * K4,
            size: Size4K
        })
    );
    // A 4K page inside an existing 2M page.
    assert_eq!(
        ept.map(&mut mem, 4 * M2 + 7 * K4, 0, Size4K, Perms::ALL, WB),
        Err(EptError::AlreadyMapped {
            gpa: 4 * M2 + 7 * K4,
            existing: 4 * M2,
            size: Size2M
        })
    );
    // A 1G page over both, and 2M and 4K pages inside a 1G page.
    assert_eq!(
        ept.map(&mut mem, 0, 0, Size1G, Perms::ALL, WB),
        Err(EptError::AlreadyMapped {
            gpa: 0,
            existing: M2 + 3 * K4,
            size: Size4K
        })
    );
    assert_eq!(
        ept.map(&mut mem, G1 + M2, 0, Size2M, Perms::ALL, WB),
        Err(EptError::AlreadyMapped {
            gpa: G1 + M2,
            existing: G1,
            size: Size1G
        })
    );
    assert_eq!(
        ept.map(&mut mem, G1 + M2 + K4, 0, Size4K, Perms::ALL, WB),
        Err(EptError::AlreadyMapped {
            gpa: G1 + M2 + K4,
            existing: G1,
            size: Size1G
        })
    );
    // Nothing changed, nothing was built.
    assert_eq!(mem.live, live);
    assert_eq!(ept.translate(&mem, M2 + 3 * K4), Some(0x1000));
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn unmap_returns_the_page_and_leaves_an_empty_entry() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 0x7000, 0xa000, Size4K, Perms::READ, UC)
        .unwrap();
    ept.map(&mut mem, 0x8000, 0xb000, Size4K, Perms::READ, WB)
        .unwrap();
    assert_eq!(mem.live, 4);

    let old = ept.unmap(&mut mem, 0x7123).unwrap();
    assert_eq!((old.gpa, old.hpa, old.size), (0x7000, 0xa000, Size4K));
    assert_eq!((old.perms, old.memory_type), (Perms::READ, UC));
    let raw = ept.raw_entry(&mem, 0x7000).unwrap();
    assert_eq!((raw.level, raw.value), (1, 1 << 63));
    assert_eq!(ept.query(&mem, 0x7000), None);
    assert_eq!(ept.translate(&mem, 0x8000), Some(0xb000));
    assert_eq!(
        ept.unmap(&mut mem, 0x7000),
        Err(EptError::NotMapped { gpa: 0x7000 })
    );
    assert_eq!(mem.live, 4, "the PT still holds 0x8000");

    // The last page goes: the tables that held only it go too.
    ept.unmap(&mut mem, 0x8000).unwrap();
    assert_eq!(mem.live, 1);
    assert!(mem.entries(ept.root()).iter().all(|&e| e == 1 << 63));

    // A large page, unmapped through any address inside it.
    ept.map(&mut mem, 2 * G1, 0, Size1G, Perms::ALL, WB)
        .unwrap();
    let old = ept.unmap(&mut mem, 2 * G1 + 0x1234_5678).unwrap();
    assert_eq!((old.gpa, old.size), (2 * G1, Size1G));
    assert_eq!(ept.raw_entry(&mem, 2 * G1).unwrap().value, 1 << 63);
    assert_eq!(mem.live, 1);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn protect_changes_rights_only_and_no_access_keeps_the_frame() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, M2, 0x60_0000, Size2M, Perms::ALL, UC)
        .unwrap();
    let old = ept.protect(&mut mem, M2 + 0x5000, Perms::READ).unwrap();
    assert_eq!(old.perms, Perms::ALL);
    let m = ept.query(&mem, M2 + 0x1f_f000).unwrap();
    assert_eq!((m.gpa, m.hpa, m.size), (M2, 0x60_0000, Size2M));
    assert_eq!(
        (m.perms, m.memory_type, m.suppress_ve),
        (Perms::READ, UC, true)
    );

    // No access: the CPU sees a not-present entry, the frame stays.
    ept.protect(&mut mem, M2, Perms::NONE).unwrap();
    let m = ept.query(&mem, M2 + 0x1234).unwrap();
    assert_eq!((m.gpa, m.hpa, m.perms), (M2, 0x60_0000, Perms::NONE));
    assert_eq!(ept.translate(&mem, M2 + 0x1234), None);
    let raw = ept.raw_entry(&mem, M2).unwrap();
    assert_eq!(raw.value & 7, 0, "not present to the CPU");
    assert_eq!(raw.value & bits::MAPPED, bits::MAPPED);
    assert_eq!(raw.value & bits::ADDRESS, 0x60_0000);
    // It is still a mapping: not mapped over, and access comes back.
    assert!(matches!(
        ept.map(&mut mem, M2, 0, Size2M, Perms::ALL, WB),
        Err(EptError::AlreadyMapped { .. })
    ));
    ept.protect(&mut mem, M2, Perms::READ_EXECUTE).unwrap();
    assert_eq!(ept.translate(&mem, M2 + 0x1234), Some(0x60_1234));

    assert_eq!(
        ept.protect(&mut mem, M2, Perms::new(false, true, true)),
        Err(EptError::WriteWithoutRead { gpa: M2 })
    );
    assert_eq!(
        ept.protect(&mut mem, 0, Perms::ALL),
        Err(EptError::NotMapped { gpa: 0 })
    );
    // A no-access page can be unmapped, and returns its frame.
    ept.protect(&mut mem, M2, Perms::NONE).unwrap();
    assert_eq!(ept.unmap(&mut mem, M2).unwrap().hpa, 0x60_0000);
    assert_eq!(ept.query(&mem, M2), None);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn replace_points_a_4k_leaf_at_another_frame_in_place() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, M2, 0x60_0000, Size2M, Perms::ALL, UC)
        .unwrap();
    // A large leaf is refused: it must be split first.
    assert!(matches!(
        ept.replace(&mut mem, M2, 0x9000, Perms::READ),
        Err(EptError::Misaligned { .. })
    ));
    ept.split(&mut mem, M2).unwrap();
    ept.set_dirty(&mut mem, M2 + 0x3000).unwrap();
    ept.set_suppress_ve(&mut mem, M2 + 0x3000, false).unwrap();
    let tables = mem.live;
    let old = ept
        .replace(&mut mem, M2 + 0x3000, 0x9000, Perms::READ_EXECUTE)
        .unwrap();
    assert_eq!(
        (old.hpa, old.perms, old.dirty),
        (0x60_3000, Perms::ALL, true)
    );
    assert_eq!(mem.live, tables, "no table allocated or freed");
    let m = ept.query(&mem, M2 + 0x3000).unwrap();
    assert_eq!(
        (
            m.hpa,
            m.size,
            m.perms,
            m.memory_type,
            m.suppress_ve,
            m.dirty
        ),
        (0x9000, Size4K, Perms::READ_EXECUTE, UC, false, false)
    );
    // Its neighbours are untouched.
    assert_eq!(ept.translate(&mem, M2 + 0x4000), Some(0x60_4000));
    assert_eq!(
        ept.replace(&mut mem, 0, 0x9000, Perms::READ),
        Err(EptError::NotMapped { gpa: 0 })
    );
    assert_eq!(
        ept.replace(&mut mem, M2, 0x9001, Perms::READ),
        Err(EptError::HpaOutOfRange { hpa: 0x9001 })
    );
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn split_keeps_every_translation_and_attribute() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, G1, 5 * G1, Size1G, Perms::READ_EXECUTE, UC)
        .unwrap();
    ept.set_suppress_ve(&mut mem, G1, false).unwrap();
    // As if the CPU had used and written it.
    let raw = ept.raw_entry(&mem, G1).unwrap();
    mem.entries_mut(raw.table)[raw.slot] |= bits::ACCESSED | bits::DIRTY;
    let before = ept.query(&mem, G1).unwrap();

    ept.split(&mut mem, G1 + 0x1234).unwrap();
    assert_eq!(mem.live, 3);
    for i in 0..512 {
        let m = ept.query(&mem, G1 + i * M2 + 0x777).unwrap();
        assert_eq!(
            m,
            Mapping {
                gpa: G1 + i * M2,
                hpa: 5 * G1 + i * M2,
                size: Size2M,
                ..before
            }
        );
    }
    ept.split(&mut mem, G1 + 3 * M2).unwrap();
    for i in 0..512 {
        let gpa = G1 + 3 * M2 + i * K4;
        let m = ept.query(&mem, gpa).unwrap();
        assert_eq!(
            m,
            Mapping {
                gpa,
                hpa: 5 * G1 + 3 * M2 + i * K4,
                size: Size4K,
                ..before
            }
        );
        // 4K leaves carry no page-size bit.
        let raw = ept.raw_entry(&mem, gpa).unwrap();
        assert_eq!((raw.level, raw.value & (1 << 7)), (1, 0));
    }
    assert_eq!(
        ept.split(&mut mem, G1 + 3 * M2),
        Err(EptError::NotLarge { gpa: G1 + 3 * M2 })
    );
    assert_eq!(ept.split(&mut mem, 0), Err(EptError::NotMapped { gpa: 0 }));
    assert_eq!(
        ept.translate(&mem, G1 + 3 * M2 + 0x4321),
        Some(5 * G1 + 3 * M2 + 0x4321)
    );

    // Unmapping every 4K page frees their table.
    for i in 0..512 {
        ept.unmap(&mut mem, G1 + 3 * M2 + i * K4).unwrap();
    }
    assert_eq!(mem.live, 3);
    assert_eq!(reachable_tables(&mem, ept.root(), 4), 3);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn split_to_4k_splits_what_overlaps_the_range() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 0, 0, Size1G, Perms::ALL, WB).unwrap();
    ept.map(&mut mem, G1, G1, Size2M, Perms::ALL, WB).unwrap();
    ept.map(&mut mem, G1 + M2, G1 + M2, Size2M, Perms::ALL, WB)
        .unwrap();
    ept.split_to_4k(&mut mem, G1 - K4, G1 + 1).unwrap();
    let size = |gpa| ept.query(&mem, gpa).unwrap().size;
    assert_eq!(size(G1 - K4), Size4K);
    assert_eq!(size(G1 - M2 - K4), Size2M, "split from 1G, not below");
    assert_eq!(size(0), Size2M);
    assert_eq!(size(G1), Size4K);
    assert_eq!(size(G1 + M2), Size2M);
    // An empty range overlaps nothing (found by the model test).
    ept.split_to_4k(&mut mem, G1 + M2 + K4, G1 + M2 + K4)
        .unwrap();
    assert_eq!(ept.query(&mem, G1 + M2).unwrap().size, Size2M);
    for gpa in (0..G1 + 2 * M2).step_by(0x3_3000) {
        assert_eq!(ept.translate(&mem, gpa), Some(gpa));
    }
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn suppress_ve_on_an_unmapped_page_builds_the_path() {
    let (mut mem, mut ept) = setup();
    let gpa = 3 * G1 + 5 * M2 + 9 * K4;
    // Already suppressed: nothing to build.
    ept.set_suppress_ve(&mut mem, gpa, true).unwrap();
    assert_eq!(mem.live, 1);

    ept.set_suppress_ve(&mut mem, gpa + 0x10, false).unwrap();
    assert_eq!(mem.live, 4);
    let raw = ept.raw_entry(&mem, gpa).unwrap();
    assert_eq!((raw.level, raw.value), (1, 0), "empty, #VE not suppressed");
    assert_eq!(ept.query(&mem, gpa), None);
    assert_eq!(ept.translate(&mem, gpa), None);
    assert_eq!(ept.unmap(&mut mem, gpa), Err(EptError::NotMapped { gpa }));
    // The neighbours stay suppressed.
    assert_eq!(ept.raw_entry(&mem, gpa + K4).unwrap().value, 1 << 63);
    // Idempotent.
    ept.set_suppress_ve(&mut mem, gpa, false).unwrap();
    assert_eq!(mem.live, 4);

    // Back to suppressed: the tables hold nothing and go.
    ept.set_suppress_ve(&mut mem, gpa, true).unwrap();
    assert_eq!(mem.live, 1);
    assert_eq!(ept.raw_entry(&mem, gpa).unwrap().level, 4);

    // Mapping into a slot with #VE allowed gives a leaf that suppresses it.
    ept.set_suppress_ve(&mut mem, gpa, false).unwrap();
    ept.map(&mut mem, gpa, 0x1000, Size4K, Perms::READ, WB)
        .unwrap();
    assert!(ept.query(&mem, gpa).unwrap().suppress_ve);
    ept.set_suppress_ve(&mut mem, gpa, false).unwrap();
    assert!(!ept.query(&mem, gpa).unwrap().suppress_ve);
    // Unmapping writes EMPTY, suppress-#VE set, whatever the leaf had.
    ept.unmap(&mut mem, gpa).unwrap();
    assert_eq!(mem.live, 1);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn suppress_ve_on_a_large_page_covers_all_of_it() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 0, 0, Size2M, Perms::ALL, WB).unwrap();
    ept.set_suppress_ve(&mut mem, 0x1f_f000, false).unwrap();
    assert!(!ept.query(&mem, 0).unwrap().suppress_ve);
    assert_eq!(ept.raw_entry(&mem, 0).unwrap().value >> 63, 0);
    assert_eq!(mem.live, 3, "no PT built under a 2M leaf");
    ept.destroy(&mut mem);
}

#[test]
fn a_large_page_replaces_tables_that_map_nothing() {
    let (mut mem, mut ept) = setup();
    ept.set_suppress_ve(&mut mem, M2 + K4, false).unwrap();
    assert_eq!(mem.live, 4);
    ept.map(&mut mem, M2, 0, Size2M, Perms::ALL, WB).unwrap();
    assert_eq!(mem.live, 3, "the PT went");
    assert_eq!(ept.query(&mem, M2 + K4).unwrap().size, Size2M);
    assert_eq!(reachable_tables(&mem, ept.root(), 4), 3);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn out_of_memory_changes_nothing() {
    // Room for the root and two more tables: a 4K page needs three.
    let mut mem = FakeMemory::limited(3);
    let mut ept = Ept::new(&mut mem).unwrap();
    assert_eq!(
        ept.map(&mut mem, 0, 0, Size4K, Perms::ALL, WB),
        Err(EptError::OutOfMemory)
    );
    assert_eq!(mem.live, 1);
    assert!(mem.entries(ept.root()).iter().all(|&e| e == 1 << 63));
    assert_eq!(
        ept.set_suppress_ve(&mut mem, 0, false),
        Err(EptError::OutOfMemory)
    );
    assert_eq!(mem.live, 1);
    ept.map(&mut mem, 0, 0, Size2M, Perms::ALL, WB).unwrap();
    assert_eq!(ept.split(&mut mem, 0), Err(EptError::OutOfMemory));
    assert_eq!(ept.query(&mem, 0).unwrap().size, Size2M);
    assert_eq!(ept.split_to_4k(&mut mem, 0, M2), Err(EptError::OutOfMemory));
    assert_eq!(mem.live, 3);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
    assert_eq!(
        Ept::new(&mut FakeMemory::limited(0)),
        Err(EptError::OutOfMemory)
    );
}

#[test]
fn take_accessed_dirty_reads_clears_and_reports_each_leaf_once() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 0, 0, Size2M, Perms::ALL, WB).unwrap();
    ept.map(&mut mem, M2, M2, Size4K, Perms::ALL, WB).unwrap();
    ept.map(&mut mem, M2 + K4, M2 + K4, Size4K, Perms::ALL, WB)
        .unwrap();
    ept.map(&mut mem, M2 + 2 * K4, M2 + 2 * K4, Size4K, Perms::ALL, WB)
        .unwrap();
    ept.map(&mut mem, G1, G1, Size1G, Perms::ALL, WB).unwrap();
    // The CPU's part: accessed on some, dirty on some.
    fn touch(ept: &Ept, mem: &mut FakeMemory, gpa: u64, bits: u64) {
        let raw = ept.raw_entry(mem, gpa).unwrap();
        mem.entries_mut(raw.table)[raw.slot] |= bits;
    }
    touch(&ept, &mut mem, 0x1234, bits::ACCESSED);
    touch(&ept, &mut mem, M2, bits::ACCESSED | bits::DIRTY);
    touch(&ept, &mut mem, M2 + 2 * K4, bits::DIRTY);
    touch(&ept, &mut mem, G1 + 5 * M2, bits::ACCESSED | bits::DIRTY);

    let mut seen = Vec::new();
    ept.take_accessed_dirty(&mut mem, 0, 1 << 48, |gpa, size, a, d| {
        seen.push((gpa, size, a, d))
    });
    assert_eq!(
        seen,
        [
            (0, Size2M, true, false),
            (M2, Size4K, true, true),
            (M2 + 2 * K4, Size4K, false, true),
            (G1, Size1G, true, true),
        ]
    );
    // Cleared: a second pass finds nothing, and the leaves are otherwise the same.
    let mut again = 0;
    ept.take_accessed_dirty(&mut mem, 0, 1 << 48, |_, _, _, _| again += 1);
    assert_eq!(again, 0);
    let m = ept.query(&mem, M2).unwrap();
    assert_eq!(
        (m.accessed, m.dirty, m.perms, m.hpa),
        (false, false, Perms::ALL, M2)
    );

    // A range reports the leaves that overlap it, whole.
    touch(&ept, &mut mem, 0, bits::DIRTY);
    touch(&ept, &mut mem, M2, bits::DIRTY);
    touch(&ept, &mut mem, M2 + K4, bits::DIRTY);
    let mut seen = Vec::new();
    ept.take_accessed_dirty(&mut mem, M2 - 1, M2 + K4, |gpa, size, a, d| {
        seen.push((gpa, size, a, d))
    });
    assert_eq!(seen, [(0, Size2M, false, true), (M2, Size4K, false, true)]);
    assert!(ept.query(&mem, M2 + K4).unwrap().dirty, "outside the range");
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

#[test]
fn range_walks_do_work_in_proportion_to_the_leaves() {
    let (mut mem, mut ept) = setup();
    for i in 0..512 {
        ept.map(&mut mem, 4 * G1 + i * M2, i * M2, Size2M, Perms::ALL, WB)
            .unwrap();
    }
    for i in (0..512).step_by(3) {
        let raw = ept.raw_entry(&mem, 4 * G1 + i * M2).unwrap();
        mem.entries_mut(raw.table)[raw.slot] |= bits::DIRTY;
    }

    mem.touches.set(0);
    let mut leaves = Vec::new();
    ept.for_each_leaf(&mem, 0, 1 << 48, |m| leaves.push(m.gpa));
    assert_eq!(leaves.len(), 512);
    assert!(leaves.windows(2).all(|w| w[0] + M2 == w[1]));
    let touched = mem.touches.get();
    assert!(touched <= 512 + 2, "{touched} table reads for 512 leaves");

    mem.touches.set(0);
    let mut dirty = 0;
    ept.take_accessed_dirty(&mut mem, 4 * G1, 5 * G1, |_, _, _, d| dirty += d as usize);
    assert_eq!(dirty, 171);
    let touched = mem.touches.get();
    assert!(
        touched <= 512 + 171 + 2,
        "{touched} table reads for 512 leaves"
    );

    // The whole address space, nearly empty: a handful of reads.
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 200 * G1 + 0x7000, 0, Size4K, Perms::ALL, WB)
        .unwrap();
    mem.touches.set(0);
    let mut n = 0;
    ept.for_each_leaf(&mem, 0, u64::MAX, |_| n += 1);
    assert_eq!(n, 1);
    assert!(mem.touches.get() <= 512 * 4);
}

#[test]
fn for_each_leaf_gives_leaves_overlapping_the_range_in_order() {
    let (mut mem, mut ept) = setup();
    ept.map(&mut mem, 0x3000, 0x13000, Size4K, Perms::READ, WB)
        .unwrap();
    ept.map(&mut mem, M2, 0, Size2M, Perms::NONE, UC).unwrap();
    ept.map(&mut mem, 2 * G1, 0, Size1G, Perms::ALL, WB)
        .unwrap();
    let mut got = Vec::new();
    ept.for_each_leaf(&mem, 0x3fff, 2 * G1 + 1, |m| {
        got.push((m.gpa, m.size, m.perms))
    });
    assert_eq!(
        got,
        [
            (0x3000, Size4K, Perms::READ),
            (M2, Size2M, Perms::NONE),
            (2 * G1, Size1G, Perms::ALL),
        ]
    );
    let mut got = Vec::new();
    ept.for_each_leaf(&mem, 0x4000, M2, |m| got.push(m.gpa));
    assert!(got.is_empty());
    ept.destroy(&mut mem);
}

#[test]
fn a_batch_applies_each_op_on_its_own() {
    let (mut mem, mut ept) = setup();
    let ops = [
        EptOp::Map {
            gpa: 0,
            hpa: 0x20_0000,
            size: Size2M,
            perms: Perms::ALL,
            memory_type: WB,
        },
        EptOp::Map {
            gpa: 0x1000,
            hpa: 0,
            size: Size4K,
            perms: Perms::ALL,
            memory_type: WB,
        },
        EptOp::Split { gpa: 0 },
        EptOp::Protect {
            gpa: 0x1000,
            perms: Perms::READ,
        },
        EptOp::Unmap { gpa: 0x2000 },
        EptOp::SetSuppressVe {
            gpa: 0x3000,
            suppress: false,
        },
        EptOp::Unmap { gpa: 0x2000 },
    ];
    let mut results = [Ok(()); 7];
    assert_eq!(ept.apply_batch(&mut mem, &ops, &mut results), 7);
    assert_eq!(
        results,
        [
            Ok(()),
            Err(EptError::AlreadyMapped {
                gpa: 0x1000,
                existing: 0,
                size: Size2M
            }),
            Ok(()),
            Ok(()),
            Ok(()),
            Ok(()),
            Err(EptError::NotMapped { gpa: 0x2000 }),
        ]
    );
    assert_eq!(ept.query(&mem, 0x1000).unwrap().perms, Perms::READ);
    assert_eq!(ept.query(&mem, 0x2000), None);
    assert!(!ept.query(&mem, 0x3000).unwrap().suppress_ve);
    // Shorter results: only that many are applied.
    let mut one = [Ok(())];
    assert_eq!(ept.apply_batch(&mut mem, &ops[4..], &mut one), 1);
    assert_eq!(one, [Err(EptError::NotMapped { gpa: 0x2000 })]);
    assert!(!ept.query(&mem, 0x3000).unwrap().suppress_ve);
    ept.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

// ---- against a model ----

/// The window the property test works in: 16 MiB, 4096 frames.
const WINDOW: u64 = 16 << 20;
const FRAMES: u64 = WINDOW / K4;

/// What the model knows about one mapped 4K frame of the guest.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Frame {
    hfn: u64,
    perms: Perms,
    memory_type: MemoryType,
    sve: bool,
    accessed: bool,
    dirty: bool,
    /// The leaf it belongs to: first frame and size.
    leaf: u64,
    size: PageSize,
}

#[derive(Default)]
struct Model {
    frames: BTreeMap<u64, Frame>,
    /// Unmapped frames whose empty entry has suppress-#VE cleared.
    ve_allowed: BTreeSet<u64>,
}

impl Model {
    /// The frames of the leaf holding `gfn`.
    fn leaf_of(&self, gfn: u64) -> Option<core::ops::Range<u64>> {
        let f = self.frames.get(&gfn)?;
        Some(f.leaf..f.leaf + f.size.bytes() / K4)
    }

    fn update_leaf(&mut self, gfn: u64, mut change: impl FnMut(u64, &mut Frame)) {
        if let Some(range) = self.leaf_of(gfn) {
            for g in range {
                if let Some(f) = self.frames.get_mut(&g) {
                    change(g, f);
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        gfn: u64,
        hfn: u64,
        size: PageSize,
        perms: Perms,
        memory_type: MemoryType,
    },
    Unmap(u64),
    Protect(u64, Perms),
    Split(u64),
    SplitTo4k(u64, u64),
    SetSve(u64, bool),
    /// The CPU sets accessed (and dirty) on the leaf holding the frame.
    Touch(u64, bool),
    TakeAccessedDirty(u64, u64),
}

/// Frames clustered in two 2 MiB regions and at their ends, so ops meet
/// each other (the same frame, a 4K page and a 2M page over it).
fn gfn() -> impl Strategy<Value = u64> {
    (
        prop_oneof![3 => 0..2u64, 1 => 0..FRAMES / 512],
        prop_oneof![3 => 0u64..3, 3 => 509u64..512, 1 => 0u64..512],
    )
        .prop_map(|(region, offset)| region * 512 + offset)
}

fn perms() -> impl Strategy<Value = Perms> {
    (0u64..8).prop_map(Perms::from_bits)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (gfn(), 0u64..1 << 20, any::<bool>(), perms(), any::<bool>()).prop_map(
            |(gfn, hfn, large, perms, wb)| {
                let (size, align) = if large { (Size2M, 512) } else { (Size4K, 1) };
                Op::Map {
                    gfn: gfn / align * align,
                    hfn: hfn / align * align,
                    size,
                    perms,
                    memory_type: if wb { WB } else { UC },
                }
            }
        ),
        2 => gfn().prop_map(Op::Unmap),
        2 => (gfn(), perms()).prop_map(|(g, p)| Op::Protect(g, p)),
        2 => gfn().prop_map(Op::Split),
        1 => (gfn(), 0u64..1200).prop_map(|(g, n)| Op::SplitTo4k(g, g + n)),
        // A few frames often, so a slot's #VE setting is cleared and set back.
        3 => (prop_oneof![0u64..3, gfn()], any::<bool>()).prop_map(|(g, s)| Op::SetSve(g, s)),
        1 => (gfn(), any::<bool>()).prop_map(|(g, w)| Op::Touch(g, w)),
        1 => (gfn(), 0u64..2000).prop_map(|(g, n)| Op::TakeAccessedDirty(g, g + n)),
    ]
}

/// Every frame of the window, through query, translate and raw_entry, and
/// the leaves through for_each_leaf, against the model; and the tables kept
/// are exactly the ones reachable, none of them holding nothing.
fn check(ept: &Ept, mem: &FakeMemory, model: &Model) -> Result<(), TestCaseError> {
    for gfn in 0..FRAMES {
        let gpa = gfn * K4;
        let off = (gfn * 0x111) % K4;
        let raw = ept.raw_entry(mem, gpa).unwrap();
        match model.frames.get(&gfn) {
            Some(f) => {
                let want = Mapping {
                    gpa: f.leaf * K4,
                    hpa: (f.hfn - (gfn - f.leaf)) * K4,
                    size: f.size,
                    perms: f.perms,
                    memory_type: f.memory_type,
                    accessed: f.accessed,
                    dirty: f.dirty,
                    suppress_ve: f.sve,
                };
                prop_assert_eq!(ept.query(mem, gpa + off), Some(want), "gfn {:#x}", gfn);
                let hpa = (!f.perms.is_none()).then_some(f.hfn * K4 + off);
                prop_assert_eq!(ept.translate(mem, gpa + off), hpa, "gfn {:#x}", gfn);
                prop_assert_eq!(raw.level, f.size.level());
                prop_assert_eq!(raw.value & bits::MAPPED, bits::MAPPED);
                let large = f.size != Size4K;
                prop_assert_eq!(raw.value & bits::LARGE != 0, large, "gfn {:#x}", gfn);
            }
            None => {
                prop_assert_eq!(ept.query(mem, gpa + off), None, "gfn {:#x}", gfn);
                prop_assert_eq!(ept.translate(mem, gpa + off), None);
                if model.ve_allowed.contains(&gfn) {
                    prop_assert_eq!((raw.level, raw.value), (1, 0), "gfn {:#x}", gfn);
                } else {
                    prop_assert_eq!(raw.value, bits::EMPTY, "gfn {:#x}", gfn);
                }
            }
        }
    }
    let mut leaves = Vec::new();
    ept.for_each_leaf(mem, 0, WINDOW, |m| leaves.push(*m));
    let mut covered = 0;
    for w in leaves.windows(2) {
        prop_assert!(w[0].gpa + w[0].size.bytes() <= w[1].gpa, "in order");
    }
    for m in &leaves {
        prop_assert_eq!(Some(*m), ept.query(mem, m.gpa));
        covered += m.size.bytes() / K4;
    }
    prop_assert_eq!(covered, model.frames.len() as u64);
    prop_assert_eq!(reachable_tables(mem, ept.root(), 4), mem.live);
    Ok(())
}

fn step(
    ept: &mut Ept,
    mem: &mut FakeMemory,
    model: &mut Model,
    op: &Op,
) -> Result<(), TestCaseError> {
    let limited = mem.limit.is_some();
    let oom = |r: &Result<(), EptError>| limited && *r == Err(EptError::OutOfMemory);
    match *op {
        Op::Map {
            gfn,
            hfn,
            size,
            perms,
            memory_type,
        } => {
            let n = size.bytes() / K4;
            let r = ept.map(mem, gfn * K4, hfn * K4, size, perms, memory_type);
            if perms.write && !perms.read {
                prop_assert_eq!(r, Err(EptError::WriteWithoutRead { gpa: gfn * K4 }));
            } else if let Some(g) = (gfn..gfn + n).find(|g| model.frames.contains_key(g)) {
                let f = model.frames[&g];
                prop_assert_eq!(
                    r,
                    Err(EptError::AlreadyMapped {
                        gpa: gfn * K4,
                        existing: f.leaf * K4,
                        size: f.size
                    })
                );
            } else if !oom(&r) {
                prop_assert_eq!(r, Ok(()));
                for i in 0..n {
                    model.ve_allowed.remove(&(gfn + i));
                    let frame = Frame {
                        hfn: hfn + i,
                        perms,
                        memory_type,
                        sve: true,
                        accessed: false,
                        dirty: false,
                        leaf: gfn,
                        size,
                    };
                    model.frames.insert(gfn + i, frame);
                }
            }
        }
        Op::Unmap(gfn) => {
            let r = ept.unmap(mem, gfn * K4);
            match model.leaf_of(gfn) {
                Some(range) => {
                    let f = model.frames[&range.start];
                    let m = r.unwrap();
                    prop_assert_eq!((m.gpa, m.hpa, m.size), (f.leaf * K4, f.hfn * K4, f.size));
                    for g in range {
                        model.frames.remove(&g);
                    }
                }
                None => prop_assert_eq!(r, Err(EptError::NotMapped { gpa: gfn * K4 })),
            }
        }
        Op::Protect(gfn, perms) => {
            let r = ept.protect(mem, gfn * K4, perms);
            if perms.write && !perms.read {
                prop_assert_eq!(r, Err(EptError::WriteWithoutRead { gpa: gfn * K4 }));
            } else if let Some(f) = model.frames.get(&gfn) {
                prop_assert_eq!(r.unwrap().perms, f.perms);
                model.update_leaf(gfn, |_, f| f.perms = perms);
            } else {
                prop_assert_eq!(r, Err(EptError::NotMapped { gpa: gfn * K4 }));
            }
        }
        Op::Split(gfn) => {
            let r = ept.split(mem, gfn * K4);
            match model.frames.get(&gfn) {
                None => prop_assert_eq!(r, Err(EptError::NotMapped { gpa: gfn * K4 })),
                Some(f) if f.size == Size4K => {
                    prop_assert_eq!(r, Err(EptError::NotLarge { gpa: gfn * K4 }))
                }
                Some(_) if oom(&r) => {}
                Some(_) => {
                    prop_assert_eq!(r, Ok(()));
                    model.update_leaf(gfn, |g, f| {
                        f.leaf = g;
                        f.size = Size4K;
                    });
                }
            }
        }
        Op::SplitTo4k(start, end) => {
            let r = ept.split_to_4k(mem, start * K4, end * K4);
            if !oom(&r) {
                prop_assert_eq!(r, Ok(()));
            }
            // Each overlapping leaf is split, or, after running out of
            // memory, may not be: take the shape from the tables, the
            // contents are checked against the model after the step. (An
            // empty range overlaps nothing.)
            let gfns: Vec<u64> = model
                .frames
                .iter()
                .filter(|(_, f)| {
                    start < end && f.leaf < end && start < f.leaf + f.size.bytes() / K4
                })
                .map(|(&g, _)| g)
                .collect();
            for g in gfns {
                let size = ept.query(mem, g * K4).map(|m| m.size);
                if r.is_ok() {
                    prop_assert_eq!(size, Some(Size4K));
                }
                if size == Some(Size4K)
                    && let Some(f) = model.frames.get_mut(&g)
                {
                    f.leaf = g;
                    f.size = Size4K;
                }
            }
        }
        Op::SetSve(gfn, suppress) => {
            let r = ept.set_suppress_ve(mem, gfn * K4, suppress);
            if model.frames.contains_key(&gfn) {
                prop_assert_eq!(r, Ok(()));
                model.update_leaf(gfn, |_, f| f.sve = suppress);
            } else if suppress {
                prop_assert_eq!(r, Ok(()));
                model.ve_allowed.remove(&gfn);
            } else if !oom(&r) {
                prop_assert_eq!(r, Ok(()));
                model.ve_allowed.insert(gfn);
            }
        }
        Op::Touch(gfn, write) => {
            if model.frames.contains_key(&gfn) {
                let raw = ept.raw_entry(mem, gfn * K4).unwrap();
                let bits = if write {
                    bits::ACCESSED | bits::DIRTY
                } else {
                    bits::ACCESSED
                };
                mem.entries_mut(raw.table)[raw.slot] |= bits;
                model.update_leaf(gfn, |_, f| {
                    f.accessed = true;
                    f.dirty |= write;
                });
            }
        }
        Op::TakeAccessedDirty(start, end) => {
            let mut got = Vec::new();
            ept.take_accessed_dirty(mem, start * K4, end * K4, |gpa, size, a, d| {
                got.push((gpa, size, a, d))
            });
            let mut want = Vec::new();
            let leaves: BTreeSet<u64> = model
                .frames
                .values()
                .filter(|f| f.leaf < end && start < f.leaf + f.size.bytes() / K4)
                .filter(|f| f.accessed || f.dirty)
                .map(|f| f.leaf)
                .collect();
            for leaf in leaves {
                let f = model.frames[&leaf];
                want.push((leaf * K4, f.size, f.accessed, f.dirty));
                model.update_leaf(leaf, |_, f| {
                    f.accessed = false;
                    f.dirty = false;
                });
            }
            prop_assert_eq!(got, want);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random changes in the first 16 MiB against a frame-by-frame model,
    /// with and without a limit on tables; every frame is checked after every
    /// step, and destroy frees every table.
    #[test]
    fn matches_a_frame_by_frame_model(
        limit in prop_oneof![Just(None), (1usize..12).prop_map(Some)],
        ops in proptest::collection::vec(op(), 1..48),
    ) {
        let mut mem = FakeMemory { limit, ..FakeMemory::default() };
        let mut ept = Ept::new(&mut mem).unwrap();
        let mut model = Model::default();
        for op in &ops {
            step(&mut ept, &mut mem, &mut model, op)?;
            check(&ept, &mem, &model)?;
        }
        ept.destroy(&mut mem);
        prop_assert_eq!(mem.live, 0);
    }

    /// Any operation on any address returns; nothing panics.
    #[test]
    fn never_panics_on_any_address(
        gpa in any::<u64>(),
        hpa in any::<u64>(),
        large in 0u8..3,
        p in perms(),
        end in any::<u64>(),
    ) {
        let (mut mem, mut ept) = setup();
        let size = [Size4K, Size2M, Size1G][large as usize];
        let _ = ept.map(&mut mem, gpa, hpa, size, p, WB);
        let _ = ept.map(&mut mem, gpa & !(size.bytes() - 1) & (GPA_LIMIT - 1), hpa & !(size.bytes() - 1), size, p, WB);
        let _ = ept.query(&mem, gpa);
        let _ = ept.translate(&mem, gpa);
        let _ = ept.raw_entry(&mem, gpa);
        let _ = ept.protect(&mut mem, gpa, p);
        let _ = ept.set_suppress_ve(&mut mem, gpa, false);
        let _ = ept.split(&mut mem, gpa);
        let _ = ept.split_to_4k(&mut mem, gpa, end.min(gpa.saturating_add(4 * M2)));
        ept.for_each_leaf(&mem, gpa, end, |_| {});
        ept.take_accessed_dirty(&mut mem, gpa, end, |_, _, _, _| {});
        let _ = ept.unmap(&mut mem, gpa);
        let _ = ept.set_suppress_ve(&mut mem, gpa, true);
        prop_assert_eq!(reachable_tables(&mem, ept.root(), 4), mem.live);
        ept.destroy(&mut mem);
        prop_assert_eq!(mem.live, 0);
    }
}

#[test]
fn protect_range_rewrites_whole_large_pages_and_splits_only_the_ends() {
    let (mut mem, mut ept) = setup();
    let m2 = PageSize::Size2M.bytes();
    for i in 0..4 {
        ept.map(
            &mut mem,
            i * m2,
            0x4000_0000 + i * m2,
            PageSize::Size2M,
            Perms::ALL,
            MemoryType::WRITE_BACK,
        )
        .unwrap();
    }
    // [1 MiB, 5 MiB): half of page 0, all of page 1, half of page 2.
    ept.protect_range(&mut mem, m2 / 2, m2 * 5 / 2, Perms::READ)
        .unwrap();
    let q = |ept: &Ept, mem: &FakeMemory, gpa: u64| ept.query(mem, gpa).unwrap();
    assert_eq!(q(&ept, &mem, 0).perms, Perms::ALL, "before the range");
    assert_eq!(
        q(&ept, &mem, 0).size,
        PageSize::Size4K,
        "split: it straddles the start"
    );
    assert_eq!(q(&ept, &mem, m2 / 2).perms, Perms::READ);
    assert_eq!(
        q(&ept, &mem, m2 + 8192).size,
        PageSize::Size2M,
        "inside: kept whole"
    );
    assert_eq!(q(&ept, &mem, m2 + 8192).perms, Perms::READ);
    assert_eq!(q(&ept, &mem, m2 * 5 / 2 - 4096).perms, Perms::READ);
    assert_eq!(
        q(&ept, &mem, m2 * 5 / 2).perms,
        Perms::ALL,
        "after the range"
    );
    assert_eq!(q(&ept, &mem, 3 * m2).size, PageSize::Size2M, "untouched");
    for gpa in (0..4 * m2).step_by(4096) {
        assert_eq!(
            ept.translate(&mem, gpa),
            Some(0x4000_0000 + gpa),
            "frames stay at {gpa:#x}"
        );
    }
    assert!(
        ept.protect_range(&mut mem, 0, 4096, Perms::new(false, true, false))
            .is_err(),
        "write without read"
    );
}

#[test]
fn protect_range_leaves_holes_unmapped() {
    let (mut mem, mut ept) = setup();
    ept.map(
        &mut mem,
        0x3000,
        0x9000,
        PageSize::Size4K,
        Perms::ALL,
        MemoryType::WRITE_BACK,
    )
    .unwrap();
    ept.protect_range(&mut mem, 0, 0x10000, Perms::READ_EXECUTE)
        .unwrap();
    assert_eq!(ept.query(&mem, 0x3000).unwrap().perms, Perms::READ_EXECUTE);
    assert_eq!(ept.query(&mem, 0x4000), None);
}

#[test]
fn a_gib_of_2m_pages_takes_512_writes_not_a_quarter_million() {
    let (range, per_page) = crate::ept::host::range_writes(1 << 30).unwrap();
    assert_eq!(range, 512);
    assert!(per_page > 262_144, "{per_page}");
}

proptest! {
    /// The range operation ends where page-by-page protection ends.
    #[test]
    fn protect_range_equals_protecting_each_mapped_page(
        pages in proptest::collection::vec((0u64..8, any::<bool>()), 1..6),
        start in 0u64..(16 << 20),
        len in 0u64..(16 << 20),
        write in any::<bool>(),
    ) {
        let perms = Perms::new(true, write, false);
        let (mut a, mut ea) = setup();
        let (mut b, mut eb) = setup();
        let m2 = PageSize::Size2M.bytes();
        for &(i, large) in &pages {
            let gpa = i * m2;
            for (mem, ept) in [(&mut a, &mut ea), (&mut b, &mut eb)] {
                if large {
                    let _ = ept.map(mem, gpa, 0x4000_0000 + gpa, PageSize::Size2M, Perms::ALL, MemoryType::WRITE_BACK);
                } else {
                    let _ = ept.map(mem, gpa + 4096, 0x4000_0000 + gpa, PageSize::Size4K, Perms::ALL, MemoryType::WRITE_BACK);
                }
            }
        }
        let (start, end) = (start & !0xfff, ((start + len) & !0xfff).min(16 << 20));
        ea.protect_range(&mut a, start, end, perms).unwrap();
        let mut gpa = start;
        while gpa < end {
            if eb.query(&b, gpa).is_some() {
                eb.split_to_4k(&mut b, gpa, gpa + 4096).unwrap();
                eb.protect(&mut b, gpa, perms).unwrap();
            }
            gpa += 4096;
        }
        for gpa in (0..16u64 << 20).step_by(4096) {
            let (x, y) = (ea.query(&a, gpa), eb.query(&b, gpa));
            prop_assert_eq!(x.map(|m| (m.perms, m.hpa_of(gpa))), y.map(|m| (m.perms, m.hpa_of(gpa))), "at {:#x}", gpa);
        }
    }
}

#[test]
fn a_read_only_leaf_armed_for_copy_stays_armed_through_splits_and_any_change_disarms_it() {
    let mut mem = FakeMemory::default();
    let mut ept = Ept::new(&mut mem).unwrap();
    ept.map(&mut mem, 0, 0x20_0000, Size2M, Perms::READ_EXECUTE, WB)
        .unwrap();
    ept.map(&mut mem, M2, 0x40_0000, Size4K, Perms::READ_WRITE, WB)
        .unwrap();
    ept.map(&mut mem, M2 + K4, 0x40_1000, Size4K, Perms::EXECUTE, WB)
        .unwrap();
    assert!(ept.copy_armed(&mem, 0).is_none(), "not armed");
    assert!(!ept.arm_copy(&mut mem, M2), "writable: never armed");
    assert!(!ept.arm_copy(&mut mem, M2 + K4), "not readable");
    assert!(!ept.arm_copy(&mut mem, 2 * M2), "nothing mapped");
    assert!(
        ept.arm_copy(&mut mem, 0x3000),
        "a large leaf is armed whole"
    );
    let m = ept.copy_armed(&mem, 0x1f_f000).unwrap();
    assert_eq!((m.gpa, m.hpa, m.size), (0, 0x20_0000, Size2M));
    // A split keeps it on every smaller leaf.
    ept.split(&mut mem, 0x5000).unwrap();
    for gpa in [0, 0x5000, 0x1f_f000] {
        let m = ept.copy_armed(&mem, gpa).unwrap();
        assert_eq!((m.size, m.hpa), (Size4K, 0x20_0000 + gpa));
        assert_eq!(m.perms, Perms::READ_EXECUTE);
    }
    // A new frame, new permissions (one leaf or a range): disarmed.
    ept.replace(&mut mem, 0x5000, 0x80_0000, Perms::ALL)
        .unwrap();
    assert!(ept.copy_armed(&mem, 0x5000).is_none(), "replace disarms");
    ept.protect(&mut mem, 0x6000, Perms::READ).unwrap();
    assert!(ept.copy_armed(&mem, 0x6000).is_none(), "protect disarms");
    ept.protect_range(&mut mem, 0x7000, 0x9000, Perms::READ_EXECUTE)
        .unwrap();
    assert!(ept.copy_armed(&mem, 0x8000).is_none(), "a range disarms");
    assert!(ept.copy_armed(&mem, 0x9000).is_some(), "others stay");
    assert_eq!(ept.lift(&mut mem, 0x9000), None, "never lifted");
    // A fork's map: read-only, armed only where the parent could write.
    ept.map_for_fork(&mut mem, 4 * M2, 0x60_0000, Size2M, Perms::ALL, WB)
        .unwrap();
    ept.map_for_fork(&mut mem, 6 * M2, 0x80_0000, Size4K, Perms::READ, WB)
        .unwrap();
    let m = ept.copy_armed(&mem, 4 * M2 + K4).unwrap();
    assert_eq!((m.perms, m.size), (Perms::READ_EXECUTE, Size2M));
    assert!(ept.copy_armed(&mem, 6 * M2).is_none(), "read-only parent");
    assert_eq!(ept.query(&mem, 6 * M2).unwrap().perms, Perms::READ);
}

#[test]
fn only_an_armed_read_only_4k_leaf_is_lifted_and_any_permission_change_disarms_it() {
    let mut mem = FakeMemory::default();
    let mut ept = Ept::new(&mut mem).unwrap();
    ept.map(&mut mem, 0, 0x20_0000, Size2M, Perms::READ, WB)
        .unwrap();
    ept.map(&mut mem, M2, 0x40_0000, Size4K, Perms::READ, WB)
        .unwrap();
    ept.map(&mut mem, M2 + K4, 0x40_1000, Size4K, Perms::READ_WRITE, WB)
        .unwrap();
    ept.map(&mut mem, M2 + 2 * K4, 0x40_2000, Size4K, Perms::EXECUTE, WB)
        .unwrap();
    assert_eq!(ept.lift(&mut mem, M2), None, "not armed");
    ept.arm_lift(&mut mem, 0, 2 * M2);
    assert_eq!(
        ept.lift(&mut mem, 0x1000),
        None,
        "a large leaf is never armed"
    );
    assert_eq!(ept.lift(&mut mem, M2 + K4), None, "writable already");
    assert_eq!(ept.lift(&mut mem, M2 + 2 * K4), None, "not readable");
    assert_eq!(ept.lift(&mut mem, M2 + 8), Some(0x40_0000));
    let e = ept.raw_entry(&mem, M2).unwrap().value;
    assert_eq!(
        e & (bits::WRITE | bits::ACCESSED | bits::DIRTY | bits::LIFT),
        bits::WRITE | bits::ACCESSED | bits::DIRTY,
        "writable, accessed and dirty, disarmed"
    );
    assert_eq!(ept.lift(&mut mem, M2), None, "lifted once");
    // Armed again, then read-only by someone's choice: disarmed.
    ept.protect(&mut mem, M2, Perms::READ).unwrap();
    ept.arm_lift(&mut mem, M2, M2 + K4);
    ept.protect(&mut mem, M2, Perms::READ).unwrap();
    assert_eq!(ept.lift(&mut mem, M2), None, "protect disarms");
    ept.arm_lift(&mut mem, M2, M2 + K4);
    ept.protect_range(&mut mem, M2, M2 + K4, Perms::READ_EXECUTE)
        .unwrap();
    assert_eq!(ept.lift(&mut mem, M2), None, "protect_range disarms");
    assert_eq!(ept.lift(&mut mem, 5 * G1), None, "nothing mapped");
}

/// `copy_from` (EptOp::CopyHost): the view becomes the host's tables entry
/// for entry, in tables of its own, keeping its PML4; its old tables are
/// freed; out of table memory it stays as it was.
#[test]
fn copy_from_copies_every_entry_into_tables_of_its_own() {
    let mut mem = FakeMemory::default();
    let mut host = Ept::new(&mut mem).unwrap();
    host.map(&mut mem, 0, 0x4000_0000, Size2M, Perms::ALL, WB)
        .unwrap();
    host.map(&mut mem, M2, 0x5000_0000, Size4K, Perms::READ, UC)
        .unwrap();
    host.map(&mut mem, G1, 0x8000_0000, Size1G, Perms::READ_EXECUTE, WB)
        .unwrap();
    host.set_suppress_ve(&mut mem, M2, false).unwrap();
    host.arm_lift(&mut mem, M2, M2 + K4);
    let mut view = Ept::new(&mut mem).unwrap();
    view.map(&mut mem, 4 * M2, 0x6000_0000, Size4K, Perms::ALL, WB)
        .unwrap();
    let root = view.root();
    view.copy_from(&mut mem, &host).unwrap();
    assert_eq!(view.root(), root, "the EPT pointer stays");
    for gpa in [0, K4, M2, M2 + K4, 4 * M2, G1, G1 + 7 * M2] {
        assert_eq!(view.query(&mem, gpa), host.query(&mem, gpa), "{gpa:#x}");
        assert_eq!(
            view.raw_entry(&mem, gpa).unwrap().value,
            host.raw_entry(&mem, gpa).unwrap().value,
            "{gpa:#x}"
        );
    }
    // Tables of its own: a change to the view leaves the host alone.
    view.protect(&mut mem, M2, Perms::NONE).unwrap();
    assert_eq!(host.query(&mem, M2).unwrap().perms, Perms::READ);
    let (h, v) = (
        reachable_tables(&mem, host.root(), 4),
        reachable_tables(&mem, view.root(), 4),
    );
    assert_eq!(h, v);
    assert_eq!(mem.live, h + v, "the view's old tables were freed");
    // Out of table memory: nothing changes, nothing leaks.
    let mut small = FakeMemory::limited(0);
    std::mem::swap(&mut small.tables, &mut mem.tables);
    small.live = mem.live;
    small.limit = Some(small.live + 2);
    let before = small.live;
    assert_eq!(
        view.copy_from(&mut small, &host),
        Err(EptError::OutOfMemory)
    );
    assert_eq!(small.live, before);
    assert_eq!(view.query(&small, M2).unwrap().perms, Perms::NONE);
}
