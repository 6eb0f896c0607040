//! Interrupt routing: GSIs above the IOAPIC's pins are handed out for MSI vectors, each with an
//! irqfd, and the whole routing table (legacy pins plus MSI routes) is pushed to the hypervisor
//! whenever a route changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arch::x86_64::layout::IOAPIC_PINS;
use hypervisor::{legacy_irq_routes, IrqRoute, Vm};
use pci::{MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug)]
struct Routes {
    next_gsi: u32,
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
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// `count` MSI vectors, each with its own GSI and irqfd.
    pub fn msi_vectors(self: &Arc<Self>, count: u16) -> std::io::Result<Arc<MsiIrqfdVectors>> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let first = routes.next_gsi;
        let end = first + u32::from(count);
        if end > MAX_GSI + 1 {
            return Err(std::io::Error::other(format!(
                "no GSIs left for {count} MSI vectors"
            )));
        }
        let mut vectors = Vec::with_capacity(usize::from(count));
        for gsi in first..end {
            let fd = EventFd::new(libc::EFD_NONBLOCK)?;
            self.vm
                .register_irqfd(&fd, gsi)
                .map_err(std::io::Error::other)?;
            vectors.push((gsi, fd));
        }
        routes.next_gsi = end;
        Ok(Arc::new(MsiIrqfdVectors {
            manager: self.clone(),
            vectors,
        }))
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> std::io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
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
    vectors: Vec<(u32, EventFd)>,
}

impl MsiIrqfdVectors {
    /// The GSIs of the vectors: the first and how many (they are consecutive).
    pub fn gsis(&self) -> (u32, u32) {
        let first = self.vectors.first().map_or(0, |(gsi, _)| *gsi);
        (first, self.vectors.len() as u32)
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
    }
}
