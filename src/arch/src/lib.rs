//! The x86_64 platform of faultvisor: guest memory layout and e820, the Linux boot
//! protocol (ELF vmlinux and bzImage through `linux-loader`), Multiboot v1 kernels
//! (kvm-unit-tests), long-mode and 32-bit protected-mode vCPU state,
//! CPUID and MSR setup, and the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT, MCFG).
//!
//! Nothing here issues KVM ioctls: functions fill guest memory or return the register
//! and CPUID values that the `vmm` crate hands to KVM.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mapload;
pub mod msr;
pub mod multiboot;
pub mod regs;
