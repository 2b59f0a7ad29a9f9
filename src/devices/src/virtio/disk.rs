//! A raw disk image behind virtio-blk: the file, its advisory lock, and the volatile
//! write cache that makes a power cut lose exactly what a real disk would.
//!
//! With [`CacheMode::Volatile`] (the default) writes land in an in-memory overlay of
//! 4 KiB blocks and reach the file only when the guest flushes (then the file is
//! `fdatasync`ed: the data is on the host's stable storage before the flush completes).
//! [`DiskImage::power_cut`] drops the overlay: every write the guest had not flushed is
//! lost, every flushed one survives. The overlay is capped at [`MAX_DIRTY_BYTES`]; a
//! guest that writes more without flushing has the cache written back (and synced) at
//! that point, as a disk with a full cache does, and the write-back is counted. With
//! [`CacheMode::Host`] writes go to the file at once (the host's page cache keeps them),
//! a flush is an `fdatasync`, and there is nothing for a power cut to lose.
//!
//! Every offset and length is checked against the image size before any I/O; nothing
//! is written outside the request's sectors.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// The overlay's block size.
pub const BLOCK: u64 = 4096;
/// Unflushed bytes the overlay holds before it is written back.
pub const MAX_DIRTY_BYTES: u64 = 64 << 20;

/// Where writes go until the guest flushes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// In memory until a flush (a power cut loses them).
    #[default]
    Volatile,
    /// Straight to the file (the host's page cache).
    Host,
}

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened.
    #[error("disk {path}: cannot open: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Its size is not a whole number of sectors.
    #[error("disk {path}: size {size} is not a multiple of 512 bytes")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process holds its lock.
    #[error("disk {path}: already in use (its advisory lock is held: by another faultvisor or QEMU, or by a second --disk of the same file)")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// Empty image.
    #[error("disk {path}: the image is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Counters of one image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Bytes read by the guest.
    pub read_bytes: u64,
    /// Bytes written by the guest (into the cache or the file).
    pub written_bytes: u64,
    /// Flushes (each ends with an fdatasync).
    pub flushes: u64,
    /// Times the overlay reached its cap and was written back.
    pub writebacks: u64,
    /// Bytes dropped by power cuts.
    pub lost_bytes: u64,
}

/// A raw image file.
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    cache: CacheMode,
    overlay: BTreeMap<u64, Box<[u8]>>,
    stats: DiskStats,
    /// After a power cut nothing reaches the file any more.
    dead: bool,
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "beyond the end of the disk")
}

impl DiskImage {
    /// Opens `path` (read-only or read-write), checks its size and takes its advisory
    /// lock (shared when read-only, exclusive otherwise).
    pub fn open(path: &Path, readonly: bool, cache: CacheMode) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.into(),
                source,
            })?;
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked { path: path.into() });
        }
        Self::from_file(file, path, readonly, cache)
    }

    /// Wraps an open file (its lock is the caller's business).
    pub fn from_file(
        file: File,
        path: &Path,
        readonly: bool,
        cache: CacheMode,
    ) -> Result<Self, DiskError> {
        let size = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: path.into(),
                source,
            })?
            .len();
        if size == 0 {
            return Err(DiskError::Empty { path: path.into() });
        }
        if size % SECTOR != 0 {
            return Err(DiskError::Size {
                path: path.into(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.into(),
            size,
            readonly,
            cache,
            overlay: BTreeMap::new(),
            stats: DiskStats::default(),
            dead: false,
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }

    /// Whether the guest may not write.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The cache mode.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Counters.
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Bytes written and not yet flushed.
    pub fn dirty_bytes(&self) -> u64 {
        self.overlay.len() as u64 * BLOCK
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.dead {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the power is off",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(out_of_range()),
        }
    }

    /// One block's current contents (overlay, else the file).
    fn block(&self, b: u64) -> io::Result<Box<[u8]>> {
        if let Some(d) = self.overlay.get(&b) {
            return Ok(d.clone());
        }
        let mut v = vec![0u8; BLOCK as usize].into_boxed_slice();
        let start = b * BLOCK;
        let n = (self.size - start).min(BLOCK) as usize;
        self.file.read_exact_at(&mut v[..n], start)?;
        Ok(v)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        if self.overlay.is_empty() {
            self.file.read_exact_at(buf, offset)?;
        } else {
            let mut done = 0usize;
            while done < buf.len() {
                let at = offset + done as u64;
                let b = at / BLOCK;
                let within = (at % BLOCK) as usize;
                let n = (BLOCK as usize - within).min(buf.len() - done);
                match self.overlay.get(&b) {
                    Some(d) => buf[done..done + n].copy_from_slice(&d[within..within + n]),
                    None => self.file.read_exact_at(&mut buf[done..done + n], at)?,
                }
                done += n;
            }
        }
        self.stats.read_bytes += buf.len() as u64;
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        self.check(offset, data.len() as u64)?;
        match self.cache {
            CacheMode::Host => self.file.write_all_at(data, offset)?,
            CacheMode::Volatile => {
                let mut done = 0usize;
                while done < data.len() {
                    let at = offset + done as u64;
                    let b = at / BLOCK;
                    let within = (at % BLOCK) as usize;
                    let n = (BLOCK as usize - within).min(data.len() - done);
                    let mut blk = if n == BLOCK as usize {
                        vec![0u8; BLOCK as usize].into_boxed_slice()
                    } else {
                        self.block(b)?
                    };
                    blk[within..within + n].copy_from_slice(&data[done..done + n]);
                    self.overlay.insert(b, blk);
                    done += n;
                }
                if self.dirty_bytes() > MAX_DIRTY_BYTES {
                    self.stats.writebacks += 1;
                    crate::limits::hit(crate::limits::Cap::DiskCache);
                    self.write_back()?;
                }
            }
        }
        self.stats.written_bytes += data.len() as u64;
        Ok(())
    }

    /// Writes the overlay to the file and syncs it.
    fn write_back(&mut self) -> io::Result<()> {
        while let Some((&b, _)) = self.overlay.first_key_value() {
            let start = b * BLOCK;
            let n = (self.size - start).min(BLOCK) as usize;
            if let Some(d) = self.overlay.get(&b) {
                self.file.write_all_at(&d[..n], start)?;
            }
            self.overlay.remove(&b);
        }
        self.file.sync_data()
    }

    /// The guest's flush: everything written so far is on stable storage on return.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the power is off",
            ));
        }
        if self.readonly {
            return Ok(());
        }
        self.write_back()?;
        self.stats.flushes += 1;
        Ok(())
    }

    /// Discards (deallocates) `len` bytes at `offset`; they read as zeros afterwards.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true)
    }

    /// Writes zeros to `len` bytes at `offset` (deallocating them when `unmap`).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.zero(offset, len, unmap)
    }

    fn zero(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        self.check(offset, len)?;
        if self.cache == CacheMode::Volatile {
            // Through the cache, 64 KiB at a time: a power cut loses it like a write.
            let chunk = vec![0u8; 64 << 10];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                self.write(offset + done, &chunk[..n])?;
                done += n as u64;
            }
            return Ok(());
        }
        use vmm_sys_util::fallocate::{fallocate, FallocateMode};
        let mode = if unmap {
            FallocateMode::PunchHole
        } else {
            FallocateMode::ZeroRange
        };
        fallocate(&self.file, mode, true, offset, len)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        self.stats.written_bytes += len;
        Ok(())
    }

    /// A power cut: every unflushed write is lost, and the image takes no further I/O
    /// (requests still in flight fail). Returns the bytes dropped.
    pub fn power_cut(&mut self) -> u64 {
        let lost = self.dirty_bytes();
        self.overlay.clear();
        self.dead = true;
        self.stats.lost_bytes += lost;
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use vmm_sys_util::tempfile::TempFile;

    fn filled(bytes: u64) -> TempFile {
        let f = TempFile::new().expect("tmp");
        f.as_file()
            .write_all(&vec![0xaa; bytes as usize])
            .expect("fill");
        f
    }

    fn image(bytes: u64) -> (TempFile, DiskImage) {
        let f = filled(bytes);
        let d = DiskImage::open(f.as_path(), false, CacheMode::Volatile).expect("open");
        (f, d)
    }

    fn on_file(f: &TempFile, at: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        File::open(f.as_path())
            .expect("open")
            .read_exact_at(&mut v, at)
            .expect("read");
        v
    }

    #[test]
    fn volatile_writes_reach_the_file_only_at_flush() {
        let (f, mut d) = image(1 << 20);
        d.write(512, &[1u8; 1024]).expect("write");
        let mut b = vec![0u8; 2048];
        d.read(0, &mut b).expect("read");
        assert_eq!(&b[..512], &[0xaa; 512][..]);
        assert_eq!(&b[512..1536], &[1u8; 1024][..]);
        assert_eq!(&b[1536..], &[0xaa; 512][..]);
        assert_eq!(on_file(&f, 512, 4), vec![0xaa; 4], "not yet flushed");
        d.flush().expect("flush");
        assert_eq!(on_file(&f, 512, 1024), vec![1u8; 1024]);
        assert_eq!(on_file(&f, 1536, 4), vec![0xaa; 4], "neighbours untouched");
        assert_eq!(d.stats().flushes, 1);
    }

    #[test]
    fn power_cut_loses_exactly_the_unflushed_writes() {
        let (f, mut d) = image(1 << 20);
        d.write(0, &[1u8; 4096]).expect("w1");
        d.flush().expect("flush");
        d.write(4096, &[2u8; 4096]).expect("w2");
        d.write(0, &[3u8; 512]).expect("w3");
        assert_eq!(d.power_cut(), 8192);
        assert!(d.write(0, &[4u8; 512]).is_err(), "no I/O after the cut");
        assert!(d.flush().is_err());
        drop(d);
        // Booted again: what survived is what was flushed.
        let mut d = DiskImage::open(f.as_path(), false, CacheMode::Volatile).expect("reopen");
        let mut b = vec![0u8; 8192];
        d.read(0, &mut b).expect("read");
        assert_eq!(&b[..4096], &[1u8; 4096][..], "flushed survives");
        assert_eq!(&b[4096..], &[0xaa; 4096][..], "unflushed is gone");
        assert_eq!(on_file(&f, 4096, 4), vec![0xaa; 4]);
        assert_eq!(d.stats().lost_bytes, 0, "a fresh image");
    }

    #[test]
    fn bounds_are_checked_before_any_io() {
        let (_f, mut d) = image(8192);
        assert_eq!(d.sectors(), 16);
        let mut b = [0u8; 512];
        assert!(d.read(8192, &mut b).is_err());
        assert!(d.write(7680, &[0u8; 1024]).is_err());
        assert!(d.write(u64::MAX - 100, &[0u8; 512]).is_err());
        assert!(d.discard(4096, u64::MAX).is_err());
        assert_eq!(d.dirty_bytes(), 0);
        d.write(7680, &[5u8; 512]).expect("last sector");
    }

    #[test]
    fn host_cache_discard_and_zeroes() {
        let f = filled(1 << 20);
        let mut d = DiskImage::open(f.as_path(), false, CacheMode::Host).expect("open");
        d.write(0, &[7u8; 512]).expect("write");
        assert_eq!(on_file(&f, 0, 512), vec![7u8; 512], "straight to the file");
        d.discard(4096, 8192).expect("discard");
        d.write_zeroes(65536, 512, false).expect("zeroes");
        assert_eq!(on_file(&f, 4096, 8192), vec![0u8; 8192]);
        assert_eq!(on_file(&f, 65536, 512), vec![0u8; 512]);
        assert_eq!(d.power_cut(), 0);
    }

    #[test]
    fn the_cache_is_capped() {
        let (f, mut d) = image(MAX_DIRTY_BYTES + (2 << 20));
        let chunk = vec![9u8; 1 << 20];
        for i in 0..=(MAX_DIRTY_BYTES >> 20) {
            d.write(i << 20, &chunk).expect("write");
        }
        assert!(d.dirty_bytes() <= MAX_DIRTY_BYTES);
        assert_eq!(d.stats().writebacks, 1);
        assert_eq!(on_file(&f, 0, 4), vec![9u8; 4], "written back");
    }

    #[test]
    fn readonly_and_locks_and_sizes() {
        let f = TempFile::new().expect("tmp");
        f.as_file().write_all(&[0u8; 1000]).expect("fill");
        assert!(matches!(
            DiskImage::open(f.as_path(), true, CacheMode::Volatile),
            Err(DiskError::Size { size: 1000, .. })
        ));
        f.as_file().write_all(&[0u8; 24]).expect("fill");
        let mut ro = DiskImage::open(f.as_path(), true, CacheMode::Volatile).expect("ro");
        assert!(ro.write(0, &[1u8; 512]).is_err());
        // A second reader shares the lock; a writer does not get it.
        let _ro2 = DiskImage::open(f.as_path(), true, CacheMode::Volatile).expect("ro2");
        assert!(matches!(
            DiskImage::open(f.as_path(), false, CacheMode::Volatile),
            Err(DiskError::Locked { .. })
        ));
        assert!(matches!(
            DiskImage::open(Path::new("/nonexistent/x.img"), false, CacheMode::Volatile),
            Err(DiskError::Open { .. })
        ));
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    /// Random sector-aligned writes, reads, flushes and zeroes against a byte model,
    /// across the cache's write-back cap.
    #[test]
    fn matches_a_byte_model() {
        const SIZE: u64 = 80 << 20;
        let f = TempFile::new().expect("tmp");
        f.as_file().set_len(SIZE).expect("len");
        let mut d = DiskImage::open(f.as_path(), false, CacheMode::Volatile).expect("open");
        let mut model = vec![0u8; SIZE as usize];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000 {
            let sectors = 1 + next() % 2048;
            let start = next() % (SIZE / SECTOR - sectors);
            let (off, len) = (start * SECTOR, (sectors * SECTOR) as usize);
            match next() % 10 {
                0..=5 => {
                    let byte = (i % 251) as u8;
                    let data: Vec<u8> = (0..len).map(|k| byte ^ (k as u8)).collect();
                    d.write(off, &data).expect("write");
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                6 | 7 => {
                    let mut b = vec![0u8; len];
                    d.read(off, &mut b).expect("read");
                    assert!(
                        b == model[off as usize..off as usize + len],
                        "read {i} at {off:#x}+{len}"
                    );
                }
                8 => d.flush().expect("flush"),
                _ => {
                    d.write_zeroes(off, len as u64, false).expect("zeroes");
                    model[off as usize..off as usize + len].fill(0);
                }
            }
        }
        d.flush().expect("flush");
        drop(d);
        let mut all = vec![0u8; SIZE as usize];
        use std::os::unix::fs::FileExt;
        File::open(f.as_path())
            .expect("open")
            .read_exact_at(&mut all, 0)
            .expect("read");
        assert!(all == model, "the file after the last flush");
        let _ = f.as_file().flush();
    }
}
