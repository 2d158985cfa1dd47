//! Page sharing as a constraint on the entries (docs/sharing.md;
//! docs/p2m.md, rule 3; SH-1..SH-4).
//!
//! The sharing service keeps the handles and decides what is shared; this
//! service owns the entries, so it keeps which gfns map a shared frame
//! ([`Domain::shared`]) as part of the model every entry is derived from:
//! such a gfn loses write in every view ([`Domain::tracked`]), is never
//! armed, and a write to it is a copy-on-write break made here
//! ([`Altp2m::cow`]): the kernel gives the gfn a private copy
//! (`EptOp::Unshare`), the entries are written from the model again, the
//! writer retries, and the break is recorded for the sharing service to
//! take ([`Altp2m::take_breaks`]), as dirty tracking records writes for
//! the logdirty service.
//!
//! SH-3: a gfn that a view modifies (an access setting in any view, view 0
//! included, or a change_gfn from or to it) cannot be nominated or shared
//! ([`AltError::ModifiedInView`]), and a view change to a shared gfn is
//! refused (`HcError::Shared`, in `policy`). Suppress-#VE settings are no
//! modification: they neither block sharing nor unshare (seed 004).

use crate::policy::{Altp2m, Domain, Kernel, fill, fill_ops, perms, propagate_with};
use alloc::vec::Vec;
use ipc_schema::altp2m::{AltError, AltReply, CowBreak};
use ipc_schema::hypercall::HcError;
use ipc_schema::syscall::{EptOp, EptOpError, EptResult};
use ipc_schema::vmexit::AccessBits;

/// The view that modifies `gfn` (SH-3), if any.
pub fn modified_in(d: &Domain, gfn: u64) -> Option<u16> {
    d.views
        .iter()
        .find(|(_, v)| v.access.get(gfn).is_some() || v.remap.contains_key(&gfn))
        .map(|(&view, _)| view)
        .or_else(|| {
            d.remapped_to
                .range((gfn, 0, 0)..=(gfn, u16::MAX, u64::MAX))
                .next()
                .map(|&(_, view, _)| view)
        })
}

/// One sharing operation on the host p2m: (frame, references, free frames).
fn kernel_op(k: &mut impl Kernel, domain: u16, op: EptOp) -> Result<(u32, u32, u64), AltError> {
    let mut out = [EptResult::Done];
    k.ept(domain, &[op], &mut out)
        .map_err(|_| AltError::NoSuchDomain)?;
    match out[0] {
        EptResult::Shared { frame, refs, free } => Ok((frame, refs, free)),
        EptResult::Error(e) => Err(AltError::Kernel(e)),
        _ => Err(AltError::Kernel(EptOpError::NotRam)),
    }
}

/// Writes `gfn`'s entries from the model again after the kernel changed
/// its frame (it emptied the views' copies): view 0, and every view that
/// must hold it (a cleared suppress-#VE bit); the others fill lazily.
fn rewrite(k: &mut impl Kernel, domain: u16, d: &Domain, gfn: u64) -> Result<(), AltError> {
    propagate_with(k, domain, d, gfn, &fill_ops(d, 0, gfn)).map_err(|_| AltError::OutOfMemory)
}

impl Altp2m {
    fn share_checks(&mut self, k: &mut impl Kernel, domain: u16, gfn: u64) -> Result<(), AltError> {
        let Some((0..=2, pages)) = k.domain_info(domain) else {
            return Err(AltError::NoSuchDomain);
        };
        if gfn >= pages {
            return Err(AltError::Kernel(EptOpError::NotRam));
        }
        if !self.domains.contains_key(&domain) && !k.room() {
            return Err(AltError::OutOfMemory);
        }
        if let Some(view) = modified_in(self.domain(domain), gfn) {
            return Err(AltError::ModifiedInView { view });
        }
        Ok(())
    }

    /// SH-1: nominates `gfn` of `domain`: its frame becomes shared (or is
    /// named again), read-only in every view.
    pub fn share_nominate(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        gfn: u64,
    ) -> Result<AltReply, AltError> {
        self.share_checks(k, domain, gfn)?;
        let (frame, refs, free) = kernel_op(k, domain, EptOp::ShareNominate { view: 0, gfn })?;
        self.domain(domain).shared.insert(gfn, frame);
        rewrite(k, domain, &self.domains[&domain], gfn)?;
        Ok(AltReply::Shared { frame, refs, free })
    }

    /// SH-1: `gfn` of `domain` comes to map shared frame `frame`.
    pub fn share_map(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        gfn: u64,
        frame: u32,
    ) -> Result<AltReply, AltError> {
        self.share_checks(k, domain, gfn)?;
        let (frame, refs, free) = kernel_op(
            k,
            domain,
            EptOp::ShareMap {
                view: 0,
                gfn,
                frame,
            },
        )?;
        self.domain(domain).shared.insert(gfn, frame);
        rewrite(k, domain, &self.domains[&domain], gfn)?;
        Ok(AltReply::Shared { frame, refs, free })
    }

    /// SH-1: `gfn` of `domain` gets a frame of its own again.
    pub fn unshare(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        gfn: u64,
    ) -> Result<AltReply, AltError> {
        let Some(frame) = self
            .domains
            .get_mut(&domain)
            .and_then(|d| d.shared.remove(&gfn))
        else {
            // (A domain that is not there is named so, not "not shared".)
            return Err(match k.domain_info(domain) {
                Some((0..=2, _)) => AltError::Kernel(EptOpError::NotShared),
                _ => AltError::NoSuchDomain,
            });
        };
        let d = &self.domains[&domain];
        let access = d.effective(0, gfn).access;
        match kernel_op(
            k,
            domain,
            EptOp::Unshare {
                view: 0,
                gfn,
                perms: perms(access),
            },
        ) {
            Ok((frame, refs, free)) => {
                rewrite(k, domain, d, gfn)?;
                Ok(AltReply::Shared { frame, refs, free })
            }
            Err(e) => {
                self.domain(domain).shared.insert(gfn, frame);
                Err(e)
            }
        }
    }

    /// SH-2: a write fault of `view` at `gfn` that only sharing refused:
    /// the gfn gets its private copy, its entries are written again, and
    /// the break is recorded; the vCPU retries. `Ok(false)` when sharing
    /// is not the reason; `Err(OutOfMemory)` when there is no frame for
    /// the copy (nothing changed).
    pub fn cow(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
        access: AccessBits,
    ) -> Result<bool, HcError> {
        let Some(d) = self.domains.get(&domain) else {
            return Ok(false);
        };
        if !access.write || d.shared.is_empty() || !d.views.contains_key(&view) {
            return Ok(false);
        }
        let plain = d.untracked(view, gfn);
        let frame = plain.frame_gfn.unwrap_or(gfn);
        let allowed = (!access.read || plain.access.read)
            && plain.access.write
            && (!access.execute || plain.access.execute);
        if !allowed || !d.shared.contains_key(&frame) {
            return Ok(false);
        }
        let (shared, refs) = match self.unshare(k, domain, frame) {
            Ok(AltReply::Shared { frame, refs, .. }) => (frame, refs),
            Err(AltError::Kernel(EptOpError::OutOfMemory)) => return Err(HcError::OutOfMemory),
            _ => return Err(HcError::BadGfn { gfn }),
        };
        self.breaks.push(CowBreak {
            domain,
            gfn: frame,
            frame: shared,
            refs,
        });
        if view != 0 {
            fill(k, domain, &self.domains[&domain], view, gfn)?;
        }
        Ok(true)
    }

    /// Takes up to `max` copy-on-write breaks, oldest first, and whether
    /// more remain.
    pub fn take_breaks(&mut self, max: usize) -> (Vec<CowBreak>, bool) {
        let n = self.breaks.len().min(max);
        let taken: Vec<CowBreak> = self.breaks.drain(..n).collect();
        (taken, !self.breaks.is_empty())
    }
}
