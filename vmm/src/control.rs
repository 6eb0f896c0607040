//! How the parts of a running VM tell the VMM that the VM must stop, and why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use devices::{PowerAction, PowerControl};

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (reset register, i8042, triple fault).
    Reset,
    /// A vCPU or device failed; the VM cannot continue.
    Failed(String),
}

/// The first event posted wins; everything running the VM polls [`VmControl::should_stop`].
#[derive(Debug, Default)]
pub struct VmControl {
    event: Mutex<Option<VmEvent>>,
    posted: Condvar,
    stop: AtomicBool,
}

impl VmControl {
    /// Records `event` unless another one came first, and wakes the waiter.
    pub fn post(&self, event: VmEvent) {
        let mut slot = self.event.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(event);
            self.stop.store(true, Ordering::SeqCst);
            self.posted.notify_all();
        }
    }

    /// True once an event has been posted.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Blocks until an event is posted and returns it.
    pub fn wait(&self) -> VmEvent {
        let mut slot = self.event.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ev) = slot.clone() {
                return ev;
            }
            slot = self.posted.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl PowerControl for VmControl {
    fn request(&self, action: PowerAction) {
        self.post(match action {
            PowerAction::PowerOff => VmEvent::PowerOff,
            PowerAction::Reset => VmEvent::Reset,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn first_event_wins_and_wakes_the_waiter() {
        let c = Arc::new(VmControl::default());
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait())
        };
        assert!(!c.should_stop());
        c.request(PowerAction::Reset);
        c.post(VmEvent::Failed("late".into()));
        assert!(c.should_stop());
        assert_eq!(waiter.join().ok(), Some(VmEvent::Reset));
    }
}
