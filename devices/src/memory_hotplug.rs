//! ACPI memory hotplug registers: the device side of the DSDT's `\_SB_.MHPC` and its memory
//! devices `\_SB_.Mnnn` (`PNP0C80`, Linux `acpi_memhotplug`).
//!
//! The VMM maps new RAM into the guest, records it in a free slot ([`MemoryHotplug::insert`]:
//! enabled, insert pending) and raises the GED's `MemoryHotplug` event. The guest's `_EVT` runs
//! `\_SB_.MHPC.MSCN`, which selects every slot in turn and, for a slot with an insert pending,
//! notifies its memory device ("device check") and acknowledges the insertion. The guest then
//! evaluates the device's `_STA` (enabled) and `_CRS` (base and length, read from here).
//!
//! A block of 24 bytes; the guest's AML uses aligned 32-bit accesses, but any access is handled
//! byte by byte, as if the block were memory:
//!
//! ```text
//! 0x00 MSEL  read/write: the selected slot (values beyond the last slot select nothing)
//! 0x04 MSTS  read: bit 0 enabled, bit 1 insert pending (of the selected slot);
//!            write: 1 in bit 1 acknowledges the insertion (write-1-to-clear)
//! 0x08 MBAS  read: guest physical base of the selected slot's RAM (64-bit)
//! 0x10 MLEN  read: its length in bytes (64-bit)
//! ```
//!
//! Everything reads 0 and ignores writes when no existing slot is selected.

use crate::BusDevice;

/// Offset of `MSEL`, the slot selector.
pub const MSEL_OFFSET: u64 = 0x0;
/// Offset of `MSTS`, the selected slot's status.
pub const MSTS_OFFSET: u64 = 0x4;
/// Offset of `MBAS`, the selected slot's base (64-bit).
pub const MBAS_OFFSET: u64 = 0x8;
/// Offset of `MLEN`, the selected slot's length (64-bit).
pub const MLEN_OFFSET: u64 = 0x10;
/// Size of the register block in bytes (`layout::MEMORY_HOTPLUG_PORT_LEN` in arch).
pub const REGISTER_BLOCK_LEN: u64 = 0x18;
/// `MSTS` bit: the slot holds RAM.
pub const STATUS_ENABLED: u8 = 1 << 0;
/// `MSTS` bit: the slot's RAM was inserted and the guest has not acknowledged it yet.
pub const STATUS_INSERTING: u8 = 1 << 1;

/// One slot: a range of hot-added RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    base: u64,
    length: u64,
    enabled: bool,
    inserting: bool,
}

impl Slot {
    fn status(&self) -> u8 {
        (if self.enabled { STATUS_ENABLED } else { 0 })
            | if self.inserting { STATUS_INSERTING } else { 0 }
    }
}

/// Errors recording hot-added RAM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryHotplugError {
    /// Every slot holds RAM already.
    #[error("no free memory hotplug slot (all {0} hold hot-added RAM)")]
    NoFreeSlot(usize),
}

/// The memory hotplug register block.
#[derive(Debug)]
pub struct MemoryHotplug {
    slots: Vec<Slot>,
    selected: u32,
}

impl MemoryHotplug {
    /// Registers for `slots` slots, all empty, slot 0 selected.
    pub fn new(slots: u8) -> Self {
        Self {
            slots: vec![Slot::default(); usize::from(slots)],
            selected: 0,
        }
    }

    /// Slots that hold no RAM yet.
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| !s.enabled).count()
    }

    /// Records `length` bytes of RAM at guest physical `base` in the first free slot, enabled
    /// and with its insertion pending; the guest's next scan notifies it. Returns the slot.
    pub fn insert(&mut self, base: u64, length: u64) -> Result<usize, MemoryHotplugError> {
        let count = self.slots.len();
        let (n, slot) = self
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| !s.enabled)
            .ok_or(MemoryHotplugError::NoFreeSlot(count))?;
        *slot = Slot {
            base,
            length,
            enabled: true,
            inserting: true,
        };
        Ok(n)
    }

    fn selected(&self) -> Option<&Slot> {
        usize::try_from(self.selected)
            .ok()
            .and_then(|i| self.slots.get(i))
    }

    /// The byte at `offset` of the block as the guest reads it.
    fn read_byte(&self, offset: u64) -> u8 {
        let byte = |value: u64, at: u64| (value >> ((offset - at) * 8)) as u8;
        match offset {
            MSEL_OFFSET..MSTS_OFFSET => byte(u64::from(self.selected), MSEL_OFFSET),
            MSTS_OFFSET..MBAS_OFFSET => self
                .selected()
                .map_or(0, |s| byte(u64::from(s.status()), MSTS_OFFSET)),
            MBAS_OFFSET..MLEN_OFFSET => self.selected().map_or(0, |s| byte(s.base, MBAS_OFFSET)),
            MLEN_OFFSET..REGISTER_BLOCK_LEN => {
                self.selected().map_or(0, |s| byte(s.length, MLEN_OFFSET))
            }
            _ => 0,
        }
    }

    /// The guest writes `value` to the byte at `offset` of the block.
    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            MSEL_OFFSET..MSTS_OFFSET => {
                let shift = (offset - MSEL_OFFSET) * 8;
                self.selected = (self.selected & !(0xff << shift)) | (u32::from(value) << shift);
            }
            MSTS_OFFSET => {
                let selected = usize::try_from(self.selected).ok();
                if let Some(slot) = selected.and_then(|i| self.slots.get_mut(i)) {
                    if value & STATUS_INSERTING != 0 {
                        slot.inserting = false;
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MemoryHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .map_or(0, |at| self.read_byte(at));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(at) = u64::try_from(i).ok().and_then(|i| offset.checked_add(i)) {
                self.write_byte(at, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(d: &mut MemoryHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn read64(d: &mut MemoryHotplug, offset: u64) -> u64 {
        let lo = u64::from(read32(d, offset));
        let hi = u64::from(read32(d, offset + 4));
        lo | hi << 32
    }

    fn write32(d: &mut MemoryHotplug, offset: u64, value: u32) {
        d.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn an_inserted_range_is_read_through_the_selector_and_acknowledged() {
        let mut d = MemoryHotplug::new(8);
        assert_eq!(d.free_slots(), 8);
        assert_eq!(d.insert(0x800_0000, 0x800_0000), Ok(0));
        assert_eq!(d.insert(0x1_0000_0000, 0x1000_0000), Ok(1));
        assert_eq!(d.free_slots(), 6);
        write32(&mut d, MSEL_OFFSET, 1);
        assert_eq!(read32(&mut d, MSEL_OFFSET), 1);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0b11);
        assert_eq!(read64(&mut d, MBAS_OFFSET), 0x1_0000_0000);
        assert_eq!(read64(&mut d, MLEN_OFFSET), 0x1000_0000);
        // Writing 0 or the enabled bit changes nothing; bit 1 acknowledges.
        write32(&mut d, MSTS_OFFSET, 0b01);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0b11);
        write32(&mut d, MSTS_OFFSET, 0b10);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0b01);
        // Slot 0 still pending; an empty slot reads 0.
        write32(&mut d, MSEL_OFFSET, 0);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0b11);
        assert_eq!(read64(&mut d, MBAS_OFFSET), 0x800_0000);
        write32(&mut d, MSEL_OFFSET, 2);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0);
        assert_eq!(read64(&mut d, MLEN_OFFSET), 0);
    }

    #[test]
    fn slots_run_out() {
        let mut d = MemoryHotplug::new(2);
        d.insert(0, 1).expect("slot 0");
        d.insert(1, 1).expect("slot 1");
        assert_eq!(d.insert(2, 1), Err(MemoryHotplugError::NoFreeSlot(2)));
    }

    #[test]
    fn byte_accesses_and_64_bit_reads_see_the_same_registers() {
        let mut d = MemoryHotplug::new(4);
        d.insert(0x1234_5678_9abc_d000, 0x8000_0000).expect("slot");
        let mut all = [0u8; REGISTER_BLOCK_LEN as usize];
        d.read(0, &mut all);
        assert_eq!(&all[8..16], &0x1234_5678_9abc_d000u64.to_le_bytes());
        assert_eq!(&all[16..24], &0x8000_0000u64.to_le_bytes());
        let mut b = [0u8; 1];
        d.read(MBAS_OFFSET + 7, &mut b);
        assert_eq!(b[0], 0x12);
        let mut q = [0u8; 8];
        d.read(MBAS_OFFSET, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1234_5678_9abc_d000);
        // The selector is written byte by byte too.
        d.write(MSEL_OFFSET + 1, &[1]);
        assert_eq!(read32(&mut d, MSEL_OFFSET), 0x100);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0);
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let mut d = MemoryHotplug::new(8);
        d.insert(0x800_0000, 0x800_0000).expect("slot");
        // Selecting slots that do not exist, huge offsets, writes to read-only registers.
        for sel in [8u32, 255, u32::MAX] {
            write32(&mut d, MSEL_OFFSET, sel);
            assert_eq!(read32(&mut d, MSTS_OFFSET), 0);
            assert_eq!(read64(&mut d, MBAS_OFFSET), 0);
            write32(&mut d, MSTS_OFFSET, u32::MAX);
        }
        d.write(MBAS_OFFSET, &[0xff; 16]);
        d.write(u64::MAX - 1, &[0xff; 8]);
        let mut b = [0xaau8; 8];
        d.read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0; 8]);
        d.read(REGISTER_BLOCK_LEN, &mut b);
        assert_eq!(b, [0; 8]);
        d.read(0, &mut []);
        // Slot 0 is unchanged.
        write32(&mut d, MSEL_OFFSET, 0);
        assert_eq!(read32(&mut d, MSTS_OFFSET), 0b11);
        assert_eq!(read64(&mut d, MBAS_OFFSET), 0x800_0000);
        assert_eq!(read64(&mut d, MLEN_OFFSET), 0x800_0000);
    }
}
