//! `cargo hv ctl`, `cargo hv swap` and `cargo hv build --service`: bad input
//! is named before anything is sent or built, and the commands work against
//! a mock console behind the real proxy. No emulator, no hypervisor.

#[path = "../../client/tests/common/mod.rs"]
mod common;

use common::{Console, Received, event, fake_elf, reply, scratch, serve};
use image_builder::control::proxy::{Proxy, ProxySocket};
use image_builder::control::{ControlRequest, MAX_SWAP};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::JoinHandle;

fn hv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cargo-hv"))
        .args(args)
        .output()
        .expect("cargo-hv runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A mock console behind a proxy socket, as `cargo hv run` offers it.
struct Served {
    dir: PathBuf,
    socket: PathBuf,
    proxy: Option<Proxy>,
    mock: Option<JoinHandle<Received>>,
}

impl Served {
    fn start(label: &str, console: Console) -> Self {
        let (proxy_end, console_end) = UnixStream::pair().unwrap();
        Self::with_mock(label, proxy_end, console.serve(console_end))
    }

    fn with_mock(label: &str, proxy_end: UnixStream, mock: JoinHandle<Received>) -> Self {
        let dir = scratch(label);
        let socket = dir.join("ctl.sock");
        let proxy = ProxySocket::bind(&socket)
            .unwrap()
            .serve(Some(proxy_end))
            .unwrap();
        Self {
            dir,
            socket,
            proxy: Some(proxy),
            mock: Some(mock),
        }
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Stops the proxy and returns what the console received.
    fn finish(mut self) -> Received {
        // Stopping the proxy closes the console's stream: the mock ends.
        self.proxy.take().unwrap().stop();
        self.mock.take().unwrap().join().unwrap()
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn ctl_services_prints_a_table() {
    let s = Served::start("cli-services", Console::default());
    let o = hv(&["ctl", "--socket", s.socket(), "services"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for h in ["NAME", "GENERATION", "RESTARTS", "STATE", "SCHEMA KEY"] {
        assert!(lines[0].contains(h), "{out}");
    }
    let vmm: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(
        vmm,
        ["vmm", "3", "2", "faulted", "abababababababab"],
        "{out}"
    );
}

#[test]
fn ctl_fork_and_reset_name_the_child_and_the_refusal() {
    let s = Served::start("cli-fork", Console::default());
    let ctl = |args: &[&str]| {
        let mut a = vec!["ctl", "--socket", s.socket()];
        a.extend_from_slice(args);
        hv(&a)
    };
    let o = ctl(&["fork", "hello"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("(Fork 1 ()): the kernel refused: Busy")
            && stderr(&o).contains("domain 1 must be paused"),
        "a running parent: {}",
        stderr(&o)
    );
    // Domains by name too.
    assert_eq!(ctl(&["pause", "hello"]).status.code(), Some(0));
    for (args, want) in [
        (
            vec!["fork", "hello"],
            "domain 3 forked from domain 1 (paused)",
        ),
        (
            vec!["fork", "1", "--name", "kid"],
            "domain 4 forked from domain 1 (paused)",
        ),
        (
            vec!["reset", "kid"],
            "domain 4 reset to its parent (paused)",
        ),
    ] {
        let o = ctl(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), want);
    }
    let o = ctl(&["domains"]);
    assert!(stdout(&o).contains("hello-fork") && stdout(&o).contains("kid"));
    let got = s.finish();
    assert!(got.requests.iter().any(|r| matches!(
        r.request,
        ControlRequest::DomainControl {
            id: 4,
            op: parallax_client::DomainOp::Reset
        }
    )));
}

#[test]
fn ctl_domains_and_domain_control() {
    let s = Served::start("cli-domains", Console::default());
    let o = hv(&["ctl", "domains", "--socket", s.socket()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("hello") && stdout(&o).contains("running"));
    for (cmd, word) in [
        ("pause", "paused"),
        ("unpause", "unpaused"),
        ("destroy", "destroyed"),
    ] {
        let o = hv(&["ctl", "--socket", s.socket(), cmd, "2"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(stdout(&o).trim(), format!("domain 2 {word}"));
    }
    let o = hv(&["ctl", "--socket", s.socket(), "pause", "7"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("(DomainControl 7 Pause): no such domain"),
        "{}",
        stderr(&o)
    );
    let o = hv(&["ctl", "--socket", s.socket(), "fault", "console"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let got = s.finish();
    let ops: Vec<&ControlRequest> = got
        .requests
        .iter()
        .map(|r| &r.request)
        .filter(|r| matches!(r, ControlRequest::DomainControl { .. }))
        .collect();
    assert_eq!(ops.len(), 4);
}

#[test]
fn ctl_events_prints_events_as_they_come() {
    let (proxy_end, console_end) = UnixStream::pair().unwrap();
    let mut con = Console::default();
    let mock = serve(console_end, move |req| {
        vec![reply(req.seq, con.answer(req)), event(12), event(34)]
    });
    let s = Served::with_mock("cli-events", proxy_end, mock);
    let mut child = Command::new(env!("CARGO_BIN_EXE_cargo-hv"))
        .args(["ctl", "--socket", s.socket(), "events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    // Interrupted, as a user would: only the process this test started.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        first.ends_with(
            "12 bytes that did not decode as frames were dropped (by the control proxy, or the console)"
        ),
        "{first}"
    );
    assert!(second.contains("34 bytes that did not decode"), "{second}");
}

#[test]
fn ctl_without_a_run_says_so() {
    let dir = scratch("cli-norun");
    let sock = dir.join("ctl.sock");
    let o = hv(&["ctl", "--socket", sock.to_str().unwrap(), "services"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains(&format!(
            "no control socket at {}: is `cargo hv run` running?",
            sock.display()
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn swap_sends_the_file_and_prints_the_generation() {
    let s = Served::start("cli-swap", Console::default());
    let elf = fake_elf(1500);
    let path = write(&s.dir, "vmm.elf", &elf);
    let o = hv(&["swap", "vmm", &path, "--socket", s.socket()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        format!("swapped vmm: {path} (1500 bytes), now generation 4")
    );
    let got = s.finish();
    let sent: Vec<u8> = got
        .pick(|r| match r {
            ControlRequest::SwapChunk { bytes, .. } => Some(bytes.0.to_vec()),
            _ => None,
        })
        .concat();
    let stripped = image_builder::elf::strip_service(&elf).unwrap();
    assert_eq!(sent, stripped);
    // Without a terminal, the progress is a line each tenth.
    let n = stripped.len();
    let said = stderr(&o);
    let progress: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with(&format!("sending {path}: ")))
        .collect();
    assert!(progress.len() >= 2, "{said}");
    assert!(
        progress
            .last()
            .unwrap()
            .starts_with(&format!("sending {path}: {n} of {n} bytes (100 %")),
        "{progress:?}"
    );
}

/// Runs `cargo hv swap` expecting a refusal before anything is sent.
fn swap_refused(label: &str, name: &str, file: Option<&[u8]>) -> String {
    let s = Served::start(label, Console::default());
    let path = match file {
        Some(bytes) => write(&s.dir, "new.elf", bytes),
        None => s.dir.join("missing.elf").to_str().unwrap().to_owned(),
    };
    let o = hv(&["swap", name, &path, "--socket", s.socket()]);
    assert_eq!(
        o.status.code(),
        Some(image_builder::TOOL_ERROR.into()),
        "{}",
        stdout(&o)
    );
    let got = s.finish();
    assert!(got.requests.is_empty(), "nothing was sent: {got:?}");
    stderr(&o).replace(&path, "PATH")
}

#[test]
fn swap_names_a_missing_file() {
    let e = swap_refused("cli-swap-missing", "vmm", None);
    assert!(
        e.contains("error: the ELF to swap into vmm, PATH, does not exist"),
        "{e}"
    );
}

#[test]
fn swap_refuses_a_file_that_is_not_an_elf() {
    let e = swap_refused("cli-swap-text", "vmm", Some(b"#!/bin/sh\necho hi\n"));
    assert!(
        e.contains(
            "error: PATH is not an ELF file (it starts with 23 21 2f 62 instead of 7f 45 4c 46); nothing was sent"
        ),
        "{e}"
    );
    let e = swap_refused("cli-swap-empty", "vmm", Some(b""));
    assert!(e.contains("PATH is empty, not an ELF file"), "{e}");
    let mut arm = fake_elf(100);
    arm[18] = 183;
    let e = swap_refused("cli-swap-arm", "vmm", Some(&arm));
    assert!(e.contains("an ELF file for machine 183, not x86-64"), "{e}");
}

#[test]
fn swap_refuses_an_oversize_elf_and_a_bad_name() {
    let e = swap_refused(
        "cli-swap-big",
        "vmm",
        Some(&fake_elf(MAX_SWAP as usize + 1)),
    );
    assert!(e.contains("a swap carries at most 1048576 bytes"), "{e}");
    let long = "s".repeat(40);
    let e = swap_refused("cli-swap-name", &long, Some(&fake_elf(100)));
    assert!(e.contains("the control protocol carries at most 32"), "{e}");
}

#[test]
fn build_service_overrides_are_checked_as_they_are_parsed() {
    let dir = scratch("cli-override");
    let missing = dir.join("vmm.elf");
    let o = hv(&["build", "--service", &format!("vmm={}", missing.display())]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    let e = stderr(&o);
    assert!(e.contains("--service <NAME=PATH>"), "{e}");
    assert!(
        e.contains(&format!("{} does not exist", missing.display())),
        "{e}"
    );

    let text = write(&dir, "notes.txt", b"hello");
    let o = hv(&["build", "--service", &format!("vmm={text}")]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains(&format!("{text} is not an ELF file")),
        "{}",
        stderr(&o)
    );

    let o = hv(&["build", "--service", "vmm"]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(stderr(&o).contains("expected NAME=PATH"), "{}", stderr(&o));

    let elf = write(&dir, "a.elf", &fake_elf(64));
    let o = hv(&["build", "--service", &format!("Bad_Name={elf}")]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains("the service name \"Bad_Name\" must be"),
        "{}",
        stderr(&o)
    );

    let other = write(&dir, "b.elf", &fake_elf(64));
    let o = hv(&[
        "build",
        "--service",
        &format!("vmm={elf}"),
        "--service",
        &format!("vmm={other}"),
    ]);
    assert_eq!(o.status.code(), Some(image_builder::TOOL_ERROR.into()));
    assert!(
        stderr(&o).contains(&format!("--service vmm is given twice ({elf} and {other})")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_service_override_is_recorded() {
    let dir = scratch("cli-override-ok");
    let elf = write(&dir, "vmm.elf", &fake_elf(64));
    let (name, path) = image_builder::image::parse_service_override(&format!("vmm={elf}")).unwrap();
    assert_eq!(name, "vmm");
    assert_eq!(path, dir.join("vmm.elf"));
    assert!(path.is_absolute());
}

/// `cargo hv ctl --socket S logdirty ARGS...`.
fn logdirty(s: &Served, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--socket", s.socket(), "logdirty"];
    all.extend_from_slice(args);
    hv(&all)
}

/// Its output, the command having succeeded.
fn logdirty_ok(s: &Served, args: &[&str]) -> String {
    let o = logdirty(s, args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// Its error, the command having failed with the tool's error status.
fn logdirty_err(s: &Served, args: &[&str]) -> String {
    let o = logdirty(s, args);
    assert_eq!(
        o.status.code(),
        Some(image_builder::TOOL_ERROR.into()),
        "{args:?}: {}",
        stdout(&o)
    );
    stderr(&o)
}

#[test]
fn ctl_logdirty_starts_peeks_reads_tells_and_stops_a_log() {
    use image_builder::control::logdirty::LdRequest;
    let s = Served::start("cli-ld", Console::default());
    assert_eq!(
        logdirty_ok(&s, &["start", "hello", "--log", "2"]).trim(),
        "domain 1 (log 2): logging 0x0-0xfff (4096 pages) with PML"
    );
    let peek = logdirty_ok(&s, &["peek", "1", "--log", "2"]);
    let lines: Vec<&str> = peek.lines().collect();
    assert_eq!(lines.len(), 13, "{peek}");
    assert_eq!(
        lines[..4],
        [
            "0x10-0x1f (16 pages)",
            "0x100 (1 page)",
            "0x200 (1 page)",
            "0x202 (1 page)"
        ],
        "{peek}"
    );
    assert_eq!(
        lines[12],
        "total: 27 pages in 12 ranges (domain 1, log 2; not cleared)"
    );
    assert_eq!(
        logdirty_ok(&s, &["status", "hello", "--log", "2"]).trim(),
        "domain 1 (log 2): PML over 0x0-0xfff (4096 pages); 27 pages set"
    );
    let read = logdirty_ok(&s, &["read", "1", "--log", "2", "--json"]);
    let mut want = String::from(
        r#"{"domain":1,"log":2,"cleared":true,"ranges":[{"gfn":16,"count":16},{"gfn":256,"count":1}"#,
    );
    for i in 0..10 {
        want.push_str(&format!(r#",{{"gfn":{},"count":1}}"#, 0x200 + 2 * i));
    }
    want.push_str(r#"],"pages":27}"#);
    assert_eq!(read.trim(), want);
    assert_eq!(
        logdirty_ok(&s, &["peek", "1", "--log", "2", "--json"]).trim(),
        r#"{"domain":1,"log":2,"cleared":false,"ranges":[],"pages":0}"#
    );
    assert_eq!(
        logdirty_ok(&s, &["peek", "1", "--log", "2"]).trim(),
        "total: 0 pages (domain 1, log 2; not cleared)"
    );
    assert_eq!(
        logdirty_ok(&s, &["status", "1", "--log", "2", "--json"]).trim(),
        r#"{"domain":1,"log":2,"mechanism":"pml","range":{"gfn":0,"count":4096},"dirty":0}"#
    );
    // A range, write-protection, JSON.
    assert_eq!(
        logdirty_ok(
            &s,
            &[
                "start", "cpuid", "--range", "0x100:16", "--mode", "wp", "--json"
            ]
        )
        .trim(),
        r#"{"domain":2,"log":0,"mechanism":"wp","range":{"gfn":256,"count":16}}"#
    );
    assert_eq!(
        logdirty_ok(&s, &["stop", "1", "--log", "2"]).trim(),
        "domain 1 (log 2): stopped"
    );
    assert_eq!(
        logdirty_ok(&s, &["stop", "2", "--json"]).trim(),
        r#"{"domain":2,"log":0,"stopped":true}"#
    );
    let got = s.finish();
    let starts = got.pick(|r| match r {
        ControlRequest::Logdirty(q @ LdRequest::Start { .. }) => Some(q.clone()),
        _ => None,
    });
    assert_eq!(starts.len(), 2);
    assert!(
        matches!(
            starts[0],
            LdRequest::Start {
                domain: 1,
                log: 2,
                range: None,
                ..
            }
        ),
        "{starts:?}"
    );
}

#[test]
fn ctl_logdirty_errors_name_what_was_wrong() {
    let s = Served::start("cli-ld-err", Console::default());
    let e = logdirty_err(&s, &["start", "7"]);
    assert!(
        e.contains("error: logdirty: domain 7: no such domain"),
        "{e}"
    );
    let e = logdirty_err(&s, &["start", "1", "--range", "0:0x100000"]);
    assert!(
        e.contains("logdirty: range 0x0:0x100000 reaches past the domain's RAM (4096 pages)"),
        "{e}"
    );
    let e = logdirty_err(&s, &["read", "1"]);
    assert!(
        e.contains("logdirty: log 0 of domain 1 is not running (never started, or stopped)"),
        "{e}"
    );
    logdirty_ok(&s, &["start", "1", "--mode", "wp", "--range", "0:0x100"]);
    let e = logdirty_err(
        &s,
        &[
            "start",
            "1",
            "--log",
            "1",
            "--mode",
            "pml",
            "--range",
            "0x80:0x100",
        ],
    );
    assert!(
        e.contains("another log holds part of that range with write-protection"),
        "{e}"
    );
    let e = logdirty_err(&s, &["start", "1", "--mode", "wp"]);
    assert!(e.contains("log 0 of domain 1 is already running"), "{e}");
    let e = logdirty_err(&s, &["peek", "nobody"]);
    assert!(
        e.contains("no domain is named \"nobody\" (the domains: 1 hello, 2 cpuid)"),
        "{e}"
    );
    // Bad arguments: named, and nothing is sent.
    let e = logdirty_err(&s, &["start", "1", "--range", "0x10"]);
    assert!(e.contains("say GFN:COUNT"), "{e}");
    let e = logdirty_err(&s, &["start", "1", "--mode", "fast"]);
    assert!(e.contains("mode \"fast\": one of auto"), "{e}");
    let got = s.finish();
    let sent = got
        .requests
        .iter()
        .filter(|r| matches!(r.request, ControlRequest::Logdirty(_)))
        .count();
    assert_eq!(sent, 6);
}

#[test]
fn ctl_logdirty_without_the_service_says_so() {
    let s = Served::start(
        "cli-ld-none",
        Console {
            logdirty: None,
            ..Console::default()
        },
    );
    let e = logdirty_err(&s, &["status", "1"]);
    assert!(
        e.contains("the logdirty service did not answer")
            && e.contains("(Logdirty Status domain 1 log 0)"),
        "{e}"
    );
}

/// `altp2m watch` arguments that could not make a watch are refused by the
/// parser, before anything connects: `--wait nan` made no duration at all
/// (a panic), `--wait 0` or `--count 0` a watch that ends before its first
/// event.
#[test]
fn watch_arguments_that_make_no_watch_are_refused() {
    for (arg, value, says) in [
        ("--wait", "nan", "is not a number of seconds above 0"),
        ("--wait", "inf", "is not a number of seconds above 0"),
        ("--wait", "0", "is not a number of seconds above 0"),
        ("--wait=-1", "", "is not a number of seconds above 0"),
        ("--count", "0", "0 is not in 1..="),
    ] {
        let mut args = vec![
            "ctl",
            "--socket",
            "/nonexistent/ctl.sock",
            "altp2m",
            "watch",
            "1",
            "0x10",
            arg,
        ];
        if !value.is_empty() {
            args.push(value);
        }
        let o = hv(&args);
        assert_eq!(
            o.status.code(),
            Some(image_builder::TOOL_ERROR.into()),
            "{arg} {value}"
        );
        assert!(stderr(&o).contains(says), "{arg} {value}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

/// `mem read` across the end of RAM shows (or writes) the bytes before it,
/// then says how many and what stopped it.
#[test]
fn a_read_past_the_end_of_ram_gives_what_lies_before_it() {
    let s = Served::start("cli-mem-end", Console::default());
    let file = s.dir.join("part.bin");
    let read = |more: &[&str]| {
        let mut args = vec![
            "ctl",
            "mem",
            "read",
            "1",
            "0xff00",
            "0x200",
            "--socket",
            s.socket(),
        ];
        args.extend(more);
        let o = hv(&args);
        assert_eq!(
            o.status.code(),
            Some(image_builder::TOOL_ERROR.into()),
            "{}",
            stderr(&o)
        );
        o
    };
    let o = read(&["--out", file.to_str().unwrap()]);
    let want: Vec<u8> = (0xff00..0xffc0u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(std::fs::read(&file).unwrap(), want);
    assert!(
        stderr(&o).contains("192 of the 512 bytes were read, up to 0xffc0; then")
            && stderr(&o).contains("is not guest RAM"),
        "{}",
        stderr(&o)
    );
    // The hex dump too: its last line is the last byte before the refusal.
    let o = read(&[]);
    assert!(
        stdout(&o)
            .lines()
            .last()
            .unwrap()
            .starts_with("000000000000ffb0"),
        "{}",
        stdout(&o)
    );
}
