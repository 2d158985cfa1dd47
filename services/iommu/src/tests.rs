//! The bookkeeping against a reference model, over a model of the unit:
//! its tables, and what its IOTLB may still hold until an invalidation
//! completes. `released` is checked there: a frame released while a table
//! or the IOTLB still reaches it is the early free of XSA-346.

use super::*;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use proptest::prelude::*;

service_runtime::host_logger!();

/// Domain 1 has RAM gfns 0..64, domain 2 0..32, domain 3 none.
fn ram(domain: u16, gfn: u64) -> bool {
    match domain {
        1 => gfn < 64,
        2 => gfn < 32,
        _ => false,
    }
}

#[derive(Default)]
struct Unit {
    spaces: Vec<Vec<Device>>,
    /// (space, bfn) -> (domain, gfn, writable).
    tables: BTreeMap<(u32, u64), (u16, u64, bool)>,
    /// Translations the IOTLB may hold: removed from the tables, not yet
    /// invalidated. Always empty between calls (the unmap waits).
    stale: BTreeSet<(u16, u64)>,
    /// Refuse the next unmap (an invalidation that did not complete).
    fail_unmap: bool,
    released: Vec<(u16, u64)>,
    invalidations: u32,
    /// Domains whose state or birth a test changed: (live, birth). Any
    /// other is live, its birth its id.
    doms: BTreeMap<u16, (bool, u64)>,
}

impl Kernel for Unit {
    fn domain(&mut self, domain: u16) -> Option<(bool, u64)> {
        Some(
            self.doms
                .get(&domain)
                .copied()
                .unwrap_or((true, u64::from(domain))),
        )
    }
    fn space_for(&mut self, devices: &[Device]) -> Option<u32> {
        self.spaces.push(devices.to_vec());
        Some(self.spaces.len() as u32 - 1)
    }
    fn map(
        &mut self,
        space: u32,
        domain: u16,
        pairs: &[(u64, u64)],
        writable: bool,
    ) -> Result<(), Option<usize>> {
        if let Some(i) = pairs.iter().position(|&(g, _)| !ram(domain, g)) {
            return Err(Some(i));
        }
        if pairs
            .iter()
            .any(|&(_, b)| self.tables.contains_key(&(space, b)))
        {
            return Err(None);
        }
        for &(g, b) in pairs {
            self.tables.insert((space, b), (domain, g, writable));
        }
        Ok(())
    }
    fn unmap(&mut self, space: u32, bfns: &[u64]) -> Result<u32, UnmapError> {
        if self.fail_unmap {
            self.fail_unmap = false;
            return Err(UnmapError::Failed);
        }
        if bfns.iter().any(|b| !self.tables.contains_key(&(space, *b))) {
            return Err(UnmapError::NotMapped);
        }
        for b in bfns {
            let (d, g, _) = self.tables.remove(&(space, *b)).unwrap();
            self.stale.insert((d, g));
        }
        // The invalidation completes before the call returns.
        self.stale.clear();
        self.invalidations += 1;
        Ok(1)
    }
    fn released(&mut self, domain: u16, gfn: u64) {
        assert!(
            !self.stale.contains(&(domain, gfn)),
            "frame ({domain}, {gfn:#x}) released before the IOTLB invalidation completed"
        );
        assert!(
            !self
                .tables
                .values()
                .any(|&(d, g, _)| (d, g) == (domain, gfn)),
            "frame ({domain}, {gfn:#x}) released while a table still maps it"
        );
        self.released.push((domain, gfn));
    }
}

const A: u64 = 1;
const B: u64 = 2;

fn two_backends(k: &mut Unit) -> Iommu {
    let mut s = Iommu::default();
    s.register(k, A, &[(0, 0x18)], &[1], 0);
    s.register(k, B, &[(0, 0x20)], &[1, 2], 0);
    s
}

#[test]
fn a_backend_gets_bus_frames_and_each_frame_is_referenced_while_mapped() {
    let mut k = Unit::default();
    let mut s = two_backends(&mut k);
    let bfn = s.map(&mut k, A, 1, 10, 4, true).unwrap();
    assert_eq!(bfn, BUS_FIRST, "bus frames, not the gfns or host frames");
    let again = s.map(&mut k, B, 1, 12, 4, false).unwrap();
    assert_eq!(again, BUS_FIRST, "each backend has its own bus space");
    assert_eq!(s.references(1, 12), 2);
    assert_eq!(s.references(1, 10), 1);
    assert_eq!(k.spaces, vec![vec![(0, 0x18)], vec![(0, 0x20)]]);
    // IO-3: one invalidation for the batch, references gone only after.
    assert_eq!(s.unmap(&mut k, A, bfn, 4), Ok((4, 1)));
    assert_eq!(s.references(1, 12), 1);
    assert_eq!(k.released, vec![(1, 10), (1, 11)]);
}

#[test]
fn refusals_name_what_was_wrong_and_change_nothing() {
    let mut k = Unit::default();
    let mut s = two_backends(&mut k);
    let bfn = s.map(&mut k, A, 1, 0, 2, true).unwrap();
    let before = (s.refs.clone(), k.tables.clone());
    assert_eq!(
        s.map(&mut k, A, 2, 0, 1, true),
        Err(IommuError::NotAClient { domain: 2 })
    );
    assert_eq!(
        s.map(&mut k, A, 1, 63, 2, true),
        Err(IommuError::NotRam { gfn: 64 })
    );
    assert_eq!(
        s.map(&mut k, A, 1, u64::MAX, 2, true),
        Err(IommuError::NotRam { gfn: u64::MAX })
    );
    assert_eq!(
        s.map(&mut k, A, 1, 0, 0, true),
        Err(IommuError::BadCount { count: 0 })
    );
    assert_eq!(
        s.map(&mut k, A, 1, 0, 513, true),
        Err(IommuError::BadCount { count: 513 })
    );
    assert_eq!(s.map(&mut k, 9, 1, 0, 1, true), Err(IommuError::NoDevice));
    // A forged or another backend's bus frame number (IO-1).
    assert_eq!(
        s.unmap(&mut k, A, bfn + 1, 2),
        Err(IommuError::NotMapped { bfn: bfn + 2 })
    );
    assert_eq!(
        s.unmap(&mut k, B, bfn, 1),
        Err(IommuError::NotMapped { bfn })
    );
    assert_eq!(
        s.unmap(&mut k, A, u64::MAX, 2),
        Err(IommuError::NotMapped { bfn: u64::MAX })
    );
    // An invalidation that fails keeps the references.
    k.fail_unmap = true;
    assert_eq!(s.unmap(&mut k, A, bfn, 2), Err(IommuError::Kernel));
    assert_eq!((s.refs.clone(), k.tables.clone()), before);
    assert!(k.released.is_empty());
}

#[test]
fn clients_change_at_run_time_and_removal_tears_down_first() {
    let mut k = Unit::default();
    let mut s = two_backends(&mut k);
    assert_eq!(s.add_client(A, 2), Ok(()));
    s.map(&mut k, A, 2, 5, 3, true).unwrap();
    s.map(&mut k, A, 1, 5, 1, true).unwrap();
    assert_eq!(s.remove_client(&mut k, A, 2), Ok(3));
    assert_eq!(s.references(2, 5), 0);
    assert_eq!(s.references(1, 5), 1, "the other client's mapping stays");
    assert_eq!(
        s.map(&mut k, A, 2, 5, 1, true),
        Err(IommuError::NotAClient { domain: 2 })
    );
    assert_eq!(s.add_client(7, 1), Err(IommuError::NoSuchBackend));
    // A restart (new generation) tears down; the same generation changes nothing.
    s.register(&mut k, A, &[(0, 0x18)], &[1], 0);
    assert_eq!(s.references(1, 5), 1);
    s.register(&mut k, A, &[(0, 0x18)], &[1], 1);
    assert_eq!(s.references(1, 5), 0);
    assert!(k.tables.is_empty());
    assert_eq!(
        k.spaces.len(),
        1,
        "the IoSpace is kept for the new instance"
    );
}

#[test]
fn a_domain_destroyed_behind_the_service_is_torn_down_page_by_page() {
    let mut k = Unit::default();
    let mut s = two_backends(&mut k);
    s.map(&mut k, B, 1, 0, 4, true).unwrap();
    // The kernel unmapped one page itself (its domain was destroyed).
    let gone = *k.tables.keys().next().unwrap();
    k.tables.remove(&gone);
    assert_eq!(s.teardown_domain(&mut k, 1), 4);
    assert!(k.tables.is_empty());
    assert!(s.refs.is_empty());
}

#[test]
fn a_new_domain_given_an_ended_ones_id_is_not_charged_with_its_mappings() {
    let mut k = Unit::default();
    let mut s = two_backends(&mut k);
    s.map(&mut k, B, 2, 0, 4, true).unwrap();
    s.map(&mut k, B, 1, 0, 2, true).unwrap();
    s.note_births(&mut k);
    assert!(
        s.forget_ended(&mut k).is_empty(),
        "both live, the same births"
    );
    // Domain 2 destroyed (the kernel took its pages) and its id given to a
    // new domain before the end was heard.
    k.tables.retain(|_, (d, _, _)| *d != 2);
    k.doms.insert(2, (true, 7));
    assert_eq!(s.forget_ended(&mut k), vec![(2, 4)]);
    assert_eq!(s.backends[&B].maps.len(), 2, "domain 1's stay");
    // The new domain's own mapping, then the old one's end heard: it stays.
    let bfn = s.map(&mut k, B, 2, 8, 1, true).unwrap();
    s.note_births(&mut k);
    assert!(s.forget_ended(&mut k).is_empty());
    assert_eq!(s.references(2, 8), 1);
    // Its own end (exited: still there, not live) takes it.
    k.doms.insert(2, (false, 7));
    assert_eq!(s.forget_ended(&mut k), vec![(2, 1)]);
    assert!(!s.backends[&B].maps.contains_key(&bfn));
    assert_eq!(s.references(2, 8), 0);
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        backend: u64,
        domain: u16,
        gfn: u64,
        count: u32,
        writable: bool,
    },
    Unmap {
        backend: u64,
        at: usize,
        count: u32,
    },
    Forged {
        backend: u64,
        bfn: u64,
    },
    FailNext,
    AddClient {
        backend: u64,
        domain: u16,
    },
    RemoveClient {
        backend: u64,
        domain: u16,
    },
    BackendDies {
        backend: u64,
    },
    DomainEnds {
        domain: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let backend = prop_oneof![Just(A), Just(B), Just(3u64)];
    let domain = 1u16..4;
    prop_oneof![
        4 => (backend.clone(), domain.clone(), 0u64..70, 1u32..20, any::<bool>())
            .prop_map(|(backend, domain, gfn, count, writable)| Op::Map { backend, domain, gfn, count, writable }),
        3 => (backend.clone(), any::<usize>(), 1u32..8).prop_map(|(backend, at, count)| Op::Unmap { backend, at, count }),
        1 => (backend.clone(), 0u64..0x400).prop_map(|(backend, bfn)| Op::Forged { backend, bfn }),
        1 => Just(Op::FailNext),
        1 => (backend.clone(), domain.clone()).prop_map(|(backend, domain)| Op::AddClient { backend, domain }),
        1 => (backend.clone(), domain.clone()).prop_map(|(backend, domain)| Op::RemoveClient { backend, domain }),
        1 => backend.prop_map(|backend| Op::BackendDies { backend }),
        1 => domain.prop_map(|domain| Op::DomainEnds { domain }),
    ]
}

