//! Guests under Parallax on Bochs's VMX (corei7_skylake_x unless said
//! otherwise): each test guest runs in a domain, and the decoded log shows
//! what it saw and how its domain ended.

use image_builder::emulator::{self, Machine, RunConfig, RunEnd};
use ipc_schema::halt::HaltStatus;
use parallax_tests::{boot, guest, one_guest, one_guest_with_options, system, system_in};

fn bochs(img: &image_builder::image::Image) -> parallax_tests::Run {
    boot(img, Machine::Bochs, |_| {})
}

fn bochs_model(img: &image_builder::image::Image, model: &str) -> parallax_tests::Run {
    let model = model.to_owned();
    boot(img, Machine::Bochs, move |c| c.bochs_cpu = model)
}

/// The guest's own output when it boots on plain QEMU, without Parallax.
/// QEMU starts the command line with the image's file name, so the image is
/// booted from a file named like its module under Parallax.
fn plain_qemu(name: &str) -> (Vec<String>, i32) {
    let dir = image_builder::paths::work_dir().join("plain");
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join(name);
    std::fs::copy(guest(name), &elf).unwrap();
    let mut cfg = RunConfig::new(
        Machine::Qemu,
        emulator::capture_path(&format!("plain-{name}")),
    );
    cfg.memory_mib = 32;
    let out = emulator::run_multiboot_on_qemu(&elf, "test run", &cfg).expect("QEMU runs");
    assert!(
        matches!(out.end, RunEnd::EmulatorExited { .. }),
        "{}",
        out.summary()
    );
    (
        out.lines
            .iter()
            .filter(|l| l.source == "boot")
            .map(|l| l.text.clone())
            .collect(),
        out.exit_code(),
    )
}

#[test]
fn hello_prints_the_same_under_parallax_and_on_plain_qemu() {
    let run = bochs(&one_guest("hello"));
    run.expect_from("init", "domain 1 (hello): guest hello, 32 MiB in")
        .expect_console(1, "Hello from a Parallax test guest")
        .expect_console(1, "cmdline: \"hello test run\"")
        .expect("domain 1 (hello) exited with status 0")
        .expect_status(HaltStatus::Success);
    let (plain, status) = plain_qemu("hello");
    assert_eq!(status, 0);
    // The same lines, but for the memory size: QEMU's BIOS keeps the top
    // 128 KiB of RAM and Parallax does not.
    let without_memory = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with("memory:"))
            .cloned()
            .collect()
    };
    assert_eq!(
        without_memory(&run.console(1)),
        without_memory(&plain),
        "with and without the hypervisor"
    );
    assert!(
        plain.iter().any(|l| l.starts_with("memory:"))
            && run.console(1).iter().any(|l| l.starts_with("memory:"))
    );
}

/// `tests/kernels/hello.S`, assembled and linked (GNU as and ld) into the
/// work folder as `kernel-asm`: a multiboot kernel not built by this
/// project's guest runtime.
fn assembled_kernel() -> std::path::PathBuf {
    assemble("hello.S", "kernel-asm", &[])
}

/// `tests/kernels/<source>`, assembled and linked (GNU as and ld, 32-bit,
/// text at 1 MiB, with `ld_args`) into the work folder's `kernels/<name>`.
fn assemble(source: &str, name: &str, ld_args: &[&str]) -> std::path::PathBuf {
    let dir = image_builder::paths::work_dir().join("kernels");
    std::fs::create_dir_all(&dir).unwrap();
    let (object, elf) = (dir.join(format!("{name}.o")), dir.join(name));
    let source = image_builder::paths::repo()
        .join("tests/kernels")
        .join(source);
    let mut link: Vec<std::ffi::OsString> = [
        "-m",
        "elf_i386",
        "-Ttext",
        "0x100000",
        "-e",
        "_start",
        // One segment from 1 MiB, no ELF headers loaded below it.
        "-n",
        "--no-warn-rwx-segments",
        "--build-id=none",
    ]
    .iter()
    .chain(ld_args)
    .map(Into::into)
    .collect();
    link.extend([
        "-o".into(),
        elf.clone().into_os_string(),
        object.clone().into_os_string(),
    ]);
    for (tool, args) in [
        (
            "as",
            vec![
                "--32".into(),
                // The routines the kernels share (`uart.inc`).
                "-I".into(),
                image_builder::paths::repo()
                    .join("tests/kernels")
                    .into_os_string(),
                "-o".into(),
                object.clone().into_os_string(),
                source.into_os_string(),
            ],
        ),
        ("ld", link),
    ] {
        let out = std::process::Command::new(tool)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} runs (Debian package binutils): {e}"));
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    elf
}

