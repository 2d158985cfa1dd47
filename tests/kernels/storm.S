/*
 * An interrupt storm (issue 14, point 6): a multiboot kernel that sets the
 * PIT's channel 0 to its fastest useful rate (mode 2, count 2: about
 * 600,000 interrupts a second) with IRQ 0 the only line open, and spins
 * with interrupts on, counting them (each ended with an EOI), until it has
 * taken 300; then it prints a line and ends through isa-debug-exit (0xf4)
 * with status 0x10. Under Parallax the interrupts it can take are bounded
 * by its exits; the other domains run on.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
_start:
        mov $stack_top, %esp
        call flat
        xor %eax, %eax                /* IRQ 0 only: any other vector faults */
        mov $vectors, %esi
        call gates
        mov $pic_init, %esi
        call pics
        mov $0x34, %al                /* channel 0, mode 2, count 2 */
        out %al, $0x43
        mov $2, %al
        out %al, $0x40
        xor %al, %al
        out %al, $0x40
        sti
4:      cmpl $300, ticks
        jb 4b
        cli
        mov $done, %esi
5:      movb (%esi), %al
        test %al, %al
        jz 6f
        mov $0x3f8, %dx
        out %al, %dx
        inc %esi
        jmp 5b
6:      mov $0x10, %al
        out %al, $0xf4
7:      hlt
        jmp 7b

irq0:   push %eax
        incl ticks
        mov $0x20, %al
        out %al, $0x20
        pop %eax
        iret

        .include "pm32.inc"

        .data
vectors:
        .long 0x20, irq0, 0, 0
        pic_table 0xfe
ticks:  .long 0
done:   .asciz "storm: 300 timer interrupts taken\n"

        .bss
        .align 16
        .skip 4096
stack_top:
