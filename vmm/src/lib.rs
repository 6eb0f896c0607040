//! The Nimbus VMM: configuration, VM lifecycle, vCPU threads, guest memory.
#![deny(missing_docs)]

pub mod cli;
pub mod control;
pub mod interrupts;
pub mod memory;
pub mod pci_devices;
pub mod serial_input;
pub mod vcpu;
pub mod vm;
