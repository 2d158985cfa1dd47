//! Dirty-page logs through the console (LD-1..LD-5, docs/logdirty.md): the
//! host starts a log of a domain's RAM (or a range of it) in the logdirty
//! service, reads it with or without clearing, asks what it is, and stops
//! it. `cargo hv ctl logdirty ...` is built on these.
//!
//! The service names a log by its caller (here: the console) and a number
//! the caller chooses, `log`, which the console passes on unchanged: host
//! tools that talk to the same system share the numbers, so two of them
//! use different ones to keep separate logs.

use super::{Client, ClientError, ControlReply, ControlRequest, RequestLabel, Transport, unwanted};
pub use ipc_schema::logdirty::{
    DirtyMode, GfnRange, LdError, LdReply, LdRequest, Mechanism, RANGES_PER_REPLY,
};

/// A log that runs: the answer to [`Client::logdirty_start`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStarted {
    /// What the service keeps it with (`Auto` picks PML where the CPU has it).
    pub mechanism: Mechanism,
    /// The range it covers (all of the domain's RAM when none was asked for).
    pub range: GfnRange,
}

/// What a log is: the answer to [`Client::logdirty_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogStatus {
    pub mechanism: Mechanism,
    pub range: GfnRange,
    /// Pages set in the log now.
    pub dirty: u64,
}

impl<S: Transport> Client<S> {
    /// Sends `request` to the logdirty service and returns its answer as it
    /// is (refusals included).
    pub fn logdirty(&mut self, request: LdRequest) -> Result<LdReply, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Logdirty(request))? {
            (_, ControlReply::Logdirty(r)) => Ok(r),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// `request`, a refusal turned into [`ClientError::Logdirty`].
    fn logdirty_call(
        &mut self,
        request: LdRequest,
    ) -> Result<(RequestLabel, LdReply), ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Logdirty(request.clone()))? {
            (label, ControlReply::Logdirty(LdReply::Error(error))) => Err(ClientError::Logdirty {
                request: label,
                asked: request,
                error,
            }),
            (label, ControlReply::Logdirty(r)) => Ok((label, r)),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// Starts log `log` of `domain` over `range` (`None`: all of its RAM),
    /// empty, kept the way `mode` says.
    pub fn logdirty_start(
        &mut self,
        domain: u16,
        log: u32,
        range: Option<GfnRange>,
        mode: DirtyMode,
    ) -> Result<LogStarted, ClientError> {
        if let Some(r) = range {
            check_range(&r)?;
        }
        match self.logdirty_call(LdRequest::Start {
            domain,
            log,
            range,
            mode,
        })? {
            (_, LdReply::Started { mechanism, range }) => Ok(LogStarted { mechanism, range }),
            (label, other) => Err(not_an_answer(label, other)),
        }
    }

    /// The pages the log holds, as ranges (lowest first, adjacent ones
    /// joined), and clears them: the next write to each is logged again.
    pub fn logdirty_read(&mut self, domain: u16, log: u32) -> Result<Vec<GfnRange>, ClientError> {
        self.logdirty_ranges(domain, log, true)
    }

    /// The pages the log holds, as ranges, leaving the log as it is.
    pub fn logdirty_peek(&mut self, domain: u16, log: u32) -> Result<Vec<GfnRange>, ClientError> {
        self.logdirty_ranges(domain, log, false)
    }

    /// [`Client::logdirty_read`] (`clear`) or [`Client::logdirty_peek`]:
    /// reads from gfn 0, then from each answer's `next`, until there is
    /// none.
    pub fn logdirty_ranges(
        &mut self,
        domain: u16,
        log: u32,
        clear: bool,
    ) -> Result<Vec<GfnRange>, ClientError> {
        let mut out: Vec<GfnRange> = Vec::new();
        let mut from = 0u64;
        loop {
            let (label, reply) = self.logdirty_call(LdRequest::Read {
                domain,
                log,
                from,
                clear,
            })?;
            let LdReply::Dirty { ranges, next } = reply else {
                return Err(not_an_answer(label, reply));
            };
            for r in ranges.0.iter().filter(|r| r.count != 0) {
                match out.last_mut() {
                    Some(last) if last.end() == Some(r.gfn) => last.count += r.count,
                    _ => out.push(*r),
                }
            }
            match next {
                None => return Ok(out),
                Some(n) if n > from => from = n,
                // A service that does not move on would keep us here forever.
                Some(n) => {
                    return Err(ClientError::Invalid(format!(
                        "the logdirty service answered {label} with more from gfn {n:#x}, which is not past {from:#x}; stopped reading"
                    )));
                }
            }
        }
    }

    /// Ends log `log` of `domain`.
    pub fn logdirty_stop(&mut self, domain: u16, log: u32) -> Result<(), ClientError> {
        match self.logdirty_call(LdRequest::Stop { domain, log })? {
            (_, LdReply::Done) => Ok(()),
            (label, other) => Err(not_an_answer(label, other)),
        }
    }

    /// What log `log` of `domain` is: its mechanism, range and dirty pages.
    pub fn logdirty_status(&mut self, domain: u16, log: u32) -> Result<LogStatus, ClientError> {
        match self.logdirty_call(LdRequest::Status { domain, log })? {
            (
                _,
                LdReply::Status {
                    mechanism,
                    range,
                    dirty,
                },
            ) => Ok(LogStatus {
                mechanism,
                range,
                dirty,
            }),
            (label, other) => Err(not_an_answer(label, other)),
        }
    }
}

