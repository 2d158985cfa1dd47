//! Hardware knowledge shared by the kernel and the services.
//!
//! Everything here either touches hardware through one small, documented
//! primitive (port I/O, MSRs, CPUID) or is a pure function of bytes and
//! numbers that the host's unit tests exercise: the ACPI and DMAR parsers, the
//! decoding of CPU and VMX capabilities, the arithmetic of physical memory
//! regions. Decoders never trust their input: a short, truncated or
//! inconsistent table is an error value naming what was wrong, never a panic
//! and never a read outside the bytes given.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod acpi;
pub mod copy;
pub mod cpu;
pub mod devices;
pub mod elf;
pub mod ept;
pub mod memory;
pub mod multiboot;
pub mod pci;
pub mod port;
pub mod power;
pub mod records;
pub mod serial;
pub mod span;
pub mod vmx;
pub mod vtd;

/// Size of the smallest page and of a physical frame.
pub const PAGE_SIZE: u64 = 4096;
