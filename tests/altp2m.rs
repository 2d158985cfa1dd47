//! The altp2m service on Bochs (issue 5): the in-guest agent, an external
//! agent on the host through `cargo hv ctl altp2m`, and the fallbacks on a
//! CPU without VMFUNC and #VE.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use parallax_tests::{boot, boot_live, system};

fn agent(name: &str, cmdline: &str) -> image_builder::image::Image {
    system(
        name,
        &format!(
            "name = \"{name}\"\n[[domain]]\nname = \"agent\"\nguest = \"agent\"\nmemory_mib = 32\ncmdline = \"{cmdline}\"\n"
        ),
    )
}

/// ALT-2, ALT-6..ALT-10, seed 004 and the refusals of issue point 9, from
/// inside the guest; `model` is a Bochs CPU model.
fn in_guest_agent(model: &str) -> parallax_tests::Run {
    let model = model.to_owned();
    let run = boot(
        &agent(&format!("agent-{}", model.replace('_', "-")), "checks"),
        Machine::Bochs,
        move |c| c.bochs_cpu = model,
    );
    for line in [
        "ok: seed 004: SetSuppressVe on gfn",
        "ok: seed 004: the raw entry keeps the host's frame, suppress-#VE set",
        "ok: the effective entry is the host's",
        "ok: its raw entry (the view is a copy of the host p2m) is r-x",
        "gives B's marker",
        "ok: after the reset A reads 0xaaaa00000000000a",
        "ok: SetAccess { view: 77, gfn:",
        "refused with NoSuchView { view: 600 }",
        "refused with BadGfn",
        "refused with BadAccess",
        "refused with BadRange",
        "refused with HostView",
        "refused with ViewInUse",
        "ok: the last page of RAM is r-x in view",
        "agent: all checks passed",
    ] {
        run.expect_console(1, line);
    }
    run.expect_no("FAIL").expect_status(HaltStatus::Success);
    run
}

#[test]
fn an_in_guest_agent_uses_views_with_vmfunc() {
    in_guest_agent("corei7_skylake_x").expect_console(1, "(VMFUNC) gives B's marker");
}

#[test]
fn without_vmfunc_the_in_guest_agent_switches_by_hypercall() {
    in_guest_agent("corei7_ivy_bridge_3770k")
        .expect_console(1, "agent: vmfunc false, ve false")
        .expect_console(1, "(hypercall) gives B's marker");
}

/// `cargo hv ctl --socket SOCKET --timeout 120 altp2m ARGS...`: stdout,
/// which must be a success.
fn ctl_altp2m(socket: &std::path::Path, args: &[&str]) -> String {
    let all: Vec<&str> = ["altp2m"].iter().chain(args).copied().collect();
    parallax_tests::ctl::ok(socket, &all)
}

/// Boots the agent guest with `cmdline` (`watch=N`...) on Bochs and runs
/// `script` once the guest waits to be put in a view, with the page it asks
/// to have watched and the control socket to watch it through.
fn watched_agent(
    name: &str,
    cmdline: &str,
    script: impl FnOnce(&mut parallax_tests::Live, &str, &std::path::Path),
) -> parallax_tests::Run {
    boot_live(
        &agent(name, cmdline),
        Machine::Bochs,
        |_| {},
        |live| {
            let line = live.wait_for("dom1", "waiting to be put in a view", 120);
            let gfn = line
                .text
                .split("watch me: gfn ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .expect("the guest names its page")
                .to_owned();
            let socket = live.socket().to_owned();
            script(live, &gfn, &socket)
        },
    )
}

/// `cargo hv ctl altp2m watch 1 GFN --answer allow-once --wait 240` and
/// `more`, its standard output piped, to spawn.
fn watch_command(socket: &std::path::Path, gfn: &str, more: &[&str]) -> std::process::Command {
    let mut args = vec![
        "altp2m",
        "watch",
        "1",
        gfn,
        "--answer",
        "allow-once",
        "--wait",
        "240",
    ];
    args.extend(more);
    let mut c = parallax_tests::ctl::command(socket, &args);
    c.stdout(std::process::Stdio::piped());
    c
}

/// The writes the agent makes in the tests of a watch that ends early.
const WRITES: usize = 20;

/// Boots the agent writing its page [`WRITES`] times (`watch=20`, and
/// `options`), runs `script` on the watched page once it waits (as
/// [`watched_agent`]), waits for its last write, and checks that it ran to
/// its end ([`ran_to_its_end_unwatched`]).
fn all_writes_go_through(
    name: &str,
    options: &str,
    script: impl FnOnce(&mut parallax_tests::Live, &str, &std::path::Path),
) {
    let run = watched_agent(
        name,
        format!("watch={WRITES} {options}").trim_end(),
        |live, gfn, socket| {
            script(live, gfn, socket);
            live.wait_for("dom1", &format!("agent: write {WRITES} done"), 120);
        },
    );
    ran_to_its_end_unwatched(&run);
}

/// A watch attached to domain 1 and detached again, and the agent ran to
/// its end: no failure, success.
fn ran_to_its_end_unwatched(run: &parallax_tests::Run) {
    run.expect_from("altp2m", "domain 1: listener attached")
        .expect_from("altp2m", "domain 1: listener detached")
        .expect_console(1, "agent: done")
        .expect_no("FAIL")
        .expect_status(HaltStatus::Success);
}

/// Reads a spawned watch's standard output until its first event (then
/// closes it: the watch's later lines go nowhere).
fn until_first_violation(watch: &mut std::process::Child) {
    use std::io::BufRead;
    let stdout = watch.stdout.take().expect("piped");
    let first = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("violation #"));
    assert!(first.is_some(), "the watch saw no event");
}

#[test]
fn an_external_agent_watches_a_page_and_resumes_the_guest_after_each_write() {
    use std::io::BufRead;
    let mut watched = String::new();
    let run = watched_agent("agent-watch", "watch=3 limited", |live, gfn, socket| {
        // Refusals first: no such domain, a bad answer.
        let err = parallax_tests::ctl::refused(socket, &["altp2m", "view-create", "9"]);
        assert!(err.contains("there is no domain 9"), "{err}");
        let err = parallax_tests::ctl::refused(socket, &["altp2m", "answer", "999", "retry"]);
        assert!(err.contains("no event waits for an answer"), "{err}");
        ctl_altp2m(socket, &["listen", "1", "on"]);
        ctl_altp2m(socket, &["listen", "1", "off"]);
        let mut watch = watch_command(socket, gfn, &["--count", "3"])
            .spawn()
            .expect("cargo runs");
        let mut lines = std::io::BufReader::new(watch.stdout.take().expect("piped")).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            let first = line.contains("violation #");
            watched += &line;
            watched.push('\n');
            if first {
                break;
            }
        }
        // While the watch holds its connection, another client is
        // served beside it (a second terminal's `cargo hv ctl`).
        let listed = parallax_tests::ctl::ok(socket, &["domains"]);
        assert!(listed.contains("agent"), "{listed}");
        for line in lines.map_while(Result::ok) {
            watched += &line;
            watched.push('\n');
        }
        assert!(watch.wait().expect("the watch ends").success(), "{watched}");
        live.wait_for("dom1", "agent: write 3 done", 120);
        ctl_altp2m(socket, &["mode", "1", "limited"]);
        live.wait_for("dom1", "agent: done", 120);
    });
    let events: Vec<&str> = watched
        .lines()
        .filter(|l| l.contains("violation #"))
        .collect();
    assert_eq!(events.len(), 3, "{watched}");
    let page = run
        .console(1)
        .iter()
        .find_map(|l| {
            l.split("(gpa ")
                .nth(1)?
                .split(')')
                .next()
                .map(str::to_owned)
        })
        .expect("the page's address");
    let page = u64::from_str_radix(page.trim_start_matches("0x"), 16).unwrap();
    for e in &events {
        // ALT-4: the event names the GPA in the page, its GLA, the access.
        let gpa = e
            .split("at gpa ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16).unwrap();
        assert_eq!(gpa & !0xfff, page, "{e}");
        assert!(e.contains(": write at gpa"), "{e}");
        assert!(e.contains("(gla 0x"), "{e}");
        assert!(e.contains("the page allows r-x"), "{e}");
        assert!(e.contains("placed by an external agent"), "{e}");
    }
    run.expect_console(1, "agent: write 1 done")
        .expect_console(1, "agent: write 3 done")
        .expect_console(
            1,
            "agent: limited mode: SetAccess refused (ModeForbids), as it must be",
        )
        .expect_console(1, "agent: limited mode: ViewCurrent still answers")
        .expect_from("altp2m", "domain 1: listener attached")
        .expect_from("altp2m", "domain 1 is now in mode Limited")
        .expect_no("FAIL")
        .expect_status(HaltStatus::Success);
}

