#!/usr/bin/env python3
"""Commit-message check (rust-vmm-ci's commit-format test, our own version).

Every commit in BASE..HEAD (BASE from $BASE_BRANCH, default: the repository's
first commit, so the whole history is checked) must have a title of at most
60 characters followed by a blank line when a body exists.
"""

import os
import subprocess
import sys

MAX_TITLE = 60


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def main():
    base = os.environ.get("BASE_BRANCH")
    rng = f"{base}..HEAD" if base else "HEAD"
    try:
        shas = git("rev-list", rng).split()
    except subprocess.CalledProcessError as e:
        print(f"commit-format: cannot list commits: {e.stderr.strip()}")
        return 1
    bad = 0
    for sha in shas:
        msg = git("log", "-1", "--format=%B", sha).rstrip("\n").split("\n")
        title = msg[0]
        problems = []
        if len(title) > MAX_TITLE:
            problems.append(f"title is {len(title)} characters (max {MAX_TITLE})")
        if not title.strip():
            problems.append("empty title")
        if len(msg) > 1 and msg[1].strip():
            problems.append("second line is not blank")
        if problems:
            bad += 1
            print(f"{sha[:10]} '{title}': " + "; ".join(problems))
    print(f"commit-format: {len(shas)} commit(s) checked, {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