proptest! {
    /// Random maps, unmaps (of real, partial and forged ranges), failing
    /// invalidations, client changes, backend deaths and domain ends: after
    /// every step the service's mappings equal the reference model's, the
    /// unit's tables hold exactly them, every frame's reference count is
    /// the number of bus frames mapping it, no frame was released early
    /// (checked inside the unit model), and each successful unmap took one
    /// invalidation.
    #[test]
    fn bookkeeping_matches_a_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut k = Unit::default();
        let mut s = Iommu::default();
        s.register(&mut k, A, &[(0, 0x18)], &[1], 0);
        s.register(&mut k, B, &[(0, 0x20), (0, 0x21)], &[1, 2], 0);
        s.register(&mut k, 3, &[], &[1], 0);
        // The model: backend -> bfn -> (domain, gfn); backend -> clients.
        let mut model: BTreeMap<u64, BTreeMap<u64, (u16, u64)>> = BTreeMap::new();
        let mut clients: BTreeMap<u64, BTreeSet<u16>> =
            [(A, [1].into()), (B, [1, 2].into()), (3, [1].into())].into();
        let mut generation = 0;
        for op in ops {
            match op {
                Op::Map { backend, domain, gfn, count, writable } => {
                    let r = s.map(&mut k, backend, domain, gfn, count, writable);
                    let ok = backend != 3
                        && clients[&backend].contains(&domain)
                        && (gfn..gfn + u64::from(count)).all(|g| ram(domain, g));
                    prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
                    if let Ok(first) = r {
                        let m = model.entry(backend).or_default();
                        for i in 0..u64::from(count) {
                            prop_assert!(m.insert(first + i, (domain, gfn + i)).is_none(), "bus frame given twice");
                        }
                    }
                }
                Op::Unmap { backend, at, count } => {
                    let m = model.entry(backend).or_default();
                    if m.is_empty() { continue; }
                    let first = *m.keys().nth(at % m.len()).unwrap();
                    let all = (first..first + u64::from(count)).all(|b| m.contains_key(&b));
                    let before = k.invalidations;
                    let r = s.unmap(&mut k, backend, first, count);
                    prop_assert_eq!(r.is_ok(), all, "{:?}", r);
                    if all {
                        prop_assert_eq!(k.invalidations, before + 1, "one invalidation per batch");
                        for b in first..first + u64::from(count) { m.remove(&b); }
                    }
                }
                Op::Forged { backend, bfn } => {
                    let mapped = model.get(&backend).is_some_and(|m| m.contains_key(&bfn));
                    let r = s.unmap(&mut k, backend, bfn, 1);
                    if !mapped {
                        prop_assert_eq!(r, Err(IommuError::NotMapped { bfn }));
                    } else {
                        prop_assert!(r.is_ok());
                        model.get_mut(&backend).unwrap().remove(&bfn);
                    }
                }
                Op::FailNext => {
                    // The next unmap's invalidation fails: whatever it was,
                    // nothing is released and the model stays.
                    k.fail_unmap = true;
                    if let Some((&backend, m)) = model.iter().find(|(_, m)| !m.is_empty()) {
                        let first = *m.keys().next().unwrap();
                        let released = k.released.len();
                        prop_assert_eq!(s.unmap(&mut k, backend, first, 1), Err(IommuError::Kernel));
                        prop_assert_eq!(k.released.len(), released);
                    }
                    k.fail_unmap = false;
                }
                Op::AddClient { backend, domain } => {
                    s.add_client(backend, domain).unwrap();
                    clients.get_mut(&backend).unwrap().insert(domain);
                }
                Op::RemoveClient { backend, domain } => {
                    s.remove_client(&mut k, backend, domain).unwrap();
                    clients.get_mut(&backend).unwrap().remove(&domain);
                    model.entry(backend).or_default().retain(|_, (d, _)| *d != domain);
                }
                Op::BackendDies { backend } => {
                    generation += 1;
                    let (devices, list) = match backend {
                        A => (vec![(0, 0x18)], vec![1]),
                        B => (vec![(0, 0x20), (0, 0x21)], vec![1, 2]),
                        _ => (vec![], vec![1]),
                    };
                    s.register(&mut k, backend, &devices, &list, generation);
                    model.remove(&backend);
                    clients.insert(backend, list.into_iter().collect());
                }
                Op::DomainEnds { domain } => {
                    s.teardown_domain(&mut k, domain);
                    for m in model.values_mut() { m.retain(|_, (d, _)| *d != domain); }
                }
            }
            // The service against the model, the unit against both.
            for (&backend, m) in &model {
                let got: BTreeMap<u64, (u16, u64)> = s.backends[&backend].maps.clone();
                prop_assert_eq!(&got, m);
                let space = s.backends[&backend].space;
                for (&bfn, &(d, g)) in m {
                    let entry = k.tables.get(&(space.unwrap(), bfn)).map(|&(d, g, _)| (d, g));
                    prop_assert_eq!(entry, Some((d, g)));
                }
            }
            prop_assert_eq!(k.tables.len(), model.values().map(BTreeMap::len).sum::<usize>());
            let mut counts: BTreeMap<(u16, u64), u32> = BTreeMap::new();
            for m in model.values() { for &f in m.values() { *counts.entry(f).or_default() += 1; } }
            prop_assert_eq!(&s.refs, &counts);
        }
    }
}
