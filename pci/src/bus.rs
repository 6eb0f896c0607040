//! PCI bus 0: a host bridge at 00:00.0, devices in the other slots, configuration access through
//! the 0xcf8/0xcfc port pair and through ECAM (both reach the same registers), and BAR placement:
//! after every configuration write the bus compares where each BAR decodes and moves the
//! device's MMIO range (and the device's ioeventfds) accordingly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::BusDevice;

use nimbus_log::error_chain;

use crate::configuration::{PciConfiguration, PciIds};
use crate::mmio::BarMapper;

/// A PCI function.
pub trait PciDevice: Send {
    /// Reads configuration register (dword) `reg`.
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of configuration register `reg`.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// Where each BAR decodes now: `(bar index, address, size)`.
    fn decoded_bars(&self) -> Vec<(usize, u64, u64)>;
    /// Reads from BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes to BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` moved from `old` to `new` (None: not decoded): re-register what depends on it.
    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>);
}

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Errors changing the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    /// All 31 device slots are in use.
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    /// The slot is taken or is the host bridge's.
    #[error("PCI slot {0} is not available")]
    SlotTaken(u8),
}

/// The host bridge: IDs only.
struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg, offset, data);
    }
    fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}

/// Vendor and device ID of the host bridge (Red Hat's generic PCIe host bridge IDs are QEMU's;
/// Nimbus uses the Intel "Q35-like" convention-free pair below, documented in docs/).
pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x8086,
    device: 0x0d57,
    revision: 0,
    class: 0x06,
    subclass: 0x00,
    prog_if: 0,
    subsystem_vendor: 0,
    subsystem: 0,
};

