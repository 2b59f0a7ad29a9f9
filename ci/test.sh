#!/usr/bin/env bash
# The whole test suite: installs what the tests need on a fresh machine, then runs
# every check of rust-vmm-ci/test_description.json (fmt, clippy, doc, unit and
# integration tests on this host's KVM including the probe guest, the Linux tier in
# the nested lab where the host KVM cannot run Linux, commit format). Ends with "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
command -v lz4 >/dev/null || need_pkgs+=(lz4)
command -v gcc >/dev/null || need_pkgs+=(gcc libc6-dev)
command -v make >/dev/null || need_pkgs+=(make)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v objdump >/dev/null || need_pkgs+=(binutils)
# The campaign's HTML report is checked in a real headless browser.
command -v chromium >/dev/null || need_pkgs+=(chromium)
# A real single-node Slurm cluster for the campaign's array-job test, and PyYAML for
# the Kubernetes manifest's.
command -v slurmctld >/dev/null || need_pkgs+=(slurm-wlm)
command -v munged >/dev/null || need_pkgs+=(munge)
python3 -c 'import yaml' 2>/dev/null || need_pkgs+=(python3-yaml)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "[test] installing ${need_pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    else
        echo "[test] missing ${need_pkgs[*]}; install them (apt-get install ${need_pkgs[*]}) or the Linux tier skips"
    fi
fi
# Where the browser could be installed, its test must not skip.
command -v chromium >/dev/null && export FAULTVISOR_REQUIRE_BROWSER=1
command -v slurmctld >/dev/null && [ "$(id -u)" = 0 ] && export FAULTVISOR_REQUIRE_SLURM=1
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
# The probe guest is a freestanding kernel (src/probe); src/cli/build.rs builds it.
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none \
    || rustup target add x86_64-unknown-none

exec python3 rust-vmm-ci/run.py "$@"
