//! VM exits as messages: what the kernel tells an exit handler, and what the
//! handler answers.
//!
//! The kernel decodes each exit it does not own into an [`Exit`] and hands it,
//! with the vCPU's general registers, to the domain's exit handler; the
//! handler answers with a [`Response`] that says how to resume. Nothing in
//! these types refers to kernel memory: they travel unchanged as IPC messages
//! when the handler runs in a service.

use crate::ipc::InterfaceId;
use postcard::experimental::max_size::MaxSize;
use postcard_schema::schema::{DataModelType, NamedType, NamedValue};
use serde::{Deserialize, Serialize};

/// The general registers of a vCPU, as the kernel saves them on an exit
/// (RSP, RIP and RFLAGS live in the VMCS). Not a message: exits carry
/// [`ExitRegs`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// The registers an exit passes values in and a handler may set: RAX,
/// RBX, RCX, RDX (CPUID, RDMSR/WRMSR, IN/OUT and the hypercall ABI use no
/// others). The vCPU's other registers are preserved across every exit.
///
/// Register values are full-width quantities (pointers, MSR halves, guest
/// garbage in the registers an exit does not use), so each travels as 8
/// little-endian bytes (postcard's `fixint::le`), not as a varint: 32
/// bytes in all, written and read without a loop on the exit path. The
/// schema says so (see the `Schema` impl below).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExitRegs {
    #[serde(with = "postcard::fixint::le")]
    pub rax: u64,
    #[serde(with = "postcard::fixint::le")]
    pub rbx: u64,
    #[serde(with = "postcard::fixint::le")]
    pub rcx: u64,
    #[serde(with = "postcard::fixint::le")]
    pub rdx: u64,
}

/// One fixed-width register on the wire, as the schema describes it.
type Word = [u8; 8];

/// A `postcard_schema::Schema` for struct `$t` whose fields travel as the
/// types given (for fields postcard encodes at fixed width through
/// `serde(with)`, which the derive cannot see).
macro_rules! fields_schema {
    ($t:ty, $name:literal, { $($field:literal: $ty:ty),* $(,)? }) => {
        impl postcard_schema::Schema for $t {
            const SCHEMA: &'static NamedType = &NamedType {
                name: $name,
                ty: &DataModelType::Struct(&[$(&NamedValue {
                    name: $field,
                    ty: <$ty as postcard_schema::Schema>::SCHEMA,
                }),*]),
            };
        }
    };
}

impl MaxSize for ExitRegs {
    const POSTCARD_MAX_SIZE: usize = 4 * 8;
}

// Written out because postcard-schema's derive does not see
// `serde(with)`: the fields are described as what travels, 8 bytes each.
fields_schema!(ExitRegs, "ExitRegs", {
    "rax": Word,
    "rbx": Word,
    "rcx": Word,
    "rdx": Word,
});

impl ExitRegs {
    /// The four of `g`.
    pub fn of(g: &GuestRegs) -> Self {
        Self {
            rax: g.rax,
            rbx: g.rbx,
            rcx: g.rcx,
            rdx: g.rdx,
        }
    }

    /// Writes the four into `g`.
    pub fn apply(&self, g: &mut GuestRegs) {
        (g.rax, g.rbx, g.rcx, g.rdx) = (self.rax, self.rbx, self.rcx, self.rdx);
    }
}

