#!/usr/bin/env python3
"""virtio-blk benchmark: faultvisor vs Debian's QEMU, same guest, same image, one run.

Inside the machine that runs the VMMs (the nested lab's L1 VM on a kvm_pvm host, the
host itself on hardware KVM), one raw image is handed to each VMM as a virtio-blk
disk, and the default guest runs fv-blkbench on it (resources/guest/blkbench.c:
O_DIRECT sequential 1 MiB writes + fdatasync, sequential 1 MiB reads, 4 KiB random
reads at queue depth JOBS). Each VMM runs with its VT-d IOMMU on (the guest boots
with intel_iommu=on, the device's DMA is translated) and off.

  faultvisor: --disk path=IMG,cache=host  (writes go to the host page cache, a
              FLUSH is fdatasync: what QEMU's default cache=writeback does), plus one
              run with faultvisor's default cache=volatile
  QEMU:       -M q35,kernel-irqchip=split [-device intel-iommu,intremap=on]
              -device virtio-blk-pci,disable-legacy=on,iommu_platform=on
              -drive file=IMG,format=raw,cache=writeback,aio=threads

  python3 ci/bench_blk.py [--iterations N] [--mib M] [--seconds S] [--jobs J]
Prints the medians and the ratios; copy them into BENCHMARKS.md.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_boot  # noqa: E402
import lab  # noqa: E402

MEM_MIB = 512
IMAGE_MIB = 128
TESTS = ("seq-read", "seq-write", "rand-read")


def configs():
    """(label, vmm, iommu, faultvisor cache mode)."""
    return [("faultvisor", "faultvisor", "on", "host"),
            ("faultvisor", "faultvisor", "off", "host"),
            ("faultvisor cache=volatile", "faultvisor", "on", "volatile"),
            ("qemu", "qemu", "on", None),
            ("qemu", "qemu", "off", None)]


def command(vmm, iommu, cache, nested, image, cmdline, files):
    if vmm == "faultvisor":
        fv = "/lab/faultvisor" if nested else files["vmm"]
        return (f"{fv} run --kernel {files['kernel']} --initrd {files['initrd']} --vcpus 1 "
                f"--memory {MEM_MIB}M --iommu {'intel' if iommu == 'on' else 'off'} "
                f"--disk path={image},cache={cache} --cmdline '{cmdline}'")
    q = ("/lab/qemu/lib/ld.so --library-path /lab/qemu/lib /lab/qemu/qemu-system-x86_64 "
         "-L /lab/qemu/share") if nested else "qemu-system-x86_64"
    iommu_dev = "-device intel-iommu,intremap=on " if iommu == "on" else ""
    return (f"{q} -accel kvm -M q35,kernel-irqchip=split -cpu host -smp 1 -m {MEM_MIB}M "
            f"-nodefaults -display none -serial stdio -no-reboot {iommu_dev}"
            f"-drive file={image},if=none,id=d0,format=raw,cache=writeback,aio=threads "
            f"-device virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on "
            f"-kernel {files['kernel']} -initrd {files['initrd']} -append '{cmdline}'")


def parse(text):
    """{test: (mbps, iops)} from the guest's FV-BLKBENCH lines."""
    out = {}
    for m in re.finditer(r"FV-BLKBENCH (\S+) bytes=\d+ ops=\d+ seconds=[\d.]+ "
                         r"mbps=([\d.]+) iops=(\d+)", text):
        name = "rand-read" if m.group(1).startswith("rand-read") else m.group(1)
        out[name] = (float(m.group(2)), int(m.group(3)))
    return out


def main():
    ap = argparse.ArgumentParser(description="faultvisor vs QEMU virtio-blk benchmark")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64, help="MiB per sequential pass")
    ap.add_argument("--seconds", type=float, default=5, help="random-read duration")
    ap.add_argument("--jobs", type=int, default=1, help="random-read queue depth")
    args = ap.parse_args()
    if not 0 < args.mib <= IMAGE_MIB:
        sys.exit(f"bench: --mib must be 1..{IMAGE_MIB}")
    mode = lab.mode()
    if mode == "unavailable":
        sys.exit("bench: " + lab.unavailable_reason())
    nested = mode == "nested"
    cmdline = (f"console=ttyS0 quiet intel_iommu=on fv.checks=modules,blkbench "
               f"fv.blkbench={args.mib},{args.seconds:g},{args.jobs}")
    tmp = tempfile.mkdtemp(prefix="fv-benchblk-")
    specs = []
    for i in range(args.iterations):
        for n, (label, vmm, iommu, cache) in enumerate(configs()):
            specs.append((f"{vmm}-{n}-{i}", label, vmm, iommu, cache))
    results = {}
    if nested:
        image = "/tmp/bench.img"
        files = {"kernel": "{kernel}", "initrd": "{initrd}"}
        jobs = [lab.Job("make-image", [], timeout=120,
                        raw=f"dd if=/dev/zero of={image} bs=1M count={IMAGE_MIB} 2>&1")]
        for name, _, vmm, iommu, cache in specs:
            jobs.append(lab.Job(name, [], timeout=300, raw=command(
                vmm, iommu, cache, True, image, cmdline, files)))
        results = lab.run_jobs(jobs, extra_files=bench_boot.qemu_bundle(tmp))
    else:
        gdir = lab.guest_dir()
        files = {"vmm": lab.build_vmm(static=False), "kernel": f"{gdir}/vmlinux",
                 "initrd": f"{gdir}/initramfs.cpio"}
        image = os.path.join(tmp, "bench.img")
        with open(image, "wb") as f:
            f.write(b"\0" * (IMAGE_MIB << 20))
        for name, _, vmm, iommu, cache in specs:
            cmd = command(vmm, iommu, cache, False, image, cmdline, files)
            p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=600)
            results[name] = lab.JobResult(name, p.returncode, p.stdout + p.stderr)
    rows = {}
    for name, label, _, iommu, _ in specs:
        r = results.get(name)
        got = parse(r.output if r else "")
        if set(got) != set(TESTS):
            print(f"{name}: no complete measurement (see target/lab-logs)", file=sys.stderr)
            continue
        rows.setdefault((label, iommu), []).append(got)
    print(f"\nmode: {mode}; {args.iterations} iteration(s); guest {MEM_MIB} MiB, 1 vCPU; "
          f"{args.mib} MiB sequential, 4 KiB random reads at QD{args.jobs} for "
          f"{args.seconds:g} s")
    print(f"{'VMM':<26} {'IOMMU':<6} {'seq read MB/s':>14} {'seq write MB/s':>15} "
          f"{'4K rand read IOPS':>18}")
    med = {}
    for (label, iommu), vals in rows.items():
        m = {t: statistics.median(v[t][1 if t == "rand-read" else 0] for v in vals)
             for t in TESTS}
        med[(label, iommu)] = m
        print(f"{label:<26} {iommu:<6} {m['seq-read']:>14.1f} {m['seq-write']:>15.1f} "
              f"{m['rand-read']:>18.0f}")
    for iommu in ("on", "off"):
        a, b = med.get(("faultvisor", iommu)), med.get(("qemu", iommu))
        if a and b:
            print(f"ratio faultvisor/qemu (IOMMU {iommu}): " + ", ".join(
                f"{t} {a[t] / b[t]:.2f}x" for t in TESTS))
    for label in ("faultvisor", "qemu"):
        on, off = med.get((label, "on")), med.get((label, "off"))
        if on and off:
            print(f"ratio IOMMU on/off ({label}): " + ", ".join(
                f"{t} {on[t] / off[t]:.2f}x" for t in TESTS))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
