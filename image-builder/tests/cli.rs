//! The `cargo hv` command line: bad input is reported by name, and `log`
//! decodes a capture taken by an earlier run.

use image_builder::emulator::{self, Machine, RunConfig};
use image_builder::image::ImageOptions;
use image_builder::manifest::SystemManifest;
use image_builder::{image, paths};
use std::path::Path;
use std::process::{Command, Output};

fn hv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cargo-hv"))
        .args(args)
        .output()
        .expect("cargo-hv runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `text` written to `NAME` in the tests' folder `cli-tests/DIR` (made as
/// needed); its path.
fn written(dir: &str, name: &str, text: &str) -> std::path::PathBuf {
    let dir = paths::work_dir().join("cli-tests").join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `cargo-hv ARGS` fails as the tool (status 100), saying `says`, before
/// anything is built or booted; its stderr.
fn refused_up_front(args: &[&str], says: &str) -> String {
    let o = hv(args);
    let e = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(image_builder::TOOL_ERROR.into()),
        "{args:?}: {e}"
    );
    assert!(e.contains(says), "{args:?}: {e}");
    assert!(
        !e.contains("compiling") && !e.contains("booting"),
        "{args:?}: {e}"
    );
    e
}

#[test]
fn a_missing_capture_is_named() {
    let o = hv(&["log", "/nonexistent/capture.serial"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("cannot read the capture /nonexistent/capture.serial"),
        "{}",
        stderr(&o)
    );
}

/// A file that is not a capture (text, no log records) is shown as the
/// text it is, and said not to be one.
#[test]
fn a_file_that_is_not_a_capture_is_said_to_be_text_only() {
    let file = written("log", "notes.txt", "shopping list\n");
    let o = hv(&["log", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(image_builder::NO_HALT.into()));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("shopping list"),
        "{o:?}"
    );
    assert!(
        stderr(&o).contains(&format!(
            "{}: no Parallax log records, only text: is it the capture of a `cargo hv run`",
            file.display()
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_missing_manifest_is_named() {
    let o = hv(&["build", "--manifest", "/nonexistent/system.toml"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("cannot read the manifest /nonexistent/system.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_malformed_manifest_is_named_with_the_field() {
    let bad = written(
        "",
        "bad.toml",
        "name = \"x\"\n[[domain]]\nname = \"d\"\nguest = \"g\"\nmemory_mib = 99999\n",
    );
    let o = hv(&["build", "--manifest", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    let e = stderr(&o);
    assert!(e.contains("bad.toml is not a valid manifest"), "{e}");
    assert!(
        e.contains("domain 1 (`d`): memory_mib = 99999 is out of range"),
        "{e}"
    );
}

/// A run that could only time out with nothing to show (`--memory` below
/// 4 MiB, `--timeout 0` for a run, a benchmark or a profile) is refused
/// before anything is built, naming the range.
#[test]
fn a_run_too_small_to_boot_or_too_short_to_see_is_refused_up_front() {
    refused_up_front(
        &["run", "--memory", "3", "--on", "qemu"],
        "invalid value '3' for '--memory <MEMORY>': 3 is not in 4..=",
    );
    for command in ["run", "bench"] {
        refused_up_front(
            &[command, "--timeout", "0"],
            "invalid value '0' for '--timeout <TIMEOUT>': 0 is not in 1..",
        );
    }
    refused_up_front(
        &["profile", "vmcall_service_ticks", "--timeout", "0"],
        "invalid value '0' for '--timeout <TIMEOUT>': 0 is not in 1..",
    );
}

/// `cargo hv profile` with a key it cannot trace says so at once, with
/// the keys it can, before anything is built or booted.
#[test]
fn a_profile_of_a_key_without_a_profile_point_is_refused_up_front() {
    refused_up_front(
        &["profile", "linux_boot_exits"],
        "no benchmark \"linux_boot_exits\" can be profiled; these can: rdtsc_frame_ticks, vmcall_kernel_ticks",
    );
}

/// A Bochs CPU model Bochs does not have is refused before anything is
/// built (Bochs itself would refuse it only when the run starts), with the
/// models it has.
#[test]
fn an_unknown_bochs_cpu_model_is_refused_up_front() {
    for args in [
        &["bench", "--bochs-cpu", "corei7_skylake"][..],
        &[
            "profile",
            "vmcall_service_ticks",
            "--bochs-cpu",
            "corei7_skylake",
        ],
        &["run", "--on", "bochs", "--bochs-cpu", "corei7_skylake"],
    ] {
        let e = refused_up_front(
            args,
            "Bochs has no CPU model \"corei7_skylake\" (--bochs-cpu); it has: bx_generic,",
        );
        assert!(e.contains(", corei7_skylake_x,"), "{args:?}: {e}");
    }
}

/// What the chosen machine cannot be given (an IOMMU on Bochs, an ACPI
/// table that does not exist) is refused before anything is built or
/// booted.
#[test]
fn what_the_machine_cannot_take_is_refused_before_building() {
    refused_up_front(
        &["run", "--on", "bochs", "--iommu"],
        "Bochs has no IOMMU and takes no extra ACPI tables: use --on qemu for VT-d",
    );
    refused_up_front(
        &[
            "run",
            "--on",
            "qemu",
            "--acpi-table",
            "/nonexistent/dmar.aml",
        ],
        "ACPI table /nonexistent/dmar.aml does not exist",
    );
}

#[test]
fn an_unknown_log_level_is_refused() {
    let o = hv(&["build", "--log", "loud"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("log level \"loud\" is not one of error, warn, info, debug, trace"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn log_decodes_a_capture_taken_earlier() {
    image_builder::deps::ensure().unwrap();
    let manifest = SystemManifest::parse("name = \"cli-test\"", Path::new("inline")).unwrap();
    let opts = ImageOptions {
        out: paths::work_dir().join("cli-tests").join("log.iso"),
        ..ImageOptions::default()
    };
    let img = image::build_manifest(&manifest, &opts).unwrap();
    let outcome = emulator::run(
        &img.iso,
        &img.elfs,
        &RunConfig::new(Machine::Qemu, emulator::capture_path("cli")),
    )
    .unwrap();
    assert_eq!(outcome.exit_code(), 0, "{}", outcome.summary());

    let o = hv(&["log", outcome.capture.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the exit status is the captured halt status"
    );
    let printed: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let live: Vec<String> = outcome.lines.iter().map(|l| l.to_string()).collect();
    assert_eq!(printed, live);
    assert!(
        printed
            .iter()
            .any(|l| l.contains("init") && l.contains("manifest: system cli-test"))
    );
}

#[test]
fn a_manifest_naming_a_service_that_does_not_exist_is_refused_before_building() {
    let dir = paths::work_dir().join("cli-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let ghost = dir.join("ghost.toml");
    std::fs::write(
        &ghost,
        "name = \"x\"\nstandard_services = true\n[[service]]\nname = \"ghost\"\nhandles = [{ name = \"a\", endpoint = \"altp2m\", rights = [\"call\"] }]\n",
    )
    .unwrap();
    let o = hv(&["build", "--manifest", ghost.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    let e = stderr(&o);
    assert!(
        e.contains("ghost.toml: service `ghost` names no service crate")
            && e.contains("services/ghost/Cargo.toml does not exist"),
        "{e}"
    );
    assert!(!e.contains("compiling"), "nothing was built: {e}");

    // And a --service override for a service the manifest does not have.
    let elf = dir.join("some.elf");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0").unwrap();
    let o = hv(&["build", "--service", &format!("nobody={}", elf.display())]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("--service nobody:")
            && stderr(&o).contains("has no service named `nobody`"),
        "{}",
        stderr(&o)
    );
}

/// Issue 5 point 7: the default `cargo hv run` shows the host watching a
/// guest's page through a view: each write reported, then let through.
#[test]
fn the_default_run_shows_the_host_watching_writes_to_a_guest_page() {
    let dir = std::env::temp_dir().join(format!("hv-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("ctl.sock");
    let o = hv(&[
        "run",
        "--on",
        "bochs",
        "--timeout",
        "300",
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", stderr(&o));
    let writes: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("host     >>> domain 2 wrote gpa 0x"))
        .collect();
    assert_eq!(writes.len(), 4, "{out}");
    assert!(writes.iter().all(|l| l.ends_with("allowed once")), "{out}");
    assert!(
        out.contains("host     >>> watching gfn 0x") && out.contains("agent: write 4 done"),
        "{out}"
    );
}

/// Ctrl-C on `cargo hv run` ends the run as its end would: the emulator
/// stopped, the summary naming the capture printed, exit status 130 (the
/// process killed by the signal printed nothing); the capture decodes with
/// `cargo hv log`.
#[test]
fn ctrl_c_ends_a_run_with_its_summary_and_a_capture_that_decodes() {
    use std::io::BufRead;
    let manifest = written(
        "ctrl-c",
        "system.toml",
        "name = \"ctrl-c\"\n[[domain]]\nname = \"t\"\nguest = \"ticker\"\nmemory_mib = 16\ncmdline = \"ticks=0\"\n",
    );
    let socket = manifest.with_file_name("ctl.sock");
    let mut run = Command::new(env!("CARGO_BIN_EXE_cargo-hv"))
        .args(["run", "--on", "bochs", "--timeout", "300", "--no-watch"])
        .arg("--manifest")
        .arg(&manifest)
        .arg("--control-socket")
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cargo-hv runs");
    // Its output read to the end (a closed pipe would fail its prints),
    // the first tick told on the way.
    let (tx, ticked) = std::sync::mpsc::channel();
    let stdout = run.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("tick 1:") {
                let _ = tx.send(());
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    let ticked = ticked.recv_timeout(std::time::Duration::from_secs(240));
    let killed = Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let o = run.wait_with_output().expect("the run ends");
    let out = reader.join().unwrap();
    let e = stderr(&o);
    assert!(ticked.is_ok(), "no tick: {out}\n{e}");
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(
        e.contains("run on bochs was stopped (Ctrl-C), the emulator with it after"),
        "{e}"
    );
    let capture = e
        .split("serial capture ")
        .nth(1)
        .and_then(|s| s.split([';', '\n']).next())
        .unwrap_or_else(|| panic!("no capture named: {e}"));
    let log = hv(&["log", capture]);
    assert_eq!(log.status.code(), Some(image_builder::NO_HALT.into()));
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("tick 1: vmm version 1"),
        "{}",
        stderr(&log)
    );
}

/// A build publishes its image whole, as a new file under the image's
/// name: what an emulator already opened (a run of the earlier build, say
/// one booting while another `cargo hv run` builds) stays the earlier
/// image, and no staging folder or part-made image is left beside it.
#[test]
fn a_build_replaces_the_image_without_touching_the_one_a_run_reads() {
    use image_builder::iso::{self, IsoSpec};
    use std::io::{Read, Seek};
    image_builder::deps::ensure().unwrap();
    let dir = paths::work_dir().join("cli-tests").join("replace");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("kernel.elf");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let out = dir.join("img.iso");
    let spec = |cmdline: &str| IsoSpec {
        kernel: kernel.clone(),
        cmdline: cmdline.into(),
        modules: Vec::new(),
    };
    iso::assemble(&spec("build=first"), &out).unwrap();
    let first = std::fs::read(&out).unwrap();
    let mut held = std::fs::File::open(&out).unwrap();
    iso::assemble(&spec("build=second"), &out).unwrap();
    let mut seen = Vec::new();
    held.rewind().unwrap();
    held.read_to_end(&mut seen).unwrap();
    assert!(seen == first, "the open image changed under its reader");
    let now = std::fs::read(&out).unwrap();
    let has = |bytes: &[u8], s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has(&first, "build=first") && has(&now, "build=second"));
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["img.iso", "kernel.elf"]);
}

/// Issue 14, point 1: a domain's `kernel = "PATH"` (relative to the
/// manifest's folder) that is missing, unreadable as a kernel, or in a
/// format Parallax does not load is refused by `cargo hv build`, naming the
/// file and why, before anything is built.
#[test]
fn a_kernel_file_that_cannot_be_loaded_is_refused_naming_it_and_why() {
    let dir = paths::work_dir().join("cli-tests").join("kernels");
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a kernel\n".repeat(100)).unwrap();
    // A multiboot2 header with a wrong checksum, and one that requires a
    // framebuffer (tag 5, not optional).
    let mut mb2 = vec![0u8; 4096];
    mb2[64..68].copy_from_slice(&0xe852_50d6u32.to_le_bytes());
    std::fs::write(dir.join("mb2.bin"), &mb2).unwrap();
    let mut fb = Vec::new();
    let len = 16 + 20 + 4 + 8;
    for v in [
        0xe852_50d6u32,
        0,
        len,
        0u32.wrapping_sub(0xe852_50d6 + len),
        5,
        20,
        1024,
        768,
        32,
        0,
        0,
        8,
    ] {
        fb.extend_from_slice(&v.to_le_bytes());
    }
    fb.resize(4096, 0);
    std::fs::write(dir.join("mb2-fb.bin"), &fb).unwrap();
    // A multiboot kernel with the header's address fields (the a.out
    // kludge): loaded whole at 1 MiB.
    let mut kludge = Vec::new();
    for v in [
        0x1bad_b002u32,
        0x1_0000,
        0u32.wrapping_sub(0x1bad_b002 + 0x1_0000),
        0x10_0000,
        0x10_0000,
        0,
        0,
        0x10_0020,
    ] {
        kludge.extend_from_slice(&v.to_le_bytes());
    }
    kludge.resize(64, 0xf4);
    std::fs::write(dir.join("kludge.bin"), &kludge).unwrap();
    // Linux bzImages (boot protocol 2.15, two setup sectors, 4 KiB of
    // protected-mode kernel), each with one thing wrong.
    let bzimage = |version: u16, loadflags: u8, init_size: u32, initrd_max: u32| {
        let mut bz = vec![0u8; 3 * 512 + 4096];
        bz[0x1f1] = 2;
        bz[0x1f4..0x1f8].copy_from_slice(&(4096u32 / 16).to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        bz[0x211] = loadflags;
        bz[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        bz[0x22c..0x230].copy_from_slice(&initrd_max.to_le_bytes());
        bz[0x238..0x23c].copy_from_slice(&8u32.to_le_bytes()); // cmdline_size
        bz[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        bz
    };
    for (name, bz) in [
        ("bz-old", bzimage(0x0205, 1, 0x2000, 0x37ff_ffff)),
        ("bz-zimage", bzimage(0x020f, 0, 0x2000, 0x37ff_ffff)),
        ("bz-big", bzimage(0x020f, 1, 20 << 20, 0x37ff_ffff)),
        ("bz-ok", bzimage(0x020f, 1, 0x2000, 0x37ff_ffff)),
        ("bz-low", bzimage(0x020f, 1, 0x2000, 0x10_1fff)),
    ] {
        std::fs::write(dir.join(name), &bz).unwrap();
    }
    std::fs::write(dir.join("bz-cut"), &bzimage(0x020f, 1, 0, 0)[..0x1000]).unwrap();
    let domain = |image: &str| {
        format!("name = \"k\"\n[[domain]]\nname = \"os\"\n{image}\nmemory_mib = 16\n")
    };
    for (image, says) in [
        (
            "kernel = \"missing.elf\"".to_owned(),
            format!(
                "domain `os`: kernel {}: cannot read it: No such file",
                dir.join("missing.elf").display()
            ),
        ),
        (
            "kernel = \"notes.txt\"".to_owned(),
            "notes.txt: no multiboot header in its first 8 KiB, no multiboot2 header".to_owned(),
        ),
        (
            "kernel = \"mb2.bin\"".to_owned(),
            "mb2.bin: its multiboot2 header's checksum is wrong".to_owned(),
        ),
        (
            "kernel = \"mb2-fb.bin\"".to_owned(),
            "mb2-fb.bin: its multiboot2 header requires what the loader does not provide (tag type 5"
                .to_owned(),
        ),
        (
            "kernel = \"bz-old\"".to_owned(),
            "bz-old: a Linux kernel with boot protocol 2.05: older than 2.06".to_owned(),
        ),
        (
            "kernel = \"bz-zimage\"".to_owned(),
            "bz-zimage: a Linux zImage (loadflags without LOADED_HIGH".to_owned(),
        ),
        (
            "kernel = \"bz-cut\"".to_owned(),
            "bz-cut: a Linux bzImage cut short".to_owned(),
        ),
        (
            "kernel = \"bz-big\"".to_owned(),
            "bz-big: a Linux bzImage that needs 0x1400000 bytes of RAM from 0x100000 (its init_size): more than the domain's 16 MiB".to_owned(),
        ),
        (
            "kernel = \"bz-ok\"\nmodules = [{ path = \"notes.txt\" }, { path = \"mb2.bin\" }]".to_owned(),
            "bz-ok: a Linux bzImage takes one module, its initrd; 2 are given".to_owned(),
        ),
        (
            "kernel = \"bz-ok\"\ncmdline = \"console=ttyS0\"".to_owned(),
            "bz-ok: its command line is 13 bytes, longer than the kernel's cmdline_size (8)".to_owned(),
        ),
        (
            "kernel = \"bz-low\"\nmodules = [{ path = \"notes.txt\" }]".to_owned(),
            "bz-low: its initrd notes.txt would end at 0x102514, above the kernel's initrd_addr_max 0x101fff".to_owned(),
        ),
        (
            "kernel = \"notes.txt\"\nguest = \"hello\"".to_owned(),
            "both guest and kernel are given".to_owned(),
        ),
        ("".to_owned(), "no image: give guest".to_owned()),
        (
            "kernel = \"kludge.bin\"\nmodules = [{ path = \"gone.txt\" }]".to_owned(),
            format!(
                "domain `os`: module 0 {}: cannot read it: No such file",
                dir.join("gone.txt").display()
            ),
        ),
        (
            "guest = \"hello\"\nmodules = [{ path = \"notes.txt\" }]".to_owned(),
            "modules are for a kernel from a file".to_owned(),
        ),
    ] {
        let manifest = dir.join("system.toml");
        std::fs::write(&manifest, domain(&image)).unwrap();
        let o = hv(&["build", "--manifest", manifest.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
        let e = stderr(&o);
        assert!(e.contains(&says), "{image}: {e}");
        assert!(!e.contains("compiling"), "nothing was built: {e}");
    }
}
