#!/usr/bin/env python3
"""A newc cpio (the initramfs format) with busybox as /bin/busybox and /bin/sh, /init, and the
directories and device nodes /init needs.

usage: mkinitramfs.py busybox init out.cpio
"""
import sys, os
busybox, init_path, out = sys.argv[1:4]
entries = []
ino = [1]
def add(name, mode, data=b"", rdev=(0,0)):
    entries.append((name, mode, data, rdev))
add(".", 0o040755)
for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "etc"]:
    add(d, 0o040755)
add("dev/console", 0o020600, rdev=(5,1))
add("dev/ttyS0", 0o020600, rdev=(4,64))
add("bin/busybox", 0o100755, open(busybox,"rb").read())
add("bin/sh", 0o120777, b"busybox")
add("init", 0o100755, open(init_path,"rb").read())
buf = bytearray()
def hdr(name, mode, size, rdev, nlink=1):
    n = name.encode() + b"\0"
    h = "070701" + "".join("%08X" % v for v in [ino[0], mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(n), 0])
    ino[0] += 1
    b = h.encode() + n
    b += b"\0" * ((4 - len(b) % 4) % 4)
    return b
for name, mode, data, rdev in entries:
    buf += hdr(name, mode, len(data), rdev, 2 if mode & 0o040000 else 1)
    buf += data
    buf += b"\0" * ((4 - len(data) % 4) % 4)
buf += hdr("TRAILER!!!", 0, 0, (0,0))
buf += b"\0" * ((512 - len(buf) % 512) % 512)
open(out, "wb").write(buf)
