//! The sharing interface: copy-on-write page sharing between domains
//! (SH-1..SH-4, docs/sharing.md), kept by the sharing service for its
//! clients (the host through the console, other services).
//!
//! A client **nominates** a page (a domain and a gfn) and gets a
//! **handle**: a number that names the page and its contents as they are
//! now. A handle stays good until the page stops mapping the frame it named
//! (a write broke the share, it was unshared, or it was the client of a
//! share); the next use of it is then refused (`StaleHandle`), as is a
//! number no nomination returned. **Share** makes the client page map the
//! source page's frame read-only, and frees the client's own frame: both
//! read the source's contents, and the first write to either gives the
//! writer a private copy (copy on write). **Unshare** gives a page its own
//! frame again. Clients never see a host-physical address.

use crate::ipc::{BoundedVec, InterfaceId};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// A request to the sharing service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum ShRequest {
    /// SH-1: a handle for page `gfn` of `domain` and its contents now (the
    /// same handle if it is nominated already and unchanged since).
    Nominate { domain: u16, gfn: u64 },
    /// SH-1: the client's page comes to map the source's frame, read-only
    /// (the client's own frame is freed, and its handle is used up).
    Share { source: u64, client: u64 },
    /// SH-1: page `gfn` of `domain` gets a frame of its own again.
    Unshare { domain: u16, gfn: u64 },
    /// What is shared now: [`ShReply::Status`].
    Status,
    /// Deduplication (issue 11, point 4): reads up to `pages` pages of
    /// `domains`, in order, from the position `from` (0: a new scan, which
    /// forgets what earlier scans saw), and shares every page whose
    /// contents equal a page seen before in this scan (nominated first, so
    /// that a page written meanwhile is never merged).
    /// [`ShReply::Scanned`].
    Scan {
        domains: BoundedVec<u16, MAX_SCAN_DOMAINS>,
        from: u64,
        pages: u32,
    },
}

/// Domains one scan covers at most.
pub const MAX_SCAN_DOMAINS: usize = 8;

/// The answer.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub enum ShReply {
    /// `Nominate`: the handle, and the references its frame has.
    Nominated {
        handle: u64,
        refs: u32,
        free: u64,
    },
    /// `Share`: the references of the source's frame now, and the frames
    /// free in the kernel's pool after the client's frame was freed.
    Shared {
        refs: u32,
        free: u64,
    },
    /// `Unshare`: the references left on the frame the page left (0: the
    /// page kept it, the last reference), and the frames free now.
    Unshared {
        refs: u32,
        free: u64,
    },
    Status(ShStatus),
    /// `Scan`: pages read and frames saved by this call, and where to go on
    /// from (`None`: the scan is complete).
    Scanned {
        pages: u32,
        saved: u32,
        next: Option<u64>,
    },
    Error(ShError),
}

/// What is shared (SH-4: counts of the service's records, which follow the
/// kernel's references exactly).
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
pub struct ShStatus {
    /// Handles that are good now.
    pub handles: u32,
    /// Shared frames (each with at least one reference).
    pub frames: u32,
    /// Pages (domain, gfn) that map a shared frame.
    pub pages: u32,
    /// Frames saved: pages less frames.
    pub saved: u32,
    /// Copy-on-write breaks since the service started.
    pub breaks: u64,
    /// Frames free in the kernel's pool at the last operation.
    pub free: u64,
}

/// Why a request was refused. Nothing changed.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ShError {
    /// No live domain has that id.
    NoSuchDomain,
    /// The gfn is not the domain's RAM.
    NotRam,
    /// The handle names nothing: never returned, used up, or its page
    /// changed since (a write, an unshare).
    StaleHandle,
    /// Source and client are the same page.
    SamePage,
    /// The client maps the source's frame already.
    AlreadyShared,
    /// SH-3: a view modifies the page (an access setting or a change_gfn
    /// from or to it): it cannot be shared.
    ModifiedInView { view: u16 },
    /// The page maps no shared frame.
    NotShared,
    /// The page cannot change frames now (services hold foreign mappings
    /// of the domain's RAM, it is the #VE information page, or the
    /// kernel's table of shared frames is full).
    Busy,
    /// No frame is free for a private copy.
    OutOfMemory,
    /// The service keeps at most `limit` handles.
    TooManyHandles { limit: u32 },
    /// The altp2m service (the owner of the EPT entries) refused in a way
    /// not named above, or could not be reached.
    Altp2m,
}

pub const SHARING: InterfaceId = InterfaceId::new::<(ShRequest, ShReply)>("parallax/sharing");

crate::assert_fits!(ShRequest, ShReply);
