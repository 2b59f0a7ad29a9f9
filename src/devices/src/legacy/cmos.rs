//! The PC's MC146818 real-time clock and CMOS RAM (`--device rtc`, ports 0x70/0x71).
//!
//! Index port 0x70 (bit 7 is the NMI mask, kept but without effect), data port 0x71.
//! The clock runs on the host's UTC wall clock plus the offset the guest set; it
//! follows register B's data mode (BCD or binary) and hour format (12 or 24 h), stops
//! while B.SET is on and restarts from what the guest wrote. Register A's UIP bit is
//! high during the last 2 228 µs before each second (244 µs warning plus the 1 984 µs
//! update cycle of the datasheet), so a guest waiting for the update sees it. Register
//! C's flags (update-ended, alarm) are computed when read and cleared by the read.
//! The alarm (with the 0xC0–0xFF "don't care" codes) wakes the VM from ACPI S3
//! ([`Rtc::next_alarm_in`]); the RTC raises no IRQ 8 (no guest of this project needs
//! it; periodic interrupts are not offered). Linux ignores the device under faultvisor's
//! hardware-reduced ACPI, which is why it is opt-in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// Index and data ports.
pub const RTC_PORT: u16 = 0x70;
/// Ports decoded.
pub const RTC_PORTS: u16 = 2;

const REG_SECONDS: usize = 0x00;
const REG_SECONDS_ALARM: usize = 0x01;
const REG_MINUTES: usize = 0x02;
const REG_MINUTES_ALARM: usize = 0x03;
const REG_HOURS: usize = 0x04;
const REG_HOURS_ALARM: usize = 0x05;
const REG_WEEKDAY: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_AIE: u8 = 0x20;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;
/// How long before each second boundary UIP reads as set.
const UIP_WINDOW: Duration = Duration::from_micros(2228);

/// Where the clock's time comes from (the host's wall clock; a fixed clock in tests).
pub trait Clock: Send {
    /// Time since the Unix epoch.
    fn now(&self) -> Duration;
}

/// The host's wall clock.
#[derive(Default)]
pub struct HostClock;

impl Clock for HostClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// Civil date of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The RTC and its 128 bytes of CMOS RAM.
pub struct Rtc {
    clock: Box<dyn Clock>,
    index: u8,
    nmi_masked: bool,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// The guest time frozen while B.SET is on.
    frozen: Option<i64>,
    /// Guest second at which register C was last read (flags cleared).
    cleared_at: i64,
}

impl Rtc {
    /// An RTC showing the host's UTC time, in BCD with a 24-hour clock.
    pub fn new(clock: Box<dyn Clock>) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1.024 kHz rate
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VRT;
        let mut r = Self {
            clock,
            index: 0,
            nmi_masked: false,
            ram,
            offset: 0,
            frozen: None,
            cleared_at: 0,
        };
        r.cleared_at = r.seconds_now();
        r
    }

    /// The guest's current time in whole seconds since the epoch.
    fn seconds_now(&self) -> i64 {
        self.frozen
            .unwrap_or_else(|| self.clock.now().as_secs() as i64 + self.offset)
    }

    fn encode(&self, v: u32) -> u8 {
        let v = v.min(99) as u8;
        if self.ram[REG_B] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.ram[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.ram[REG_B] & B_24H != 0 {
            return self.decode(v) % 24;
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    /// The time registers for guest second `t`.
    fn time_register(&self, reg: usize, t: i64) -> u8 {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (y, m, d) = civil(days);
        match reg {
            REG_SECONDS => self.encode(secs % 60),
            REG_MINUTES => self.encode(secs / 60 % 60),
            REG_HOURS => self.encode_hour(secs / 3600),
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            REG_WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u32),
            REG_DAY => self.encode(d),
            REG_MONTH => self.encode(m),
            REG_YEAR => self.encode(y.rem_euclid(100) as u32),
            REG_CENTURY => self.encode((y.div_euclid(100)).clamp(0, 99) as u32),
            _ => 0,
        }
    }

    /// Whether guest second `t` (of the day) matches the alarm registers.
    fn alarm_matches(&self, t: i64) -> bool {
        let s = t.rem_euclid(86_400) as u32;
        let want = |reg: usize, have: u32, hour: bool| {
            let v = self.ram[reg];
            v & 0xc0 == 0xc0
                || (if hour {
                    self.decode_hour(v)
                } else {
                    self.decode(v)
                }) == have
        };
        want(REG_SECONDS_ALARM, s % 60, false)
            && want(REG_MINUTES_ALARM, s / 60 % 60, false)
            && want(REG_HOURS_ALARM, s / 3600, true)
    }

    /// The first guest second after `t` that matches the alarm (within a day).
    fn next_alarm_after(&self, t: i64) -> Option<i64> {
        (t + 1..=t + 86_400).find(|&s| self.alarm_matches(s))
    }

    /// How long until the alarm goes off, when alarm interrupts are enabled (B.AIE) and
    /// the clock runs: what wakes a sleeping VM.
    pub fn next_alarm_in(&self) -> Option<Duration> {
        if self.ram[REG_B] & B_AIE == 0 || self.frozen.is_some() {
            return None;
        }
        let now = self.clock.now();
        let now_guest = now.as_secs() as i64 + self.offset;
        let next = self.next_alarm_after(now_guest)?;
        let at = Duration::from_secs((next - self.offset).max(0) as u64);
        Some(at.saturating_sub(now))
    }

    fn read_c(&mut self) -> u8 {
        let now = self.seconds_now();
        let mut c = 0;
        if now > self.cleared_at {
            c |= C_UF;
            if self
                .next_alarm_after(self.cleared_at)
                .is_some_and(|a| a <= now)
            {
                c |= C_AF;
            }
        }
        if c & C_AF != 0 && self.ram[REG_B] & B_AIE != 0 {
            c |= C_IRQF;
        }
        self.cleared_at = now;
        c
    }

    fn read_register(&mut self, reg: usize) -> u8 {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => match self.frozen {
                // While SET is on the registers hold what was latched or written.
                Some(_) => self.ram[reg],
                None => self.time_register(reg, self.seconds_now()),
            },
            REG_A => {
                let frac = self.clock.now().subsec_nanos();
                let uip = self.frozen.is_none()
                    && Duration::from_nanos(u64::from(1_000_000_000 - frac)) <= UIP_WINDOW;
                (self.ram[REG_A] & 0x7f) | if uip { A_UIP } else { 0 }
            }
            REG_C => self.read_c(),
            REG_D => D_VRT,
            r => self.ram[r & 0x7f],
        }
    }

    /// The guest time the time registers in RAM spell (while B.SET is on).
    fn written_time(&self) -> i64 {
        let r = |reg| self.decode(self.ram[reg]);
        let century = match r(REG_CENTURY) {
            0 => 20,
            c => c,
        };
        let year = i64::from(century) * 100 + i64::from(r(REG_YEAR));
        let month = r(REG_MONTH).clamp(1, 12);
        let day = r(REG_DAY).clamp(1, 31);
        days_from_civil(year, month, day) * 86_400
            + i64::from(self.decode_hour(self.ram[REG_HOURS])) * 3600
            + i64::from(r(REG_MINUTES) % 60) * 60
            + i64::from(r(REG_SECONDS) % 60)
    }

    /// Copies the time of guest second `t` into the time registers' RAM.
    fn latch(&mut self, t: i64) {
        for r in [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ] {
            self.ram[r] = self.time_register(r, t);
        }
    }

    fn write_register(&mut self, reg: usize, v: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                if self.frozen.is_none() {
                    // Writes outside SET: take the running time into RAM first, so the
                    // registers not written keep their values.
                    self.latch(self.seconds_now());
                    self.ram[reg] = v;
                    let host = self.clock.now().as_secs() as i64;
                    self.offset = self.written_time() - host;
                } else {
                    self.ram[reg] = v;
                }
            }
            REG_A => self.ram[REG_A] = v & 0x7f,
            REG_B => {
                let was_set = self.frozen.is_some();
                let set = v & B_SET != 0;
                if set && !was_set {
                    let t = self.seconds_now();
                    self.latch(t);
                    self.frozen = Some(t);
                }
                self.ram[REG_B] = v;
                if !set && was_set {
                    self.frozen = None;
                    let host = self.clock.now().as_secs() as i64;
                    self.offset = self.written_time() - host;
                }
            }
            REG_C | REG_D => {}
            r => self.ram[r & 0x7f] = v,
        }
    }
}

