//! vCPUs (Cloud Hypervisor's `CpusConfig`).

use serde::{Deserialize, Serialize};

use crate::{not_yet, ConfigError};

/// Largest vCPU count: APIC IDs are 8 bits here (no x2APIC yet), 255 is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

/// How vCPUs are arranged (CH `CpuTopology`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    /// Threads per core.
    pub threads_per_core: u16,
    /// Cores per die.
    pub cores_per_die: u16,
    /// Dies per package.
    pub dies_per_package: u16,
    /// Packages (sockets).
    pub packages: u16,
}

/// Optional CPU features (CH `CpuFeatures`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuFeatures {
    /// Intel AMX (not supported yet).
    pub amx: bool,
}

/// vCPUs (CH `CpusConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpusConfig {
    /// vCPUs running at boot.
    #[serde(alias = "boot")]
    pub boot_vcpus: u8,
    /// vCPUs the VM may have (hotplug).
    #[serde(alias = "max")]
    pub max_vcpus: u8,
    /// The arrangement; Nimbus presents one package, one die, `max_vcpus` cores of one thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    /// Expose Hyper-V enlightenments (not supported yet; must stay false).
    pub kvm_hyperv: bool,
    /// Guest physical address width.
    pub max_phys_bits: u8,
    /// vCPU-to-host-CPU pinning (not supported yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<serde_json::Value>,
    /// Optional CPU features.
    pub features: CpuFeatures,
    /// Let the guest use the host's virtualization extensions (off: VMX/SVM hidden in CPUID).
    pub nested: bool,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: 46,
            affinity: None,
            features: CpuFeatures::default(),
            nested: true,
        }
    }
}

impl CpusConfig {
    /// The topology Nimbus presents for `max_vcpus`.
    pub fn presented_topology(&self) -> CpuTopology {
        CpuTopology {
            threads_per_core: 1,
            cores_per_die: u16::from(self.max_vcpus),
            dies_per_package: 1,
            packages: 1,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::Cpus(m));
        if self.boot_vcpus == 0 {
            return err("boot_vcpus must be at least 1".into());
        }
        if self.max_vcpus < self.boot_vcpus {
            return err(format!(
                "max_vcpus ({}) is below boot_vcpus ({})",
                self.max_vcpus, self.boot_vcpus
            ));
        }
        if self.max_vcpus > MAX_VCPUS {
            return err(format!(
                "max_vcpus ({}) exceeds {MAX_VCPUS}",
                self.max_vcpus
            ));
        }
        if self.kvm_hyperv {
            return Err(not_yet("cpus.kvm_hyperv"));
        }
        if self.features.amx {
            return Err(not_yet("cpus.features.amx"));
        }
        if self.affinity.as_ref().is_some_and(|a| !a.is_null()) {
            return Err(not_yet("cpus.affinity"));
        }
        if let Some(t) = self.topology {
            let presented = self.presented_topology();
            if t != presented {
                return err(format!(
                    "topology {}:{}:{}:{} is not supported yet: Nimbus presents {}:{}:{}:{} \
                     (threads_per_core:cores_per_die:dies_per_package:packages)",
                    t.threads_per_core,
                    t.cores_per_die,
                    t.dies_per_package,
                    t.packages,
                    presented.threads_per_core,
                    presented.cores_per_die,
                    presented.dies_per_package,
                    presented.packages
                ));
            }
        }
        Ok(())
    }
}
