#!/usr/bin/env python3
"""Builds faultvisor's default Linux guest from Debian packages.

What it makes, in the cache directory ($FAULTVISOR_CACHE or ~/.cache/faultvisor),
under guest/:
  vmlinux            the uncompressed ELF kernel, extracted from the bzImage
  bzImage            the Debian cloud kernel as shipped
  initramfs.cpio     busybox, the virtio modules, fv-outb, fv-blkbench (blkbench.c,
                     for ci/bench_blk.py), a static e2fsck and resources/guest/init
  lab-base.cpio      the nested lab's L1 initramfs: busybox, kvm modules, lab init
  rootfs.ext4        the root disk: busybox, every module of the kernel, the same
                     init and fv-outb, in an ext4 image with room to spare (built by
                     mkfs.ext4 -d as an ordinary user; booted with root=/dev/vda)
  versions.txt       the Debian package versions used
  stamp              what the outputs were built from (for idempotence)

Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`;
nothing is installed into the host. Run it again and it does nothing unless
an input changed. Needs: apt-get, dpkg-deb, lz4 (the Debian kernel is LZ4
compressed), gcc (for the 1 KiB fv-outb helper), mkfs.ext4 (e2fsprogs).
"""

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cpio import CpioWriter  # noqa: E402

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
# A static e2fsck, so the guest can check its disks after a power cut.
E2FSCK = "e2fsck-static"
# Modules the default guest carries, in load order (dependencies first).
GUEST_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "virtio-rng", "virtio_blk",
]
# Modules the nested lab's L1 kernel needs for a working /dev/kvm.
LAB_MODULES = ["irqbypass", "kvm", "kvm-amd"]


def log(msg):
    print(f"[guest] {msg}", flush=True)


def die(msg):
    print(f"guest image: error: {msg}", file=sys.stderr)
    sys.exit(1)


def cache_dir():
    base = os.environ.get("FAULTVISOR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "faultvisor")
    return os.path.join(base, "guest")


def run(cmd, **kw):
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def need(tool, package):
    if shutil.which(tool) is None:
        die(f"'{tool}' is missing; install it with: apt-get install {package}")


def resolve_kernel_package():
    out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                         text=True)
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(":", 1)[1].strip()
    return None


def package_version(deb):
    out = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Version"],
                         capture_output=True, text=True, check=True)
    return " ".join(out.stdout.split())


def download(pkgs, debs_dir):
    os.makedirs(debs_dir, exist_ok=True)
    try:
        run(["apt-get", "download", *pkgs], cwd=debs_dir,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip().splitlines()
        die("apt-get download failed: " + (err[-1] if err else "unknown error")
            + " (run 'apt-get update' first?)")


def find_deb(debs_dir, name):
    hits = sorted(glob.glob(os.path.join(debs_dir, f"{name}_*.deb")))
    return hits[-1] if hits else None


def extract_vmlinux(bzimage, out):
    """Finds the LZ4 legacy frame inside the bzImage and decompresses it."""
    data = open(bzimage, "rb").read()
    magic = b"\x02\x21\x4c\x18"
    off = data.find(magic)
    if off < 0:
        die(f"{bzimage}: no LZ4 payload found (is the kernel still LZ4 compressed?)")
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        p = subprocess.run(["lz4", "-dc"], input=data[off:], stdout=f,
                           stderr=subprocess.PIPE)
    # lz4 complains about the bytes that trail the payload; the ELF check decides.
    with open(tmp, "rb") as f:
        head = f.read(4)
    if head != b"\x7fELF":
        die(f"decompressing {bzimage} did not give an ELF (lz4: {p.stderr[-200:]!r})")
    os.replace(tmp, out)


def module_index(moddir):
    idx = {}
    for path in glob.glob(os.path.join(moddir, "kernel", "**", "*.ko"), recursive=True):
        idx[os.path.basename(path)[:-3]] = path
    return idx


def module_deps(path):
    data = open(path, "rb").read()
    i = data.find(b"depends=")
    if i < 0:
        return []
    end = data.find(b"\0", i)
    deps = data[i + 8:end].decode()
    return [d for d in deps.split(",") if d]


def module_closure(idx, wanted):
    """Returns module names in a valid load order (dependencies first)."""
    order = []

    def visit(name, stack):
        key = name if name in idx else name.replace("_", "-")
        if key not in idx:
            key = name.replace("-", "_")
        if key not in idx:
            die(f"kernel module {name} not found in the package")
        if key in order:
            return
        if key in stack:
            die(f"module dependency cycle at {key}")
        for dep in module_deps(idx[key]):
            visit(dep, stack + [key])
        order.append(key)

    for w in wanted:
        visit(w, [])
    return order


def add_busybox(cpio, busybox):
    cpio.mkdir("bin")
    cpio.add_file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    for d in ("proc", "sys", "dev", "tmp", "sbin", "usr/bin", "usr/sbin", "etc"):
        cpio.mkdir(d)


def build_initramfs(out, busybox, kver, idx, modules, init_path, outb, e2fsck=None,
                    tools=()):
    tmp = out + ".tmp"
    cpio = CpioWriter(tmp)
    add_busybox(cpio, busybox)
    cpio.add_file("init", init_path, 0o755)
    cpio.add_file("bin/fv-outb", outb, 0o755)
    for tool in tools:
        cpio.add_file(f"bin/{os.path.basename(tool)}", tool, 0o755)
    if e2fsck:
        cpio.add_file("bin/e2fsck", e2fsck, 0o755)
    kdir = f"lib/modules/{kver}"
    rels = []
    for name in modules:
        rel = "kernel/" + idx[name].split("/kernel/", 1)[1]
        cpio.add_file(f"{kdir}/{rel}", idx[name], 0o644)
        rels.append(rel)
    cpio.add_bytes("lib/modules/load-order", ("\n".join(rels) + "\n").encode())
    cpio.close()
    os.replace(tmp, out)
    return rels


def build_rootfs(out, root, busybox, kver, modules, init_path, outb, e2fsck, tools=()):
    """The root disk image: a directory tree put into ext4 by mkfs.ext4 -d."""
    tree = out + ".tree"
    if os.path.exists(tree):
        shutil.rmtree(tree)
    for d in ("bin", "proc", "sys", "dev", "tmp", "sbin", "usr/bin", "usr/sbin", "etc",
              "mnt", "root", "lib/modules"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    shutil.copyfile(busybox, os.path.join(tree, "bin", "busybox"))
    os.chmod(os.path.join(tree, "bin", "busybox"), 0o755)
    os.symlink("busybox", os.path.join(tree, "bin", "sh"))
    shutil.copyfile(init_path, os.path.join(tree, "init"))
    os.chmod(os.path.join(tree, "init"), 0o755)
    shutil.copyfile(outb, os.path.join(tree, "bin", "fv-outb"))
    os.chmod(os.path.join(tree, "bin", "fv-outb"), 0o755)
    for src, name in [(e2fsck, "e2fsck")] + [(t, os.path.basename(t)) for t in tools]:
        shutil.copyfile(src, os.path.join(tree, "bin", name))
        os.chmod(os.path.join(tree, "bin", name), 0o755)
    shutil.copytree(os.path.join(root, "lib", "modules", kver),
                    os.path.join(tree, "lib", "modules", kver), symlinks=True)
    with open(os.path.join(tree, "lib", "modules", "load-order"), "w") as f:
        f.write("\n".join(modules) + "\n")
    with open(os.path.join(tree, "etc", "fv-rootfs"), "w") as f:
        f.write("faultvisor default root disk\n")
    used = 0
    for dirpath, _, files in os.walk(tree):
        for n in files:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                used += (os.path.getsize(p) + 4095) // 4096 * 4096
    size = (used * 5 // 4 + (48 << 20)) // (1 << 20) * (1 << 20)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-L", "fv-root", "-E", "root_owner=0:0", "-d", tree, tmp])
    os.replace(tmp, out)
    shutil.rmtree(tree)
    return size


def digest(paths, extra):
    h = hashlib.sha256()
    for p in paths:
        h.update(open(p, "rb").read())
    h.update(extra.encode())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--print-dir", action="store_true",
                    help="print the output directory and exit")
    args = ap.parse_args()
    out = cache_dir()
    if args.print_dir:
        print(out)
        return
    os.makedirs(out, exist_ok=True)
    inputs = [os.path.join(HERE, f) for f in ("build.py", "cpio.py", "init", "outb.c",
                                                 "blkbench.c")]
    inputs.append(os.path.join(os.path.dirname(HERE), "lab", "init"))

    for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg"), ("lz4", "lz4"),
                      ("gcc", "gcc"), ("mkfs.ext4", "e2fsprogs")):
        need(tool, pkg)

    log(f"output directory: {out}")
    kpkg = resolve_kernel_package()
    if kpkg is None and os.geteuid() == 0:
        log("apt has no package lists yet: running apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        kpkg = resolve_kernel_package()
    debs = os.path.join(out, "debs")
    cached_kernel = None
    if kpkg is None:
        cached = sorted(glob.glob(os.path.join(debs, "linux-image-*-cloud-amd64_*.deb")))
        if not cached:
            die(f"cannot resolve {KERNEL_META} (run 'apt-get update' first)")
        cached_kernel = cached[-1]
        kpkg = os.path.basename(cached_kernel).split("_")[0]
        log(f"apt metadata unavailable; using cached {kpkg}")
    log(f"kernel package: {kpkg} (from {KERNEL_META})")

    stamp_path = os.path.join(out, "stamp")
    want_stamp = digest(inputs, kpkg)
    outputs = ["vmlinux", "bzImage", "initramfs.cpio", "lab-base.cpio", "rootfs.ext4",
               "versions.txt"]
    if (not args.force and os.path.exists(stamp_path)
            and open(stamp_path).read().strip() == want_stamp
            and all(os.path.exists(os.path.join(out, o)) for o in outputs)):
        log("guest image is up to date:")
        print(open(os.path.join(out, "versions.txt")).read(), end="")
        return

    kdeb = find_deb(debs, kpkg)
    bdeb = find_deb(debs, BUSYBOX)
    edeb = find_deb(debs, E2FSCK)
    missing = [p for p, d in ((kpkg, kdeb), (BUSYBOX, bdeb), (E2FSCK, edeb)) if d is None]
    if missing:
        log("downloading " + ", ".join(missing))
        download(missing, debs)
        kdeb = find_deb(debs, kpkg)
        bdeb = find_deb(debs, BUSYBOX)
        edeb = find_deb(debs, E2FSCK)
    else:
        log("packages already downloaded")
    if kdeb is None or bdeb is None or edeb is None:
        die("downloaded packages not found in " + debs)

    root = os.path.join(out, "root")
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    for deb in (kdeb, bdeb, edeb):
        run(["dpkg-deb", "-x", deb, root])

    vmlinuz = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
    if len(vmlinuz) != 1:
        die("expected exactly one vmlinuz in the kernel package")
    kver = os.path.basename(vmlinuz[0])[len("vmlinuz-"):]
    shutil.copyfile(vmlinuz[0], os.path.join(out, "bzImage"))
    log(f"extracting vmlinux from bzImage ({kver})")
    extract_vmlinux(vmlinuz[0], os.path.join(out, "vmlinux"))
    shutil.copyfile(glob.glob(os.path.join(root, "boot", "config-*"))[0],
                    os.path.join(out, "config"))

    outb = os.path.join(out, "fv-outb")
    run(["gcc", "-static", "-Os", "-s", "-o", outb, os.path.join(HERE, "outb.c")])
    blkbench = os.path.join(out, "fv-blkbench")
    run(["gcc", "-static", "-O2", "-s", "-o", blkbench, os.path.join(HERE, "blkbench.c"),
         "-lpthread"])
    busybox = os.path.join(root, "bin", "busybox")
    idx = module_index(os.path.join(root, "lib", "modules", kver))

    log("writing initramfs.cpio (guest)")
    e2fsck = os.path.join(root, "sbin", "e2fsck.static")
    if not os.path.exists(e2fsck):
        die(f"{E2FSCK} has no sbin/e2fsck.static")
    mods = build_initramfs(os.path.join(out, "initramfs.cpio"), busybox, kver, idx,
                           module_closure(idx, GUEST_MODULES),
                           os.path.join(HERE, "init"), outb, e2fsck, [blkbench])
    log("guest modules: " + " ".join(os.path.basename(m) for m in mods))
    log("writing lab-base.cpio (nested lab L1)")
    lab_mods = build_initramfs(os.path.join(out, "lab-base.cpio"), busybox, kver, idx,
                               module_closure(idx, LAB_MODULES),
                               os.path.join(os.path.dirname(HERE), "lab", "init"), outb)
    log("lab modules: " + " ".join(os.path.basename(m) for m in lab_mods))
    log("writing rootfs.ext4 (root disk)")
    size = build_rootfs(os.path.join(out, "rootfs.ext4"), root, busybox, kver, mods,
                        os.path.join(HERE, "init"), outb, e2fsck, [blkbench])
    log(f"root disk: {size >> 20} MiB")

    versions = (f"kernel {kver}\n{package_version(kdeb)}\n{package_version(bdeb)}\n"
                f"{package_version(edeb)}\n")
    with open(os.path.join(out, "versions.txt"), "w") as f:
        f.write(versions)
    shutil.rmtree(root)
    with open(stamp_path, "w") as f:
        f.write(want_stamp + "\n")
    log("done:")
    print(versions, end="")


if __name__ == "__main__":
    main()