/// Bus 0 and its devices.
pub struct PciBus {
    slots: BTreeMap<u8, SharedPciDevice>,
    mapper: Arc<dyn BarMapper>,
    /// Where each BAR is mapped on the MMIO bus: (slot, BAR) → address. A decoded BAR the
    /// mapper refused (the guest placed it over another range) is absent until that range is
    /// free; only what is here is ever unmapped, so a refused BAR never takes another range's
    /// mapping away with it.
    mapped: Mutex<BTreeMap<(u8, usize), u64>>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("slots", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Locks `m`, whether or not an earlier holder panicked.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciBus {
    /// A bus with the host bridge at slot 0.
    pub fn new(mapper: Arc<dyn BarMapper>) -> Self {
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge {
            config: PciConfiguration::new(HOST_BRIDGE_IDS),
        }));
        let mut slots = BTreeMap::new();
        slots.insert(0, bridge);
        Self {
            slots,
            mapper,
            mapped: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds `device` in the first free slot (or `slot`), mapping its decoded BARs.
    /// Returns the slot (device number).
    pub fn add_device(
        &mut self,
        device: SharedPciDevice,
        slot: Option<u8>,
    ) -> Result<u8, PciBusError> {
        let slot = match slot {
            Some(s) if s == 0 || s > 31 || self.slots.contains_key(&s) => {
                return Err(PciBusError::SlotTaken(s))
            }
            Some(s) => s,
            None => (1..32)
                .find(|s| !self.slots.contains_key(s))
                .ok_or(PciBusError::NoFreeSlot)?,
        };
        let bars = lock(&device).decoded_bars();
        for (bar, addr, size) in bars {
            if let Err(e) = self.map(slot, &device, bar, addr, size) {
                log::error!("PCI 00:{slot:02x}.0 at {addr:#x}: {}", error_chain(&e));
            }
        }
        self.slots.insert(slot, device);
        Ok(slot)
    }

    /// Takes the device in `slot` off the bus (hot removal): its BARs are unmapped and the
    /// slot is free again. `None` for an empty slot or the host bridge's.
    pub fn remove_device(&mut self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        let device = self.slots.remove(&slot)?;
        let mapped: Vec<(usize, u64)> = lock(&self.mapped)
            .iter()
            .filter(|((s, _), _)| *s == slot)
            .map(|(&(_, bar), &addr)| (bar, addr))
            .collect();
        for (bar, addr) in mapped {
            self.unmap(slot, bar, addr);
        }
        Some(device)
    }

    /// Maps BAR `bar` of the device in `slot` at `addr` and records it.
    fn map(
        &self,
        slot: u8,
        device: &SharedPciDevice,
        bar: usize,
        addr: u64,
        size: u64,
    ) -> Result<(), crate::mmio::MmioError> {
        self.mapper.map(device.clone(), bar, addr, size)?;
        lock(&self.mapped).insert((slot, bar), addr);
        Ok(())
    }

    /// Unmaps BAR `bar` of the device in `slot` if it is mapped at `addr`.
    fn unmap(&self, slot: u8, bar: usize, addr: u64) {
        let mut mapped = lock(&self.mapped);
        if mapped.get(&(slot, bar)) == Some(&addr) {
            mapped.remove(&(slot, bar));
            self.mapper.unmap(addr);
        }
    }

    /// Maps the decoded BARs that are not mapped (refused earlier) where their range is free now.
    /// Buses sharing one MMIO space call it on each other after a configuration write
    /// ([`PciEcam::with_peers`]): a range one bus freed may be where another's BAR decodes.
    pub fn map_refused(&self) {
        for (&slot, device) in &self.slots {
            let bars = lock(device).decoded_bars();
            for (bar, addr, size) in bars {
                if lock(&self.mapped).get(&(slot, bar)) != Some(&addr) {
                    // Still over another range: stays unmapped.
                    let _ = self.map(slot, device, bar, addr, size);
                }
            }
        }
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots.get(&slot).cloned()
    }

    /// Reads register `reg` of bus/device/function; absent functions read all ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        match self.function(bus, dev, func) {
            Some(d) => lock(&d).read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    /// Writes register `reg` of bus/device/function and moves BARs that changed placement.
    pub fn config_write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: u64, data: &[u8]) {
        let Some(d) = self.function(bus, dev, func) else {
            return;
        };
        let mut device = lock(&d);
        let before = device.decoded_bars();
        device.write_config_register(reg, offset, data);
        let after = device.decoded_bars();
        if before == after {
            return;
        }
        let find =
            |list: &[(usize, u64, u64)], bar| list.iter().find(|b| b.0 == bar).map(|b| (b.1, b.2));
        let mut indices: Vec<usize> = before.iter().chain(after.iter()).map(|b| b.0).collect();
        indices.sort_unstable();
        indices.dedup();
        for bar in indices {
            let (old, new) = (find(&before, bar), find(&after, bar));
            if old == new {
                continue;
            }
            if let Some((addr, _)) = old {
                self.unmap(dev, bar, addr);
            }
            if let Some((addr, size)) = new {
                if let Err(e) = self.map(dev, &d, bar, addr, size) {
                    // A guest placing a BAR over another device or ECAM: it stays unmapped
                    // until that range is free.
                    log::warn!("PCI 00:{dev:02x}.{func} at {addr:#x}: {}", error_chain(&e));
                }
            }
            device.bar_moved(bar, old.map(|o| o.0), new.map(|n| n.0));
        }
        drop(device);
        // A range this write freed may be where a refused BAR decodes.
        self.map_refused();
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<SharedPciDevice> {
        // Only bus 0, single-function devices.
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(&dev).cloned()
    }
}

/// Splits a byte offset into ECAM coordinates: (bus, device, function, register, byte).
fn ecam_decode(offset: u64) -> (u8, u8, u8, usize, u64) {
    let bus = ((offset >> 20) & 0xff) as u8;
    let dev = ((offset >> 15) & 0x1f) as u8;
    let func = ((offset >> 12) & 0x7) as u8;
    let reg = ((offset & 0xfff) >> 2) as usize;
    (bus, dev, func, reg, offset & 3)
}

fn read_bytes(value: u32, byte: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte as usize + i).copied().unwrap_or(0xff);
    }
}

fn valid_access(byte: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && byte as usize + len <= 4 && byte.is_multiple_of(len as u64)
}

/// After a configuration write to one bus, lets every other bus sharing its MMIO space map the
/// BARs it had to refuse, one bus locked at a time (never two at once).
fn retry_peers(peers: &[Arc<Mutex<PciBus>>]) {
    for peer in peers {
        lock(peer).map_refused();
    }
}

/// ECAM (the MCFG window) on the MMIO bus.
#[derive(Debug)]
pub struct PciEcam {
    bus: Arc<Mutex<PciBus>>,
    peers: Vec<Arc<Mutex<PciBus>>>,
}

impl PciEcam {
    /// ECAM access to `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self {
            bus,
            peers: Vec::new(),
        }
    }

    /// The other buses (PCI segments) on the same MMIO space: after a configuration write,
    /// each maps the BARs it refused where the range is free now.
    pub fn with_peers(mut self, peers: Vec<Arc<Mutex<PciBus>>>) -> Self {
        self.peers = peers;
        self
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg, byte) = ecam_decode(offset);
        if !valid_access(byte, data.len()) {
            data.fill(0xff);
            return;
        }
        let value = lock(&self.bus).config_read(b, d, f, reg);
        read_bytes(value, byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg, byte) = ecam_decode(offset);
        if valid_access(byte, data.len()) {
            lock(&self.bus).config_write(b, d, f, reg, byte, data);
            retry_peers(&self.peers);
        }
    }
}

/// Configuration mechanism #1: address at 0xcf8, data at 0xcfc..0xcff (an 8-port device).
///
/// On a PC, byte accesses to 0xcf9 are the reset control register, not part of the address
/// register; [`PciConfigIo::with_reset_register`] routes them to that device.
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    peers: Vec<Arc<Mutex<PciBus>>>,
    address: u32,
    reset_register: Option<Arc<Mutex<dyn BusDevice>>>,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl PciConfigIo {
    /// Port access to `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self {
            bus,
            peers: Vec::new(),
            address: 0,
            reset_register: None,
        }
    }

    /// As [`PciEcam::with_peers`].
    pub fn with_peers(mut self, peers: Vec<Arc<Mutex<PciBus>>>) -> Self {
        self.peers = peers;
        self
    }

    /// Sends single-byte accesses at 0xcf9 (offset 1) to `device`.
    pub fn with_reset_register(mut self, device: Arc<Mutex<dyn BusDevice>>) -> Self {
        self.reset_register = Some(device);
        self
    }

    fn reset_register(&self, offset: u64, len: usize) -> Option<&Arc<Mutex<dyn BusDevice>>> {
        (offset == 1 && len == 1)
            .then_some(self.reset_register.as_ref())
            .flatten()
    }

    /// (bus, device, function, register) selected, if the enable bit is set.
    fn selected(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = self.address;
        // Bits 27:24 extend the register number to 4 KiB (AMD-style extended access).
        let reg = (((a >> 2) & 0x3f) | ((a >> 18) & 0x3c0)) as usize;
        Some((
            ((a >> 16) & 0xff) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(dev) = self.reset_register(offset, data.len()) {
            lock(dev).read(0, data);
            return;
        }
        match offset {
            0..=3 if data.len() == 4 && offset == 0 => {
                data.copy_from_slice(&self.address.to_le_bytes())
            }
            4..=7 => {
                let byte = offset - 4;
                match self.selected() {
                    Some((b, d, f, reg)) if valid_access(byte, data.len()) => {
                        let v = lock(&self.bus).config_read(b, d, f, reg);
                        read_bytes(v, byte, data);
                    }
                    _ => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(dev) = self.reset_register(offset, data.len()) {
            lock(dev).write(0, data);
            return;
        }
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                // Bits 1:0 are reserved (read as 0).
                self.address = u32::from_le_bytes(b) & !3;
            }
            4..=7 => {
                let byte = offset - 4;
                if let (Some((b, d, f, reg)), true) =
                    (self.selected(), valid_access(byte, data.len()))
                {
                    lock(&self.bus).config_write(b, d, f, reg, byte, data);
                    retry_peers(&self.peers);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{Bar, BarKind, COMMAND_MEMORY, COMMAND_REG};
    use crate::mmio::MmioError;

    #[derive(Default)]
    struct RecordingMapper(Mutex<Vec<String>>);
    impl BarMapper for RecordingMapper {
        fn map(
            &self,
            _d: SharedPciDevice,
            bar: usize,
            addr: u64,
            size: u64,
        ) -> Result<(), MmioError> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("map {bar} {addr:#x} {size:#x}"));
            Ok(())
        }
        fn unmap(&self, addr: u64) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("unmap {addr:#x}"));
        }
    }
    impl RecordingMapper {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }

    struct Dev {
        config: PciConfiguration,
        moves: Vec<(usize, Option<u64>, Option<u64>)>,
    }
    impl PciDevice for Dev {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data)
        }
        fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
            (0..6)
                .filter_map(|i| self.config.decoded_bar(i).map(|(a, s)| (i, a, s)))
                .collect()
        }
        fn read_bar(&mut self, _bar: usize, _offset: u64, _data: &mut [u8]) {}
        fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.push((bar, old, new));
        }
    }

    fn setup() -> (Arc<Mutex<PciBus>>, Arc<RecordingMapper>, Arc<Mutex<Dev>>) {
        let mapper = Arc::new(RecordingMapper::default());
        let bus = Arc::new(Mutex::new(PciBus::new(mapper.clone())));
        let mut config = PciConfiguration::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            ..Default::default()
        });
        config
            .add_bar(
                Bar {
                    index: 0,
                    size: 0x8000,
                    kind: BarKind::Memory64,
                    prefetchable: false,
                },
                0xc000_0000,
            )
            .expect("bar");
        config.write_reg(COMMAND_REG, 0, &[COMMAND_MEMORY as u8]);
        let dev = Arc::new(Mutex::new(Dev {
            config,
            moves: vec![],
        }));
        let slot = bus
            .lock()
            .map(|mut b| b.add_device(dev.clone(), None))
            .expect("lock")
            .expect("add");
        assert_eq!(slot, 1);
        (bus, mapper, dev)
    }

    fn cf8_read(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | dev << 11 | reg << 2).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn a_removed_device_is_unmapped_and_its_slot_reused() {
        let (bus, mapper, dev) = setup();
        mapper.take();
        let mut b = lock(&bus);
        assert!(b.remove_device(0).is_none(), "the host bridge stays");
        assert!(b.remove_device(2).is_none(), "an empty slot");
        let removed = b.remove_device(1).expect("the device");
        assert!(Arc::ptr_eq(&removed, &(dev.clone() as SharedPciDevice)));
        assert_eq!(mapper.take(), vec!["unmap 0xc0000000"]);
        assert_eq!(b.config_read(0, 1, 0, 0), 0xffff_ffff, "absent now");
        assert_eq!(b.add_device(dev, None).expect("again"), 1, "slot reused");
        assert_eq!(mapper.take(), vec!["map 0 0xc0000000 0x8000"]);
    }

    #[test]
    fn ecam_and_cf8_give_the_same_answers() {
        let (bus, mapper, _) = setup();
        assert_eq!(mapper.take(), vec!["map 0 0xc0000000 0x8000"]);
        let mut ecam = PciEcam::new(bus.clone());
        let mut io = PciConfigIo::new(bus);
        for dev in 0..32u32 {
            for reg in [0u32, 1, 2, 3, 4, 5, 0xb] {
                let mut d = [0u8; 4];
                ecam.read(u64::from(dev << 15 | reg << 2), &mut d);
                assert_eq!(
                    u32::from_le_bytes(d),
                    cf8_read(&mut io, dev, reg),
                    "dev {dev} reg {reg}"
                );
            }
        }
        let mut d = [0u8; 4];
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086, "host bridge");
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        ecam.read(2 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff, "empty slot");
        ecam.read(1 << 20, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff, "bus 1 is empty");
        // Sub-dword reads.
        let mut w = [0u8; 2];
        ecam.read((1 << 15) + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        io.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
    }

    #[test]
    fn bar_relocation_moves_the_mapping() {
        let (bus, mapper, dev) = setup();
        mapper.take();
        let mut ecam = PciEcam::new(bus);
        let bar0 = (1u64 << 15) + 0x10;
        // Disable decode, size, relocate, enable.
        ecam.write((1 << 15) + 4, &[0, 0]);
        ecam.write(bar0, &[0xff; 4]);
        ecam.write(bar0 + 4, &[0xff; 4]);
        ecam.write(bar0, &0xd000_0000u32.to_le_bytes());
        ecam.write(bar0 + 4, &0u32.to_le_bytes());
        ecam.write((1 << 15) + 4, &[COMMAND_MEMORY as u8, 0]);
        assert_eq!(
            mapper.take(),
            vec!["unmap 0xc0000000", "map 0 0xd0000000 0x8000"]
        );
        let moves = dev.lock().map(|d| d.moves.clone()).unwrap_or_default();
        assert_eq!(
            moves,
            vec![(0, Some(0xc000_0000), None), (0, None, Some(0xd000_0000))]
        );
    }

    /// A device answering BAR reads with its id.
    struct IdDev {
        config: PciConfiguration,
        id: u8,
    }
    impl PciDevice for IdDev {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg, offset, data)
        }
        fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
            self.config
                .decoded_bar(0)
                .map(|(a, s)| vec![(0, a, s)])
                .unwrap_or_default()
        }
        fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(self.id);
        }
        fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
    }

    /// Found by the `pci_config` fuzz target (seed `bar-over-bar`): a BAR the guest placed over
    /// another device's BAR (or ECAM) was refused, and moving it away again unmapped whatever
    /// was at its old address: the other device's BAR, or ECAM itself.
    #[test]
    fn a_refused_bar_never_unmaps_another_range_and_maps_once_free() {
        let mmio = Arc::new(devices::Bus::new());
        let bus = Arc::new(Mutex::new(PciBus::new(Arc::new(
            crate::mmio::MmioBarMapper::new(&mmio),
        ))));
        let ecam_at = 0xe000_0000;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(bus.clone()))),
            ecam_at,
            0x1000_0000,
        )
        .expect("ECAM");
        for (id, addr) in [(1u8, 0xc000_0000u64), (2, 0xc001_0000)] {
            let mut config = PciConfiguration::new(PciIds::default());
            config
                .add_bar(
                    Bar {
                        index: 0,
                        size: 0x8000,
                        kind: BarKind::Memory32,
                        prefetchable: false,
                    },
                    addr,
                )
                .expect("bar");
            config.write_reg(COMMAND_REG, 0, &[COMMAND_MEMORY as u8]);
            let dev = Arc::new(Mutex::new(IdDev { config, id }));
            assert_eq!(lock(&bus).add_device(dev, Some(id)), Ok(id));
        }
        let who = |addr: u64| {
            let mut d = [0u8];
            mmio.read(addr, &mut d).then_some(d[0])
        };
        let place = |slot: u64, addr: u32| {
            mmio.write(ecam_at + (slot << 15) + 0x10, &addr.to_le_bytes());
        };
        assert_eq!((who(0xc000_0000), who(0xc001_0000)), (Some(1), Some(2)));
        // Over slot 1's BAR (refused), then away: slot 1 keeps its mapping.
        place(2, 0xc000_0000);
        assert_eq!(who(0xc000_0000), Some(1));
        place(2, 0xd000_0000);
        assert_eq!((who(0xc000_0000), who(0xd000_0000)), (Some(1), Some(2)));
        // Over ECAM (refused), then away: ECAM stays.
        place(2, ecam_at as u32);
        place(2, 0xd100_0000);
        assert!(mmio.read(ecam_at, &mut [0u8; 4]), "ECAM was unmapped");
        assert_eq!(who(0xd100_0000), Some(2));
        // Refused over slot 1, mapped as soon as slot 1 moves away.
        place(2, 0xc000_0000);
        place(1, 0xc100_0000);
        assert_eq!((who(0xc000_0000), who(0xc100_0000)), (Some(2), Some(1)));
    }

    #[test]
    fn hostile_config_accesses() {
        let (bus, _, _) = setup();
        let mut ecam = PciEcam::new(bus.clone());
        let mut d = [0u8; 4];
        ecam.read(3, &mut d); // misaligned dword
        assert_eq!(d, [0xff; 4]);
        let mut big = [0u8; 8];
        ecam.read(0, &mut big);
        assert_eq!(big, [0xff; 8]);
        ecam.write((1 << 15) + 0xffc, &[0xff; 4]); // end of extended space
        ecam.write(0x0fff_fffc, &[1, 2, 3, 4]); // bus 255
        let mut io = PciConfigIo::new(bus);
        io.write(0, &0x0000_0800u32.to_le_bytes()); // enable bit clear
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(2, &[1]); // partial address write ignored
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x800);
    }

    #[test]
    fn byte_writes_at_0xcf9_reach_the_reset_register() {
        #[derive(Default)]
        struct Reg(Vec<u8>);
        impl BusDevice for Reg {
            fn read(&mut self, _o: u64, d: &mut [u8]) {
                d.fill(0x42);
            }
            fn write(&mut self, _o: u64, d: &[u8]) {
                self.0.extend_from_slice(d);
            }
        }
        let (bus, _, _) = setup();
        let reg = Arc::new(Mutex::new(Reg::default()));
        let mut io = PciConfigIo::new(bus).with_reset_register(reg.clone());
        io.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        io.write(1, &[0x06]);
        let mut b = [0u8];
        io.read(1, &mut b);
        assert_eq!(b[0], 0x42);
        assert_eq!(reg.lock().map(|r| r.0.clone()).unwrap_or_default(), vec![6]);
        // The dword address register is untouched by the byte access.
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0800);
    }

    #[test]
    fn slots() {
        let mapper = Arc::new(RecordingMapper::default());
        let mut bus = PciBus::new(mapper);
        let dev = || -> SharedPciDevice {
            Arc::new(Mutex::new(Dev {
                config: PciConfiguration::new(PciIds::default()),
                moves: vec![],
            }))
        };
        assert_eq!(
            bus.add_device(dev(), Some(0)),
            Err(PciBusError::SlotTaken(0))
        );
        assert_eq!(bus.add_device(dev(), Some(5)), Ok(5));
        assert_eq!(
            bus.add_device(dev(), Some(5)),
            Err(PciBusError::SlotTaken(5))
        );
        for _ in 0..30 {
            assert!(bus.add_device(dev(), None).is_ok());
        }
        assert_eq!(bus.add_device(dev(), None), Err(PciBusError::NoFreeSlot));
    }
}
