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
