//! copier: a task that live-copies a running guest's RAM into a second
//! domain, driven by the dirty log, and checks the copy (LD-5: a log fit
//! for migration).
//!
//! Handles (see `tests/logdirty.rs` for the manifest): `logdirty` (call),
//! `supervisor` (call, to find the domains by name), `domains` (read, write
//! and build: maps both domains' RAM, the target's writable, up to 512
//! pages at a time (FOREIGN_MAP, counted in each domain: FM-1), pauses and
//! destroys them). The source domain is named `writer`, the target `copy`
//! (the same RAM size).
//!
//! For each mechanism the CPU has (PML, then write-protection):
//! 1. the target is paused; a log of all the source's RAM is started
//!    (log 1 of this service's);
//! 2. every page is copied; then rounds: read-and-clear the log and copy
//!    the pages it names, until a round finds few (or after 8 rounds);
//! 3. meanwhile a service write: a marker written into the source's RAM by
//!    DOMAIN_WRITE (memory the hypervisor writes around the EPT) after the
//!    last round, which only the kernel's record of such writes tells the
//!    log about;
//! 4. the source is paused, the log read again (until a read finds
//!    nothing: an exit answered at the pause may still write its reply)
//!    and those pages copied, the log stopped;
//! 5. every page of the two domains is compared: they must be equal. The
//!    source is resumed for the next mechanism.
//!
//! Logs `copier: <mechanism>: N rounds, M pages copied live, K in the final
//! round, all P pages equal`, or `copier: FAIL ...`. At the end the copy is
//! destroyed; a log (number 7) is started on the source and left running,
//! the source is told to stop (a stop word in its last page, which the
//! `writer` guest polls), and the task exits with the number of failures:
//! the logdirty service must tear down the log of a client that ended.

#![no_std]
#![no_main]

use ipc_schema::logdirty::{DirtyMode, LOGDIRTY, LdReply, LdRequest, Mechanism};
use ipc_schema::supervisor::{SUPERVISOR, SupervisorReply, SupervisorRequest, name_str};
use ipc_schema::syscall::layout::MAP_BASE;
use ipc_schema::syscall::{DomainOp, FOREIGN_PAGES, Handle, vm_features};
use service_runtime::ipc::Client;
use service_runtime::{require, sys};

service_runtime::entry!(main);

const PAGE: u64 = 4096;
/// This service's log number.
const LOG: u32 = 1;
/// Live rounds at most.
const ROUNDS: u32 = 8;
/// A round that finds at most this many pages ends the live copy.
const FEW: u64 = 16;
/// The log left running when the task ends.
const LEFT_BEHIND: u32 = 7;
/// The `writer` guest's stop word, and where in its last page it goes.
const STOP: u64 = u64::from_le_bytes(*b"STOPCOPY");
const STOP_AT: u64 = 2048;

struct Copier {
    domains: Handle,
    logdirty: Client,
    source: u16,
    target: u16,
    pages: u64,
    failed: u64,
}

/// Where the source's pages are mapped, and the target's after them.
const SOURCE_VA: u64 = MAP_BASE;
const TARGET_VA: u64 = MAP_BASE + RUN * PAGE;
/// Pages mapped at once (FOREIGN_PAGES).
const RUN: u64 = FOREIGN_PAGES;

impl Copier {
    /// Maps pages `gfn .. gfn + count` (at most [`RUN`]) of the source
    /// (read only) and of the target (writable with `write`), hands both to
    /// `f`, and unmaps them. `None` where either cannot be mapped (not
    /// RAM).
    fn mapped<R>(
        &mut self,
        gfn: u64,
        count: u64,
        write: bool,
        f: impl FnOnce(&[u8], &mut [u8]) -> R,
    ) -> Option<R> {
        let len = (count * PAGE) as usize;
        let d = self.domains;
        sys::foreign_map(d, self.source, gfn, count, SOURCE_VA, false).ok()?;
        if sys::foreign_map(d, self.target, gfn, count, TARGET_VA, write).is_err() {
            let _ = sys::foreign_unmap(SOURCE_VA, count);
            return None;
        }
        // Safety: the kernel just mapped `count` pages of each domain at
        // these addresses of this task's map window, the target's writable
        // only with `write`; nothing else refers to them, and they are
        // unmapped below before the window is used again.
        let (source, target) = unsafe {
            (
                core::slice::from_raw_parts(SOURCE_VA as *const u8, len),
                core::slice::from_raw_parts_mut(TARGET_VA as *mut u8, len),
            )
        };
        let r = f(source, target);
        let _ = sys::foreign_unmap(SOURCE_VA, count);
        let _ = sys::foreign_unmap(TARGET_VA, count);
        Some(r)
    }

