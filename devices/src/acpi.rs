//! ACPI hardware-reduced registers: sleep control/status, the reset register and the Generic
//! Event Device (power button, PCI, CPU and memory hotplug).

use std::sync::Arc;

use crate::{BusDevice, Interrupt, PowerAction, PowerControl};

/// SLP_EN bit of the hardware-reduced sleep control register.
const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// Shift of the SLP_TYP field.
const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
/// RST_CPU bit of the 0xcf9 reset control register.
const RESET_CPU: u8 = 1 << 2;

/// Sleep control (offset 0) and sleep status (offset 1) registers.
#[derive(Debug)]
pub struct SleepRegisters {
    power: Arc<dyn PowerControl>,
    s5_slp_typ: u8,
}

impl SleepRegisters {
    /// Registers that power off when the guest enters the sleep type `s5_slp_typ`.
    pub fn new(power: Arc<dyn PowerControl>, s5_slp_typ: u8) -> Self {
        Self { power, s5_slp_typ }
    }
}

impl BusDevice for SleepRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: no wake event pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&v)) = (offset, data.first()) else {
            return;
        };
        if v & SLEEP_CONTROL_SLP_EN == 0 {
            return;
        }
        let slp_typ = (v >> SLEEP_CONTROL_SLP_TYP_SHIFT) & 0x7;
        if slp_typ == self.s5_slp_typ {
            log::info!("guest entered ACPI S5: powering off");
            self.power.request(PowerAction::PowerOff);
        } else {
            log::warn!("guest asked for unsupported sleep type {slp_typ}");
        }
    }
}

/// The reset control register (FADT RESET_REG, port 0xcf9).
#[derive(Debug)]
pub struct ResetRegister {
    power: Arc<dyn PowerControl>,
}

impl ResetRegister {
    /// A register that resets the machine when RST_CPU is written.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self { power }
    }
}

impl BusDevice for ResetRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & RESET_CPU != 0) {
            log::info!("guest wrote the reset register: resetting");
            self.power.request(PowerAction::Reset);
        }
    }
}

/// Events the Generic Event Device reports; bit positions of its event register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GedEvent {
    /// The power button was pressed.
    PowerButton = 1,
    /// PCI slots were added or are to be removed (see [`crate::pci_hotplug`]): the guest's
    /// `_EVT` calls `\_SB_.PHPR.PSCN`, which rescans every segment. Must equal arch's
    /// `x86_64::acpi::GED_EVENT_PCI_HOTPLUG` (the DSDT side; devices does not depend on arch).
    PciHotplug = 2,
    /// vCPUs were added or are to be removed (see [`crate::cpu_hotplug`]): the guest's `_EVT`
    /// calls `\_SB_.CPHP.CSCN`, which looks at every CPU. Must equal arch's
    /// `x86_64::acpi::GED_EVENT_CPU_HOTPLUG`.
    CpuHotplug = 4,
    /// RAM was hot-added (see [`crate::memory_hotplug`]): the guest's `_EVT` calls
    /// `\_SB_.MHPC.MSCN`, which notifies the memory devices with an insertion pending. Must
    /// equal arch's `x86_64::acpi::GED_EVENT_MEMORY_HOTPLUG`.
    MemoryHotplug = 8,
}

/// The Generic Event Device's event register: the DSDT's `_EVT` reads it (which clears it) and
/// notifies the devices whose bits are set.
#[derive(Debug)]
pub struct Ged {
    pending: u32,
    irq: Arc<dyn Interrupt>,
}

impl Ged {
    /// A GED raising `irq` when an event is posted.
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Self { pending: 0, irq }
    }

    /// Posts `event` and interrupts the guest.
    pub fn notify(&mut self, event: GedEvent) -> std::io::Result<()> {
        self.pending |= event as u32;
        self.irq.trigger()
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = std::mem::take(&mut self.pending).to_le_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, b) in data.iter_mut().enumerate() {
            *b = start
                .checked_add(i)
                .and_then(|j| bytes.get(j))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::test_utils::{CountingInterrupt, RecordingPower};

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let power = Arc::new(RecordingPower::default());
        let mut s = SleepRegisters::new(power.clone(), 5);
        s.write(0, &[5 << 2]); // no SLP_EN
        s.write(0, &[(3 << 2) | SLEEP_CONTROL_SLP_EN]); // S3: unsupported
        s.write(1, &[(5 << 2) | SLEEP_CONTROL_SLP_EN]); // status register
        assert!(power.actions().is_empty());
        s.write(0, &[(5 << 2) | SLEEP_CONTROL_SLP_EN]);
        assert_eq!(power.actions(), vec![PowerAction::PowerOff]);
    }

    #[test]
    fn reset_register() {
        let power = Arc::new(RecordingPower::default());
        let mut r = ResetRegister::new(power.clone());
        r.write(0, &[0x02]);
        assert!(power.actions().is_empty());
        r.write(0, &[0x06]);
        assert_eq!(power.actions(), vec![PowerAction::Reset]);
    }

    #[test]
    fn ged_events_are_distinct_bits_and_accumulate() {
        // The DSDT's _EVT tests these bits (arch's GED_EVENT_POWER_BUTTON and
        // GED_EVENT_PCI_HOTPLUG, GED_EVENT_CPU_HOTPLUG, GED_EVENT_MEMORY_HOTPLUG).
        assert_eq!(GedEvent::PowerButton as u32, 1 << 0);
        assert_eq!(GedEvent::PciHotplug as u32, 1 << 1);
        assert_eq!(GedEvent::CpuHotplug as u32, 1 << 2);
        assert_eq!(GedEvent::MemoryHotplug as u32, 1 << 3);
        let irq = Arc::new(CountingInterrupt::default());
        let mut ged = Ged::new(irq.clone());
        ged.notify(GedEvent::PciHotplug).expect("notify");
        ged.notify(GedEvent::PowerButton).expect("notify");
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
        let mut b = [0u8; 4];
        ged.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0b11);
    }

    #[test]
    fn ged_event_is_read_once() {
        let irq = Arc::new(CountingInterrupt::default());
        let mut ged = Ged::new(irq.clone());
        ged.notify(GedEvent::PowerButton).expect("notify");
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        let mut b = [0u8; 4];
        ged.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        ged.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
    }
}
