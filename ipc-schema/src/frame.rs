//! Self-delimiting frames for byte streams (serial lines): a postcard value,
//! a CRC-16 of it, COBS-encoded, ended by a zero byte.
//!
//! ```text
//! COBS( postcard(value) ++ crc16_le ) 00
//! ```
//!
//! Zero bytes occur only as terminators, so a reader finds the next frame
//! after the next zero whatever came before; a damaged frame fails its CRC.
//! The log wire (`wire`) and the control channel (`control`) both use it.

use serde::{Deserialize, Serialize};

/// Why a frame could not be written or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// The value does not fit the buffer.
    TooLong,
    /// The bytes between two zeros are not valid COBS.
    Cobs,
    /// The checksum does not match: a garbled frame, or text.
    Checksum,
    /// The bytes are not a postcard value of the expected type (or have
    /// bytes left over).
    Postcard,
}

/// Encodes `value` into `out` (terminator included) and returns the bytes to
/// send. `out` needs room for the encoding plus 3 bytes plus one per 254.
pub fn encode<'o, T: Serialize>(value: &T, out: &'o mut [u8]) -> Result<&'o [u8], FrameError> {
    // The plain encoding goes in the upper part of `out`, its COBS form into
    // the lower part, which is sized for the worst case of the upper.
    let len = out.len();
    let mid = (len + len / 254 + 4).div_ceil(2).min(len);
    let (dest, plain) = out.split_at_mut(mid);
    if plain.len() < 3 {
        return Err(FrameError::TooLong);
    }
    let room = plain.len() - 2;
    let used = postcard::to_slice(value, &mut plain[..room])
        .map_err(|_| FrameError::TooLong)?
        .len();
    let crc = crc16(&plain[..used]);
    plain[used..used + 2].copy_from_slice(&crc.to_le_bytes());
    let n = cobs::try_encode(&plain[..used + 2], dest).map_err(|_| FrameError::TooLong)?;
    if n >= dest.len() {
        return Err(FrameError::TooLong);
    }
    dest[n] = 0;
    Ok(&out[..=n])
}

/// Decodes the bytes between two zero bytes (terminator excluded), in place.
pub fn decode<'a, T: Deserialize<'a>>(chunk: &'a mut [u8]) -> Result<T, FrameError> {
    let body = intact(chunk)?;
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        _ => Err(FrameError::Postcard),
    }
}

/// The body of the frame `chunk` (the bytes between two zero bytes,
/// terminator excluded), decoded in place, if it is intact: valid COBS and
/// its checksum right, whatever value it holds.
pub fn intact(chunk: &mut [u8]) -> Result<&[u8], FrameError> {
    let n = cobs::decode_in_place(chunk).map_err(|_| FrameError::Cobs)?;
    if n < 3 {
        return Err(FrameError::Checksum);
    }
    let (body, crc) = chunk[..n].split_at(n - 2);
    if crc16(body).to_le_bytes() != [crc[0], crc[1]] {
        return Err(FrameError::Checksum);
    }
    Ok(body)
}

/// CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xffff).
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xffffu16;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
