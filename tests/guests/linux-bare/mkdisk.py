#!/usr/bin/env python3
"""Writes a Bochs disk that boots a bzImage bare (no Keel): boot.bin (4 sectors, from boot.S),
the kernel from LBA 4, the initrd after it, each padded to 512 bytes, the whole padded to whole
cylinders of Bochs' flat-image geometry (16 heads, 63 sectors). The command line (at most 95
bytes) and the kernel/initrd positions are patched into boot.bin at 0x780 and 0x7e0.

usage: mkdisk.py boot.bin bzImage initrd "command line" out.img
"""
import struct
import sys

boot_path, kernel_path, initrd_path, cmdline, out = sys.argv[1:6]
boot = bytearray(open(boot_path, "rb").read())
assert len(boot) == 2048, "boot.bin is 4 sectors"
kernel = open(kernel_path, "rb").read()
initrd = open(initrd_path, "rb").read()
pad = lambda b, n: b + b"\0" * ((-len(b)) % n)
kernel_padded, initrd_padded = pad(kernel, 512), pad(initrd, 512)
kernel_lba = 4
initrd_lba = kernel_lba + len(kernel_padded) // 512
cmd = cmdline.encode()
assert len(cmd) < 96, "command line too long for boot.bin"
boot[0x780:0x780 + len(cmd)] = cmd
struct.pack_into("<5I", boot, 0x7e0, kernel_lba, len(kernel_padded) // 512, initrd_lba,
                 len(initrd_padded) // 512, len(initrd))
open(out, "wb").write(pad(bytes(boot) + kernel_padded + initrd_padded, 16 * 63 * 512))
