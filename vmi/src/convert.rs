//! Pure conversions between Parallax's wire types and vmi-rs's: registers,
//! accesses, violation events and the answers to them. No I/O here, so
//! all of it is tested on the host.

use crate::Error;
use parallax_client::altp2m::{Access, Action, VmEvent};
use parallax_client::introspect::regs;
use parallax_client::ipc_schema::vmexit::AccessBits;
use vmi_arch_amd64::{
    Cr0, Cr3, Cr4, EventMemoryAccess, EventReason, GpRegisters, MemoryAccessFlags, MsrEfer,
    Registers, Rflags, SegmentAccess, Selector,
};
use vmi_core::{MemoryAccess, Pa, Va, View, VmiEventAction};

/// The registers a Parallax set may change: the first [`regs::CS`]
/// indices, each with its vmi-rs field's value.
pub const SETTABLE: usize = regs::CS;

/// The VMCS layout of segment access rights (bits 0-7 the descriptor's
/// access byte, 12 AVL, 13 L, 14 D/B, 15 G) in the layout vmi-rs's
/// `SegmentAccess` reads (the access byte, then AVL, L, D/B, G at bits
/// 8-11).
pub fn segment_access(vmcs: u16) -> SegmentAccess {
    let vmcs = u32::from(vmcs);
    SegmentAccess((vmcs & 0xff) | (vmcs >> 12 & 0xf) << 8)
}

/// Parallax's 32 register words (`ipc_schema::syscall::regs` order) as
/// vmi-rs's registers. What Parallax does not report (CR2, the debug
/// registers, segment limits, the selectors and rights of segments other
/// than CS, TR, LDTR, the descriptor tables' limits, the MSRs but EFER)
/// reads 0.
pub fn registers_from(v: &[u64; regs::COUNT]) -> Registers {
    let mut r = Registers {
        rax: v[regs::RAX],
        rbx: v[regs::RBX],
        rcx: v[regs::RCX],
        rdx: v[regs::RDX],
        rsi: v[regs::RSI],
        rdi: v[regs::RDI],
        rbp: v[regs::RBP],
        rsp: v[regs::RSP],
        r8: v[regs::R8],
        r9: v[regs::R8 + 1],
        r10: v[regs::R8 + 2],
        r11: v[regs::R8 + 3],
        r12: v[regs::R8 + 4],
        r13: v[regs::R8 + 5],
        r14: v[regs::R8 + 6],
        r15: v[regs::R8 + 7],
        rip: v[regs::RIP],
        rflags: Rflags(v[regs::RFLAGS]),
        cr0: Cr0(v[regs::CR0]),
        cr3: Cr3(v[regs::CR3]),
        cr4: Cr4(v[regs::CR4]),
        msr_efer: MsrEfer(v[regs::EFER]),
        ..Registers::default()
    };
    r.cs.base = v[regs::CS_BASE];
    r.cs.selector = Selector(v[regs::CS] as u16);
    r.cs.access = segment_access((v[regs::CS] >> 16) as u16);
    r.ds.base = v[regs::DS_BASE];
    r.es.base = v[regs::ES_BASE];
    r.fs.base = v[regs::FS_BASE];
    r.gs.base = v[regs::GS_BASE];
    r.ss.base = v[regs::SS_BASE];
    r.gdtr.base = v[regs::GDTR_BASE];
    r.idtr.base = v[regs::IDTR_BASE];
    r
}

