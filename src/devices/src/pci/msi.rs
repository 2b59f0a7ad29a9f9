//! The MSI capability (PCI Local Bus 3.0 §6.8.1): 64-bit addresses, per-vector masking,
//! up to 32 vectors. Each enabled, unmasked vector is an MSI route on its own GSI,
//! allocated on first use; a masked vector that fires sets its pending bit and is
//! delivered when unmasked.
//!
//! Capability body layout (offsets from the capability start):
//!
//! | off | size | field |
//! |-----|------|-------|
//! | 2   | 2    | message control: 0 enable, 3:1 MMC, 6:4 MME, 7 64-bit, 8 per-vector mask |
//! | 4   | 4    | message address (low) |
//! | 8   | 4    | message address (high) |
//! | 12  | 2    | message data |
//! | 16  | 4    | mask bits |
//! | 20  | 4    | pending bits (read-only) |

use std::sync::Arc;

use super::config::{cap_id, ConfigError, PciConfig};
use crate::interrupt::{InterruptController, MsiMessage, MsiSource};

const CTRL: usize = 2;
const ADDR_LO: usize = 4;
const ADDR_HI: usize = 8;
const DATA: usize = 12;
const MASK: usize = 16;
const PENDING: usize = 20;
/// Total size of the capability, header included.
pub const MSI_CAP_SIZE: usize = 24;

const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PVM: u16 = 1 << 8;

/// MSI state of one function.
pub struct Msi {
    cap: usize,
    nvec: u32,
    bdf: u16,
    gsis: Vec<Option<u32>>,
    routed: Vec<Option<MsiMessage>>,
    irq: Arc<dyn InterruptController>,
}

impl std::fmt::Debug for Msi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msi")
            .field("cap", &self.cap)
            .field("nvec", &self.nvec)
            .finish()
    }
}

impl Msi {
    /// Adds an MSI capability with `nvec` vectors (1, 2, 4, 8, 16 or 32).
    pub fn new(
        config: &mut PciConfig,
        bdf: u16,
        nvec: u32,
        irq: Arc<dyn InterruptController>,
    ) -> Result<Self, ConfigError> {
        let nvec = nvec.clamp(1, 32).next_power_of_two();
        let mmc = nvec.trailing_zeros() as u16;
        let ctrl = CTRL_64BIT | CTRL_PVM | (mmc << 1);
        let mut body = [0u8; MSI_CAP_SIZE - 2];
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        let vec_mask = if nvec == 32 {
            u32::MAX
        } else {
            (1u32 << nvec) - 1
        };
        let mut wmask = [0u8; MSI_CAP_SIZE - 2];
        // Enable and MME are writable.
        wmask[0] = 0x71;
        // Address low (dword aligned), address high, data.
        wmask[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        wmask[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        wmask[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
        wmask[14..18].copy_from_slice(&vec_mask.to_le_bytes());
        let cap = config.add_capability(cap_id::MSI, &body, &wmask)?;
        Ok(Self {
            cap,
            nvec,
            bdf,
            gsis: vec![None; nvec as usize],
            routed: vec![None; nvec as usize],
            irq,
        })
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.cap
    }

    /// Whether a configuration write at `off` of `len` bytes touches this capability.
    pub fn covers(&self, off: usize, len: usize) -> bool {
        off < self.cap + MSI_CAP_SIZE && off + len > self.cap
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        config.word(self.cap + CTRL) & CTRL_ENABLE != 0
    }

    fn enabled_vectors(&self, config: &PciConfig) -> u32 {
        let mme = (config.word(self.cap + CTRL) >> 4) & 0x7;
        (1u32 << mme.min(5)).min(self.nvec)
    }

    fn masked(&self, config: &PciConfig, v: u32) -> bool {
        config.dword(self.cap + MASK) & (1 << v) != 0
    }

    fn message(&self, config: &PciConfig, v: u32) -> MsiMessage {
        let lo = u64::from(config.dword(self.cap + ADDR_LO));
        let hi = u64::from(config.dword(self.cap + ADDR_HI));
        let data = u32::from(config.word(self.cap + DATA));
        let n = self.enabled_vectors(config);
        // With multiple messages the function ORs the vector number into the low bits.
        let data = (data & !(n - 1)) | v;
        MsiMessage {
            address: (hi << 32) | lo,
            data,
        }
    }

    fn gsi(&mut self, v: usize) -> Option<u32> {
        if let Some(g) = self.gsis[v] {
            return Some(g);
        }
        match self.irq.allocate_gsi() {
            Ok(g) => {
                self.gsis[v] = Some(g);
                Some(g)
            }
            Err(e) => {
                log::warn!("pci {:04x}: MSI vector {v}: {e}", self.bdf);
                None
            }
        }
    }

    /// Re-derives routes after the guest wrote the capability, and delivers vectors
    /// that were pending and are now unmasked.
    pub fn update(&mut self, config: &mut PciConfig) {
        let enabled = self.enabled(config);
        let n = self.enabled_vectors(config);
        for v in 0..self.nvec {
            let want =
                (enabled && v < n && !self.masked(config, v)).then(|| self.message(config, v));
            if want != self.routed[v as usize] {
                if want.is_none() && self.gsis[v as usize].is_none() {
                    continue;
                }
                let Some(gsi) = self.gsi(v as usize) else {
                    continue;
                };
                let source = MsiSource::Pci {
                    bdf: self.bdf,
                    vector: v as u16,
                };
                if let Err(e) = self.irq.set_msi_route(gsi, source, want) {
                    log::warn!("pci {:04x}: MSI vector {v}: {e}", self.bdf);
                    continue;
                }
                self.routed[v as usize] = want;
            }
            let pending = config.dword(self.cap + PENDING);
            // A pending message goes out on unmask, unless bus mastering is off.
            let master = config.command() & super::config::CMD_BUS_MASTER != 0;
            if want.is_some() && master && pending & (1 << v) != 0 {
                config.set_dword(self.cap + PENDING, pending & !(1 << v));
                if let Some(gsi) = self.gsis[v as usize] {
                    let _ = self.irq.trigger(gsi);
                }
            }
        }
    }

    /// Whether vector `v` exists under the current configuration (enabled, within the
    /// enabled count).
    pub fn accepts(&self, config: &PciConfig, v: u32) -> bool {
        self.enabled(config) && v < self.enabled_vectors(config)
    }

    /// Signals vector `v`. Returns true if a message went out; false if MSI is disabled
    /// or the vector is out of range (dropped) or masked (left pending).
    pub fn trigger(&mut self, config: &mut PciConfig, v: u32) -> bool {
        if !self.enabled(config) || v >= self.enabled_vectors(config) {
            return false;
        }
        if self.masked(config, v) {
            let p = config.dword(self.cap + PENDING);
            config.set_dword(self.cap + PENDING, p | (1 << v));
            return false;
        }
        match (self.routed[v as usize], self.gsis[v as usize]) {
            (Some(_), Some(gsi)) => self.irq.trigger(gsi).is_ok(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingController;

    fn wr(c: &mut PciConfig, off: usize, data: &[u8]) {
        assert!(c.write(off, data));
    }

    #[test]
    fn enable_route_trigger_and_mask() {
        let rec = Arc::new(RecordingController::new(24, 40));
        let mut c = PciConfig::new(1, 2, 0, 0);
        wr(
            &mut c,
            0x04,
            &super::super::config::CMD_BUS_MASTER.to_le_bytes(),
        );
        let mut msi = Msi::new(&mut c, 0x18, 1, rec.clone()).expect("msi");
        let cap = msi.offset();
        assert_eq!(c.capabilities(), vec![(cap_id::MSI, cap)]);
        // Disabled: dropped.
        assert!(!msi.trigger(&mut c, 0));
        wr(&mut c, cap + ADDR_LO, &0xfee0_2000u32.to_le_bytes());
        wr(&mut c, cap + DATA, &0x0045u16.to_le_bytes());
        wr(&mut c, cap + CTRL, &1u16.to_le_bytes());
        msi.update(&mut c);
        assert_eq!(
            rec.route(24).map(|m| (m.vector(), m.destination())),
            Some((0x45, 2))
        );
        assert!(msi.trigger(&mut c, 0));
        assert_eq!(rec.delivered().len(), 1);
        // Masked: pending, then delivered on unmask.
        wr(&mut c, cap + MASK, &1u32.to_le_bytes());
        msi.update(&mut c);
        assert_eq!(rec.route(24), None);
        assert!(!msi.trigger(&mut c, 0));
        assert_eq!(c.dword(cap + PENDING), 1);
        wr(&mut c, cap + MASK, &0u32.to_le_bytes());
        msi.update(&mut c);
        assert_eq!(c.dword(cap + PENDING), 0);
        assert_eq!(rec.delivered().len(), 2);
    }

    #[test]
    fn multi_message_vectors_or_into_data() {
        let rec = Arc::new(RecordingController::new(24, 40));
        let mut c = PciConfig::new(1, 2, 0, 0);
        wr(
            &mut c,
            0x04,
            &super::super::config::CMD_BUS_MASTER.to_le_bytes(),
        );
        let mut msi = Msi::new(&mut c, 0x18, 4, rec.clone()).expect("msi");
        let cap = msi.offset();
        assert_eq!((c.word(cap + CTRL) >> 1) & 7, 2);
        wr(&mut c, cap + ADDR_LO, &0xfee0_0000u32.to_le_bytes());
        wr(&mut c, cap + DATA, &0x0060u16.to_le_bytes());
        // MME = 2 (4 vectors) + enable.
        wr(&mut c, cap + CTRL, &((2u16 << 4) | 1).to_le_bytes());
        msi.update(&mut c);
        assert!(msi.trigger(&mut c, 3));
        assert_eq!(rec.delivered()[0].vector(), 0x63);
        assert!(!msi.trigger(&mut c, 4));
    }

    #[test]
    fn read_only_fields_stay() {
        let rec = Arc::new(RecordingController::new(24, 40));
        let mut c = PciConfig::new(1, 2, 0, 0);
        wr(
            &mut c,
            0x04,
            &super::super::config::CMD_BUS_MASTER.to_le_bytes(),
        );
        let msi = Msi::new(&mut c, 0x18, 1, rec).expect("msi");
        let cap = msi.offset();
        wr(&mut c, cap + CTRL, &0xffffu16.to_le_bytes());
        assert_eq!(c.word(cap + CTRL), CTRL_64BIT | CTRL_PVM | 0x71);
        wr(&mut c, cap + PENDING, &u32::MAX.to_le_bytes());
        assert_eq!(c.dword(cap + PENDING), 0);
    }
}
