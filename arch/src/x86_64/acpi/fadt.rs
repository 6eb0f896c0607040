//! FADT (signature `FACP`): a hardware-reduced ACPI 6.5 machine with no FACS.

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{aml_bytes, layout, GED_ISA_IRQ, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// FADT minor version of ACPI 6.5 (the major version, 6, is the header revision).
const FADT_MINOR_VERSION: u8 = 5;

/// IAPC_BOOT_ARCH bit: "VGA Not Present".
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH bit: "PCIe ASPM Controls" (OSPM must not enable ASPM).
const IAPC_BOOT_ARCH_NO_ASPM: u16 = 1 << 4;

/// SCI_INT. Hardware-reduced ACPI has no SCI and the spec says the field is ignored, but Linux
/// still compares every MADT interrupt source override's source IRQ with it (to find "the SCI
/// override"). Left at 0, the IRQ0 -> GSI2 override would be taken for the SCI and reprogrammed
/// level/active-low, so it names the GED line, whose override (IRQ9, level, active high) is exactly
/// what an SCI override looks like.
const SCI_INT: u8 = GED_ISA_IRQ;

/// A byte-wide register in system I/O space.
fn io_port_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// Builds the FADT pointing at the DSDT at `dsdt_addr` (through `X_DSDT` only).
pub(super) fn build(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .preferred_pm_profile(PmProfile::Unspecified)
        .flag(Flags::HwReducedAcpi)
        // KVM executes WBINVD correctly.
        .flag(Flags::Wbinvd)
        // Power and sleep buttons are not fixed hardware: the power button is PNP0C0C behind the
        // GED, and there is no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        // No RTC wake status in fixed hardware (there is no fixed hardware).
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    fadt.fadt_minor_version = FADT_MINOR_VERSION;
    fadt.sci_int = u16::from(SCI_INT).into();
    // The CMOS RTC at 0x70 exists ("CMOS RTC Not Present" stays clear) and so does MSI. The
    // 8042 flag stays clear: only its reset line is emulated, so the i8042 driver must not probe.
    // "Legacy devices" stays clear: COM1 and the RTC are enumerated through the DSDT.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_NO_ASPM).into();
    fadt.reset_reg = io_port_byte(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_byte(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_byte(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"NIMBUS\0\0").into();
    aml_bytes(&fadt.finalize())
}
