#!/usr/bin/env bash
# THE run command: installs what is missing, builds Keel and the demo guests, and boots them in the
# best emulator of this host (QEMU with KVM on an Intel host with nested VT-x, otherwise Bochs).
# Arguments go to `cargo keel run`, e.g. --uefi, --emulator qemu, --timeout 0 (see docs/BOOTING.md).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
exec cargo keel run "$@"
