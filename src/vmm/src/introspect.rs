//! Reading guest state from outside: the IDT of a vCPU through the guest's own page
//! tables (`GET /v1/idt?vcpu=N`, `faultvisor idt`).

use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vcpu::VcpuSnapshot;

/// Translates a guest-virtual address with the vCPU's paging mode (4-level long mode,
/// 32-bit PAE, or none); None when unmapped or outside RAM.
pub fn virt_to_phys(mem: &GuestMemoryMmap, s: &VcpuSnapshot, va: u64) -> Option<u64> {
    const PG: u64 = 1 << 31;
    const PAE: u64 = 1 << 5;
    const LMA: u64 = 1 << 10;
    if s.cr0 & PG == 0 {
        return Some(va);
    }
    let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
    let addr = |e: u64| e & 0x000f_ffff_ffff_f000;
    let (mut table, levels) = if s.efer & LMA != 0 {
        (s.cr3 & 0x000f_ffff_ffff_f000, 4u32)
    } else if s.cr4 & PAE != 0 {
        let pdpte = read((s.cr3 & !0x1f) + ((va >> 30) & 3) * 8)?;
        if pdpte & 1 == 0 {
            return None;
        }
        (addr(pdpte), 2)
    } else {
        return None; // 32-bit non-PAE paging: not used by the guests faultvisor runs
    };
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = read(table + ((va >> shift) & 0x1ff) * 8)?;
        if e & 1 == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && e & (1 << 7) != 0) {
            let size = 1u64 << shift;
            return Some((addr(e) & !(size - 1)) | (va & (size - 1)));
        }
        table = addr(e);
    }
    None
}

/// The gates of the IDT as JSON: vector, handler, selector, type, DPL, IST, present.
pub fn idt(mem: &GuestMemoryMmap, s: &VcpuSnapshot) -> Value {
    let count = ((usize::from(s.idt_limit) + 1) / 16).min(256);
    let mut gates = Vec::new();
    for v in 0..count as u64 {
        let va = s.idt_base.wrapping_add(v * 16);
        let raw = virt_to_phys(mem, s, va).and_then(|pa| {
            let lo = mem.read_obj::<u64>(GuestAddress(pa)).ok()?;
            // The high half may sit on the next page.
            let pa_hi = virt_to_phys(mem, s, va.wrapping_add(8))?;
            let hi = mem.read_obj::<u64>(GuestAddress(pa_hi)).ok()?;
            Some((lo, hi))
        });
        let Some((lo, hi)) = raw else {
            gates.push(json!({"vector": v, "readable": false}));
            continue;
        };
        let offset = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
        let ty = (lo >> 40) & 0xf;
        gates.push(json!({
            "vector": v,
            "readable": true,
            "handler": format!("{offset:#018x}"),
            "selector": (lo >> 16) & 0xffff,
            "ist": (lo >> 32) & 7,
            "type": match ty { 0xe => "int-gate", 0xf => "trap-gate", 0x5 => "task-gate", _ => "reserved" },
            "dpl": (lo >> 45) & 3,
            "present": (lo >> 47) & 1 == 1,
        }));
    }
    json!({
        "idt_base": format!("{:#x}", s.idt_base),
        "idt_limit": s.idt_limit,
        "cr3": format!("{:#x}", s.cr3),
        "rip": format!("{:#x}", s.rip),
        "gates": gates,
    })
}
