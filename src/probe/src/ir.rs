//! Interrupt-remapping scenarios: the probe builds an interrupt remapping table, turns
//! remapping on as Linux does (queued invalidation, IRTA, SIRTP, IRE, a global IEC),
//! then sends remappable-format MSI, MSI-X, IOAPIC and DMA interrupt requests and
//! checks where they arrive; breaks entries for every fault reason and reads the fault
//! records; and checks the interrupt entry cache (stale until invalidated, index-
//! selective versus global), source-ID verification, compatibility format (CFI) and
//! destinations above 255.

use alloc::format;
use alloc::vec::Vec;

use crate::cpu::{self, mmio_write32, wait_until};
use crate::idt::{self, Mode};
use crate::iommu::{self, page, pool_reset, reg, w64, Unit, FAULT_VECTOR, QIE};
use crate::pci::{Bdf, Msi, Msix};
use crate::tap::Outcome;
use crate::tests::{bsp_apic, Ctx, QUIET, SOON};
use crate::{apic, check, fail, skip, smp};

const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;
const CFI: u32 = 1 << 23;
/// log2(entries) - 1 of the table: 256 entries in one page.
const SIZE_FIELD: u64 = 7;
const ENTRIES: u16 = 256;

/// The remapping set-up of one scenario.
struct Ir {
    u: Unit,
    table: u64,
    queue: u64,
    status: u64,
    tail: u64,
    eime: bool,
}

/// The fv-test device: its function, BAR0 (registers) and MSI-X capability.
struct Fvt {
    bdf: Bdf,
    bar: u64,
}

impl Fvt {
    fn raise(&self, n: u32) {
        mmio_write32(self.bar + 0x08, n);
    }
}

fn fvtest(c: &Ctx) -> Option<Fvt> {
    let bdf = c.find(0x1234, 0xfa17)?;
    Some(Fvt {
        bdf,
        bar: bdf.mem_bar(0)?,
    })
}

/// Address of a remappable-format request for `index` (SHV as given).
fn remappable(index: u16, shv: bool) -> u64 {
    0xfee0_0000
        | (u64::from(index & 0x7fff) << 5)
        | (1 << 4)
        | (u64::from(shv) << 3)
        | (u64::from(index >> 15) << 2)
}

/// The CPUs a scenario aims at: the first four and the last one online (so that a VM
/// with hundreds of vCPUs reaches its highest APIC IDs without running out of vectors).
fn targets() -> Vec<usize> {
    let n = smp::online();
    let mut v: Vec<usize> = (0..n.min(4)).collect();
    if n > 4 {
        v.push(n - 1);
    }
    v
}

fn sid_of(b: Bdf) -> u16 {
    iommu::sid(b)
}

impl Ir {
    /// Remapping on with an empty 256-entry table (CFI as asked).
    fn on(c: &Ctx, cfi: bool) -> Result<Self, Outcome> {
        let Some(d) = c.p.dmar else {
            return Err(Outcome::Skip(
                "no DMAR table (faultvisor run --iommu intel)".into(),
            ));
        };
        let u = Unit::new(&d);
        if (u.r64(reg::ECAP) >> 3) & 1 == 0 {
            return Err(Outcome::Skip(
                "the unit does not offer interrupt remapping".into(),
            ));
        }
        u.set_persistent(IRE, false);
        u.set_persistent(iommu::TE, false);
        u.set_persistent(QIE, false);
        u.clear_faults();
        u.fault_event_to_bsp(false);
        idt::set_mode(FAULT_VECTOR, Mode::Eoi);
        pool_reset();
        let eime = apic::is_x2apic();
        let ir = Self {
            u,
            table: page(),
            queue: page(),
            status: page(),
            tail: 0,
            eime,
        };
        u.w64(reg::IQT, 0);
        u.w64(reg::IQA, ir.queue);
        u.set_persistent(QIE, true);
        u.w64(reg::IRTA, ir.table | (u64::from(eime) << 11) | SIZE_FIELD);
        u.command(SIRTP, SIRTP, true);
        let mut ir = ir;
        ir.iec(None);
        if cfi {
            u.set_persistent(CFI, true);
        }
        if !u.set_persistent(IRE, true) {
            return Err(Outcome::Fail("IRES not set synchronously".into()));
        }
        Ok(ir)
    }

    /// An entry: present, fixed, edge, `vector` to APIC `dest`, source check `hi`.
    fn set(&self, index: u16, vector: u8, dest: u32, hi: u64) {
        self.raw(index, self.lo(vector, dest), hi);
    }

    fn lo(&self, vector: u8, dest: u32) -> u64 {
        let dst = if self.eime {
            u64::from(dest) << 32
        } else {
            u64::from(dest & 0xff) << 40
        };
        1 | (u64::from(vector) << 16) | dst
    }

    fn raw(&self, index: u16, lo: u64, hi: u64) {
        let at = self.table + u64::from(index) * 16;
        w64(at + 8, hi);
        w64(at, lo);
    }

    /// An interrupt entry cache invalidation (global, or of one index), then a wait.
    fn iec(&mut self, index: Option<u16>) {
        let desc = match index {
            None => 4,
            Some(i) => 4 | (1 << 4) | (u64::from(i) << 32),
        };
        let at = self.queue + (self.tail % 256) * 16;
        w64(at, desc);
        w64(at + 8, 0);
        let at2 = self.queue + ((self.tail + 1) % 256) * 16;
        w64(at2, 5 | (1 << 5) | (0x5a5a << 32));
        w64(at2 + 8, self.status);
        w64(self.status, 0);
        self.tail += 2;
        self.u.w64(reg::IQT, (self.tail % 256) << 4);
    }

    /// The first pending fault record: (index, source ID, reason).
    fn fault(&self) -> Option<(u16, u16, u8)> {
        if self.u.fsts() & iommu::PPF == 0 {
            return None;
        }
        let fri = (self.u.fsts() >> 8) & 0xff;
        let (addr, sid, reason, _, f) = self.u.record(fri);
        f.then_some(((addr >> 48) as u16, sid, reason))
    }

    fn off(self) {
        self.u.set_persistent(IRE, false);
        self.u.set_persistent(CFI, false);
        self.u.set_persistent(QIE, false);
        self.u.clear_faults();
        self.u.fault_event_to_bsp(true);
    }
}

macro_rules! ir_on {
    ($c:expr, $cfi:expr) => {
        match Ir::on($c, $cfi) {
            Ok(x) => x,
            Err(o) => return o,
        }
    };
}

macro_rules! need_fvtest {
    ($c:expr) => {
        match fvtest($c) {
            Some(f) => f,
            None => skip!("no fv-test device (faultvisor run --device test)"),
        }
    };
}

fn arrives(v: u8, before: u32) -> bool {
    cpu::sti();
    let ok = wait_until(SOON, || idt::total(v) > before);
    cpu::cli();
    ok
}

fn quiet(v: u8, before: u32) -> bool {
    cpu::sti();
    let q = !wait_until(QUIET, || idt::total(v) > before);
    cpu::cli();
    q
}

/// Remapped MSI to every CPU, and multi-message MSI through sub-handles.
pub fn msi(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let Some(m) = Msi::find(f.bdf) else {
        fail!("fv-test has no MSI capability");
    };
    let ir = ir_on!(c, false);
    f.bdf.enable(true);
    let sid = sid_of(f.bdf);
    let hi = u64::from(sid) | (1 << 18);
    let mut seen = Vec::new();
    for (k, i) in targets().into_iter().enumerate() {
        let v = 0x90 + k as u8;
        let dest = smp::apic_id(i).unwrap_or(0);
        ir.set(k as u16, v, dest, hi);
        m.enable_raw(remappable(k as u16, false), 0, 1);
        let before = idt::count(i, v);
        f.raise(0);
        let ok = cpu::wait_until(SOON, || {
            cpu::sti();
            idt::count(i, v) > before
        });
        cpu::cli();
        if !ok {
            m.disable();
            ir.off();
            fail!("IRTE {k} (vector {v:#x}) did not reach CPU {i}");
        }
        seen.push((i, v));
    }
    // Four vectors through one handle with SHV: sub-handles 0..3 pick IRTEs 16..19.
    for k in 0..4u16 {
        ir.set(16 + k, 0xb0 + k as u8, bsp_apic(), hi);
    }
    m.enable_raw(remappable(16, true), 0, 4);
    let mut multi = true;
    for k in 0..4u32 {
        let v = 0xb0 + k as u8;
        let before = idt::total(v);
        f.raise(k);
        multi &= arrives(v, before);
    }
    m.disable();
    let fault = ir.fault();
    ir.off();
    check!(
        multi,
        "multi-message MSI through sub-handles did not arrive"
    );
    check!(fault.is_none(), "a fault was recorded: {fault:x?}");
    Outcome::Pass(Some(format!(
        "IRTEs to (cpu, vector) {seen:x?}; 4 sub-handles of one handle"
    )))
}

/// Remapped MSI-X entries to every CPU.
pub fn msix(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let Some(m) = Msix::find(f.bdf) else {
        fail!("fv-test has no MSI-X capability");
    };
    let ir = ir_on!(c, false);
    f.bdf.enable(true);
    let hi = u64::from(sid_of(f.bdf)) | (1 << 18);
    let cpus: Vec<usize> = targets().into_iter().take(usize::from(m.size)).collect();
    let mut seen = Vec::new();
    for (k, &i) in cpus.iter().enumerate() {
        let v = 0x98 + k as u8;
        ir.set(64 + k as u16, v, smp::apic_id(i).unwrap_or(0), hi);
        m.program_raw(k as u16, remappable(64 + k as u16, false), 0);
    }
    m.enable(false);
    for (k, &i) in cpus.iter().enumerate() {
        let v = 0x98 + k as u8;
        let before = idt::count(i, v);
        f.raise(k as u32);
        let ok = cpu::wait_until(SOON, || {
            cpu::sti();
            idt::count(i, v) > before
        });
        cpu::cli();
        if !ok {
            m.disable();
            ir.off();
            fail!(
                "MSI-X entry {k} through IRTE {} did not reach CPU {i}",
                64 + k
            );
        }
        seen.push((i, v));
    }
    m.disable();
    ir.off();
    Outcome::Pass(Some(format!(
        "MSI-X through IRTEs 64.., (cpu, vector) {seen:x?}"
    )))
}

/// IOAPIC entries in remappable format: edge to every CPU, and a level pin ended
/// through the IOAPIC's EOI register with the pin number, as Linux does under IR.
pub fn ioapic(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let ir = ir_on!(c, false);
    f.bdf.enable(false);
    let gsi = u32::from(f.bdf.read8(0x3c));
    let Some((io, pin)) = c.p.pin(gsi) else {
        ir.off();
        fail!("no IOAPIC serves GSI {gsi}");
    };
    let hi = u64::from(iommu_ioapic_sid(c)) | (1 << 18);
    let rte = |index: u16, level: bool| {
        (u64::from(index & 0x7fff) << 49)
            | (1 << 48)
            | (u64::from(index >> 15) << 11)
            | u64::from(pin)
            | (u64::from(level) << 15)
    };
    let mut seen = Vec::new();
    for (k, i) in targets().into_iter().enumerate() {
        let v = 0xa0 + k as u8;
        ir.set(128 + k as u16, v, smp::apic_id(i).unwrap_or(0), hi);
        io.set_rte(pin, rte(128 + k as u16, false));
        let before = idt::count(i, v);
        mmio_write32(f.bar + 0x10, 1);
        let ok = cpu::wait_until(SOON, || {
            cpu::sti();
            idt::count(i, v) > before
        });
        cpu::cli();
        if !ok {
            io.mask(pin);
            let fault = ir.fault();
            ir.off();
            fail!(
                "remappable RTE (IRTE {}) did not reach CPU {i}; fault {fault:x?}",
                128 + k
            );
        }
        seen.push((i, v));
    }
    // Level: the IRTE is edge; remote IRR holds until the EOI register names the pin.
    const LV: u8 = 0xa8 + 1;
    ir.set(140, LV, bsp_apic(), hi);
    io.set_rte(pin, rte(140, true));
    let before = idt::total(LV);
    mmio_write32(f.bar + 0x0c, 1);
    let first = arrives(LV, before);
    let irr = io.rte(pin) & crate::ioapic::rte::REMOTE_IRR != 0;
    let held = quiet(LV, before + 1);
    // EOI through the register with the vector field's value: the pin number.
    io.eoi(pin as u8);
    let again = arrives(LV, before + 1);
    mmio_write32(f.bar + 0x0c, 0);
    io.eoi(pin as u8);
    io.mask(pin);
    let fault = ir.fault();
    ir.off();
    check!(first, "level pin through IRTE 140 not delivered");
    check!(irr, "remote IRR not set for the remappable level entry");
    check!(held, "re-delivered before the EOI");
    check!(
        again,
        "EOI register with the pin number did not re-deliver the asserted line"
    );
    check!(fault.is_none(), "a fault was recorded: {fault:x?}");
    Outcome::Pass(Some(format!(
        "pin {pin} via IRTEs to (cpu, vector) {seen:x?}; level ended by EOI register {pin}"
    )))
}

fn iommu_ioapic_sid(c: &Ctx) -> u16 {
    c.p.dmar.and_then(|d| d.ioapic_sid).unwrap_or(0xff00)
}

/// A device's DMA write of a remappable message to the interrupt range.
pub fn dma_request(c: &Ctx) -> Outcome {
    let (_, e) = match iommu::setup(c) {
        Ok(x) => x,
        Err(o) => return o,
    };
    let ir = ir_on!(c, false);
    const V: u8 = 0xa6;
    ir.set(40, V, bsp_apic(), u64::from(e.sid) | (1 << 18));
    let data = page();
    w64(data, 2); // sub-handle 2 -> index 42
    ir.set(42, V, bsp_apic(), u64::from(e.sid) | (1 << 18));
    let (cmd, _) = e.dma(data, iommu::EDU_BUF, 4, false);
    let before = idt::total(V);
    let (cmd2, err) = e.dma(iommu::EDU_BUF, remappable(40, true), 4, true);
    let ok = arrives(V, before);
    let fault = ir.fault();
    ir.off();
    check!(
        cmd & 0x100 == 0 && cmd2 & 0x100 == 0,
        "edu DMA failed (error {err:#x})"
    );
    check!(ok, "the remappable DMA interrupt request did not arrive");
    check!(fault.is_none(), "a fault was recorded: {fault:x?}");
    Outcome::Pass(Some(format!(
        "edu's dword write to handle 40 + sub-handle 2 arrived on vector {V:#x}"
    )))
}

/// Every reason a lookup can fail for, with the record Linux would read; nothing is
/// delivered, and the fault event itself is never remapped.
pub fn faults(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let Some(m) = Msix::find(f.bdf) else {
        fail!("fv-test has no MSI-X capability");
    };
    let mut ir = ir_on!(c, false);
    f.bdf.enable(true);
    let sid = sid_of(f.bdf);
    let good = u64::from(sid) | (1 << 18);
    const V: u8 = 0xb8;
    // (what, IRTE index, entry lo, entry hi, address, data, expected reason)
    let lo = ir.lo(V, bsp_apic());
    let cases: Vec<(&str, u16, u64, u64, u64, u32, u8)> = alloc::vec![
        (
            "reserved request bits",
            1,
            lo,
            good,
            remappable(1, true),
            1 << 16,
            0x20,
        ),
        (
            "index beyond the table",
            2,
            lo,
            good,
            remappable(ENTRIES + 3, false),
            0,
            0x21,
        ),
        (
            "present bit clear",
            3,
            lo & !1,
            good,
            remappable(3, false),
            0,
            0x22
        ),
        (
            "reserved IRTE bits",
            4,
            lo | (1 << 15),
            good,
            remappable(4, false),
            0,
            0x24,
        ),
        (
            "compatibility format",
            5,
            lo,
            good,
            apic::msi_address(bsp_apic()),
            u32::from(V),
            0x25,
        ),
        (
            "source ID",
            6,
            lo,
            u64::from(sid ^ 0x8) | (1 << 18),
            remappable(6, false),
            0,
            0x26,
        ),
    ];
    let mut seen = Vec::new();
    m.enable(false);
    for (what, idx, elo, ehi, addr, data, want) in cases {
        ir.raw(idx, elo, ehi);
        ir.iec(Some(idx));
        ir.u.clear_faults();
        let before = idt::total(V);
        let fe = idt::total(FAULT_VECTOR);
        m.program_raw(0, addr, data);
        f.raise(0);
        let delivered = !quiet(V, before);
        let event = arrives(FAULT_VECTOR, fe);
        let got = ir.fault();
        let want_index = if want == 0x25 {
            0
        } else if want == 0x21 {
            ENTRIES + 3
        } else {
            idx
        };
        if delivered || got != Some((want_index, sid, want)) || !event {
            m.disable();
            ir.off();
            fail!("{what}: delivered {delivered}, fault event {event}, record {got:x?}, want (index {want_index:#x}, sid {sid:#x}, reason {want:#x})");
        }
        seen.push(want);
    }
    // An unreadable table: 0x23.
    ir.u.w64(
        reg::IRTA,
        0x7f00_0000_0000 | SIZE_FIELD | (u64::from(ir.eime) << 11),
    );
    ir.u.command(SIRTP, SIRTP, true);
    ir.u.clear_faults();
    m.program_raw(0, remappable(1, false), 0);
    f.raise(0);
    let unreadable = ir.fault();
    // FPD: a not-present entry with FPD records nothing.
    ir.u.w64(
        reg::IRTA,
        ir.table | SIZE_FIELD | (u64::from(ir.eime) << 11),
    );
    ir.u.command(SIRTP, SIRTP, true);
    ir.raw(7, 2, good);
    ir.iec(None);
    ir.u.clear_faults();
    m.program_raw(0, remappable(7, false), 0);
    f.raise(0);
    let fpd = ir.fault();
    m.disable();
    ir.off();
    check!(
        unreadable.map(|r| r.2) == Some(0x23),
        "unreadable table: {unreadable:x?}, want reason 0x23"
    );
    check!(fpd.is_none(), "FPD did not suppress the record: {fpd:x?}");
    seen.push(0x23);
    Outcome::Pass(Some(format!(
        "reasons {seen:x?} recorded with index and SID, nothing delivered, fault event sent; FPD suppresses"
    )))
}

/// The interrupt entry cache: a changed IRTE is stale until invalidated; an
/// index-selective IEC refreshes only its index, a global one everything.
pub fn stale(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let Some(m) = Msix::find(f.bdf) else {
        fail!("fv-test has no MSI-X capability");
    };
    let mut ir = ir_on!(c, false);
    f.bdf.enable(true);
    let hi = u64::from(sid_of(f.bdf)) | (1 << 18);
    let (a, b) = (0xc0u8, 0xc1u8);
    ir.set(10, a, bsp_apic(), hi);
    ir.set(11, a, bsp_apic(), hi);
    ir.iec(None);
    m.program_raw(0, remappable(10, false), 0);
    m.program_raw(1, remappable(11, false), 0);
    m.enable(false);
    let hit = |entry: u32, v: u8| {
        let before = idt::total(v);
        f.raise(entry);
        arrives(v, before)
    };
    let first = hit(0, a);
    // Both entries now ask for vector b, without an invalidation.
    ir.set(10, b, bsp_apic(), hi);
    ir.set(11, b, bsp_apic(), hi);
    let stale10 = hit(0, a);
    let stale11 = hit(1, a);
    ir.iec(Some(11));
    let fresh11 = hit(1, b);
    let still10 = hit(0, a);
    ir.iec(None);
    let fresh10 = hit(0, b);
    m.disable();
    ir.off();
    check!(first, "the first interrupt did not arrive");
    check!(
        stale10 && stale11,
        "a changed IRTE took effect without an invalidation"
    );
    check!(fresh11, "index-selective IEC did not refresh its entry");
    check!(still10, "index-selective IEC of 11 refreshed entry 10 too");
    check!(fresh10, "global IEC did not refresh the entry");
    Outcome::Pass(Some(
        "stale until IEC; IEC of index 11 left 10 stale; global IEC refreshed it".into(),
    ))
}