fn not_an_answer(request: RequestLabel, reply: LdReply) -> ClientError {
    ClientError::Unexpected {
        request,
        reply: Box::new(ControlReply::Logdirty(reply)),
    }
}

/// Refuses, before anything is sent, a range the service would refuse
/// whatever the domain: empty, or wrapping past the last gfn.
pub fn check_range(r: &GfnRange) -> Result<(), ClientError> {
    if r.count == 0 {
        return Err(ClientError::Invalid(format!(
            "range {}: COUNT is 0, an empty range",
            range_arg(r)
        )));
    }
    if r.end().is_none() {
        return Err(ClientError::Invalid(format!(
            "range {} wraps past the last gfn",
            range_arg(r)
        )));
    }
    Ok(())
}

/// A gfn, count or log number: decimal, or hex with `0x`.
pub fn parse_number(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal, or hex with 0x)"))
}

/// `GFN:COUNT` (each decimal or 0x-prefixed hex), e.g. `0x1000:256`: a
/// range, checked not to be empty or to wrap.
pub fn parse_range(s: &str) -> Result<GfnRange, String> {
    let Some((gfn, count)) = s.split_once(':') else {
        return Err(format!(
            "range {s:?}: say GFN:COUNT (e.g. 0x1000:256; decimal, or hex with 0x)"
        ));
    };
    let gfn = parse_number(gfn).map_err(|e| format!("range {s:?}: GFN {e}"))?;
    let count = parse_number(count).map_err(|e| format!("range {s:?}: COUNT {e}"))?;
    let r = GfnRange { gfn, count };
    check_range(&r).map_err(|e| e.to_string())?;
    Ok(r)
}

/// `auto`, `pml`, `wp` (or `write-protect`): how a log is kept.
pub fn parse_mode(s: &str) -> Result<DirtyMode, String> {
    Ok(match s {
        "auto" => DirtyMode::Auto,
        "pml" => DirtyMode::Pml,
        "wp" | "write-protect" => DirtyMode::WriteProtect,
        _ => {
            return Err(format!(
                "mode {s:?}: one of auto (PML where the CPU has it, else write-protection), pml, wp"
            ));
        }
    })
}

/// A mechanism in words: `PML`, `write-protection`.
pub fn mechanism_name(m: Mechanism) -> &'static str {
    match m {
        Mechanism::Pml => "PML",
        Mechanism::WriteProtect => "write-protection",
    }
}

/// A mechanism as `--mode` and `--json` write it: `pml`, `wp`.
pub fn mechanism_key(m: Mechanism) -> &'static str {
    match m {
        Mechanism::Pml => "pml",
        Mechanism::WriteProtect => "wp",
    }
}

/// A range as `--range` takes it: `0x1000:0x100`.
pub fn range_arg(r: &GfnRange) -> String {
    format!("{:#x}:{:#x}", r.gfn, r.count)
}

/// A range as a line: `0x1000-0x10ff (256 pages)`, `0x1000 (1 page)`.
pub fn range_line(r: &GfnRange) -> String {
    match r.count {
        1 => format!("{:#x} (1 page)", r.gfn),
        n => format!(
            "{:#x}-{:#x} ({n} pages)",
            r.gfn,
            r.gfn.saturating_add(n.saturating_sub(1))
        ),
    }
}

/// The pages of `ranges` together.
pub fn pages(ranges: &[GfnRange]) -> u64 {
    ranges.iter().fold(0u64, |n, r| n.saturating_add(r.count))
}

fn range_json(r: &GfnRange) -> String {
    format!("{{\"gfn\":{},\"count\":{}}}", r.gfn, r.count)
}

/// A read or peek as one JSON object:
/// `{"domain":1,"log":0,"cleared":true,"ranges":[{"gfn":4096,"count":256}],"pages":256}`.
pub fn dirty_json(domain: u16, log: u32, cleared: bool, ranges: &[GfnRange]) -> String {
    let list: Vec<String> = ranges.iter().map(range_json).collect();
    format!(
        "{{\"domain\":{domain},\"log\":{log},\"cleared\":{cleared},\"ranges\":[{}],\"pages\":{}}}",
        list.join(","),
        pages(ranges)
    )
}

/// A started log as one JSON object:
/// `{"domain":1,"log":0,"mechanism":"pml","range":{"gfn":0,"count":4096}}`.
pub fn started_json(domain: u16, log: u32, s: &LogStarted) -> String {
    format!(
        "{{\"domain\":{domain},\"log\":{log},\"mechanism\":\"{}\",\"range\":{}}}",
        mechanism_key(s.mechanism),
        range_json(&s.range)
    )
}

/// A log's status as one JSON object:
/// `{"domain":1,"log":0,"mechanism":"wp","range":{"gfn":0,"count":4096},"dirty":12}`.
pub fn status_json(domain: u16, log: u32, s: &LogStatus) -> String {
    format!(
        "{{\"domain\":{domain},\"log\":{log},\"mechanism\":\"{}\",\"range\":{},\"dirty\":{}}}",
        mechanism_key(s.mechanism),
        range_json(&s.range),
        s.dirty
    )
}

/// A stopped log as one JSON object: `{"domain":1,"log":0,"stopped":true}`.
pub fn stopped_json(domain: u16, log: u32) -> String {
    format!("{{\"domain\":{domain},\"log\":{log},\"stopped\":true}}")
}

/// The domain and log a request names.
fn domain_log(q: &LdRequest) -> (u16, u32) {
    match *q {
        LdRequest::Start { domain, log, .. }
        | LdRequest::Read { domain, log, .. }
        | LdRequest::Stop { domain, log }
        | LdRequest::Status { domain, log } => (domain, log),
    }
}

/// Why `asked` was refused, naming what was wrong in it: `domain 7: no
/// such domain`, `range 0x0:0x100000 reaches past the domain's RAM (4096
/// pages)`, `log 0 of domain 1 is not running (never started, or
/// stopped)`.
pub fn describe_refusal(e: &LdError, asked: &LdRequest) -> String {
    let (domain, log) = domain_log(asked);
    match *e {
        LdError::NoSuchDomain => format!("domain {domain}: no such domain (or it has ended)"),
        LdError::BadRange { pages } => match asked {
            LdRequest::Start { range: Some(r), .. } if r.count == 0 => {
                format!("range {} is empty", range_arg(r))
            }
            LdRequest::Start { range: Some(r), .. } if r.end().is_none() => {
                format!("range {} wraps past the last gfn", range_arg(r))
            }
            LdRequest::Start { range: Some(r), .. } => format!(
                "range {} reaches past the domain's RAM ({pages} pages)",
                range_arg(r)
            ),
            _ => format!(
                "domain {domain}: its RAM ({pages} pages) is not a range the service can log"
            ),
        },
        LdError::NotLogging => {
            format!("log {log} of domain {domain} is not running (never started, or stopped)")
        }
        LdError::AlreadyLogging => format!(
            "log {log} of domain {domain} is already running (stop it first, or use another log number)"
        ),
        LdError::TooManyLogs { limit } => format!(
            "domain {domain} has {limit} logs already, the most the logdirty service keeps per domain"
        ),
        LdError::Kernel => format!(
            "the kernel refused a PML or write-protection control (has domain {domain} ended?)"
        ),
        other => describe_error(&other),
    }
}

