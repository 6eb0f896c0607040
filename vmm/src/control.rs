//! How the parts of a running VM tell the VMM that the VM must stop, and why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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

/// Where a VM instance's first event goes (the VMM's command loop).
pub type EventSink = Box<dyn Fn(VmEvent) + Send + Sync>;

/// One VM instance's stop switch: the first event posted wins, stops every vCPU (they poll
/// [`VmControl::should_stop`]) and is handed to the sink; later ones are dropped.
pub struct VmControl {
    event: Mutex<Option<VmEvent>>,
    stop: AtomicBool,
    sink: EventSink,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl")
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl VmControl {
    /// A switch whose first event goes to `sink`.
    pub fn new(sink: EventSink) -> Self {
        Self {
            event: Mutex::new(None),
            stop: AtomicBool::new(false),
            sink,
        }
    }

    /// Records `event` unless another one came first, stops the vCPUs and tells the sink.
    pub fn post(&self, event: VmEvent) {
        let mut slot = self.event.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(event.clone());
            self.stop.store(true, Ordering::SeqCst);
            drop(slot);
            (self.sink)(event);
        }
    }

    /// Stops the vCPUs without an event (the VMM tears the VM down on its own account); a
    /// later guest event is dropped.
    pub fn stop(&self) {
        let mut slot = self.event.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(VmEvent::PowerOff);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// True once the VM must stop.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
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
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn first_event_wins_and_reaches_the_sink_once() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let c = VmControl::new(Box::new(move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        }));
        assert!(!c.should_stop());
        c.request(PowerAction::Reset);
        c.post(VmEvent::Failed("late".into()));
        assert!(c.should_stop());
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![VmEvent::Reset]);
    }

    #[test]
    fn a_vmm_stop_silences_later_guest_events() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let c = VmControl::new(Box::new(move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        }));
        c.stop();
        c.request(PowerAction::PowerOff);
        assert!(c.should_stop());
        assert!(rx.try_recv().is_err());
    }
}
