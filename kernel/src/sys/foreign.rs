//! Foreign mappings (FM-1..FM-3): pages of a domain's RAM mapped into a
//! service (FOREIGN_MAP, FOREIGN_UNMAP).
//!
//! Each mapping is recorded in its process's table (at most
//! `ipc_schema::syscall::FOREIGN_MAPS`) and counted in its domain (`Domain::foreign_pages`),
//! so that a protected domain is not started or unpaused while any exist
//! (`syscall::domain_control`), and so that every one is torn down when
//! its process stops running (fault, exit, kill, restart, swap: `settle`)
//! and when its domain is destroyed, before the domain's slot is freed.

use super::Kernel;
use super::process::{State, Wait};
use super::space::PageFlags;
use ipc_schema::syscall::layout::{MAP_BASE, MAP_END};
use ipc_schema::syscall::{DomainState, FOREIGN_PAGES, SysError};
use platform::PAGE_SIZE;

/// One mapping a process holds.
#[derive(Clone, Copy, Debug)]
pub struct ForeignMap {
    /// The domain's slot (its id - 1).
    pub domain: u16,
    pub gfn: u64,
    pub va: u64,
    pub count: u64,
    pub writable: bool,
    /// Within pages the guest grants (made while it might run; not
    /// counted in `Domain::foreign_ungranted`).
    pub granted: bool,
}

impl Kernel {
    /// Logs a refused FOREIGN_MAP or FOREIGN_UNMAP and returns `e`.
    fn foreign_refused(&self, pid: u16, call: &'static str, why: &str, e: SysError) -> SysError {
        if self.loud(pid, call) {
            defmt::warn!(
                "service {=str}: {=str} refused: {=str}",
                self.process_name(pid),
                call,
                why
            );
        }
        e
    }

    /// FOREIGN_MAP, its handle checked: `count` pages of domain slot
    /// `slot` from `gfn`, at `va` in the caller.
    pub fn foreign_map(
        &mut self,
        pid: u16,
        slot: u16,
        (gfn, count, va, writable): (u64, u64, u64, bool),
    ) -> Result<(), SysError> {
        const CALL: &str = "FOREIGN_MAP";
        let bad = SysError::BadArgument;
        if count == 0 || count > FOREIGN_PAGES {
            return Err(self.foreign_refused(pid, CALL, "a count of 0 or over 512 pages", bad));
        }
        // count <= 512: `count * PAGE_SIZE` cannot wrap; `va + ..` can.
        if !va.is_multiple_of(PAGE_SIZE)
            || va < MAP_BASE
            || va
                .checked_add(count * PAGE_SIZE)
                .is_none_or(|e| e > MAP_END)
        {
            return Err(self.foreign_refused(
                pid,
                CALL,
                "va not page-aligned in the map window",
                bad,
            ));
        }
        let d = self.domains[usize::from(slot)]
            .as_ref()
            .ok_or(SysError::BadArgument)?;
        if gfn.checked_add(count).is_none()
            || (gfn..gfn + count).any(|g| d.frame_of_gfn(g).is_none())
        {
            return Err(self.foreign_refused(
                pid,
                CALL,
                "the pages are not all the domain's RAM",
                SysError::BadAddress,
            ));
        }
        let granted = d.grants_cover(gfn, count);
        if d.protected && d.state == DomainState::Running && !granted {
            return Err(self.foreign_refused(
                pid,
                CALL,
                "the domain is protected and running, and the guest does not grant these pages (pause it first)",
                SysError::Busy,
            ));
        }
        let p = self.processes[usize::from(pid)]
            .as_mut()
            .ok_or(SysError::NoSuchHandle)?;
        if p.foreign.is_full() {
            return Err(self.foreign_refused(
                pid,
                CALL,
                "the process holds 16 foreign mappings",
                SysError::NoResources,
            ));
        }
        let space = p.space.as_mut().ok_or(SysError::BadAddress)?;
        let flags = PageFlags {
            writable,
            executable: false,
            owned: false,
            uncached: false,
        };
        let mut mapped = 0;
        while mapped < count {
            let Some(frame) = d.frame_of_gfn(gfn + mapped) else {
                break;
            };
            if space.map(va + mapped * PAGE_SIZE, frame, flags).is_err() {
                break;
            }
            mapped += 1;
        }
        if mapped < count {
            for j in 0..mapped {
                let _ = space.unmap(va + j * PAGE_SIZE);
            }
            return Err(self.foreign_refused(
                pid,
                CALL,
                "a page of the range is mapped already (or no memory for tables)",
                bad,
            ));
        }
        let _ = p.foreign.push(ForeignMap {
            domain: slot,
            gfn,
            va,
            count,
            writable,
            granted,
        });
        let d = self.domains[usize::from(slot)]
            .as_mut()
            .ok_or(SysError::BadArgument)?;
        d.foreign_pages += count as u32;
        if !granted {
            d.foreign_ungranted += count as u32;
        }
        // Writes through the mapping go around the EPT: whoever logs the
        // domain's writes counts the pages written (here and at unmap).
        if writable && let Some(log) = d.writes.as_mut() {
            log.record(gfn * PAGE_SIZE, count * PAGE_SIZE);
        }
        Ok(())
    }

    /// FOREIGN_UNMAP: the caller's mapping at `va` of `count` pages.
    pub fn foreign_unmap(&mut self, pid: u16, va: u64, count: u64) -> Result<(), SysError> {
        let p = self.processes[usize::from(pid)]
            .as_ref()
            .ok_or(SysError::NoSuchHandle)?;
        let Some(i) = p
            .foreign
            .iter()
            .position(|m| m.va == va && m.count == count)
        else {
            return Err(self.foreign_refused(
                pid,
                "FOREIGN_UNMAP",
                "no foreign mapping of that many pages at that va",
                SysError::BadArgument,
            ));
        };
        self.foreign_undo(pid, i);
        Ok(())
    }

    /// Whether `[va, end)` meets a foreign mapping of `pid` (FRAMES_UNMAP
    /// leaves them alone).
    pub fn foreign_overlaps(&self, pid: u16, va: u64, end: u64) -> bool {
        self.processes[usize::from(pid)].as_ref().is_some_and(|p| {
            p.foreign
                .iter()
                .any(|m| m.va < end && va < m.va + m.count * PAGE_SIZE)
        })
    }

    /// Removes mapping `i` of `pid`: its pages from the process's space
    /// (where it still has one) and from its domain's count.
    fn foreign_undo(&mut self, pid: u16, i: usize) {
        let Some(p) = self.processes[usize::from(pid)].as_mut() else {
            return;
        };
        let m = p.foreign.swap_remove(i);
        if let Some(space) = p.space.as_mut() {
            for j in 0..m.count {
                let _ = space.unmap(m.va + j * PAGE_SIZE);
            }
        }
        if let Some(d) = self.domains[usize::from(m.domain)].as_mut() {
            d.foreign_pages = d.foreign_pages.saturating_sub(m.count as u32);
            if !m.granted {
                d.foreign_ungranted = d.foreign_ungranted.saturating_sub(m.count as u32);
            }
            if m.writable
                && let Some(log) = d.writes.as_mut()
            {
                log.record(m.gfn * PAGE_SIZE, m.count * PAGE_SIZE);
            }
        }
    }

    /// DOMAIN_GRANT, its handle checked: domain slot `slot`'s guest grants
    /// pages `gfn .. gfn + count` (`grant`), or no longer.
    pub fn guest_grant(
        &mut self,
        slot: u16,
        gfn: u64,
        count: u64,
        grant: bool,
    ) -> Result<(), SysError> {
        let d = self.domains[usize::from(slot)]
            .as_ref()
            .ok_or(SysError::BadArgument)?;
        // At most as many pages as one mapping takes: the walk below is
        // bounded, whatever the guest asked for.
        if count == 0 || count > FOREIGN_PAGES {
            return Err(SysError::BadArgument);
        }
        let Some(end) = gfn.checked_add(count) else {
            return Err(SysError::BadAddress);
        };
        if (gfn..end).any(|g| d.frame_of_gfn(g).is_none()) {
            return Err(SysError::BadAddress);
        }
        // Mappings made within the range on the strength of it.
        let relied_on = self.processes.iter().flatten().any(|p| {
            p.foreign
                .iter()
                .any(|m| m.domain == slot && m.granted && m.gfn < end && gfn < m.gfn + m.count)
        });
        let d = self.domains[usize::from(slot)]
            .as_mut()
            .ok_or(SysError::BadArgument)?;
        let at = d.guest_grants.iter().position(|&r| r == (gfn, count));
        match (grant, at) {
            (true, Some(_)) => Ok(()),
            (true, None) => d
                .guest_grants
                .push((gfn, count))
                .map_err(|_| SysError::NoResources),
            (false, None) => Err(SysError::BadArgument),
            (false, Some(_)) if relied_on => Err(SysError::Busy),
            (false, Some(i)) => {
                d.guest_grants.swap_remove(i);
                Ok(())
            }
        }
    }

    /// Tears down every foreign mapping of `pid`, which stops running
    /// (FM-3: the mapper dies).
    pub fn foreign_drop_process(&mut self, pid: u16) {
        let Some(n) = self.processes[usize::from(pid)]
            .as_ref()
            .map(|p| p.foreign.len())
        else {
            return;
        };
        if n > 0 {
            defmt::info!(
                "service {=str}: its {=usize} foreign mappings torn down",
                self.process_name(pid),
                n
            );
        }
        for i in (0..n).rev() {
            self.foreign_undo(pid, i);
        }
    }

    /// Tears down every process's mappings of domain slot `slot`, which is
    /// destroyed (FM-3: the domain dies): its frames are never reachable
    /// through them after.
    pub fn foreign_drop_domain(&mut self, slot: u16) {
        for pid in 0..self.processes.len() as u16 {
            let Some(p) = self.processes[usize::from(pid)].as_mut() else {
                continue;
            };
            let before = p.foreign.len();
            if !p.foreign.iter().any(|m| m.domain == slot) {
                continue;
            }
            // The kernel changes this process's mappings, not the process:
            // direct-map addresses worked out for its waits may name a page
            // that goes (see `Wait::Recv::exit_buf`); they are found again.
            match &mut p.state {
                State::Blocked(Wait::Recv { exit_buf, .. }) => *exit_buf = 0,
                State::Blocked(Wait::Call { reply_at, .. }) => *reply_at = 0,
                _ => {}
            }
            for i in (0..before).rev() {
                let mine = self.processes[usize::from(pid)]
                    .as_ref()
                    .is_some_and(|p| p.foreign[i].domain == slot);
                if mine {
                    self.foreign_undo(pid, i);
                }
            }
            defmt::info!(
                "domain {=u16} destroyed: the foreign mappings of service {=str} into it torn down",
                slot + 1,
                self.process_name(pid)
            );
        }
    }
}
