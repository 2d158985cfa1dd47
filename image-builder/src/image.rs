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
    /// Services whose ELF is taken from a file instead of being built:
    /// (service name, absolute path of a checked x86-64 ELF), from
    /// `--service NAME=PATH`. Each name once; each must be a service of
    /// the manifest.
    pub service_overrides: Vec<(String, PathBuf)>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            manifest: paths::default_manifest(),
            build: BuildOptions::default(),
            cmdline: String::new(),
            out: paths::target_dir().join("parallax.iso"),
            service_overrides: Vec::new(),
        }
    }
}

/// Parses a `--service NAME=PATH` value: a service name (1 to 32 lower-case
/// letters, digits and `-`, starting with a letter) and an existing x86-64
/// ELF file. The path comes back absolute. Errors name the file.
pub fn parse_service_override(arg: &str) -> Result<(String, PathBuf)> {
    let Some((name, path)) = arg.split_once('=') else {
        bail!("expected NAME=PATH (a service name, `=`, its ELF file), got {arg:?}");
    };
    let name_ok = !name.is_empty()
        && name.len() <= ipc_schema::supervisor::NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        bail!(
            "the service name {name:?} must be 1 to {} lower-case letters, digits or '-', starting with a letter",
            ipc_schema::supervisor::NAME
        );
    }
    if path.is_empty() {
        bail!("no ELF file given for service {name} (expected {name}=PATH)");
    }
    let path = PathBuf::from(path);
    crate::elf::check_file(&path)?;
    let path = std::path::absolute(&path).unwrap_or(path);
    Ok((name.to_owned(), path))
}

/// Checks that no service is overridden twice.
pub fn check_service_overrides(overrides: &[(String, PathBuf)]) -> Result<()> {
    for (i, (name, path)) in overrides.iter().enumerate() {
        if let Some((_, first)) = overrides[..i].iter().find(|(n, _)| n == name) {
            bail!(
                "--service {name} is given twice ({} and {})",
                first.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// Reads the manifest, compiles everything it needs, and assembles the ISO.
pub fn build(opts: &ImageOptions) -> Result<Image> {
    let manifest = SystemManifest::load(&opts.manifest)?;
    build_manifest(&manifest, opts)
}

/// Compiles everything `manifest` needs and assembles the ISO (the
/// manifest's own path names it in errors; `opts.manifest` is not read).
pub fn build_manifest(manifest: &SystemManifest, opts: &ImageOptions) -> Result<Image> {
    let opts = &ImageOptions {
        manifest: manifest.path.clone(),
        ..opts.clone()
    };
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
    // Kernels from files: read and checked as init's loader takes them.
    let mut kernels = Vec::new();
    for (d, path) in manifest.kernels() {
        kernels.push(kernel_module(&opts.manifest, d, &path)?);
    }
    for (d, i, path) in manifest.kernel_modules() {
        kernels.push(guest_module(&opts.manifest, d, i, &path)?);
    }
    check_service_overrides(&opts.service_overrides)?;
    for (name, _) in &opts.service_overrides {
        if !manifest.services.iter().any(|s| &s.name == name) {
            let names: Vec<&str> = manifest.services.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "--service {name}: {} has no service named `{name}` (it has {})",
                opts.manifest.display(),
                names.join(", ")
            );
        }
    }
    // Services built from their crates (the others come from files).
    let mut crates: Vec<&str> = Vec::new();
    for s in &manifest.services {
        if opts.service_overrides.iter().any(|(n, _)| *n == s.name) {
            continue;
        }
        let crate_file = paths::service_dir(s.crate_name()).join("Cargo.toml");
        if !crate_file.is_file() {
            bail!(
                "{}: service `{}` names no service crate ({} does not exist)",
                opts.manifest.display(),
                s.name,
                crate_file.display()
            );
        }
        if !crates.contains(&s.crate_name()) {
            crates.push(s.crate_name());
        }
    }
    let kernel = compile::kernel(&opts.build)?;
    let built = compile::services(&crates, &opts.build)?;
    let mut elfs = ElfSet::default()
        .with("kernel", &kernel)
        .with("init", &built[0]);
    let mut modules = vec![
        Module {
            name: "manifest".to_owned(),
            content: Content::Bytes(manifest.compile()?),
        },
        Module {
            name: "init".to_owned(),
            content: Content::File(built[0].clone()),
        },
    ];
    for s in &manifest.services {
        let path = match opts.service_overrides.iter().find(|(n, _)| *n == s.name) {
            Some((_, p)) => p.clone(),
            None => {
                let i = crates
                    .iter()
                    .position(|c| *c == s.crate_name())
                    .unwrap_or(0);
                built[i + 1].clone()
            }
        };
        elfs = elfs.with(&s.name, &path);
        modules.push(Module {
            name: s.name.clone(),
            content: Content::File(path),
        });
    }
    for (g, path) in guests.iter().zip(compile::guests(&guests, &opts.build)?) {
        modules.push(Module {
            name: (*g).to_owned(),
            content: Content::File(path),
        });
    }
    modules.extend(kernels);
    let mut image = assemble(&kernel, &opts.cmdline, modules, &opts.out)?;
    image.elfs = elfs;
    Ok(image)
}

/// Domain `d`'s kernel from the file `path` (docs/guests.md), read and
/// checked as init's multiboot loader will take it, or why not, naming the
/// manifest, the domain and the file.
pub fn kernel_module(
    manifest: &Path,
    d: &crate::manifest::DomainSpec,
    path: &Path,
) -> Result<Module> {
    let what = format!(
        "{}: domain `{}`: kernel {}",
        manifest.display(),
        d.name,
        path.display()
    );
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{what}: cannot read it: {e}"))?;
    let layout = platform::multiboot::GuestLayout::new(u64::from(d.memory_mib) << 20);
    let plan = match platform::multiboot::plan(&bytes, &layout) {
        Ok(plan) => plan,
        Err(e) => bail!("{what}: {}", describe_image_error(&bytes, e, d.memory_mib)),
    };
    if plan.format == platform::multiboot::Format::Linux {
        check_linux(manifest, d, &bytes, &plan).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    }
    Ok(Module {
        name: d.module(),
        content: Content::File(path.to_owned()),
    })
}

/// What init's Linux loader would refuse beyond the image itself: more than
/// one module (the initrd), a command line longer than the kernel's
/// `cmdline_size`, an initrd that does not fit after the kernel or ends
/// above its `initrd_addr_max`.
fn check_linux(
    manifest: &Path,
    d: &crate::manifest::DomainSpec,
    image: &[u8],
    plan: &platform::multiboot::LoadPlan,
) -> std::result::Result<(), String> {
    let h = platform::multiboot::linux::header(image).map_err(|e| format!("{e:?}"))?;
    if d.modules.len() > 1 {
        return Err(format!(
            "a Linux bzImage takes one module, its initrd; {} are given",
            d.modules.len()
        ));
    }
    if d.cmdline.len() > h.cmdline_size as usize {
        return Err(format!(
            "its command line is {} bytes, longer than the kernel's cmdline_size ({})",
            d.cmdline.len(),
            h.cmdline_size
        ));
    }
    let Some(m) = d.modules.first() else {
        return Ok(());
    };
    let dir = manifest.parent().unwrap_or(Path::new("."));
    // A module that cannot be read is refused by `guest_module`, naming it.
    let Ok(meta) = std::fs::metadata(dir.join(&m.path)) else {
        return Ok(());
    };
    let ram = u64::from(d.memory_mib) << 20;
    match platform::multiboot::place_modules::<1>(plan.end(), &[meta.len()], ram) {
        None => Err(format!(
            "its initrd {} ({} bytes) does not fit in the domain's {} MiB after the kernel's {:#x} bytes (its init_size) from {:#x}",
            m.path,
            meta.len(),
            d.memory_mib,
            plan.segments[0].mem_len,
            plan.segments[0].gpa
        )),
        Some(placed) if placed[0].1 - 1 > h.initrd_addr_max => Err(format!(
            "its initrd {} would end at {:#x}, above the kernel's initrd_addr_max {:#x}",
            m.path, placed[0].1, h.initrd_addr_max
        )),
        Some(_) => Ok(()),
    }
}

/// Multiboot module `i` of domain `d`'s kernel, from the file `path`: a
/// file that can be read, or why not.
pub fn guest_module(
    manifest: &Path,
    d: &crate::manifest::DomainSpec,
    i: usize,
    path: &Path,
) -> Result<Module> {
    std::fs::File::open(path).map_err(|e| {
        anyhow::anyhow!(
            "{}: domain `{}`: module {i} {}: cannot read it: {e}",
            manifest.display(),
            d.name,
            path.display()
        )
    })?;
    Ok(Module {
        name: d.module_module(i),
        content: Content::File(path.to_owned()),
    })
}

/// Why init's loader would refuse `bytes`, in words.
fn describe_image_error(bytes: &[u8], e: platform::multiboot::ImageError, mib: u32) -> String {
    use platform::multiboot::ImageError as E;
    let has = |magic: u32, within: usize| {
        bytes[..bytes.len().min(within)]
            .chunks_exact(4)
            .any(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == magic)
    };
    match e {
        E::NoHeader if platform::multiboot::mb2::has_magic(bytes) => {
            "its multiboot2 header's checksum is wrong".into()
        }
        E::NoHeader if bytes.starts_with(b"\x7fELF") => {
            "an ELF file with no multiboot header in its first 8 KiB, no multiboot2 header in its first 32 KiB and no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): not a kernel Parallax can load".into()
        }
        E::NoHeader if has(0x1bad_b002, 8 * 1024) || has(0xe852_50d6, 32 * 1024) => {
            "a multiboot header out of place (not aligned as the specification asks): not a kernel Parallax can load".into()
        }
        E::NoHeader => {
            "no multiboot header in its first 8 KiB, no multiboot2 header in its first 32 KiB, not an ELF with a PVH note: not a kernel Parallax can load".into()
        }
        E::Mb2Architecture(a) => {
            format!("its multiboot2 header is for architecture {a}, not i386 (0)")
        }
        E::Mb2BadTags => "its multiboot2 header's tags are malformed or run past its length".into(),
        E::Mb2Unsupported(1) => {
            "its multiboot2 header requires information the loader does not give (a framebuffer, EFI or APM table, ...): only the command line, loader name, modules, memory sizes and map are given".into()
        }
        E::Mb2Unsupported(t) => format!(
            "its multiboot2 header requires what the loader does not provide (tag type {t}: 4 a console, 5 a framebuffer, 7 EFI boot services, or unknown)"
        ),
        E::PvhBadNote => {
            "its PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) is not a 32-bit entry point".into()
        }
        E::BadChecksum => "its multiboot header's checksum is wrong".into(),
        E::UnsupportedFlags(f) => format!(
            "its multiboot header asks for what the loader does not provide (flags {f:#x}: a video mode, or an unknown required feature)"
        ),
        E::BadAddresses => "its header's address fields do not fit the file (or give no entry point)".into(),
        E::NotElf => "not an ELF file, and its multiboot header has no address fields".into(),
        E::BadElf => "its ELF headers (or notes) are malformed".into(),
        E::TooManySegments => "it has more loadable segments than the loader takes".into(),
        E::LinuxProtocol(v) => format!(
            "a Linux kernel with boot protocol {}.{:02}: older than 2.06, the oldest the loader takes",
            v >> 8,
            v & 0xff
        ),
        E::LinuxNotLoadedHigh => {
            "a Linux zImage (loadflags without LOADED_HIGH: loaded at 0x10000): only bzImages are taken".into()
        }
        E::LinuxTruncated => {
            "a Linux bzImage cut short: the file is shorter than its setup header, setup sectors and protected-mode kernel (syssize) say".into()
        }
        E::OutsideRam { start, end } if platform::multiboot::linux::is_bzimage(bytes) => format!(
            "a Linux bzImage that needs {:#x} bytes of RAM from {start:#x} (its init_size): more than the domain's {mib} MiB",
            end - start
        ),
        E::OutsideRam { start, end } => format!(
            "it loads at {start:#x}..{end:#x}, outside the domain's {mib} MiB of RAM or over the loader's reserved area"
        ),
        E::Empty => "it has nothing to load".into(),
    }
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

/// The ELF files of the current build, for decoding a capture taken elsewhere:
/// the kernel, init, every service crate built, and the ELFs swapped in.
pub fn current_elfs() -> Result<ElfSet> {
    let bins = paths::bare_metal_bins();
    let kernel = bins.join("kernel");
    if !kernel.is_file() {
        bail!(
            "{} does not exist: build first (cargo hv build)",
            kernel.display()
        );
    }
    let mut elfs = ElfSet::default().with("kernel", &kernel);
    if let Ok(dir) = std::fs::read_dir(&bins) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(service) = name.strip_prefix("service-")
                && !service.contains('.')
            {
                elfs = elfs.with(service, &entry.path());
            }
        }
    }
    Ok(elfs)
}
