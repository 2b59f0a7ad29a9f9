//! The VMM's event loop (`event-manager`, one thread): host input for the serial
//! console (stdin into COM1's receive FIFO; end of input unregisters stdin) and the API
//! socket.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::exit::ExitHandle;
use devices::legacy::SerialDevice;
use devices::sync::lock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use crate::VmmError;

/// Ctrl-A, the escape key of the console (as in QEMU's `-serial stdio`).
const ESCAPE: u8 = 0x01;

struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitHandle>,
    escaped: bool,
}

impl StdinInput {
    /// Filters the escape sequences out of `input`: Ctrl-A x ends the VM, Ctrl-A Ctrl-A
    /// is a literal Ctrl-A, Ctrl-A followed by anything else is dropped with it.
    fn filter(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.escaped {
                self.escaped = false;
                match b {
                    b'x' | b'X' => self.exit.request(0, "the user pressed Ctrl-A x"),
                    ESCAPE => out.push(ESCAPE),
                    _ => {}
                }
            } else if b == ESCAPE {
                self.escaped = true;
            } else {
                out.push(b);
            }
        }
        out
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let room = lock(&self.serial).input_capacity().clamp(1, buf.len());
        match std::io::stdin().read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let bytes = self.filter(&buf[..n]);
                lock(&self.serial).enqueue_input(&bytes);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin.as_raw_fd(), EventSet::IN)) {
            // /dev/null and regular files cannot be polled; there is no input then.
            log::debug!("serial input from stdin is unavailable: {e:?}");
        }
    }
}

/// The serial console's input subscriber.
pub fn input(serial: Arc<Mutex<SerialDevice>>, exit: Arc<ExitHandle>) -> impl MutEventSubscriber {
    StdinInput {
        serial,
        exit,
        escaped: false,
    }
}

/// Starts the VMM's event thread with `subscribers` (console input, the API socket).
pub fn spawn_event_loop(
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    on_start: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), VmmError> {
    if subscribers.is_empty() {
        return Ok(());
    }
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| VmmError::Setup(format!("event manager: {e:?}")))?;
    for s in subscribers {
        em.add_subscriber(s);
    }
    std::thread::Builder::new()
        .name("fv-events".into())
        .spawn(move || {
            on_start();
            loop {
                if let Err(e) = em.run() {
                    log::warn!("event loop stopped: {e:?}");
                    return;
                }
            }
        })
        .map_err(|e| VmmError::Setup(format!("cannot start the event thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::interrupt::RecordingController;
    use devices::ioapic::IoApic;
    use devices::legacy::{IoapicPinTrigger, SerialOutput};

    fn input() -> StdinInput {
        let rec = Arc::new(RecordingController::new(24, 30));
        let io = Arc::new(Mutex::new(IoApic::new(rec)));
        StdinInput {
            serial: Arc::new(Mutex::new(SerialDevice::new(
                IoapicPinTrigger::new(io, 4),
                SerialOutput::new(Box::new(std::io::sink())),
            ))),
            exit: Arc::new(ExitHandle::new()),
            escaped: false,
        }
    }

    #[test]
    fn escape_sequences() {
        let mut i = input();
        assert_eq!(i.filter(b"ls\r"), b"ls\r");
        assert_eq!(i.filter(&[ESCAPE, ESCAPE, b'a']), vec![ESCAPE, b'a']);
        assert_eq!(i.filter(&[ESCAPE, b'q', b'b']), vec![b'b']);
        // Split across reads.
        assert!(i.filter(&[ESCAPE]).is_empty());
        assert_eq!(i.exit.get(), None);
        assert!(i.filter(b"x").is_empty());
        assert_eq!(i.exit.get().map(|r| r.code), Some(0));
    }
}
