//! MADT (signature `APIC`): local APICs, the IOAPIC, ISA interrupt overrides and LINT1 NMI.

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::{layout, AcpiConfig, GED_ISA_IRQ, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// MADT revision of ACPI 6.3+; from revision 5 on, the LAPIC "Online Capable" flag is defined.
const MADT_REVISION: u8 = 5;
/// Fixed part of the MADT: header, local APIC address, flags.
const MADT_HEADER_LEN: u32 = 44;
/// Offset of the local interrupt controller address in the MADT.
const LAPIC_ADDRESS_OFFSET: usize = 36;
/// Offset of the MADT flags.
const FLAGS_OFFSET: usize = 40;

/// MADT flag PCAT_COMPAT: "the system also has a PC-AT-compatible dual-8259 setup".
///
/// Set, because it is true: KVM's full in-kernel irqchip includes the two 8259s (masked once the
/// guest uses the IOAPIC). Linux in hardware-reduced mode bypasses the legacy PIC either way; a
/// guest that looks at the flag only learns that probing the 8259 is safe.
const MADT_FLAG_PCAT_COMPAT: u32 = 1 << 0;

const LAPIC_ADDRESS: u32 = {
    assert!(layout::LAPIC_START <= u32::MAX as u64);
    layout::LAPIC_START as u32
};
const IOAPIC_ADDRESS: u32 = {
    assert!(layout::IOAPIC_START <= u32::MAX as u64);
    layout::IOAPIC_START as u32
};

/// MADT interrupt structure type of an Interrupt Source Override.
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// MADT interrupt structure type of a Local APIC NMI.
const TYPE_LOCAL_APIC_NMI: u8 = 4;

/// MPS INTI flags: polarity "active high" (bits 1:0 = 01).
const INTI_ACTIVE_HIGH: u16 = 0b01;
/// MPS INTI flags: trigger mode "level" (bits 3:2 = 11).
const INTI_LEVEL: u16 = 0b11 << 2;

/// ISA IRQ of the PC-AT timer (8254 PIT).
const PIT_IRQ: u8 = 0;
/// IOAPIC pin (GSI) the timer is wired to on PC-compatible machines.
const PIT_GSI: u32 = 2;

/// "All processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// MADT Interrupt Source Override: ISA IRQ `source` is GSI `gsi` with the given MPS INTI flags.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    /// 0 = ISA.
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl InterruptSourceOverride {
    fn isa(source: u8, gsi: u32, flags: u16) -> Self {
        InterruptSourceOverride {
            kind: TYPE_INTERRUPT_SOURCE_OVERRIDE,
            length: size_of_u8::<Self>(),
            bus: 0,
            source,
            gsi: gsi.into(),
            flags: flags.into(),
        }
    }
}

/// MADT Local APIC NMI: which LINT pin of which processor(s) is wired to NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl LocalApicNmi {
    fn new(processor_uid: u8, flags: u16, lint: u8) -> Self {
        LocalApicNmi {
            kind: TYPE_LOCAL_APIC_NMI,
            length: size_of_u8::<Self>(),
            processor_uid,
            flags: flags.into(),
            lint,
        }
    }
}

/// Size of a small MADT structure as its one-byte length field.
const fn size_of_u8<T>() -> u8 {
    let size = std::mem::size_of::<T>();
    assert!(size <= u8::MAX as usize);
    size as u8
}

/// IOAPIC ID: the first ID after the highest local APIC ID, so the two never collide.
fn ioapic_id(cfg: &AcpiConfig) -> u8 {
    cfg.apic_id(cfg.max_cpus - 1).wrapping_add(1)
}

/// The Processor Local APIC entry of vCPU `cpu` (processor UID = `cpu`): enabled, or
/// online-capable (may be enabled later, by CPU hotplug). The DSDT's processor `_MAT` returns
/// the same bytes.
pub(super) fn local_apic(cfg: &AcpiConfig, cpu: u8, enabled: bool) -> Vec<u8> {
    let status = if enabled {
        EnabledStatus::Enabled
    } else {
        EnabledStatus::DisabledOnlineCapable
    };
    ProcessorLocalApic::new(cpu, cfg.apic_id(cpu), status)
        .as_bytes()
        .to_vec()
}

/// Builds the MADT. `cfg` must be validated (`boot_cpus <= max_cpus`).
pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(LAPIC_ADDRESS_OFFSET, LAPIC_ADDRESS);
    madt.write_u32(FLAGS_OFFSET, MADT_FLAG_PCAT_COMPAT);

    let mut body = Vec::new();
    // ACPI processor UID = vCPU index (the DSDT's CPU devices use the same UIDs); APIC IDs
    // follow the topology.
    for cpu in 0..cfg.max_cpus {
        body.extend_from_slice(&local_apic(cfg, cpu, cpu < cfg.boot_cpus));
    }
    body.extend_from_slice(IoApic::new(ioapic_id(cfg), IOAPIC_ADDRESS, 0).as_bytes());
    // The PC-AT timer (IRQ0) is wired to IOAPIC pin 2, edge / active high (flags 0 = bus default).
    body.extend_from_slice(InterruptSourceOverride::isa(PIT_IRQ, PIT_GSI, 0).as_bytes());
    // The GED's IRQ is level, active high (the ISA default would be edge, active high).
    body.extend_from_slice(
        InterruptSourceOverride::isa(
            GED_ISA_IRQ,
            layout::ACPI_GED_GSI,
            INTI_LEVEL | INTI_ACTIVE_HIGH,
        )
        .as_bytes(),
    );
    // LINT1 of every processor is NMI, flags 0 = conforms to the bus (edge, active high).
    body.extend_from_slice(LocalApicNmi::new(ALL_PROCESSORS, 0, 1).as_bytes());
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}
