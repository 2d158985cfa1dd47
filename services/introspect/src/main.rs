//! introspect: guest memory and vCPU registers for agents on the host
//! (the console passes `ControlRequest::Introspect` on) and for services
//! (issue 13, point 1; docs/introspection.md). The logic is in `lib.rs`;
//! here are the kernel's calls it runs on: FOREIGN_MAP and FOREIGN_UNMAP
//! for guest memory (each page mapped, copied, unmapped, so that no
//! mapping outlives a request: a protected domain is never kept paused by
//! this service; FM-1..FM-3), VCPU_REGS for registers, all through the
//! `domains` handle (rights `read`, and `write` for writes and register
//! sets).

#![no_std]
#![no_main]

use ipc_schema::introspect::{INTROSPECT, IntroError, IntroRequest};
use ipc_schema::ipc::InterfaceId;
use ipc_schema::manifest::introspection;
use ipc_schema::syscall::layout::MAP_BASE;
use ipc_schema::syscall::{DomainState, FOREIGN_PAGES, Handle, SysError, regs};
use service_introspect::{Guest, SetError, answer};
use service_runtime::ipc::{self, Message, Service};
use service_runtime::require;
use service_runtime::rights::Rights;
use service_runtime::sys::{self, SetRegsError};

service_runtime::entry!(main);
service_runtime::interfaces!(INTROSPECT);

/// The kernel, through the `domains` handle.
struct Kernel {
    domains: Handle,
}

const PAGE: u64 = 4096;
/// Where a guest page is mapped while it is copied.
const WINDOW: u64 = MAP_BASE;

impl Kernel {
    /// Maps the pages holding the `len` bytes at `gpa` (writable with
    /// `write`), runs `copy(at, offset, n)` over them (`n` bytes of the
    /// span from `offset` lie at `at`), and unmaps them: no mapping
    /// outlives the request. Nothing is mapped, so nothing copied, when any
    /// page of a span of up to `FOREIGN_PAGES` pages (a request is at most
    /// two) is not RAM: the kernel checks them all first.
    fn mapped(
        &mut self,
        domain: u16,
        gpa: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), SysError> {
        // A span that wraps is not guest RAM.
        gpa.checked_add(len as u64).ok_or(SysError::BadAddress)?;
        let most = (FOREIGN_PAGES * PAGE) as usize;
        let mut done = 0;
        while done < len {
            let at = gpa + done as u64;
            let n = (len - done).min(most - (at % PAGE) as usize);
            let pages = (at % PAGE + n as u64).div_ceil(PAGE);
            sys::foreign_map(self.domains, domain, at / PAGE, pages, WINDOW, write)?;
            copy((WINDOW + at % PAGE) as *mut u8, done, n);
            if let Err(e) = sys::foreign_unmap(WINDOW, pages) {
                defmt::error!(
                    "introspect: unmapping guest pages at {=u64:#x}: {}",
                    at / PAGE,
                    e
                );
            }
            done += n;
        }
        Ok(())
    }
}

impl Guest for Kernel {
    fn read(&mut self, domain: u16, gpa: u64, out: &mut [u8]) -> Result<(), SysError> {
        let len = out.len();
        let dst = out.as_mut_ptr();
        let mapped = self.mapped(domain, gpa, len, false, |at, offset, n| {
            // Safety: `at` lies in the pages just mapped at WINDOW, `n`
            // bytes of them from there; `offset + n <= out.len()`.
            unsafe { core::ptr::copy_nonoverlapping(at.cast_const(), dst.add(offset), n) }
        });
        match mapped {
            // A shared page (docs/sharing.md) is never mapped into a
            // service: the kernel copies it out instead (DOMAIN_READ).
            Err(SysError::BadAddress) => {
                sys::domain_read(self.domains, domain, gpa, out).map_err(|_| SysError::BadAddress)
            }
            other => other,
        }
    }
    fn write(&mut self, domain: u16, gpa: u64, bytes: &[u8]) -> Result<(), SysError> {
        let mapped = self.mapped(domain, gpa, bytes.len(), true, |at, offset, n| {
            // Safety: as in `read`, the pages mapped writable.
            unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr().add(offset), at, n) }
        });
        match mapped {
            // A fork's page that still maps its parent's frame is never
            // mapped into a service: the kernel writes it (DOMAIN_WRITE),
            // giving the fork its copy first; a shared page it refuses.
            Err(SysError::BadAddress) => sys::domain_write(self.domains, domain, gpa, bytes)
                .map_err(|_| SysError::BadAddress),
            other => other,
        }
    }
    fn regs(&mut self, domain: u16, vcpu: u16) -> Result<[u64; regs::COUNT], SysError> {
        sys::vcpu_regs(self.domains, domain, vcpu)
    }
    fn set_regs(
        &mut self,
        domain: u16,
        vcpu: u16,
        values: &[u64; regs::COUNT],
        mask: u64,
    ) -> Result<(), SetError> {
        sys::vcpu_set_regs(self.domains, domain, vcpu, values, mask).map_err(|e| match e {
            SetRegsError::Refused(i) => SetError::Refused(i),
            SetRegsError::Sys(e) => SetError::Sys(e),
        })
    }
}

struct Server {
    requests: Handle,
    kernel: Kernel,
    /// What the manifest lets each caller do to each domain.
    rights: Rights,
}

impl Service for Server {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        (slot == self.requests).then_some(INTROSPECT)
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        let rights = &mut self.rights;
        let domains = self.kernel.domains;
        let answer = ipc::decode::<IntroRequest>(msg.bytes).map(|r| {
            answer(&mut self.kernel, &r, |domain, right| {
                let Ok((state, birth)) = sys::domain_state_birth(domains, domain) else {
                    return Err(IntroError::NoSuchDomain);
                };
                if rights.allows(msg.badge, domain, right, Some(birth)) {
                    // Nothing runs in an ended domain: a write there could
                    // only be lost with it.
                    if right == introspection::WRITE && !DomainState::live(state) {
                        return Err(IntroError::Ended);
                    }
                    return Ok(());
                }
                defmt::warn!(
                    "introspect: caller {=u64:#x} may not `{=str}` domain {=u16} (the manifest's introspection); refused",
                    msg.badge,
                    service_runtime::rights::name(right),
                    domain
                );
                Err(IntroError::NotAllowed)
            })
        });
        ipc::encode_reply(&answer, reply)
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

fn main() -> ! {
    let requests = require("introspect");
    let domains = require("domains");
    defmt::info!("introspect: serving guest memory and registers");
    let mut server = Server {
        requests,
        kernel: Kernel { domains },
        rights: Rights::new(service_runtime::handle("supervisor")),
    };
    ipc::serve(&mut server, 1 << requests)
}
