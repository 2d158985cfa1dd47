/*
 * A multiboot kernel that programs its local APIC with nonsense (issue 14,
 * point 6): with interrupts off, 64 rounds of pseudo-random values written
 * to every register of the xAPIC page a guest may write (ID, TPR, EOI,
 * LDR, DFR, spurious vector, ESR, ICR, the LVTs, the timer's counts and
 * divider), then a line, then a read of the timer's current count, which
 * Parallax does not emulate through the page: its domain is stopped,
 * saying so, and nothing of this reaches another domain.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
        .set COM1, 0x3f8
_start: mov $stack_top, %esp
        cli
        mov $0xfee00000, %ebx
        mov $0x2545f491, %eax         /* xorshift32 state */
        mov $64, %ebp
1:      mov $offsets, %esi
2:      mov (%esi), %ecx
        test %ecx, %ecx
        jz 3f
        mov %eax, %edx                /* the next value */
        shl $13, %edx
        xor %edx, %eax
        mov %eax, %edx
        shr $17, %edx
        xor %edx, %eax
        mov %eax, %edx
        shl $5, %edx
        xor %edx, %eax
        mov %eax, (%ebx, %ecx)
        add $4, %esi
        jmp 2b
3:      dec %ebp
        jnz 1b
        mov $s_done, %edi
        call puts
        mov 0x390(%ebx), %eax         /* the current count */
        mov $s_read, %edi
        call puts
        mov $0x10, %al
        out %al, $0xf4
4:      hlt
        jmp 4b

        .include "uart.inc"

        .data
offsets:
        .long 0x20, 0x80, 0xb0, 0xd0, 0xe0, 0xf0, 0x280, 0x310, 0x300
        .long 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x3e0, 0
s_done: .asciz "nonsense written to the local APIC\n"
s_read: .asciz "current count read through the xAPIC page\n"

        .bss
        .align 16
        .skip 4096
stack_top:
