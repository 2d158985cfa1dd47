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
mod iommu;
mod log;
mod mem;
mod sys;
mod time;
mod vm;
mod vmx;

use bootinfo::BootInfo;
use ipc_schema::halt::HaltStatus;
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

    let acpi = match acpi::read(boot.rsdp) {
        Ok(a) => Some(a),
        Err(e) => {
            defmt::warn!("ACPI unusable: {}", e);
            None
        }
    };
    if let Some(a) = &acpi {
        defmt::info!("ACPI: {=u32} CPU(s), {=u32} IOAPIC(s)", a.cpus, a.ioapics);
        match (&a.dmar, &a.dmar_problem) {
            (Some(d), _) => {
                acpi::log_dmar(d);
                iommu::init(d, boot.option("iommu") == Some("register"));
            }
            (None, Some(e)) => defmt::warn!(
                "DMAR unusable ({}): the IOMMU stays off, the rest of ACPI is used",
                e
            ),
            (None, None) => {
                defmt::warn!("no DMAR table: no IOMMU, so no DMA remapping for devices")
            }
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
    arch::protect_kernel(&cpu);
    let apic_id = match apic::init(cpu.x2apic) {
        Ok(mode) => {
            defmt::info!("local APIC: {}", mode);
            match mode {
                apic::ApicMode::X2Apic { id } | apic::ApicMode::XApic { id } => id,
            }
        }
        Err(e) => {
            defmt::warn!("local APIC unusable: {=str}", e);
            0
        }
    };
    iommu::fault_interrupts(apic_id);
    if let Some((ioapic, gsi_base)) = acpi.as_ref().and_then(|a| a.ioapic) {
        sys::irq::init(sys::irq::Routing {
            ioapic,
            gsi_base,
            overrides: acpi.as_ref().map_or([None; 16], |a| a.overrides),
            apic_id,
        });
    }
    match vmx::probe(&cpu) {
        Ok(caps) => {
            if let Err(e) = vm::init(caps) {
                defmt::error!("VMX: cannot enter VMX operation: {}", e);
            }
        }
        Err(platform::vmx::VmxUnavailable::NoVmx) => {
            defmt::warn!(
                "VMX: not available (CPUID.1:ECX.VMX[bit 5] = 0): guests cannot run on this CPU"
            )
        }
        Err(other) => defmt::warn!("VMX: unusable: {}", other),
    }

    sys::space::init();
    sys::fastpath::configure(boot.option("fastpath"));
    start_init(&boot)
}

/// Starts the supervisor (the boot module `init`) with every root object,
/// then runs the system.
fn start_init(boot: &BootInfo) -> ! {
    use ipc_schema::syscall::{HandleName, MAX_HANDLES, handle_name, rights};
    use sys::caps::{Cap, FramesKind, FramesObject, Object};
    let k = sys::kernel();
    if boot.module("init").is_none() {
        defmt::error!(
            "boot module `init` is missing: the image has no supervisor (the image builder adds it)"
        );
        halt::stop(HaltStatus::BadBootInput)
    }
    let mut handles: [Option<Cap>; MAX_HANDLES] = [None; MAX_HANDLES];
    let mut names: heapless::Vec<(u32, HandleName), MAX_HANDLES> = heapless::Vec::new();
    let mut give = |name: &str, object: Object, r: u32| {
        let slot = names.len();
        if slot < MAX_HANDLES {
            handles[slot] = Some(Cap {
                object,
                rights: r,
                badge: 0,
            });
            let _ = names.push((slot as u32, handle_name(name)));
        }
    };
    give("system", Object::System, rights::ALL);
    give("memory", Object::MemoryPool, rights::CREATE);
    give("domains", Object::Domains, rights::ALL);
    give(
        "ioports",
        Object::IoPorts {
            base: 0,
            count: u16::MAX,
        },
        rights::DEVICE,
    );
    give("irqs", Object::Irq(sys::caps::ALL_LINES), rights::DEVICE);
    if iommu::IOMMU.lock().is_some() {
        give("iommu", Object::Iommu, rights::CREATE | rights::DEVICE);
    }
    let mut init_elf = 0;
    for (i, m) in boot.modules.iter().enumerate() {
        k.frames[i] = Some(FramesObject {
            base: m.region.start,
            count: m.region.len().div_ceil(platform::PAGE_SIZE),
            len: m.region.len(),
            kind: FramesKind::Module,
            given_to_domain: false,
            ever_mapped: false,
        });
        if m.name == "init" {
            init_elf = i as u16;
        }
        let mut name: heapless::String<32> = heapless::String::new();
        let _ = name.push_str("module:");
        let _ = name.push_str(&m.name[..m.name.len().min(24)]);
        give(&name, Object::Frames(i as u16), rights::READ);
    }
    if let Err(e) = k.spawn(handle_name("init"), init_elf, handles, &names, false) {
        defmt::error!("boot module `init` cannot be started: {}", e);
        halt::stop(HaltStatus::BadBootInput)
    }
    sys::sched::run()
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