/// The values of the registers a Parallax set may change, by index.
pub fn settable_values(r: &Registers) -> [u64; SETTABLE] {
    let mut v = [0u64; SETTABLE];
    let gp = [
        (regs::RAX, r.rax),
        (regs::RBX, r.rbx),
        (regs::RCX, r.rcx),
        (regs::RDX, r.rdx),
        (regs::RSI, r.rsi),
        (regs::RDI, r.rdi),
        (regs::RBP, r.rbp),
        (regs::RSP, r.rsp),
        (regs::R8, r.r8),
        (regs::R8 + 1, r.r9),
        (regs::R8 + 2, r.r10),
        (regs::R8 + 3, r.r11),
        (regs::R8 + 4, r.r12),
        (regs::R8 + 5, r.r13),
        (regs::R8 + 6, r.r14),
        (regs::R8 + 7, r.r15),
        (regs::RIP, r.rip),
        (regs::RFLAGS, r.rflags.0),
        (regs::CR0, r.cr0.0),
        (regs::CR3, r.cr3.0),
        (regs::CR4, r.cr4.0),
        (regs::EFER, r.msr_efer.0),
        (regs::CS_BASE, r.cs.base),
        (regs::DS_BASE, r.ds.base),
        (regs::ES_BASE, r.es.base),
        (regs::FS_BASE, r.fs.base),
        (regs::GS_BASE, r.gs.base),
        (regs::SS_BASE, r.ss.base),
        (regs::GDTR_BASE, r.gdtr.base),
        (regs::IDTR_BASE, r.idtr.base),
    ];
    for (i, value) in gp {
        v[i] = value;
    }
    v
}

/// The fields of `wanted` that differ from `current` and that Parallax
/// cannot set (read only, like CS's selector and rights, or not kept at
/// all, like CR2): their names.
pub fn unsettable_changes(current: &Registers, wanted: &Registers) -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! compare {
        ($($name:literal => $($field:ident).+),* $(,)?) => {
            $(if current.$($field).+ != wanted.$($field).+ {
                out.push($name);
            })*
        };
    }
    compare!(
        "cr2" => cr2,
        "dr0" => dr0, "dr1" => dr1, "dr2" => dr2, "dr3" => dr3, "dr6" => dr6, "dr7" => dr7,
        "cs.limit" => cs.limit, "cs.selector" => cs.selector, "cs.access" => cs.access,
        "ds.limit" => ds.limit, "ds.selector" => ds.selector, "ds.access" => ds.access,
        "es.limit" => es.limit, "es.selector" => es.selector, "es.access" => es.access,
        "fs.limit" => fs.limit, "fs.selector" => fs.selector, "fs.access" => fs.access,
        "gs.limit" => gs.limit, "gs.selector" => gs.selector, "gs.access" => gs.access,
        "ss.limit" => ss.limit, "ss.selector" => ss.selector, "ss.access" => ss.access,
        "tr" => tr, "ldtr" => ldtr,
        "gdtr.limit" => gdtr.limit, "idtr.limit" => idtr.limit,
        "sysenter_cs" => sysenter_cs, "sysenter_esp" => sysenter_esp,
        "sysenter_eip" => sysenter_eip, "shadow_gs" => shadow_gs,
        "msr_flags" => msr_flags, "msr_lstar" => msr_lstar, "msr_star" => msr_star,
        "msr_cstar" => msr_cstar, "msr_syscall_mask" => msr_syscall_mask,
        "msr_tsc_aux" => msr_tsc_aux,
    );
    out
}

/// What a register set asks of Parallax: the (index, value) pairs that
/// differ from `current`, or a refusal naming the fields Parallax cannot
/// set (nothing is set then).
pub fn register_changes(
    current: &Registers,
    wanted: &Registers,
) -> Result<Vec<(usize, u64)>, Error> {
    let fields = unsettable_changes(current, wanted);
    if !fields.is_empty() {
        return Err(Error::Unsettable {
            fields: fields.join(", "),
        });
    }
    let (now, want) = (settable_values(current), settable_values(wanted));
    Ok((0..SETTABLE)
        .filter(|&i| now[i] != want[i])
        .map(|i| (i, want[i]))
        .collect())
}

/// The general-purpose part of an event's answer as a register set.
pub fn gp_changes(current: &Registers, wanted: &GpRegisters) -> Vec<(usize, u64)> {
    let mut with = *current;
    vmi_core::Registers::set_gp_registers(&mut with, wanted);
    register_changes(current, &with).expect("general-purpose registers are all settable")
}

