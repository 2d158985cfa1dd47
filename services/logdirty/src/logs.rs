//! Every dirty log of every domain, the sources drained into them, and the
//! requests of the logdirty interface (LD-1..LD-5, docs/logdirty.md).
//!
//! The service owns the logs; the kernel has only mechanism (PML buffers,
//! its record of the guest memory it writes itself) and the altp2m service
//! owns the EPT entries (docs/p2m.md), so write-protection, the 4 KiB split
//! PML needs and the clearing of dirty bits are asked of it ([`Backend`]).

use crate::bitmap::{self, Bitmap};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use ipc_schema::altp2m::AltError;
use ipc_schema::ipc::BoundedVec;
use ipc_schema::logdirty::{
    DirtyMode, GfnRange, LdError, LdReply, LdRequest, Mechanism, RANGES_PER_REPLY,
};
use ipc_schema::syscall::{DomainState, SysError, vm_features};

/// Logs a domain may have, all clients together.
pub const MAX_LOGS: u32 = 8;

/// The service's heap: room for the bitmaps of 15 whole-RAM logs of 1 GiB
/// domains (32 KiB each) besides the records.
pub const HEAP_BYTES: usize = 512 << 10;

/// Free heap checked for beyond a new log's bitmap: the log's record, a
/// domain's record, the lists a start builds.
pub const ROOM: usize = 4 << 10;

/// GPAs in one PML buffer (a 4 KiB page).
pub const PML_ENTRIES: usize = 512;

/// Domain ids the kernel gives (1 to this).
pub const MAX_DOMAIN_ID: u16 = ipc_schema::manifest::MAX_DOMAINS as u16;

/// (gfn, pages) pairs asked of the kernel's write record per call.
pub const WRITES_BATCH: usize = 32;

/// Calls one source may take in one drain; past them the logs of the
/// domain are taken as wholly dirty (LD-1: never a false negative).
pub const MAX_ROUNDS: u32 = 1 << 16;

/// Ranges as the altp2m interface carries them.
pub type Ranges = BoundedVec<GfnRange, RANGES_PER_REPLY>;

/// Why a call to the altp2m service failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum AltFail {
    /// It answered with a refusal.
    Refused(AltError),
    /// It did not answer (held, or the call failed), or answered something
    /// else.
    Unreachable,
}

/// What the service needs of the kernel and of the altp2m service:
/// system calls and calls in `main.rs`, a model in the tests.
pub trait Backend {
    /// `ipc_schema::syscall::vm_features` bits.
    fn features(&self) -> u64;
    /// A domain's state (a `DomainState` code) and its RAM in pages;
    /// `None` when there is no such domain.
    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)>;
    /// A domain's birth (`sys::domain_birth`): an id is given again to a
    /// new domain, a birth never. `None` when there is no such domain.
    fn domain_birth(&mut self, domain: u16) -> Option<u64>;
    /// Whether the heap has `bytes` free in one piece.
    fn room(&self, bytes: usize) -> bool;

    /// altp2m `Track { domain, range, how }`.
    fn track(
        &mut self,
        domain: u16,
        range: GfnRange,
        how: Option<Mechanism>,
    ) -> Result<(), AltFail>;
    /// altp2m `DirtyTake { domain, from }`: (ranges, next).
    fn dirty_take(&mut self, domain: u16, from: u64) -> Result<(Ranges, Option<u64>), AltFail>;
    /// altp2m `Rearm { domain, ranges }`.
    fn rearm(&mut self, domain: u16, ranges: &Ranges) -> Result<(), AltFail>;
    /// Whether the altp2m service restarted (or was swapped) since the last
    /// time this was asked: a new instance holds none of the arming asked
    /// of the old one, nor its marks.
    fn altp2m_restarted(&mut self) -> bool;

    /// `VcpuOp::WritesLog`: the kernel's record of what it writes into
    /// the domain's memory, on or off.
    fn writes_log(&mut self, domain: u16, on: bool) -> Result<(), SysError>;
    /// PML on for the domain (`sys::pml_start`, its two buffers in the
    /// `pml` frames, full ones sent to `pml-exits`).
    fn pml_start(&mut self, domain: u16) -> Result<(), SysError>;
    /// `VcpuOp::PmlStop`.
    fn pml_stop(&mut self, domain: u16) -> Result<(), SysError>;
    /// Takes the PML buffer the CPU was writing: (entries, which buffer).
    fn pml_take(&mut self, domain: u16) -> Result<(u16, u8), SysError>;
    /// Copies PML buffer `buffer` (0 or 1) of `domain`; `false` when there
    /// is no such buffer.
    fn pml_read(&self, domain: u16, buffer: u8, out: &mut [u64; PML_ENTRIES]) -> bool;
    /// `sys::domain_writes`: (pairs written into `out`, whether some writes
    /// were not recorded).
    fn domain_writes(
        &mut self,
        domain: u16,
        out: &mut [[u64; 2]],
    ) -> Result<(usize, bool), SysError>;
}

/// One client's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    /// The badge of the client that started it.
    pub client: u64,
    /// The client's number for it.
    pub log: u32,
    pub mechanism: Mechanism,
    bits: Bitmap,
}

impl Log {
    /// The gfns it covers.
    pub fn range(&self) -> GfnRange {
        self.bits.range()
    }

    /// Pages set now.
    pub fn dirty(&self) -> u64 {
        self.bits.ones()
    }

    /// Whether `gfn` is set.
    pub fn is_dirty(&self, gfn: u64) -> bool {
        self.bits.get(gfn)
    }
}

/// A domain with at least one log.
#[derive(Debug, Default)]
struct Domain {
    logs: Vec<Log>,
    /// PML is on (some log is a PML one).
    pml: bool,
    /// The kernel's write record is on.
    writes: bool,
}

/// Every log of every domain.
#[derive(Debug, Default)]
pub struct LogDirty {
    domains: BTreeMap<u16, Domain>,
    /// The birth of each domain with logs: a new domain given an ended
    /// one's id inherits none of them (`forget_reborn`).
    births: service_runtime::births::Births,
}

/// Whether two ranges share a gfn.
fn overlaps(a: GfnRange, b: GfnRange) -> bool {
    a.gfn < b.gfn.saturating_add(b.count) && b.gfn < a.gfn.saturating_add(a.count)
}

/// The parts of `range` that no range of `others` covers, and the parts
/// that some does, each lowest first.
pub(crate) fn split(
    range: GfnRange,
    others: impl Iterator<Item = GfnRange>,
) -> (Vec<GfnRange>, Vec<GfnRange>) {
    let end = range.gfn + range.count;
    let mut cover: Vec<(u64, u64)> = others
        .filter(|o| overlaps(*o, range))
        .map(|o| (o.gfn.max(range.gfn), (o.gfn + o.count).min(end)))
        .collect();
    cover.sort_unstable();
    let (mut uncovered, mut covered) = (Vec::new(), Vec::new());
    let mut at = range.gfn;
    for (s, e) in cover {
        if s > at {
            uncovered.push(GfnRange {
                gfn: at,
                count: s - at,
            });
            at = s;
        }
        if e > at {
            match covered.last_mut() {
                Some(GfnRange { gfn, count }) if *gfn + *count == at => *count += e - at,
                _ => covered.push(GfnRange {
                    gfn: at,
                    count: e - at,
                }),
            }
            at = e;
        }
    }
    if at < end {
        uncovered.push(GfnRange {
            gfn: at,
            count: end - at,
        });
    }
    (uncovered, covered)
}

impl Domain {
    /// Sets `[gfn, gfn + count)` in every log that holds part of it; the
    /// rest is dropped.
    fn mark(&mut self, gfn: u64, count: u64) {
        for l in &mut self.logs {
            l.bits.set(gfn, count);
        }
    }

    /// Every log wholly dirty: what was written is not known (LD-1).
    fn mark_all(&mut self) {
        for l in &mut self.logs {
            l.bits.set_all();
        }
    }

    /// The `entries` GPAs of PML buffer `buffer` into the logs.
    fn take_pml(&mut self, b: &impl Backend, domain: u16, buffer: u8, entries: u16) {
        let mut page = [0u64; PML_ENTRIES];
        if !b.pml_read(domain, buffer, &mut page) {
            defmt::warn!(
                "logdirty: domain {=u16}: PML buffer {=u8} cannot be read; its logs are taken as wholly dirty",
                domain,
                buffer
            );
            self.mark_all();
            return;
        }
        // The CPU fills a buffer from its last slot down.
        let n = usize::from(entries).min(PML_ENTRIES);
        for &gpa in &page[PML_ENTRIES - n..] {
            self.mark(gpa >> 12, 1);
        }
    }

