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
use serde::{Deserialize, Serialize};

/// The general registers of a vCPU (RSP, RIP and RFLAGS live in the VMCS and
/// travel in [`Exit`]).
///
/// On the wire the registers are one byte string of 120 bytes (each register
/// little-endian, in field order), not 15 varints: an exit message carries
/// them twice per exit, and copying beats varint coding on that hot path.
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

/// Bytes of [`GuestRegs`] on the wire.
pub const GUEST_REGS_BYTES: usize = 15 * 8;

impl GuestRegs {
    fn array(&self) -> [u64; 15] {
        [
            self.rax, self.rbx, self.rcx, self.rdx, self.rsi, self.rdi, self.rbp, self.r8, self.r9,
            self.r10, self.r11, self.r12, self.r13, self.r14, self.r15,
        ]
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; GUEST_REGS_BYTES] {
        let mut out = [0u8; GUEST_REGS_BYTES];
        for (chunk, r) in out.chunks_exact_mut(8).zip(self.array()) {
            chunk.copy_from_slice(&r.to_le_bytes());
        }
        out
    }

    /// Reads the wire form (`None` unless exactly [`GUEST_REGS_BYTES`] bytes).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != GUEST_REGS_BYTES {
            return None;
        }
        let r = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some(Self {
            rax: r(0),
            rbx: r(1),
            rcx: r(2),
            rdx: r(3),
            rsi: r(4),
            rdi: r(5),
            rbp: r(6),
            r8: r(7),
            r9: r(8),
            r10: r(9),
            r11: r(10),
            r12: r(11),
            r13: r(12),
            r14: r(13),
            r15: r(14),
        })
    }
}

impl Serialize for GuestRegs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for GuestRegs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = GuestRegs;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{GUEST_REGS_BYTES} bytes of registers")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<GuestRegs, E> {
                GuestRegs::from_bytes(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

impl MaxSize for GuestRegs {
    /// A one-byte length, then the bytes.
    const POSTCARD_MAX_SIZE: usize = 1 + GUEST_REGS_BYTES;
}

impl postcard_schema::Schema for GuestRegs {
    const SCHEMA: &'static postcard_schema::schema::NamedType =
        &postcard_schema::schema::NamedType {
            name: "GuestRegs",
            ty: &postcard_schema::schema::DataModelType::ByteArray,
        };
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
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ExitKind {
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    /// VMCALL: the arguments are in the registers.
    Hypercall,
    /// IN or OUT (string forms are refused by the kernel before they get here).
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
        value: u64,
    },
    /// An access the active view does not allow (or a gfn it does not map).
    EptViolation {
        gpa: u64,
        /// The guest-linear address, where the CPU reports one.
        gla: Option<u64>,
        access: AccessBits,
        /// What the EPT entry allowed.
        allowed: AccessBits,
        qualification: u64,
    },
    EptMisconfig {
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
        value: u64,
    },
    /// Anything else: the basic exit reason and qualification.
    Other {
        reason: u16,
        qualification: u64,
    },
}

/// One exit of one vCPU.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Exit {
    pub domain: u16,
    pub vcpu: u16,
    pub kind: ExitKind,
    pub rip: u64,
    pub instruction_len: u8,
    /// The vCPU's active view when it exited.
    pub view: u16,
}

/// An event to deliver to the guest on entry.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Inject {
    /// A hardware exception, with an error code for the vectors that have one.
    Exception { vector: u8, error_code: Option<u32> },
}

/// What happens to the vCPU after the handler.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Then {
    /// Enter the guest again.
    Resume,
    /// Wait for an event (HLT).
    Block,
    /// The domain ends with this status (the guest asked to, e.g. port 0xf4).
    Exit { status: u32 },
    /// The domain is stopped because of what this exit showed.
    Crash,
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

/// What the kernel sends a vCPU's exit handler: the exit and the vCPU's
/// general registers.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct ExitMessage {
    pub exit: Exit,
    pub regs: GuestRegs,
}

/// The handler's answer: how to resume, and the registers when it changed
/// them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct ExitReply {
    pub response: Response,
    pub regs: Option<GuestRegs>,
}

/// The exit interface: the kernel calls, the vmm (exits) and altp2m (EPT
/// violations) serve.
pub const VMEXIT: InterfaceId = InterfaceId::new::<(ExitMessage, ExitReply)>("parallax/vmexit");

crate::assert_fits!(ExitMessage, ExitReply);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn exit_messages_roundtrip_within_their_bound(r in proptest::array::uniform15(any::<u64>()), rip in any::<u64>()) {
            let regs = GuestRegs {
                rax: r[0], rbx: r[1], rcx: r[2], rdx: r[3], rsi: r[4], rdi: r[5], rbp: r[6], r8: r[7],
                r9: r[8], r10: r[9], r11: r[10], r12: r[11], r13: r[12], r14: r[13], r15: r[14],
            };
            let m = ExitMessage {
                exit: Exit { domain: 1, vcpu: 0, kind: ExitKind::Hypercall, rip, instruction_len: 3, view: 2 },
                regs,
            };
            let mut buf = [0u8; <ExitMessage as MaxSize>::POSTCARD_MAX_SIZE];
            let n = postcard::to_slice(&m, &mut buf).unwrap().len();
            prop_assert_eq!(postcard::from_bytes::<ExitMessage>(&buf[..n]).unwrap(), m);
        }

        #[test]
        fn registers_of_the_wrong_length_do_not_decode(len in 0usize..200) {
            prop_assume!(len != GUEST_REGS_BYTES);
            let mut buf = [0u8; 210];
            buf[0] = len as u8;
            if len >= 128 {
                return Ok(());
            }
            prop_assert!(postcard::from_bytes::<GuestRegs>(&buf[..1 + len]).is_err());
        }
    }
}
