//! A hostile service: the `fuzz` task makes 100,000 system calls with random
//! numbers, pointers, lengths and handle slots, the IPC fast paths among
//! them, with handles that reach only its own endpoints, notification,
//! frames and (on Bochs) domain. The kernel must refuse what is wrong, write
//! nowhere it was not given, and keep everything else running.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use ipc_schema::syscall::DomainOp;
use parallax_tests::{Run, boot, boot_live, system};

/// The fuzzer named `name` (`fuzz`: 100,000 calls; `fuzz-N`: N), its two
/// peers (an echo server it calls, a client that calls it) and its frames;
/// `domain` adds a handle to a domain named `fuzzed`.
fn fuzz_services(name: &str, domain: bool) -> String {
    let domain_handle = if domain {
        "    { name = \"domain\", domain = \"fuzzed\", rights = [\"read\", \"write\", \"build\", \"views\", \"vcpus\"] },\n"
    } else {
        ""
    };
    format!(
        r#"standard_services = true

[[service]]
name = "{name}"
crate = "fuzz"
task = true
handles = [
    {{ name = "inbox", endpoint = "fuzz", rights = ["receive"] }},
    {{ name = "echo", endpoint = "fuzz-echo", rights = ["call"] }},
    {{ name = "note", notification = "fuzz-note", rights = ["signal", "wait"] }},
    {{ name = "buffer", shared = "fuzz-pages", rights = ["read", "write"] }},
    {{ name = "port", io_ports = [0x80, 1], rights = ["device"] }},
{domain_handle}]

[[service]]
name = "fuzz-echo"
crate = "fuzz"
task = true
handles = [{{ name = "requests", endpoint = "fuzz-echo", rights = ["receive"] }}]

[[service]]
name = "fuzz-client"
crate = "fuzz"
task = true
handles = [{{ name = "server", endpoint = "fuzz", rights = ["call"] }}]

[[shared]]
name = "fuzz-pages"
pages = 10
"#
    )
}

/// The calls the fuzzer says it made: its last such line. (A random LOG
/// call is a random defmt frame under the fuzzer's own name, which can
/// decode as any of its lines with any numbers; its summary comes after its
/// last random call. What the test relies on besides is said by init: the
/// fuzzer's exit code, its count of failed checks.)
fn calls_made(run: &Run, name: &str) -> u64 {
    let line = run
        .0
        .lines
        .iter()
        .rev()
        .find(|l| l.source == name && l.text.contains("system calls made"))
        .unwrap_or_else(|| {
            run.expect_from(name, "system calls made");
            unreachable!()
        });
    line.text
        .split_once("fuzz: ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {:?}", line.text))
}

/// What every run of the fuzzer `name` must show: its calls made, its
/// checks passed, its peers ended, the kernel's refusals named, nothing
/// faulted.
fn expect_fuzzed(run: &Run, name: &str, calls: u64) {
    run.expect_from(name, "fuzz: seed 0x5eedf02220250009")
        .expect_from(name, "the echo server answers to the end: ok")
        .expect_from(name, "the client's call answered to the end: ok")
        .expect_from(name, "every answer a SysError: ok")
        .expect_from(
            name,
            "ports that wrap past u64::MAX: ok (every access refused with BadArgument; the handle's own port works)",
        )
        .expect_from(name, "fuzz: all checks passed")
        .expect_from("fuzz-echo", "fuzz-echo: stopped after")
        .expect_from("fuzz-client", "fuzz-client: stopped after")
        .expect_from("init", &format!("task {name} ended (code 0)"))
        .expect_from("init", "task fuzz-echo ended (code 0)")
        .expect_from("init", "task fuzz-client ended (code 0)")
        .expect(&format!("service {name}: CALL refused"))
        // Refusals of one kind past the first eight: one line in 256.
        .expect(&format!(
            "service {name}: 255 more refusals like the next were not logged"
        ))
        .expect(&format!("service {name}: RECV refused: handle"))
        .expect_no("faulted")
        .expect_no("kernel panic");
    let made = calls_made(run, name);
    assert!(made >= calls, "only {made} calls made");
}