/// Kinds of memory access.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    MaxSize,
    postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AccessBits {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

/// Why the vCPU stopped.
///
/// Its 64-bit fields (addresses, qualifications, values written) travel
/// at fixed width, 8 little-endian bytes (postcard's `fixint::le`; `gla`
/// an option tag then 8 bytes), as the registers do: the kernel writes
/// them and the handlers read them without a varint loop (an address or
/// a guest-linear address is rarely below 2^21). The 16- and 32-bit fields
/// are varints. The schema and the bound describe what travels
/// ([`wire::ExitKind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(C, u8)]
pub enum ExitKind {
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    /// VMCALL: the arguments are in the registers.
    Hypercall,
    /// IN or OUT (string forms are refused by the kernel before they get here).
    /// `value` is what an OUT writes (RAX cut to `size` bytes); an IN's
    /// handler sets RAX (keeping the bits above `size` for 1- and 2-byte
    /// reads, as the CPU would).
    Io {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    Hlt,
    Rdmsr {
        msr: u32,
    },
    Wrmsr {
        msr: u32,
        #[serde(with = "postcard::fixint::le")]
        value: u64,
    },
    /// An access the active view does not allow (or a gfn it does not map).
    EptViolation {
        #[serde(with = "postcard::fixint::le")]
        gpa: u64,
        /// The guest-linear address, where the CPU reports one.
        #[serde(with = "fixed_option")]
        gla: Option<u64>,
        access: AccessBits,
        /// What the EPT entry allowed.
        allowed: AccessBits,
        #[serde(with = "postcard::fixint::le")]
        qualification: u64,
    },
    EptMisconfig {
        #[serde(with = "postcard::fixint::le")]
        gpa: u64,
    },
    TripleFault,
    /// VMFUNC with a leaf or EPTP index the CPU refused.
    Vmfunc {
        leaf: u32,
        index: u32,
    },
    Xsetbv {
        index: u32,
        #[serde(with = "postcard::fixint::le")]
        value: u64,
    },
    /// Anything else: the basic exit reason and qualification.
    Other {
        reason: u16,
        #[serde(with = "postcard::fixint::le")]
        qualification: u64,
    },
    /// The vCPU ran the one instruction its handler asked to step (a reply
    /// with `step`); sent to the endpoint that asked.
    MonitorTrap,
    /// The vCPU is about to run its first instruction (sent once, to its
    /// exit handler): whatever the handler keeps for the domain starts
    /// afresh (a domain id serves again once its domain is destroyed). The
    /// answer resumes without advancing.
    Start,
    /// A PML buffer filled up (sent to the endpoint `VcpuOp::PmlStart`
    /// named): the CPU now writes the other buffer, and this one (`buffer`,
    /// 0 or 1, `entries` GPAs) is the handler's to read before it answers.
    /// The answer resumes without advancing.
    PmlFull {
        buffer: u8,
        entries: u16,
    },
    /// The guest can take an external interrupt now (RFLAGS.IF set, no
    /// STI or MOV SS blocking): the exit its handler asked for with
    /// [`Then::ResumeUntil`]'s `window`. The answer resumes without
    /// advancing, typically injecting [`Inject::Interrupt`].
    InterruptWindow,
    /// The TSC reached the deadline its handler set ([`Then::ResumeUntil`],
    /// [`Then::BlockUntil`]): while the vCPU ran, or waited. The deadline
    /// is then cleared. The answer resumes without advancing.
    Deadline,
    /// The guest wrote its local APIC's xAPIC page (APIC virtualization:
    /// an APIC-write exit, trap-like: the write is done and RIP is past
    /// it, so the answer resumes without advancing). `offset` in the page;
    /// `value` the 32 bits written, and for the ICR's low half (0x300) the
    /// high half (0x310) above them. The handler keeps what the guest
    /// reads there current (`VcpuOp::ApicSet`).
    ApicWrite {
        offset: u16,
        #[serde(with = "postcard::fixint::le")]
        value: u64,
    },
}

/// `Option<u64>` at fixed width: postcard's option tag, then (for
/// `Some`) 8 little-endian bytes.
mod fixed_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        v.map(u64::to_le_bytes).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<[u8; 8]>::deserialize(d)?.map(u64::from_le_bytes))
    }
}

/// What travels for an [`ExitKind`]: the same variants and fields, the
/// fixed-width ones as their bytes. It gives `ExitKind` its schema and
/// bound (the derives cannot see `serde(with)`); a test checks that both
/// encode alike.
pub mod wire {
    use super::{AccessBits, Word};
    use postcard::experimental::max_size::MaxSize;
    use serde::Serialize;

    #[derive(Serialize, MaxSize, postcard_schema::Schema)]
    pub enum ExitKind {
        Cpuid {
            leaf: u32,
            subleaf: u32,
        },
        Hypercall,
        Io {
            port: u16,
            size: u8,
            write: bool,
            value: u32,
        },
        Hlt,
        Rdmsr {
            msr: u32,
        },
        Wrmsr {
            msr: u32,
            value: Word,
        },
        EptViolation {
            gpa: Word,
            gla: Option<Word>,
            access: AccessBits,
            allowed: AccessBits,
            qualification: Word,
        },
        EptMisconfig {
            gpa: Word,
        },
        TripleFault,
        Vmfunc {
            leaf: u32,
            index: u32,
        },
        Xsetbv {
            index: u32,
            value: Word,
        },
        Other {
            reason: u16,
            qualification: Word,
        },
        MonitorTrap,
        Start,
        PmlFull {
            buffer: u8,
            entries: u16,
        },
        InterruptWindow,
        Deadline,
        ApicWrite {
            offset: u16,
            value: Word,
        },
    }
}

impl MaxSize for ExitKind {
    const POSTCARD_MAX_SIZE: usize = <wire::ExitKind as MaxSize>::POSTCARD_MAX_SIZE;
}

impl postcard_schema::Schema for ExitKind {
    const SCHEMA: &'static NamedType = <wire::ExitKind as postcard_schema::Schema>::SCHEMA;
}

/// One exit of one vCPU.
///
/// The fixed-size fields come first and travel at fixed width (postcard's
/// `fixint::le`): with the registers before them ([`ExitMessage`]), the
/// first [`EXIT_FIXED`] bytes of every exit message are at fixed offsets,
/// written and read with one length check; the kind follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Exit {
    #[serde(with = "postcard::fixint::le")]
    pub domain: u16,
    #[serde(with = "postcard::fixint::le")]
    pub vcpu: u16,
    /// The vCPU's active view when it exited.
    #[serde(with = "postcard::fixint::le")]
    pub view: u16,
    pub instruction_len: u8,
    #[serde(with = "postcard::fixint::le")]
    pub rip: u64,
    pub kind: ExitKind,
}

/// The bytes of an exit message before the kind: the registers, domain,
/// vCPU, view, instruction length and RIP.
pub const EXIT_FIXED: usize = 32 + 2 + 2 + 2 + 1 + 8;

// Written out for the same reason as `ExitRegs`'s: the fixed-width fields
// are described as what travels.
fields_schema!(Exit, "Exit", {
    "domain": [u8; 2],
    "vcpu": [u8; 2],
    "view": [u8; 2],
    "instruction_len": u8,
    "rip": Word,
    "kind": ExitKind,
});

/// An event to deliver to the guest on entry.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Inject {
    /// A hardware exception, with an error code for the vectors that have one.
    Exception { vector: u8, error_code: Option<u32> },
    /// An external interrupt (vectors 32-255), as an interrupt controller
    /// would deliver it: only when the guest can take one (the answer to
    /// an [`ExitKind::InterruptWindow`]); otherwise the kernel stops the
    /// domain, naming the vector, rather than fail the VM entry.
    Interrupt { vector: u8 },
}

