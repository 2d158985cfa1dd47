/*
 * A PVH kernel written without Parallax's guest runtime (issue 14, points
 * 1 and 3): an ELF with Xen's XEN_ELFNOTE_PHYS32_ENTRY note, as Linux's
 * vmlinux has. It checks the hvm_start_info magic and prints a line, its
 * command line, each module's first line and whether the memory map has
 * RAM from 1 MiB, on the 16550 at 0x3f8, and ends through the
 * isa-debug-exit port (0xf4) with status 0x10. The boot test runs it under
 * `qemu-system-x86_64 -kernel -initrd` (QEMU's PVH loader) and under
 * Parallax.
 */
        .set START_MAGIC, 0x336ec578
        .set COM1, 0x3f8
        .set EXIT_PORT, 0xf4

        .section .note.Xen, "a", @note
        .align 4
        .long 4                               /* name size */
        .long 4                               /* descriptor size */
        .long 18                              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start

        .text
        .code32
        .globl _start
_start:
        mov $stack_top, %esp
        mov $0x11, %ecx                       /* the status for a wrong loader */
        cmpl $START_MAGIC, (%ebx)
        jne exit
        mov %ebx, %esi                        /* the hvm_start_info */
        mov $hello, %edi
        call puts
        mov 24(%esi), %edi                    /* cmdline_paddr */
        test %edi, %edi
        jz 1f
        mov $cmdline, %edi
        call puts
        mov 24(%esi), %edi
        call puts
        mov $'\n', %al
        call putc
1:      mov 12(%esi), %ecx                    /* nr_modules */
        mov 16(%esi), %ebx                    /* modlist_paddr */
5:      test %ecx, %ecx
        jz 6f
        mov $module, %edi
        call puts
        mov (%ebx), %edi                      /* paddr */
        mov %edi, %ebp
        add 8(%ebx), %ebp                     /* + size */
        call putline
        add $32, %ebx
        dec %ecx
        jmp 5b
6:      mov 40(%esi), %ebx                    /* memmap_paddr */
        mov 48(%esi), %ecx                    /* memmap_entries */
        mov $24, %edx
        call ram_line
        mov $0x10, %ecx
exit:   mov %cl, %al
        mov $EXIT_PORT, %dx
        out %al, %dx
9:      cli
        hlt
        jmp 9b

        .include "uart.inc"
        .include "memmap.inc"

        .data
hello:  .asciz "hello from a PVH kernel in assembly\n"
cmdline: .asciz "cmdline: "
module: .asciz "module: "
ram:    .asciz "memory map: RAM from 1 MiB\n"
noram:  .asciz "memory map: no RAM from 1 MiB\n"

        .bss
        .align 16
        .skip 4096
stack_top:
