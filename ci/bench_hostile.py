#!/usr/bin/env python3
"""faultvisor under hostile guests and clients: peak VMM memory outside guest RAM per
pattern, and API latency while slow clients, a 10^6-fault storm and an interrupt storm
run. A benchmark (prints a table), not a test.

  python3 ci/bench_hostile.py [--vmm target/release/faultvisor] [--scale 20000]

Patterns (each in a fresh VM with 64 MiB of guest RAM, 2 vCPUs):
  chaos      the hostile guest (hostile.chaos), 3 seeds, every device
  growth     hostile.growth: one-byte virtio buffers on 2 M distinct IOVA pages,
             virtio reset cycles, boot-timer marks, unsupported ACPI sleep requests
  api-junk   4000 refused 64 KiB inject bodies, 4000 GET /metrics, 2000 connections
             opened and dropped
  api-slow   63 slow clients (half send half a request, half never read their
             /metrics reply) + a 10^6-fault storm + a 10 kHz interrupt storm, while
             GET /v1/vm is timed
Memory is the sum of Rss over every mapping of the VMM except guest RAM, sampled
every 20 ms; the peak is reported.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEM_MIB = 64


def rss_outside_guest_kib(pid):
    """Rss of every mapping but the guest RAM one (the anonymous mapping of its size)."""
    total, ram = 0, 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            size = 0
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "Size:":
                    size = int(parts[1])
                elif len(parts) >= 2 and parts[0] == "Rss:":
                    rss = int(parts[1])
                    if size == MEM_MIB * 1024 and ram == 0:
                        ram = rss
                    else:
                        total += rss
    except OSError:
        return None
    return total


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, False

    def run(self):
        while not self.stop:
            v = rss_outside_guest_kib(self.pid)
            if v is None:
                return
            self.peak = max(self.peak, v)
            time.sleep(0.02)


def start(vmm, probe, cmdline, extra=(), sock=None, devices=("test", "edu", "virtio-rng")):
    cmd = [vmm, "run", "--kernel", probe, "--memory", f"{MEM_MIB}M", "--vcpus", "2",
           "--serial", "stdio", "--cmdline", cmdline]
    for d in devices:
        cmd += ["--device", d]
    if sock:
        cmd += ["--api-socket", sock]
    cmd += list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, s, timeout=600):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    s.stop = True
    return out, err


def request(sock_path, raw, timeout=30):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall(raw)
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    return data


def http(method, path, body=b""):
    return f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def wait_socket(path, p, timeout=20):
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        try:
            if request(path, http("GET", "/v1/vm"), 2).startswith(b"HTTP/1.1 200"):
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def chaos(vmm, probe, scale):
    rows = []
    for seed in (1, 2, 3):
        p = start(vmm, probe, f"probe.tests=hostile.chaos probe.seed={seed} probe.actions={scale}")
        s = Sampler(p.pid)
        s.start()
        out, err = finish(p, s)
        ok = any(l.startswith("ok 1 - hostile.chaos") for l in out.splitlines())
        rows.append((f"chaos seed {seed}, {scale} actions/vCPU", s.peak, "pass" if ok and p.returncode == 0 else f"FAIL rc {p.returncode}", len(err.splitlines())))
    return rows


def growth(vmm, probe, scale):
    p = start(vmm, probe, f"probe.tests=hostile.growth probe.actions={scale}",
              ["--iommu", "intel"], devices=("virtio-rng",))
    s = Sampler(p.pid)
    s.start()
    out, err = finish(p, s)
    what = next((l[2:] for l in out.splitlines() if l.startswith("# growth:")), "?")
    ok = any(l.startswith("ok 1") for l in out.splitlines())
    return [(what, s.peak, "pass" if ok else f"FAIL rc {p.returncode}", len(err.splitlines()))]


def api_junk(vmm, probe):
    sock = f"/tmp/fv-bench-junk-{os.getpid()}.sock"
    p = start(vmm, probe, "probe.tests=opt.watch", sock=sock)
    s = Sampler(p.pid)
    s.start()
    if not wait_socket(sock, p):
        p.kill()
        return [("api-junk", 0, "VMM did not serve", 0)]
    junk = b'{"fault":"dma","device":"' + b"z" * (60 * 1024) + b'"}'
    for _ in range(4000):
        request(sock, http("POST", "/v1/inject", junk))
    for _ in range(4000):
        request(sock, http("GET", "/metrics"))
    refused = 0
    for _ in range(2000):
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(sock)
            c.sendall(b"GET /v1/vm HTTP/1.1\r\nHos")
        except OSError:
            refused += 1  # past the connection caps the server closes at once
        c.close()
    alive = request(sock, http("GET", "/v1/vm")).startswith(b"HTTP/1.1 200")
    p.kill()
    _, err = finish(p, s)
    return [("api-junk: 4000 refused 64 KiB bodies, 4000 /metrics, 2000 dropped", s.peak,
             ("alive" if alive else "DEAD") + f", {refused} of the 2000 closed at the cap", len(err.splitlines()))]


def api_slow(vmm, probe):
    sock = f"/tmp/fv-bench-slow-{os.getpid()}.sock"
    p = start(vmm, probe, "probe.tests=opt.watch", sock=sock)
    s = Sampler(p.pid)
    s.start()
    if not wait_socket(sock, p):
        p.kill()
        return [("api-slow", 0, "VMM did not serve", 0)], None
    held = []
    for i in range(63):
        c = socket.socket(socket.AF_UNIX)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        c.connect(sock)
        c.sendall(b"GET /metrics HTTP/1.1\r\n\r\n" if i % 2 else b"GET /v1/vm HTTP/1.1\r\nX:")
        held.append(c)
    lat, codes = [], {}
    # Free one slot for the timed client and the storms.
    held.pop().close()
    time.sleep(0.1)
    fs = threading.Thread(target=request, args=(sock, http("POST", "/v1/inject",
        b'{"fault":"fault-storm","device":"00:02.0","count":1000000}'), 120))
    fs.start()
    request(sock, http("POST", "/v1/inject",
        b'{"fault":"irq-storm","vector":200,"cpu":1,"rate_hz":10000,"duration_ms":5000}'))
    for _ in range(300):
        t0 = time.perf_counter()
        r = request(sock, http("GET", "/v1/vm"))
        lat.append((time.perf_counter() - t0) * 1000)
        code = r[9:12].decode(errors="replace")
        codes[code] = codes.get(code, 0) + 1
        time.sleep(0.005)
    fs.join()
    for c in held:
        c.close()
    p.kill()
    _, err = finish(p, s)
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]
    summary = (q(0.5), q(0.99), lat[-1], codes)
    return [("api-slow: 62 slow clients + 10^6-fault storm + 10 kHz irq storm", s.peak, f"GET /v1/vm {codes}", len(err.splitlines()))], summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vmm", default=os.path.join(ROOT, "target/release/faultvisor"))
    ap.add_argument("--scale", type=int, default=20000)
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    if a.vmm.endswith("target/release/faultvisor"):
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    probe = f"/tmp/fv-bench-probe-{os.getpid()}.elf"
    subprocess.run([os.path.join(ROOT, "target/release/faultvisor"), "demo", "--write-probe", probe],
                   check=True, stdout=subprocess.DEVNULL)
    want = lambda n: a.only is None or n in a.only
    rows, slow = [], None
    if want("chaos"):
        rows += chaos(a.vmm, probe, a.scale)
    if want("growth"):
        rows += growth(a.vmm, probe, a.scale)
    if want("api-junk"):
        rows += api_junk(a.vmm, probe)
    if want("api-slow"):
        r, slow = api_slow(a.vmm, probe)
        rows += r
    print(f"\n| pattern | peak RSS outside guest RAM (MiB) | result | VMM log lines |")
    print("|---|---:|---|---:|")
    for name, peak, res, lines in rows:
        print(f"| {name} | {peak / 1024:.1f} | {res} | {lines} |")
    if slow:
        p50, p99, mx, codes = slow
        print(f"\nGET /v1/vm during api-slow: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {mx:.2f} ms, replies {codes}")
    os.unlink(probe)


if __name__ == "__main__":
    sys.exit(main())
