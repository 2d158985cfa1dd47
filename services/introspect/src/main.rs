//! introspect: guest memory and vCPU registers for agents on the host
//! (the console passes `ControlRequest::Introspect` on) and for services
//! (issue 13, point 1; docs/introspection.md). The logic is in `lib.rs`;
//! here are the kernel's calls it runs on: DOMAIN_READ and DOMAIN_WRITE
//! for guest memory, VCPU_REGS for registers, all through the `domains`
//! handle (rights `read`, and `write` for writes and register sets).

#![no_std]
#![no_main]

use ipc_schema::introspect::{INTROSPECT, IntroRequest};
use ipc_schema::ipc::InterfaceId;
use ipc_schema::syscall::{Handle, SysError, regs};
use service_introspect::{Guest, SetError, answer};
use service_runtime::ipc::{self, Message, Service};
use service_runtime::rights::Rights;
use service_runtime::sys::{self, SetRegsError};
use service_runtime::{require, sys::domain_read};

service_runtime::entry!(main);
service_runtime::interfaces!(INTROSPECT);

/// The kernel, through the `domains` handle.
struct Kernel {
    domains: Handle,
}

impl Guest for Kernel {
    fn read(&mut self, domain: u16, gpa: u64, out: &mut [u8]) -> Result<(), SysError> {
        domain_read(self.domains, domain, gpa, out)
    }
    fn write(&mut self, domain: u16, gpa: u64, bytes: &[u8]) -> Result<(), SysError> {
        sys::domain_write(self.domains, domain, gpa, bytes)
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
        let answer = ipc::decode::<IntroRequest>(msg.bytes).map(|r| {
            answer(&mut self.kernel, &r, |domain, right| {
                let ok = rights.allows(msg.badge, domain, right);
                if !ok {
                    defmt::warn!(
                        "introspect: caller {=u64:#x} may not `{=str}` domain {=u16} (the manifest's introspection); refused",
                        msg.badge,
                        service_runtime::rights::name(right),
                        domain
                    );
                }
                ok
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
