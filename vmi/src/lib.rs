//! A [vmi-rs](https://github.com/vmi-rs/vmi) driver for Parallax: the
//! driver traits of `vmi-core` 0.13 over the control channel of a running
//! system (the `parallax-client` crate), for one domain.
//!
//! ```no_run
//! use vmi_core::{Pa, VcpuId, VmiCore};
//! use vmi_driver_parallax::ParallaxDriver;
//!
//! # fn main() -> Result<(), vmi_core::VmiError> {
//! let driver = ParallaxDriver::connect("target/hv/work/ctl.sock".as_ref(), "agent")?;
//! let vmi = VmiCore::new(driver)?;
//! let regs = vmi.registers(VcpuId(0))?;
//! let word = vmi.read_u64((vmi_core::Va(regs.rip), Pa(regs.cr3.0)))?;
//! println!("rip {:#x}: {word:#018x}", regs.rip);
//! # Ok(())
//! # }
//! ```
//!
//! What maps to what (docs/introspection.md, "The vmi-rs driver"):
//!
//! | trait | Parallax |
//! |---|---|
//! | `VmiRead`, `VmiWrite` | `mem_read`, `mem_write` of guest-physical pages (192 bytes a request: a page is 22 requests, about 1.8 s on Bochs) |
//! | `VmiQueryRegisters`, `VmiSetRegisters` | `regs`, `set_regs` of vCPU 0; fields Parallax does not have read 0, and a set that changes one is refused naming it |
//! | `VmiQueryProtection`, `VmiSetProtection` | altp2m `GetAccess`, `SetAccess` as an external agent |
//! | `VmiViewControl` | `ViewCreate`, `ViewDestroy`, `ViewSwitchAll`, `ChangeGfn` |
//! | `VmiEventControl` | memory-access violations (`Listen`, the console's violation events, `Answer`); no other monitor exists |
//! | `VmiVmControl` | `pause`/`resume` (`domain_control`), `allocate_gfn` (a hidden shadow page, `shadow_frames`), `reset_state` |
//!
//! Refused, each with a [`VmiError::Driver`] naming why ([`Error::Unsupported`]):
//! `allocate_gfn_at`, `free_gfn`, `inject_interrupt`, every
//! `monitor_enable`/`monitor_disable` option (CR, MSR, interrupt,
//! single-step, VMCALL, CPUID, I/O: none reaches an external agent), and the
//! event answers Parallax has no counterpart for (single-step, deny,
//! reinjection).

pub mod convert;

/// The vmi-rs crates this driver implements, so that a program needs no
/// dependency of its own on them (and gets the same versions).
pub use {vmi_arch_amd64, vmi_core};

use parallax_client::altp2m::{
    Action, AltReply, AltRequest, HcError, Reply, Request, VmEvent, describe_alt_error,
    describe_hc_error,
};
use parallax_client::introspect::{Address, MAX_SET};
use parallax_client::{Client, ClientError, ControlEvent, DomainOp, Transport, Watch};
use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vmi_arch_amd64::{Amd64, EventMonitor, Interrupt, Registers};
use vmi_core::{
    Gfn, MemoryAccess, MemoryAccessOptions, VcpuId, View, VmiDriver, VmiError, VmiEvent,
    VmiEventControl, VmiEventFlags, VmiEventResponse, VmiInfo, VmiMappedPage, VmiQueryProtection,
    VmiQueryRegisters, VmiRead, VmiSetProtection, VmiSetRegisters, VmiViewControl, VmiVmControl,
    VmiWrite,
};

/// A page.
pub const PAGE: usize = 4096;

/// How long each request waits for its answer unless told otherwise: the
/// control channel is a serial line, and an emulator may be slow to look.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the driver refuses or fails at; carried in [`VmiError::Driver`].
#[derive(Debug)]
pub enum Error {
    /// The control channel or the service refused or failed.
    Client(ClientError),
    /// A request answered with a refusal (`what` was asked).
    Refused { what: String, why: String },
    /// Parallax has no such operation.
    Unsupported { what: String, why: &'static str },
    /// A register set changes fields Parallax cannot set.
    Unsettable { fields: String },
    /// A write past the end of a page.
    PageBounds { offset: u64, len: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Client(e) => write!(f, "{e}"),
            Error::Refused { what, why } => write!(f, "{what} refused: {why}"),
            Error::Unsupported { what, why } => {
                write!(f, "Parallax does not support {what}: {why}")
            }
            Error::Unsettable { fields } => write!(
                f,
                "Parallax cannot set {fields} (read only or not kept: it sets RAX-R15, RIP, RFLAGS, CR0, CR3, CR4, EFER, the segment, GDTR and IDTR bases); nothing was set"
            ),
            Error::PageBounds { offset, len } => write!(
                f,
                "a write of {len} bytes at offset {offset:#x} reaches past the page"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for VmiError {
    fn from(e: Error) -> Self {
        VmiError::driver(e)
    }
}

fn client_error(e: ClientError) -> VmiError {
    VmiError::driver(Error::Client(e))
}

fn unsupported(what: impl Into<String>, why: &'static str) -> VmiError {
    Error::Unsupported {
        what: what.into(),
        why,
    }
    .into()
}

#[derive(Default)]
struct State {
    /// Attached as the domain's violation listener.
    listening: bool,
    /// Paused by [`VmiVmControl::pause`] (an answer that sets registers
    /// then leaves the pause alone).
    paused: bool,
    /// Violations fetched and not yet handed to a handler.
    pending: VecDeque<VmEvent>,
    /// Time spent on events outside the handlers.
    overhead: Duration,
    /// Views this driver created (destroyed by `reset_state`).
    views: BTreeSet<u16>,
    /// (view, gfn) whose page-walk accesses are answered here
    /// (`MemoryAccessOptions::IGNORE_PAGE_WALK_UPDATES`).
    ignore_walks: BTreeSet<(u16, u64)>,
}

/// The driver: one domain of a running Parallax, through a control-channel
/// client. Methods take `&self` (as vmi-rs wants); the client sits in a
/// `RefCell`, never borrowed across a call into the caller's handler.
pub struct ParallaxDriver<S: Transport = UnixStream> {
    client: RefCell<Client<S>>,
    domain: u16,
    memory_mib: u32,
    state: RefCell<State>,
}

impl ParallaxDriver<UnixStream> {
    /// Connects to a control socket (the one `cargo hv run` prints) and
    /// attaches to `domain` (a name the console lists, or an id), each
    /// request waiting at most [`DEFAULT_TIMEOUT`].
    pub fn connect(socket: &Path, domain: &str) -> Result<Self, VmiError> {
        let client = Client::connect(socket)
            .map_err(client_error)?
            .with_timeout(DEFAULT_TIMEOUT);
        Self::new(client, domain)
    }
}

impl<S: Transport> ParallaxDriver<S> {
    /// Attaches to `domain` (a name or an id) through `client`.
    pub fn new(mut client: Client<S>, domain: &str) -> Result<Self, VmiError> {
        let id = client.domain_id(domain).map_err(client_error)?;
        let info = client
            .domains()
            .map_err(client_error)?
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| {
                VmiError::driver(Error::Refused {
                    what: format!("attaching to domain {domain}"),
                    why: format!("the console lists no domain {id}"),
                })
            })?;
        Ok(Self {
            client: RefCell::new(client),
            domain: id,
            memory_mib: info.memory_mib,
            state: RefCell::new(State::default()),
        })
    }

    /// The domain's id.
    pub fn domain(&self) -> u16 {
        self.domain
    }

    /// The client, for requests this driver does not make (borrowed: do not
    /// keep it across driver calls).
    pub fn client(&self) -> std::cell::RefMut<'_, Client<S>> {
        self.client.borrow_mut()
    }

    /// `buf.len()` bytes of guest-physical memory at `pa`, in as few
    /// 192-byte requests as they take (not a whole page: [`VmiRead`] reads
    /// pages, 22 requests each).
    pub fn read_physical(&self, pa: u64, buf: &mut [u8]) -> Result<(), VmiError> {
        let bytes = self
            .client
            .borrow_mut()
            .mem_read(self.domain, Address::Physical(pa), buf.len())
            .map_err(client_error)?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// Attaches this client as the domain's violation listener (done by
    /// itself before the first restriction, view with a restricted default,
    /// or wait for events): from then on a violation waits for this
    /// driver's answer instead of meeting the domain's no-listener policy.
    ///
    /// The listen is left to the control proxy too (`AtDetach`, without a
    /// view): should this process end without detaching (killed, crashed),
    /// the proxy ends the listen for it, as dropping the driver does, so
    /// that no vCPU waits for ever for an answer from a driver that is
    /// gone; its events are retried and meet the domain's no-listener
    /// policy (`pause`: wait for the next listener, which is told of them;
    /// `crash`). Refused while another client of the proxy watches the
    /// domain (`ctl altp2m watch`, another driver).
    pub fn listen(&self) -> Result<(), VmiError> {
        if self.state.borrow().listening {
            return Ok(());
        }
        self.client
            .borrow_mut()
            .listen_left_to_proxy(self.domain)
            .map_err(client_error)?;
        self.state.borrow_mut().listening = true;
        Ok(())
    }

    /// A view request as an external agent.
    fn view(&self, request: Request) -> Result<Reply, VmiError> {
        let what = format!("{request:?} on domain {}", self.domain);
        let reply = self
            .client
            .borrow_mut()
            .altp2m(AltRequest::External {
                domain: self.domain,
                request,
            })
            .map_err(client_error)?;
        match reply {
            AltReply::Reply(Reply::Error(HcError::NoSuchView { .. })) => {
                Err(VmiError::ViewNotFound)
            }
            AltReply::Reply(Reply::Error(e)) => Err(Error::Refused {
                what,
                why: describe_hc_error(&e),
            }
            .into()),
            AltReply::Reply(r) => Ok(r),
            AltReply::Refused(e) => Err(Error::Refused {
                what,
                why: describe_alt_error(&e, self.domain),
            }
            .into()),
            other => Err(Error::Refused {
                what,
                why: format!(
                    "answered {}",
                    parallax_client::altp2m::describe_reply(&other)
                ),
            }
            .into()),
        }
    }

    fn answer(&self, event: u32, action: Action) -> Result<(), VmiError> {
        self.client
            .borrow_mut()
            .altp2m_done(AltRequest::Answer { event, action })
            .map_err(client_error)
    }

    /// Moves violations of this domain the client has queued to `pending`.
    fn drain_queued(&self) -> Result<(), VmiError> {
        loop {
            let next = self
                .client
                .borrow_mut()
                .next_event(Duration::ZERO)
                .map_err(client_error)?;
            match next {
                Some(ControlEvent::Violation(e)) if e.domain == self.domain => {
                    self.state.borrow_mut().pending.push_back(e)
                }
                Some(_) => {}
                None => return Ok(()),
            }
        }
    }

    /// The next violation of this domain within `timeout`.
    fn next_violation(&self, timeout: Duration) -> Result<Option<VmEvent>, VmiError> {
        if let Some(e) = self.state.borrow_mut().pending.pop_front() {
            return Ok(Some(e));
        }
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let next = self
                .client
                .borrow_mut()
                .next_violation(left)
                .map_err(client_error)?;
            match next {
                Some(e) if e.domain == self.domain => return Ok(Some(e)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }

    /// Sets registers by index, at most [`MAX_SET`] a request (each request
    /// is checked whole against VM entry's rules before any is set).
    fn set_indexed(&self, vcpu: u16, changes: &[(usize, u64)]) -> Result<(), VmiError> {
        for chunk in changes.chunks(MAX_SET) {
            self.client
                .borrow_mut()
                .set_regs(self.domain, vcpu, chunk)
                .map_err(client_error)?;
        }
        Ok(())
    }

    fn control(&self, op: DomainOp) -> Result<(), VmiError> {
        self.client
            .borrow_mut()
            .domain_control(self.domain, op)
            .map_err(client_error)
    }

    /// Answers `event` as `response` says: registers first (the domain
    /// paused around the set unless the caller paused it), then the action.
    fn respond(
        &self,
        event: &VmEvent,
        registers: &Registers,
        response: &VmiEventResponse<Amd64>,
    ) -> Result<(), VmiError> {
        let action = match convert::action(event.view, response.action, response.view) {
            Ok(a) => a,
            Err(e) => {
                // Retried: the access faults again and comes back as a new
                // event, so the vCPU is never left waiting for ever.
                self.answer(event.id, Action::Retry)?;
                return Err(e.into());
            }
        };
        if let Some(gp) = &response.registers {
            let changes = convert::gp_changes(registers, gp);
            if !changes.is_empty() {
                let pause = !self.state.borrow().paused;
                if pause {
                    self.control(DomainOp::Pause)?;
                }
                let set = self.set_indexed(event.vcpu, &changes);
                let answered = set.and_then(|()| self.answer(event.id, action));
                if pause {
                    self.control(DomainOp::Unpause)?;
                }
                return answered;
            }
        }
        self.answer(event.id, action)
    }
}

impl<S: Transport> Drop for ParallaxDriver<S> {
    /// Detaches the listener (the domain's no-listener policy applies
    /// again); views and shadow pages stay (`reset_state` undoes views).
    fn drop(&mut self) {
        if self.state.get_mut().listening {
            let _ = self.client.get_mut().unlisten_left_to_proxy(self.domain);
        }
    }
}

impl<S: Transport + 'static> VmiDriver for ParallaxDriver<S> {
    type Architecture = Amd64;

    /// Pages of 4 KiB, the domain's RAM from gfn 0 (shadow pages from
    /// [`VmiVmControl::allocate_gfn`] lie past `max_gfn`), one vCPU.
    fn info(&self) -> Result<VmiInfo, VmiError> {
        Ok(VmiInfo {
            page_size: PAGE as u64,
            page_shift: 12,
            max_gfn: Gfn(u64::from(self.memory_mib) * 256 - 1),
            vcpus: 1,
        })
    }
}

impl<S: Transport + 'static> VmiRead for ParallaxDriver<S> {
    fn read_page(&self, gfn: Gfn) -> Result<VmiMappedPage, VmiError> {
        let pa = gfn
            .0
            .checked_mul(PAGE as u64)
            .ok_or(VmiError::OutOfBounds)?;
        let bytes = self
            .client
            .borrow_mut()
            .mem_read(self.domain, Address::Physical(pa), PAGE)
            .map_err(client_error)?;
        Ok(VmiMappedPage::new(bytes))
    }
}

impl<S: Transport + 'static> VmiWrite for ParallaxDriver<S> {
    /// Writes `content` at `offset` in the page, then reads the page back
    /// for the answer (a page read: see [`VmiRead`]).
    fn write_page(&self, gfn: Gfn, offset: u64, content: &[u8]) -> Result<VmiMappedPage, VmiError> {
        if offset as usize + content.len() > PAGE {
            return Err(Error::PageBounds {
                offset,
                len: content.len(),
            }
            .into());
        }
        let pa = gfn
            .0
            .checked_mul(PAGE as u64)
            .ok_or(VmiError::OutOfBounds)?
            + offset;
        self.client
            .borrow_mut()
            .mem_write(self.domain, Address::Physical(pa), content)
            .map_err(client_error)?;
        self.read_page(gfn)
    }
}

impl<S: Transport + 'static> VmiQueryRegisters for ParallaxDriver<S> {
    fn registers(&self, vcpu: VcpuId) -> Result<Registers, VmiError> {
        let words = self
            .client
            .borrow_mut()
            .regs(self.domain, vcpu.0)
            .map_err(client_error)?;
        Ok(convert::registers_from(&words))
    }
}

impl<S: Transport + 'static> VmiSetRegisters for ParallaxDriver<S> {
    /// Sets what differs from the vCPU's registers now; the domain must be
    /// paused (or nothing may differ). A change to a field Parallax cannot
    /// set is refused, naming it, before anything is set.
    fn set_registers(&self, vcpu: VcpuId, registers: Registers) -> Result<(), VmiError> {
        let now = self.registers(vcpu)?;
        let changes = convert::register_changes(&now, &registers)?;
        self.set_indexed(vcpu.0, &changes)
    }
}

