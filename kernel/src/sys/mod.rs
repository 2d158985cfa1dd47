//! The microkernel: services in ring 3, the capabilities they hold, IPC
//! between them, and the scheduler that runs services and vCPUs.
//!
//! All of this state lives in one [`Kernel`] value. The kernel runs on one
//! CPU with interrupts off whenever it touches that state (traps enter with
//! interrupts off, and the kernel never enables them except in the idle
//! loop, where it holds no reference), so [`kernel`] hands out the one
//! mutable reference at a time.
//!
//! - `space`: user address spaces.
//! - `process`: services: loading, faults, restarts.
//! - `ipc`: endpoints (call, receive, reply) and notifications.
//! - `syscall`: the system calls.
//! - `foreign`: guest RAM mapped into services, counted per domain.
//! - `fastpath`: the two transitions of a handled exit, in one run.
//! - `sched`: what runs next, and getting there (ring 3 or VMX).
//! - `irq`: device interrupts as notifications.

pub mod caps;
pub mod fastpath;
pub mod foreign;
pub mod ipc;
pub mod irq;
pub mod process;
pub mod sched;
pub mod space;
pub mod syscall;

use crate::vm::domain::Domain;
use caps::FramesObject;
use core::cell::UnsafeCell;
use ipc::{Endpoint, Notification};
use ipc_schema::manifest::MAX_DOMAINS;
use process::Process;

/// The most services (init included).
pub const MAX_PROCESSES: usize = 24;
pub const MAX_ENDPOINTS: usize = 48;
pub const MAX_NOTIFICATIONS: usize = 32;
pub const MAX_FRAMES_OBJECTS: usize = 256;

/// Something the scheduler can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum Runnable {
    Process(u16),
    /// The (only) vCPU of domain slot `n`.
    Vcpu(u16),
}

/// Every kernel object.
pub struct Kernel {
    pub processes: [Option<Process>; MAX_PROCESSES],
    pub endpoints: [Option<Endpoint>; MAX_ENDPOINTS],
    pub notifications: [Option<Notification>; MAX_NOTIFICATIONS],
    pub frames: [Option<FramesObject>; MAX_FRAMES_OBJECTS],
    pub domains: [Option<Domain>; MAX_DOMAINS],
    pub ready: heapless::Deque<Runnable, 64>,
    /// What runs next, before the queue: the last IPC wake-up (see
    /// [`Kernel::make_ready_next`]).
    pub next: Option<Runnable>,
    /// When the current streak of IPC wake-ups run ahead of the queue ends
    /// (TSC; 0: no streak).
    pub streak_end: u64,
    /// The process whose registers are in the trap frame being handled.
    pub current: Option<u16>,
    /// Next log source number for a service.
    pub next_source: u8,
    /// Told when a domain ends: (notification, bit) each.
    pub domain_watch: [Option<(u16, u64)>; ipc_schema::syscall::DOMAIN_WATCHERS],
    /// Set by HALT: the run ends with this status.
    pub halt: Option<u8>,
    /// Bumped whenever a receive set found quiet may stop being so (a
    /// message queued, bits set, an endpoint closed, a waiter hint moved,
    /// a handle closed): see `Process::quiet`.
    pub epoch: u64,
}

struct KernelCell(UnsafeCell<Kernel>);

// Safety: see the module documentation: one CPU, interrupts off, one
// reference at a time.
unsafe impl Sync for KernelCell {}

static KERNEL: KernelCell = KernelCell(UnsafeCell::new(Kernel {
    processes: [const { None }; MAX_PROCESSES],
    endpoints: [const { None }; MAX_ENDPOINTS],
    notifications: [const { None }; MAX_NOTIFICATIONS],
    frames: [const { None }; MAX_FRAMES_OBJECTS],
    domains: [const { None }; MAX_DOMAINS],
    ready: heapless::Deque::new(),
    next: None,
    streak_end: 0,
    current: None,
    next_source: 1,
    domain_watch: [None; ipc_schema::syscall::DOMAIN_WATCHERS],
    halt: None,
    epoch: 0,
}));

/// The kernel's state.
///
/// Callers must not keep the reference across anything that could call
/// `kernel()` again re-entrantly; every path in `sys` takes it once at its
/// top and passes it down.
#[allow(clippy::mut_from_ref)]
pub fn kernel() -> &'static mut Kernel {
    // Safety: see the module documentation.
    unsafe { &mut *KERNEL.0.get() }
}

impl Kernel {
    /// Queues a runnable (once).
    pub fn make_ready(&mut self, r: Runnable) {
        if !self.ready.iter().any(|&q| q == r) && self.ready.push_back(r).is_err() {
            defmt::error!("scheduler queue full; dropping {}", r);
        }
    }

    /// Runs `r` next, ahead of the queue (IPC wake-ups: a call runs its
    /// server, a reply its caller): a hand-off, with no queue operation. A
    /// wake-up already waiting to run next goes to the front of the queue
    /// (the later one runs first, as a stack of calls unwinds). A chain of
    /// calls and replies (a guest making hypercalls its handler answers)
    /// would keep everything else waiting, so a streak of hand-offs while
    /// others wait in the queue lasts one time slice ([`crate::time::slice`],
    /// counted from its first hand-off, whatever ran meanwhile: the guest,
    /// its handlers, the kernel); then the next wake-up goes to the back of
    /// the queue and the others get their turn.
    #[inline]
    pub fn make_ready_next(&mut self, r: Runnable) {
        if self.count_hand_off() {
            self.next = Some(r);
        } else {
            self.hand_off_slow(r);
        }
    }

    /// Counts a hand-off if one can be made now: nothing else is handed off
    /// and, while others wait in the queue, the streak is not used up.
    /// False when the wake-up must take the longer way (`hand_off_slow`).
    /// The fast paths ask the same question.
    #[inline(always)]
    pub fn count_hand_off(&mut self) -> bool {
        if self.ready.is_empty() {
            // Nobody else waits: no streak to count.
            self.streak_end = 0;
            return self.next.is_none();
        }
        if self.next.is_some() {
            return false;
        }
        let now = platform::cpu::rdtsc();
        if self.streak_end == 0 {
            self.streak_end = now.saturating_add(crate::time::slice());
        }
        now < self.streak_end
    }

    /// The streak of hand-offs is used up (and others wait).
    fn streak_spent(&self) -> bool {
        self.streak_end != 0 && platform::cpu::rdtsc() >= self.streak_end
    }

    #[inline(never)]
    fn hand_off_slow(&mut self, r: Runnable) {
        let earlier = if self.streak_spent() && !self.ready.is_empty() {
            self.streak_end = 0;
            self.make_ready(r);
            self.next.take()
        } else {
            if self.ready.is_empty() {
                self.streak_end = 0;
            }
            self.next.replace(r).filter(|&e| e != r)
        };
        if let Some(e) = earlier {
            self.ready.retain(|q| *q != e);
            if self.ready.push_front(e).is_err() {
                defmt::error!("scheduler queue full; dropping {}", e);
            }
        }
    }

    /// Takes `r` out of the queue and the hand-off (it stopped being
    /// runnable: ended, paused, faulted).
    pub fn unready(&mut self, r: Runnable) {
        self.ready.retain(|q| *q != r);
        if self.next == Some(r) {
            self.next = None;
        }
    }

    /// The name of a process, for logs.
    /// Whether to log a refusal of kind `what` (a call's name) to process
    /// `pid` ([`process::Process::loud`]). A service looping on refused
    /// calls would otherwise hold every domain up on the serial log (each
    /// line about 2 ms at 115,200 baud, interrupts off).
    pub fn loud(&self, pid: u16, what: &'static str) -> bool {
        self.processes
            .get(usize::from(pid))
            .and_then(Option::as_ref)
            .is_none_or(|p| p.loud(what))
    }

    pub fn process_name(&self, pid: u16) -> &str {
        self.processes
            .get(usize::from(pid))
            .and_then(Option::as_ref)
            .map_or("?", |p| p.name())
    }
}
