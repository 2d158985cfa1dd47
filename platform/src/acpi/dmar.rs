//! The DMA Remapping table (Intel VT-d specification, chapter 8): the IOMMU
//! units (DRHD) and the reserved memory regions (RMRR) that firmware keeps
//! using for DMA, each with the devices it covers (RMRR-1).
//!
//! Several DMAR tables are merged into one [`Dmar`]: firmware may split them,
//! and tests inject an RMRR-only DMAR beside QEMU's own. Structures this
//! parser does not use (ATSR, RHSA, ANDD, SATC and newer types) are counted,
//! never silently dropped.
//!
//! No limit but the table's own: real servers list dozens of units and
//! hundreds of device scopes, and QEMU lists one scope per PCI device. The
//! tables are checked whole once, in [`Dmar::parse`]; the units, regions,
//! scopes and PCI paths are then read from the table bytes as they are
//! iterated ([`Dmar::drhds`], [`Dmar::rmrrs`], [`Scopes`], [`Path`]),
//! nothing copied.

use super::{Table, le_u16, le_u64};
use heapless::Vec;

/// The most DMAR tables merged (firmware gives one; boot tests inject a
/// second with `-acpitable`).
pub const MAX_TABLES: usize = 8;

/// Offset of the first remapping structure in a DMAR table.
const STRUCTURES_AT: usize = 48;

/// The merged DMA remapping description of the platform: the tables'
/// bytes, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dmar<'a> {
    /// DMA address width in bits (the table's HAW field plus one). Where
    /// merged tables disagree, the smallest.
    pub address_width: u8,
    /// The platform supports interrupt remapping.
    pub interrupt_remapping: bool,
    /// The firmware asks the OS not to enable x2APIC mode.
    pub x2apic_opt_out: bool,
    /// The firmware asks for DMA protection to stay on at handover.
    pub dma_ctrl_platform_opt_in: bool,
    /// How many DMAR tables were merged.
    pub tables: u8,
    /// Merged tables disagreed on the address width.
    pub width_conflict: bool,
    /// DRHD units, RMRRs and device scopes (of both) in all the tables.
    pub drhd_count: usize,
    pub rmrr_count: usize,
    pub scope_count: usize,
    /// Remapping structures of other types (ATSR, RHSA, ANDD, SATC, ...).
    pub other_structures: u16,
    /// Each table's bytes, checked.
    checked: Vec<&'a [u8], MAX_TABLES>,
}

/// A DMA-remapping hardware unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drhd<'a> {
    /// The unit covers every PCI device of its segment not claimed by another
    /// unit (INCLUDE_PCI_ALL).
    pub include_pci_all: bool,
    pub segment: u16,
    /// Physical address of the unit's register block.
    pub register_base: u64,
    /// Size of the register block in 4 KiB pages (2^Size field).
    pub register_pages: u32,
    pub scopes: Scopes<'a>,
}

/// A reserved memory region: firmware-owned memory that the listed devices
/// may DMA to at any time, so it must stay identity-mapped for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rmrr<'a> {
    pub segment: u16,
    /// First byte of the region.
    pub base: u64,
    /// Last byte of the region (inclusive, as in the table).
    pub limit: u64,
    pub scopes: Scopes<'a>,
}

impl Rmrr<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.limit - self.base + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a device scope names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ScopeKind {
    PciEndpoint,
    PciSubHierarchy,
    IoApic,
    HpetMsi,
    AcpiNamespace,
    Unknown(u8),
}

impl ScopeKind {
    fn from_byte(b: u8) -> Self {
        match b {
            1 => Self::PciEndpoint,
            2 => Self::PciSubHierarchy,
            3 => Self::IoApic,
            4 => Self::HpetMsi,
            5 => Self::AcpiNamespace,
            other => Self::Unknown(other),
        }
    }
}

/// The device scopes of one DRHD or RMRR (checked bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scopes<'a>(&'a [u8]);

impl<'a> Scopes<'a> {
    pub fn iter(&self) -> impl Iterator<Item = DeviceScope<'a>> + 'a {
        let mut rest = self.0;
        core::iter::from_fn(move || {
            let (&[kind, length, _, _, enumeration_id, start_bus], _) =
                rest.split_first_chunk::<6>()?;
            // Checked by `Dmar::parse`; never less than the 6 read above.
            let scope = rest.get(..usize::from(length).max(6))?;
            rest = &rest[scope.len()..];
            Some(DeviceScope {
                kind: ScopeKind::from_byte(kind),
                enumeration_id,
                start_bus,
                path: Path(&scope[6..]),
            })
        })
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One device (or hierarchy) a DRHD or RMRR applies to: a path of
/// (device, function) hops starting on `start_bus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceScope<'a> {
    pub kind: ScopeKind,
    /// IOAPIC id, HPET number or ACPI device number, by kind.
    pub enumeration_id: u8,
    pub start_bus: u8,
    pub path: Path<'a>,
}

impl DeviceScope<'_> {
    /// The bus/device/function of a device directly on the start bus; deeper
    /// paths need the bridges' bus numbers, read from PCI configuration space
    /// ([`DeviceScope::resolve`]).
    pub fn direct_bdf(&self) -> Option<(u8, u8, u8)> {
        match self.path.0 {
            [device, function] => Some((self.start_bus, *device, *function)),
            _ => None,
        }
    }

    /// Where a PCI scope's path leads (VT-d 8.3.1): every hop but the last
    /// is a PCI-PCI bridge on the current bus, whose secondary bus number
    /// (configuration offset 0x19) is the next hop's bus; `config(source,
    /// offset)` reads a configuration dword of segment-0-style source id
    /// `bus << 8 | device << 3 | function`. `None` for a scope that is not a
    /// PCI one, an empty path, a hop out of range, or a hop that should be a
    /// bridge and is not (no function answers, header type not 1, secondary
    /// bus 0 or not above its own).
    pub fn resolve(&self, config: &dyn Fn(u16, u8) -> u32) -> Option<ResolvedScope> {
        if !matches!(
            self.kind,
            ScopeKind::PciEndpoint | ScopeKind::PciSubHierarchy
        ) {
            return None;
        }
        let mut bus = self.start_bus;
        let mut source = None;
        let hops = self.path.len();
        for (i, hop) in self.path.iter().enumerate() {
            if hop.device > 31 || hop.function > 7 {
                return None;
            }
            let here = u16::from(bus) << 8 | u16::from(hop.device) << 3 | u16::from(hop.function);
            source = Some(here);
            if i + 1 < hops {
                bus = bridge_buses(here, config)?.0;
            }
        }
        let source = source?;
        let below = if self.kind == ScopeKind::PciSubHierarchy {
            bridge_buses(source, config)
        } else {
            None
        };
        Some(ResolvedScope { source, below })
    }
}

/// The (secondary, subordinate) bus numbers of a PCI-PCI bridge at
/// `source` (header type 1, configured: secondary above its own bus).
fn bridge_buses(source: u16, config: &dyn Fn(u16, u8) -> u32) -> Option<(u8, u8)> {
    let id = config(source, 0);
    let header = (config(source, 0x0c) >> 16) & 0x7f;
    let buses = config(source, 0x18);
    let (secondary, subordinate) = ((buses >> 8) as u8, (buses >> 16) as u8);
    (id & 0xffff != 0xffff && header == 1 && secondary > (source >> 8) as u8)
        .then_some((secondary, subordinate.max(secondary)))
}

/// A PCI device scope resolved through the bridges of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedScope {
    /// The function the path ends at (bus << 8 | device << 3 | function).
    pub source: u16,
    /// A sub-hierarchy scope: the buses below that bridge (secondary,
    /// subordinate), every function on them covered too.
    pub below: Option<(u8, u8)>,
}

impl ResolvedScope {
    /// Whether the scope covers function `source`.
    pub fn covers(&self, source: u16) -> bool {
        let bus = (source >> 8) as u8;
        source == self.source || self.below.is_some_and(|(lo, hi)| (lo..=hi).contains(&bus))
    }
}

/// The PCI path of a device scope: (device, function) hops, as many as the
/// scope holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Path<'a>(&'a [u8]);

impl<'a> Path<'a> {
    pub fn iter(&self) -> impl Iterator<Item = PciHop> + 'a {
        self.0.chunks_exact(2).map(|h| PciHop {
            device: h[0],
            function: h[1],
        })
    }

    pub fn len(&self) -> usize {
        self.0.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One step of a device-scope path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PciHop {
    pub device: u8,
    pub function: u8,
}

/// What was wrong with a DMAR table. Offsets count from the table's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DmarError {
    /// The table ends before the first remapping structure.
    TooShort { table: u64, length: usize },
    /// The table is not a DMAR.
    NotDmar { table: u64 },
    /// A remapping structure's length is too small for its type or runs past
    /// the end of the table.
    BadStructure {
        table: u64,
        offset: usize,
        kind: u16,
        length: u16,
    },
    /// A device scope's length is malformed or runs past its structure.
    BadScope {
        table: u64,
        offset: usize,
        length: u8,
    },
    /// More DMAR tables than [`MAX_TABLES`].
    TooManyTables { limit: usize },
}

/// The remapping structures of checked table bytes: (type, bytes).
fn structures(table: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut offset = STRUCTURES_AT;
    core::iter::from_fn(move || {
        if offset + 4 > table.len() {
            return None;
        }
        let kind = le_u16(table, offset);
        let end = offset + usize::from(le_u16(table, offset + 2));
        let s = table.get(offset..end)?;
        offset = end;
        Some((kind, s))
    })
}

impl<'a> Dmar<'a> {
    /// Checks and merges every DMAR table given. Fails on the first
    /// malformed table, naming it and the offset of the bad structure.
    pub fn parse(tables: impl IntoIterator<Item = Table<'a>>) -> Result<Self, DmarError> {
        let mut dmar = Dmar::default();
        for table in tables {
            dmar.merge(&table)?;
        }
        Ok(dmar)
    }

    /// The DRHD units of every table, in order.
    pub fn drhds(&self) -> impl Iterator<Item = Drhd<'a>> + '_ {
        self.checked.iter().flat_map(|t| {
            structures(t).filter(|&(k, _)| k == 0).map(|(_, s)| Drhd {
                include_pci_all: s[4] & 1 != 0,
                register_pages: 1u32 << (s[5] & 0xf),
                segment: le_u16(s, 6),
                register_base: le_u64(s, 8),
                scopes: Scopes(&s[16..]),
            })
        })
    }

    /// The RMRRs of every table, in order.
    pub fn rmrrs(&self) -> impl Iterator<Item = Rmrr<'a>> + '_ {
        self.checked.iter().flat_map(|t| {
            structures(t).filter(|&(k, _)| k == 1).map(|(_, s)| Rmrr {
                segment: le_u16(s, 6),
                base: le_u64(s, 8),
                limit: le_u64(s, 16),
                scopes: Scopes(&s[24..]),
            })
        })
    }

