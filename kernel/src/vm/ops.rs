//! What services may do to a domain's views and vCPU: EPT operations named
//! by guest frame numbers (a service never sees a host-physical address),
//! #VE and PML controls, and the record of memory the kernel wrote. Policy
//! (which gfn goes where, who may ask, what is dirty) is the caller's;
//! these only do it.

use super::domain::Domain;
use super::memory::{DomainTables, KernelTables};
use super::vcpu::{PML_START, PmlBuffers};
use crate::sys::syscall::{ept_error, size_code};
use ipc_schema::hypercall::HcError;
use ipc_schema::syscall::{EptEntry, EptOp, EptOpError, EptResult, Perms, SysError, VcpuOp};
use ipc_schema::vmexit::{Exit, ExitKind};
use platform::PAGE_SIZE;
use platform::ept::{Ept, PageSize, bits};
use platform::vmx::fields::{GUEST_PML_INDEX, PML_ADDRESS, VE_INFO_ADDRESS};
use platform::vmx::proc2;

fn ept_perms(p: Perms) -> platform::ept::Perms {
    platform::ept::Perms::new(p.read, p.write, p.execute)
}

/// Makes the leaf holding `gpa` in `ept` a 4 KiB one (splitting a large page).
fn to_4k(ept: &mut Ept, tables: &mut DomainTables, gpa: u64) -> Result<(), EptOpError> {
    match ept.query(&KernelTables, gpa) {
        Some(m) if m.size != PageSize::Size4K => ept
            .split_to_4k(tables, gpa, gpa + PAGE_SIZE)
            .map_err(ept_error),
        _ => Ok(()),
    }
}

/// Alternate view `view` (`HostView` for view 0), with the host p2m and
/// the domain's table memory.
fn alternate(d: &mut Domain, view: u16) -> Result<(&Ept, &mut Ept, &mut DomainTables), EptOpError> {
    d.views.host_and(view).map_err(|e| match e {
        HcError::HostView => EptOpError::HostView,
        _ => EptOpError::NoSuchView,
    })
}

/// [`alternate`], with nothing mapped at `gpa` any more (the 4 KiB piece
/// of a large page unmapped alone).
fn clear(
    d: &mut Domain,
    view: u16,
    gpa: u64,
) -> Result<(&Ept, &mut Ept, &mut DomainTables), EptOpError> {
    let (host, v, tables) = alternate(d, view)?;
    if v.query(&KernelTables, gpa).is_some() {
        to_4k(v, tables, gpa)?;
        v.unmap(tables, gpa).map_err(ept_error)?;
    }
    Ok((host, v, tables))
}

/// `count` gfns from `gfn`, inside the domain's RAM, as guest-physical
/// [start, end).
fn ram_range(d: &Domain, gfn: u64, count: u64) -> Result<(u64, u64), EptOpError> {
    let end = gfn.checked_add(count).ok_or(EptOpError::NotRam)?;
    if count == 0 || end.checked_mul(PAGE_SIZE).is_none_or(|e| e > d.ram_bytes) {
        return Err(EptOpError::NotRam);
    }
    Ok((gfn * PAGE_SIZE, end * PAGE_SIZE))
}

/// Page sharing changes the host p2m only.
fn host_only(view: u16) -> Result<(), EptOpError> {
    if view == 0 {
        Ok(())
    } else {
        Err(EptOpError::NoSuchView)
    }
}

/// Carries out one operation on domain `d`.
pub fn ept_op(d: &mut Domain, op: &EptOp) -> EptResult {
    match run(d, op) {
        Ok(r) => r,
        Err(e) => EptResult::Error(e),
    }
}

fn run(d: &mut Domain, op: &EptOp) -> Result<EptResult, EptOpError> {
    let ram = |d: &Domain, gfn: u64| {
        if d.is_ram(gfn) {
            Ok(gfn * PAGE_SIZE)
        } else {
            Err(EptOpError::NotRam)
        }
    };
    match *op {
        EptOp::Map {
            view,
            gfn,
            from_gfn,
            perms,
        } => {
            let gpa = ram(d, gfn)?;
            let from = ram(d, from_gfn)?;
            // SH-2, SH-3: a shared frame is mapped only at its own gfn and
            // read-only; a shared gfn is not remapped in a view.
            let remap = gfn != from_gfn;
            if (remap || perms.write) && super::shared::is_shared_gfn(d, from_gfn)
                || remap && super::shared::is_shared_gfn(d, gfn)
            {
                return Err(EptOpError::Shared);
            }
            let host = d
                .views
                .host()
                .query(&KernelTables, from)
                .ok_or(EptOpError::NotRam)?;
            let hpa = host
                .hpa_of(from & !(PAGE_SIZE - 1))
                .ok_or(EptOpError::NotRam)?;
            if perms.write && super::shared::parents_frame(d, hpa) {
                return Err(EptOpError::Shared);
            }
            if remap {
                d.views.set_remaps(view, true);
                d.views.remapped_from(from_gfn);
            }
            let (_, v, tables) = clear(d, view, gpa)?;
            v.map(
                tables,
                gpa,
                hpa,
                PageSize::Size4K,
                ept_perms(perms),
                host.memory_type,
            )
            .map_err(ept_error)?;
            Ok(EptResult::Done)
        }
        EptOp::Unmap { view, gfn } => {
            clear(d, view, ram(d, gfn)?)?;
            Ok(EptResult::Done)
        }
        EptOp::Protect { view, gfn, perms } => {
            let gpa = ram(d, gfn)?;
            // SH-2: never write to an entry that maps a shared frame (one
            // with no access too: it still maps its frame), or a fork's
            // parent's frame.
            let frame = d
                .views
                .get(view)
                .map_err(|_| EptOpError::NoSuchView)?
                .ept
                .query(&KernelTables, gpa)
                .and_then(|m| m.hpa_of(gpa & !(PAGE_SIZE - 1)));
            if perms.write
                && frame.is_some_and(|f| {
                    super::shared::is_shared_frame(f) || super::shared::parents_frame(d, f)
                })
            {
                return Err(EptOpError::Shared);
            }
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            to_4k(ept, tables, gpa)?;
            ept.protect(tables, gpa, ept_perms(perms))
                .map_err(ept_error)?;
            Ok(EptResult::Done)
        }
        EptOp::ProtectRange {
            view,
            gfn,
            count,
            perms,
        } => {
            // Holes in the range (the legacy VGA window) stay unmapped.
            let (start, end) = ram_range(d, gfn, count)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            ept.protect_range(tables, start, end, ept_perms(perms))
                .map_err(ept_error)?;
            if perms.write {
                super::shared::restrict(d, view, gfn, gfn + count);
            }
            Ok(EptResult::Done)
        }
        EptOp::SetSuppressVe {
            view,
            gfn,
            suppress,
        } => {
            let gpa = ram(d, gfn)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            to_4k(ept, tables, gpa)?;
            ept.set_suppress_ve(tables, gpa, suppress)
                .map_err(ept_error)?;
            Ok(EptResult::Done)
        }
        EptOp::Split { view, gfn } => {
            let gpa = ram(d, gfn)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            to_4k(ept, tables, gpa)?;
            Ok(EptResult::Done)
        }
        EptOp::SplitRange { view, gfn, count } => {
            let (start, end) = ram_range(d, gfn, count)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            ept.split_to_4k(tables, start, end).map_err(ept_error)?;
            Ok(EptResult::Done)
        }
        EptOp::ClearDirty { view, gfn, count } => {
            let (start, end) = ram_range(d, gfn, count)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            ept.take_accessed_dirty(tables, start, end, |_, _, _, _| {});
            Ok(EptResult::Done)
        }
        EptOp::MarkDirty { view, gfn } => {
            let gpa = ram(d, gfn)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            to_4k(ept, tables, gpa)?;
            ept.set_dirty(tables, gpa).map_err(ept_error)?;
            Ok(EptResult::Done)
        }
        EptOp::ArmLift { view, gfn, count } => {
            let (start, end) = ram_range(d, gfn, count)?;
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            ept.arm_lift(tables, start, end);
            d.lift_armed = true;
            super::shared::restrict(d, view, gfn, gfn + count);
            Ok(EptResult::Done)
        }
        EptOp::CopyHost { view } => {
            let (host, v, tables) = alternate(d, view)?;
            v.copy_from(tables, host).map_err(ept_error)?;
            d.views.set_remaps(view, false);
            Ok(EptResult::Done)
        }
        EptOp::ShareNominate { view, gfn } => {
            host_only(view)?;
            super::shared::nominate(d, gfn)
        }
        EptOp::ShareMap { view, gfn, frame } => {
            host_only(view)?;
            super::shared::share(d, gfn, frame)
        }
        EptOp::Unshare { view, gfn, perms } => {
            host_only(view)?;
            super::shared::unshare(d, gfn, perms)
        }
        EptOp::Query { view, gfn } => {
            let gpa = gfn.checked_mul(PAGE_SIZE).ok_or(EptOpError::NotRam)?;
            let ept = &d.views.get(view).map_err(|_| EptOpError::NoSuchView)?.ept;
            let suppress_ve = ept
                .raw_entry(&KernelTables, gpa)
                .map_or(true, |e| e.value & bits::SUPPRESS_VE != 0);
            let mapped = ept.query(&KernelTables, gpa).and_then(|m| {
                let hpa = m.hpa_of(gpa)?;
                Some(EptEntry {
                    frame_gfn: d.gfn_of_frame(hpa & !(PAGE_SIZE - 1))?,
                    size: size_code(m.size),
                    perms: Perms {
                        read: m.perms.read,
                        write: m.perms.write,
                        execute: m.perms.execute,
                    },
                })
            });
            Ok(EptResult::Entry {
                mapped,
                suppress_ve,
            })
        }
    }
}

