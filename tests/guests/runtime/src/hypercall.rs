//! Hypercalls: `VMCALL` with the call number in RAX, arguments in RBX and
//! RCX, the status back in RAX and a result in RBX (see
//! [`ipc_schema::hypercall`]).
//!
//! Without a hypervisor VMCALL raises #UD, which the runtime reports as an
//! exception (status 0xEE): a guest that needs Parallax fails cleanly at its
//! first hypercall on a bare CPU or plain QEMU.
//!
//! None of these is `nomem` to the compiler: a view switch changes what
//! memory holds, and [`call`] reads and writes the request page.

use crate::mem::Pages;
use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use ipc_schema::hypercall::{
    HC_CALL, HC_EXIT_COUNT, HC_IPC_PING, HC_NULL, HC_SERVICE_INFO, HC_SERVICE_NULL, HC_VIEW_SWITCH,
    HcError, MAX_REQUEST, Reply, Request, Status,
};

/// Executes VMCALL with RAX = `nr`, RBX = `rbx`, RCX = `rcx`; returns
/// (RAX, RBX). RCX and RDX are treated as clobbered.
#[inline(always)]
pub fn vmcall(nr: u64, rbx: u64, rcx: u64) -> (u64, u64) {
    let rax_out: u64;
    let rbx_out: u64;
    // Safety: VMCALL exits to the hypervisor, which follows the hypercall ABI:
    // it changes only RAX, RBX (and possibly RCX/RDX, declared clobbered) and
    // the request page `call` names. RBX, reserved by LLVM, is swapped with
    // a scratch register around the instruction. Without a hypervisor it
    // raises #UD, which does not return.
    unsafe {
        asm!(
            "xchg {b}, rbx",
            "vmcall",
            "xchg {b}, rbx",
            b = inout(reg) rbx => rbx_out,
            inout("rax") nr => rax_out,
            inout("rcx") rcx => _,
            out("rdx") _,
            options(nostack),
        )
    };
    (rax_out, rbx_out)
}

fn status(raw: u64) -> Status {
    Status::from_raw(raw).unwrap_or_else(|| panic!("hypercall returned unknown status {raw}"))
}

/// HC_NULL: a round trip to the hypervisor and back. Returns RAX (0).
#[inline(always)]
pub fn null() -> u64 {
    vmcall(HC_NULL, 0, 0).0
}

/// HC_SERVICE_NULL: a round trip through the vmm service (exit, IPC,
/// reply, entry). Returns RAX (0).
#[inline(always)]
pub fn service_null() -> u64 {
    vmcall(HC_SERVICE_NULL, 0, 0).0
}

/// HC_SERVICE_INFO: (the vmm's version, the service calls it answered for
/// this domain, this one included). Panics if the hypervisor refuses.
pub fn service_info() -> (u32, u32) {
    let (rax, rbx) = vmcall(HC_SERVICE_INFO, 0, 0);
    match status(rax) {
        Status::Ok => ((rbx >> 32) as u32, rbx as u32),
        other => panic!("service_info hypercall failed: {other:?}"),
    }
}

/// HC_IPC_PING: TSC ticks of one IPC round trip between two services, as
/// the vmm measured it; `None` if it could not.
pub fn ipc_ping() -> Option<u64> {
    let (rax, rbx) = vmcall(HC_IPC_PING, 0, 0);
    (status(rax) == Status::Ok).then_some(rbx)
}

/// HC_EXIT_COUNT: the VM exits of this vCPU so far. Panics if the
/// hypervisor refuses the call.
pub fn exit_count() -> u64 {
    let (rax, rbx) = vmcall(HC_EXIT_COUNT, 0, 0);
    match status(rax) {
        Status::Ok => rbx,
        other => panic!("exit_count hypercall failed: {other:?}"),
    }
}

/// HC_VIEW_SWITCH: makes `view` this vCPU's active view.
#[inline(always)]
pub fn view_switch(view: u16) -> Status {
    status(vmcall(HC_VIEW_SWITCH, u64::from(view), 0).0)
}

