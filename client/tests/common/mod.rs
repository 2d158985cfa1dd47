//! A mock console for the control-channel tests: a thread that speaks the
//! console's side of the protocol over a byte stream.
// Each test file uses a different part of this module.
#![allow(dead_code)]

use ipc_schema::supervisor::{name, name_str};
use parallax_client::frames::{self, FrameReader};
use parallax_client::logdirty::{
    DirtyMode, GfnRange, LdError, LdReply, LdRequest, Mechanism, RANGES_PER_REPLY,
};
use parallax_client::{
    CONTROL, ControlError, ControlEvent, ControlReply, ControlRequest, DomainInfo, DomainOp,
    FromHost, Refusal, ServiceInfo, ToHost,
};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

/// One frame on the wire.
pub fn frame(v: &ToHost) -> Vec<u8> {
    frames::encode(v).expect("a ToHost value fits a frame")
}

pub fn reply(seq: u32, reply: ControlReply) -> Vec<u8> {
    frame(&ToHost::Reply { seq, reply })
}

pub fn event(bytes: u32) -> Vec<u8> {
    frame(&ToHost::Event(ControlEvent::Garbage { bytes }))
}

/// What the mock console received and what it makes of it.
#[derive(Debug, Default)]
pub struct Received {
    pub requests: Vec<FromHost>,
    /// Frames from the host that did not decode.
    pub dropped: u64,
}

impl Received {
    /// What `f` takes of each request that came, in order.
    pub fn pick<T>(&self, f: impl FnMut(&ControlRequest) -> Option<T>) -> Vec<T> {
        self.requests
            .iter()
            .map(|r| &r.request)
            .filter_map(f)
            .collect()
    }

    /// The altp2m requests that came, in order.
    pub fn altp2m(&self) -> Vec<parallax_client::altp2m::AltRequest> {
        self.pick(|r| match r {
            ControlRequest::Altp2m(q) => Some(q.clone()),
            _ => None,
        })
    }
}

/// Serves `stream` until the host closes it: each request goes to
/// `handler`, whose byte blobs are written back in order. Returns what came.
pub fn serve(
    mut stream: UnixStream,
    mut handler: impl FnMut(&FromHost) -> Vec<Vec<u8>> + Send + 'static,
) -> JoinHandle<Received> {
    std::thread::spawn(move || {
        let mut reader = FrameReader::<FromHost>::new();
        let mut got = Received::default();
        let mut buf = [0u8; 4096];
        let mut frames = Vec::new();
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            reader.push(&buf[..n], &mut frames);
            for req in frames.drain(..) {
                for out in handler(&req) {
                    if stream.write_all(&out).is_err() {
                        break;
                    }
                }
                got.requests.push(req);
            }
            got.dropped = reader.dropped().frames();
        }
        got
    })
}

/// A console with a few services and domains that answers like the real
/// one should.
#[derive(Clone, Debug)]
pub struct Console {
    pub version: u32,
    pub key: [u8; 8],
    pub services: Vec<ServiceInfo>,
    pub domains: Vec<DomainInfo>,
    pub said_hello: bool,
    pub swap: Option<(String, u32, Vec<u8>)>,
    /// Every swap that was committed: (service, ELF).
    pub swapped: Vec<(String, Vec<u8>)>,
    /// The logdirty service behind the console; `None`: unreachable.
    pub logdirty: Option<FakeLogdirty>,
    /// Domain 1's guest-physical memory, as the introspect service shows it
    /// (64 KiB; other domains, virtual addresses and registers refused).
    pub memory: Vec<u8>,
    /// Domain 1's COM1 receive FIFO (room for [`MOCK_FIFO`] bytes), and
    /// what its guest has read: 3 bytes before each input request.
    pub com1: (Vec<u8>, Vec<u8>),
}

/// Bytes the mock's COM1 FIFO holds.
pub const MOCK_FIFO: usize = 8;

/// A tiny fake of the logdirty service: logs of the domains in `ram`, each
/// of which finds `writes` written as soon as it starts.
#[derive(Clone, Debug)]
pub struct FakeLogdirty {
    /// Each domain and its pages of RAM.
    pub ram: Vec<(u16, u64)>,
    /// Whether the CPU has PML.
    pub pml: bool,
    /// The pages a log finds written once started, as offsets from its
    /// first gfn (clipped to its range).
    pub writes: Vec<GfnRange>,
    /// The logs that run.
    pub logs: Vec<FakeLog>,
}

/// Logs per domain the fake keeps.
pub const FAKE_LOG_LIMIT: u32 = 4;

#[derive(Clone, Debug)]
pub struct FakeLog {
    pub domain: u16,
    pub log: u32,
    pub mechanism: Mechanism,
    pub range: GfnRange,
    pub dirty: BTreeSet<u64>,
}

/// Twelve ranges, 27 pages: two answers' worth of a read.
pub fn fake_writes() -> Vec<GfnRange> {
    let mut w = vec![
        GfnRange {
            gfn: 0x10,
            count: 16,
        },
        GfnRange {
            gfn: 0x100,
            count: 1,
        },
    ];
    w.extend((0..10).map(|i| GfnRange {
        gfn: 0x200 + 2 * i,
        count: 1,
    }));
    w
}

impl Default for FakeLogdirty {
    fn default() -> Self {
        Self {
            ram: vec![(1, 4096), (2, 4096)],
            pml: true,
            writes: fake_writes(),
            logs: Vec::new(),
        }
    }
}

impl FakeLogdirty {
    /// The answer to `q`.
    pub fn answer(&mut self, q: &LdRequest) -> LdReply {
        let (domain, log) = match *q {
            LdRequest::Start { domain, log, .. }
            | LdRequest::Read { domain, log, .. }
            | LdRequest::Stop { domain, log }
            | LdRequest::Status { domain, log } => (domain, log),
        };
        let Some(&(_, pages)) = self.ram.iter().find(|(d, _)| *d == domain) else {
            return LdReply::Error(LdError::NoSuchDomain);
        };
        let at = self
            .logs
            .iter()
            .position(|l| l.domain == domain && l.log == log);
        match *q {
            LdRequest::Start { range, mode, .. } => {
                let range = range.unwrap_or(GfnRange {
                    gfn: 0,
                    count: pages,
                });
                if range.count == 0 || range.end().is_none_or(|e| e > pages) {
                    return LdReply::Error(LdError::BadRange { pages });
                }
                if at.is_some() {
                    return LdReply::Error(LdError::AlreadyLogging);
                }
                let mechanism = match mode {
                    DirtyMode::Pml if !self.pml => {
                        return LdReply::Error(LdError::PmlUnsupported);
                    }
                    DirtyMode::Pml => Mechanism::Pml,
                    DirtyMode::Auto if self.pml => Mechanism::Pml,
                    DirtyMode::Auto | DirtyMode::WriteProtect => Mechanism::WriteProtect,
                };
                let end = range.gfn + range.count;
                let mine: Vec<&FakeLog> = self.logs.iter().filter(|l| l.domain == domain).collect();
                if let Some(other) = mine.iter().find(|l| {
                    l.mechanism != mechanism
                        && l.range.gfn < end
                        && range.gfn < l.range.gfn + l.range.count
                }) {
                    return LdReply::Error(LdError::ModeConflict {
                        held: other.mechanism,
                    });
                }
                if mine.len() as u32 >= FAKE_LOG_LIMIT {
                    return LdReply::Error(LdError::TooManyLogs {
                        limit: FAKE_LOG_LIMIT,
                    });
                }
                let dirty = self
                    .writes
                    .iter()
                    .flat_map(|w| (w.gfn..w.gfn + w.count).map(|o| range.gfn + o))
                    .filter(|g| *g < end)
                    .collect();
                self.logs.push(FakeLog {
                    domain,
                    log,
                    mechanism,
                    range,
                    dirty,
                });
                LdReply::Started { mechanism, range }
            }
            LdRequest::Read { from, clear, .. } => {
                let Some(i) = at else {
                    return LdReply::Error(LdError::NotLogging);
                };
                let l = &mut self.logs[i];
                let mut ranges: parallax_client::ipc_schema::ipc::BoundedVec<
                    GfnRange,
                    RANGES_PER_REPLY,
                > = parallax_client::ipc_schema::ipc::BoundedVec::new();
                let mut next = None;
                let mut taken = Vec::new();
                for &g in l.dirty.range(from..) {
                    let full = ranges.0.len() == RANGES_PER_REPLY;
                    match ranges.0.last_mut() {
                        Some(r) if r.gfn + r.count == g => r.count += 1,
                        _ if full => {
                            next = Some(g);
                            break;
                        }
                        _ => ranges.0.push(GfnRange { gfn: g, count: 1 }).unwrap(),
                    }
                    taken.push(g);
                }
                if clear {
                    for g in taken {
                        l.dirty.remove(&g);
                    }
                }
                LdReply::Dirty { ranges, next }
            }
            LdRequest::Stop { .. } => match at {
                Some(i) => {
                    self.logs.remove(i);
                    LdReply::Done
                }
                None => LdReply::Error(LdError::NotLogging),
            },
            LdRequest::Status { .. } => match at {
                Some(i) => {
                    let l = &self.logs[i];
                    LdReply::Status {
                        mechanism: l.mechanism,
                        range: l.range,
                        dirty: l.dirty.len() as u64,
                    }
                }
                None => LdReply::Error(LdError::NotLogging),
            },
        }
    }
}

pub fn service(n: &str, generation: u32, restarts: u32, state: u8, key: u8) -> ServiceInfo {
    ServiceInfo {
        name: name(n),
        generation,
        restarts,
        state,
        key: [key; 8],
    }
}

pub fn domain(id: u16, n: &str, state: u8) -> DomainInfo {
    DomainInfo {
        id,
        name: name(n),
        state,
        exit_status: 0,
        memory_mib: 16,
        protected: false,
        foreign_pages: 0,
    }
}

impl Default for Console {
    fn default() -> Self {
        Self {
            version: 1,
            key: CONTROL.key.to_bytes(),
            services: vec![
                service("init", 1, 0, 0, 0x11),
                service("console", 1, 0, 0, 0x22),
                service("vmm", 3, 2, 1, 0xab),
            ],
            domains: vec![domain(1, "hello", 1), domain(2, "cpuid", 2)],
            said_hello: false,
            swap: None,
            swapped: Vec::new(),
            logdirty: Some(FakeLogdirty::default()),
            memory: (0..65536u32).map(|i| (i % 251) as u8).collect(),
            com1: (Vec::new(), Vec::new()),
        }
    }
}

impl Console {
    /// The answer to `req`.
    pub fn answer(&mut self, req: &FromHost) -> ControlReply {
        use ControlReply as R;
        if !self.said_hello && !matches!(req.request, ControlRequest::Hello { .. }) {
            return R::Error(ControlError::NotHello);
        }
        match &req.request {
            ControlRequest::Hello { key } => {
                if *key != self.key {
                    return R::Error(ControlError::WrongKey {
                        console: self.key,
                        host: *key,
                    });
                }
                self.said_hello = true;
                R::Welcome {
                    version: self.version,
                }
            }
            ControlRequest::Service { index } => {
                R::Service(self.services.get(usize::from(*index)).copied())
            }
            ControlRequest::Domain { index } => {
                R::Domain(self.domains.get(usize::from(*index)).copied())
            }
            ControlRequest::DomainControl { id, op } => {
                match self.domains.iter_mut().find(|d| d.id == *id) {
                    Some(d) => {
                        d.state = match op {
                            DomainOp::Start | DomainOp::Unpause => 1,
                            DomainOp::Pause | DomainOp::Reset => 2,
                            DomainOp::Destroy => 5,
                        };
                        R::Done
                    }
                    None => R::Refused(Refusal::NoSuchDomain),
                }
            }
            // As the kernel: a paused parent only; the fork is paused.
            ControlRequest::Fork { parent, name } => {
                let Some(p) = self.domains.iter().find(|d| d.id == *parent).copied() else {
                    return R::Refused(Refusal::NoSuchDomain);
                };
                if p.state != 2 {
                    return R::Refused(Refusal::Kernel {
                        error: ipc_schema::syscall::SysError::Busy as u64,
                    });
                }
                let id = self.domains.iter().map(|d| d.id).max().unwrap_or(0) + 1;
                // As init names forks: one domain a name.
                let holder = |n: &str| {
                    self.domains
                        .iter()
                        .find(|d| d.state != 5 && name_str(&d.name) == n)
                        .map(|d| d.id)
                };
                let own = if name_str(name).is_empty() {
                    (1..)
                        .map(|n| match n {
                            1 => format!("{}-fork", name_str(&p.name)),
                            n => format!("{}-fork{n}", name_str(&p.name)),
                        })
                        .find(|n| holder(n).is_none())
                        .unwrap()
                } else if let Some(id) = holder(name_str(name)) {
                    return R::Refused(Refusal::NameInUse { id });
                } else {
                    name_str(name).to_owned()
                };
                let mut child = domain(id, &own, 2);
                child.memory_mib = p.memory_mib;
                self.domains.push(child);
                R::Forked { id }
            }
            ControlRequest::InjectFault { name } => {
                match self
                    .services
                    .iter_mut()
                    .find(|s| name_str(&s.name) == name_str(name))
                {
                    Some(s) => {
                        s.state = 1;
                        R::Done
                    }
                    None => R::Refused(Refusal::NoSuchService),
                }
            }
            ControlRequest::SwapBegin { name, len } => {
                self.swap = Some((name_str(name).to_owned(), *len, Vec::new()));
                R::Done
            }
            ControlRequest::SwapChunk { offset, bytes } => match &mut self.swap {
                Some((_, _, got)) if *offset as usize == got.len() => {
                    got.extend_from_slice(&bytes.0);
                    R::Done
                }
                Some((_, _, got)) => R::Error(ControlError::SwapOutOfOrder {
                    expected: got.len() as u32,
                }),
                None => R::Error(ControlError::SwapOutOfOrder { expected: 0 }),
            },
            ControlRequest::SwapCommit => match self.swap.take() {
                Some((n, len, got)) if got.len() == len as usize => {
                    let Some(s) = self.services.iter_mut().find(|s| name_str(&s.name) == n) else {
                        return R::Refused(Refusal::NoSuchService);
                    };
                    s.generation += 1;
                    let generation = s.generation;
                    self.swapped.push((n, got));
                    R::Swapped { generation }
                }
                Some((_, _, got)) => R::Error(ControlError::SwapOutOfOrder {
                    expected: got.len() as u32,
                }),
                None => R::Error(ControlError::SwapOutOfOrder { expected: 0 }),
            },
            ControlRequest::Altp2m(q) => {
                use parallax_client::altp2m::{
                    AltError, AltReply, AltRequest, HcError, Reply, Request,
                };
                R::Altp2m(match q {
                    AltRequest::External {
                        request: Request::ViewCreate { .. },
                        ..
                    } => AltReply::Reply(Reply::View(1)),
                    AltRequest::External { .. } => {
                        AltReply::Reply(Reply::Error(HcError::NoSuchView { view: 9 }))
                    }
                    AltRequest::Listen { domain: 1, .. } => AltReply::Done,
                    AltRequest::Listen { .. } => AltReply::Refused(AltError::NoSuchDomain),
                    _ => AltReply::Refused(AltError::NoSuchEvent),
                })
            }
            ControlRequest::Logdirty(q) => match &mut self.logdirty {
                Some(l) => R::Logdirty(l.answer(q)),
                None => R::Error(ControlError::LogdirtyUnavailable),
            },
            ControlRequest::Introspect(q) => R::Introspect(self.introspect(q)),
            ControlRequest::ShadowFrames { .. } => R::Refused(Refusal::NotAllowed),
            // A console without a sharing service.
            ControlRequest::Share(_) => R::Error(ControlError::SharingUnavailable),
            ControlRequest::ConsoleInput { domain: 1, bytes } => {
                let (fifo, read) = &mut self.com1;
                let n = fifo.len().min(3);
                read.extend(fifo.drain(..n));
                let count = bytes.0.len().min(MOCK_FIFO - fifo.len());
                fifo.extend_from_slice(&bytes.0[..count]);
                R::Uart(parallax_client::console::UartReply::Taken {
                    count: count as u16,
                    waiting: fifo.len() as u16,
                })
            }
            ControlRequest::ConsoleInput { .. } => {
                R::Uart(parallax_client::console::UartReply::NoSuchDomain)
            }
            // As the console: only a proxy sees a connection end.
            ControlRequest::AtDetach { .. } => R::Error(ControlError::ProxyOnly),
            ControlRequest::ReadMemory { .. } | ControlRequest::UseDebugPort => {
                unreachable!("answered by respond")
            }
        }
    }

