//! Guest RAM (Cloud Hypervisor's `MemoryConfig`).

use serde::{Deserialize, Serialize};

use crate::{not_yet, size, ConfigError};

/// How RAM is added to a running VM (CH `HotplugMethod`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    /// ACPI memory devices.
    #[default]
    #[serde(alias = "acpi")]
    Acpi,
    /// A virtio-mem device.
    #[serde(alias = "virtio-mem")]
    VirtioMem,
}

/// Guest RAM (CH `MemoryConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryConfig {
    /// RAM size in bytes (CLI accepts K/M/G suffixes).
    #[serde(deserialize_with = "size::deserialize")]
    pub size: u64,
    /// Ask the kernel to merge identical pages (KSM).
    pub mergeable: bool,
    /// How RAM is hot-added.
    pub hotplug_method: HotplugMethod,
    /// Guest physical address space kept free above RAM for RAM added later, in bytes (the
    /// 64-bit PCI window starts above it).
    #[serde(
        deserialize_with = "size::deserialize_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplug_size: Option<u64>,
    /// RAM already hot-added (a restore or migration detail; not supported yet).
    #[serde(
        deserialize_with = "size::deserialize_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplugged_size: Option<u64>,
    /// Back RAM with shared memory (memfd), needed by vhost-user backends.
    pub shared: bool,
    /// Back RAM with huge pages.
    pub hugepages: bool,
    /// Huge page size in bytes, when `hugepages` is on.
    #[serde(
        deserialize_with = "size::deserialize_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hugepage_size: Option<u64>,
    /// Touch all RAM at start.
    pub prefault: bool,
    /// Memory zones (not supported yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zones: Option<serde_json::Value>,
    /// Allow transparent huge pages on RAM.
    pub thp: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            zones: None,
            thp: true,
        }
    }
}

/// Smallest RAM accepted: room for the low-memory boot structures and a kernel at 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;

impl MemoryConfig {
    /// RAM plus the space kept for hot-added RAM: where guest RAM may reach. The hot-added
    /// RAM starts on a 128 MiB boundary (`layout::hotplug_ram_start`).
    pub fn reserved_size(&self) -> u64 {
        match self.hotplug_size {
            Some(h) if h > 0 => {
                arch::x86_64::layout::hotplug_ram_start(self.size).saturating_add(h)
            }
            _ => self.size,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::Memory(m));
        if self.size < MIN_MEMORY {
            return err(format!(
                "size {} is below the minimum of {} MiB",
                self.size,
                MIN_MEMORY >> 20
            ));
        }
        if !self.size.is_multiple_of(4096) {
            return err(format!("size {} is not a multiple of 4 KiB", self.size));
        }
        if self
            .hotplug_size
            .is_some_and(|h| !h.is_multiple_of(2 << 20))
        {
            return err("hotplug_size must be a multiple of 2 MiB".into());
        }
        if self.hotplug_method == HotplugMethod::VirtioMem {
            // Nimbus has no virtio-mem device: the space would be reserved for nothing.
            return Err(not_yet("memory.hotplug_method VirtioMem (virtio-mem)"));
        }
        if self.hotplugged_size.is_some_and(|h| h != 0) {
            return Err(not_yet("memory.hotplugged_size"));
        }
        if self.zones.as_ref().is_some_and(|z| !z.is_null()) {
            return Err(not_yet("memory.zones"));
        }
        if let Some(h) = self.hugepage_size {
            if !self.hugepages {
                return err("hugepage_size needs hugepages=on".into());
            }
            if !h.is_power_of_two() || h < 4096 {
                return err(format!("hugepage_size {h} is not a power of two"));
            }
        }
        Ok(())
    }
}
