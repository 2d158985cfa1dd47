//! The introspect interface: guest memory and vCPU state for agents on the
//! host (through the console) and for services (issue 13; docs/introspection.md).
//!
//! Memory is addressed guest-physically, or guest-virtually through the
//! guest's own page tables (the vCPU's CR3 and paging mode, or a CR3 the
//! caller names); reads and writes move at most [`CHUNK`] bytes a request,
//! and never cross a page of a guest-virtual address (each page is
//! translated on its own). Registers are read in two halves and set on a
//! paused domain; a value VM entry would refuse is refused naming the
//! register and the rule, the vCPU unchanged.

use crate::ipc::{BoundedVec, InterfaceId};
use crate::syscall::regs;
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// The most bytes one read or write moves.
pub const CHUNK: usize = 192;

/// Registers per [`IntroReply::Regs`] (half of `regs::COUNT`).
pub const REGS_PER_REPLY: usize = regs::COUNT / 2;

/// The most registers one [`IntroRequest::SetRegs`] sets.
pub const MAX_SET: usize = 8;

/// Where a read or write goes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Address {
    /// Guest-physical.
    Physical(u64),
    /// Guest-virtual, through the guest's page tables: those of `cr3`
    /// (`None`: the vCPU's CR3), in the vCPU's paging mode.
    Virtual {
        vcpu: u16,
        cr3: Option<u64>,
        gva: u64,
    },
}

impl Address {
    /// The address `by` bytes further on (`None` where it wraps).
    pub fn offset(self, by: u64) -> Option<Address> {
        Some(match self {
            Address::Physical(gpa) => Address::Physical(gpa.checked_add(by)?),
            Address::Virtual { vcpu, cr3, gva } => Address::Virtual {
                vcpu,
                cr3,
                gva: gva.checked_add(by)?,
            },
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum IntroRequest {
    /// `len` (at most [`CHUNK`]) bytes: [`IntroReply::Bytes`].
    Read { domain: u16, at: Address, len: u16 },
    /// Writes `bytes`: [`IntroReply::Done`].
    Write {
        domain: u16,
        at: Address,
        bytes: BoundedVec<u8, CHUNK>,
    },
    /// Where a guest-virtual address leads: [`IntroReply::Translated`].
    Translate {
        domain: u16,
        vcpu: u16,
        cr3: Option<u64>,
        gva: u64,
    },
    /// Registers `half * 16 ..` (half 0 or 1) in `regs` order:
    /// [`IntroReply::Regs`].
    Regs { domain: u16, vcpu: u16, half: u8 },
    /// Sets (register index, value) pairs at once (the domain paused):
    /// [`IntroReply::Done`].
    SetRegs {
        domain: u16,
        vcpu: u16,
        values: BoundedVec<(u8, u64), MAX_SET>,
    },
}

/// A translation's outcome.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Translation {
    pub gpa: u64,
    /// 4 KiB, 2 MiB, 4 MiB or 1 GiB.
    pub page_size: u64,
    pub writable: bool,
    pub user: bool,
    pub executable: bool,
    /// The CR3 walked.
    pub cr3: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum IntroReply {
    Bytes(BoundedVec<u8, CHUNK>),
    Done,
    Translated(Translation),
    Regs {
        first: u8,
        values: [u64; REGS_PER_REPLY],
    },
    Refused(IntroError),
}

/// Why a request was refused.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IntroError {
    /// No domain has that id (or it has no such vCPU).
    NoSuchDomain,
    NoSuchVcpu,
    /// The span is not all guest RAM.
    OutsideRam {
        gpa: u64,
    },
    /// More than [`CHUNK`] bytes, a span that wraps, or one that crosses a
    /// page of a guest-virtual address.
    BadLength,
    /// A page-table entry on the way is not present.
    NotPresent {
        level: u8,
        entry_gpa: u64,
        entry: u64,
    },
    /// A page-table entry has a reserved bit set.
    Reserved {
        level: u8,
        entry_gpa: u64,
        entry: u64,
    },
    /// The guest-virtual address is not canonical, or above 4 GiB for a
    /// 32-bit guest.
    BadAddress {
        gva: u64,
    },
    /// A page table lies outside guest RAM (a CR3 pointing at garbage).
    TableOutsideRam {
        gpa: u64,
    },
    /// Registers are set on a paused domain only.
    NotPaused,
    /// VM entry would refuse this register's value (`regs` index); nothing
    /// was set.
    BadRegister {
        index: u8,
    },
    /// A register index past `regs::COUNT`, or one that is read only.
    NoSuchRegister {
        index: u8,
    },
    /// The caller may not do this to that domain.
    NotAllowed,
    /// The kernel refused for another reason (the `SysError` number).
    Kernel {
        error: u8,
    },
    /// The domain is protected (the manifest's `protected`) and running:
    /// its memory is mapped only while it is paused (FM-2).
    ProtectedRunning,
    /// The domain has ended (exited or crashed, not yet destroyed): it may
    /// be read, not written, nor its registers set.
    Ended,
}

pub const INTROSPECT: InterfaceId =
    InterfaceId::new::<(IntroRequest, IntroReply)>("parallax/introspect");

crate::assert_fits!(IntroRequest, IntroReply);

impl core::fmt::Display for IntroError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            IntroError::NoSuchDomain => write!(f, "no such domain"),
            IntroError::NoSuchVcpu => write!(f, "no such vCPU"),
            IntroError::OutsideRam { gpa } => write!(f, "guest-physical {gpa:#x} is not guest RAM"),
            IntroError::BadLength => write!(
                f,
                "bad length: at most {CHUNK} bytes, not wrapping, within one page of a virtual address"
            ),
            IntroError::NotPresent {
                level,
                entry_gpa,
                entry,
            } => write!(
                f,
                "not present: the level-{level} entry at guest-physical {entry_gpa:#x} is {entry:#x}"
            ),
            IntroError::Reserved {
                level,
                entry_gpa,
                entry,
            } => write!(
                f,
                "reserved bits set in the level-{level} entry at guest-physical {entry_gpa:#x} ({entry:#x})"
            ),
            IntroError::BadAddress { gva } => write!(
                f,
                "guest-virtual {gva:#x} is not canonical (or above 4 GiB for a 32-bit guest)"
            ),
            IntroError::TableOutsideRam { gpa } => write!(
                f,
                "a page table at guest-physical {gpa:#x} is outside guest RAM (CR3 points at garbage?)"
            ),
            IntroError::NotPaused => write!(f, "the domain must be paused to set registers"),
            IntroError::Ended => write!(
                f,
                "the domain has ended: its memory and registers may be read, not written"
            ),
            IntroError::BadRegister { index } => write!(
                f,
                "VM entry would refuse that value of {}; nothing was set",
                regs::NAMES.get(usize::from(index)).unwrap_or(&"?")
            ),
            IntroError::NoSuchRegister { index } => {
                write!(f, "register {index} does not exist or is read only")
            }
            IntroError::NotAllowed => write!(f, "not allowed for this caller and domain"),
            IntroError::Kernel { error } => write!(f, "the kernel refused (error {error})"),
            IntroError::ProtectedRunning => write!(
                f,
                "the domain is protected: its memory is reached only while it is paused"
            ),
        }
    }
}
