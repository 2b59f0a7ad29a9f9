//! Host input for the serial console: an `event-manager` loop on its own thread reads
//! stdin and feeds COM1's receive FIFO. End of input simply unregisters stdin.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use devices::sync::lock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use crate::VmmError;

struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
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
                let mut s = lock(&self.serial);
                s.enqueue_input(&buf[..n]);
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

/// Starts the input thread.
pub fn spawn_input_loop(serial: Arc<Mutex<SerialDevice>>) -> Result<(), VmmError> {
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| VmmError::Setup(format!("event manager: {e:?}")))?;
    em.add_subscriber(Arc::new(Mutex::new(StdinInput { serial })));
    std::thread::Builder::new()
        .name("fv-events".into())
        .spawn(move || loop {
            if let Err(e) = em.run() {
                log::warn!("event loop stopped: {e:?}");
                return;
            }
        })
        .map_err(|e| VmmError::Setup(format!("cannot start the event thread: {e}")))?;
    Ok(())
}
