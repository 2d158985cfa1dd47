//! The altp2m service's logic: the views' model and its operations
//! ([`policy`]), violations and their listener ([`events`]), and the range
//! map the access settings live in ([`intervals`]). The binary (`main.rs`)
//! connects it to the kernel and the other services.

#![no_std]

extern crate alloc;

pub mod events;
pub mod fast;
pub mod intervals;
pub mod policy;
pub mod sharing;
pub mod tracking;

use alloc::vec::Vec;
use service_runtime::births::Births;

/// Notes the birth of each domain the service keeps records for (after
/// every request: only a request begins records; [`Births`]).
pub fn note_births(
    births: &mut Births,
    alt: &policy::Altp2m,
    events: &events::Events,
    k: &mut impl policy::Kernel,
) {
    births.note(&kept_for(alt, events), |id| k.domain_birth(id));
}

/// Every domain the service keeps something for, lowest first.
fn kept_for(alt: &policy::Altp2m, events: &events::Events) -> Vec<u16> {
    let mut ids: Vec<u16> = alt
        .domains
        .keys()
        .copied()
        .chain(events.domains())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Drops what the service keeps for every domain that has ended (gone, or
/// exited, crashed or destroyed) or whose id a new domain has since been
/// given (its birth is not the one noted): its views' records, mode,
/// listener, policy and waiting events. The new domain must not inherit
/// any of it. The ids forgotten, lowest first.
pub fn forget_ended(
    alt: &mut policy::Altp2m,
    events: &mut events::Events,
    births: &mut Births,
    k: &mut impl policy::Kernel,
) -> Vec<u16> {
    let ended = births.ended(&kept_for(alt, events), |id| {
        let live = k
            .domain_info(id)
            .is_some_and(|(state, _)| ipc_schema::syscall::DomainState::live(state));
        Some((live, k.domain_birth(id)?))
    });
    for &id in &ended {
        alt.forget(id);
        events.forget(id);
    }
    ended.to_vec()
}

#[cfg(test)]
mod tests;
