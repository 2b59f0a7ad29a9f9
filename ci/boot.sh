#!/usr/bin/env bash
# Fetch the default Debian guest (idempotent), build faultvisor and boot the guest.
# Where this host's KVM cannot run a stock Linux guest (the software kvm_pvm, or no
# /dev/kvm), the guest runs inside the nested lab (an L1 QEMU TCG VM with SVM) and the
# script says so. Extra arguments go to `faultvisor run`, e.g.:
#   ci/boot.sh --vcpus 1 --cmdline 'console=ttyS0 quiet fv.checks=cpus,serial-irq'
set -euo pipefail
cd "$(dirname "$0")/.."

command -v lz4 >/dev/null || { echo "boot: lz4 is needed to unpack the Debian kernel: apt-get install lz4" >&2; exit 2; }
mode=$(python3 ci/lab.py mode)
if [ "$mode" = nested ] && ! command -v qemu-system-x86_64 >/dev/null; then
    echo "boot: the nested lab needs QEMU: apt-get install qemu-system-x86" >&2
    exit 2
fi
exec python3 ci/lab.py boot "$@"
