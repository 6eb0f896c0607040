//! Hostile vhost-user backends against Nimbus: a scripted backend ([`FakeBackend`], the wire
//! format written by hand) listens on the socket `--disk vhost_user=on` or
//! `--net vhost_user=on` names and answers with garbage — features without `VERSION_1` or with
//! unknown bits, configuration spaces of the wrong size, absurd queue counts, replies with the
//! wrong code, flags or size, descriptors where none belong, no reply at all, a hang-up in the
//! middle — or, once the guest drives the device, refuses or ignores the setup, or shrinks the
//! guest memory it was handed.
//!
//! During VM creation Nimbus must fail with exit status 1 and one error line naming the backend
//! and the problem, within its per-message deadline; after boot it must stay up, the guest's
//! other devices working. Never a panic, a hang (every run is bounded) or a forbidden system
//! call.
//!
//! Needs /dev/kvm (loud SKIPPED without it).

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e::{
    nimbus_test_guest, require_kvm, run_vm, stage1_cmdline, virtio_checks, ScratchDir, Stage2Keys,
    VmRun, VIRTIO_RNG_CHECKS,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bound of every VM run.
const TIMEOUT: Duration = Duration::from_secs(90);
/// Nimbus's deadline for one answer of a backend (`REPLY_TIMEOUT`).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

// Request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ADDR: u32 = 9;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;

// Header flags.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ, CONFIG, REPLY_ACK.
const PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 9) | (1 << 3);

/// A message Nimbus sent.
#[derive(Debug)]
struct Msg {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn needs_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

/// What the backend does with a message.
enum Step {
    /// What a well-behaved backend does.
    Default,
    /// These bytes (a whole reply, header included), with these descriptors.
    Send(Vec<u8>, Vec<RawFd>),
    /// Nothing: no reply.
    Silent,
    /// Hangs up.
    Close,
}

/// A reply message: header (request, `VERSION_1 | REPLY`, payload size) and payload.
fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
    reply_with(request, VERSION_1 | REPLY, payload.len() as u32, payload)
}

/// A reply with the header fields given.
fn reply_with(request: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = request.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn u64_reply(request: u32, value: u64) -> Vec<u8> {
    reply(request, &value.to_le_bytes())
}

/// What the device the fake backend pretends to be offers.
#[derive(Clone, Copy)]
struct Device {
    /// Nimbus's option for it, and its first keys (before `socket=`).
    option: &'static str,
    keys: &'static str,
    features: u64,
    queues: u64,
    /// Its configuration space.
    config: &'static [u8],
}

/// A virtio-blk device: 2048 sectors, one queue.
const BLK: Device = Device {
    option: "--disk",
    keys: "vhost_user=on",
    features: VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES,
    queues: 1,
    config: &[0, 8, 0, 0, 0, 0, 0, 0],
};

/// A virtio-net device: one queue pair, MAC 52:54:00:12:34:56.
const NET: Device = Device {
    option: "--net",
    keys: "vhost_user=on",
    features: VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES | (1 << 5),
    queues: 2,
    config: &[0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0],
};

/// A virtio-fs device (virtiofsd): a hiprio and a request queue.
const FS: Device = Device {
    option: "--fs",
    keys: "tag=hostile",
    features: VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES,
    queues: 2,
    config: &[],
};

/// The answer a well-behaved backend of `device` gives `msg`, if any.
fn default_reply(device: &Device, msg: &Msg) -> Option<Vec<u8>> {
    match msg.request {
        GET_FEATURES => Some(u64_reply(GET_FEATURES, device.features)),
        GET_PROTOCOL_FEATURES => Some(u64_reply(GET_PROTOCOL_FEATURES, PROTOCOL_FEATURES)),
        GET_QUEUE_NUM => Some(u64_reply(GET_QUEUE_NUM, device.queues)),
        GET_CONFIG => {
            // offset, size, flags, then `size` bytes of the space.
            let size = u32::from_le_bytes(msg.payload[4..8].try_into().unwrap()) as usize;
            let mut p = msg.payload[..12].to_vec();
            let mut space = device.config.to_vec();
            space.resize(size, 0);
            p.extend_from_slice(&space);
            Some(reply(GET_CONFIG, &p))
        }
        GET_VRING_BASE => {
            let mut p = msg.payload[..4].to_vec();
            p.extend_from_slice(&0u32.to_le_bytes());
            Some(reply(GET_VRING_BASE, &p))
        }
        _ if msg.needs_reply() => Some(u64_reply(msg.request, 0)),
        _ => None,
    }
}

/// One message received: (connection, request, flags, payload).
type Record = (usize, u32, u32, Vec<u8>);

/// What the backend does on each message.
type Script = dyn FnMut(&Msg) -> Step + Send;

/// A scripted backend listening on a socket; every message it received is in the transcript.
struct FakeBackend {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    transcript: Arc<Mutex<Vec<Record>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBackend {
    /// Listens on `socket` as `device`, answering as `script` says.
    fn start(socket: &Path, device: Device, script: Box<Script>) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let (s, t) = (stop.clone(), transcript.clone());
        let thread = std::thread::spawn(move || serve(listener, device, script, &s, &t));
        FakeBackend {
            socket: socket.to_path_buf(),
            stop,
            transcript,
            thread: Some(thread),
        }
    }

    /// The requests received so far: (connection, request, flags, payload).
    fn transcript(&self) -> Vec<Record> {
        self.transcript.lock().unwrap().clone()
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Accepts connections until `stop`, one at a time, running `script` on each message.
fn serve(
    listener: UnixListener,
    device: Device,
    mut script: Box<Script>,
    stop: &AtomicBool,
    transcript: &Mutex<Vec<Record>>,
) {
    let mut number = 0;
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => panic!("accept: {e}"),
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        loop {
            let msg = match read_msg(&stream, stop) {
                Some(m) => m,
                None => break,
            };
            transcript
                .lock()
                .unwrap()
                .push((number, msg.request, msg.flags, msg.payload.clone()));
            let step = script(&msg);
            let sent = match step {
                Step::Default => default_reply(&device, &msg).map(|b| (b, Vec::new())),
                Step::Send(b, fds) => Some((b, fds)),
                Step::Silent => None,
                Step::Close => break,
            };
            if let Some((bytes, fds)) = sent {
                if send(&stream, &bytes, &fds).is_err() {
                    break;
                }
            }
        }
        number += 1;
    }
}

fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let n = stream
        .send_with_fds(&[bytes], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*stream).write_all(&bytes[n..])
}

/// Reads one message (header, payload, descriptors); `None` at the end of the connection or
/// on `stop`.
fn read_msg(stream: &UnixStream, stop: &AtomicBool) -> Option<Msg> {
    let mut fds = Vec::new();
    let mut header = [0u8; 12];
    read_full(stream, &mut header, &mut fds, stop)?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
    let (request, flags, size) = (word(0), word(4), word(8));
    assert!(size <= 0x1000, "Nimbus sent a message of {size} bytes");
    let mut payload = vec![0u8; size as usize];
    read_full(stream, &mut payload, &mut fds, stop)?;
    Some(Msg {
        request,
        flags,
        payload,
        fds,
    })
}

fn read_full(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    stop: &AtomicBool,
) -> Option<()> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw = [-1; 16];
        let mut iov = [libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        }];
        // SAFETY: the iovec points into `buf`; `raw` takes the descriptors.
        match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
            Ok((0, _)) => return None,
            Ok((n, nfds)) => {
                got += n;
                // SAFETY: the kernel installed these descriptors for us.
                fds.extend(
                    raw[..nfds]
                        .iter()
                        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
            Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
    Some(())
}

fn nimbus(memory: &str, cmdline: &str) -> Command {
    nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), memory, cmdline)
}

/// Asserts that the run ended by itself, neither by a signal nor a panic nor a forbidden system
/// call.
fn assert_no_crash(what: &str, run: &VmRun) {
    assert!(!run.timed_out, "{what}: Nimbus hung\n{}", run.describe());
    assert!(
        run.status.is_some_and(|s| s.code().is_some()),
        "{what}: Nimbus died of a signal\n{}",
        run.describe()
    );
    assert!(
        !run.stderr.contains("panicked"),
        "{what}: Nimbus panicked\n{}",
        run.describe()
    );
    assert!(
        !run.stderr.contains("nimbus: seccomp:"),
        "{what}: a forbidden system call\n{}",
        run.describe()
    );
}

/// Runs Nimbus with a vhost-user disk (or NIC) on a backend running `script`, and expects VM
/// creation to fail: exit status 1, the last line of stderr naming the socket and containing
/// each of `needles`.
fn creation_fails(name: &str, device: Device, script: Box<Script>, needles: &[&str]) -> VmRun {
    let dir = ScratchDir::new(&format!("vhost-user-hostile-{name}"));
    let socket = dir.file("backend.sock");
    let backend = FakeBackend::start(&socket, device, script);
    let mut cmd = nimbus("size=256M,shared=on", "x");
    cmd.arg(device.option)
        .arg(format!("{},socket={}", device.keys, socket.display()));
    let run = run_vm(cmd, TIMEOUT);
    drop(backend);
    assert_no_crash(name, &run);
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(1),
        "{name}: VM creation should fail\n{}",
        run.describe()
    );
    let last = run.stderr.lines().last().unwrap_or_default();
    let socket = socket.display().to_string();
    assert!(
        last.contains(&socket) && needles.iter().all(|n| last.contains(n)),
        "{name}: the last line should name {socket} and say {needles:?}\n{}",
        run.describe()
    );
    eprintln!("{name}: {last}");
    run
}

/// A script that answers `request` with `step()` and everything else as a good backend.
fn on(request: u32, step: impl Fn(&Msg) -> Step + Send + 'static) -> Box<Script> {
    Box::new(move |msg| {
        if msg.request == request {
            step(msg)
        } else {
            Step::Default
        }
    })
}

#[test]
fn garbage_during_the_handshake_fails_vm_creation_with_one_clear_line() {
    if !require_kvm("garbage_during_the_handshake_fails_vm_creation_with_one_clear_line") {
        return;
    }
    let cases: Vec<(&str, Device, Box<Script>, &[&str])> = vec![
        (
            "features_without_version_1",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send(u64_reply(GET_FEATURES, F_PROTOCOL_FEATURES), vec![])
            }),
            &["does not offer VIRTIO_F_VERSION_1"],
        ),
        (
            "config_of_the_wrong_size",
            BLK,
            on(GET_CONFIG, |m| {
                let mut p = m.payload[..12].to_vec();
                p[4..8].copy_from_slice(&8u32.to_le_bytes());
                p.extend_from_slice(&[0; 8]);
                Step::Send(reply(GET_CONFIG, &p), vec![])
            }),
            &["GET_CONFIG failed"],
        ),
        (
            "config_refused",
            BLK,
            on(GET_CONFIG, |m| {
                let mut p = m.payload[..12].to_vec();
                p[4..8].copy_from_slice(&0u32.to_le_bytes());
                Step::Send(reply(GET_CONFIG, &p), vec![])
            }),
            &["GET_CONFIG failed"],
        ),
        (
            "blk_queue_count_0",
            BLK,
            on(GET_QUEUE_NUM, |_| {
                Step::Send(u64_reply(GET_QUEUE_NUM, 0), vec![])
            }),
            &["serves no queue"],
        ),
        (
            "net_queue_count_0",
            NET,
            on(GET_QUEUE_NUM, |_| {
                Step::Send(u64_reply(GET_QUEUE_NUM, 0), vec![])
            }),
            &["serves 0 queues"],
        ),
        (
            "fs_queue_count_1",
            FS,
            on(GET_QUEUE_NUM, |_| {
                Step::Send(u64_reply(GET_QUEUE_NUM, 1), vec![])
            }),
            &["serves 1 queue(s); virtio-fs needs 2"],
        ),
        (
            "queue_count_above_the_protocol_maximum",
            BLK,
            on(GET_QUEUE_NUM, |_| {
                Step::Send(u64_reply(GET_QUEUE_NUM, u64::MAX), vec![])
            }),
            &["GET_QUEUE_NUM failed"],
        ),
        (
            "reply_with_another_request_code",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send(u64_reply(GET_PROTOCOL_FEATURES, BLK.features), vec![])
            }),
            &["GET_FEATURES failed", "invalid message"],
        ),
        (
            "reply_without_the_reply_flag",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send(
                    reply_with(GET_FEATURES, VERSION_1, 8, &BLK.features.to_le_bytes()),
                    vec![],
                )
            }),
            &["GET_FEATURES failed"],
        ),
        (
            "reply_of_protocol_version_2",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send(
                    reply_with(GET_FEATURES, 0x2 | REPLY, 8, &BLK.features.to_le_bytes()),
                    vec![],
                )
            }),
            &["GET_FEATURES failed"],
        ),
        (
            "reply_size_above_the_protocol_maximum",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send(
                    reply_with(
                        GET_FEATURES,
                        VERSION_1 | REPLY,
                        0x10_0000,
                        &BLK.features.to_le_bytes(),
                    ),
                    vec![],
                )
            }),
            &["GET_FEATURES failed"],
        ),
        (
            "reply_shorter_than_its_body",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send(
                    reply_with(GET_FEATURES, VERSION_1 | REPLY, 4, &[1, 2, 3, 4]),
                    vec![],
                )
            }),
            &["GET_FEATURES failed", "did not answer within 5s"],
        ),
        (
            "reply_with_a_descriptor",
            BLK,
            on(GET_FEATURES, |_| {
                let fd = std::fs::File::open("/dev/null").unwrap();
                // Leaked on purpose: the message only carries the number.
                let raw = fd.as_raw_fd();
                std::mem::forget(fd);
                Step::Send(u64_reply(GET_FEATURES, BLK.features), vec![raw])
            }),
            &["GET_FEATURES failed", "invalid message"],
        ),
        (
            "garbage_bytes_for_a_reply",
            BLK,
            on(GET_FEATURES, |_| {
                Step::Send((0..64u8).map(|i| i.wrapping_mul(37)).collect(), vec![])
            }),
            &["GET_FEATURES failed"],
        ),
        (
            "no_reply_at_all",
            BLK,
            on(GET_FEATURES, |_| Step::Silent),
            &["GET_FEATURES failed", "did not answer within 5s"],
        ),
        (
            "no_reply_to_get_config",
            NET,
            on(GET_CONFIG, |_| Step::Silent),
            &["GET_CONFIG failed", "did not answer within 5s"],
        ),
        (
            "hang_up_in_the_middle_of_the_handshake",
            BLK,
            on(GET_QUEUE_NUM, |_| Step::Close),
            &["GET_QUEUE_NUM failed"],
        ),
        (
            "hang_up_at_once",
            NET,
            Box::new(|_| Step::Close),
            &["failed"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, device, script, needles) in cases {
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            creation_fails(name, device, script, needles)
        }));
        match r {
            Ok(run) => {
                // Silence is given up on after the deadline, not later.
                assert!(
                    start.elapsed() < REPLY_TIMEOUT * 3,
                    "{name}: took {:?}\n{}",
                    start.elapsed(),
                    run.describe()
                );
            }
            Err(p) => failures.push(
                p.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{name}: failed")),
            ),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Feature bits no virtio device defines (48..64), which a backend must not get past Nimbus to
/// the guest or back.
const UNKNOWN_FEATURES: u64 = 0xffff << 48;

/// Boots the test guest with a vhost-user disk on a backend running `script` (it never serves a
/// request) and the virtio-rng device; expects Nimbus to stay up: the guest's rng checks pass
/// and it powers off (exit status 0). Returns the run and the backend's transcript.
fn boot_survives(name: &str, script: Box<Script>) -> (VmRun, Vec<Record>) {
    let dir = ScratchDir::new(&format!("vhost-user-hostile-{name}"));
    let socket = dir.file("backend.sock");
    let backend = FakeBackend::start(&socket, BLK, script);
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1)]),
        ..Default::default()
    };
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let mut cmd = nimbus("size=256M,shared=on", &cmdline);
    cmd.arg("--disk")
        .arg(format!("vhost_user=on,socket={}", socket.display()));
    let run = run_vm(cmd, TIMEOUT);
    let transcript = backend.transcript();
    drop(backend);
    assert_no_crash(name, &run);
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(0),
        "{name}: Nimbus should stay up until the guest powers off\n{}",
        run.describe()
    );
    let rng = virtio_checks("rng", 0, VIRTIO_RNG_CHECKS);
    let refs: Vec<&str> = rng.iter().map(String::as_str).collect();
    run.report().assert_passed_but(&refs, "virtio.blk0.");
    (run, transcript)
}

/// The requests of `transcript` with code `request`.
fn requests(transcript: &[Record], request: u32) -> Vec<&[u8]> {
    transcript
        .iter()
        .filter(|r| r.1 == request)
        .map(|r| r.3.as_slice())
        .collect()
}

#[test]
fn unknown_feature_bits_never_reach_the_guest_or_come_back() {
    if !require_kvm("unknown_feature_bits_never_reach_the_guest_or_come_back") {
        return;
    }
    let (run, transcript) = boot_survives(
        "unknown_feature_bits",
        on(GET_FEATURES, |_| {
            Step::Send(
                u64_reply(GET_FEATURES, BLK.features | UNKNOWN_FEATURES),
                vec![],
            )
        }),
    );
    let acked = requests(&transcript, SET_FEATURES);
    assert!(
        !acked.is_empty(),
        "the driver never started the device\n{}",
        run.describe()
    );
    for a in acked {
        let bits = u64::from_le_bytes(a[..8].try_into().unwrap());
        assert_eq!(bits & UNKNOWN_FEATURES, 0, "SET_FEATURES {bits:#x}");
    }
    let init = run
        .stdout
        .lines()
        .find(|l| l.contains("virtio.blk0.init"))
        .unwrap_or_default();
    assert!(init.contains("offered=0x100000000"), "{init}");
}

#[test]
fn a_backend_that_refuses_the_setup_after_boot_leaves_the_vm_up() {
    if !require_kvm("a_backend_that_refuses_the_setup_after_boot_leaves_the_vm_up") {
        return;
    }
    // The memory table refused, at every connection.
    let (run, transcript) = boot_survives(
        "refuses_the_memory_table",
        on(SET_MEM_TABLE, |_| {
            Step::Send(u64_reply(SET_MEM_TABLE, 1), vec![])
        }),
    );
    assert!(
        run.stderr.contains("failed the device's setup"),
        "{}",
        run.describe()
    );
    assert!(
        run.stderr.contains("keeps refusing the device's setup"),
        "{}",
        run.describe()
    );
    let tables = requests(&transcript, SET_MEM_TABLE).len();
    assert!((2..=4).contains(&tables), "{tables} memory tables sent");
}

#[test]
fn a_backend_silent_after_boot_costs_one_deadline_and_leaves_the_vm_up() {
    if !require_kvm("a_backend_silent_after_boot_costs_one_deadline_and_leaves_the_vm_up") {
        return;
    }
    let (run, _) = boot_survives(
        "silent_at_set_vring_addr",
        on(SET_VRING_ADDR, |_| Step::Silent),
    );
    assert!(
        run.stderr
            .contains("SET_VRING_ADDR failed: the backend did not answer within 5s"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_backend_that_hangs_up_or_sends_descriptors_after_boot_leaves_the_vm_up() {
    if !require_kvm("a_backend_that_hangs_up_or_sends_descriptors_after_boot_leaves_the_vm_up") {
        return;
    }
    let (run, _) = boot_survives(
        "hangs_up_at_set_vring_kick",
        on(SET_VRING_KICK, |_| Step::Close),
    );
    assert!(
        run.stderr.contains("SET_VRING_KICK failed"),
        "{}",
        run.describe()
    );
    let (run, _) = boot_survives(
        "descriptor_with_an_ack",
        on(SET_FEATURES, |_| {
            let fd = std::fs::File::open("/dev/null").unwrap();
            let raw = fd.as_raw_fd();
            std::mem::forget(fd);
            Step::Send(u64_reply(SET_FEATURES, 0), vec![raw])
        }),
    );
    assert!(
        run.stderr.contains("SET_FEATURES failed"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_backend_cannot_shrink_guest_memory() {
    if !require_kvm("a_backend_cannot_shrink_guest_memory") {
        return;
    }
    // The guest RAM's memfd is sealed: the backend's ftruncate fails, the guest keeps its RAM.
    let results = Arc::new(Mutex::new(Vec::new()));
    let seen = results.clone();
    let (run, transcript) = boot_survives(
        "shrinks_guest_memory",
        Box::new(move |msg| {
            if msg.request == SET_MEM_TABLE {
                for fd in &msg.fds {
                    // SAFETY: ftruncate on a descriptor Nimbus sent us.
                    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
                    let e = (r != 0).then(|| io::Error::last_os_error().raw_os_error());
                    seen.lock().unwrap().push(e.flatten());
                }
            }
            Step::Default
        }),
    );
    assert!(
        !requests(&transcript, SET_MEM_TABLE).is_empty(),
        "{}",
        run.describe()
    );
    let results = results.lock().unwrap();
    assert!(!results.is_empty(), "no memory region was sent");
    assert!(
        results.iter().all(|r| *r == Some(libc::EPERM)),
        "ftruncate of guest memory: {results:?} (expected EPERM for each region)"
    );
}
