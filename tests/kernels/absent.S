/*
 * A multiboot kernel that reads and writes guest-physical memory where no
 * RAM and no device answers, as PC hardware does (issue 14, point 2):
 * 0xb0100000, under Parallax nothing at all, under QEMU's q35 the PCI
 * Express configuration space of bus 1, which has no device (QEMU's own
 * unassigned addresses read 0, not a PC's all ones). Every read, of 1, 2 and 4 bytes through MOV,
 * MOVZX and MOVSX, gives all ones, a write changes nothing, and the kernel
 * goes on. It prints what it read on the 16550 and ends through
 * isa-debug-exit (0xf4) with status 0 (0x12: a read that was not all ones).
 * The boot test runs it under `qemu-system-x86_64 -kernel` and under
 * Parallax, where each access is an EPT violation the vmm emulates.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
        .set COM1, 0x3f8
        .set HOLE, 0xb0100000
_start: mov $stack_top, %esp
        mov $HOLE, %ebx
        mov HOLE, %eax                /* 8b 05: disp32 */
        mov %eax, %esi
        mov $s_read, %edi
        call puts
        mov %esi, %eax
        call hex32
        mov $'\n', %al
        call putc
        cmp $0xffffffff, %esi
        jne fail
        movl $0x12345678, (%ebx)      /* dropped */
        movb $0, 4(%ebx)
        mov 8(%ebx), %ecx             /* still all ones */
        cmp $0xffffffff, %ecx
        jne fail
        xor %edx, %edx
        movzbl 1(%ebx), %edx          /* 0x000000ff */
        cmp $0xff, %edx
        jne fail
        movswl 2(%ebx), %edx          /* 0xffffffff */
        cmp $0xffffffff, %edx
        jne fail
        mov $0x11223344, %eax
        mov (%ebx), %ah               /* 0x1122ff44 */
        cmp $0x1122ff44, %eax
        jne fail
        mov $s_ok, %edi
        call puts
        xor %cl, %cl
exit:   mov %cl, %al
        out %al, $0xf4
1:      cli
        hlt
        jmp 1b
fail:   mov $s_fail, %edi
        call puts
        mov $0x12, %cl
        jmp exit

        .include "uart.inc"

        .data
s_read: .asciz "absent MMIO at 0xb0100000 reads 0x"
s_ok:   .asciz "bytes, words and longs read all ones; writes changed nothing\n"
s_fail: .asciz "a read that was not all ones\n"

        .bss
        .align 16
        .skip 4096
stack_top:
