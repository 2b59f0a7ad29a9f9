"""The nested lab's own watchdog (ci/lab.py): how it reads L0's QEMU monitor and
when it calls L1 wedged. Needs no KVM and no lab; runs with the Linux tier."""

import os
import socket
import sys
import tempfile
import threading
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "ci"))
import lab  # noqa: E402

# What `info registers` and `info lapic` said when L1 was wedged (abridged).
WEDGED = [
    "RIP=ffffffff81a18e0d RFL=00000286 [--S--P-] CPL=0 II=0 A20=1 SMM=0 HLT=0",
    "Timer\t DCR=0x3 (divide by 16) initial_count = 15080 current_count = 0",
    "ISR\t (none)",
    "IRR\t 236 ",
]


class FakeMonitor:
    """A unix socket that answers like QEMU's human monitor, with its line editor's
    escape sequences."""

    def __init__(self, answers):
        self.dir = tempfile.mkdtemp(prefix="fv-mon-")
        self.path = os.path.join(self.dir, "m.sock")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.answers = answers
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
            buf = b""
            while self.answers:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf and self.answers:
                    cmd, buf = buf.split(b"\n", 1)
                    echo = b"".join(b"\x1b[K\x1b[D" + cmd[:i + 1] for i in range(len(cmd)))
                    conn.sendall(echo + b"\r\n" + self.answers.pop(0).encode() + b"\r\n(qemu) ")


class Watchdog(unittest.TestCase):
    def test_a_pending_interrupt_in_a_running_l1_is_a_wedge_sign(self):
        self.assertTrue(lab._wedged(tuple(WEDGED)))

    def test_no_pending_interrupt_or_a_halt_is_not(self):
        idle = [ln.replace("HLT=0", "HLT=1") for ln in WEDGED]
        self.assertFalse(lab._wedged(tuple(idle)))
        quiet = WEDGED[:3] + ["IRR\t (none)"]
        self.assertFalse(lab._wedged(tuple(quiet)))
        self.assertFalse(lab._wedged(None))

    def test_a_sample_reads_both_answers_through_the_monitor(self):
        regs = "RAX=0000000000000000 RBX=0\r\n" + WEDGED[0] + "\r\nCR0=80050033"
        apic = "dumping local APIC state for CPU 0\r\n\r\n" + "\r\n".join(WEDGED[1:])
        m = FakeMonitor([regs, apic])
        sample = lab._l1_sample(m.path)
        self.assertEqual(sample, tuple(ln.strip() for ln in WEDGED))
        self.assertTrue(lab._wedged(sample))

    def test_no_monitor_gives_no_sample(self):
        self.assertIsNone(lab._l1_sample("/nonexistent/monitor.sock"))


class Retries(unittest.TestCase):
    """run_jobs reruns what a wedged L1 left unfinished, in fresh L1s, a bounded number
    of times (ci/lab.py's _run_nested replaced by a script of L1 boots)."""

    def run_with(self, boots):
        calls = []

        def fake(todo, echo, extra_files):
            calls.append([j.name for j in todo])
            res = {}
            for name, rc in boots[len(calls) - 1].items():
                if name == "__stuck__":
                    res[name] = lab.JobResult("__stuck__", None, rc)
                else:
                    res[name] = lab.JobResult(name, rc)
            return res

        saved = lab.mode, lab._run_nested
        lab.mode, lab._run_nested = (lambda: "nested"), fake
        try:
            res = lab.run_jobs([lab.Job("a", []), lab.Job("b", []), lab.Job("c", [])])
        finally:
            lab.mode, lab._run_nested = saved
        return calls, res

    def test_unfinished_jobs_run_again_until_an_l1_finishes(self):
        calls, res = self.run_with([
            {"a": 0, "b": None, "__stuck__": "b"},
            {"b": 0, "c": None, "__stuck__": "c"},
            {"c": 1},
        ])
        self.assertEqual(calls, [["a", "b", "c"], ["b", "c"], ["c"]])
        self.assertEqual({n: r.rc for n, r in res.items()}, {"a": 0, "b": 0, "c": 1})

    def test_the_number_of_l1_boots_is_bounded(self):
        stuck = {"a": None, "__stuck__": "a"}
        calls, res = self.run_with([stuck] * (lab.L1_BOOTS + 3))
        self.assertEqual(len(calls), lab.L1_BOOTS)
        self.assertIsNone(res["a"].rc)
        self.assertNotIn("__stuck__", res)


if __name__ == "__main__":
    unittest.main()
