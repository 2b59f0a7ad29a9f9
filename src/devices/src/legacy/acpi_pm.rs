//! Hardware-reduced ACPI power management: the FADT's sleep control, sleep status and
//! reset registers (ACPI 6.4 §4.8.3.7–4.8.3.8, §4.8.3.6). `poweroff -f` writes
//! SLP_TYP=5|SLP_EN to the sleep control register and `reboot -f` writes the reset value
//! to the reset register; both end the VMM with exit code 0.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::exit::ExitHandle;

/// First port of the block.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Ports decoded.
pub const ACPI_PM_PORTS: u16 = 3;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u16 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u16 = 1;
/// Offset of the reset register.
pub const RESET: u16 = 2;
/// The value the FADT tells the OS to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// The SLP_TYP value the DSDT's `\_S5` package advertises.
pub const S5_SLP_TYP: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const WAK_STS: u8 = 1 << 7;

/// The three registers.
pub struct AcpiPmDevice {
    exit: Arc<ExitHandle>,
}

impl AcpiPmDevice {
    /// Registers that end the VM through `exit`.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        Self { exit }
    }
}

impl MutDevicePio for AcpiPmDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if offset == SLEEP_STATUS {
            if let Some(b) = data.first_mut() {
                // We are awake.
                *b = WAK_STS;
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 => {
                let typ = (v >> 2) & 0x7;
                if typ == S5_SLP_TYP {
                    self.exit.request(0, "guest powered off (ACPI S5)");
                } else {
                    log::warn!("acpi: guest asked for unsupported sleep type {typ}");
                }
            }
            RESET if v == RESET_VALUE => {
                self.exit
                    .request(0, "guest reset through the ACPI reset register");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poweroff_and_reset() {
        let exit = Arc::new(ExitHandle::new());
        let mut pm = AcpiPmDevice::new(exit.clone());
        let base = PioAddress(ACPI_PM_PORT);
        // S3 request: refused, VM keeps running.
        pm.pio_write(base, SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.get(), None);
        pm.pio_write(base, SLEEP_CONTROL, &[S5_SLP_TYP << 2]);
        assert_eq!(exit.get(), None);
        pm.pio_write(base, SLEEP_CONTROL, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(exit.get().map(|r| r.code), Some(0));

        let exit = Arc::new(ExitHandle::new());
        let mut pm = AcpiPmDevice::new(exit.clone());
        pm.pio_write(base, RESET, &[0x06]);
        assert_eq!(exit.get(), None);
        pm.pio_write(base, RESET, &[RESET_VALUE]);
        assert!(exit
            .get()
            .is_some_and(|r| r.code == 0 && r.reason.contains("reset")));
        let mut d = [0u8; 1];
        pm.pio_read(base, SLEEP_STATUS, &mut d);
        assert_eq!(d[0], WAK_STS);
        pm.pio_write(base, 9, &[]);
    }
}
