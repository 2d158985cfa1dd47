//! init: the supervisor.
//!
//! The kernel starts init with every root object (memory, the system, the
//! domains, all I/O ports and interrupt lines, one frames object per boot
//! module) and nothing else runs until init starts it. Init:
//!
//! 1. reads the system manifest (boot module `manifest`) and checks that
//!    every module it names is in the image;
//! 2. creates the objects the manifest names (endpoints, notifications,
//!    shared frames) and starts each service with exactly the handles the
//!    manifest gives it, plus its lifecycle endpoint;
//! 3. builds each domain: RAM, the guest image loaded like a multiboot
//!    loader would, the vCPU, started;
//! 4. supervises: restarts a faulted service per its disposition and rate
//!    limit, answers the supervisor interface (the console service asks on
//!    behalf of the host), carries out service swaps, and halts the system
//!    when every domain has ended.

#![no_std]
#![no_main]

mod build;
mod supervise;
mod swap;

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use ipc_schema::halt::HaltStatus;
use ipc_schema::manifest::Manifest;
use ipc_schema::syscall::layout::MAP_BASE;
use service_runtime::{require, sys};

service_runtime::entry!(main);
service_runtime::interfaces!(ipc_schema::supervisor::SUPERVISOR);

/// Where init maps the manifest (read-only).
const MANIFEST_VA: u64 = MAP_BASE;

fn main() -> ! {
    let system = require("system");
    defmt::info!(
        "init: starting (generation {=u32})",
        service_runtime::generation()
    );
    let manifest = match read_manifest() {
        Ok(m) => m,
        Err(()) => sys::halt(system, HaltStatus::BadBootInput.code()),
    };
    defmt::info!(
        "manifest: system {=str}, {=usize} service(s), {=usize} domain(s)",
        manifest.name,
        manifest.services.len(),
        manifest.domains.len()
    );
    let mut missing = false;
    for m in manifest.modules() {
        if module_handle(m).is_none() {
            let what = if manifest.services.iter().any(|s| s.module == m) {
                "a service"
            } else {
                "a guest image"
            };
            defmt::error!(
                "boot module `{=str}` is missing: the manifest names it as {=str}",
                m,
                what
            );
            missing = true;
        }
    }
    if missing {
        sys::halt(system, HaltStatus::BadBootInput.code());
    }
    let sup = keep(supervise::Supervisor::new(system, manifest));
    if let Err(status) = sup.create_domains() {
        sys::halt(system, status.code());
    }
    if let Err(status) = sup.start_services() {
        sys::halt(system, status.code());
    }
    if let Err(status) = sup.build_domains() {
        sys::halt(system, status.code());
    }
    sup.run()
}

/// The supervisor's state (tens of KiB) lives here, not on the stack.
struct Home(UnsafeCell<MaybeUninit<supervise::Supervisor>>);

// Safety: init is single-threaded.
unsafe impl Sync for Home {}

static HOME: Home = Home(UnsafeCell::new(MaybeUninit::uninit()));

/// Stores the supervisor in [`HOME`]; called once, from `main`.
fn keep(s: supervise::Supervisor) -> &'static mut supervise::Supervisor {
    // Safety: `main` calls this once, so no other reference to HOME exists.
    unsafe { (*HOME.0.get()).write(s) }
}

/// The handle of boot module `name`.
pub fn module_handle(name: &str) -> Option<ipc_schema::syscall::Handle> {
    let mut n: heapless::String<32> = heapless::String::new();
    n.push_str("module:").ok()?;
    n.push_str(name).ok()?;
    service_runtime::handle(&n)
}

/// Maps the manifest module and decodes it (strings borrow from the mapping,
/// which stays for init's life).
fn read_manifest() -> Result<Manifest<'static>, ()> {
    let Some(h) = module_handle("manifest") else {
        defmt::error!(
            "boot module `manifest` is missing: the image has no system manifest (the image builder adds it)"
        );
        return Err(());
    };
    let (count, len) = sys::frames_info(h).map_err(|e| defmt::error!("manifest: {}", e))?;
    sys::frames_map(h, 0, count, MANIFEST_VA, false)
        .map_err(|e| defmt::error!("manifest: cannot map it: {}", e))?;
    // Safety: the kernel mapped `len` bytes (in `count` frames) read-only at
    // MANIFEST_VA, and init never unmaps them.
    let bytes = unsafe { core::slice::from_raw_parts(MANIFEST_VA as *const u8, len as usize) };
    Manifest::decode(bytes).map_err(|e| {
        defmt::error!("boot module `manifest` is not a usable manifest: {}", e);
        if let ipc_schema::manifest::ManifestError::WrongKey { found, expected } = e {
            defmt::error!(
                "manifest schema key {=[u8]:02x}, this init expects {=[u8]:02x}: rebuild the image",
                found,
                expected
            );
        }
    })
}
