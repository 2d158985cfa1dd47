//! Building a domain the way a boot loader would start its kernel
//! (multiboot, multiboot2, PVH or Linux's own, as the image asks), with the kernel's
//! domain calls: RAM from fresh frames (2 MiB pages wherever a 2 MiB block
//! can be had), the image's segments and the information block written
//! into it, one vCPU at the entry point.

use crate::module_handle;
use ipc_schema::manifest;
use ipc_schema::syscall::layout::MAP_BASE;
use ipc_schema::syscall::{DomainOp, Handle, SysError, VcpuSpec};
use platform::multiboot::{
    self, BOOT_MAGIC, Format, GuestLayout, INFO_GPA, INFO_SIZE, ImageError, linux, mb2, pvh,
};
use service_runtime::sys;

/// Where init maps a guest image while it loads it.
const IMAGE_VA: u64 = MAP_BASE + (1 << 30);
/// Where init maps a guest's multiboot module while it copies it.
const MODULE_VA: u64 = MAP_BASE + (5 << 30);
const MIB: u64 = 1 << 20;
const PAGES_2M: u64 = 512;

/// Why a domain could not be built.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum BuildError {
    TooManyVcpus {
        asked: u8,
    },
    NoImage,
    Image(ImageError),
    Kernel(SysError),
    CmdlineTooLong,
    /// The kernel's modules do not fit in its RAM after it.
    ModulesTooLarge,
    /// A Linux kernel's `boot_params` could not be built (its command line
    /// or its initrd's place).
    Linux(linux::ParamsError),
    /// Devices are assigned but the machine has no usable IOMMU.
    NoIommu,
    /// The kernel refused this device (no unit covers it, nothing answers
    /// there, or it is attached already): segment, source id.
    Device {
        segment: u16,
        source: u16,
        error: SysError,
    },
    /// A reserved region meets the domain's RAM, under the strict policy
    /// (RMRR-5): its first and last byte.
    RmrrConflict {
        base: u64,
        limit: u64,
    },
    /// A reserved region is shared with a device that goes elsewhere
    /// (RMRR-6), or overlaps another without being the same (RMRR-7).
    RmrrRefused {
        base: u64,
        limit: u64,
    },
}

/// Who else has a device: (device, owner), the other domains' and the
/// services' (RMRR-6).
pub type Owners<'a> = [(manifest::PciDevice, &'a str)];

impl From<SysError> for BuildError {
    fn from(e: SysError) -> Self {
        BuildError::Kernel(e)
    }
}

/// What a built domain is.
pub struct Built {
    pub id: u16,
    pub large_pages: u32,
    pub small_pages: u32,
    pub entry: u32,
    pub format: Format,
}

#[allow(clippy::too_many_arguments)]
pub fn domain(
    domains: Handle,
    memory: Handle,
    spec: &manifest::Domain<'_>,
    id: u16,
    exits: Handle,
    violations: Handle,
    run: bool,
    others: &Owners<'_>,
) -> Result<Built, BuildError> {
    if spec.vcpus != 1 {
        return Err(BuildError::TooManyVcpus { asked: spec.vcpus });
    }
    let ram = u64::from(spec.memory_mib) * MIB;
    let layout = GuestLayout::new(ram);
    with_module(module(spec.guest)?, IMAGE_VA, |image| {
        build(
            domains, memory, spec, id, image, &layout, exits, violations, run, others,
        )
    })?
}

/// Boot module `name`: its handle, pages and bytes.
type BootModule = (Handle, u64, u64);

fn module(name: &str) -> Result<BootModule, BuildError> {
    let handle = module_handle(name).ok_or(BuildError::NoImage)?;
    let (count, len) = sys::frames_info(handle)?;
    Ok((handle, count, len))
}

/// `f` of a boot module's bytes, mapped read-only at `va` meanwhile.
fn with_module<R>(
    (handle, count, len): BootModule,
    va: u64,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, BuildError> {
    sys::frames_map(handle, 0, count, va, false)?;
    // Safety: the kernel mapped the module's `len` bytes read-only at `va`
    // (a window of init's that nothing else uses meanwhile); unmapped
    // below, after `f`, the slice's last use.
    let bytes = unsafe { core::slice::from_raw_parts(va as *const u8, len as usize) };
    let r = f(bytes);
    let _ = sys::frames_unmap(va, count);
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
fn build(
    domains: Handle,
    memory: Handle,
    spec: &manifest::Domain<'_>,
    id: u16,
    image: &[u8],
    layout: &GuestLayout,
    exits: Handle,
    violations: Handle,
    run: bool,
    others: &Owners<'_>,
) -> Result<Built, BuildError> {
    let plan = multiboot::plan(image, layout).map_err(BuildError::Image)?;
    let (mut large, mut small) = (0u32, 0u32);
    // Each piece of RAM is one frames object, given to the domain at once;
    // init keeps no handle to it.
    let mut give = |frames: Handle, gfn: u64, pages: u64, aligned: bool| {
        let mapped = sys::domain_map_ram(domains, id, gfn, frames, pages);
        let _ = sys::handle_close(frames);
        mapped?;
        if aligned {
            large += (pages / PAGES_2M) as u32;
            small += (pages % PAGES_2M) as u32;
        } else {
            small += pages as u32;
        }
        Ok::<(), BuildError>(())
    };
    let mut map = |gfn: u64, pages: u64, align: u64| -> Result<(), BuildError> {
        match sys::frames_alloc(memory, pages, align) {
            Ok(f) => give(f, gfn, pages, align == PAGES_2M),
            Err(_) => give(sys::frames_alloc(memory, pages, 1)?, gfn, pages, false),
        }
    };
    // Below 1 MiB: RAM up to the legacy hole; in the hole, the ROM area
    // (0xc0000-0xfffff) as zeroed memory that kernels may scan for BIOS
    // tables and find none; the VGA window stays unmapped.
    map(0, layout.hole.0 / 4096, 1)?;
    // (Around the host's reserved regions, for a domain with devices:
    // their identity maps come later, RMRR-4.)
    let reserved = host_rmrrs(spec);
    let (mut at, end) = (layout.rom.0 / 4096, layout.rom.1 / 4096);
    while at < end {
        if let Some(&(_, past)) = reserved.iter().find(|&&(s, e)| s <= at && at < e) {
            at = past;
            continue;
        }
        let next = reserved
            .iter()
            .map(|&(s, _)| s)
            .filter(|&s| s > at)
            .min()
            .unwrap_or(end)
            .min(end);
        map(at, next - at, 1)?;
        at = next;
    }
    // From the hole to the first 2 MiB boundary in 4 KiB pages; the rest in
    // one block, 2 MiB aligned (2 MiB pages), or, where no such block is
    // free, in 2 MiB pieces that may each be.
    let first = (2 * MIB).min(layout.ram_bytes);
    if first > layout.hole.1 {
        map(layout.hole.1 / 4096, (first - layout.hole.1) / 4096, 1)?;
    }
    if layout.ram_bytes > first {
        let pages = (layout.ram_bytes - first) / 4096;
        match sys::frames_alloc(memory, pages, PAGES_2M) {
            Ok(block) => give(block, first / 4096, pages, true)?,
            Err(_) => {
                let mut gpa = first;
                while gpa < layout.ram_bytes {
                    let chunk = (2 * MIB).min(layout.ram_bytes - gpa);
                    let align = if chunk == 2 * MIB { PAGES_2M } else { 1 };
                    map(gpa / 4096, chunk / 4096, align)?;
                    gpa += chunk;
                }
            }
        }
    }
    for s in &plan.segments {
        sys::domain_write(
            domains,
            id,
            s.gpa,
            &image[s.file_offset..s.file_offset + s.file_len],
        )?;
    }
    // A multiboot kernel's command line starts with the image's name, as
    // QEMU's `-kernel` gives it; multiboot2 (as GRUB's `multiboot2 FILE
    // ARGS` gives ARGS) and PVH kernels (as QEMU's `-append`) get the
    // manifest's alone.
    let mut cmdline: heapless::String<256> = heapless::String::new();
    let fits = if plan.format == Format::Multiboot {
        cmdline.push_str(spec.guest).is_ok()
            && (spec.cmdline.is_empty()
                || (cmdline.push(' ').is_ok() && cmdline.push_str(spec.cmdline).is_ok()))
    } else {
        cmdline.push_str(spec.cmdline).is_ok()
    };
    if !fits {
        return Err(BuildError::CmdlineTooLong);
    }
    // Multiboot modules after the image, page by page, as QEMU places them.
    let after = plan.end();
    let mut mods: heapless::Vec<BootModule, { manifest::MAX_GUEST_MODULES }> = heapless::Vec::new();
    let mut sizes: heapless::Vec<u64, { manifest::MAX_GUEST_MODULES }> = heapless::Vec::new();
    for m in &spec.modules {
        let found = module(m.module)?;
        let _ = (mods.push(found), sizes.push(found.2));
    }
    let placed = multiboot::place_modules::<{ manifest::MAX_GUEST_MODULES }>(
        after,
        &sizes,
        layout.ram_bytes,
    )
    .ok_or(BuildError::ModulesTooLarge)?;
    let mut listed: heapless::Vec<multiboot::InfoModule<'_>, { manifest::MAX_GUEST_MODULES }> =
        heapless::Vec::new();
    for ((m, &found), &(start, end)) in spec.modules.iter().zip(&mods).zip(&placed) {
        with_module(found, MODULE_VA, |bytes| {
            sys::domain_write(domains, id, u64::from(start), bytes)
        })??;
        let _ = listed.push(multiboot::InfoModule {
            start,
            end,
            string: m.cmdline,
        });
    }
    // ACPI tables in the EBDA, which the BIOS data area points at.
    let mut tables = [0u8; multiboot::acpi::TABLES_LEN];
    multiboot::acpi::build(&mut tables);
    sys::domain_write(domains, id, multiboot::acpi::TABLES_GPA, &tables)?;
    let segment = (multiboot::acpi::TABLES_GPA >> 4) as u16;
    sys::domain_write(
        domains,
        id,
        multiboot::acpi::EBDA_POINTER,
        &segment.to_le_bytes(),
    )?;
    let rsdp = multiboot::acpi::rsdp(&tables);
    let mut info = [0u8; INFO_SIZE];
    let (ram, loader) = (layout.ram_bytes, "Parallax");
    let (n, magic, entry) = match plan.format {
        Format::Multiboot => (
            multiboot::build_info(ram, &cmdline, loader, &listed, &mut info),
            BOOT_MAGIC,
            plan.entry,
        ),
        Format::Multiboot2 => (
            mb2::build_info(ram, &cmdline, loader, &listed, Some(rsdp), &mut info),
            mb2::BOOT_MAGIC,
            plan.entry,
        ),
        Format::Pvh => (
            pvh::build_start_info(
                INFO_GPA,
                ram,
                &cmdline,
                &listed,
                multiboot::acpi::TABLES_GPA,
                &mut info,
            ),
            0,
            plan.entry,
        ),
        // boot_params at INFO_GPA; the trampoline that enters the kernel
        // with ESI pointing there, and the command line, in the page after.
        Format::Linux => {
            let place = linux::Placement::at(INFO_GPA as u32);
            let initrd = listed.first().map(|m| (m.start, m.end));
            let params = linux::Params {
                ram_bytes: ram,
                place,
                cmdline: &cmdline,
                initrd,
                rsdp: multiboot::acpi::TABLES_GPA,
            };
            linux::build_boot_params(image, &plan, &params, &mut info)
                .map_err(BuildError::Linux)?;
            let trampoline = linux::trampoline(&place, plan.entry);
            sys::domain_write(domains, id, u64::from(place.trampoline), &trampoline)?;
            let mut line = [0u8; 257];
            line[..cmdline.len()].copy_from_slice(cmdline.as_bytes());
            sys::domain_write(
                domains,
                id,
                u64::from(place.cmdline),
                &line[..=cmdline.len()],
            )?;
            (
                Ok(info.len()),
                0,
                place.trampoline + linux::TRAMPOLINE_ENTRY,
            )
        }
    };
    let n = n.map_err(|_| BuildError::CmdlineTooLong)?;
    sys::domain_write(domains, id, INFO_GPA, &info[..n])?;
    let vcpu = VcpuSpec {
        entry,
        rax: u64::from(magic),
        rbx: INFO_GPA,
        exit_endpoint: exits,
        violation_endpoint: violations,
    };
    let mut buf = [0u8; 64];
    let spec_bytes = postcard::to_slice(&vcpu, &mut buf)
        .map_err(|_| BuildError::Kernel(SysError::BadArgument))?;
    devices(domains, spec, id, others)?;
    if run {
        sys::vcpu_create(domains, id, spec_bytes)?;
        sys::domain_control(domains, id, DomainOp::Start)?;
    }
    Ok(Built {
        id,
        large_pages: large,
        small_pages: small,
        entry: plan.entry,
        format: plan.format,
    })
}

/// Assigns the domain's devices: one IoSpace for them all, mapping its
/// whole RAM at bus address = guest-physical address, and their reserved
/// regions identity-mapped in its p2m and the IoSpace (RMRR-4), each
/// device attached to it (their DMA reaches that memory and nothing else).
pub fn devices(
    domains: Handle,
    spec: &manifest::Domain<'_>,
    id: u16,
    others: &Owners<'_>,
) -> Result<(), BuildError> {
    if spec.devices.is_empty() && !spec.rmrr_host {
        return Ok(());
    }
    let root = service_runtime::handle("iommu").ok_or(BuildError::NoIommu)?;
    let pages = u64::from(spec.memory_mib) * MIB / 4096;
    let hole = GuestLayout::new(u64::from(spec.memory_mib) * MIB).hole;
    let ram = |gfn: u64| gfn < pages && !(hole.0 / 4096..hole.1 / 4096).contains(&gfn);
    let identity = rmrrs(root, spec, &ram, others)?;
    if spec.devices.is_empty() {
        return Ok(());
    }
    let space = sys::iospace_create(root)?;
    // Identity maps first: their frames become the domain's (gfn = frame).
    let mut extra: heapless::Vec<(u64, u64), 16> = heapless::Vec::new();
    for &(index, base, limit, refs) in &identity {
        let frames = sys::iommu_rmrr_frames(root, index)?;
        let count = (limit + 1 - base) / 4096;
        sys::domain_map_ram(domains, id, base / 4096, frames, count)?;
        let _ = sys::handle_close(frames);
        let _ = extra.push((base / 4096, count));
        defmt::info!(
            "domain {=u16} ({=str}): RMRR {=u64:#x}..={=u64:#x} identity-mapped in its p2m and IOMMU tables for {=u16} device(s) (RMRR-4, RMRR-7)",
            id,
            spec.name,
            base,
            limit,
            refs
        );
    }
    let gfns = (0..pages)
        .filter(|&g| ram(g))
        .chain(extra.iter().flat_map(|&(g, n)| g..g + n));
    let mut pairs: heapless::Vec<[u64; 2], 512> = heapless::Vec::new();
    for gfn in gfns {
        let _ = pairs.push([gfn, gfn]);
        if pairs.is_full() {
            sys::iospace_map_raw(space, domains, id, &pairs, true)?;
            pairs.clear();
        }
    }
    if !pairs.is_empty() {
        sys::iospace_map_raw(space, domains, id, &pairs, true)?;
    }
    for &d in spec.devices.iter() {
        let d = d.device;
        let fail = |error| BuildError::Device {
            segment: d.segment,
            source: d.source,
            error,
        };
        let h = crate::supervise::device(root, d).map_err(fail)?;
        let attached = sys::iospace_attach(space, h, true);
        // Init's handle table is small: the attachment outlives the handle.
        let _ = sys::handle_close(h);
        attached.map_err(fail)?;
        defmt::info!(
            "domain {=u16} ({=str}): device {=u16:04x}:{=u8:02x}:{=u8:02x}.{=u8} assigned: its DMA reaches the domain's {=u64} pages at bus address = guest-physical address",
            id,
            spec.name,
            d.segment,
            d.bus(),
            d.device(),
            d.function(),
            pages
        );
    }
    let _ = sys::handle_close(space);
    Ok(())
}

/// The host's reserved regions (first and past-the-end gfn) where the
/// domain has devices or `rmrr = "host"`: what its ROM area leaves out, so
/// that an identity map can go there.
fn host_rmrrs(spec: &manifest::Domain<'_>) -> heapless::Vec<(u64, u64), 16> {
    let mut out = heapless::Vec::new();
    if spec.devices.is_empty() && !spec.rmrr_host {
        return out;
    }
    let Some(root) = service_runtime::handle("iommu") else {
        return out;
    };
    let mut scopes = [0u32; 32];
    for index in 0..64 {
        let Ok((base, limit, _)) = sys::iommu_rmrr(root, index, &mut scopes) else {
            break;
        };
        let _ = out.push((base / 4096, limit / 4096 + 1));
    }
    out
}

/// The reserved regions the domain's devices need (and, with `rmrr =
/// "host"`, a check of every region): (index, first byte, last byte,
/// devices needing it), after the policies (RMRR-2..RMRR-7).
fn rmrrs(
    root: Handle,
    spec: &manifest::Domain<'_>,
    ram: &dyn Fn(u64) -> bool,
    others: &Owners<'_>,
) -> Result<heapless::Vec<(u64, u64, u64, u16), 16>, BuildError> {
    let mut out: heapless::Vec<(u64, u64, u64, u16), 16> = heapless::Vec::new();
    let mut scopes = [0u32; 32];
    for index in 0..64 {
        let Ok((base, limit, n)) = sys::iommu_rmrr(root, index, &mut scopes) else {
            break;
        };
        let meets_ram = (base / 4096..=limit / 4096).any(ram);
        let key = |d: manifest::PciDevice| u32::from(d.segment) << 16 | u32::from(d.source);
        let mine: heapless::Vec<manifest::DomainDevice, 8> = spec
            .devices
            .iter()
            .copied()
            .filter(|d| scopes[..n].contains(&key(d.device)))
            .collect();
        if mine.is_empty() {
            if spec.rmrr_host && meets_ram {
                if spec.rmrr_relaxed {
                    defmt::warn!(
                        "domain {=str}: the host's RMRR {=u64:#x}..={=u64:#x} meets its RAM (rmrr = \"host\", relaxed: going on)",
                        spec.name,
                        base,
                        limit
                    );
                } else {
                    defmt::error!(
                        "domain {=str}: the host's RMRR {=u64:#x}..={=u64:#x} meets its RAM (rmrr = \"host\", strict): not built (RMRR-2, RMRR-5)",
                        spec.name,
                        base,
                        limit
                    );
                    return Err(BuildError::RmrrConflict { base, limit });
                }
            }
            continue;
        }
        let d = mine[0].device;
        // RMRR-6: the region's other devices go nowhere else.
        for &s in &scopes[..n] {
            if let Some((o, owner)) = others.iter().find(|(o, _)| key(*o) == s) {
                defmt::error!(
                    "domain {=str}: device {=u8:02x}:{=u8:02x}.{=u8} shares RMRR {=u64:#x}..={=u64:#x} with device {=u8:02x}:{=u8:02x}.{=u8}, which goes to {=str}: devices that share a reserved region cannot go to different owners (RMRR-6)",
                    spec.name,
                    d.bus(),
                    d.device(),
                    d.function(),
                    base,
                    limit,
                    o.bus(),
                    o.device(),
                    o.function(),
                    owner
                );
                return Err(BuildError::RmrrRefused { base, limit });
            }
        }
        if meets_ram {
            if mine.iter().all(|d| d.rmrr_relaxed) {
                defmt::warn!(
                    "domain {=str}: RMRR {=u64:#x}..={=u64:#x} of device {=u8:02x}:{=u8:02x}.{=u8} meets its RAM: not identity-mapped (relaxed policy; the device's accesses there reach the guest's RAM or fault) (RMRR-5)",
                    spec.name,
                    base,
                    limit,
                    d.bus(),
                    d.device(),
                    d.function()
                );
                continue;
            }
            defmt::error!(
                "domain {=str}: RMRR {=u64:#x}..={=u64:#x} of device {=u8:02x}:{=u8:02x}.{=u8} meets its RAM: not built (strict policy, RMRR-5)",
                spec.name,
                base,
                limit,
                d.bus(),
                d.device(),
                d.function()
            );
            return Err(BuildError::RmrrConflict { base, limit });
        }
        if base % 4096 != 0 || (limit + 1) % 4096 != 0 {
            return Err(BuildError::RmrrRefused { base, limit });
        }
        // RMRR-7: the same region once, counted; an overlapping one refused.
        if let Some(e) = out.iter_mut().find(|e| e.1 == base && e.2 == limit) {
            e.3 += mine.len() as u16;
            continue;
        }
        if let Some(e) = out.iter().find(|e| e.1 <= limit && base <= e.2) {
            defmt::error!(
                "domain {=str}: RMRR {=u64:#x}..={=u64:#x} overlaps RMRR {=u64:#x}..={=u64:#x} without being the same: refused (RMRR-7)",
                spec.name,
                base,
                limit,
                e.1,
                e.2
            );
            return Err(BuildError::RmrrRefused { base, limit });
        }
        let _ = out.push((index, base, limit, mine.len() as u16));
    }
    Ok(out)
}
