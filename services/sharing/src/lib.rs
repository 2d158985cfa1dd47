//! The sharing service's logic (SH-1..SH-4, docs/sharing.md): the handles
//! it gave, the pages that map shared frames and each frame's references,
//! kept exactly as the kernel keeps them. The binary (`main.rs`) connects
//! it to the altp2m service, which owns the EPT entries and carries every
//! change out (docs/p2m.md, rule 3).

#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use ipc_schema::altp2m::{AltError, AltReply, AltRequest, CowBreak};
use ipc_schema::sharing::{ShError, ShReply, ShRequest, ShStatus};
use ipc_schema::syscall::EptOpError;

/// The most handles the service keeps.
pub const MAX_HANDLES: usize = 4096;

/// What the service needs of the system.
pub trait Owner {
    /// A request to the altp2m service on `altp2m-share`; `None` when it
    /// could not be reached.
    fn ask(&mut self, r: &AltRequest) -> Option<AltReply>;
    /// Which domain of all made since boot `domain` is (DOMAIN_INFO's
    /// birth: ids are given again, births never); `None` when there is no
    /// such domain (a destroyed one has released its references).
    fn birth(&mut self, domain: u16) -> Option<u64>;
    /// The domain's RAM in pages, while it runs (a scan reads only those).
    fn pages(&mut self, domain: u16) -> Option<u64>;
    /// Copies page `gfn` of `domain` into `out` (DOMAIN_READ: the kernel
    /// copies, nothing is mapped); `false` where it cannot be read.
    fn read(&mut self, domain: u16, gfn: u64, out: &mut [u8]) -> bool;
}

/// Bytes of a page.
pub const PAGE: usize = 4096;

/// A page of a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Page {
    pub domain: u16,
    pub gfn: u64,
}

/// Everything the service keeps.
#[derive(Default, Debug)]
pub struct Sharing {
    /// Handle -> the page it names and the shared frame (the kernel's
    /// opaque id) the page mapped when it was nominated.
    pub handles: BTreeMap<u64, (Page, u32)>,
    /// Every page that maps a shared frame, and the frame.
    pub pages: BTreeMap<Page, u32>,
    /// Each shared frame's references, as the kernel last reported them.
    pub refs: BTreeMap<u32, u32>,
    next: u64,
    pub breaks: u64,
    pub free: u64,
    /// Deduplication: a page of the scan for each contents seen (by hash).
    pub index: BTreeMap<u64, Page>,
    /// The birth of each domain with pages here, noted after the request
    /// that gave it its first (SH-4's prune tells a new domain given the
    /// id from the one the pages are of).
    pub births: service_runtime::births::Births,
    /// Two pages' worth of bytes for a scan, made at its first use.
    buffers: alloc::vec::Vec<u8>,
}

/// A 64-bit hash of a page's contents (FNV-1a over its words): equal
/// hashes are only candidates, compared byte for byte before a share.
pub fn hash(page: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in page.chunks_exact(8) {
        h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = h.wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    h
}

fn error(e: AltError) -> ShError {
    match e {
        AltError::NoSuchDomain => ShError::NoSuchDomain,
        AltError::ModifiedInView { view } => ShError::ModifiedInView { view },
        AltError::OutOfMemory | AltError::Kernel(EptOpError::OutOfMemory) => ShError::OutOfMemory,
        AltError::Kernel(EptOpError::NotRam) => ShError::NotRam,
        AltError::Kernel(EptOpError::NoSuchShare) => ShError::StaleHandle,
        AltError::Kernel(EptOpError::AlreadyShared) => ShError::AlreadyShared,
        AltError::Kernel(EptOpError::NotShared) => ShError::NotShared,
        AltError::Kernel(EptOpError::Busy) => ShError::Busy,
        _ => ShError::Altp2m,
    }
}

/// The owner's answer to a sharing operation: (frame, references, free).
fn shared(o: &mut impl Owner, r: &AltRequest) -> Result<(u32, u32, u64), ShError> {
    match o.ask(r) {
        Some(AltReply::Shared { frame, refs, free }) => Ok((frame, refs, free)),
        Some(AltReply::Refused(e)) => Err(error(e)),
        _ => Err(ShError::Altp2m),
    }
}

impl Sharing {
    /// Answers one request.
    pub fn request(&mut self, o: &mut impl Owner, r: &ShRequest) -> ShReply {
        self.drain(o);
        self.prune(o);
        let answer = match *r {
            ShRequest::Nominate { domain, gfn } => self.nominate(o, Page { domain, gfn }),
            ShRequest::Share { source, client } => self.share(o, source, client),
            ShRequest::Unshare { domain, gfn } => self.unshare(o, Page { domain, gfn }),
            ShRequest::Status => Ok(ShReply::Status(self.status())),
            ShRequest::Scan {
                ref domains,
                from,
                pages,
            } => {
                // A scan starts with every domain it names there (one that
                // ends during the scan is passed over); a scan of nothing
                // would say it saved nothing.
                if from == 0 && domains.0.iter().any(|&d| o.pages(d).is_none()) {
                    Err(ShError::NoSuchDomain)
                } else {
                    Ok(self.scan(o, &domains.0, from, pages))
                }
            }
        };
        self.note_births(o);
        answer.unwrap_or_else(ShReply::Error)
    }

    /// What is shared now.
    pub fn status(&self) -> ShStatus {
        ShStatus {
            handles: self.handles.len() as u32,
            frames: self.refs.len() as u32,
            pages: self.pages.len() as u32,
            saved: self.pages.len().saturating_sub(self.refs.len()) as u32,
            breaks: self.breaks,
            free: self.free,
        }
    }

    /// Takes the copy-on-write breaks the owner made since the last take
    /// (SH-2): the pages that left their shared frames.
    pub fn drain(&mut self, o: &mut impl Owner) {
        for _ in 0..1024 {
            let Some(AltReply::Breaks { breaks, more }) = o.ask(&AltRequest::ShareBreaks) else {
                return;
            };
            for b in breaks.0.iter() {
                self.broken(b);
            }
            if !more {
                return;
            }
        }
    }

    fn broken(&mut self, b: &CowBreak) {
        let page = Page {
            domain: b.domain,
            gfn: b.gfn,
        };
        self.pages.remove(&page);
        self.handles.retain(|_, h| h.0 != page);
        self.set_refs(b.frame, b.refs);
        self.breaks += 1;
    }

    /// SH-4: a destroyed domain's references were released by the kernel,
    /// whether or not its id was given to a new domain since.
    fn prune(&mut self, o: &mut impl Owner) {
        let mut domains: alloc::vec::Vec<u16> = self.pages.keys().map(|p| p.domain).collect();
        domains.dedup();
        // (A domain's references outlive its end, until it is destroyed.)
        for d in self.births.ended(&domains, |d| Some((true, o.birth(d)?))) {
            let gone: alloc::vec::Vec<(Page, u32)> = self
                .pages
                .iter()
                .filter(|(p, _)| p.domain == d)
                .map(|(&p, &f)| (p, f))
                .collect();
            for (p, f) in gone {
                self.pages.remove(&p);
                let left = self.refs.get(&f).map_or(0, |r| r.saturating_sub(1));
                self.set_refs(f, left);
            }
            self.handles.retain(|_, h| h.0.domain != d);
        }
    }

    /// Notes the birth of each domain with pages (SH-4's prune).
    fn note_births(&mut self, o: &mut impl Owner) {
        let mut domains: alloc::vec::Vec<u16> = self.pages.keys().map(|p| p.domain).collect();
        domains.dedup();
        self.births.note(&domains, |d| o.birth(d));
    }

    fn set_refs(&mut self, frame: u32, refs: u32) {
        if refs == 0 {
            self.refs.remove(&frame);
            self.handles.retain(|_, h| h.1 != frame);
            self.pages.retain(|_, f| *f != frame);
        } else {
            self.refs.insert(frame, refs);
        }
    }

    fn nominate(&mut self, o: &mut impl Owner, page: Page) -> Result<ShReply, ShError> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(ShError::TooManyHandles {
                limit: MAX_HANDLES as u32,
            });
        }
        let (frame, refs, free) = shared(
            o,
            &AltRequest::ShareNominate {
                domain: page.domain,
                gfn: page.gfn,
            },
        )?;
        self.free = free;
        self.pages.insert(page, frame);
        self.refs.insert(frame, refs);
        let handle = match self.handles.iter().find(|(_, h)| **h == (page, frame)) {
            Some((&handle, _)) => handle,
            None => {
                self.next += 1;
                // Handles are not counted out in order, so that a guessed
                // neighbour of one is no handle (an odd multiplier is a
                // bijection: no two handles collide).
                let handle = self.next.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                self.handles.insert(handle, (page, frame));
                handle
            }
        };
        Ok(ShReply::Nominated { handle, refs, free })
    }

    fn share(&mut self, o: &mut impl Owner, source: u64, client: u64) -> Result<ShReply, ShError> {
        let (s, c) = match (self.handles.get(&source), self.handles.get(&client)) {
            (Some(&s), Some(&c)) => (s, c),
            _ => return Err(ShError::StaleHandle),
        };
        if s.0 == c.0 {
            return Err(ShError::SamePage);
        }
        if self.pages.get(&c.0) == Some(&s.1) {
            return Err(ShError::AlreadyShared);
        }
        let asked = AltRequest::ShareMap {
            domain: c.0.domain,
            gfn: c.0.gfn,
            frame: s.1,
        };
        let (frame, refs, free) = match shared(o, &asked) {
            Err(ShError::StaleHandle) => {
                // The kernel has no such frame any more.
                self.set_refs(s.1, 0);
                return Err(ShError::StaleHandle);
            }
            other => other?,
        };
        self.free = free;
        if let Some(old) = self.pages.insert(c.0, frame)
            && old != frame
        {
            let left = self.refs.get(&old).map_or(0, |r| r.saturating_sub(1));
            self.set_refs(old, left);
        }
        self.refs.insert(frame, refs);
        self.handles.remove(&client);
        Ok(ShReply::Shared { refs, free })
    }

    /// Deduplication over `domains` from position `from` (the domain's
    /// index in the high 16 bits, the gfn below), at most `budget` pages.
    fn scan(&mut self, o: &mut impl Owner, domains: &[u16], from: u64, budget: u32) -> ShReply {
        if from == 0 {
            self.index.clear();
        }
        if self.buffers.len() != 2 * PAGE {
            self.buffers = alloc::vec![0; 2 * PAGE];
        }
        let mut buffers = core::mem::take(&mut self.buffers);
        let (first, second) = buffers.split_at_mut(PAGE);
        let (mut i, mut gfn) = ((from >> 48) as usize, from & ((1 << 48) - 1));
        let (mut read, mut saved) = (0u32, 0u32);
        let next = loop {
            let Some(&domain) = domains.get(i) else {
                break None;
            };
            let pages = o.pages(domain).unwrap_or(0);
            if gfn >= pages {
                (i, gfn) = (i + 1, 0);
                continue;
            }
            if read >= budget {
                break Some((i as u64) << 48 | gfn);
            }
            let page = Page { domain, gfn };
            gfn += 1;
            read += 1;
            if self.pages.contains_key(&page) || !o.read(domain, page.gfn, first) {
                continue;
            }
            let h = hash(first);
            match self.index.get(&h).copied() {
                Some(source) if source != page => {
                    if self.merge(o, source, page, first, second) {
                        saved += 1;
                    } else {
                        // The source changed (or cannot be shared): this
                        // page stands for the contents from now on.
                        self.index.insert(h, page);
                    }
                }
                _ => {
                    self.index.insert(h, page);
                }
            }
        };
        self.buffers = buffers;
        // Writes the guests made meanwhile broke some of what was shared.
        self.drain(o);
        ShReply::Scanned {
            pages: read,
            saved,
            next,
        }
    }

    /// Shares `client` with `source` if their contents are equal once both
    /// are nominated (read-only: a write after that makes its handle stale
    /// and the share is refused, so a changing page is never merged).
    /// A page left nominated alone by a failure is unshared again.
    fn merge(
        &mut self,
        o: &mut impl Owner,
        source: Page,
        client: Page,
        a: &mut [u8],
        b: &mut [u8],
    ) -> bool {
        let Ok(ShReply::Nominated { handle: hs, .. }) = self.nominate(o, source) else {
            return false;
        };
        let Ok(ShReply::Nominated { handle: hc, .. }) = self.nominate(o, client) else {
            self.release_alone(o, source);
            return false;
        };
        let same =
            o.read(source.domain, source.gfn, a) && o.read(client.domain, client.gfn, b) && a == b;
        if same && self.share(o, hs, hc).is_ok() {
            return true;
        }
        self.release_alone(o, client);
        self.release_alone(o, source);
        false
    }

    /// Unshares `page` if it is the only page of its frame.
    fn release_alone(&mut self, o: &mut impl Owner, page: Page) {
        if let Some(f) = self.pages.get(&page)
            && self.refs.get(f) == Some(&1)
        {
            let _ = self.unshare(o, page);
        }
    }

    fn unshare(&mut self, o: &mut impl Owner, page: Page) -> Result<ShReply, ShError> {
        let (frame, refs, free) = shared(
            o,
            &AltRequest::Unshare {
                domain: page.domain,
                gfn: page.gfn,
            },
        )?;
        self.free = free;
        self.pages.remove(&page);
        self.handles.retain(|_, h| h.0 != page);
        self.set_refs(frame, refs);
        Ok(ShReply::Unshared { refs, free })
    }
}

#[cfg(test)]
mod tests;
