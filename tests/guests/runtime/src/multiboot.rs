//! The multiboot (version 1) information the loader passes in EBX, copied
//! into a small owned struct so that guests read it without `unsafe`.

use heapless::{String, Vec};

/// The most memory-map entries kept (the rest are dropped and counted).
pub const MAX_RANGES: usize = 32;
/// The longest command line kept (longer ones are cut; see
/// [`MultibootInfo::cmdline_truncated`]).
pub const MAX_CMDLINE: usize = 256;

/// Information flags (the `flags` word).
pub const FLAG_MEMORY: u32 = 1 << 0;
pub const FLAG_CMDLINE: u32 = 1 << 2;
pub const FLAG_MMAP: u32 = 1 << 6;
pub const FLAG_LOADER_NAME: u32 = 1 << 9;

/// A memory-map type: usable RAM.
pub const MEMORY_AVAILABLE: u32 = 1;

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    pub base: u64,
    pub length: u64,
    /// 1 usable RAM, 3 ACPI reclaimable, 4 ACPI NVS, 5 bad, other reserved.
    pub kind: u32,
}

impl MemoryRange {
    pub fn is_available(&self) -> bool {
        self.kind == MEMORY_AVAILABLE
    }
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.length)
    }
}

/// What the loader told the guest.
#[derive(Clone, Debug)]
pub struct MultibootInfo {
    /// The physical address of the loader's structure.
    pub address: u32,
    /// The raw `flags` word.
    pub flags: u32,
    /// KiB of memory below 1 MiB and above 1 MiB (flag bit 0).
    pub mem_lower: Option<u32>,
    pub mem_upper: Option<u32>,
    cmdline: Option<String<MAX_CMDLINE>>,
    cmdline_truncated: bool,
    loader_name: Option<String<64>>,
    ranges: Vec<MemoryRange, MAX_RANGES>,
    ranges_dropped: usize,
    has_mmap: bool,
}

impl MultibootInfo {
    /// Reads the information structure at physical `address`.
    ///
    /// # Safety
    /// `address` must be the multiboot information a loader passed, in
    /// identity-mapped memory, and the strings and memory map it points to
    /// must be readable.
    pub(crate) unsafe fn parse(address: u32) -> MultibootInfo {
        let base = address as usize as *const u32;
        // Safety: the caller guarantees that the structure is readable; the
        // fields are u32s at their index, read only where their flag says
        // they are valid.
        let field = |index: usize| unsafe { base.add(index).read_unaligned() };
        let flags = field(0);
        let mut info = MultibootInfo {
            address,
            flags,
            mem_lower: None,
            mem_upper: None,
            cmdline: None,
            cmdline_truncated: false,
            loader_name: None,
            ranges: Vec::new(),
            ranges_dropped: 0,
            has_mmap: false,
        };
        if flags & FLAG_MEMORY != 0 {
            info.mem_lower = Some(field(1));
            info.mem_upper = Some(field(2));
        }
        if flags & FLAG_CMDLINE != 0 && field(4) != 0 {
            // Safety: flag bit 2 says `cmdline` points at a C string.
            let (s, cut) = unsafe { c_string::<MAX_CMDLINE>(field(4)) };
            info.cmdline = Some(s);
            info.cmdline_truncated = cut;
        }
        if flags & FLAG_LOADER_NAME != 0 && field(16) != 0 {
            // Safety: flag bit 9 says `boot_loader_name` points at a C string.
            info.loader_name = Some(unsafe { c_string::<64>(field(16)) }.0);
        }
        if flags & FLAG_MMAP != 0 {
            info.has_mmap = true;
            let length = field(11) as usize;
            let start = field(12) as usize;
            let mut offset = 0;
            // Each entry: u32 size (not counting itself), u64 base, u64
            // length, u32 type.
            while offset + 24 <= length {
                let entry = (start + offset) as *const u8;
                // Safety: flag bit 6 says `mmap_addr`/`mmap_length` describe
                // the entries; this one lies inside them.
                let (size, range) = unsafe {
                    (
                        entry.cast::<u32>().read_unaligned(),
                        MemoryRange {
                            base: entry.add(4).cast::<u64>().read_unaligned(),
                            length: entry.add(12).cast::<u64>().read_unaligned(),
                            kind: entry.add(20).cast::<u32>().read_unaligned(),
                        },
                    )
                };
                if info.ranges.push(range).is_err() {
                    info.ranges_dropped += 1;
                }
                offset += size as usize + 4;
            }
        }
        info
    }

    /// The command line, if the loader passed one (cut at
    /// [`MAX_CMDLINE`] bytes; bytes that are not UTF-8 become U+FFFD).
    pub fn cmdline(&self) -> Option<&str> {
        self.cmdline.as_deref()
    }

    pub fn cmdline_truncated(&self) -> bool {
        self.cmdline_truncated
    }

    /// The boot loader's name, if it gave one.
    pub fn loader_name(&self) -> Option<&str> {
        self.loader_name.as_deref()
    }

    /// Whether the loader passed a memory map (flag bit 6).
    pub fn has_memory_map(&self) -> bool {
        self.has_mmap
    }

    /// The memory map (the first [`MAX_RANGES`] entries).
    pub fn memory_map(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Memory-map entries beyond [`MAX_RANGES`], not kept.
    pub fn ranges_dropped(&self) -> usize {
        self.ranges_dropped
    }

    /// The end of the highest usable RAM in the memory map (0 without one).
    pub fn ram_end(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.is_available())
            .map(|r| r.end())
            .max()
            .unwrap_or(0)
    }

    /// Usable RAM in the memory map: (bytes, number of ranges).
    pub fn available_memory(&self) -> (u64, usize) {
        self.ranges
            .iter()
            .filter(|r| r.is_available())
            .fold((0, 0), |(bytes, n), r| (bytes + r.length, n + 1))
    }
}

/// Copies the NUL-terminated string at `address`, at most `N` bytes, with
/// non-UTF-8 bytes replaced. Returns the string and whether it was cut.
///
/// # Safety
/// `address` must point at a readable NUL-terminated string (or at least
/// `N` readable bytes).
unsafe fn c_string<const N: usize>(address: u32) -> (String<N>, bool) {
    let p = address as usize as *const u8;
    let mut out = String::new();
    let mut bytes = [0u8; N];
    let mut len = 0;
    let mut cut = false;
    loop {
        // Safety: the caller guarantees the string is readable up to its NUL
        // (and this stops at N bytes).
        let b = unsafe { p.add(len).read() };
        if b == 0 {
            break;
        }
        if len == N {
            cut = true;
            break;
        }
        bytes[len] = b;
        len += 1;
    }
    for chunk in bytes[..len].utf8_chunks() {
        for c in chunk.valid().chars() {
            if out.push(c).is_err() {
                return (out, true);
            }
        }
        if !chunk.invalid().is_empty() && out.push(char::REPLACEMENT_CHARACTER).is_err() {
            return (out, true);
        }
    }
    (out, cut)
}
