//! virtio-blk's request path on modern virtio-pci: fuzzer-written descriptors (headers,
//! sector numbers, lengths, discard segments, framing), rings, transport and device
//! configuration registers, notifications, on a 256 KiB image in a memfd. Half of the
//! runs put the device behind a VT-d unit that translates with an empty root table the
//! fuzzer cannot reach: then every ring and buffer access faults, guest memory must
//! stay exactly as the fuzzer left it and the image must not change. Always: no panic,
//! the image keeps its size, and the volatile cache stays within its cap.
#![no_main]

use std::sync::Arc;

use devices::interrupt::RecordingController;
use devices::iommu::{reg, Vtd};
use devices::pci::{Bdf, PciDevice};
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use devices::virtio::blk::Blk;
use devices::virtio::disk::{CacheMode, DiskImage, MAX_DIRTY_BYTES};
use devices::virtio::{VirtioPci, BAR0_SIZE};
use faultvisor_fuzz::{memory, snapshot, Input};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 64 << 10;
/// The root table: an all-zero page above the part the fuzzer writes.
const ROOT: u64 = (MEM as u64) - 0x1000;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = memory(MEM);
    let blocked = inp.u8() & 1 == 1;
    let rec = Arc::new(RecordingController::new(24, 64));
    let vtd = blocked.then(|| {
        let v = Arc::new(Vtd::new(mem.clone(), rec.clone()));
        v.write(reg::RTADDR, &ROOT.to_le_bytes());
        v.write(reg::GCMD, &(1u32 << 30).to_le_bytes());
        v.write(reg::GCMD, &(1u32 << 31).to_le_bytes());
        v
    });
    const IMAGE: u64 = 256 << 10;
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked below.
    let fd = unsafe { libc::memfd_create(c"fv-fuzz-disk".as_ptr(), 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    if file.set_len(IMAGE).is_err() {
        return;
    }
    let readonly = inp.u8() & 1 == 1;
    let cache = if inp.u8() & 1 == 1 {
        CacheMode::Host
    } else {
        CacheMode::Volatile
    };
    let Ok(img) = DiskImage::from_file(file, std::path::Path::new("memfd"), readonly, cache) else {
        return;
    };
    let disk = Arc::new(Mutex::new(img));
    let queues = usize::from(inp.u8() % 3) + 1;
    let Ok(mut dev) = VirtioPci::new(
        Blk::new(disk.clone(), queues, "fuzz"),
        Bdf::new(3),
        0xc000_0000,
        mem.clone(),
        vtd,
        rec,
        None,
    ) else {
        return;
    };
    // Bus mastering on, as a driver would.
    dev.config_write(0x04, &0x6u16.to_le_bytes());
    for _ in 0..128 {
        if inp.done() {
            break;
        }
        let before = blocked.then(|| snapshot(&mem, MEM));
        match inp.u8() % 6 {
            0 => {
                // Guest memory below the root table.
                let at = u64::from(inp.u32()) % ROOT;
                let len = usize::from(inp.u8()) + 1;
                let b = inp.bytes(len);
                let n = b.len().min((ROOT - at) as usize);
                let _ = mem.write_slice(&b[..n], GuestAddress(at));
                continue;
            }
            1 | 2 => {
                // Common config and notify registers, and everywhere else in BAR0.
                let off = match inp.u8() % 4 {
                    0 => u64::from(inp.u8() % 0x38),
                    1 => 0x2000 + u64::from(inp.u8() % 16),
                    2 => 0x800 + u64::from(inp.u8() % 64),
                    _ => u64::from(inp.u16()) % (BAR0_SIZE + 8),
                };
                let len = inp.size();
                let v = inp.u64().to_le_bytes();
                dev.bar_write(0, off, &v[..len]);
            }
            3 => {
                let off = u64::from(inp.u16()) % (BAR0_SIZE + 8);
                let mut b = [0u8; 8];
                let len = inp.size();
                dev.bar_read(0, off, &mut b[..len]);
            }
            4 => {
                let off = usize::from(inp.u8());
                let len = inp.size();
                let v = inp.u64().to_le_bytes();
                dev.config_write(off, &v[..len]);
                // Keep bus mastering on, so the rings are really used.
                dev.config_write(0x04, &0x6u16.to_le_bytes());
            }
            _ => {
                let q = u64::from(inp.u8() % 4);
                dev.bar_write(0, 0x2000 + 4 * q, &0u16.to_le_bytes())
            }
        }
        {
            let d = disk.lock().unwrap_or_else(|p| p.into_inner());
            assert_eq!(d.sectors(), IMAGE / 512, "the image keeps its size");
            assert!(d.dirty_bytes() <= MAX_DIRTY_BYTES, "the cache stays within its cap");
            if blocked || readonly {
                assert_eq!(d.dirty_bytes(), 0, "nothing written through a blocking unit or to a read-only disk");
            }
        }
        if let Some(b) = before {
            assert!(
                b == snapshot(&mem, MEM),
                "a device behind a blocking IOMMU wrote guest memory"
            );
        }
    }
    if blocked || readonly {
        let mut d = disk.lock().unwrap_or_else(|p| p.into_inner());
        let _ = d.flush();
        let mut b = vec![0u8; IMAGE as usize];
        if d.read(0, &mut b).is_ok() {
            assert!(b.iter().all(|&x| x == 0), "the image changed behind a blocking unit or read-only");
        }
    }
});
