/*
 * A multiboot kernel that finds its local APIC in the ACPI MADT and
 * programs it through the xAPIC page, as PC kernels do (issue 14, point
 * 2): first both 8259s masked (the firmware leaves the PIT's IRQ 0
 * unmasked, at a vector with no handler here: with interrupts on, plain
 * QEMU would deliver it now and then), then the RSDP (rsdp.inc),
 * the RSDT's "APIC" table, its local APIC address and flags and its first
 * processor local APIC; then at that address the ID and version, the
 * spurious-vector register (software enable), a one-shot and a periodic
 * timer interrupt taken while halted, a self-IPI through the ICR, each
 * ended by an EOI, and the in-service registers empty at the end. Every
 * access is a 32-bit MOV to or from the page. It prints a line for each
 * on the 16550 and ends through isa-debug-exit (0xf4) with status 0x10
 * (0x11: the tables, 0x12: an interrupt missing, stray or left in
 * service). The boot test runs it under `qemu-system-x86_64 -machine q35
 * -kernel` and under Parallax.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
        .set COM1, 0x3f8
_start: mov $stack_top, %esp
        call flat
        mov $unexpected, %eax         /* every vector: unexpected, but */
        mov $vectors, %esi            /* these (vector, handler pairs) */
        call gates
        mov $0xff, %al                /* both 8259s masked (OCW1 alone: */
        out %al, $0x21                /* ICW1 would unmask all for a */
        out %al, $0xa1                /* moment) */

        call find_rsdp                /* the MADT through the RSDT */
        jc no_tables
        mov %esi, %ebx
        mov $0x43495041, %eax         /* "APIC" */
        call rsdt_find
        jc no_tables
        mov 36(%ebx), %eax            /* the local APIC's address */
        mov %eax, lapic
        mov $s_madt, %edi
        call puts
        mov lapic, %eax
        call hex32
        testl $1, 40(%ebx)            /* PCAT_COMPAT */
        jz 7f
        mov $s_pcat, %edi
        call puts
7:      mov $'\n', %al
        call putc
        mov 4(%ebx), %ecx             /* its entries: the first type 0 */
        lea (%ebx, %ecx), %ebp
        lea 44(%ebx), %esi
8:      cmp %ebp, %esi
        jae no_tables
        cmpb $0, (%esi)
        je 9f
        movzbl 1(%esi), %eax
        test %eax, %eax
        jz no_tables
        add %eax, %esi
        jmp 8b
9:      mov $s_cpu, %edi
        call puts
        mov 3(%esi), %al              /* its APIC ID */
        call hex8
        mov $s_disabled, %edi
        testl $1, 4(%esi)
        jz 10f
        mov $s_enabled, %edi
10:     call puts

        mov lapic, %ebx               /* the xAPIC page */
        mov $s_id, %edi
        call puts
        mov 0x20(%ebx), %eax          /* ID: bits 31:24 */
        shr $24, %eax
        call hex8
        mov $s_version, %edi
        call puts
        mov 0x30(%ebx), %eax          /* version; max LVT in bits 23:16 */
        call hex8
        mov $s_lvts, %edi
        call puts
        mov 0x30(%ebx), %eax
        shr $16, %eax
        inc %al
        call hex8
        mov $s_lvts2, %edi
        call puts
        movl $0x1ff, 0xf0(%ebx)       /* spurious vector 0xff, enabled */
        mov $s_svr, %edi
        call puts
        mov 0xf0(%ebx), %eax
        shr $8, %eax
        call hex8
        mov 0xf0(%ebx), %eax
        call hex8
        mov $'\n', %al
        call putc

        movl $0xb, 0x3e0(%ebx)        /* divide by 1 */
        movl $0x40, 0x320(%ebx)       /* one-shot, vector 0x40 */
        movl $1000000, 0x380(%ebx)    /* 1,000,000 ticks */
        sti
11:     hlt
        cmpl $0, count40
        je 11b
        cli
        mov $s_oneshot, %edi
        call puts

        movl $(1 << 17) | 0x41, 0x320(%ebx) /* periodic, vector 0x41 */
        movl $500000, 0x380(%ebx)
        sti
12:     hlt
        cmpl $3, count41
        jb 12b
        cli
        movl $(1 << 16), 0x320(%ebx)  /* masked */
        mov $s_periodic, %edi
        call puts

        movl $0, 0x310(%ebx)          /* ICR: fixed, self shorthand, 0x50 */
        movl $(1 << 18) | 0x50, 0x300(%ebx)
        sti
        nop
        cli
        cmpl $1, count50
        jne fail
        mov $s_ipi, %edi
        call puts

        mov $0x100, %ecx              /* ISR 0-7: empty */
13:     mov (%ebx, %ecx), %eax
        test %eax, %eax
        jnz fail
        add $0x10, %ecx
        cmp $0x180, %ecx
        jb 13b
        mov $s_none, %edi
        call puts
        mov $0x10, %cl
        jmp exit

/* The handlers: count, EOI (a write to the page's 0xb0), return. */
        .macro handler name, counter
\name:  push %eax
        incl \counter
        mov lapic, %eax
        movl $0, 0xb0(%eax)
        pop %eax
        iret
        .endm
        handler h40, count40
        handler h41, count41
        handler h50, count50

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
vectors:
        .long 0x40, h40, 0x41, h41, 0x50, h50, 0xff, spurious, 0, 0
lapic:  .long 0
count40: .long 0
count41: .long 0
count50: .long 0
s_madt: .asciz "madt: local APIC at 0x"
s_pcat: .asciz ", PCAT_COMPAT"
s_cpu:  .asciz "madt: processor local APIC, ID 0x"
s_enabled: .asciz ", enabled\n"
s_disabled: .asciz ", disabled\n"
s_id:   .asciz "xapic: ID 0x"
s_version: .asciz ", version 0x"
s_lvts: .asciz ", 0x"
s_lvts2: .asciz " LVT entries\n"
s_svr:  .asciz "xapic: spurious-vector register 0x"
s_oneshot: .asciz "one-shot timer: its interrupt taken while halted\n"
s_periodic: .asciz "periodic timer: 3 interrupts taken while halted\n"
s_ipi:  .asciz "self-IPI through the ICR taken\n"
s_none: .asciz "nothing left in service\n"
s_tables: .asciz "the MADT is missing or wrong\n"
s_fail: .asciz "an interrupt missing or left in service\n"
s_stray: .asciz "unexpected interrupt or exception\n"

        .bss
        .align 16
        .skip 4096
stack_top:
