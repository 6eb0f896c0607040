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
//! 0xe000_0000 ..0xf000_0000  PCI ECAM (MCFG), 256 buses
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

/// Guest RAM ranges for `ram_size` bytes: below the 32-bit hole and, if needed, above 4 GiB.
pub fn ram_regions(ram_size: u64) -> Vec<(u64, u64)> {
    let low = ram_size.min(MEM_32BIT_HOLE_START);
    let mut regions = vec![(0, low)];
    if ram_size > low {
        regions.push((RAM_64BIT_START, ram_size - low));
    }
    regions
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_ram_sizes_saturate_instead_of_overflowing() {
        assert_eq!(pci_mmio64_start(u64::MAX - 4095), u64::MAX);
        assert_eq!(pci_mmio64_start(u64::MAX), u64::MAX);
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
