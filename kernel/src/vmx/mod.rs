//! VMX: entering VMX operation on a CPU and the VMX instructions.
//!
//! Each instruction reports failure the way the SDM defines it (CF set:
//! VMfailInvalid; ZF set: VMfailValid with an error number in the current
//! VMCS), turned into a [`VmxError`] value. The entry/exit path is in `run`.

pub mod caps;
pub mod run;

pub use caps::probe;

use core::arch::asm;
use platform::cpu::{rdmsr, wrmsr};
use platform::vmx::fields::VM_INSTRUCTION_ERROR;
use platform::vmx::{IA32_FEATURE_CONTROL, VmxCaps};

/// How a VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum VmxError {
    /// VMfailInvalid: no current VMCS, or VMXON's region was bad.
    FailInvalid,
    /// VMfailValid: the VM-instruction error number (SDM 31.4).
    FailValid(u32),
}

/// Reads CF and ZF after a VMX instruction.
fn check(cf: u8, zf: u8) -> Result<(), VmxError> {
    if cf != 0 {
        Err(VmxError::FailInvalid)
    } else if zf != 0 {
        // Safety: VMfailValid means there is a current VMCS to read from.
        Err(VmxError::FailValid(
            unsafe { vmread(VM_INSTRUCTION_ERROR) } as u32
        ))
    } else {
        Ok(())
    }
}

/// Enters VMX operation on this CPU with `region` (a zeroed 4 KiB frame) as
/// its VMXON region.
///
/// # Safety
/// `caps` must describe this CPU, `region` must be a frame the caller owns for
/// as long as the CPU stays in VMX operation, and this CPU must not be in VMX
/// operation already.
pub unsafe fn enable(caps: &VmxCaps, region: u64, region_ptr: *mut u8) -> Result<(), VmxError> {
    // Safety: the caller's contract; the MSRs exist on a VMX-capable CPU
    // (caps was decoded from them), and the CR0/CR4 bits set are exactly the
    // ones VMX operation requires (IA32_VMX_CR*_FIXED*).
    unsafe {
        let fc = rdmsr(IA32_FEATURE_CONTROL);
        if fc & 1 == 0 {
            // Unlocked: enable VMX outside SMX and lock.
            wrmsr(IA32_FEATURE_CONTROL, fc | 1 | (1 << 2));
        }
        let mut cr0: u64;
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
        cr0 = (cr0 | caps.cr0_fixed0) & caps.cr0_fixed1;
        asm!("mov cr0, {}", in(reg) cr0, options(nostack));
        let mut cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        cr4 = (cr4 | caps.cr4_fixed0 | (1 << 13)) & caps.cr4_fixed1;
        asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        region_ptr.cast::<u32>().write_volatile(caps.revision);
        let (cf, zf): (u8, u8);
        asm!("vmxon [{}]", "setc {}", "setz {}", in(reg) &region, out(reg_byte) cf, out(reg_byte) zf,
            options(nostack));
        check(cf, zf)
    }
}

/// Clears a VMCS and makes it inactive (required before first use).
///
/// # Safety
/// VMX operation; `vmcs` is the physical address of a VMCS region the caller owns.
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmxError> {
    // A cleared VMCS is not current any more.
    let _ = CURRENT_VMCS.compare_exchange(
        vmcs,
        0,
        core::sync::atomic::Ordering::Relaxed,
        core::sync::atomic::Ordering::Relaxed,
    );
    let (cf, zf): (u8, u8);
    // Safety: the caller's contract.
    unsafe {
        asm!("vmclear [{}]", "setc {}", "setz {}", in(reg) &vmcs, out(reg_byte) cf, out(reg_byte) zf,
            options(nostack));
    }
    check(cf, zf)
}

/// The VMCS current on this CPU (the bootstrap processor), 0 for none: a
/// load of the VMCS that is already current is skipped (every exit a
/// service answers would load it twice).
static CURRENT_VMCS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Makes `vmcs` the current VMCS of this CPU.
///
/// # Safety
/// VMX operation; `vmcs` is a cleared or launched VMCS region the caller owns
/// and that is not current on another CPU.
#[inline]
pub unsafe fn vmptrld(vmcs: u64) -> Result<(), VmxError> {
    use core::sync::atomic::Ordering::Relaxed;
    if CURRENT_VMCS.load(Relaxed) == vmcs {
        return Ok(());
    }
    let (cf, zf): (u8, u8);
    // Safety: the caller's contract.
    unsafe {
        asm!("vmptrld [{}]", "setc {}", "setz {}", in(reg) &vmcs, out(reg_byte) cf, out(reg_byte) zf,
            options(nostack));
    }
    let r = check(cf, zf);
    CURRENT_VMCS.store(if r.is_ok() { vmcs } else { 0 }, Relaxed);
    r
}

/// Reads a field of the current VMCS.
///
/// # Safety
/// VMX operation with a current VMCS; `field` is a valid encoding (a bad one
/// reads as 0 and sets VMfailValid, which this fast path does not check).
#[inline(always)]
pub unsafe fn vmread(field: u32) -> u64 {
    let value: u64;
    // Safety: the caller's contract.
    unsafe {
        asm!("vmread {}, {}", out(reg) value, in(reg) u64::from(field), options(nostack, nomem));
    }
    value
}

/// Writes a field of the current VMCS, reporting failure.
///
/// # Safety
/// VMX operation with a current VMCS, and the value must be valid for the
/// field in the sense that it cannot break the kernel (host-state fields
/// especially); invalid guest state is caught at VM entry.
#[inline(always)]
pub unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmxError> {
    let (cf, zf): (u8, u8);
    // Safety: the caller's contract.
    unsafe {
        asm!("vmwrite {}, {}", "setc {}", "setz {}", in(reg) u64::from(field), in(reg) value,
            out(reg_byte) cf, out(reg_byte) zf, options(nostack, nomem));
    }
    check(cf, zf)
}

/// Writes a field of the current VMCS without checking for failure: for the
/// exit fast path, where the field is known to be writable.
///
/// # Safety
/// As [`vmwrite`], and `field` must be a valid, writable encoding (then the
/// write cannot fail).
#[inline(always)]
pub unsafe fn vmwrite_unchecked(field: u32, value: u64) {
    // Safety: the caller's contract.
    unsafe {
        asm!("vmwrite {}, {}", in(reg) u64::from(field), in(reg) value, options(nostack, nomem));
    }
}

/// INVEPT types.
#[derive(Clone, Copy, Debug)]
pub enum InveptType {
    SingleContext = 1,
    AllContexts = 2,
}

/// Invalidates cached EPT translations (for `eptp`, or all).
///
/// # Safety
/// VMX operation; the CPU supports the type.
pub unsafe fn invept(kind: InveptType, eptp: u64) -> Result<(), VmxError> {
    let descriptor: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // Safety: the caller's contract; the descriptor is 16 bytes on the stack.
    unsafe {
        asm!("invept {}, [{}]", "setc {}", "setz {}", in(reg) kind as u64, in(reg) &descriptor,
            out(reg_byte) cf, out(reg_byte) zf, options(nostack));
    }
    check(cf, zf)
}
