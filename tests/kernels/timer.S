/*
 * A multiboot kernel that uses a PC's interrupt controllers and timer
 * (issue 14, point 2), written without Parallax's guest runtime: its own GDT
 * and IDT, the 8259 PICs remapped to vectors 0x20-0x2f with only IRQ 0
 * unmasked, the PIT's channel 0 at 100 Hz (mode 2). It halts until it has
 * taken 10 timer interrupts (each ended with an EOI), checks that nothing is
 * left in service, takes one interrupt of a one-shot count (mode 0), waits
 * for channel 2's output through port 0x61, prints a line for each on the
 * 16550 and ends through isa-debug-exit (0xf4) with status 0x10; any other
 * interrupt or exception ends it with 0x12. The boot test runs it under
 * `qemu-system-x86_64 -kernel` and under Parallax and expects the same.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0
        .set COM1, 0x3f8
        .set EXIT_PORT, 0xf4

        .text
        .code32
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        mov $stack_top, %esp
        call flat
        mov $unexpected, %eax         /* every vector: unexpected, but */
        mov $vectors, %esi            /* IRQ 0 */
        call gates
        mov $hello, %edi
        call puts

        /* The PICs: ICW1-ICW4, vectors 0x20 and 0x28, only IRQ 0 open. */
        mov $pic_init, %esi
        call pics
        /* PIT channel 0: lobyte/hibyte, mode 2, 11932 (100 Hz). */
        mov $0x34, %al
        out %al, $0x43
        mov $0x9c, %al
        out %al, $0x40
        mov $0x2e, %al
        out %al, $0x40
        sti
5:      hlt
        cmpl $10, ticks
        jb 5b
        cli
        mov $periodic, %edi
        call puts
        mov $0x0b, %al                /* OCW3: read the ISR */
        out %al, $0x20
        in $0x20, %al
        test %al, %al
        jnz fail
        mov $none_in_service, %edi
        call puts

        /* One-shot: mode 0, 1193 (1 ms): one interrupt. */
        mov $0xff, %al                /* masked while it is reprogrammed */
        out %al, $0x21
        mov $0x30, %al
        out %al, $0x43
        mov $0xa9, %al
        out %al, $0x40
        mov $0x04, %al
        out %al, $0x40
        movl $0, ticks
        mov $0xfe, %al
        out %al, $0x21
        sti
6:      hlt
        cmpl $0, ticks
        je 6b
        cli
        mov $oneshot, %edi
        call puts

        /* Channel 2 through port 0x61: gate on, mode 0, 11932. */
        in $0x61, %al
        and $0xfd, %al
        or $0x01, %al
        out %al, $0x61
        mov $0xb0, %al
        out %al, $0x43
        mov $0x9c, %al
        out %al, $0x42
        mov $0x2e, %al
        out %al, $0x42
7:      in $0x61, %al
        test $0x20, %al
        jz 7b
        mov $channel2, %edi
        call puts
        mov $0x10, %ecx
exit:   mov %cl, %al
        mov $EXIT_PORT, %dx
        out %al, %dx
8:      cli
        hlt
        jmp 8b
fail:   mov $failed, %edi
        call puts
        mov $0x12, %ecx
        jmp exit

irq0:   push %eax
        incl ticks
        mov $0x20, %al                /* EOI */
        out %al, $0x20
        pop %eax
        iret

unexpected:
        mov $stray, %edi
        call puts
        mov $0x12, %ecx
        jmp exit


/* putc: AL to COM1 once its transmitter is empty. */
putc:   push %eax
        mov $COM1 + 5, %dx
9:      in %dx, %al
        test $0x20, %al
        jz 9b
        pop %eax
        mov $COM1, %dx
        out %al, %dx
        ret

/* puts: the NUL-ended string at EDI. */
puts:   movb (%edi), %al
        test %al, %al
        jz 1f
        call putc
        inc %edi
        jmp puts
1:      ret

        .include "pm32.inc"

        .data
vectors:
        .long 0x20, irq0, 0, 0
pic_init:                             /* port, value */
        .word 0x20, 0x11, 0xa0, 0x11  /* ICW1: edge, cascade, ICW4 */
        .word 0x21, 0x20, 0xa1, 0x28  /* ICW2: vector bases */
        .word 0x21, 0x04, 0xa1, 0x02  /* ICW3: the slave on line 2 */
        .word 0x21, 0x01, 0xa1, 0x01  /* ICW4: 8086 mode */
        .word 0x21, 0xfe, 0xa1, 0xff  /* OCW1: only IRQ 0 */
        .word 0, 0
ticks:  .long 0
hello:  .asciz "timer kernel: PICs at 0x20 and 0x28, PIT at 100 Hz\n"
periodic: .asciz "10 timer interrupts taken while halted\n"
none_in_service: .asciz "no interrupt left in service\n"
oneshot: .asciz "one-shot count: its interrupt taken\n"
channel2: .asciz "channel 2 output high after its count\n"
stray:  .asciz "unexpected interrupt or exception\n"
failed: .asciz "an interrupt is still in service\n"

        .bss
        .align 16
        .skip 4096
stack_top:
