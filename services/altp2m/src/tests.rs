//! Host tests of the altp2m service's logic against a model of the kernel's
//! EPT tables, and a property test against a reference model of the
//! effective mapping of every (view, gfn) (ALT-6..ALT-10).

extern crate std;

use crate::events::{Events, Outcome, STEP_PAGES};
use crate::policy::{Agent, Altp2m, Kernel, Quotas, Reset};
use ipc_schema::altp2m::{Action, AltError, NoListener};
use ipc_schema::hypercall::{
    Access, Entry, Feature, HcError, Mode, Quota, Relaxing, Reply, Request,
};
use ipc_schema::ipc::BoundedVec;
use ipc_schema::logdirty::{GfnRange, Mechanism};
use ipc_schema::syscall::{
    EptEntry, EptOp, EptOpError, EptResult, Perms, SysError, VcpuOp, vm_features,
};
use ipc_schema::vmexit::{AccessBits, Exit, ExitKind, ExitMessage, ExitRegs, Response};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::vec;
use std::vec::Vec;

service_runtime::host_logger!();

/// Guest RAM: gfns 0..RAM, except the hole.
const RAM: u64 = 48;
/// Not RAM (like the legacy VGA window).
const HOLE: core::ops::Range<u64> = 20..22;
const D: u16 = 1;

fn is_ram(g: u64) -> bool {
    g < RAM && !HOLE.contains(&g)
}

fn perms_of(a: Access) -> Perms {
    Perms {
        read: a.read,
        write: a.write,
        execute: a.execute,
    }
}

/// The kernel as the service sees it: views of 4 KiB entries by gfn.
struct Model {
    features: u64,
    views: BTreeMap<u16, View>,
    /// vCPU 0's view.
    active: u16,
    /// Frames the "kernel" let a write through to (armed entries).
    lifted: Vec<u64>,
    /// EPT entries written (each Map, Protect and page of a ProtectRange).
    writes: u64,
    /// Domain D's state (a `DomainState` code).
    state: u64,
    /// Domain D's birth (a new domain given its id has another).
    birth: u64,
    /// Whether the service's heap has room (`Kernel::room`).
    room: bool,
    /// Page sharing (SH-1..SH-4): shared frame id -> (frame, references).
    shared: BTreeMap<u32, (u64, u32)>,
    /// gfn -> the shared frame id it maps.
    backs: BTreeMap<u64, u32>,
    /// The next shared frame id, and the next new frame (copies).
    next_id: u32,
    next_frame: u64,
    /// Frames in the pool (a copy takes one; a released frame comes back).
    free: u64,
    /// What a frame holds (a frame not here holds its own number).
    contents: BTreeMap<u64, u64>,
}

#[derive(Default, Clone, Debug)]
struct View {
    /// gfn -> (frame gfn, perms)
    map: BTreeMap<u64, (u64, Perms)>,
    /// gfns whose suppress-#VE bit is clear (present or not).
    ve: BTreeSet<u64>,
    /// gfns whose entry has its dirty bit set.
    dirty: BTreeSet<u64>,
    /// gfns whose entry is armed to be lifted on a write (`ArmLift`).
    armed: BTreeSet<u64>,
    visible: bool,
}

impl Model {
    fn new(features: u64) -> Self {
        let mut host = View::default();
        for g in (0..RAM).filter(|&g| is_ram(g)) {
            host.map.insert(g, (g, RWX));
        }
        Self {
            features,
            views: BTreeMap::from([(0, host)]),
            active: 0,
            lifted: Vec::new(),
            writes: 0,
            state: 1,
            birth: 1,
            room: true,
            shared: BTreeMap::new(),
            backs: BTreeMap::new(),
            next_id: 1,
            next_frame: 1000,
            free: 100,
            contents: BTreeMap::new(),
        }
    }

    /// What the kernel does to alternate views when a frame changes
    /// (`shared::forget_in_views`): every entry mapping it is emptied.
    fn forget_in_views(&mut self, frame: u64) {
        for (&v, view) in self.views.iter_mut() {
            if v != 0 {
                view.map.retain(|_, e| e.0 != frame);
            }
        }
    }

    fn is_shared_frame(&self, frame: u64) -> bool {
        self.shared.values().any(|&(f, _)| f == frame)
    }

    /// The kernel's SH-2 net after a range of permissions: shared gfns
    /// lose write and their armed bit.
    fn restrict(&mut self, view: u16, gfn: u64, end: u64) {
        let shared: Vec<u64> = self.backs.range(gfn..end).map(|(&g, _)| g).collect();
        let v = self.views.get_mut(&view).unwrap();
        for g in shared {
            if let Some(e) = v.map.get_mut(&g) {
                e.1.write = false;
                v.armed.remove(&g);
            }
        }
    }

    fn shared_result(&self, id: u32) -> EptResult {
        EptResult::Shared {
            frame: id,
            refs: self.shared.get(&id).map_or(0, |s| s.1),
            free: self.free,
        }
    }

    fn apply(&mut self, op: &EptOp) -> Result<EptResult, EptOpError> {
        let ram = |g: u64| {
            if is_ram(g) {
                Ok(())
            } else {
                Err(EptOpError::NotRam)
            }
        };
        let check = |p: Perms| {
            if p.write && !p.read {
                Err(EptOpError::WriteWithoutRead)
            } else {
                Ok(())
            }
        };
        if !self.views.contains_key(&op.view()) {
            return Err(EptOpError::NoSuchView);
        }
        match *op {
            EptOp::Map {
                view,
                gfn,
                from_gfn,
                perms,
            } => {
                ram(gfn)?;
                ram(from_gfn)?;
                check(perms)?;
                if view == 0 {
                    return Err(EptOpError::HostView);
                }
                let remap = gfn != from_gfn;
                if (remap || perms.write) && self.backs.contains_key(&from_gfn)
                    || remap && self.backs.contains_key(&gfn)
                {
                    return Err(EptOpError::Shared);
                }
                let frame = self.views[&0].map[&from_gfn].0;
                let v = self.views.get_mut(&view).unwrap();
                v.map.insert(gfn, (frame, perms));
                v.dirty.remove(&gfn);
                v.armed.remove(&gfn);
                self.writes += 1;
            }
            EptOp::Unmap { view, gfn } => {
                ram(gfn)?;
                if view == 0 {
                    return Err(EptOpError::HostView);
                }
                self.views.get_mut(&view).unwrap().map.remove(&gfn);
            }
            EptOp::Protect { view, gfn, perms } => {
                ram(gfn)?;
                check(perms)?;
                if perms.write
                    && let Some(&(f, _)) = self.views[&view].map.get(&gfn)
                    && self.is_shared_frame(f)
                {
                    return Err(EptOpError::Shared);
                }
                let v = self.views.get_mut(&view).unwrap();
                v.map.get_mut(&gfn).ok_or(EptOpError::NotMapped)?.1 = perms;
                v.armed.remove(&gfn);
                self.writes += 1;
            }
            EptOp::ProtectRange {
                view,
                gfn,
                count,
                perms,
            } => {
                check(perms)?;
                let end = gfn.checked_add(count).ok_or(EptOpError::NotRam)?;
                if count == 0 || end > RAM {
                    return Err(EptOpError::NotRam);
                }
                let v = self.views.get_mut(&view).unwrap();
                for (g, e) in v.map.range_mut(gfn..end) {
                    e.1 = perms;
                    v.armed.remove(g);
                    self.writes += 1;
                }
                self.restrict(view, gfn, end);
            }
            EptOp::SetSuppressVe {
                view,
                gfn,
                suppress,
            } => {
                ram(gfn)?;
                let v = self.views.get_mut(&view).unwrap();
                if suppress {
                    v.ve.remove(&gfn);
                } else {
                    v.ve.insert(gfn);
                }
            }
            EptOp::Split { gfn, .. } => ram(gfn)?,
            EptOp::SplitRange { gfn, count, .. } => {
                let end = gfn.checked_add(count).ok_or(EptOpError::NotRam)?;
                if count == 0 || end > RAM {
                    return Err(EptOpError::NotRam);
                }
            }
            EptOp::ClearDirty { view, gfn, count } => {
                let end = gfn.checked_add(count).ok_or(EptOpError::NotRam)?;
                if count == 0 || end > RAM {
                    return Err(EptOpError::NotRam);
                }
                let v = self.views.get_mut(&view).unwrap();
                v.dirty.retain(|g| !(gfn..end).contains(g));
            }
            EptOp::ArmLift { view, gfn, count } => {
                let end = gfn.checked_add(count).ok_or(EptOpError::NotRam)?;
                if count == 0 || end > RAM {
                    return Err(EptOpError::NotRam);
                }
                let v = self.views.get_mut(&view).unwrap();
                for (&g, &(_, p)) in v.map.range(gfn..end) {
                    if p.read && !p.write {
                        v.armed.insert(g);
                    }
                }
                self.restrict(view, gfn, end);
            }
            EptOp::MarkDirty { view, gfn } => {
                ram(gfn)?;
                let v = self.views.get_mut(&view).unwrap();
                if !v.map.contains_key(&gfn) {
                    return Err(EptOpError::NotMapped);
                }
                v.dirty.insert(gfn);
            }
            EptOp::CopyHost { view } => {
                if view == 0 {
                    return Err(EptOpError::HostView);
                }
                let host = self.views[&0].clone();
                let v = self.views.get_mut(&view).unwrap();
                (v.map, v.ve, v.dirty, v.armed) = (host.map, host.ve, host.dirty, host.armed);
                self.writes += v.map.len() as u64;
            }
            EptOp::ShareNominate { view, gfn } => {
                ram(gfn)?;
                if view != 0 {
                    return Err(EptOpError::NoSuchView);
                }
                if let Some(&id) = self.backs.get(&gfn) {
                    return Ok(self.shared_result(id));
                }
                let id = self.next_id;
                self.next_id += 1;
                let e = self.views.get_mut(&0).unwrap().map.get_mut(&gfn).unwrap();
                e.1.write = false;
                let frame = e.0;
                self.views.get_mut(&0).unwrap().armed.remove(&gfn);
                self.shared.insert(id, (frame, 1));
                self.backs.insert(gfn, id);
                self.forget_in_views(frame);
                return Ok(self.shared_result(id));
            }
            EptOp::ShareMap {
                view,
                gfn,
                frame: id,
            } => {
                ram(gfn)?;
                if view != 0 {
                    return Err(EptOpError::NoSuchView);
                }
                let &(frame, _) = self.shared.get(&id).ok_or(EptOpError::NoSuchShare)?;
                let host = self.views.get_mut(&0).unwrap();
                let e = host.map.get_mut(&gfn).unwrap();
                if e.0 == frame {
                    return Err(EptOpError::AlreadyShared);
                }
                let old = e.0;
                *e = (
                    frame,
                    Perms {
                        write: false,
                        ..e.1
                    },
                );
                host.armed.remove(&gfn);
                host.dirty.remove(&gfn);
                match self.backs.insert(gfn, id) {
                    Some(j) => {
                        let s = self.shared.get_mut(&j).unwrap();
                        s.1 -= 1;
                        if s.1 == 0 {
                            self.shared.remove(&j);
                            self.free += 1;
                        }
                    }
                    None => self.free += 1,
                }
                self.shared.get_mut(&id).unwrap().1 += 1;
                self.forget_in_views(old);
                return Ok(self.shared_result(id));
            }
            EptOp::Unshare { view, gfn, perms } => {
                ram(gfn)?;
                check(perms)?;
                if view != 0 {
                    return Err(EptOpError::NoSuchView);
                }
                let &id = self.backs.get(&gfn).ok_or(EptOpError::NotShared)?;
                let (frame, refs) = self.shared[&id];
                let own = if refs == 1 {
                    self.shared.remove(&id);
                    frame
                } else {
                    if self.free == 0 {
                        return Err(EptOpError::OutOfMemory);
                    }
                    self.free -= 1;
                    self.shared.get_mut(&id).unwrap().1 -= 1;
                    self.next_frame += 1;
                    let held = self.contents.get(&frame).copied().unwrap_or(frame);
                    self.contents.insert(self.next_frame, held);
                    self.next_frame
                };
                self.backs.remove(&gfn);
                let host = self.views.get_mut(&0).unwrap();
                host.map.insert(gfn, (own, perms));
                host.armed.remove(&gfn);
                host.dirty.remove(&gfn);
                self.forget_in_views(frame);
                return Ok(self.shared_result(id));
            }
            EptOp::Query { view, gfn } => {
                let v = &self.views[&view];
                // As the kernel names a frame: by the gfn the host p2m maps
                // it at (a copy's or a shared frame's too).
                let host = &self.views[&0].map;
                let name = |f: u64| {
                    if host.get(&f).is_some_and(|e| e.0 == f) {
                        f
                    } else {
                        host.iter().find(|(_, e)| e.0 == f).map_or(f, |(&g, _)| g)
                    }
                };
                let mapped = v.map.get(&gfn).map(|&(frame, perms)| EptEntry {
                    frame_gfn: name(frame),
                    size: 0,
                    perms,
                });
                return Ok(EptResult::Entry {
                    mapped,
                    suppress_ve: !v.ve.contains(&gfn),
                });
            }
        }
        Ok(EptResult::Done)
    }
}

const RWX: Perms = Perms {
    read: true,
    write: true,
    execute: true,
};

impl Kernel for Model {
    fn features(&self) -> u64 {
        self.features
    }
    fn view_create(&mut self, _: u16) -> Result<u16, SysError> {
        let id = (1..512)
            .find(|v| !self.views.contains_key(v))
            .ok_or(SysError::NoResources)?;
        self.views.insert(id, View::default());
        Ok(id)
    }
    fn view_destroy(&mut self, _: u16, view: u16) -> Result<(), SysError> {
        if view == self.active {
            return Err(SysError::Busy);
        }
        self.views
            .remove(&view)
            .map(|_| ())
            .ok_or(SysError::BadArgument)
    }
    fn view_set_visible(&mut self, _: u16, view: u16, visible: bool) -> Result<(), SysError> {
        self.views
            .get_mut(&view)
            .ok_or(SysError::BadArgument)?
            .visible = visible;
        Ok(())
    }
    fn ept(&mut self, _: u16, ops: &[EptOp], out: &mut [EptResult]) -> Result<(), SysError> {
        for (op, o) in ops.iter().zip(out.iter_mut()) {
            *o = self.apply(op).unwrap_or_else(EptResult::Error);
        }
        Ok(())
    }
    fn vcpu_set_view(&mut self, _: u16, vcpu: u16, view: u16) -> Result<(), SysError> {
        if vcpu != 0 || !self.views.contains_key(&view) {
            return Err(SysError::BadArgument);
        }
        self.active = view;
        Ok(())
    }
    fn vcpu_view(&mut self, _: u16, vcpu: u16) -> Result<u16, SysError> {
        if vcpu != 0 {
            return Err(SysError::BadArgument);
        }
        Ok(self.active)
    }
    fn vcpu_control(&mut self, _: u16, _: u16, op: VcpuOp, arg: u64) -> Result<(), SysError> {
        match op {
            VcpuOp::VeEnable if self.features & vm_features::VE == 0 => Err(SysError::Unsupported),
            VcpuOp::VeEnable if !is_ram(arg) => Err(SysError::BadArgument),
            _ => Ok(()),
        }
    }
    fn lifted_take(&mut self, _: u16, out: &mut [u64]) -> Result<(usize, bool), SysError> {
        let n = self.lifted.len().min(out.len());
        out[..n].copy_from_slice(&self.lifted[..n]);
        self.lifted.drain(..n);
        Ok((n, !self.lifted.is_empty()))
    }
    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)> {
        (domain == D).then_some((self.state, RAM))
    }
    fn domain_birth(&mut self, domain: u16) -> Option<u64> {
        (domain == D).then_some(self.birth)
    }
    fn room(&self) -> bool {
        self.room
    }
}

