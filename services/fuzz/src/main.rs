//! fuzz: a hostile task. It makes 100,000 system calls (N when it is named
//! `fuzz-N`: [`calls_for`]) with random
//! numbers, pointers, lengths and handle slots (the menus of `lib.rs`),
//! among them the IPC calls that take the kernel's fast paths: REPLY_RECV
//! answering its domain's exits and its client's calls, RECV, CALL to its
//! echo server. First it checks three things precisely: that port numbers
//! which wrap past `u64::MAX` are refused, that a REPLY_RECV whose
//! receive buffer lies just below the answer's page is refused, the frame
//! below untouched, and that a CALL through a message and reply buffer the
//! kernel kept the translation of is refused once their page is unmapped,
//! the frame that was there untouched.
//!
//! Its handles (see `tests/hostile.rs`) reach only what is its own:
//! `inbox` (receive: the exits and EPT violations of its domain, and the
//! calls of `fuzz-client`), `echo` (call: `fuzz-echo`), `note` (its
//! notification), `buffer` (its shared frames: two for the check, then its
//! scratch window), `port` (I/O port 0x80, the POST code port: nothing
//! reads it) and, where there is one, `domain` (its own domain: read,
//! write, build, views, vCPUs). The same binary runs as `fuzz-echo` (answers
//! each call with its message) and `fuzz-client` (calls the fuzzer until it
//! answers STOP).
//!
//! It logs `fuzz: <check>: ok (...)` or `fuzz: FAIL <check>: ...`, the
//! number of calls made with what the kernel answered, and exits with the
//! number of failed checks.

#![no_std]
#![no_main]

use ipc_schema::exitcodec::{EXIT_MESSAGE_MAX, decode_message, encode_answer, encode_reply};
use ipc_schema::ipc::BoundedVec;
use ipc_schema::syscall::layout::MAP_BASE;
use ipc_schema::syscall::{
    DomainOp, EptOp, Handle, IO_OUT_MAX, MAX_EPT_OPS, MAX_MESSAGE, Perms, SysError, nr,
};
use ipc_schema::vmexit::{ExitKind, ExitMessage, ExitRegs, ExitReply, Response};
use service_fuzz::{
    Memory, PAGE, Receive, Receivers, Rng, SCRATCH_PAGES, SCRATCH_VA, SEED, STOP, Tally,
    call_number, calls_for, handle_slot, length, number,
};
use service_runtime::ipc::{self, Event};
use service_runtime::sys::{self, Ret};
use service_runtime::{handle, handles, require};

service_runtime::entry!(main);

fn main() -> ! {
    let name = service_runtime::name();
    match (name, calls_for(name)) {
        ("fuzz-echo", _) => echo(),
        ("fuzz-client", _) => client(),
        (_, Some(calls)) => Fuzzer::start(calls).run(),
        (_, None) => panic!(
            "a fuzz service is named fuzz, fuzz-<calls>, fuzz-echo or fuzz-client, not {}",
            name
        ),
    }
}

/// Whom a token answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The domain's vCPU, waiting for the answer to its exit.
    Exit,
    /// `fuzz-client`, waiting for the answer to its call.
    Client,
    /// Nobody (0, a stale or a made-up token).
    Nobody,
}

struct Fuzzer {
    rng: Rng,
    mem: Memory,
    rx: Receivers,
    echo: Handle,
    buffer: Handle,
    /// Its domain: (handle, id).
    domain: Option<(Handle, u16)>,
    /// Slots 0 to this hold the handles it was given.
    given: u64,
    calls: u64,
    /// Calls to make.
    to_make: u64,
    tally: Tally,
    /// The token of an exit taken and not answered yet.
    exit_token: Option<u64>,
    /// The token of the client's call, taken and not answered yet.
    client_token: Option<u64>,
    /// The last exit message, when it could be read.
    last_exit: Option<ExitMessage>,
    /// Messages taken since the last exit.
    since_exit: u32,
    /// The notification has bits (set by the fuzzer).
    signalled: bool,
    /// Views the fuzzer created (for the views menu).
    views: [u16; 4],
    failed: u64,
    exits: u64,
    exits_answered_in_reply_recv: u64,
    client_calls: u64,
    guarded: u64,
}

impl Fuzzer {
    fn start(to_make: u64) -> Self {
        let rx = Receivers {
            inbox: require("inbox"),
            note: require("note"),
            lifecycle: handle("lifecycle"),
        };
        let given = handles().map(|(_, s)| u64::from(s) + 1).max().unwrap_or(0);
        let domain = handle("domain").and_then(|h| {
            (1..=16u16)
                .find(|&id| sys::domain_info(h, id).is_ok())
                .map(|id| (h, id))
        });
        let mut f = Fuzzer {
            rng: Rng::new(SEED),
            mem: Memory::new(),
            rx,
            echo: require("echo"),
            buffer: require("buffer"),
            domain,
            given,
            calls: 0,
            to_make,
            tally: Tally::default(),
            exit_token: None,
            client_token: None,
            last_exit: None,
            since_exit: 0,
            signalled: false,
            views: [1, 2, 3, 511],
            failed: 0,
            exits: 0,
            exits_answered_in_reply_recv: 0,
            client_calls: 0,
            guarded: 0,
        };
        f.restore_scratch();
        f
    }

