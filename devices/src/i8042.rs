//! The i8042 keyboard controller, reduced to what guests use it for: the 0xfe reset command.

use std::sync::Arc;

use crate::{BusDevice, PowerAction, PowerControl};

#[derive(Debug)]
struct ResetTrigger(Arc<dyn PowerControl>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(PowerAction::Reset);
        Ok(())
    }
}

/// An i8042 at ports 0x60..0x64 (data at offset 0, command/status at offset 4).
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller whose reset command goes to `power`.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(ResetTrigger(power)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.dev.read(o));
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            let _ = self.dev.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingPower;

    #[test]
    fn reset_command_requests_reset() {
        let power = Arc::new(RecordingPower::default());
        let mut dev = I8042::new(power.clone());
        dev.write(4, &[0xd1]);
        assert!(power.actions().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(power.actions(), vec![PowerAction::Reset]);
    }
}
