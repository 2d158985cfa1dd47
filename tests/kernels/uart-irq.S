/*
 * A multiboot kernel that writes to the 16550 driven by its
 * transmitter-empty interrupt (issue 14, point 2): the PICs with only IRQ 4
 * (COM1) open, the UART's OUT2 and ETBEI on; the handler reads IIR and
 * sends the next byte of its message on each interrupt (and turns ETBEI off
 * after the last), while the main loop halts until the message is out. It
 * then prints a line by polling and ends through isa-debug-exit (0xf4) with
 * status 0x10. The boot test runs it under `qemu-system-x86_64 -kernel`
 * and under Parallax and expects the same.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
_start:
        mov $stack_top, %esp
        call flat
        xor %eax, %eax                /* IRQ 4 only: any other vector faults */
        mov $vectors, %esi
        call gates
        mov $pic_init, %esi
        call pics
        mov $0x3fc, %dx               /* MCR: DTR, RTS, OUT2 */
        mov $0x0b, %al
        out %al, %dx
        movl $message, next
        mov $0x3f9, %dx               /* IER: transmitter empty */
        mov $0x02, %al
        out %al, %dx
        sti
4:      hlt
        cmpl $0, done
        je 4b
        cli
        mov $polled, %esi
5:      movb (%esi), %al
        test %al, %al
        jz 7f
        mov %al, %ah
        mov $0x3fd, %dx
6:      in %dx, %al
        test $0x20, %al
        jz 6b
        mov %ah, %al
        mov $0x3f8, %dx
        out %al, %dx
        inc %esi
        jmp 5b
7:      mov $0x10, %al
        out %al, $0xf4
8:      hlt
        jmp 8b

irq4:   push %eax
        push %edx
        push %esi
        mov $0x3fa, %dx               /* IIR */
        in %dx, %al
        and $0x0f, %al
        cmp $0x02, %al                /* transmitter empty? */
        jne 10f
        mov next, %esi
        movb (%esi), %al
        test %al, %al
        jz 9f
        mov $0x3f8, %dx
        out %al, %dx
        incl next
        jmp 10f
9:      mov $0x3f9, %dx               /* all sent: ETBEI off */
        xor %al, %al
        out %al, %dx
        movl $1, done
10:     mov $0x20, %al                /* EOI */
        out %al, $0x20
        pop %esi
        pop %edx
        pop %eax
        iret

        .include "pm32.inc"

        .data
vectors:
        .long 0x24, irq4, 0, 0
        pic_table 0xef
next:   .long 0
done:   .long 0
message: .asciz "this line went out one interrupt per byte\n"
polled: .asciz "and this one by polling\n"

        .bss
        .align 16
        .skip 4096
stack_top:
