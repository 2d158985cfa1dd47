//! The Parallax service runtime.
//!
//! A service is a `no_std` binary linked with `service.ld` that names its
//! main function with [`entry!`] and its served interfaces with
//! [`interfaces!`]. At start it finds, in the startup information the kernel
//! mapped for it, its name, its generation and its handles by name
//! ([`handle`], [`require`]). It logs with defmt (frames go to the kernel's
//! log wire, decoded on the host with this service's ELF), calls other
//! services with a typed [`ipc::Client`] (which binds: checks the server's
//! schema key first), and serves with [`ipc::serve`], which also answers the
//! supervisor's lifecycle requests: snapshot and restore for live swaps, and
//! fault injection for tests.

#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod births;
pub mod ipc;
pub mod log;
pub mod rights;
pub mod sys;

pub use defmt;
pub use ipc_schema;

use core::sync::atomic::{AtomicPtr, Ordering};
#[cfg(target_os = "none")]
use ipc_schema::syscall::STARTUP_MAGIC;
use ipc_schema::syscall::{Handle, STARTUP_SUCCESSOR, StartupInfo, handle_name_str};

static STARTUP: AtomicPtr<StartupInfo> = AtomicPtr::new(core::ptr::null_mut());

/// The startup information.
pub fn startup() -> &'static StartupInfo {
    // Safety: set once in `start` to the kernel's read-only page, which stays
    // mapped for the service's life.
    unsafe { &*STARTUP.load(Ordering::Relaxed) }
}

/// This service's name.
pub fn name() -> &'static str {
    handle_name_str(&startup().name)
}

/// How many times this service was (re)started before this instance.
pub fn generation() -> u32 {
    startup().generation
}

/// Whether this instance takes over from a running one (a swap).
pub fn successor() -> bool {
    startup().flags & STARTUP_SUCCESSOR != 0
}

/// The slot of the handle named `name`, if the service has one.
pub fn handle(name: &str) -> Option<Handle> {
    let s = startup();
    (0..s.handle_count as usize)
        .find(|&i| handle_name_str(&s.handles[i]) == name)
        .map(|i| s.slots[i])
}

/// The handle named `name`; a service without it cannot work, so this
/// panics (the service faults and its supervisor decides).
pub fn require(name: &str) -> Handle {
    match handle(name) {
        Some(h) => h,
        None => panic!("this service has no handle named `{}`", name),
    }
}

/// Every handle name, with its slot.
pub fn handles() -> impl Iterator<Item = (&'static str, Handle)> {
    let s = startup();
    (0..s.handle_count as usize).map(move |i| (handle_name_str(&s.handles[i]), s.slots[i]))
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".section .text._start",
    ".global _start",
    "_start:",
    "and rsp, -16",
    "call {start}",
    "ud2",
    start = sym start,
);

#[cfg(target_os = "none")]
unsafe extern "Rust" {
    /// Defined by [`entry!`].
    fn __service_main() -> !;
}

#[cfg(target_os = "none")]
extern "C" fn start(info: *mut StartupInfo) -> ! {
    STARTUP.store(info, Ordering::Relaxed);
    let s = startup();
    if s.magic != STARTUP_MAGIC {
        panic!("no startup information");
    }
    log::TSC_AT_BOOT.store(s.tsc_at_boot, Ordering::Relaxed);
    log::TSC_HZ.store(s.tsc_hz, Ordering::Relaxed);
    // Safety: `entry!` defines it in the service binary.
    unsafe { __service_main() }
}

/// Names the service's main function: `fn main() -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn __service_main() -> ! {
            $main()
        }
    };
}

/// Declares the interfaces the service serves (their names and keys), in
/// the ELF section the supervisor checks before it starts a swapped-in ELF.
#[macro_export]
macro_rules! interfaces {
    ($($id:expr),+ $(,)?) => {
        #[used]
        #[unsafe(link_section = ".parallax.interfaces")]
        static __PARALLAX_INTERFACES: [$crate::ipc_schema::ipc::InterfaceDecl; [$(stringify!($id)),+].len()] =
            [$($id.decl()),+];
    };
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    defmt::error!("{=str} panicked: {}", name(), defmt::Display2Format(info));
    // A fault, not an exit: the supervisor restarts or holds per the manifest.
    loop {
        // Safety: an undefined instruction on purpose.
        unsafe { core::arch::asm!("ud2") };
    }
}

/// A defmt logger for host unit tests of service logic: frames are dropped
/// (the tests assert behaviour, not log lines). Invoke once per test crate.
#[macro_export]
macro_rules! host_logger {
    () => {
        #[defmt::global_logger]
        struct HostLogger;

        // Safety: frames are discarded, so there is nothing to protect.
        unsafe impl defmt::Logger for HostLogger {
            fn acquire() {}
            unsafe fn flush() {}
            unsafe fn release() {}
            unsafe fn write(_: &[u8]) {}
        }

        defmt::timestamp!("{=u64}", 0);
    };
}
