//! What the altp2m service decides, apart from the system calls that carry
//! it out (the [`Kernel`] trait), so that host tests can check it against a
//! model of the kernel's views.
//!
//! The kernel keeps each domain's views as EPT tables and applies
//! operations named by guest frame numbers; this service decides which
//! operations a request or a violation needs (ALT-2, ALT-4, ALT-6, ALT-7).

use ipc_schema::hypercall::{Access, Feature, HcError, MAX_DIRTY, MAX_VIEWS, Reply, Request};
use ipc_schema::ipc::BoundedVec;
use ipc_schema::syscall::{EptOp, EptOpError, EptResult, Perms, SysError, VcpuOp, vm_features};
use ipc_schema::vmexit::{AccessBits, ExitKind, ExitMessage, ExitReply, Response};

/// The kernel calls the service makes.
pub trait Kernel {
    /// `ipc_schema::syscall::vm_features` bits.
    fn features(&self) -> u64;
    fn view_create(&mut self, domain: u16) -> Result<u16, SysError>;
    fn view_destroy(&mut self, domain: u16, view: u16) -> Result<(), SysError>;
    fn view_set_visible(&mut self, domain: u16, view: u16, visible: bool) -> Result<(), SysError>;
    /// Applies `ops` in order; one result each into `out`.
    fn ept(&mut self, domain: u16, ops: &[EptOp], out: &mut [EptResult]) -> Result<(), SysError>;
    fn vcpu_control(
        &mut self,
        domain: u16,
        vcpu: u16,
        op: VcpuOp,
        arg: u64,
    ) -> Result<(), SysError>;
    /// Takes logged gfns into `out`: (how many, whether more remain).
    fn dirty_read(&mut self, domain: u16, out: &mut [u64]) -> Result<(usize, bool), SysError>;
}

fn perms(a: Access) -> Perms {
    Perms {
        read: a.read,
        write: a.write,
        execute: a.execute,
    }
}

fn op_error(e: EptOpError, view: u16, gfn: u64) -> HcError {
    match e {
        EptOpError::NoSuchView => HcError::NoSuchView { view },
        EptOpError::HostView => HcError::HostView,
        EptOpError::OutOfMemory => HcError::OutOfMemory,
        EptOpError::WriteWithoutRead => HcError::BadAccess,
        EptOpError::NotRam | EptOpError::AlreadyMapped | EptOpError::NotMapped => {
            HcError::BadGfn { gfn }
        }
    }
}

/// The kernel refused a view call: which view error that is.
fn view_error(e: SysError, view: u16) -> HcError {
    match e {
        SysError::Busy => HcError::ViewInUse { view },
        SysError::NoResources => HcError::OutOfMemory,
        _ => HcError::NoSuchView { view },
    }
}

/// One EPT operation.
fn one(
    k: &mut impl Kernel,
    domain: u16,
    op: EptOp,
    view: u16,
    gfn: u64,
) -> Result<EptResult, HcError> {
    let mut out = [EptResult::Done];
    k.ept(domain, &[op], &mut out)
        .map_err(|_| HcError::NoSuchView { view })?;
    match out[0] {
        EptResult::Error(e) => Err(op_error(e, view, gfn)),
        r => Ok(r),
    }
}

/// What maps `gfn` in `view`: (the page's permissions if mapped, the
/// entry's suppress-#VE bit).
fn query(
    k: &mut impl Kernel,
    domain: u16,
    view: u16,
    gfn: u64,
) -> Result<(Option<Perms>, bool), HcError> {
    match one(k, domain, EptOp::Query { view, gfn }, view, gfn)? {
        EptResult::Entry {
            mapped,
            suppress_ve,
        } => Ok((mapped.map(|m| m.perms), suppress_ve)),
        _ => Err(HcError::BadGfn { gfn }),
    }
}

/// The host p2m's permissions for RAM gfn `gfn`.
fn host(k: &mut impl Kernel, domain: u16, gfn: u64) -> Result<Perms, HcError> {
    query(k, domain, 0, gfn)?.0.ok_or(HcError::BadGfn { gfn })
}

fn need(k: &impl Kernel, bit: u64, feature: Feature) -> Result<(), HcError> {
    if k.features() & bit != 0 {
        Ok(())
    } else {
        Err(HcError::Unsupported { feature })
    }
}

/// Carries out a guest's (or another service's) request for `domain`.
pub fn request(k: &mut impl Kernel, domain: u16, vcpu: u16, r: &Request) -> Reply {
    match run(k, domain, vcpu, r) {
        Ok(reply) => reply,
        Err(e) => Reply::Error(e),
    }
}

fn run(k: &mut impl Kernel, domain: u16, vcpu: u16, r: &Request) -> Result<Reply, HcError> {
    match *r {
        Request::Capabilities => {
            let f = k.features();
            Ok(Reply::Capabilities {
                vmfunc: f & vm_features::VMFUNC != 0,
                ve: f & vm_features::VE != 0,
                pml: f & vm_features::PML != 0,
                max_views: MAX_VIEWS,
            })
        }
        Request::ViewCreate => k.view_create(domain).map(Reply::View).map_err(|e| match e {
            SysError::NoResources => HcError::TooManyViews,
            _ => HcError::OutOfMemory,
        }),
        Request::ViewDestroy { view } => {
            if view == 0 {
                return Err(HcError::HostView);
            }
            k.view_destroy(domain, view)
                .map_err(|e| view_error(e, view))?;
            Ok(Reply::Done)
        }
        Request::ViewSetVisible { view, visible } => {
            k.view_set_visible(domain, view, visible)
                .map_err(|e| view_error(e, view))?;
            Ok(Reply::Done)
        }
        Request::ChangeGfn { view, gfn, to } => {
            if view == 0 {
                return Err(HcError::HostView);
            }
            host(k, domain, gfn)?;
            match to {
                Some(from) => {
                    let p = host(k, domain, from)?;
                    one(
                        k,
                        domain,
                        EptOp::Map {
                            view,
                            gfn,
                            from_gfn: from,
                            perms: p,
                        },
                        view,
                        gfn,
                    )?;
                }
                // The view's entry goes; the next access fills it from the host p2m.
                None => {
                    one(k, domain, EptOp::Unmap { view, gfn }, view, gfn)?;
                }
            }
            Ok(Reply::Done)
        }
        Request::SetAccess { view, gfn, access } => {
            if access.write && !access.read {
                return Err(HcError::BadAccess);
            }
            host(k, domain, gfn)?;
            // ALT-7: an entry the view has not populated is taken from the host p2m.
            let op = match query(k, domain, view, gfn)?.0 {
                Some(_) => EptOp::Protect {
                    view,
                    gfn,
                    perms: perms(access),
                },
                None => EptOp::Map {
                    view,
                    gfn,
                    from_gfn: gfn,
                    perms: perms(access),
                },
            };
            one(k, domain, op, view, gfn)?;
            Ok(Reply::Done)
        }
        Request::SetSuppressVe {
            view,
            gfn,
            suppress,
        } => {
            host(k, domain, gfn)?;
            // ALT-7 (seed 004): only the bit changes, populated or not.
            one(
                k,
                domain,
                EptOp::SetSuppressVe {
                    view,
                    gfn,
                    suppress,
                },
                view,
                gfn,
            )?;
            Ok(Reply::Done)
        }
        Request::VeEnable { info_gfn } => {
            need(k, vm_features::VE, Feature::VirtualizationException)?;
            host(k, domain, info_gfn)?;
            k.vcpu_control(domain, vcpu, VcpuOp::VeEnable, info_gfn)
                .map_err(|e| match e {
                    SysError::Unsupported => HcError::Unsupported {
                        feature: Feature::VirtualizationException,
                    },
                    _ => HcError::BadGfn { gfn: info_gfn },
                })?;
            Ok(Reply::Done)
        }
        Request::VeDisable => {
            let _ = k.vcpu_control(domain, vcpu, VcpuOp::VeDisable, 0);
            Ok(Reply::Done)
        }
        Request::DirtyLogStart => {
            need(k, vm_features::PML, Feature::PageModificationLogging)?;
            k.vcpu_control(domain, vcpu, VcpuOp::PmlStart, 0)
                .map_err(|e| match e {
                    SysError::Unsupported => HcError::Unsupported {
                        feature: Feature::PageModificationLogging,
                    },
                    _ => HcError::OutOfMemory,
                })?;
            Ok(Reply::Done)
        }
        Request::DirtyLogRead => {
            let mut gfns = [0u64; MAX_DIRTY];
            let (n, more) = k
                .dirty_read(domain, &mut gfns)
                .map_err(|_| HcError::NotLogging)?;
            let mut v = BoundedVec::new();
            let _ = v.0.extend_from_slice(&gfns[..n.min(MAX_DIRTY)]);
            Ok(Reply::Dirty { gfns: v, more })
        }
        Request::DirtyLogStop => {
            let _ = k.vcpu_control(domain, vcpu, VcpuOp::PmlStop, 0);
            Ok(Reply::Done)
        }
    }
}

fn what(access: AccessBits) -> &'static str {
    if access.write {
        "write"
    } else if access.execute {
        "instruction fetch"
    } else {
        "read"
    }
}

/// Answers an EPT violation: fills a view lazily (ALT-6), or stops the
/// domain for an access its views do not allow, saying why (ALT-4 with no
/// listener).
pub fn violation(k: &mut impl Kernel, m: &ExitMessage) -> ExitReply {
    let reply = |response| ExitReply {
        response,
        regs: None,
        view: None,
    };
    let (id, view) = (m.exit.domain, m.exit.view);
    let ExitKind::EptViolation {
        gpa,
        gla,
        access,
        allowed,
        qualification,
    } = m.exit.kind
    else {
        defmt::error!(
            "altp2m: domain {=u16}: an exit that is not an EPT violation came to the violation handler: {}",
            id,
            m.exit.kind
        );
        return reply(Response::CRASH);
    };
    let gfn = gpa / 4096;
    let mut out = [EptResult::Done, EptResult::Done];
    let ops = [EptOp::Query { view: 0, gfn }, EptOp::Query { view, gfn }];
    let n = if view == 0 { 1 } else { 2 };
    if let Err(e) = k.ept(id, &ops[..n], &mut out[..n]) {
        defmt::error!(
            "altp2m: domain {=u16}: cannot look up {=u64:#x}: {}",
            id,
            gpa,
            e
        );
        return reply(Response::CRASH);
    }
    let EptResult::Entry {
        mapped: Some(host), ..
    } = out[0]
    else {
        defmt::error!(
            "domain {=u16}: {=str} of guest-physical {=u64:#x} (linear {=u64:#x}), which is not RAM (qualification {=u64:#x})",
            id,
            what(access),
            gpa,
            gla.unwrap_or(gpa),
            qualification
        );
        return reply(Response::CRASH);
    };
    // ALT-6: an alternate view with no entry for a RAM gfn takes the host
    // p2m's, invisibly to the guest, keeping the empty slot's suppress-#VE bit.
    if let EptResult::Entry {
        mapped: None,
        suppress_ve,
    } = out[1]
        && view != 0
    {
        let fill = [
            EptOp::Map {
                view,
                gfn,
                from_gfn: host.frame_gfn,
                perms: host.perms,
            },
            EptOp::SetSuppressVe {
                view,
                gfn,
                suppress: suppress_ve,
            },
        ];
        let mut res = [EptResult::Done, EptResult::Done];
        let filled =
            k.ept(id, &fill, &mut res).is_ok() && res.iter().all(|r| *r == EptResult::Done);
        if filled {
            return reply(Response::RETRY);
        }
        defmt::error!(
            "altp2m: domain {=u16}: lazy fill of {=u64:#x} in view {=u16} failed: {}",
            id,
            gpa,
            view,
            res[0]
        );
        return reply(Response::CRASH);
    }
    defmt::error!(
        "domain {=u16}: {=str} of {=u64:#x} (linear {=u64:#x}) in view {=u16} not allowed (page allows {=bool}/{=bool}/{=bool} read/write/execute; qualification {=u64:#x}); no listener, so the domain is stopped",
        id,
        what(access),
        gpa,
        gla.unwrap_or(gpa),
        view,
        allowed.read,
        allowed.write,
        allowed.execute,
        qualification
    );
    reply(Response::CRASH)
}
