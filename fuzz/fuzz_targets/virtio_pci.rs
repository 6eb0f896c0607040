//! The virtio 1.2 modern PCI transport (`virtio_devices::transport::VirtioPciDevice`): common
//! configuration (feature negotiation, the status machine, queue setup and its validation at
//! DRIVER_OK, vectors), ISR, device configuration, notifications, MSI-X, the PCI configuration
//! access capability, and activation/reset directly or through `DeviceControl` as the VMM runs
//! them; BAR 0 moving with its ioeventfds.
//!
//! Input: byte 0 bit 0 puts activation and reset behind a `DeviceControl` (run at op 3, as the
//! command loop would); then operations on the device in slot 1, whose BAR 0 decodes at start:
//!
//! | op % 6 | operands | access |
//! | --- | --- | --- |
//! | 0 | u8 region, u16 offset, u8 len, u64 data | BAR 0 write at `region % 8 * 0x1000 + offset % 0x1000` |
//! | 1 | u8 region, u16 offset, u8 len | BAR 0 read |
//! | 2 | u16 reg, u8 byte, u8 len, u32 data | configuration write (through the bus) |
//! | 3 | | the command loop runs what is pending |
//! | 4 | u8 vector | the device raises a queue (or configuration) interrupt |
//! | 5 | u8 queue | MMIO write to the queue's notification address |
//!
//! `len` is 1, 2, 4 or 8. Checks: FEATURES_OK only sticks for features within the offer that
//! include VERSION_1; the device is activated only with valid queues and accepted features,
//! never twice without a reset (the fake device asserts it); ioeventfds are registered once and
//! only registered ones are removed; only existing MSI-X vectors fire, and only while MSI-X is
//! enabled and neither the function nor the vector is masked.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::{lock, PciSetup, Reader, DUMMY_FEATURES};
use pci::PciDevice;
use virtio_devices::transport::{DeviceControl, NOTIFY_MULTIPLIER};

#[derive(Debug, Default)]
struct Control(AtomicBool);

impl DeviceControl for Control {
    fn pending(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The configuration register holding the MSI-X capability's header (found through the
/// capability list).
fn msix_capability(d: &mut dyn PciDevice) -> usize {
    let mut at = (d.read_config_register(0x34 / 4) & 0xfc) as usize;
    for _ in 0..48 {
        let header = d.read_config_register(at / 4);
        if header & 0xff == 0x11 {
            return at / 4;
        }
        at = ((header >> 8) & 0xfc) as usize;
    }
    panic!("no MSI-X capability");
}

/// Every vector fired since the last call was deliverable: MSI-X enabled, the function not
/// masked, the vector's entry not masked (state after the operation that fired it).
fn check_deliveries(s: &PciSetup, msix: usize, fired: &mut usize) {
    let triggered = lock(&s.vectors[0].triggered).clone();
    if triggered.len() == *fired {
        return;
    }
    let mut d = lock(&s.devices[0]);
    let control = d.read_config_register(msix) >> 16;
    assert_ne!(control & 0x8000, 0, "vector fired with MSI-X disabled");
    assert_eq!(control & 0x4000, 0, "vector fired with the function masked");
    for &v in &triggered[*fired..] {
        assert!(v < 3, "vector {v} triggered; the device has 3");
        let mut entry = [0u8; 4];
        d.read_bar(0, 0x4000 + 16 * u64::from(v) + 12, &mut entry);
        assert_eq!(entry[0] & 1, 0, "masked vector {v} fired");
    }
    *fired = triggered.len();
}

fn len(b: u8) -> usize {
    1 << (b % 4)
}

const FEATURES_OK: u8 = 8;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let control = (r.u8() & 1 != 0).then(|| Arc::new(Control::default()));
    let s = PciSetup::new(control.clone().map(|c| c as Arc<dyn DeviceControl>));
    // COMMAND.MEMORY: BAR 0 decodes (and the ioeventfds are registered).
    lock(&s.pci).config_write(0, 1, 0, 1, 0, &[2, 0]);
    let dev = &s.devices[0];
    let msix = msix_capability(&mut *lock(dev));
    let mut fired = 0;
    let mut ops = 0;
    while !r.is_empty() && ops < 512 {
        ops += 1;
        check_deliveries(&s, msix, &mut fired);
        match r.u8() % 6 {
            0 => {
                let off = u64::from(r.u8() % 8) * 0x1000 + u64::from(r.u16() % 0x1000);
                let n = len(r.u8());
                let v = r.u64().to_le_bytes();
                lock(dev).write_bar(0, off, &v[..n]);
            }
            1 => {
                let off = u64::from(r.u8() % 8) * 0x1000 + u64::from(r.u16() % 0x1000);
                let mut d = vec![0u8; len(r.u8())];
                lock(dev).read_bar(0, off, &mut d);
            }
            2 => {
                let reg = usize::from(r.u16() % 1024);
                let byte = u64::from(r.u8() % 4);
                let n = len(r.u8()).min(4);
                let v = r.u32().to_le_bytes();
                if byte as usize + n <= 4 && byte % n as u64 == 0 {
                    lock(&s.pci).config_write(0, 1, 0, reg, byte, &v[..n]);
                }
            }
            3 => {
                if let Some(c) = &control {
                    if c.0.swap(false, Ordering::SeqCst) {
                        lock(dev).run_pending();
                    }
                }
            }
            4 => {
                let v = r.u8();
                s.states[0].signal((v < 0x80).then_some(u16::from(v % 4)));
            }
            _ => {
                let q = u64::from(r.u8() % 4);
                let bar0 = lock(dev).bar0();
                if let Some(b) = bar0 {
                    s.mmio
                        .write(b + 0x3000 + q * u64::from(NOTIFY_MULTIPLIER), &[0, 0]);
                }
            }
        }
    }
    check_deliveries(&s, msix, &mut fired);
    // Feature negotiation: FEATURES_OK only with acceptable features.
    let mut d = lock(dev);
    let mut status = [0u8];
    d.read_bar(0, 0x14, &mut status);
    if status[0] & FEATURES_OK != 0 {
        let mut select = [0u8; 4];
        d.read_bar(0, 0x08, &mut select);
        let mut features = 0u64;
        for half in 0..2u32 {
            d.write_bar(0, 0x08, &half.to_le_bytes());
            let mut v = [0u8; 4];
            d.read_bar(0, 0x0c, &mut v);
            features |= u64::from(u32::from_le_bytes(v)) << (32 * half);
        }
        d.write_bar(0, 0x08, &select);
        assert_eq!(
            features & !DUMMY_FEATURES,
            0,
            "FEATURES_OK with features {features:#x}"
        );
        assert_ne!(
            features & virtio_devices::VIRTIO_F_VERSION_1,
            0,
            "FEATURES_OK without VERSION_1"
        );
    }
});
