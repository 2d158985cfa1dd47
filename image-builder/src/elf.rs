//! What the image builder needs to know about ELF files.

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};
use std::io::Read;
use std::path::Path;

/// The first bytes of every ELF file.
pub const MAGIC: [u8; 4] = *b"\x7fELF";

/// What is wrong with `bytes` as the start of an x86-64 ELF file (64-bit,
/// little endian, machine x86-64), as the end of a sentence "PATH is ...";
/// `None` if nothing.
pub fn header_problem(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return Some("empty, not an ELF file".into());
    }
    if bytes.len() < 4 || bytes[..4] != MAGIC {
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Some(format!(
            "not an ELF file (it starts with {} instead of 7f 45 4c 46)",
            head.join(" ")
        ));
    }
    if bytes.len() < 20 {
        return Some(format!("an ELF file cut short ({} bytes)", bytes.len()));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Some(format!(
            "an ELF file that is not 64-bit little-endian (class {}, data {})",
            bytes[4], bytes[5]
        ));
    }
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    if machine != 62 {
        return Some(format!(
            "an ELF file for machine {machine}, not x86-64 (62)"
        ));
    }
    None
}

/// Checks that the file at `path` exists and starts like an x86-64 ELF file
/// (only its header is read). Errors name the file.
pub fn check_file(path: &Path) -> Result<()> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist", path.display())
        }
        Err(e) => bail!("cannot open {}: {e}", path.display()),
    };
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        bail!("{} is a directory, not an ELF file", path.display());
    }
    let mut head = Vec::with_capacity(64);
    file.by_ref()
        .take(64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    match header_problem(&head) {
        Some(why) => bail!("{} is {why}", path.display()),
        None => Ok(()),
    }
}

/// The GNU build id of an ELF file.
pub fn build_id(bytes: &[u8]) -> Result<Vec<u8>> {
    let file = object::File::parse(bytes).context("not an ELF file")?;
    match file.build_id().context("reading the build-id note")? {
        Some(id) => Ok(id.to_vec()),
        None => bail!("the file has no GNU build id (link with --build-id)"),
    }
}

/// Size of the executable code (`.text`) of an ELF file.
pub fn text_size(bytes: &[u8]) -> Result<u64> {
    let file = object::File::parse(bytes).context("not an ELF file")?;
    Ok(file.section_by_name(".text").map_or(0, |s| s.size()))
}

/// The sections a stripped service ELF keeps (besides the section-name table).
const KEPT_SECTIONS: [&str; 2] = [".note.gnu.build-id", ".parallax.interfaces"];

/// `elf` reduced to what loading and swapping a service needs: the loadable
/// segments, the build id and the interface declarations. Symbols, the
/// defmt table (the host keeps the full file to decode logs) and the other
/// sections go. A swap sends this over a slow serial line, so it matters.
pub fn strip_service(elf: &[u8]) -> Result<Vec<u8>> {
    use object::LittleEndian as LE;
    use object::elf::{FileHeader64, PT_LOAD, SHT_NOTE, SHT_PROGBITS, SHT_STRTAB};
    use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
    if let Some(why) = header_problem(elf) {
        bail!("the file is {why}");
    }
    let header = FileHeader64::<LE>::parse(elf).context("not an ELF file")?;
    let e = header.endian().context("not a little-endian ELF file")?;
    let segments = header
        .program_headers(e, elf)
        .context("reading the program headers")?;
    let sections = header
        .sections(e, elf)
        .context("reading the section headers")?;
    let put16 =
        |out: &mut Vec<u8>, at: usize, v: u16| out[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |out: &mut Vec<u8>, at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |out: &mut Vec<u8>, at: usize, v: u64| out[at..at + 8].copy_from_slice(&v.to_le_bytes());

    let loads: Vec<_> = segments.iter().filter(|p| p.p_type(e) == PT_LOAD).collect();
    let mut out = elf[..64].to_vec();
    out.resize(64 + 56 * loads.len(), 0);
    // Each segment's bytes, at an offset congruent to its address mod 16.
    for (i, p) in loads.iter().enumerate() {
        let data = p
            .data(e, elf)
            .ok()
            .context("a segment lies outside the file")?;
        let vaddr = p.p_vaddr(e);
        while (out.len() as u64) % 16 != vaddr % 16 {
            out.push(0);
        }
        let offset = out.len() as u64;
        out.extend_from_slice(data);
        let at = 64 + 56 * i;
        put32(&mut out, at, PT_LOAD);
        put32(&mut out, at + 4, p.p_flags(e));
        put64(&mut out, at + 8, offset);
        put64(&mut out, at + 16, vaddr);
        put64(&mut out, at + 24, p.p_paddr(e));
        put64(&mut out, at + 32, p.p_filesz(e));
        put64(&mut out, at + 40, p.p_memsz(e));
        put64(&mut out, at + 48, 16);
    }
    // The kept sections, then their names, then the section headers.
    let mut names = vec![0u8];
    let mut kept = Vec::new();
    for name in KEPT_SECTIONS {
        if let Some((_, s)) = sections
            .iter()
            .enumerate()
            .find(|(_, s)| sections.section_name(e, s).ok() == Some(name.as_bytes()))
        {
            let data = s
                .data(e, elf)
                .ok()
                .context("a section lies outside the file")?;
            while !out.len().is_multiple_of(8) {
                out.push(0);
            }
            kept.push((
                names.len() as u32,
                s.sh_type(e),
                s.sh_flags(e),
                s.sh_addr(e),
                out.len() as u64,
                data.len() as u64,
            ));
            names.extend_from_slice(name.as_bytes());
            names.push(0);
            out.extend_from_slice(data);
        }
    }
    let shstrtab_name = names.len() as u32;
    names.extend_from_slice(b".shstrtab\0");
    let names_at = out.len() as u64;
    out.extend_from_slice(&names);
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
    let shoff = out.len();
    let count = kept.len() + 2;
    out.resize(shoff + 64 * count, 0);
    let mut write_section =
        |i: usize, name: u32, kind: u32, flags: u64, addr: u64, offset: u64, size: u64| {
            let at = shoff + 64 * i;
            put32(&mut out, at, name);
            put32(&mut out, at + 4, kind);
            put64(&mut out, at + 8, flags);
            put64(&mut out, at + 16, addr);
            put64(&mut out, at + 24, offset);
            put64(&mut out, at + 32, size);
            put64(&mut out, at + 48, 1);
        };
    for (i, &(name, kind, flags, addr, offset, size)) in kept.iter().enumerate() {
        let kind = if kind == SHT_NOTE {
            SHT_NOTE
        } else {
            SHT_PROGBITS
        };
        write_section(i + 1, name, kind, flags, addr, offset, size);
    }
    write_section(
        count - 1,
        shstrtab_name,
        SHT_STRTAB,
        0,
        0,
        names_at,
        names.len() as u64,
    );
    // The file header: program headers right after it, the new section table.
    put64(&mut out, 32, 64);
    put64(&mut out, 40, shoff as u64);
    put16(&mut out, 54, 56);
    put16(&mut out, 56, loads.len() as u16);
    put16(&mut out, 58, 64);
    put16(&mut out, 60, count as u16);
    put16(&mut out, 62, (count - 1) as u16);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stripped_service_keeps_its_segments_build_id_and_interfaces() {
        let path = crate::paths::bare_metal_bins().join("service-init");
        let Ok(full) = std::fs::read(&path) else {
            eprintln!("SKIPPED: {} is not built", path.display());
            return;
        };
        let small = strip_service(&full).unwrap();
        assert!(
            small.len() < full.len(),
            "{} -> {}",
            full.len(),
            small.len()
        );
        assert_eq!(build_id(&small).unwrap(), build_id(&full).unwrap());
        let (a, b) = (
            platform::elf::Elf::parse(&full).unwrap(),
            platform::elf::Elf::parse(&small).unwrap(),
        );
        let segs = |x: &platform::elf::Elf<'_>| -> Vec<(u64, u64, Vec<u8>)> {
            x.segments()
                .map(|s| s.unwrap())
                .map(|s| (s.vaddr, s.mem_size, x.segment_bytes(&s).to_vec()))
                .collect()
        };
        assert_eq!(segs(&a), segs(&b));
        assert_eq!(a.entry, b.entry);
        assert_eq!(
            a.section(".parallax.interfaces").unwrap(),
            b.section(".parallax.interfaces").unwrap()
        );
        assert!(b.section(".defmt").unwrap().is_none());
    }

    #[test]
    fn stripping_garbage_is_an_error() {
        assert!(strip_service(b"not an elf at all").is_err());
        let mut cut = crate::elf::MAGIC.to_vec();
        cut.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 62, 0]);
        assert!(strip_service(&cut).is_err());
    }
}
