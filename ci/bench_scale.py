#!/usr/bin/env python3
"""Scaling figures for faultvisor on this host's KVM, with the probe guest (one run).

  - boot:   wall time of `faultvisor demo --tests boot.smp` (VMM start, every AP brought
            up and checked by the guest, power-off) with 1, 2, 16, 64 and 288 vCPUs
            (above 254 the APIC IDs need x2APIC: the probe runs in x2APIC mode), and the
            VMM's "first KVM_RUN" time;
  - rss:    the VMM's resident memory outside guest RAM with 1 and with 31 PCI devices
            (every free slot of bus 0: fv-test, edu and virtio-rng in turn), sampled
            while the probe waits in `opt.watch`;
  - fleet:  how many probe VMs (1 vCPU, 64 MiB, `boot.*`) run at once: K at a time for
            growing K, all of them must pass; prints VMs per second and the peak of
            the processes' summed RSS.

  python3 ci/bench_scale.py [--vcpus 1,2,16,64,288] [--fleet 1,16,64,256] [--runs 3]
Copy the tables into BENCHMARKS.md.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build():
    subprocess.run(["cargo", "build", "--release", "--bin", "faultvisor"], cwd=ROOT,
                   check=True, stdout=sys.stderr)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release", "faultvisor")


def boot(fv, vcpus, runs):
    """Median wall time (ms) and first-KVM_RUN time (ms) of a probe boot."""
    walls, firsts = [], []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.run([fv, "demo", "--vcpus", str(vcpus), "--tests", "boot.smp",
                            "--log-level", "info"],
                           capture_output=True, text=True, timeout=600)
        wall = (time.monotonic() - t0) * 1000
        if p.returncode != 0 or "ok " not in p.stdout:
            print(f"boot {vcpus} vCPUs failed ({p.returncode}):\n{p.stdout[-2000:]}"
                  f"{p.stderr[-2000:]}", file=sys.stderr)
            return None
        walls.append(wall)
        m = re.search(r"first KVM_RUN (\d+) us", p.stderr)
        if m:
            firsts.append(int(m.group(1)) / 1000)
    return (statistics.median(walls),
            statistics.median(firsts) if firsts else None)


def rss_outside_guest(pid, log_text, mem_bytes):
    """KiB resident in the process's mappings outside guest RAM."""
    m = re.search(r"guest RAM 0x0\+0x[0-9a-f]+ at host 0x([0-9a-f]+)", log_text)
    base = int(m.group(1), 16) if m else None
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0] if line.strip() else ""
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = base is not None and lo >= base and hi <= base + mem_bytes
            elif head == "Rss:" and not inside:
                total += int(line.split()[1])
    return total


def rss(fv, probe, ndev):
    kinds = ["test", "edu", "virtio-rng"]
    devs = []
    for i in range(ndev):
        devs += ["--device", kinds[i % len(kinds)]]
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "log")
        with open(log, "w") as lf:
            p = subprocess.Popen([fv, "run", "--kernel", probe, "--memory", "64M",
                                  "--vcpus", "1", "--log-level", "debug", "--serial",
                                  "stdio", "--cmdline", "probe.tests=opt.watch"] + devs,
                                 stdout=lf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            text = ""
            while time.monotonic() < deadline:
                text = open(log).read()
                if "# watch: ready" in text:
                    break
                time.sleep(0.05)
            else:
                print(f"rss {ndev} devices: the probe never got ready:\n{text[-2000:]}",
                      file=sys.stderr)
                return None
            return rss_outside_guest(p.pid, text, 64 << 20)
        finally:
            p.kill()
            p.wait()


def fleet(fv, k):
    """Runs k probe VMs at once; returns (seconds, all passed, peak summed RSS MiB)."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([fv, "demo", "--vcpus", "1", "--tests", "boot.*"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(k)]
    peak = 0
    while any(p.poll() is None for p in procs):
        total = 0
        for p in procs:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        peak = max(peak, total)
        time.sleep(0.02)
    secs = time.monotonic() - t0
    ok = all(p.wait() == 0 and "ok " in p.stdout.read() for p in procs)
    return secs, ok, peak / 1024


def main():
    ap = argparse.ArgumentParser(description="faultvisor scaling figures (probe guest)")
    ap.add_argument("--vcpus", default="1,2,16,64,288")
    ap.add_argument("--fleet", default="1,16,64,256")
    ap.add_argument("--devices", default="1,31")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    try:
        vcpus = [int(v) for v in args.vcpus.split(",")]
        sizes = [int(v) for v in args.fleet.split(",")]
        devices = [int(v) for v in args.devices.split(",")]
    except ValueError:
        sys.exit("bench: --vcpus, --fleet and --devices take numbers like 1,2,16")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("bench: /dev/kvm is not usable here")
    fv = build()
    with tempfile.TemporaryDirectory() as d:
        probe = os.path.join(d, "probe.elf")
        subprocess.run([fv, "demo", "--write-probe", probe], check=True)
        print("\n| vCPUs | probe boot, wall (ms) | start → first KVM_RUN (ms) |")
        print("|---:|---:|---:|")
        for n in vcpus:
            r = boot(fv, n, args.runs)
            if r:
                first = f"{r[1]:.1f}" if r[1] is not None else "–"
                print(f"| {n} | {r[0]:.0f} | {first} |")
            else:
                print(f"| {n} | failed | – |")
        print("\n| PCI devices | VMM RSS outside guest RAM (KiB) |")
        print("|---:|---:|")
        for n in devices:
            kib = rss(fv, probe, n)
            print(f"| {n} | {kib if kib is not None else 'failed'} |")
    print("\n| VMs at once | all passed | wall (s) | VMs per second | peak summed RSS (MiB) |")
    print("|---:|---|---:|---:|---:|")
    for k in sizes:
        secs, ok, peak = fleet(fv, k)
        print(f"| {k} | {'yes' if ok else 'NO'} | {secs:.2f} | {k / secs:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
