//! Copy-on-write page sharing between domains (issue 11; SH-1..SH-4) on
//! real VMX (Bochs, corei7_skylake_x), driven from the host with
//! `cargo hv ctl share` while the guests run: a page of one domain shared
//! with another's (the client's frame freed), read by both, written by
//! each through every view (the writer gets a private copy, the other
//! keeps the contents), the frames free counted at each step, the
//! references released by destroying the domains, and bad input refused
//! by name with nothing else disturbed.

use image_builder::emulator::Machine;
use ipc_schema::halt::HaltStatus;
use parallax_tests::ctl::{ok, refused};
use parallax_tests::{boot_live, system};

/// The number after `key` (`data=0x...` in a guest line, `"free":N` in JSON).
fn value(text: &str, key: &str) -> u64 {
    let v = text
        .split(key)
        .nth(1)
        .and_then(|s| s.split([' ', ',', '}', ';']).next())
        .unwrap_or_else(|| panic!("no {key} in {text}"));
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.trim().parse().unwrap(),
    }
}

fn le(v: u64) -> String {
    v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn pages_are_shared_copied_on_write_through_every_view_and_released() {
    let domain = |name: &str, tag: u32| {
        format!(
            "[[domain]]\nname = \"{name}\"\nguest = \"sharer\"\nmemory_mib = 16\ncmdline = \"tag={tag}\"\n"
        )
    };
    let img = system(
        "sharing",
        &format!(
            "name = \"sharing\"\n{}{}{}",
            domain("a", 1),
            domain("b", 2),
            domain("c", 3)
        ),
    );
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            let ready = live.wait_for("dom1", "sharer: ready", 300).text.clone();
            live.wait_for("dom2", "sharer: ready", 300);
            live.wait_for("dom3", "sharer: ready", 300);
            assert!(ready.contains("views=3"), "VMFUNC views: {ready}");
            let s = live.socket().to_owned();
            let hex = |v: u64| format!("{v:#x}");
            let (data, ctrl) = (value(&ready, "data="), value(&ready, "ctrl="));
            let gfn = data >> 12;
            let json = |args: &[&str]| {
                let mut a = args.to_vec();
                a.push("--json");
                ok(&s, &a)
            };
            // The frames free now, asked through a page of domain 3 that
            // stays nominated (its first nomination may split a large page).
            let free = || {
                value(
                    &json(&["share", "nominate", "3", &hex(gfn + 1)]),
                    "\"free\":",
                )
            };
            free();
            let free0 = free();

            // SH-1: a page of a shared with b's same page.
            let na = json(&["share", "nominate", "a", &hex(gfn)]);
            assert!(na.contains("\"refs\":1"), "{na}");
            let ha = value(&na, "\"handle\":");
            let nb = json(&["share", "nominate", "b", &hex(gfn)]);
            let (hb, free_b) = (value(&nb, "\"handle\":"), value(&nb, "\"free\":"));
            let shared = json(&["share", "share", &hex(ha), &hex(hb)]);
            assert!(shared.contains("\"refs\":2"), "{shared}");
            assert_eq!(
                value(&shared, "\"free\":"),
                free_b + 1,
                "b's frame was freed: {shared}"
            );
            // Both read a's contents.
            for d in ["1", "2"] {
                let m = json(&["mem", "read", d, &hex(data), "8"]);
                assert!(m.contains(&le(0x5eed_0100)), "domain {d}: {m}");
            }
            let st = json(&["share", "status"]);
            assert!(
                st.contains("\"frames\":2")
                    && st.contains("\"pages\":3")
                    && st.contains("\"saved\":1"),
                "{st}"
            );

            // Bad input: refused by name, nothing changed.
            for (args, want) in [
                (
                    vec!["share", "nominate", "1", "0x100000"],
                    "not the domain's RAM",
                ),
                (vec!["share", "nominate", "9", &hex(gfn)], "no live domain"),
                (vec!["share", "share", &hex(ha), &hex(ha)], "the same page"),
                (vec!["share", "share", &hex(ha), "0x1234"], "names nothing"),
                (vec!["share", "share", &hex(ha), &hex(hb)], "names nothing"),
                (vec!["share", "unshare", "1", &hex(gfn + 2)], "not shared"),
                // SH-3: page 3 is remapped to page 2 in a's view 1.
                (
                    vec!["share", "nominate", "1", &hex(gfn + 3)],
                    "modified in view 1",
                ),
                (
                    vec!["share", "nominate", "1", &hex(gfn + 2)],
                    "modified in view 1",
                ),
                (
                    vec!["altp2m", "set-access", "1", "1", &hex(gfn), "r"],
                    "shared page",
                ),
                // SH-2: the host's own write to a shared page.
                (vec!["mem", "write", "2", &hex(data), "00"], ""),
            ] {
                let e = refused(&s, &args);
                assert!(e.contains(want), "{args:?}: {e}");
            }
            assert_eq!(
                json(&["share", "status"]),
                st,
                "the refusals changed nothing"
            );
            // The introspect service's first mapping of guest memory takes
            // page-table frames for its window: taken now, before counting.
            ok(&s, &["mem", "read", "3", &hex(ctrl), "8"]);
            let free1 = free();

            // SH-2: b writes the page through each of its 3 views: its own
            // copy (one frame), a's contents untouched.
            ok(&s, &["mem", "write", "2", &hex(ctrl), "01"]);
            let line = live
                .wait_for("dom2", "sharer: page 0 read", 300)
                .text
                .clone();
            assert!(
                line.contains(
                    "read 0x5eed0100; wrote through 3 views: 0x51570020 0x51570021 0x51570022"
                ),
                "{line}"
            );
            // The break's cost as the guest saw it (docs/sharing.md quotes it).
            let ticks = value(&line, "first write ");
            eprintln!("copy-on-write break (a copy): {ticks} ticks");
            assert!(ticks > 0, "{line}");
            let m = json(&["mem", "read", "1", &hex(data), "32"]);
            assert!(
                m.contains(&format!("{}{}", le(0x5eed_0100), "0".repeat(48))),
                "a unchanged: {m}"
            );
            let st = json(&["share", "status"]);
            assert!(
                st.contains("\"pages\":2")
                    && st.contains("\"breaks\":1")
                    && st.contains("\"saved\":0"),
                "{st}"
            );
            assert_eq!(free(), free1 - 1, "b's copy took one frame");

            // a writes it: the last reference keeps the frame, no copy.
            ok(&s, &["mem", "write", "1", &hex(ctrl), "01"]);
            let line = live
                .wait_for("dom1", "sharer: page 0 read", 300)
                .text
                .clone();
            assert!(
                line.contains("wrote through 3 views: 0x51570010 0x51570011 0x51570012"),
                "{line}"
            );
            eprintln!(
                "copy-on-write break (the last reference, no copy): {} ticks",
                value(&line, "first write ")
            );
            assert_eq!(free(), free1 - 1, "no copy for the last reference");
            let m = json(&["mem", "read", "2", &hex(data), "8"]);
            assert!(m.contains(&le(0x5eed_0100)), "b kept what it read: {m}");

            // SH-4: page 1 shared again, then both domains destroyed: the
            // references go with them, the last returns the frame.
            let h1 = value(
                &json(&["share", "nominate", "1", &hex(gfn + 1)]),
                "\"handle\":",
            );
            let h2 = value(
                &json(&["share", "nominate", "2", &hex(gfn + 1)]),
                "\"handle\":",
            );
            let sh = json(&["share", "share", &hex(h1), &hex(h2)]);
            assert!(sh.contains("\"refs\":2"), "{sh}");
            ok(&s, &["destroy", "2"]);
            let st = json(&["share", "status"]);
            assert!(
                st.contains("\"frames\":2") && st.contains("\"pages\":2"),
                "{st}"
            );
            let before = free();
            ok(&s, &["destroy", "1"]);
            let st = json(&["share", "status"]);
            assert!(
                st.contains("\"frames\":1") && st.contains("\"pages\":1"),
                "only c's page: {st}"
            );
            assert!(
                free() > before,
                "the last reference returned the frame (and a's tables)"
            );
            assert!(free0 > 0);
            ok(&s, &["mem", "write", "3", &hex(ctrl), "02"]);
        },
    );
    run.expect_console(3, "sharer: done")
        .expect_status(HaltStatus::Success);
}

#[test]
fn two_running_domains_of_one_image_are_deduplicated_and_finish_right() {
    // Issue 11, point 4: `cargo hv ctl share scan` over two domains
    // running the same guest; both then write through every view and end
    // with the right output.
    let domain = |name: &str, tag: u32| {
        format!(
            "[[domain]]\nname = \"{name}\"\nguest = \"sharer\"\nmemory_mib = 16\ncmdline = \"tag={tag}\"\n"
        )
    };
    let img = system(
        "dedup",
        &format!("name = \"dedup\"\n{}{}", domain("a", 1), domain("b", 2)),
    );
    let run = boot_live(
        &img,
        Machine::Bochs,
        // The scan reads 8,192 pages through the kernel: on a loaded
        // machine Bochs takes minutes of wall time for it.
        |c| c.timeout = std::time::Duration::from_secs(900),
        |live| {
            let ready = live.wait_for("dom1", "sharer: ready", 300).text.clone();
            live.wait_for("dom2", "sharer: ready", 300);
            let s = live.socket().to_owned();
            let ctrl = format!("{:#x}", value(&ready, "ctrl="));
            let started = std::time::Instant::now();
            let scan = ok(&s, &["share", "scan", "a", "b", "--json"]);
            eprintln!("scan ({:.0?}): {scan}", started.elapsed());
            assert_eq!(value(&scan, "\"pages\":"), 2 * 4096, "{scan}");
            let saved = value(&scan, "\"saved\":");
            assert!(saved > 0, "{scan}");
            let text = ok(&s, &["share", "status"]);
            eprintln!("status: {text}");
            let st = ok(&s, &["share", "status", "--json"]);
            assert!(value(&st, "\"saved\":") > 0, "{st}");
            // Both guests go on: each writes its data page through every
            // view (copies where it was shared) and ends.
            for (d, tag) in [("1", 1), ("2", 2)] {
                ok(&s, &["mem", "write", d, &ctrl, "01"]);
                let line = live
                    .wait_for(&format!("dom{d}"), "sharer: page 0 read", 300)
                    .text
                    .clone();
                let want = format!(
                    "read 0x5eed0{tag}00; wrote through 3 views: 0x515700{tag}0 0x515700{tag}1 0x515700{tag}2"
                );
                assert!(line.contains(&want), "{line}");
                ok(&s, &["mem", "write", d, &ctrl, "02"]);
            }
        },
    );
    run.expect_console(1, "sharer: done")
        .expect_console(2, "sharer: done")
        .expect_status(HaltStatus::Success);
}

/// VM fork (issue 11, point 5): a paused guest forked 100 times, each fork
/// given its number in its control page by the host (the kernel copies
/// the page on that write), reading the parent's marker, writing its own
/// over it and ending with status 0; the parent's memory unchanged after
/// them all; a fork that wrote, reset, reads the parent's contents again
/// and runs from the parent's state; the bad requests refused by name.
#[test]
fn a_paused_guest_is_forked_100_times_and_a_reset_fork_is_its_parent_again() {
    use ipc_schema::syscall::DomainOp;
    use parallax_client::introspect::Address;
    const PARENT: u64 = 0x7a4e_4700_0000_0001;
    let img = system(
        "fork",
        "name = \"fork\"\n[[domain]]\nname = \"parent\"\nguest = \"forker\"\nmemory_mib = 16\n",
    );
    let run = boot_live(
        &img,
        Machine::Bochs,
        |_| {},
        |live| {
            let ready = live.wait_for("dom1", "forker: ready", 300).text.clone();
            let (data, ctrl) = (value(&ready, "data="), value(&ready, "ctrl="));
            let s = live.socket().to_owned();
            // A running domain is not forked (the CLI names the reason).
            // (The proxy takes one client at a time: the CLI runs while
            // the test's own client is not attached.)
            let e = refused(&s, &["fork", "parent"]);
            assert!(e.contains("Busy"), "{e}");
            let mut c = live.control();
            let word = |c: &mut parallax_client::Client<_>, d: u16, at: u64| {
                let b = c.mem_read(d, Address::Physical(at), 8).unwrap();
                u64::from_le_bytes(b.try_into().unwrap())
            };
            c.domain_control(1, DomainOp::Pause).unwrap();
            let forked = |c: &mut parallax_client::Client<_>, name: &str| {
                // The vCPU may be in the vmm's hands for a moment after
                // the pause: retried then.
                for _ in 0..50 {
                    match c.fork(1, name) {
                        Ok(id) => return id,
                        Err(e) if e.to_string().contains("Busy") => {
                            std::thread::sleep(std::time::Duration::from_millis(100))
                        }
                        Err(e) => panic!("fork: {e}"),
                    }
                }
                panic!("the parent stayed busy");
            };
            let mut last = 0;
            for n in 1..=100u64 {
                let id = forked(&mut c, "");
                assert_eq!(word(&mut c, id, data), PARENT, "fork {n} before it runs");
                c.mem_write(id, Address::Physical(ctrl), &n.to_le_bytes())
                    .unwrap();
                c.domain_control(id, DomainOp::Unpause).unwrap();
                let line = live
                    .wait_for(&format!("dom{id}"), &format!("forker: {n} read"), 120)
                    .text
                    .clone();
                assert!(
                    line.contains(&format!("read {PARENT:#x} wrote {:#x}", 0xc41d_0000 + n)),
                    "{line}"
                );
                if n == 1 || n == 100 {
                    eprintln!("fork {n} (domain {id}): {line}");
                }
                let info = c.domains().unwrap();
                let d = info.iter().find(|d| d.id == id).unwrap();
                assert_eq!((d.state, d.exit_status), (3, 0), "fork {n} ended with 0");
                assert_eq!(word(&mut c, id, data), 0xc41d_0000 + n);
                if n < 100 {
                    c.domain_control(id, DomainOp::Destroy).unwrap();
                }
                last = id;
            }
            // The parent's memory is as it was.
            assert_eq!(word(&mut c, 1, data), PARENT);
            assert_eq!(word(&mut c, 1, ctrl), 0);
            // The last fork, reset: its memory and its vCPU are the
            // parent's again (paused; run, it waits for its number).
            drop(c);
            ok(&s, &["reset", &last.to_string()]);
            // A fork of the parent by name, through the CLI.
            let named = ok(&s, &["fork", "parent", "--name", "kid"]);
            assert!(named.contains("forked from domain 1"), "{named}");
            // A name names one domain: given again, refused naming its
            // holder; by default, the next one free (the last fork has
            // `parent-fork`), and the name then finds that fork.
            let e = refused(&s, &["fork", "parent", "--name", "kid"]);
            assert!(e.contains("has that name already"), "{e}");
            ok(&s, &["fork", "parent"]);
            let listed = ok(&s, &["domains"]);
            assert!(
                listed.lines().any(|l| l.contains(" parent-fork2 ")),
                "{listed}"
            );
            ok(&s, &["destroy", "parent-fork2"]);
            // Bad requests, refused by name; nothing else changes.
            for (args, want) in [
                (
                    vec!["unpause", "1"],
                    "Busy (domain 1 has forks: a parent stays paused",
                ),
                (
                    vec!["destroy", "1"],
                    "Busy (domain 1 has forks: a parent stays paused",
                ),
                (
                    vec!["reset", "1"],
                    "domain 1 is no fork made by `cargo hv ctl fork`",
                ),
                (vec!["fork", "nobody"], "nobody"),
                (vec!["fork", "9"], "no such domain"),
            ] {
                let e = refused(&s, &args);
                assert!(e.contains(want), "{args:?}: {e}");
            }
            let mut c = live.control();
            assert_eq!(word(&mut c, last, data), PARENT, "reset: the marker");
            assert_eq!(word(&mut c, last, ctrl), 0, "reset: the control word");
            c.domain_control(last, DomainOp::Unpause).unwrap();
            c.mem_write(last, Address::Physical(ctrl), &777u64.to_le_bytes())
                .unwrap();
            let line = live
                .wait_for(&format!("dom{last}"), "forker: 777 read", 120)
                .text
                .clone();
            assert!(line.contains(&format!("read {PARENT:#x}")), "{line}");
            eprintln!("the reset fork (domain {last}): {line}");
            let kid = c.domain_id("kid").unwrap();
            c.domain_control(kid, DomainOp::Unpause).unwrap();
            let e = c.domain_control(kid, DomainOp::Reset).unwrap_err();
            assert!(e.to_string().contains("Busy"), "a running fork: {e}");
            assert_eq!(word(&mut c, 1, data), PARENT);
            // With its forks gone the parent runs on, and ends.
            for id in [last, kid] {
                c.domain_control(id, DomainOp::Destroy).unwrap();
            }
            c.domain_control(1, DomainOp::Unpause).unwrap();
            c.mem_write(1, Address::Physical(ctrl), &1000u64.to_le_bytes())
                .unwrap();
            live.wait_for("dom1", "forker: 1000 read", 120);
        },
    );
    run.expect_console(1, &format!("forker: 1000 read {PARENT:#x}"))
        .expect_status(HaltStatus::Success);
}