/// What happens to the vCPU after the handler.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Then {
    /// Enter the guest again.
    Resume,
    /// A HLT with nothing that could wake it: the domain is stopped, saying
    /// so (a wait that something ends is [`Then::BlockUntil`]).
    Block,
    /// The domain ends with this status (the guest asked to, e.g. port 0xf4).
    Exit { status: u32 },
    /// The domain is stopped because of what this exit showed.
    Crash,
    /// Enter the guest again; then exit to the handler as soon as the guest
    /// can take an external interrupt (`window`: an
    /// [`ExitKind::InterruptWindow`]) and once the TSC reaches `deadline`
    /// ([`ExitKind::Deadline`]; `u64::MAX`: never). The deadline stays until
    /// another answer changes it (a plain `Resume` keeps it).
    ResumeUntil { window: bool, deadline: u64 },
    /// Wait (HLT) without running until the TSC reaches `deadline`: then an
    /// [`ExitKind::Deadline`]. Other vCPUs and services run meanwhile.
    BlockUntil { deadline: u64 },
}

/// The handler's answer.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Response {
    /// Move RIP past the exiting instruction.
    pub advance: bool,
    pub inject: Option<Inject>,
    pub then: Then,
}

impl Response {
    /// Skip the instruction and go on.
    pub const DONE: Response = Response {
        advance: true,
        inject: None,
        then: Then::Resume,
    };
    /// Retry the instruction (after fixing its cause).
    pub const RETRY: Response = Response {
        advance: false,
        inject: None,
        then: Then::Resume,
    };
    pub const CRASH: Response = Response {
        advance: false,
        inject: None,
        then: Then::Crash,
    };

    pub fn inject(vector: u8, error_code: Option<u32>) -> Response {
        Response {
            advance: false,
            inject: Some(Inject::Exception { vector, error_code }),
            then: Then::Resume,
        }
    }
}

/// What the kernel sends a vCPU's exit handler: the vCPU's general
/// registers and the exit (in this order: see [`Exit`]). Its `Default` is a
/// placeholder to decode into.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct ExitMessage {
    pub regs: ExitRegs,
    pub exit: Exit,
}

impl Default for ExitMessage {
    fn default() -> Self {
        ExitMessage {
            regs: ExitRegs::default(),
            exit: Exit {
                domain: 0,
                vcpu: 0,
                view: 0,
                instruction_len: 0,
                rip: 0,
                kind: ExitKind::Hlt,
            },
        }
    }
}

/// The handler's answer: how to resume, the registers when it changed
/// them, and the view to resume in when it changes it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct ExitReply {
    pub response: Response,
    pub regs: Option<ExitRegs>,
    /// Resume in this view (an existing view of the domain).
    pub view: Option<u16>,
    /// Stop again after one instruction ([`ExitKind::MonitorTrap`]).
    pub step: bool,
    /// Resume at this RIP (applied after `response.advance`).
    pub rip: Option<u64>,
}

impl ExitReply {
    /// The answer `response`, resuming in `view` if one is given: no
    /// registers, step or RIP.
    pub const fn resume(response: Response, view: Option<u16>) -> Self {
        ExitReply {
            response,
            regs: None,
            view,
            step: false,
            rip: None,
        }
    }
}

/// The exit interface: the kernel calls, the vmm (exits) and altp2m (EPT
/// violations) serve.
pub const VMEXIT: InterfaceId = InterfaceId::new::<(ExitMessage, ExitReply)>("parallax/vmexit");

