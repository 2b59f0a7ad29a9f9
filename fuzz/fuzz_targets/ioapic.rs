//! The userspace IOAPIC: register accesses of every size and offset, line changes on
//! every pin and EOIs of every vector, in any order. Checked: no panic, and the
//! interrupt controller only ever sees GSIs of the 24 pins.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::interrupt::{Recorded, RecordingController};
use devices::ioapic::{IoApic, NUM_PINS};
use faultvisor_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let rec = Arc::new(RecordingController::new(24, 64));
    let io = Arc::new(Mutex::new(IoApic::new(rec.clone())));
    for _ in 0..512 {
        if inp.done() {
            break;
        }
        let mut g = io.lock().unwrap_or_else(|p| p.into_inner());
        match inp.u8() % 5 {
            0 | 1 => {
                let off = u64::from(inp.u8());
                let len = inp.size();
                let v = inp.u64().to_le_bytes();
                g.write(off, &v[..len]);
            }
            2 => {
                let off = u64::from(inp.u8());
                let mut b = [0u8; 8];
                let len = inp.size();
                g.read(off, &mut b[..len]);
            }
            3 => {
                let pin = usize::from(inp.u8()) % (NUM_PINS + 2);
                let level = inp.u8() & 1 != 0;
                g.set_level(pin, level);
            }
            _ => g.end_of_interrupt(inp.u8()),
        }
    }
    for e in rec.take() {
        let gsi = match e {
            Recorded::Route(g, ..) | Recorded::Trigger(g, _) => g,
            Recorded::Signal(..) => continue,
        };
        assert!((gsi as usize) < NUM_PINS, "GSI {gsi} is not a pin's");
    }
});
