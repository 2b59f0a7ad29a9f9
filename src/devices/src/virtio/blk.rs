//! virtio-blk (block device, type 2; virtio 1.2 §5.2) on a [`DiskImage`].
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES, one queue per vCPU (up
//! to [`MAX_QUEUES`]), read-only disks (VIRTIO_BLK_F_RO). Each descriptor of a chain
//! is translated once, through the device's DMA view — the VT-d unit's translation
//! once the driver accepts VIRTIO_F_ACCESS_PLATFORM, with faults recorded — into
//! slices of guest RAM; the header, data and status are found in them by byte
//! position, so any framing the driver chooses works.
//! A hostile request cannot do harm: a missing or short header or status byte, a data
//! length that is not whole sectors or exceeds [`MAX_DATA`], a sector range past the
//! end (checked without overflow), more than [`MAX_SEGMENTS`] discard segments, or a
//! buffer the unit refuses all complete with VIRTIO_BLK_S_IOERR (or UNSUPP for an
//! unknown type) and write nothing to the image. Data moves between the image file and
//! those slices by `preadv`/`pwritev` without a bounce copy (see [`Buffers`]).
//!
//! Fault injection ([`BlkFaults`], from the API): fail the next N requests or those
//! touching a sector range with an I/O error, or fault the next N requests' DMA (their
//! data buffer addresses are moved beyond any address width, so the unit records the
//! fault and the guest logs it) — in every case the image is not changed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::disk::{buffers_len, gather, pieces, scatter, Buffers, DiskImage, SECTOR};
use super::{Processed, VirtioDevice};
use crate::iommu::DeviceMemory;
use crate::limits::{hit, Cap};
use crate::sync::lock;

/// Queues at most (the transport's notification bitmap holds 32).
pub const MAX_QUEUES: usize = 16;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data bytes of one request at most (size_max × seg_max as advertised).
pub const MAX_DATA: u64 = 4 << 20;
/// Discard / write-zeroes segments of one request at most.
pub const MAX_SEGMENTS: u32 = 32;
/// Sectors one discard or write-zeroes segment may cover.
pub const MAX_ZERO_SECTORS: u32 = 1 << 15;
/// Requests one pass serves at most.
const PASS_REQUESTS: usize = 64;
/// Delayed completions held at once; past it a delayed request completes at once
/// (counted).
pub const MAX_HELD: usize = 256;
/// Largest descriptor (size_max) and segments per request (seg_max).
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = 128;
/// Bytes a direction of a chain may carry beyond [`MAX_DATA`] (header, status, the
/// discard segments).
const CHAIN_SLACK: u64 = 4096;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device ID string.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;
/// Status: OK.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// Bytes of `struct virtio_blk_config` up to `write_zeroes_may_unmap` (+ padding).
const CONFIG_LEN: usize = 60;

/// Injected storage faults (shared with the API).
#[derive(Debug, Default)]
pub struct BlkFaults {
    /// The next N requests fail with VIRTIO_BLK_S_IOERR.
    pub fail_next: AtomicU32,
    /// Requests touching sectors [start, end) fail while `range_left` > 0.
    pub fail_range: Mutex<Option<(u64, u64)>>,
    /// Remaining requests the range fails.
    pub range_left: AtomicU32,
    /// The next N data-carrying requests' DMA faults in the IOMMU.
    pub dma_fault_next: AtomicU32,
    /// The next N requests read a corrupted header (the sector's top bit flipped, so
    /// the request addresses no sector of the disk).
    pub corrupt_next: AtomicU32,
    /// The next N requests complete `delay_ms` late (their I/O is done at once).
    pub delay_next: AtomicU32,
    /// The delay of those requests.
    pub delay_ms: AtomicU64,
    /// Injected failures so far.
    pub injected: AtomicU64,
    /// Completions by outcome: OK, IOERR, UNSUPP, no status written.
    outcomes: [AtomicU64; 4],
}

impl BlkFaults {
    /// The device's counters.
    pub fn stats(&self) -> BlkStats {
        let n = |i: usize| self.outcomes[i].load(Ordering::Relaxed);
        BlkStats {
            ok: n(0),
            ioerr: n(1),
            unsupp: n(2),
            lost_status: n(3),
        }
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Whether the request on sectors [start, start + n) is to fail now.
    fn fail(&self, start: u64, n: u64) -> bool {
        if Self::take(&self.fail_next) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let range = *lock(&self.fail_range);
        if let Some((a, b)) = range {
            let end = start.saturating_add(n.max(1));
            if start < b && a < end && Self::take(&self.range_left) {
                self.injected.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

/// Counters of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed, by outcome.
    pub ok: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub ioerr: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupp: u64,
    /// Requests whose status byte could not be written (DMA refused).
    pub lost_status: u64,
}

/// A completion held back by an injected delay.
#[derive(Clone, Copy, Debug)]
struct Held {
    due: std::time::Instant,
    queue: usize,
    head: u16,
    len: u32,
}

/// The block device.
pub struct Blk {
    held: std::collections::VecDeque<Held>,
    disk: Arc<Mutex<DiskImage>>,
    id: [u8; 20],
    sizes: Vec<u16>,
    faults: Arc<BlkFaults>,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Header {
    ty: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: Header is plain old data (two u32 and a u64, repr(C), no padding).
unsafe impl vm_memory::ByteValued for Header {}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

// SAFETY: Segment is plain old data (a u64 and two u32, repr(C), no padding).
unsafe impl vm_memory::ByteValued for Segment {}

impl Blk {
    /// A device on `disk` with `queues` queues (1 to [`MAX_QUEUES`]) and the serial
    /// `id` (GET_ID, at most 20 bytes).
    pub fn new(disk: Arc<Mutex<DiskImage>>, queues: usize, id: &str) -> Self {
        let mut b = [0u8; 20];
        for (d, s) in b.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Self {
            held: std::collections::VecDeque::new(),
            disk,
            id: b,
            sizes: vec![QUEUE_SIZE; queues.clamp(1, MAX_QUEUES)],
            faults: Arc::new(BlkFaults::default()),
        }
    }

    /// The fault-injection switches.
    pub fn faults(&self) -> Arc<BlkFaults> {
        self.faults.clone()
    }

    /// The image.
    pub fn disk(&self) -> Arc<Mutex<DiskImage>> {
        self.disk.clone()
    }

    /// Counters.
    pub fn stats(&self) -> BlkStats {
        self.faults.stats()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let sectors = lock(&self.disk).sectors();
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&(self.sizes.len() as u16).to_le_bytes());
        // Discard and write-zeroes limits.
        c[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[56] = 1;
        c
    }

    /// Runs one request; returns its status and the data bytes written to the guest.
    /// `data_r` is what the driver gave to read after the header, `data_w` what it gave
    /// to write before the status byte.
    fn execute(&mut self, hdr: Header, data_r: &Buffers<'_>, data_w: &Buffers<'_>) -> (u8, usize) {
        let sectors = lock(&self.disk).sectors();
        let ro = lock(&self.disk).readonly();
        let range_ok = |sector: u64, bytes: u64| {
            bytes.is_multiple_of(SECTOR)
                && bytes <= MAX_DATA
                && sector
                    .checked_add(bytes / SECTOR)
                    .is_some_and(|end| end <= sectors)
        };
        match hdr.ty {
            T_IN | T_OUT => {
                let data = if hdr.ty == T_IN { data_w } else { data_r };
                let bytes = buffers_len(data);
                if bytes > MAX_DATA {
                    hit(Cap::BlkRequest);
                }
                if !range_ok(hdr.sector, bytes) || (hdr.ty == T_OUT && ro) {
                    return (S_IOERR, 0);
                }
                if self.faults.fail(hdr.sector, bytes / SECTOR) {
                    return (S_IOERR, 0);
                }
                let at = hdr.sector * SECTOR;
                let r = if hdr.ty == T_IN {
                    lock(&self.disk).read_to(at, data)
                } else {
                    lock(&self.disk).write_from(at, data)
                };
                match (r, hdr.ty) {
                    (Ok(()), T_IN) => (S_OK, bytes as usize),
                    (Ok(()), _) => (S_OK, 0),
                    (Err(_), _) => (S_IOERR, 0),
                }
            }
            T_FLUSH => {
                if self.faults.fail(0, 0) {
                    return (S_IOERR, 0);
                }
                match lock(&self.disk).flush() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        log::warn!("virtio-blk: flush failed: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            T_GET_ID => {
                let n = (buffers_len(data_w) as usize).min(self.id.len());
                match scatter(data_w, 0, &self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if ro {
                    return (S_IOERR, 0);
                }
                let len = buffers_len(data_r);
                if len == 0 || !len.is_multiple_of(16) {
                    return (S_IOERR, 0);
                }
                if len / 16 > u64::from(MAX_SEGMENTS) {
                    hit(Cap::BlkRequest);
                    return (S_IOERR, 0);
                }
                let mut segs = Vec::new();
                for i in 0..(len / 16) as usize {
                    let mut raw = [0u8; 16];
                    if gather(data_r, i * 16, &mut raw).is_err() {
                        return (S_IOERR, 0);
                    }
                    let s = Segment {
                        sector: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
                        num_sectors: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
                        flags: u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default()),
                    };
                    let in_range = s
                        .sector
                        .checked_add(u64::from(s.num_sectors))
                        .is_some_and(|e| e <= sectors);
                    if s.num_sectors > MAX_ZERO_SECTORS || s.flags & !1 != 0 || !in_range {
                        return (S_IOERR, 0);
                    }
                    segs.push(s);
                }
                for s in &segs {
                    if self.faults.fail(s.sector, u64::from(s.num_sectors)) {
                        return (S_IOERR, 0);
                    }
                }
                let mut d = lock(&self.disk);
                for s in segs {
                    let (off, len) = (s.sector * SECTOR, u64::from(s.num_sectors) * SECTOR);
                    let r = if hdr.ty == T_DISCARD {
                        d.discard(off, len)
                    } else {
                        d.write_zeroes(off, len, s.flags & 1 != 0)
                    };
                    if r.is_err() {
                        return (S_IOERR, 0);
                    }
                }
                (S_OK, 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }
}

/// `len` bytes of the concatenation of `bufs` from byte `start` on, as slices (fewer
/// when the buffers end first).
fn sub<'a>(bufs: &Buffers<'a>, start: usize, len: usize) -> Vec<VolatileSlice<'a, ()>> {
    let mut out = Vec::new();
    let _ = pieces(bufs, start, len, |p, _| out.push(p));
    out
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        2
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;
        if self.sizes.len() > 1 {
            f |= F_MQ;
        }
        if lock(&self.disk).readonly() {
            f |= F_RO;
        }
        f
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let c = self.config();
        for (i, d) in data.iter_mut().enumerate() {
            *d = c.get(offset + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, idx: usize, queue: &mut Queue, mem: &DeviceMemory) -> Processed {
        let mut used = false;
        // Delayed completions of this queue that are due.
        let now = std::time::Instant::now();
        let mut keep = std::collections::VecDeque::new();
        while let Some(h) = self.held.pop_front() {
            if h.queue == idx && h.due <= now {
                if queue.add_used(mem, h.head, h.len).is_ok() {
                    used = true;
                }
            } else {
                keep.push_back(h);
            }
        }
        self.held = keep;
        for _ in 0..PASS_REQUESTS.min(usize::from(queue.size())) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Processed { used, more: false };
            };
            let head = chain.head_index();
            let dma_fault = BlkFaults::take(&self.faults.dma_fault_next);
            let (status, len) = self.request(chain, mem, dma_fault);
            let slot = match status {
                Some(S_OK) => 0,
                Some(S_UNSUPP) => 2,
                Some(_) => 1,
                None => 3,
            };
            self.faults.outcomes[slot].fetch_add(1, Ordering::Relaxed);
            if BlkFaults::take(&self.faults.delay_next) {
                if self.held.len() < MAX_HELD {
                    self.faults.injected.fetch_add(1, Ordering::Relaxed);
                    let ms = self.faults.delay_ms.load(Ordering::Relaxed).min(60_000);
                    self.held.push_back(Held {
                        due: now + std::time::Duration::from_millis(ms),
                        queue: idx,
                        head,
                        len: len as u32,
                    });
                    continue;
                }
                hit(Cap::BlkRequest);
            }
            if queue.add_used(mem, head, len as u32).is_err() {
                return Processed { used, more: false };
            }
            used = true;
        }
        Processed { used, more: true }
    }

    fn reset(&mut self) {
        // The driver reset the rings: held completions have nowhere to go.
        self.held.clear();
    }

    fn next_due(&self) -> Option<(std::time::Instant, u32)> {
        let at = self.held.iter().map(|h| h.due).min()?;
        let queues = self
            .held
            .iter()
            .fold(0u32, |m, h| m | (1u32 << (h.queue.min(31))));
        Some((at, queues))
    }
}

impl Blk {
    /// Parses and runs one chain; returns the status written (None: it could not be
    /// written) and the bytes written to the guest.
    fn request(
        &mut self,
        chain: virtio_queue::DescriptorChain<&DeviceMemory>,
        mem: &DeviceMemory,
        dma_fault: bool,
    ) -> (Option<u8>, usize) {
        // With an injected DMA fault the data buffer's address is moved beyond any
        // address width: the unit refuses (and records) the transfer, the request fails.
        let data_desc = chain
            .clone()
            .nth(1)
            .map(|d| (d.addr(), d.len(), d.is_write_only()));
        // Where the status byte goes when the buffers cannot be reached: the driver
        // must still learn that the request failed.
        let status_at = chain
            .clone()
            .last()
            .filter(|d| d.is_write_only() && d.len() > 0)
            .map(|d| GuestAddress(d.addr().0.wrapping_add(u64::from(d.len()) - 1)));
        let fail = |what: &str| match status_at {
            Some(a) if vm_memory::Bytes::write_obj(mem, S_IOERR, a).is_ok() => (Some(S_IOERR), 1),
            _ => {
                log::warn!("virtio-blk: a request's {what} and its status are unreachable");
                (None, 0)
            }
        };
        // Every descriptor translated once, into guest-RAM slices; no direction may
        // carry more than a request can use (checked before any translation).
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        let (mut r_len, mut w_len) = (0u64, 0u64);
        for d in chain {
            let (list, total, perm) = if d.is_write_only() {
                (&mut writable, &mut w_len, Permissions::Write)
            } else {
                (&mut readable, &mut r_len, Permissions::Read)
            };
            *total += u64::from(d.len());
            if *total > MAX_DATA + CHAIN_SLACK {
                hit(Cap::BlkRequest);
                return fail("buffers are too large");
            }
            let Ok(slices) = GuestMemory::get_slices(mem, d.addr(), d.len() as usize, perm) else {
                log::warn!(
                    "virtio-blk: a request's buffer at {:#x} is unreachable",
                    d.addr().0
                );
                return fail("buffers");
            };
            for sl in slices {
                match sl {
                    Ok(sl) => list.push(sl),
                    Err(_) => return fail("buffers"),
                }
            }
        }
        let mut raw = [0u8; 16];
        if gather(&readable, 0, &mut raw).is_err() {
            return (None, 0);
        }
        let mut hdr = Header {
            ty: u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default()),
            sector: u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default()),
            ..Header::default()
        };
        if BlkFaults::take(&self.faults.corrupt_next) {
            self.faults.injected.fetch_add(1, Ordering::Relaxed);
            hdr.sector ^= 1 << 63;
        }
        let w = w_len as usize;
        if w == 0 {
            return (None, 0);
        }
        let data_w = sub(&writable, 0, w - 1);
        let status_w = sub(&writable, w - 1, 1);
        let data_r = sub(&readable, 16, (r_len as usize).saturating_sub(16));
        let (status, n) = match data_desc {
            Some((addr, len, write)) if dma_fault && matches!(hdr.ty, T_IN | T_OUT) => {
                self.faults.injected.fetch_add(1, Ordering::Relaxed);
                let perm = if write {
                    Permissions::Write
                } else {
                    Permissions::Read
                };
                let bad = GuestAddress(addr.0 | super::rng::CORRUPT_ADDRESS_BIT);
                let _ = GuestMemory::check_range(mem, bad, len.max(1) as usize, perm);
                (S_IOERR, 0)
            }
            _ => self.execute(hdr, &data_r, &data_w),
        };
        if scatter(&status_w, 0, &[status]).is_err() {
            return (None, n);
        }
        (Some(status), n + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::disk::CacheMode;
    use super::super::{VirtioPci, MSIX_TABLE, NOTIFY};
    use super::*;
    use crate::interrupt::RecordingController;
    use crate::pci::{Bdf, PciDevice};
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x10_1000;
    const USED: u64 = 0x10_2000;
    const HDR: u64 = 0x20_0000;
    const DATA: u64 = 0x30_0000;
    const STATUS: u64 = 0x50_0000;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: VirtioPci<Blk>,
        file: TempFile,
        faults: Arc<BlkFaults>,
        disk: Arc<Mutex<DiskImage>>,
        next: u16,
    }

    fn rig(sectors: u64, readonly: bool) -> Rig {
        rig_with(sectors, readonly, false)
    }

    fn rig_with(sectors: u64, readonly: bool, unit: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).expect("mem");
        let rec = Arc::new(RecordingController::new(24, 100));
        let vtd = unit.then(|| Arc::new(crate::iommu::Vtd::new(mem.clone(), rec.clone())));
        let file = TempFile::new().expect("tmp");
        file.as_file()
            .write_all(&vec![0xaa; (sectors * SECTOR) as usize])
            .expect("fill");
        let disk = Arc::new(Mutex::new(
            DiskImage::open(file.as_path(), readonly, CacheMode::Volatile).expect("disk"),
        ));
        let blk = Blk::new(disk.clone(), 2, "fv-serial-0123456789abcdef");
        let faults = blk.faults();
        let mut dev = VirtioPci::new(blk, Bdf::new(4), 0xc000_0000, mem.clone(), vtd, rec, None)
            .expect("device");
        dev.config_write(
            crate::pci::config::reg::COMMAND,
            &(crate::pci::config::CMD_MEMORY | crate::pci::config::CMD_BUS_MASTER).to_le_bytes(),
        );
        let mut r = Rig {
            mem,
            dev,
            file,
            faults,
            disk,
            next: 0,
        };
        r.w(0x14, 0, 1);
        r.w(0x14, 3, 1);
        r.w(0x08, 1, 4);
        // VERSION_1, and ACCESS_PLATFORM with the unit.
        r.w(0x0c, if unit { 3 } else { 1 }, 4);
        r.w(0x00, 0, 4);
        let offered = r.r(0x04, 4);
        r.w(0x08, 0, 4);
        r.w(0x0c, offered, 4);
        r.w(0x14, 3 | 8, 1);
        assert_eq!(r.r(0x14, 1) & 8, 8, "FEATURES_OK");
        r.w(0x16, 0, 2);
        r.w(0x18, 8, 2);
        for (off, a) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            r.w(off, a as u32, 4);
            r.w(off + 4, 0, 4);
        }
        r.w(0x1c, 1, 2);
        r.w(0x14, 3 | 8 | 4, 1);
        let _ = MSIX_TABLE;
        r
    }

    impl Rig {
        fn w(&mut self, off: u64, v: u32, len: usize) {
            self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
        }

        fn r(&mut self, off: u64, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.dev.bar_read(0, off, &mut b[..len]);
            u32::from_le_bytes(b)
        }

        fn cfg(&mut self, off: u64) -> u64 {
            let mut b = [0u8; 8];
            self.dev.bar_read(0, 0x800 + off, &mut b);
            u64::from_le_bytes(b)
        }

        /// Submits a request of type `ty` at `sector` with a data buffer of `len`
        /// bytes (device-writable when `write`), returns (status, used length).
        fn submit(&mut self, ty: u32, sector: u64, len: u32, write: bool) -> (u8, u32) {
            self.post(ty, sector, len, write);
            let m = &self.mem.clone();
            let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).expect("r");
            assert_eq!(used_idx, self.next, "completed");
            let idx = self.next.wrapping_sub(1);
            let len: u32 = m
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(idx % 8) + 4))
                .expect("r");
            let st: u8 = m.read_obj(GuestAddress(STATUS)).expect("r");
            (st, len)
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).expect("r")
        }

        /// Puts a request in the ring and notifies (no check that it completed).
        fn post(&mut self, ty: u32, sector: u64, len: u32, write: bool) {
            let segs: &[u32] = if len > 0 { &[len] } else { &[] };
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("w");
            post_chain(self, ty, sector, segs, write, DATA);
        }

        fn on_file(&self, at: u64, n: usize) -> Vec<u8> {
            use std::os::unix::fs::FileExt;
            let mut v = vec![0u8; n];
            std::fs::File::open(self.file.as_path())
                .expect("open")
                .read_exact_at(&mut v, at)
                .expect("read");
            v
        }
    }

    #[test]
    fn config_space_and_features() {
        let mut r = rig(2048, false);
        assert_eq!(r.cfg(0), 2048, "capacity in sectors");
        assert_eq!(r.cfg(20) as u32, 512, "blk_size");
        assert_eq!((r.cfg(34) & 0xffff) as u16, 2, "num_queues");
        r.w(0x00, 0, 4);
        let f = u64::from(r.r(0x04, 4));
        assert_ne!(f & F_FLUSH, 0);
        assert_eq!(f & F_RO, 0);
        assert_eq!(r.r(0x12, 2), 2, "two queues");
    }

    #[test]
    fn write_flush_read_back() {
        let mut r = rig(2048, false);
        r.mem
            .write_slice(&[0x5a; 4096], GuestAddress(DATA))
            .expect("w");
        assert_eq!(r.submit(T_OUT, 8, 4096, false), (S_OK, 1));
        assert_eq!(r.on_file(8 * 512, 4), vec![0xaa; 4], "held until flush");
        assert_eq!(r.submit(T_FLUSH, 0, 0, false), (S_OK, 1));
        assert_eq!(r.on_file(8 * 512, 4096), vec![0x5a; 4096]);
        assert_eq!(
            r.on_file(16 * 512, 4),
            vec![0xaa; 4],
            "nothing outside the sectors"
        );
        r.mem
            .write_slice(&[0u8; 4096], GuestAddress(DATA))
            .expect("w");
        assert_eq!(r.submit(T_IN, 8, 4096, true), (S_OK, 4097));
        let mut b = [0u8; 4096];
        r.mem.read_slice(&mut b, GuestAddress(DATA)).expect("r");
        assert_eq!(b, [0x5a; 4096]);
        // GET_ID.
        assert_eq!(r.submit(T_GET_ID, 0, 20, true), (S_OK, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).expect("r");
        assert_eq!(&id, b"fv-serial-0123456789");
        assert_eq!(r.dev.device().stats().ok, 4);
    }

    #[test]
    fn hostile_requests_fail_without_touching_the_image() {
        let mut r = rig(64, false);
        r.mem
            .write_slice(&[0x11; 8192], GuestAddress(DATA))
            .expect("w");
        // Past the end, overflowing sector, partial sector, unknown type.
        assert_eq!(r.submit(T_OUT, 63, 1024, false).0, S_IOERR);
        assert_eq!(r.submit(T_OUT, u64::MAX, 512, false).0, S_IOERR);
        assert_eq!(r.submit(T_OUT, 0, 100, false).0, S_IOERR);
        assert_eq!(r.submit(T_IN, u64::MAX - 1, 512, true).0, S_IOERR);
        assert_eq!(r.submit(99, 0, 512, true).0, S_UNSUPP);
        // A discard segment past the end.
        let seg = [60u64.to_le_bytes(), 8u64.to_le_bytes()].concat();
        r.mem.write_slice(&seg, GuestAddress(DATA)).expect("w");
        assert_eq!(r.submit(T_DISCARD, 0, 16, false).0, S_IOERR);
        r.submit(T_FLUSH, 0, 0, false);
        assert_eq!(r.on_file(0, 64 * 512), vec![0xaa; 64 * 512]);
        assert!(r.dev.device().stats().ioerr >= 5);
    }

    #[test]
    fn injected_failures_and_power_cut() {
        let mut r = rig(256, false);
        r.mem
            .write_slice(&[0x22; 512], GuestAddress(DATA))
            .expect("w");
        r.faults.fail_next.store(1, Ordering::SeqCst);
        assert_eq!(r.submit(T_OUT, 0, 512, false).0, S_IOERR);
        assert_eq!(r.submit(T_OUT, 0, 512, false).0, S_OK);
        *lock(&r.faults.fail_range) = Some((100, 110));
        r.faults.range_left.store(5, Ordering::SeqCst);
        assert_eq!(r.submit(T_OUT, 50, 512, false).0, S_OK, "outside the range");
        assert_eq!(r.submit(T_OUT, 109, 1024, false).0, S_IOERR, "overlaps");
        r.faults.dma_fault_next.store(1, Ordering::SeqCst);
        assert_eq!(r.submit(T_OUT, 1, 512, false).0, S_IOERR);
        r.submit(T_FLUSH, 0, 0, false);
        assert_eq!(r.on_file(0, 512), vec![0x22; 512]);
        assert_eq!(
            r.on_file(512, 512),
            vec![0xaa; 512],
            "faulted write left no trace"
        );
        assert_eq!(r.on_file(109 * 512, 1024), vec![0xaa; 1024]);
        // Unflushed write, then a power cut.
        r.mem
            .write_slice(&[0x33; 512], GuestAddress(DATA))
            .expect("w");
        assert_eq!(r.submit(T_OUT, 2, 512, false).0, S_OK);
        r.faults.corrupt_next.store(1, Ordering::SeqCst);
        assert_eq!(
            r.submit(T_OUT, 3, 512, false).0,
            S_IOERR,
            "corrupted header"
        );
        assert_eq!(lock(&r.disk).power_cut(), 4096);
        assert_eq!(
            r.submit(T_FLUSH, 0, 0, false).0,
            S_IOERR,
            "no I/O after the cut"
        );
        assert_eq!(
            r.on_file(2 * 512, 512),
            vec![0xaa; 512],
            "the unflushed write is gone"
        );
        assert_eq!(r.on_file(3 * 512, 512), vec![0xaa; 512]);
        assert_eq!(r.faults.injected.load(Ordering::SeqCst), 4);
    }

    /// Submits a request whose data is split over `segs` descriptors at DATA.
    fn submit_segs(r: &mut Rig, ty: u32, sector: u64, segs: &[u32], write: bool) -> u8 {
        submit_at(r, ty, sector, segs, write, DATA)
    }

    fn submit_at(r: &mut Rig, ty: u32, sector: u64, segs: &[u32], write: bool, data: u64) -> u8 {
        post_chain(r, ty, sector, segs, write, data);
        assert_eq!(r.used_idx(), r.next);
        r.mem.read_obj(GuestAddress(STATUS)).expect("r")
    }

    /// Writes a header, data descriptors at `data` and a status byte into the ring, and
    /// notifies.
    fn post_chain(r: &mut Rig, ty: u32, sector: u64, segs: &[u32], write: bool, data: u64) {
        let m = r.mem.clone();
        m.write_obj(ty, GuestAddress(HDR)).expect("w");
        m.write_obj(0u32, GuestAddress(HDR + 4)).expect("w");
        m.write_obj(sector, GuestAddress(HDR + 8)).expect("w");
        let mut descs = vec![(HDR, 16u32, 0u16)];
        let mut at = data;
        for &l in segs {
            descs.push((at, l, if write { 2 } else { 0 }));
            at += u64::from(l);
        }
        descs.push((STATUS, 1, 2));
        let n = descs.len();
        for (i, (a, l, f)) in descs.into_iter().enumerate() {
            let d = DESC + 16 * i as u64;
            let flags = f | if i + 1 < n { 1 } else { 0 };
            m.write_obj(a, GuestAddress(d)).expect("w");
            m.write_obj(l, GuestAddress(d + 8)).expect("w");
            m.write_obj(flags, GuestAddress(d + 12)).expect("w");
            m.write_obj((i + 1) as u16, GuestAddress(d + 14))
                .expect("w");
        }
        let idx = r.next;
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 8)))
            .expect("w");
        r.next = idx.wrapping_add(1);
        m.write_obj(r.next, GuestAddress(AVAIL + 2)).expect("w");
        r.w(NOTIFY, 0, 2);
    }

    #[test]
    fn unreachable_buffers_still_get_an_error_status() {
        let mut r = rig(64, false);
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("w");
        // Data beyond guest memory (32 MiB): neither readable nor writable.
        assert_eq!(
            submit_at(&mut r, T_OUT, 0, &[512], false, 64 << 20),
            S_IOERR
        );
        assert_eq!(submit_at(&mut r, T_IN, 0, &[512], true, 64 << 20), S_IOERR);
        assert_eq!(r.dev.device().stats().ioerr, 2);
        assert_eq!(r.on_file(0, 512), vec![0xaa; 512]);
    }

    #[test]
    fn large_requests_over_many_descriptors_round_trip() {
        large_round_trip(false);
    }

    #[test]
    fn large_requests_round_trip_through_the_unit_with_translation_off() {
        large_round_trip(true);
    }

    fn large_round_trip(unit: bool) {
        let mut r = rig_with(8192, false, unit);
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        r.mem.write_slice(&data, GuestAddress(DATA)).expect("w");
        // 1 MiB in three odd-sized pieces (each a whole number of sectors overall).
        assert_eq!(
            submit_segs(
                &mut r,
                T_OUT,
                100,
                &[300 * 512, 200 * 512, 1548 * 512],
                false
            ),
            S_OK
        );
        r.mem
            .write_slice(&vec![0u8; 1 << 20], GuestAddress(DATA))
            .expect("w");
        // Read it back framed differently, including pieces that are not sector sized.
        assert_eq!(
            submit_segs(&mut r, T_IN, 100, &[1000, 523_288, 524_288], true),
            S_OK
        );
        let mut b = vec![0u8; 1 << 20];
        r.mem.read_slice(&mut b, GuestAddress(DATA)).expect("r");
        assert!(b == data, "read back what was written");
        assert_eq!(submit_segs(&mut r, T_FLUSH, 0, &[], false), S_OK);
        assert!(
            r.on_file(100 * 512, 1 << 20) == data,
            "in the file after the flush"
        );
    }

    #[test]
    fn delayed_requests_complete_late() {
        let mut r = rig(64, false);
        r.faults.delay_ms.store(40, Ordering::SeqCst);
        r.faults.delay_next.store(1, Ordering::SeqCst);
        r.post(T_FLUSH, 0, 0, false);
        assert_eq!(r.used_idx(), 0, "held back");
        let due = r.dev.device().next_due().expect("due");
        assert_eq!(due.1, 1, "queue 0");
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The worker's timed pass (a notification here) completes it.
        r.w(NOTIFY, 0, 2);
        assert_eq!(r.used_idx(), 1);
        assert!(r.dev.device().next_due().is_none());
        assert_eq!(
            r.submit(T_FLUSH, 0, 0, false).0,
            S_OK,
            "the next one is on time"
        );
    }

    #[test]
    fn readonly_disk_refuses_writes() {
        let mut r = rig(64, true);
        r.w(0x00, 0, 4);
        assert_ne!(u64::from(r.r(0x04, 4)) & F_RO, 0);
        assert_eq!(r.submit(T_OUT, 0, 512, false).0, S_IOERR);
        assert_eq!(r.submit(T_IN, 0, 512, true).0, S_OK);
        assert_eq!(r.submit(T_WRITE_ZEROES, 0, 16, false).0, S_IOERR);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mut r = rig(256, false);
        let seg = |s: u64, n: u32, f: u32| {
            [
                s.to_le_bytes().to_vec(),
                n.to_le_bytes().to_vec(),
                f.to_le_bytes().to_vec(),
            ]
            .concat()
        };
        r.mem
            .write_slice(&seg(8, 8, 0), GuestAddress(DATA))
            .expect("w");
        assert_eq!(r.submit(T_WRITE_ZEROES, 0, 16, false).0, S_OK);
        r.mem
            .write_slice(&seg(32, 8, 0), GuestAddress(DATA))
            .expect("w");
        assert_eq!(r.submit(T_DISCARD, 0, 16, false).0, S_OK);
        // Reserved flag bits are refused.
        r.mem
            .write_slice(&seg(0, 1, 2), GuestAddress(DATA))
            .expect("w");
        assert_eq!(r.submit(T_WRITE_ZEROES, 0, 16, false).0, S_IOERR);
        r.submit(T_FLUSH, 0, 0, false);
        assert_eq!(r.on_file(8 * 512, 4096), vec![0u8; 4096]);
        assert_eq!(r.on_file(32 * 512, 4096), vec![0u8; 4096]);
        assert_eq!(r.on_file(0, 4096), vec![0xaa; 4096]);
    }
}
