//! What the image builder and the emulators need: the Debian packages,
//! checked on every build, run and test and installed when running as root
//! (otherwise the exact apt-get line is printed and the command fails); and
//! the bare-metal Rust target for the pinned toolchain, added with rustup when
//! a toolchain was installed without it (otherwise the exact rustup line).

use crate::paths;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every package `cargo hv` uses, and what for.
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "QEMU: boot, ACPI, VT-d"),
    ("ovmf", "UEFI firmware for QEMU"),
    ("bochs", "Bochs: VMX, EPT, VMFUNC, #VE, PML"),
    ("bochsbios", "Bochs BIOS"),
    ("vgabios", "Bochs VGA BIOS"),
    ("grub-pc-bin", "GRUB for BIOS"),
    ("grub-efi-amd64-bin", "GRUB for UEFI"),
    ("grub-common", "grub-mkrescue"),
    ("xorriso", "ISO images"),
    ("mtools", "the ISO's EFI partition"),
    (
        "binutils",
        "as and ld: the boot tests' kernel written in assembly",
    ),
    (
        "xz-utils",
        "the Linux guest: its vmlinux out of Debian's bzImage",
    ),
    ("gcc", "the Linux guest: its /init"),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// What to tell a user who cannot install packages: which are missing and
/// the exact command.
fn not_root_message(missing: &[&str]) -> String {
    format!(
        "missing Debian packages: {}\ninstall them with:\n    sudo apt-get update && sudo apt-get install -y {}",
        missing.join(", "),
        missing.join(" ")
    )
}

/// The target everything bare-metal is built for.
pub const TARGET: &str = "x86_64-unknown-none";

/// The sysroot of the toolchain cargo uses in the repository (the pinned one,
/// through rust-toolchain.toml).
fn sysroot() -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .current_dir(paths::repo())
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Whether the toolchain at `sysroot` has the standard library of `target`.
fn has_target(sysroot: &Path, target: &str) -> bool {
    sysroot
        .join("lib")
        .join("rustlib")
        .join(target)
        .join("lib")
        .is_dir()
}

/// What to tell a user whose toolchain lacks the target and where rustup
/// could not add it.
fn target_message(sysroot: &Path, why: &str) -> String {
    format!(
        "the Rust toolchain at {} has no {TARGET} target ({why}); add it with:\n    cd {} && rustup target add {TARGET}",
        sysroot.display(),
        paths::repo().display()
    )
}

/// Makes sure the pinned toolchain can build for [`TARGET`]. A toolchain
/// installed before the project (or linked by hand) may lack it, and then
/// `rustup toolchain install` adds nothing and cargo fails with "can't find
/// crate for core".
pub fn ensure_target() -> Result<()> {
    let Some(sysroot) = sysroot() else {
        bail!(
            "cannot run `rustc --print sysroot` in {}",
            paths::repo().display()
        );
    };
    if has_target(&sysroot, TARGET) {
        return Ok(());
    }
    eprintln!(
        "adding the Rust target {TARGET} to the toolchain at {}",
        sysroot.display()
    );
    let status = Command::new("rustup")
        .current_dir(paths::repo())
        .args(["target", "add", TARGET])
        .stdout(std::io::stderr())
        .status();
    match status {
        Ok(s) if s.success() && has_target(&sysroot, TARGET) => Ok(()),
        Ok(s) if s.success() => bail!("{}", target_message(&sysroot, "rustup added it elsewhere")),
        Ok(s) => bail!(
            "{}",
            target_message(&sysroot, &format!("rustup failed: {s}"))
        ),
        Err(e) => bail!(
            "{}",
            target_message(&sysroot, &format!("cannot run rustup: {e}"))
        ),
    }
}

/// Makes sure every package is installed and the toolchain has its target.
pub fn ensure() -> Result<()> {
    ensure_target()?;
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("{}", not_root_message(&missing));
    }
    eprintln!("installing missing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        // Its output goes to stderr: stdout is the command's own (`cargo hv
        // bench --json` prints its JSON there, and a first run installs).
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::io::stderr())
            .status()?;
        if !status.success() {
            bail!("`apt-get {}` failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    apt(&args)?;
    let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!(
            "apt-get ran but these packages are still missing: {}",
            still.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_gives_the_exact_apt_get_line() {
        let m = not_root_message(&["bochs", "xorriso"]);
        assert!(
            m.starts_with("missing Debian packages: bochs, xorriso\n"),
            "{m}"
        );
        assert!(
            m.ends_with("sudo apt-get update && sudo apt-get install -y bochs xorriso"),
            "{m}"
        );
    }

    #[test]
    fn a_toolchain_without_the_target_is_named_with_the_rustup_line() {
        let dir = std::env::temp_dir().join(format!("hv-sysroot-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lib/rustlib/x86_64-unknown-linux-gnu/lib")).unwrap();
        assert!(!has_target(&dir, TARGET));
        assert!(has_target(&dir, "x86_64-unknown-linux-gnu"));
        let m = target_message(&dir, "rustup failed");
        assert!(
            m.contains("has no x86_64-unknown-none target (rustup failed)"),
            "{m}"
        );
        assert!(m.ends_with("rustup target add x86_64-unknown-none"), "{m}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_pinned_toolchain_has_the_target_after_ensure() {
        ensure_target().unwrap();
        assert!(has_target(&sysroot().unwrap(), TARGET));
    }

    #[test]
    fn every_package_the_emulators_and_grub_need_is_listed() {
        let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
        for p in [
            "qemu-system-x86",
            "ovmf",
            "bochs",
            "bochsbios",
            "vgabios",
            "grub-pc-bin",
            "grub-efi-amd64-bin",
            "grub-common",
            "xorriso",
            "mtools",
        ] {
            assert!(names.contains(&p), "{p}");
        }
    }
}
