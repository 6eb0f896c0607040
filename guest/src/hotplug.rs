//! ACPI PCI hotplug as an OS without an AML interpreter does it, from the lifecycle mode's
//! GED interrupt (event bit 1): for each PCI segment, select it (PSEG), read the slots added
//! (PCIU) and the slots the host wants ejected (PCID) — both cleared by the read — report an
//! added slot with its vendor and device IDs (segment 0, through 0xcf8), and eject a slot the
//! host asked for by writing its bit to B0EJ, as the DSDT's `_EJ0` does. Lines:
//! `INFO hotplug.added seg=<s> slot=<n> id=<vendor>:<device>` and
//! `INFO hotplug.ejected seg=<s> slot=<n>`.

use crate::arch::{inl, outl};
use crate::println;

/// The register block (the DSDT's `\_SB_.PHPR` region): PCIU, PCID, B0EJ, PSEG.
const PORT: u16 = 0x610;
const PCIU: u16 = PORT;
const PCID: u16 = PORT + 4;
const B0EJ: u16 = PORT + 8;
const PSEG: u16 = PORT + 12;
/// PCI segments the VMM may have.
const MAX_SEGMENTS: u32 = 16;

/// Vendor and device IDs of `slot` on segment 0's bus 0, through the 0xcf8 ports.
fn ids(slot: u32) -> u32 {
    outl(0xcf8, 0x8000_0000 | slot << 11);
    inl(0xcfc)
}

/// Handles the hotplug events of every segment.
pub fn scan() {
    for seg in 0..MAX_SEGMENTS {
        outl(PSEG, seg);
        // A segment the machine does not have is not selected.
        if inl(PSEG) != seg {
            continue;
        }
        let up = inl(PCIU);
        let down = inl(PCID);
        for slot in (1..32).filter(|s| up & 1 << s != 0) {
            let id = if seg == 0 { ids(slot) } else { u32::MAX };
            println!(
                "INFO hotplug.added seg={seg} slot={slot} id={:04x}:{:04x}",
                id & 0xffff,
                id >> 16
            );
        }
        for slot in (1..32).filter(|s| down & 1 << s != 0) {
            outl(B0EJ, 1 << slot);
            println!("INFO hotplug.ejected seg={seg} slot={slot}");
        }
    }
}
