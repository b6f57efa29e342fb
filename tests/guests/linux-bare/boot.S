# A minimal Linux boot sector for Bochs (experiment: the same kernel booted bare, no Keel).
# Loads the bzImage's setup to 0x90000, its protected-mode part to 0x100000, the initrd to
# 128 MiB (BIOS int 13h AH=42h into a low buffer, int 15h AH=87h up), fills the setup header
# (boot.rst 16-bit protocol) and jumps to the setup code at 0x9020:0.
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    sti
    mov %dl, drive
    # the rest of this loader: 3 sectors after this one, to 0x7e00
    mov $0x0203, %ax
    mov $0x0002, %cx
    xor %dh, %dh
    mov $0x7e00, %bx
    int $0x13
    jc fail
    jmp stage2
fail:
    mov $0x3f8, %dx
    mov $'E', %al
    out %al, %dx
3:  hlt
    jmp 3b
drive: .byte 0
    .org 0x1fe
    .byte 0x55, 0xaa
stage2:
    # sector 0 of the kernel (boot sector + header) to 0x9000:0
    movw $0x9000, dap_seg
    movw $0, dap_off
    mov kernel_lba, %eax
    mov %eax, dap_lba
    movw $1, dap_count
    call read
    push %ds
    mov $0x9000, %ax
    mov %ax, %ds
    movzbw 0x1f1, %cx
    pop %ds
    test %cx, %cx
    jnz 1f
    mov $4, %cx
1:  mov %cx, setup_sects
    movw $0x200, dap_off
    mov kernel_lba, %eax
    inc %eax
    mov %eax, dap_lba
    mov %cx, dap_count
    call read
    # the protected-mode kernel to 1 MiB
    mov kernel_lba, %eax
    inc %eax
    movzwl setup_sects, %ecx
    add %ecx, %eax
    mov %eax, cur_lba
    mov kernel_sectors, %eax
    dec %eax
    sub %ecx, %eax
    mov %eax, remaining
    movl $0x100000, dest
    call copy_high
    # the initrd to 128 MiB
    mov initrd_lba, %eax
    mov %eax, cur_lba
    mov initrd_sectors, %eax
    mov %eax, remaining
    movl $0x8000000, dest
    call copy_high
    # the header
    mov $0x9000, %ax
    mov %ax, %es
    movb $0xff, %es:0x210
    orb $0x80, %es:0x211
    movw $0xde00, %es:0x224
    movl $0x9e000, %es:0x228
    movl $0x8000000, %es:0x218
    mov initrd_size, %eax
    mov %eax, %es:0x21c
    mov $cmdline, %si
    mov $0xe000, %di
    mov $96, %cx
    cld
    rep movsb
    cli
    mov $0x9000, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $0xe000, %sp
    ljmp $0x9020, $0

# copy `remaining` sectors from `cur_lba` to `dest`, 64 sectors at a time
copy_high:
    mov remaining, %eax
    test %eax, %eax
    jz 9f
    cmp $64, %eax
    jbe 2f
    mov $64, %eax
2:  mov %ax, dap_count
    movw $0x2000, dap_seg
    movw $0, dap_off
    mov cur_lba, %ebx
    mov %ebx, dap_lba
    push %ax
    call read
    pop %ax
    # int 15h AH=87h: CX words from 0x20000 to dest
    movzwl %ax, %ecx
    shl $8, %ecx
    mov dest, %ebx
    mov %bx, gdt_dst_base
    shr $16, %ebx
    mov %bl, gdt_dst_base+2
    mov %bh, gdt_dst_base_hi
    push %es
    push %ds
    pop %es
    mov $gdt, %si
    push %cx
    mov $0x87, %ah
    int $0x15
    pop %cx
    pop %es
    jc fail
    movzwl %cx, %ecx
    shl $1, %ecx
    add %ecx, dest
    shr $9, %ecx
    add %ecx, cur_lba
    sub %ecx, remaining
    jmp copy_high
9:  ret

read:
    mov $0x42, %ah
    mov drive, %dl
    mov $dap, %si
    int $0x13
    jc fail
    ret

setup_sects: .word 0
cur_lba: .long 0
remaining: .long 0
dest: .long 0
.balign 4
dap: .byte 0x10, 0
dap_count: .word 0
dap_off: .word 0
dap_seg: .word 0
dap_lba: .long 0, 0
gdt: .fill 16, 1, 0
    .word 0xffff
    .byte 0x00, 0x00, 0x02   # source base 0x20000
    .byte 0x93, 0x00, 0x00
    .word 0xffff
gdt_dst_base: .byte 0, 0, 0
    .byte 0x93, 0x00
gdt_dst_base_hi: .byte 0
    .fill 16, 1, 0
end_code:
    .org 0x780
cmdline: .fill 96, 1, 0
kernel_lba: .long 0
kernel_sectors: .long 0
initrd_lba: .long 0
initrd_sectors: .long 0
initrd_size: .long 0
    .org 0x800
