#!/usr/bin/env python3
"""kvm-unit-tests on faultvisor and on QEMU, side by side.

Builds the suite from ../shared/peers (or $KUT_TARBALL) into target/, then runs
the tests with the suite's own runner, unmodified: `run_tests.sh TEST` once with
QEMU=<Debian's qemu-system-x86_64> and once with QEMU=<faultvisor's launcher>
(a symlink named qemu-system-x86_64 to the faultvisor binary). Prints a table
(test x VMM: PASS / FAIL / SKIP with reason, seconds), the counts, the tests
QEMU passes and faultvisor does not, and the wall-time ratio.

  ci/kvm_unit_tests.py [--set device-model|lab|all|T1,T2] [--vmm both|faultvisor|qemu]
                       [-j N] [--timeout 30s] [--check] [--json FILE]
  ci/kvm_unit_tests.py --lab [--set lab] [--check]

--lab runs the tests in the nested lab's real KVM (ci/lab.py). Its L1 has no
bash and no QEMU, so the runner cannot run there: the QEMU command line the
runner would build (x86/run plus the test's unittests.cfg entry) is built here
and handed to `faultvisor qemu` inside L1; results are compared with the
reference QEMU results in the baseline file. Where this host's KVM is hardware,
--lab runs on the host like the default mode.

--check compares faultvisor's results with resources/kvm-unit-tests/expected.txt
and exits 1 when a test recorded there as PASS does not pass (a regression).
"""

import argparse
import concurrent.futures
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ci"))
import lab  # noqa: E402

EXPECTED = os.path.join(ROOT, "resources", "kvm-unit-tests", "expected.txt")
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# What the issue calls the device-model set: the tests that exercise the IOAPIC,
# the local APIC through KVM, SMP bring-up, the VT-d unit, MSRs and exits.
VMEXIT = ["vmexit_cpuid", "vmexit_vmcall", "vmexit_mov_from_cr8", "vmexit_mov_to_cr8",
          "vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_ipi_halt", "vmexit_ple_round_robin",
          "vmexit_tscdeadline", "vmexit_tscdeadline_immed", "vmexit_cr0_wp",
          "vmexit_cr4_pge"]
DEVICE_MODEL = ["ioapic", "x2apic", "xapic", "smptest", "smptest3", "intel_iommu",
                "msr", *VMEXIT]
# The host's reference list (QEMU passes these on this machine's software KVM) on top.
HOST = DEVICE_MODEL + ["idt_test", "realmode", "s3", "setjmp", "rmap_chain"]
# QEMU's passes in the nested lab (the reference), run on faultvisor there.
LAB = ["ioapic", "smptest", "smptest3", "intel_iommu", "idt_test", "setjmp", "realmode",
       "s3", "rmap_chain", "tsc", "tsc_adjust", "hypercall", "vmexit_cpuid", "vmexit_ipi",
       "vmexit_tscdeadline", "sieve"]


def log(msg):
    print(f"[kut] {msg}", file=sys.stderr, flush=True)


def tarball():
    t = os.environ.get("KUT_TARBALL")
    if t:
        return t
    found = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "peers",
                                          "kvm-unit-tests-*.tar.gz")))
    return found[-1] if found else None


def build_suite(tb):
    """Extracts and builds the suite once per tarball; returns its directory."""
    with open(tb, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    base = os.path.join(ROOT, "target", "kvm-unit-tests", digest)
    stamp = os.path.join(base, ".built")
    if os.path.exists(stamp):
        return os.path.join(base, "kvm-unit-tests")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    log(f"building the suite from {tb}")
    subprocess.run(["tar", "-xzf", tb, "-C", base], check=True)
    tops = [d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))]
    if len(tops) != 1:
        sys.exit(f"kvm_unit_tests: unexpected tarball layout in {tb}")
    src = os.path.join(base, tops[0])
    if tops[0] != "kvm-unit-tests":
        os.rename(src, os.path.join(base, "kvm-unit-tests"))
        src = os.path.join(base, "kvm-unit-tests")
    subprocess.run(["./configure"], cwd=src, check=True, stdout=sys.stderr)
    subprocess.run(["make", f"-j{os.cpu_count() or 2}"], cwd=src, check=True,
                   stdout=sys.stderr)
    open(stamp, "w").close()
    return src


def parse_cfg(suite):
    """x86/unittests.cfg as {name: {key: value}} in file order."""
    tests, cur = {}, None
    with open(os.path.join(suite, "x86", "unittests.cfg")) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.match(r"^\[(.+)\]$", line.strip())
            if m:
                cur = tests.setdefault(m.group(1), {})
                continue
            if cur is not None and "=" in line:
                k, v = line.split("=", 1)
                cur[k.strip()] = v.strip()
    return tests


def select(spec, cfg, where):
    if spec is None:
        spec = "lab" if where == "lab" else "host"
    if spec == "device-model":
        names = DEVICE_MODEL
    elif spec == "host":
        names = HOST
    elif spec == "lab":
        names = LAB
    elif spec == "all":
        names = [n for n, c in cfg.items() if c.get("arch", "x86_64") == "x86_64"]
    else:
        names = [n for n in spec.split(",") if n]
    unknown = [n for n in names if n not in cfg]
    if unknown:
        sys.exit(f"kvm_unit_tests: unknown test(s): {', '.join(unknown)}")
    return names


def launcher(vmm):
    d = os.path.join(ROOT, "target", "kvm-unit-tests", "launcher")
    os.makedirs(d, exist_ok=True)
    link = os.path.join(d, "qemu-system-x86_64")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(vmm), link)
    return link


def parse_result(out):
    """The runner's result line: (status, detail)."""
    for line in ANSI.sub("", out).splitlines():
        m = re.match(r"^(PASS|FAIL|SKIP) (\S+) ?(.*)$", line)
        if m:
            return m.group(1), m.group(3).strip().strip("()")
    return "FAIL", "no result line from run_tests.sh"


def run_host_one(suite, test, vmm_name, qemu, timeout, logroot):
    env = dict(os.environ, QEMU=qemu, TIMEOUT=timeout, ACCEL="kvm",
               unittest_log_dir=os.path.join(logroot, vmm_name, test))
    os.makedirs(os.path.join(logroot, vmm_name), exist_ok=True)
    t0 = time.monotonic()
    p = subprocess.run(["./run_tests.sh", test], cwd=suite, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    secs = time.monotonic() - t0
    status, detail = parse_result(p.stdout)
    return test, vmm_name, status, detail, secs


def run_host(suite, tests, vmms, jobs, timeout):
    logroot = os.path.join(ROOT, "target", "kvm-unit-tests", "logs")
    shutil.rmtree(logroot, ignore_errors=True)
    results = {t: {} for t in tests}
    work = [(t, name, path) for t in tests for name, path in vmms]
    log(f"running {len(tests)} test(s) on {', '.join(n for n, _ in vmms)} "
        f"({jobs} at a time, TIMEOUT={timeout}; logs in {logroot})")
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = [ex.submit(run_host_one, suite, t, n, p, timeout, logroot)
                for t, n, p in work]
        for f in concurrent.futures.as_completed(futs):
            t, n, status, detail, secs = f.result()
            results[t][n] = (status, detail, secs)
            log(f"{status} {t} on {n} in {secs:.1f}s {detail}")
    return results


STRICT = "intel_iommu/ioapic-sid=strict"


def run_strict(suite, fv):
    """intel_iommu with faultvisor's default, hardware-strict source-ID check of IOAPIC
    messages (the launcher relaxes it as QEMU does): the suite's IOAPIC IRTE names
    edu's source ID, so its interrupt must be blocked (an interrupt-remapping fault,
    reason 0x26) and the IOAPIC subtest must not pass."""
    tmp = tempfile.mkdtemp(prefix="fv-kut-")
    sock = os.path.join(tmp, "api.sock")
    cmd = [fv, "--log-level", "error", "run", "--kernel",
           os.path.join(suite, "x86", "intel-iommu.flat"), "--vcpus", "4", "--memory", "512M",
           "--device", "pc-testdev", "--device", "edu", "--iommu", "intel,intremap=on,eim=off",
           "--api-socket", sock, "--serial", "stdio"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    blocked, status, detail = 0, "FAIL", "no interrupt-remapping fault within 20s"
    try:
        while time.monotonic() - t0 < 20 and p.poll() is None:
            time.sleep(0.5)
            q = subprocess.run([fv, "stats", "--api-socket", sock, "--json"],
                               capture_output=True, text=True)
            if q.returncode != 0:
                continue
            try:
                ir = json.loads(q.stdout)["vtd"]["interrupt_remapping"]
            except (ValueError, KeyError, TypeError):
                continue
            blocked = ir.get("blocked", 0)
            if blocked:
                break
    finally:
        p.kill()
        out = p.communicate()[0].decode(errors="replace")
        shutil.rmtree(tmp, ignore_errors=True)
    ioapic_passed = any("IR IOAPIC" in line for line in re.findall(r"^PASS:.*$", out, re.M))
    if blocked and not ioapic_passed:
        status, detail = "PASS", f"IOAPIC interrupt blocked by source-ID verification ({blocked})"
    elif blocked:
        detail = "the IOAPIC subtest passed under the strict check"
    return status, detail, time.monotonic() - t0


def qemu_args(suite, entry, flat_dir):
    """The QEMU command line x86/run builds for a unittests.cfg entry (the -initrd
    environment file aside: the tests read their defaults without it)."""
    smp = entry.get("smp", "1")
    if not smp.isdigit():
        smp = "1"
    args = ["-nodefaults", "-device", "pc-testdev", "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
            "-machine", "accel=kvm", "-kernel", f"{flat_dir}/{entry['file']}", "-smp", smp]
    args += shlex.split(entry.get("qemu_params", entry.get("extra_params", "")))
    targs = shlex.split(entry.get("test_args", ""))
    if targs:
        args += ["-append", " ".join(targs)]
    return args


def classify(rc, out):
    """A lab run's result from the launcher's exit code and output, as the runner
    would judge it (exit code 1 is the suite's success: debug-exit (0 << 1) | 1)."""
    text = ANSI.sub("", out)
    m = re.search(r"faultvisor cannot honour (.*)", text)
    if m:
        return "SKIP", m.group(1).strip()
    summary = re.search(r"SUMMARY: (.*)", text)
    detail = summary.group(1).strip() if summary else ""
    if rc is None or rc == 137:
        return "FAIL", "timeout"
    if rc == 1 and "FAIL:" not in text:
        return "PASS", detail
    if rc == 1 and detail:
        # The test passed apart from expected (XFAIL) failures the runner accepts.
        if "unexpected failures" not in detail:
            return "PASS", detail
    if re.search(r"^SKIP:", text, re.M) and "FAIL:" not in text:
        return "SKIP", detail or "the test skipped itself"
    return "FAIL", detail or f"exit code {rc}"


def run_lab(suite, tests, cfg, timeout):
    secs = int(re.sub(r"\D", "", timeout) or 60)
    files, jobs = {}, []
    for t in tests:
        e = cfg[t]
        files[e["file"]] = os.path.join(suite, "x86", e["file"])
        limit = max(secs, int(re.sub(r"\D", "", e.get("timeout", "0")) or 0))
        args = qemu_args(suite, e, "/lab")
        jobs.append(lab.Job(t, [], timeout=limit + 10,
                            raw="/lab/faultvisor qemu " + shlex.join(args)))
    res = lab.run_jobs(jobs, extra_files=files)
    results = {}
    for t in tests:
        r = res.get(t)
        if r is None:
            results[t] = {"faultvisor": ("FAIL", "the lab did not run it", 0.0)}
            continue
        status, detail = classify(r.rc, r.output)
        results[t] = {"faultvisor": (status, detail, r.seconds or 0.0)}
        log(f"{status} {t} in the lab in {r.seconds or 0:.1f}s {detail}")
    return results


def load_expected(where):
    """{test: (faultvisor, qemu, note)} for `where` (host or lab)."""
    out = {}
    if not os.path.exists(EXPECTED):
        return out
    with open(EXPECTED) as f:
        for line in f:
            line = line.split("#", 1)[0].rstrip() if not line.startswith("#") else ""
            if not line.strip():
                continue
            parts = line.split(None, 4)
            if len(parts) < 4:
                continue
            w, test, fv, qemu = parts[:4]
            if w == where:
                out[test] = (fv, qemu, parts[4] if len(parts) > 4 else "")
    return out


def table(results, vmms, expected):
    cols = [n for n, _ in vmms]
    ref = "qemu" not in cols and expected
    head = ["test", *cols] + (["qemu (reference)"] if ref else [])
    rows = []
    for t, r in results.items():
        row = [t]
        for c in cols:
            s = r.get(c)
            row.append("-" if s is None else
                       f"{s[0]} {s[2]:.1f}s" + (f" ({s[1]})" if s[1] else ""))
        if ref:
            row.append(expected.get(t, ("", "?", ""))[1])
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", help="device-model, host (default), lab, all, or T1,T2,...")
    ap.add_argument("--vmm", default="both", choices=["both", "faultvisor", "qemu"])
    ap.add_argument("-j", type=int, default=2, help="tests at a time (host mode)")
    ap.add_argument("--timeout", default="30s", help="per-test TIMEOUT for the runner")
    ap.add_argument("--lab", action="store_true", help="run in the nested lab's real KVM")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a test the baseline records as PASS does not pass")
    ap.add_argument("--faultvisor", help="faultvisor binary (default: build it)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if a.j < 1:
        sys.exit("kvm_unit_tests: -j must be at least 1")
    if not re.fullmatch(r"\d+[smh]?", a.timeout):
        sys.exit(f"kvm_unit_tests: --timeout {a.timeout}: expected N, Ns, Nm or Nh")
    where = "lab" if a.lab and lab.mode() == "nested" else "host"
    if a.lab and lab.mode() == "unavailable":
        sys.exit("kvm_unit_tests: " + lab.unavailable_reason())
    if where == "host" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("=" * 70 + "\nSKIP: kvm-unit-tests need /dev/kvm, which this machine "
              "lacks\n" + "=" * 70, flush=True)
        return 0 if not a.check else 2
    tb = tarball()
    if tb is None:
        print("=" * 70 + "\nSKIP: no kvm-unit-tests tarball (../shared/peers/"
              "kvm-unit-tests-*.tar.gz; set KUT_TARBALL)\n" + "=" * 70, flush=True)
        return 0
    suite = build_suite(tb)
    cfg = parse_cfg(suite)
    tests = select(a.set, cfg, where)
    expected = load_expected(where)
    t0 = time.monotonic()
    if where == "lab":
        vmms = [("faultvisor", None)]
        results = run_lab(suite, tests, cfg, a.timeout)
    else:
        vmms = []
        if a.vmm in ("both", "qemu"):
            q = shutil.which("qemu-system-x86_64")
            if q is None:
                sys.exit("kvm_unit_tests: no qemu-system-x86_64 (apt-get install "
                         "qemu-system-x86), or run with --vmm faultvisor")
            vmms.append(("qemu", q))
        if a.vmm in ("both", "faultvisor"):
            fv = a.faultvisor or lab.build_vmm(static=False)
            vmms.append(("faultvisor", launcher(fv)))
        results = run_host(suite, tests, vmms, a.j, a.timeout)
        if "intel_iommu" in tests and a.vmm in ("both", "faultvisor"):
            st = run_strict(suite, fv)
            log(f"{st[0]} {STRICT} on faultvisor in {st[2]:.1f}s {st[1]}")
            results[STRICT] = {"faultvisor": st}
    wall = time.monotonic() - t0

    kvm = "the nested lab's real KVM (kvm-amd in QEMU TCG)" if where == "lab" else (
        "this host's software KVM (kvm_pvm)" if os.path.exists("/sys/module/kvm_pvm")
        else "this host's KVM")
    print(f"\nkvm-unit-tests ({os.path.basename(tb)}) on {kvm}, "
          f"TIMEOUT={a.timeout}\n")
    print(table(results, vmms, expected))
    print()
    for n, _ in vmms:
        c = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        total = 0.0
        for r in results.values():
            if n in r:
                c[r[n][0]] += 1
                total += r[n][2]
        print(f"{n}: {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP; "
              f"sum of test times {total:.1f}s")
    names = [n for n, _ in vmms]
    if "qemu" in names and "faultvisor" in names:
        both = {t: r for t, r in results.items() if "qemu" in r and "faultvisor" in r}
        gap = [t for t, r in both.items()
               if r["qemu"][0] == "PASS" and r["faultvisor"][0] != "PASS"]
        extra = [t for t, r in both.items()
                 if r["faultvisor"][0] == "PASS" and r["qemu"][0] != "PASS"]
        tq = sum(r["qemu"][2] for r in both.values())
        tf = sum(r["faultvisor"][2] for r in both.values())
        print(f"QEMU passes, faultvisor does not: {', '.join(gap) or 'none'}")
        print(f"faultvisor passes, QEMU does not: {', '.join(extra) or 'none'}")
        if tq > 0:
            print(f"wall time faultvisor / QEMU: {tf:.1f}s / {tq:.1f}s = {tf / tq:.2f}")
        # Timeouts cost both VMMs the same TIMEOUT: the ratio of the tests both finished.
        done = [r for r in both.values()
                if not any("timeout" in r[n][1] for n in ("qemu", "faultvisor"))]
        dq = sum(r["qemu"][2] for r in done)
        df = sum(r["faultvisor"][2] for r in done)
        if dq > 0:
            print(f"wall time of the {len(done)} tests neither timed out: "
                  f"faultvisor / QEMU: {df:.1f}s / {dq:.1f}s = {df / dq:.2f}")
    elif where == "lab" and expected:
        gap = [t for t in results if expected.get(t, ("", "", ""))[1] == "PASS"
               and results[t]["faultvisor"][0] != "PASS"]
        print(f"QEMU passes (reference), faultvisor does not: {', '.join(gap) or 'none'}")
    print(f"whole run: {wall:.1f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"where": where, "timeout": a.timeout, "results": {
                t: {n: {"status": s[0], "detail": s[1], "seconds": round(s[2], 2)}
                    for n, s in r.items()} for t, r in results.items()}}, f, indent=1)
    if a.check:
        if "faultvisor" not in names:
            sys.exit("kvm_unit_tests: --check needs faultvisor in the run")
        bad = [t for t, r in results.items()
               if expected.get(t, ("",))[0] == "PASS" and r["faultvisor"][0] != "PASS"]
        better = [t for t, r in results.items()
                  if r["faultvisor"][0] == "PASS" and expected.get(t, ("",))[0] != "PASS"]
        # A test the baseline expects but the selection did not run is not checked.
        missing = [t for t in results if t not in expected]
        if missing:
            print(f"not in the baseline ({EXPECTED}): {', '.join(missing)}")
        if better:
            print(f"now passing (record them in the baseline): {', '.join(better)}")
        if bad:
            print(f"REGRESSION: faultvisor no longer passes: {', '.join(bad)}")
            return 1
        print("no regression against the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