/// Boots `elf` as a multiboot2 kernel under GRUB on QEMU (TCG), with
/// `modules` (`"FILE ARGS"`, files in the kernel's folder) given by
/// `module2`: its COM1 lines and QEMU's exit code. QEMU's `-kernel` does
/// not take multiboot2 kernels; GRUB is what they are written for.
fn under_grub_on_qemu(
    elf: &std::path::Path,
    cmdline: &str,
    modules: &[&str],
) -> (Vec<String>, i32) {
    let dir = elf.parent().unwrap().join("grub-mb2");
    let _ = std::fs::remove_dir_all(&dir);
    let boot = dir.join("iso/boot");
    std::fs::create_dir_all(boot.join("grub")).unwrap();
    std::fs::copy(elf, boot.join("kernel")).unwrap();
    let mut cfg = format!(
        "set timeout=0\nset timeout_style=hidden\nmenuentry \"k\" {{\n    multiboot2 /boot/kernel {cmdline}\n"
    );
    for m in modules {
        let file = m.split(' ').next().unwrap();
        std::fs::copy(elf.parent().unwrap().join(file), boot.join(file)).unwrap();
        cfg.push_str(&format!("    module2 /boot/{file} {m}\n"));
    }
    cfg.push_str("    boot\n}\n");
    std::fs::write(boot.join("grub/grub.cfg"), cfg).unwrap();
    let iso = dir.join("mb2.iso");
    let out = std::process::Command::new("grub-mkrescue")
        .args(["--fonts=", "--locales=", "--themes=", "-o"])
        .arg(&iso)
        .arg(dir.join("iso"))
        .output()
        .expect("grub-mkrescue runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serial = dir.join("serial.txt");
    let status = std::process::Command::new("timeout")
        .args(["120", "qemu-system-x86_64", "-machine", "q35", "-m", "32M"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-accel", "tcg", "-cpu", "max", "-cdrom"])
        .arg(&iso)
        .status()
        .expect("QEMU runs");
    let text = std::fs::read_to_string(&serial).unwrap();
    (
        text.lines()
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect(),
        status.code().unwrap_or(-1),
    )
}

/// Issue 14, points 1 and 3: a kernel from a file (`kernel = "PATH"`, here
/// one written in assembly) with two multiboot modules (`modules`, paths
/// relative to the manifest), prints the same and ends with the same status
/// under Parallax on Bochs as under `qemu-system-x86_64 -kernel -initrd`.
#[test]
fn a_kernel_from_a_file_runs_as_on_plain_qemu() {
    let elf = assembled_kernel();
    let dir = elf.parent().unwrap().to_owned();
    std::fs::write(dir.join("mod-a.txt"), "first module line\nsecond\n").unwrap();
    std::fs::write(dir.join("mod-b.txt"), "only line").unwrap();
    let mut cfg = RunConfig::new(Machine::Qemu, emulator::capture_path("plain-kernel-asm"));
    cfg.memory_mib = 32;
    let plain = emulator::run_multiboot_on_qemu_with_modules(
        &elf,
        "from the test",
        &["mod-a.txt an argument", "mod-b.txt"],
        &cfg,
    )
    .expect("QEMU runs");
    let plain_lines: Vec<String> = plain
        .lines
        .iter()
        .filter(|l| l.source == "boot")
        .map(|l| l.text.clone())
        .collect();
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "hello from a multiboot kernel in assembly",
            "cmdline: kernel-asm from the test",
            "module: mod-a.txt an argument: first module line",
            "module: mod-b.txt: only line",
        ]
    );
    // The manifest beside the files: its paths are relative to it.
    let manifest = dir.join("kernel-asm.toml");
    let text = concat!(
        "name = \"kernel-asm\"\n[[domain]]\nname = \"asm\"\nkernel = \"kernel-asm\"\n",
        "memory_mib = 32\ncmdline = \"from the test\"\n",
        "modules = [{ path = \"mod-a.txt\", cmdline = \"an argument\" }, { path = \"./mod-b.txt\" }]\n",
    );
    let img = system_in(&manifest, "kernel-asm", text);
    let run = bochs(&img);
    run.expect_from("init", "domain 1 (asm): guest kernel-asm, 32 MiB in")
        .expect("domain 1 (asm) exited with status 16");
    assert_eq!(
        run.console(1),
        plain_lines,
        "with and without the hypervisor"
    );
}

/// Issue 14, points 1 and 3: a multiboot2 kernel and a PVH kernel (an ELF
/// with Xen's PHYS32_ENTRY note, as vmlinux has), both written in assembly
/// (`tests/kernels/hello-mb2.S`, `hello-pvh.S`), print the same and end
/// with the same status under Parallax on Bochs (two domains of one run)
/// as the multiboot2 one under GRUB on QEMU and the PVH one under
/// `qemu-system-x86_64 -kernel -initrd` (QEMU's PVH loader).
#[test]
fn multiboot2_and_pvh_kernels_run_as_under_grub_and_plain_qemu() {
    let mb2 = assemble("hello-mb2.S", "kernel-mb2", &[]);
    // The note in a loaded segment inside the domain's RAM.
    let pvh = assemble(
        "hello-pvh.S",
        "kernel-pvh",
        &["--section-start=.note.Xen=0x200000"],
    );
    let dir = mb2.parent().unwrap().to_owned();
    std::fs::write(dir.join("mod-a.txt"), "first module line\nsecond\n").unwrap();
    std::fs::write(dir.join("mod-b.txt"), "only line").unwrap();
    let (grub, status) = under_grub_on_qemu(
        &mb2,
        "from the test",
        &["mod-a.txt an argument", "mod-b.txt"],
    );
    assert_eq!(status, (0x10 << 1) | 1, "GRUB on QEMU: {grub:?}");
    assert_eq!(
        grub,
        [
            "hello from a multiboot2 kernel in assembly",
            "cmdline: from the test",
            "module: mod-a.txt an argument: first module line",
            "module: mod-b.txt: only line",
            "memory map: RAM from 1 MiB",
        ]
    );
    let (plain, plain_lines) =
        on_plain_qemu_with(&pvh, "kernel-pvh", 32, "from the test", &["mod-b.txt"]);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "hello from a PVH kernel in assembly",
            "cmdline: from the test",
            "module: only line",
            "memory map: RAM from 1 MiB",
        ]
    );
    let manifest = dir.join("kernel-formats.toml");
    let text = concat!(
        "name = \"kernel-formats\"\n",
        "[[domain]]\nname = \"mb2\"\nkernel = \"kernel-mb2\"\nmemory_mib = 32\ncmdline = \"from the test\"\n",
        "modules = [{ path = \"mod-a.txt\", cmdline = \"an argument\" }, { path = \"mod-b.txt\" }]\n",
        "[[domain]]\nname = \"pvh\"\nkernel = \"kernel-pvh\"\nmemory_mib = 32\ncmdline = \"from the test\"\n",
        "modules = [{ path = \"mod-b.txt\" }]\n",
    );
    let img = system_in(&manifest, "kernel-formats", text);
    let run = bochs(&img);
    run.expect_from("init", "domain 1 (mb2): guest kernel-mb2, 32 MiB in")
        .expect_from("init", "(Multiboot2)")
        .expect_from("init", "domain 2 (pvh): guest kernel-pvh, 32 MiB in")
        .expect_from("init", "(Pvh)")
        .expect("domain 1 (mb2) exited with status 16")
        .expect("domain 2 (pvh) exited with status 16");
    assert_eq!(
        run.console(1),
        grub,
        "multiboot2: under Parallax and under GRUB"
    );
    assert_eq!(
        run.console(2),
        plain_lines,
        "PVH: under Parallax and on plain QEMU"
    );
}

/// `tests/kernels/hello-bz.S` as a bzImage file: linked at 0xff000, so
/// that its protected-mode part (after eight sectors of real-mode part) is
/// at 1 MiB, and its bytes kept (`objcopy -O binary`).
fn assembled_bzimage() -> std::path::PathBuf {
    let elf = assemble("hello-bz.S", "bz.elf", &["-Ttext", "0xff000"]);
    let image = elf.with_file_name("bzImage-asm");
    let out = std::process::Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&image)
        .output()
        .expect("objcopy runs (Debian package binutils)");
    assert!(
        out.status.success(),
        "objcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// Issue 14, point 1: a Linux bzImage (a hand-made one: a real setup
/// header, real-mode setup code for QEMU's loader, a 32-bit entry) prints
/// the same lines and ends with the same status under plain
/// `qemu-system-x86_64 -kernel -append -initrd` (which runs its real-mode
/// setup: e820 from the BIOS) and under Parallax (its 32-bit entry with
/// the boot_params the loader built).
#[test]
fn a_bzimage_runs_as_on_plain_qemu() {
    let bz = assembled_bzimage();
    let dir = bz.parent().unwrap().to_owned();
    std::fs::write(dir.join("bz-initrd.txt"), "first initrd line\nsecond\n").unwrap();
    let (plain, plain_lines) =
        on_plain_qemu_with(&bz, "bzimage", 32, "from the test", &["bz-initrd.txt"]);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "hello from a bzImage in assembly",
            "cmdline: from the test",
            "initrd: first initrd line",
            "memory map: RAM from 1 MiB",
        ]
    );
    let run = under_parallax(
        &bz,
        "bzimage",
        concat!(
            "[[domain]]\nname = \"bz\"\nkernel = \"bzImage-asm\"\nmemory_mib = 32\ncmdline = \"from the test\"\n",
            "modules = [{ path = \"bz-initrd.txt\" }]\n",
        ),
    );
    run.expect_from("init", "domain 1 (bz): guest kernel-bz, 32 MiB in")
        .expect_from("init", "(Linux)")
        .expect("domain 1 (bz) exited with status 16");
    assert_eq!(
        run.console(1),
        plain_lines,
        "bzImage: under Parallax and on plain QEMU"
    );
}

/// Issue 14, point 2: input typed on the host reaches a kernel that reads
/// COM1 with the received-data interrupt (`tests/kernels/uart-rx.S`), as
/// on plain QEMU with the same line on `-serial stdio`: the same lines and
/// status (the line's length). Three domains run it: the first is typed to
/// through the client library, the second through `cargo hv ctl console`
/// with its stdin piped (which shows the line the domain echoes), the third (halted all the while, woken to look for
/// input) last; an unknown domain is refused.
#[test]
fn input_typed_on_the_host_reaches_com1_as_on_plain_qemu() {
    use std::io::Write as _;
    let elf = assemble("uart-rx.S", "kernel-rx", &[]);
    let typed = "parallax 42\n";
    let mut qemu = std::process::Command::new("timeout")
        .args(["60", "qemu-system-x86_64", "-display", "none", "-no-reboot"])
        .args(["-monitor", "none", "-serial", "stdio", "-m", "32"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"])
        .arg(&elf)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 runs");
    qemu.stdin
        .take()
        .unwrap()
        .write_all(typed.as_bytes())
        .unwrap();
    let out = qemu.wait_with_output().unwrap();
    let plain: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(plain, ["ready for a line", "echo: parallax 42"]);
    assert_eq!(out.status.code(), Some((11 << 1) | 1), "the line's length");
    let dir = elf.parent().unwrap().to_owned();
    let text = concat!(
        "name = \"uart-rx\"\n",
        "[[domain]]\nname = \"rx1\"\nkernel = \"kernel-rx\"\nmemory_mib = 16\n",
        "[[domain]]\nname = \"rx2\"\nkernel = \"kernel-rx\"\nmemory_mib = 16\n",
        // Waits (halted) until the end: the system runs on while rx2 ends.
        "[[domain]]\nname = \"rx3\"\nkernel = \"kernel-rx\"\nmemory_mib = 16\n",
    );
    let img = system_in(&dir.join("uart-rx.toml"), "uart-rx", text);
    let run = parallax_tests::boot_live(
        &img,
        Machine::Bochs,
        |c| c.timeout = std::time::Duration::from_secs(900),
        |live| {
            live.wait_for("dom1", "ready for a line", 600);
            live.wait_for("dom2", "ready for a line", 600);
            let mut console = live.control();
            console.console_input(1, typed.as_bytes()).unwrap();
            let e = console.console_input(9, b"x").unwrap_err();
            assert!(
                e.to_string().contains("domain 9 has no COM1 to type into"),
                "{e}"
            );
            drop(console);
            let refused = parallax_tests::ctl::refused(live.socket(), &["console", "nosuch"]);
            assert!(
                refused.contains("no domain is named \"nosuch\""),
                "{refused}"
            );
            // As `cargo hv run` does: the run's capture named beside its
            // socket, where `ctl console` reads the domain's lines.
            let runs = image_builder::paths::work_dir().join("runs");
            let prefix = format!("uart-rx-{}-", std::process::id());
            let capture = std::fs::read_dir(&runs)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(&prefix)
                })
                .max_by_key(|p| p.metadata().unwrap().modified().unwrap())
                .expect("the run's capture");
            let pointer = live.socket().with_extension("capture");
            std::fs::write(&pointer, capture.as_os_str().as_encoded_bytes()).unwrap();
            let mut ctl = parallax_tests::ctl::command(live.socket(), &["console", "rx2"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("cargo runs");
            ctl.stdin
                .take()
                .unwrap()
                .write_all(typed.as_bytes())
                .unwrap();
            let out = ctl.wait_with_output().unwrap();
            let _ = std::fs::remove_file(&pointer);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "cargo hv ctl console rx2: {err}");
            assert!(err.contains("domain 2 ended (exited, status 11)"), "{err}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "echo: parallax 42\n",
                "the domain's lines after it was attached ({err})"
            );
            live.wait_for("dom3", "ready for a line", 600);
            live.control().console_input(3, b"rx3\r").unwrap();
        },
    );
    run.expect("domain 1 (rx1) exited with status 11")
        .expect("domain 2 (rx2) exited with status 11")
        .expect("domain 3 (rx3) exited with status 3");
    assert_eq!(run.console(1), plain, "typed through the client library");
    assert_eq!(run.console(2), plain, "typed through cargo hv ctl console");
}

/// Assembled kernel `elf` (named `name`) run by plain
/// `qemu-system-x86_64 -kernel` with `mib` MiB: the run, and its console
/// lines.
fn on_plain_qemu(
    elf: &std::path::Path,
    name: &str,
    mib: u32,
) -> (emulator::RunOutcome, Vec<String>) {
    on_plain_qemu_with(elf, name, mib, "", &[])
}

/// [`on_plain_qemu`] with `-append cmdline` and `-initrd` `modules` (files
/// beside the kernel).
fn on_plain_qemu_with(
    elf: &std::path::Path,
    name: &str,
    mib: u32,
    cmdline: &str,
    modules: &[&str],
) -> (emulator::RunOutcome, Vec<String>) {
    let mut cfg = RunConfig::new(
        Machine::Qemu,
        emulator::capture_path(&format!("plain-{name}")),
    );
    cfg.memory_mib = mib;
    let plain = emulator::run_multiboot_on_qemu_with_modules(elf, cmdline, modules, &cfg)
        .expect("QEMU runs");
    let lines = plain
        .lines
        .iter()
        .filter(|l| l.source == "boot")
        .map(|l| l.text.clone())
        .collect();
    (plain, lines)
}

/// A Parallax system on Bochs whose domains are `domains` (manifest
/// tables), beside assembled kernel `elf` (named `name`).
fn under_parallax(elf: &std::path::Path, name: &str, domains: &str) -> parallax_tests::Run {
    let manifest = elf.parent().unwrap().join(format!("{name}.toml"));
    let text = format!("name = \"{name}\"\n{domains}");
    bochs(&system_in(&manifest, name, &text))
}

/// Issue 14, point 2: `tests/kernels/timer.S` programs the 8259 PICs and
/// the PIT (channel 0 periodic and one-shot, channel 2 through port 0x61),
/// halts until its timer interrupts come (the vmm injects them through
/// interrupt-window exits; HLT waits in the kernel for the PIT's next
/// edge), and prints the same and ends with the same status (0x10) under
/// Parallax on Bochs as under `qemu-system-x86_64 -kernel`. Beside it, the
/// `hello` guest runs and finishes while it waits.
#[test]
fn a_kernel_taking_pit_interrupts_through_the_pics_runs_as_on_plain_qemu() {
    let elf = assemble("timer.S", "kernel-timer", &[]);
    let (plain, plain_lines) = on_plain_qemu(&elf, "kernel-timer", 32);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "timer kernel: PICs at 0x20 and 0x28, PIT at 100 Hz",
            "10 timer interrupts taken while halted",
            "no interrupt left in service",
            "one-shot count: its interrupt taken",
            "channel 2 output high after its count",
        ]
    );
    let run = under_parallax(
        &elf,
        "kernel-timer",
        concat!(
            "[[domain]]\nname = \"timer\"\nkernel = \"kernel-timer\"\nmemory_mib = 16\n",
            "[[domain]]\nname = \"hello\"\nguest = \"hello\"\nmemory_mib = 16\n",
        ),
    );
    run.expect("domain 1 (timer) exited with status 16")
        .expect("domain 2 (hello) exited with status 0")
        .expect_no("halted with nothing to wake it")
        .expect_no("has no device");
    assert_eq!(
        run.console(1),
        plain_lines,
        "with and without the hypervisor"
    );
}

/// Issue 14, point 6: an interrupt storm (`tests/kernels/storm.S`: the PIT
/// at count 2, about 600,000 interrupts a second, taken with interrupts on
/// until 300 have come) and a triple fault (`tests/kernels/triple.S`:
/// INT3 with an empty IDT) each stay in their domain: the storm's domain
/// ends (its line, status 0x10), the triple fault's is
/// stopped with the reason named, and `hello` beside them finishes.
#[test]
fn an_interrupt_storm_and_a_triple_fault_stay_in_their_domains() {
    // (Not compared with plain QEMU: its TCG, on a loaded host, can take
    // such a timer's interrupts back to back for minutes.)
    let storm = assemble("storm.S", "kernel-storm", &[]);
    assemble("triple.S", "kernel-triple", &[]);
    let manifest = storm.parent().unwrap().join("kernel-bad.toml");
    let text = concat!(
        "name = \"kernel-bad\"\n",
        "[[domain]]\nname = \"storm\"\nkernel = \"kernel-storm\"\nmemory_mib = 16\n",
        "[[domain]]\nname = \"triple\"\nkernel = \"kernel-triple\"\nmemory_mib = 16\n",
        "[[domain]]\nname = \"hello\"\nguest = \"hello\"\nmemory_mib = 16\n",
    );
    let img = system_in(&manifest, "kernel-bad", text);
    let run = bochs(&img);
    run.expect_console(2, "triple fault kernel: INT3 with an empty IDT")
        .expect_from(
            "vmm",
            "domain 2: triple fault (the guest could not handle an exception)",
        )
        .expect("domain 2 (triple) crashed at rip")
        .expect("domain 3 (hello) exited with status 0")
        .expect_console(1, "storm: 300 timer interrupts taken")
        .expect("domain 1 (storm) exited with status 16")
        .expect_status(HaltStatus::GuestFailed);
}

/// Issue 14, point 2: `tests/kernels/pci-cmos.S` reads the host bridge's
/// configuration (00:00.0: 8086:29c0, class 06 00 00, as on QEMU's q35), an
/// absent device (all ones) and the CMOS memory registers and status D, and
/// prints the same under Parallax on Bochs as under `qemu -kernel` (both
/// with 32 MiB).
#[test]
fn pci_configuration_and_cmos_read_as_on_plain_qemu() {
    let elf = assemble("pci-cmos.S", "kernel-pci-cmos", &[]);
    let (plain, plain_lines) = on_plain_qemu(&elf, "kernel-pci-cmos", 32);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "pci 00:00.0: id 29c08086 class 06000000",
            "pci 01:00.0: ffffffff",
            "cmos 15 16 17 18 30 31 34 35 0d: 80 02 00 7c 00 7c 00 01 80",
        ]
    );
    let run = under_parallax(
        &elf,
        "kernel-pci-cmos",
        "[[domain]]\nname = \"pc\"\nkernel = \"kernel-pci-cmos\"\nmemory_mib = 32\n",
    );
    run.expect("domain 1 (pc) exited with status 16");
    let trimmed =
        |l: &[String]| -> Vec<String> { l.iter().map(|s| s.trim_end().to_owned()).collect() };
    assert_eq!(
        trimmed(&run.console(1)),
        trimmed(&plain_lines),
        "with and without the hypervisor"
    );
}

/// Issue 14, point 2: `tests/kernels/acpi.S` finds the RSDP (in the EBDA
/// under Parallax, in the BIOS area on QEMU), the FADT through the RSDT, its
/// PM1a control port and the DSDT, and powers off through PM1a control:
/// the same lines under Parallax on Bochs as under `qemu -machine q35
/// -kernel`, QEMU exiting (status 0) and the domain ending with status 0.
#[test]
fn a_kernel_powers_off_through_the_acpi_tables_as_on_plain_qemu() {
    let elf = assemble("acpi.S", "kernel-acpi", &[]);
    let (plain, plain_lines) = on_plain_qemu(&elf, "kernel-acpi", 32);
    assert_eq!(
        plain.end,
        RunEnd::EmulatorExited { code: Some(0) },
        "{}",
        plain.summary()
    );
    assert_eq!(
        plain_lines,
        [
            "acpi: RSDP found, checksum right",
            "acpi: FADT in the RSDT, PM1a control at port 0x0604",
            "acpi: DSDT present; powering off through PM1a control",
        ]
    );
    let run = under_parallax(
        &elf,
        "kernel-acpi",
        "[[domain]]\nname = \"acpi\"\nkernel = \"kernel-acpi\"\nmemory_mib = 32\n",
    );
    run.expect_from("vmm", "domain 1: powered off through ACPI (S5)")
        .expect("domain 1 (acpi) exited with status 0")
        .expect_status(HaltStatus::Success);
    assert_eq!(
        run.console(1),
        plain_lines,
        "with and without the hypervisor"
    );
}

/// Issue 14, point 2: `tests/kernels/x2apic.S` turns x2APIC mode on, takes
/// a one-shot, three periodic and one TSC-deadline timer interrupt while
/// halted and a self-IPI, each ended with an EOI, and finds nothing left in
/// service: its six lines and status 0x10 under Parallax on Bochs. Plain
/// QEMU 7.2 (TCG) has no x2APIC to compare with: there the same kernel
/// says so and ends with 0x13, which the test checks too.
#[test]
fn a_kernel_using_the_x2apic_timers_and_self_ipi_runs_under_parallax() {
    let elf = assemble("x2apic.S", "kernel-x2apic", &[]);
    let (plain, _) = on_plain_qemu(&elf, "kernel-x2apic", 16);
    assert_eq!(plain.exit_code(), 0x13, "{}", plain.summary());
    let run = under_parallax(
        &elf,
        "kernel-x2apic",
        "[[domain]]\nname = \"apic\"\nkernel = \"kernel-x2apic\"\nmemory_mib = 16\n",
    );
    run.expect("domain 1 (apic) exited with status 16");
    assert_eq!(
        run.console(1),
        [
            "x2APIC on, APIC enabled",
            "one-shot timer: its interrupt taken while halted",
            "periodic timer: 3 interrupts taken while halted",
            "TSC-deadline timer: its interrupt taken while halted",
            "self-IPI taken",
            "nothing left in service",
        ]
    );
}

/// Issue 14, point 2: `tests/kernels/xapic.S` finds the MADT through the
/// RSDP and RSDT, its local APIC address, PCAT_COMPAT and processor, then
/// programs the local APIC through the xAPIC page at that address (ID,
/// version, spurious vector, a one-shot and a periodic timer interrupt
/// while halted, a self-IPI through the ICR, EOIs, the in-service registers
/// at the end): the same eight lines and status (0x10) under `qemu -machine
/// q35 -kernel` and under Parallax on Bochs, where reads come from the
/// vCPU's virtual-APIC page and writes are APIC-write exits to the vmm.
/// Beside it, issue 14 point 6: `tests/kernels/apic-nonsense.S` writes
/// pseudo-random values to every writable register of its xAPIC page and
/// then reads the current count, which is not emulated through the page:
/// its domain is stopped, saying so; the first domain and `hello` finish.
#[test]
fn a_kernel_programming_the_xapic_page_from_the_madt_runs_as_on_plain_qemu() {
    let elf = assemble("xapic.S", "kernel-xapic", &[]);
    assemble("apic-nonsense.S", "kernel-apic-nonsense", &[]);
    let (plain, plain_lines) = on_plain_qemu(&elf, "kernel-xapic", 32);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "madt: local APIC at 0xfee00000, PCAT_COMPAT",
            "madt: processor local APIC, ID 0x00, enabled",
            "xapic: ID 0x00, version 0x14, 0x06 LVT entries",
            "xapic: spurious-vector register 0x01ff",
            "one-shot timer: its interrupt taken while halted",
            "periodic timer: 3 interrupts taken while halted",
            "self-IPI through the ICR taken",
            "nothing left in service",
        ]
    );
    let run = under_parallax(
        &elf,
        "kernel-xapic",
        concat!(
            "[[domain]]\nname = \"xapic\"\nkernel = \"kernel-xapic\"\nmemory_mib = 16\n",
            "[[domain]]\nname = \"nonsense\"\nkernel = \"kernel-apic-nonsense\"\nmemory_mib = 16\n",
            "[[domain]]\nname = \"hello\"\nguest = \"hello\"\nmemory_mib = 16\n",
        ),
    );
    run.expect("domain 1 (xapic) exited with status 16")
        .expect_from(
            "vmm",
            "domain 2: read of local APIC register 0x390 through the xAPIC page",
        )
        .expect("domain 2 (nonsense) crashed")
        .expect("domain 3 (hello) exited with status 0");
    assert_eq!(
        run.console(1),
        plain_lines,
        "with and without the hypervisor"
    );
    assert_eq!(run.console(2), ["nonsense written to the local APIC"]);
}

/// Issue 14, point 2: `tests/kernels/ioapic.S` finds the I/O APIC and the
/// override of ISA IRQ 0 (GSI 2) in the MADT, reads its entry count
/// through IOREGSEL and IOWIN, and with the 8259s masked takes three PIT
/// interrupts on the override's pin and one COM1 interrupt on pin 4,
/// routed to the local APIC and ended by its EOI; then it writes the I/O
/// APIC nonsense (a register that is not there, an unmasked entry for
/// vector 3, an NMI entry), which the vmm refuses, logging why, and goes
/// on: the same lines and status (0x10) as under `qemu -machine q35
/// -kernel`. Beside it `tests/kernels/absent.S` reads and writes where no
/// RAM and no device is, through MOV (A1, 8B, 8A), MOVZX and MOVSX: every
/// read all ones, every write dropped, logged once for the page, status 0
/// as on QEMU (where the address is an empty bus's configuration space);
/// and `hello` finishes beside them.
#[test]
fn a_kernel_taking_isa_interrupts_through_the_ioapic_runs_as_on_plain_qemu() {
    let elf = assemble("ioapic.S", "kernel-ioapic", &[]);
    let absent = assemble("absent.S", "kernel-absent", &[]);
    let (plain, plain_lines) = on_plain_qemu(&elf, "kernel-ioapic", 32);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "madt: I/O APIC at 0xfec00000, GSI base 0x00, ISA IRQ 0 on GSI 0x02",
            "ioapic: 0x18 redirection entries, masked at reset",
            "PIT: 3 interrupts through the I/O APIC taken while halted",
            "COM1: its interrupt through the I/O APIC taken while halted",
            "nonsense written to the I/O APIC",
        ]
    );
    let (plain_absent, absent_lines) = on_plain_qemu(&absent, "kernel-absent", 32);
    assert_eq!(plain_absent.exit_code(), 0, "{}", plain_absent.summary());
    assert_eq!(
        absent_lines,
        [
            "absent MMIO at 0xb0100000 reads 0xffffffff",
            "bytes, words and longs read all ones; writes changed nothing",
        ]
    );
    let run = under_parallax(
        &elf,
        "kernel-ioapic",
        concat!(
            "[[domain]]\nname = \"ioapic\"\nkernel = \"kernel-ioapic\"\nmemory_mib = 16\n",
            "[[domain]]\nname = \"absent\"\nkernel = \"kernel-absent\"\nmemory_mib = 16\n",
            "[[domain]]\nname = \"hello\"\nguest = \"hello\"\nmemory_mib = 16\n",
        ),
    );
    run.expect("domain 1 (ioapic) exited with status 16")
        .expect_from(
            "vmm",
            "domain 1: I/O APIC access refused or ignored: Register(119)",
        )
        .expect_from("vmm", "Vector { pin: 5, vector: 3 }")
        .expect_from("vmm", "DeliveryMode { pin: 6, mode: 4 }")
        .expect_from(
            "vmm",
            "domain 2: read of 4 bytes at 0xb0100000: no device there",
        )
        .expect("domain 2 (absent) exited with status 0")
        .expect("domain 3 (hello) exited with status 0");
    assert_eq!(
        run.console(1),
        plain_lines,
        "with and without the hypervisor"
    );
    assert_eq!(
        run.console(2),
        absent_lines,
        "with and without the hypervisor"
    );
}

/// Issue 14, point 2: `tests/kernels/uart-irq.S` sends a line through the
/// 16550 one transmitter-empty interrupt (IRQ 4 through the PICs) per
/// byte while halting, then one by polling: the same lines and status
/// (0x10) under Parallax on Bochs as under `qemu-system-x86_64 -kernel`.
#[test]
fn interrupt_driven_console_output_runs_as_on_plain_qemu() {
    let elf = assemble("uart-irq.S", "kernel-uart-irq", &[]);
    let (plain, plain_lines) = on_plain_qemu(&elf, "kernel-uart-irq", 16);
    assert_eq!(plain.exit_code(), 0x10, "{}", plain.summary());
    assert_eq!(
        plain_lines,
        [
            "this line went out one interrupt per byte",
            "and this one by polling",
        ]
    );
    let run = under_parallax(
        &elf,
        "kernel-uart-irq",
        "[[domain]]\nname = \"uart\"\nkernel = \"kernel-uart-irq\"\nmemory_mib = 16\n",
    );
    run.expect("domain 1 (uart) exited with status 16");
    assert_eq!(
        run.console(1),
        plain_lines,
        "with and without the hypervisor"
    );
}

#[test]
fn cpuid_hides_vmx_and_shows_the_parallax_leaves() {
    let run = bochs(&one_guest("cpuid"));
    run.expect_console(1, "vendor: \"GenuineIntel\"")
        .expect_console(1, "vmx: no")
        .expect_console(1, "hypervisor bit: yes")
        .expect_console(1, "hypervisor signature: \"ParallaxHV\"")
        .expect_console(1, "hypervisor max leaf: 0x40000010")
        .expect_status(HaltStatus::Success);
    // Plain QEMU (TCG) has no VMX to hide and another signature; the lines
    // that do not name the hypervisor or the vendor are the same.
    let (plain, status) = plain_qemu("cpuid");
    assert_eq!(status, 0);
    let neutral = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with("hypervisor") && !l.starts_with("vendor"))
            .cloned()
            .collect()
    };
    assert_eq!(neutral(&run.console(1)), neutral(&plain));
}

/// Issue 14, point 2: a read where the domain has no RAM and no device
/// is answered as a PC answers it (all ones) and the guest goes on: the
/// `unmapped` guest's 64-bit MOV at 1 GiB, in long mode with paging, is
/// decoded by the vmm through the guest's page tables; the page is logged
/// once.
#[test]
fn touching_memory_outside_ram_reads_all_ones_and_the_domain_goes_on() {
    bochs(&one_guest("unmapped"))
        .expect_console(1, "touching 0x40000000")
        .expect_console(
            1,
            "still running after touching unmapped memory (read 0xffffffffffffffff)",
        )
        .expect_from(
            "vmm",
            "domain 1: read of 8 bytes at 0x40000000: no device there",
        )
        .expect("domain 1 (unmapped) exited with status 0");
}

#[test]
fn one_domain_crashes_and_the_other_finishes() {
    let img = system(
        "two-domains",
        r#"
        name = "two"
        [[domain]]
        name = "crasher"
        guest = "hostile"
        cmdline = "attack=vmx"
        memory_mib = 16
        [[domain]]
        name = "survivor"
        guest = "hello"
        memory_mib = 16
        "#,
    );
    let run = bochs(&img);
    run.expect("domain 1 (crasher) crashed")
        .expect_console(2, "Hello from a Parallax test guest")
        .expect("domain 2 (survivor) exited with status 0")
        .expect_status(HaltStatus::GuestFailed);
}

#[test]
fn vmfunc_switches_views_without_exits_and_refuses_a_hidden_index() {
    bochs(&one_guest("vmfunc"))
        .expect_console(1, "capabilities: vmfunc true")
        .expect_console(1, "vmfunc switches: 200, exits: 0")
        .expect_from(
            "vmm",
            "VMFUNC leaf 0 index 400 refused (no such visible view): #UD",
        )
        .expect_console(1, "invalid view index refused with #UD")
        .expect_console(1, "vmfunc: all checks passed")
        .expect_status(HaltStatus::Success);
}

#[test]
fn a_violation_with_suppress_ve_clear_becomes_a_ve_in_the_guest() {
    bochs(&one_guest("ve"))
        .expect_console(1, "#VE delivered: gpa 0x")
        .expect_console(1, "exit reason 48")
        .expect_console(1, "ve: all checks passed")
        .expect_status(HaltStatus::Success);
}

#[test]
fn a_violation_with_suppress_ve_set_exits_to_the_hypervisor_instead() {
    let img = system(
        "ve-suppressed",
        "name = \"x\"\n[[domain]]\nname = \"ve\"\nguest = \"ve\"\nmemory_mib = 32\ncmdline = \"suppressed\"\n",
    );
    bochs(&img)
        .expect_console(1, "with suppress-#VE set: the hypervisor must see it")
        .expect_from("altp2m", "domain 1: write of 0x")
        .expect_from(
            "altp2m",
            "in view 1 not allowed (page allows true/false/false read/write/execute",
        )
        .expect_from("altp2m", "no listener, so the domain is stopped")
        .expect_no("FAIL")
        .expect_status(HaltStatus::GuestFailed);
}

// Dirty logging, PML and its absence: tests/logdirty.rs.

#[test]
fn broadwell_without_pml_runs_views_as_before() {
    bochs_model(&one_guest("vmfunc"), "broadwell_ult")
        .expect_console(1, "vmfunc: all checks passed")
        .expect_status(HaltStatus::Success);
}

#[test]
fn ivy_bridge_without_vmfunc_or_ve_falls_back_cleanly() {
    bochs_model(&one_guest("vmfunc"), "corei7_ivy_bridge_3770k")
        .expect("VMFUNC EPTP switching false")
        .expect_console(1, "no VMFUNC: switched by hypercall")
        .expect_status(HaltStatus::Success);
    bochs_model(&one_guest("ve"), "corei7_ivy_bridge_3770k")
        .expect_console(1, "no #VE on this CPU")
        .expect_status(HaltStatus::Success);
}

#[test]
fn the_benchmark_guest_reports_every_figure() {
    let run = bochs(&one_guest("bench"));
    run.expect_status(HaltStatus::Success);
    let figures = image_builder::bench::figures(&run.0.lines).expect("BENCH lines");
    for key in [
        "rdtsc_frame_ticks",
        "vmcall_kernel_ticks",
        "vmfunc_switch_ticks",
        "vmfunc_switch_exits",
        "view_switch_hypercall_ticks",
        "lazy_fill_ticks",
        "first_touch_exits",
        "view_create_ticks",
        "vmcall_service_ticks",
        "ipc_roundtrip_ticks",
        "ve_delivery_ticks",
        "dirty_wp_fault_ticks",
        "dirty_pml_exits_per_1000_pages",
    ] {
        assert!(
            figures.get(key).is_some_and(|v| v.is_some()),
            "{key} missing: {figures:?}"
        );
    }
    // Functional, not timings: VMFUNC switches cause no exits at all, and
    // neither does a first touch of memory through a new view (a copy of
    // the host p2m).
    assert_eq!(figures["vmfunc_switch_exits"], Some(0));
    assert_eq!(figures["first_touch_exits"], Some(0));
    // Without a listener in the image the violation figure is not taken
    // (`cargo hv bench` has one).
    assert_eq!(figures["violation_event_ticks"], None);
}

/// The exit fast paths (`kernel/src/sys/fastpath.rs`) are shortcuts of the
/// general path: with the kernel option `fastpath=off` every exit and every
/// answer takes the general one, and the guests see exactly the same.
#[test]
fn the_general_exit_path_gives_what_the_fast_paths_give() {
    for name in ["cpuid", "hello"] {
        let fast = bochs(&one_guest(name));
        let general = bochs(&one_guest_with_options(name, "fastpath=off"));
        general
            .expect("IPC: fast paths off (fastpath=off)")
            .expect_status(HaltStatus::Success);
        fast.expect_no("fast paths off")
            .expect_status(HaltStatus::Success);
        assert_eq!(fast.console(1), general.console(1), "{name}");
    }
    // Every kind of exit a service answers (hypercalls to the vmm and, through
    // it, the altp2m service; lazily filled views; #VE set-up), general path.
    let run = bochs(&one_guest_with_options("bench", "fastpath=off"));
    run.expect_status(HaltStatus::Success);
    let figures = image_builder::bench::figures(&run.0.lines).expect("BENCH lines");
    for key in [
        "vmcall_service_ticks",
        "ipc_roundtrip_ticks",
        "view_switch_hypercall_ticks",
        "lazy_fill_ticks",
        "ve_delivery_ticks",
    ] {
        assert!(
            figures.get(key).is_some_and(|v| v.is_some()),
            "{key} missing: {figures:?}"
        );
    }
}

/// `cargo hv profile`: a null hypercall the kernel answers is traced from the
/// guest into the kernel and back, and its instructions are attributed to
/// the kernel's entry and exit code and its own-exit check.
#[test]
fn a_profile_follows_a_hypercall_through_the_kernel() {
    use image_builder::compile::BuildOptions;
    let profile = image_builder::profile::run(
        &image_builder::bench::BenchRun {
            cpu_model: "corei7_skylake_x".to_owned(),
            build: BuildOptions {
                line_tables: true,
                ..BuildOptions::default()
            },
            cmdline: String::new(),
            guest_options: String::new(),
            timeout: std::time::Duration::from_secs(300),
        },
        "vmcall_kernel_ticks",
    )
    .expect("the profile run works");
    let segments = profile.segments();
    let order: Vec<&str> = segments.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(&order[..3], ["guest", "kernel", "guest"], "{segments:?}");
    let functions: Vec<String> = profile
        .by(|p| p.inner.clone())
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    for f in ["vmx_exit", "kernel::vmx::run::vmx_enter", "fast_path"] {
        assert!(functions.iter().any(|g| g == f), "{f} not in {functions:?}");
    }
    let report = profile.report(10, false);
    assert!(
        report.contains("profile of vmcall_kernel_ticks"),
        "{report}"
    );
}

/// The listener faults while it holds a forwarded exit (on its third, the
/// manifest giving it `fault-once`): the kernel sends the exit back to
/// altp2m (the endpoint it was forwarded from), unrestricted, which
/// handles it afresh: held, as the restarted listener does not wait yet,
/// and fetched by it with `NextEvent`. The guest's write completes, every
/// figure is taken, and the restarted listener takes forwards again. (Run
/// by the test below, after it: both build `bench.iso`.)
fn a_listener_that_dies_holding_a_forwarded_exit_loses_nothing() {
    let run = image_builder::bench::BenchRun {
        cpu_model: "corei7_skylake_x".to_owned(),
        build: image_builder::compile::BuildOptions::default(),
        cmdline: String::new(),
        guest_options: "listener-fault".to_owned(),
        timeout: std::time::Duration::from_secs(300),
    };
    let (outcome, _) = image_builder::bench::boot(&run, None).expect("the run ends well");
    let log: Vec<String> = outcome.lines.iter().map(|l| l.to_string()).collect();
    let at = |what: &str| log.iter().position(|l| l.contains(what));
    let fault = at("faulting on purpose").expect("the listener faulted");
    let again = log
        .iter()
        .skip(fault)
        .any(|l| l.contains("listener: answering") && l.contains("forwarded: true"));
    assert!(again, "the listener restarted and takes forwards: {log:#?}");
    let figures = image_builder::bench::figures(&outcome.lines).expect("its figures");
    let ticks = figures["violation_event_ticks"].expect("measured");
    assert!(
        ticks < 2_400,
        "violation_event_ticks {ticks}: forwards again"
    );
}

/// The benchmark image, with its listener service: every violation of the
/// benchmark's view becomes an event altp2m forwards to the listener (the
/// exit itself, restricted), which answers it (back to view 0, a plain
/// answer with a view) straight into the vCPU, and the guest's write
/// completes; the view-switch hypercall goes
/// to the altp2m service and back. The same through the general path
/// (`fastpath=off`), which applies those answers the long way.
#[test]
fn the_listener_answers_violations_through_next_event_on_both_paths() {
    use image_builder::compile::BuildOptions;
    for cmdline in ["", "fastpath=off"] {
        let run = image_builder::bench::BenchRun {
            cpu_model: "corei7_skylake_x".to_owned(),
            build: BuildOptions::default(),
            cmdline: cmdline.to_owned(),
            guest_options: String::new(),
            timeout: std::time::Duration::from_secs(300),
        };
        let (outcome, _) = image_builder::bench::boot(&run, None).expect("the run ends well");
        let log: Vec<String> = outcome.lines.iter().map(|l| l.to_string()).collect();
        // The listener takes its events forwarded (REPLY_RECV's forward,
        // docs/ipc.md), and nothing on its way was refused or failed.
        assert!(
            log.iter()
                .any(|l| l.contains("listener: answering") && l.contains("forwarded: true")),
            "{cmdline}: {log:#?}"
        );
        // A forward wrong in one way is refused with the error that names
        // it, and with nothing done (the listener tries eight on its first
        // forwarded exit; the exit is still its own after them, as the
        // refusals below show).
        assert!(
            log.iter()
                .any(|l| l.contains("8 of 8 wrong forwards refused, each with its own error")),
            "{cmdline}: {log:#?}"
        );
        // A restricted holder gets no power over the vCPU's registers:
        // its answers that are not plain were refused (the listener tries
        // four on its first forwarded exit), and the vCPU went on.
        assert!(
            log.iter()
                .any(|l| l.contains("4 of 4 answers that are not plain refused")),
            "{cmdline}: {log:#?}"
        );
        for bad in [
            "listener: receive failed",
            "a wrong forward",
            "not plain:",
            "took an answer that is not plain",
            "answered otherwise",
            "could not be resumed",
        ] {
            assert!(
                !log.iter().any(|l| l.contains(bad)),
                "{cmdline}: {bad}: {log:#?}"
            );
        }
        let figures = image_builder::bench::figures(&outcome.lines).expect("its figures");
        for key in [
            "violation_event_ticks",
            "view_switch_hypercall_ticks",
            "view_create_ticks",
        ] {
            assert!(
                figures.get(key).is_some_and(|v| v.is_some()),
                "{cmdline}: {key} missing: {figures:?}"
            );
        }
        assert_eq!(figures["first_touch_exits"], Some(0), "{cmdline}");
        if cmdline.is_empty() {
            // Three transitions, not the four of an event held for
            // `NextEvent` (2,675 instructions on this CPU model before the
            // forward; 2,061 with it): the forward was taken.
            let ticks = figures["violation_event_ticks"].expect("measured");
            assert!(
                ticks < 2_400,
                "violation_event_ticks {ticks}: not forwarded?"
            );
        }
    }
    a_listener_that_dies_holding_a_forwarded_exit_loses_nothing();
}
