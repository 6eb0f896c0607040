//! The PVH `hvm_start_info` block (Xen `arch-x86/hvm/start_info.h`, versions
//! 0 and 1), its memory map, modules and command line.

use crate::phys;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` in version 1 (version 0 stops at 0x38 too, but
/// without a memory map).
pub const SIZE: u64 = 0x38;
/// Size of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_SIZE: u64 = 24;
/// Size of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: u64 = 32;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The start info fields, as read from guest memory.
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    /// Physical address of the block.
    pub addr: u64,
    /// Must be [`MAGIC`].
    pub magic: u32,
    /// Structure version (1 adds the memory map).
    pub version: u32,
    /// SIF_* flags.
    pub flags: u32,
    /// Number of module entries at `modlist_paddr`.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line (0: none).
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP (0: none).
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version >= 1).
    pub memmap_paddr: u64,
    /// Number of memory map entries (version >= 1).
    pub memmap_entries: u32,
}

/// One memory map entry.
#[derive(Clone, Copy, Debug)]
pub struct MemEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type (1 RAM, 2 reserved, 3 ACPI, 4 NVS, 5 unusable, ...).
    pub kind: u32,
}

impl MemEntry {
    /// End address (exclusive), saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// A module: `[paddr, paddr + size)`.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// Start address.
    pub paddr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Its command line (0: none).
    pub cmdline_paddr: u64,
}

impl StartInfo {
    /// Reads the block at `addr`; `None` if the address is not readable.
    pub fn read(addr: u64) -> Option<Self> {
        if !phys::readable(addr, SIZE) {
            return None;
        }
        let version = phys::read_u32(addr + 4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (phys::read_u64(addr + 0x28), phys::read_u32(addr + 0x30))
        } else {
            (0, 0)
        };
        Some(Self {
            addr,
            magic: phys::read_u32(addr),
            version,
            flags: phys::read_u32(addr + 8),
            nr_modules: phys::read_u32(addr + 12),
            modlist_paddr: phys::read_u64(addr + 0x10),
            cmdline_paddr: phys::read_u64(addr + 0x18),
            rsdp_paddr: phys::read_u64(addr + 0x20),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// Whether the memory map array is present and readable.
    pub fn memmap_readable(&self) -> bool {
        self.memmap_entries > 0
            && phys::readable(
                self.memmap_paddr,
                u64::from(self.memmap_entries) * MEMMAP_ENTRY_SIZE,
            )
    }

    /// Memory map entry `i` (callers check `memmap_readable` and the count).
    pub fn memmap_entry(&self, i: u32) -> MemEntry {
        let a = self.memmap_paddr + u64::from(i) * MEMMAP_ENTRY_SIZE;
        MemEntry {
            addr: phys::read_u64(a),
            size: phys::read_u64(a + 8),
            kind: phys::read_u32(a + 16),
        }
    }

    /// Iterates over the memory map (empty if it is missing or unreadable).
    pub fn memmap(&self) -> impl Iterator<Item = MemEntry> + '_ {
        let n = if self.memmap_readable() {
            self.memmap_entries
        } else {
            0
        };
        (0..n).map(move |i| self.memmap_entry(i))
    }

    /// Iterates over the modules (empty if the list is unreadable).
    pub fn modules(&self) -> impl Iterator<Item = Module> + '_ {
        let ok = self.nr_modules > 0
            && phys::readable(
                self.modlist_paddr,
                u64::from(self.nr_modules) * MODLIST_ENTRY_SIZE,
            );
        let n = if ok { self.nr_modules } else { 0 };
        (0..n).map(move |i| {
            let a = self.modlist_paddr + u64::from(i) * MODLIST_ENTRY_SIZE;
            Module {
                paddr: phys::read_u64(a),
                size: phys::read_u64(a + 8),
                cmdline_paddr: phys::read_u64(a + 16),
            }
        })
    }
}

/// Longest command line the guest accepts.
pub const CMDLINE_MAX: usize = 4096;

/// A copy of a NUL-terminated string from guest memory.
pub struct CString {
    buf: [u8; CMDLINE_MAX],
    len: usize,
    /// No NUL within `CMDLINE_MAX` bytes.
    pub too_long: bool,
}

impl CString {
    /// Copies the string at `addr` (up to `CMDLINE_MAX` bytes).
    pub fn read(addr: u64) -> Self {
        let mut s = Self {
            buf: [0; CMDLINE_MAX],
            len: 0,
            too_long: true,
        };
        while s.len < CMDLINE_MAX && phys::readable(addr + s.len as u64, 1) {
            let b = phys::read_u8(addr + s.len as u64);
            if b == 0 {
                s.too_long = false;
                break;
            }
            s.buf[s.len] = b;
            s.len += 1;
        }
        s
    }

    /// The raw bytes (without the NUL).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Length in bytes (without the NUL).
    pub fn len(&self) -> usize {
        self.len
    }
}
