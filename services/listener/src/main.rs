//! listener: an altp2m violation listener inside the hypervisor (ALT-4).
//!
//! At start it attaches itself as the listener of every domain that exists
//! (ids 1 to 16). Then it waits in `NextEvent` calls to the altp2m service,
//! each carrying its answer to the event before: `SwitchView(0)`, so that
//! the vCPU retries the access in the host view. One round trip per event.
//! `cargo hv bench` uses it to time a violation's whole path (fault, event,
//! answer, resume) without the serial line of an external agent.

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, Action, AltReply, AltRequest, short};
use ipc_schema::ipc::IpcError;
use service_runtime::ipc::{self, Client};
use service_runtime::require;

service_runtime::entry!(main);

fn main() -> ! {
    let mut altp2m = Client::new(require("altp2m"), ALTP2M);
    let mut domains = 0u32;
    for domain in 1..=16 {
        if let Ok(AltReply::Done) =
            altp2m.call::<_, AltReply>(&AltRequest::Listen { domain, on: true })
        {
            domains += 1;
        }
    }
    defmt::info!(
        "listener: answering the violations of {=u32} domain(s) with a switch to view 0",
        domains
    );
    let mut answer = None;
    loop {
        // The call and its event by the short ways (fixed-width, no serde
        // on the path; of the event only its id, the answer being the
        // same for every event); any other reply through postcard.
        match altp2m.call_encoded(|out| short::encode_next_event(answer, out)) {
            Ok(bytes) => {
                if let Some(id) = short::event_reply_id(bytes) {
                    answer = Some((id, Action::SwitchView(0)));
                    continue;
                }
                match ipc::decode::<Result<AltReply, IpcError>>(bytes) {
                    Ok(Err(e)) => defmt::warn!("listener: NextEvent: {}", e),
                    other => defmt::warn!(
                        "listener: NextEvent answered otherwise (refused: {=bool})",
                        matches!(other, Ok(Ok(AltReply::Refused(_))))
                    ),
                }
            }
            Err(e) => defmt::warn!("listener: NextEvent: {}", e),
        }
        answer = None;
        service_runtime::sys::yield_now();
    }
}
