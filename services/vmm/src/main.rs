//! vmm: the exit handler of every domain.
//!
//! The kernel sends each exit it does not handle itself (everything but the
//! fast hypercalls and VMFUNC) as a call on the `exits` endpoint; the vmm
//! answers how the vCPU resumes. It holds a `domains` handle with the rights
//! to read and write guest memory (request hypercalls) and to write guest
//! consoles into the log, and an `altp2m` handle to forward view requests.
//! The console calls it on `uart-input` with what the host types for a
//! domain's COM1.
//! Its state (each domain's UART and unfinished console line) moves to a
//! successor on a swap.

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, AltReply, AltRequest, PING, PONG};
use ipc_schema::ipc::IpcError;
use ipc_schema::logdirty::{LOGDIRTY, LdReply, LdRequest};
use ipc_schema::syscall::{Handle, SysError, VcpuOp};
use ipc_schema::uart::{UART_INPUT, UartInput};
use ipc_schema::vmexit::{ExitMessage, VMEXIT};
use platform::cpu::CpuidResult;
use service_runtime::ipc::{self, CallError, Client, Message, Service};
use service_runtime::{require, sys};
use service_vmm::exits::{Env, State, Vmm};
use service_vmm::pci::Op;

service_runtime::entry!(main);
service_runtime::interfaces!(VMEXIT, UART_INPUT);

struct System {
    domains: Handle,
    altp2m: Peer,
    /// The logdirty service, for in-guest agents' dirty logs (optional).
    logdirty: Option<Peer>,
    features: u64,
    /// The TSC frequency in kHz, as the kernel measured it at boot.
    tsc_khz: u32,
}

/// A service the vmm forwards guests' requests to.
struct Peer {
    client: Client,
    name: &'static str,
    /// The last call failed (failures are logged when this changes, not
    /// once per hypercall a guest makes).
    failing: bool,
}

impl Peer {
    fn new(handle: Handle, interface: ipc_schema::ipc::InterfaceId, name: &'static str) -> Self {
        Self {
            client: Client::new(handle, interface),
            name,
            failing: false,
        }
    }

    /// Its answer, `None` when it cannot be reached.
    #[inline(always)]
    fn call<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
        &mut self,
        request: &Q,
    ) -> Option<R> {
        let answer = self.client.call::<_, R>(request);
        self.outcome(answer)
    }

    /// A call's answer, `None` when the service could not be reached (its
    /// failures logged when they begin and end).
    #[inline(always)]
    fn outcome<R>(&mut self, answer: Result<R, CallError>) -> Option<R> {
        match answer {
            Ok(r) => {
                if self.failing {
                    self.answers_again();
                }
                Some(r)
            }
            Err(e) => {
                if !core::mem::replace(&mut self.failing, true) {
                    defmt::warn!(
                        "vmm: the {=str} service did not answer ({}); guests' requests get ServiceUnavailable",
                        self.name,
                        e
                    );
                }
                None
            }
        }
    }

    /// It answered after failing: said once.
    #[cold]
    #[inline(never)]
    fn answers_again(&mut self) {
        self.failing = false;
        defmt::info!("vmm: the {=str} service answers again", self.name);
    }

    /// The ping (`HC_IPC_PING`): [`Peer::call`] with `AltRequest::Ping`,
    /// its request and the answer `Pong` in their fixed bytes (nothing
    /// encoded, nothing decoded unless the answer is another). If it
    /// answered `Pong`, the TSC ticks of the round trip alone: from before
    /// the request is written to the CALL's return, before the answer is
    /// looked at (`Env::ping`).
    #[inline(always)]
    fn ping(&mut self) -> Option<u64> {
        let start = platform::cpu::rdtsc();
        let answer = self.client.call_encoded(|m| {
            m.get_mut(..PING.len())?.copy_from_slice(&PING);
            Some(PING.len())
        });
        let ticks = platform::cpu::rdtsc().wrapping_sub(start);
        let answer = match answer {
            Ok(b) if b == PONG => Ok(true),
            // Anything else decoded as `call` would have.
            Ok(b) => match postcard::from_bytes::<Result<AltReply, IpcError>>(b) {
                Ok(Ok(r)) => Ok(r == AltReply::Pong),
                Ok(Err(e)) => Err(CallError::Ipc(e)),
                Err(_) => Err(CallError::BadReply),
            },
            Err(e) => Err(e),
        };
        self.outcome(answer).unwrap_or(false).then_some(ticks)
    }
}

impl Env for System {
    fn features(&self) -> u64 {
        self.features
    }

    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        platform::cpu::cpuid(leaf, subleaf)
    }

    fn tsc(&self) -> u64 {
        // (RDTSC is allowed in ring 3: CR4.TSD is clear.)
        platform::cpu::rdtsc()
    }

    fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    fn console(&mut self, domain: u16, bytes: &[u8]) {
        if let Err(e) = sys::console(self.domains, domain, bytes) {
            defmt::warn!(
                "vmm: {=usize} console bytes of domain {=u16} lost: {}",
                bytes.len(),
                domain,
                e
            );
        }
    }

    fn read_guest(&mut self, domain: u16, gpa: u64, out: &mut [u8]) -> bool {
        sys::domain_read(self.domains, domain, gpa, out).is_ok()
    }

    fn write_guest(&mut self, domain: u16, gpa: u64, bytes: &[u8]) -> bool {
        sys::domain_write(self.domains, domain, gpa, bytes).is_ok()
    }

    fn ram_bytes(&mut self, domain: u16) -> u64 {
        sys::domain_info(self.domains, domain).map_or(0, |(_, _, ram)| ram)
    }

    fn logdirty(&mut self, request: &LdRequest) -> Option<LdReply> {
        self.logdirty.as_mut()?.call(request)
    }

    fn apic_set(&mut self, domain: u16, offset: u16, value: u32) -> bool {
        let arg = (u64::from(offset) << 32) | u64::from(value);
        sys::vcpu_control(self.domains, domain, 0, VcpuOp::ApicSet, arg).is_ok()
    }

    fn grant(&mut self, domain: u16, gfn: u64, count: u64, grant: bool) -> Result<(), SysError> {
        sys::domain_grant(self.domains, domain, gfn, count, grant)
    }

    fn vcpu_regs(&mut self, domain: u16) -> Option<[u64; ipc_schema::syscall::regs::COUNT]> {
        sys::vcpu_regs(self.domains, domain, 0).ok()
    }

    fn set_regs(
        &mut self,
        domain: u16,
        values: &[u64; ipc_schema::syscall::regs::COUNT],
        mask: u64,
    ) -> bool {
        sys::vcpu_set_regs(self.domains, domain, 0, values, mask).is_ok()
    }

    fn device_config(&mut self, domain: u16, index: u8, op: Op) -> Option<u32> {
        let h = device_handle(domain, index)?;
        match op {
            Op::Read { offset, size } => sys::device_config_read(h, offset.into(), size).ok(),
            Op::Write {
                offset,
                size,
                value,
            } => sys::device_config_write(h, offset.into(), size, value)
                .ok()
                .map(|()| 0),
            Op::Probe { offset } => sys::device_config_probe(h, offset.into()).ok(),
        }
    }

    #[inline(always)]
    fn altp2m(&mut self, request: &AltRequest) -> Option<AltReply> {
        self.altp2m.call(request)
    }

    #[inline(always)]
    fn ping(&mut self) -> Option<u64> {
        self.altp2m.ping()
    }
}

struct Server {
    exits: Handle,
    /// Input for domains' COM1, from the console (`NO_HANDLE` without).
    input: Handle,
    /// The exit being handled (decoded in place).
    exit: ExitMessage,
    vmm: Vmm,
    system: System,
}

/// The slot of a handle the vmm does not have (slots are below 64).
const NO_HANDLE: Handle = Handle::MAX;

impl Server {
    /// Input for a domain's COM1.
    #[inline(never)]
    fn uart_input(&mut self, bytes: &[u8], reply: &mut [u8]) -> usize {
        let answer =
            ipc::decode::<UartInput>(bytes).map(|q| self.vmm.receive(q.domain, &q.bytes.0));
        ipc::encode_reply(&answer, reply)
    }
}

/// The answer to a message on the exit endpoint that is not an exit (of
/// `len` bytes, from the handle of `badge`).
#[cold]
#[inline(never)]
fn not_an_exit(len: usize, badge: u64, reply: &mut [u8]) -> usize {
    defmt::warn!(
        "vmm: a message on the exit endpoint that is not an exit ({=usize} bytes, badge {=u64})",
        len,
        badge
    );
    ipc::encode_reply::<()>(&Err(IpcError::Malformed), reply)
}

