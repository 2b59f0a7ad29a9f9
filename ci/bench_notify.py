#!/usr/bin/env python3
"""Exits per virtio request: faultvisor with virtio-blk notifications by ioeventfd
(the default) and by MMIO exit (FAULTVISOR_IOEVENTFD=off), one run.

Inside the machine that runs the VMM (the nested lab's L1 VM, or the host with
hardware KVM) the default guest runs fv-blkbench on a scratch image (IOMMU off,
cache=host). KVM's statistics for the VM (debugfs) are read when the guest's init
starts and when the benchmark has printed the block layer's counts
(/sys/block/vda/stat, `FV-BLKSTAT`); the difference, divided by the requests that
reached the device (reads + writes + discards + flushes), is the cost per request.
The interval also holds the benchmark's own console output (a few lines).

  python3 ci/bench_notify.py [--mib M] [--seconds S] [--jobs J]
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_boot  # noqa: E402
import lab  # noqa: E402

SAMPLE = r"""#!/bin/sh
# sample.sh LOG: KVM statistics of the VMM writing LOG, at FAULTVISOR-INIT (A) and at
# FV-BLKSTAT (B); then waits for the VMM.
[ -d /sys/kernel/debug/kvm ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null
log=$1; shift
"$@" > $log 2>&1 &
pid=$!
snap() {
    for d in /sys/kernel/debug/kvm/$pid-*; do
        [ -d "$d" ] || continue
        for f in "$d"/*; do
            [ -f "$f" ] && echo "KVMSTAT-$1 ${f##*/} $(cat "$f" 2>/dev/null)"
        done
    done
}
for mark in FAULTVISOR-INIT FV-BLKSTAT; do
    while kill -0 $pid 2>/dev/null && ! grep -q "$mark" $log; do usleep 2000; done
    [ $mark = FAULTVISOR-INIT ] && snap A > $log.a || snap B > $log.b
done
wait $pid
echo "RC=$?"
cat $log $log.a $log.b
"""


def stats(text, tag):
    return {m.group(1): int(m.group(2))
            for m in re.finditer(rf"^KVMSTAT-{tag} (\S+) (\d+)", text, re.M)}


def main():
    ap = argparse.ArgumentParser(description="exits per virtio-blk request")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    if lab.mode() != "nested":
        sys.exit("bench: this benchmark reads KVM's debugfs in the nested lab "
                 f"({lab.unavailable_reason() if lab.mode() == 'unavailable' else 'mode ' + lab.mode()})")
    import tempfile
    tmp = tempfile.mkdtemp(prefix="fv-notify-")
    sample = os.path.join(tmp, "sample.sh")
    with open(sample, "w") as f:
        f.write(SAMPLE)
    os.chmod(sample, 0o755)
    # `pause` keeps the VM (and its statistics) alive while the second sample is read.
    cmdline = (f"console=ttyS0 quiet panic=-1 fv.checks=modules,blkbench,pause "
               f"fv.blkbench={args.mib},{args.seconds},{args.jobs}")
    jobs = []
    for mode, env in (("ioeventfd", ""), ("mmio-exit", "FAULTVISOR_IOEVENTFD=off ")):
        jobs.append(lab.Job(mode, [], timeout=300, raw=(
            "rm -f /tmp/n.img && dd if=/dev/zero of=/tmp/n.img bs=1M count=0 seek=256 "
            "2>/dev/null && "
            f"/lab/sample.sh /tmp/{mode}.log env {env}/lab/faultvisor run --kernel /lab/vmlinux "
            "--initrd /lab/initramfs.cpio --vcpus 1 --memory 512M --iommu off "
            f"--disk path=/tmp/n.img,cache=host --cmdline '{cmdline}'")))
    results = lab.run_jobs(jobs, extra_files={"sample.sh": sample})
    print("\n| notifications | requests | exits | userspace exits | mmio_exits "
          "| exits per request | userspace exits per request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for j in jobs:
        r = results.get(j.name)
        text = r.output if r else ""
        a, b = stats(text, "A"), stats(text, "B")
        m = re.search(r"FV-BLKSTAT ([\d ]+)", text)
        if not (a and b and m) or "io_exits" not in b:
            print(f"| {j.name} | no measurement (see target/lab-logs) | | | | | |")
            continue
        f = [int(x) for x in m.group(1).split()]
        reqs = f[0] + f[4] + (f[11] if len(f) > 11 else 0) + (f[15] if len(f) > 15 else 0)
        d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
        user = sum(d.get(k, 0) for k in bench_boot.USERSPACE)
        print(f"| {j.name} | {reqs} | {d.get('exits', 0)} | {user} | {d.get('mmio_exits', 0)} "
              f"| {d.get('exits', 0) / max(reqs, 1):.2f} | {user / max(reqs, 1):.3f} |")


if __name__ == "__main__":
    main()
