//! Booting an image: QEMU (BIOS or UEFI), Bochs, or QEMU with KVM, with the
//! log serial port captured to a file that is decoded while the machine runs.
//!
//! The second serial port (COM2, the control channel) of an image boot is
//! connected to the runner: before starting the emulator the runner listens
//! on a TCP port of 127.0.0.1 that it picks, and the emulator connects to it
//! as it starts (QEMU: `-chardev socket,host=127.0.0.1,port=P,server=off`
//! after the COM1 `-serial`; Bochs: `com2: mode=socket-client`). So the
//! runner owns the endpoint: nothing waits for a client, and no console
//! output is lost before one comes. The runner offers the stream on a unix
//! socket ([`RunConfig::control_socket_path`]) through
//! [`control::proxy`](crate::control::proxy).
//!
//! The run ends when the kernel's halt record arrives (then the emulator is
//! given a moment to exit by itself), when the emulator exits, or at the
//! timeout. Only the emulator process this module started is ever killed,
//! by its PID.

use crate::control::proxy::{Proxy, ProxySocket, ProxyStats};
use crate::logs::{Decoder, Demux, ElfSet, Event, LogLine};
use crate::paths;
use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// Bochs 2.7: emulates VMX with EPT, VMFUNC, #VE and PML.
    Bochs,
    /// QEMU with SeaBIOS (TCG: no VMX).
    Qemu,
    /// QEMU with OVMF (UEFI).
    QemuUefi,
    /// QEMU with KVM, where the host's KVM offers nested VMX.
    Kvm,
}

impl Machine {
    /// The default: KVM where it can run guests of guests, else Bochs.
    pub fn default_for_host() -> Self {
        if kvm_nested_vmx() {
            Machine::Kvm
        } else {
            Machine::Bochs
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Machine::Bochs => "bochs",
            Machine::Qemu => "qemu",
            Machine::QemuUefi => "qemu-uefi",
            Machine::Kvm => "kvm",
        }
    }
}

/// Whether /dev/kvm is usable and KVM offers VMX to its guests.
pub fn kvm_nested_vmx() -> bool {
    let nested = std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested")
        .map(|s| matches!(s.trim(), "Y" | "y" | "1"))
        .unwrap_or(false);
    nested
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub machine: Machine,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// Bochs CPU model (`cpu: model=`).
    pub bochs_cpu: String,
    /// QEMU: add an Intel IOMMU (VT-d) and the `edu` DMA test device.
    pub iommu: bool,
    /// QEMU: extra ACPI tables (`-acpitable file=`).
    pub acpi_tables: Vec<PathBuf>,
    /// QEMU: extra devices (`-device` arguments), e.g. a PCIe root port
    /// with a second edu behind it.
    pub qemu_devices: Vec<String>,
    /// Print each decoded line as it arrives.
    pub live: bool,
    /// Also send each decoded line here as it arrives (tests that act on a
    /// running system watch for lines this way).
    pub tap: Option<std::sync::mpsc::Sender<LogLine>>,
    /// Set to end the run early (the emulator is stopped; the run ends
    /// [`RunEnd::Stopped`]). A static: a signal handler may set it
    /// (`cargo hv run`'s Ctrl-C); a caller of its own leaks one.
    pub stop: Option<&'static std::sync::atomic::AtomicBool>,
    /// Where the raw serial capture goes.
    pub capture: PathBuf,
    /// Where an image boot offers its control channel (COM2) to clients;
    /// `None`: `ctl.sock` in the run's directory. See
    /// [`RunConfig::control_socket_path`].
    pub control_socket: Option<PathBuf>,
    /// Bochs: write a trace of every instruction run between the first two
    /// magic breakpoints (`xchg bx, bx`) to this file (`cargo hv profile`).
    pub trace: Option<PathBuf>,
}

impl RunConfig {
    pub fn new(machine: Machine, capture: PathBuf) -> Self {
        Self {
            machine,
            timeout: Duration::from_secs(120),
            memory_mib: 256,
            bochs_cpu: "corei7_skylake_x".to_owned(),
            iommu: false,
            acpi_tables: Vec::new(),
            qemu_devices: Vec::new(),
            live: false,
            tap: None,
            stop: None,
            capture,
            control_socket: None,
            trace: None,
        }
    }

    /// Refuses what this machine cannot be given (an IOMMU, ACPI tables or
    /// extra devices on Bochs; an ACPI table that is not a file), before
    /// anything is built or started.
    pub fn check(&self) -> Result<()> {
        if self.machine == Machine::Bochs
            && (self.iommu || !self.acpi_tables.is_empty() || !self.qemu_devices.is_empty())
        {
            bail!("Bochs has no IOMMU and takes no extra ACPI tables: use --on qemu for VT-d");
        }
        if let Some(t) = self.acpi_tables.iter().find(|t| !t.is_file()) {
            bail!("ACPI table {} does not exist", t.display());
        }
        Ok(())
    }

    /// The run's scratch directory (emulator configuration and logs).
    pub fn run_dir(&self) -> PathBuf {
        self.capture.with_extension("run")
    }

    /// The unix socket on which an image boot offers its control channel,
    /// from the emulator's start to its end: [`RunConfig::control_socket`],
    /// else `ctl.sock` in the run's directory, else (where that path is too
    /// long for a unix socket) one named after the run in the temporary
    /// directory.
    pub fn control_socket_path(&self) -> PathBuf {
        if let Some(p) = &self.control_socket {
            return p.clone();
        }
        let in_run_dir = self.run_dir().join("ctl.sock");
        if in_run_dir.as_os_str().len() < crate::control::proxy::SUN_PATH {
            return in_run_dir;
        }
        let run = self
            .capture
            .file_stem()
            .map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
        std::env::temp_dir().join(format!("parallax-{run}.sock"))
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The kernel sent its halt record with this status.
    Halted(u8),
    /// Nothing ended the run in time; the emulator was killed.
    TimedOut,
    /// The run was asked to end ([`RunConfig::stop`]: Ctrl-C on `cargo
    /// hv run`); the emulator was killed.
    Stopped,
    /// The emulator exited without a halt record.
    EmulatorExited { code: Option<i32> },
    /// The boot loader could not load the kernel (its `boot` lines say
    /// why: too little memory for the kernel and its modules, say); the
    /// emulator was stopped.
    BootLoaderFailed,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub machine: Machine,
    pub end: RunEnd,
    pub lines: Vec<LogLine>,
    pub capture: PathBuf,
    pub wall: Duration,
    /// Wall time from the emulator's start to the kernel's first record.
    pub first_kernel_record: Option<Duration>,
    /// Where the emulator's own log went (Bochs), for post-mortems.
    pub emulator_log: Option<PathBuf>,
    /// The emulator's own standard output and error.
    pub emulator_output: PathBuf,
    /// The control socket the run offered (`None`: a boot without COM2).
    pub control_socket: Option<PathBuf>,
    /// What crossed the control channel; `None` if the emulator never
    /// connected its COM2 (or the boot had none).
    pub control: Option<ProxyStats>,
}

impl RunOutcome {
    /// The process exit status `cargo hv run` ends with: the kernel's halt
    /// status; 124 after a timeout; otherwise what QEMU's exit port says, or 125.
    pub fn exit_code(&self) -> i32 {
        match self.end {
            RunEnd::Halted(s) => i32::from(s),
            RunEnd::TimedOut => 124,
            RunEnd::Stopped => 130,
            // QEMU's isa-debug-exit: status V exits with (V << 1) | 1;
            // but 1 (V = 0) is also QEMU's own failure (it could not
            // start: no memory for the guest, say), which it explains.
            RunEnd::EmulatorExited { code: Some(c) }
                if self.machine != Machine::Bochs
                    && c % 2 == 1
                    && self.emulator_gave_up().is_none() =>
            {
                (c - 1) / 2
            }
            RunEnd::EmulatorExited { .. } => i32::from(crate::NO_HALT),
            RunEnd::BootLoaderFailed => {
                i32::from(ipc_schema::halt::HaltStatus::BadBootInput.code())
            }
        }
    }

    /// What the emulator said, where it exited with a failure of its own
    /// rather than a status a guest wrote to QEMU's isa-debug-exit: Bochs's
    /// non-zero codes, QEMU's even ones, and QEMU's 1 (which is also
    /// status 0's) where its output has its own `qemu-system-...:` line.
    fn emulator_gave_up(&self) -> Option<String> {
        let RunEnd::EmulatorExited { code: Some(c) } = self.end else {
            return None;
        };
        let said = last_words(&self.emulator_output);
        match c {
            0 => None,
            _ if self.machine == Machine::Bochs || c % 2 == 0 => said,
            1 => said.filter(|s| s.contains("qemu-system")),
            _ => None,
        }
    }

    /// A sentence saying how the run ended.
    pub fn summary(&self) -> String {
        let how = match &self.end {
            RunEnd::Halted(s) => {
                let what = ipc_schema::halt::HaltStatus::from_code(*s)
                    .map_or("unknown status", |h| h.describe());
                format!("halted with status {s} ({what})")
            }
            RunEnd::TimedOut => "timed out; the emulator was stopped".to_owned(),
            RunEnd::Stopped => "was stopped (Ctrl-C), the emulator with it".to_owned(),
            RunEnd::EmulatorExited { code } => {
                format!("the emulator exited ({code:?}) without a halt record from the kernel")
            }
            RunEnd::BootLoaderFailed => {
                let errors: Vec<&str> = self
                    .lines
                    .iter()
                    .filter(|l| l.source == "boot" && l.text.starts_with("error:"))
                    .map(|l| l.text.trim())
                    .filter(|t| !t.contains(KERNEL_NOT_LOADED))
                    .collect();
                format!(
                    "stopped: the boot loader could not load the kernel ({}; with --memory, is there room for the kernel and its modules?)",
                    errors.join(" ")
                )
            }
        };
        let mut s = format!(
            "run on {} {how} after {:.2} s; serial capture {}",
            self.machine.name(),
            self.wall.as_secs_f64(),
            self.capture.display()
        );
        if !matches!(self.end, RunEnd::Halted(_)) {
            let log = self.emulator_log.as_ref().unwrap_or(&self.emulator_output);
            s.push_str(&format!("; emulator log {}", log.display()));
        }
        // An emulator that gave up says why in its own output: its last
        // words, so that the user need not open the file.
        if let Some(said) = self.emulator_gave_up() {
            s.push_str(&format!("; the emulator said: {said}"));
        }
        if let Some(t) = self.first_kernel_record {
            s.push_str(&format!(
                "; first kernel record after {:.2} s",
                t.as_secs_f64()
            ));
        }
        s
    }

    /// Whether some line from `source` contains `text`.
    pub fn has(&self, source: &str, text: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.source == source && l.text.contains(text))
    }
}

/// Boots `iso` and decodes its log with `elfs`.
pub fn run(iso: &Path, elfs: &ElfSet, cfg: &RunConfig) -> Result<RunOutcome> {
    run_boot(&Boot::Iso(iso), elfs, cfg)
}

/// Boots a multiboot (v1) kernel directly with QEMU's loader (`-kernel`), no
/// hypervisor: a test guest's output without Parallax, to compare with it.
pub fn run_multiboot_on_qemu(elf: &Path, cmdline: &str, cfg: &RunConfig) -> Result<RunOutcome> {
    run_multiboot_on_qemu_with_modules(elf, cmdline, &[], cfg)
}

/// [`run_multiboot_on_qemu`] with multiboot modules (`-initrd`): each
/// `"FILE ARGS"`, the file in the kernel's folder; the kernel finds the
/// whole string as the module's.
pub fn run_multiboot_on_qemu_with_modules(
    elf: &Path,
    cmdline: &str,
    modules: &[&str],
    cfg: &RunConfig,
) -> Result<RunOutcome> {
    let initrd = modules.join(",");
    run_boot(
        &Boot::Multiboot {
            elf,
            cmdline,
            initrd: &initrd,
        },
        &ElfSet::default(),
        cfg,
    )
}

/// What to boot.
enum Boot<'a> {
    Iso(&'a Path),
    Multiboot {
        elf: &'a Path,
        cmdline: &'a str,
        /// QEMU's `-initrd` (multiboot modules), empty for none.
        initrd: &'a str,
    },
}

fn run_boot(boot: &Boot<'_>, elfs: &ElfSet, cfg: &RunConfig) -> Result<RunOutcome> {
    cfg.check()?;
    let rundir = cfg.run_dir();
    std::fs::create_dir_all(&rundir).with_context(|| format!("creating {}", rundir.display()))?;
    std::fs::write(&cfg.capture, b"")
        .with_context(|| format!("creating {}", cfg.capture.display()))?;
    // COM2 for image boots (a multiboot guest on plain QEMU has no console
    // service to talk to).
    let com2 = match boot {
        // A client's frames are checked where the image has Parallax's
        // console to speak to (an ISO of another kernel speaks its own).
        Boot::Iso(_) => Some(Com2::prepare(
            &cfg.control_socket_path(),
            elfs.files.contains_key("console"),
        )?),
        Boot::Multiboot { .. } => None,
    };
    let (mut cmd, emulator_log) = match boot {
        Boot::Iso(iso) => command(iso, cfg, &rundir, com2.as_ref().map(Com2::port))?,
        Boot::Multiboot {
            elf,
            cmdline,
            initrd,
        } => {
            if cfg.machine != Machine::Qemu {
                bail!("a multiboot kernel boots directly only on QEMU (--on qemu)");
            }
            if !elf.is_file() {
                bail!("{} does not exist", elf.display());
            }
            // QEMU starts the guest's command line with the path it was
            // given: give it the bare file name, as a boot loader would.
            let (Some(dir), Some(file)) = (elf.parent(), elf.file_name()) else {
                bail!("{} is not a file path", elf.display());
            };
            let mut c = qemu_base(cfg);
            c.current_dir(dir)
                .args(["-accel", "tcg", "-cpu", "max", "-kernel"])
                .arg(file)
                .arg("-append")
                .arg(cmdline);
            if !initrd.is_empty() {
                c.arg("-initrd").arg(initrd);
            }
            (c, None)
        }
    };
    let started = Instant::now();
    let stderr_path = rundir.join("emulator-output.txt");
    let mut child = match &emulator_log {
        Some(log) => start_bochs(
            &mut cmd,
            log,
            &stderr_path,
            bochs_debug_port(com2.is_some(), cfg),
        )?,
        None => spawn(&mut cmd, &stderr_path, false)?,
    };
    // Bochs's debug port, where its configuration turned it on.
    let debug = child.stdout.take().map(|out| {
        Box::new(BochsStdout {
            out,
            text: std::fs::OpenOptions::new()
                .append(true)
                .open(&stderr_path)
                .ok(),
        }) as Box<dyn Read + Send>
    });
    let proxy = match com2 {
        Some(c) => match c.serve(&mut child, cfg, debug) {
            Ok(p) => Some(p),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        },
        None => None,
    };
    let result = watch(&mut child, elfs, cfg, started);
    // End only what we started, by its PID, whatever happened above.
    let _ = child.kill();
    let status = child.wait().ok();
    // Only now: Bochs dies of SIGPIPE if its COM2 peer closes first.
    let control_socket = proxy.as_ref().map(|(p, _)| p.path().to_owned());
    let control = proxy.and_then(|(p, connected)| {
        let stats = p.stop();
        connected.then_some(stats)
    });
    let (lines, end, first) = result?;
    let end = match end {
        Some(e) => e,
        None => {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            if !stderr.trim().is_empty() && cfg.live {
                eprintln!("{}: {}", cfg.machine.name(), stderr.trim());
            }
            RunEnd::EmulatorExited {
                code: status.and_then(|s| s.code()),
            }
        }
    };
    Ok(RunOutcome {
        machine: cfg.machine,
        end,
        lines,
        capture: cfg.capture.clone(),
        wall: started.elapsed(),
        first_kernel_record: first,
        emulator_log,
        emulator_output: stderr_path,
        control_socket,
        control,
    })
}

/// The last three non-empty lines of an emulator's output file, joined,
/// or `None` where it has none.
fn last_words(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let from = lines.len().saturating_sub(3);
    (!lines.is_empty()).then(|| lines[from..].join(" / "))
}

/// How long the emulator has to connect its COM2 after it starts.
const COM2_CONNECT: Duration = Duration::from_secs(10);

/// The runner's side of COM2 before the emulator starts: the proxy's socket
/// and the TCP listener the emulator connects to.
struct Com2 {
    socket: ProxySocket,
    listener: TcpListener,
    port: u16,
}

impl Com2 {
    fn prepare(socket_path: &Path, parallax_console: bool) -> Result<Self> {
        let socket = ProxySocket::bind(socket_path)?.check_frames(parallax_console);
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .context("listening on 127.0.0.1 for the emulator's COM2")?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            socket,
            listener,
            port,
        })
    }

    fn port(&self) -> u16 {
        self.port
    }

    /// Takes the emulator's connection (waiting while it starts) and starts
    /// the proxy. Without a connection the run goes on (COM1 is what it is
    /// about), and clients of the socket are told there is no console.
    /// Returns the proxy and whether the emulator connected.
    fn serve(
        self,
        child: &mut Child,
        cfg: &RunConfig,
        debug: Option<Box<dyn Read + Send>>,
    ) -> Result<(Proxy, bool)> {
        let stream = accept_emulator(&self.listener, child)?;
        if stream.is_none() && cfg.live {
            eprintln!(
                "warning: {} did not connect its second serial port (COM2) within {} s: no control channel this run",
                cfg.machine.name(),
                COM2_CONNECT.as_secs()
            );
        }
        let connected = stream.is_some();
        let proxy = self
            .socket
            .serve_with_debug(stream, debug)
            .context("starting the control proxy")?;
        Ok((proxy, connected))
    }
}

/// The first connection to `listener`, unless the emulator exits or
/// [`COM2_CONNECT`] passes first.
fn accept_emulator(listener: &TcpListener, child: &mut Child) -> Result<Option<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + COM2_CONNECT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accepting the emulator's COM2 connection"),
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts the emulator with its output going to `stderr` (a file, so that a
/// chatty emulator can never block on a full pipe), or its standard output
/// to a pipe (`piped_stdout`: Bochs's debug port, read by the proxy, which
/// always drains it).
fn spawn(cmd: &mut Command, stderr: &Path, piped_stdout: bool) -> Result<Child> {
    std::fs::File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
    // Appending: the runner adds Bochs's standard output text to the same
    // file (`BochsStdout`) while Bochs writes its standard error there.
    let err = std::fs::OpenOptions::new()
        .append(true)
        .open(stderr)
        .with_context(|| format!("opening {}", stderr.display()))?;
    let out = if piped_stdout {
        Stdio::piped()
    } else {
        Stdio::from(err.try_clone()?)
    };
    die_with_parent(cmd);
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))
}

/// The emulator is killed when the thread that started it ends (Linux's
/// parent-death signal): a runner killed by its PID (`kill -9` of `cargo
/// hv run`, a test harness timing out) takes its emulator with it instead
/// of leaving it to run on, holding its ports and its CPU, until its own
/// end. (The runner waits for the emulator in the thread that started it,
/// so the signal never comes while a run is being watched.)
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only async-signal-safe functions (prctl, getppid, _exit),
    // allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The runner may have died before the signal was set.
            if libc::getppid() != parent as libc::pid_t {
                libc::_exit(125);
            }
            Ok(())
        })
    };
}

/// Bochs's standard output with `port_e9_hack` on: its own text (the
/// banner, the debugger's first lines) until the console's first byte on
/// the debug port, a zero, which it sends when it starts answering there;
/// the text is added to the emulator's output file, the frames from then on
/// are the proxy's.
struct BochsStdout<R, W> {
    out: R,
    text: Option<W>,
}

impl<R: Read, W: Write> Read for BochsStdout<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.out.read(buf)?;
            let Some(text) = &mut self.text else {
                return Ok(n);
            };
            if n == 0 {
                return Ok(0);
            }
            match buf[..n].iter().position(|&b| b == 0) {
                None => {
                    let _ = text.write_all(&buf[..n]);
                }
                Some(z) => {
                    let _ = text.write_all(&buf[..z]);
                    self.text = None;
                    buf.copy_within(z..n, 0);
                    return Ok(n - z);
                }
            }
        }
    }
}

/// Whether a Bochs run has its debug port (0xE9) read by the proxy: where
/// there is a control channel, and no trace (the debugger writes to the
/// same standard output).
fn bochs_debug_port(com2: bool, cfg: &RunConfig) -> bool {
    com2 && cfg.trace.is_none()
}

/// Starts Bochs, one instance at a time until its display server has a port.
///
/// Bochs 2.7's RFB display (the only one Debian builds without a desktop)
/// listens on the first free port from 5900. Two instances starting together
/// can both bind 5900; the loser's `listen` fails, it then retries every
/// port with the same, already bound socket, and panics. So starts are
/// serialised across processes with a file lock, held until the log says
/// the port is bound, and an instance that still lost is started again.
fn start_bochs(cmd: &mut Command, log: &Path, stderr: &Path, debug_port: bool) -> Result<Child> {
    let lock_path = paths::work_dir().join("bochs-start.lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    for _attempt in 0..5 {
        let _ = std::fs::remove_file(log);
        let mut child = spawn(cmd, stderr, debug_port)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("listening for connections on port") {
                return Ok(child);
            }
            let bind_failed = text.contains("RFB could not bind any port");
            if bind_failed || child.try_wait()?.is_some() {
                let _ = child.kill();
                let _ = child.wait();
                // Ended before its display was up for another reason (its
                // configuration refused, a missing file): no retry helps.
                let output = std::fs::read_to_string(stderr).unwrap_or_default();
                if let (false, Some(why)) = (bind_failed, bochs_refusal(&output)) {
                    bail!("Bochs refused to start: {why}; see {}", stderr.display());
                }
                break;
            }
            if Instant::now() > deadline {
                // Going on without knowing: the run's own timeout still applies.
                return Ok(child);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    bail!(
        "Bochs could not start its display server (ports 5900-5949); see {}",
        log.display()
    )
}

/// Why Bochs stopped before it ran, from its output: its errors and
/// panics (`e[`, `p[` records) and its exit message, in one line (with
/// where to find the CPU models when the model was refused); `None` when
/// it printed none.
fn bochs_refusal(output: &str) -> Option<String> {
    let mut why: Vec<&str> = Vec::new();
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        let record = line.split_once("e[").or_else(|| line.split_once("p["));
        if line.starts_with("Bochs is exiting with the following message:") {
            why.extend(
                lines
                    .next()
                    .map(|l| l.trim_start_matches("[      ]").trim()),
            );
        } else if let Some((stamp, rest)) = record
            && stamp.chars().all(|c| c.is_ascii_digit())
            && !rest.contains("bxevent_callback")
            && let Some((_, text)) = rest.split_once("] ")
        {
            why.push(text.trim());
        }
    }
    why.dedup_by(|a, b| b.contains(*a) || a.contains(*b));
    let mut why = why.join("; ");
    if why.contains("'model'") {
        why.push_str(" (`bochs -help cpu` lists the CPU models)");
    }
    (!why.is_empty()).then_some(why)
}

type Watched = (Vec<LogLine>, Option<RunEnd>, Option<Duration>);

/// What GRUB prints at `boot` when its `multiboot2` command failed.
const KERNEL_NOT_LOADED: &str = "you need to load the kernel first";

/// Follows the capture file until the run ends.
fn watch(child: &mut Child, elfs: &ElfSet, cfg: &RunConfig, started: Instant) -> Result<Watched> {
    let mut file = std::fs::File::open(&cfg.capture)?;
    let mut demux = Demux::new();
    let mut decoder = Decoder::new(elfs.clone());
    let mut lines = Vec::new();
    let mut first = None;
    let mut halted_at: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = std::io::stdout();
    loop {
        let n = file.read(&mut buf)?;
        let exited = child.try_wait()?.is_some();
        let mut events = Vec::new();
        demux.push(&buf[..n], &mut events);
        if exited || halted_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            // Read what is left, then finish.
            let mut rest = Vec::new();
            file.read_to_end(&mut rest)?;
            demux.push(&rest, &mut events);
            demux.finish(&mut events);
        }
        // GRUB says this once it has failed to load the kernel, and then
        // waits for a key: nothing more will come. (Each line looked at
        // once, as it is decoded.)
        let mut not_loaded = false;
        for e in &events {
            if first.is_none() && matches!(e, Event::Record(_)) {
                first = Some(started.elapsed());
            }
            for l in decoder.lines(e) {
                not_loaded |= l.source == "boot" && l.text.contains(KERNEL_NOT_LOADED);
                if cfg.live {
                    let _ = writeln!(out, "{l}");
                }
                if let Some(tap) = &cfg.tap {
                    let _ = tap.send(l.clone());
                }
                lines.push(l);
            }
        }
        if not_loaded && first.is_none() {
            return Ok((lines, Some(RunEnd::BootLoaderFailed), first));
        }
        if decoder.halt.is_some() && halted_at.is_none() {
            halted_at = Some(Instant::now());
        }
        let halted = decoder.halt.map(RunEnd::Halted);
        if exited || halted_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            return Ok((lines, halted, first));
        }
        let stopped = cfg
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed));
        if halted.is_none() && (started.elapsed() > cfg.timeout || stopped) {
            let mut events = Vec::new();
            demux.finish(&mut events);
            lines.extend(events.iter().flat_map(|e| decoder.lines(e)));
            let end = if stopped {
                RunEnd::Stopped
            } else {
                RunEnd::TimedOut
            };
            return Ok((lines, Some(end), first));
        }
        if n == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn command(
    iso: &Path,
    cfg: &RunConfig,
    rundir: &Path,
    com2: Option<u16>,
) -> Result<(Command, Option<PathBuf>)> {
    match cfg.machine {
        Machine::Bochs => bochs(iso, cfg, rundir, com2),
        Machine::Kvm if !kvm_nested_vmx() => bail!(
            "--on kvm needs /dev/kvm with nested VMX (kvm_intel nested=Y); this host has none"
        ),
        Machine::Qemu | Machine::QemuUefi | Machine::Kvm => {
            Ok((qemu(iso, cfg, rundir, com2)?, None))
        }
    }
}

/// QEMU with the machine, memory, serial capture and exit port every run uses.
fn qemu_base(cfg: &RunConfig) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-machine", "q35", "-m"])
        .arg(format!("{}M", cfg.memory_mib))
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", cfg.capture.display()));
    c
}

fn qemu(iso: &Path, cfg: &RunConfig, rundir: &Path, com2: Option<u16>) -> Result<Command> {
    let mut c = qemu_base(cfg);
    if let Some(port) = com2 {
        // The second -serial is COM2 (0x2f8): QEMU connects to the runner
        // as it starts, and fails to start if it cannot.
        c.arg("-chardev")
            .arg(format!(
                "socket,id=com2,host=127.0.0.1,port={port},server=off,nodelay=on"
            ))
            .args(["-serial", "chardev:com2"]);
    }
    c.arg("-cdrom").arg(iso);
    // One accelerator only: QEMU tries each -accel in turn and keeps the
    // first that starts, so a TCG one before KVM's would always win.
    match cfg.machine {
        Machine::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
        _ => c.args(["-accel", "tcg", "-cpu", "max"]),
    };
    if cfg.machine == Machine::QemuUefi {
        let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
        let vars = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
        if !code.is_file() || !vars.is_file() {
            bail!(
                "UEFI firmware missing: {} or {} (package ovmf)",
                code.display(),
                vars.display()
            );
        }
        let my_vars = rundir.join("OVMF_VARS_4M.fd");
        std::fs::copy(vars, &my_vars)?;
        c.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", my_vars.display()));
    }
    if cfg.iommu {
        // Interrupt remapping under KVM needs the I/O APIC in QEMU (a
        // split irqchip); QEMU refuses `intremap=on` otherwise.
        if cfg.machine == Machine::Kvm {
            c.args(["-machine", "kernel-irqchip=split"]);
        }
        c.args([
            "-device",
            "intel-iommu,intremap=on",
            "-device",
            "edu,addr=03.0",
        ]);
    }
    for d in &cfg.qemu_devices {
        c.arg("-device").arg(d);
    }
    for t in &cfg.acpi_tables {
        c.arg("-acpitable").arg(format!("file={}", t.display()));
    }
    Ok(c)
}

fn bochs(
    iso: &Path,
    cfg: &RunConfig,
    rundir: &Path,
    com2: Option<u16>,
) -> Result<(Command, Option<PathBuf>)> {
    let bios = Path::new("/usr/share/bochs/BIOS-bochs-latest");
    let vga = Path::new("/usr/share/bochs/VGABIOS-lgpl-latest");
    for f in [bios, vga] {
        if !f.exists() {
            bail!(
                "Bochs firmware {} is missing (packages bochsbios, vgabios)",
                f.display()
            );
        }
    }
    let log = rundir.join("bochs.log");
    let rc = rundir.join("bochsrc");
    // Bochs 2.7's `socket-client` connects once, as the device starts, and
    // never blocks: if nobody listens it logs an error and leaves the port
    // unconnected. (`socket-server` would block in accept() until a client
    // came.) The runner listens before Bochs starts.
    let com2_wired = com2.is_some();
    let com2 = com2.map_or_else(String::new, |port| {
        format!("com2: enabled=1, mode=socket-client, dev=127.0.0.1:{port}\n")
    });
    // The debug port carries the console's frames to the runner (its
    // standard output) far faster than COM2; not while tracing, when the
    // debugger writes there too.
    let debug_port = if bochs_debug_port(com2_wired, cfg) {
        "port_e9_hack: enabled=1\n"
    } else {
        ""
    };
    // The debugger stops at each magic breakpoint and reads its next
    // command: trace from the first to the second, then run to the end.
    let (trace, commands) = match &cfg.trace {
        Some(t) => (
            format!("magic_break: enabled=1\ndebugger_log: {}\n", t.display()),
            "c\ntrace on\nc\ntrace off\nc\n",
        ),
        None => (String::new(), "c\n"),
    };
    let config = format!(
        "megs: {megs}\n\
         cpu: model={model}, count=1, ips=100000000, reset_on_triple_fault=0\n\
         romimage: file={bios}\n\
         vgaromimage: file={vga}\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev={capture}\n\
         {com2}\
         {debug_port}\
         display_library: rfb, options=\"timeout=0\"\n\
         sound: driver=dummy\n\
         speaker: enabled=0\n\
         mouse: enabled=0\n\
         clock: sync=none, time0=local\n\
         panic: action=fatal\n\
         error: action=report\n\
         log: {log}\n\
         {trace}",
        megs = cfg.memory_mib,
        model = cfg.bochs_cpu,
        bios = bios.display(),
        vga = vga.display(),
        iso = iso
            .canonicalize()
            .with_context(|| format!("image {} does not exist", iso.display()))?
            .display(),
        capture = cfg.capture.display(),
        log = log.display(),
    );
    std::fs::write(&rc, config)?;
    let cmds = rundir.join("bochs-commands");
    std::fs::write(&cmds, commands)?;
    let mut c = Command::new("bochs");
    c.arg("-q")
        .arg("-f")
        .arg(&rc)
        .arg("-rc")
        .arg(&cmds)
        .current_dir(rundir);
    Ok((c, Some(log)))
}

/// The CPU models `bochs -help cpu` lists (after "Supported CPU models:",
/// one name a line).
pub fn parse_bochs_cpu_models(help: &str) -> Vec<&str> {
    help.lines()
        .skip_while(|l| !l.starts_with("Supported CPU models:"))
        .skip(1)
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect()
}

/// Refuses a Bochs CPU model (`--bochs-cpu`) this Bochs does not have,
/// before anything is built (Bochs would refuse it only when the run
/// starts), naming those it has. Says nothing where Bochs cannot list
/// them.
pub fn check_bochs_cpu(model: &str) -> Result<()> {
    let Ok(out) = Command::new("bochs").args(["-help", "cpu"]).output() else {
        return Ok(());
    };
    let help = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let models = parse_bochs_cpu_models(&help);
    if models.is_empty() || models.contains(&model) {
        return Ok(());
    }
    bail!(
        "Bochs has no CPU model {model:?} (--bochs-cpu); it has: {} (corei7_skylake_x, the default, emulates VMX with EPT, VMFUNC, #VE and PML)",
        models.join(", ")
    )
}

/// A fresh capture path under the work directory.
pub fn capture_path(label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    paths::work_dir()
        .join("runs")
        .join(format!("{label}-{}-{n}.serial", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochs_cpu_models_are_read_from_its_help() {
        let help = "00000000000i[      ] LTDL_LIBRARY_PATH not set.\nSupported CPU models:\n\nbx_generic\npentium\ncorei7_skylake_x\ntigerlake\n\n00000000000i[SIM   ] quit_sim called with exit code 0\n";
        assert_eq!(
            parse_bochs_cpu_models(help),
            ["bx_generic", "pentium", "corei7_skylake_x", "tigerlake"]
        );
        assert!(parse_bochs_cpu_models("bochs: command not found").is_empty());
    }

    #[test]
    fn bochs_text_goes_to_the_file_and_frames_to_the_proxy() {
        let stdout: &[u8] = b"Bochs x86 Emulator 2.7\nNext at t=0\n\x00\x03ab\x00\x02c\x00";
        let mut text = Vec::new();
        let mut frames = Vec::new();
        BochsStdout {
            out: stdout,
            text: Some(&mut text),
        }
        .read_to_end(&mut frames)
        .unwrap();
        assert_eq!(text, b"Bochs x86 Emulator 2.7\nNext at t=0\n");
        assert_eq!(frames, b"\x00\x03ab\x00\x02c\x00");
    }

    /// A CPU model Bochs does not know is named as Bochs names it, not
    /// taken for a display server that could not start (output of Bochs
    /// 2.7 given `cpu: model=nosuchcpu`, shortened).
    #[test]
    fn a_refused_configuration_is_named_with_bochs_s_words() {
        let output = "00000000000i[      ] reading configuration from rc\n\
            00000000000e[      ] rc:2: wrong value for parameter 'model'\n\
            00000000000p[      ] >>PANIC<< rc:2: cpu directive malformed.\n\
            00000000000e[SIM   ] notify called, but no bxevent_callback function is registered\n\
            Bochs is exiting with the following message:\n\
            [      ] rc:2: cpu directive malformed.\n\
            00000000000i[SIM   ] quit_sim called with exit code 1\n";
        assert_eq!(
            bochs_refusal(output).as_deref(),
            Some(
                "rc:2: wrong value for parameter 'model'; >>PANIC<< rc:2: cpu directive malformed. \
                 (`bochs -help cpu` lists the CPU models)"
            )
        );
        assert_eq!(bochs_refusal("00000000000i[      ] all well\n"), None);
    }

    /// `--on kvm` runs on KVM with the host's CPU: one accelerator, one CPU
    /// model (a TCG accelerator before KVM's would win, and TCG refuses
    /// `-cpu host`).
    #[test]
    fn each_qemu_machine_names_one_accelerator_and_cpu() {
        let dir = std::env::temp_dir();
        for (machine, accel, cpu) in [(Machine::Qemu, "tcg", "max"), (Machine::Kvm, "kvm", "host")]
        {
            let mut cfg = RunConfig::new(machine, dir.join("capture"));
            cfg.iommu = true;
            let c = qemu(Path::new("x.iso"), &cfg, &dir, None).unwrap();
            let args: Vec<_> = c.get_args().map(|a| a.to_str().unwrap()).collect();
            let after = |flag: &str| -> Vec<&str> {
                args.windows(2)
                    .filter(|w| w[0] == flag)
                    .map(|w| w[1])
                    .collect()
            };
            assert_eq!(after("-accel"), [accel], "{machine:?}: {args:?}");
            assert_eq!(after("-cpu"), [cpu], "{machine:?}: {args:?}");
            // VT-d's interrupt remapping on KVM: the split irqchip QEMU
            // asks for there.
            let split = after("-machine").contains(&"kernel-irqchip=split");
            assert_eq!(split, machine == Machine::Kvm, "{machine:?}: {args:?}");
        }
    }

    /// QEMU's own failure (exit 1, with its own line: it could not start,
    /// e.g. no memory for the guest) is no success: 125, with what QEMU
    /// said in the summary; an isa-debug-exit status (V << 1 | 1, with V 0
    /// where QEMU said nothing) is V; Bochs's code is never a status.
    #[test]
    fn an_emulator_that_gave_up_is_no_halt_and_says_why() {
        let dir = std::env::temp_dir().join(format!("hv-last-words-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let output = dir.join("emulator-output.txt");
        std::fs::write(
            &output,
            "\nqemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory\n\n",
        )
        .unwrap();
        let outcome = |machine, code| RunOutcome {
            machine,
            end: RunEnd::EmulatorExited { code: Some(code) },
            lines: Vec::new(),
            capture: dir.join("capture"),
            wall: Duration::from_millis(60),
            first_kernel_record: None,
            emulator_log: None,
            emulator_output: output.clone(),
            control_socket: None,
            control: None,
        };
        let failed = outcome(Machine::Qemu, 1);
        assert_eq!(failed.exit_code(), i32::from(crate::NO_HALT));
        assert!(
            failed.summary().ends_with(
                "; the emulator said: qemu-system-x86_64: cannot set up guest memory 'pc.ram': Cannot allocate memory"
            ),
            "{}",
            failed.summary()
        );
        let status = outcome(Machine::Qemu, 0x21);
        assert_eq!(status.exit_code(), 0x10);
        assert!(!status.summary().contains("the emulator said"));
        assert_eq!(
            outcome(Machine::Bochs, 1).exit_code(),
            i32::from(crate::NO_HALT)
        );
        assert_eq!(
            outcome(Machine::Bochs, 3).exit_code(),
            i32::from(crate::NO_HALT)
        );
        // A guest's isa-debug-exit status 0 (exit 1, QEMU silent) is 0.
        std::fs::write(&output, "").unwrap();
        let zero = outcome(Machine::Qemu, 1);
        assert_eq!(zero.exit_code(), 0);
        assert!(!zero.summary().contains("said"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An emulator started by a runner that then dies (here: the thread
    /// that started it ends without waiting) is killed with it, not left
    /// running; one whose runner lives on is not.
    #[test]
    fn an_emulator_dies_with_its_runner() {
        use std::os::unix::process::ExitStatusExt;
        let dir = std::env::temp_dir().join(format!("hv-pdeath-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = dir.join("stderr.txt");
        let started = Instant::now();
        let e = err.clone();
        let mut orphan_child =
            std::thread::spawn(move || spawn(Command::new("sleep").arg("30"), &e, false).unwrap())
                .join()
                .unwrap();
        let status = orphan_child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
        // The same, its runner alive: still running after a moment.
        let mut kept = spawn(Command::new("sleep").arg("30"), &err, false).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(kept.try_wait().unwrap().is_none());
        let _ = kept.kill();
        let _ = kept.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