impl Service for Server {
    type State = State;

    fn interface(&self, slot: Handle) -> Option<ipc_schema::ipc::InterfaceId> {
        if slot == self.exits {
            Some(VMEXIT)
        } else {
            (slot == self.input).then_some(UART_INPUT)
        }
    }

    fn handle(&mut self, msg: Message<'_>, reply: &mut [u8]) -> usize {
        if msg.slot == self.input {
            // (The bytes, not the `Message`: one passed out of line is
            // one every exit would store.)
            return self.uart_input(msg.bytes, reply);
        }
        // Exits come from the kernel (badge 0) and nobody else.
        match self
            .vmm
            .exit_bytes(&mut self.system, msg.bytes, &mut self.exit, reply)
        {
            Some(n) => n,
            None => not_an_exit(msg.bytes.len(), msg.badge, reply),
        }
    }

    fn snapshot(&self) -> State {
        self.vmm.snapshot()
    }

    fn restore(&mut self, state: State) {
        self.vmm = Vmm::restore(state);
    }

    fn snapshot_into(&self, out: &mut [u8]) -> Option<usize> {
        self.vmm.snapshot_into(out)
    }

    fn restore_from(&mut self, bytes: &[u8]) -> bool {
        if cfg!(feature = "refuse-state") {
            defmt::warn!("vmm: built to refuse its predecessor's state (refuse-state)");
            return false;
        }
        self.vmm.restore_from(bytes)
    }

    fn version(&self) -> u32 {
        service_vmm::exits::VERSION
    }
}

/// The Device handle of domain `domain`'s assigned function `index`, as
/// init names it (`device DOMAIN.INDEX`).
fn device_handle(domain: u16, index: u8) -> Option<Handle> {
    let mut name: heapless::String<16> = heapless::String::new();
    core::fmt::write(&mut name, format_args!("device {domain}.{index}")).ok()?;
    service_runtime::handle(&name)
}

/// Logs the assigned functions whose handles init gave (issue 14): where
/// each shows on its domain's PCI bus and what it is.
fn log_devices() {
    for (name, h) in service_runtime::handles() {
        let Some((domain, index)) = name
            .strip_prefix("device ")
            .and_then(|r| r.split_once('.'))
            .and_then(|(d, i)| Some((d.parse::<u16>().ok()?, i.parse::<u8>().ok()?)))
        else {
            continue;
        };
        let id = sys::device_config_read(h, 0, 4);
        let class = sys::device_config_read(h, 8, 4);
        match (id, class) {
            (Ok(id), Ok(class)) => defmt::info!(
                "vmm: domain {=u16}'s assigned function {=u8} shows at 00:{=u8:02x}.0 on its PCI bus: {=u16:04x}:{=u16:04x}, class {=u32:06x}",
                domain,
                index,
                index + 1,
                id as u16,
                (id >> 16) as u16,
                class >> 8
            ),
            (e, _) => defmt::warn!(
                "vmm: domain {=u16}'s assigned function {=u8}: configuration space unreadable: {}",
                domain,
                index,
                e.err()
            ),
        }
    }
}

fn main() -> ! {
    let exits = require("exits");
    let input = service_runtime::handle("uart-input");
    let system = System {
        domains: require("domains"),
        altp2m: Peer::new(require("altp2m-guest"), ALTP2M, "altp2m"),
        logdirty: service_runtime::handle("logdirty").map(|h| Peer::new(h, LOGDIRTY, "logdirty")),
        features: sys::vm_features(),
        tsc_khz: (sys::time().1 / 1000).min(u64::from(u32::MAX)) as u32,
    };
    defmt::info!(
        "vmm: version {=u32} serving exits (generation {=u32})",
        service_vmm::exits::VERSION,
        service_runtime::generation()
    );
    log_devices();
    let mut server = Server {
        exits,
        input: input.unwrap_or(NO_HANDLE),
        exit: ExitMessage::default(),
        vmm: Vmm::default(),
        system,
    };
    // The exits and the console's input: a domain's devices start afresh
    // with its vCPU's `Start` exit, so no notification of ended domains
    // waits beside them (each handle in the mask is checked on every exit's
    // answer).
    ipc::serve(&mut server, (1 << exits) | input.map_or(0, |h| 1 << h))
}
