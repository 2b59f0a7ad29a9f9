"""Minimal writer for the Linux initramfs format (cpio "newc", uncompressed).

Used by build.py and by the nested lab (ci/lab.py) so that archives can be
made from files anywhere on the host, without root ownership tricks and
without the cpio tool. Linux accepts several archives concatenated, which the
lab uses to append the VMM binary and the guest files to a cached base image.
"""

import os
import stat


class CpioWriter:
    """Streams entries into a newc archive; call close() to write the trailer."""

    def __init__(self, path):
        self._f = open(path, "wb")
        self._ino = 1
        self._dirs = set()

    def _header(self, name, mode, size, nlink=1):
        name_b = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name_b), 0,
        ]
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._f.write(hdr)
        self._f.write(name_b)
        self._pad()

    def _pad(self):
        pos = self._f.tell()
        if pos % 4:
            self._f.write(b"\0" * (4 - pos % 4))

    def mkdir(self, name):
        """Adds a directory and its missing parents."""
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self._header(d, stat.S_IFDIR | 0o755, 0, nlink=2)

    def add_bytes(self, name, data, mode=0o644):
        """Adds a regular file with the given content."""
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._header(name, stat.S_IFREG | mode, len(data))
        self._f.write(data)
        self._pad()

    def add_file(self, name, src, mode=None):
        """Adds a host file, streaming it (large kernels stay out of memory)."""
        st = os.stat(src)
        if mode is None:
            mode = stat.S_IMODE(st.st_mode)
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._header(name, stat.S_IFREG | mode, st.st_size)
        with open(src, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                self._f.write(chunk)
        self._pad()

    def symlink(self, name, target):
        """Adds a symbolic link."""
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self._f.write(data)
        self._pad()

    def close(self):
        """Writes the trailer and closes the file."""
        self._header("TRAILER!!!", 0, 0)
        self._f.close()
