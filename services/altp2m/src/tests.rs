//! Host tests of the altp2m policy against a model of the kernel's views.

extern crate std;

use crate::policy::{Kernel, request, violation};
use ipc_schema::hypercall::{Access, Feature, HcError, Reply, Request};
use ipc_schema::syscall::{
    EptEntry, EptOp, EptOpError, EptResult, Perms, SysError, VcpuOp, vm_features,
};
use ipc_schema::vmexit::{AccessBits, Exit, ExitKind, ExitMessage, ExitRegs, Response};
use std::collections::{BTreeMap, BTreeSet};
use std::vec::Vec;

service_runtime::host_logger!();

const RAM: u64 = 64;
const RWX: Perms = Perms {
    read: true,
    write: true,
    execute: true,
};

/// The kernel as the service sees it: views of 4 KiB entries by gfn.
struct Model {
    features: u64,
    views: BTreeMap<u16, View>,
    active: u16,
    logging: bool,
    dirty: BTreeSet<u64>,
}

#[derive(Default, Clone)]
struct View {
    /// gfn -> (frame gfn, perms)
    map: BTreeMap<u64, (u64, Perms)>,
    /// gfns whose suppress-#VE bit is clear.
    ve: BTreeSet<u64>,
    visible: bool,
}

impl Model {
    fn new(features: u64) -> Self {
        let mut host = View::default();
        for g in 0..RAM {
            host.map.insert(g, (g, RWX));
        }
        Self {
            features,
            views: BTreeMap::from([(0, host)]),
            active: 0,
            logging: false,
            dirty: BTreeSet::new(),
        }
    }

    fn apply(&mut self, op: &EptOp) -> Result<EptResult, EptOpError> {
        let ram = |g: u64| {
            if g < RAM {
                Ok(())
            } else {
                Err(EptOpError::NotRam)
            }
        };
        let alt = |s: &mut Self, v: u16| -> Result<(), EptOpError> {
            if v == 0 {
                Err(EptOpError::HostView)
            } else if s.views.contains_key(&v) {
                Ok(())
            } else {
                Err(EptOpError::NoSuchView)
            }
        };
        match *op {
            EptOp::Map {
                view,
                gfn,
                from_gfn,
                perms,
            } => {
                ram(gfn)?;
                ram(from_gfn)?;
                alt(self, view)?;
                if perms.write && !perms.read {
                    return Err(EptOpError::WriteWithoutRead);
                }
                let frame = self.views[&0].map[&from_gfn].0;
                self.views
                    .get_mut(&view)
                    .unwrap()
                    .map
                    .insert(gfn, (frame, perms));
            }
            EptOp::Unmap { view, gfn } => {
                ram(gfn)?;
                alt(self, view)?;
                self.views.get_mut(&view).unwrap().map.remove(&gfn);
            }
            EptOp::Protect { view, gfn, perms } => {
                ram(gfn)?;
                let v = self.views.get_mut(&view).ok_or(EptOpError::NoSuchView)?;
                if perms.write && !perms.read {
                    return Err(EptOpError::WriteWithoutRead);
                }
                v.map.get_mut(&gfn).ok_or(EptOpError::NotMapped)?.1 = perms;
            }
            EptOp::SetSuppressVe {
                view,
                gfn,
                suppress,
            } => {
                ram(gfn)?;
                let v = self.views.get_mut(&view).ok_or(EptOpError::NoSuchView)?;
                if suppress {
                    v.ve.remove(&gfn);
                } else {
                    v.ve.insert(gfn);
                }
            }
            EptOp::Split { view, gfn } => {
                ram(gfn)?;
                self.views.get(&view).ok_or(EptOpError::NoSuchView)?;
            }
            EptOp::Query { view, gfn } => {
                let v = self.views.get(&view).ok_or(EptOpError::NoSuchView)?;
                let mapped = v.map.get(&gfn).map(|&(frame_gfn, perms)| EptEntry {
                    frame_gfn,
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
    fn vcpu_control(&mut self, _: u16, _: u16, op: VcpuOp, arg: u64) -> Result<(), SysError> {
        match op {
            VcpuOp::VeEnable if self.features & vm_features::VE == 0 => Err(SysError::Unsupported),
            VcpuOp::VeEnable if arg >= RAM => Err(SysError::BadArgument),
            VcpuOp::PmlStart => {
                self.logging = true;
                Ok(())
            }
            VcpuOp::PmlStop => {
                self.logging = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }
    fn dirty_read(&mut self, _: u16, out: &mut [u64]) -> Result<(usize, bool), SysError> {
        if !self.logging {
            return Err(SysError::BadArgument);
        }
        let taken: Vec<u64> = self.dirty.iter().copied().take(out.len()).collect();
        for (i, g) in taken.iter().enumerate() {
            out[i] = *g;
            self.dirty.remove(g);
        }
        Ok((taken.len(), !self.dirty.is_empty()))
    }
}

fn all() -> Model {
    Model::new(vm_features::VMX | vm_features::VMFUNC | vm_features::VE | vm_features::PML)
}

fn fault(view: u16, gfn: u64, write: bool) -> ExitMessage {
    let access = AccessBits {
        read: !write,
        write,
        execute: false,
    };
    let kind = ExitKind::EptViolation {
        gpa: gfn * 4096 + 8,
        gla: Some(0x1000),
        access,
        allowed: AccessBits::default(),
        qualification: 0,
    };
    ExitMessage {
        exit: Exit {
            domain: 1,
            vcpu: 0,
            kind,
            rip: 0,
            instruction_len: 3,
            view,
        },
        regs: ExitRegs::default(),
    }
}

fn ask(m: &mut Model, r: Request) -> Reply {
    request(m, 1, 0, &r)
}

#[test]
fn a_new_view_fills_lazily_from_the_host_and_keeps_the_empty_entrys_sve() {
    let mut m = all();
    assert_eq!(ask(&mut m, Request::ViewCreate), Reply::View(1));
    // The guest cleared SVE on a gfn the view never populated (seed 004).
    assert_eq!(
        ask(
            &mut m,
            Request::SetSuppressVe {
                view: 1,
                gfn: 5,
                suppress: false
            }
        ),
        Reply::Done
    );
    assert!(
        m.views[&1].map.is_empty(),
        "setting only SVE populates nothing"
    );
    assert_eq!(
        violation(&mut m, &fault(1, 5, false)).response,
        Response::RETRY
    );
    assert_eq!(m.views[&1].map[&5], (5, RWX));
    assert!(m.views[&1].ve.contains(&5), "the fill kept SVE clear");
}

#[test]
fn a_restriction_with_no_listener_stops_the_domain_and_non_ram_too() {
    let mut m = all();
    ask(&mut m, Request::ViewCreate);
    assert_eq!(
        ask(
            &mut m,
            Request::SetAccess {
                view: 1,
                gfn: 7,
                access: Access::R
            }
        ),
        Reply::Done
    );
    assert_eq!(
        m.views[&1].map[&7].1,
        Perms {
            read: true,
            write: false,
            execute: false
        }
    );
    assert_eq!(
        violation(&mut m, &fault(1, 7, true)).response,
        Response::CRASH
    );
    assert_eq!(
        violation(&mut m, &fault(0, RAM + 10, false)).response,
        Response::CRASH
    );
    assert_eq!(
        violation(&mut m, &fault(1, RAM + 10, false)).response,
        Response::CRASH
    );
}

#[test]
fn change_gfn_remaps_in_one_view_and_reset_restores_the_host_mapping() {
    let mut m = all();
    ask(&mut m, Request::ViewCreate);
    assert_eq!(
        ask(
            &mut m,
            Request::ChangeGfn {
                view: 1,
                gfn: 3,
                to: Some(9)
            }
        ),
        Reply::Done
    );
    assert_eq!(m.views[&1].map[&3].0, 9);
    assert_eq!(m.views[&0].map[&3].0, 3, "the host p2m is untouched");
    assert_eq!(
        ask(
            &mut m,
            Request::ChangeGfn {
                view: 1,
                gfn: 3,
                to: None
            }
        ),
        Reply::Done
    );
    assert_eq!(
        violation(&mut m, &fault(1, 3, false)).response,
        Response::RETRY
    );
    assert_eq!(m.views[&1].map[&3].0, 3);
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let mut m = Model::new(vm_features::VMX);
    let err = |r| Reply::Error(r);
    assert_eq!(
        ask(&mut m, Request::ViewDestroy { view: 0 }),
        err(HcError::HostView)
    );
    assert_eq!(
        ask(&mut m, Request::ViewDestroy { view: 4 }),
        err(HcError::NoSuchView { view: 4 })
    );
    assert_eq!(
        ask(
            &mut m,
            Request::ChangeGfn {
                view: 0,
                gfn: 1,
                to: None
            }
        ),
        err(HcError::HostView)
    );
    assert_eq!(
        ask(
            &mut m,
            Request::SetAccess {
                view: 3,
                gfn: 1,
                access: Access::R
            }
        ),
        err(HcError::NoSuchView { view: 3 })
    );
    assert_eq!(
        ask(
            &mut m,
            Request::SetAccess {
                view: 0,
                gfn: RAM,
                access: Access::R
            }
        ),
        err(HcError::BadGfn { gfn: RAM })
    );
    let write_only = Access {
        read: false,
        write: true,
        execute: false,
    };
    assert_eq!(
        ask(
            &mut m,
            Request::SetAccess {
                view: 0,
                gfn: 1,
                access: write_only
            }
        ),
        err(HcError::BadAccess)
    );
    assert_eq!(
        ask(
            &mut m,
            Request::ChangeGfn {
                view: 1,
                gfn: 1,
                to: Some(u64::MAX)
            }
        ),
        err(HcError::BadGfn { gfn: u64::MAX })
    );
    assert_eq!(
        ask(&mut m, Request::VeEnable { info_gfn: 2 }),
        err(HcError::Unsupported {
            feature: Feature::VirtualizationException
        })
    );
    assert_eq!(
        ask(&mut m, Request::DirtyLogStart),
        err(HcError::Unsupported {
            feature: Feature::PageModificationLogging
        })
    );
    assert_eq!(ask(&mut m, Request::DirtyLogRead), err(HcError::NotLogging));
    // The view a vCPU runs on cannot go.
    ask(&mut m, Request::ViewCreate);
    m.active = 1;
    assert_eq!(
        ask(&mut m, Request::ViewDestroy { view: 1 }),
        err(HcError::ViewInUse { view: 1 })
    );
}

#[test]
fn capabilities_follow_the_cpu() {
    let mut m = Model::new(vm_features::VMX | vm_features::PML);
    assert_eq!(
        ask(&mut m, Request::Capabilities),
        Reply::Capabilities {
            vmfunc: false,
            ve: false,
            pml: true,
            max_views: 512
        }
    );
}

#[test]
fn the_dirty_log_is_read_in_bounded_batches() {
    let mut m = all();
    assert_eq!(ask(&mut m, Request::DirtyLogStart), Reply::Done);
    m.dirty.extend(0..30);
    let Reply::Dirty { gfns, more } = ask(&mut m, Request::DirtyLogRead) else {
        panic!()
    };
    assert_eq!((gfns.0.len(), more), (24, true));
    let Reply::Dirty { gfns, more } = ask(&mut m, Request::DirtyLogRead) else {
        panic!()
    };
    assert_eq!(
        (gfns.0.as_slice(), more),
        (&[24u64, 25, 26, 27, 28, 29][..], false)
    );
}
