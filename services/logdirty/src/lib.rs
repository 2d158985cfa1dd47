//! The logdirty service's logic: every dirty-page log of every domain
//! ([`logs`]) and the bits they are kept in ([`bitmap`]). The binary
//! (`main.rs`) connects it to the kernel, the altp2m service and the
//! supervisor (LD-1..LD-5, docs/logdirty.md).

#![no_std]

extern crate alloc;

pub use service_bitmap as bitmap;
pub mod logs;
pub mod selfbench;

#[cfg(test)]
mod tests;
