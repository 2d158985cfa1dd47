//! The postcard encoding of [`ExitMessage`] and [`ExitReply`], written out by
//! hand for the exit path (every VM exit a service handles crosses it twice).
//!
//! The bytes are exactly postcard's: the property tests below check every
//! encoding against `postcard::to_slice` and every decoding, of valid and of
//! random bytes, against postcard's decoding of a whole message
//! (`take_from_bytes` with nothing left over: trailing bytes are an error). Use these where speed
//! matters and postcard anywhere else; the two interoperate.

use crate::vmexit::{
    AccessBits, EXIT_FIXED, Exit, ExitKind, ExitMessage, ExitRegs, ExitReply, Inject, Response,
    Then,
};
use postcard::experimental::max_size::MaxSize;

/// The longest exit message: a buffer this long takes any (the kernel
/// encodes an exit straight into its handler's buffer when it has room).
pub const EXIT_MESSAGE_MAX: usize = <ExitMessage as MaxSize>::POSTCARD_MAX_SIZE;

/// Writes bytes into a slice, failing (without panicking) when it is full.
/// It keeps the part not yet written (`rest`), so that each write is one
/// length check.
struct Out<'a> {
    rest: &'a mut [u8],
    len: usize,
}

impl<'a> Out<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        let len = buf.len();
        Out { rest: buf, len }
    }

    /// Bytes written so far.
    fn written(&self) -> usize {
        self.len - self.rest.len()
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) -> Option<()> {
        let (first, rest) = core::mem::take(&mut self.rest).split_first_mut()?;
        *first = b;
        self.rest = rest;
        Some(())
    }

    #[inline(always)]
    fn varint(&mut self, mut v: u64) -> Option<()> {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80)?;
            v >>= 7;
        }
        self.byte(v as u8)
    }

    #[inline(always)]
    fn bool(&mut self, b: bool) -> Option<()> {
        self.byte(u8::from(b))
    }

    /// A fixed-width register: 8 bytes, little-endian.
    #[inline(always)]
    fn word(&mut self, v: u64) -> Option<()> {
        let (first, rest) = core::mem::take(&mut self.rest).split_first_chunk_mut::<8>()?;
        *first = v.to_le_bytes();
        self.rest = rest;
        Some(())
    }

    #[inline(always)]
    fn access(&mut self, a: AccessBits) -> Option<()> {
        self.bool(a.read)?;
        self.bool(a.write)?;
        self.bool(a.execute)
    }
}

/// Reads bytes from a slice the way postcard's deserializer does, keeping
/// the part not yet read.
struct In<'a> {
    rest: &'a [u8],
}

impl In<'_> {
    #[inline(always)]
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    /// A varint of a `bits`-bit integer (16, 32 or 64): at most
    /// ceil(bits / 7) bytes, the last one holding no more than the bits
    /// that are left. Values below 128 (one byte: tags, small numbers)
    /// take the short way.
    #[inline(always)]
    fn varint(&mut self, bits: u32) -> Option<u64> {
        let (&b, rest) = self.rest.split_first()?;
        if b < 0x80 {
            self.rest = rest;
            return Some(u64::from(b));
        }
        // Out of line, taking and giving back the slice by value, so that
        // the common path keeps `rest` in registers.
        let (v, rest) = long_varint(self.rest, bits)?;
        self.rest = rest;
        Some(v)
    }

    /// A fixed-width register: 8 bytes, little-endian.
    #[inline(always)]
    fn word(&mut self) -> Option<u64> {
        let (w, rest) = self.rest.split_first_chunk::<8>()?;
        self.rest = rest;
        Some(u64::from_le_bytes(*w))
    }

    #[inline(always)]
    fn u16(&mut self) -> Option<u16> {
        self.varint(16).map(|v| v as u16)
    }

    #[inline(always)]
    fn u32(&mut self) -> Option<u32> {
        self.varint(32).map(|v| v as u32)
    }

    #[inline(always)]
    fn u64(&mut self) -> Option<u64> {
        self.varint(64)
    }

    #[inline(always)]
    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// An option's tag.
    #[inline(always)]
    fn some(&mut self) -> Option<bool> {
        self.bool()
    }

    #[inline(always)]
    fn access(&mut self) -> Option<AccessBits> {
        Some(AccessBits {
            read: self.bool()?,
            write: self.bool()?,
            execute: self.bool()?,
        })
    }

    #[inline(always)]
    fn end(&self) -> Option<()> {
        self.rest.is_empty().then_some(())
    }
}

/// A varint of more than one byte (see [`In::varint`]): the value and what
/// follows it.
#[inline(never)]
fn long_varint(mut rest: &[u8], bits: u32) -> Option<(u64, &[u8])> {
    let max = bits.div_ceil(7);
    let last_max = (1u64 << (bits % 7)) - 1;
    let mut out = 0u64;
    for i in 0..max {
        let (&b, tail) = rest.split_first()?;
        rest = tail;
        out |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i == max - 1 && u64::from(b) > last_max {
                return None;
            }
            let v = if bits == 64 {
                out
            } else {
                out & ((1 << bits) - 1)
            };
            return Some((v, rest));
        }
    }
    None
}

#[inline(always)]
fn put_kind(o: &mut Out<'_>, k: &ExitKind) -> Option<()> {
    match *k {
        ExitKind::Cpuid { leaf, subleaf } => {
            o.byte(0)?;
            o.varint(leaf.into())?;
            o.varint(subleaf.into())
        }
        ExitKind::Hypercall => o.byte(1),
        ExitKind::Io {
            port,
            size,
            write,
            value,
        } => {
            o.byte(2)?;
            o.varint(port.into())?;
            o.byte(size)?;
            o.bool(write)?;
            o.varint(value.into())
        }
        ExitKind::Hlt => o.byte(3),
        ExitKind::Rdmsr { msr } => {
            o.byte(4)?;
            o.varint(msr.into())
        }
        ExitKind::Wrmsr { msr, value } => {
            o.byte(5)?;
            o.varint(msr.into())?;
            o.word(value)
        }
        ExitKind::EptViolation {
            gpa,
            gla,
            access,
            allowed,
            qualification,
        } => {
            o.byte(6)?;
            o.word(gpa)?;
            match gla {
                Some(g) => {
                    o.byte(1)?;
                    o.word(g)?;
                }
                None => o.byte(0)?,
            }
            o.access(access)?;
            o.access(allowed)?;
            o.word(qualification)
        }
        ExitKind::EptMisconfig { gpa } => {
            o.byte(7)?;
            o.word(gpa)
        }
        ExitKind::TripleFault => o.byte(8),
        ExitKind::Vmfunc { leaf, index } => {
            o.byte(9)?;
            o.varint(leaf.into())?;
            o.varint(index.into())
        }
        ExitKind::Xsetbv { index, value } => {
            o.byte(10)?;
            o.varint(index.into())?;
            o.word(value)
        }
        ExitKind::Other {
            reason,
            qualification,
        } => {
            o.byte(11)?;
            o.varint(reason.into())?;
            o.word(qualification)
        }
        ExitKind::MonitorTrap => o.byte(12),
        ExitKind::Start => o.byte(13),
        ExitKind::PmlFull { buffer, entries } => {
            o.byte(14)?;
            o.byte(buffer)?;
            o.varint(entries.into())
        }
        ExitKind::InterruptWindow => o.byte(15),
        ExitKind::Deadline => o.byte(16),
        ExitKind::ApicWrite { offset, value } => {
            o.byte(17)?;
            o.varint(offset.into())?;
            o.word(value)
        }
    }
}

/// Reads an exit kind into `out`, each variant written where it goes (no
/// value of the whole enum assembled and copied: that costs more than the
/// decoding on the exit path).
#[inline(always)]
fn take_kind_into(i: &mut In<'_>, out: &mut ExitKind) -> Option<()> {
    match i.u32()? {
        0 => {
            *out = ExitKind::Cpuid {
                leaf: i.u32()?,
                subleaf: i.u32()?,
            }
        }
        1 => *out = ExitKind::Hypercall,
        2 => {
            *out = ExitKind::Io {
                port: i.u16()?,
                size: i.byte()?,
                write: i.bool()?,
                value: i.u32()?,
            }
        }
        3 => *out = ExitKind::Hlt,
        4 => *out = ExitKind::Rdmsr { msr: i.u32()? },
        5 => {
            *out = ExitKind::Wrmsr {
                msr: i.u32()?,
                value: i.word()?,
            }
        }
        6 => {
            *out = ExitKind::EptViolation {
                gpa: i.word()?,
                gla: if i.some()? { Some(i.word()?) } else { None },
                access: i.access()?,
                allowed: i.access()?,
                qualification: i.word()?,
            }
        }
        7 => *out = ExitKind::EptMisconfig { gpa: i.word()? },
        8 => *out = ExitKind::TripleFault,
        9 => {
            *out = ExitKind::Vmfunc {
                leaf: i.u32()?,
                index: i.u32()?,
            }
        }
        10 => {
            *out = ExitKind::Xsetbv {
                index: i.u32()?,
                value: i.word()?,
            }
        }
        11 => {
            *out = ExitKind::Other {
                reason: i.u16()?,
                qualification: i.word()?,
            }
        }
        12 => *out = ExitKind::MonitorTrap,
        13 => *out = ExitKind::Start,
        14 => {
            *out = ExitKind::PmlFull {
                buffer: i.byte()?,
                entries: i.u16()?,
            }
        }
        15 => *out = ExitKind::InterruptWindow,
        16 => *out = ExitKind::Deadline,
        17 => {
            *out = ExitKind::ApicWrite {
                offset: i.u16()?,
                value: i.word()?,
            }
        }
        _ => return None,
    }
    Some(())
}

#[inline(always)]
fn put_regs(o: &mut Out<'_>, r: &ExitRegs) -> Option<()> {
    o.word(r.rax)?;
    o.word(r.rbx)?;
    o.word(r.rcx)?;
    o.word(r.rdx)
}

#[inline(always)]
fn take_regs(i: &mut In<'_>) -> Option<ExitRegs> {
    Some(ExitRegs {
        rax: i.word()?,
        rbx: i.word()?,
        rcx: i.word()?,
        rdx: i.word()?,
    })
}

/// Encodes `m` into `out`; returns the length, or `None` if it does not fit.
pub fn encode_message(m: &ExitMessage, out: &mut [u8]) -> Option<usize> {
    encode_exit(&m.exit, &m.regs, out)
}

/// Encodes the [`ExitMessage`] of `e` and `regs` (without building one).
#[inline(always)]
pub fn encode_exit(e: &Exit, regs: &ExitRegs, out: &mut [u8]) -> Option<usize> {
    let (fixed, rest) = out.split_first_chunk_mut::<EXIT_FIXED>()?;
    fixed[0..8].copy_from_slice(&regs.rax.to_le_bytes());
    fixed[8..16].copy_from_slice(&regs.rbx.to_le_bytes());
    fixed[16..24].copy_from_slice(&regs.rcx.to_le_bytes());
    fixed[24..32].copy_from_slice(&regs.rdx.to_le_bytes());
    fixed[32..34].copy_from_slice(&e.domain.to_le_bytes());
    fixed[34..36].copy_from_slice(&e.vcpu.to_le_bytes());
    fixed[36..38].copy_from_slice(&e.view.to_le_bytes());
    fixed[38] = e.instruction_len;
    fixed[39..47].copy_from_slice(&e.rip.to_le_bytes());
    // (A hypercall's kind, its tag alone, without the general encoder: the
    // exit the fast paths carry most.)
    if let ExitKind::Hypercall = e.kind {
        *rest.first_mut()? = 1;
        return Some(EXIT_FIXED + 1);
    }
    let mut o = Out::new(rest);
    put_kind(&mut o, &e.kind)?;
    Some(EXIT_FIXED + o.written())
}

/// Decodes an exit message (all of `bytes`: trailing bytes are an error).
pub fn decode_message(bytes: &[u8]) -> Option<ExitMessage> {
    let mut m = ExitMessage::default();
    decode_message_into(bytes, &mut m)?;
    Some(m)
}

/// [`decode_message`] into `m`, field by field (a receive loop keeps one
/// message and decodes every exit into it, with no copy of the result).
/// On `None`, `m` holds part of the bad message.
#[inline]
pub fn decode_message_into(bytes: &[u8], m: &mut ExitMessage) -> Option<()> {
    let (fixed, rest) = bytes.split_first_chunk::<EXIT_FIXED>()?;
    let word = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8 bytes"));
    let half = |at: usize| u16::from_le_bytes([fixed[at], fixed[at + 1]]);
    m.regs = ExitRegs {
        rax: word(0),
        rbx: word(8),
        rcx: word(16),
        rdx: word(24),
    };
    let e = &mut m.exit;
    e.domain = half(32);
    e.vcpu = half(34);
    e.view = half(36);
    e.instruction_len = fixed[38];
    e.rip = word(39);
    let mut i = In { rest };
    take_kind_into(&mut i, &mut e.kind)?;
    i.end()
}

/// The length of a hypercall's exit message: the fixed part and the
/// kind's tag (`ExitKind::Hypercall` carries nothing).
pub const HYPERCALL_MESSAGE: usize = EXIT_FIXED + 1;

/// A hypercall's exit message, read where it lies ([`hypercall`]): its
/// registers and its domain without decoding the rest, for a handler's
/// short way through the commonest exit (the vmm's service calls).
#[derive(Clone, Copy, Debug)]
pub struct HypercallMessage<'a>(&'a [u8; HYPERCALL_MESSAGE]);

impl HypercallMessage<'_> {
    #[inline(always)]
    fn word(&self, at: usize) -> u64 {
        let (w, _) = self.0[at..]
            .split_first_chunk::<8>()
            .expect("within the fixed part");
        u64::from_le_bytes(*w)
    }

    /// RAX (the hypercall's number).
    #[inline(always)]
    pub fn rax(&self) -> u64 {
        self.word(0)
    }

    #[inline(always)]
    pub fn regs(&self) -> ExitRegs {
        ExitRegs {
            rax: self.word(0),
            rbx: self.word(8),
            rcx: self.word(16),
            rdx: self.word(24),
        }
    }

    #[inline(always)]
    pub fn domain(&self) -> u16 {
        u16::from_le_bytes([self.0[32], self.0[33]])
    }
}

/// `bytes` as a hypercall's exit message: `Some` exactly where
/// [`decode_message`] reads an [`ExitKind::Hypercall`] exit from them
/// (any [`HYPERCALL_MESSAGE`] bytes whose last, the kind's tag, is 1).
#[inline(always)]
pub fn hypercall(bytes: &[u8]) -> Option<HypercallMessage<'_>> {
    let b: &[u8; HYPERCALL_MESSAGE] = bytes.try_into().ok()?;
    (b[EXIT_FIXED] == 1).then_some(HypercallMessage(b))
}

/// The length of a plain answer's encoding without and with registers.
const PLAIN: usize = 7;
const PLAIN_REGS: usize = PLAIN + 32;

/// Whether `r` is a plain answer: resume (moving past the instruction or
/// not), perhaps with new registers, and nothing else: no event, no view,
/// no step, no RIP. Nearly every exit gets one (CPUID, port I/O, MSRs,
/// hypercalls, a lazily filled page), so it has a short way both ways
/// ([`plain_reply`]).
#[inline]
pub fn is_plain(r: &ExitReply) -> bool {
    r.response.inject.is_none()
        && r.response.then == Then::Resume
        && r.view.is_none()
        && !r.step
        && r.rip.is_none()
}

/// A plain answer (see [`is_plain`]) read from its bytes, without building
/// an [`ExitReply`]: `(advance, registers)`, or `None` when `bytes` are
/// anything else (which [`decode_reply`] then reads, or refuses).
#[inline(always)]
pub fn plain_reply(bytes: &[u8]) -> Option<(bool, Option<ExitRegs>)> {
    let (advance, with_regs) = plain_shape(bytes)?;
    Some((advance, if with_regs { plain_regs(bytes) } else { None }))
}

/// The shape of a plain answer: `(advance, whether it carries
/// registers)`, or `None` when `bytes` are not a plain answer.
#[inline(always)]
pub fn plain_shape(bytes: &[u8]) -> Option<(bool, bool)> {
    // advance (0 or 1), inject: None, then: Resume, regs (None, or Some and
    // 32 bytes), then view: None, step: false, rip: None: the first four
    // bytes and the last three, read as two words.
    let regs = match bytes.len() {
        PLAIN => false,
        PLAIN_REGS => true,
        _ => return None,
    };
    let head = u32::from_le_bytes(*bytes.first_chunk::<4>()?);
    let tail = u32::from_le_bytes(*bytes.last_chunk::<4>()?) >> 8;
    (head & !1 == u32::from(regs) << 24 && tail == 0).then_some((head & 1 == 1, regs))
}

/// Whether `bytes` are an answer a *restricted* holder of an exit (one
/// forwarded to it, docs/ipc.md) may give: plain, with or without a view,
/// but no registers and no advance (no RIP change, injection or step).
pub fn restricted_ok(bytes: &[u8]) -> bool {
    matches!(plain_shape(bytes), Some((false, false)))
        || matches!(plain_view_shape(bytes), Some((false, false, _)))
}

/// A plain answer (with registers or without) that also moves the vCPU to
/// another view (below 16,384): `(advance, whether it carries registers,
/// view)`, or `None` for anything else. The altp2m service answers the
/// view-switch hypercall and a listener's `SwitchView` this way, and the
/// kernel's fast path takes it like a plain one.
#[inline(always)]
pub fn plain_view_shape(bytes: &[u8]) -> Option<(bool, bool, u16)> {
    let (advance, with_regs, tail) = match *bytes {
        [a @ (0 | 1), 0, 0, 0, ref tail @ ..] => (a, false, tail),
        [a @ (0 | 1), 0, 0, 1, ..] => (a, true, bytes.get(PLAIN_REGS - 3..)?),
        _ => return None,
    };
    let view = match *tail {
        [1, v, 0, 0] if v < 0x80 => u16::from(v),
        [1, lo, hi @ 1..=0x7f, 0, 0] if lo >= 0x80 => u16::from(lo & 0x7f) | u16::from(hi) << 7,
        _ => return None,
    };
    Some((advance == 1, with_regs, view))
}

/// The registers of a plain answer that carries them ([`plain_shape`]
/// or [`plain_view_shape`] said so).
#[inline(always)]
pub fn plain_regs(bytes: &[u8]) -> Option<ExitRegs> {
    let mut i = In {
        rest: bytes.get(4..PLAIN_REGS - 3)?,
    };
    take_regs(&mut i)
}

/// Encodes the [`ExitReply`] of a handler that only answers (`response`,
/// and `regs` if it changed them; no view, step or RIP), without building
/// one: what an exit handler such as the vmm sends for nearly every exit.
#[inline]
pub fn encode_answer(
    response: &Response,
    regs: Option<&ExitRegs>,
    out: &mut [u8],
) -> Option<usize> {
    if response.inject.is_none() && response.then == Then::Resume {
        return encode_plain(response.advance, regs, out);
    }
    encode_reply(
        &ExitReply {
            response: *response,
            regs: regs.copied(),
            view: None,
            step: false,
            rip: None,
        },
        out,
    )
}

/// Encodes `r` into `out`; returns the length, or `None` if it does not fit.
/// A retry in another view below 128 (the altp2m service's answer to a
/// listener's `SwitchView`) and a plain answer are written straight out;
/// anything else field by field.
pub fn encode_reply(r: &ExitReply, out: &mut [u8]) -> Option<usize> {
    if let ExitReply {
        response: Response::RETRY,
        regs: None,
        view: Some(v @ 0..0x80),
        step: false,
        rip: None,
    } = *r
    {
        // advance, inject (None), then (Resume), regs (None), view (Some,
        // one varint byte), step, rip (None).
        *out.first_chunk_mut::<8>()? = [0, 0, 0, 0, 1, v as u8, 0, 0];
        return Some(8);
    }
    if is_plain(r) {
        return encode_plain(r.response.advance, r.regs.as_ref(), out);
    }
    let mut o = Out::new(out);
    let p = &r.response;
    o.bool(p.advance)?;
    match p.inject {
        None => o.byte(0)?,
        Some(Inject::Exception { vector, error_code }) => {
            o.byte(1)?;
            o.byte(0)?;
            o.byte(vector)?;
            match error_code {
                None => o.byte(0)?,
                Some(c) => {
                    o.byte(1)?;
                    o.varint(c.into())?;
                }
            }
        }
        Some(Inject::Interrupt { vector }) => {
            o.byte(1)?;
            o.byte(1)?;
            o.byte(vector)?;
        }
    }
    match p.then {
        Then::Resume => o.byte(0)?,
        Then::Block => o.byte(1)?,
        Then::Exit { status } => {
            o.byte(2)?;
            o.varint(status.into())?;
        }
        Then::Crash => o.byte(3)?,
        Then::ResumeUntil { window, deadline } => {
            o.byte(4)?;
            o.bool(window)?;
            o.varint(deadline)?;
        }
        Then::BlockUntil { deadline } => {
            o.byte(5)?;
            o.varint(deadline)?;
        }
    }
    match &r.regs {
        None => o.byte(0)?,
        Some(regs) => {
            o.byte(1)?;
            put_regs(&mut o, regs)?;
        }
    }
    match r.view {
        None => o.byte(0)?,
        Some(v) => {
            o.byte(1)?;
            o.varint(v.into())?;
        }
    }
    o.bool(r.step)?;
    match r.rip {
        None => o.byte(0)?,
        Some(rip) => {
            o.byte(1)?;
            o.varint(rip)?;
        }
    }
    Some(o.written())
}

/// The encoding of a plain answer, written straight out.
#[inline]
fn encode_plain(advance: bool, regs: Option<&ExitRegs>, out: &mut [u8]) -> Option<usize> {
    let Some(r) = regs else {
        let out = out.get_mut(..PLAIN)?;
        out.copy_from_slice(&[u8::from(advance), 0, 0, 0, 0, 0, 0]);
        return Some(PLAIN);
    };
    let out: &mut [u8; PLAIN_REGS] = out.get_mut(..PLAIN_REGS)?.try_into().ok()?;
    // advance, inject: None, then: Resume, regs: Some (one store).
    out[..4].copy_from_slice(&(u32::from(advance) | 1 << 24).to_le_bytes());
    out[4..12].copy_from_slice(&r.rax.to_le_bytes());
    out[12..20].copy_from_slice(&r.rbx.to_le_bytes());
    out[20..28].copy_from_slice(&r.rcx.to_le_bytes());
    out[28..36].copy_from_slice(&r.rdx.to_le_bytes());
    out[36..].copy_from_slice(&[0, 0, 0]);
    Some(PLAIN_REGS)
}

/// Decodes an exit reply (all of `bytes`: trailing bytes are an error).
pub fn decode_reply(bytes: &[u8]) -> Option<ExitReply> {
    if let Some((advance, regs)) = plain_reply(bytes) {
        return Some(ExitReply {
            response: Response {
                advance,
                inject: None,
                then: Then::Resume,
            },
            regs,
            view: None,
            step: false,
            rip: None,
        });
    }
    let mut i = In { rest: bytes };
    let advance = i.bool()?;
    let inject = if i.some()? {
        match i.u32()? {
            0 => Some(Inject::Exception {
                vector: i.byte()?,
                error_code: if i.some()? { Some(i.u32()?) } else { None },
            }),
            1 => Some(Inject::Interrupt { vector: i.byte()? }),
            _ => return None,
        }
    } else {
        None
    };
    let then = match i.u32()? {
        0 => Then::Resume,
        1 => Then::Block,
        2 => Then::Exit { status: i.u32()? },
        3 => Then::Crash,
        4 => Then::ResumeUntil {
            window: i.bool()?,
            deadline: i.u64()?,
        },
        5 => Then::BlockUntil { deadline: i.u64()? },
        _ => return None,
    };
    let regs = if i.some()? {
        Some(take_regs(&mut i)?)
    } else {
        None
    };
    let view = if i.some()? { Some(i.u16()?) } else { None };
    let step = i.bool()?;
    let rip = if i.some()? { Some(i.u64()?) } else { None };
    i.end()?;
    Some(ExitReply {
        response: Response {
            advance,
            inject,
            then,
        },
        regs,
        view,
        step,
        rip,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Postcard's decoding of a whole message.
    fn whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
        match postcard::take_from_bytes::<T>(bytes) {
            Ok((v, [])) => Some(v),
            _ => None,
        }
    }

    fn access() -> impl Strategy<Value = AccessBits> {
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(read, write, execute)| {
            AccessBits {
                read,
                write,
                execute,
            }
        })
    }

    pub(crate) fn kind() -> impl Strategy<Value = ExitKind> {
        prop_oneof![
            (any::<u32>(), any::<u32>())
                .prop_map(|(leaf, subleaf)| ExitKind::Cpuid { leaf, subleaf }),
            Just(ExitKind::Hypercall),
            (any::<u16>(), any::<u8>(), any::<bool>(), any::<u32>()).prop_map(
                |(port, size, write, value)| ExitKind::Io {
                    port,
                    size,
                    write,
                    value
                }
            ),
            Just(ExitKind::Hlt),
            any::<u32>().prop_map(|msr| ExitKind::Rdmsr { msr }),
            (any::<u32>(), any::<u64>()).prop_map(|(msr, value)| ExitKind::Wrmsr { msr, value }),
            (
                any::<u64>(),
                any::<Option<u64>>(),
                access(),
                access(),
                any::<u64>()
            )
                .prop_map(|(gpa, gla, access, allowed, qualification)| {
                    ExitKind::EptViolation {
                        gpa,
                        gla,
                        access,
                        allowed,
                        qualification,
                    }
                }),
            any::<u64>().prop_map(|gpa| ExitKind::EptMisconfig { gpa }),
            Just(ExitKind::TripleFault),
            (any::<u32>(), any::<u32>()).prop_map(|(leaf, index)| ExitKind::Vmfunc { leaf, index }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(index, value)| ExitKind::Xsetbv { index, value }),
            (any::<u16>(), any::<u64>()).prop_map(|(reason, qualification)| ExitKind::Other {
                reason,
                qualification
            }),
            Just(ExitKind::MonitorTrap),
            Just(ExitKind::Start),
            (any::<u8>(), any::<u16>())
                .prop_map(|(buffer, entries)| ExitKind::PmlFull { buffer, entries }),
            Just(ExitKind::InterruptWindow),
            Just(ExitKind::Deadline),
            (any::<u16>(), any::<u64>())
                .prop_map(|(offset, value)| ExitKind::ApicWrite { offset, value }),
        ]
    }

    fn regs() -> impl Strategy<Value = ExitRegs> {
        proptest::array::uniform4(any::<u64>()).prop_map(|r| ExitRegs {
            rax: r[0],
            rbx: r[1],
            rcx: r[2],
            rdx: r[3],
        })
    }

    fn message() -> impl Strategy<Value = ExitMessage> {
        (
            any::<u16>(),
            any::<u16>(),
            kind(),
            any::<u64>(),
            any::<u8>(),
            any::<u16>(),
            regs(),
        )
            .prop_map(|(domain, vcpu, kind, rip, instruction_len, view, regs)| {
                ExitMessage {
                    exit: Exit {
                        domain,
                        vcpu,
                        kind,
                        rip,
                        instruction_len,
                        view,
                    },
                    regs,
                }
            })
    }

    fn reply() -> impl Strategy<Value = ExitReply> {
        let inject = proptest::option::of(prop_oneof![
            (any::<u8>(), any::<Option<u32>>())
                .prop_map(|(vector, error_code)| Inject::Exception { vector, error_code }),
            any::<u8>().prop_map(|vector| Inject::Interrupt { vector }),
        ]);
        let then = prop_oneof![
            Just(Then::Resume),
            Just(Then::Block),
            any::<u32>().prop_map(|status| Then::Exit { status }),
            Just(Then::Crash),
            (any::<bool>(), any::<u64>())
                .prop_map(|(window, deadline)| Then::ResumeUntil { window, deadline }),
            any::<u64>().prop_map(|deadline| Then::BlockUntil { deadline }),
        ];
        (
            any::<bool>(),
            inject,
            then,
            proptest::option::of(regs()),
            any::<Option<u16>>(),
            any::<bool>(),
            any::<Option<u64>>(),
        )
            .prop_map(|(advance, inject, then, regs, view, step, rip)| ExitReply {
                response: Response {
                    advance,
                    inject,
                    then,
                },
                regs,
                view,
                step,
                rip,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn messages_encode_exactly_as_postcard(m in message()) {
            let mut a = [0u8; 128];
            let mut b = [0u8; 128];
            let n = encode_message(&m, &mut a).unwrap();
            let p = postcard::to_slice(&m, &mut b).unwrap();
            prop_assert_eq!(&a[..n], &*p);
            prop_assert_eq!(decode_message(&a[..n]), Some(m));
        }

        #[test]
        fn replies_encode_exactly_as_postcard(r in reply()) {
            let mut a = [0u8; 128];
            let mut b = [0u8; 128];
            let n = encode_reply(&r, &mut a).unwrap();
            let p = postcard::to_slice(&r, &mut b).unwrap();
            prop_assert_eq!(&a[..n], &*p);
            prop_assert_eq!(decode_reply(&a[..n]), Some(r));
        }

        /// The short ways write postcard's bytes too, and nothing where
        /// they do not fit: above all a retry in a view below 128, taken
        /// often here.
        #[test]
        fn short_replies_encode_as_postcard(
            view in proptest::option::of(prop_oneof![0u16..0x80, any::<u16>()]),
            advance in any::<bool>(),
            crash in any::<bool>(),
            regs in any::<bool>(),
            step in any::<bool>(),
            rip in proptest::option::of(any::<u64>()),
            room in 0usize..64,
        ) {
            let r = ExitReply {
                response: Response {
                    advance,
                    ..if crash { Response::CRASH } else { Response::RETRY }
                },
                regs: regs.then_some(ExitRegs { rax: 1, rbx: 2, rcx: 3, rdx: 4 }),
                view,
                step,
                rip,
            };
            let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
            let p = postcard::to_slice(&r, &mut b).ok().filter(|p| p.len() <= room);
            prop_assert_eq!(encode_reply(&r, &mut a[..room]).map(|n| &a[..n]), p.as_deref());
        }

        /// What a restricted holder (a forwarded exit's) may answer is
        /// exactly a resume with nothing but perhaps a view: no
        /// registers, advance, injection, step, RIP or other `Then`.
        #[test]
        fn a_restricted_answer_is_a_bare_resume_perhaps_with_a_view(r in reply()) {
            let mut a = [0u8; 128];
            let n = encode_reply(&r, &mut a).unwrap();
            let bare = r.response == Response::RETRY
                && r.regs.is_none()
                && !r.step
                && r.rip.is_none()
                && r.view.is_none_or(|v| v < 0x4000);
            prop_assert_eq!(restricted_ok(&a[..n]), bare, "{:?}", r);
        }

        #[test]
        fn any_bytes_decode_as_postcard_decodes_them(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(decode_message(&bytes), whole::<ExitMessage>(&bytes));
            prop_assert_eq!(decode_reply(&bytes), whole::<ExitReply>(&bytes));
        }

        /// Valid encodings with one byte changed: the interesting corner of
        /// "any bytes" (tags, varint continuations, option markers).
        #[test]
        fn damaged_encodings_decode_as_postcard_decodes_them(
            m in message(),
            r in reply(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let mut a = [0u8; 128];
            let n = encode_message(&m, &mut a).unwrap();
            let mut bytes = a[..n].to_vec();
            let i = at.index(n);
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            prop_assert_eq!(decode_message(&bytes), whole::<ExitMessage>(&bytes));
            let n = encode_reply(&r, &mut a).unwrap();
            let mut bytes = a[..n].to_vec();
            let i = at.index(n);
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            prop_assert_eq!(decode_reply(&bytes), whole::<ExitReply>(&bytes));
        }

        /// The short way agrees with the long one: every plain answer is
        /// recognised, nothing else is.
        #[test]
        fn plain_answers_take_the_short_way_and_only_they(r in reply(), bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            let mut a = [0u8; 128];
            let n = encode_reply(&r, &mut a).unwrap();
            let plain = plain_reply(&a[..n]);
            prop_assert_eq!(plain.is_some(), is_plain(&r));
            if let Some((advance, regs)) = plain {
                prop_assert_eq!((advance, regs), (r.response.advance, r.regs));
            }
            if let Some((advance, regs)) = plain_reply(&bytes) {
                let whole = whole::<ExitReply>(&bytes).unwrap();
                prop_assert!(is_plain(&whole));
                prop_assert_eq!((advance, regs), (whole.response.advance, whole.regs));
            }
        }

        /// The shape read as two words is the byte pattern's, for the
        /// lengths of both plain answers with bytes mostly 0 (so that
        /// about a quarter are plain) and any else.
        #[test]
        fn the_plain_shape_is_the_byte_patterns(
            regs in any::<bool>(),
            bytes in proptest::collection::vec(
                prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => any::<u8>()],
                PLAIN_REGS,
            ),
        ) {
            let b = &bytes[..if regs { PLAIN_REGS } else { PLAIN }];
            let pattern = match *b {
                [a @ (0 | 1), 0, 0, 0, 0, 0, 0] => Some((a == 1, false)),
                [a @ (0 | 1), 0, 0, 1, .., 0, 0, 0] if b.len() == PLAIN_REGS => Some((a == 1, true)),
                _ => None,
            };
            prop_assert_eq!(plain_shape(b), pattern);
        }

        /// The short way of a plain answer that switches views agrees with
        /// the long one, and takes nothing else.
        #[test]
        fn view_switching_answers_take_the_short_way_and_only_they(r in reply(), bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            let mut a = [0u8; 128];
            let n = encode_reply(&r, &mut a).unwrap();
            let short = plain_view_shape(&a[..n]);
            let without = ExitReply { view: None, ..r };
            let expected = r.view.filter(|&v| is_plain(&without) && v < 0x4000);
            prop_assert_eq!(short.map(|s| s.2), expected);
            if let Some((advance, with_regs, _)) = short {
                prop_assert_eq!((advance, with_regs), (r.response.advance, r.regs.is_some()));
                if with_regs {
                    prop_assert_eq!(plain_regs(&a[..n]), r.regs);
                }
            }
            // Built to be one: always taken (below 16,384).
            let made = ExitReply {
                response: Response { advance: r.response.advance, inject: None, then: Then::Resume },
                regs: r.regs,
                view: Some(r.view.unwrap_or(0)),
                step: false,
                rip: None,
            };
            let n = encode_reply(&made, &mut a).unwrap();
            let v = made.view.unwrap();
            let want = (v < 0x4000).then_some((made.response.advance, made.regs.is_some(), v));
            prop_assert_eq!(plain_view_shape(&a[..n]), want);
            if let Some((advance, with_regs, view)) = plain_view_shape(&bytes) {
                let whole = whole::<ExitReply>(&bytes).unwrap();
                prop_assert_eq!((advance, Some(view)), (whole.response.advance, whole.view));
                prop_assert_eq!(with_regs, whole.regs.is_some());
                let without = ExitReply { view: None, ..whole };
                prop_assert!(is_plain(&without));
                if with_regs {
                    prop_assert_eq!(plain_regs(&bytes), whole.regs);
                }
            }
        }

        /// The hypercall's short way reads what decoding reads, and takes
        /// hypercalls only.
        #[test]
        fn hypercalls_are_read_in_place_and_only_they(m in message(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut a = [0u8; 128];
            let n = encode_message(&m, &mut a).unwrap();
            let call = hypercall(&a[..n]);
            prop_assert_eq!(call.is_some(), m.exit.kind == ExitKind::Hypercall);
            if let Some(c) = call {
                prop_assert_eq!((c.regs(), c.rax(), c.domain()), (m.regs, m.regs.rax, m.exit.domain));
            }
            // Any bytes: where read as a hypercall, they decode as one.
            let mut bytes = bytes;
            if bytes.len() == HYPERCALL_MESSAGE {
                bytes[EXIT_FIXED] = 1;
            }
            if let Some(c) = hypercall(&bytes) {
                let whole = whole::<ExitMessage>(&bytes).unwrap();
                prop_assert_eq!(whole.exit.kind, ExitKind::Hypercall);
                prop_assert_eq!((c.regs(), c.domain()), (whole.regs, whole.exit.domain));
            } else {
                prop_assert_ne!(
                    whole::<ExitMessage>(&bytes).map(|w| w.exit.kind),
                    Some(ExitKind::Hypercall)
                );
            }
        }

        #[test]
        fn answers_encode_as_their_replies(r in reply()) {
            let mut a = [0u8; 128];
            let mut b = [0u8; 128];
            let plain = ExitReply { view: None, step: false, rip: None, ..r };
            let n = encode_answer(&plain.response, plain.regs.as_ref(), &mut a).unwrap();
            let m = encode_reply(&plain, &mut b).unwrap();
            prop_assert_eq!(&a[..n], &b[..m]);
        }

        #[test]
        fn a_full_buffer_is_an_error_not_a_panic(m in message(), r in reply(), len in 0usize..40) {
            let mut a = [0u8; 40];
            let _ = encode_message(&m, &mut a[..len]);
            let _ = encode_reply(&r, &mut a[..len]);
        }
    }
}