/// Why a request was refused, without the request at hand.
pub fn describe_error(e: &LdError) -> String {
    match e {
        LdError::NoSuchDomain => "no such domain (or it has ended)".into(),
        LdError::BadRange { pages } => {
            format!("the range is empty, wraps, or reaches past the domain's RAM ({pages} pages)")
        }
        LdError::ModeConflict { held } => format!(
            "another log holds part of that range with {} (a page is logged by one mechanism at a time: ask for the same one, or stop that log)",
            mechanism_name(*held)
        ),
        LdError::NotLogging => "the log is not running (never started, or stopped)".into(),
        LdError::AlreadyLogging => "a log by that number is already running".into(),
        LdError::PmlUnsupported => {
            "the CPU lacks PML (page-modification logging): ask for write-protection, or auto"
                .into()
        }
        LdError::TooManyLogs { limit } => format!(
            "the domain has {limit} logs already, the most the logdirty service keeps per domain"
        ),
        LdError::OutOfMemory => "the logdirty service is out of memory for the log's bitmap".into(),
        LdError::Altp2m => {
            "the altp2m service (which owns the EPT entries) refused or could not be reached".into()
        }
        LdError::Kernel => {
            "the kernel refused a PML or write-protection control (has the domain ended?)".into()
        }
    }
}

/// A request in a few words: `Start domain 1 log 0 over all RAM (Auto)`.
pub fn describe_request(q: &LdRequest) -> String {
    match q {
        LdRequest::Start {
            domain,
            log,
            range,
            mode,
        } => format!(
            "Start domain {domain} log {log} over {} ({mode:?})",
            range.map_or("all RAM".into(), |r| range_arg(&r))
        ),
        LdRequest::Read {
            domain,
            log,
            from,
            clear,
        } => format!(
            "Read domain {domain} log {log} from {from:#x}{}",
            if *clear { " (clear)" } else { " (peek)" }
        ),
        LdRequest::Stop { domain, log } => format!("Stop domain {domain} log {log}"),
        LdRequest::Status { domain, log } => format!("Status domain {domain} log {log}"),
    }
}

