//! Zero-copy loading of the kernel and initrd: a file reader for `linux-loader` and
//! vm-memory whose volatile reads into guest RAM map the file's pages there instead of
//! copying them.
//!
//! Where a read's destination and the file position agree modulo the page size, every
//! whole page of it is mapped `MAP_PRIVATE | MAP_FIXED` from the file over the guest
//! RAM it replaces: the guest sees the file's bytes, its writes stay private
//! (copy-on-write) and nothing is read or zeroed before it touches a page. Partial
//! pages at either end, incongruent ranges, and files that cannot be mapped are read
//! as usual, so a loader that reads a range gets the same bytes either way.
//!
//! Guest RAM must be private anonymous memory of this process (as `vmm::ram` makes it):
//! a mapping over shared memory would detach those pages from whoever shares it. A
//! mapped file must not be modified in place while the VM runs (pages the guest has not
//! written yet show the change, and truncation makes them unreadable); tools that
//! replace files by renaming a new one over them are fine, and [`LoadMode::Copy`]
//! copies everything.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

/// The page size mappings are made in.
const PAGE: u64 = 4096;

/// How the kernel and initrd reach guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadMode {
    /// Map whole pages from the file where possible (no copy), read the rest.
    Map,
    /// Read everything straight into guest RAM (one copy from the page cache, no
    /// intermediate buffer). The default: file pages are 4 KiB pages, so KVM maps
    /// a mapped kernel with 4 KiB pages, and a guest that touches most of its kernel
    /// (Linux does) takes an NPT/EPT fault per 4 KiB instead of per 2 MiB — in the lab
    /// that costs more than the copy saves (BENCHMARKS.md, "Exits per boot").
    #[default]
    Copy,
}

impl std::str::FromStr for LoadMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "map" => Ok(Self::Map),
            "copy" => Ok(Self::Copy),
            _ => Err(format!("'{s}' is not a load mode (expected map or copy)")),
        }
    }
}

/// How a file went into guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Bytes mapped from the file.
    pub mapped: u64,
    /// Bytes read (copied).
    pub copied: u64,
}

/// A file read by a loader, mapping instead of copying where it can (see the module
/// documentation).
pub struct MappingReader<'a> {
    file: &'a mut File,
    pos: u64,
    size: u64,
    mode: LoadMode,
    stats: LoadStats,
}

impl<'a> MappingReader<'a> {
    /// A reader over `file` from its start.
    pub fn new(file: &'a mut File, mode: LoadMode) -> std::io::Result<Self> {
        let size = file.metadata()?.len();
        file.seek(SeekFrom::Start(0))?;
        Ok(Self {
            file,
            pos: 0,
            size,
            mode,
            stats: LoadStats::default(),
        })
    }

    /// What was mapped and copied so far.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// How many bytes of whole pages at `addr` (`len` long) can be mapped from the file
    /// at the current position (0: none).
    fn mappable(&self, addr: u64, len: u64) -> u64 {
        if self.mode != LoadMode::Map
            || !addr.is_multiple_of(PAGE)
            || !self.pos.is_multiple_of(PAGE)
        {
            return 0;
        }
        // Only bytes the file has: a page of a mapping past its end is unreadable.
        let left = self.size.saturating_sub(self.pos);
        len.min(left) & !(PAGE - 1)
    }

    fn copy<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let n = self.file.read_volatile(buf)?;
        self.pos += n as u64;
        self.stats.copied += n as u64;
        Ok(n)
    }

    /// Maps the whole pages at the start of `buf` from the file if it can; returns how
    /// many bytes it mapped (0: none, read them instead).
    fn map_pages<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let dst = buf.ptr_guard_mut().as_ptr();
        let addr = dst as u64;
        let whole = self.mappable(addr, buf.len() as u64);
        let Ok(offset) = libc::off_t::try_from(self.pos) else {
            return Ok(0);
        };
        if whole == 0 {
            return Ok(0);
        }
        // SAFETY: `dst..dst + whole` is page-aligned and lies inside the writable memory
        // the VolatileSlice covers, which this read is asked to fill. MAP_FIXED replaces
        // exactly those pages, readable and writable as before, with a private mapping
        // of the file whose bytes are the ones a read would have written there (the
        // range ends before the file does); no memory outside the slice is touched. KVM,
        // which maps guest RAM by host address, follows the change. (That the pages are
        // no longer shared with anything is the module's documented caller contract.)
        let got = unsafe {
            libc::mmap(
                dst.cast(),
                whole as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if got == libc::MAP_FAILED || got as u64 != addr {
            // The pages are untouched when mmap fails: they are read instead.
            return Ok(0);
        }
        self.pos = self
            .file
            .seek(SeekFrom::Start(self.pos + whole))
            .map_err(VolatileMemoryError::IOError)?;
        self.stats.mapped += whole;
        buf.bitmap().mark_dirty(0, whole as usize);
        Ok(whole as usize)
    }
}

