//! Host tests of the exit policy against a fake system.

extern crate std;

use crate::exits::{COM1, EXIT_PORT, Env, Vmm};
use ipc_schema::altp2m::{AltReply, AltRequest};
use ipc_schema::hypercall::{
    HC_CALL, HC_IPC_PING, HC_SERVICE_INFO, HC_SERVICE_NULL, HcError, MAX_REQUEST, Reply, Request,
    Status,
};
use ipc_schema::syscall::vm_features;
use ipc_schema::uart::UartReply;
use ipc_schema::vmexit::{Exit, ExitKind, ExitMessage, ExitRegs, Inject, Then};
use platform::cpu::CpuidResult;
use std::vec::Vec;

service_runtime::host_logger!();

#[derive(Default)]
struct Fake {
    lines: Vec<(u16, Vec<u8>)>,
    memory: Vec<u8>,
    asked: Vec<AltRequest>,
    /// What the logdirty service was asked.
    dirty_asked: Vec<ipc_schema::logdirty::LdRequest>,
    altp2m_down: bool,
    tsc: u64,
    /// What the altp2m service says of a page in a view, where the
    /// default (the gfn itself, rwx) does not hold: (view, gfn) -> (frame,
    /// access).
    pages: std::collections::BTreeMap<(u16, u64), (Option<u64>, ipc_schema::hypercall::Access)>,
    /// Each domain's virtual-APIC page: (domain, offset) -> register.
    apic_page: std::collections::BTreeMap<(u16, u16), u32>,
    /// The kernel refuses `ApicSet` (no APIC virtualization).
    no_apic_page: bool,
    /// CPUID answers every leaf with all bits set (a host with everything).
    every_feature: bool,
    /// The vCPU's registers (VCPU_REGS).
    vcpu: [u64; ipc_schema::syscall::regs::COUNT],
    /// Assigned PCI functions: (domain, index) -> configuration dwords;
    /// the writes the vmm asked for.
    functions: std::collections::BTreeMap<(u16, u8), [u32; 64]>,
    config_writes: Vec<(u16, u8, crate::pci::Op)>,
}

impl Env for Fake {
    fn vcpu_regs(&mut self, _: u16) -> Option<[u64; ipc_schema::syscall::regs::COUNT]> {
        Some(self.vcpu)
    }
    fn set_regs(
        &mut self,
        _: u16,
        values: &[u64; ipc_schema::syscall::regs::COUNT],
        mask: u64,
    ) -> bool {
        for (i, v) in values.iter().enumerate() {
            if mask & 1 << i != 0 {
                self.vcpu[i] = *v;
            }
        }
        true
    }
    fn device_config(&mut self, domain: u16, index: u8, op: crate::pci::Op) -> Option<u32> {
        use crate::pci::Op;
        let f = self.functions.get(&(domain, index))?;
        match op {
            Op::Read { offset, size } => {
                let v = f[usize::from(offset) / 4] >> (8 * (offset & 3));
                Some(if size == 4 {
                    v
                } else {
                    v & ((1 << (8 * size)) - 1)
                })
            }
            Op::Probe { offset } => Some(if offset == 0x10 { 0xfff0_0000 } else { 0 }),
            Op::Write { .. } => {
                self.config_writes.push((domain, index, op));
                Some(0)
            }
        }
    }
    fn apic_set(&mut self, domain: u16, offset: u16, value: u32) -> bool {
        if self.no_apic_page {
            return false;
        }
        self.apic_page.insert((domain, offset), value);
        true
    }
    fn ram_bytes(&mut self, _: u16) -> u64 {
        32 << 20
    }
    fn features(&self) -> u64 {
        vm_features::VMX | vm_features::VMFUNC | vm_features::PML
    }
    fn cpuid(&self, _: u32, _: u32) -> CpuidResult {
        if self.every_feature {
            return CpuidResult {
                eax: !0,
                ebx: !0,
                ecx: !0,
                edx: !0,
            };
        }
        CpuidResult {
            eax: 1,
            ebx: 2,
            ecx: 1 << 5 | 1 << 3,
            edx: 4,
        }
    }
    fn tsc(&self) -> u64 {
        self.tsc
    }
    fn tsc_khz(&self) -> u32 {
        100_000
    }
    fn console(&mut self, domain: u16, line: &[u8]) {
        self.lines.push((domain, line.to_vec()));
    }
    fn read_guest(&mut self, _: u16, gpa: u64, out: &mut [u8]) -> bool {
        let at = gpa as usize;
        match self.memory.get(at..at + out.len()) {
            Some(b) => {
                out.copy_from_slice(b);
                true
            }
            None => false,
        }
    }
    fn write_guest(&mut self, _: u16, gpa: u64, bytes: &[u8]) -> bool {
        let at = gpa as usize;
        match self.memory.get_mut(at..at + bytes.len()) {
            Some(b) => {
                b.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
    fn altp2m(&mut self, request: &AltRequest) -> Option<AltReply> {
        self.tsc += 500;
        if self.altp2m_down {
            return None;
        }
        if let AltRequest::GuestPage { view, gfn, .. } = *request {
            if gfn * 4096 >= self.memory.len() as u64 {
                return Some(AltReply::Reply(Reply::Error(HcError::BadGfn { gfn })));
            }
            let (frame_gfn, access) = self
                .pages
                .get(&(view, gfn))
                .copied()
                .unwrap_or((Some(gfn), ipc_schema::hypercall::Access::RWX));
            return Some(AltReply::Page { frame_gfn, access });
        }
        self.asked.push(request.clone());
        Some(match request {
            AltRequest::Ping => AltReply::Pong,
            AltRequest::Guest {
                request:
                    Request::ViewCreate {
                        default_access: None,
                    },
                ..
            } => AltReply::Reply(Reply::View(1)),
            AltRequest::Guest {
                request: Request::ViewSwitch { view: 1 },
                ..
            } => AltReply::Reply(Reply::Done),
            AltRequest::Guest { .. } => {
                AltReply::Reply(Reply::Error(HcError::NoSuchView { view: 9 }))
            }
            // The vmm forwards in-guest requests only.
            _ => AltReply::Refused(ipc_schema::altp2m::AltError::WrongEndpoint),
        })
    }
    fn grant(
        &mut self,
        _: u16,
        gfn: u64,
        count: u64,
        grant: bool,
    ) -> Result<(), ipc_schema::syscall::SysError> {
        use ipc_schema::syscall::SysError;
        // The kernel's answers, by the range asked.
        match (gfn, count, grant) {
            (_, 0, _) => Err(SysError::BadArgument),
            (0x10, 1, _) => Ok(()),
            (0x11, 1, true) => Err(SysError::NoResources),
            (0x11, 1, false) => Err(SysError::Busy),
            (0x12, 1, false) => Err(SysError::BadArgument),
            _ => Err(SysError::BadAddress),
        }
    }
    fn logdirty(
        &mut self,
        request: &ipc_schema::logdirty::LdRequest,
    ) -> Option<ipc_schema::logdirty::LdReply> {
        use ipc_schema::logdirty::{GfnRange, LdError, LdReply, LdRequest, Mechanism};
        self.dirty_asked.push(request.clone());
        Some(match *request {
            LdRequest::Start { .. } => LdReply::Started {
                mechanism: Mechanism::Pml,
                range: GfnRange { gfn: 0, count: 16 },
            },
            LdRequest::Read { .. } => LdReply::Dirty {
                ranges: ipc_schema::ipc::BoundedVec(
                    heapless::Vec::from_slice(&[GfnRange { gfn: 2, count: 3 }]).unwrap(),
                ),
                next: None,
            },
            LdRequest::Stop { .. } | LdRequest::Status { .. } => {
                LdReply::Error(LdError::NotLogging)
            }
        })
    }
}

fn exit(kind: ExitKind, regs: ExitRegs) -> ExitMessage {
    ExitMessage {
        exit: Exit {
            domain: 3,
            vcpu: 0,
            kind,
            rip: 0x1000,
            instruction_len: 1,
            view: 0,
        },
        regs,
    }
}

/// A one-byte write of `value` to `port`.
fn write_byte(port: u16, value: u8) -> ExitKind {
    ExitKind::Io {
        port,
        size: 1,
        write: true,
        value: value.into(),
    }
}

fn out(vmm: &mut Vmm, env: &mut Fake, port: u16, value: u8) {
    let r = vmm.exit(env, &exit(write_byte(port, value), ExitRegs::default()));
    assert_eq!(r.response.then, Then::Resume);
}

/// `HC_SERVICE_INFO`'s answer in RBX: (version << 32) | service calls.
fn info(vmm: &mut Vmm, env: &mut Fake) -> u64 {
    let regs = ExitRegs {
        rax: HC_SERVICE_INFO,
        ..ExitRegs::default()
    };
    vmm.exit(env, &exit(ExitKind::Hypercall, regs))
        .regs
        .unwrap()
        .rbx
}

#[test]
fn console_lines_reach_the_log_per_domain_and_survive_a_swap() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    assert_eq!(info(&mut vmm, &mut env), (1 << 32) | 1);
    assert_eq!(info(&mut vmm, &mut env), (1 << 32) | 2);
    for b in b"hello\r\nwor" {
        out(&mut vmm, &mut env, COM1, *b);
    }
    assert_eq!(env.lines, [(3, b"hello\n".to_vec())]);
    // A successor gets the unfinished line, the UART registers and the count
    // of service calls.
    let mut next = Vmm::restore(vmm.snapshot());
    assert_eq!(next.pending_line(3), b"wor");
    out(&mut next, &mut env, COM1, b'\n');
    assert_eq!(env.lines[1], (3, b"wor\n".to_vec()));
    assert_eq!(info(&mut next, &mut env), (1 << 32) | 3);
}

#[test]
fn a_new_domain_of_an_old_id_starts_with_fresh_devices() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    info(&mut vmm, &mut env);
    for b in b"secret" {
        out(&mut vmm, &mut env, COM1, *b);
    }
    assert_eq!(vmm.domains().collect::<Vec<_>>(), [3]);
    // Domain 3 ended (crashed in mid-line) and a new domain 3 starts: the
    // kernel's `Start` exit. The old line is sent on, ended.
    let r = vmm.exit(&mut env, &exit(ExitKind::Start, ExitRegs::default()));
    assert_eq!(r.response, ipc_schema::vmexit::Response::RETRY);
    assert_eq!(env.lines, [(3, b"secret".to_vec()), (3, b"\n".to_vec())]);
    // The new domain 3 starts from nothing (its devices are made at the
    // start, to show its virtual-APIC page): nothing of the old one's line
    // reaches its output, and its count starts again.
    assert_eq!(vmm.pending_line(3), b"");
    assert_eq!(info(&mut vmm, &mut env), (1 << 32) | 1);
    out(&mut vmm, &mut env, COM1, b'\n');
    assert_eq!(env.lines[2], (3, b"\n".to_vec()));
}

#[test]
fn a_long_line_is_logged_in_pieces_and_nothing_is_lost() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let text: Vec<u8> = (0..300).map(|i| b'a' + (i % 26) as u8).collect();
    for &b in &text {
        out(&mut vmm, &mut env, COM1, b);
    }
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Io {
                port: EXIT_PORT,
                size: 1,
                write: true,
                value: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(r.response.then, Then::Exit { status: 0 });
    let joined: Vec<u8> = env.lines.iter().flat_map(|(_, l)| l.clone()).collect();
    assert_eq!(
        joined,
        [&text[..], b"\n"].concat(),
        "the unfinished line is ended at exit"
    );
    assert!(env.lines.iter().all(|(_, l)| l.len() <= crate::exits::LINE));
}

#[test]
fn the_exit_port_ends_the_domain_with_the_value_written() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Io {
                port: EXIT_PORT,
                size: 1,
                write: true,
                value: 7,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(r.response.then, Then::Exit { status: 7 });
}

#[test]
fn reads_of_absent_ports_return_all_ones_in_the_access_width() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let regs = ExitRegs {
        rax: 0x1122_3344_5566_7788,
        ..ExitRegs::default()
    };
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Io {
                port: 0x80,
                size: 1,
                write: false,
                value: 0,
            },
            regs,
        ),
    );
    assert_eq!(r.regs.unwrap().rax, 0x1122_3344_5566_77ff);
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Io {
                port: 0x80,
                size: 4,
                write: false,
                value: 0,
            },
            regs,
        ),
    );
    assert_eq!(r.regs.unwrap().rax, 0xffff_ffff);
}

#[test]
fn cpuid_hides_vmx_and_names_parallax() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Cpuid {
                leaf: 1,
                subleaf: 0,
            },
            ExitRegs::default(),
        ),
    );
    let regs = r.regs.unwrap();
    assert_eq!(regs.rcx & (1 << 5), 0, "VMX hidden");
    assert_ne!(regs.rcx & (1 << 31), 0, "hypervisor bit");
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Cpuid {
                leaf: 0x4000_0000,
                subleaf: 0,
            },
            ExitRegs::default(),
        ),
    );
    let regs = r.regs.unwrap();
    let mut sig = Vec::new();
    for v in [regs.rbx, regs.rcx, regs.rdx] {
        sig.extend_from_slice(&(v as u32).to_le_bytes());
    }
    assert_eq!(&sig[..10], b"ParallaxHV");
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Cpuid {
                leaf: 0x4000_0001,
                subleaf: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(r.regs.unwrap().rax, 0b1011, "present, VMFUNC, no #VE, PML");
}

#[test]
fn unknown_msrs_get_gp_and_hlt_blocks() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::Rdmsr { msr: 0xc000_0080 }, ExitRegs::default()),
    );
    assert_eq!(
        r.response.inject,
        Some(Inject::Exception {
            vector: 13,
            error_code: Some(0)
        })
    );
    assert_eq!(r.regs, None, "a refused RDMSR changes no register");
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert_eq!(r.response.then, Then::Block);
    let r = vmm.exit(&mut env, &exit(ExitKind::TripleFault, ExitRegs::default()));
    assert_eq!(r.response.then, Then::Crash);
}

fn hypercall(vmm: &mut Vmm, env: &mut Fake, regs: ExitRegs) -> ExitRegs {
    let r = vmm.exit(env, &exit(ExitKind::Hypercall, regs));
    assert!(r.response.advance);
    r.regs.unwrap_or(regs)
}

#[test]
fn service_hypercalls_answer_and_preserve_other_registers() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let regs = ExitRegs {
        rax: HC_SERVICE_NULL,
        rcx: 5,
        rdx: 9,
        ..ExitRegs::default()
    };
    let after = hypercall(&mut vmm, &mut env, regs);
    assert_eq!(after, ExitRegs { rax: 0, ..regs });
    let after = hypercall(
        &mut vmm,
        &mut env,
        ExitRegs {
            rax: HC_IPC_PING,
            ..ExitRegs::default()
        },
    );
    assert_eq!(
        (after.rax, after.rbx),
        (0, 500),
        "the ping's round trip, in TSC ticks"
    );
    let after = hypercall(
        &mut vmm,
        &mut env,
        ExitRegs {
            rax: 99,
            ..ExitRegs::default()
        },
    );
    assert_eq!(after.rax, Status::UnknownCall as u64);
}

fn request_at(env: &mut Fake, gpa: usize, r: &Request) -> ExitRegs {
    env.memory = std::vec![0; 3 * 4096];
    let n = postcard::to_slice(r, &mut env.memory[gpa..]).unwrap().len();
    ExitRegs {
        rax: HC_CALL,
        rbx: gpa as u64,
        rcx: n as u64,
        ..ExitRegs::default()
    }
}

#[test]
fn request_hypercalls_go_to_altp2m_and_the_reply_lands_in_guest_memory() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let regs = request_at(
        &mut env,
        0x1100,
        &Request::ViewCreate {
            default_access: None,
        },
    );
    let after = hypercall(&mut vmm, &mut env, regs);
    assert_eq!(after.rax, Status::Ok as u64);
    let reply: Reply =
        postcard::from_bytes(&env.memory[0x1100..0x1100 + after.rbx as usize]).unwrap();
    assert_eq!(reply, Reply::View(1));
    assert_eq!(
        env.asked,
        [AltRequest::Guest {
            domain: 3,
            vcpu: 0,
            request: Request::ViewCreate {
                default_access: None
            }
        }]
    );

    let regs = request_at(&mut env, 0x1100, &Request::ViewDestroy { view: 9 });
    let after = hypercall(&mut vmm, &mut env, regs);
    assert_eq!(after.rax, Status::Refused as u64);
}

#[test]
fn bad_request_hypercalls_are_refused_without_asking_altp2m() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    // Crossing a page.
    let mut regs = request_at(
        &mut env,
        0x1ffe,
        &Request::DirtyLogRead {
            from: 0,
            clear: true,
        },
    );
    regs.rcx = 8;
    assert_eq!(
        hypercall(&mut vmm, &mut env, regs).rax,
        Status::BadAddress as u64
    );
    // Too long.
    regs.rcx = MAX_REQUEST as u64 + 1;
    assert_eq!(
        hypercall(&mut vmm, &mut env, regs).rax,
        Status::Malformed as u64
    );
    // Outside guest memory.
    let regs = ExitRegs {
        rax: HC_CALL,
        rbx: 0x10_0000,
        rcx: 4,
        ..ExitRegs::default()
    };
    assert_eq!(
        hypercall(&mut vmm, &mut env, regs).rax,
        Status::BadAddress as u64
    );
    // Garbage, and a valid request with trailing bytes.
    let mut regs = request_at(
        &mut env,
        0x100,
        &Request::ViewCreate {
            default_access: None,
        },
    );
    env.memory[0x100] = 0xff;
    assert_eq!(
        hypercall(&mut vmm, &mut env, regs).rax,
        Status::Malformed as u64
    );
    env.memory[0x100] = 1;
    regs.rcx += 1;
    assert_eq!(
        hypercall(&mut vmm, &mut env, regs).rax,
        Status::Malformed as u64
    );
    assert!(env.asked.is_empty());
}

#[test]
fn a_request_while_altp2m_is_down_is_refused_with_a_reason() {
    let (mut vmm, mut env) = (
        Vmm::default(),
        Fake {
            altp2m_down: true,
            ..Fake::default()
        },
    );
    let regs = request_at(&mut env, 0x200, &Request::Capabilities);
    let after = hypercall(&mut vmm, &mut env, regs);
    assert_eq!(after.rax, Status::Refused as u64);
    let reply: Reply =
        postcard::from_bytes(&env.memory[0x200..0x200 + after.rbx as usize]).unwrap();
    assert_eq!(reply, Reply::Error(HcError::ServiceUnavailable));
}

#[test]
fn held_back_console_bytes_go_out_at_the_next_other_exit() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    for b in b"tick 4: " {
        out(&mut vmm, &mut env, COM1, *b);
    }
    assert!(env.lines.is_empty(), "a burst of writes is held back");
    vmm.exit(
        &mut env,
        &exit(
            ExitKind::Hypercall,
            ExitRegs {
                rax: HC_SERVICE_NULL,
                ..ExitRegs::default()
            },
        ),
    );
    assert_eq!(
        env.lines,
        [(3, b"tick 4: ".to_vec())],
        "and sent at the first other exit"
    );
    assert!(vmm.pending_line(3).is_empty());
}

#[test]
fn rdpmc_monitor_and_mwait_are_refused_and_hidden() {
    use platform::vmx::fields::reason;
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let other = |r| ExitKind::Other {
        reason: r,
        qualification: 0,
    };
    let r = vmm.exit(&mut env, &exit(other(reason::RDPMC), ExitRegs::default()));
    assert_eq!(
        r.response.inject,
        Some(Inject::Exception {
            vector: 13,
            error_code: Some(0)
        })
    );
    assert_eq!(r.response.then, Then::Resume);
    for why in [reason::MONITOR, reason::MWAIT] {
        let r = vmm.exit(&mut env, &exit(other(why), ExitRegs::default()));
        assert_eq!(
            r.response.inject,
            Some(Inject::Exception {
                vector: 6,
                error_code: None
            })
        );
        assert!(!r.response.advance);
    }
    let cpuid = |vmm: &mut Vmm, env: &mut Fake, leaf| {
        vmm.exit(
            env,
            &exit(ExitKind::Cpuid { leaf, subleaf: 0 }, ExitRegs::default()),
        )
        .regs
        .unwrap_or_default()
    };
    assert_eq!(
        cpuid(&mut vmm, &mut env, 1).rcx & (1 << 3),
        0,
        "MONITOR hidden"
    );
    let counters = ExitRegs {
        rax: 0x0804_0001, // what a host with counters would say
        ..ExitRegs::default()
    };
    let pmu = vmm
        .exit(
            &mut env,
            &exit(
                ExitKind::Cpuid {
                    leaf: 0xa,
                    subleaf: 0,
                },
                counters,
            ),
        )
        .regs
        .unwrap();
    assert_eq!(
        (pmu.rax, pmu.rbx, pmu.rcx, pmu.rdx),
        (0, 0, 0, 0),
        "no counters"
    );
}

#[test]
fn a_guest_repeating_a_refused_instruction_is_logged_sparingly() {
    use crate::exits::LogBudget;
    let mut b = LogBudget::default();
    let logged: Vec<(u32, u32)> = (1..=10_000)
        .filter_map(|i| b.admit().map(|skipped| (i, skipped)))
        .collect();
    // The first eight, then every 1024th saying 1023 were not logged.
    assert_eq!(logged.len(), 8 + (10_000 - 8) / 1024);
    assert!(logged[..8].iter().all(|&(_, s)| s == 0));
    assert_eq!(logged[8], (8 + 1024, 1023));
    assert!(logged[8..].iter().all(|&(_, s)| s == 1023));
}

/// Issue 9, point 8: the request page is read and written as the guest
/// would, through the view it runs in: a view that makes it read-only gets
/// the call refused with nothing written; a view that remaps it
/// (change_gfn) gets the reply in the frame the guest sees there.
#[test]
fn request_pages_are_reached_through_the_callers_view() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let view_create = Request::ViewCreate {
        default_access: None,
    };
    let in_view = |view: u16, regs: ExitRegs| {
        let mut m = exit(ExitKind::Hypercall, regs);
        m.exit.view = view;
        m
    };
    // Read-only in view 2: refused, the page untouched, altp2m not asked
    // to act.
    let regs = request_at(&mut env, 0x1100, &view_create);
    env.pages
        .insert((2, 1), (Some(1), ipc_schema::hypercall::Access::R));
    let before = env.memory.clone();
    let r = vmm.exit(&mut env, &in_view(2, regs));
    assert_eq!(r.regs.unwrap().rax, Status::BadAddress as u64);
    assert_eq!(env.memory, before);
    assert!(env.asked.is_empty());
    // The same page in view 0: answered.
    let r = vmm.exit(&mut env, &in_view(0, regs));
    assert_eq!(r.regs.unwrap().rax, Status::Ok as u64);
    // Remapped in view 3 to the frame of gfn 2: the request is read there
    // and the reply written there; gfn 1's own frame is untouched.
    env.memory = std::vec![0; 3 * 4096];
    let n = postcard::to_slice(&view_create, &mut env.memory[0x2100..])
        .unwrap()
        .len();
    env.pages
        .insert((3, 1), (Some(2), ipc_schema::hypercall::Access::RWX));
    let regs = ExitRegs {
        rax: HC_CALL,
        rbx: 0x1100,
        rcx: n as u64,
        ..ExitRegs::default()
    };
    let r = vmm.exit(&mut env, &in_view(3, regs)).regs.unwrap();
    assert_eq!(r.rax, Status::Ok as u64);
    let reply: Reply = postcard::from_bytes(&env.memory[0x2100..0x2100 + r.rbx as usize]).unwrap();
    assert_eq!(reply, Reply::View(1));
    assert!(env.memory[0x1000..0x2000].iter().all(|&b| b == 0));
}

#[test]
fn an_agents_dirty_log_requests_go_to_the_logdirty_service_as_its_domains_log() {
    use ipc_schema::logdirty::{DirtyMode, GfnRange, LdError, LdRequest, Mechanism};
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let start = Request::DirtyLogStart {
        range: Some(GfnRange { gfn: 0, count: 16 }),
        mode: DirtyMode::Auto,
    };
    let regs = request_at(&mut env, 0x1000, &start);
    let out = hypercall(&mut vmm, &mut env, regs);
    assert_eq!(out.rax, Status::Ok as u64);
    assert_eq!(
        read_reply(&env, 0x1000, out.rbx),
        Reply::DirtyStarted(Mechanism::Pml)
    );
    let regs = request_at(
        &mut env,
        0x1000,
        &Request::DirtyLogRead {
            from: 0,
            clear: true,
        },
    );
    let out = hypercall(&mut vmm, &mut env, regs);
    match read_reply(&env, 0x1000, out.rbx) {
        Reply::Dirty { ranges, next: None } => {
            assert_eq!(ranges.0.as_slice(), &[GfnRange { gfn: 2, count: 3 }])
        }
        other => panic!("{other:?}"),
    }
    let regs = request_at(&mut env, 0x1000, &Request::DirtyLogStop);
    let out = hypercall(&mut vmm, &mut env, regs);
    assert_eq!(out.rax, Status::Refused as u64);
    assert_eq!(
        read_reply(&env, 0x1000, out.rbx),
        Reply::Error(HcError::DirtyLog(LdError::NotLogging))
    );
    assert!(
        env.asked
            .iter()
            .all(|r| matches!(r, AltRequest::GuestPage { .. })),
        "altp2m is only asked what the request page is"
    );
    assert_eq!(
        env.dirty_asked[0],
        LdRequest::Start {
            domain: 3,
            log: crate::exits::AGENT_LOG,
            range: Some(GfnRange { gfn: 0, count: 16 }),
            mode: DirtyMode::Auto
        }
    );
}

fn read_reply(env: &Fake, gpa: usize, len: u64) -> Reply {
    postcard::from_bytes(&env.memory[gpa..gpa + len as usize]).unwrap()
}

#[test]
fn granted_pages_are_the_kernels_business_and_its_refusals_are_named() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let mut ask = |gfn, count, grant| {
        let regs = request_at(&mut env, 0x100, &Request::GrantPages { gfn, count, grant });
        let after = hypercall(&mut vmm, &mut env, regs);
        let reply: Reply =
            postcard::from_bytes(&env.memory[0x100..0x100 + after.rbx as usize]).unwrap();
        (after.rax, reply)
    };
    assert_eq!(ask(0x10, 1, true), (Status::Ok as u64, Reply::Done));
    assert_eq!(ask(0x10, 1, false), (Status::Ok as u64, Reply::Done));
    let refused = |e| (Status::Refused as u64, Reply::Error(e));
    assert_eq!(ask(0x11, 1, true), refused(HcError::TooManyGrants));
    assert_eq!(ask(0x11, 1, false), refused(HcError::GrantedPagesMapped));
    assert_eq!(ask(0x12, 1, false), refused(HcError::NotGranted));
    assert_eq!(
        ask(0x9999, 1, true),
        refused(HcError::BadGfn { gfn: 0x9999 })
    );
    assert_eq!(ask(0x10, 0, true), refused(HcError::BadRange));
    // None of it went to the altp2m or logdirty services.
    assert!(env.asked.is_empty() && env.dirty_asked.is_empty());
}

/// The 8259 pair programmed as PC kernels do: vectors 0x20 and 0x28,
/// cascade on line 2, 8086 mode.
fn program_pics(pic: &mut crate::pic::Pic, icw4: u8) {
    for (port, v) in [
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, 0x20),
        (0xa1, 0x28),
        (0x21, 0x04),
        (0xa1, 0x02),
        (0x21, icw4),
        (0xa1, icw4),
    ] {
        pic.write(port, v);
    }
}

#[test]
fn the_pics_deliver_by_priority_mask_and_end_of_interrupt() {
    let mut pic = crate::pic::Pic::default();
    // Power-on: every line masked, nothing delivered.
    pic.raise(0);
    assert!(!pic.pending());
    program_pics(&mut pic, 0x01);
    // ICW1 cleared the masks; mask all but 0, 1 and the cascade.
    pic.write(0x21, 0xf8);
    pic.write(0xa1, 0xfe);
    assert_eq!(pic.read(0x21), 0xf8);
    pic.raise(1);
    pic.raise(0);
    pic.raise(5); // masked
    assert!(pic.pending());
    assert_eq!(pic.ack(), Some(0x20), "line 0 first");
    // Line 1 waits while 0 is in service.
    assert!(!pic.pending());
    pic.write(0x20, 0x0b); // OCW3: read ISR
    assert_eq!(pic.read(0x20), 0x01);
    pic.write(0x20, 0x0a); // read IRR
    assert_eq!(pic.read(0x20), 0x22);
    pic.write(0x20, 0x20); // non-specific EOI
    assert_eq!(pic.ack(), Some(0x21));
    pic.write(0x20, 0x61); // specific EOI of line 1
    assert!(!pic.pending(), "line 5 stays masked");
    // The slave's line 8 arrives through the master's line 2.
    pic.raise(8);
    assert_eq!(pic.ack(), Some(0x28));
    assert_eq!((pic.master.isr, pic.slave.isr), (0x04, 0x01));
    pic.raise(8);
    assert!(!pic.pending(), "in service on both chips");
    pic.write(0xa0, 0x20);
    pic.write(0x20, 0x20);
    assert_eq!(pic.ack(), Some(0x28));
    // Auto-EOI: nothing stays in service.
    let mut aeoi = crate::pic::Pic::default();
    program_pics(&mut aeoi, 0x03);
    aeoi.raise(0);
    assert_eq!(aeoi.ack(), Some(0x20));
    aeoi.raise(0);
    assert_eq!((aeoi.master.isr, aeoi.ack()), (0, Some(0x20)));
    // Garbage in any order never panics and leaves vectors in range.
    let mut junk = crate::pic::Pic::default();
    for i in 0u32..4000 {
        let v = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        junk.write([0x20, 0x21, 0xa0, 0xa1][(i % 4) as usize], v);
        junk.raise(v & 15);
        let _ = junk.ack();
    }
}

const HZ: u64 = 100_000_000; // the fake's TSC: 100 MHz

#[test]
fn the_pit_counts_from_the_tsc_and_gives_irq0_edges() {
    use crate::pit::{PIT_HZ, Pit};
    let mut pit = Pit::default();
    let t0 = 5_000_000;
    // Channel 0, lobyte/hibyte, mode 2, 11932: 100 Hz.
    pit.write(0x43, 0x34, t0, HZ);
    pit.write(0x40, 0x9c, t0, HZ);
    assert_eq!(pit.next_edge(), u64::MAX, "no edge before the whole count");
    pit.write(0x40, 0x2e, t0, HZ);
    let period = (11932 * HZ).div_ceil(PIT_HZ);
    assert_eq!(pit.next_edge(), t0 + period);
    assert!(!pit.irq0_due(t0 + period - 1, HZ));
    assert!(pit.irq0_due(t0 + period, HZ));
    assert!(!pit.irq0_due(t0 + period, HZ), "one edge once");
    assert_eq!(pit.next_edge(), t0 + 2 * period);
    // Ten periods late: one edge, and the next in the future.
    assert!(pit.irq0_due(t0 + 12 * period + 5, HZ));
    assert_eq!(pit.next_edge(), t0 + 13 * period);
    // Halfway through a period the count reads about half the reload.
    pit.write(0x43, 0x00, t0 + period / 2, HZ); // latch channel 0
    let lo = pit.read(0x40, t0 + period, HZ);
    let hi = pit.read(0x40, t0 + period, HZ);
    let count = u16::from(lo) | u16::from(hi) << 8;
    assert!((5960..=5972).contains(&count), "latched {count}");
    // Mode 0 (one-shot): one edge, then none.
    pit.write(0x43, 0x30, t0, HZ);
    pit.write(0x40, 0x10, t0, HZ);
    pit.write(0x40, 0x00, t0, HZ);
    let end = t0 + (16 * HZ).div_ceil(PIT_HZ);
    assert!(pit.irq0_due(end, HZ));
    assert_eq!(pit.next_edge(), u64::MAX);
    // Channel 2 through port 0x61: gate on, mode 0, OUT2 at bit 5 once the
    // count is done (as kernels calibrate their TSC).
    pit.write(0x61, 0x01, t0, HZ);
    pit.write(0x43, 0xb0, t0, HZ);
    pit.write(0x42, 0x9b, t0, HZ);
    pit.write(0x42, 0x2e, t0, HZ);
    assert_eq!(
        pit.read(0x61, t0 + HZ / 200, HZ) & 0x21,
        0x01,
        "5 ms: not yet"
    );
    assert_eq!(pit.read(0x61, t0 + HZ / 99, HZ) & 0x21, 0x21, "10 ms: done");
    pit.write(0x61, 0x00, t0, HZ);
    assert_eq!(pit.read(0x61, t0 + HZ, HZ) & 0x21, 0, "gate off: low");
    // Read-back of channel 0's status: mode 0, lobyte/hibyte, OUT high.
    pit.write(0x43, 0xe2, t0 + HZ, HZ);
    assert_eq!(pit.read(0x40, t0 + HZ, HZ), 0x80 | 0x30);
}

fn io(
    vmm: &mut Vmm,
    env: &mut Fake,
    port: u16,
    write: bool,
    value: u8,
) -> ipc_schema::vmexit::ExitReply {
    let kind = ExitKind::Io {
        port,
        size: 1,
        write,
        value: value.into(),
    };
    vmm.exit(env, &exit(kind, ExitRegs::default()))
}

/// A guest's PICs and a 100 Hz PIT, as `tests/kernels/timer.S` programs them.
fn guest_timer(vmm: &mut Vmm, env: &mut Fake) -> ipc_schema::vmexit::ExitReply {
    let mut pic = Vec::new();
    program_pics_ports(&mut pic);
    for (port, v) in pic {
        io(vmm, env, port, true, v);
    }
    io(vmm, env, 0x21, true, 0xfe);
    io(vmm, env, 0x43, true, 0x34);
    io(vmm, env, 0x40, true, 0x9c);
    io(vmm, env, 0x40, true, 0x2e)
}

fn program_pics_ports(out: &mut Vec<(u16, u8)>) {
    out.extend([
        (0x20, 0x11),
        (0xa0, 0x11),
        (0x21, 0x20),
        (0xa1, 0x28),
        (0x21, 0x04),
        (0xa1, 0x02),
        (0x21, 0x01),
        (0xa1, 0x01),
    ]);
}

#[test]
fn a_timer_interrupt_wakes_a_halted_guest_through_window_and_injection() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 1_000_000;
    let period = (11932 * HZ).div_ceil(crate::pit::PIT_HZ);
    let edge = env.tsc + period;
    // Programming the PIT sets the vCPU's deadline (its first edge).
    let r = guest_timer(&mut vmm, &mut env);
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: false,
            deadline: edge
        }
    );
    // HLT with nothing waiting: wait for that edge, RIP past the HLT.
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert!(r.response.advance);
    assert_eq!(r.response.then, Then::BlockUntil { deadline: edge });
    // The edge: IRQ 0 waits and a window is asked for; no deadline while
    // IRQ 0 is requested (another edge would change nothing).
    env.tsc = edge + 10;
    let r = vmm.exit(&mut env, &exit(ExitKind::Deadline, ExitRegs::default()));
    assert!(!r.response.advance);
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: true,
            deadline: u64::MAX
        }
    );
    // The window: vector 0x20 injected; the next edge is the deadline.
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x20 }));
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: false,
            deadline: edge + period
        }
    );
    // Before its EOI the next edge does not ask for a window (line 0 in
    // service) and leaves no deadline (IRQ 0 requested); the EOI asks for
    // the window.
    env.tsc = edge + period;
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Cpuid {
                leaf: 0,
                subleaf: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: false,
            deadline: u64::MAX
        }
    );
    let r = io(&mut vmm, &mut env, 0x20, true, 0x20);
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: true,
            deadline: u64::MAX
        }
    );
    // A HLT now (an interrupt waits): go on past it and take it.
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert!(r.response.advance);
    assert_eq!(r.response.then, Then::Resume, "the window is asked already");
    // A second HLT with no window between: interrupts are off; it would
    // wait for ever, and the kernel stops it saying so.
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert_eq!(r.response.then, Then::Block);
}

#[test]
fn a_pic_programmed_with_exception_vectors_stops_the_domain() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    // ICW2 = 0x08: IRQ 0 would be #DF's vector.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x08),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
    ] {
        io(&mut vmm, &mut env, port, true, v);
    }
    io(&mut vmm, &mut env, 0x43, true, 0x34);
    io(&mut vmm, &mut env, 0x40, true, 0x02);
    io(&mut vmm, &mut env, 0x40, true, 0x00);
    env.tsc += HZ;
    let r = vmm.exit(&mut env, &exit(ExitKind::Deadline, ExitRegs::default()));
    assert!(matches!(
        r.response.then,
        Then::ResumeUntil { window: true, .. }
    ));
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.then, Then::Crash);
}

#[test]
fn absent_ports_read_all_ones() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    for port in [0x3f0u16, 0x2f8, 0x4d0, 0x3f0] {
        let r = io(&mut vmm, &mut env, port, false, 0);
        assert_eq!(r.regs.map(|r| r.rax & 0xff), Some(0xff), "port {port:#x}");
    }
}

#[test]
fn a_storming_pit_gives_one_timer_interrupt_per_floor_period() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 1_000_000;
    guest_timer(&mut vmm, &mut env);
    // Count 2: an edge every 1.7 µs.
    io(&mut vmm, &mut env, 0x43, true, 0x34);
    io(&mut vmm, &mut env, 0x40, true, 0x02);
    io(&mut vmm, &mut env, 0x40, true, 0x00);
    env.tsc += 1000;
    vmm.exit(&mut env, &exit(ExitKind::Deadline, ExitRegs::default()));
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x20 }));
    let floor = HZ / crate::exits::MIN_TIMER_RATE;
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: false,
            deadline: env.tsc + floor
        }
    );
    // Its EOI just after: nothing waits, the guest runs on until then.
    env.tsc += 50;
    let r = io(&mut vmm, &mut env, 0x20, true, 0x20);
    assert_eq!(r.response.then, Then::Resume);
}

fn io32(vmm: &mut Vmm, env: &mut Fake, port: u16, size: u8, write: bool, value: u32) -> u32 {
    let kind = ExitKind::Io {
        port,
        size,
        write,
        value,
    };
    let regs = ExitRegs {
        rax: 0x1234_5678_0000_0000,
        ..ExitRegs::default()
    };
    let r = vmm.exit(env, &exit(kind, regs));
    r.regs.map_or(0, |r| r.rax as u32)
}

/// Issue 14: a domain's assigned function shows at 00:01.0 through its
/// port exits (the Env's DEVICE_CONFIG, of this domain and no other), its
/// BAR virtual, its command writes passed to the device.
#[test]
fn a_domains_assigned_function_shows_on_its_pci_bus() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let mut edu = [0u32; 64];
    edu[0] = 0x11e8_1234;
    edu[2] = 0x00ff_0010;
    edu[4] = 0xfea0_0000;
    // Another domain's function (domain 4): not on domain 3's bus.
    env.functions.insert((4, 0), edu);
    let at = |dev: u32, reg: u32| 0x8000_0000 | dev << 11 | reg;
    io32(&mut vmm, &mut env, 0xcf8, 4, true, at(1, 0));
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0), u32::MAX);
    // A domain's bus is learnt at its first access: a fresh domain 3.
    let mut vmm = Vmm::default();
    env.functions.insert((3, 0), edu);
    io32(&mut vmm, &mut env, 0xcf8, 4, true, at(1, 0));
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0), 0x11e8_1234);
    io32(&mut vmm, &mut env, 0xcf8, 4, true, at(1, 8));
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0) >> 8, 0xff00);
    io32(&mut vmm, &mut env, 0xcf8, 4, true, at(1, 0x10));
    io32(&mut vmm, &mut env, 0xcfc, 4, true, u32::MAX);
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0), 0xfff0_0000);
    io32(&mut vmm, &mut env, 0xcf8, 4, true, at(1, 4));
    io32(&mut vmm, &mut env, 0xcfc, 2, true, 0x0006);
    assert_eq!(
        env.config_writes,
        [(
            3,
            0,
            crate::pci::Op::Write {
                offset: 4,
                size: 2,
                value: 6
            }
        )]
    );
    io32(&mut vmm, &mut env, 0xcf8, 4, true, at(2, 0));
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0), u32::MAX);
}

#[test]
fn pci_configuration_answers_for_the_host_bridge_alone() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let mut cfg = |bdf: u32, reg: u32, size: u8, port: u16| {
        io32(
            &mut vmm,
            &mut env,
            0xcf8,
            4,
            true,
            0x8000_0000 | bdf << 8 | reg,
        );
        io32(&mut vmm, &mut env, port, size, false, 0)
    };
    assert_eq!(cfg(0, 0, 4, 0xcfc), 0x29c0_8086);
    assert_eq!(cfg(0, 0, 2, 0xcfe), 0x29c0);
    assert_eq!(cfg(0, 8, 4, 0xcfc), 0x0600_0000);
    assert_eq!(cfg(0, 8, 1, 0xcff), 0x06);
    assert_eq!(cfg(0, 0x40, 4, 0xcfc), 0);
    // Another device, function or bus: absent.
    assert_eq!(cfg(1 << 3, 0, 4, 0xcfc), u32::MAX);
    assert_eq!(cfg(1, 0, 4, 0xcfc), u32::MAX);
    assert_eq!(cfg(1 << 8, 0, 2, 0xcfc), 0xffff);
    // The address register reads back; without its enable bit, nothing.
    io32(&mut vmm, &mut env, 0xcf8, 4, true, 0x0000_0000);
    assert_eq!(io32(&mut vmm, &mut env, 0xcf8, 4, false, 0), 0);
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0), u32::MAX);
    // The bridge's registers are read-only.
    io32(&mut vmm, &mut env, 0xcf8, 4, true, 0x8000_0000);
    io32(&mut vmm, &mut env, 0xcfc, 4, true, 0);
    assert_eq!(io32(&mut vmm, &mut env, 0xcfc, 4, false, 0), 0x29c0_8086);
}

#[test]
fn the_cmos_tells_memory_and_a_running_bcd_clock() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 7_000;
    let reg = |vmm: &mut Vmm, env: &mut Fake, r: u8| {
        io(vmm, env, 0x70, true, r);
        io(vmm, env, 0x71, false, 0).regs.map_or(0, |r| r.rax as u8)
    };
    // 32 MiB: 640 KiB base, 31 MiB above 1 MiB, 256 x 64 KiB above 16 MiB.
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x15), reg(&mut vmm, &mut env, 0x16)),
        (0x80, 0x02)
    );
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x17), reg(&mut vmm, &mut env, 0x18)),
        (0x00, 0x7c)
    );
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x30), reg(&mut vmm, &mut env, 0x31)),
        (0x00, 0x7c)
    );
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x34), reg(&mut vmm, &mut env, 0x35)),
        (0x00, 0x01)
    );
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x0b), reg(&mut vmm, &mut env, 0x0d)),
        (0x02, 0x80)
    );
    // The clock starts at 2000-01-01 00:00:00 (a Saturday) and runs.
    assert_eq!(reg(&mut vmm, &mut env, 0x00), 0x00);
    assert_eq!(
        (
            reg(&mut vmm, &mut env, 0x07),
            reg(&mut vmm, &mut env, 0x08),
            reg(&mut vmm, &mut env, 0x09)
        ),
        (0x01, 0x01, 0x00)
    );
    assert_eq!(reg(&mut vmm, &mut env, 0x06), 7);
    env.tsc += (40 * 86_400 + 3600 + 59) * HZ;
    assert_eq!(
        (
            reg(&mut vmm, &mut env, 0x04),
            reg(&mut vmm, &mut env, 0x02),
            reg(&mut vmm, &mut env, 0x00)
        ),
        (0x01, 0x00, 0x59)
    );
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x07), reg(&mut vmm, &mut env, 0x08)),
        (0x10, 0x02),
        "2000-02-10"
    );
    // Writes to the clock and to status D are ignored; RAM keeps them.
    io(&mut vmm, &mut env, 0x70, true, 0x0d);
    io(&mut vmm, &mut env, 0x71, true, 0);
    io(&mut vmm, &mut env, 0x70, true, 0x40);
    io(&mut vmm, &mut env, 0x71, true, 0x5a);
    assert_eq!(
        (reg(&mut vmm, &mut env, 0x0d), reg(&mut vmm, &mut env, 0x40)),
        (0x80, 0x5a)
    );
}

#[test]
fn an_acpi_s5_request_powers_the_domain_off_and_other_sleep_types_do_not() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let pm1 = |vmm: &mut Vmm, env: &mut Fake, size: u8, write: bool, value: u32| {
        let kind = ExitKind::Io {
            port: 0x604,
            size,
            write,
            value,
        };
        vmm.exit(env, &exit(kind, ExitRegs::default()))
    };
    let r = pm1(&mut vmm, &mut env, 2, false, 0);
    assert_eq!(r.regs.map(|r| r.rax), Some(1), "SCI_EN: ACPI mode is on");
    // S3 (type 1) is not there: ignored, the guest goes on.
    let r = pm1(&mut vmm, &mut env, 2, true, 0x2000 | 1 << 10);
    assert_eq!(r.response.then, Then::Resume);
    // Without SLP_EN nothing happens.
    let r = pm1(&mut vmm, &mut env, 2, true, 0);
    assert_eq!(r.response.then, Then::Resume);
    let r = pm1(&mut vmm, &mut env, 2, true, 0x2000);
    assert_eq!(r.response.then, Then::Exit { status: 0 });
}

#[test]
fn the_x2apic_timer_self_ipi_and_priorities() {
    use crate::lapic::Lapic;
    let mut a = Lapic::default();
    let t = 1_000;
    // xAPIC at reset: the x2APIC MSRs give #GP.
    assert_eq!(a.read(0x802, t), None);
    assert!(!a.write(0x80f, 0x1ff, t));
    assert!(
        !a.write_base(0xfee0_0000 | 1 << 10),
        "x2APIC without enable"
    );
    assert!(!a.write_base(0xfed0_0d00), "another base");
    assert!(a.write_base(0xfee0_0d00));
    assert!(a.x2apic());
    assert!(!a.write_base(0xfee0_0900), "no way back to xAPIC but off");
    assert_eq!(a.read(0x803, t), Some(0x0005_0014));
    // Software-disabled: the timer's LVT stays masked, nothing accepted.
    a.write(0x83f, 0x40, t);
    assert_eq!(a.pending(), None);
    a.write(0x80f, 0x1ff, t);
    // One-shot: divide by 1 (0xb), 1000 ticks, vector 0x30.
    a.write(0x83e, 0xb, t);
    a.write(0x832, 0x30, t);
    a.write(0x838, 1000, t);
    assert_eq!(a.read(0x839, t + 400), Some(600));
    assert_eq!(a.deadline(), t + 1000);
    a.tick(t + 999);
    assert_eq!(a.pending(), None);
    a.tick(t + 1000);
    assert_eq!(a.pending(), Some(0x30));
    assert_eq!(a.deadline(), u64::MAX, "one-shot: done");
    assert_eq!(a.ack(), Some(0x30));
    assert_eq!(a.read(0x810 + 1, t), Some(1 << 16), "0x30 in service");
    // A self-IPI of the same class waits for the EOI; a higher one does not.
    a.write(0x83f, 0x35, t);
    assert_eq!(a.pending(), None);
    a.write(0x830, 0x4_0051, t); // ICR: fixed, self shorthand, 0x51
    assert_eq!(a.ack(), Some(0x51));
    assert!(!a.write(0x80b, 1, t), "EOI takes only 0");
    a.write(0x80b, 0, t);
    a.write(0x80b, 0, t);
    assert_eq!(a.ack(), Some(0x35));
    a.write(0x80b, 0, t);
    // The task priority holds back classes at or below it.
    a.write(0x808, 0x40, t);
    a.write(0x83f, 0x45, t);
    assert_eq!(a.pending(), None);
    a.write(0x808, 0, t);
    assert_eq!(a.ack(), Some(0x45));
    a.write(0x80b, 0, t);
    // An illegal vector is an error, not an interrupt.
    a.write(0x83f, 3, t);
    assert_eq!((a.pending(), a.read(0x828, t)), (None, Some(1 << 6)));
    // Periodic, divide by 2 (0): every 200 TSC ticks; a late tick is one.
    a.write(0x83e, 0, t);
    a.write(0x832, 1 << 17 | 0x31, t);
    a.write(0x838, 100, t);
    a.tick(t + 200);
    assert_eq!(a.ack(), Some(0x31));
    a.write(0x80b, 0, t);
    assert_eq!(a.deadline(), t + 400);
    a.tick(t + 1050);
    assert_eq!(a.ack(), Some(0x31));
    assert_eq!(a.deadline(), t + 1200);
    a.write(0x80b, 0, t);
    // TSC-deadline: the MSR sets the expiry; writing 0 disarms.
    a.write(0x832, 2 << 17 | 0x32, t);
    a.write(0x6e0, t + 5000, t);
    assert_eq!((a.deadline(), a.read(0x6e0, t)), (t + 5000, Some(t + 5000)));
    a.write(0x6e0, 0, t);
    assert_eq!(a.deadline(), u64::MAX);
    a.write(0x6e0, t + 7000, t);
    a.tick(t + 7000);
    assert_eq!(a.ack(), Some(0x32));
    // Disabled through the base MSR: back to reset.
    assert!(a.write_base(0xfee0_0000));
    assert_eq!(a.read(0x802, t), None);
    // Garbage writes never panic.
    let mut g = Lapic::default();
    g.write_base(0xfee0_0d00);
    for i in 0u64..3000 {
        let v = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        g.write(0x800 + (v >> 40) as u32 % 0x100, v, i);
        g.tick(i * 1000);
        let _ = g.ack();
    }
}

#[test]
fn a_halted_guest_waits_for_its_apic_timer() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 10_000;
    let wr = |vmm: &mut Vmm, env: &mut Fake, msr: u32, value: u64| {
        vmm.exit(
            env,
            &exit(ExitKind::Wrmsr { msr, value }, ExitRegs::default()),
        )
    };
    let r = wr(&mut vmm, &mut env, 0x1b, 0xfee0_0d00);
    assert_eq!(r.response, ipc_schema::vmexit::Response::DONE);
    wr(&mut vmm, &mut env, 0x80f, 0x1ff);
    wr(&mut vmm, &mut env, 0x83e, 0xb);
    wr(&mut vmm, &mut env, 0x832, 0x40);
    let r = wr(&mut vmm, &mut env, 0x838, 1_000_000);
    let expiry = env.tsc + 1_000_000;
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: false,
            deadline: expiry
        }
    );
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert_eq!(r.response.then, Then::BlockUntil { deadline: expiry });
    env.tsc = expiry;
    let r = vmm.exit(&mut env, &exit(ExitKind::Deadline, ExitRegs::default()));
    assert!(matches!(
        r.response.then,
        Then::ResumeUntil { window: true, .. }
    ));
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x40 }));
    // An x2APIC MSR before x2APIC mode: #GP.
    let mut fresh = Vmm::default();
    let r = wr(&mut fresh, &mut env, 0x80b, 0);
    assert_eq!(
        r.response.inject,
        Some(Inject::Exception {
            vector: 13,
            error_code: Some(0)
        })
    );
}

/// The PICs at 0x20/0x28 with only IRQ 4 (COM1) open, and COM1's OUT2 on.
fn irq4_only(vmm: &mut Vmm, env: &mut Fake) {
    let mut ports = Vec::new();
    program_pics_ports(&mut ports);
    for (port, v) in ports {
        io(vmm, env, port, true, v);
    }
    io(vmm, env, 0x21, true, 0xef);
    io(vmm, env, COM1 + 4, true, 0x0b);
}

#[test]
fn the_console_uart_raises_irq4_when_its_transmitter_is_empty() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    irq4_only(&mut vmm, &mut env);
    let r = io(&mut vmm, &mut env, COM1 + 1, true, 0x02); // ETBEI
    assert!(matches!(
        r.response.then,
        Then::ResumeUntil { window: true, .. }
    ));
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x24 }));
}

#[test]
fn the_xapic_page_reaches_the_same_registers_as_the_x2apic_msrs() {
    use crate::lapic::{IMAGE_LEN, Lapic};
    let reg = |a: &Lapic, offset: u16| {
        let i = Lapic::IMAGE.iter().position(|&o| o == offset).unwrap();
        a.image()[i]
    };
    let mut a = Lapic::default();
    let t = 1_000;
    assert!(a.xapic(), "xAPIC mode at reset");
    assert_eq!(Lapic::IMAGE.len(), IMAGE_LEN);
    // Reset values: ID 0, version, DFR all ones, SVR 0xff, LVTs masked.
    assert_eq!(reg(&a, 0x20), 0);
    assert_eq!(reg(&a, 0x30), 0x0005_0014);
    assert_eq!(reg(&a, 0xe0), u32::MAX);
    assert_eq!(reg(&a, 0xf0), 0xff);
    assert_eq!(reg(&a, 0x320), 1 << 16);
    // Software enable, the logical destination (flat model).
    assert!(a.write_mmio(0xf0, 0x1ff, t));
    assert!(a.write_mmio(0xe0, 0xffff_ffff, t));
    assert!(a.write_mmio(0xd0, 0x0100_0000 | 0xabc, t));
    assert_eq!(reg(&a, 0xd0), 0x0100_0000, "LDR keeps bits 31:24");
    assert!(a.write_mmio(0x20, 0x0500_0000, t));
    assert_eq!(reg(&a, 0x20), 0, "the ID stays 0");
    // One-shot timer: divide by 1, 1000 ticks, vector 0x30.
    a.write_mmio(0x3e0, 0xb, t);
    a.write_mmio(0x320, 0x30, t);
    a.write_mmio(0x380, 1000, t);
    assert_eq!(
        (reg(&a, 0x3e0), reg(&a, 0x320), reg(&a, 0x380)),
        (0xb, 0x30, 1000)
    );
    assert_eq!(a.deadline(), t + 1000);
    a.tick(t + 1000);
    assert_eq!(reg(&a, 0x200 + 0x10), 1 << 16, "0x30 requested: IRR");
    assert_eq!(a.ack(), Some(0x30));
    assert_eq!(
        (reg(&a, 0x210), reg(&a, 0x110)),
        (0, 1 << 16),
        "in service: ISR"
    );
    // EOI takes any value in xAPIC mode.
    assert!(a.write_mmio(0xb0, 0x1234, t));
    assert_eq!(reg(&a, 0x110), 0);
    // Periodic: every 200 ticks at divide by 2.
    a.write_mmio(0x3e0, 0, t);
    a.write_mmio(0x320, 1 << 17 | 0x31, t);
    a.write_mmio(0x380, 100, t);
    a.tick(t + 200);
    assert_eq!(a.ack(), Some(0x31));
    a.write_mmio(0xb0, 0, t);
    assert_eq!(a.deadline(), t + 400);
    // A self-IPI through the ICR: by shorthand, and by its own ID (the
    // destination in the high half's top byte); another ID is dropped.
    a.write_mmio(0x320, 1 << 16, t);
    assert!(a.write_mmio(0x300, 0x4_0051, t));
    assert_eq!(a.ack(), Some(0x51));
    a.write_mmio(0xb0, 0, t);
    a.write_mmio(0x300, 0x52, t);
    assert_eq!(a.ack(), Some(0x52));
    a.write_mmio(0xb0, 0, t);
    a.write_mmio(0x300, 0x0100_0000_0000_0053, t);
    assert_eq!(a.pending(), None, "ID 1 is nobody");
    assert_eq!(reg(&a, 0x310), 0x0100_0000);
    // An illegal vector sets the error status; an ESR write clears it.
    a.write_mmio(0x300, 0x4_0003, t);
    assert_eq!(reg(&a, 0x280), 1 << 6);
    a.write_mmio(0x280, 0, t);
    assert_eq!(reg(&a, 0x280), 0);
    // Not writable, or not a register: refused, nothing changes.
    let before = a.image();
    for offset in [0x30, 0xa0, 0x100, 0x200, 0x390, 0x3f0, 0x400] {
        assert!(!a.write_mmio(offset, u64::MAX, t), "{offset:#x}");
    }
    assert_eq!(a.image(), before);
    // In x2APIC mode the page is not the APIC's: writes there do nothing.
    assert!(a.write_base(0xfee0_0d00));
    assert!(!a.write_mmio(0xf0, 0, t));
    assert_eq!(a.read(0x80f, t), Some(0x1ff));
}

/// The vmm's answer to `kind` for domain `domain`.
fn exit_of(
    vmm: &mut Vmm,
    env: &mut Fake,
    domain: u16,
    kind: ExitKind,
) -> ipc_schema::vmexit::ExitReply {
    let mut m = exit(kind, ExitRegs::default());
    m.exit.domain = domain;
    vmm.exit(env, &m)
}

#[test]
fn the_virtual_apic_page_follows_the_xapic_and_its_interrupts() {
    use ipc_schema::vmexit::Response;
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 10_000;
    let page = |env: &Fake, offset: u16| env.apic_page.get(&(1, offset)).copied().unwrap_or(0);
    // At the start the page shows the reset registers.
    exit_of(&mut vmm, &mut env, 1, ExitKind::Start);
    assert_eq!(page(&env, 0x30), 0x0005_0014);
    assert_eq!(page(&env, 0xf0), 0xff);
    assert_eq!(page(&env, 0x370), 1 << 16);
    let write = |vmm: &mut Vmm, env: &mut Fake, offset: u16, value: u64| {
        // The CPU has put the value in the page before the exit.
        env.apic_page.insert((1, offset), value as u32);
        exit_of(vmm, env, 1, ExitKind::ApicWrite { offset, value })
    };
    let r = write(&mut vmm, &mut env, 0xf0, 0x1ff);
    assert_eq!(
        r.response,
        Response::RETRY,
        "trap-like: RIP is past the write"
    );
    write(&mut vmm, &mut env, 0x3e0, 0xb);
    write(&mut vmm, &mut env, 0x320, 0x40);
    // A masked LVT written while software-disabled stays masked; here it
    // is enabled: the page keeps what was written.
    assert_eq!(page(&env, 0x320), 0x40);
    let r = write(&mut vmm, &mut env, 0x380, 1_000_000);
    let expiry = env.tsc + 1_000_000;
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: false,
            deadline: expiry
        }
    );
    let r = exit_of(&mut vmm, &mut env, 1, ExitKind::Hlt);
    assert_eq!(r.response.then, Then::BlockUntil { deadline: expiry });
    env.tsc = expiry;
    exit_of(&mut vmm, &mut env, 1, ExitKind::Deadline);
    assert_eq!(page(&env, 0x220), 1, "0x40 requested: IRR in the page");
    let r = exit_of(&mut vmm, &mut env, 1, ExitKind::InterruptWindow);
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x40 }));
    assert_eq!((page(&env, 0x220), page(&env, 0x120)), (0, 1), "in service");
    // The guest's EOI (any value) ends it; the page's EOI reads 0 again.
    write(&mut vmm, &mut env, 0xb0, 0x77);
    assert_eq!((page(&env, 0x120), page(&env, 0xb0)), (0, 0));
    // A register the model keeps otherwise is put right in the page.
    write(&mut vmm, &mut env, 0x20, 0x0700_0000);
    assert_eq!(page(&env, 0x20), 0, "the ID stays 0");
    write(&mut vmm, &mut env, 0x300, 0x5041); // ICR: delivery status set
    assert_eq!(page(&env, 0x300), 0x4041, "delivery status reads idle");
    // What the CPU does not virtualize (the current count) stops only
    // this domain, saying so.
    let r = exit_of(
        &mut vmm,
        &mut env,
        1,
        ExitKind::Other {
            reason: platform::vmx::fields::reason::APIC_ACCESS,
            qualification: 0x390,
        },
    );
    assert_eq!(r.response, Response::CRASH);
    // Without APIC virtualization the kernel refuses; the vmm stops asking.
    let mut env2 = Fake {
        no_apic_page: true,
        ..Fake::default()
    };
    let mut vmm2 = Vmm::default();
    exit_of(&mut vmm2, &mut env2, 1, ExitKind::Start);
    let r = exit_of(
        &mut vmm2,
        &mut env2,
        1,
        ExitKind::ApicWrite {
            offset: 0xf0,
            value: 0x1ff,
        },
    );
    assert_eq!(r.response, Response::RETRY);
}

#[test]
fn nonsense_written_to_the_xapic_page_stays_in_its_domain() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    exit_of(&mut vmm, &mut env, 1, ExitKind::Start);
    exit_of(&mut vmm, &mut env, 2, ExitKind::Start);
    let theirs: Vec<_> = env
        .apic_page
        .iter()
        .filter(|((d, _), _)| *d == 2)
        .map(|(k, v)| (*k, *v))
        .collect();
    for i in 0u64..4000 {
        let v = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        env.tsc = env.tsc.wrapping_add(v >> 50);
        let offset = ((v >> 40) as u16) & 0x3f0;
        env.apic_page.insert((1, offset), v as u32);
        let kind = match i % 5 {
            0 => ExitKind::InterruptWindow,
            1 => ExitKind::Deadline,
            _ => ExitKind::ApicWrite { offset, value: v },
        };
        let r = exit_of(&mut vmm, &mut env, 1, kind);
        if let Some(Inject::Interrupt { vector }) = r.response.inject {
            assert!(vector >= 16, "an illegal vector is never delivered");
        }
    }
    let after: Vec<_> = env
        .apic_page
        .iter()
        .filter(|((d, _), _)| *d == 2)
        .map(|(k, v)| (*k, *v))
        .collect();
    assert_eq!(theirs, after, "the other domain's page is untouched");
    assert_eq!(
        exit_of(&mut vmm, &mut env, 2, ExitKind::Hlt).response.then,
        Then::Block
    );
}

fn cpuid_of(vmm: &mut Vmm, env: &mut Fake, leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = vmm.exit(
        env,
        &exit(ExitKind::Cpuid { leaf, subleaf }, ExitRegs::default()),
    );
    let r = r.regs.unwrap_or_default();
    [r.rax as u32, r.rbx as u32, r.rcx as u32, r.rdx as u32]
}

/// What Linux would use and the platform cannot give is hidden: XSAVE and
/// what needs it (the guest shares the host's XCR0), machine check, the
/// host's speculation-control, TSC_AUX, thermal and power MSRs, INVPCID
/// and RDTSCP (#UD under the VMCS's controls); what it models stays.
#[test]
fn cpuid_hides_what_the_platform_does_not_give_a_kernel() {
    use crate::exits::{
        LEAF1_ECX_HOST, LEAF1_ECX_XSAVE, LEAF1_EDX_HOST, LEAF7_EBX_HIDDEN, LEAF7_ECX_HIDDEN,
        LEAF7_EDX_HIDDEN,
    };
    let mut env = Fake {
        every_feature: true,
        ..Fake::default()
    };
    let mut vmm = Vmm::default();
    let [_, _, ecx, edx] = cpuid_of(&mut vmm, &mut env, 1, 0);
    for bit in [26, 27, 28] {
        assert_eq!(
            ecx & (1 << bit),
            0,
            "leaf 1 ECX bit {bit} (XSAVE, OSXSAVE, AVX)"
        );
    }
    assert_eq!(
        ecx & (LEAF1_ECX_XSAVE | LEAF1_ECX_HOST | 1 << 5 | 1 << 3),
        0
    );
    assert_eq!(edx & LEAF1_EDX_HOST, 0);
    assert_eq!(edx & (1 << 7 | 1 << 14), 0, "no MCE, no MCA");
    assert_ne!(ecx & (1 << 21), 0, "x2APIC stays");
    assert_ne!(ecx & (1 << 24), 0, "the TSC-deadline timer stays");
    assert_ne!(edx & (1 << 4), 0, "the TSC stays");
    assert_ne!(ecx & (1 << 31), 0, "hypervisor");
    let [_, ebx, ecx, edx] = cpuid_of(&mut vmm, &mut env, 7, 0);
    assert_eq!(ebx & LEAF7_EBX_HIDDEN, 0);
    assert_eq!(ecx & LEAF7_ECX_HIDDEN, 0);
    assert_eq!(edx & LEAF7_EDX_HIDDEN, 0);
    assert_eq!(
        ebx & (1 << 10 | 1 << 5 | 1 << 16),
        0,
        "INVPCID, AVX2, AVX-512F"
    );
    assert_eq!(ecx & (1 << 22 | 1 << 3), 0, "RDPID, PKU");
    assert_eq!(edx & (1 << 26 | 1 << 29), 0, "IBRS, ARCH_CAPABILITIES");
    assert_ne!(ebx & 1, 0, "FSGSBASE stays");
    assert_eq!(
        cpuid_of(&mut vmm, &mut env, 7, 1),
        [!(1 << 4 | 1 << 5), !0, !0, !0],
        "subleaf 1 without AVX-VNNI and AVX512_BF16"
    );
    assert_eq!(
        cpuid_of(&mut vmm, &mut env, 7, 2),
        [!0; 4],
        "other subleaves as the host's"
    );
    assert_eq!(
        cpuid_of(&mut vmm, &mut env, 6, 0),
        [1 << 2, 0, 0, 0],
        "only ARAT"
    );
    assert_eq!(
        cpuid_of(&mut vmm, &mut env, 0xd, 0),
        [0; 4],
        "no XSAVE state"
    );
    assert_eq!(cpuid_of(&mut vmm, &mut env, 0xd, 1), [0; 4]);
    let [_, _, _, edx] = cpuid_of(&mut vmm, &mut env, 0x8000_0001, 0);
    assert_eq!(edx & (1 << 27), 0, "no RDTSCP");
    assert_ne!(edx & (1 << 29), 0, "long mode stays");
}

/// The MSRs Linux reads on every Intel CPU without a fault handler of its
/// own: feature control (locked, VMX off) and the microcode revision
/// (written 0 first, then read); other unknown ones stay #GP.
#[test]
fn feature_control_and_the_microcode_revision_read_as_on_a_locked_cpu() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let read = |vmm: &mut Vmm, env: &mut Fake, msr| {
        let r = vmm.exit(
            env,
            &exit(
                ExitKind::Rdmsr { msr },
                ExitRegs {
                    rax: 0xdead,
                    rdx: 0xbeef,
                    ..ExitRegs::default()
                },
            ),
        );
        (r.response.inject, r.regs.map(|r| (r.rax, r.rdx)))
    };
    assert_eq!(read(&mut vmm, &mut env, 0x3a), (None, Some((1, 0))));
    let w = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Wrmsr {
                msr: 0x8b,
                value: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(w.response.inject, None);
    assert!(w.response.advance);
    assert_eq!(read(&mut vmm, &mut env, 0x8b), (None, Some((0, 0))));
    let w = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Wrmsr {
                msr: 0x3a,
                value: 5,
            },
            ExitRegs::default(),
        ),
    );
    assert!(
        w.response.inject.is_some(),
        "feature control is locked: #GP"
    );
    for msr in [0x48, 0x17a, 0xc000_0103, 0xe7] {
        assert_eq!(
            read(&mut vmm, &mut env, msr).0,
            Some(Inject::Exception {
                vector: 13,
                error_code: Some(0)
            }),
            "MSR {msr:#x}"
        );
    }
}

/// Exits are counted by reason once the guest touches an interrupt source
/// (none before: the hot path of other guests stays as it was).
#[test]
fn exits_are_counted_by_reason_once_a_guest_uses_interrupts() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let io = |port, write| ExitKind::Io {
        port,
        size: 1,
        write,
        value: 0,
    };
    vmm.exit(&mut env, &exit(io(COM1, true), ExitRegs::default()));
    assert_eq!(vmm.exit_counts(3).unwrap().total(), 0, "not active yet");
    // The PIC's mask: an interrupt source.
    vmm.exit(&mut env, &exit(io(0x21, true), ExitRegs::default()));
    for kind in [
        io(COM1 + 5, false),
        io(COM1, true),
        io(0x20, true),
        io(0x43, true),
        io(0x40, true),
        io(0x61, false),
        io(0x70, true),
        io(0x80, true),
        ExitKind::Rdmsr { msr: 0x1b },
        ExitKind::Cpuid {
            leaf: 0,
            subleaf: 0,
        },
        ExitKind::InterruptWindow,
        ExitKind::Deadline,
    ] {
        vmm.exit(&mut env, &exit(kind, ExitRegs::default()));
    }
    let c = vmm.exit_counts(3).unwrap();
    assert_eq!(
        (
            c.uart, c.pic, c.pit, c.other_io, c.msr, c.cpuid, c.window, c.deadline
        ),
        (2, 2, 3, 2, 1, 1, 1, 1)
    );
    assert_eq!(c.total(), 13);
}

/// CPUID leaves 0x15 and 0x16 give the rate the guest's TSC counts at
/// (the kernel's measure), not the host CPU's nominal frequency.
#[test]
fn the_tsc_rate_is_told_through_leaves_0x15_and_0x16() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    // The fake's TSC runs at 100,000 kHz.
    assert_eq!(
        cpuid_of(&mut vmm, &mut env, 0x15, 0),
        [1, 1, 100_000_000, 0],
        "TSC = crystal (100 MHz) x 1 / 1"
    );
    assert_eq!(cpuid_of(&mut vmm, &mut env, 0x16, 0), [100, 100, 0, 0]);
}

