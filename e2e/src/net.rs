//! virtio-net from the host side: the test frames, network namespaces, packet sockets on the
//! VMM's TAP, and the exchange that completes the guest's `rx` and `tx` checks.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::RunningVm;

/// Ethertype of the virtio-net test frames (IEEE 802 local experimental 1).
pub const NET_TEST_ETHERTYPE: u16 = 0x88b5;

/// Payload length of test frame `i` is `NET_PAYLOAD_SIZES[i % 8]` (the
/// guest's definition, docs/test-guest.md).
pub const NET_PAYLOAD_SIZES: [usize; 8] = [1500, 64, 1024, 333, 1499, 65, 800, 257];

/// The Ethernet broadcast address (destination of the guest's frames).
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Source address the host side uses for the frames it sends to the guest
/// (locally administered; the guest does not check it).
pub const HOST_TEST_MAC: [u8; 6] = [0x02, 0x4e, 0x49, 0x4d, 0x42, 0x01];

/// Which way a test frame travels: its marker word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetDir {
    /// Guest to host, payload `NIMBUS-NET-TX <i>`.
    Tx,
    /// Host to guest, payload `NIMBUS-NET-RX <i>`.
    Rx,
}

impl NetDir {
    fn prefix(self) -> &'static str {
        match self {
            NetDir::Tx => "NIMBUS-NET-TX ",
            NetDir::Rx => "NIMBUS-NET-RX ",
        }
    }
}

/// Payload of test frame `i`: the marker `NIMBUS-NET-TX <i>` (or `-RX`), a
/// NUL byte, then byte `((7 * o + 13 * i) mod 256) ^ 0x5a` at each payload
/// offset `o`, up to `NET_PAYLOAD_SIZES[i % 8]` bytes.
pub fn net_test_payload(dir: NetDir, i: u32) -> Vec<u8> {
    let len = NET_PAYLOAD_SIZES[i as usize % NET_PAYLOAD_SIZES.len()];
    let marker = format!("{}{i}", dir.prefix()).into_bytes();
    (0..len)
        .map(|o| match o.cmp(&marker.len()) {
            std::cmp::Ordering::Less => marker[o],
            std::cmp::Ordering::Equal => 0,
            std::cmp::Ordering::Greater => {
                ((o as u32).wrapping_mul(7).wrapping_add(i.wrapping_mul(13)) as u8) ^ 0x5a
            }
        })
        .collect()
}

/// Test frame `i`: `dst`, `src`, ethertype [`NET_TEST_ETHERTYPE`], then
/// [`net_test_payload`]. The guest transmits `net_test_frame(Tx, i,
/// BROADCAST_MAC, guest_mac)`; the host sends `net_test_frame(Rx, i,
/// guest_mac, any)`.
pub fn net_test_frame(dir: NetDir, i: u32, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&NET_TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&net_test_payload(dir, i));
    f
}

/// The index of a test frame travelling `dir` (ethertype and marker
/// checked, nothing else), if `frame` is one.
pub fn net_test_frame_index(frame: &[u8], dir: NetDir) -> Option<u32> {
    if frame.len() < 14 || frame[12..14] != NET_TEST_ETHERTYPE.to_be_bytes() {
        return None;
    }
    let rest = frame[14..].strip_prefix(dir.prefix().as_bytes())?;
    let end = rest.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Checks the guest's transmitted frames as captured on the TAP: frames
/// `0..count` each exactly once and byte for byte `net_test_frame(Tx, i,
/// BROADCAST_MAC, guest_mac)`; frames that are not TX test frames are
/// ignored.
///
/// # Errors
/// Names the missing, duplicated and wrong frames.
pub fn verify_net_tx_frames(
    frames: &[Vec<u8>],
    count: u32,
    guest_mac: [u8; 6],
) -> Result<(), String> {
    let mut seen = vec![0u32; count as usize];
    let mut problems = Vec::new();
    for f in frames {
        let Some(i) = net_test_frame_index(f, NetDir::Tx) else {
            continue;
        };
        let Some(n) = seen.get_mut(i as usize) else {
            problems.push(format!("frame NIMBUS-NET-TX {i}: index beyond {count}"));
            continue;
        };
        *n += 1;
        let want = net_test_frame(NetDir::Tx, i, BROADCAST_MAC, guest_mac);
        if *f != want {
            let at = f.iter().zip(&want).position(|(a, b)| a != b);
            problems.push(format!(
                "frame NIMBUS-NET-TX {i}: {} bytes (expected {}), first difference at {at:?}",
                f.len(),
                want.len()
            ));
        }
    }
    for (i, &n) in seen.iter().enumerate() {
        match n {
            1 => {}
            0 => problems.push(format!("frame NIMBUS-NET-TX {i} not captured")),
            n => problems.push(format!("frame NIMBUS-NET-TX {i} captured {n} times")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} frame(s) captured, problems:\n  {}",
            frames.len(),
            problems.join("\n  ")
        ))
    }
}

/// Formats a MAC address as `xx:xx:xx:xx:xx:xx` (the form of `net.mac`).
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `ip` with `args`; returns stdout.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace `nimbus-<tag>-<pid>-<n>` (`ip netns add`), deleted
/// when dropped, also when a test panics. Needs root (CAP_SYS_ADMIN and
/// CAP_NET_ADMIN) and iproute2.
///
/// A VMM runs inside it through [`NetNs::wrap`] (`ip netns exec`), so the
/// TAP it creates lives there, invisible to the host and to other tests;
/// [`PacketSocket::open`] then talks to that TAP from the test process.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace (only the loopback device, down).
    ///
    /// # Panics
    /// If `ip netns add` fails (not root, no iproute2).
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("nimbus-{tag}-{}-{n}", std::process::id());
        // A leftover of a killed run with a recycled pid.
        let _ = ip(&["netns", "del", &name]);
        if let Err(e) = ip(&["netns", "add", &name]) {
            panic!("cannot create network namespace {name} (needs root and iproute2): {e}");
        }
        NetNs { name }
    }

    /// The namespace's name (for `ip netns exec <name>` / `ip -n <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/var/run/netns/<name>` (for `setns`).
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `cmd` rewritten to run inside the namespace: `ip netns exec <name>
    /// <program> <args...>`, with the same environment changes and working
    /// directory (standard I/O settings are not carried over; [`run_vm`](crate::run_vm) and
    /// [`spawn_vm`](crate::spawn_vm) set them). `ip netns exec` execs the program, so the
    /// process started is the program itself.
    pub fn wrap(&self, cmd: Command) -> Command {
        let mut w = Command::new("ip");
        w.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            w.current_dir(dir);
        }
        w
    }

    /// Runs `ip -n <name> <args...>` and returns its stdout.
    ///
    /// # Errors
    /// If `ip` fails; the message has its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// `sll_pkttype` of frames the interface itself sent.
const PACKET_OUTGOING: u8 = 4;

/// An AF_PACKET socket bound to one interface inside a [`NetNs`], for one
/// ethertype: frames written with [`PacketSocket::send`] leave through the
/// interface (on a TAP: they reach the VMM, i.e. the guest's receive
/// queue); [`PacketSocket::recv`] returns the frames the interface receives
/// (on a TAP: what the guest transmitted), never the ones sent from the
/// host side.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
    ethertype: u16,
}

