//! The Nimbus VMM: the command loop and its API, the VM lifecycle, devices, vCPU threads,
//! guest memory.
#![deny(missing_docs)]

pub mod api;
pub mod board;
pub mod cli;
pub mod console_relay;
pub mod control;
pub mod controller;
pub mod device_manager;
pub mod events;
pub mod fds;
pub mod interrupts;
pub mod landlock;
pub mod memory;
pub mod memory_hotplug;
pub mod pci_devices;
pub mod pmem;
pub mod seccomp;
pub mod serial_input;
pub mod vcpu;
pub mod vcpus;
pub mod vm;
