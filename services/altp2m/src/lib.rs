//! The altp2m service's logic: the views' model and its operations
//! ([`policy`]), violations and their listener ([`events`]), and the range
//! map the access settings live in ([`intervals`]). The binary (`main.rs`)
//! connects it to the kernel and the other services.

#![no_std]

extern crate alloc;

pub mod events;
pub mod intervals;
pub mod policy;

#[cfg(test)]
mod tests;
