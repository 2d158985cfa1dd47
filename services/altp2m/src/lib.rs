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

/// Drops what the service keeps for every domain that has ended (gone, or
/// exited, crashed or destroyed): its views' records, mode, listener,
/// policy and waiting events. A domain id is given again to the next
/// domain created after a destroy, which must not inherit any of it. The
/// ids forgotten, lowest first.
pub fn forget_ended(
    alt: &mut policy::Altp2m,
    events: &mut events::Events,
    k: &mut impl policy::Kernel,
) -> Vec<u16> {
    let mut ids: Vec<u16> = alt
        .domains
        .keys()
        .copied()
        .chain(events.domains())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.retain(|&id| !matches!(k.domain_info(id), Some((0..=2, _))));
    for &id in &ids {
        alt.forget(id);
        events.forget(id);
    }
    ids
}

#[cfg(test)]
mod tests;
