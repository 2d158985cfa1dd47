//! The driver against a model of a remapping unit: registers that answer
//! commands, an invalidation queue it consumes (writing wait statuses),
//! register-based invalidation, fault records, and memory it reads (root,
//! context and second-level tables) as a unit would translate with them.

use super::*;
use crate::acpi::Table;
use crate::acpi::dmar::build::{DmarBuilder, endpoint};
use std::boxed::Box;
use std::collections::BTreeMap;
use std::vec;
use std::vec::Vec;

const BASE: u64 = 0xfed9_0000;
/// CAP: 256 domain ids, SAGAW 39 and 48 bits, fault records at 0x220 (1).
const CAP: u64 = 2 | 0b110 << 8 | 47 << 16 | 0x22 << 24;
/// ECAP: coherent, queued invalidation, IOTLB registers at 0xf00.
const ECAP: u64 = 1 | 2 | 0xf0 << 8;

#[derive(Default)]
struct Model {
    regs: BTreeMap<usize, u64>,
    frames: BTreeMap<u64, Box<[u64; ENTRIES]>>,
    next: u64,
    /// Descriptors the unit consumed, and register commands it ran.
    done: Vec<(u64, u64)>,
    head: u64,
    /// The unit answers commands.
    alive: bool,
    caches_flushed: usize,
    /// PCI configuration space: (source id, offset) -> dword.
    config: BTreeMap<(u16, u8), u32>,
}

impl Model {
    fn new(cap: u64, ecap: u64) -> Self {
        let mut m = Model {
            next: 0x10_0000,
            alive: true,
            ..Model::default()
        };
        m.regs.insert(reg::CAP, cap);
        m.regs.insert(reg::ECAP, ecap);
        m.regs.insert(reg::VER, 0x10);
        m
    }

    /// What the unit would translate bus frame `bfn` of `source` to.
    fn translate(&self, source: u16, bfn: u64) -> Option<u64> {
        let root = self.regs[&reg::RTADDR];
        let re = self.frames[&root][2 * usize::from(source >> 8)];
        if re & 1 == 0 {
            return None;
        }
        let ctx = &self.frames[&(re & !0xfff)];
        let (lo, hi) = (
            ctx[2 * usize::from(source & 0xff)],
            ctx[2 * usize::from(source & 0xff) + 1],
        );
        if lo & 1 == 0 {
            return None;
        }
        let levels = (hi & 7) as u32 + 2;
        let mut table = lo & !0xfff;
        for level in (1..=levels).rev() {
            let e = self.frames[&table][((bfn >> (9 * (level - 1))) & 511) as usize];
            if e & 3 == 0 {
                return None;
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        Some(table)
    }
}

impl Host for Model {
    fn read32(&self, _: u64, off: usize) -> u32 {
        self.regs.get(&off).copied().unwrap_or(0) as u32
    }
    fn write32(&mut self, _: u64, off: usize, value: u32) {
        if off == reg::GCMD {
            if self.alive {
                // Status follows command (SRTP's status bit is RTPS, 30).
                let bits = value & (gcmd::TE | gcmd::SRTP | gcmd::QIE);
                self.regs.insert(reg::GSTS, u64::from(bits));
            }
        } else if off == reg::FSTS {
            let v = self.regs.get(&off).copied().unwrap_or(0);
            self.regs.insert(off, v & !u64::from(value));
        } else if off >= 0x200 && off % 16 == 12 {
            // A fault record's F bit, write 1 to clear.
            let at = off - 4;
            let v = self.regs.get(&at).copied().unwrap_or(0);
            self.regs.insert(at, v & !(u64::from(value) << 32));
        } else {
            self.regs.insert(off, u64::from(value));
        }
    }
    fn read64(&self, _: u64, off: usize) -> u64 {
        self.regs.get(&off).copied().unwrap_or(0)
    }
    fn write64(&mut self, _: u64, off: usize, value: u64) {
        let iotlb = Ecap(self.regs[&reg::ECAP]).iotlb_offset() + 8;
        if (off == reg::CCMD || off == iotlb) && self.alive {
            self.done.push((off as u64, value));
            self.regs.insert(off, value & !(1 << 63));
        } else if off == reg::IQT && self.alive {
            let queue = self.regs.get(&reg::IQA).copied().unwrap_or(0) & !0xfff;
            while self.head != value >> 4 {
                let q = &self.frames[&queue];
                let (lo, hi) = (q[2 * self.head as usize], q[2 * self.head as usize + 1]);
                self.done.push((lo, hi));
                if lo & 0xf == 5 {
                    let at = hi & !0xfff;
                    self.frames.get_mut(&at).unwrap()[0] = lo >> 32;
                }
                self.head = (self.head + 1) % 256;
            }
            self.regs.insert(off, value);
        } else {
            self.regs.insert(off, value);
        }
    }
    fn alloc_frame(&mut self) -> Option<u64> {
        self.next += 0x1000;
        self.frames.insert(self.next, Box::new([0; ENTRIES]));
        Some(self.next)
    }
    fn free_frame(&mut self, frame: u64) {
        assert!(
            self.frames.remove(&frame).is_some(),
            "frame {frame:#x} freed twice"
        );
    }
    fn frame(&self, frame: u64) -> &[u64; ENTRIES] {
        &self.frames[&frame]
    }
    fn frame_mut(&mut self, frame: u64) -> &mut [u64; ENTRIES] {
        self.frames.get_mut(&frame).unwrap()
    }
    fn flush_caches(&mut self) {
        self.caches_flushed += 1;
    }
    fn wait(&mut self, done: &mut dyn FnMut(&Self) -> bool) -> bool {
        (0..100).any(|_| done(self))
    }
    fn pci_read(&self, segment: u16, source: u16, offset: u8) -> u32 {
        assert_eq!(segment, 0);
        match self.config.get(&(source, offset)) {
            Some(v) => *v,
            None if self.config.contains_key(&(source, 0)) => 0,
            None => u32::MAX,
        }
    }
}

impl Model {
    /// A PCI-PCI bridge at `source` forwarding buses `secondary..=subordinate`.
    fn bridge(&mut self, source: u16, secondary: u8, subordinate: u8) {
        self.config.insert((source, 0), 0x000c_1b36);
        self.config.insert((source, 0x0c), 1 << 16);
        self.config.insert(
            (source, 0x18),
            u32::from(source >> 8) | u32::from(secondary) << 8 | u32::from(subordinate) << 16,
        );
    }
}

/// A DMAR with one unit listing 00:03.0 and 00:1f.2, and one RMRR.
fn dmar_bytes() -> Vec<u8> {
    DmarBuilder::new(39, 0)
        .drhd(false, 0, BASE, &[endpoint(0, 3, 0), endpoint(0, 0x1f, 2)])
        .rmrr(0, 0xe8000, 0xe8fff, &[endpoint(0, 3, 0)])
        .build()
}

fn iommu<'a>(bytes: &'a [u8], model: Model, registers_only: bool) -> Iommu<'a, Model> {
    let dmar = Dmar::parse([Table { address: 0, bytes }]).unwrap();
    let mut i = Iommu::new(model, dmar);
    assert_eq!(
        i.enable(0, registers_only),
        Enabled::On {
            version: 0x10,
            levels: 4
        }
    );
    i
}

#[test]
fn a_unit_comes_up_blocking_everything_with_its_queue() {
    let bytes = dmar_bytes();
    let i = iommu(&bytes, Model::new(CAP, ECAP), false);
    let m = &i.host;
    assert_eq!(
        m.regs[&reg::GSTS] as u32,
        gcmd::TE | gcmd::QIE,
        "translation and queue on"
    );
    assert!(m.regs[&reg::RTADDR] != 0);
    // Context cache and IOTLB invalidated globally, then a wait.
    assert_eq!(m.done[0], desc::context_global());
    assert_eq!(m.done[1], desc::iotlb_global(false, false));
    assert_eq!(m.done[2].0 & 0xf, 5);
    // Nothing is attached: every device is blocked.
    assert_eq!(m.translate(3 << 3, 0x100), None);
}

#[test]
fn attached_devices_translate_what_is_mapped_and_nothing_else() {
    let bytes = dmar_bytes();
    let mut i = iommu(&bytes, Model::new(CAP, ECAP), false);
    let s = i.create_space().unwrap();
    i.attach(s, 0, 3 << 3, true).unwrap();
    i.map(s, &[(0x100, 0x5000), (0x101, 0x6000)], true).unwrap();
    assert_eq!(i.host.translate(3 << 3, 0x100), Some(0x5000));
    assert_eq!(i.host.translate(3 << 3, 0x101), Some(0x6000));
    assert_eq!(i.host.translate(3 << 3, 0x102), None);
    assert_eq!(i.host.translate(0x1f << 3 | 2, 0x100), None, "not attached");
    assert_eq!(i.attach(s, 0, 5 << 3, true), Err(IommuError::NotCovered));
    let t = i.create_space().unwrap();
    assert_eq!(
        i.attach(t, 0, 3 << 3, true),
        Err(IommuError::Busy),
        "attached elsewhere"
    );
    // A refused batch maps nothing of itself.
    assert_eq!(
        i.map(s, &[(0x102, 0x7000), (0x100, 0x8000)], true),
        Err((1, IommuError::Io(IoError::AlreadyMapped { bfn: 0x100 })))
    );
    assert_eq!(i.host.translate(3 << 3, 0x102), None);
    // An unmap: one domain-selective invalidation, and the page is gone.
    let before = (i.invalidations, i.host.done.len());
    i.unmap(s, &[0x100, 0x101]).unwrap();
    assert_eq!(i.invalidations, before.0 + 1);
    assert_eq!(i.host.done[before.1], desc::iotlb_domain(1, false, false));
    assert_eq!(i.host.translate(3 << 3, 0x100), None);
    assert_eq!(
        i.unmap(s, &[0x100]),
        Err((0, IommuError::NotMapped { bfn: 0x100 }))
    );
    // Detached: blocked again.
    i.map(s, &[(0x100, 0x5000)], true).unwrap();
    i.attach(s, 0, 3 << 3, false).unwrap();
    assert_eq!(i.host.translate(3 << 3, 0x100), None);
}

#[test]
fn without_a_queue_invalidation_goes_through_the_registers() {
    let bytes = dmar_bytes();
    for (ecap, only) in [(ECAP & !2, false), (ECAP, true)] {
        let mut i = iommu(&bytes, Model::new(CAP | 3 << 54, ecap), only);
        assert_eq!(i.host.regs[&reg::GSTS] as u32, gcmd::TE, "no queue");
        let s = i.create_space().unwrap();
        i.attach(s, 0, 3 << 3, true).unwrap();
        i.map(s, &[(0x100, 0x5000)], true).unwrap();
        i.unmap(s, &[0x100]).unwrap();
        let last = *i.host.done.last().unwrap();
        assert_eq!(
            last,
            (0xf08, super::super::iotlb_domain(1, true, true)),
            "domain-selective, drained"
        );
    }
}

#[test]
fn a_unit_that_does_not_answer_is_left_off() {
    let bytes = dmar_bytes();
    let dmar = Dmar::parse([Table {
        address: 0,
        bytes: &bytes,
    }])
    .unwrap();
    let mut dead = Model::new(CAP, ECAP);
    dead.alive = false;
    let mut i = Iommu::new(dead, dmar.clone());
    assert_eq!(i.enable(0, false), Enabled::NoAnswer);
    assert!(i.units.is_empty());
    let mut i = Iommu::new(Model::new(u64::MAX, u64::MAX), dmar.clone());
    assert_eq!(
        i.enable(0, false),
        Enabled::Unusable,
        "all ones: nothing there"
    );
    let mut i = Iommu::new(Model::new(0, 0), dmar);
    assert_eq!(i.enable(0, false), Enabled::Unusable);
}

#[test]
fn caching_mode_and_non_coherent_units_are_served() {
    let bytes = dmar_bytes();
    let mut i = iommu(&bytes, Model::new(CAP | 1 << 7, ECAP & !1), false);
    let s = i.create_space().unwrap();
    i.attach(s, 0, 3 << 3, true).unwrap();
    let before = i.invalidations;
    i.map(s, &[(0x100, 0x5000)], true).unwrap();
    assert_eq!(
        i.invalidations,
        before + 1,
        "caching mode: maps invalidate too"
    );
    assert!(
        i.host.caches_flushed > 0,
        "non-coherent: caches written back"
    );
}

#[test]
fn faults_and_reserved_regions_are_read() {
    let bytes = dmar_bytes();
    let mut i = iommu(&bytes, Model::new(CAP, ECAP), false);
    i.host.regs.insert(0x220, 0x777_7000);
    i.host.regs.insert(0x228, 1 << 63 | 5 << 32 | 3 << 3);
    i.host
        .regs
        .insert(reg::FSTS, u64::from(fsts::PFO | fsts::PPF));
    let mut seen = Vec::new();
    i.faults(|unit, segment, f| {
        seen.push((unit, segment, f));
        true
    });
    assert_eq!(
        seen,
        [(
            0,
            0,
            FaultRecord {
                source: 3 << 3,
                address: 0x777_7000,
                reason: 5,
                write: true
            }
        )]
    );
    assert_eq!(i.lost_faults, 1);
    assert_eq!(i.host.regs[&0x228] >> 63, 0, "the record is cleared");
    let mut scopes: heapless::Vec<u32, 8> = heapless::Vec::new();
    assert_eq!(i.rmrr(0, &mut scopes), Some((0xe8000, 0xe8fff)));
    assert_eq!(scopes.as_slice(), [3 << 3]);
    assert_eq!(i.rmrr(1, &mut scopes), None);
}

