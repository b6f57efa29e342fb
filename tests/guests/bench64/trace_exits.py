#!/usr/bin/env python3
"""Counts the instructions Keel runs for each operation bench64 times (docs/BENCHMARKS.md).

Bochs' TSC advances one tick per instruction, so a benchmark figure is an instruction count.
This script shows where those instructions are: it boots the disk of the last `cargo keel
bench` run again under Bochs' debugger, stops at the timed instruction of each operation in
bench64's measured loop (the third time it gets there), traces every instruction until the
guest's next one, and attributes Keel's instructions to source files and functions with
addr2line (the release kernel keeps its debug information).

    cargo keel bench                          # builds everything and leaves the run files
    tests/guests/bench64/trace_exits.py       # then this (about 5 s)
    tests/guests/bench64/trace_exits.py --ops cpuid,out --raw   # also print the traces

Needs bochs, xvfb-run, objdump, nm and addr2line (binutils). The operations are found by their
shape in bench64's disassembly (RDTSC, the operation, RDTSC); a change to the guest that breaks
that is reported, not guessed around.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
# `cargo keel bench` leaves the Keel run's disk, bochsrc and unstripped kernel (keel.elf) here, and
# the guests it built (bench64.elf) in ../guests: always the files of that one run.
RUN_DIR = os.path.join(ROOT, "target/keel/release/bench/keel")
# Execution order in bench64 (the ping-pong first, then `suite`).
OPS = ["yield", "cpuid", "vmcall", "out", "in", "rdmsr", "wrmsr", "mmio-read", "mmio-write",
       "cr8-read", "cr8-write", "eoi", "deadline", "hlt", "irq", "ipi", "apic-read", "x2apic-read",
       "x2apic-tpr", "x2apic-eoi"]
# bench64's x2APIC rows by their MSR (ECX, set just before the first RDTSC).
X2APIC_OPS = {0x832: "x2apic-read", 0x808: "x2apic-tpr", 0x80b: "x2apic-eoi"}
# Instructions that are one Bochs tick but cost far more on silicon.
SPECIAL = {"vmread", "vmwrite", "vmresume", "vmlaunch", "vmptrld", "rdtsc", "rdmsr", "wrmsr",
           "xsave", "xrstor", "xsetbv", "in", "out", "hlt", "invept", "invvpid"}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def disassemble(elf):
    """[(address, mnemonic, operands)] of the guest's code."""
    out = []
    for line in run(["objdump", "-d", "-M", "intel", "--no-show-raw-insn", elf]).splitlines():
        m = re.match(r"\s+([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    return out


def symbol(elf, name):
    for line in run(["nm", elf]).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    sys.exit(f"trace_exits: no symbol {name} in {elf}")


def find_ops(code, guest_elf):
    """{op: (address of the timed instruction, address of the guest's next instruction)}: the
    last match of each shape, which is the measured loop (the warm-up loop comes first)."""
    found = {}
    stores = 0  # LAPIC stores by MMIO so far: `mmio-write`'s two loops, then `eoi`'s
    for i, (addr, mnem, ops) in enumerate(code):
        if mnem != "rdtsc":
            continue
        # rdtsc; mov t0, eax; [setup]; OP; rdtsc
        window = code[i + 1:i + 6]
        ends = [k for k, (_, m, _) in enumerate(window) if m == "rdtsc"]
        if not ends or ends[0] < 2:
            continue
        op_addr, op_mnem, op_ops = window[ends[0] - 1]
        setup = [f"{m} {o}" for (_, m, o) in window[1:ends[0] - 1]]
        next_addr = window[ends[0]][0]
        name = None
        if op_mnem == "cpuid":
            name = "cpuid"
        elif op_mnem == "vmcall":
            name = {"mov eax,0x2": "yield", "mov eax,0x3": "vmcall"}.get(setup[-1] if setup else "")
        elif op_mnem in ("out", "in"):
            name = op_mnem
        elif op_mnem in ("rdmsr", "wrmsr"):
            # bench64's x2APIC rows (ECX 0x800-0x8FF, set just before the first RDTSC) have the
            # same shape, told apart by the MSR; with APIC virtualization they do not even exit
            # (`--run-dir` of the run without it traces their exits).
            ecx = code[i - 1][2] if code[i - 1][1] == "mov" else ""
            m = re.match(r"ecx,0x([0-9a-f]+)$", ecx)
            msr = int(m.group(1), 16) if m else None
            if msr == 0x6e0:
                name = "deadline"
            elif msr is not None and 0x800 <= msr < 0x900:
                name = X2APIC_OPS.get(msr)
            else:
                name = op_mnem
        elif op_mnem == "mov" and re.match(r"\w+,cr8$", op_ops):
            name = "cr8-read"
        elif op_mnem == "mov" and re.match(r"cr8,\w+$", op_ops):
            name = "cr8-write"
        elif op_mnem == "mov" and re.match(r"\w+,DWORD PTR \[\w+\]$", op_ops):
            # The TPR (`mmio-read`) or, in the x2APIC part, the LVT timer (`apic-read`): the
            # address is loaded just before the first RDTSC.
            lvt = code[i - 1][1] == "mov" and code[i - 1][2].endswith(",0xfee00320")
            name = "apic-read" if lvt else "mmio-read"
        elif op_mnem == "mov" and re.match(r"DWORD PTR \[\w+\],\w+$", op_ops):
            # The TPR (`mmio-write`) then the EOI register (`eoi`), each a warm-up loop and a
            # timed one, in that order.
            name = "mmio-write" if stores < 2 else "eoi"
            stores += 1
        if name:
            found[name] = (op_addr, next_addr)
    # ipi: sti; rdtsc; mov t0, eax; mov [icr], v -> the handler's RDTSC
    # hlt: sti; hlt in the HLT loop -> the timer handler's RDTSC
    for i, (addr, mnem, ops) in enumerate(code[:-3]):
        if mnem != "sti":
            continue
        if code[i + 1][1] == "rdtsc" and code[i + 3][1] == "mov" and "DWORD PTR [" in code[i + 3][2]:
            found["ipi"] = (code[i + 3][0], symbol(guest_elf, "bench_ipi_entry") + 2)
        if code[i + 1][1] == "hlt":
            found["hlt"] = (code[i + 1][0], symbol(guest_elf, "bench_timer_entry") + 2)
        # irq: wrmsr (the deadline); sti; mov; test; jne; pause (the spin) -> the timer handler's
        # RDTSC: from the WRMSR, so the trace holds its exit, the spin (guest instructions) and
        # Keel's whole path from the timer's exit to the handler.
        if code[i - 1][1] == "wrmsr" and code[i + 4][1] == "pause":
            found["irq"] = (code[i - 1][0], symbol(guest_elf, "bench_timer_entry") + 2)
    return found


def bochs_trace(run_dir, targets, hit):
    """Boots run_dir's disk under Bochs' debugger; returns {op: [(tick, rip, text)]}."""
    work = tempfile.mkdtemp(prefix="keel-trace-")
    try:
        shutil.copy(os.path.join(run_dir, "disk.img"), work)
        rc = open(os.path.join(run_dir, "bochsrc")).read().replace(os.path.abspath(run_dir), work)
        open(os.path.join(work, "bochsrc"), "w").write(rc)
        cmds, n = [], 1
        for _, (start, end) in targets:
            cmds += [f"lb {start:#x}"] + ["c"] * hit
            cmds += ["trace on", f"lb {end:#x}", "c", "trace off", f"d {n}", f"d {n + 1}"]
            n += 2
        cmds.append("q")
        open(os.path.join(work, "cmds"), "w").write("\n".join(cmds) + "\n")
        out = subprocess.run(
            ["xvfb-run", "-a", "-s", "-screen 0 1600x1200x24", "bochs", "-q", "-f", "bochsrc",
             "-rc", "cmds"], cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=600).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    traces, cur = [], None
    for line in out.splitlines():
        if line.startswith("Tracing enabled"):
            cur = []
        elif line.startswith("Tracing disabled"):
            traces.append(cur)
            cur = None
        elif cur is not None:
            m = re.match(r"\(0\)\.\[(\d+)\] \[0x[0-9a-f]+\] [0-9a-f]{4}:([0-9a-f]+) \(unk\. ctxt\): "
                         r"(.*?)\s*;", line)
            if m:
                cur.append((int(m.group(1)), int(m.group(2), 16), m.group(3)))
    if len(traces) != len(targets):
        sys.exit(f"trace_exits: {len(traces)} traces for {len(targets)} operations; did Bochs "
                 "reach every breakpoint? (bench64 and the run files must come from one build)")
    return {op: t for (op, _), t in zip(targets, traces)}


def keel_frames(keel_elf, base, rips):
    """{rip: (file, function)} of the innermost frame in Keel's own source (inlining resolved)."""
    rips = sorted(rips)
    out = run(["addr2line", "-f", "-i", "-C", "-a", "-e", keel_elf] + [hex(r - base) for r in rips])
    frames, cur, fn = {}, None, None
    for line in out.splitlines():
        if line.startswith("0x"):
            cur, fn = int(line, 16) + base, None
            frames[cur] = []
        elif cur is not None and fn is None:
            fn = line
        elif cur is not None:
            frames[cur].append((fn, line))
            fn = None
    result = {}
    for rip, fr in frames.items():
        hit = next(((f, l) for f, l in fr if "/hypervisor/src/" in l), None)
        if hit:
            fn, loc = hit
            result[rip] = (loc.split("/hypervisor/src/")[1].split(":")[0], simplify(fn))
        else:
            result[rip] = ("(assembly)", simplify(fr[0][0]) if fr else "?")
    return result


def simplify(fn):
    """`<keel::hypervisor::Runner>::run_slice` -> `hypervisor::Runner::run_slice`."""
    prev = None
    while prev != fn:
        prev = fn
        fn = re.sub(r"::<[^<>]*>", "", fn)  # turbofish
        fn = re.sub(r"<([\w:]+) as [\w:]+>", r"\1", fn)  # <T as Trait>
        fn = re.sub(r"<([\w:]+)>::", r"\1::", fn)  # <T>::f
        fn = re.sub(r"(\w)<[^<>]*>", r"\1", fn)  # generic arguments
    return re.sub(r"\{closure#\d+\}", "{closure}", fn).removeprefix("keel::")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=RUN_DIR, help="a `cargo keel bench` Keel run directory")
    ap.add_argument("--ops", default=",".join(OPS), help="operations to trace, comma separated")
    ap.add_argument("--hit", type=int, default=3, help="trace the Nth run of each (default 3)")
    ap.add_argument("--top", type=int, default=12, help="functions listed per operation")
    ap.add_argument("--raw", action="store_true", help="also print every traced instruction")
    args = ap.parse_args()
    for tool in ("bochs", "xvfb-run", "objdump", "nm", "addr2line"):
        if not shutil.which(tool):
            sys.exit(f"trace_exits: {tool} is missing")
    guest_elf = os.path.join(args.run_dir, "..", "guests", "bench64.elf")
    keel_elf = os.path.join(args.run_dir, "keel.elf")
    if not os.path.exists(keel_elf):
        # The run with APIC virtualization off (keel-apicv-off) boots the same kernel.
        keel_elf = os.path.join(os.path.dirname(os.path.abspath(args.run_dir)), "keel", "keel.elf")
    for f in (guest_elf, keel_elf, os.path.join(args.run_dir, "disk.img")):
        if not os.path.exists(f):
            sys.exit(f"trace_exits: {f} is missing: run `cargo keel bench` first")
    found = find_ops(disassemble(guest_elf), guest_elf)
    wanted = [op for op in OPS if op in args.ops.split(",")]
    missing = [op for op in wanted if op not in found]
    if missing:
        sys.exit(f"trace_exits: cannot find {', '.join(missing)} in bench64's disassembly")
    targets = [(op, found[op]) for op in wanted]
    traces = bochs_trace(args.run_dir, targets, args.hit)
    exit_entry = symbol(keel_elf, "keel_vm_exit")
    base = None
    for t in traces.values():
        keel = [rip for (_, rip, _) in t if rip >= 1 << 32]
        if keel:
            base = keel[0] - exit_entry  # the first Keel instruction is keel_vm_exit
            break
    rips = {rip for t in traces.values() for (_, rip, _) in t if base and rip >= base}
    frames = keel_frames(keel_elf, base, rips) if rips else {}
    for op, t in traces.items():
        start, end = found[op]
        files, funcs, special = collections.Counter(), collections.Counter(), collections.Counter()
        for (_, rip, text) in t:
            mnem = text.split()[0]
            if mnem in SPECIAL:
                special[mnem] += 1
            f, fn = frames.get(rip, ("(guest)", "(guest)"))
            files[f] += 1
            funcs[(f, fn)] += 1
        print(f"== {op}: {len(t)} instructions from the guest's {start:#x} to its {end:#x} "
              f"(ticks {t[0][0]}..{t[-1][0]}: {t[-1][0] - t[0][0] + 1})")
        print("   by file:     " + ", ".join(f"{f} {n}" for f, n in files.most_common()))
        print("   one tick each here, far more on silicon: "
              + ", ".join(f"{m} x{n}" for m, n in sorted(special.items())))
        for (f, fn), n in funcs.most_common(args.top):
            print(f"   {n:5d}  {f}: {fn}")
        if args.raw:
            for (tick, rip, text) in t:
                f, fn = frames.get(rip, ("(guest)", "(guest)"))
                print(f"      [{tick}] {rip:#x} {text:40s} {f}: {fn}")


if __name__ == "__main__":
    main()
