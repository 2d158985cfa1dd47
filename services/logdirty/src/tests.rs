//! Host tests of the logdirty service's logic against a model of what it
//! drives: the kernel's PML buffers and write record, the altp2m service's
//! arming, and the EPT bits a guest write changes (a fake PML: a write to a
//! page whose dirty bit is clear logs it; a fake write-protection: a write
//! to a protected page is marked dirtied and lifts the protection). Unit
//! tests for each error and behaviour, and property tests against a
//! reference model of every log (LD-1..LD-5).

extern crate std;

use crate::bitmap::{self, Bitmap};
use crate::logs::{AltFail, Backend, LogDirty, MAX_LOGS, PML_ENTRIES, Ranges, WRITES_BATCH, split};
use ipc_schema::altp2m::AltError;
use ipc_schema::logdirty::{
    DirtyMode, GfnRange, LdError, LdReply, LdRequest, Mechanism, RANGES_PER_REPLY,
};
use ipc_schema::syscall::{SysError, vm_features};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::vec;
use std::vec::Vec;

service_runtime::host_logger!();

/// The domain most tests log.
const D: u16 = 1;
/// A second domain.
const E: u16 = 2;
/// Pages of RAM of each domain (enough to fill PML buffers).
const RAM: u64 = 1200;
/// Badges of clients.
const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;

const PML: Mechanism = Mechanism::Pml;
const WP: Mechanism = Mechanism::WriteProtect;

fn r(gfn: u64, count: u64) -> GfnRange {
    GfnRange { gfn, count }
}

/// A call the service made of the fake.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    DomainInfo(u16),
    Track(u16, GfnRange, Option<Mechanism>),
    DirtyTake(u16, u64),
    Rearm(u16, Vec<GfnRange>),
    WritesLog(u16, bool),
    PmlStart(u16),
    PmlStop(u16),
    PmlTake(u16),
    DomainWrites(u16),
}

/// The next domain's birth (never given twice, as the kernel's).
static BIRTHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A domain as the fake kernel and the fake altp2m service keep it.
#[derive(Debug)]
struct Dom {
    ram: u64,
    /// A `DomainState` code.
    state: u64,
    /// Which domain of all the fake made this is (DOMAIN_INFO's birth).
    birth: u64,
    /// PML on.
    pml: bool,
    /// GPAs the CPU logged into each buffer since it last started it.
    bufs: [Vec<u64>; 2],
    /// What each buffer held when it was last taken or filled up (what
    /// the service reads).
    snap: [Vec<u64>; 2],
    /// The buffer the CPU writes.
    current: u8,
    /// A full buffer sent (`PmlFull`) and not answered yet: the vCPU waits.
    full: Option<(u8, u16)>,
    /// The kernel's write record.
    writes: bool,
    record: VecDeque<[u64; 2]>,
    record_cap: usize,
    lost: bool,
    /// altp2m's arming, per gfn.
    track: Vec<Option<Mechanism>>,
    /// The EPT dirty bit of each gfn (set by any write, PML or not).
    dirty_bit: Vec<bool>,
    /// Write-protected for tracking.
    protected: Vec<bool>,
    /// Written while protected, not taken yet (altp2m's marks).
    dirtied: BTreeSet<u64>,
}

impl Dom {
    fn new(ram: u64) -> Self {
        let n = ram as usize;
        Self {
            ram,
            state: 1,
            birth: BIRTHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pml: false,
            bufs: [Vec::new(), Vec::new()],
            snap: [Vec::new(), Vec::new()],
            current: 0,
            full: None,
            writes: false,
            record: VecDeque::new(),
            record_cap: 100_000,
            lost: false,
            track: vec![None; n],
            dirty_bit: vec![false; n],
            protected: vec![false; n],
            dirtied: BTreeSet::new(),
        }
    }

    /// Nothing armed, PML and the write record off.
    fn is_clean(&self) -> bool {
        !self.pml
            && !self.writes
            && self.track.iter().all(Option::is_none)
            && !self.protected.iter().any(|&p| p)
            && self.dirtied.is_empty()
    }
}

/// The kernel and the altp2m service as the logdirty service sees them.
struct Fake {
    features: u64,
    room: bool,
    doms: BTreeMap<u16, Dom>,
    calls: Vec<Call>,
    /// Calls that fail, by name.
    fail: BTreeSet<&'static str>,
    /// Calls that fail after succeeding this many more times, by name.
    countdown: BTreeMap<&'static str, usize>,
    /// The altp2m service restarted; its next call finds out.
    altp2m_dead: bool,
    restarted: bool,
    /// Guest writes made while the service works: (call number, domain,
    /// gfn), made just before that call takes effect.
    script: VecDeque<(usize, u16, u64)>,
    ticks: usize,
    /// The scripted writes made.
    raced: Vec<(u16, u64)>,
}

impl Fake {
    fn new(pml: bool) -> Self {
        Self {
            features: vm_features::VE | if pml { vm_features::PML } else { 0 },
            room: true,
            doms: BTreeMap::from([(D, Dom::new(RAM)), (E, Dom::new(RAM))]),
            calls: Vec::new(),
            fail: BTreeSet::new(),
            countdown: BTreeMap::new(),
            altp2m_dead: false,
            restarted: false,
            script: VecDeque::new(),
            ticks: 0,
            raced: Vec::new(),
        }
    }

    fn dom(&self, d: u16) -> &Dom {
        &self.doms[&d]
    }

    fn dom_mut(&mut self, d: u16) -> &mut Dom {
        self.doms.get_mut(&d).expect("a domain of the fake")
    }

    /// A guest write to `gfn` of domain `d`; `false` when the vCPU cannot
    /// make it (it waits on a full PML buffer).
    fn write(&mut self, d: u16, gfn: u64) -> bool {
        let Some(dom) = self.doms.get_mut(&d) else {
            return false;
        };
        if gfn >= dom.ram || dom.full.is_some() {
            return false;
        }
        let g = gfn as usize;
        if dom.protected[g] {
            // The write-protection fault: altp2m marks it and lifts it.
            dom.protected[g] = false;
            dom.dirtied.insert(gfn);
        }
        let was = core::mem::replace(&mut dom.dirty_bit[g], true);
        if dom.pml && !was {
            let b = usize::from(dom.current);
            dom.bufs[b].push(gfn << 12);
            if dom.bufs[b].len() == PML_ENTRIES {
                dom.snap[b] = core::mem::take(&mut dom.bufs[b]);
                dom.full = Some((dom.current, PML_ENTRIES as u16));
                dom.current ^= 1;
                dom.bufs[usize::from(dom.current)].clear();
            }
        }
        true
    }

    /// The kernel writes `pages` pages from `gfn` for a service.
    fn kernel_write(&mut self, d: u16, gfn: u64, pages: u64) {
        let dom = self.dom_mut(d);
        if dom.writes {
            if dom.record.len() < dom.record_cap {
                dom.record.push_back([gfn, pages]);
            } else {
                dom.lost = true;
            }
        }
    }

    /// Sends a full PML buffer to the service and resumes the vCPU.
    fn deliver(&mut self, ld: &mut LogDirty, d: u16) {
        if let Some((buffer, entries)) = self.dom(d).full {
            ld.pml_full(self, d, buffer, entries);
            self.dom_mut(d).full = None;
        }
    }

    /// A write between requests, with its PML exit answered.
    fn guest(&mut self, ld: &mut LogDirty, d: u16, gfn: u64) {
        self.write(d, gfn);
        self.deliver(ld, d);
    }

    /// Makes the scripted writes that are due.
    fn tick(&mut self) {
        self.ticks += 1;
        while let Some(&(at, d, gfn)) = self.script.front() {
            if at > self.ticks {
                break;
            }
            self.script.pop_front();
            if self.write(d, gfn) {
                self.raced.push((d, gfn));
            }
        }
    }

    fn failing(&mut self, name: &str) -> bool {
        if self.fail.contains(name) {
            return true;
        }
        match self.countdown.get_mut(name) {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }

    /// An altp2m call: finds out about a restart first.
    fn altp2m(&mut self, name: &str) -> Result<(), AltFail> {
        if core::mem::take(&mut self.altp2m_dead) {
            self.restarted = true;
        }
        if self.failing(name) {
            return Err(AltFail::Unreachable);
        }
        Ok(())
    }

    /// The altp2m service restarts: it forgets every arming and mark.
    fn restart_altp2m(&mut self) {
        self.altp2m_dead = true;
        for dom in self.doms.values_mut() {
            dom.track.fill(None);
            dom.protected.fill(false);
            dom.dirtied.clear();
        }
    }

    fn kernel(&mut self, name: &str, d: u16) -> Result<&mut Dom, SysError> {
        if self.failing(name) {
            return Err(SysError::BadArgument);
        }
        self.doms.get_mut(&d).ok_or(SysError::BadArgument)
    }
}

impl Backend for Fake {
    fn features(&self) -> u64 {
        self.features
    }

    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)> {
        self.tick();
        self.calls.push(Call::DomainInfo(domain));
        self.doms.get(&domain).map(|d| (d.state, d.ram))
    }

    fn domain_birth(&mut self, domain: u16) -> Option<u64> {
        self.doms.get(&domain).map(|d| d.birth)
    }

    fn room(&self, _bytes: usize) -> bool {
        self.room
    }

    fn track(
        &mut self,
        domain: u16,
        range: GfnRange,
        how: Option<Mechanism>,
    ) -> Result<(), AltFail> {
        self.tick();
        self.calls.push(Call::Track(domain, range, how));
        self.altp2m(if how.is_some() { "track" } else { "untrack" })?;
        let dom = self
            .doms
            .get_mut(&domain)
            .ok_or(AltFail::Refused(AltError::NoSuchDomain))?;
        let end = range.end().filter(|&e| range.count > 0 && e <= dom.ram);
        let end = end.ok_or(AltFail::Refused(AltError::BadRange))?;
        for g in range.gfn as usize..end as usize {
            dom.track[g] = how;
            dom.dirtied.remove(&(g as u64));
            match how {
                Some(Mechanism::WriteProtect) => dom.protected[g] = true,
                Some(Mechanism::Pml) => {
                    dom.protected[g] = false;
                    dom.dirty_bit[g] = false;
                }
                None => dom.protected[g] = false,
            }
        }
        Ok(())
    }

    fn dirty_take(&mut self, domain: u16, from: u64) -> Result<(Ranges, Option<u64>), AltFail> {
        self.tick();
        self.calls.push(Call::DirtyTake(domain, from));
        self.altp2m("dirty_take")?;
        let dom = self
            .doms
            .get_mut(&domain)
            .ok_or(AltFail::Refused(AltError::NoSuchDomain))?;
        let mut ranges = Ranges::new();
        let mut next = None;
        for g in dom.dirtied.range(from..).copied().collect::<Vec<_>>() {
            match ranges.0.last_mut() {
                Some(last) if last.gfn + last.count == g => last.count += 1,
                _ => {
                    if ranges.0.push(r(g, 1)).is_err() {
                        next = Some(g);
                        break;
                    }
                }
            }
        }
        for x in ranges.0.iter() {
            for g in x.gfn..x.gfn + x.count {
                dom.dirtied.remove(&g);
                dom.protected[g as usize] = true;
            }
        }
        Ok((ranges, next))
    }

    fn rearm(&mut self, domain: u16, ranges: &Ranges) -> Result<(), AltFail> {
        self.tick();
        self.calls.push(Call::Rearm(domain, ranges.0.to_vec()));
        self.altp2m("rearm")?;
        let dom = self
            .doms
            .get_mut(&domain)
            .ok_or(AltFail::Refused(AltError::NoSuchDomain))?;
        for x in ranges.0.iter() {
            for g in x.gfn..x.gfn + x.count {
                dom.dirty_bit[g as usize] = false;
            }
        }
        Ok(())
    }

    fn altp2m_restarted(&mut self) -> bool {
        core::mem::take(&mut self.restarted)
    }

    fn writes_log(&mut self, domain: u16, on: bool) -> Result<(), SysError> {
        self.tick();
        self.calls.push(Call::WritesLog(domain, on));
        let dom = self.kernel("writes_log", domain)?;
        dom.writes = on;
        if !on {
            dom.record.clear();
            dom.lost = false;
        }
        Ok(())
    }

    fn pml_start(&mut self, domain: u16) -> Result<(), SysError> {
        self.tick();
        self.calls.push(Call::PmlStart(domain));
        if self.features & vm_features::PML == 0 {
            return Err(SysError::Unsupported);
        }
        let dom = self.kernel("pml_start", domain)?;
        if dom.pml {
            return Err(SysError::BadArgument);
        }
        dom.pml = true;
        dom.bufs = [Vec::new(), Vec::new()];
        dom.current = 0;
        Ok(())
    }

    fn pml_stop(&mut self, domain: u16) -> Result<(), SysError> {
        self.tick();
        self.calls.push(Call::PmlStop(domain));
        let dom = self.kernel("pml_stop", domain)?;
        if !dom.pml {
            return Err(SysError::BadArgument);
        }
        dom.pml = false;
        Ok(())
    }

    fn pml_take(&mut self, domain: u16) -> Result<(u16, u8), SysError> {
        self.tick();
        self.calls.push(Call::PmlTake(domain));
        let dom = self.kernel("pml_take", domain)?;
        if !dom.pml {
            return Err(SysError::BadArgument);
        }
        // A take while a full buffer's exit is unanswered hands that
        // buffer over (the one the CPU is on is empty: the vCPU has not run
        // since), so that no drain misses what a queued exit holds; the
        // exit, answered later, hands it over again.
        if let Some((b, n)) = dom.full {
            return Ok((n, b));
        }
        let b = dom.current;
        let n = dom.bufs[usize::from(b)].len() as u16;
        dom.snap[usize::from(b)] = core::mem::take(&mut dom.bufs[usize::from(b)]);
        dom.current ^= 1;
        Ok((n, b))
    }

    fn pml_read(&self, domain: u16, buffer: u8, out: &mut [u64; PML_ENTRIES]) -> bool {
        let Some(dom) = self.doms.get(&domain) else {
            return false;
        };
        if buffer > 1 {
            return false;
        }
        // Slots not written hold what an earlier round left: pages the
        // service must not take as written.
        for (k, slot) in out.iter_mut().enumerate() {
            *slot = ((k as u64 * 7) % dom.ram) << 12;
        }
        for (k, &gpa) in dom.snap[usize::from(buffer)].iter().enumerate() {
            out[PML_ENTRIES - 1 - k] = gpa;
        }
        true
    }

    fn domain_writes(
        &mut self,
        domain: u16,
        out: &mut [[u64; 2]],
    ) -> Result<(usize, bool), SysError> {
        self.tick();
        self.calls.push(Call::DomainWrites(domain));
        let dom = self.kernel("domain_writes", domain)?;
        if !dom.writes {
            return Err(SysError::BadArgument);
        }
        let mut n = 0;
        while n < out.len()
            && let Some(p) = dom.record.pop_front()
        {
            out[n] = p;
            n += 1;
        }
        Ok((n, core::mem::take(&mut dom.lost)))
    }
}

// ---- helpers ----

fn start(
    ld: &mut LogDirty,
    f: &mut Fake,
    client: u64,
    domain: u16,
    log: u32,
    range: Option<GfnRange>,
    mode: DirtyMode,
) -> LdReply {
    ld.request(
        f,
        client,
        &LdRequest::Start {
            domain,
            log,
            range,
            mode,
        },
    )
}

fn read(
    ld: &mut LogDirty,
    f: &mut Fake,
    client: u64,
    domain: u16,
    log: u32,
    from: u64,
    clear: bool,
) -> LdReply {
    ld.request(
        f,
        client,
        &LdRequest::Read {
            domain,
            log,
            from,
            clear,
        },
    )
}

fn stop(ld: &mut LogDirty, f: &mut Fake, client: u64, domain: u16, log: u32) -> LdReply {
    ld.request(f, client, &LdRequest::Stop { domain, log })
}

fn dirty(ranges: &[GfnRange], next: Option<u64>) -> LdReply {
    let mut v = Ranges::new();
    for x in ranges {
        v.0.push(*x).expect("at most RANGES_PER_REPLY");
    }
    LdReply::Dirty { ranges: v, next }
}

/// Every gfn a log holds, by reading it all (peek).
fn all(ld: &mut LogDirty, f: &mut Fake, client: u64, domain: u16, log: u32) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let mut from = 0;
    loop {
        let LdReply::Dirty { ranges, next } = read(ld, f, client, domain, log, from, false) else {
            panic!("a read of a running log");
        };
        for x in ranges.0.iter() {
            out.extend(x.gfn..x.gfn + x.count);
        }
        match next {
            Some(n) => from = n,
            None => return out,
        }
    }
}

fn set(gfns: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    gfns.into_iter().collect()
}

fn started(mechanism: Mechanism, range: GfnRange) -> LdReply {
    LdReply::Started { mechanism, range }
}

// ---- the bitmap ----

#[test]
fn bitmap_runs_cross_words_and_stop_at_the_range() {
    let mut b = Bitmap::new(r(100, 200)).expect("room");
    b.set(90, 15); // 100..105 in range
    b.set(160, 70); // 160..230, across words
    b.set(299, 5); // 299 only
    assert_eq!(b.next_run(0), Some(r(100, 5)));
    assert_eq!(b.next_run(102), Some(r(102, 3)));
    assert_eq!(b.next_run(105), Some(r(160, 70)));
    assert_eq!(b.next_run(230), Some(r(299, 1)));
    assert_eq!(b.next_run(300), None);
    assert_eq!(b.ones(), 5 + 70 + 1);
    b.clear(163, 64);
    assert_eq!(b.next_run(160), Some(r(160, 3)));
    assert_eq!(b.next_run(163), Some(r(227, 3)));
    assert!(b.get(100) && !b.get(99) && !b.get(105) && b.get(299) && !b.get(300));
    b.set_all();
    assert_eq!(b.ones(), 200);
    assert_eq!(b.next_run(0), Some(r(100, 200)));
    assert_eq!(bitmap::bytes_for(1 << 18), 32 << 10, "1 GiB takes 32 KiB");
}

#[test]
fn split_gives_the_parts_other_ranges_cover_and_do_not() {
    let (un, cov) = split(
        r(10, 30),
        [r(0, 12), r(15, 5), r(18, 4), r(35, 100)].into_iter(),
    );
    assert_eq!(un, vec![r(12, 3), r(22, 13)]);
    assert_eq!(cov, vec![r(10, 2), r(15, 7), r(35, 5)]);
    let (un, cov) = split(r(10, 30), [r(50, 10)].into_iter());
    assert_eq!((un, cov), (vec![r(10, 30)], vec![]));
}

proptest! {
    /// The bitmap against a set of gfns.
    #[test]
    fn bitmap_matches_a_set(base in 0u64..100, count in 1u64..300, ops in proptest::collection::vec((any::<bool>(), 0u64..450, 0u64..80), 0..40)) {
        let mut b = Bitmap::new(r(base, count)).expect("room");
        let mut s = BTreeSet::new();
        for (on, gfn, n) in ops {
            let inside = (gfn..gfn + n).filter(|g| (base..base + count).contains(g));
            if on {
                b.set(gfn, n);
                s.extend(inside);
            } else {
                b.clear(gfn, n);
                for g in inside {
                    s.remove(&g);
                }
            }
        }
        prop_assert_eq!(b.ones(), s.len() as u64);
        let mut got = BTreeSet::new();
        let mut at = 0;
        while let Some(run) = b.next_run(at) {
            prop_assert!(run.count > 0);
            prop_assert!(!s.contains(&(run.gfn + run.count)), "runs are maximal");
            got.extend(run.gfn..run.gfn + run.count);
            at = run.gfn + run.count;
        }
        prop_assert_eq!(got, s);
    }
}

// ---- starting ----

#[test]
fn start_refuses_a_domain_that_is_not_alive() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    assert_eq!(
        start(&mut ld, &mut f, A, 9, 0, None, DirtyMode::Auto),
        LdReply::Error(LdError::NoSuchDomain)
    );
    for state in 3..=5 {
        f.dom_mut(D).state = state;
        assert_eq!(
            start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto),
            LdReply::Error(LdError::NoSuchDomain),
            "state {state}"
        );
    }
    assert!(f.dom(D).is_clean());
}

#[test]
fn start_refuses_empty_wrapping_and_too_long_ranges() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    let bad = LdReply::Error(LdError::BadRange { pages: RAM });
    for range in [r(5, 0), r(u64::MAX, 2), r(RAM - 1, 2), r(RAM, 1)] {
        assert_eq!(
            start(&mut ld, &mut f, A, D, 0, Some(range), DirtyMode::Auto),
            bad,
            "{range:?}"
        );
    }
    f.dom_mut(E).ram = 0;
    assert_eq!(
        start(&mut ld, &mut f, A, E, 0, None, DirtyMode::Auto),
        LdReply::Error(LdError::BadRange { pages: 0 })
    );
    assert_eq!(
        start(
            &mut ld,
            &mut f,
            A,
            D,
            0,
            Some(r(RAM - 1, 1)),
            DirtyMode::Auto
        ),
        started(PML, r(RAM - 1, 1))
    );
    assert_eq!(
        start(&mut ld, &mut f, A, D, 1, None, DirtyMode::Auto),
        started(PML, r(0, RAM)),
        "None is all of its RAM"
    );
}

#[test]
fn auto_is_pml_where_the_cpu_has_it_and_write_protection_elsewhere() {
    // LD-2.
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto),
        started(PML, r(0, RAM))
    );
    let mut f = Fake::new(false);
    let mut ld = LogDirty::default();
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto),
        started(WP, r(0, RAM))
    );
    assert!(!f.calls.contains(&Call::PmlStart(D)));
}

#[test]
fn pml_without_the_cpu_feature_is_refused() {
    let mut f = Fake::new(false);
    let mut ld = LogDirty::default();
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml),
        LdReply::Error(LdError::PmlUnsupported)
    );
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::WriteProtect),
        started(WP, r(0, RAM))
    );
}

#[test]
fn overlapping_logs_on_other_mechanisms_conflict() {
    // LD-4/LD-5: one gfn is kept by one mechanism.
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(100, 50)), DirtyMode::Pml);
    assert_eq!(
        start(
            &mut ld,
            &mut f,
            B,
            D,
            0,
            Some(r(149, 10)),
            DirtyMode::WriteProtect
        ),
        LdReply::Error(LdError::ModeConflict { held: PML })
    );
    assert_eq!(
        start(
            &mut ld,
            &mut f,
            B,
            D,
            0,
            Some(r(150, 10)),
            DirtyMode::WriteProtect
        ),
        started(WP, r(150, 10)),
        "next to it is no conflict"
    );
    assert_eq!(
        start(&mut ld, &mut f, C, D, 0, None, DirtyMode::Auto),
        LdReply::Error(LdError::ModeConflict { held: WP })
    );
    assert_eq!(
        start(&mut ld, &mut f, C, E, 0, None, DirtyMode::WriteProtect),
        started(WP, r(0, RAM)),
        "another domain is no conflict"
    );
}

#[test]
fn the_same_log_twice_is_already_logging() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 7, None, DirtyMode::Auto);
    assert_eq!(
        start(&mut ld, &mut f, A, D, 7, Some(r(0, 1)), DirtyMode::Auto),
        LdReply::Error(LdError::AlreadyLogging)
    );
    assert_eq!(
        start(&mut ld, &mut f, B, D, 7, None, DirtyMode::Auto),
        started(PML, r(0, RAM)),
        "the same number is another client's own"
    );
    assert_eq!(
        start(&mut ld, &mut f, A, D, 8, None, DirtyMode::Auto),
        started(PML, r(0, RAM))
    );
}

#[test]
fn a_domain_keeps_at_most_eight_logs() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    for i in 0..MAX_LOGS {
        let client = [A, B][i as usize % 2];
        assert_eq!(
            start(&mut ld, &mut f, client, D, i, None, DirtyMode::Auto),
            started(PML, r(0, RAM))
        );
    }
    assert_eq!(
        start(&mut ld, &mut f, C, D, 0, Some(r(0, 1)), DirtyMode::Auto),
        LdReply::Error(LdError::TooManyLogs { limit: 8 })
    );
    assert_eq!(
        start(&mut ld, &mut f, C, E, 0, None, DirtyMode::Auto),
        started(PML, r(0, RAM)),
        "per domain"
    );
    stop(&mut ld, &mut f, A, D, 0);
    assert_eq!(
        start(&mut ld, &mut f, C, D, 0, None, DirtyMode::Auto),
        started(PML, r(0, RAM))
    );
}

#[test]
fn a_bitmap_without_room_is_out_of_memory_and_nothing_is_asked() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    f.room = false;
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto),
        LdReply::Error(LdError::OutOfMemory)
    );
    assert_eq!(f.calls, vec![Call::DomainInfo(D)]);
    assert!(ld.logs(D).is_empty());
}

#[test]
fn start_drains_then_turns_the_kernel_on_then_arms() {
    // LD-1: what the sources hold belongs to the logs there are; PML logs
    // before altp2m clears the dirty bits.
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(0, 100)), DirtyMode::Pml);
    assert_eq!(
        f.calls,
        vec![
            Call::DomainInfo(D),
            Call::WritesLog(D, true),
            Call::PmlStart(D),
            Call::Track(D, r(0, 100), Some(PML)),
        ]
    );
    f.calls.clear();
    // A second log: drained first, no kernel change, the covered part's
    // dirty bits cleared (Rearm), the rest armed.
    start(&mut ld, &mut f, B, D, 0, Some(r(50, 100)), DirtyMode::Pml);
    assert_eq!(
        f.calls,
        vec![
            Call::DomainInfo(D),
            Call::PmlTake(D),
            Call::DomainWrites(D),
            Call::DirtyTake(D, 0),
            Call::Track(D, r(100, 50), Some(PML)),
            Call::Rearm(D, vec![r(50, 50)]),
        ]
    );
    f.calls.clear();
    // Write-protection over what is armed already is left as it is.
    start(
        &mut ld,
        &mut f,
        C,
        E,
        0,
        Some(r(0, 10)),
        DirtyMode::WriteProtect,
    );
    f.calls.clear();
    start(
        &mut ld,
        &mut f,
        A,
        E,
        1,
        Some(r(5, 10)),
        DirtyMode::WriteProtect,
    );
    assert_eq!(
        f.calls[f.calls.len() - 1..],
        [Call::Track(E, r(10, 5), Some(WP))]
    );
    assert!(!f.calls.iter().any(|c| matches!(c, Call::Rearm(..))));
}

#[test]
fn a_new_log_starts_empty_while_the_others_keep_theirs() {
    for mode in [DirtyMode::Pml, DirtyMode::WriteProtect] {
        let mut f = Fake::new(true);
        let mut ld = LogDirty::default();
        start(&mut ld, &mut f, A, D, 0, None, mode);
        for g in [3, 4, 9] {
            f.guest(&mut ld, D, g);
        }
        f.kernel_write(D, 20, 2);
        start(&mut ld, &mut f, B, D, 0, None, mode);
        assert_eq!(all(&mut ld, &mut f, B, D, 0), set([]), "{mode:?}");
        assert_eq!(all(&mut ld, &mut f, A, D, 0), set([3, 4, 9, 20, 21]));
        f.guest(&mut ld, D, 9);
        f.guest(&mut ld, D, 10);
        assert_eq!(all(&mut ld, &mut f, B, D, 0), set([9, 10]), "{mode:?}");
    }
}

// ---- reading ----

#[test]
fn read_returns_maximal_runs_lowest_first_eight_at_a_time() {
    let mut f = Fake::new(false);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto);
    // Ten runs: 10..12, 20..22, ..., 100..102.
    for i in 1..=10 {
        f.guest(&mut ld, D, i * 10);
        f.guest(&mut ld, D, i * 10 + 1);
    }
    let runs: Vec<GfnRange> = (1..=8).map(|i| r(i * 10, 2)).collect();
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, false),
        dirty(&runs, Some(82))
    );
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 82, false),
        dirty(&[r(90, 2), r(100, 2)], None)
    );
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 91, false),
        dirty(&[r(91, 1), r(100, 2)], None),
        "from inside a run"
    );
    assert_eq!(read(&mut ld, &mut f, A, D, 0, 102, false), dirty(&[], None));
    // Exactly eight runs: nothing after them.
    f.guest(&mut ld, D, 91);
    read(&mut ld, &mut f, A, D, 0, 95, true);
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, false),
        dirty(
            &[
                r(10, 2),
                r(20, 2),
                r(30, 2),
                r(40, 2),
                r(50, 2),
                r(60, 2),
                r(70, 2),
                r(80, 2)
            ],
            Some(82)
        )
    );
    read(&mut ld, &mut f, A, D, 0, 85, true);
    assert_eq!(read(&mut ld, &mut f, A, D, 0, 0, false), dirty(&runs, None));
}

#[test]
fn peek_keeps_and_clear_clears_the_readers_log_only() {
    // LD-1: a read by one client never takes bits from another's log.
    for mode in [DirtyMode::Pml, DirtyMode::WriteProtect] {
        let mut f = Fake::new(true);
        let mut ld = LogDirty::default();
        start(&mut ld, &mut f, A, D, 0, None, mode);
        start(&mut ld, &mut f, B, D, 0, Some(r(0, 100)), mode);
        for g in [1, 2, 50, 150] {
            f.guest(&mut ld, D, g);
        }
        let both = dirty(&[r(1, 2), r(50, 1)], None);
        assert_eq!(
            read(&mut ld, &mut f, A, D, 0, 0, false),
            dirty(&[r(1, 2), r(50, 1), r(150, 1)], None)
        );
        assert_eq!(read(&mut ld, &mut f, B, D, 0, 0, false), both);
        assert_eq!(
            read(&mut ld, &mut f, B, D, 0, 0, false),
            both,
            "a peek keeps"
        );
        assert_eq!(read(&mut ld, &mut f, B, D, 0, 0, true), both);
        assert_eq!(
            read(&mut ld, &mut f, B, D, 0, 0, false),
            dirty(&[], None),
            "{mode:?}"
        );
        assert_eq!(
            read(&mut ld, &mut f, A, D, 0, 0, false),
            dirty(&[r(1, 2), r(50, 1), r(150, 1)], None),
            "the other client still sees everything ({mode:?})"
        );
        // The next write to a cleared page is logged again, for both.
        f.guest(&mut ld, D, 2);
        assert_eq!(
            read(&mut ld, &mut f, B, D, 0, 0, false),
            dirty(&[r(2, 1)], None),
            "{mode:?}"
        );
        assert_eq!(all(&mut ld, &mut f, A, D, 0), set([1, 2, 50, 150]));
    }
}

#[test]
fn a_clear_of_a_pml_log_rearms_its_ranges_and_of_a_wp_log_does_not() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(0, 100)), DirtyMode::Pml);
    start(
        &mut ld,
        &mut f,
        A,
        D,
        1,
        Some(r(100, 100)),
        DirtyMode::WriteProtect,
    );
    for g in [5, 6, 8, 105] {
        f.guest(&mut ld, D, g);
    }
    f.calls.clear();
    read(&mut ld, &mut f, A, D, 0, 0, true);
    assert_eq!(
        f.calls.last(),
        Some(&Call::Rearm(D, vec![r(5, 2), r(8, 1)]))
    );
    f.calls.clear();
    read(&mut ld, &mut f, A, D, 1, 0, true);
    assert!(!f.calls.iter().any(|c| matches!(c, Call::Rearm(..))));
    f.calls.clear();
    read(&mut ld, &mut f, A, D, 0, 0, true);
    assert!(
        !f.calls.iter().any(|c| matches!(c, Call::Rearm(..))),
        "nothing to clear, nothing to rearm"
    );
}

#[test]
fn a_refused_rearm_clears_nothing() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    f.guest(&mut ld, D, 7);
    f.fail.insert("rearm");
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, true),
        LdReply::Error(LdError::Altp2m)
    );
    f.fail.clear();
    assert_eq!(all(&mut ld, &mut f, A, D, 0), set([7]));
}

#[test]
fn reads_and_status_of_a_log_not_running_are_not_logging() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    let no = LdReply::Error(LdError::NotLogging);
    assert_eq!(read(&mut ld, &mut f, A, D, 0, 0, false), no);
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto);
    assert_eq!(
        read(&mut ld, &mut f, B, D, 0, 0, false),
        no,
        "another client's"
    );
    assert_eq!(
        read(&mut ld, &mut f, A, D, 1, 0, false),
        no,
        "another number"
    );
    assert_eq!(
        read(&mut ld, &mut f, A, E, 0, 0, false),
        no,
        "another domain"
    );
    assert_eq!(
        ld.request(&mut f, A, &LdRequest::Status { domain: D, log: 1 }),
        no
    );
    assert_eq!(stop(&mut ld, &mut f, A, D, 0), LdReply::Done);
    assert_eq!(stop(&mut ld, &mut f, A, D, 0), no, "stopped twice");
    assert_eq!(read(&mut ld, &mut f, A, D, 0, 0, false), no);
}

/// A read, status or stop naming a domain that is not there (or has
/// ended, its logs gone with it) is refused as `NoSuchDomain`, not as a log
/// not running: the careless id is named.
#[test]
fn reads_status_and_stops_of_a_domain_not_there_are_no_such_domain() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    let gone = LdReply::Error(LdError::NoSuchDomain);
    assert_eq!(read(&mut ld, &mut f, A, 9, 0, 0, false), gone);
    assert_eq!(read(&mut ld, &mut f, A, 9, 0, 0, true), gone);
    assert_eq!(
        ld.request(&mut f, A, &LdRequest::Status { domain: 9, log: 0 }),
        gone
    );
    assert_eq!(stop(&mut ld, &mut f, A, 9, 0), gone);
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto);
    f.dom_mut(D).state = 3;
    assert_eq!(
        ld.request(&mut f, A, &LdRequest::Status { domain: D, log: 1 }),
        gone,
        "an ended domain"
    );
}

#[test]
fn status_says_the_mechanism_range_and_dirty_pages_after_a_drain() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(
        &mut ld,
        &mut f,
        A,
        D,
        0,
        Some(r(10, 20)),
        DirtyMode::WriteProtect,
    );
    for g in [9, 10, 11, 29, 30] {
        f.guest(&mut ld, D, g);
    }
    f.kernel_write(D, 25, 10);
    assert_eq!(
        ld.request(&mut f, A, &LdRequest::Status { domain: D, log: 0 }),
        LdReply::Status {
            mechanism: WP,
            range: r(10, 20),
            dirty: 2 + 5
        }
    );
}

// ---- the sources ----

#[test]
fn pml_entries_are_read_from_the_top_of_the_buffer_only() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    for g in [300, 301, 700] {
        f.guest(&mut ld, D, g);
    }
    // The slots below the three entries hold stale GPAs (the fake's).
    assert_eq!(all(&mut ld, &mut f, A, D, 0), set([300, 301, 700]));
    // Once logged, a page is logged again only after a clear.
    f.guest(&mut ld, D, 300);
    assert_eq!(f.dom(D).bufs.iter().map(Vec::len).sum::<usize>(), 0);
}

#[test]
fn full_pml_buffers_are_drained_from_their_exit() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    let mut fulls = 0;
    for g in 0..1100 {
        f.write(D, g);
        if f.dom(D).full.is_some() {
            fulls += 1;
            f.deliver(&mut ld, D);
        }
    }
    assert_eq!(fulls, 2);
    assert_eq!(
        ld.log(A, D, 0).map(|l| l.dirty()),
        Some(1024),
        "before any take"
    );
    assert_eq!(all(&mut ld, &mut f, A, D, 0), (0..1100).collect());
}

#[test]
fn the_kernels_writes_are_drained_and_an_overflow_dirties_every_log() {
    // LD-1: never lose silently.
    let mut f = Fake::new(false);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(0, 100)), DirtyMode::Auto);
    start(&mut ld, &mut f, B, D, 0, Some(r(200, 10)), DirtyMode::Auto);
    // More pairs than one call takes.
    for i in 0..(WRITES_BATCH as u64 * 2 + 3) {
        f.kernel_write(D, i, 1);
    }
    f.kernel_write(D, 95, 110);
    assert_eq!(
        all(&mut ld, &mut f, A, D, 0),
        (0..67).chain(95..100).collect()
    );
    assert_eq!(all(&mut ld, &mut f, B, D, 0), (200..205).collect());
    read(&mut ld, &mut f, A, D, 0, 0, true);
    read(&mut ld, &mut f, B, D, 0, 0, true);
    f.dom_mut(D).record_cap = 1;
    f.kernel_write(D, 1, 1);
    f.kernel_write(D, 2, 1);
    assert_eq!(all(&mut ld, &mut f, A, D, 0), (0..100).collect());
    assert_eq!(all(&mut ld, &mut f, B, D, 0), (200..210).collect());
}

#[test]
fn write_protection_faults_are_taken_from_altp2m_across_replies() {
    let mut f = Fake::new(false);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Auto);
    let written: BTreeSet<u64> = (0..30).map(|i| i * 3).collect();
    for &g in &written {
        f.guest(&mut ld, D, g);
    }
    f.calls.clear();
    // One drain takes them all: 30 single pages in four replies of eight.
    assert_eq!(
        ld.request(&mut f, A, &LdRequest::Status { domain: D, log: 0 }),
        LdReply::Status {
            mechanism: WP,
            range: r(0, RAM),
            dirty: 30
        }
    );
    let takes: Vec<Call> = f
        .calls
        .iter()
        .filter(|c| matches!(c, Call::DirtyTake(..)))
        .cloned()
        .collect();
    assert_eq!(
        takes,
        [
            Call::DirtyTake(D, 0),
            Call::DirtyTake(D, 24),
            Call::DirtyTake(D, 48),
            Call::DirtyTake(D, 72)
        ]
    );
    assert_eq!(all(&mut ld, &mut f, A, D, 0), written);
    assert!(f.dom(D).dirtied.is_empty() && f.dom(D).protected.iter().all(|&p| p));
}

#[test]
fn gfns_outside_every_log_are_dropped() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(10, 10)), DirtyMode::Pml);
    for g in [5, 15, 25] {
        f.guest(&mut ld, D, g);
    }
    f.kernel_write(D, 0, 12);
    assert_eq!(all(&mut ld, &mut f, A, D, 0), set([10, 11, 15]));
}

#[test]
fn a_failed_drain_is_the_answer() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    f.guest(&mut ld, D, 4);
    f.fail.insert("dirty_take");
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, false),
        LdReply::Error(LdError::Altp2m)
    );
    assert_eq!(
        start(&mut ld, &mut f, B, D, 0, None, DirtyMode::Pml),
        LdReply::Error(LdError::Altp2m),
        "a start drains first"
    );
    f.fail.clear();
    f.fail.insert("pml_take");
    assert_eq!(
        ld.request(&mut f, A, &LdRequest::Status { domain: D, log: 0 }),
        LdReply::Error(LdError::Kernel)
    );
    f.fail.clear();
    assert_eq!(
        all(&mut ld, &mut f, A, D, 0),
        set([4]),
        "what was drained stays"
    );
}

// ---- undoing a failed start ----

#[test]
fn a_start_altp2m_refuses_is_undone() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    f.fail.insert("track");
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml),
        LdReply::Error(LdError::Altp2m)
    );
    assert!(f.dom(D).is_clean(), "PML and the write record off again");
    assert!(ld.logs(D).is_empty());
    f.fail.clear();
    // A later part refused: the parts armed before are disarmed.
    start(
        &mut ld,
        &mut f,
        A,
        D,
        0,
        Some(r(10, 10)),
        DirtyMode::WriteProtect,
    );
    // The second of two parts refused: the first is disarmed again.
    f.countdown.insert("track", 1);
    assert_eq!(
        start(
            &mut ld,
            &mut f,
            B,
            D,
            0,
            Some(r(0, 30)),
            DirtyMode::WriteProtect
        ),
        LdReply::Error(LdError::Altp2m)
    );
    assert_eq!(
        f.calls[f.calls.len() - 3..],
        [
            Call::Track(D, r(0, 10), Some(WP)),
            Call::Track(D, r(20, 10), Some(WP)),
            Call::Track(D, r(0, 10), None),
        ]
    );
    assert_eq!(ld.logs(D).len(), 1);
    assert!(f.dom(D).track[20..30].iter().all(Option::is_none));
    assert!(f.dom(D).track[..10].iter().all(Option::is_none));
    assert!(
        f.dom(D).track[10..20].iter().all(|t| *t == Some(WP)),
        "the other log's stay"
    );
    assert!(f.dom(D).writes, "the other log's write record stays");
}

#[test]
fn a_start_the_kernel_refuses_is_undone() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    f.fail.insert("writes_log");
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml),
        LdReply::Error(LdError::Kernel)
    );
    assert!(f.dom(D).is_clean());
    f.fail.clear();
    f.fail.insert("pml_start");
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml),
        LdReply::Error(LdError::Kernel)
    );
    assert!(f.dom(D).is_clean(), "the write record off again");
    assert!(ld.logs(D).is_empty());
    assert_eq!(
        start(&mut ld, &mut f, A, D, 0, None, DirtyMode::WriteProtect),
        started(WP, r(0, RAM)),
        "write-protection needs no PML"
    );
}

// ---- stopping ----

#[test]
fn stop_disarms_what_no_other_log_holds_and_turns_the_kernel_off_last() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(0, 100)), DirtyMode::Pml);
    start(&mut ld, &mut f, B, D, 0, Some(r(50, 100)), DirtyMode::Pml);
    start(
        &mut ld,
        &mut f,
        C,
        D,
        0,
        Some(r(500, 10)),
        DirtyMode::WriteProtect,
    );
    f.calls.clear();
    assert_eq!(stop(&mut ld, &mut f, B, D, 0), LdReply::Done);
    assert_eq!(
        f.calls,
        vec![
            Call::PmlTake(D),
            Call::DomainWrites(D),
            Call::DirtyTake(D, 0),
            Call::Track(D, r(100, 50), None),
        ]
    );
    assert!(f.dom(D).track[..100].iter().all(|t| *t == Some(PML)));
    f.calls.clear();
    stop(&mut ld, &mut f, A, D, 0);
    assert_eq!(
        f.calls[f.calls.len() - 2..],
        [Call::Track(D, r(0, 100), None), Call::PmlStop(D)]
    );
    assert!(f.dom(D).writes && !f.dom(D).pml);
    f.calls.clear();
    stop(&mut ld, &mut f, C, D, 0);
    assert_eq!(
        f.calls,
        vec![
            Call::DomainWrites(D),
            Call::DirtyTake(D, 0),
            Call::Track(D, r(500, 10), None),
            Call::WritesLog(D, false),
        ]
    );
    assert!(f.dom(D).is_clean());
    assert_eq!(ld.controls(D), (false, false));
}

#[test]
fn a_stop_is_done_even_where_altp2m_is_gone() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    f.fail.extend(["dirty_take", "untrack"]);
    assert_eq!(stop(&mut ld, &mut f, A, D, 0), LdReply::Done);
    assert!(ld.logs(D).is_empty());
    assert!(!f.dom(D).pml && !f.dom(D).writes);
}

// ---- clients, domains, restarts ----

#[test]
fn a_client_gone_loses_its_logs_and_no_other() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, Some(r(0, 10)), DirtyMode::Pml);
    start(&mut ld, &mut f, A, D, 1, Some(r(20, 10)), DirtyMode::Pml);
    start(&mut ld, &mut f, A, E, 0, None, DirtyMode::WriteProtect);
    start(&mut ld, &mut f, B, D, 0, Some(r(5, 10)), DirtyMode::Pml);
    f.guest(&mut ld, D, 6);
    let mut gone = ld.client_gone(&mut f, A);
    gone.sort_unstable();
    assert_eq!(gone, vec![(D, 0, 1), (D, 1, 0), (E, 0, 0)]);
    assert_eq!(ld.logs(D).len(), 1);
    assert!(f.dom(E).is_clean());
    assert!(f.dom(D).track[..5].iter().all(Option::is_none));
    assert!(f.dom(D).track[5..15].iter().all(|t| *t == Some(PML)));
    assert!(f.dom(D).track[20..30].iter().all(Option::is_none));
    assert_eq!(all(&mut ld, &mut f, B, D, 0), set([6]));
    assert!(ld.client_gone(&mut f, A).is_empty());
}

#[test]
fn an_ended_domain_is_forgotten_without_a_call() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    start(&mut ld, &mut f, B, D, 0, None, DirtyMode::Pml);
    f.calls.clear();
    assert_eq!(ld.forget_domain(D), 2);
    assert!(f.calls.is_empty());
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, false),
        LdReply::Error(LdError::NotLogging)
    );
    assert_eq!(ld.forget_domain(D), 0);
}

#[test]
fn a_new_domain_given_an_ended_ones_id_inherits_none_of_its_logs() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    start(&mut ld, &mut f, A, E, 0, None, DirtyMode::Pml);
    f.guest(&mut ld, D, 5);
    // D destroyed and its id given to a new domain before the end was
    // heard (the supervisor has no word of it yet, or never: a fork
    // destroyed on request).
    f.doms.insert(D, Dom::new(RAM));
    f.guest(&mut ld, D, 6);
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, false),
        LdReply::Error(LdError::NotLogging),
        "the old log is not read from the new domain"
    );
    assert_eq!(ld.logs(D), &[]);
    assert_eq!(all(&mut ld, &mut f, A, E, 0), set([]), "E's log stays");
    // A log of the new domain, then the old domain's end heard: it stays.
    start(&mut ld, &mut f, B, D, 0, None, DirtyMode::Pml);
    f.guest(&mut ld, D, 7);
    assert_eq!(ld.domain_ended(&mut f, D), 0);
    assert_eq!(all(&mut ld, &mut f, B, D, 0), set([7]));
    // The new domain's own end: its log goes; a domain gone goes at the
    // next request.
    f.dom_mut(D).state = 4;
    assert_eq!(ld.domain_ended(&mut f, D), 1);
    f.doms.remove(&E);
    assert_eq!(
        read(&mut ld, &mut f, B, D, 0, 0, false),
        LdReply::Error(LdError::NoSuchDomain),
        "D has ended: named as such"
    );
    assert_eq!(ld.logs(E), &[]);
    // An end heard of a domain that is still the one logged, and live,
    // leaves its logs.
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    assert_eq!(
        ld.domain_ended(&mut f, D),
        0,
        "a live domain of the same birth keeps its logs"
    );
}

#[test]
fn a_restarted_instance_cleans_every_live_domain() {
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    // What a predecessor left.
    start(&mut ld, &mut f, A, D, 0, Some(r(0, 10)), DirtyMode::Pml);
    start(&mut ld, &mut f, A, E, 0, None, DirtyMode::WriteProtect);
    f.dom_mut(E).state = 4;
    f.doms.insert(3, Dom::new(0));
    let mut ld = LogDirty::default();
    f.calls.clear();
    assert_eq!(ld.clean_slate(&mut f), 2);
    assert!(f.dom(D).is_clean());
    assert!(
        !f.calls.contains(&Call::Track(E, r(0, RAM), None)),
        "a crashed domain is left alone"
    );
    assert!(f.calls.contains(&Call::Track(D, r(0, RAM), None)));
    assert!(f.calls.contains(&Call::WritesLog(3, false)));
    assert!(
        !f.calls.iter().any(|c| matches!(c, Call::Track(3, ..))),
        "no RAM, nothing to disarm"
    );
    assert_eq!(
        read(&mut ld, &mut f, A, D, 0, 0, false),
        LdReply::Error(LdError::NotLogging)
    );
}

#[test]
fn an_altp2m_restart_rearms_every_log_and_dirties_it() {
    // LD-1: the new instance knows nothing of what was written.
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    start(
        &mut ld,
        &mut f,
        A,
        D,
        0,
        Some(r(0, 10)),
        DirtyMode::WriteProtect,
    );
    start(&mut ld, &mut f, B, E, 0, Some(r(0, 20)), DirtyMode::Pml);
    f.guest(&mut ld, D, 3);
    f.restart_altp2m();
    assert_eq!(all(&mut ld, &mut f, A, D, 0), (0..10).collect());
    assert_eq!(all(&mut ld, &mut f, B, E, 0), (0..20).collect());
    assert!(f.dom(D).track[..10].iter().all(|t| *t == Some(WP)));
    assert!(f.dom(D).protected[..10].iter().all(|&p| p));
    assert!(f.dom(E).track[..20].iter().all(|t| *t == Some(PML)));
    read(&mut ld, &mut f, A, D, 0, 0, true);
    f.guest(&mut ld, D, 4);
    assert_eq!(all(&mut ld, &mut f, A, D, 0), set([4]));
}

#[test]
fn a_write_while_an_overlapping_log_starts_or_stops_is_not_lost() {
    // LD-1 with the guest running while the service works: after the
    // drain, a write lifts a protection and altp2m marks it; arming the
    // range again would drop that mark.
    for (at, op) in [(4, "start"), (3, "stop")] {
        let mut f = Fake::new(false);
        let mut ld = LogDirty::default();
        start(
            &mut ld,
            &mut f,
            A,
            D,
            0,
            Some(r(0, 100)),
            DirtyMode::WriteProtect,
        );
        start(
            &mut ld,
            &mut f,
            C,
            D,
            0,
            Some(r(40, 100)),
            DirtyMode::WriteProtect,
        );
        f.ticks = 0;
        f.script.push_back((at, D, 50));
        if op == "start" {
            // domain_info, domain_writes, dirty_take, then the write, then
            // the arming of 140..160 (40..140 is armed already).
            start(
                &mut ld,
                &mut f,
                B,
                D,
                0,
                Some(r(40, 120)),
                DirtyMode::WriteProtect,
            );
        } else {
            // domain_writes, dirty_take, then the write.
            stop(&mut ld, &mut f, C, D, 0);
        }
        assert_eq!(f.raced, vec![(D, 50)], "{op}");
        assert_eq!(all(&mut ld, &mut f, A, D, 0), set([50]), "{op}");
    }
    // PML: on before the dirty bits are cleared, so that a write while
    // the first log starts does not leave a dirty bit set unlogged.
    let mut f = Fake::new(true);
    let mut ld = LogDirty::default();
    f.script.push_back((3, D, 7)); // after the write record, before PML
    start(&mut ld, &mut f, A, D, 0, None, DirtyMode::Pml);
    assert_eq!(f.raced, vec![(D, 7)]);
    f.guest(&mut ld, D, 7);
    assert_eq!(all(&mut ld, &mut f, A, D, 0), set([7]));
}

// ---- property tests against a reference model ----

/// A request or a guest's doing.
#[derive(Clone, Debug)]
enum Op {
    Start {
        client: u64,
        log: u32,
        range: Option<GfnRange>,
        mode: DirtyMode,
    },
    Read {
        client: u64,
        log: u32,
        from: u64,
        clear: bool,
    },
    Stop {
        client: u64,
        log: u32,
    },
    Status {
        client: u64,
        log: u32,
    },
    /// Guest writes to `count` pages from `gfn`.
    Write {
        gfn: u64,
        count: u64,
    },
    /// The kernel writes pages for a service.
    KernelWrite {
        gfn: u64,
        pages: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let client = 1u64..=3;
    let log = 0u32..3;
    let range = prop_oneof![
        1 => Just(None),
        6 => (0u64..RAM, 1u64..RAM / 2).prop_map(|(g, n)| Some(r(g, n))),
        1 => (0u64..RAM + 5, 0u64..20).prop_map(|(g, n)| Some(r(g, n))),
    ];
    let mode = prop_oneof![
        Just(DirtyMode::Auto),
        Just(DirtyMode::Pml),
        Just(DirtyMode::WriteProtect)
    ];
    prop_oneof![
        3 => (client.clone(), log.clone(), range, mode)
            .prop_map(|(client, log, range, mode)| Op::Start { client, log, range, mode }),
        4 => (client.clone(), log.clone(), prop_oneof![3 => Just(0u64), 1 => 0u64..RAM], any::<bool>())
            .prop_map(|(client, log, from, clear)| Op::Read { client, log, from, clear }),
        1 => (client.clone(), log.clone()).prop_map(|(client, log)| Op::Stop { client, log }),
        1 => (client, log).prop_map(|(client, log)| Op::Status { client, log }),
        6 => (0u64..RAM, prop_oneof![4 => 1u64..4, 1 => 1u64..600])
            .prop_map(|(gfn, count)| Op::Write { gfn, count }),
        1 => (0u64..RAM, 1u64..8).prop_map(|(gfn, pages)| Op::KernelWrite { gfn, pages }),
    ]
}

/// One log as the reference keeps it: the gfns of its range written since
/// its start or their last clear (`must`), and those that may be set
/// because a write raced the request that started or cleared it (`may`,
/// which holds `must`).
#[derive(Clone, Debug)]
struct RefLog {
    range: GfnRange,
    mechanism: Mechanism,
    must: BTreeSet<u64>,
    may: BTreeSet<u64>,
}

impl RefLog {
    fn holds(&self, g: u64) -> bool {
        (self.range.gfn..self.range.gfn + self.range.count).contains(&g)
    }
}

/// Domain `D`'s logs by (client, log).
#[derive(Default, Debug)]
struct Reference {
    logs: BTreeMap<(u64, u32), RefLog>,
}

impl Reference {
    fn written(&mut self, g: u64) {
        for l in self.logs.values_mut() {
            if l.holds(g) {
                l.must.insert(g);
                l.may.insert(g);
            }
        }
    }

    fn start(
        &self,
        pml: bool,
        client: u64,
        log: u32,
        range: Option<GfnRange>,
        mode: DirtyMode,
    ) -> Result<(Mechanism, GfnRange), LdError> {
        let range = range.unwrap_or(r(0, RAM));
        if range.count == 0 || range.end().is_none_or(|e| e > RAM) {
            return Err(LdError::BadRange { pages: RAM });
        }
        let mechanism = match mode {
            DirtyMode::Auto if pml => PML,
            DirtyMode::Auto | DirtyMode::WriteProtect => WP,
            DirtyMode::Pml if pml => PML,
            DirtyMode::Pml => return Err(LdError::PmlUnsupported),
        };
        if self.logs.contains_key(&(client, log)) {
            return Err(LdError::AlreadyLogging);
        }
        if self.logs.len() >= MAX_LOGS as usize {
            return Err(LdError::TooManyLogs { limit: MAX_LOGS });
        }
        let end = range.gfn + range.count;
        if let Some(l) = self.logs.values().find(|l| {
            l.mechanism != mechanism && l.range.gfn < end && range.gfn < l.range.gfn + l.range.count
        }) {
            return Err(LdError::ModeConflict { held: l.mechanism });
        }
        Ok((mechanism, range))
    }
}

/// The maximal runs of `gfns` at or after `from`: the first eight, and
/// where more begin.
fn runs(gfns: &BTreeSet<u64>, from: u64) -> (Vec<GfnRange>, Option<u64>) {
    let mut out: Vec<GfnRange> = Vec::new();
    for &g in gfns.range(from..) {
        let full = out.len() == RANGES_PER_REPLY;
        match out.last_mut() {
            Some(last) if last.gfn + last.count == g => last.count += 1,
            Some(last) if full => {
                let end = last.gfn + last.count;
                return (out, Some(end));
            }
            _ => out.push(r(g, 1)),
        }
    }
    (out, None)
}

/// The service, the fake and the reference after every step: the fake's
/// arming and the kernel's controls are what the logs need, no more.
fn check_arming(ld: &LogDirty, f: &Fake, reference: &Reference) -> Result<(), TestCaseError> {
    let dom = f.dom(D);
    let logs = &reference.logs;
    prop_assert_eq!(dom.pml, logs.values().any(|l| l.mechanism == PML));
    prop_assert_eq!(dom.writes, !logs.is_empty());
    prop_assert_eq!(ld.controls(D), (dom.pml, dom.writes));
    for g in 0..RAM {
        let want = logs.values().find(|l| l.holds(g)).map(|l| l.mechanism);
        prop_assert_eq!(dom.track[g as usize], want, "gfn {}", g);
    }
    prop_assert_eq!(ld.logs(D).len(), logs.len());
    Ok(())
}

/// Runs `op` on the service (with `race`: guest writes made while it
/// works, at its n-th call of the fake) and the reference, and checks the
/// answer: `exact` where no write ever raced the service.
fn run_op(
    ld: &mut LogDirty,
    f: &mut Fake,
    reference: &mut Reference,
    op: &Op,
    race: &[(usize, u64)],
    exact: bool,
) -> Result<(), TestCaseError> {
    let pml = f.features & vm_features::PML != 0;
    f.ticks = 0;
    f.script = race.iter().map(|&(at, g)| (at, D, g)).collect();
    f.raced.clear();
    let before: BTreeMap<(u64, u32), RefLog> = reference.logs.clone();
    // The log a clear read cleared, and what it returned.
    let mut cleared: Option<((u64, u32), BTreeSet<u64>)> = None;
    match *op {
        Op::Write { gfn, count } => {
            for g in gfn..(gfn + count).min(RAM) {
                f.guest(ld, D, g);
                reference.written(g);
            }
        }
        Op::KernelWrite { gfn, pages } => {
            f.kernel_write(D, gfn, pages);
            for g in gfn..(gfn + pages).min(RAM) {
                reference.written(g);
            }
        }
        Op::Start {
            client,
            log,
            range,
            mode,
        } => {
            let want = reference.start(pml, client, log, range, mode);
            let got = start(ld, f, client, D, log, range, mode);
            match want {
                Ok((mechanism, range)) => {
                    prop_assert_eq!(&got, &started(mechanism, range));
                    reference.logs.insert(
                        (client, log),
                        RefLog {
                            range,
                            mechanism,
                            must: BTreeSet::new(),
                            may: BTreeSet::new(),
                        },
                    );
                }
                Err(e) => prop_assert_eq!(&got, &LdReply::Error(e)),
            }
        }
        Op::Stop { client, log } => {
            let got = stop(ld, f, client, D, log);
            let want = match reference.logs.remove(&(client, log)) {
                Some(_) => LdReply::Done,
                None => LdReply::Error(LdError::NotLogging),
            };
            prop_assert_eq!(&got, &want);
        }
        Op::Status { client, log } => {
            let got = ld.request(f, client, &LdRequest::Status { domain: D, log });
            match reference.logs.get(&(client, log)) {
                None => prop_assert_eq!(&got, &LdReply::Error(LdError::NotLogging)),
                Some(l) => {
                    let LdReply::Status {
                        mechanism,
                        range,
                        dirty,
                    } = got
                    else {
                        return Err(TestCaseError::fail(std::format!("{got:?}")));
                    };
                    prop_assert_eq!((mechanism, range), (l.mechanism, l.range));
                    prop_assert!(
                        l.must.len() as u64 <= dirty && dirty <= (l.may.len() + race.len()) as u64
                    );
                }
            }
        }
        Op::Read {
            client,
            log,
            from,
            clear,
        } => {
            let got = read(ld, f, client, D, log, from, clear);
            if let Some(l) = reference.logs.get_mut(&(client, log)) {
                let LdReply::Dirty { ranges, next } = got else {
                    return Err(TestCaseError::fail(std::format!("{got:?}")));
                };
                let returned: BTreeSet<u64> = ranges
                    .0
                    .iter()
                    .flat_map(|x| x.gfn..x.gfn + x.count)
                    .collect();
                if exact {
                    // Exactly the gfns written in its range since its last clear.
                    let (want, want_next) = runs(&l.must, from);
                    prop_assert_eq!(ranges.0.to_vec(), want);
                    prop_assert_eq!(next, want_next);
                } else {
                    // Nothing written before the request is missing from the
                    // window it answers for; nothing never written is in it.
                    let window = |g: &u64| *g >= from && next.is_none_or(|n| *g < n);
                    let raced: BTreeSet<u64> = f.raced.iter().map(|&(_, g)| g).collect();
                    for g in l.must.iter().filter(|g| window(g)) {
                        prop_assert!(
                            returned.contains(g),
                            "gfn {} written before the read is missing",
                            g
                        );
                    }
                    for g in &returned {
                        prop_assert!(
                            l.may.contains(g) || (raced.contains(g) && l.holds(*g)),
                            "gfn {} never written",
                            g
                        );
                    }
                }
                if clear {
                    for g in &returned {
                        l.must.remove(g);
                        l.may.remove(g);
                    }
                    cleared = Some(((client, log), returned));
                }
            } else {
                prop_assert_eq!(&got, &LdReply::Error(LdError::NotLogging));
            }
        }
    }
    // The writes that raced the request: a log started now may or may
    // not have seen them, and so may the log a clear read, for what it
    // returned (the write may have come before the clear); every other log
    // must have them.
    let raced: Vec<u64> = f.raced.iter().map(|&(_, g)| g).collect();
    for (key, l) in reference.logs.iter_mut() {
        let new = !before.contains_key(key);
        for &g in &raced {
            if !l.holds(g) {
                continue;
            }
            l.may.insert(g);
            let cleared_here = cleared
                .as_ref()
                .is_some_and(|(k, gfns)| k == key && gfns.contains(&g));
            if !new && !cleared_here {
                l.must.insert(g);
            }
        }
    }
    f.script.clear();
    // A buffer that filled while the service worked is sent now. A drain
    // may have taken it already, and a clear read cleared some of it: its
    // gfns may be set again.
    if let Some((b, _)) = f.dom(D).full {
        for &gpa in &f.dom(D).snap[usize::from(b)] {
            for l in reference.logs.values_mut() {
                if l.holds(gpa >> 12) {
                    l.may.insert(gpa >> 12);
                }
            }
        }
    }
    f.deliver(ld, D);
    check_arming(ld, f, reference)
}

/// After the last step: every log read whole (exact without races), then
/// every log stopped leaves nothing armed.
fn finish(
    ld: &mut LogDirty,
    f: &mut Fake,
    reference: &mut Reference,
    exact: bool,
) -> Result<(), TestCaseError> {
    for (&(client, log), l) in &reference.logs {
        let got = all(ld, f, client, D, log);
        if exact {
            prop_assert_eq!(&got, &l.must);
        } else {
            prop_assert!(
                l.must.is_subset(&got),
                "missing {:?}",
                l.must.difference(&got).collect::<Vec<_>>()
            );
            prop_assert!(
                got.is_subset(&l.may),
                "never written {:?}",
                got.difference(&l.may).collect::<Vec<_>>()
            );
        }
    }
    for &(client, log) in reference.logs.keys() {
        prop_assert_eq!(stop(ld, f, client, D, log), LdReply::Done);
    }
    reference.logs.clear();
    prop_assert!(f.dom(D).is_clean());
    prop_assert!(ld.logs(D).is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// LD-1, LD-2: random starts, reads (peek and clear), stops and status
    /// of three clients, with guest writes through the mechanism in force
    /// and the kernel's own writes between them: every read answers
    /// exactly the gfns written in the log's range since its last clear,
    /// and one client's clears never take bits from another's log.
    #[test]
    fn every_read_matches_the_reference_after_random_operations(
        pml in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..50),
    ) {
        let mut f = Fake::new(pml);
        let mut ld = LogDirty::default();
        let mut reference = Reference::default();
        for op in &ops {
            run_op(&mut ld, &mut f, &mut reference, op, &[], true)?;
        }
        finish(&mut ld, &mut f, &mut reference, true)?;
    }

    /// LD-1 with the guest running while the service works: writes made
    /// between any two of its calls are never lost (a read misses nothing
    /// written before it began), and nothing is reported that was not
    /// written.
    #[test]
    fn no_write_is_lost_when_writes_race_the_service(
        pml in any::<bool>(),
        ops in proptest::collection::vec(
            (op(), proptest::collection::vec((1usize..12, 0u64..RAM), 0..4)),
            1..50,
        ),
    ) {
        let mut f = Fake::new(pml);
        let mut ld = LogDirty::default();
        let mut reference = Reference::default();
        for (op, race) in &ops {
            let race: Vec<(usize, u64)> = if matches!(op, Op::Write { .. } | Op::KernelWrite { .. }) {
                Vec::new()
            } else {
                let mut race = race.clone();
                race.sort_unstable();
                race
            };
            run_op(&mut ld, &mut f, &mut reference, op, &race, false)?;
        }
        finish(&mut ld, &mut f, &mut reference, false)?;
    }
}
