//! `dirty_read_1g_ticks` (issue 10, point 7): the service's own work to
//! read and clear a 1 GiB log with 1% of its pages dirty, without the
//! kernel or the altp2m service (their calls answer at once here). The
//! benchmark image gives the service a `bench` handle; it then runs this
//! once at start, timed with RDTSC (on Bochs, instructions), and logs
//! `BENCH dirty_read_1g_ticks=N`.

use crate::logs::{AltFail, Backend, LogDirty, PML_ENTRIES, Ranges};
use ipc_schema::logdirty::{DirtyMode, GfnRange, LdReply, LdRequest, Mechanism};
use ipc_schema::syscall::{SysError, vm_features};

/// 1 GiB of 4 KiB pages.
pub const PAGES: u64 = 1 << 18;
/// One page in this many is dirty.
pub const EVERY: u64 = 100;
const DOMAIN: u16 = 1;

/// A domain of [`PAGES`] whose PML buffers hold every [`EVERY`]th page.
struct Synthetic {
    /// The next page a buffer starts at.
    next: u64,
}

impl Backend for Synthetic {
    fn features(&self) -> u64 {
        vm_features::VMX | vm_features::PML
    }
    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)> {
        (domain == DOMAIN).then_some((1, PAGES))
    }

    fn domain_birth(&mut self, domain: u16) -> Option<u64> {
        (domain == DOMAIN).then_some(1)
    }
    fn room(&self, _: usize) -> bool {
        true
    }
    fn track(&mut self, _: u16, _: GfnRange, _: Option<Mechanism>) -> Result<(), AltFail> {
        Ok(())
    }
    fn dirty_take(&mut self, _: u16, _: u64) -> Result<(Ranges, Option<u64>), AltFail> {
        Ok((Ranges::new(), None))
    }
    fn rearm(&mut self, _: u16, _: &Ranges) -> Result<(), AltFail> {
        Ok(())
    }
    fn altp2m_restarted(&mut self) -> bool {
        false
    }
    fn writes_log(&mut self, _: u16, _: bool) -> Result<(), SysError> {
        Ok(())
    }
    fn pml_start(&mut self, _: u16) -> Result<(), SysError> {
        Ok(())
    }
    fn pml_stop(&mut self, _: u16) -> Result<(), SysError> {
        Ok(())
    }
    fn pml_take(&mut self, _: u16) -> Result<(u16, u8), SysError> {
        Ok((0, 0))
    }
    fn pml_read(&self, _: u16, _: u8, out: &mut [u64; PML_ENTRIES]) -> bool {
        // The CPU fills a buffer from its last slot down.
        for (i, e) in out.iter_mut().enumerate() {
            *e = (self.next + (PML_ENTRIES - 1 - i) as u64 * EVERY) << 12;
        }
        true
    }
    fn domain_writes(&mut self, _: u16, _: &mut [[u64; 2]]) -> Result<(usize, bool), SysError> {
        Ok((0, false))
    }
}

/// Fills a 1 GiB PML log with 1% of its pages, then times reading it
/// with clear to the end with `clock`: (ticks, pages read), or `None` if
/// the log could not be made.
pub fn read_1g(clock: impl Fn() -> u64) -> Option<(u64, u64)> {
    let mut b = Synthetic { next: 0 };
    let mut logs = LogDirty::default();
    let start = LdRequest::Start {
        domain: DOMAIN,
        log: 0,
        range: None,
        mode: DirtyMode::Pml,
    };
    if !matches!(logs.request(&mut b, 1, &start), LdReply::Started { .. }) {
        return None;
    }
    let per_buffer = PML_ENTRIES as u64 * EVERY;
    while b.next < PAGES {
        let entries = (PAGES - b.next).div_ceil(EVERY).min(PML_ENTRIES as u64) as u16;
        logs.pml_full(&b, DOMAIN, 0, entries);
        b.next += per_buffer;
    }
    let t0 = clock();
    let mut pages = 0;
    let mut from = 0;
    loop {
        let read = LdRequest::Read {
            domain: DOMAIN,
            log: 0,
            from,
            clear: true,
        };
        match logs.request(&mut b, 1, &read) {
            LdReply::Dirty { ranges, next } => {
                pages += ranges.0.iter().map(|r| r.count).sum::<u64>();
                match next {
                    Some(g) => from = g,
                    None => break,
                }
            }
            _ => return None,
        }
    }
    Some((clock().wrapping_sub(t0), pages))
}

#[cfg(test)]
mod tests {
    extern crate std;

    #[test]
    fn the_synthetic_log_reads_one_page_in_a_hundred_once() {
        let (_, pages) = super::read_1g(|| 0).expect("the log is made and read");
        assert_eq!(pages, super::PAGES.div_ceil(super::EVERY));
    }
}
