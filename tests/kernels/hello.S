/*
 * A multiboot (version 1) kernel written without Parallax's guest runtime
 * (issue 14, point 3): it prints a line, its command line and, for each
 * multiboot module, the module's string and its first line, on the 16550
 * at 0x3f8, and ends through QEMU's isa-debug-exit port (0xf4) with status
 * 0x10. The boot test assembles it (GNU as, ld) and runs it under
 * `qemu-system-x86_64 -kernel` and under Parallax, expecting the same.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0
        .set COM1, 0x3f8
        .set EXIT_PORT, 0xf4

        .text
        .code32
        .align 4
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .globl _start
_start:
        mov $stack_top, %esp
        mov $0x11, %ecx               /* the status for a wrong loader */
        cmp $0x2BADB002, %eax
        jne exit
        mov %ebx, %esi                /* the multiboot information */
        mov $hello, %edi
        call puts
        testl $4, (%esi)              /* flags bit 2: a command line */
        jz 1f
        mov $cmdline, %edi
        call puts
        mov 16(%esi), %edi
        call puts
        mov $'\n', %al
        call putc
1:      testl $8, (%esi)              /* flags bit 3: modules */
        jz 6f
        mov 20(%esi), %ecx            /* how many */
        mov 24(%esi), %ebx            /* the list: start, end, string, 0 */
5:      test %ecx, %ecx
        jz 6f
        mov $module, %edi
        call puts
        mov 8(%ebx), %edi
        call puts
        mov $colon, %edi
        call puts
        mov (%ebx), %edi              /* its bytes, to the first newline */
        mov 4(%ebx), %ebp
        call putline
        add $16, %ebx
        dec %ecx
        jmp 5b
6:      mov $0x10, %ecx
exit:   mov %cl, %al
        mov $EXIT_PORT, %dx
        out %al, %dx
2:      cli
        hlt
        jmp 2b

        .include "uart.inc"

        .data
hello:  .asciz "hello from a multiboot kernel in assembly\n"
cmdline: .asciz "cmdline: "
module: .asciz "module: "
colon:  .asciz ": "

        .bss
        .align 16
        .skip 4096
stack_top:
