//! The altp2m service's logic (see [`policy`]). The binary (`main.rs`)
//! connects it to the kernel and serves the violation and altp2m endpoints.

#![no_std]

pub mod policy;

#[cfg(test)]
mod tests;
