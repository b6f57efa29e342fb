#!/usr/bin/env bash
# Builds the Keel test guests into OUTDIR:
#   real16.bin  flat 16-bit real-mode binary (load and enter at 0x7c00)
#   pm32.elf    ELF32, entered in protected mode
#   mb32.elf    ELF32 multiboot 1 kernel (QEMU -kernel boots it too)
#   qk32.elf    ELF32 multiboot 1 kernel written for QEMU -kernel (tests/tests/qemu_kernels.rs)
#   long64.elf  ELF64, entered in long mode
# Quiet on success; on failure says what is missing or which build failed. See README.md.
set -euo pipefail

die() {
    echo "tests/guests/build.sh: $*" >&2
    exit 1
}

[[ $# -eq 1 ]] || die "usage: build.sh OUTDIR"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1" || die "cannot create output directory $1"
out=$(cd "$1" && pwd)
cd "$here"

# The toolchain comes from the repository's rust-toolchain.toml (found from this directory).
# Settings meant for the caller's own cargo build must not leak into the guests'.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR

command -v cargo >/dev/null || die "missing tool: cargo (install rustup, then the toolchain in rust-toolchain.toml)"
command -v rustc >/dev/null || die "missing tool: rustc"
sysroot=$(rustc --print sysroot) || die "rustc does not run (is the pinned toolchain installed? scripts/setup.sh)"
host=$(rustc -vV | sed -n 's/^host: //p')
objcopy=$sysroot/lib/rustlib/$host/bin/llvm-objcopy
[[ -x $objcopy ]] || die "missing tool: $objcopy (rustup component add llvm-tools-preview)"
[[ -d $sysroot/lib/rustlib/src/rust/library/core ]] ||
    die "missing rust-src: needed to build core for the 32-bit guests (rustup component add rust-src)"
[[ -d $sysroot/lib/rustlib/x86_64-unknown-none ]] ||
    die "missing target x86_64-unknown-none (rustup target add x86_64-unknown-none)"

target_dir=$here/target
cargo build --quiet --release --target-dir "$target_dir" --target x86_64-unknown-none \
    -p long64 -p real16 || die "building long64/real16 failed"
cargo build --quiet --release --target-dir "$target_dir" --target "$here/i686-keel.json" \
    -Zjson-target-spec -Zbuild-std=core -Zbuild-std-features=compiler-builtins-mem \
    -p pm32 -p mb32 -p qk32 || die "building pm32/mb32/qk32 failed"

cp "$target_dir/x86_64-unknown-none/release/long64" "$out/long64.elf"
cp "$target_dir/i686-keel/release/pm32" "$out/pm32.elf"
cp "$target_dir/i686-keel/release/mb32" "$out/mb32.elf"
cp "$target_dir/i686-keel/release/qk32" "$out/qk32.elf"
"$objcopy" -O binary "$target_dir/x86_64-unknown-none/release/real16" "$out/real16.bin" ||
    die "llvm-objcopy failed on real16"

# real16's boot sector reads at most 63 more sectors when a BIOS boots it (qemu-smoke.sh).
size=$(stat -c %s "$out/real16.bin")
((size <= 64 * 512)) || die "real16.bin is $size bytes, more than the 32 KiB its boot sector loads"

# The hostile guests, their witness and the fuzzer (hostile64/, fuzz/; README.md "Hostile guests").
cargo build --quiet --release --target-dir "$target_dir" --target x86_64-unknown-none \
    -p hostile64 -p fuzz64 || die "building hostile64/fuzz64 failed"
for g in hostile64 witness64 fuzz64; do cp "$target_dir/x86_64-unknown-none/release/$g" "$out/$g.elf"; done
bash "$here/bench64/build.sh" "$out" "$target_dir" "$objcopy" || die "building bench64 failed"
cargo build --quiet --release --target-dir "$target_dir" --target "$here/i686-keel.json" \
    -Zjson-target-spec -Zbuild-std=core -Zbuild-std-features=compiler-builtins-mem \
    -p fuzz32 || die "building fuzz32 failed"
cp "$target_dir/i686-keel/release/fuzz32" "$out/fuzz32.elf"
# platform32: reads the PC platform as a kernel written for QEMU's -kernel does (README.md).
cargo build --quiet --release --target-dir "$target_dir" --target "$here/i686-keel.json" \
    -Zjson-target-spec -Zbuild-std=core -Zbuild-std-features=compiler-builtins-mem \
    -p platform32 || die "building platform32 failed"
cp "$target_dir/i686-keel/release/platform32" "$out/platform32.elf"
# smp32: several vCPUs that start each other, count together and send each other IPIs.
cargo build --quiet --release --target-dir "$target_dir" --target "$here/i686-keel.json" \
    -Zjson-target-spec -Zbuild-std=core -Zbuild-std-features=compiler-builtins-mem \
    -p smp32 || die "building smp32 failed"
cp "$target_dir/i686-keel/release/smp32" "$out/smp32.elf"
