//! The hypercall ABI: how a guest asks Parallax for something.
//!
//! A guest executes `VMCALL` with the call number in RAX. Fast calls take
//! their arguments in registers; every other operation is a [`Request`]
//! written, postcard-encoded, into a page of the guest's own memory and
//! named by [`HC_CALL`]. The answer comes back the same way.
//!
//! | call | RAX | arguments | returns |
//! |---|---|---|---|
//! | [`HC_NULL`] | 0 | — | RAX = 0 |
//! | [`HC_EXIT_COUNT`] | 1 | — | RAX = 0, RBX = VM exits of this vCPU so far |
//! | [`HC_VIEW_SWITCH`] | 2 | RBX = view | RAX = status |
//! | [`HC_SERVICE_NULL`] | 3 | — | RAX = 0 (answered by the vmm service: an exit, an IPC and a reply) |
//! | [`HC_IPC_PING`] | 4 | — | RAX = 0, RBX = TSC ticks of one IPC round trip between two services, measured by the vmm |
//! | [`HC_SERVICE_INFO`] | 5 | — | RAX = 0, RBX = the vmm's version (bits 63-32) and the service calls (3 and 5) it answered for this domain so far, this one included (bits 31-0; counted across swaps, reset by a restart) |
//! | [`HC_CALL`] | 16 | RBX = GPA of the request, RCX = its length | RAX = status, RBX = reply length; the [`Reply`] overwrites the request |
//!
//! The registers are the 64-bit ones; a 32-bit guest uses their low halves
//! (EAX, EBX, ECX). Every register other than RAX and RBX is preserved.
//! Statuses are [`Status`] codes: a request that decoded but was refused
//! answers [`Status::Refused`] with a [`Reply::Error`] naming why. A request
//! page must lie inside the guest's RAM and within one 4 KiB page; requests
//! longer than [`MAX_REQUEST`] are refused.
//!
//! [`HC_EXIT_COUNT`] counts the exits the vCPU caused itself (instructions,
//! faults); exits for the hypervisor's own reasons (the preemption timer,
//! host interrupts) are not counted, so a guest can check that an operation
//! caused no exit. [`HC_VIEW_SWITCH`] switches to any existing view;
//! visibility ([`Request::ViewSetVisible`]) governs VMFUNC only. Reading the
//! dirty log re-arms the pages read, so writes after a read are logged again
//! (including the guest's own writes while it reads).

use crate::ipc::BoundedVec;
pub use crate::logdirty::{DirtyMode, GfnRange, LdError, Mechanism};
use postcard::experimental::max_size::MaxSize;
use postcard_schema::{Schema, key::Key};
use serde::{Deserialize, Serialize};

pub const HC_NULL: u64 = 0;
pub const HC_EXIT_COUNT: u64 = 1;
pub const HC_VIEW_SWITCH: u64 = 2;
pub const HC_SERVICE_NULL: u64 = 3;
pub const HC_IPC_PING: u64 = 4;
pub const HC_SERVICE_INFO: u64 = 5;
pub const HC_CALL: u64 = 16;

/// The longest encoded request or reply (one page minus headroom).
pub const MAX_REQUEST: usize = 2048;
/// The most ranges one [`Reply::Dirty`] carries (so that a reply fits one
/// IPC message).
pub const MAX_DIRTY: usize = crate::logdirty::RANGES_PER_REPLY;
/// The most views a domain has: view 0 plus 511 alternates (the EPTP list
/// holds 512 entries).
pub const MAX_VIEWS: u16 = 512;

/// The status a hypercall returns in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u64)]
pub enum Status {
    Ok = 0,
    /// No such call number.
    UnknownCall = 1,
    /// The request page is outside the guest's RAM or crosses a page.
    BadAddress = 2,
    /// The request does not decode, or is too long.
    Malformed = 3,
    /// The request was understood and refused: the [`Reply::Error`] says why.
    Refused = 4,
    /// The reply does not fit the guest's buffer.
    ReplyTooLong = 5,
    /// A hypercall from guest user mode (CPL > 0): only the guest's kernel
    /// may make them (the kernel refuses it without a message).
    NotPermitted = 6,
}

impl Status {
    pub fn from_raw(v: u64) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::UnknownCall,
            2 => Self::BadAddress,
            3 => Self::Malformed,
            4 => Self::Refused,
            5 => Self::ReplyTooLong,
            6 => Self::NotPermitted,
            _ => return None,
        })
    }
}

/// Access rights of a guest page in a view (EPT read, write, execute).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

impl Access {
    pub const NONE: Access = Access {
        read: false,
        write: false,
        execute: false,
    };
    pub const R: Access = Access {
        read: true,
        write: false,
        execute: false,
    };
    pub const RW: Access = Access {
        read: true,
        write: true,
        execute: false,
    };
    pub const RX: Access = Access {
        read: true,
        write: false,
        execute: true,
    };
    pub const RWX: Access = Access {
        read: true,
        write: true,
        execute: true,
    };
}

/// The most gfns in one list operation (so that a request, wrapped for the
/// altp2m service, fits one IPC message).
pub const MAX_LIST: usize = 16;

/// The altp2m mode of a domain (ALT-3): who may use its views.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Mode {
    /// No alternate views: every view operation is refused, VMFUNC reaches
    /// nothing and the vCPU runs in view 0.
    Disabled,
    /// The in-guest agent and external agents both.
    Mixed,
    /// External agents only; the guest may still switch with VMFUNC to the
    /// views they make visible.
    External,
    /// The guest may only switch views with VMFUNC (to visible views); it
    /// changes nothing, not even by hypercall.
    Limited,
}

/// An operation on a domain's views, from the in-guest agent through
/// [`HC_CALL`] or from an external agent through the altp2m service.
/// View 0 is the host p2m.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
pub enum Request {
    /// What this CPU and hypervisor offer.
    Capabilities,
    /// The domain's altp2m mode: [`Reply::Mode`].
    GetMode,
    /// Creates an alternate view that starts as the host p2m (filled lazily
    /// on first access), its pages given `default_access` (as the host p2m
    /// allows, never more) or the host p2m's own. Replies [`Reply::View`].
    ViewCreate {
        default_access: Option<Access>,
    },
    /// Destroys an alternate view; refused while a vCPU uses it.
    ViewDestroy {
        view: u16,
    },
    /// Whether VMFUNC may switch to `view` (its slot in the EPTP list).
    ViewSetVisible {
        view: u16,
        visible: bool,
    },
    /// Makes `view` the calling vCPU's view (an external agent: vCPU 0's).
    ViewSwitch {
        view: u16,
    },
    /// Makes `view` the view of every vCPU of the domain.
    ViewSwitchAll {
        view: u16,
    },
    /// The calling vCPU's view: [`Reply::View`].
    ViewCurrent,
    /// In `view`, makes `gfn` map the frame behind `to` in the host p2m;
    /// `to: None` restores the host mapping.
    ChangeGfn {
        view: u16,
        gfn: u64,
        to: Option<u64>,
    },
    /// Sets the access of `gfn` in `view`.
    SetAccess {
        view: u16,
        gfn: u64,
        access: Access,
    },
    /// Sets the access of `count` gfns from `gfn` in `view`, touching large
    /// pages whole where the range covers them.
    SetAccessRange {
        view: u16,
        gfn: u64,
        count: u64,
        access: Access,
    },
    /// Sets the access of each gfn of `gfns` in `view`.
    SetAccessList {
        view: u16,
        gfns: BoundedVec<u64, MAX_LIST>,
        access: Access,
    },
    /// The access of `gfn` in `view` as the guest gets it: [`Reply::Access`].
    GetAccess {
        view: u16,
        gfn: u64,
    },
    /// What `view` holds for `gfn`: the effective entry (the host p2m's with
    /// the view's own settings applied) or, with `raw`, the entry the view's
    /// table holds now ([`Reply::Entry`]).
    GetEntry {
        view: u16,
        gfn: u64,
        raw: bool,
    },
    /// Sets the suppress-#VE bit of `gfn` in `view`.
    SetSuppressVe {
        view: u16,
        gfn: u64,
        suppress: bool,
    },
    /// Sets the suppress-#VE bit of each gfn of `gfns` in `view`.
    SetSuppressVeList {
        view: u16,
        gfns: BoundedVec<u64, MAX_LIST>,
        suppress: bool,
    },
    /// The suppress-#VE bit of `gfn` in `view` as the CPU will see it:
    /// [`Reply::SuppressVe`].
    GetSuppressVe {
        view: u16,
        gfn: u64,
    },
    /// Enables #VE for this vCPU with its information area at `info_gfn`.
    VeEnable {
        info_gfn: u64,
    },
    VeDisable,
    /// Starts the agent's dirty-page log of its domain (the logdirty
    /// service's, docs/logdirty.md) over `range` (`None`: all RAM):
    /// [`Reply::DirtyStarted`].
    DirtyLogStart {
        range: Option<GfnRange>,
        mode: DirtyMode,
    },
    /// The logged ranges at or after gfn `from`, lowest first; with `clear`
    /// they are cleared: [`Reply::Dirty`].
    DirtyLogRead {
        from: u64,
        clear: bool,
    },
    DirtyLogStop,
    /// Sets `gfn` in `view` to an access that relaxes itself at its first
    /// violation, as Xen's `rx2rw` and `n2rwx` ([`Relaxing`]). A later
    /// setting of the gfn replaces it; [`Request::GetAccess`] shows the
    /// access it has now.
    SetAccessRelaxing {
        view: u16,
        gfn: u64,
        relaxing: Relaxing,
    },
    /// Grants `count` (1 to 512) pages of this domain's RAM from `gfn`
    /// with the services that may map its memory (`grant`), or takes them
    /// back: while granted, they may be foreign-mapped even while a
    /// protected domain runs, and such mappings do not keep it paused
    /// (FM-2's exception). Answered by the vmm ([`Reply::Done`]).
    GrantPages {
        gfn: u64,
        count: u64,
        grant: bool,
    },
}

/// Access types that relax themselves at their first violation (Xen's
/// `p2m_access_rx2rw` and `p2m_access_n2rwx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Relaxing {
    /// Read-execute until the first write, which makes the page read-write
    /// (execute taken away) and goes through with no event: a later
    /// instruction fetch from the page is a violation (code written, then
    /// run: how unpacking is caught).
    Rx2Rw,
    /// No access until the first access, which makes the page
    /// read-write-execute and goes through at once; the domain's listener
    /// hears of it afterwards, in an event whose vCPU does not wait for an
    /// answer ([`crate::altp2m::VmEvent::paused`] false).
    N2Rwx,
}

/// What a view holds for one gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Entry {
    /// The gfn whose host frame it maps; `None`: nothing (a raw entry the
    /// view has not populated yet).
    pub frame_gfn: Option<u64>,
    pub access: Access,
    pub suppress_ve: bool,
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
pub enum Reply {
    Done,
    Capabilities {
        vmfunc: bool,
        ve: bool,
        pml: bool,
        max_views: u16,
    },
    Mode(Mode),
    View(u16),
    Access(Access),
    Entry(Entry),
    SuppressVe(bool),
    /// The log runs, on this mechanism.
    DirtyStarted(Mechanism),
    /// Dirty ranges, lowest first; `next`: where to read from for more.
    Dirty {
        ranges: BoundedVec<GfnRange, MAX_DIRTY>,
        next: Option<u64>,
    },
    Error(HcError),
    /// `SetSuppressVe`/`SetSuppressVeList` clearing the bit: done and kept,
    /// but not in effect on `pages` of the pages, which an external agent
    /// restricts (their violations go to the external agent, never to the
    /// guest as a #VE); it takes effect when the restriction goes.
    NotInEffect {
        pages: u16,
    },
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HcError {
    NoSuchView {
        view: u16,
    },
    /// View 0 is the host p2m; this operation is for alternate views.
    HostView,
    /// The gfn is not guest RAM.
    BadGfn {
        gfn: u64,
    },
    /// The view is the active view of a vCPU.
    ViewInUse {
        view: u16,
    },
    /// Every view slot is taken.
    TooManyViews,
    /// The CPU lacks the feature (named).
    Unsupported {
        feature: Feature,
    },
    /// The hypervisor ran out of memory: the kernel for page tables, or
    /// the altp2m service for its own records (its heap). Nothing changed.
    OutOfMemory,
    /// Dirty logging is not running.
    NotLogging,
    /// The logdirty service refused (why).
    DirtyLog(LdError),
    /// The request belongs to another service than the one asked (dirty
    /// logs are the logdirty service's, views the altp2m service's).
    WrongService,
    /// Write or execute access without read, which EPT cannot express.
    BadAccess,
    /// The service that answers this request is not running (it faulted
    /// and is being restarted, or is held); try again later.
    ServiceUnavailable,
    /// The domain's altp2m mode does not allow this caller this request.
    ModeForbids {
        mode: Mode,
    },
    /// A range or list reaches past the guest's RAM or is empty.
    BadRange,
    /// The domain has reached a quota of the altp2m service: `limit` of
    /// `what` (`docs/altp2m.md`, Quotas). Nothing changed; freeing some
    /// (destroying a view, resetting a change_gfn) makes room again.
    QuotaExceeded {
        what: Quota,
        limit: u32,
    },
    /// SH-3: the gfn maps a shared frame (page sharing): a view may not
    /// change its access or remap it, nor remap another gfn to it, until it
    /// is unshared. Suppress-#VE alone may change (seed 004).
    Shared {
        gfn: u64,
    },
    /// [`Request::GrantPages`]: the domain grants 8 ranges already.
    TooManyGrants,
    /// [`Request::GrantPages`] taking back a range that is not one granted
    /// so, or of 0 or over 512 pages.
    NotGranted,
    /// [`Request::GrantPages`] taking back pages a service has mapped on
    /// the strength of the grant: try again once it unmaps them.
    GrantedPagesMapped,
}

/// What a per-domain quota of the altp2m service counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Quota {
    /// Alternate views.
    Views,
    /// The settings kept for the domain's views (view 0 included): each
    /// range of gfns with one access, each change_gfn, each suppress-#VE
    /// bit set or cleared.
    Settings,
}

/// Hardware features a request may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, Schema)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Feature {
    Vmfunc,
    VirtualizationException,
    PageModificationLogging,
    /// EPT entries that allow execute without read.
    ExecuteOnly,
}

/// The key of this hypercall interface.
pub const HYPERCALL_KEY: Key = Key::for_path::<(Request, Reply)>("parallax/hypercall");

/// The signature CPUID leaf 0x40000000 returns in EBX, ECX, EDX.
pub const CPUID_SIGNATURE: [u8; 12] = *b"ParallaxHV\0\0";
/// The highest hypervisor CPUID leaf (EAX of leaf 0x40000000).
pub const CPUID_MAX_LEAF: u32 = 0x4000_0010;
/// CPUID leaf with the TSC frequency in kHz in EAX (the leaf other
/// hypervisors use for it; EBX, the APIC timer's, is 0: no APIC yet).
pub const CPUID_TSC_LEAF: u32 = 0x4000_0010;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_roundtrip_within_bounds() {
        let mut buf = [0u8; MAX_REQUEST];
        for r in [
            Request::ChangeGfn {
                view: 3,
                gfn: 0x1234,
                to: Some(0x4321),
            },
            Request::SetAccess {
                view: 1,
                gfn: u64::MAX,
                access: Access::RX,
            },
            Request::VeEnable { info_gfn: 7 },
        ] {
            let n = postcard::to_slice(&r, &mut buf).unwrap().len();
            assert_eq!(postcard::from_bytes::<Request>(&buf[..n]).unwrap(), r);
        }
        let full = Reply::Dirty {
            ranges: BoundedVec(
                heapless::Vec::from_slice(
                    &[GfnRange {
                        gfn: u64::MAX,
                        count: u64::MAX,
                    }; MAX_DIRTY],
                )
                .unwrap(),
            ),
            next: Some(u64::MAX),
        };
        let n = postcard::to_slice(&full, &mut buf)
            .expect("the largest reply fits MAX_REQUEST")
            .len();
        assert_eq!(postcard::from_bytes::<Reply>(&buf[..n]).unwrap(), full);
    }
}

crate::assert_fits!(Request, Reply);