/// An EPT access as vmi-rs's.
pub fn memory_access(a: Access) -> MemoryAccess {
    bits(a.read, a.write, a.execute)
}

fn bits(read: bool, write: bool, execute: bool) -> MemoryAccess {
    let mut m = MemoryAccess::empty();
    m.set(MemoryAccess::R, read);
    m.set(MemoryAccess::W, write);
    m.set(MemoryAccess::X, execute);
    m
}

/// vmi-rs's access as an EPT access (write or execute without read is
/// refused by the altp2m service with `BadAccess`, as EPT cannot express
/// it).
pub fn access(m: MemoryAccess) -> Access {
    Access {
        read: m.contains(MemoryAccess::R),
        write: m.contains(MemoryAccess::W),
        execute: m.contains(MemoryAccess::X),
    }
}

fn access_bits(a: AccessBits) -> MemoryAccess {
    bits(a.read, a.write, a.execute)
}

/// A violation as vmi-rs's memory-access event reason: the GPA, the GLA
/// (0 where the CPU gave none), the access made, and from the exit
/// qualification whether the GLA is valid and whether the access was to
/// the address itself or to a guest page-table entry during the walk.
pub fn event_reason(e: &VmEvent) -> EventReason {
    let mut flags = MemoryAccessFlags::empty();
    if e.gla.is_some() {
        flags |= MemoryAccessFlags::GLA_VALID;
    }
    // Qualification bit 7: the GLA is valid; bit 8 (with it): the access
    // was to the translated address, else to a paging-structure entry.
    if e.qualification & 0x80 != 0 {
        if e.qualification & 0x100 != 0 {
            flags |= MemoryAccessFlags::FAULT_WITH_GLA;
        } else {
            flags |= MemoryAccessFlags::FAULT_IN_GPT;
        }
    }
    EventReason::MemoryAccess(EventMemoryAccess {
        pa: Pa(e.gpa),
        va: Va(e.gla.unwrap_or(0)),
        access: access_bits(e.access),
        flags,
    })
}

/// The altp2m answer for a vmi-rs response to a violation in
/// `event_view`:
///
/// | vmi-rs | Parallax |
/// |---|---|
/// | `Continue` | `Retry` (the access is made again, in the view it faulted in) |
/// | `Continue` with a view | `SwitchView(view)` (retried there) |
/// | `Emulate` | `AllowOnce` (the instruction runs once with the page opened, single-stepped rather than emulated; the restriction stays) |
/// | `FastSinglestep` in the default view (0) | `AllowOnce` |
/// | `Singlestep`, `Deny`, `ReinjectInterrupt`, `FastSinglestep` elsewhere | refused: no such answer |
pub fn action(
    event_view: u16,
    action: VmiEventAction,
    view: Option<View>,
) -> Result<Action, Error> {
    let unsupported = |why: &'static str| Error::Unsupported {
        what: format!("answering a memory-access event with {action:?}"),
        why,
    };
    match (action, view) {
        (VmiEventAction::Continue, None) => Ok(Action::Retry),
        (VmiEventAction::Continue, Some(View(v))) if v == event_view => Ok(Action::Retry),
        (VmiEventAction::Continue, Some(View(v))) => Ok(Action::SwitchView(v)),
        (VmiEventAction::Emulate, None) => Ok(Action::AllowOnce),
        (VmiEventAction::Emulate, Some(View(v))) if v == event_view => Ok(Action::AllowOnce),
        (VmiEventAction::Emulate, Some(_)) => Err(unsupported(
            "Parallax lets one access through in the view it faulted in (AllowOnce); it cannot switch views in the same answer",
        )),
        (VmiEventAction::FastSinglestep, Some(View(0))) => Ok(Action::AllowOnce),
        (VmiEventAction::FastSinglestep, _) => Err(unsupported(
            "Parallax's one-instruction answer (AllowOnce) opens the page in the event's view to what the host p2m (the default view, 0) gives it; a fast single-step in any other view cannot be expressed",
        )),
        (VmiEventAction::Singlestep, _) => Err(unsupported(
            "Parallax reports no single-step events to an external agent (memory-access violations only)",
        )),
        (VmiEventAction::Deny, _) => Err(unsupported(
            "there is no register or MSR write to deny: Parallax reports memory-access violations only",
        )),
        (VmiEventAction::ReinjectInterrupt, _) => Err(unsupported(
            "Parallax reports no interrupts to an external agent, and injects none",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmi_core::Registers as _;

    fn words() -> [u64; regs::COUNT] {
        let mut v = [0u64; regs::COUNT];
        for (i, w) in v.iter_mut().enumerate() {
            *w = 0x1000 + i as u64;
        }
        // CS 0x08, rights 0xa09b (present ring-0 code, L set, G set).
        v[regs::CS] = 0x08 | 0xa09b << 16;
        v[regs::INFO] = 1 | 77 << 16;
        v
    }

    #[test]
    fn every_parallax_register_lands_in_its_vmi_field_and_back() {
        let v = words();
        let r = registers_from(&v);
        assert_eq!(r.rax, v[regs::RAX]);
        assert_eq!(r.rsi, v[regs::RSI]);
        assert_eq!(r.rdi, v[regs::RDI]);
        assert_eq!(r.rbp, v[regs::RBP]);
        assert_eq!(r.rsp, v[regs::RSP]);
        assert_eq!(r.r15, v[regs::R8 + 7]);
        assert_eq!(r.rip, v[regs::RIP]);
        assert_eq!(r.cr3.0, v[regs::CR3]);
        assert_eq!(r.msr_efer.0, v[regs::EFER]);
        assert_eq!(r.gs.base, v[regs::GS_BASE]);
        assert_eq!(r.idtr.base, v[regs::IDTR_BASE]);
        assert_eq!(r.cs.selector.0, 0x08);
        // Not reported by Parallax: zero.
        assert_eq!(
            (r.cr2.0, r.ds.selector.0, r.gdtr.limit, r.msr_lstar),
            (0, 0, 0, 0)
        );
        // Each settable word goes back to its own index.
        assert_eq!(settable_values(&r)[..], v[..SETTABLE]);
        assert_eq!(r.instruction_pointer(), v[regs::RIP]);
    }

    #[test]
    fn vmcs_segment_rights_read_as_vmi_rs_reads_them() {
        let a = segment_access(0xa09b);
        assert!(a.long_mode(), "L (VMCS bit 13) is vmi-rs's bit 9");
        assert!(a.present());
        assert_eq!(a.typ(), 0xb);
        assert_eq!(a.descriptor_privilege_level(), 0);
        assert_eq!(a.granularity(), vmi_arch_amd64::Granularity::Page4K);
        let a = segment_access(0xc093); // 32-bit data: D/B and G, no L.
        assert!(!a.long_mode());
        assert_eq!(a.operation_size(), vmi_arch_amd64::OperationSize::Big);
        // The unusable bit (16) does not fit the u16 Parallax reports; and
        // VMCS bits 8-11 (reserved) never reach vmi-rs's flags.
        assert_eq!(segment_access(0x0f00).0, 0);
        // With 64-bit CS, vmi-rs's effective address width is 8 bytes.
        let mut v = words();
        v[regs::CR0] = 0x8000_0011;
        v[regs::CR4] = 0x20;
        v[regs::EFER] = 0x500;
        assert_eq!(registers_from(&v).effective_address_width(), 8);
    }

    #[test]
    fn a_set_sends_what_changed_and_refuses_what_parallax_cannot_set() {
        let now = registers_from(&words());
        assert_eq!(register_changes(&now, &now).unwrap(), vec![]);
        let mut want = now;
        want.r12 = 0x77;
        want.rip += 2;
        want.fs.base = 0x5000;
        assert_eq!(
            register_changes(&now, &want).unwrap(),
            vec![
                (regs::R8 + 4, 0x77),
                (regs::RIP, now.rip + 2),
                (regs::FS_BASE, 0x5000)
            ]
        );
        want.cr2.0 = 0x1234;
        want.cs.selector = Selector(0x10);
        want.msr_lstar = 1;
        match register_changes(&now, &want) {
            Err(e @ Error::Unsettable { .. }) => {
                let text = e.to_string();
                assert!(text.contains("cr2, cs.selector, msr_lstar"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let mut gp = now.gp_registers();
        gp.rax = 9;
        assert_eq!(gp_changes(&now, &gp), vec![(regs::RAX, 9)]);
    }

    #[test]
    fn accesses_convert_both_ways() {
        for m in 0..8u8 {
            let m = MemoryAccess::from_bits(m).unwrap();
            assert_eq!(memory_access(access(m)), m);
        }
        assert_eq!(access(MemoryAccess::RX), Access::RX);
        assert_eq!(memory_access(Access::RW), MemoryAccess::RW);
        assert_eq!(memory_access(Access::NONE), MemoryAccess::empty());
    }

    #[test]
    fn a_violation_reads_as_a_memory_access_event() {
        let mut e = VmEvent {
            id: 3,
            domain: 1,
            vcpu: 0,
            view: 2,
            gpa: 0x10f008,
            gla: Some(0x7000_f008),
            access: AccessBits {
                read: false,
                write: true,
                execute: false,
            },
            allowed: AccessBits {
                read: true,
                write: false,
                execute: true,
            },
            rip: 0x1000,
            internal: false,
            paused: true,
            qualification: 0x182 | 0x28,
        };
        let EventReason::MemoryAccess(m) = event_reason(&e) else {
            panic!("not a memory access")
        };
        assert_eq!(
            (m.pa, m.va, m.access),
            (Pa(0x10f008), Va(0x7000_f008), MemoryAccess::W)
        );
        assert_eq!(
            m.flags,
            MemoryAccessFlags::GLA_VALID | MemoryAccessFlags::FAULT_WITH_GLA
        );
        // A page-walk access: bit 7 without bit 8.
        e.qualification = 0x81;
        let EventReason::MemoryAccess(m) = event_reason(&e) else {
            panic!()
        };
        assert!(m.flags.contains(MemoryAccessFlags::FAULT_IN_GPT));
        assert!(!m.flags.contains(MemoryAccessFlags::FAULT_WITH_GLA));
        e.gla = None;
        e.qualification = 0x2;
        let EventReason::MemoryAccess(m) = event_reason(&e) else {
            panic!()
        };
        assert_eq!((m.va, m.flags), (Va(0), MemoryAccessFlags::empty()));
    }

    #[test]
    fn responses_map_to_altp2m_answers_or_are_refused_by_name() {
        use VmiEventAction as A;
        assert_eq!(action(2, A::Continue, None).unwrap(), Action::Retry);
        assert_eq!(
            action(2, A::Continue, Some(View(2))).unwrap(),
            Action::Retry
        );
        assert_eq!(
            action(2, A::Continue, Some(View(0))).unwrap(),
            Action::SwitchView(0)
        );
        assert_eq!(action(2, A::Emulate, None).unwrap(), Action::AllowOnce);
        assert_eq!(
            action(2, A::FastSinglestep, Some(View(0))).unwrap(),
            Action::AllowOnce
        );
        for (a, view, says) in [
            (A::Singlestep, None, "no single-step events"),
            (A::Deny, None, "no register or MSR write"),
            (A::ReinjectInterrupt, None, "no interrupts"),
            (A::FastSinglestep, Some(View(3)), "any other view"),
            (A::Emulate, Some(View(0)), "cannot switch views"),
        ] {
            let e = action(2, a, view).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(&format!("{a:?}")), "{e}");
        }
    }
}