/// #VE and PML for the domain's vCPU. `pml`: for `PmlStart`, the two
/// buffer frames and the endpoint (already checked against the caller's
/// handles). Returns the values for RDI and RSI.
pub fn vcpu_control(
    d: &mut Domain,
    op: VcpuOp,
    arg: u64,
    pml: Option<([u64; 2], u16)>,
) -> Result<[u64; 2], SysError> {
    if !super::available() {
        return Err(SysError::Unsupported);
    }
    let (caps, f) = super::caps();
    match op {
        VcpuOp::VeEnable => {
            if !f.ve {
                return Err(SysError::Unsupported);
            }
            let gpa = arg.checked_mul(PAGE_SIZE).ok_or(SysError::BadArgument)?;
            let hpa = d
                .views
                .host()
                .translate(&KernelTables, gpa)
                .ok_or(SysError::BadArgument)?;
            // SH-2: the CPU writes this page around the EPT.
            if super::shared::is_shared_frame(hpa) || super::shared::parents_frame(d, hpa) {
                return Err(SysError::BadArgument);
            }
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            // Safety: the VMCS is current; `hpa` is a frame of this domain's
            // RAM, where the CPU writes #VE information for this vCPU.
            unsafe { v.write(VE_INFO_ADDRESS, hpa) };
            if !v.set_secondary(caps, proc2::EPT_VIOLATION_VE, true) {
                return Err(SysError::Unsupported);
            }
        }
        VcpuOp::VeDisable => {
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            v.set_secondary(caps, proc2::EPT_VIOLATION_VE, false);
        }
        VcpuOp::PmlStart => {
            if !f.pml {
                return Err(SysError::Unsupported);
            }
            let (frames, endpoint) = pml.ok_or(SysError::BadArgument)?;
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            // Safety: the VMCS is current; the frames are the caller's, not
            // guest RAM and never to become any (checked by the caller).
            unsafe {
                v.write(PML_ADDRESS, frames[0]);
                v.write(GUEST_PML_INDEX, PML_START);
            }
            if !v.set_secondary(caps, proc2::ENABLE_PML, true) {
                return Err(SysError::Unsupported);
            }
            v.pml = Some(PmlBuffers { frames, active: 0 });
            d.pml_endpoint = Some(endpoint);
            accessed_dirty(d, true);
        }
        VcpuOp::PmlStop => {
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            v.set_secondary(caps, proc2::ENABLE_PML, false);
            v.pml = None;
            d.pml_endpoint = None;
            accessed_dirty(d, false);
        }
        VcpuOp::PmlTake => {
            // A full buffer whose exit is not answered yet is the one to
            // read (the CPU is on the other, and the vCPU waits): handing
            // over the other would leave the full one's entries out of a
            // read the service answers before that exit.
            if d.awaiting_reply
                && let Some(Exit {
                    kind: ExitKind::PmlFull { buffer, entries },
                    ..
                }) = d.pending
            {
                return Ok([u64::from(entries), u64::from(buffer)]);
            }
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            let (buffer, entries) = v.pml_swap().ok_or(SysError::BadArgument)?;
            return Ok([u64::from(entries), u64::from(buffer)]);
        }
        VcpuOp::WritesLog => {
            d.writes = (arg != 0).then(Default::default);
        }
        VcpuOp::ApicSet => {
            if f.apic_access.is_none() {
                return Err(SysError::Unsupported);
            }
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            if !v.set_apic_register(arg >> 32, arg as u32) {
                return Err(SysError::BadArgument);
            }
        }
    }
    Ok([0, 0])
}

