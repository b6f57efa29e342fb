#!/usr/bin/env bash
# Builds the benchmark guest into OUTDIR (called by ../build.sh, which has set up the toolchain):
#   bench64.elf       the ELF64 guest Keel runs (tests/guests/manifests/bench.toml)
#   bench64-bare.img  a BIOS disk: bench64-boot's boot sector, then bench64 as a flat binary,
#                     padded to two 16-head, 63-sector cylinders (Bochs takes the geometry of a
#                     flat disk from its size)
# Usage: bench64/build.sh OUTDIR TARGET_DIR OBJCOPY
set -euo pipefail

die() {
    echo "tests/guests/bench64/build.sh: $*" >&2
    exit 1
}

[[ $# -eq 3 ]] || die "usage: build.sh OUTDIR TARGET_DIR OBJCOPY"
out=$1 target_dir=$2 objcopy=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

cargo build --quiet --release --target-dir "$target_dir" --target x86_64-unknown-none \
    -p bench64 || die "building bench64 failed"
bin=$target_dir/x86_64-unknown-none/release
cp "$bin/bench64" "$out/bench64.elf"

# bench64-boot jumps to 2 MiB: the ELF must start there (common/guest.ld puts _start first).
entry=$(od -An -t x8 -j 24 -N 8 "$bin/bench64" | tr -d ' ')
[[ $entry == 0000000000200000 ]] || die "bench64's entry is 0x$entry, not 0x200000"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$objcopy" -O binary "$bin/bench64-boot" "$tmp/boot.bin" || die "llvm-objcopy failed on bench64-boot"
"$objcopy" -O binary "$bin/bench64" "$tmp/kernel.bin" || die "llvm-objcopy failed on bench64"
[[ $(stat -c %s "$tmp/boot.bin") -eq 512 ]] || die "the boot sector is not 512 bytes"
# The boot sector reads 256 sectors (src/boot.s, BB_SECTORS).
size=$(stat -c %s "$tmp/kernel.bin")
((size <= 256 * 512)) || die "bench64 is $size bytes as a flat binary, more than the 128 KiB bench64-boot reads"
cat "$tmp/boot.bin" "$tmp/kernel.bin" >"$tmp/bare.img"
truncate -s $((2 * 16 * 63 * 512)) "$tmp/bare.img"
mv "$tmp/bare.img" "$out/bench64-bare.img"