#[test]
fn a_service_making_100000_random_system_calls_disturbs_nothing() {
    // No domain: QEMU runs the services without VMX, quickly.
    let manifest = format!("name = \"fuzz\"\n{}", fuzz_services("fuzz", false));
    let run = boot(&system("fuzz", &manifest), Machine::Qemu, |c| {
        c.timeout = std::time::Duration::from_secs(300);
    });
    expect_fuzzed(&run, "fuzz", 100_000);
    run.expect_from("fuzz", "no domain: the exit-buffer check needs one")
        .expect_status(HaltStatus::Success);
}

/// The fuzzer beside a guest, on Bochs: 100,000 calls, the fast paths of
/// the exits it handles among them (about 150 s of the machine's time,
/// nearly all of it the kernel logging its refusals over a serial line that
/// Bochs runs at 115200 baud: see docs/security.md).
const FUZZER: &str = "fuzz";

#[test]
fn a_fuzzing_exit_handler_reaches_only_its_own_domain_and_never_writes_below_its_buffer() {
    // The benign guest runs on (its exits go to the vmm) while the fuzzer
    // handles the exits of a domain of its own.
    let manifest = format!(
        "name = \"fuzz-beside\"\n{}{}",
        fuzz_services(FUZZER, true),
        r#"
[[domain]]
name = "ticker"
guest = "ticker"
memory_mib = 16
cmdline = "ticks=0 calls=200"

[[domain]]
name = "fuzzed"
guest = "hello"
memory_mib = 16
exits = "fuzz"
violations = "fuzz"
"#
    );
    let img = system("fuzz-beside", &manifest);
    let run = boot_live(
        &img,
        Machine::Bochs,
        |c| c.timeout = std::time::Duration::from_secs(1500),
        |live| {
            live.wait_for(FUZZER, "system calls made", 1400);
            // Every other service untouched: never restarted, still
            // running, and the control channel answers.
            let mut ctl = live.control();
            for s in ctl.services().expect("the console answers") {
                let name = ipc_schema::supervisor::name_str(&s.name).to_owned();
                if !name.starts_with("fuzz") {
                    assert_eq!(
                        (s.generation, s.restarts, s.state),
                        (0, 0, 0),
                        "service {name}"
                    );
                }
            }
            // The benign guest still gets its answers from the vmm.
            live.ticks_on("dom1", 2, 120);
            ctl.domain_control(1, DomainOp::Destroy).unwrap();
        },
    );
    expect_fuzzed(&run, FUZZER, 100_000);
    run.expect_from(
        FUZZER,
        "an exit buffer just below the answer's page: ok (every exit refused with BadAddress; the frame below untouched)",
    )
    .expect_from(
        FUZZER,
        "a kept message/reply pair unmapped: ok (every call echoed, every one refused once unmapped; the frame untouched)",
    )
    .expect_from(
        FUZZER,
        "a view the vCPU runs on is not destroyed: ok (Busy while the vCPU runs on it; destroyed once it does not)",
    )
    .expect(&format!(
        "service {FUZZER}: VIEW_DESTROY refused: domain 2's vCPU runs on view"
    ))
    .expect_from(FUZZER, "its domain destroyed at the end: ok")
    .expect(&format!(
        "service {FUZZER}: DOMAIN_INFO refused: handle 5 is for another domain"
    ))
    .expect_status(HaltStatus::Success);
    // Every tick of the benign guest answered by the same vmm, its count of
    // calls only going up.
    let ticks: Vec<u64> = run
        .console(1)
        .iter()
        .filter_map(|l| {
            l.split_once(": vmm version 1, ")?
                .1
                .strip_suffix(" service calls")?
                .parse()
                .ok()
        })
        .collect();
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "{ticks:?}");
    assert!(run.console(1).iter().all(|l| !l.contains("FAIL")));
}
