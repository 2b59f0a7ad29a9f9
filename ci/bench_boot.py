#!/usr/bin/env python3
"""Boot benchmark: faultvisor vs Debian's QEMU, same kernel and initrd, same lab, one run.

For each VMM and kernel format it measures, from inside the machine that runs the VMM
(the nested lab's L1 VM on a kvm_pvm host, the host itself on hardware KVM):
  - time from spawning the VMM to the guest init's marker line (FAULTVISOR-INIT);
  - the VMM's RSS outside guest memory (all mappings but the guest-RAM one, sampled
    while the guest sits at init);
and for faultvisor its own "first KVM_RUN N us after VMM start" log line.
QEMU runs as `-accel kvm -M q35,kernel-irqchip=split -kernel ... -initrd ...`.

  python3 ci/bench_boot.py [--iterations N]
Prints a table and the ratios; copy them into BENCHMARKS.md.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402

MEM_MIB = 512
CMDLINE = "console=ttyS0 quiet fv.checks=pause"

MEASURE = r"""#!/bin/sh
# measure.sh MEM_MIB cmd... : prints BENCH init_s=.. rss_kib=.. after the VMM exits.
mem_kib=$(( $1 * 1024 )); shift
out=/tmp/bench.$$
t0=$(cut -d' ' -f1 /proc/uptime)
"$@" > $out 2>&1 &
pid=$!
init=""; rss=""
while kill -0 $pid 2>/dev/null; do
    if [ -z "$init" ] && grep -q FAULTVISOR-INIT $out; then
        init=$(cut -d' ' -f1 /proc/uptime)
        rss=0; size=0
        while read -r a b _; do
            case "$a" in
                Rss:) [ "$size" != "$mem_kib" ] && rss=$((rss + b)) ;;
                *-*) lo=${a%-*}; hi=${a#*-}; size=0
                     # Skip the vsyscall page (addresses too large for sh arithmetic).
                     [ ${#hi} -le 12 ] && size=$(( (0x$hi - 0x$lo) / 1024 )) ;;
            esac
        done < /proc/$pid/smaps
    fi
    usleep 5000
done
wait $pid
rc=$?
cat $out
echo "BENCH rc=$rc t0=$t0 init=$init rss_kib=$rss"
"""


def qemu_bundle(tmp):
    """Copies QEMU, its libraries and firmware into tmp for the L1 VM."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        sys.exit("bench: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")
    files = {"qemu/qemu-system-x86_64": qemu}
    ldd = subprocess.run(["ldd", qemu], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m and os.path.exists(m.group(1)):
            path = m.group(1)
            name = "ld.so" if "ld-linux" in path else os.path.basename(path)
            files[f"qemu/lib/{name}"] = os.path.realpath(path)
    for fw in ("bios-256k.bin", "linuxboot_dma.bin", "kvmvapic.bin", "pvh.bin"):
        for d in ("/usr/share/qemu", "/usr/share/seabios"):
            p = os.path.join(d, fw)
            if os.path.exists(p):
                files[f"qemu/share/{fw}"] = os.path.realpath(p)
                break
    return files


def jobs(iterations, nested):
    fv = "/lab/faultvisor" if nested else "{vmm}"
    q = ("/lab/qemu/lib/ld.so --library-path /lab/qemu/lib /lab/qemu/qemu-system-x86_64 "
         "-L /lab/qemu/share") if nested else "qemu-system-x86_64"
    out = []
    for i in range(iterations):
        for fmt, kernel in (("vmlinux", "{kernel}"), ("bzImage", "{bzimage}")):
            out.append((f"faultvisor-{fmt}-{i}", "faultvisor", fmt,
                        f"{fv} run --kernel {kernel} --initrd {{initrd}} --vcpus 1 "
                        f"--memory {MEM_MIB}M --cmdline '{CMDLINE}'"))
            out.append((f"qemu-{fmt}-{i}", "qemu", fmt,
                        f"{q} -accel kvm -M q35,kernel-irqchip=split -cpu host -smp 1 "
                        f"-m {MEM_MIB}M -nodefaults -display none -serial stdio -no-reboot "
                        f"-kernel {kernel} -initrd {{initrd}} -append '{CMDLINE}'"))
    return out


def main():
    ap = argparse.ArgumentParser(description="faultvisor vs QEMU boot benchmark")
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    mode = lab.mode()
    if mode == "unavailable":
        sys.exit("bench: " + lab.unavailable_reason())
    nested = mode == "nested"
    import tempfile
    tmp = tempfile.mkdtemp(prefix="fv-bench-")
    measure = os.path.join(tmp, "measure.sh")
    with open(measure, "w") as f:
        f.write(MEASURE)
    os.chmod(measure, 0o755)
    extra = {"measure.sh": measure}
    if nested:
        extra.update(qemu_bundle(tmp))
    specs = jobs(args.iterations, nested)
    if nested:
        lab_jobs = [lab.Job(n, [], timeout=180) for n, *_ in specs]
        # The job's "args" go straight to the shell: wrap them with measure.sh.
        for j, (_, _, _, cmd) in zip(lab_jobs, specs):
            j.raw = f"/lab/measure.sh {MEM_MIB} {cmd}"
        results = lab.run_jobs(lab_jobs, extra_files=extra)
    else:
        gdir = lab.guest_dir()
        vmm = lab.build_vmm(static=False)
        results = {}
        for n, _, _, cmd in specs:
            cmd = cmd.format(
                vmm=vmm, kernel=f"{gdir}/vmlinux", bzimage=f"{gdir}/bzImage",
                initrd=f"{gdir}/initramfs.cpio")
            p = subprocess.run(["sh", measure, str(MEM_MIB), "sh", "-c", cmd],
                               capture_output=True, text=True, timeout=300)
            results[n] = lab.JobResult(n, p.returncode, p.stdout, None, p.stdout.splitlines())
    rows = {}
    for n, vmm, fmt, _ in specs:
        r = results.get(n)
        text = r.output if r else ""
        m = re.search(r"BENCH rc=(\d+) t0=([\d.]+) init=([\d.]*) rss_kib=(\d*)", text)
        if not m or not m.group(3):
            print(f"{n}: no measurement (see target/lab-logs)", file=sys.stderr)
            continue
        init_ms = (float(m.group(3)) - float(m.group(2))) * 1000
        rss = int(m.group(4) or 0)
        k = re.search(r"first KVM_RUN (\d+) us", text)
        first = int(k.group(1)) / 1000 if k else None
        rows.setdefault((vmm, fmt), []).append((init_ms, rss, first))
    print(f"\nmode: {mode}; {args.iterations} iteration(s); guest {MEM_MIB} MiB, 1 vCPU")
    print(f"{'VMM':<11} {'kernel':<8} {'time to init (ms)':>18} {'RSS outside guest (MiB)':>24} "
          f"{'first KVM_RUN (ms)':>19}")
    med = {}
    for (vmm, fmt), vals in sorted(rows.items()):
        t = statistics.median(v[0] for v in vals)
        r = statistics.median(v[1] for v in vals) / 1024
        f = [v[2] for v in vals if v[2] is not None]
        fs = f"{statistics.median(f):.1f}" if f else "-"
        med[(vmm, fmt)] = (t, r)
        print(f"{vmm:<11} {fmt:<8} {t:>18.0f} {r:>24.1f} {fs:>19}")
    for fmt in ("vmlinux", "bzImage"):
        a, b = med.get(("faultvisor", fmt)), med.get(("qemu", fmt))
        if a and b:
            print(f"ratio faultvisor/qemu ({fmt}): time to init {a[0] / b[0]:.2f}x, "
                  f"RSS outside guest {a[1] / b[1]:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
