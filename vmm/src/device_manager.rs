//! The one registry of a VM instance's devices: every virtio-pci device by id, with its PCI
//! address and resources. `vm.info`'s device tree, `vm.counters`, pause/resume (and later
//! hotplug and snapshots) read it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use virtio_devices::pause::PauseError;
use virtio_devices::transport::{DeviceControl, VirtioPciDevice, BAR0_SIZE};
use virtio_devices::VirtioDevice;

use crate::board::DeviceKind;
use crate::pci_devices::{PciDevices, PciError};

/// A PCI address `segment:bus:device.function`, written as Cloud Hypervisor writes it
/// (`0000:00:03.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBdf {
    /// Segment.
    pub segment: u16,
    /// Bus.
    pub bus: u8,
    /// Device (slot).
    pub device: u8,
    /// Function.
    pub function: u8,
}

impl std::fmt::Display for PciBdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

/// A device on the PCI bus.
#[derive(Debug)]
struct PciEntry {
    id: String,
    kind: DeviceKind,
    bdf: PciBdf,
    device: Arc<Mutex<VirtioPciDevice>>,
    /// The GSIs of its MSI-X vectors: the first and how many.
    msi_gsis: (u32, u32),
}

impl PciEntry {
    fn lock(&self) -> MutexGuard<'_, VirtioPciDevice> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One node of `vm.info`'s `device_tree` (Cloud Hypervisor's `DeviceNode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceNode {
    /// The node's id.
    pub id: String,
    /// What it holds.
    pub resources: Vec<Resource>,
    /// The node it hangs off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Nodes hanging off it.
    pub children: Vec<String>,
    /// Its PCI address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// A resource of a device node (Cloud Hypervisor's `Resource`, externally tagged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Resource {
    /// Message-signalled interrupts: `size` GSIs from `base`.
    MsiIrq {
        /// `PciMsix`.
        ty: &'static str,
        /// First GSI.
        base: u32,
        /// How many.
        size: u32,
    },
    /// A PCI BAR where it decodes now.
    PciBar {
        /// BAR index.
        index: usize,
        /// Guest physical address.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// `Mmio32` or `Mmio64`.
        type_: &'static str,
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// Where a device's activation or reset request goes: the VMM's command loop, which calls
/// [`DeviceManager::run_pending`] with the device's id.
pub type DeviceRequests = Arc<dyn Fn(&str) + Send + Sync>;

/// One device's way to the command loop.
struct Requester {
    id: String,
    requests: DeviceRequests,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester").field("id", &self.id).finish()
    }
}

impl DeviceControl for Requester {
    fn pending(&self) {
        (self.requests)(&self.id);
    }
}

/// The devices of one VM instance.
pub struct DeviceManager {
    pci: PciDevices,
    devices: Vec<PciEntry>,
    /// Platform devices present (`__serial`, ...), for the device tree.
    platform: Vec<&'static str>,
    requests: DeviceRequests,
    /// Set while the VM is paused: requests wait in `deferred` until the resume.
    paused: bool,
    deferred: Vec<String>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("devices", &self.devices)
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl DeviceManager {
    /// A registry over the PCI bus `pci`; devices' activation and reset requests go to
    /// `requests`.
    pub fn new(pci: PciDevices, requests: DeviceRequests) -> Self {
        Self {
            pci,
            devices: Vec::new(),
            platform: vec!["__ioapic"],
            requests,
            paused: false,
            deferred: Vec::new(),
        }
    }

    /// Runs the activation or reset device `id` asked for (on the command loop's thread, so
    /// the threads it starts are filtered as device threads, not vCPU threads); while the VM
    /// is paused, after the resume.
    pub fn run_pending(&mut self, id: &str) {
        if self.paused {
            if !self.deferred.iter().any(|d| d == id) {
                self.deferred.push(id.to_string());
            }
            return;
        }
        if let Some(d) = self.devices.iter().find(|d| d.id == id) {
            d.lock().run_pending();
        }
    }

    /// Records a platform device for the device tree.
    pub fn add_platform(&mut self, id: &'static str) {
        self.platform.push(id);
    }

    /// Puts virtio device `device` of `kind` with `id` on the bus of PCI segment `segment`, in
    /// `slot` if given; `backend` says how it is served, for the log. Returns its address.
    pub fn add_virtio(
        &mut self,
        id: &str,
        kind: DeviceKind,
        (segment, slot): (u16, Option<u8>),
        backend: &str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<PciBdf, PciError> {
        let control = Arc::new(Requester {
            id: id.to_string(),
            requests: self.requests.clone(),
        });
        let added = self.pci.add_virtio(id, device, (segment, slot), control)?;
        let bdf = PciBdf {
            segment,
            bus: 0,
            device: added.slot,
            function: 0,
        };
        log::info!("{id}: virtio-{kind:?} at {bdf}, {backend}");
        self.devices.push(PciEntry {
            id: id.to_string(),
            kind,
            bdf,
            device: added.device,
            msi_gsis: added.msi_gsis,
        });
        Ok(bdf)
    }

    /// Takes the device in `slot` of PCI segment `segment` off its bus and out of the registry
    /// (hot removal, once the guest ejected it) and returns its id. As the device goes, its
    /// threads are joined and its interrupts, notification addresses and BAR space released.
    pub fn remove_at(&mut self, segment: u16, slot: u8) -> Option<String> {
        let i = self
            .devices
            .iter()
            .position(|d| d.bdf.segment == segment && d.bdf.device == slot)?;
        let entry = self.devices.remove(i);
        self.pci.remove(segment, slot);
        entry.lock().release_notifications();
        self.deferred.retain(|d| *d != entry.id);
        let PciEntry { id, device, .. } = entry;
        // The registry held the last reference (the bus's and the BAR ranges' went above).
        drop(device);
        log::info!("{id}: removed from {segment:04x}:00:{slot:02x}.0");
        Some(id)
    }

    /// Takes `size` bytes aligned to `align` from PCI segment `segment`'s 64-bit window (a
    /// pmem region).
    pub fn allocate_device_area(&mut self, segment: u16, size: u64, align: u64) -> Option<u64> {
        self.pci.allocate_mmio64(segment, size, align)
    }

    /// Gives back a range [`DeviceManager::allocate_device_area`] handed out.
    pub fn free_device_area(&mut self, segment: u16, addr: u64) {
        self.pci.free_mmio64(segment, addr);
    }

    /// The id of the device in `slot` of PCI segment `segment`.
    pub fn id_at(&self, segment: u16, slot: u8) -> Option<&str> {
        self.devices
            .iter()
            .find(|d| d.bdf.segment == segment && d.bdf.device == slot)
            .map(|d| d.id.as_str())
    }

    /// The address of device `id`.
    pub fn bdf(&self, id: &str) -> Option<PciBdf> {
        self.devices.iter().find(|d| d.id == id).map(|d| d.bdf)
    }

    /// Parks every device's threads; on failure the ones already parked go on again.
    pub fn pause(&mut self) -> Result<(), PauseError> {
        for (i, d) in self.devices.iter().enumerate() {
            if let Err(e) = d.lock().pause() {
                for done in &self.devices[..i] {
                    done.lock().resume();
                }
                return Err(e);
            }
        }
        self.paused = true;
        Ok(())
    }

    /// Lets every device's threads go on, then runs what devices asked for meanwhile.
    pub fn resume(&mut self) {
        for d in &self.devices {
            d.lock().resume();
        }
        self.paused = false;
        for id in std::mem::take(&mut self.deferred) {
            self.run_pending(&id);
        }
    }

    /// Tells every device that guest memory gained regions (hot-added RAM).
    pub fn memory_changed(&mut self) {
        for d in &self.devices {
            d.lock().memory_changed();
        }
    }

    /// `vm.counters`: the devices that keep counters, by id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        self.devices
            .iter()
            .filter_map(|d| {
                let counters = d.lock().counters();
                (!counters.is_empty()).then(|| (d.id.clone(), counters.into_iter().collect()))
            })
            .collect()
    }

    /// `vm.info`'s device tree: each virtio device under a `_virtio-pci-<id>` node holding
    /// its BAR and address, as Cloud Hypervisor shows it.
    pub fn device_tree(&self) -> BTreeMap<String, DeviceNode> {
        let mut tree = BTreeMap::new();
        for id in &self.platform {
            tree.insert(
                id.to_string(),
                DeviceNode {
                    id: id.to_string(),
                    resources: Vec::new(),
                    parent: None,
                    children: Vec::new(),
                    pci_bdf: None,
                },
            );
        }
        for d in &self.devices {
            let wrapper = format!("_virtio-pci-{}", d.id);
            let bar = d.lock().bar0().map(|base| Resource::PciBar {
                index: 0,
                base,
                size: BAR0_SIZE,
                type_: if base + BAR0_SIZE <= 1 << 32 {
                    "Mmio32"
                } else {
                    "Mmio64"
                },
                prefetchable: false,
            });
            let (base, size) = d.msi_gsis;
            let msi = Resource::MsiIrq {
                ty: "PciMsix",
                base,
                size,
            };
            let resources = bar.into_iter().chain([msi]).collect();
            tree.insert(
                d.id.clone(),
                DeviceNode {
                    id: d.id.clone(),
                    resources: Vec::new(),
                    parent: Some(wrapper.clone()),
                    children: Vec::new(),
                    pci_bdf: None,
                },
            );
            tree.insert(
                wrapper.clone(),
                DeviceNode {
                    id: wrapper,
                    resources,
                    parent: None,
                    children: vec![d.id.clone()],
                    pci_bdf: Some(d.bdf.to_string()),
                },
            );
        }
        tree
    }

    /// The kinds and ids of the devices, in slot order (for logs and tests).
    pub fn ids(&self) -> Vec<(DeviceKind, &str)> {
        self.devices
            .iter()
            .map(|d| (d.kind, d.id.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdfs_are_written_as_cloud_hypervisor_writes_them() {
        let bdf = PciBdf {
            segment: 1,
            bus: 0,
            device: 0x1f,
            function: 0,
        };
        assert_eq!(bdf.to_string(), "0001:00:1f.0");
    }

    #[test]
    fn device_nodes_serialize_in_cloud_hypervisors_shape() {
        let node = DeviceNode {
            id: "_virtio-pci-_disk0".into(),
            resources: vec![
                Resource::PciBar {
                    index: 0,
                    base: 0xc000_0000,
                    size: 0x8000,
                    type_: "Mmio32",
                    prefetchable: false,
                },
                Resource::MsiIrq {
                    ty: "PciMsix",
                    base: 24,
                    size: 2,
                },
            ],
            parent: None,
            children: vec!["_disk0".into()],
            pci_bdf: Some("0000:00:02.0".into()),
        };
        assert_eq!(
            serde_json::to_string(&node).expect("json"),
            r#"{"id":"_virtio-pci-_disk0","resources":[{"PciBar":{"index":0,"base":3221225472,"size":32768,"type_":"Mmio32","prefetchable":false}},{"MsiIrq":{"ty":"PciMsix","base":24,"size":2}}],"children":["_disk0"],"pci_bdf":"0000:00:02.0"}"#
        );
    }
}
