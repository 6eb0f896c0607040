//! PCI for Nimbus: type-0 configuration space with write masks, the root bus with its host
//! bridge, configuration access through 0xcf8/0xcfc and ECAM, BAR allocation and relocation,
//! and MSI-X.
#![deny(missing_docs)]

pub mod allocator;
pub mod bus;
pub mod configuration;
pub mod msix;

pub use allocator::AddressAllocator;
pub use bus::{BarMapper, PciBus, PciBusError, PciConfigIo, PciDevice, PciEcam, SharedPciDevice};
pub use configuration::{Bar, BarKind, PciConfiguration, PciIds};
pub use msix::{MsiMessage, MsiVectors, Msix};