/// The PM1a enable register keeps what is written (byte and word
/// accesses); status reads 0.
#[test]
fn the_acpi_pm1_enable_register_reads_back() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    let io = |port, size, write, value| ExitKind::Io {
        port,
        size,
        write,
        value,
    };
    let read = |vmm: &mut Vmm, env: &mut Fake, port, size| {
        vmm.exit(env, &exit(io(port, size, false, 0), ExitRegs::default()))
            .regs
            .map_or(0, |r| r.rax)
    };
    assert_eq!(read(&mut vmm, &mut env, 0x602, 2), 0);
    vmm.exit(
        &mut env,
        &exit(io(0x602, 2, true, 0x0420), ExitRegs::default()),
    );
    assert_eq!(read(&mut vmm, &mut env, 0x602, 2), 0x0420);
    assert_eq!(read(&mut vmm, &mut env, 0x603, 1), 0x04);
    vmm.exit(
        &mut env,
        &exit(io(0x602, 1, true, 0x01), ExitRegs::default()),
    );
    assert_eq!(read(&mut vmm, &mut env, 0x602, 2), 0x0401);
    assert_eq!(read(&mut vmm, &mut env, 0x600, 2), 0, "no event to report");
}

/// What a guest reading COM1 gets at `offset`.
fn com1_in(vmm: &mut Vmm, env: &mut Fake, offset: u16) -> u8 {
    io(vmm, env, COM1 + offset, false, 0)
        .regs
        .map_or(0, |r| r.rax as u8)
}

#[test]
fn typed_input_wakes_a_guest_halted_for_the_receive_interrupt() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 1_000_000;
    irq4_only(&mut vmm, &mut env);
    // Polling only (no receive interrupt): a HLT with nothing armed still
    // stops the domain, as nothing could wake it.
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert_eq!(r.response.then, Then::Block);
    io(&mut vmm, &mut env, COM1 + 1, true, 0x01); // ERBFI
    assert_eq!(com1_in(&mut vmm, &mut env, 2), 0xc1, "nothing received");
    // Waiting for input: woken every INPUT_POLL_MS to take what came.
    let poll = 100_000 * crate::exits::INPUT_POLL_MS;
    let r = vmm.exit(&mut env, &exit(ExitKind::Hlt, ExitRegs::default()));
    assert_eq!(
        r.response.then,
        Then::BlockUntil {
            deadline: 1_000_000 + poll
        }
    );
    assert_eq!(
        vmm.receive(3, b"hi\n"),
        UartReply::Taken {
            count: 3,
            waiting: 3
        }
    );
    env.tsc += poll;
    let r = vmm.exit(&mut env, &exit(ExitKind::Deadline, ExitRegs::default()));
    assert!(
        matches!(r.response.then, Then::ResumeUntil { window: true, .. }),
        "IRQ 4 waits: a window is asked for ({:?})",
        r.response.then
    );
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x24 }));
    // The handler: IIR says received data until the FIFO is read empty.
    assert_eq!(com1_in(&mut vmm, &mut env, 2), 0xc4);
    let mut line = Vec::new();
    while com1_in(&mut vmm, &mut env, 5) & 1 != 0 {
        line.push(com1_in(&mut vmm, &mut env, 0));
    }
    assert_eq!(line, b"hi\n");
    assert_eq!(com1_in(&mut vmm, &mut env, 2), 0xc1);
}

#[test]
fn each_domains_input_has_its_own_quota_and_unknown_domains_are_refused() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    assert_eq!(vmm.receive(3, b"x"), UartReply::NoSuchDomain, "no exit yet");
    for domain in [3, 4] {
        let mut m = exit(
            ExitKind::Cpuid {
                leaf: 0,
                subleaf: 0,
            },
            ExitRegs::default(),
        );
        m.exit.domain = domain;
        vmm.exit(&mut env, &m);
    }
    let typed = [b'a'; 100];
    let fifo = platform::devices::uart16550::RX_FIFO as u16;
    assert_eq!(
        vmm.receive(3, &typed),
        UartReply::Taken {
            count: fifo,
            waiting: fifo
        },
        "a full FIFO takes no more: the rest is sent again"
    );
    assert_eq!(
        vmm.receive(3, &typed),
        UartReply::Taken {
            count: 0,
            waiting: fifo
        }
    );
    assert_eq!(
        vmm.receive(4, &typed[..10]),
        UartReply::Taken {
            count: 10,
            waiting: 10
        },
        "domain 3's full FIFO does not hold domain 4's input back"
    );
    assert_eq!(vmm.receive(9, b"x"), UartReply::NoSuchDomain);
    // An ended domain's FIFO goes with its devices.
    vmm.forget(&mut env, 4);
    assert_eq!(vmm.receive(4, b"x"), UartReply::NoSuchDomain);
}

/// A 32-bit flat protected-mode vCPU at RIP 0x1000 whose next instruction
/// is `bytes` (in the fake's RAM), and the EPT violation of its access to
/// `gpa` (not RAM) answered.
fn mmio_exit(
    vmm: &mut Vmm,
    env: &mut Fake,
    bytes: &[u8],
    gpa: u64,
    write: bool,
) -> ipc_schema::vmexit::ExitReply {
    use ipc_schema::syscall::regs as r;
    if env.memory.len() < 0x2000 {
        env.memory = std::vec![0; 0x10000];
    }
    env.memory[0x1000..0x1000 + bytes.len()].copy_from_slice(bytes);
    env.vcpu[r::RIP] = 0x1000;
    env.vcpu[r::CR0] = 1;
    env.vcpu[r::CS] = 0x08 | (0xc09b << 16); // 32-bit code (D set)
    let access = ipc_schema::vmexit::AccessBits {
        read: !write,
        write,
        execute: false,
    };
    vmm.exit(
        env,
        &exit(
            ExitKind::EptViolation {
                gpa,
                gla: Some(gpa),
                access,
                allowed: ipc_schema::vmexit::AccessBits::default(),
                qualification: 0,
            },
            ExitRegs::default(),
        ),
    )
}

#[test]
fn mmio_with_no_device_reads_all_ones_and_drops_writes() {
    use ipc_schema::syscall::regs as r;
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.vcpu[r::RAX] = 0x1234_5678_9abc_def0;
    // mov 0xe0000000,%eax: all ones, RIP past its 6 bytes.
    let reply = mmio_exit(
        &mut vmm,
        &mut env,
        &[0x8b, 0x05, 0, 0, 0, 0xe0],
        0xe000_0000,
        false,
    );
    assert_eq!(reply.response, ipc_schema::vmexit::Response::RETRY);
    assert_eq!(env.vcpu[r::RAX], 0xffff_ffff);
    assert_eq!(env.vcpu[r::RIP], 0x1006);
    // movzbl (%ebx),%ecx: 0xff.
    let reply = mmio_exit(&mut vmm, &mut env, &[0x0f, 0xb6, 0x0b], 0xe000_0004, false);
    assert_eq!(reply.response, ipc_schema::vmexit::Response::RETRY);
    assert_eq!(env.vcpu[r::RCX], 0xff);
    assert_eq!(env.vcpu[r::RIP], 0x1003);
    // movl $1,(%ebx): dropped, RIP past it; the domain goes on.
    let reply = mmio_exit(
        &mut vmm,
        &mut env,
        &[0xc7, 0x03, 1, 0, 0, 0],
        0xe000_0000,
        true,
    );
    assert_eq!(reply.response, ipc_schema::vmexit::Response::RETRY);
    assert_eq!(env.vcpu[r::RIP], 0x1006);
}

#[test]
fn an_mmio_instruction_that_is_not_emulated_stops_only_its_domain() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    // rep movsl.
    let reply = mmio_exit(&mut vmm, &mut env, &[0xf3, 0xa5], 0xe000_0000, false);
    assert_eq!(reply.response.then, Then::Crash);
    // A fetch from MMIO.
    let reply = vmm.exit(
        &mut env,
        &exit(
            ExitKind::EptViolation {
                gpa: 0xe000_0000,
                gla: None,
                access: ipc_schema::vmexit::AccessBits {
                    read: false,
                    write: false,
                    execute: true,
                },
                allowed: ipc_schema::vmexit::AccessBits::default(),
                qualification: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(reply.response.then, Then::Crash);
}

/// The guest writes `value` to I/O APIC register `index` (32-bit MOVs
/// through IOREGSEL and IOWIN).
fn ioapic_set(vmm: &mut Vmm, env: &mut Fake, index: u32, value: u32) {
    use ipc_schema::syscall::regs as r;
    env.vcpu[r::RAX] = u64::from(index);
    // mov %eax,(%ebx)
    mmio_exit(vmm, env, &[0x89, 0x03], 0xfec0_0000, true);
    env.vcpu[r::RAX] = u64::from(value);
    // mov %eax,0x10(%ebx)
    mmio_exit(vmm, env, &[0x89, 0x43, 0x10], 0xfec0_0010, true);
}

fn ioapic_get(vmm: &mut Vmm, env: &mut Fake, index: u32) -> u32 {
    use ipc_schema::syscall::regs as r;
    env.vcpu[r::RAX] = u64::from(index);
    mmio_exit(vmm, env, &[0x89, 0x03], 0xfec0_0000, true);
    // mov 0x10(%ebx),%edx
    mmio_exit(vmm, env, &[0x8b, 0x53, 0x10], 0xfec0_0010, false);
    env.vcpu[r::RDX] as u32
}

#[test]
fn the_ioapic_routes_the_pit_on_pin_2_to_the_local_apic() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    env.tsc = 1_000_000;
    // ID 0, version 0x11 with 24 entries, every entry masked.
    assert_eq!(ioapic_get(&mut vmm, &mut env, 0), 0);
    assert_eq!(ioapic_get(&mut vmm, &mut env, 1), 0x0017_0011);
    for pin in 0..24 {
        assert_eq!(ioapic_get(&mut vmm, &mut env, 0x10 + 2 * pin), 1 << 16);
    }
    // The local APIC on (x2APIC MSRs), software-enabled.
    x2apic_on(&mut vmm, &mut env);
    // Pin 2: vector 0x30, fixed, edge, unmasked; the PICs all masked.
    ioapic_set(&mut vmm, &mut env, 0x15, 0);
    ioapic_set(&mut vmm, &mut env, 0x14, 0x30);
    assert_eq!(ioapic_get(&mut vmm, &mut env, 0x14), 0x30);
    io(&mut vmm, &mut env, 0x21, true, 0xff);
    io(&mut vmm, &mut env, 0xa1, true, 0xff);
    let period = (11932 * HZ).div_ceil(crate::pit::PIT_HZ);
    io(&mut vmm, &mut env, 0x43, true, 0x34);
    io(&mut vmm, &mut env, 0x40, true, 0x9c);
    io(&mut vmm, &mut env, 0x40, true, 0x2e);
    let edge = env.tsc + period;
    env.tsc = edge + 10;
    let r = vmm.exit(&mut env, &exit(ExitKind::Deadline, ExitRegs::default()));
    assert_eq!(
        r.response.then,
        Then::ResumeUntil {
            window: true,
            deadline: u64::MAX
        },
        "IRQ 0 requested through the I/O APIC: a window, no deadline"
    );
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x30 }));
    // At its EOI the next edge is the deadline again (the PIT's IRQ 0 is
    // not left waiting in the masked PIC).
    let r = vmm.exit(
        &mut env,
        &exit(
            ExitKind::Wrmsr {
                msr: 0x80b,
                value: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert!(
        matches!(
            r.response.then,
            Then::ResumeUntil { window: false, deadline } if deadline != u64::MAX
        ),
        "{:?}",
        r.response
    );
}

/// The local APIC in x2APIC mode (the base MSR), software-enabled (SVR).
fn x2apic_on(vmm: &mut Vmm, env: &mut Fake) {
    for (msr, value) in [(0x1b, 0xfee0_0c00), (0x80f, 0x1ff)] {
        vmm.exit(
            env,
            &exit(ExitKind::Wrmsr { msr, value }, ExitRegs::default()),
        );
    }
}

#[test]
fn a_level_entry_waits_for_the_eoi_of_its_vector() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    x2apic_on(&mut vmm, &mut env);
    // COM1's IRQ 4 on pin 4: vector 0x34, level, unmasked; OUT2 on.
    ioapic_set(&mut vmm, &mut env, 0x18, 0x34 | 1 << 15);
    io(&mut vmm, &mut env, COM1 + 4, true, 0x0b);
    // The transmitter-empty interrupt enabled: IRQ 4 rises.
    io(&mut vmm, &mut env, COM1 + 1, true, 0x02);
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(r.response.inject, Some(Inject::Interrupt { vector: 0x34 }));
    // Remote IRR set (bit 14): another edge delivers nothing until the EOI.
    assert_eq!(
        ioapic_get(&mut vmm, &mut env, 0x18),
        0x34 | 1 << 15 | 1 << 14
    );
    io(&mut vmm, &mut env, COM1 + 1, true, 0x00);
    io(&mut vmm, &mut env, COM1 + 1, true, 0x02);
    vmm.exit(
        &mut env,
        &exit(
            ExitKind::Wrmsr {
                msr: 0x80b,
                value: 0,
            },
            ExitRegs::default(),
        ),
    );
    assert_eq!(ioapic_get(&mut vmm, &mut env, 0x18), 0x34 | 1 << 15);
    let r = vmm.exit(
        &mut env,
        &exit(ExitKind::InterruptWindow, ExitRegs::default()),
    );
    assert_eq!(
        r.response.inject, None,
        "the edge during remote IRR was not delivered"
    );
}

#[test]
fn nonsense_written_to_the_ioapic_is_refused_and_the_domain_goes_on() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    // A vector below 16, unmasked: kept masked.
    ioapic_set(&mut vmm, &mut env, 0x10, 0x05);
    assert_eq!(ioapic_get(&mut vmm, &mut env, 0x10), 0x05 | 1 << 16);
    // ExtINT, NMI, SMI, INIT delivery: kept masked.
    for mode in [2u32, 4, 5, 7] {
        ioapic_set(&mut vmm, &mut env, 0x12, 0x40 | mode << 8);
        assert_eq!(
            ioapic_get(&mut vmm, &mut env, 0x12),
            0x40 | mode << 8 | 1 << 16
        );
    }
    // A register that is not there: reads 0, writes ignored.
    ioapic_set(&mut vmm, &mut env, 0x77, 0xdead_beef);
    assert_eq!(ioapic_get(&mut vmm, &mut env, 0x77), 0);
    // The version is read-only; the ID keeps 4 bits.
    ioapic_set(&mut vmm, &mut env, 1, 0);
    assert_eq!(ioapic_get(&mut vmm, &mut env, 1), 0x0017_0011);
    ioapic_set(&mut vmm, &mut env, 0, 0xffff_ffff);
    assert_eq!(ioapic_get(&mut vmm, &mut env, 0), 0x0f00_0000);
    // The domain still runs: an emulated read goes on.
    let r = mmio_exit(
        &mut vmm,
        &mut env,
        &[0x8b, 0x05, 0, 0, 0, 0xe0],
        0xe000_0000,
        false,
    );
    assert_eq!(r.response, ipc_schema::vmexit::Response::RETRY);
}

