#!/usr/bin/env python3
"""Campaign throughput: faultvisor's campaign engine vs the same runs as QEMU processes.

Both boot the same probe ELF (QEMU through its PVH note) with the same scenario
(probe.tests=boot.*,apic.* by default: it finishes by itself, so QEMU needs no fault
injection), N runs, J at a time, on this host's KVM, one invocation:
  - faultvisor: `faultvisor campaign` with one experiment repeated N times (each run
    its own VMM process, API socket, trace and report, as in any campaign);
  - QEMU: N `qemu-system-x86_64 -M q35,kernel-irqchip=split -accel kvm -kernel probe.elf`
    processes, J at a time (a thread pool here; QEMU has no campaign engine).
Also scaling: faultvisor with --jobs 1 and 2, and the campaign as 2 shards run at once
(--jobs 1 each: two Slurm nodes' worth) against one unsharded run with --jobs 2.

  python3 ci/bench_campaign.py [--runs N] [--tests PATTERNS]
Prints runs per second and the ratios; copy them into BENCHMARKS.md.
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def campaign_file(path, runs, tests):
    with open(path, "w") as f:
        f.write(f"""[campaign]
name = "throughput"
seed = 1
timeout_s = 60

[[experiment]]
name = "probe"
guest = "probe"
probe_tests = "{tests}"
devices = ["edu"]
vcpus = 2
repeat = {runs}
[experiment.expect]
exit_code = 0
""")


def timed(cmd, **kw):
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[:3])}... failed ({r.returncode}): {r.stderr[-500:]}")
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tests", default="boot.*,apic.*")
    a = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        sys.exit("bench: needs /dev/kvm")
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("bench: needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
    subprocess.run(["cargo", "build", "--release", "--bin", "faultvisor"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    fv = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                      "release", "faultvisor")
    tmp = tempfile.mkdtemp(prefix="fv-benchcamp-")
    probe = os.path.join(tmp, "probe.elf")
    subprocess.run([fv, "demo", "--write-probe", probe], check=True, stdout=subprocess.DEVNULL)
    camp = os.path.join(tmp, "c.toml")
    campaign_file(camp, a.runs, a.tests)
    qemu = ["qemu-system-x86_64", "-M", "q35,kernel-irqchip=split", "-accel", "kvm",
            "-cpu", "qemu64", "-smp", "2", "-m", "64", "-display", "none", "-serial",
            "stdio", "-monitor", "none", "-nodefaults", "-no-reboot", "-device", "edu",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", probe,
            "-append", f"probe.tests={a.tests}"]
    rows = {}
    for jobs in (1, 2):
        rows[("faultvisor", jobs)] = timed(
            [fv, "campaign", camp, "--jobs", str(jobs), "--out", os.path.join(tmp, f"fv{jobs}")])
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            codes = list(pool.map(lambda _: subprocess.run(
                qemu, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode,
                range(a.runs)))
        rows[("qemu", jobs)] = time.monotonic() - t0
        # The probe powers off (0) or writes 0 to isa-debug-exit ((0 << 1) | 1 = 1) when
        # every test passed.
        bad = [c for c in codes if c not in (0, 1)]
        if bad:
            sys.exit(f"bench: {len(bad)} QEMU run(s) failed (exit {bad[0]})")
    t0 = time.monotonic()
    shards = [subprocess.Popen([fv, "campaign", camp, "--jobs", "1", "--shard", f"{i}/2",
                                "--out", os.path.join(tmp, f"s{i}")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for i in (0, 1)]
    if any(p.wait() != 0 for p in shards):
        sys.exit("bench: a shard failed")
    two_shards = time.monotonic() - t0
    kvm = "kvm_pvm (software KVM)" if os.path.exists("/sys/module/kvm_pvm") else "KVM"
    print(f"\ncampaign throughput on this host's {kvm}: {a.runs} runs of "
          f"probe.tests={a.tests}, 2 vCPUs, 64 MiB")
    print(f"{'runner':<34}{'wall s':>8}{'runs/s':>9}")
    for (who, jobs), secs in rows.items():
        label = f"faultvisor campaign --jobs {jobs}" if who == "faultvisor" else \
            f"QEMU processes, {jobs} at a time"
        print(f"{label:<34}{secs:>8.2f}{a.runs / secs:>9.1f}")
    print(f"{'faultvisor, 2 shards --jobs 1':<34}{two_shards:>8.2f}{a.runs / two_shards:>9.1f}")
    for jobs in (1, 2):
        print(f"ratio faultvisor/QEMU runs per second, {jobs} at a time: "
              f"{rows[('qemu', jobs)] / rows[('faultvisor', jobs)]:.1f}x")
    print(f"scaling faultvisor --jobs 2 vs 1: "
          f"{rows[('faultvisor', 1)] / rows[('faultvisor', 2)]:.2f}x; "
          f"2 shards vs 1 run with --jobs 2: {rows[('faultvisor', 2)] / two_shards:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
