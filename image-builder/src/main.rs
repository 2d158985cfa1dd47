//! `cargo hv`: build, boot, decode, test. See `cargo hv --help`.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use image_builder::compile::BuildOptions;
use image_builder::emulator::{self, Machine, RunConfig};
use image_builder::image::{self, ImageOptions};
use image_builder::{bench, deps, logs, paths};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cargo hv",
    bin_name = "cargo hv",
    about = "Build, boot and test the Parallax hypervisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile the kernel and assemble the bootable ISO.
    Build(BuildArgs),
    /// Build, then boot the image and show its decoded log live; exits with the run's status.
    Run {
        #[command(flatten)]
        build: BuildArgs,
        /// Where to boot (default: kvm where /dev/kvm offers nested VMX, else bochs).
        #[arg(long, value_enum)]
        on: Option<Machine>,
        /// Stop the emulator after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Bochs CPU model.
        #[arg(long, default_value = "corei7_skylake_x")]
        bochs_cpu: String,
        /// QEMU: add an Intel IOMMU (VT-d) and the edu DMA device.
        #[arg(long)]
        iommu: bool,
        /// QEMU: add this ACPI table (repeatable).
        #[arg(long = "acpi-table")]
        acpi_tables: Vec<PathBuf>,
        /// Guest-physical memory of the machine, in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
    },
    /// Decode a raw serial capture taken elsewhere with this build's ELF files.
    Log {
        /// The capture (raw bytes from the log serial port).
        file: PathBuf,
    },
    /// Run the whole test suite: lint, host unit tests, boot tests.
    Test {
        /// Skip formatting and clippy checks.
        #[arg(long)]
        no_lint: bool,
        /// Arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Check formatting and run clippy on host and bare-metal crates.
    Lint,
    /// Boot the benchmark guest on Bochs and print its figures (instruction counts).
    Bench {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Bochs CPU model.
        #[arg(long, default_value = "corei7_skylake_x")]
        bochs_cpu: String,
        /// Stop the emulator after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Args)]
struct BuildArgs {
    /// The system manifest.
    #[arg(long, default_value_os_t = paths::default_manifest())]
    manifest: PathBuf,
    /// defmt levels compiled in: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log: String,
    /// Extra kernel command-line options (key=value ...).
    #[arg(long, default_value = "")]
    cmdline: String,
}

impl BuildArgs {
    fn options(&self) -> ImageOptions {
        ImageOptions {
            manifest: self.manifest.clone(),
            build: BuildOptions {
                log_level: self.log.clone(),
            },
            cmdline: self.cmdline.clone(),
            ..ImageOptions::default()
        }
    }
}

fn main() -> ExitCode {
    // `cargo hv ...` runs this binary with the subcommand; accept being run
    // directly as well.
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("hv") {
        args.remove(1);
    }
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Build(b) => {
            deps::ensure()?;
            let img = image::build(&b.options())?;
            println!("image: {}", img.iso.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            build,
            on,
            timeout,
            bochs_cpu,
            iommu,
            acpi_tables,
            memory,
        } => {
            deps::ensure()?;
            let img = image::build(&build.options())?;
            let machine = on.unwrap_or_else(Machine::default_for_host);
            let mut cfg = RunConfig::new(machine, emulator::capture_path("run"));
            cfg.timeout = Duration::from_secs(timeout);
            cfg.bochs_cpu = bochs_cpu;
            cfg.iommu = iommu;
            cfg.acpi_tables = acpi_tables;
            cfg.memory_mib = memory;
            cfg.live = true;
            eprintln!("booting {} on {}", img.iso.display(), machine.name());
            let outcome = emulator::run(&img.iso, &img.elfs, &cfg)?;
            eprintln!("{}", outcome.summary());
            Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
        }
        Cmd::Log { file } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read the capture {}", file.display()))?;
            let (lines, halt) = logs::decode_all(&bytes, image::current_elfs()?);
            for l in &lines {
                println!("{l}");
            }
            if lines.is_empty() {
                eprintln!("{}: no log records or text found", file.display());
            }
            Ok(match halt {
                Some(s) => ExitCode::from(s),
                None => ExitCode::SUCCESS,
            })
        }
        Cmd::Test {
            no_lint,
            cargo_args,
        } => {
            deps::ensure()?;
            if !no_lint {
                lint()?;
            }
            let status = image_builder::compile::cargo()
                .current_dir(paths::repo())
                .arg("test")
                .args(&cargo_args)
                .status()
                .context("running cargo test")?;
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Lint => {
            lint()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            json,
            bochs_cpu,
            timeout,
        } => {
            deps::ensure()?;
            let figures = bench::run(
                &bochs_cpu,
                &BuildOptions::default(),
                Duration::from_secs(timeout),
            )?;
            if json {
                println!("{}", bench::to_json(&bochs_cpu, &figures));
            } else {
                println!("model: {bochs_cpu} (Bochs; ticks are emulated instructions)");
                for (k, v) in &figures {
                    match v {
                        Some(n) => println!("  {k:<32} {n:>10}"),
                        None => println!("  {k:<32} {:>10}", "n/a"),
                    }
                }
                for (target, ok) in bench::check_targets(&figures) {
                    println!("  target {target}: {}", if ok { "met" } else { "NOT met" });
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `cargo fmt --check`, then clippy with warnings as errors on the host crates
/// and on the bare-metal ones.
fn lint() -> Result<()> {
    let run = |what: &str, args: &[&str]| -> Result<()> {
        eprintln!("lint: {what}");
        let mut cmd = image_builder::compile::cargo();
        cmd.current_dir(paths::repo());
        for a in args {
            if *a == "--" && args.contains(&"x86_64-unknown-none") {
                cmd.arg("--target-dir").arg(paths::target_dir());
            }
            cmd.arg(a);
        }
        let status = cmd
            .status()
            .with_context(|| format!("running cargo {}", args.join(" ")))?;
        if !status.success() {
            bail!("{what} failed");
        }
        Ok(())
    };
    run("formatting", &["fmt", "--all", "--check"])?;
    run(
        "clippy (host crates)",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    // The kernel and every test guest (crates under tests/guests/).
    let mut bare: Vec<String> = vec!["-p".into(), "kernel".into()];
    let guests = paths::repo().join("tests").join("guests");
    if let Ok(dirs) = std::fs::read_dir(&guests) {
        let mut names: Vec<String> = dirs
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("Cargo.toml").is_file())
            .map(|e| format!("guest-{}", e.file_name().to_string_lossy()))
            .collect();
        names.sort();
        for n in names {
            bare.push("-p".into());
            bare.push(n);
        }
    }
    let mut args = vec!["clippy", "--release", "--target", "x86_64-unknown-none"];
    args.extend(bare.iter().map(String::as_str));
    args.extend(["--", "-D", "warnings"]);
    run("clippy (bare-metal crates)", &args)
}
