//! The boot progress (POST code) port: each byte the guest writes is logged with the time
//! since the VMM process started.

use std::time::Instant;

use crate::BusDevice;

/// Logs writes with a timestamp relative to `start`.
#[derive(Debug)]
pub struct DebugPort {
    start: Instant,
}

impl DebugPort {
    /// A port timing from `start` (the VMM's process start).
    pub fn new(start: Instant) -> Self {
        Self { start }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let elapsed = self.start.elapsed();
        for b in data {
            log::info!(
                "debug port: {b:#04x} at {:.3} ms",
                elapsed.as_secs_f64() * 1e3
            );
        }
    }
}
