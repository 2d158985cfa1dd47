//! The console service's logic: one control session (see [`session`]). The
//! binary (`main.rs`) drives it from the second serial port.

#![no_std]

pub mod session;

#[cfg(test)]
mod tests;
