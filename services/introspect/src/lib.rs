//! The introspect service's logic (issue 13, point 1): requests of the
//! `parallax/introspect` interface answered over a [`Guest`], the kernel's
//! calls in the service (`main.rs`) and a model in the host tests.
//!
//! Guest-virtual addresses are translated through the guest's own page
//! tables (`service_pagewalk`), read through the same guest memory, in the
//! paging mode the vCPU's CR0, CR4 and EFER select; a read or write that
//! crosses a page is translated page by page.
#![cfg_attr(not(test), no_std)]

use ipc_schema::introspect::{
    Address, CHUNK, IntroError, IntroReply, IntroRequest, REGS_PER_REPLY, Translation,
};
use ipc_schema::ipc::BoundedVec;
use ipc_schema::syscall::{SysError, regs};
use service_pagewalk::{GuestMemory, Paging, WalkError, paging_mode};

#[cfg(test)]
mod tests;

/// Why a register set failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetError {
    /// VM entry would refuse this register's value.
    Refused(usize),
    Sys(SysError),
}

/// The kernel's side: guest memory and vCPU registers of a domain.
pub trait Guest {
    fn read(&mut self, domain: u16, gpa: u64, out: &mut [u8]) -> Result<(), SysError>;
    fn write(&mut self, domain: u16, gpa: u64, bytes: &[u8]) -> Result<(), SysError>;
    fn regs(&mut self, domain: u16, vcpu: u16) -> Result<[u64; regs::COUNT], SysError>;
    fn set_regs(
        &mut self,
        domain: u16,
        vcpu: u16,
        values: &[u64; regs::COUNT],
        mask: u64,
    ) -> Result<(), SetError>;
}

/// A domain's memory as the page walker reads it.
struct Memory<'a, G> {
    guest: &'a mut G,
    domain: u16,
}

impl<G: Guest> GuestMemory for Memory<'_, G> {
    type Error = SysError;
    fn read_u64(&mut self, gpa: u64) -> Result<u64, SysError> {
        let mut b = [0u8; 8];
        self.guest.read(self.domain, gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn read_u32(&mut self, gpa: u64) -> Result<u32, SysError> {
        let mut b = [0u8; 4];
        self.guest.read(self.domain, gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// A kernel refusal of a memory access at `gpa` or of a domain.
fn memory_error(e: SysError, gpa: u64) -> IntroError {
    match e {
        SysError::BadAddress => IntroError::OutsideRam { gpa },
        SysError::BadArgument | SysError::OutOfScope => IntroError::NoSuchDomain,
        SysError::MissingRight => IntroError::NotAllowed,
        SysError::Busy => IntroError::ProtectedRunning,
        other => IntroError::Kernel { error: other as u8 },
    }
}

/// A kernel refusal of the `len` bytes at `gpa`: as [`memory_error`], a
/// span that is not all RAM named by where it stops being RAM (the first of
/// its pages, at most two, refused alone; its start if none is): a read
/// across the end of RAM names the end, not where the read began.
fn span_error(g: &mut impl Guest, domain: u16, e: SysError, gpa: u64, len: usize) -> IntroError {
    if e != SysError::BadAddress {
        return memory_error(e, gpa);
    }
    let end = gpa.saturating_add(len as u64);
    let mut at = gpa;
    while at < end {
        if g.read(domain, at, &mut [0u8]) == Err(SysError::BadAddress) {
            return IntroError::OutsideRam { gpa: at };
        }
        let Some(next) = (at | 0xfff).checked_add(1) else {
            break;
        };
        at = next;
    }
    IntroError::OutsideRam { gpa }
}

/// A register read or set refused by the kernel.
fn regs_error(e: SysError) -> IntroError {
    match e {
        SysError::Busy => IntroError::NotPaused,
        SysError::MissingRight => IntroError::NotAllowed,
        SysError::BadArgument | SysError::OutOfScope => IntroError::NoSuchDomain,
        other => IntroError::Kernel { error: other as u8 },
    }
}

/// The domain a request is about and the right it needs (a
/// `manifest::introspection` bit): `read` to read and translate, `write`
/// to write and set registers.
pub fn needs(request: &IntroRequest) -> (u16, u8) {
    use ipc_schema::manifest::introspection::{READ, WRITE};
    match *request {
        IntroRequest::Read { domain, .. }
        | IntroRequest::Translate { domain, .. }
        | IntroRequest::Regs { domain, .. } => (domain, READ),
        IntroRequest::Write { domain, .. } | IntroRequest::SetRegs { domain, .. } => {
            (domain, WRITE)
        }
    }
}

/// Answers one request, unless `check(domain, right)` refuses it: no such
/// domain (`NoSuchDomain`, whatever the rights: a careless id is named as
/// such), or the manifest's `introspection` for the caller does not give
/// the right (`NotAllowed`).
pub fn answer(
    g: &mut impl Guest,
    request: &IntroRequest,
    check: impl FnOnce(u16, u8) -> Result<(), IntroError>,
) -> IntroReply {
    let (domain, right) = needs(request);
    if let Err(e) = check(domain, right) {
        return IntroReply::Refused(e);
    }
    match run(g, request) {
        Ok(reply) => reply,
        Err(e) => IntroReply::Refused(e),
    }
}

fn run(g: &mut impl Guest, request: &IntroRequest) -> Result<IntroReply, IntroError> {
    match *request {
        IntroRequest::Read { domain, at, len } => {
            let len = usize::from(len);
            if len > CHUNK {
                return Err(IntroError::BadLength);
            }
            let mut out = heapless::Vec::<u8, CHUNK>::new();
            out.resize(len, 0).map_err(|_| IntroError::BadLength)?;
            for_pieces(g, domain, at, len, |g, gpa, range| {
                let n = range.len();
                g.read(domain, gpa, &mut out[range])
                    .map_err(|e| span_error(g, domain, e, gpa, n))
            })?;
            Ok(IntroReply::Bytes(BoundedVec(out)))
        }
        IntroRequest::Write {
            domain,
            at,
            ref bytes,
        } => {
            let bytes = &bytes.0;
            for_pieces(g, domain, at, bytes.len(), |g, gpa, range| {
                let n = range.len();
                g.write(domain, gpa, &bytes[range])
                    .map_err(|e| span_error(g, domain, e, gpa, n))
            })?;
            Ok(IntroReply::Done)
        }
        IntroRequest::Translate {
            domain,
            vcpu,
            cr3,
            gva,
        } => translate(g, domain, vcpu, cr3, gva).map(IntroReply::Translated),
        IntroRequest::Regs { domain, vcpu, half } => {
            if half > 1 {
                return Err(IntroError::NoSuchRegister {
                    index: half.saturating_mul(REGS_PER_REPLY as u8),
                });
            }
            let all = vcpu_regs(g, domain, vcpu)?;
            let first = usize::from(half) * REGS_PER_REPLY;
            let mut values = [0u64; REGS_PER_REPLY];
            values.copy_from_slice(&all[first..first + REGS_PER_REPLY]);
            Ok(IntroReply::Regs {
                first: first as u8,
                values,
            })
        }
        IntroRequest::SetRegs {
            domain,
            vcpu,
            ref values,
        } => {
            let mut all = [0u64; regs::COUNT];
            let mut mask = 0u64;
            for &(index, value) in values.0.iter() {
                let i = usize::from(index);
                if i >= regs::COUNT || regs::SETTABLE & 1 << i == 0 {
                    return Err(IntroError::NoSuchRegister { index });
                }
                all[i] = value;
                mask |= 1 << i;
            }
            if vcpu != 0 {
                return Err(IntroError::NoSuchVcpu);
            }
            g.set_regs(domain, vcpu, &all, mask).map_err(|e| match e {
                SetError::Refused(i) => IntroError::BadRegister { index: i as u8 },
                SetError::Sys(e) => regs_error(e),
            })?;
            Ok(IntroReply::Done)
        }
    }
}

/// A vCPU's registers (domains have one vCPU, number 0).
fn vcpu_regs(g: &mut impl Guest, domain: u16, vcpu: u16) -> Result<[u64; regs::COUNT], IntroError> {
    if vcpu != 0 {
        return Err(IntroError::NoSuchVcpu);
    }
    g.regs(domain, vcpu).map_err(regs_error)
}

/// Where `gva` leads in the vCPU's paging mode, through the tables of
/// `cr3` (`None`: the vCPU's).
fn translate(
    g: &mut impl Guest,
    domain: u16,
    vcpu: u16,
    cr3: Option<u64>,
    gva: u64,
) -> Result<Translation, IntroError> {
    let (paging, cr3) = tables(g, domain, vcpu, cr3)?;
    walk(g, domain, paging, cr3, gva)
}

/// The paging mode of the vCPU and the tables to walk: those of `cr3`
/// (`None`: the vCPU's).
fn tables(
    g: &mut impl Guest,
    domain: u16,
    vcpu: u16,
    cr3: Option<u64>,
) -> Result<(Paging, u64), IntroError> {
    let r = vcpu_regs(g, domain, vcpu)?;
    let paging = paging_mode(r[regs::CR0], r[regs::CR4], r[regs::EFER]);
    Ok((paging, cr3.unwrap_or(r[regs::CR3])))
}

/// Where `gva` leads through the tables of `cr3` in mode `paging`.
fn walk(
    g: &mut impl Guest,
    domain: u16,
    paging: Paging,
    cr3: u64,
    gva: u64,
) -> Result<Translation, IntroError> {
    let mut memory = Memory { guest: g, domain };
    let t = service_pagewalk::translate(&mut memory, paging, cr3, gva).map_err(|e| match e {
        WalkError::NotPresent(entry) => IntroError::NotPresent {
            level: level_number(entry.level),
            entry_gpa: entry.gpa,
            entry: entry.value,
        },
        WalkError::Reserved { entry, .. } => IntroError::Reserved {
            level: level_number(entry.level),
            entry_gpa: entry.gpa,
            entry: entry.value,
        },
        WalkError::NonCanonical { gva, .. } | WalkError::AboveFourGiB { gva } => {
            IntroError::BadAddress { gva }
        }
        WalkError::Memory { gpa, error, .. } => match error {
            SysError::BadAddress => IntroError::TableOutsideRam { gpa },
            other => memory_error(other, gpa),
        },
    })?;
    Ok(Translation {
        gpa: t.gpa,
        page_size: t.size.bytes(),
        writable: t.writable,
        user: t.user,
        executable: !t.no_execute,
        cr3,
    })
}

/// The SDM's level number of an entry (PTE 1 ... PML5E 5).
fn level_number(level: service_pagewalk::Level) -> u8 {
    use service_pagewalk::Level as L;
    match level {
        L::Pt => 1,
        L::Pd => 2,
        L::Pdpt => 3,
        L::Pml4 => 4,
        L::Pml5 => 5,
    }
}

/// Calls `f(guest, gpa, range)` for each piece of `len` bytes at `at`: one
/// guest-physical span, or, for a guest-virtual address, one per page it
/// touches (each translated on its own).
fn for_pieces<G: Guest>(
    g: &mut G,
    domain: u16,
    at: Address,
    len: usize,
    mut f: impl FnMut(&mut G, u64, core::ops::Range<usize>) -> Result<(), IntroError>,
) -> Result<(), IntroError> {
    match at {
        Address::Physical(gpa) => {
            gpa.checked_add(len as u64).ok_or(IntroError::BadLength)?;
            f(g, gpa, 0..len)
        }
        Address::Virtual { vcpu, cr3, gva } => {
            // The vCPU's mode and tables, read once for every page.
            let (paging, cr3) = tables(g, domain, vcpu, cr3)?;
            let mut done = 0;
            while done < len {
                let here = gva.wrapping_add(done as u64);
                let in_page = (4096 - (here & 0xfff)) as usize;
                let n = in_page.min(len - done);
                let t = walk(g, domain, paging, cr3, here)?;
                f(g, t.gpa, done..done + n)?;
                done += n;
            }
            Ok(())
        }
    }
}
