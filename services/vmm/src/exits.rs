//! What each exit means for the guest: the vmm's policy, apart from the
//! system calls that carry it out (the [`Env`]), so that host tests can run
//! it against a fake environment.
//!
//! It emulates a PC for its guests (docs/guests.md, The platform): CPUID
//! with VMX hidden and Parallax's leaves added, a 16550 console at 0x3f8
//! (lines go to the log), the exit port 0xf4, the 8259 PICs ([`crate::pic`]),
//! the 8254 PIT and port 0x61 ([`crate::pit`]), the local APIC in x2APIC
//! mode ([`crate::lapic`]), PCI configuration ([`crate::pci`]), the CMOS
//! ([`crate::cmos`]), ACPI power-off, a few MSRs, and HLT as a wait for the
//! next timer; interrupts are injected at interrupt-window exits. It
//! answers the service hypercalls itself and forwards request hypercalls to
//! the altp2m service (dirty-log requests to the logdirty service).
//! An exit it cannot make sense of stops the domain, saying why.

use crate::cmos::Cmos;
use crate::decode::{self, Mode, Op};
use crate::ioapic::IoApic;
use crate::lapic::Lapic;
use crate::pci::{Functions, Op as PciOp, Pci};
use crate::pic::Pic;
use crate::pit::Pit;
use ipc_schema::altp2m::{AltReply, AltRequest};
use ipc_schema::hypercall::{
    CPUID_MAX_LEAF, CPUID_SIGNATURE, HC_CALL, HC_IPC_PING, HC_SERVICE_INFO, HC_SERVICE_NULL,
    HC_VIEW_SWITCH, HYPERCALL_KEY, HcError, MAX_REQUEST, Reply, Request, Status,
};
use ipc_schema::logdirty::{LdReply, LdRequest};
use ipc_schema::syscall::{SysError, regs as r, vm_features};
use ipc_schema::uart::UartReply;
use ipc_schema::vmexit::Inject;
use ipc_schema::vmexit::{Exit, ExitKind, ExitMessage, ExitRegs, ExitReply, Response, Then};
use platform::cpu::CpuidResult;
use platform::devices::uart16550::Uart16550;
use platform::multiboot::acpi::{SLP_EN, SLP_TYP_S5};
use serde::{Deserialize, Serialize};

/// This vmm's version, as `HC_SERVICE_INFO` and the lifecycle interface
/// report it: 1, or 2 when built with the `next` feature (a stand-in for a
/// new release in the live-swap tests).
pub const VERSION: u32 = if cfg!(feature = "next") { 2 } else { 1 };

/// The guest's COM1.
pub const COM1: u16 = 0x3f8;
/// QEMU's isa-debug-exit port: a write ends the domain with that status.
pub const EXIT_PORT: u16 = 0xf4;
/// Console bytes held back at most (then sent on).
pub const LINE: usize = 120;
/// Domains the vmm keeps device state for.
pub const DOMAINS: usize = 16;
/// How often a HLT waiting for COM1 input (its received-data interrupt
/// enabled) wakes to take what came meanwhile, in ms of TSC time: no call
/// lets a service wake a blocked vCPU at once.
pub const INPUT_POLL_MS: u64 = 50;
const PAGE: u64 = 4096;

/// What the vmm needs from the system.
pub trait Env {
    /// `ipc_schema::syscall::vm_features` bits.
    fn features(&self) -> u64;
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
    fn tsc(&self) -> u64;
    /// The TSC frequency in kHz (0: unknown).
    fn tsc_khz(&self) -> u32;
    /// A line the guest wrote to its console.
    fn console(&mut self, domain: u16, line: &[u8]);
    fn read_guest(&mut self, domain: u16, gpa: u64, out: &mut [u8]) -> bool;
    fn write_guest(&mut self, domain: u16, gpa: u64, bytes: &[u8]) -> bool;
    /// Calls the altp2m service; `None` when it cannot be reached.
    fn altp2m(&mut self, request: &AltRequest) -> Option<AltReply>;
    /// `AltRequest::Ping` to the altp2m service (`HC_IPC_PING`; a service
    /// may send it in fixed bytes): if it answered `Pong`, the TSC ticks
    /// from the call to the answer, read before the answer is looked at.
    fn ping(&mut self) -> Option<u64> {
        let start = self.tsc();
        let answer = self.altp2m(&AltRequest::Ping);
        let ticks = self.tsc().wrapping_sub(start);
        matches!(answer, Some(AltReply::Pong)).then_some(ticks)
    }
    /// The bytes of RAM `domain` has (0 if it cannot be told).
    fn ram_bytes(&mut self, domain: u16) -> u64;
    /// Calls the logdirty service; `None` when it cannot be reached.
    fn logdirty(&mut self, request: &LdRequest) -> Option<LdReply>;
    /// DOMAIN_GRANT: the guest grants its pages `gfn .. gfn + count`
    /// (`grant`), or no longer.
    fn grant(&mut self, domain: u16, gfn: u64, count: u64, grant: bool) -> Result<(), SysError>;
    /// `VcpuOp::ApicSet`: the register at `offset` of the domain's
    /// virtual-APIC page (what its guest reads at the xAPIC page) becomes
    /// `value`; false where the kernel refuses (no APIC virtualization).
    fn apic_set(&mut self, domain: u16, offset: u16, value: u32) -> bool;
    /// VCPU_REGS: every register of the domain's vCPU (`None`: refused).
    fn vcpu_regs(&mut self, domain: u16) -> Option<[u64; r::COUNT]>;
    /// VCPU_REGS: the registers of `mask` set to `values` (the vCPU waits
    /// for this exit's answer); false: refused.
    fn set_regs(&mut self, domain: u16, values: &[u64; r::COUNT], mask: u64) -> bool;
    /// `op` on the domain's assigned PCI function `index` (its manifest
    /// order), through the Device handle init gave this service
    /// (DEVICE_CONFIG); `None` where it has none (the default: no devices).
    fn device_config(&mut self, domain: u16, index: u8, op: PciOp) -> Option<u32> {
        let _ = (domain, index, op);
        None
    }
}

/// One domain's assigned functions, through [`Env::device_config`].
struct DomainFunctions<'a, E> {
    env: &'a mut E,
    domain: u16,
}

impl<E: Env> Functions for DomainFunctions<'_, E> {
    fn config(&mut self, index: u8, op: PciOp) -> Option<u32> {
        self.env.device_config(self.domain, index, op)
    }
}

/// The guest's [`Request::GrantPages`], through the kernel (FM-2).
fn grant_pages(env: &mut impl Env, domain: u16, gfn: u64, count: u64, grant: bool) -> Reply {
    match env.grant(domain, gfn, count, grant) {
        Ok(()) => Reply::Done,
        Err(SysError::NoResources) => Reply::Error(HcError::TooManyGrants),
        Err(SysError::Busy) => Reply::Error(HcError::GrantedPagesMapped),
        Err(SysError::BadArgument) if !grant => Reply::Error(HcError::NotGranted),
        Err(SysError::BadAddress) => Reply::Error(HcError::BadGfn { gfn }),
        Err(_) => Reply::Error(HcError::BadRange),
    }
}

/// The log number an in-guest agent's dirty log has at the logdirty
/// service (one per domain, under the vmm's badge).
pub const AGENT_LOG: u32 = 0;

/// An in-guest agent's dirty-log request, as the logdirty service's
/// (docs/logdirty.md); `None` for every other request.
fn dirty_request(domain: u16, r: &Request) -> Option<LdRequest> {
    Some(match *r {
        Request::DirtyLogStart { range, mode } => LdRequest::Start {
            domain,
            log: AGENT_LOG,
            range,
            mode,
        },
        Request::DirtyLogRead { from, clear } => LdRequest::Read {
            domain,
            log: AGENT_LOG,
            from,
            clear,
        },
        Request::DirtyLogStop => LdRequest::Stop {
            domain,
            log: AGENT_LOG,
        },
        _ => return None,
    })
}

/// The logdirty service's answer as the guest gets it.
fn dirty_reply(reply: Option<LdReply>) -> Reply {
    match reply {
        Some(LdReply::Started { mechanism, .. }) => Reply::DirtyStarted(mechanism),
        Some(LdReply::Dirty { ranges, next }) => Reply::Dirty { ranges, next },
        Some(LdReply::Done | LdReply::Status { .. }) => Reply::Done,
        Some(LdReply::Error(e)) => Reply::Error(HcError::DirtyLog(e)),
        None => Reply::Error(HcError::ServiceUnavailable),
    }
}

/// One domain's emulated devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Devices {
    id: u16,
    uart: Uart16550,
    line: heapless::Vec<u8, LINE>,
    /// Service calls answered (`HC_SERVICE_NULL`, `HC_SERVICE_INFO`).
    service_calls: u32,
    /// The last byte sent to the log was not a newline.
    open_line: bool,
    /// Log lines this domain's doings caused.
    logged: LogBudget,
    /// Its interrupt controllers and timer.
    platform: Platform,
}

/// A domain's PC platform beyond the console: the PICs, the PIT, and what
/// the kernel was last asked for (an interrupt window, a deadline).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Platform {
    pic: Pic,
    pit: Pit,
    lapic: Lapic,
    ioapic: IoApic,
    /// Pages with no device whose accesses were logged (the first
    /// [`ABSENT_LOGGED`]).
    absent_mmio: heapless::Vec<u64, ABSENT_LOGGED>,
    pci: Pci,
    /// Made at the first access (it tells the domain's RAM).
    cmos: Option<Cmos>,
    /// An interrupt window was asked for and has not opened yet.
    window: bool,
    /// The deadline the kernel keeps for the vCPU (`None`: none).
    deadline: Option<u64>,
    /// HLTs in a row with an interrupt waiting and no window between them.
    halts: u8,
    /// The guest has touched an interrupt source (the PICs, the PIT, the
    /// local APIC, the UART's interrupt enable): [`interrupts`] runs after
    /// each of its exits from then on.
    active: bool,
    /// Absent ports already logged (the first [`ABSENT_LOGGED`]).
    absent: heapless::Vec<u16, ABSENT_LOGGED>,
    /// What the vCPU's virtual-APIC page holds of [`Lapic::image`] (not
    /// saved: a successor writes the page whole).
    #[serde(skip)]
    apic_page: ApicPage,
    /// The exits of the domain since it became active, by reason.
    counts: ExitCounts,
    /// ACPI's PM1a enable register.
    pm1_enable: u16,
}

/// The registers the guest reads at its xAPIC page, as this service knows
/// the vCPU's virtual-APIC page to hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum ApicPage {
    /// Not known (this instance has not written it yet): written whole.
    #[default]
    Unknown,
    Shown([u32; crate::lapic::IMAGE_LEN]),
    /// The kernel refused (the CPU does not virtualize the xAPIC page).
    Unsupported,
}

/// Brings the virtual-APIC page up to the local APIC's registers (those
/// that changed since it was last written), while the APIC is in xAPIC
/// mode.
fn show_apic(env: &mut impl Env, d: &mut Devices) {
    let p = &mut d.platform;
    if !p.lapic.xapic() || p.apic_page == ApicPage::Unsupported {
        return;
    }
    let image = p.lapic.image();
    let shown = match &p.apic_page {
        ApicPage::Shown(s) => Some(*s),
        _ => None,
    };
    for (i, (&value, &offset)) in image.iter().zip(Lapic::IMAGE.iter()).enumerate() {
        if shown.is_some_and(|s| s[i] == value) {
            continue;
        }
        if !env.apic_set(d.id, offset, value) {
            defmt::info!(
                "domain {=u16}: the CPU does not virtualize the xAPIC page (no APIC-register virtualization): its local APIC is reached through x2APIC MSRs only",
                d.id
            );
            p.apic_page = ApicPage::Unsupported;
            return;
        }
    }
    p.apic_page = ApicPage::Shown(image);
}

/// A domain's exits by reason, counted once it has touched an interrupt
/// source (a guest that has not pays nothing for the count) and logged
/// when it ends: where a guest's time in the hypervisor goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port I/O: the console UART, the PICs, the PIT and port 0x61, the
    /// rest (CMOS, PCI, ACPI, absent ports).
    pub uart: u32,
    pub pic: u32,
    pub pit: u32,
    pub other_io: u32,
    pub msr: u32,
    pub cpuid: u32,
    pub hlt: u32,
    pub window: u32,
    pub deadline: u32,
    pub other: u32,
}

impl ExitCounts {
    pub fn count(&mut self, kind: &ExitKind) {
        let n = match *kind {
            ExitKind::Io { port, .. } => match port {
                COM1..=0x3ff => &mut self.uart,
                _ if Pic::owns(port) => &mut self.pic,
                _ if Pit::owns(port) => &mut self.pit,
                _ => &mut self.other_io,
            },
            ExitKind::Rdmsr { .. } | ExitKind::Wrmsr { .. } => &mut self.msr,
            ExitKind::Cpuid { .. } => &mut self.cpuid,
            ExitKind::Hlt => &mut self.hlt,
            ExitKind::InterruptWindow => &mut self.window,
            ExitKind::Deadline => &mut self.deadline,
            _ => &mut self.other,
        };
        *n = n.saturating_add(1);
    }

    pub fn total(&self) -> u32 {
        [
            self.uart,
            self.pic,
            self.pit,
            self.other_io,
            self.msr,
            self.cpuid,
            self.hlt,
            self.window,
            self.deadline,
            self.other,
        ]
        .iter()
        .fold(0u32, |a, b| a.saturating_add(*b))
    }

    fn log(&self, domain: u16) {
        defmt::info!(
            "domain {=u16}: {=u32} exits to the vmm since it touched an interrupt source: port I/O uart {=u32} pic {=u32} pit {=u32} other {=u32}, msr {=u32}, cpuid {=u32}, hlt {=u32}, window {=u32}, deadline {=u32}, other {=u32}",
            domain,
            self.total(),
            self.uart,
            self.pic,
            self.pit,
            self.other_io,
            self.msr,
            self.cpuid,
            self.hlt,
            self.window,
            self.deadline,
            self.other
        );
    }
}

/// Timer interrupts (IRQ 0, and the local APIC's timer) a domain takes at
/// most per second, from each: each comes
/// no sooner than 1/5000 s (200 µs) after the last was delivered, however
/// fast the PIT is programmed (KVM keeps such a floor too). Each interrupt
/// costs exits; without the floor a guest whose timer is faster than them
/// would take interrupts back to back and never run anything else.
pub const MIN_TIMER_RATE: u64 = 5000;

/// Distinct absent ports logged per domain.
pub const ABSENT_LOGGED: usize = 16;

/// Log lines a guest can cause over and over (a refused VMFUNC, MSR): the
/// first [`LogBudget::BURST`] of a domain are logged, then one in
/// [`LogBudget::EVERY`], saying how many like it were not. A guest looping
/// on a refused instruction then costs the log (a serial line, slow for
/// every domain) almost nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBudget {
    seen: u32,
}

impl LogBudget {
    pub const BURST: u32 = 8;
    pub const EVERY: u32 = 1024;

    /// Whether to log this one; `Some(n)`: `n` lines before it were not.
    pub fn admit(&mut self) -> Option<u32> {
        self.seen = self.seen.saturating_add(1);
        if self.seen <= Self::BURST {
            Some(0)
        } else if (self.seen - Self::BURST).is_multiple_of(Self::EVERY) {
            Some(Self::EVERY - 1)
        } else {
            None
        }
    }
}

/// The vmm's state: what a successor must get in a swap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub domains: heapless::Vec<Saved, DOMAINS>,
}

/// One domain's devices, saved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub id: u16,
    /// The UART's registers and the input the guest has not read.
    pub uart: [u8; 6],
    pub received: heapless::Vec<u8, { platform::devices::uart16550::RX_FIFO }>,
    /// The console line written so far.
    pub line: heapless::Vec<u8, LINE>,
    pub service_calls: u32,
    pub open_line: bool,
    /// The interrupt controllers, timers, CMOS, PCI and the rest: a
    /// successor goes on with the guest's platform as it was.
    platform: Platform,
}

/// A domain's [`Saved`] borrowed from its devices: encoded, the same
/// bytes (the fields in the same order).
#[derive(Serialize)]
struct SavedRef<'a> {
    id: u16,
    uart: [u8; 6],
    received: heapless::Vec<u8, { platform::devices::uart16550::RX_FIFO }>,
    line: &'a heapless::Vec<u8, LINE>,
    service_calls: u32,
    open_line: bool,
    platform: &'a Platform,
}

impl<'a> SavedRef<'a> {
    fn of(d: &'a Devices) -> Self {
        let (uart, received) = d.uart.save();
        SavedRef {
            id: d.id,
            uart,
            received,
            line: &d.line,
            service_calls: d.service_calls,
            open_line: d.open_line,
            platform: &d.platform,
        }
    }

    fn owned(self) -> Saved {
        Saved {
            id: self.id,
            uart: self.uart,
            received: self.received,
            line: self.line.clone(),
            service_calls: self.service_calls,
            open_line: self.open_line,
            platform: self.platform.clone(),
        }
    }
}

/// Every domain's [`SavedRef`]: encoded, the bytes of a [`State`] (a
/// struct of one sequence is that sequence in postcard).
struct AllSaved<'a>(&'a Vmm);

impl Serialize for AllSaved<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.domains.iter().map(SavedRef::of))
    }
}

impl From<Saved> for Devices {
    fn from(d: Saved) -> Self {
        Devices {
            id: d.id,
            uart: Uart16550::restore(d.uart, &d.received),
            line: d.line,
            service_calls: d.service_calls,
            open_line: d.open_line,
            // A new release starts a new burst of log lines.
            logged: LogBudget::default(),
            platform: d.platform,
        }
    }
}

#[derive(Default)]
pub struct Vmm {
    domains: heapless::Vec<Devices, DOMAINS>,
    /// The index in `domains` of the domain served last.
    last: usize,
}

impl Vmm {
    pub fn snapshot(&self) -> State {
        let mut s = State::default();
        for d in &self.domains {
            let _ = s.domains.push(SavedRef::of(d).owned());
        }
        s
    }

    pub fn restore(state: State) -> Self {
        let mut v = Self::default();
        for d in state.domains {
            let _ = v.domains.push(Devices::from(d));
        }
        v
    }

    /// The snapshot encoded into `out` straight from the devices, one
    /// domain at a time: the bytes of [`Vmm::snapshot`] encoded, without a
    /// [`State`] built first (16 domains' platforms at once are too large
    /// for the service's stack). `None` when they do not fit.
    pub fn snapshot_into(&self, out: &mut [u8]) -> Option<usize> {
        postcard::to_slice(&AllSaved(self), out)
            .ok()
            .map(|b| b.len())
    }

    /// Takes a predecessor's snapshot ([`Vmm::snapshot_into`]), decoding
    /// one domain at a time into place. False, with nothing kept, when the
    /// bytes are not a snapshot (a wrong count, a domain that does not
    /// decode, bytes left over).
    pub fn restore_from(&mut self, bytes: &[u8]) -> bool {
        self.domains.clear();
        self.last = 0;
        let whole = (|| {
            let (n, mut rest) = postcard::take_from_bytes::<u32>(bytes).ok()?;
            for _ in 0..n {
                let (d, r) = postcard::take_from_bytes::<Saved>(rest).ok()?;
                rest = r;
                self.domains.push(Devices::from(d)).ok()?;
            }
            rest.is_empty().then_some(())
        })();
        if whole.is_none() {
            self.domains.clear();
        }
        whole.is_some()
    }

    /// The domains it keeps devices for.
    pub fn domains(&self) -> impl Iterator<Item = u16> + '_ {
        self.domains.iter().map(|d| d.id)
    }

    /// Forgets the devices of `domain`, which has ended (what it left
    /// unterminated on its console is sent on first): a domain id is given
    /// again to the next domain created, which must get fresh devices, not
    /// the old one's registers, count and unfinished line. Whether it had
    /// any.
    pub fn forget(&mut self, env: &mut impl Env, domain: u16) -> bool {
        let Some(i) = self.domains.iter().position(|d| d.id == domain) else {
            return false;
        };
        let mut d = self.domains.remove(i);
        flush(env, &mut d);
        if d.open_line {
            env.console(d.id, b"\n");
        }
        true
    }

    /// The exits `domain` has caused since it touched an interrupt source.
    pub fn exit_counts(&self, domain: u16) -> Option<ExitCounts> {
        self.domains
            .iter()
            .find(|d| d.id == domain)
            .map(|d| d.platform.counts)
    }

    /// Bytes the host typed for `domain`'s COM1: as many as its receive
    /// FIFO has room for go in (each domain's FIFO is its own quota); the
    /// received-data interrupt rises where the guest enabled it, and is
    /// delivered at the domain's next exit (a HLT waiting for input looks
    /// every [`INPUT_POLL_MS`]).
    pub fn receive(&mut self, domain: u16, bytes: &[u8]) -> UartReply {
        let Some(d) = self.domains.iter_mut().find(|d| d.id == domain) else {
            return UartReply::NoSuchDomain;
        };
        let was = d.uart.irq();
        let count = d.uart.receive(bytes);
        if d.uart.irq() && !was {
            d.platform.raise_isa(4);
        }
        UartReply::Taken {
            count: count as u16,
            waiting: d.uart.received() as u16,
        }
    }

    /// The console bytes of `domain` not yet sent to the log.
    pub fn pending_line(&self, domain: u16) -> &[u8] {
        self.domains
            .iter()
            .find(|d| d.id == domain)
            .map_or(&[], |d| &d.line[..])
    }

    /// The devices of `domain`, made on its first exit.
    #[inline(always)]
    fn devices(&mut self, domain: u16) -> &mut Devices {
        // Exits come domain after domain: the last one asked for first.
        if self.domains.get(self.last).is_some_and(|d| d.id == domain) {
            return &mut self.domains[self.last];
        }
        self.find_devices(domain)
    }

    #[inline(never)]
    fn find_devices(&mut self, domain: u16) -> &mut Devices {
        if let Some(i) = self.domains.iter().position(|d| d.id == domain) {
            self.last = i;
            return &mut self.domains[i];
        }
        if self.domains.is_full() {
            // The oldest domain's devices go: domains rarely outnumber slots,
            // and a fresh UART is what a new domain expects anyway.
            self.domains.remove(0);
        }
        let _ = self.domains.push(Devices {
            id: domain,
            ..Devices::default()
        });
        self.last = self.domains.len() - 1;
        &mut self.domains[self.last]
    }

    /// Answers one exit.
    pub fn exit(&mut self, env: &mut impl Env, m: &ExitMessage) -> ExitReply {
        let mut regs = m.regs;
        let response = self.respond(env, &m.exit, &mut regs);
        ExitReply {
            response,
            regs: (regs != m.regs).then_some(regs),
            view: None,
            step: false,
            rip: None,
        }
    }

    /// [`Vmm::exit`], the answer encoded into `out` without building the
    /// reply (`exitcodec::encode_answer`).
    #[inline]
    pub fn exit_encoded(&mut self, env: &mut impl Env, m: &ExitMessage, out: &mut [u8]) -> usize {
        if let ExitKind::Hypercall = m.exit.kind
            && let Some(n) = self.service_call_encoded(m.exit.domain, m.regs.rax, || m.regs, out)
        {
            return n;
        }
        self.answer_encoded(env, m, out)
    }

    /// An exit message's bytes answered into `out`, the receive loop's
    /// way: a service call read where it lies (`exitcodec::hypercall`:
    /// nothing decoded) and answered at once where
    /// [`Vmm::service_call_encoded`] can, any other exit decoded into `m`
    /// (the caller's, kept from exit to exit) and answered as
    /// [`Vmm::exit_encoded`] answers it, out of line. `None`, with nothing
    /// done, when `bytes` are not an exit message.
    #[inline(always)]
    pub fn exit_bytes(
        &mut self,
        env: &mut impl Env,
        bytes: &[u8],
        m: &mut ExitMessage,
        out: &mut [u8],
    ) -> Option<usize> {
        if let Some(call) = ipc_schema::exitcodec::hypercall(bytes)
            && let Some(n) =
                self.service_call_encoded(call.domain(), call.rax(), || call.regs(), out)
        {
            return Some(n);
        }
        self.decoded_exit(env, bytes, m, out)
    }

    /// [`Vmm::exit_bytes`] beyond its short way.
    #[inline(never)]
    fn decoded_exit(
        &mut self,
        env: &mut impl Env,
        bytes: &[u8],
        m: &mut ExitMessage,
        out: &mut [u8],
    ) -> Option<usize> {
        ipc_schema::exitcodec::decode_message_into(bytes, m)?;
        Some(self.answer_encoded(env, m, out))
    }

    /// [`Vmm::exit`] encoded: [`Vmm::respond`], then the answer.
    #[inline]
    fn answer_encoded(&mut self, env: &mut impl Env, m: &ExitMessage, out: &mut [u8]) -> usize {
        let mut regs = m.regs;
        let response = self.respond(env, &m.exit, &mut regs);
        let changed = (regs != m.regs).then_some(&regs);
        ipc_schema::exitcodec::encode_answer(&response, changed, out).unwrap_or(0)
    }

    /// A service call (`HC_SERVICE_NULL`, `HC_SERVICE_INFO`: a hypercall
    /// exit of `domain` with RAX `rax`, its registers `regs()`) of a domain
    /// with no console bytes held back and no interrupt source touched,
    /// answered in the fewest steps: what [`Vmm::respond`] and
    /// [`Vmm::exit_encoded`] make of it, the plain answer (RIP advanced,
    /// RAX and perhaps RBX changed) encoded straight away. `None` (and
    /// nothing done) for anything else. (The registers are read where the
    /// answer is written, not kept across the checks.)
    #[inline(always)]
    fn service_call_encoded(
        &mut self,
        domain: u16,
        rax: u64,
        regs: impl FnOnce() -> ExitRegs,
        out: &mut [u8],
    ) -> Option<usize> {
        if rax != HC_SERVICE_NULL && rax != HC_SERVICE_INFO {
            return None;
        }
        let d = self.devices(domain);
        if !d.line.is_empty() || d.platform.active {
            return None;
        }
        let mut regs = regs();
        service_call(d, &mut regs);
        // RAX was the call's number and is now `Ok` (0): they changed.
        let answer = ipc_schema::exitcodec::encode_answer(&Response::DONE, Some(&regs), out);
        Some(answer.unwrap_or(0))
    }

    fn respond(&mut self, env: &mut impl Env, exit: &Exit, regs: &mut ExitRegs) -> Response {
        let id = exit.domain;
        if let ExitKind::Start = exit.kind {
            // Its first instruction's time: where a guest's own TSC
            // readings count from (`cargo hv bench`'s linux_boot_ticks).
            defmt::info!("domain {=u16} starts at TSC {=u64}", id, env.tsc());
            // A new domain: fresh devices, whatever a domain of this id
            // had; its virtual-APIC page is fresh too (zeroed).
            if self.forget(env, id) {
                defmt::info!(
                    "vmm: domain {=u16} starts: the devices of an earlier domain {=u16} are freed",
                    id,
                    id
                );
            }
            let d = self.devices(id);
            d.platform.apic_page = ApicPage::Shown([0; crate::lapic::IMAGE_LEN]);
            show_apic(env, d);
            return Response::RETRY;
        }
        // Console bytes are held back only while the guest keeps writing
        // them: any other exit sends them on, so that a fault of this
        // service loses at most an unfinished burst.
        let d = self.devices(id);
        if !d.line.is_empty()
            && !matches!(
                exit.kind,
                ExitKind::Io {
                    port: COM1..=0x3ff,
                    ..
                }
            )
        {
            flush(env, d);
        }
        let r = match exit.kind {
            ExitKind::Cpuid { leaf, subleaf } => {
                let r = cpuid(env, leaf, subleaf);
                (regs.rax, regs.rbx, regs.rcx, regs.rdx) =
                    (r.eax.into(), r.ebx.into(), r.ecx.into(), r.edx.into());
                Response::DONE
            }
            ExitKind::Hypercall => {
                if regs.rax == HC_SERVICE_NULL || regs.rax == HC_SERVICE_INFO {
                    service_call(d, regs);
                } else {
                    hypercall(env, exit, regs);
                }
                Response::DONE
            }
            ExitKind::Io {
                port,
                size,
                write,
                value,
            } => io(env, d, regs, port, size, write, value),
            ExitKind::Hlt => Response {
                advance: true,
                inject: None,
                then: Then::Block,
            },
            // The local APIC's base and, in x2APIC mode, its registers.
            ExitKind::Rdmsr { msr } if msr == 0x1b || Lapic::owns(msr) => {
                let lapic = &d.platform.lapic;
                match if msr == 0x1b {
                    Some(lapic.base)
                } else {
                    lapic.read(msr, env.tsc())
                } {
                    Some(v) => {
                        regs.rax = v & 0xffff_ffff;
                        regs.rdx = v >> 32;
                        Response::DONE
                    }
                    None => Response::inject(13, Some(0)),
                }
            }
            ExitKind::Wrmsr { msr, value } if msr == 0x1b || Lapic::owns(msr) => {
                d.platform.active = true;
                let lapic = &mut d.platform.lapic;
                let done = if msr == 0x1b {
                    lapic.write_base(value)
                } else {
                    lapic.write(msr, value, env.tsc())
                };
                if done {
                    Response::DONE
                } else {
                    Response::inject(13, Some(0))
                }
            }
            ExitKind::Rdmsr { msr } => match read_msr(env, msr) {
                Some(v) => {
                    regs.rax = v & 0xffff_ffff;
                    regs.rdx = v >> 32;
                    Response::DONE
                }
                None => {
                    if let Some(skipped) = d.logged.admit() {
                        defmt::debug!(
                            "domain {=u16}: RDMSR {=u32:#x} refused with #GP ({=u32} like it not logged)",
                            id,
                            msr,
                            skipped
                        );
                    }
                    Response::inject(13, Some(0))
                }
            },
            // MTRRs and MISC_ENABLE: accepted and ignored (EPT memory types rule);
            // BIOS_SIGN_ID: the write before reading the microcode revision.
            ExitKind::Wrmsr { msr, .. }
                if (0x200..=0x2ff).contains(&msr) || msr == 0x1a0 || msr == 0x8b =>
            {
                Response::DONE
            }
            ExitKind::Wrmsr { msr, value } => {
                if let Some(skipped) = d.logged.admit() {
                    defmt::debug!(
                        "domain {=u16}: WRMSR {=u32:#x} <- {=u64:#x} refused with #GP ({=u32} like it not logged)",
                        id,
                        msr,
                        value,
                        skipped
                    );
                }
                Response::inject(13, Some(0))
            }
            ExitKind::Vmfunc { leaf, index } => {
                // ALT-5: a VMFUNC the CPU refused (an index whose EPTP list
                // entry is empty: an invisible or missing view) is #UD for
                // the guest, as on a CPU without the function.
                if let Some(skipped) = d.logged.admit() {
                    defmt::info!(
                        "domain {=u16}: VMFUNC leaf {=u32} index {=u32} refused (no such visible view): #UD ({=u32} like it not logged)",
                        id,
                        leaf,
                        index,
                        skipped
                    );
                }
                Response::inject(6, None)
            }
            // The kernel sends the exit handler the violations of gfns that
            // are not RAM: MMIO, emulated (docs/p2m.md, MMIO).
            ExitKind::EptViolation { gpa, access, .. } => mmio(env, d, exit, gpa, access.execute),
            // A write to the xAPIC page, already done (trap-like: RIP is
            // past it).
            ExitKind::ApicWrite { offset, value } => {
                d.platform.active = true;
                if let ApicPage::Shown(s) = &mut d.platform.apic_page
                    && let Some(i) = Lapic::IMAGE.iter().position(|&o| o == offset)
                {
                    s[i] = value as u32; // what the page holds now
                }
                if !d.platform.lapic.write_mmio(offset, value, env.tsc())
                    && let Some(skipped) = d.logged.admit()
                {
                    defmt::info!(
                        "domain {=u16}: write of {=u64:#x} to local APIC register {=u16:#x} through the xAPIC page ignored (not in xAPIC mode, or not writable) ({=u32} like it not logged)",
                        id,
                        value,
                        offset,
                        skipped
                    );
                }
                Response::RETRY
            }
            ExitKind::Other {
                reason: platform::vmx::fields::reason::APIC_ACCESS,
                qualification,
            } => {
                // What the CPU does not virtualize: reads of the timer's
                // current count, PPR and APR, writes of read-only registers,
                // anything unaligned, wider than 4 bytes or a fetch.
                defmt::error!(
                    "domain {=u16}: {=str} of local APIC register {=u64:#x} through the xAPIC page at rip {=u64:#x}, which is not emulated (the current count and PPR are read through the x2APIC MSRs); domain stopped",
                    id,
                    match (qualification >> 12) & 0xf {
                        0 => "read",
                        1 => "write",
                        2 => "instruction fetch",
                        _ => "access during event delivery or a page walk",
                    },
                    qualification & 0xfff,
                    exit.rip
                );
                Response::CRASH
            }
            // A single step asked for by someone else (the altp2m service
            // receives its own): nothing to do but go on.
            ExitKind::MonitorTrap => Response::RETRY,
            // The guest can take an interrupt: the PIC's acknowledge cycle.
            ExitKind::InterruptWindow => {
                d.platform.window = false;
                d.platform.halts = 0;
                if let Some(vector) = d.platform.lapic.ack() {
                    if d.platform.ioapic.vector(2) == Some(vector) {
                        // The PIT through the I/O APIC: as through the PIC.
                        let hz = u64::from(env.tsc_khz()) * 1000;
                        d.platform.pit.hold_off(env.tsc() + hz / MIN_TIMER_RATE);
                    }
                    if vector == d.platform.lapic.timer_vector() {
                        // As for the PIT: 1 / MIN_TIMER_RATE s at least.
                        let hz = u64::from(env.tsc_khz()) * 1000;
                        d.platform.lapic.hold_off(env.tsc() + hz / MIN_TIMER_RATE);
                    }
                    show_apic(env, d);
                    return Response {
                        advance: false,
                        inject: Some(Inject::Interrupt { vector }),
                        then: Then::Resume,
                    };
                }
                let line0 = d.platform.pic.master.base;
                match d.platform.pic.ack() {
                    Some(vector) if vector >= 32 => {
                        if vector == line0 {
                            // The next timer interrupt no sooner than
                            // 1 / MIN_TIMER_RATE s after this one.
                            let hz = u64::from(env.tsc_khz()) * 1000;
                            d.platform.pit.hold_off(env.tsc() + hz / MIN_TIMER_RATE);
                        }
                        Response {
                            advance: false,
                            inject: Some(Inject::Interrupt { vector }),
                            then: Then::Resume,
                        }
                    }
                    Some(vector) => {
                        defmt::error!(
                            "domain {=u16}: its PIC delivers vector {=u8}, an exception's (ICW2 not set above 31); domain stopped",
                            id,
                            vector
                        );
                        Response::CRASH
                    }
                    // Masked or ended meanwhile.
                    None => Response::RETRY,
                }
            }
            // The kernel cleared the deadline it sent.
            ExitKind::Deadline => {
                d.platform.deadline = None;
                Response::RETRY
            }
            // Goes to the service that started PML; here only if the kernel
            // had nowhere else to send it: nothing to read, go on.
            ExitKind::PmlFull { .. } => Response::RETRY,
            ExitKind::Start => Response::RETRY, // answered above
            ExitKind::EptMisconfig { gpa } => {
                defmt::error!(
                    "domain {=u16}: EPT misconfiguration at GPA {=u64:#x} in view {=u16}",
                    id,
                    gpa,
                    exit.view
                );
                Response::CRASH
            }
            ExitKind::TripleFault => {
                defmt::error!(
                    "domain {=u16}: triple fault (the guest could not handle an exception)",
                    id
                );
                Response::CRASH
            }
            ExitKind::Xsetbv { index, value } => {
                defmt::error!(
                    "domain {=u16}: XSETBV {=u32} <- {=u64:#x} is not supported",
                    id,
                    index,
                    value
                );
                Response::CRASH
            }
            // The host's performance counters are not the guest's; CPUID
            // leaf 0xA says there are none, so any counter index is #GP.
            ExitKind::Other {
                reason: platform::vmx::fields::reason::RDPMC,
                ..
            } => Response::inject(13, Some(0)),
            // MONITOR/MWAIT would wait on the host's CPU; CPUID hides them.
            ExitKind::Other {
                reason:
                    platform::vmx::fields::reason::MONITOR | platform::vmx::fields::reason::MWAIT,
                ..
            } => Response::inject(6, None),
            ExitKind::Other {
                reason,
                qualification,
            } => {
                defmt::error!(
                    "domain {=u16}: unhandled exit: {=str} (reason {=u16}, qualification {=u64:#x}) at rip {=u64:#x}",
                    id,
                    platform::vmx::fields::reason::name(reason),
                    reason,
                    qualification,
                    exit.rip
                );
                Response::CRASH
            }
        };
        // A guest that has touched none of the interrupt sources costs one
        // test here (the hot exit path stays as it was); its HLT stops it,
        // as nothing could wake it. Only such a guest's local APIC changes:
        // its xAPIC page is brought up to date here.
        if d.platform.active {
            d.platform.counts.count(&exit.kind);
            let r = interrupts(env, d, &exit.kind, r);
            show_apic(env, d);
            if matches!(r.then, Then::Exit { .. } | Then::Crash) {
                d.platform.counts.log(id);
            }
            r
        } else {
            r
        }
    }
}

/// `HC_SERVICE_NULL` and `HC_SERVICE_INFO` (`regs.rax`): counted, and
/// answered in RAX (and RBX).
#[inline(always)]
fn service_call(d: &mut Devices, regs: &mut ExitRegs) {
    d.service_calls = d.service_calls.wrapping_add(1);
    if regs.rax == HC_SERVICE_INFO {
        regs.rbx = (u64::from(VERSION) << 32) | u64::from(d.service_calls);
    }
    regs.rax = Status::Ok as u64;
}

// `service_call_encoded` answers with the registers as changed.
const _: () = assert!(HC_SERVICE_NULL != Status::Ok as u64 && HC_SERVICE_INFO != Status::Ok as u64);

fn console_byte(env: &mut impl Env, d: &mut Devices, byte: u8) {
    if byte == b'\r' {
        return;
    }
    let _ = d.line.push(byte);
    if byte == b'\n' || d.line.is_full() {
        flush(env, d);
    }
}

/// After an exit's own answer: the PIT's IRQ 0 raised where it is due, and
/// what the kernel must do for interrupts: an interrupt window while one
/// waits in the PIC, the PIT's next edge as the vCPU's deadline, a HLT
/// turned into a wait for that deadline (or, with an interrupt waiting, into
/// going on to take it).
#[inline(never)]
fn interrupts(env: &impl Env, d: &mut Devices, kind: &ExitKind, mut r: Response) -> Response {
    let waits_input = d.uart.wants_input();
    let p = &mut d.platform;
    // Nothing to do (and no clock to read) for a guest that never armed
    // the PIT: the exit path of the others stays as it was.
    if p.pit.next_edge() != u64::MAX && p.pit.irq0_due(env.tsc(), u64::from(env.tsc_khz()) * 1000) {
        p.raise_isa(0);
    }
    // An EOI ends a level entry's wait for it in the I/O APIC.
    if let Some(v) = p.lapic.eoied.take() {
        p.ioapic.eoi(v);
    }
    if p.lapic.expiry != u64::MAX {
        p.lapic.tick(env.tsc());
    }
    let pending = p.pic.pending() || p.lapic.pending().is_some();
    // The PIT's next edge matters only while IRQ 0 is not already
    // requested (an edge then changes nothing): no deadline meanwhile, so
    // that a timer faster than the exits it causes cannot keep the vCPU
    // from running its interrupt handler, or from entering at all. The
    // same for the local APIC's timer and its vector.
    let pit = if p.irq0_waits() {
        u64::MAX
    } else {
        p.pit.next_edge()
    };
    let deadline = pit.min(p.lapic.deadline());
    if matches!(kind, ExitKind::Hlt) && r.then == Then::Block {
        if pending {
            p.halts = p.halts.saturating_add(1);
            if p.halts > 1 && p.window {
                // A window was asked for and a HLT came instead, twice: the
                // guest halted with interrupts off; it would wait for ever.
                defmt::warn!(
                    "domain {=u16}: HLT with interrupts off while an interrupt waits: it can never wake",
                    d.id
                );
                return r;
            }
            r.then = Then::Resume;
        } else {
            // Input for COM1 comes from the console between exits: a guest
            // waiting for it is woken now and then to take it.
            let deadline = if waits_input {
                let poll = u64::from(env.tsc_khz().max(1)) * INPUT_POLL_MS;
                deadline.min(env.tsc().saturating_add(poll))
            } else {
                deadline
            };
            if deadline == u64::MAX {
                return r;
            }
            p.deadline = Some(deadline);
            r.then = Then::BlockUntil { deadline };
            return r;
        }
    }
    if r.then == Then::Resume {
        let window = p.window || pending;
        let kept = p.deadline.unwrap_or(u64::MAX);
        if window != p.window || deadline != kept {
            p.window = window;
            p.deadline = (deadline != u64::MAX).then_some(deadline);
            r.then = Then::ResumeUntil { window, deadline };
        }
    }
    r
}

/// Port I/O: the console UART, the exit port, the PICs and the PIT; other
/// ports read as absent hardware (all ones) and ignore writes, each logged
/// the first time.
fn io(
    env: &mut impl Env,
    d: &mut Devices,
    regs: &mut ExitRegs,
    port: u16,
    size: u8,
    write: bool,
    value: u32,
) -> Response {
    match port {
        COM1..=0x3ff if write => {
            // (Its interrupts enabled: polling drivers write 0 there.)
            if port == COM1 + 1 && value & 3 != 0 {
                d.platform.active = true;
            }
            let was = d.uart.irq();
            if let Some(byte) = d.uart.write(port - COM1, value as u8) {
                console_byte(env, d, byte);
            }
            // COM1's line is IRQ 4; the PIC takes its rising edges.
            if d.uart.irq() && !was {
                d.platform.raise_isa(4);
            }
        }
        COM1..=0x3ff => {
            let v = d.uart.read(port - COM1);
            set_in(regs, size, u32::from(v));
        }
        EXIT_PORT if write => {
            // Whatever the guest left unterminated still reaches the log.
            flush(env, d);
            if d.open_line {
                env.console(d.id, b"\n");
                d.open_line = false;
            }
            return Response {
                advance: true,
                inject: None,
                then: Then::Exit { status: value },
            };
        }
        // PM1a status (0x600): nothing happens, nothing to report; enable
        // (0x602): kept as written (no event is ever raised), so that a
        // kernel enabling an event reads its bit back.
        0x600..=0x601 if !write => set_in(regs, size, 0),
        0x600..=0x601 => {}
        0x602 | 0x603 => {
            let pm1 = &mut d.platform.pm1_enable;
            let shift = if port == 0x603 { 8 } else { 0 };
            let mask: u16 = if size >= 2 && port == 0x602 {
                0xffff
            } else {
                0xff << shift
            };
            if write {
                *pm1 = (*pm1 & !mask) | ((value as u16) << shift & mask);
            } else {
                set_in(regs, size, u32::from((*pm1 & mask) >> shift));
            }
        }
        // ACPI PM1a control: SCI_EN reads set (ACPI mode is on); a sleep
        // request for S5 (`\_S5`'s type 0) powers the domain off.
        0x604 | 0x605 if !write => set_in(regs, size, if port == 0x604 { 1 } else { 0 }),
        0x604 if write && size >= 2 && value as u16 & SLP_EN != 0 => {
            let kind = (value as u16 >> 10) & 7;
            if kind == SLP_TYP_S5 {
                defmt::info!("domain {=u16}: powered off through ACPI (S5)", d.id);
                flush(env, d);
                if d.open_line {
                    env.console(d.id, b"\n");
                    d.open_line = false;
                }
                return Response {
                    advance: true,
                    inject: None,
                    then: Then::Exit { status: 0 },
                };
            }
            if let Some(skipped) = d.logged.admit() {
                defmt::info!(
                    "domain {=u16}: ACPI sleep type {=u16} asked for: only S5 (soft off) is there; ignored ({=u32} like it not logged)",
                    d.id,
                    kind,
                    skipped
                );
            }
        }
        0x604 | 0x605 => {}
        _ if Pci::owns(port) => {
            let mut f = DomainFunctions { env, domain: d.id };
            if write {
                d.platform.pci.write(&mut f, port, size, value);
            } else {
                set_in(regs, size, d.platform.pci.read(&mut f, port, size));
            }
        }
        _ if Cmos::owns(port) => {
            let id = d.id;
            let cmos = d
                .platform
                .cmos
                .get_or_insert_with(|| Cmos::new(env.ram_bytes(id)));
            if write {
                cmos.write(port, value as u8);
            } else {
                let hz = u64::from(env.tsc_khz()) * 1000;
                let v = cmos.read(port, env.tsc(), hz);
                set_in(regs, size, u32::from(v));
            }
        }
        _ if Pic::owns(port) && write => {
            d.platform.active = true;
            d.platform.pic.write(port, value as u8);
        }
        _ if Pic::owns(port) => set_in(regs, size, u32::from(d.platform.pic.read(port))),
        _ if Pit::owns(port) => {
            d.platform.active = true;
            let (now, hz) = (env.tsc(), u64::from(env.tsc_khz()) * 1000);
            if write {
                d.platform.pit.write(port, value as u8, now, hz);
            } else {
                let v = d.platform.pit.read(port, now, hz);
                set_in(regs, size, u32::from(v));
            }
        }
        _ => {
            if !d.platform.absent.contains(&port) && d.platform.absent.push(port).is_ok() {
                defmt::info!(
                    "domain {=u16}: port {=u16:#x} has no device ({=str} of {=u8} bytes): reads all ones, writes ignored (logged once)",
                    d.id,
                    port,
                    if write { "a write" } else { "a read" },
                    size
                );
            }
            if !write {
                set_in(regs, size, u32::MAX);
            }
        }
    }
    Response::DONE
}

/// Sends the console bytes held back so far (the host cuts lines at '\n').
fn flush(env: &mut impl Env, d: &mut Devices) {
    if let Some(&last) = d.line.last() {
        env.console(d.id, &d.line);
        d.open_line = last != b'\n';
        d.line.clear();
    }
}

/// The value an IN instruction loads (into AL, AX or EAX).
fn set_in(regs: &mut ExitRegs, size: u8, value: u32) {
    let mask: u64 = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    // A 32-bit IN zero-extends into RAX; 8- and 16-bit ones keep the rest.
    regs.rax = if size == 4 {
        u64::from(value)
    } else {
        (regs.rax & !mask) | (u64::from(value) & mask)
    };
}

/// CPUID leaf 1 ECX: what depends on XSAVE, hidden. XSETBV exits
/// unconditionally and the guest shares the host's XCR0 (the kernel saves
/// and restores the guest's FPU state with the components it enabled), so
/// a guest that saw XSAVE would set its own XCR0: XSAVE (26), OSXSAVE (27),
/// AVX (28), FMA (12) and F16C (29) are hidden; guests use FXSAVE and SSE.
pub const LEAF1_ECX_XSAVE: u32 = 1 << 26 | 1 << 27 | 1 << 28 | 1 << 12 | 1 << 29;
/// Leaf 1 ECX: features whose MSRs or state are the host's CPU's and not
/// modelled: DTES64 (2), DS-CPL (4), Enhanced SpeedStep (7), TM2 (8), xTPR
/// update control (14), the perfmon capabilities MSR (15).
pub const LEAF1_ECX_HOST: u32 = 1 << 2 | 1 << 4 | 1 << 7 | 1 << 8 | 1 << 14 | 1 << 15;
/// Leaf 1 EDX: the same: machine check (MCE 7, MCA 14: Linux reads the
/// bank MSRs and panics at a #GP there), debug store (21), ACPI thermal
/// control (22), thermal monitor (29), pending break enable (31).
pub const LEAF1_EDX_HOST: u32 = 1 << 7 | 1 << 14 | 1 << 21 | 1 << 22 | 1 << 29 | 1 << 31;
/// Leaf 7 EBX: TSC_ADJUST (1, its MSR is the host's), AVX2 (5), INVPCID
/// (10, #UD without the VMCS's enable-INVPCID control) and the AVX-512
/// foundation and families (16, 17, 21, 26, 27, 28, 30, 31: XSAVE state).
pub const LEAF7_EBX_HIDDEN: u32 = 1 << 1
    | 1 << 5
    | 1 << 10
    | 1 << 16
    | 1 << 17
    | 1 << 21
    | 1 << 26
    | 1 << 27
    | 1 << 28
    | 1 << 30
    | 1 << 31;
/// Leaf 7 ECX: AVX-512 VBMI (1), PKU and OSPKE (3, 4: PKRU is XSAVE
/// state), VBMI2 (6), VNNI (11), BITALG (12), VPOPCNTDQ (14), RDPID (22:
/// IA32_TSC_AUX is not the guest's).
pub const LEAF7_ECX_HIDDEN: u32 =
    1 << 1 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 11 | 1 << 12 | 1 << 14 | 1 << 22;
/// Leaf 7 EDX: AVX-512 4VNNIW and 4FMAPS (2, 3), MD_CLEAR (10), and the
/// speculation controls whose MSRs are the host's: IBRS/IBPB (26), STIBP
/// (27), L1D_FLUSH (28), ARCH_CAPABILITIES (29), SSBD (31). A guest that
/// saw them would write IA32_SPEC_CTRL on every entry to its kernel.
pub const LEAF7_EDX_HIDDEN: u32 =
    1 << 2 | 1 << 3 | 1 << 10 | 1 << 26 | 1 << 27 | 1 << 28 | 1 << 29 | 1 << 31;

/// CPUID as the host answers it, with VMX hidden and Parallax's leaves added.
pub fn cpuid(env: &impl Env, leaf: u32, subleaf: u32) -> CpuidResult {
    let mut r = env.cpuid(leaf, subleaf);
    match leaf {
        1 => {
            r.ecx &= !(1 << 5); // no VMX for guests
            r.ecx &= !(1 << 3); // no MONITOR/MWAIT (they exit: #UD)
            r.ecx &= !(LEAF1_ECX_XSAVE | LEAF1_ECX_HOST);
            r.edx &= !LEAF1_EDX_HOST;
            r.ecx |= 1 << 31; // running under a hypervisor
        }
        // Thermal and power management: only ARAT (the local APIC's timer
        // runs in every C-state). No APERF/MPERF, HWP or turbo: their MSRs
        // are the host's.
        6 => (r.eax, r.ebx, r.ecx, r.edx) = (1 << 2, 0, 0, 0),
        7 if subleaf == 0 => {
            r.ebx &= !LEAF7_EBX_HIDDEN;
            r.ecx &= !LEAF7_ECX_HIDDEN;
            r.edx &= !LEAF7_EDX_HIDDEN;
        }
        // AVX-VNNI (4) and AVX512_BF16 (5): AVX state too.
        7 if subleaf == 1 => r.eax &= !(1 << 4 | 1 << 5),
        // No XSAVE: its components are not described.
        0xd => r = CpuidResult::default(),
        // The TSC's rate as the crystal's (ratio 1/1), and as the base and
        // maximum frequency in MHz: the host CPU's nominal figures are not
        // the rate the guest's TSC counts at (under Bochs, 100 MHz where
        // CPUID says 3.5 GHz). Linux takes leaf 0x15 as the TSC's exact
        // frequency (and the local APIC timer's) and calibrates nothing.
        0x15 => {
            // ECX (the crystal's Hz) is 32 bits: above 4.29 GHz the ratio
            // says how many crystal periods make a TSC tick.
            let hz = u64::from(env.tsc_khz()) * 1000;
            let ratio = hz.div_ceil(u64::from(u32::MAX)).max(1);
            (r.eax, r.ebx, r.ecx, r.edx) = if hz == 0 {
                (0, 0, 0, 0)
            } else {
                (1, ratio as u32, (hz / ratio) as u32, 0)
            };
        }
        0x16 => {
            let mhz = env.tsc_khz() / 1000;
            (r.eax, r.ebx, r.ecx, r.edx) = (mhz, mhz, 0, 0);
        }
        // No RDTSCP (IA32_TSC_AUX is not the guest's; without the VMCS's
        // enable-RDTSCP control it would be #UD).
        0x8000_0001 => r.edx &= !(1 << 27),
        // No performance monitoring: the counters are the host's (RDPMC
        // exits: #GP).
        0xa => r = CpuidResult::default(),
        0x4000_0000 => {
            let sig = |i: usize| {
                u32::from_le_bytes([
                    CPUID_SIGNATURE[i],
                    CPUID_SIGNATURE[i + 1],
                    CPUID_SIGNATURE[i + 2],
                    CPUID_SIGNATURE[i + 3],
                ])
            };
            (r.eax, r.ebx, r.ecx, r.edx) = (CPUID_MAX_LEAF, sig(0), sig(4), sig(8));
        }
        ipc_schema::hypercall::CPUID_TSC_LEAF => {
            (r.eax, r.ebx, r.ecx, r.edx) = (env.tsc_khz(), 0, 0, 0);
        }
        0x4000_0001 => {
            let f = env.features();
            let has = |bit: u64| u32::from(f & bit != 0);
            let key = HYPERCALL_KEY.to_bytes();
            r.eax = 1
                | (has(vm_features::VMFUNC) << 1)
                | (has(vm_features::VE) << 2)
                | (has(vm_features::PML) << 3);
            r.ebx = u32::from_le_bytes([key[0], key[1], key[2], key[3]]);
            r.ecx = u32::from_le_bytes([key[4], key[5], key[6], key[7]]);
            r.edx = 0;
        }
        0x4000_0002..=0x4000_ffff => (r.eax, r.ebx, r.ecx, r.edx) = (0, 0, 0, 0),
        _ => {}
    }
    r
}

/// The MSRs a guest may read that VMX does not switch by itself.
fn read_msr(env: &impl Env, msr: u32) -> Option<u64> {
    Some(match msr {
        0x10 => env.tsc(),
        // IA32_FEATURE_CONTROL: locked, VMX off (CPUID hides VMX too).
        0x3a => 1,
        // IA32_BIOS_SIGN_ID: no microcode revision to tell (Linux reads it
        // on every Intel CPU, after writing 0 to it).
        0x8b => 0,
        0xfe => 0,      // MTRRcap: no MTRRs to program
        0x1a0 => 1,     // MISC_ENABLE: fast strings
        0x2ff => 0x806, // MTRR default type: enabled, write-back
        _ => return None,
    })
}

/// A VMCALL the kernel's fast path did not take (ABI: `ipc_schema::hypercall`).
fn hypercall(env: &mut impl Env, exit: &Exit, regs: &mut ExitRegs) {
    let status = match regs.rax {
        HC_IPC_PING => match env.ping() {
            Some(ticks) => {
                regs.rbx = ticks;
                Status::Ok
            }
            None => Status::Refused,
        },
        HC_CALL => call(env, exit, regs),
        // The kernel sends `HC_VIEW_SWITCH` to the altp2m service, and here
        // only when that service cannot take it (held, or gone).
        HC_VIEW_SWITCH => {
            defmt::debug!(
                "domain {=u16}: view switch refused: the altp2m service is unavailable",
                exit.domain
            );
            Status::Refused
        }
        _ => Status::UnknownCall,
    };
    regs.rax = status as u64;
}

/// The request hypercall: a postcard [`Request`] in guest memory, answered
/// with a [`Reply`] in the same place. Requests are untrusted: the address
/// must be guest RAM within one page and the bytes must decode exactly.
///
/// The page is read and written as the guest would, through the view its
/// vCPU was in when it made the call (the altp2m service says what that is,
/// [`AltRequest::GuestPage`]): where the view remaps the gfn (change_gfn),
/// the frame the guest sees there; where the view does not let the guest
/// read and write it, the call is refused (`BadAddress`) and nothing is
/// written. When the altp2m service cannot answer, the refusal
/// (`ServiceUnavailable`) is written through the host p2m.
fn call(env: &mut impl Env, exit: &Exit, regs: &mut ExitRegs) -> Status {
    let (gpa, len) = (regs.rbx, regs.rcx);
    if len > MAX_REQUEST as u64 {
        return Status::Malformed;
    }
    let len = len as usize;
    if (gpa % PAGE) as usize + len > PAGE as usize {
        return Status::BadAddress;
    }
    let page = env.altp2m(&AltRequest::GuestPage {
        domain: exit.domain,
        view: exit.view,
        gfn: gpa / PAGE,
    });
    let gpa = match page {
        Some(AltReply::Page {
            frame_gfn: Some(frame),
            access,
        }) if access.read && access.write => frame * PAGE + gpa % PAGE,
        Some(_) => return Status::BadAddress,
        None => {
            let reply = Reply::Error(HcError::ServiceUnavailable);
            let mut out = [0u8; 16];
            let Ok(bytes) = postcard::to_slice(&reply, &mut out) else {
                return Status::Refused;
            };
            if (gpa % PAGE) as usize + bytes.len() <= PAGE as usize
                && env.write_guest(exit.domain, gpa, bytes)
            {
                regs.rbx = bytes.len() as u64;
            }
            return Status::Refused;
        }
    };
    let mut buf = [0u8; MAX_REQUEST];
    if !env.read_guest(exit.domain, gpa, &mut buf[..len]) {
        return Status::BadAddress;
    }
    let request = match postcard::take_from_bytes::<Request>(&buf[..len]) {
        Ok((r, [])) => r,
        _ => return Status::Malformed,
    };
    let reply = if let Some(r) = dirty_request(exit.domain, &request) {
        dirty_reply(env.logdirty(&r))
    } else if let Request::GrantPages { gfn, count, grant } = request {
        grant_pages(env, exit.domain, gfn, count, grant)
    } else {
        match env.altp2m(&AltRequest::Guest {
            domain: exit.domain,
            vcpu: exit.vcpu,
            request,
        }) {
            Some(AltReply::Reply(r)) => r,
            _ => Reply::Error(HcError::ServiceUnavailable),
        }
    };
    if let Reply::Error(e) = reply {
        defmt::debug!("domain {=u16}: hypercall refused: {}", exit.domain, e);
    }
    let room = (PAGE - gpa % PAGE) as usize;
    let Ok(bytes) = postcard::to_slice(&reply, &mut buf[..room.min(MAX_REQUEST)]) else {
        return Status::ReplyTooLong;
    };
    if !env.write_guest(exit.domain, gpa, bytes) {
        return Status::BadAddress;
    }
    regs.rbx = bytes.len() as u64;
    if matches!(reply, Reply::Error(_)) {
        Status::Refused
    } else {
        Status::Ok
    }
}

impl Platform {
    /// An edge on ISA line `irq`: to the PICs, and to the I/O APIC on the
    /// pin the MADT's overrides give it (sent on to the local APIC where
    /// its entry is unmasked).
    fn raise_isa(&mut self, irq: u8) {
        self.pic.raise(irq);
        if let Some(vector) = self.ioapic.pulse(IoApic::pin_of_isa(irq)) {
            self.lapic.deliver(vector);
        }
    }

    /// IRQ 0 waits to be taken: requested in the master PIC and not
    /// masked there, or its I/O APIC vector requested in the local APIC.
    fn irq0_waits(&self) -> bool {
        (self.pic.master.irr & 1 != 0 && self.pic.master.imr & 1 == 0)
            || self
                .ioapic
                .vector(IoApic::pin_of_isa(0))
                .is_some_and(|v| self.lapic.requested(v))
    }
}

/// The instruction bytes at the vCPU's RIP, read through its page tables
/// (as many as can be, up to [`decode::MAX_LEN`]); the mode of its code
/// segment.
fn fetch(
    env: &mut impl Env,
    id: u16,
    regs: &[u64; r::COUNT],
) -> Option<([u8; decode::MAX_LEN], usize, Mode, u64)> {
    let cs_ar = regs[r::CS] >> 16;
    let long = regs[r::EFER] & (1 << 10) != 0 && cs_ar & (1 << 13) != 0;
    let mode = if long {
        Mode::Long
    } else if regs[r::CR0] & 1 != 0 && cs_ar & (1 << 14) != 0 {
        Mode::Protected32
    } else {
        Mode::Protected16
    };
    let linear = if long {
        regs[r::RIP]
    } else {
        regs[r::CS_BASE].wrapping_add(regs[r::RIP] & 0xffff_ffff) & 0xffff_ffff
    };
    let paging = service_pagewalk::paging_mode(regs[r::CR0], regs[r::CR4], regs[r::EFER]);
    let mut bytes = [0u8; decode::MAX_LEN];
    let mut got = 0;
    while got < bytes.len() {
        let at = linear.wrapping_add(got as u64);
        let gpa = match paging {
            service_pagewalk::Paging::Off => at,
            p => {
                let mut mem = GuestRam { env, id };
                match service_pagewalk::translate(&mut mem, p, regs[r::CR3], at) {
                    Ok(t) => t.gpa,
                    Err(_) => break,
                }
            }
        };
        let n = (bytes.len() - got).min((PAGE - gpa % PAGE) as usize);
        if !env.read_guest(id, gpa, &mut bytes[got..got + n]) {
            break;
        }
        got += n;
    }
    (got > 0).then_some((bytes, got, mode, linear))
}

/// The guest's RAM for the page walker, through DOMAIN_READ.
struct GuestRam<'a, E: Env> {
    env: &'a mut E,
    id: u16,
}

impl<E: Env> service_pagewalk::GuestMemory for GuestRam<'_, E> {
    type Error = ();
    fn read_u64(&mut self, gpa: u64) -> Result<u64, ()> {
        let mut b = [0u8; 8];
        if self.env.read_guest(self.id, gpa, &mut b) {
            Ok(u64::from_le_bytes(b))
        } else {
            Err(())
        }
    }
    fn read_u32(&mut self, gpa: u64) -> Result<u32, ()> {
        let mut b = [0u8; 4];
        if self.env.read_guest(self.id, gpa, &mut b) {
            Ok(u32::from_le_bytes(b))
        } else {
            Err(())
        }
    }
}

/// A guest access to guest-physical `gpa`, which is not RAM: the
/// instruction at RIP decoded ([`decode`]) and emulated against the device
/// there (the I/O APIC) or against nothing (reads all ones, writes
/// dropped, logged once a page), RIP moved past it. An instruction fetch
/// there, or an instruction the decoder does not take, stops the domain,
/// naming the bytes.
fn mmio(
    env: &mut impl Env,
    d: &mut Devices,
    exit: &Exit,
    gpa: u64,
    fetch_access: bool,
) -> Response {
    let id = d.id;
    if fetch_access {
        defmt::error!(
            "domain {=u16}: instruction fetch at guest-physical {=u64:#x} (rip {=u64:#x}), which is not RAM; domain stopped",
            id,
            gpa,
            exit.rip
        );
        return Response::CRASH;
    }
    let Some(mut regs) = env.vcpu_regs(id) else {
        defmt::error!(
            "domain {=u16}: access to {=u64:#x}, which is not RAM: its vCPU's registers cannot be read to emulate it; domain stopped",
            id,
            gpa
        );
        return Response::CRASH;
    };
    let Some((bytes, got, mode, linear)) = fetch(env, id, &regs) else {
        defmt::error!(
            "domain {=u16}: access to {=u64:#x}, which is not RAM, by the instruction at rip {=u64:#x}, whose bytes cannot be read; domain stopped",
            id,
            gpa,
            regs[r::RIP]
        );
        return Response::CRASH;
    };
    let insn = match decode::decode(&bytes[..got], mode) {
        Ok(i) => i,
        Err(why) => {
            defmt::error!(
                "domain {=u16}: access to {=u64:#x}, which is not RAM, by an instruction that is not emulated ({}) at rip {=u64:#x} (linear {=u64:#x}): bytes {=[u8]:02x}; domain stopped",
                id,
                gpa,
                why,
                regs[r::RIP],
                linear,
                &bytes[..got]
            );
            return Response::CRASH;
        }
    };
    let mut mask = 1u64 << r::RIP;
    match insn.op {
        Op::Load { reg, dest, sign } => {
            let value = mmio_read(d, gpa, insn.size);
            let i = decode::slot(reg.index);
            regs[i] = decode::load_into(regs[i], value, insn.size, reg, dest, sign);
            mask |= 1 << i;
        }
        Op::StoreReg { reg } => {
            let value = decode::read_reg(&regs, reg, insn.size);
            mmio_write(d, gpa, insn.size, value);
        }
        Op::StoreImm { value } => mmio_write(d, gpa, insn.size, decode::truncate(value, insn.size)),
    }
    let next = regs[r::RIP].wrapping_add(u64::from(insn.len));
    regs[r::RIP] = if mode == Mode::Long {
        next
    } else {
        next & 0xffff_ffff
    };
    if !env.set_regs(id, &regs, mask) {
        defmt::error!(
            "domain {=u16}: the access to {=u64:#x} at rip {=u64:#x} was emulated but its registers could not be set; domain stopped",
            id,
            gpa,
            exit.rip
        );
        return Response::CRASH;
    }
    Response::RETRY
}

/// Logs an access to a page with no device, the first time for the page
/// (of the first [`ABSENT_LOGGED`]).
fn absent_mmio(d: &mut Devices, gpa: u64, what: &str, size: u8) {
    let p = &mut d.platform;
    let page = gpa & !(PAGE - 1);
    if p.absent_mmio.contains(&page) || p.absent_mmio.is_full() {
        return;
    }
    let _ = p.absent_mmio.push(page);
    defmt::info!(
        "domain {=u16}: {=str} of {=u8} bytes at {=u64:#x}: no device there (MMIO reads all ones, writes are dropped; this page is not logged again)",
        d.id,
        what,
        size,
        gpa
    );
}

fn ioapic_refused(d: &mut Devices, why: crate::ioapic::Refusal) {
    if let Some(skipped) = d.logged.admit() {
        defmt::warn!(
            "domain {=u16}: I/O APIC access refused or ignored: {} ({=u32} like it not logged)",
            d.id,
            why,
            skipped
        );
    }
}

fn mmio_read(d: &mut Devices, gpa: u64, size: u8) -> u64 {
    if IoApic::owns(gpa) {
        d.platform.active = true;
        return match d.platform.ioapic.read(gpa, size) {
            Ok(v) => u64::from(v),
            Err(why) => {
                ioapic_refused(d, why);
                0
            }
        };
    }
    absent_mmio(d, gpa, "read", size);
    decode::truncate(u64::MAX, size)
}

fn mmio_write(d: &mut Devices, gpa: u64, size: u8, value: u64) {
    if IoApic::owns(gpa) {
        d.platform.active = true;
        if let Err(why) = d.platform.ioapic.write(gpa, size, value as u32) {
            ioapic_refused(d, why);
        }
        return;
    }
    absent_mmio(d, gpa, "write", size);
}