/// An answer in a few words.
pub fn describe_reply(r: &LdReply) -> String {
    match r {
        LdReply::Started { mechanism, range } => format!(
            "started on {} over {}",
            mechanism_name(*mechanism),
            range_line(range)
        ),
        LdReply::Dirty { ranges, next } => match next {
            Some(n) => format!("{} dirty range(s), more from gfn {n:#x}", ranges.0.len()),
            None => format!("{} dirty range(s)", ranges.0.len()),
        },
        LdReply::Status {
            mechanism,
            range,
            dirty,
        } => format!(
            "on {} over {}, {dirty} dirty page(s)",
            mechanism_name(*mechanism),
            range_line(range)
        ),
        LdReply::Done => "Done".into(),
        LdReply::Error(e) => format!("refused: {}", describe_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_in_hex_and_decimal_and_bad_ones_are_named() {
        assert_eq!(
            parse_range("0x1000:256").unwrap(),
            GfnRange {
                gfn: 0x1000,
                count: 256
            }
        );
        assert_eq!(
            parse_range("16:0X10").unwrap(),
            GfnRange { gfn: 16, count: 16 }
        );
        let e = parse_range("0x1000").unwrap_err();
        assert!(e.contains("say GFN:COUNT"), "{e}");
        let e = parse_range("0x1000:lots").unwrap_err();
        assert!(e.contains("COUNT \"lots\" is not a number"), "{e}");
        let e = parse_range("0xg:1").unwrap_err();
        assert!(e.contains("GFN \"0xg\" is not a number"), "{e}");
        let e = parse_range(":1").unwrap_err();
        assert!(e.contains("GFN \"\" is not a number"), "{e}");
        let e = parse_range("0x10:0").unwrap_err();
        assert_eq!(e, "range 0x10:0x0: COUNT is 0, an empty range");
        let e = parse_range("0xffffffffffffffff:2").unwrap_err();
        assert!(e.contains("wraps past the last gfn"), "{e}");
        let e = parse_range("-1:2").unwrap_err();
        assert!(e.contains("is not a number"), "{e}");
        // The last gfn itself is a range of one.
        assert!(parse_range("0xfffffffffffffffe:1").is_ok());
    }

    #[test]
    fn numbers_are_decimal_or_0x_hex() {
        assert_eq!(parse_number("4096").unwrap(), 4096);
        assert_eq!(parse_number("0x1000").unwrap(), 4096);
        assert_eq!(parse_number("0XfF").unwrap(), 255);
        assert!(parse_number("1000h").unwrap_err().contains("\"1000h\""));
        assert!(parse_number("0x").is_err());
        assert!(parse_number("").is_err());
    }

    #[test]
    fn modes_parse_and_bad_ones_list_the_choices() {
        assert_eq!(parse_mode("auto").unwrap(), DirtyMode::Auto);
        assert_eq!(parse_mode("pml").unwrap(), DirtyMode::Pml);
        assert_eq!(parse_mode("wp").unwrap(), DirtyMode::WriteProtect);
        assert_eq!(
            parse_mode("write-protect").unwrap(),
            DirtyMode::WriteProtect
        );
        let e = parse_mode("PML").unwrap_err();
        assert!(
            e.contains("\"PML\"") && e.contains("auto") && e.contains("wp"),
            "{e}"
        );
    }

    #[test]
    fn ranges_print_as_first_last_and_pages() {
        let r = |gfn, count| GfnRange { gfn, count };
        assert_eq!(range_line(&r(0x1000, 256)), "0x1000-0x10ff (256 pages)");
        assert_eq!(range_line(&r(0x1000, 1)), "0x1000 (1 page)");
        assert_eq!(range_arg(&r(0, 0x10_0000)), "0x0:0x100000");
        assert_eq!(pages(&[r(0, 3), r(10, 4)]), 7);
        assert_eq!(
            dirty_json(1, 0, true, &[r(0x1000, 256), r(0x2000, 1)]),
            r#"{"domain":1,"log":0,"cleared":true,"ranges":[{"gfn":4096,"count":256},{"gfn":8192,"count":1}],"pages":257}"#
        );
        assert_eq!(
            dirty_json(2, 5, false, &[]),
            r#"{"domain":2,"log":5,"cleared":false,"ranges":[],"pages":0}"#
        );
    }

    #[test]
    fn refusals_name_what_was_wrong_in_the_request() {
        let start = |range| LdRequest::Start {
            domain: 1,
            log: 0,
            range,
            mode: DirtyMode::Auto,
        };
        assert_eq!(
            describe_refusal(
                &LdError::NoSuchDomain,
                &LdRequest::Status { domain: 7, log: 0 }
            ),
            "domain 7: no such domain (or it has ended)"
        );
        assert_eq!(
            describe_refusal(
                &LdError::BadRange { pages: 4096 },
                &start(Some(GfnRange {
                    gfn: 0,
                    count: 0x10_0000
                }))
            ),
            "range 0x0:0x100000 reaches past the domain's RAM (4096 pages)"
        );
        assert_eq!(
            describe_refusal(&LdError::NotLogging, &LdRequest::Stop { domain: 1, log: 0 }),
            "log 0 of domain 1 is not running (never started, or stopped)"
        );
        let e = describe_refusal(
            &LdError::ModeConflict {
                held: Mechanism::WriteProtect,
            },
            &start(None),
        );
        assert!(
            e.starts_with("another log holds part of that range with write-protection"),
            "{e}"
        );
        let e = describe_refusal(&LdError::AlreadyLogging, &start(None));
        assert!(e.contains("log 0 of domain 1 is already running"), "{e}");
    }
}
