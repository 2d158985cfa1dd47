//! `cargo hv`: build, boot, decode, test. See `cargo hv --help`.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use image_builder::compile::BuildOptions;
use image_builder::control::{self, Client, DomainOp};
use image_builder::emulator::{self, Machine, RunConfig};
use image_builder::image::{self, ImageOptions};
use image_builder::{bench, deps, elf, logs, paths, suite};
use ipc_schema::syscall::{DomainState, SysError};
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
        /// Stop the emulator after this many seconds (at least 1).
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
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
        /// Guest-physical memory of the machine, in MiB: at least 4 (below
        /// that the firmware never reaches the boot loader, and the run
        /// would only time out; between 4 and what the kernel and its
        /// modules need, GRUB's refusal is named).
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(4..))]
        memory: u32,
        /// Offer the control channel (COM2) on this unix socket (default:
        /// target/hv/work/ctl.sock, or one in the run's directory while
        /// another run serves that).
        #[arg(long, value_name = "PATH")]
        control_socket: Option<PathBuf>,
        /// Do not watch the pages guests ask the host to watch (a console
        /// line `watch me: gfn 0xN`; docs/altp2m.md).
        #[arg(long)]
        no_watch: bool,
    },
    /// Talk to a running image's console (while `cargo hv run` runs).
    Ctl {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        command: CtlCmd,
    },
    /// Replace a running service by a new ELF (while `cargo hv run` runs).
    Swap {
        /// The service to replace.
        name: String,
        /// Its new ELF file.
        path: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
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
    /// Download Debian's Linux package and make the files
    /// examples/linux.toml boots: target/hv/linux/vmlinux.pvh (its vmlinux,
    /// out of the bzImage) and target/hv/linux/initramfs.cpio (a test /init).
    Linux,
    /// Boot the benchmark guest on Bochs and print its figures (instruction counts).
    Bench {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Bochs CPU model.
        #[arg(long, default_value = "corei7_skylake_x")]
        bochs_cpu: String,
        /// Kernel command-line options for the run (key=value ...; e.g.
        /// `fastpath=off` measures the general exit path).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Stop the emulator after this many seconds (at least 1).
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
    /// Trace one benchmark operation on Bochs and show where its
    /// instructions go (ELF file, function, source line).
    Profile {
        /// The benchmark (a key `cargo hv bench` prints, e.g.
        /// vmcall_service_ticks).
        key: String,
        /// Bochs CPU model.
        #[arg(long, default_value = "corei7_skylake_x")]
        bochs_cpu: String,
        /// Kernel command-line options for the run (key=value ...).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Rows per table.
        #[arg(long, default_value_t = 40)]
        top: usize,
        /// Also list every instruction with its place.
        #[arg(long)]
        listing: bool,
        /// Stop the emulator after this many seconds (at least 1).
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
}

/// Where the console is and how long to wait for it.
#[derive(Args)]
struct ConnArgs {
    /// The control socket of the run (default: target/hv/work/ctl.sock;
    /// `cargo hv run` prints its socket when it starts).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Seconds to wait for each answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, global = true)]
    timeout: f64,
}

impl ConnArgs {
    fn connect(&self) -> Result<Client<UnixStream>> {
        if !seconds_in(self.timeout, 3600.0) {
            bail!(
                "--timeout {} is not a number of seconds above 0 and at most 3600",
                self.timeout
            );
        }
        let path = self.socket.clone().unwrap_or_else(default_control_socket);
        Ok(Client::connect(&path)?.with_timeout(Duration::from_secs_f64(self.timeout)))
    }
}

#[derive(Subcommand)]
enum CtlCmd {
    /// List the services: name, generation, restarts, state, schema key.
    Services,
    /// List the guest domains.
    Domains,
    /// Pause guest DOMAIN (its id or its name).
    Pause { domain: String },
    /// Let paused guest DOMAIN (its id or its name) run again.
    Unpause { domain: String },
    /// Destroy guest DOMAIN (its id or its name).
    Destroy { domain: String },
    /// VM fork: a child of paused DOMAIN (its id or name) that shares all
    /// of its memory copy-on-write and starts, paused, from its vCPU state
    /// (docs/sharing.md). Prints the child's id.
    Fork {
        domain: String,
        /// The child's name (default: `<parent>-fork`).
        #[arg(long)]
        name: Option<String>,
    },
    /// Take fork CHILD (its id or name) back to its parent's memory and
    /// vCPU state, paused, in time proportional to the pages it wrote.
    Reset { child: String },
    /// Make SERVICE fault, to test its supervision.
    Fault { service: String },
    /// Print the console's events as they come, until interrupted.
    Events,
    /// Print the run's decoded log (from its start), following it until the
    /// system halts.
    Logs,
    /// Attach to DOMAIN's COM1 (its id or name): what is typed goes to its
    /// receiver (raw, byte by byte, when stdin is a terminal; Ctrl-] leaves),
    /// its console lines are shown as they come. With stdin not a terminal
    /// (a pipe), its bytes are sent, then the lines are shown until the
    /// domain ends.
    Console { domain: String },
    /// Alternate views as an external agent: views, access, modes, and
    /// violation events (docs/altp2m.md).
    #[command(subcommand)]
    Altp2m(AltCmd),
    /// Dirty-page logs of a domain's RAM, kept by the logdirty service:
    /// start, read (and clear), peek, status, stop (docs/logdirty.md).
    #[command(subcommand)]
    Logdirty(LdCmd),
    /// Guest memory through the introspect service: read (a hex dump),
    /// write, translate a guest-virtual address (docs/introspection.md).
    #[command(subcommand)]
    Mem(MemCmd),
    /// Copy-on-write page sharing between domains, kept by the sharing
    /// service: nominate, share, unshare, status (docs/sharing.md).
    #[command(subcommand)]
    Share(ShareCmd),
    /// A vCPU's registers; with --set NAME=VALUE (repeatable), sets them at
    /// once (the domain must be paused: `cargo hv ctl pause ID`).
    Regs {
        /// The domain: its id, or its name.
        domain: String,
        #[arg(long, default_value = "0")]
        vcpu: u16,
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = control::introspect::parse_assignment)]
        set: Vec<(usize, u64)>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Where a `cargo hv ctl mem` command reads or writes.
#[derive(Args)]
struct MemAt {
    /// The domain: its id, or its name.
    domain: String,
    /// Guest-physical (or with --virtual, guest-virtual) address: decimal
    /// or 0x-prefixed hex.
    #[arg(value_parser = number)]
    address: u64,
    /// The address is guest-virtual: translated through the guest's page
    /// tables (the vCPU's CR3, or --cr3).
    #[arg(long = "virtual")]
    virt: bool,
    #[arg(long, default_value = "0")]
    vcpu: u16,
    /// The page tables to translate through (implies --virtual).
    #[arg(long, value_parser = number)]
    cr3: Option<u64>,
}

impl MemAt {
    fn address(&self) -> control::introspect::Address {
        use control::introspect::Address;
        if self.virt || self.cr3.is_some() {
            Address::Virtual {
                vcpu: self.vcpu,
                cr3: self.cr3,
                gva: self.address,
            }
        } else {
            Address::Physical(self.address)
        }
    }
}

#[derive(Subcommand)]
enum ShareCmd {
    /// A handle for page GFN of DOMAIN and its contents now (SH-1).
    Nominate {
        /// The domain: its id, or its name.
        domain: String,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(long)]
        json: bool,
    },
    /// The CLIENT handle's page comes to map the SOURCE handle's frame,
    /// read-only; the client's own frame is freed (SH-1).
    Share {
        #[arg(value_parser = number)]
        source: u64,
        #[arg(value_parser = number)]
        client: u64,
        #[arg(long)]
        json: bool,
    },
    /// Page GFN of DOMAIN gets a frame of its own again.
    Unshare {
        domain: String,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(long)]
        json: bool,
    },
    /// Deduplication: reads every page of the DOMAINs and shares those of
    /// equal contents (each nominated first, so a page written meanwhile is
    /// never merged); prints pages scanned and frames saved.
    Scan {
        /// Domains: ids or names.
        #[arg(required = true)]
        domains: Vec<String>,
        /// Pages per request to the service.
        #[arg(long, default_value = "256")]
        batch: u32,
        #[arg(long)]
        json: bool,
    },
    /// Shared frames, pages, frames saved, handles, breaks, free frames.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MemCmd {
    /// Print LEN bytes at ADDRESS as a hex dump (or --json, or --out FILE
    /// for the raw bytes).
    Read {
        #[command(flatten)]
        at: MemAt,
        #[arg(value_parser = number)]
        len: u64,
        #[arg(long)]
        json: bool,
        /// Write the bytes to FILE instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write BYTES (hex, e.g. 90 90 or 0x9090) at ADDRESS.
    Write {
        #[command(flatten)]
        at: MemAt,
        /// The bytes, hex (spaces allowed).
        bytes: String,
    },
    /// Where guest-virtual GVA leads through the guest's page tables.
    Translate {
        domain: String,
        #[arg(value_parser = number)]
        gva: u64,
        #[arg(long, default_value = "0")]
        vcpu: u16,
        #[arg(long, value_parser = number)]
        cr3: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

/// `cargo hv ctl logdirty ...`: DOMAIN is an id or a name; --log picks one
/// of the host's logs of it (0 unless said).
#[derive(Subcommand)]
enum LdCmd {
    /// Start a log of DOMAIN's RAM (or of --range), empty: from now on
    /// every page the guest writes is set in it.
    Start {
        #[command(flatten)]
        log: LogArgs,
        /// Log COUNT pages from GFN only (each decimal, or hex with 0x;
        /// default: all of the domain's RAM).
        #[arg(long, value_name = "GFN:COUNT", value_parser = control::logdirty::parse_range)]
        range: Option<control::logdirty::GfnRange>,
        /// auto (PML where the CPU has it, else write-protection), pml, or
        /// wp (write-protection).
        #[arg(long, default_value = "auto", value_parser = control::logdirty::parse_mode)]
        mode: control::logdirty::DirtyMode,
    },
    /// Print the pages written since the start or the last read, as ranges
    /// and a total, and clear them (the next write to each is logged again).
    Read(LogArgs),
    /// Print the pages written, as `read` does, without clearing them.
    Peek(LogArgs),
    /// Print the log's mechanism, range and number of pages set.
    Status(LogArgs),
    /// End the log.
    Stop(LogArgs),
}

/// The log a `cargo hv ctl logdirty` command is about.
#[derive(Args)]
struct LogArgs {
    /// The domain: its id, or its name (as `cargo hv ctl domains` lists it).
    domain: String,
    /// Which of the host's logs of the domain: every host tool shares the
    /// numbers, so two tools that keep logs of one domain use different ones.
    #[arg(long, value_name = "N", default_value = "0", value_parser = log_number)]
    log: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `--log N`: decimal or 0x-prefixed hex, at most u32::MAX.
fn log_number(s: &str) -> Result<u32, String> {
    let n = control::logdirty::parse_number(s)?;
    u32::try_from(n).map_err(|_| format!("log {s}: at most {} (u32)", u32::MAX))
}

/// A gfn or count: decimal or 0x-prefixed hex.
fn number(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x-prefixed hex)"))
}

#[derive(Subcommand)]
enum AltCmd {
    /// Set DOMAIN's altp2m mode: disabled, mixed, external or limited.
    Mode {
        domain: u16,
        #[arg(value_parser = control::altp2m::parse_mode)]
        mode: control::altp2m::Mode,
    },
    /// What happens to a violation while no listener is attached: crash
    /// (the default) or pause.
    OnViolation { domain: u16, policy: String },
    /// Create an alternate view (it starts as the host p2m); prints its index.
    ViewCreate {
        domain: u16,
        /// Access of its pages (as the host p2m allows, never more).
        #[arg(long, value_parser = control::altp2m::parse_access)]
        access: Option<control::altp2m::Access>,
    },
    /// Destroy alternate view VIEW.
    ViewDestroy { domain: u16, view: u16 },
    /// Let VMFUNC reach VIEW (on) or not (off).
    Visible {
        domain: u16,
        view: u16,
        state: String,
    },
    /// Make VIEW the view of every vCPU of DOMAIN.
    Switch { domain: u16, view: u16 },
    /// Set the access (r, w, x letters, or none) of COUNT gfns from GFN in VIEW.
    SetAccess {
        domain: u16,
        view: u16,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(value_parser = control::altp2m::parse_access)]
        access: control::altp2m::Access,
        #[arg(long, default_value = "1", value_parser = number)]
        count: u64,
    },
    /// Give GFN in VIEW an access that relaxes itself at its first
    /// violation: rx2rw (read-execute; a write makes it read-write, no
    /// event) or n2rwx (nothing; any access makes it rwx, and the listener
    /// hears of it afterwards).
    Relaxing {
        domain: u16,
        view: u16,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(value_parser = control::altp2m::parse_relaxing)]
        relaxing: control::altp2m::Relaxing,
    },
    /// COUNT new zeroed pages for DOMAIN right past its RAM, outside the
    /// memory map its guest was given: prints the first one's gfn (a
    /// change_gfn target, e.g. to hide a breakpoint).
    Shadow { domain: u16, count: u16 },
    /// In VIEW, map GFN to the frame behind TO (no TO: the host's own again).
    ChangeGfn {
        domain: u16,
        view: u16,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(value_parser = number)]
        to: Option<u64>,
    },
    /// Set (on) or clear (off) the suppress-#VE bit of GFN in VIEW.
    Sve {
        domain: u16,
        view: u16,
        #[arg(value_parser = number)]
        gfn: u64,
        state: String,
    },
    /// What VIEW maps at GFN: the effective entry, or with --raw what its
    /// table holds now.
    Get {
        domain: u16,
        view: u16,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(long)]
        raw: bool,
    },
    /// Attach (on) or detach (off) the console as DOMAIN's violation
    /// listener (it stays attached after this command ends).
    /// With --gfns or --kinds, only for the violations they take (the
    /// domain's other listeners, services, take the rest).
    Listen {
        domain: u16,
        state: String,
        /// FIRST:END, the gfns whose violations to take.
        #[arg(long, value_name = "FIRST:END")]
        gfns: Option<String>,
        /// Which accesses: letters r, w, x.
        #[arg(long, value_parser = control::altp2m::parse_access)]
        kinds: Option<control::altp2m::Access>,
    },
    /// Answer waiting event EVENT with ACTION (retry, allow-once,
    /// skip:LENGTH, view:N, access:ACCESS, crash).
    Answer {
        event: u32,
        #[arg(value_parser = control::altp2m::parse_action)]
        action: control::altp2m::Action,
    },
    /// Watch GFN of DOMAIN through a view made for it: the page gets ACCESS
    /// there (default r-x: writes are seen), the domain is put in the view,
    /// and each violation is printed and answered (retry, allow-once,
    /// skip:LENGTH, view:N, access:ACCESS, crash). Undone at the end.
    Watch {
        domain: u16,
        #[arg(value_parser = number)]
        gfn: u64,
        #[arg(long, default_value = "r-x", value_parser = control::altp2m::parse_access)]
        access: control::altp2m::Access,
        #[arg(long, default_value = "allow-once", value_parser = control::altp2m::parse_action)]
        answer: control::altp2m::Action,
        /// Stop after this many events (default: until no event comes for
        /// --wait seconds).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        count: Option<u32>,
        /// Seconds to wait for the next event.
        #[arg(long, default_value_t = 60.0, value_parser = watch_wait)]
        wait: f64,
    },
}

/// The control socket `cargo hv run` offers by default.
fn default_control_socket() -> PathBuf {
    paths::work_dir().join("ctl.sock")
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
    /// Take service NAME's ELF from PATH instead of building it
    /// (repeatable).
    #[arg(long = "service", value_name = "NAME=PATH", value_parser = service_override)]
    services: Vec<(String, PathBuf)>,
}

/// `--service NAME=PATH`, checked as it is parsed.
fn service_override(arg: &str) -> Result<(String, PathBuf), String> {
    image::parse_service_override(arg).map_err(|e| format!("{e:#}"))
}

impl BuildArgs {
    fn options(&self) -> Result<ImageOptions> {
        image::check_service_overrides(&self.services)?;
        Ok(ImageOptions {
            manifest: self.manifest.clone(),
            build: BuildOptions {
                log_level: self.log.clone(),
                ..BuildOptions::default()
            },
            cmdline: self.cmdline.clone(),
            service_overrides: self.services.clone(),
            ..ImageOptions::default()
        })
    }
}

fn main() -> ExitCode {
    // `cargo hv ...` runs this binary with the subcommand; accept being run
    // directly as well.
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("hv") {
        args.remove(1);
    }
    // clap's own usage errors exit 2, which is a kernel halt status here.
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.exit_code() {
                0 => ExitCode::SUCCESS,
                _ => ExitCode::from(image_builder::TOOL_ERROR),
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(image_builder::TOOL_ERROR)
        }
    }
}

