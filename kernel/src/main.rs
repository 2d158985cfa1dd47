//! The Parallax kernel.
//!
//! Principles, in the order they break ties:
//! 1. Mechanism, not policy. The kernel boots the machine, enters and leaves
//!    guests, switches EPT pointers and checks capabilities. Anything a
//!    service could decide, a service decides.
//! 2. Small enough to hold in your head. Simple, clear algorithms over fast
//!    and clever ones; fixed-size structures over allocation.
//! 3. Bad input is an error with a name, never a crash: the boot information,
//!    the manifest and the firmware's tables are all input.
//! 4. Every `unsafe` block says why it holds (`// Safety:`), and unsafe
//!    operations inside unsafe functions are still marked.
//!
//! This file is the boot sequence, top to bottom; each step lives in its own
//! module.
#![no_std]
#![no_main]
#![forbid(unsafe_op_in_unsafe_fn)]

mod acpi;
mod apic;
mod arch;
mod boot;
mod bootinfo;
mod halt;
mod log;
mod mem;
mod time;
mod vm;
mod vmm;
mod vmx;

use bootinfo::BootInfo;
use ipc_schema::halt::HaltStatus;
use ipc_schema::manifest::Manifest;
use platform::cpu::CpuInfo;

/// The kernel's GNU build id (`--build-id`), announced with its log so the
/// host decodes it with the matching ELF.
pub fn build_id() -> &'static [u8] {
    unsafe extern "C" {
        static __build_id_start: u8;
        static __build_id_end: u8;
    }
    // Safety: the linker script brackets the `.note.gnu.build-id` section,
    // read-only data, with these symbols.
    let note = unsafe {
        let start = &raw const __build_id_start;
        let len = (&raw const __build_id_end).offset_from(start) as usize;
        core::slice::from_raw_parts(start, len)
    };
    // An ELF note: namesz, descsz, type, "GNU\0", then the id.
    if note.len() < 16 {
        return &[];
    }
    let descsz = u32::from_le_bytes([note[4], note[5], note[6], note[7]]) as usize;
    note.get(16..16 + descsz).unwrap_or(&[])
}

/// Entered from `boot.rs` in 64-bit mode on the high-half stack, with the
/// multiboot2 magic and the physical address of the boot information.
pub extern "C" fn kmain(magic: u32, info: u32) -> ! {
    time::start();
    log::init();
    arch::percpu::init_cpu(0);
    let tsc_hz = time::calibrate();
    defmt::info!("Parallax {=str}", env!("CARGO_PKG_VERSION"));
    match tsc_hz {
        Some(hz) => defmt::info!("time: TSC at {=u64} kHz", hz / 1000),
        None => defmt::warn!("time: the PIT did not count; timestamps stay at zero"),
    }

    let boot = match BootInfo::read(magic, info) {
        Ok(b) => b,
        Err(e) => {
            defmt::error!("boot information unusable: {}", e);
            halt::stop(HaltStatus::BadBootInput)
        }
    };
    defmt::info!(
        "boot: loaded by {=str}, command line {=str:?}",
        boot.loader,
        boot.cmdline
    );
    selftest(&boot);

    match mem::init(&boot) {
        Ok(m) => {
            defmt::info!(
                "memory: {=u64} MiB usable in {=usize} range(s); frame bitmap at {=u64:#x}",
                m.usable_bytes >> 20,
                m.regions,
                m.bitmap.start
            );
            if m.above_direct_map > 0 {
                defmt::warn!(
                    "memory: {=u64} MiB above 4 GiB not used yet",
                    m.above_direct_map >> 20
                );
            }
        }
        Err(e) => {
            defmt::error!("memory: cannot set up the frame allocator: {}", e);
            halt::stop(HaltStatus::BadBootInput)
        }
    }
    for m in &boot.modules {
        defmt::info!(
            "module {=str}: {=u64} bytes at {=u64:#x}",
            m.name,
            m.region.len(),
            m.region.start
        );
    }

    let manifest = read_manifest(&boot);

    let acpi = match acpi::read(boot.rsdp) {
        Ok(a) => Some(a),
        Err(e) => {
            defmt::warn!("ACPI unusable: {}", e);
            None
        }
    };
    if let Some(a) = &acpi {
        defmt::info!("ACPI: {=u32} CPU(s), {=u32} IOAPIC(s)", a.cpus, a.ioapics);
        match &a.dmar {
            Some(d) => acpi::log_dmar(d),
            None => defmt::warn!("no DMAR table: no IOMMU, so no DMA remapping for devices"),
        }
    }

    let cpu = CpuInfo::read();
    for leaf in [
        0,
        1,
        0x8000_0000,
        0x8000_0001,
        0x8000_0002,
        0x8000_0003,
        0x8000_0004,
        0x8000_0007,
        0x8000_0008,
    ] {
        let r = platform::cpu::cpuid(leaf, 0);
        defmt::debug!(
            "CPUID {=u32:#x}: {=u32:#x} {=u32:#x} {=u32:#x} {=u32:#x}",
            leaf,
            r.eax,
            r.ebx,
            r.ecx,
            r.edx
        );
    }
    defmt::info!(
        "CPU: {=str} {=str}, family {=u32:#x} model {=u32:#x} stepping {=u32}, {=u8}-bit physical addresses, x2APIC {=bool}, 1 GiB pages {=bool}, under a hypervisor {=bool}",
        cpu.vendor_str(),
        cpu.brand_str(),
        cpu.family,
        cpu.model,
        cpu.stepping,
        cpu.phys_addr_bits,
        cpu.x2apic,
        cpu.page_1g,
        cpu.hypervisor
    );
    match apic::init(cpu.x2apic) {
        Ok(mode) => defmt::info!("local APIC: {}", mode),
        Err(e) => defmt::warn!("local APIC unusable: {=str}", e),
    }
    let vmx = vmx::probe(&cpu);
    if let Err(why) = &vmx {
        match why {
            platform::vmx::VmxUnavailable::NoVmx => {
                defmt::warn!(
                    "VMX: not available (CPUID.1:ECX.VMX[bit 5] = 0): guests cannot run on this CPU"
                )
            }
            other => defmt::warn!("VMX: unusable: {}", other),
        }
    }

    defmt::info!(
        "boot complete: system {=str}, {=usize} domain(s)",
        manifest.name,
        manifest.domains.len()
    );
    if manifest.domains.is_empty() {
        halt::stop(HaltStatus::Success);
    }
    match vmx {
        Ok(caps) => halt::stop(vm::run(&manifest, &boot, caps)),
        Err(_) => {
            defmt::error!(
                "the manifest asks for {=usize} domain(s) but this CPU cannot run guests (no usable VMX)",
                manifest.domains.len()
            );
            halt::stop(HaltStatus::Unsupported)
        }
    }
}

/// Reads the compiled manifest and checks that every module it names is in
/// the image. Any problem stops the run: nothing sensible can start without
/// a trustworthy manifest.
fn read_manifest(boot: &BootInfo) -> Manifest<'static> {
    let Some(module) = boot.module("manifest") else {
        defmt::error!(
            "boot module `manifest` is missing: the image has no system manifest (the image builder adds it)"
        );
        halt::stop(HaltStatus::BadBootInput)
    };
    let manifest = match Manifest::decode(module.bytes()) {
        Ok(m) => m,
        Err(e) => {
            defmt::error!("boot module `manifest` is not a usable manifest: {}", e);
            if let ipc_schema::manifest::ManifestError::WrongKey { found, expected } = e {
                defmt::error!(
                    "manifest schema key {=[u8]:02x}, this kernel expects {=[u8]:02x}: rebuild the image",
                    found,
                    expected
                );
            }
            halt::stop(HaltStatus::BadBootInput)
        }
    };
    defmt::info!(
        "manifest: system {=str}, {=usize} domain(s)",
        manifest.name,
        manifest.domains.len()
    );
    for d in &manifest.domains {
        defmt::info!(
            "manifest: domain {=str}: guest {=str}, {=u32} MiB, {=u8} vCPU(s)",
            d.name,
            d.guest,
            d.memory_mib,
            d.vcpus
        );
    }
    let mut missing = false;
    for name in manifest.modules() {
        if boot.module(name).is_none() {
            defmt::error!(
                "boot module `{=str}` is missing: the manifest names it as a guest image",
                name
            );
            missing = true;
        }
    }
    if missing {
        halt::stop(HaltStatus::BadBootInput);
    }
    manifest
}

/// Kernel self-tests of the fault paths, chosen on the command line
/// (`selftest=...`); the boot tests use them.
fn selftest(boot: &BootInfo) {
    match boot.option("selftest") {
        None => {}
        Some("invalid-opcode") => {
            defmt::warn!("selftest: executing ud2");
            // Safety: raises #UD on purpose; the exception path stops the run.
            unsafe { core::arch::asm!("ud2") };
        }
        Some("page-fault") => {
            defmt::warn!("selftest: reading an unmapped address");
            // Safety: the address is unmapped on purpose (user half, nothing
            // mapped there yet); the #PF path stops the run.
            let v = unsafe { core::ptr::read_volatile(0x0000_7fff_dead_0000 as *const u64) };
            defmt::error!("selftest: the read returned {=u64}", v);
        }
        Some("panic") => panic!("selftest: a deliberate panic"),
        Some(other) => defmt::warn!("selftest: unknown test {=str:?}; ignored", other),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    log::force_unlock();
    defmt::error!("kernel panic: {}", defmt::Display2Format(info));
    halt::stop(HaltStatus::KernelFault)
}
