//! What services may do to a domain's views and vCPU: EPT operations named
//! by guest frame numbers (a service never sees a host-physical address),
//! #VE and PML controls, and reading the dirty log. Policy (which gfn goes
//! where, who may ask) is the caller's; these only do it.

use super::dirty::{DirtyLog, PML_START, drain_pml};
use super::domain::Domain;
use super::memory::{DomainTables, KernelTables, alloc_zeroed_frame};
use crate::sys::syscall::{ept_error, size_code};
use ipc_schema::syscall::{EptEntry, EptOp, EptOpError, EptResult, Perms, SysError, VcpuOp};
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
            let host = d
                .views
                .host()
                .query(&KernelTables, from)
                .ok_or(EptOpError::NotRam)?;
            let hpa = host
                .hpa_of(from & !(PAGE_SIZE - 1))
                .ok_or(EptOpError::NotRam)?;
            let (_, v, tables) = d.views.host_and(view).map_err(|_| {
                if view == 0 {
                    EptOpError::HostView
                } else {
                    EptOpError::NoSuchView
                }
            })?;
            if v.query(&KernelTables, gpa).is_some() {
                to_4k(v, tables, gpa)?;
                v.unmap(tables, gpa).map_err(ept_error)?;
            }
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
            let gpa = ram(d, gfn)?;
            let (_, v, tables) = d.views.host_and(view).map_err(|_| {
                if view == 0 {
                    EptOpError::HostView
                } else {
                    EptOpError::NoSuchView
                }
            })?;
            if v.query(&KernelTables, gpa).is_some() {
                to_4k(v, tables, gpa)?;
                v.unmap(tables, gpa).map_err(ept_error)?;
            }
            Ok(EptResult::Done)
        }
        EptOp::Protect { view, gfn, perms } => {
            let gpa = ram(d, gfn)?;
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
            let end = gfn.checked_add(count).ok_or(EptOpError::NotRam)?;
            if count == 0 || end.checked_mul(PAGE_SIZE).is_none_or(|e| e > d.ram_bytes) {
                return Err(EptOpError::NotRam);
            }
            let (ept, tables) = d.views.ept_mut(view).map_err(|_| EptOpError::NoSuchView)?;
            ept.protect_range(tables, gfn * PAGE_SIZE, end * PAGE_SIZE, ept_perms(perms))
                .map_err(ept_error)?;
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

/// #VE and PML for the domain's vCPU.
pub fn vcpu_control(d: &mut Domain, op: VcpuOp, arg: u64) -> Result<(), SysError> {
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
            // Logging is per 4 KiB page, and only writes that set a dirty bit
            // are logged: split every view to 4 KiB and clear the bits.
            let ram = d.ram_bytes;
            let (views, tables) = d.views.iter_mut();
            for (_, v) in views {
                v.ept
                    .split_to_4k(tables, 0, ram)
                    .map_err(|_| SysError::NoResources)?;
                v.ept.take_accessed_dirty(tables, 0, ram, |_, _, _, _| {});
            }
            d.views.flush_all();
            if d.dirty.is_none() {
                d.dirty = Some(DirtyLog::new(ram).ok_or(SysError::NoResources)?);
            }
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            let buffer = match v.pml_buffer {
                Some(b) => b,
                None => alloc_zeroed_frame().ok_or(SysError::NoResources)?,
            };
            v.pml_buffer = Some(buffer);
            // Safety: the VMCS is current; the buffer is a frame this vCPU owns.
            unsafe {
                v.write(PML_ADDRESS, buffer);
                v.write(GUEST_PML_INDEX, PML_START);
            }
            if !v.set_secondary(caps, proc2::ENABLE_PML, true) {
                return Err(SysError::Unsupported);
            }
            if let Some(log) = d.dirty.as_mut() {
                log.clear();
                log.logging = true;
            }
        }
        VcpuOp::PmlStop => {
            let v = d.vcpu.as_mut().ok_or(SysError::BadArgument)?;
            v.load().map_err(|_| SysError::Busy)?;
            if let Some(log) = d.dirty.as_mut() {
                drain_pml(v, log);
                log.logging = false;
            }
            v.set_secondary(caps, proc2::ENABLE_PML, false);
        }
    }
    Ok(())
}

/// Takes up to `out.len()` dirty gfns (lowest first) and re-arms them, so
/// that the next write to each is logged again. Returns (count, more).
pub fn dirty_read(d: &mut Domain, out: &mut [u64]) -> Result<(usize, bool), SysError> {
    let (Some(log), Some(v)) = (d.dirty.as_mut(), d.vcpu.as_mut()) else {
        return Err(SysError::BadArgument);
    };
    if !log.logging {
        return Err(SysError::BadArgument);
    }
    v.load().map_err(|_| SysError::Busy)?;
    drain_pml(v, log);
    let mut n = 0;
    let more = log.take(out.len(), |g| {
        out[n] = g;
        n += 1;
    });
    for &g in &out[..n] {
        let (views, tables) = d.views.iter_mut();
        for (_, view) in views {
            view.ept.take_accessed_dirty(
                tables,
                g * PAGE_SIZE,
                (g + 1) * PAGE_SIZE,
                |_, _, _, _| {},
            );
        }
    }
    d.views.flush_all();
    Ok((n, more))
}
