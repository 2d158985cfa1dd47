//! Assembling the boot image: one hybrid BIOS + UEFI ISO made by
//! `grub-mkrescue`. GRUB loads the kernel with `multiboot2` and each boot
//! module with `module2`, named by its module command line; the kernel finds
//! modules by those names.

use crate::progress::Step;
use anyhow::{Context, Result, bail, ensure};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What goes into an image.
#[derive(Clone, Debug)]
pub struct IsoSpec {
    pub kernel: PathBuf,
    /// Kernel command line (`key=value` options).
    pub cmdline: String,
    pub modules: Vec<Module>,
}

/// One boot module.
#[derive(Clone, Debug)]
pub struct Module {
    pub name: String,
    pub content: Content,
}

#[derive(Clone, Debug)]
pub enum Content {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// Writes the ISO to `out`. Every input file is checked first, so a missing
/// one is named rather than failing deep inside grub-mkrescue. The image is
/// made under a name of this process's own (its staging folder too) and
/// renamed to `out` when whole: two builds at once never mix their files,
/// and an emulator booting the `out` of an earlier build keeps reading
/// that one (it holds the file, which the rename does not change).
pub fn assemble(spec: &IsoSpec, out: &Path) -> Result<()> {
    ensure!(
        spec.kernel.is_file(),
        "the kernel ELF {} does not exist",
        spec.kernel.display()
    );
    for m in &spec.modules {
        if let Content::File(p) = &m.content {
            ensure!(
                p.is_file(),
                "boot module `{}`: {} does not exist",
                m.name,
                p.display()
            );
        }
        ensure!(
            !m.name.is_empty()
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "boot module name {:?} must be letters, digits, '-' or '_'",
            m.name
        );
    }
    ensure!(
        !spec.cmdline.contains(['\n', '"', ';']),
        "the kernel command line {:?} may not contain newlines, quotes or ';'",
        spec.cmdline
    );
    let step = Step::start(format!("assembling {}", out.display()));
    let (staging, made) = (private_name(out, "d"), private_name(out, "iso.part"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("clearing {}", staging.display()))?;
    }
    let modules_dir = staging.join("boot").join("modules");
    std::fs::create_dir_all(&modules_dir)?;
    std::fs::create_dir_all(staging.join("boot").join("grub"))?;
    std::fs::copy(&spec.kernel, staging.join("boot").join("kernel.elf"))
        .with_context(|| format!("copying {}", spec.kernel.display()))?;
    for m in &spec.modules {
        let dest = modules_dir.join(&m.name);
        match &m.content {
            Content::File(p) => {
                std::fs::copy(p, &dest).with_context(|| format!("copying {}", p.display()))?;
            }
            Content::Bytes(b) => std::fs::write(&dest, b)?,
        }
    }
    std::fs::write(
        staging.join("boot").join("grub").join("grub.cfg"),
        grub_cfg(spec),
    )?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // No fonts, locales or themes: the image talks over a serial line.
    let result = Command::new("grub-mkrescue")
        .args(["--fonts=", "--locales=", "--themes="])
        .arg("-o")
        .arg(&made)
        .arg(&staging)
        .output()
        .context("running grub-mkrescue (packages grub-common, grub-pc-bin, grub-efi-amd64-bin, xorriso, mtools)");
    let _ = std::fs::remove_dir_all(&staging);
    let result = result?;
    if !result.status.success() {
        step.failed();
        let _ = std::fs::remove_file(&made);
        bail!(
            "grub-mkrescue failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    std::fs::rename(&made, out)
        .with_context(|| format!("moving {} to {}", made.display(), out.display()))?;
    let size = std::fs::metadata(out)?.len();
    step.done(&format!("{} KiB", size / 1024));
    Ok(())
}

/// Beside `out`, a name with this process's id and a count of its own (as
/// `parallax.1234-5.d`): one no other build uses.
fn private_name(out: &Path, extension: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let stem = out
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    out.with_file_name(format!(
        "{stem}.{}-{}.{extension}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The GRUB configuration: serial console, no menu, one entry.
pub fn grub_cfg(spec: &IsoSpec) -> String {
    let mut cfg = String::from(
        "set timeout=0\nset timeout_style=hidden\ninsmod serial\nserial --unit=0 --speed=115200\n\
         terminal_output serial console\n\nmenuentry \"Parallax\" {\n",
    );
    writeln!(cfg, "    multiboot2 /boot/kernel.elf {}", spec.cmdline).unwrap();
    for m in &spec.modules {
        writeln!(cfg, "    module2 /boot/modules/{0} {0}", m.name).unwrap();
    }
    cfg.push_str("    boot\n}\n");
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_names_every_module_by_its_command_line() {
        let spec = IsoSpec {
            kernel: "k".into(),
            cmdline: "selftest=panic".into(),
            modules: vec![
                Module {
                    name: "manifest".into(),
                    content: Content::Bytes(vec![]),
                },
                Module {
                    name: "hello".into(),
                    content: Content::Bytes(vec![]),
                },
            ],
        };
        let cfg = grub_cfg(&spec);
        assert!(cfg.contains("multiboot2 /boot/kernel.elf selftest=panic\n"));
        assert!(cfg.contains("module2 /boot/modules/manifest manifest\n"));
        assert!(cfg.contains("module2 /boot/modules/hello hello\n"));
        assert!(cfg.contains("serial --unit=0 --speed=115200"));
    }

    #[test]
    fn missing_inputs_are_named() {
        let spec = IsoSpec {
            kernel: "/nonexistent/kernel".into(),
            cmdline: String::new(),
            modules: vec![],
        };
        let e = assemble(&spec, Path::new("/tmp/x.iso"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the kernel ELF /nonexistent/kernel does not exist"),
            "{e}"
        );

        let k = std::env::current_exe().unwrap();
        let spec = IsoSpec {
            kernel: k,
            cmdline: String::new(),
            modules: vec![Module {
                name: "guest".into(),
                content: Content::File("/nonexistent/g.elf".into()),
            }],
        };
        let e = assemble(&spec, Path::new("/tmp/x.iso"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("boot module `guest`: /nonexistent/g.elf does not exist"),
            "{e}"
        );
    }
}