/// Why [`call`] has no [`Reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The request does not encode into [`MAX_REQUEST`] bytes.
    Encode,
    /// Another `call` is in progress (e.g. from an exception handler).
    Busy,
    /// The hypervisor refused the request ([`Status::Refused`]), with the
    /// [`HcError`] of the `Reply::Error` it wrote, if it wrote one.
    Refused(Option<HcError>),
    /// Any other status than `Ok` or `Refused`.
    Status(Status),
    /// RAX held no known status.
    UnknownStatus(u64),
    /// The reply length in RBX is larger than the page.
    ReplyLength(u64),
    /// The reply does not decode.
    Decode,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Encode => write!(f, "the request does not encode"),
            CallError::Busy => write!(f, "a hypercall is already in progress"),
            CallError::Refused(Some(e)) => write!(f, "refused: {e:?}"),
            CallError::Refused(None) => write!(f, "refused (no reason given)"),
            CallError::Status(s) => write!(f, "status {s:?}"),
            CallError::UnknownStatus(raw) => write!(f, "unknown status {raw}"),
            CallError::ReplyLength(n) => write!(f, "reply length {n} is too long"),
            CallError::Decode => write!(f, "the reply does not decode"),
        }
    }
}

/// The request page: 4 KiB aligned, in .bss.
static REQUEST_PAGE: Pages<1> = Pages::new();
/// Whether a `call` is using the request page.
static REQUEST_BUSY: AtomicBool = AtomicBool::new(false);

/// The guest frame number of the page [`call`] uses for requests.
pub fn request_page_gfn() -> u64 {
    REQUEST_PAGE.gfn(0)
}

/// HC_CALL: postcard-encodes `request` into the request page, names it in
/// RBX (address) and RCX (length), and decodes the [`Reply`] the hypervisor
/// wrote over it (length in RBX) when the status is `Ok`. A
/// `Reply::Error` with status `Ok` is `Ok(Reply::Error(..))`; with status
/// `Refused` it is `Err(CallError::Refused(Some(..)))`.
pub fn call(request: &Request) -> Result<Reply, CallError> {
    if REQUEST_BUSY.swap(true, Ordering::Acquire) {
        return Err(CallError::Busy);
    }
    let result = call_locked(request);
    REQUEST_BUSY.store(false, Ordering::Release);
    result
}

fn call_locked(request: &Request) -> Result<Reply, CallError> {
    let mut buf = [0u8; MAX_REQUEST];
    let len = postcard::to_slice(request, &mut buf)
        .map_err(|_| CallError::Encode)?
        .len();
    copy_to_page(&buf[..len]);
    let (rax, rbx) = vmcall(HC_CALL, REQUEST_PAGE.addr(), len as u64);
    let decode = |length: u64| -> Result<Reply, CallError> {
        if length > crate::mem::PAGE_SIZE as u64 {
            return Err(CallError::ReplyLength(length));
        }
        let mut reply = [0u8; crate::mem::PAGE_SIZE];
        let reply = &mut reply[..length as usize];
        for (i, b) in reply.iter_mut().enumerate() {
            *b = REQUEST_PAGE.read_u8(0, i);
        }
        postcard::from_bytes::<Reply>(reply).map_err(|_| CallError::Decode)
    };
    match Status::from_raw(rax) {
        Some(Status::Ok) => decode(rbx),
        Some(Status::Refused) => match decode(rbx) {
            Ok(Reply::Error(e)) => Err(CallError::Refused(Some(e))),
            _ => Err(CallError::Refused(None)),
        },
        Some(other) => Err(CallError::Status(other)),
        None => Err(CallError::UnknownStatus(rax)),
    }
}

fn copy_to_page(bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        REQUEST_PAGE.write_u8(0, i, b);
    }
}

/// What [`capabilities`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub vmfunc: bool,
    pub ve: bool,
    pub pml: bool,
    pub max_views: u16,
}

/// An unexpected answer to a helper below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelperError {
    Call(CallError),
    /// `Reply::Error` with status `Ok`.
    Hc(HcError),
    /// A reply of the wrong kind (its variant's name).
    Unexpected(&'static str),
}

impl From<CallError> for HelperError {
    fn from(e: CallError) -> Self {
        HelperError::Call(e)
    }
}

impl HelperError {
    /// The hypervisor's reason, however it was returned.
    pub fn hc_error(&self) -> Option<HcError> {
        match self {
            HelperError::Call(CallError::Refused(e)) => *e,
            HelperError::Hc(e) => Some(*e),
            _ => None,
        }
    }
}

impl fmt::Display for HelperError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelperError::Call(e) => write!(f, "{e}"),
            HelperError::Hc(e) => write!(f, "error reply: {e:?}"),
            HelperError::Unexpected(r) => write!(f, "unexpected reply {r}"),
        }
    }
}

/// The name of a reply's variant.
pub fn reply_kind(reply: &Reply) -> &'static str {
    match reply {
        Reply::Done => "Done",
        Reply::Capabilities { .. } => "Capabilities",
        Reply::Mode(_) => "Mode",
        Reply::View(_) => "View",
        Reply::Access(_) => "Access",
        Reply::Entry(_) => "Entry",
        Reply::SuppressVe(_) => "SuppressVe",
        Reply::Dirty { .. } => "Dirty",
        Reply::DirtyStarted(_) => "DirtyStarted",
        Reply::Error(_) => "Error",
        Reply::NotInEffect { .. } => "NotInEffect",
    }
}

/// [`call`] for a request answered `Reply::Done`.
pub fn call_done(request: &Request) -> Result<(), HelperError> {
    match call(request)? {
        Reply::Done => Ok(()),
        Reply::Error(e) => Err(HelperError::Hc(e)),
        other => Err(HelperError::Unexpected(reply_kind(&other))),
    }
}

/// `Request::Capabilities`.
pub fn capabilities() -> Result<Capabilities, HelperError> {
    match call(&Request::Capabilities)? {
        Reply::Capabilities {
            vmfunc,
            ve,
            pml,
            max_views,
        } => Ok(Capabilities {
            vmfunc,
            ve,
            pml,
            max_views,
        }),
        Reply::Error(e) => Err(HelperError::Hc(e)),
        other => Err(HelperError::Unexpected(reply_kind(&other))),
    }
}

/// `Request::ViewCreate` (pages as the host p2m gives them): the new
/// view's index.
pub fn view_create() -> Result<u16, HelperError> {
    view_create_with(None)
}

/// `Request::ViewCreate` with a default access for its pages.
pub fn view_create_with(
    default_access: Option<ipc_schema::hypercall::Access>,
) -> Result<u16, HelperError> {
    view_of(&Request::ViewCreate { default_access })
}

/// `Request::ViewCurrent`: the calling vCPU's view.
pub fn view_current() -> Result<u16, HelperError> {
    view_of(&Request::ViewCurrent)
}

fn view_of(request: &Request) -> Result<u16, HelperError> {
    match call(request)? {
        Reply::View(v) => Ok(v),
        Reply::Error(e) => Err(HelperError::Hc(e)),
        other => Err(HelperError::Unexpected(reply_kind(&other))),
    }
}

/// `Request::GetEntry`: the effective entry, or with `raw` what the view's
/// table holds.
pub fn get_entry(
    view: u16,
    gfn: u64,
    raw: bool,
) -> Result<ipc_schema::hypercall::Entry, HelperError> {
    match call(&Request::GetEntry { view, gfn, raw })? {
        Reply::Entry(e) => Ok(e),
        Reply::Error(e) => Err(HelperError::Hc(e)),
        other => Err(HelperError::Unexpected(reply_kind(&other))),
    }
}

/// `Request::DirtyLogStart`: the mechanism the log runs on.
pub fn dirty_log_start(
    range: Option<ipc_schema::logdirty::GfnRange>,
    mode: ipc_schema::logdirty::DirtyMode,
) -> Result<ipc_schema::logdirty::Mechanism, HelperError> {
    match call(&Request::DirtyLogStart { range, mode })? {
        Reply::DirtyStarted(m) => Ok(m),
        Reply::Error(e) => Err(HelperError::Hc(e)),
        other => Err(HelperError::Unexpected(reply_kind(&other))),
    }
}

/// Every dirty gfn of the log (read with `clear` or peeked), lowest first,
/// handed to `each`; returns how many.
pub fn dirty_log_collect(clear: bool, mut each: impl FnMut(u64)) -> Result<u64, HelperError> {
    let mut from = 0;
    let mut n = 0;
    loop {
        match call(&Request::DirtyLogRead { from, clear })? {
            Reply::Dirty { ranges, next } => {
                for r in ranges.0.iter() {
                    for g in r.gfn..r.gfn + r.count {
                        each(g);
                        n += 1;
                    }
                }
                match next {
                    Some(g) => from = g,
                    None => return Ok(n),
                }
            }
            Reply::Error(e) => return Err(HelperError::Hc(e)),
            other => return Err(HelperError::Unexpected(reply_kind(&other))),
        }
    }
}
