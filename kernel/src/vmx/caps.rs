//! VMX: what the processor offers, decoded and logged once at boot.

use platform::cpu::CpuInfo;
use platform::vmx::{RawVmxMsrs, VmxCaps, VmxUnavailable};

/// Reads and decodes the VMX capabilities, logging them.
pub fn probe(cpu: &CpuInfo) -> Result<VmxCaps, VmxUnavailable> {
    if !cpu.vmx {
        return Err(VmxUnavailable::NoVmx);
    }
    // Safety: CPUID says the processor has VMX.
    let raw = unsafe { RawVmxMsrs::read() };
    defmt::debug!("VMX capability MSRs: {}", raw);
    let caps = VmxCaps::decode(&raw)?;
    let f = &caps.features;
    defmt::info!(
        "VMX: revision {=u32:#x}, VMCS {=u32} bytes, EPT {=bool}, VPID {=bool}, unrestricted guest {=bool}, VMFUNC EPTP switching {=bool}, EPT-violation #VE {=bool}, PML {=bool}, EPT A/D {=bool}, 2 MiB pages {=bool}, 1 GiB pages {=bool}",
        caps.revision,
        caps.vmcs_size,
        f.ept,
        f.vpid,
        f.unrestricted_guest,
        f.vmfunc_eptp_switching,
        f.ept_violation_ve,
        f.pml,
        f.ept_ad,
        f.ept_2m_pages,
        f.ept_1g_pages
    );
    defmt::info!(
        "VMX: execute-only EPT {=bool}, INVEPT single/all {=bool}/{=bool}, INVVPID single/all {=bool}/{=bool}, preemption timer {=bool} (TSC/2^{=u8}), mode-based execute {=bool}, sub-page write {=bool}",
        f.ept_execute_only,
        f.invept_single,
        f.invept_all,
        f.invvpid_single,
        f.invvpid_all,
        f.preemption_timer,
        caps.preemption_timer_rate,
        f.mode_based_execute,
        f.sub_page_write
    );
    defmt::info!(
        "VMX: monitor trap flag {=bool}",
        caps.proc1.may_be_1 & platform::vmx::proc1::MONITOR_TRAP_FLAG != 0
    );
    Ok(caps)
}
