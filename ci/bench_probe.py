#!/usr/bin/env python3
"""Probe microbenchmarks: faultvisor vs Debian's QEMU, same probe guest, same host, one run.

The probe guest (embedded in faultvisor; extracted with `faultvisor demo --write-probe`)
measures in TSC cycles, inside the guest:
  - mmio:        a 32-bit MMIO read of a device register handled in the VMM
                 (faultvisor: fv-test SCRATCH; QEMU: edu's liveness register);
  - pio:         `inb` of COM1's line status register (userspace UART in both);
  - msi_latency: from the write that asks the device for an MSI to the first
                 instruction of the guest's handler (fv-test RAISE; edu 0x60).
Both VMMs run on this host's /dev/kvm with 2 vCPUs; QEMU as
`-M q35,kernel-irqchip=split -accel kvm` (userspace IOAPIC, like faultvisor).
Rounds alternate between the VMMs; each round's median is one sample, and the
table shows the median over rounds. Ratio = faultvisor / QEMU (lower is better).

  python3 ci/bench_probe.py [--rounds N] [--iters N] [--json FILE]
  python3 ci/bench_probe.py --iommu [--iters N]
  python3 ci/bench_probe.py --ir [--rounds N] [--iters N]

With --iommu it runs the VT-d benchmarks instead, on faultvisor (`--device edu`) and
on QEMU (`-device intel-iommu,intremap=off -device edu`): an edu 2 KiB copy
RAM -> device -> RAM with translation off and on (dma_iommu_off / dma_iommu_on), and
the time from the edu DMA command write to the guest's VT-d fault-event handler
(fault_latency). QEMU's edu completes every DMA from a timer 100 ms after the command
(by design, hw/misc/edu.c), so QEMU's numbers there measure that timer; the
on/off ratio within each VMM is the meaningful figure.

With --ir it runs the interrupt-remapping benchmarks: MSI latency and the cycles per
interrupt of a device raising MSIs back to back (the inverse of the sustained rate),
each with remapping off and on (the MSI in remappable format through an IRTE), on
faultvisor (`--iommu intel --device test`) and on QEMU
(`-device intel-iommu,intremap=on -device edu`), rounds alternating. It prints the
on/off ratio within each VMM (goal for faultvisor: latency <= 1.05, rate >= 0.95 of
off) and faultvisor / QEMU.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = ["mmio", "pio", "msi_latency"]
IOMMU_BENCHES = ["dma_iommu_off", "dma_iommu_on", "fault_latency"]
IR_BENCHES = ["msi_latency", "ir_msi_latency", "irq_rate", "ir_irq_rate"]
LINE = re.compile(r"^# bench (\S+) median=(\d+) min=(\d+)")


def build():
    subprocess.run(["cargo", "build", "--release", "--bin", "faultvisor"], cwd=ROOT,
                   check=True, stdout=sys.stderr)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release", "faultvisor")


def parse(out):
    res = {}
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if m:
            res[m.group(1)] = {"median": int(m.group(2)), "min": int(m.group(3))}
    return res


def run(cmd, what, benches=BENCHES):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=600)
    res = parse(p.stdout)
    missing = [b for b in benches if b not in res]
    if p.returncode != 0 or missing:
        sys.exit(f"bench_probe: {what} failed (exit {p.returncode}, missing {missing}):\n"
                 f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--iommu", action="store_true", help="run the VT-d benchmarks")
    ap.add_argument("--ir", action="store_true", help="run the interrupt-remapping benchmarks")
    a = ap.parse_args()
    if a.rounds < 1 or not 1 <= a.iters <= 100000:
        sys.exit("bench_probe: --rounds must be >= 1 and --iters within 1..100000")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("bench_probe: needs /dev/kvm")
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("bench_probe: needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
    fv = build()
    tmp = tempfile.mkdtemp(prefix="fv-bench-")
    probe = os.path.join(tmp, "probe.elf")
    subprocess.run([fv, "demo", "--write-probe", probe], check=True, stdout=subprocess.DEVNULL)
    if a.iommu:
        return iommu_bench(fv, probe, a)
    if a.ir:
        return ir_bench(fv, probe, a)
    cmdline = f"probe.tests=bench.mmio,bench.pio,bench.msi_latency probe.iters={a.iters}"
    fv_cmd = [fv, "run", "--kernel", probe, "--vcpus", "2", "--memory", "64M",
              "--device", "test", "--serial", "stdio", "--cmdline", cmdline]
    qemu_cmd = ["qemu-system-x86_64", "-M", "q35,kernel-irqchip=split", "-accel", "kvm",
                "-cpu", "qemu64", "-smp", "2", "-m", "64", "-display", "none",
                "-serial", "stdio", "-monitor", "none", "-nodefaults", "-no-reboot",
                "-device", "edu", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel", probe, "-append", cmdline]
    samples = {"faultvisor": {b: [] for b in BENCHES}, "qemu": {b: [] for b in BENCHES}}
    for r in range(a.rounds):
        for name, cmd in (("faultvisor", fv_cmd), ("qemu", qemu_cmd)):
            res = run(cmd, name)
            for b in BENCHES:
                samples[name][b].append(res[b]["median"])
        print(f"[bench] round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    kvm = "kvm_pvm (software KVM)" if os.path.exists("/sys/module/kvm_pvm") else "KVM"
    print(f"probe microbenchmarks on this host's {kvm}: {a.rounds} rounds x {a.iters} samples,"
          " median of round medians, TSC cycles")
    print(f"{'benchmark':<14}{'faultvisor':>12}{'QEMU':>12}{'ratio':>8}")
    summary = {}
    for b in BENCHES:
        f = statistics.median(samples["faultvisor"][b])
        q = statistics.median(samples["qemu"][b])
        summary[b] = {"faultvisor": f, "qemu": q, "ratio": f / q}
        print(f"{b:<14}{f:>12.0f}{q:>12.0f}{f / q:>8.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"samples": samples, "summary": summary, "rounds": a.rounds,
                       "iters": a.iters, "kvm": kvm}, fh, indent=2)
    return 0


def iommu_bench(fv, probe, a):
    tests = "probe.tests=bench.dma,bench.fault_latency"
    fv_cmd = [fv, "run", "--kernel", probe, "--vcpus", "2", "--memory", "64M",
              "--device", "edu", "--serial", "stdio",
              "--cmdline", f"{tests} probe.iters={a.iters}"]
    # QEMU's edu needs 100 ms per transfer: few samples.
    q_iters = min(a.iters, 5)
    qemu_cmd = ["qemu-system-x86_64", "-M", "q35,kernel-irqchip=split", "-accel", "kvm",
                "-cpu", "qemu64", "-smp", "2", "-m", "64", "-display", "none",
                "-serial", "stdio", "-monitor", "none", "-nodefaults", "-no-reboot",
                "-device", "intel-iommu,intremap=off", "-device", "edu",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel", probe, "-append", f"{tests} probe.iters={q_iters}"]
    f = run(fv_cmd, "faultvisor", IOMMU_BENCHES)
    q = run(qemu_cmd, "qemu", IOMMU_BENCHES)
    print(f"VT-d benchmarks (probe guest, edu): faultvisor n={a.iters}, QEMU n={q_iters}; "
          "median TSC cycles")
    print(f"{'benchmark':<16}{'faultvisor':>14}{'QEMU':>14}")
    for b in IOMMU_BENCHES:
        print(f"{b:<16}{f[b]['median']:>14}{q[b]['median']:>14}")
    for name, r in (("faultvisor", f), ("QEMU", q)):
        pct = 100.0 * r["dma_iommu_off"]["median"] / r["dma_iommu_on"]["median"]
        print(f"{name}: DMA throughput with the IOMMU on = {pct:.1f}% of off")
    return 0


def ir_bench(fv, probe, a):
    tests = f"probe.tests={','.join('bench.' + b for b in IR_BENCHES)} probe.iters={a.iters}"
    fv_cmd = [fv, "run", "--kernel", probe, "--vcpus", "2", "--memory", "64M",
              "--device", "test", "--iommu", "intel", "--serial", "stdio",
              "--cmdline", tests]
    qemu_cmd = ["qemu-system-x86_64", "-M", "q35,kernel-irqchip=split", "-accel", "kvm",
                "-cpu", "qemu64", "-smp", "2", "-m", "64", "-display", "none",
                "-serial", "stdio", "-monitor", "none", "-nodefaults", "-no-reboot",
                "-device", "intel-iommu,intremap=on", "-device", "edu",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel", probe, "-append", tests]
    samples = {"faultvisor": {b: [] for b in IR_BENCHES}, "qemu": {b: [] for b in IR_BENCHES}}
    for r in range(a.rounds):
        for name, cmd in (("faultvisor", fv_cmd), ("qemu", qemu_cmd)):
            res = run(cmd, name, IR_BENCHES)
            for b in IR_BENCHES:
                samples[name][b].append(res[b]["median"])
        print(f"[bench] round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    med = {n: {b: statistics.median(v) for b, v in s.items()} for n, s in samples.items()}
    print(f"interrupt remapping benchmarks: {a.rounds} rounds x {a.iters} samples, median of"
          " round medians, TSC cycles (rate rows: cycles per interrupt handled)")
    print(f"{'benchmark':<16}{'faultvisor':>12}{'QEMU':>12}{'fv/QEMU':>9}")
    for b in IR_BENCHES:
        f, q = med["faultvisor"][b], med["qemu"][b]
        print(f"{b:<16}{f:>12.0f}{q:>12.0f}{f / q:>9.2f}")
    for name in ("faultvisor", "qemu"):
        m = med[name]
        lat = m["ir_msi_latency"] / m["msi_latency"]
        rate = m["irq_rate"] / m["ir_irq_rate"]
        print(f"{name}: MSI latency IR on / off = {lat:.3f}; "
              f"sustained rate IR on / off = {rate:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"samples": samples, "medians": med, "rounds": a.rounds,
                       "iters": a.iters}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