    fn check(&mut self, name: &str, ok: bool, detail: &str) {
        if ok {
            defmt::info!("fuzz: {=str}: ok ({=str})", name, detail);
        } else {
            defmt::error!("fuzz: FAIL {=str}: {=str}", name, detail);
            self.failed += 1;
        }
    }

    /// One system call, counted.
    fn sys(&mut self, n: u64, a: [u64; 6]) -> Ret {
        self.calls += 1;
        let r = sys::call6(n, a);
        self.tally.add(r.status);
        r
    }

    /// Maps every page of the scratch window that is not mapped (a random
    /// FRAMES_UNMAP may have taken some).
    fn restore_scratch(&mut self) {
        for page in 0..SCRATCH_PAGES {
            let va = SCRATCH_VA + page * PAGE;
            self.sys(
                nr::FRAMES_MAP,
                [u64::from(self.buffer), 2 + page, 1, va, 1, 0],
            );
        }
    }

    fn scratch_write(&self, va: u64, bytes: &[u8]) {
        assert!(self.mem.in_scratch(va, bytes.len() as u64));
        // Safety: the scratch window is mapped and writable (every call that
        // could unmap it is followed by `restore_scratch`), and no Rust
        // reference to it lives across a system call.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), va as *mut u8, bytes.len()) };
    }

    fn scratch_read(&self, va: u64, out: &mut [u8]) {
        assert!(self.mem.in_scratch(va, out.len() as u64));
        // Safety: as in `scratch_write`.
        unsafe { core::ptr::copy_nonoverlapping(va as *const u8, out.as_mut_ptr(), out.len()) };
    }

    fn run(mut self) -> ! {
        defmt::info!(
            "fuzz: seed {=u64:#x}; {=u64} system calls to make; domain {}",
            SEED,
            self.to_make,
            self.domain.map(|d| d.1)
        );
        self.ports_that_wrap();
        if self.domain.is_some() {
            self.exit_buffer_below_a_page();
            self.kept_buffers_unmapped();
            self.view_in_use();
        } else {
            defmt::info!("fuzz: no domain: the exit-buffer check needs one, and no exits come");
        }
        while self.calls < self.to_make {
            match self.rng.below(100) {
                0..=14 => self.reply_recv_shot(),
                15..=21 => self.recv_shot(),
                22..=26 => self.reply_shot(),
                27..=35 => self.call_shot(),
                36..=39 => self.notification_shot(),
                _ => self.random_call(),
            }
        }
        self.finish()
    }

    // --- What may come, and never waiting for ever -------------------------

    /// Whether the vCPU will exit again (and its exit come to the inbox):
    /// its exit is answered, exits came lately, and the domain runs.
    fn vcpu_will_exit(&mut self, exit_token: Option<u64>) -> bool {
        let Some((h, id)) = self.domain else {
            return false;
        };
        if exit_token.is_some() || self.since_exit > 64 {
            return false;
        }
        let r = self.sys(nr::DOMAIN_INFO, [u64::from(h), u64::from(id), 0, 0, 0, 0]);
        r.status == 0 && r.rdi == 1
    }

    /// `mask`, or `mask` with the notification (signalled first) when a
    /// receive on it could wait for ever, given the tokens the fuzzer will
    /// hold when it receives.
    fn guard(&mut self, mask: u64, exit_token: Option<u64>, client_token: Option<u64>) -> u64 {
        let coming = client_token.is_none() || self.vcpu_will_exit(exit_token);
        match self.rx.receive(mask, self.signalled, coming) {
            Receive::Refused | Receive::Returns => mask,
            Receive::MayWait => {
                self.guarded += 1;
                let bits = 1 << self.rng.below(64);
                self.signal_self(bits);
                mask | 1 << self.rx.note
            }
        }
    }

    fn signal_self(&mut self, bits: u64) {
        let r = self.sys(nr::NOTIFY, [u64::from(self.rx.note), bits, 0, 0, 0, 0]);
        if r.status == 0 && bits != 0 {
            self.signalled = true;
        }
    }

    /// What a receive returned: a notification, an exit, a call.
    fn receipt(&mut self, r: Ret, buf: u64, cap: u64) {
        if r.status != 0 {
            return;
        }
        if r.rsi == 0 {
            if r.r10 == u64::from(self.rx.note) {
                self.signalled = false;
            }
            return;
        }
        let len = r.rdi;
        if r.rsi >> 63 != 0 {
            self.exit_token = Some(r.rsi);
            self.exits += 1;
            self.since_exit = 0;
            let mut bytes = [0u8; EXIT_MESSAGE_MAX];
            self.last_exit =
                if len <= cap && len <= EXIT_MESSAGE_MAX as u64 && self.mem.in_scratch(buf, len) {
                    self.scratch_read(buf, &mut bytes[..len as usize]);
                    decode_message(&bytes[..len as usize])
                } else {
                    None
                };
            if let Some(m) = self.last_exit
                && let ExitKind::EptViolation { gpa, .. } = m.exit.kind
                && m.exit.view == 0
            {
                self.heal_host_view(gpa / PAGE);
            }
        } else {
            self.client_token = Some(r.rsi);
            self.client_calls += 1;
            self.since_exit = self.since_exit.saturating_add(1);
        }
    }

    /// Gives `gfn` back every access in view 0, which a random EPT
    /// operation took away: without it the guest would fault on that page
    /// for ever, through the general path only.
    fn heal_host_view(&mut self, gfn: u64) {
        let Some((h, id)) = self.domain else { return };
        let mut ops: BoundedVec<EptOp, MAX_EPT_OPS> = BoundedVec::new();
        let all = Perms {
            read: true,
            write: true,
            execute: true,
        };
        let _ = ops.0.push(EptOp::Protect {
            view: 0,
            gfn,
            perms: all,
        });
        let mut bytes = [0u8; 32];
        let n = postcard::to_slice(&ops, &mut bytes).map_or(0, |b| b.len());
        let at = SCRATCH_VA + 3 * PAGE;
        self.scratch_write(at, &bytes[..n]);
        let out = SCRATCH_VA + 4 * PAGE;
        self.sys(
            nr::EPT_OPS,
            [
                u64::from(h),
                u64::from(id),
                at,
                n as u64,
                out,
                MAX_MESSAGE as u64,
            ],
        );
    }

    // --- Answers --------------------------------------------------------------

    /// The answer to the last exit: back to view 0 for an EPT violation,
    /// an IN's value with every bit set (a UART that is always ready), else
    /// on to the next instruction, sometimes with the registers unchanged.
    fn exit_answer(&mut self, out: &mut [u8; 64]) -> usize {
        let back = ExitReply::resume(Response::RETRY, Some(0));
        let n = match self.last_exit.map(|m| (m.exit.kind, m.regs)) {
            Some((ExitKind::EptViolation { .. } | ExitKind::EptMisconfig { .. }, _)) => {
                encode_reply(&back, out)
            }
            Some((ExitKind::Io { write: false, .. }, regs)) => encode_answer(
                &Response::DONE,
                Some(&ExitRegs {
                    rax: regs.rax | 0xff,
                    ..regs
                }),
                out,
            ),
            Some((ExitKind::MonitorTrap | ExitKind::Start, _)) => {
                encode_answer(&Response::RETRY, None, out)
            }
            Some((_, regs)) if self.rng.chance(25) => {
                encode_answer(&Response::DONE, Some(&regs), out)
            }
            _ => encode_answer(&Response::DONE, None, out),
        };
        n.unwrap_or(0)
    }

    /// A token to answer: the exit's, the client's, 0, a stale one or a
    /// made-up one.
    fn pick_token(&mut self) -> (u64, Target) {
        let real = match (self.exit_token, self.client_token) {
            (Some(t), _) if self.rng.chance(60) => Some((t, Target::Exit)),
            (_, Some(t)) => Some((t, Target::Client)),
            (Some(t), None) => Some((t, Target::Exit)),
            (None, None) => None,
        };
        match (self.rng.below(10), real) {
            (0..=6, Some(r)) => r,
            (7, _) => (0, Target::Nobody),
            // The same caller, another call (a stale token).
            (8, Some((t, _))) => (t ^ (1 + self.rng.below(7)), Target::Nobody),
            _ => (self.rng.next_u64(), Target::Nobody),
        }
    }

    /// An answer for `target`, placed where the kernel can read it or not:
    /// (address, length, whether the kernel can read it there).
    fn answer(&mut self, target: Target) -> (u64, u64, bool) {
        let mut bytes = [0u8; 64];
        let len = match target {
            Target::Exit => self.exit_answer(&mut bytes) as u64,
            Target::Client => {
                for b in &mut bytes {
                    *b = self.rng.next_u64() as u8;
                }
                match self.rng.below(10) {
                    0 => MAX_MESSAGE as u64 + 1,
                    1 => MAX_MESSAGE as u64,
                    _ => self.rng.below(64),
                }
            }
            Target::Nobody => length(&mut self.rng),
        };
        if target == Target::Nobody && self.rng.chance(50) {
            let va = self.mem.pointer(&mut self.rng);
            return (va, len, false);
        }
        let (va, readable) = self.mem.answer_place(&mut self.rng, len.min(PAGE));
        if readable && self.mem.in_scratch(va, len) {
            let n = len.min(64) as usize;
            self.scratch_write(va, &bytes[..n]);
        }
        (va, len, readable && self.mem.readable(va, len))
    }

    // --- The shots ----------------------------------------------------------

    /// REPLY_RECV: answer (or not) and wait, with every kind of buffer.
    fn reply_recv_shot(&mut self) {
        let (token, target) = self.pick_token();
        let (va, len, readable) = self.answer(target);
        let answered = readable && len <= MAX_MESSAGE as u64 && target != Target::Nobody;
        let exit_after = if answered && target == Target::Exit {
            None
        } else {
            self.exit_token
        };
        let client_after = if answered && target == Target::Client {
            None
        } else {
            self.client_token
        };
        let mask = self.rx.mask(&mut self.rng);
        let mask = self.guard(mask, exit_after, client_after);
        let (buf, cap) = self
            .mem
            .receive_place(&mut self.rng, EXIT_MESSAGE_MAX as u64);
        let r = self.sys(nr::REPLY_RECV, [token, va, len, mask, buf, cap]);
        if answered && target == Target::Exit {
            self.exits_answered_in_reply_recv += 1;
        }
        (self.exit_token, self.client_token) = (exit_after, client_after);
        self.receipt(r, buf, cap);
    }

