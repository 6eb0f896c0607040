//! ACPI PCI hotplug registers: the device side of the DSDT's `\_SB_.PHPR` (Linux `acpiphp`).
//!
//! The VMM records slots it has added ([`PciHotplug::slot_added`]) or wants removed
//! ([`PciHotplug::slot_removing`]) and then raises the GED's `PciHotplug` event. The guest's
//! `_EVT` runs `\_SB_.PHPR.PSCN`, which for every segment selects it in `PSEG`, reads `PCIU` and
//! `PCID` and notifies the slot devices: "device check" for added slots (the guest scans them),
//! "eject request" for removed ones. Once the guest has let go of a device it runs the slot's
//! `_EJ0`, which writes the slot's bit to `B0EJ`: only then does the VMM get the
//! [`EjectHandler`] call and may take the device away.
//!
//! Four 32-bit little-endian registers; the guest's AML uses aligned 32-bit accesses, but any
//! access is handled byte by byte, as if the block were 16 bytes of memory:
//!
//! ```text
//! 0x0 PCIU  read: slots added to the selected segment; the bits read are cleared
//! 0x4 PCID  read: slots of the selected segment to eject; the bits read are cleared
//! 0x8 B0EJ  write: slots of the selected segment the guest has ejected (reads 0)
//! 0xc PSEG  read/write: the selected segment (writes of a segment that does not exist are ignored)
//! ```
//!
//! Other offsets read 0 and ignore writes.

use std::sync::Arc;

use crate::registers::{self, DwordRegisters};
use crate::BusDevice;

/// Called with `(segment, slot)` when the guest has ejected a device: it no longer uses it and
/// the VMM may remove it.
///
/// The guest can write any bit of `B0EJ` at any time, so the handler must check that the slot
/// holds a device that is being removed (or at least a device). It runs with this device (and
/// so its bus entry) locked: it must not access the register block itself.
pub type EjectHandler = Arc<dyn Fn(u16, u8) + Send + Sync>;

/// Offset of `PCIU`, the slots-added bitmap.
pub const PCIU_OFFSET: u64 = 0x0;
/// Offset of `PCID`, the slots-to-eject bitmap.
pub const PCID_OFFSET: u64 = 0x4;
/// Offset of `B0EJ`, the slots-ejected bitmap.
pub const B0EJ_OFFSET: u64 = 0x8;
/// Offset of `PSEG`, the segment selector.
pub const PSEG_OFFSET: u64 = 0xc;
/// Size of the register block in bytes (`layout::PCI_HOTPLUG_PORT_LEN` in arch).
pub const REGISTER_BLOCK_LEN: u64 = 4 * PciHotplug::REGISTERS as u64;
/// Slots per segment (devices of bus 0); slot 0 is the host bridge and never hotplugged.
pub const SLOTS: u8 = 32;

/// Index of each register in the block (offset / 4).
const PCIU: usize = 0;
const PCID: usize = 1;
const B0EJ: usize = 2;
const PSEG: usize = 3;

/// Pending events of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SegmentSlots {
    /// Slots added since the guest last read `PCIU`.
    up: u32,
    /// Slots to eject since the guest last read `PCID`.
    down: u32,
}

/// The PCI hotplug register block, one pair of bitmaps per PCI segment.
pub struct PciHotplug {
    segments: Vec<SegmentSlots>,
    selected: u16,
    eject: EjectHandler,
}

impl std::fmt::Debug for PciHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHotplug")
            .field("segments", &self.segments)
            .field("selected", &self.selected)
            .finish_non_exhaustive()
    }
}

/// The bit of `slot` in a segment's bitmaps, if it is a hotpluggable slot (1..32).
fn slot_bit(slot: u8) -> Option<u32> {
    (1..SLOTS).contains(&slot).then(|| 1u32 << slot)
}

impl PciHotplug {
    /// Registers for `segments` PCI segments (0..segments) with nothing pending and segment 0
    /// selected; `eject` is called for every slot the guest ejects.
    pub fn new(segments: u16, eject: EjectHandler) -> Self {
        Self {
            segments: vec![SegmentSlots::default(); usize::from(segments)],
            selected: 0,
            eject,
        }
    }

    /// Records that a device was plugged into `slot` of `segment`: the guest's next scan sees
    /// the bit in `PCIU` and checks the slot. Slot 0, slots from 32 and segments that do not
    /// exist are ignored.
    pub fn slot_added(&mut self, segment: u16, slot: u8) {
        if let (Some(s), Some(bit)) = (self.segments.get_mut(usize::from(segment)), slot_bit(slot))
        {
            s.up |= bit;
        }
    }

    /// Asks the guest to eject the device in `slot` of `segment`: the guest's next scan sees the
    /// bit in `PCID`; when it is done with the device it writes `B0EJ` and the [`EjectHandler`]
    /// runs. Slot 0, slots from 32 and segments that do not exist are ignored.
    pub fn slot_removing(&mut self, segment: u16, slot: u8) {
        if let (Some(s), Some(bit)) = (self.segments.get_mut(usize::from(segment)), slot_bit(slot))
        {
            s.down |= bit;
        }
    }

    /// The currently selected segment's events, if it exists.
    fn selected_mut(&mut self) -> Option<&mut SegmentSlots> {
        self.segments.get_mut(usize::from(self.selected))
    }

    /// Reads the bits `mask` of register `register`; `PCIU` and `PCID` clear the bits read.
    fn read_register(&mut self, register: usize, mask: u32) -> u32 {
        let selected = u32::from(self.selected);
        match register {
            PCIU => self
                .selected_mut()
                .map_or(0, |s| take_bits(&mut s.up, mask)),
            PCID => self
                .selected_mut()
                .map_or(0, |s| take_bits(&mut s.down, mask)),
            PSEG => selected & mask,
            _ => 0,
        }
    }

    /// Writes the bits `mask` of register `register` (`value` has no bits outside `mask`).
    fn write_register(&mut self, register: usize, value: u32, mask: u32) {
        match register {
            PSEG => {
                let segment = (u32::from(self.selected) & !mask) | value;
                match u16::try_from(segment) {
                    Ok(segment) if usize::from(segment) < self.segments.len() => {
                        self.selected = segment;
                    }
                    _ => log::debug!("PCI hotplug: guest selected missing segment {segment}"),
                }
            }
            B0EJ if self.selected_mut().is_some() => {
                for slot in 1..SLOTS {
                    if value & (1 << slot) != 0 {
                        log::debug!(
                            "PCI hotplug: guest ejected {:04x}:00:{slot:02x}",
                            self.selected
                        );
                        (self.eject)(self.selected, slot);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Returns the bits `mask` of `bitmap` and clears them.
fn take_bits(bitmap: &mut u32, mask: u32) -> u32 {
    let bits = *bitmap & mask;
    *bitmap &= !mask;
    bits
}

impl DwordRegisters for PciHotplug {
    const REGISTERS: usize = PSEG + 1;

    fn read_register(&mut self, register: usize, mask: u32) -> u32 {
        PciHotplug::read_register(self, register, mask)
    }

    fn write_register(&mut self, register: usize, value: u32, mask: u32) {
        PciHotplug::write_register(self, register, value, mask);
    }
}

impl BusDevice for PciHotplug {
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

    /// The `(segment, slot)` pairs the eject handler was called with.
    type Ejected = Arc<Mutex<Vec<(u16, u8)>>>;

    /// A device for `segments` segments and the ejects it reported.
    fn device(segments: u16) -> (PciHotplug, Ejected) {
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let log = ejected.clone();
        let eject: EjectHandler = Arc::new(move |segment, slot| {
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((segment, slot));
        });
        (PciHotplug::new(segments, eject), ejected)
    }

    fn taken(ejected: &Mutex<Vec<(u16, u8)>>) -> Vec<(u16, u8)> {
        std::mem::take(&mut *ejected.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn read32(d: &mut PciHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(d: &mut PciHotplug, offset: u64, value: u32) {
        d.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn added_and_removed_slots_are_read_once_per_segment() {
        let (mut d, _) = device(3);
        d.slot_added(0, 1);
        d.slot_added(0, 31);
        d.slot_added(2, 5);
        d.slot_removing(2, 7);
        d.slot_removing(0, 3);

        assert_eq!(read32(&mut d, PSEG_OFFSET), 0);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 1 | 1 << 31);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 0, "cleared by the read");
        assert_eq!(read32(&mut d, PCID_OFFSET), 1 << 3);
        assert_eq!(read32(&mut d, PCID_OFFSET), 0);

        write32(&mut d, PSEG_OFFSET, 1);
        assert_eq!(read32(&mut d, PSEG_OFFSET), 1);
        assert_eq!(
            (read32(&mut d, PCIU_OFFSET), read32(&mut d, PCID_OFFSET)),
            (0, 0)
        );

        write32(&mut d, PSEG_OFFSET, 2);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 5);
        assert_eq!(read32(&mut d, PCID_OFFSET), 1 << 7);
        assert_eq!(
            (read32(&mut d, PCIU_OFFSET), read32(&mut d, PCID_OFFSET)),
            (0, 0)
        );

        // Events posted after a read are seen by the next one.
        d.slot_added(2, 5);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 5);
    }

    #[test]
    fn out_of_range_slots_and_segments_are_ignored() {
        let (mut d, _) = device(2);
        d.slot_added(2, 1);
        d.slot_added(u16::MAX, 1);
        d.slot_added(0, 0);
        d.slot_added(0, 32);
        d.slot_added(0, u8::MAX);
        d.slot_removing(5, 1);
        d.slot_removing(1, 0);
        d.slot_removing(1, 40);
        for segment in 0..2 {
            write32(&mut d, PSEG_OFFSET, segment);
            assert_eq!(read32(&mut d, PCIU_OFFSET), 0);
            assert_eq!(read32(&mut d, PCID_OFFSET), 0);
        }
    }

    #[test]
    fn ejects_go_to_the_selected_segment_and_never_to_slot_0() {
        let (mut d, ejected) = device(4);
        write32(&mut d, B0EJ_OFFSET, 1 << 4);
        assert_eq!(taken(&ejected), [(0, 4)]);
        write32(&mut d, PSEG_OFFSET, 3);
        write32(&mut d, B0EJ_OFFSET, 1 | 1 << 2 | 1 << 31);
        assert_eq!(taken(&ejected), [(3, 2), (3, 31)]);
        write32(&mut d, B0EJ_OFFSET, 1);
        write32(&mut d, B0EJ_OFFSET, 0);
        assert_eq!(taken(&ejected), []);
        assert_eq!(read32(&mut d, B0EJ_OFFSET), 0, "B0EJ reads 0");
        // Ejecting neither reads nor clears the pending bitmaps.
        d.slot_removing(3, 2);
        write32(&mut d, B0EJ_OFFSET, 1 << 2);
        assert_eq!(taken(&ejected), [(3, 2)]);
        assert_eq!(read32(&mut d, PCID_OFFSET), 1 << 2);
    }

    #[test]
    fn bad_segments_are_not_selected() {
        let (mut d, ejected) = device(2);
        write32(&mut d, PSEG_OFFSET, 1);
        for bad in [2, 16, 0x1_0001, u32::MAX] {
            write32(&mut d, PSEG_OFFSET, bad);
            assert_eq!(read32(&mut d, PSEG_OFFSET), 1, "{bad:#x}");
        }
        // Writes to the read-only registers change nothing.
        d.slot_added(1, 9);
        write32(&mut d, PCIU_OFFSET, 0);
        write32(&mut d, PCID_OFFSET, u32::MAX);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 9);
        assert_eq!(read32(&mut d, PCID_OFFSET), 0);
        assert_eq!(taken(&ejected), []);
    }

    #[test]
    fn without_segments_nothing_happens() {
        let (mut d, ejected) = device(0);
        d.slot_added(0, 1);
        d.slot_removing(0, 1);
        write32(&mut d, PSEG_OFFSET, 0);
        write32(&mut d, B0EJ_OFFSET, u32::MAX);
        assert_eq!(taken(&ejected), []);
        for offset in [PCIU_OFFSET, PCID_OFFSET, B0EJ_OFFSET, PSEG_OFFSET] {
            assert_eq!(read32(&mut d, offset), 0);
        }
    }

    #[test]
    fn narrow_reads_return_and_clear_only_their_bytes() {
        let (mut d, _) = device(1);
        d.slot_added(0, 1); // byte 0
        d.slot_added(0, 9); // byte 1
        d.slot_added(0, 30); // byte 3
        let mut byte = [0u8; 1];
        d.read(PCIU_OFFSET + 1, &mut byte);
        assert_eq!(byte, [1 << 1]);
        d.read(PCIU_OFFSET + 1, &mut byte);
        assert_eq!(byte, [0], "byte 1 was cleared");
        let mut word = [0u8; 2];
        d.read(PCIU_OFFSET + 2, &mut word);
        assert_eq!(u16::from_le_bytes(word), 1 << 14);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 1, "byte 0 was left");

        // A read straddling PCIU and PCID returns (and clears) the bytes of each it covers.
        d.slot_added(0, 31);
        d.slot_added(0, 2);
        d.slot_removing(0, 1);
        d.slot_removing(0, 17);
        let mut four = [0u8; 4];
        d.read(PCIU_OFFSET + 2, &mut four);
        assert_eq!(four, [0, 1 << 7, 1 << 1, 0]);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 2);
        assert_eq!(read32(&mut d, PCID_OFFSET), 1 << 17);

        // The segment selector byte by byte.
        let mut all = [0xaau8; 16];
        d.slot_added(0, 3);
        d.read(0, &mut all);
        assert_eq!(all, [1 << 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn narrow_writes_merge_into_the_register() {
        let (mut d, ejected) = device(0x200);
        // B0EJ byte 1: slots 8..16.
        d.write(B0EJ_OFFSET + 1, &[0b101]);
        assert_eq!(taken(&ejected), [(0, 8), (0, 10)]);
        // PSEG high byte then low byte: 0x0100, then 0x0105.
        d.write(PSEG_OFFSET + 1, &[1]);
        assert_eq!(read32(&mut d, PSEG_OFFSET), 0x100);
        d.write(PSEG_OFFSET, &[5]);
        assert_eq!(read32(&mut d, PSEG_OFFSET), 0x105);
        // A byte that would select a missing segment (0x0305) is ignored.
        d.write(PSEG_OFFSET + 1, &[3]);
        assert_eq!(read32(&mut d, PSEG_OFFSET), 0x105);
        // A write straddling B0EJ and PSEG: B0EJ byte 3 (slots 24..32), PSEG byte 0.
        d.write(B0EJ_OFFSET + 3, &[0x80, 0x07]);
        assert_eq!(taken(&ejected), [(0x105, 31)]);
        assert_eq!(read32(&mut d, PSEG_OFFSET), 0x107);
    }

    #[test]
    fn hostile_accesses_never_panic_and_unknown_offsets_read_0() {
        let (mut d, ejected) = device(2);
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
        // Only B0EJ writes ejected anything, and only slots 1..32 of existing segments.
        assert!(taken(&ejected)
            .iter()
            .all(|&(segment, slot)| segment < 2 && (1..32).contains(&slot)));
        let mut big = vec![0x55u8; 4096];
        d.read(0, &mut big);
        assert!(big[16..].iter().all(|&b| b == 0));
        d.write(0, &big);
    }
}
