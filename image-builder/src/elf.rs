//! What the image builder needs to know about ELF files.

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

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