/// EPT accessed/dirty flags on while PML logs (it needs them), off
/// otherwise (a guest's page-table walk is then no EPT write), with the
/// (current) vCPU pointed at its view's new EPT pointer.
fn accessed_dirty(d: &mut Domain, on: bool) {
    if d.views.set_accessed_dirty(on)
        && let Some(v) = d.vcpu.as_mut()
    {
        let view = v.active_view();
        if let Ok(eptp) = d.views.eptp(view) {
            v.set_view(view, eptp);
        }
    }
}

/// Copies the record of memory the kernel wrote for services into `out`,
/// and the #VE information page while #VE is on (the CPU writes it around
/// the EPT), without taking them: (pairs written, of them runs of the
/// record, whether some writes went unrecorded). [`drop_writes`] takes
/// them once the caller has them.
pub fn peek_writes(d: &mut Domain, out: &mut [[u64; 2]]) -> Result<(usize, usize, bool), SysError> {
    let ve_hpa = match d.vcpu.as_mut() {
        Some(v) if v.secondary(proc2::EPT_VIOLATION_VE) => {
            v.load().map_err(|_| SysError::Busy)?;
            Some(v.read(VE_INFO_ADDRESS))
        }
        _ => None,
    };
    let ve_info = ve_hpa.and_then(|hpa| d.gfn_of_frame(hpa & !(PAGE_SIZE - 1)));
    let log = d.writes.as_ref().ok_or(SysError::BadArgument)?;
    let runs = log.runs.len().min(out.len());
    for (o, &(gfn, pages)) in out.iter_mut().zip(log.runs.iter()) {
        *o = [gfn, pages];
    }
    let mut written = runs;
    if let Some(g) = ve_info
        && written < out.len()
    {
        out[written] = [g, 1];
        written += 1;
    }
    Ok((written, runs, log.overflow))
}

/// Forgets the `runs` oldest runs of the write record, and its overflow.
pub fn drop_writes(d: &mut Domain, runs: usize) {
    if let Some(log) = d.writes.as_mut() {
        drop_front(&mut log.runs, runs);
        log.overflow = false;
    }
}

/// Copies up to `out.len()` lifted frames, oldest first, into `out`
/// without taking them: (how many, more after them). [`drop_lifted`]
/// takes them once the caller has them.
pub fn peek_lifted(d: &Domain, out: &mut [u64]) -> (usize, bool) {
    let n = d.lifted.len().min(out.len());
    out[..n].copy_from_slice(&d.lifted[..n]);
    (n, d.lifted.len() > n)
}

/// Forgets the `n` oldest lifted frames.
pub fn drop_lifted(d: &mut Domain, n: usize) {
    drop_front(&mut d.lifted, n);
}

/// Removes the first `n` items of `v`, keeping the order of the rest.
fn drop_front<T: Copy, const N: usize>(v: &mut heapless::Vec<T, N>, n: usize) {
    let n = n.min(v.len());
    v.copy_within(n.., 0);
    v.truncate(v.len() - n);
}
