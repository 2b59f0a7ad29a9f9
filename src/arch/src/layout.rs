//! Guest-physical memory map.
//!
//! ```text
//! 0x0000_0000  real-mode area: GDT 0x500, zero page 0x7000, boot stack 0x8ff0,
//!              page tables 0x9000.., command line 0x20000
//! 0x0009_fc00  EBDA (reserved)       0x000e_0000 ACPI tables (reserved)
//! 0x0010_0000  RAM (kernel, initrd)  .. min(size, 3 GiB)
//! 0xc000_0000  32-bit MMIO hole: PCI BARs 0xc000_0000..0xe000_0000,
//!              ECAM 0xe000_0000 (bus 0: 1 MiB), IOAPIC 0xfec0_0000,
//!              VT-d 0xfed9_0000, local APIC 0xfee0_0000
//! 0x1_0000_0000 RAM past the hole (size − 3 GiB), then the 64-bit PCI window
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (empty; Linux installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot identity map; PDPT and PDs follow it page by page.
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA (RAM below it is usable).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI tables area (the reset-vector stub lives above it).
pub const ACPI_END: u64 = 0xff000;
/// The x86 reset vector (F000:FFF0), where a BIOS reboot jumps.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Start of high memory (the kernel loads here).
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB: where RAM resumes.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM (MCFG) base.
pub const ECAM_START: u64 = 0xe000_0000;
/// ECAM size for bus 0.
pub const ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Size of the 64-bit PCI window.
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;
/// KVM's TSS (Intel VMX needs three pages below 4 GiB, outside RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// An e820 entry type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// A guest RAM region: (guest address, size).
pub type Region = (u64, u64);

/// The memory map for a given RAM size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// RAM regions in address order.
    pub ram: Vec<Region>,
}

impl MemoryLayout {
    /// Splits `mem_size` bytes of RAM around the MMIO hole.
    pub fn new(mem_size: u64) -> Self {
        let low = mem_size.min(MMIO_HOLE_START);
        let mut ram = vec![(0, low)];
        if mem_size > MMIO_HOLE_START {
            ram.push((FOUR_GIB, mem_size - MMIO_HOLE_START));
        }
        Self { ram }
    }

    /// End of RAM below the hole.
    pub fn low_ram_end(&self) -> u64 {
        self.ram.first().map_or(0, |r| r.0 + r.1)
    }

    /// First address past all RAM.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, |r| r.0 + r.1)
    }

    /// The 64-bit PCI window: above RAM and 4 GiB, 1 GiB aligned.
    pub fn pci_mmio64(&self) -> Region {
        let start = self.ram_end().max(FOUR_GIB).next_multiple_of(1 << 30);
        (start, PCI_MMIO64_SIZE)
    }

    /// The e820 map handed to the kernel: (address, size, type).
    pub fn e820(&self) -> Vec<(u64, u64, E820Type)> {
        let mut v = vec![
            (0, EBDA_START, E820Type::Ram),
            (EBDA_START, HIMEM_START - EBDA_START, E820Type::Reserved),
        ];
        let low_end = self.low_ram_end();
        if low_end > HIMEM_START {
            v.push((HIMEM_START, low_end - HIMEM_START, E820Type::Ram));
        }
        v.push((ECAM_START, ECAM_SIZE, E820Type::Reserved));
        for r in self.ram.iter().skip(1) {
            v.push((r.0, r.1, E820Type::Ram));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        let l = MemoryLayout::new(512 << 20);
        assert_eq!(l.ram, vec![(0, 512 << 20)]);
        assert_eq!(l.pci_mmio64().0, FOUR_GIB);
        let e = l.e820();
        assert_eq!(e[0], (0, EBDA_START, E820Type::Ram));
        assert!(e.contains(&(HIMEM_START, (512 << 20) - HIMEM_START, E820Type::Ram)));
        assert!(e.contains(&(ECAM_START, ECAM_SIZE, E820Type::Reserved)));
    }

    #[test]
    fn big_guest_is_split_around_the_hole() {
        let l = MemoryLayout::new(5 << 30);
        assert_eq!(l.ram, vec![(0, 3 << 30), (FOUR_GIB, 2 << 30)]);
        assert_eq!(l.ram_end(), 6 << 30);
        assert_eq!(l.pci_mmio64().0, 6 << 30);
        let total: u64 = l.ram.iter().map(|r| r.1).sum();
        assert_eq!(total, 5 << 30);
        // No RAM region overlaps the hole.
        for (a, s) in &l.ram {
            assert!(a + s <= MMIO_HOLE_START || *a >= FOUR_GIB);
        }
    }
}
