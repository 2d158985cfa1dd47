//! listener: an altp2m violation listener inside the hypervisor (ALT-4).
//!
//! At start it attaches itself as the listener of every domain that exists
//! (ids 1 to 16). Whenever the altp2m service signals `altp2m-events`, it
//! fetches the new events and answers each with `SwitchView(0)`: the vCPU
//! retries the access in the host view. `cargo hv bench` uses it to time a
//! violation's whole path (fault, event, answer, resume) without the
//! serial line of an external agent.

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, Action, AltReply, AltRequest};
use ipc_schema::ipc::InterfaceId;
use ipc_schema::syscall::Handle;
use service_runtime::ipc::{self, Client, Message, Service};
use service_runtime::require;

service_runtime::entry!(main);

struct Listener {
    altp2m: Client,
    events: Handle,
    /// The number of the last event seen.
    last: u32,
    answered: u32,
}

impl Listener {
    fn ask(&mut self, r: &AltRequest) -> Option<AltReply> {
        match self.altp2m.call::<_, AltReply>(r) {
            Ok(a) => Some(a),
            Err(e) => {
                defmt::warn!("listener: the altp2m service did not answer: {}", e);
                None
            }
        }
    }
}

impl Service for Listener {
    type State = ();

    fn interface(&self, _: Handle) -> Option<InterfaceId> {
        None
    }

    fn handle(&mut self, _: Message<'_>, reply: &mut [u8]) -> usize {
        ipc::encode_reply::<()>(&Err(ipc_schema::ipc::IpcError::Malformed), reply)
    }

    fn notified(&mut self, slot: Handle, _bits: u64) {
        if slot != self.events {
            return;
        }
        loop {
            let Some(AltReply::Events { events, .. }) =
                self.ask(&AltRequest::Events { after: self.last })
            else {
                return;
            };
            if events.0.is_empty() {
                return;
            }
            for e in events.0.iter() {
                self.last = e.id;
                // Answered already (or by someone else): nothing to do.
                if let Some(AltReply::Done) = self.ask(&AltRequest::Answer {
                    event: e.id,
                    action: Action::SwitchView(0),
                }) {
                    self.answered = self.answered.wrapping_add(1);
                }
            }
        }
    }

    fn snapshot(&self) {}
    fn restore(&mut self, _: ()) {}
}

fn main() -> ! {
    let mut l = Listener {
        altp2m: Client::new(require("altp2m"), ALTP2M),
        events: require("altp2m-events"),
        last: u32::MAX,
        answered: 0,
    };
    let mut domains = 0u32;
    for domain in 1..=16 {
        if let Some(AltReply::Done) = l.ask(&AltRequest::Listen { domain, on: true }) {
            domains += 1;
        }
    }
    defmt::info!(
        "listener: answering the violations of {=u32} domain(s) with a switch to view 0",
        domains
    );
    let mask = 1 << l.events;
    ipc::serve(&mut l, mask)
}
