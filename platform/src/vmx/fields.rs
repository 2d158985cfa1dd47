//! VMCS field encodings (SDM vol. 3, appendix B) and the decoding of exit
//! information (exit reasons, qualifications), as pure functions.

/// 16-bit fields.
pub const VPID: u32 = 0x0000;
pub const EPTP_INDEX: u32 = 0x0004;
pub const GUEST_ES_SELECTOR: u32 = 0x0800;
pub const GUEST_CS_SELECTOR: u32 = 0x0802;
pub const GUEST_SS_SELECTOR: u32 = 0x0804;
pub const GUEST_DS_SELECTOR: u32 = 0x0806;
pub const GUEST_FS_SELECTOR: u32 = 0x0808;
pub const GUEST_GS_SELECTOR: u32 = 0x080a;
pub const GUEST_LDTR_SELECTOR: u32 = 0x080c;
pub const GUEST_TR_SELECTOR: u32 = 0x080e;
pub const GUEST_PML_INDEX: u32 = 0x0812;
pub const HOST_ES_SELECTOR: u32 = 0x0c00;
pub const HOST_CS_SELECTOR: u32 = 0x0c02;
pub const HOST_SS_SELECTOR: u32 = 0x0c04;
pub const HOST_DS_SELECTOR: u32 = 0x0c06;
pub const HOST_FS_SELECTOR: u32 = 0x0c08;
pub const HOST_GS_SELECTOR: u32 = 0x0c0a;
pub const HOST_TR_SELECTOR: u32 = 0x0c0c;

/// 64-bit control fields.
pub const IO_BITMAP_A: u32 = 0x2000;
pub const IO_BITMAP_B: u32 = 0x2002;
pub const MSR_BITMAP: u32 = 0x2004;
pub const PML_ADDRESS: u32 = 0x200e;
pub const TSC_OFFSET: u32 = 0x2010;
pub const VIRTUAL_APIC_PAGE_ADDR: u32 = 0x2012;
pub const APIC_ACCESS_ADDR: u32 = 0x2014;
pub const VM_FUNCTION_CONTROLS: u32 = 0x2018;
pub const EPT_POINTER: u32 = 0x201a;
pub const EPTP_LIST_ADDRESS: u32 = 0x2024;
pub const VE_INFO_ADDRESS: u32 = 0x202a;
/// 64-bit read-only data.
pub const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
/// 64-bit guest state.
pub const VMCS_LINK_POINTER: u32 = 0x2800;
pub const GUEST_IA32_DEBUGCTL: u32 = 0x2802;
pub const GUEST_IA32_PAT: u32 = 0x2804;
pub const GUEST_IA32_EFER: u32 = 0x2806;
/// 64-bit host state.
pub const HOST_IA32_PAT: u32 = 0x2c00;
pub const HOST_IA32_EFER: u32 = 0x2c02;

/// 32-bit control fields.
pub const PIN_BASED_CONTROLS: u32 = 0x4000;
pub const PRIMARY_CONTROLS: u32 = 0x4002;
pub const EXCEPTION_BITMAP: u32 = 0x4004;
pub const CR3_TARGET_COUNT: u32 = 0x400a;
pub const EXIT_CONTROLS: u32 = 0x400c;
pub const EXIT_MSR_STORE_COUNT: u32 = 0x400e;
pub const EXIT_MSR_LOAD_COUNT: u32 = 0x4010;
pub const ENTRY_CONTROLS: u32 = 0x4012;
pub const ENTRY_MSR_LOAD_COUNT: u32 = 0x4014;
pub const ENTRY_INTERRUPTION_INFO: u32 = 0x4016;
pub const ENTRY_EXCEPTION_ERROR_CODE: u32 = 0x4018;
pub const ENTRY_INSTRUCTION_LENGTH: u32 = 0x401a;
pub const TPR_THRESHOLD: u32 = 0x401c;
pub const SECONDARY_CONTROLS: u32 = 0x401e;
/// 32-bit read-only data.
pub const VM_INSTRUCTION_ERROR: u32 = 0x4400;
pub const EXIT_REASON: u32 = 0x4402;
pub const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
pub const EXIT_INTERRUPTION_ERROR_CODE: u32 = 0x4406;
pub const IDT_VECTORING_INFO: u32 = 0x4408;
pub const IDT_VECTORING_ERROR_CODE: u32 = 0x440a;
pub const EXIT_INSTRUCTION_LENGTH: u32 = 0x440c;
pub const EXIT_INSTRUCTION_INFO: u32 = 0x440e;
/// 32-bit guest state.
pub const GUEST_ES_LIMIT: u32 = 0x4800;
pub const GUEST_CS_LIMIT: u32 = 0x4802;
pub const GUEST_SS_LIMIT: u32 = 0x4804;
pub const GUEST_DS_LIMIT: u32 = 0x4806;
pub const GUEST_FS_LIMIT: u32 = 0x4808;
pub const GUEST_GS_LIMIT: u32 = 0x480a;
pub const GUEST_LDTR_LIMIT: u32 = 0x480c;
pub const GUEST_TR_LIMIT: u32 = 0x480e;
pub const GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const GUEST_IDTR_LIMIT: u32 = 0x4812;
pub const GUEST_ES_ACCESS: u32 = 0x4814;
pub const GUEST_CS_ACCESS: u32 = 0x4816;
pub const GUEST_SS_ACCESS: u32 = 0x4818;
pub const GUEST_DS_ACCESS: u32 = 0x481a;
pub const GUEST_FS_ACCESS: u32 = 0x481c;
pub const GUEST_GS_ACCESS: u32 = 0x481e;
pub const GUEST_LDTR_ACCESS: u32 = 0x4820;
pub const GUEST_TR_ACCESS: u32 = 0x4822;
pub const GUEST_INTERRUPTIBILITY: u32 = 0x4824;
pub const GUEST_ACTIVITY_STATE: u32 = 0x4826;
pub const GUEST_SYSENTER_CS: u32 = 0x482a;
pub const PREEMPTION_TIMER_VALUE: u32 = 0x482e;
/// 32-bit host state.
pub const HOST_SYSENTER_CS: u32 = 0x4c00;

/// Natural-width control fields.
pub const CR0_GUEST_HOST_MASK: u32 = 0x6000;
pub const CR4_GUEST_HOST_MASK: u32 = 0x6002;
pub const CR0_READ_SHADOW: u32 = 0x6004;
pub const CR4_READ_SHADOW: u32 = 0x6006;
/// Natural-width read-only data.
pub const EXIT_QUALIFICATION: u32 = 0x6400;
pub const GUEST_LINEAR_ADDRESS: u32 = 0x640a;
/// Natural-width guest state.
pub const GUEST_CR0: u32 = 0x6800;
pub const GUEST_CR3: u32 = 0x6802;
pub const GUEST_CR4: u32 = 0x6804;
pub const GUEST_ES_BASE: u32 = 0x6806;
pub const GUEST_CS_BASE: u32 = 0x6808;
pub const GUEST_SS_BASE: u32 = 0x680a;
pub const GUEST_DS_BASE: u32 = 0x680c;
pub const GUEST_FS_BASE: u32 = 0x680e;
pub const GUEST_GS_BASE: u32 = 0x6810;
pub const GUEST_LDTR_BASE: u32 = 0x6812;
pub const GUEST_TR_BASE: u32 = 0x6814;
pub const GUEST_GDTR_BASE: u32 = 0x6816;
pub const GUEST_IDTR_BASE: u32 = 0x6818;
pub const GUEST_DR7: u32 = 0x681a;
pub const GUEST_RSP: u32 = 0x681c;
pub const GUEST_RIP: u32 = 0x681e;
pub const GUEST_RFLAGS: u32 = 0x6820;
pub const GUEST_PENDING_DEBUG: u32 = 0x6822;
pub const GUEST_SYSENTER_ESP: u32 = 0x6824;
pub const GUEST_SYSENTER_EIP: u32 = 0x6826;
/// Natural-width host state.
pub const HOST_CR0: u32 = 0x6c00;
pub const HOST_CR3: u32 = 0x6c02;
pub const HOST_CR4: u32 = 0x6c04;
pub const HOST_FS_BASE: u32 = 0x6c06;
pub const HOST_GS_BASE: u32 = 0x6c08;
pub const HOST_TR_BASE: u32 = 0x6c0a;
pub const HOST_GDTR_BASE: u32 = 0x6c0c;
pub const HOST_IDTR_BASE: u32 = 0x6c0e;
pub const HOST_SYSENTER_ESP: u32 = 0x6c10;
pub const HOST_SYSENTER_EIP: u32 = 0x6c12;
pub const HOST_RSP: u32 = 0x6c14;
pub const HOST_RIP: u32 = 0x6c16;

/// Basic exit reasons (SDM vol. 3, appendix C) that Parallax handles or names.
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const INVLPG: u16 = 14;
    pub const RDPMC: u16 = 15;
    pub const RDTSC: u16 = 16;
    pub const VMCALL: u16 = 18;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR_TRAP_FLAG: u16 = 37;
    pub const MONITOR: u16 = 39;
    pub const PAUSE: u16 = 40;
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    pub const APIC_ACCESS: u16 = 44;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const XSETBV: u16 = 55;
    pub const APIC_WRITE: u16 = 56;
    pub const VMFUNC: u16 = 59;
    pub const PML_FULL: u16 = 62;

    /// A short name for logs.
    pub fn name(reason: u16) -> &'static str {
        match reason {
            EXCEPTION_OR_NMI => "exception or NMI",
            EXTERNAL_INTERRUPT => "external interrupt",
            TRIPLE_FAULT => "triple fault",
            INIT => "INIT signal",
            SIPI => "start-up IPI",
            INTERRUPT_WINDOW => "interrupt window",
            TASK_SWITCH => "task switch",
            CPUID => "CPUID",
            HLT => "HLT",
            INVLPG => "INVLPG",
            RDPMC => "RDPMC",
            RDTSC => "RDTSC",
            VMCALL => "VMCALL",
            CR_ACCESS => "control-register access",
            IO_INSTRUCTION => "I/O instruction",
            RDMSR => "RDMSR",
            WRMSR => "WRMSR",
            ENTRY_FAIL_GUEST_STATE => "VM entry failure: invalid guest state",
            ENTRY_FAIL_MSR_LOADING => "VM entry failure: MSR loading",
            MWAIT => "MWAIT",
            MONITOR_TRAP_FLAG => "monitor trap flag",
            MONITOR => "MONITOR",
            PAUSE => "PAUSE",
            ENTRY_FAIL_MACHINE_CHECK => "VM entry failure: machine check",
            APIC_ACCESS => "APIC access",
            EPT_VIOLATION => "EPT violation",
            EPT_MISCONFIG => "EPT misconfiguration",
            PREEMPTION_TIMER => "preemption timer",
            XSETBV => "XSETBV",
            APIC_WRITE => "APIC write",
            VMFUNC => "VMFUNC",
            PML_FULL => "page-modification log full",
            _ => "other",
        }
    }
}

/// An I/O-instruction exit qualification (SDM table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IoQualification {
    /// Access size in bytes: 1, 2 or 4.
    pub size: u8,
    /// `IN` (false) or `OUT` (true).
    pub write: bool,
    /// `INS`/`OUTS`.
    pub string: bool,
    pub rep: bool,
    pub port: u16,
}

impl IoQualification {
    pub fn decode(q: u64) -> Self {
        Self {
            size: (q & 7) as u8 + 1,
            write: q & 8 == 0,
            string: q & 16 != 0,
            rep: q & 32 != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// An EPT-violation exit qualification (SDM table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EptViolation {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// What the EPT entry allowed (read, write, execute).
    pub allowed_read: bool,
    pub allowed_write: bool,
    pub allowed_execute: bool,
    /// The guest-linear address field is valid.
    pub linear_valid: bool,
    /// The access was to the guest's final page (not to a guest paging
    /// structure during its page walk), where `linear_valid`.
    pub final_translation: bool,
}

impl EptViolation {
    pub fn decode(q: u64) -> Self {
        let bit = |n: u32| q & (1 << n) != 0;
        Self {
            read: bit(0),
            write: bit(1),
            fetch: bit(2),
            allowed_read: bit(3),
            allowed_write: bit(4),
            allowed_execute: bit(5),
            linear_valid: bit(7),
            final_translation: bit(8),
        }
    }

    /// The entry allowed nothing: it was not present (or a no-access page).
    pub fn not_present(&self) -> bool {
        !(self.allowed_read || self.allowed_write || self.allowed_execute)
    }
}

/// VM-entry interruption information for injecting an event.
pub mod inject {
    /// An external interrupt with the given vector.
    pub fn interrupt(vector: u8) -> u32 {
        (1 << 31) | u32::from(vector)
    }

    /// Hardware exception with the given vector, with or without an error code.
    pub fn exception(vector: u8, has_error_code: bool) -> u32 {
        (1 << 31) | (3 << 8) | (u32::from(has_error_code) << 11) | u32::from(vector)
    }

    /// Why an exception cannot be injected as asked.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[cfg_attr(feature = "defmt", derive(defmt::Format))]
    pub enum Refused {
        /// Not an architectural exception (NMI, reserved, an interrupt vector).
        NotAnException,
        /// The exception pushes an error code and none was given, or the
        /// other way round.
        ErrorCode,
        /// Error codes are not delivered in real mode.
        ErrorCodeInRealMode,
    }

    /// Checks that `vector` is an exception a VM entry can deliver as a
    /// hardware exception, with an error code exactly where the
    /// architecture pushes one (`protected`: the guest's CR0.PE).
    pub fn check(vector: u8, has_error_code: bool, protected: bool) -> Result<(), Refused> {
        let pushes = matches!(vector, 8 | 10..=14 | 17 | 21);
        match vector {
            0 | 1 | 3..=8 | 10..=14 | 16..=21 => {}
            _ => return Err(Refused::NotAnException),
        }
        if !protected && has_error_code {
            return Err(Refused::ErrorCodeInRealMode);
        }
        if protected && pushes != has_error_code {
            return Err(Refused::ErrorCode);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_architectural_exceptions_with_their_error_codes_are_injected() {
        use inject::{Refused, check};
        assert_eq!(check(13, true, true), Ok(()));
        assert_eq!(check(6, false, true), Ok(()));
        assert_eq!(check(6, false, false), Ok(()));
        assert_eq!(check(13, false, true), Err(Refused::ErrorCode));
        assert_eq!(check(6, true, true), Err(Refused::ErrorCode));
        assert_eq!(check(13, true, false), Err(Refused::ErrorCodeInRealMode));
        for v in [2, 9, 15, 22, 31, 32, 0x80, 255] {
            assert_eq!(check(v, false, true), Err(Refused::NotAnException), "{v}");
        }
        for v in 0..=255u8 {
            if check(v, false, true).is_ok() || check(v, true, true).is_ok() {
                assert!(v < 22 && v != 2 && v != 9 && v != 15, "{v}");
            }
        }
    }

    #[test]
    fn io_qualifications() {
        // `out dx, al` to 0x3f8
        let q = IoQualification::decode(0x03f8_0000);
        assert_eq!(
            q,
            IoQualification {
                size: 1,
                write: true,
                string: false,
                rep: false,
                port: 0x3f8
            }
        );
        // `in eax, dx` from 0xf4, and `rep outsb`
        assert_eq!(IoQualification::decode(0x00f4_000b).size, 4);
        assert!(!IoQualification::decode(0x00f4_000b).write);
        let q = IoQualification::decode(0x03f8_0030);
        assert!(q.string && q.rep && q.write);
    }

    #[test]
    fn ept_violation_qualifications() {
        // A write to a not-present page with a valid linear address.
        let v = EptViolation::decode(0x182);
        assert!(
            v.write
                && !v.read
                && !v.fetch
                && v.not_present()
                && v.linear_valid
                && v.final_translation
        );
        // A write to a read-only page.
        let v = EptViolation::decode(0x18a);
        assert!(v.write && v.allowed_read && !v.allowed_write && !v.not_present());
    }

    #[test]
    fn injection_info() {
        assert_eq!(inject::exception(6, false), 0x8000_0306);
        assert_eq!(inject::exception(13, true), 0x8000_0b0d);
    }

    #[test]
    fn reason_names() {
        assert_eq!(reason::name(reason::VMFUNC), "VMFUNC");
        assert_eq!(reason::name(999), "other");
    }
}
