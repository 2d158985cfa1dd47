//! The request hypercall (HC_CALL): a postcard [`Request`] in guest memory,
//! answered with a [`Reply`] in the same place (ABI: ipc_schema::hypercall).
//!
//! Requests are untrusted input: the address must be guest RAM within one
//! page, the bytes must decode exactly, every view and gfn is checked, and a
//! refusal is a named [`HcError`], never a crash of anything but the request.

use crate::vm::caps;
use crate::vm::dirty::{PML_START, drain_pml};
use crate::vm::domain::{Domain, check_gfn};
use crate::vm::memory::{KernelTables, alloc_zeroed_frame};
use ipc_schema::hypercall::{
    Access, Feature, HC_CALL, HcError, MAX_DIRTY, MAX_REQUEST, MAX_VIEWS, Reply, Request, Status,
};
use ipc_schema::vmexit::Response;
use platform::PAGE_SIZE;
use platform::ept::{EptError, MemoryType, PageSize, Perms};
use platform::vmx::fields::{GUEST_PML_INDEX, PML_ADDRESS, VE_INFO_ADDRESS};
use platform::vmx::proc2;

/// Any VMCALL the kernel's fast path did not take.
pub fn handle(d: &mut Domain) -> Response {
    let status = if d.vcpu.regs.rax == HC_CALL {
        call(d)
    } else {
        Status::UnknownCall
    };
    d.vcpu.regs.rax = status as u64;
    Response::DONE
}

fn call(d: &mut Domain) -> Status {
    let (gpa, len) = (d.vcpu.regs.rbx, d.vcpu.regs.rcx as usize);
    if len > MAX_REQUEST || (gpa % PAGE_SIZE) as usize + len > PAGE_SIZE as usize {
        return if len > MAX_REQUEST {
            Status::Malformed
        } else {
            Status::BadAddress
        };
    }
    let mut buf = [0u8; MAX_REQUEST];
    if d.read_guest(gpa, &mut buf[..len]).is_none() {
        return Status::BadAddress;
    }
    let request = match postcard::take_from_bytes::<Request>(&buf[..len]) {
        Ok((r, [])) => r,
        _ => return Status::Malformed,
    };
    let reply = match dispatch(d, &request) {
        Ok(r) => r,
        Err(e) => {
            defmt::debug!("domain {=u16}: hypercall refused: {}", d.id, e);
            Reply::Error(e)
        }
    };
    let room = (PAGE_SIZE - gpa % PAGE_SIZE) as usize;
    let mut out = [0u8; MAX_REQUEST];
    let Ok(bytes) = postcard::to_slice(&reply, &mut out[..room.min(MAX_REQUEST)]) else {
        return Status::ReplyTooLong;
    };
    if d.write_guest(gpa, bytes).is_none() {
        return Status::BadAddress;
    }
    d.vcpu.regs.rbx = bytes.len() as u64;
    if matches!(reply, Reply::Error(_)) {
        Status::Refused
    } else {
        Status::Ok
    }
}

fn perms(a: Access) -> Perms {
    Perms::new(a.read, a.write, a.execute)
}

fn ept_error(e: EptError) -> HcError {
    match e {
        EptError::OutOfMemory => HcError::OutOfMemory,
        EptError::NotMapped { gpa } | EptError::OutOfRange { gpa } => HcError::BadGfn {
            gfn: gpa / PAGE_SIZE,
        },
        _ => HcError::BadGfn { gfn: 0 },
    }
}

fn need(on: bool, feature: Feature) -> Result<(), HcError> {
    if on {
        Ok(())
    } else {
        Err(HcError::Unsupported { feature })
    }
}

fn dispatch(d: &mut Domain, request: &Request) -> Result<Reply, HcError> {
    let f = caps().1;
    match *request {
        Request::Capabilities => Ok(Reply::Capabilities {
            vmfunc: f.vmfunc,
            ve: f.ve,
            pml: f.pml,
            max_views: MAX_VIEWS,
        }),
        Request::ViewCreate => Ok(Reply::View(d.views.create()?)),
        Request::ViewDestroy { view } => {
            if d.vcpu.active_view() == view {
                return Err(HcError::ViewInUse { view });
            }
            d.views.destroy(view)?;
            Ok(Reply::Done)
        }
        Request::ViewSetVisible { view, visible } => {
            d.views.set_visible(view, visible)?;
            Ok(Reply::Done)
        }
        Request::ChangeGfn { view, gfn, to } => {
            let gpa = check_gfn(d, gfn)?;
            let target = match to {
                Some(t) => {
                    let from = check_gfn(d, t)?;
                    let host = d
                        .views
                        .host()
                        .query(&KernelTables, from)
                        .ok_or(HcError::BadGfn { gfn: t })?;
                    Some((
                        host.hpa_of(from).unwrap_or(host.hpa),
                        host.perms,
                        host.memory_type,
                    ))
                }
                None => None,
            };
            let (_, v) = d.views.host_and(view)?;
            clear_4k(v, gpa)?;
            if let Some((hpa, perms, memory_type)) = target {
                v.map(
                    &mut KernelTables,
                    gpa,
                    hpa,
                    PageSize::Size4K,
                    perms,
                    memory_type,
                )
                .map_err(ept_error)?;
            }
            d.views.flush(view);
            Ok(Reply::Done)
        }
        Request::SetAccess { view, gfn, access } => {
            let gpa = check_gfn(d, gfn)?;
            let host = d
                .views
                .host()
                .query(&KernelTables, gpa)
                .ok_or(HcError::BadGfn { gfn })?;
            let fill = (host.hpa_of(gpa).unwrap_or(host.hpa), host.memory_type);
            let ept = if view == 0 {
                d.views.host_mut()
            } else {
                let (_, v) = d.views.host_and(view)?;
                v
            };
            ensure_4k(ept, gpa, fill)?;
            ept.protect(&mut KernelTables, gpa, perms(access))
                .map_err(ept_error)?;
            d.views.flush(view);
            Ok(Reply::Done)
        }
        Request::SetSuppressVe {
            view,
            gfn,
            suppress,
        } => {
            let gpa = check_gfn(d, gfn)?;
            let ept = &mut d.views.get_mut(view)?.ept;
            if ept
                .query(&KernelTables, gpa)
                .is_some_and(|m| m.size != PageSize::Size4K)
            {
                ept.split_to_4k(&mut KernelTables, gpa, gpa + PAGE_SIZE)
                    .map_err(ept_error)?;
            }
            ept.set_suppress_ve(&mut KernelTables, gpa, suppress)
                .map_err(ept_error)?;
            d.views.flush(view);
            Ok(Reply::Done)
        }
        Request::VeEnable { info_gfn } => {
            need(f.ve, Feature::VirtualizationException)?;
            let gpa = check_gfn(d, info_gfn)?;
            let hpa = d
                .views
                .host()
                .translate(&KernelTables, gpa)
                .ok_or(HcError::BadGfn { gfn: info_gfn })?;
            // Safety: the VMCS is current; `hpa` is a frame of this domain's
            // RAM, where the CPU writes #VE information for this vCPU.
            unsafe { d.vcpu.write(VE_INFO_ADDRESS, hpa) };
            need(
                d.vcpu
                    .set_secondary(&caps().0, proc2::EPT_VIOLATION_VE, true),
                Feature::VirtualizationException,
            )?;
            Ok(Reply::Done)
        }
        Request::VeDisable => {
            d.vcpu
                .set_secondary(&caps().0, proc2::EPT_VIOLATION_VE, false);
            Ok(Reply::Done)
        }
        Request::DirtyLogStart => {
            need(f.pml, Feature::PageModificationLogging)?;
            // Logging is per 4 KiB page, and only writes that set a dirty
            // bit are logged: split every view to 4 KiB and clear the bits.
            let ram = d.ram_bytes;
            for (_, v) in d.views.iter_mut() {
                v.ept
                    .split_to_4k(&mut KernelTables, 0, ram)
                    .map_err(ept_error)?;
                v.ept
                    .take_accessed_dirty(&mut KernelTables, 0, ram, |_, _, _, _| {});
            }
            d.views.flush_all();
            let buffer = match d.vcpu.pml_buffer {
                Some(b) => b,
                None => alloc_zeroed_frame().ok_or(HcError::OutOfMemory)?,
            };
            d.vcpu.pml_buffer = Some(buffer);
            // Safety: the VMCS is current; the buffer is a frame this vCPU owns.
            unsafe {
                d.vcpu.write(PML_ADDRESS, buffer);
                d.vcpu.write(GUEST_PML_INDEX, PML_START);
            }
            need(
                d.vcpu.set_secondary(&caps().0, proc2::ENABLE_PML, true),
                Feature::PageModificationLogging,
            )?;
            d.dirty.clear();
            d.dirty.logging = true;
            Ok(Reply::Done)
        }
        Request::DirtyLogRead => {
            if !d.dirty.logging {
                return Err(HcError::NotLogging);
            }
            drain_pml(&mut d.vcpu, &mut d.dirty);
            let mut gfns: heapless::Vec<u64, MAX_DIRTY> = heapless::Vec::new();
            let more = d.dirty.take(MAX_DIRTY, |g| {
                let _ = gfns.push(g);
            });
            // Re-arm: the next write to a page read here must be logged again.
            for &g in &gfns {
                for (_, v) in d.views.iter_mut() {
                    v.ept.take_accessed_dirty(
                        &mut KernelTables,
                        g * PAGE_SIZE,
                        (g + 1) * PAGE_SIZE,
                        |_, _, _, _| {},
                    );
                }
            }
            d.views.flush_all();
            Ok(Reply::Dirty { gfns, more })
        }
        Request::DirtyLogStop => {
            if d.dirty.logging {
                drain_pml(&mut d.vcpu, &mut d.dirty);
                d.vcpu.set_secondary(&caps().0, proc2::ENABLE_PML, false);
                d.dirty.logging = false;
            }
            Ok(Reply::Done)
        }
    }
}

/// Makes sure `gpa`'s page in `ept` is a 4 KiB leaf: split a large page
/// around it, or fill an empty slot from the host p2m (`fill`).
fn ensure_4k(
    ept: &mut platform::ept::Ept,
    gpa: u64,
    fill: (u64, MemoryType),
) -> Result<(), HcError> {
    match ept.query(&KernelTables, gpa) {
        Some(m) if m.size == PageSize::Size4K => Ok(()),
        Some(_) => ept
            .split_to_4k(&mut KernelTables, gpa, gpa + PAGE_SIZE)
            .map_err(ept_error),
        None => ept
            .map(
                &mut KernelTables,
                gpa,
                fill.0,
                PageSize::Size4K,
                Perms::ALL,
                fill.1,
            )
            .map_err(ept_error),
    }
}

/// Removes whatever maps `gpa`'s 4 KiB page in `ept` (splitting a large page
/// first, so its neighbours stay mapped).
fn clear_4k(ept: &mut platform::ept::Ept, gpa: u64) -> Result<(), HcError> {
    match ept.query(&KernelTables, gpa) {
        None => Ok(()),
        Some(m) => {
            if m.size != PageSize::Size4K {
                ept.split_to_4k(&mut KernelTables, gpa, gpa + PAGE_SIZE)
                    .map_err(ept_error)?;
            }
            ept.unmap(&mut KernelTables, gpa)
                .map(|_| ())
                .map_err(ept_error)
        }
    }
}
