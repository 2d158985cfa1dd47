//! Where things are: the repository, the build directories, the outputs.

use std::path::PathBuf;

/// The repository root (the workspace this tool belongs to).
pub fn repo() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .expect("image-builder lives one level below the workspace root")
        .to_owned()
}

/// Cargo target directory for everything built for bare metal. Separate from
/// `target/` so that a build started from a running `cargo test` does not
/// wait on the lock of the test's own build.
pub fn target_dir() -> PathBuf {
    repo().join("target").join("hv")
}

/// Where bare-metal release binaries land.
pub fn bare_metal_bins() -> PathBuf {
    target_dir().join("x86_64-unknown-none").join("release")
}

/// The default system manifest.
pub fn default_manifest() -> PathBuf {
    repo().join("system.toml")
}

/// Scratch space for images, captures and emulator files.
pub fn work_dir() -> PathBuf {
    target_dir().join("work")
}

/// Where the crate of test guest `name` lives.
pub fn guest_dir(name: &str) -> PathBuf {
    repo().join("tests").join("guests").join(name)
}

/// Where the crate of service crate `name` lives.
pub fn service_dir(name: &str) -> PathBuf {
    repo().join("services").join(name)
}

/// ELF files the log decoder searches by build id besides the current
/// build's: every ELF `cargo hv swap` sent into a running system.
pub fn elf_store() -> PathBuf {
    work_dir().join("elfs")
}
