/*
 * A multiboot kernel that reads PCI configuration space (mechanism #1,
 * ports 0xcf8/0xcfc) and the CMOS (ports 0x70/0x71), as PC kernels do at
 * boot (issue 14, point 2): the host bridge's IDs and class at 00:00.0, an
 * absent device (01:00.0 reads all ones), and the CMOS memory registers
 * and status D. It prints them in hex on the 16550 and ends through
 * isa-debug-exit (0xf4) with status 0x10. The boot test runs it with 32 MiB
 * under `qemu-system-x86_64 -machine q35 -kernel` and under Parallax.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
        .set COM1, 0x3f8
_start: mov $stack_top, %esp
        mov $s_bridge, %edi
        call puts
        mov $0x80000000, %eax         /* 00:00.0, dword 0 */
        call pci_read
        call hex32
        mov $s_class, %edi
        call puts
        mov $0x80000008, %eax         /* 00:00.0, dword 2 */
        call pci_read
        call hex32
        mov $s_absent, %edi
        call puts
        mov $0x80010000, %eax         /* 01:00.0, dword 0 */
        call pci_read
        call hex32
        mov $s_cmos, %edi
        call puts
        mov $cmos_regs, %esi
1:      movb (%esi), %al
        cmp $0xff, %al
        je 2f
        out %al, $0x70
        in $0x71, %al
        call hex8
        mov $' ', %al
        call putc
        inc %esi
        jmp 1b
2:      mov $'\n', %al
        call putc
        mov $0x10, %al
        out %al, $0xf4
3:      hlt
        jmp 3b

/* pci_read: the configuration dword at address EAX, in EAX. */
pci_read:
        mov $0xcf8, %dx
        out %eax, %dx
        mov $0xcfc, %dx
        in %dx, %eax
        ret

        .include "uart.inc"

        .data
s_bridge: .asciz "pci 00:00.0: id "
s_class: .asciz " class "
s_absent: .asciz "\npci 01:00.0: "
s_cmos: .asciz "\ncmos 15 16 17 18 30 31 34 35 0d: "
cmos_regs: .byte 0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x0d, 0xff

        .bss
        .align 16
        .skip 4096
stack_top:
