//! The iommu interface: DMA mappings of client domains' memory for device
//! backends (IO-1..IO-6, docs/iommu.md).
//!
//! A backend (a driver or device-model service whose manifest table names
//! its devices and its `dma_clients`) asks to map a range of a client
//! domain's guest frames and gets bus frame numbers back, never host frames
//! (IO-1). Each mapped frame holds a reference until the unmap's IOTLB
//! invalidation has completed (IO-2, IO-3). Mappings are the caller's own,
//! named by its badge, and torn down when it or the domain dies (IO-4). The
//! admin endpoint changes a backend's client list at run time (IO-5).

use crate::ipc::{BoundedVec, InterfaceId};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// The most pages in one map or unmap request (one kernel batch).
pub const MAX_BATCH: u32 = 512;
/// Fault records in one [`IommuReply::Faults`].
pub const FAULTS_PER_REPLY: usize = 8;

/// A backend's request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum IommuRequest {
    /// Map guest frames `gfn .. gfn + count` (1 to [`MAX_BATCH`]) of client
    /// `domain` for the caller's devices, readable and (with `writable`)
    /// writable by them: [`IommuReply::Mapped`] with the first of `count`
    /// consecutive bus frames.
    Map {
        domain: u16,
        gfn: u64,
        count: u32,
        writable: bool,
    },
    /// Unmap bus frames `bfn .. bfn + count`, every one the caller's: once
    /// answered, the IOTLB no longer holds them (IO-3).
    Unmap { bfn: u64, count: u32 },
    /// The caller's mappings and the service's counters.
    Status,
    /// DMA faults the units recorded since the last call (IO-6), for the
    /// caller's devices (all of them for the admin endpoint).
    Faults,
}

/// An admin's request (the `iommu-admin` endpoint).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum IommuAdminRequest {
    /// Backend `backend` (a service, by name) may map domain `domain`'s
    /// memory from now on (IO-5).
    AddClient {
        backend: crate::supervisor::Name,
        domain: u16,
    },
    /// ... may no longer: its mappings of that domain are torn down first.
    RemoveClient {
        backend: crate::supervisor::Name,
        domain: u16,
    },
    /// Faults, as [`IommuRequest::Faults`], of every device.
    Faults,
}

/// One DMA fault (IO-6).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DmaFault {
    pub segment: u16,
    /// bus << 8 | device << 3 | function.
    pub source: u16,
    /// The page address the device named.
    pub address: u64,
    /// VT-d fault reason code.
    pub reason: u8,
    pub write: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum IommuReply {
    /// The first bus frame of the range mapped.
    Mapped {
        bfn: u64,
    },
    /// Pages unmapped, and the IOTLB invalidations that took (1: batched).
    Unmapped {
        pages: u32,
        invalidations: u32,
    },
    Status {
        /// The caller's mapped pages.
        mapped: u64,
        /// Its client domains.
        clients: BoundedVec<u16, { crate::manifest::MAX_DOMAINS }>,
        /// IOTLB invalidations since boot (the kernel's count).
        invalidations: u64,
    },
    Faults {
        faults: BoundedVec<DmaFault, FAULTS_PER_REPLY>,
        /// Faults the units could not record (overflow) since boot.
        lost: u64,
    },
    Done,
    Error(IommuError),
}

/// Why a request was refused. Nothing changed.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IommuError {
    /// The caller drives no device (its manifest table names none).
    NoDevice,
    /// The domain is not one of the caller's clients (IO-5).
    NotAClient { domain: u16 },
    /// A gfn of the range is not RAM of the domain.
    NotRam { gfn: u64 },
    /// A bus frame of the range is not mapped by the caller (IO-1: a forged
    /// or stale bus frame number).
    NotMapped { bfn: u64 },
    /// `count` is 0 or over [`MAX_BATCH`].
    BadCount { count: u32 },
    /// The caller would hold more than `limit` mapped pages.
    Quota { limit: u64 },
    /// No room in the bus address space for the range.
    NoBusSpace,
    /// No such backend (admin requests).
    NoSuchBackend,
    /// The kernel refused (its log says why).
    Kernel,
}

pub const IOMMU: InterfaceId = InterfaceId::new::<(IommuRequest, IommuReply)>("parallax/iommu");
pub const IOMMU_ADMIN: InterfaceId =
    InterfaceId::new::<(IommuAdminRequest, IommuReply)>("parallax/iommu-admin");

crate::assert_fits!(IommuRequest, IommuReply);
crate::assert_fits!(IommuAdminRequest, IommuReply);
