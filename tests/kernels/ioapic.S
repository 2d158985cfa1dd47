/*
 * A multiboot kernel that takes ISA interrupts through the I/O APIC, as PC
 * kernels do once they leave the 8259s (issue 14, point 2): from the ACPI
 * MADT (rsdp.inc) the I/O APIC's address and GSI base and the override of
 * ISA IRQ 0 (the PIT) to GSI 2; through IOREGSEL (+0) and IOWIN (+0x10)
 * its version (0x11, or QEMU's 0x20) and entry count, then, with both
 * 8259s masked and the local APIC enabled through its xAPIC page, the
 * PIT's IRQ 0 on its override's pin (vector 0x30) three times while halted
 * and COM1's transmitter-empty interrupt (IRQ 4, pin 4, vector 0x34) once,
 * each a fixed, edge, physical-destination entry and each ended by a local
 * APIC EOI. Last it writes the I/O APIC nonsense (a register that is not
 * there, an unmasked entry for vector 3, an NMI entry) on pins nothing
 * drives, which Parallax refuses with a logged reason and QEMU takes, and
 * goes on. Every access is a 32-bit MOV. It prints a line for each on the
 * 16550 and ends through isa-debug-exit (0xf4) with status 0x10 (0x11: the
 * tables, 0x12: an interrupt missing or stray). The boot test runs it
 * under `qemu-system-x86_64 -kernel` and under Parallax.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
        .set COM1, 0x3f8
        .set LAPIC, 0xfee00000
_start: mov $stack_top, %esp
        call flat
        mov $unexpected, %eax
        mov $vectors, %esi
        call gates
        mov $pic_init, %esi           /* the 8259s remapped, all masked */
        call pics

        call find_rsdp
        jc no_tables
        mov %esi, %ebx
        mov $0x43495041, %eax         /* "APIC" */
        call rsdt_find
        jc no_tables
        mov 4(%ebx), %ecx             /* its entries: type 1 and type 2 */
        lea (%ebx, %ecx), %ebp
        lea 44(%ebx), %esi
1:      cmp %ebp, %esi
        jae 4f
        movzbl 1(%esi), %eax
        test %eax, %eax
        jz no_tables
        cmpb $1, (%esi)
        jne 2f
        mov 4(%esi), %edx             /* I/O APIC address, GSI base */
        mov %edx, ioapic
        mov 8(%esi), %edx
        mov %edx, gsibase
        jmp 3f
2:      cmpb $2, (%esi)               /* an override of ISA IRQ 0 */
        jne 3f
        cmpb $0, 3(%esi)
        jne 3f
        mov 4(%esi), %edx
        mov %edx, pin0
3:      add %eax, %esi
        jmp 1b
4:      cmpl $0, ioapic
        je no_tables
        mov $s_madt, %edi
        call puts
        mov ioapic, %eax
        call hex32
        mov $s_gsi, %edi
        call puts
        mov gsibase, %eax
        call hex8
        mov $s_irq0, %edi
        call puts
        mov pin0, %eax
        call hex8
        mov $'\n', %al
        call putc

        mov ioapic, %ebx
        movl $1, (%ebx)               /* the version register: 0x11 */
        mov 0x10(%ebx), %esi          /* (82093AA) or 0x20 (QEMU's q35) */
        cmp $0x11, %si
        je 8f
        cmp $0x20, %si
        jne fail
8:      mov $s_version, %edi
        call puts
        mov %esi, %eax
        shr $16, %eax
        inc %al
        call hex8
        mov $s_entries2, %edi
        call puts
        mov pin0, %eax                /* its entry masked at reset */
        lea 0x10(, %eax, 2), %eax
        mov %eax, (%ebx)
        mov 0x10(%ebx), %eax
        test $(1 << 16), %eax
        jz fail

        movl $0x1ff, LAPIC + 0xf0     /* the local APIC: enabled */

        mov pin0, %eax                /* IRQ 0's pin: 0x30, to APIC 0 */
        lea 0x11(, %eax, 2), %ecx
        mov %ecx, (%ebx)
        movl $0, 0x10(%ebx)
        dec %ecx
        mov %ecx, (%ebx)
        movl $0x30, 0x10(%ebx)
        mov $0x34, %al                /* PIT channel 0: mode 2, 100 Hz */
        out %al, $0x43
        mov $0x9c, %al
        out %al, $0x40
        mov $0x2e, %al
        out %al, $0x40
        sti
5:      hlt
        cmpl $3, count30
        jb 5b
        cli
        mov pin0, %eax                /* masked again */
        lea 0x10(, %eax, 2), %ecx
        mov %ecx, (%ebx)
        movl $(1 << 16) | 0x30, 0x10(%ebx)
        mov $s_pit, %edi
        call puts

        movl $0x19, (%ebx)            /* pin 4: 0x34 */
        movl $0, 0x10(%ebx)
        movl $0x18, (%ebx)
        movl $0x34, 0x10(%ebx)
        mov $COM1 + 4, %dx            /* OUT2, then THRE's interrupt */
        mov $0x0b, %al
        out %al, %dx
        mov $COM1 + 1, %dx
        mov $0x02, %al
        out %al, %dx
        sti
6:      hlt
        cmpl $0, count34
        je 6b
        cli
        mov $COM1 + 1, %dx
        xor %al, %al
        out %al, %dx
        movl $0x18, (%ebx)
        movl $(1 << 16) | 0x34, 0x10(%ebx)
        mov $s_uart, %edi
        call puts

        movl $0x77, (%ebx)            /* nonsense: no register 0x77 */
        movl $0xdeadbeef, 0x10(%ebx)
        movl $0x1a, (%ebx)            /* pin 5: vector 3, unmasked */
        movl $0x03, 0x10(%ebx)
        movl $0x1c, (%ebx)            /* pin 6: NMI delivery */
        movl $0x400, 0x10(%ebx)
        mov $s_nonsense, %edi
        call puts
        mov $0x10, %cl
        jmp exit

/* The handlers: count, EOI to the local APIC, return. */
        .macro handler name, counter
\name:  incl \counter
        movl $0, LAPIC + 0xb0
        iret
        .endm
        handler h30, count30
        handler h34, count34

unexpected:
        mov $s_stray, %edi
        call puts
        mov $0x12, %cl
        jmp exit

        .include "pm32.inc"
        .include "rsdp.inc"
        endings
        .include "uart.inc"

        .data
        pic_table 0xff
vectors:
        .long 0x30, h30, 0x34, h34, 0xff, spurious, 0, 0
ioapic: .long 0
gsibase: .long 0
pin0:   .long 0
count30: .long 0
count34: .long 0
s_madt: .asciz "madt: I/O APIC at 0x"
s_gsi:  .asciz ", GSI base 0x"
s_irq0: .asciz ", ISA IRQ 0 on GSI 0x"
s_version: .asciz "ioapic: 0x"
s_entries2: .asciz " redirection entries, masked at reset\n"
s_pit:  .asciz "PIT: 3 interrupts through the I/O APIC taken while halted\n"
s_uart: .asciz "COM1: its interrupt through the I/O APIC taken while halted\n"
s_nonsense: .asciz "nonsense written to the I/O APIC\n"
s_tables: .asciz "the MADT is missing or wrong\n"
s_fail: .asciz "an interrupt missing or an entry wrong\n"
s_stray: .asciz "unexpected interrupt or exception\n"

        .bss
        .align 16
        .skip 4096
stack_top:
