#!/usr/bin/env python3
"""The nested lab: runs faultvisor where a stock Linux guest can boot.

On a host whose /dev/kvm is a hardware KVM, faultvisor runs directly. On a host
whose KVM cannot run Linux (the software `kvm_pvm`, or no KVM at all), the lab
boots an L1 VM with Debian's QEMU under TCG emulating an AMD EPYC with SVM and
NPT; the L1 kernel loads kvm-amd, which gives a working /dev/kvm, and a
statically linked faultvisor runs inside it. Each job is one faultvisor process
(one VM); one L1 boot runs many jobs in sequence. The L2 console streams back
through L1's serial port and is split per job.

Library use (tests/linux): run_jobs([Job(...), ...]) -> {name: JobResult}.
Command line:
  ci/lab.py boot [faultvisor run options]   boot one VM, console on stdout
  ci/lab.py mode                            print direct|nested|unavailable
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "resources", "guest"))
from cpio import CpioWriter  # noqa: E402

TARGET = "x86_64-unknown-linux-gnu"
L1_MEMORY = "3072"
# L1's CPUs and QEMU's accelerator options, for experiments. One CPU is the setting
# that works: with two, Debian's QEMU 7.2 under multi-threaded TCG crashed L1 (nested
# page faults recursing in L1's kernel) and round-robin TCG left L2 guests stalled.
# One CPU has its own failure, about once in 20-50 boots of a 2-vCPU L2 guest: L2 spins
# on a lock its other vCPU holds, and L1's timer interrupt stays pending in its APIC
# (seen in `info lapic`) without ending L2's run, so L1 never gets its CPU back. The
# watchdog below sees that through QEMU's monitor, and run_jobs reruns the unfinished
# jobs in a fresh L1 (at most L1_BOOTS boots in all).
L1_CPUS = os.environ.get("FV_LAB_CPUS", "1")
L1_ACCEL = os.environ.get("FV_LAB_ACCEL", "tcg")
# How many L1 boots a set of jobs may take when L1 wedges.
L1_BOOTS = 4
L1_CMDLINE = "console=ttyS0 quiet panic=-1 loglevel=3"
BEGIN = "@@LAB-BEGIN "
END = "@@LAB-END "


def log(msg):
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


@dataclass
class Job:
    """One faultvisor run. `args` are `faultvisor run` options; the strings
    {kernel}, {bzimage}, {initrd} and {rootfs} are replaced by the default guest's
    files, {probe} by the probe guest embedded in faultvisor."""
    name: str
    args: list
    timeout: int = 240
    # A raw shell command (nested lab only) run instead of `faultvisor run args`.
    raw: str = None
    # The host's standard input reaches the guest's console (nested lab: through L1's
    # serial port to faultvisor's stdin, which faultvisor puts in raw mode).
    interactive: bool = False


@dataclass
class JobResult:
    name: str
    rc: int = None
    output: str = ""
    seconds: float = None
    lines: list = field(default_factory=list)


def mode():
    """direct (hardware KVM here), nested (QEMU TCG lab) or unavailable."""
    if os.environ.get("FAULTVISOR_LAB") in ("direct", "nested"):
        return os.environ["FAULTVISOR_LAB"]
    if os.path.exists("/dev/kvm") and not os.path.exists("/sys/module/kvm_pvm"):
        return "direct"
    if shutil.which("qemu-system-x86_64"):
        return "nested"
    return "unavailable"


def unavailable_reason():
    return ("no hardware KVM and no qemu-system-x86_64 for the nested lab "
            "(install it with: apt-get install qemu-system-x86)")


def guest_dir():
    """Builds (idempotently) and returns the default guest directory."""
    script = os.path.join(ROOT, "resources", "guest", "build.py")
    subprocess.run([sys.executable, script], check=True, stdout=sys.stderr)
    out = subprocess.run([sys.executable, script, "--print-dir"], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def build_vmm(static):
    """Builds faultvisor (statically linked for the lab) and returns its path."""
    env = dict(os.environ)
    cmd = ["cargo", "build", "--release", "--bin", "faultvisor"]
    if static:
        # Static and not position-independent: at a fixed address, L1's TCG finds the
        # code it translated for the previous faultvisor process again (a PIE lands
        # elsewhere each time and is translated anew): start to first KVM_RUN 33 ms
        # median instead of 124-176 ms in the lab (BENCHMARKS.md). Release builds for
        # hosts stay PIE.
        flags = " -C target-feature=+crt-static -C relocation-model=static"
        env["RUSTFLAGS"] = (env.get("RUSTFLAGS", "") + flags).strip()
        env["CARGO_TARGET_DIR"] = os.path.join(ROOT, "target", "lab")
        cmd += ["--target", TARGET]
        path = os.path.join(ROOT, "target", "lab", TARGET, "release", "faultvisor")
    else:
        path = os.path.join(env.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                            "release", "faultvisor")
    log("building faultvisor" + (" (static, for the nested lab)" if static else ""))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=sys.stderr)
    return path


def write_probe(vmm, dest):
    """Extracts the probe guest embedded in the faultvisor binary `vmm`."""
    subprocess.run([vmm, "demo", "--write-probe", dest], check=True,
                   stdout=subprocess.DEVNULL)
    return dest


def _subst(args, files):
    return [a.format(**files) for a in args]


def _run_direct(jobs, echo):
    interactive = any(j.interactive for j in jobs)
    gdir = guest_dir()
    vmm = build_vmm(static=False)
    probe_dir = tempfile.mkdtemp(prefix="fv-probe-")
    files = {"kernel": f"{gdir}/vmlinux", "bzimage": f"{gdir}/bzImage",
             "initrd": f"{gdir}/initramfs.cpio", "rootfs": f"{gdir}/rootfs.ext4",
             "probe": write_probe(vmm, os.path.join(probe_dir, "probe.elf"))}
    results = {}
    for job in jobs:
        cmd = [vmm, "run", *_subst(job.args, files)]
        log(f"job {job.name}: {shlex.join(cmd)}")
        t0 = time.monotonic()
        if job.interactive and echo:
            # The console is the terminal itself.
            t0 = time.monotonic()
            try:
                rc, out = subprocess.run(cmd, timeout=job.timeout).returncode, ""
            except subprocess.TimeoutExpired:
                rc, out = None, ""
            results[job.name] = JobResult(job.name, rc, out, time.monotonic() - t0, [])
            continue
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=job.timeout)
            rc, out = p.returncode, p.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            rc, out = None, (e.stdout or b"").decode(errors="replace")
        if echo:
            sys.stdout.write(out)
        results[job.name] = JobResult(job.name, rc, out, time.monotonic() - t0,
                                      out.splitlines())
    return results


def _job_script(jobs, files):
    lines = ["#!/bin/sh", "cd /lab"]
    for job in jobs:
        if job.raw:
            # Its own shell: an `exit` in the command must not end the job script.
            cmd = "sh -c " + shlex.quote(job.raw.format(**files))
        else:
            cmd = shlex.join(["/lab/faultvisor", "run", *_subst(job.args, files)])
        stdin = "/dev/console" if job.interactive else "/dev/null"
        lines += [
            f"echo '{BEGIN}{job.name}'",
            "t0=$(cat /proc/uptime)",
            f"timeout -s KILL {job.timeout} {cmd} <{stdin} 2>&1",
            "rc=$?",
            "t1=$(cat /proc/uptime)",
            f"echo \"{END}{job.name} rc=$rc t0=${{t0%% *}} t1=${{t1%% *}}\"",
        ]
    return "\n".join(lines) + "\n"


_shown = [""]


def _tail_after_partial(line):
    shown, _shown[0] = _shown[0], ""
    return line[len(shown):] if line.startswith(shown) else line


def _chunks(stream, live):
    """Yields (line_bytes, None) for complete lines and, when `live`, (None, text) for
    what arrived of an unfinished line (so prompts show before Enter is pressed)."""
    if not live:
        for raw in stream:
            yield raw, None
        return
    buf = b""
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            if buf:
                yield buf, None
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line + b"\n", None
        if buf and not buf.startswith(b"@@"):
            text = buf.decode(errors="replace")
            new = text[len(_shown[0]):] if text.startswith(_shown[0]) else text
            if new:
                _shown[0] = text
                yield None, new


def _monitor(sock, commands, timeout=3.0):
    """Sends human-monitor commands to L0's QEMU; returns what it answered, without
    the line editor's escape sequences."""
    import socket
    out = b""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        for cmd in commands:
            s.sendall(cmd.encode() + b"\n")
        try:
            # The banner's prompt, then one prompt after each command's answer.
            while out.count(b"(qemu) ") <= len(commands) and len(out) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except OSError:
            pass
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
    return text.replace("\r", "")


def _l1_sample(sock):
    """L1's RIP, halt state and pending APIC interrupts, or None without a monitor."""
    try:
        text = _monitor(sock, ["info registers", "info lapic"])
    except OSError:
        return None
    keep = [ln.strip() for ln in text.splitlines()
            if re.match(r"\s*(RIP=|IRR|ISR|Timer)", ln)]
    return tuple(keep) if keep else None


def _wedged(sample):
    """An interrupt pending in L1's APIC while its CPU runs on: in one sample that is
    normal, the same in samples taken many seconds apart means L1 is wedged."""
    if sample is None:
        return False
    irr = [ln for ln in sample if ln.startswith("IRR")]
    rip = [ln for ln in sample if ln.startswith("RIP=")]
    return bool(irr and rip) and "(none)" not in irr[0] and "HLT=1" not in rip[0]


def _run_nested(jobs, echo, extra_files=None):
    gdir = guest_dir()
    vmm = build_vmm(static=True)
    files = {"kernel": "/lab/vmlinux", "bzimage": "/lab/bzImage",
             "initrd": "/lab/initramfs.cpio", "rootfs": "/lab/rootfs.ext4",
             "probe": "/lab/probe.elf"}
    tmp = tempfile.mkdtemp(prefix="fv-lab-")
    try:
        probe = write_probe(vmm, os.path.join(tmp, "probe.elf"))
        extra = os.path.join(tmp, "extra.cpio")
        w = CpioWriter(extra)
        w.add_file("lab/faultvisor", vmm, 0o755)
        w.add_file("lab/vmlinux", os.path.join(gdir, "vmlinux"), 0o644)
        w.add_file("lab/bzImage", os.path.join(gdir, "bzImage"), 0o644)
        w.add_file("lab/initramfs.cpio", os.path.join(gdir, "initramfs.cpio"), 0o644)
        if any("{rootfs}" in " ".join(j.args) + (j.raw or "") for j in jobs):
            w.add_file("lab/rootfs.ext4", os.path.join(gdir, "rootfs.ext4"), 0o644)
        w.add_file("lab/probe.elf", probe, 0o644)
        for toml in ("linux.toml", "linux-outcomes.toml"):
            w.add_file(f"lab/{toml}", os.path.join(ROOT, "resources", "campaigns", toml), 0o644)
        for name, src in (extra_files or {}).items():
            w.add_file(f"lab/{name}", src, 0o755)
        w.add_bytes("lab/job.sh", _job_script(jobs, files).encode(), 0o755)
        w.close()
        initrd = os.path.join(tmp, "l1.cpio")
        monitor = os.path.join(tmp, "monitor.sock")
        with open(initrd, "wb") as out:
            for part in (os.path.join(gdir, "lab-base.cpio"), extra):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        cmd = ["qemu-system-x86_64", "-accel", L1_ACCEL, "-cpu", "EPYC,+svm,+npt",
               "-smp", L1_CPUS, "-m", L1_MEMORY, "-display", "none", "-serial", "stdio",
               "-monitor", f"unix:{monitor},server,nowait", "-no-reboot", "-nodefaults",
               "-kernel", os.path.join(gdir, "bzImage"), "-initrd", initrd,
               "-append", L1_CMDLINE]
        total = 120 + sum(j.timeout for j in jobs)
        log(f"booting the nested lab (L1: QEMU TCG, EPYC+svm+npt) for {len(jobs)} job(s)")
        t0 = time.monotonic()
        interactive = any(j.interactive for j in jobs)
        p = subprocess.Popen(cmd, stdin=None if interactive else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        results, current, lines = {}, None, []
        kvm_ready = None
        deadline = t0 + total
        # A job that overstays its timeout by far means L1 itself is stuck (its own
        # `timeout` did not fire): end the lab then, rather than wait for the total.
        watch = {"until": t0 + 300.0, "job": "L1 boot"}
        timeouts = {j.name: j.timeout for j in jobs}

        def watchdog():
            # Two signs of a wedged L1: a job far over its own timeout, or the same
            # interrupt pending in L1's APIC at the same RIP for a minute (a working
            # L1 takes it within microseconds).
            same, last, next_sample = 0, None, time.monotonic() + 15
            while p.poll() is None:
                now = time.monotonic()
                why = None
                if now > watch["until"]:
                    why = "far over its timeout"
                elif now > next_sample:
                    next_sample = now + 15
                    sample = _l1_sample(monitor)
                    same = same + 1 if _wedged(sample) and sample == last else 0
                    last = sample
                    if same >= 4:
                        why = "L1's timer interrupt pending for a minute at one RIP: " + \
                            "; ".join(sample)
                if why:
                    log(f"the nested lab is stuck in {watch['job']} ({why}): stopping it")
                    watch["stuck"] = watch["job"]
                    p.kill()
                    return
                time.sleep(2)

        import threading
        threading.Thread(target=watchdog, daemon=True).start()
        logdir = os.path.join(ROOT, "target", "lab-logs")
        os.makedirs(logdir, exist_ok=True)
        logpath = os.path.join(logdir, time.strftime("lab-%Y%m%d-%H%M%S.log"))
        with open(logpath, "w", buffering=1) as logf:
            for raw, partial in _chunks(p.stdout, echo and interactive):
                if partial is not None:
                    # A prompt or keystroke echo without a newline yet: show it now.
                    if current is not None:
                        sys.stdout.write(partial)
                        sys.stdout.flush()
                    else:
                        _shown[0] = ""
                    continue
                line = raw.decode(errors="replace").rstrip("\r\n")
                logf.write(line + "\n")
                if time.monotonic() > deadline:
                    p.kill()
                    break
                if line.startswith("LAB-READY"):
                    kvm_ready = "kvm=yes" in line
                    log(f"L1 up after {time.monotonic() - t0:.1f}s ({line})")
                    continue
                if line.startswith(BEGIN):
                    current = line[len(BEGIN):].strip()
                    lines = []
                    results[current] = JobResult(current)
                    jt0 = time.monotonic()
                    watch["job"] = current
                    watch["until"] = jt0 + timeouts.get(current, 240) + 90
                    continue
                if line.startswith(END) and current:
                    m = re.search(r"rc=(\d+) t0=([\d.]+) t1=([\d.]+)", line)
                    r = results[current]
                    if m:
                        r.rc = int(m.group(1))
                        r.seconds = float(m.group(3)) - float(m.group(2))
                    r.lines = lines
                    r.output = "\n".join(lines)
                    log(f"job {current}: rc={r.rc} in {time.monotonic() - jt0:.1f}s")
                    current = None
                    watch["job"] = "between jobs"
                    watch["until"] = time.monotonic() + 300
                    continue
                if current is not None:
                    lines.append(line)
                if echo:
                    if interactive:
                        # The part already shown as a partial line is not repeated.
                        sys.stdout.write(_tail_after_partial(line) + "\n")
                        sys.stdout.flush()
                    else:
                        print(line, flush=True)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        if current is not None:
            results[current].lines = lines
            results[current].output = "\n".join(lines)
        if kvm_ready is False:
            raise RuntimeError("the nested lab's L1 kernel has no /dev/kvm (log: "
                               f"{logpath})")
        log(f"lab done in {time.monotonic() - t0:.1f}s (console log: {logpath})")
        if watch.get("stuck"):
            # Mark the job that was cut off, so the caller can tell it from a result.
            r = results.get(watch["stuck"])
            if r is not None and r.rc is None:
                r.output += "\n[lab] L1 got stuck during this job"
            results["__stuck__"] = JobResult("__stuck__", None, watch["stuck"])
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_jobs(jobs, echo=False, extra_files=None):
    """Runs each job in its own faultvisor process; returns {name: JobResult}."""
    m = mode()
    if m == "direct":
        return _run_direct(jobs, echo)
    if m == "nested":
        # Nested SVM under TCG sometimes wedges L1 itself (see L1_CPUS). That says
        # nothing about faultvisor: the watchdog stops such an L1 within about a minute,
        # and the jobs that did not finish run again in a fresh L1, at most
        # L1_BOOTS times in all, each retry said in the log.
        res, todo = {}, list(jobs)
        for boot in range(1, L1_BOOTS + 1):
            got = _run_nested(todo, echo, extra_files)
            stuck = got.pop("__stuck__", None)
            res.update(got)
            if stuck is None:
                break
            todo = [j for j in todo if j.name not in res or res[j.name].rc is None]
            if boot == L1_BOOTS:
                log(f"L1 got stuck in job {stuck.output} in all {L1_BOOTS} boots; "
                    f"{len(todo)} job(s) did not finish")
            else:
                log(f"L1 got stuck in job {stuck.output} (boot {boot} of at most "
                    f"{L1_BOOTS}); rerunning {len(todo)} unfinished job(s) in a fresh L1")
        return res
    raise RuntimeError(unavailable_reason())


def main(argv):
    if len(argv) >= 1 and argv[0] == "mode":
        print(mode())
        return 0
    if len(argv) >= 1 and argv[0] == "boot":
        args = argv[1:]
        if "--kernel" not in args:
            args = ["--kernel", "{kernel}", "--initrd", "{initrd}", *args]
        m = mode()
        if m == "nested":
            log("this host's KVM cannot run a stock Linux guest "
                "(software kvm_pvm or no KVM): running the guest inside the nested lab")
        elif m == "unavailable":
            log(unavailable_reason())
            return 2
        res = run_jobs([Job("boot", args, timeout=3600, interactive=True)], echo=True)
        r = res.get("boot")
        if r is None or r.rc is None:
            log("the VM did not finish")
            return 2
        log(f"faultvisor exited with {r.rc}")
        return r.rc
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
