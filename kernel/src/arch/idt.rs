//! The interrupt descriptor table and the trap entry path.
//!
//! Every vector but the system call's enters through one stub each (16
//! bytes apart, generated below) that pushes a dummy error code where the
//! CPU pushes none, then the vector number, and jumps to `trap_common`,
//! which saves every general register into a [`TrapFrame`] and calls
//! [`trap`] (a trap in ring 0) or `sched::user_trap` (a trap from a
//! service, whose frame the CPU wrote in place in the service's own
//! record). The system call (`int 0x80`) has its own entry,
//! `syscall_entry`, which makes the same frame and goes to the fast paths.
//! A CPU exception in the kernel is reported (vector, RIP, error code, CR2,
//! registers) and the run stops cleanly; the kernel has no business
//! continuing after one.

use super::percpu::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI};
use core::cell::UnsafeCell;
use ipc_schema::halt::HaltStatus;

/// Registers saved on entry, lowest address first. 16-byte aligned, so
/// that a service's frame can be the stack the CPU saves its trap on.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug)]
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
    pub error_code: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// 22 saved words and no padding: the CPU's and the stubs' pushes fill it.
const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);

/// The system-call vector (`int 0x80`), the one gate ring 3 may use.
pub const SYSCALL_VECTOR: u8 = 0x80;

/// The spurious-interrupt vector programmed into the local APIC.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The local APIC error vector.
pub const APIC_ERROR_VECTOR: u8 = 0xfe;

core::arch::global_asm!(
    ".section .text",
    ".balign 16",
    ".global trap_stubs",
    "trap_stubs:",
    ".set vec, 0",
    ".rept 256",
    ".balign 16",
    // Vectors for which the CPU pushes an error code itself.
    ".if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)",
    ".else",
    ".byte 0x6a, 0x00", // push 0 (the dummy error code)
    ".endif",
    ".byte 0x68", // push imm32: the vector
    ".long vec",
    "jmp {common}",
    ".set vec, vec + 1",
    ".endr",
    common = sym trap_common,
);

unsafe extern "C" {
    static trap_stubs: [u8; 256 * 16];
}

/// Offset of the saved CS in a [`TrapFrame`] (its low two bits are the
/// privilege level the trap came from).
const FRAME_CS: usize = core::mem::offset_of!(TrapFrame, cs);

/// Saves every general register, in [`TrapFrame`]'s order.
macro_rules! push_all {
    () => {
        ".irp r, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15\npush \\r\n.endr"
    };
}

#[unsafe(naked)]
unsafe extern "C" fn trap_common() {
    core::arch::naked_asm!(
        push_all!(),
        "mov rdi, rsp",
        "cld",
        "test byte ptr [rsp + {cs}], 3",
        "jnz 2f",
        "call {trap}",
        // Back to the kernel where it was, through the same pops as ring 3.
        "mov rdi, rsp",
        "mov rsi, cr3",
        "jmp {back}",
        // From ring 3: the frame was written where RSP0 pointed, the end of
        // the service's own frame (see `percpu::set_trap_frame_end`). The
        // kernel stack is free whenever ring 3 runs, so the kernel starts
        // again at its top; the service is entered again by
        // `sched::resume`, never by returning here.
        "2:",
        "lea rsp, [rip + {stack} + {stack_size}]",
        "call {user}",
        cs = const FRAME_CS,
        trap = sym trap,
        back = sym crate::sys::sched::user_return,
        user = sym crate::sys::sched::user_trap,
        stack = sym super::percpu::BSP_STACK,
        stack_size = const super::percpu::KERNEL_STACK_SIZE,
    )
}

/// The system-call gate's entry (`int 0x80`, from ring 3 only: the kernel
/// makes no system calls): `trap_common`'s from ring 3 without its stub's
/// jump and its two tests. A CALL, and a REPLY_RECV answering a process,
/// try their fast paths first (back here if not taken; RBX keeps the
/// frame); a REPLY_RECV to a vCPU (token bit 63) tries its own, which goes
/// on to `user_trap` if not taken.
#[unsafe(naked)]
unsafe extern "C" fn syscall_entry() {
    core::arch::naked_asm!(
        "push 0",
        "push {syscall}",
        push_all!(),
        "mov rdi, rsp",
        "cld",
        "lea rsp, [rip + {stack} + {stack_size}]",
        "cmp rax, {reply_recv}",
        "jne 4f",
        "cmp qword ptr [rdi + {rdi}], 0",
        "jl 5f",
        "mov rbx, rdi",
        "mov rdi, qword ptr [rdi + {rdi}]",
        "call {fast_answer}",
        "jmp 3f",
        "4:",
        "mov rbx, rdi",
        "cmp rax, {call}",
        "jne 3f",
        "call {fast_call}",
        "3:",
        "mov rdi, rbx",
        "call {user}",
        "5:",
        "call {vcpu}",
        "ud2",
        syscall = const SYSCALL_VECTOR,
        rdi = const core::mem::offset_of!(TrapFrame, rdi),
        reply_recv = const ipc_schema::syscall::nr::REPLY_RECV,
        call = const ipc_schema::syscall::nr::CALL,
        fast_call = sym crate::sys::fastpath::call_trap,
        fast_answer = sym crate::sys::fastpath::answer_trap,
        vcpu = sym crate::sys::fastpath::vcpu_trap,
        user = sym crate::sys::sched::user_trap,
        stack = sym super::percpu::BSP_STACK,
        stack_size = const super::percpu::KERNEL_STACK_SIZE,
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

    /// A present interrupt gate (interrupts off on entry), callable from
    /// ring 3 only when `user` (the system-call vector).
    fn interrupt(handler: u64, ist: Option<u16>, user: bool) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: 0x08,
            ist: ist.map_or(0, |slot| slot as u8 + 1),
            attributes: if user { 0xee } else { 0x8e },
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 256]>);

// Safety: the table is written once, by the bootstrap processor in `load`
// before any other CPU runs, and only read (by the CPU) afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::MISSING; 256]));
static IDT_BUILT: spin::Once<()> = spin::Once::new();

/// Fills the IDT (first call only) and loads it on this CPU.
pub fn load() {
    IDT_BUILT.call_once(|| {
        // Safety: `trap_stubs` is the 4 KiB block of stubs assembled above.
        let base = unsafe { trap_stubs.as_ptr() } as u64;
        // Safety: see `impl Sync for Idt`: nothing reads the table before
        // `lidt` below, and this runs once.
        let gates = unsafe { &mut *IDT.0.get() };
        for (vector, gate) in gates.iter_mut().enumerate() {
            let ist = match vector {
                2 => Some(IST_NMI),
                8 => Some(IST_DOUBLE_FAULT),
                18 => Some(IST_MACHINE_CHECK),
                _ => None,
            };
            let user = vector == usize::from(SYSCALL_VECTOR);
            let entry = if user {
                syscall_entry as *const () as u64
            } else {
                base + 16 * vector as u64
            };
            *gate = Gate::interrupt(entry, ist, user);
        }
    });
    let pointer = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
        base: x86_64::VirtAddr::from_ptr(IDT.0.get()),
    };
    // Safety: the table is complete, static, and every gate points at a stub.
    unsafe { x86_64::instructions::tables::lidt(&pointer) };
}

/// Names of the architectural exceptions.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "non-maskable interrupt",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating point (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection (#CP)",
        28 => "hypervisor injection (#HV)",
        29 => "VMM communication (#VC)",
        30 => "security exception (#SX)",
        _ => "reserved exception",
    }
}

/// Called by `trap_common` for every vector taken in ring 0.
extern "C" fn trap(frame: &mut TrapFrame) {
    match frame.vector {
        0..=31 => kernel_exception(frame),
        v if (u64::from(crate::sys::irq::IRQ_BASE)..u64::from(crate::sys::irq::IRQ_BASE) + 16)
            .contains(&v)
            || v == u64::from(crate::iommu::FAULT_VECTOR) =>
        {
            crate::sys::irq::handle(crate::sys::kernel(), v as u8);
        }
        v if v == u64::from(SPURIOUS_VECTOR) => {}
        // The timer armed for a waiting vCPU's deadline: the scheduler
        // wakes it (`vm::wake_due`).
        v if v == u64::from(crate::apic::TIMER_VECTOR) => crate::apic::end_of_interrupt(),
        v if v == u64::from(APIC_ERROR_VECTOR) => {
            defmt::warn!("local APIC error interrupt");
            crate::apic::end_of_interrupt();
        }
        v => {
            defmt::warn!("unexpected interrupt, vector {=u64}", v);
            crate::apic::end_of_interrupt();
        }
    }
}

/// Reports an exception taken in the kernel and stops the run.
fn kernel_exception(f: &TrapFrame) -> ! {
    crate::log::force_unlock();
    defmt::error!(
        "CPU exception in the kernel: {=str}, vector {=u64}, rip {=u64:#x}, error code {=u64:#x}, cr2 {=u64:#x}",
        exception_name(f.vector),
        f.vector,
        f.rip,
        f.error_code,
        super::cr2()
    );
    if f.vector == 14 {
        let e = f.error_code;
        defmt::error!(
            "page fault: {=str} access, {=str}, {=str} mode{=str}",
            if e & 2 != 0 {
                "write"
            } else if e & 16 != 0 {
                "instruction fetch"
            } else {
                "read"
            },
            if e & 1 != 0 {
                "protection violation"
            } else {
                "page not present"
            },
            if e & 4 != 0 { "user" } else { "supervisor" },
            if e & 8 != 0 { ", reserved bit set" } else { "" }
        );
    }
    defmt::error!(
        "registers: rax {=u64:#x} rbx {=u64:#x} rcx {=u64:#x} rdx {=u64:#x} rsi {=u64:#x} rdi {=u64:#x} rbp {=u64:#x} rsp {=u64:#x}",
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.rsp
    );
    defmt::error!(
        "registers: r8 {=u64:#x} r9 {=u64:#x} r10 {=u64:#x} r11 {=u64:#x} r12 {=u64:#x} r13 {=u64:#x} r14 {=u64:#x} r15 {=u64:#x} rflags {=u64:#x} cs {=u64:#x}",
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
        f.rflags,
        f.cs
    );
    crate::halt::stop(HaltStatus::KernelFault)
}
