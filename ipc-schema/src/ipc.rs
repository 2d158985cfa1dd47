//! IPC conventions shared by every interface.
//!
//! - A message is a postcard encoding of the interface's request type, at
//!   most [`MAX_MESSAGE`](crate::syscall::MAX_MESSAGE) bytes; every request
//!   and reply type implements `MaxSize`, and the bound is checked at compile
//!   time (`assert_fits!`).
//! - Before its first call a client binds: it sends [`BIND_MAGIC`] followed
//!   by the interface's [`Key`]; the server answers [`BindReply`]. A server
//!   built against another version of the interface refuses, naming both
//!   keys, instead of misreading requests.
//! - A reply is `Result<Reply, IpcError>`: the interface's answer, or what
//!   went wrong at the IPC level (a request that did not decode, a missing
//!   bind).
//! - A call to a server that died or was restarted fails with
//!   `SysError::Dead` and its new generation; the client binds again (the
//!   new instance may be another version) before it retries.

use postcard::experimental::max_size::MaxSize;
use postcard_schema::key::Key;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// First bytes of a bind message.
pub const BIND_MAGIC: [u8; 4] = *b"BIND";

/// A bind message: the magic and the client's key.
pub fn bind_message(key: &Key) -> [u8; 12] {
    let mut m = [0u8; 12];
    m[..4].copy_from_slice(&BIND_MAGIC);
    m[4..].copy_from_slice(&key.to_bytes());
    m
}

/// The key a bind message carries, if it is one.
/// (Its length first: a receive loop asks this of every message, and
/// nearly every other message is told apart by that one comparison.)
#[inline(always)]
pub fn bind_key(message: &[u8]) -> Option<[u8; 8]> {
    let (magic, key) = <&[u8; 12]>::try_from(message)
        .ok()?
        .split_first_chunk::<4>()?;
    if *magic != BIND_MAGIC {
        return None;
    }
    key.try_into().ok()
}

/// The server's answer to a bind.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BindReply {
    Bound,
    /// The server speaks another version of the interface.
    WrongKey {
        server: [u8; 8],
        client: [u8; 8],
    },
}

/// What went wrong at the IPC level.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IpcError {
    /// The request did not decode as this interface's request type.
    Malformed,
    /// The server answered something that does not decode.
    BadReply,
    /// The client did not bind before calling.
    NotBound,
    /// The client's key is not the server's (both named).
    WrongKey { server: [u8; 8], client: [u8; 8] },
    /// The caller may not ask this (its badge is not allowed to).
    NotAllowed,
}

/// A declaration, compiled into a service's ELF (section
/// `.parallax.interfaces`), of an interface it serves: its name (NUL-padded)
/// and key. The supervisor checks a new ELF's declarations before it starts
/// it, so a service that lacks an interface it must serve is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct InterfaceDecl {
    pub name: [u8; 32],
    pub key: [u8; 8],
}

/// Bytes of one [`InterfaceDecl`] in the ELF section.
pub const INTERFACE_DECL_LEN: usize = 40;

impl InterfaceDecl {
    pub const fn new(name: &str, key: Key) -> Self {
        let mut n = [0u8; 32];
        let b = name.as_bytes();
        let mut i = 0;
        while i < b.len() && i < 32 {
            n[i] = b[i];
            i += 1;
        }
        Self {
            name: n,
            key: key.to_bytes(),
        }
    }

    /// Parses one declaration from its section bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < INTERFACE_DECL_LEN {
            return None;
        }
        Some(Self {
            name: bytes[..32].try_into().ok()?,
            key: bytes[32..40].try_into().ok()?,
        })
    }

    pub fn name(&self) -> &str {
        let end = self.name.iter().position(|&c| c == 0).unwrap_or(32);
        core::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }
}

/// A fixed-capacity list that postcard bounds (`MaxSize`): a
/// `heapless::Vec` on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundedVec<T, const N: usize>(pub heapless::Vec<T, N>);

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        heapless::Vec::deserialize(d).map(BoundedVec)
    }
}

impl<T: MaxSize, const N: usize> MaxSize for BoundedVec<T, N> {
    const POSTCARD_MAX_SIZE: usize = varint_len(N) + N * T::POSTCARD_MAX_SIZE;
}

impl<T: postcard_schema::Schema, const N: usize> postcard_schema::Schema for BoundedVec<T, N> {
    const SCHEMA: &'static postcard_schema::schema::NamedType =
        <heapless::Vec<T, N> as postcard_schema::Schema>::SCHEMA;
}

impl<T, const N: usize> BoundedVec<T, N> {
    pub fn new() -> Self {
        Self(heapless::Vec::new())
    }
}

/// Bytes of the varint encoding of `n`.
const fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Asserts at compile time that a message type fits in one IPC message.
#[macro_export]
macro_rules! assert_fits {
    ($($t:ty),* $(,)?) => {
        $(const _: () = assert!(
            <$t as postcard::experimental::max_size::MaxSize>::POSTCARD_MAX_SIZE <= $crate::syscall::MAX_MESSAGE,
            concat!(stringify!($t), " does not fit in one IPC message")
        );)*
    };
}

/// An interface's identity: its name and key.
#[derive(Clone, Copy, Debug)]
pub struct InterfaceId {
    pub name: &'static str,
    pub key: Key,
}

impl InterfaceId {
    pub const fn new<T: postcard_schema::Schema + ?Sized>(name: &'static str) -> Self {
        Self {
            name,
            key: Key::for_path::<T>(name),
        }
    }

    pub const fn decl(&self) -> InterfaceDecl {
        InterfaceDecl::new(self.name, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_messages_roundtrip_and_nothing_else_looks_like_one() {
        let key = Key::for_path::<u32>("x");
        assert_eq!(bind_key(&bind_message(&key)), Some(key.to_bytes()));
        assert_eq!(bind_key(b"BIND1234"), None);
        assert_eq!(bind_key(b"BINDxxxxxxxxx"), None);
        assert_eq!(bind_key(&[0; 12]), None);
    }

    #[test]
    fn bounded_vec_size_is_the_worst_case() {
        type V = BoundedVec<u64, 20>;
        let full = BoundedVec(heapless::Vec::<u64, 20>::from_slice(&[u64::MAX; 20]).unwrap());
        let mut buf = [0u8; 512];
        let n = postcard::to_slice(&full, &mut buf).unwrap().len();
        assert_eq!(n, V::POSTCARD_MAX_SIZE);
    }

    #[test]
    fn interface_declarations_parse_back() {
        let d = InterfaceDecl::new("parallax/vmexit", Key::for_path::<u8>("parallax/vmexit"));
        let mut bytes = [0u8; INTERFACE_DECL_LEN];
        bytes[..32].copy_from_slice(&d.name);
        bytes[32..].copy_from_slice(&d.key);
        let p = InterfaceDecl::parse(&bytes).unwrap();
        assert_eq!(p, d);
        assert_eq!(p.name(), "parallax/vmexit");
        assert_eq!(InterfaceDecl::parse(&bytes[..39]), None);
    }
}
