//! The runtime of Parallax's test guests.
//!
//! A test guest is a small multiboot (version 1) kernel that boots on plain
//! QEMU (`qemu-system-x86_64 -kernel GUEST`) and as a Parallax domain. This
//! crate gives it everything below `main`:
//!
//! - the multiboot header (with the "a.out kludge", so QEMU loads the 64-bit
//!   ELF) and the 32-bit entry that checks the magic, identity-maps the first
//!   4 GiB with 2 MiB pages and enters long mode (module `boot`);
//! - an IDT for the 32 exception vectors: #UD and #VE go to handlers a guest
//!   registers ([`idt`]); everything else is reported and ends the guest;
//! - COM1 output ([`print!`], [`println!`]) and [`exit`] through port 0xf4;
//! - the multiboot information, parsed ([`MultibootInfo`]);
//! - CPUID, RDTSC, HLT ([`cpu`]);
//! - hypercalls ([`hypercall`]), VMFUNC and the #VE information area
//!   ([`vmx`]), and page-aligned static buffers ([`mem`]).
//!
//! # Writing a guest
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use guest_runtime::{MultibootInfo, println};
//!
//! guest_runtime::entry!(main);
//!
//! fn main(info: &MultibootInfo) -> u32 {
//!     println!("hello");
//!     0 // the exit status
//! }
//! ```
//!
//! The guest's `build.rs` links it with this crate's `guest.ld` (at
//! physical 1 MiB, one RWX segment):
//! `cargo:rustc-link-arg-bins=-T<dir>/../runtime/guest.ld`.
//!
//! # Exit statuses
//!
//! | status | meaning |
//! |---|---|
//! | what `main` returns | the guest's verdict (0 success) |
//! | 0xED | panic (`guest: panic: <message>`) |
//! | 0xEE | unhandled CPU exception (`guest: exception <name> (vector N) at rip ...`) |
//! | 0xEF | not started by a multiboot loader (wrong EAX) |
//!
//! On QEMU with `-device isa-debug-exit,iobase=0xf4,iosize=4` the process
//! exits with `(status << 1) | 1`; under Parallax the domain ends with
//! `status`.
//!
//! # The guests
//!
//! Built with `cargo build --release --target x86_64-unknown-none -p
//! guest-NAME`; each crate's docs say what it checks.
//!
//! | guest | needs Parallax | checks |
//! |---|---|---|
//! | `guest-hello` | no | boots, prints its command line and RAM, exits 0 |
//! | `guest-cpuid` | no | VMX hidden (else status 1); shows the hypervisor leaves |
//! | `guest-unmapped` | no | reads GPA 1 GiB: Parallax must end the domain there (on QEMU: status 3) |
//! | `guest-vmfunc` | yes | remapped gfn in an alternate view, exit-free VMFUNC, #UD for an invisible view |
//! | `guest-ve` | yes | a write to a read-only page in a view delivered as #VE |
//! | `guest-pml` | yes | every page written after `DirtyLogStart` is reported |
//! | `guest-bench` | yes | `BENCH key=value` lines: hypercall, VMFUNC, EPT-violation and view-switch costs |
//!
//! On plain QEMU a guest that needs Parallax stops at its first hypercall
//! (VMCALL raises #UD): `guest: exception invalid opcode (#UD) ...`, status
//! 0xEE. `guest-vmfunc` with the command line `selftest=ud` checks its #UD
//! path without a hypervisor.
//!
//! Run one on QEMU:
//! `qemu-system-x86_64 -kernel GUEST -append "ARGS" -m 64M -display none
//! -serial stdio -device isa-debug-exit,iobase=0xf4,iosize=4 -no-reboot`.
//!
//! # Machine state
//!
//! One CPU, interrupts disabled throughout, 64-bit mode, the first 4 GiB
//! identity-mapped (so a guest address is its guest-physical address), a
//! 64 KiB stack, no SSE (the target is soft-float).
#![no_std]

mod boot;
pub mod cpu;
pub mod hypercall;
pub mod idt;
pub mod mem;
pub mod multiboot;
pub mod serial;
pub mod vmx;

pub use boot::{STACK_SIZE, STATUS_BAD_BOOT};
pub use cpu::{Cpuid, cpuid, exit, hlt, rdtsc};
pub use hypercall::{
    CallError, call, exit_count, ipc_ping, null, service_info, service_null, view_switch,
};
pub use idt::{STATUS_EXCEPTION, TrapFrame};
pub use mem::{LargePage, PAGE_SIZE, Pages, gfn_of};
pub use multiboot::{MemoryRange, MultibootInfo};
pub use vmx::{VeInfo, ve_clear_busy, ve_info, ve_info_gfn, vmfunc_switch};

/// The hypercall ABI (`ipc_schema::hypercall`): `Request`, `Reply`,
/// `Status`, `Access`, `HcError`, ...
pub use ipc_schema::hypercall as abi;

/// The exit status after a panic.
pub const STATUS_PANIC: u32 = 0xed;

/// Defines the guest's entry: `entry!(main)` with
/// `fn main(info: &MultibootInfo) -> u32`; the return value is the exit
/// status.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The guest's entry, called by the runtime after boot.
        #[unsafe(no_mangle)]
        pub fn guest_main(info: &$crate::MultibootInfo) -> u32 {
            let main: fn(&$crate::MultibootInfo) -> u32 = $main;
            main(info)
        }
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(at) => println!(
            "guest: panic: {} (at {}:{})",
            info.message(),
            at.file(),
            at.line()
        ),
        None => println!("guest: panic: {}", info.message()),
    }
    exit(STATUS_PANIC)
}

/// Counts failed checks, printing each as `FAIL: ...`.
pub struct Checks(pub u32);

impl Checks {
    /// A check: `ok`, or a failure described by `what`.
    pub fn check(&mut self, ok: bool, what: core::fmt::Arguments<'_>) {
        if !ok {
            println!("FAIL: {what}");
            self.0 += 1;
        }
    }
}
