//! The lifecycle interface: what the supervisor asks every service, for
//! swaps and fault tests. Every service's runtime serves it.
//!
//! A swap moves a service's state to its successor as a postcard snapshot of
//! the service's own state type, in chunks: the supervisor asks the old
//! instance for `Snapshot { offset }` until `more` is false, then hands the
//! bytes to the new instance with `Restore` chunks, then `Resume`.

use crate::ipc::{BoundedVec, InterfaceId};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// Bytes of state per chunk.
pub const CHUNK: usize = 192;

/// The most bytes a snapshot may have (the runtime's and the supervisor's
/// buffers).
pub const SNAPSHOT_MAX: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum LifecycleRequest {
    /// The version and build of the running service.
    Identify,
    /// Stop serving other callers and give the snapshot from `offset` on.
    Snapshot { offset: u32 },
    /// Part of a predecessor's snapshot (the whole has `total` bytes).
    Restore {
        offset: u32,
        total: u32,
        bytes: BoundedVec<u8, CHUNK>,
    },
    /// Start serving with the restored state.
    Resume,
    /// Touch an unmapped address (fault-injection tests).
    Fault,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum LifecycleReply {
    Identity {
        version: u32,
    },
    Chunk {
        total: u32,
        bytes: BoundedVec<u8, CHUNK>,
        more: bool,
    },
    Done,
    /// The snapshot does not decode as this version's state.
    RestoreFailed,
    /// The running instance's state does not fit [`SNAPSHOT_MAX`]: no
    /// swap, and it serves on.
    TooLarge,
}

pub const LIFECYCLE: InterfaceId =
    InterfaceId::new::<(LifecycleRequest, LifecycleReply)>("parallax/lifecycle");

crate::assert_fits!(LifecycleRequest, LifecycleReply);
