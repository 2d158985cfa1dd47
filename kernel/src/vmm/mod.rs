//! The exit handler: what each exit means for the guest.
//!
//! This is policy, kept apart from the kernel's mechanisms so that it can
//! leave the kernel: it sees an [`Exit`] and the vCPU's registers and answers
//! with a [`Response`], and reaches domain state only through the operations
//! `vm` offers. It emulates what a test guest needs (CPUID with VMX hidden,
//! a 16550 console at 0x3f8, the exit port 0xf4, a few MSRs), serves the
//! request hypercalls (`hypercall`), fills alternate views lazily from the
//! host p2m, and stops a domain whose exit it cannot make sense of, saying
//! why.

mod hypercall;

use crate::vm::domain::Domain;
use crate::vm::memory::KernelTables;
use crate::vm::{caps, flush_console};
use ipc_schema::hypercall::{CPUID_MAX_LEAF, CPUID_SIGNATURE, HYPERCALL_KEY};
use ipc_schema::vmexit::{AccessBits, Exit, ExitKind, Response, Then};
use platform::PAGE_SIZE;
use platform::devices::uart16550::Uart16550;
use platform::ept::PageSize;
use platform::vmx::fields::reason;

/// The guest's COM1.
const COM1: u16 = 0x3f8;
/// QEMU's isa-debug-exit port: a write ends the domain with that status.
const EXIT_PORT: u16 = 0xf4;

/// What the handler keeps for each domain.
#[derive(Default)]
pub struct DomainPolicy {
    uart: Uart16550,
}

/// Answers one exit.
pub fn handle(d: &mut Domain, exit: &Exit) -> Response {
    match exit.kind {
        ExitKind::Cpuid { leaf, subleaf } => {
            cpuid(d, leaf, subleaf);
            Response::DONE
        }
        ExitKind::Hypercall => hypercall::handle(d),
        ExitKind::Io {
            port,
            size,
            write,
            value,
        } => io(d, port, size, write, value),
        ExitKind::Hlt => Response {
            advance: true,
            inject: None,
            then: Then::Block,
        },
        ExitKind::Rdmsr { msr } => match read_msr(msr) {
            Some(v) => {
                d.vcpu.regs.rax = v & 0xffff_ffff;
                d.vcpu.regs.rdx = v >> 32;
                Response::DONE
            }
            None => {
                defmt::debug!("domain {=u16}: RDMSR {=u32:#x} refused with #GP", d.id, msr);
                Response::inject(13, Some(0))
            }
        },
        ExitKind::Wrmsr { msr, value } => {
            // MTRRs and MISC_ENABLE: accepted and ignored (EPT memory types rule).
            if (0x200..=0x2ff).contains(&msr) || msr == 0x1a0 {
                Response::DONE
            } else {
                defmt::debug!(
                    "domain {=u16}: WRMSR {=u32:#x} <- {=u64:#x} refused with #GP",
                    d.id,
                    msr,
                    value
                );
                Response::inject(13, Some(0))
            }
        }
        ExitKind::EptViolation {
            gpa,
            gla,
            access,
            allowed,
            qualification,
        } => ept_violation(d, exit.view, gpa, gla, access, allowed, qualification),
        ExitKind::EptMisconfig { gpa } => {
            defmt::error!(
                "domain {=u16} ({=str}): EPT misconfiguration at GPA {=u64:#x} in view {=u16}",
                d.id,
                d.name,
                gpa,
                exit.view
            );
            Response::CRASH
        }
        ExitKind::TripleFault => {
            defmt::error!(
                "domain {=u16} ({=str}): triple fault (the guest could not handle an exception)",
                d.id,
                d.name
            );
            Response::CRASH
        }
        ExitKind::Vmfunc { leaf, index } => {
            // ALT-5: a VMFUNC the CPU refused (an index whose EPTP list entry
            // is empty: an invisible or missing view) is #UD for the guest,
            // as on a CPU without the function.
            defmt::info!(
                "domain {=u16}: VMFUNC leaf {=u32} index {=u32} refused (no such visible view): #UD",
                d.id,
                leaf,
                index
            );
            Response::inject(6, None)
        }
        ExitKind::Xsetbv { index, value } => {
            defmt::error!(
                "domain {=u16} ({=str}): XSETBV {=u32} <- {=u64:#x} is not supported",
                d.id,
                d.name,
                index,
                value
            );
            Response::CRASH
        }
        ExitKind::Other {
            reason: r,
            qualification: q,
        } => {
            defmt::error!(
                "domain {=u16} ({=str}): unhandled exit: {=str} (reason {=u16}, qualification {=u64:#x}) at rip {=u64:#x}",
                d.id,
                d.name,
                reason::name(r),
                r,
                q,
                exit.rip
            );
            Response::CRASH
        }
    }
}

