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

    /// Of `kept` (the ids with records), those whose records are of a
    /// domain that is gone: no domain has the id now, one of another birth
    /// than the one noted has it, or it is not live (`now(id)`: whether the
    /// domain under the id is live, and its birth; a service whose records
    /// outlive a domain's end says live). Their births are forgotten; the
    /// caller drops their records.
    pub fn ended(
        &mut self,
        kept: &[u16],
        mut now: impl FnMut(u16) -> Option<(bool, u64)>,
    ) -> heapless::Vec<u16, { MAX_DOMAINS + 1 }> {
        let mut ended = heapless::Vec::new();
        for &id in kept {
            let now = now(id);
            if now.is_none_or(|(live, _)| !live) || self.gone(id, now.map(|(_, b)| b)) {
                self.forget(id);
                let _ = ended.push(id);
            }
        }
        ended
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_are_the_gone_the_reborn_and_the_not_live_and_their_births_go() {
        let mut b = Births::default();
        b.note(&[1, 2, 3, 4], |id| Some(u64::from(id) * 10));
        // 1 the same and live; 2 reborn; 3 gone; 4 the same, not live.
        let now = |id: u16| match id {
            1 => Some((true, 10)),
            2 => Some((true, 99)),
            3 => None,
            _ => Some((false, 40)),
        };
        assert_eq!(b.ended(&[1, 2, 3, 4], now).as_slice(), &[2, 3, 4]);
        assert_eq!(
            (b.of(1), b.of(2), b.of(3), b.of(4)),
            (Some(10), None, None, None)
        );
        assert!(b.ended(&[1], now).is_empty());
    }
}
