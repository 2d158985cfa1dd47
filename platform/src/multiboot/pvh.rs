//! PVH: the x86/HVM direct boot ABI (Xen's, which Linux and QEMU's `-kernel`
//! follow). An ELF kernel names its 32-bit entry point in a note (owner
//! "Xen", type `XEN_ELFNOTE_PHYS32_ENTRY`); the loader loads its segments
//! at their physical addresses and enters there in 32-bit protected mode,
//! paging off, with EBX = the physical address of an `hvm_start_info`:
//! the command line, the modules (Linux takes the first as its initrd), the
//! ACPI RSDP and the memory map (e820 types).

use super::{ElfHeader, INFO_SIZE, ImageError, InfoModule, InfoTooLarge, memory_map, u32_at};

/// `XEN_ELFNOTE_PHYS32_ENTRY`.
pub const NOTE_PHYS32_ENTRY: u32 = 18;
/// `hvm_start_info.magic`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// Bytes of `hvm_start_info` (version 1, with the memory map).
pub const START_INFO_LEN: usize = 56;
const MODLIST_ENTRY: usize = 32;
const MEMMAP_ENTRY: usize = 24;
const PT_NOTE: u32 = 4;

/// The PVH entry point of an ELF image: `None` when it is no ELF or has no
/// such note, an error when its headers or the note are malformed.
pub fn entry(image: &[u8]) -> Result<Option<u32>, ImageError> {
    let elf = match ElfHeader::read(image) {
        Ok(e) => e,
        Err(ImageError::NotElf) => return Ok(None),
        Err(e) => return Err(e),
    };
    for i in 0..elf.phnum {
        let ph = elf.program(image, i)?;
        if ph.kind != PT_NOTE {
            continue;
        }
        let (start, len) = (ph.offset as usize, ph.filesz as usize);
        let notes = &image[start..start + len];
        let mut at = 0usize;
        // Each note: name size, descriptor size, type, the name and the
        // descriptor, each padded to 4 bytes.
        while at + 12 <= notes.len() {
            let bad = ImageError::BadElf;
            let namesz = u32_at(notes, at).ok_or(bad)? as usize;
            let descsz = u32_at(notes, at + 4).ok_or(bad)? as usize;
            let kind = u32_at(notes, at + 8).ok_or(bad)?;
            let name_at = at + 12;
            let desc_at = name_at
                .checked_add(namesz.checked_next_multiple_of(4).ok_or(bad)?)
                .ok_or(bad)?;
            let next = desc_at
                .checked_add(descsz.checked_next_multiple_of(4).ok_or(bad)?)
                .ok_or(bad)?;
            if name_at + namesz > notes.len()
                || desc_at.checked_add(descsz).is_none_or(|e| e > notes.len())
            {
                return Err(bad);
            }
            let name = &notes[name_at..name_at + namesz];
            if name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" && kind == NOTE_PHYS32_ENTRY {
                let desc = &notes[desc_at..desc_at + descsz];
                return match descsz {
                    4 => Ok(u32_at(desc, 0)),
                    8 => {
                        let v = u64::from_le_bytes(desc.try_into().map_err(|_| bad)?);
                        u32::try_from(v)
                            .map(Some)
                            .map_err(|_| ImageError::PvhBadNote)
                    }
                    _ => Err(ImageError::PvhBadNote),
                };
            }
            at = next;
        }
    }
    Ok(None)
}

/// Builds the `hvm_start_info` for a guest with `ram_bytes` of RAM from 0,
/// to be placed at `base` (guest-physical), with what it points to after
/// it: the module list (each module's command line where it has one), the
/// memory map, the command line. `rsdp`: the ACPI root pointer's address,
/// 0 for none. Returns the bytes used in `out`.
pub fn build_start_info(
    base: u64,
    ram_bytes: u64,
    cmdline: &str,
    modules: &[InfoModule<'_>],
    rsdp: u64,
    out: &mut [u8],
) -> Result<usize, InfoTooLarge> {
    let map = memory_map(ram_bytes);
    let modlist_at = START_INFO_LEN;
    let memmap_at = modlist_at + modules.len() * MODLIST_ENTRY;
    let cmdline_at = memmap_at + map.len() * MEMMAP_ENTRY;
    let strings_at = cmdline_at + cmdline.len() + 1;
    let end = strings_at
        + modules
            .iter()
            .map(|m| {
                if m.string.is_empty() {
                    0
                } else {
                    m.string.len() + 1
                }
            })
            .sum::<usize>();
    if end > out.len().min(INFO_SIZE) {
        return Err(InfoTooLarge);
    }
    let out = &mut out[..end];
    out.fill(0);
    let put32 =
        |out: &mut [u8], at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |out: &mut [u8], at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put32(out, 0, START_MAGIC);
    put32(out, 4, 1); // version 1: with the memory map
    put32(out, 12, modules.len() as u32);
    if !modules.is_empty() {
        put64(out, 16, base + modlist_at as u64);
    }
    put64(out, 24, base + cmdline_at as u64);
    put64(out, 32, rsdp);
    put64(out, 40, base + memmap_at as u64);
    put32(out, 48, map.len() as u32);
    let mut string_at = strings_at;
    for (i, m) in modules.iter().enumerate() {
        let at = modlist_at + i * MODLIST_ENTRY;
        put64(out, at, u64::from(m.start));
        put64(out, at + 8, u64::from(m.end - m.start));
        if !m.string.is_empty() {
            put64(out, at + 16, base + string_at as u64);
            out[string_at..string_at + m.string.len()].copy_from_slice(m.string.as_bytes());
            string_at += m.string.len() + 1;
        }
    }
    for (i, (start, len, kind)) in map.iter().enumerate() {
        let at = memmap_at + i * MEMMAP_ENTRY;
        put64(out, at, *start);
        put64(out, at + 8, *len);
        put32(out, at + 16, *kind);
    }
    out[cmdline_at..cmdline_at + cmdline.len()].copy_from_slice(cmdline.as_bytes());
    Ok(end)
}
