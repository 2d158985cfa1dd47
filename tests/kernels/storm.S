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
        lgdt gdt_desc
        ljmp $0x08, $1f
1:      mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $idt + 0x20 * 8, %edi     /* IRQ 0 only: any other vector faults */
        mov $irq0, %eax
        mov %ax, (%edi)
        movw $0x08, 2(%edi)
        movw $0x8e00, 4(%edi)
        shr $16, %eax
        mov %ax, 6(%edi)
        lidt idt_desc
        mov $pic_init, %esi
2:      movw (%esi), %dx
        test %dx, %dx
        jz 3f
        movb 2(%esi), %al
        out %al, %dx
        add $4, %esi
        jmp 2b
3:      mov $0x34, %al                /* channel 0, mode 2, count 2 */
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

        .data
        .align 8
gdt:    .quad 0
        .quad 0x00cf9a000000ffff
        .quad 0x00cf92000000ffff
gdt_desc:
        .word 23
        .long gdt
idt_desc:
        .word 256 * 8 - 1
        .long idt
pic_init:
        .word 0x20, 0x11, 0xa0, 0x11, 0x21, 0x20, 0xa1, 0x28
        .word 0x21, 0x04, 0xa1, 0x02, 0x21, 0x01, 0xa1, 0x01
        .word 0x21, 0xfe, 0xa1, 0xff, 0, 0
ticks:  .long 0
done:   .asciz "storm: 300 timer interrupts taken\n"

        .bss
        .align 16
idt:    .skip 256 * 8
        .skip 4096
stack_top:
