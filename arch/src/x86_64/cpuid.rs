//! CPUID as the guest sees it: the hypervisor's supported set, patched with this vCPU's
//! identity and the VM's topology (one socket, `cpus` cores, one thread per core).

use hypervisor::CpuIdEntry;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const LEAF_EXT_FEATURES: u32 = 0x8000_0001;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_VMX: u32 = 1 << 5;
const ECX_SVM: u32 = 1 << 2;
const EDX_HTT: u32 = 1 << 28;

/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Returns the CPUID table for the vCPU with `apic_id` in a VM of `cpus` vCPUs.
pub fn vcpu_cpuid(supported: &[CpuIdEntry], apic_id: u8, cpus: u8) -> Vec<CpuIdEntry> {
    let cpus = u32::from(cpus.max(1));
    let apic_id = u32::from(apic_id);
    // Bits of the APIC ID that number cores within the package.
    let core_bits = u32::BITS - (cpus - 1).leading_zeros();
    let mut out = Vec::with_capacity(supported.len() + 3);
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (cpus << 16) | (e.ebx & 0xffff);
                e.ecx |= ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache - 1;
                // the last level (type 3 = unified, level 3) is shared by all cores.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            _ => {}
        }
        out.push(e);
    }
    for function in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        let levels = [(0, 1, LEVEL_SMT), (core_bits, cpus, LEVEL_CORE), (0, 0, 0)];
        for (index, (shift, count, kind)) in (0u32..).zip(levels) {
            out.push(CpuIdEntry {
                function,
                index,
                flags: CpuIdEntry::FLAG_INDEXED,
                eax: shift,
                ebx: count,
                ecx: (kind << 8) | index,
                edx: apic_id,
            });
        }
    }
    // Leaf 0xB must be reachable: raise the basic max leaf if the host reported less.
    if let Some(leaf0) = out.iter_mut().find(|e| e.function == 0) {
        leaf0.eax = leaf0.eax.max(LEAF_TOPOLOGY);
    }
    out
}

