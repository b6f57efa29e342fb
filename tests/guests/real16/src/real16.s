# real16: the 16-bit real-mode test guest (AT&T syntax, assembled by LLVM through global_asm!).
#
# Entry (Keel's flat loader, docs/GUESTS.md): CS:IP = 0000:7C00, DS = ES = SS = 0, SP = 0x7C00,
# DL = 0x80, interrupts off, no BIOS. Lines printed on COM1 (0x3F8):
#   real16: hello from real mode
#   real16: cpuid sig=KeelKeelKeel hv=1 vmx=0
#   real16: vmcall id=<n>                  (hypercall 3, GUEST_ID)
#   real16: via hypercall                  (sent with hypercall 1, CONSOLE_WRITE)
#   real16: enosys ok                      (hypercall 0x7777 must return -38)
#   real16: hlt ok                         (HLT woken by the PIT through the 8259A and the IVT)
#   real16: done                           then 0x10 to port 0xf4
# Without a hypervisor a VMCALL raises #UD: the handler prints "real16: vmcall #UD" and skips it.
# Any other exception prints "real16: exception vec=<v> err=0x0 rip=<ip>" and exits with 0x3f.

    .code16

# ---- Sector 0: entry, and a boot-sector loader used only when a BIOS boots the image ----
    .pushsection .text.boot, "ax"
    .globl real16_start
real16_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    ljmp $0, $r16_cs_zero               # some BIOSes enter at 07C0:0000
r16_cs_zero:
    cmpl $0x4c45454b, r16_tail_magic    # "KEEL": is the whole image here (Keel loaded it)?
    je r16_main
    # A BIOS loaded only this sector: read the next 63 (INT 13h AH=42h, DL = boot drive).
    sti
    movb $0x42, %ah
    movw $r16_disk_packet, %si
    int $0x13
    cli
    jc r16_halt
    cmpl $0x4c45454b, r16_tail_magic
    jne r16_halt
    jmp r16_main

r16_disk_packet:                        # INT 13h extensions disk address packet
    .byte 16, 0
    .word 63                            # sectors
    .word 0x7e00, 0                     # offset, segment
    .quad 1                             # first LBA

    .org 510
    .byte 0x55, 0xaa
    .popsection

# ---- Main sequence ----
    .text
r16_main:
    call r16_serial_init
    call r16_install_ivt
    movw $r16_msg_hello, %si
    call r16_puts

    # CPUID leaf 0x40000000: the hypervisor signature in EBX:ECX:EDX.
    movl $0x40000000, %eax
    xorl %ecx, %ecx
    cpuid
    movl %ebx, r16_signature
    movl %ecx, r16_signature + 4
    movl %edx, r16_signature + 8
    movw $r16_msg_sig, %si
    call r16_puts
    movw $r16_signature, %si
    movw $12, %cx
    call r16_put_printable
    movl $1, %eax
    xorl %ecx, %ecx
    cpuid
    movl %ecx, %ebx
    movw $r16_msg_hv, %si
    call r16_puts
    movl %ebx, %eax
    shrl $31, %eax
    call r16_put_dec
    movw $r16_msg_vmx, %si
    call r16_puts
    movl %ebx, %eax
    shrl $5, %eax
    andl $1, %eax
    call r16_put_dec
    call r16_newline

    # Hypercall 3 (GUEST_ID).
    movl $3, %eax
    call r16_vmcall
    jc 1f
    pushl %eax
    movw $r16_msg_id, %si
    call r16_puts
    popl %eax
    call r16_put_dec
    call r16_newline
1:
    # Hypercall 1 (CONSOLE_WRITE): EBX = guest-physical address (DS = 0), ECX = length.
    movl $1, %eax
    movl $r16_msg_via, %ebx
    movl $(r16_msg_via_end - r16_msg_via), %ecx
    call r16_vmcall

    # An unknown hypercall must return ENOSYS (-38; EAX holds its low 32 bits).
    movl $0x7777, %eax
    call r16_vmcall
    jc 2f
    cmpl $0xffffffda, %eax
    jne 1f
    movw $r16_msg_enosys_ok, %si
    call r16_puts
    jmp 2f
1:
    pushl %eax
    movw $r16_msg_enosys_bad, %si
    call r16_puts
    popl %eax
    call r16_put_hex
    call r16_newline
