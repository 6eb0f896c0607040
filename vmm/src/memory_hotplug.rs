//! ACPI memory hotplug (`--memory hotplug_method=acpi,hotplug_size=..`, then `vm.resize
//! desired_ram`): RAM grows by whole 128 MiB blocks into the space kept free above boot RAM.
//!
//! Each growth is mapped like boot RAM ([`memory::create_ram_region`]), registered with the
//! hypervisor as a new memory slot, added to the guest memory every device reads through (the
//! [`GuestMemoryAtomic`](virtio_devices::GuestMemoryAtomic)'s contents are replaced, and
//! vhost-user backends get the new memory table), then described in a free slot of the
//! register block ([`devices::memory_hotplug`]) before the GED tells the guest. Shrinking is
//! not supported.

use std::sync::{Arc, Mutex};

use arch::x86_64::layout;
use vm_config::{HotplugMethod, MemoryConfig};

use crate::memory::{self, GuestMemoryMmap, MemoryError};

/// The first hypervisor memory slot of hot-added RAM (boot RAM has slots from 0, pmem from
/// [`crate::pmem::FIRST_SLOT`]).
pub const FIRST_SLOT: u32 = 16;

const _: () = assert!(
    FIRST_SLOT + 2 * layout::MEMORY_HOTPLUG_SLOTS as u32 <= crate::pmem::FIRST_SLOT,
    "hot-added RAM's memory slots must stay below pmem's"
);

/// Why RAM cannot grow to the size asked for.
#[derive(Debug, thiserror::Error)]
pub enum MemoryHotplugError {
    /// The VM was not started with `hotplug_method=acpi` and a `hotplug_size`.
    #[error(
        "desired_ram needs memory hotplug, which is off: start the VM with --memory \
         hotplug_method=acpi,hotplug_size=SIZE"
    )]
    Disabled,
    /// Shrinking RAM.
    #[error("desired_ram {desired} is below the current RAM size {current}: RAM cannot shrink (only grow) with hotplug_method=acpi")]
    Shrink {
        /// Asked for.
        desired: u64,
        /// RAM now.
        current: u64,
    },
    /// The growth is not a multiple of 128 MiB.
    #[error("desired_ram {desired} adds {growth} bytes to the current {current}: RAM grows by multiples of 128 MiB")]
    Unaligned {
        /// Asked for.
        desired: u64,
        /// RAM now.
        current: u64,
        /// The difference.
        growth: u64,
    },
    /// Beyond `size + hotplug_size`.
    #[error("desired_ram {desired} is above the RAM size at boot plus hotplug_size ({limit})")]
    TooLarge {
        /// Asked for.
        desired: u64,
        /// The most RAM this VM instance can have.
        limit: u64,
    },
    /// The register block's slots are all taken.
    #[error(transparent)]
    Slots(#[from] devices::memory_hotplug::MemoryHotplugError),
    /// Mapping or registering the RAM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The new region does not fit the guest memory (overlap).
    #[error("cannot add the RAM at {addr:#x} to guest memory")]
    Insert {
        /// Its guest address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
}

/// The memory hotplug state of one VM instance.
#[derive(Debug)]
pub struct MemoryHotplug {
    /// The configuration RAM was made with (backing, huge pages, ...).
    config: MemoryConfig,
    /// RAM now, in bytes.
    current: u64,
    /// Where the next hot-added RAM goes, counted as `layout::ram_range` counts.
    next: u64,
    /// The most RAM this instance can have: boot RAM plus `hotplug_size`.
    limit: u64,
    /// The next hypervisor memory slot.
    next_slot: u32,
    /// The register block the guest reads.
    registers: Arc<Mutex<devices::memory_hotplug::MemoryHotplug>>,
}

/// RAM just added: what [`MemoryHotplug::grow`] hands back for the devices and the guest.
#[derive(Debug)]
pub struct Grown {
    /// Guest memory with the new regions.
    pub memory: GuestMemoryMmap,
    /// `(guest address, length)` of each new region.
    pub ranges: Vec<(u64, u64)>,
}

impl MemoryHotplug {
    /// The state for a VM built with `config`, if it hot-adds RAM through ACPI: its register
    /// block is `layout::MEMORY_HOTPLUG_SLOTS` slots, all empty.
    pub fn new(config: &MemoryConfig) -> Option<Self> {
        let hotplug_size = config.hotplug_size.filter(|&h| h > 0)?;
        if config.hotplug_method != HotplugMethod::Acpi {
            return None;
        }
        Some(Self {
            config: config.clone(),
            current: config.size,
            next: layout::hotplug_ram_start(config.size),
            limit: config.size.saturating_add(hotplug_size),
            next_slot: FIRST_SLOT,
            registers: Arc::new(Mutex::new(devices::memory_hotplug::MemoryHotplug::new(
                layout::MEMORY_HOTPLUG_SLOTS,
            ))),
        })
    }

    /// The register block, to put on the I/O bus at `layout::MEMORY_HOTPLUG_PORT`.
    pub fn registers(&self) -> Arc<Mutex<devices::memory_hotplug::MemoryHotplug>> {
        self.registers.clone()
    }

    /// RAM now, in bytes.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Checks that RAM can grow to `desired` bytes; returns the guest ranges the growth
    /// takes (empty when `desired` is the current size).
    pub fn plan(&self, desired: u64) -> Result<Vec<(u64, u64)>, MemoryHotplugError> {
        check(self.current, self.limit, desired)?;
        let growth = desired - self.current;
        let ranges = layout::ram_range(self.next, self.next + growth);
        let free = self
            .registers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free_slots();
        if ranges.len() > free {
            return Err(
                devices::memory_hotplug::MemoryHotplugError::NoFreeSlot(usize::from(
                    layout::MEMORY_HOTPLUG_SLOTS,
                ))
                .into(),
            );
        }
        Ok(ranges)
    }

    /// Grows RAM to `desired` bytes: maps the new ranges, registers them with `hv_vm` and
    /// returns `memory` with them added. The guest is not told yet ([`MemoryHotplug::announce`]).
    pub fn grow(
        &mut self,
        hv_vm: &dyn hypervisor::Vm,
        memory: &GuestMemoryMmap,
        desired: u64,
    ) -> Result<Grown, MemoryHotplugError> {
        let ranges = self.plan(desired)?;
        let mut grown = memory.clone();
        let first_slot = self.next_slot;
        for &(addr, size) in &ranges {
            if let Err(e) = self.add_range(hv_vm, &mut grown, addr, size) {
                // The slots registered so far map regions that are about to be dropped.
                for slot in first_slot..self.next_slot {
                    if let Err(e) = hv_vm.unmap_memory(slot) {
                        log::error!("cannot delete memory slot {slot}: {e}");
                    }
                }
                self.next_slot = first_slot;
                return Err(e);
            }
        }
        self.next += desired - self.current;
        self.current = desired;
        Ok(Grown {
            memory: grown,
            ranges,
        })
    }

    /// Maps `size` bytes for guest address `addr`, registers them as the next memory slot and
    /// adds them to `grown`.
    fn add_range(
        &mut self,
        hv_vm: &dyn hypervisor::Vm,
        grown: &mut GuestMemoryMmap,
        addr: u64,
        size: u64,
    ) -> Result<(), MemoryHotplugError> {
        let region = Arc::new(memory::create_ram_region(&self.config, addr, size)?);
        let with = grown
            .insert_region(region.clone())
            .map_err(|source| MemoryHotplugError::Insert { addr, source })?;
        let slot = self.next_slot;
        // SAFETY: the mapping is owned by `region`, which the guest memory (and so the VM)
        // keeps for as long as the slot exists; on failure the caller deletes the slot before
        // dropping the region.
        unsafe { hv_vm.map_memory(slot, addr, size, region.as_ptr(), false) }
            .map_err(|source| MemoryError::Register { slot, addr, source })?;
        self.next_slot += 1;
        *grown = with;
        log::info!("hot-added {size:#x} bytes of RAM at {addr:#x} (memory slot {slot})");
        Ok(())
    }

    /// Puts `ranges` in free slots of the register block, each enabled with its insertion
    /// pending, for the guest's next scan.
    pub fn announce(&self, ranges: &[(u64, u64)]) -> Result<(), MemoryHotplugError> {
        let mut registers = self.registers.lock().unwrap_or_else(|p| p.into_inner());
        for &(addr, size) in ranges {
            let slot = registers.insert(addr, size)?;
            log::debug!("memory hotplug slot {slot}: {size:#x} bytes at {addr:#x}");
        }
        Ok(())
    }
}

/// Checks a `desired` RAM size against RAM now (`current`) and the most RAM possible
/// (`limit`), as Cloud Hypervisor does for ACPI hotplug (the growth in 128 MiB multiples).
pub fn check(current: u64, limit: u64, desired: u64) -> Result<(), MemoryHotplugError> {
    if desired < current {
        return Err(MemoryHotplugError::Shrink { desired, current });
    }
    let growth = desired - current;
    if !growth.is_multiple_of(layout::HOTPLUG_RAM_ALIGN) {
        return Err(MemoryHotplugError::Unaligned {
            desired,
            current,
            growth,
        });
    }
    if desired > limit {
        return Err(MemoryHotplugError::TooLarge { desired, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn growth_is_checked_as_cloud_hypervisor_checks_it() {
        assert!(check(128 * MIB, 640 * MIB, 128 * MIB).is_ok());
        assert!(check(128 * MIB, 640 * MIB, 256 * MIB).is_ok());
        assert!(check(128 * MIB, 640 * MIB, 640 * MIB).is_ok());
        assert!(matches!(
            check(256 * MIB, 640 * MIB, 128 * MIB),
            Err(MemoryHotplugError::Shrink { .. })
        ));
        assert!(matches!(
            check(128 * MIB, 640 * MIB, 200 * MIB),
            Err(MemoryHotplugError::Unaligned { growth, .. }) if growth == 72 * MIB
        ));
        assert!(matches!(
            check(128 * MIB, 640 * MIB, 768 * MIB),
            Err(MemoryHotplugError::TooLarge { .. })
        ));
    }

    #[test]
    fn plans_follow_the_layout_and_the_free_slots() {
        let config = MemoryConfig {
            size: 200 * MIB,
            hotplug_size: Some(4 << 30),
            ..MemoryConfig::default()
        };
        let hp = MemoryHotplug::new(&config).expect("acpi hotplug");
        // Hot-added RAM starts on a 128 MiB boundary above boot RAM.
        assert_eq!(
            hp.plan(328 * MIB).expect("plan"),
            vec![(256 * MIB, 128 * MIB)]
        );
        assert_eq!(hp.plan(200 * MIB).expect("no growth"), vec![]);
        // Across the 32-bit hole: two ranges, two slots.
        let ranges = hp.plan(200 * MIB + (3 << 30)).expect("plan");
        assert_eq!(
            ranges,
            vec![
                (256 * MIB, (3 << 30) - 256 * MIB),
                (layout::RAM_64BIT_START, 256 * MIB)
            ]
        );
        for _ in 0..layout::MEMORY_HOTPLUG_SLOTS {
            hp.announce(&[(0, 1)]).ok();
        }
        assert!(matches!(
            hp.plan(328 * MIB),
            Err(MemoryHotplugError::Slots(_))
        ));
        let off = MemoryConfig {
            hotplug_size: None,
            ..config
        };
        assert!(MemoryHotplug::new(&off).is_none());
    }
}
