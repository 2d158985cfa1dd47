//! What a guest does with VMX features directly: VMFUNC (EPTP switching)
//! and the virtualization-exception (#VE) information area.

use crate::mem::Pages;
use core::arch::asm;

/// The length of the VMFUNC instruction (0F 01 D4): what a #UD handler
/// adds to RIP to skip a refused one.
pub const VMFUNC_LEN: u64 = 3;
/// The VMFUNC instruction's bytes.
pub const VMFUNC_BYTES: [u8; 3] = [0x0f, 0x01, 0xd4];

/// VMFUNC leaf 0 (EPTP switching) with ECX = `index`: switches this vCPU to
/// the view in slot `index` of the EPTP list without a VM exit. When the
/// hypervisor has not made that slot visible (or the CPU lacks VMFUNC) the
/// guest gets #UD with RIP at the instruction.
#[inline(always)]
pub fn vmfunc_switch(index: u32) {
    // Safety: VMFUNC leaf 0 changes only which EPT translates guest-physical
    // addresses; the asm is a compiler memory barrier (not `nomem`), so no
    // access is moved across the switch. A refusal raises #UD, which either
    // a registered handler skips (RIP += 3, registers preserved by the trap
    // path) or the runtime reports and exits.
    unsafe {
        asm!(
            ".byte 0x0f, 0x01, 0xd4",
            in("eax") 0u32,
            in("ecx") index,
            options(nostack, preserves_flags),
        )
    };
}

/// The basic exit reason of an EPT violation (in the #VE information).
pub const EXIT_REASON_EPT_VIOLATION: u32 = 48;
/// Exit qualification bits of an EPT violation.
pub const QUAL_READ: u64 = 1 << 0;
pub const QUAL_WRITE: u64 = 1 << 1;
pub const QUAL_FETCH: u64 = 1 << 2;
/// The guest-linear address field is valid.
pub const QUAL_GLA_VALID: u64 = 1 << 7;

/// The #VE information area (SDM "Virtualization-Exception Information"):
/// one static 4 KiB-aligned page, named to the hypervisor by
/// [`ve_info_gfn`] (`Request::VeEnable { info_gfn }`).
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | basic exit reason (48: EPT violation) |
/// | 4 | 4 | busy: the CPU writes 0xFFFFFFFF when it delivers a #VE and delivers no other until the guest writes 0 |
/// | 8 | 8 | exit qualification |
/// | 16 | 8 | guest-linear address |
/// | 24 | 8 | guest-physical address |
/// | 32 | 2 | EPTP index (the view) |
static VE_INFO: Pages<1> = Pages::new();

/// The guest frame number of the #VE information area.
pub fn ve_info_gfn() -> u64 {
    VE_INFO.gfn(0)
}

/// The guest-physical address of the #VE information area.
pub fn ve_info_addr() -> u64 {
    VE_INFO.addr()
}

/// A copy of the #VE information area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VeInfo {
    pub exit_reason: u32,
    pub busy: u32,
    pub qualification: u64,
    pub guest_linear: u64,
    pub guest_physical: u64,
    pub eptp_index: u16,
}

/// Reads the #VE information area.
pub fn ve_info() -> VeInfo {
    VeInfo {
        exit_reason: VE_INFO.read_u32(0, 0),
        busy: VE_INFO.read_u32(0, 4),
        qualification: VE_INFO.read_u64(0, 8),
        guest_linear: VE_INFO.read_u64(0, 16),
        guest_physical: VE_INFO.read_u64(0, 24),
        eptp_index: VE_INFO.read_u32(0, 32) as u16,
    }
}

/// The busy word (0xFFFFFFFF after a delivery, until cleared).
pub fn ve_busy() -> u32 {
    VE_INFO.read_u32(0, 4)
}

/// Writes 0 to the busy word: the CPU may deliver the next #VE (until then
/// EPT violations that would be #VEs exit to the hypervisor instead).
pub fn ve_clear_busy() {
    VE_INFO.write_u32(0, 4, 0);
}
