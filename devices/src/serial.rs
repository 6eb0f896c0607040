//! 16550A UART (vm-superio) on the port I/O bus.

use std::io::Write;
use std::sync::Arc;

use crate::{BusDevice, Interrupt};

/// Adapts an [`Interrupt`] to vm-superio's trigger.
#[derive(Debug, Clone)]
pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// A 16550A UART whose output goes to `out`.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART raising `irq` and writing the guest's output to `out`.
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(done) => done,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.uart.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *b) {
                log::warn!("serial output failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::test_utils::{CountingInterrupt, SharedSink as Sink};

    #[test]
    fn output_reaches_the_sink_and_input_raises_the_irq() {
        let irq = Arc::new(CountingInterrupt::default());
        let sink = Sink::default();
        let mut s = Serial::new(irq.clone(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(sink.bytes(), b"hi");
        s.write(1, &[0x01]); // IER: received data available
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Wide accesses are not a 16550 thing: they read as all ones and write nothing.
        let mut w = [0u8; 2];
        s.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
