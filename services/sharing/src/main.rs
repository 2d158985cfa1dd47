//! sharing: copy-on-write page sharing between domains (SH-1..SH-4,
//! docs/sharing.md).
//!
//! Endpoint it serves: `sharing`, its clients' requests
//! (`ipc_schema::sharing`: nominate, share, unshare, status). It keeps the
//! handles it gave and the references of every shared frame; every change
//! to the entries is the altp2m service's, asked on its `altp2m-share`
//! endpoint (docs/p2m.md, rule 3), which also breaks the shares a guest
//! writes to and records the breaks for this service to take.
//!
//! It holds the `domains` handle with `read` only (which domains still
//! exist, and, for a deduplication scan, the pages' contents, copied by the
//! kernel with DOMAIN_READ), never a frame's address. A restarted instance starts with no
//! handles: the kernel's shared frames stay shared, and are unshared by
//! name (`Unshare`) or by the guests' writes.

#![no_std]
#![no_main]

extern crate alloc;

use ipc_schema::altp2m::{ALTP2M, AltReply, AltRequest};
use ipc_schema::ipc::InterfaceId;
use ipc_schema::sharing::{SHARING, ShRequest};
use ipc_schema::syscall::{Handle, SysError};
use service_runtime::ipc::{self, CallError, Client, Message, Service};
use service_runtime::{require, sys};
use service_sharing::{Owner, Sharing};

service_runtime::entry!(main);
service_runtime::interfaces!(SHARING);
service_heap::heap!(2 << 20);

struct System {
    domains: Handle,
    altp2m: Client,
}

impl Owner for System {
    fn ask(&mut self, r: &AltRequest) -> Option<AltReply> {
        for _ in 0..2 {
            match self.altp2m.call_once::<_, AltReply>(r) {
                Ok(a) => return Some(a),
                // A restarted owner: asked again.
                Err(CallError::Sys(SysError::Dead)) => {}
                Err(e) => {
                    defmt::warn!("sharing: the altp2m service did not answer: {}", e);
                    return None;
                }
            }
        }
        None
    }

    fn birth(&mut self, domain: u16) -> Option<u64> {
        sys::domain_birth(self.domains, domain).ok()
    }

    fn pages(&mut self, domain: u16) -> Option<u64> {
        match sys::domain_info(self.domains, domain) {
            // Building, running or paused.
            Ok((0..=2, _, ram)) => Some(ram / 4096),
            _ => None,
        }
    }

    fn read(&mut self, domain: u16, gfn: u64, out: &mut [u8]) -> bool {
        gfn.checked_mul(4096)
            .is_some_and(|gpa| sys::domain_read(self.domains, domain, gpa, out).is_ok())
    }
}

struct Server {
    requests: Handle,
    system: System,
    sharing: Sharing,
}

impl Service for Server {
    type State = ();

    fn interface(&self, slot: Handle) -> Option<InterfaceId> {
        (slot == self.requests).then_some(SHARING)
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        let answer = ipc::decode::<ShRequest>(msg.bytes).map(|r| {
            let a = self.sharing.request(&mut self.system, &r);
            if let ipc_schema::sharing::ShReply::Error(e) = a {
                defmt::info!("sharing: {} refused: {}", msg.badge, e);
            }
            a
        });
        ipc::encode_reply(&answer, reply)
    }

    fn notified(&mut self, _: Handle, _: u64) {}
    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

fn main() -> ! {
    let requests = require("sharing");
    let mut server = Server {
        requests,
        system: System {
            domains: require("domains"),
            altp2m: Client::new(require("altp2m"), ALTP2M),
        },
        sharing: Sharing::default(),
    };
    defmt::info!(
        "sharing: serving page sharing (generation {=u32})",
        service_runtime::generation()
    );
    let mask = 1 << server.requests;
    ipc::serve(&mut server, mask)
}
