//! The MSI-X capability, table and pending-bit array (PCI Local Bus 3.0 §6.8.2).
//!
//! Capability body: message control (10:0 table size − 1, 14 function mask, 15 enable),
//! table offset/BIR, PBA offset/BIR. Each table entry is 16 bytes: address low, address
//! high, data, vector control (bit 0 masked). Entries reset masked. A GSI is allocated
//! for an entry the first time it is unmasked (so a 2048-vector device does not exhaust
//! KVM's routes up front); a vector that fires while masked sets its PBA bit and goes out
//! on unmask.

use std::sync::Arc;

use super::config::{cap_id, ConfigError, PciConfig};
use crate::interrupt::{InterruptController, MsiMessage, MsiSource};
use crate::GuestAnomalies;

const CTRL: usize = 2;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const CTRL_ENABLE: u16 = 1 << 15;
/// Size of the capability, header included.
pub const MSIX_CAP_SIZE: usize = 12;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Largest table the capability can describe.
pub const MAX_VECTORS: u16 = 2048;

/// MSI-X state of one function.
pub struct Msix {
    cap: usize,
    bdf: u16,
    table: Vec<[u32; 4]>,
    pba: Vec<u64>,
    gsis: Vec<Option<u32>>,
    routed: Vec<Option<MsiMessage>>,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    irq: Arc<dyn InterruptController>,
    anomalies: GuestAnomalies,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("cap", &self.cap)
            .field("vectors", &self.table.len())
            .finish()
    }
}

impl Msix {
    /// Adds an MSI-X capability with `nvec` vectors whose table lives in BAR `table_bar`
    /// at `table_offset` and whose PBA lives in BAR `pba_bar` at `pba_offset` (both 8-byte
    /// aligned).
    pub fn new(
        config: &mut PciConfig,
        bdf: u16,
        nvec: u16,
        (table_bar, table_offset): (usize, u64),
        (pba_bar, pba_offset): (usize, u64),
        irq: Arc<dyn InterruptController>,
    ) -> Result<Self, ConfigError> {
        let nvec = nvec.clamp(1, MAX_VECTORS);
        let mut body = [0u8; MSIX_CAP_SIZE - 2];
        body[0..2].copy_from_slice(&(nvec - 1).to_le_bytes());
        let tbl = (table_offset as u32 & !7) | (table_bar as u32 & 7);
        let pba = (pba_offset as u32 & !7) | (pba_bar as u32 & 7);
        body[2..6].copy_from_slice(&tbl.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let mut wmask = [0u8; MSIX_CAP_SIZE - 2];
        wmask[1] = 0xc0;
        let cap = config.add_capability(cap_id::MSIX, &body, &wmask)?;
        let n = usize::from(nvec);
        Ok(Self {
            cap,
            bdf,
            table: vec![[0, 0, 0, 1]; n],
            pba: vec![0; n.div_ceil(64)],
            gsis: vec![None; n],
            routed: vec![None; n],
            table_bar,
            table_offset: table_offset & !7,
            pba_bar,
            pba_offset: pba_offset & !7,
            irq,
            anomalies: GuestAnomalies::new(),
        })
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.cap
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.table.len()
    }

    /// Bytes the table occupies.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the PBA occupies.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Whether a configuration write at `off` of `len` bytes touches this capability.
    pub fn covers(&self, off: usize, len: usize) -> bool {
        off < self.cap + MSIX_CAP_SIZE && off + len > self.cap
    }

    fn ctrl(&self, config: &PciConfig) -> u16 {
        config.word(self.cap + CTRL)
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        self.ctrl(config) & CTRL_ENABLE != 0
    }

    fn deliverable(&self, config: &PciConfig, v: usize) -> bool {
        let c = self.ctrl(config);
        c & CTRL_ENABLE != 0 && c & CTRL_FUNCTION_MASK == 0 && self.table[v][3] & 1 == 0
    }

    fn message(&self, v: usize) -> MsiMessage {
        let e = self.table[v];
        MsiMessage {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        }
    }

    fn pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.pba[v / 64] &= !(1 << (v % 64));
        }
    }

    fn sync_vector(&mut self, config: &PciConfig, v: usize) {
        let want = self.deliverable(config, v).then(|| self.message(v));
        if want != self.routed[v] {
            if want.is_some() && self.gsis[v].is_none() {
                match self.irq.allocate_gsi() {
                    Ok(g) => self.gsis[v] = Some(g),
                    Err(e) => {
                        log::warn!("pci {:04x}: MSI-X vector {v}: {e}", self.bdf);
                        return;
                    }
                }
            }
            if let Some(gsi) = self.gsis[v] {
                let source = MsiSource::Pci {
                    bdf: self.bdf,
                    vector: v as u16,
                };
                if let Err(e) = self.irq.set_msi_route(gsi, source, want) {
                    log::warn!("pci {:04x}: MSI-X vector {v}: {e}", self.bdf);
                    return;
                }
            }
            self.routed[v] = want;
        }
        // A pending message goes out on unmask, unless bus mastering is off.
        let master = config.command() & super::config::CMD_BUS_MASTER != 0;
        if want.is_some() && master && self.pending(v) {
            self.set_pending(v, false);
            if let Some(gsi) = self.gsis[v] {
                let _ = self.irq.trigger(gsi);
            }
        }
    }

    /// Re-derives every route after a configuration write (enable / function mask).
    pub fn update(&mut self, config: &PciConfig) {
        for v in 0..self.table.len() {
            self.sync_vector(config, v);
        }
    }

    /// Signals vector `v`: true if a message went out, false if dropped (disabled or
    /// out of range) or left pending (masked).
    pub fn trigger(&mut self, config: &PciConfig, v: usize) -> bool {
        if v >= self.table.len() || !self.enabled(config) {
            return false;
        }
        if !self.deliverable(config, v) {
            self.set_pending(v, true);
            return false;
        }
        match self.gsis[v] {
            Some(gsi) if self.routed[v].is_some() => self.irq.trigger(gsi).is_ok(),
            _ => false,
        }
    }

    /// Handles a BAR read if it falls on the table or PBA; returns whether it did.
    pub fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        if bar == self.table_bar {
            if let Some(rel) = offset
                .checked_sub(self.table_offset)
                .filter(|r| *r < self.table_size())
            {
                self.read_table(rel, data);
                return true;
            }
        }
        if bar == self.pba_bar {
            if let Some(rel) = offset
                .checked_sub(self.pba_offset)
                .filter(|r| *r < self.pba_size())
            {
                self.read_pba(rel, data);
                return true;
            }
        }
        false
    }

    /// Handles a BAR write if it falls on the table or PBA; returns whether it did.
    pub fn bar_write(&mut self, config: &PciConfig, bar: usize, offset: u64, data: &[u8]) -> bool {
        if bar == self.table_bar {
            if let Some(rel) = offset
                .checked_sub(self.table_offset)
                .filter(|r| *r < self.table_size())
            {
                self.write_table(config, rel, data);
                return true;
            }
        }
        if bar == self.pba_bar
            && offset
                .checked_sub(self.pba_offset)
                .is_some_and(|r| r < self.pba_size())
        {
            // The PBA is read-only.
            return true;
        }
        false
    }

    fn read_table(&self, rel: u64, data: &mut [u8]) {
        data.fill(0);
        let v = (rel / ENTRY_SIZE) as usize;
        let word = ((rel % ENTRY_SIZE) / 4) as usize;
        match (data.len(), rel % 4) {
            (4, 0) => data.copy_from_slice(&self.table[v][word].to_le_bytes()),
            (8, 0) if word.is_multiple_of(2) => {
                let q = u64::from(self.table[v][word]) | (u64::from(self.table[v][word + 1]) << 32);
                data.copy_from_slice(&q.to_le_bytes());
            }
            _ => self.anomalies.record(
                "msix",
                format_args!("{}-byte table read at {rel:#x}", data.len()),
            ),
        }
    }

    fn write_table(&mut self, config: &PciConfig, rel: u64, data: &[u8]) {
        let v = (rel / ENTRY_SIZE) as usize;
        let word = ((rel % ENTRY_SIZE) / 4) as usize;
        match (data.len(), rel % 4) {
            (4, 0) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.store(v, word, u32::from_le_bytes(b));
            }
            (8, 0) if word.is_multiple_of(2) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                let q = u64::from_le_bytes(b);
                self.store(v, word, q as u32);
                self.store(v, word + 1, (q >> 32) as u32);
            }
            _ => {
                self.anomalies.record(
                    "msix",
                    format_args!("{}-byte table write at {rel:#x}", data.len()),
                );
                return;
            }
        }
        self.sync_vector(config, v);
    }

    fn store(&mut self, v: usize, word: usize, val: u32) {
        self.table[v][word] = match word {
            0 => val & !3,
            3 => val & 1,
            _ => val,
        };
    }

    fn read_pba(&self, rel: u64, data: &mut [u8]) {
        data.fill(0);
        let q = self.pba[(rel / 8) as usize];
        match (data.len(), rel % 8) {
            (8, 0) => data.copy_from_slice(&q.to_le_bytes()),
            (4, 0) => data.copy_from_slice(&(q as u32).to_le_bytes()),
            (4, 4) => data.copy_from_slice(&((q >> 32) as u32).to_le_bytes()),
            _ => self.anomalies.record(
                "msix",
                format_args!("{}-byte PBA read at {rel:#x}", data.len()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingController;

    fn setup(n: u16) -> (Arc<RecordingController>, PciConfig, Msix) {
        let rec = Arc::new(RecordingController::new(24, 4000));
        let mut c = PciConfig::new(1, 2, 0, 0);
        assert!(c.write(0x04, &super::super::config::CMD_BUS_MASTER.to_le_bytes()));
        let m = Msix::new(&mut c, 0x20, n, (1, 0), (1, 0x800), rec.clone()).expect("msix");
        (rec, c, m)
    }

    fn enable(c: &mut PciConfig, m: &mut Msix, ctrl: u16) {
        assert!(c.write(m.offset() + CTRL, &ctrl.to_le_bytes()));
        m.update(c);
    }

    fn program(c: &PciConfig, m: &mut Msix, v: u64, vector: u32, masked: bool) {
        let base = v * ENTRY_SIZE;
        assert!(m.bar_write(c, 1, base, &0xfee0_1000u32.to_le_bytes()));
        assert!(m.bar_write(c, 1, base + 4, &0u32.to_le_bytes()));
        assert!(m.bar_write(c, 1, base + 8, &vector.to_le_bytes()));
        assert!(m.bar_write(c, 1, base + 12, &u32::from(masked).to_le_bytes()));
    }

    #[test]
    fn capability_fields() {
        let (_, c, m) = setup(8);
        let cap = m.offset();
        assert_eq!(c.capabilities(), vec![(cap_id::MSIX, cap)]);
        assert_eq!(c.word(cap + 2) & 0x7ff, 7);
        assert_eq!(c.dword(cap + 4), 1);
        assert_eq!(c.dword(cap + 8), 0x801);
    }

    #[test]
    fn entries_reset_masked_and_table_reads_back() {
        let (_, c, mut m) = setup(4);
        let mut d = [0u8; 4];
        assert!(m.bar_read(1, 12, &mut d));
        assert_eq!(u32::from_le_bytes(d), 1);
        program(&c, &mut m, 2, 0x41, true);
        let mut q = [0u8; 8];
        assert!(m.bar_read(1, 2 * ENTRY_SIZE, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        assert!(m.bar_read(1, 2 * ENTRY_SIZE + 8, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_0041);
    }

    #[test]
    fn vector_routes_and_fires() {
        let (rec, mut c, mut m) = setup(4);
        enable(&mut c, &mut m, CTRL_ENABLE);
        program(&c, &mut m, 1, 0x51, false);
        assert!(m.trigger(&c, 1));
        let d = rec.delivered();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].vector(), d[0].destination()), (0x51, 1));
        // Out of range vector: dropped, no panic.
        assert!(!m.trigger(&c, 4));
        assert!(!m.trigger(&c, usize::MAX));
    }

    #[test]
    fn masked_vector_sets_pba_and_fires_on_unmask() {
        let (rec, mut c, mut m) = setup(70);
        enable(&mut c, &mut m, CTRL_ENABLE);
        program(&c, &mut m, 65, 0x61, true);
        assert!(!m.trigger(&c, 65));
        let mut q = [0u8; 8];
        assert!(m.bar_read(1, 0x808, &mut q));
        assert_eq!(u64::from_le_bytes(q), 1 << 1);
        // Unmask through the vector control word.
        assert!(m.bar_write(&c, 1, 65 * ENTRY_SIZE + 12, &0u32.to_le_bytes()));
        assert_eq!(rec.delivered().len(), 1);
        assert!(m.bar_read(1, 0x808, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0);
    }

    #[test]
    fn function_mask_holds_vectors_pending() {
        let (rec, mut c, mut m) = setup(2);
        enable(&mut c, &mut m, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        program(&c, &mut m, 0, 0x30, false);
        assert!(!m.trigger(&c, 0));
        assert!(rec.delivered().is_empty());
        enable(&mut c, &mut m, CTRL_ENABLE);
        assert_eq!(rec.delivered().len(), 1);
    }

    #[test]
    fn bus_mastering_off_holds_pending_vectors() {
        let (rec, mut c, mut m) = setup(2);
        enable(&mut c, &mut m, CTRL_ENABLE);
        program(&c, &mut m, 0, 0x30, true);
        assert!(!m.trigger(&c, 0), "masked: pending");
        assert!(c.write(0x04, &0u16.to_le_bytes()));
        assert!(m.bar_write(&c, 1, 12, &0u32.to_le_bytes()), "unmask");
        assert!(
            rec.delivered().is_empty(),
            "no message without bus mastering"
        );
        assert!(c.write(0x04, &super::super::config::CMD_BUS_MASTER.to_le_bytes()));
        m.update(&c);
        assert_eq!(rec.delivered().len(), 1, "sent once bus mastering is on");
    }

    #[test]
    fn gsi_is_allocated_on_first_unmask_only() {
        let (rec, mut c, mut m) = setup(2048);
        enable(&mut c, &mut m, CTRL_ENABLE);
        program(&c, &mut m, 2047, 0x70, false);
        assert!(m.trigger(&c, 2047));
        assert_eq!(rec.route(24).map(|r| r.vector()), Some(0x70));
        assert_eq!(rec.route(25), None);
    }

    #[test]
    fn hostile_table_accesses() {
        let (_, c, mut m) = setup(3);
        for off in 0..(3 * ENTRY_SIZE + 16) {
            for len in [1usize, 2, 3, 4, 8] {
                let mut buf = vec![0xa5u8; len];
                m.bar_read(1, off, &mut buf);
                m.bar_write(&c, 1, off, &buf);
            }
        }
        // PBA is read only.
        let mut q = [0u8; 8];
        assert!(m.bar_write(&c, 1, 0x800, &u64::MAX.to_le_bytes()));
        assert!(m.bar_read(1, 0x800, &mut q));
        assert_eq!(u64::from_le_bytes(q), 0);
        assert!(!m.bar_read(0, 0, &mut q));
    }
}
