/*
 * A multiboot kernel that uses the local APIC in x2APIC mode (issue 14,
 * point 2): it turns x2APIC on through IA32_APIC_BASE, enables the APIC
 * (spurious vector register), takes a one-shot timer interrupt, three of a
 * periodic timer and one of a TSC-deadline timer while halted, and a
 * self-IPI, ends each with an EOI, checks that nothing is left in service,
 * prints a line for each on the 16550 and ends through isa-debug-exit
 * (0xf4) with status 0x10. On a CPU without x2APIC (QEMU 7.2's TCG) it
 * says so and ends with 0x13.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)

        .globl _start
_start:
        mov $stack_top, %esp
        call flat
        mov $unexpected, %eax         /* every vector: unexpected, but */
        mov $vectors, %esi            /* these (vector, handler pairs) */
        call gates
        mov $1, %eax
        cpuid
        test $(1 << 21), %ecx
        jz no_x2apic
        mov %ecx, features
        mov $0x1b, %ecx               /* IA32_APIC_BASE: enable, x2APIC */
        rdmsr
        or $0xc00, %eax
        wrmsr
        mov $0x80f, %ecx              /* spurious vector 0xff, enabled */
        mov $0x1ff, %eax
        xor %edx, %edx
        wrmsr
        mov $s_on, %edi
        call puts

        mov $0x83e, %ecx              /* divide by 1 */
        mov $0xb, %eax
        wrmsr
        mov $0x832, %ecx              /* one-shot, vector 0x40 */
        mov $0x40, %eax
        wrmsr
        mov $0x838, %ecx              /* 1,000,000 ticks */
        mov $1000000, %eax
        wrmsr
        sti
5:      hlt
        cmpl $0, count40
        je 5b
        cli
        mov $s_oneshot, %edi
        call puts

        mov $0x832, %ecx              /* periodic, vector 0x41 */
        mov $(1 << 17) | 0x41, %eax
        wrmsr
        mov $0x838, %ecx
        mov $500000, %eax
        wrmsr
        sti
6:      hlt
        cmpl $3, count41
        jb 6b
        cli
        mov $0x832, %ecx              /* masked */
        mov $(1 << 16), %eax
        wrmsr
        mov $s_periodic, %edi
        call puts

        testl $(1 << 24), features
        jz 8f
        mov $0x832, %ecx              /* TSC-deadline, vector 0x42 */
        mov $(2 << 17) | 0x42, %eax
        xor %edx, %edx
        wrmsr
        rdtsc
        add $1000000, %eax
        adc $0, %edx
        mov $0x6e0, %ecx
        wrmsr
        sti
7:      hlt
        cmpl $0, count42
        je 7b
        cli
        mov $s_deadline, %edi
        call puts
8:
        mov $0x83f, %ecx              /* SELF IPI, vector 0x50 */
        mov $0x50, %eax
        xor %edx, %edx
        wrmsr
        sti
        nop
        cli
        cmpl $1, count50
        jne fail
        mov $s_ipi, %edi
        call puts

        mov $0x810, %ecx              /* ISR 0-7: empty */
9:      rdmsr
        test %eax, %eax
        jnz fail
        inc %ecx
        cmp $0x818, %ecx
        jb 9b
        mov $s_none, %edi
        call puts
        mov $0x10, %cl
exit:   mov %cl, %al
        out %al, $0xf4
10:     cli
        hlt
        jmp 10b
no_x2apic:
        mov $s_no, %edi
        call puts
        mov $0x13, %cl
        jmp exit
fail:   mov $s_fail, %edi
        call puts
        mov $0x12, %cl
        jmp exit

/* The handlers: count, EOI (x2APIC MSR 0x80b <- 0), return. */
        .macro handler name, counter
\name:  push %eax
        push %ecx
        push %edx
        incl \counter
        mov $0x80b, %ecx
        xor %eax, %eax
        xor %edx, %edx
        wrmsr
        pop %edx
        pop %ecx
        pop %eax
        iret
        .endm
        handler h40, count40
        handler h41, count41
        handler h42, count42
        handler h50, count50

unexpected:
        mov $s_stray, %edi
        call puts
        mov $0x12, %cl
        jmp exit


putc:   push %eax
        mov $0x3fd, %dx
11:     in %dx, %al
        test $0x20, %al
        jz 11b
        pop %eax
        mov $0x3f8, %dx
        out %al, %dx
        ret

puts:   movb (%edi), %al
        test %al, %al
        jz 12f
        call putc
        inc %edi
        jmp puts
12:     ret

        .include "pm32.inc"

        .data
vectors:
        .long 0x40, h40, 0x41, h41, 0x42, h42, 0x50, h50, 0xff, spurious, 0, 0
features: .long 0
count40: .long 0
count41: .long 0
count42: .long 0
count50: .long 0
s_on:   .asciz "x2APIC on, APIC enabled\n"
s_oneshot: .asciz "one-shot timer: its interrupt taken while halted\n"
s_periodic: .asciz "periodic timer: 3 interrupts taken while halted\n"
s_deadline: .asciz "TSC-deadline timer: its interrupt taken while halted\n"
s_ipi:  .asciz "self-IPI taken\n"
s_none: .asciz "nothing left in service\n"
s_no:   .asciz "no x2APIC on this CPU\n"
s_fail: .asciz "an interrupt missing or left in service\n"
s_stray: .asciz "unexpected interrupt or exception\n"

        .bss
        .align 16
        .skip 4096
stack_top:
