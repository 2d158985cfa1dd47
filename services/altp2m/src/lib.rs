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

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// The birth (DOMAIN_INFO's) of each domain the service keeps something
/// for, noted when it began to: a domain id is given again to the next
/// domain made after a destroy, and the `domain-ends` notification says
/// only that some domain ended, so the id alone cannot tell a new domain
/// from the one the records are of (the new one may even be made before
/// the service hears of the end).
#[derive(Default, Debug)]
pub struct Births(pub BTreeMap<u16, u64>);

impl Births {
    /// Notes the birth of each domain with records and none noted, and
    /// drops those of domains without records (after every request: only
    /// a request begins records).
    pub fn note(
        &mut self,
        alt: &policy::Altp2m,
        events: &events::Events,
        k: &mut impl policy::Kernel,
    ) {
        let ids = kept_for(alt, events);
        self.0.retain(|id, _| ids.binary_search(id).is_ok());
        for id in ids {
            if let alloc::collections::btree_map::Entry::Vacant(e) = self.0.entry(id)
                && let Some(b) = k.domain_birth(id)
            {
                e.insert(b);
            }
        }
    }
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
    let mut ids = kept_for(alt, events);
    ids.retain(|&id| {
        let reborn = births
            .0
            .get(&id)
            .is_some_and(|&b| k.domain_birth(id) != Some(b));
        reborn || !matches!(k.domain_info(id), Some((0..=2, _)))
    });
    for &id in &ids {
        alt.forget(id);
        events.forget(id);
        births.0.remove(&id);
    }
    ids
}

#[cfg(test)]
mod tests;
