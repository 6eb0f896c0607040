//! ACPI CPU hotplug registers: the device side of the DSDT's `\_SB_.CPHP`.
//!
//! The VMM records vCPUs it has added ([`CpuHotplug::cpu_added`]) or wants removed
//! ([`CpuHotplug::cpu_removing`]) and then raises the GED's `CpuHotplug` event. The guest's
//! `_EVT` runs `\_SB_.CPHP.CSCN`, which selects every CPU in turn (`CSEL`), reads its status
//! (`CSTA`) and notifies the processor device: "device check" for an inserted CPU, "eject
//! request" for one to remove, acknowledging each event by writing its bit back. Each
//! processor device's `_STA` and `_MAT` read the ENABLED bit. Once the guest has stopped using
//! a CPU it runs the processor's `_EJ0`, which writes EJECT: only then does the VMM get the
//! [`CpuEjectHandler`] call and may stop the vCPU.
//!
//! Four 32-bit little-endian registers, accessed byte-wise like the PCI hotplug block:
//!
//! ```text
//! 0x0 CSEL  read/write: the selected CPU (writes of a CPU that does not exist are ignored)
//! 0x4 CSTA  read: the selected CPU's status: bit 0 ENABLED (present and usable),
//!           bit 1 INSERTING (an insert event is pending), bit 2 REMOVING (a remove event is
//!           pending); write: 1 in bit 1 / bit 2 acknowledges (clears) that event, 1 in bit 3
//!           (EJECT) ejects the CPU if the VMM asked for its removal (else it is ignored)
//! 0x8 CCNT  read: number of CPUs the block describes (the VM's maximum)
//! 0xc       reserved (reads 0)
//! ```
//!
//! Other offsets read 0 and ignore writes.

use std::sync::Arc;

use crate::registers::{self, DwordRegisters};
use crate::BusDevice;

/// Called with the CPU index when the guest has ejected a CPU the VMM asked to remove: the
/// guest no longer runs it and the VMM may stop its vCPU.
///
/// It runs with this device (and so its bus entry) locked: it must not access the register
/// block itself.
pub type CpuEjectHandler = Arc<dyn Fn(u32) + Send + Sync>;

/// Offset of `CSEL`, the CPU selector.
pub const CSEL_OFFSET: u64 = 0x0;
/// Offset of `CSTA`, the selected CPU's status and event acknowledgements.
pub const CSTA_OFFSET: u64 = 0x4;
/// Offset of `CCNT`, the number of CPUs.
pub const CCNT_OFFSET: u64 = 0x8;
/// Size of the register block in bytes (`layout::CPU_HOTPLUG_PORT_LEN` in arch).
pub const REGISTER_BLOCK_LEN: u64 = 16;

/// `CSTA` bit: the CPU is present and enabled.
pub const STATUS_ENABLED: u32 = 1 << 0;
/// `CSTA` bit: an insert event is pending (write 1 to acknowledge).
pub const STATUS_INSERTING: u32 = 1 << 1;
/// `CSTA` bit: a remove event is pending (write 1 to acknowledge).
pub const STATUS_REMOVING: u32 = 1 << 2;
/// `CSTA` write bit: eject the selected CPU.
pub const STATUS_EJECT: u32 = 1 << 3;

/// Index of each register in the block (offset / 4).
const CSEL: usize = 0;
const CSTA: usize = 1;
const CCNT: usize = 2;
const RESERVED: usize = 3;

/// The state of one CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuState {
    /// Present and enabled.
    enabled: bool,
    /// Insert event not yet acknowledged.
    inserting: bool,
    /// Remove event not yet acknowledged.
    removing: bool,
    /// The VMM asked for the CPU's removal: an eject is accepted.
    removal_requested: bool,
}

/// The CPU hotplug register block.
pub struct CpuHotplug {
    cpus: Vec<CpuState>,
    selected: u32,
    eject: CpuEjectHandler,
}

impl std::fmt::Debug for CpuHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuHotplug")
            .field("cpus", &self.cpus)
            .field("selected", &self.selected)
            .finish_non_exhaustive()
    }
}

impl CpuHotplug {
    /// Registers for `cpus` CPUs of which the first `enabled` are enabled (the boot vCPUs),
    /// with no event pending and CPU 0 selected; `eject` is called for every CPU the guest
    /// ejects after [`CpuHotplug::cpu_removing`].
    pub fn new(cpus: u32, enabled: u32, eject: CpuEjectHandler) -> Self {
        let cpus = (0..cpus)
            .map(|cpu| CpuState {
                enabled: cpu < enabled,
                ..CpuState::default()
            })
            .collect();
        Self {
            cpus,
            selected: 0,
            eject,
        }
    }

    fn cpu_mut(&mut self, cpu: u32) -> Option<&mut CpuState> {
        self.cpus.get_mut(usize::try_from(cpu).ok()?)
    }

    /// Records that CPU `cpu` was plugged in: it reads ENABLED, and the guest's next scan sees
    /// INSERTING and brings it up. A CPU that does not exist is ignored.
    pub fn cpu_added(&mut self, cpu: u32) {
        if let Some(c) = self.cpu_mut(cpu) {
            *c = CpuState {
                enabled: true,
                inserting: true,
                removing: false,
                removal_requested: false,
            };
        }
    }

    /// Asks the guest to eject CPU `cpu`: the guest's next scan sees REMOVING; when it has
    /// stopped the CPU it writes EJECT and the [`CpuEjectHandler`] runs. CPUs that are not
    /// enabled (or do not exist) are ignored.
    pub fn cpu_removing(&mut self, cpu: u32) {
        if let Some(c) = self.cpu_mut(cpu).filter(|c| c.enabled) {
            c.inserting = false;
            c.removing = true;
            c.removal_requested = true;
        }
    }

    /// Whether CPU `cpu` is enabled.
    pub fn is_enabled(&self, cpu: u32) -> bool {
        usize::try_from(cpu)
            .ok()
            .and_then(|i| self.cpus.get(i))
            .is_some_and(|c| c.enabled)
    }

    /// The selected CPU's status bits.
    fn status(&self) -> u32 {
        let Some(c) = usize::try_from(self.selected)
            .ok()
            .and_then(|i| self.cpus.get(i))
        else {
            return 0;
        };
        [
            (c.enabled, STATUS_ENABLED),
            (c.inserting, STATUS_INSERTING),
            (c.removing, STATUS_REMOVING),
        ]
        .into_iter()
        .filter(|&(set, _)| set)
        .fold(0, |status, (_, bit)| status | bit)
    }

    /// A write of `value` to `CSTA`: acknowledgements, then the eject.
    fn write_status(&mut self, value: u32) {
        let cpu = self.selected;
        let Some(c) = self.cpu_mut(cpu) else {
            return;
        };
        if value & STATUS_INSERTING != 0 {
            c.inserting = false;
        }
        if value & STATUS_REMOVING != 0 {
            c.removing = false;
        }
        if value & STATUS_EJECT == 0 {
            return;
        }
        if !c.removal_requested {
            log::debug!("CPU hotplug: guest ejected CPU {cpu}, whose removal was not asked for");
            return;
        }
        *c = CpuState::default();
        log::debug!("CPU hotplug: guest ejected CPU {cpu}");
        (self.eject)(cpu);
    }
}

impl DwordRegisters for CpuHotplug {
    const REGISTERS: usize = RESERVED + 1;

    fn read_register(&mut self, register: usize, mask: u32) -> u32 {
        let value = match register {
            CSEL => self.selected,
            CSTA => self.status(),
            CCNT => u32::try_from(self.cpus.len()).unwrap_or(u32::MAX),
            _ => 0,
        };
        value & mask
    }

