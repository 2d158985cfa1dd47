//! From the boot loader to Rust: the multiboot2 header and the 32-bit entry.
//!
//! GRUB loads the kernel's segments at their physical addresses and jumps to
//! `_start32` in 32-bit protected mode without paging, with the multiboot2
//! magic in EAX and the physical address of the boot information in EBX. The
//! entry clears CR0.CD/NW (the BIOS path arrives with caching off), checks
//! for long mode, builds boot page tables, enables long mode and jumps to the
//! kernel's high half, which calls [`crate::kmain`].
//!
//! The boot page tables map the first 4 GiB of physical memory three times
//! with 2 MiB pages: at 0 (identity, for the switch itself), at
//! [`crate::mem::PHYS_OFFSET`] (the direct map the kernel reads physical
//! memory through) and the first 2 GiB at [`crate::mem::KERNEL_BASE`] (where
//! the kernel is linked). The kernel replaces them once it runs.

use crate::arch::percpu::{BSP_STACK, KERNEL_STACK_SIZE};

core::arch::global_asm!(
    // The multiboot2 header: magic, architecture (i386 protected mode),
    // length, checksum; a tag asking for page-aligned modules; the end tag.
    ".section .multiboot2, \"a\"",
    ".balign 8",
    "mb2_header_start:",
    ".long 0xe85250d6",
    ".long 0",
    ".long mb2_header_end - mb2_header_start",
    ".long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header_start))",
    ".balign 8",
    ".short 6, 0",
    ".long 8",
    ".balign 8",
    ".short 0, 0",
    ".long 8",
    "mb2_header_end:",
    //
    ".section .boot.data, \"aw\"",
    ".balign 8",
    "boot_magic: .long 0",
    "boot_info: .long 0",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08: 64-bit code
    ".quad 0x00cf92000000ffff", // 0x10: data
    "boot_gdt_ptr:",
    ".short 23",
    ".long boot_gdt",
    "no_long_mode_msg:",
    ".asciz \"\\r\\nParallax: this CPU has no 64-bit long mode; stopping.\\r\\n\"",
    //
    ".section .boot.bss, \"aw\", @nobits",
    ".balign 4096",
    "boot_page_tables:",
    "boot_pml4: .skip 4096",
    "boot_pdpt_low: .skip 4096",
    "boot_pdpt_high: .skip 4096",
    "boot_pd: .skip 4096 * 4",
        "boot_stack: .skip 4096",
    "boot_stack_top:",
    //
    ".section .boot.text, \"ax\"",
    ".code32",
    ".global _start32",
    "_start32:",
    "cli",
    "cld",
    "mov esp, offset boot_stack_top",
    "mov [boot_magic], eax",
    "mov [boot_info], ebx",
    // Caching on: clear CR0.CD (bit 30) and CR0.NW (bit 29).
    "mov eax, cr0",
    "and eax, 0x9fffffff",
    "mov cr0, eax",
    // Long mode (CPUID.80000001h:EDX[29]) or a message and a stop.
    "mov eax, 0x80000000",
    "cpuid",
    "cmp eax, 0x80000001",
    "jb .Lno_long_mode",
    "mov eax, 0x80000001",
    "cpuid",
    "test edx, 1 << 29",
    "jz .Lno_long_mode",
    // Zero the boot page tables.
    "mov edi, offset boot_page_tables",
    "mov ecx, 7 * 4096 / 4", // seven tables, in dwords
    "xor eax, eax",
    "rep stosd",
    // 2048 page-directory entries: 2 MiB pages (present, writable, large)
    // covering physical 0 to 4 GiB.
    "mov edi, offset boot_pd",
    "mov eax, 0x83",
    "mov ecx, 2048",
    ".Lfill_pd:",
    "mov [edi], eax",
    "add eax, 0x200000",
    "add edi, 8",
    "dec ecx",
    "jnz .Lfill_pd",
    // The low PDPT points at the four page directories.
    "mov eax, offset boot_pd",
    "or eax, 3",
    "mov [boot_pdpt_low], eax",
    "add eax, 4096",
    "mov [boot_pdpt_low + 8], eax",
    "add eax, 4096",
    "mov [boot_pdpt_low + 16], eax",
    "add eax, 4096",
    "mov [boot_pdpt_low + 24], eax",
    // The high PDPT maps -2 GiB to physical 0 (two page directories).
    "mov eax, offset boot_pd",
    "or eax, 3",
    "mov [boot_pdpt_high + 510 * 8], eax",
    "add eax, 4096",
    "mov [boot_pdpt_high + 511 * 8], eax",
    // PML4: identity (0), direct map (256), kernel (511).
    "mov eax, offset boot_pdpt_low",
    "or eax, 3",
    "mov [boot_pml4], eax",
    "mov [boot_pml4 + 256 * 8], eax",
    "mov eax, offset boot_pdpt_high",
    "or eax, 3",
    "mov [boot_pml4 + 511 * 8], eax",
    // PAE and global pages, the tables, EFER.LME, then paging and WP.
    "mov eax, cr4",
    "or eax, (1 << 5) | (1 << 7)",
    "mov cr4, eax",
    "mov eax, offset boot_pml4",
    "mov cr3, eax",
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, 1 << 8",
    "wrmsr",
    "mov eax, cr0",
    "or eax, (1 << 31) | (1 << 16) | 1",
    "mov cr0, eax",
    "lgdt [boot_gdt_ptr]",
    // jmp 0x08:.Lstart64 (far jump, ptr16:32), spelled out in bytes.
    ".byte 0xea",
    ".long .Lstart64",
    ".short 0x08",
    //
    ".Lno_long_mode:",
    "mov esi, offset no_long_mode_msg",
    ".Lputc:",
    "mov dx, 0x3fd",
    ".Lwait_thr:",
    "in al, dx",
    "test al, 0x20",
    "jz .Lwait_thr",
    "lodsb",
    "test al, al",
    "jz .Lexit",
    "mov dx, 0x3f8",
    "out dx, al",
    "jmp .Lputc",
    ".Lexit:",
    "mov dx, 0xf4", // QEMU isa-debug-exit: status 3, unsupported machine
    "mov eax, 3",
    "out dx, eax",
    ".Lhalt32:",
    "cli",
    "hlt",
    "jmp .Lhalt32",
    //
    ".code64",
    ".Lstart64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "movabs rax, offset start64_high",
    "jmp rax",
    //
    ".section .text",
    "start64_high:",
    "movabs rsp, offset {stack} + {stack_size}",
    "xor ebp, ebp",
    "mov edi, dword ptr [boot_magic]",
    "mov esi, dword ptr [boot_info]",
    "call {kmain}",
    "ud2",
    stack = sym BSP_STACK,
    stack_size = const KERNEL_STACK_SIZE,
    kmain = sym crate::kmain,
);
