//! The guest physical address map of a Nimbus x86_64 machine.
//!
//! ```text
//! 0x0000_0000 ..0x0009_fc00  RAM (usable)
//!   0x0000_0500               boot GDT (used to seed segment caches)
//!   0x0000_6000               PVH hvm_start_info, then module list
//!   0x0000_7000               PVH memory map
//!   0x0002_0000               kernel command line (up to 64 KiB)
//! 0x0009_fc00 ..0x0010_0000  reserved: EBDA and the legacy hole
//!   0x000a_0000               ACPI tables (RSDP first)
//! 0x0010_0000 ..low_top      RAM (usable); kernel at 1 MiB, initramfs at the top
//! 0xc000_0000 ..0xe000_0000  32-bit PCI MMIO window
//! 0xe000_0000 ..0xf000_0000  PCI ECAM of segment 0 (MCFG), 256 buses
//! 0xf000_0000 ..0xf0f0_0000  PCI ECAM of segments 1..=15, one bus (1 MiB) each
//! 0xfec0_0000                IOAPIC
//! 0xfee0_0000                local APIC
//! 0x1_0000_0000..            RAM above 4 GiB (when RAM > 3 GiB)
//! after high RAM (1 GiB aligned) 64-bit PCI MMIO window
//! ```

/// Boot GDT written into guest memory so the segment caches match a real table.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the PVH `hvm_start_info` structure is written.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH module list (the initramfs) follows the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Where the PVH memory map is written.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Room for PVH memory map entries (24 bytes each).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted, including the NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the reserved EBDA / legacy BIOS hole.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where the ACPI tables start (RSDP first).
pub const ACPI_START: u64 = 0xa_0000;
/// End of the ACPI table area.
pub const ACPI_END: u64 = 0xf_0000;
/// Start of RAM above the legacy hole; kernels load here.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit hole that holds MMIO below 4 GiB.
pub const MEM_32BIT_HOLE_START: u64 = 0xc000_0000;
/// 32-bit PCI MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window (256 buses x 32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// The most PCI segments (host bridges) a VM may have.
pub const MAX_PCI_SEGMENTS: u16 = 16;
/// ECAM of segment 1; segment `s` ≥ 1 has one bus at `PCI_ECAM_EXTRA_START + (s - 1) MiB`.
pub const PCI_ECAM_EXTRA_START: u64 = 0xf000_0000;
/// ECAM size of one bus (32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_BUS_SIZE: u64 = 1 << 20;
/// Alignment (and granularity) of each segment's share of the PCI MMIO windows.
pub const PCI_SEGMENT_WINDOW_ALIGN: u64 = 1 << 20;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// First address above 4 GiB, where RAM beyond the 32-bit hole continues.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI MMIO window placed after high RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// Alignment of the 64-bit PCI MMIO window.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;

/// I/O port of the COM1 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// Interrupt line (ISA IRQ / GSI) of COM1.
pub const COM1_GSI: u32 = 4;
/// CMOS RTC index/data ports (0x70, 0x71).
pub const CMOS_PORT: u16 = 0x70;
/// i8042 command/status port; 0xfe written here resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Boot progress (POST) debug port.
pub const DEBUG_PORT: u16 = 0x80;
/// ACPI hardware-reduced sleep control register (FADT SLEEP_CONTROL_REG), 1 byte.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI hardware-reduced sleep status register (FADT SLEEP_STATUS_REG), 1 byte.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI GED event register (4 bytes MMIO-free: an I/O port block), read by the GED's `_EVT`.
pub const ACPI_GED_PORT: u16 = 0x608;
/// ACPI PCI hotplug register block (I/O ports), 32-bit registers read and written by the DSDT's
/// `\_SB_.PHPR` (see `devices::pci_hotplug`): 0x0 PCIU (slots added, read-to-clear), 0x4 PCID
/// (slots to eject, read-to-clear), 0x8 B0EJ (slots the guest ejected, write-only), 0xc PSEG
/// (the segment the other registers address).
pub const PCI_HOTPLUG_PORT: u16 = 0x610;
/// Length in bytes of the PCI hotplug register block at [`PCI_HOTPLUG_PORT`].
pub const PCI_HOTPLUG_PORT_LEN: u64 = 16;
/// ACPI CPU hotplug register block (I/O ports), 32-bit registers read and written by the DSDT's
/// `\_SB_.CPHP` (see `devices::cpu_hotplug`): 0x0 CSEL (the CPU the next register addresses),
/// 0x4 CSTA (its status: enabled, insert pending, remove pending; written to acknowledge events
/// and to eject), 0x8 CCNT (number of CPUs).
pub const CPU_HOTPLUG_PORT: u16 = 0x620;
/// Length in bytes of the CPU hotplug register block at [`CPU_HOTPLUG_PORT`].
pub const CPU_HOTPLUG_PORT_LEN: u64 = 16;
/// ACPI memory hotplug register block (I/O ports) read and written by the DSDT's
/// `\_SB_.MHPC` (see `devices::memory_hotplug`): 0x0 slot selector, 0x4 slot status, 0x8 base
/// (64-bit), 0x10 length (64-bit).
pub const MEMORY_HOTPLUG_PORT: u16 = 0x640;
/// Length in bytes of the memory hotplug register block at [`MEMORY_HOTPLUG_PORT`].
pub const MEMORY_HOTPLUG_PORT_LEN: u64 = 0x18;
/// ACPI memory devices (`PNP0C80`) the DSDT has when memory hotplug is on: each hot-added
/// range takes one (Cloud Hypervisor also has 8).
pub const MEMORY_HOTPLUG_SLOTS: u8 = 8;
/// Granularity of hot-added RAM: Linux adds memory in blocks of 128 MiB on x86_64, so every
/// hot-added range starts and ends on this boundary.
pub const HOTPLUG_RAM_ALIGN: u64 = 128 << 20;
/// ACPI reset register (FADT RESET_REG), the classic 0xcf9; value below resets.
pub const ACPI_RESET_PORT: u16 = 0xcf9;
/// Value written to [`ACPI_RESET_PORT`] to reset (FADT RESET_VALUE).
pub const ACPI_RESET_VALUE: u8 = 0x06;
/// SLP_TYP value of the `\_S5` (soft off) object in the DSDT.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// GSI the ACPI GED (power button) interrupts on.
pub const ACPI_GED_GSI: u32 = 9;
/// Number of IOAPIC pins (GSIs) of the in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

const _: () = assert!(
    ACPI_GED_PORT + 4 <= PCI_HOTPLUG_PORT
        && PCI_HOTPLUG_PORT as u64 + PCI_HOTPLUG_PORT_LEN <= CPU_HOTPLUG_PORT as u64
        && CPU_HOTPLUG_PORT as u64 + CPU_HOTPLUG_PORT_LEN <= ACPI_RESET_PORT as u64,
    "the PCI and CPU hotplug ports must not overlap each other, the GED or the reset register"
);

const _: () = assert!(
    CPU_HOTPLUG_PORT as u64 + CPU_HOTPLUG_PORT_LEN <= MEMORY_HOTPLUG_PORT as u64
        && MEMORY_HOTPLUG_PORT as u64 + MEMORY_HOTPLUG_PORT_LEN <= ACPI_RESET_PORT as u64,
    "the memory hotplug ports must not overlap the CPU hotplug ports or the reset register"
);

/// Guest RAM ranges for `ram_size` bytes: below the 32-bit hole and, if needed, above 4 GiB.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    let low = ram_size.min(MEM_32BIT_HOLE_START);
    let mut regions = vec![(0, low)];
    if ram_size > low {
        regions.push((RAM_64BIT_START, ram_size - low));
    }
    regions
}

/// Guest physical ranges of the RAM between `from` and `to` bytes (`from <= to`): RAM is
/// numbered as [`ram_regions`] lays it out, below the 32-bit hole first, then above 4 GiB, so
/// a range may be split by the hole.
pub fn ram_range(from: u64, to: u64) -> Vec<(u64, u64)> {
    let to_phys = |offset: u64| {
        if offset < MEM_32BIT_HOLE_START {
            offset
        } else {
            RAM_64BIT_START.saturating_add(offset - MEM_32BIT_HOLE_START)
        }
    };
    let mut ranges = Vec::new();
    if from < to.min(MEM_32BIT_HOLE_START) {
        ranges.push((from, to.min(MEM_32BIT_HOLE_START) - from));
    }
    let high_from = from.max(MEM_32BIT_HOLE_START);
    if high_from < to {
        ranges.push((to_phys(high_from), to - high_from));
    }
    ranges
}

/// Where hot-added RAM starts for a guest booted with `ram_size` bytes, counted as
/// [`ram_range`] counts: the boot RAM rounded up to [`HOTPLUG_RAM_ALIGN`], so every hot-added
/// range is block aligned for the guest.
pub fn hotplug_ram_start(ram_size: u64) -> u64 {
    ram_size
        .checked_next_multiple_of(HOTPLUG_RAM_ALIGN)
        .unwrap_or(u64::MAX)
}

/// Start of the 64-bit PCI MMIO window for a guest with `ram_size` bytes of RAM.
///
/// Saturates at `u64::MAX` for sizes no address space can hold (configuration checks then
/// refuse them).
pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    let top = ram_regions(ram_size)
        .last()
        .map_or(RAM_64BIT_START, |&(start, size)| start.saturating_add(size))
        .max(RAM_64BIT_START);
    top.checked_next_multiple_of(PCI_MMIO64_ALIGN)
        .unwrap_or(u64::MAX)
}

/// Where one PCI segment lives in guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciSegmentLayout {
    /// Segment number (`_SEG`, the MCFG's segment group).
    pub segment: u16,
    /// `(start, size)` of its ECAM area; it decodes buses `0..=last_bus`.
    pub ecam: (u64, u64),
    /// Last bus its ECAM area decodes.
    pub last_bus: u8,
    /// `(start, size)` of its share of the 32-bit MMIO window.
    pub mmio32: (u64, u64),
    /// `(start, size)` of its share of the 64-bit MMIO window.
    pub mmio64: (u64, u64),
}

/// Errors laying out PCI segments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciLayoutError {
    /// Not in `1..=MAX_PCI_SEGMENTS`.
    #[error("{0} PCI segments: 1 to {MAX_PCI_SEGMENTS} are possible")]
    SegmentCount(usize),
    /// A weight of 0.
    #[error("PCI segment {segment}: an aperture weight of 0")]
    ZeroWeight {
        /// The segment.
        segment: u16,
    },
    /// The weights split a window into shares smaller than the granularity.
    #[error("{window} aperture weights add up to {total}: more than the window's {units} MiB")]
    WeightsTooLarge {
        /// `mmio32` or `mmio64`.
        window: &'static str,
        /// Their sum.
        total: u64,
        /// MiB in the window.
        units: u64,
    },
}

/// ECAM area `(start, size)` and last bus of segment `segment`: segment 0 keeps the 256-bus
/// window at [`PCI_ECAM_START`]; the others have one bus each from [`PCI_ECAM_EXTRA_START`].
pub fn pci_ecam(segment: u16) -> ((u64, u64), u8) {
    match segment {
        0 => ((PCI_ECAM_START, PCI_ECAM_SIZE), u8::MAX),
        s => (
            (
                PCI_ECAM_EXTRA_START + u64::from(s - 1) * PCI_ECAM_BUS_SIZE,
                PCI_ECAM_BUS_SIZE,
            ),
            0,
        ),
    }
}

/// Splits `(start, size)` between segments by `weights`, in segment order, each share a
/// multiple of [`PCI_SEGMENT_WINDOW_ALIGN`] and proportional to its weight.
fn split_window(
    window: &'static str,
    (start, size): (u64, u64),
    weights: &[u32],
) -> Result<Vec<(u64, u64)>, PciLayoutError> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let units = size / PCI_SEGMENT_WINDOW_ALIGN;
    if total > units {
        return Err(PciLayoutError::WeightsTooLarge {
            window,
            total,
            units,
        });
    }
    let unit = units / total.max(1) * PCI_SEGMENT_WINDOW_ALIGN;
    let mut next = start;
    Ok(weights
        .iter()
        .map(|&w| {
            let share = (next, unit * u64::from(w));
            next += share.1;
            share
        })
        .collect())
}

/// The PCI segments of a guest whose RAM (with the space kept for hot-added RAM) is
/// `reserved_ram` bytes; `weights[s]` is segment `s`'s `(mmio32, mmio64)` aperture weight.
/// With one segment it has all of both windows.
pub fn pci_segments(
    reserved_ram: u64,
    weights: &[(u32, u32)],
) -> Result<Vec<PciSegmentLayout>, PciLayoutError> {
    if weights.is_empty() || weights.len() > usize::from(MAX_PCI_SEGMENTS) {
        return Err(PciLayoutError::SegmentCount(weights.len()));
    }
    if let Some(segment) = weights.iter().position(|&(a, b)| a == 0 || b == 0) {
        return Err(PciLayoutError::ZeroWeight {
            segment: segment as u16,
        });
    }
    let w32: Vec<u32> = weights.iter().map(|w| w.0).collect();
    let w64: Vec<u32> = weights.iter().map(|w| w.1).collect();
    let mmio32 = split_window("mmio32", (PCI_MMIO32_START, PCI_MMIO32_SIZE), &w32)?;
    let mmio64_window = (pci_mmio64_start(reserved_ram), PCI_MMIO64_SIZE);
    let mmio64 = split_window("mmio64", mmio64_window, &w64)?;
    Ok((0u16..)
        .zip(mmio32.into_iter().zip(mmio64))
        .map(|(segment, (mmio32, mmio64))| {
            let (ecam, last_bus) = pci_ecam(segment);
            PciSegmentLayout {
                segment,
                ecam,
                last_bus,
                mmio32,
                mmio64,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_segment_has_both_windows_and_256_buses() {
        let s = pci_segments(128 << 20, &[(1, 1)]).expect("one");
        assert_eq!(
            s,
            vec![PciSegmentLayout {
                segment: 0,
                ecam: (PCI_ECAM_START, PCI_ECAM_SIZE),
                last_bus: 255,
                mmio32: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
                mmio64: (RAM_64BIT_START, PCI_MMIO64_SIZE),
            }]
        );
    }

    #[test]
    fn segments_split_the_windows_by_weight_without_overlap() {
        let s = pci_segments(128 << 20, &[(1, 1), (3, 1), (1, 2)]).expect("three");
        assert_eq!(s.len(), 3);
        // 512 MiB / 5 = 102 MiB per unit of weight; 64 GiB / 4 = 16 GiB.
        assert_eq!(s[0].mmio32, (0xc000_0000, 102 << 20));
        assert_eq!(s[1].mmio32, (0xc000_0000 + (102 << 20), 306 << 20));
        assert_eq!(s[2].mmio32.1, 102 << 20);
        assert_eq!(s[1].mmio64, (RAM_64BIT_START + (16 << 30), 16 << 30));
        assert_eq!(s[2].mmio64, (RAM_64BIT_START + (32 << 30), 32 << 30));
        assert_eq!(s[1].ecam, (0xf000_0000, 1 << 20));
        assert_eq!(s[2].ecam, (0xf010_0000, 1 << 20));
        assert_eq!((s[1].last_bus, s[2].last_bus), (0, 0));
        for w in s.windows(2) {
            assert!(w[0].mmio32.0 + w[0].mmio32.1 <= w[1].mmio32.0);
            assert!(w[0].mmio64.0 + w[0].mmio64.1 <= w[1].mmio64.0);
        }
        let last = pci_segments(0, &[(1, 1); 16]).expect("sixteen");
        let (start, size) = last[15].ecam;
        assert!(start + size <= IOAPIC_START);
        assert!(last[15].mmio32.0 + last[15].mmio32.1 <= PCI_ECAM_START);
    }

    #[test]
    fn bad_segment_counts_and_weights_are_errors() {
        assert_eq!(pci_segments(0, &[]), Err(PciLayoutError::SegmentCount(0)));
        assert_eq!(
            pci_segments(0, &[(1, 1); 17]),
            Err(PciLayoutError::SegmentCount(17))
        );
        assert_eq!(
            pci_segments(0, &[(1, 1), (1, 0)]),
            Err(PciLayoutError::ZeroWeight { segment: 1 })
        );
        assert!(matches!(
            pci_segments(0, &[(600, 1)]),
            Err(PciLayoutError::WeightsTooLarge {
                window: "mmio32",
                ..
            })
        ));
        assert!(pci_segments(0, &[(u32::MAX, u32::MAX); 16]).is_err());
    }

    #[test]
    fn absurd_ram_sizes_saturate_instead_of_overflowing() {
        assert_eq!(pci_mmio64_start(u64::MAX - 4095), u64::MAX);
        assert_eq!(pci_mmio64_start(u64::MAX), u64::MAX);
    }

    #[test]
    fn ram_ranges_skip_the_hole() {
        assert_eq!(
            ram_range(128 << 20, 256 << 20),
            vec![(128 << 20, 128 << 20)]
        );
        assert_eq!(ram_range(256 << 20, 256 << 20), vec![]);
        let hole = MEM_32BIT_HOLE_START;
        assert_eq!(
            ram_range(hole - (128 << 20), hole + (256 << 20)),
            vec![
                (hole - (128 << 20), 128 << 20),
                (RAM_64BIT_START, 256 << 20)
            ]
        );
        assert_eq!(
            ram_range(hole + (128 << 20), hole + (256 << 20)),
            vec![(RAM_64BIT_START + (128 << 20), 128 << 20)]
        );
        // The ranges continue ram_regions.
        let boot = ram_regions(hole + (128 << 20));
        let end = boot.last().map(|&(s, l)| s + l);
        assert_eq!(
            end,
            Some(ram_range(hole + (128 << 20), hole + (256 << 20))[0].0)
        );
        assert_eq!(hotplug_ram_start(128 << 20), 128 << 20);
        assert_eq!(hotplug_ram_start(129 << 20), 256 << 20);
    }

    #[test]
    fn small_ram_stays_below_the_hole() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(pci_mmio64_start(128 << 20), RAM_64BIT_START);
    }

    #[test]
    fn large_ram_continues_above_4g() {
        let r = ram_regions(0xe000_0000);
        assert_eq!(
            r,
            vec![(0, MEM_32BIT_HOLE_START), (RAM_64BIT_START, 0x2000_0000)]
        );
        assert_eq!(pci_mmio64_start(0xe000_0000), 0x1_4000_0000);
    }
}
