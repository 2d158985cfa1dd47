//! What the altp2m service decides, apart from the system calls that carry
//! it out (the [`Kernel`] trait), so that host tests can check it against a
//! reference model.
//!
//! The kernel keeps each domain's views as EPT tables and applies
//! operations named by guest frame numbers. This service keeps what each
//! view should be, as the host p2m (view 0) with the view's own settings
//! applied, and writes entries into the tables only when they are needed:
//!
//! - A view starts empty and is filled lazily from the host p2m, one page
//!   on its first access (ALT-6); a view created late sees the current host
//!   p2m (ALT-10).
//! - A view's settings (access, change_gfn, suppress-#VE) are kept here;
//!   setting one on a page the view has not filled records it, and the page
//!   gets it when filled (ALT-7). A page whose suppress-#VE bit is cleared
//!   is filled at once, so that a #VE is never raised for a page that is
//!   merely not there yet.
//! - A change to the host p2m reaches every view that holds a copy of the
//!   page, with the view's settings applied again (ALT-9); a view never
//!   gets more access to a frame than the host p2m gives.
//! - Access is kept as ranges: a range operation is one record here and,
//!   in the kernel, work in proportion to the entries it touches.
//! - What a domain may make the service keep is bounded ([`Quotas`]): a
//!   change past a quota is refused with `QuotaExceeded`, and a change the
//!   service's heap has no room for with `OutOfMemory` ([`Kernel::room`]),
//!   never by running out of memory half-way. A domain's records go when
//!   it ends ([`Altp2m::forget`]).
//! - A service that starts again (a restart after a fault, a swap) cannot
//!   know what its predecessor made of the views: it puts every domain back
//!   to what an empty model describes ([`Altp2m::reset`]).

use crate::intervals::Intervals;
use crate::tracking::Tracking;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use ipc_schema::altp2m::AltError;
use ipc_schema::hypercall::{
    Access, Entry, Feature, HcError, MAX_VIEWS, Mode, Quota, Relaxing, Reply, Request,
};
use ipc_schema::logdirty::{GfnRange, Mechanism};
use ipc_schema::syscall::{EptOp, EptOpError, EptResult, Perms, SysError, VcpuOp, vm_features};

/// The kernel calls the service makes.
pub trait Kernel {
    /// `ipc_schema::syscall::vm_features` bits.
    fn features(&self) -> u64;
    fn view_create(&mut self, domain: u16) -> Result<u16, SysError>;
    fn view_destroy(&mut self, domain: u16, view: u16) -> Result<(), SysError>;
    fn view_set_visible(&mut self, domain: u16, view: u16, visible: bool) -> Result<(), SysError>;
    /// Applies `ops` in order; one result each into `out`.
    fn ept(&mut self, domain: u16, ops: &[EptOp], out: &mut [EptResult]) -> Result<(), SysError>;
    fn vcpu_set_view(&mut self, domain: u16, vcpu: u16, view: u16) -> Result<(), SysError>;
    /// The active view of a vCPU.
    fn vcpu_view(&mut self, domain: u16, vcpu: u16) -> Result<u16, SysError>;
    fn vcpu_control(
        &mut self,
        domain: u16,
        vcpu: u16,
        op: VcpuOp,
        arg: u64,
    ) -> Result<(), SysError>;
    /// Takes frames whose armed entries a write lifted (`EptOp::ArmLift`)
    /// into `out`: (how many, whether more remain).
    fn lifted_take(&mut self, domain: u16, out: &mut [u64]) -> Result<(usize, bool), SysError>;
    /// A domain's state (a `DomainState` code) and its RAM in pages;
    /// `None` when there is no such domain.
    fn domain_info(&mut self, domain: u16) -> Option<(u64, u64)>;
    /// Which domain of all made since boot `domain` is (DOMAIN_INFO's
    /// birth); `None` when there is no such domain.
    fn domain_birth(&mut self, domain: u16) -> Option<u64>;
    /// Whether the service's heap has [`ROOM`] bytes free in one piece:
    /// enough for any one change that grows what the service keeps.
    fn room(&self) -> bool;
}

/// Per-domain limits on what the service keeps for a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Alternate views.
    pub views: u32,
    /// Settings of the domain's views, view 0 included: each range of gfns
    /// with one access (a range is one setting however long), each
    /// change_gfn, each suppress-#VE bit set or cleared.
    pub settings: u32,
}

/// The quotas the service runs with (`docs/altp2m.md`, Quotas). With them
/// one domain's records take at most [`DOMAIN_BYTES`] of the heap
/// (`services/altp2m/src/tests.rs` measures the worst case).
pub const QUOTAS: Quotas = Quotas {
    views: 64,
    settings: 1024,
};

/// The service's heap.
pub const HEAP_BYTES: usize = 2 << 20;

/// The most a domain at its quotas may take of the heap: its share when
/// every domain the kernel can hold is at its quotas, so that no domain can
/// take the room another needs.
pub const DOMAIN_BYTES: usize = HEAP_BYTES / ipc_schema::manifest::MAX_DOMAINS;

/// Free heap (in one piece) checked for before a change that grows the
/// service's records; far more than any one change allocates.
pub const ROOM: usize = 16 << 10;

/// Domain ids the kernel gives (1 to this).
pub const MAX_DOMAIN_ID: u16 = ipc_schema::manifest::MAX_DOMAINS as u16;

/// Who asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    /// The in-guest agent (through the vmm), on a vCPU.
    Guest { vcpu: u16 },
    /// An external agent (the host, another service).
    External,
}

/// An access setting and whether an external agent placed it (ALT-4: its
/// violations are never reported inside the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub access: Access,
    pub external: bool,
    /// The access relaxes itself at its first violation (Xen's rx2rw,
    /// n2rwx; [`Altp2m::relax`]).
    pub relaxing: Option<Relaxing>,
}

/// What one view should be, on top of the host p2m.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Access of pages with no setting of their own (`None`: the host's).
    pub default: Option<Access>,
    pub access: Intervals<Setting>,
    /// change_gfn: gfn -> the gfn whose host frame it maps.
    pub remap: BTreeMap<u64, u64>,
    /// suppress-#VE settings (the default is set).
    pub sve: BTreeMap<u64, bool>,
}

/// One domain's views.
#[derive(Clone, Debug)]
pub struct Domain {
    pub mode: Mode,
    /// Settings of view 0 (the host p2m) and of each alternate view.
    pub views: BTreeMap<u16, View>,
    /// (frame gfn, view, gfn) for each change_gfn of a view: who remaps
    /// to each frame.
    pub remapped_to: BTreeSet<(u64, u16, u64)>,
    /// Dirty tracking's constraint on the entries, while the logdirty
    /// service tracks something ([`crate::tracking`]).
    pub tracking: Option<Tracking>,
    /// A self-relaxing setting was ever placed (else a violation need not
    /// look for one: [`Altp2m::relax`]).
    pub relaxing: bool,
    /// Page sharing's constraint (SH-2, [`crate::sharing`]): gfn -> the
    /// shared frame (the kernel's opaque id) it maps, read-only in every
    /// view.
    pub shared: BTreeMap<u64, u32>,
}

/// A domain's mode until someone sets one.
pub const DEFAULT_MODE: Mode = Mode::Mixed;

impl Default for Domain {
    fn default() -> Self {
        let mut views = BTreeMap::new();
        views.insert(0, View::default());
        Self {
            mode: DEFAULT_MODE,
            views,
            remapped_to: BTreeSet::new(),
            tracking: None,
            relaxing: false,
            shared: BTreeMap::new(),
        }
    }
}

const ALL: Access = Access::RWX;

fn meet(a: Access, b: Access) -> Access {
    Access {
        read: a.read && b.read,
        write: a.write && b.write,
        execute: a.execute && b.execute,
    }
}

pub(crate) fn perms(a: Access) -> Perms {
    Perms {
        read: a.read,
        write: a.write,
        execute: a.execute,
    }
}

fn access(p: Perms) -> Access {
    Access {
        read: p.read,
        write: p.write,
        execute: p.execute,
    }
}

impl Domain {
    /// The host p2m's access to frame gfn `frame`.
    pub fn host_access(&self, frame: u64) -> Access {
        self.views[&0].access.get(frame).map_or(ALL, |s| s.access)
    }

    /// The effective entry of `gfn` in `view` (which exists): the host p2m
    /// with the view's settings applied (ALT-8).
    pub fn effective(&self, view: u16, gfn: u64) -> Entry {
        self.tracked(self.untracked(view, gfn), view, gfn)
    }

    /// `e`, the entry the settings give `gfn` in `view`, less what dirty
    /// tracking takes.
    pub fn tracked(&self, mut e: Entry, view: u16, gfn: u64) -> Entry {
        let frame = e.frame_gfn.unwrap_or(gfn);
        // SH-2: a shared frame is never writable, in any view.
        if self
            .tracking
            .as_ref()
            .is_some_and(|t| t.blocks_write(view, gfn, frame))
            || self.shared.contains_key(&frame)
        {
            e.access.write = false;
        }
        e
    }

    /// What the settings alone give a page of `view` that maps its own
    /// frame (no change_gfn).
    pub fn untracked_plain(&self, view: u16, gfn: u64) -> Access {
        if view == 0 {
            return self.host_access(gfn);
        }
        let v = &self.views[&view];
        let own = v.access.get(gfn).map(|s| s.access).or(v.default);
        meet(own.unwrap_or(ALL), self.host_access(gfn))
    }

    /// The effective entry apart from dirty tracking: what the settings
    /// alone give.
    pub fn untracked(&self, view: u16, gfn: u64) -> Entry {
        self.settled(view, gfn).0
    }

    /// Whether the restriction on `gfn` in `view` was placed externally.
    pub fn external(&self, view: u16, gfn: u64) -> bool {
        self.settled(view, gfn).1
    }

    /// What the settings give `gfn` in `view` (which exists), apart from
    /// dirty tracking, and whether a restriction on it was placed
    /// externally: one look-up of the view's access ranges and one of the
    /// host p2m's.
    pub fn settled(&self, view: u16, gfn: u64) -> (Entry, bool) {
        self.settled_in(&self.views[&view], view, gfn)
    }

    /// [`Domain::settled`] of view `view`, whose settings are `v` (found
    /// by the caller, which had to look for it anyway).
    #[inline]
    pub fn settled_in(&self, v: &View, view: u16, gfn: u64) -> (Entry, bool) {
        let frame = if view == 0 {
            gfn
        } else {
            v.remap.get(&gfn).copied().unwrap_or(gfn)
        };
        let host = if view == 0 { v } else { self.host() }.access.get(frame);
        let host_access = host.map_or(ALL, |s| s.access);
        let (access, own_external) = if view == 0 {
            (host_access, false)
        } else {
            let own = v.access.get(gfn);
            (
                meet(
                    own.map(|s| s.access).or(v.default).unwrap_or(ALL),
                    host_access,
                ),
                own.is_some_and(|s| s.external),
            )
        };
        let external = own_external || host.is_some_and(|s| s.external);
        // An external restriction is never reported inside the guest.
        let suppress_ve = external || v.sve.get(&gfn).copied().unwrap_or(true);
        (
            Entry {
                frame_gfn: Some(frame),
                access,
                suppress_ve,
            },
            external,
        )
    }

    /// The settings of view 0, the host p2m (always there, and the first).
    #[inline(always)]
    fn host(&self) -> &View {
        match self.views.first_key_value() {
            Some((0, v)) => v,
            _ => &self.views[&0],
        }
    }

    /// Every (view, gfn) of an alternate view whose entry depends on the host
    /// p2m's entry for `frame`.
    fn dependents(&self, frame: u64) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.views
            .iter()
            .filter(move |&(&v, view)| v != 0 && !view.remap.contains_key(&frame))
            .map(move |(&v, _)| (v, frame))
            .chain(
                self.remapped_to
                    .range((frame, 0, 0)..=(frame, u16::MAX, u64::MAX))
                    .map(|&(_, v, g)| (v, g)),
            )
    }

    /// The settings it keeps (what [`Quotas::settings`] bounds).
    pub fn settings(&self) -> usize {
        self.views
            .values()
            .map(|v| v.access.len() + v.remap.len() + v.sve.len())
            .sum()
    }

    /// `Ok` if a change leaving `after` settings (from `before`) stays
    /// within `quotas`; a change that does not add any always does.
    fn settings_quota(quotas: &Quotas, before: usize, after: usize) -> Result<(), HcError> {
        if after > before && after > quotas.settings as usize {
            Err(HcError::QuotaExceeded {
                what: Quota::Settings,
                limit: quotas.settings,
            })
        } else {
            Ok(())
        }
    }
}

/// The state of every domain this service has seen.
pub struct Altp2m {
    pub domains: BTreeMap<u16, Domain>,
    pub quotas: Quotas,
    /// Copy-on-write breaks not yet taken by the sharing service
    /// ([`crate::sharing`]).
    pub breaks: Vec<ipc_schema::altp2m::CowBreak>,
}

impl Default for Altp2m {
    fn default() -> Self {
        Self::with_quotas(QUOTAS)
    }
}

/// What [`Altp2m::reset`] did to one domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub domain: u16,
    /// Alternate views destroyed.
    pub views: u16,
    /// The view vCPU 0 was in (it is in view 0 now).
    pub was_in: u16,
}

fn op_error(e: EptOpError, view: u16, gfn: u64) -> HcError {
    match e {
        EptOpError::NoSuchView => HcError::NoSuchView { view },
        EptOpError::HostView => HcError::HostView,
        EptOpError::OutOfMemory => HcError::OutOfMemory,
        EptOpError::WriteWithoutRead => HcError::BadAccess,
        EptOpError::Shared => HcError::Shared { gfn },
        EptOpError::NotRam
        | EptOpError::AlreadyMapped
        | EptOpError::NotMapped
        | EptOpError::NoSuchShare
        | EptOpError::NotShared
        | EptOpError::AlreadyShared
        | EptOpError::Busy => HcError::BadGfn { gfn },
    }
}

