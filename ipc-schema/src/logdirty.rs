//! The logdirty interface: dirty-page logs of a domain's RAM, kept by the
//! logdirty service for its clients (LD-1..LD-5, docs/logdirty.md).
//!
//! A client (a service, the host through the console, an in-guest agent
//! through the vmm) starts a log over a domain's RAM or a range of it, and
//! reads it with peek or read-and-clear. Each log is the client's own: a
//! read by one never takes bits from another. A log is named by the
//! caller's badge (which service is calling) and a number the caller
//! chooses (`log`), so one service can keep several (the console keeps one
//! per host name).

use crate::ipc::{BoundedVec, InterfaceId};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// `count` guest frames from `gfn`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GfnRange {
    pub gfn: u64,
    pub count: u64,
}

impl GfnRange {
    /// One past the last gfn (`None` if it wraps).
    pub fn end(&self) -> Option<u64> {
        self.gfn.checked_add(self.count)
    }
}

/// How a client wants its log kept (LD-2).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DirtyMode {
    /// PML where the CPU has it, else write-protection.
    Auto,
    /// Page-modification logging (refused without it).
    Pml,
    /// Write-protection faults (any CPU with EPT).
    WriteProtect,
}

/// The mechanism a log runs on.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Mechanism {
    Pml,
    WriteProtect,
}

/// Ranges per [`LdReply::Dirty`].
pub const RANGES_PER_REPLY: usize = 8;

/// A request to the logdirty service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum LdRequest {
    /// Starts the caller's log `log` of `domain` over `range` (`None`: all
    /// of its RAM), empty.
    Start {
        domain: u16,
        log: u32,
        range: Option<GfnRange>,
        mode: DirtyMode,
    },
    /// The dirty ranges of the log at or after gfn `from`, lowest first, at
    /// most [`RANGES_PER_REPLY`]; with `clear` the ranges returned are
    /// cleared (the next write to each is logged again).
    Read {
        domain: u16,
        log: u32,
        from: u64,
        clear: bool,
    },
    /// Ends the log.
    Stop { domain: u16, log: u32 },
    /// What the log is: [`LdReply::Status`].
    Status { domain: u16, log: u32 },
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum LdReply {
    Started {
        mechanism: Mechanism,
        range: GfnRange,
    },
    /// Dirty ranges; `next`: the gfn to read from for more (`None`: none
    /// left after these).
    Dirty {
        ranges: BoundedVec<GfnRange, RANGES_PER_REPLY>,
        next: Option<u64>,
    },
    Status {
        mechanism: Mechanism,
        range: GfnRange,
        /// Pages set in the log now.
        dirty: u64,
    },
    Done,
    Error(LdError),
}

/// Why a request was refused. Nothing changed.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LdError {
    /// No domain has that id (or it has ended).
    NoSuchDomain,
    /// The range is empty, wraps, or reaches past the domain's RAM
    /// (`pages` of it).
    BadRange { pages: u64 },
    /// Another log covers part of the range with the other mechanism.
    ModeConflict { held: Mechanism },
    /// The caller has no such log (never started, or stopped).
    NotLogging,
    /// The caller already has a log by that number on the domain.
    AlreadyLogging,
    /// PML was asked for and the CPU lacks it.
    PmlUnsupported,
    /// The service keeps at most `limit` logs per domain.
    TooManyLogs { limit: u32 },
    /// The service is out of memory for the log's bitmap.
    OutOfMemory,
    /// The altp2m service (the owner of the EPT entries) refused or could
    /// not be reached.
    Altp2m,
    /// The kernel refused a PML or write-log control (the domain ended?).
    Kernel,
}

pub const LOGDIRTY: InterfaceId = InterfaceId::new::<(LdRequest, LdReply)>("parallax/logdirty");

crate::assert_fits!(LdRequest, LdReply);