/// Hides the CPU's own virtualization extensions (Intel VMX, AMD SVM) from the guest, for
/// VMs configured without nested virtualization.
pub fn hide_virtualization(table: &mut [CpuIdEntry]) {
    for e in table.iter_mut() {
        match e.function {
            LEAF_FEATURES => e.ecx &= !ECX_VMX,
            LEAF_EXT_FEATURES => e.ecx &= !ECX_SVM,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn identity_and_topology() {
        let supported = [
            CpuIdEntry {
                eax: 0xd,
                ..leaf(0, 0)
            },
            CpuIdEntry {
                ebx: 0x0000_0800,
                ..leaf(1, 0)
            },
            CpuIdEntry {
                eax: (3 << 5) | 0x3,
                ..leaf(4, 3)
            },
            leaf(0xb, 0),
        ];
        let table = vcpu_cpuid(&supported, 3, 4);
        let l1 = table
            .iter()
            .find(|e| e.function == 1)
            .copied()
            .unwrap_or_default();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let l4 = table
            .iter()
            .find(|e| e.function == 4)
            .copied()
            .unwrap_or_default();
        assert_eq!(l4.eax >> 26, 3);
        assert_eq!((l4.eax >> 14) & 0xfff, 3);
        let core = table
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .copied()
            .unwrap_or_default();
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 4, LEVEL_CORE, 3)
        );
        assert_eq!(table.iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let supported = [CpuIdEntry {
            edx: EDX_HTT,
            ..leaf(1, 0)
        }];
        let l1 = vcpu_cpuid(&supported, 0, 1)[0];
        assert_eq!(l1.edx & EDX_HTT, 0);
    }
}

/// First of the three processor brand string leaves.
const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
const LEAF_ADVANCED_POWER: u32 = 0x8000_0007;
const EDX_INVARIANT_TSC: u32 = 1 << 8;
/// AMD's hardware configuration MSR; bit 24 (TscFreqSel) says the TSC counts at P0 frequency.
const MSR_AMD_HWCR: u32 = 0xc001_0015;
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// The host's processor brand string leaves (0x80000002..=0x80000004).
pub fn host_brand_leaves() -> Vec<CpuIdEntry> {
    (LEAF_BRAND_FIRST..LEAF_BRAND_FIRST + 3)
        .map(|function| {
            let r = std::arch::x86_64::__cpuid(function);
            CpuIdEntry {
                function,
                index: 0,
                flags: 0,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
            }
        })
        .collect()
}

/// Fills brand string leaves the hypervisor reported as all zeros from `host` (some KVM versions
/// leave them empty; guests then print no model name).
pub fn fill_brand_string(supported: &mut [CpuIdEntry], host: &[CpuIdEntry]) {
    for e in supported
        .iter_mut()
        .filter(|e| (LEAF_BRAND_FIRST..LEAF_BRAND_FIRST + 3).contains(&e.function))
    {
        if (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0) {
            if let Some(h) = host.iter().find(|h| h.function == e.function) {
                *e = CpuIdEntry {
                    flags: e.flags,
                    index: e.index,
                    ..*h
                };
            }
        }
    }
}

/// On AMD, an invariant TSC in CPUID must come with HWCR.TscFreqSel set, or Linux reports a
/// firmware bug and distrusts the TSC. The MSR value to write, when that applies.
pub fn amd_hwcr(cpuid: &[CpuIdEntry]) -> Option<hypervisor::MsrEntry> {
    let leaf0 = cpuid.iter().find(|e| e.function == 0)?;
    let amd = (leaf0.ebx, leaf0.edx, leaf0.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163); // "AuthenticAMD"
    let invariant = cpuid
        .iter()
        .any(|e| e.function == LEAF_ADVANCED_POWER && e.edx & EDX_INVARIANT_TSC != 0);
    (amd && invariant).then_some(hypervisor::MsrEntry {
        index: MSR_AMD_HWCR,
        data: HWCR_TSC_FREQ_SEL,
    })
}

#[cfg(test)]
mod platform_tests {
    use super::*;

    #[test]
    fn empty_brand_leaves_come_from_the_host() {
        let mut supported = vec![
            CpuIdEntry {
                function: 0x8000_0002,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0x8000_0003,
                eax: 7,
                ..Default::default()
            },
        ];
        let host = vec![
            CpuIdEntry {
                function: 0x8000_0002,
                eax: 0x2044_4d41,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0x8000_0003,
                eax: 9,
                ..Default::default()
            },
        ];
        fill_brand_string(&mut supported, &host);
        assert_eq!(supported[0].eax, 0x2044_4d41);
        assert_eq!(supported[1].eax, 7, "a brand the hypervisor gave is kept");
        assert_eq!(host_brand_leaves().len(), 3);
    }

    #[test]
    fn hwcr_only_for_amd_with_invariant_tsc() {
        let amd = CpuIdEntry {
            function: 0,
            ebx: 0x6874_7541,
            edx: 0x6974_6e65,
            ecx: 0x444d_4163,
            ..Default::default()
        };
        let intel = CpuIdEntry {
            function: 0,
            ebx: 0x756e_6547,
            edx: 0x4965_6e69,
            ecx: 0x6c65_746e,
            ..Default::default()
        };
        let inv = CpuIdEntry {
            function: LEAF_ADVANCED_POWER,
            edx: EDX_INVARIANT_TSC,
            ..Default::default()
        };
        assert_eq!(
            amd_hwcr(&[amd, inv]).map(|m| (m.index, m.data)),
            Some((MSR_AMD_HWCR, 1 << 24))
        );
        assert_eq!(amd_hwcr(&[intel, inv]), None);
        assert_eq!(amd_hwcr(&[amd]), None);
    }

    #[test]
    fn nested_off_hides_vmx_and_svm() {
        let mut table = vec![
            CpuIdEntry {
                function: LEAF_FEATURES,
                ecx: ECX_VMX | ECX_HYPERVISOR,
                ..Default::default()
            },
            CpuIdEntry {
                function: LEAF_EXT_FEATURES,
                ecx: ECX_SVM | 1,
                ..Default::default()
            },
        ];
        hide_virtualization(&mut table);
        assert_eq!(table[0].ecx, ECX_HYPERVISOR);
        assert_eq!(table[1].ecx, 1);
    }
}