/// Sixteen domains (the most the vmm serves) with everything a swap
/// carries at its largest: an unfinished console line, a full receive
/// FIFO, the x2APIC's timer, the PIT, the CMOS, 16 absent ports logged.
#[test]
fn a_snapshot_of_sixteen_busy_domains_fits() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    for d in 1..=crate::exits::DOMAINS as u16 {
        let mut go = |kind: ExitKind, regs: ExitRegs| {
            let mut m = exit(kind, regs);
            m.exit.domain = d;
            vmm.exit(&mut env, &m)
        };
        for (msr, value) in [
            (0x1b, 0xfee0_0d00),
            (0x80f, 0x1ff),
            (0x832, 0x2_00ef),
            (0x83e, 0xb),
            (0x838, u64::from(u32::MAX)),
        ] {
            go(ExitKind::Wrmsr { msr, value }, ExitRegs::default());
        }
        for (port, value) in [(0x43, 0x34), (0x40, 0xff), (0x40, 0xff), (0x70, 0x0b)] {
            go(write_byte(port, value), ExitRegs::default());
        }
        for port in (0x71..).step_by(0x100).take(17) {
            go(
                ExitKind::Io {
                    port,
                    size: 4,
                    write: false,
                    value: 0,
                },
                ExitRegs::default(),
            );
        }
        for _ in 0..crate::exits::LINE - 1 {
            go(write_byte(COM1, b'x'), ExitRegs::default());
        }
        vmm.receive(d, &[0xff; 100]);
    }
    assert_eq!(vmm.domains().count(), crate::exits::DOMAINS);
    // Encoded from the devices, one domain at a time: the bytes of the
    // whole state encoded.
    let mut buf = std::vec![0u8; ipc_schema::lifecycle::SNAPSHOT_MAX];
    let n = vmm
        .snapshot_into(&mut buf)
        .expect("the state fits a snapshot");
    let state = vmm.snapshot();
    let mut whole = std::vec![0u8; ipc_schema::lifecycle::SNAPSHOT_MAX];
    assert_eq!(postcard::to_slice(&state, &mut whole).unwrap(), &buf[..n]);
    // Room to spare for what is added later (the I/O APIC's entries and
    // pages of absent MMIO at their largest add about 400 bytes a domain).
    assert!(
        n + 16 * 400 <= ipc_schema::lifecycle::SNAPSHOT_MAX,
        "{n} bytes"
    );
    std::println!("16 domains' state: {n} bytes");
    let mut next = Vmm::default();
    assert!(next.restore_from(&buf[..n]));
    assert_eq!(next.snapshot(), state, "the successor has it all");
    let next = Vmm::restore(postcard::from_bytes(&buf[..n]).unwrap());
    assert_eq!(next.snapshot(), state);
    assert_eq!(next.pending_line(16).len(), crate::exits::LINE - 1);
}

/// A snapshot that is not one (cut short, a byte too many, a count past
/// what follows, nonsense) is refused whole: the successor keeps nothing
/// of it and says so (the swap then fails and the old instance serves on).
#[test]
fn a_snapshot_that_does_not_decode_is_refused_whole() {
    let (mut vmm, mut env) = (Vmm::default(), Fake::default());
    for d in 1..=3u16 {
        let mut m = exit(write_byte(COM1, b'x'), ExitRegs::default());
        m.exit.domain = d;
        vmm.exit(&mut env, &m);
    }
    let mut buf = std::vec![0u8; ipc_schema::lifecycle::SNAPSHOT_MAX];
    let n = vmm.snapshot_into(&mut buf).unwrap();
    let mut longer = buf[..n].to_vec();
    longer.push(0);
    let mut more = buf[..n].to_vec();
    more[0] = 4;
    for (what, bytes) in [
        ("cut short", &buf[..n - 1]),
        ("a byte too many", &longer[..]),
        ("a count past what follows", &more[..]),
        ("nonsense", &[0xff; 40][..]),
    ] {
        let mut next = Vmm::default();
        assert!(!next.restore_from(bytes), "{what}");
        assert_eq!(next.domains().count(), 0, "{what}");
    }
    let mut next = Vmm::default();
    assert!(next.restore_from(&buf[..n]));
    assert_eq!(next.domains().collect::<std::vec::Vec<_>>(), [1, 2, 3]);
    // Too small a buffer: no snapshot rather than a partial one.
    assert_eq!(vmm.snapshot_into(&mut buf[..n - 1]), None);
}

/// The receive loop's ways (`exit_bytes`: the exit's bytes, with a service
/// call read in place; `exit_encoded`: a decoded exit; each with its short
/// way for service calls) answer each exit in the bytes of `exit`'s
/// answer and leave the same state: service calls of a quiet domain, with
/// console bytes held back, of a domain that has touched an interrupt
/// source (counted and checked for interrupts), other hypercalls and other
/// exits; bytes that are no exit are refused with nothing done.
#[test]
fn encoded_answers_are_the_general_ones() {
    let (mut general, mut env_g) = (Vmm::default(), Fake::default());
    let (mut encoded, mut env_e) = (Vmm::default(), Fake::default());
    let (mut raw, mut env_r) = (Vmm::default(), Fake::default());
    let mut scratch = ExitMessage::default();
    let call = |rax, domain| ExitMessage {
        exit: Exit {
            domain,
            ..exit(ExitKind::Hypercall, ExitRegs::default()).exit
        },
        regs: ExitRegs {
            rax,
            rbx: 7,
            rcx: 5,
            rdx: 9,
        },
    };
    let io = |port, value| exit(write_byte(port, value), ExitRegs::default());
    let sequence = [
        call(HC_SERVICE_NULL, 3),
        call(HC_SERVICE_INFO, 3),
        call(HC_SERVICE_INFO, 4),
        io(COM1, b'x'),
        call(HC_SERVICE_NULL, 3),
        io(COM1, b'y'),
        call(HC_SERVICE_INFO, 3),
        call(HC_IPC_PING, 3),
        call(99, 3),
        exit(
            ExitKind::Cpuid {
                leaf: 0,
                subleaf: 0,
            },
            ExitRegs::default(),
        ),
        // The UART's interrupts on: an interrupt source touched.
        io(COM1 + 1, 1),
        call(HC_SERVICE_NULL, 3),
        call(HC_SERVICE_INFO, 3),
        exit(ExitKind::Hlt, ExitRegs::default()),
        call(HC_SERVICE_INFO, 4),
    ];
    for m in &sequence {
        let mut buf = [0u8; 256];
        let n = encoded.exit_encoded(&mut env_e, m, &mut buf);
        let answer = general.exit(&mut env_g, m);
        assert_eq!(
            ipc_schema::exitcodec::decode_reply(&buf[..n]),
            Some(answer),
            "{m:?}"
        );
        assert_eq!(encoded.snapshot(), general.snapshot(), "after {m:?}");
        let mut bytes = [0u8; 256];
        let len = ipc_schema::exitcodec::encode_message(m, &mut bytes).unwrap();
        let mut by_bytes = [0u8; 256];
        let k = raw
            .exit_bytes(&mut env_r, &bytes[..len], &mut scratch, &mut by_bytes)
            .unwrap();
        assert_eq!(by_bytes[..k], buf[..n], "{m:?}");
        assert_eq!(raw.snapshot(), general.snapshot(), "after {m:?}");
        // Not an exit: one byte short, one too many, a kind that is none.
        let mut bad = bytes;
        for wrong in [&bytes[..len - 1], &bytes[..len + 1], {
            bad[ipc_schema::vmexit::EXIT_FIXED] = 0x7f;
            &bad[..len]
        }] {
            assert_eq!(
                raw.exit_bytes(&mut env_r, wrong, &mut scratch, &mut by_bytes),
                None,
                "{m:?}"
            );
        }
        assert_eq!(raw.snapshot(), general.snapshot(), "after {m:?}");
    }
    assert_eq!(env_r.lines, env_g.lines);
    assert_eq!(raw.exit_counts(3), general.exit_counts(3));
    assert_eq!(env_e.lines, env_g.lines);
    assert_eq!(env_e.lines, [(3, b"x".to_vec()), (3, b"y".to_vec())]);
    assert_eq!(encoded.exit_counts(3), general.exit_counts(3));
    // The exit that turned the UART's interrupts on, two calls, the HLT.
    assert_eq!(encoded.exit_counts(3).map(|c| c.total()), Some(4));
    // Six service calls of domain 3 above, this one the seventh.
    assert_eq!(info(&mut encoded, &mut env_e), (1 << 32) | 7);
}