/// CPUID as the host answers it, with VMX hidden and Parallax's leaves added.
fn cpuid(d: &mut Domain, leaf: u32, subleaf: u32) {
    let mut r = platform::cpu::cpuid(leaf, subleaf);
    match leaf {
        1 => {
            r.ecx &= !(1 << 5); // no VMX for guests
            r.ecx |= 1 << 31; // running under a hypervisor
        }
        0x4000_0000 => {
            let sig = |i: usize| {
                u32::from_le_bytes(CPUID_SIGNATURE[i..i + 4].try_into().unwrap_or([0; 4]))
            };
            (r.eax, r.ebx, r.ecx, r.edx) = (CPUID_MAX_LEAF, sig(0), sig(4), sig(8));
        }
        0x4000_0001 => {
            let f = &caps().1;
            let key = HYPERCALL_KEY.to_bytes();
            r.eax =
                1 | (u32::from(f.vmfunc) << 1) | (u32::from(f.ve) << 2) | (u32::from(f.pml) << 3);
            r.ebx = u32::from_le_bytes([key[0], key[1], key[2], key[3]]);
            r.ecx = u32::from_le_bytes([key[4], key[5], key[6], key[7]]);
            r.edx = 0;
        }
        0x4000_0002..=0x4000_ffff => (r.eax, r.ebx, r.ecx, r.edx) = (0, 0, 0, 0),
        _ => {}
    }
    let regs = &mut d.vcpu.regs;
    (regs.rax, regs.rbx, regs.rcx, regs.rdx) =
        (r.eax.into(), r.ebx.into(), r.ecx.into(), r.edx.into());
}

/// Port I/O: the console UART, the exit port; other ports read as absent
/// hardware (all ones) and ignore writes.
fn io(d: &mut Domain, port: u16, size: u8, write: bool, value: u32) -> Response {
    match port {
        COM1..=0x3ff if write => {
            if let Some(byte) = d.policy.uart.write(port - COM1, value as u8) {
                console_byte(d, byte);
            }
        }
        COM1..=0x3ff => set_in(d, size, u32::from(d.policy.uart.read(port - COM1))),
        EXIT_PORT if write => {
            return Response {
                advance: true,
                inject: None,
                then: Then::Exit { status: value },
            };
        }
        _ if write => {}
        _ => set_in(d, size, u32::MAX),
    }
    Response::DONE
}

/// The value an IN instruction loads (into AL, AX or EAX).
fn set_in(d: &mut Domain, size: u8, value: u32) {
    let mask: u64 = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    let rax = &mut d.vcpu.regs.rax;
    // A 32-bit IN zero-extends into RAX; 8- and 16-bit ones keep the rest.
    *rax = if size == 4 {
        u64::from(value)
    } else {
        (*rax & !mask) | (u64::from(value) & mask)
    };
}

fn console_byte(d: &mut Domain, byte: u8) {
    match byte {
        b'\r' => {}
        b'\n' => {
            let _ = d.console.push(b'\n');
            flush_console(d);
        }
        b => {
            if d.console.push(b).is_err() {
                flush_console(d);
                let _ = d.console.push(b);
            }
        }
    }
}

/// The MSRs a guest may read that VMX does not switch by itself.
fn read_msr(msr: u32) -> Option<u64> {
    Some(match msr {
        0x10 => platform::cpu::rdtsc(),
        0x1b => 0xfee0_0900, // APIC base: enabled, bootstrap processor
        0xfe => 0,           // MTRRcap: no MTRRs to program
        0x1a0 => 1,          // MISC_ENABLE: fast strings
        0x2ff => 0x806,      // MTRR default type: enabled, write-back
        _ => return None,
    })
}

/// An access the active view did not allow.
fn ept_violation(
    d: &mut Domain,
    view: u16,
    gpa: u64,
    gla: Option<u64>,
    access: AccessBits,
    allowed: AccessBits,
    qualification: u64,
) -> Response {
    let host = d.views.host().query(&KernelTables, gpa);
    let what = if access.write {
        "write"
    } else if access.execute {
        "instruction fetch"
    } else {
        "read"
    };
    let Some(host) = host else {
        defmt::error!(
            "domain {=u16} ({=str}): {=str} of guest-physical {=u64:#x} (linear {=u64:#x}), which is not RAM (qualification {=u64:#x})",
            d.id,
            d.name,
            what,
            gpa,
            gla.unwrap_or(gpa),
            qualification
        );
        return Response::CRASH;
    };
    // ALT-6: an alternate view that has no entry for a RAM gfn takes the host
    // p2m's, invisibly to the guest, keeping an SVE bit set on the empty slot.
    if view != 0
        && let Ok((_, v)) = d.views.host_and(view)
        && v.query(&KernelTables, gpa).is_none()
    {
        let page = gpa & !(PAGE_SIZE - 1);
        let sve = v
            .raw_entry(&KernelTables, page)
            .map_or(true, |e| e.value & platform::ept::bits::SUPPRESS_VE != 0);
        let hpa = host.hpa_of(page).unwrap_or(host.hpa);
        let filled = v
            .map(
                &mut KernelTables,
                page,
                hpa,
                PageSize::Size4K,
                host.perms,
                host.memory_type,
            )
            .and_then(|()| {
                if sve {
                    Ok(())
                } else {
                    v.set_suppress_ve(&mut KernelTables, page, false)
                }
            });
        return match filled {
            Ok(()) => Response::RETRY,
            Err(e) => {
                defmt::error!(
                    "domain {=u16}: lazy fill of {=u64:#x} in view {=u16} failed: {}",
                    d.id,
                    gpa,
                    view,
                    e
                );
                Response::CRASH
            }
        };
    }
    // ALT-4: a restriction with nobody to report it to: the domain stops.
    defmt::error!(
        "domain {=u16} ({=str}): {=str} of {=u64:#x} (linear {=u64:#x}) in view {=u16} not allowed (page allows {=bool}/{=bool}/{=bool} read/write/execute; qualification {=u64:#x}); no listener, so the domain is stopped",
        d.id,
        d.name,
        what,
        gpa,
        gla.unwrap_or(gpa),
        view,
        allowed.read,
        allowed.write,
        allowed.execute,
        qualification
    );
    Response::CRASH
}
