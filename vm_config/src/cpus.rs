//! vCPUs (Cloud Hypervisor's `CpusConfig`).

use serde::{Deserialize, Serialize};

use crate::{not_yet, ConfigError};

/// Largest vCPU count: APIC IDs are 8 bits here (no x2APIC yet), 255 is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

/// How vCPUs are arranged (CH `CpuTopology`). On the command line:
/// `topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

/// The JSON form of [`CpuTopology`].
#[derive(Deserialize)]
#[serde(remote = "CpuTopology")]
struct CpuTopologyObject {
    threads_per_core: u16,
    cores_per_die: u16,
    dies_per_package: u16,
    packages: u16,
}

impl CpuTopology {
    /// The arrangement for `arch` (APIC IDs, CPUID, MADT).
    pub fn arch(&self) -> arch::x86_64::topology::Topology {
        arch::x86_64::topology::Topology {
            threads_per_core: self.threads_per_core,
            cores_per_die: self.cores_per_die,
            dies_per_package: self.dies_per_package,
            packages: self.packages,
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let numbers: Option<Vec<u16>> = parts.iter().map(|p| p.trim().parse().ok()).collect();
        match numbers.as_deref() {
            Some(&[threads_per_core, cores_per_die, dies_per_package, packages]) => Ok(Self {
                threads_per_core,
                cores_per_die,
                dies_per_package,
                packages,
            }),
            _ => Err(format!(
                "'{s}' is not threads_per_core:cores_per_die:dies_per_package:packages \
                 (four numbers from 1 to 65535, such as 2:2:1:1)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for CpuTopology {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CpuTopology;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a topology: t:c:d:p or {threads_per_core, cores_per_die, ...}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<CpuTopology, E> {
                CpuTopology::parse(s).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<CpuTopology, A::Error> {
                CpuTopologyObject::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        // A struct to JSON (an object) and to the probes that list fields; the command line's
        // values come to `visit_str`.
        d.deserialize_struct(
            "CpuTopology",
            &[
                "threads_per_core",
                "cores_per_die",
                "dies_per_package",
                "packages",
            ],
            V,
        )
    }
}

/// Optional CPU features (CH `CpuFeatures`). On the command line: `features=amx` or
/// `features=[amx]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuFeatures {
    /// Intel AMX (not supported yet).
    pub amx: bool,
}

/// The JSON form of [`CpuFeatures`].
#[derive(Deserialize)]
#[serde(remote = "CpuFeatures")]
struct CpuFeaturesObject {
    #[serde(default)]
    amx: bool,
}

impl<'de> Deserialize<'de> for CpuFeatures {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = CpuFeatures;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CPU features: amx, [amx] or {\"amx\": bool}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<CpuFeatures, E> {
                let inner = s
                    .strip_prefix('[')
                    .and_then(|r| r.strip_suffix(']'))
                    .unwrap_or(s);
                let mut features = CpuFeatures::default();
                for name in inner.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    match name {
                        "amx" => features.amx = true,
                        other => {
                            return Err(E::custom(format!(
                                "unknown CPU feature '{other}' (allowed: amx)"
                            )))
                        }
                    }
                }
                Ok(features)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<CpuFeatures, A::Error> {
                CpuFeaturesObject::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_struct("CpuFeatures", &["amx"], V)
    }
}

/// One vCPU's host CPUs (CH `CpuAffinity`). On the command line the list is
/// `affinity=[<vcpu>@[<host cpus>],...]`, host CPUs as `[0,1]`, `[0-3]` or `2`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuAffinity {
    /// The vCPU's index.
    pub vcpu: u8,
    /// Host CPUs its thread may run on.
    pub host_cpus: Vec<usize>,
}

/// Reads `affinity` from JSON (a list of objects) or the command line (`[0@[0,1],1@[2]]`).
fn deserialize_affinity<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<CpuAffinity>>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<Vec<CpuAffinity>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("vCPU affinities: [0@[0,1],1@[2]] or [{vcpu, host_cpus}]")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            let list = crate::kv::tuple_list::<usize>(s, "host CPUs", "[0@[0,1],1@[2-3]]")
                .map_err(E::custom)?;
            list.into_iter()
                .map(|(vcpu, host_cpus)| {
                    let vcpu = vcpu.parse::<u8>().map_err(|_| {
                        E::custom(format!("'{vcpu}' is not a vCPU index (0 to 253) in '{s}'"))
                    })?;
                    Ok(CpuAffinity { vcpu, host_cpus })
                })
                .collect::<Result<Vec<_>, E>>()
                .map(Some)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<CpuAffinity>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                .map(Some)
        }
    }
    d.deserialize_option(V)
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
    /// The arrangement; without it, one package, one die, `max_vcpus` cores of one thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    /// Expose Hyper-V enlightenments (not supported yet; must stay false).
    pub kvm_hyperv: bool,
    /// Guest physical address width.
    pub max_phys_bits: u8,
    /// Host CPUs each vCPU's thread may run on.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_affinity"
    )]
    pub affinity: Option<Vec<CpuAffinity>>,
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
    /// The arrangement of the vCPUs: the configured topology, else one package of
    /// `max_vcpus` single-thread cores.
    pub fn presented_topology(&self) -> CpuTopology {
        self.topology.unwrap_or(CpuTopology {
            threads_per_core: 1,
            cores_per_die: u16::from(self.max_vcpus),
            dies_per_package: 1,
            packages: 1,
        })
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
        if let Some(t) = self.topology {
            self.validate_topology(t)?;
        }
        let mut seen = std::collections::HashSet::new();
        for a in self.affinity.iter().flatten() {
            if a.vcpu >= self.max_vcpus {
                return err(format!(
                    "affinity: vCPU {} does not exist (max_vcpus is {})",
                    a.vcpu, self.max_vcpus
                ));
            }
            if !seen.insert(a.vcpu) {
                return err(format!("affinity: vCPU {} is given twice", a.vcpu));
            }
            if a.host_cpus.is_empty() {
                return err(format!("affinity: vCPU {} has no host CPUs", a.vcpu));
            }
            if let Some(cpu) = a.host_cpus.iter().find(|&&c| c >= libc_cpu_setsize()) {
                return err(format!(
                    "affinity: host CPU {cpu} of vCPU {} is beyond the {} a CPU set holds",
                    a.vcpu,
                    libc_cpu_setsize()
                ));
            }
        }
        Ok(())
    }

    fn validate_topology(&self, t: CpuTopology) -> Result<(), ConfigError> {
        let text = format!(
            "topology {}:{}:{}:{}",
            t.threads_per_core, t.cores_per_die, t.dies_per_package, t.packages
        );
        let err = |m: &str| Err(ConfigError::Cpus(format!("{text} {m}")));
        if [
            t.threads_per_core,
            t.cores_per_die,
            t.dies_per_package,
            t.packages,
        ]
        .contains(&0)
        {
            return err("has a part that is zero (each is at least 1)");
        }
        if t.threads_per_core > 2 {
            return err("has more than 2 threads per core (as Cloud Hypervisor allows)");
        }
        let arch = t.arch();
        if arch.cpus() != u32::from(self.max_vcpus) {
            return err(&format!(
                "describes {} vCPUs (threads_per_core x cores_per_die x dies_per_package x \
                 packages), not max_vcpus ({})",
                arch.cpus(),
                self.max_vcpus
            ));
        }
        if arch.max_apic_id() >= u32::from(MAX_VCPUS) {
            return err(&format!(
                "needs APIC IDs up to {} (each level takes whole bits); at most {} fit",
                arch.max_apic_id(),
                MAX_VCPUS - 1
            ));
        }
        Ok(())
    }
}

/// Host CPUs a CPU set (`cpu_set_t`) can name.
fn libc_cpu_setsize() -> usize {
    1024
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv;

    fn cli(s: &str) -> Result<CpusConfig, String> {
        let mut c: CpusConfig = kv::from_str(s).map_err(|e| e.to_string())?;
        if !s.contains("max") {
            c.max_vcpus = c.boot_vcpus;
        }
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn topology_affinity_features_and_nested_on_the_command_line() {
        let c = cli(
            "boot=4,max=6,topology=1:3:1:2,affinity=[0@[0,1],1@[1],5@[0-1]],features=[],nested=off",
        )
        .expect("valid");
        assert_eq!(
            c.topology,
            Some(CpuTopology {
                threads_per_core: 1,
                cores_per_die: 3,
                dies_per_package: 1,
                packages: 2
            })
        );
        assert_eq!(
            c.affinity,
            Some(vec![
                CpuAffinity {
                    vcpu: 0,
                    host_cpus: vec![0, 1]
                },
                CpuAffinity {
                    vcpu: 1,
                    host_cpus: vec![1]
                },
                CpuAffinity {
                    vcpu: 5,
                    host_cpus: vec![0, 1]
                },
            ])
        );
        assert!(!c.nested && !c.features.amx);
        // The API's JSON of the same configuration, and back.
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(
            json["topology"],
            serde_json::json!({"threads_per_core": 1, "cores_per_die": 3, "dies_per_package": 1, "packages": 2})
        );
        assert_eq!(
            json["affinity"][2],
            serde_json::json!({"vcpu": 5, "host_cpus": [0, 1]})
        );
        let back: CpusConfig = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, c);
        let amx: CpusConfig = kv::from_str("features=amx").expect("amx");
        assert!(amx.features.amx);
        let null: CpusConfig =
            serde_json::from_str(r#"{"affinity": null, "topology": null}"#).expect("nulls");
        assert_eq!((null.affinity, null.topology), (None, None));
        // Empty values are unset.
        let c = cli("boot=2,topology=,affinity=,features=").expect("empty");
        assert_eq!((c.topology, c.affinity), (None, None));
    }

    #[test]
    fn every_error_names_the_key_the_value_and_what_is_allowed() {
        for (input, message) in [
            (
                "boot=2,topology=2:1:1",
                "topology=2:1:1: '2:1:1' is not threads_per_core:cores_per_die:dies_per_package:packages (four numbers from 1 to 65535, such as 2:2:1:1)",
            ),
            (
                "boot=2,topology=2:x:1:1",
                "topology=2:x:1:1: '2:x:1:1' is not threads_per_core:cores_per_die:dies_per_package:packages (four numbers from 1 to 65535, such as 2:2:1:1)",
            ),
            ("features=avx", "features=avx: unknown CPU feature 'avx' (allowed: amx)"),
            (
                "affinity=0@[1]",
                "affinity=0@[1]: '0@[1]' is not a list such as [0@[0,1],1@[2-3]]",
            ),
            (
                "affinity=[x@[1]]",
                "affinity=[x@[1]]: 'x' is not a vCPU index (0 to 253) in '[x@[1]]'",
            ),
            (
                "affinity=[0@[a]]",
                "affinity=[0@[a]]: '[a]' is not a list of host CPUs such as 3, [3,4] or [3-5]",
            ),
            ("nested=maybe", "nested=maybe: 'maybe' is not on/off/true/false"),
            (
                "boot=4,topology=2:2:1:2",
                "cpus: topology 2:2:1:2 describes 8 vCPUs (threads_per_core x cores_per_die x dies_per_package x packages), not max_vcpus (4)",
            ),
            (
                "boot=4,topology=4:1:1:1",
                "cpus: topology 4:1:1:1 has more than 2 threads per core (as Cloud Hypervisor allows)",
            ),
            (
                "boot=1,topology=1:0:1:1",
                "cpus: topology 1:0:1:1 has a part that is zero (each is at least 1)",
            ),
            (
                "boot=195,topology=1:65:1:3",
                "cpus: topology 1:65:1:3 needs APIC IDs up to 320 (each level takes whole bits); at most 253 fit",
            ),
            (
                "boot=2,affinity=[2@[0]]",
                "cpus: affinity: vCPU 2 does not exist (max_vcpus is 2)",
            ),
            (
                "boot=2,affinity=[1@[0],1@[1]]",
                "cpus: affinity: vCPU 1 is given twice",
            ),
            (
                "boot=1,affinity=[0@[4096]]",
                "cpus: affinity: host CPU 4096 of vCPU 0 is beyond the 1024 a CPU set holds",
            ),
            ("boot=1,kvm_hyperv=on", "cpus.kvm_hyperv is not supported by Nimbus yet"),
            (
                "boot=1,profile=x",
                "unknown key(s): profile (allowed: boot, boot_vcpus, max, max_vcpus, topology, \
                 kvm_hyperv, max_phys_bits, affinity, features, nested)",
            ),
        ] {
            assert_eq!(cli(input).expect_err(input), message, "{input}");
        }
    }
}
