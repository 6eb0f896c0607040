//! The boot progress (POST code) port at 0x80: each byte the guest writes is logged with the
//! time since the VMM process started; and the debug console (port 0xe9 unless configured
//! otherwise): the bytes the guest writes go to a console sink, as Cloud Hypervisor's
//! `--debug-console` does.

use std::io::Write;
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

/// The debug console: every byte written to its port goes to `out`; reads return nothing
/// (zero), as with Cloud Hypervisor.
pub struct DebugConsole {
    out: Box<dyn Write + Send>,
}

impl std::fmt::Debug for DebugConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugConsole").finish_non_exhaustive()
    }
}

impl DebugConsole {
    /// A debug console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out }
    }
}

impl BusDevice for DebugConsole {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Err(e) = self.out.write_all(data) {
            log::warn!("debug console output failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::SharedSink;

    #[test]
    fn bytes_written_reach_the_sink_and_reads_are_zero() {
        let sink = SharedSink::default();
        let mut port = DebugConsole::new(Box::new(sink.clone()));
        port.write(0, b"h");
        port.write(0, b"i\n");
        assert_eq!(sink.bytes(), b"hi\n");
        let mut b = [0xaa];
        port.read(0, &mut b);
        assert_eq!(b, [0]);
    }
}
