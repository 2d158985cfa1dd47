//! PCI configuration mechanism #1 (ports 0xcf8 and 0xcfc-0xcff): a virtual
//! bus 0 with a host bridge at 00:00.0 (the identity QEMU's q35 machine
//! gives its: Intel 82G33/Q35 MCH, 8086:29c0, class 06 00 00, read-only)
//! and the domain's assigned PCI functions (issue 14), function `i` of its
//! manifest list at 00:(i + 1).0, whatever its host address.
//!
//! An assigned function's configuration space is the real one (DEVICE_CONFIG
//! through the Device handle init gave this service), virtualized where the
//! guest must not reach the host's: its BARs and ROM BAR are the vmm's
//! (a sizing probe answered from the real sizes, the guest's addresses
//! remembered, the host's BARs never written), its cache line size,
//! latency timer and interrupt line are the vmm's, its header type shows a
//! single function; the command register's decode, bus-master, parity,
//! SERR and INTx-disable bits are passed through (the IOMMU confines its
//! DMA to the domain's memory); everything else reads through, and writes
//! to it (status, capabilities, device-specific registers) are dropped.
//! Every other bus, device and function is absent (reads all ones).

/// The host bridge's vendor and device IDs (dword 0).
pub const HOST_BRIDGE_ID: u32 = 0x29c0_8086;
/// Its class code and revision (dword 2): host bridge, revision 0.
pub const HOST_BRIDGE_CLASS: u32 = 0x0600_0000;
/// The most assigned functions a domain's bus shows.
pub const MAX_FUNCTIONS: usize = 8;
/// The command register's bits the guest controls: I/O and memory
/// decoding, bus mastering, parity and SERR reporting, INTx disable.
pub const COMMAND_BITS: u16 = 0x0547;

/// An access to an assigned function's real configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u8,
        size: u8,
    },
    Write {
        offset: u8,
        size: u8,
        value: u32,
    },
    /// What BAR (or ROM BAR) register `offset` reads after all ones are
    /// written to it, the register left as it was (the kernel does it).
    Probe {
        offset: u8,
    },
}

/// The domain's assigned functions, as the vmm reaches them (the kernel's
/// DEVICE_CONFIG, or a model in the tests).
pub trait Functions {
    /// `op` on assigned function `index` (manifest order); `None` where the
    /// domain has no such function (or the kernel refused).
    fn config(&mut self, index: u8, op: Op) -> Option<u32>;
}

/// One assigned function's virtual registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Function {
    /// Its manifest index.
    index: u8,
    /// Its header is not type 0 (a bridge): no BARs virtualized, its
    /// header read through.
    bridge: bool,
    /// What each BAR dword reads after all ones (0: none there), the ROM's.
    probe: [u32; 6],
    rom_probe: u32,
    /// What the guest wrote to each BAR dword, the ROM BAR.
    bars: [u32; 6],
    rom: u32,
    /// Cache line size, latency timer, interrupt line.
    cache_line: u8,
    latency: u8,
    line: u8,
}

impl Function {
    /// Learns function `index`'s BAR sizes; `None` where there is none.
    fn learn(f: &mut dyn Functions, index: u8) -> Option<Self> {
        let id = f.config(index, Op::Read { offset: 0, size: 4 })?;
        if id & 0xffff == 0xffff {
            return None;
        }
        let mut me = Self {
            index,
            ..Self::default()
        };
        // Only a type-0 header's six BARs and ROM (an assigned bridge shows
        // neither: its header is read through).
        let header = f.config(
            index,
            Op::Read {
                offset: 0x0e,
                size: 1,
            },
        )? & 0x7f;
        me.bridge = header != 0;
        if header == 0 {
            for (i, p) in me.probe.iter_mut().enumerate() {
                let offset = 0x10 + 4 * i as u8;
                *p = f.config(index, Op::Probe { offset }).unwrap_or(0);
            }
            me.rom_probe = f.config(index, Op::Probe { offset: 0x30 }).unwrap_or(0);
        }
        Some(me)
    }

    /// The bits of BAR dword `i` the guest may set (the rest read as the
    /// probe shows them: its type bits, zeros below its size).
    fn bar_mask(&self, i: usize) -> u32 {
        let p = self.probe[i];
        let upper = i > 0 && self.probe[i - 1] & 0b111 == 0b100;
        if upper {
            p
        } else if p & 1 != 0 {
            p & !0b11
        } else {
            p & !0xf
        }
    }

    /// BAR dword `i` as the guest reads it.
    fn bar(&self, i: usize) -> u32 {
        let mask = self.bar_mask(i);
        self.bars[i] & mask | self.probe[i] & !mask & 0xf
    }

    fn rom_mask(&self) -> u32 {
        if self.rom_probe & 0xffff_f800 == 0 {
            0
        } else {
            self.rom_probe & 0xffff_f800 | 1
        }
    }
}

/// The PCI configuration ports of one domain (its virtual registers go
/// along in a vmm swap).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pci {
    /// The address register (0xcf8).
    address: u32,
    /// The assigned functions, learned at the first access that reaches
    /// past the host bridge (`None` until then).
    functions: Option<heapless::Vec<Function, MAX_FUNCTIONS>>,
}

/// Merges a write of `size` bytes at `offset` into the dword holding it.
fn merge(old: u32, offset: u8, size: u8, value: u32) -> u32 {
    let shift = 8 * u32::from(offset & 3);
    let mask = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    } << shift;
    old & !mask | (value << shift) & mask
}

impl Pci {
    /// Whether `port` is one of its.
    pub fn owns(port: u16) -> bool {
        matches!(port, 0xcf8..=0xcff)
    }

    /// The virtual function at device `slot` (1 ..= MAX_FUNCTIONS).
    fn function(&mut self, f: &mut dyn Functions, slot: u8) -> Option<&mut Function> {
        let functions = self.functions.get_or_insert_with(|| {
            (0..MAX_FUNCTIONS as u8)
                .map_while(|i| Function::learn(f, i))
                .collect()
        });
        functions.get_mut(usize::from(slot).checked_sub(1)?)
    }

    /// The selected (device, register offset), where the address register
    /// is enabled and names bus 0, function 0 of some device.
    fn selected(&self, port: u16) -> Option<(u8, u8)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        let function = (a >> 8) & 7;
        (a & 1 << 31 != 0 && bus == 0 && function == 0).then_some((
            ((a >> 11) & 31) as u8,
            (a as u8 & 0xfc) | (port - 0xcfc) as u8,
        ))
    }

    /// A read of `size` bytes at `port`.
    pub fn read(&mut self, f: &mut dyn Functions, port: u16, size: u8) -> u32 {
        let mask = match size {
            1 => 0xff,
            2 => 0xffff,
            _ => u32::MAX,
        };
        match port {
            0xcf8 if size == 4 => self.address,
            // (An access crossing the data dword's end is none: all ones.)
            0xcfc..=0xcff if usize::from(port - 0xcfc) + usize::from(size) <= 4 => {
                let Some((slot, offset)) = self.selected(port) else {
                    return mask;
                };
                let dword = self.dword(f, slot, offset & 0xfc);
                (dword >> (8 * u32::from(offset & 3))) & mask
            }
            _ => mask,
        }
    }

    /// Configuration dword `at` of the device in `slot` (all ones for
    /// nothing there).
    fn dword(&mut self, f: &mut dyn Functions, slot: u8, at: u8) -> u32 {
        if slot == 0 {
            return match at {
                0 => HOST_BRIDGE_ID,
                8 => HOST_BRIDGE_CLASS,
                _ => 0,
            };
        }
        let Some(v) = self.function(f, slot).copied() else {
            return u32::MAX;
        };
        let real = |f: &mut dyn Functions, offset| {
            f.config(v.index, Op::Read { offset, size: 4 })
                .unwrap_or(u32::MAX)
        };
        match at {
            // BIST none, one function, the vmm's cache line and latency.
            0x0c => {
                (real(f, 0x0c) & 0x007f_0000) | u32::from(v.latency) << 8 | u32::from(v.cache_line)
            }
            0x10..=0x27 if !v.bridge => v.bar(usize::from(at - 0x10) / 4),
            0x30 if !v.bridge => v.rom & v.rom_mask(),
            0x3c => real(f, 0x3c) & 0xffff_ff00 | u32::from(v.line),
            _ => real(f, at),
        }
    }

    /// A write of `size` bytes at `port`.
    pub fn write(&mut self, f: &mut dyn Functions, port: u16, size: u8, value: u32) {
        if port == 0xcf8 {
            if size == 4 {
                // Bits 1:0 read as 0; reserved bits 30:24 kept as written.
                self.address = value & !3;
            }
            return;
        }
        let Some((slot, offset)) = self.selected(port).filter(|&(s, _)| s != 0) else {
            return;
        };
        if !Self::owns(port) || usize::from(offset & 3) + usize::from(size) > 4 {
            return;
        }
        let Some(v) = self.function(f, slot) else {
            return;
        };
        let at = offset & 0xfc;
        match at {
            0x04 if offset < 6 => {
                let Some(old) = f.config(v.index, Op::Read { offset: 4, size: 2 }) else {
                    return;
                };
                let asked = merge(old, offset, size, value) as u16;
                let command = old as u16 & !COMMAND_BITS | asked & COMMAND_BITS;
                let _ = f.config(
                    v.index,
                    Op::Write {
                        offset: 4,
                        size: 2,
                        value: u32::from(command),
                    },
                );
            }
            0x0c => {
                let old = u32::from(v.latency) << 8 | u32::from(v.cache_line);
                let new = merge(old, offset, size, value);
                v.cache_line = new as u8;
                v.latency = (new >> 8) as u8;
            }
            0x10..=0x27 => {
                let i = usize::from(at - 0x10) / 4;
                v.bars[i] = merge(v.bars[i], offset, size, value);
            }
            0x30 => v.rom = merge(v.rom, offset, size, value),
            0x3c => v.line = merge(u32::from(v.line), offset, size, value) as u8,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// edu's first 64 bytes as QEMU 7.2 shows them through DEVICE_CONFIG
    /// (tests/iommu.rs logs them: `edudm: configuration header`), and what
    /// its BARs and ROM read after all ones (`BAR and ROM probes`).
    const EDU_HEADER: [u32; 16] = [
        0x11e8_1234,
        0x0010_0107,
        0x00ff_0010,
        0x0000_0000,
        0xfea0_0000,
        0,
        0,
        0,
        0,
        0,
        0,
        0x1100_1af4,
        0,
        0x0000_0040,
        0,
        0x0000_010b,
    ];
    const EDU_PROBES: [u32; 7] = [0xfff0_0000, 0, 0, 0, 0, 0, 0];
    /// edu's MSI capability at 0x40 (its only one; modelled: the log
    /// shows only the first 64 bytes).
    const EDU_MSI: u32 = 0x0080_0005;

    /// A function's configuration space as the kernel would show it,
    /// recording every write the vmm asks for.
    #[derive(Clone)]
    struct Dev {
        space: [u32; 64],
        /// What BAR dword i (6: the ROM) keeps of a write (the probe).
        probes: [u32; 7],
    }

    #[derive(Default)]
    struct Model {
        devs: Vec<Dev>,
        writes: Vec<(u8, u8, u8, u32)>,
        probes: u32,
    }

    impl Model {
        fn edu(n: usize) -> Self {
            let mut space = [0u32; 64];
            space[..16].copy_from_slice(&EDU_HEADER);
            space[0x40 / 4] = EDU_MSI;
            let dev = Dev {
                space,
                probes: EDU_PROBES,
            };
            Self {
                devs: std::vec![dev; n],
                ..Self::default()
            }
        }
    }

    impl Functions for Model {
        fn config(&mut self, index: u8, op: Op) -> Option<u32> {
            let d = self.devs.get_mut(usize::from(index))?;
            match op {
                Op::Read { offset, size } => {
                    let v = d.space[usize::from(offset) / 4] >> (8 * (offset & 3));
                    Some(match size {
                        1 => v & 0xff,
                        2 => v & 0xffff,
                        _ => v,
                    })
                }
                Op::Write {
                    offset,
                    size,
                    value,
                } => {
                    self.writes.push((index, offset, size, value));
                    let at = usize::from(offset) / 4;
                    d.space[at] = merge(d.space[at], offset, size, value);
                    Some(0)
                }
                Op::Probe { offset } => {
                    self.probes += 1;
                    match offset {
                        0x10..=0x24 => Some(d.probes[usize::from(offset - 0x10) / 4]),
                        0x30 => Some(d.probes[6]),
                        _ => None,
                    }
                }
            }
        }
    }

    fn select(pci: &mut Pci, m: &mut Model, bus: u8, dev: u8, function: u8, offset: u8) {
        let a = 1 << 31
            | u32::from(bus) << 16
            | u32::from(dev) << 11
            | u32::from(function) << 8
            | u32::from(offset & 0xfc);
        pci.write(m, 0xcf8, 4, a);
    }

    fn read(pci: &mut Pci, m: &mut Model, dev: u8, offset: u8, size: u8) -> u32 {
        select(pci, m, 0, dev, 0, offset);
        pci.read(m, 0xcfc + u16::from(offset & 3), size)
    }

    fn write(pci: &mut Pci, m: &mut Model, dev: u8, offset: u8, size: u8, value: u32) {
        select(pci, m, 0, dev, 0, offset);
        pci.write(m, 0xcfc + u16::from(offset & 3), size, value);
    }

    /// Issue 14: the domain's assigned functions at 00:01.0, 00:02.0, ...
    /// show the real IDs, class, subsystem and capabilities; one function
    /// each (the header type's multi-function bit clear); the host bridge
    /// stays at 00:00.0; everything else is absent.
    #[test]
    fn assigned_functions_show_their_real_identity() {
        let mut m = Model::edu(2);
        let mut pci = Pci::default();
        assert_eq!(read(&mut pci, &mut m, 0, 0, 4), HOST_BRIDGE_ID);
        for dev in [1, 2] {
            assert_eq!(read(&mut pci, &mut m, dev, 0, 4), 0x11e8_1234);
            assert_eq!(read(&mut pci, &mut m, dev, 2, 2), 0x11e8);
            assert_eq!(read(&mut pci, &mut m, dev, 8, 4) >> 8, 0x00ff00);
            assert_eq!(read(&mut pci, &mut m, dev, 0x2c, 4), 0x1100_1af4);
            assert_eq!(read(&mut pci, &mut m, dev, 0x34, 1), 0x40);
            assert_eq!(read(&mut pci, &mut m, dev, 0x40, 4), EDU_MSI);
            assert_eq!(read(&mut pci, &mut m, dev, 0x3d, 1), 1, "pin A");
            assert_eq!(read(&mut pci, &mut m, dev, 0x0e, 1), 0, "one function");
            assert_eq!(read(&mut pci, &mut m, dev, 0x10, 4), 0, "BAR unassigned");
        }
        m.devs[0].space[3] |= 0x80 << 16;
        assert_eq!(
            read(&mut pci, &mut m, 1, 0x0e, 1),
            0,
            "multi-function hidden"
        );
        assert_eq!(read(&mut pci, &mut m, 3, 0, 4), u32::MAX, "no third");
        assert_eq!(read(&mut pci, &mut m, 3, 0, 2), 0xffff);
        select(&mut pci, &mut m, 0, 1, 1, 0);
        assert_eq!(pci.read(&mut m, 0xcfc, 4), u32::MAX, "function 1");
        select(&mut pci, &mut m, 1, 1, 0, 0);
        assert_eq!(pci.read(&mut m, 0xcfc, 4), u32::MAX, "bus 1");
        pci.write(&mut m, 0xcf8, 4, 1 << 11);
        assert_eq!(pci.read(&mut m, 0xcfc, 4), u32::MAX, "not enabled");
        assert_eq!(m.probes, 14, "each function's BARs probed once");
    }

    /// A domain without devices shows the host bridge alone and asks the
    /// kernel nothing past it.
    #[test]
    fn without_devices_only_the_host_bridge_answers() {
        let mut m = Model::default();
        let mut pci = Pci::default();
        assert_eq!(read(&mut pci, &mut m, 0, 8, 4), HOST_BRIDGE_CLASS);
        for dev in 1..32 {
            assert_eq!(read(&mut pci, &mut m, dev, 0, 4), u32::MAX);
        }
    }

    /// BARs: the sizing probe answers the real size, the guest's address is
    /// remembered and read back, the host's BAR is never written; the ROM
    /// likewise; 64-bit and I/O BARs keep their type bits.
    #[test]
    fn bars_are_sized_and_placed_without_touching_the_host() {
        let mut m = Model::edu(1);
        // BAR 2+3: 64-bit prefetchable 16 KiB; BAR 4: 32 I/O ports; ROM
        // 64 KiB.
        m.devs[0].probes[2] = 0xffff_c00c;
        m.devs[0].probes[3] = 0xffff_ffff;
        m.devs[0].probes[4] = 0xffff_ffe1;
        m.devs[0].probes[6] = 0xffff_0000;
        let mut pci = Pci::default();
        fn size(pci: &mut Pci, m: &mut Model, at: u8) -> u32 {
            write(pci, m, 1, at, 4, u32::MAX);
            read(pci, m, 1, at, 4)
        }
        assert_eq!(size(&mut pci, &mut m, 0x10), 0xfff0_0000, "1 MiB");
        assert_eq!(size(&mut pci, &mut m, 0x14), 0, "no BAR 1");
        assert_eq!(size(&mut pci, &mut m, 0x18), 0xffff_c00c);
        assert_eq!(size(&mut pci, &mut m, 0x1c), 0xffff_ffff);
        assert_eq!(size(&mut pci, &mut m, 0x20), 0xffff_ffe1);
        assert_eq!(size(&mut pci, &mut m, 0x30), 0xffff_0001);
        write(&mut pci, &mut m, 1, 0x10, 4, 0xe000_1234);
        assert_eq!(read(&mut pci, &mut m, 1, 0x10, 4), 0xe000_0000);
        write(&mut pci, &mut m, 1, 0x1c, 4, 0x1);
        write(&mut pci, &mut m, 1, 0x18, 2, 0x4000);
        write(&mut pci, &mut m, 1, 0x1a, 2, 0xe010);
        assert_eq!(read(&mut pci, &mut m, 1, 0x18, 4), 0xe010_400c);
        assert_eq!(read(&mut pci, &mut m, 1, 0x1c, 4), 1);
        write(&mut pci, &mut m, 1, 0x20, 4, 0xc000);
        assert_eq!(read(&mut pci, &mut m, 1, 0x20, 4), 0xc001);
        write(&mut pci, &mut m, 1, 0x30, 4, 0xfeb0_0001);
        assert_eq!(read(&mut pci, &mut m, 1, 0x30, 4), 0xfeb0_0001);
        assert!(m.writes.is_empty(), "nothing written to the device");
        assert_eq!(m.devs[0].space[4], 0xfea0_0000, "the host's BAR 0");
    }

    /// The command register's decode, bus-master, parity, SERR and INTx
    /// bits reach the device (16 bits, its other bits kept); status,
    /// capability and other writes are dropped; the interrupt line, cache
    /// line size and latency timer are the vmm's.
    #[test]
    fn command_writes_pass_through_and_the_rest_is_virtual() {
        let mut m = Model::edu(1);
        let mut pci = Pci::default();
        write(&mut pci, &mut m, 1, 4, 2, 0);
        write(&mut pci, &mut m, 1, 4, 4, 0xffff_0007);
        write(&mut pci, &mut m, 1, 5, 1, 0x04);
        assert_eq!(
            m.writes,
            [(0, 4, 2, 0), (0, 4, 2, 0x0007), (0, 4, 2, 0x0407)]
        );
        assert_eq!(read(&mut pci, &mut m, 1, 4, 2), 0x0407);
        assert_eq!(
            read(&mut pci, &mut m, 1, 6, 2),
            0x0010,
            "status read through"
        );
        m.writes.clear();
        write(&mut pci, &mut m, 1, 6, 2, 0xffff);
        write(&mut pci, &mut m, 1, 0x40, 4, 0);
        write(&mut pci, &mut m, 1, 0x44, 4, 0xfee0_0000);
        write(&mut pci, &mut m, 1, 0, 4, 0);
        write(&mut pci, &mut m, 1, 0x3c, 1, 0x0a);
        write(&mut pci, &mut m, 1, 0x0c, 2, 0x4010);
        assert!(m.writes.is_empty());
        assert_eq!(read(&mut pci, &mut m, 1, 0x3c, 4), 0x0000_010a);
        assert_eq!(read(&mut pci, &mut m, 1, 0x0c, 4), 0x0000_4010);
        assert_eq!(read(&mut pci, &mut m, 1, 0x40, 4), EDU_MSI);
        assert_eq!(m.devs[0].space[15], 0x0000_010b, "the host's line");
    }

    #[derive(Clone, Debug)]
    enum Access {
        Address(u32),
        Write(u8, u8, u32),
        Read(u8, u8),
    }

    fn access() -> impl Strategy<Value = Access> {
        prop_oneof![
            // Mostly enabled, bus 0 and the first devices, any offset.
            (any::<bool>(), 0u32..3, 0u32..5, 0u32..8, any::<u8>()).prop_map(
                |(on, bus, dev, f, off)| Access::Address(
                    u32::from(on) << 31 | bus << 16 | dev << 11 | f << 8 | u32::from(off)
                )
            ),
            any::<u32>().prop_map(Access::Address),
            (
                0u8..4,
                prop_oneof![Just(1u8), Just(2), Just(4)],
                any::<u32>()
            )
                .prop_map(|(p, s, v)| Access::Write(p, s, v)),
            (0u8..4, prop_oneof![Just(1u8), Just(2), Just(4)])
                .prop_map(|(p, s)| Access::Read(p, s)),
        ]
    }

    proptest! {
        /// Whatever the guest writes, the only write that reaches the
        /// device is a 16-bit command write holding only the guest's
        /// command bits: the host's BARs and ROM BAR are never written;
        /// every read of an absent function (past the assigned ones,
        /// another function number or bus, the address disabled) is all
        /// ones.
        #[test]
        fn the_guest_never_writes_host_bars_and_absent_functions_read_all_ones(
            accesses in proptest::collection::vec(access(), 1..200)
        ) {
            let mut m = Model::edu(2);
            let mut pci = Pci::default();
            let mut address = 0u32;
            for a in accesses {
                match a {
                    Access::Address(v) => {
                        pci.write(&mut m, 0xcf8, 4, v);
                        address = v;
                    }
                    Access::Write(p, s, v) => pci.write(&mut m, 0xcfc + u16::from(p), s, v),
                    Access::Read(p, s) => {
                        let v = pci.read(&mut m, 0xcfc + u16::from(p), s);
                        let dev = (address >> 11) & 31;
                        let absent = address & 1 << 31 == 0
                            || (address >> 16) & 0xff != 0
                            || (address >> 8) & 7 != 0
                            || dev > 2;
                        let ones = match s { 1 => 0xff, 2 => 0xffff, _ => u32::MAX };
                        if absent {
                            prop_assert_eq!(v, ones);
                        }
                    }
                }
            }
            for &(_, offset, size, value) in &m.writes {
                prop_assert_eq!((offset, size), (4, 2));
                prop_assert_eq!(value & !u32::from(COMMAND_BITS), 0x0000);
            }
            for d in &m.devs {
                prop_assert_eq!(d.space[4], EDU_HEADER[4]);
                prop_assert_eq!(&d.space[5..10], &[0u32; 5]);
                prop_assert_eq!(d.space[12], 0);
            }
        }
    }
}