2:
    # HLT woken by the timer: 8259A at vector 0x20, PIT channel 0 at 100 Hz, IRQ0 only.
    call r16_pic_init
    call r16_pit_init
    movb $0xfe, %al
    outb %al, $0x21
    movw r16_ticks, %dx
    sti
    hlt
    cli
    cmpw r16_ticks, %dx
    je 1f
    movw $r16_msg_hlt_ok, %si
    jmp 2f
1:
    movw $r16_msg_hlt_bad, %si
2:
    call r16_puts
    movb $0xff, %al                     # mask IRQ0 again
    outb %al, $0x21

    movw $r16_msg_done, %si
    call r16_puts
    movb $0x10, %al
r16_exit:                               # AL = exit code
    outb %al, $0xf4
r16_halt:
    cli
    hlt
    jmp r16_halt

# VMCALL with the registers as set; CF = 1 if it raised #UD (no hypervisor).
r16_vmcall:
    movb $0, r16_vmcall_ud
    vmcall
    cmpb $0, r16_vmcall_ud
    je 1f
    stc
    ret
1:
    clc
    ret

# ---- Interrupts: IVT entries 0-31 (exceptions), 0x20 (IRQ0), 0x27 (spurious IRQ7) ----
r16_install_ivt:
    xorw %di, %di
    movw $r16_exception_stubs, %ax
    movw $32, %cx
1:
    movw %ax, (%di)
    movw $0, 2(%di)
    addw $8, %ax
    addw $4, %di
    loop 1b
    movw $r16_invalid_opcode, 6 * 4
    movw $r16_timer, 0x20 * 4
    movw $0, 0x20 * 4 + 2
    movw $r16_spurious, 0x27 * 4
    movw $0, 0x27 * 4 + 2
    ret

r16_timer:
    pushw %ax
    incw r16_ticks
    movb $0x20, %al                     # non-specific EOI
    outb %al, $0x20
    popw %ax
r16_spurious:
    iret

# #UD: a VMCALL without hypervisor is skipped (3 bytes), anything else is a failure.
r16_invalid_opcode:
    pushal
    pushw %ds
    movw %sp, %bp                       # 0(%bp) = DS, 2..33 = PUSHAL, 34 = IP, 36 = CS
    movw 36(%bp), %ds
    movw 34(%bp), %si
    cmpb $0x0f, (%si)
    jne 1f
    cmpb $0x01, 1(%si)
    jne 1f
    cmpb $0xc1, 2(%si)
    jne 1f
    popw %ds
    addw $3, 34(%bp)
    movb $1, r16_vmcall_ud
    movw $r16_msg_vmcall_ud, %si
    call r16_puts
    popal
    iret
1:
    popw %ds
    popal
    jmp r16_exception_stubs + 6 * 8

    .balign 8
r16_exception_stubs:
    .set vec, 0
    .rept 32
    .balign 8
    pushw $vec
    jmp r16_exception
    .set vec, vec + 1
    .endr

# Stack: vector, IP, CS, FLAGS (real mode pushes no error codes).
r16_exception:
    movw %sp, %bp
    xorw %ax, %ax
    movw %ax, %ds
    movw $r16_msg_exception, %si
    call r16_puts
    movzwl (%bp), %eax
    call r16_put_dec
    movw $r16_msg_err_rip, %si
    call r16_puts
    movzwl 2(%bp), %eax
    call r16_put_hex
    call r16_newline
    movb $0x3f, %al
    jmp r16_exit

# ---- 8259A and 8254 ----
r16_pic_init:
    movb $0x11, %al                     # ICW1: edge, cascade, ICW4 follows
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x20, %al                     # ICW2: vector bases 0x20 and 0x28
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xa1
    movb $0x04, %al                     # ICW3: slave on IRQ2
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xa1
    movb $0x01, %al                     # ICW4: 8086 mode
    outb %al, $0x21
    outb %al, $0xa1
    movb $0xff, %al                     # everything masked
    outb %al, $0x21
    outb %al, $0xa1
    ret

r16_pit_init:
    movb $0x34, %al                     # channel 0, lobyte/hibyte, mode 2, binary
    outb %al, $0x43
    movw $11932, %ax                    # 1193182 Hz / 100
    outb %al, $0x40
    movb %ah, %al
    outb %al, $0x40
    ret

