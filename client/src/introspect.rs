//! Guest memory and vCPU registers through the console's introspect
//! service (issue 13, point 1; docs/introspection.md): `cargo hv ctl mem`
//! and `cargo hv ctl regs` are built on these.
//!
//! Writes of any length are split into requests of at most [`CHUNK`]
//! bytes; reads longer than that are streamed by the console; a
//! guest-virtual address is translated by the service page by page,
//! through the guest's own tables.

use super::{Client, ClientError, ControlReply, ControlRequest, Transport, unwanted};
pub use ipc_schema::control::MAX_READ;
pub use ipc_schema::introspect::{
    Address, CHUNK, IntroError, IntroReply, IntroRequest, MAX_SET, REGS_PER_REPLY, Translation,
};
use ipc_schema::ipc::BoundedVec;
pub use ipc_schema::syscall::regs;

impl<T: Transport> Client<T> {
    /// Any introspect request, its answer as it is.
    pub fn introspect(&mut self, request: IntroRequest) -> Result<IntroReply, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Introspect(request))? {
            (label, ControlReply::Introspect(IntroReply::Refused(error))) => {
                Err(ClientError::Introspect {
                    request: label,
                    error,
                })
            }
            (_, ControlReply::Introspect(r)) => Ok(r),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// `len` bytes of domain `domain`'s memory at `at`. Up to [`CHUNK`]
    /// bytes is one introspect request; more is read by the console and
    /// streamed back ([`ControlRequest::ReadMemory`], [`MAX_READ`] bytes a
    /// request), so that the console's link is busy with bytes, not with
    /// round trips.
    pub fn mem_read(
        &mut self,
        domain: u16,
        at: Address,
        len: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let (bytes, end) = self.mem_read_prefix(domain, at, len);
        end.map(|()| bytes)
    }

    /// [`Client::mem_read`], and where it stopped short (a refusal: a span
    /// that is not RAM, a page not mapped...), the bytes read before: a
    /// read across the end of RAM or into a hole gives what lies before it.
    /// (A read of up to [`CHUNK`] bytes is one request: all or nothing.)
    pub fn mem_read_prefix(
        &mut self,
        domain: u16,
        at: Address,
        len: usize,
    ) -> (Vec<u8>, Result<(), ClientError>) {
        if len <= CHUNK {
            let r = self.introspect(IntroRequest::Read {
                domain,
                at,
                len: len as u16,
            });
            return match r {
                Ok(IntroReply::Bytes(b)) if b.0.len() == len => (b.0.to_vec(), Ok(())),
                Ok(other) => (
                    Vec::new(),
                    Err(ClientError::Invalid(format!(
                        "introspect answered a read of {len} bytes with {}",
                        describe_reply(&other)
                    ))),
                ),
                Err(e) => (Vec::new(), Err(e)),
            };
        }
        // (Room for one request's part at first: a length the domain cannot
        // have is refused by the console, not by the host's allocator.)
        let mut out = Vec::with_capacity(len.min(MAX_READ as usize));
        let end = self.stream_into(&mut out, domain, at, len);
        (out, end)
    }

    /// The streamed reads of [`Client::mem_read_prefix`], into `out`.
    fn stream_into(
        &mut self,
        out: &mut Vec<u8>,
        domain: u16,
        at: Address,
        len: usize,
    ) -> Result<(), ClientError> {
        self.ensure_hello()?;
        while out.len() < len {
            let part = (len - out.len()).min(MAX_READ as usize);
            let base = out.len();
            let request = ControlRequest::ReadMemory {
                domain,
                at: advance(at, base)?,
                len: part as u32,
            };
            let mut gap = None;
            let mut sink = |offset: u32, bytes: &[u8]| {
                if base + offset as usize == out.len() {
                    out.extend_from_slice(bytes);
                } else {
                    gap.get_or_insert(offset);
                }
            };
            let (label, reply) = self.call_streamed(request, self.timeout, Some(&mut sink))?;
            if let Some(offset) = gap {
                return Err(ClientError::Invalid(format!(
                    "{label}: bytes at offset {offset} came out of order"
                )));
            }
            match reply {
                ControlReply::Introspect(IntroReply::Done) => {}
                ControlReply::Introspect(IntroReply::Refused(error)) => {
                    return Err(ClientError::Introspect {
                        request: label,
                        error,
                    });
                }
                other => return Err(unwanted(label, other)),
            }
            if out.len() != base + part {
                return Err(ClientError::Invalid(format!(
                    "{label}: {} of {part} bytes came before the answer",
                    out.len() - base
                )));
            }
        }
        Ok(())
    }

    /// Writes `bytes` to domain `domain`'s memory at `at`.
    pub fn mem_write(&mut self, domain: u16, at: Address, bytes: &[u8]) -> Result<(), ClientError> {
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            let request = IntroRequest::Write {
                domain,
                at: advance(at, i * CHUNK)?,
                bytes: BoundedVec(heapless::Vec::from_slice(chunk).expect("at most CHUNK")),
            };
            self.introspect(request)?;
        }
        Ok(())
    }

    /// Where guest-virtual `gva` leads, through the tables of `cr3`
    /// (`None`: the vCPU's).
    pub fn translate(
        &mut self,
        domain: u16,
        vcpu: u16,
        cr3: Option<u64>,
        gva: u64,
    ) -> Result<Translation, ClientError> {
        match self.introspect(IntroRequest::Translate {
            domain,
            vcpu,
            cr3,
            gva,
        })? {
            IntroReply::Translated(t) => Ok(t),
            other => Err(ClientError::Invalid(format!(
                "introspect answered a translation with {}",
                describe_reply(&other)
            ))),
        }
    }

    /// Every register of a vCPU, in [`regs`] order.
    pub fn regs(&mut self, domain: u16, vcpu: u16) -> Result<[u64; regs::COUNT], ClientError> {
        let mut all = [0u64; regs::COUNT];
        for half in 0..2u8 {
            match self.introspect(IntroRequest::Regs { domain, vcpu, half })? {
                IntroReply::Regs { first, values } => {
                    let first = usize::from(first);
                    all[first..first + REGS_PER_REPLY].copy_from_slice(&values);
                }
                other => {
                    return Err(ClientError::Invalid(format!(
                        "introspect answered a register read with {}",
                        describe_reply(&other)
                    )));
                }
            }
        }
        Ok(all)
    }

    /// Sets registers (by index) at once; the domain must be paused.
    pub fn set_regs(
        &mut self,
        domain: u16,
        vcpu: u16,
        values: &[(usize, u64)],
    ) -> Result<(), ClientError> {
        if values.len() > MAX_SET {
            return Err(ClientError::Invalid(format!(
                "at most {MAX_SET} registers at once"
            )));
        }
        let mut v = heapless::Vec::new();
        for &(i, value) in values {
            let index =
                u8::try_from(i).map_err(|_| ClientError::Invalid(format!("no register {i}")))?;
            v.push((index, value)).expect("checked above");
        }
        self.introspect(IntroRequest::SetRegs {
            domain,
            vcpu,
            values: BoundedVec(v),
        })?;
        Ok(())
    }
}

/// `at` moved on by `by` bytes.
fn advance(at: Address, by: usize) -> Result<Address, ClientError> {
    at.offset(by as u64)
        .ok_or_else(|| ClientError::Invalid("the address range wraps".into()))
}

/// An answer in a few words.
pub fn describe_reply(r: &IntroReply) -> String {
    match r {
        IntroReply::Bytes(b) => format!("{} bytes", b.0.len()),
        IntroReply::Done => "Done".into(),
        IntroReply::Translated(t) => format!("gpa {:#x}", t.gpa),
        IntroReply::Regs { first, .. } => format!("registers from {first}"),
        IntroReply::Refused(e) => format!("Refused ({e})"),
    }
}

/// A register's index from its name (`rip`, `r8`, `cr3`, ...).
pub fn register(name: &str) -> Option<usize> {
    regs::NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
}

/// A hex dump, 16 bytes a line: address, bytes, ASCII.
pub fn hex_dump(address: u64, bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = line
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out += &format!(
            "{:016x}  {:<47}  {ascii}\n",
            address.wrapping_add(16 * i as u64),
            hex.join(" ")
        );
    }
    out
}

/// Bytes as one lowercase hex string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A hex string (spaces and a `0x` prefix allowed) as bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: String = s
        .trim_start_matches("0x")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("{s:?}: an odd number of hex digits"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16).map_err(|_| format!("{s:?}: not hex bytes"))
        })
        .collect()
}

/// A read as one JSON object:
/// `{"domain":1,"address":"0x1000","virtual":false,"len":4,"bytes":"00112233"}`.
pub fn read_json(domain: u16, at: Address, bytes: &[u8]) -> String {
    let (address, virt) = match at {
        Address::Physical(a) => (a, false),
        Address::Virtual { gva, .. } => (gva, true),
    };
    format!(
        "{{\"domain\":{domain},\"address\":\"{address:#x}\",\"virtual\":{virt},\"len\":{},\"bytes\":\"{}\"}}",
        bytes.len(),
        hex(bytes)
    )
}

/// A translation as one JSON object.
pub fn translation_json(domain: u16, gva: u64, t: &Translation) -> String {
    format!(
        "{{\"domain\":{domain},\"gva\":\"{gva:#x}\",\"gpa\":\"{:#x}\",\"page_size\":{},\"writable\":{},\"user\":{},\"executable\":{},\"cr3\":\"{:#x}\"}}",
        t.gpa, t.page_size, t.writable, t.user, t.executable, t.cr3
    )
}

/// A translation in one line.
pub fn translation_line(gva: u64, t: &Translation) -> String {
    let size = match t.page_size {
        s if s >= 1 << 30 => format!("{} GiB", s >> 30),
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    };
    format!(
        "gva {gva:#x} -> gpa {:#x} ({size} page, {}{}{}; cr3 {:#x})",
        t.gpa,
        if t.writable { "writable" } else { "read-only" },
        if t.user { ", user" } else { ", supervisor" },
        if t.executable {
            ", executable"
        } else {
            ", no-execute"
        },
        t.cr3
    )
}

/// Registers as `name value` lines (the view and exits from `info`).
pub fn regs_table(values: &[u64; regs::COUNT]) -> String {
    let mut out = String::new();
    for (i, name) in regs::NAMES.iter().enumerate() {
        match i {
            regs::CS => {
                out += &format!(
                    "{name:<10} {:#06x} (access {:#06x}{})\n",
                    values[i] & 0xffff,
                    values[i] >> 16 & 0xffff,
                    if values[i] >> 16 & 1 << 13 != 0 {
                        ", 64-bit"
                    } else {
                        ""
                    }
                )
            }
            regs::INFO => {
                out += &format!(
                    "{:<10} {}\n{:<10} {}\n",
                    "view",
                    values[i] & 0xffff,
                    "exits",
                    values[i] >> 16
                )
            }
            _ => out += &format!("{name:<10} {:#018x}\n", values[i]),
        }
    }
    out
}

/// Registers as one JSON object of name: "0x..." (and view, exits).
pub fn regs_json(domain: u16, vcpu: u16, values: &[u64; regs::COUNT]) -> String {
    let mut fields: Vec<String> = regs::NAMES[..regs::INFO]
        .iter()
        .zip(values)
        .map(|(n, v)| format!("\"{n}\":\"{v:#x}\""))
        .collect();
    fields.push(format!("\"view\":{}", values[regs::INFO] & 0xffff));
    fields.push(format!("\"exits\":{}", values[regs::INFO] >> 16));
    format!(
        "{{\"domain\":{domain},\"vcpu\":{vcpu},{}}}",
        fields.join(",")
    )
}

/// `NAME=VALUE` (decimal or 0x-prefixed hex) as (register index, value).
pub fn parse_assignment(s: &str) -> Result<(usize, u64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: say NAME=VALUE, e.g. rax=0x10"))?;
    let i = register(name)
        .filter(|&i| regs::SETTABLE & 1 << i != 0)
        .ok_or_else(|| {
            format!(
                "{name:?}: no such register that can be set (one of {})",
                regs::NAMES[..regs::CS].join(", ")
            )
        })?;
    let v = match value.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => value.parse(),
    }
    .map_err(|_| format!("{value:?} is not a number (decimal or 0x-prefixed hex)"))?;
    Ok((i, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_hex_json_and_assignments_read_as_documented() {
        let dump = hex_dump(0x1000, b"parallax\x00\x01abcdefghij");
        assert!(dump.starts_with("0000000000001000  70 61 72"));
        assert!(dump.contains("parallax..abcdef"));
        assert!(dump.lines().nth(1).unwrap().starts_with("0000000000001010"));
        assert_eq!(parse_hex("0x00 ff10").unwrap(), vec![0, 0xff, 0x10]);
        assert!(parse_hex("abc").unwrap_err().contains("odd"));
        assert!(parse_hex("zz").unwrap_err().contains("not hex"));
        assert_eq!(
            read_json(2, Address::Physical(0x10), &[1, 2]),
            "{\"domain\":2,\"address\":\"0x10\",\"virtual\":false,\"len\":2,\"bytes\":\"0102\"}"
        );
        assert_eq!(parse_assignment("rip=0x10"), Ok((regs::RIP, 0x10)));
        assert_eq!(parse_assignment("R8=7"), Ok((regs::R8, 7)));
        assert!(parse_assignment("cs=1").unwrap_err().contains("\"cs\""));
        assert!(parse_assignment("rax").unwrap_err().contains("NAME=VALUE"));
        assert!(
            parse_assignment("rax=x")
                .unwrap_err()
                .contains("not a number")
        );
        let mut v = [0u64; regs::COUNT];
        v[regs::INFO] = 2 | 5 << 16;
        v[regs::RIP] = 0x1234;
        let j = regs_json(1, 0, &v);
        assert!(
            j.contains("\"rip\":\"0x1234\"")
                && j.contains("\"view\":2")
                && j.contains("\"exits\":5")
        );
        let t = regs_table(&v);
        assert!(t.contains("rip        0x0000000000001234") && t.contains("exits      5"));
    }
}
