//! The firmware memory map (E820 types), shared by the PVH start info and the Linux zero page.

use super::layout::{pci_ecam, ram_regions, EBDA_START, HIGH_RAM_START, MAX_PCI_SEGMENTS};

/// Kind of a memory map entry, with E820 numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryKind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the OS must not use it.
    Reserved = 2,
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

/// The memory map of a guest with `ram_size` bytes of RAM, sorted by address: RAM below the EBDA,
/// the reserved legacy hole (which holds the ACPI tables), RAM from 1 MiB, RAM above 4 GiB, and the
/// reserved ECAM area of each of the `pci_segments` segments, 1 to [`MAX_PCI_SEGMENTS`] (Linux
/// only trusts an MCFG entry when its area is reserved).
pub fn memory_map(ram_size: u64, pci_segments: u16) -> Vec<MemoryMapEntry> {
    let mut map = Vec::with_capacity(5 + usize::from(pci_segments));
    for (start, size) in ram_regions(ram_size) {
        let end = start + size;
        if start == 0 {
            map.push(MemoryMapEntry {
                addr: 0,
                size: EBDA_START.min(end),
                kind: MemoryKind::Ram,
            });
            map.push(MemoryMapEntry {
                addr: EBDA_START,
                size: HIGH_RAM_START - EBDA_START,
                kind: MemoryKind::Reserved,
            });
            if end > HIGH_RAM_START {
                map.push(MemoryMapEntry {
                    addr: HIGH_RAM_START,
                    size: end - HIGH_RAM_START,
                    kind: MemoryKind::Ram,
                });
            }
        } else {
            map.push(MemoryMapEntry {
                addr: start,
                size,
                kind: MemoryKind::Ram,
            });
        }
    }
    for segment in 0..pci_segments.clamp(1, MAX_PCI_SEGMENTS) {
        let ((addr, size), _) = pci_ecam(segment);
        map.push(MemoryMapEntry {
            addr,
            size,
            kind: MemoryKind::Reserved,
        });
    }
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[MemoryMapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn ram_adds_up_minus_the_legacy_hole() {
        for size in [128u64 << 20, 3 << 30, 3584 << 20, 8 << 30] {
            let map = memory_map(size, 3);
            assert_eq!(
                ram_total(&map),
                size - (HIGH_RAM_START - EBDA_START),
                "size {size:#x}"
            );
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "overlap in {map:?}");
            }
            let reserved = |addr| {
                map.iter()
                    .any(|e| e.addr == addr && e.kind == MemoryKind::Reserved)
            };
            assert!(reserved(0xe000_0000) && reserved(0xf000_0000) && reserved(0xf010_0000));
            assert!(!reserved(0xf020_0000), "{map:?}");
        }
    }
}
