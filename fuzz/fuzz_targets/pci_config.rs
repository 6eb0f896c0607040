//! PCI configuration space and MSI-X: guest accesses through the 0xcf8/0xcfc ports and ECAM
//! (`pci::PciConfigIo`, `pci::PciEcam`, `pci::PciBus`, `pci::PciConfiguration` with its write
//! masks, BAR sizing and relocation onto the MMIO bus) and through BAR 0 on the MMIO bus (the
//! MSI-X table and PBA, `pci::Msix`), against two virtio-pci devices as the VMM builds them.
//!
//! Input: operations, each an opcode byte and its operands:
//!
//! | op % 8 | operands | access |
//! | --- | --- | --- |
//! | 0 | u32 | write the 0xcf8 address register |
//! | 1 | u8 byte, u8 len, u32 data | write 0xcfc + byte |
//! | 2 | u8 byte, u8 len | read 0xcfc + byte |
//! | 3 | u32 offset, u8 len, u32 data | ECAM write (on the MMIO bus): segment 1's area when bit 28 is set |
//! | 4 | u8 slot, u16 reg | read a register through ECAM and through 0xcf8; must agree; segment 1 through its area |
//! | 5 | u8 slot, u16 offset, u8 len, u64 data | MMIO write into a device's BAR 0 as placed at start |
//! | 6 | u8 slot, u16 offset, u8 len | MMIO read there |
//! | 7 | u8 slot, u8 vector | the device raises a queue (or configuration) interrupt |
//!
//! `len` is 1, 2, 4 or 8 (`len % 4`). Checks: ECAM and 0xcf8 give the same answers; each device
//! is seen on its own segment only (0xcf8 reaches segment 0 only); after every
//! configuration write each decoded BAR reaches its own device (unless the guest placed it
//! over another BAR or ECAM); only existing MSI-X vectors are ever triggered.
#![no_main]

use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::{PciSetup, Reader, BAR_BASE, ECAM1_SIZE, ECAM1_START, ECAM_START};
use virtio_devices::transport::BAR0_SIZE;

fn len(b: u8) -> usize {
    1 << (b % 4)
}

fuzz_target!(|data: &[u8]| {
    let mut s = PciSetup::new(None);
    let mut r = Reader::new(data);
    let mut ops = 0;
    while !r.is_empty() && ops < 256 {
        ops += 1;
        match r.u8() % 8 {
            0 => {
                let a = r.u32();
                s.cf8.write(0, &a.to_le_bytes());
            }
            1 => {
                let byte = u64::from(r.u8() % 4);
                let n = len(r.u8());
                let v = u64::from(r.u32()).to_le_bytes();
                s.cf8.write(4 + byte, &v[..n]);
                s.check_bars();
            }
            2 => {
                let byte = u64::from(r.u8() % 4);
                let mut d = vec![0u8; len(r.u8())];
                s.cf8.read(4 + byte, &mut d);
            }
            3 => {
                let raw = r.u32();
                let off = u64::from(raw & 0x0fff_ffff);
                let at = if raw & 0x1000_0000 != 0 {
                    ECAM1_START + off % ECAM1_SIZE
                } else {
                    ECAM_START + off
                };
                let n = len(r.u8());
                let v = u64::from(r.u32()).to_le_bytes();
                s.mmio.write(at, &v[..n]);
                s.check_bars();
            }
            4 => {
                let dev = u32::from(r.u8() % 4);
                let reg = u32::from(r.u16() % 1024);
                // The PCI configuration access window reads the BAR (the ISR read clears it):
                // compare the other registers only.
                let compare = reg < 16 || reg >= 64;
                let mut e = [0u8; 4];
                s.mmio
                    .read(ECAM_START + u64::from(dev << 15 | reg << 2), &mut e);
                let addr = 0x8000_0000 | dev << 11 | (reg & 0x3f) << 2 | (reg & 0x3c0) << 18;
                s.cf8.write(0, &addr.to_le_bytes());
                let mut c = [0u8; 4];
                s.cf8.read(4, &mut c);
                if compare {
                    assert_eq!(
                        e, c,
                        "ECAM and 0xcf8 disagree on device {dev} register {reg}"
                    );
                }
                let mut e1 = [0u8; 4];
                s.mmio
                    .read(ECAM1_START + u64::from(dev << 15 | reg << 2), &mut e1);
                if reg == 0 {
                    // Vendor and device IDs are read-only: each segment shows its own host
                    // bridge at 0 and its own device (slot 1 on segment 0, slot 2 on 1).
                    let (id0, id1) = (u32::from_le_bytes(e), u32::from_le_bytes(e1));
                    let present = |id: u32| id & 0xffff != 0xffff;
                    assert_eq!(
                        (present(id0), present(id1)),
                        (dev != 2 && dev != 3, dev != 1 && dev != 3),
                        "device {dev}: segment 0 reads {id0:#x}, segment 1 reads {id1:#x}"
                    );
                }
            }
            5 => {
                let slot = u64::from(r.u8() % 2);
                let off = u64::from(r.u16()) % BAR0_SIZE;
                let n = len(r.u8());
                let v = r.u64().to_le_bytes();
                s.mmio.write(BAR_BASE + slot * BAR0_SIZE + off, &v[..n]);
            }
            6 => {
                let slot = u64::from(r.u8() % 2);
                let off = u64::from(r.u16()) % BAR0_SIZE;
                let mut d = vec![0u8; len(r.u8())];
                s.mmio.read(BAR_BASE + slot * BAR0_SIZE + off, &mut d);
            }
            _ => {
                let slot = usize::from(r.u8() % 2);
                let v = r.u8();
                s.states[slot].signal((v < 0x80).then_some(u16::from(v % 4)));
            }
        }
    }
    for v in &s.vectors {
        for &t in nimbus_fuzz::lock(&v.triggered).iter() {
            assert!(t < 3, "vector {t} triggered; the devices have 3");
        }
    }
});
