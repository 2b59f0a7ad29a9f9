//! Shared pieces of the fuzz targets: a reader that turns fuzzer bytes into operations,
//! guest memory filled from them, and a reference VT-d walk that the targets check the
//! unit's translations against.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Operations read from fuzzer bytes; every read past the end yields zeroes.
pub struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    /// Whether the input is used up.
    pub fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.at = end;
        &self.data[start..end]
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// One of the access sizes 1, 2, 4, 8.
    pub fn size(&mut self) -> usize {
        [1, 2, 4, 8][usize::from(self.u8() & 3)]
    }
}

/// Guest RAM of `size` bytes at GPA 0.
pub fn memory(size: usize) -> GuestMemoryMmap {
    match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]) {
        Ok(m) => m,
        Err(e) => panic!("fuzz harness: cannot create guest memory: {e}"),
    }
}

/// A copy of all of `mem` (for before/after comparisons).
pub fn snapshot(mem: &GuestMemoryMmap, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let _ = mem.read_slice(&mut v, GuestAddress(0));
    v
}

/// Writes up to `max` chunks of fuzzer data into `mem` (table contents anywhere).
pub fn fill(inp: &mut Input<'_>, mem: &GuestMemoryMmap, size: usize, max: usize) {
    let n = usize::from(inp.u8()) % (max + 1);
    for _ in 0..n {
        let at = inp.u32() as usize % size;
        let len = usize::from(inp.u8()) + 1;
        let b = inp.bytes(len);
        let _ = mem.write_slice(&b[..b.len().min(size - at)], GuestAddress(at as u64));
    }
}

fn read_u64<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(addr)).ok()
}

/// What the tables in guest memory allow for a write (or read) by `sid` at `iova`,
/// computed independently of the unit and more permissively (no reserved-bit or width
/// checks): `Some(gpa)` if the root, context and every level are present and grant
/// the access. The unit may refuse more, never allow more.
pub fn reference_walk<M: GuestMemoryBackend>(
    mem: &M,
    root: u64,
    sid: u16,
    iova: u64,
    write: bool,
) -> Option<u64> {
    const ADDR: u64 = ((1 << 48) - 1) & !0xfff;
    let re = read_u64(mem, root + u64::from(sid >> 8) * 16)?;
    if re & 1 == 0 {
        return None;
    }
    let ce_at = (re & ADDR) + u64::from(sid & 0xff) * 16;
    let (clo, chi) = (read_u64(mem, ce_at)?, read_u64(mem, ce_at + 8)?);
    if clo & 1 == 0 || (clo >> 2) & 3 != 0 {
        return None;
    }
    let levels = match chi & 7 {
        1 => 3,
        2 => 4,
        _ => return None,
    };
    let need = if write { 2 } else { 1 };
    let mut table = clo & ADDR;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let pte = read_u64(mem, table + ((iova >> shift) & 0x1ff) * 8)?;
        if pte & need == 0 {
            return None;
        }
        let leaf = level == 1 || (pte & (1 << 7) != 0 && level <= 3);
        if leaf {
            let size = 1u64 << shift;
            return Some((pte & ADDR & !(size - 1)) | (iova & (size - 1)));
        }
        table = pte & ADDR;
    }
    None
}
