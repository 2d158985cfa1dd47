//! Who may introspect which domain (the manifest's `introspection`, issue
//! 13, point 3), for the services that act on domains for their callers
//! (altp2m, introspect). The supervisor answers for a caller's badge; the
//! answer is kept, and asked again once per caller and domain before a
//! refusal (the domain may have been created since), so that a caller
//! whose requests are refused does not cost a supervisor call each.
//! Without a supervisor handle every check fails: a service never acts on
//! a domain nobody said it may.
//!
//! The rights are the manifest's for the domain that has an id now, and a
//! destroyed domain's id goes to the next domain made (a fork of another
//! parent, say): the caller gives each check the domain's birth
//! (`sys::domain_birth`), and what was known is forgotten when the birth
//! under an id changed, so that rights over a domain gone are never
//! rights over the new one.

use crate::ipc::Client;
use ipc_schema::manifest::{MAX_DOMAINS, introspection};
use ipc_schema::supervisor::{SUPERVISOR, SupervisorReply, SupervisorRequest};
use ipc_schema::syscall::Handle;

/// The callers asked about, at most this many at once (then the oldest
/// is forgotten).
const KEPT: usize = 16;

pub struct Rights {
    supervisor: Option<Client>,
    /// (badge, its rights by domain, the domains asked about again).
    known: heapless::Vec<(u64, [u8; MAX_DOMAINS], u32), KEPT>,
    /// The birth of the domain under each id when `known` was last right
    /// for it (0: none seen).
    births: [u64; MAX_DOMAINS],
}

impl Rights {
    /// Asks the supervisor through `supervisor` (`None`: nobody may do
    /// anything).
    pub fn new(supervisor: Option<Handle>) -> Self {
        Self {
            supervisor: supervisor.map(|h| Client::new(h, SUPERVISOR)),
            known: heapless::Vec::new(),
            births: [0; MAX_DOMAINS],
        }
    }

    /// Whether the caller with `badge` has `right` (an `introspection` bit)
    /// over domain `domain`, whose birth is `birth` (`None`: no domain has
    /// the id).
    pub fn allows(&mut self, badge: u64, domain: u16, right: u8, birth: Option<u64>) -> bool {
        let noted = usize::from(domain)
            .checked_sub(1)
            .and_then(|i| self.births.get_mut(i));
        if let Some(noted) = noted
            && *noted != birth.unwrap_or(0)
        {
            // Another domain has the id now: nothing known holds for it.
            self.known.clear();
            *noted = birth.unwrap_or(0);
        }
        let has = |r: &[u8; MAX_DOMAINS]| {
            usize::from(domain)
                .checked_sub(1)
                .and_then(|i| r.get(i))
                .is_some_and(|bits| bits & right != 0)
        };
        let again = 1u32.checked_shl(u32::from(domain)).unwrap_or(0);
        match self.known.iter_mut().find(|(b, ..)| *b == badge) {
            Some((_, r, _)) if has(r) => return true,
            Some((.., asked)) if *asked & again != 0 => return false,
            Some((.., asked)) => *asked |= again,
            None => {}
        }
        // Not known, or refused by what was known: ask (again).
        match self.ask(badge, again) {
            Some(r) => has(&r),
            None => false,
        }
    }

    fn ask(&mut self, badge: u64, asked: u32) -> Option<[u8; MAX_DOMAINS]> {
        let reply = self
            .supervisor
            .as_mut()?
            .call::<_, SupervisorReply>(&SupervisorRequest::IntrospectionRights { client: badge });
        let SupervisorReply::Rights(r) = reply.ok()? else {
            return None;
        };
        let asked = self
            .known
            .iter()
            .find(|(b, ..)| *b == badge)
            .map_or(asked, |&(.., a)| a | asked);
        self.known.retain(|(b, ..)| *b != badge);
        if self.known.is_full() {
            self.known.remove(0);
        }
        let _ = self.known.push((badge, r, asked));
        Some(r)
    }
}

/// The name of a right, for refusals in logs.
pub fn name(right: u8) -> &'static str {
    introspection::name(right)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rights known for badge 1: every right over every domain.
    fn knowing() -> Rights {
        let mut r = Rights::new(None);
        let _ = r.known.push((1, [0xff; MAX_DOMAINS], 0));
        r
    }

    #[test]
    fn rights_over_a_domain_gone_are_not_rights_over_the_new_one_with_its_id() {
        let events = introspection::EVENTS;
        // (No supervisor: what is asked anew is refused.)
        let mut r = knowing();
        assert!(
            !r.allows(1, 2, events, Some(7)),
            "a first sight: what was known of no birth is asked again"
        );
        let mut r = knowing();
        r.births[1] = 7;
        assert!(r.allows(1, 2, events, Some(7)), "known, the same domain");
        assert!(
            r.allows(1, 3, events, None),
            "another id: no domain there yet"
        );
        assert!(!r.allows(1, 2, events, Some(9)), "a new domain under id 2");
        assert!(!r.allows(1, 2, events, Some(9)), "and still not known");
    }
}
