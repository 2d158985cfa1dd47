//! The violation path's short way (issue 15): an EPT violation's exit
//! read straight from its bytes. It gives exactly what the general codec
//! (`ipc_schema::exitcodec`) gives; the property tests in `tests.rs` hold
//! it to it. (The answer that moves a vCPU to another view has its short
//! way in the codec itself: `exitcodec::encode_reply`.)

use crate::events::Violation;
use ipc_schema::vmexit::{AccessBits, EXIT_FIXED};

/// `ExitKind::EptViolation`'s variant index.
const EPT_VIOLATION: u8 = 6;

/// An exit message that is an EPT violation, read from all of `bytes`
/// (postcard's layout, `exitcodec::encode_exit`'s): the violation
/// `exitcodec::decode_message` reads from them. `None` for any other
/// bytes: other kinds of exit, and anything the general decoding is left
/// to judge (which then reads or refuses it).
#[inline(always)]
pub fn read_violation(bytes: &[u8]) -> Option<Violation> {
    let (fixed, rest) = bytes.split_first_chunk::<EXIT_FIXED>()?;
    let half = |at: usize| u16::from_le_bytes([fixed[at], fixed[at + 1]]);
    let [EPT_VIOLATION, rest @ ..] = rest else {
        return None;
    };
    let (gpa, rest) = rest.split_first_chunk::<8>()?;
    let (gla, rest) = match rest {
        [0, rest @ ..] => (None, rest),
        [1, rest @ ..] => {
            let (g, rest) = rest.split_first_chunk::<8>()?;
            (Some(u64::from_le_bytes(*g)), rest)
        }
        _ => return None,
    };
    let [r, w, x, ar, aw, ax, q0, q1, q2, q3, q4, q5, q6, q7] = *rest else {
        return None;
    };
    // Each flag a postcard bool: 0 or 1.
    if (r | w | x | ar | aw | ax) > 1 {
        return None;
    }
    let bits = |r: u8, w: u8, x: u8| AccessBits {
        read: r == 1,
        write: w == 1,
        execute: x == 1,
    };
    Some(Violation {
        domain: half(32),
        vcpu: half(34),
        view: half(36),
        rip: u64::from_le_bytes(*fixed[39..].first_chunk::<8>()?),
        gpa: u64::from_le_bytes(*gpa),
        gla,
        access: bits(r, w, x),
        allowed: bits(ar, aw, ax),
        qualification: u64::from_le_bytes([q0, q1, q2, q3, q4, q5, q6, q7]),
    })
}
