# bench64-boot: a BIOS boot sector that runs bench64 with no hypervisor, in the machine state
# Keel's ELF64 loader gives a guest (docs/GUESTS.md), so the benchmark loop is the same code at
# the same addresses in both runs:
#   - reads sectors 1..=BB_SECTORS (the flat bench64 image, linked at 2 MiB) to 0x10000 with
#     INT 13h AH=42h, BB_CHUNK sectors at a time;
#   - writes a PML4 at 0x1000, a PDPT at 0x2000 and four page directories at 0x3000-0x6fff
#     mapping 0-4 GiB in 2 MiB pages (the LAPIC/IOAPIC page uncached), the command line
#     "mode=bare" at 0x7000, and loads a GDT with Keel's selectors (0x08 code32, 0x10 data,
#     0x18 code64). (Keel's loader uses 0x3000-0x8fff for its tables; here 0x7c00 holds this
#     sector, so everything sits lower.)
#   - goes from real mode straight to long mode (CR4.PAE, CR3, EFER.LME, then CR0.PE|PG together:
#     SDM Vol. 3A 10.8.5), zeroes 2-4 MiB (bench64's bss), copies the image to 2 MiB and jumps
#     to it with RDI = 0x7000 (command line) and RSI = 0 (RAM size: not known here).
# Disk errors print "bench64-boot: disk error" on port 0xE9 and halt.

    .set BB_CHUNK, 64                   # sectors per INT 13h call (32 KiB)
    .set BB_CHUNKS, 4
    .set BB_SECTORS, BB_CHUNK * BB_CHUNKS
    .set BB_BUFFER_SEG, 0x1000          # 0x10000
    .set BB_KERNEL, 0x200000
    .set BB_PML4, 0x1000
    .set BB_PDPT, 0x2000
    .set BB_PD, 0x3000                  # four of them
    .set BB_CMDLINE, 0x7000

    .code16
    .pushsection .text.boot, "ax"
    .globl bench_boot_start
bench_boot_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    ljmp $0, $bb_cs_zero                # some BIOSes enter at 07C0:0000
bb_cs_zero:
    movb %dl, bb_drive
    sti
    movw $BB_CHUNKS, %cx
bb_read:
    pushw %cx
    movb bb_drive, %dl
    movb $0x42, %ah
    movw $bb_packet, %si
    int $0x13
    popw %cx
    jc bb_disk_error
    addw $(BB_CHUNK * 512 / 16), bb_packet + 6
    addl $BB_CHUNK, bb_packet + 8
    loop bb_read
    cli

    inb $0x92, %al                      # A20 on (fast A20 gate)
    orb $2, %al
    andb $0xfe, %al
    outb %al, $0x92

    movw $BB_PML4, %di                  # clear the six tables
    movw $(0x6000 / 4), %cx
    xorl %eax, %eax
    rep stosl
    movl $(BB_PDPT + 3), BB_PML4        # PML4[0] -> PDPT (present, writable)
    movw $BB_PDPT, %di
    movl $(BB_PD + 3), %eax
    movw $4, %cx
bb_pdpt:
    movl %eax, (%di)                    # PDPT[i] -> page directory i
    addl $0x1000, %eax
    addw $8, %di
    loop bb_pdpt
    movw $BB_PD, %di
    movl $0x83, %eax                    # present, writable, 2 MiB page, from address 0
    movw $2048, %cx
bb_pd:
    movl %eax, (%di)
    addl $0x200000, %eax
    addw $8, %di
    loop bb_pd
    orl $0x18, BB_PD + 8 * 2038         # PCD|PWT on the IOAPIC and LAPIC page (0xfec00000
    orl $0x18, BB_PD + 8 * 2039         # and 0xfee00000, 2 MiB pages 2038 and 2039)

    movw $bb_cmdline, %si               # the command line
    movw $BB_CMDLINE, %di
    movw $(bb_cmdline_end - bb_cmdline), %cx
    rep movsb

    lgdtl bb_gdtr
    movl %cr4, %eax
    orl $0x20, %eax                     # PAE
    movl %eax, %cr4
    movl $BB_PML4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              # EFER.LME
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax               # PG | PE: IA-32e mode, compatibility submode
    movl %eax, %cr0
    ljmp $0x18, $bb_long

bb_disk_error:
    movw $bb_error_msg, %si
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, $0xe9
    jmp 1b
2:  cli
    hlt
    jmp 2b

    .code64
bb_long:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $BB_KERNEL, %edi               # zero 2-4 MiB: the kernel's bss must start out zero
    movl $(0x200000 / 8), %ecx
    xorl %eax, %eax
    rep stosq
    movl $(BB_BUFFER_SEG * 16), %esi    # the image, then the disk's zero padding behind it
    movl $BB_KERNEL, %edi
    movl $(BB_SECTORS * 512 / 8), %ecx
    rep movsq
    movl $BB_CMDLINE, %edi
    xorl %esi, %esi
    movl $0x1ff000, %esp
    movl $BB_KERNEL, %eax
    jmp *%rax

bb_packet:                              # INT 13h extensions disk address packet
    .byte 16, 0
    .word BB_CHUNK                      # sectors
    .word 0, BB_BUFFER_SEG              # offset, segment
    .quad 1                             # first LBA
bb_drive:
    .byte 0
    .balign 8
bb_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            # 0x08: code32
    .quad 0x00cf92000000ffff            # 0x10: data
    .quad 0x00af9a000000ffff            # 0x18: code64
bb_gdtr:
    .word 31
    .long bb_gdt
bb_cmdline:
    .asciz "mode=bare"
bb_cmdline_end:
bb_error_msg:
    .asciz "bench64-boot: disk error\n"

    .org 510
    .byte 0x55, 0xaa
    .popsection
