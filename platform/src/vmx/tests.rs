//! VMX capability MSRs as Bochs 2.7 reports them for four CPU models,
//! captured with `cargo hv run --on bochs --log debug --bochs-cpu MODEL`.

use super::*;

const BASIC: u64 = 60816187155546155; // 0x00d8_1000_0000_002b
const TRUE_CTLS: [u64; 4] = [
    545460846614,
    17868594463023063410,
    36028792724221435,
    281470681747963,
];

fn common(
    misc: u64,
    cr4_fixed1: u64,
    procbased2: Option<u64>,
    ept_vpid: Option<u64>,
    vmfunc: Option<u64>,
) -> RawVmxMsrs {
    RawVmxMsrs {
        feature_control: 5,
        basic: BASIC,
        pinbased: 545460846614,
        procbased: 17868594463023161714,
        exit: 36028792724221439,
        entry: 281470681747967,
        misc,
        cr0_fixed0: 2147483681,
        cr0_fixed1: 4294967295,
        cr4_fixed0: 8192,
        cr4_fixed1,
        procbased2,
        ept_vpid,
        true_ctls: Some(TRUE_CTLS),
        vmfunc,
    }
}

fn skylake_x() -> RawVmxMsrs {
    common(
        1610875360,
        3614719,
        Some(150729845733588992),
        Some(16497073406273),
        Some(1),
    )
}

fn broadwell_ult() -> RawVmxMsrs {
    common(
        537133536,
        3614719,
        Some(1548108076941312),
        Some(16497073406273),
        Some(1),
    )
}

fn ivy_bridge() -> RawVmxMsrs {
    common(
        262624,
        1517567,
        Some(9891309682688),
        Some(16497071178049),
        None,
    )
}

fn penryn() -> RawVmxMsrs {
    RawVmxMsrs {
        pinbased: 270582939670,
        exit: 1125895612100095,
        entry: 70364449214975,
        true_ctls: Some([
            270582939670,
            17868594463023063410,
            1125895612100091,
            70364449214971,
        ]),
        ..common(262624, 288767, Some(279172874240), None, None)
    }
}

#[test]
fn skylake_x_has_everything_parallax_uses() {
    let caps = VmxCaps::decode(&skylake_x()).unwrap();
    assert_eq!((caps.revision, caps.vmcs_size), (0x2b, 4096));
    let f = caps.features;
    assert!(f.ept && f.vpid && f.unrestricted_guest);
    assert!(f.vmfunc_eptp_switching && f.ept_violation_ve && f.pml && f.ept_ad);
    assert!(f.ept_2m_pages && f.ept_1g_pages && f.ept_execute_only && f.ept_walk_4 && f.ept_wb);
    assert!(f.invept_single && f.invept_all && f.invvpid_single && f.invvpid_all);
    assert!(f.preemption_timer);
    assert!(
        !f.mode_based_execute && !f.sub_page_write,
        "Bochs models offer neither"
    );
    assert!(caps.feature_control_locked);
}

#[test]
fn broadwell_ult_lacks_only_pml() {
    let f = VmxCaps::decode(&broadwell_ult()).unwrap().features;
    assert!(!f.pml);
    assert!(f.vmfunc_eptp_switching && f.ept_violation_ve && f.ept_ad);
}

#[test]
fn ivy_bridge_has_ept_but_no_vmfunc_ve_pml_or_ad() {
    let f = VmxCaps::decode(&ivy_bridge()).unwrap().features;
    assert!(f.ept && f.vpid && f.unrestricted_guest);
    assert!(
        !f.vmfunc_eptp_switching && !f.ept_violation_ve && !f.pml && !f.ept_ad && !f.ept_1g_pages
    );
}

#[test]
fn penryn_without_ept_is_unusable_and_says_why() {
    assert_eq!(
        VmxCaps::decode(&penryn()),
        Err(VmxUnavailable::Missing("EPT"))
    );
}

#[test]
fn firmware_disabled_vmx_is_reported() {
    let raw = RawVmxMsrs {
        feature_control: 1,
        ..skylake_x()
    };
    assert_eq!(
        VmxCaps::decode(&raw),
        Err(VmxUnavailable::DisabledByFirmware)
    );
}

#[test]
fn control_values_include_required_bits_and_refuse_unsupported_ones() {
    let caps = VmxCaps::decode(&skylake_x()).unwrap();
    let v = caps
        .proc2
        .value_for(proc2::ENABLE_EPT | proc2::ENABLE_VPID)
        .unwrap();
    assert_eq!(
        v & (proc2::ENABLE_EPT | proc2::ENABLE_VPID),
        proc2::ENABLE_EPT | proc2::ENABLE_VPID
    );
    assert_eq!(
        caps.proc2.value_for(proc2::MODE_BASED_EXECUTE),
        Err(proc2::MODE_BASED_EXECUTE)
    );
    // Pin-based: bits 1, 2 and 4 are fixed to 1 (SDM A.3.1).
    assert_eq!(caps.pin.value_for(0).unwrap() & 0x16, 0x16);
}

#[test]
fn skylake_x_and_broadwell_virtualize_apic_accesses_and_registers() {
    // Bochs 2.7's secondary controls: virtualize APIC accesses, APIC-register
    // virtualization and virtual-interrupt delivery, not "virtualize x2APIC
    // mode" together with the first (the CPU refuses that pair anyway).
    let want = proc2::VIRTUALIZE_APIC_ACCESSES | proc2::APIC_REGISTER_VIRTUALIZATION;
    for raw in [skylake_x(), broadwell_ult()] {
        let caps = VmxCaps::decode(&raw).unwrap();
        assert!(caps.proc2.allows(want | proc2::VIRTUAL_INTERRUPT_DELIVERY));
        assert!(caps.proc1.allows(proc1::USE_TPR_SHADOW));
    }
    let caps = VmxCaps::decode(&ivy_bridge()).unwrap();
    assert!(caps.proc2.allows(proc2::VIRTUALIZE_APIC_ACCESSES));
    assert!(!caps.proc2.allows(proc2::APIC_REGISTER_VIRTUALIZATION));
}
