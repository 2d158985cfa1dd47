//! The Debian packages the image builder and the emulators need: checked on
//! every build, run and test; installed when running as root; otherwise the
//! exact apt-get line is printed and the command fails.

use anyhow::{Result, bail};
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

/// Makes sure every package is installed.
pub fn ensure() -> Result<()> {
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
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
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
