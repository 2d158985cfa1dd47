//! The service's records against a reference model of the kernel's shared
//! frames and of the owner's copy-on-write breaks (SH-1, SH-2, SH-4).

extern crate std;

use super::*;
use ipc_schema::altp2m::BREAKS_PER_REPLY;
use ipc_schema::ipc::BoundedVec;
use proptest::prelude::*;
use std::collections::BTreeMap as Map;
use std::vec::Vec;

const RAM: u64 = 16;
const DOMAINS: u16 = 3;

/// The kernel and the owner as the service sees them: which frame each
/// page maps (shared or not), each shared frame's references, the breaks.
#[derive(Default)]
struct Fake {
    /// Page -> shared frame id.
    backs: Map<Page, u32>,
    refs: Map<u32, u32>,
    next: u32,
    free: u64,
    breaks: Vec<CowBreak>,
    gone: Vec<u16>,
    /// Each domain's birth (absent: 1), up by one when its id is given to
    /// a new domain (`reborn`).
    births: Map<u16, u64>,
    /// Pages whose gfn a view modifies (SH-3).
    modified: Vec<Page>,
    unreachable: bool,
    /// What a page of its own holds (absent: its gfn modulo 4), and what
    /// each shared frame holds.
    own: Map<Page, u64>,
    held: Map<u32, u64>,
}

impl Fake {
    fn release(&mut self, frame: u32) -> u32 {
        let r = self.refs.get_mut(&frame).expect("a live frame");
        *r -= 1;
        let left = *r;
        if left == 0 {
            self.refs.remove(&frame);
        }
        left
    }

    fn contents(&self, page: Page) -> u64 {
        match self.backs.get(&page) {
            Some(f) => self.held[f],
            None => self.own.get(&page).copied().unwrap_or(page.gfn % 4),
        }
    }

    /// A guest write of `value` to `page` (a break first if it is shared).
    fn write_value(&mut self, page: Page, value: u64) {
        self.write(page);
        self.own.insert(page, value);
    }

    /// A guest write to `page`: a copy-on-write break if it is shared.
    fn write(&mut self, page: Page) {
        let value = self.contents(page);
        self.own.insert(page, value);
        if let Some(frame) = self.backs.remove(&page) {
            let refs = self.release(frame);
            if refs > 0 {
                self.free -= 1;
            }
            self.breaks.push(CowBreak {
                domain: page.domain,
                gfn: page.gfn,
                frame,
                refs,
            });
        }
    }

    fn destroy(&mut self, d: u16) {
        let pages: Vec<(Page, u32)> = self
            .backs
            .iter()
            .filter(|(p, _)| p.domain == d)
            .map(|(&p, &f)| (p, f))
            .collect();
        for (p, f) in pages {
            self.backs.remove(&p);
            if self.release(f) == 0 {
                self.free += 1;
            }
        }
        self.breaks.retain(|b| b.domain != d);
        self.gone.push(d);
    }

    /// Domain `d` destroyed and its id given to a new domain, before the
    /// service hears of it.
    fn reborn(&mut self, d: u16) {
        self.destroy(d);
        self.gone.retain(|&g| g != d);
        *self.births.entry(d).or_insert(1) += 1;
    }

    fn page(&self, domain: u16, gfn: u64) -> Result<Page, AltError> {
        if domain == 0 || domain > DOMAINS || self.gone.contains(&domain) {
            return Err(AltError::NoSuchDomain);
        }
        if gfn >= RAM {
            return Err(AltError::Kernel(EptOpError::NotRam));
        }
        Ok(Page { domain, gfn })
    }

    fn answer(&mut self, r: &AltRequest) -> Result<AltReply, AltError> {
        let ok = |s: &Self, frame: u32| AltReply::Shared {
            frame,
            refs: s.refs.get(&frame).copied().unwrap_or(0),
            free: s.free,
        };
        match *r {
            AltRequest::ShareNominate { domain, gfn } => {
                let page = self.page(domain, gfn)?;
                if self.modified.contains(&page) {
                    return Err(AltError::ModifiedInView { view: 1 });
                }
                if let Some(&f) = self.backs.get(&page) {
                    return Ok(ok(self, f));
                }
                self.next += 1;
                let f = self.next;
                let v = self.contents(page);
                self.held.insert(f, v);
                self.refs.insert(f, 1);
                self.backs.insert(page, f);
                Ok(ok(self, f))
            }
            AltRequest::ShareMap { domain, gfn, frame } => {
                let page = self.page(domain, gfn)?;
                if self.modified.contains(&page) {
                    return Err(AltError::ModifiedInView { view: 1 });
                }
                if !self.refs.contains_key(&frame) {
                    return Err(AltError::Kernel(EptOpError::NoSuchShare));
                }
                if self.backs.get(&page) == Some(&frame) {
                    return Err(AltError::Kernel(EptOpError::AlreadyShared));
                }
                match self.backs.insert(page, frame) {
                    Some(old) => {
                        if self.release(old) == 0 {
                            self.free += 1;
                        }
                    }
                    None => self.free += 1,
                }
                *self.refs.get_mut(&frame).unwrap() += 1;
                Ok(ok(self, frame))
            }
            AltRequest::Unshare { domain, gfn } => {
                let page = self.page(domain, gfn)?;
                let value = self.contents(page);
                let f = self
                    .backs
                    .remove(&page)
                    .ok_or(AltError::Kernel(EptOpError::NotShared))?;
                self.own.insert(page, value);
                if self.release(f) > 0 {
                    self.free -= 1;
                }
                Ok(ok(self, f))
            }
            AltRequest::ShareBreaks => {
                let n = self.breaks.len().min(BREAKS_PER_REPLY);
                let mut breaks = BoundedVec::new();
                for b in self.breaks.drain(..n) {
                    breaks.0.push(b).unwrap();
                }
                Ok(AltReply::Breaks {
                    breaks,
                    more: !self.breaks.is_empty(),
                })
            }
            _ => Err(AltError::WrongEndpoint),
        }
    }
}

impl Owner for Fake {
    fn ask(&mut self, r: &AltRequest) -> Option<AltReply> {
        if self.unreachable {
            return None;
        }
        Some(self.answer(r).unwrap_or_else(AltReply::Refused))
    }
    fn birth(&mut self, domain: u16) -> Option<u64> {
        (!self.gone.contains(&domain)).then(|| self.births.get(&domain).copied().unwrap_or(1))
    }
    fn pages(&mut self, domain: u16) -> Option<u64> {
        ((1..=DOMAINS).contains(&domain) && !self.gone.contains(&domain)).then_some(RAM)
    }
    fn read(&mut self, domain: u16, gfn: u64, out: &mut [u8]) -> bool {
        let v = self.contents(Page { domain, gfn });
        for w in out.chunks_exact_mut(8) {
            w.copy_from_slice(&v.to_le_bytes());
        }
        true
    }
}

fn fake() -> Fake {
    Fake {
        free: 1000,
        ..Fake::default()
    }
}

fn nominate(s: &mut Sharing, f: &mut Fake, domain: u16, gfn: u64) -> u64 {
    match s.request(f, &ShRequest::Nominate { domain, gfn }) {
        ShReply::Nominated { handle, .. } => handle,
        other => panic!("{other:?}"),
    }
}

/// SH-4: the service's pages and references are the kernel's.
fn same(s: &Sharing, f: &Fake) -> Result<(), TestCaseError> {
    let pages: Map<Page, u32> = s.pages.iter().map(|(&p, &f)| (p, f)).collect();
    let refs: Map<u32, u32> = s.refs.iter().map(|(&a, &b)| (a, b)).collect();
    prop_assert_eq!(&pages, &f.backs);
    prop_assert_eq!(&refs, &f.refs);
    // A good handle names a page that maps the frame it named.
    for (h, (p, fr)) in &s.handles {
        prop_assert_eq!(f.backs.get(p), Some(fr), "handle {:#x}", h);
    }
    Ok(())
}

#[test]
fn share_frees_the_clients_frame_and_a_write_breaks_it() {
    let (mut s, mut f) = (Sharing::default(), fake());
    let a = nominate(&mut s, &mut f, 1, 3);
    assert_eq!(
        nominate(&mut s, &mut f, 1, 3),
        a,
        "the same page, the same handle"
    );
    let b = nominate(&mut s, &mut f, 2, 5);
    assert_eq!(
        s.request(
            &mut f,
            &ShRequest::Share {
                source: a,
                client: b
            }
        ),
        ShReply::Shared {
            refs: 2,
            free: 1001
        }
    );
    same(&s, &f).unwrap();
    assert_eq!(s.status().saved, 1);
    // The client's handle is used up.
    assert_eq!(
        s.request(
            &mut f,
            &ShRequest::Share {
                source: a,
                client: b
            }
        ),
        ShReply::Error(ShError::StaleHandle)
    );
    // A write by the client breaks the share: a copy for it.
    f.write(Page { domain: 2, gfn: 5 });
    let st = match s.request(&mut f, &ShRequest::Status) {
        ShReply::Status(st) => st,
        other => panic!("{other:?}"),
    };
    assert_eq!((st.pages, st.frames, st.saved, st.breaks), (1, 1, 0, 1));
    same(&s, &f).unwrap();
    // A write by the source, the last reference: its handle goes stale.
    f.write(Page { domain: 1, gfn: 3 });
    let c = nominate(&mut s, &mut f, 2, 6);
    assert_eq!(
        s.request(
            &mut f,
            &ShRequest::Share {
                source: a,
                client: c
            }
        ),
        ShReply::Error(ShError::StaleHandle)
    );
    same(&s, &f).unwrap();
}

#[test]
fn bad_input_is_refused_by_name_and_changes_nothing() {
    let (mut s, mut f) = (Sharing::default(), fake());
    let a = nominate(&mut s, &mut f, 1, 3);
    let b = nominate(&mut s, &mut f, 2, 3);
    let before = (s.pages.clone(), s.refs.clone(), s.handles.clone());
    let ask = |s: &mut Sharing, f: &mut Fake, r| s.request(f, &r);
    use ShRequest::*;
    assert_eq!(
        ask(
            &mut s,
            &mut f,
            Nominate {
                domain: 1,
                gfn: RAM
            }
        ),
        ShReply::Error(ShError::NotRam)
    );
    assert_eq!(
        ask(&mut s, &mut f, Nominate { domain: 9, gfn: 0 }),
        ShReply::Error(ShError::NoSuchDomain)
    );
    assert_eq!(
        ask(
            &mut s,
            &mut f,
            Share {
                source: a,
                client: a
            }
        ),
        ShReply::Error(ShError::SamePage)
    );
    assert_eq!(
        ask(
            &mut s,
            &mut f,
            Share {
                source: a,
                client: 12345
            }
        ),
        ShReply::Error(ShError::StaleHandle)
    );
    assert_eq!(
        ask(
            &mut s,
            &mut f,
            Share {
                source: a.wrapping_add(1),
                client: b
            }
        ),
        ShReply::Error(ShError::StaleHandle)
    );
    assert_eq!(
        ask(&mut s, &mut f, Unshare { domain: 1, gfn: 4 }),
        ShReply::Error(ShError::NotShared)
    );
    f.modified.push(Page { domain: 1, gfn: 7 });
    assert_eq!(
        ask(&mut s, &mut f, Nominate { domain: 1, gfn: 7 }),
        ShReply::Error(ShError::ModifiedInView { view: 1 })
    );
    f.unreachable = true;
    assert_eq!(
        ask(&mut s, &mut f, Nominate { domain: 1, gfn: 8 }),
        ShReply::Error(ShError::Altp2m)
    );
    f.unreachable = false;
    assert_eq!(before, (s.pages.clone(), s.refs.clone(), s.handles.clone()));
    same(&s, &f).unwrap();
}

#[test]
fn a_destroyed_domains_references_are_released() {
    // SH-4: the kernel releases them; the service follows.
    let (mut s, mut f) = (Sharing::default(), fake());
    let a = nominate(&mut s, &mut f, 1, 3);
    let b = nominate(&mut s, &mut f, 2, 3);
    s.request(
        &mut f,
        &ShRequest::Share {
            source: a,
            client: b,
        },
    );
    f.destroy(1);
    assert!(
        matches!(s.request(&mut f, &ShRequest::Status), ShReply::Status(st) if st.pages == 1 && st.frames == 1 && st.handles == 0)
    );
    same(&s, &f).unwrap();
    f.destroy(2);
    assert!(
        matches!(s.request(&mut f, &ShRequest::Status), ShReply::Status(st) if st == ShStatus { breaks: 0, free: st.free, ..ShStatus::default() })
    );
    same(&s, &f).unwrap();
    // One frame freed by the share, the shared one by the last release.
    assert_eq!(f.free, 1002, "the last reference returned the frame");
}

#[derive(Clone, Debug)]
enum Op {
    Nominate(u16, u64),
    Share(usize, usize),
    Forged(usize),
    Unshare(u16, u64),
    Write(u16, u64),
    Destroy(u16),
    Reborn(u16),
    Status,
}

fn op() -> impl Strategy<Value = Op> {
    let d = 1u16..=DOMAINS + 1;
    let g = 0u64..RAM + 1;
    prop_oneof![
        4 => (d.clone(), g.clone()).prop_map(|(d, g)| Op::Nominate(d, g)),
        5 => (0usize..12, 0usize..12).prop_map(|(a, b)| Op::Share(a, b)),
        1 => (0usize..12).prop_map(Op::Forged),
        2 => (d.clone(), g.clone()).prop_map(|(d, g)| Op::Unshare(d, g)),
        4 => (d.clone(), g).prop_map(|(d, g)| Op::Write(d, g)),
        1 => (1u16..=DOMAINS).prop_map(Op::Destroy),
        1 => (1u16..=DOMAINS).prop_map(Op::Reborn),
        1 => Just(Op::Status),
    ]
}

proptest! {
    /// SH-4 over random nominations, shares (good, used-up and forged
    /// handles), unshares, guest writes, domain destructions and ids given
    /// to new domains before the service heard of the end: after
    /// every request the service's pages and references are exactly the
    /// kernel's, every handle it holds names a page still mapping the
    /// frame it named, and frames saved are pages less frames.
    #[test]
    fn the_records_follow_the_kernels_references_exactly(ops in proptest::collection::vec(op(), 1..80)) {
        let (mut s, mut f) = (Sharing::default(), fake());
        let mut handles: Vec<u64> = Vec::new();
        for op in ops {
            let reply = match op {
                Op::Nominate(d, g) => s.request(&mut f, &ShRequest::Nominate { domain: d, gfn: g }),
                Op::Share(a, b) => {
                    let h = |i: usize| handles.get(i).copied().unwrap_or(i as u64);
                    s.request(&mut f, &ShRequest::Share { source: h(a), client: h(b) })
                }
                Op::Forged(i) => s.request(&mut f, &ShRequest::Share {
                    source: handles.get(i).map_or(7, |h| h ^ 1),
                    client: handles.first().copied().unwrap_or(9),
                }),
                Op::Unshare(d, g) => s.request(&mut f, &ShRequest::Unshare { domain: d, gfn: g }),
                Op::Write(d, g) => { f.write(Page { domain: d, gfn: g }); s.request(&mut f, &ShRequest::Status) }
                Op::Destroy(d) => { f.destroy(d); s.request(&mut f, &ShRequest::Status) }
                Op::Reborn(d) => { f.reborn(d); s.request(&mut f, &ShRequest::Status) }
                Op::Status => s.request(&mut f, &ShRequest::Status),
            };
            if let ShReply::Nominated { handle, .. } = reply {
                handles.push(handle);
            }
            if let ShReply::Status(st) = reply {
                prop_assert_eq!(st.saved, st.pages - st.frames);
            }
            same(&s, &f)?;
        }
    }
}

/// One scan request over `domains` from `from`.
fn scan_request(domains: &[u16], from: u64, pages: u32) -> ShRequest {
    let mut list = BoundedVec::new();
    for &d in domains {
        list.0.push(d).unwrap();
    }
    ShRequest::Scan {
        domains: list,
        from,
        pages,
    }
}

fn scan(s: &mut Sharing, f: &mut Fake, domains: &[u16], budget: u32) -> (u32, u32) {
    let (mut from, mut pages, mut saved) = (0, 0, 0);
    loop {
        let r = s.request(f, &scan_request(domains, from, budget));
        let ShReply::Scanned {
            pages: p,
            saved: n,
            next,
        } = r
        else {
            panic!("{r:?}")
        };
        assert!(p <= budget);
        (pages, saved) = (pages + p, saved + n);
        match next {
            Some(n) => from = n,
            None => return (pages, saved),
        }
    }
}

#[test]
fn a_scan_shares_equal_pages_and_nothing_else() {
    // Issue 11, point 4: two domains of 16 pages; contents gfn % 4, but for
    // one page of domain 2.
    let (mut s, mut f) = (Sharing::default(), fake());
    f.own.insert(Page { domain: 2, gfn: 5 }, 99);
    let free = f.free;
    let (pages, saved) = scan(&mut s, &mut f, &[1, 2], 5);
    assert_eq!(pages, 32);
    // 31 pages of 4 contents, and one of its own.
    assert_eq!(saved, 31 - 4);
    assert_eq!(f.free, free + 27, "each share freed a frame");
    same(&s, &f).unwrap();
    for d in 1..=2 {
        for g in 0..RAM {
            let p = Page { domain: d, gfn: g };
            let want = if (d, g) == (2, 5) { 99 } else { g % 4 };
            assert_eq!(f.contents(p), want, "{p:?}");
            assert_eq!(f.backs.contains_key(&p), (d, g) != (2, 5), "{p:?}");
        }
    }
    // A write breaks one page; the others keep the contents.
    f.write_value(Page { domain: 1, gfn: 4 }, 7);
    assert_eq!(f.contents(Page { domain: 2, gfn: 4 }), 0);
    assert_eq!(f.contents(Page { domain: 1, gfn: 4 }), 7);
    // A second scan from the start finds nothing new to save but page 4.
    let (_, saved) = scan(&mut s, &mut f, &[1, 2], 100);
    assert_eq!(saved, 0, "1:4 holds 7, found nowhere else");
    same(&s, &f).unwrap();
    // A scan that names a domain that is gone is refused before it reads
    // anything; one that ends during the scan is passed over.
    f.destroy(2);
    for domains in [&[2u16, 1][..], &[1, 99]] {
        let r = s.request(&mut f, &scan_request(domains, 0, 100));
        assert_eq!(r, ShReply::Error(ShError::NoSuchDomain), "{domains:?}");
    }
    let (pages, _) = scan(&mut s, &mut f, &[1], 100);
    assert_eq!(pages, 16);
    f.destroy(3);
    let r = s.request(&mut f, &scan_request(&[1, 3], 1 << 48, 100));
    assert!(
        matches!(
            r,
            ShReply::Scanned {
                pages: 0,
                next: None,
                ..
            }
        ),
        "{r:?}"
    );
    same(&s, &f).unwrap();
}

#[test]
fn a_page_written_between_its_nomination_and_the_share_is_never_merged() {
    // The fake lets a write land between the two reads of a merge: the
    // client's handle is stale by then, so the share is refused.
    struct Racy(Fake, bool);
    impl Owner for Racy {
        fn ask(&mut self, r: &AltRequest) -> Option<AltReply> {
            let a = self.0.ask(r);
            if self.1 && matches!(r, AltRequest::ShareNominate { domain: 2, gfn: 1 }) {
                self.1 = false;
                self.0.write_value(Page { domain: 2, gfn: 1 }, 55);
            }
            a
        }
        fn birth(&mut self, d: u16) -> Option<u64> {
            self.0.birth(d)
        }
        fn pages(&mut self, d: u16) -> Option<u64> {
            self.0.pages(d).map(|_| 2)
        }
        fn read(&mut self, d: u16, g: u64, out: &mut [u8]) -> bool {
            self.0.read(d, g, out)
        }
    }
    let mut s = Sharing::default();
    let mut r = Racy(fake(), true);
    let reply = s.request(&mut r, &scan_request(&[1, 2], 0, 10));
    // 1:0 and 2:0 hold 0, 1:1 and 2:1 held 1 until 2:1 was written.
    assert_eq!(
        reply,
        ShReply::Scanned {
            pages: 4,
            saved: 1,
            next: None
        }
    );
    assert_eq!(r.0.contents(Page { domain: 2, gfn: 1 }), 55);
    assert_eq!(r.0.contents(Page { domain: 1, gfn: 1 }), 1);
    assert!(!r.0.backs.contains_key(&Page { domain: 2, gfn: 1 }));
    same(&s, &r.0).unwrap();
}
