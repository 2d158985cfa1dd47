//! Frames on a byte stream: [`ipc_schema::frame`] (COBS of postcard plus a
//! CRC-16, ended by a zero byte), with the bookkeeping a host needs: a reader
//! that takes bytes as they come, decodes every complete frame, and counts
//! (never panics on) the ones that do not decode.

use ipc_schema::frame::{self, FrameError};
use postcard::experimental::max_size::MaxSize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;

/// Encodes `value` as one frame, terminator included.
pub fn encode<T: Serialize + MaxSize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 2 * wire_limit(T::POSTCARD_MAX_SIZE) + 16];
    frame::encode(value, &mut buf).map(<[u8]>::to_vec)
}

/// The longest encoded frame (terminator excluded) of a value whose postcard
/// form has at most `max_value` bytes: the value, its CRC, COBS overhead.
pub const fn wire_limit(max_value: usize) -> usize {
    let plain = max_value + 2;
    plain + plain / 254 + 1
}

/// Bytes of a dropped frame kept for diagnostics.
const KEEP: usize = 200;

/// What a [`FrameReader`] dropped, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// The bytes between two zeros were not valid COBS.
    pub cobs: u64,
    /// The checksum did not match (a garbled frame, or text).
    pub checksum: u64,
    /// A valid frame whose content is not a value of the expected type.
    pub postcard: u64,
    /// Longer than any frame of the expected type.
    pub too_long: u64,
    /// Bytes in all the dropped frames (terminators excluded).
    pub bytes: u64,
}

impl DropCounts {
    /// Frames dropped, whatever the cause.
    pub fn frames(&self) -> u64 {
        self.cobs + self.checksum + self.postcard + self.too_long
    }
}

impl std::fmt::Display for DropCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} frame(s) dropped ({} bytes: {} bad COBS, {} bad checksum, {} not the expected type, {} too long)",
            self.frames(),
            self.bytes,
            self.cobs,
            self.checksum,
            self.postcard,
            self.too_long
        )
    }
}

/// Splits a byte stream into frames and decodes each as a `T`.
///
/// Bytes are pushed as they arrive, in pieces of any size; every complete
/// frame is decoded. A frame that does not decode is dropped and counted
/// ([`FrameReader::dropped`]); reading goes on from the next zero byte. Empty
/// frames (two zeros in a row, e.g. a sender resynchronising) are skipped
/// without being counted. A run of bytes longer than any frame of `T` is
/// dropped as soon as it is too long, so memory stays bounded whatever the
/// peer sends.
#[derive(Debug)]
pub struct FrameReader<T> {
    buf: Vec<u8>,
    /// Inside a frame already dropped as too long: skip to the next zero.
    skipping: bool,
    limit: usize,
    dropped: DropCounts,
    decoded: u64,
    /// The start of the last dropped frame, for diagnostics.
    last_dropped: Vec<u8>,
    scratch: Vec<u8>,
    _t: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned + MaxSize> Default for FrameReader<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: DeserializeOwned + MaxSize> FrameReader<T> {
    /// A reader for frames of `T`.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            skipping: false,
            limit: wire_limit(T::POSTCARD_MAX_SIZE),
            dropped: DropCounts::default(),
            decoded: 0,
            last_dropped: Vec::new(),
            scratch: Vec::new(),
            _t: PhantomData,
        }
    }

    /// Takes `bytes` and appends every value they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<T>) {
        for &b in bytes {
            if b == 0 {
                if self.skipping {
                    self.skipping = false;
                } else if !self.buf.is_empty() {
                    let mut chunk = std::mem::take(&mut self.buf);
                    let len = chunk.len();
                    // Decoding works in place: keep the start for diagnostics.
                    self.scratch.clear();
                    self.scratch.extend_from_slice(&chunk[..len.min(KEEP)]);
                    match frame::decode::<T>(&mut chunk) {
                        Ok(v) => {
                            self.decoded += 1;
                            out.push(v);
                        }
                        Err(e) => {
                            let head = std::mem::take(&mut self.scratch);
                            self.drop_frame(e, len, &head);
                            self.scratch = head;
                        }
                    }
                    // Keep the allocation for the next frame.
                    chunk.clear();
                    self.buf = chunk;
                }
            } else if self.skipping {
                self.dropped.bytes += 1;
                if self.last_dropped.len() < KEEP {
                    self.last_dropped.push(b);
                }
            } else {
                self.buf.push(b);
                if self.buf.len() > self.limit {
                    let head = std::mem::take(&mut self.buf);
                    self.drop_frame(FrameError::TooLong, head.len(), &head);
                    self.skipping = true;
                }
            }
        }
    }

    fn drop_frame(&mut self, e: FrameError, len: usize, bytes: &[u8]) {
        match e {
            FrameError::Cobs => self.dropped.cobs += 1,
            FrameError::Checksum => self.dropped.checksum += 1,
            FrameError::Postcard => self.dropped.postcard += 1,
            FrameError::TooLong => self.dropped.too_long += 1,
        }
        self.dropped.bytes += len as u64;
        self.last_dropped.clear();
        self.last_dropped
            .extend_from_slice(&bytes[..bytes.len().min(KEEP)]);
    }

    /// What was dropped so far.
    pub fn dropped(&self) -> DropCounts {
        self.dropped
    }

    /// Frames decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Bytes waiting for their frame's terminator.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Readable text among the bytes that did not decode: the unterminated
    /// rest, else the last dropped frame. A peer that is not speaking the
    /// protocol (a proxy turning a client away, a shell) usually says why in
    /// text; errors quote it.
    pub fn stray_text(&self) -> Option<String> {
        [&self.buf, &self.last_dropped]
            .into_iter()
            .find_map(|b| printable(b))
    }
}

/// `bytes` as text if it is mostly printable ASCII, trimmed.
fn printable(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let good = bytes
        .iter()
        .filter(|&&b| b.is_ascii_graphic() || b == b' ' || b == b'\n' || b == b'\r' || b == b'\t')
        .count();
    if good * 10 < bytes.len() * 9 {
        return None;
    }
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::control::{ControlEvent, ControlReply, ToHost};
    use proptest::prelude::*;

    fn reply(seq: u32) -> ToHost {
        ToHost::Reply {
            seq,
            reply: ControlReply::Done,
        }
    }

    #[test]
    fn frames_split_anywhere_decode_in_order() {
        let mut wire = Vec::new();
        for s in 1..=5 {
            wire.extend(encode(&reply(s)).unwrap());
        }
        wire.extend(encode(&ToHost::Event(ControlEvent::Garbage { bytes: 7 })).unwrap());
        for cut in 0..wire.len() {
            let mut r = FrameReader::<ToHost>::new();
            let mut out = Vec::new();
            r.push(&wire[..cut], &mut out);
            r.push(&wire[cut..], &mut out);
            assert_eq!(out.len(), 6);
            assert_eq!(out[0], reply(1));
            assert_eq!(out[5], ToHost::Event(ControlEvent::Garbage { bytes: 7 }));
            assert_eq!(r.dropped().frames(), 0);
        }
    }

    #[test]
    fn a_garbled_frame_is_counted_and_the_next_one_decodes() {
        let mut wire = encode(&reply(1)).unwrap();
        wire[2] ^= 0x40;
        wire.extend(encode(&reply(2)).unwrap());
        let mut r = FrameReader::<ToHost>::new();
        let mut out = Vec::new();
        r.push(&wire, &mut out);
        assert_eq!(out, [reply(2)]);
        assert_eq!(r.dropped().frames(), 1);
    }

    #[test]
    fn an_endless_frame_is_dropped_once_and_memory_stays_bounded() {
        let mut r = FrameReader::<ToHost>::new();
        let mut out = Vec::new();
        r.push(&vec![0x55; 100_000], &mut out);
        assert!(r.pending() <= r.limit);
        r.push(&[0], &mut out);
        r.push(&encode(&reply(3)).unwrap(), &mut out);
        assert_eq!(out, [reply(3)]);
        assert_eq!(r.dropped().too_long, 1);
        assert_eq!(r.dropped().frames(), 1);
    }

    #[test]
    fn text_is_quoted() {
        let mut r = FrameReader::<ToHost>::new();
        let mut out = Vec::new();
        r.push(b"busy: someone else is attached\n", &mut out);
        assert_eq!(
            r.stray_text().as_deref(),
            Some("busy: someone else is attached")
        );
        // Longer than any frame: kept whole all the same (up to KEEP).
        let long = "x".repeat(150);
        let mut r = FrameReader::<ToHost>::new();
        r.push(long.as_bytes(), &mut out);
        assert_eq!(r.stray_text().as_deref(), Some(long.as_str()));
    }

    proptest! {
        /// Whatever the bytes, the reader neither panics nor loses count:
        /// every non-empty zero-terminated run is either decoded or dropped.
        #[test]
        fn arbitrary_bytes_are_decoded_or_counted(bytes in proptest::collection::vec(any::<u8>(), 0..4000),
                                                  cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let mut r = FrameReader::<ToHost>::new();
            let mut out = Vec::new();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut at = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                r.push(&bytes[at..c], &mut out);
                at = c;
            }
            let terminated = bytes.iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
            let runs = bytes[..terminated].split(|&b| b == 0).filter(|r| !r.is_empty()).count() as u64;
            // A too-long run is counted when it overflows, even unterminated.
            let overflowed_tail = bytes[terminated..].len() > r.limit;
            prop_assert_eq!(r.decoded() + r.dropped().frames(), runs + u64::from(overflowed_tail));
            prop_assert_eq!(out.len() as u64, r.decoded());
        }

        /// Valid frames survive any garbage between them, in order, and each
        /// piece of garbage costs at most itself.
        #[test]
        fn frames_survive_garbage(seqs in proptest::collection::vec(any::<u32>(), 1..20),
                                  garbage in proptest::collection::vec(proptest::collection::vec(1u8.., 0..300), 20)) {
            let mut wire = Vec::new();
            let mut pieces = 0u64;
            for (s, g) in seqs.iter().zip(&garbage) {
                if !g.is_empty() {
                    wire.extend_from_slice(g);
                    wire.push(0);
                    pieces += 1;
                }
                wire.extend(encode(&reply(*s)).unwrap());
            }
            let mut r = FrameReader::<ToHost>::new();
            let mut out = Vec::new();
            r.push(&wire, &mut out);
            let want: Vec<ToHost> = seqs.iter().map(|&s| reply(s)).collect();
            // Garbage that happens to be a valid frame would show up too; the
            // real frames are there, in order, whatever happened.
            let mut it = out.iter();
            for w in &want {
                prop_assert!(it.any(|o| o == w), "frame {:?} lost", w);
            }
            prop_assert_eq!(r.decoded() + r.dropped().frames(), seqs.len() as u64 + pieces);
        }
    }
}
