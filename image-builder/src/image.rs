//! The whole pipeline from a manifest to a bootable image.

use crate::compile::{self, BuildOptions};
use crate::iso::{self, Content, IsoSpec, Module};
use crate::logs::ElfSet;
use crate::manifest::SystemManifest;
use crate::paths;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// A built image and the ELF files that decode its logs.
#[derive(Clone, Debug)]
pub struct Image {
    pub iso: PathBuf,
    pub elfs: ElfSet,
    pub kernel: PathBuf,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    pub manifest: PathBuf,
    pub build: BuildOptions,
    pub cmdline: String,
    pub out: PathBuf,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            manifest: paths::default_manifest(),
            build: BuildOptions::default(),
            cmdline: String::new(),
            out: paths::target_dir().join("parallax.iso"),
        }
    }
}

/// Reads the manifest, compiles everything it needs, and assembles the ISO.
pub fn build(opts: &ImageOptions) -> Result<Image> {
    let manifest = SystemManifest::load(&opts.manifest)?;
    let guests = manifest.guests();
    for g in &guests {
        let crate_file = paths::guest_dir(g).join("Cargo.toml");
        if !crate_file.is_file() {
            bail!(
                "{}: guest `{g}` names no guest crate ({} does not exist)",
                opts.manifest.display(),
                crate_file.display()
            );
        }
    }
    let kernel = compile::kernel(&opts.build)?;
    let mut modules = vec![Module {
        name: "manifest".to_owned(),
        content: Content::Bytes(manifest.compile()?),
    }];
    for (g, path) in guests.iter().zip(compile::guests(&guests, &opts.build)?) {
        modules.push(Module {
            name: (*g).to_owned(),
            content: Content::File(path),
        });
    }
    assemble(&kernel, &opts.cmdline, modules, &opts.out)
}

/// Assembles an ISO from a built kernel and arbitrary modules (tests use this
/// to make images the builder would refuse: a missing module, a corrupt
/// manifest).
pub fn assemble(kernel: &Path, cmdline: &str, modules: Vec<Module>, out: &Path) -> Result<Image> {
    let spec = IsoSpec {
        kernel: kernel.to_owned(),
        cmdline: cmdline.to_owned(),
        modules,
    };
    iso::assemble(&spec, out)?;
    Ok(Image {
        iso: out.to_owned(),
        elfs: ElfSet::default().with("kernel", kernel),
        kernel: kernel.to_owned(),
    })
}

/// The ELF files of the current build, for decoding a capture taken elsewhere.
pub fn current_elfs() -> Result<ElfSet> {
    let kernel = paths::bare_metal_bins().join("kernel");
    if !kernel.is_file() {
        bail!(
            "{} does not exist: build first (cargo hv build)",
            kernel.display()
        );
    }
    Ok(ElfSet::default().with("kernel", &kernel))
}