impl PacketSocket {
    /// Waits at most `timeout` for `ifname` to appear in `ns` (a VMM
    /// creates its TAP at start-up), sets it up (`ip -n <ns> link set <if>
    /// up`) and opens a socket bound to it for `ethertype`. The socket is
    /// created on a thread that has entered the namespace (`setns`), so it
    /// belongs there; the test's other threads stay in the host namespace.
    ///
    /// # Errors
    /// If the interface does not appear in time or a system call fails.
    pub fn open(
        ns: &NetNs,
        ifname: &str,
        ethertype: u16,
        timeout: Duration,
    ) -> Result<Self, String> {
        let path = ns.path();
        let ns_name = ns.name().to_string();
        let ifname = ifname.to_string();
        let deadline = Instant::now() + timeout;
        let worker = thread::spawn(move || -> Result<PacketSocket, String> {
            use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
            let nsf = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // SAFETY: plain system call on an fd we own; it changes the
            // network namespace of this (short-lived) thread only.
            if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            let cname = std::ffi::CString::new(ifname.as_str())
                .map_err(|_| format!("bad interface name {ifname:?}"))?;
            let ifindex = loop {
                // SAFETY: `cname` is a valid NUL-terminated string.
                let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
                if idx != 0 {
                    break i32::try_from(idx).map_err(|_| format!("ifindex {idx}"))?;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "interface {ifname} did not appear in namespace {ns_name} within {timeout:.1?}"
                    ));
                }
                thread::sleep(Duration::from_millis(10));
            };
            ip(&["-n", &ns_name, "link", "set", "dev", &ifname, "up"])?;
            let proto = i32::from(ethertype.to_be());
            // SAFETY: plain system call; the result is checked.
            let raw = unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto)
            };
            if raw < 0 {
                return Err(format!(
                    "socket(AF_PACKET): {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = ifindex;
            // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r != 0 {
                return Err(format!(
                    "bind(AF_PACKET, {ifname}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(PacketSocket {
                fd,
                ifindex,
                ethertype,
            })
        });
        worker
            .join()
            .unwrap_or_else(|_| Err("the namespace thread panicked".to_string()))
    }

    /// The interface index (inside the namespace).
    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// Sends one complete Ethernet frame (header included; at most 1514
    /// bytes for a standard MTU) out of the interface.
    ///
    /// # Errors
    /// If the kernel refuses it (e.g. the interface is down).
    pub fn send(&self, frame: &[u8]) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        // SAFETY: the buffer is valid for `frame.len()` bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if usize::try_from(n).ok() == Some(frame.len()) {
            Ok(())
        } else {
            Err(format!(
                "send of a {}-byte frame (ethertype {:#06x}) returned {n}: {}",
                frame.len(),
                self.ethertype,
                std::io::Error::last_os_error()
            ))
        }
    }

    /// The next frame the interface receives, waiting at most `timeout`
    /// (`None` when none came). Frames sent from the host side are skipped.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if r <= 0 {
                return None;
            }
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                if Instant::now() >= deadline {
                    return None;
                }
                continue;
            };
            if from.sll_pkttype != PACKET_OUTGOING {
                return Some(buf[..n].to_vec());
            }
        }
    }

    /// Collects received frames for which `keep` is true until there are
    /// `count` of them or `timeout` passes; returns what was collected.
    pub fn capture(
        &self,
        count: usize,
        timeout: Duration,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(f) if keep(&f) => frames.push(f),
                Some(_) => {}
                None => break,
            }
        }
        frames
    }
}

/// Captures up to `count` frames of `ethertype` that `ifname` in `ns`
/// receives (what the guest sends, for a VMM's TAP), within `timeout`
/// (which also bounds the wait for the interface). The socket is opened
/// when this is called: frames sent earlier are not seen, so call it (on a
/// thread) before the guest transmits, or use [`PacketSocket`] directly.
///
/// # Errors
/// If the socket cannot be opened.
pub fn capture_frames(
    ns: &NetNs,
    ifname: &str,
    ethertype: u16,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, String> {
    let deadline = Instant::now() + timeout;
    let sock = PacketSocket::open(ns, ifname, ethertype, timeout)?;
    let left = deadline.saturating_duration_since(Instant::now());
    Ok(sock.capture(count, left, |_| true))
}

/// Sends `frames` (complete Ethernet frames, ethertype taken from the first
/// one) out of `ifname` in `ns`, i.e. to the guest behind a VMM's TAP.
/// Waits at most 10 s for the interface.
///
/// # Errors
/// If the socket cannot be opened or a send fails.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: &[Vec<u8>]) -> Result<(), String> {
    let Some(first) = frames.first() else {
        return Ok(());
    };
    let ethertype = first
        .get(12..14)
        .map_or(NET_TEST_ETHERTYPE, |b| u16::from_be_bytes([b[0], b[1]]));
    let sock = PacketSocket::open(ns, ifname, ethertype, Duration::from_secs(10))?;
    frames.iter().try_for_each(|f| sock.send(f))
}

