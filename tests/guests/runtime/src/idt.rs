//! Exceptions: an IDT for vectors 0-31 and the handlers a guest registers.
//!
//! Every vector enters through a 16-byte stub that pushes a dummy error code
//! where the CPU pushes none, then the vector number, and jumps to
//! `trap_common`, which saves every general register into a [`TrapFrame`]
//! and calls `trap`. For #UD (6), #GP (13) and #VE (20) a guest may register a
//! [`Handler`]; it gets the frame, may change it (typically `frame.rip`
//! to skip an instruction) and returns, and the guest resumes from the
//! frame. Every other exception, and #UD or #VE without a handler, is
//! reported on the serial port and the guest exits with
//! [`STATUS_EXCEPTION`].

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The exit status after an unhandled exception.
pub const STATUS_EXCEPTION: u32 = 0xee;
/// Invalid opcode: what a refused VMFUNC (and VMCALL without a hypervisor)
/// raises.
pub const VECTOR_UD: u8 = 6;
/// Virtualization exception.
pub const VECTOR_VE: u8 = 20;

/// Registers saved on entry, lowest address first. Handlers may change
/// any of them; the guest resumes with the changed values.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    /// The CPU's error code, 0 for vectors without one.
    pub error_code: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A registered exception handler. It runs with interrupts off on the
/// guest's stack; returning resumes the guest at `frame.rip`.
pub type Handler = fn(&mut TrapFrame);

/// Handlers for #UD and #VE, as `Handler` pointers cast to `usize`; 0 for
/// none.
static UD_HANDLER: AtomicUsize = AtomicUsize::new(0);
static VE_HANDLER: AtomicUsize = AtomicUsize::new(0);
static GP_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Sets (or with `None` removes) the #GP handler (a guest probing what the
/// hypervisor refuses: MSRs, control-register bits).
pub fn set_gp_handler(handler: Option<Handler>) {
    GP_HANDLER.store(handler.map_or(0, |h| h as usize), Ordering::SeqCst);
}

/// Sets (or with `None` removes) the #UD handler.
pub fn set_ud_handler(handler: Option<Handler>) {
    UD_HANDLER.store(handler.map_or(0, |h| h as usize), Ordering::SeqCst);
}

/// Sets (or with `None` removes) the #VE handler.
pub fn set_ve_handler(handler: Option<Handler>) {
    VE_HANDLER.store(handler.map_or(0, |h| h as usize), Ordering::SeqCst);
}

fn handler(slot: &AtomicUsize) -> Option<Handler> {
    let raw = slot.load(Ordering::SeqCst);
    if raw == 0 {
        return None;
    }
    // Safety: the slots hold 0 or a `Handler` cast to `usize` (see the
    // setters), and function pointers and `usize` have the same size here.
    Some(unsafe { core::mem::transmute::<usize, Handler>(raw) })
}

/// The 32 entry stubs, 16 bytes apart.
#[unsafe(naked)]
unsafe extern "C" fn trap_stubs() {
    core::arch::naked_asm!(
        ".set guest_vec, 0",
        ".rept 32",
        ".balign 16",
        // Vectors for which the CPU pushes an error code itself.
        ".if (guest_vec == 8) || ((guest_vec >= 10) && (guest_vec <= 14)) || (guest_vec == 17) || (guest_vec == 21) || (guest_vec == 29) || (guest_vec == 30)",
        ".else",
        ".byte 0x6a, 0x00", // push 0 (the dummy error code)
        ".endif",
        ".byte 0x68", // push imm32: the vector
        ".long guest_vec",
        "jmp {common}",
        ".set guest_vec, guest_vec + 1",
        ".endr",
        common = sym trap_common,
    )
}

#[unsafe(naked)]
unsafe extern "C" fn trap_common() {
    core::arch::naked_asm!(
        "push rax",
        "push rbx",
        "push rcx",
        "push rdx",
        "push rsi",
        "push rdi",
        "push rbp",
        "push r8",
        "push r9",
        "push r10",
        "push r11",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov rdi, rsp",
        "cld",
        "call {trap}",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop r11",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rbp",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rbx",
        "pop rax",
        "add rsp, 16", // vector and error code
        "iretq",
        trap = sym trap,
    )
}

/// One 16-byte IDT gate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present, DPL-0, 64-bit interrupt gate through the boot GDT's code
    /// segment (0x08).
    fn interrupt(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: 0x08,
            ist: 0,
            attributes: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 32]>);

// Safety: the guest has one CPU; the table is written only by `load`, before
// `lidt`, and afterwards only read by the CPU.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::MISSING; 32]));

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

/// Fills the IDT and loads it. Called once, by the runtime's start.
pub(crate) fn load() {
    let base = trap_stubs as *const () as u64;
    // Safety: see `impl Sync for Idt`: this runs once, before `lidt`, and
    // nothing else holds a reference to the table.
    let gates = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in gates.iter_mut().enumerate() {
        *gate = Gate::interrupt(base + 16 * vector as u64);
    }
    let pointer = IdtPointer {
        limit: (core::mem::size_of::<[Gate; 32]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // Safety: the table is static and complete; every gate points at a stub
    // in this image.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags))
    };
}

/// The architectural name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt (NMI)",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        9 => "coprocessor segment overrun",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection (#CP)",
        28 => "hypervisor injection (#HV)",
        29 => "VMM communication (#VC)",
        30 => "security exception (#SX)",
        _ => "reserved",
    }
}

fn read_cr2() -> u64 {
    let cr2: u64;
    // Safety: reading CR2 has no side effect.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    cr2
}

extern "C" fn trap(frame: &mut TrapFrame) {
    let registered = match frame.vector {
        6 => handler(&UD_HANDLER),
        13 => handler(&GP_HANDLER),
        20 => handler(&VE_HANDLER),
        _ => None,
    };
    if let Some(h) = registered {
        h(frame);
        return;
    }
    crate::println!(
        "guest: exception {} (vector {}) at rip {:#x}, error code {:#x}, cr2 {:#x}",
        exception_name(frame.vector),
        frame.vector,
        frame.rip,
        frame.error_code,
        read_cr2(),
    );
    crate::println!(
        "guest:   rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x} rsp {:#x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.rsp,
    );
    if frame.vector == u64::from(VECTOR_UD) && instruction_at(frame.rip) == Some(VMCALL_BYTES) {
        crate::println!("guest:   (the #UD is at a VMCALL: no hypervisor answers hypercalls here)");
    }
    crate::exit(STATUS_EXCEPTION)
}

/// The VMCALL instruction's bytes.
const VMCALL_BYTES: [u8; 3] = [0x0f, 0x01, 0xc1];

/// The first three bytes at `rip`, if it lies in this image.
fn instruction_at(rip: u64) -> Option<[u8; 3]> {
    unsafe extern "C" {
        static __guest_load_start: u8;
        static __guest_load_end: u8;
    }
    let (start, end) = (
        &raw const __guest_load_start as u64,
        &raw const __guest_load_end as u64,
    );
    if rip < start || rip.checked_add(3)? > end {
        return None;
    }
    // Safety: `rip..rip + 3` lies inside the loaded image, which is
    // identity-mapped and readable.
    Some(unsafe { (rip as *const [u8; 3]).read_unaligned() })
}
