//! ACPI power management. Two register sets:
//!
//! - hardware-reduced (ACPI 6.4 §4.8.3.7–4.8.3.8, §4.8.3.6), what Linux uses under the
//!   FADT's HW_REDUCED_ACPI flag: the sleep control, sleep status and reset registers.
//!   `poweroff -f` writes SLP_TYP=5|SLP_EN to the sleep control register and
//!   `reboot -f` writes the reset value to the reset register; both end the VMM with
//!   exit code 0;
//! - the fixed-hardware PM1a event (status, enable) and control blocks (§4.8.3.1–2),
//!   which the FADT also describes for firmware-style code such as kvm-unit-tests'
//!   `s3` test (an OS honouring HW_REDUCED_ACPI ignores them). SLP_TYP=1 with SLP_EN
//!   is S3: every vCPU stops before its next instruction, and the VM sleeps until a
//!   wake event whose enable bit is set — the RTC alarm (RTC_EN) — and then resumes
//!   vCPU 0 in real mode at the FACS firmware waking vector, with WAK_STS and the wake
//!   source's status set, as firmware does ([`Power`]). SLP_TYP=5 is S5 (power off).
//!   The DSDT offers no `\_S3` package, so an ACPI OS never asks for S3.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::exit::ExitHandle;
use crate::sync::lock;

/// First port of the block.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Ports decoded: the three hardware-reduced registers, then PM1a_EVT and PM1a_CNT.
pub const ACPI_PM_PORTS: u16 = 10;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u16 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u16 = 1;
/// Offset of the reset register.
pub const RESET: u16 = 2;
/// Offset of the PM1a event block (status at +0, enable at +2; 4 bytes).
pub const PM1A_EVT: u16 = 4;
/// Offset of the PM1a control block (2 bytes).
pub const PM1A_CNT: u16 = 8;
/// The value the FADT tells the OS to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// The SLP_TYP value the DSDT's `\_S5` package advertises.
pub const S5_SLP_TYP: u8 = 5;
/// The PM1 SLP_TYP value of S3 (QEMU's).
pub const S3_SLP_TYP: u16 = 1;

const SLP_EN: u8 = 1 << 5;
const WAK_STS: u8 = 1 << 7;
/// PM1 status/enable: RTC alarm.
pub const PM1_RTC: u16 = 1 << 10;
/// PM1 status: the system woke.
const PM1_WAK_STS: u16 = 1 << 15;
/// PM1 status bits that exist here (write 1 to clear).
const PM1_STS_BITS: u16 = PM1_WAK_STS | PM1_RTC | (1 << 8) | (1 << 9) | (1 << 5) | 1;
/// PM1 enable bits that exist here.
const PM1_EN_BITS: u16 = PM1_RTC | (1 << 8) | (1 << 9) | (1 << 5) | 1;
/// PM1 control: SCI_EN (always on: no legacy mode), SLP_TYP, SLP_EN.
const PM1_SCI_EN: u16 = 1;
const PM1_SLP_EN: u16 = 1 << 13;

/// The sleep state the vCPUs and the PM registers share.
#[derive(Default)]
pub struct Power {
    pm1_sts: AtomicU16,
    pm1_en: AtomicU16,
    /// Incremented at each wake; a vCPU waits for it to change.
    epoch: AtomicU64,
    asleep: Mutex<bool>,
    wake: Condvar,
    /// Gets every vCPU out of KVM_RUN when the VM goes to sleep.
    kick: OnceLock<Box<dyn Fn() + Send + Sync>>,
    sleeps: AtomicU64,
}

impl Power {
    /// A VM that is awake.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets what gets the vCPUs out of KVM_RUN (once).
    pub fn set_kick(&self, kick: Box<dyn Fn() + Send + Sync>) {
        let _ = self.kick.set(kick);
    }

    /// Whether the VM is in S3.
    pub fn asleep(&self) -> bool {
        *lock(&self.asleep)
    }

    /// Times the guest entered S3.
    pub fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Relaxed)
    }

    /// The wake epoch (changes at each wake).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether the RTC alarm may wake the VM (PM1 RTC_EN).
    pub fn rtc_wake_enabled(&self) -> bool {
        self.pm1_en.load(Ordering::Relaxed) & PM1_RTC != 0
    }

    /// Enters S3 and kicks every vCPU.
    pub fn enter_sleep(&self) {
        *lock(&self.asleep) = true;
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        if let Some(k) = self.kick.get() {
            k();
        }
    }

    /// Wakes the VM with `status` (PM1 status bits of the wake source) and WAK_STS.
    pub fn wake(&self, status: u16) {
        self.pm1_sts
            .fetch_or(PM1_WAK_STS | (status & PM1_STS_BITS), Ordering::Relaxed);
        let mut a = lock(&self.asleep);
        *a = false;
        self.epoch.fetch_add(1, Ordering::Release);
        self.wake.notify_all();
    }

    /// Waits while asleep, at most `timeout`; true when the VM is awake.
    pub fn wait_awake(&self, timeout: Duration) -> bool {
        let a = lock(&self.asleep);
        let (a, _) = self
            .wake
            .wait_timeout_while(a, timeout, |asleep| *asleep)
            .unwrap_or_else(|p| p.into_inner());
        !*a
    }
}

/// The registers.
pub struct AcpiPmDevice {
    exit: Arc<ExitHandle>,
    power: Arc<Power>,
    pm1_cnt: u16,
}

impl AcpiPmDevice {
    /// Registers that end the VM through `exit` and put it to sleep through `power`.
    pub fn new(exit: Arc<ExitHandle>, power: Arc<Power>) -> Self {
        Self {
            exit,
            power,
            pm1_cnt: PM1_SCI_EN,
        }
    }

    fn pm1_read(&self, reg: u16) -> u16 {
        match reg {
            PM1A_EVT => self.power.pm1_sts.load(Ordering::Relaxed),
            r if r == PM1A_EVT + 2 => self.power.pm1_en.load(Ordering::Relaxed),
            PM1A_CNT => self.pm1_cnt,
            _ => 0,
        }
    }

    fn pm1_write(&mut self, reg: u16, v: u16) {
        match reg {
            PM1A_EVT => {
                self.power
                    .pm1_sts
                    .fetch_and(!(v & PM1_STS_BITS), Ordering::Relaxed);
            }
            r if r == PM1A_EVT + 2 => self.power.pm1_en.store(v & PM1_EN_BITS, Ordering::Relaxed),
            PM1A_CNT => {
                self.pm1_cnt = (v & !PM1_SLP_EN) | PM1_SCI_EN;
                if v & PM1_SLP_EN != 0 {
                    match (v >> 10) & 7 {
                        S3_SLP_TYP => {
                            log::info!("acpi: guest entered S3 (suspend to RAM)");
                            self.power.enter_sleep();
                        }
                        t if t == u16::from(S5_SLP_TYP) => {
                            self.exit.request(0, "guest powered off (ACPI S5)")
                        }
                        t => log::warn!("acpi: guest asked for unsupported PM1 sleep type {t}"),
                    }
                }
            }
            _ => {}
        }
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
            return;
        }
        if offset >= PM1A_EVT {
            // Registers are 16 bits; byte accesses read either half.
            let reg = offset & !1;
            let v = self.pm1_read(reg).to_le_bytes();
            let start = usize::from(offset & 1);
            for (d, s) in data.iter_mut().zip(v[start..].iter()) {
                *d = *s;
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset >= PM1A_EVT {
            let reg = offset & !1;
            let old = self.pm1_read(reg).to_le_bytes();
            let mut b = [0u8; 2];
            let start = usize::from(offset & 1);
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = match i.checked_sub(start).and_then(|j| data.get(j)) {
                    Some(d) => *d,
                    // Status bits are write-1-to-clear: an unwritten byte clears nothing.
                    None if reg == PM1A_EVT => 0,
                    None => old[i],
                };
            }
            self.pm1_write(reg, u16::from_le_bytes(b));
            return;
        }
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
        let mut pm = AcpiPmDevice::new(exit.clone(), Arc::new(Power::new()));
        let base = PioAddress(ACPI_PM_PORT);
        // S3 request: refused, VM keeps running.
        pm.pio_write(base, SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.get(), None);
        pm.pio_write(base, SLEEP_CONTROL, &[S5_SLP_TYP << 2]);
        assert_eq!(exit.get(), None);
        pm.pio_write(base, SLEEP_CONTROL, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(exit.get().map(|r| r.code), Some(0));

        let exit = Arc::new(ExitHandle::new());
        let mut pm = AcpiPmDevice::new(exit.clone(), Arc::new(Power::new()));
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

    #[test]
    fn pm1_s3_sleep_and_rtc_wake() {
        let exit = Arc::new(ExitHandle::new());
        let power = Arc::new(Power::new());
        let kicked = Arc::new(AtomicU64::new(0));
        let k = kicked.clone();
        power.set_kick(Box::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        let mut pm = AcpiPmDevice::new(exit.clone(), power.clone());
        let base = PioAddress(ACPI_PM_PORT);
        // kvm-unit-tests' s3: RTC_EN, then SLP_TYP=1|SLP_EN.
        pm.pio_write(base, PM1A_EVT + 2, &0x400u16.to_le_bytes());
        assert!(power.rtc_wake_enabled());
        pm.pio_write(base, PM1A_CNT, &0x2400u16.to_le_bytes());
        assert!(power.asleep());
        assert_eq!(kicked.load(Ordering::SeqCst), 1);
        assert!(!power.wait_awake(Duration::from_millis(1)));
        let e = power.epoch();
        power.wake(PM1_RTC);
        assert!(power.wait_awake(Duration::ZERO));
        assert_ne!(power.epoch(), e);
        let mut d = [0u8; 2];
        pm.pio_read(base, PM1A_EVT, &mut d);
        assert_eq!(u16::from_le_bytes(d), PM1_WAK_STS | PM1_RTC);
        // Write 1 to clear, one byte at a time.
        pm.pio_write(base, PM1A_EVT + 1, &[0x80]);
        pm.pio_read(base, PM1A_EVT, &mut d);
        assert_eq!(u16::from_le_bytes(d), PM1_RTC);
        // SLP_EN reads back as 0; SCI_EN is always on.
        pm.pio_read(base, PM1A_CNT, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x0400 | PM1_SCI_EN);
        // S5 through PM1.
        pm.pio_write(base, PM1A_CNT, &((5u16 << 10) | PM1_SLP_EN).to_le_bytes());
        assert_eq!(exit.get().map(|r| r.code), Some(0));
        assert_eq!(power.sleeps(), 1);
    }
}