impl<S: Transport + 'static> VmiQueryProtection for ParallaxDriver<S> {
    fn memory_access(&self, gfn: Gfn, view: View) -> Result<MemoryAccess, VmiError> {
        match self.view(Request::GetAccess {
            view: view.0,
            gfn: gfn.0,
        })? {
            Reply::Access(a) => Ok(convert::memory_access(a)),
            other => Err(Error::Refused {
                what: "GetAccess".into(),
                why: format!("answered {other:?}"),
            }
            .into()),
        }
    }

    fn memory_access_with_options(
        &self,
        gfn: Gfn,
        view: View,
    ) -> Result<(MemoryAccess, MemoryAccessOptions), VmiError> {
        let access = self.memory_access(gfn, view)?;
        let mut options = MemoryAccessOptions::empty();
        if self.state.borrow().ignore_walks.contains(&(view.0, gfn.0)) {
            options |= MemoryAccessOptions::IGNORE_PAGE_WALK_UPDATES;
        }
        Ok((access, options))
    }
}

impl<S: Transport + 'static> VmiSetProtection for ParallaxDriver<S> {
    fn set_memory_access(
        &self,
        gfn: Gfn,
        view: View,
        access: MemoryAccess,
    ) -> Result<(), VmiError> {
        self.set_memory_access_with_options(gfn, view, access, MemoryAccessOptions::empty())
    }

    /// `IGNORE_PAGE_WALK_UPDATES`: violations on the page that are the
    /// CPU's own page-table accesses (`VmEvent::page_walk`) are let through
    /// once by the driver and never reach the handler.
    fn set_memory_access_with_options(
        &self,
        gfn: Gfn,
        view: View,
        access: MemoryAccess,
        options: MemoryAccessOptions,
    ) -> Result<(), VmiError> {
        if access != MemoryAccess::RWX {
            self.listen()?;
        }
        self.view(Request::SetAccess {
            view: view.0,
            gfn: gfn.0,
            access: convert::access(access),
        })?;
        let mut state = self.state.borrow_mut();
        if options.contains(MemoryAccessOptions::IGNORE_PAGE_WALK_UPDATES) {
            state.ignore_walks.insert((view.0, gfn.0));
        } else {
            state.ignore_walks.remove(&(view.0, gfn.0));
        }
        Ok(())
    }
}

impl<S: Transport + 'static> VmiViewControl for ParallaxDriver<S> {
    /// View 0, the host p2m.
    fn default_view(&self) -> View {
        View(0)
    }

    fn create_view(&self, default_access: MemoryAccess) -> Result<View, VmiError> {
        if default_access != MemoryAccess::RWX {
            self.listen()?;
        }
        let default_access =
            (default_access != MemoryAccess::RWX).then(|| convert::access(default_access));
        match self.view(Request::ViewCreate { default_access })? {
            Reply::View(v) => {
                self.state.borrow_mut().views.insert(v);
                Ok(View(v))
            }
            other => Err(Error::Refused {
                what: "ViewCreate".into(),
                why: format!("answered {other:?}"),
            }
            .into()),
        }
    }

    fn destroy_view(&self, view: View) -> Result<(), VmiError> {
        self.view(Request::ViewDestroy { view: view.0 })?;
        let mut state = self.state.borrow_mut();
        state.views.remove(&view.0);
        state.ignore_walks.retain(|&(v, _)| v != view.0);
        Ok(())
    }

    /// Every vCPU (the domain has one) into `view`.
    fn switch_to_view(&self, view: View) -> Result<(), VmiError> {
        self.view(Request::ViewSwitchAll { view: view.0 }).map(drop)
    }

    fn change_view_gfn(&self, view: View, old_gfn: Gfn, new_gfn: Gfn) -> Result<(), VmiError> {
        self.view(Request::ChangeGfn {
            view: view.0,
            gfn: old_gfn.0,
            to: Some(new_gfn.0),
        })
        .map(drop)
    }

    fn reset_view_gfn(&self, view: View, gfn: Gfn) -> Result<(), VmiError> {
        self.view(Request::ChangeGfn {
            view: view.0,
            gfn: gfn.0,
            to: None,
        })
        .map(drop)
    }
}

const ONLY_MEMORY: &str = "Parallax reports memory-access violations only (altp2m, always on for a listener); no CR, MSR, interrupt, single-step, VMCALL, CPUID or I/O events reach an external agent";

impl<S: Transport + 'static> VmiEventControl for ParallaxDriver<S> {
    fn monitor_enable(&self, option: EventMonitor) -> Result<(), VmiError> {
        Err(unsupported(format!("monitoring {option:?}"), ONLY_MEMORY))
    }

    fn monitor_disable(&self, option: EventMonitor) -> Result<(), VmiError> {
        Err(unsupported(format!("monitoring {option:?}"), ONLY_MEMORY))
    }

    /// Violations of the domain received and not yet handled (what has
    /// arrived on the channel so far; nothing is asked).
    fn events_pending(&self) -> usize {
        // An error reading the channel shows at the next wait.
        let _ = self.drain_queued();
        self.state.borrow().pending.len()
    }

    fn event_processing_overhead(&self) -> Duration {
        self.state.borrow().overhead
    }

    /// The next violation (at most `timeout`; none: `VmiError::Timeout`),
    /// with the vCPU's registers as it waits, handed to `handler` as a
    /// memory-access event; its response answered ([`convert::action`]).
    fn wait_for_event(
        &self,
        timeout: Duration,
        mut handler: impl FnMut(&VmiEvent<Amd64>) -> VmiEventResponse<Amd64>,
    ) -> Result<(), VmiError> {
        self.listen()?;
        let Some(event) = self.next_violation(timeout)? else {
            return Err(VmiError::Timeout);
        };
        let started = Instant::now();
        let skip_walk = event.page_walk()
            && self
                .state
                .borrow()
                .ignore_walks
                .contains(&(event.view, event.gpa >> 12));
        if skip_walk {
            let answered = self.answer(event.id, Action::AllowOnce);
            self.state.borrow_mut().overhead += started.elapsed();
            return answered;
        }
        let mut registers = self.registers(VcpuId(event.vcpu))?;
        registers.rip = event.rip;
        let mut flags = VmiEventFlags::empty();
        if event.paused {
            flags |= VmiEventFlags::VCPU_PAUSED;
        }
        let vmi_event = VmiEvent::new(
            VcpuId(event.vcpu),
            flags,
            Some(View(event.view)),
            registers,
            convert::event_reason(&event),
        );
        let before = started.elapsed();
        let response = handler(&vmi_event);
        let after = Instant::now();
        let result = self.respond(&event, &registers, &response);
        self.state.borrow_mut().overhead += before + after.elapsed();
        result
    }
}

impl<S: Transport + 'static> VmiVmControl for ParallaxDriver<S> {
    fn pause(&self) -> Result<(), VmiError> {
        self.control(DomainOp::Pause)?;
        self.state.borrow_mut().paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmiError> {
        self.control(DomainOp::Unpause)?;
        self.state.borrow_mut().paused = false;
        Ok(())
    }

    /// A hidden shadow page: zeroed, mapped past the domain's RAM, outside
    /// the memory map its guest was given (docs/introspection.md); at most
    /// 256 a domain.
    fn allocate_gfn(&self) -> Result<Gfn, VmiError> {
        self.client
            .borrow_mut()
            .shadow_frames(self.domain, 1)
            .map(Gfn)
            .map_err(client_error)
    }

    fn allocate_gfn_at(&self, gfn: Gfn) -> Result<(), VmiError> {
        Err(unsupported(
            format!("allocating gfn {:#x}", gfn.0),
            "the supervisor places shadow pages itself, right past the domain's RAM (allocate_gfn)",
        ))
    }

    fn free_gfn(&self, gfn: Gfn) -> Result<(), VmiError> {
        Err(unsupported(
            format!("freeing gfn {:#x}", gfn.0),
            "shadow pages stay with the domain until it ends (at most 256); nothing was freed",
        ))
    }

    fn inject_interrupt(&self, vcpu: VcpuId, interrupt: Interrupt) -> Result<(), VmiError> {
        Err(unsupported(
            format!("injecting {:?} into vCPU {vcpu}", interrupt.vector),
            "an external agent cannot inject interrupts or exceptions into a guest",
        ))
    }

    /// Puts the domain back in view 0, destroys the views this driver made
    /// and detaches the listener (waiting events are retried first). The
    /// domain may end while this runs (its guest may finish as soon as it
    /// is back in view 0): its views were freed and its listener forgotten
    /// with it, which is the reset asked for, so that is no failure.
    fn reset_state(&self) -> Result<(), VmiError> {
        match self.reset_running() {
            Err(_) if self.ended() => {
                let mut state = self.state.borrow_mut();
                if state.listening {
                    let held = Watch {
                        domain: self.domain,
                        view: None,
                    };
                    self.client.borrow_mut().take_back(held);
                }
                state.listening = false;
                state.pending.clear();
                state.views.clear();
                state.ignore_walks.clear();
                Ok(())
            }
            result => result,
        }
    }
}

impl<S: Transport + 'static> ParallaxDriver<S> {
    /// [`VmiVmControl::reset_state`]'s steps, on a domain that runs.
    fn reset_running(&self) -> Result<(), VmiError> {
        self.view(Request::ViewSwitchAll { view: 0 })?;
        if self.state.borrow().listening {
            self.drain_queued()?;
            let pending: Vec<VmEvent> = self.state.borrow_mut().pending.drain(..).collect();
            for e in pending {
                self.answer(e.id, Action::Retry)?;
            }
            self.client
                .borrow_mut()
                .unlisten_left_to_proxy(self.domain)
                .map_err(client_error)?;
            self.state.borrow_mut().listening = false;
        }
        let views: Vec<u16> = self.state.borrow().views.iter().copied().collect();
        for v in views {
            self.destroy_view(View(v))?;
        }
        self.state.borrow_mut().ignore_walks.clear();
        Ok(())
    }

    /// Whether the domain has ended (exited, crashed, destroyed: no longer
    /// listed, or listed in such a state); false where that cannot be told.
    fn ended(&self) -> bool {
        self.client.borrow_mut().domains().is_ok_and(|all| {
            all.iter().find(|d| d.id == self.domain).is_none_or(|d| {
                !parallax_client::ipc_schema::syscall::DomainState::live(u64::from(d.state))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallax_client::altp2m::{AltError, AltReply, HcError, Reply};
    use parallax_client::frames::{self, FrameReader};
    use parallax_client::ipc_schema::supervisor::name;
    use parallax_client::{
        ControlError, ControlReply, ControlRequest, DomainInfo, FromHost, ToHost,
    };
    use std::io::{Read, Write};
    use vmi_core::VmiCore;

    /// A console with one domain, 1 ("intro", running), whose altp2m makes
    /// views; it ends the domain as soon as it is put back in view 0 if
    /// `ends` (as the vmi boot test's guest does, at once), and refuses to
    /// destroy views (in use) if not. It answers `AtDetach` as a control
    /// proxy would, with `at_detach`. Returns the requests it answered.
    fn console(
        mut stream: UnixStream,
        ends: bool,
        at_detach: ControlReply,
    ) -> std::thread::JoinHandle<Vec<String>> {
        std::thread::spawn(move || {
            let (mut ended, mut seen) = (false, Vec::new());
            let mut reader = FrameReader::<FromHost>::new();
            let (mut buf, mut got) = ([0u8; 4096], Vec::new());
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                reader.push(&buf[..n], &mut got);
                for q in got.drain(..) {
                    let reply = match &q.request {
                        ControlRequest::Hello { .. } => ControlReply::Welcome { version: 1 },
                        ControlRequest::Domain { index: 0 } => {
                            ControlReply::Domain(Some(DomainInfo {
                                id: 1,
                                name: name("intro"),
                                state: if ended { 3 } else { 1 },
                                exit_status: 0,
                                memory_mib: 32,
                                protected: false,
                                foreign_pages: 0,
                            }))
                        }
                        ControlRequest::Domain { .. } => ControlReply::Domain(None),
                        ControlRequest::AtDetach { .. } => at_detach.clone(),
                        ControlRequest::Altp2m(_) if ended => {
                            ControlReply::Altp2m(AltReply::Refused(AltError::DomainEnded))
                        }
                        ControlRequest::Altp2m(AltRequest::External { request, .. }) => {
                            ControlReply::Altp2m(AltReply::Reply(match request {
                                Request::ViewCreate { .. } => Reply::View(1),
                                Request::ViewSwitchAll { view: 0 } => {
                                    ended = ends;
                                    Reply::Done
                                }
                                Request::ViewDestroy { view } => {
                                    Reply::Error(HcError::ViewInUse { view: *view })
                                }
                                _ => Reply::Done,
                            }))
                        }
                        ControlRequest::Altp2m(_) => ControlReply::Altp2m(AltReply::Done),
                        other => panic!("not expected here: {other:?}"),
                    };
                    seen.push(format!("{:?}", q.request));
                    let frame = frames::encode(&ToHost::Reply { seq: q.seq, reply }).unwrap();
                    if stream.write_all(&frame).is_err() {
                        return seen;
                    }
                }
            }
            seen
        })
    }

    fn attached(
        ends: bool,
    ) -> (
        VmiCore<ParallaxDriver<UnixStream>>,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let (driver, served) = driver(ends, ControlReply::Done);
        driver.listen().unwrap();
        let vmi = VmiCore::new(driver).unwrap();
        vmi.create_view(MemoryAccess::RWX).unwrap();
        (vmi, served)
    }

    fn driver(
        ends: bool,
        at_detach: ControlReply,
    ) -> (
        ParallaxDriver<UnixStream>,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let served = console(theirs, ends, at_detach);
        let client = Client::new(ours).with_timeout(Duration::from_secs(10));
        (ParallaxDriver::new(client, "intro").unwrap(), served)
    }

    /// The listen is left to the control proxy before it begins, and taken
    /// back once it ended, by a reset and by dropping the driver alike: a
    /// driver killed in between leaves the proxy to end it (the proxy's
    /// side: image-builder's router tests, and `tests/vmi.rs`).
    #[test]
    fn the_listen_is_left_to_the_proxy_while_it_lasts() {
        for reset in [false, true] {
            let (vmi, served) = attached(false);
            if reset {
                // (Its views stay in use here: the reset fails after the
                // listen ended.)
                vmi.reset_state().unwrap_err();
            }
            drop(vmi);
            let seen = served.join().unwrap();
            let at = |what: &str| {
                seen.iter()
                    .position(|r| r.contains(what))
                    .unwrap_or_else(|| panic!("no {what} in {seen:#?}"))
            };
            let (left, on) = (at("set: true"), at("on: true"));
            let (off, back) = (at("on: false"), at("set: false"));
            assert!(left < on && on < off && off < back, "{seen:#?}");
            assert!(seen[left].contains("view: None"), "{seen:#?}");
            assert_eq!(seen.iter().filter(|r| r.contains("on: false")).count(), 1);
        }
    }

    /// A listen the proxy refuses (another client watches the domain) is
    /// the driver's error, named, and nothing was set up.
    #[test]
    fn a_listen_the_proxy_refuses_sets_nothing_up() {
        let refused = ControlReply::Error(ControlError::WatchedByAnotherClient { domain: 1 });
        let (driver, served) = driver(false, refused);
        let e = driver.listen().unwrap_err().to_string();
        assert!(
            e.contains("another client of this run watches domain 1"),
            "{e}"
        );
        assert!(
            e.contains("AtDetach: the listen to domain 1, left to the proxy"),
            "{e}"
        );
        drop(driver);
        let seen = served.join().unwrap();
        assert!(!seen.iter().any(|r| r.contains("Listen")), "{seen:#?}");
    }

    /// The domain ends between `reset_state`'s first step (back to view 0)
    /// and its others (the listener's detach, the view's destroy): its
    /// views and listener went with it, so the reset is done, not an
    /// error; a reset of the ended domain is too.
    #[test]
    fn a_domain_that_ends_during_a_reset_is_reset() {
        let (vmi, served) = attached(true);
        vmi.reset_state().unwrap();
        vmi.reset_state().unwrap();
        drop(vmi);
        let seen = served.join().unwrap();
        assert!(
            seen.iter().any(|r| r.contains("ViewSwitchAll")),
            "{seen:#?}"
        );
    }

    /// A step refused while the domain still runs is the reset's error.
    #[test]
    fn a_reset_refused_while_the_domain_runs_fails() {
        let (vmi, served) = attached(false);
        let e = vmi.reset_state().unwrap_err();
        assert!(e.to_string().contains("is the active view"), "{e}");
        drop(vmi);
        let seen = served.join().unwrap();
        assert!(seen.iter().any(|r| r.contains("ViewDestroy")), "{seen:#?}");
    }
}