/// `cargo hv ctl altp2m watch` ended by Ctrl-C (SIGINT), SIGTERM or its
/// terminal closing (SIGHUP: sent here) after an event or two undoes what
/// it set up, as at any other end: the domain back in view
/// 0, nobody listening, the view destroyed. The guest's later writes then
/// go through. (Killed outright, it undoes nothing itself: the proxy does,
/// `a_killed_watch_is_undone_by_the_proxy...` below.)
#[test]
fn an_interrupted_watch_undoes_its_view_and_listener_and_the_guest_runs_on() {
    let mut said = String::new();
    all_writes_go_through("agent-interrupted", "", |_, gfn, socket| {
        let mut watch = watch_command(socket, gfn, &[])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cargo runs");
        until_first_violation(&mut watch);
        // As the user's terminal closing under it (SIGHUP; its
        // standard output is gone too): the same stop as Ctrl-C's
        // (`cli::ctrl_c_ends_a_run...` sends SIGINT to a run).
        let killed = std::process::Command::new("kill")
            .args(["-HUP", &watch.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let out = watch.wait_with_output().expect("the watch ends");
        said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(130), "{said}");
    });
    let n: usize = said
        .split("interrupted: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of events in {said}"));
    assert!((1..WRITES).contains(&n), "{said}");
    assert!(
        said.contains("violation(s) seen and answered; the view is gone, domain 1 is back in view 0 and nobody listens to it"),
        "{said}"
    );
}

/// `cargo hv ctl altp2m watch` killed outright (SIGKILL) after its first
/// event, with the guest's writes coming: it undoes nothing itself, but
/// it had left its watch to the control proxy (`AtDetach`), which sees its
/// connection end and undoes it (docs/control.md, Attaching: what a client leaves
/// behind): the domain back in view 0, the events it held answered, the
/// listen off, the view destroyed. The guest's writes all go through.
/// (Before, the guest's next write waited for ever for an answer nobody
/// would give, and the domain stayed in the dead watch's view.)
#[test]
fn a_killed_watch_is_undone_by_the_proxy_and_the_guest_runs_on() {
    all_writes_go_through("agent-killed", "", |_, gfn, socket| {
        let mut watch = watch_command(socket, gfn, &[]).spawn().expect("cargo runs");
        until_first_violation(&mut watch);
        watch.kill().expect("the watch is killed");
        let status = watch.wait().expect("the watch ends");
        assert_eq!(status.code(), None, "ended by its signal: {status}");
    });
}

/// `cargo hv ctl altp2m watch --count 3` over a guest that writes its page
/// 20 times: the watch stops after its third event while the guest's
/// fourth write already waits for an answer (`burst`: the guest writes
/// again at once, long before the watch's next request can arrive). The
/// watch puts the domain back in view 0 and stops listening;
/// the listen's end answers the event it held `Retry`, and the write goes
/// through in view 0, then the 16 after it. (Before, the fourth write
/// waited for ever, and so did the guest.)
#[test]
fn a_watch_that_stops_at_its_count_leaves_no_vcpu_waiting() {
    all_writes_go_through("agent-count", "burst", |_, gfn, socket| {
        let out = watch_command(socket, gfn, &["--count", "3"])
            .output()
            .expect("cargo runs");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}");
        assert_eq!(said.matches("violation #").count(), 3, "{said}");
    });
}

/// The default image's agent booted with no host agent to watch it (as on
/// hardware, without `cargo hv run`): it gives up after its wait, says so,
/// and the system halts on its own.
#[test]
fn an_agent_nobody_watches_gives_up_and_the_system_halts() {
    let run = boot(
        &agent("agent-unwatched", "watch=4 wait=1"),
        Machine::Bochs,
        |_| {},
    );
    run.expect_console(1, "agent: watch me: gfn")
        .expect_console(1, "nobody put me in a view within 1 s")
        .expect("domain 1 (agent) exited with status 3")
        .expect_status(HaltStatus::GuestFailed);
}

/// Issue 9, point 1: a guest that makes the altp2m service keep ever more
/// (change_gfns, then views) is refused at its quotas with
/// `QuotaExceeded`, the service never faults, and a benign agent beside it
/// passes all its checks. (Before, about 3,000 change_gfns filled the
/// service's heap, it faulted until held, and every domain stopped.)
#[test]
fn a_flooding_guest_is_refused_at_its_quotas_and_a_benign_one_runs_on() {
    let img = system(
        "altp2m-flood",
        "name = \"altp2m-flood\"\n\
         [[domain]]\nname = \"attacker\"\nguest = \"agent\"\nmemory_mib = 16\ncmdline = \"flood\"\n\
         [[domain]]\nname = \"benign\"\nguest = \"agent\"\nmemory_mib = 32\ncmdline = \"checks\"\n",
    );
    let run = boot(&img, Machine::Bochs, |c| {
        c.timeout = std::time::Duration::from_secs(300)
    });
    run.expect_console(1, "then refused: QuotaExceeded { what: Settings, limit: ")
        .expect_console(1, "agent: flood: one freed, one more accepted")
        .expect_console(1, "then refused: QuotaExceeded { what: Views, limit: ")
        .expect_console(1, "agent: flood: refused at its quotas")
        .expect_console(2, "agent: all checks passed")
        // The kernel tells the services when a domain ends; they free what
        // they kept for it (the first to end: the last halts the system).
        .expect_from("altp2m", "ended; its records are freed")
        .expect_no("faulted")
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

/// Issue 9, point 7: the altp2m service faults while a vCPU waits on a
/// restriction it made (an external r-x in a view, no listener, policy
/// pause) and while the guest's host p2m has a read-only page. The restarted
/// service has none of those records; it resets the domain's views to what
/// its empty model describes (the view destroyed, the vCPU back in view 0,
/// the host p2m rwx), the waiting write goes through in view 0, and what
/// the guest sees afterwards agrees with the new model. (Before, the write
/// faulted for ever: the table kept a restriction the model did not know.)
#[test]
fn after_a_restart_altp2m_resets_the_views_it_cannot_account_for() {
    use ipc_schema::altp2m::{AltRequest, NoListener};
    use ipc_schema::hypercall::{Access, Request};
    let img = agent("agent-restart", "restart");
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            let line = live.wait_for("dom1", "agent: restart: ready", 120).text;
            let view: u16 = line
                .split("(view ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse().ok())
                .expect("the guest names its view");
            let gfn = line
                .split("gfn 0x")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .expect("the guest names its page");
            let mut ctl = live.control();
            ctl.altp2m_done(AltRequest::SetNoListener {
                domain: 1,
                policy: NoListener::Pause,
            })
            .unwrap();
            ctl.view_request(
                1,
                Request::SetAccess {
                    view,
                    gfn,
                    access: Access::RX,
                },
            )
            .unwrap();
            live.wait_for("altp2m", "no listener, so vCPU 0 waits for one", 120);
            ctl.inject_fault("altp2m").expect("the fault is injected");
            live.wait_for("init", "restarted service altp2m", 60);
            live.wait_for("dom1", "agent: restart checks", 120);
        },
    );
    run.expect_from(
        "altp2m",
        "domain 1: started without the records of its views, so they are reset: 1 alternate view(s) destroyed, vCPU 0 back in view 0 (was in view 1)",
    )
    .expect_from("altp2m", "an exit from view 1, which this service does not know")
    .expect_console(1, "agent: the write to gfn")
    .expect_console(1, "agent: restart checks passed")
    .expect("service altp2m (generation 0) faulted")
    .expect_no("crashed")
    .expect_no("FAIL")
    .expect_status(HaltStatus::Success);
    assert!(
        !run.console(1).iter().any(|l| l.contains("FAIL")),
        "the guest failed a check"
    );
}

/// Issue 9, point 8: memory the hypervisor reads and writes on a guest's
/// behalf (the request hypercall's page) is reached through the view the
/// guest runs in: refused where the view makes it read-only (the page
/// unchanged), and the frame change_gfn puts there where it remaps it.
#[test]
fn the_hypervisor_reaches_a_request_page_through_the_guests_view() {
    let run = boot(&agent("agent-viewpage", "viewpage"), Machine::Bochs, |_| {});
    run.expect_console(
        1,
        "read-only in the view is refused (BadAddress), the page unchanged",
    )
    .expect_console(
        1,
        "a remapped request page is read and answered in the frame",
    )
    .expect_console(1, "agent: viewpage: ok")
    .expect_status(HaltStatus::Success);
}

/// ALT-9 (issue 13, point 8): a change to the host p2m reaches every view's
/// real entries, and a view's own settings (access, suppress-#VE,
/// change_gfn) are kept and applied again over it. The guest changes view
/// 0 by range and by page, and after each change reads the raw entries
/// (what the kernel's tables hold) of four pages in the host p2m, a plain
/// view and a view with settings of its own; it reads and writes through
/// the view, and a #VE proves the view's real entry read-only with its own
/// cleared suppress-#VE bit, until the host gives write back from the #VE
/// handler and the retried write goes through. Skylake, for VMFUNC and #VE.
#[test]
fn host_p2m_changes_reach_every_view_and_a_views_own_settings_stay() {
    let run = boot(
        &agent("agent-propagate", "propagate"),
        Machine::Bochs,
        |c| c.bochs_cpu = "corei7_skylake_x".to_owned(),
    );
    for line in [
        "ok: before: host p2m rwx rwx rwx rwx; the raw entries of views 0, 2 and 1 are as propagated",
        "ok: host r-x over the range: host p2m r-x r-x r-x r-x;",
        "ok: g2 read through view 1 gives g3's marker",
        "ok: a write to g1 through view 1 raised one #VE",
        "ok: the #VE handler gave g1 write again in the host p2m",
        "ok: the write, retried in view 1 after the host p2m's change, went through",
        "ok: host rwx on g1 alone: host p2m r-x rwx r-x r-x;",
        "ok: host rwx over the range: host p2m rwx rwx rwx rwx;",
        "ok: a write to g2 through view 1 lands in g3's frame",
        "ok: host r-- on the remap target g3: host p2m rwx rwx rwx r--;",
        "ok: host rwx on g3 again:",
        "ok: host r-- on g2, which v remaps: host p2m rwx rwx r-- rwx;",
        "ok: g2 stays writable through view 1 while the host p2m's g2 is r--",
        "ok: host rwx on g2 again:",
        "agent: propagate: all checks passed",
    ] {
        run.expect_console(1, line);
    }
    run.expect_no("FAIL")
        .expect_no("crashed")
        .expect_status(HaltStatus::Success);
}

/// One guest write across two pages an external agent makes read-only in
/// its view, each fault answered `AllowOnce`: the write goes through (both
/// pages open together for its one instruction), and both are closed
/// again after it, so the guest's next write to the first page is an
/// event again. (Before, the second page's answer took the first's place
/// in the step's record, and the first stayed writable for good: the next
/// write went through unseen.)
#[test]
fn a_write_across_two_restricted_pages_goes_through_once_and_both_stay_restricted() {
    use ipc_schema::altp2m::{Action, AltReply, AltRequest};
    use ipc_schema::hypercall::{Access, Reply, Request};
    let mut faults = Vec::new();
    let (mut a, mut b) = (0, 0);
    let run = boot_live(
        &agent("agent-straddle", "straddle wait=300"),
        Machine::Bochs,
        |_| {},
        |live| {
            let line = live.wait_for("dom1", "straddle me: gfns", 120);
            (a, b) = (
                parallax_tests::hex_after(&line.text, "gfns"),
                parallax_tests::hex_after(&line.text, "and"),
            );
            let mut c = live.control();
            let created = c.view_request(
                1,
                Request::ViewCreate {
                    default_access: None,
                },
            );
            let Ok(Reply::View(view)) = created else {
                panic!("{created:?}")
            };
            for gfn in [a, b] {
                let access = Access::R;
                c.view_request(1, Request::SetAccess { view, gfn, access })
                    .unwrap();
            }
            c.altp2m_done(AltRequest::Listen {
                domain: 1,
                on: true,
            })
            .unwrap();
            c.view_request(1, Request::ViewSwitchAll { view }).unwrap();
            // The straddling write's faults, each let through once, until
            // the write to the first page alone (its offset 0), which goes
            // back to view 0.
            loop {
                let wait = std::time::Duration::from_secs(120);
                let e = match c.next_violation(wait) {
                    Ok(Some(e)) => e,
                    // (Closed: the guest ended, its last write unseen.)
                    other => panic!(
                        "no event for the write to the first page alone ({other:?}); the faults before: {faults:x?}"
                    ),
                };
                let last = e.gpa == a << 12;
                let action = if last {
                    Action::SwitchView(0)
                } else {
                    faults.push(e.gpa);
                    Action::AllowOnce
                };
                assert!(
                    faults.len() <= 8,
                    "the write makes no progress: {faults:x?}"
                );
                let answered = c.altp2m(AltRequest::Answer {
                    event: e.id,
                    action,
                });
                assert_eq!(answered.unwrap(), AltReply::Done);
                if last {
                    break;
                }
            }
            live.wait_for("dom1", "agent: first page written again", 120);
        },
    );
    eprintln!("straddle: the faults of the write across gfns {a:#x} and {b:#x}: {faults:x?}");
    // Its first half faulted on the first page, its second on the other.
    assert!(faults.contains(&((a << 12) + 0xffc)), "{faults:x?}");
    assert!(faults.contains(&(b << 12)), "{faults:x?}");
    run.expect_console(1, "agent: straddling write done")
        .expect_no("FAIL")
        .expect_status(HaltStatus::Success);
}