    fn recv_shot(&mut self) {
        let mask = self.rx.mask(&mut self.rng);
        let mask = self.guard(mask, self.exit_token, self.client_token);
        let (buf, cap) = self
            .mem
            .receive_place(&mut self.rng, EXIT_MESSAGE_MAX as u64);
        let r = self.sys(nr::RECV, [mask, buf, cap, 0, 0, 0]);
        self.receipt(r, buf, cap);
    }

    fn reply_shot(&mut self) {
        let (token, target) = self.pick_token();
        let (va, len, _) = self.answer(target);
        let r = self.sys(nr::REPLY, [token, va, len, 0, 0, 0]);
        // Done, or the token is no more (the domain ended): either way
        // nothing waits for it now.
        if r.status == 0 || r.status == SysError::BadToken as u64 {
            match target {
                Target::Exit => self.exit_token = None,
                Target::Client => self.client_token = None,
                Target::Nobody => {}
            }
        }
    }

    /// CALL, mostly to the echo server, with every kind of message and
    /// reply buffer.
    fn call_shot(&mut self) {
        let h = if self.rng.chance(80) {
            u64::from(self.echo)
        } else {
            handle_slot(&mut self.rng, self.given)
        };
        let len = if self.rng.chance(80) {
            self.rng.below(MAX_MESSAGE as u64 + 2)
        } else {
            length(&mut self.rng)
        };
        let (va, _) = self.mem.answer_place(&mut self.rng, len.min(PAGE));
        let (reply, cap) = self
            .mem
            .receive_place(&mut self.rng, EXIT_MESSAGE_MAX as u64);
        self.sys(nr::CALL, [h, va, len, reply, cap, 0]);
    }

    /// NOTIFY and WAIT, on the notification and on other slots.
    fn notification_shot(&mut self) {
        let slot = if self.rng.chance(60) {
            u64::from(self.rx.note)
        } else {
            handle_slot(&mut self.rng, self.given)
        };
        if self.rng.chance(50) {
            let bits = number(&mut self.rng);
            let r = self.sys(nr::NOTIFY, [slot, bits, 0, 0, 0, 0]);
            if r.status == 0 && slot == u64::from(self.rx.note) && bits != 0 {
                self.signalled = true;
            }
        } else {
            // WAIT on the notification returns at once only with bits.
            if slot == u64::from(self.rx.note) && !self.signalled {
                let bits = 1 | self.rng.next_u64();
                self.signal_self(bits);
            }
            let r = self.sys(nr::WAIT, [slot, 0, 0, 0, 0, 0]);
            if r.status == 0 {
                self.signalled = false;
            }
        }
    }

    /// Any call but the four that could block or end the fuzzer, with
    /// arguments from every menu; calls on its domain name it half the time.
    fn random_call(&mut self) {
        let n = call_number(&mut self.rng);
        let mut a = [0u64; 6];
        for x in &mut a {
            *x = match self.rng.below(10) {
                0..=2 => handle_slot(&mut self.rng, self.given),
                3..=5 => self.mem.pointer(&mut self.rng),
                6 | 7 => length(&mut self.rng),
                _ => number(&mut self.rng),
            };
        }
        let domain_call = (nr::DOMAIN_CREATE..=nr::DOMAIN_WATCH).contains(&n) || n == nr::VCPU_INFO;
        if let Some((h, id)) = self.domain
            && domain_call
            && self.rng.chance(50)
        {
            a[0] = u64::from(h);
            a[1] = u64::from(id);
            if matches!(
                n,
                nr::VIEW_DESTROY | nr::VIEW_SET_VISIBLE | nr::VCPU_SET_VIEW
            ) {
                a[2] = self.view();
            }
            if n == nr::VCPU_SET_VIEW {
                (a[2], a[3]) = (0, self.view());
            }
        }
        if n == nr::EPT_OPS && self.rng.chance(60) {
            (a[2], a[3]) = self.ept_batch();
        }
        self.keep_the_guest_alive(n, &mut a);
        // Closing one of its own handles would cut the fuzzer off from what
        // it checks (its shared frames, its endpoints): HANDLE_CLOSE names
        // only slots it never held, or none at all.
        if n == nr::HANDLE_CLOSE && a[0] < self.given {
            a[0] = self.given + self.rng.below(64);
        }
        let r = self.sys(n, a);
        if n == nr::FRAMES_UNMAP && r.status == 0 {
            self.restore_scratch();
        }
        if n == nr::NOTIFY && r.status == 0 && a[0] == u64::from(self.rx.note) && a[1] != 0 {
            self.signalled = true;
        }
        if n == nr::VIEW_CREATE && r.status == 0 {
            let i = self.rng.below(4) as usize;
            self.views[i] = r.rdi as u16;
        }
    }