# ---- COM1 output ----
r16_serial_init:
    movw $0x3f9, %dx                    # IER: no interrupts
    xorb %al, %al
    outb %al, %dx
    movw $0x3fb, %dx                    # LCR: DLAB
    movb $0x80, %al
    outb %al, %dx
    movw $0x3f8, %dx                    # divisor 1: 115200 baud
    movb $1, %al
    outb %al, %dx
    movw $0x3f9, %dx
    xorb %al, %al
    outb %al, %dx
    movw $0x3fb, %dx                    # LCR: 8N1
    movb $0x03, %al
    outb %al, %dx
    movw $0x3fa, %dx                    # FCR: FIFOs on and cleared
    movb $0xc7, %al
    outb %al, %dx
    movw $0x3fc, %dx                    # MCR: DTR, RTS
    movb $0x03, %al
    outb %al, %dx
    ret

# AL = byte. Waits for LSR bit 5 (transmit holding register empty).
r16_putc:
    pushw %dx
    pushw %ax
    movw $0x3fd, %dx
1:
    inb %dx, %al
    testb $0x20, %al
    jz 1b
    popw %ax
    movw $0x3f8, %dx
    outb %al, %dx
    popw %dx
    ret

# DS:SI = NUL-terminated string.
r16_puts:
    pushw %ax
    pushw %si
1:
    lodsb
    testb %al, %al
    jz 2f
    call r16_putc
    jmp 1b
2:
    popw %si
    popw %ax
    ret

r16_newline:
    pushw %ax
    movb $10, %al
    call r16_putc
    popw %ax
    ret

# EAX in decimal.
r16_put_dec:
    pushal
    movl $10, %ebx
    xorw %cx, %cx
1:
    xorl %edx, %edx
    divl %ebx
    pushw %dx
    incw %cx
    testl %eax, %eax
    jnz 1b
2:
    popw %ax
    addb $0x30, %al
    call r16_putc
    loop 2b
    popal
    ret

# EAX as 0x and 8 hex digits.
r16_put_hex:
    pushal
    movl %eax, %edx
    movb $0x30, %al
    call r16_putc
    movb $0x78, %al
    call r16_putc
    movw $8, %cx
1:
    roll $4, %edx
    movb %dl, %al
    andb $0x0f, %al
    addb $0x30, %al
    cmpb $0x39, %al
    jbe 2f
    addb $(0x61 - 0x3a), %al
2:
    call r16_putc
    loop 1b
    popal
    ret

# DS:SI = bytes, CX = count; unprintable bytes as '.'.
r16_put_printable:
    pushal
1:
    lodsb
    cmpb $0x20, %al
    jb 2f
    cmpb $0x7e, %al
    jbe 3f
2:
    movb $0x2e, %al
3:
    call r16_putc
    loop 1b
    popal
    ret

# ---- Text ----
    .section .rodata.real16, "a"
r16_msg_hello:      .asciz "real16: hello from real mode\n"
r16_msg_sig:        .asciz "real16: cpuid sig="
r16_msg_hv:         .asciz " hv="
r16_msg_vmx:        .asciz " vmx="
r16_msg_id:         .asciz "real16: vmcall id="
r16_msg_via:        .ascii "real16: via hypercall\n"
r16_msg_via_end:
r16_msg_enosys_ok:  .asciz "real16: enosys ok\n"
r16_msg_enosys_bad: .asciz "real16: enosys BAD "
r16_msg_vmcall_ud:  .asciz "real16: vmcall #UD\n"
r16_msg_hlt_ok:     .asciz "real16: hlt ok\n"
r16_msg_hlt_bad:    .asciz "real16: hlt BAD\n"
r16_msg_done:       .asciz "real16: done\n"
r16_msg_exception:  .asciz "real16: exception vec="
r16_msg_err_rip:    .asciz " err=0x0 rip="

# ---- Variables (in the image: a flat binary has no bss) ----
    .section .data.real16, "aw"
r16_signature:      .space 12
r16_ticks:          .word 0
r16_vmcall_ud:      .byte 0

    .section .tail, "a"
r16_tail_magic:     .long 0x4c45454b

    .text
    .code64
