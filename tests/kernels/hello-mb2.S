/*
 * A multiboot2 kernel written without Parallax's guest runtime (issue 14,
 * points 1 and 3): it prints a line, its command line, each module's
 * string and first line, and whether the memory map has RAM from 1 MiB,
 * on the 16550 at 0x3f8, in that order whatever the order of the loader's
 * tags, and ends through the isa-debug-exit port (0xf4) with status 0x10.
 * The boot test assembles it (GNU as, ld) and runs it under GRUB on QEMU
 * (QEMU's -kernel does not take multiboot2) and under Parallax.
 */
        .set MB2_MAGIC, 0xe85250d6
        .set COM1, 0x3f8
        .set EXIT_PORT, 0xf4

        .text
        .code32
        .align 8
mb2_header:
        .long MB2_MAGIC
        .long 0                               /* i386 */
        .long mb2_end - mb2_header
        .long 0x100000000 - (MB2_MAGIC + (mb2_end - mb2_header))
        .align 8
        .short 1, 0                           /* information request: */
        .long 20
        .long 1, 3, 6                         /* cmdline, modules, mmap */
        .align 8
        .short 0, 0                           /* end */
        .long 8
mb2_end:

        .globl _start
_start:
        mov $stack_top, %esp
        mov $0x11, %ecx                       /* the status for a wrong loader */
        cmp $0x36d76289, %eax
        jne exit
        mov %ebx, info
        mov $hello, %edi
        call puts
        movl $1, want                         /* the command line */
        call each_tag
        movl $3, want                         /* the modules */
        call each_tag
        movl $6, want                         /* the memory map */
        call each_tag
        mov $0x10, %ecx
exit:   mov %cl, %al
        mov $EXIT_PORT, %dx
        out %al, %dx
2:      cli
        hlt
        jmp 2b

/* each_tag: calls show for each information tag of type `want`. */
each_tag:
        mov info, %ebx
        add $8, %ebx
1:      mov (%ebx), %eax
        test %eax, %eax
        jz 3f
        cmp want, %eax
        jne 2f
        call show
2:      mov 4(%ebx), %eax                    /* the next tag, 8-aligned */
        add $7, %eax
        and $~7, %eax
        add %eax, %ebx
        jmp 1b
3:      ret

/* show: the tag at EBX. */
show:   cmpl $1, (%ebx)
        jne 1f
        mov $cmdline, %edi
        call puts
        lea 8(%ebx), %edi
        call puts
        mov $'\n', %al
        jmp putc
1:      cmpl $3, (%ebx)
        jne 3f
        mov $module, %edi
        call puts
        lea 16(%ebx), %edi                    /* its string */
        call puts
        mov $colon, %edi
        call puts
        mov 8(%ebx), %edi                     /* its bytes, to the first newline */
        mov 12(%ebx), %ebp
        jmp putline
3:      lea 16(%ebx), %edi                    /* mmap: the entries */
        mov 4(%ebx), %ebp
        add %ebx, %ebp                        /* the tag's end */
4:      cmp %ebp, %edi
        jae 6f
        cmpl $0x100000, (%edi)                /* RAM (1) from 1 MiB */
        jne 5f
        cmpl $0, 4(%edi)
        jne 5f
        cmpl $1, 16(%edi)
        jne 5f
        mov $ram, %edi
        jmp puts
5:      add 8(%ebx), %edi                     /* entry size */
        jmp 4b
6:      mov $noram, %edi
        jmp puts

        .include "uart.inc"

        .data
hello:  .asciz "hello from a multiboot2 kernel in assembly\n"
cmdline: .asciz "cmdline: "
module: .asciz "module: "
colon:  .asciz ": "
ram:    .asciz "memory map: RAM from 1 MiB\n"
noram:  .asciz "memory map: no RAM from 1 MiB\n"

        .bss
        .align 16
info:   .long 0
want:   .long 0
        .skip 4096
stack_top:
