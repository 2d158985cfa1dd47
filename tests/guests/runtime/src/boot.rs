//! From the multiboot loader to `guest_main`: the multiboot v1 header, the
//! 32-bit entry and the switch to long mode.
//!
//! A multiboot loader (QEMU's `-kernel`, GRUB's `multiboot`, Parallax's
//! domain builder) jumps to `_start32` in 32-bit protected mode with paging
//! off and flat CS/DS, EAX = 0x2BADB002 and EBX = the physical address of the
//! multiboot information. Nothing else is assumed. The entry:
//!
//! 1. checks the magic; on a wrong one it writes a message to COM1 and exits
//!    with status 0xEF (port 0xf4), then halts;
//! 2. zeroes .bss (the loader should have; this costs little and makes the
//!    image independent of it), switches to the 64 KiB stack;
//! 3. builds page tables that identity-map physical 0..4 GiB with 2 MiB
//!    pages, enables PAE, sets EFER.LME, enables paging (clearing CR0.CD/NW
//!    in the same write), loads a two-segment 64-bit GDT and far-jumps to
//!    64-bit code;
//! 4. loads the data segments and the stack again (the upper halves of the
//!    registers are undefined after the switch) and calls [`start`] with the
//!    multiboot information pointer.

use crate::multiboot::MultibootInfo;

/// The multiboot v1 magic in the header.
const MB_HEADER_MAGIC: u32 = 0x1bad_b002;
/// Page-align modules (bit 0), memory information (bit 1), the address
/// fields are valid (bit 16: the "a.out kludge").
const MB_HEADER_FLAGS: u32 = (1 << 0) | (1 << 1) | (1 << 16);
/// The magic a multiboot loader passes in EAX.
const MB_BOOT_MAGIC: u32 = 0x2bad_b002;
/// The status of a boot without the multiboot magic.
pub const STATUS_BAD_BOOT: u32 = 0xef;
/// The size of the guest's one stack.
pub const STACK_SIZE: usize = 64 * 1024;

core::arch::global_asm!(
    // The multiboot v1 header with the address fields (a.out kludge).
    ".section .multiboot, \"a\"",
    ".balign 4",
    "guest_mb_header:",
    ".long {magic}",
    ".long {flags}",
    ".long -({magic} + {flags})",
    ".long guest_mb_header",  // header_addr
    ".long __guest_load_start", // load_addr
    ".long __guest_load_end", // load_end_addr
    ".long __guest_bss_end",  // bss_end_addr
    ".long _start32",         // entry_addr
    //
    ".section .data.guest_boot, \"aw\"",
    ".balign 8",
    "guest_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08: 64-bit code
    ".quad 0x00cf92000000ffff", // 0x10: data
    "guest_gdt_ptr:",
    ".short 23",
    ".long guest_gdt",
    "guest_bad_magic_msg:",
    ".asciz \"\\r\\nguest: not started by a multiboot loader (EAX is not 0x2BADB002); stopping.\\r\\n\"",
    //
    ".section .bss.guest_boot, \"aw\", @nobits",
    ".balign 4096",
    "guest_pml4: .skip 4096",
    "guest_pdpt: .skip 4096",
    "guest_pd: .skip 4096 * 4",
    "guest_stack: .skip {stack_size}",
    "guest_stack_top:",
    //
    ".section .text.guest_entry, \"ax\"",
    ".code32",
    ".global _start32",
    "_start32:",
    "cli",
    "cld",
    "cmp eax, {boot_magic}",
    "jne .Lguest_bad_magic",
    // Zero .bss (EBX, the information pointer, is not touched).
    "mov edi, offset __guest_bss_start",
    "mov ecx, offset __guest_bss_end",
    "sub ecx, edi",
    "shr ecx, 2",
    "xor eax, eax",
    "rep stosd",
    "mov esp, offset guest_stack_top",
    // 2048 page-directory entries: 2 MiB pages (present, writable, large)
    // for physical 0 to 4 GiB.
    "mov edi, offset guest_pd",
    "mov eax, 0x83",
    "mov ecx, 2048",
    ".Lguest_fill_pd:",
    "mov dword ptr [edi], eax",
    "mov dword ptr [edi + 4], 0",
    "add eax, 0x200000",
    "add edi, 8",
    "dec ecx",
    "jnz .Lguest_fill_pd",
    // The PDPT points at the four page directories, the PML4 at the PDPT.
    "mov eax, offset guest_pd",
    "or eax, 3",
    "mov dword ptr [guest_pdpt], eax",
    "add eax, 4096",
    "mov dword ptr [guest_pdpt + 8], eax",
    "add eax, 4096",
    "mov dword ptr [guest_pdpt + 16], eax",
    "add eax, 4096",
    "mov dword ptr [guest_pdpt + 24], eax",
    "mov eax, offset guest_pdpt",
    "or eax, 3",
    "mov dword ptr [guest_pml4], eax",
    // PAE, the tables, EFER.LME, then paging (and caching: CR0.CD and
    // CR0.NW cleared in the same write).
    "mov eax, cr4",
    "or eax, 1 << 5",
    "mov cr4, eax",
    "mov eax, offset guest_pml4",
    "mov cr3, eax",
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, 1 << 8",
    "wrmsr",
    "mov eax, cr0",
    "and eax, 0x9fffffff",
    "or eax, 0x80000001",
    "mov cr0, eax",
    "lgdt [guest_gdt_ptr]",
    // jmp 0x08:.Lguest_start64 (ptr16:32), spelled out in bytes.
    ".byte 0xea",
    ".long .Lguest_start64",
    ".short 0x08",
    //
    ".Lguest_bad_magic:",
    "mov esi, offset guest_bad_magic_msg",
    ".Lguest_putc:",
    "mov dx, 0x3fd",
    ".Lguest_wait_thr:",
    "in al, dx",
    "test al, 0x20",
    "jz .Lguest_wait_thr",
    "lodsb",
    "test al, al",
    "jz .Lguest_exit32",
    "mov dx, 0x3f8",
    "out dx, al",
    "jmp .Lguest_putc",
    ".Lguest_exit32:",
    "mov dx, 0xf4",
    "mov eax, {bad_boot}",
    "out dx, eax",
    ".Lguest_halt32:",
    "cli",
    "hlt",
    "jmp .Lguest_halt32",
    //
    ".code64",
    ".Lguest_start64:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "xor eax, eax",
    "mov fs, ax",
    "mov gs, ax",
    "mov esp, offset guest_stack_top", // zero-extends into RSP
    "xor ebp, ebp",
    "mov edi, ebx", // zero-extends: the information pointer
    "call {start}",
    "ud2",
    magic = const MB_HEADER_MAGIC,
    flags = const MB_HEADER_FLAGS,
    boot_magic = const MB_BOOT_MAGIC,
    bad_boot = const STATUS_BAD_BOOT,
    stack_size = const STACK_SIZE,
    start = sym start,
);

unsafe extern "Rust" {
    /// The guest's main function, defined by [`crate::entry!`] (or by hand,
    /// `#[unsafe(no_mangle)] fn guest_main(info: &MultibootInfo) -> u32`).
    fn guest_main(info: &MultibootInfo) -> u32;
}

/// The first Rust code: serial port, IDT, boot information, `guest_main`,
/// exit with its status.
extern "C" fn start(info_addr: u32) -> ! {
    crate::serial::init();
    crate::idt::load();
    // Safety: the entry checked the multiboot magic, so EBX (passed here)
    // is the address of the loader's information structure, and the first
    // 4 GiB are identity-mapped.
    let info = unsafe { MultibootInfo::parse(info_addr) };
    // Safety: every guest binary defines `guest_main` with this signature
    // through `entry!` (the link fails without one).
    let status = unsafe { guest_main(&info) };
    crate::exit(status)
}
