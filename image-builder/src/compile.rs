//! Compiling the bare-metal parts (kernel, later services and guests) for
//! `x86_64-unknown-none` with cargo.

use crate::paths;
use crate::progress::Step;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// How to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// defmt levels compiled in (`DEFMT_LOG`): error, warn, info, debug, trace.
    pub log_level: String,
    /// Keep line tables in the ELF files (`cargo hv profile` attributes
    /// instructions to source lines). The code is the same; the build goes
    /// to a target directory of its own so that the regular one stays.
    pub line_tables: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            log_level: "info".to_owned(),
            line_tables: false,
        }
    }
}

impl BuildOptions {
    /// The cargo target directory of this kind of build.
    pub fn target_dir(&self) -> PathBuf {
        if self.line_tables {
            paths::target_dir().join("lines")
        } else {
            paths::target_dir()
        }
    }

    /// Where its bare-metal release binaries land.
    pub fn bins(&self) -> PathBuf {
        self.target_dir()
            .join("x86_64-unknown-none")
            .join("release")
    }
}

/// The cargo that runs this tool (so the pinned toolchain is used).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds bare-metal packages in release mode and returns the path of each
/// package's binary (named like the package).
pub fn bare_metal(packages: &[&str], opts: &BuildOptions) -> Result<Vec<PathBuf>> {
    let levels = ["error", "warn", "info", "debug", "trace"];
    if !levels.contains(&opts.log_level.as_str()) {
        bail!(
            "log level {:?} is not one of {}",
            opts.log_level,
            levels.join(", ")
        );
    }
    let step = Step::start(format!(
        "compiling {} for x86_64-unknown-none",
        packages.join(", ")
    ));
    let mut cmd = cargo();
    cmd.current_dir(paths::repo())
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(opts.target_dir())
        .env("DEFMT_LOG", &opts.log_level);
    if opts.line_tables {
        cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    let out = cmd.output().context("running cargo")?;
    if !out.status.success() {
        step.failed();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("cargo build failed for {}", packages.join(", "));
    }
    step.done("");
    packages
        .iter()
        .map(|p| {
            let path = opts.bins().join(p);
            if path.is_file() {
                Ok(path)
            } else {
                bail!("cargo built {p} but {} is missing", path.display())
            }
        })
        .collect()
}

/// Builds the kernel and returns its ELF.
pub fn kernel(opts: &BuildOptions) -> Result<PathBuf> {
    Ok(bare_metal(&["kernel"], opts)?.remove(0))
}

/// Builds init and the service crates `services/<crate>` (packages
/// `service-<crate>`) and returns their ELF files: init's first, then one
/// per crate given, in order.
pub fn services(crates: &[&str], opts: &BuildOptions) -> Result<Vec<PathBuf>> {
    let mut packages = vec!["service-init".to_owned()];
    packages.extend(crates.iter().map(|c| format!("service-{c}")));
    let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
    bare_metal(&refs, opts)
}

/// Builds test guests (crates `tests/guests/<name>`, packages `guest-<name>`)
/// and returns their ELF files, in the order given.
pub fn guests(names: &[&str], opts: &BuildOptions) -> Result<Vec<PathBuf>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let packages: Vec<String> = names.iter().map(|n| format!("guest-{n}")).collect();
    let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
    bare_metal(&refs, opts)
}

/// Builds service crate `services/<krate>` with cargo `features` (a variant,
/// e.g. a new release to swap in) into a target directory of its own, so
/// that the regular build stays as it is. Returns its ELF.
pub fn service_variant(krate: &str, features: &str, opts: &BuildOptions) -> Result<PathBuf> {
    let package = format!("service-{krate}");
    let dir = paths::target_dir()
        .join("variants")
        .join(features.replace([',', ' '], "-"));
    let step = Step::start(format!("compiling {package} with features {features}"));
    let out = cargo()
        .current_dir(paths::repo())
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "-p",
            &package,
        ])
        .args(["--features", features, "--target-dir"])
        .arg(&dir)
        .env("DEFMT_LOG", &opts.log_level)
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        step.failed();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("cargo build failed for {package} with features {features}");
    }
    step.done("");
    Ok(dir
        .join("x86_64-unknown-none")
        .join("release")
        .join(package))
}
