//! virtio-pmem checks (`virtio.pmem<n>.*`): the region the device
//! configuration names (where and how large), the host file's marker read
//! through the identity map, a guest write read back, and a FLUSH request.

use core::fmt::Write;

use crate::report::{Ascii, StrBuf};
use crate::stage2::{self, check_named, Keys};
use crate::virtio::{Buf, DmaPage, IrqTally, Transport, F_VERSION_1};
use crate::{expect, phys};

/// `VIRTIO_PMEM_REQ_TYPE_FLUSH`.
const REQ_FLUSH: u32 = 0;
/// Granularity of a pmem region (2 MiB).
const ALIGN: u64 = 2 << 20;
/// Where the guest's write goes inside the region.
pub const WRITE_OFFSET: u64 = 4096;
/// The guest puts this in the response before submitting (a device that
/// does not answer leaves it).
const UNWRITTEN: u32 = 0xffff_ffff;

/// Drives pmem device `n` (see docs/test-guest.md for its keys).
pub fn run(mut t: Transport, n: usize, keys: &Keys<'_>, apic_id: u32) {
    let mut name: StrBuf<24> = StrBuf::new();
    let _ = write!(name, "virtio.pmem{n}");
    let name = name.as_str();
    // Configuration: le64 start, le64 size.
    let Some(([queue, _], msix_err)) = stage2::bring_up(&mut t, name, 8, F_VERSION_1, 1, apic_id)
    else {
        return;
    };
    let (start, size) = t
        .read_config(|r| {
            let q = |o| u64::from(r.r32(o)) | (u64::from(r.r32(o + 4)) << 32);
            (q(0), q(8))
        })
        .unwrap_or((0, 0));
    let want_size = keys.get("pmem", n, "size").and_then(expect::parse_size);
    let region_ok = start != 0
        && start % ALIGN == 0
        && size != 0
        && size % ALIGN == 0
        && start >= 1 << 32
        && phys::readable(start, size)
        && want_size.is_none_or(|w| w == size);
    check_named(
        name,
        "region",
        region_ok,
        format_args!(
            "start={start:#x} size={size:#x} expected_size={:#x} (2 MiB aligned, above 4 GiB, \
             identity-mapped)",
            want_size.unwrap_or(0)
        ),
    );
    if !region_ok {
        return;
    }
    if let Some(marker) = keys.get("pmem", n, "marker") {
        let mut got = [0u8; 64];
        let len = marker.len().min(got.len());
        phys::read_bytes(start, &mut got[..len]);
        check_named(
            name,
            "marker",
            &got[..len] == marker.as_bytes(),
            format_args!(
                "at {start:#x}: \"{}\" expected \"{}\"",
                Ascii(&got[..len]),
                Ascii(marker.as_bytes())
            ),
        );
    }
    if let Some(text) = keys.get("pmem", n, "write") {
        let addr = start + WRITE_OFFSET;
        for (i, b) in text.bytes().enumerate() {
            phys::mmio_write8(addr + i as u64, b);
        }
        let mut back = [0u8; 64];
        let len = text.len().min(back.len());
        phys::read_bytes(addr, &mut back[..len]);
        check_named(
            name,
            "write",
            &back[..len] == text.as_bytes(),
            format_args!(
                "{} bytes at {addr:#x}, read back \"{}\"",
                text.len(),
                Ascii(&back[..len])
            ),
        );
    }
    let Some(mut q) = queue else {
        check_named(name, "flush", false, format_args!("queue 0 not set up"));
        return;
    };
    let Some(page) = DmaPage::alloc() else {
        check_named(name, "flush", false, format_args!("out of DMA memory"));
        return;
    };
    page.write_bytes(0, &REQ_FLUSH.to_le_bytes());
    page.write_bytes(64, &UNWRITTEN.to_le_bytes());
    let mut tally = IrqTally::default();
    let c = q.transact(
        &[
            Buf {
                addr: page.phys(0),
                len: 4,
                write: false,
            },
            Buf {
                addr: page.phys(64),
                len: 4,
                write: true,
            },
        ],
        true,
    );
    tally.add(&c);
    let mut resp = [0u8; 4];
    page.read_bytes(64, &mut resp);
    let ret = u32::from_le_bytes(resp);
    check_named(
        name,
        "flush",
        c.used.is_some_and(|(_, len)| len >= 4) && ret == 0,
        format_args!("used={:?} ret={ret:#x} in {} us", c.used, c.us),
    );
    match msix_err {
        Some(w) => check_named(name, "msix", false, format_args!("{w}")),
        None => stage2::check_msix(&t, name, &tally, core::slice::from_ref(&Some(q))),
    }
}
