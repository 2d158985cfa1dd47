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

/* hex32: EAX in 8 hex digits. */
hex32:  push %eax
        shr $24, %eax
        call hex8
        mov (%esp), %eax
        shr $16, %eax
        call hex8
        mov (%esp), %eax
        shr $8, %eax
        call hex8
        pop %eax
        jmp hex8

/* hex8: AL in 2 hex digits. */
hex8:   push %eax
        shr $4, %al
        call nibble
        pop %eax
nibble: and $0xf, %al
        add $'0', %al
        cmp $'9', %al
        jbe putc
        add $'a' - '9' - 1, %al
        /* fall through */

/* putc: AL to COM1 once its transmitter is empty. */
putc:   push %eax
        push %edx
        mov $0x3fd, %dx
4:      in %dx, %al
        test $0x20, %al
        jz 4b
        mov 4(%esp), %eax
        mov $0x3f8, %dx
        out %al, %dx
        pop %edx
        pop %eax
        ret

/* puts: the NUL-ended string at EDI. */
puts:   movb (%edi), %al
        test %al, %al
        jz 5f
        call putc
        inc %edi
        jmp puts
5:      ret

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
