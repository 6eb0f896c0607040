//! PCI for Nimbus: type-0 configuration space with write masks, the root bus with its host
//! bridge, configuration access through 0xcf8/0xcfc and ECAM, BAR allocation and relocation,
//! and MSI-X; BARs go onto the VMM's MMIO bus through [`MmioBarMapper`].
#![deny(missing_docs)]

pub mod allocator;
pub mod bus;
pub mod configuration;
pub mod mmio;
pub mod msix;

pub use allocator::AddressAllocator;
pub use bus::{PciBus, PciBusError, PciConfigIo, PciDevice, PciEcam, SharedPciDevice};
pub use configuration::{Bar, BarKind, PciConfiguration, PciIds};
pub use mmio::{BarMapper, BarRegion, MmioBarMapper, MmioError};
pub use msix::{MsiMessage, MsiVectors, Msix};
