//! COM1: a 16550A UART from `vm-superio` at 0x3F8, interrupting on IOAPIC pin 4.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{Serial, Trigger};

use crate::ioapic::{IoApic, IoapicLine};

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Ports COM1 decodes.
pub const COM1_PORTS: u16 = 8;
/// COM1's IOAPIC pin (ISA IRQ 4).
pub const COM1_PIN: usize = 4;

/// Raises an edge on an IOAPIC pin (the serial port's interrupt line).
pub struct IoapicPinTrigger(IoapicLine);

impl IoapicPinTrigger {
    /// A trigger for `pin` of `ioapic`.
    pub fn new(ioapic: Arc<Mutex<IoApic>>, pin: usize) -> Self {
        Self(IoapicLine::new(ioapic, pin))
    }
}

impl Trigger for IoapicPinTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// Where the guest's serial output goes; flushed after every write so that a console
/// line is visible the moment the guest sends it.
pub struct SerialOutput {
    inner: Box<dyn Write + Send>,
}

impl SerialOutput {
    /// Wraps a writer (stdout, a file, or a sink).
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        Self { inner }
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.inner.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The UART as a port-I/O device.
pub struct SerialDevice {
    serial: Serial<IoapicPinTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    /// A UART writing to `out` and interrupting through `trigger`.
    pub fn new(trigger: IoapicPinTrigger, out: SerialOutput) -> Self {
        Self {
            serial: Serial::new(trigger, out),
        }
    }

    /// Feeds host input to the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, *b) {
                log::debug!("serial: write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingController;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_thre_interrupt_on_pin4() {
        let rec = Arc::new(RecordingController::new(24, 30));
        let io = Arc::new(Mutex::new(IoApic::new(rec.clone())));
        // Unmask pin 4: vector 0x24, edge.
        {
            let mut g = io.lock().expect("io");
            g.write(0, &0x18u32.to_le_bytes());
            g.write(0x10, &0x24u32.to_le_bytes());
        }
        let buf = Buf::default();
        let mut s = SerialDevice::new(
            IoapicPinTrigger::new(io.clone(), COM1_PIN),
            SerialOutput::new(Box::new(buf.clone())),
        );
        let base = PioAddress(COM1_PORT);
        // Enable THR-empty interrupts (IER bit 1), then send "hi".
        // The driver acknowledges each THR-empty interrupt by reading IIR.
        let mut iir = [0u8];
        s.pio_write(base, 1, &[0x02]);
        s.pio_read(base, 2, &mut iir);
        s.pio_write(base, 0, b"h");
        s.pio_read(base, 2, &mut iir);
        s.pio_write(base, 0, b"i");
        assert_eq!(&*buf.0.lock().expect("buf"), b"hi");
        assert!(rec.delivered().iter().all(|m| m.vector() == 0x24));
        assert!(rec.delivered().len() >= 2);
        // Input arrives and raises the data-ready interrupt when enabled.
        s.pio_write(base, 1, &[0x01]);
        let before = rec.delivered().len();
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(rec.delivered().len() > before);
        let mut d = [0u8];
        s.pio_read(base, 0, &mut d);
        assert_eq!(d[0], b'x');
        // Odd accesses do not panic.
        s.pio_read(base, 300, &mut d);
        s.pio_write(base, 7, &[]);
    }
}
