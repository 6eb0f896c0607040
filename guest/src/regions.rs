//! Physical ranges the guest must not overwrite: its own image and
//! everything the start info points at.

use crate::arch;
use crate::startinfo::{StartInfo, MEMMAP_ENTRY_SIZE, MODLIST_ENTRY_SIZE, SIZE};

const MAX_REGIONS: usize = 128;

/// A set of `[start, end)` ranges (overflow beyond the capacity is reported
/// by `overflowed`, never silently treated as free memory).
#[derive(Debug)]
pub struct Regions {
    r: [(u64, u64); MAX_REGIONS],
    n: usize,
    /// More ranges were added than fit.
    pub overflowed: bool,
}

impl Regions {
    /// An empty set.
    pub const fn new() -> Self {
        Self {
            r: [(0, 0); MAX_REGIONS],
            n: 0,
            overflowed: false,
        }
    }

    /// Adds `[start, end)`; empty ranges are ignored.
    pub fn add(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        if self.n < MAX_REGIONS {
            self.r[self.n] = (start, end);
            self.n += 1;
        } else {
            self.overflowed = true;
        }
    }

    /// The first range overlapping `[start, end)`, if any.
    pub fn overlapping(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        self.r[..self.n]
            .iter()
            .copied()
            .find(|&(s, e)| s < end && start < e)
    }

    /// The guest image plus every structure reachable from the start info:
    /// the block itself, memory map, command line, module list, modules and
    /// their command lines.
    pub fn boot_structures(si: &StartInfo, cmdline_len: usize) -> Self {
        let mut r = Self::new();
        let (img_start, img_end) = arch::image_range();
        r.add(img_start, img_end);
        r.add(si.addr, si.addr.saturating_add(SIZE));
        if si.memmap_entries > 0 {
            r.add(
                si.memmap_paddr,
                si.memmap_paddr
                    .saturating_add(u64::from(si.memmap_entries) * MEMMAP_ENTRY_SIZE),
            );
        }
        if si.cmdline_paddr != 0 {
            r.add(
                si.cmdline_paddr,
                si.cmdline_paddr.saturating_add(cmdline_len as u64 + 1),
            );
        }
        if si.nr_modules > 0 {
            r.add(
                si.modlist_paddr,
                si.modlist_paddr
                    .saturating_add(u64::from(si.nr_modules) * MODLIST_ENTRY_SIZE),
            );
        }
        for m in si.modules() {
            r.add(m.paddr, m.paddr.saturating_add(m.size));
            if m.cmdline_paddr != 0 {
                // Module command lines: reserve a page; they are short.
                r.add(m.cmdline_paddr, m.cmdline_paddr.saturating_add(4096));
            }
        }
        r
    }
}
