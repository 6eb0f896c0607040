//! Configuration changes the host makes on its own while the driver runs (a balloon's new
//! target, a disk's new capacity): the device's side of virtio 1.2 section 4.1.4.3 (the
//! configuration change interrupt: the ISR's configuration bit and the MSI-X configuration
//! vector, raised by the transport's [`VirtioInterrupt::signal_config`]) and section 2.5.1
//! (`config_generation` changes, so a driver reading a field wider than 32 bits in several
//! accesses reads it again rather than use a torn value).
//!
//! A device keeps a [`ConfigChange`], attaches the driver's interrupt at activation and
//! detaches it at reset; whoever changes the configuration (the VMM, through a clone) calls
//! [`ConfigChange::notify`] afterwards.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::VirtioInterrupt;

#[derive(Debug, Default)]
struct Inner {
    /// The running driver's interrupt (`None` before activation and after reset).
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// Bumped by each change; the transport adds it to its own `config_generation`.
    generation: AtomicU8,
}

/// Where a device's host-made configuration changes are announced; clones share it.
#[derive(Clone, Debug, Default)]
pub struct ConfigChange {
    inner: Arc<Inner>,
}

impl ConfigChange {
    /// Nothing attached yet, generation 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<dyn VirtioInterrupt>>> {
        self.inner
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The driver is running: changes from now on interrupt it (called at activation).
    pub fn attach(&self, interrupt: Arc<dyn VirtioInterrupt>) {
        *self.slot() = Some(interrupt);
    }

    /// The driver reset the device: changes from now on only bump the generation.
    pub fn detach(&self) {
        *self.slot() = None;
    }

    /// As [`detach`](Self::detach), only if `interrupt` is the one attached: a device whose
    /// `ConfigChange` outlives it (shared by the devices of successive VM instances) lets go
    /// of its own driver, never of a newer device's.
    pub fn detach_if(&self, interrupt: &Arc<dyn VirtioInterrupt>) {
        let mut slot = self.slot();
        let same = slot
            .as_ref()
            .is_some_and(|a| std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(interrupt)));
        if same {
            *slot = None;
        }
    }

    /// The configuration space has just changed: bumps the generation and, when a driver is
    /// running, raises the configuration change interrupt. Returns whether it was raised.
    pub fn notify(&self) -> bool {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        let interrupt = self.slot().clone();
        match interrupt {
            Some(i) => {
                i.signal_config();
                true
            }
            None => false,
        }
    }

    /// How many changes there were (wrapping), for `config_generation`.
    pub fn generation(&self) -> u8 {
        self.inner.generation.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[derive(Debug, Default)]
    struct Count(AtomicU32);

    impl VirtioInterrupt for Count {
        fn signal_queue(&self, _queue: u16) {}
        fn signal_config(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn needs_reset(&self) {}
    }

    #[test]
    fn notify_interrupts_only_an_attached_driver_and_always_bumps_the_generation() {
        let change = ConfigChange::new();
        let vmm_side = change.clone();
        assert!(!vmm_side.notify(), "no driver yet");
        assert_eq!(change.generation(), 1);
        let count = Arc::new(Count::default());
        change.attach(count.clone());
        assert!(vmm_side.notify());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(change.generation(), 2);
        change.detach();
        assert!(!vmm_side.notify());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(change.generation(), 3);

        let newer: Arc<dyn VirtioInterrupt> = Arc::new(Count::default());
        let older: Arc<dyn VirtioInterrupt> = count;
        change.attach(newer.clone());
        change.detach_if(&older);
        assert!(
            change.notify(),
            "an older device does not detach a newer one"
        );
        change.detach_if(&newer);
        assert!(!change.notify());
    }
}