    /// The kernel's record of its own writes into the logs.
    fn take_writes(&mut self, b: &mut impl Backend, domain: u16) -> Result<(), SysError> {
        let mut pairs = [[0u64; 2]; WRITES_BATCH];
        for _ in 0..MAX_ROUNDS {
            let (n, lost) = b.domain_writes(domain, &mut pairs)?;
            for &[gfn, pages] in &pairs[..n.min(WRITES_BATCH)] {
                self.mark(gfn, pages);
            }
            if lost {
                defmt::warn!(
                    "logdirty: domain {=u16}: the kernel's write record overflowed; every log of the domain is taken as wholly dirty",
                    domain
                );
                self.mark_all();
            }
            if n < WRITES_BATCH {
                return Ok(());
            }
        }
        defmt::warn!(
            "logdirty: domain {=u16}: the kernel's write record does not end; every log of the domain is taken as wholly dirty",
            domain
        );
        self.mark_all();
        Ok(())
    }

    /// The frames altp2m saw written (write-protection faults) into the
    /// logs; it protects them again as it hands them over.
    fn take_dirtied(&mut self, b: &mut impl Backend, domain: u16) -> Result<(), AltFail> {
        let mut from = 0;
        for _ in 0..MAX_ROUNDS {
            let (ranges, next) = b.dirty_take(domain, from)?;
            for r in ranges.0.iter() {
                self.mark(r.gfn, r.count);
            }
            match next {
                None => return Ok(()),
                Some(n) if n > from => from = n,
                Some(_) => break,
            }
        }
        defmt::warn!(
            "logdirty: domain {=u16}: the altp2m service's dirtied frames do not end; every log of the domain is taken as wholly dirty",
            domain
        );
        self.mark_all();
        Ok(())
    }

    fn find(&self, client: u64, log: u32) -> Option<usize> {
        self.logs
            .iter()
            .position(|l| l.client == client && l.log == log)
    }
}

impl LogDirty {
    /// The log `log` of `client` on `domain`.
    pub fn log(&self, client: u64, domain: u16, log: u32) -> Option<&Log> {
        let d = self.domains.get(&domain)?;
        d.logs.get(d.find(client, log)?)
    }

    /// The logs of `domain`.
    pub fn logs(&self, domain: u16) -> &[Log] {
        self.domains.get(&domain).map_or(&[], |d| &d.logs)
    }

    /// Whether PML and the kernel's write record are on for `domain` (as
    /// the service turned them).
    pub fn controls(&self, domain: u16) -> (bool, bool) {
        self.domains
            .get(&domain)
            .map_or((false, false), |d| (d.pml, d.writes))
    }

    /// Answers a request of the client with badge `client`.
    pub fn request(&mut self, b: &mut impl Backend, client: u64, r: &LdRequest) -> LdReply {
        self.forget_reborn(b);
        let reply = match *r {
            LdRequest::Start {
                domain,
                log,
                range,
                mode,
            } => self
                .start(b, client, domain, log, range, mode)
                .map(|(mechanism, range)| LdReply::Started { mechanism, range }),
            LdRequest::Read {
                domain,
                log,
                from,
                clear,
            } => self
                .read(b, client, domain, log, from, clear)
                .map(|(ranges, next)| LdReply::Dirty { ranges, next }),
            LdRequest::Stop { domain, log } => self.stop(b, client, domain, log).map(|()| {
                defmt::info!(
                    "logdirty: domain {=u16}: log {=u32} of badge {=u64} stopped",
                    domain,
                    log,
                    client
                );
                LdReply::Done
            }),
            LdRequest::Status { domain, log } => self.status(b, client, domain, log),
        };
        self.check_altp2m(b);
        let kept: Vec<u16> = self.domains.keys().copied().collect();
        self.births.note(&kept, |id| b.domain_birth(id));
        reply.unwrap_or_else(LdReply::Error)
    }

    /// Starts a log (LD-1, LD-2): checks, drains the sources into the
    /// existing logs, turns on the kernel's part, arms the range with
    /// altp2m. A failure undoes what it did.
    fn start(
        &mut self,
        b: &mut impl Backend,
        client: u64,
        domain: u16,
        log: u32,
        range: Option<GfnRange>,
        mode: DirtyMode,
    ) -> Result<(Mechanism, GfnRange), LdError> {
        let (state, pages) = b.domain_info(domain).ok_or(LdError::NoSuchDomain)?;
        if state > 2 {
            return Err(LdError::NoSuchDomain);
        }
        let range = range.unwrap_or(GfnRange {
            gfn: 0,
            count: pages,
        });
        if range.count == 0 || range.end().is_none_or(|end| end > pages) {
            return Err(LdError::BadRange { pages });
        }
        let has_pml = b.features() & vm_features::PML != 0;
        let mechanism = match mode {
            DirtyMode::Auto if has_pml => Mechanism::Pml,
            DirtyMode::Auto | DirtyMode::WriteProtect => Mechanism::WriteProtect,
            DirtyMode::Pml if has_pml => Mechanism::Pml,
            DirtyMode::Pml => return Err(LdError::PmlUnsupported),
        };
        let (had_writes, had_pml) = match self.domains.get(&domain) {
            Some(d) => {
                if d.find(client, log).is_some() {
                    return Err(LdError::AlreadyLogging);
                }
                if d.logs.len() >= MAX_LOGS as usize {
                    return Err(LdError::TooManyLogs { limit: MAX_LOGS });
                }
                // LD-4/LD-5 are altp2m's part within a range; one gfn is
                // kept by one mechanism.
                if let Some(l) = d
                    .logs
                    .iter()
                    .find(|l| l.mechanism != mechanism && overlaps(l.range(), range))
                {
                    return Err(LdError::ModeConflict { held: l.mechanism });
                }
                (d.writes, d.pml)
            }
            None => (false, false),
        };
        if !b.room(bitmap::bytes_for(range.count).saturating_add(ROOM)) {
            return Err(LdError::OutOfMemory);
        }
        let bits = Bitmap::new(range).map_err(|_| LdError::OutOfMemory)?;
        let (uncovered, covered) = split(range, self.logs(domain).iter().map(Log::range));

        // What is in the sources belongs to the logs there are now.
        self.drain(b, domain)?;

        // The kernel's part first: PML must be logging before altp2m
        // clears the dirty bits of the range, or a write in between would
        // set one unlogged and the next write to that page would not be
        // logged either (LD-1).
        if !had_writes && let Err(e) = b.writes_log(domain, true) {
            defmt::warn!(
                "logdirty: domain {=u16}: the kernel refused its write record: {}",
                domain,
                e
            );
            return Err(LdError::Kernel);
        }
        let pml_now = mechanism == Mechanism::Pml && !had_pml;
        if pml_now && let Err(e) = b.pml_start(domain) {
            defmt::warn!(
                "logdirty: domain {=u16}: the kernel refused PML: {}",
                domain,
                e
            );
            undo_controls(b, domain, false, !had_writes);
            return Err(LdError::Kernel);
        }

        // Arm what no log arms yet; where another log of the same
        // mechanism arms already, write-protection stays as it is (arming
        // again would drop altp2m's marks of writes made since the drain),
        // and for PML the dirty bits are cleared so that the next write is
        // logged for this log too.
        let mut armed = 0;
        let mut failed = None;
        for part in &uncovered {
            if let Err(e) = b.track(domain, *part, Some(mechanism)) {
                failed = Some(e);
                break;
            }
            armed += 1;
        }
        if failed.is_none() && mechanism == Mechanism::Pml {
            for chunk in covered.chunks(RANGES_PER_REPLY) {
                let mut ranges = Ranges::new();
                for r in chunk {
                    let _ = ranges.0.push(*r);
                }
                if let Err(e) = b.rearm(domain, &ranges) {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            defmt::warn!(
                "logdirty: domain {=u16}: the altp2m service did not arm {=u64}+{=u64}: {}",
                domain,
                range.gfn,
                range.count,
                e
            );
            for part in &uncovered[..armed] {
                if let Err(e) = b.track(domain, *part, None) {
                    defmt::warn!(
                        "logdirty: domain {=u16}: {=u64}+{=u64} stays armed: {}",
                        domain,
                        part.gfn,
                        part.count,
                        e
                    );
                }
            }
            undo_controls(b, domain, pml_now, !had_writes);
            return Err(LdError::Altp2m);
        }

        let d = self.domains.entry(domain).or_default();
        d.writes = true;
        d.pml |= mechanism == Mechanism::Pml;
        d.logs.push(Log {
            client,
            log,
            mechanism,
            bits,
        });
        defmt::info!(
            "logdirty: domain {=u16}: log {=u32} of badge {=u64} started over {=u64}+{=u64} ({})",
            domain,
            log,
            client,
            range.gfn,
            range.count,
            mechanism
        );
        Ok((mechanism, range))
    }

    /// The dirty ranges of a log at or after `from` (LD-1); with `clear`
    /// they are cleared in this log alone, and for PML the dirty bits of
    /// their entries are cleared first, so that the next write to each is
    /// logged again (a write between the two is in the PML buffer, and is
    /// set again by the next drain).
    fn read(
        &mut self,
        b: &mut impl Backend,
        client: u64,
        domain: u16,
        log: u32,
        from: u64,
        clear: bool,
    ) -> Result<(Ranges, Option<u64>), LdError> {
        if self.log(client, domain, log).is_none() {
            return Err(absent(b, domain));
        }
        self.drain(b, domain)?;
        let d = self.domains.get_mut(&domain).ok_or(LdError::NotLogging)?;
        let i = d.find(client, log).ok_or(LdError::NotLogging)?;
        let l = &mut d.logs[i];
        let mut ranges = Ranges::new();
        let mut at = from;
        while let Some(run) = l.bits.next_run(at) {
            if ranges.0.push(run).is_err() {
                break;
            }
            at = run.gfn + run.count;
        }
        let next = if ranges.0.is_full() && l.bits.next_run(at).is_some() {
            Some(at)
        } else {
            None
        };
        if clear && !ranges.0.is_empty() {
            if l.mechanism == Mechanism::Pml
                && let Err(e) = b.rearm(domain, &ranges)
            {
                defmt::warn!(
                    "logdirty: domain {=u16}: the altp2m service did not rearm PML: {}; nothing cleared",
                    domain,
                    e
                );
                return Err(LdError::Altp2m);
            }
            for r in ranges.0.iter() {
                l.bits.clear(r.gfn, r.count);
            }
        }
        Ok((ranges, next))
    }

    /// What a log is, after a drain.
    fn status(
        &mut self,
        b: &mut impl Backend,
        client: u64,
        domain: u16,
        log: u32,
    ) -> Result<LdReply, LdError> {
        if self.log(client, domain, log).is_none() {
            return Err(absent(b, domain));
        }
        self.drain(b, domain)?;
        let l = self.log(client, domain, log).ok_or(LdError::NotLogging)?;
        Ok(LdReply::Status {
            mechanism: l.mechanism,
            range: l.range(),
            dirty: l.dirty(),
        })
    }

    /// Ends a log.
    fn stop(
        &mut self,
        b: &mut impl Backend,
        client: u64,
        domain: u16,
        log: u32,
    ) -> Result<(), LdError> {
        let Some(i) = self.domains.get(&domain).and_then(|d| d.find(client, log)) else {
            return Err(absent(b, domain));
        };
        self.stop_at(b, domain, i);
        Ok(())
    }

    /// Removes log `i` of `domain`: drains first (for the other logs),
    /// disarms the parts of its range no other log holds, and turns off
    /// PML when no PML log remains and the write record when no log does.
    /// The log is gone even where altp2m or the kernel refuses a part of
    /// that (said in the log). The log removed.
    fn stop_at(&mut self, b: &mut impl Backend, domain: u16, i: usize) -> Option<Log> {
        if let Err(e) = self.drain(b, domain) {
            defmt::warn!(
                "logdirty: domain {=u16}: a source could not be drained before a stop ({})",
                domain,
                e
            );
        }
        let d = self.domains.get_mut(&domain)?;
        if i >= d.logs.len() {
            return None;
        }
        let gone = d.logs.remove(i);
        // Arming is the same for every log over a gfn (a mode conflict is
        // refused), so what other logs hold stays armed as it is.
        let (uncovered, _) = split(gone.range(), d.logs.iter().map(Log::range));
        for part in uncovered {
            if let Err(e) = b.track(domain, part, None) {
                defmt::warn!(
                    "logdirty: domain {=u16}: the altp2m service did not disarm {=u64}+{=u64}: {}",
                    domain,
                    part.gfn,
                    part.count,
                    e
                );
            }
        }
        let pml_off = d.pml && !d.logs.iter().any(|l| l.mechanism == Mechanism::Pml);
        let writes_off = d.logs.is_empty();
        if pml_off {
            d.pml = false;
        }
        if writes_off {
            self.domains.remove(&domain);
        }
        undo_controls(b, domain, pml_off, writes_off);
        Some(gone)
    }

    /// Drains every source of `domain` into its logs (LD-1): the PML
    /// buffer the CPU is writing, the kernel's record of its own writes,
    /// and the frames a write-protection fault lifted (from altp2m). Every
    /// source is drained even if another fails; the first failure is the
    /// answer.
    pub fn drain(&mut self, b: &mut impl Backend, domain: u16) -> Result<(), LdError> {
        let Some(d) = self.domains.get_mut(&domain) else {
            return Ok(());
        };
        let mut result = Ok(());
        if d.pml {
            match b.pml_take(domain) {
                Ok((entries, buffer)) => d.take_pml(b, domain, buffer, entries),
                Err(e) => {
                    defmt::warn!(
                        "logdirty: domain {=u16}: the kernel did not hand over the PML buffer: {}",
                        domain,
                        e
                    );
                    result = Err(LdError::Kernel);
                }
            }
        }
        if d.writes
            && let Err(e) = d.take_writes(b, domain)
        {
            defmt::warn!(
                "logdirty: domain {=u16}: the kernel did not hand over its write record: {}",
                domain,
                e
            );
            result = result.and(Err(LdError::Kernel));
        }
        if let Err(e) = d.take_dirtied(b, domain) {
            defmt::warn!(
                "logdirty: domain {=u16}: the altp2m service did not hand over the dirtied frames: {}",
                domain,
                e
            );
            result = result.and(Err(LdError::Altp2m));
        }
        self.check_altp2m(b);
        result
    }

    /// A full PML buffer the kernel sent (`ExitKind::PmlFull`) into the
    /// logs of `domain`; the caller then answers the exit.
    pub fn pml_full(&mut self, b: &impl Backend, domain: u16, buffer: u8, entries: u16) {
        if let Some(d) = self.domains.get_mut(&domain)
            && d.pml
        {
            d.take_pml(b, domain, buffer, entries);
        }
    }

    /// After a restart of the altp2m service (LD-1): it no longer arms any
    /// range nor holds the marks of writes it saw, so every range is armed
    /// again and every log is taken as wholly dirty.
    fn check_altp2m(&mut self, b: &mut impl Backend) {
        let mut rounds = 0;
        while b.altp2m_restarted() && rounds < 3 {
            rounds += 1;
            let mut logs = 0u32;
            for (&domain, d) in &mut self.domains {
                d.mark_all();
                for l in &d.logs {
                    logs += 1;
                    if let Err(e) = b.track(domain, l.range(), Some(l.mechanism)) {
                        defmt::warn!(
                            "logdirty: domain {=u16}: {=u64}+{=u64} could not be armed again: {}",
                            domain,
                            l.range().gfn,
                            l.range().count,
                            e
                        );
                    }
                }
            }
            defmt::warn!(
                "logdirty: the altp2m service restarted: {=u32} log(s) armed again and taken as wholly dirty",
                logs
            );
        }
    }

    /// Stops every log of the client with badge `client` (it faulted,
    /// restarted, was held, swapped or ended), as `Stop` does. The logs
    /// stopped, as (domain, log, dirty pages dropped).
    pub fn client_gone(&mut self, b: &mut impl Backend, client: u64) -> Vec<(u16, u32, u64)> {
        let mut stopped = Vec::new();
        let ids: Vec<u16> = self.domains.keys().copied().collect();
        for domain in ids {
            while let Some(i) = self
                .domains
                .get(&domain)
                .and_then(|d| d.logs.iter().position(|l| l.client == client))
            {
                match self.stop_at(b, domain, i) {
                    Some(l) => {
                        defmt::info!(
                            "logdirty: badge {=u64} is gone: log {=u32} of domain {=u16} stopped ({=u64} dirty page(s) dropped)",
                            client,
                            l.log,
                            domain,
                            l.dirty()
                        );
                        stopped.push((domain, l.log, l.dirty()));
                    }
                    None => break,
                }
            }
        }
        self.check_altp2m(b);
        stopped
    }

    /// Forgets a domain that ended, without asking anything of anyone
    /// (its entries and PML went with it). The logs dropped.
    pub fn forget_domain(&mut self, domain: u16) -> usize {
        self.births.forget(domain);
        self.domains.remove(&domain).map_or(0, |d| d.logs.len())
    }

    /// Forgets the logs of every domain that is gone or whose id a new
    /// domain has been given since (its birth is not the one noted), before
    /// the end was heard: they are not the new domain's, which must not
    /// inherit them, nor be read through them. The ids forgotten.
    pub fn forget_reborn(&mut self, b: &mut impl Backend) -> Vec<u16> {
        let ids: Vec<u16> = self.domains.keys().copied().collect();
        // (An end that is not a destroy is the supervisor's word.)
        let gone = self
            .births
            .ended(&ids, |id| Some((true, b.domain_birth(id)?)));
        for &id in &gone {
            let n = self.forget_domain(id);
            defmt::info!(
                "logdirty: domain {=u16} is gone or a new domain has its id: its {=usize} log(s) are forgotten",
                id,
                n
            );
        }
        gone.to_vec()
    }

    /// The supervisor says domain `domain` ended: its logs go, unless the
    /// id already serves a new domain, whose logs they are. The logs
    /// dropped.
    pub fn domain_ended(&mut self, b: &mut impl Backend, domain: u16) -> usize {
        let ended = self.births.ended(&[domain], |id| {
            let live = b
                .domain_info(id)
                .is_some_and(|(state, _)| DomainState::live(state));
            Some((live, b.domain_birth(id)?))
        });
        if ended.is_empty() {
            return 0;
        }
        self.forget_domain(domain)
    }

    /// A restarted or swapped-in instance holds none of its predecessor's
    /// logs: every live domain's RAM disarmed, PML and the write record
    /// off, so that nothing is armed that no log accounts for (the
    /// clients get `NotLogging` and start again). The domains cleaned.
    pub fn clean_slate(&mut self, b: &mut impl Backend) -> u32 {
        let mut cleaned = 0;
        for domain in 1..=MAX_DOMAIN_ID {
            let Some((state, pages)) = b.domain_info(domain) else {
                continue;
            };
            if state > 2 {
                continue;
            }
            cleaned += 1;
            if pages > 0
                && let Err(e) = b.track(
                    domain,
                    GfnRange {
                        gfn: 0,
                        count: pages,
                    },
                    None,
                )
            {
                defmt::warn!(
                    "logdirty: domain {=u16}: the altp2m service did not disarm its RAM: {}",
                    domain,
                    e
                );
            }
            // Refused where they were off: nothing to say.
            let _ = b.pml_stop(domain);
            let _ = b.writes_log(domain, false);
        }
        self.domains.clear();
        // Whatever altp2m did before this does not matter any more.
        let _ = b.altp2m_restarted();
        cleaned
    }
}

/// Turns off PML (`pml`) and the write record (`writes`) of `domain`,
/// saying so where the kernel refuses.
fn undo_controls(b: &mut impl Backend, domain: u16, pml: bool, writes: bool) {
    if pml && let Err(e) = b.pml_stop(domain) {
        defmt::warn!(
            "logdirty: domain {=u16}: the kernel did not stop PML: {}",
            domain,
            e
        );
    }
    if writes && let Err(e) = b.writes_log(domain, false) {
        defmt::warn!(
            "logdirty: domain {=u16}: the kernel did not stop its write record: {}",
            domain,
            e
        );
    }
}

/// Why a client has no log of `domain` to read, show or stop: no live
/// domain has the id (`NoSuchDomain`: a careless id, or a domain that
/// ended, whose logs went with it, is named as such), else the log is not
/// running (`NotLogging`).
fn absent(b: &mut impl Backend, domain: u16) -> LdError {
    match b.domain_info(domain) {
        Some((state, _)) if DomainState::live(state) => LdError::NotLogging,
        _ => LdError::NoSuchDomain,
    }
}
