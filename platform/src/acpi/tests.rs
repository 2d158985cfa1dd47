use super::build::{rsdp, table};
use super::dmar::build::{DeviceScope, DmarBuilder, endpoint, owned, server_sized};
use super::dmar::{Dmar, DmarError, MAX_TABLES, PciHop, ScopeKind};
use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::vec;
use std::vec::Vec;

/// Physical memory made of separate byte ranges.
#[derive(Default)]
struct FakeMemory(BTreeMap<u64, Vec<u8>>);

impl FakeMemory {
    fn put(&mut self, addr: u64, bytes: Vec<u8>) -> &mut Self {
        self.0.insert(addr, bytes);
        self
    }
}

impl PhysMemory for FakeMemory {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let (start, bytes) = self.0.range(..=addr).next_back()?;
        let off = (addr - start) as usize;
        bytes.get(off..off.checked_add(len)?)
    }
}

const QEMU_DMAR: &[u8] = include_bytes!("../../testdata/qemu-7.2-q35-intel-iommu.dmar");

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    table(b"XSDT", 1, &body)
}

#[test]
fn rsdp_revisions_and_damage() {
    let v0 = rsdp(0x1000, None);
    assert_eq!(
        Rsdp::parse(&v0).unwrap(),
        Rsdp {
            revision: 0,
            oem_id: *b"PLXHV ",
            rsdt: 0x1000,
            xsdt: None
        }
    );
    let v2 = rsdp(0x1000, Some(0x2000));
    assert_eq!(Rsdp::parse(&v2).unwrap().xsdt, Some(0x2000));

    let mut bad = v0.clone();
    bad[0] = b'X';
    assert_eq!(Rsdp::parse(&bad), Err(AcpiError::RsdpSignature));
    let mut bad = v0.clone();
    bad[12] ^= 1;
    assert_eq!(Rsdp::parse(&bad), Err(AcpiError::RsdpChecksum));
    let mut bad = v2.clone();
    bad[30] ^= 1; // inside the extended part only
    assert_eq!(Rsdp::parse(&bad), Err(AcpiError::RsdpChecksum));
    assert_eq!(
        Rsdp::parse(&v2[..30]),
        Err(AcpiError::RsdpTooShort { len: 30 })
    );
    assert_eq!(
        Rsdp::parse(&v0[..19]),
        Err(AcpiError::RsdpTooShort { len: 19 })
    );
}

#[test]
fn walks_an_xsdt_and_skips_a_damaged_table() {
    let mut bad = table(b"SSDT", 1, &[1, 2, 3]);
    bad[20] ^= 0xff;
    let mut mem = FakeMemory::default();
    mem.put(0x2000, xsdt(&[0x3000, 0x4000, 0x5000, 0x9999_0000]))
        .put(0x3000, table(b"APIC", 4, &[0; 8]))
        .put(0x4000, bad)
        .put(0x5000, QEMU_DMAR.to_vec());
    let rsdp = Rsdp::parse(&rsdp(0, Some(0x2000))).unwrap();
    let root = RootTable::read(&mem, &rsdp).unwrap();
    let found: Vec<_> = root
        .tables(&mem)
        .map(|t| t.map(|t| (t.address, t.signature())))
        .collect();
    assert_eq!(
        found,
        [
            Ok((0x3000, *b"APIC")),
            Err(AcpiError::BadChecksum {
                address: 0x4000,
                signature: *b"SSDT"
            }),
            Ok((0x5000, *b"DMAR")),
            Err(AcpiError::Unreadable {
                address: 0x9999_0000
            }),
        ]
    );
}

#[test]
fn walks_an_rsdt_with_32_bit_entries() {
    let body: Vec<u8> = [0x3000u32].iter().flat_map(|e| e.to_le_bytes()).collect();
    let mut mem = FakeMemory::default();
    mem.put(0x1000, table(b"RSDT", 1, &body))
        .put(0x3000, table(b"HPET", 1, &[0; 20]));
    let root = RootTable::read(&mem, &Rsdp::parse(&rsdp(0x1000, None)).unwrap()).unwrap();
    assert_eq!(root.addresses().collect::<Vec<_>>(), [0x3000]);
}

#[test]
fn table_header_checks() {
    let mut mem = FakeMemory::default();
    let mut short = table(b"FACP", 1, &[]);
    short[4] = 20; // length below the header's own size
    mem.put(0x1000, short)
        .put(0x2000, table(b"FACP", 1, &[0; 4]));
    assert_eq!(
        read_table(&mem, 0x1000, None).unwrap_err(),
        AcpiError::BadLength {
            address: 0x1000,
            signature: *b"FACP",
            length: 20
        }
    );
    assert_eq!(
        read_table(&mem, 0x2000, Some(*b"XSDT")).unwrap_err(),
        AcpiError::WrongSignature {
            address: 0x2000,
            expected: *b"XSDT",
            found: *b"FACP"
        }
    );
    let mut long = table(b"FACP", 1, &[0; 4]);
    long[4] = 200; // claims more bytes than exist
    mem.put(0x3000, long);
    assert_eq!(
        read_table(&mem, 0x3000, None).unwrap_err(),
        AcpiError::Unreadable { address: 0x3000 }
    );
}

/// Reads every unit, region, scope and hop of a parsed table (which must
/// never panic, whatever bytes passed the checks).
fn walk(d: &Dmar<'_>) {
    let mut n = 0;
    for u in d.drhds() {
        for s in u.scopes.iter() {
            n += 1;
            let _ = (s.direct_bdf(), s.path.iter().count());
        }
    }
    for r in d.rmrrs() {
        let _ = r.len();
        for s in r.scopes.iter() {
            n += 1;
            let _ = s.path.iter().count();
        }
    }
    assert_eq!(n, d.scope_count);
}

fn dmar_of(bytes: &[u8]) -> Result<Dmar<'_>, DmarError> {
    Dmar::parse([Table {
        address: 0x1000,
        bytes,
    }])
}

#[test]
fn qemu_intel_iommu_dmar() {
    let d = dmar_of(QEMU_DMAR).unwrap();
    assert_eq!(d.address_width, 39);
    assert!(d.interrupt_remapping && !d.x2apic_opt_out);
    assert_eq!((d.drhd_count, d.rmrr_count, d.scope_count), (1, 0, 8));
    assert_eq!(d.drhds().count(), 1);
    assert_eq!(d.rmrrs().count(), 0);
    let drhd = d.drhds().next().unwrap();
    assert_eq!(
        (drhd.register_base, drhd.segment, drhd.include_pci_all),
        (0xfed9_0000, 0, false)
    );
    assert_eq!(drhd.scopes.len(), 8);
    assert_eq!(drhd.scopes.iter().next().unwrap().kind, ScopeKind::IoApic);
    let endpoints: Vec<_> = drhd
        .scopes
        .iter()
        .skip(1)
        .map(|s| s.direct_bdf().unwrap())
        .collect();
    assert_eq!(
        endpoints,
        [
            (0, 0, 0),
            (0, 1, 0),
            (0, 2, 0),
            (0, 3, 0),
            (0, 0x1f, 0),
            (0, 0x1f, 2),
            (0, 0x1f, 3)
        ]
    );
}

/// The table the boot tests inject with `-acpitable`: one RMRR for the `edu`
/// device at 00:03.0.
fn rmrr_only() -> Vec<u8> {
    DmarBuilder::new(39, 0)
        .rmrr(0, 0x7d0_0000, 0x7d0_ffff, &[endpoint(0, 3, 0)])
        .build()
}

#[test]
fn crafted_rmrr_table_merges_with_qemu_s() {
    let rmrr = rmrr_only();
    let d = Dmar::parse([
        Table {
            address: 0x1000,
            bytes: QEMU_DMAR,
        },
        Table {
            address: 0x2000,
            bytes: &rmrr,
        },
    ])
    .unwrap();
    assert_eq!(
        (d.tables, d.address_width, d.width_conflict),
        (2, 39, false)
    );
    assert!(d.interrupt_remapping, "flags are merged");
    assert_eq!(d.drhds().count(), 1);
    assert_eq!(d.rmrrs().count(), 1);
    let r = d.rmrrs().next().unwrap();
    assert_eq!(
        (r.base, r.limit, r.len()),
        (0x7d0_0000, 0x7d0_ffff, 0x1_0000)
    );
    assert_eq!(
        r.scopes.iter().next().unwrap().direct_bdf(),
        Some((0, 3, 0))
    );
}

#[test]
fn builder_roundtrips_every_field() {
    let deep = DeviceScope {
        kind: ScopeKind::PciSubHierarchy,
        enumeration_id: 0,
        start_bus: 2,
        path: vec![
            PciHop {
                device: 1,
                function: 0,
            },
            PciHop {
                device: 0,
                function: 1,
            },
        ],
    };
    let bytes = DmarBuilder::new(48, 0b101)
        .drhd(true, 1, 0xfed9_1000, &[])
        .rmrr(1, 0x1000, 0x1fff, &[deep.clone(), endpoint(0, 2, 0)])
        .other(3, &[0; 16])
        .build();
    let d = dmar_of(&bytes).unwrap();
    assert_eq!(d.address_width, 48);
    assert!(d.interrupt_remapping && !d.x2apic_opt_out && d.dma_ctrl_platform_opt_in);
    let drhd = d.drhds().next().unwrap();
    assert!(drhd.include_pci_all);
    assert_eq!(drhd.segment, 1);
    let scope = d.rmrrs().next().unwrap().scopes.iter().next().unwrap();
    assert_eq!(owned(&scope), deep);
    assert_eq!(
        scope.direct_bdf(),
        None,
        "a path through a bridge has no direct BDF"
    );
    assert_eq!(d.other_structures, 1);
}

#[test]
fn differing_widths_keep_the_smallest() {
    let a = DmarBuilder::new(48, 0).build();
    let b = DmarBuilder::new(39, 0).build();
    let d = Dmar::parse([
        Table {
            address: 1,
            bytes: &a,
        },
        Table {
            address: 2,
            bytes: &b,
        },
    ])
    .unwrap();
    assert_eq!((d.address_width, d.width_conflict), (39, true));
}

/// Sets a little-endian u16 in a table and fixes its checksum.
fn patch_u16(t: &mut [u8], at: usize, v: u16) {
    t[at..at + 2].copy_from_slice(&v.to_le_bytes());
    t[9] = 0;
    t[9] = 0u8.wrapping_sub(checksum(t));
}

#[test]
fn malformed_structures_are_named_not_looped_on() {
    let good = rmrr_only();
    let mut zero_len = good.clone();
    patch_u16(&mut zero_len, 48 + 2, 0);
    assert_eq!(
        dmar_of(&zero_len),
        Err(DmarError::BadStructure {
            table: 0x1000,
            offset: 48,
            kind: 1,
            length: 0
        })
    );
    let mut overrun = good.clone();
    patch_u16(&mut overrun, 48 + 2, 200);
    assert!(matches!(
        dmar_of(&overrun),
        Err(DmarError::BadStructure { length: 200, .. })
    ));

    let mut bad_scope = good.clone();
    bad_scope[48 + 24 + 1] = 7; // odd scope length
    assert!(matches!(
        dmar_of(&bad_scope),
        Err(DmarError::BadScope { length: 7, .. })
    ));

    let backwards = DmarBuilder::new(39, 0).rmrr(0, 0x2000, 0x1fff, &[]).build();
    assert!(matches!(
        dmar_of(&backwards),
        Err(DmarError::BadStructure { kind: 1, .. })
    ));

    assert_eq!(
        dmar_of(&good[..40]),
        Err(DmarError::TooShort {
            table: 0x1000,
            length: 40
        })
    );
    assert_eq!(
        dmar_of(&table(b"APIC", 1, &[0; 20])),
        Err(DmarError::NotDmar { table: 0x1000 })
    );
}

/// A scope of any kind with a path of 1 to 6 hops.
fn any_scope() -> impl Strategy<Value = DeviceScope> {
    (
        1u8..=6,
        any::<u8>(),
        any::<u8>(),
        proptest::collection::vec((0u8..32, 0u8..8), 1..=6),
    )
        .prop_map(|(kind, enumeration_id, start_bus, hops)| DeviceScope {
            kind: match kind {
                1 => ScopeKind::PciEndpoint,
                2 => ScopeKind::PciSubHierarchy,
                3 => ScopeKind::IoApic,
                4 => ScopeKind::HpetMsi,
                5 => ScopeKind::AcpiNamespace,
                other => ScopeKind::Unknown(other),
            },
            enumeration_id,
            start_bus,
            path: hops
                .into_iter()
                .map(|(device, function)| PciHop { device, function })
                .collect(),
        })
}

#[test]
fn a_real_servers_table_is_taken_whole() {
    // Dozens of units, hundreds of scopes, paths through several bridges,
    // many regions: more than a fixed array would hold.
    let bytes = server_sized();
    let d = dmar_of(&bytes).unwrap();
    assert_eq!((d.drhd_count, d.rmrr_count, d.scope_count), (40, 30, 510));
    assert_eq!(d.drhds().count(), 40);
    let last = d.drhds().last().unwrap();
    assert!(!last.include_pci_all);
    assert_eq!(
        (last.segment, last.register_base),
        (1, 0xfb00_0000 + 39 * 0x1000)
    );
    assert_eq!(last.scopes.len(), 12);
    let deepest = last.scopes.iter().find(|s| s.path.len() == 5).unwrap();
    assert_eq!(
        (
            deepest.start_bus,
            deepest.path.iter().last().unwrap().device
        ),
        (40, 4)
    );
    let r = d.rmrrs().nth(29).unwrap();
    assert_eq!((r.base, r.len()), (0x8000_0000 + (29 << 20), 4096));
    assert_eq!(
        r.scopes.iter().next().unwrap().direct_bdf(),
        Some((0x20, 0x14, 0))
    );
}

#[test]
fn more_tables_than_kept_is_an_error_not_a_silent_cut() {
    let t = rmrr_only();
    let tables = (0..=MAX_TABLES as u64).map(|i| Table {
        address: 0x1000 * (i + 1),
        bytes: &t,
    });
    assert_eq!(
        Dmar::parse(tables),
        Err(DmarError::TooManyTables { limit: MAX_TABLES })
    );
}

proptest! {
    /// What is built is what is read back: every unit, region, scope and
    /// hop, in order.
    #[test]
    fn built_tables_read_back_exactly(
        units in proptest::collection::vec((any::<bool>(), any::<u16>(), any::<u64>(), proptest::collection::vec(any_scope(), 0..10)), 0..12),
        regions in proptest::collection::vec((any::<u16>(), 0u64..1 << 40, 0u64..1 << 20, proptest::collection::vec(any_scope(), 0..10)), 0..12),
    ) {
        let mut b = DmarBuilder::new(39, 0);
        for (all, segment, base, scopes) in &units {
            b = b.drhd(*all, *segment, *base, scopes);
        }
        for (segment, base, len, scopes) in &regions {
            b = b.rmrr(*segment, *base, base + len, scopes);
        }
        let bytes = b.build();
        let d = dmar_of(&bytes).unwrap();
        let units_read: Vec<_> = d.drhds().map(|u| (u.include_pci_all, u.segment, u.register_base, u.scopes.iter().map(|s| owned(&s)).collect::<Vec<_>>())).collect();
        prop_assert_eq!(units_read, units.clone());
        let regions_read: Vec<_> = d.rmrrs().map(|r| (r.segment, r.base, r.limit - r.base, r.scopes.iter().map(|s| owned(&s)).collect::<Vec<_>>())).collect();
        prop_assert_eq!(regions_read, regions.clone());
        let scopes: usize = units.iter().map(|u| u.3.len()).sum::<usize>() + regions.iter().map(|r| r.3.len()).sum::<usize>();
        prop_assert_eq!(d.scope_count, scopes);
    }

    #[test]
    fn arbitrary_structure_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut t = table(b"DMAR", 1, &[&[38u8, 1], &[0u8; 10][..], &body].concat());
        if let Ok(d) = dmar_of(&t) {
            walk(&d);
        }
        t.truncate(t.len() / 2);
        if let Ok(d) = dmar_of(&t) {
            walk(&d);
        }
    }

    #[test]
    fn mutated_qemu_table_never_panics(flips in proptest::collection::vec((0usize..128, any::<u8>()), 1..6)) {
        let mut t = QEMU_DMAR.to_vec();
        for (at, v) in flips {
            t[at] = v;
        }
        if let Ok(d) = dmar_of(&t) {
            walk(&d);
        }
        let mut mem = FakeMemory::default();
        mem.put(0x1000, t);
        let _ = read_table(&mem, 0x1000, None);
    }

    #[test]
    fn arbitrary_rsdp_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = Rsdp::parse(&bytes);
    }
}

/// A model of PCI configuration space: functions (source id) with a
/// vendor/device id, a header type and, for bridges, their bus numbers.
#[derive(Default)]
struct ConfigSpace(BTreeMap<(u16, u8), u32>);

impl ConfigSpace {
    fn endpoint(mut self, source: u16) -> Self {
        self.0.insert((source, 0), 0x11e8_1234);
        self
    }
    fn bridge(mut self, source: u16, secondary: u8, subordinate: u8) -> Self {
        self.0.insert((source, 0), 0x000c_1b36);
        self.0.insert((source, 0x0c), 1 << 16);
        let primary = u32::from(source >> 8);
        self.0.insert(
            (source, 0x18),
            primary | u32::from(secondary) << 8 | u32::from(subordinate) << 16,
        );
        self
    }
    fn read(&self, source: u16, offset: u8) -> u32 {
        match self.0.get(&(source, offset)) {
            Some(v) => *v,
            None if self.0.contains_key(&(source, 0)) => 0,
            None => u32::MAX,
        }
    }
}

