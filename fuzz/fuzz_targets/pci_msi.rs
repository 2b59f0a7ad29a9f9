//! PCI configuration space with MSI and MSI-X (the fv-test device): configuration and
//! BAR accesses of every size, vector raises and MSI-X table writes. Checked: no panic,
//! and no message is sent during an operation that starts and ends with bus mastering
//! off.
#![no_main]

use std::sync::Arc;

use devices::interrupt::{Recorded, RecordingController};
use devices::pci::testdev::TestDevice;
use devices::pci::{Bdf, PciDevice};
use faultvisor_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fn triggers(rec: &RecordingController) -> usize {
    rec.take()
        .into_iter()
        .filter(|e| matches!(e, Recorded::Trigger(_, Some(_)) | Recorded::Signal(..)))
        .count()
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let rec = Arc::new(RecordingController::new(24, 300));
    let Ok(mut dev) = TestDevice::new(Bdf::new(3), 0xc000_0000, 0xc000_1000, rec.clone(), None)
    else {
        return;
    };
    for _ in 0..512 {
        if inp.done() {
            break;
        }
        let master = |d: &TestDevice| d.config().command() & (1 << 2) != 0;
        let before = master(&dev);
        let _ = triggers(&rec);
        match inp.u8() % 6 {
            0 | 1 => {
                let off = usize::from(inp.u16()) % 0x1010;
                let len = inp.size();
                let v = inp.u64().to_le_bytes();
                dev.config_write(off, &v[..len]);
            }
            2 => {
                let mut b = [0u8; 8];
                let off = usize::from(inp.u16()) % 0x1010;
                let len = inp.size();
                dev.config().read(off, &mut b[..len]);
            }
            3 | 4 => {
                let bar = usize::from(inp.u8() % 3);
                let off = u64::from(inp.u16()) % 0x1010;
                let len = inp.size();
                let v = inp.u64().to_le_bytes();
                dev.bar_write(bar, off, &v[..len]);
            }
            _ => {
                let bar = usize::from(inp.u8() % 3);
                let off = u64::from(inp.u16()) % 0x1010;
                let mut b = [0u8; 8];
                let len = inp.size();
                dev.bar_read(bar, off, &mut b[..len]);
            }
        }
        let sent = triggers(&rec);
        if !before && !master(&dev) {
            assert_eq!(sent, 0, "a message went out with bus mastering off");
        }
    }
});
