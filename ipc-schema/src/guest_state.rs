//! Whether registers a service wants to set on a vCPU pass VM entry's
//! checks on guest state (Intel SDM Vol. 3C, 28.3.1, "Checks on the Guest
//! State Area"), for the registers `VCPU_REGS` may change
//! (`ipc_schema::syscall::regs`). A set that would fail is refused whole,
//! naming the register and the rule, before anything is written: the guest
//! is never left with a state it cannot be entered in.

use crate::syscall::regs::*;

/// What the checks depend on besides the values.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// The vCPU is in IA-32e mode (EFER.LMA; the "IA-32e mode guest" entry
    /// control). A set cannot change it.
    pub lma: bool,
    /// CS.L: the vCPU runs 64-bit code.
    pub cs_long: bool,
    /// IA32_VMX_CR0_FIXED0/1 and IA32_VMX_CR4_FIXED0/1.
    pub cr0_fixed: (u64, u64),
    pub cr4_fixed: (u64, u64),
    /// CR0 and CR4 bits the host keeps set under the guest's feet (the
    /// guest sees what it wrote).
    pub cr0_host: u64,
    pub cr4_host: u64,
    /// MAXPHYADDR (CPUID 0x80000008).
    pub phys_bits: u8,
}

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_PCIDE: u64 = 1 << 17;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// SCE, LME, LMA, NXE.
const EFER_KNOWN: u64 = 1 | EFER_LME | EFER_LMA | 1 << 11;
/// RFLAGS bits that must be 0: 3, 5, 15, 22-63.
const RFLAGS_RESERVED: u64 = !0x003f_7fd7;
const RFLAGS_VM: u64 = 1 << 17;

/// Whether `v` is canonical for the paging `cr4` selects (48 or 57 bits).
pub fn canonical(v: u64, cr4: u64) -> bool {
    let bits = if cr4 & CR4_LA57 != 0 { 57 } else { 48 };
    let shift = 64 - bits;
    ((v << shift) as i64 >> shift) as u64 == v
}

/// Checks `values` (every register, the ones not in `mask` as they are
/// now) for the set of the registers in `mask`: `Err((index, why))` for
/// the first one VM entry would refuse.
pub fn check(values: &[u64; COUNT], mask: u64, cx: &Context) -> Result<(), (usize, &'static str)> {
    let changed = |i: usize| mask & (1 << i) != 0;
    if mask & !SETTABLE != 0 {
        let i = (mask & !SETTABLE).trailing_zeros() as usize;
        return Err((i.min(COUNT - 1), "read only"));
    }
    let (cr0, cr4, efer) = (
        values[CR0] | cx.cr0_host,
        values[CR4] | cx.cr4_host,
        values[EFER],
    );
    let fail = |i: usize, why: &'static str| Err((i, why));
    // With unrestricted guest, PE and PG need not be 1 (28.3.1.1).
    let fixed0 = cx.cr0_fixed.0 & !(CR0_PE | CR0_PG);
    if changed(CR0) {
        if cr0 >> 32 != 0 || cr0 & fixed0 != fixed0 || cr0 & !cx.cr0_fixed.1 != 0 {
            return fail(
                CR0,
                "bits the CPU requires or does not allow (IA32_VMX_CR0_FIXED0/1)",
            );
        }
        if cr0 & CR0_PG != 0 && cr0 & CR0_PE == 0 {
            return fail(CR0, "PG without PE");
        }
        if cr0 & CR0_NW != 0 && cr0 & CR0_CD == 0 {
            return fail(CR0, "NW without CD");
        }
        if cx.lma && cr0 & CR0_PG == 0 {
            return fail(CR0, "paging off in IA-32e mode");
        }
    }
    if changed(CR4) {
        if cr4 & cx.cr4_fixed.0 != cx.cr4_fixed.0 || cr4 & !cx.cr4_fixed.1 != 0 {
            return fail(
                CR4,
                "bits the CPU requires or does not allow (IA32_VMX_CR4_FIXED0/1)",
            );
        }
        if cx.lma && cr4 & CR4_PAE == 0 {
            return fail(CR4, "PAE off in IA-32e mode");
        }
        if !cx.lma && cr4 & CR4_PCIDE != 0 {
            return fail(CR4, "PCIDE outside IA-32e mode");
        }
    }
    if changed(EFER) {
        if efer & !EFER_KNOWN != 0 {
            return fail(EFER, "reserved bits (only SCE, LME, LMA, NXE)");
        }
        if (efer & EFER_LMA != 0) != cx.lma {
            return fail(
                EFER,
                "LMA would change the vCPU's mode (switch modes from inside the guest)",
            );
        }
        if cr0 & CR0_PG != 0 && (efer & EFER_LME != 0) != cx.lma {
            return fail(EFER, "LME must equal LMA while paging is on");
        }
    }
    if changed(CR3) && values[CR3] >> cx.phys_bits.min(63) != 0 {
        return fail(CR3, "bits above the CPU's physical-address width");
    }
    if changed(RIP) {
        let ok = if cx.lma && cx.cs_long {
            canonical(values[RIP], cr4)
        } else {
            values[RIP] >> 32 == 0
        };
        if !ok {
            return fail(RIP, "not canonical (64-bit code) or above 4 GiB");
        }
    }
    if changed(RFLAGS) {
        let r = values[RFLAGS];
        if r & RFLAGS_RESERVED != 0 || r & 2 == 0 {
            return fail(RFLAGS, "reserved bits (bit 1 must be set)");
        }
        if cx.lma && r & RFLAGS_VM != 0 {
            return fail(RFLAGS, "VM (virtual-8086) in IA-32e mode");
        }
    }
    for i in [FS_BASE, GS_BASE, GDTR_BASE, IDTR_BASE] {
        if changed(i) && !canonical(values[i], cr4) {
            return fail(i, "not canonical");
        }
    }
    for i in [CS_BASE, DS_BASE, ES_BASE, SS_BASE] {
        if changed(i) && values[i] >> 32 != 0 {
            return fail(i, "above 4 GiB (bits 63:32 must be 0)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bochs's skylake_x fixed bits, roughly: PE, NE, PG required in CR0
    /// (PE and PG waived by unrestricted guest), VMXE in CR4.
    fn cx(lma: bool) -> Context {
        Context {
            lma,
            cs_long: lma,
            cr0_fixed: (0x8000_0021, 0xffff_ffff),
            cr4_fixed: (0x2000, 0x0037_27ff),
            cr0_host: 1 << 5,
            cr4_host: 1 << 13,
            phys_bits: 39,
        }
    }

    fn long_mode() -> [u64; COUNT] {
        let mut v = [0; COUNT];
        v[CR0] = 0x8001_0033;
        v[CR4] = 0x20;
        v[EFER] = 0x500;
        v[RFLAGS] = 2;
        v[RIP] = 0xffff_8000_0010_0000;
        v
    }

    #[test]
    fn a_valid_long_mode_state_passes_and_each_bad_value_is_named() {
        let c = cx(true);
        let good = long_mode();
        assert_eq!(check(&good, SETTABLE, &c), Ok(()));
        let bad = |i: usize, value: u64| {
            let mut v = good;
            v[i] = value;
            check(&v, 1 << i, &c).map_err(|(at, _)| at)
        };
        assert_eq!(bad(RIP, 0x0000_8000_0000_0000), Err(RIP));
        assert_eq!(bad(RFLAGS, 0), Err(RFLAGS));
        assert_eq!(bad(RFLAGS, 2 | 1 << 3), Err(RFLAGS));
        assert_eq!(bad(RFLAGS, 2 | RFLAGS_VM), Err(RFLAGS));
        assert_eq!(bad(CR0, 0x0001_0033), Err(CR0), "paging off in IA-32e mode");
        assert_eq!(bad(CR0, 0x8000_0000), Err(CR0), "PG without PE");
        assert_eq!(bad(CR0, 0xa001_0033), Err(CR0), "NW without CD");
        assert_eq!(bad(CR0, 1 << 40 | 0x8001_0033), Err(CR0));
        assert_eq!(bad(CR4, 0), Err(CR4), "PAE off in IA-32e mode");
        assert_eq!(bad(CR4, 0x20 | 1 << 30), Err(CR4), "a bit FIXED1 forbids");
        assert_eq!(bad(EFER, 0x100), Err(EFER), "LMA would change");
        assert_eq!(bad(EFER, 0x500 | 1 << 3), Err(EFER));
        assert_eq!(bad(CR3, 1 << 45), Err(CR3));
        assert_eq!(bad(FS_BASE, 0x0001_0000_0000_0000), Err(FS_BASE));
        assert_eq!(bad(CS_BASE, 1 << 32), Err(CS_BASE));
        let mut v = good;
        v[CS] = 1;
        assert_eq!(check(&v, 1 << CS, &c).map_err(|(i, _)| i), Err(CS));
        // A value not in the mask is not checked (it is the vCPU's own).
        let mut v = good;
        v[RIP] = u64::MAX - 5;
        assert_eq!(check(&v, 1 << RAX, &c), Ok(()));
    }

    #[test]
    fn protected_mode_rules_differ() {
        let c = cx(false);
        let mut v = [0; COUNT];
        v[CR0] = 0x11;
        v[RFLAGS] = 2 | RFLAGS_VM;
        v[RIP] = 0xffff_fff0;
        assert_eq!(check(&v, SETTABLE, &c), Ok(()), "paging off, VM allowed");
        v[RIP] = 1 << 32;
        assert_eq!(check(&v, 1 << RIP, &c).map_err(|(i, _)| i), Err(RIP));
        v[RIP] = 0;
        v[CR4] = CR4_PCIDE;
        assert_eq!(check(&v, 1 << CR4, &c).map_err(|(i, _)| i), Err(CR4));
        v[CR4] = 0;
        v[EFER] = EFER_LMA;
        assert_eq!(check(&v, 1 << EFER, &c).map_err(|(i, _)| i), Err(EFER));
    }
}