#[test]
fn a_destroyed_domains_pages_go_from_every_space() {
    let bytes = dmar_bytes();
    let mut i = iommu(&bytes, Model::new(CAP, ECAP), false);
    let s = i.create_space().unwrap();
    i.attach(s, 0, 3 << 3, true).unwrap();
    i.map(s, &[(0x100, 0x5000), (0x101, 0x9000)], true).unwrap();
    assert!(i.maps_any(|hpa| hpa == 0x9000));
    assert!(!i.maps_any(|hpa| hpa == 0x6000));
    assert_eq!(i.unmap_where(s, |hpa| hpa < 0x8000), 1);
    assert!(!i.maps_any(|hpa| hpa == 0x5000), "unmapped");
    assert_eq!(i.host.translate(3 << 3, 0x100), None);
    assert_eq!(i.host.translate(3 << 3, 0x101), Some(0x9000));
    assert_eq!(i.spaces[usize::from(s)].as_ref().unwrap().pages, 1);
}

/// Issue 12 point 3: a device behind bridges is found through the unit's
/// device scope paths, each bridge's secondary bus read from configuration
/// space; what the bridges say decides which function a scope names.
#[test]
fn devices_behind_bridges_are_matched_through_their_scope_paths() {
    use crate::acpi::dmar::PciHop;
    use crate::acpi::dmar::build::DeviceScope;
    let hop = |device, function| PciHop { device, function };
    let bytes = DmarBuilder::new(39, 0)
        .drhd(
            false,
            0,
            BASE,
            &[
                // 00:1c.0 -> 01:00.0 -> the device at function 0 below.
                DeviceScope {
                    kind: crate::acpi::dmar::ScopeKind::PciEndpoint,
                    enumeration_id: 0,
                    start_bus: 0,
                    path: vec![hop(0x1c, 0), hop(0, 0), hop(0, 0)],
                },
                // Everything below 00:1d.0.
                DeviceScope {
                    kind: crate::acpi::dmar::ScopeKind::PciSubHierarchy,
                    enumeration_id: 0,
                    start_bus: 0,
                    path: vec![hop(0x1d, 0)],
                },
            ],
        )
        .rmrr(
            0,
            0xe8000,
            0xe8fff,
            &[DeviceScope {
                kind: crate::acpi::dmar::ScopeKind::PciEndpoint,
                enumeration_id: 0,
                start_bus: 0,
                path: vec![hop(0x1c, 0), hop(0, 0), hop(0, 0)],
            }],
        )
        .build();
    let mut model = Model::new(CAP, ECAP);
    model.bridge(0xe0, 1, 2);
    model.bridge(0x100, 2, 2);
    model.bridge(0xe8, 5, 6);
    let mut i = iommu(&bytes, model, false);
    assert_eq!(i.unit_of(0, 0x200), Some(0), "02:00.0 at the path's end");
    assert_eq!(i.unit_of(0, 0x201), None, "another function there");
    assert_eq!(i.unit_of(0, 0x500), Some(0), "below 00:1d.0");
    assert_eq!(i.unit_of(0, 0x6f9), Some(0), "below 00:1d.0");
    assert_eq!(i.unit_of(0, 0x700), None, "past its subordinate bus");
    assert_eq!(i.unit_of(0, 0x000), None, "00:00.0 is in no scope");
    let mut scopes: heapless::Vec<u32, 8> = heapless::Vec::new();
    assert_eq!(i.rmrr(0, &mut scopes), Some((0xe8000, 0xe8fff)));
    assert_eq!(scopes.as_slice(), [0x200], "the RMRR's device, resolved");
    // Attached behind the bridges: its DMA is translated.
    let s = i.create_space().unwrap();
    i.attach(s, 0, 0x200, true).unwrap();
    i.map(s, &[(0x100, 0x5000)], true).unwrap();
    assert_eq!(i.host.translate(0x200, 0x100), Some(0x5000));
    let before = i.invalidations;
    i.unmap(s, &[0x100]).unwrap();
    assert_eq!(i.invalidations, before + 1, "its unit invalidated");
    // The firmware renumbered the bus below 01:00.0: another device.
    i.host.bridge(0x100, 3, 3);
    assert_eq!(i.unit_of(0, 0x300), Some(0));
    assert_eq!(i.unit_of(0, 0x201), None);
}

/// Issue 12 point 2: the fault event registers carry the MSI the kernel
/// gave, unmasked.
#[test]
fn fault_interrupts_are_programmed_unmasked() {
    let bytes = dmar_bytes();
    let mut i = iommu(&bytes, Model::new(CAP, ECAP), false);
    i.host.regs.insert(reg::FECTL, 1 << 31);
    i.fault_interrupts(0xfee0_0000, 0x41);
    assert_eq!(i.host.regs[&reg::FEDATA], 0x41);
    assert_eq!(i.host.regs[&reg::FEADDR], 0xfee0_0000);
    assert_eq!(i.host.regs[&reg::FEUADDR], 0);
    assert_eq!(i.host.regs[&reg::FECTL] >> 31, 0, "interrupt mask cleared");
}
