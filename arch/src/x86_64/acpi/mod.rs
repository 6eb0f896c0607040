//! ACPI tables of a Nimbus x86_64 guest: RSDP, XSDT, FADT, DSDT, MADT and MCFG.
//!
//! The machine is *hardware-reduced* ACPI (FADT flag `HW_REDUCED_ACPI`): there are no PM1 or GPE
//! register blocks and no SCI. Instead
//! - power off is a write of `SLP_TYP << 2 | SLP_EN (0x20)` to the sleep control register at
//!   [`layout::ACPI_SLEEP_CONTROL_PORT`] (with `SLP_TYP` = [`layout::ACPI_S5_SLP_TYP`] from `\_S5_`);
//! - reset is a write of [`layout::ACPI_RESET_VALUE`] to [`layout::ACPI_RESET_PORT`];
//! - the power button is an ACPI Generic Event Device (`ACPI0013`) on GSI
//!   [`layout::ACPI_GED_GSI`] whose `_EVT` reads the 32-bit event register at
//!   [`layout::ACPI_GED_PORT`] and notifies `\_SB_.PWRB` when bit 0
//!   ([`GED_EVENT_POWER_BUTTON`]) is set, and calls `\_SB_.PHPR.PSCN` when bit 1
//!   ([`GED_EVENT_PCI_HOTPLUG`]) is set;
//! - PCI hotplug is ACPI hotplug (Linux `acpiphp`): the 16-byte register block at
//!   [`layout::PCI_HOTPLUG_PORT`] reports added and removed slots per segment to `\_SB_.PHPR`,
//!   which notifies the slot devices `\_SB_.PCIn.Sxx`; their `_EJ0` writes back to it;
//! - CPU hotplug: the 16-byte register block at [`layout::CPU_HOTPLUG_PORT`] gives every
//!   processor's status to `\_SB_.CPHP` (bit 2 of the GED, [`GED_EVENT_CPU_HOTPLUG`], makes it
//!   notify inserted and to-be-removed processors); the processors' `_STA`, `_MAT` and `_EJ0`
//!   go through it;
//! - memory hotplug is ACPI memory devices (Linux `acpi_memhotplug`): the register block at
//!   [`layout::MEMORY_HOTPLUG_PORT`] describes each slot of hot-added RAM to `\_SB_.MHPC`,
//!   which the GED calls when bit 3 ([`GED_EVENT_MEMORY_HOTPLUG`]) is set.
//!
//! All tables live in `layout::ACPI_START..layout::ACPI_END`, the RSDP first. [`build_tables`]
//! lays them out and serializes them; [`create_acpi_tables`] writes that output to guest memory.

mod dsdt;
mod fadt;
mod madt;
mod memory_hotplug;
#[cfg(test)]
mod tests;

use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::layout;
use super::topology::Topology;

/// OEM ID in every table header and in the RSDP.
pub const OEM_ID: [u8; 6] = *b"NIMBUS";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"NIMBUSVM";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;

/// Bit of the GED event register ([`layout::ACPI_GED_PORT`]) that reports a power button press.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Bit of the GED event register that asks the guest to rescan the PCI hotplug slots: `_EVT`
/// then calls `\_SB_.PHPR.PSCN`. Must equal `devices::acpi::GedEvent::PciHotplug` (arch cannot
/// depend on devices; the two are kept in step by hand).
pub const GED_EVENT_PCI_HOTPLUG: u32 = 1 << 1;
/// Bit of the GED event register that asks the guest to look at the CPUs: `_EVT` then calls
/// `\_SB_.CPHP.CSCN`. Must equal `devices::acpi::GedEvent::CpuHotplug`.
pub const GED_EVENT_CPU_HOTPLUG: u32 = 1 << 2;
/// Bit of the GED event register that reports hot-added RAM: `_EVT` then calls
/// `\_SB_.MHPC.MSCN`. Must equal `devices::acpi::GedEvent::MemoryHotplug`.
pub const GED_EVENT_MEMORY_HOTPLUG: u32 = 1 << 3;

/// ISA IRQ of the GED line, identity-mapped to GSI [`layout::ACPI_GED_GSI`].
const GED_ISA_IRQ: u8 = {
    assert!(layout::ACPI_GED_GSI < 16, "the GED GSI must be an ISA IRQ");
    layout::ACPI_GED_GSI as u8
};

/// Every table starts on this boundary (the RSDP needs 16 bytes).
const TABLE_ALIGN: u64 = 16;
const _: () = assert!(
    layout::ACPI_START & (TABLE_ALIGN - 1) == 0,
    "the RSDP must be 16-byte aligned"
);

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs (local APICs) enabled at boot: the first `boot_cpus` of the topology.
    pub boot_cpus: u8,
    /// vCPUs present; `boot_cpus..max_cpus` are listed online-capable but not enabled.
    pub max_cpus: u8,
    /// How the vCPUs are arranged, which gives their APIC IDs; `None`: one package of
    /// `max_cpus` single-thread cores (APIC ID = vCPU index).
    pub topology: Option<Topology>,
    /// The PCI segments, segment `i` at index `i`: one MCFG entry and one host bridge each
    /// (a window of size 0 is left out of its `_CRS`).
    pub pci_segments: Vec<layout::PciSegmentLayout>,
    /// ACPI memory devices for hot-added RAM (`PNP0C80`, with the controller `\_SB_.MHPC`);
    /// 0 leaves memory hotplug out of the DSDT.
    pub memory_hotplug_slots: u8,
}

/// Errors from building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// `boot_cpus` was 0.
    #[error("ACPI tables need at least one boot vCPU")]
    NoBootCpus,
    /// `boot_cpus` was larger than `max_cpus`.
    #[error("{boot} boot vCPUs exceed the maximum of {max}")]
    BootCpusAboveMax {
        /// Requested boot vCPUs.
        boot: u8,
        /// Requested maximum vCPUs.
        max: u8,
    },
    /// The topology does not hold `max_cpus` vCPUs, or gives APIC IDs above 254.
    #[error("a topology of {cpus} vCPUs with APIC IDs up to {max_apic_id} does not describe {max} vCPUs with 8-bit APIC IDs")]
    Topology {
        /// vCPUs the topology holds.
        cpus: u32,
        /// Its highest APIC ID.
        max_apic_id: u32,
        /// `max_cpus`.
        max: u8,
    },
    /// No PCI segment, more than [`layout::MAX_PCI_SEGMENTS`], or not numbered `0..n`.
    #[error(
        "PCI segments must be numbered 0 to n-1 with 1 <= n <= {}",
        layout::MAX_PCI_SEGMENTS
    )]
    PciSegments,
    /// A PCI MMIO window does not fit its descriptor (32-bit window above 4 GiB, or wrapping).
    #[error("{window} PCI MMIO window {start:#x} (size {size:#x}) does not fit its address space")]
    InvalidPciWindow {
        /// Which window: "32-bit" or "64-bit".
        window: &'static str,
        /// Window start.
        start: u64,
        /// Window size.
        size: u64,
    },
    /// A table does not fit in the ACPI area.
    #[error(
        "ACPI table {signature} ({len} bytes at {addr:#x}) overruns the ACPI area end {end:#x}"
    )]
    TableTooLarge {
        /// Signature of the table that did not fit.
        signature: String,
        /// Where it would have started.
        addr: u64,
        /// Its length in bytes.
        len: usize,
        /// End of the ACPI area.
        end: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("cannot write ACPI table {signature} to guest memory at {addr:#x}")]
    GuestMemoryWrite {
        /// Signature of the table being written.
        signature: String,
        /// Guest physical address of the table.
        addr: u64,
        /// What guest memory reported.
        #[source]
        source: GuestMemoryError,
    },
}

/// One serialized table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// Table signature; the root pointer (signature `"RSD PTR "`) is listed as `"RSDP"`.
    pub signature: [u8; 4],
    /// Guest physical address of the table.
    pub addr: GuestAddress,
    /// Table bytes, checksums filled in.
    pub bytes: Vec<u8>,
}

impl AcpiConfig {
    /// Checks the vCPU counts; the builders rely on them. (The DSDT checks the PCI windows.)
    fn validate(&self) -> Result<(), AcpiError> {
        if self.boot_cpus == 0 {
            return Err(AcpiError::NoBootCpus);
        }
        if self.boot_cpus > self.max_cpus {
            return Err(AcpiError::BootCpusAboveMax {
                boot: self.boot_cpus,
                max: self.max_cpus,
            });
        }
        let t = self.topology();
        if t.cpus() != u32::from(self.max_cpus) || t.max_apic_id() > 254 {
            return Err(AcpiError::Topology {
                cpus: t.cpus(),
                max_apic_id: t.max_apic_id(),
                max: self.max_cpus,
            });
        }
        let numbered = (0u16..)
            .zip(&self.pci_segments)
            .all(|(i, s)| s.segment == i);
        if self.pci_segments.is_empty()
            || self.pci_segments.len() > usize::from(layout::MAX_PCI_SEGMENTS)
            || !numbered
        {
            return Err(AcpiError::PciSegments);
        }
        Ok(())
    }

    /// The topology the tables describe.
    pub fn topology(&self) -> Topology {
        self.topology
            .unwrap_or_else(|| Topology::flat(u16::from(self.max_cpus)))
    }

    /// The APIC ID of vCPU `index` (validated: at most 254).
    pub(crate) fn apic_id(&self, index: u8) -> u8 {
        u8::try_from(self.topology().apic_id(u32::from(index))).unwrap_or(u8::MAX)
    }
}

/// Last address of a non-empty window, or `None` if it wraps.
fn window_last(start: u64, size: u64) -> Option<u64> {
    start.checked_add(size.checked_sub(1)?)
}

/// Hands out consecutive, aligned addresses in the ACPI area.
struct Placer {
    next: u64,
}

impl Placer {
    fn new() -> Self {
        Placer {
            next: layout::ACPI_START,
        }
    }

    /// Reserves `len` bytes for the table `signature` and returns its address.
    fn place(&mut self, signature: &[u8], len: usize) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let too_large = || AcpiError::TableTooLarge {
            signature: String::from_utf8_lossy(signature).into_owned(),
            addr,
            len,
            end: layout::ACPI_END,
        };
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| addr.checked_add(len))
            .ok_or_else(too_large)?;
        if end > layout::ACPI_END {
            return Err(too_large());
        }
        self.next = end;
        Ok(addr)
    }
}

/// Serializes anything the `acpi_tables` crate can emit.
fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// One ECAM allocation per segment, starting at bus 0.
fn mcfg(cfg: &AcpiConfig) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for s in &cfg.pci_segments {
        mcfg.add_ecam(s.ecam.0, s.segment, 0, s.last_bus);
    }
    aml_bytes(&mcfg)
}

/// Builds every table for `cfg` and places it in `layout::ACPI_START..layout::ACPI_END`.
///
/// The first entry is the RSDP at `layout::ACPI_START`; the rest follow in address order. This is
/// the only place the tables are made: [`create_acpi_tables`] writes exactly this output.
///
/// ```
/// use arch::x86_64::acpi::{build_tables, AcpiConfig};
/// use arch::x86_64::layout;
///
/// let cfg = AcpiConfig {
///     boot_cpus: 2,
///     max_cpus: 4,
///     topology: None,
///     pci_segments: layout::pci_segments(1 << 30, &[(1, 1), (1, 1)]).unwrap(),
///     memory_hotplug_slots: 0,
/// };
/// let tables = build_tables(&cfg).unwrap();
/// assert_eq!(&tables[0].bytes[..8], b"RSD PTR ");
/// assert_eq!(tables[0].addr.0, layout::ACPI_START);
/// ```
pub fn build_tables(cfg: &AcpiConfig) -> Result<Vec<AcpiTable>, AcpiError> {
    cfg.validate()?;

    // Tables that point at others come after them, so every length is known when placed.
    let dsdt = dsdt::build(cfg)?;
    let madt = madt::build(cfg);
    let mcfg = mcfg(cfg);

    let mut placer = Placer::new();
    let rsdp_addr = placer.place(b"RSDP", Rsdp::len())?;
    let dsdt_addr = placer.place(b"DSDT", dsdt.len())?;
    let fadt = fadt::build(dsdt_addr);
    let fadt_addr = placer.place(b"FACP", fadt.len())?;
    let madt_addr = placer.place(b"APIC", madt.len())?;
    let mcfg_addr = placer.place(b"MCFG", mcfg.len())?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt = aml_bytes(&xsdt);
    let xsdt_addr = placer.place(b"XSDT", xsdt.len())?;
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let table = |signature: &[u8; 4], addr, bytes| AcpiTable {
        signature: *signature,
        addr: GuestAddress(addr),
        bytes,
    };
    Ok(vec![
        table(b"RSDP", rsdp_addr, rsdp),
        table(b"DSDT", dsdt_addr, dsdt),
        table(b"FACP", fadt_addr, fadt),
        table(b"APIC", madt_addr, madt),
        table(b"MCFG", mcfg_addr, mcfg),
        table(b"XSDT", xsdt_addr, xsdt),
    ])
}

/// Writes RSDP, XSDT, FADT, DSDT, MADT and MCFG into guest memory at
/// `layout::ACPI_START..layout::ACPI_END` and returns the RSDP's guest address (for the PVH start
/// info `rsdp_paddr`).
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(cfg)?;
    for table in &tables {
        mem.write_slice(&table.bytes, table.addr)
            .map_err(|source| AcpiError::GuestMemoryWrite {
                signature: String::from_utf8_lossy(&table.signature).into_owned(),
                addr: table.addr.0,
                source,
            })?;
    }
    // build_tables puts the RSDP first, at layout::ACPI_START.
    Ok(GuestAddress(layout::ACPI_START))
}