/// Source-ID verification: exact, with function bits ignored (SQ), by bus range, and
/// none.
pub fn sid(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let Some(m) = Msix::find(f.bdf) else {
        fail!("fv-test has no MSI-X capability");
    };
    let mut ir = ir_on!(c, false);
    f.bdf.enable(true);
    let sid = u64::from(sid_of(f.bdf));
    const V: u8 = 0xc4;
    m.enable(false);
    // (what, IRTE hi, delivered?)
    let cases = [
        ("SVT 0 (no check), any SID", 0x1234, true),
        ("SVT 1, exact SID", sid | (1 << 18), true),
        ("SVT 1, another function", (sid ^ 1) | (1 << 18), false),
        (
            "SVT 1 SQ 3, another function",
            (sid ^ 5) | (1 << 18) | (3 << 16),
            true,
        ),
        (
            "SVT 1 SQ 1, function bit 0 differs",
            (sid ^ 1) | (1 << 18) | (1 << 16),
            false,
        ),
        ("SVT 2, bus range 0..0", (2 << 18), true),
        ("SVT 2, bus range 1..5", 0x0105 | (2 << 18), false),
    ];
    let mut results = Vec::new();
    for (i, (what, hi, want)) in cases.iter().enumerate() {
        let idx = 20 + i as u16;
        ir.set(idx, V, bsp_apic(), *hi);
        ir.iec(Some(idx));
        ir.u.clear_faults();
        m.program_raw(0, remappable(idx, false), 0);
        let before = idt::total(V);
        f.raise(0);
        let got = if *want {
            arrives(V, before)
        } else {
            !quiet(V, before)
        };
        let fault = ir.fault();
        if got != *want || (!want && fault.map(|x| x.2) != Some(0x26)) {
            m.disable();
            ir.off();
            fail!("{what}: delivered {got}, fault {fault:x?}");
        }
        results.push(*want);
    }
    m.disable();
    ir.off();
    Outcome::Pass(Some(format!(
        "{} source-ID cases (exact, SQ masks, bus ranges, none) as the spec says",
        results.len()
    )))
}

/// Compatibility-format messages: blocked (0x25) until CFI is set, then let through.
pub fn cfi(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let Some(m) = Msi::find(f.bdf) else {
        fail!("fv-test has no MSI capability");
    };
    let ir = ir_on!(c, false);
    f.bdf.enable(true);
    const V: u8 = 0xc8;
    m.enable(bsp_apic(), V, 1);
    let before = idt::total(V);
    f.raise(0);
    let blocked = quiet(V, before);
    let fault = ir.fault();
    ir.u.clear_faults();
    ir.u.set_persistent(CFI, true);
    let cfis = ir.u.r32(reg::GSTS) & CFI != 0;
    f.raise(0);
    let passed = arrives(V, before);
    m.disable();
    ir.off();
    check!(
        blocked,
        "a compatibility-format MSI went through with CFI clear"
    );
    check!(
        fault.map(|x| x.2) == Some(0x25),
        "fault {fault:x?}, want 0x25"
    );
    check!(cfis, "CFIS not set");
    check!(
        passed,
        "CFI set, the compatibility-format MSI still blocked"
    );
    Outcome::Pass(Some(
        "blocked with 0x25 until CFI; then delivered as is".into(),
    ))
}

/// Destinations above 255 (32-bit x2APIC IDs with EIME): an IRTE aimed at the highest
/// APIC ID online.
pub fn x2apic(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    if !apic::is_x2apic() {
        skip!("needs x2APIC mode");
    }
    let n = smp::online();
    let Some((idx, dest)) = (0..n)
        .filter_map(|i| smp::apic_id(i).map(|d| (i, d)))
        .max_by_key(|(_, d)| *d)
    else {
        fail!("no CPU online");
    };
    if dest <= 255 {
        skip!("needs a CPU with an APIC ID above 255 (run with 288 vCPUs); highest here {dest}");
    }
    let Some(m) = Msix::find(f.bdf) else {
        fail!("fv-test has no MSI-X capability");
    };
    let ir = ir_on!(c, false);
    f.bdf.enable(true);
    const V: u8 = 0xcc;
    ir.set(50, V, dest, u64::from(sid_of(f.bdf)) | (1 << 18));
    m.program_raw(0, remappable(50, false), 0);
    m.enable(false);
    let before = idt::count(idx, V);
    f.raise(0);
    let ok = cpu::wait_until(SOON, || {
        cpu::sti();
        idt::count(idx, V) > before
    });
    cpu::cli();
    m.disable();
    ir.off();
    check!(ok, "IRTE to x2APIC ID {dest} did not reach CPU {idx}");
    Outcome::Pass(Some(format!(
        "IRTE to x2APIC ID {dest} reached CPU {idx} of {n}"
    )))
}

/// IRTE that carries fv-test's MSI while watching with remapping on.
const WATCH_IRTE: u16 = 5;

/// [`iommu::watch`] with interrupt remapping on: fv-test's MSI goes through IRTE 5 to
/// vector 0x71 on the BSP (for host tests of IRTE fault injection and introspection).
pub fn watch(c: &Ctx) -> Outcome {
    let f = need_fvtest!(c);
    let ir = ir_on!(c, false);
    let hi = u64::from(sid_of(f.bdf)) | (1 << 18);
    ir.set(WATCH_IRTE, iommu::WATCH_MSI, bsp_apic(), hi);
    let o = iommu::watch_with(c, Some(remappable(WATCH_IRTE, false)));
    ir.off();
    o
}

/// IRTE the MSI benchmarks go through.
const BENCH_IRTE: u16 = 3;

/// The MSI benchmarks with remapping on: the device's MSI in remappable format through
/// IRTE 3 (source-ID verified) to the benchmark vector on the BSP.
fn remapped_bench(c: &Ctx, name: &str, rate: bool) -> Outcome {
    let Some(bdf) = c.find(0x1234, 0xfa17).or_else(|| c.find(0x1234, 0x11e8)) else {
        skip!("no fv-test or edu device");
    };
    let ir = ir_on!(c, false);
    let hi = u64::from(sid_of(bdf)) | (1 << 18);
    ir.set(BENCH_IRTE, crate::tests::BENCH_VECTOR, bsp_apic(), hi);
    let o = crate::tests::msi_bench(
        c,
        name,
        &|m| m.enable_raw(remappable(BENCH_IRTE, false), 0, 1),
        rate,
    );
    let fault = ir.fault();
    ir.off();
    if let Some(f) = fault {
        fail!("remapping fault during the benchmark: {f:x?}");
    }
    o
}

/// `bench.ir_msi_latency`: `bench.msi_latency` through an IRTE.
pub fn bench_msi_latency(c: &Ctx) -> Outcome {
    remapped_bench(c, "ir_msi_latency", false)
}

/// `bench.ir_irq_rate`: `bench.irq_rate` through an IRTE.
pub fn bench_irq_rate(c: &Ctx) -> Outcome {
    remapped_bench(c, "ir_irq_rate", true)
}
