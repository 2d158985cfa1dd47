//! Services at run time, on Bochs (VMX): restarts after a fault, live swaps,
//! and the control channel, driven by the harness as `cargo hv ctl` would.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use ipc_schema::supervisor::{Refusal, SupervisorEvent, name};
use ipc_schema::syscall::DomainOp;
use parallax_client::ControlEvent;
use parallax_tests::{boot_live, system};

/// A system of one domain running the ticker guest with `cmdline`.
fn ticker(name: &str, cmdline: &str) -> image_builder::image::Image {
    system(
        name,
        &format!(
            "name = \"{name}\"\n[[domain]]\nname = \"ticker\"\nguest = \"ticker\"\nmemory_mib = 16\ncmdline = \"{cmdline}\"\n"
        ),
    )
}

/// The (vmm version, service call count) a `tick` line reports.
fn tick(line: &str) -> Option<(u32, u64)> {
    let rest = line.split_once(": vmm version ")?.1;
    let (version, calls) = rest.split_once(", ")?;
    Some((
        version.parse().ok()?,
        calls.strip_suffix(" service calls")?.parse().ok()?,
    ))
}

/// The (version, count) of every tick line of domain 1.
fn ticks(run: &parallax_tests::Run) -> Vec<(u32, u64)> {
    run.console(1).iter().filter_map(|l| tick(l)).collect()
}

#[test]
fn a_faulted_service_is_restarted_and_its_guest_runs_to_the_end() {
    let img = ticker("fault-vmm", "ticks=150 calls=100 ping=1");
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            live.wait_for("dom1", "tick 3:", 120);
            let mut ctl = live.control();
            ctl.inject_fault("vmm").expect("the fault is injected");
            live.wait_for("init", "restarted service vmm", 60);
            // The host hears of it as events.
            let mut seen = Vec::new();
            while seen.len() < 2 {
                match ctl.next_event(std::time::Duration::from_secs(30)).unwrap() {
                    Some(ControlEvent::Supervisor { event, .. }) => seen.push(event),
                    Some(_) => {}
                    None => panic!("no events: {seen:?}"),
                }
            }
            assert_eq!(
                seen,
                [
                    SupervisorEvent::ServiceFaulted {
                        name: name("vmm"),
                        generation: 0
                    },
                    SupervisorEvent::ServiceRestarted {
                        name: name("vmm"),
                        generation: 1
                    },
                ]
            );
            let vmm = ctl
                .services()
                .unwrap()
                .into_iter()
                .find(|s| ipc_schema::supervisor::name_str(&s.name) == "vmm")
                .expect("vmm is listed");
            assert_eq!((vmm.generation, vmm.restarts, vmm.state), (1, 1, 0));
            // Then the server of the vmm's pings (`Client::call_encoded`,
            // bound to altp2m's endpoint) faults and restarts: the vmm's
            // client binds again and the pings go on.
            live.wait_for("dom1", "ping ok", 120);
            ctl.inject_fault("altp2m").expect("the fault is injected");
            live.wait_for("init", "restarted service altp2m", 60);
        },
    );
    run.expect_from("vmm", "fault injected on request")
        .expect_from("altp2m", "fault injected on request")
        .expect_from(
            "init",
            "restarted service altp2m after fault 1 (generation 1)",
        )
        .expect_from(
            "vmm",
            "vmm: the server of parallax/altp2m restarted; binding again",
        )
        .expect("service vmm (generation 0) faulted: page fault (#PF) (vector 14)")
        .expect("cr2 0xdead0000")
        .expect_from("init", "restarted service vmm after fault 1 (generation 1)")
        .expect_from("vmm", "vmm: version 1 serving exits (generation 1)")
        .expect_console(1, "ticker: done")
        .expect_status(HaltStatus::Success);
    // The restarted vmm starts from nothing: its count of service calls
    // starts again (a swap, below, keeps it).
    let counts: Vec<u64> = ticks(&run).iter().map(|t| t.1).collect();
    // Console bytes are held back only during a burst of writes: a fault
    // can cost at most the one line being written.
    assert!(counts.len() >= 149, "every tick ran: {counts:?}");
    // Every ping but those while altp2m restarted was answered, the last
    // ones after its restart.
    let pings: Vec<bool> = run
        .console(1)
        .iter()
        .filter_map(|l| Some(l.split_once(": ping ")?.1 == "ok"))
        .collect();
    let refused = pings.iter().filter(|ok| !**ok).count();
    assert!(pings.len() >= 149 && refused <= 2, "pings: {pings:?}");
    assert!(
        pings.iter().rev().take(10).all(|ok| *ok),
        "pings: {pings:?}"
    );
    assert!(
        counts.windows(2).any(|w| w[1] < w[0]),
        "the count restarted: {counts:?}"
    );
}

