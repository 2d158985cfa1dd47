//! console: the control channel on the second serial port (COM2).
//!
//! It owns the UART's eight I/O ports and its interrupt line (both granted
//! by the manifest), reads frames from the host when the line fires, asks
//! the supervisor (and the altp2m and logdirty services, where it holds
//! their handles) on the host's behalf, and writes the answers back. New
//! ELFs for swaps arrive in chunks into the `swap` frames it shares with the
//! supervisor. Where the runner reads the emulator's debug port (0xE9) and
//! asks for it, the answers go there instead of COM2: the same frames, with
//! no baud rate (docs/control.md).

#![no_std]
#![no_main]

use ipc_schema::altp2m::{ALTP2M, AltReply, AltRequest};
use ipc_schema::control::ToHost;
use ipc_schema::introspect::{INTROSPECT, IntroReply, IntroRequest};
use ipc_schema::ipc::InterfaceId;
use ipc_schema::logdirty::{LOGDIRTY, LdReply, LdRequest};
use ipc_schema::sharing::{SHARING, ShReply, ShRequest};
use ipc_schema::supervisor::{SUPERVISOR, SupervisorReply, SupervisorRequest};
use ipc_schema::syscall::Handle;
use ipc_schema::syscall::layout::MAP_BASE;
use ipc_schema::uart::{UART_INPUT, UartInput, UartReply};
use service_console::session::{Action, Session, Supervisor};
use service_runtime::ipc::{self, Client, Message, Service};
use service_runtime::{require, sys};

service_runtime::entry!(main);

const COM2: u16 = 0x2f8;
const DATA: u16 = 0;
const INT_ENABLE: u16 = 1;
const FIFO_CTRL: u16 = 2;
const LINE_CTRL: u16 = 3;
const MODEM_CTRL: u16 = 4;
const LINE_STATUS: u16 = 5;
/// Where the swap buffer is mapped.
const SWAP_VA: u64 = MAP_BASE;

struct Uart {
    ports: Handle,
}

impl Uart {
    fn out(&self, reg: u16, v: u8) {
        let _ = sys::io_out(self.ports, COM2 + reg, 1, u32::from(v));
    }

    fn inb(&self, reg: u16) -> u8 {
        sys::io_in(self.ports, COM2 + reg, 1).unwrap_or(0) as u8
    }

    /// 115200 8N1, FIFOs on, an interrupt when data arrives.
    fn init(&self) {
        self.out(INT_ENABLE, 0);
        self.out(LINE_CTRL, 0x80);
        self.out(DATA, 1);
        self.out(INT_ENABLE, 0);
        self.out(LINE_CTRL, 0x03);
        self.out(FIFO_CTRL, 0xc7);
        // DTR, RTS, OUT2 (which gates the interrupt on PCs).
        self.out(MODEM_CTRL, 0x0b);
        self.out(INT_ENABLE, 0x01);
    }

    fn send(&self, bytes: &[u8]) {
        for &b in bytes {
            let mut spins = 0u32;
            while self.inb(LINE_STATUS) & 0x20 == 0 && spins < 100_000 {
                spins += 1;
            }
            self.out(DATA, b);
        }
    }
}

/// The supervisor, and the altp2m and logdirty services where the
/// manifest grants them.
struct Ask {
    supervisor: Client,
    altp2m: Option<Client>,
    logdirty: Option<Client>,
    introspect: Option<Client>,
    sharing: Option<Client>,
    /// The vmm's input endpoint (domains' COM1 receivers).
    uart_input: Option<Client>,
}

impl Supervisor for Ask {
    fn ask(&mut self, request: &SupervisorRequest) -> Option<SupervisorReply> {
        match self.supervisor.call::<_, SupervisorReply>(request) {
            Ok(r) => Some(r),
            Err(e) => {
                defmt::warn!("console: the supervisor did not answer: {}", e);
                None
            }
        }
    }

    fn altp2m(&mut self, request: &AltRequest) -> Option<AltReply> {
        match self.altp2m.as_mut()?.call::<_, AltReply>(request) {
            Ok(r) => Some(r),
            Err(e) => {
                defmt::warn!("console: the altp2m service did not answer: {}", e);
                None
            }
        }
    }

    fn logdirty(&mut self, request: &LdRequest) -> Option<LdReply> {
        let Some(logdirty) = self.logdirty.as_mut() else {
            defmt::warn!("console: a logdirty request, but no `logdirty` handle");
            return None;
        };
        match logdirty.call::<_, LdReply>(request) {
            Ok(r) => Some(r),
            Err(e) => {
                defmt::warn!("console: the logdirty service did not answer: {}", e);
                None
            }
        }
    }

    fn uart_input(&mut self, request: &UartInput) -> Option<UartReply> {
        let Some(vmm) = self.uart_input.as_mut() else {
            defmt::warn!("console: input for a domain's COM1, but no `uart-input` handle");
            return None;
        };
        match vmm.call::<_, UartReply>(request) {
            Ok(r) => Some(r),
            Err(e) => {
                defmt::warn!("console: the vmm did not answer an input request: {}", e);
                None
            }
        }
    }

    fn sharing(&mut self, request: &ShRequest) -> Option<ShReply> {
        let Some(sharing) = self.sharing.as_mut() else {
            defmt::warn!("console: a sharing request, but no `sharing` handle");
            return None;
        };
        match sharing.call::<_, ShReply>(request) {
            Ok(r) => Some(r),
            Err(e) => {
                defmt::warn!("console: the sharing service did not answer: {}", e);
                None
            }
        }
    }

    fn introspect(&mut self, request: &IntroRequest) -> Option<IntroReply> {
        let Some(introspect) = self.introspect.as_mut() else {
            defmt::warn!("console: an introspect request, but no `introspect` handle");
            return None;
        };
        match introspect.call::<_, IntroReply>(request) {
            Ok(r) => Some(r),
            Err(e) => {
                defmt::warn!("console: the introspect service did not answer: {}", e);
                None
            }
        }
    }
}

/// The I/O port of Bochs's `port_e9_hack` and QEMU's `isa-debugcon`:
/// written bytes reach the host at once (no baud rate); it reads back as
/// 0xE9 where such a device is there.
const DEBUG_PORT: u16 = 0xe9;

/// Where the console's frames go: COM2, or the debug port once the runner
/// asked for it ([`Action::UseDebugPort`]) and the port answers.
struct Out {
    uart: Uart,
    /// The `debugport` handle, if the manifest grants one.
    debug: Option<Handle>,
    on_debug: bool,
}

impl Out {
    fn send(&self, bytes: &[u8]) {
        match self.debug {
            Some(h) if self.on_debug => {
                let _ = sys::io_out_bytes(h, DEBUG_PORT, bytes);
            }
            _ => self.uart.send(bytes),
        }
    }

    /// Sends one message to the host.
    fn frame(&self, m: &ToHost) {
        let mut buf = [0u8; 2 * ipc_schema::control::MAX_FRAME];
        match ipc_schema::frame::encode(m, &mut buf) {
            Ok(frame) => self.send(frame),
            Err(_) => defmt::error!("console: a message for the host does not fit a frame"),
        }
    }

    fn use_debug_port(&mut self) {
        if self.on_debug {
            return;
        }
        let Some(h) = self.debug else {
            defmt::warn!(
                "console: asked to answer on the debug port, but holds no `debugport` handle"
            );
            return;
        };
        match sys::io_in(h, DEBUG_PORT, 1) {
            Ok(v) if v as u8 == DEBUG_PORT as u8 => {
                // A zero first: the host's reader starts at a frame boundary.
                let _ = sys::io_out(h, DEBUG_PORT, 1, 0);
                self.on_debug = true;
                defmt::info!("console: frames go to the debug port 0xe9 from now on");
            }
            v => defmt::warn!(
                "console: the debug port 0xe9 reads {=?}, not 0xe9: frames stay on COM2",
                v.ok()
            ),
        }
    }
}

struct Console {
    out: Out,
    irq: Handle,
    /// Signalled by the supervisor when it records an event.
    supervisor_events: Option<Handle>,
    /// Signalled by the altp2m service when a violation event waits.
    altp2m_events: Option<Handle>,
    session: Session,
    supervisor: Ask,
    swap: &'static mut [u8],
}

impl Console {
    fn drain(&mut self) {
        let mut budget = 4096;
        while self.out.uart.inb(LINE_STATUS) & 1 != 0 && budget > 0 {
            budget -= 1;
            let b = self.out.uart.inb(DATA);
            let out = &self.out;
            let action =
                self.session
                    .byte(b, &mut self.supervisor, self.swap, &mut |m: &ToHost| {
                        out.frame(m)
                    });
            if action == Action::UseDebugPort {
                self.out.use_debug_port();
            }
        }
    }
}

impl Service for Console {
    /// Whether the host had said hello.
    type State = bool;

    fn interface(&self, _: Handle) -> Option<InterfaceId> {
        None
    }

    fn handle(&mut self, _: Message<'_>, reply: &mut [u8]) -> usize {
        ipc::encode_reply::<()>(&Err(ipc_schema::ipc::IpcError::Malformed), reply)
    }

    fn notified(&mut self, slot: Handle, _bits: u64) {
        if slot == self.irq {
            self.drain();
        } else if Some(slot) == self.supervisor_events {
            let out = &self.out;
            self.session
                .events(&mut self.supervisor, &mut |m: &ToHost| out.frame(m));
        } else if Some(slot) == self.altp2m_events {
            let out = &self.out;
            self.session
                .violations(&mut self.supervisor, &mut |m: &ToHost| out.frame(m));
        }
    }

    fn snapshot(&self) -> bool {
        self.session.said_hello()
    }

    fn restore(&mut self, hello: bool) {
        self.session.set_hello(hello);
    }
}

fn main() -> ! {
    let uart = Uart {
        ports: require("com2"),
    };
    let irq = require("events");
    let line = require("line");
    let swap_frames = require("swap");
    let swap: &'static mut [u8] = match sys::frames_info(swap_frames) {
        Ok((count, _)) if sys::frames_map(swap_frames, 0, count, SWAP_VA, true).is_ok() => {
            // Safety: the kernel just mapped `count` writable pages at
            // SWAP_VA for this service alone; they stay mapped for its life.
            unsafe { core::slice::from_raw_parts_mut(SWAP_VA as *mut u8, (count * 4096) as usize) }
        }
        _ => {
            defmt::error!("console: the swap buffer cannot be mapped; swaps will be refused");
            &mut []
        }
    };
    if let Err(e) = sys::irq_bind(line, irq, 1) {
        defmt::error!("console: cannot bind the COM2 interrupt: {}", e);
    }
    uart.init();
    // A lone zero ends whatever the firmware left on the line, so that the
    // host reads our first frame cleanly.
    uart.send(&[0]);
    defmt::info!(
        "console: control channel on COM2 ({=usize} KiB swap buffer)",
        swap.len() / 1024
    );
    let supervisor_events = service_runtime::handle("supervisor-events");
    let altp2m_events = service_runtime::handle("altp2m-events");
    let mut console = Console {
        out: Out {
            uart,
            debug: service_runtime::handle("debugport"),
            on_debug: false,
        },
        irq,
        supervisor_events,
        altp2m_events,
        session: Session::new(),
        supervisor: Ask {
            supervisor: Client::new(require("supervisor"), SUPERVISOR),
            altp2m: service_runtime::handle("altp2m").map(|h| Client::new(h, ALTP2M)),
            logdirty: service_runtime::handle("logdirty").map(|h| Client::new(h, LOGDIRTY)),
            introspect: service_runtime::handle("introspect").map(|h| Client::new(h, INTROSPECT)),
            sharing: service_runtime::handle("sharing").map(|h| Client::new(h, SHARING)),
            uart_input: service_runtime::handle("uart-input").map(|h| Client::new(h, UART_INPUT)),
        },
        swap,
    };
    // Bytes that came before the interrupt was bound.
    console.drain();
    let mask =
        (1 << irq) | supervisor_events.map_or(0, |h| 1 << h) | altp2m_events.map_or(0, |h| 1 << h);
    ipc::serve(&mut console, mask)
}