    fn merge(&mut self, table: &Table<'a>) -> Result<(), DmarError> {
        let at = table.address;
        let b = table.bytes;
        if table.signature() != *b"DMAR" {
            return Err(DmarError::NotDmar { table: at });
        }
        if b.len() < STRUCTURES_AT {
            return Err(DmarError::TooShort {
                table: at,
                length: b.len(),
            });
        }
        if self.checked.is_full() {
            return Err(DmarError::TooManyTables { limit: MAX_TABLES });
        }
        // Every structure and scope checked before anything is kept.
        let (mut drhds, mut rmrrs, mut scopes, mut others) = (0, 0, 0, 0u16);
        let mut offset = STRUCTURES_AT;
        while offset < b.len() {
            if b.len() - offset < 4 {
                return Err(DmarError::BadStructure {
                    table: at,
                    offset,
                    kind: 0,
                    length: 0,
                });
            }
            let kind = le_u16(b, offset);
            let length = le_u16(b, offset + 2);
            let minimum = match kind {
                0 => 16,
                1 => 24,
                _ => 4,
            };
            let end = offset + usize::from(length);
            let bad = DmarError::BadStructure {
                table: at,
                offset,
                kind,
                length,
            };
            if usize::from(length) < minimum || end > b.len() {
                return Err(bad);
            }
            let s = &b[offset..end];
            match kind {
                0 => {
                    scopes += check_scopes(at, offset, s, 16)?;
                    drhds += 1;
                }
                1 => {
                    if le_u64(s, 16) < le_u64(s, 8) {
                        return Err(bad);
                    }
                    scopes += check_scopes(at, offset, s, 24)?;
                    rmrrs += 1;
                }
                _ => others = others.saturating_add(1),
            }
            offset = end;
        }
        let width = b[36].saturating_add(1);
        if self.tables == 0 {
            self.address_width = width;
        } else if width != self.address_width {
            self.width_conflict = true;
            self.address_width = self.address_width.min(width);
        }
        self.interrupt_remapping |= b[37] & 1 != 0;
        self.x2apic_opt_out |= b[37] & 2 != 0;
        self.dma_ctrl_platform_opt_in |= b[37] & 4 != 0;
        self.tables = self.tables.saturating_add(1);
        self.drhd_count += drhds;
        self.rmrr_count += rmrrs;
        self.scope_count += scopes;
        self.other_structures = self.other_structures.saturating_add(others);
        let _ = self.checked.push(b);
        Ok(())
    }
}

/// Checks the device scopes of structure `s` (at `structure_at` in its
/// table) from byte `first`: how many.
fn check_scopes(
    table: u64,
    structure_at: usize,
    s: &[u8],
    first: usize,
) -> Result<usize, DmarError> {
    let mut count = 0;
    let mut o = first;
    while o < s.len() {
        let bad = |length| DmarError::BadScope {
            table,
            offset: structure_at + o,
            length,
        };
        if s.len() - o < 6 {
            return Err(bad(0));
        }
        let length = s[o + 1];
        let end = o + usize::from(length);
        if length < 6 || !(length - 6).is_multiple_of(2) || end > s.len() {
            return Err(bad(length));
        }
        count += 1;
        o = end;
    }
    Ok(count)
}

/// Builds DMAR table bytes: for tests, and for the RMRR table that boot tests
/// inject into QEMU with `-acpitable`.
#[cfg(any(test, feature = "std"))]
pub mod build {
    extern crate std;
    use super::{PciHop, ScopeKind};
    use std::vec;
    use std::vec::Vec;