    /// The fuzzer's domain must keep exiting for the fast paths to be
    /// exercised: it is never destroyed before the end, its image (above
    /// 1 MiB) is never written, and the #VE information page never lands on
    /// it. (Everything else, including pausing it, is fair.)
    fn keep_the_guest_alive(&mut self, n: u64, a: &mut [u64; 6]) {
        const IMAGE: core::ops::Range<u64> = 0x10_0000..1 << 32;
        match n {
            nr::DOMAIN_CONTROL if a[2] == DomainOp::Destroy as u64 => a[2] = 5,
            nr::DOMAIN_WRITE if IMAGE.contains(&a[2]) => a[2] %= PAGE,
            nr::VCPU_CONTROL if a[3] == 0 && IMAGE.contains(&a[4].saturating_mul(PAGE)) => {
                a[4] %= 8
            }
            _ => {}
        }
    }

    /// A view number: one the fuzzer created, view 0, the edges, random.
    fn view(&mut self) -> u64 {
        match self.rng.below(6) {
            0..=2 => u64::from(self.rng.pick(&self.views)),
            3 => 0,
            4 => self.rng.pick(&[511, 512, 0xffff, 0x1_0000]),
            _ => self.rng.next_u64(),
        }
    }

    /// A batch of EPT operations, encoded into the scratch window: (address,
    /// length).
    fn ept_batch(&mut self) -> (u64, u64) {
        let mut ops: BoundedVec<EptOp, MAX_EPT_OPS> = BoundedVec::new();
        let count = self.rng.below(MAX_EPT_OPS as u64 + 1);
        for _ in 0..count {
            let view = self.view() as u16;
            let gfn = match self.rng.below(4) {
                0 => self.rng.below(0x1000),
                1 => number(&mut self.rng),
                _ => self.rng.below(8),
            };
            let perms = Perms {
                read: self.rng.chance(70),
                write: self.rng.chance(50),
                execute: self.rng.chance(50),
            };
            let op = match self.rng.below(8) {
                0 => EptOp::Map {
                    view,
                    gfn,
                    from_gfn: if self.rng.chance(80) {
                        gfn
                    } else {
                        number(&mut self.rng)
                    },
                    perms,
                },
                1 => EptOp::Unmap { view, gfn },
                2 => EptOp::Protect { view, gfn, perms },
                3 => EptOp::ProtectRange {
                    view,
                    gfn,
                    count: length(&mut self.rng),
                    perms,
                },
                4 => EptOp::SetSuppressVe {
                    view,
                    gfn,
                    suppress: self.rng.chance(50),
                },
                5 => EptOp::Split { view, gfn },
                6 => EptOp::CopyHost { view },
                _ => EptOp::Query { view, gfn },
            };
            let _ = ops.0.push(op);
        }
        let mut bytes = [0u8; 1024];
        let n = postcard::to_slice(&ops, &mut bytes).map_or(0, |b| b.len());
        let va = self.mem.inner_page(&mut self.rng);
        self.scratch_write(va, &bytes[..n]);
        (va, n as u64)
    }

    // --- The check ------------------------------------------------------------

    /// Takes messages (answering exits that have no plain answer) until it
    /// holds both an exit with a plain answer and the client's call.
    fn hold_an_exit_and_the_call(&mut self) {
        let buf = SCRATCH_VA + PAGE;
        loop {
            if self.client_token.is_some() && self.exit_token.is_some() {
                let mut out = [0u8; 64];
                let n = self.exit_answer(&mut out);
                if ipc_schema::exitcodec::plain_shape(&out[..n]).is_some() {
                    return;
                }
                let token = self.exit_token.take().unwrap_or(0);
                let at = SCRATCH_VA + 2 * PAGE;
                self.scratch_write(at, &out[..n]);
                self.sys(nr::REPLY, [token, at, n as u64, 0, 0, 0]);
            }
            let r = self.sys(
                nr::RECV,
                [1 << self.rx.inbox, buf, MAX_MESSAGE as u64, 0, 0, 0],
            );
            self.receipt(r, buf, MAX_MESSAGE as u64);
        }
    }

