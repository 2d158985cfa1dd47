/*
 * A multiboot kernel that finds the ACPI tables the way a PC kernel does
 * and powers the machine off through them (issue 14, point 2): the RSDP in
 * the first KiB of the EBDA (the BIOS data area's word at 0x40e) or, not
 * there, in 0xe0000-0xfffff; its checksum; the RSDT's FADT; the FADT's
 * PM1a control block and DSDT. It prints what it found on the 16550 and
 * writes SLP_EN with sleep type 0 (the S5 of QEMU's q35 and Parallax) to
 * PM1a control: the machine is off (a machine that stays on halts with
 * interrupts off). Anything missing ends it through
 * isa-debug-exit (0xf4) with status 0x11. The boot test runs it under
 * `qemu-system-x86_64 -machine q35 -kernel` and under Parallax.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
        .set COM1, 0x3f8
_start: mov $stack_top, %esp
        call find_rsdp
        jc fail
        mov %esi, %ebx                /* the RSDP */
        mov $20, %ecx                 /* its checksum */
        xor %al, %al
1:      add (%esi), %al
        inc %esi
        loop 1b
        test %al, %al
        jnz fail
        mov $s_rsdp, %edi
        call puts
        mov $0x50434146, %eax         /* "FACP" through the RSDT */
        call rsdt_find
        jc fail
        mov $s_fadt, %edi
        call puts
        mov 64(%ebx), %eax            /* PM1a_CNT_BLK */
        mov %eax, pm1a
        shr $8, %eax
        call hex8
        mov pm1a, %eax
        call hex8
        mov $'\n', %al
        call putc
        mov 40(%ebx), %eax            /* the DSDT */
        cmpl $0x54445344, (%eax)      /* "DSDT" */
        jne fail
        mov $s_dsdt, %edi
        call puts
        mov pm1a, %edx
        mov $0x2000, %ax              /* SLP_EN, sleep type 0 */
        out %ax, %dx
9:      cli                           /* the power goes (not at once on QEMU) */
        hlt
        jmp 9b
fail:   mov $s_fail, %edi
        call puts
        mov $0x11, %al
        out %al, $0xf4
4:      hlt
        jmp 4b

        .include "rsdp.inc"
        .include "uart.inc"

        .data
pm1a:   .long 0
s_rsdp: .asciz "acpi: RSDP found, checksum right\n"
s_fadt: .asciz "acpi: FADT in the RSDT, PM1a control at port 0x"
s_dsdt: .asciz "acpi: DSDT present; powering off through PM1a control\n"
s_fail: .asciz "acpi: tables missing or wrong\n"

        .bss
        .align 16
        .skip 4096
stack_top:
