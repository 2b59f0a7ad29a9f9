//! Property test of DMA isolation: random domains (3- or 4-level tables, random 4 KiB
//! mappings with random permissions) for random requesters, and random requests from
//! them and from requesters that have no domain. For every request, against a model
//! built from the mappings alone (not from the tables):
//! - it succeeds exactly when every page it touches is mapped for its requester with
//!   the permission it needs;
//! - a write that succeeds changes only the bytes the model maps it to, and those hold
//!   the data; a read returns the bytes at the mapped addresses;
//! - a request that fails changes no byte of guest memory (tables included) and is
//!   recorded as exactly one fault.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::interrupt::RecordingController;

const MEM: usize = 4 << 20;
const ROOT: u64 = 0x1_0000;
const CTX: u64 = 0x1_1000;
const PT_POOL: u64 = 0x2_0000;
const PT_END: u64 = 0x10_0000;
/// Data pages the mappings point at.
const DATA: u64 = 0x20_0000;
const DATA_PAGES: u64 = 256;
/// IOVA pages a domain may map (the requests range a little beyond).
const IOVA_PAGES: u64 = 48;
/// IOVAs start here (just below a 2 MiB boundary, so walks cross tables).
const IOVA_BASE: u64 = 0x1f_0000;

#[derive(Clone, Debug)]
struct Domain {
    devfn: u8,
    levels: u32,
    /// (IOVA page, data page, R, W); a later entry for a page replaces an earlier one.
    maps: Vec<(u64, u64, bool, bool)>,
}

#[derive(Clone, Debug)]
struct Request {
    /// An index into the domains, or a requester without one.
    who: usize,
    stranger: u16,
    page: u64,
    offset: u64,
    len: usize,
    write: bool,
}

fn domains() -> impl Strategy<Value = Vec<Domain>> {
    proptest::collection::vec(
        (
            0u8..=255,
            prop_oneof![Just(3u32), Just(4u32)],
            proptest::collection::vec(
                (0..IOVA_PAGES, 0..DATA_PAGES, any::<bool>(), any::<bool>()),
                1..24,
            ),
        )
            .prop_map(|(devfn, levels, maps)| Domain {
                devfn,
                levels,
                maps,
            }),
        1..4,
    )
    .prop_map(|mut v| {
        // One domain per devfn.
        let mut seen = std::collections::HashSet::new();
        v.retain(|d| seen.insert(d.devfn));
        v
    })
}

fn requests() -> impl Strategy<Value = Vec<Request>> {
    proptest::collection::vec(
        (
            0usize..5,
            any::<u16>(),
            0..IOVA_PAGES + 2,
            0u64..4096,
            1usize..6000,
            any::<bool>(),
        )
            .prop_map(|(who, stranger, page, offset, len, write)| Request {
                who,
                stranger,
                page,
                offset,
                len,
                write,
            }),
        1..16,
    )
}

struct World {
    mem: GuestMemoryMmap,
    vtd: Arc<Vtd>,
    /// Per requester: IOVA page → (data GPA, R, W).
    model: HashMap<u16, HashMap<u64, (u64, bool, bool)>>,
}

fn build(ds: &[Domain]) -> World {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("mem");
    let w64 = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).expect("w");
    let r64 = |a: u64| -> u64 { mem.read_obj(GuestAddress(a)).expect("r") };
    let mut next = PT_POOL;
    let mut page = || {
        let p = next;
        next += 0x1000;
        assert!(next <= PT_END, "page-table pool");
        p
    };
    w64(ROOT, CTX | 1);
    let mut model = HashMap::new();
    for d in ds {
        let top = page();
        w64(CTX + u64::from(d.devfn) * 16, top | 1);
        w64(
            CTX + u64::from(d.devfn) * 16 + 8,
            u64::from(d.levels - 2) | (1 << 8),
        );
        let m: &mut HashMap<u64, (u64, bool, bool)> = model.entry(u16::from(d.devfn)).or_default();
        for &(ip, dp, r, w) in &d.maps {
            let iova = IOVA_BASE + ip * 4096;
            let gpa = DATA + dp * 4096;
            let mut table = top;
            for level in (1..=d.levels).rev() {
                let slot = table + ((iova >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
                if level == 1 {
                    w64(slot, gpa | u64::from(r) | (u64::from(w) << 1));
                    break;
                }
                let cur = r64(slot);
                table = if cur & 3 != 0 {
                    cur & !0xfff
                } else {
                    let p = page();
                    w64(slot, p | 3);
                    p
                };
            }
            m.insert(iova >> 12, (gpa, r, w));
        }
    }
    // Recognizable data everywhere the devices may reach.
    for i in 0..DATA_PAGES * 4096 / 8 {
        w64(
            DATA + i * 8,
            0x0101_0101_0101_0101u64.wrapping_mul(i % 251 + 1),
        );
    }
    let rec = Arc::new(RecordingController::new(24, 100));
    let vtd = Arc::new(Vtd::new(mem.clone(), rec));
    vtd.write(reg::RTADDR, &ROOT.to_le_bytes());
    vtd.write(reg::GCMD, &gcmd::SRTP.to_le_bytes());
    vtd.write(reg::GCMD, &gcmd::TE.to_le_bytes());
    World { mem, vtd, model }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM];
    mem.read_slice(&mut v, GuestAddress(0)).expect("read");
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn dma_stays_inside_its_domain(ds in domains(), reqs in requests()) {
        let w = build(&ds);
        let handles: HashMap<u16, DmaHandle> =
            w.model.keys().map(|&sid| (sid, w.vtd.handle(sid))).collect();
        for (k, rq) in reqs.iter().enumerate() {
            let sid = match ds.get(rq.who) {
                Some(d) => u16::from(d.devfn),
                // A requester with no domain (never one of ours: devfns are bytes).
                None => rq.stranger | 0x100,
            };
            let iova = IOVA_BASE + rq.page * 4096 + rq.offset;
            let end = iova + rq.len as u64;
            // The model's verdict and byte placement.
            let empty = HashMap::new();
            let map = w.model.get(&sid).unwrap_or(&empty);
            let mut allowed = true;
            let mut placement = Vec::new();
            let mut at = iova;
            while at < end {
                let chunk_end = ((at | 0xfff) + 1).min(end);
                match map.get(&(at >> 12)) {
                    Some(&(gpa, r, wr)) if (rq.write && wr) || (!rq.write && r) => {
                        placement.push((at - iova, gpa + (at & 0xfff), chunk_end - at));
                    }
                    _ => allowed = false,
                }
                at = chunk_end;
            }
            let before = snapshot(&w.mem);
            let faults_before = {
                let s = w.vtd.stats();
                s.faults_recorded + s.faults_overflowed + s.faults_suppressed
            };
            let pattern: Vec<u8> = (0..rq.len).map(|i| (i as u8) ^ (k as u8) ^ 0x5a).collect();
            let mut buf = vec![0u8; rq.len];
            let fresh;
            let h = match handles.get(&sid) {
                Some(h) => h,
                None => {
                    fresh = w.vtd.handle(sid);
                    &fresh
                }
            };
            let r = if rq.write { h.write(iova, &pattern) } else { h.read(iova, &mut buf) };
            let after = snapshot(&w.mem);
            let s = w.vtd.stats();
            let faults = s.faults_recorded + s.faults_overflowed + s.faults_suppressed - faults_before;
            prop_assert_eq!(r.is_ok(), allowed, "request {:?} by {:#x}: {:?}", rq, sid, r);
            if r.is_err() {
                prop_assert!(before == after, "a failed request changed memory");
                prop_assert_eq!(faults, 1, "a failed request is one fault");
                continue;
            }
            prop_assert_eq!(faults, 0);
            if rq.write {
                let mut expect = before.clone();
                for &(off, gpa, n) in &placement {
                    let (o, g, n) = (off as usize, gpa as usize, n as usize);
                    expect[g..g + n].copy_from_slice(&pattern[o..o + n]);
                }
                prop_assert!(expect == after, "a write moved bytes outside its mapping");
            } else {
                prop_assert!(before == after, "a read changed memory");
                for &(off, gpa, n) in &placement {
                    let (o, g, n) = (off as usize, gpa as usize, n as usize);
                    prop_assert_eq!(&buf[o..o + n], &before[g..g + n]);
                }
            }
        }
    }
}
