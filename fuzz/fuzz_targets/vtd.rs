//! The VT-d unit with fuzzer-controlled guest memory (root, context and page tables,
//! the invalidation queue) and register accesses, and DMA requests from random
//! requesters. Checked beyond "no panic":
//! - a DMA that fails writes no byte of guest memory;
//! - a DMA write that succeeds changes only bytes at the guest-physical addresses the
//!   tables map (a reference walk, computed independently), or none at all for an
//!   interrupt request to 0xFEEx_xxxx;
//! - the unit's fault history stays within its cap;
//! - an interrupt message remapped through the table is delivered only as the entry
//!   the unit holds for its index allows (present, that vector), never in remappable
//!   format;
//! - in exact caching mode (chosen by the input) the stale-use history stays bounded.
#![no_main]

use std::sync::Arc;

use devices::interrupt::{MsiMessage, MsiSource, RecordingController};
use devices::iommu::{ir, CachingMode, DmaError, Vtd, VTD_SIZE};
use faultvisor_fuzz::{fill, memory, reference_walk, snapshot, Input};
use libfuzzer_sys::fuzz_target;

const MEM: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = memory(MEM);
    fill(&mut inp, &mem, MEM, 32);
    let rec = Arc::new(RecordingController::new(24, 64));
    let caching = if inp.u8() & 1 == 0 {
        CachingMode::Simple
    } else {
        CachingMode::Exact
    };
    let vtd = Arc::new(Vtd::new(mem.clone(), rec).with_caching(caching));
    let cached = vtd.handle(0x20);
    for _ in 0..64 {
        if inp.done() {
            break;
        }
        match inp.u8() % 9 {
            0 | 1 => {
                let off = u64::from(inp.u16()) % (VTD_SIZE + 16);
                let len = inp.size();
                let v = inp.u64().to_le_bytes();
                vtd.write(off, &v[..len]);
            }
            2 => {
                let off = u64::from(inp.u16()) % (VTD_SIZE + 16);
                let mut b = [0u8; 8];
                let len = inp.size();
                vtd.read(off, &mut b[..len]);
            }
            3 => fill(&mut inp, &mem, MEM, 4),
            4 | 5 => {
                // A checked DMA write by a fresh handle (no cache: the tables as they
                // are now decide).
                let sid = if inp.u8() & 1 == 0 { 0x20 } else { inp.u16() };
                let iova = match inp.u8() % 4 {
                    0 => inp.u64(),
                    1 => u64::from(inp.u32()) % (2 * MEM as u64),
                    2 => 0xfee0_0000 | u64::from(inp.u16() & !3),
                    _ => u64::from(inp.u16()) << 12,
                };
                let len = usize::from(inp.u16() % 8192) + 1;
                let pattern = vec![inp.u8() | 1; len];
                let before = snapshot(&mem, MEM);
                let root = vtd.state().root;
                let translating = vtd.translating();
                let r = vtd.handle(sid).write(iova, &pattern);
                let after = snapshot(&mem, MEM);
                match r {
                    Err(e) => assert_eq!(before, after, "a failed DMA ({e}) wrote to memory"),
                    Ok(()) => {
                        // Where each 4 KiB chunk of the request may land.
                        let mut allowed = Vec::new();
                        let mut at = iova;
                        let end = iova.saturating_add(len as u64);
                        while at < end {
                            let chunk_end = (at | 0xfff).saturating_add(1).min(end);
                            let gpa = if translating {
                                reference_walk(&mem, root, sid, at, true)
                            } else {
                                Some(at)
                            };
                            if let Some(g) = gpa {
                                allowed.push((g, g + (chunk_end - at)));
                            }
                            at = chunk_end;
                        }
                        for (gpa, (b, a)) in before.iter().zip(&after).enumerate() {
                            let gpa = gpa as u64;
                            assert!(
                                b == a || allowed.iter().any(|(s, e)| (*s..*e).contains(&gpa)),
                                "DMA write by {sid:#x} at {iova:#x}+{len} changed GPA {gpa:#x}, which its tables do not map"
                            );
                        }
                        if (0xfee0_0000..0xfef0_0000).contains(&iova) {
                            assert_eq!(before, after, "an interrupt request wrote memory");
                        }
                    }
                }
            }
            6 => {
                // The long-lived handle: its cache may hold entries the guest changed.
                let iova = u64::from(inp.u32());
                let len = usize::from(inp.u16() % 4096) + 1;
                let mut buf = vec![0u8; len];
                if inp.u8() & 1 == 0 {
                    let _ = cached.read(iova, &mut buf);
                } else {
                    let before = snapshot(&mem, MEM);
                    if let Err(e @ DmaError::Fault { .. }) = cached.write(iova, &buf) {
                        assert_eq!(before, snapshot(&mem, MEM), "a faulting DMA ({e}) wrote");
                    }
                }
            }
            7 => {
                // An interrupt message through the remapping table.
                let source = match inp.u8() % 3 {
                    0 => MsiSource::Pci {
                        bdf: inp.u16(),
                        vector: inp.u16(),
                    },
                    1 => MsiSource::Ioapic { pin: inp.u8() % 24 },
                    _ => MsiSource::Platform,
                };
                let address = match inp.u8() % 3 {
                    0 => inp.u64(),
                    _ => 0xfee0_0000 | u64::from(inp.u16() & 0xfffc) | (u64::from(inp.u8()) << 12),
                };
                let msg = MsiMessage {
                    address,
                    data: inp.u32(),
                };
                let r = vtd.remap(source, msg);
                if let (Ok(m), ir::Request::Remappable { index }, true, false) = (
                    r,
                    ir::decode(&msg),
                    vtd.remapping(),
                    source == MsiSource::Platform,
                ) {
                    let (_, cached) = vtd.irte(index);
                    let e = cached.expect("a remapped message's entry is cached");
                    assert!(e.present(), "remapped through a non-present IRTE");
                    assert_eq!(m.vector(), e.vector(), "vector not the IRTE's");
                    assert!(
                        !matches!(ir::decode(&m), ir::Request::Remappable { .. }),
                        "delivered in remappable format"
                    );
                }
                if let Some(i) = ir::index_of(&msg) {
                    vtd.irte_use(inp.u16(), i);
                }
                assert!(vtd.stale_uses().1.len() <= devices::iommu::cache::STALE_HISTORY);
            }
            _ => {
                let sid = inp.u16();
                match inp.u8() % 3 {
                    0 => {
                        let _ = vtd.fault_storm(sid, u32::from(inp.u8()));
                    }
                    1 => {
                        let _ = vtd.inject_context_invalid(sid, inp.u32());
                    }
                    _ => {
                        let _ = vtd.stats();
                        let _ = vtd.fault_records();
                    }
                }
            }
        }
    }
    assert!(vtd.fault_history().len() <= 64);
});
