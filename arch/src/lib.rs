//! Architecture facts and builders for Nimbus guests: the physical address map, vCPU boot
//! state, boot protocols (PVH, bzImage) and firmware tables (ACPI).
#![deny(missing_docs)]

pub mod x86_64;
