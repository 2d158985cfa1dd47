//! Services: each a process with its own address space, handle table and
//! saved registers, started from an ELF held in a frames object.
//!
//! A process that faults is stopped, its pending IPC is settled (callers
//! waiting on it get `Dead`, vCPUs waiting on it are re-queued for its
//! successor), and its supervisor is told through a notification; the
//! supervisor decides whether to restart it, or to hold it, which it does
//! by ending it: the endpoints an ended process served are closed, and
//! calls to them fail at once with `NoServer`. A restart reloads the ELF into
//! a fresh address space with the handles the process was spawned with and
//! a new generation.

use super::caps::{Cap, FramesKind, Handles, Object};
use super::space::{AddressSpace, PageFlags, SpaceError};
use super::{Kernel, Runnable};
use crate::arch::idt::TrapFrame;
use crate::mem::phys_to_virt;
use crate::vm::memory::alloc_zeroed_frame;
use ipc_schema::syscall::layout::{IMAGE_BASE, STACK_SIZE, STACK_TOP, STARTUP_INFO};
use ipc_schema::syscall::{
    FOREIGN_MAPS, HandleName, MAX_HANDLES, MAX_MESSAGE, STARTUP_MAGIC, StartupInfo, handle_name_str,
};
use ipc_schema::wire::{Record, WIRE_KEY};
use platform::PAGE_SIZE;
use platform::elf::{Elf, ElfError};

/// User code and data selectors (GDT: user data 0x18, user code 0x20, RPL 3).
pub const USER_CS: u64 = 0x20 | 3;
pub const USER_SS: u64 = 0x18 | 3;

/// What a blocked process waits for.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum Wait {
    /// A message on any endpoint, or bits on any notification, among the
    /// handle slots in `mask`.
    Recv {
        mask: u64,
        buf: u64,
        cap: u64,
        /// The direct-map address of `buf` when it takes any exit message
        /// in place (see [`Process::exit_buffer`]), else 0: worked out
        /// once, when the wait begins (the exit fast path uses it).
        exit_buf: u64,
    },
    /// The reply to its call on endpoint `ep`.
    Call {
        ep: u16,
        /// The caller's handle slot it called through (for the badge).
        handle: u32,
        reply_buf: u64,
        reply_cap: u64,
        /// The direct-map address of the reply buffer when it lies in one
        /// page the caller may write (found by the fast path), else 0.
        reply_at: u64,
        seq: u32,
        server: Option<u16>,
    },
    /// Bits on a notification.
    Notification(u16),
}

/// A process's life.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum State {
    /// Queued to run, or running.
    Ready,
    Blocked(Wait),
    /// Stopped by a fault; waiting for its supervisor.
    Faulted,
    /// Ended (EXIT, killed, or replaced by a swap).
    Ended,
}

/// One service.
pub struct Process {
    pub name: HandleName,
    pub generation: u32,
    pub source: u8,
    pub space: Option<AddressSpace>,
    /// User registers while not running.
    pub frame: TrapFrame,
    pub state: State,
    pub handles: Handles,
    /// The handles it was spawned with (a restart gets them back).
    pub initial: Handles,
    /// Refusals of its system calls seen, by kind of refusal (see
    /// [`super::Kernel::loud`]): a service making bad calls in a loop must
    /// not hold everyone up on the serial log.
    pub refusals: [core::cell::Cell<u32>; REFUSAL_KINDS],
    pub names: [(u32, HandleName); MAX_HANDLES],
    pub name_count: usize,
    /// The frames object holding its ELF.
    pub elf: u16,
    /// Who is told when it faults: (notification, bit).
    pub watcher: Option<(u16, u64)>,
    pub faults: u32,
    /// The code it passed to EXIT.
    pub exit_code: u64,
    /// The message of a call in progress.
    pub outbox: [u8; MAX_MESSAGE],
    pub outbox_len: usize,
    /// Numbers calls, so that a reply token cannot answer a later call.
    pub seq: u32,
    /// Started as the successor of a swapped service.
    pub successor: bool,
    /// A receive mask found quiet and the `Kernel::epoch` it was found at:
    /// while the epoch stays, every handle in it is one to receive on,
    /// nothing is there and each object names this process as its waiter
    /// (the fast paths then skip the check).
    pub quiet: (u64, u64),
    /// The foreign mappings it holds (FOREIGN_MAP; `foreign`).
    pub foreign: heapless::Vec<super::foreign::ForeignMap, FOREIGN_MAPS>,
}

impl Process {
    pub fn name(&self) -> &str {
        handle_name_str(&self.name)
    }

    pub fn runnable(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// The direct-map address of a receive buffer (`buf`, `cap` bytes) that
    /// has room for any exit message within one page the process may
    /// write, else 0. It stays valid while the process waits: only the
    /// process itself changes its mappings.
    #[inline(always)]
    pub fn exit_buffer(&self, buf: u64, cap: u64) -> u64 {
        use ipc_schema::exitcodec::EXIT_MESSAGE_MAX;
        if cap < EXIT_MESSAGE_MAX as u64 {
            return 0;
        }
        self.space
            .as_ref()
            .and_then(|s| s.in_one_page(buf, EXIT_MESSAGE_MAX, true))
            .map_or(0, |at| at as u64)
    }
}

/// Why a process could not be started.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum SpawnError {
    Elf(ElfError),
    /// A segment lies outside the image area (named).
    BadSegment {
        vaddr: u64,
    },
    Space(SpaceError),
    NoSlot,
    NotAnElfObject,
}

impl From<SpaceError> for SpawnError {
    fn from(e: SpaceError) -> Self {
        SpawnError::Space(e)
    }
}

impl Kernel {
    /// The bytes of a frames object (modules and RAM the kernel handed out).
    pub fn frames_bytes(&self, id: u16) -> Option<&'static [u8]> {
        let f = self.frames.get(usize::from(id))?.as_ref()?;
        // Safety: frames objects cover physical memory the kernel owns for
        // as long as the object lives, in the direct map.
        Some(unsafe { core::slice::from_raw_parts(phys_to_virt(f.base), f.len as usize) })
    }

    /// Creates a process from the ELF in frames object `elf`, with `handles`
    /// (and their names), and queues it to run.
    pub fn spawn(
        &mut self,
        name: HandleName,
        elf: u16,
        handles: Handles,
        names: &[(u32, HandleName)],
        successor: bool,
    ) -> Result<u16, SpawnError> {
        let slot = self
            .processes
            .iter()
            .position(Option::is_none)
            .ok_or(SpawnError::NoSlot)?;
        match self.frames.get(usize::from(elf)).and_then(Option::as_ref) {
            // Not guest RAM: page sharing frees single frames of it
            // (docs/sharing.md).
            Some(f)
                if !f.given_to_domain
                    && (f.kind == FramesKind::Module || f.kind == FramesKind::Ram) => {}
            _ => return Err(SpawnError::NotAnElfObject),
        }
        let source = self.next_source;
        self.next_source = self.next_source.saturating_add(1);
        let mut p = Process {
            name,
            generation: 0,
            source,
            space: None,
            frame: empty_frame(),
            state: State::Ready,
            handles,
            initial: handles,
            refusals: [const { core::cell::Cell::new(0) }; REFUSAL_KINDS],
            names: [(0, [0; ipc_schema::syscall::HANDLE_NAME]); MAX_HANDLES],
            name_count: names.len().min(MAX_HANDLES),
            elf,
            watcher: None,
            faults: 0,
            exit_code: 0,
            outbox: [0; MAX_MESSAGE],
            outbox_len: 0,
            seq: 0,
            successor,
            quiet: (0, 0),
            foreign: heapless::Vec::new(),
        };
        p.names[..p.name_count].copy_from_slice(&names[..p.name_count]);
        self.processes[slot] = Some(p);
        let pid = slot as u16;
        if let Err(e) = self.load(pid) {
            self.processes[slot] = None;
            return Err(e);
        }
        Ok(pid)
    }

    /// (Re)builds a process's address space from its ELF and sets it at its
    /// entry point, ready to run.
    pub fn load(&mut self, pid: u16) -> Result<(), SpawnError> {
        let bytes = {
            let p = self.processes[usize::from(pid)]
                .as_ref()
                .ok_or(SpawnError::NoSlot)?;
            self.frames_bytes(p.elf).ok_or(SpawnError::NotAnElfObject)?
        };
        let elf = Elf::parse(bytes).map_err(SpawnError::Elf)?;
        let mut space = AddressSpace::new().ok_or(SpawnError::Space(SpaceError::OutOfMemory))?;
        let result = build_space(
            &mut space,
            &elf,
            self.processes[usize::from(pid)]
                .as_ref()
                .ok_or(SpawnError::NoSlot)?,
        );
        if let Err(e) = result {
            space.destroy();
            return Err(e);
        }
        let p = self.processes[usize::from(pid)]
            .as_mut()
            .ok_or(SpawnError::NoSlot)?;
        if let Some(old) = p.space.replace(space) {
            old.destroy();
        }
        p.frame = empty_frame();
        p.frame.rip = elf.entry;
        p.frame.rsp = STACK_TOP - 8;
        p.frame.rdi = STARTUP_INFO;
        p.state = State::Ready;
        p.quiet = (0, 0);
        crate::log::emit(&Record::Announce {
            source: p.source,
            name: handle_name_str(&p.name),
            build_id: elf.build_id().unwrap_or(&[]),
            wire_key: WIRE_KEY.to_bytes(),
        });
        self.make_ready(Runnable::Process(pid));
        Ok(())
    }

    /// Stops a process because it faulted, reporting why; its supervisor is
    /// told.
    /// (Its registers at the fault are in its frame.)
    pub fn fault(&mut self, pid: u16) {
        let cr2 = crate::arch::cr2();
        let Some(p) = self.processes[usize::from(pid)].as_mut() else {
            return;
        };
        let frame = p.frame;
        p.faults += 1;
        p.state = State::Faulted;
        defmt::error!(
            "service {=str} (generation {=u32}) faulted: {=str} (vector {=u64}) at rip {=u64:#x}, error code {=u64:#x}, cr2 {=u64:#x}",
            p.name(),
            p.generation,
            crate::arch::idt::exception_name(frame.vector),
            frame.vector,
            frame.rip,
            frame.error_code,
            cr2
        );
        let below_stack =
            (STACK_TOP - STACK_SIZE).saturating_sub(64 * 1024)..STACK_TOP - STACK_SIZE;
        if frame.vector == 14 && below_stack.contains(&cr2) {
            defmt::error!(
                "service {=str}: that address is just below its {=u64} KiB stack: a stack overflow",
                p.name(),
                STACK_SIZE / 1024
            );
        }
        let watcher = p.watcher;
        self.settle(pid, false);
        if let Some((n, bit)) = watcher {
            self.notify(n, bit);
        }
    }

    /// Ends a process (EXIT, kill, or the old side of a swap).
    pub fn end(&mut self, pid: u16) {
        let Some(p) = self.processes[usize::from(pid)].as_mut() else {
            return;
        };
        p.state = State::Ended;
        if let Some(space) = p.space.take() {
            space.destroy();
        }
        self.settle(pid, true);
    }

    /// Restarts a faulted (or running) process: fresh address space, its
    /// original handles, generation + 1. With `elf`, from another ELF (a swap).
    pub fn restart(&mut self, pid: u16, elf: Option<u16>) -> Result<u32, SpawnError> {
        // A process that faulted was settled then; its endpoints moved to a
        // new generation once, which its callers have been told of.
        if !matches!(
            self.processes[usize::from(pid)].as_ref().map(|p| p.state),
            Some(State::Faulted)
        ) {
            self.settle(pid, false);
        }
        let p = self.processes[usize::from(pid)]
            .as_mut()
            .ok_or(SpawnError::NoSlot)?;
        p.generation += 1;
        p.handles = p.initial;
        if let Some(e) = elf {
            p.elf = e;
        }
        let generation = p.generation;
        self.load(pid)?;
        Ok(generation)
    }

    /// Settles the IPC of a process that stops running: calls waiting on it
    /// fail (`Dead`) or, for vCPUs, go back in the queue for its successor;
    /// it leaves every queue and wait list; its foreign mappings are torn down; endpoints it served move to a new
    /// generation. When it has `ended` (it will not run again), every
    /// endpoint it served or waited on that nobody else waits on is closed
    /// ([`Kernel::close`]): its callers fail at once instead of waiting for
    /// a server that will not come.
    fn settle(&mut self, pid: u16, ended: bool) {
        self.unready(Runnable::Process(pid));
        // Its foreign mappings go with it (FM-3).
        self.foreign_drop_process(pid);
        // Its hints are dropped (see `Process::quiet`).
        self.epoch += 1;
        for id in 0..self.endpoints.len() {
            let Some(ep) = self.endpoints[id].as_mut() else {
                continue;
            };
            ep.queue.retain(|s| *s != super::ipc::Sender::Process(pid));
            let served = ep.server == Some(pid);
            let waited = ep.waiting == Some(pid);
            if waited {
                ep.waiting = None;
                // One that waited but never took a message is its server
                // too: its end closes the endpoint.
                ep.server.get_or_insert(pid);
            }
            if served {
                ep.generation += 1;
            }
            let server = ep.server;
            let nobody_else = ep.waiting.is_none()
                && server.is_none_or(|s| {
                    s == pid
                        || !matches!(
                            self.processes[usize::from(s)].as_ref().map(|p| p.state),
                            Some(State::Ready | State::Blocked(_) | State::Faulted)
                        )
                });
            if ended && (served || waited) && nobody_else {
                self.close(id as u16);
            }
        }
        for n in self.notifications.iter_mut().flatten() {
            if n.waiter == Some(pid) {
                n.waiter = None;
            }
        }
        self.fail_calls_to(pid);
    }
}

fn empty_frame() -> TrapFrame {
    TrapFrame {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error_code: 0,
        rip: 0,
        cs: USER_CS,
        rflags: 0x202, // interrupts on
        rsp: 0,
        ss: USER_SS,
    }
}

/// Maps the ELF's segments, the stack and the startup page.
fn build_space(space: &mut AddressSpace, elf: &Elf<'_>, p: &Process) -> Result<(), SpawnError> {
    for seg in elf.segments() {
        let seg = seg.map_err(SpawnError::Elf)?;
        let end = seg
            .vaddr
            .checked_add(seg.mem_size)
            .ok_or(SpawnError::BadSegment { vaddr: seg.vaddr })?;
        if seg.vaddr < IMAGE_BASE || end > STARTUP_INFO {
            return Err(SpawnError::BadSegment { vaddr: seg.vaddr });
        }
        let data = elf.segment_bytes(&seg);
        let mut page = seg.vaddr & !(PAGE_SIZE - 1);
        while page < end {
            let frame = alloc_zeroed_frame().ok_or(SpaceError::OutOfMemory)?;
            // Copy the part of the file that falls in this page.
            let from = page.max(seg.vaddr);
            let to = (page + PAGE_SIZE).min(seg.vaddr + seg.file_size);
            if from < to {
                let src = &data[(from - seg.vaddr) as usize..(to - seg.vaddr) as usize];
                // Safety: `frame` is a fresh frame in the direct map; the
                // copy stays inside it.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        phys_to_virt(frame).add((from - page) as usize),
                        src.len(),
                    )
                };
            }
            let flags = PageFlags {
                writable: seg.writable,
                executable: seg.executable,
                owned: true,
                uncached: false,
            };
            match space.map(page, frame, flags) {
                Ok(()) => {}
                // Two segments sharing a page: the first one's frame stays.
                Err(SpaceError::AlreadyMapped) => crate::vm::memory::free_frame(frame),
                Err(e) => {
                    crate::vm::memory::free_frame(frame);
                    return Err(e.into());
                }
            }
            page += PAGE_SIZE;
        }
    }
    let mut va = STACK_TOP - STACK_SIZE;
    while va < STACK_TOP {
        let frame = alloc_zeroed_frame().ok_or(SpaceError::OutOfMemory)?;
        space.map(
            va,
            frame,
            PageFlags {
                writable: true,
                executable: false,
                owned: true,
                uncached: false,
            },
        )?;
        va += PAGE_SIZE;
    }
    let info = alloc_zeroed_frame().ok_or(SpaceError::OutOfMemory)?;
    let mut startup = StartupInfo {
        magic: STARTUP_MAGIC,
        source: u32::from(p.source),
        generation: p.generation,
        tsc_at_boot: crate::time::tsc_at_boot(),
        tsc_hz: crate::time::tsc_hz().unwrap_or(0),
        name: p.name,
        handle_count: p.name_count as u32,
        flags: if p.successor {
            ipc_schema::syscall::STARTUP_SUCCESSOR
        } else {
            0
        },
        slots: [0; MAX_HANDLES],
        handles: [[0; ipc_schema::syscall::HANDLE_NAME]; MAX_HANDLES],
    };
    for (i, (slot, name)) in p.names[..p.name_count].iter().enumerate() {
        startup.slots[i] = *slot;
        startup.handles[i] = *name;
    }
    // Safety: `info` is a fresh frame in the direct map, large enough for
    // the startup information (checked at compile time below).
    unsafe {
        phys_to_virt(info)
            .cast::<StartupInfo>()
            .write_unaligned(startup)
    };
    space.map(
        STARTUP_INFO,
        info,
        PageFlags {
            writable: false,
            executable: false,
            owned: true,
            uncached: false,
        },
    )?;
    Ok(())
}

const _: () = assert!(core::mem::size_of::<StartupInfo>() <= PAGE_SIZE as usize);

/// Makes a capability for a process of `pid`.
pub fn process_cap(pid: u16, rights: u32) -> Cap {
    Cap {
        object: Object::Process(pid),
        rights,
        badge: 0,
    }
}

/// Kinds of refusal counted apart for the log budget.
pub const REFUSAL_KINDS: usize = 16;

/// Refusals of one kind logged for a service before the budget applies.
pub const LOUD_BURST: u32 = 8;
/// Past the burst, one refusal of a kind in this many is logged.
pub const LOUD_EVERY: u32 = 256;

impl Process {
    /// Whether to log a refusal of kind `what` (a call's name) to this
    /// service: the first [`LOUD_BURST`] of each kind are logged, then one
    /// in [`LOUD_EVERY`], after a line saying how many were not.
    pub fn loud(&self, what: &'static str) -> bool {
        let kind = what.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % REFUSAL_KINDS;
        let seen = self.refusals[kind].get().saturating_add(1);
        self.refusals[kind].set(seen);
        if seen <= LOUD_BURST {
            return true;
        }
        if (seen - LOUD_BURST).is_multiple_of(LOUD_EVERY) {
            defmt::warn!(
                "service {=str}: {=u32} more refusals like the next were not logged",
                self.name(),
                LOUD_EVERY - 1
            );
            return true;
        }
        false
    }
}
