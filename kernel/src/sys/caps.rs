//! Capabilities: what a handle holds and the checks every system call makes.

use super::Kernel;
use ipc_schema::syscall::{Handle, MAX_HANDLES, ObjectKind, SysError, rights};

/// `Object::Irq` of every line (the root handle; HANDLE_DERIVE picks one).
pub const ALL_LINES: u8 = 0xff;

/// A kernel object a handle refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum Object {
    /// An endpoint, with the server generation this handle last saw (a call
    /// through a handle that saw an older generation fails once with Dead).
    Endpoint {
        id: u16,
        generation: u32,
    },
    Notification(u16),
    Domains,
    /// One domain (by id).
    Domain(u16),
    /// One view of one domain.
    View {
        domain: u16,
        view: u16,
    },
    /// One vCPU of one domain.
    Vcpu {
        domain: u16,
        vcpu: u16,
    },
    Frames(u16),
    MemoryPool,
    IoPorts {
        base: u16,
        count: u16,
    },
    Irq(u8),
    Process(u16),
    System,
    /// The DMA-remapping units (init's root handle).
    Iommu,
    /// One PCI function: segment, source id (bus << 8 | dev << 3 | fn).
    Device {
        segment: u16,
        source: u16,
    },
    /// One IoSpace (by slot).
    IoSpace(u16),
}

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Endpoint { .. } => ObjectKind::Endpoint,
            Object::Notification(_) => ObjectKind::Notification,
            Object::Domains => ObjectKind::Domains,
            Object::Domain(_) => ObjectKind::Domain,
            Object::View { .. } => ObjectKind::View,
            Object::Vcpu { .. } => ObjectKind::Vcpu,
            Object::Frames(_) => ObjectKind::Frames,
            Object::MemoryPool => ObjectKind::MemoryPool,
            Object::IoPorts { .. } => ObjectKind::IoPorts,
            Object::Irq(_) => ObjectKind::Irq,
            Object::Process(_) => ObjectKind::Process,
            Object::System => ObjectKind::System,
            Object::Iommu => ObjectKind::Iommu,
            Object::Device { .. } => ObjectKind::Device,
            Object::IoSpace(_) => ObjectKind::IoSpace,
        }
    }
}

/// One handle: an object, the rights, the badge the receiver of a call
/// through it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub struct Cap {
    pub object: Object,
    pub rights: u32,
    pub badge: u64,
}

/// A service's handle table.
pub type Handles = [Option<Cap>; MAX_HANDLES];

/// What a frames object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum FramesKind {
    /// A boot module (read-only to everyone).
    Module,
    /// RAM from the memory pool.
    Ram,
    /// A device's memory BAR (mapped uncached; never RAM, never a
    /// domain's or a process image).
    Mmio,
    /// A reserved memory region of the DMAR (RMRR): never mapped into a
    /// service; given to a domain only at gfn = frame (identity).
    Reserved,
}

/// A contiguous run of physical frames.
#[derive(Clone, Copy, Debug)]
pub struct FramesObject {
    pub base: u64,
    pub count: u64,
    /// Meaningful bytes (a module's length).
    pub len: u64,
    pub kind: FramesKind,
    /// Guest RAM of a domain now: no longer mappable into services.
    pub given_to_domain: bool,
    /// Mapped into a service's address space at some time: never guest RAM
    /// (the service would keep a way into the guest's memory).
    pub ever_mapped: bool,
}

/// Why a handle check failed (logged with the call).
#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct CapError {
    pub error: SysError,
    pub handle: Handle,
    /// The right that was missing, if that was the problem.
    pub needed: u32,
}

impl From<CapError> for SysError {
    fn from(e: CapError) -> Self {
        e.error
    }
}

impl Kernel {
    /// The capability in `pid`'s slot `handle`, if it holds one there.
    pub fn handle(&self, pid: u16, handle: u64) -> Option<Cap> {
        let p = self.processes.get(usize::from(pid))?.as_ref()?;
        p.handles
            .get(usize::try_from(handle).ok()?)
            .copied()
            .flatten()
    }

    /// The capability in `pid`'s slot `handle`, checked for `kind` and
    /// `needed` rights.
    pub fn cap(
        &self,
        pid: u16,
        handle: u64,
        kind: ObjectKind,
        needed: u32,
    ) -> Result<Cap, CapError> {
        let h = u32::try_from(handle).unwrap_or(u32::MAX);
        let fail = |error, needed| CapError {
            error,
            handle: h,
            needed,
        };
        let cap = self
            .handle(pid, handle)
            .ok_or(fail(SysError::NoSuchHandle, 0))?;
        if cap.object.kind() != kind {
            return Err(fail(SysError::WrongKind, 0));
        }
        if cap.rights & needed != needed {
            return Err(fail(SysError::MissingRight, needed & !cap.rights));
        }
        Ok(cap)
    }

    /// The capability in `pid`'s slot `handle` for an operation on domain
    /// `domain` (and, for view and vCPU operations, view `view` or vCPU
    /// `vcpu`), checked for `needed` rights: the all-domains handle allows
    /// any, a domain handle its domain, a view or vCPU handle only
    /// operations on that view or vCPU.
    pub fn domain_cap(
        &self,
        pid: u16,
        handle: u64,
        domain: u64,
        scope: Scope,
        needed: u32,
    ) -> Result<Cap, CapError> {
        let h = u32::try_from(handle).unwrap_or(u32::MAX);
        let fail = |error, needed| CapError {
            error,
            handle: h,
            needed,
        };
        let cap = self
            .handle(pid, handle)
            .ok_or(fail(SysError::NoSuchHandle, 0))?;
        let same = |d: u16| u64::from(d) == domain;
        match (cap.object, scope) {
            (Object::Domains, _) => {}
            (Object::Domain(d), _) if same(d) => {}
            (Object::View { domain: d, view }, Scope::View(v)) if same(d) && v == view => {}
            (Object::Vcpu { domain: d, vcpu }, Scope::Vcpu(v)) if same(d) && v == vcpu => {}
            (Object::Domain(_) | Object::View { .. } | Object::Vcpu { .. }, _) => {
                return Err(fail(SysError::OutOfScope, 0));
            }
            _ => return Err(fail(SysError::WrongKind, 0)),
        }
        if cap.rights & needed != needed {
            return Err(fail(SysError::MissingRight, needed & !cap.rights));
        }
        Ok(cap)
    }

    /// The caller's handle slot, for updating (generation of an endpoint).
    pub fn cap_mut(&mut self, pid: u16, handle: u64) -> Option<&mut Cap> {
        self.processes[usize::from(pid)]
            .as_mut()?
            .handles
            .get_mut(usize::try_from(handle).ok()?)?
            .as_mut()
    }

    /// Puts `cap` into the first free slot of `pid`'s table.
    pub fn install(&mut self, pid: u16, cap: Cap) -> Result<Handle, SysError> {
        let p = self.processes[usize::from(pid)]
            .as_mut()
            .ok_or(SysError::NoSuchHandle)?;
        let slot = free_slot(&p.handles)?;
        p.handles[slot] = Some(cap);
        Ok(slot as Handle)
    }
}

/// The first free place in `slots`, else `NoResources`.
pub fn free_slot<T>(slots: &[Option<T>]) -> Result<usize, SysError> {
    slots
        .iter()
        .position(Option::is_none)
        .ok_or(SysError::NoResources)
}

/// What part of a domain an operation touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The domain as a whole.
    Domain,
    /// One view.
    View(u16),
    /// One vCPU.
    Vcpu(u16),
}

/// Names of rights, for logs: the first missing one.
pub fn right_name(bits: u32) -> &'static str {
    rights::NAMES
        .iter()
        .find(|(_, b)| bits & b != 0)
        .map_or("?", |(n, _)| n)
}
