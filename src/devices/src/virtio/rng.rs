//! virtio-rng (entropy device, type 4): fills every device-writable buffer the driver
//! offers with bytes from the host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};

use super::VirtioDevice;
use crate::iommu::DeviceMemory;

/// Largest request served at once (bytes); longer buffers get a short fill, which the
/// driver handles (it reads the used length).
const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
pub struct Rng {
    source: Option<File>,
    sizes: [u16; 1],
    served: u64,
    failed: u64,
}

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
        }
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

    fn process_queue(&mut self, _idx: usize, queue: &mut Queue, mem: &DeviceMemory) -> bool {
        let mut used = false;
        // Bounded: at most one lap of the ring per notification.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            let mut ok = true;
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
                if mem.check_range(desc.addr(), want, vm_memory::Permissions::Write)
                    && mem.write_slice(&buf, desc.addr()).is_ok()
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
            self.served += written as u64;
            if queue.add_used(mem, head, written as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}
