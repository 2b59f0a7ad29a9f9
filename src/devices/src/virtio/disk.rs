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

use vm_memory::VolatileSlice;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// The overlay's block size.
pub const BLOCK: u64 = 4096;
/// Unflushed bytes the overlay holds before it is written back.
pub const MAX_DIRTY_BYTES: u64 = 64 << 20;
/// Buffers one `preadv`/`pwritev` takes at most (Linux's IOV_MAX).
pub const IOV_MAX: usize = 1024;

/// The guest buffers of one request, in order: slices of guest RAM as vm-memory hands
/// them out (after the IOMMU's translation). Data moves between them and the image
/// file with one `preadv`/`pwritev` per [`IOV_MAX`] buffers, without a bounce copy.
pub type Buffers<'a> = [VolatileSlice<'a, ()>];

/// Bytes in `bufs`.
pub fn buffers_len(bufs: &Buffers<'_>) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Calls `f(piece, done)` for the pieces of `bufs` that make up `len` bytes from byte
/// `at` of their concatenation on (`done`: bytes before the piece); fails when the
/// buffers end first.
pub fn pieces<'a>(
    bufs: &Buffers<'a>,
    mut at: usize,
    len: usize,
    mut f: impl FnMut(VolatileSlice<'a, ()>, usize),
) -> io::Result<()> {
    let mut done = 0;
    for b in bufs {
        if done == len {
            break;
        }
        if at >= b.len() {
            at -= b.len();
            continue;
        }
        let n = (b.len() - at).min(len - done);
        f(b.subslice(at, n).map_err(io::Error::other)?, done);
        done += n;
        at = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "buffers too short",
        ))
    }
}

/// Copies `src` into the concatenation of `bufs` from byte `at` on.
pub fn scatter(bufs: &Buffers<'_>, at: usize, src: &[u8]) -> io::Result<()> {
    pieces(bufs, at, src.len(), |p, done| {
        p.copy_from(&src[done..done + p.len()]);
    })
}

/// Fills `dst` from the concatenation of `bufs` from byte `at` on.
pub fn gather(bufs: &Buffers<'_>, at: usize, dst: &mut [u8]) -> io::Result<()> {
    pieces(bufs, at, dst.len(), |p, done| {
        p.copy_to(&mut dst[done..done + p.len()]);
    })
}

/// `preadv` (or `pwritev`) of all of `iov` at `offset`, [`IOV_MAX`] buffers per call,
/// resuming after a short transfer; `iov` is consumed.
fn vectored(file: &File, mut offset: u64, iov: &mut [libc::iovec], write: bool) -> io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let batch = &iov[first..iov.len().min(first + IOV_MAX)];
        let off = libc::off_t::try_from(offset).map_err(|_| out_of_range())?;
        // SAFETY: every iovec describes memory that stays mapped and unborrowed by Rust
        // for this call: guest RAM (the caller holds the slices it came from) or the
        // overlay's blocks (borrowed by the caller); `batch` is a valid array of
        // `batch.len()` iovecs, at most IOV_MAX.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, off)
            } else {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer",
            ));
        }
        let mut left = n as usize;
        offset += left as u64;
        while left > 0 && first < iov.len() {
            let v = &mut iov[first];
            let k = left.min(v.iov_len);
            // Stays inside the buffer the iovec described.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(k).cast();
            v.iov_len -= k;
            left -= k;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(())
}

/// The iovecs of guest buffers.
fn iovecs(bufs: &Buffers<'_>) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr_guard_mut().as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect()
}

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

/// Blocks the overlay holds at most.
const MAX_BLOCKS: usize = (MAX_DIRTY_BYTES / BLOCK) as usize;

/// The volatile cache: unflushed 4 KiB blocks by block number, kept in one arena of
/// [`MAX_BLOCKS`] slots allocated at the first write (one lazily zeroed mapping,
/// advised for huge pages, rather than an allocation and a page fault per block).
#[derive(Default)]
struct Overlay {
    blocks: BTreeMap<u64, u32>,
    arena: Vec<u8>,
    free: Vec<u32>,
}

impl Overlay {
    fn len(&self) -> usize {
        self.blocks.len()
    }

    fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    fn is_full(&self) -> bool {
        self.blocks.len() >= MAX_BLOCKS
    }

    fn slot(&self, slot: u32) -> &[u8] {
        let at = slot as usize * BLOCK as usize;
        &self.arena[at..at + BLOCK as usize]
    }

    /// Block `b`, if it is cached.
    fn get(&self, b: u64) -> Option<&[u8]> {
        self.blocks.get(&b).map(|&s| self.slot(s))
    }

    /// Whether a block in `lo..=hi` is cached.
    fn any_in(&self, lo: u64, hi: u64) -> bool {
        self.blocks.range(lo..=hi).next().is_some()
    }

    /// Block `b`'s buffer, taking a free slot (filled by `init`) when it is not cached.
    /// The caller keeps the overlay below [`MAX_BLOCKS`] before asking for a new block.
    fn entry(
        &mut self,
        b: u64,
        init: impl FnOnce(&mut [u8]) -> io::Result<()>,
    ) -> io::Result<&mut [u8]> {
        let slot = match self.blocks.get(&b) {
            Some(&s) => s,
            None => {
                if self.arena.is_empty() {
                    self.arena = vec![0u8; MAX_BLOCKS * BLOCK as usize];
                    let start = self.arena.as_ptr() as usize;
                    let aligned = start.next_multiple_of(2 << 20);
                    let end = start + self.arena.len();
                    if aligned < end {
                        // SAFETY: advice on a range inside the arena's allocation; it
                        // changes no contents.
                        unsafe {
                            libc::madvise(
                                aligned as *mut libc::c_void,
                                (end - aligned) & !((2 << 20) - 1),
                                libc::MADV_HUGEPAGE,
                            );
                        }
                    }
                    self.free = (0..MAX_BLOCKS as u32).rev().collect();
                }
                let s = self
                    .free
                    .pop()
                    .ok_or_else(|| io::Error::other("the disk cache is full"))?;
                let at = s as usize * BLOCK as usize;
                init(&mut self.arena[at..at + BLOCK as usize])?;
                self.blocks.insert(b, s);
                s
            }
        };
        let at = slot as usize * BLOCK as usize;
        Ok(&mut self.arena[at..at + BLOCK as usize])
    }

    fn remove(&mut self, b: u64) {
        if let Some(s) = self.blocks.remove(&b) {
            self.free.push(s);
        }
    }

    fn first(&self) -> Option<u64> {
        self.blocks.keys().next().copied()
    }

    fn clear(&mut self) {
        let slots: Vec<u32> = self.blocks.values().copied().collect();
        self.free.extend(slots);
        self.blocks.clear();
    }
}

