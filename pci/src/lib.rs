//! PCI: configuration space, root bus, ECAM, BARs, MSI-X.
#![deny(missing_docs)]
