"""Linux tier: the Debian cloud kernel boots on faultvisor to its init, and the
probe guest runs every scenario on a KVM whose local APIC behaves like hardware
(this host's kvm_pvm ends interrupts on delivery, so tests/probe.rs must skip
the in-service scenarios there).

Where this host's KVM can run Linux the VMs run directly; elsewhere (the
software kvm_pvm) they run in the nested lab (ci/lab.py). Each VM is its own
faultvisor process; one lab boot is shared by all of them.

Run: python3 -m unittest discover -s tests/linux -v
"""

import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "ci"))
import lab  # noqa: E402

BASE = "console=ttyS0 quiet panic=-1"
JOBS = [
    lab.Job("one-vcpu", ["--kernel", "{kernel}", "--initrd", "{initrd}", "--vcpus", "1",
                         "--memory", "512M",
                         "--cmdline", f"{BASE} fv.checks=cpus,serial-irq,pci,modules"]),
    lab.Job("two-vcpus", ["--kernel", "{kernel}", "--initrd", "{initrd}", "--vcpus", "2",
                          "--memory", "768M",
                          "--cmdline", f"{BASE} fv.checks=cpus,interrupts fv.end=reboot"]),
    lab.Job("bzimage", ["--kernel", "{bzimage}", "--initrd", "{initrd}", "--vcpus", "1",
                        "--cmdline", f"{BASE} fv.checks=cpus fv.end=exit:3"]),
    lab.Job("iommu-edu", ["--kernel", "{kernel}", "--initrd", "{initrd}", "--vcpus", "2",
                          "--memory", "512M", "--device", "edu,bdf=00:04.0",
                          "--device", "virtio-rng", "--cmdline",
                          f"{BASE} intel_iommu=on fv.checks=modules,hwrng,iommu,edu-dma"]),
    # Interrupt remapping, with hardware-exact caching and its stale-use detector on.
    lab.Job("ir", ["--kernel", "{kernel}", "--initrd", "{initrd}", "--vcpus", "2",
                   "--memory", "512M", "--device", "virtio-rng",
                   "--iommu", "intel,caching=exact", "--cmdline",
                   f"{BASE} intel_iommu=on fv.checks=modules,ir,serial-irq,hwrng,ir"]),
    lab.Job("no-intremap", ["--kernel", "{kernel}", "--initrd", "{initrd}", "--vcpus", "2",
                            "--memory", "512M", "--device", "virtio-rng", "--cmdline",
                            f"{BASE} intel_iommu=on intremap=off "
                            "fv.checks=modules,ir,serial-irq,hwrng"]),
    # Guest RAM's host mapping while the guest runs: 2 MiB-aligned, backed by THP.
    lab.Job("ram-alignment", [], timeout=120, raw=(
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio --vcpus 1 "
        f"--memory 512M --load map --log-level debug --cmdline '{BASE} fv.checks=pause' "
        "> /tmp/ra.log 2>&1 & "
        "pid=$!; "
        "for i in $(seq 600); do grep -q FAULTVISOR-INIT /tmp/ra.log && break; sleep 0.1; done; "
        "grep -E 'guest RAM|mapped from the file' /tmp/ra.log; "
        "base=$(grep -o 'guest RAM 0x0+0x[0-9a-f]* at host 0x[0-9a-f]*' /tmp/ra.log | "
        "sed 's/.*at host 0x//'); "
        # The VMA at the base (the kernel, mapped from vmlinux at 16 MiB, and the initrd
        # are mappings of their own inside guest RAM), and the huge pages of all of them
        # (same-length hex addresses compare as strings).
        "grep \"^$base-\" /proc/$pid/maps | sed 's/^/RAM-MAP /'; "
        "end=$(printf '%x' $((0x$base + 536870912))); "
        "awk -v b=\"$base\" -v e=\"$end\" '/^[0-9a-f]+-[0-9a-f]+ / {{ split($1, a, \"-\"); "
        "in_ram = length(a[1]) == length(b) && a[1] >= b && a[1] < e }} "
        "in_ram && /^AnonHugePages/ {{ thp += $2 }} END {{ print \"RAM-THP \" thp + 0 }}' "
        "/proc/$pid/smaps; "
        "wait $pid; echo RA-RC=$?")),
    # virtio-blk through the VT-d unit: write, flush, read back; the image must hold
    # exactly the flushed pattern afterwards.
    lab.Job("disk", [], timeout=180, raw=(
        "dd if=/dev/zero of=/tmp/d.img bs=1M count=64 2>/dev/null && "
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio --vcpus 2 "
        "--memory 512M --disk path=/tmp/d.img,serial=FVDISK1 --cmdline "
        f"'{BASE} intel_iommu=on fv.checks=modules,disk'; echo VM-RC=$?; "
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio "
        "--disk path=/tmp/d.img --disk path=/tmp/d.img --cmdline x; echo LOCK-RC=$?; "
        "echo IMAGE-MD5=$(dd if=/tmp/d.img bs=1M skip=1 count=4 2>/dev/null | md5sum "
        "| cut -d' ' -f1); echo HEAD-MD5=$(dd if=/tmp/d.img bs=1M count=1 2>/dev/null "
        "| md5sum | cut -d' ' -f1); echo ZERO-MD5=$(dd if=/dev/zero bs=1M count=1 "
        "2>/dev/null | md5sum | cut -d' ' -f1)")),
    # The default guest's root disk (a snapshot of it): initramfs → switch_root.
    lab.Job("root-disk", ["--kernel", "{kernel}", "--initrd", "{initrd}", "--vcpus", "2",
                          "--memory", "512M", "--disk", "path={rootfs},snapshot=on",
                          "--cmdline", f"{BASE} root=/dev/vda fv.checks=cpus,modules"]),
    # A power cut while a write sits unflushed in the disk's volatile cache.
    lab.Job("power-cut", [], timeout=180, raw=(
        "dd if=/dev/zero of=/tmp/p.img bs=1M count=32 2>/dev/null; "
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio "
        "--memory 512M --disk path=/tmp/p.img --api-socket /tmp/p.sock --cmdline "
        f"'{BASE} fv.checks=modules,disk-power' > /tmp/p.log 2>&1 & pid=$!; "
        "for i in $(seq 900); do grep -q FV-DISK-READY /tmp/p.log && break; sleep 0.1; done; "
        "/lab/faultvisor inject --api-socket /tmp/p.sock power-cut; echo INJECT-RC=$?; "
        "wait $pid; "
        "echo PC-RC=$?; cat /tmp/p.log; "
        "echo A-MD5=$(dd if=/tmp/p.img bs=1M skip=8 count=1 2>/dev/null | md5sum | cut -d' ' -f1); "
        "echo B-MD5=$(dd if=/tmp/p.img bs=1M skip=16 count=1 2>/dev/null | md5sum | cut -d' ' -f1); "
        "echo Z-MD5=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)")),
    # ext4 on virtio-blk through the unit: 64 MiB with checksums, a read-only remount,
    # then an injected DMA fault and an I/O error during a sync.
    lab.Job("ext4", [], timeout=240, raw=(
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio --vcpus 2 "
        "--memory 768M --disk path=/lab/ext4.img,bdf=00:05.0 --api-socket /tmp/e.sock "
        f"--cmdline '{BASE} intel_iommu=on fv.checks=modules,ext4,disk-faults' "
        "> /tmp/e.log 2>&1 & pid=$!; "
        "for i in $(seq 1800); do grep -q FV-DISK-ARM /tmp/e.log && break; sleep 0.1; done; "
        "/lab/faultvisor inject --api-socket /tmp/e.sock disk-dma-fault --device 00:05.0; "
        "/lab/faultvisor inject --api-socket /tmp/e.sock disk-error --device 00:05.0; "
        "wait $pid; echo VM-RC=$?; cat /tmp/e.log")),
    # Power cuts at random points of an fsync loop on ext4, each followed by a boot
    # that runs e2fsck and checks every durable file.
    lab.Job("power-cut-loop", [], timeout=300, raw=(
        "cp /lab/ext4.img /tmp/pl.img; "
        "for cycle in 1 2 3; do "
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio --memory 512M "
        "--disk path=/tmp/pl.img --api-socket /tmp/pl.sock --cmdline "
        f"'{BASE} intel_iommu=on fv.checks=modules,fsync-loop' > /tmp/pl.log 2>&1 & pid=$!; "
        "for i in $(seq 900); do grep -q FV-FSYNC-START /tmp/pl.log && break; sleep 0.1; done; "
        "sleep $cycle.$RANDOM; "
        "/lab/faultvisor inject --api-socket /tmp/pl.sock power-cut > /dev/null; wait $pid; "
        "echo \"CYCLE $cycle CUT-RC=$? $(grep -o 'FV-FSYNCED [0-9]*' /tmp/pl.log | tail -1)\"; "
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio --memory 512M "
        f"--disk path=/tmp/pl.img --cmdline '{BASE} fv.checks=modules,fsck-verify' 2>&1 "
        "| grep -E 'FV-CHECK fsck|FV-VERIFY|FV-FSCK|mount' | sed \"s/^/CYCLE $cycle /\"; done")),
    lab.Job("linux-campaign", [], timeout=300, raw=(
        "mkdir -p /tmp/fvc/guest && ln -sf /lab/vmlinux /tmp/fvc/guest/vmlinux && "
        "ln -sf /lab/initramfs.cpio /tmp/fvc/guest/initramfs.cpio && "
        "ln -sf {rootfs} /tmp/fvc/guest/rootfs.ext4 && "
        "FAULTVISOR_CACHE=/tmp/fvc /lab/faultvisor campaign /lab/linux.toml --jobs 1 "
        "--out /tmp/lc; rc=$?; cat /tmp/lc/report.md; "
        "for f in /tmp/lc/*/console.log; do echo \"== $f\"; cat \"$f\"; done; exit $rc")),
    # Outcome classes against golden runs (resources/campaigns/linux-outcomes.toml).
    lab.Job("linux-outcomes", [], timeout=600, raw=(
        "mkdir -p /tmp/fvo/guest && ln -sf /lab/vmlinux /tmp/fvo/guest/vmlinux && "
        "ln -sf /lab/initramfs.cpio /tmp/fvo/guest/initramfs.cpio && "
        "ln -sf {rootfs} /tmp/fvo/guest/rootfs.ext4 && "
        "FAULTVISOR_CACHE=/tmp/fvo /lab/faultvisor campaign /lab/linux-outcomes.toml "
        "--jobs 1 --out /tmp/lo; rc=$?; cat /tmp/lo/report.md; "
        "echo JUNIT-BEGIN; cat /tmp/lo/junit.xml; echo JUNIT-END; exit $rc")),
    lab.Job("idt-linux", [], timeout=120, raw=(
        "/lab/faultvisor run --kernel /lab/vmlinux --initrd /lab/initramfs.cpio --vcpus 2 "
        "--memory 512M --api-socket /tmp/idt.sock --cmdline "
        "'console=ttyS0 quiet panic=-1 fv.checks=kallsyms,pause,pause' > /tmp/con.log 2>&1 & "
        "pid=$!; for i in $(seq 600); do grep -q FV-KALLSYMS-END /tmp/con.log && break; "
        "sleep 0.1; done; "
        "sed -n '/FV-KALLSYMS-BEGIN/,/FV-KALLSYMS-END/p' /tmp/con.log | grep -v FV-KALLSYMS "
        "| tr -d '\\r' > /tmp/k.map; echo \"symbols: $(wc -l < /tmp/k.map)\"; "
        "/lab/faultvisor idt --api-socket /tmp/idt.sock --vcpu 1 --symbols /tmp/k.map; "
        "echo IDT-RC=$?; wait $pid")),
    lab.Job("probe-x2apic", ["--kernel", "{probe}", "--vcpus", "2", "--memory", "64M",
                             "--device", "test", "--device", "edu", "--cmdline",
                             "probe.tests=boot.*,apic.*,exc.*,pci.*,ioapic.*,serial.*,"
                             "msi.*,msix.*,iommu.*,opt.soft_int"], timeout=120),
    lab.Job("probe-xapic", ["--kernel", "{probe}", "--vcpus", "2", "--memory", "64M",
                            "--device", "test", "--cmdline",
                            "probe.apic=xapic probe.tests=apic.*,ioapic.*,msi.dest,msix.dest"],
            timeout=120),
]

_results = None
_skip = None


def ext4_image():
    """An empty 96 MiB ext4 filesystem for the ext4 job (made here: L1 has no mkfs)."""
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "linux-tier-ext4.img")
    with open(path, "wb") as f:
        f.truncate(96 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "fv-test", path], check=True)
    return path


def results():
    global _results, _skip
    if _results is None and _skip is None:
        if lab.mode() == "unavailable":
            _skip = "LINUX TIER SKIPPED: " + lab.unavailable_reason()
            print("\n" + "!" * 78 + "\n" + _skip + "\n" + "!" * 78, file=sys.stderr)
        else:
            _results = lab.run_jobs(JOBS, extra_files={"ext4.img": ext4_image()})
    if _skip:
        raise unittest.SkipTest(_skip)
    return _results


def job(name):
    r = results().get(name)
    if r is None:
        raise AssertionError(f"job {name} never started (see target/lab-logs)")
    return r


def check(r, key):
    for line in r.lines:
        m = re.search(rf"FV-CHECK {key} (.*)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"{r.name}: no 'FV-CHECK {key}' line in the console:\n{r.output}")


class LinuxBoot(unittest.TestCase):
    def test_one_vcpu_reaches_init(self):
        r = job("one-vcpu")
        self.assertTrue(any("FAULTVISOR-INIT uptime=" in l for l in r.lines), r.output)
        self.assertEqual(check(r, "cpus"), "online=1")

    def test_two_vcpus_reach_init(self):
        r = job("two-vcpus")
        self.assertTrue(any("FAULTVISOR-INIT uptime=" in l for l in r.lines), r.output)
        self.assertEqual(check(r, "cpus"), "online=2")

    def test_serial_interrupt_counts_through_the_ioapic(self):
        r = job("one-vcpu")
        m = re.match(r"before=(-?\d+) after=(-?\d+) line=\[(.*)\]", check(r, "serial-irq"))
        self.assertIsNotNone(m)
        before, after, line = int(m.group(1)), int(m.group(2)), m.group(3)
        self.assertIn("IO-APIC", line)
        self.assertIn("4-edge", line)
        self.assertIn("ttyS0", line)
        self.assertGreater(before, 0)
        self.assertGreater(after, before, "ttyS0 interrupt count did not go up")

    def test_poweroff_exits_zero(self):
        r = job("one-vcpu")
        self.assertEqual(r.rc, 0, r.output)
        self.assertTrue(any("guest powered off (ACPI S5)" in l for l in r.lines), r.output)

    def test_reboot_exits_zero(self):
        r = job("two-vcpus")
        self.assertEqual(r.rc, 0, r.output)
        self.assertTrue(any("reset" in l and "VM ended" in l for l in r.lines), r.output)

    def test_pci_host_bridge_and_virtio_modules(self):
        r = job("one-vcpu")
        pci = [l for l in r.lines if "FV-CHECK pci " in l]
        self.assertTrue(any("0000:00:00.0 0x1b36:0x0008 class=0x060000" in l for l in pci),
                        r.output)
        self.assertEqual(check(r, "modules"), "ok")

    def test_boot_timer_logs_guest_boot_time(self):
        r = job("one-vcpu")
        self.assertTrue(any("Guest-boot-time = " in l for l in r.lines), r.output)

    def test_guest_ram_is_2m_aligned_and_huge_paged(self):
        r = job("ram-alignment")
        self.assertIn("RA-RC=0", r.output)
        maps = re.findall(r"RAM-MAP ([0-9a-f]+)-", r.output)
        self.assertEqual(len(maps), 1, r.output)
        self.assertEqual(int(maps[0], 16) % (2 << 20), 0, "guest RAM 2 MiB-aligned")
        # With --load map the kernel and initrd were mapped from their files, not
        # copied, and the guest ran from them to the end (RA-RC=0 above).
        m = re.search(r"kernel: (\d+) KiB mapped from the file, (\d+) KiB copied", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertGreater(int(m.group(1)), 40000, r.output)
        self.assertLess(int(m.group(2)), 64, r.output)
        thp = re.search(r"RAM-THP (\d+)", r.output)
        self.assertIsNotNone(thp, r.output)
        self.assertGreater(int(thp.group(1)), 0, "transparent huge pages back guest RAM")

    def test_bzimage_boots_and_debug_exit_sets_code(self):
        r = job("bzimage")
        self.assertEqual(check(r, "cpus"), "online=1")
        self.assertEqual(r.rc, 7, r.output)


class IntelIommu(unittest.TestCase):
    """Linux 6.1 with intel_iommu=on accepts the emulated VT-d unit, and an edu DMA
    programmed from guest userspace to unmapped addresses becomes a DMAR fault that
    the guest's dmar_fault() prints, for the right device and address."""

    def dmesg(self):
        return [l for l in job("iommu-edu").lines if "DMAR" in l]

    def test_unit_is_found_and_enabled(self):
        text = "\n".join(self.dmesg())
        r = job("iommu-edu")
        self.assertIn("DMAR: dmar0: reg_base_addr fed90000 ver 1:0", text, r.output)
        self.assertIn("DMAR: dmar0: Using Queued invalidation", text, r.output)
        self.assertIn("DMAR: Intel(R) Virtualization Technology for Directed I/O", text,
                      r.output)
        self.assertEqual(r.rc, 0, r.output)

    def test_edu_dma_faults_are_printed_by_the_guest(self):
        text = "\n".join(self.dmesg())
        r = job("iommu-edu")
        self.assertRegex(text, r"DMAR: \[DMA Write NO_PASID\] Request device \[00:04\.0\] "
                               r"fault addr 0x1234000 \[fault reason 0x05\] "
                               r"PTE Write access is not set", r.output)
        self.assertRegex(text, r"DMAR: \[DMA Read NO_PASID\] Request device \[00:04\.0\] "
                               r"fault addr 0x2345000 \[fault reason 0x06\] "
                               r"PTE Read access is not set", r.output)
        # The device reported the failure instead of ending the VM (QEMU aborts).
        m = re.search(r"FV-CHECK edu-dma .*live=(\S+) write-cmd=(\S+) write-err=(\S+) "
                      r"read-cmd=(\S+) read-err=(\S+)", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertEqual(m.group(1).lower(), "0xedcba987")
        self.assertEqual(int(m.group(3), 16), 0x502, "IOMMU fault, reason 5")
        self.assertEqual(int(m.group(5), 16), 0x602, "IOMMU fault, reason 6")
        self.assertEqual(int(m.group(2), 16) & 0x101, 0x100, "error bit, run bit clear")

    def test_virtio_blk_writes_flushes_and_reads_back_through_the_unit(self):
        r = job("disk")
        m = re.search(r"FV-CHECK disk size=(\d+) ro=(\d) serial=(\S*) queues=(\d+) "
                      r"access-platform=(\S*) domain=(\S*) write=(\d+) want=(\w+) got=(\w+)",
                      r.output)
        self.assertIsNotNone(m, r.output)
        self.assertEqual(int(m.group(1)), 64 * 2048, "capacity in sectors")
        self.assertEqual(m.group(2), "0")
        self.assertEqual(m.group(3), "FVDISK1", "GET_ID")
        self.assertEqual(int(m.group(4)), 2, "a queue per vCPU")
        self.assertEqual(m.group(5), "1", "VIRTIO_F_ACCESS_PLATFORM negotiated")
        self.assertIn(m.group(6), ("DMA", "DMA-FQ"), "a translated IOMMU domain")
        self.assertEqual(m.group(7), "0", "dd with fsync succeeded")
        self.assertEqual(m.group(8), m.group(9), "read back what was written")
        self.assertIn("VM-RC=0", r.output)
        image = re.search(r"IMAGE-MD5=(\w+)", r.output).group(1)
        self.assertEqual(image, m.group(8), "the flushed pattern is in the image file")
        head = re.search(r"HEAD-MD5=(\w+)", r.output).group(1)
        zero = re.search(r"ZERO-MD5=(\w+)", r.output).group(1)
        self.assertEqual(head, zero, "nothing written outside the request's sectors")
        self.assertIn("already in use", r.output, "the image lock")
        self.assertIn("LOCK-RC=2", r.output)

    def test_ext4_keeps_64_mib_and_reacts_to_storage_faults(self):
        r = job("ext4")
        m = re.search(r"FV-CHECK ext4 mount=(\S+) written=(\w+) read=(\w+) ro=(\w+)",
                      r.output)
        self.assertIsNotNone(m, r.output)
        self.assertEqual(m.group(1), "ok")
        self.assertEqual(m.group(2), m.group(3), "64 MiB read back as written")
        self.assertEqual(m.group(4), "refused", "a read-only remount refuses writes")
        self.assertIn("FV-CHECK disk-faults", r.output, r.output)
        blk = [l for l in r.lines if l.startswith("FV-BLKLOG ")]
        # The DMA fault: the unit's fault record, as Linux prints it, for the disk.
        self.assertTrue(any("DMAR: [DMA" in l and "[00:05.0]" in l and "fault reason 0x04"
                            in l for l in blk), "\n".join(blk) or r.output)
        # The I/O error: the block layer's line for vda.
        self.assertTrue(any("I/O error, dev vda" in l for l in blk), "\n".join(blk))
        self.assertIn("VM-RC=0", r.output)

    def test_the_default_guest_boots_from_its_root_disk(self):
        r = job("root-disk")
        self.assertIn("FAULTVISOR-ROOT /dev/vda ext4", r.output, r.output)
        self.assertEqual(check(r, "cpus"), "online=2")
        self.assertEqual(check(r, "modules"), "ok")
        self.assertEqual(r.rc, 0, r.output)

    def test_every_fsynced_file_survives_power_cuts_at_random_points(self):
        r = job("power-cut-loop")
        for cycle in (1, 2, 3):
            cut = re.search(rf"CYCLE {cycle} CUT-RC=(\d+) FV-FSYNCED (\d+)", r.output)
            self.assertIsNotNone(cut, r.output)
            self.assertEqual(cut.group(1), "6", "stopped by the power cut")
            durable = int(cut.group(2))
            rc = re.search(rf"CYCLE {cycle} FV-CHECK fsck rc=(\d+)", r.output)
            self.assertIsNotNone(rc, r.output)
            self.assertIn(int(rc.group(1)), (0, 1), "e2fsck found (or fixed) no damage")
            ok = {int(n) for n in re.findall(rf"CYCLE {cycle} FV-VERIFY (\d+) ok", r.output)}
            missing = [n for n in range(1, durable + 1) if n not in ok]
            self.assertEqual(missing, [], f"cycle {cycle}: fsynced files lost or damaged")

    def test_a_power_cut_loses_exactly_the_unflushed_writes(self):
        r = job("power-cut")
        m = re.search(r"FV-DISK-READY a=(\w+) b=(\w+) arc=(\d+) brc=(\d+)", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertEqual(m.group(3), "0", "the fsynced write succeeded")
        # The VMM's own account, and the client's reply (written before the VM stops).
        lost = re.search(r"power cut \(injected\): (\d+) unflushed bytes lost", r.output)
        self.assertIsNotNone(lost, r.output)
        self.assertIn("INJECT-RC=0", r.output, "the client got its reply")
        reply = re.search(r'"lost_bytes":\s*(\d+)', r.output)
        self.assertIsNotNone(reply, r.output)
        self.assertEqual(reply.group(1), lost.group(1), "the reply and the log agree")
        self.assertIn("PC-RC=6", r.output, "the VM stopped with the power-cut exit code")
        a = re.search(r"A-MD5=(\w+)", r.output).group(1)
        b = re.search(r"B-MD5=(\w+)", r.output).group(1)
        z = re.search(r"Z-MD5=(\w+)", r.output).group(1)
        self.assertEqual(a, m.group(1), "the flushed write survived the power cut")
        self.assertEqual(b, z, "the unflushed write was lost")
        if m.group(4) == "0":
            # O_DIRECT put it in the disk's cache, which the cut dropped.
            self.assertGreaterEqual(int(lost.group(1)), 1 << 20, r.output)

    def test_hwrng_reads_through_translated_dma(self):
        r = job("iommu-edu")
        m = re.search(r"FV-CHECK hwrng current=(\S*) access-platform=(\S*) domain=(\S*) "
                      r"bytes=([0-9a-f]*)", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertEqual(m.group(1), "virtio_rng.0")
        self.assertEqual(m.group(2), "1", "VIRTIO_F_ACCESS_PLATFORM negotiated")
        self.assertIn(m.group(3), ("DMA", "DMA-FQ"), "a translated IOMMU domain")
        self.assertEqual(len(m.group(4)), 64, "32 bytes from /dev/hwrng")
        self.assertNotEqual(m.group(4), "0" * 64)
        walks = re.search(r"VT-d: (\d+) DMA requests, (\d+) page walks, (\d+) faults recorded",
                          r.output)
        self.assertIsNotNone(walks, r.output)
        self.assertGreater(int(walks.group(1)), 0, "devices made translated requests")
        self.assertGreater(int(walks.group(2)), 0, "the unit walked the page tables")
        self.assertEqual(int(walks.group(3)), 2, "exactly the two edu faults")


class InterruptRemapping(unittest.TestCase):
    """Linux 6.1 turns interrupt remapping on in x2APIC mode (it is on by default when
    the DMAR table offers it): the serial port's IOAPIC pin and virtio-rng's MSI-X
    vectors go through IRTEs, and data still arrives. intremap=off still works."""

    def test_remapping_is_enabled_in_x2apic_mode(self):
        r = job("ir")
        self.assertIn("DMAR-IR: Enabled IRQ remapping in x2apic mode", r.output, r.output)
        self.assertIn("DMAR-IR: IOAPIC id 0 under DRHD base  0xfed90000", r.output, r.output)
        self.assertEqual(r.rc, 0, r.output)

    def test_serial_and_virtio_interrupts_are_remapped(self):
        r = job("ir")
        m = re.search(r"FV-CHECK serial-irq before=(\d+) after=(\d+) line=\[(.*)\]", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertIn("IR-IO-APIC", m.group(3), r.output)
        self.assertIn("ttyS0", m.group(3))
        self.assertGreater(int(m.group(2)), int(m.group(1)), "ttyS0 counts up through IR")
        # Linux 6.1 labels MSI-X vectors "IR-PCI-MSI" (later kernels "IR-PCI-MSIX");
        # msi_irqs/ says which kind they are.
        remapped = sorted({l.split()[1].rstrip(":") for l in r.lines
                           if l.startswith("FV-IRQ") and re.search(r"IR-PCI-MSIX? ", l)
                           and "virtio" in l})
        self.assertEqual(len(remapped), 2, r.output)
        kinds = dict(re.findall(r"FV-MSI-KIND \S+ irq=(\d+) (\w+)", r.output))
        self.assertEqual([kinds.get(i) for i in remapped], ["msix", "msix"], r.output)
        inputs = [l for l in r.lines if l.startswith("FV-IRQ") and "virtio0-input" in l]
        self.assertTrue(inputs and sum(int(x) for x in inputs[0].split()[2:4]) > 0, r.output)
        h = re.search(r"FV-CHECK hwrng current=(\S*) access-platform=(\S*) domain=(\S*) "
                      r"bytes=([0-9a-f]*)", r.output)
        self.assertIsNotNone(h, r.output)
        self.assertEqual(len(h.group(4)), 64, "virtio-rng data arrives through IR")

    def test_linux_invalidates_as_exact_caching_requires(self):
        """Linux 6.1's intel-iommu driver (lazy DMA-FQ flushing, IR with IEC flushes)
        never uses an entry it changed without the invalidation the spec requires."""
        r = job("ir")
        m = re.search(r"VT-d exact caching: (\d+) stale uses \(context (\d+), IOTLB (\d+), "
                      r"IRTE (\d+)\)", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertEqual(m.group(1), "0", r.output)
        self.assertNotIn("stale", " ".join(l for l in r.lines if "WARN" in l), r.output)

    def test_intremap_off_still_works(self):
        r = job("no-intremap")
        self.assertNotIn("Enabled IRQ remapping", r.output)
        m = re.search(r"FV-CHECK serial-irq before=(\d+) after=(\d+) line=\[(.*)\]", r.output)
        self.assertIsNotNone(m, r.output)
        self.assertNotIn("IR-IO-APIC", m.group(3))
        self.assertGreater(int(m.group(2)), int(m.group(1)))
        h = re.search(r"FV-CHECK hwrng current=(\S*) access-platform=(\S*) domain=(\S*) "
                      r"bytes=([0-9a-f]*)", r.output)
        self.assertIsNotNone(h, r.output)
        self.assertEqual(len(h.group(4)), 64, r.output)
        self.assertEqual(r.rc, 0, r.output)


def tap(r):
    out = []
    for line in r.lines:
        m = re.match(r"(not ok|ok) \d+ - (\S+)(?: # (.*))?$", line.strip())
        if m:
            out.append((m.group(1) == "ok", m.group(2), m.group(3) or ""))
    return out


class LinuxCampaign(unittest.TestCase):
    """resources/campaigns/linux.toml: guest-visible DMAR fault lines, and the guest's
    reaction to an interrupt storm and to lost interrupts."""

    def test_every_expectation_holds(self):
        r = job("linux-campaign")
        self.assertIn("10 runs (0 golden): **10 passed, 0 failed**", r.output, r.output)
        # The power-cut runs' second boots checked the filesystem.
        self.assertEqual(r.output.count("[faultvisor campaign: second boot, exit code 0]"), 3,
                         r.output)
        self.assertEqual(r.rc, 0, r.output)

    def test_outcomes_are_classified_against_golden_runs(self):
        r = job("linux-outcomes")
        self.assertEqual(r.rc, 0, r.output)
        out = r.output
        self.assertIn("## Outcomes per configuration", out, out)
        self.assertNotIn("no usable golden run", out, out)

        def outcome(run):
            m = re.search(r'name="' + re.escape(run) + r'"[^>]*><properties><property '
                          r'name="outcome" value="(\w+)"', out)
            self.assertIsNotNone(m, f"{run}: {out}")
            return m.group(1)

        # The guest prints a DMAR line for each refused write and carries on.
        for run in ("edu DMA faults@p0#0", "edu DMA faults@p1#1"):
            self.assertEqual(outcome(run), "recovered")
        # Interrupt remapping fault: the INTR-REMAP line, and /dev/hwrng left waiting.
        self.assertEqual(outcome("IRTE fault for virtio-rng"), "detected")
        # A lost COM1 interrupt stalls the tty without a word: silent.
        self.assertIn(outcome("lost COM1 interrupts@p0"), ("sdc", "hang"))
        # Failed disk requests: the block layer says so and the read-back differs.
        for run in ("disk read-write errors@p0", "disk read-write errors@p1",
                    "disk DMA faults"):
            self.assertEqual(outcome(run), "detected", run)
        # A short delay is absorbed, a long one makes the run slow.
        self.assertEqual(outcome("slow disk@p0"), "masked")
        self.assertEqual(outcome("slow disk@p1"), "degraded")
        # The guest's DMAR handler acknowledged the disk's DMA fault: timed in the trace.
        self.assertRegex(out, r"\| disk DMA faults \| disk-dma-fault \|.*acknowledged after "
                              r"\d+ µs", out)

    def test_report_shows_the_guest_reactions(self):
        r = job("linux-campaign")
        for line in ["| edu DMA from guest userspace |", "| injected DMA fault and fault storm |",
                     "| interrupt storm on an unused vector |",
                     "| a lost serial interrupt stalls the console |",
                     "| corrupted virtio-rng descriptor |",
                     "| an IRTE fault for virtio-rng |",
                     "| a failing request on the root disk |"]:
            self.assertIn(line, r.output, r.output)
        self.assertIn("No irq handler for vector", r.output)
        self.assertIn("fault addr 0x7000 [fault reason 0x05]", r.output)
        self.assertIn("DMAR: [INTR-REMAP] Request device [00:01.0] fault index 0x", r.output)
        self.assertIn("[fault reason 0x22] Present field in the IRTE entry is clear", r.output)
        self.assertIn("I/O error, dev vda", r.output)


class InteractiveConsole(unittest.TestCase):
    """`ci/lab.py boot` (what ci/boot.sh runs) passes the terminal's input to the guest:
    a command typed at the guest's shell runs there, through L1's serial port when
    the guest lives in the nested lab."""

    def test_typed_commands_reach_the_guest_shell(self):
        if lab.mode() == "unavailable":
            self.skipTest("LINUX TIER SKIPPED: " + lab.unavailable_reason())
        import threading
        import time
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                              "ci", "lab.py")
        p = subprocess.Popen([sys.executable, script, "boot", "--vcpus", "1", "--cmdline",
                              f"{BASE} fv.end=shell"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = []

        def reader():
            while True:
                b = p.stdout.read1(4096)
                if not b:
                    return
                out.append(b.decode(errors="replace"))

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        deadline = time.monotonic() + 400
        while "FAULTVISOR-DONE" not in "".join(out) and time.monotonic() < deadline:
            if p.poll() is not None:
                break
            time.sleep(0.5)
        self.assertIn("FAULTVISOR-DONE", "".join(out), "".join(out)[-3000:])
        time.sleep(3)
        p.stdin.write(b"echo typed-$((6*7))\n")
        p.stdin.flush()
        while "typed-42" not in "".join(out) and time.monotonic() < deadline:
            time.sleep(0.5)
        p.stdin.write(b"poweroff -f\n")
        p.stdin.flush()
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
        t.join(timeout=5)
        text = "".join(out)
        self.assertIn("typed-42", text, text[-3000:])
        self.assertEqual(p.returncode, 0, text[-3000:])


class IdtOfLinux(unittest.TestCase):
    """`faultvisor idt` on the Debian guest, with the symbols its init printed."""

    def test_idt_names_linux_entry_points_and_routes(self):
        r = job("idt-linux")
        self.assertIn("IDT-RC=0", r.output, r.output)
        gates = [l for l in r.lines if re.match(r"^[0-9a-f]{2}: [0-9a-f]{16} ", l)]
        self.assertGreater(len(gates), 200, r.output)
        by_vec = {int(l[:2], 16): l for l in gates}
        self.assertIn("asm_exc_page_fault", by_vec.get(0x0e, ""), r.output)
        self.assertIn("asm_exc_divide_error", by_vec.get(0x00, ""), r.output)
        self.assertIn("asm_sysvec_apic_timer_interrupt", by_vec.get(0xec, ""), r.output)
        self.assertTrue(any("irq_entries_start+" in l for l in gates), r.output)
        self.assertTrue(any("<- IOAPIC pin 4 -> APIC" in l for l in gates), r.output)


class ProbeOnRealKvm(unittest.TestCase):
    """The probe scenarios that kvm_pvm cannot show run here with no skip at all."""

    def check_all_pass(self, name, must_have):
        r = job(name)
        results = tap(r)
        names = [n for _, n, _ in results]
        for n in must_have:
            self.assertIn(n, names, r.output)
        for ok, n, note in results:
            self.assertTrue(ok, f"{n} failed: {note}\n{r.output}")
            self.assertFalse(note.startswith("SKIP"), f"{n} skipped: {note}\n{r.output}")
        self.assertEqual(r.rc, 0, r.output)

    def test_every_scenario_passes_without_skips(self):
        self.check_all_pass("probe-x2apic", [
            "ioapic.level", "ioapic.level_refire", "ioapic.eoi_register",
            "ioapic.masked_level", "msi.dest", "msix.function_mask", "opt.soft_int",
            "iommu.fault_reasons", "iommu.fault_event", "iommu.frcd_overflow"])

    def test_xapic_mode(self):
        self.check_all_pass("probe-xapic", ["apic.mode", "ioapic.eoi_register", "msix.dest"])
        self.assertTrue(any("xAPIC mode" in l for l in job("probe-xapic").lines))


if __name__ == "__main__":
    unittest.main()
