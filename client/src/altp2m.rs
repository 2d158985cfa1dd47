//! The external agent's side of altp2m (ALT-2, ALT-4): view operations,
//! modes, listening to violations and answering them, through the console.
//! `cargo hv ctl altp2m ...` is built on these; other programs can link
//! them the same way.

use super::{Client, ClientError, ControlReply, ControlRequest, Transport, unwanted};
use super::{ControlError, Watch};
pub use ipc_schema::altp2m::{
    Action, AltError, AltReply, AltRequest, Filter, MAX_LISTENERS, NoListener, VmEvent,
};
pub use ipc_schema::hypercall::{Access, Entry, HcError, Mode, Relaxing, Reply, Request};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

impl<S: Transport> Client<S> {
    /// Sends `request` to the altp2m service and returns its answer as it is.
    pub fn altp2m(&mut self, request: AltRequest) -> Result<AltReply, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Altp2m(request))? {
            (_, ControlReply::Altp2m(r)) => Ok(r),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// A view operation on `domain` as an external agent; a refusal is an
    /// error naming its reason.
    pub fn view_request(&mut self, domain: u16, request: Request) -> Result<Reply, ClientError> {
        let what = format!("{request:?}");
        match self.altp2m(AltRequest::External { domain, request })? {
            AltReply::Reply(Reply::Error(e)) => Err(ClientError::Invalid(format!(
                "altp2m refused {what} for domain {domain}: {}",
                describe_hc_error(&e)
            ))),
            AltReply::Reply(r) => Ok(r),
            other => Err(alt_refusal(&what, domain, other)),
        }
    }

    /// A request answered `Done` (modes, listening, answers).
    pub fn altp2m_done(&mut self, request: AltRequest) -> Result<(), ClientError> {
        let what = format!("{request:?}");
        let domain = match request {
            AltRequest::SetMode { domain, .. }
            | AltRequest::SetNoListener { domain, .. }
            | AltRequest::Listen { domain, .. }
            | AltRequest::External { domain, .. }
            | AltRequest::Guest { domain, .. } => domain,
            _ => u16::MAX,
        };
        match self.altp2m(request)? {
            AltReply::Done => Ok(()),
            other => Err(alt_refusal(&what, domain, other)),
        }
    }

    /// The next violation event, waiting at most `timeout` (events that came
    /// meanwhile for other purposes are queued as usual).
    pub fn next_violation(&mut self, timeout: Duration) -> Result<Option<VmEvent>, ClientError> {
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.next_event(left)? {
                Some(super::ControlEvent::Violation(e)) => return Ok(Some(e)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

fn alt_refusal(what: &str, domain: u16, reply: AltReply) -> ClientError {
    match reply {
        AltReply::Refused(e) => ClientError::Invalid(format!(
            "altp2m refused {what}: {}",
            describe_alt_error(&e, domain)
        )),
        other => ClientError::Invalid(format!(
            "altp2m answered {what} with {}",
            describe_reply(&other)
        )),
    }
}

/// An access as `rwx` letters (`-` for each right missing).
pub fn access_letters(read: bool, write: bool, execute: bool) -> String {
    [(read, 'r'), (write, 'w'), (execute, 'x')]
        .iter()
        .map(|&(on, c)| if on { c } else { '-' })
        .collect()
}

/// `rwx`, `r-x`, `r`, `rx`, `none`: an access.
pub fn parse_access(s: &str) -> Result<Access, String> {
    if s == "none" || s == "---" {
        return Ok(Access::NONE);
    }
    let mut a = Access::NONE;
    for c in s.chars() {
        match c {
            'r' => a.read = true,
            'w' => a.write = true,
            'x' => a.execute = true,
            '-' => {}
            _ => {
                return Err(format!("access {s:?}: use the letters r, w, x (or `none`)"));
            }
        }
    }
    Ok(a)
}

/// `rx2rw` or `n2rwx` (Xen's names).
pub fn parse_relaxing(s: &str) -> Result<Relaxing, String> {
    match s {
        "rx2rw" => Ok(Relaxing::Rx2Rw),
        "n2rwx" => Ok(Relaxing::N2Rwx),
        _ => Err(format!("{s:?}: say rx2rw or n2rwx")),
    }
}

/// `disabled`, `mixed`, `external`, `limited`.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    Ok(match s {
        "disabled" => Mode::Disabled,
        "mixed" => Mode::Mixed,
        "external" => Mode::External,
        "limited" => Mode::Limited,
        _ => {
            return Err(format!(
                "mode {s:?}: one of disabled, mixed, external, limited"
            ));
        }
    })
}

/// `retry`, `allow-once`, `skip:LEN`, `view:N`, `access:rwx`, `crash`.
pub fn parse_action(s: &str) -> Result<Action, String> {
    let bad = || {
        format!("answer {s:?}: one of retry, allow-once, skip:LENGTH, view:N, access:ACCESS, crash")
    };
    Ok(match s.split_once(':') {
        None if s == "retry" => Action::Retry,
        None if s == "allow-once" => Action::AllowOnce,
        None if s == "crash" => Action::Crash,
        Some(("skip", n)) => Action::Skip {
            length: n.parse().map_err(|_| bad())?,
        },
        Some(("view", n)) => Action::SwitchView(n.parse().map_err(|_| bad())?),
        Some(("access", a)) => Action::SetAccess(parse_access(a)?),
        _ => return Err(bad()),
    })
}

/// A request in a few words.
pub fn describe_request(r: &AltRequest) -> String {
    match r {
        AltRequest::Guest {
            domain,
            vcpu,
            request,
        } => format!("{request:?} (domain {domain} vCPU {vcpu})"),
        AltRequest::External { domain, request } => format!("{request:?} (domain {domain})"),
        other => format!("{other:?}"),
    }
}

/// An answer in a few words.
pub fn describe_reply(r: &AltReply) -> String {
    match r {
        AltReply::Reply(Reply::Error(e)) => format!("refused: {}", describe_hc_error(e)),
        AltReply::Reply(r) => format!("{r:?}"),
        AltReply::Done => "Done".into(),
        AltReply::Events { events, next } => {
            format!("{} event(s), next {next}", events.0.len())
        }
        AltReply::Refused(e) => format!("refused: {}", describe_alt_error(e, u16::MAX)),
        AltReply::Pong => "Pong".into(),
        AltReply::Event(e) => describe_event(e),
        AltReply::Page { frame_gfn, access } => match frame_gfn {
            Some(f) => format!(
                "frame of gfn {f:#x}, {}",
                access_letters(access.read, access.write, access.execute)
            ),
            None => "not mapped".into(),
        },
        AltReply::Dirtied { ranges, next } => match next {
            Some(n) => format!("{} dirtied range(s), more from gfn {n:#x}", ranges.0.len()),
            None => format!("{} dirtied range(s)", ranges.0.len()),
        },
        AltReply::Shared { frame, refs, free } => {
            format!("shared frame {frame:#x}: {refs} reference(s), {free} frames free")
        }
        AltReply::Breaks { breaks, more } => format!(
            "{} copy-on-write break(s){}",
            breaks.0.len(),
            if *more { ", more" } else { "" }
        ),
    }
}

/// Why a view operation was refused.
pub fn describe_hc_error(e: &HcError) -> String {
    match e {
        HcError::NoSuchView { view } => format!("view {view} does not exist"),
        HcError::HostView => "view 0 is the host p2m; the operation is for alternate views".into(),
        HcError::BadGfn { gfn } => format!("gfn {gfn:#x} is not guest RAM"),
        HcError::ViewInUse { view } => format!("view {view} is the active view of a vCPU"),
        HcError::TooManyViews => "every view slot (511 alternate views) is taken".into(),
        HcError::Unsupported { feature } => format!("the CPU lacks {feature:?}"),
        HcError::OutOfMemory => {
            "the hypervisor ran out of memory (the kernel for page tables, or the altp2m service for its records)".into()
        }
        HcError::NotLogging => "dirty logging is not running".into(),
        HcError::DirtyLog(e) => format!(
            "the logdirty service refused: {}",
            crate::logdirty::describe_error(e)
        ),
        HcError::BadAccess => "write or execute without read cannot be expressed by EPT".into(),
        HcError::WrongService => {
            "that request belongs to another service (dirty logs: `cargo hv ctl logdirty`)".into()
        }
        HcError::ServiceUnavailable => "the altp2m service is not running".into(),
        HcError::ModeForbids { mode } => {
            format!("the domain's altp2m mode ({mode:?}) does not allow it")
        }
        HcError::BadRange => "the range is empty or reaches past guest RAM".into(),
        HcError::Shared { gfn } => format!(
            "gfn {gfn:#x} is a shared page (copy-on-write): unshare it before a view changes it (SH-3)"
        ),
        HcError::QuotaExceeded { what, limit } => format!(
            "the domain has reached its quota of {limit} {} in the altp2m service",
            match what {
                ipc_schema::hypercall::Quota::Views => "alternate views",
                ipc_schema::hypercall::Quota::Settings => "settings (access ranges, change_gfns, suppress-#VE bits)",
            }
        ),
        HcError::TooManyGrants => "the domain grants 8 ranges of pages already".into(),
        HcError::NotGranted => "those pages are not a range the domain grants".into(),
        HcError::GrantedPagesMapped => {
            "a service has those granted pages mapped; they are taken back once it unmaps them".into()
        }
    }
}

/// Why a request other than a view operation was refused.
pub fn describe_alt_error(e: &AltError, domain: u16) -> String {
    match e {
        AltError::NoSuchDomain => format!("there is no domain {domain}"),
        AltError::DomainEnded => format!(
            "domain {domain} has ended (its views were freed and its listeners forgotten with it)"
        ),
        AltError::NoSuchEvent => "no event waits for an answer under that number".into(),
        AltError::ListenerBusy => "another listener is attached to the domain".into(),
        AltError::WrongEndpoint => "the request came through the wrong endpoint".into(),
        AltError::NoSuchView => "the answer names a view that does not exist".into(),
        AltError::BadRange => "the tracking range is empty or reaches past the domain's RAM".into(),
        AltError::OutOfMemory => {
            "the kernel refused to change the entries (out of table memory)".into()
        }
        AltError::TooManyListeners => format!(
            "{} listeners are attached to the domain already (the most it has)",
            ipc_schema::altp2m::MAX_LISTENERS
        ),
        AltError::NotAllowed => "the manifest does not let this client do that to the domain (its `introspection`: `views` for views and modes, `events` for listening and answers)".into(),
        AltError::ModifiedInView { view } => format!(
            "the page is modified in view {view} (an access setting or a change_gfn), so it cannot be shared (SH-3)"
        ),
        AltError::Kernel(e) => format!("the kernel refused the sharing operation: {e:?}"),
        AltError::NotListening => {
            "the caller listens to no domain (attach with Listen first)".into()
        }
        AltError::TooManyWaiting => format!(
            "{} NextEvent calls wait already (the most the service holds)",
            ipc_schema::altp2m::MAX_WAITING_LISTENERS
        ),
    }
}

/// A violation as a line of text.
pub fn describe_event(e: &VmEvent) -> String {
    let a = e.access;
    let what = if a.write {
        "write"
    } else if a.execute {
        "execute"
    } else {
        "read"
    };
    let gla = e.gla.map_or("-".into(), |g| format!("{g:#x}"));
    format!(
        "violation #{}: domain {} vCPU {} view {}: {what} at gpa {:#x} (gla {gla}, rip {:#x}); the page allows {}; placed by {}",
        e.id,
        e.domain,
        e.vcpu,
        e.view,
        e.gpa,
        e.rip,
        access_letters(e.allowed.read, e.allowed.write, e.allowed.execute),
        if e.internal {
            "the in-guest agent"
        } else {
            "an external agent"
        },
    ) + if e.page_walk() {
        "; during a page walk (a guest page-table entry)"
    } else {
        ""
    } + if e.paused {
        ""
    } else {
        "; the access went through (n2rwx: the vCPU did not wait)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_n2rwx_notice_says_the_access_went_through() {
        let mut e = VmEvent {
            id: 3,
            domain: 1,
            vcpu: 0,
            view: 2,
            gpa: 0x9018,
            gla: None,
            access: Default::default(),
            allowed: Default::default(),
            rip: 0x1000,
            internal: false,
            paused: true,
            qualification: 0x181,
        };
        assert!(!describe_event(&e).contains("went through"));
        e.paused = false;
        assert!(describe_event(&e).contains("the access went through"));
        assert_eq!(parse_relaxing("n2rwx"), Ok(Relaxing::N2Rwx));
        assert_eq!(parse_relaxing("rx2rw"), Ok(Relaxing::Rx2Rw));
        assert!(parse_relaxing("rw2x").unwrap_err().contains("\"rw2x\""));
    }

    #[test]
    fn accesses_modes_and_answers_parse_and_bad_ones_are_named() {
        assert_eq!(parse_access("r-x").unwrap(), Access::RX);
        assert_eq!(parse_access("rw").unwrap(), Access::RW);
        assert_eq!(parse_access("none").unwrap(), Access::NONE);
        assert!(parse_access("rq").unwrap_err().contains("\"rq\""));
        assert_eq!(parse_mode("limited").unwrap(), Mode::Limited);
        assert!(parse_mode("open").unwrap_err().contains("one of"));
        assert_eq!(parse_action("skip:3").unwrap(), Action::Skip { length: 3 });
        assert_eq!(parse_action("view:2").unwrap(), Action::SwitchView(2));
        assert_eq!(
            parse_action("access:rw").unwrap(),
            Action::SetAccess(Access::RW)
        );
        assert_eq!(parse_action("allow-once").unwrap(), Action::AllowOnce);
        assert!(parse_action("skip:many").is_err());
    }
}

/// What [`Client::watch_page`] does: watch writes (or what `access` forbids)
/// to one page of a domain through a view made for it.
#[derive(Clone, Copy, Debug)]
pub struct PageWatch {
    pub domain: u16,
    pub gfn: u64,
    /// The page's access in the watching view (default `r-x`: writes are
    /// seen).
    pub access: Access,
    /// How each event is answered.
    pub answer: Action,
    /// Stop after this many events (`None`: until the domain stops or
    /// `patience` passes without one).
    pub count: Option<u32>,
    pub patience: Duration,
    /// Stop when this turns true (e.g. set by a Ctrl-C handler), looked at
    /// at least every [`STOP_POLL`] while no event comes: what was set up
    /// is undone as at any other end.
    pub stop: Option<&'static AtomicBool>,
}

/// How often [`Client::watch_page`] looks at its `stop` flag while it
/// waits.
pub const STOP_POLL: Duration = Duration::from_millis(200);

impl<S: Transport> Client<S> {
    /// Watches a page as an external agent (ALT-2, ALT-4): creates a view,
    /// gives the page `access` there, listens to the domain's violations,
    /// puts the domain in the view, and answers each event in the view
    /// with `answer`, calling `seen` with each (and the view) first (events
    /// of other views, another agent's, are left to it). Then puts the domain
    /// back in view 0 and destroys the view. Returns how many events it
    /// answered (an event another client answered first is seen, not
    /// counted).
    pub fn watch_page(
        &mut self,
        w: &PageWatch,
        mut seen: impl FnMut(&VmEvent, u16),
    ) -> Result<u32, ClientError> {
        let d = w.domain;
        let view = match self.view_request(
            d,
            Request::ViewCreate {
                default_access: None,
            },
        )? {
            Reply::View(v) => v,
            other => {
                return Err(ClientError::Invalid(format!(
                    "altp2m answered ViewCreate with {other:?}"
                )));
            }
        };
        // Left to the control proxy to undo should this client end before
        // it does (killed, its connection lost): the proxy refuses a
        // second client's watch of the domain.
        let held = Watch {
            domain: d,
            view: Some(view),
        };
        if let Err(e) = self.leave_to_proxy(held) {
            let _ = self.view_request(d, Request::ViewDestroy { view });
            return Err(e);
        }
        let set_up = self
            .view_request(
                d,
                Request::SetAccess {
                    view,
                    gfn: w.gfn,
                    access: w.access,
                },
            )
            .and_then(|_| {
                self.altp2m_done(AltRequest::Listen {
                    domain: d,
                    on: true,
                })
            })
            .and_then(|()| self.view_request(d, Request::ViewSwitchAll { view }));
        if let Err(e) = set_up {
            self.undo_watch(held);
            return Err(e);
        }
        let mut count = 0;
        let result = loop {
            if w.count.is_some_and(|n| count >= n) {
                break Ok(count);
            }
            match self.next_violation_or_stop(w) {
                // Its view's events only: another client's watch of the
                // domain (every client gets every event) has its own view.
                Ok(Some(e)) if e.domain == d && e.view == view => {
                    seen(&e, view);
                    let answer = AltRequest::Answer {
                        event: e.id,
                        action: w.answer,
                    };
                    match self.altp2m(answer.clone()) {
                        Ok(AltReply::Done) => count += 1,
                        // Another client of the same run (every client gets
                        // every event: docs/control.md) answered it first.
                        Ok(AltReply::Refused(AltError::NoSuchEvent)) => {}
                        Ok(other) => break Err(alt_refusal(&format!("{answer:?}"), d, other)),
                        Err(err) => break Err(err),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(count),
                Err(e) => break Err(e),
            }
        };
        self.undo_watch(held);
        result
    }

    /// Undoes what [`Client::watch_page`] set up, as far as the domain
    /// still exists (a step refused, e.g. for a domain that ended, is
    /// passed over), and takes it back from the proxy, unless a step went
    /// unanswered (a timeout, the connection lost): then the watch stays
    /// the proxy's to undo when this client's connection ends.
    fn undo_watch(&mut self, w: Watch) {
        let (d, view) = (w.domain, w.view.unwrap_or(0));
        let steps = [
            self.view_request(d, Request::ViewSwitchAll { view: 0 })
                .map(drop),
            self.altp2m_done(AltRequest::Listen {
                domain: d,
                on: false,
            }),
            self.view_request(d, Request::ViewDestroy { view })
                .map(drop),
        ];
        if !steps
            .iter()
            .any(|s| s.as_ref().is_err_and(ClientError::unanswered))
        {
            self.take_back(w);
        }
    }

    /// Leaves `w` to the control proxy, to undo should this client's
    /// connection end before it takes it back ([`Client::take_back`]):
    /// killed, crashed, its connection lost (docs/control.md, Attaching:
    /// what a client leaves behind). A console reached without a proxy
    /// has nobody to see the connection end (`ProxyOnly`): then nothing is
    /// left to anyone, and that is no error. A refusal (another client
    /// watches the domain, this one holds too many) is.
    pub fn leave_to_proxy(&mut self, w: Watch) -> Result<(), ClientError> {
        match self.call_labelled(ControlRequest::AtDetach {
            watch: w,
            set: true,
        })? {
            (_, ControlReply::Done | ControlReply::Error(ControlError::ProxyOnly)) => Ok(()),
            (label, refused) => Err(unwanted(label, refused)),
        }
    }

    /// Attaches this client as `domain`'s violation listener, the listen
    /// left to the control proxy first (a listener alone, `view: None`:
    /// the proxy ends it should this client's connection end first) and
    /// taken back if the listen is refused (not if it went unanswered).
    pub fn listen_left_to_proxy(&mut self, domain: u16) -> Result<(), ClientError> {
        let held = Watch { domain, view: None };
        self.leave_to_proxy(held)?;
        let on = self.altp2m_done(AltRequest::Listen { domain, on: true });
        if on.as_ref().is_err_and(|e| !e.unanswered()) {
            self.take_back(held);
        }
        on
    }

    /// Ends a listen of [`Client::listen_left_to_proxy`], and takes it back
    /// from the proxy unless the end went unanswered (then the proxy ends
    /// it when the connection ends).
    pub fn unlisten_left_to_proxy(&mut self, domain: u16) -> Result<(), ClientError> {
        let off = self.altp2m_done(AltRequest::Listen { domain, on: false });
        if !off.as_ref().is_err_and(ClientError::unanswered) {
            self.take_back(Watch { domain, view: None });
        }
        off
    }

    /// Takes `w` back from the proxy ([`Client::leave_to_proxy`]), this
    /// client having undone it itself (an error is ignored: at worst the
    /// proxy undoes again, when the connection ends, what is undone).
    pub fn take_back(&mut self, w: Watch) {
        let _ = self.call(ControlRequest::AtDetach {
            watch: w,
            set: false,
        });
    }

    /// The next violation within `w.patience`, waiting in slices of
    /// [`STOP_POLL`] so that `w.stop` is seen; `None` at the end of the
    /// patience or once stopped.
    fn next_violation_or_stop(&mut self, w: &PageWatch) -> Result<Option<VmEvent>, ClientError> {
        let until = std::time::Instant::now() + w.patience;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if w.stop.is_some_and(|s| s.load(Ordering::Relaxed)) || left.is_zero() {
                return Ok(None);
            }
            let slice = match w.stop {
                Some(_) => left.min(STOP_POLL),
                None => left,
            };
            if let Some(e) = self.next_violation(slice)? {
                return Ok(Some(e));
            }
        }
    }
}
