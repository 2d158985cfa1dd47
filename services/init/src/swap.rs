//! Swapping a running service for a new ELF while everything else runs.
//!
//! The console service has written the new ELF into the shared `swap`
//! frames. Init checks it (an ELF Parallax can load, declaring every
//! interface the running service declares), copies it into fresh frames,
//! starts it as a successor with the same handles and a new lifecycle
//! endpoint, moves the old instance's state across (snapshot, restore), ends
//! the old instance, and lets the new one serve. Callers of the service see
//! its endpoints change generation once and bind again.

use crate::supervise::{SCRATCH_VA, Supervisor, declarations, map_frames, spawn};
use ipc_schema::lifecycle::{LIFECYCLE, LifecycleReply, LifecycleRequest};
use ipc_schema::supervisor::Refusal;
use ipc_schema::syscall::SysError;
use ipc_schema::syscall::layout::MAP_BASE;
use service_runtime::ipc::Client;
use service_runtime::sys;

/// Where init maps the swap buffer and the copy of the new ELF.
const SWAP_VA: u64 = MAP_BASE + (3 << 30);
const COPY_VA: u64 = MAP_BASE + (4 << 30);

pub fn swap(sup: &mut Supervisor, index: usize, len: u32) -> Result<u32, Refusal> {
    let name = sup.manifest.services[sup.services[index].spec].name;
    let kernel = |e: SysError| Refusal::Kernel { error: e as u64 };
    let buffer = sup.shared("swap").ok_or(Refusal::SwapFailed)?;
    let shared = map_frames(buffer, SWAP_VA).map_err(kernel)?;
    let elf = shared.get(..len as usize).ok_or(Refusal::NotElf)?;
    if let Err(e) = platform::elf::Elf::parse(elf) {
        defmt::warn!(
            "init: swap of {=str} refused: the file is not an x86-64 ELF executable ({})",
            name,
            e
        );
        return Err(Refusal::NotElf);
    }
    let new_decls = declarations(elf);
    let old_elf = map_frames(sup.services[index].elf, SCRATCH_VA).map_err(kernel)?;
    for old in declarations(old_elf) {
        if !new_decls
            .iter()
            .any(|n| n.name == old.name && n.key == old.key)
        {
            let other = new_decls
                .iter()
                .find(|n| n.name == old.name)
                .map_or([0; 8], |n| n.key);
            defmt::warn!(
                "init: swap of {=str} refused: the new ELF does not serve {=str} with key {=[u8; 8]:02x} (it declares {=[u8; 8]:02x})",
                name,
                old.name(),
                old.key,
                other
            );
            return Err(Refusal::MissingInterface { key: old.key });
        }
    }
    // The new ELF gets frames of its own: the swap buffer will be reused.
    let pages = u64::from(len).div_ceil(4096);
    let frames = sys::frames_alloc(sup.memory, pages, 1).map_err(kernel)?;
    sys::frames_map(frames, 0, pages, COPY_VA, true).map_err(kernel)?;
    // Safety: the kernel just mapped `pages` writable pages at COPY_VA.
    unsafe { core::ptr::copy_nonoverlapping(elf.as_ptr(), COPY_VA as *mut u8, elf.len()) };
    let _ = sys::frames_unmap(COPY_VA, pages);

    // The successor: the same handles (what was derived for the old
    // instance alone is derived again), its own lifecycle endpoint.
    let spec = sup.services[index].spec;
    let (grants, lifecycle, _) = sup.grants(spec).map_err(|e| {
        let _ = sys::handle_close(frames);
        kernel(e)
    })?;
    let spawned = spawn(name, frames, &grants, true);
    sup.release(spec, &grants);
    let process = spawned.map_err(|e| {
        let _ = sys::handle_close(lifecycle);
        let _ = sys::handle_close(frames);
        kernel(e)
    })?;
    let bit = 1u64 << sup.services[index].spec;
    let _ = sys::fault_watch(process, sup.faults, bit);
    let mut new = Client::new(lifecycle, LIFECYCLE);

    // Move the state, chunk by chunk, from the old instance (which stops
    // serving at the first) straight to the new one: init holds no copy.
    let mut offset = 0u32;
    let moved = loop {
        let old = &mut sup.services[index];
        let (total, bytes, more) = match crate::supervise::lifecycle(
            old.process,
            &mut old.lifecycle,
            &LifecycleRequest::Snapshot { offset },
        ) {
            Ok(LifecycleReply::Chunk { total, bytes, more }) => (total, bytes, more),
            Ok(LifecycleReply::TooLarge) => {
                defmt::error!(
                    "init: swap of {=str}: the running instance's state does not fit a snapshot; keeping it",
                    name
                );
                break false;
            }
            other => {
                defmt::error!(
                    "init: swap of {=str}: the running instance gave no snapshot ({})",
                    name,
                    other.err()
                );
                break false;
            }
        };
        let n = bytes.0.len() as u32;
        if !matches!(
            new.call_once::<_, LifecycleReply>(&LifecycleRequest::Restore {
                offset,
                total,
                bytes,
            }),
            Ok(LifecycleReply::Done)
        ) {
            defmt::error!(
                "init: swap of {=str}: the new instance refused the state at byte {=u32}",
                name,
                offset
            );
            break false;
        }
        offset += n;
        if !more || n == 0 {
            break !more;
        }
    };
    let resumed = moved
        && matches!(
            new.call_once::<_, LifecycleReply>(&LifecycleRequest::Resume),
            Ok(LifecycleReply::Done)
        );
    if !resumed {
        defmt::error!(
            "init: swap of {=str}: the state did not move; keeping the old instance",
            name
        );
        abandon(process, &new, frames);
        // Serving again (an instance that never went quiet just answers).
        let old = &mut sup.services[index];
        let _ =
            crate::supervise::lifecycle(old.process, &mut old.lifecycle, &LifecycleRequest::Resume);
        return Err(Refusal::SwapFailed);
    }
    // The old instance ends; the new one serves its endpoints from now on.
    let old = &mut sup.services[index];
    let _ = sys::kill(old.process);
    let _ = sys::handle_close(old.process);
    let _ = sys::handle_close(old.lifecycle.handle());
    if old.elf_swapped {
        let _ = sys::handle_close(old.elf);
    }
    old.process = process;
    old.lifecycle = new;
    old.elf = frames;
    old.elf_swapped = true;
    old.generation += 1;
    old.key = new_decls.first().map_or([0; 8], |d| d.key);
    defmt::info!(
        "init: swapped service {=str}: {=usize} bytes of state moved to the new instance (generation {=u32})",
        name,
        offset as usize,
        old.generation
    );
    let generation = old.generation;
    sup.record_swap(name, generation);
    Ok(generation)
}

/// Ends a successor that will not serve, and closes init's handles to it.
fn abandon(
    process: ipc_schema::syscall::Handle,
    lifecycle: &Client,
    frames: ipc_schema::syscall::Handle,
) {
    let _ = sys::kill(process);
    let _ = sys::handle_close(process);
    let _ = sys::handle_close(lifecycle.handle());
    let _ = sys::handle_close(frames);
}