crate::assert_fits!(ExitMessage, ExitReply);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The wire description of `k`.
    fn to_wire(k: ExitKind) -> wire::ExitKind {
        use wire::ExitKind as W;
        let b = u64::to_le_bytes;
        match k {
            ExitKind::Cpuid { leaf, subleaf } => W::Cpuid { leaf, subleaf },
            ExitKind::Hypercall => W::Hypercall,
            ExitKind::Io {
                port,
                size,
                write,
                value,
            } => W::Io {
                port,
                size,
                write,
                value,
            },
            ExitKind::Hlt => W::Hlt,
            ExitKind::Rdmsr { msr } => W::Rdmsr { msr },
            ExitKind::Wrmsr { msr, value } => W::Wrmsr {
                msr,
                value: b(value),
            },
            ExitKind::EptViolation {
                gpa,
                gla,
                access,
                allowed,
                qualification,
            } => W::EptViolation {
                gpa: b(gpa),
                gla: gla.map(b),
                access,
                allowed,
                qualification: b(qualification),
            },
            ExitKind::EptMisconfig { gpa } => W::EptMisconfig { gpa: b(gpa) },
            ExitKind::TripleFault => W::TripleFault,
            ExitKind::Vmfunc { leaf, index } => W::Vmfunc { leaf, index },
            ExitKind::Xsetbv { index, value } => W::Xsetbv {
                index,
                value: b(value),
            },
            ExitKind::Other {
                reason,
                qualification,
            } => W::Other {
                reason,
                qualification: b(qualification),
            },
            ExitKind::MonitorTrap => W::MonitorTrap,
            ExitKind::Start => W::Start,
            ExitKind::PmlFull { buffer, entries } => W::PmlFull { buffer, entries },
            ExitKind::InterruptWindow => W::InterruptWindow,
            ExitKind::Deadline => W::Deadline,
            ExitKind::ApicWrite { offset, value } => W::ApicWrite {
                offset,
                value: b(value),
            },
        }
    }

    #[test]
    fn an_ept_violation_carries_its_addresses_at_fixed_width() {
        let k = ExitKind::EptViolation {
            gpa: 0x1000,
            gla: Some(0xffff_8000_0000_1000),
            access: AccessBits::default(),
            allowed: AccessBits::default(),
            qualification: 0x182,
        };
        let mut buf = [0u8; 64];
        let n = postcard::to_slice(&k, &mut buf).unwrap().len();
        // Tag, gpa (8), Some (1) and gla (8), 3 + 3 access bits, qualification (8).
        assert_eq!(n, 1 + 8 + 1 + 8 + 6 + 8);
        assert_eq!(&buf[1..9], &0x1000u64.to_le_bytes());
        assert_eq!(&buf[n - 8..n], &0x182u64.to_le_bytes());
    }

    proptest! {
        /// The schema and bound (of [`wire::ExitKind`]) describe the bytes
        /// an `ExitKind` is: both encode alike, within the bound.
        #[test]
        fn an_exit_kind_is_its_wire_description(k in crate::exitcodec::tests::kind()) {
            let mut a = [0u8; 64];
            let mut b = [0u8; 64];
            let x = postcard::to_slice(&k, &mut a).unwrap();
            let y = postcard::to_slice(&to_wire(k), &mut b).unwrap();
            prop_assert_eq!(&*x, &*y);
            prop_assert!(x.len() <= <ExitKind as MaxSize>::POSTCARD_MAX_SIZE);
        }

        #[test]
        fn exit_messages_roundtrip_within_their_bound(
            r in proptest::array::uniform4(any::<u64>()),
            rip in any::<u64>(),
            view in any::<Option<u16>>(),
        ) {
            let regs = ExitRegs { rax: r[0], rbx: r[1], rcx: r[2], rdx: r[3] };
            let m = ExitMessage {
                exit: Exit { domain: 1, vcpu: 0, kind: ExitKind::Hypercall, rip, instruction_len: 3, view: 2 },
                regs,
            };
            let mut buf = [0u8; <ExitMessage as MaxSize>::POSTCARD_MAX_SIZE];
            let n = postcard::to_slice(&m, &mut buf).unwrap().len();
            prop_assert_eq!(postcard::from_bytes::<ExitMessage>(&buf[..n]).unwrap(), m);
            let reply = ExitReply { response: Response::DONE, regs: Some(regs), view, step: true, rip: Some(rip) };
            let mut buf = [0u8; <ExitReply as MaxSize>::POSTCARD_MAX_SIZE];
            let n = postcard::to_slice(&reply, &mut buf).unwrap().len();
            prop_assert_eq!(postcard::from_bytes::<ExitReply>(&buf[..n]).unwrap(), reply);
        }
    }
}
