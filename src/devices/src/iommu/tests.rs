//! Unit tests of the VT-d model: registers, walk, every fault reason, the FRCD ring,
//! the fault event, queued invalidation, caching rules and hostile input.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::interrupt::{Recorded, RecordingController};

const MEM: usize = 32 << 20;
const ROOT: u64 = 0x10_0000;
const CTX: u64 = 0x10_1000;
/// Page-table pages are handed out from here.
const PT_POOL: u64 = 0x20_0000;

struct Rig {
    mem: GuestMemoryMmap,
    rec: Arc<RecordingController>,
    vtd: Arc<Vtd>,
    next_pt: u64,
}

fn rd32(v: &Vtd, off: u64) -> u32 {
    let mut b = [0u8; 4];
    v.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn rd64(v: &Vtd, off: u64) -> u64 {
    let mut b = [0u8; 8];
    v.read(off, &mut b);
    u64::from_le_bytes(b)
}

fn wr32(v: &Vtd, off: u64, x: u32) {
    v.write(off, &x.to_le_bytes());
}

fn wr64(v: &Vtd, off: u64, x: u64) {
    v.write(off, &x.to_le_bytes());
}

impl Rig {
    fn new() -> Self {
        Self::with_caching(CachingMode::Simple)
    }

    fn with_caching(c: CachingMode) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem");
        let rec = Arc::new(RecordingController::new(24, 100));
        let vtd = Arc::new(Vtd::new(mem.clone(), rec.clone()).with_caching(c));
        Self {
            mem,
            rec,
            vtd,
            next_pt: PT_POOL,
        }
    }

    fn w64(&self, addr: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(addr)).expect("write");
    }

    fn r64(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).expect("read")
    }

    fn page(&mut self) -> u64 {
        let p = self.next_pt;
        self.next_pt += 0x1000;
        p
    }

    /// Root entry for bus 0, a context entry for `devfn` with `levels` (3/4), and TE on.
    fn attach(&mut self, devfn: u8, levels: u32) -> u64 {
        let pt = self.page();
        self.w64(ROOT, CTX | 1);
        self.w64(CTX + u64::from(devfn) * 16, pt | 1);
        self.w64(
            CTX + u64::from(devfn) * 16 + 8,
            u64::from(levels - 2) | (7 << 8),
        );
        wr64(&self.vtd, reg::RTADDR, ROOT);
        wr32(&self.vtd, reg::GCMD, gcmd::SRTP);
        wr32(&self.vtd, reg::GCMD, gcmd::TE);
        pt
    }

    /// Maps `iova` → `gpa` with `perm` (bit 0 R, bit 1 W) as a page of 4K (leaf level
    /// 1), 2M (2) or 1G (3).
    fn map(&mut self, top: u64, levels: u32, iova: u64, gpa: u64, perm: u64, leaf_level: u32) {
        let mut table = top;
        for level in (leaf_level..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let slot = table + ((iova >> shift) & 0x1ff) * 8;
            if level == leaf_level {
                let ps = if leaf_level > 1 { 1 << 7 } else { 0 };
                self.w64(slot, gpa | perm | ps);
                return;
            }
            let cur = self.r64(slot);
            table = if cur & 3 != 0 {
                cur & !0xfff
            } else {
                let p = self.page();
                self.w64(slot, p | 3);
                p
            };
        }
    }

    fn records(&self) -> Vec<FaultRecord> {
        self.vtd
            .fault_records()
            .into_iter()
            .filter(|f| f.pending)
            .collect()
    }

    fn events(&self) -> usize {
        self.rec
            .take()
            .iter()
            .filter(|r| matches!(r, Recorded::Trigger(..)))
            .count()
    }
}

#[test]
fn reset_state_and_capabilities() {
    let r = Rig::new();
    let v = &r.vtd;
    assert_eq!(rd32(v, reg::VER), 0x10);
    assert_eq!(rd64(v, reg::CAP), CAP);
    assert_eq!(rd64(v, reg::ECAP), ECAP);
    assert_eq!(rd32(v, reg::GSTS), 0);
    assert_eq!(rd32(v, reg::GCMD), 0);
    assert_eq!(rd32(v, reg::FECTL), 0x8000_0000);
    // Decoded as Linux does.
    assert_eq!((CAP >> 8) & 0x1f, 0x6, "SAGAW: 39- and 48-bit");
    assert_eq!((CAP >> 16) & 0x3f, 47, "MGAW");
    assert_eq!((CAP >> 34) & 0xf, 0x3, "2M and 1G superpages");
    assert_eq!((CAP >> 39) & 1, 1, "PSI");
    assert_eq!(((CAP >> 40) & 0xff) + 1, 16, "16 fault-recording registers");
    assert_eq!(CAP & (1 << 7), 0, "caching mode off");
    let fro = ((CAP >> 24) & 0x3ff) * 16;
    let iro = ((ECAP >> 8) & 0x3ff) * 16;
    assert!(
        fro + 16 * 16 <= 0x1000 && iro + 16 <= 0x1000,
        "IRO and FRO inside 4 KiB"
    );
    assert_eq!(ECAP & 3, 3, "C and QI");
}

#[test]
fn gcmd_one_shot_and_persistent_bits() {
    let r = Rig::new();
    let v = &r.vtd;
    wr64(v, reg::RTADDR, ROOT);
    wr32(v, reg::GCMD, gcmd::SRTP);
    assert_eq!(
        rd32(v, reg::GSTS) & gcmd::SRTP,
        gcmd::SRTP,
        "RTPS right after the write"
    );
    // Linux ORs one-shot bits into its persistent copy.
    wr32(v, reg::GCMD, gcmd::TE);
    assert_eq!(rd32(v, reg::GSTS) & gcmd::TE, gcmd::TE);
    assert!(v.translating());
    wr32(v, reg::GCMD, gcmd::TE | gcmd::QIE);
    assert_eq!(
        rd32(v, reg::GSTS) & (gcmd::TE | gcmd::QIE),
        gcmd::TE | gcmd::QIE
    );
    wr32(v, reg::GCMD, gcmd::QIE | gcmd::WBF);
    let s = rd32(v, reg::GSTS);
    assert_eq!(s & gcmd::TE, 0, "TE cleared");
    assert_eq!(s & gcmd::WBF, 0, "WBFS never sticks");
    assert!(!v.translating());
}

#[test]
fn translation_with_4k_2m_1g_pages_and_4_levels() {
    for levels in [3, 4] {
        let mut r = Rig::new();
        let top = r.attach(0x20, levels);
        r.map(top, levels, 0x1000, 0x50_0000, 3, 1);
        r.map(top, levels, 0x4000_0000, 0x0, 1, 3); // 1 GiB read-only at IOVA 1G
        r.map(top, levels, 0x20_0000, 0x60_0000, 3, 2); // 2 MiB at IOVA 2M
        let h = r.vtd.handle(0x20);
        h.write(0x1ffc, &[1, 2, 3, 4]).expect("4K write");
        assert_eq!(
            r.mem.read_obj::<u32>(GuestAddress(0x50_0ffc)).expect("r"),
            0x0403_0201
        );
        h.write(0x20_1234, b"superpage").expect("2M write");
        let mut b = [0u8; 9];
        r.mem
            .read_slice(&mut b, GuestAddress(0x60_1234))
            .expect("r");
        assert_eq!(&b, b"superpage");
        let mut got = [0u8; 4];
        h.read(0x4000_0000 + 0x50_0ffc, &mut got).expect("1G read");
        assert_eq!(got, [1, 2, 3, 4]);
        let e = h
            .write(0x4000_0000, &[0])
            .expect_err("1G page is read-only");
        assert!(matches!(
            e,
            DmaError::Fault {
                reason: FaultReason::WriteDenied,
                ..
            }
        ));
        assert_eq!(
            h.translate(0x20_0000 + 0x1f_ffff, false),
            Ok(0x60_0000 + 0x1f_ffff)
        );
    }
}

#[test]
fn translation_off_is_identity_and_checks_ram() {
    let r = Rig::new();
    let h = r.vtd.handle(0x8);
    h.write(0x1000, &[7]).expect("identity");
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x1000)).expect("r"), 7);
    assert_eq!(
        h.write(MEM as u64 - 1, &[1, 2]),
        Err(DmaError::NotRam { gpa: MEM as u64 })
    );
    assert_eq!(
        r.mem
            .read_obj::<u8>(GuestAddress(MEM as u64 - 1))
            .expect("r"),
        0,
        "nothing written"
    );
    let d = DmaHandle::direct(r.mem.clone(), 0x8, None);
    assert!(
        d.read(u64::MAX - 1, &mut [0; 4]).is_err(),
        "wrapping range refused"
    );
}

/// Expects `f` to fault with `reason` for requester `sid`, and one FRCD with it.
fn expect_fault(r: &Rig, sid: u16, iova: u64, write: bool, reason: FaultReason) {
    let h = r.vtd.handle(sid);
    let res = if write {
        h.write(iova, &[0xaa; 8])
    } else {
        h.read(iova, &mut [0; 8])
    };
    assert_eq!(
        res,
        Err(DmaError::Fault {
            iova,
            reason,
            write
        }),
        "{reason:?}"
    );
    let recs = r.records();
    let last = recs.last().expect("a record");
    assert_eq!(
        (last.sid, last.reason, last.read, last.page),
        (sid, reason as u8, !write, iova & !0xfff),
        "{reason:?}"
    );
}

#[test]
fn every_fault_reason() {
    use FaultReason::*;
    let mut r = Rig::new();
    let top = r.attach(0x18, 3);
    r.map(top, 3, 0x1000, 0x50_0000, 1, 1); // read-only
    r.map(top, 3, 0x2000, 0x50_1000, 2, 1); // write-only
    let clear = |r: &Rig| {
        for i in 0..NUM_FAULT_RECORDS as u64 {
            wr32(&r.vtd, reg::FRCD + 16 * i + 12, 1 << 31);
        }
        wr32(&r.vtd, reg::FSTS, 0xff);
        // Faults are not cached, but the context is: start each case afresh.
        wr64(&r.vtd, reg::CCMD, 1 << 63 | 1 << 61);
    };
    expect_fault(&r, 0x18, 0x1000, true, WriteDenied);
    expect_fault(&r, 0x18, 0x2000, false, ReadDenied);
    expect_fault(&r, 0x18, 0x5000, false, ReadDenied); // not present
    expect_fault(&r, 0x18, 1 << 40, true, BeyondMgaw);
    clear(&r);
    expect_fault(&r, 0x20, 0x1000, true, ContextNotPresent);
    expect_fault(&r, 0x0100, 0x1000, true, RootNotPresent); // bus 1
                                                            // Reserved bits in the context entry, then an invalid AW.
    r.w64(CTX + 0x28 * 16, top | 1 | 0x10);
    r.w64(CTX + 0x28 * 16 + 8, 1);
    expect_fault(&r, 0x28, 0x1000, false, ContextReserved);
    r.w64(CTX + 0x30 * 16, top | 1);
    r.w64(CTX + 0x30 * 16 + 8, 3); // AW 3 = 57-bit: not in SAGAW
    expect_fault(&r, 0x30, 0x1000, false, ContextInvalid);
    r.w64(CTX + 0x31 * 16, top | 1 | (2 << 2)); // TT pass-through: not offered
    r.w64(CTX + 0x31 * 16 + 8, 1);
    expect_fault(&r, 0x31, 0x1000, false, ContextInvalid);
    // Top-level table outside RAM.
    r.w64(CTX + 0x32 * 16, (0x8000_0000_0000 - 0x1000) | 1);
    r.w64(CTX + 0x32 * 16 + 8, 1);
    expect_fault(&r, 0x32, 0x1000, false, ContextInvalid);
    clear(&r);
    // A lower-level pointer outside RAM.
    let l3 = r.r64(top);
    let l2 = l3 & !0xfff;
    r.w64(l2 + 8 * 5, 0x4000_0000_0000 | 3);
    expect_fault(&r, 0x18, 5 << 21, false, NextTableInvalid);
    // Reserved bits in a PTE (SNP without snoop control).
    r.map(top, 3, 0x3000, 0x50_2000 | (1 << 11), 3, 1);
    expect_fault(&r, 0x18, 0x3000, true, PteReserved);
    // Root entry reserved bits (bus 2), context table outside RAM (bus 3).
    r.w64(ROOT + 2 * 16, CTX | 1 | 0x20);
    expect_fault(&r, 0x0200, 0, false, RootReserved);
    r.w64(ROOT + 3 * 16, 0x7000_0000_0000 | 1);
    expect_fault(&r, 0x0300, 0, false, ContextTableInvalid);
    clear(&r);
    // Root table itself outside RAM.
    wr64(&r.vtd, reg::RTADDR, 0x7fff_0000_0000);
    wr32(&r.vtd, reg::GCMD, gcmd::TE | gcmd::SRTP);
    expect_fault(&r, 0x18, 0x1000, false, RootTableInvalid);
}

#[test]
fn a_faulting_dma_moves_no_byte() {
    let mut r = Rig::new();
    let top = r.attach(0x20, 3);
    r.map(top, 3, 0x1000, 0x50_0000, 3, 1); // page 2 (0x2000) is not mapped
    r.mem
        .write_slice(&[0x11; 0x1000], GuestAddress(0x50_0000))
        .expect("fill");
    let h = r.vtd.handle(0x20);
    let e = h
        .write(0x1800, &[0xee; 0x1000])
        .expect_err("crosses into an unmapped page");
    assert_eq!(
        e,
        DmaError::Fault {
            iova: 0x2000,
            reason: FaultReason::WriteDenied,
            write: true
        }
    );
    let mut b = [0u8; 0x1000];
    r.mem
        .read_slice(&mut b, GuestAddress(0x50_0000))
        .expect("r");
    assert!(
        b.iter().all(|&x| x == 0x11),
        "the mapped first half was not written either"
    );
    assert_eq!(r.records().len(), 1, "one fault per request");
    let mut buf = [0x5au8; 0x1000];
    assert!(h.read(0x1800, &mut buf).is_err());
    assert!(
        buf.iter().all(|&x| x == 0x5a),
        "a faulting read fills nothing"
    );
}

#[test]
fn fault_ring_fri_overflow_and_wrap() {
    let mut r = Rig::new();
    r.attach(0x20, 3);
    let timeline = Arc::new(crate::timeline::Timeline::new(1024));
    timeline.enable();
    r.vtd.attach_timeline(timeline.clone());
    let cleared = || {
        timeline
            .events()
            .0
            .iter()
            .filter(|e| matches!(e.kind, crate::timeline::EventKind::FaultCleared { .. }))
            .count()
    };
    wr32(&r.vtd, reg::FEDATA, 0x41);
    wr32(&r.vtd, reg::FEADDR, 0xfee0_0000);
    wr32(&r.vtd, reg::FECTL, 0);
    let h = r.vtd.handle(0x20);
    for i in 0..NUM_FAULT_RECORDS as u64 {
        assert!(h.write(0x10_0000 + i * 0x1000, &[0]).is_err());
    }
    assert_eq!(
        r.records().len(),
        NUM_FAULT_RECORDS,
        "all 16 recorded (QEMU keeps 1)"
    );
    assert_eq!(r.events(), 1, "one event for the burst");
    let fsts = rd32(&r.vtd, reg::FSTS);
    assert_eq!(fsts & 3, fsts::PPF, "PPF, no overflow yet");
    assert_eq!((fsts >> 8) & 0xff, 0, "FRI = first record");
    // Record 5, as Linux reads it.
    let base = reg::FRCD + 5 * 16;
    assert_eq!(rd64(&r.vtd, base), 0x10_5000);
    assert_eq!(rd32(&r.vtd, base + 8) & 0xffff, 0x20);
    let hi = rd32(&r.vtd, base + 12);
    assert_eq!(
        (hi & 0xff, (hi >> 30) & 1, hi >> 31),
        (5, 0, 1),
        "reason 5, write, F"
    );
    // The 17th overflows.
    assert!(h.write(0x20_0000, &[0]).is_err());
    assert_eq!(rd32(&r.vtd, reg::FSTS) & fsts::PFO, fsts::PFO);
    assert_eq!(r.vtd.stats().faults_overflowed, 1);
    assert_eq!(r.events(), 0, "no new event while PPF is set");
    // Service all: clear F bits and PFO; the ring continues where it was (wraps).
    for i in 0..NUM_FAULT_RECORDS as u64 {
        wr32(&r.vtd, reg::FRCD + 16 * i + 12, 1 << 31);
    }
    wr32(&r.vtd, reg::FSTS, fsts::PFO | fsts::PPF);
    assert_eq!(rd32(&r.vtd, reg::FSTS) & 3, 0);
    assert_eq!(
        cleared(),
        NUM_FAULT_RECORDS,
        "each acknowledgement is traced"
    );
    wr32(&r.vtd, reg::FRCD + 12, 1 << 31);
    assert_eq!(
        cleared(),
        NUM_FAULT_RECORDS,
        "clearing a free record is not"
    );
    assert!(h.read(0x30_0000, &mut [0]).is_err());
    let fsts = rd32(&r.vtd, reg::FSTS);
    assert_eq!(fsts & 3, fsts::PPF);
    assert_eq!((fsts >> 8) & 0xff, 0, "wrapped to record 0");
    assert_eq!(rd32(&r.vtd, reg::FRCD + 12) >> 30, 0b11, "F and T (read)");
    assert_eq!(r.events(), 1);
    // A qword write of F at +8 clears it too.
    wr64(&r.vtd, reg::FRCD + 8, 1 << 63);
    assert_eq!(rd32(&r.vtd, reg::FSTS) & fsts::PPF, 0);
}

#[test]
fn masked_fault_event_stays_pending_until_unmask() {
    let mut r = Rig::new();
    r.attach(0x20, 3);
    wr32(&r.vtd, reg::FEDATA, 0x52);
    wr32(&r.vtd, reg::FEADDR, 0xfee0_1000);
    wr32(&r.vtd, reg::FEUADDR, 0);
    // FECTL stays masked (reset value).
    assert!(r.vtd.handle(0x20).write(0x1000, &[1]).is_err());
    assert_eq!(rd32(&r.vtd, reg::FECTL), 0xc000_0000, "IM and IP");
    assert_eq!(r.events(), 0);
    wr32(&r.vtd, reg::FECTL, 0);
    assert_eq!(rd32(&r.vtd, reg::FECTL), 0, "IP cleared by delivery");
    let sent = r.rec.take();
    let msg = sent.iter().find_map(|e| match e {
        Recorded::Trigger(_, m) => *m,
        _ => None,
    });
    let msg = msg.expect("the event went out on unmask");
    assert_eq!((msg.vector(), msg.destination()), (0x52, 1));
}

#[test]
fn fpd_suppresses_qualified_faults_only() {
    let mut r = Rig::new();
    let top = r.attach(0x20, 3);
    r.w64(CTX + 0x20 * 16, top | 1 | 2); // FPD
    wr64(&r.vtd, reg::CCMD, 1 << 63 | 1 << 61);
    let h = r.vtd.handle(0x20);
    assert!(h.write(0x1000, &[1]).is_err(), "the access still fails");
    assert!(r.records().is_empty());
    assert_eq!(r.vtd.stats().faults_suppressed, 1);
}

/// Writes descriptors into the queue at `iq` and moves the tail.
fn submit(r: &Rig, iq: u64, first: u64, descs: &[(u64, u64)]) -> u64 {
    for (i, (lo, hi)) in descs.iter().enumerate() {
        let at = iq + (first + i as u64) * 16;
        r.w64(at, *lo);
        r.w64(at + 8, *hi);
    }
    let tail = first + descs.len() as u64;
    wr64(&r.vtd, reg::IQT, tail << 4);
    tail
}

#[test]
fn queued_invalidation_wait_and_errors() {
    let r = Rig::new();
    let iq = 0x30_0000;
    let status = 0x30_8000;
    wr64(&r.vtd, reg::IQT, 0);
    wr64(&r.vtd, reg::IQA, iq);
    wr32(&r.vtd, reg::GCMD, gcmd::QIE);
    assert_eq!(rd32(&r.vtd, reg::GSTS) & gcmd::QIE, gcmd::QIE);
    // Global IOTLB + context invalidation, then a wait with status write.
    let t = submit(
        &r,
        iq,
        0,
        &[
            (0x2 | 1 << 4, 0),
            (0x1 | 1 << 4, 0),
            (0x5 | 1 << 5 | 2 << 32, status),
        ],
    );
    assert_eq!(
        r.mem.read_obj::<u32>(GuestAddress(status)).expect("r"),
        2,
        "status written during the IQT write"
    );
    assert_eq!(rd64(&r.vtd, reg::IQH), t << 4);
    assert_eq!(r.vtd.stats().qi_descriptors, 3);
    // A bad descriptor: IQE, head stays on it, later descriptors wait.
    let t2 = submit(&r, iq, t, &[(0x7, 0), (0x5 | 1 << 5 | 9 << 32, status)]);
    assert_eq!(rd32(&r.vtd, reg::FSTS) & fsts::IQE, fsts::IQE);
    assert_eq!(rd64(&r.vtd, reg::IQH), t << 4);
    assert_eq!(rd64(&r.vtd, reg::IQERCD) & 0xf, 3);
    assert_eq!(r.mem.read_obj::<u32>(GuestAddress(status)).expect("r"), 2);
    // Software fixes the descriptor, clears IQE and rings again.
    r.w64(iq + t * 16, 0x2 | 1 << 4);
    wr32(&r.vtd, reg::FSTS, fsts::IQE);
    wr64(&r.vtd, reg::IQT, t2 << 4);
    assert_eq!(r.mem.read_obj::<u32>(GuestAddress(status)).expect("r"), 9);
    // A tail beyond the queue.
    wr64(&r.vtd, reg::IQT, 0x7fff0);
    assert_eq!(rd32(&r.vtd, reg::FSTS) & fsts::IQE, fsts::IQE);
    assert_eq!(rd64(&r.vtd, reg::IQERCD) & 0xf, 1);
}

#[test]
fn caching_rules() {
    let mut r = Rig::new();
    let top = r.attach(0x20, 3);
    let h = r.vtd.handle(0x20);
    // Not-present results are never cached: mapping afterwards needs no invalidation.
    assert!(h.read(0x7000, &mut [0]).is_err());
    r.map(top, 3, 0x7000, 0x50_0000, 3, 1);
    h.read(0x7000, &mut [0])
        .expect("mapped without invalidation");
    // A cached translation survives an unmap until software invalidates.
    r.map(top, 3, 0x7000, 0, 0, 1);
    h.read(0x7000, &mut [0]).expect("still cached");
    wr64(&r.vtd, reg::IVA, 0x7000);
    wr64(&r.vtd, reg::IOTLB, 1 << 63 | 3 << 60 | 7 << 32);
    assert_eq!(rd64(&r.vtd, reg::IOTLB) >> 63, 0, "IVT cleared");
    assert_eq!(
        (rd64(&r.vtd, reg::IOTLB) >> 57) & 3,
        3,
        "IAIG reports the granularity"
    );
    assert!(h.read(0x7000, &mut [0]).is_err(), "invalidated");
    // CCMD: ICC cleared, CAIG set.
    wr64(&r.vtd, reg::CCMD, 1 << 63 | 1 << 61);
    let c = rd64(&r.vtd, reg::CCMD);
    assert_eq!((c >> 63, (c >> 59) & 3), (0, 1));
}

#[test]
fn hostile_registers_and_tables_never_panic() {
    let mut r = Rig::new();
    let top = r.attach(0x20, 4);
    // Deterministic xorshift: random register traffic and random table contents.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..20_000 {
        let off = next() % 0x1100;
        let len = [1usize, 2, 3, 4, 8, 16][(next() % 6) as usize];
        let val = next();
        let mut buf = vec![0u8; len];
        if next() % 2 == 0 {
            r.vtd.read(off, &mut buf);
        } else {
            buf.copy_from_slice(&val.to_le_bytes().repeat(2)[..len]);
            r.vtd.write(off, &buf);
        }
        if next() % 8 == 0 {
            let slot = top + (next() % 512) * 8;
            r.w64(slot, next());
        }
        let h = r.vtd.handle((next() & 0xffff) as u16);
        let _ = h.read(next(), &mut [0; 16]);
        let _ = h.write(next() % (1 << 40), &[0; 3]);
    }
    assert!(r.vtd.anomalies() > 0, "odd accesses were counted");
    let _ = r.page();
}

#[test]
fn injected_context_faults_and_storms() {
    let mut r = Rig::new();
    let top = r.attach(0x20, 3);
    r.map(top, 3, 0x1000, 0x50_0000, 3, 1);
    let h = r.vtd.handle(0x20);
    h.write(0x1000, &[1]).expect("mapped");
    r.vtd.inject_context_invalid(0x20, 2).expect("armed");
    for _ in 0..2 {
        assert_eq!(
            h.write(0x1000, &[1]),
            Err(DmaError::Fault {
                iova: 0x1000,
                reason: FaultReason::ContextInvalid,
                write: true
            })
        );
    }
    h.write(0x1000, &[1]).expect("the injection is used up");
    assert_eq!(r.records().len(), 2);
    assert!(r.records().iter().all(|f| f.reason == 3 && f.sid == 0x20));
    // Other devices are untouched.
    r.vtd.inject_context_invalid(0x28, 1).expect("armed");
    h.write(0x1000, &[1]).expect("not this device");
    // Arming nothing arms nothing; arming is capped per device, and counts that would
    // overflow are refused.
    r.vtd
        .inject_context_invalid(0x38, 0)
        .expect("nothing to arm");
    assert!(r.vtd.inject_context_invalid(0x30, u32::MAX).is_err());
    r.vtd
        .inject_context_invalid(0x30, super::MAX_CONTEXT_FAULTS)
        .expect("at the cap");
    assert_eq!(
        r.vtd.inject_context_invalid(0x30, 1),
        Err(super::ArmedTooMany {
            armed: super::MAX_CONTEXT_FAULTS
        })
    );
    // A storm overflows the 14 records left.
    let (rec, over) = r.vtd.fault_storm(0x20, 20);
    assert_eq!((rec, over), (14, 6));
    assert_eq!(rd32(&r.vtd, reg::FSTS) & fsts::PFO, fsts::PFO);
}

// ---------------------------------------------------------------- interrupt remapping

const IRT: u64 = 0x18_0000;
const IQ: u64 = 0x17_0000;

/// A rig with an 256-entry x2APIC-mode table at IRT, queued invalidation and IRE on.
fn ir_rig(cfi: bool) -> Rig {
    let r = Rig::new();
    assert_eq!(rd64(&r.vtd, reg::ECAP) & 0x18, 0x18, "IR and EIM offered");
    assert_eq!((rd64(&r.vtd, reg::ECAP) >> 20) & 0xf, 0xf, "MHMV 15");
    wr64(&r.vtd, reg::IRTA, IRT | (1 << 11) | 7);
    assert_eq!(rd64(&r.vtd, reg::IRTA), IRT | (1 << 11) | 7);
    wr32(&r.vtd, reg::GCMD, gcmd::SIRTP);
    assert_ne!(rd32(&r.vtd, reg::GSTS) & gcmd::SIRTP, 0, "IRTPS");
    wr64(&r.vtd, reg::IQA, IQ);
    wr32(&r.vtd, reg::GCMD, gcmd::QIE);
    let cmd = gcmd::QIE | gcmd::IRE | if cfi { gcmd::CFI } else { 0 };
    wr32(&r.vtd, reg::GCMD, cmd);
    let gsts = rd32(&r.vtd, reg::GSTS);
    assert_ne!(gsts & gcmd::IRE, 0, "IRES");
    assert_eq!(gsts & gcmd::CFI != 0, cfi, "CFIS");
    r
}

fn irte(r: &Rig, index: u64, lo: u64, hi: u64) {
    r.w64(IRT + index * 16 + 8, hi);
    r.w64(IRT + index * 16, lo);
}

/// A remappable request for `index` (SHV clear).
fn req(index: u32) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000
            | (u64::from(index & 0x7fff) << 5)
            | (1 << 4)
            | (u64::from(index >> 15) << 2),
        data: 0,
    }
}

const DEV: MsiSource = MsiSource::Pci {
    bdf: 0x18,
    vector: 0,
};

#[test]
fn remapping_translates_and_every_reason_is_recorded() {
    use ir::IrFaultReason as R;
    let r = ir_rig(false);
    // Index 3: vector 0x41 to x2APIC ID 300, source verified.
    irte(&r, 3, 1 | (0x41 << 16) | (300 << 32), 0x18 | (1 << 18));
    let m = r.vtd.remap(DEV, req(3)).expect("translated");
    assert_eq!((m.vector(), m.destination()), (0x41, 300));
    // The unit's own messages are never remapped.
    let raw = MsiMessage {
        address: 0xfee0_0000,
        data: 0x33,
    };
    assert_eq!(r.vtd.remap(MsiSource::Platform, raw), Ok(raw));
    let reason = |src, m| r.vtd.remap(src, m).map_err(|f| f.reason);
    assert_eq!(reason(DEV, raw), Err(R::CompatBlocked));
    assert_eq!(reason(DEV, req(256)), Err(R::IndexTooLarge));
    assert_eq!(reason(DEV, req(4)), Err(R::NotPresent));
    irte(&r, 5, 1 | (1 << 15), 0);
    assert_eq!(reason(DEV, req(5)), Err(R::EntryReserved));
    let other = MsiSource::Pci {
        bdf: 0x20,
        vector: 0,
    };
    assert_eq!(reason(other, req(3)), Err(R::SourceId));
    let mut bad = req(3);
    bad.address |= 1 << 32;
    assert_eq!(reason(DEV, bad), Err(R::RequestReserved));
    // Recording: index in bits 63:48 of the fault information, SID, reason; one record
    // per blocked message, as Linux reads them.
    let f = r.vtd.remap(other, req(3)).expect_err("blocked");
    r.vtd.record_ir_fault(f);
    let rec = r.records();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        (rec[0].page >> 48, rec[0].sid, rec[0].reason),
        (3, 0x20, 0x26)
    );
    assert_eq!(r.vtd.stats().faults_by_reason[0x26], 1);
    // FPD suppresses the qualified reasons.
    irte(&r, 6, 2, 0);
    let f = r.vtd.remap(DEV, req(6)).expect_err("not present");
    assert!(f.fpd);
    r.vtd.record_ir_fault(f);
    assert_eq!(r.records().len(), 1, "suppressed by FPD");
    // A table beyond guest memory.
    wr64(&r.vtd, reg::IRTA, 0x7f_0000_0000 | 7);
    wr32(&r.vtd, reg::GCMD, gcmd::QIE | gcmd::IRE | gcmd::SIRTP);
    assert_eq!(reason(DEV, req(1)), Err(R::TableAccess));
}

#[test]
fn cfi_lets_compatibility_format_through_and_ioapic_sid_is_checked() {
    let r = ir_rig(true);
    let raw = MsiMessage {
        address: 0xfee0_1000,
        data: 0x44,
    };
    assert_eq!(r.vtd.remap(DEV, raw), Ok(raw));
    // An IOAPIC message carries the IOAPIC's source ID from the DMAR scope.
    irte(&r, 9, 1 | (0x50 << 16), u64::from(IOAPIC_SID) | (1 << 18));
    let pin = MsiSource::Ioapic { pin: 4 };
    assert!(r.vtd.remap(pin, req(9)).is_ok());
    irte(&r, 10, 1 | (0x50 << 16), 0x18 | (1 << 18));
    assert!(
        r.vtd.remap(pin, req(10)).is_err(),
        "strict: another device's SID"
    );
    let lax = Vtd::new(r.mem.clone(), r.rec.clone()).with_ioapic_sid_check(IoapicSidCheck::Any);
    wr64(&lax, reg::IRTA, IRT | (1 << 11) | 7);
    wr32(&lax, reg::GCMD, gcmd::SIRTP);
    wr32(&lax, reg::GCMD, gcmd::IRE);
    assert!(
        lax.remap(pin, req(10)).is_ok(),
        "as QEMU: IOAPIC SIDs not verified"
    );
    assert!(lax
        .remap(
            MsiSource::Pci {
                bdf: 0x30,
                vector: 0
            },
            req(10)
        )
        .is_err());
}

#[test]
fn entries_stay_cached_until_the_entry_cache_is_invalidated() {
    let r = ir_rig(false);
    irte(&r, 7, 1 | (0x41 << 16), 0);
    irte(&r, 8, 1 | (0x42 << 16), 0);
    assert_eq!(r.vtd.remap(DEV, req(7)).map(|m| m.vector()), Ok(0x41));
    assert_eq!(r.vtd.remap(DEV, req(8)).map(|m| m.vector()), Ok(0x42));
    // The guest rewrites both without invalidating: the unit keeps the old ones.
    irte(&r, 7, 1 | (0x51 << 16), 0);
    irte(&r, 8, 1 | (0x52 << 16), 0);
    assert_eq!(
        r.vtd.remap(DEV, req(7)).map(|m| m.vector()),
        Ok(0x41),
        "stale"
    );
    let (mem, cached) = r.vtd.irte(7);
    assert_ne!(mem, cached, "introspection sees the stale entry");
    // Index-selective IEC of entry 8 (IM = 0) refreshes 8 only.
    let t = submit(&r, IQ, 0, &[(4 | (1 << 4) | (8 << 32), 0)]);
    assert_eq!(r.vtd.remap(DEV, req(8)).map(|m| m.vector()), Ok(0x52));
    assert_eq!(
        r.vtd.remap(DEV, req(7)).map(|m| m.vector()),
        Ok(0x41),
        "still stale"
    );
    // A global IEC refreshes everything.
    submit(&r, IQ, t, &[(4, 0)]);
    assert_eq!(r.vtd.remap(DEV, req(7)).map(|m| m.vector()), Ok(0x51));
    // A malformed IEC descriptor is an invalidation queue error.
    submit(&r, IQ, t + 1, &[(4 | (1 << 10), 0)]);
    assert_ne!(rd32(&r.vtd, reg::FSTS) & fsts::IQE, 0);
}

#[test]
fn remapping_is_not_offered_when_turned_off() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem");
    let v =
        Vtd::new(mem, Arc::new(RecordingController::new(24, 30))).with_interrupt_remapping(false);
    assert_eq!(rd64(&v, reg::ECAP) & 0x18, 0);
    wr32(&v, reg::GCMD, gcmd::IRE | gcmd::SIRTP);
    assert_eq!(rd32(&v, reg::GSTS) & (gcmd::IRE | gcmd::SIRTP), 0);
    assert!(v.remap(DEV, req(1)).is_ok(), "messages pass untouched");
}

/// A byte DMA-read by `h` at `iova` (the page's first byte tells pages apart).
fn byte_at(h: &DmaHandle, iova: u64) -> Option<u8> {
    let mut b = [0u8];
    h.read(iova, &mut b).ok().map(|_| b[0])
}

fn psi(v: &Vtd, did: u16, addr: u64, am: u64) {
    wr64(v, reg::IVA, addr | am);
    wr64(v, reg::IOTLB, 1 << 63 | 3 << 60 | u64::from(did) << 32);
}

fn stale(v: &Vtd) -> [u64; 3] {
    v.stale_uses().0
}

#[test]
fn exact_caching_keeps_entries_until_their_invalidation() {
    let mut r = Rig::with_caching(CachingMode::Exact);
    let top = r.attach(0x20, 3);
    for (gpa, tag) in [(0x50_0000u64, 0xa1u8), (0x60_0000, 0xb2), (0x70_0000, 0xc3)] {
        r.mem.write_obj(tag, GuestAddress(gpa)).expect("w");
    }
    let h = r.vtd.handle(0x20);
    r.map(top, 3, 0x7000, 0x50_0000, 3, 1);
    r.map(top, 3, 0x8000, 0x70_0000, 3, 1);
    assert_eq!(byte_at(&h, 0x7000), Some(0xa1));
    assert_eq!(byte_at(&h, 0x8000), Some(0xc3));
    assert_eq!(stale(&r.vtd), [0, 0, 0]);
    // The guest remaps 0x7000 without invalidating: the stale entry is used, and seen.
    r.map(top, 3, 0x7000, 0x60_0000, 3, 1);
    assert_eq!(byte_at(&h, 0x7000), Some(0xa1), "stale until invalidated");
    assert_eq!(stale(&r.vtd), [0, 1, 0]);
    let (_, hist) = r.vtd.stale_uses();
    assert_eq!(
        hist[0].what,
        StaleUse {
            kind: StaleKind::Iotlb,
            sid: 0x20,
            did: 7,
            at: 0x7000
        }
    );
    // Invalidations that do not cover it: another page, another domain, the context.
    psi(&r.vtd, 7, 0x9000, 0);
    psi(&r.vtd, 8, 0x7000, 0);
    wr64(&r.vtd, reg::CCMD, 1 << 63 | 1 << 61);
    assert_eq!(byte_at(&h, 0x7000), Some(0xa1), "still stale");
    assert_eq!(r.vtd.stale_uses().1.len(), 1, "one distinct stale entry");
    assert_eq!(r.vtd.stale_uses().1[0].uses, 2);
    // A two-page PSI (AM 1) from 0x6000 covers 0x7000 but not 0x8000.
    r.map(top, 3, 0x8000, 0x50_0000, 3, 1);
    psi(&r.vtd, 7, 0x6000, 1);
    assert_eq!(byte_at(&h, 0x7000), Some(0xb2), "refreshed");
    assert_eq!(
        byte_at(&h, 0x8000),
        Some(0xc3),
        "outside the mask: still stale"
    );
    // Domain-selective covers everything of domain 7.
    wr64(&r.vtd, reg::IOTLB, 1 << 63 | 2 << 60 | 7 << 32);
    assert_eq!(byte_at(&h, 0x8000), Some(0xa1));
    assert_eq!(stale(&r.vtd), [0, 3, 0]);
}

#[test]
fn exact_caching_context_entries_and_srtp() {
    let mut r = Rig::with_caching(CachingMode::Exact);
    let top = r.attach(0x20, 3);
    r.mem.write_obj(0x11u8, GuestAddress(0x50_0000)).expect("w");
    r.mem.write_obj(0x22u8, GuestAddress(0x60_0000)).expect("w");
    r.map(top, 3, 0x7000, 0x50_0000, 3, 1);
    let h = r.vtd.handle(0x20);
    assert_eq!(byte_at(&h, 0x7000), Some(0x11));
    // A new page-table root for the device, same domain, no invalidation at all.
    let top2 = r.page();
    r.map(top2, 3, 0x7000, 0x60_0000, 3, 1);
    r.w64(CTX + 0x20 * 16, top2 | 1);
    assert_eq!(byte_at(&h, 0x7000), Some(0x11));
    assert_eq!(stale(&r.vtd)[0], 1, "stale context entry");
    // Device-selective of another function (00:04.1; FM 0) does not cover 00:04.0.
    wr64(&r.vtd, reg::CCMD, 1 << 63 | 3 << 61 | 0x21 << 16);
    assert_eq!(byte_at(&h, 0x7000), Some(0x11));
    assert_eq!(stale(&r.vtd)[0], 2);
    // FM 1 (function bit 2 masked) with 00:04.4 covers 00:04.0: the context is read
    // again, but the IOTLB entry of domain 7 survives until an IOTLB invalidation.
    wr64(&r.vtd, reg::CCMD, 1 << 63 | 3 << 61 | 1 << 32 | 0x24 << 16);
    assert_eq!(byte_at(&h, 0x7000), Some(0x11));
    assert_eq!(stale(&r.vtd), [2, 1, 0]);
    wr64(&r.vtd, reg::IOTLB, 1 << 63 | 1 << 60);
    assert_eq!(byte_at(&h, 0x7000), Some(0x22));
    // SRTP without invalidation keeps the cached context in exact mode.
    let root2 = r.page();
    let ctx2 = r.page();
    r.w64(root2, ctx2 | 1);
    wr64(&r.vtd, reg::RTADDR, root2);
    wr32(&r.vtd, reg::GCMD, gcmd::TE | gcmd::SRTP);
    assert_eq!(byte_at(&h, 0x7000), Some(0x22), "the old context is used");
    assert_eq!(stale(&r.vtd)[0], 3);
    // Queued invalidation: a global context descriptor, then a global IOTLB one.
    let q = r.page();
    r.w64(q, 1 | 1 << 4);
    r.w64(q + 16, 2 | 1 << 4);
    wr64(&r.vtd, reg::IQA, q);
    wr32(&r.vtd, reg::GCMD, gcmd::TE | gcmd::QIE);
    wr64(&r.vtd, reg::IQT, 2 << 4);
    assert_eq!(rd32(&r.vtd, reg::FSTS) & fsts::IQE, 0);
    assert!(
        byte_at(&h, 0x7000).is_none(),
        "no context entry under the new root"
    );
}

#[test]
fn simple_caching_refreshes_on_any_invalidation() {
    let mut r = Rig::new();
    let top = r.attach(0x20, 3);
    r.mem.write_obj(0x11u8, GuestAddress(0x50_0000)).expect("w");
    r.mem.write_obj(0x22u8, GuestAddress(0x60_0000)).expect("w");
    r.map(top, 3, 0x7000, 0x50_0000, 3, 1);
    let h = r.vtd.handle(0x20);
    assert_eq!(byte_at(&h, 0x7000), Some(0x11));
    r.map(top, 3, 0x7000, 0x60_0000, 3, 1);
    assert_eq!(byte_at(&h, 0x7000), Some(0x11), "cached");
    psi(&r.vtd, 9, 0x123000, 0);
    assert_eq!(
        byte_at(&h, 0x7000),
        Some(0x22),
        "any invalidation empties the caches"
    );
    assert_eq!(stale(&r.vtd), [0, 0, 0], "no detector in simple mode");
}

#[test]
fn exact_caching_in_the_virtio_view() {
    use vm_memory::GuestMemory;
    let mut r = Rig::with_caching(CachingMode::Exact);
    let top = r.attach(0x20, 3);
    r.mem.write_obj(0x11u8, GuestAddress(0x50_0000)).expect("w");
    r.mem.write_obj(0x22u8, GuestAddress(0x60_0000)).expect("w");
    r.mem.write_obj(0x33u8, GuestAddress(0x70_0000)).expect("w");
    r.map(top, 3, 0x7000, 0x50_0000, 3, 1);
    r.map(top, 3, 0x9000, 0x70_0000, 3, 1);
    let dm = DeviceIommu::memory(&r.mem, Some(&r.vtd), 0x20, true);
    let rd = |a: u64| dm.read_obj::<u8>(GuestAddress(a)).ok();
    assert_eq!((rd(0x7000), rd(0x9000)), (Some(0x11), Some(0x33)));
    r.map(top, 3, 0x7000, 0x60_0000, 3, 1);
    r.map(top, 3, 0x9000, 0x60_0000, 3, 1);
    assert_eq!(rd(0x7000), Some(0x11));
    assert_eq!(stale(&r.vtd)[1], 1);
    psi(&r.vtd, 7, 0x7000, 0);
    assert_eq!(rd(0x7000), Some(0x22), "the covered page is refreshed");
    assert_eq!(rd(0x9000), Some(0x33), "the other stays stale");
    assert_eq!(stale(&r.vtd)[1], 2);
    assert!(dm.check_range(GuestAddress(0x7000), 16, vm_memory::Permissions::Read));
}

/// Page-table contents for the walk-equivalence property: 4 MiB mapped, then changes
/// (page index in a 6 MiB window, kind) where kind picks 4K R/W/RW, a hole, a reserved bit, a 2M leaf, or
/// takes W or R away in the level-2 entry above the page.
fn build_tables(r: &mut Rig, top: u64, pages: &[(u64, u8)]) {
    // Every page of the first 4 MiB mapped read/write, then the changes.
    for n in 0..1024 {
        r.map(top, 3, n << 12, 0x80_0000 + (n << 12), 3, 1);
    }
    for &(n, kind) in pages {
        let iova = n << 12;
        match kind % 8 {
            0 => r.map(top, 3, iova, 0x80_0000 + (n << 12), 1, 1),
            3 => r.map(top, 3, iova, 0x80_0000 + (n << 12), 0, 1),
            1 => r.map(top, 3, iova, 0x80_0000 + (n << 12), 2, 1),
            2 => r.map(top, 3, iova, 0x80_0000 + (n << 12), 3, 1),
            4 => r.map(top, 3, iova, 0x80_0000 + (n << 12), 3 | (1 << 62), 1),
            6 | 7 => {
                let l2 = r.r64(top) & !0xfff;
                if l2 != 0 {
                    let slot = l2 + ((iova >> 21) & 0x1ff) * 8;
                    let e = r.r64(slot);
                    if e & 3 != 0 && e & (1 << 7) == 0 {
                        r.w64(slot, e & !(if kind % 8 == 6 { 2 } else { 1 }));
                    }
                }
            }
            // A 2 MiB leaf, unless a 4K table is already there.
            _ => {
                let l2 = r.r64(top) & !0xfff;
                if l2 == 0 || r.r64(l2 + ((iova >> 21) & 0x1ff) * 8) == 0 {
                    r.map(top, 3, iova & !0x1f_ffff, 0x100_0000, 3, 2);
                }
            }
        }
    }
}

proptest::proptest! {
    /// Filling a range with one walk per leaf table sees exactly what walking every
    /// page from the top sees: the same mappings, the same first refusal, the same
    /// fault records.
    #[test]
    fn range_walks_match_page_walks(
        pages in proptest::collection::vec((0u64..1536, 0u8..8), 0..24),
        start in 0u64..1536,
        len in 1u64..600,
        read in proptest::bool::ANY,
        write in proptest::bool::ANY,
    ) {
        let (mut a, mut b) = (Rig::new(), Rig::new());
        let (ta, tb) = (a.attach(0x20, 3), b.attach(0x20, 3));
        build_tables(&mut a, ta, &pages);
        build_tables(&mut b, tb, &pages);
        let (iova, end) = (start << 12 | 0x123, (start + len) << 12);
        let mut got = Vec::new();
        let ra = a.vtd.resolve_range(0x20, iova, end, read, write, |m, did| got.push((m, did)));
        let mut want = Vec::new();
        let mut rb = Ok(());
        let mut at = iova;
        while at < end {
            match b.vtd.resolve(0x20, at, read, write) {
                Ok((m, did)) => {
                    want.push((m, did));
                    let size = 1u64 << m.page_shift;
                    at = (at & !(size - 1)) + size;
                }
                Err(reason) => {
                    rb = Err((at, reason));
                    break;
                }
            }
        }
        proptest::prop_assert_eq!(got, want);
        proptest::prop_assert_eq!(ra, rb);
        proptest::prop_assert_eq!(a.records(), b.records());
    }
}