/// A raw image file.
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    cache: CacheMode,
    overlay: Overlay,
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
            overlay: Overlay::default(),
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

    /// Block `b` of the file into `buf` (the last block of an image may be partial).
    fn file_block(file: &File, size: u64, b: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = b * BLOCK;
        let n = (size - start).min(BLOCK) as usize;
        buf[n..].fill(0);
        file.read_exact_at(&mut buf[..n], start)
    }

    /// The overlay's buffer for block `b`, cached from the file unless the caller
    /// overwrites it whole; a full cache is written back first (and counted).
    fn cache_block(&mut self, b: u64, whole: bool) -> io::Result<&mut [u8]> {
        if self.overlay.get(b).is_none() && self.overlay.is_full() {
            self.stats.writebacks += 1;
            crate::limits::hit(crate::limits::Cap::DiskCache);
            self.write_back()?;
        }
        let (file, size) = (&self.file, self.size);
        self.overlay.entry(b, |buf| {
            if whole {
                Ok(())
            } else {
                Self::file_block(file, size, b, buf)
            }
        })
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
                match self.overlay.get(b) {
                    Some(d) => buf[done..done + n].copy_from_slice(&d[within..within + n]),
                    None => self.file.read_exact_at(&mut buf[done..done + n], at)?,
                }
                done += n;
            }
        }
        self.stats.read_bytes += buf.len() as u64;
        Ok(())
    }

    /// Reads into guest buffers `bufs` at `offset`: one `preadv` per [`IOV_MAX`]
    /// buffers unless unflushed blocks of the overlay lie in the range.
    pub fn read_to(&mut self, offset: u64, bufs: &Buffers<'_>) -> io::Result<()> {
        let len = buffers_len(bufs);
        self.check(offset, len)?;
        let cached = len > 0
            && self
                .overlay
                .any_in(offset / BLOCK, (offset + len - 1) / BLOCK);
        if !cached {
            vectored(&self.file, offset, &mut iovecs(bufs), false)?;
        } else {
            let mut blk = [0u8; BLOCK as usize];
            let mut done = 0u64;
            while done < len {
                let at = offset + done;
                let within = (at % BLOCK) as usize;
                let n = (BLOCK - at % BLOCK).min(len - done) as usize;
                match self.overlay.get(at / BLOCK) {
                    Some(d) => scatter(bufs, done as usize, &d[within..within + n])?,
                    None => {
                        self.file.read_exact_at(&mut blk[..n], at)?;
                        scatter(bufs, done as usize, &blk[..n])?;
                    }
                }
                done += n as u64;
            }
        }
        self.stats.read_bytes += len;
        Ok(())
    }

    /// Writes guest buffers `bufs` at `offset`: to the file with one `pwritev` per
    /// [`IOV_MAX`] buffers (host cache), or copied into the overlay (volatile cache).
    pub fn write_from(&mut self, offset: u64, bufs: &Buffers<'_>) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        let len = buffers_len(bufs);
        self.check(offset, len)?;
        match self.cache {
            CacheMode::Host => vectored(&self.file, offset, &mut iovecs(bufs), true)?,
            CacheMode::Volatile => {
                let mut done = 0u64;
                while done < len {
                    let at = offset + done;
                    let b = at / BLOCK;
                    let within = (at % BLOCK) as usize;
                    let n = (BLOCK - at % BLOCK).min(len - done) as usize;
                    let blk = self.cache_block(b, n == BLOCK as usize)?;
                    gather(bufs, done as usize, &mut blk[within..within + n])?;
                    done += n as u64;
                }
            }
        }
        self.stats.written_bytes += len;
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
                    let blk = self.cache_block(b, n == BLOCK as usize)?;
                    blk[within..within + n].copy_from_slice(&data[done..done + n]);
                    done += n;
                }
            }
        }
        self.stats.written_bytes += data.len() as u64;
        Ok(())
    }

    /// Writes the overlay to the file, one `pwritev` per run of consecutive blocks
    /// (at most [`IOV_MAX`]), and syncs it.
    fn write_back(&mut self) -> io::Result<()> {
        while let Some(first) = self.overlay.first() {
            let mut iov = Vec::new();
            let mut next = first;
            while iov.len() < IOV_MAX {
                let Some(d) = self.overlay.get(next) else {
                    break;
                };
                let n = (self.size - next * BLOCK).min(BLOCK) as usize;
                iov.push(libc::iovec {
                    // pwritev only reads it.
                    iov_base: d.as_ptr() as *mut libc::c_void,
                    iov_len: n,
                });
                next += 1;
            }
            vectored(&self.file, first * BLOCK, &mut iov, true)?;
            for b in first..next {
                self.overlay.remove(b);
            }
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
        byte_model(CacheMode::Volatile);
        byte_model(CacheMode::Host);
    }

    /// Scattered guest buffers for `len` bytes: pieces of random size (sometimes 512
    /// bytes each, so that one transfer needs more than IOV_MAX of them) at random gaps.
    fn scattered<'a>(
        mem: &'a vm_memory::GuestMemoryMmap,
        len: usize,
        next: &mut impl FnMut() -> u64,
    ) -> Vec<VolatileSlice<'a, ()>> {
        use vm_memory::{GuestAddress, GuestMemory, Permissions};
        let small = next().is_multiple_of(4);
        let (mut at, mut left, mut out) = (0u64, len, Vec::new());
        while left > 0 {
            let n = if small {
                512
            } else {
                1 + (next() % 9000) as usize
            }
            .min(left);
            at += next() % 64;
            for sl in GuestMemory::get_slices(mem, GuestAddress(at), n, Permissions::ReadWrite)
                .expect("slices")
            {
                out.push(sl.expect("slice"));
            }
            at += n as u64;
            left -= n;
        }
        out
    }

    fn byte_model(cache: CacheMode) {
        const SIZE: u64 = 80 << 20;
        let f = TempFile::new().expect("tmp");
        f.as_file().set_len(SIZE).expect("len");
        let mut d = DiskImage::open(f.as_path(), false, cache).expect("open");
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4 << 20)])
            .expect("guest memory");
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
                    if i % 2 == 0 {
                        d.write(off, &data).expect("write");
                    } else {
                        let bufs = scattered(&mem, len, &mut next);
                        scatter(&bufs, 0, &data).expect("fill");
                        d.write_from(off, &bufs).expect("write from guest buffers");
                    }
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                6 | 7 => {
                    let mut b = vec![0u8; len];
                    if i % 2 == 0 {
                        d.read(off, &mut b).expect("read");
                    } else {
                        let bufs = scattered(&mem, len, &mut next);
                        d.read_to(off, &bufs).expect("read to guest buffers");
                        gather(&bufs, 0, &mut b).expect("collect");
                    }
                    assert!(
                        b == model[off as usize..off as usize + len],
                        "read {i} at {off:#x}+{len} ({cache:?})"
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
