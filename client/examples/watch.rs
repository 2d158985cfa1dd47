//! What `cargo hv ctl altp2m watch` does, with nothing but this crate:
//! watch one page of a domain as an external altp2m agent, print each
//! violation and answer it, then undo everything. Try it on the default
//! system of `cargo hv run --no-watch` (docs/altp2m.md).
//!
//! ```text
//! cargo run -p parallax-client --example watch -- DOMAIN GFN [options]
//!   --access ACCESS   the page's access in the watching view (default r-x: writes are seen)
//!   --answer ACTION   retry, allow-once (default), skip:LENGTH, view:N, access:ACCESS, crash
//!   --count N         stop after N events (default: until none comes for --wait seconds)
//!   --wait SECONDS    how long to wait for the next event (default 60)
//!   --socket PATH     the control socket (default target/hv/work/ctl.sock)
//!   --timeout SECONDS how long each answer may take (default 5)
//! ```

use parallax_client::Client;
use parallax_client::altp2m::{
    Access, Action, PageWatch, describe_event, parse_access, parse_action,
};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// A number in decimal or 0x-prefixed hex.
fn number<T: TryFrom<u64>>(s: &str) -> Result<T, String> {
    let n = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    n.ok()
        .and_then(|n| T::try_from(n).ok())
        .ok_or(format!("{s:?} is not a number that fits"))
}

fn seconds(s: &str) -> Result<Duration, String> {
    let f: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Ok(Duration::from_secs_f64(f.clamp(0.001, 1e6)))
}

fn run() -> Result<(), String> {
    let (mut positional, mut socket) = (Vec::new(), "target/hv/work/ctl.sock".to_owned());
    let (mut access, mut answer) = (Access::RX, Action::AllowOnce);
    let (mut count, mut patience, mut timeout) =
        (None, Duration::from_secs(60), Duration::from_secs(5));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--access" => access = parse_access(&value()?)?,
            "--answer" => answer = parse_action(&value()?)?,
            "--count" => count = Some(number(&value()?)?),
            "--wait" => patience = seconds(&value()?)?,
            "--socket" => socket = value()?,
            "--timeout" => timeout = seconds(&value()?)?,
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => positional.push(a),
        }
    }
    let [domain, gfn] = positional.as_slice() else {
        return Err("usage: watch DOMAIN GFN [--access ACCESS] [--answer ACTION] [--count N] [--wait S] [--socket PATH] [--timeout S]".into());
    };
    let w = PageWatch {
        domain: number(domain)?,
        gfn: number(gfn)?,
        access,
        answer,
        count,
        patience,
        stop: None,
    };
    let mut console = Client::connect(socket.as_ref())
        .map_err(|e| e.to_string())?
        .with_timeout(timeout);
    let a = parallax_client::altp2m::access_letters(access.read, access.write, access.execute);
    eprintln!(
        "setting up a watch of gfn {:#x} of domain {} ({a} there; each violation to be answered with {answer:?})",
        w.gfn, w.domain
    );
    let mut out = std::io::stdout();
    let n = console
        .watch_page(&w, |e, view| {
            let _ = writeln!(out, "view {view}: {}", describe_event(e));
            let _ = out.flush();
        })
        .map_err(|e| e.to_string())?;
    eprintln!("{n} violation(s) seen and answered; the view is gone");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
