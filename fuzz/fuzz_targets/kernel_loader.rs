//! Kernel loading: `arch::x86_64::boot::load_kernel` with a vmlinux ELF (program headers,
//! the PVH entry note, through `linux-loader` and our format detection) or a bzImage (setup
//! header, protected-mode kernel), an optional initramfs and a command line, writing the PVH
//! start info or the zero page and page tables, into 64 MiB of guest RAM.
//!
//! Input: `[cmdline: u16 len][bytes][initramfs: u16 len][bytes][flags: u8][kernel: the rest]`
//! (flags bit 0: load the initramfs).
//!
//! Checks: on success the command line is in guest memory at `CMDLINE_START`, NUL-terminated;
//! a bzImage's 64-bit entry lies in guest RAM and its boot registers are the documented ones.
#![no_main]

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Mutex, OnceLock};

use arch::x86_64::boot::{load_kernel, BootEntry, BootSpec};
use arch::x86_64::layout::CMDLINE_START;
use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::{memfd, Reader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: u64 = 64 << 20;

struct World {
    mem: GuestMemoryMmap,
    kernel: File,
    initramfs: File,
}

static WORLD: OnceLock<Mutex<World>> = OnceLock::new();

fn refill(f: &mut File, bytes: &[u8]) {
    f.set_len(0).expect("truncate");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(bytes).expect("write");
    f.seek(SeekFrom::Start(0)).expect("seek");
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let cmdline = r.piece();
    let initramfs = r.piece();
    let flags = r.u8();
    let kernel = r.rest();
    let Ok(cmdline) = std::str::from_utf8(cmdline) else {
        return;
    };
    let world = WORLD.get_or_init(|| {
        Mutex::new(World {
            mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])
                .expect("guest memory"),
            kernel: memfd(c"kernel", 0),
            initramfs: memfd(c"initramfs", 0),
        })
    });
    let mut w = nimbus_fuzz::lock(world);
    let w = &mut *w;
    refill(&mut w.kernel, kernel);
    refill(&mut w.initramfs, initramfs);
    let spec = BootSpec {
        kernel: &mut w.kernel,
        initramfs: (flags & 1 != 0).then_some(&mut w.initramfs),
        cmdline,
        ram_size: RAM,
        rsdp: 0xa_0000,
        pci_segments: 2,
    };
    let Ok(entry) = load_kernel(&w.mem, spec) else {
        return;
    };
    let mut got = vec![0u8; cmdline.len() + 1];
    w.mem
        .read_slice(&mut got, GuestAddress(CMDLINE_START))
        .expect("command line readable");
    assert_eq!(
        &got[..cmdline.len()],
        cmdline.as_bytes(),
        "command line in memory"
    );
    assert_eq!(got[cmdline.len()], 0, "command line NUL");
    match entry {
        BootEntry::Pvh { .. } => {}
        BootEntry::Linux64 {
            entry,
            zero_page,
            pml4,
            stack,
        } => {
            assert!(entry < RAM, "64-bit entry {entry:#x} outside RAM");
            assert_eq!((zero_page, pml4, stack), (0x7000, 0x9000, 0x8ff0));
        }
    }
});
