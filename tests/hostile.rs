//! Hostile guests (`tests/guests/hostile`) beside benign ones, on Bochs:
//! each attack must stop or contain the attacker alone, the benign domains
//! must finish with the right output, and the control channel must answer.
//! docs/security.md lists the attacks and their outcomes.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use ipc_schema::syscall::DomainOp;
use parallax_tests::{Run, boot_live, system};
use std::time::Duration;

/// A `[[domain]]` of the manifest, with 16 MiB of RAM.
fn domain(name: &str, guest: &str, cmdline: &str) -> String {
    domain_mib(name, guest, cmdline, 16)
}

fn domain_mib(name: &str, guest: &str, cmdline: &str, mib: u32) -> String {
    format!(
        "[[domain]]\nname = \"{name}\"\nguest = \"{guest}\"\nmemory_mib = {mib}\ncmdline = \"{cmdline}\"\n"
    )
}

/// The control channel answers: the services and the domains are listed.
fn control_answers(live: &mut parallax_tests::Live) {
    let mut ctl = live.control();
    ctl.set_timeout(Duration::from_secs(30));
    let services = ctl.services().expect("the console answers");
    assert!(services.len() >= 3, "{services:?}");
    let domains = ctl.domains().expect("the console answers");
    assert!(!domains.is_empty(), "{domains:?}");
}

/// Where the first line of `source` containing `text` stands in the log.
fn position(run: &Run, source: &str, text: &str) -> usize {
    run.0
        .lines
        .iter()
        .position(|l| l.source == source && l.text.contains(text))
        .unwrap_or_else(|| panic!("no {source} line containing {text:?}\n{}", run.log()))
}

/// One boot, four attacks that end by themselves, and a benign ticker:
/// - time: a guest looping on null hypercalls (answered by the kernel
///   without a service) must not keep the ticker from running: before
///   slices held across such exits, it owned the CPU until it ended;
/// - state leaks: two guests write markers into the registers VMX does not
///   switch (FPU/SSE/AVX, DR0-DR3, CR2, KERNEL_GS_BASE) and check, while
///   the other runs, that they see only their own;
/// - hypercalls from guest user mode are refused (`NotPermitted`), from the
///   guest kernel answered.
///
/// Its five domains (64 MiB and four of 16) did not all build before: init
/// ran out of handle slots, not the machine out of memory.
#[test]
fn spinning_leaking_and_user_mode_attackers_are_contained() {
    let toml = format!(
        "name = \"hostile-contained\"\n{}{}{}{}{}",
        domain("spinner", "hostile", "attack=spin n=400000"),
        domain_mib("ticker", "ticker", "ticks=20 calls=400", 64),
        domain("red", "hostile", "attack=markers tag=1 rounds=12"),
        domain("blue", "hostile", "attack=markers tag=2 rounds=12"),
        domain("user", "hostile", "attack=user-hypercall"),
    );
    let img = system("hostile-contained", &toml);
    let run = boot_live(
        &img,
        Machine::Bochs,
        |c| c.timeout = Duration::from_secs(600),
        // While the attackers run, the control channel answers.
        |live| {
            live.wait_for("dom3", "markers: round 2 ok", 300);
            control_answers(live);
        },
    );
    run.expect_console(2, "ticker: done")
        .expect_console(1, "spin: done")
        .expect_console(3, "markers: done")
        .expect_console(4, "markers: done")
        .expect_console(5, "user-hypercall: refused from user mode")
        .expect_status(HaltStatus::Success);
    for id in [3, 4] {
        let bad: Vec<String> = run
            .console(id)
            .into_iter()
            .filter(|l| l.contains("LEAK") || l.contains("LOST"))
            .collect();
        assert!(bad.is_empty(), "domain {id}: {bad:?}\n{}", run.log());
    }
    // Time: the ticker, with a fifth of the spinner's work, ends first.
    assert!(
        position(&run, "dom2", "ticker: done") < position(&run, "dom1", "spin: done"),
        "the spinner kept the CPU\n{}",
        run.log()
    );
    // The marker guests really ran in turns (each saw the other run between
    // its checks): their rounds interleave.
    let red_first = position(&run, "dom3", "round 1 ok");
    let red_last = position(&run, "dom3", "round 12 ok");
    let blue_between = run.0.lines[red_first..red_last]
        .iter()
        .any(|l| l.source == "dom4" && l.text.contains(" ok"));
    assert!(
        blue_between,
        "the marker guests did not interleave\n{}",
        run.log()
    );
}

/// Attacks that would deafen the host: a guest spinning with interrupts
/// off (cli; jmp $) for ever, and one that sets its task priority (CR8) to
/// 15 and exits; beside them guests that probe the host's ports (the
/// control channel's COM2, Bochs's shutdown port, the reset ports), its
/// MSRs, CR4.VMXE and random hypercalls (each refused, the guest going on),
/// one that executes VMXON (stopped alone) and one that sends INIT to all
/// other CPUs through the local APIC page (which reaches only its own
/// local APIC) and then reads the timer's current count there (stopped
/// alone). The control channel must answer after all of them
/// while the spinner spins; the spinner is then destroyed from the host and
/// the benign guest finishes.
#[test]
fn cli_spin_and_cr8_leave_the_control_channel_answering() {
    let toml = format!(
        "name = \"hostile-deaf\"\n{}{}{}{}{}{}",
        domain("priority", "hostile", "attack=cr8"),
        domain("spinner", "hostile", "attack=cli-spin"),
        domain("hello", "hello", ""),
        domain("prober", "hostile", "attack=probe"),
        domain("vmx", "hostile", "attack=vmx"),
        domain("mmio", "hostile", "attack=mmio"),
    );
    let img = system("hostile-deaf", &toml);
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            live.wait_for("dom1", "cr8: wrote 15, reads 15", 120);
            live.wait_for("kernel", "domain 1 (priority) exited with status 0", 60);
            live.wait_for("dom2", "spinning with interrupts off", 120);
            live.wait_for("kernel", "domain 4 (prober) exited with status 0", 300);
            live.wait_for("kernel", "domain 5 (vmx) crashed", 120);
            live.wait_for("kernel", "domain 6 (mmio) crashed", 120);
            let mut ctl = live.control();
            ctl.set_timeout(Duration::from_secs(30));
            let services = ctl.services().expect("the console answers");
            assert!(services.len() >= 3, "{services:?}");
            let domains = ctl.domains().expect("the console answers");
            assert!(domains.len() >= 3, "{domains:?}");
            ctl.domain_control(2, DomainOp::Destroy)
                .expect("the spinner is destroyed");
        },
    );
    run.expect_console(3, "hello")
        .expect_console(4, "8 absent host ports read all ones, 12 modelled ones reach the domain's own devices; writes went nowhere")
        .expect_console(4, "host and VMX MSRs refused with #GP")
        .expect_console(4, "CR4.VMXE refused with #GP")
        .expect_console(4, "3000 random hypercalls answered")
        .expect_console(4, "every refusal held")
        .expect_from("vmm", "domain 5: unhandled exit: other (reason 27")
        .expect("domain 3 (hello) exited with status 0")
        .expect("domain 5 (vmx) crashed")
        .expect_console(6, "mmio: INIT to all others sent through the ICR at 0xfee00300; still running")
        .expect_from("vmm", "domain 6: read of local APIC register 0x390 through the xAPIC page")
        .expect("domain 6 (mmio) crashed")
        .expect_from("init", "domain 2: Destroy on request")
        // Two attackers were stopped: the run says a guest failed.
        .expect_status(HaltStatus::GuestFailed);
}

/// EPT table memory: a guest creating views and filling each over all its
/// RAM reaches its domain's table quota and is stopped or refused alone;
/// its views' tables come back when it ends; the in-guest agent beside it
/// creates and uses views as usual.
#[test]
fn a_guest_filling_views_stays_within_its_table_quota() {
    let toml = format!(
        "name = \"hostile-views\"\n{}{}{}",
        // 64 MiB under a write-protection dirty log: each view (a copy of
        // the host p2m in 4 KiB pages) takes 36 tables, so that the
        // kernel's table quota (1,552) stops the attacker before the
        // altp2m service's quota of 64 views.
        domain_mib("filler", "hostile", "attack=views", 64),
        domain_mib("agent", "agent", "checks", 32),
        domain("ticker", "ticker", "ticks=0 calls=20"),
    );
    let img = system("hostile-views", &toml);
    let run = boot_live(
        &img,
        Machine::Bochs,
        |c| c.timeout = Duration::from_secs(600),
        // Once the attacker is refused, the control channel answers and the
        // ticker (which runs until destroyed) still ticks.
        |live| {
            live.wait_for("kernel", "alternate view(s) freed", 300);
            control_answers(live);
            live.ticks_on("dom3", 1, 120);
            live.wait_for("kernel", "domain 2 (agent) exited with status 0", 300);
            live.control()
                .domain_control(3, DomainOp::Destroy)
                .expect("the ticker is destroyed");
        },
    );
    run.expect_console(2, "agent: all checks passed")
        .expect("EPT tables: a domain reached its quota of")
        .expect_console(1, "refused: OutOfMemory")
        .expect("domain 1 (filler) exited with status 0")
        .expect("alternate view(s) freed")
        .expect("domain 2 (agent) exited with status 0");
}

/// CR8 alone (the boot above also has a guest spinning with interrupts
/// off): a guest sets its task priority to 15 and exits; a ticker keeps the
/// system up, and the control channel must still answer. Without the TPR
/// shadow the write reached the host's local APIC and the console timed out.
#[test]
fn a_guest_setting_cr8_to_15_leaves_the_host_hearing() {
    let toml = format!(
        "name = \"hostile-cr8\"\n{}{}",
        domain("priority", "hostile", "attack=cr8"),
        domain("ticker", "ticker", "ticks=0 calls=200"),
    );
    let img = system("hostile-cr8", &toml);
    let run = boot_live(
        &img,
        Machine::Bochs,
        |c| c.timeout = Duration::from_secs(200),
        |live| {
            live.wait_for("kernel", "domain 1 (priority) exited with status 0", 120);
            control_answers(live);
            live.ticks_on("dom2", 1, 120);
            live.control()
                .domain_control(2, DomainOp::Destroy)
                .expect("the ticker is destroyed");
        },
    );
    run.expect_console(1, "cr8: wrote 15, reads 15")
        .expect_status(HaltStatus::Success);
}
