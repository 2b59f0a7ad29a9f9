//! Polled COM1 output (the probe's report channel) and the `print!` macros.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu::{inb, outb};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// Line status register offset.
pub const LSR: u16 = 5;
/// Interrupt enable register offset.
pub const IER: u16 = 1;
/// Interrupt identification register offset.
pub const IIR: u16 = 2;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs 8N1 with interrupts off.
pub fn init() {
    outb(COM1 + IER, 0);
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 1); // 115200
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 4, 0x03); // DTR, RTS
}

fn put(b: u8) {
    // Bounded wait for THR empty: a broken UART must not hang the probe.
    for _ in 0..100_000 {
        if inb(COM1 + LSR) & 0x20 != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// The serial port as a `fmt::Write` sink.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

/// Prints under a spin lock so that CPUs do not interleave lines.
pub fn print(args: fmt::Arguments) {
    let mut spins = 0u64;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins > 100_000_000 {
            break; // a CPU died holding it: print anyway
        }
        core::hint::spin_loop();
    }
    let _ = Serial.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