impl MutDevicePio for Rtc {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            // The index register is write-only on the chip.
            0 => 0xff,
            _ => {
                let i = usize::from(self.index & 0x7f);
                self.read_register(i)
            }
        };
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                self.index = v & 0x7f;
                self.nmi_masked = v & 0x80 != 0;
            }
            _ => {
                let i = usize::from(self.index & 0x7f);
                self.write_register(i, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A clock the test moves (nanoseconds since the epoch).
    struct TestClock(Arc<AtomicU64>);

    impl Clock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    fn rtc(at_ns: u64) -> (Arc<AtomicU64>, Rtc) {
        let t = Arc::new(AtomicU64::new(at_ns));
        (t.clone(), Rtc::new(Box::new(TestClock(t))))
    }

    fn rd(r: &mut Rtc, reg: u8) -> u8 {
        r.pio_write(PioAddress(RTC_PORT), 0, &[reg]);
        let mut b = [0u8];
        r.pio_read(PioAddress(RTC_PORT), 1, &mut b);
        b[0]
    }

    fn wr(r: &mut Rtc, reg: u8, v: u8) {
        r.pio_write(PioAddress(RTC_PORT), 0, &[reg]);
        r.pio_write(PioAddress(RTC_PORT), 1, &[v]);
    }

    // 2026-12-01 12:34:56 UTC, a Tuesday.
    const T: u64 = 1_796_128_496;

    #[test]
    fn reads_the_date_in_bcd_and_binary() {
        assert_eq!(days_from_civil(2026, 12, 1), T as i64 / 86_400);
        assert_eq!(civil(T as i64 / 86_400), (2026, 12, 1));
        let (_, mut r) = rtc(T * 1_000_000_000);
        let got: Vec<u8> = [0u8, 2, 4, 6, 7, 8, 9, 0x32]
            .iter()
            .map(|&g| rd(&mut r, g))
            .collect();
        assert_eq!(got, vec![0x56, 0x34, 0x12, 0x03, 0x01, 0x12, 0x26, 0x20]);
        wr(&mut r, 0x0b, B_24H | B_BINARY);
        assert_eq!(rd(&mut r, 0), 56);
        // 12-hour mode: 12 PM.
        wr(&mut r, 0x0b, 0);
        assert_eq!(rd(&mut r, 4), 0x92);
        assert_eq!(rd(&mut r, 0x0d), D_VRT);
    }

    #[test]
    fn uip_is_set_just_before_each_second() {
        let (t, mut r) = rtc(T * 1_000_000_000);
        assert_eq!(rd(&mut r, 0x0a) & A_UIP, 0);
        t.store(T * 1_000_000_000 + 999_000_000, Ordering::SeqCst);
        assert_eq!(rd(&mut r, 0x0a) & A_UIP, A_UIP);
        assert_eq!(rd(&mut r, 0x0a) & 0x7f, 0x26);
    }

    #[test]
    fn setting_the_time_moves_the_clock() {
        let (t, mut r) = rtc(T * 1_000_000_000);
        wr(&mut r, 0x0b, B_SET | B_24H);
        wr(&mut r, 0x04, 0x23);
        wr(&mut r, 0x02, 0x59);
        wr(&mut r, 0x00, 0x58);
        // Frozen while SET is on.
        t.store((T + 5) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&mut r, 0), 0x58);
        wr(&mut r, 0x0b, B_24H);
        t.store((T + 7) * 1_000_000_000, Ordering::SeqCst);
        // Two seconds later it is the next day, 00:00:00.
        assert_eq!((rd(&mut r, 4), rd(&mut r, 2), rd(&mut r, 0)), (0, 0, 0));
        assert_eq!(rd(&mut r, 7), 0x02);
    }

    #[test]
    fn alarm_flags_and_wake_time() {
        let (t, mut r) = rtc(T * 1_000_000_000 + 250_000_000);
        assert_eq!(r.next_alarm_in(), None, "AIE off");
        let _ = rd(&mut r, 0x0c);
        for reg in [1u8, 3, 5] {
            wr(&mut r, reg, 0xc0);
        }
        wr(&mut r, 0x0b, B_24H | B_AIE);
        // Every second matches: the next boundary is 750 ms away.
        assert_eq!(r.next_alarm_in(), Some(Duration::from_millis(750)));
        assert_eq!(rd(&mut r, 0x0c), 0, "no second passed");
        t.store((T + 1) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&mut r, 0x0c), C_IRQF | C_AF | C_UF);
        assert_eq!(rd(&mut r, 0x0c), 0, "cleared by the read");
        // A specific alarm: 12:35:00 is 4 seconds after 12:34:56... plus the one that passed.
        wr(&mut r, 1, 0x00);
        wr(&mut r, 3, 0x35);
        wr(&mut r, 5, 0x12);
        assert_eq!(r.next_alarm_in(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn hostile_traffic_never_panics() {
        let (t, mut r) = rtc(T * 1_000_000_000);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..50_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let reg = (x & 0xff) as u8;
            if x & 0x100 != 0 {
                wr(&mut r, reg, (x >> 16) as u8);
            } else {
                let _ = rd(&mut r, reg);
            }
            if i % 1000 == 0 {
                t.fetch_add(x % (3 << 40), Ordering::SeqCst);
                let _ = r.next_alarm_in();
            }
        }
    }
}
