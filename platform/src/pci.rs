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
}