    /// The frames that answer `req`: a memory read's data, then its reply,
    /// as the console streams them; nothing for the runner's `UseDebugPort`.
    pub fn respond(&mut self, req: &FromHost) -> Vec<Vec<u8>> {
        use parallax_client::introspect::{CHUNK, IntroError, IntroReply, IntroRequest};
        match req.request {
            ControlRequest::UseDebugPort => Vec::new(),
            ControlRequest::ReadMemory { domain, at, len } if self.said_hello => {
                let mut out = Vec::new();
                let mut offset = 0u32;
                let end = loop {
                    if offset >= len {
                        break IntroReply::Done;
                    }
                    let n = (len - offset).min(CHUNK as u32) as u16;
                    let Some(at) = at.offset(u64::from(offset)) else {
                        break IntroReply::Refused(IntroError::BadLength);
                    };
                    match self.introspect(&IntroRequest::Read { domain, at, len: n }) {
                        IntroReply::Bytes(bytes) => out.push(frame(&ToHost::Data {
                            seq: req.seq,
                            offset,
                            bytes,
                        })),
                        other => break other,
                    }
                    offset += u32::from(n);
                };
                out.push(reply(req.seq, ControlReply::Introspect(end)));
                out
            }
            _ => vec![reply(req.seq, self.answer(req))],
        }
    }

