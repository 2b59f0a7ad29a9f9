//! The i8042 keyboard controller, only for its CPU-reset command (0xFE to port 0x64),
//! which `reboot` uses as a fallback. Built on `vm-superio`.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{I8042Device, Trigger};

use crate::exit::ExitHandle;

/// First port (data, 0x60); the command/status port is 0x64.
pub const I8042_PORT: u16 = 0x60;
/// Ports decoded (0x60..=0x64).
pub const I8042_PORTS: u16 = 5;

/// Turns the reset line into a clean VM exit with code 0.
pub struct ResetTrigger(Arc<ExitHandle>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0
            .request(0, "guest reset through the i8042 controller");
        Ok(())
    }
}

/// The i8042 as a port-I/O device.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller whose reset command ends the VM through `exit`.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.dev.read(off);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.dev.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_exit_zero() {
        let exit = Arc::new(ExitHandle::new());
        let mut k = I8042::new(exit.clone());
        k.pio_write(PioAddress(I8042_PORT), 0, &[0xfe]);
        assert_eq!(exit.get(), None);
        k.pio_write(PioAddress(I8042_PORT), 4, &[0xfe]);
        assert_eq!(exit.get().map(|r| r.code), Some(0));
    }
}
