//! Address allocation for BARs from the 32-bit and 64-bit PCI windows.

/// A first-fit allocator over one window, with natural alignment.
#[derive(Debug, Clone)]
pub struct AddressAllocator {
    start: u64,
    /// Last usable address (inclusive, so a window may end at the top of the address space).
    last: u64,
    /// Allocated ranges as (start, last), sorted by start.
    used: Vec<(u64, u64)>,
}

impl AddressAllocator {
    /// An allocator over `start..start+size`.
    pub fn new(start: u64, size: u64) -> Self {
        Self {
            start,
            last: start.saturating_add(size.saturating_sub(1)),
            used: Vec::new(),
        }
    }

    /// Allocates `size` bytes aligned to `size` (a power of two). None when the window is full.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        self.allocate_aligned(size, size)
    }

    /// Allocates `size` bytes (not zero) aligned to `align` (a power of two). None when the
    /// window has no such room.
    pub fn allocate_aligned(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let mut candidate = self.start.checked_add(align - 1)? & !(align - 1);
        for &(s, l) in &self.used {
            if candidate.checked_add(size - 1)? < s {
                break;
            }
            if l >= candidate {
                candidate = l.checked_add(align)? & !(align - 1);
            }
        }
        let last = candidate.checked_add(size - 1)?;
        if last > self.last {
            return None;
        }
        let pos = self.used.partition_point(|&(s, _)| s < candidate);
        self.used.insert(pos, (candidate, last));
        Some(candidate)
    }

    /// Frees the range starting at `addr`.
    pub fn free(&mut self, addr: u64) {
        self.used.retain(|&(s, _)| s != addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_first_fit() {
        let mut a = AddressAllocator::new(0xc000_0000, 0x10_0000);
        assert_eq!(a.allocate(0x1000), Some(0xc000_0000));
        assert_eq!(a.allocate(0x8000), Some(0xc000_8000));
        assert_eq!(a.allocate(0x1000), Some(0xc000_1000));
        assert_eq!(a.allocate(0x3000), None, "not a power of two");
        assert_eq!(a.allocate(0x20_0000), None, "larger than the window");
        a.free(0xc000_8000);
        assert_eq!(a.allocate(0x4000), Some(0xc000_4000));
        let mut full = AddressAllocator::new(0, 0x2000);
        assert!(full.allocate(0x1000).is_some() && full.allocate(0x1000).is_some());
        assert_eq!(full.allocate(0x1000), None);
        let mut top = AddressAllocator::new(u64::MAX - 0xfff, 0x1000);
        assert_eq!(top.allocate(0x1000), Some(u64::MAX - 0xfff));
        assert_eq!(top.allocate(0x1000), None);
    }

    #[test]
    fn sizes_that_are_not_powers_of_two_with_an_alignment() {
        let mut a = AddressAllocator::new(0x1_0000_0000, 0x100_0000);
        assert_eq!(a.allocate(0x8000), Some(0x1_0000_0000));
        assert_eq!(
            a.allocate_aligned(0x60_0000, 0x20_0000),
            Some(0x1_0020_0000)
        );
        assert_eq!(
            a.allocate_aligned(0x20_0000, 0x20_0000),
            Some(0x1_0080_0000)
        );
        assert_eq!(a.allocate(0x1000), Some(0x1_0000_8000));
        assert_eq!(a.allocate_aligned(0x100_0000, 0x20_0000), None);
        assert_eq!(a.allocate_aligned(0, 0x1000), None);
        assert_eq!(a.allocate_aligned(0x1000, 0x3000), None);
    }
}
