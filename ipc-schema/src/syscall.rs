//! The system-call ABI between ring-3 services and the kernel.
//!
//! A service executes `int 0x80` with the call number in RAX and arguments in
//! RDI, RSI, RDX, R10, R8, R9. The kernel answers in RAX with a [`SysError`]
//! code (0 for success) and values in RDI, RSI, RDX. Every other register is
//! preserved.
//!
//! A service names kernel objects through handles: small indexes into its
//! own handle table, each holding one object and the [`Rights`] it may use on
//! it. The tables are filled from the system manifest when a service starts;
//! a call with a handle the service does not hold, or without the right it
//! needs, fails with [`SysError::NoSuchHandle`] or [`SysError::MissingRight`]
//! and is logged by the kernel.

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// Longest IPC message, in bytes (Hubris uses 256 too).
pub const MAX_MESSAGE: usize = 256;
/// Slots in a service's handle table.
pub const MAX_HANDLES: usize = 96;
/// Handles a service may hold for other services to call it through, etc.
pub type Handle = u32;

/// System-call numbers (RAX).
pub mod nr {
    /// LOG(frame_ptr, len): one defmt frame into the log wire, tagged with
    /// the caller's source number.
    pub const LOG: u64 = 0;
    /// CALL(endpoint, msg_ptr, msg_len, reply_ptr, reply_cap) -> RDI = reply length.
    pub const CALL: u64 = 1;
    /// RECV(mask, buf_ptr, buf_cap): waits for a message on any endpoint, or
    /// bits on any notification, among the handle slots set in `mask`.
    /// A message: RDI = length, RSI = reply token, RDX = badge, R10 = slot.
    /// Notification bits: RDI = 0, RSI = 0, R10 = slot, R8 = the bits.
    pub const RECV: u64 = 2;
    /// REPLY(token, msg_ptr, msg_len).
    pub const REPLY: u64 = 3;
    /// REPLY_RECV(token, msg_ptr, msg_len, mask, buf_ptr, buf_cap) -> as RECV.
    /// A token of 0 replies to nobody (the first receive of a server loop).
    pub const REPLY_RECV: u64 = 4;
    /// NOTIFY(notification, bits).
    pub const NOTIFY: u64 = 5;
    /// WAIT(notification) -> RDI = the bits that were set (now clear).
    pub const WAIT: u64 = 6;
    /// YIELD(): let others run.
    pub const YIELD: u64 = 7;
    /// EXIT(code): the service ends; its supervisor is told.
    pub const EXIT: u64 = 8;
    /// HANDLE_INFO(handle) -> RDI = kind ([`super::ObjectKind`] code), RSI = rights bits.
    pub const HANDLE_INFO: u64 = 9;
    /// TIME() -> RDI = microseconds since boot, RSI = TSC frequency in Hz.
    pub const TIME: u64 = 10;
    /// HANDLE_CLOSE(handle): the slot becomes free. The object lives on
    /// (frames given to a domain stay the domain's).
    pub const HANDLE_CLOSE: u64 = 11;

    /// FRAMES_MAP(frames, first_frame, count, va, writable): map frames the
    /// caller holds into its own address space.
    pub const FRAMES_MAP: u64 = 16;
    /// FRAMES_UNMAP(va, count).
    pub const FRAMES_UNMAP: u64 = 17;
    /// FRAMES_ALLOC(memory pool, count, align_frames) -> RDI = a new frames handle.
    pub const FRAMES_ALLOC: u64 = 18;
    /// FRAMES_INFO(frames) -> RDI = frame count, RSI = byte length (modules).
    pub const FRAMES_INFO: u64 = 19;

    /// ENDPOINT_CREATE() -> RDI = handle (all rights). Needs a factory.
    pub const ENDPOINT_CREATE: u64 = 24;
    /// NOTIFICATION_CREATE() -> RDI = handle.
    pub const NOTIFICATION_CREATE: u64 = 25;
    /// PROCESS_SPAWN(elf frames, spec_ptr, spec_len) -> RDI = process handle.
    /// The spec is a postcard [`super::SpawnSpec`].
    pub const PROCESS_SPAWN: u64 = 26;
    /// PROCESS_RESTART(process, elf frames or u32::MAX for the same ELF) -> RDI = generation.
    pub const PROCESS_RESTART: u64 = 27;
    /// PROCESS_KILL(process).
    pub const PROCESS_KILL: u64 = 28;
    /// PROCESS_STATUS(process) -> RDI = [`super::ProcessState`] code, RSI = generation, RDX = faults so far
    /// (once it ended by EXIT: its exit code).
    pub const PROCESS_STATUS: u64 = 29;
    /// FAULT_WATCH(process, notification, bit): a fault of the process sets `bit`.
    pub const FAULT_WATCH: u64 = 30;
    /// HALT(status): ends the run (needs the system handle).
    pub const HALT: u64 = 31;

    /// DOMAIN_CREATE(domains, name_ptr, name_len, flags) -> RDI = domain
    /// id. Flags: [`super::DOMAIN_PROTECTED`].
    pub const DOMAIN_CREATE: u64 = 32;
    /// DOMAIN_MAP_RAM(domains, domain, gfn, frames, count): the frames become
    /// guest RAM at `gfn` in the host p2m (2 MiB pages where aligned).
    pub const DOMAIN_MAP_RAM: u64 = 33;
    /// DOMAIN_WRITE(domains, domain, gpa, buf_ptr, len): write guest RAM.
    pub const DOMAIN_WRITE: u64 = 34;
    /// DOMAIN_READ(domains, domain, gpa, buf_ptr, len): read guest RAM.
    pub const DOMAIN_READ: u64 = 35;
    /// VCPU_CREATE(domains, domain, spec_ptr, spec_len) -> RDI = vCPU index.
    /// The spec is a postcard [`super::VcpuSpec`].
    pub const VCPU_CREATE: u64 = 36;
    /// DOMAIN_CONTROL(domains, domain, op): see [`super::DomainOp`].
    pub const DOMAIN_CONTROL: u64 = 37;
    /// DOMAIN_INFO(domains, domain) -> RDI = [`super::DomainState`] code,
    /// RSI = exit status (bits 0-31), foreign-mapped pages (bits 32-62)
    /// and whether it is protected (bit 63), RDX = RAM bytes.
    pub const DOMAIN_INFO: u64 = 38;
    /// CONSOLE(domains, domain, buf_ptr, len): bytes the guest wrote to its
    /// console, into the log wire.
    pub const CONSOLE: u64 = 39;

    /// VIEW_CREATE(domains, domain) -> RDI = view index (empty view).
    pub const VIEW_CREATE: u64 = 40;
    /// VIEW_DESTROY(domains, domain, view).
    pub const VIEW_DESTROY: u64 = 41;
    /// VIEW_SET_VISIBLE(domains, domain, view, visible).
    pub const VIEW_SET_VISIBLE: u64 = 42;
    /// EPT_OPS(domains, domain, ops_ptr, ops_len, results_ptr, results_cap):
    /// a postcard `BoundedVec<EptOp, MAX_EPT_OPS>`; the postcard
    /// `BoundedVec<EptResult, MAX_EPT_OPS>`, one per op, is written to
    /// `results_ptr` -> RDI = its length.
    pub const EPT_OPS: u64 = 43;
    /// VCPU_SET_VIEW(domains, domain, vcpu, view).
    pub const VCPU_SET_VIEW: u64 = 44;
    /// VCPU_CONTROL(domains, domain, vcpu, op, arg): see [`super::VcpuOp`].
    pub const VCPU_CONTROL: u64 = 45;
    /// DOMAIN_WRITES(domains, domain, buf_ptr, cap_pairs) -> RDI = pairs
    /// written, RSI = 1 if some writes were not recorded (the record was
    /// full). Takes the record of guest memory the kernel wrote on a
    /// service's behalf (DOMAIN_WRITE) while `VcpuOp::WritesLog` is on, as
    /// (gfn, pages) u64 pairs, and the #VE information page while #VE is
    /// on (the CPU writes it). Needs `vcpus`.
    pub const DOMAIN_WRITES: u64 = 46;
    /// DOMAIN_WATCH(domains, notification, bit): a domain that ends sets
    /// `bit` on the notification. Needs `read` on the domains handle; up to
    /// [`super::DOMAIN_WATCHERS`] notifications (the same one again changes
    /// its bit; `NoResources` past that).
    pub const DOMAIN_WATCH: u64 = 47;

    /// IO_IN(ioports, port, size) -> RDI = value.
    pub const IO_IN: u64 = 48;
    /// IO_OUT(ioports, port, size, value).
    pub const IO_OUT: u64 = 49;
    /// IRQ_BIND(irq, notification, bit): the interrupt sets `bit`. With the
    /// Iommu handle (`device`) instead of an Irq: the units' fault interrupt
    /// (IO-6) sets it, the holder then takes the records (IOMMU_FAULTS).
    pub const IRQ_BIND: u64 = 50;
    /// HANDLE_DERIVE(handle, a, b, rights) -> RDI = a new handle to part of
    /// the object, with the parent's rights masked by `rights` (0: all of
    /// them): I/O ports `a .. a + b`; IRQ line `a` of the all-lines handle;
    /// from `Domains`, `a` = [`ObjectKind::Domain`] and `b` a domain id;
    /// from a domain, `a` = [`ObjectKind::View`] or [`ObjectKind::Vcpu`] and
    /// `b` its index.
    pub const HANDLE_DERIVE: u64 = 51;
    /// VM_FEATURES() -> RDI = [`super::vm_features`] bits (0 without VMX).
    pub const VM_FEATURES: u64 = 52;
    /// VCPU_INFO(domains, domain, vcpu) -> RDI = its active view, RSI = its
    /// VM exits so far.
    pub const VCPU_INFO: u64 = 53;
    /// LIFTED_TAKE(domains, domain, buf_ptr, cap) -> RDI = frames written
    /// (u64 gfns), RSI = 1 if more remain: the frames whose armed entries
    /// (`EptOp::ArmLift`) a write lifted, oldest first. Needs `views`.
    pub const LIFTED_TAKE: u64 = 54;
    /// VCPU_REGS(domains, domain, vcpu, buf_ptr, set_mask): with
    /// `set_mask` 0, writes the vCPU's [`super::regs::COUNT`] registers
    /// (little-endian u64s, in [`super::regs`] order) to `buf_ptr` (needs
    /// `read`); otherwise reads as many from `buf_ptr` and sets those whose
    /// bit is in `set_mask` (needs `write`; the domain paused, or the
    /// caller handling the vCPU's exit while it waits). A value VM
    /// entry would refuse is refused whole (`BadArgument`, RDI = `1 << 63`
    /// with the index of the first bad register), the vCPU unchanged.
    pub const VCPU_REGS: u64 = 55;
    /// FOREIGN_MAP(domains, domain, gfn, count, va, writable): maps `count`
    /// pages of the domain's RAM from `gfn` (the host p2m's frames) into
    /// the caller at `va`, in the map window ([`layout::MAP_BASE`] ..
    /// [`layout::MAP_END`]). Needs `read` (and `write` for `writable`).
    /// Counted per domain (DOMAIN_INFO); at most [`super::FOREIGN_MAPS`]
    /// mappings a process (`NoResources` past that), each of at most
    /// [`super::FOREIGN_PAGES`] pages. A running protected domain is
    /// refused (`Busy`); a gfn outside RAM is `BadAddress`.
    ///
    /// [`layout::MAP_BASE`]: super::layout::MAP_BASE
    /// [`layout::MAP_END`]: super::layout::MAP_END
    pub const FOREIGN_MAP: u64 = 56;
    /// FOREIGN_UNMAP(va, count): undoes the FOREIGN_MAP made at `va` with
    /// `count` pages (exactly that one; `BadArgument` otherwise).
    pub const FOREIGN_UNMAP: u64 = 57;
    /// IO_OUT_BYTES(ioports, port, buf_ptr, len): writes the `len` bytes
    /// at `buf_ptr` (at most [`super::IO_OUT_MAX`]) to the one byte port
    /// `port`, in order, as `len` IO_OUT calls of size 1 would (the same
    /// checks), in one call: a string to a UART's or a debug port's data
    /// register.
    pub const IO_OUT_BYTES: u64 = 58;
    /// DOMAIN_GRANT(domains, domain, gfn, count, grant): the guest's own
    /// word, passed on by its vmm, that its RAM pages `gfn .. gfn + count`
    /// are granted (`grant` 1) or no longer (0). A foreign mapping that lies
    /// within one granted range may be made while a protected domain runs,
    /// and does not keep it paused (FM-2's exception). At most
    /// [`super::GUEST_GRANTS`] ranges a domain (`NoResources`; granting a
    /// range again is done), each of 1 to [`super::FOREIGN_PAGES`] pages
    /// (`BadArgument`); pages outside RAM `BadAddress`;
    /// ungranting a range not granted exactly so `BadArgument`, one that a
    /// mapping made on its strength still uses `Busy`. Needs `vcpus`.
    pub const DOMAIN_GRANT: u64 = 59;
    /// DOMAIN_FORK(domains, parent, name_ptr, name_len) -> child: VM fork
    /// (docs/sharing.md). A new domain whose host p2m maps every page of
    /// `parent`'s read-only (a page is copied at the fork's first write to
    /// it) and whose vCPU has the parent's state; its exits and violations
    /// go where the parent's go. It is paused; the parent must be paused,
    /// with no exit in a service's hands (`Busy`), not protected
    /// (`BadArgument`), and stays paused while it has forks (unpause and
    /// destroy `Busy`). `DomainOp::Reset` takes a fork back to its
    /// parent's state. Needs `build` on the `domains` handle.
    pub const DOMAIN_FORK: u64 = 60;

    // The IOMMU (issue 12): numbers taken from the top of the range.

    /// IOSPACE_CREATE(iommu) -> RDI = a new IoSpace handle (rights
    /// `device`): empty DMA page tables with a domain id of their own.
    /// Needs `create` on the Iommu handle.
    pub const IOSPACE_CREATE: u64 = 127;
    /// IOSPACE_ATTACH(iospace, device, attach): `attach` 1 points the
    /// device's context entry at the IoSpace (`Busy` when attached to
    /// another), 0 clears it (its DMA blocked again); the context cache and
    /// IOTLB invalidated before the call returns. Needs `device` on both.
    pub const IOSPACE_ATTACH: u64 = 126;
    /// IOSPACE_MAP(iospace, domains, domain, pairs_ptr, count, writable):
    /// `count` (1 to [`super::IO_BATCH`]) u64 pairs (gfn, bfn): bus frame
    /// `bfn` maps the domain's RAM frame of `gfn` (host p2m). All or
    /// nothing: a gfn outside RAM `BadAddress`, a bfn out of range or
    /// mapped already `BadArgument` (the pair logged), nothing mapped.
    /// Needs `device` on the IoSpace, `read` (and `write` for writable) on
    /// the domain.
    pub const IOSPACE_MAP: u64 = 125;
    /// IOSPACE_UNMAP(iospace, bfns_ptr, count) -> RDI = pages unmapped,
    /// RSI = IOTLB invalidations issued (1): every bfn must be mapped
    /// (`BadArgument` otherwise, nothing changed); one domain-selective
    /// IOTLB invalidation, waited for, before the call returns (IO-3).
    pub const IOSPACE_UNMAP: u64 = 124;
    /// IOMMU_FAULTS(iommu, buf_ptr, cap) -> RDI = records written
    /// ([`super::IoFault`], 16 bytes each), RSI = IOTLB invalidations
    /// since boot, RDX = faults lost (overflow): takes the units' fault
    /// records and clears them. Needs `device` on the Iommu handle.
    pub const IOMMU_FAULTS: u64 = 123;
    /// IOMMU_RMRR(iommu, index, buf_ptr, cap, frames): reserved memory
    /// region `index` of the DMAR (RMRR-1). With `frames` 0: RDI = its first
    /// byte, RSI = its last, RDX = device scopes written to `buf` (u32 each:
    /// segment << 16 | source id of the function a PCI scope's path leads
    /// to through the bridges; a sub-hierarchy scope's bridge).
    /// With `frames` 1: RDI = a new Frames handle of exactly the region
    /// (kind reserved: never mapped into a service, given to a domain only
    /// at gfn = frame, RMRR-4), refused where any of it is RAM the kernel
    /// allocates. Past the last region `BadArgument`. Needs `create` on the
    /// Iommu handle.
    pub const IOMMU_RMRR: u64 = 122;
    /// DEVICE_RESET(device) -> RDI = how (0 FLR, 1 Advanced Features FLR,
    /// 2 secondary bus reset through the bridge above it, 3 bus mastering
    /// turned off and on: nothing else reset): resets the PCI function
    /// (segment 0) by the best means it offers, its header (BARs, command,
    /// interrupt line) written back after (IO-6: a device that faulted).
    /// In steps: RSI = the microseconds to wait before calling again (the
    /// reset's own waits: pending transactions, 100 ms after an FLR, 2 ms
    /// holding a bus reset and 100 ms after it), 0 when it is done; the
    /// kernel does not spin through them. A call before the wait is over
    /// answers what is left of it. A function that no longer answers
    /// `Busy`; more than 8 resets under way `NoResources`. Needs `device`
    /// on the Device handle.
    pub const DEVICE_RESET: u64 = 121;
    /// DEVICE_CONFIG(device, offset, size, op, value) -> RDI = the value
    /// read: the function's configuration space (segment 0, its first 256
    /// bytes, the configuration ports' reach), `size` 1, 2 or 4 bytes at
    /// an `offset` aligned to it ([`super::device_config`] ops): a read;
    /// a write of `value`, refused where it would hurt the host whatever
    /// the holder's policy (any byte of a BAR or the ROM BAR, a bridge's
    /// 0x10..=0x3f, the MSI and MSI-X capabilities: no interrupt
    /// remapping; a function-level reset's bit, PCIe or AF: the BARs would
    /// be cleared and not written back); a BAR probe (`size` 4, a BAR or ROM BAR register):
    /// what it reads after all ones are written, with decoding off, the
    /// BAR and command written back (its size without moving it).
    /// Refusals are `BadArgument`, named in the kernel log
    /// (`platform::pci::ConfigRefusal`). Needs `device` on the Device
    /// handle.
    pub const DEVICE_CONFIG: u64 = 120;
}

/// The most pairs (IOSPACE_MAP) or bus frames (IOSPACE_UNMAP) in one call.
pub const IO_BATCH: u64 = 512;

/// One DMA fault a unit recorded (IOMMU_FAULTS), 16 bytes little-endian:
/// address (u64), source (u16: bus << 8 | device << 3 | function), segment
/// (u16), reason (u8, the VT-d fault reason), write (u8), unit (u8), 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFault {
    pub address: u64,
    pub source: u16,
    pub segment: u16,
    pub reason: u8,
    pub write: bool,
    pub unit: u8,
}

impl IoFault {
    pub const SIZE: usize = 16;

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.address.to_le_bytes());
        b[8..10].copy_from_slice(&self.source.to_le_bytes());
        b[10..12].copy_from_slice(&self.segment.to_le_bytes());
        b[12] = self.reason;
        b[13] = self.write as u8;
        b[14] = self.unit;
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            address: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            source: u16::from_le_bytes([b[8], b[9]]),
            segment: u16::from_le_bytes([b[10], b[11]]),
            reason: b[12],
            write: b[13] != 0,
            unit: b[14],
        }
    }
}

/// Ranges of its RAM a guest grants at once (DOMAIN_GRANT).
pub const GUEST_GRANTS: usize = 8;

/// The most bytes one IO_OUT_BYTES writes.
pub const IO_OUT_MAX: u64 = 4096;

/// Foreign mappings a process holds at once (FOREIGN_MAP).
pub const FOREIGN_MAPS: usize = 16;
/// Pages one foreign mapping covers at most.
pub const FOREIGN_PAGES: u64 = 512;
/// DOMAIN_CREATE's flags: the domain is protected (not started or
/// unpaused while foreign mappings into it exist; FM-2).
pub const DOMAIN_PROTECTED: u64 = 1;
/// DOMAIN_INFO's RSI: the exit status in bits 0-31, the pages services
/// have foreign-mapped in bits 32-62, and [`DOMAIN_INFO_PROTECTED`].
pub const DOMAIN_INFO_PROTECTED: u64 = 1 << 63;

/// The registers VCPU_REGS reads and writes, by index.
pub mod regs {
    pub const RAX: usize = 0;
    pub const RBX: usize = 1;
    pub const RCX: usize = 2;
    pub const RDX: usize = 3;
    pub const RSI: usize = 4;
    pub const RDI: usize = 5;
    pub const RBP: usize = 6;
    pub const RSP: usize = 7;
    /// R8 to R15 follow at 8 to 15.
    pub const R8: usize = 8;
    pub const RIP: usize = 16;
    pub const RFLAGS: usize = 17;
    /// As the guest reads them (the bits VMX requires and the host keeps
    /// set under its feet shown as the guest last wrote them).
    pub const CR0: usize = 18;
    pub const CR3: usize = 19;
    pub const CR4: usize = 20;
    pub const EFER: usize = 21;
    pub const CS_BASE: usize = 22;
    pub const DS_BASE: usize = 23;
    pub const ES_BASE: usize = 24;
    pub const FS_BASE: usize = 25;
    pub const GS_BASE: usize = 26;
    pub const SS_BASE: usize = 27;
    pub const GDTR_BASE: usize = 28;
    pub const IDTR_BASE: usize = 29;
    /// Read only: the CS selector (bits 0-15) and access rights (bits
    /// 16-31, the VMCS layout: bit 13 of them, L, is 64-bit code).
    pub const CS: usize = 30;
    /// Read only: the vCPU's active view (bits 0-15) and its VM exits so
    /// far (bits 16-63).
    pub const INFO: usize = 31;
    pub const COUNT: usize = 32;
    /// The registers a set may change (all but CS and INFO).
    pub const SETTABLE: u64 = (1 << CS) - 1;

    /// Each register's name, by index (`cargo hv ctl regs`).
    pub const NAMES: [&str; COUNT] = [
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rbp",
        "rsp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
        "rip",
        "rflags",
        "cr0",
        "cr3",
        "cr4",
        "efer",
        "cs_base",
        "ds_base",
        "es_base",
        "fs_base",
        "gs_base",
        "ss_base",
        "gdtr_base",
        "idtr_base",
        "cs",
        "info",
    ];
}

/// Notifications DOMAIN_WATCH can tell at once.
pub const DOMAIN_WATCHERS: usize = 4;

/// The status in RAX.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u64)]
pub enum SysError {
    Ok = 0,
    /// No such system call.
    UnknownCall = 1,
    /// The handle slot is empty or out of range.
    NoSuchHandle = 2,
    /// The handle is to another kind of object.
    WrongKind = 3,
    /// The handle lacks a right the call needs.
    MissingRight = 4,
    /// A pointer or length names memory the caller cannot access.
    BadAddress = 5,
    /// A message longer than [`MAX_MESSAGE`].
    MessageTooLong = 6,
    /// The reply did not fit the caller's buffer.
    ReplyTooLong = 7,
    /// The peer died or was restarted; RDI holds its new generation. The
    /// call was not (or not completely) served.
    Dead = 8,
    /// An argument is out of range or malformed (named in the kernel log).
    BadArgument = 9,
    /// Out of memory, handle slots or object slots.
    NoResources = 10,
    /// The token names no caller waiting for a reply.
    BadToken = 11,
    /// The object is busy (a view in use, a domain running).
    Busy = 12,
    /// The CPU lacks the feature.
    Unsupported = 13,
    /// The handle is for another domain, view or vCPU than the call names
    /// (or for a narrower object than the call needs).
    OutOfScope = 14,
    /// Nothing serves the endpoint: the service that did has ended (its
    /// supervisor holds it after faults, or it exited) and no other has
    /// waited on the endpoint since. Calls fail at once instead of waiting.
    NoServer = 15,
    /// The domain is protected and services hold foreign mappings of its
    /// memory: it is not started or unpaused until they are gone (FM-2).
    ForeignMapped = 16,
}

impl SysError {
    pub fn from_raw(v: u64) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::UnknownCall,
            2 => Self::NoSuchHandle,
            3 => Self::WrongKind,
            4 => Self::MissingRight,
            5 => Self::BadAddress,
            6 => Self::MessageTooLong,
            7 => Self::ReplyTooLong,
            8 => Self::Dead,
            9 => Self::BadArgument,
            10 => Self::NoResources,
            11 => Self::BadToken,
            12 => Self::Busy,
            13 => Self::Unsupported,
            14 => Self::OutOfScope,
            15 => Self::NoServer,
            16 => Self::ForeignMapped,
            _ => return None,
        })
    }
}

/// Kinds of kernel objects a handle can hold.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum ObjectKind {
    Endpoint = 1,
    Notification = 2,
    /// Every guest domain (operations name a domain by id).
    Domains = 3,
    /// A range of physical frames (RAM or a boot module).
    Frames = 4,
    /// The pool new frames come from.
    MemoryPool = 5,
    /// A range of I/O ports.
    IoPorts = 6,
    /// A range of MMIO pages.
    Mmio = 7,
    /// An interrupt line.
    Irq = 8,
    /// A service (for its supervisor).
    Process = 9,
    /// Creating endpoints, notifications and processes; halting the system.
    System = 10,
    /// One domain (derived from `Domains`): every operation on it.
    Domain = 11,
    /// One view of one domain (derived from a domain): changing that view.
    View = 12,
    /// One vCPU of one domain (derived from a domain): its controls.
    Vcpu = 13,
    /// The DMA-remapping units (init's root handle): device handles are
    /// derived from it, IoSpaces created and DMA faults read with it.
    Iommu = 14,
    /// One PCI function (segment, bus, device, function) behind a unit.
    Device = 15,
    /// One set of DMA page tables (bus frame -> a domain's frame) that
    /// devices are attached to.
    IoSpace = 16,
}

/// What a handle allows. Calls name the right they need.
pub mod rights {
    /// Endpoint: call the service that receives on it.
    pub const CALL: u32 = 1 << 0;
    /// Endpoint: receive calls on it and reply.
    pub const RECEIVE: u32 = 1 << 1;
    /// Notification: set bits. Process: restart, kill, watch faults.
    pub const SIGNAL: u32 = 1 << 2;
    /// Notification: wait for bits.
    pub const WAIT: u32 = 1 << 3;
    /// Frames: map readable. Domains: read guest memory and state.
    pub const READ: u32 = 1 << 4;
    /// Frames: map writable. Domains: write guest memory.
    pub const WRITE: u32 = 1 << 5;
    /// Domains: create domains and vCPUs, map RAM, start, pause, destroy.
    pub const BUILD: u32 = 1 << 6;
    /// Domains: create, destroy and change views; switch vCPU views.
    pub const VIEWS: u32 = 1 << 7;
    /// Domains: vCPU controls (#VE, dirty logging), console output.
    pub const VCPUS: u32 = 1 << 8;
    /// Memory pool: allocate frames. System: create objects, spawn, halt.
    pub const CREATE: u32 = 1 << 9;
    /// I/O ports, MMIO, IRQ: use the device.
    pub const DEVICE: u32 = 1 << 10;
    pub const ALL: u32 = (1 << 11) - 1;

    /// Names, for manifests and logs.
    pub const NAMES: [(&str, u32); 11] = [
        ("call", CALL),
        ("receive", RECEIVE),
        ("signal", SIGNAL),
        ("wait", WAIT),
        ("read", READ),
        ("write", WRITE),
        ("build", BUILD),
        ("views", VIEWS),
        ("vcpus", VCPUS),
        ("create", CREATE),
        ("device", DEVICE),
    ];

    /// The bit of a right's name.
    pub fn by_name(name: &str) -> Option<u32> {
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }
}

/// One handle a new process gets: a handle of the spawner's, with at most its
/// rights (`rights` masks them), a badge the receiver of its calls sees, put
/// in slot `slot` of the new table.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct Grant {
    pub slot: u32,
    pub from: Handle,
    pub rights: u32,
    pub badge: u64,
    /// The name the new process finds the handle under (NUL-padded).
    pub name: HandleName,
}

/// What PROCESS_SPAWN starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub struct SpawnSpec {
    /// The service's name (NUL-padded).
    pub name: HandleName,
    pub grants: crate::ipc::BoundedVec<Grant, MAX_HANDLES>,
    /// Started to take over from a running instance (a swap).
    pub successor: bool,
}

/// A process's life.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u64)]
pub enum ProcessState {
    Running = 0,
    /// Stopped by a fault; waiting for its supervisor.
    Faulted = 1,
    /// Ended by EXIT or PROCESS_KILL.
    Ended = 2,
}

/// How a vCPU starts and where its exits go.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
pub struct VcpuSpec {
    /// 32-bit protected-mode entry point (a multiboot entry).
    pub entry: u32,
    pub rax: u64,
    pub rbx: u64,
    /// Endpoint (a handle of the caller, with CALL) that receives the vCPU's
    /// exits.
    pub exit_endpoint: Handle,
    /// Endpoint that receives its EPT violations.
    pub violation_endpoint: Handle,
}

/// DOMAIN_CONTROL operations.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u64)]
pub enum DomainOp {
    Start = 0,
    Pause = 1,
    Unpause = 2,
    Destroy = 3,
    /// VM fork's reset: a fork (paused, exited or crashed) gets its
    /// parent's memory and vCPU state again, in time proportional to the
    /// pages it wrote; it is paused after.
    Reset = 4,
}

/// A domain's life, as DOMAIN_INFO reports it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u64)]
pub enum DomainState {
    Building = 0,
    Running = 1,
    Paused = 2,
    Exited = 3,
    Crashed = 4,
    Destroyed = 5,
}

impl DomainState {
    /// Whether a domain in state `code` (DOMAIN_INFO's) is live: building,
    /// running or paused, not exited, crashed or destroyed (its views,
    /// logs and other records went with its end).
    pub const fn live(code: u64) -> bool {
        code <= DomainState::Paused as u64
    }
}

/// VCPU_CONTROL operations.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u64)]
pub enum VcpuOp {
    /// #VE with the information area at guest frame `arg`.
    VeEnable = 0,
    VeDisable = 1,
    /// Page-modification logging on: `arg` = a frames handle of the
    /// caller's (low 32 bits) and the first of two frames in it (high 32
    /// bits), which become the vCPU's two PML buffers (the CPU writes GPAs
    /// into one while the caller reads the other); the sixth argument is an
    /// endpoint the caller receives on, where a full buffer is sent as an
    /// `ExitKind::PmlFull` exit. Entries and dirty bits are the EPT owner's
    /// business (docs/p2m.md).
    PmlStart = 2,
    PmlStop = 3,
    /// Hands the caller the buffer the CPU was writing (switching the CPU
    /// to the other, empty) -> RDI = entries in it, RSI = which buffer
    /// (0 or 1). Entries fill a buffer from its last slot (511) down.
    PmlTake = 4,
    /// Records (`arg` = 1) or stops recording (0) the guest memory the
    /// kernel writes for services (DOMAIN_WRITES).
    WritesLog = 5,
    /// Writes the vCPU's virtual-APIC page, what the guest reads at its
    /// xAPIC page without an exit (APIC-register virtualization): `arg` =
    /// the register's offset (a multiple of 16 below 0x400, not the task
    /// priority's 0x80, which is the guest's own) in the high 32 bits and
    /// its value in the low 32. `Unsupported` without APIC virtualization.
    ApicSet = 6,
}

/// Access rights in a view.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

/// One change to (or question about) a view. Addresses are guest frame
/// numbers; frames are named by the gfn that maps them in the host p2m, so a
/// service never learns or chooses a host-physical address.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EptOp {
    /// In `view`, map `gfn` to the frame behind `from_gfn` in the host p2m
    /// (`from_gfn == gfn`: the host's own mapping), with `perms`.
    Map {
        view: u16,
        gfn: u64,
        from_gfn: u64,
        perms: Perms,
    },
    Unmap {
        view: u16,
        gfn: u64,
    },
    Protect {
        view: u16,
        gfn: u64,
        perms: Perms,
    },
    /// Sets `perms` on every page `view` maps among the `count` gfns from
    /// `gfn` (unmapped ones stay unmapped), a large page whole where the
    /// range covers it.
    ProtectRange {
        view: u16,
        gfn: u64,
        count: u64,
        perms: Perms,
    },
    SetSuppressVe {
        view: u16,
        gfn: u64,
        suppress: bool,
    },
    /// Split the large page holding `gfn` (down to 4 KiB).
    Split {
        view: u16,
        gfn: u64,
    },
    /// What maps `gfn` in `view` (the raw entry's facts).
    Query {
        view: u16,
        gfn: u64,
    },
    /// Splits every large page of `view` among the `count` gfns from
    /// `gfn` into 4 KiB pages.
    SplitRange {
        view: u16,
        gfn: u64,
        count: u64,
    },
    /// Clears the dirty (and accessed) bits of every page `view` maps among
    /// the `count` gfns from `gfn` (PML logs a write that sets one).
    ClearDirty {
        view: u16,
        gfn: u64,
        count: u64,
    },
    /// Sets the dirty bit of the 4 KiB entry of `gfn` in `view` (its next
    /// write is not logged by PML).
    MarkDirty {
        view: u16,
        gfn: u64,
    },
    /// Arms every 4 KiB entry of `view` among the `count` gfns from `gfn`
    /// that can be read and not written: the kernel makes it writable on
    /// the guest's first write to it and records the frame (LIFTED_TAKE),
    /// without a message. Any later change of the entry's permissions
    /// disarms it. For dirty tracking by write-protection (docs/p2m.md).
    ArmLift {
        view: u16,
        gfn: u64,
        count: u64,
    },
    /// Makes alternate view `view` a copy of the host p2m as it is now:
    /// every entry, bit for bit (permissions, suppress-#VE, accessed and
    /// dirty, armed), large pages staying large; the view's old tables are
    /// freed. On `OutOfMemory` (the domain's table quota) the view is as it
    /// was. A new view starts this way, so that a first touch of memory
    /// through it costs no exit (docs/p2m.md).
    CopyHost {
        view: u16,
    },
    /// Page sharing (SH-1, docs/sharing.md), host p2m only (`view` must be
    /// 0): the frame behind `gfn` becomes a shared frame with one reference
    /// (or, already shared, is named again), its entry read-only. Every
    /// alternate view's entry that maps the frame is emptied (the owner
    /// fills it again). Answered [`EptResult::Shared`]: the frame's opaque
    /// id, never its address.
    ShareNominate {
        view: u16,
        gfn: u64,
    },
    /// SH-1: `gfn` comes to map shared frame `frame` read-only (one more
    /// reference); the frame it had is released (freed when it was its
    /// own, one reference less when it was shared). Every alternate view's
    /// entry that mapped the old frame is emptied. [`EptResult::Shared`].
    ShareMap {
        view: u16,
        gfn: u64,
        frame: u32,
    },
    /// SH-1, SH-2 (the copy-on-write break): `gfn`, which maps a shared
    /// frame, gets a frame of its own with its contents, mapped with
    /// `perms`: the shared frame itself when this was its last reference,
    /// else a new frame (`OutOfMemory`, nothing changed, when there is
    /// none). [`EptResult::Shared`] names the frame left and its
    /// references (0: it is this gfn's own now).
    Unshare {
        view: u16,
        gfn: u64,
        perms: Perms,
    },
}

impl EptOp {
    /// The view the operation reads or changes.
    pub fn view(&self) -> u16 {
        match *self {
            EptOp::Map { view, .. }
            | EptOp::Unmap { view, .. }
            | EptOp::Protect { view, .. }
            | EptOp::ProtectRange { view, .. }
            | EptOp::SetSuppressVe { view, .. }
            | EptOp::Split { view, .. }
            | EptOp::Query { view, .. }
            | EptOp::SplitRange { view, .. }
            | EptOp::ClearDirty { view, .. }
            | EptOp::MarkDirty { view, .. }
            | EptOp::ArmLift { view, .. }
            | EptOp::CopyHost { view }
            | EptOp::ShareNominate { view, .. }
            | EptOp::ShareMap { view, .. }
            | EptOp::Unshare { view, .. } => view,
        }
    }
}

/// The result of one [`EptOp`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EptResult {
    Done,
    /// `Query`: the page that maps the gfn (`None` when unmapped), and the
    /// entry's suppress-#VE bit (meaningful for an empty entry too).
    Entry {
        mapped: Option<EptEntry>,
        suppress_ve: bool,
    },
    /// `ShareNominate`, `ShareMap`, `Unshare`: the shared frame (an opaque
    /// id that names one frame for as long as it is shared: a stale id is
    /// refused), its references after the operation, and the frames free
    /// in the kernel's pool (SH-4).
    Shared {
        frame: u32,
        refs: u32,
        free: u64,
    },
    Error(EptOpError),
}

/// A mapped page, as `Query` reports it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EptEntry {
    /// The gfn of the host p2m that maps the same frame.
    pub frame_gfn: u64,
    /// 0: 4 KiB, 1: 2 MiB, 2: 1 GiB.
    pub size: u8,
    pub perms: Perms,
}

/// Why an [`EptOp`] was refused.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EptOpError {
    NoSuchView,
    /// The gfn (or `from_gfn`) is not guest RAM.
    NotRam,
    /// View 0 is the host p2m: `Map` and `Unmap` there belong to the domain's builder.
    HostView,
    AlreadyMapped,
    NotMapped,
    OutOfMemory,
    WriteWithoutRead,
    /// SH-2: the operation would give write to an entry that maps a shared
    /// frame, point another gfn at one, or remap a shared gfn in a view.
    Shared,
    /// A shared-frame id that names no shared frame (stale or forged).
    NoSuchShare,
    /// `Unshare` of a gfn that maps no shared frame.
    NotShared,
    /// `ShareMap` of a gfn that maps that frame already.
    AlreadyShared,
    /// The page cannot change frames now: services hold foreign mappings
    /// of the domain's RAM, or it is the #VE information page, or the
    /// kernel's table of shared frames is full.
    Busy,
}

/// The batch EPT_OPS takes: at most this many operations.
pub const MAX_EPT_OPS: usize = 32;

/// DEVICE_CONFIG's ops.
pub mod device_config {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const PROBE: u64 = 2;
}

/// What VM_FEATURES reports.
pub mod vm_features {
    pub const VMX: u64 = 1 << 0;
    pub const VMFUNC: u64 = 1 << 1;
    pub const VE: u64 = 1 << 2;
    pub const PML: u64 = 1 << 3;
    /// EPT entries may allow execute without read.
    pub const EXECUTE_ONLY: u64 = 1 << 4;
}

/// Where things are in a service's address space.
pub mod layout {
    /// Services are linked at this address (their ELF is loaded as linked).
    pub const IMAGE_BASE: u64 = 0x40_0000;
    /// The read-only startup information page (a [`super::StartupInfo`]).
    pub const STARTUP_INFO: u64 = 0x1000_0000;
    /// The top of the stack (it grows down; the page below its bottom is never mapped).
    pub const STACK_TOP: u64 = 0x8000_0000;
    pub const STACK_SIZE: u64 = 128 * 1024;
    /// FRAMES_MAP maps only inside this window.
    pub const MAP_BASE: u64 = 0x10_0000_0000;
    pub const MAP_END: u64 = 0x20_0000_0000;
    /// The end of user space (the kernel owns everything above).
    pub const USER_END: u64 = 0x0000_8000_0000_0000;
}

/// Longest handle name in the startup information.
pub const HANDLE_NAME: usize = 32;

/// A handle name, NUL-padded.
pub type HandleName = [u8; HANDLE_NAME];

/// What a service finds at [`layout::STARTUP_INFO`] (its address is also in
/// RDI at entry): who it is and which handle slot holds what.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct StartupInfo {
    /// [`STARTUP_MAGIC`].
    pub magic: u64,
    /// The service's log source number.
    pub source: u32,
    /// How many times this service has been (re)started before, counting swaps.
    pub generation: u32,
    /// The TSC at kernel boot and its frequency (timestamps).
    pub tsc_at_boot: u64,
    pub tsc_hz: u64,
    pub name: HandleName,
    pub handle_count: u32,
    /// [`STARTUP_SUCCESSOR`] when started to take over from a running
    /// instance (a swap): serve only the lifecycle interface until `Resume`.
    pub flags: u32,
    /// The named handles: `handles[i]` names slot `slots[i]`.
    pub slots: [u32; super::syscall::MAX_HANDLES],
    pub handles: [HandleName; super::syscall::MAX_HANDLES],
}

pub const STARTUP_MAGIC: u64 = u64::from_le_bytes(*b"PLXSTART");
/// [`StartupInfo::flags`]: this instance succeeds a running one.
pub const STARTUP_SUCCESSOR: u32 = 1;

impl Grant {
    /// A grant of `from` (masked to `rights`) into `slot`, found as `name`.
    pub fn named(slot: u32, from: Handle, rights: u32, badge: u64, name: &str) -> Self {
        Self {
            slot,
            from,
            rights,
            badge,
            name: handle_name(name),
        }
    }
}

/// A [`HandleName`] from text (cut at [`HANDLE_NAME`] bytes).
pub fn handle_name(name: &str) -> HandleName {
    let mut n = [0u8; HANDLE_NAME];
    let b = name.as_bytes();
    let len = b.len().min(HANDLE_NAME);
    n[..len].copy_from_slice(&b[..len]);
    n
}

/// The text of a [`HandleName`].
pub fn handle_name_str(n: &HandleName) -> &str {
    let end = n.iter().position(|&c| c == 0).unwrap_or(HANDLE_NAME);
    core::str::from_utf8(&n[..end]).unwrap_or("?")
}
