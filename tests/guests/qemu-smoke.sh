#!/usr/bin/env bash
# Quick check of the guests without Keel: boots mb32.elf with QEMU's multiboot loader (-kernel)
# and real16.bin as a BIOS disk (its first sector loads the rest), and checks their output. QEMU
# TCG has no VMX and no Keel, so CPUID shows no Keel signature and every VMCALL raises #UD: the
# guests print "vmcall #UD" and carry on. pm32 and long64 need Keel's ELF loader: not run here.
# Usage: qemu-smoke.sh OUTDIR (as filled by build.sh).
set -euo pipefail

die() {
    echo "qemu-smoke.sh: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || die "usage: qemu-smoke.sh OUTDIR"
out=$1
command -v qemu-system-x86_64 >/dev/null || die "missing tool: qemu-system-x86_64 (apt-get install qemu-system-x86)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# run NAME EXPECTED_STATUS QEMU_ARGS...: runs QEMU, checks the status and the standard lines.
run() {
    local name=$1 want=$2 status=0
    shift 2
    timeout 60 qemu-system-x86_64 -display none -serial "file:$work/$name.log" -no-reboot \
        -device isa-debug-exit,iobase=0xf4,iosize=4 "$@" || status=$?
    local expect=("hello from" "cpuid sig=" "vmcall #UD" "hlt ok" "done")
    for line in "${expect[@]}"; do
        grep -q "^$name: $line" "$work/$name.log" || {
            cat "$work/$name.log" >&2
            die "$name: no line '$name: $line'"
        }
    done
    [[ $status -eq $want ]] || {
        cat "$work/$name.log" >&2
        die "$name: QEMU exit status $status, expected $want"
    }
    echo "$name: ok"
}

printf 'module one' >"$work/one"
run mb32 $(((0x12 << 1) | 1)) -kernel "$out/mb32.elf" -append "hi" -initrd "$work/one"
grep -q "^mb32: cmdline=.* hi$" "$work/mb32.log" || die "mb32: command line not printed"
grep -q "^mb32: module $work/one size=10$" "$work/mb32.log" || die "mb32: module not listed"

cp "$out/real16.bin" "$work/real16.img"
truncate -s 32768 "$work/real16.img"
run real16 $(((0x10 << 1) | 1)) -drive "format=raw,file=$work/real16.img"