impl Read for MappingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for MappingReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

impl ReadVolatile for MappingReader<'_> {
    /// Fills as much of `buf` as the file has (vm-memory calls this once per region):
    /// a partial first page is read, whole congruent pages are mapped, the rest read.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0usize;
        while done < buf.len() {
            let mut rest = buf.offset(done)?;
            let addr = rest.ptr_guard_mut().as_ptr() as u64;
            let head = ((PAGE - addr % PAGE) % PAGE) as usize;
            let n = if head > 0 && addr % PAGE == self.pos % PAGE {
                // Congruent: read up to the page boundary, then map.
                let mut part = rest.subslice(0, head.min(rest.len()))?;
                self.copy(&mut part)?
            } else if head > 0 {
                self.copy(&mut rest)?
            } else {
                match self.map_pages(&mut rest)? {
                    // Less than a page left, or it cannot be mapped: read it.
                    0 => self.copy(&mut rest)?,
                    m => m,
                }
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn file(len: usize) -> (File, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = std::env::temp_dir().join(format!("fv-mapload-{}-{len}", std::process::id()));
        let mut f = File::create(&path).expect("create");
        f.write_all(&data).expect("write");
        let f = File::open(&path).expect("open");
        let _ = std::fs::remove_file(&path);
        (f, data)
    }

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("ram")
    }

    /// The bytes a loader reads are the file's in both modes; only congruent whole
    /// pages are mapped, and the guest's writes to them stay private.
    #[test]
    fn mapped_and_copied_loads_give_the_same_bytes() {
        let len = 5 * 4096 + 123;
        for (dst, off, mode, want_mapped) in [
            (0x10_0000u64, 0u64, LoadMode::Map, 5 * 4096u64),
            (0x10_0000, 0, LoadMode::Copy, 0),
            // Congruent but unaligned: the partial first page is read.
            (0x10_0800, 0x800, LoadMode::Map, 4 * 4096),
            // Incongruent: all read.
            (0x10_0000, 0x200, LoadMode::Map, 0),
        ] {
            let (mut f, data) = file(len);
            let mem = ram();
            let mut r = MappingReader::new(&mut f, mode).expect("reader");
            r.seek(SeekFrom::Start(off)).expect("seek");
            let n = len - off as usize;
            mem.read_exact_volatile_from(GuestAddress(dst), &mut r, n)
                .expect("load");
            let s = r.stats();
            assert_eq!((s.mapped, s.mapped + s.copied), (want_mapped, n as u64));
            let mut got = vec![0u8; n];
            mem.read_slice(&mut got, GuestAddress(dst)).expect("read");
            assert!(got == data[off as usize..], "{dst:#x} {off:#x} {mode:?}");
            // Past the end of the load: still zero (nothing of the file leaks there).
            let mut after = [0xffu8; 64];
            mem.read_slice(&mut after, GuestAddress(dst + n as u64))
                .expect("read");
            assert_eq!(after, [0u8; 64]);
            // The guest writes its copy; the file is unchanged.
            mem.write_slice(&[0xaa; 16], GuestAddress(dst + 4096))
                .expect("write");
            let mut back = vec![0u8; 16];
            f.seek(SeekFrom::Start(off + 4096)).expect("seek");
            f.read_exact(&mut back).expect("read file");
            assert_eq!(back, data[(off + 4096) as usize..][..16]);
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("map".parse::<LoadMode>(), Ok(LoadMode::Map));
        assert_eq!("copy".parse::<LoadMode>(), Ok(LoadMode::Copy));
        assert!("mmap".parse::<LoadMode>().is_err());
    }
}