    /// A device scope to encode (and what a parsed one reads as:
    /// [`owned`]).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct DeviceScope {
        pub kind: ScopeKind,
        pub enumeration_id: u8,
        pub start_bus: u8,
        pub path: Vec<PciHop>,
    }

    /// A parsed scope as an owned one, to compare.
    pub fn owned(s: &super::DeviceScope<'_>) -> DeviceScope {
        DeviceScope {
            kind: s.kind,
            enumeration_id: s.enumeration_id,
            start_bus: s.start_bus,
            path: s.path.iter().collect(),
        }
    }

    /// A DMAR table under construction.
    #[derive(Clone, Debug, Default)]
    pub struct DmarBuilder {
        address_width: u8,
        flags: u8,
        structures: Vec<u8>,
    }

    impl DmarBuilder {
        /// `address_width` in bits (39 on QEMU's intel-iommu); `flags` as the
        /// table's flags byte.
        pub fn new(address_width: u8, flags: u8) -> Self {
            Self {
                address_width,
                flags,
                structures: Vec::new(),
            }
        }

        pub fn drhd(
            mut self,
            include_pci_all: bool,
            segment: u16,
            base: u64,
            scopes: &[DeviceScope],
        ) -> Self {
            let body = encode_scopes(scopes);
            self.structure(
                0,
                &[u8::from(include_pci_all), 0],
                segment,
                &base.to_le_bytes(),
                &body,
            );
            self
        }

        pub fn rmrr(mut self, segment: u16, base: u64, limit: u64, scopes: &[DeviceScope]) -> Self {
            let mut fixed = base.to_le_bytes().to_vec();
            fixed.extend_from_slice(&limit.to_le_bytes());
            let body = encode_scopes(scopes);
            self.structure(1, &[0, 0], segment, &fixed, &body);
            self
        }

        /// A structure of a type the parser does not interpret (e.g. 3, RHSA).
        pub fn other(mut self, kind: u16, body: &[u8]) -> Self {
            self.structures.extend_from_slice(&kind.to_le_bytes());
            self.structures
                .extend_from_slice(&((4 + body.len()) as u16).to_le_bytes());
            self.structures.extend_from_slice(body);
            self
        }

        fn structure(
            &mut self,
            kind: u16,
            flags: &[u8; 2],
            segment: u16,
            fixed: &[u8],
            scopes: &[u8],
        ) {
            let len = 8 + fixed.len() + scopes.len();
            self.structures.extend_from_slice(&kind.to_le_bytes());
            self.structures
                .extend_from_slice(&(len as u16).to_le_bytes());
            self.structures.extend_from_slice(flags);
            self.structures.extend_from_slice(&segment.to_le_bytes());
            self.structures.extend_from_slice(fixed);
            self.structures.extend_from_slice(scopes);
        }

        /// The whole table, header and checksum included.
        pub fn build(&self) -> Vec<u8> {
            let mut body = vec![self.address_width - 1, self.flags];
            body.extend_from_slice(&[0; 10]);
            body.extend_from_slice(&self.structures);
            crate::acpi::build::table(b"DMAR", 1, &body)
        }
    }

    /// A server-sized DMAR: 40 units (segment 1, registers from
    /// 0xfb00_0000, 4 KiB apart) of 12 scopes each, sub-hierarchies on bus
    /// `unit + 1` whose paths cross 1 to 5 hops, and 30 reserved regions of
    /// 4 KiB from 0x8000_0000, 1 MiB apart, each for device 20:14.0 (480 +
    /// 30 scopes in all).
    pub fn server_sized() -> Vec<u8> {
        let mut b = DmarBuilder::new(46, 1);
        for unit in 0..40u64 {
            let scopes: Vec<DeviceScope> = (0..12u8)
                .map(|i| DeviceScope {
                    kind: ScopeKind::PciSubHierarchy,
                    enumeration_id: 0,
                    start_bus: unit as u8 + 1,
                    path: (0..=i % 5)
                        .map(|h| PciHop {
                            device: h,
                            function: i % 8,
                        })
                        .collect(),
                })
                .collect();
            b = b.drhd(false, 1, 0xfb00_0000 + unit * 0x1000, &scopes);
        }
        for r in 0..30u64 {
            let base = 0x8000_0000 + (r << 20);
            b = b.rmrr(1, base, base + 0xfff, &[endpoint(0x20, 0x14, 0)]);
        }
        b.build()
    }

    /// A PCI endpoint scope for `bus:device.function` on its start bus.
    pub fn endpoint(bus: u8, device: u8, function: u8) -> DeviceScope {
        DeviceScope {
            kind: ScopeKind::PciEndpoint,
            enumeration_id: 0,
            start_bus: bus,
            path: vec![PciHop { device, function }],
        }
    }

    fn kind_byte(kind: ScopeKind) -> u8 {
        match kind {
            ScopeKind::PciEndpoint => 1,
            ScopeKind::PciSubHierarchy => 2,
            ScopeKind::IoApic => 3,
            ScopeKind::HpetMsi => 4,
            ScopeKind::AcpiNamespace => 5,
            ScopeKind::Unknown(b) => b,
        }
    }

    fn encode_scopes(scopes: &[DeviceScope]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in scopes {
            out.push(kind_byte(s.kind));
            out.push((6 + 2 * s.path.len()) as u8);
            out.extend_from_slice(&[0, 0, s.enumeration_id, s.start_bus]);
            for hop in &s.path {
                out.extend_from_slice(&[hop.device, hop.function]);
            }
        }
        out
    }
}
