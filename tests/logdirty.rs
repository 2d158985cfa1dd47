//! Dirty-page logs (issue 10, LD-1..LD-5, docs/logdirty.md), across the
//! kernel (PML buffers, the PML-full exit, the record of service writes),
//! the altp2m service (write-protection, remapped entries) and the logdirty
//! service, on Bochs.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use parallax_tests::{boot, boot_live, one_guest, system};

fn bochs_model(img: &image_builder::image::Image, model: &str) -> parallax_tests::Run {
    let model = model.to_owned();
    boot(img, Machine::Bochs, move |c| {
        c.bochs_cpu = model;
        c.timeout = std::time::Duration::from_secs(300);
    })
}

/// LD-2, LD-3, LD-4: the guest writes one pattern, logged by PML and by
/// write-protection: each log is exactly the pages written (a write through
/// a view that remaps A to B's frame logged as B, not A), a peek equals
/// the read after it, a read-and-clear clears, a second round is logged
/// again, and the two mechanisms' logs are equal.
#[test]
fn one_pattern_is_logged_exactly_by_pml_and_by_write_protection_with_views() {
    bochs_model(&one_guest("pml"), "corei7_skylake_x")
        .expect_console(1, "dirty: Pml runs on pml")
        .expect_console(1, "dirty: WriteProtect runs on write-protection")
        .expect_console(1, "dirty: pml: round 1: 607 pages, exact")
        .expect_console(1, "dirty: write-protection: round 2: ")
        .expect_console(1, "dirty: pml and write-protection logs are equal")
        .expect_console(1, "dirty: all checks passed")
        .expect_status(HaltStatus::Success);
}

/// LD-2: without PML, a client asking for it is refused by name and
/// write-protection does the same work; `auto` chooses it.
#[test]
fn without_pml_write_protection_logs_and_pml_is_refused_by_name() {
    bochs_model(&one_guest("pml"), "broadwell_ult")
        .expect("PML false")
        .expect_console(
            1,
            "dirty: PML absent on this CPU: refused as PmlUnsupported",
        )
        .expect_console(1, "dirty: write-protection: round 1: 607 pages, exact")
        .expect_console(1, "dirty: all checks passed")
        .expect_status(HaltStatus::Success);
}

const COPY: &str = r#"
name = "live-copy"
standard_services = true

[[service]]
name = "copier"
task = true
handles = [
    { name = "logdirty", endpoint = "logdirty", rights = ["call"] },
    { name = "supervisor", endpoint = "supervisor", rights = ["call"] },
    { name = "domains", domains = true, rights = ["read", "write", "build"] },
]

[[domain]]
name = "writer"
guest = "writer"
memory_mib = 16

[[domain]]
name = "copy"
guest = "hostile"
memory_mib = 16
cmdline = "attack=spin"
"#;

/// LD-5: a copier copies a running guest's RAM into a second domain in
/// rounds driven by read-and-clear, pauses it, copies the rest, and every
/// page of the two is equal, on PML and on write-protection. The guest
/// writes through three views (VMFUNC) all along and makes hypercalls
/// (replies the vmm writes around the EPT); the copier writes into it too
/// after its last round. The copier then ends with a log left running:
/// the logdirty service tears it down.
#[test]
fn a_live_copy_driven_by_the_log_equals_the_source_on_both_mechanisms() {
    bochs_model(&system("live-copy", COPY), "corei7_skylake_x")
        .expect_console(1, "writer: writing through 3 views")
        .expect_from("copier", "copier: pml: ")
        .expect_from("copier", "copier: write-protection: ")
        .expect_from("copier", "pages equal")
        .expect_from("copier", "log 7 left running")
        // The copier's badge: its place among the services, after the six
        // standard ones, plus one.
        .expect_from(
            "logdirty",
            "service copier (badge 7) is gone: 1 log(s) stopped",
        )
        .expect_console(1, "writer: done")
        .expect_status(HaltStatus::Success);
}

/// `cargo hv ctl --socket SOCKET --timeout 120 ARGS...`: (ok, stdout,
/// stderr).
fn ctl(socket: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = parallax_tests::ctl::run(socket, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const HOST: &str = r#"
name = "logdirty-host"

[[domain]]
name = "ticker"
guest = "ticker"
memory_mib = 16
cmdline = "ticks=0"
"#;

/// LD-1, point 6 and point 8: the host's logs through `cargo hv ctl
/// logdirty` on a running system: two logs at once, each with its own
/// bits (a read-and-clear of one leaves the other's), peek and read as
/// ranges and JSON, and each bad request refused by name with nothing else
/// disturbed (the guest ticks on, until the host destroys it).
#[test]
fn the_host_keeps_two_logs_and_bad_requests_are_refused_by_name() {
    let run = boot_live(
        &system("logdirty-host", HOST),
        Machine::Bochs,
        |c| c.timeout = std::time::Duration::from_secs(400),
        |live| {
            live.wait_for("dom1", "tick ", 120);
            let socket = live.socket().to_owned();
            let ok = |args: &[&str]| {
                let args: Vec<&str> = ["logdirty"].iter().chain(args).copied().collect();
                let (ok, out, err) = ctl(&socket, &args);
                assert!(ok, "logdirty {args:?} failed:\n{out}\n{err}");
                out
            };
            let refused = |args: &[&str], why: &str| {
                let args: Vec<&str> = ["logdirty"].iter().chain(args).copied().collect();
                let (ok, out, err) = ctl(&socket, &args);
                assert!(
                    !ok && err.contains(why),
                    "logdirty {args:?}: expected a refusal naming {why:?}:\n{out}\n{err}"
                );
            };
            let started = ok(&["start", "1", "--log", "1", "--mode", "pml"]);
            assert!(started.to_lowercase().contains("pml"), "{started}");
            ok(&[
                "start", "ticker", "--log", "2", "--mode", "pml", "--range", "0:0x1000",
            ]);
            live.ticks_on("dom1", 3, 120);
            let peek = ok(&["peek", "1", "--log", "1"]);
            let first = ok(&["read", "1", "--log", "1"]);
            assert!(peek.contains("pages"), "{peek}");
            assert!(first.contains("pages"), "{first}");
            // Log 2 kept its own bits: its read still finds pages.
            let json = ok(&["read", "1", "--log", "2", "--json"]);
            assert!(
                json.contains("\"ranges\":[{"),
                "log 2 lost its bits: {json}"
            );
            let status = ok(&["status", "1", "--log", "1"]);
            assert!(status.to_lowercase().contains("pml"), "{status}");
            // Point 8: bad input, each named.
            refused(&["start", "9"], "no such domain");
            for args in [
                &["read", "9"][..],
                &["peek", "9"],
                &["status", "9"],
                &["stop", "9"],
            ] {
                refused(args, "domain 9: no such domain");
            }
            refused(
                &["start", "1", "--log", "3", "--range", "0:0x100000"],
                "past",
            );
            refused(
                &[
                    "start", "1", "--log", "4", "--mode", "wp", "--range", "0x10:4",
                ],
                "another log holds part of that range",
            );
            refused(&["start", "1", "--log", "1"], "already");
            ok(&["stop", "1", "--log", "1"]);
            refused(&["read", "1", "--log", "1"], "not running");
            refused(&["stop", "1", "--log", "1"], "not running");
            ok(&["stop", "1", "--log", "2"]);
            // A fork's log goes with it: destroyed, its id goes to the next
            // fork, which inherits no log (nothing of it is read through
            // the old one), nor the old fork's altp2m view.
            let host = |args: &[&str]| {
                // (A fork of a domain just paused may find its vCPU in the
                // vmm's hands for a moment: retried then.)
                for _ in 0..50 {
                    let (done, out, err) = ctl(&socket, args);
                    if done {
                        return out;
                    }
                    assert!(err.contains("Busy"), "{args:?}: {out}\n{err}");
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                panic!("{args:?} stayed Busy");
            };
            host(&["pause", "1"]);
            let forked = host(&["fork", "1"]);
            assert!(forked.contains("domain 2"), "{forked}");
            ok(&["start", "2", "--log", "5", "--range", "0:0x10"]);
            // The altp2m service's records of it go too (a mode, a view).
            host(&["altp2m", "mode", "2", "external"]);
            let view = host(&["altp2m", "view-create", "2"]);
            let view = view.trim().rsplit(' ').next().unwrap().to_owned();
            host(&["destroy", "2"]);
            let again = host(&["fork", "1"]);
            assert!(again.contains("domain 2"), "the id is given again: {again}");
            refused(&["read", "2", "--log", "5"], "not running");
            let (done, out, err) = ctl(&socket, &["altp2m", "get", "2", &view, "0x10"]);
            assert!(
                !done && err.contains(&format!("view {view} does not exist")),
                "the old fork's view is not the new one's: {out}\n{err}"
            );
            let first = host(&["altp2m", "view-create", "2"]);
            assert_eq!(
                first.trim().rsplit(' ').next(),
                Some(view.as_str()),
                "{first}"
            );
            host(&["destroy", "2"]);
            host(&["unpause", "1"]);
            live.ticks_on("dom1", 3, 120);
            let (done, out, err) = ctl(&socket, &["destroy", "1"]);
            assert!(done, "destroy: {out}\n{err}");
        },
    );
    run.expect_no("FAIL")
        .expect_from("logdirty", "domain 2 ended: its 1 log(s) are forgotten")
        .expect_status(HaltStatus::Success);
}
