//! altp2m: owner of every domain's alternate views.
//!
//! It serves two endpoints: `violations`, where the kernel sends each
//! domain's EPT violations (filled lazily or reported), and `altp2m`, where
//! the vmm forwards guests' view requests and other services ask directly.
//! It holds a `domains` handle with the views and vCPU-control rights, and
//! nothing that reads or writes guest memory.

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, AltReply, AltRequest};
use ipc_schema::ipc::{InterfaceId, IpcError};
use ipc_schema::syscall::{EptOp, EptResult, Handle, MAX_EPT_OPS, SysError, VcpuOp};
use ipc_schema::vmexit::VMEXIT;
use service_altp2m::policy::{self, Kernel};
use service_runtime::ipc::{self, Message, Service};
use service_runtime::{require, sys};

service_runtime::entry!(main);
service_runtime::interfaces!(ALTP2M, VMEXIT);

struct System {
    domains: Handle,
    features: u64,
}

impl Kernel for System {
    fn features(&self) -> u64 {
        self.features
    }

    fn view_create(&mut self, domain: u16) -> Result<u16, SysError> {
        sys::view_create(self.domains, domain)
    }

    fn view_destroy(&mut self, domain: u16, view: u16) -> Result<(), SysError> {
        sys::view_destroy(self.domains, domain, view)
    }

    fn view_set_visible(&mut self, domain: u16, view: u16, visible: bool) -> Result<(), SysError> {
        sys::view_set_visible(self.domains, domain, view, visible)
    }

    fn ept(&mut self, domain: u16, ops: &[EptOp], out: &mut [EptResult]) -> Result<(), SysError> {
        let mut list: ipc_schema::ipc::BoundedVec<EptOp, MAX_EPT_OPS> =
            ipc_schema::ipc::BoundedVec::new();
        list.0
            .extend_from_slice(ops)
            .map_err(|_| SysError::BadArgument)?;
        let mut encoded = [0u8; 1024];
        let bytes = postcard::to_slice(&list, &mut encoded).map_err(|_| SysError::BadArgument)?;
        let mut results = [0u8; 1024];
        let n = sys::ept_ops(self.domains, domain, bytes, &mut results)?;
        let got: ipc_schema::ipc::BoundedVec<EptResult, MAX_EPT_OPS> =
            postcard::from_bytes(&results[..n]).map_err(|_| SysError::BadArgument)?;
        for (o, r) in out.iter_mut().zip(got.0.iter()) {
            *o = *r;
        }
        Ok(())
    }

    fn vcpu_control(
        &mut self,
        domain: u16,
        vcpu: u16,
        op: VcpuOp,
        arg: u64,
    ) -> Result<(), SysError> {
        sys::vcpu_control(self.domains, domain, vcpu, op, arg)
    }

    fn dirty_read(&mut self, domain: u16, out: &mut [u64]) -> Result<(usize, bool), SysError> {
        sys::dirty_read(self.domains, domain, out)
    }
}

struct Server {
    violations: Handle,
    requests: Handle,
    system: System,
}

impl Service for Server {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        if slot == self.violations {
            Some(VMEXIT)
        } else if slot == self.requests {
            Some(ALTP2M)
        } else {
            None
        }
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        if msg.slot == self.violations {
            let Some(m) = ipc_schema::exitcodec::decode_message(msg.bytes) else {
                defmt::warn!(
                    "altp2m: a message on the violation endpoint that is not an exit (badge {=u64})",
                    msg.badge
                );
                return ipc::encode_reply::<()>(&Err(IpcError::Malformed), reply);
            };
            let answer = policy::violation(&mut self.system, &m);
            return ipc_schema::exitcodec::encode_reply(&answer, reply).unwrap_or(0);
        }
        let answer = ipc::decode::<AltRequest>(msg.bytes).map(|r| match r {
            AltRequest::Ping => AltReply::Pong,
            AltRequest::Guest {
                domain,
                vcpu,
                request,
            } => AltReply::Guest(policy::request(&mut self.system, domain, vcpu, &request)),
        });
        ipc::encode_reply(&answer, reply)
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

fn main() -> ! {
    let violations = require("violations");
    let requests = require("altp2m");
    let system = System {
        domains: require("domains"),
        features: sys::vm_features(),
    };
    defmt::info!(
        "altp2m: serving views (generation {=u32})",
        service_runtime::generation()
    );
    let mut server = Server {
        violations,
        requests,
        system,
    };
    ipc::serve(&mut server, (1 << violations) | (1 << requests))
}
