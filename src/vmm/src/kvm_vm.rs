//! The KVM VM file descriptor bundled with the guest memory its memory slots point at.
//!
//! KVM keeps the host virtual addresses of guest RAM in its memory slots for as long as
//! the VM exists, that is until the VM fd and every vCPU fd are closed. If the mapping
//! went away first, the address range could be reused by another mapping of this
//! process, which the guest would then reach. [`KvmVm`] makes that impossible by
//! construction: it owns a clone of the guest memory and drops it only after the fd,
//! and every vCPU thread holds an `Arc<KvmVm>` until its own vCPU fd is closed.

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

/// A VM fd that keeps its guest memory mapped.
pub struct KvmVm {
    // Field order matters: `fd` is dropped (closed) before `mem` is unmapped.
    fd: VmFd,
    mem: GuestMemoryMmap,
}

impl KvmVm {
    /// Bundles `fd` with `mem`, the memory its slots map.
    pub fn new(fd: VmFd, mem: GuestMemoryMmap) -> Self {
        Self { fd, mem }
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl std::ops::Deref for KvmVm {
    type Target = VmFd;

    fn deref(&self) -> &VmFd {
        &self.fd
    }
}

/// Queue notifications of virtio devices as KVM ioeventfds on MMIO addresses (any
/// access width, no data match), so a notification never exits to userspace.
pub struct IoeventfdRegistrar(pub std::sync::Arc<KvmVm>);

impl devices::virtio::NotifyRegistrar for IoeventfdRegistrar {
    fn register(&self, addr: u64, fd: &vmm_sys_util::eventfd::EventFd) -> Result<(), String> {
        self.0
            .register_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| e.to_string())
    }

    fn unregister(&self, addr: u64, fd: &vmm_sys_util::eventfd::EventFd) -> Result<(), String> {
        self.0
            .unregister_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| e.to_string())
    }
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").finish_non_exhaustive()
    }
}
