//! The vmm service's logic: what an exit means (see [`exits`]). The binary
//! (`main.rs`) connects it to the kernel and the altp2m service.

#![no_std]

pub mod cmos;
pub mod decode;
pub mod exits;
pub mod ioapic;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod pit;

#[cfg(test)]
mod decode_tests;
#[cfg(test)]
mod tests;
