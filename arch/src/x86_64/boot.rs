//! Loading a kernel and describing the machine to it: a vmlinux ELF with a PVH entry note
//! (`hvm_start_info`), or a bzImage through the 64-bit Linux boot protocol (zero page).

use std::fs::File;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, PVH_MODLIST_START,
};
use super::memmap::{memory_map, MemoryMapEntry};

/// Magic of `hvm_start_info`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Where the zero page (`boot_params`) goes for the Linux boot protocol.
const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for the Linux boot protocol: PML4, PDPT, PD (first 1 GiB, 2 MiB pages).
const PML4_START: u64 = 0x9000;
const PDPT_START: u64 = 0xa000;
const PD_START: u64 = 0xb000;
/// Stack for the Linux boot protocol entry (below the page tables).
const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Offset of the 64-bit entry point from the protected-mode kernel's load address.
const LINUX_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// End of what the identity page tables map (the PD's 512 pages of 2 MiB).
const IDENTITY_MAP_END: u64 = 1 << 30;
/// End of what 32-bit protected mode without paging (PVH) reaches.
const PVH_ENTRY_END: u64 = 1 << 32;

/// Errors loading or describing the kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file is neither an ELF nor a bzImage.
    #[error("not a kernel: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    /// The file is an ELF, but not one that can be loaded.
    #[error("invalid ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    /// The file is a bzImage, but not one that can be loaded.
    #[error("invalid bzImage kernel")]
    BzImage(#[source] linux_loader::loader::Error),
    /// The kernel file could not be read.
    #[error("cannot read the kernel")]
    ReadKernel(#[source] std::io::Error),
    /// An ELF kernel without the `XEN_ELFNOTE_PHYS32_ENTRY` note cannot be booted.
    #[error("the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y")]
    NoPvhNote,
    /// The command line does not fit.
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Bytes given.
        len: usize,
        /// Bytes that fit (excluding the NUL).
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initramfs does not fit in RAM below the 32-bit hole, above the kernel.
    #[error("the initramfs ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {ram_top:#x}")]
    InitramfsTooLarge {
        /// Initramfs size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Top of low RAM.
        ram_top: u64,
    },
    /// Reading the initramfs failed.
    #[error("cannot read the initramfs")]
    ReadInitramfs(#[source] std::io::Error),
    /// Writing boot data into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    WriteMemory {
        /// What was written.
        what: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The boot configurator refused the boot parameters.
    #[error("cannot write the boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
    /// The kernel's entry point is not in guest RAM the boot protocol reaches (the first GiB,
    /// identity-mapped, for the 64-bit Linux boot protocol; below 4 GiB for PVH): the boot vCPU
    /// could only fault there, and every reset would boot into the same fault.
    #[error("the kernel's entry point {entry:#x} is not in guest RAM the boot protocol reaches")]
    EntryOutsideRam {
        /// The entry point.
        entry: u64,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, EBX = start info.
    Pvh {
        /// Physical entry address from the PVH note.
        entry: u64,
    },
    /// 64-bit Linux boot protocol: long mode at `entry`, RSI = zero page, paging at `pml4`.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// Zero page address.
        zero_page: u64,
        /// Root of the identity page tables.
        pml4: u64,
        /// Initial stack pointer.
        stack: u64,
    },
}

/// What to boot.
#[derive(Debug)]
pub struct BootSpec<'a> {
    /// The kernel image (vmlinux ELF with a PVH note, or bzImage).
    pub kernel: &'a mut File,
    /// Optional initramfs.
    pub initramfs: Option<&'a mut File>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// Guest address of the ACPI RSDP.
    pub rsdp: u64,
    /// PCI segments: each one's ECAM area is reserved in the memory map.
    pub pci_segments: u16,
}

/// Loads the kernel, initramfs and command line into `mem` and writes the boot information
/// (PVH start info or zero page). Returns how the boot vCPU must enter the kernel.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    spec: BootSpec<'_>,
) -> Result<BootEntry, BootError> {
    let max = CMDLINE_MAX_SIZE - 1;
    if spec.cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: spec.cmdline.len(),
            max,
        });
    }
    if spec.cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let high = Some(GuestAddress(HIGH_RAM_START));
    let format = kernel_format(spec.kernel)?;
    let is_elf = format == KernelFormat::Elf;
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, spec.kernel, high).map_err(BootError::Elf)?,
        KernelFormat::BzImage => {
            BzImage::load(mem, None, spec.kernel, high).map_err(BootError::BzImage)?
        }
    };
    let mut cmdline = spec.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::WriteMemory {
            what: "command line",
            source,
        })?;
    // Both loaders report the end of the image as an absolute guest address.
    let kernel_end = loaded.kernel_end;
    let initramfs = match spec.initramfs {
        Some(f) => Some(load_initramfs(mem, f, kernel_end, spec.ram_size)?),
        None => None,
    };
    let reachable = |entry: u64, end: u64| {
        if entry < end && mem.address_in_range(GuestAddress(entry)) {
            Ok(())
        } else {
            Err(BootError::EntryOutsideRam { entry })
        }
    };
    if is_elf {
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvhNote);
        };
        reachable(entry.0, PVH_ENTRY_END)?;
        let memmap = memory_map(spec.ram_size, spec.pci_segments);
        write_pvh_start_info(mem, &memmap, initramfs, spec.cmdline.len(), spec.rsdp)?;
        Ok(BootEntry::Pvh { entry: entry.0 })
    } else {
        let entry = loaded
            .kernel_load
            .0
            .saturating_add(LINUX_64BIT_ENTRY_OFFSET);
        reachable(entry, IDENTITY_MAP_END)?;
        write_zero_page(
            mem,
            &loaded,
            &memory_map(spec.ram_size, spec.pci_segments),
            initramfs,
            spec.cmdline.len(),
            spec.rsdp,
        )?;
        write_identity_page_tables(mem)?;
        Ok(BootEntry::Linux64 {
            entry,
            zero_page: ZERO_PAGE_START,
            pml4: PML4_START,
            stack: BOOT_STACK_POINTER,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells an ELF from a bzImage by their magic numbers ("\x7fELF" at 0, "HdrS" at 0x202).
fn kernel_format(file: &mut File) -> Result<KernelFormat, BootError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(BootError::ReadKernel)? {
            0 => break,
            k => n += k,
        }
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::UnknownFormat)
    }
}

/// Places the initramfs page-aligned at the top of RAM below the 32-bit hole.
fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    file: &mut File,
    kernel_end: u64,
    ram_size: u64,
) -> Result<(u64, u64), BootError> {
    let size = file.metadata().map_err(BootError::ReadInitramfs)?.len();
    let ram_top = super::layout::ram_regions(ram_size)
        .first()
        .map_or(0, |&(s, l)| s + l);
    let start = ram_top.checked_sub(size).map(|a| a & !0xfff);
    let start = match start {
        Some(s) if s >= kernel_end && size > 0 => s,
        _ => {
            return Err(BootError::InitramfsTooLarge {
                size,
                kernel_end,
                ram_top,
            })
        }
    };
    let size_usize = usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge {
        size,
        kernel_end,
        ram_top,
    })?;
    mem.read_exact_volatile_from(GuestAddress(start), file, size_usize)
        .map_err(|source| BootError::WriteMemory {
            what: "initramfs",
            source,
        })?;
    Ok((start, size))
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    map: &[MemoryMapEntry],
    initramfs: Option<(u64, u64)>,
    _cmdline_len: usize,
    rsdp: u64,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .take(PVH_MEMMAP_MAX_ENTRIES)
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .into_iter()
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootError::Configure)
}

const E820_MAX_ENTRIES: usize = 128;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    loaded: &KernelLoaderResult,
    map: &[MemoryMapEntry],
    initramfs: Option<(u64, u64)>,
    cmdline_len: usize,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    for (slot, e) in params
        .e820_table
        .iter_mut()
        .zip(map.iter().take(E820_MAX_ENTRIES))
    {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind as u32;
        params.e820_entries += 1;
    }
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<M>(&bp, mem).map_err(BootError::Configure)
}

/// Identity-maps the first 1 GiB with 2 MiB pages for the 64-bit Linux entry.
fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootError> {
    let w = |what, val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| BootError::WriteMemory { what, source })
    };
    w("PML4", PDPT_START | 0x3, PML4_START)?;
    w("PDPT", PD_START | 0x3, PDPT_START)?;
    for i in 0..512u64 {
        w("page directory", (i << 21) | 0x83, PD_START + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};

    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn temp_file(name: &str, bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!("nimbus-boot-{}-{name}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("temp file");
        f.write_all(bytes).expect("write");
        f.rewind().expect("rewind");
        let _ = std::fs::remove_file(&path);
        f
    }

    /// A bzImage with a boot-protocol 2.15 header, 4 setup sectors and a 4 KiB "kernel".
    fn synthetic_bzimage() -> Vec<u8> {
        let setup_sects = 4usize;
        let mut img = vec![0u8; (setup_sects + 1) * 512 + 4096];
        img[0x1f1] = setup_sects as u8;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x230..0x234].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // kernel_alignment
        img
    }

    #[test]
    fn bzimage_gets_a_zero_page_and_64bit_entry() {
        let ram = 256u64 << 20;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram as usize)]).expect("mem");
        let mut kernel = temp_file("bz", &synthetic_bzimage());
        let mut initrd = temp_file("initrd", &[0x5a; 10_000]);
        let entry = load_kernel(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                initramfs: Some(&mut initrd),
                cmdline: "console=ttyS0",
                ram_size: ram,
                rsdp: 0xa0000,
                pci_segments: 1,
            },
        )
        .expect("load");
        let BootEntry::Linux64 {
            entry,
            zero_page,
            pml4,
            ..
        } = entry
        else {
            panic!("bzImage must use the 64-bit boot protocol, got {entry:?}")
        };
        assert_eq!(entry, HIGH_RAM_START + LINUX_64BIT_ENTRY_OFFSET);
        let params: boot_params = mem.read_obj(GuestAddress(zero_page)).expect("zero page");
        let hdr = params.hdr;
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, "console=ttyS0".len() as u32 + 1);
        let (rd_addr, rd_size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
        assert_eq!(rd_size, 10_000);
        assert!(rd_addr + rd_size <= ram && rd_addr % 4096 == 0);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(rd_addr)).expect("initrd"),
            0x5a
        );
        assert_eq!({ params.acpi_rsdp_addr }, 0xa0000);
        let map = memory_map(ram, 1);
        assert_eq!(usize::from(params.e820_entries), map.len());
        for (e, want) in params.e820_table.iter().zip(&map) {
            assert_eq!(
                ({ e.addr }, { e.size }, { e.r#type }),
                (want.addr, want.size, want.kind as u32)
            );
        }
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .expect("cmdline");
        assert_eq!(&cmdline, b"console=ttyS0\0");
        // The identity map covers the entry point.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(pml4)).expect("pml4") & !0xfff,
            PDPT_START
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PD_START)).expect("pd"),
            0x83
        );
    }

    /// Found by the `kernel_loader` fuzz target: a bzImage whose `code32_start` lies past the
    /// end of RAM (with an empty protected-mode part, so nothing is written there) loaded
    /// fine, and the boot vCPU would have started outside RAM.
    #[test]
    fn an_entry_point_outside_ram_is_an_error() {
        let ram = 64u64 << 20;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram as usize)]).expect("mem");
        let mut image = synthetic_bzimage();
        image.truncate(5 * 512);
        image[0x214..0x218].copy_from_slice(&0x2410_0000u32.to_le_bytes());
        let mut kernel = temp_file("bz-outside", &image);
        let err = load_kernel(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                initramfs: None,
                cmdline: "",
                ram_size: ram,
                rsdp: 0xa0000,
                pci_segments: 1,
            },
        )
        .expect_err("entry outside RAM");
        assert!(
            matches!(err, BootError::EntryOutsideRam { entry: 0x2410_0200 }),
            "{err:?}"
        );
    }

    #[test]
    fn command_line_limits() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let mut kernel = temp_file("bz2", &synthetic_bzimage());
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = load_kernel(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                initramfs: None,
                cmdline: &long,
                ram_size: 64 << 20,
                rsdp: 0,
                pci_segments: 1,
            },
        )
        .expect_err("too long");
        assert!(matches!(err, BootError::CmdlineTooLong { .. }), "{err}");
        let err = load_kernel(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                initramfs: None,
                cmdline: "a\0b",
                ram_size: 64 << 20,
                rsdp: 0,
                pci_segments: 1,
            },
        )
        .expect_err("nul");
        assert!(matches!(err, BootError::CmdlineNul), "{err}");
    }

    #[test]
    fn initramfs_too_large_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem");
        let mut kernel = temp_file("bz3", &synthetic_bzimage());
        let mut initrd = temp_file("big", &vec![0u8; 4 << 20]);
        let err = load_kernel(
            &mem,
            BootSpec {
                kernel: &mut kernel,
                initramfs: Some(&mut initrd),
                cmdline: "",
                ram_size: 4 << 20,
                rsdp: 0,
                pci_segments: 1,
            },
        )
        .expect_err("too large");
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }), "{err}");
    }
}
