//! virtio-rng (entropy device, type 4): fills every device-writable buffer the driver
//! offers with bytes from the host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::{Processed, VirtioDevice};
use crate::iommu::DeviceMemory;

/// Largest request served at once (bytes); longer buffers get a short fill, which the
/// driver handles (it reads the used length).
const MAX_REQUEST: usize = 64 * 1024;
/// Bytes one pass serves at most; the rest of the queue waits for the next pass.
pub const PASS_BUDGET: usize = 256 * 1024;

/// The entropy device.
pub struct Rng {
    source: Option<File>,
    sizes: [u16; 1],
    served: u64,
    failed: u64,
    corrupt: Arc<AtomicU32>,
}

/// Where a corrupted descriptor's buffer address points: beyond any address width, so
/// the device's DMA to it faults (reason 0x4) whatever the guest mapped.
pub const CORRUPT_ADDRESS_BIT: u64 = 1 << 48;

impl Rng {
    /// A device reading `/dev/urandom` (opened now; without it requests get 0 bytes).
    pub fn new() -> Self {
        let source = File::open("/dev/urandom")
            .inspect_err(|e| log::warn!("virtio-rng: cannot open /dev/urandom: {e}"))
            .ok();
        Self {
            source,
            sizes: [256],
            served: 0,
            failed: 0,
            corrupt: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Fault injection: the next `n` requests are read as if their descriptors carried a
    /// corrupted buffer address, so the device's DMA faults and the request completes
    /// with 0 bytes. Returns the shared counter for the VMM's API.
    pub fn corruption(&self) -> Arc<AtomicU32> {
        self.corrupt.clone()
    }

    /// (bytes served, requests whose buffers could not be written).
    pub fn counts(&self) -> (u64, u64) {
        (self.served, self.failed)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        4
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn process_queue(&mut self, _idx: usize, queue: &mut Queue, mem: &DeviceMemory) -> Processed {
        let mut used = false;
        let mut served = 0usize;
        // Bounded: at most one lap of the ring and PASS_BUDGET bytes per pass.
        for _ in 0..queue.size() {
            if served >= PASS_BUDGET {
                crate::limits::hit(crate::limits::Cap::VirtioRngBytes);
                return Processed { used, more: true };
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            let mut ok = true;
            let corrupted = self
                .corrupt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            for desc in chain {
                if !desc.is_write_only() {
                    continue;
                }
                let want = (desc.len() as usize).min(MAX_REQUEST - written);
                if want == 0 {
                    break;
                }
                let mut buf = vec![0u8; want];
                if let Some(src) = self.source.as_mut() {
                    if src.read_exact(&mut buf).is_err() {
                        break;
                    }
                }
                // Through the IOMMU when negotiated: an unmapped buffer is a recorded
                // fault, and nothing is written.
                let addr = if corrupted {
                    vm_memory::GuestAddress(desc.addr().0 | CORRUPT_ADDRESS_BIT)
                } else {
                    desc.addr()
                };
                if mem.check_range(addr, want, vm_memory::Permissions::Write)
                    && mem.write_slice(&buf, addr).is_ok()
                {
                    written += want;
                } else {
                    ok = false;
                    break;
                }
            }
            if !ok {
                self.failed += 1;
            }
            served += written;
            self.served += written as u64;
            if queue.add_used(mem, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        Processed { used, more: false }
    }
}
