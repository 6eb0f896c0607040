//! ACPI memory hotplug as an OS without an AML interpreter does it, from the lifecycle mode's
//! GED interrupt (event bit 3): what the DSDT's `\_SB_.MHPC.MSCN` and the memory devices'
//! `_CRS` do, on the register block at the I/O ports 0x640..0x657 (see the VMM's
//! `devices::memory_hotplug`). For each slot with an insertion pending: acknowledge it, report
//! `INFO memhp.added slot=<n> base=<hex> size=<hex>`, then prove the RAM works — a pattern
//! written and read back on its first and last pages and a few in between, through the
//! identity map (which covers the whole guest physical space) — and report
//! `INFO memhp.usable slot=<n> checked=<pages>`, or `TEST memhp.usable FAIL ...`.

use crate::arch::{inl, outl};
use crate::{phys, println, report};

/// The register block: MSEL, MSTS, MBAS (64-bit), MLEN (64-bit).
const PORT: u16 = 0x640;
const MSEL: u16 = PORT;
const MSTS: u16 = PORT + 4;
const MBAS: u16 = PORT + 8;
const MLEN: u16 = PORT + 0x10;
/// MSTS bits: enabled, insert pending (write 1 to acknowledge).
const ENABLED: u32 = 1 << 0;
const INSERTING: u32 = 1 << 1;
/// Slots the VMM has (`layout::MEMORY_HOTPLUG_SLOTS`).
const SLOTS: u32 = 8;
const PAGE: u64 = 4096;
/// Pages checked between the first and the last.
const INNER_PAGES: u64 = 6;

fn read64(port: u16) -> u64 {
    u64::from(inl(port)) | u64::from(inl(port + 4)) << 32
}

/// Handles the memory hotplug event: every slot with an insertion pending.
pub fn scan() {
    for slot in 0..SLOTS {
        outl(MSEL, slot);
        let status = inl(MSTS);
        if status & INSERTING == 0 {
            continue;
        }
        outl(MSTS, INSERTING);
        let base = read64(MBAS);
        let size = read64(MLEN);
        println!("INFO memhp.added slot={slot} base={base:#x} size={size:#x}");
        if status & ENABLED == 0 {
            report::check(
                "memhp.usable",
                false,
                format_args!("slot={slot}: insertion pending but not enabled"),
            );
            continue;
        }
        match check_ram(base, size) {
            Ok(pages) => println!("INFO memhp.usable slot={slot} checked={pages}"),
            Err(why) => report::check(
                "memhp.usable",
                false,
                format_args!("slot={slot} base={base:#x} size={size:#x}: {why}"),
            ),
        }
    }
}

/// Writes a pattern (each word its own address, mixed) over the first, last and a few pages in
/// between of `[base, base + size)` and reads it back. Returns the pages checked.
fn check_ram(base: u64, size: u64) -> Result<u64, &'static str> {
    if size < PAGE || !base.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
        return Err("not a whole number of pages");
    }
    if !phys::readable(base, size) {
        return Err("outside the identity map");
    }
    let last = size / PAGE - 1;
    let mut checked = 0;
    let mut previous = None;
    // The first page, INNER_PAGES evenly spaced, the last page (fewer for a small range).
    for i in 0..=INNER_PAGES + 1 {
        let page = last * i / (INNER_PAGES + 1);
        if previous == Some(page) {
            continue;
        }
        previous = Some(page);
        check_page(base + page * PAGE)?;
        checked += 1;
    }
    Ok(checked)
}

fn pattern(addr: u64) -> u64 {
    addr ^ 0xa5a5_5a5a_c3c3_3c3c
}

fn check_page(page: u64) -> Result<(), &'static str> {
    for addr in (page..page + PAGE).step_by(8) {
        phys::mmio_write_any(addr, 8, pattern(addr));
    }
    for addr in (page..page + PAGE).step_by(8) {
        if phys::mmio_read_any(addr, 8) != pattern(addr) {
            return Err("pattern read back wrong");
        }
    }
    Ok(())
}
