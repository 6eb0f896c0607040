//! CPUID as the guest sees it: the hypervisor's supported set, patched with this vCPU's
//! identity and the VM's topology (threads, cores, dies, packages; see [`Topology`]).

use hypervisor::CpuIdEntry;

use super::topology::Topology;

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
const LEVEL_DIE: u32 = 5;

/// Returns the CPUID table for vCPU `index` of a VM arranged as `topology`: its APIC ID in
/// leaves 1, 0xB and 0x1F, the package's logical processor count in leaf 1, its core count
/// and each cache's sharing in leaf 4, and the levels in leaves 0xB (thread, core) and 0x1F
/// (thread, core, die).
pub fn vcpu_cpuid(supported: &[CpuIdEntry], index: u32, topology: &Topology) -> Vec<CpuIdEntry> {
    let apic_id = topology.apic_id(index);
    let threads = topology.threads_per_package();
    let cores = topology.cores_per_package();
    let smt = u32::from(topology.threads_per_core);
    let mut out = Vec::with_capacity(supported.len() + 7);
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = ((apic_id & 0xff) << 24) | (threads.min(0xff) << 16) | (e.ebx & 0xffff);
                e.ecx |= ECX_HYPERVISOR;
                if threads > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing this cache - 1;
                // levels 1 and 2 belong to a core (its threads), level 3 to the package.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { threads } else { smt };
                e.eax = (e.eax & 0x3fff)
                    | ((cores - 1).min(0x3f) << 26)
                    | ((sharing - 1).min(0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            _ => {}
        }
        out.push(e);
    }
    let smt_level = (topology.core_shift(), smt, LEVEL_SMT);
    let v1 = [
        smt_level,
        (topology.package_shift(), threads, LEVEL_CORE),
        (0, 0, 0),
    ];
    let core_level = (
        topology.die_shift(),
        smt * u32::from(topology.cores_per_die),
        LEVEL_CORE,
    );
    // Leaf 0x1F names a die level only when there are several dies per package (one die is
    // what leaf 0xB already says, and what hardware with one die reports).
    let v2_dies = [
        smt_level,
        core_level,
        (topology.package_shift(), threads, LEVEL_DIE),
        (0, 0, 0),
    ];
    let v2 = if topology.dies_per_package > 1 {
        &v2_dies[..]
    } else {
        &v1[..]
    };
    for (function, levels) in [(LEAF_TOPOLOGY, &v1[..]), (LEAF_TOPOLOGY_V2, v2)] {
        for (index, &(shift, count, kind)) in (0u32..).zip(levels) {
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

    fn find(table: &[CpuIdEntry], function: u32, index: u32) -> CpuIdEntry {
        table
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
            .unwrap_or_default()
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
        let table = vcpu_cpuid(&supported, 3, &Topology::flat(4));
        let l1 = find(&table, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let l4 = find(&table, 4, 3);
        assert_eq!(l4.eax >> 26, 3);
        assert_eq!((l4.eax >> 14) & 0xfff, 3);
        let core = find(&table, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 4, LEVEL_CORE, 3)
        );
        assert_eq!(table.iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(
            table.iter().filter(|e| e.function == 0x1f).count(),
            3,
            "no die level"
        );
    }

    #[test]
    fn threads_cores_dies_and_packages() {
        // 2 threads, 3 cores (2 bits), 2 dies (1 bit), 2 packages: 24 vCPUs.
        let t = Topology {
            threads_per_core: 2,
            cores_per_die: 3,
            dies_per_package: 2,
            packages: 2,
        };
        let supported = [
            leaf(1, 0),
            CpuIdEntry {
                eax: 1 << 5,
                ..leaf(4, 0)
            },
            CpuIdEntry {
                eax: 3 << 5,
                ..leaf(4, 3)
            },
        ];
        // vCPU 13: package 1, die 0, core 0, thread 1 -> APIC ID (1 << 4) | 1.
        let table = vcpu_cpuid(&supported, 13, &t);
        let l1 = find(&table, 1, 0);
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (0x11, 12));
        let (l4_l1, l4_l3) = (find(&table, 4, 0), find(&table, 4, 3));
        assert_eq!((l4_l1.eax >> 26) + 1, 6, "cores per package");
        assert_eq!(
            ((l4_l1.eax >> 14) & 0xfff) + 1,
            2,
            "L1 shared by a core's threads"
        );
        assert_eq!(
            ((l4_l3.eax >> 14) & 0xfff) + 1,
            12,
            "L3 shared by the package"
        );
        let level = |f, i| {
            let e = find(&table, f, i);
            (e.eax, e.ebx, e.ecx >> 8, e.edx)
        };
        assert_eq!(level(0xb, 0), (1, 2, LEVEL_SMT, 0x11));
        assert_eq!(level(0xb, 1), (4, 12, LEVEL_CORE, 0x11));
        assert_eq!(level(0xb, 2), (0, 0, 0, 0x11));
        assert_eq!(level(0x1f, 0), (1, 2, LEVEL_SMT, 0x11));
        assert_eq!(level(0x1f, 1), (3, 6, LEVEL_CORE, 0x11));
        assert_eq!(level(0x1f, 2), (4, 12, LEVEL_DIE, 0x11));
        assert_eq!(level(0x1f, 3), (0, 0, 0, 0x11));
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let supported = [CpuIdEntry {
            edx: EDX_HTT,
            ..leaf(1, 0)
        }];
        let l1 = vcpu_cpuid(&supported, 0, &Topology::flat(1))[0];
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
