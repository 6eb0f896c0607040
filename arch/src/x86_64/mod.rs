//! x86_64 machine description: layout, CPU setup, boot protocols and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod cpuid;
pub mod layout;
pub mod memmap;
pub mod topology;