    /// REPLY_RECV answering an exit with the receive buffer 4 bytes below
    /// the answer's page, whose frame (frame 1 of `buffer`) has frame 0
    /// just below it physically; frame 0 is mapped elsewhere, the page below
    /// the answer not at all. The next exit must be refused (BadAddress:
    /// four of its bytes would fall on an unmapped page), never written
    /// through the answer page's frame and so into frame 0.
    fn exit_buffer_below_a_page(&mut self) {
        const ANSWER: u64 = MAP_BASE + (1 << 29) + 16 * PAGE;
        const BELOW: u64 = MAP_BASE + (1 << 29) + 64 * PAGE;
        const MARK: [u8; 16] = [0xa5; 16];
        const TRIES: u32 = 32;
        let b = u64::from(self.buffer);
        let mapped = self.sys(nr::FRAMES_MAP, [b, 1, 1, ANSWER, 1, 0]).status == 0
            && self.sys(nr::FRAMES_MAP, [b, 0, 1, BELOW, 1, 0]).status == 0;
        if !mapped {
            self.check(
                "mapping the frames of the exit-buffer check",
                false,
                "FRAMES_MAP refused",
            );
            return;
        }
        let mark_at = (BELOW + PAGE - MARK.len() as u64) as *mut u8;
        // Safety: BELOW maps frame 0 of the fuzzer's own buffer, writable.
        unsafe { core::ptr::copy_nonoverlapping(MARK.as_ptr(), mark_at, MARK.len()) };
        let (mut refused, mut taken, mut wrote_below) = (0u32, 0u32, 0u32);
        for _ in 0..TRIES {
            self.hold_an_exit_and_the_call();
            let mut out = [0u8; 64];
            let n = self.exit_answer(&mut out);
            // Safety: ANSWER maps frame 1 of the buffer, writable; n <= 64.
            unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), ANSWER as *mut u8, n) };
            let token = self.exit_token.take().unwrap_or(0);
            let r = self.sys(
                nr::REPLY_RECV,
                [
                    token,
                    ANSWER,
                    n as u64,
                    1 << self.rx.inbox,
                    ANSWER - 4,
                    EXIT_MESSAGE_MAX as u64,
                ],
            );
            let mut now = [0u8; 16];
            // Safety: as above, read back.
            unsafe { core::ptr::copy_nonoverlapping(mark_at, now.as_mut_ptr(), now.len()) };
            if now != MARK {
                wrote_below += 1;
                // Safety: as above.
                unsafe { core::ptr::copy_nonoverlapping(MARK.as_ptr(), mark_at, MARK.len()) };
            }
            match SysError::from_raw(r.status) {
                Some(SysError::BadAddress) => refused += 1,
                Some(SysError::Ok) => {
                    taken += 1;
                    if r.rsi >> 63 != 0 {
                        self.exit_token = Some(r.rsi);
                        self.last_exit = None;
                    }
                }
                other => defmt::warn!("fuzz: the exit-buffer check got {}", other),
            }
        }
        defmt::info!(
            "fuzz: REPLY_RECV {=u32} times with the receive buffer 4 bytes below the answer's page: {=u32} refused with BadAddress, {=u32} taken, the frame below written {=u32} times",
            TRIES,
            refused,
            taken,
            wrote_below
        );
        self.check(
            "an exit buffer just below the answer's page",
            refused == TRIES && wrote_below == 0,
            "every exit refused with BadAddress; the frame below untouched",
        );
        self.sys(nr::FRAMES_UNMAP, [ANSWER, 1, 0, 0, 0, 0]);
        self.sys(nr::FRAMES_UNMAP, [BELOW, 1, 0, 0, 0, 0]);
    }

    /// CALL to the echo server with the message and the reply buffer in
    /// one page (the kernel keeps that pair's translation: issue 15), then
    /// again, the same addresses, once the page is unmapped: the kernel must
    /// forget the pair with the mapping (a REPLY_RECV's pair goes with it).
    /// The second must be refused (BadAddress: no message there), and the
    /// frame that was mapped there (still the fuzzer's, mapped elsewhere
    /// too) never written.
    fn kept_buffers_unmapped(&mut self) {
        const PAGE_AT: u64 = MAP_BASE + (1 << 29) + 96 * PAGE;
        const SEEN_AT: u64 = MAP_BASE + (1 << 29) + 128 * PAGE;
        const BUF: u64 = 2048;
        const MARK: [u8; 64] = [0x5a; 64];
        const TRIES: u32 = 8;
        let (b, echo) = (u64::from(self.buffer), u64::from(self.echo));
        if self.sys(nr::FRAMES_MAP, [b, 1, 1, SEEN_AT, 1, 0]).status != 0 {
            self.check(
                "mapping the frame of the kept-pair check",
                false,
                "FRAMES_MAP refused",
            );
            return;
        }
        let seen = (SEEN_AT + BUF) as *mut u8;
        let (mut kept, mut refused, mut wrote) = (0u32, 0u32, 0u32);
        for i in 0..TRIES {
            if self.sys(nr::FRAMES_MAP, [b, 1, 1, PAGE_AT, 1, 0]).status != 0 {
                break;
            }
            // The pair kept: the call made and echoed through it.
            let message = [0x10 + i as u8; 8];
            // Safety: PAGE_AT maps frame 1 of the buffer, writable.
            unsafe { core::ptr::copy_nonoverlapping(message.as_ptr(), PAGE_AT as *mut u8, 8) };
            let r = self.sys(nr::CALL, [echo, PAGE_AT, 8, PAGE_AT + BUF, 64, 0]);
            let mut echoed = [0u8; 8];
            // Safety: as above.
            unsafe {
                core::ptr::copy_nonoverlapping((PAGE_AT + BUF) as *const u8, echoed.as_mut_ptr(), 8)
            };
            kept += u32::from(r.status == 0 && r.rdi == 8 && echoed == message);
            // The page gone, the same addresses again.
            self.sys(nr::FRAMES_UNMAP, [PAGE_AT, 1, 0, 0, 0, 0]);
            // Safety: SEEN_AT maps frame 1 of the buffer, writable.
            unsafe { core::ptr::copy_nonoverlapping(MARK.as_ptr(), seen, MARK.len()) };
            let r = self.sys(nr::CALL, [echo, PAGE_AT, 8, PAGE_AT + BUF, 64, 0]);
            let mut now = [0u8; 64];
            // Safety: as above, read back.
            unsafe { core::ptr::copy_nonoverlapping(seen, now.as_mut_ptr(), now.len()) };
            wrote += u32::from(now != MARK);
            refused += u32::from(SysError::from_raw(r.status) == Some(SysError::BadAddress));
        }
        defmt::info!(
            "fuzz: CALL {=u32} times through a kept message/reply pair, then through the same once unmapped: {=u32} echoed, {=u32} refused with BadAddress, the frame written {=u32} times",
            TRIES,
            kept,
            refused,
            wrote
        );
        self.check(
            "a kept message/reply pair unmapped",
            kept == TRIES && refused == TRIES && wrote == 0,
            "every call echoed, every one refused once unmapped; the frame untouched",
        );
        self.sys(nr::FRAMES_UNMAP, [PAGE_AT, 1, 0, 0, 0, 0]);
        self.sys(nr::FRAMES_UNMAP, [SEEN_AT, 1, 0, 0, 0, 0]);
    }

    /// Port numbers past `u64::MAX - size`, through a handle to port 0x80
    /// only: `port + size` wraps to a small number, which the kernel's
    /// check once compared with the handle's end (and then used the port's
    /// low 16 bits, 0xfffc to 0xffff). Each must be refused; the port the
    /// handle names must still work.
    fn ports_that_wrap(&mut self) {
        let Some(port) = handle("port") else {
            return;
        };
        let h = u64::from(port);
        let own = self.sys(nr::IO_IN, [h, 0x80, 1, 0, 0, 0]).status;
        let mut taken = 0;
        for (at, size) in [
            (u64::MAX - 1, 4),
            (u64::MAX - 3, 4),
            (u64::MAX, 1),
            (u64::MAX, 2),
        ] {
            let r = self.sys(nr::IO_IN, [h, at, size, 0, 0, 0]);
            let w = self.sys(nr::IO_OUT, [h, at, size, 0, 0, 0]);
            let bytes = [0u8; 4];
            let b = self.sys(nr::IO_OUT_BYTES, [h, at, bytes.as_ptr() as u64, size, 0, 0]);
            for status in [r.status, w.status, b.status] {
                if status != SysError::BadArgument as u64 {
                    taken += 1;
                }
            }
        }
        let derived = self
            .sys(nr::HANDLE_DERIVE, [h, u64::MAX, 2, 0, 0, 0])
            .status;
        // IO_OUT_BYTES with a buffer that wraps past the top, one longer
        // than it takes, and a good one.
        let bytes = [0u8; 4];
        let wraps = self
            .sys(nr::IO_OUT_BYTES, [h, 0x80, u64::MAX - 1, 16, 0, 0])
            .status;
        let long = self
            .sys(
                nr::IO_OUT_BYTES,
                [h, 0x80, bytes.as_ptr() as u64, IO_OUT_MAX + 1, 0, 0],
            )
            .status;
        let good = self
            .sys(nr::IO_OUT_BYTES, [h, 0x80, bytes.as_ptr() as u64, 4, 0, 0])
            .status;
        defmt::info!(
            "fuzz: port 0x80 through its handle: {}; ports that wrap past the top: {=u32} of 12 accesses not refused; a derived range that wraps: {}; IO_OUT_BYTES from a buffer that wraps: {}, of {=u64} bytes: {}, of 4 good ones: {}",
            SysError::from_raw(own),
            taken,
            SysError::from_raw(derived),
            SysError::from_raw(wraps),
            IO_OUT_MAX + 1,
            SysError::from_raw(long),
            SysError::from_raw(good)
        );
        self.check(
            "ports that wrap past u64::MAX",
            own == 0
                && taken == 0
                && derived == SysError::BadArgument as u64
                && wraps == SysError::BadAddress as u64
                && long == SysError::BadArgument as u64
                && good == 0,
            "every access refused with BadArgument; the handle's own port works",
        );
    }

    /// VIEW_DESTROY of the view the vCPU runs on (set by VCPU_SET_VIEW
    /// while its exit waits for an answer) is refused with Busy; once the
    /// vCPU is back on view 0, the view goes.
    fn view_in_use(&mut self) {
        let Some((h, id)) = self.domain else { return };
        let (h, id) = (u64::from(h), u64::from(id));
        self.hold_an_exit_and_the_call();
        let created = self.sys(nr::VIEW_CREATE, [h, id, 0, 0, 0, 0]);
        let view = created.rdi;
        let on_it = self.sys(nr::VCPU_SET_VIEW, [h, id, 0, view, 0, 0]).status;
        let busy = self.sys(nr::VIEW_DESTROY, [h, id, view, 0, 0, 0]).status;
        let back = self.sys(nr::VCPU_SET_VIEW, [h, id, 0, 0, 0, 0]).status;
        let gone = self.sys(nr::VIEW_DESTROY, [h, id, view, 0, 0, 0]).status;
        defmt::info!(
            "fuzz: view {=u64} created ({}), the vCPU put on it ({}), destroyed: {}; the vCPU back on view 0 ({}), destroyed: {}",
            view,
            SysError::from_raw(created.status),
            SysError::from_raw(on_it),
            SysError::from_raw(busy),
            SysError::from_raw(back),
            SysError::from_raw(gone)
        );
        self.check(
            "a view the vCPU runs on is not destroyed",
            created.status == 0
                && on_it == 0
                && busy == SysError::Busy as u64
                && back == 0
                && gone == 0,
            "Busy while the vCPU runs on it; destroyed once it does not",
        );
    }

    // --- The end --------------------------------------------------------------

    fn finish(mut self) -> ! {
        // Its domain ends here (destroyed: the system's run is still a
        // success), then its peers.
        if let Some((h, id)) = self.domain {
            let r = self.sys(
                nr::DOMAIN_CONTROL,
                [
                    u64::from(h),
                    u64::from(id),
                    DomainOp::Destroy as u64,
                    0,
                    0,
                    0,
                ],
            );
            self.check(
                "its domain destroyed at the end",
                r.status == 0,
                "DOMAIN_CONTROL Destroy done",
            );
            self.exit_token = None;
        }
        let mut reply = [0u8; MAX_MESSAGE];
        let echo = ipc::call_raw(self.echo, &STOP, &mut reply);
        self.check(
            "the echo server answers to the end",
            echo.is_ok_and(|n| reply[..n] == STOP),
            "STOP echoed; it ends",
        );
        let buf = SCRATCH_VA + PAGE;
        while self.client_token.is_none() {
            let r = self.sys(
                nr::RECV,
                [1 << self.rx.inbox, buf, MAX_MESSAGE as u64, 0, 0, 0],
            );
            self.receipt(r, buf, MAX_MESSAGE as u64);
        }
        let stopped = ipc::reply(self.client_token.take().unwrap_or(0), &STOP);
        self.check(
            "the client's call answered to the end",
            stopped.is_ok(),
            "STOP sent; it ends",
        );
        let t = self.tally.by_status;
        defmt::info!(
            "fuzz: {=u64} system calls made (seed {=u64:#x}): {=u64} done, {=u64} refused",
            self.calls,
            SEED,
            t[0],
            self.tally.total() - t[0]
        );
        defmt::info!(
            "fuzz: refused with UnknownCall {=u64}, NoSuchHandle {=u64}, WrongKind {=u64}, MissingRight {=u64}, BadAddress {=u64}, MessageTooLong {=u64}, ReplyTooLong {=u64}, Dead {=u64}, BadArgument {=u64}, NoResources {=u64}, BadToken {=u64}, Busy {=u64}, Unsupported {=u64}, OutOfScope {=u64}",
            t[1],
            t[2],
            t[3],
            t[4],
            t[5],
            t[6],
            t[7],
            t[8],
            t[9],
            t[10],
            t[11],
            t[12],
            t[13],
            t[14]
        );
        defmt::info!(
            "fuzz: {=u64} exits taken ({=u64} answered by REPLY_RECV), {=u64} calls from fuzz-client taken, {=u64} receives given the notification so as not to wait for ever",
            self.exits,
            self.exits_answered_in_reply_recv,
            self.client_calls,
            self.guarded
        );
        self.check(
            "every answer a SysError",
            self.tally.unknown() == 0,
            "no status outside SysError",
        );
        self.check(
            "both outcomes seen",
            t[0] > 0 && self.tally.total() > t[0],
            "calls done and calls refused",
        );
        if self.failed == 0 {
            defmt::info!("fuzz: all checks passed");
        } else {
            defmt::error!("fuzz: {=u64} check(s) failed", self.failed);
        }
        sys::exit(self.failed)
    }
}

/// fuzz-echo: answers each call with its message, until STOP.
fn echo() -> ! {
    let requests = require("requests");
    let mut buf = [0u8; MAX_MESSAGE];
    let mut out = [0u8; MAX_MESSAGE];
    let (mut token, mut len, mut served) = (0u64, 0usize, 0u64);
    loop {
        match ipc::reply_recv(token, &out[..len], 1 << requests, &mut buf) {
            Ok(Event::Message(m)) if m.bytes == STOP => {
                let _ = ipc::reply(m.token, &STOP);
                defmt::info!("fuzz-echo: stopped after {=u64} calls", served);
                sys::exit(0)
            }
            Ok(Event::Message(m)) => {
                served += 1;
                len = m.bytes.len();
                out[..len].copy_from_slice(m.bytes);
                token = m.token;
            }
            Ok(Event::Notified { .. }) | Err(_) => (token, len) = (0, 0),
        }
    }
}

/// fuzz-client: calls the fuzzer until it answers STOP.
fn client() -> ! {
    let server = require("server");
    let mut reply = [0u8; MAX_MESSAGE];
    let (mut calls, mut errors) = (0u64, 0u64);
    loop {
        calls += 1;
        match ipc::call_raw(server, &calls.to_le_bytes(), &mut reply) {
            Ok(n) if reply[..n] == STOP => {
                defmt::info!(
                    "fuzz-client: stopped after {=u64} calls ({=u64} failed)",
                    calls,
                    errors
                );
                sys::exit(0)
            }
            Ok(_) => {}
            Err(SysError::Dead) => {
                defmt::error!("fuzz-client: the fuzzer is gone");
                sys::exit(1)
            }
            Err(_) => errors += 1,
        }
    }
}
