#!/usr/bin/env bash
# THE test command: installs what is missing, then checks formatting, lints, runs the unit tests,
# builds the guests and the disk images, and boots Keel in Bochs and QEMU (the integration
# tests). Prints the wall time of each stage and a summary; exits 1 if any stage failed.
#
# Every stage runs even when an earlier one failed (except setup), so one run shows everything
# that is wrong.
#
#   scripts/test.sh          # the suite once, with APIC virtualization where the CPU has it
#   scripts/test.sh --long   # and the emulator tests a second time with it off (KEEL_TEST_APICV=off)
#   scripts/test.sh --long-budget MIN
#                            # that second pass only if the whole run is expected to end within MIN
#                            # minutes of its start (the pass is expected to take as long as the
#                            # first emulator stage did); CI runs this way
set -uo pipefail

long=0
budget=
while [ $# -gt 0 ]; do
    case "$1" in
        --long) long=1 ;;
        --long-budget)
            if [ $# -lt 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
                echo "test: --long-budget takes a whole number of minutes" >&2
                exit 2
            fi
            budget=$2
            shift
            ;;
        -h | --help)
            sed -n '2,14p' "$0"
            exit 0
            ;;
        *)
            echo "test: unknown argument '$1' (only --long, --long-budget MIN)" >&2
            exit 2
            ;;
    esac
    shift
done
run_start=$(date +%s)

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! "$root/scripts/setup.sh"; then
    echo "test: setup failed; nothing was tested" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

summary=()
failed=0

# stage NAME COMMAND...: runs COMMAND, times it, records the result.
stage() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local start end status
    start=$(date +%s.%N)
    "$@"
    status=$?
    end=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    if [ $status -eq 0 ]; then
        summary+=("$(printf '%-12s ok     %7s s' "$name" "$secs")")
    else
        summary+=("$(printf '%-12s FAILED %7s s  (exit %d)' "$name" "$secs" "$status")")
        failed=1
    fi
    echo "=== $name: $([ $status -eq 0 ] && echo ok || echo FAILED) in $secs s"
}

guests_and_images() {
    local manifest=tests/guests/manifests/demo.toml
    if [ ! -f tests/guests/build.sh ] || [ ! -f "$manifest" ]; then
        echo "tests/guests/build.sh or $manifest is not in this checkout yet: building the kernel image without guests"
        local empty
        empty=$(mktemp)
        printf '[keel]\n' >"$empty"
        cargo keel image --quiet --manifest "$empty"
        local status=$?
        rm -f "$empty"
        return $status
    fi
    cargo keel image --quiet --manifest "$manifest"
}

stage fmt cargo fmt --all --check
# Host crates (the kernel binary compiles to a stub on the host), the emulator tests included.
# Correctness and suspicious lints
# fail the stage; the rest are shown as warnings.
stage clippy cargo clippy --workspace --all-targets --features keel-tests/emulators -- -D clippy::correctness -D clippy::suspicious
stage unit cargo test --workspace
stage images guests_and_images
# Boot summaries (times to the first serial line) come out through --nocapture.
emulators_start=$(date +%s)
stage emulators cargo itest -- --nocapture
if [ -n "$budget" ] && [ $long -eq 0 ]; then
    now=$(date +%s)
    expected=$((now - run_start + now - emulators_start))
    if [ $expected -le $((budget * 60)) ]; then
        echo
        echo "=== apicv-off: the run so far took $(((now - run_start) / 60)) min; with the pass it is expected to end at $((expected / 60)) min, within the budget of $budget min"
        long=1
    else
        echo
        echo "=== apicv-off: NOT RUN: the run so far took $(((now - run_start) / 60)) min; with the pass it would end near $((expected / 60)) min, over the budget of $budget min"
        summary+=("$(printf '%-12s not run (over the %s min budget)' apicv-off "$budget")")
    fi
fi
if [ $long -eq 1 ]; then
    # Every boot again with `[keel] apicv = "off"` in its manifest: the emulated LAPIC path.
    stage apicv-off env KEEL_TEST_APICV=off cargo itest -- --nocapture
fi

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $failed
