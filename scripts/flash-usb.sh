#!/usr/bin/env bash
# Writes a Keel disk image to a USB stick.
#
#   scripts/flash-usb.sh IMAGE DEVICE [--force] [--yes]
#
# IMAGE is target/keel/<profile>/keel-uefi.img (or keel-bios.img for legacy BIOS machines) made by
# `cargo keel image`. DEVICE is the whole stick, e.g. /dev/sdb (see `lsblk`). The checks and the
# write are done by `keel-boot flash`: it refuses a DEVICE that is not a block device, is a
# partition, has anything mounted or swapped on, or is not marked removable (unless --force), and
# asks for confirmation (unless --yes). Writing uses `dd conv=fsync` (through sudo if needed).
#
# KEEL_BOOT may name a built keel-boot binary; otherwise it is run through cargo.
set -euo pipefail

usage() {
    echo "usage: $0 IMAGE DEVICE [--force] [--yes]" >&2
    exit 2
}

[ $# -ge 2 ] || usage
image=$1
device=$2
shift 2
for arg in "$@"; do
    case $arg in
        --force | --yes) ;;
        *) echo "$0: unknown option $arg" >&2; usage ;;
    esac
done
[ -f "$image" ] || { echo "$0: image $image does not exist (build it with: cargo keel image)" >&2; exit 1; }

if [ -n "${KEEL_BOOT:-}" ]; then
    exec "$KEEL_BOOT" flash "$device" --image "$image" "$@"
fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
exec cargo run -q -p keel-boot -- flash "$device" --image "$image" "$@"
