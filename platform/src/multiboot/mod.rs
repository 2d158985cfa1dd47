//! Starting a guest the way its boot loader would: a multiboot (version 1)
//! or multiboot2 loader, or a PVH loader (an ELF kernel with Xen's
//! `XEN_ELFNOTE_PHYS32_ENTRY` note, as Linux's vmlinux has), or Linux's own
//! boot protocol for a bzImage: find the guest image's header, work out
//! which bytes go where, and build the information block the guest finds
//! through EBX (ESI for Linux) ([`mb2`], [`pvh`], [`linux`] for the others).
//!
//! Pure functions of the image bytes: the kernel executes the plan (copies
//! into guest RAM), the host tests check it. A guest image is untrusted input;
//! every offset and length is checked against the file and the guest's RAM.

use heapless::Vec;

/// The header magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What a multiboot loader leaves in EAX.
pub const BOOT_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the first 8 KiB, 4-byte aligned.
const SEARCH: usize = 8192;

const FLAG_ALIGN_MODULES: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_ADDRESSES: u32 = 1 << 16;

/// The most loadable segments an image may have.
pub const MAX_SEGMENTS: usize = 8;

pub mod acpi;
pub mod linux;
pub mod mb2;
pub mod pvh;

/// The boot protocol an image asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Format {
    /// Multiboot version 1 (EAX = [`BOOT_MAGIC`], EBX = its information).
    Multiboot,
    /// Multiboot2 (EAX = [`mb2::BOOT_MAGIC`], EBX = its information).
    Multiboot2,
    /// PVH (EBX = the `hvm_start_info`).
    Pvh,
    /// A Linux bzImage (ESI = its `boot_params`, through [`linux::trampoline`]).
    Linux,
}

/// Why an image cannot be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ImageError {
    /// No multiboot header in the first 8 KiB.
    NoHeader,
    /// The header's checksum is wrong.
    BadChecksum,
    /// The header asks for something this loader does not provide (a video
    /// mode, or an unknown required feature); the flag bits.
    UnsupportedFlags(u32),
    /// The header's address fields are inconsistent with each other or the file.
    BadAddresses,
    /// Not an ELF file, and the header has no address fields.
    NotElf,
    /// The ELF headers are malformed or point outside the file.
    BadElf,
    /// More loadable segments than [`MAX_SEGMENTS`].
    TooManySegments,
    /// A segment lies (partly) outside the guest's RAM or over the area the
    /// loader keeps for the information block.
    OutsideRam { start: u64, end: u64 },
    /// Nothing to load.
    Empty,
    /// A multiboot2 header's architecture is not i386 (0).
    Mb2Architecture(u32),
    /// A multiboot2 header's tags run past its length or are malformed.
    Mb2BadTags,
    /// A multiboot2 header requires a tag (or information) the loader does
    /// not provide: a framebuffer, EFI boot services, a console; its type.
    Mb2Unsupported(u16),
    /// A PVH entry note whose entry point is not a 32-bit address.
    PvhBadNote,
    /// A Linux bzImage whose boot protocol is older than
    /// [`linux::MIN_VERSION`]: its version.
    LinuxProtocol(u16),
    /// A Linux image that is not a bzImage (`LOADED_HIGH` clear: a zImage
    /// loaded at 0x10000).
    LinuxNotLoadedHigh,
    /// A Linux image shorter than its setup header, setup sectors and
    /// `syssize` say.
    LinuxTruncated,
}

/// One piece of the image to place in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    /// Where the bytes are in the image file.
    pub file_offset: usize,
    pub file_len: usize,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Bytes of guest memory the segment covers; the part beyond `file_len`
    /// is zeroed.
    pub mem_len: u64,
}

/// Everything needed to load and enter a guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LoadPlan {
    pub segments: Vec<Segment, MAX_SEGMENTS>,
    /// The 32-bit entry point.
    pub entry: u32,
    /// The header's flags (multiboot version 1; 0 for the others).
    pub flags: u32,
    pub format: Format,
}

impl LoadPlan {
    /// The first byte past everything it loads (where modules may start).
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.gpa + s.mem_len)
            .max()
            .unwrap_or(0)
    }
}

/// Where guest RAM is and which part the loader keeps for itself.
#[derive(Clone, Copy, Debug)]
pub struct GuestLayout {
    /// Bytes of RAM, from guest-physical 0.
    pub ram_bytes: u64,
    /// A range that the image must not overlap (the information block).
    pub reserved: (u64, u64),
    /// The legacy hole (VGA, ROMs) that is not RAM: 0xa0000..0x100000.
    pub hole: (u64, u64),
    /// The part of the hole where a PC has its option and BIOS ROMs,
    /// 0xc0000..0x100000: mapped as zeroed memory (not RAM in the memory
    /// map, never loaded into), because kernels read it looking for BIOS
    /// tables (Linux: the iBFT, the MP table, DMI, option ROMs) and must
    /// find nothing there rather than fault. The VGA window below it stays
    /// unmapped.
    pub rom: (u64, u64),
}

impl GuestLayout {
    pub fn new(ram_bytes: u64) -> Self {
        Self {
            ram_bytes,
            reserved: (INFO_GPA, INFO_GPA + INFO_SIZE as u64),
            hole: (0xa_0000, 0x10_0000),
            rom: (0xc_0000, 0x10_0000),
        }
    }
}

/// Guest-physical address of the information block Parallax builds.
pub const INFO_GPA: u64 = 0x1000;
/// Bytes kept for the information block and what it points to.
pub const INFO_SIZE: usize = 4096;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Finds the header and computes the load plan for a guest with `layout`:
/// a multiboot header first, then a multiboot2 header, then an ELF's PVH
/// entry note, then a Linux setup header (the order of QEMU's `-kernel`).
pub fn plan(image: &[u8], layout: &GuestLayout) -> Result<LoadPlan, ImageError> {
    let v1 = (0..image.len().min(SEARCH).saturating_sub(11))
        .step_by(4)
        .find(|&i| u32_at(image, i) == Some(HEADER_MAGIC));
    let plan = if let Some(at) = v1 {
        plan_v1(image, at)?
    } else if let Some(at) = mb2::find(image) {
        mb2::plan(image, at)?
    } else if let Some(entry) = pvh::entry(image)? {
        plan_from_elf(image, 0, Some(entry), Format::Pvh)?
    } else if linux::is_bzimage(image) {
        linux::plan(image, layout.ram_bytes)?
    } else {
        return Err(ImageError::NoHeader);
    };
    if plan.segments.is_empty() {
        return Err(ImageError::Empty);
    }
    for s in &plan.segments {
        let end = s
            .gpa
            .checked_add(s.mem_len)
            .ok_or(ImageError::BadAddresses)?;
        let overlaps = |(a, b): (u64, u64)| s.gpa < b && a < end;
        if end > layout.ram_bytes || overlaps(layout.reserved) || overlaps(layout.hole) {
            return Err(ImageError::OutsideRam { start: s.gpa, end });
        }
    }
    Ok(plan)
}

/// A multiboot (version 1) header at `at`.
fn plan_v1(image: &[u8], at: usize) -> Result<LoadPlan, ImageError> {
    let flags = u32_at(image, at + 4).ok_or(ImageError::NoHeader)?;
    let checksum = u32_at(image, at + 8).ok_or(ImageError::NoHeader)?;
    if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(ImageError::BadChecksum);
    }
    let unsupported = flags & 0xffff & !(FLAG_ALIGN_MODULES | FLAG_MEMORY_INFO);
    if unsupported != 0 || flags & FLAG_VIDEO_MODE != 0 {
        return Err(ImageError::UnsupportedFlags(flags));
    }
    if flags & FLAG_ADDRESSES != 0 {
        let field = |n: usize| u32_at(image, at + 12 + 4 * n).ok_or(ImageError::BadAddresses);
        let addresses = Addresses {
            header_addr: field(0)?,
            load_addr: field(1)?,
            load_end: field(2)?,
            bss_end: field(3)?,
        };
        plan_from_addresses(image, at, &addresses, field(4)?, flags, Format::Multiboot)
    } else {
        plan_from_elf(image, flags, None, Format::Multiboot)
    }
}

/// A header's address fields (the "a.out kludge" of multiboot, the address
/// tag of multiboot2).
pub(crate) struct Addresses {
    /// The address of the header itself.
    pub header_addr: u32,
    pub load_addr: u32,
    /// 0: to the end of the file.
    pub load_end: u32,
    /// 0: no bss.
    pub bss_end: u32,
}

/// The header's own address fields say what to load: the file from the
/// offset that puts the header (at `at`) at `header_addr`.
pub(crate) fn plan_from_addresses(
    image: &[u8],
    at: usize,
    a: &Addresses,
    entry: u32,
    flags: u32,
    format: Format,
) -> Result<LoadPlan, ImageError> {
    let Addresses {
        header_addr,
        load_addr,
        load_end,
        bss_end,
    } = *a;
    if load_addr > header_addr {
        return Err(ImageError::BadAddresses);
    }
    let file_offset = at
        .checked_sub((header_addr - load_addr) as usize)
        .ok_or(ImageError::BadAddresses)?;
    let file_len = if load_end == 0 {
        image.len() - file_offset
    } else {
        load_end
            .checked_sub(load_addr)
            .ok_or(ImageError::BadAddresses)? as usize
    };
    if file_offset
        .checked_add(file_len)
        .is_none_or(|e| e > image.len())
    {
        return Err(ImageError::BadAddresses);
    }
    let mem_end = if bss_end == 0 {
        u64::from(load_addr) + file_len as u64
    } else {
        u64::from(bss_end)
    };
    if mem_end < u64::from(load_addr) + file_len as u64 {
        return Err(ImageError::BadAddresses);
    }
    let mut segments = Vec::new();
    let _ = segments.push(Segment {
        file_offset,
        file_len,
        gpa: u64::from(load_addr),
        mem_len: mem_end - u64::from(load_addr),
    });
    Ok(LoadPlan {
        segments,
        entry,
        flags,
        format,
    })
}

/// An ELF file's header: what the loaders need of it.
pub(crate) struct ElfHeader {
    pub class64: bool,
    pub entry: u64,
    phoff: usize,
    phentsize: usize,
    pub phnum: usize,
}

/// One program header: type, file offset, physical address, file and
/// memory sizes.
pub(crate) struct ProgramHeader {
    pub kind: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

impl ElfHeader {
    pub fn read(image: &[u8]) -> Result<Self, ImageError> {
        if image.get(0..4) != Some(b"\x7fELF") {
            return Err(ImageError::NotElf);
        }
        let bad = ImageError::BadElf;
        let class64 = match image.get(4) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(bad),
        };
        if image.get(5) != Some(&1) {
            return Err(bad); // little endian only
        }
        Ok(if class64 {
            ElfHeader {
                class64,
                entry: u64_at(image, 24).ok_or(bad)?,
                phoff: u64_at(image, 32).ok_or(bad)? as usize,
                phentsize: u16_at(image, 54).ok_or(bad)? as usize,
                phnum: u16_at(image, 56).ok_or(bad)? as usize,
            }
        } else {
            ElfHeader {
                class64,
                entry: u64::from(u32_at(image, 24).ok_or(bad)?),
                phoff: u32_at(image, 28).ok_or(bad)? as usize,
                phentsize: u16_at(image, 42).ok_or(bad)? as usize,
                phnum: u16_at(image, 44).ok_or(bad)? as usize,
            }
        })
    }

    /// Program header `i`, checked against the file.
    pub fn program(&self, image: &[u8], i: usize) -> Result<ProgramHeader, ImageError> {
        let bad = ImageError::BadElf;
        let ph = self
            .phoff
            .checked_add(i.checked_mul(self.phentsize).ok_or(bad)?)
            .ok_or(bad)?;
        let kind = u32_at(image, ph).ok_or(bad)?;
        let (offset, paddr, filesz, memsz) = if self.class64 {
            (
                u64_at(image, ph + 8).ok_or(bad)?,
                u64_at(image, ph + 24).ok_or(bad)?,
                u64_at(image, ph + 32).ok_or(bad)?,
                u64_at(image, ph + 40).ok_or(bad)?,
            )
        } else {
            (
                u64::from(u32_at(image, ph + 4).ok_or(bad)?),
                u64::from(u32_at(image, ph + 12).ok_or(bad)?),
                u64::from(u32_at(image, ph + 16).ok_or(bad)?),
                u64::from(u32_at(image, ph + 20).ok_or(bad)?),
            )
        };
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > image.len() as u64)
        {
            return Err(bad);
        }
        Ok(ProgramHeader {
            kind,
            offset,
            paddr,
            filesz,
            memsz,
        })
    }
}

/// An ELF image: its PT_LOAD segments go to their physical addresses.
/// `entry`: the entry point the header gives, else the ELF's (which must
/// then be a 32-bit address).
pub(crate) fn plan_from_elf(
    image: &[u8],
    flags: u32,
    entry: Option<u32>,
    format: Format,
) -> Result<LoadPlan, ImageError> {
    let bad = ImageError::BadElf;
    let elf = ElfHeader::read(image)?;
    let entry = match entry {
        Some(e) => e,
        None => u32::try_from(elf.entry).map_err(|_| bad)?,
    };
    let mut segments = Vec::new();
    for i in 0..elf.phnum {
        let ProgramHeader {
            kind,
            offset,
            paddr,
            filesz,
            memsz,
        } = elf.program(image, i)?;
        if kind != 1 {
            continue; // not PT_LOAD
        }
        if filesz > memsz
            || offset
                .checked_add(filesz)
                .is_none_or(|e| e > image.len() as u64)
        {
            return Err(bad);
        }
        if memsz == 0 {
            continue;
        }
        segments
            .push(Segment {
                file_offset: offset as usize,
                file_len: filesz as usize,
                gpa: paddr,
                mem_len: memsz,
            })
            .map_err(|_| ImageError::TooManySegments)?;
    }
    Ok(LoadPlan {
        segments,
        entry,
        flags,
        format,
    })
}

/// Why an information block could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InfoTooLarge;

/// A module placed in guest memory, as the information block lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoModule<'a> {
    /// Its first byte and the byte past its end.
    pub start: u32,
    pub end: u32,
    /// Its string (the file's name and its command line).
    pub string: &'a str,
}

/// Where modules of `sizes` bytes go: one after the other, each on a page
/// boundary, from the first page after `after` (the image's end); `None`
/// where they do not all fit below `ram_bytes` (and 4 GiB).
pub fn place_modules<const N: usize>(
    after: u64,
    sizes: &[u64],
    ram_bytes: u64,
) -> Option<heapless::Vec<(u32, u32), N>> {
    let mut at = after.max(0x10_0000).checked_next_multiple_of(0x1000)?;
    let mut out = heapless::Vec::new();
    for &len in sizes {
        let end = at.checked_add(len)?;
        if end > ram_bytes || end > u64::from(u32::MAX) {
            return None;
        }
        out.push((at as u32, end as u32)).ok()?;
        at = end.checked_next_multiple_of(0x1000)?;
    }
    Some(out)
}

/// The guest's memory map, as (start, bytes, type) with the e820 types
/// (1: RAM, 2: reserved): 0-639 KiB RAM, the last KiB below 640 KiB
/// reserved (where a PC's EBDA is), RAM from 1 MiB to the end.
pub fn memory_map(ram_bytes: u64) -> [(u64, u64, u32); 3] {
    [
        (0, 0x9_fc00, 1),
        (0x9_fc00, 0x400, 2),
        (0x10_0000, ram_bytes.saturating_sub(0x10_0000), 1),
    ]
}

/// Builds the multiboot information block for a guest with `ram_bytes` of
/// RAM from 0, to be placed at [`INFO_GPA`]: memory sizes, a memory map
/// (0-639 KiB and 1 MiB-end available), the command line, the modules (if
/// any) and the loader's name. Returns the bytes used in `out`.
pub fn build_info(
    ram_bytes: u64,
    cmdline: &str,
    loader: &str,
    modules: &[InfoModule<'_>],
    out: &mut [u8],
) -> Result<usize, InfoTooLarge> {
    const STRUCT_LEN: usize = 88;
    let map = memory_map(ram_bytes);
    let mmap_at = STRUCT_LEN;
    let mmap_len = map.len() * 24;
    let mods_at = mmap_at + mmap_len;
    let cmdline_at = mods_at + modules.len() * 16;
    let loader_at = cmdline_at + cmdline.len() + 1;
    let strings_at = loader_at + loader.len() + 1;
    let end = strings_at + modules.iter().map(|m| m.string.len() + 1).sum::<usize>();
    if end > out.len().min(INFO_SIZE) {
        return Err(InfoTooLarge);
    }
    out[..end].fill(0);
    let base = INFO_GPA as u32;
    let put = |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // flags: memory sizes (0), command line (2), modules (3), memory map
    // (6), loader name (9)
    let mods = if modules.is_empty() { 0 } else { 1 << 3 };
    put(out, 0, (1 << 0) | (1 << 2) | mods | (1 << 6) | (1 << 9));
    put(out, 20, modules.len() as u32);
    put(out, 24, base + mods_at as u32);
    let mut string_at = strings_at;
    for (i, m) in modules.iter().enumerate() {
        let at = mods_at + i * 16;
        put(out, at, m.start);
        put(out, at + 4, m.end);
        put(out, at + 8, base + string_at as u32);
        out[string_at..string_at + m.string.len()].copy_from_slice(m.string.as_bytes());
        string_at += m.string.len() + 1;
    }
    put(out, 4, 639);
    put(out, 8, (ram_bytes.saturating_sub(0x10_0000) / 1024) as u32);
    put(out, 16, base + cmdline_at as u32);
    put(out, 44, mmap_len as u32);
    put(out, 48, base + mmap_at as u32);
    put(out, 64, base + loader_at as u32);
    for (i, (start, len, kind)) in map.iter().enumerate() {
        let at = mmap_at + i * 24;
        put(out, at, 20);
        out[at + 4..at + 12].copy_from_slice(&start.to_le_bytes());
        out[at + 12..at + 20].copy_from_slice(&len.to_le_bytes());
        put(out, at + 20, *kind);
    }
    out[cmdline_at..cmdline_at + cmdline.len()].copy_from_slice(cmdline.as_bytes());
    out[loader_at..loader_at + loader.len()].copy_from_slice(loader.as_bytes());
    Ok(end)
}

#[cfg(test)]
mod tests;
