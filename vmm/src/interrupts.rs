//! Interrupt routing: GSIs above the IOAPIC's pins are handed out for MSI vectors, each with an
//! irqfd, and the whole routing table (legacy pins plus MSI routes) is pushed to the hypervisor
//! whenever a route changes. A device's GSIs go back to the pool when its vectors are dropped
//! (a hot-removed device), so add/remove cycles do not run out of them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arch::x86_64::layout::IOAPIC_PINS;
use hypervisor::{legacy_irq_routes, IrqRoute, Vm};
use pci::{AddressAllocator, MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug)]
struct Routes {
    /// The GSIs not handed out (consecutive ranges, one per device).
    free: AddressAllocator,
    msi: BTreeMap<u32, MsiMessage>,
}

/// Owns the VM's GSI routing table.
#[derive(Debug)]
pub struct InterruptManager {
    vm: Arc<dyn Vm>,
    routes: Mutex<Routes>,
}

/// Largest GSI number handed out (KVM's default routing table limit is 4096 entries).
const MAX_GSI: u32 = 4095;

impl InterruptManager {
    /// A manager for `vm`; MSI GSIs start after the IOAPIC's pins.
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        Self {
            vm,
            routes: Mutex::new(Routes {
                free: AddressAllocator::new(
                    u64::from(IOAPIC_PINS),
                    u64::from(MAX_GSI + 1 - IOAPIC_PINS),
                ),
                msi: BTreeMap::new(),
            }),
        }
    }

    /// `count` MSI vectors, each with its own GSI and irqfd.
    pub fn msi_vectors(self: &Arc<Self>, count: u16) -> std::io::Result<Arc<MsiIrqfdVectors>> {
        let no_gsis = || std::io::Error::other(format!("no GSIs left for {count} MSI vectors"));
        let first = self
            .lock()
            .free
            .allocate_aligned(u64::from(count), 1)
            .ok_or_else(no_gsis)?;
        // Below MAX_GSI + 1, so it fits.
        let first = first as u32;
        let mut vectors = MsiIrqfdVectors {
            manager: self.clone(),
            first,
            vectors: Vec::with_capacity(usize::from(count)),
        };
        for gsi in first..first + u32::from(count) {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            self.vm
                .register_irqfd(&fd, gsi)
                .map_err(std::io::Error::other)?;
            vectors.vectors.push((gsi, fd));
        }
        Ok(Arc::new(vectors))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> std::io::Result<()> {
        let mut routes = self.lock();
        let changed = match msg {
            Some(m) => routes.msi.insert(gsi, m) != Some(m),
            None => routes.msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let mut table = legacy_irq_routes(IOAPIC_PINS);
        table.extend(routes.msi.iter().map(|(&gsi, m)| IrqRoute::Msi {
            gsi,
            address: m.address,
            data: m.data,
        }));
        self.vm
            .set_gsi_routing(&table)
            .map_err(std::io::Error::other)
    }
}

/// A device's MSI-X vectors: vector `v` is GSI `first + v`, signalled through its irqfd.
#[derive(Debug)]
pub struct MsiIrqfdVectors {
    manager: Arc<InterruptManager>,
    /// The first GSI of the range taken (given back on drop).
    first: u32,
    vectors: Vec<(u32, EventFd)>,
}

impl MsiIrqfdVectors {
    /// The GSIs of the vectors: the first and how many (they are consecutive).
    pub fn gsis(&self) -> (u32, u32) {
        (self.first, self.vectors.len() as u32)
    }
}

impl MsiVectors for MsiIrqfdVectors {
    fn update(&self, vector: u16, msg: MsiMessage, enabled: bool) -> std::io::Result<()> {
        let Some((gsi, _)) = self.vectors.get(usize::from(vector)) else {
            return Ok(());
        };
        self.manager.set_route(*gsi, enabled.then_some(msg))
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((_, fd)) => fd.write(1),
            None => Ok(()),
        }
    }
}

impl Drop for MsiIrqfdVectors {
    fn drop(&mut self) {
        for (gsi, fd) in &self.vectors {
            let _ = self.manager.set_route(*gsi, None);
            let _ = self.manager.vm.unregister_irqfd(fd, *gsi);
        }
        self.manager.lock().free.free(u64::from(self.first));
    }
}