    fn introspect(
        &mut self,
        q: &parallax_client::introspect::IntroRequest,
    ) -> parallax_client::introspect::IntroReply {
        use parallax_client::introspect::{Address, CHUNK, IntroError, IntroReply, IntroRequest};
        let span = |gpa: u64, len: usize| {
            let s = usize::try_from(gpa).ok()?;
            let e = s.checked_add(len)?;
            (e <= self.memory.len()).then_some(s..e)
        };
        match q {
            IntroRequest::Read {
                domain: 1,
                at: Address::Physical(gpa),
                len,
            } if usize::from(*len) <= CHUNK => match span(*gpa, usize::from(*len)) {
                Some(r) => IntroReply::Bytes(parallax_client::ipc_schema::ipc::BoundedVec(
                    heapless::Vec::from_slice(&self.memory[r]).unwrap(),
                )),
                None => IntroReply::Refused(IntroError::OutsideRam { gpa: *gpa }),
            },
            IntroRequest::Write {
                domain: 1,
                at: Address::Physical(gpa),
                bytes,
            } => match span(*gpa, bytes.0.len()) {
                Some(r) => {
                    self.memory[r].copy_from_slice(&bytes.0);
                    IntroReply::Done
                }
                None => IntroReply::Refused(IntroError::OutsideRam { gpa: *gpa }),
            },
            _ => IntroReply::Refused(IntroError::NotAllowed),
        }
    }

    /// Serves `stream` with this console's answers.
    pub fn serve(mut self, stream: UnixStream) -> JoinHandle<Received> {
        serve(stream, move |req| self.respond(req))
    }
}

/// A fresh directory for one test's files (short: unix socket paths are
/// limited to 107 bytes).
pub fn scratch(label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hv-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// An x86-64 ELF of `len` bytes (at least 256): a header and one loadable
/// segment holding the rest of the file.
pub fn fake_elf(len: usize) -> Vec<u8> {
    let len = len.max(256);
    let mut b = vec![0u8; len];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little endian
    b[6] = 1;
    b[16] = 2; // executable
    b[18] = 62; // x86-64
    b[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers at 64
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    b[58..60].copy_from_slice(&64u16.to_le_bytes());
    let (offset, size) = (120u64, len as u64 - 120);
    b[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b[68..72].copy_from_slice(&5u32.to_le_bytes()); // read, execute
    b[72..80].copy_from_slice(&offset.to_le_bytes());
    b[80..88].copy_from_slice(&(0x40_0000 + offset).to_le_bytes());
    b[88..96].copy_from_slice(&(0x40_0000 + offset).to_le_bytes());
    b[96..104].copy_from_slice(&size.to_le_bytes());
    b[104..112].copy_from_slice(&size.to_le_bytes());
    b[112..120].copy_from_slice(&16u64.to_le_bytes());
    for (i, x) in b.iter_mut().enumerate().skip(120) {
        *x = (i * 7 + i / 251) as u8;
    }
    b
}