    /// Whether gfn `gfn` of domain `id` is RAM (it can be mapped).
    fn is_ram(&self, id: u16, gfn: u64) -> bool {
        let ok = sys::foreign_map(self.domains, id, gfn, 1, SOURCE_VA, false).is_ok();
        if ok {
            let _ = sys::foreign_unmap(SOURCE_VA, 1);
        }
        ok
    }

    /// Copies pages `gfn .. gfn + count` of the source into the target:
    /// how many could not be (not RAM), each page on its own where a run
    /// cannot be mapped whole.
    fn copy(&mut self, gfn: u64, count: u64) -> u64 {
        let mut failed = 0;
        for run in (gfn..gfn + count).step_by(RUN as usize) {
            let n = RUN.min(gfn + count - run);
            let whole = self.mapped(run, n, true, |s, t| t.copy_from_slice(s));
            if whole.is_none() {
                for g in run..run + n {
                    if self
                        .mapped(g, 1, true, |s, t| t.copy_from_slice(s))
                        .is_none()
                    {
                        failed += 1;
                    }
                }
            }
        }
        failed
    }

    /// Reads the log with clear and copies each page it names: how many.
    fn round(&mut self) -> Option<u64> {
        let mut from = 0;
        let mut copied = 0;
        loop {
            let reply = self.logdirty.call::<_, LdReply>(&LdRequest::Read {
                domain: self.source,
                log: LOG,
                from,
                clear: true,
            });
            match reply {
                Ok(LdReply::Dirty { ranges, next }) => {
                    for r in ranges.0.iter() {
                        if self.copy(r.gfn, r.count) != 0 {
                            defmt::error!(
                                "copier: FAIL copying gfns {=u64:#x} .. {=u64:#x}",
                                r.gfn,
                                r.gfn + r.count
                            );
                            return None;
                        }
                        copied += r.count;
                    }
                    match next {
                        Some(g) => from = g,
                        None => return Some(copied),
                    }
                }
                other => {
                    defmt::error!(
                        "copier: FAIL reading the log: {}",
                        defmt::Debug2Format(&other)
                    );
                    return None;
                }
            }
        }
    }

    /// Pages that differ between the two domains (the first logged).
    fn compare(&mut self) -> u64 {
        let mut differ = 0;
        let mut first = None;
        let mut note = |g: u64, differ: &mut u64| {
            first.get_or_insert(g);
            *differ += 1;
        };
        for run in (0..self.pages).step_by(RUN as usize) {
            let n = RUN.min(self.pages - run);
            let pages = |s: &[u8], t: &mut [u8]| {
                let mut out = [false; RUN as usize];
                for (i, (a, b)) in s
                    .chunks(PAGE as usize)
                    .zip(t.chunks(PAGE as usize))
                    .enumerate()
                {
                    out[i] = a != b;
                }
                out
            };
            match self.mapped(run, n, false, pages) {
                Some(out) => {
                    for (i, _) in out.iter().enumerate().filter(|(_, d)| **d) {
                        note(run + i as u64, &mut differ);
                    }
                }
                // Page by page: a hole in both (not RAM) is no difference.
                None => {
                    for g in run..run + n {
                        let (a, b) = (self.is_ram(self.source, g), self.is_ram(self.target, g));
                        match (a, b) {
                            (false, false) => {}
                            (true, true)
                                if self.mapped(g, 1, false, |s, t| s == t) == Some(true) => {}
                            _ => note(g, &mut differ),
                        }
                    }
                }
            }
        }
        if let Some(g) = first {
            defmt::error!(
                "copier: FAIL gfn {=u64:#x} differs between the source and the copy",
                g
            );
        }
        differ
    }

    fn control(&mut self, id: u16, op: DomainOp) {
        if let Err(e) = sys::domain_control(self.domains, id, op) {
            defmt::error!("copier: FAIL {} of domain {=u16}: {}", op, id, e);
            self.failed += 1;
        }
    }

