#!/usr/bin/env python3
"""Runs the checks in test_description.json (rust-vmm-ci's format) in order.

Each test has test_name, command (run with bash from the repository root),
platform (matched against `uname -m`) and an optional timeout_in_minutes
(default 15). Prints each result and ends with a line 'N passed, N failed'.
Exit status is 0 only if every selected test passed.

  python3 rust-vmm-ci/run.py [--list] [NAME ...]   (NAMEs select tests)
"""

import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv):
    with open(os.path.join(HERE, "test_description.json")) as f:
        tests = json.load(f)["tests"]
    arch = platform.machine()
    tests = [t for t in tests if arch in t.get("platform", [arch])]
    if "--list" in argv:
        for t in tests:
            print(f"{t['test_name']}: {t['command']}")
        return 0
    wanted = [a for a in argv if not a.startswith("-")]
    if wanted:
        unknown = set(wanted) - {t["test_name"] for t in tests}
        if unknown:
            print(f"run.py: unknown test(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        tests = [t for t in tests if t["test_name"] in wanted]
    passed, failed, summary = 0, 0, []
    for t in tests:
        name = t["test_name"]
        timeout = 60 * t.get("timeout_in_minutes", 15)
        print(f"\n===== {name}: {t['command']}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(["bash", "-c", t["command"]], cwd=ROOT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        dt = time.monotonic() - t0
        ok = rc == 0
        passed += ok
        failed += not ok
        verdict = "PASS" if ok else f"FAIL ({rc})"
        summary.append(f"{verdict:12} {name} ({dt:.1f}s)")
        print(f"===== {name}: {verdict} in {dt:.1f}s", flush=True)
    print("\n" + "\n".join(summary))
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