/// Whether the supervisor passed on the kernel's refusal `want`.
fn kernel_refused(e: &control::ClientError, want: SysError) -> bool {
    matches!(
        e,
        control::ClientError::Refused {
            refusal: control::Refusal::Kernel { error },
            ..
        } if *error == want as u64
    )
}

/// A domain operation's refusal `e` with its reason: where the kernel
/// said Busy, what the domain's state makes of it: that it has ended
/// (listed exited, crashed or destroyed: Busy alone would send the user to
/// pause a domain that cannot be), or `busy`'s hint for the live domain
/// (empty for none).
fn domain_refusal(
    console: &mut Client<UnixStream>,
    e: control::ClientError,
    id: u16,
    busy: impl FnOnce(&control::DomainInfo) -> String,
) -> anyhow::Error {
    if !kernel_refused(&e, SysError::Busy) {
        return e.into();
    }
    let Some(d) = console
        .domains()
        .ok()
        .and_then(|all| all.into_iter().find(|d| d.id == id))
    else {
        return e.into();
    };
    if !DomainState::live(u64::from(d.state)) {
        return anyhow::anyhow!(
            "{e} (domain {id} has ended: {}, status {:#x}; an ended domain can only be read, reset if it is a fork, or destroyed)",
            control::domain_state(d.state),
            d.exit_status
        );
    }
    anyhow::anyhow!("{e}{}", busy(&d))
}

/// Pauses or unpauses domain `id`; a refusal because it is in that state
/// already (or has ended) says so.
fn pause_or_unpause(console: &mut Client<UnixStream>, id: u16, op: DomainOp) -> Result<()> {
    let (already, hint) = match op {
        DomainOp::Pause => (DomainState::Paused, "is paused already"),
        _ => (DomainState::Running, "is not paused: it runs"),
    };
    match console.domain_control(id, op) {
        Ok(()) => Ok(()),
        Err(e) => Err(domain_refusal(console, e, id, |d| {
            if d.state == already as u8 {
                format!(" (domain {id} {hint})")
            } else {
                has_forks(id, d)
            }
        })),
    }
}

/// Why the kernel is Busy for an unpause or destroy of `d` (domain `id`)
/// where it is paused: the one other reason to keep a paused domain so is
/// its forks (`DOMAIN_FORK`). Empty otherwise.
fn has_forks(id: u16, d: &control::DomainInfo) -> String {
    if d.state != DomainState::Paused as u8 {
        return String::new();
    }
    format!(
        " (domain {id} has forks: a parent stays paused, and is not destroyed, while its forks are there; destroy them first (`cargo hv ctl domains` lists them))"
    )
}