    /// One live copy on `mode`.
    fn run(&mut self, mode: DirtyMode) {
        let start = self.logdirty.call::<_, LdReply>(&LdRequest::Start {
            domain: self.source,
            log: LOG,
            range: None,
            mode,
        });
        let mechanism = match start {
            Ok(LdReply::Started { mechanism, .. }) => mechanism,
            other => {
                defmt::error!(
                    "copier: FAIL starting the log: {}",
                    defmt::Debug2Format(&other)
                );
                self.failed += 1;
                return;
            }
        };
        let name = match mechanism {
            Mechanism::Pml => "pml",
            Mechanism::WriteProtect => "write-protection",
        };
        // Everything once, then what the log says changed meanwhile.
        let _ = self.copy(0, self.pages);
        let mut live = self.pages;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let Some(n) = self.round() else {
                self.failed += 1;
                return;
            };
            live += n;
            defmt::info!(
                "copier: {=str}: round {=u32}: {=u64} pages",
                name,
                rounds,
                n
            );
            if n <= FEW || rounds >= ROUNDS {
                break;
            }
        }
        // A write by a service, around the EPT (LD-5): the last page.
        let marker = [rounds as u8 ^ 0x5a; 64];
        if sys::domain_write(self.domains, self.source, (self.pages - 1) * PAGE, &marker).is_err() {
            defmt::error!("copier: FAIL writing the marker into the source");
            self.failed += 1;
        }
        self.control(self.source, DomainOp::Pause);
        // A pause stops the vCPU, not an exit already being answered: the
        // vmm may still write a hypercall's reply into the source (around
        // the EPT, recorded for the log) after the pause. The services are
        // given the CPU before each final round, and the final rounds go
        // on until one finds nothing (a sixth standard service, page
        // sharing, changed the schedule so that the reply came after a
        // single final round).
        let mut last = 0;
        for _ in 0..4 {
            for _ in 0..32 {
                sys::yield_now();
            }
            let Some(n) = self.round() else {
                self.failed += 1;
                return;
            };
            last += n;
            if n == 0 {
                break;
            }
        }
        let _ = self.logdirty.call::<_, LdReply>(&LdRequest::Stop {
            domain: self.source,
            log: LOG,
        });
        let differ = self.compare();
        if differ == 0 {
            defmt::info!(
                "copier: {=str}: {=u32} rounds, {=u64} pages copied live, {=u64} in the final round, all {=u64} pages equal",
                name,
                rounds,
                live,
                last,
                self.pages
            );
        } else {
            defmt::error!(
                "copier: FAIL {=str}: {=u64} of {=u64} pages differ after the final round",
                name,
                differ,
                self.pages
            );
            self.failed += 1;
        }
        self.control(self.source, DomainOp::Unpause);
    }
}

/// The id of the domain named `name`.
fn domain_id(supervisor: &mut Client, name: &str) -> Option<u16> {
    for index in 0..16 {
        match supervisor.call::<_, SupervisorReply>(&SupervisorRequest::Domain { index }) {
            Ok(SupervisorReply::Domain(Some(d))) if name_str(&d.name) == name => {
                return Some(d.id);
            }
            Ok(SupervisorReply::Domain(Some(_))) => {}
            _ => return None,
        }
    }
    None
}

fn main() -> ! {
    let domains = require("domains");
    let mut supervisor = Client::new(require("supervisor"), SUPERVISOR);
    let (Some(source), Some(target)) = (
        domain_id(&mut supervisor, "writer"),
        domain_id(&mut supervisor, "copy"),
    ) else {
        defmt::error!("copier: FAIL the domains `writer` and `copy` are not both there");
        sys::exit(1);
    };
    let pages = match (
        sys::domain_info(domains, source),
        sys::domain_info(domains, target),
    ) {
        (Ok((_, _, a)), Ok((_, _, b))) if a == b => a / PAGE,
        _ => {
            defmt::error!("copier: FAIL the two domains' RAM differ");
            sys::exit(1);
        }
    };
    let mut c = Copier {
        domains,
        logdirty: Client::new(require("logdirty"), LOGDIRTY),
        source,
        target,
        pages,
        failed: 0,
    };
    defmt::info!(
        "copier: copying domain {=u16} into domain {=u16} ({=u64} pages)",
        source,
        target,
        pages
    );
    c.control(target, DomainOp::Pause);
    if sys::vm_features() & vm_features::PML != 0 {
        c.run(DirtyMode::Pml);
    } else {
        defmt::info!("copier: no PML on this CPU");
    }
    c.run(DirtyMode::WriteProtect);
    c.control(target, DomainOp::Destroy);
    // A log left behind by a client that ends.
    match c.logdirty.call::<_, LdReply>(&LdRequest::Start {
        domain: source,
        log: LEFT_BEHIND,
        range: None,
        mode: DirtyMode::Auto,
    }) {
        Ok(LdReply::Started { .. }) => {
            defmt::info!("copier: log {=u32} left running; ending", LEFT_BEHIND)
        }
        other => {
            defmt::error!(
                "copier: FAIL starting log {=u32}: {}",
                LEFT_BEHIND,
                defmt::Debug2Format(&other)
            );
            c.failed += 1;
        }
    }
    let stop = STOP.to_le_bytes();
    if sys::domain_write(domains, source, (pages - 1) * PAGE + STOP_AT, &stop).is_err() {
        defmt::error!("copier: FAIL telling the source to stop");
        c.control(source, DomainOp::Destroy);
        c.failed += 1;
    }
    sys::exit(c.failed)
}
