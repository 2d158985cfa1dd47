//! How a run of the hypervisor ends: the status the kernel reports in its last
//! wire record, writes to QEMU's exit port, and `cargo hv run` exits with.

use serde::{Deserialize, Serialize};

/// The outcome of a whole run. The numbers are the process exit status of
/// `cargo hv run` and the value written to QEMU's `isa-debug-exit` port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, postcard_schema::Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum HaltStatus {
    /// Everything the manifest asked for ran and ended well.
    Success = 0,
    /// A boot input is missing or malformed: a boot module, the manifest, the
    /// multiboot information.
    BadBootInput = 1,
    /// The kernel itself faulted (CPU exception or panic).
    KernelFault = 2,
    /// The machine lacks something the manifest needs (VMX, an IOMMU, memory).
    Unsupported = 3,
    /// A guest domain crashed or exited with a failure status.
    GuestFailed = 4,
    /// Nothing can run any more: every service waits and no interrupt can
    /// wake one (a deadlock between services, or a supervisor that died).
    Stuck = 5,
    /// A task service (one that runs to completion) ended with a nonzero
    /// code, or faulted.
    TaskFailed = 6,
}

impl HaltStatus {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Success,
            1 => Self::BadBootInput,
            2 => Self::KernelFault,
            3 => Self::Unsupported,
            4 => Self::GuestFailed,
            5 => Self::Stuck,
            6 => Self::TaskFailed,
            _ => return None,
        })
    }

    /// A few words for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::BadBootInput => "bad boot input",
            Self::KernelFault => "kernel fault",
            Self::Unsupported => "unsupported machine",
            Self::GuestFailed => "guest failed",
            Self::Stuck => "stuck",
            Self::TaskFailed => "task failed",
        }
    }
}