/// The service's two halves and the kernel model.
struct Rig {
    k: Model,
    alt: Altp2m,
    ev: Events,
}

const ALL: u64 = vm_features::VMX
    | vm_features::VMFUNC
    | vm_features::VE
    | vm_features::PML
    | vm_features::EXECUTE_ONLY;

impl Rig {
    fn new() -> Self {
        Self::with(ALL)
    }
    fn with(features: u64) -> Self {
        Self {
            k: Model::new(features),
            alt: Altp2m::default(),
            ev: Events::default(),
        }
    }
    fn guest(&mut self, r: Request) -> Reply {
        self.alt
            .request(&mut self.k, D, Agent::Guest { vcpu: 0 }, &r)
    }
    fn host(&mut self, r: Request) -> Reply {
        self.alt.request(&mut self.k, D, Agent::External, &r)
    }
    /// `access` for each of `gfns` in `view`, set by the external agent.
    fn host_access(&mut self, view: u16, gfns: &[u64], access: Access) {
        for &gfn in gfns {
            self.host(Request::SetAccess { view, gfn, access });
        }
    }
    /// Tracking of `count` gfns from `gfn` (LD-2), which must be accepted.
    fn track(&mut self, gfn: u64, count: u64, how: Option<Mechanism>) {
        self.alt
            .track(&mut self.k, D, GfnRange { gfn, count }, how)
            .unwrap();
    }
    fn view(&mut self) -> u16 {
        match self.guest(Request::ViewCreate {
            default_access: None,
        }) {
            Reply::View(v) => v,
            other => panic!("{other:?}"),
        }
    }
    /// A view whose tables hold no entry yet: what ALT-6 allows and the
    /// lazy fill serves (a new view is a copy of the host p2m; the fill
    /// paths are tested on views emptied behind the service's back).
    fn unfilled_view(&mut self) -> u16 {
        let v = self.view();
        let e = self.k.views.get_mut(&v).unwrap();
        (e.map, e.ve, e.dirty, e.armed) = Default::default();
        v
    }
    /// A guest access of `view` at `gfn` that the entry refuses: a write
    /// to an armed entry the "kernel" lets through itself (making the
    /// entry writable and dirty, recording the frame), anything else is a
    /// violation exit to the service.
    fn touch(&mut self, view: u16, gfn: u64, access: Access) -> Outcome {
        if access.write
            && let Some(v) = self.k.views.get_mut(&view)
            && let Some(&(_, p)) = v.map.get(&gfn)
            && (!access.read || p.read)
            && (!access.execute || p.execute)
            && v.armed.remove(&gfn)
        {
            let e = v.map.get_mut(&gfn).expect("armed entries are mapped");
            e.1.write = true;
            v.dirty.insert(gfn);
            let frame = e.0;
            self.k.lifted.push(frame);
            return retry();
        }
        self.exit(view, gfn, access)
    }

    /// The listener 0x77's answer `AllowOnce` to the first waiting event,
    /// which must resume its vCPU with a single step.
    fn allow_once(&mut self) {
        let id = self.ev.waiting[0].event.id;
        let (_, reply) = self
            .ev
            .answer(&mut self.alt, &mut self.k, 0x77, id, Action::AllowOnce)
            .unwrap()
            .unwrap();
        assert!(reply.step);
    }

    /// The end of vCPU 0's single step, at `rip` in `view`.
    fn step_done(&mut self, rip: u64, view: u16) -> Outcome {
        let m = ExitMessage {
            exit: Exit {
                domain: D,
                vcpu: 0,
                kind: ExitKind::MonitorTrap,
                rip,
                instruction_len: 0,
                view,
            },
            regs: ExitRegs::default(),
        };
        self.ev.exit(&mut self.alt, &mut self.k, &m, 1)
    }

    /// A violation exit of `view` at `gfn`.
    fn exit(&mut self, view: u16, gfn: u64, access: Access) -> Outcome {
        let allowed = self
            .k
            .views
            .get(&view)
            .and_then(|v| v.map.get(&gfn))
            .map_or(AccessBits::default(), |&(_, p)| AccessBits {
                read: p.read,
                write: p.write,
                execute: p.execute,
            });
        let m = ExitMessage {
            exit: Exit {
                domain: D,
                vcpu: 0,
                kind: ExitKind::EptViolation {
                    gpa: gfn * 4096 + 0x18,
                    gla: Some(0x7000_0000 + gfn * 4096),
                    access: AccessBits {
                        read: access.read,
                        write: access.write,
                        execute: access.execute,
                    },
                    allowed,
                    qualification: 0x181,
                },
                rip: 0x1234,
                instruction_len: 0,
                view,
            },
            regs: ExitRegs::default(),
        };
        self.ev.exit(&mut self.alt, &mut self.k, &m, 0xabc0 + gfn)
    }
}

/// A listener's filter: gfns `[first, end)`, access kinds `kinds`.
fn filter(first: u64, end: u64, kinds: u8) -> ipc_schema::altp2m::Filter {
    ipc_schema::altp2m::Filter { first, end, kinds }
}

fn retry() -> Outcome {
    Outcome::Reply(ipc_schema::vmexit::ExitReply {
        response: Response::RETRY,
        regs: None,
        view: None,
        step: false,
        rip: None,
    })
}

fn crash() -> Outcome {
    Outcome::Reply(ipc_schema::vmexit::ExitReply {
        response: Response::CRASH,
        ..match retry() {
            Outcome::Reply(r) => r,
            _ => unreachable!(),
        }
    })
}

const W: Access = Access {
    read: false,
    write: true,
    execute: false,
};
const R: Access = Access::R;

/// A rig whose host p2m makes gfn 3 read-execute.
fn rig_with_host_rx_at_3() -> Rig {
    let mut r = Rig::new();
    let set = Request::SetAccess {
        view: 0,
        gfn: 3,
        access: Access::RX,
    };
    assert_eq!(r.host(set), Reply::Done);
    r
}

#[test]
fn a_new_view_is_a_copy_of_the_current_host_p2m() {
    // ALT-10: a host change made before the view exists is what it sees.
    let mut r = rig_with_host_rx_at_3();
    // A suppress-#VE bit cleared in view 0 is view 0's own.
    assert_eq!(
        r.guest(Request::SetSuppressVe {
            view: 0,
            gfn: 8,
            suppress: false
        }),
        Reply::Done
    );
    let v = r.view();
    for g in (0..RAM).filter(|&g| is_ram(g)) {
        let want = if g == 3 { perms_of(Access::RX) } else { RWX };
        assert_eq!(r.k.views[&v].map[&g], (g, want), "gfn {g}");
    }
    assert!(r.k.views[&0].ve.contains(&8) && !r.k.views[&v].ve.contains(&8));
    // A first touch needs nothing of the service.
    assert_eq!(r.touch(v, 2, Access::R), retry());
    assert_eq!(r.touch(v, 3, W), crash(), "read-execute, as the host says");
    // A view with a default access is that access over the copy.
    let n = match r.guest(Request::ViewCreate {
        default_access: Some(Access::RX),
    }) {
        Reply::View(n) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!(r.k.views[&n].map[&2], (2, perms_of(Access::RX)));
    assert_eq!(r.k.views[&n].map[&3], (3, perms_of(Access::RX)));
}

#[test]
fn a_view_without_entries_fills_lazily_from_the_current_host_p2m() {
    // ALT-10: a host change made before the view exists is what it sees.
    let mut r = rig_with_host_rx_at_3();
    let v = r.unfilled_view();
    assert_eq!(r.touch(v, 2, Access::R), retry());
    assert_eq!(r.k.views[&v].map[&2], (2, RWX), "ALT-6: filled on access");
    // gfn 3 fills read-only-execute; the write that faults is reported
    // (no listener: the domain is stopped).
    assert_eq!(r.touch(v, 3, W), crash());
    assert_eq!(r.k.views[&v].map[&3].1, perms_of(Access::RX));
    // Raw and effective queries (ALT-8).
    assert_eq!(
        r.guest(Request::GetEntry {
            view: v,
            gfn: 5,
            raw: true
        }),
        Reply::Entry(Entry {
            frame_gfn: None,
            access: Access::NONE,
            suppress_ve: true
        })
    );
    assert_eq!(
        r.guest(Request::GetEntry {
            view: v,
            gfn: 5,
            raw: false
        }),
        Reply::Entry(Entry {
            frame_gfn: Some(5),
            access: Access::RWX,
            suppress_ve: true
        })
    );
}

#[test]
fn seed_004_sve_on_a_gfn_never_populated_succeeds_and_does_not_populate_it() {
    let mut r = Rig::new();
    let v = r.unfilled_view();
    for _ in 0..2 {
        assert_eq!(
            r.guest(Request::SetSuppressVe {
                view: v,
                gfn: 9,
                suppress: true
            }),
            Reply::Done
        );
    }
    // Setting only SVE never populated (never unshared) the entry.
    assert!(!r.k.views[&v].map.contains_key(&9));
    assert_eq!(
        r.guest(Request::GetSuppressVe { view: v, gfn: 9 }),
        Reply::SuppressVe(true)
    );
    // Clearing it on an empty entry fills the entry, so that a #VE is
    // raised for a restriction, never for a page merely not there yet.
    assert_eq!(
        r.guest(Request::SetSuppressVe {
            view: v,
            gfn: 10,
            suppress: false
        }),
        Reply::Done
    );
    assert_eq!(r.k.views[&v].map[&10], (10, RWX));
    assert!(r.k.views[&v].ve.contains(&10));
    // Access set on an unpopulated entry is kept for the fill (ALT-7).
    assert_eq!(
        r.guest(Request::SetAccess {
            view: v,
            gfn: 11,
            access: R
        }),
        Reply::Done
    );
    assert!(!r.k.views[&v].map.contains_key(&11));
    assert_eq!(r.touch(v, 11, R), retry());
    assert_eq!(r.k.views[&v].map[&11].1, perms_of(R));
}

#[test]
fn host_changes_reach_every_copy_and_keep_the_views_overrides() {
    let mut r = Rig::new();
    let (a, b) = (r.view(), r.view());
    // View a restricts gfn 4 to read; view b remaps gfn 6 to the frame of 7.
    r.guest(Request::SetAccess {
        view: a,
        gfn: 4,
        access: R,
    });
    r.guest(Request::ChangeGfn {
        view: b,
        gfn: 6,
        to: Some(7),
    });
    for g in [4, 6, 7] {
        r.touch(a, g, R);
        r.touch(b, g, R);
    }
    assert_eq!(r.k.views[&b].map[&6].0, 7);
    // The host p2m makes frame 7 read-execute and gfn 4 read-only-execute.
    r.host(Request::SetAccess {
        view: 0,
        gfn: 7,
        access: Access::RX,
    });
    r.host(Request::SetAccess {
        view: 0,
        gfn: 4,
        access: Access::RX,
    });
    // ALT-9: both copies of frame 7 follow, the remap kept.
    assert_eq!(r.k.views[&b].map[&6], (7, perms_of(Access::RX)));
    assert_eq!(r.k.views[&a].map[&7], (7, perms_of(Access::RX)));
    // View a's own setting (read) met with the host's (read-execute).
    assert_eq!(r.k.views[&a].map[&4].1, perms_of(R));
    // change_gfn reset restores the host mapping.
    r.guest(Request::ChangeGfn {
        view: b,
        gfn: 6,
        to: None,
    });
    assert_eq!(r.k.views[&b].map[&6], (6, RWX));
}

#[test]
fn a_range_is_one_record_and_touches_only_the_entries_a_view_holds() {
    let mut r = Rig::new();
    let v = r.unfilled_view();
    r.touch(v, 30, R);
    r.touch(v, 31, R);
    let before = r.k.writes;
    assert_eq!(
        r.guest(Request::SetAccessRange {
            view: v,
            gfn: 24,
            count: 20,
            access: Access::RX
        }),
        Reply::Done
    );
    assert_eq!(r.k.writes - before, 2, "two entries were populated");
    assert_eq!(
        r.alt.domains[&D].views[&v].access.len(),
        1,
        "one record for the range"
    );
    // Across the hole, and past the end of RAM.
    assert_eq!(
        r.guest(Request::SetAccessRange {
            view: v,
            gfn: 10,
            count: 20,
            access: R
        }),
        Reply::Done
    );
    assert_eq!(
        r.guest(Request::SetAccessRange {
            view: v,
            gfn: 40,
            count: 20,
            access: R
        }),
        Reply::Error(HcError::BadRange)
    );
    assert_eq!(
        r.guest(Request::SetAccessRange {
            view: v,
            gfn: 4,
            count: 0,
            access: R
        }),
        Reply::Error(HcError::BadRange)
    );
}

#[test]
fn bad_requests_are_refused_with_the_reason_and_change_nothing() {
    let mut r = Rig::new();
    let v = r.view();
    let err = Reply::Error;
    assert_eq!(
        r.guest(Request::SetAccess {
            view: 77,
            gfn: 1,
            access: R
        }),
        err(HcError::NoSuchView { view: 77 })
    );
    assert_eq!(
        r.guest(Request::ViewDestroy { view: 600 }),
        err(HcError::NoSuchView { view: 600 })
    );
    assert_eq!(
        r.guest(Request::SetAccess {
            view: v,
            gfn: RAM,
            access: R
        }),
        err(HcError::BadGfn { gfn: RAM })
    );
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: v,
            gfn: 1,
            to: Some(HOLE.start)
        }),
        err(HcError::BadGfn { gfn: HOLE.start })
    );
    assert_eq!(
        r.guest(Request::SetAccess {
            view: v,
            gfn: 1,
            access: W
        }),
        err(HcError::BadAccess)
    );
    assert_eq!(
        r.guest(Request::ViewDestroy { view: 0 }),
        err(HcError::HostView)
    );
    // The view the vCPU runs on cannot be destroyed.
    assert_eq!(r.guest(Request::ViewSwitch { view: v }), Reply::Done);
    assert_eq!(r.guest(Request::ViewCurrent), Reply::View(v));
    assert_eq!(
        r.guest(Request::ViewDestroy { view: v }),
        err(HcError::ViewInUse { view: v })
    );
    assert_eq!(r.guest(Request::ViewSwitch { view: 0 }), Reply::Done);
    assert_eq!(r.guest(Request::ViewDestroy { view: v }), Reply::Done);
    assert_eq!(
        r.guest(Request::ViewSwitch { view: v }),
        err(HcError::NoSuchView { view: v })
    );
    let list = Request::SetAccessList {
        view: 0,
        gfns: BoundedVec(heapless::Vec::from_slice(&[1, 2, RAM + 5]).unwrap()),
        access: R,
    };
    assert_eq!(r.host(list), err(HcError::BadGfn { gfn: RAM + 5 }));
}

#[test]
fn modes_decide_what_the_guest_may_ask() {
    let mut r = Rig::new();
    let v = r.view();
    let change = Request::SetAccess {
        view: v,
        gfn: 1,
        access: R,
    };
    r.alt.set_mode(&mut r.k, D, Mode::Limited).unwrap();
    assert_eq!(r.guest(Request::GetMode), Reply::Mode(Mode::Limited));
    // ALT-3: limited: the guest reads, never changes; the host still may.
    assert_eq!(
        r.guest(change.clone()),
        Reply::Error(HcError::ModeForbids {
            mode: Mode::Limited
        })
    );
    assert!(matches!(r.guest(Request::ViewCurrent), Reply::View(0)));
    // As in Xen's limited mode, #VE may be turned on and off.
    assert_eq!(r.guest(Request::VeEnable { info_gfn: 3 }), Reply::Done);
    assert_eq!(r.guest(Request::VeDisable), Reply::Done);
    assert_eq!(r.host(change.clone()), Reply::Done);
    r.alt.set_mode(&mut r.k, D, Mode::External).unwrap();
    assert!(matches!(
        r.guest(Request::ViewCurrent),
        Reply::Error(HcError::ModeForbids { .. })
    ));
    r.alt.set_mode(&mut r.k, D, Mode::Disabled).unwrap();
    assert!(matches!(
        r.host(change.clone()),
        Reply::Error(HcError::ModeForbids { .. })
    ));
    assert!(!r.k.views[&v].visible, "disabled hides every view");
    r.alt.set_mode(&mut r.k, D, Mode::Mixed).unwrap();
    assert_eq!(r.guest(change), Reply::Done);
}

#[test]
fn without_ve_or_pml_the_requests_say_which_feature_is_missing() {
    let mut r = Rig::with(vm_features::VMX);
    assert_eq!(
        r.guest(Request::Capabilities),
        Reply::Capabilities {
            vmfunc: false,
            ve: false,
            pml: false,
            max_views: 512
        }
    );
    assert_eq!(
        r.guest(Request::VeEnable { info_gfn: 2 }),
        Reply::Error(HcError::Unsupported {
            feature: Feature::VirtualizationException
        })
    );
    assert_eq!(
        r.guest(Request::DirtyLogStart {
            range: None,
            mode: ipc_schema::logdirty::DirtyMode::Auto
        }),
        Reply::Error(HcError::WrongService),
        "dirty logs are the logdirty service's"
    );
    let v = r.view();
    assert_eq!(
        r.guest(Request::ViewSetVisible {
            view: v,
            visible: true
        }),
        Reply::Error(HcError::Unsupported {
            feature: Feature::Vmfunc
        })
    );
}

/// Issue 13, point 8: Xen's relaxing access types. rx2rw: read-execute
/// until the first write, which goes through silently and takes execute
/// away, so that running the written page is an event. n2rwx: nothing until
/// the first access, which goes through at once and reaches the listener
/// as an event whose vCPU does not wait.
#[test]
fn rx2rw_and_n2rwx_relax_at_the_first_violation() {
    let mut r = Rig::new();
    let v = r.view();
    let x = Access {
        read: false,
        write: false,
        execute: true,
    };
    for (gfn, relaxing) in [(8, Relaxing::Rx2Rw), (9, Relaxing::N2Rwx)] {
        let set = Request::SetAccessRelaxing {
            view: v,
            gfn,
            relaxing,
        };
        assert_eq!(r.host(set), Reply::Done);
    }
    assert_eq!(r.k.views[&v].map[&8].1, perms_of(Access::RX));
    assert_eq!(r.k.views[&v].map[&9].1, perms_of(Access::NONE));
    r.ev.listen(D, 0x77, true).unwrap();
    // rx2rw: the write goes through with no event.
    assert_eq!(r.touch(v, 8, W), retry());
    assert!(r.ev.waiting.is_empty() && r.ev.log.is_empty());
    assert_eq!(r.k.views[&v].map[&8].1, perms_of(Access::RW));
    let get = Request::GetAccess { view: v, gfn: 8 };
    assert_eq!(r.host(get), Reply::Access(Access::RW));
    // ... and running the written page is a violation.
    assert_eq!(r.touch(v, 8, x), Outcome::Defer { new_event: true });
    let e = r.ev.waiting.pop().unwrap().event;
    assert!(e.paused && e.access.execute);
    // n2rwx: the read goes through and the listener hears of it.
    let outcome = r.touch(v, 9, R);
    assert!(matches!(outcome, Outcome::Tell(a) if a.response == Response::RETRY));
    assert_eq!(r.k.views[&v].map[&9].1, RWX);
    let notice = r.ev.next_for(0x77).unwrap();
    assert!(!notice.paused && notice.access.read && notice.gpa / 4096 == 9);
    let wire = ipc_schema::altp2m::VmEvent::from_bytes(&notice.to_bytes());
    assert_eq!(wire, Some(notice), "the flag survives the wire");
    // Its answer resumes nothing; an access change in it applies.
    let answered = r.ev.answer(
        &mut r.alt,
        &mut r.k,
        0x77,
        notice.id,
        Action::SetAccess(Access::R),
    );
    assert_eq!(answered, Ok(None));
    assert_eq!(r.k.views[&v].map[&9].1, perms_of(Access::R));
    // Once relaxed, never again: the page is an ordinary setting now.
    assert_eq!(r.touch(v, 9, W), Outcome::Defer { new_event: true });
    // Without a listener an n2rwx page relaxes silently.
    let mut r = Rig::new();
    let v = r.view();
    let set = Request::SetAccessRelaxing {
        view: v,
        gfn: 9,
        relaxing: Relaxing::N2Rwx,
    };
    assert_eq!(r.guest(set), Reply::Done);
    assert_eq!(r.touch(v, 9, W), retry());
    assert!(r.ev.waiting.is_empty());
}

/// Issue 13, point 4: several listeners per domain by range and kind. Each
/// event goes to the first attached whose filter takes it, only that one
/// may answer it, one nobody takes goes by the policy, and a listener that
/// leaves hands its waiting events on.
#[test]
fn several_listeners_share_a_domain_by_range_and_kind() {
    use ipc_schema::altp2m::MAX_LISTENERS;
    let mut r = Rig::new();
    let v = r.view();
    r.host_access(v, &[8, 9, 40], Access::NONE);
    let (writes_low, anything_low) = (filter(0, 16, 0b010), filter(0, 32, 0b111));
    r.ev.listen_for(D, 0xa, writes_low).unwrap();
    r.ev.listen_for(D, 0xb, anything_low).unwrap();
    // A write to gfn 8 is A's (attached first, its filter takes it); a
    // read of gfn 9 is B's; a read of gfn 40 is nobody's: the policy.
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    assert_eq!(r.touch(v, 9, R), Outcome::Defer { new_event: true });
    assert_eq!(
        r.touch(v, 40, R),
        crash(),
        "nobody takes it: the crash policy"
    );
    let a = r.ev.next_for(0xa).unwrap();
    let b = r.ev.next_for(0xb).unwrap();
    assert_eq!((a.gpa / 4096, b.gpa / 4096), (8, 9));
    assert_eq!(r.ev.next_for(0xa), None);
    // Only its listener answers an event.
    assert_eq!(
        r.ev.answer(&mut r.alt, &mut r.k, 0xb, a.id, Action::Retry),
        Err(AltError::ListenerBusy)
    );
    assert!(
        r.ev.answer(&mut r.alt, &mut r.k, 0xa, a.id, Action::Retry)
            .unwrap()
            .is_some()
    );
    // A leaves with an event waiting: it goes to B (whose filter takes
    // it), under a new number.
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    let old =
        r.ev.waiting
            .iter()
            .find(|w| w.owner == 0xa)
            .unwrap()
            .event
            .id;
    r.ev.listen(D, 0xa, false).unwrap();
    let moved = r.ev.next_for(0xb).unwrap();
    assert!(moved.gpa / 4096 == 8 && moved.id != old);
    // At most MAX_LISTENERS; one catch-all.
    r.ev.listen(D, 0xc, true).unwrap();
    assert_eq!(r.ev.listen(D, 0xd, true), Err(AltError::ListenerBusy));
    for badge in 0xd..0xd + MAX_LISTENERS as u64 {
        let _ = r.ev.listen_for(D, badge, writes_low);
    }
    assert_eq!(r.ev.listeners[&D].len(), MAX_LISTENERS);
    assert_eq!(
        r.ev.listen_for(D, 0x99, writes_low),
        Err(AltError::TooManyListeners)
    );
    // Changing one's filter is not one more.
    assert_eq!(r.ev.listen_for(D, 0xb, writes_low), Ok(()));
}

/// Issue 13, point 8: allow-once opens a page for one instruction to no
/// more than the host p2m gives its frame, and a write it lets through
/// where dirty tracking protects the frame is logged first (LD-1).
#[test]
fn allow_once_grants_no_more_than_the_host_and_logs_the_write_it_lets_through() {
    let mut r = Rig::new();
    let v = r.view();
    r.host(Request::SetAccess {
        view: 0,
        gfn: 8,
        access: Access::RX,
    });
    r.host(Request::SetAccess {
        view: v,
        gfn: 8,
        access: R,
    });
    r.ev.listen(D, 0x77, true).unwrap();
    let x = Access {
        read: false,
        write: false,
        execute: true,
    };
    assert_eq!(r.touch(v, 8, x), Outcome::Defer { new_event: true });
    let id = r.ev.waiting[0].event.id;
    let (_, reply) =
        r.ev.answer(&mut r.alt, &mut r.k, 0x77, id, Action::AllowOnce)
            .unwrap()
            .unwrap();
    assert!(reply.step);
    assert_eq!(
        r.k.views[&v].map[&8].1,
        perms_of(Access::RX),
        "the host p2m gives read-execute: not write"
    );
    // In view 0 the agent's setting is the restriction lifted.
    assert_eq!(r.touch(0, 8, W), Outcome::Defer { new_event: true });
    let id = r.ev.waiting[0].event.id;
    r.ev.answer(&mut r.alt, &mut r.k, 0x77, id, Action::AllowOnce)
        .unwrap();
    assert_eq!(r.k.views[&0].map[&8].1, RWX);

    // A page that dirty tracking write-protects: the write allow-once lets
    // through is credited before it happens.
    let mut r = Rig::new();
    let v = r.view();
    r.track(9, 1, Some(Mechanism::WriteProtect));
    r.host(Request::SetAccess {
        view: v,
        gfn: 9,
        access: R,
    });
    r.ev.listen(D, 0x77, true).unwrap();
    assert_eq!(r.touch(v, 9, W), Outcome::Defer { new_event: true });
    let tracked = |r: &Rig| r.alt.domains[&D].tracking.as_ref().unwrap().is_dirtied(9);
    assert!(!tracked(&r));
    let id = r.ev.waiting[0].event.id;
    r.ev.answer(&mut r.alt, &mut r.k, 0x77, id, Action::AllowOnce)
        .unwrap();
    assert!(tracked(&r), "the write is logged");
    assert!(r.k.views[&v].map[&9].1.write);
    assert!(r.k.views[&0].map[&9].1.write, "view 0 lifted with it");
}

/// One instruction may need several restricted pages (a write that
/// straddles two, a copy from one to another): each `AllowOnce` of its
/// step opens one more, and they stay open together until the step ends,
/// when every one is closed again. (Before, the second answer's page took
/// the first's place, and the first stayed open for good: a restriction
/// lost without a word, and a straddling write let through unseen ever
/// after.) The same when the vCPU moved to another view while its event
/// waited, so that the page the answer opens is not the one it faults on
/// next. A step's end that comes with the vCPU still at the instruction
/// (Bochs delivers the trap-flag #DB a fault left pending before the
/// instruction runs again) is not its end: the pages stay open and the
/// vCPU steps again (without, a straddling write faults for ever on
/// Bochs: `tests/altp2m.rs`).
#[test]
fn every_page_an_instructions_step_opens_is_closed_when_it_ends() {
    let mut r = Rig::new();
    let (v, w) = (r.view(), r.view());
    r.host_access(v, &[8, 9], R);
    r.host_access(w, &[9], R);
    r.ev.listen(D, 0x77, true).unwrap();
    // The write's first page, then its second (the step has not ended:
    // the instruction faulted again), then the second in view `w`.
    for (view, gfn) in [(v, 8), (v, 9), (v, 8), (w, 9)] {
        assert_eq!(r.touch(view, gfn, W), Outcome::Defer { new_event: true });
        r.allow_once();
    }
    for (view, gfn) in [(v, 8), (v, 9), (w, 9)] {
        assert!(r.k.views[&view].map[&gfn].1.write, "{view} {gfn}");
    }
    // Still at the instruction (0x1234): step again, nothing closed.
    let Outcome::Reply(again) = r.step_done(0x1234, w) else {
        panic!("not answered")
    };
    assert!(again.step && again.response == Response::RETRY);
    assert!(r.k.views[&v].map[&8].1.write);
    // Once an answer: an instruction that jumps to itself (still there
    // after it ran) keeps the pages no longer.
    assert_eq!(r.step_done(0x1234, w), retry());
    assert!(!r.k.views[&v].map[&8].1.write);
    for (view, gfn) in [(v, 8), (v, 9), (w, 9)] {
        assert_eq!(r.touch(view, gfn, W), Outcome::Defer { new_event: true });
        r.allow_once();
    }
    // Past it: the step's end.
    assert_eq!(r.step_done(0x1236, w), retry());
    for (view, gfn) in [(v, 8), (v, 9), (w, 9)] {
        assert_eq!(r.k.views[&view].map[&gfn].1, perms_of(R), "{view} {gfn}");
    }
    assert!(r.ev.stepping.is_empty());
    // Past the most one step keeps open, the oldest is closed first.
    for gfn in 0..STEP_PAGES as u64 + 2 {
        r.host_access(v, &[24 + gfn], R);
        assert_eq!(r.touch(v, 24 + gfn, W), Outcome::Defer { new_event: true });
        r.allow_once();
    }
    let open = |r: &Rig| {
        (24..24 + STEP_PAGES as u64 + 2)
            .filter(|g| r.k.views[&v].map[g].1.write)
            .count()
    };
    assert_eq!(open(&r), STEP_PAGES);
    assert!(!r.k.views[&v].map[&24].1.write && !r.k.views[&v].map[&25].1.write);
    assert_eq!(r.step_done(0x1236, w), retry());
    assert_eq!(open(&r), 0);
}

#[test]
fn a_listener_gets_the_event_and_its_answer_resumes_the_vcpu() {
    let mut r = Rig::new();
    let v = r.view();
    r.host(Request::SetAccess {
        view: v,
        gfn: 8,
        access: R,
    });
    r.ev.listen(D, 0x77, true).unwrap();
    assert_eq!(r.ev.listen(D, 0x78, true), Err(AltError::ListenerBusy));
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    let events = r.ev.after(u32::MAX, 8);
    assert_eq!(events.len(), 1);
    let e = events[0];
    assert_eq!(
        (e.gpa, e.gla, e.view),
        (8 * 4096 + 0x18, Some(0x7000_8000), v)
    );
    assert!(e.access.write && !e.allowed.write && !e.internal);
    // The exit qualification travels whole (issue 13, point 4).
    assert_eq!(e.qualification, 0x181);
    assert!(!e.page_walk(), "bit 8 set: the translated address itself");
    // Only the listener answers, once.
    assert_eq!(
        r.ev.answer(&mut r.alt, &mut r.k, 0x78, e.id, Action::Retry),
        Err(AltError::ListenerBusy)
    );
    let (token, reply) =
        r.ev.answer(&mut r.alt, &mut r.k, 0x77, e.id, Action::AllowOnce)
            .unwrap()
            .unwrap();
    assert_eq!(token, 0xabc0 + 8);
    assert!(reply.step, "one instruction with the page open");
    assert_eq!(r.k.views[&v].map[&8].1, RWX);
    assert_eq!(
        r.ev.answer(&mut r.alt, &mut r.k, 0x77, e.id, Action::Retry),
        Err(AltError::NoSuchEvent)
    );
    // The step is done: the page is closed again.
    assert_eq!(r.step_done(0x1236, v), retry());
    assert_eq!(r.k.views[&v].map[&8].1, perms_of(R));
    // SwitchView and Skip.
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    let id = r.ev.waiting[0].event.id;
    let (_, reply) =
        r.ev.answer(&mut r.alt, &mut r.k, 0x77, id, Action::SwitchView(0))
            .unwrap()
            .unwrap();
    assert_eq!(reply.view, Some(0));
    r.touch(v, 8, W);
    let id = r.ev.waiting[0].event.id;
    assert_eq!(
        r.ev.answer(&mut r.alt, &mut r.k, 0x77, id, Action::SwitchView(300)),
        Err(AltError::NoSuchView)
    );
    let (_, reply) =
        r.ev.answer(&mut r.alt, &mut r.k, 0x77, id, Action::Skip { length: 3 })
            .unwrap()
            .unwrap();
    assert_eq!(reply.rip, Some(0x1234 + 3));
    // SetAccess: the listener opens the page for good.
    r.touch(v, 8, W);
    let id = r.ev.waiting[0].event.id;
    r.ev.answer(
        &mut r.alt,
        &mut r.k,
        0x77,
        id,
        Action::SetAccess(Access::RW),
    )
    .unwrap();
    assert_eq!(r.k.views[&v].map[&8].1, perms_of(Access::RW));
    assert_eq!(r.touch(v, 8, W), retry());
}

/// A listener that detaches with events waiting for its answer (a watch
/// stopped as the guest faulted again, an agent that gives up): each that
/// no other listener takes is answered `Retry`, its vCPU resumed, so that
/// none waits for an answer nobody is there to give; one another listener
/// takes waits for that one. The retried access then goes through where
/// the restriction is gone, or meets the no-listener policy.
#[test]
fn a_listener_that_detaches_releases_the_vcpus_it_held() {
    let mut r = Rig::new();
    let v = r.view();
    r.host_access(v, &[8, 9], R);
    // B takes writes to gfn 9 only; A everything else.
    let nine = filter(9, 10, 0b010);
    r.ev.listen_for(D, 0xb, nine).unwrap();
    r.ev.listen(D, 0xa, true).unwrap();
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    // A second event of A's, for gfn 9 while B was away.
    r.ev.listen(D, 0xb, false).unwrap();
    assert_eq!(r.touch(v, 9, W), Outcome::Defer { new_event: true });
    r.ev.listen_for(D, 0xb, nine).unwrap();
    let held = r.ev.held_by(D, 0xa);
    assert_eq!(held.len(), 2);
    assert!(r.ev.held_by(D, 0xb).is_empty(), "taken by A before B came");
    let released = r.ev.detach(&mut r.alt, &mut r.k, D, 0xa).unwrap();
    // Gfn 8's is retried; gfn 9's went to B, under a new number.
    assert_eq!(released.len(), 1);
    let (token, reply) = released[0];
    assert_eq!((token, reply.response), (0xabc0 + 8, Response::RETRY));
    assert_eq!(r.ev.waiting.len(), 1);
    assert_eq!(r.ev.waiting[0].owner, 0xb);
    assert!(r.ev.release(&mut r.alt, &mut r.k, &held).is_empty());
    // The retried write, the page still restricted, nobody taking it:
    // the domain's no-listener policy (crash, the default).
    assert_eq!(r.touch(v, 8, W), crash());
    // With the restriction gone first (a watch's view 0), it goes through.
    r.host(Request::SetAccess {
        view: v,
        gfn: 8,
        access: Access::RW,
    });
    assert_eq!(r.touch(v, 8, W), retry());
}

#[test]
fn with_no_listener_the_policy_pauses_or_stops_and_not_ram_stops() {
    let mut r = Rig::new();
    let v = r.view();
    r.guest(Request::SetAccess {
        view: v,
        gfn: 8,
        access: R,
    });
    assert_eq!(r.touch(v, 8, W), crash(), "the default: stop the domain");
    r.ev.policy.insert(D, NoListener::Pause);
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    // A listener that attaches later is told of it anew, under a new number.
    let first = r.ev.waiting[0].event.id;
    r.ev.listen(D, 5, true).unwrap();
    assert_eq!(r.ev.waiting.len(), 1);
    let renumbered = r.ev.waiting[0].event.id;
    assert_ne!(renumbered, first);
    assert_eq!(r.ev.after(first, 8).last().map(|e| e.id), Some(renumbered));
    assert!(r.ev.after(u32::MAX, 8).iter().all(|e| e.id != first));
    assert_eq!(r.touch(v, HOLE.start, Access::R), crash());
    assert_eq!(r.touch(v, RAM + 3, Access::R), crash());
}

// The property test: random operations against a reference model.

#[derive(Clone, Debug)]
enum Op {
    Create(Option<Access>),
    Destroy(usize),
    SetAccess {
        view: usize,
        gfn: u64,
        access: Access,
        external: bool,
    },
    SetRange {
        view: usize,
        gfn: u64,
        count: u64,
        access: Access,
        external: bool,
    },
    ChangeGfn {
        view: usize,
        gfn: u64,
        to: Option<u64>,
    },
    /// Xen's rx2rw and n2rwx (issue 13, point 8).
    SetRelaxing {
        view: usize,
        gfn: u64,
        relaxing: Relaxing,
        external: bool,
    },
    Sve {
        view: usize,
        gfn: u64,
        suppress: bool,
    },
    Touch {
        view: usize,
        gfn: u64,
        access: Access,
    },
    /// Dirty tracking armed (`Some`) or disarmed over a range (LD-2..LD-4).
    Track {
        gfn: u64,
        count: u64,
        how: Option<Mechanism>,
    },
    /// The logdirty service takes the dirtied frames.
    Take,
    Switch(usize),
    /// An alternate view's entry gone from the tables (a view that holds no
    /// copy of a page, as ALT-6 allows: the lazy fill serves it).
    Evict {
        view: usize,
        gfn: u64,
    },
}

fn access() -> impl Strategy<Value = Access> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(read, write, execute)| Access {
        read,
        write,
        execute,
    })
}

fn gfn() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0..RAM, 1 => RAM..RAM + 4]
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0usize..6;
    prop_oneof![
        2 => proptest::option::of(access()).prop_map(Op::Create),
        1 => v.clone().prop_map(Op::Destroy),
        4 => (v.clone(), gfn(), access(), any::<bool>()).prop_map(|(view, gfn, access, external)| Op::SetAccess { view, gfn, access, external }),
        2 => (v.clone(), gfn(), 0u64..24, access(), any::<bool>()).prop_map(|(view, gfn, count, access, external)| Op::SetRange { view, gfn, count, access, external }),
        2 => (v.clone(), gfn(), prop_oneof![Just(Relaxing::Rx2Rw), Just(Relaxing::N2Rwx)], any::<bool>()).prop_map(|(view, gfn, relaxing, external)| Op::SetRelaxing { view, gfn, relaxing, external }),
        3 => (v.clone(), gfn(), proptest::option::of(gfn())).prop_map(|(view, gfn, to)| Op::ChangeGfn { view, gfn, to }),
        3 => (v.clone(), gfn(), any::<bool>()).prop_map(|(view, gfn, suppress)| Op::Sve { view, gfn, suppress }),
        5 => (v.clone(), gfn(), access()).prop_map(|(view, gfn, access)| Op::Touch { view, gfn, access }),
        1 => v.clone().prop_map(Op::Switch),
        2 => (0..RAM + 2, 0u64..20, proptest::option::of(prop_oneof![Just(Mechanism::Pml), Just(Mechanism::WriteProtect)])).prop_map(|(gfn, count, how)| Op::Track { gfn, count, how }),
        1 => Just(Op::Take),
        3 => (v, gfn()).prop_map(|(view, gfn)| Op::Evict { view, gfn }),
    ]
}

/// What each view should be, kept page by page (no ranges, no reverse maps).
#[derive(Clone, Default)]
struct RefView {
    default: Option<Access>,
    /// gfn -> (access, placed externally, relaxes itself how).
    access: BTreeMap<u64, (Access, bool, Option<Relaxing>)>,
    remap: BTreeMap<u64, u64>,
    sve: BTreeMap<u64, bool>,
}

#[derive(Clone, Default)]
struct Reference {
    views: BTreeMap<u16, RefView>,
    /// Tracked frames and their mechanism.
    tracked: BTreeMap<u64, Mechanism>,
    /// Frames written since their tracking was armed or taken.
    dirtied: BTreeSet<u64>,
}

fn meet(a: Access, b: Access) -> Access {
    Access {
        read: a.read && b.read,
        write: a.write && b.write,
        execute: a.execute && b.execute,
    }
}

impl Reference {
    /// The settings the service must be keeping (what its quota counts):
    /// per view, each run of consecutive gfns with one access, each remap,
    /// each suppress-#VE bit.
    fn settings(&self) -> usize {
        self.views
            .values()
            .map(|v| {
                let runs = v
                    .access
                    .iter()
                    .zip(v.access.iter().skip(1))
                    .filter(|((g, a), (h, b))| **h != **g + 1 || a != b)
                    .count()
                    + usize::from(!v.access.is_empty());
                runs + v.remap.len() + v.sve.len()
            })
            .sum()
    }

    fn host(&self, frame: u64) -> (Access, bool) {
        self.views[&0]
            .access
            .get(&frame)
            .map_or((Access::RWX, false), |&(a, e, _)| (a, e))
    }

    /// Whether tracking takes write from `view`'s entry for `gfn` (mapping
    /// `frame`).
    fn blocks(&self, view: u16, gfn: u64, frame: u64) -> bool {
        !self.dirtied.contains(&frame)
            && match self.tracked.get(&frame) {
                Some(Mechanism::WriteProtect) => true,
                Some(Mechanism::Pml) => view != 0 && frame != gfn,
                None => false,
            }
    }

    /// The entry the guest must get for `gfn` in `view`.
    fn expected(&self, view: u16, gfn: u64) -> Entry {
        let mut e = self.untracked(view, gfn);
        if self.blocks(view, gfn, e.frame_gfn.unwrap()) {
            e.access.write = false;
        }
        e
    }

    /// The entry from the settings alone.
    fn untracked(&self, view: u16, gfn: u64) -> Entry {
        let v = &self.views[&view];
        let frame = if view == 0 {
            gfn
        } else {
            v.remap.get(&gfn).copied().unwrap_or(gfn)
        };
        let (host, host_external) = self.host(frame);
        let own = v.access.get(&gfn).copied();
        let access = if view == 0 {
            host
        } else {
            meet(own.map(|o| o.0).or(v.default).unwrap_or(Access::RWX), host)
        };
        let external = host_external || (view != 0 && own.is_some_and(|o| o.1));
        Entry {
            frame_gfn: Some(frame),
            access,
            suppress_ve: external || v.sve.get(&gfn).copied().unwrap_or(true),
        }
    }
}

fn check(r: &Rig, reference: &Reference) -> Result<(), TestCaseError> {
    let views: Vec<u16> = reference.views.keys().copied().collect();
    let kernel: Vec<u16> = r.k.views.keys().copied().collect();
    prop_assert_eq!(&views, &kernel, "the views");
    let domain = r.alt.domains.get(&D).cloned().unwrap_or_default();
    for &view in &views {
        for gfn in (0..RAM).filter(|&g| is_ram(g)) {
            let mut want = reference.expected(view, gfn);
            let mut have = domain.effective(view, gfn);
            let table = &r.k.views[&view];
            let frame = want.frame_gfn.unwrap();
            // A write the kernel let through (an armed entry) is the
            // service's to learn at its next take: until then its model,
            // and the frame's other entries, may still lack write.
            let lagging = reference.dirtied.contains(&frame)
                && !domain
                    .tracking
                    .as_ref()
                    .is_some_and(|t| t.is_dirtied(frame));
            let mut table_entry = table.map.get(&gfn).copied();
            if lagging {
                prop_assert!(
                    r.k.lifted.contains(&frame),
                    "frame {} is dirtied, the service does not know, and the kernel has no record of it",
                    frame
                );
                want.access.write = false;
                have.access.write = false;
            }
            // Once a tracked frame is dirtied, each of its entries gets
            // write back when next written (the kernel, or this service on
            // the fault): whether a table has it yet is not the point. A
            // frame not dirtied is compared strictly: write there would be
            // a write nobody logs.
            if reference.dirtied.contains(&frame)
                && reference.tracked.contains_key(&frame)
                && let Some(e) = table_entry.as_mut()
            {
                e.1.write = want.access.write;
            }
            prop_assert_eq!(have, want, "effective entry of {} in view {}", gfn, view);
            // A remapped entry under PML that can be written must have its
            // dirty bit set, or PML would log the remapped gfn.
            if table.map.get(&gfn).is_some_and(|e| e.1.write)
                && view != 0
                && frame != gfn
                && reference.tracked.get(&frame) == Some(&Mechanism::Pml)
            {
                prop_assert!(
                    table.dirty.contains(&gfn),
                    "LD-4: the lifted remapped entry {} of view {} has its dirty bit set (PML must not log it)",
                    gfn,
                    view
                );
            }
            let sve = !table.ve.contains(&gfn);
            match table_entry {
                Some((frame, perms)) => {
                    prop_assert_eq!(
                        (Some(frame), perms, sve),
                        (want.frame_gfn, perms_of(want.access), want.suppress_ve),
                        "table entry of {} in view {}",
                        gfn,
                        view
                    );
                }
                None => prop_assert!(
                    want.suppress_ve && sve,
                    "gfn {} in view {} is empty but its #VE is not suppressed",
                    gfn,
                    view
                ),
            }
        }
    }
    Ok(())
}

fn valid(a: Access) -> bool {
    !a.write || a.read
}

/// A change the reference accepts: `Done`, or, when `next` keeps more
/// settings than the quota allows (and more than before), `QuotaExceeded`
/// with the reference unchanged.
fn accepted(
    reply: Reply,
    quotas: Quotas,
    reference: &mut Reference,
    next: Reference,
) -> Result<(), TestCaseError> {
    let (before, after) = (reference.settings(), next.settings());
    if after > before && after > quotas.settings as usize {
        prop_assert_eq!(
            reply,
            Reply::Error(HcError::QuotaExceeded {
                what: Quota::Settings,
                limit: quotas.settings
            })
        );
    } else {
        prop_assert_eq!(reply, Reply::Done);
        *reference = next;
    }
    Ok(())
}

