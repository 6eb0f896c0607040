//! Platform devices of a Nimbus machine and the buses they sit on.
//!
//! Devices implement [`BusDevice`] and are placed on a [`Bus`] (one for port I/O, one for MMIO).
//! They reach the rest of the VMM only through two narrow traits: [`Interrupt`] to raise their
//! interrupt line and [`PowerControl`] to ask for power-off or reset.
#![deny(missing_docs)]

pub mod acpi;
pub mod bus;
pub mod cpu_hotplug;
pub mod debug_port;
pub mod i8042;
pub mod memory_hotplug;
pub mod pci_hotplug;
mod registers;
pub mod rtc;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};

/// An interrupt line a device can raise (an irqfd in the VMM, a counter in tests).
pub trait Interrupt: Send + Sync + std::fmt::Debug {
    /// Raises the interrupt (edge) once.
    fn trigger(&self) -> std::io::Result<()>;
}

/// What a device may ask of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    /// Turn the machine off (ACPI S5).
    PowerOff,
    /// Reset the machine.
    Reset,
}

/// Receives power requests from devices.
pub trait PowerControl: Send + Sync + std::fmt::Debug {
    /// Asks the VMM to carry out `action`.
    fn request(&self, action: PowerAction);
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Default)]
    pub struct CountingInterrupt(pub AtomicUsize);
    impl Interrupt for CountingInterrupt {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Debug, Default)]
    pub struct SharedSink(pub std::sync::Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl SharedSink {
        pub fn bytes(&self) -> Vec<u8> {
            self.0.lock().map(|v| v.clone()).unwrap_or_default()
        }
    }

    #[derive(Debug, Default)]
    pub struct RecordingPower(pub Mutex<Vec<PowerAction>>);
    impl PowerControl for RecordingPower {
        fn request(&self, action: PowerAction) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(action);
        }
    }
    impl RecordingPower {
        pub fn actions(&self) -> Vec<PowerAction> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }
}
