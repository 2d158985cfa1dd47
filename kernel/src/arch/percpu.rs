//! Per-CPU state: descriptor tables, the task-state segment and stacks.
//!
//! Every CPU gets its own GDT and TSS (the TSS holds that CPU's interrupt
//! stacks), indexed by a small CPU number. Only the bootstrap processor runs
//! today; the tables are sized for [`MAX_CPUS`] so that bringing up the
//! others adds no new structure.
//!
//! The TSS's ring-0 stack pointer (RSP0) is where the CPU saves a service's
//! registers when it traps: the scheduler points it at the end of the
//! service's own saved-register frame before entering ring 3
//! ([`set_trap_frame_end`]), so a trap writes the frame in place and nothing
//! is copied on the way in or out.

use core::cell::UnsafeCell;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// The most CPUs Parallax drives.
pub const MAX_CPUS: usize = 16;
/// Size of each CPU's kernel stack.
pub const KERNEL_STACK_SIZE: usize = 64 * 1024;
/// Size of each interrupt stack (double fault, NMI, machine check).
pub const IST_STACK_SIZE: usize = 16 * 1024;

/// Interrupt-stack-table slots (the IDT names them 1-based).
pub const IST_DOUBLE_FAULT: u16 = 0;
pub const IST_NMI: u16 = 1;
pub const IST_MACHINE_CHECK: u16 = 2;

/// A stack: memory the CPU writes through RSP, never through Rust references.
#[repr(C, align(4096))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// Safety: a stack is used by exactly one CPU at a time (its owner), and only
// through the stack pointer; Rust never forms references into it.
unsafe impl<const N: usize> Sync for Stack<N> {}

impl<const N: usize> Stack<N> {
    pub const fn new() -> Self {
        Self(UnsafeCell::new([0; N]))
    }

    /// The address one past the top (stacks grow down).
    pub fn top(&self) -> VirtAddr {
        VirtAddr::from_ptr(self.0.get()) + N as u64
    }
}

/// The bootstrap processor's kernel stack; `boot.rs` switches to it.
pub static BSP_STACK: Stack<KERNEL_STACK_SIZE> = Stack::new();

/// Interrupt stacks: three per CPU.
static IST_STACKS: [[Stack<IST_STACK_SIZE>; 3]; MAX_CPUS] = [const {
    [
        const { Stack::new() },
        const { Stack::new() },
        const { Stack::new() },
    ]
}; MAX_CPUS];

/// The kernel's segment selectors, the same on every CPU.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    pub kernel_code: SegmentSelector,
    pub kernel_data: SegmentSelector,
    pub tss: SegmentSelector,
}

/// A TSS the CPU reads and the kernel updates (RSP0) after loading it.
#[repr(transparent)]
struct Tss(UnsafeCell<TaskStateSegment>);

// Safety: each CPU's TSS is written only by that CPU, in ring 0 with
// interrupts off (`init_cpu`, `set_trap_frame_end`); the CPU itself reads it
// only on a privilege change, which cannot happen in the middle of a write.
unsafe impl Sync for Tss {}

struct PerCpu {
    tss: Tss,
    gdt: Once<(GlobalDescriptorTable, Selectors)>,
}

static CPUS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        tss: Tss(UnsafeCell::new(TaskStateSegment::new())),
        gdt: Once::new(),
    }
}; MAX_CPUS];

/// Makes the next trap from ring 3 on this CPU (the bootstrap processor)
/// save its registers into `frame` (the running service's, 16-byte
/// aligned: the CPU aligns RSP0 down before it pushes), which ends where
/// RSP0 points.
#[inline(always)]
pub fn set_trap_frame_end(frame: &crate::arch::idt::TrapFrame) {
    let end = core::ptr::from_ref(frame).wrapping_add(1) as u64;
    debug_assert!(end >= 0xffff_8000_0000_0000, "a frame in the kernel's half");
    // Safety: see `impl Sync for Tss`; a plain store of one field. `end` is
    // canonical: the frame lies in the kernel's half of the address space
    // (all kernel memory does), and no object ends past its top.
    unsafe {
        (*CPUS[0].tss.0.get()).privilege_stack_table[0] = VirtAddr::new_unsafe(end);
    }
}

/// Loads CPU `cpu`'s GDT, segment registers, TSS and the shared IDT. Called
/// once on each CPU, on that CPU.
pub fn init_cpu(cpu: usize) {
    let tss = CPUS[cpu].tss.0.get();
    // Safety: see `impl Sync for Tss`: this CPU, before it loads the TSS.
    unsafe {
        for (slot, stack) in IST_STACKS[cpu].iter().enumerate() {
            (*tss).interrupt_stack_table[slot] = stack.top();
        }
        // Until a service runs, traps from ring 3 would land on the top of
        // the kernel stack.
        (*tss).privilege_stack_table[0] = BSP_STACK.top();
    }
    let (gdt, sel) = CPUS[cpu].gdt.call_once(|| {
        // The order kernel code, kernel data, user data, user code is the one
        // SYSCALL/SYSRET expect (STAR).
        let mut gdt = GlobalDescriptorTable::new();
        let kernel_code = gdt.append(Descriptor::kernel_code_segment());
        let kernel_data = gdt.append(Descriptor::kernel_data_segment());
        gdt.append(Descriptor::user_data_segment());
        gdt.append(Descriptor::user_code_segment());
        // Safety: the TSS is a static that lives forever; its contents are
        // changed only as `Tss` says.
        let tss = gdt.append(unsafe { Descriptor::tss_segment_unchecked(tss) });
        (
            gdt,
            Selectors {
                kernel_code,
                kernel_data,
                tss,
            },
        )
    });
    gdt.load();
    // Safety: the selectors index the GDT just loaded, whose descriptors are
    // the flat 64-bit kernel segments and this CPU's TSS.
    unsafe {
        CS::set_reg(sel.kernel_code);
        SS::set_reg(sel.kernel_data);
        DS::set_reg(sel.kernel_data);
        ES::set_reg(sel.kernel_data);
        load_tss(sel.tss);
    }
    super::idt::load();
}
