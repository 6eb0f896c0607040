//! A real TAP device, in a fresh network namespace: frames cross between the TAP descriptor
//! (with its virtio-net header) and an `AF_PACKET` socket on the interface. Needs root and
//! `/dev/net/tun`; without them each test prints `SKIPPED (...)` and passes.

#![allow(clippy::unwrap_used)]

use std::io::{IoSlice, IoSliceMut};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use net_util::testing::{in_new_netns, PacketSocket};
use net_util::{features, tap_offload_flags, MacAddr, NetError, Tap, VNET_HDR_LEN};

const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental

fn frame(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i as u8) ^ seed));
    f
}

/// Reads packets from `tap` until one carries `ETHERTYPE`, for up to two seconds.
fn read_tap_frame(tap: &Tap) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 70000];
    loop {
        match tap.read_packet(&mut [IoSliceMut::new(&mut buf)]) {
            Ok(n)
                if n >= VNET_HDR_LEN + 14
                    && buf[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes() =>
            {
                return buf[..n].to_vec();
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no frame from the TAP");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("TAP read: {e}"),
        }
    }
}

#[test]
fn tap_configuration_and_frames_both_ways() {
    in_new_netns("tap_configuration_and_frames_both_ways", || {
        let taps = Tap::open_named("nimbus-t0", 1).unwrap();
        assert_eq!(taps.len(), 1);
        let tap = &taps[0];
        assert_eq!(tap.if_name(), "nimbus-t0");
        assert!(!tap.is_multi_queue());

        let host_mac: MacAddr = "02:aa:bb:cc:dd:01".parse().unwrap();
        tap.set_mac(host_mac).unwrap();
        tap.set_ip_addr(
            Ipv4Addr::new(192, 168, 249, 1),
            Ipv4Addr::new(255, 255, 255, 0),
        )
        .unwrap();
        tap.set_mtu(1400).unwrap();
        assert!(!tap.is_up().unwrap());
        tap.set_up().unwrap();
        assert!(tap.is_up().unwrap());
        assert_eq!(tap.mac().unwrap(), host_mac);
        assert_eq!(
            tap.ip_addr().unwrap(),
            (
                Ipv4Addr::new(192, 168, 249, 1),
                Ipv4Addr::new(255, 255, 255, 0)
            )
        );
        tap.set_offload(tap_offload_flags(features(1, None)))
            .unwrap();
        tap.set_offload(0).unwrap();

        let sock = PacketSocket::bind("nimbus-t0");
        let guest_mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

        // Guest → host: header (no offload) + frame written to the TAP arrive on the wire.
        let out = frame(host_mac.bytes(), guest_mac, 200, 0x5a);
        let hdr = [0u8; VNET_HDR_LEN];
        let n = tap
            .write_packet(&[IoSlice::new(&hdr), IoSlice::new(&out)])
            .unwrap();
        assert_eq!(n, VNET_HDR_LEN + out.len());
        let seen = sock
            .recv_ethertype(ETHERTYPE, Duration::from_secs(2))
            .expect("frame written to the TAP not seen on the interface");
        assert_eq!(seen, out);

        // Host → guest: a frame sent out of the interface is read from the TAP behind a
        // virtio-net header.
        let back = frame(guest_mac, host_mac.bytes(), 300, 0xa5);
        sock.send(&back);
        let got = read_tap_frame(tap);
        assert_eq!(&got[VNET_HDR_LEN..], &back[..]);
        assert_eq!(got[1], 0, "no GSO without offloads");

        // An invalid virtio-net header is refused by the TAP, not passed on.
        let mut bad = [0u8; VNET_HDR_LEN];
        bad[1] = 0x42; // unknown gso_type
        assert!(tap
            .write_packet(&[IoSlice::new(&bad), IoSlice::new(&out)])
            .is_err());
    });
}

#[test]
fn multiqueue_taps_and_adopted_descriptors() {
    in_new_netns("multiqueue_taps_and_adopted_descriptors", || {
        let taps = Tap::open_named("nimbus-mq", 2).unwrap();
        assert_eq!(taps.len(), 2);
        assert!(taps
            .iter()
            .all(|t| t.is_multi_queue() && t.if_name() == "nimbus-mq"));
        taps[1].set_queue_enabled(false).unwrap();
        taps[1].set_queue_enabled(false).unwrap();
        taps[1].set_queue_enabled(true).unwrap();

        // The interface exists as a multiqueue TAP: a single-queue open is refused, naming it.
        match Tap::open_named("nimbus-mq", 1) {
            Err(e @ NetError::CreateTap { .. }) => assert!(e.to_string().contains("nimbus-mq")),
            other => panic!("unexpected {other:?}"),
        }

        // A duplicate of a queue's descriptor, as a manager would pass it.
        // SAFETY: dup returns a new descriptor owned by nobody else.
        let dup = unsafe { libc::dup(taps[0].as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is ours to own.
        let adopted = unsafe { Tap::from_raw_fd(dup) }.unwrap();
        assert_eq!(adopted.if_name(), "nimbus-mq");
        assert!(adopted.is_multi_queue());
        let clone = taps[1].try_clone().unwrap();
        assert_ne!(clone.as_raw_fd(), taps[1].as_raw_fd());
        assert_eq!(clone.if_name(), "nimbus-mq");
        clone.set_queue_enabled(false).unwrap();
        clone.set_queue_enabled(true).unwrap();

        // The kernel picks a name for an empty one.
        let auto = Tap::open_named("", 1).unwrap();
        assert!(!auto[0].if_name().is_empty());
    });
}

#[test]
fn descriptors_that_are_not_vnet_taps_are_refused() {
    in_new_netns("descriptors_that_are_not_vnet_taps_are_refused", || {
        for (flags, why) in [
            (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR, "TUN"),
            (libc::IFF_TAP | libc::IFF_NO_PI, "IFF_VNET_HDR"),
        ] {
            // SAFETY: plain open of the clone device.
            let raw =
                unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            assert!(raw >= 0);
            // SAFETY: just opened, ours.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: all zeroes is a valid ifreq.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(b"nimbus-bad") {
                *d = *s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the live ifreq.
            let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
            assert_eq!(ret, 0);
            match Tap::from_fd(fd) {
                Err(e @ NetError::NotTap { .. }) => {
                    assert!(e.to_string().contains(why), "{e} should mention {why}")
                }
                other => panic!("{why}: unexpected {other:?}"),
            }
        }
    });
}
