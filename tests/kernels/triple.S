/*
 * A multiboot kernel that triple-faults (issue 14, point 6): it prints a
 * line, loads an empty IDT and executes INT3; the #GP of the missing gate
 * has no gate either (#DF), nor has that: the CPU shuts down. Under
 * Parallax only its domain ends, with the reason named.
 */
        .text
        .code32
        .align 4
        .long 0x1BADB002, 0, -(0x1BADB002)
        .globl _start
_start: mov $msg, %esi
1:      movb (%esi), %al
        test %al, %al
        jz 2f
        mov $0x3f8, %dx
        out %al, %dx
        inc %esi
        jmp 1b
2:      lidt empty_idt
        int3
        mov $0x11, %al                /* not reached */
        out %al, $0xf4
3:      hlt
        jmp 3b

        .data
empty_idt:
        .word 0
        .long 0
msg:    .asciz "triple fault kernel: INT3 with an empty IDT\n"
