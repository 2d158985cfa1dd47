//! The fuzzer's logic, host-tested: its random numbers, the menus it draws
//! system-call arguments from (numbers, pointers, lengths, handle slots),
//! what it knows of its own memory, and whether a receive it is about to
//! make could wait for ever. The binary (`main.rs`) makes the calls.
//!
//! The menus mix plain random values with the values where arithmetic on
//! pointers and lengths goes wrong: a pointer a few bytes below a page, one
//! whose span straddles two pages, ends past the top of user space, or
//! wraps past `u64::MAX`; kernel addresses; lengths of 0, 256 and 257,
//! 4095 to 4097, `u32::MAX`, `u64::MAX`.
//!
//! A pointer the fuzzer passes may be written by the kernel, so every
//! writable address a menu gives lies in the fuzzer's scratch window (its
//! shared frames, mapped with unmapped pages around them), never in its
//! stack or statics: a length that runs past the window runs into an
//! unmapped page and is refused.

#![no_std]

use ipc_schema::syscall::layout::{
    IMAGE_BASE, MAP_BASE, STACK_SIZE, STACK_TOP, STARTUP_INFO, USER_END,
};
use ipc_schema::syscall::{MAX_MESSAGE, nr};

#[cfg(test)]
mod tests;

/// Calls the fuzzer makes, unless its name says otherwise ([`calls_for`]).
pub const CALLS: u64 = 100_000;

/// The calls a fuzzer named `name` makes: [`CALLS`] for `fuzz`, N for
/// `fuzz-N` (a shorter run, where every call costs more: on Bochs each
/// refusal the kernel logs takes the serial line about 2 ms). `None` for
/// a name that is neither (the peers `fuzz-echo` and `fuzz-client`).
pub fn calls_for(name: &str) -> Option<u64> {
    match name.strip_prefix("fuzz") {
        Some("") => Some(CALLS),
        Some(rest) => rest
            .strip_prefix('-')
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok()),
        None => None,
    }
}

/// The seed of its random numbers (logged at start).
pub const SEED: u64 = 0x5eed_f022_2025_0009;

/// The message that ends a peer: the echo server's when the fuzzer sends
/// it, the client's when the fuzzer answers it.
pub const STOP: [u8; 16] = *b"fuzz: stop, bye!";

/// Page size.
pub const PAGE: u64 = 4096;

/// Pages of the scratch window (every writable address the menus give).
pub const SCRATCH_PAGES: u64 = 8;

/// Where the scratch window is mapped: far from the window addresses the
/// menus give FRAMES_MAP (the first 16 pages of the map window), so that a
/// random mapping never lands beside it.
pub const SCRATCH_VA: u64 = MAP_BASE + (1 << 30);

/// xorshift64*: reproducible random numbers without a crate.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 { 1 } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// The fuzzer's memory, as far as the menus are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// The scratch window: readable and writable, `SCRATCH_PAGES` pages,
    /// with unmapped pages on both sides.
    pub scratch: u64,
}

impl Memory {
    pub const fn new() -> Self {
        Memory {
            scratch: SCRATCH_VA,
        }
    }

    pub const fn scratch_end(&self) -> u64 {
        self.scratch + SCRATCH_PAGES * PAGE
    }

    /// Whether `[va, va + len)` lies in the scratch window.
    pub const fn in_scratch(&self, va: u64, len: u64) -> bool {
        va >= self.scratch && va <= self.scratch_end() && len <= self.scratch_end() - va
    }

    /// Whether the kernel can read `len` bytes at `va` (a pointer from
    /// [`Memory::answer_place`] or [`Memory::receive_place`]): in the
    /// scratch window or the read-only startup page; nothing else those
    /// menus give is mapped. Zero bytes are always readable.
    pub const fn readable(&self, va: u64, len: u64) -> bool {
        len == 0
            || self.in_scratch(va, len)
            || (va >= STARTUP_INFO && va <= STARTUP_INFO + PAGE && len <= STARTUP_INFO + PAGE - va)
    }

    /// The start of scratch page `n` (1 to `SCRATCH_PAGES - 2`: the first
    /// and last pages are room for spans that start below a page or run
    /// past one).
    pub fn inner_page(&self, rng: &mut Rng) -> u64 {
        self.scratch + PAGE * (1 + rng.below(SCRATCH_PAGES - 2))
    }

    /// A pointer for any argument: in the scratch window (at a page start,
    /// anywhere, near a page's end, just below a page), in the read-only
    /// startup page, or nowhere the fuzzer may write: the null page, the
    /// pages below the image and the stack, the map window, the end of user
    /// space, non-canonical and kernel addresses, the top of the address
    /// space, a random number.
    pub fn pointer(&self, rng: &mut Rng) -> u64 {
        let page = self.inner_page(rng);
        match rng.below(16) {
            0 => page,
            1 => page + rng.below(PAGE),
            2 => page + PAGE - 1 - rng.below(64),
            3 => page - 4,
            4 => page - 1 - rng.below(256),
            5 => STARTUP_INFO + rng.below(PAGE),
            6 => rng.below(PAGE),
            7 => IMAGE_BASE - 1 - rng.below(64),
            8 => STACK_TOP - STACK_SIZE - 1 - rng.below(PAGE),
            9 => MAP_BASE + rng.below(16) * PAGE + rng.pick(&[0, 8, PAGE - 4]),
            10 => USER_END - 1 - rng.below(16),
            11 => USER_END + rng.below(1 << 20),
            12 => 0xffff_8000_0000_0000 + rng.below(1 << 30),
            13 => 0xffff_ffff_8000_0000 + rng.below(1 << 21),
            14 => u64::MAX - rng.below(16),
            _ => rng.next_u64(),
        }
    }

    /// Where to put an answer of `len` bytes (`REPLY`, `REPLY_RECV`), and
    /// whether the kernel can read it there: a readable place (a page's
    /// start or end, across two scratch pages, below a page) or an
    /// unreadable one (unmapped, across the end of the window, the end of
    /// user space, a kernel address, wrapping past the top).
    pub fn answer_place(&self, rng: &mut Rng, len: u64) -> (u64, bool) {
        let page = self.inner_page(rng);
        let va = match rng.below(10) {
            0 | 1 => page,
            2 => page + PAGE - len,
            3 => page + PAGE - len / 2,
            4 => page - len.max(4),
            5 => self.scratch_end() - len / 2 - 1,
            6 => rng.below(PAGE),
            7 => USER_END - len / 2 - 1,
            8 => 0xffff_8000_0000_0000 + rng.below(1 << 30),
            _ => u64::MAX - len / 2,
        };
        (va, self.readable(va, len))
    }

    /// A receive buffer and its capacity: room for the message in one page
    /// (at a page's start, or ending at its end), across two pages, four
    /// bytes below a page, or somewhere the kernel cannot write (read-only,
    /// unmapped, kernel, wrapping), with capacities around the sizes of
    /// messages.
    pub fn receive_place(&self, rng: &mut Rng, exit_max: u64) -> (u64, u64) {
        let page = self.inner_page(rng);
        let buf = match rng.below(12) {
            0..=2 => page,
            3 => page + PAGE - exit_max,
            4 => page + PAGE - MAX_MESSAGE as u64,
            5 => page + PAGE - exit_max / 2,
            6 | 7 => page - 4,
            8 => STARTUP_INFO,
            9 => rng.below(PAGE),
            10 => 0xffff_8000_0000_0000 + rng.below(1 << 30),
            _ => u64::MAX - rng.below(64),
        };
        let cap = match rng.below(10) {
            0..=3 => MAX_MESSAGE as u64,
            4 | 5 => exit_max,
            6 => exit_max - 1,
            7 => rng.below(16),
            8 => PAGE,
            _ => u64::MAX - rng.below(4),
        };
        (buf, cap)
    }
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

/// A length: the edges of messages, pages and integer widths, or random.
pub fn length(rng: &mut Rng) -> u64 {
    match rng.below(14) {
        0 => 0,
        1 => 1 + rng.below(16),
        2 => rng.below(MAX_MESSAGE as u64 + 2),
        3 => MAX_MESSAGE as u64 - 1 + rng.below(3),
        4 => PAGE - 1 + rng.below(3),
        5 => 1024 * (1 + rng.below(8)),
        6 => 1 << 20,
        7 => u64::from(u32::MAX),
        8 => u64::MAX,
        9 => u64::MAX - rng.below(PAGE),
        10 => 1 << 63,
        11 => 1 << (32 + rng.below(31)),
        _ => rng.next_u64(),
    }
}

/// A number for arguments that are neither pointers nor lengths (domain,
/// view and vCPU numbers, operations, ports, bits): small values, the edges
/// of integer widths, or random. None of them is an address inside a
/// guest's image (above 1 MiB) short of a random 64-bit number.
pub fn number(rng: &mut Rng) -> u64 {
    match rng.below(12) {
        0..=3 => rng.below(8),
        4 => rng.pick(&[0xff, 0x100, 0x1ff, 0x200, 0x3f8, 0xf4, 0xfff, 0x1000]),
        5 => rng.pick(&[0xffff, 0x1_0000, 0xffff_fffe, 0xffff_ffff, 1 << 32]),
        6 => rng.pick(&[1 << 47, 1 << 48, 1 << 52, 1 << 63]),
        7 => u64::MAX - rng.below(8),
        8 => rng.below(64),
        9 => 1 << rng.below(64),
        _ => rng.next_u64(),
    }
}

/// A handle slot: one of the first `valid` (the fuzzer's own), one past
/// them, the edges of the table (63, 64), or values no table has.
pub fn handle_slot(rng: &mut Rng, valid: u64) -> u64 {
    match rng.below(10) {
        0..=4 => rng.below(valid.max(1)),
        5 => valid + rng.below(4),
        6 => rng.pick(&[62, 63, 64, 65]),
        7 => rng.below(64),
        8 => rng.pick(&[255, 0x1_0000, u64::from(u32::MAX), u64::MAX]),
        _ => rng.next_u64(),
    }
}

/// A call number for a random call: mostly those the kernel has (but the
/// ones that can block the fuzzer for ever, or end it, which are made only
/// in the fuzzer's own checked forms: RECV, REPLY_RECV, WAIT, EXIT), some
/// numbers it does not have.
pub fn call_number(rng: &mut Rng) -> u64 {
    const KNOWN: [u64; 60] = [
        nr::LOG,
        nr::HANDLE_CLOSE,
        nr::CALL,
        nr::REPLY,
        nr::NOTIFY,
        nr::YIELD,
        nr::HANDLE_INFO,
        nr::TIME,
        nr::FRAMES_MAP,
        nr::FRAMES_UNMAP,
        nr::FRAMES_ALLOC,
        nr::FRAMES_INFO,
        nr::ENDPOINT_CREATE,
        nr::NOTIFICATION_CREATE,
        nr::PROCESS_SPAWN,
        nr::PROCESS_RESTART,
        nr::PROCESS_KILL,
        nr::PROCESS_STATUS,
        nr::FAULT_WATCH,
        nr::HALT,
        nr::DOMAIN_CREATE,
        nr::DOMAIN_MAP_RAM,
        nr::DOMAIN_WRITE,
        nr::DOMAIN_READ,
        nr::VCPU_CREATE,
        nr::DOMAIN_CONTROL,
        nr::DOMAIN_INFO,
        nr::CONSOLE,
        nr::VIEW_CREATE,
        nr::VIEW_DESTROY,
        nr::VIEW_SET_VISIBLE,
        nr::EPT_OPS,
        nr::VCPU_SET_VIEW,
        nr::VCPU_CONTROL,
        nr::DOMAIN_WRITES,
        nr::LIFTED_TAKE,
        nr::DOMAIN_WATCH,
        nr::IO_IN,
        nr::IO_OUT,
        nr::IRQ_BIND,
        nr::HANDLE_DERIVE,
        nr::VM_FEATURES,
        nr::VCPU_INFO,
        nr::DOMAIN_READ,
        nr::EPT_OPS,
        nr::DOMAIN_WRITE,
        nr::FOREIGN_MAP,
        nr::FOREIGN_UNMAP,
        nr::VCPU_REGS,
        nr::IO_OUT_BYTES,
        nr::DOMAIN_GRANT,
        nr::DOMAIN_FORK,
        nr::IOSPACE_CREATE,
        nr::IOSPACE_ATTACH,
        nr::IOSPACE_MAP,
        nr::IOSPACE_UNMAP,
        nr::IOMMU_FAULTS,
        nr::IOMMU_RMRR,
        nr::DEVICE_RESET,
        nr::DEVICE_CONFIG,
    ];
    let n = match rng.below(10) {
        0..=7 => rng.pick(&KNOWN),
        8 => rng.below(64),
        _ => rng.next_u64(),
    };
    if is_reserved(n) { nr::TIME } else { n }
}

/// The calls a random call never is: those that could block the fuzzer for
/// ever or end it (it makes them itself, in checked forms).
pub const fn is_reserved(n: u64) -> bool {
    matches!(n, nr::RECV | nr::REPLY_RECV | nr::WAIT | nr::EXIT)
}

/// The fuzzer's handles that a receive accepts.
#[derive(Clone, Copy, Debug)]
pub struct Receivers {
    /// The endpoint its domain's exits and its client's calls come to.
    pub inbox: u32,
    /// Its notification (wait and signal).
    pub note: u32,
    /// Its lifecycle endpoint (nothing comes there).
    pub lifecycle: Option<u32>,
}

/// What a receive on a mask will do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receive {
    /// A slot in the mask is not one to receive on (or the mask is empty):
    /// the kernel refuses it at once.
    Refused,
    /// It returns: the notification has bits, or a message will come.
    Returns,
    /// Nothing is sure to come: it could wait for ever.
    MayWait,
}

impl Receivers {
    /// What a receive on `mask` does, when the notification has bits
    /// (`signalled`) and a message is sure to come to the inbox
    /// (`message_coming`).
    pub fn receive(&self, mask: u64, signalled: bool, message_coming: bool) -> Receive {
        if mask == 0 {
            return Receive::Refused;
        }
        let bit = |slot: u32| if slot < 64 { 1u64 << slot } else { 0 };
        let ours = bit(self.inbox) | bit(self.note) | self.lifecycle.map_or(0, bit);
        if mask & !ours != 0 {
            return Receive::Refused;
        }
        if (mask & bit(self.note) != 0 && signalled)
            || (mask & bit(self.inbox) != 0 && message_coming)
        {
            Receive::Returns
        } else {
            Receive::MayWait
        }
    }

    /// A mask for a receive: the inbox alone (the fast paths' case), with
    /// the notification or the lifecycle endpoint, the notification alone,
    /// or random bits.
    pub fn mask(&self, rng: &mut Rng) -> u64 {
        let bit = |slot: u32| 1u64 << (slot % 64);
        match rng.below(10) {
            0..=3 => bit(self.inbox),
            4 | 5 => bit(self.inbox) | bit(self.note),
            6 => bit(self.note),
            7 => bit(self.inbox) | self.lifecycle.map_or(0, bit),
            8 => 0,
            _ => rng.next_u64(),
        }
    }
}

/// Counts of what the kernel answered: index = `SysError` code (0: done),
/// the last entry for codes it does not define.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub by_status: [u64; 16],
}

impl Tally {
    pub fn add(&mut self, status: u64) {
        let i = usize::try_from(status).map_or(15, |s| s.min(15));
        self.by_status[i] += 1;
    }

    pub fn total(&self) -> u64 {
        self.by_status.iter().sum()
    }

    pub fn done(&self) -> u64 {
        self.by_status[0]
    }

    /// Statuses that are no `SysError` (the kernel never gives one).
    pub fn unknown(&self) -> u64 {
        self.by_status[15]
    }
}
