use super::*;
use proptest::prelude::*;
use std::boxed::Box;
use std::collections::BTreeMap;
use std::vec::Vec;

/// Tables as boxed arrays at made-up addresses; freed ones are never reused,
/// so a use after free panics.
#[derive(Default)]
struct Fake {
    tables: Vec<Option<Box<[u64; ENTRIES]>>>,
    live: usize,
    limit: Option<usize>,
}

const BASE: u64 = 0x10_0000_0000;

impl TableMemory for Fake {
    fn alloc_table(&mut self) -> Option<u64> {
        if self.limit.is_some_and(|l| self.live >= l) {
            return None;
        }
        self.tables.push(Some(Box::new([0xdead; ENTRIES])));
        self.live += 1;
        Some(BASE + (self.tables.len() as u64 - 1) * 4096)
    }
    fn free_table(&mut self, table: u64) {
        let t = self.tables[((table - BASE) / 4096) as usize].take();
        assert!(t.is_some(), "double free of {table:#x}");
        self.live -= 1;
    }
    fn entries(&self, table: u64) -> &[u64; ENTRIES] {
        self.tables[((table - BASE) / 4096) as usize]
            .as_ref()
            .expect("use after free")
    }
    fn entries_mut(&mut self, table: u64) -> &mut [u64; ENTRIES] {
        self.tables[((table - BASE) / 4096) as usize]
            .as_mut()
            .expect("use after free")
    }
}

#[test]
fn capabilities_decode_as_the_spec_lays_them_out() {
    // SAGAW 39 and 48 bits, MGAW 48, ND 2 (256 ids), FRO 0x22 (0x220), NFR 1,
    // CM, DWD and DRD.
    let cap = Cap(2 | 1 << 7 | 0b110 << 8 | 47 << 16 | 0x22 << 24 | 3 << 54);
    assert_eq!(cap.domains(), 256);
    assert!(cap.caching_mode());
    assert_eq!(cap.sagaw(), 0b110);
    assert_eq!(cap.mgaw(), 48);
    assert_eq!(cap.fault_offset(), 0x220);
    assert_eq!(cap.fault_records(), 1);
    assert_eq!(cap.drain(), (true, true));
    assert_eq!(cap.levels(), Some(4));
    assert_eq!(Cap(0b010 << 8).levels(), Some(3));
    assert_eq!(Cap(0b001 << 8).levels(), None, "2 levels only: not usable");
    let ecap = Ecap(0xf0 << 8 | 2 | 1);
    assert!(ecap.queued_invalidation() && ecap.coherent());
    assert_eq!(ecap.iotlb_offset(), 0xf00);
}

#[test]
fn entries_and_commands_have_the_spec_bits() {
    assert_eq!(root_entry(0x1234_5000), 0x1234_5001);
    assert_eq!(context_entry(0xabc_d000, 3, 7), (0xabc_d001, 1 | 7 << 8));
    assert_eq!(
        context_entry(0xabc_d000, 4, 0x1ff),
        (0xabc_d001, 2 | 0x1ff << 8)
    );
    assert_eq!(ccmd_global(), 0xa000_0000_0000_0000);
    assert_eq!(iotlb_domain(5, true, false), 0xa001_0005_0000_0000);
    assert_eq!(iotlb_global(), 0x9000_0000_0000_0000);
    assert_eq!(desc::context_global(), (0x11, 0));
    assert_eq!(
        desc::iotlb_domain(3, true, true),
        (0x2 | 0x20 | 0xc0 | 3 << 16, 0)
    );
    assert_eq!(desc::wait(0x5007, 9), (0x25 | 9 << 32, 0x5004));
}

#[test]
fn fault_records_decode_source_address_reason_and_type() {
    assert_eq!(FaultRecord::decode(0x1234_5678, 0), None, "F clear");
    let high = 1 << 63 | 1 << 62 | 0x06 << 32 | 0x0018;
    assert_eq!(
        FaultRecord::decode(0x1234_5678, high),
        Some(FaultRecord {
            source: 0x18,
            address: 0x1234_5000,
            reason: 6,
            write: false
        })
    );
    assert!(FaultRecord::decode(0, 1 << 63).unwrap().write);
}

#[test]
fn a_refused_map_changes_nothing_and_out_of_memory_is_reported() {
    let mut mem = Fake {
        limit: Some(2),
        ..Fake::default()
    };
    let mut t = IoTable::new(&mut mem, 3).unwrap();
    assert_eq!(t.map(&mut mem, 5, 0x5000, true), Err(IoError::OutOfMemory));
    assert_eq!(t.translate(&mem, 5), None);
    assert_eq!(
        t.map(&mut mem, 1 << 27, 0x5000, true),
        Err(IoError::OutOfRange { bfn: 1 << 27 })
    );
    mem.limit = None;
    t.map(&mut mem, 5, 0x5000, false).unwrap();
    assert_eq!(
        t.map(&mut mem, 5, 0x6000, true),
        Err(IoError::AlreadyMapped { bfn: 5 })
    );
    assert_eq!(t.translate(&mem, 5), Some((0x5000, false)));
    t.destroy(&mut mem);
    assert_eq!(mem.live, 0);
}

proptest! {
    /// The tables against a map: after any sequence of maps and unmaps, every
    /// bfn translates as the model says, the walk lists exactly the model,
    /// and destroy frees every table.
    #[test]
    fn io_tables_match_a_model(
        levels in prop_oneof![Just(3u8), Just(4u8)],
        ops in proptest::collection::vec((any::<bool>(), 0u64..2048, 0u64..1 << 20, any::<bool>()), 1..200),
        high in proptest::collection::vec(0u64..1 << 27, 0..8),
    ) {
        let mut mem = Fake::default();
        let mut t = IoTable::new(&mut mem, levels).unwrap();
        let mut model: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
        let spread = |b: u64| if b.is_multiple_of(3) { b << 9 } else { b };
        for (i, &(map, b, frame, write)) in ops.iter().enumerate() {
            let bfn = spread(b) ^ high.get(i % high.len().max(1)).copied().unwrap_or(0);
            let hpa = frame << 12;
            if map {
                let r = t.map(&mut mem, bfn, hpa, write);
                if let std::collections::btree_map::Entry::Vacant(e) = model.entry(bfn) {
                    prop_assert_eq!(r, Ok(()));
                    e.insert((hpa, write));
                } else {
                    prop_assert_eq!(r, Err(IoError::AlreadyMapped { bfn }));
                }
            } else {
                prop_assert_eq!(t.unmap(&mut mem, bfn), model.remove(&bfn).map(|(h, _)| h));
            }
            prop_assert_eq!(t.translate(&mem, bfn), model.get(&bfn).copied());
        }
        let mut seen = Vec::new();
        t.for_each(&mem, |bfn, hpa| seen.push((bfn, hpa)));
        let want: Vec<_> = model.iter().map(|(&b, &(h, _))| (b, h)).collect();
        prop_assert_eq!(seen, want);
        t.destroy(&mut mem);
        prop_assert_eq!(mem.live, 0);
    }
}
