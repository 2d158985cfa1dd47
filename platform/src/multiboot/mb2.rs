//! Multiboot2: the header (tags in the first 32 KiB of the image) and the
//! information the loader gives the kernel (tags too), as the multiboot2
//! specification (version 2.0) describes them.

use super::{
    Addresses, Format, INFO_SIZE, ImageError, InfoModule, InfoTooLarge, LoadPlan, memory_map,
    plan_from_addresses, plan_from_elf, u32_at,
};

/// The header magic.
pub const HEADER_MAGIC: u32 = 0xe852_50d6;
/// What a multiboot2 loader leaves in EAX.
pub const BOOT_MAGIC: u32 = 0x36d7_6289;
/// The header must lie in the first 32 KiB, 8-byte aligned.
const SEARCH: usize = 32 * 1024;

/// Header tag types.
mod tag {
    pub const END: u16 = 0;
    pub const INFORMATION_REQUEST: u16 = 1;
    pub const ADDRESS: u16 = 2;
    pub const ENTRY: u16 = 3;
    pub const CONSOLE_FLAGS: u16 = 4;
    pub const FRAMEBUFFER: u16 = 5;
    pub const MODULE_ALIGN: u16 = 6;
    pub const EFI_BOOT_SERVICES: u16 = 7;
    pub const EFI_I386_ENTRY: u16 = 8;
    pub const EFI_AMD64_ENTRY: u16 = 9;
    pub const RELOCATABLE: u16 = 10;
}

/// Information tag types this loader gives.
pub mod info {
    pub const END: u32 = 0;
    pub const CMDLINE: u32 = 1;
    pub const LOADER_NAME: u32 = 2;
    pub const MODULE: u32 = 3;
    pub const BASIC_MEMINFO: u32 = 4;
    pub const MMAP: u32 = 6;
    pub const ACPI_OLD: u32 = 14;
    pub const ACPI_NEW: u32 = 15;
    /// The information a kernel may require (information request tag).
    pub const GIVEN: [u32; 7] = [
        CMDLINE,
        LOADER_NAME,
        MODULE,
        BASIC_MEMINFO,
        MMAP,
        ACPI_OLD,
        ACPI_NEW,
    ];
}

/// The offset of a multiboot2 header in `image` (its magic and checksum
/// right), if it has one.
pub fn find(image: &[u8]) -> Option<usize> {
    (0..image.len().min(SEARCH).saturating_sub(15))
        .step_by(8)
        .find(|&i| {
            u32_at(image, i) == Some(HEADER_MAGIC)
                && (0..4)
                    .map(|n| u32_at(image, i + 4 * n).unwrap_or(0))
                    .fold(0u32, u32::wrapping_add)
                    == 0
        })
}

/// Whether `image` has a multiboot2 magic (checksum right or not) where a
/// header may be.
pub fn has_magic(image: &[u8]) -> bool {
    (0..image.len().min(SEARCH).saturating_sub(3))
        .step_by(8)
        .any(|i| u32_at(image, i) == Some(HEADER_MAGIC))
}

/// The load plan of the header at `at` (found by [`find`]).
pub fn plan(image: &[u8], at: usize) -> Result<LoadPlan, ImageError> {
    let arch = u32_at(image, at + 4).ok_or(ImageError::Mb2BadTags)?;
    if arch != 0 {
        return Err(ImageError::Mb2Architecture(arch));
    }
    let length = u32_at(image, at + 8).ok_or(ImageError::Mb2BadTags)? as usize;
    let end = at
        .checked_add(length)
        .filter(|&e| e <= image.len() && length >= 16)
        .ok_or(ImageError::Mb2BadTags)?;
    let mut addresses = None;
    let mut entry = None;
    let mut t = at + 16;
    loop {
        let kind = super::u16_at(image, t).ok_or(ImageError::Mb2BadTags)?;
        let flags = super::u16_at(image, t + 2).ok_or(ImageError::Mb2BadTags)?;
        let size = u32_at(image, t + 4).ok_or(ImageError::Mb2BadTags)? as usize;
        let tag_end = t.checked_add(size).ok_or(ImageError::Mb2BadTags)?;
        if size < 8 || tag_end > end {
            return Err(ImageError::Mb2BadTags);
        }
        let optional = flags & 1 != 0;
        let field = |n: usize| {
            if 8 + 4 * (n + 1) > size {
                return Err(ImageError::Mb2BadTags);
            }
            u32_at(image, t + 8 + 4 * n).ok_or(ImageError::Mb2BadTags)
        };
        match kind {
            tag::END => break,
            tag::INFORMATION_REQUEST => {
                for n in 0..(size - 8) / 4 {
                    let asked = field(n)?;
                    if !optional && !info::GIVEN.contains(&asked) {
                        return Err(ImageError::Mb2Unsupported(kind));
                    }
                }
            }
            tag::ADDRESS => {
                addresses = Some(Addresses {
                    header_addr: field(0)?,
                    load_addr: field(1)?,
                    load_end: field(2)?,
                    bss_end: field(3)?,
                });
            }
            tag::ENTRY => entry = Some(field(0)?),
            // A console the kernel requires (bit 0): this loader has only
            // the serial port, which the kernel drives itself.
            tag::CONSOLE_FLAGS if field(0)? & 1 != 0 => {
                return Err(ImageError::Mb2Unsupported(kind));
            }
            tag::CONSOLE_FLAGS | tag::MODULE_ALIGN | tag::RELOCATABLE => {}
            // Entry points for EFI loaders: this one is not.
            tag::EFI_I386_ENTRY | tag::EFI_AMD64_ENTRY => {}
            tag::FRAMEBUFFER | tag::EFI_BOOT_SERVICES if optional => {}
            _ if optional => {}
            _ => return Err(ImageError::Mb2Unsupported(kind)),
        }
        // Tags are 8-byte aligned.
        t = tag_end
            .checked_next_multiple_of(8)
            .ok_or(ImageError::Mb2BadTags)?;
    }
    match addresses {
        Some(a) => plan_from_addresses(
            image,
            at,
            &a,
            entry.ok_or(ImageError::BadAddresses)?,
            0,
            Format::Multiboot2,
        ),
        None => plan_from_elf(image, 0, entry, Format::Multiboot2),
    }
}

/// Builds the multiboot2 information for a guest with `ram_bytes` of RAM
/// from 0, to be placed at [`super::INFO_GPA`]: its command line, the loader's
/// name, each module (start, end, string), the basic memory sizes, the
/// memory map and, given the 36 bytes of an ACPI 2.0 RSDP, its copies
/// (tags 14 and 15). Returns the bytes used in `out`.
pub fn build_info(
    ram_bytes: u64,
    cmdline: &str,
    loader: &str,
    modules: &[InfoModule<'_>],
    rsdp: Option<&[u8]>,
    out: &mut [u8],
) -> Result<usize, InfoTooLarge> {
    let cap = out.len().min(INFO_SIZE);
    let out = &mut out[..cap];
    out.fill(0);
    let mut at = 8;
    // One tag: its type, then `body` bytes written by `fill` after the
    // 8-byte head; the next tag starts 8-byte aligned.
    let mut tag = |out: &mut [u8],
                   kind: u32,
                   body: usize,
                   fill: &dyn Fn(&mut [u8])|
     -> Result<(), InfoTooLarge> {
        let size = 8 + body;
        let next = (at + size).next_multiple_of(8);
        if next > out.len() {
            return Err(InfoTooLarge);
        }
        out[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&(size as u32).to_le_bytes());
        fill(&mut out[at + 8..at + size]);
        at = next;
        Ok(())
    };
    tag(out, info::CMDLINE, cmdline.len() + 1, &|b| {
        b[..cmdline.len()].copy_from_slice(cmdline.as_bytes())
    })?;
    tag(out, info::LOADER_NAME, loader.len() + 1, &|b| {
        b[..loader.len()].copy_from_slice(loader.as_bytes())
    })?;
    for m in modules {
        tag(out, info::MODULE, 8 + m.string.len() + 1, &|b| {
            b[0..4].copy_from_slice(&m.start.to_le_bytes());
            b[4..8].copy_from_slice(&m.end.to_le_bytes());
            b[8..8 + m.string.len()].copy_from_slice(m.string.as_bytes());
        })?;
    }
    tag(out, info::BASIC_MEMINFO, 8, &|b| {
        b[0..4].copy_from_slice(&639u32.to_le_bytes());
        let upper = (ram_bytes.saturating_sub(0x10_0000) / 1024) as u32;
        b[4..8].copy_from_slice(&upper.to_le_bytes());
    })?;
    let map = memory_map(ram_bytes);
    tag(out, info::MMAP, 8 + 24 * map.len(), &|b| {
        b[0..4].copy_from_slice(&24u32.to_le_bytes()); // entry size
        b[4..8].copy_from_slice(&0u32.to_le_bytes()); // entry version
        for (i, (start, len, kind)) in map.iter().enumerate() {
            let e = &mut b[8 + 24 * i..8 + 24 * (i + 1)];
            e[0..8].copy_from_slice(&start.to_le_bytes());
            e[8..16].copy_from_slice(&len.to_le_bytes());
            e[16..20].copy_from_slice(&kind.to_le_bytes());
        }
    })?;
    if let Some(r) = rsdp {
        let old = &r[..r.len().min(20)];
        tag(out, info::ACPI_OLD, old.len(), &|b| b.copy_from_slice(old))?;
        tag(out, info::ACPI_NEW, r.len(), &|b| b.copy_from_slice(r))?;
    }
    tag(out, info::END, 0, &|_| {})?;
    let total = at;
    out[0..4].copy_from_slice(&(total as u32).to_le_bytes());
    Ok(total)
}
