//! Issue 14, point 4: Debian 12's packaged Linux boots under Parallax on
//! Bochs (corei7_skylake_x), one vCPU, through its PVH entry, with a small
//! initramfs whose /init prints a line and powers the machine off.
//!
//! The package is downloaded by `apt-get download` (kept in
//! `target/hv/linux/`, never committed), its vmlinux taken out of the
//! xz-compressed bzImage and trimmed, the initramfs built from
//! `tests/kernels/linux-init.c` (`image_builder::linux`). Without a
//! network the test says loudly that it did not run, and passes.

use image_builder::emulator::Machine;
use image_builder::linux;
use ipc_schema::halt::HaltStatus;
use parallax_tests::{boot, system_in};

#[test]
fn debian_linux_boots_to_its_init_and_powers_off() {
    let files = match linux::prepare() {
        Ok(f) => f,
        Err(e) if format!("{e:#}").contains("download failed") => {
            eprintln!(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: the Linux boot test did not run: the kernel package could\n\
                 !!! not be downloaded ({e:#})\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            return;
        }
        Err(e) => panic!("preparing Linux: {e:#}"),
    };
    let started = std::time::Instant::now();
    // /init sleeps one second of guest time before powering off: its idle
    // line is what `cargo hv bench` reports as idle_exits_per_second.
    let cmdline = format!("{} pxidle=1", linux::CMDLINE);
    let text = linux::manifest(&files, "linux-test", &cmdline);
    let img = system_in(&linux::dir().join("linux-test.toml"), "linux-test", &text);
    let run = boot(&img, Machine::Bochs, |c| {
        c.memory_mib = 512;
        c.timeout = std::time::Duration::from_secs(900);
    });
    run.expect_from("init", "domain 1 (linux): guest")
        .expect_from("init", "(Pvh)")
        .expect_console(1, "Linux version 6.1")
        .expect_console(1, &format!("Command line: {cmdline}"))
        // Its interrupts through the I/O APIC the MADT lists (no `noapic`).
        .expect_console(
            1,
            "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        )
        .expect_console(1, "Run /init as init process")
        .expect_console(1, linux::INIT_LINE)
        .expect_console(1, "parallax-init: powering off")
        .expect_console(1, "reboot: Power down")
        .expect_from("vmm", "domain 1: powered off through ACPI (S5)")
        .expect("domain 1 (linux) exited with status 0")
        .expect_status(HaltStatus::Success);
    let lines: Vec<String> = run.0.lines.iter().map(|l| l.to_string()).collect();
    let (boot_ticks, idle) = linux::figures(&lines);
    let (start, init) = boot_ticks.expect("the domain's start and /init's TSC in the log");
    let (ns, exits) = idle.expect("/init's idle line");
    assert!(init > start, "/init ran after the domain started");
    assert!(ns >= 1_000_000_000, "/init slept a second: {ns} ns");
    let exits_line = lines
        .iter()
        .find(|l| l.contains("exits to the vmm since it touched an interrupt source"))
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "linux {}: domain start to /init's first line {} ticks; idle: {} exits in {} ns ({:.1} a second); {exits_line}; the run took {:.0} s",
        files.version,
        init - start,
        exits,
        ns,
        exits as f64 * 1e9 / ns as f64,
        started.elapsed().as_secs_f64()
    );
}