/// Destroys domain `id`; a refusal because it has forks says so.
fn destroy(console: &mut Client<UnixStream>, id: u16) -> Result<()> {
    console
        .domain_control(id, DomainOp::Destroy)
        .map_err(|e| domain_refusal(console, e, id, |d| has_forks(id, d)))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Build(b) => {
            let opts = b.options()?;
            deps::ensure()?;
            let img = image::build(&opts)?;
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
            control_socket,
            no_watch,
        } => {
            let opts = build.options()?;
            deps::ensure()?;
            let machine = on.unwrap_or_else(Machine::default_for_host);
            if machine == Machine::Bochs {
                emulator::check_bochs_cpu(&bochs_cpu)?;
            }
            let mut cfg = RunConfig::new(machine, emulator::capture_path("run"));
            cfg.timeout = Duration::from_secs(timeout);
            cfg.bochs_cpu = bochs_cpu;
            cfg.iommu = iommu;
            cfg.acpi_tables = acpi_tables;
            cfg.memory_mib = memory;
            cfg.check()?;
            let img = image::build(&opts)?;
            // Ctrl-C ends the run as its end would: the emulator stopped,
            // the summary with the capture's path printed (exit 130).
            cfg.stop = Some(stop_on_signals());
            cfg.live = true;
            cfg.control_socket = match control_socket {
                Some(p) => Some(p),
                None => {
                    let shared = default_control_socket();
                    if control::proxy::socket_in_use(&shared) {
                        eprintln!(
                            "note: another run serves {}; this run's control socket is in its run directory",
                            shared.display()
                        );
                        None
                    } else {
                        Some(shared)
                    }
                }
            };
            eprintln!("booting {} on {}", img.iso.display(), machine.name());
            let socket = cfg.control_socket_path();
            let flag = if socket == default_control_socket() {
                String::new()
            } else {
                format!(" --socket {}", socket.display())
            };
            eprintln!(
                "control channel (COM2): {} (cargo hv ctl{flag} services)",
                socket.display()
            );
            // `cargo hv ctl logs` finds the capture through the socket.
            let pointer = socket.with_extension("capture");
            let _ = std::fs::write(&pointer, cfg.capture.as_os_str().as_encoded_bytes());
            if !no_watch {
                let (tx, rx) = std::sync::mpsc::channel();
                cfg.tap = Some(tx);
                let socket = socket.clone();
                std::thread::spawn(move || watch_announced_pages(&rx, &socket));
            }
            // The run boots a link of its own to the image it built: a
            // build meanwhile (another `cargo hv run`, a `cargo hv build`)
            // puts a new file under the image's name and leaves this one.
            let booted = own_copy(&img.iso, &cfg.run_dir())?;
            let outcome = emulator::run(&booted, &img.elfs, &cfg);
            let _ = std::fs::remove_file(&booted);
            let _ = std::fs::remove_file(&pointer);
            let outcome = outcome?;
            eprintln!("{}", outcome.summary());
            Ok(ExitCode::from(outcome.exit_code().clamp(0, 255) as u8))
        }
        Cmd::Ctl { conn, command } => ctl(&conn, command),
        Cmd::Swap { name, path, conn } => swap(&name, &path, &conn),
        Cmd::Log { file } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read the capture {}", file.display()))?;
            let (lines, halt) = logs::decode_all(&bytes, image::current_elfs()?);
            for l in &lines {
                println!("{l}");
            }
            if lines.is_empty() {
                eprintln!("{}: no log records or text found", file.display());
            } else if lines.iter().all(|l| l.source == "boot") {
                // (Text alone: the firmware's, or a file that is not a
                // capture at all.)
                eprintln!(
                    "{}: no Parallax log records, only text: is it the capture of a `cargo hv run` (the run names its \"serial capture\" when it ends)?",
                    file.display()
                );
            }
            // As `cargo hv run` and `ctl logs`: the halt status, or 125
            // where the capture holds no halt record.
            Ok(match halt {
                Some(s) => ExitCode::from(s),
                None => {
                    eprintln!(
                        "{}: no halt record (the run was cut short, or had not ended when it was captured)",
                        file.display()
                    );
                    ExitCode::from(image_builder::NO_HALT)
                }
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
            if !cargo_args.is_empty() {
                // The caller's own selection: plain `cargo test`.
                let status = image_builder::compile::cargo()
                    .current_dir(paths::repo())
                    .arg("test")
                    .args(&cargo_args)
                    .status()
                    .context("running cargo test")?;
                return Ok(if status.success() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            test_suite()
        }
        Cmd::Lint => {
            lint()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Linux => {
            let files = image_builder::linux::prepare()?;
            println!("Linux {}", files.version);
            println!("kernel:    {}", files.vmlinux.display());
            println!("initramfs: {}", files.initramfs.display());
            println!("command line: {}", image_builder::linux::CMDLINE);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Profile {
            key,
            bochs_cpu,
            cmdline,
            top,
            listing,
            timeout,
        } => {
            image_builder::profile::check_key(&key)?;
            deps::ensure()?;
            emulator::check_bochs_cpu(&bochs_cpu)?;
            let profile = image_builder::profile::run(
                &bench::BenchRun {
                    cpu_model: bochs_cpu,
                    build: BuildOptions {
                        line_tables: true,
                        ..BuildOptions::default()
                    },
                    cmdline,
                    guest_options: String::new(),
                    timeout: Duration::from_secs(timeout),
                },
                &key,
            )?;
            print!("{}", profile.report(top, listing));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            json,
            bochs_cpu,
            cmdline,
            timeout,
        } => {
            deps::ensure()?;
            emulator::check_bochs_cpu(&bochs_cpu)?;
            let bench_run = bench::BenchRun {
                cpu_model: bochs_cpu.clone(),
                build: BuildOptions::default(),
                cmdline,
                guest_options: String::new(),
                timeout: Duration::from_secs(timeout),
            };
            let mut figures = bench::run(&bench_run)?;
            figures.extend(bench::linux_figures(&bench_run)?);
            if json {
                println!("{}", bench::to_json_with_targets(&bochs_cpu, &figures));
            } else {
                println!("model: {bochs_cpu} (Bochs; ticks are emulated instructions)");
                for (k, v) in &figures {
                    match v {
                        Some(n) => println!("  {k:<32} {n:>10}"),
                        None => println!("  {k:<32} {:>10}", "n/a"),
                    }
                }
                for (target, ok) in bench::check_targets(&figures) {
                    let verdict = match ok {
                        Some(true) => "met",
                        Some(false) => "NOT met",
                        None => "not measured (this CPU lacks the feature)",
                    };
                    println!("  target {target}: {verdict}");
                }
            }
            // A missed target fails the command (a figure that could not be
            // measured already did, in `bench::figures`).
            let missed = bench::missed_targets(&figures);
            if missed.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("targets missed: {}", missed.join("; "));
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// `cargo hv ctl`.
/// `cargo hv ctl share ...` (docs/sharing.md).
fn share_cmd(console: &mut Client<UnixStream>, cmd: ShareCmd) -> Result<()> {
    use control::sharing as sh;
    match cmd {
        ShareCmd::Nominate { domain, gfn, json } => {
            let id = console.domain_id(&domain)?;
            let (handle, refs, free) = console.share_nominate(id, gfn)?;
            if json {
                println!(
                    "{{\"domain\":{id},\"gfn\":{gfn},\"handle\":{handle},\"refs\":{refs},\"free\":{free}}}"
                );
            } else {
                println!(
                    "domain {id} gfn {gfn:#x}: handle {handle:#x} ({refs} reference(s); {free} frames free)"
                );
            }
        }
        ShareCmd::Share {
            source,
            client,
            json,
        } => {
            let (refs, free) = console.share_pages(source, client)?;
            if json {
                println!(
                    "{{\"source\":{source},\"client\":{client},\"refs\":{refs},\"free\":{free}}}"
                );
            } else {
                println!("shared: {refs} reference(s) to the frame; {free} frames free");
            }
        }
        ShareCmd::Unshare { domain, gfn, json } => {
            let id = console.domain_id(&domain)?;
            let (refs, free) = console.share_unshare(id, gfn)?;
            if json {
                println!("{{\"domain\":{id},\"gfn\":{gfn},\"refs\":{refs},\"free\":{free}}}");
            } else {
                println!(
                    "domain {id} gfn {gfn:#x}: unshared ({refs} reference(s) left on the frame; {free} frames free)"
                );
            }
        }
        ShareCmd::Scan {
            domains,
            batch,
            json,
        } => {
            let ids = domains
                .iter()
                .map(|d| console.domain_id(d))
                .collect::<Result<Vec<u16>, _>>()?;
            let start = Instant::now();
            let (pages, saved) = console.share_scan(&ids, batch)?;
            let secs = start.elapsed().as_secs_f64();
            let list: Vec<String> = ids.iter().map(u16::to_string).collect();
            if json {
                println!(
                    "{{\"domains\":[{}],\"pages\":{pages},\"saved\":{saved},\"seconds\":{secs:.3}}}",
                    list.join(",")
                );
            } else {
                println!(
                    "scanned {pages} pages of domain(s) {}: {saved} frame(s) saved ({secs:.1} s)",
                    list.join(", ")
                );
            }
        }
        ShareCmd::Status { json } => {
            let s = console.share_status()?;
            if json {
                println!("{}", sh::status_json(&s));
            } else {
                println!("{}", sh::status_line(&s));
            }
        }
    }
    Ok(())
}

fn ctl(conn: &ConnArgs, command: CtlCmd) -> Result<ExitCode> {
    if let CtlCmd::Logs = command {
        let socket = conn.socket.clone().unwrap_or_else(default_control_socket);
        return follow_log(&socket);
    }
    let mut console = conn.connect()?;
    match command {
        CtlCmd::Services => {
            let services = console.services()?;
            print!("{}", control::services_table(&services));
            if services.is_empty() {
                eprintln!("(the console lists no services)");
            }
        }
        CtlCmd::Domains => {
            let domains = console.domains()?;
            print!("{}", control::domains_table(&domains));
            if domains.is_empty() {
                eprintln!("(the console lists no domains)");
            }
        }
        CtlCmd::Pause { domain } => {
            let id = console.domain_id(&domain)?;
            pause_or_unpause(&mut console, id, DomainOp::Pause)?;
            println!("domain {id} paused");
        }
        CtlCmd::Unpause { domain } => {
            let id = console.domain_id(&domain)?;
            pause_or_unpause(&mut console, id, DomainOp::Unpause)?;
            println!("domain {id} unpaused");
        }
        CtlCmd::Destroy { domain } => {
            let id = console.domain_id(&domain)?;
            destroy(&mut console, id)?;
            println!("domain {id} destroyed");
        }
        CtlCmd::Fork { domain, name } => {
            let parent = console.domain_id(&domain)?;
            let id = match console.fork(parent, name.as_deref().unwrap_or("")) {
                Ok(id) => id,
                Err(e) => {
                    return Err(domain_refusal(&mut console, e, parent, |_| {
                        format!(
                            " (domain {parent} must be paused, with no exit in a service's hands: `cargo hv ctl pause {parent}`, then try again)"
                        )
                    }));
                }
            };
            println!("domain {id} forked from domain {parent} (paused)");
        }
        CtlCmd::Reset { child } => {
            let id = console.domain_id(&child)?;
            console
                .domain_control(id, DomainOp::Reset)
                .map_err(|e| {
                    let hint = if kernel_refused(&e, SysError::BadArgument) {
                        format!(" (a reset takes a fork back to its parent: domain {id} is no fork made by `cargo hv ctl fork`, or its parent has ended)")
                    } else if kernel_refused(&e, SysError::Busy) {
                        format!(" (domain {id} must be paused or ended, with no exit in a service's hands: `cargo hv ctl pause {id}`, then try again)")
                    } else {
                        String::new()
                    };
                    anyhow::anyhow!("{e}{hint}")
                })?;
            println!("domain {id} reset to its parent (paused)");
        }
        CtlCmd::Fault { service } => {
            console.inject_fault(&service)?;
            println!("fault injected into {service}");
        }
        CtlCmd::Logs => unreachable!("handled before connecting"),
        CtlCmd::Console { domain } => {
            let socket = conn.socket.clone().unwrap_or_else(default_control_socket);
            return attach_console(console, &socket, &domain);
        }
        CtlCmd::Altp2m(cmd) => return altp2m_cmd(&mut console, cmd),
        CtlCmd::Logdirty(cmd) => return logdirty_cmd(&mut console, cmd),
        CtlCmd::Mem(cmd) => mem_cmd(&mut console, cmd)?,
        CtlCmd::Share(cmd) => share_cmd(&mut console, cmd)?,
        CtlCmd::Regs {
            domain,
            vcpu,
            set,
            json,
        } => {
            use control::introspect as intro;
            let id = console.domain_id(&domain)?;
            if !set.is_empty() {
                console.set_regs(id, vcpu, &set)?;
            }
            let values = console.regs(id, vcpu)?;
            if json {
                println!("{}", intro::regs_json(id, vcpu, &values));
            } else {
                print!("{}", intro::regs_table(&values));
            }
        }
        CtlCmd::Events => {
            let version = console.hello()?;
            eprintln!(
                "connected to the console (protocol version {version}); printing events until interrupted"
            );
            let start = Instant::now();
            let mut dropped = 0;
            let mut out = std::io::stdout();
            loop {
                let event = console.next_event(Duration::from_secs(1))?;
                let at = start.elapsed().as_secs_f64();
                if let Some(e) = event {
                    writeln!(out, "{at:9.3} s  {}", control::describe_event(&e))?;
                }
                let now = console.stats().dropped.frames();
                if now > dropped {
                    writeln!(
                        out,
                        "{at:9.3} s  (this tool dropped {} frame(s) from the console that did not decode)",
                        now - dropped
                    )?;
                    dropped = now;
                }
                out.flush()?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn on_off(s: &str) -> Result<bool> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => bail!("{s:?}: say on or off"),
    }
}

/// `image` linked (or, across file systems, copied) into `dir` as
/// `image.iso`.
fn own_copy(image: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let own = dir.join("image.iso");
    let _ = std::fs::remove_file(&own);
    if std::fs::hard_link(image, &own).is_err() {
        std::fs::copy(image, &own)
            .with_context(|| format!("copying {} to {}", image.display(), own.display()))?;
    }
    Ok(own)
}

/// The exit status of a command ended by Ctrl-C (128 + SIGINT).
const INTERRUPTED: u8 = 130;

/// Set by the first SIGINT, SIGTERM or SIGHUP once [`stop_on_signals`] ran: the
/// command stops waiting and undoes what it set up. A second signal ends
/// the process at once.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    if STOP.swap(true, std::sync::atomic::Ordering::Relaxed) {
        // Safety: `_exit` is async-signal-safe.
        unsafe { libc::_exit(i32::from(INTERRUPTED)) };
    }
}

/// Makes Ctrl-C (and SIGTERM, and SIGHUP: its terminal closed) raise
/// [`STOP`] instead of ending the process, for a command that must end in
/// order: a watch undoes its view and listener (a watch whose terminal
/// closed, ended by SIGHUP, left the domain's next violation waiting for
/// an answer nobody gave), a run stops its emulator and says where its
/// capture is.
/// Reads interrupted by the signal go on (`SA_RESTART`), and the command
/// looks at the flag between them.
fn stop_on_signals() -> &'static std::sync::atomic::AtomicBool {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // Safety: a zeroed `sigaction` is a valid one to fill in; the
        // handler only swaps an atomic and may call `_exit`, both
        // async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    &STOP
}

/// `cargo hv ctl altp2m ...`.
fn altp2m_cmd(c: &mut Client<UnixStream>, cmd: AltCmd) -> Result<ExitCode> {
    use control::altp2m::{AltRequest, NoListener, Reply, Request};
    let letters =
        |a: control::altp2m::Access| control::altp2m::access_letters(a.read, a.write, a.execute);
    match cmd {
        AltCmd::Mode { domain, mode } => {
            c.altp2m_done(AltRequest::SetMode { domain, mode })?;
            println!("domain {domain}: altp2m mode {mode:?}");
        }
        AltCmd::OnViolation { domain, policy } => {
            let policy = match policy.as_str() {
                "crash" => NoListener::Crash,
                "pause" => NoListener::Pause,
                _ => bail!("{policy:?}: say crash or pause"),
            };
            c.altp2m_done(AltRequest::SetNoListener { domain, policy })?;
            println!("domain {domain}: with no listener, a violation will {policy:?}");
        }
        AltCmd::ViewCreate { domain, access } => {
            match c.view_request(
                domain,
                Request::ViewCreate {
                    default_access: access,
                },
            )? {
                Reply::View(v) => println!("{v}"),
                other => bail!("unexpected answer {other:?}"),
            }
        }
        AltCmd::ViewDestroy { domain, view } => {
            c.view_request(domain, Request::ViewDestroy { view })?;
            println!("domain {domain}: view {view} destroyed");
        }
        AltCmd::Visible {
            domain,
            view,
            state,
        } => {
            let visible = on_off(&state)?;
            c.view_request(domain, Request::ViewSetVisible { view, visible })?;
            println!("domain {domain}: view {view} visible to VMFUNC: {state}");
        }
        AltCmd::Switch { domain, view } => {
            c.view_request(domain, Request::ViewSwitchAll { view })?;
            println!("domain {domain}: every vCPU in view {view}");
        }
        AltCmd::SetAccess {
            domain,
            view,
            gfn,
            access,
            count,
        } => {
            let request = if count == 1 {
                Request::SetAccess { view, gfn, access }
            } else {
                Request::SetAccessRange {
                    view,
                    gfn,
                    count,
                    access,
                }
            };
            c.view_request(domain, request)?;
            println!(
                "domain {domain}: view {view}: {count} page(s) from gfn {gfn:#x} now {}",
                letters(access)
            );
        }
        AltCmd::Shadow { domain, count } => {
            let gfn = c.shadow_frames(domain, count)?;
            println!("{gfn:#x}");
        }
        AltCmd::Relaxing {
            domain,
            view,
            gfn,
            relaxing,
        } => {
            c.view_request(
                domain,
                Request::SetAccessRelaxing {
                    view,
                    gfn,
                    relaxing,
                },
            )?;
            println!("domain {domain}: view {view}: gfn {gfn:#x} now {relaxing:?}");
        }
        AltCmd::ChangeGfn {
            domain,
            view,
            gfn,
            to,
        } => {
            c.view_request(domain, Request::ChangeGfn { view, gfn, to })?;
            match to {
                Some(t) => println!(
                    "domain {domain}: view {view}: gfn {gfn:#x} maps the frame of gfn {t:#x}"
                ),
                None => {
                    println!("domain {domain}: view {view}: gfn {gfn:#x} maps its own frame again")
                }
            }
        }
        AltCmd::Sve {
            domain,
            view,
            gfn,
            state,
        } => {
            let suppress = on_off(&state)?;
            c.view_request(
                domain,
                Request::SetSuppressVe {
                    view,
                    gfn,
                    suppress,
                },
            )?;
            println!("domain {domain}: view {view}: gfn {gfn:#x} suppress-#VE {state}");
        }
        AltCmd::Get {
            domain,
            view,
            gfn,
            raw,
        } => match c.view_request(domain, Request::GetEntry { view, gfn, raw })? {
            Reply::Entry(e) => match e.frame_gfn {
                Some(f) => println!(
                    "view {view} gfn {gfn:#x}: frame of gfn {f:#x}, access {}, suppress-#VE {}",
                    letters(e.access),
                    if e.suppress_ve { "on" } else { "off" }
                ),
                None => println!(
                    "view {view} gfn {gfn:#x}: not populated (suppress-#VE {})",
                    if e.suppress_ve { "on" } else { "off" }
                ),
            },
            other => bail!("unexpected answer {other:?}"),
        },
        AltCmd::Listen {
            domain,
            state,
            gfns,
            kinds,
        } => {
            let on = on_off(&state)?;
            if on && (gfns.is_some() || kinds.is_some()) {
                let mut filter = control::altp2m::Filter::ALL;
                if let Some(g) = gfns {
                    let (first, end) = g
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("--gfns {g:?}: say FIRST:END"))?;
                    filter.first = number(first).map_err(anyhow::Error::msg)?;
                    filter.end = number(end).map_err(anyhow::Error::msg)?;
                }
                if let Some(k) = kinds {
                    filter.kinds =
                        u8::from(k.read) | u8::from(k.write) << 1 | u8::from(k.execute) << 2;
                }
                c.altp2m_done(AltRequest::ListenFor { domain, filter })?;
            } else {
                c.altp2m_done(AltRequest::Listen { domain, on })?;
            }
            println!(
                "domain {domain}: the console is {}its violation listener",
                if on { "" } else { "no longer " }
            );
        }
        AltCmd::Answer { event, action } => {
            c.altp2m_done(AltRequest::Answer { event, action })?;
            println!("event {event} answered: {action:?}");
        }
        AltCmd::Watch {
            domain,
            gfn,
            access,
            answer,
            count,
            wait,
        } => {
            let w = control::altp2m::PageWatch {
                domain,
                gfn,
                access,
                answer,
                count,
                patience: Duration::from_secs_f64(wait),
                stop: Some(stop_on_signals()),
            };
            let mut out = std::io::stdout();
            eprintln!(
                "setting up a watch of gfn {gfn:#x} of domain {domain} ({} there; each violation to be answered with {answer:?})",
                letters(access)
            );
            let n = c.watch_page(&w, |e, view| {
                let _ = writeln!(out, "view {view}: {}", control::altp2m::describe_event(e));
                let _ = out.flush();
            })?;
            if STOP.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "interrupted: {n} violation(s) seen and answered; the view is gone, domain {domain} is back in view 0 and nobody listens to it"
                );
                return Ok(ExitCode::from(INTERRUPTED));
            }
            eprintln!("{n} violation(s) seen and answered; the view is gone");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cargo hv ctl mem ...`.
fn mem_cmd(c: &mut Client<UnixStream>, cmd: MemCmd) -> Result<()> {
    use control::introspect as intro;
    match cmd {
        MemCmd::Read { at, len, json, out } => {
            let domain = c.domain_id(&at.domain)?;
            let len = usize::try_from(len).context("length")?;
            let started = std::time::Instant::now();
            // What lies before a refusal (the end of RAM, a hole) is shown
            // too, then the refusal.
            let (bytes, end) = c.mem_read_prefix(domain, at.address(), len);
            let end = match end {
                Err(e) if bytes.is_empty() => return Err(e.into()),
                end => end,
            };
            if let Some(path) = out {
                std::fs::write(&path, &bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!(
                    "{} bytes to {} in {:.2} s",
                    bytes.len(),
                    path.display(),
                    started.elapsed().as_secs_f64()
                );
            } else if json {
                println!("{}", intro::read_json(domain, at.address(), &bytes));
            } else {
                print!("{}", intro::hex_dump(at.address, &bytes));
            }
            end.with_context(|| {
                format!(
                    "{} of the {len} bytes were read, up to {:#x}; then",
                    bytes.len(),
                    at.address.wrapping_add(bytes.len() as u64)
                )
            })?;
        }
        MemCmd::Write { at, bytes } => {
            let bytes = intro::parse_hex(&bytes).map_err(anyhow::Error::msg)?;
            let domain = c.domain_id(&at.domain)?;
            c.mem_write(domain, at.address(), &bytes)?;
            println!(
                "domain {domain}: {} bytes written at {:#x}",
                bytes.len(),
                at.address
            );
        }
        MemCmd::Translate {
            domain,
            gva,
            vcpu,
            cr3,
            json,
        } => {
            let id = c.domain_id(&domain)?;
            let t = c.translate(id, vcpu, cr3, gva)?;
            if json {
                println!("{}", intro::translation_json(id, gva, &t));
            } else {
                println!("{}", intro::translation_line(gva, &t));
            }
        }
    }
    Ok(())
}

/// `cargo hv ctl logdirty ...`.
fn logdirty_cmd(c: &mut Client<UnixStream>, cmd: LdCmd) -> Result<ExitCode> {
    use control::logdirty::{self as ld, mechanism_name, range_line};
    let (LdCmd::Start { log: args, .. }
    | LdCmd::Read(args)
    | LdCmd::Peek(args)
    | LdCmd::Status(args)
    | LdCmd::Stop(args)) = &cmd;
    let (log, json) = (args.log, args.json);
    let domain = c.domain_id(&args.domain)?;
    let mut out = std::io::stdout();
    match cmd {
        LdCmd::Start { range, mode, .. } => {
            let s = c.logdirty_start(domain, log, range, mode)?;
            if json {
                writeln!(out, "{}", ld::started_json(domain, log, &s))?;
            } else {
                writeln!(
                    out,
                    "domain {domain} (log {log}): logging {} with {}",
                    range_line(&s.range),
                    mechanism_name(s.mechanism)
                )?;
            }
        }
        LdCmd::Read(_) | LdCmd::Peek(_) => {
            let clear = matches!(cmd, LdCmd::Read(_));
            let ranges = c.logdirty_ranges(domain, log, clear)?;
            if json {
                writeln!(out, "{}", ld::dirty_json(domain, log, clear, &ranges))?;
            } else {
                for r in &ranges {
                    writeln!(out, "{}", range_line(r))?;
                }
                writeln!(
                    out,
                    "{} (domain {domain}, log {log}; {})",
                    dirty_total(&ranges),
                    if clear { "cleared" } else { "not cleared" }
                )?;
            }
        }
        LdCmd::Status(_) => {
            let s = c.logdirty_status(domain, log)?;
            if json {
                writeln!(out, "{}", ld::status_json(domain, log, &s))?;
            } else {
                writeln!(
                    out,
                    "domain {domain} (log {log}): {} over {}; {} set",
                    mechanism_name(s.mechanism),
                    range_line(&s.range),
                    plural(s.dirty, "page", "pages")
                )?;
            }
        }
        LdCmd::Stop(_) => {
            c.logdirty_stop(domain, log)?;
            if json {
                writeln!(out, "{}", ld::stopped_json(domain, log))?;
            } else {
                writeln!(out, "domain {domain} (log {log}): stopped")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `1 page`, `27 pages`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The last line of a read: `total: 27 pages in 12 ranges`.
fn dirty_total(ranges: &[control::logdirty::GfnRange]) -> String {
    let pages = control::logdirty::pages(ranges);
    if ranges.is_empty() {
        return "total: 0 pages".into();
    }
    format!(
        "total: {} in {}",
        plural(pages, "page", "pages"),
        plural(ranges.len() as u64, "range", "ranges")
    )
}

/// The default run's demonstration of altp2m: a guest that prints `watch
/// me: gfn 0xN` has that page watched by the host, as an external agent
/// through the control channel (a view where the page is read-execute; each
/// write reported, then allowed once).
fn watch_announced_pages(lines: &std::sync::mpsc::Receiver<logs::LogLine>, socket: &Path) {
    while let Ok(l) = lines.recv() {
        let Some(domain) = l
            .source
            .strip_prefix("dom")
            .and_then(|d| d.parse::<u16>().ok())
        else {
            continue;
        };
        let Some(gfn) = l
            .text
            .split("watch me: gfn 0x")
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_hexdigit()).next())
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        let mut c = match Client::connect(socket) {
            Ok(c) => c.with_timeout(Duration::from_secs(60)),
            Err(e) => {
                eprintln!("host: cannot watch gfn {gfn:#x} of domain {domain}: {e}");
                continue;
            }
        };
        let w = control::altp2m::PageWatch {
            domain,
            gfn,
            access: control::altp2m::Access::RX,
            answer: control::altp2m::Action::AllowOnce,
            count: None,
            patience: Duration::from_secs(30),
            stop: None,
        };
        let mut first = true;
        let result = c.watch_page(&w, |e, view| {
            if first {
                println!(
                    "host     >>> watching gfn {gfn:#x} of domain {domain} through view {view}, where it is read-execute"
                );
                first = false;
            }
            println!(
                "host     >>> domain {} wrote gpa {:#x} (linear {}, rip {:#x}) in view {view}: allowed once",
                e.domain,
                e.gpa,
                e.gla.map_or("?".into(), |g| format!("{g:#x}")),
                e.rip
            );
        });
        match result {
            Ok(n) => println!("host     >>> {n} write(s) to gfn {gfn:#x} seen; view removed"),
            // The machine stopped (every domain ended) while we watched.
            Err(control::ClientError::Closed { .. }) => {}
            Err(e) => eprintln!("host: watching gfn {gfn:#x} of domain {domain} ended: {e}"),
        }
    }
}

/// `cargo hv ctl logs`: the log of the run that serves `socket`, decoded,
/// from its start, followed until the system halts or the run ends.
fn follow_log(socket: &Path) -> Result<ExitCode> {
    let pointer = socket.with_extension("capture");
    let capture = match std::fs::read(&pointer) {
        Ok(p) => PathBuf::from(String::from_utf8_lossy(&p).into_owned()),
        Err(_) => bail!(
            "no run serves {} (cargo hv run writes {} while it runs)",
            socket.display(),
            pointer.display()
        ),
    };
    let mut file = std::fs::File::open(&capture)
        .with_context(|| format!("cannot open the run's capture {}", capture.display()))?;
    let mut demux = logs::Demux::new();
    let mut decoder = logs::Decoder::new(image::current_elfs()?);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = std::io::stdout();
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        let ended = n == 0 && !pointer.exists();
        let mut events = Vec::new();
        demux.push(&buf[..n], &mut events);
        if ended {
            demux.finish(&mut events);
        }
        for e in &events {
            for l in decoder.lines(e) {
                writeln!(out, "{l}")?;
            }
        }
        out.flush()?;
        if let Some(status) = decoder.halt {
            return Ok(ExitCode::from(status));
        }
        if ended {
            eprintln!("the run ended without a halt record");
            return Ok(ExitCode::from(image_builder::NO_HALT));
        }
        if n == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Ctrl-]: leaves `cargo hv ctl console` (as telnet's escape).
const DETACH: u8 = 0x1d;

/// `cargo hv ctl console DOMAIN`: stdin to the domain's COM1 receiver, its
/// console lines (from the run's capture, as `ctl logs` reads it) to
/// stdout.
fn attach_console(
    mut console: Client<UnixStream>,
    socket: &Path,
    domain: &str,
) -> Result<ExitCode> {
    let id = console.domain_id(domain)?;
    // Refused here, before anything is read: a domain the vmm keeps no
    // COM1 for.
    console.console_input_once(id, b"")?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pointer = socket.with_extension("capture");
    let shown = match open_capture(&pointer) {
        Some((file, start)) => {
            let done = done.clone();
            Some(std::thread::spawn(move || {
                show_domain_lines(file, start, id, tty, &done)
            }))
        }
        None => {
            eprintln!(
                "no run capture beside the socket ({}): the domain's output is not shown (`cargo hv run` shows it)",
                pointer.display()
            );
            None
        }
    };
    let raw = tty.then(RawTerminal::enter).transpose()?;
    if tty {
        eprintln!("attached to domain {id}'s COM1 (Ctrl-] leaves)\r");
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    let sent = loop {
        let n = match std::io::Read::read(&mut stdin, &mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(anyhow::anyhow!("reading stdin: {e}")),
        };
        let bytes = &buf[..n];
        let (bytes, leave) = match bytes.iter().position(|&b| tty && b == DETACH) {
            Some(at) => (&bytes[..at], true),
            None => (bytes, false),
        };
        if let Err(e) = console.console_input(id, bytes) {
            break Err(e.into());
        }
        if leave {
            break Ok(());
        }
    };
    drop(raw);
    if sent.is_ok() && !tty {
        // Piped input: the guest's answer is shown until the domain ends.
        loop {
            let domains = match console.domains() {
                Ok(d) => d,
                Err(control::ClientError::Closed { .. }) => {
                    eprintln!("the run ended");
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            match domains.iter().find(|d| d.id == id) {
                Some(d) if DomainState::live(u64::from(d.state)) => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Some(d) => {
                    eprintln!(
                        "domain {id} ended ({}, status {})",
                        control::domain_state(d.state),
                        d.exit_status
                    );
                    break;
                }
                None => break,
            }
        }
        // Its last lines, on their way through the log.
        std::thread::sleep(Duration::from_secs(1));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(shown) = shown {
        let _ = shown.join();
    }
    sent?;
    Ok(ExitCode::SUCCESS)
}

/// The run's capture (named in `pointer`, beside the socket, by `cargo hv
/// run`) and its length now: where the lines of an attached console begin.
fn open_capture(pointer: &Path) -> Option<(std::fs::File, u64)> {
    let path = PathBuf::from(String::from_utf8_lossy(&std::fs::read(pointer).ok()?).into_owned());
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    Some((file, len))
}

/// Prints domain `id`'s console lines that the capture gets past byte
/// `start` (each ended by CR LF where the terminal is raw), until `done`
/// and the capture read to its end.
fn show_domain_lines(
    mut file: std::fs::File,
    start: u64,
    id: u16,
    raw: bool,
    done: &std::sync::atomic::AtomicBool,
) {
    let Ok(elfs) = image::current_elfs() else {
        eprintln!("the build's ELF files are missing: the domain's output is not shown");
        return;
    };
    let source = format!("dom{id}");
    let (mut demux, mut decoder) = (logs::Demux::new(), logs::Decoder::new(elfs));
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = std::io::stdout();
    // What was there before: decoded (frames run on), not shown.
    let mut history = start;
    loop {
        let want = if history > 0 {
            buf.len().min(history as usize)
        } else {
            buf.len()
        };
        let n = std::io::Read::read(&mut file, &mut buf[..want]).unwrap_or(0);
        let old = history > 0;
        history = history.saturating_sub(n as u64);
        let mut events = Vec::new();
        demux.push(&buf[..n], &mut events);
        for e in &events {
            for l in decoder.lines(e) {
                if !old && l.source == source {
                    let _ = write!(out, "{}{}", l.text, if raw { "\r\n" } else { "\n" });
                }
            }
        }
        let _ = out.flush();
        if n == 0 {
            if done.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A terminal in raw mode (each byte as it is typed, no echo) until dropped.
struct RawTerminal {
    saved: String,
}

impl RawTerminal {
    fn enter() -> Result<Self> {
        let stty = |args: &[&str]| {
            std::process::Command::new("stty")
                .args(args)
                .stdin(std::process::Stdio::inherit())
                .output()
                .context("running stty")
        };
        let saved = stty(&["-g"])?;
        if !saved.status.success() {
            bail!("stty -g failed: {}", String::from_utf8_lossy(&saved.stderr));
        }
        stty(&["raw", "-echo"])?;
        Ok(Self {
            saved: String::from_utf8_lossy(&saved.stdout).trim().to_owned(),
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty")
            .arg(&self.saved)
            .stdin(std::process::Stdio::inherit())
            .status();
    }
}

/// `cargo hv swap NAME PATH`: everything is checked before anything is sent.
fn swap(name: &str, path: &Path, conn: &ConnArgs) -> Result<ExitCode> {
    control::service_name(name)?;
    let elf = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "the ELF to swap into {name}, {}, does not exist",
                path.display()
            )
        }
        Err(e) => bail!("cannot read the ELF to swap in, {}: {e}", path.display()),
    };
    if let Some(why) = elf::header_problem(&elf) {
        bail!("{} is {why}; nothing was sent", path.display());
    }
    // The running `cargo hv run` decodes the new instance's log with the full
    // file; the system gets only what loading it needs.
    if let Err(e) = logs::store_elf(&elf) {
        eprintln!("note: {e:#}: the new instance's log lines will not decode");
    }
    let full = elf.len();
    let elf = elf::strip_service(&elf)
        .with_context(|| format!("{} cannot be prepared for a swap", path.display()))?;
    control::check_swap_size(name, elf.len())?;
    eprintln!("sending {} bytes (the loadable parts of {full})", elf.len());
    let mut console = conn.connect()?;
    let tty = std::io::stderr().is_terminal();
    let (start, mut told) = (Instant::now(), 0);
    let generation = console.swap_with_progress(name, &elf, |sent, total| {
        if tty {
            eprint!("\rsending {}: {sent} of {total} bytes", path.display());
        } else if let tenth = sent * 10 / total.max(1)
            && tenth > told
        {
            // Without a terminal (a log, a CI job): a line each tenth.
            told = tenth;
            eprintln!(
                "sending {}: {sent} of {total} bytes ({told}0 %, {:.0} s)",
                path.display(),
                start.elapsed().as_secs_f64()
            );
        }
    })?;
    if tty {
        eprintln!();
    }
    println!(
        "swapped {name}: {} ({full} bytes), now generation {generation}",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether `v` is a number of seconds above 0 and at most `max` (NaN,
/// infinities and negatives are not: they make no `Duration`, or one that
/// ends a wait at once).
fn seconds_in(v: f64, max: f64) -> bool {
    v.is_finite() && v > 0.0 && v <= max
}

/// `watch --wait`: seconds, at most 1,000,000 ([`seconds_in`]).
fn watch_wait(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if seconds_in(w, 1e6) => Ok(w),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 and at most 1000000"
        )),
    }
}

/// The crates (directory names) directly under `dir`.
fn crate_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("Cargo.toml").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The service packages with a library (their logic, tested on the host).
/// The whole suite: the doc tests, then every test binary of the host
/// crates and of the services' libraries as jobs on every core, longest
/// first ([`suite`]); a summary at the end.
fn test_suite() -> Result<ExitCode> {
    let start = Instant::now();
    let cargo = || {
        let mut c = image_builder::compile::cargo();
        c.current_dir(paths::repo());
        c
    };
    let doc = cargo()
        .args(["test", "--doc"])
        .status()
        .context("running cargo test --doc")?;
    let mut jobs = suite::build(cargo(), &[])?;
    let libs = service_libs();
    let mut args = vec!["--lib"];
    for l in &libs {
        args.extend(["-p", l.as_str()]);
    }
    jobs.extend(suite::build(cargo(), &args)?);
    let times_file = paths::target_dir().join("test-times");
    let times = suite::parse_times(&std::fs::read_to_string(&times_file).unwrap_or_default());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "running {} test binaries on {workers} workers, longest first (times in {})",
        jobs.len(),
        times_file.display()
    );
    let outcomes = suite::run(
        suite::order(jobs, &times),
        workers,
        &[],
        &paths::target_dir().join("test-logs"),
    );
    let _ = std::fs::write(&times_file, suite::times_text(&outcomes, &times));
    let passed: u64 = outcomes.iter().map(|o| o.passed).sum();
    let failed: u64 = outcomes.iter().map(|o| o.failed).sum();
    let bad: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.job.name.as_str())
        .collect();
    let secs = start.elapsed().as_secs();
    println!(
        "\nsuite: {passed} passed, {failed} failed in {} test binaries (and the doc tests: {}), {} min {} s",
        outcomes.len(),
        if doc.success() { "ok" } else { "FAILED" },
        secs / 60,
        secs % 60
    );
    if !bad.is_empty() {
        println!(
            "suite: FAILED: {} (logs in {})",
            bad.join(", "),
            paths::target_dir().join("test-logs").display()
        );
    }
    Ok(if bad.is_empty() && doc.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn service_libs() -> Vec<String> {
    let services = paths::repo().join("services");
    crate_dirs(&services)
        .into_iter()
        .filter(|d| services.join(d).join("src").join("lib.rs").is_file())
        .map(|d| format!("service-{d}"))
        .collect()
}

/// `cargo fmt --check`, then clippy with warnings as errors on the host crates
/// and on the bare-metal ones.
fn lint() -> Result<()> {
    deps::ensure_target()?;
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
    // The services' logic is host-tested too (their binaries are not).
    let mut libs: Vec<&str> = vec!["clippy", "--lib", "--tests"];
    let service_libs = service_libs();
    for p in &service_libs {
        libs.extend(["-p", p]);
    }
    libs.extend(["--", "-D", "warnings"]);
    run("clippy (service logic on the host)", &libs)?;
    // The kernel, every service and every test guest.
    let mut bare: Vec<String> = vec!["-p".into(), "kernel".into()];
    for dir in crate_dirs(&paths::repo().join("services")) {
        bare.push("-p".into());
        bare.push(format!("service-{dir}"));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use control::logdirty::{DirtyMode, GfnRange};

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut all = vec!["cargo hv"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map_err(|e| e.to_string())
    }

    fn logdirty(args: &[&str]) -> LdCmd {
        let mut all = vec!["ctl", "logdirty"];
        all.extend_from_slice(args);
        match parse(&all) {
            Ok(Cli {
                command:
                    Cmd::Ctl {
                        command: CtlCmd::Logdirty(cmd),
                        ..
                    },
            }) => cmd,
            Ok(_) => panic!("not a logdirty command"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn logdirty_start_takes_a_range_a_mode_and_a_log_number() {
        let LdCmd::Start { log, range, mode } = logdirty(&[
            "start",
            "hello",
            "--range",
            "0x1000:256",
            "--mode",
            "wp",
            "--log",
            "0x10",
            "--json",
        ]) else {
            panic!("not start");
        };
        assert_eq!(
            (log.domain.as_str(), log.log, log.json),
            ("hello", 16, true)
        );
        assert_eq!(
            range,
            Some(GfnRange {
                gfn: 0x1000,
                count: 256
            })
        );
        assert_eq!(mode, DirtyMode::WriteProtect);
        // The defaults: all RAM, auto, log 0, text.
        let LdCmd::Start { log, range, mode } = logdirty(&["start", "2"]) else {
            panic!("not start");
        };
        assert_eq!((log.domain.as_str(), log.log, log.json), ("2", 0, false));
        assert_eq!((range, mode), (None, DirtyMode::Auto));
        let LdCmd::Start { range, .. } = logdirty(&["start", "2", "--range", "4096:16"]) else {
            panic!("not start");
        };
        assert_eq!(
            range,
            Some(GfnRange {
                gfn: 4096,
                count: 16
            })
        );
    }

    #[test]
    fn logdirty_read_peek_status_and_stop_take_a_domain_and_a_log() {
        for (word, want) in [("read", 0), ("peek", 1), ("status", 2), ("stop", 3)] {
            let cmd = logdirty(&[word, "agent", "--log", "7"]);
            let (got, args) = match &cmd {
                LdCmd::Read(a) => (0, a),
                LdCmd::Peek(a) => (1, a),
                LdCmd::Status(a) => (2, a),
                LdCmd::Stop(a) => (3, a),
                LdCmd::Start { .. } => panic!("{word} parsed as start"),
            };
            assert_eq!(got, want, "{word}");
            assert_eq!((args.domain.as_str(), args.log), ("agent", 7));
        }
    }

    #[test]
    fn bad_logdirty_arguments_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["start", "1", "--range", "0x1000"],
                "range \"0x1000\": say GFN:COUNT",
            ),
            (
                &["start", "1", "--range", "0x10:0"],
                "range 0x10:0x0: COUNT is 0, an empty range",
            ),
            (
                &["start", "1", "--range", "0xfffffffffffffff0:0x20"],
                "wraps past the last gfn",
            ),
            (
                &["start", "1", "--range", "zero:1"],
                "GFN \"zero\" is not a number (decimal, or hex with 0x)",
            ),
            (
                &["start", "1", "--mode", "dirty"],
                "mode \"dirty\": one of auto",
            ),
            (&["read", "1", "--log", "-1"], "unexpected argument '-1'"),
            (&["read", "1", "--log", "many"], "\"many\" is not a number"),
            (&["read", "1", "--log", "0x100000000"], "at most 4294967295"),
            (&["peek"], "<DOMAIN>"),
            (&["read", "1", "--range", "0:1"], "--range"),
            (&["status", "1", "--mode", "pml"], "--mode"),
            (&["watch", "1"], "watch"),
        ];
        for (args, want) in cases {
            let mut all = vec!["ctl", "logdirty"];
            all.extend_from_slice(args);
            match parse(&all) {
                Ok(_) => panic!("{args:?} parsed"),
                Err(e) => assert!(e.contains(want), "{args:?}: {e}"),
            }
        }
    }

    #[test]
    fn log_numbers_are_decimal_or_hex_u32() {
        assert_eq!(log_number("12"), Ok(12));
        assert_eq!(log_number("0xffffffff"), Ok(u32::MAX));
        assert!(log_number("4294967296").unwrap_err().contains("at most"));
        assert!(log_number("one").unwrap_err().contains("not a number"));
    }

    #[test]
    fn a_read_ends_with_its_total() {
        let r = |gfn, count| GfnRange { gfn, count };
        assert_eq!(dirty_total(&[]), "total: 0 pages");
        assert_eq!(dirty_total(&[r(5, 1)]), "total: 1 page in 1 range");
        assert_eq!(
            dirty_total(&[r(0x10, 16), r(0x100, 1)]),
            "total: 17 pages in 2 ranges"
        );
    }
}
