#!/usr/bin/env bash
# THE run command: installs what is missing, builds Keel and the demo guests, and boots them in the
# best emulator of this host (QEMU with KVM on an Intel host with nested VT-x, otherwise Bochs).
# Arguments go to `cargo keel run`, e.g. --uefi, --emulator qemu, --timeout 0 (see docs/BOOTING.md).
# Exits 0 when Keel completed (status 1), otherwise with the status of `cargo keel run`.
#
# When the host's apt can fetch Debian's cloud kernel and busybox-static (cached under
# target/keel-tests/debian), the demo gains a Linux guest (a shell on its console when you run this
# in a terminal; otherwise it prints its release and powers off). When it cannot, the demo says why
# and runs without it. KEEL_DEMO_LINUX=0 leaves Linux out.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/setup.sh"
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
linux_args=()
if [ "${KEEL_DEMO_LINUX:-1}" != 0 ]; then
    interactive=()
    if [ -t 0 ]; then
        interactive=(--interactive)
    fi
    if out=$(cargo run -q -p keel-tests --bin keel-linux-demo -- "${interactive[@]}" 2>/tmp/keel-demo-linux.$$); then
        manifest=$(sed -n 1p <<<"$out")
        files=$(sed -n 2p <<<"$out")
        echo "run-demo: with a Linux guest (Debian's kernel, $files); Ctrl-A n moves the keyboard between guests"
        linux_args=(--manifest "$manifest" --files "$files" --memory 512)
    else
        echo "run-demo: no Linux guest: Debian's kernel and busybox could not be fetched:" >&2
        sed 's/^/run-demo:   /' /tmp/keel-demo-linux.$$ >&2
    fi
    rm -f /tmp/keel-demo-linux.$$
fi
# `cargo keel run` exits 0 when every guest ran to its end (Keel's status 1), otherwise with
# Keel's status (docs/BOOTING.md).
exec cargo keel run "${linux_args[@]}" "$@"
