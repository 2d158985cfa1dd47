//! The log wire: what the hypervisor writes on its log serial line (COM1).
//!
//! The line carries records from several sources: the kernel, each service
//! (each with its own defmt table, numbered from 1 like every defmt ELF), the
//! consoles of guest domains, and a final halt record. Every record is a
//! [`Record`], postcard-encoded, followed by a CRC-16 of those bytes, then
//! COBS-encoded and terminated by a zero byte:
//!
//! ```text
//! COBS( postcard(Record) ++ crc16_le ) 00
//! ```
//!
//! Zero bytes occur only as terminators, so a reader that starts anywhere, or
//! that saw a garbled stretch, finds the next record after the next zero. Text
//! on the same line that is not a record (the boot loader's messages before
//! the kernel starts) fails the CRC or the postcard decoding and is shown as
//! text. The kernel writes one zero byte before its first record to end any
//! such text.
//!
//! defmt frames travel whole inside [`Record::Defmt`] (raw encoding), so each
//! frame is decoded on its own and one corrupted frame costs only itself.

use postcard_schema::{Schema, key::Key};
use serde::{Deserialize, Serialize};

/// The source number of the kernel's own log stream. Services get the numbers
/// after it, in the order the kernel starts them.
pub const KERNEL_SOURCE: u8 = 0;

/// The longest defmt frame one record carries; a longer frame is cut and
/// flagged as truncated.
pub const MAX_FRAME: usize = 240;

/// The longest payload (console bytes, names, build ids) one record carries.
pub const MAX_PAYLOAD: usize = 240;

/// The longest postcard encoding of a record, checksum included.
pub const MAX_RECORD: usize = MAX_FRAME + 32;

/// The buffer a record is encoded in: room for the plain encoding and its
/// COBS form side by side (see `frame::encode`).
pub const MAX_ENCODED: usize = 2 * MAX_RECORD + 8;

/// One record on the log wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Schema)]
pub enum Record<'a> {
    /// Names a log source, before its first frame: the host picks the ELF
    /// whose name and GNU build id match and decodes the source's frames with
    /// that file's defmt table. The kernel's announcement also carries the key
    /// of this wire schema.
    Announce {
        source: u8,
        name: &'a str,
        build_id: &'a [u8],
        wire_key: [u8; 8],
    },
    /// One complete defmt frame (raw encoding) from `source`.
    Defmt {
        source: u8,
        frame: &'a [u8],
        truncated: bool,
    },
    /// Bytes a guest domain wrote to its console.
    Console { domain: u16, bytes: &'a [u8] },
    /// Plain text from a source without a defmt table (last-resort messages).
    Text { source: u8, text: &'a str },
    /// The hypervisor stops; `status` is a [`crate::halt::HaltStatus`] code.
    Halt { status: u8 },
}

/// The key of this wire format. The kernel announces it; the host refuses a
/// stream with another key, naming both.
pub const WIRE_KEY: Key = Key::for_path::<Record<'static>>("parallax/log-wire");

/// Why a record could not be written or read.
pub use crate::frame::FrameError as WireError;

/// Encodes `record` for the wire into `out`, terminator included, and returns
/// the bytes to send.
pub fn encode<'o>(
    record: &Record<'_>,
    out: &'o mut [u8; MAX_ENCODED],
) -> Result<&'o [u8], WireError> {
    crate::frame::encode(record, &mut out[..])
}

/// Decodes the bytes between two zero bytes (terminator excluded). The COBS
/// decoding happens in place, so the record borrows from `chunk`.
pub fn decode(chunk: &mut [u8]) -> Result<Record<'_>, WireError> {
    crate::frame::decode(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(record: Record<'_>) {
        let mut out = [0u8; MAX_ENCODED];
        let wire = encode(&record, &mut out).unwrap().to_vec();
        assert_eq!(*wire.last().unwrap(), 0, "terminated by zero");
        assert!(
            !wire[..wire.len() - 1].contains(&0),
            "no zero inside a record"
        );
        let mut chunk = wire[..wire.len() - 1].to_vec();
        assert_eq!(decode(&mut chunk).unwrap(), record);
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Record::Announce {
            source: 0,
            name: "kernel",
            build_id: &[0xde, 0xad, 0, 0xbe, 0xef],
            wire_key: WIRE_KEY.to_bytes(),
        });
        roundtrip(Record::Defmt {
            source: 3,
            frame: &[1, 0, 0, 0, 42, 0, 0, 0],
            truncated: false,
        });
        roundtrip(Record::Console {
            domain: 1,
            bytes: b"hello\n",
        });
        roundtrip(Record::Text {
            source: 0,
            text: "plain",
        });
        roundtrip(Record::Halt { status: 4 });
        roundtrip(Record::Defmt {
            source: 1,
            frame: &[0u8; MAX_FRAME],
            truncated: true,
        });
    }

    #[test]
    fn an_oversized_payload_is_refused() {
        let big = [7u8; MAX_RECORD];
        let mut out = [0u8; MAX_ENCODED];
        assert_eq!(
            encode(
                &Record::Console {
                    domain: 0,
                    bytes: &big
                },
                &mut out
            ),
            Err(WireError::TooLong)
        );
    }

    #[test]
    fn text_is_not_mistaken_for_a_record() {
        let mut text = b"GNU GRUB  version 2.06\r\nBooting `Parallax'\r\n".to_vec();
        assert!(decode(&mut text).is_err());
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut out = [0u8; MAX_ENCODED];
        let wire = encode(&Record::Halt { status: 0 }, &mut out)
            .unwrap()
            .to_vec();
        for i in 0..wire.len() - 1 {
            for bit in 0..8 {
                let mut chunk = wire[..wire.len() - 1].to_vec();
                chunk[i] ^= 1 << bit;
                if chunk[i] == 0 {
                    continue; // a zero splits the record: the reader sees two bad chunks
                }
                assert_ne!(decode(&mut chunk), Ok(Record::Halt { status: 0 }));
            }
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&mut bytes);
        }

        #[test]
        fn console_bytes_roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..MAX_PAYLOAD), domain: u16) {
            roundtrip(Record::Console { domain, bytes: &bytes });
        }
    }
}