fn run_op(r: &mut Rig, reference: &mut Reference, op: &Op) -> Result<(), TestCaseError> {
    let ids: Vec<u16> = reference.views.keys().copied().collect();
    let pick = |i: usize| ids[i % ids.len()];
    let quotas = r.alt.quotas;
    match *op {
        Op::Create(default_access) => {
            let reply = r.guest(Request::ViewCreate { default_access });
            match default_access {
                Some(a) if !valid(a) => prop_assert_eq!(reply, Reply::Error(HcError::BadAccess)),
                _ if reference.views.len() > quotas.views as usize => prop_assert_eq!(
                    reply,
                    Reply::Error(HcError::QuotaExceeded {
                        what: Quota::Views,
                        limit: quotas.views
                    })
                ),
                _ => {
                    let Reply::View(v) = reply else {
                        return Err(TestCaseError::fail(std::format!("{reply:?}")));
                    };
                    reference.views.insert(
                        v,
                        RefView {
                            default: default_access,
                            ..RefView::default()
                        },
                    );
                }
            }
        }
        Op::Destroy(i) => {
            let view = pick(i);
            let reply = r.guest(Request::ViewDestroy { view });
            if view == 0 {
                prop_assert_eq!(reply, Reply::Error(HcError::HostView));
            } else if view == r.k.active {
                prop_assert_eq!(reply, Reply::Error(HcError::ViewInUse { view }));
            } else {
                prop_assert_eq!(reply, Reply::Done);
                reference.views.remove(&view);
            }
        }
        Op::SetAccess {
            view,
            gfn,
            access,
            external,
        } => {
            let view = pick(view);
            let req = Request::SetAccess { view, gfn, access };
            let reply = if external { r.host(req) } else { r.guest(req) };
            if !valid(access) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadAccess));
            } else if !is_ram(gfn) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadGfn { gfn }));
            } else {
                let mut next = reference.clone();
                let v = next.views.get_mut(&view).unwrap();
                v.access.insert(gfn, (access, external, None));
                accepted(reply, quotas, reference, next)?;
            }
        }
        Op::SetRange {
            view,
            gfn,
            count,
            access,
            external,
        } => {
            let view = pick(view);
            let req = Request::SetAccessRange {
                view,
                gfn,
                count,
                access,
            };
            let reply = if external { r.host(req) } else { r.guest(req) };
            let end = gfn + count;
            if !valid(access) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadAccess));
            } else if count == 0 || !is_ram(gfn) || !is_ram(end - 1) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadRange));
            } else {
                let mut next = reference.clone();
                let v = next.views.get_mut(&view).unwrap();
                for g in gfn..end {
                    v.access.insert(g, (access, external, None));
                }
                accepted(reply, quotas, reference, next)?;
            }
        }
        Op::SetRelaxing {
            view,
            gfn,
            relaxing,
            external,
        } => {
            let view = pick(view);
            let req = Request::SetAccessRelaxing {
                view,
                gfn,
                relaxing,
            };
            let reply = if external { r.host(req) } else { r.guest(req) };
            if !is_ram(gfn) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadGfn { gfn }));
            } else {
                let access = match relaxing {
                    Relaxing::Rx2Rw => Access::RX,
                    Relaxing::N2Rwx => Access::NONE,
                };
                let mut next = reference.clone();
                let v = next.views.get_mut(&view).unwrap();
                v.access.insert(gfn, (access, external, Some(relaxing)));
                accepted(reply, quotas, reference, next)?;
            }
        }
        Op::ChangeGfn { view, gfn, to } => {
            let view = pick(view);
            let reply = r.guest(Request::ChangeGfn { view, gfn, to });
            if view == 0 {
                prop_assert_eq!(reply, Reply::Error(HcError::HostView));
            } else if !is_ram(gfn) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadGfn { gfn }));
            } else if let Some(t) = to.filter(|&t| !is_ram(t)) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadGfn { gfn: t }));
            } else {
                let mut next = reference.clone();
                let v = next.views.get_mut(&view).unwrap();
                match to {
                    Some(t) => v.remap.insert(gfn, t),
                    None => v.remap.remove(&gfn),
                };
                accepted(reply, quotas, reference, next)?;
            }
        }
        Op::Sve {
            view,
            gfn,
            suppress,
        } => {
            let view = pick(view);
            let populated = r.k.views[&view].map.contains_key(&gfn);
            let reply = r.guest(Request::SetSuppressVe {
                view,
                gfn,
                suppress,
            });
            if !is_ram(gfn) {
                prop_assert_eq!(reply, Reply::Error(HcError::BadGfn { gfn }));
            } else {
                let mut next = reference.clone();
                next.views.get_mut(&view).unwrap().sve.insert(gfn, suppress);
                // A cleared bit an external restriction overrides is kept,
                // and the answer says it is not in effect.
                let kept = !suppress && next.untracked(view, gfn).suppress_ve;
                let reply = match reply {
                    Reply::NotInEffect { pages: 1 } if kept => Reply::Done,
                    Reply::Done if kept => {
                        return Err(TestCaseError::fail(
                            "a cleared bit not in effect answered Done",
                        ));
                    }
                    other => other,
                };
                accepted(reply, quotas, reference, next)?;
                if suppress {
                    // Seed 004: setting SVE alone never populates.
                    prop_assert_eq!(r.k.views[&view].map.contains_key(&gfn), populated);
                }
            }
        }
        Op::Touch { view, gfn, access } => {
            let view = pick(view);
            if !access.read && !access.write && !access.execute {
                return Ok(());
            }
            let outcome = r.touch(view, gfn, access);
            if !is_ram(gfn) {
                prop_assert_eq!(outcome, crash());
                return Ok(());
            }
            let allows = |a: Access| {
                (!access.read || a.read)
                    && (!access.write || a.write)
                    && (!access.execute || a.execute)
            };
            // The page's own setting relaxes itself first, unless that
            // would take the domain past its settings quota.
            let own = reference.views[&view].access.get(&gfn).copied();
            let to = match own {
                Some((_, _, Some(Relaxing::Rx2Rw))) if access.write => Some(Access::RW),
                Some((_, _, Some(Relaxing::N2Rwx))) => Some(Access::RWX),
                _ => None,
            };
            if let (Some(to), Some((_, external, _))) = (to, own) {
                let mut next = reference.clone();
                let v = next.views.get_mut(&view).unwrap();
                v.access.insert(gfn, (to, external, None));
                let (before, after) = (reference.settings(), next.settings());
                if after <= before || after <= quotas.settings as usize {
                    *reference = next;
                }
            }
            let want = reference.expected(view, gfn);
            let plain = reference.untracked(view, gfn);
            let frame = plain.frame_gfn.unwrap();
            if access.write && allows(plain.access) && reference.blocks(view, gfn, frame) {
                // LD-2: a write only tracking refused is logged and let through.
                reference.dirtied.insert(frame);
                prop_assert_eq!(outcome, retry());
            } else {
                prop_assert_eq!(
                    outcome,
                    if allows(want.access) {
                        retry()
                    } else {
                        crash()
                    }
                );
            }
            prop_assert!(r.k.views[&view].map.contains_key(&gfn), "filled");
        }
        Op::Switch(i) => {
            let view = pick(i);
            prop_assert_eq!(r.guest(Request::ViewSwitch { view }), Reply::Done);
        }
        Op::Track { gfn, count, how } => {
            let result = r.alt.track(&mut r.k, D, GfnRange { gfn, count }, how);
            if count == 0 || gfn + count > RAM {
                prop_assert_eq!(result, Err(AltError::BadRange));
            } else {
                prop_assert_eq!(result, Ok(()));
                for g in gfn..gfn + count {
                    match how {
                        Some(m) => reference.tracked.insert(g, m),
                        None => reference.tracked.remove(&g),
                    };
                    reference.dirtied.remove(&g);
                }
                if how == Some(Mechanism::Pml) {
                    // Every view's dirty bits are clear over the range, but
                    // those of the remapped entries a write lifted (set again).
                    for (&w, v) in &r.k.views {
                        for &g in v.dirty.range(gfn..gfn + count) {
                            let frame = v.map[&g].0;
                            prop_assert!(
                                w != 0 && frame != g && reference.dirtied.contains(&frame),
                                "dirty bit of {} in view {} left set by tracking",
                                g,
                                w
                            );
                        }
                    }
                }
            }
        }
        Op::Evict { view, gfn } => {
            // Not view 0 (the host p2m holds all RAM), and not an entry whose
            // suppress-#VE bit is clear (the service keeps those filled).
            let view = pick(view);
            if let Some(v) = r.k.views.get_mut(&view)
                && view != 0
                && !v.ve.contains(&gfn)
            {
                v.map.remove(&gfn);
                v.dirty.remove(&gfn);
                v.armed.remove(&gfn);
            }
        }
        Op::Take => {
            let (runs, next) = r.alt.dirty_take(&mut r.k, D, 0, 1000).unwrap();
            prop_assert_eq!(next, None);
            let taken: BTreeSet<u64> = runs.iter().flat_map(|&(s, n)| s..s + n).collect();
            prop_assert_eq!(&taken, &reference.dirtied, "the dirtied frames");
            reference.dirtied.clear();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// ALT-6..ALT-10: after any sequence of operations, the service's idea
    /// of every (view, gfn) is the reference's, and every entry the
    /// kernel's tables hold is that entry.
    #[test]
    fn every_view_matches_the_reference_after_random_operations(ops in proptest::collection::vec(op(), 1..60)) {
        let mut r = Rig::new();
        let mut reference = Reference::default();
        reference.views.insert(0, RefView::default());
        for op in &ops {
            run_op(&mut r, &mut reference, op)?;
            check(&r, &reference)?;
        }
    }

    /// Quotas: with small ones, a change is refused exactly when it would
    /// keep more than the quota (and more than before), the refusal changes
    /// nothing (every entry, in the model and the tables, is still the
    /// reference's), and the count never passes the quota.
    #[test]
    fn quotas_hold_and_a_refused_change_changes_nothing(ops in proptest::collection::vec(op(), 1..80)) {
        let quotas = Quotas { views: 2, settings: 6 };
        let mut r = Rig::new();
        r.alt = Altp2m::with_quotas(quotas);
        let mut reference = Reference::default();
        reference.views.insert(0, RefView::default());
        for op in &ops {
            run_op(&mut r, &mut reference, op)?;
            check(&r, &reference)?;
            let kept = r.alt.domains.get(&D).map_or(0, |d| d.settings());
            prop_assert_eq!(kept, reference.settings());
            prop_assert!(kept <= quotas.settings as usize);
            prop_assert!(r.k.views.len() <= quotas.views as usize + 1);
        }
    }
}

// Quotas, room, ended domains and restarts (issue 9, points 1 and 7).

/// The kernel's tables and the service's records, to show that a refusal
/// changed nothing.
fn state(r: &Rig) -> std::string::String {
    std::format!("{:?} {:?}", r.k.views, r.alt.domains.get(&D))
}

fn quota(what: Quota, limit: u32) -> Reply {
    Reply::Error(HcError::QuotaExceeded { what, limit })
}

#[test]
fn a_domain_is_refused_past_its_quotas_and_the_refusal_changes_nothing() {
    let mut r = Rig::new();
    r.alt = Altp2m::with_quotas(Quotas {
        views: 2,
        settings: 4,
    });
    let (v, w) = (r.view(), r.view());
    let before = state(&r);
    assert_eq!(
        r.guest(Request::ViewCreate {
            default_access: None
        }),
        quota(Quota::Views, 2)
    );
    assert_eq!(state(&r), before, "no view was made");
    for g in 1..=4 {
        assert_eq!(
            r.guest(Request::ChangeGfn {
                view: v,
                gfn: g,
                to: Some(g + 10)
            }),
            Reply::Done
        );
    }
    let before = state(&r);
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: w,
            gfn: 5,
            to: Some(6)
        }),
        quota(Quota::Settings, 4)
    );
    assert_eq!(
        r.guest(Request::SetSuppressVe {
            view: v,
            gfn: 5,
            suppress: false
        }),
        quota(Quota::Settings, 4)
    );
    assert_eq!(
        r.host(Request::SetAccess {
            view: 0,
            gfn: 5,
            access: R
        }),
        quota(Quota::Settings, 4)
    );
    assert_eq!(state(&r), before, "a refusal changes nothing");
    // Changing a setting kept is not keeping more.
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: v,
            gfn: 1,
            to: Some(30)
        }),
        Reply::Done
    );
    // Freeing one makes room for one: a range is one setting.
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: v,
            gfn: 1,
            to: None
        }),
        Reply::Done
    );
    assert_eq!(
        r.guest(Request::SetAccessRange {
            view: w,
            gfn: 2,
            count: 10,
            access: R
        }),
        Reply::Done
    );
    assert_eq!(r.alt.domains[&D].settings(), 4);
    // At the quota a change that would cut the range in three is refused;
    // one that keeps it one range is not.
    assert_eq!(
        r.guest(Request::SetAccess {
            view: w,
            gfn: 5,
            access: Access::RX
        }),
        quota(Quota::Settings, 4)
    );
    assert_eq!(
        r.guest(Request::SetAccessRange {
            view: w,
            gfn: 2,
            count: 10,
            access: Access::RX
        }),
        Reply::Done
    );
    // A destroyed view's settings go with it.
    assert_eq!(r.guest(Request::ViewDestroy { view: w }), Reply::Done);
    assert_eq!(r.alt.domains[&D].settings(), 3);
    let x = r.view();
    assert_eq!(
        r.guest(Request::SetSuppressVe {
            view: x,
            gfn: 5,
            suppress: true
        }),
        Reply::Done
    );
}

#[test]
fn with_no_room_in_the_heap_a_change_is_refused_and_the_service_answers_on() {
    let mut r = Rig::new();
    let v = r.view();
    r.guest(Request::ChangeGfn {
        view: v,
        gfn: 3,
        to: Some(4),
    });
    r.k.room = false;
    let before = state(&r);
    for req in [
        Request::ViewCreate {
            default_access: None,
        },
        Request::ChangeGfn {
            view: v,
            gfn: 5,
            to: Some(6),
        },
        Request::SetAccess {
            view: v,
            gfn: 5,
            access: R,
        },
        Request::SetAccessRange {
            view: 0,
            gfn: 5,
            count: 3,
            access: R,
        },
        Request::SetSuppressVe {
            view: v,
            gfn: 5,
            suppress: true,
        },
    ] {
        assert_eq!(
            r.guest(req.clone()),
            Reply::Error(HcError::OutOfMemory),
            "{req:?}"
        );
    }
    assert_eq!(state(&r), before, "nothing changed");
    // What only reads or frees still works.
    assert!(matches!(
        r.guest(Request::GetEntry {
            view: v,
            gfn: 3,
            raw: false
        }),
        Reply::Entry(Entry {
            frame_gfn: Some(4),
            ..
        })
    ));
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: v,
            gfn: 3,
            to: None
        }),
        Reply::Done
    );
    assert_eq!(r.touch(v, 7, R), retry(), "lazy fill needs no room");
    // A domain it keeps nothing for yet would need room for its records.
    r.alt.forget(D);
    assert_eq!(
        r.guest(Request::GetMode),
        Reply::Error(HcError::OutOfMemory)
    );
    assert_eq!(r.touch(0, 7, R), crash());
    r.k.room = true;
    assert_eq!(r.guest(Request::GetMode), Reply::Mode(Mode::Mixed));
}

/// A domain destroyed and its id given to a new one before the service
/// heard of the end (the new domain runs when the `domain-ends`
/// notification is taken): the births differ, so the old domain's views,
/// mode, listener and policy are forgotten, not handed to the new one; a
/// domain that only runs on, of the birth noted, keeps everything. Births
/// are noted only for domains with records, and dropped with them.
#[test]
fn an_id_given_to_a_new_domain_before_the_end_was_heard_starts_from_nothing() {
    let mut r = Rig::new();
    let mut births = service_runtime::births::Births::default();
    crate::note_births(&mut births, &r.alt, &r.ev, &mut r.k);
    assert_eq!(births, Default::default(), "no records, no birth");
    let v = r.view();
    r.alt.set_mode(&mut r.k, D, Mode::Limited).unwrap();
    r.ev.listen(D, 5, true).unwrap();
    r.ev.policy.insert(D, NoListener::Pause);
    crate::note_births(&mut births, &r.alt, &r.ev, &mut r.k);
    assert_eq!(births.of(D), Some(1));
    // Running on, same birth: kept (a notification for another domain).
    assert!(crate::forget_ended(&mut r.alt, &mut r.ev, &mut births, &mut r.k).is_empty());
    assert!(r.alt.domains.contains_key(&D) && r.ev.listens(5));
    // Destroyed, and the id given to a new domain, which runs.
    r.k = Model::new(ALL);
    r.k.birth = 2;
    crate::note_births(&mut births, &r.alt, &r.ev, &mut r.k);
    assert_eq!(births.of(D), Some(1), "a birth noted is not renewed");
    assert_eq!(
        crate::forget_ended(&mut r.alt, &mut r.ev, &mut births, &mut r.k),
        std::vec![D]
    );
    assert!(r.alt.domains.is_empty() && !r.ev.listens(5) && r.ev.policy.is_empty());
    assert_eq!(births, Default::default());
    assert_eq!(r.guest(Request::GetMode), Reply::Mode(Mode::Mixed));
    assert!(
        r.alt
            .domains
            .get(&D)
            .is_none_or(|d| !d.views.contains_key(&v))
    );
}

#[test]
fn a_domain_that_ended_is_forgotten_and_its_id_starts_from_nothing() {
    let mut r = Rig::new();
    let v = r.view();
    r.guest(Request::ChangeGfn {
        view: v,
        gfn: 3,
        to: Some(4),
    });
    r.alt.set_mode(&mut r.k, D, Mode::Limited).unwrap();
    r.ev.listen(D, 5, true).unwrap();
    r.ev.policy.insert(D, NoListener::Pause);
    let mut births = service_runtime::births::Births::default();
    crate::note_births(&mut births, &r.alt, &r.ev, &mut r.k);
    assert!(crate::forget_ended(&mut r.alt, &mut r.ev, &mut births, &mut r.k).is_empty());
    assert!(r.alt.domains.contains_key(&D), "a running domain is kept");
    r.k.state = ipc_schema::syscall::DomainState::Crashed as u64;
    assert_eq!(
        crate::forget_ended(&mut r.alt, &mut r.ev, &mut births, &mut r.k),
        std::vec![D]
    );
    assert_eq!(births, Default::default());
    assert!(r.alt.domains.is_empty());
    assert!(r.ev.listeners.is_empty() && r.ev.policy.is_empty());
    // The kernel gives the id to the next domain: it gets none of it.
    r.k = Model::new(ALL);
    assert_eq!(r.guest(Request::GetMode), Reply::Mode(Mode::Mixed));
    assert_eq!(
        r.guest(Request::GetEntry {
            view: v,
            gfn: 3,
            raw: false
        }),
        Reply::Error(HcError::NoSuchView { view: v })
    );
}

#[test]
fn a_restarted_service_resets_the_views_it_cannot_account_for() {
    let mut r = Rig::new();
    let (v, w) = (r.view(), r.view());
    r.guest(Request::ChangeGfn {
        view: v,
        gfn: 3,
        to: Some(4),
    });
    r.guest(Request::SetAccess {
        view: w,
        gfn: 9,
        access: R,
    });
    r.host_access(0, &[8, 10], R);
    r.touch(v, 3, R);
    r.touch(w, 9, R);
    r.guest(Request::ViewSwitch { view: v });
    // A new instance: nothing of the above in its records, all of it in
    // the kernel's tables.
    r.alt = Altp2m::default();
    r.ev = Events::default();
    // A fault the table makes and the model does not is written again,
    // not retried for ever (issue 9, point 7).
    assert_eq!(r.touch(0, 8, W), retry());
    assert_eq!(r.k.views[&0].map[&8].1, RWX);
    assert_eq!(
        r.alt.reset(&mut r.k),
        std::vec![Reset {
            domain: D,
            views: 2,
            was_in: v
        }]
    );
    assert_eq!(r.k.active, 0, "vCPU 0 is back in view 0");
    assert_eq!(r.k.views.keys().copied().collect::<Vec<_>>(), [0]);
    // An exit that waited from a view the reset destroyed goes on in view 0.
    match r.touch(v, 3, R) {
        Outcome::Reply(reply) => {
            assert_eq!((reply.response, reply.view), (Response::RETRY, Some(0)))
        }
        other => panic!("{other:?}"),
    }
    // Every entry agrees with the new (empty) model: gfn 10, restricted
    // before and never touched since, is rwx again.
    let mut reference = Reference::default();
    reference.views.insert(0, RefView::default());
    r.alt.domain(D);
    check(&r, &reference).unwrap();
    assert_eq!(r.k.views[&0].map[&10].1, RWX);
    // And it works again.
    let x = r.view();
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: x,
            gfn: 3,
            to: Some(4)
        }),
        Reply::Done
    );
    // A domain that has ended is left alone.
    r.k.state = ipc_schema::syscall::DomainState::Exited as u64;
    r.alt = Altp2m::default();
    assert!(r.alt.reset(&mut r.k).is_empty());
    assert!(r.k.views.contains_key(&x));
}

/// Counts the bytes this thread has allocated and not freed, each
/// allocation rounded up to 8 and with 16 more for the allocator's own
/// bookkeeping (talc's tags), as the service's heap would spend them.
struct Counting;

std::thread_local! {
    static LIVE: core::cell::Cell<isize> = const { core::cell::Cell::new(0) };
}

fn cost(l: core::alloc::Layout) -> isize {
    (l.size().next_multiple_of(8) + 16) as isize
}

// Safety: every call goes to the system allocator with the same arguments;
// the count is a thread-local cell with no destructor.
unsafe impl core::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: core::alloc::Layout) -> *mut u8 {
        // Safety: the caller's contract is the system allocator's.
        let p = unsafe { std::alloc::System.alloc(l) };
        if !p.is_null() {
            LIVE.with(|c| c.set(c.get() + cost(l)));
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: core::alloc::Layout) {
        // Safety: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.dealloc(p, l) };
        LIVE.with(|c| c.set(c.get() - cost(l)));
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// What the service keeps for one domain that has filled its quotas with
/// the records `fill` makes, in heap bytes.
fn bytes_at_quota(fill: impl Fn(u16, u64) -> Request) -> usize {
    let mut r = Rig::new();
    let mut views = Vec::new();
    while let Reply::View(v) = r.guest(Request::ViewCreate {
        default_access: None,
    }) {
        views.push(v);
    }
    assert_eq!(views.len(), crate::policy::QUOTAS.views as usize);
    let mut made = 0;
    'fill: for &v in &views {
        for g in (0..RAM).filter(|&g| is_ram(g)) {
            match r.guest(fill(v, g)) {
                Reply::Done => made += 1,
                Reply::Error(HcError::QuotaExceeded {
                    what: Quota::Settings,
                    ..
                }) => break 'fill,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(made, crate::policy::QUOTAS.settings);
    // What the records hold: what dropping them gives back.
    let before = LIVE.with(|c| c.get());
    drop(core::mem::take(&mut r.alt.domains));
    (before - LIVE.with(|c| c.get())) as usize
}

/// The quotas keep one domain to [`crate::policy::DOMAIN_BYTES`] of the
/// heap, whatever records it makes, so that every domain the kernel can
/// hold fits at its quotas at once (about 3,000 change_gfns filled the whole
/// heap before there were quotas: issue 9, point 1).
#[test]
fn one_domain_at_its_quotas_takes_at_most_its_share_of_the_heap() {
    let remaps = bytes_at_quota(|view, gfn| Request::ChangeGfn {
        view,
        gfn,
        to: Some(if gfn == 1 { 2 } else { 1 }),
    });
    let sve = bytes_at_quota(|view, gfn| Request::SetSuppressVe {
        view,
        gfn,
        suppress: true,
    });
    // Every gfn its own range: neighbours alternate.
    let ranges = bytes_at_quota(|view, gfn| Request::SetAccess {
        view,
        gfn,
        access: if gfn % 2 == 0 { Access::RX } else { R },
    });
    std::println!(
        "at the quotas: {remaps} bytes of change_gfns, {sve} of suppress-#VE bits, {ranges} of ranges"
    );
    for bytes in [remaps, sve, ranges] {
        assert!(
            bytes <= crate::policy::DOMAIN_BYTES,
            "{bytes} bytes > {}",
            crate::policy::DOMAIN_BYTES
        );
    }
}

/// Issue 9, point 8: a page as a guest in a view sees it, for the
/// hypervisor's reads and writes on its behalf: the view's access, the
/// frame a change_gfn puts there, the host p2m's for view 0; refusals for
/// a view that does not exist or a gfn outside RAM.
#[test]
fn a_page_is_what_the_guest_sees_in_its_view() {
    let mut r = Rig::new();
    let page = |r: &mut Rig, view: u16, gfn: u64| r.alt.guest_page(&mut r.k, D, view, gfn);
    // Nothing set yet: the host p2m as built.
    let e = page(&mut r, 0, 5).unwrap();
    assert_eq!((e.frame_gfn, e.access), (Some(5), Access::RWX));
    let v = r.view();
    r.guest(Request::SetAccess {
        view: v,
        gfn: 4,
        access: R,
    });
    r.guest(Request::ChangeGfn {
        view: v,
        gfn: 6,
        to: Some(7),
    });
    assert_eq!(page(&mut r, v, 4).unwrap().access, R);
    assert_eq!(page(&mut r, 0, 4).unwrap().access, Access::RWX);
    assert_eq!(page(&mut r, v, 6).unwrap().frame_gfn, Some(7));
    assert_eq!(page(&mut r, 0, 6).unwrap().frame_gfn, Some(6));
    // The host p2m's restriction shows in every view.
    r.host(Request::SetAccess {
        view: 0,
        gfn: 5,
        access: Access::RX,
    });
    assert_eq!(page(&mut r, v, 5).unwrap().access, Access::RX);
    assert_eq!(
        page(&mut r, 9, 5).unwrap_err(),
        HcError::NoSuchView { view: 9 }
    );
    assert!(matches!(
        page(&mut r, 0, u64::MAX),
        Err(HcError::BadGfn { .. })
    ));
    // Dirty tracking is not the guest's restriction: its request page
    // stays writable for the vmm's reply (a write the kernel records).
    r.track(0, 12, Some(Mechanism::WriteProtect));
    assert!(!r.k.views[&0].map[&8].1.write, "write-protected");
    assert_eq!(page(&mut r, 0, 8).unwrap().access, Access::RWX);
    assert_eq!(page(&mut r, v, 4).unwrap().access, R);
}

// Dirty tracking (issue 10: LD-2..LD-4).

fn write() -> Access {
    Access {
        read: false,
        write: true,
        execute: false,
    }
}

#[test]
fn a_write_through_a_remapped_entry_is_credited_to_the_frame_and_pml_does_not_log_the_gfn() {
    // LD-4: in view v, gfn A maps the frame of gfn B; PML tracks B.
    let (a, b) = (3, 9);
    let mut r = Rig::new();
    let v = r.view();
    assert_eq!(
        r.guest(Request::ChangeGfn {
            view: v,
            gfn: a,
            to: Some(b)
        }),
        Reply::Done
    );
    r.track(b, 1, Some(Mechanism::Pml));
    // The guest's first touch fills A in v without write (tracking).
    assert_eq!(r.touch(v, a, Access::R), retry());
    assert!(!r.k.views[&v].map[&a].1.write, "protected until written");
    // The write faults, is credited to B, and the entry gets write with its
    // dirty bit set (PML will not log A).
    assert_eq!(r.touch(v, a, write()), retry());
    let entry = r.k.views[&v].map[&a];
    assert_eq!(entry.0, b);
    assert!(entry.1.write);
    assert!(r.k.views[&v].dirty.contains(&a), "dirty bit preset");
    let (taken, next) = r.alt.dirty_take(&mut r.k, D, 0, 8).unwrap();
    assert_eq!((taken, next), (std::vec![(b, 1)], None));
    assert!(!r.k.views[&v].map[&a].1.write, "protected again once taken");
    // Re-arming B's range leaves the remapped entry alone.
    r.alt
        .rearm(&mut r.k, D, &[GfnRange { gfn: a, count: 1 }])
        .unwrap();
    // View 0's own entries keep write under PML.
    assert_eq!(r.touch(0, b, write()), retry());
    assert!(r.k.views[&0].map[&b].1.write);
}

#[test]
fn write_protection_logs_each_frame_once_until_taken_in_every_view() {
    let mut r = Rig::new();
    let v = r.view();
    r.track(4, 8, Some(Mechanism::WriteProtect));
    assert!(!r.k.views[&0].map[&5].1.write, "armed in view 0");
    assert!(r.k.views[&v].armed.contains(&5), "and in view v");
    // A write in view v lifts the frame there (the kernel's own doing);
    // view 0's entry stays armed for a write through it.
    assert_eq!(r.touch(v, 5, write()), retry());
    assert!(!r.k.views[&0].map[&5].1.write && r.k.views[&v].map[&5].1.write);
    assert!(!r.k.views[&0].map[&6].1.write, "the neighbour stays armed");
    // A write tracking did not refuse is not a logging fault: a read-only
    // setting of the host's still stops the domain without a listener.
    r.host(Request::SetAccess {
        view: 0,
        gfn: 7,
        access: Access::R,
    });
    assert_eq!(r.touch(0, 7, write()), crash());
    let (taken, _) = r.alt.dirty_take(&mut r.k, D, 0, 8).unwrap();
    assert_eq!(taken, std::vec![(5, 1)]);
    assert!(!r.k.views[&0].map[&5].1.write, "armed again");
    // Disarming gives write back everywhere the settings allow it.
    r.track(4, 8, None);
    assert!(r.k.views[&0].map[&6].1.write);
    assert!(
        !r.k.views[&0].map[&7].1.write,
        "the host's own setting stays"
    );
    assert!(
        r.alt.domains[&D].tracking.is_none(),
        "nothing kept once nothing is tracked"
    );
    // Bad ranges.
    for (gfn, count) in [(0, 0), (RAM - 1, 2), (u64::MAX, 2)] {
        assert_eq!(
            r.alt
                .track(&mut r.k, D, GfnRange { gfn, count }, Some(Mechanism::Pml)),
            Err(AltError::BadRange)
        );
    }
    assert_eq!(
        r.alt
            .track(&mut r.k, 7, GfnRange { gfn: 0, count: 1 }, None),
        Err(AltError::NoSuchDomain)
    );
}

/// `NextEvent`: each waiting event goes to one held call of its domain's
/// listener, once, oldest first; an event whose call could not be answered
/// is given again; a listener that attaches late gets the events that
/// waited for one.
#[test]
fn next_event_gives_each_event_once_to_its_domains_listener() {
    use crate::events::Poll;
    let mut r = Rig::new();
    let v = r.view();
    r.host_access(v, &[8, 9], R);
    // Pause policy: the event waits for a listener that is not there yet.
    r.ev.policy.insert(D, NoListener::Pause);
    r.ev.polls.push(Poll {
        badge: 0x77,
        token: 1,
    });
    assert_eq!(r.touch(v, 8, W), Outcome::Defer { new_event: true });
    assert_eq!(r.ev.poll_answer(), None, "not the domain's listener yet");
    r.ev.listen(D, 0x77, true).unwrap();
    let (token, first) = r.ev.poll_answer().expect("the held call gets it");
    assert_eq!((token, first.gpa / 4096), (1, 8));
    assert!(r.ev.polls.is_empty());
    assert_eq!(r.ev.next_for(0x77), None, "given once");
    assert_eq!(r.touch(v, 9, W), Outcome::Defer { new_event: true });
    assert_eq!(r.ev.next_for(0x78), None, "not another's");
    let second = r.ev.next_for(0x77).expect("the next one");
    assert_eq!(second.gpa / 4096, 9);
    // Its caller went away before the answer: the next call gets it.
    r.ev.ungive(second.id);
    assert_eq!(r.ev.next_for(0x77), Some(second));
    // Answered events are gone from what NextEvent gives.
    r.ev.answer(&mut r.alt, &mut r.k, 0x77, first.id, Action::SwitchView(0))
        .unwrap();
    r.ev.ungive(first.id);
    assert_eq!(r.ev.next_for(0x77), None);
}

/// `HC_VIEW_SWITCH` comes to the service from the kernel (the p2m owner's
/// exits): a view that exists, in a mode that lets the guest switch, is
/// answered with the switch itself and `Ok` in RAX; anything else with
/// `Refused`, the vCPU staying in its view.
#[test]
fn the_view_switch_hypercall_is_answered_with_the_switch() {
    use ipc_schema::hypercall::{HC_VIEW_SWITCH, Status};
    use ipc_schema::vmexit::Then;
    let mut r = Rig::new();
    let v = r.view();
    let switch = |r: &mut Rig, view: u64| {
        let m = ExitMessage {
            exit: Exit {
                domain: D,
                vcpu: 0,
                kind: ExitKind::Hypercall,
                rip: 0x1000,
                instruction_len: 3,
                view: 0,
            },
            regs: ExitRegs {
                rax: HC_VIEW_SWITCH,
                rbx: view,
                rcx: 7,
                rdx: 8,
            },
        };
        match r.ev.exit(&mut r.alt, &mut r.k, &m, 1) {
            Outcome::Reply(a) => {
                assert!(a.response.advance && a.response.then == Then::Resume);
                assert!(a.response.inject.is_none() && !a.step && a.rip.is_none());
                let regs = a.regs.expect("registers");
                assert_eq!((regs.rbx, regs.rcx, regs.rdx), (view, 7, 8));
                (regs.rax, a.view)
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(switch(&mut r, u64::from(v)), (Status::Ok as u64, Some(v)));
    assert_eq!(switch(&mut r, 0), (Status::Ok as u64, Some(0)));
    for bad in [9, 1 << 40] {
        assert_eq!(switch(&mut r, bad), (Status::Refused as u64, None));
    }
    assert_eq!(r.k.active, 0, "nothing switched behind the answer");
    // A mode that leaves views to an external agent refuses the guest.
    r.alt.set_mode(&mut r.k, D, Mode::External).unwrap();
    assert_eq!(switch(&mut r, u64::from(v)), (Status::Refused as u64, None));
}

/// The held calls of a client that listens to nothing any more are handed
/// back (`stale_polls`); a listener's are kept.
#[test]
fn a_client_that_stops_listening_gets_its_held_call_back() {
    use crate::events::Poll;
    let mut r = Rig::new();
    r.ev.listen(D, 0x77, true).unwrap();
    for (badge, token) in [(0x77, 1), (0x78, 2)] {
        r.ev.polls.push(Poll { badge, token });
    }
    assert!(r.ev.listens(0x77) && !r.ev.listens(0x78));
    assert_eq!(r.ev.stale_polls(), std::vec![2]);
    r.ev.listen(D, 0x77, false).unwrap();
    assert_eq!(r.ev.stale_polls(), std::vec![1]);
    assert!(r.ev.polls.is_empty());
}

/// Execute without read is refused where EPT cannot express it (the CPU
/// would refuse the entry as a misconfiguration and the domain would die);
/// where it can, it is taken.
#[test]
fn execute_only_access_needs_execute_only_ept() {
    let x = Access {
        read: false,
        write: false,
        execute: true,
    };
    let unsupported = Reply::Error(HcError::Unsupported {
        feature: Feature::ExecuteOnly,
    });
    let mut r = Rig::with(ALL & !vm_features::EXECUTE_ONLY);
    let v = r.view();
    let set = Request::SetAccess {
        view: v,
        gfn: 4,
        access: x,
    };
    assert_eq!(r.guest(set.clone()), unsupported);
    assert_eq!(r.host(set.clone()), unsupported);
    assert_eq!(
        r.guest(Request::ViewCreate {
            default_access: Some(x)
        }),
        unsupported
    );
    assert_eq!(r.k.views[&v].map[&4].1, RWX, "nothing changed");
    let mut r = Rig::new();
    let v = r.view();
    assert_eq!(
        r.guest(Request::SetAccess {
            view: v,
            gfn: 4,
            access: x
        }),
        Reply::Done
    );
    assert_eq!(r.k.views[&v].map[&4].1, perms_of(x));
}

/// Seed 000/004 reading: a guest clearing suppress-#VE on a page an
/// external agent restricts is told the setting is kept but not in effect
/// (the page's violations go to the external agent, never to the guest).
#[test]
fn a_cleared_suppress_ve_under_an_external_restriction_is_said_not_in_effect() {
    let mut r = Rig::new();
    let v = r.view();
    assert_eq!(
        r.host(Request::SetAccess {
            view: v,
            gfn: 6,
            access: R
        }),
        Reply::Done
    );
    let clear = |gfn: u64| Request::SetSuppressVe {
        view: v,
        gfn,
        suppress: false,
    };
    assert_eq!(r.guest(clear(6)), Reply::NotInEffect { pages: 1 });
    assert_eq!(
        r.guest(Request::GetSuppressVe { view: v, gfn: 6 }),
        Reply::SuppressVe(true)
    );
    assert_eq!(r.guest(clear(7)), Reply::Done, "a page nobody restricts");
    let mut gfns = BoundedVec::new();
    for g in [5, 6, 7] {
        gfns.0.push(g).unwrap();
    }
    assert_eq!(
        r.guest(Request::SetSuppressVeList {
            view: v,
            gfns,
            suppress: false
        }),
        Reply::NotInEffect { pages: 1 }
    );
}

// ---- Page sharing as a constraint of the model (SH-1..SH-4) ----

fn shared(r: AltReplyResult) -> (u32, u32) {
    match r {
        Ok(ipc_schema::altp2m::AltReply::Shared { frame, refs, .. }) => (frame, refs),
        other => panic!("{other:?}"),
    }
}

type AltReplyResult = Result<ipc_schema::altp2m::AltReply, AltError>;

impl Rig {
    fn nominate(&mut self, gfn: u64) -> AltReplyResult {
        self.alt.share_nominate(&mut self.k, D, gfn)
    }
    fn share(&mut self, gfn: u64, frame: u32) -> AltReplyResult {
        self.alt.share_map(&mut self.k, D, gfn, frame)
    }
    fn unshare(&mut self, gfn: u64) -> AltReplyResult {
        self.alt.unshare(&mut self.k, D, gfn)
    }
    /// A guest write through `view` at `gfn` as the CPU makes it: through
    /// the entry if it allows it (the frame written is returned), else a
    /// violation to the service and a retry, a few times. `None`: the
    /// write did not happen (a listener's event, or a crash).
    fn write(&mut self, view: u16, gfn: u64) -> Option<u64> {
        for _ in 0..4 {
            let e = self.k.views.get(&view)?.map.get(&gfn).copied();
            if let Some((frame, p)) = e
                && p.write
            {
                return Some(frame);
            }
            if self.touch(view, gfn, W) != retry() {
                return None;
            }
        }
        None
    }
}

/// SH-2 in the tables: no entry of any view that maps a shared frame is
/// writable or armed; SH-4: each shared frame's references are the host
/// gfns that map it; the model's shared gfns are the kernel's.
fn check_sharing(k: &Model, alt: &Altp2m) -> Result<(), TestCaseError> {
    for (&v, view) in &k.views {
        for (&g, &(f, p)) in &view.map {
            if k.is_shared_frame(f) {
                prop_assert!(!p.write, "view {v} gfn {g}: writable shared frame {f}");
                prop_assert!(
                    !view.armed.contains(&g),
                    "view {v} gfn {g}: armed shared frame"
                );
            }
        }
    }
    for (&id, &(f, refs)) in &k.shared {
        let mapping = k.views[&0].map.values().filter(|e| e.0 == f).count() as u32;
        prop_assert_eq!(refs, mapping, "frame {} ({})", id, f);
    }
    let model: Vec<u64> = alt
        .domains
        .get(&D)
        .map_or(Vec::new(), |d| d.shared.keys().copied().collect());
    let kernel: Vec<u64> = k.backs.keys().copied().collect();
    prop_assert_eq!(model, kernel);
    Ok(())
}

#[test]
fn a_shared_page_is_read_only_in_every_view_and_a_write_gets_a_private_copy() {
    let mut r = Rig::new();
    let v = r.view();
    let (a, refs) = shared(r.nominate(5));
    assert_eq!(refs, 1);
    // Named again: the same frame, no second reference.
    assert_eq!(shared(r.nominate(5)), (a, 1));
    let (_, refs) = shared(r.share(9, a));
    assert_eq!(refs, 2, "SH-4: 5 and 9 map one frame");
    let frame = r.k.views[&0].map[&5].0;
    assert_eq!(r.k.views[&0].map[&9].0, frame);
    assert_eq!(r.k.free, 101, "9's own frame was freed");
    check_sharing(&r.k, &r.alt).unwrap();
    // SH-2: a read through the view is served read-only.
    assert_eq!(r.touch(v, 9, R), retry());
    assert!(!r.k.views[&v].map[&9].1.write);
    // A write through the view: 9 gets a copy, 5 keeps the frame.
    let written = r.write(v, 9).expect("the write goes through");
    assert_ne!(written, frame);
    assert_eq!(r.k.views[&0].map[&9].0, written);
    assert_eq!(r.k.views[&0].map[&5].0, frame);
    assert_eq!(r.k.free, 100, "the copy took a frame");
    assert_eq!(r.k.shared[&a], (frame, 1));
    let (breaks, more) = r.alt.take_breaks(8);
    assert!(!more);
    assert_eq!(
        breaks,
        vec![ipc_schema::altp2m::CowBreak {
            domain: D,
            gfn: 9,
            frame: a,
            refs: 1
        }]
    );
    // The last reference: a write keeps the frame itself, no copy.
    assert_eq!(r.write(0, 5), Some(frame));
    assert_eq!(r.k.free, 100);
    assert!(r.k.shared.is_empty() && r.k.backs.is_empty());
    // Its id is stale now.
    assert_eq!(
        r.share(9, a),
        Err(AltError::Kernel(EptOpError::NoSuchShare))
    );
    check_sharing(&r.k, &r.alt).unwrap();
}

#[test]
fn views_and_sharing_exclude_each_other_per_page_but_suppress_ve_does_not_unshare() {
    // SH-3.
    let mut r = Rig::new();
    let v = r.view();
    assert_eq!(
        r.host(Request::SetAccess {
            view: v,
            gfn: 4,
            access: R
        }),
        Reply::Done
    );
    assert_eq!(r.nominate(4), Err(AltError::ModifiedInView { view: v }));
    assert_eq!(
        r.host(Request::ChangeGfn {
            view: v,
            gfn: 6,
            to: Some(7)
        }),
        Reply::Done
    );
    assert_eq!(r.nominate(6), Err(AltError::ModifiedInView { view: v }));
    assert_eq!(
        r.nominate(7),
        Err(AltError::ModifiedInView { view: v }),
        "remapped to"
    );
    let (a, _) = shared(r.nominate(8));
    let refused = |gfn| Reply::Error(HcError::Shared { gfn });
    assert_eq!(
        r.host(Request::SetAccess {
            view: v,
            gfn: 8,
            access: Access::RWX
        }),
        refused(8)
    );
    assert_eq!(
        r.host(Request::SetAccess {
            view: 0,
            gfn: 8,
            access: R
        }),
        refused(8)
    );
    assert_eq!(
        r.host(Request::SetAccessRange {
            view: v,
            gfn: 2,
            count: 10,
            access: R
        }),
        refused(8)
    );
    assert_eq!(
        r.host(Request::ChangeGfn {
            view: v,
            gfn: 8,
            to: Some(9)
        }),
        refused(8)
    );
    assert_eq!(
        r.host(Request::ChangeGfn {
            view: v,
            gfn: 9,
            to: Some(8)
        }),
        refused(8)
    );
    // Seed 004: suppress-#VE alone changes, and the page stays shared.
    assert_eq!(
        r.guest(Request::SetSuppressVe {
            view: v,
            gfn: 8,
            suppress: false
        }),
        Reply::Done
    );
    assert_eq!(r.k.backs.get(&8), Some(&a));
    assert!(r.k.views[&v].ve.contains(&8));
    assert!(!r.k.views[&v].map[&8].1.write);
    check_sharing(&r.k, &r.alt).unwrap();
    // Unshared, the view may change it again.
    shared(r.unshare(8));
    assert_eq!(
        r.host(Request::SetAccess {
            view: v,
            gfn: 8,
            access: R
        }),
        Reply::Done
    );
}

#[test]
fn bad_sharing_requests_are_refused_and_change_nothing() {
    let mut r = Rig::new();
    let (a, _) = shared(r.nominate(5));
    let before = (r.k.views[&0].map.clone(), r.k.shared.clone(), r.k.free);
    assert_eq!(
        r.nominate(RAM + 3),
        Err(AltError::Kernel(EptOpError::NotRam))
    );
    assert_eq!(
        r.share(HOLE.start, a),
        Err(AltError::Kernel(EptOpError::NotRam))
    );
    assert_eq!(
        r.share(5, a),
        Err(AltError::Kernel(EptOpError::AlreadyShared)),
        "itself"
    );
    assert_eq!(
        r.share(6, a ^ 0x55),
        Err(AltError::Kernel(EptOpError::NoSuchShare)),
        "forged"
    );
    assert_eq!(r.unshare(6), Err(AltError::Kernel(EptOpError::NotShared)));
    assert_eq!(
        r.alt.unshare(&mut r.k, D + 1, 5),
        Err(AltError::NoSuchDomain),
        "a domain that is not there"
    );
    assert_eq!(
        r.alt.share_nominate(&mut r.k, D + 1, 5),
        Err(AltError::NoSuchDomain)
    );
    assert_eq!(
        before,
        (r.k.views[&0].map.clone(), r.k.shared.clone(), r.k.free)
    );
    // Out of frames for a copy: the writer's domain is stopped, nothing
    // else changes.
    shared(r.share(6, a));
    r.k.free = 0;
    assert_eq!(r.touch(0, 6, W), crash());
    assert_eq!(r.k.backs.len(), 2);
    check_sharing(&r.k, &r.alt).unwrap();
    // With the pause policy the vCPU waits instead (a listener, or the
    // host, decides), and a retry once a frame is free gets the copy.
    r.ev.policy.insert(D, NoListener::Pause);
    assert!(matches!(r.touch(0, 6, W), Outcome::Defer { .. }));
    assert_eq!(r.k.backs.len(), 2);
    r.k.free = 1;
    assert_eq!(r.write(0, 6).map(|f| r.k.is_shared_frame(f)), Some(false));
    check_sharing(&r.k, &r.alt).unwrap();
}

#[derive(Clone, Debug)]
enum ShareOp {
    View,
    Nominate(u64),
    /// Share gfn with the frame of the i-th id seen (or a forged id).
    Share(u64, usize),
    Unshare(u64),
    Write(usize, u64),
    SetAccess(usize, u64, Access),
    ChangeGfn(usize, u64, Option<u64>),
    Sve(usize, u64, bool),
}

fn share_op() -> impl Strategy<Value = ShareOp> {
    let g = 0u64..RAM + 2;
    let v = 0usize..4;
    prop_oneof![
        1 => Just(ShareOp::View),
        3 => g.clone().prop_map(ShareOp::Nominate),
        4 => (g.clone(), 0usize..8).prop_map(|(g, i)| ShareOp::Share(g, i)),
        1 => g.clone().prop_map(ShareOp::Unshare),
        5 => (v.clone(), g.clone()).prop_map(|(v, g)| ShareOp::Write(v, g)),
        2 => (v.clone(), g.clone(), access()).prop_map(|(v, g, a)| ShareOp::SetAccess(v, g, a)),
        2 => (v.clone(), g.clone(), proptest::option::of(g.clone())).prop_map(|(v, g, t)| ShareOp::ChangeGfn(v, g, t)),
        1 => (v, g, any::<bool>()).prop_map(|(v, g, s)| ShareOp::Sve(v, g, s)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// SH-2 over random share, write, view and change_gfn sequences: no
    /// view of the domain ever has a writable (or armed) entry of a shared
    /// frame; every guest write lands in a frame no other gfn maps, so
    /// each gfn reads what was last written to it (or what its source had
    /// when it was shared); references are exact (SH-4); refused requests
    /// change nothing the checks see.
    #[test]
    fn a_shared_frame_is_never_writable_through_any_view(ops in proptest::collection::vec(share_op(), 1..60)) {
        let mut r = Rig::new();
        let mut ids: Vec<u32> = Vec::new();
        // What each gfn holds (its host frame's contents), by value.
        let mut expect: BTreeMap<u64, u64> = (0..RAM).map(|g| (g, g)).collect();
        let mut stamp = 1000;
        for op in ops {
            let views: Vec<u16> = r.alt.domains.get(&D).map_or(vec![0], |d| d.views.keys().copied().collect());
            let view = |i: usize| views[i % views.len()];
            match op {
                ShareOp::View => { r.view(); }
                ShareOp::Nominate(g) => {
                    if let Ok(ipc_schema::altp2m::AltReply::Shared { frame, .. }) = r.nominate(g) {
                        ids.push(frame);
                    }
                }
                ShareOp::Share(g, i) => {
                    let id = ids.get(i).copied().unwrap_or(0xdead_0000 + i as u32);
                    let source = r.k.shared.get(&id).map(|s| s.0);
                    if r.share(g, id).is_ok() {
                        // The client reads the source's contents now.
                        let src = source.expect("only a live id is accepted");
                        expect.insert(g, r.k.contents.get(&src).copied().unwrap_or(src));
                    }
                }
                ShareOp::Unshare(g) => { let _ = r.unshare(g); }
                ShareOp::Write(v, g) => {
                    if let Some(frame) = r.write(view(v), g) {
                        prop_assert!(!r.k.is_shared_frame(frame), "a write reached shared frame {}", frame);
                        stamp += 1;
                        r.k.contents.insert(frame, stamp);
                        // Every host gfn of that frame (exactly one) reads it.
                        for (&hg, e) in &r.k.views[&0].map {
                            if e.0 == frame {
                                expect.insert(hg, stamp);
                            }
                        }
                    }
                }
                ShareOp::SetAccess(v, g, a) => {
                    let _ = r.host(Request::SetAccess { view: view(v), gfn: g, access: a });
                }
                ShareOp::ChangeGfn(v, g, t) => {
                    let _ = r.host(Request::ChangeGfn { view: view(v), gfn: g, to: t });
                }
                ShareOp::Sve(v, g, s) => {
                    let _ = r.guest(Request::SetSuppressVe { view: view(v), gfn: g, suppress: s });
                }
            }
            let _ = r.alt.take_breaks(usize::MAX);
            check_sharing(&r.k, &r.alt)?;
            for (&g, &(frame, _)) in &r.k.views[&0].map {
                prop_assert_eq!(r.k.contents.get(&frame).copied().unwrap_or(frame), expect[&g], "gfn {}", g);
            }
        }
    }
}

#[test]
fn a_shared_page_the_model_does_not_hold_is_learnt_and_broken_on_write() {
    // A restarted instance starts with an empty model; the kernel still
    // knows which gfns are shared and refuses them write (SH-2).
    let mut r = Rig::new();
    let mut out = [EptResult::Done; 2];
    r.k.ept(
        D,
        &[
            EptOp::ShareNominate { view: 0, gfn: 5 },
            EptOp::ShareNominate { view: 0, gfn: 5 },
        ],
        &mut out,
    )
    .unwrap();
    let EptResult::Shared { frame, .. } = out[0] else {
        panic!("{out:?}")
    };
    r.k.ept(
        D,
        &[EptOp::ShareMap {
            view: 0,
            gfn: 6,
            frame,
        }],
        &mut out[..1],
    )
    .unwrap();
    assert!(r.alt.domains.get(&D).is_none_or(|d| d.shared.is_empty()));
    let written = r.write(0, 6).expect("the write goes through");
    assert_ne!(written, r.k.views[&0].map[&5].0, "6 got its own copy");
    assert_eq!(r.k.shared[&frame].1, 1);
    let (breaks, _) = r.alt.take_breaks(8);
    assert_eq!(breaks.len(), 1);
    assert_eq!((breaks[0].gfn, breaks[0].frame), (6, frame));
}

// The violation path's fast route (issue 15): the same answers and state as
// the general way.

/// A violation exit message of `view` at `gfn`: `allowed` as given, or (for
/// `None`) what the kernel's entry allows, as `Rig::exit` sends.
fn violation_message(
    r: &Rig,
    view: u16,
    gfn: u64,
    access: Access,
    allowed: Option<Access>,
) -> ExitMessage {
    let bits = |a: Access| AccessBits {
        read: a.read,
        write: a.write,
        execute: a.execute,
    };
    let allowed = allowed.map(bits).unwrap_or_else(|| {
        r.k.views.get(&view).and_then(|v| v.map.get(&gfn)).map_or(
            AccessBits::default(),
            |&(_, p)| AccessBits {
                read: p.read,
                write: p.write,
                execute: p.execute,
            },
        )
    });
    ExitMessage {
        exit: Exit {
            domain: D,
            vcpu: 1,
            kind: ExitKind::EptViolation {
                gpa: gfn * 4096 + 0x28,
                gla: (!gfn.is_multiple_of(3)).then_some(0x7000_0000 + gfn * 4096),
                access: bits(access),
                allowed,
                qualification: 0x183,
            },
            rip: 0x5678,
            instruction_len: 0,
            view,
        },
        regs: ExitRegs::default(),
    }
}

/// How the domain's violations are heard in the fast route's test.
#[derive(Clone, Copy, Debug)]
enum Hearing {
    /// No listener; the policy stops the domain.
    Crash,
    /// No listener; the vCPU waits for one.
    Pause,
    /// A listener for every violation.
    All,
    /// A listener for writes to gfns 8..24 alone (no policy).
    Some,
}

fn hearing() -> impl Strategy<Value = Hearing> {
    prop_oneof![
        Just(Hearing::Crash),
        Just(Hearing::Pause),
        Just(Hearing::All),
        Just(Hearing::Some)
    ]
}

/// A rig after `ops`, its domain's violations heard as `h`.
fn rig_after(ops: &[Op], h: Hearing) -> Result<Rig, TestCaseError> {
    let mut r = Rig::new();
    let mut reference = Reference::default();
    reference.views.insert(0, RefView::default());
    for op in ops {
        run_op(&mut r, &mut reference, op)?;
    }
    match h {
        Hearing::Crash => {}
        Hearing::Pause => {
            r.ev.policy.insert(D, NoListener::Pause);
        }
        Hearing::All => r.ev.listen(D, 0x51, true).unwrap(),
        Hearing::Some => r.ev.listen_for(D, 0x52, filter(8, 24, 0b010)).unwrap(),
    }
    Ok(r)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// `Events::exit` (the fast route first: `quiet_restriction`) and the
    /// general way alone give the same answer and leave the same state
    /// (events, model, kernel tables) for any violation after any
    /// operations, with any listener or policy; and the exit read
    /// straight from its bytes (`fast::read_violation`) is the violation
    /// the general decoding reads.
    #[test]
    fn the_fast_violation_route_is_the_general_one(
        ops in proptest::collection::vec(op(), 0..40),
        h in hearing(),
        exits in proptest::collection::vec(
            (0u16..8, gfn(), access(), proptest::option::of(access())),
            1..10,
        ),
    ) {
        let mut fast = rig_after(&ops, h)?;
        let mut general = rig_after(&ops, h)?;
        for (i, &(view, gfn, access, allowed)) in exits.iter().enumerate() {
            if !access.read && !access.write && !access.execute {
                continue;
            }
            let m = violation_message(&fast, view, gfn, access, allowed);
            let mut bytes = [0u8; 128];
            let n = ipc_schema::exitcodec::encode_message(&m, &mut bytes).unwrap();
            let x = crate::fast::read_violation(&bytes[..n]);
            prop_assert_eq!(x, crate::events::Violation::of(&m));
            let token = 0x900 + i as u64;
            let a = fast.ev.violation_exit(&mut fast.alt, &mut fast.k, &x.unwrap(), token);
            let b = general.ev.exit_general(&mut general.alt, &mut general.k, &m, token);
            prop_assert_eq!(a, b, "the answer");
            prop_assert_eq!(&fast.ev, &general.ev, "the events");
            prop_assert_eq!(
                std::format!("{:?}", fast.alt.domains),
                std::format!("{:?}", general.alt.domains),
                "the model"
            );
            prop_assert_eq!(
                std::format!("{:?} {}", fast.k.views, fast.k.writes),
                std::format!("{:?} {}", general.k.views, general.k.writes),
                "the kernel's tables"
            );
        }
    }

    /// What `fast::read_violation` reads from any bytes (encoded exits of
    /// every kind, damaged or cut, and junk) is what the general decoding
    /// reads; it refuses no EPT violation the kernel encodes.
    #[test]
    fn a_violation_read_from_its_bytes_is_the_decoded_one(
        gpa in any::<u64>(),
        gla in proptest::option::of(any::<u64>()),
        bits in any::<u8>(),
        q in any::<u64>(),
        rip in any::<u64>(),
        ids in any::<(u16, u16, u16)>(),
        hlt in any::<bool>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 40..90),
    ) {
        let b = |i: u8| bits & (1 << i) != 0;
        let kind = if hlt {
            ExitKind::Hlt
        } else {
            ExitKind::EptViolation {
                gpa,
                gla,
                access: AccessBits { read: b(0), write: b(1), execute: b(2) },
                allowed: AccessBits { read: b(3), write: b(4), execute: b(5) },
                qualification: q,
            }
        };
        let m = ExitMessage {
            exit: Exit { domain: ids.0, vcpu: ids.1, view: ids.2, instruction_len: 3, rip, kind },
            regs: ExitRegs { rax: q, rbx: gpa, rcx: 1, rdx: 2 },
        };
        let mut out = [0u8; 128];
        let n = ipc_schema::exitcodec::encode_message(&m, &mut out).unwrap();
        let decoded = |bytes: &[u8]| {
            ipc_schema::exitcodec::decode_message(bytes)
                .as_ref()
                .and_then(crate::events::Violation::of)
        };
        prop_assert_eq!(crate::fast::read_violation(&out[..n]), crate::events::Violation::of(&m));
        let mut damaged = out[..n].to_vec();
        let i = at.index(n);
        if cut { damaged.truncate(i) } else { damaged[i] = byte }
        for bytes in [&damaged[..], &junk[..]] {
            if let Some(x) = crate::fast::read_violation(bytes) {
                prop_assert_eq!(Some(x), decoded(bytes));
            }
        }
    }
}

/// The benchmark's case takes the fast route: a write to a page a view
/// makes read-only, with a listener attached, is an event for it (ALT-4),
/// decided by `quiet_restriction` alone, as the general way decides it.
#[test]
fn a_restricted_write_with_a_listener_takes_the_fast_route() {
    let make = || {
        let mut r = Rig::new();
        let v = r.view();
        assert_eq!(
            r.host(Request::SetAccess {
                view: v,
                gfn: 5,
                access: Access::RX
            }),
            Reply::Done
        );
        r.ev.listen(D, 0x51, true).unwrap();
        (r, v)
    };
    let (mut fast, v) = make();
    let (mut general, _) = make();
    let m = violation_message(&fast, v, 5, W, None);
    let x = crate::events::Violation::of(&m).unwrap();
    assert!(x.allowed.read, "the entry is there");
    let a = fast.ev.quiet_restriction(&fast.alt, &x, 7);
    assert_eq!(a, Some(Outcome::Defer { new_event: true }));
    let b = general
        .ev
        .exit_general(&mut general.alt, &mut general.k, &m, 7);
    assert_eq!(a, Some(b));
    assert_eq!(fast.ev, general.ev);
    let w = fast.ev.waiting[0];
    assert_eq!((w.owner, w.token, w.given), (0x51, 7, false));
    assert!(!w.event.internal, "placed by an external agent");
    assert_eq!((w.event.allowed.read, w.event.allowed.write), (true, false));
    // A tracked domain is the general way's (the write may be the log's).
    fast.track(0, 8, Some(Mechanism::WriteProtect));
    assert_eq!(fast.ev.quiet_restriction(&fast.alt, &x, 8), None);
}

/// ALT-4 with forwarding (`AltRequest::Forwarded`): an event whose vCPU
/// waits, of the forwarding listener, is never put in `waiting` but kept
/// apart to be forwarded at once (the kernel keeps the vCPU waiting; the
/// log keeps the event), with the model exactly as the held event leaves
/// it. Any other event (another listener's, none forwarding, a second
/// before the first was taken) stays held; a refused forward puts it back
/// for `NextEvent`.
#[test]
fn an_event_of_the_forwarding_listener_is_forwarded_and_others_held() {
    let make = |forwarding: u64| {
        let mut r = Rig::new();
        let v = r.view();
        r.host(Request::SetAccess {
            view: v,
            gfn: 5,
            access: Access::RX,
        });
        r.ev.listen(D, 0x51, true).unwrap();
        r.ev.forwarding = forwarding;
        assert_eq!(r.touch(v, 5, W), Outcome::Defer { new_event: true });
        (r, v)
    };
    let (mut fwd, _) = make(0x51);
    let (mut held, _) = make(0);
    let w = fwd.ev.take_forwardable().expect("forwarded");
    assert_eq!((w.owner, w.given, w.event.gpa / 4096), (0x51, false, 5));
    assert!(w.event.paused, "its vCPU waits");
    assert!(fwd.ev.waiting.is_empty(), "no waiting record: the kernel's");
    assert_eq!(fwd.ev.after(0, 8), held.ev.after(0, 8), "logged the same");
    assert_eq!(
        alloc::format!("{:?}", fwd.k.views),
        alloc::format!("{:?}", held.k.views),
        "the model as the held event leaves it"
    );
    assert_eq!(fwd.ev.next_for(0x51), None, "nothing for NextEvent");
    // Not forwarding, or forwarding to another: held.
    assert_eq!(held.ev.take_forwardable(), None);
    let (mut other, _) = make(0x52);
    assert_eq!(other.ev.take_forwardable(), None);
    assert_eq!(other.ev.waiting.len(), 1);
    // Refused by the kernel: held as before, for NextEvent.
    fwd.ev.unforward(w);
    held.ev.forwarding = 0x51;
    assert_eq!(fwd.ev, held.ev);
    assert_eq!(fwd.ev.next_for(0x51).map(|e| e.id), Some(w.event.id));
    // Taken once: a second take finds nothing, and nothing stayed behind.
    let (mut once, _) = make(0x51);
    assert!(once.ev.take_forwardable().is_some());
    assert_eq!(once.ev.take_forwardable(), None);
    assert_eq!(once.ev.forward, None);
    // A second event before the first was taken (nothing does that, but
    // nothing may be lost if it did): held for NextEvent.
    let (mut two, v) = make(0x51);
    assert_eq!(two.touch(v, 5, W), Outcome::Defer { new_event: true });
    assert_eq!(two.ev.waiting.len(), 1);
    assert!(two.ev.take_forwardable().is_some());
}
