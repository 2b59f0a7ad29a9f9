//! Two guest-to-VMM signalling ports: debug-exit (QEMU isa-debug-exit compatible) and
//! the boot timer (Firecracker's idea, on a port).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::exit::ExitHandle;

/// The debug-exit port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports the debug-exit device decodes (QEMU's `isa-debug-exit,iosize=4`: byte, word
/// and dword writes at 0xf4; the value is what was written).
pub const DEBUG_EXIT_PORTS: u16 = 4;
/// The boot-timer port.
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The byte that marks "boot finished" on the boot-timer port.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Writing `v` to port 0xF4 ends the VMM with exit code `(v << 1) | 1`.
pub struct DebugExit {
    exit: Arc<ExitHandle>,
}

impl DebugExit {
    /// A debug-exit port ending the VM through `exit`.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        Self { exit }
    }

    /// The exit code for a written value (as QEMU's isa-debug-exit computes it; the
    /// process exit status keeps its low 8 bits).
    pub fn code_for(value: u32) -> i32 {
        ((value << 1) | 1) as i32
    }
}

impl MutDevicePio for DebugExit {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        let v = u32::from_le_bytes(b);
        let code = Self::code_for(v);
        self.exit
            .request(code, format!("guest wrote {v:#x} to the debug-exit port"));
    }
}

/// Boot-timer marks kept (a guest writing the port in a loop cannot grow the list).
pub const MAX_MARKS: usize = 16;

/// Logs the time since VMM start when the guest writes [`BOOT_TIMER_MAGIC`]; keeps
/// the first [`MAX_MARKS`] marks and counts the rest.
pub struct BootTimer {
    start: Instant,
    seen: Arc<Mutex<Vec<Duration>>>,
}

impl BootTimer {
    /// A boot timer measuring from `start` (the VMM's own start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Times at which the guest signalled, since VMM start.
    pub fn marks(&self) -> Arc<Mutex<Vec<Duration>>> {
        self.seen.clone()
    }
}

impl MutDevicePio for BootTimer {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let t = self.start.elapsed();
        let mut seen = crate::sync::lock(&self.seen);
        if seen.len() >= MAX_MARKS {
            crate::limits::hit(crate::limits::Cap::BootTimerMarks);
            return;
        }
        seen.push(t);
        log::info!(
            "Guest-boot-time = {} us ({} ms) since VMM start",
            t.as_micros(),
            t.as_millis()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_codes() {
        let exit = Arc::new(ExitHandle::new());
        let mut d = DebugExit::new(exit.clone());
        d.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[3]);
        assert_eq!(exit.get().map(|r| r.code), Some(7));
        assert_eq!(DebugExit::code_for(0), 1);
        assert_eq!(DebugExit::code_for(0x10), 0x21);
    }

    #[test]
    fn debug_exit_ignores_odd_writes() {
        let exit = Arc::new(ExitHandle::new());
        let mut d = DebugExit::new(exit.clone());
        d.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[]);
        d.pio_write(PioAddress(DEBUG_EXIT_PORT), 0, &[1; 8]);
        d.pio_write(PioAddress(DEBUG_EXIT_PORT), 1, &[1]);
        assert_eq!(exit.get(), None);
    }

    #[test]
    fn boot_timer_records_only_magic() {
        let mut t = BootTimer::new(Instant::now());
        let marks = t.marks();
        t.pio_write(PioAddress(BOOT_TIMER_PORT), 0, &[1]);
        t.pio_write(PioAddress(BOOT_TIMER_PORT), 0, &[]);
        assert!(marks.lock().expect("marks").is_empty());
        t.pio_write(PioAddress(BOOT_TIMER_PORT), 0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(marks.lock().expect("marks").len(), 1);
        for _ in 0..100_000 {
            t.pio_write(PioAddress(BOOT_TIMER_PORT), 0, &[BOOT_TIMER_MAGIC]);
        }
        assert_eq!(marks.lock().expect("marks").len(), MAX_MARKS, "capped");
    }
}
