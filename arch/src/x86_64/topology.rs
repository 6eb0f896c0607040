//! How vCPUs are arranged in threads, cores, dies and packages, and the APIC IDs that follow:
//! each level gets the fewest bits that number its members, as on hardware (Intel SDM vol. 3A,
//! "Identifying Topology Levels"), so a 3-core die takes two bits and leaves ID 3 unused.

/// Threads per core, cores per die, dies per package and packages (all at least 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Threads per core.
    pub threads_per_core: u16,
    /// Cores per die.
    pub cores_per_die: u16,
    /// Dies per package.
    pub dies_per_package: u16,
    /// Packages (sockets).
    pub packages: u16,
}

/// Bits needed to number `n` members (0 for one).
fn bits(n: u16) -> u32 {
    u16::BITS - n.max(1).saturating_sub(1).leading_zeros()
}

impl Topology {
    /// One package with one die of `cpus` single-thread cores.
    pub fn flat(cpus: u16) -> Self {
        Self {
            threads_per_core: 1,
            cores_per_die: cpus.max(1),
            dies_per_package: 1,
            packages: 1,
        }
    }

    /// vCPUs in all (the product of the four).
    pub fn cpus(&self) -> u32 {
        u32::from(self.threads_per_core)
            * u32::from(self.cores_per_die)
            * u32::from(self.dies_per_package)
            * u32::from(self.packages)
    }

    /// Logical processors in one package.
    pub fn threads_per_package(&self) -> u32 {
        u32::from(self.threads_per_core)
            * u32::from(self.cores_per_die)
            * u32::from(self.dies_per_package)
    }

    /// Cores in one package.
    pub fn cores_per_package(&self) -> u32 {
        u32::from(self.cores_per_die) * u32::from(self.dies_per_package)
    }

    /// Shift from an APIC ID to its core number (the thread bits).
    pub fn core_shift(&self) -> u32 {
        bits(self.threads_per_core)
    }

    /// Shift from an APIC ID to its die number.
    pub fn die_shift(&self) -> u32 {
        self.core_shift() + bits(self.cores_per_die)
    }

    /// Shift from an APIC ID to its package number.
    pub fn package_shift(&self) -> u32 {
        self.die_shift() + bits(self.dies_per_package)
    }

    /// The APIC ID of vCPU `index` (vCPUs are numbered thread first, then core, die, package).
    pub fn apic_id(&self, index: u32) -> u32 {
        let t = u32::from(self.threads_per_core.max(1));
        let c = u32::from(self.cores_per_die.max(1));
        let d = u32::from(self.dies_per_package.max(1));
        let thread = index % t;
        let core = index / t % c;
        let die = index / (t * c) % d;
        let package = index / (t * c * d);
        thread
            | (core << self.core_shift())
            | (die << self.die_shift())
            | (package << self.package_shift())
    }

    /// The highest APIC ID of the topology's vCPUs.
    pub fn max_apic_id(&self) -> u32 {
        self.apic_id(self.cpus().saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(t: u16, c: u16, d: u16, p: u16) -> Topology {
        Topology {
            threads_per_core: t,
            cores_per_die: c,
            dies_per_package: d,
            packages: p,
        }
    }

    #[test]
    fn flat_ids_are_the_indices() {
        let flat = Topology::flat(5);
        assert_eq!(
            (0..5).map(|i| flat.apic_id(i)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        assert_eq!((flat.core_shift(), flat.package_shift()), (0, 3));
    }

    #[test]
    fn each_level_takes_the_bits_it_needs() {
        // 2 threads (1 bit), 3 cores (2 bits), 1 die (0 bits), 2 packages.
        let t = topology(2, 3, 1, 2);
        let ids: Vec<u32> = (0..t.cpus()).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(
            (t.core_shift(), t.die_shift(), t.package_shift()),
            (1, 3, 3)
        );
        assert_eq!(t.max_apic_id(), 13);
        // 1 thread, 3 cores, 2 dies (1 bit), 1 package.
        let t = topology(1, 3, 2, 1);
        let ids: Vec<u32> = (0..t.cpus()).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 4, 5, 6]);
        assert_eq!((t.threads_per_package(), t.cores_per_package()), (6, 6));
    }
}