/// Runs EPT operations in batches; the first refusal is the error.
fn run(
    k: &mut impl Kernel,
    domain: u16,
    ops: &[EptOp],
    view: u16,
    gfn: u64,
) -> Result<(), HcError> {
    for chunk in ops.chunks(ipc_schema::syscall::MAX_EPT_OPS) {
        let mut out = [EptResult::Done; ipc_schema::syscall::MAX_EPT_OPS];
        k.ept(domain, chunk, &mut out[..chunk.len()])
            .map_err(|_| HcError::NoSuchView { view })?;
        for r in &out[..chunk.len()] {
            if let EptResult::Error(e) = r {
                return Err(op_error(*e, view, gfn));
            }
        }
    }
    Ok(())
}

/// What `view` holds for `gfn` now: (mapped frame gfn and access, suppress-#VE).
pub fn raw(
    k: &mut impl Kernel,
    domain: u16,
    view: u16,
    gfn: u64,
) -> Result<(Option<Mapped>, bool), HcError> {
    let mut out = [EptResult::Done];
    k.ept(domain, &[EptOp::Query { view, gfn }], &mut out)
        .map_err(|_| HcError::NoSuchView { view })?;
    match out[0] {
        EptResult::Entry {
            mapped,
            suppress_ve,
        } => Ok((mapped.map(|m| (m.frame_gfn, access(m.perms))), suppress_ve)),
        EptResult::Error(e) => Err(op_error(e, view, gfn)),
        EptResult::Done | EptResult::Shared { .. } => Err(HcError::BadGfn { gfn }),
    }
}

/// A mapped entry: the frame (as its host gfn) and the access.
pub type Mapped = (u64, Access);

/// What the host p2m and `view` map at `gfn` (`None` where nothing is
/// mapped, or the kernel refused), asked in one batch (one system call;
/// the host alone for view 0): what an EPT violation needs to know.
pub fn host_and_view(
    k: &mut impl Kernel,
    domain: u16,
    view: u16,
    gfn: u64,
) -> (Option<Mapped>, Option<Mapped>) {
    let ops = [EptOp::Query { view: 0, gfn }, EptOp::Query { view, gfn }];
    let n = if view == 0 { 1 } else { 2 };
    let mut out = [EptResult::Done; 2];
    if k.ept(domain, &ops[..n], &mut out[..n]).is_err() {
        return (None, None);
    }
    let entry = |r: &EptResult| match *r {
        EptResult::Entry { mapped, .. } => mapped.map(|m| (m.frame_gfn, access(m.perms))),
        _ => None,
    };
    let host = entry(&out[0]);
    (host, if view == 0 { host } else { entry(&out[1]) })
}

/// Whether `gfn` is guest RAM (the host p2m maps it).
fn is_ram(k: &mut impl Kernel, domain: u16, gfn: u64) -> Result<(), HcError> {
    match raw(k, domain, 0, gfn)? {
        (Some(_), _) => Ok(()),
        _ => Err(HcError::BadGfn { gfn }),
    }
}

/// The operations that make `view`'s entry for `gfn` its effective one.
pub fn fill_ops(d: &Domain, view: u16, gfn: u64) -> heapless::Vec<EptOp, 4> {
    let e = d.effective(view, gfn);
    let frame = e.frame_gfn.unwrap_or(gfn);
    let mut ops: heapless::Vec<EptOp, 4> = heapless::Vec::from_slice(&[
        if view == 0 {
            EptOp::Protect {
                view,
                gfn,
                perms: perms(e.access),
            }
        } else {
            EptOp::Map {
                view,
                gfn,
                from_gfn: e.frame_gfn.unwrap_or(gfn),
                perms: perms(e.access),
            }
        },
        EptOp::SetSuppressVe {
            view,
            gfn,
            suppress: e.suppress_ve,
        },
    ])
    .unwrap_or_default();
    if d.tracking
        .as_ref()
        .is_some_and(|t| t.premark(view, gfn, frame))
    {
        let _ = ops.push(EptOp::MarkDirty { view, gfn });
    }
    if armable(d, view, gfn, frame) {
        let _ = ops.push(EptOp::ArmLift {
            view,
            gfn,
            count: 1,
        });
    }
    ops
}

/// Whether `view`'s entry for `gfn` (mapping `frame`) lacks write only
/// because tracking protects the frame: the kernel may then let the first
/// write through itself and record it (`EptOp::ArmLift`).
fn armable(d: &Domain, view: u16, gfn: u64, frame: u64) -> bool {
    !d.shared.contains_key(&frame)
        && d.tracking
            .as_ref()
            .is_some_and(|t| t.blocks_write(view, gfn, frame))
        && d.untracked(view, gfn).access.write
}

/// Writes the effective entry of `gfn` into `view`.
pub fn fill(
    k: &mut impl Kernel,
    domain: u16,
    d: &Domain,
    view: u16,
    gfn: u64,
) -> Result<(), HcError> {
    run(k, domain, &fill_ops(d, view, gfn), view, gfn)
}

/// Refreshes `(view, gfn)` if the view holds a copy (or must: a cleared
/// suppress-#VE bit).
fn refresh(
    k: &mut impl Kernel,
    domain: u16,
    d: &Domain,
    view: u16,
    gfn: u64,
) -> Result<(), HcError> {
    let populated = raw(k, domain, view, gfn)?.0.is_some();
    if populated || !d.effective(view, gfn).suppress_ve {
        fill(k, domain, d, view, gfn)?;
    }
    Ok(())
}

/// Refreshes every copy of the host p2m's entry for `frame` (ALT-9).
fn propagate(k: &mut impl Kernel, domain: u16, d: &Domain, frame: u64) -> Result<(), HcError> {
    propagate_with(k, domain, d, frame, &[])
}

/// [`propagate`], the copies asked about in one batch and written in
/// another, after `first` (operations of the caller's, written in the same
/// batch).
pub(crate) fn propagate_with(
    k: &mut impl Kernel,
    domain: u16,
    d: &Domain,
    frame: u64,
    first: &[EptOp],
) -> Result<(), HcError> {
    let deps: Vec<(u16, u64)> = d.dependents(frame).collect();
    let mut ops: Vec<EptOp> = first.to_vec();
    for chunk in deps.chunks(ipc_schema::syscall::MAX_EPT_OPS) {
        let queries: Vec<EptOp> = chunk
            .iter()
            .map(|&(view, gfn)| EptOp::Query { view, gfn })
            .collect();
        let mut out = [EptResult::Done; ipc_schema::syscall::MAX_EPT_OPS];
        k.ept(domain, &queries, &mut out[..chunk.len()])
            .map_err(|_| HcError::NoSuchView { view: chunk[0].0 })?;
        for (&(view, gfn), r) in chunk.iter().zip(out.iter()) {
            let populated = matches!(
                r,
                EptResult::Entry {
                    mapped: Some(_),
                    ..
                }
            );
            // A copy the view holds, or must (a cleared suppress-#VE bit).
            if populated || !d.effective(view, gfn).suppress_ve {
                ops.extend(fill_ops(d, view, gfn));
            }
        }
    }
    let (view, gfn) = deps.first().copied().unwrap_or((0, frame));
    run(k, domain, &ops, view, gfn)
}

/// Whether EPT can give `a` on this CPU: write needs read (`BadAccess`), and
/// execute without read needs execute-only EPT (without it the CPU refuses
/// the entry as a misconfiguration, which would stop the domain).
fn expressible(k: &impl Kernel, a: Access) -> Result<(), HcError> {
    if a.write && !a.read {
        return Err(HcError::BadAccess);
    }
    if a.execute && !a.read {
        need(k, vm_features::EXECUTE_ONLY, Feature::ExecuteOnly)?;
    }
    Ok(())
}

fn need(k: &impl Kernel, bit: u64, feature: Feature) -> Result<(), HcError> {
    if k.features() & bit != 0 {
        Ok(())
    } else {
        Err(HcError::Unsupported { feature })
    }
}

/// Whether `request` may make the service keep more (checked against the
/// heap's room before it starts).
fn grows(request: &Request) -> bool {
    matches!(
        request,
        Request::ViewCreate { .. }
            | Request::ChangeGfn { to: Some(_), .. }
            | Request::SetAccess { .. }
            | Request::SetAccessRelaxing { .. }
            | Request::SetAccessRange { .. }
            | Request::SetAccessList { .. }
            | Request::SetSuppressVe { .. }
            | Request::SetSuppressVeList { .. }
    )
}

/// Whether the mode lets `agent` make `request` (ALT-3).
pub fn allowed(mode: Mode, agent: Agent, request: &Request) -> bool {
    use Request as R;
    let reads = matches!(
        request,
        R::Capabilities
            | R::GetMode
            | R::ViewCurrent
            | R::GetAccess { .. }
            | R::GetEntry { .. }
            | R::GetSuppressVe { .. }
    );
    match (mode, agent) {
        (_, _) if matches!(request, R::Capabilities | R::GetMode) => true,
        (Mode::Disabled, _) => false,
        (Mode::Mixed, _) => true,
        (Mode::External | Mode::Limited, Agent::External) => true,
        (Mode::External, Agent::Guest { .. }) => false,
        // As Xen's limited mode: the guest may also have its violations
        // delivered as #VE (which changes no view).
        (Mode::Limited, Agent::Guest { .. }) => {
            reads || matches!(request, R::VeEnable { .. } | R::VeDisable)
        }
    }
}

impl Altp2m {
    pub fn with_quotas(quotas: Quotas) -> Self {
        Self {
            domains: BTreeMap::new(),
            quotas,
            breaks: Vec::new(),
        }
    }

    /// The domain's state, created at first use.
    pub fn domain(&mut self, id: u16) -> &mut Domain {
        self.domains.entry(id).or_default()
    }

    /// Page `gfn` of `domain` as a guest running in `view` sees it: the
    /// effective entry (the host p2m with the view's settings, ALT-8). For
    /// the hypervisor's reads and writes on the guest's behalf (the
    /// hypercall's request page), which go where the guest's own would.
    /// The in-guest view switch by hypercall (`HC_VIEW_SWITCH`): whether the
    /// domain's mode lets its guest switch, to a view that exists. The
    /// exit's answer moves the vCPU (`events`); nothing is written here.
    pub fn guest_switch(&self, domain: u16, view: u16) -> Result<(), HcError> {
        // A domain with no record yet has the default mode and view 0 alone.
        let (mode, exists) = match self.domains.get(&domain) {
            Some(d) => (d.mode, d.views.contains_key(&view)),
            None => (DEFAULT_MODE, view == 0),
        };
        let request = Request::ViewSwitch { view };
        if !allowed(mode, Agent::Guest { vcpu: 0 }, &request) {
            return Err(HcError::ModeForbids { mode });
        }
        if !exists {
            return Err(HcError::NoSuchView { view });
        }
        Ok(())
    }

    pub fn guest_page(
        &self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
    ) -> Result<Entry, HcError> {
        let pages = k.domain_info(domain).map_or(0, |(_, pages)| pages);
        if gfn >= pages {
            return Err(HcError::BadGfn { gfn });
        }
        match self.domains.get(&domain) {
            // What the guest's settings give it, dirty tracking apart: the
            // vmm writes a reply through `DOMAIN_WRITE`, which the kernel
            // records for the log (docs/logdirty.md), so a tracked page is
            // no reason to refuse the guest's request page.
            Some(d) if d.views.contains_key(&view) => Ok(d.untracked(view, gfn)),
            Some(_) => Err(HcError::NoSuchView { view }),
            // Nothing set for the domain: its host p2m, as built.
            None if view == 0 => Ok(Entry {
                frame_gfn: Some(gfn),
                access: ALL,
                suppress_ve: true,
            }),
            None => Err(HcError::NoSuchView { view }),
        }
    }

    /// Forgets a domain that ended: its records go (its id may be given
    /// to a new domain, which must start from nothing). Whether it had any.
    pub fn forget(&mut self, id: u16) -> bool {
        self.domains.remove(&id).is_some()
    }

    /// Puts every live domain's views back to what this (empty) model
    /// describes, for a service that starts without its predecessor's
    /// state: vCPU 0 goes back to view 0, every alternate view is destroyed
    /// (nothing here says what it held), and the host p2m's access is rwx
    /// again on all RAM (view 0 with no settings). What was done, per
    /// domain that had anything to undo.
    pub fn reset(&mut self, k: &mut impl Kernel) -> Vec<Reset> {
        let mut done = Vec::new();
        for id in 1..=MAX_DOMAIN_ID {
            // Building, running or paused: a domain that ended is not
            // entered again.
            let Some((0..=2, pages)) = k.domain_info(id) else {
                continue;
            };
            self.domains.remove(&id);
            let mut views: Vec<u16> = Vec::new();
            let ids: Vec<u16> = (1..MAX_VIEWS).collect();
            for chunk in ids.chunks(ipc_schema::syscall::MAX_EPT_OPS) {
                let ops: Vec<EptOp> = chunk
                    .iter()
                    .map(|&view| EptOp::Query { view, gfn: 0 })
                    .collect();
                let mut out = [EptResult::Done; ipc_schema::syscall::MAX_EPT_OPS];
                if k.ept(id, &ops, &mut out[..ops.len()]).is_err() {
                    break;
                }
                views.extend(
                    chunk
                        .iter()
                        .zip(out.iter())
                        .filter(|(_, r)| matches!(r, EptResult::Entry { .. }))
                        .map(|(&v, _)| v),
                );
            }
            let was_in = k.vcpu_view(id, 0).unwrap_or(0);
            if was_in != 0 {
                let _ = k.vcpu_set_view(id, 0, 0);
            }
            let mut destroyed = 0;
            for &v in &views {
                if k.view_destroy(id, v).is_ok() {
                    destroyed += 1;
                }
            }
            if pages > 0 {
                let mut out = [EptResult::Done];
                let _ = k.ept(
                    id,
                    &[EptOp::ProtectRange {
                        view: 0,
                        gfn: 0,
                        count: pages,
                        perms: perms(ALL),
                    }],
                    &mut out,
                );
            }
            if destroyed > 0 || was_in != 0 {
                done.push(Reset {
                    domain: id,
                    views: destroyed,
                    was_in,
                });
            }
        }
        done
    }

    /// Sets a domain's mode. Disabled hides every alternate view and puts
    /// vCPU 0 back in view 0.
    pub fn set_mode(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        mode: Mode,
    ) -> Result<(), HcError> {
        let d = self.domain(domain);
        d.mode = mode;
        if mode == Mode::Disabled {
            let views: Vec<u16> = d.views.keys().copied().filter(|&v| v != 0).collect();
            for v in views {
                let _ = k.view_set_visible(domain, v, false);
            }
            let _ = k.vcpu_set_view(domain, 0, 0);
        }
        Ok(())
    }

    /// Carries out `request` for `domain` from `agent`.
    pub fn request(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        agent: Agent,
        request: &Request,
    ) -> Reply {
        match self.run(k, domain, agent, request) {
            Ok(reply) => reply,
            Err(e) => Reply::Error(e),
        }
    }

    fn run(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        agent: Agent,
        r: &Request,
    ) -> Result<Reply, HcError> {
        if !self.domains.contains_key(&domain) && !k.room() {
            return Err(HcError::OutOfMemory);
        }
        let mode = self.domain(domain).mode;
        if !allowed(mode, agent, r) {
            return Err(HcError::ModeForbids { mode });
        }
        if grows(r) && !k.room() {
            return Err(HcError::OutOfMemory);
        }
        let external = agent == Agent::External;
        let vcpu = match agent {
            Agent::Guest { vcpu } => vcpu,
            Agent::External => 0,
        };
        let view_exists = |d: &Domain, view: u16| {
            if d.views.contains_key(&view) {
                Ok(())
            } else {
                Err(HcError::NoSuchView { view })
            }
        };
        let alternate = |d: &Domain, view: u16| {
            if view == 0 {
                Err(HcError::HostView)
            } else {
                view_exists(d, view)
            }
        };
        let check_access = |a: Access| expressible(k, a);
        match *r {
            Request::Capabilities => {
                let f = k.features();
                Ok(Reply::Capabilities {
                    vmfunc: f & vm_features::VMFUNC != 0,
                    ve: f & vm_features::VE != 0,
                    pml: f & vm_features::PML != 0,
                    max_views: MAX_VIEWS,
                })
            }
            Request::GetMode => Ok(Reply::Mode(mode)),
            Request::ViewCreate { default_access } => {
                if let Some(a) = default_access {
                    check_access(a)?;
                }
                // (The views include view 0.)
                if self.domain(domain).views.len() > self.quotas.views as usize {
                    return Err(HcError::QuotaExceeded {
                        what: Quota::Views,
                        limit: self.quotas.views,
                    });
                }
                let view = k.view_create(domain).map_err(|e| match e {
                    SysError::NoResources => HcError::TooManyViews,
                    _ => HcError::OutOfMemory,
                })?;
                self.domain(domain).views.insert(
                    view,
                    View {
                        default: default_access,
                        ..View::default()
                    },
                );
                let filled = self.fill_view(k, domain, view);
                if filled.is_err() {
                    let _ = k.view_destroy(domain, view);
                    self.domain(domain).views.remove(&view);
                }
                filled.map(|()| Reply::View(view))
            }
            Request::ViewDestroy { view } => {
                let d = self.domain(domain);
                alternate(d, view)?;
                k.view_destroy(domain, view).map_err(|e| match e {
                    SysError::Busy => HcError::ViewInUse { view },
                    _ => HcError::NoSuchView { view },
                })?;
                let d = self.domain(domain);
                d.views.remove(&view);
                d.remapped_to.retain(|&(_, v, _)| v != view);
                Ok(Reply::Done)
            }
            Request::ViewSetVisible { view, visible } => {
                view_exists(self.domain(domain), view)?;
                if visible {
                    need(k, vm_features::VMFUNC, Feature::Vmfunc)?;
                }
                k.view_set_visible(domain, view, visible)
                    .map_err(|_| HcError::NoSuchView { view })?;
                Ok(Reply::Done)
            }
            Request::ViewSwitch { view } | Request::ViewSwitchAll { view } => {
                view_exists(self.domain(domain), view)?;
                k.vcpu_set_view(domain, vcpu, view)
                    .map_err(|_| HcError::NoSuchView { view })?;
                Ok(Reply::Done)
            }
            Request::ViewCurrent => {
                let view = k
                    .vcpu_view(domain, vcpu)
                    .map_err(|_| HcError::NoSuchView { view: 0 })?;
                Ok(Reply::View(view))
            }
            Request::ChangeGfn { view, gfn, to } => {
                alternate(self.domain(domain), view)?;
                is_ram(k, domain, gfn)?;
                if let Some(t) = to {
                    is_ram(k, domain, t)?;
                }
                // SH-3: a shared gfn is neither remapped nor remapped to.
                let d = self.domain(domain);
                if let Some(&g) = [Some(gfn), to]
                    .iter()
                    .flatten()
                    .find(|g| d.shared.contains_key(g))
                {
                    return Err(HcError::Shared { gfn: g });
                }
                let quotas = self.quotas;
                let d = self.domain(domain);
                let before = d.settings();
                let new = to.is_some() && !d.views[&view].remap.contains_key(&gfn);
                Domain::settings_quota(&quotas, before, before + usize::from(new))?;
                let v = d.views.get_mut(&view).expect("checked above");
                let old = match to {
                    Some(t) => v.remap.insert(gfn, t),
                    None => v.remap.remove(&gfn),
                };
                if let Some(o) = old {
                    d.remapped_to.remove(&(o, view, gfn));
                }
                if let Some(t) = to {
                    d.remapped_to.insert((t, view, gfn));
                }
                let d = &self.domains[&domain];
                refresh(k, domain, d, view, gfn)?;
                Ok(Reply::Done)
            }
            Request::SetAccess { view, gfn, access } => {
                self.set_access(k, domain, view, gfn, 1, access, external)?;
                Ok(Reply::Done)
            }
            Request::SetAccessRelaxing {
                view,
                gfn,
                relaxing,
            } => {
                let access = match relaxing {
                    Relaxing::Rx2Rw => Access::RX,
                    Relaxing::N2Rwx => Access::NONE,
                };
                let setting = Setting {
                    access,
                    external,
                    relaxing: Some(relaxing),
                };
                self.domain(domain).relaxing = true;
                self.set(k, domain, view, gfn, 1, setting)?;
                Ok(Reply::Done)
            }
            Request::SetAccessRange {
                view,
                gfn,
                count,
                access,
            } => {
                self.set_access(k, domain, view, gfn, count, access, external)
                    .map_err(|e| match e {
                        HcError::BadGfn { .. } => HcError::BadRange,
                        other => other,
                    })?;
                Ok(Reply::Done)
            }
            Request::SetAccessList {
                view,
                ref gfns,
                access,
            } => {
                for &g in gfns.0.iter() {
                    self.set_access(k, domain, view, g, 1, access, external)?;
                }
                Ok(Reply::Done)
            }
            Request::GetAccess { view, gfn } => {
                view_exists(self.domain(domain), view)?;
                is_ram(k, domain, gfn)?;
                Ok(Reply::Access(
                    self.domains[&domain].effective(view, gfn).access,
                ))
            }
            Request::GetEntry {
                view,
                gfn,
                raw: true,
            } => {
                view_exists(self.domain(domain), view)?;
                let (mapped, suppress_ve) = raw(k, domain, view, gfn)?;
                Ok(Reply::Entry(Entry {
                    frame_gfn: mapped.map(|m| m.0),
                    access: mapped.map_or(Access::NONE, |m| m.1),
                    suppress_ve,
                }))
            }
            Request::GetEntry {
                view,
                gfn,
                raw: false,
            } => {
                view_exists(self.domain(domain), view)?;
                is_ram(k, domain, gfn)?;
                Ok(Reply::Entry(self.domains[&domain].effective(view, gfn)))
            }
            Request::SetSuppressVe {
                view,
                gfn,
                suppress,
            } => {
                let in_effect = self.set_sve(k, domain, view, gfn, suppress)?;
                Ok(sve_reply(u16::from(!in_effect)))
            }
            Request::SetSuppressVeList {
                view,
                ref gfns,
                suppress,
            } => {
                let mut not = 0u16;
                for &g in gfns.0.iter() {
                    not += u16::from(!self.set_sve(k, domain, view, g, suppress)?);
                }
                Ok(sve_reply(not))
            }
            Request::GetSuppressVe { view, gfn } => {
                view_exists(self.domain(domain), view)?;
                is_ram(k, domain, gfn)?;
                Ok(Reply::SuppressVe(
                    self.domains[&domain].effective(view, gfn).suppress_ve,
                ))
            }
            Request::VeEnable { info_gfn } => {
                need(k, vm_features::VE, Feature::VirtualizationException)?;
                is_ram(k, domain, info_gfn)?;
                k.vcpu_control(domain, vcpu, VcpuOp::VeEnable, info_gfn)
                    .map_err(|e| match e {
                        SysError::Unsupported => HcError::Unsupported {
                            feature: Feature::VirtualizationException,
                        },
                        _ => HcError::BadGfn { gfn: info_gfn },
                    })?;
                Ok(Reply::Done)
            }
            Request::VeDisable => {
                let _ = k.vcpu_control(domain, vcpu, VcpuOp::VeDisable, 0);
                Ok(Reply::Done)
            }
            // Dirty logs are the logdirty service's (the vmm sends an
            // in-guest agent's requests there), shared pages the vmm's.
            Request::DirtyLogStart { .. }
            | Request::DirtyLogRead { .. }
            | Request::DirtyLogStop
            | Request::GrantPages { .. } => Err(HcError::WrongService),
        }
    }

    /// Sets the access of `count` gfns from `gfn` in `view`.
    #[allow(clippy::too_many_arguments)]
    fn set_access(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
        count: u64,
        access: Access,
        external: bool,
    ) -> Result<(), HcError> {
        let setting = Setting {
            access,
            external,
            relaxing: None,
        };
        self.set(k, domain, view, gfn, count, setting)
    }

    /// Puts `setting` on `count` gfns from `gfn` in `view`.
    fn set(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
        count: u64,
        setting: Setting,
    ) -> Result<(), HcError> {
        expressible(k, setting.access)?;
        if !self.domain(domain).views.contains_key(&view) {
            return Err(HcError::NoSuchView { view });
        }
        let end = gfn
            .checked_add(count)
            .filter(|_| count > 0)
            .ok_or(HcError::BadRange)?;
        is_ram(k, domain, gfn).map_err(|_| {
            if count == 1 {
                HcError::BadGfn { gfn }
            } else {
                HcError::BadRange
            }
        })?;
        if count > 1 {
            is_ram(k, domain, end - 1).map_err(|_| HcError::BadRange)?;
        }
        // SH-3: the access of a shared gfn is not changed in any view.
        if let Some((&g, _)) = self.domain(domain).shared.range(gfn..end).next() {
            return Err(HcError::Shared { gfn: g });
        }
        let setting = Some(setting);
        let quotas = self.quotas;
        let d = self.domain(domain);
        let before = d.settings();
        let v = &d.views[&view].access;
        let after = before - v.len() + v.len_after_set(gfn, end, setting);
        Domain::settings_quota(&quotas, before, after)?;
        d.views
            .get_mut(&view)
            .expect("checked above")
            .access
            .set(gfn, end, setting);
        let d = &self.domains[&domain];
        if count == 1 {
            refresh(k, domain, d, view, gfn)?;
            if view == 0 {
                propagate(k, domain, d, gfn)?;
            }
            return Ok(());
        }
        // A range: the entries the views hold change in place (large pages
        // whole), then the pages whose effective access differs from their
        // run's are written one by one.
        if view == 0 {
            rewrite_range(k, domain, d, gfn, end)
        } else {
            rewrite_view_range(k, domain, d, view, gfn, end)
        }
    }

    /// Sets `gfn`'s suppress-#VE bit in `view`: whether the setting is in
    /// effect (a cleared bit is not while an external agent restricts the
    /// page).
    fn set_sve(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
        suppress: bool,
    ) -> Result<bool, HcError> {
        if !self.domain(domain).views.contains_key(&view) {
            return Err(HcError::NoSuchView { view });
        }
        is_ram(k, domain, gfn)?;
        let quotas = self.quotas;
        let d = self.domain(domain);
        let before = d.settings();
        let new = !d.views[&view].sve.contains_key(&gfn);
        Domain::settings_quota(&quotas, before, before + usize::from(new))?;
        d.views
            .get_mut(&view)
            .expect("checked above")
            .sve
            .insert(gfn, suppress);
        let d = &self.domains[&domain];
        let in_effect = suppress || !d.external(view, gfn);
        if suppress {
            // Only the bit changes, populated or not (seed 004).
            run(
                k,
                domain,
                &[EptOp::SetSuppressVe {
                    view,
                    gfn,
                    suppress: true,
                }],
                view,
                gfn,
            )
        } else {
            refresh(k, domain, d, view, gfn)
        }
        .map(|()| in_effect)
    }
}

/// The answer to a suppress-#VE setting: `NotInEffect` where an external
/// restriction keeps a cleared bit from taking effect.
fn sve_reply(not_in_effect: u16) -> Reply {
    match not_in_effect {
        0 => Reply::Done,
        pages => Reply::NotInEffect { pages },
    }
}

/// The runs of `[start, end)` over which `view`'s entries, where a page
/// maps its own frame, all have one effective access (ALT-8 with dirty
/// tracking): (start, end, access), in order. Pages a change_gfn remaps
/// are the caller's to refresh one by one.
pub fn runs(d: &Domain, view: u16, start: u64, end: u64) -> Vec<(u64, u64, Access, bool)> {
    let mut cuts: BTreeSet<u64> = BTreeSet::new();
    cuts.insert(start);
    cuts.insert(end);
    let host = &d.views[&0].access;
    for (s, e, _) in host.overlapping(start, end) {
        cuts.insert(s);
        cuts.insert(e);
    }
    if view != 0 {
        for (s, e, _) in d.views[&view].access.overlapping(start, end) {
            cuts.insert(s);
            cuts.insert(e);
        }
    }
    if let Some(t) = &d.tracking {
        for (s, e, how) in t.ranges.overlapping(start, end) {
            cuts.insert(s);
            cuts.insert(e);
            if how == Mechanism::WriteProtect {
                // Dirtied frames have write back: cut where the marks change.
                for (a, b) in t.dirtied_runs(s, e) {
                    cuts.insert(a);
                    cuts.insert(b);
                }
            }
        }
    }
    let mut out: Vec<(u64, u64, Access, bool)> = Vec::new();
    let points: Vec<u64> = cuts.into_iter().collect();
    for w in points.windows(2) {
        let (s, e) = (w[0], w[1]);
        let mut a = d.untracked_plain(view, s);
        // Armed where tracking alone takes write away (`EptOp::ArmLift`).
        let mut arm = false;
        if d.tracking
            .as_ref()
            .is_some_and(|t| t.blocks_write(view, s, s))
        {
            arm = a.write;
            a.write = false;
        }
        match out.last_mut() {
            Some(last) if last.1 == s && last.2 == a && last.3 == arm => last.1 = e,
            _ => out.push((s, e, a, arm)),
        }
    }
    out
}

/// Writes `view`'s entries over `[start, end)` as the model says: the runs
/// in place (the entries it holds; holes stay holes), then each remapped
/// page and each page with its own suppress-#VE setting.
fn rewrite_view_range(
    k: &mut impl Kernel,
    domain: u16,
    d: &Domain,
    view: u16,
    start: u64,
    end: u64,
) -> Result<(), HcError> {
    let mut ops: Vec<EptOp> = Vec::new();
    for (s, e, a, arm) in runs(d, view, start, end) {
        ops.push(EptOp::ProtectRange {
            view,
            gfn: s,
            count: e - s,
            perms: perms(a),
        });
        if arm {
            ops.push(EptOp::ArmLift {
                view,
                gfn: s,
                count: e - s,
            });
        }
    }
    run_ranges(k, domain, &ops, view)?;
    let v = &d.views[&view];
    for (&g, _) in v.remap.range(start..end) {
        refresh(k, domain, d, view, g)?;
    }
    for (&g, _) in v.sve.range(start..end) {
        refresh(k, domain, d, view, g)?;
    }
    Ok(())
}

/// Runs ProtectRange operations; a range that only reaches holes is not an
/// error, one past the RAM is.
fn run_ranges(k: &mut impl Kernel, domain: u16, ops: &[EptOp], view: u16) -> Result<(), HcError> {
    for chunk in ops.chunks(ipc_schema::syscall::MAX_EPT_OPS) {
        let mut out = [EptResult::Done; ipc_schema::syscall::MAX_EPT_OPS];
        k.ept(domain, chunk, &mut out[..chunk.len()])
            .map_err(|_| HcError::NoSuchView { view })?;
        for r in &out[..chunk.len()] {
            match r {
                EptResult::Error(EptOpError::NotRam) => return Err(HcError::BadRange),
                EptResult::Error(e) => return Err(op_error(*e, view, 0)),
                _ => {}
            }
        }
    }
    Ok(())
}

/// The host p2m's facts changed over the frames `[start, end)` (an access
/// setting of view 0, tracking): every view's entries there are written
/// again, and every entry elsewhere that a change_gfn points into it.
fn rewrite_range(
    k: &mut impl Kernel,
    domain: u16,
    d: &Domain,
    start: u64,
    end: u64,
) -> Result<(), HcError> {
    for &view in d.views.keys() {
        rewrite_view_range(k, domain, d, view, start, end)?;
    }
    for &(_, w, g) in d.remapped_to.range((start, 0, 0)..(end, 0, 0)) {
        refresh(k, domain, d, w, g)?;
    }
    Ok(())
}

/// Runs of frames (first, count) taken, and where to take on from.
pub type Taken = (Vec<(u64, u64)>, Option<u64>);

impl Altp2m {
    /// Makes new view `view` what the model says it is, all of it at once:
    /// a copy of the host p2m's entries (which hold the host's access and
    /// tracking), then the view's default access and each page where the
    /// view must differ from that copy (a suppress-#VE bit cleared in view
    /// 0, which a new view does not share). A first touch through the view
    /// then costs no exit (ALT-6 allows a lazy fill; none is needed).
    fn fill_view(&mut self, k: &mut impl Kernel, domain: u16, view: u16) -> Result<(), HcError> {
        run(k, domain, &[EptOp::CopyHost { view }], view, 0)?;
        let d = &self.domains[&domain];
        if d.views[&view].default.is_some() {
            let pages = k.domain_info(domain).map_or(0, |(_, pages)| pages);
            if pages > 0 {
                rewrite_view_range(k, domain, d, view, 0, pages)?;
            }
        }
        let cleared: Vec<u64> = d.views[&0]
            .sve
            .iter()
            .filter(|&(_, &suppress)| !suppress)
            .map(|(&g, _)| g)
            .collect();
        for g in cleared {
            fill(k, domain, d, view, g)?;
        }
        Ok(())
    }

    /// Arms (`Some`) or disarms (`None`) dirty tracking of `range` for the
    /// logdirty service ([`crate::tracking`]); the range's dirtied marks
    /// are dropped (the caller took them first).
    pub fn track(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        range: GfnRange,
        how: Option<Mechanism>,
    ) -> Result<(), AltError> {
        let Some((0..=2, pages)) = k.domain_info(domain) else {
            return Err(AltError::NoSuchDomain);
        };
        let end = range
            .end()
            .filter(|&e| range.count > 0 && e <= pages)
            .ok_or(AltError::BadRange)?;
        if (!self.domains.contains_key(&domain) || self.domains[&domain].tracking.is_none())
            && !k.room()
        {
            return Err(AltError::OutOfMemory);
        }
        // The kernel's record first, so that the marks dropped below are
        // all of them.
        self.take_lifted(k, domain);
        let d = self.domain(domain);
        if d.tracking.is_none() {
            if how.is_none() {
                return Ok(());
            }
            d.tracking = Some(Tracking::new(pages).ok_or(AltError::OutOfMemory)?);
        }
        let t = d.tracking.as_mut().expect("made above");
        t.ranges.set(range.gfn, end, how);
        t.clear(range.gfn, end);
        let d = &self.domains[&domain];
        if how.is_some() {
            // Both mechanisms work on 4 KiB entries, in every view: the
            // kernel arms only those (`EptOp::ArmLift`), and PML logs a
            // page per dirty bit it sets. Split first, so that the entries
            // written below are armed as they are made.
            let ops: Vec<EptOp> = d
                .views
                .keys()
                .map(|&view| EptOp::SplitRange {
                    view,
                    gfn: range.gfn,
                    count: range.count,
                })
                .collect();
            run_ranges(k, domain, &ops, 0).map_err(|_| AltError::OutOfMemory)?;
        }
        rewrite_range(k, domain, d, range.gfn, end).map_err(|_| AltError::OutOfMemory)?;
        if how == Some(Mechanism::Pml) {
            // Every dirty bit clear. (Entries a change_gfn points into the
            // range lost write above.)
            let mut ops = Vec::new();
            for (&view, v) in &d.views {
                clear_dirty_ops(v, view, range.gfn, end, &mut ops);
            }
            run(k, domain, &ops, 0, range.gfn).map_err(|_| AltError::OutOfMemory)?;
        }
        let d = self.domain(domain);
        if d.tracking.as_ref().is_some_and(Tracking::is_empty) {
            d.tracking = None;
        }
        Ok(())
    }

    /// The writes the kernel let through (armed entries): their frames are
    /// dirtied as if this service had let the writes through.
    fn take_lifted(&mut self, k: &mut impl Kernel, domain: u16) {
        let mut lifted = [0u64; 64];
        for _ in 0..64 {
            let Ok((n, more)) = k.lifted_take(domain, &mut lifted) else {
                break;
            };
            if let Some(t) = self
                .domains
                .get_mut(&domain)
                .and_then(|d| d.tracking.as_mut())
            {
                for &f in &lifted[..n] {
                    if t.ranges.get(f).is_some() {
                        t.set_dirtied(f);
                    }
                }
            }
            if !more {
                break;
            }
        }
    }

    /// Takes up to `max` runs of frames a write lifted the protection of,
    /// at or after `from`, protecting them again.
    pub fn dirty_take(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        from: u64,
        max: usize,
    ) -> Result<Taken, AltError> {
        self.take_lifted(k, domain);
        let Some(t) = self
            .domains
            .get_mut(&domain)
            .and_then(|d| d.tracking.as_mut())
        else {
            return Ok((Vec::new(), None));
        };
        let (taken, next) = t.take(from, max);
        let d = &self.domains[&domain];
        for &(s, n) in &taken {
            rewrite_range(k, domain, d, s, s + n).map_err(|_| AltError::OutOfMemory)?;
        }
        Ok((taken, next))
    }

    /// PML: clears the dirty bits of the entries of `ranges` in every
    /// view, so that the next write to each is logged again. Entries a
    /// change_gfn remaps are left alone (tracking protects them instead).
    pub fn rearm(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        ranges: &[GfnRange],
    ) -> Result<(), AltError> {
        let Some((0..=2, pages)) = k.domain_info(domain) else {
            return Err(AltError::NoSuchDomain);
        };
        let mut ops: Vec<EptOp> = Vec::new();
        let empty = Domain::default();
        let d = self.domains.get(&domain).unwrap_or(&empty);
        for r in ranges {
            let end = r
                .end()
                .filter(|&e| r.count > 0 && e <= pages)
                .ok_or(AltError::BadRange)?;
            for (&view, v) in &d.views {
                clear_dirty_ops(v, view, r.gfn, end, &mut ops);
            }
        }
        run(k, domain, &ops, 0, 0).map_err(|_| AltError::OutOfMemory)
    }

    /// A write fault of `view` at `gfn` that only dirty tracking refused:
    /// the frame is marked dirtied and every entry that maps it gets write
    /// back (the vCPU retries). `false` when tracking is not the reason.
    pub fn lift(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
        access: ipc_schema::vmexit::AccessBits,
    ) -> Result<bool, HcError> {
        let Some(d) = self.domains.get_mut(&domain) else {
            return Ok(false);
        };
        if !access.write || d.tracking.is_none() || !d.views.contains_key(&view) {
            return Ok(false);
        }
        let plain = d.untracked(view, gfn);
        let frame = plain.frame_gfn.unwrap_or(gfn);
        let allowed = (!access.read || plain.access.read)
            && plain.access.write
            && (!access.execute || plain.access.execute);
        let Some(t) = d.tracking.as_mut() else {
            return Ok(false);
        };
        if !allowed || !t.blocks_write(view, gfn, frame) {
            return Ok(false);
        }
        self.credit_write(k, domain, frame)?;
        Ok(true)
    }

    /// Marks `frame` dirtied for tracking and gives every entry that maps
    /// it write back (tracking's part; the settings' stays).
    fn credit_write(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        frame: u64,
    ) -> Result<(), HcError> {
        let d = self.domain(domain);
        if let Some(t) = d.tracking.as_mut() {
            t.set_dirtied(frame);
        }
        let d = &self.domains[&domain];
        // The host p2m maps every frame a write can reach: written at once,
        // with every copy in the views.
        propagate_with(k, domain, d, frame, &fill_ops(d, 0, frame))
    }

    /// A violation of `view` at `gfn` whose own setting relaxes itself
    /// (Xen's rx2rw and n2rwx): the setting becomes what it relaxes to
    /// (a write to an rx2rw page: read-write; any access to an n2rwx page:
    /// read-write-execute) and the entries are written. Which kind it was,
    /// or `None` where nothing relaxed (another setting, or an rx2rw page
    /// read or fetched). A relaxation the quota refuses (the page splits a
    /// range of settings) leaves the setting as it was.
    pub fn relax(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
        access: ipc_schema::vmexit::AccessBits,
    ) -> Result<Option<Relaxing>, HcError> {
        let Some(s) = self
            .domains
            .get(&domain)
            .filter(|d| d.relaxing)
            .and_then(|d| d.views.get(&view))
            .and_then(|v| v.access.get(gfn))
        else {
            return Ok(None);
        };
        let to = match s.relaxing {
            Some(Relaxing::Rx2Rw) if access.write => Access::RW,
            Some(Relaxing::N2Rwx) => Access::RWX,
            _ => return Ok(None),
        };
        self.set_access(k, domain, view, gfn, 1, to, s.external)?;
        Ok(s.relaxing)
    }

    /// What an allow-once answer opens `gfn` of `view` to for one
    /// instruction: no more than the host p2m gives the frame the entry
    /// maps (a view's own restriction is what it lifts; in view 0, an
    /// agent's setting is). A write it lets through where dirty tracking
    /// protects the frame is credited first, as if it had faulted (LD-1:
    /// no write goes unlogged).
    pub fn open_once(
        &mut self,
        k: &mut impl Kernel,
        domain: u16,
        view: u16,
        gfn: u64,
    ) -> Result<Access, HcError> {
        let d = self.domain(domain);
        if !d.views.contains_key(&view) {
            return Err(HcError::NoSuchView { view });
        }
        let frame = d.settled(view, gfn).0.frame_gfn.unwrap_or(gfn);
        let open = if view == 0 { ALL } else { d.host_access(frame) };
        let blocked = d
            .tracking
            .as_ref()
            .is_some_and(|t| t.blocks_write(view, gfn, frame));
        if open.write && blocked {
            self.credit_write(k, domain, frame)?;
        }
        Ok(open)
    }
}

/// The operations that clear the dirty bits of `view`'s entries over
/// `[start, end)`, but those a change_gfn remaps: under PML tracking those
/// are write-protected instead, and their dirty bit, set when a write
/// lifts them, keeps PML from logging the remapped gfn (LD-4).
fn clear_dirty_ops(v: &View, view: u16, start: u64, end: u64, ops: &mut Vec<EptOp>) {
    let mut at = start;
    for (&g, _) in v.remap.range(start..end) {
        if g > at {
            ops.push(EptOp::ClearDirty {
                view,
                gfn: at,
                count: g - at,
            });
        }
        at = g + 1;
    }
    if end > at {
        ops.push(EptOp::ClearDirty {
            view,
            gfn: at,
            count: end - at,
        });
    }
}
