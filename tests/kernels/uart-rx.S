/*
 * A multiboot kernel that reads a line from the 16550 driven by its
 * received-data interrupt (issue 14, point 2): the PICs with only IRQ 4
 * (COM1) open, the UART's OUT2 and ERBFI on. It says it is ready (by
 * polling), then halts until the handler, which reads IIR and takes every
 * byte while LSR says data is ready, has seen the end of a line (CR or
 * LF). It prints the line back and ends through isa-debug-exit (0xf4) with
 * the line's length as its status. The boot test types the line: under
 * Parallax through the control channel, under `qemu-system-x86_64 -kernel`
 * on `-serial stdio`; it expects the same lines and status.
 */
        .set COM1, 0x3f8
        .set MAX, 63

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
        mov $COM1 + 4, %dx            /* MCR: DTR, RTS, OUT2 */
        mov $0x0b, %al
        out %al, %dx
        mov $ready, %edi
        call puts
        mov $COM1 + 1, %dx            /* IER: received data available */
        mov $0x01, %al
        out %al, %dx
        sti
4:      hlt
        cmpl $0, done
        je 4b
        cli
        mov $echo, %edi
        call puts
        mov $line, %edi
        call puts
        mov $'\n', %al
        call putc
        mov length, %eax
        out %al, $0xf4
5:      hlt
        jmp 5b

irq4:   push %eax
        push %edx
        push %edi
        mov $COM1 + 2, %dx            /* IIR */
        in %dx, %al
        and $0x0f, %al
        cmp $0x04, %al                /* received data */
        je 6f
        cmp $0x0c, %al                /* character timeout (FIFO mode) */
        jne 9f
6:      mov $COM1 + 5, %dx            /* LSR: data ready? */
        in %dx, %al
        test $0x01, %al
        jz 9f
        mov $COM1, %dx
        in %dx, %al
        cmpl $0, done                 /* past the line: dropped */
        jne 6b
        cmp $'\r', %al
        je 8f
        cmp $'\n', %al
        je 8f
        mov length, %edi
        cmp $MAX, %edi
        jae 6b
        movb %al, line(%edi)
        incl length
        jmp 6b
8:      movl $1, done
        jmp 6b
9:      mov $0x20, %al                /* EOI */
        out %al, $0x20
        pop %edi
        pop %edx
        pop %eax
        iret

        .include "uart.inc"
        .include "pm32.inc"

        .data
vectors:
        .long 0x24, irq4, 0, 0
        pic_table 0xef
length: .long 0
done:   .long 0
ready:  .asciz "ready for a line\n"
echo:   .asciz "echo: "

        .bss
        .align 16
line:   .skip MAX + 1
        .skip 4096
stack_top:
