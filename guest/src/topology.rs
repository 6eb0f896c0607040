//! `expect.topology=T:C:D:P` (threads per core, cores per die, dies per package, packages):
//! what the VMM tells the guest about the arrangement of its vCPUs. CPUID is read at CPL0
//! (through the service call), where the VMM's table answers, not the host's.
//!
//! APIC IDs give each level the fewest bits that number its members (Intel SDM vol. 3A,
//! "Identifying Topology Levels"); the check computes them from T:C:D:P itself.

use core::fmt::Write;

use crate::acpi::Madt;
use crate::arch::{cpuid_count_cpl0, cpuid_cpl0};
use crate::expect;
use crate::report::{check, StrBuf};

/// Bits that number `n` members.
fn bits(n: u32) -> u32 {
    32 - n.max(1).saturating_sub(1).leading_zeros()
}

struct Topo {
    t: u32,
    c: u32,
    d: u32,
    p: u32,
}

impl Topo {
    fn parse(s: &str) -> Option<Topo> {
        let mut it = s
            .split(':')
            .map(|x| x.parse::<u32>().ok().filter(|&n| n >= 1));
        let t = Topo {
            t: it.next()??,
            c: it.next()??,
            d: it.next()??,
            p: it.next()??,
        };
        it.next().is_none().then_some(t)
    }

    fn apic_id(&self, i: u32) -> u32 {
        let (ct, cc, cd) = (bits(self.t), bits(self.c), bits(self.d));
        (i % self.t)
            | ((i / self.t % self.c) << ct)
            | ((i / (self.t * self.c) % self.d) << (ct + cc))
            | ((i / (self.t * self.c * self.d)) << (ct + cc + cd))
    }
}

/// Runs the `cpu.topology` check when `expect.topology` is given.
pub fn check_topology(text: &str, madt: Option<&Madt>) {
    let Some(value) = expect::value(text, "expect.topology") else {
        return;
    };
    let Some(topo) = Topo::parse(value) else {
        check(
            "cpu.topology",
            false,
            format_args!("expect.topology={value} is not T:C:D:P"),
        );
        return;
    };
    let mut why: StrBuf<200> = StrBuf::new();
    let per_package = topo.t * topo.c * topo.d;
    let mut fail = |what: core::fmt::Arguments<'_>| {
        if why.as_str().is_empty() {
            let _ = write!(why, "{what}");
        }
    };
    let max_leaf = cpuid_cpl0(0)[0];
    let l1 = cpuid_cpl0(1);
    if (l1[1] >> 16) & 0xff != per_package.min(0xff) {
        fail(format_args!(
            "leaf 1 EBX[23:16]={} (want {per_package})",
            (l1[1] >> 16) & 0xff
        ));
    }
    let l4 = cpuid_count_cpl0(4, 0);
    if l4[0] & 0x1f != 0 && (l4[0] >> 26) + 1 != topo.c * topo.d {
        fail(format_args!(
            "leaf 4 cores per package {} (want {})",
            (l4[0] >> 26) + 1,
            topo.c * topo.d
        ));
    }
    // (sub-leaf, level type, logical processors, shift to the next level)
    let smt = (1, topo.t, bits(topo.t));
    let pkg_shift = bits(topo.t) + bits(topo.c) + bits(topo.d);
    let mut levels_ok = |leaf: u32, want: &[(u32, u32, u32)]| {
        for (sub, &(kind, count, shift)) in (0u32..).zip(want) {
            let r = cpuid_count_cpl0(leaf, sub);
            let got = ((r[2] >> 8) & 0xff, r[1] & 0xffff, r[0] & 0x1f);
            if got != (kind, count, shift) {
                fail(format_args!(
                    "leaf {leaf:#x}.{sub} type/count/shift {}/{}/{} (want {kind}/{count}/{shift})",
                    got.0, got.1, got.2
                ));
            }
        }
    };
    let invalid = (0, 0, 0);
    let core_to_package = (2, per_package, pkg_shift);
    levels_ok(0xb, &[smt, core_to_package, invalid]);
    if max_leaf >= 0x1f {
        // A die level only with several dies per package.
        if topo.d > 1 {
            let core = (2, topo.t * topo.c, bits(topo.t) + bits(topo.c));
            levels_ok(0x1f, &[smt, core, (5, per_package, pkg_shift), invalid]);
        } else {
            levels_ok(0x1f, &[smt, core_to_package, invalid]);
        }
    }
    // The MADT's enabled local APICs are the first vCPUs' IDs.
    match madt {
        None => fail(format_args!("no MADT")),
        Some(m) => {
            if m.ncpus as u32 > per_package * topo.p {
                fail(format_args!(
                    "{} enabled CPUs in the MADT, more than {value} holds",
                    m.ncpus
                ));
            }
            for (i, &id) in m.cpus[..m.ncpus].iter().enumerate() {
                let want = topo.apic_id(i as u32);
                if id != want {
                    fail(format_args!("MADT CPU {i} has APIC ID {id} (want {want})"));
                    break;
                }
            }
        }
    }
    let ok = why.as_str().is_empty();
    check(
        "cpu.topology",
        ok,
        format_args!(
            "{value}: leaf1.logical={} leaf4.cores={} max_leaf={max_leaf:#x} (0x1f checked from 0x1f) levels and MADT APIC IDs {}{}",
            (l1[1] >> 16) & 0xff,
            (l4[0] >> 26) + 1,
            if ok { "as expected" } else { "differ: " },
            why.as_str()
        ),
    );
}
