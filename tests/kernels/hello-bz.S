/*
 * A Linux bzImage written by hand (issue 14, point 1): a real-mode part
 * with a setup header (boot protocol 2.15, LOADED_HIGH, seven setup sectors)
 * and a protected-mode kernel for 1 MiB. Its 32-bit entry (code32_start)
 * checks the boot_params that ESI points at and prints a greeting, the
 * command line (cmd_line_ptr), the initrd's first line (ramdisk_image,
 * ramdisk_size) and whether the e820 table has RAM from 1 MiB on the 16550
 * at 0x3f8, then ends through the isa-debug-exit port (0xf4) with status
 * 0x10.
 *
 * Parallax's loader enters at code32_start as the 32-bit boot protocol
 * says. QEMU's `-kernel` runs the real-mode setup instead (at offset
 * 0x200, DS = the setup's segment = boot_params): the code there does what
 * Linux's setup does for this kernel's needs (the e820 table from the
 * BIOS, A20, the boot GDT) and enters the same 32-bit code, so both runs
 * can be compared. The test links it at 0xff000 (the protected-mode part
 * at 1 MiB) and keeps its bytes (objcopy -O binary).
 */
        .set COM1, 0x3f8
        .set EXIT_PORT, 0xf4
        .set SETUP_SECTS, 7
        .set SMAP, 0x534d4150

        .text
        .code16
        .globl _start
_start:
        .org 0x1f1
        .byte SETUP_SECTS                     /* 0x1f1 setup_sects */
        .word 0                               /* root_flags */
        .long (pm_end - pm_start) / 16        /* 0x1f4 syssize */
        .word 0, 0, 0                         /* ram_size, vid_mode, root_dev */
        .word 0xaa55                          /* 0x1fe boot_flag */
        .byte 0xeb, setup16 - header          /* 0x200 jump over the header */
header: .ascii "HdrS"                         /* 0x202 */
        .word 0x020f                          /* 0x206 version 2.15 */
        .long 0                               /* realmode_swtch */
        .word 0, 0                            /* start_sys_seg, kernel_version */
        .byte 0                               /* 0x210 type_of_loader */
        .byte 1                               /* 0x211 loadflags: LOADED_HIGH */
        .word 0                               /* setup_move_size */
        .long 0x100000                        /* 0x214 code32_start */
        .long 0, 0                            /* 0x218 ramdisk_image, ramdisk_size */
        .long 0                               /* bootsect_kludge */
        .word 0                               /* 0x224 heap_end_ptr */
        .byte 0, 0                            /* ext_loader_ver, ext_loader_type */
        .long 0                               /* 0x228 cmd_line_ptr */
        .long 0x37ffffff                      /* 0x22c initrd_addr_max */
        .long 0x200000                        /* 0x230 kernel_alignment */
        .byte 0, 0                            /* relocatable_kernel, min_alignment */
        .word 0                               /* xloadflags */
        .long 255                             /* 0x238 cmdline_size */
        .long 0                               /* hardware_subarch */
        .quad 0                               /* hardware_subarch_data */
        .long 0, 0                            /* payload_offset, payload_length */
        .quad 0                               /* setup_data */
        .quad 0x100000                        /* 0x258 pref_address */
        .long pm_end - pm_start               /* 0x260 init_size */
        .long 0, 0                            /* handover_offset, kernel_info_offset */

/* The real-mode entry (QEMU's loader): CS = DS + 0x20, DS = ES = SS = the
 * setup's segment, which holds boot_params; its code lies past the e820
 * table (0x2d0-0xccf), which it fills. */
setup16:
        jmp setup_code
        .org 0xd00
setup_code:
        cli
        cld
        xor %ebx, %ebx                        /* e820 continuation */
        mov $0x2d0, %di                       /* boot_params.e820_table */
        xor %bp, %bp
1:      mov $0xe820, %eax
        mov $20, %ecx
        mov $SMAP, %edx
        int $0x15
        jc 2f
        cmp $SMAP, %eax
        jne 2f
        inc %bp
        add $20, %di
        cmp $128, %bp
        jae 2f
        test %ebx, %ebx
        jnz 1b
2:      mov %bp, %ax
        movb %al, 0x1e8                       /* e820_entries */
        in $0x92, %al                         /* A20 on (port 0x92) */
        or $2, %al
        and $0xfe, %al
        out %al, $0x92
        xor %esi, %esi
        mov %ds, %si
        shl $4, %esi                          /* boot_params, linear */
        lea gdt - _start(%esi), %eax
        mov %eax, gdt_base - _start
        lgdtl gdtr - _start
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        mov $0x18, %ax                        /* __BOOT_DS */
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        xor %ebx, %ebx
        xor %ebp, %ebp
        xor %edi, %edi
        ljmpl $0x10, $0x100000                /* __BOOT_CS:code32_start */

        .balign 8
gdt:    .quad 0, 0
        .quad 0x00cf9a000000ffff              /* 0x10: flat code */
        .quad 0x00cf92000000ffff              /* 0x18: flat data */
gdtr:   .word 31
gdt_base:
        .long 0

        .org 512 * (SETUP_SECTS + 1)

/* The protected-mode kernel, at 1 MiB. */
        .code32
pm_start:
        mov $stack_top, %esp
        mov $0x11, %ecx                       /* the status for a wrong loader */
        cmpl $0x53726448, 0x202(%esi)         /* boot_params.hdr's "HdrS" */
        jne exit
        mov $hello, %edi
        call puts
        mov 0x228(%esi), %edi                 /* cmd_line_ptr */
        test %edi, %edi
        jz 1f
        mov $cmdline, %edi
        call puts
        mov 0x228(%esi), %edi
        call puts
        mov $'\n', %al
        call putc
1:      mov 0x218(%esi), %edi                 /* ramdisk_image */
        mov 0x21c(%esi), %ebp                 /* ramdisk_size */
        test %ebp, %ebp
        jz 6f
        add %edi, %ebp
        push %edi
        mov $initrd, %edi
        call puts
        pop %edi
        call putline
6:      movzbl 0x1e8(%esi), %ecx              /* e820_entries */
        lea 0x2d0(%esi), %ebx                 /* e820_table */
        mov $20, %edx
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

hello:  .asciz "hello from a bzImage in assembly\n"
cmdline: .asciz "cmdline: "
initrd: .asciz "initrd: "
ram:    .asciz "memory map: RAM from 1 MiB\n"
noram:  .asciz "memory map: no RAM from 1 MiB\n"

        .balign 16
        .skip 4096
stack_top:
pm_end:
