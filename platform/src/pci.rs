//! PCI configuration space through the legacy ports (mechanism 1: 0xcf8
//! address, 0xcfc data; segment 0), and memory BARs: what the kernel needs
//! to hand a device's registers to the service that drives it.

/// The configuration address of `offset` (dword-aligned) in function
/// `source` (bus << 8 | device << 3 | function).
pub const fn address(source: u16, offset: u8) -> u32 {
    1 << 31 | (source as u32) << 8 | (offset & 0xfc) as u32
}

/// Reads a configuration dword.
///
/// # Safety
/// The caller owns the configuration ports (no one else uses them
/// between the two accesses).
pub unsafe fn read(source: u16, offset: u8) -> u32 {
    // Safety: forwarded to the caller.
    unsafe {
        crate::port::outl(0xcf8, address(source, offset));
        crate::port::inl(0xcfc)
    }
}

/// Writes a configuration dword.
///
/// # Safety
/// As [`read`]; the write must mean something to the device.
pub unsafe fn write(source: u16, offset: u8, value: u32) {
    // Safety: forwarded to the caller.
    unsafe {
        crate::port::outl(0xcf8, address(source, offset));
        crate::port::outl(0xcfc, value);
    }
}

/// A memory BAR from its dwords as found (`low`, `high` for a 64-bit BAR)
/// and as read back after writing all ones (`probe_low`, `probe_high`):
/// (address, bytes). `None` for an I/O BAR or an unassigned or
/// unimplemented one.
pub const fn decode_bar(
    low: u32,
    high: u32,
    probe_low: u32,
    probe_high: u32,
) -> Option<(u64, u64)> {
    if low & 1 != 0 {
        return None;
    }
    let wide = low & 0b110 == 0b100;
    let base = (low & !0xf) as u64 | if wide { (high as u64) << 32 } else { 0 };
    let mask = (probe_low & !0xf) as u64
        | if wide {
            (probe_high as u64) << 32
        } else {
            0xffff_ffff << 32
        };
    let size = (!mask).wrapping_add(1);
    if base == 0 || probe_low & !0xf == 0 || size < 16 {
        None
    } else {
        Some((base, size))
    }
}

/// Memory BAR `index` of function `source`, sized with memory decoding
/// off and restored.
///
/// # Safety
/// As [`read`]; the device is not in use while it is sized.
pub unsafe fn memory_bar(source: u16, index: u8) -> Option<(u64, u64)> {
    if index > 5 {
        return None;
    }
    let at = 0x10 + 4 * index;
    // Safety: the caller's contract, for every access below.
    unsafe {
        let low = read(source, at);
        let wide = low & 0b111 == 0b100;
        if low & 1 != 0 || (wide && index == 5) {
            return None;
        }
        let command = read(source, 4) & 0xffff;
        write(source, 4, command & !0b10);
        write(source, at, u32::MAX);
        let probe_low = read(source, at);
        write(source, at, low);
        let (mut high, mut probe_high) = (0, 0);
        if wide {
            high = read(source, at + 4);
            write(source, at + 4, u32::MAX);
            probe_high = read(source, at + 4);
            write(source, at + 4, high);
        }
        write(source, 4, command);
        decode_bar(low, high, probe_low, probe_high)
    }
}

/// Writes `size` (1, 2 or 4) bytes at `offset` (aligned to `size`) of
/// function `source`: the bytes alone, through the data port's byte lanes.
///
/// # Safety
/// As [`write`].
pub unsafe fn write_sized(source: u16, offset: u8, size: u8, value: u32) {
    let port = 0xcfc + u16::from(offset & 3);
    // Safety: forwarded to the caller.
    unsafe {
        crate::port::outl(0xcf8, address(source, offset));
        match size {
            1 => crate::port::outb(port, value as u8),
            2 => crate::port::outw(port, value as u16),
            _ => crate::port::outl(0xcfc, value),
        }
    }
}

/// Configuration space as the reset code reads and writes it, and a
/// clock: the kernel's ports, or a model in the host tests.
pub trait Config {
    fn read(&mut self, source: u16, offset: u8) -> u32;
    fn write(&mut self, source: u16, offset: u8, value: u32);
    /// Writes `size` (1, 2 or 4) bytes at `offset` (aligned to `size`).
    /// By default the dword is read, merged and written back (a model's
    /// way; the ports write the bytes alone, so no write-1-to-clear bit
    /// beside them is touched).
    fn write_sized(&mut self, source: u16, offset: u8, size: u8, value: u32) {
        let shift = 8 * u32::from(offset & 3);
        let mask = if size >= 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * u32::from(size))) - 1) << shift
        };
        let old = self.read(source, offset & 0xfc);
        self.write(source, offset & 0xfc, old & !mask | (value << shift) & mask);
    }
    /// Waits `ms` milliseconds.
    fn sleep_ms(&mut self, ms: u32);
}

/// How a function was reset (DEVICE_RESET's answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Reset {
    /// Function-level reset through its PCI Express capability (DevCap
    /// bit 28).
    Flr,
    /// Function-level reset through its Advanced Features capability.
    AfFlr,
    /// Secondary bus reset through the bridge above it (`bridge`): the
    /// function is alone below that bridge.
    SecondaryBus { bridge: u16 },
    /// None of those: bus mastering turned off (its DMA stopped, pending
    /// transactions waited for where it says) and back on; the device's
    /// own state is not reset.
    BusMaster,
}

impl Reset {
    /// DEVICE_RESET's RDI.
    pub const fn code(self) -> u64 {
        match self {
            Self::Flr => 0,
            Self::AfFlr => 1,
            Self::SecondaryBus { .. } => 2,
            Self::BusMaster => 3,
        }
    }
}

/// Capability ids.
const CAP_PCIE: u8 = 0x10;
const CAP_AF: u8 = 0x13;

/// The offset of capability `id` in the function's list, if it has one.
fn capability(c: &mut dyn Config, source: u16, id: u8) -> Option<u8> {
    if (c.read(source, 4) >> 16) & 0x10 == 0 {
        return None;
    }
    let mut at = (c.read(source, 0x34) & 0xfc) as u8;
    // At most 48 capabilities fit in the 192 bytes after the header.
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        let head = c.read(source, at);
        if head as u8 == id {
            return Some(at);
        }
        at = ((head >> 8) & 0xfc) as u8;
    }
    None
}

fn exists(c: &mut dyn Config, source: u16) -> bool {
    c.read(source, 0) & 0xffff != 0xffff
}

/// The bridges from bus 0 down to the one whose secondary bus is `bus`
/// (that one last), each found on the bus above by its bus range; empty
/// for bus 0 or where no chain of configured bridges leads there. Each
/// step goes at least one bus deeper.
pub fn bridges_above(c: &mut dyn Config, bus: u8) -> heapless::Vec<u16, 32> {
    let mut chain = heapless::Vec::new();
    let mut on = 0u8;
    while on != bus {
        let next = (0..256u16).map(|df| u16::from(on) << 8 | df).find(|&b| {
            exists(c, b) && (c.read(b, 0x0c) >> 16) & 0x7f == 1 && {
                let buses = c.read(b, 0x18);
                let (sec, sub) = ((buses >> 8) as u8, (buses >> 16) as u8);
                sec > on && (sec..=sub).contains(&bus)
            }
        });
        match next.map(|b| (b, chain.push(b))) {
            Some((b, Ok(()))) => on = (c.read(b, 0x18) >> 8) as u8,
            _ => {
                chain.clear();
                break;
            }
        }
    }
    chain
}

/// Resets function `source` by the best means it offers: FLR (PCIe or
/// AF capability), else a secondary bus reset where it is the only
/// function below its bridge and no bus lies below it, else a bus-master
/// cycle. Its header (BARs, ROM, interrupt line, command) is saved first
/// and written back after, so its registers are where they were; a
/// function that does not answer is left alone (`None`). The waits are
/// [`Config::sleep_ms`]; [`Resetting`] does the same in steps, leaving the
/// waits to the caller.
pub fn reset(c: &mut dyn Config, source: u16) -> Option<Reset> {
    let (mut r, mut wait) = Resetting::start(c, source)?;
    while let Some(ms) = wait {
        c.sleep_ms(ms);
        wait = r.step(c);
    }
    Some(r.how)
}

/// A reset under way, in steps between which the function must be left
/// alone for a time (the caller's to wait: DEVICE_RESET returns to its
/// caller instead of spinning through 100 ms in the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resetting {
    pub source: u16,
    pub how: Reset,
    /// The header as it was: dwords 0..16.
    saved: [u32; 16],
    /// The PCI Express capability, where it has one (pending
    /// transactions are waited for through it).
    pcie: Option<u8>,
    stage: Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for pending transactions (up to 10 polls 10 ms apart), then
    /// the FLR (or, for a bus-master cycle, the header back).
    Idle { polls: u8 },
    /// The secondary bus reset asserted: released next.
    BusHeld,
    /// The reset done, the function settling: the header back next.
    Settling,
}

impl Resetting {
    /// Saves the header, turns bus mastering off and starts the reset;
    /// `None` where nothing answers at `source`. With it the first wait
    /// in ms before [`Self::step`] (`None`: done already).
    pub fn start(c: &mut dyn Config, source: u16) -> Option<(Self, Option<u32>)> {
        if !exists(c, source) {
            return None;
        }
        let saved: [u32; 16] = core::array::from_fn(|i| c.read(source, 4 * i as u8));
        let pcie = capability(c, source, CAP_PCIE);
        let af = capability(c, source, CAP_AF);
        // Bus mastering off: no new DMA from it.
        c.write(source, 4, saved[1] & 0xffff & !0b100);
        let flr = pcie.is_some_and(|at| c.read(source, at + 4) & 1 << 28 != 0);
        let af_flr = af.is_some_and(|at| c.read(source, at) & 1 << 25 != 0);
        let (how, stage) = if flr {
            (Reset::Flr, Stage::Idle { polls: 0 })
        } else if af_flr {
            (Reset::AfFlr, Stage::Idle { polls: 0 })
        } else if let Some(bridge) = alone_below_bridge(c, source) {
            let control = c.read(bridge, 0x3c);
            c.write(bridge, 0x3c, control | 1 << 22);
            (Reset::SecondaryBus { bridge }, Stage::BusHeld)
        } else {
            (Reset::BusMaster, Stage::Idle { polls: 0 })
        };
        let mut r = Self {
            source,
            how,
            saved,
            pcie,
            stage,
        };
        let wait = match stage {
            Stage::BusHeld => Some(2),
            _ => r.step(c),
        };
        Some((r, wait))
    }

    /// Whether its pending transactions are done (or it cannot say).
    fn idle(&self, c: &mut dyn Config) -> bool {
        let source = self.source;
        match (self.how, self.pcie) {
            (Reset::AfFlr, _) => {
                let at = capability(c, source, CAP_AF).unwrap_or(0);
                at == 0 || c.read(source, at + 4) & 1 << 8 == 0
            }
            (_, Some(at)) => c.read(source, at + 8) & 1 << 21 == 0,
            (_, None) => true,
        }
    }

    /// The next step, once the last wait is over: the next wait in ms, or
    /// `None` when the reset is done (its header written back).
    pub fn step(&mut self, c: &mut dyn Config) -> Option<u32> {
        let source = self.source;
        match self.stage {
            Stage::Idle { polls } if polls < 10 && !self.idle(c) => {
                self.stage = Stage::Idle { polls: polls + 1 };
                Some(10)
            }
            Stage::Idle { .. } => match self.how {
                Reset::Flr => {
                    let at = self.pcie.unwrap_or(0) + 8;
                    let control = c.read(source, at) & 0xffff;
                    c.write(source, at, control | 1 << 15);
                    self.stage = Stage::Settling;
                    Some(100)
                }
                Reset::AfFlr => {
                    let at = capability(c, source, CAP_AF).unwrap_or(0) + 4;
                    c.write(source, at, 1);
                    self.stage = Stage::Settling;
                    Some(100)
                }
                _ => {
                    self.restore(c);
                    None
                }
            },
            Stage::BusHeld => {
                if let Reset::SecondaryBus { bridge } = self.how {
                    let control = c.read(bridge, 0x3c);
                    c.write(bridge, 0x3c, control & !(1 << 22));
                }
                self.stage = Stage::Settling;
                Some(100)
            }
            Stage::Settling => {
                self.restore(c);
                None
            }
        }
    }

    /// The header back: BARs, ROM and interrupt line, then the command.
    fn restore(&self, c: &mut dyn Config) {
        for i in (3..16).filter(|&i| i != 14) {
            c.write(self.source, 4 * i as u8, self.saved[i]);
        }
        c.write(self.source, 4, self.saved[1] & 0xffff);
    }
}

/// Capability ids whose registers route a function's interrupts (MSI,
/// MSI-X).
const CAP_MSI: u8 = 0x05;
const CAP_MSIX: u8 = 0x11;

/// Why an access to a function's configuration space was refused
/// (DEVICE_CONFIG; the kernel logs it by this name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConfigRefusal {
    /// Not 1, 2 or 4 bytes.
    Size,
    /// Not aligned to its size.
    Misaligned,
    /// Beyond the 256 bytes the configuration ports reach.
    Beyond,
    /// A write to a base address register: the host's BARs are never moved
    /// (the device's registers are where the kernel hands them out).
    Bar { index: u8 },
    /// A write to the expansion ROM BAR.
    Rom,
    /// A write to a bridge's (header type 1 or 2) BARs, bus numbers,
    /// windows, ROM BAR or bridge control (0x10..=0x3f): they route other
    /// devices' traffic or reset the bus below.
    BridgeHeader,
    /// A write into the MSI or MSI-X capability: without interrupt
    /// remapping a device's message could raise any vector on the host.
    Interrupts { capability: u8 },
    /// A BAR probe of a register that is no BAR (or ROM BAR), or not 4
    /// bytes.
    NotABar,
    /// A function-level reset started by a write (PCI Express device
    /// control bit 15, AF control bit 0): its BARs would be cleared and
    /// not written back (DEVICE_RESET resets and restores them).
    FunctionReset,
    /// No such op (read 0, write 1, probe 2).
    Op,
}

/// Checks the form of an access: 1, 2 or 4 bytes, aligned, within the 256
/// bytes of the function's configuration space the ports reach.
pub fn check_access(offset: u64, size: u64) -> Result<u8, ConfigRefusal> {
    if !matches!(size, 1 | 2 | 4) {
        return Err(ConfigRefusal::Size);
    }
    if !offset.is_multiple_of(size) {
        return Err(ConfigRefusal::Misaligned);
    }
    u8::try_from(offset).map_err(|_| ConfigRefusal::Beyond)
}

/// Whether bytes `offset..offset + size` meet `first..=last`.
const fn meets(offset: u8, size: u8, first: u8, last: u8) -> bool {
    offset <= last && offset as u16 + size as u16 > first as u16
}

/// Checks a write of `size` bytes at `offset` (its form already checked)
/// against what the kernel never lets a function's holder change,
/// whatever its policy: BARs and the ROM BAR, a bridge's routing
/// registers, the MSI and MSI-X capabilities, a function-level reset
/// (PCI Express or AF: its BARs would be cleared and not written back;
/// DEVICE_RESET does that). Everything else (command, other capabilities,
/// device-specific registers) is the holder's.
pub fn check_write(
    c: &mut dyn Config,
    source: u16,
    offset: u8,
    size: u8,
    value: u32,
) -> Result<(), ConfigRefusal> {
    let header = (c.read(source, 0x0c) >> 16) & 0x7f;
    if header != 0 {
        if meets(offset, size, 0x10, 0x3f) {
            return Err(ConfigRefusal::BridgeHeader);
        }
    } else if meets(offset, size, 0x10, 0x27) {
        return Err(ConfigRefusal::Bar {
            index: (offset.max(0x10) - 0x10) / 4,
        });
    } else if meets(offset, size, 0x30, 0x33) {
        return Err(ConfigRefusal::Rom);
    }
    for id in [CAP_MSI, CAP_MSIX] {
        let Some(at) = capability(c, source, id) else {
            continue;
        };
        // MSI: up to 24 bytes (64-bit, per-vector masking); MSI-X: 12.
        let last = at + if id == CAP_MSI { 23 } else { 11 };
        if meets(offset, size, at, last) {
            return Err(ConfigRefusal::Interrupts { capability: id });
        }
    }
    // The byte `at` would be written with, if this write covers it.
    let byte = |at: u8| {
        (offset..offset.saturating_add(size))
            .contains(&at)
            .then(|| (value >> (8 * u32::from(at - offset))) as u8)
    };
    let pcie_flr = capability(c, source, CAP_PCIE).and_then(|at| byte(at + 9));
    let af_flr = capability(c, source, CAP_AF).and_then(|at| byte(at + 4));
    if pcie_flr.is_some_and(|b| b & 0x80 != 0) || af_flr.is_some_and(|b| b & 1 != 0) {
        return Err(ConfigRefusal::FunctionReset);
    }
    Ok(())
}

/// What BAR (or ROM BAR) register `offset` reads after all ones are
/// written to it (its size and type bits), probed with memory and I/O
/// decoding off, the register and the command written back after: the
/// sizes a device model needs without moving the host's BARs. Any of a
/// type-0 header's six BAR dwords (the upper half of a 64-bit BAR too)
/// and its ROM BAR at 0x30; a bridge's two BARs and ROM BAR at 0x38.
pub fn probe_bar(c: &mut dyn Config, source: u16, offset: u8) -> Result<u32, ConfigRefusal> {
    let header = (c.read(source, 0x0c) >> 16) & 0x7f;
    let (last_bar, rom) = match header {
        0 => (0x24, 0x30),
        1 => (0x14, 0x38),
        _ => return Err(ConfigRefusal::NotABar),
    };
    let bar = (0x10..=last_bar).contains(&offset) && offset.is_multiple_of(4);
    if !bar && offset != rom {
        return Err(ConfigRefusal::NotABar);
    }
    let command = c.read(source, 4) & 0xffff;
    let saved = c.read(source, offset);
    c.write(source, 4, command & !0b11);
    // The ROM's enable bit stays off while it is probed.
    c.write(source, offset, if bar { u32::MAX } else { !1 });
    let probed = c.read(source, offset);
    c.write(source, offset, saved);
    c.write(source, 4, command);
    Ok(probed)
}

/// The bridge above `source` when a secondary bus reset would reach only
/// it: no other function answers on its bus, and no bus lies below.
fn alone_below_bridge(c: &mut dyn Config, source: u16) -> Option<u16> {
    let bus = (source >> 8) as u8;
    if bus == 0 {
        return None;
    }
    let bridge = *bridges_above(c, bus).last()?;
    let alone = (c.read(bridge, 0x18) >> 16) as u8 == bus
        && (0..256u16)
            .map(|df| u16::from(bus) << 8 | df)
            .all(|f| f == source || !exists(c, f));
    alone.then_some(bridge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_decode_by_the_bits_the_device_keeps() {
        // edu's BAR 0: 1 MiB, 32-bit, at 0xfea00000.
        assert_eq!(
            decode_bar(0xfea0_0000, 0, 0xfff0_0000, 0),
            Some((0xfea0_0000, 1 << 20))
        );
        // 64-bit, 16 KiB, above 4 GiB.
        assert_eq!(
            decode_bar(0x0000_c00c, 0x8, 0xffff_c00c, 0xffff_ffff),
            Some((0x8_0000_c000, 0x4000))
        );
        assert_eq!(decode_bar(0xc001, 0, 0xffff_ff01, 0), None, "an I/O BAR");
        assert_eq!(decode_bar(0, 0, 0xfff0_0000, 0), None, "unassigned");
        assert_eq!(decode_bar(0xfea0_0000, 0, 0, 0), None, "not implemented");
        assert_eq!(address(0x18, 0x13), 0x8000_1810);
    }

    /// A model of configuration space: functions as dword maps; an FLR or
    /// a secondary bus reset clears what a reset clears (BARs, command).
    #[derive(Default)]
    struct Model {
        space: std::collections::BTreeMap<u16, [u32; 64]>,
        /// (source) reset, in order; every command-register write.
        resets: std::vec::Vec<u16>,
        commands: std::vec::Vec<(u16, u32)>,
        slept: u32,
        /// Where writing a function's FLR bit resets it: (PCIe device
        /// control, AF control).
        controls: std::collections::BTreeMap<u16, (Option<u8>, Option<u8>)>,
        /// Registers that keep only some bits (a BAR's size): the bits
        /// written through; the rest keep their value.
        masks: std::collections::BTreeMap<(u16, u8), u32>,
    }

    impl Model {
        fn function(&mut self, source: u16, caps: &[(u8, u32, u32)]) {
            let mut f = [0u32; 64];
            f[0] = 0x11e8_1234;
            f[1] = 0x0000_0006; // memory decoding, bus mastering
            f[4] = 0xfea0_0000; // BAR 0
            f[15] = 0x0000_010b; // interrupt line 11
            let mut prev: Option<usize> = None;
            for &(id, w1, w2) in caps {
                let at = prev.map_or(0x40, |p| p + 0x10);
                f[at / 4] = u32::from(id);
                f[at / 4 + 1] = w1;
                f[at / 4 + 2] = w2;
                match prev {
                    None => {
                        f[1] |= 0x10 << 16;
                        f[0x34 / 4] = at as u32;
                    }
                    Some(p) => f[p / 4] |= (at as u32) << 8,
                }
                let c = self.controls.entry(source).or_default();
                match id {
                    CAP_PCIE => c.0 = Some(at as u8 + 8),
                    CAP_AF => c.1 = Some(at as u8 + 4),
                    _ => {}
                }
                prev = Some(at);
            }
            self.space.insert(source, f);
        }
        fn bridge(&mut self, source: u16, secondary: u8, subordinate: u8) {
            let mut f = [0u32; 64];
            f[0] = 0x000c_1b36;
            f[3] = 1 << 16;
            f[6] =
                u32::from(source >> 8) | u32::from(secondary) << 8 | u32::from(subordinate) << 16;
            self.space.insert(source, f);
        }
        fn reset_function(&mut self, source: u16) {
            self.resets.push(source);
            let f = self.space.get_mut(&source).unwrap();
            f[1] &= !0xffff;
            for bar in &mut f[4..10] {
                *bar = 0;
            }
            f[15] &= !0xff;
        }
    }

    impl Config for Model {
        fn read(&mut self, source: u16, offset: u8) -> u32 {
            self.space
                .get(&source)
                .map_or(u32::MAX, |f| f[usize::from(offset) / 4])
        }
        fn write(&mut self, source: u16, offset: u8, value: u32) {
            let Some(f) = self.space.get_mut(&source) else {
                return;
            };
            let at = usize::from(offset) / 4;
            let old = f[at];
            // The status half of the command dword is read-only here.
            f[at] = if offset == 4 {
                old & 0xffff_0000 | value & 0xffff
            } else if let Some(&m) = self.masks.get(&(source, offset & 0xfc)) {
                value & m | old & !m
            } else {
                value
            };
            if offset == 4 {
                self.commands.push((source, value & 0xffff));
            }
            let (flr, af) = self.controls.get(&source).copied().unwrap_or_default();
            if flr == Some(offset) && value & 1 << 15 != 0 {
                f[at] &= !(1 << 15);
                self.reset_function(source);
            } else if af == Some(offset) && value & 1 != 0 {
                f[at] &= !1;
                self.reset_function(source);
            } else if offset == 0x3c
                && f[3] >> 16 & 0x7f == 1
                && value & 1 << 22 != 0
                && old & 1 << 22 == 0
            {
                let sec = (f[6] >> 8) as u8;
                let below: std::vec::Vec<u16> = self
                    .space
                    .keys()
                    .copied()
                    .filter(|s| (s >> 8) as u8 == sec)
                    .collect();
                for b in below {
                    self.reset_function(b);
                }
            }
        }
        fn sleep_ms(&mut self, ms: u32) {
            self.slept += ms;
        }
    }

    fn restored(m: &mut Model, source: u16) {
        assert_eq!(m.read(source, 0x10), 0xfea0_0000, "BAR 0 written back");
        assert_eq!(m.read(source, 0x3c) & 0xff, 0x0b, "interrupt line back");
        assert_eq!(m.read(source, 4) & 0xffff, 6, "command back");
        assert_eq!(
            m.commands.first(),
            Some(&(source, 2)),
            "bus mastering off first"
        );
    }

    /// DEVICE_CONFIG's form (issue 14): 1, 2 or 4 bytes, aligned, in the
    /// 256 bytes the ports reach.
    #[test]
    fn accesses_out_of_form_are_refused_by_name() {
        assert_eq!(check_access(0, 4), Ok(0));
        assert_eq!(check_access(0xfe, 2), Ok(0xfe));
        assert_eq!(check_access(0xff, 1), Ok(0xff));
        assert_eq!(check_access(0x100, 4), Err(ConfigRefusal::Beyond));
        assert_eq!(check_access(0xffc, 4), Err(ConfigRefusal::Beyond));
        assert_eq!(check_access(u64::MAX - 3, 4), Err(ConfigRefusal::Beyond));
        assert_eq!(check_access(0x12, 4), Err(ConfigRefusal::Misaligned));
        assert_eq!(check_access(0x3, 2), Err(ConfigRefusal::Misaligned));
        for size in [0, 3, 8, u64::MAX] {
            assert_eq!(check_access(0, size), Err(ConfigRefusal::Size));
        }
    }

    /// The kernel's own refusals, whatever the policy: no byte of a BAR,
    /// the ROM BAR, a bridge's routing registers or the MSI and MSI-X
    /// capabilities is writable; the command register, the interrupt line
    /// and other capabilities are.
    #[test]
    fn writes_that_would_move_host_bars_or_route_interrupts_are_refused() {
        let mut m = Model::default();
        // MSI at 0x40, PCIe at 0x50, MSI-X at 0x60.
        m.function(
            0x0018,
            &[(CAP_MSI, 0, 0), (CAP_PCIE, 0, 0), (CAP_MSIX, 0, 0)],
        );
        m.bridge(0x0020, 1, 1);
        for offset in 0..=255u8 {
            for size in [1u8, 2, 4] {
                if offset % size != 0 {
                    continue;
                }
                let got = check_write(&mut m, 0x0018, offset, size, 0);
                let want = match offset {
                    0x10..=0x27 => Err(ConfigRefusal::Bar {
                        index: (offset - 0x10) / 4,
                    }),
                    0x30..=0x33 => Err(ConfigRefusal::Rom),
                    0x40..=0x57 => Err(ConfigRefusal::Interrupts {
                        capability: CAP_MSI,
                    }),
                    0x60..=0x6b => Err(ConfigRefusal::Interrupts {
                        capability: CAP_MSIX,
                    }),
                    _ => Ok(()),
                };
                assert_eq!(got, want, "offset {offset:#x} size {size}");
                let bridge = check_write(&mut m, 0x0020, offset, size, 0);
                if (0x10..=0x3f).contains(&offset) {
                    assert_eq!(bridge, Err(ConfigRefusal::BridgeHeader));
                } else {
                    assert_eq!(bridge, Ok(()), "bridge offset {offset:#x}");
                }
            }
        }
        assert!(check_write(&mut m, 0x0018, 0x04, 4, u32::MAX).is_ok());
        // PCIe device control (0x58): FLR (bit 15) refused, the rest taken.
        let flr = Err(ConfigRefusal::FunctionReset);
        assert_eq!(check_write(&mut m, 0x0018, 0x58, 2, 0x8000), flr);
        assert_eq!(check_write(&mut m, 0x0018, 0x59, 1, 0x80), flr);
        assert_eq!(check_write(&mut m, 0x0018, 0x58, 4, 0x8000), flr);
        assert_eq!(check_write(&mut m, 0x0018, 0x58, 2, 0x7fff), Ok(()));
        assert_eq!(check_write(&mut m, 0x0018, 0x5a, 2, 0xffff), Ok(()));
        // AF control (capability at 0x40 here: control at 0x44).
        let mut m = Model::default();
        m.function(0x0018, &[(CAP_AF, 0, 0)]);
        assert_eq!(check_write(&mut m, 0x0018, 0x44, 4, 1), flr);
        assert_eq!(check_write(&mut m, 0x0018, 0x44, 1, 1), flr);
        assert_eq!(check_write(&mut m, 0x0018, 0x44, 2, 0x0100), Ok(()));
    }

    /// A BAR probe answers the size bits with decoding off, and leaves the
    /// BAR and the command as they were.
    #[test]
    fn bars_are_probed_and_written_back() {
        let mut m = Model::default();
        m.function(0x0018, &[]);
        // BAR 0: 1 MiB memory; BAR 1: an I/O BAR of 16 ports; ROM 64 KiB.
        m.masks.insert((0x0018, 0x10), 0xfff0_0000);
        m.space.get_mut(&0x0018).unwrap()[5] = 0xc001;
        m.masks.insert((0x0018, 0x14), 0xffff_fff0);
        m.space.get_mut(&0x0018).unwrap()[12] = 0xfeb0_0000;
        m.masks.insert((0x0018, 0x30), 0xffff_0001);
        m.masks.insert((0x0018, 0x18), 0);
        assert_eq!(probe_bar(&mut m, 0x0018, 0x10), Ok(0xfff0_0000));
        assert_eq!(probe_bar(&mut m, 0x0018, 0x14), Ok(0xffff_fff1));
        assert_eq!(probe_bar(&mut m, 0x0018, 0x30), Ok(0xffff_0000));
        assert_eq!(probe_bar(&mut m, 0x0018, 0x18), Ok(0), "unimplemented");
        assert_eq!(m.read(0x0018, 0x10), 0xfea0_0000);
        assert_eq!(m.read(0x0018, 0x14), 0xc001);
        assert_eq!(m.read(0x0018, 0x30), 0xfeb0_0000);
        assert_eq!(m.read(0x0018, 4) & 0xffff, 6, "command back");
        assert!(m.commands.iter().step_by(2).all(|&(_, c)| c & 3 == 0));
        for at in [0x0c, 0x28, 0x34, 0x12] {
            assert_eq!(probe_bar(&mut m, 0x0018, at), Err(ConfigRefusal::NotABar));
        }
    }

    /// Sub-dword writes through the default merge keep the other bytes.
    #[test]
    fn sized_writes_change_only_their_bytes() {
        let mut m = Model::default();
        m.function(0x0018, &[]);
        m.write_sized(0x0018, 0x3c, 1, 0x0a);
        assert_eq!(m.read(0x0018, 0x3c), 0x10a);
        m.write_sized(0x0018, 0x3e, 2, 0xbeef);
        assert_eq!(m.read(0x0018, 0x3c), 0xbeef_010a);
    }

    /// Issue 12 point 5 (IO-6): a function advertising FLR in its PCI
    /// Express capability is reset that way, its header written back.
    #[test]
    fn a_function_with_flr_is_reset_by_flr() {
        let mut m = Model::default();
        // PCIe capability: DevCap with FLR (bit 28).
        m.function(0x0018, &[(0x05, 0, 0), (CAP_PCIE, 1 << 28, 0)]);
        assert_eq!(reset(&mut m, 0x0018), Some(Reset::Flr));
        assert_eq!(m.resets, [0x0018]);
        assert!(m.slept >= 100, "100 ms after an FLR");
        restored(&mut m, 0x0018);
    }

    #[test]
    fn a_function_with_af_flr_is_reset_by_it() {
        let mut m = Model::default();
        // PCIe without FLR, then AF (at 0x50) with FLR and TP (its
        // capabilities byte: bits 25, 24 of its first dword).
        m.function(0x0018, &[(CAP_PCIE, 0, 0), (CAP_AF, 0, 0)]);
        m.space.get_mut(&0x0018).unwrap()[0x50 / 4] |= 0x3 << 24;
        assert_eq!(reset(&mut m, 0x0018), Some(Reset::AfFlr));
        assert_eq!(m.resets, [0x0018]);
        restored(&mut m, 0x0018);
    }

    /// Without FLR, alone below a bridge: a secondary bus reset through
    /// it (asserted, then released), found from bus 0 down.
    #[test]
    fn a_function_alone_below_a_bridge_gets_a_secondary_bus_reset() {
        let mut m = Model::default();
        m.bridge(0x0020, 1, 2); // 00:04.0 -> buses 1..=2
        m.bridge(0x0100, 2, 2); // 01:00.0 -> bus 2
        m.function(0x0200, &[]);
        m.function(0x0018, &[]);
        assert_eq!(
            reset(&mut m, 0x0200),
            Some(Reset::SecondaryBus { bridge: 0x0100 })
        );
        assert_eq!(m.resets, [0x0200], "only the function below it");
        assert_eq!(m.read(0x0100, 0x3c) & 1 << 22, 0, "released");
        restored(&mut m, 0x0200);
    }

    /// Issue 14 point 5: the same resets in steps, the waits left to the
    /// caller (DEVICE_RESET returns between them): nothing sleeps inside.
    #[test]
    fn a_reset_in_steps_leaves_the_waits_to_the_caller() {
        let mut m = Model::default();
        m.bridge(0x0020, 1, 1);
        m.function(0x0100, &[]);
        let (mut r, wait) = Resetting::start(&mut m, 0x0100).unwrap();
        assert_eq!(wait, Some(2));
        assert_ne!(m.read(0x0020, 0x3c) & 1 << 22, 0, "held");
        assert_eq!(r.how, Reset::SecondaryBus { bridge: 0x0020 });
        assert_eq!(r.step(&mut m), Some(100));
        assert_eq!(m.read(0x0020, 0x3c) & 1 << 22, 0, "released");
        assert_eq!(m.read(0x0100, 0x10), 0, "cleared by the reset");
        assert_eq!(r.step(&mut m), None);
        restored(&mut m, 0x0100);
        assert_eq!(m.slept, 0);

        let mut m = Model::default();
        m.function(0x0018, &[(CAP_PCIE, 1 << 28, 1 << 21)]);
        let (mut r, wait) = Resetting::start(&mut m, 0x0018).unwrap();
        assert_eq!(
            (r.how, wait),
            (Reset::Flr, Some(10)),
            "transactions pending"
        );
        assert!(m.resets.is_empty());
        let mut waits = std::vec![];
        while let Some(ms) = r.step(&mut m) {
            waits.push(ms);
        }
        assert_eq!(
            waits.iter().sum::<u32>(),
            9 * 10 + 100,
            "10 polls, FLR, 100 ms"
        );
        assert_eq!(m.resets, [0x0018]);
        restored(&mut m, 0x0018);
        assert!(Resetting::start(&mut m, 0x0500).is_none());
    }

    /// The bridges above a bus, from bus 0 down (init turns on their
    /// memory decoding and bus mastering for a device it hands out).
    #[test]
    fn the_bridges_above_a_bus_are_found_from_bus_0_down() {
        let mut m = Model::default();
        m.bridge(0x0020, 1, 3); // 00:04.0 -> buses 1..=3
        m.bridge(0x0028, 4, 4); // 00:05.0 -> bus 4
        m.bridge(0x0108, 2, 3); // 01:01.0 -> buses 2..=3
        m.bridge(0x0200, 3, 3); // 02:00.0 -> bus 3
        m.function(0x0018, &[]);
        assert_eq!(
            bridges_above(&mut m, 3).as_slice(),
            [0x0020, 0x0108, 0x0200]
        );
        assert_eq!(bridges_above(&mut m, 4).as_slice(), [0x0028]);
        assert!(bridges_above(&mut m, 0).is_empty(), "the root bus");
        assert!(bridges_above(&mut m, 7).is_empty(), "no bridge leads there");
    }

    /// Where a bus reset would reach others (another function on its bus,
    /// or a bus below its bridge), or it is on bus 0: bus mastering off and
    /// back on, nothing reset.
    #[test]
    fn otherwise_bus_mastering_is_cycled_and_nothing_else_reset() {
        let mut m = Model::default();
        m.bridge(0x0020, 1, 1);
        m.function(0x0100, &[]);
        m.function(0x0101, &[]);
        m.function(0x0018, &[]);
        for f in [0x0100, 0x0018] {
            m.commands.clear();
            assert_eq!(reset(&mut m, f), Some(Reset::BusMaster));
            restored(&mut m, f);
        }
        m.bridge(0x0028, 3, 4);
        m.function(0x0300, &[]);
        assert_eq!(reset(&mut m, 0x0300), Some(Reset::BusMaster));
        assert!(m.resets.is_empty());
        assert_eq!(reset(&mut m, 0x0500), None, "nothing answers there");
    }
}
