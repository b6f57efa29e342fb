#!/usr/bin/env bash
# Installs what building and testing Keel needs, and nothing when it is all there already:
#   - Debian/Ubuntu packages: the emulators (Bochs with its X display and BIOS, QEMU, OVMF, Xvfb)
#     a C linker for the host crates, and gcc and binutils for docs/GUESTS.md's walk-through;
#   - the Rust toolchain pinned in rust-toolchain.toml, with rust-src, llvm-tools-preview, clippy,
#     rustfmt and the x86_64-unknown-none target (rustup itself from sh.rustup.rs if absent).
# When it cannot install something (no apt, no root and no sudo, no network) it prints exactly
# what is missing and exits 1.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# Program or file to look for, and the Debian package that provides it.
checks=(
    "bochs:bochs"
    "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_x_gui.so:bochs-x"
    "/usr/share/bochs/BIOS-bochs-latest:bochsbios"
    "/usr/share/vgabios/vgabios.bin:vgabios"
    "qemu-system-x86_64:qemu-system-x86"
    "/usr/share/ovmf/OVMF.fd:ovmf"
    "xvfb-run:xvfb"
    "xauth:xauth"
    "cc:gcc"
    "as:binutils"
    "/usr/include/stdio.h:libc6-dev"
    "curl:curl"
    "/etc/ssl/certs/ca-certificates.crt:ca-certificates"
)

say() { echo "setup: $*" >&2; }

have() {
    case $1 in
        /*) [ -e "$1" ] ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

missing_packages=()
for check in "${checks[@]}"; do
    what=${check%%:*}
    package=${check##*:}
    if ! have "$what"; then
        say "missing $what (package $package)"
        missing_packages+=("$package")
    fi
done

if [ ${#missing_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        sudo=(false)
    fi
    if ! command -v apt-get >/dev/null 2>&1 || [ "${sudo[0]:-}" = false ]; then
        say "cannot install packages here (needs apt-get, and root or sudo). Install these yourself:"
        say "    ${missing_packages[*]}"
        exit 1
    fi
    say "installing: ${missing_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get update -q ||
        ! "${sudo[@]}" apt-get install -y -q "${missing_packages[@]}"; then
        say "apt-get failed; still missing: ${missing_packages[*]}"
        exit 1
    fi
fi

# The toolchain named in rust-toolchain.toml. RUSTUP_AUTO_INSTALL may be 0, so install it here.
channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$root/rust-toolchain.toml")
if [ -z "$channel" ]; then
    say "no channel in $root/rust-toolchain.toml"
    exit 1
fi
if ! command -v rustup >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/rustup" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
    say "installing rustup from https://sh.rustup.rs"
    if ! curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --default-toolchain none --no-modify-path; then
        say "could not install rustup; install it from https://rustup.rs and rerun"
        exit 1
    fi
    export PATH="$HOME/.cargo/bin:$PATH"
fi

components=(rust-src llvm-tools clippy rustfmt)
toolchain_complete() {
    local installed
    installed=$(rustup component list --installed --toolchain "$channel" 2>/dev/null) || return 1
    for c in "${components[@]}"; do
        grep -q "^$c" <<<"$installed" || return 1
    done
    rustup target list --installed --toolchain "$channel" 2>/dev/null | grep -qx x86_64-unknown-none
}
if ! toolchain_complete; then
    say "installing Rust $channel"
    # --no-self-update: rustup once downgraded itself here without it.
    if ! rustup toolchain install "$channel" --profile minimal \
        -c rust-src,llvm-tools-preview,clippy,rustfmt -t x86_64-unknown-none --no-self-update; then
        say "could not install Rust $channel with rust-src, llvm-tools-preview, clippy, rustfmt and x86_64-unknown-none"
        exit 1
    fi
fi
say "ok: emulators, linker and Rust $channel are installed"
