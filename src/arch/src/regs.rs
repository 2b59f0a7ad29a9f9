//! Boot vCPU state. For the Linux 64-bit entry point: a flat GDT, an identity map of
//! the first 4 GiB with 2 MiB pages, CR0/CR4/EFER, and the general registers (entry in
//! `%rip`, zero page in `%rsi`). For a Multiboot kernel: 32-bit protected mode with
//! paging off, flat 4 GiB code and data segments, `%eax` = `0x2BADB002` and `%ebx` the
//! Multiboot information. Intel SDM vol. 3 §3.4.5 (segment descriptors), §4.5 (4-level
//! paging), §9.8.5 (entering IA-32e mode); Multiboot Specification §3.2.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// GDT: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// GDT of a Multiboot entry: null, 32-bit code, 32-bit data, TSS.
const GDT32: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// The Linux 64-bit entry point (zero page in `%rsi`).
    Linux64(u64),
    /// A Multiboot kernel's 32-bit entry, with the information's address.
    Multiboot {
        /// Entry point (physical).
        entry: u32,
        /// Multiboot information (`%ebx`).
        info: u32,
    },
}

/// Code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry flags: present, writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-directory entry flag: 2 MiB page.
const PDE_PS: u64 = 1 << 7;
/// Number of page directories (one per GiB) of the boot identity map.
const IDENTITY_MAP_GIB: u64 = 4;

/// Packs a segment descriptor from flags (access byte and granularity nibble), base and
/// limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if flags & 0x8000 != 0 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        padding: 0,
        unusable: u8::from((flags >> 7) & 1 == 0),
    }
}

/// Errors writing boot structures.
#[derive(Debug, thiserror::Error)]
#[error("cannot write boot CPU structures to guest memory: {0}")]
pub struct RegsError(String);

/// Writes the GDT, an empty IDT and the identity map; returns the special registers
/// for 64-bit mode. `base` should come from `KVM_GET_SREGS` so unrelated fields keep
/// KVM's defaults.
pub fn setup_long_mode(mem: &GuestMemoryMmap, mut base: kvm_sregs) -> Result<kvm_sregs, RegsError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| RegsError(e.to_string()))
    };
    for (i, e) in GDT.iter().enumerate() {
        w(*e, layout::BOOT_GDT_START + 8 * i as u64)?;
    }
    w(0, layout::BOOT_IDT_START)?;

    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
    let pdpt = layout::PML4_START + 0x1000;
    let pd0 = pdpt + 0x1000;
    w(pdpt | PTE_PRESENT_RW, layout::PML4_START)?;
    for g in 0..IDENTITY_MAP_GIB {
        let pd = pd0 + g * 0x1000;
        w(pd | PTE_PRESENT_RW, pdpt + 8 * g)?;
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            w(addr | PTE_PRESENT_RW | PDE_PS, pd + 8 * i)?;
        }
    }

    base.gdt.base = layout::BOOT_GDT_START;
    base.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    base.idt.base = layout::BOOT_IDT_START;
    base.idt.limit = 7;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    base.cs = code;
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = tss;
    base.cr0 = (base.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG) & !(1 << 30 | 1 << 29);
    base.cr3 = layout::PML4_START;
    base.cr4 |= X86_CR4_PAE;
    base.efer |= EFER_LME | EFER_LMA;
    Ok(base)
}

/// Writes the 32-bit GDT and returns the special registers of a Multiboot entry:
/// protected mode, paging off, flat segments (`base` from `KVM_GET_SREGS`).
pub fn setup_protected_mode(
    mem: &GuestMemoryMmap,
    mut base: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    for (i, e) in GDT32.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| RegsError(e.to_string()))?;
    }
    base.gdt.base = layout::BOOT_GDT_START;
    base.gdt.limit = (std::mem::size_of_val(&GDT32) - 1) as u16;
    base.idt.base = 0;
    base.idt.limit = 0x3ff;
    let code = segment_from_gdt(GDT32[1], 1);
    let data = segment_from_gdt(GDT32[2], 2);
    base.cs = code;
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = segment_from_gdt(GDT32[3], 3);
    base.cr0 = (base.cr0 | X86_CR0_PE | X86_CR0_ET) & !(X86_CR0_PG | 1 << 30 | 1 << 29);
    base.cr3 = 0;
    base.cr4 = 0;
    base.efer = 0;
    Ok(base)
}

/// Special registers of a CPU that firmware hands to an ACPI waking vector: real mode,
/// paging and protection off, CS:IP = `vector >> 4` : `vector & 0xf` (ACPI 6.4
/// §5.2.10), the other segments at 0 with 64 KiB limits, the real-mode IVT at 0.
pub fn waking_sregs(mut base: kvm_sregs, vector: u32) -> kvm_sregs {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    base.cs = seg((vector >> 4) as u16, 0xb);
    let data = seg(0, 0x3);
    base.ds = data;
    base.es = data;
    base.fs = data;
    base.gs = data;
    base.ss = data;
    base.tr = kvm_segment {
        type_: 0xb,
        s: 0,
        ..seg(0, 0xb)
    };
    base.ldt = kvm_segment {
        type_: 0x2,
        s: 0,
        ..seg(0, 0x2)
    };
    base.gdt.base = 0;
    base.gdt.limit = 0xffff;
    base.idt.base = 0;
    base.idt.limit = 0x3ff;
    base.cr0 = X86_CR0_ET;
    base.cr2 = 0;
    base.cr3 = 0;
    base.cr4 = 0;
    base.efer = 0;
    base
}

/// General registers at an ACPI waking vector (IP = `vector & 0xf`).
pub fn waking_regs(vector: u32) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: u64::from(vector & 0xf),
        ..Default::default()
    }
}

/// General registers at a Multiboot kernel's entry.
pub fn multiboot_regs(entry: u32, info: u32) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: u64::from(entry),
        rax: u64::from(crate::multiboot::BOOTLOADER_MAGIC),
        rbx: u64::from(info),
        ..Default::default()
    }
}

/// General registers at the kernel's 64-bit entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at reset (FCW 0x37f, MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let c = segment_from_gdt(GDT[1], 1);
        assert_eq!((c.l, c.db, c.present, c.type_, c.s), (1, 0, 1, 0xb, 1));
        assert_eq!(c.limit, 0xffff_ffff);
        let d = segment_from_gdt(GDT[2], 2);
        assert_eq!((d.l, d.db, d.type_), (0, 1, 0x3));
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn protected_mode_entry() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let s = setup_protected_mode(&m, kvm_sregs::default()).expect("setup");
        assert_eq!((s.cr0 & (X86_CR0_PE | X86_CR0_PG), s.efer), (X86_CR0_PE, 0));
        assert_eq!(
            (s.cs.db, s.cs.l, s.cs.limit, s.cs.type_),
            (1, 0, 0xffff_ffff, 0xb)
        );
        assert_eq!((s.ss.db, s.ss.type_), (1, 3));
        let r = multiboot_regs(0x40_0000, 0x50_0000);
        assert_eq!((r.rax, r.rbx, r.rip), (0x2bad_b002, 0x50_0000, 0x40_0000));
    }

    #[test]
    fn identity_map_and_sregs() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let s = setup_long_mode(&m, kvm_sregs::default()).expect("setup");
        assert_eq!(s.cr3, layout::PML4_START);
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        let pml4: u64 = m.read_obj(GuestAddress(layout::PML4_START)).expect("pml4");
        assert_eq!(pml4 & !0xfff, layout::PML4_START + 0x1000);
        // The PDE for 3 GiB + 2 MiB maps itself.
        let pd3 = layout::PML4_START + 0x2000 + 3 * 0x1000;
        let e: u64 = m.read_obj(GuestAddress(pd3 + 8)).expect("pde");
        assert_eq!(e & !0xfff, (3 << 30) | (1 << 21));
        assert_ne!(e & PDE_PS, 0);
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi), (0x100_0000, layout::ZERO_PAGE_START));
    }
}