    fn write_register(&mut self, register: usize, value: u32, mask: u32) {
        match register {
            CSEL => {
                let cpu = (self.selected & !mask) | value;
                if usize::try_from(cpu).is_ok_and(|i| i < self.cpus.len()) {
                    self.selected = cpu;
                } else {
                    log::debug!("CPU hotplug: guest selected missing CPU {cpu}");
                }
            }
            // A narrow write only carries the bits of its bytes: the others are 0 in `value`.
            CSTA => self.write_status(value),
            _ => {}
        }
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        registers::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        registers::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The CPUs the eject handler was called with.
    type Ejected = Arc<Mutex<Vec<u32>>>;

    fn device(cpus: u32, enabled: u32) -> (CpuHotplug, Ejected) {
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let log = ejected.clone();
        let eject: CpuEjectHandler = Arc::new(move |cpu| {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(cpu);
        });
        (CpuHotplug::new(cpus, enabled, eject), ejected)
    }

    fn taken(ejected: &Mutex<Vec<u32>>) -> Vec<u32> {
        std::mem::take(&mut *ejected.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn read32(d: &mut CpuHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(d: &mut CpuHotplug, offset: u64, value: u32) {
        d.write(offset, &value.to_le_bytes());
    }

    /// The status of `cpu`, selected first.
    fn status(d: &mut CpuHotplug, cpu: u32) -> u32 {
        write32(d, CSEL_OFFSET, cpu);
        read32(d, CSTA_OFFSET)
    }

    #[test]
    fn boot_cpus_are_enabled_and_the_rest_absent() {
        let (mut d, _) = device(4, 2);
        assert_eq!(read32(&mut d, CCNT_OFFSET), 4);
        assert_eq!(
            (0..4).map(|c| status(&mut d, c)).collect::<Vec<_>>(),
            [STATUS_ENABLED, STATUS_ENABLED, 0, 0]
        );
        assert!(d.is_enabled(1) && !d.is_enabled(2) && !d.is_enabled(99));
    }

    #[test]
    fn an_insertion_is_seen_until_acknowledged() {
        let (mut d, ejected) = device(4, 1);
        d.cpu_added(2);
        assert_eq!(status(&mut d, 2), STATUS_ENABLED | STATUS_INSERTING);
        assert_eq!(
            status(&mut d, 2),
            STATUS_ENABLED | STATUS_INSERTING,
            "reads do not clear"
        );
        write32(&mut d, CSTA_OFFSET, STATUS_INSERTING);
        assert_eq!(status(&mut d, 2), STATUS_ENABLED);
        // An inserted CPU the host did not ask to remove cannot be ejected.
        write32(&mut d, CSTA_OFFSET, STATUS_EJECT);
        assert_eq!(status(&mut d, 2), STATUS_ENABLED);
        assert_eq!(taken(&ejected), Vec::<u32>::new());
    }

    #[test]
    fn a_removal_ends_with_the_guests_eject() {
        let (mut d, ejected) = device(4, 1);
        d.cpu_added(3);
        d.cpu_removing(3);
        assert_eq!(status(&mut d, 3), STATUS_ENABLED | STATUS_REMOVING);
        write32(&mut d, CSTA_OFFSET, STATUS_REMOVING);
        assert_eq!(status(&mut d, 3), STATUS_ENABLED);
        assert_eq!(taken(&ejected), Vec::<u32>::new());
        write32(&mut d, CSTA_OFFSET, STATUS_EJECT);
        assert_eq!(taken(&ejected), [3]);
        assert_eq!(status(&mut d, 3), 0);
        // A second eject does nothing: the CPU is gone.
        write32(&mut d, CSTA_OFFSET, STATUS_EJECT);
        assert_eq!(taken(&ejected), Vec::<u32>::new());
        // It can be added again.
        d.cpu_added(3);
        assert_eq!(status(&mut d, 3), STATUS_ENABLED | STATUS_INSERTING);
    }

    #[test]
    fn absent_and_missing_cpus_are_not_removed() {
        let (mut d, ejected) = device(2, 1);
        d.cpu_removing(1);
        d.cpu_removing(2);
        d.cpu_removing(u32::MAX);
        d.cpu_added(2);
        assert_eq!(status(&mut d, 1), 0);
        write32(
            &mut d,
            CSTA_OFFSET,
            STATUS_EJECT | STATUS_REMOVING | STATUS_INSERTING,
        );
        assert_eq!(taken(&ejected), Vec::<u32>::new());
    }

    #[test]
    fn missing_cpus_are_not_selected() {
        let (mut d, _) = device(3, 3);
        write32(&mut d, CSEL_OFFSET, 2);
        for bad in [3, 0x100, 0x1_0002, u32::MAX] {
            write32(&mut d, CSEL_OFFSET, bad);
            assert_eq!(read32(&mut d, CSEL_OFFSET), 2, "{bad:#x}");
        }
        // Byte writes merge into the selector: high byte 1 would select 0x102, refused.
        d.write(CSEL_OFFSET + 1, &[1]);
        assert_eq!(read32(&mut d, CSEL_OFFSET), 2);
        d.write(CSEL_OFFSET, &[1]);
        assert_eq!(read32(&mut d, CSEL_OFFSET), 1);
        // Writes to CCNT change nothing.
        write32(&mut d, CCNT_OFFSET, 0);
        assert_eq!(read32(&mut d, CCNT_OFFSET), 3);
    }

    #[test]
    fn without_cpus_nothing_happens() {
        let (mut d, ejected) = device(0, 0);
        d.cpu_added(0);
        d.cpu_removing(0);
        write32(&mut d, CSTA_OFFSET, u32::MAX);
        assert_eq!(taken(&ejected), Vec::<u32>::new());
        for offset in [CSEL_OFFSET, CSTA_OFFSET, CCNT_OFFSET, 0xc] {
            assert_eq!(read32(&mut d, offset), 0);
        }
    }

    #[test]
    fn hostile_accesses_never_panic_and_eject_only_what_was_asked() {
        let (mut d, ejected) = device(4, 2);
        d.cpu_added(2);
        d.cpu_removing(2);
        let offsets = (0..24).chain([u64::MAX - 3, u64::MAX - 1, u64::MAX, 1 << 40]);
        for offset in offsets {
            for len in 0..=9 {
                let mut buf = vec![0x55u8; len];
                d.read(offset, &mut buf);
                if offset >= REGISTER_BLOCK_LEN {
                    assert!(buf.iter().all(|&b| b == 0), "{offset:#x}+{len}: {buf:?}");
                }
                d.write(offset, &vec![0xffu8; len]);
            }
        }
        for cpu in 0..4 {
            write32(&mut d, CSEL_OFFSET, cpu);
            write32(&mut d, CSTA_OFFSET, u32::MAX);
        }
        assert_eq!(taken(&ejected), [2]);
        let mut big = vec![0x55u8; 4096];
        d.read(0, &mut big);
        assert!(big[16..].iter().all(|&b| b == 0));
        d.write(0, &big);
    }
}
