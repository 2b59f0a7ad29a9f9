#!/usr/bin/env python3
"""Start-up benchmark: VMM start to the first KVM_RUN, with the default guest's 53 MB
vmlinux and initrd, for `--load copy` and `--load map` (issue 15).

  python3 ci/bench_start.py [--runs N] [--vmm PATH ...]   on this host
  python3 ci/bench_start.py --lab [--runs N]               inside the nested lab

Several --vmm binaries (e.g. an older build) run alternately, so that all of them see
the same host. The figure is the one faultvisor logs (`first KVM_RUN N us after VMM
start`); the guest itself need not boot (it cannot on a software KVM). A benchmark,
not a test: it prints medians and ranges and checks nothing.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ci"))
GUEST = os.path.expanduser("~/.cache/faultvisor/guest")
PATTERN = re.compile(r"first KVM_RUN (\d+) us")


def summary(name, values):
    v = sorted(values)
    if not v:
        return f"{name}: no result"
    p90 = v[min(len(v) - 1, int(len(v) * 0.9))]
    return (f"{name}: median {statistics.median(v) / 1000:.2f} ms, min {v[0] / 1000:.2f}, "
            f"p90 {p90 / 1000:.2f}, max {v[-1] / 1000:.2f} ({len(v)} runs)")


def host(args):
    vmms = args.vmm or [os.path.join(ROOT, "target", "release", "faultvisor")]
    if not args.vmm:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    results = {}
    for _ in range(args.runs):
        for load in ("copy", "map"):
            for vmm in vmms:
                cmd = [vmm, "run", "--kernel", os.path.join(GUEST, "vmlinux"), "--initrd",
                       os.path.join(GUEST, "initramfs.cpio"), "--memory", "512M",
                       "--vcpus", "1", "--serial", "none", "--load", load]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3)
                    out = p.stderr + p.stdout
                except subprocess.TimeoutExpired as e:
                    out = (e.stderr or b"").decode(errors="replace")
                m = PATTERN.search(out)
                if m:
                    results.setdefault((vmm, load), []).append(int(m.group(1)))
    for (vmm, load), values in results.items():
        print(summary(f"{vmm} --load {load}", values))


def in_lab(args):
    import lab
    loop = " ".join(["copy map"] * args.runs)
    cmd = (f"for m in {loop}; do timeout 30 /lab/faultvisor run --kernel /lab/vmlinux "
           "--initrd /lab/initramfs.cpio --memory 512M --vcpus 1 --serial none --load $m "
           "--cmdline 'console=ttyS0 quiet fv.checks=pause' 2>&1 | "
           "grep -o 'first KVM_RUN [0-9]* us' | sed \"s/^/$m /\"; done")
    res = lab.run_jobs([lab.Job("start", [], timeout=60 + 40 * args.runs, raw=cmd)])
    r = res.get("start")
    if r is None or r.rc is None:
        print("the lab did not finish", file=sys.stderr)
        return 2
    values = {}
    for line in r.lines:
        m = re.match(r"(copy|map) first KVM_RUN (\d+) us", line.strip())
        if m:
            values.setdefault(m.group(1), []).append(int(m.group(2)))
    for load, v in values.items():
        print(summary(f"lab --load {load}", v))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--vmm", action="append", help="a faultvisor binary (repeatable)")
    ap.add_argument("--lab", action="store_true", help="measure inside the nested lab")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.lab:
        return in_lab(args)
    host(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
