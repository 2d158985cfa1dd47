//! A hostile guest: one attack on the hypervisor per run, chosen by
//! `attack=NAME` on the command line. The boot tests in `tests/hostile.rs`
//! run it beside a benign guest and check that only the attacker is
//! affected.
//!
//! | attack | what it does | exit status |
//! |---|---|---|
//! | `spin n=N` | N null hypercalls (answered by the kernel, no service), printing `spin: K/10` at each tenth | 0 |
//! | `cli-spin` | prints `spinning with interrupts off`, then `cli; jmp $` for ever | never ends |
//! | `sti-spin` | the same with interrupts on (`sti; jmp $`): with external-interrupt exiting none reaches the guest | never ends |
//! | `cr8` | MOV 15 to CR8 (the task priority: masks every interrupt if it reaches the host's APIC), reads it back | 0 if it reads 15 |
//! | `markers tag=T rounds=R` | reads FPU/SSE/AVX registers, DR0-DR3, CR2 and KERNEL_GS_BASE: any marker of another tag is a leak; then writes its own markers and checks them R times while other domains run | 0, or 1 on a leak or a lost marker |
//! | `probe` | host ports (PIC, PIT, CMOS, PCI, COM2: the control channel, Bochs's shutdown port, reset ports) read and written; host and VMX MSRs; CR4.VMXE; 3,000 random hypercalls | 0 if every port the vmm does not model read all ones (the modelled ones reach the domain's own PICs, PIT, CMOS, PCI configuration, ACPI PM1a), the VMX MSRs and CR4.VMXE gave #GP and every hypercall came back |
//! | `views` | starts a write-protection dirty log over all its RAM (its host p2m in 4 KiB pages), then creates views one after another (each a copy of the host p2m: a table per 2 MiB) and reads every 2 MiB through each, until something refuses | 0 when a view is refused; 1 if the dirty log is |
//! | `vmx` | VMXON, an instruction of the host's | stopped by the hypervisor |
//! | `mmio` | at the local APIC page (0xfee00000, outside its RAM) sends INIT to all other CPUs through the ICR, then reads the timer's current count | the INIT reaches only its own local APIC model (dropped: there is no other vCPU); the read stops it |
//! | `user-hypercall` | from CPL 3: a service hypercall, a view switch and a request hypercall must be refused with `NotPermitted`; the null hypercall (the kernel's, touching only the caller's registers) answers | 0 if so |
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use guest_runtime::{MultibootInfo, TrapFrame, abi, idt, println};

guest_runtime::entry!(main);

/// The value of `key=` on the command line.
fn arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn num(cmdline: &str, key: &str, default: u64) -> u64 {
    arg(cmdline, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main(info: &MultibootInfo) -> u32 {
    let cmdline = info.cmdline().unwrap_or("");
    match arg(cmdline, "attack") {
        Some("spin") => spin(num(cmdline, "n", 1_000_000)),
        Some("cli-spin") => {
            println!("spinning with interrupts off");
            guest_runtime::serial::flush();
            // Safety: spinning for ever is the attack.
            unsafe { asm!("cli", "2:", "jmp 2b", options(noreturn)) }
        }
        Some("sti-spin") => {
            println!("spinning with interrupts on");
            guest_runtime::serial::flush();
            // Safety: spinning for ever is the attack; with external-interrupt
            // exiting no interrupt is ever delivered to this guest.
            unsafe { asm!("sti", "2:", "jmp 2b", options(noreturn)) }
        }
        Some("cr8") => cr8(),
        Some("markers") => markers(num(cmdline, "tag", 1) as u8, num(cmdline, "rounds", 20)),
        Some("user-hypercall") => user_hypercalls(),
        Some("probe") => probe(),
        Some("views") => views(info),
        Some("vmx") => {
            println!("vmx: VMXON");
            // Safety: the attack; the hypervisor stops this guest here.
            unsafe { asm!("vmxon [{}]", in(reg) 0x1000u64) };
            println!("vmx: FAIL: VMXON returned");
            1
        }
        Some("mmio") => {
            // Safety: the attack; the page is outside this guest's RAM
            // (its own virtualized local APIC, not the host's).
            unsafe { core::ptr::write_volatile(0xfee0_0300 as *mut u32, 0x000c_4500) };
            println!("mmio: INIT to all others sent through the ICR at 0xfee00300; still running");
            println!("mmio: reading the current count at 0xfee00390");
            // Safety: as above.
            let v = unsafe { core::ptr::read_volatile(0xfee0_0390 as *const u32) };
            println!("mmio: FAIL: read {v:#x}");
            1
        }
        other => {
            println!("hostile: unknown attack {other:?}");
            2
        }
    }
}

fn spin(n: u64) -> u32 {
    println!("spin: {n} null hypercalls");
    let tenth = (n / 10).max(1);
    for i in 1..=n {
        if guest_runtime::null() != 0 {
            println!("spin: FAIL: a null hypercall failed");
            return 1;
        }
        if i % tenth == 0 {
            println!("spin: {}/10", i / tenth);
        }
    }
    println!("spin: done");
    0
}

fn cr8() -> u32 {
    let back: u64;
    // Safety: CR8 is the task-priority register; writing it only changes
    // which interrupts this (interrupt-free) guest would take.
    unsafe { asm!("mov cr8, {v}", "mov {back}, cr8", v = in(reg) 15u64, back = out(reg) back) };
    println!("cr8: wrote 15, reads {back}");
    if back == 15 { 0 } else { 1 }
}

// --- register markers ---

/// The registers checked, in marker order.
const NAMES: [&str; 11] = [
    "xmm0",
    "xmm15",
    "ymm0[255:128]",
    "dr0",
    "dr1",
    "dr2",
    "dr3",
    "cr2",
    "kernel_gs_base",
    "lstar",
    "star",
];
const MARK: u64 = 0x0000_7e57_0000_0000;

fn marker(tag: u8, i: usize) -> u64 {
    MARK | (u64::from(tag) << 8) | i as u64
}

/// Whether `v` is a marker, and whose.
fn marker_tag(v: u64) -> Option<u8> {
    (v & 0xffff_ffff_0000_0000 == MARK && v & 0xffff_0000 == 0).then_some((v >> 8) as u8)
}

/// Turns on SSE (and AVX where the CPU has it); returns whether AVX is usable.
/// CPUID hides XSAVE and AVX from guests (they share the host's XCR0), but
/// a guest that uses them anyway must still see only its own registers:
/// CR4.OSXSAVE is tried whatever CPUID says (a #GP means the CPU has none).
fn enable_vector_registers() -> bool {
    // Safety: CR0.MP set and EM clear, CR4.OSFXSR/OSXMMEXCPT: what an OS
    // sets to use SSE; CR4.OSXSAVE only where CPUID reports XSAVE.
    unsafe {
        asm!("mov {t}, cr0", "and {t}, ~4", "or {t}, 2", "mov cr0, {t}", t = out(reg) _);
        asm!("mov {t}, cr4", "or {t}, 0x600", "mov cr4, {t}", t = out(reg) _);
    }
    idt::set_gp_handler(Some(catch));
    // Safety: as above; a #GP is caught and `mov cr4, rax` (3 bytes) skipped.
    let fault = caught(3, || unsafe {
        asm!("mov rax, cr4", "bts rax, 18", "mov cr4, rax", out("rax") _)
    });
    idt::set_gp_handler(None);
    if fault != 0 {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // Safety: XGETBV 0 reads XCR0 once CR4.OSXSAVE is set.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi) };
    lo & 6 == 6
}

/// Reads the checked registers (the AVX one as 0 without AVX).
fn read_registers(avx: bool) -> [u64; 11] {
    let mut r = [0u64; 11];
    // Safety: reads of registers this guest may read (SSE enabled first);
    // SWAPGS twice leaves GS as it was; GS_BASE is the guest's own MSR.
    unsafe {
        asm!("movq {}, xmm0", out(reg) r[0]);
        asm!("movq {}, xmm15", out(reg) r[1]);
        if avx {
            asm!("vextractf128 xmm1, ymm0, 1", "movq {}, xmm1", out(reg) r[2], out("xmm1") _);
        }
        asm!("mov {}, dr0", out(reg) r[3]);
        asm!("mov {}, dr1", out(reg) r[4]);
        asm!("mov {}, dr2", out(reg) r[5]);
        asm!("mov {}, dr3", out(reg) r[6]);
        asm!("mov {}, cr2", out(reg) r[7]);
        let (lo, hi): (u32, u32);
        asm!("swapgs", "rdmsr", "swapgs", in("ecx") 0xc000_0101u32, out("eax") lo, out("edx") hi);
        r[8] = (u64::from(hi) << 32) | u64::from(lo);
        // The SYSCALL MSRs are the guest's own (written without an exit).
        for (i, msr) in [(9, 0xc000_0082u32), (10, 0xc000_0081)] {
            let (lo, hi): (u32, u32);
            asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi);
            r[i] = (u64::from(hi) << 32) | u64::from(lo);
        }
    }
    r
}

fn write_markers(tag: u8, avx: bool) {
    let m = |i| marker(tag, i);
    // Safety: writes of this guest's own registers; every marker is
    // canonical (bit 47 clear), as DR0-DR3 and GS_BASE need.
    unsafe {
        asm!("movq xmm0, {}", in(reg) m(0), out("xmm0") _);
        asm!("movq xmm15, {}", in(reg) m(1), out("xmm15") _);
        if avx {
            asm!("movq xmm1, {}", "vinsertf128 ymm0, ymm0, xmm1, 1", in(reg) m(2), out("xmm1") _, out("xmm0") _);
        }
        asm!("mov dr0, {}", in(reg) m(3));
        asm!("mov dr1, {}", in(reg) m(4));
        asm!("mov dr2, {}", in(reg) m(5));
        asm!("mov dr3, {}", in(reg) m(6));
        asm!("mov cr2, {}", in(reg) m(7));
        // KERNEL_GS_BASE is written the guest's way: GS_BASE, then SWAPGS.
        let (lo, hi): (u32, u32);
        asm!("rdmsr", in("ecx") 0xc000_0101u32, out("eax") lo, out("edx") hi);
        let v = m(8);
        asm!("wrmsr", "swapgs", "wrmsr",
            in("ecx") 0xc000_0101u32, in("eax") v as u32, in("edx") (v >> 32) as u32);
        // GS_BASE back to what it was (the second WRMSR wrote v again; fix it).
        asm!("wrmsr", in("ecx") 0xc000_0101u32, in("eax") lo, in("edx") hi);
        for (i, msr) in [(9, 0xc000_0082u32), (10, 0xc000_0081)] {
            let v = m(i);
            asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32);
        }
    }
}

fn markers(tag: u8, rounds: u64) -> u32 {
    let avx = enable_vector_registers();
    println!("markers: tag {tag}, {rounds} rounds, AVX {avx}");
    let first = read_registers(avx);
    for (i, v) in first.iter().enumerate() {
        if let Some(t) = marker_tag(*v) {
            println!(
                "markers: LEAK: {} holds {v:#x}, the marker of tag {t}",
                NAMES[i]
            );
            return 1;
        }
    }
    write_markers(tag, avx);
    for round in 1..=rounds {
        // Long enough for the preemption timer to let other domains run.
        for _ in 0..200_000 {
            core::hint::spin_loop();
        }
        let now = read_registers(avx);
        for (i, v) in now.iter().enumerate() {
            if (i != 2 || avx) && *v != marker(tag, i) {
                match marker_tag(*v) {
                    Some(t) => println!(
                        "markers: LOST at round {round}: {} holds {v:#x}, the marker of tag {t} (LEAK)",
                        NAMES[i]
                    ),
                    None => println!(
                        "markers: LOST at round {round}: {} holds {v:#x}, not {:#x}",
                        NAMES[i],
                        marker(tag, i)
                    ),
                }
                return 1;
            }
        }
        println!("markers: round {round} ok");
    }
    println!("markers: done");
    0
}

// --- hypercalls from user mode ---

/// The kernel-mode stack pointer to come back to from ring 3.
static SAVED_RSP: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut RING0_STACK: Stack = Stack([0; 16384]);
static mut RING3_STACK: Stack = Stack([0; 16384]);
/// A 64-bit TSS: only RSP0 (at byte 4) matters.
#[repr(C, align(16))]
struct Tss([u32; 26]);
static mut TSS: Tss = Tss([0; 26]);
/// null, kernel code 0x08, kernel data 0x10, user data 0x18, user code
/// 0x20, TSS 0x28 (two slots).
#[repr(C, align(16))]
struct Gdt([u64; 7]);
static mut GDT: Gdt = Gdt([
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00cf_f200_0000_ffff,
    0x00af_fa00_0000_ffff,
    0,
    0,
]);

/// Lets ring 3 run: user-accessible page tables, a GDT with user segments
/// and a TSS whose RSP0 is a kernel stack.
fn prepare_ring3() {
    // Safety: single CPU, interrupts off; the statics are only touched here
    // and by the CPU; the page tables are the runtime's identity map (first
    // 4 GiB, 2 MiB pages), which this only makes user-accessible.
    unsafe {
        let tss = &raw mut TSS;
        let top = (&raw mut RING0_STACK) as u64 + 16384;
        (*tss).0[1] = top as u32;
        (*tss).0[2] = (top >> 32) as u32;
        let base = tss as u64;
        let gdt = &raw mut GDT;
        (*gdt).0[5] =
            103 | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((base >> 24) & 0xff) << 56);
        (*gdt).0[6] = base >> 32;
        #[repr(C, packed)]
        struct Pointer {
            limit: u16,
            base: u64,
        }
        let p = Pointer {
            limit: 7 * 8 - 1,
            base: gdt as u64,
        };
        asm!("lgdt [{}]", "mov ax, 0x28", "ltr ax", in(reg) &p, out("ax") _);
        let cr3: u64;
        asm!("mov {}, cr3", out(reg) cr3);
        let pml4 = (cr3 & !0xfff) as *mut u64;
        pml4.write(pml4.read() | 4);
        let pdpt = (pml4.read() & 0x000f_ffff_ffff_f000) as *mut u64;
        for i in 0..4 {
            let e = pdpt.add(i).read();
            if e & 1 != 0 {
                pdpt.add(i).write(e | 4);
                let pd = (e & 0x000f_ffff_ffff_f000) as *mut u64;
                for j in 0..512 {
                    pd.add(j).write(pd.add(j).read() | 4);
                }
            }
        }
        asm!("mov cr3, {}", in(reg) cr3);
    }
}

/// The #UD of the `ud2` that ends the ring-3 excursion: back to ring 0,
/// just after it, on the saved stack.
fn back_to_ring0(frame: &mut TrapFrame) {
    if frame.cs & 3 == 3 {
        frame.cs = 0x08;
        frame.ss = 0x10;
        frame.rsp = SAVED_RSP.load(Ordering::SeqCst);
        frame.rip += 2;
    }
}

/// Makes hypercall `nr` (RBX, RCX = `b`, `c`) from ring 3; returns RAX.
fn user_hypercall(nr: u64, b: u64, c: u64) -> u64 {
    let ustack = (&raw mut RING3_STACK) as u64 + 16384;
    let rax: u64;
    // Safety: the excursion enters ring 3 with IRETQ and comes back through
    // the #UD handler above at the instruction after `ud2`, with every
    // register as ring 3 left it and RSP as saved here; RBX is LLVM's, so
    // it is saved around the call.
    unsafe {
        asm!(
            "push rbx",
            "mov rbx, rsi",
            "mov [{saved}], rsp",
            "push 0x1b",
            "push {ustack}",
            "push 0x2",
            "push 0x23",
            "lea r8, [rip + 2f]",
            "push r8",
            "iretq",
            "2:",
            "vmcall",
            "ud2",
            "pop rbx",
            saved = in(reg) SAVED_RSP.as_ptr(),
            ustack = in(reg) ustack,
            inout("rax") nr => rax,
            in("rsi") b,
            inout("rcx") c => _,
            out("r8") _,
            out("rdx") _,
        );
    }
    rax
}

fn user_hypercalls() -> u32 {
    prepare_ring3();
    idt::set_ud_handler(Some(back_to_ring0));
    let null = user_hypercall(abi::HC_NULL, 0, 0);
    println!("user-hypercall: HC_NULL from CPL 3 returned {null}");
    let service = user_hypercall(abi::HC_SERVICE_NULL, 0, 0);
    println!("user-hypercall: HC_SERVICE_NULL from CPL 3 returned {service}");
    let switch = user_hypercall(abi::HC_VIEW_SWITCH, 0, 0);
    println!("user-hypercall: HC_VIEW_SWITCH from CPL 3 returned {switch}");
    let page = guest_runtime::hypercall::request_page_gfn() << 12;
    let call = user_hypercall(abi::HC_CALL, page, 16);
    println!("user-hypercall: HC_CALL from CPL 3 returned {call}");
    idt::set_ud_handler(None);
    let refused = abi::Status::NotPermitted as u64;
    // The same call from ring 0 works.
    let kernel = guest_runtime::service_null();
    println!("user-hypercall: HC_SERVICE_NULL from CPL 0 returned {kernel}");
    if null == 0 && service == refused && switch == refused && call == refused && kernel == 0 {
        println!("user-hypercall: refused from user mode");
        0
    } else {
        println!("user-hypercall: FAIL");
        1
    }
}

// --- probing the hypervisor's refusals ---

/// Exceptions the probe caught (vector per bit), and how long the probed
/// instruction is (the handler skips it).
static CAUGHT: AtomicU64 = AtomicU64::new(0);
static SKIP: AtomicU64 = AtomicU64::new(0);

fn catch(frame: &mut TrapFrame) {
    CAUGHT.fetch_or(1 << frame.vector, Ordering::SeqCst);
    frame.rip += SKIP.load(Ordering::SeqCst);
}

/// Runs `f`, whose faulting instruction is `len` bytes long (the handler
/// skips it), and returns the vectors of the exceptions it raised.
fn caught(len: u64, f: impl FnOnce()) -> u64 {
    SKIP.store(len, Ordering::SeqCst);
    CAUGHT.store(0, Ordering::SeqCst);
    f();
    CAUGHT.load(Ordering::SeqCst)
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // Safety: a #GP is caught and the instruction (2 bytes) skipped.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // Safety: as for `rdmsr`.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32) };
}

/// The probed ports the vmm models for the guest: the PICs, the PIT, port
/// B, the CMOS, PCI configuration, ACPI PM1a control.
const MODELLED: [u16; 12] = [
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x43, 0x61, 0x70, 0x71, 0xcf8, 0xcfc, 0x604,
];

fn probe() -> u32 {
    idt::set_gp_handler(Some(catch));
    idt::set_ud_handler(Some(catch));
    let mut failures = 0;
    // Ports: the host's PIC, PIT, speaker, CMOS, PCI configuration, COM2
    // (the control channel), Bochs's shutdown and debug ports, QEMU's
    // fw_cfg and ACPI power-off, and the reset ports (keyboard controller
    // 0x64 <- 0xfe, 0xcf9 <- 6).
    let ports: [u16; 20] = [
        0x20, 0x21, 0xa0, 0xa1, 0x40, 0x43, 0x61, 0x70, 0x71, 0xcf8, 0xcfc, 0x2f8, 0x2f9, 0x2fd,
        0x8900, 0x402, 0x510, 0x604, 0x64, 0xcf9,
    ];
    for &port in &ports {
        let value: u8 = match port {
            0x64 => 0xfe,
            0xcf9 => 0x06,
            _ => 0xa5,
        };
        // Safety: port I/O exits to the vmm, which owns every port a guest sees.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value);
            asm!("out dx, eax", in("dx") port, in("eax") 0xffff_ffffu32);
        }
        let (b, d): (u8, u32);
        // Safety: as above.
        unsafe {
            asm!("in al, dx", in("dx") port, out("al") b);
            asm!("in eax, dx", in("dx") port, out("eax") d);
        }
        // The ports of the vmm's PC platform (docs/guests.md) reach the
        // domain's own devices, which answer; every other one is absent.
        if !MODELLED.contains(&port) && (b != 0xff || d != 0xffff_ffff) {
            println!("probe: FAIL: port {port:#x} read {b:#x} / {d:#x}, not all ones");
            failures += 1;
        }
    }
    for b in b"Shutdown" {
        // Safety: as above (Bochs would end the whole run if it saw this).
        unsafe { asm!("out dx, al", in("dx") 0x8900u16, in("al") *b) };
    }
    println!(
        "probe: {} absent host ports read all ones, {} modelled ones reach the domain's own devices; writes went nowhere",
        ports.len() - MODELLED.len(),
        MODELLED.len()
    );
    // MSRs: the VMX capability MSRs must fault (VMX is hidden); the host's
    // speculation control and, before x2APIC mode, the x2APIC registers too.
    // (IA32_FEATURE_CONTROL reads locked with VMX off; the SYSCALL MSRs are
    // the guest's own: the markers attack checks them.)
    for msr in [0x480, 0x481, 0x48b, 0x48, 0x808, 0x80b, 0x830] {
        let got = caught(2, || {
            let _ = rdmsr(msr);
        });
        let put = caught(2, || wrmsr(msr, 0));
        if got & (1 << 13) == 0 || put & (1 << 13) == 0 {
            println!("probe: FAIL: MSR {msr:#x} did not give #GP (read {got:#x}, write {put:#x})");
            failures += 1;
        }
    }
    println!("probe: host and VMX MSRs refused with #GP");
    // CR4.VMXE (nested VMX): #GP.
    let vmxe = caught(3, || {
        // Safety: the write faults (caught, 3 bytes skipped) or is refused.
        unsafe { asm!("mov rax, cr4", "bts rax, 13", "mov cr4, rax", out("rax") _) };
    });
    // The handler skips `mov cr4, rax` (3 bytes: 0f 22 e0).
    if vmxe & (1 << 13) == 0 {
        println!("probe: FAIL: setting CR4.VMXE did not give #GP");
        failures += 1;
    } else {
        println!("probe: CR4.VMXE refused with #GP");
    }
    // Hypercalls with random numbers and arguments (request pages in a
    // scratch page of this guest's, so that replies land there).
    let scratch = guest_runtime::hypercall::request_page_gfn() << 12;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut answered = 0u32;
    for i in 0..3000u32 {
        let r = next();
        let nr = match i % 4 {
            0 => r % 64,
            1 => r,
            _ => abi::HC_CALL,
        };
        // Random bytes as the request.
        for k in 0..64 {
            // Safety: the scratch page is this guest's own.
            unsafe { core::ptr::write_volatile((scratch + k * 8) as *mut u64, next()) };
        }
        let (rbx, rcx) = if nr == abi::HC_CALL {
            (scratch + next() % 64, next() % 600)
        } else {
            (next(), next())
        };
        let (status, _) = guest_runtime::hypercall::vmcall(nr, rbx, rcx);
        if nr == abi::HC_VIEW_SWITCH && status == 0 {
            // A random view that happened to exist: back to view 0.
            let _ = guest_runtime::view_switch(0);
        }
        answered += 1;
    }
    println!("probe: {answered} random hypercalls answered");
    idt::set_gp_handler(None);
    idt::set_ud_handler(None);
    if failures == 0 {
        println!("probe: every refusal held");
        0
    } else {
        println!("probe: {failures} FAILED");
        1
    }
}

// --- EPT table memory ---

fn views(info: &MultibootInfo) -> u32 {
    let top = info.ram_end();
    // A dirty log by write-protection over all of RAM: the host p2m in
    // 4 KiB pages, so that every view, a copy of it, costs a table per
    // 2 MiB.
    let range = guest_runtime::abi::GfnRange {
        gfn: 0,
        count: top >> 12,
    };
    if let Err(e) = guest_runtime::hypercall::dirty_log_start(
        Some(range),
        guest_runtime::abi::DirtyMode::WriteProtect,
    ) {
        println!("views: DirtyLogStart refused: {e}");
        return 1;
    }
    println!("views: making views over {} MiB of RAM", top >> 20);
    let mut made = 0u32;
    loop {
        let view = match guest_runtime::hypercall::view_create() {
            Ok(v) => v,
            Err(e) => {
                println!("views: view {} refused: {e}", made + 1);
                return 0;
            }
        };
        if guest_runtime::view_switch(view) != abi::Status::Ok {
            println!("views: switching to view {view} refused");
            return 0;
        }
        let mut at = 2 << 20;
        while at + 4096 <= top {
            // Safety: RAM of this guest's, identity-mapped; a read through
            // the new view.
            let _ = unsafe { core::ptr::read_volatile(at as *const u8) };
            at += 2 << 20;
        }
        let _ = guest_runtime::view_switch(0);
        made += 1;
        if made.is_multiple_of(16) {
            println!("views: {made} views made");
        }
    }
}