/// The refusal of a failed control request.
fn refusal(e: parallax_client::ClientError) -> Refusal {
    match e {
        parallax_client::ClientError::Refused { refusal, .. } => refusal,
        other => panic!("not a refusal: {other}"),
    }
}

/// The vmm built with `features`, stripped as `cargo hv swap` sends it (its
/// full ELF kept for decoding its logs).
fn vmm_variant(features: &str) -> Vec<u8> {
    let path = image_builder::compile::service_variant(
        "vmm",
        features,
        &image_builder::compile::BuildOptions::default(),
    )
    .unwrap_or_else(|e| panic!("the vmm with {features} builds: {e:#}"));
    let full = std::fs::read(&path).unwrap();
    image_builder::logs::store_elf(&full).unwrap();
    image_builder::elf::strip_service(&full).unwrap()
}

#[test]
fn a_service_is_swapped_under_a_running_guest_and_the_new_version_answers() {
    let elf = vmm_variant("next");
    // A successor that refuses the state: the swap fails and the running
    // instance serves on.
    let refusing = vmm_variant("refuse-state");
    let img = ticker("swap-vmm", "ticks=0 calls=100 pic=1");
    let run = boot_live(
        &img,
        Machine::Bochs,
        // Four ELFs of about 85 KiB each cross the emulated serial line:
        // minutes on a busy machine (the limit only catches a hang).
        |c| c.timeout = std::time::Duration::from_secs(900),
        |live| {
            live.wait_for("dom1", "tick 2:", 120);
            let mut ctl = live.control();
            // Garbage and an oversize frame on the control channel cost only
            // themselves.
            ctl.hello().unwrap();
            {
                use std::io::Write;
                let mut raw = ctl.get_ref();
                raw.write_all(b"line noise\x00").unwrap();
                let mut big = vec![0x41u8; 3000];
                big.push(0);
                raw.write_all(&big).unwrap();
            }
            let garbage =
                std::iter::from_fn(|| ctl.next_event(std::time::Duration::from_secs(60)).unwrap())
                    .find(|e| matches!(e, ControlEvent::Garbage { .. }));
            assert_eq!(garbage, Some(ControlEvent::Garbage { bytes: 10 }));
            assert_eq!(
                ctl.services().unwrap().len(),
                6,
                "the console still answers (the six standard services)"
            );
            assert!(
                ctl.stats().console_errors >= 1,
                "the oversize frame was refused: {:?}",
                ctl.stats()
            );
            // Refused swaps change nothing.
            let e = ctl.swap("vmm", &[0x55; 3000]).unwrap_err();
            assert_eq!(refusal(e), Refusal::NotElf);
            // The vmm whose entry point is not canonical: the kernel's
            // return to it would fault in the kernel.
            let mut bad_entry = elf.clone();
            bad_entry[24..32].copy_from_slice(&0x8000_0000_0000_0000u64.to_le_bytes());
            let e = ctl.swap("vmm", &bad_entry).unwrap_err();
            assert_eq!(refusal(e), Refusal::NotElf);
            let console = std::fs::read(parallax_tests::service_elf("console")).unwrap();
            let console = image_builder::elf::strip_service(&console).unwrap();
            let e = ctl.swap("vmm", &console).unwrap_err();
            assert_eq!(
                refusal(e),
                Refusal::MissingInterface {
                    key: ipc_schema::vmexit::VMEXIT.key.to_bytes()
                }
            );
            let e = ctl.swap("nobody", &elf).unwrap_err();
            assert_eq!(refusal(e), Refusal::NoSuchService);
            let e = ctl.swap("console", &console).unwrap_err();
            assert_eq!(refusal(e), Refusal::IsCaller);
            live.wait_for("dom1", "vmm version 1", 60);
            let e = ctl.swap("vmm", &refusing).unwrap_err();
            assert_eq!(refusal(e), Refusal::SwapFailed);
            // The old instance answers again, its count going on.
            let last = live
                .seen
                .iter()
                .filter(|l| l.source == "dom1")
                .filter_map(|l| {
                    l.text
                        .strip_prefix("tick ")?
                        .split_once(':')?
                        .0
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap();
            let line = live.wait_for("dom1", &format!("tick {}: vmm version", last + 2), 120);
            let before = tick(&line.text).unwrap();
            assert_eq!(before.0, 1, "{}", line.text);

            let generation = ctl.swap("vmm", &elf).expect("the swap goes through");
            assert_eq!(generation, 1);
            let swapped =
                std::iter::from_fn(|| ctl.next_event(std::time::Duration::from_secs(30)).unwrap())
                    .find_map(|e| match e {
                        ControlEvent::Supervisor { event, .. } => Some(event),
                        _ => None,
                    });
            assert_eq!(
                swapped,
                Some(SupervisorEvent::ServiceSwapped {
                    name: name("vmm"),
                    generation: 1
                })
            );
            let first = live.wait_for("dom1", "vmm version 2", 120).text;
            let after = tick(&first).unwrap();
            // The new instance answers the PICs as the guest left them.
            let k = first.split(':').next().unwrap().to_string();
            let masks = live.wait_for("dom1", &format!("{k}: pic masks"), 60).text;
            assert!(masks.ends_with("pic masks a5 3c"), "{masks}");
            assert!(
                after.1 > before.1,
                "the count went on from the old instance's: {before:?} then {after:?}"
            );
            let vmm = ctl
                .services()
                .unwrap()
                .into_iter()
                .find(|s| ipc_schema::supervisor::name_str(&s.name) == "vmm")
                .unwrap();
            assert_eq!((vmm.generation, vmm.restarts, vmm.state), (1, 0, 0));
            ctl.domain_control(1, DomainOp::Destroy).unwrap();
        },
    );
    run.expect_from(
        "init",
        "swap of vmm refused: the file is not an x86-64 ELF executable (NotElf)",
    )
    .expect_from(
        "init",
        "swap of vmm refused: the file is not an x86-64 ELF executable (BadEntry)",
    )
    .expect_from(
        "init",
        "swap of vmm refused: the new ELF does not serve parallax/vmexit",
    )
    .expect_from("vmm", "built to refuse its predecessor's state")
    .expect_from(
        "init",
        "swap of vmm: the state did not move; keeping the old instance",
    )
    .expect_from("vmm", "snapshot of")
    .expect_from("vmm", "vmm: version 2 serving exits (generation 0)")
    .expect_from("vmm", "state restored")
    .expect_from("init", "swapped service vmm")
    .expect_from("init", "domain 1: Destroy on request")
    .expect_no("faulted")
    .expect_status(HaltStatus::Success);
    // Every tick: version 1 up to the swap, version 2 after, and the count
    // of service calls never goes back.
    let t = ticks(&run);
    let first_v2 = t.iter().position(|x| x.0 == 2).expect("version 2 answered");
    assert!(t[..first_v2].iter().all(|x| x.0 == 1) && t[first_v2..].iter().all(|x| x.0 == 2));
    assert!(t.windows(2).all(|w| w[1].1 > w[0].1), "{t:?}");
    // The guest's platform went along: the PIC masks it set before the
    // swap read the same after it.
    let masks: Vec<String> = run
        .console(1)
        .into_iter()
        .filter(|l| l.contains(": pic masks "))
        .collect();
    assert!(masks.len() + 1 >= t.len(), "{masks:?}");
    assert!(
        masks.iter().all(|l| l.ends_with("pic masks a5 3c")),
        "{masks:?}"
    );
}

/// The probe task, with the standard services, and no domain.
const PROBE: &str = r#"
name = "probe"
standard_services = true

[[service]]
name = "probe"
task = true
handles = [
    { name = "altp2m", endpoint = "altp2m", rights = ["call"] },
    { name = "exits", endpoint = "exits", rights = ["call"] },
    { name = "domains-ro", domains = true, rights = ["read"] },
]
"#;

#[test]
fn bad_input_from_a_service_is_refused_and_nothing_else_is_disturbed() {
    let run = parallax_tests::boot(&system("probe", PROBE), Machine::Qemu, |_| {});
    for check in [
        "call through an empty handle slot: ok (refused with NoSuchHandle)",
        "call through a domains handle: ok (refused with WrongKind)",
        "view create without the views right: ok (refused with MissingRight)",
        "a message over the 256-byte limit: ok (refused with MessageTooLong)",
        "a reply longer than the caller's buffer: ok (refused with ReplyTooLong)",
        "a message at an unmapped address: ok (refused with BadAddress)",
        "receive on a handle without the receive right: ok (refused with MissingRight)",
        "bind with another schema key: ok (refused, naming both keys)",
        "a request that does not decode: ok (answered Malformed)",
        "fuzzing altp2m: ok",
        "fuzzing the vmm: ok",
        "altp2m still answers: ok",
        "probe: all checks passed",
    ] {
        run.expect_from("probe", check);
    }
    // The kernel and the services named what was wrong.
    run.expect("service probe: CALL refused: no handle 60")
        .expect("service probe: CALL refused: handle 2 is another kind of object")
        .expect("service probe: VIEW_CREATE refused: handle 2 lacks the right `views`")
        .expect("service probe: CALL refused: a 300-byte message (the most is 256)")
        .expect("service probe: RECV refused: handle 0 is not one to receive on")
        .expect_from("probe", "2000 random messages to altp2m")
        .expect_from("init", "task probe ended (code 0)")
        .expect_no("faulted")
        .expect_status(HaltStatus::Success);
}

#[test]
fn handles_to_one_domain_or_view_reach_nothing_else() {
    let manifest = PROBE.replace(
        "    { name = \"domains-ro\", domains = true, rights = [\"read\"] },\n]",
        "    { name = \"domains-ro\", domains = true, rights = [\"read\"] },\n    { name = \"domain-a\", domain = \"a\", rights = [\"read\", \"views\"] },\n]",
    ) + "[[domain]]\nname = \"a\"\nguest = \"hello\"\nmemory_mib = 16\n[[domain]]\nname = \"b\"\nguest = \"hello\"\nmemory_mib = 16\n";
    assert!(manifest.contains("domain-a"));
    let run = parallax_tests::boot(&system("probe-domains", &manifest), Machine::Bochs, |_| {});
    for check in [
        "domain handle on its domain: ok",
        "domain handle on another domain: ok (refused with OutOfScope)",
        "a domain handle cannot make domain handles: ok (refused with BadArgument)",
        "view handle on its view: ok",
        "view handle on the host p2m: ok (refused with OutOfScope)",
        "view handle creating a view: ok (refused with OutOfScope)",
        "a view handle without the views right: ok (refused with MissingRight)",
        "probe: all checks passed",
    ] {
        run.expect_from("probe", check);
    }
    run.expect("service probe: DOMAIN_INFO refused: handle 3 is for another domain, view or vCPU")
        .expect("domain 1 (a) exited with status 0")
        .expect("domain 2 (b) exited with status 0")
        .expect_status(HaltStatus::Success);
}

#[test]
fn a_service_replaced_at_build_time_runs_in_its_place() {
    let opts = image_builder::compile::BuildOptions::default();
    let next =
        image_builder::compile::service_variant("vmm", "next", &opts).expect("the next vmm builds");
    let manifest = image_builder::manifest::SystemManifest::parse(
        "name = \"override\"\n[[domain]]\nname = \"ticker\"\nguest = \"ticker\"\nmemory_mib = 16\ncmdline = \"ticks=3 calls=10\"\n",
        std::path::Path::new("override.toml"),
    )
    .unwrap();
    let img = image_builder::image::build_manifest(
        &manifest,
        &image_builder::image::ImageOptions {
            out: image_builder::paths::work_dir()
                .join("tests")
                .join("override.iso"),
            service_overrides: vec![("vmm".to_owned(), next.clone())],
            ..Default::default()
        },
    )
    .expect("the image builds");
    let run = parallax_tests::boot(&img, Machine::Bochs, |_| {});
    run.expect_from("vmm", "vmm: version 2 serving exits (generation 0)")
        .expect_console(1, "tick 3: vmm version 2, 33 service calls")
        .expect_status(HaltStatus::Success);
}

/// The standard services, altp2m restarted once at most (within ten
/// minutes) and held at its second fault.
fn held_altp2m(name: &str, domains: &str) -> image_builder::image::Image {
    let services = image_builder::manifest::STANDARD_SERVICES.replace(
        "name = \"altp2m\"\nhandles",
        "name = \"altp2m\"\nmax_restarts = 1\nrestart_window_ms = 600000\nhandles",
    );
    assert!(services.contains("max_restarts = 1"));
    system(name, &format!("name = \"{name}\"\n{domains}\n{services}"))
}

/// The highest number N of the lines of `source` seen so far that read
/// `{before}N{after}`.
fn latest(live: &parallax_tests::Live, source: &str, before: &str, after: &str) -> u64 {
    live.seen
        .iter()
        .filter(|l| l.source == source)
        .filter_map(|l| {
            l.text
                .split_once(before)?
                .1
                .split_once(after)?
                .0
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Issue 9, point 1: a call to a service its supervisor holds fails at once,
/// with a reason the guest's hypercall returns, and every other domain runs
/// on (before, the vmm waited for ever on its next call to the held
/// altp2m, and every domain stopped with it). A service restarted before
/// that answers again.
#[test]
fn a_call_to_a_held_service_fails_at_once_and_the_other_domains_run_on() {
    let img = held_altp2m(
        "held-altp2m",
        "[[domain]]\nname = \"asker\"\nguest = \"agent\"\nmemory_mib = 16\ncmdline = \"unavailable\"\n\
         [[domain]]\nname = \"ticker\"\nguest = \"ticker\"\nmemory_mib = 16\ncmdline = \"ticks=0 calls=20\"\n",
    );
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            live.wait_for("dom1", "agent: 100 answers", 120);
            let mut ctl = live.control();
            ctl.inject_fault("altp2m").expect("the fault is injected");
            live.wait_for("init", "restarted service altp2m", 60);
            // Restarted, it answers again.
            let answered = latest(live, "dom1", "agent: ", " answers");
            live.wait_for("dom1", &format!("agent: {} answers", answered + 100), 120);
            ctl.inject_fault("altp2m").expect("the fault is injected");
            live.wait_for("init", "holding it", 60);
            // The guest's next request fails, with the reason.
            live.wait_for(
                "dom1",
                "agent: the view-switch hypercall is refused too",
                60,
            );
            // So does the host's, at once (before, the console waited for
            // ever too, and the control channel went deaf).
            let asked = std::time::Instant::now();
            let e = ctl
                .altp2m(ipc_schema::altp2m::AltRequest::Ping)
                .expect_err("the held altp2m cannot answer");
            assert!(
                matches!(
                    e,
                    parallax_client::ClientError::Console {
                        error: ipc_schema::control::ControlError::Altp2mUnavailable,
                        ..
                    }
                ),
                "{e}"
            );
            assert!(asked.elapsed() < std::time::Duration::from_secs(30));
            let altp2m = ctl
                .services()
                .unwrap()
                .into_iter()
                .find(|s| ipc_schema::supervisor::name_str(&s.name) == "altp2m")
                .expect("altp2m is listed");
            assert_eq!((altp2m.generation, altp2m.restarts), (1, 1));
            assert_eq!(parallax_client::service_state(altp2m.state), "faulted");
            // The other domain runs on.
            let tick = latest(live, "dom2", "tick ", ":");
            live.wait_for("dom2", &format!("tick {}:", tick + 2), 120);
            ctl.domain_control(2, DomainOp::Destroy).unwrap();
        },
    );
    run.expect("service altp2m (generation 0) faulted")
        .expect("service altp2m (generation 1) faulted")
        .expect_from(
            "init",
            "restarted service altp2m after fault 1 (generation 1)",
        )
        .expect_from(
            "init",
            "service altp2m faulted 2 times within 600000 ms; holding it",
        )
        .expect_from("vmm", "guests' requests get ServiceUnavailable")
        .expect_console(1, "refused: ServiceUnavailable")
        .expect_no("crashed")
        .expect_status(HaltStatus::Success);
    assert!(
        !run.console(1)
            .iter()
            .chain(run.console(2).iter())
            .any(|l| l.contains("FAIL")),
        "a guest failed"
    );
}

/// Issue 13, point 8: the kernel's limit of 512 views a domain (ALT-1),
/// which the altp2m service's quota of 64 keeps its agents from, reached by
/// the probe task with a `views` handle of its own on a running ticker
/// guest: refused (`NoResources`) at exactly 511 alternate views, not by the
/// domain's table quota first; altp2m then answers `TooManyViews`; one
/// destroyed makes room for one (its slot again), and for altp2m's; all
/// destroyed, the guest ticks on.
#[test]
fn the_kernels_view_limit_is_reached_at_511_views_and_the_domain_runs_on() {
    let manifest = PROBE.replace(
        "    { name = \"domains-ro\", domains = true, rights = [\"read\"] },\n]",
        "    { name = \"domains-ro\", domains = true, rights = [\"read\"] },\n    { name = \"view-limit\", domain = \"ticker\", rights = [\"read\", \"views\"] },\n    { name = \"introspect\", endpoint = \"introspect\", rights = [\"call\"] },\n]",
    ) + "[[domain]]\nname = \"ticker\"\nguest = \"ticker\"\nmemory_mib = 16\ncmdline = \"ticks=0 calls=20\"\nintrospection = [{ service = \"probe\", rights = [\"views\", \"read\"] }, { service = \"console\", rights = [\"read\", \"write\", \"views\", \"events\"] }]\n";
    assert!(manifest.contains("view-limit"));
    let run = boot_live(
        &system("probe-view-limit", &manifest),
        Machine::Bochs,
        |_| {},
        |live| {
            live.wait_for("probe", "probe: all checks passed", 300);
            // The guest runs on after the probe is done.
            let tick = latest(live, "dom1", "tick ", ":");
            live.wait_for("dom1", &format!("tick {}:", tick + 2), 120);
            live.control().domain_control(1, DomainOp::Destroy).unwrap();
        },
    );
    for check in [
        "a service reads guest memory through introspect: ok",
        "a service reads registers through introspect: ok",
        "a write the manifest does not allow is refused: ok",
        "probe: view limit: 511 views created in domain 1, then Some(NoResources)",
        "the kernel refuses a view past its limit: ok",
        "altp2m asked for a view with the kernel's slots full: ok (answered TooManyViews)",
        "a view destroyed makes room for one more: ok",
        "altp2m makes a view in a freed slot: ok",
        "every view destroyed, the domain running on: ok",
        "views can be made again: ok",
        "probe: all checks passed",
    ] {
        run.expect_from("probe", check);
    }
    run.expect_from("init", "task probe ended (code 0)")
        // The limit is the kernel's slots, not the domain's table quota.
        .expect_no("EPT tables: a domain reached its quota")
        .expect_no("faulted")
        .expect_no("crashed")
        .expect_status(HaltStatus::Success);
    assert!(
        !run.console(1).iter().any(|l| l.contains("FAIL")),
        "the ticker failed"
    );
}