/// Parameters of [`exchange_test_frames`].
#[derive(Debug, Clone)]
pub struct NetExchange {
    /// The TAP the VMM creates inside the namespace.
    pub tap: String,
    /// The guest's MAC address (`net.mac`).
    pub guest_mac: [u8; 6],
    /// `net.rx.count`: frames the host sends after the guest's
    /// `INFO virtio.net<n>.rx.ready` line (0: none, no wait for that line).
    pub rx_count: u32,
    /// `net.tx.count`: frames expected from the guest.
    pub tx_count: u32,
    /// Device number `n` in the guest's check names (`virtio.net<n>.*`).
    pub device: usize,
    /// Bound on each step (TAP appearing, the ready line, the capture).
    pub timeout: Duration,
}

/// The host side of the guest's `virtio.net<n>.rx` and `tx` checks against
/// a running VMM whose TAP is `x.tap` inside `ns`: opens a [`PacketSocket`]
/// on the TAP (waiting for it and setting it up), waits for the guest's
/// `INFO virtio.net<n>.rx.ready` line, sends `net_test_frame(Rx, i,
/// guest_mac, HOST_TEST_MAC)` for `i < rx_count`, then captures the guest's
/// TX test frames and checks them with [`verify_net_tx_frames`]. Returns
/// the captured TX frames.
///
/// # Errors
/// Any step failing or timing out; the message includes the VMM's output.
pub fn exchange_test_frames(
    vm: &RunningVm,
    ns: &NetNs,
    x: &NetExchange,
) -> Result<Vec<Vec<u8>>, String> {
    let ctx = |e: String| format!("{e}\n{}", vm.describe_so_far());
    let sock = PacketSocket::open(ns, &x.tap, NET_TEST_ETHERTYPE, x.timeout).map_err(ctx)?;
    if x.rx_count > 0 {
        vm.wait_for_line(&format!("INFO virtio.net{}.rx.ready", x.device), x.timeout)?;
        for i in 0..x.rx_count {
            sock.send(&net_test_frame(NetDir::Rx, i, x.guest_mac, HOST_TEST_MAC))
                .map_err(ctx)?;
        }
    }
    let frames = sock.capture(x.tx_count as usize, x.timeout, |f| {
        net_test_frame_index(f, NetDir::Tx).is_some()
    });
    verify_net_tx_frames(&frames, x.tx_count, x.guest_mac).map_err(ctx)?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_test_frames_match_the_guest_definition() {
        let f = net_test_frame(NetDir::Tx, 0, BROADCAST_MAC, [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.len(), 14 + 1500);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(&f[14..30], b"NIMBUS-NET-TX 0\0");
        // Payload offset 16, frame 0: (7 * 16) ^ 0x5a.
        assert_eq!(f[14 + 16], (7 * 16) ^ 0x5a);
        let p = net_test_payload(NetDir::Rx, 9);
        assert_eq!(p.len(), 64);
        assert_eq!(&p[..16], b"NIMBUS-NET-RX 9\0");
        assert_eq!(p[63], ((7 * 63 + 13 * 9) as u8) ^ 0x5a);
        assert_eq!(net_test_frame_index(&f, NetDir::Tx), Some(0));
        assert_eq!(net_test_frame_index(&f, NetDir::Rx), None);
        let g = net_test_frame(NetDir::Rx, 12, [1; 6], [2; 6]);
        assert_eq!(net_test_frame_index(&g, NetDir::Rx), Some(12));
        assert_eq!(g.len(), 14 + NET_PAYLOAD_SIZES[4]);
    }

    #[test]
    fn verify_net_tx_frames_finds_problems() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let good: Vec<Vec<u8>> = (0..3)
            .map(|i| net_test_frame(NetDir::Tx, i, BROADCAST_MAC, mac))
            .collect();
        verify_net_tx_frames(&good, 3, mac).expect("all three");
        let e = verify_net_tx_frames(&good[..2], 3, mac).expect_err("one missing");
        assert!(e.contains("NIMBUS-NET-TX 2 not captured"), "{e}");
        let mut bad = good.clone();
        bad[1][50] ^= 1;
        bad.push(good[0].clone());
        let e = verify_net_tx_frames(&bad, 3, mac).expect_err("corrupt and duplicate");
        assert!(
            e.contains("TX 1: 78 bytes") && e.contains("TX 0 captured 2 times"),
            "{e}"
        );
        assert_eq!(format_mac(mac), "52:54:00:12:34:56");
    }
}
