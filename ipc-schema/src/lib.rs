//! One schema for everything that crosses a boundary in Parallax.
//!
//! Every message between the hypervisor and the host, every boot-time input
//! and (later) every IPC message and hypercall argument block is a Rust type
//! here, encoded with postcard and identified by a [`Key`]: an 8-byte hash of
//! the type's shape and a path naming its interface. A peer built against a
//! different shape computes a different key and is refused with both keys in
//! the error, instead of misreading bytes.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
// Messages are values in fixed buffers, without an allocator to box the
// large variants into: a variant as large as the message is what we want.
#![allow(clippy::large_enum_variant)]

pub mod altp2m;
pub mod control;
pub mod exitcodec;
pub mod frame;
pub mod guest_state;
pub mod halt;
pub mod hypercall;
pub mod introspect;
pub mod iommu;
pub mod ipc;
pub mod lifecycle;
pub mod logdirty;
pub mod manifest;
pub mod sharing;
pub mod supervisor;
pub mod syscall;
pub mod uart;
pub mod vmexit;
pub mod wire;

pub use postcard_schema::{Schema, key::Key};

/// Formats a key as 16 hex digits, the way errors and tools print it.
pub fn key_hex(key: &Key) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in key.to_bytes().iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out
}
