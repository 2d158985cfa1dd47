//! VMX capabilities: the capability MSRs (Intel SDM vol. 3, appendix A) read
//! once and decoded into what the hypervisor can use.
//!
//! Reading is split from decoding so that decoding, which carries all the
//! knowledge, is a pure function tested on the host with values read from
//! Bochs's CPU models.

use crate::cpu::rdmsr;

pub mod fields;

pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
pub const IA32_VMX_BASIC: u32 = 0x480;
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
pub const IA32_VMX_MISC: u32 = 0x485;
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
pub const IA32_VMX_VMFUNC: u32 = 0x491;

/// Pin-based VM-execution controls.
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based VM-execution controls.
pub mod proc1 {
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const USE_TPR_SHADOW: u32 = 1 << 21;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls.
pub mod proc2 {
    pub const VIRTUALIZE_APIC_ACCESSES: u32 = 1 << 0;
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const APIC_REGISTER_VIRTUALIZATION: u32 = 1 << 8;
    pub const VIRTUAL_INTERRUPT_DELIVERY: u32 = 1 << 9;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_VM_FUNCTIONS: u32 = 1 << 13;
    pub const ENABLE_PML: u32 = 1 << 17;
    pub const EPT_VIOLATION_VE: u32 = 1 << 18;
    pub const ENABLE_XSAVES: u32 = 1 << 20;
    pub const MODE_BASED_EXECUTE: u32 = 1 << 22;
    pub const SUB_PAGE_WRITE: u32 = 1 << 23;
}

/// VM-exit controls.
pub mod exit {
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const ACK_INTERRUPT_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_IA32_PAT: u32 = 1 << 18;
    pub const LOAD_IA32_PAT: u32 = 1 << 19;
    pub const SAVE_IA32_EFER: u32 = 1 << 20;
    pub const LOAD_IA32_EFER: u32 = 1 << 21;
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
}

/// VM-entry controls.
pub mod entry {
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_IA32_PAT: u32 = 1 << 14;
    pub const LOAD_IA32_EFER: u32 = 1 << 15;
}

/// The raw capability MSRs. Optional ones are `None` where the processor
/// does not implement them (reading them would fault).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RawVmxMsrs {
    pub feature_control: u64,
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub procbased2: Option<u64>,
    pub ept_vpid: Option<u64>,
    /// The four "true" control MSRs (pin, proc, exit, entry), where
    /// IA32_VMX_BASIC[55] says they exist.
    pub true_ctls: Option<[u64; 4]>,
    pub vmfunc: Option<u64>,
}

impl RawVmxMsrs {
    /// Reads the capability MSRs of this processor.
    ///
    /// # Safety
    /// The processor must support VMX (CPUID.1:ECX[5]); otherwise the reads
    /// raise #GP.
    pub unsafe fn read() -> Self {
        // Safety: for all reads below: VMX is supported (caller), so the
        // basic MSRs exist; each optional MSR is read only where an earlier MSR
        // says it exists (SDM vol. 3, A.1, A.3.3, A.10, A.11).
        unsafe {
            let basic = rdmsr(IA32_VMX_BASIC);
            let procbased = rdmsr(IA32_VMX_PROCBASED_CTLS);
            let procbased2 = if allowed1(procbased) & proc1::SECONDARY_CONTROLS != 0 {
                Some(rdmsr(IA32_VMX_PROCBASED_CTLS2))
            } else {
                None
            };
            let p2 = procbased2.map(allowed1).unwrap_or(0);
            let ept_vpid = if p2 & (proc2::ENABLE_EPT | proc2::ENABLE_VPID) != 0 {
                Some(rdmsr(IA32_VMX_EPT_VPID_CAP))
            } else {
                None
            };
            let vmfunc = if p2 & proc2::ENABLE_VM_FUNCTIONS != 0 {
                Some(rdmsr(IA32_VMX_VMFUNC))
            } else {
                None
            };
            let true_ctls = if basic & (1 << 55) != 0 {
                Some([
                    rdmsr(IA32_VMX_TRUE_PINBASED_CTLS),
                    rdmsr(IA32_VMX_TRUE_PROCBASED_CTLS),
                    rdmsr(IA32_VMX_TRUE_EXIT_CTLS),
                    rdmsr(IA32_VMX_TRUE_ENTRY_CTLS),
                ])
            } else {
                None
            };
            Self {
                feature_control: rdmsr(IA32_FEATURE_CONTROL),
                basic,
                pinbased: rdmsr(IA32_VMX_PINBASED_CTLS),
                procbased,
                exit: rdmsr(IA32_VMX_EXIT_CTLS),
                entry: rdmsr(IA32_VMX_ENTRY_CTLS),
                misc: rdmsr(IA32_VMX_MISC),
                cr0_fixed0: rdmsr(IA32_VMX_CR0_FIXED0),
                cr0_fixed1: rdmsr(IA32_VMX_CR0_FIXED1),
                cr4_fixed0: rdmsr(IA32_VMX_CR4_FIXED0),
                cr4_fixed1: rdmsr(IA32_VMX_CR4_FIXED1),
                procbased2,
                ept_vpid,
                true_ctls,
                vmfunc,
            }
        }
    }
}

/// The bits a control may be set to 1 (high half of a control MSR).
fn allowed1(msr: u64) -> u32 {
    (msr >> 32) as u32
}

/// One VM-execution, exit or entry control field: which bits must be 1 and
/// which may be 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Controls {
    pub must_be_1: u32,
    pub may_be_1: u32,
}

impl Controls {
    fn from_msr(msr: u64) -> Self {
        Self {
            must_be_1: msr as u32,
            may_be_1: allowed1(msr),
        }
    }

    /// Whether every bit of `bits` may be set.
    pub fn allows(&self, bits: u32) -> bool {
        self.may_be_1 & bits == bits
    }

    /// The field value that sets `wanted` plus the bits that must be set.
    /// Fails with the wanted bits the processor cannot set.
    pub fn value_for(&self, wanted: u32) -> Result<u32, u32> {
        let unsupported = wanted & !self.may_be_1;
        if unsupported != 0 {
            Err(unsupported)
        } else {
            Ok(wanted | self.must_be_1)
        }
    }
}

/// Why VMX cannot be used on this processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum VmxUnavailable {
    /// CPUID.1:ECX[5] is clear: the processor (or the emulator) has no VMX.
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled: the
    /// firmware turned VMX off.
    DisabledByFirmware,
    /// The processor lacks something Parallax requires (named).
    Missing(&'static str),
}

/// The decoded VMX capabilities of the processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VmxCaps {
    /// VMCS revision identifier (written into the VMXON region and each VMCS).
    pub revision: u32,
    /// Bytes the processor needs for a VMXON region or a VMCS.
    pub vmcs_size: u32,
    /// IA32_FEATURE_CONTROL is locked; Parallax must not (cannot) write it.
    pub feature_control_locked: bool,
    pub pin: Controls,
    pub proc1: Controls,
    pub proc2: Controls,
    pub exit: Controls,
    pub entry: Controls,
    /// The preemption timer counts down once every 2^rate TSC ticks.
    pub preemption_timer_rate: u8,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub features: VmxFeatures,
}

/// The VMX features Parallax uses or reports, one flag each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VmxFeatures {
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
    /// VMFUNC leaf 0: switching the EPT pointer from the guest without an exit.
    pub vmfunc_eptp_switching: bool,
    /// EPT violations can be delivered to the guest as #VE (vector 20).
    pub ept_violation_ve: bool,
    /// Page-modification logging.
    pub pml: bool,
    /// Accessed and dirty flags in EPT entries (PML needs them).
    pub ept_ad: bool,
    pub ept_2m_pages: bool,
    pub ept_1g_pages: bool,
    pub ept_execute_only: bool,
    /// Four-level EPT walks (the only length Parallax uses).
    pub ept_walk_4: bool,
    /// Write-back memory type for EPT paging structures.
    pub ept_wb: bool,
    pub invept_single: bool,
    pub invept_all: bool,
    pub invvpid: bool,
    pub invvpid_single: bool,
    pub invvpid_all: bool,
    pub mode_based_execute: bool,
    pub sub_page_write: bool,
    pub preemption_timer: bool,
    /// Exit information for EPT violations includes whether the access was
    /// to a paging structure (SDM: advanced VM-exit information).
    pub ept_advanced_exit_info: bool,
}

impl VmxCaps {
    /// Decodes the raw MSRs. Fails where VMX is unusable or lacks something
    /// every Parallax guest needs (EPT, unrestricted guest, 4-level WB EPT).
    pub fn decode(raw: &RawVmxMsrs) -> Result<Self, VmxUnavailable> {
        let locked = raw.feature_control & 1 != 0;
        let vmx_outside_smx = raw.feature_control & (1 << 2) != 0;
        if locked && !vmx_outside_smx {
            return Err(VmxUnavailable::DisabledByFirmware);
        }
        let (pin, proc, exit, entry) = match raw.true_ctls {
            Some([p, c, x, e]) => (p, c, x, e),
            None => (raw.pinbased, raw.procbased, raw.exit, raw.entry),
        };
        let proc1 = Controls::from_msr(proc);
        let proc2 = match raw.procbased2 {
            Some(v) if proc1.allows(proc1::SECONDARY_CONTROLS) => Controls::from_msr(v),
            _ => Controls::default(),
        };
        let pin = Controls::from_msr(pin);
        let ev = if proc2.allows(proc2::ENABLE_EPT) || proc2.allows(proc2::ENABLE_VPID) {
            raw.ept_vpid.unwrap_or(0)
        } else {
            0
        };
        let bit = |n: u32| ev & (1u64 << n) != 0;
        let vmfunc = if proc2.allows(proc2::ENABLE_VM_FUNCTIONS) {
            raw.vmfunc.unwrap_or(0)
        } else {
            0
        };
        let ept = proc2.allows(proc2::ENABLE_EPT);
        let features = VmxFeatures {
            ept,
            vpid: proc2.allows(proc2::ENABLE_VPID) && bit(32),
            unrestricted_guest: ept && proc2.allows(proc2::UNRESTRICTED_GUEST),
            vmfunc_eptp_switching: ept && vmfunc & 1 != 0,
            ept_violation_ve: ept && proc2.allows(proc2::EPT_VIOLATION_VE),
            ept_ad: ept && bit(21),
            pml: ept && bit(21) && proc2.allows(proc2::ENABLE_PML),
            ept_2m_pages: ept && bit(16),
            ept_1g_pages: ept && bit(17),
            ept_execute_only: ept && bit(0),
            ept_walk_4: ept && bit(6),
            ept_wb: ept && bit(14),
            invept_single: ept && bit(20) && bit(25),
            invept_all: ept && bit(20) && bit(26),
            invvpid: bit(32),
            invvpid_single: bit(32) && bit(41),
            invvpid_all: bit(32) && bit(42),
            mode_based_execute: proc2.allows(proc2::MODE_BASED_EXECUTE),
            sub_page_write: proc2.allows(proc2::SUB_PAGE_WRITE),
            preemption_timer: pin.allows(pin::PREEMPTION_TIMER),
            ept_advanced_exit_info: ept && bit(22),
        };
        let caps = Self {
            revision: (raw.basic & 0x7fff_ffff) as u32,
            vmcs_size: ((raw.basic >> 32) & 0x1fff) as u32,
            feature_control_locked: locked,
            pin,
            proc1,
            proc2,
            exit: Controls::from_msr(exit),
            entry: Controls::from_msr(entry),
            preemption_timer_rate: (raw.misc & 0x1f) as u8,
            cr0_fixed0: raw.cr0_fixed0,
            cr0_fixed1: raw.cr0_fixed1,
            cr4_fixed0: raw.cr4_fixed0,
            cr4_fixed1: raw.cr4_fixed1,
            features,
        };
        caps.check_required()?;
        Ok(caps)
    }

    /// What every Parallax guest needs: EPT with 4-level write-back tables and
    /// unrestricted guest (guests start in 32-bit protected mode without
    /// paging, as a multiboot loader leaves them).
    fn check_required(&self) -> Result<(), VmxUnavailable> {
        let f = &self.features;
        let required = [
            (f.ept, "EPT"),
            (f.ept_walk_4, "4-level EPT"),
            (f.ept_wb, "write-back EPT tables"),
            (f.unrestricted_guest, "unrestricted guest"),
            (f.invept_all || f.invept_single, "INVEPT"),
        ];
        match required.iter().find(|(present, _)| !present) {
            Some((_, name)) => Err(VmxUnavailable::Missing(name)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
