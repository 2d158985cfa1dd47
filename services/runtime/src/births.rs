//! Telling a new domain from an old one of the same id: a domain id is
//! given again to the next domain made after a destroy, and a service may
//! hear of the end (DOMAIN_WATCH) only after the new domain exists. Each
//! domain's birth (DOMAIN_INFO, [`crate::sys::domain_birth`]) is never
//! given again: a service notes the birth of each domain it keeps records
//! for, and forgets the records when the birth under the id changed.

use ipc_schema::manifest::MAX_DOMAINS;

/// The birth noted for each domain id (1 to [`MAX_DOMAINS`]; 0: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Births([u64; MAX_DOMAINS + 1]);

impl Births {
    /// Notes, for each domain in `kept` (those with records) with no birth
    /// noted, the birth `birth` gives; forgets the births of the others.
    pub fn note(&mut self, kept: &[u16], mut birth: impl FnMut(u16) -> Option<u64>) {
        for (id, noted) in self.0.iter_mut().enumerate() {
            let id = id as u16;
            if !kept.contains(&id) {
                *noted = 0;
            } else if *noted == 0 {
                *noted = birth(id).unwrap_or(0);
            }
        }
    }

    /// Whether the records of domain `id` are of a domain that is gone:
    /// none has the id now (`now` is `None`), or one of another birth than
    /// the one noted.
    pub fn gone(&self, id: u16, now: Option<u64>) -> bool {
        let noted = self.0.get(usize::from(id)).copied().unwrap_or(0);
        now.is_none_or(|b| noted != 0 && noted != b)
    }

    /// Forgets domain `id`'s birth (its records went).
    pub fn forget(&mut self, id: u16) {
        if let Some(noted) = self.0.get_mut(usize::from(id)) {
            *noted = 0;
        }
    }

    /// The birth noted for domain `id`, if any.
    pub fn of(&self, id: u16) -> Option<u64> {
        self.0.get(usize::from(id)).copied().filter(|&b| b != 0)
    }
}
