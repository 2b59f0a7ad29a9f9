#!/usr/bin/env python3
"""Boot benchmark: faultvisor vs Debian's QEMU, same kernel and initrd, same lab, one run.

For each VMM and kernel format it measures, from inside the machine that runs the VMM
(the nested lab's L1 VM on a kvm_pvm host, the host itself on hardware KVM):
  - time from spawning the VMM to the guest init's marker line (FAULTVISOR-INIT);
  - the VMM's RSS outside guest memory (all mappings but the guest-RAM one, sampled
    while the guest sits at init);
  - KVM's own statistics for the VM at that moment (debugfs, /sys/kernel/debug/kvm/
    PID-FD/: exits by reason, page faults, the guest-RAM mapping's page sizes), so from
    VM creation to init;
and for faultvisor its own "first KVM_RUN N us after VMM start" log line.
QEMU runs as `-accel kvm -M q35,kernel-irqchip=split -kernel ... -initrd ...`.

  python3 ci/bench_boot.py [--iterations N] [--vcpus 1,2] [--formats vmlinux,bzImage]
Prints tables and the ratios; copy them into BENCHMARKS.md.
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
[ -d /sys/kernel/debug/kvm ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null
t0=$(cut -d' ' -f1 /proc/uptime)
"$@" > $out 2>&1 &
pid=$!
init=""; rss=""
while kill -0 $pid 2>/dev/null; do
    if [ -z "$init" ] && grep -q FAULTVISOR-INIT $out; then
        init=$(cut -d' ' -f1 /proc/uptime)
        rss=0; size=0; inram=0
        # faultvisor logs where guest RAM is (the kernel and initrd are mappings of
        # their own inside it); QEMU's is the one mapping of exactly its size.
        base=$(grep -o 'guest RAM 0x0+0x[0-9a-f]* at host 0x[0-9a-f]*' $out | head -1 |
               sed 's/.*at host 0x//')
        while read -r a b _; do
            case "$a" in
                Rss:) [ "$size" != "$mem_kib" ] && [ $inram = 0 ] && rss=$((rss + b)) ;;
                *-*) lo=${a%-*}; hi=${a#*-}; size=0; inram=0
                     # Skip the vsyscall page (addresses too large for sh arithmetic).
                     [ ${#hi} -le 12 ] && size=$(( (0x$hi - 0x$lo) / 1024 ))
                     [ -n "$base" ] && [ ${#hi} -le 12 ] &&
                         [ $((0x$lo)) -ge $((0x$base)) ] &&
                         [ $((0x$hi)) -le $((0x$base + mem_kib * 1024)) ] && inram=1 ;;
            esac
        done < /proc/$pid/smaps
        # KVM's statistics of this process's VM (vCPU counters summed over vCPUs).
        for d in /sys/kernel/debug/kvm/$pid-*; do
            [ -d "$d" ] || continue
            for f in "$d"/*; do
                [ -f "$f" ] && echo "KVMSTAT ${f##*/} $(cat "$f" 2>/dev/null)" >> $out.stats
            done
        done
    fi
    usleep 5000
done
wait $pid
rc=$?
cat $out
[ -f $out.stats ] && cat $out.stats
rm -f $out $out.stats
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


# KVM statistics shown, and the exits that reach the VMM (userspace).
STATS = ("exits", "halt_exits", "irq_exits", "io_exits", "mmio_exits", "request_irq_exits",
         "signal_exits", "irq_window_exits", "insn_emulation", "hypercalls", "pf_taken",
         "pf_fixed", "pf_emulate", "pf_mmio_spte_created", "irq_injections",
         "pages_4k", "pages_2m", "pages_1g")
USERSPACE = ("io_exits", "mmio_exits", "request_irq_exits", "signal_exits")


def jobs(iterations, nested, vcpus=(1,), formats=("vmlinux", "bzImage"), loads=("copy",)):
    fv = "/lab/faultvisor" if nested else "{vmm}"
    q = ("/lab/qemu/lib/ld.so --library-path /lab/qemu/lib /lab/qemu/qemu-system-x86_64 "
         "-L /lab/qemu/share") if nested else "qemu-system-x86_64"
    kernels = {"vmlinux": "{kernel}", "bzImage": "{bzimage}"}
    out = []
    for i in range(iterations):
        for n in vcpus:
            for fmt in formats:
                kernel = kernels[fmt]
                for load in loads:
                    name = "faultvisor" if load == "copy" else f"faultvisor-{load}"
                    out.append((f"{name}-{fmt}-{n}cpu-{i}", name, fmt, n,
                                f"{fv} run --kernel {kernel} --initrd {{initrd}} --vcpus {n} "
                                f"--memory {MEM_MIB}M --load {load} --log-level debug "
                                f"--cmdline '{CMDLINE}'"))
                out.append((f"qemu-{fmt}-{n}cpu-{i}", "qemu", fmt, n,
                            f"{q} -accel kvm -M q35,kernel-irqchip=split -cpu host -smp {n} "
                            f"-m {MEM_MIB}M -nodefaults -display none -serial stdio "
                            f"-no-reboot -kernel {kernel} -initrd {{initrd}} "
                            f"-append '{CMDLINE}'"))
    return out


def kvm_stats(text):
    """KVMSTAT lines of a measurement: {name: value} (first value of each)."""
    stats = {}
    for m in re.finditer(r"^KVMSTAT (\S+) (\d+)", text, re.M):
        stats[m.group(1)] = int(m.group(2))
    return stats


def main():
    ap = argparse.ArgumentParser(description="faultvisor vs QEMU boot benchmark")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--vcpus", default="1,2", help="vCPU counts, e.g. 1,2")
    ap.add_argument("--formats", default="vmlinux,bzImage", help="kernel formats")
    ap.add_argument("--loads", default="copy,map",
                    help="faultvisor's --load modes (map: kernel and initrd mapped from "
                         "their files; copy: read into guest RAM)")
    args = ap.parse_args()
    try:
        vcpus = tuple(int(v) for v in args.vcpus.split(","))
    except ValueError:
        sys.exit(f"bench: --vcpus {args.vcpus}: expected numbers like 1,2")
    formats = tuple(args.formats.split(","))
    loads = tuple(args.loads.split(","))
    if any(m not in ("map", "copy") for m in loads):
        sys.exit(f"bench: --loads {args.loads}: expected map and/or copy")
    if any(f not in ("vmlinux", "bzImage") for f in formats):
        sys.exit(f"bench: --formats {args.formats}: expected vmlinux and/or bzImage")
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
    specs = jobs(args.iterations, nested, vcpus, formats, loads)
    fvs = ["faultvisor" if m == "copy" else f"faultvisor-{m}" for m in loads]
    if nested:
        lab_jobs = [lab.Job(n, [], timeout=180) for n, *_ in specs]
        # The job's "args" go straight to the shell: wrap them with measure.sh.
        for j, (_, _, _, _, cmd) in zip(lab_jobs, specs):
            j.raw = f"/lab/measure.sh {MEM_MIB} {cmd}"
        results = lab.run_jobs(lab_jobs, extra_files=extra)
    else:
        gdir = lab.guest_dir()
        vmm = lab.build_vmm(static=False)
        results = {}
        for n, _, _, _, cmd in specs:
            cmd = cmd.format(
                vmm=vmm, kernel=f"{gdir}/vmlinux", bzimage=f"{gdir}/bzImage",
                initrd=f"{gdir}/initramfs.cpio")
            p = subprocess.run(["sh", measure, str(MEM_MIB), "sh", "-c", cmd],
                               capture_output=True, text=True, timeout=300)
            results[n] = lab.JobResult(n, p.returncode, p.stdout, None, p.stdout.splitlines())
    rows = {}
    for n, vmm, fmt, ncpu, _ in specs:
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
        rows.setdefault((vmm, fmt, ncpu), []).append((init_ms, rss, first, kvm_stats(text)))
    print(f"\nmode: {mode}; {args.iterations} iteration(s); guest {MEM_MIB} MiB")
    print(f"{'VMM':<16} {'kernel':<8} {'vCPUs':>5} {'time to init (ms)':>18} "
          f"{'RSS outside guest (MiB)':>24} {'first KVM_RUN (ms)':>19}")
    med = {}
    for key, vals in sorted(rows.items()):
        vmm, fmt, ncpu = key
        t = statistics.median(v[0] for v in vals)
        r = statistics.median(v[1] for v in vals) / 1024
        f = [v[2] for v in vals if v[2] is not None]
        fs = f"{statistics.median(f):.1f}" if f else "-"
        st = {}
        for name in STATS:
            got = [v[3][name] for v in vals if name in v[3]]
            if got:
                st[name] = statistics.median(got)
        med[key] = (t, r, st)
        print(f"{vmm:<16} {fmt:<8} {ncpu:>5} {t:>18.0f} {r:>24.1f} {fs:>19}")
    for fv in fvs:
        for fmt in formats:
            for ncpu in vcpus:
                a, b = med.get((fv, fmt, ncpu)), med.get(("qemu", fmt, ncpu))
                if a and b:
                    print(f"ratio {fv}/qemu ({fmt}, {ncpu} vCPU): time to init "
                          f"{a[0] / b[0]:.2f}x, RSS outside guest {a[1] / b[1]:.2f}x")
    # Exits by reason, counted by KVM (medians), from VM creation to init.
    have = [k for k in sorted(med) if med[k][2]]
    if not have:
        print("\nno KVM statistics (debugfs unavailable?)")
    else:
        print("\nKVM statistics at init (medians; vCPU counters summed over vCPUs)")
        print(f"| statistic | " + " | ".join(f"{v} {f} {n}cpu" for v, f, n in have) + " |")
        print("|---|" + "---:|" * len(have))
        rows_out = list(STATS) + ["userspace exits"]
        for name in rows_out:
            cells = []
            for k in have:
                st = med[k][2]
                if name == "userspace exits":
                    val = sum(st.get(u, 0) for u in USERSPACE)
                else:
                    val = st.get(name)
                cells.append("–" if val is None else f"{val:.0f}")
            print(f"| {name} | " + " | ".join(cells) + " |")
        for fv, fmt, ncpu in ((f, m, n) for f in fvs for m in formats for n in vcpus):
            a, b = med.get((fv, fmt, ncpu)), med.get(("qemu", fmt, ncpu))
            if not (a and b and a[2] and b[2]):
                continue
            ua = sum(a[2].get(u, 0) for u in USERSPACE)
            ub = sum(b[2].get(u, 0) for u in USERSPACE)
            ea, eb = a[2].get("exits", 0), b[2].get("exits", 0)
            pa, pb = a[2].get("pf_taken", 0), b[2].get("pf_taken", 0)
            print(f"exits {fv}/qemu ({fmt}, {ncpu} vCPU): all {ea / max(eb, 1):.2f}x, "
                  f"userspace {ua / max(ub, 1):.2f}x, page faults {pa / max(pb, 1):.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
