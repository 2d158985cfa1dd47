//! Host tests: page tables built by a test-side builder in a model of guest
//! RAM, translated by the walker; a property test against the builder's
//! mappings as the reference; and a fuzz test on hostile memory contents.

extern crate std;

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::format;
use std::string::ToString;
use std::vec::Vec;

/// The error of a read outside the model's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OutsideRam(u64);

impl fmt::Display for OutsideRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpa {:#x} is not guest RAM", self.0)
    }
}

/// Guest RAM: a set of 4-KiB pages, zero until written, in 8-byte words.
#[derive(Default)]
struct Ram {
    pages: BTreeSet<u64>,
    words: BTreeMap<u64, u64>,
}

impl Ram {
    fn add_page(&mut self, gpa: u64) {
        assert_eq!(gpa & 0xFFF, 0);
        self.pages.insert(gpa);
    }

    fn has(&self, gpa: u64) -> bool {
        self.pages.contains(&(gpa & !0xFFF))
    }

    fn get(&self, gpa: u64) -> u64 {
        assert_eq!(gpa & 7, 0, "unaligned 8-byte read at {gpa:#x}");
        self.words.get(&gpa).copied().unwrap_or(0)
    }

    fn set(&mut self, gpa: u64, value: u64) {
        assert_eq!(gpa & 7, 0);
        assert!(self.has(gpa), "write outside RAM at {gpa:#x}");
        self.words.insert(gpa, value);
    }

    fn get32(&self, gpa: u64) -> u32 {
        assert_eq!(gpa & 3, 0, "unaligned 4-byte read at {gpa:#x}");
        (self.get(gpa & !7) >> ((gpa & 4) * 8)) as u32
    }

    fn set32(&mut self, gpa: u64, value: u32) {
        assert_eq!(gpa & 3, 0);
        let shift = (gpa & 4) * 8;
        let word = self.get(gpa & !7) & !(0xFFFF_FFFFu64 << shift);
        self.set(gpa & !7, word | u64::from(value) << shift);
    }
}

impl GuestMemory for Ram {
    type Error = OutsideRam;
    fn read_u64(&mut self, gpa: u64) -> Result<u64, OutsideRam> {
        if !self.has(gpa) {
            return Err(OutsideRam(gpa));
        }
        Ok(self.get(gpa))
    }
    fn read_u32(&mut self, gpa: u64) -> Result<u32, OutsideRam> {
        if !self.has(gpa) {
            return Err(OutsideRam(gpa));
        }
        Ok(self.get32(gpa))
    }
}

const LONG4: Paging = Paging::Long4 { nxe: true };
const LONG5: Paging = Paging::Long5 { nxe: true };
const PAE: Paging = Paging::Pae { nxe: true };
const PSE: Paging = Paging::Legacy32 { pse: true };
const NOPSE: Paging = Paging::Legacy32 { pse: false };

/// One level of a mode's tables, as the builder sees it.
#[derive(Clone, Copy)]
struct Lvl {
    level: Level,
    shift: u32,
    index_bits: u32,
    entry_bytes: u64,
}

fn layout(paging: Paging) -> Vec<Lvl> {
    let l = |level, shift, index_bits, entry_bytes| Lvl {
        level,
        shift,
        index_bits,
        entry_bytes,
    };
    match paging {
        Paging::Off => Vec::new(),
        Paging::Legacy32 { .. } => [l(Level::Pd, 22, 10, 4), l(Level::Pt, 12, 10, 4)].into(),
        Paging::Pae { .. } => [
            l(Level::Pdpt, 30, 2, 8),
            l(Level::Pd, 21, 9, 8),
            l(Level::Pt, 12, 9, 8),
        ]
        .into(),
        Paging::Long4 { .. } => [
            l(Level::Pml4, 39, 9, 8),
            l(Level::Pdpt, 30, 9, 8),
            l(Level::Pd, 21, 9, 8),
            l(Level::Pt, 12, 9, 8),
        ]
        .into(),
        Paging::Long5 { .. } => [
            l(Level::Pml5, 48, 9, 8),
            l(Level::Pml4, 39, 9, 8),
            l(Level::Pdpt, 30, 9, 8),
            l(Level::Pd, 21, 9, 8),
            l(Level::Pt, 12, 9, 8),
        ]
        .into(),
    }
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;
const XD: u64 = 1 << 63;

/// Builds page tables in fresh RAM, the way a guest kernel would, without
/// the walker's code.
struct Builder {
    paging: Paging,
    ram: Ram,
    cr3: u64,
    next: u64,
}

impl Builder {
    /// Tables are allocated from 16 MiB up; a PAE PDPT sits 0x40 into its
    /// page, and its CR3 has PWT and PCD set (bits 3 and 4, not address).
    fn new(paging: Paging) -> Self {
        let mut b = Self {
            paging,
            ram: Ram::default(),
            cr3: 0,
            next: 0x100_0000,
        };
        let root = b.alloc();
        b.cr3 = match paging {
            Paging::Pae { .. } => root | 0x40 | 0x18,
            _ => root,
        };
        b
    }

    fn alloc(&mut self) -> u64 {
        let page = self.next;
        self.next += 0x1000;
        self.ram.add_page(page);
        page
    }

    fn read(&self, gpa: u64, bytes: u64) -> u64 {
        if bytes == 4 {
            u64::from(self.ram.get32(gpa))
        } else {
            self.ram.get(gpa)
        }
    }

    fn write(&mut self, gpa: u64, bytes: u64, value: u64) {
        if bytes == 4 {
            self.ram.set32(gpa, u32::try_from(value).unwrap());
        } else {
            self.ram.set(gpa, value);
        }
    }

    fn entry_bytes(&self) -> u64 {
        layout(self.paging)[0].entry_bytes
    }

    /// The address of the entry of `level` for `gva`, making the tables
    /// above it (present, writable, user; a PAE PDPTE only present, its
    /// R/W and U/S bits being reserved).
    fn slot(&mut self, gva: u64, level: Level) -> u64 {
        let mut table = match self.paging {
            Paging::Pae { .. } => self.cr3 & 0xFFFF_FFE0,
            _ => self.cr3 & !0xFFF,
        };
        for lvl in layout(self.paging) {
            let index = (gva >> lvl.shift) & ((1 << lvl.index_bits) - 1);
            let addr = table + index * lvl.entry_bytes;
            if lvl.level == level {
                return addr;
            }
            let value = self.read(addr, lvl.entry_bytes);
            if value & P == 0 {
                let new = self.alloc();
                let flags = match (self.paging, lvl.level) {
                    (Paging::Pae { .. }, Level::Pdpt) => P,
                    _ => P | RW | US,
                };
                self.write(addr, lvl.entry_bytes, new | flags);
                table = new;
            } else {
                assert_eq!(value & PS, 0, "a large page is in the way");
                table = value & 0x000F_FFFF_FFFF_F000;
            }
        }
        panic!("no level {level:?} in {:?}", self.paging)
    }

    /// Maps the page of `size` at `gva` to `gpa` with the leaf's `flags`
    /// (R/W, U/S, XD) on top of P (and PS).
    fn map(&mut self, gva: u64, gpa: u64, size: PageSize, flags: u64) {
        assert_eq!(gva & size.offset_mask(), 0);
        assert_eq!(gpa & size.offset_mask(), 0);
        let (level, value) = match size {
            PageSize::Size4KiB => (Level::Pt, gpa),
            PageSize::Size2MiB => (Level::Pd, gpa | PS),
            PageSize::Size1GiB => (Level::Pdpt, gpa | PS),
            // PSE-36: physical-address bits 39:32 in PDE bits 20:13.
            PageSize::Size4MiB => (Level::Pd, (gpa & 0xFFC0_0000) | (gpa >> 32) << 13 | PS),
        };
        let slot = self.slot(gva, level);
        let bytes = self.entry_bytes();
        self.write(slot, bytes, value | P | flags);
    }

    /// Changes the entry of `level` for `gva` (which must exist).
    fn edit(&mut self, gva: u64, level: Level, f: impl FnOnce(u64) -> u64) -> Entry {
        let gpa = self.slot(gva, level);
        let bytes = self.entry_bytes();
        let value = f(self.read(gpa, bytes));
        self.write(gpa, bytes, value);
        Entry { level, gpa, value }
    }

    fn translate(&mut self, gva: u64) -> Result<Translation, WalkError<OutsideRam>> {
        translate(&mut self.ram, self.paging, self.cr3, gva)
    }

    fn translate_with(
        &mut self,
        gva: u64,
        maxphyaddr: u8,
    ) -> Result<Translation, WalkError<OutsideRam>> {
        translate_with(&mut self.ram, self.paging, self.cr3, gva, maxphyaddr)
    }
}

fn levels(t: &Translation) -> Vec<Level> {
    t.path.entries().iter().map(|e| e.level).collect()
}

#[test]
fn paging_modes_follow_table_4_1() {
    const PG: u64 = CR0_PG | 1; // and PE
    assert_eq!(paging_mode(1, CR4_PAE, EFER_LME | EFER_NXE), Paging::Off);
    assert_eq!(
        paging_mode(PG, 0, EFER_NXE),
        Paging::Legacy32 { pse: false }
    );
    assert_eq!(
        paging_mode(PG, CR4_PSE | CR4_LA57, 0),
        Paging::Legacy32 { pse: true }
    );
    assert_eq!(paging_mode(PG, CR4_PAE, 0), Paging::Pae { nxe: false });
    assert_eq!(
        paging_mode(PG, CR4_PAE | CR4_PSE, EFER_NXE),
        Paging::Pae { nxe: true }
    );
    // LA57 means nothing outside IA-32e mode.
    assert_eq!(
        paging_mode(PG, CR4_PAE | CR4_LA57, EFER_NXE),
        Paging::Pae { nxe: true }
    );
    let long = EFER_LME | EFER_LMA;
    assert_eq!(paging_mode(PG, CR4_PAE, long), Paging::Long4 { nxe: false });
    assert_eq!(
        paging_mode(PG, CR4_PAE, long | EFER_NXE),
        Paging::Long4 { nxe: true }
    );
    assert_eq!(
        paging_mode(PG, CR4_PAE | CR4_LA57, long | EFER_NXE),
        Paging::Long5 { nxe: true }
    );
    assert_eq!(LONG4.to_string(), "4-level paging");
}

#[test]
fn paging_off_is_the_identity_below_4_gib() {
    let mut ram = Ram::default();
    let t = translate(&mut ram, Paging::Off, 0xdead_0000, 0xFFFF_FFFF).unwrap();
    assert_eq!(t.gpa, 0xFFFF_FFFF);
    assert_eq!(t.size, PageSize::Size4KiB);
    assert!(t.writable && t.user && !t.no_execute);
    assert!(t.path.entries().is_empty());
    assert_eq!(
        translate(&mut ram, Paging::Off, 0, 1 << 32),
        Err(WalkError::AboveFourGiB { gva: 1 << 32 })
    );
}

#[test]
fn long4_4kib_page_and_its_path() {
    let mut b = Builder::new(LONG4);
    let gva = 0x0000_7F12_3456_7000;
    b.map(gva, 0x0008_1234_5678_9000, PageSize::Size4KiB, RW | US);
    let t = b.translate(gva | 0xABC).unwrap();
    assert_eq!(t.gpa, 0x0008_1234_5678_9ABC);
    assert_eq!(t.size, PageSize::Size4KiB);
    assert!(t.writable && t.user && !t.no_execute);
    assert_eq!(levels(&t), [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]);
    // The entries are where the builder put them, in their tables, at the
    // gva's indexes.
    for e in t.path.entries() {
        assert_eq!(e.gpa, b.slot(gva, e.level));
        assert_eq!(e.value, b.ram.get(e.gpa));
    }
    assert_eq!(
        t.path.entries()[0].gpa,
        b.cr3 | ((0x7F12_3456_7000 >> 39) * 8)
    );
    assert_eq!(
        t.path.leaf().unwrap().value,
        0x0008_1234_5678_9000 | P | RW | US
    );
}

#[test]
fn long4_2mib_and_1gib_pages_in_the_high_half() {
    let mut b = Builder::new(LONG4);
    let g2 = 0xFFFF_8000_0020_0000;
    let g1 = 0xFFFF_FFFF_C000_0000;
    b.map(g2, 0x1_2340_0000, PageSize::Size2MiB, RW);
    b.map(g1, 0x40_C000_0000, PageSize::Size1GiB, 0);
    let t = b.translate(g2 + 0x1F_FFFF).unwrap();
    assert_eq!(t.gpa, 0x1_2340_0000 + 0x1F_FFFF);
    assert_eq!(t.size, PageSize::Size2MiB);
    assert_eq!(levels(&t), [Level::Pml4, Level::Pdpt, Level::Pd]);
    assert!(t.writable && !t.user);
    let t = b.translate(g1 + 0x2345_6789).unwrap();
    assert_eq!(t.gpa, 0x40_C000_0000 + 0x2345_6789);
    assert_eq!(t.size, PageSize::Size1GiB);
    assert_eq!(levels(&t), [Level::Pml4, Level::Pdpt]);
    assert!(!t.writable && !t.user);
    // PAT (bit 12) of a large page is not an address bit.
    b.edit(g2, Level::Pd, |v| v | 1 << 12);
    assert_eq!(b.translate(g2).unwrap().gpa, 0x1_2340_0000);
    b.edit(g1, Level::Pdpt, |v| v | 1 << 12);
    assert_eq!(b.translate(g1).unwrap().gpa, 0x40_C000_0000);
}

#[test]
fn long5_uses_57_bit_addresses() {
    let mut b = Builder::new(LONG5);
    let gva = 0x00AB_CDEF_0123_4000;
    b.map(gva, 0x5000, PageSize::Size4KiB, RW | US);
    let t = b.translate(gva + 8).unwrap();
    assert_eq!(t.gpa, 0x5008);
    assert_eq!(
        levels(&t),
        [Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]
    );
    let high = 0xFF80_0000_0000_0000;
    b.map(high, 0x4000_0000, PageSize::Size1GiB, 0);
    assert_eq!(b.translate(high + 5).unwrap().gpa, 0x4000_0005);
    for gva in [0x0100_0000_0000_0000, 0xFE00_0000_0000_0000] {
        assert_eq!(
            b.translate(gva),
            Err(WalkError::NonCanonical { gva, width: 57 })
        );
    }
}

#[test]
fn non_canonical_addresses_are_refused_before_any_read() {
    // An empty RAM: a read would fail with Memory.
    let mut ram = Ram::default();
    for gva in [
        0x0000_8000_0000_0000,
        0xFFFF_7FFF_FFFF_FFFF,
        0x8000_0000_0000_0000,
        0x0001_0000_0000_0000,
    ] {
        assert_eq!(
            translate(&mut ram, LONG4, 0x1000, gva),
            Err(WalkError::NonCanonical { gva, width: 48 })
        );
    }
    let e = translate(&mut ram, LONG4, 0x1000, 0x0000_8000_0000_0000).unwrap_err();
    assert_eq!(
        e.to_string(),
        "gva 0x800000000000 is not canonical (48-bit linear addresses)"
    );
}

#[test]
fn addresses_above_4_gib_in_32_bit_modes() {
    let mut ram = Ram::default();
    for paging in [PAE, PSE, NOPSE, Paging::Off] {
        let gva = 0x1_0000_0000;
        let e = translate(&mut ram, paging, 0x1000, gva).unwrap_err();
        assert_eq!(e, WalkError::AboveFourGiB { gva });
        assert_eq!(
            e.to_string(),
            "gva 0x100000000 is above 4 GiB (32-bit linear addresses)"
        );
    }
}

#[test]
fn not_present_at_each_level() {
    let cases: [(Paging, &[Level]); 5] = [
        (LONG4, &[Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]),
        (
            LONG5,
            &[Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt],
        ),
        (PAE, &[Level::Pdpt, Level::Pd, Level::Pt]),
        (PSE, &[Level::Pd, Level::Pt]),
        (NOPSE, &[Level::Pd, Level::Pt]),
    ];
    for (paging, lvls) in cases {
        for &level in lvls {
            let mut b = Builder::new(paging);
            let gva = 0x8765_4000;
            b.map(gva, 0x7000, PageSize::Size4KiB, RW | US);
            // Every other bit left as it was: only P says present.
            let entry = b.edit(gva, level, |v| v & !P);
            let e = b.translate(gva).unwrap_err();
            assert_eq!(e, WalkError::NotPresent(entry), "{paging} {level}");
            assert_eq!(e.entry(), Some(&entry));
            assert_eq!(
                e.to_string(),
                format!(
                    "not present: {} at gpa {:#x} = {:#x}",
                    level.name(),
                    entry.gpa,
                    entry.value
                )
            );
        }
        // And a gva nothing maps stops at a zero entry.
        let mut b = Builder::new(paging);
        b.map(0x8765_4000, 0x7000, PageSize::Size4KiB, 0);
        assert!(matches!(
            b.translate(0x8765_5000),
            Err(WalkError::NotPresent(Entry {
                level: Level::Pt,
                value: 0,
                ..
            }))
        ));
    }
}

/// Sets `bit` in the entry of `level` and expects a Reserved error naming
/// exactly it.
fn expect_reserved(b: &mut Builder, gva: u64, level: Level, bit: u64) {
    let entry = b.edit(gva, level, |v| v | bit);
    assert_eq!(
        b.translate(gva),
        Err(WalkError::Reserved { entry, bits: bit }),
        "{} {level} bit {bit:#x}",
        b.paging
    );
}

#[test]
fn reserved_bits_in_4_and_5_level_paging() {
    let gva = 0x4000_0000_0000;
    // PS in a PML4E or PML5E.
    let mut b = Builder::new(LONG4);
    b.map(gva, 0x1000, PageSize::Size4KiB, RW);
    expect_reserved(&mut b, gva, Level::Pml4, PS);
    let mut b = Builder::new(LONG5);
    b.map(gva, 0x1000, PageSize::Size4KiB, RW);
    expect_reserved(&mut b, gva, Level::Pml5, PS);
    // Bits 29:13 of a 1-GiB PDPTE, 20:13 of a 2-MiB PDE.
    for bit in [13, 20, 29] {
        let mut b = Builder::new(LONG4);
        b.map(gva, 0x4000_0000, PageSize::Size1GiB, RW);
        expect_reserved(&mut b, gva, Level::Pdpt, 1 << bit);
    }
    for bit in [13, 20] {
        let mut b = Builder::new(LONG4);
        b.map(gva, 0x20_0000, PageSize::Size2MiB, RW);
        expect_reserved(&mut b, gva, Level::Pd, 1 << bit);
    }
    // XD without IA32_EFER.NXE, at any level.
    for level in [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt] {
        let mut b = Builder::new(Paging::Long4 { nxe: false });
        b.map(gva, 0x1000, PageSize::Size4KiB, RW);
        expect_reserved(&mut b, gva, level, XD);
    }
    // Bits 62:52 are ignored, not reserved, and not address bits.
    let mut b = Builder::new(LONG4);
    b.map(gva, 0x1000, PageSize::Size4KiB, RW);
    for level in [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt] {
        b.edit(gva, level, |v| v | 0x7FF0_0000_0000_0000);
    }
    assert_eq!(b.translate(gva).unwrap().gpa, 0x1000);
}

#[test]
fn address_bits_at_and_above_maxphyaddr_are_reserved() {
    let gva = 0x7000;
    let mut b = Builder::new(LONG4);
    b.map(gva, 1 << 45 | 0x3000, PageSize::Size4KiB, 0);
    // With MAXPHYADDR 52 (translate's), bit 45 is an address bit...
    assert_eq!(b.translate(gva).unwrap().gpa, 1 << 45 | 0x3000);
    assert_eq!(b.translate_with(gva, 46).unwrap().gpa, 1 << 45 | 0x3000);
    // ... and with 40, a reserved one.
    let entry = b.edit(gva, Level::Pt, |v| v);
    assert_eq!(
        b.translate_with(gva, 40),
        Err(WalkError::Reserved {
            entry,
            bits: 1 << 45
        })
    );
    // In a table pointer too.
    let entry = b.edit(gva, Level::Pdpt, |v| v | 1 << 51);
    let e = b.translate_with(gva, 40).unwrap_err();
    assert_eq!(
        e,
        WalkError::Reserved {
            entry,
            bits: 1 << 51
        }
    );
    assert_eq!(
        e.to_string(),
        format!(
            "reserved bits 0x8000000000000 set: PDPTE at gpa {:#x} = {:#x}",
            entry.gpa, entry.value
        )
    );
    // Out-of-range MAXPHYADDRs are clamped to 32..=52, never panic.
    for m in [0, 1, 31, 53, 64, 255] {
        let _ = b.translate_with(gva, m);
    }
}

#[test]
fn pae_4kib_and_2mib_pages() {
    let mut b = Builder::new(PAE);
    assert_eq!(b.cr3 & 0xFFF, 0x58, "PDPT at CR3 bits 31:5");
    let g4 = 0xC012_3000;
    let g2 = 0x4060_0000;
    b.map(g4, 0xF_0000_1000, PageSize::Size4KiB, RW | US);
    b.map(g2, 0x8000_0000, PageSize::Size2MiB, US | XD);
    let t = b.translate(g4 + 0xFFF).unwrap();
    assert_eq!(t.gpa, 0xF_0000_1FFF);
    assert_eq!(t.size, PageSize::Size4KiB);
    assert_eq!(levels(&t), [Level::Pdpt, Level::Pd, Level::Pt]);
    assert_eq!(t.path.entries()[0].gpa, (b.cr3 & !0x1F) + 3 * 8);
    assert!(t.writable && t.user && !t.no_execute);
    let t = b.translate(g2 + 0x12345).unwrap();
    assert_eq!(t.gpa, 0x8001_2345);
    assert_eq!(t.size, PageSize::Size2MiB);
    assert_eq!(levels(&t), [Level::Pdpt, Level::Pd]);
    assert!(!t.writable && t.user && t.no_execute);
    // CR3 bits above 31 are not part of the PDPT's address.
    let t = translate(&mut b.ram, PAE, b.cr3 | 0xFF_0000_0000, g4).unwrap();
    assert_eq!(t.gpa, 0xF_0000_1000);
}

#[test]
fn reserved_bits_in_pae_paging() {
    let gva = 0x4000_1000;
    // A PDPTE's bits 2:1 (where R/W and U/S would be), 8:5 and 63:52.
    for bit in [1, 2, 5, 7, 8, 52, 63] {
        let mut b = Builder::new(PAE);
        b.map(gva, 0x1000, PageSize::Size4KiB, RW);
        expect_reserved(&mut b, gva, Level::Pdpt, 1 << bit);
    }
    // Bits 62:52 of a PDE and PTE (ignored in 4-level paging), and XD
    // without NXE.
    for level in [Level::Pd, Level::Pt] {
        for bit in [1 << 52, 1 << 62] {
            let mut b = Builder::new(PAE);
            b.map(gva, 0x1000, PageSize::Size4KiB, RW);
            expect_reserved(&mut b, gva, level, bit);
        }
        let mut b = Builder::new(Paging::Pae { nxe: false });
        b.map(gva, 0x1000, PageSize::Size4KiB, RW);
        expect_reserved(&mut b, gva, level, XD);
    }
    let mut b = Builder::new(PAE);
    b.map(0x20_0000, 0x40_0000, PageSize::Size2MiB, RW);
    expect_reserved(&mut b, 0x20_0000, Level::Pd, 1 << 13);
}

#[test]
fn legacy32_4kib_and_4mib_pages() {
    let mut b = Builder::new(PSE);
    let g4 = 0xC000_5000;
    let g4m = 0xC040_0000;
    b.map(g4, 0xFFFF_F000, PageSize::Size4KiB, RW | US);
    // PSE-36: physical-address bits 39:32 = 0xAB from PDE bits 20:13.
    b.map(g4m, 0xAB_7FC0_0000, PageSize::Size4MiB, US);
    let t = b.translate(g4 + 0x123).unwrap();
    assert_eq!(t.gpa, 0xFFFF_F123);
    assert_eq!(t.size, PageSize::Size4KiB);
    assert_eq!(levels(&t), [Level::Pd, Level::Pt]);
    assert_eq!(t.path.entries()[0].gpa, b.cr3 + (0xC000_5000 >> 22) * 4);
    assert_eq!(t.path.entries()[1].gpa % 4, 0);
    assert!(t.writable && t.user && !t.no_execute);
    let t = b.translate(g4m + 0x3F_FFFF).unwrap();
    assert_eq!(t.gpa, 0xAB_7FFF_FFFF);
    assert_eq!(t.size, PageSize::Size4MiB);
    assert_eq!(levels(&t), [Level::Pd]);
    assert!(!t.writable && t.user);
    // Bit 21 is reserved, and bits 20:17 with MAXPHYADDR 36 (PSE-36 then
    // gives bits 35:32 from PDE bits 16:13).
    let entry = b.edit(g4m, Level::Pd, |v| (v & !(0xFF << 13)) | (0xF << 13));
    assert_eq!(b.translate_with(g4m, 36).unwrap().gpa, 0xF_7FC0_0000);
    assert_eq!(
        b.translate_with(g4m, 36).unwrap(),
        b.translate(g4m).unwrap()
    );
    let entry = Entry {
        value: entry.value | 1 << 17,
        ..entry
    };
    b.edit(g4m, Level::Pd, |_| entry.value);
    assert_eq!(
        b.translate_with(g4m, 36),
        Err(WalkError::Reserved {
            entry,
            bits: 1 << 17
        })
    );
    assert_eq!(b.translate(g4m).unwrap().gpa, 0x1F_7FC0_0000);
    expect_reserved(&mut b, g4m, Level::Pd, 1 << 21);
    // The 32-bit walk reads 4-byte entries: the neighbour PDE shares the
    // 8-byte word and is untouched by all this.
    let t = b.translate(g4).unwrap();
    assert_eq!(t.gpa, 0xFFFF_F000);
}

#[test]
fn legacy32_without_pse_ignores_ps() {
    let mut b = Builder::new(NOPSE);
    let gva = 0x0040_3000;
    b.alloc(); // the page table at 0x100_2000: bit 13 set
    b.map(gva, 0x9000, PageSize::Size4KiB, RW | US);
    let pde = b.edit(gva, Level::Pd, |v| v | PS);
    let t = b.translate(gva).unwrap();
    assert_eq!(t.gpa, 0x9000);
    assert_eq!(t.size, PageSize::Size4KiB);
    assert_eq!(levels(&t), [Level::Pd, Level::Pt]);
    // The same tables with CR4.PSE = 1: a 4-MiB page, the page table's
    // address bits 31:22 and (PSE-36) 20:13 read as its own.
    let t = translate(&mut b.ram, PSE, b.cr3, gva).unwrap();
    assert_eq!(t.size, PageSize::Size4MiB);
    let high = (pde.value >> 13) & 0xFF;
    assert_ne!(high, 0);
    assert_eq!(
        t.gpa,
        (pde.value & 0xFFC0_0000) | high << 32 | (gva & 0x3F_FFFF)
    );
    // Bits 63:32 of CR3 are not an address in 32-bit paging, and bits
    // 11:0 are flags.
    let t = translate(&mut b.ram, NOPSE, b.cr3 | 0xFFFF_FFFF_0000_0018, gva).unwrap();
    assert_eq!(t.gpa, 0x9000);
}

#[test]
fn cr3_or_an_entry_outside_ram() {
    let mut b = Builder::new(LONG4);
    let gva = 0x1234_5000;
    b.map(gva, 0x1000, PageSize::Size4KiB, RW);
    for paging in [LONG4, LONG5, PAE, PSE] {
        let cr3 = 0xDEAD_B000;
        let e = translate(&mut b.ram, paging, cr3, gva).unwrap_err();
        let WalkError::Memory { level, gpa, error } = e else {
            panic!("{paging}: {e:?}");
        };
        assert_eq!(error, OutsideRam(gpa));
        assert_eq!(gpa & !0xFFF, cr3, "{paging}");
        assert_eq!(level, layout(paging)[0].level);
    }
    let e = translate(&mut b.ram, LONG4, 0xDEAD_B000, gva).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot read the PML4E at gpa 0xdeadb000: gpa 0xdeadb000 is not guest RAM"
    );
    // A PDPTE pointing outside RAM: the PDE cannot be read.
    b.edit(gva, Level::Pdpt, |v| (v & 0xFFF) | 0x7_0000_0000);
    assert_eq!(
        b.translate(gva),
        Err(WalkError::Memory {
            level: Level::Pd,
            gpa: 0x7_0000_0000 | (((gva >> 21) & 0x1FF) * 8),
            error: OutsideRam(0x7_0000_0000 | (((gva >> 21) & 0x1FF) * 8)),
        })
    );
    // map_memory keeps everything but the error.
    let e = b.translate(gva).unwrap_err().map_memory(|OutsideRam(a)| a);
    assert!(matches!(e, WalkError::Memory { level: Level::Pd, error, .. } if error >> 32 == 7));
}

#[test]
fn rights_accumulate_over_the_walk() {
    let gva = 0x7F00_0000_0000;
    let fresh = |paging| {
        let mut b = Builder::new(paging);
        b.map(gva, 0x1000, PageSize::Size4KiB, RW | US);
        b
    };
    let mut b = fresh(LONG4);
    let t = b.translate(gva).unwrap();
    assert!(t.writable && t.user && !t.no_execute);
    // A read-only entry at any level makes the page read-only, even with a
    // writable PTE; a supervisor one makes it supervisor; XD anywhere makes
    // it no-execute.
    for level in [Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt] {
        let mut b = fresh(LONG4);
        b.edit(gva, level, |v| v & !RW);
        let t = b.translate(gva).unwrap();
        assert!(!t.writable && t.user && !t.no_execute, "{level}");
        let mut b = fresh(LONG4);
        b.edit(gva, level, |v| v & !US);
        let t = b.translate(gva).unwrap();
        assert!(t.writable && !t.user && !t.no_execute, "{level}");
        let mut b = fresh(LONG4);
        b.edit(gva, level, |v| v | XD);
        let t = b.translate(gva).unwrap();
        assert!(t.writable && t.user && t.no_execute, "{level}");
    }
    // On a 2-MiB page too, through its PDE's own bits and those above.
    let mut b = Builder::new(LONG4);
    b.map(gva, 0x20_0000, PageSize::Size2MiB, RW | US);
    b.edit(gva, Level::Pml4, |v| v & !RW);
    let t = b.translate(gva).unwrap();
    assert!(!t.writable && t.user);
    // PAE: the PDE's bits count, the PDPTE has none.
    let gva = 0x4000_1000;
    let mut b = Builder::new(PAE);
    b.map(gva, 0x1000, PageSize::Size4KiB, RW | US);
    b.edit(gva, Level::Pd, |v| (v & !RW) | XD);
    let t = b.translate(gva).unwrap();
    assert!(!t.writable && t.user && t.no_execute);
    // 32-bit paging: a supervisor PDE over a user PTE.
    let mut b = Builder::new(NOPSE);
    b.map(gva, 0x1000, PageSize::Size4KiB, RW | US);
    b.edit(gva, Level::Pd, |v| v & !US);
    let t = b.translate(gva).unwrap();
    assert!(t.writable && !t.user && !t.no_execute);
}

// ---- property tests ----

/// A mode the property test builds tables for.
fn any_mode() -> impl Strategy<Value = Paging> {
    prop_oneof![Just(LONG4), Just(LONG5), Just(PAE), Just(PSE)]
}

/// A page size of `paging` by a choice number.
fn size_of(paging: Paging, choice: u8) -> PageSize {
    let sizes: &[PageSize] = match paging {
        Paging::Legacy32 { .. } => &[PageSize::Size4KiB, PageSize::Size4MiB],
        Paging::Pae { .. } => &[PageSize::Size4KiB, PageSize::Size2MiB],
        _ => &[PageSize::Size4KiB, PageSize::Size2MiB, PageSize::Size1GiB],
    };
    sizes[usize::from(choice) % sizes.len()]
}

/// A gva of `paging` from per-level index choices (each near either end of
/// its table, so that mappings share tables and the high half is used),
/// canonical in 4- and 5-level paging.
fn gva_of(paging: Paging, picks: &[u16; 5], offset: u64) -> u64 {
    let mut gva = 0;
    for (lvl, &pick) in layout(paging).iter().zip(picks) {
        let max = (1u64 << lvl.index_bits) - 1;
        let pick = u64::from(pick % 6);
        let index = if pick < 3 { pick } else { max - (pick - 3) };
        gva |= index << lvl.shift;
    }
    gva |= offset & 0xFFF;
    match paging {
        Paging::Long4 { .. } => ((gva << 16) as i64 >> 16) as u64,
        Paging::Long5 { .. } => ((gva << 7) as i64 >> 7) as u64,
        _ => gva,
    }
}

