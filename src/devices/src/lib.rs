//! faultvisor's device models: the userspace IOAPIC, the PCI framework and the legacy
//! devices (COM1, i8042 reset, debug-exit, boot-timer, ACPI power management).
//!
//! Device models never call KVM. They raise interrupts through the
//! [`interrupt::InterruptController`] trait and end the VM through [`exit::ExitHandle`],
//! so every model here is unit-tested with a recorder instead of `/dev/kvm`. Every
//! register file treats the guest as hostile: unknown offsets and odd access sizes are
//! answered, counted and logged with a rate limit, never a panic.

pub mod exit;
pub mod inject;
pub mod interrupt;
pub mod ioapic;
pub mod iommu;
pub mod legacy;
pub mod limits;
pub mod pci;
pub mod ratelimit;
pub mod sync;
pub mod timeline;
pub mod virtio;

pub use ratelimit::GuestAnomalies;
