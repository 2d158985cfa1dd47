//! The boot-test harness: build images (the kernel once per test process),
//! boot them on an emulator, and assert on the decoded log lines. Every
//! failed assertion prints the whole decoded log of the run.

use image_builder::compile::{self, BuildOptions};
use image_builder::emulator::{self, Machine, RunConfig, RunEnd, RunOutcome};
use image_builder::image::{self, Image};
use image_builder::iso::{Content, Module};
use image_builder::manifest::SystemManifest;
use image_builder::paths;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The kernel ELF, built once per test process.
pub fn kernel() -> &'static Path {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(|| {
        image_builder::deps::ensure().expect("the emulators and GRUB must be installed");
        compile::kernel(&BuildOptions::default()).expect("the kernel builds")
    })
}

/// Every test guest (crates in `tests/guests/`), built once per test process.
pub const GUESTS: &[&str] = &[
    "hello", "cpuid", "unmapped", "vmfunc", "ve", "pml", "bench", "ticker", "agent", "hostile",
    "writer", "sharer", "forker",
];

/// The ELF of test guest `name`.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        kernel();
        let paths =
            compile::guests(GUESTS, &BuildOptions::default()).expect("the test guests build");
        GUESTS
            .iter()
            .map(|g| {
                (
                    g.to_string(),
                    paths[GUESTS.iter().position(|x| x == g).unwrap()].clone(),
                )
            })
            .collect()
    });
    built
        .get(name)
        .unwrap_or_else(|| panic!("no test guest {name}"))
        .clone()
}

/// Every service crate under `services/` (the runtime aside), built once per
/// test process: crate name (`init` for the supervisor) -> ELF.
pub fn service_elfs() -> &'static BTreeMap<String, PathBuf> {
    static BUILT: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    BUILT.get_or_init(|| {
        kernel();
        let dir = paths::repo().join("services");
        let mut crates: Vec<String> = std::fs::read_dir(&dir)
            .expect("services/ exists")
            .filter_map(|e| e.ok())
            // Services are the crates with a binary (not the runtime or the heap).
            .filter(|e| e.path().join("src/main.rs").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|c| c != "init")
            .collect();
        crates.sort();
        let refs: Vec<&str> = crates.iter().map(String::as_str).collect();
        let paths = compile::services(&refs, &BuildOptions::default()).expect("the services build");
        std::iter::once("init".to_owned())
            .chain(crates)
            .zip(paths)
            .collect()
    })
}

/// The ELF of service crate `name`.
pub fn service_elf(name: &str) -> PathBuf {
    service_elfs()
        .get(name)
        .unwrap_or_else(|| panic!("no service crate {name}"))
        .clone()
}

/// The init module and one module per service of `m` (built from its crate).
pub fn services_for(m: &SystemManifest) -> Vec<Module> {
    let mut out = vec![Module {
        name: "init".to_owned(),
        content: Content::File(service_elf("init")),
    }];
    for s in &m.services {
        out.push(Module {
            name: s.name.clone(),
            content: Content::File(service_elf(s.crate_name())),
        });
    }
    out
}

/// Init and the standard services, as modules.
pub fn standard_services() -> Vec<Module> {
    services_for(&SystemManifest::parse("name = \"standard\"", Path::new("standard")).unwrap())
}

/// An image of the system `toml` describes: its services and guests.
pub fn system(name: &str, toml: &str) -> Image {
    system_with_options(name, toml, "")
}

/// [`system`], the kernel started with `options` on its command line.
pub fn system_with_options(name: &str, toml: &str, options: &str) -> Image {
    system_at(Path::new(name), name, toml, options)
}

/// [`system`], its manifest taken as the file `manifest` (relative paths in
/// it are relative to that file's folder), its image named `name`.
pub fn system_in(manifest: &Path, name: &str, toml: &str) -> Image {
    system_at(manifest, name, toml, "")
}

fn system_at(manifest: &Path, name: &str, toml: &str, options: &str) -> Image {
    let m = SystemManifest::parse(toml, manifest).expect("test manifests are valid");
    let mut modules = vec![module(
        "manifest",
        m.compile().expect("test manifests compile"),
    )];
    modules.extend(services_for(&m));
    for g in m.guests() {
        modules.push(Module {
            name: g.to_owned(),
            content: Content::File(guest(g)),
        });
    }
    for (d, path) in m.kernels() {
        modules.push(
            image_builder::image::kernel_module(&m.path, d, &path)
                .expect("test kernels are loadable"),
        );
    }
    for (d, i, path) in m.kernel_modules() {
        modules.push(
            image_builder::image::guest_module(&m.path, d, i, &path)
                .expect("test kernels' modules are readable"),
        );
    }
    image(name, options, modules)
}

/// A system of one domain running `guest`.
pub fn one_guest(guest: &str) -> Image {
    one_guest_with_options(guest, "")
}

/// [`one_guest`], the kernel started with `options` on its command line.
pub fn one_guest_with_options(guest: &str, options: &str) -> Image {
    let tag: String = options
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    system_with_options(
        &format!(
            "guest-{guest}{}{tag}",
            if tag.is_empty() { "" } else { "-" }
        ),
        &format!(
            "name = \"{guest}-test\"\n[[domain]]\nname = \"{guest}\"\nguest = \"{guest}\"\nmemory_mib = 32\ncmdline = \"test run\"\n"
        ),
        options,
    )
}

/// A compiled manifest from TOML text.
pub fn manifest(toml: &str) -> Vec<u8> {
    SystemManifest::parse(toml, Path::new("test manifest"))
        .expect("test manifests are valid")
        .compile()
        .expect("test manifests compile")
}

/// The manifest module of a system without domains.
pub fn empty_manifest() -> Module {
    module("manifest", manifest("name = \"test\""))
}

/// The modules of a system without domains: its manifest, init, the
/// standard services.
pub fn empty_system() -> Vec<Module> {
    let mut m = vec![empty_manifest()];
    m.extend(standard_services());
    m
}

pub fn module(name: &str, bytes: Vec<u8>) -> Module {
    Module {
        name: name.to_owned(),
        content: Content::Bytes(bytes),
    }
}

/// Assembles an ISO named `name` from the test kernel, `cmdline` and
/// `modules` (in `target/hv/work/tests/FILE/`), once per test process: tests running in parallel that ask for
/// the same name share one image (the first caller's contents).
pub fn image(name: &str, cmdline: &str, modules: Vec<Module>) -> Image {
    static IMAGES: Mutex<BTreeMap<String, Arc<OnceLock<Image>>>> = Mutex::new(BTreeMap::new());
    let slot = IMAGES
        .lock()
        .unwrap()
        .entry(name.to_owned())
        .or_default()
        .clone();
    slot.get_or_init(|| {
        // One folder per test file: `cargo hv test` runs the files at the
        // same time, and two files may name an image alike.
        let file = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.file_stem()?.to_str()?.to_owned()))
            .map(|s| s.rsplit_once('-').map_or(s.clone(), |(f, _)| f.to_owned()))
            .unwrap_or_else(|| "tests".to_owned());
        let out = paths::work_dir()
            .join("tests")
            .join(file)
            .join(format!("{name}.iso"));
        let mut img =
            image::assemble(kernel(), cmdline, modules, &out).expect("the test image assembles");
        // Logs decode with whatever service ELF has the announced build id.
        for (name, path) in service_elfs() {
            img.elfs = img.elfs.clone().with(name, path);
        }
        img
    })
    .clone()
}

/// Boots `img` on `machine`, letting `configure` adjust the run.
pub fn boot(img: &Image, machine: Machine, configure: impl FnOnce(&mut RunConfig)) -> Run {
    let stem = img
        .iso
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("test");
    let mut cfg = RunConfig::new(machine, emulator::capture_path(stem));
    cfg.timeout = std::time::Duration::from_secs(90);
    configure(&mut cfg);
    Run(emulator::run(&img.iso, &img.elfs, &cfg).expect("the emulator runs"))
}

/// A finished run with assertions that show the log when they fail.
pub struct Run(pub RunOutcome);

impl Run {
    /// The whole decoded log and the end of the emulator's own, for failure messages.
    pub fn log(&self) -> String {
        let mut s = format!("{}\n", self.0.summary());
        for l in &self.0.lines {
            s.push_str(&format!("{l}\n"));
        }
        let log_file = self
            .0
            .emulator_log
            .as_ref()
            .unwrap_or(&self.0.emulator_output);
        if let Ok(log) = std::fs::read_to_string(log_file) {
            s.push_str("--- emulator log (last 30 lines) ---\n");
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(30)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Asserts that the kernel logged a line containing `text`.
    pub fn expect(&self, text: &str) -> &Self {
        self.expect_from("kernel", text)
    }

    /// Asserts that `source` logged a line containing `text`.
    pub fn expect_from(&self, source: &str, text: &str) -> &Self {
        assert!(
            self.0.has(source, text),
            "no {source} line contains {text:?}\n--- log ---\n{}",
            self.log()
        );
        self
    }

    /// Asserts that no kernel line contains `text`.
    pub fn expect_no(&self, text: &str) -> &Self {
        assert!(
            !self.0.has("kernel", text),
            "a kernel line contains {text:?}\n--- log ---\n{}",
            self.log()
        );
        self
    }

    /// The text of every console line of domain `id`.
    pub fn console(&self, id: u16) -> Vec<String> {
        let source = format!("dom{id}");
        self.0
            .lines
            .iter()
            .filter(|l| l.source == source)
            .map(|l| l.text.clone())
            .collect()
    }

    /// Asserts that domain `id` printed a line containing `text`.
    pub fn expect_console(&self, id: u16, text: &str) -> &Self {
        self.expect_from(&format!("dom{id}"), text)
    }

    /// Asserts that the kernel halted with `status` (and the emulator agreed).
    pub fn expect_status(&self, status: ipc_schema::halt::HaltStatus) -> &Self {
        assert_eq!(
            self.0.end,
            RunEnd::Halted(status.code()),
            "unexpected end\n--- log ---\n{}",
            self.log()
        );
        assert_eq!(self.0.exit_code(), i32::from(status.code()));
        self
    }
}

/// A system running in the background: its log lines as they come, and its
/// control channel.
pub struct Live {
    lines: std::sync::mpsc::Receiver<image_builder::logs::LogLine>,
    /// Every line seen so far.
    pub seen: Vec<image_builder::logs::LogLine>,
    socket: PathBuf,
}

impl Live {
    /// Waits (at most `secs` seconds) for a line from `source` containing
    /// `text`, and returns it.
    pub fn wait_for(
        &mut self,
        source: &str,
        text: &str,
        secs: u64,
    ) -> image_builder::logs::LogLine {
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| l.source == source && l.text.contains(text))
        {
            return l.clone();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.source == source && l.text.contains(text) {
                        return l;
                    }
                }
                Err(_) => {
                    let log: Vec<String> = self.seen.iter().map(|l| l.to_string()).collect();
                    panic!(
                        "no {source} line containing {text:?} within {secs} s\n--- log so far ---\n{}",
                        log.join("\n")
                    );
                }
            }
        }
    }

    /// Waits (each step at most `secs` seconds) until the ticker guest whose
    /// console is `source` has ticked `more` times after the latest tick
    /// seen so far: it still gets its answers.
    pub fn ticks_on(&mut self, source: &str, more: u64, secs: u64) {
        self.wait_for(source, "tick ", secs);
        let tick = |t: &str| {
            t.split_once("tick ")?
                .1
                .split_once(':')?
                .0
                .parse::<u64>()
                .ok()
        };
        let last = self
            .seen
            .iter()
            .filter(|l| l.source == source)
            .filter_map(|l| tick(&l.text))
            .max()
            .unwrap_or(0);
        self.wait_for(source, &format!("tick {}:", last + more), secs);
    }

    /// The control socket of the running system.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A control client (the `parallax-client` crate) of the running system.
    pub fn control(&self) -> parallax_client::Client<std::os::unix::net::UnixStream> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match parallax_client::Client::connect(&self.socket) {
                Ok(c) => return c.with_timeout(std::time::Duration::from_secs(60)),
                Err(e) if std::time::Instant::now() > deadline => panic!("cannot attach: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }
}

/// Boots `img` on `machine` in the background and runs `script` against it
/// while it runs; returns the whole run once it ends.
pub fn boot_live(
    img: &Image,
    machine: Machine,
    configure: impl FnOnce(&mut RunConfig),
    script: impl FnOnce(&mut Live),
) -> Run {
    let stem = img
        .iso
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("test")
        .to_owned();
    let mut cfg = RunConfig::new(machine, emulator::capture_path(&stem));
    cfg.timeout = std::time::Duration::from_secs(300);
    configure(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    cfg.tap = Some(tx);
    let stop: &'static std::sync::atomic::AtomicBool = Box::leak(Box::default());
    cfg.stop = Some(stop);
    let socket = cfg.control_socket_path();
    let (iso, elfs) = (img.iso.clone(), img.elfs.clone());
    let runner = std::thread::spawn(move || emulator::run(&iso, &elfs, &cfg));
    let mut live = Live {
        lines: rx,
        seen: Vec::new(),
        socket,
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| script(&mut live)));
    if let Err(panic) = result {
        // What the system said up to the failure (and a moment after: its
        // warnings about what the script just did), for the test's log:
        // often the only trace a CI run leaves.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Ok(l) = live
            .lines
            .recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
        {
            live.seen.push(l);
        }
        let from = live.seen.len().saturating_sub(150);
        eprintln!(
            "--- the system's last {} lines, up to the failure ---",
            live.seen.len() - from
        );
        for l in &live.seen[from..] {
            eprintln!("{l}");
        }
        // Stop the emulator before failing, so that it does not outlive the test.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = runner.join();
        std::panic::resume_unwind(panic);
    }
    Run(runner
        .join()
        .expect("the run thread does not panic")
        .expect("the emulator runs"))
}

/// The marker line of the `agent` guest run with `introspect` on domain 1
/// (`introspect: marker gva ... gpa ... alias ... cr3 ...`): its gpa,
/// alias and CR3, and the line.
pub fn introspect_marker(live: &mut Live) -> (u64, u64, u64, String) {
    let line = live
        .wait_for("dom1", "introspect: marker gva", 120)
        .text
        .clone();
    (
        hex_after(&line, "gpa"),
        hex_after(&line, "alias"),
        hex_after(&line, "cr3"),
        line,
    )
}

/// The hex number after `key ` in a log line (ended by a space, `)` or
/// `;`), e.g. `hex_after("marker gva 0x1000 cr3 0x2000", "cr3")`.
pub fn hex_after(line: &str, key: &str) -> u64 {
    let v = line
        .split(&format!("{key} "))
        .nth(1)
        .and_then(|s| s.split([' ', ')', ';']).next())
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

/// `cargo hv ARGS...` as a user types it, in the repository.
pub fn cargo_hv(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO"));
    c.current_dir(image_builder::paths::repo())
        .arg("hv")
        .args(args);
    c
}

/// `cargo hv ctl` against a running system's control socket, as a user
/// types it (`--timeout 120`).
pub mod ctl {
    use std::path::Path;
    use std::process::Output;

    /// `cargo hv ctl --socket SOCKET ARGS...`, to run or spawn.
    pub fn command(socket: &Path, args: &[&str]) -> std::process::Command {
        let mut c = super::cargo_hv(&["ctl", "--timeout", "120", "--socket"]);
        c.arg(socket).args(args);
        c
    }

    /// [`command`], run to its end.
    pub fn run(socket: &Path, args: &[&str]) -> Output {
        command(socket, args).output().expect("cargo runs")
    }

    /// Its stdout, which must be a success.
    pub fn ok(socket: &Path, args: &[&str]) -> String {
        let out = run(socket, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cargo hv ctl {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Its stderr, which must be a failure.
    pub fn refused(socket: &Path, args: &[&str]) -> String {
        let out = run(socket, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "cargo hv ctl {args:?} succeeded");
        err
    }
}