/// A gpa for a page of `size` in `paging` from random bits.
fn gpa_of(paging: Paging, size: PageSize, bits: u64) -> u64 {
    let reach = match (paging, size) {
        (Paging::Legacy32 { .. }, PageSize::Size4MiB) => 0xFF_FFFF_FFFF,
        (Paging::Legacy32 { .. }, _) => 0xFFFF_FFFF,
        _ => 0x000F_FFFF_FFFF_FFFF,
    };
    bits & reach & !size.offset_mask()
}

#[derive(Clone, Copy, Debug)]
struct Mapping {
    gva: u64,
    size: PageSize,
    gpa: u64,
    flags: u64,
}

impl Mapping {
    fn covers(&self, gva: u64) -> bool {
        gva.wrapping_sub(self.gva) < self.size.bytes()
    }

    fn overlaps(&self, other: &Mapping) -> bool {
        let (a, b) = (u128::from(self.gva), u128::from(other.gva));
        a < b + u128::from(other.size.bytes()) && b < a + u128::from(self.size.bytes())
    }
}

type Raw = ([u16; 5], u8, u64, u8);

fn raw_mapping() -> impl Strategy<Value = Raw> {
    (any::<[u16; 5]>(), any::<u8>(), any::<u64>(), any::<u8>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random mappings written into fresh tables by the builder: every
    /// mapped gva translates to its gpa with its size and rights, and every
    /// other gva is not present.
    #[test]
    fn translations_match_the_builders_mappings(
        paging in any_mode(),
        raws in proptest::collection::vec(raw_mapping(), 1..24),
        probes in proptest::collection::vec((any::<[u16; 5]>(), any::<u64>()), 0..32),
    ) {
        let mut b = Builder::new(paging);
        let mut maps: Vec<Mapping> = Vec::new();
        for (picks, choice, bits, flags) in raws {
            let size = size_of(paging, choice);
            let gva = gva_of(paging, &picks, 0) & !size.offset_mask();
            let mut leaf = 0;
            if flags & 1 != 0 { leaf |= RW; }
            if flags & 2 != 0 { leaf |= US; }
            if flags & 4 != 0 && !matches!(paging, Paging::Legacy32 { .. }) { leaf |= XD; }
            let m = Mapping { gva, size, gpa: gpa_of(paging, size, bits), flags: leaf };
            if maps.iter().all(|other| !other.overlaps(&m)) {
                b.map(m.gva, m.gpa, m.size, m.flags);
                maps.push(m);
            }
        }
        for m in &maps {
            for offset in [0, m.size.bytes() - 1, m.gpa.wrapping_mul(0x9E37_79B9) % m.size.bytes()] {
                let t = b.translate(m.gva + offset);
                let t = t.map_err(|e| format!("{m:x?} + {offset:#x}: {e}")).unwrap();
                prop_assert_eq!(t.gpa, m.gpa + offset);
                prop_assert_eq!(t.size, m.size);
                prop_assert_eq!(t.writable, m.flags & RW != 0);
                prop_assert_eq!(t.user, m.flags & US != 0);
                prop_assert_eq!(t.no_execute, m.flags & XD != 0);
                prop_assert_eq!(t.path.leaf().unwrap().level, match m.size {
                    PageSize::Size4KiB => Level::Pt,
                    PageSize::Size2MiB | PageSize::Size4MiB => Level::Pd,
                    PageSize::Size1GiB => Level::Pdpt,
                });
            }
        }
        for (picks, offset) in probes {
            let gva = gva_of(paging, &picks, offset);
            let mapped = maps.iter().find(|m| m.covers(gva));
            match (mapped, b.translate(gva)) {
                (Some(m), Ok(t)) => prop_assert_eq!(t.gpa, m.gpa + (gva - m.gva)),
                (None, Err(WalkError::NotPresent(e))) => prop_assert_eq!(e.value & P, 0),
                (m, r) => prop_assert!(false, "{gva:#x}: mapping {m:x?}, walk {r:x?}"),
            }
        }
    }
}

/// Hostile guest memory: the 8-byte words of `[0, pages * 4 KiB)` are a
/// hash of their address, shaped now and then into entries that point back
/// into it (with random flags), so that walks go deep; reads elsewhere
/// fail.
struct Hostile {
    seed: u64,
    pages: u64,
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Hostile {
    fn word(&self, gpa: u64) -> Result<u64, OutsideRam> {
        if gpa >= self.pages * 0x1000 {
            return Err(OutsideRam(gpa));
        }
        let h = mix(self.seed ^ gpa);
        let inside = (h >> 12) % (self.pages * 0x1000);
        let table = inside & !0xFFF;
        Ok(match mix(h) % 6 {
            0 => h,
            1 => 0,
            2 => table | (h & 0xFFF),
            3 => table | (h & 0xFFF) | P | (h & (XD | 0xFFF0_0000_0000_0000)),
            // A clean PAE PDPTE (PWT and PCD at most).
            4 => table | (h & 0x18) | P,
            _ => table | (h & (RW | US | PS)) | P,
        })
    }
}

impl GuestMemory for Hostile {
    type Error = OutsideRam;
    fn read_u64(&mut self, gpa: u64) -> Result<u64, OutsideRam> {
        assert_eq!(gpa & 7, 0);
        self.word(gpa)
    }
    fn read_u32(&mut self, gpa: u64) -> Result<u32, OutsideRam> {
        assert_eq!(gpa & 3, 0);
        Ok((self.word(gpa & !7)? >> ((gpa & 4) * 8)) as u32)
    }
}

fn any_paging() -> impl Strategy<Value = Paging> {
    prop_oneof![
        Just(Paging::Off),
        any::<bool>().prop_map(|pse| Paging::Legacy32 { pse }),
        any::<bool>().prop_map(|nxe| Paging::Pae { nxe }),
        any::<bool>().prop_map(|nxe| Paging::Long4 { nxe }),
        any::<bool>().prop_map(|nxe| Paging::Long5 { nxe }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Any memory, CR3, gva, mode and MAXPHYADDR: no panic, and what comes
    /// back is consistent.
    #[test]
    fn hostile_tables_never_panic(
        seed in any::<u64>(),
        pages in 1u64..64,
        paging in any_paging(),
        cr3 in any::<u64>(),
        cr3_inside in any::<bool>(),
        gva in prop_oneof![any::<u64>(), 0u64..0x1_0000_0000, any::<u64>().prop_map(|g| ((g << 16) as i64 >> 16) as u64)],
        maxphyaddr in prop_oneof![any::<u8>(), 32u8..=52],
    ) {
        let mut mem = Hostile { seed, pages };
        let cr3 = if cr3_inside { cr3 % (pages * 0x1000) } else { cr3 };
        match translate_with(&mut mem, paging, cr3, gva, maxphyaddr) {
            Ok(t) => {
                let mask = t.size.offset_mask();
                prop_assert_eq!(t.gpa & mask, gva & mask);
                let n = t.path.entries().len();
                prop_assert!(n <= 5);
                prop_assert_eq!(n == 0, paging == Paging::Off);
                if let Some(leaf) = t.path.leaf() {
                    prop_assert!(leaf.value & P != 0);
                    prop_assert_eq!(leaf.level == Level::Pt, t.size == PageSize::Size4KiB);
                }
                if matches!(paging, Paging::Legacy32 { .. } | Paging::Off) {
                    prop_assert!(t.gpa < 1 << 40 && !t.no_execute);
                } else {
                    prop_assert!(t.gpa < 1 << maxphyaddr.clamp(32, 52));
                }
                let _ = format!("{}", t.path);
            }
            Err(e) => {
                if let Some(entry) = e.entry() {
                    prop_assert_eq!(entry.gpa & 3, 0);
                }
                let _ = e.to_string();
            }
        }
    }
}