fn scope(kind: ScopeKind, start_bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let s = DeviceScope {
        kind,
        enumeration_id: 0,
        start_bus,
        path: path
            .iter()
            .map(|&(device, function)| PciHop { device, function })
            .collect(),
    };
    DmarBuilder::new(39, 0)
        .drhd(false, 0, 0xfed9_0000, &[s])
        .build()
}

fn resolved(
    kind: ScopeKind,
    start_bus: u8,
    path: &[(u8, u8)],
    config: &ConfigSpace,
) -> Option<super::dmar::ResolvedScope> {
    let bytes = scope(kind, start_bus, path);
    let dmar = Dmar::parse([Table {
        address: 0x1000,
        bytes: &bytes,
    }])
    .unwrap();
    let d = dmar.drhds().next().unwrap();
    let s = d.scopes.iter().next().unwrap();
    s.resolve(&|source, offset| config.read(source, offset))
}

/// Issue 12 point 3: a scope whose path crosses PCI-PCI bridges leads to
/// the function behind them, each bridge's secondary bus read from its
/// configuration space; a sub-hierarchy covers every bus below its bridge.
#[test]
fn scope_paths_are_resolved_through_the_bridges_secondary_buses() {
    // 00:1c.0 -> bus 2 (2..=5); 02:00.0 -> bus 3; 03:00.1 the device.
    let config = ConfigSpace::default()
        .bridge(0x00e0, 2, 5)
        .bridge(0x0200, 3, 3)
        .endpoint(0x0301);
    // The same path with other secondary buses: another device.
    let moved = ConfigSpace::default()
        .bridge(0x00e0, 4, 5)
        .bridge(0x0400, 5, 5)
        .endpoint(0x0501);
    let path = [(0x1c, 0), (0, 0), (0, 1)];
    for (space, device) in [(&config, 0x0301), (&moved, 0x0501)] {
        let r = resolved(ScopeKind::PciEndpoint, 0, &path, space).unwrap();
        assert_eq!(r.source, device);
        assert!(r.covers(device));
        assert!(!r.covers(device - 1), "another function on that bus");
        assert!(!r.covers(0x0001), "the same device.function on bus 0");
    }

    // A sub-hierarchy: the bridge and everything below it.
    let r = resolved(ScopeKind::PciSubHierarchy, 0, &[(0x1c, 0)], &config).unwrap();
    assert_eq!((r.source, r.below), (0x00e0, Some((2, 5))));
    assert!(r.covers(0x00e0) && r.covers(0x0301) && r.covers(0x0500));
    assert!(!r.covers(0x0600) && !r.covers(0x0100) && !r.covers(0x00e1));

    // A direct endpoint needs no configuration space.
    let r = resolved(
        ScopeKind::PciEndpoint,
        0,
        &[(3, 0)],
        &ConfigSpace::default(),
    )
    .unwrap();
    assert_eq!((r.source, r.below), (0x0018, None));
}

/// A path through something that is not a configured bridge leads
/// nowhere (the scope covers nothing), as do non-PCI scopes.
#[test]
fn scope_paths_through_non_bridges_lead_nowhere() {
    let config = ConfigSpace::default()
        .endpoint(0x00e0)
        .bridge(0x00e8, 0, 0)
        .bridge(0x0010, 0, 0);
    let path = |first: (u8, u8)| [first, (0, 0)];
    for (what, first) in [
        ("an endpoint", (0x1c, 0)),
        ("an unconfigured bridge", (0x1d, 0)),
        ("nothing", (0x1e, 0)),
        ("a device number above 31", (0x20, 0)),
        ("a function number above 7", (0x1c, 8)),
    ] {
        assert_eq!(
            resolved(ScopeKind::PciEndpoint, 0, &path(first), &config),
            None,
            "{what}"
        );
    }
    assert_eq!(
        resolved(ScopeKind::IoApic, 0xff, &[(0, 0)], &config),
        None,
        "an IOAPIC scope names no PCI function"
    );
    assert_eq!(
        resolved(ScopeKind::PciEndpoint, 0, &[], &config),
        None,
        "an empty path"
    );
}
