//! [`Connection::start`] against a fake backend that speaks the real vhost-user protocol (the
//! `vhost` crate's backend side): the `INFLIGHT_SHMFD` sequence, which no backend on the test
//! machines offers, across a backend restart.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as BackendChannel, BackendReqHandler, Error as ProtocolError, GpuBackend,
    Result as ProtocolResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::{Backend, Endpoint, Ring, Session, VhostUserError, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::{GuestMemoryAtomic, VIRTIO_F_VERSION_1};

const MEM_SIZE: u64 = 0x10_0000;
const QUEUES: u16 = 2;
/// The device's largest ring: the inflight area's queue size.
const MAX_QUEUE_SIZE: u16 = 128;
/// The size the driver chose.
const QUEUE_SIZE: u16 = 64;
/// Where each ring resumes.
const BASES: [u16; QUEUES as usize] = [5, 9];
/// The descriptor head of queue 0 that a fake backend marks in flight in the area it is given,
/// as if it were executing that request when it died.
const PENDING_HEAD: u64 = 3;
const BLK_CONFIG_LEN: u32 = 60;

fn wanted() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// An inflight area as one side of the socket sees it: the memfd's inode and the geometry the
/// message carried.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Area {
    inode: u64,
    mmap_size: u64,
    mmap_offset: u64,
}

impl Area {
    fn of(file: &File, info: &VhostUserInflight) -> Self {
        Self {
            inode: file.metadata().unwrap().ino(),
            mmap_size: info.mmap_size,
            mmap_offset: info.mmap_offset,
        }
    }
}

/// A request as the fake backend received it.
#[derive(Debug, Clone, PartialEq)]
enum Req {
    SetOwner,
    GetFeatures,
    SetFeatures(u64),
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    GetConfig {
        offset: u32,
        size: u32,
    },
    GetInflight {
        num_queues: u16,
        queue_size: u16,
        /// The area the fake created and returned.
        given: Area,
    },
    SetInflight {
        num_queues: u16,
        queue_size: u16,
        area: Area,
        /// The counter of [`PENDING_HEAD`] if the area received already had it in flight.
        pending: Option<u64>,
    },
    /// Each region's guest address, size and memfd inode.
    SetMemTable(Vec<(u64, u64, u64)>),
    VringNum {
        index: u32,
        num: u32,
    },
    VringAddr {
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
    },
    VringBase {
        index: u32,
        base: u32,
    },
    VringCall {
        index: u8,
        fd: bool,
    },
    VringKick {
        index: u8,
        fd: bool,
    },
    VringEnable {
        index: u32,
        enable: bool,
    },
    GetVringBase(u32),
}

/// What a [`FakeBackend`] offers.
#[derive(Debug, Clone, Copy)]
struct Offer {
    inflight: bool,
    /// Largest ring it takes (`SET_VRING_NUM` above it is refused, as `vhost_user_block`'s
    /// `queue_size`).
    max_ring: u32,
}

const WITH_INFLIGHT: Offer = Offer {
    inflight: true,
    max_ring: MAX_QUEUE_SIZE as u32,
};

/// A virtio-blk backend with two queues that records what it is asked; one per connection, as
/// a restarted backend process knows nothing but what the frontend sends it.
struct FakeBackend {
    /// Which connection of the server this is, from 1.
    connection: u64,
    offer: Offer,
    log: Vec<Req>,
}

fn refused<T>() -> ProtocolResult<T> {
    Err(ProtocolError::InvalidOperation(
        "not served by the fake backend",
    ))
}

fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: `name` is NUL-terminated; the result is checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// The split-ring inflight area the vhost-user specification lays out: per queue a 16-byte
/// header (features, version, desc_num, last_batch_head, used_idx) and a 16-byte descriptor
/// state (inflight, padding, next, counter) per descriptor, each queue's part 64-byte aligned.
fn inflight_area_size(num_queues: u16, queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).next_multiple_of(64) * u64::from(num_queues)
}

/// Offset in the area of queue 0's descriptor state for [`PENDING_HEAD`].
fn pending_state_offset(info: &VhostUserInflight) -> u64 {
    info.mmap_offset + 16 + 16 * PENDING_HEAD
}

impl VhostUserBackendReqHandlerMut for FakeBackend {
    fn set_owner(&mut self) -> ProtocolResult<()> {
        self.log.push(Req::SetOwner);
        Ok(())
    }
    fn reset_owner(&mut self) -> ProtocolResult<()> {
        refused()
    }
    fn reset_device(&mut self) -> ProtocolResult<()> {
        refused()
    }
    fn get_features(&mut self) -> ProtocolResult<u64> {
        self.log.push(Req::GetFeatures);
        Ok(VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }
    fn set_features(&mut self, features: u64) -> ProtocolResult<()> {
        self.log.push(Req::SetFeatures(features));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let table = regions
            .iter()
            .zip(&files)
            .map(|(r, f)| {
                (
                    r.guest_phys_addr,
                    r.memory_size,
                    f.metadata().unwrap().ino(),
                )
            })
            .collect();
        self.log.push(Req::SetMemTable(table));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtocolResult<()> {
        self.log.push(Req::VringNum { index, num });
        if num > self.offer.max_ring {
            return Err(ProtocolError::InvalidParam);
        }
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        desc: u64,
        used: u64,
        avail: u64,
        _log: u64,
    ) -> ProtocolResult<()> {
        self.log.push(Req::VringAddr {
            index,
            desc,
            used,
            avail,
        });
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtocolResult<()> {
        self.log.push(Req::VringBase { index, base });
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> ProtocolResult<VhostUserVringState> {
        self.log.push(Req::GetVringBase(index));
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        self.log.push(Req::VringKick {
            index,
            fd: fd.is_some(),
        });
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> ProtocolResult<()> {
        self.log.push(Req::VringCall {
            index,
            fd: fd.is_some(),
        });
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> ProtocolResult<()> {
        refused()
    }
    fn get_protocol_features(&mut self) -> ProtocolResult<VhostUserProtocolFeatures> {
        self.log.push(Req::GetProtocolFeatures);
        let mut offered = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        if self.offer.inflight {
            offered |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        Ok(offered)
    }
    fn set_protocol_features(&mut self, features: u64) -> ProtocolResult<()> {
        self.log.push(Req::SetProtocolFeatures(features));
        Ok(())
    }
    fn get_queue_num(&mut self) -> ProtocolResult<u64> {
        self.log.push(Req::GetQueueNum);
        Ok(u64::from(QUEUES))
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtocolResult<()> {
        self.log.push(Req::VringEnable { index, enable });
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> ProtocolResult<Vec<u8>> {
        self.log.push(Req::GetConfig { offset, size });
        // struct virtio_blk_config: capacity 2048 sectors, the rest zero, num_queues at 34.
        let mut config = vec![0u8; BLK_CONFIG_LEN as usize];
        config[..8].copy_from_slice(&2048u64.to_le_bytes());
        config[34..36].copy_from_slice(&QUEUES.to_le_bytes());
        let (offset, end) = (offset as usize, (offset + size) as usize);
        config.resize(config.len().max(end), 0);
        Ok(config[offset..end].to_vec())
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> ProtocolResult<()> {
        refused()
    }
    fn set_backend_req_fd(&mut self, _backend: BackendChannel) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> ProtocolResult<()> {
        refused()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtocolResult<File> {
        refused()
    }
    fn get_inflight_fd(
        &mut self,
        ask: &VhostUserInflight,
    ) -> ProtocolResult<(VhostUserInflight, File)> {
        let size = inflight_area_size(ask.num_queues, ask.queue_size);
        let file = memfd(c"fake-backend-inflight", size);
        let info = VhostUserInflight::new(size, 0, ask.num_queues, ask.queue_size);
        self.log.push(Req::GetInflight {
            num_queues: ask.num_queues,
            queue_size: ask.queue_size,
            given: Area::of(&file, &info),
        });
        Ok((info, file))
    }
    fn set_inflight_fd(&mut self, info: &VhostUserInflight, file: File) -> ProtocolResult<()> {
        // Read what an earlier backend left in flight, then start "executing" that request
        // ourselves: inflight = 1, counter = our connection number.
        let at = pending_state_offset(info);
        let mut state = [0u8; 16];
        file.read_exact_at(&mut state, at).unwrap();
        let pending = (state[0] == 1).then(|| u64::from_le_bytes(state[8..].try_into().unwrap()));
        state[0] = 1;
        state[8..].copy_from_slice(&self.connection.to_le_bytes());
        file.write_all_at(&state, at).unwrap();
        self.log.push(Req::SetInflight {
            num_queues: info.num_queues,
            queue_size: info.queue_size,
            area: Area::of(&file, info),
            pending,
        });
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> ProtocolResult<u64> {
        refused()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> ProtocolResult<Option<VhostUserMemoryRegionBase>> {
        refused()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> ProtocolResult<()> {
        refused()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> ProtocolResult<Option<File>> {
        refused()
    }
    fn check_device_state(&mut self) -> ProtocolResult<()> {
        refused()
    }
    fn get_shmem_config(&mut self) -> ProtocolResult<VhostUserShMemConfig> {
        refused()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtocolResult<()> {
        refused()
    }
}

/// One connection the fake served: what it was asked, and how the connection ended.
#[derive(Debug)]
struct Served {
    log: Vec<Req>,
    end: ProtocolError,
}

/// A thread listening on a socket and serving `connections` frontends in turn, each with a
/// fresh [`FakeBackend`].
struct FakeServer {
    /// A handle on each accepted connection, to hang it up (the backend "dies").
    connections: mpsc::Receiver<UnixStream>,
    served: mpsc::Receiver<Served>,
}

impl FakeServer {
    fn start(path: &Path, offer: Offer, connections: u64) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let (accepted, connections_rx) = mpsc::channel();
        let (served, served_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for connection in 1..=connections {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let fake = Arc::new(Mutex::new(FakeBackend {
                    connection,
                    offer,
                    log: Vec::new(),
                }));
                let mut handler = BackendReqHandler::from_stream(stream, fake.clone());
                let _ = accepted.send(handler.try_clone_connection().unwrap());
                let end = loop {
                    if let Err(e) = handler.handle_request() {
                        break e;
                    }
                };
                let log = std::mem::take(&mut fake.lock().unwrap().log);
                if served.send(Served { log, end }).is_err() {
                    return;
                }
            }
        });
        Self {
            connections: connections_rx,
            served: served_rx,
        }
    }

    /// Closes the next accepted connection from the backend's side.
    fn hang_up(&self) {
        let stream = self
            .connections
            .recv_timeout(Duration::from_secs(5))
            .unwrap();
        stream.shutdown(std::net::Shutdown::Both).unwrap();
    }

    /// The next connection's record, once it has ended. Everything the frontend sent before
    /// the end is in it: the fake reads its socket to the end.
    fn next_served(&self) -> Served {
        self.served
            .recv_timeout(Duration::from_secs(5))
            .expect("the fake backend's connection did not end")
    }

    /// [`Self::next_served`] for a connection the frontend (or the test) closed, the fake having
    /// served every request.
    fn served(&self) -> Served {
        let served = self.next_served();
        assert!(
            matches!(served.end, ProtocolError::Disconnected),
            "the fake backend failed a request: {:?}; it was asked {:#?}",
            served.end,
            served.log
        );
        served
    }
}

/// Guest RAM in a memfd (as `--memory shared=on`), with its inode.
fn guest_memory() -> (GuestMemoryAtomic, u64) {
    let file = memfd(c"test-guest-ram", MEM_SIZE);
    let inode = file.metadata().unwrap().ino();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    (GuestMemoryAtomic::new(mem), inode)
}

/// Guest addresses of ring `i`'s descriptor table, available ring and used ring.
fn ring_addresses(i: u16) -> (u64, u64, u64) {
    let base = 0x1_0000 * (u64::from(i) + 1);
    (base, base + 0x1000, base + 0x2000)
}

/// What a block device's activation hands to the backend: two rings of [`QUEUE_SIZE`].
fn blk_session(mem: GuestMemoryAtomic) -> Session {
    let rings = (0..QUEUES)
        .map(|index| {
            let (desc, avail, used) = ring_addresses(index);
            Ring {
                index,
                size: QUEUE_SIZE,
                max_size: MAX_QUEUE_SIZE,
                desc,
                avail,
                used,
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            }
        })
        .collect();
    Session {
        mem,
        features: VIRTIO_F_VERSION_1,
        rings,
        active_rings: u16::MAX,
        inflight_shape: (QUEUES, MAX_QUEUE_SIZE),
        inflight: None,
    }
}

/// The messages every ring must get after the memory table, in this order.
fn expected_rings(mem: &GuestMemoryAtomic) -> Vec<Req> {
    use vm_memory::GuestAddressSpace;
    let m = mem.memory();
    let hva = |gpa| m.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    (0..QUEUES)
        .flat_map(|i| {
            let (desc, avail, used) = ring_addresses(i);
            let index = u32::from(i);
            let fd_index = u8::try_from(i).unwrap();
            [
                Req::VringNum {
                    index,
                    num: u32::from(QUEUE_SIZE),
                },
                Req::VringAddr {
                    index,
                    desc: hva(desc),
                    used: hva(used),
                    avail: hva(avail),
                },
                Req::VringBase {
                    index,
                    base: u32::from(BASES[usize::from(i)]),
                },
                Req::VringCall {
                    index: fd_index,
                    fd: true,
                },
                Req::VringKick {
                    index: fd_index,
                    fd: true,
                },
                Req::VringEnable {
                    index,
                    enable: true,
                },
            ]
        })
        .collect()
}

/// The part of a connection's log from SET_FEATURES on: what [`super::Connection::start`] sent.
fn session_part(log: &[Req]) -> &[Req] {
    let acked = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
    let at = log
        .iter()
        .position(|r| matches!(r, Req::SetFeatures(_)))
        .unwrap_or_else(|| panic!("no SET_FEATURES in {log:#?}"));
    assert_eq!(log[at], Req::SetFeatures(acked));
    &log[at..]
}

/// Whether the frontend's end of the socket sees the backend's hang-up (what the relay waits
/// for).
fn sees_hang_up(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
    n == 1 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

#[test]
fn inflight_area_is_fetched_once_and_handed_back_to_a_restarted_backend() {
    let dir = TempDir::new_with_prefix("/tmp/nimbus-vhost-inflight-").unwrap();
    let path = dir.as_path().join("blk.sock");
    let fake = FakeServer::start(&path, WITH_INFLIGHT, 2);
    let backend = Backend {
        endpoint: Endpoint::Connect(path),
        max_queues: u64::from(QUEUES),
        wanted: wanted(),
    };
    let (mem, ram_inode) = guest_memory();
    let mut session = blk_session(mem.clone());
    let table = Req::SetMemTable(vec![(0, MEM_SIZE, ram_inode)]);
    let rings = expected_rings(&mem);
    let shape = (QUEUES, MAX_QUEUE_SIZE);

    // The driver's first start.
    let mut first = backend.connect(true).unwrap();
    assert!(first
        .protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    assert_eq!(first.config(BLK_CONFIG_LEN).unwrap().len(), 60);
    first.start(&mut session, &BASES).unwrap();
    // The backend dies.
    fake.hang_up();
    assert!(
        sees_hang_up(first.raw_fd()),
        "the frontend missed the hang-up"
    );
    drop(first);
    let served = fake.served();
    let sent = session_part(&served.log);
    let Req::GetInflight {
        num_queues,
        queue_size,
        given,
    } = sent[1]
    else {
        panic!(
            "the first start must ask for the inflight area right after SET_FEATURES: {sent:#?}"
        );
    };
    assert_eq!((num_queues, queue_size), shape, "GET_INFLIGHT_FD's shape");
    assert_eq!(
        given.mmap_size,
        inflight_area_size(QUEUES, MAX_QUEUE_SIZE),
        "the fake's area size"
    );
    assert_eq!(
        sent[2],
        Req::SetInflight {
            num_queues,
            queue_size,
            area: given,
            pending: None,
        },
        "the first start must hand the area it got back with SET_INFLIGHT_FD, before SET_MEM_TABLE: {sent:#?}"
    );
    assert_eq!(sent[3], table, "SET_MEM_TABLE after the inflight area");
    assert_eq!(&sent[4..], rings, "the rings after the memory table");
    let (kept, _) = session.inflight.as_ref().unwrap();
    assert_eq!(kept.mmap_size, given.mmap_size);

    // The restarted backend: same session, a fresh backend.
    let mut second = backend.connect(true).unwrap();
    second.start(&mut session, &BASES).unwrap();
    drop(second);
    let served = fake.served();
    assert!(
        !served
            .log
            .iter()
            .any(|r| matches!(r, Req::GetInflight { .. })),
        "a reconnection must not ask for a new inflight area: {:#?}",
        served.log
    );
    let sent = session_part(&served.log);
    assert_eq!(
        sent[1],
        Req::SetInflight {
            num_queues,
            queue_size,
            area: given,
            // What the first backend marked in flight reaches the second one.
            pending: Some(1),
        },
        "a reconnection must hand the same inflight area back right after SET_FEATURES: {sent:#?}"
    );
    assert_eq!(sent[2], table, "SET_MEM_TABLE after the inflight area");
    assert_eq!(&sent[3..], rings, "the rings after the memory table");
}

#[test]
fn no_inflight_messages_for_a_backend_without_inflight_shmfd() {
    let dir = TempDir::new_with_prefix("/tmp/nimbus-vhost-inflight-").unwrap();
    let path = dir.as_path().join("blk.sock");
    let fake = FakeServer::start(
        &path,
        Offer {
            inflight: false,
            ..WITH_INFLIGHT
        },
        1,
    );
    let backend = Backend {
        endpoint: Endpoint::Connect(path),
        max_queues: u64::from(QUEUES),
        wanted: wanted(),
    };
    let (mem, ram_inode) = guest_memory();
    let mut session = blk_session(mem.clone());

    let mut connection = backend.connect(true).unwrap();
    assert!(!connection
        .protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    connection.start(&mut session, &BASES).unwrap();
    drop(connection);
    let served = fake.served();
    assert!(session.inflight.is_none());
    let sent = session_part(&served.log);
    assert_eq!(
        sent[1],
        Req::SetMemTable(vec![(0, MEM_SIZE, ram_inode)]),
        "SET_MEM_TABLE right after SET_FEATURES, no inflight messages: {sent:#?}"
    );
    assert_eq!(&sent[2..], expected_rings(&mem), "the rings");
    let acked = served.log.iter().find_map(|r| match r {
        Req::SetProtocolFeatures(f) => Some(*f),
        _ => None,
    });
    assert_eq!(
        acked,
        Some(
            (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK)
                .bits()
        )
    );
}

#[test]
fn a_refused_setup_step_fails_start() {
    let dir = TempDir::new_with_prefix("/tmp/nimbus-vhost-inflight-").unwrap();
    let path = dir.as_path().join("blk.sock");
    // Rings of QUEUE_SIZE are too large for this backend.
    let offer = Offer {
        max_ring: u32::from(QUEUE_SIZE) / 2,
        ..WITH_INFLIGHT
    };
    let fake = FakeServer::start(&path, offer, 1);
    let backend = Backend {
        endpoint: Endpoint::Connect(path),
        max_queues: u64::from(QUEUES),
        wanted: wanted(),
    };
    let (mem, _) = guest_memory();
    let mut session = blk_session(mem);

    let mut connection = backend.connect(true).unwrap();
    let result = connection.start(&mut session, &BASES);
    drop(connection);
    assert!(
        matches!(
            result,
            Err(VhostUserError::Protocol {
                step: "SET_VRING_NUM",
                ..
            })
        ),
        "start must report the refused SET_VRING_NUM, got {result:?}"
    );
    let served = fake.next_served();
    assert!(matches!(served.end, ProtocolError::InvalidParam));
    assert_eq!(
        served.log.last(),
        Some(&Req::VringNum {
            index: 0,
            num: u32::from(QUEUE_SIZE)
        })
    );
}

/// RAM hot-added while the backend runs: `update_mem_table` sends the whole grown table again
/// (`SET_MEM_TABLE`, each region with its memfd), and a backend that connects later gets the
/// grown table in its session (the session holds the same guest memory).
#[test]
fn hot_added_ram_reaches_the_backend_in_a_new_memory_table() {
    let dir = TempDir::new_with_prefix("/tmp/nimbus-vhost-memhp-").unwrap();
    let path = dir.as_path().join("blk.sock");
    let fake = FakeServer::start(&path, WITH_INFLIGHT, 2);
    let backend = Backend {
        endpoint: Endpoint::Connect(path),
        max_queues: u64::from(QUEUES),
        wanted: wanted(),
    };
    let (mem, ram_inode) = guest_memory();
    let mut session = blk_session(mem.clone());
    let mut connection = backend.connect(true).unwrap();
    connection.start(&mut session, &BASES).unwrap();

    // The VMM adds a region (its own memfd) above the first and replaces the memory's contents.
    let added = memfd(c"test-hot-added-ram", MEM_SIZE);
    let added_inode = added.metadata().unwrap().ino();
    let region = vm_memory::GuestRegionMmap::from_range(
        GuestAddress(MEM_SIZE),
        MEM_SIZE as usize,
        Some(FileOffset::new(added, 0)),
    )
    .unwrap();
    {
        use vm_memory::GuestAddressSpace;
        let grown = mem.memory().insert_region(Arc::new(region)).unwrap();
        mem.lock().unwrap().replace(grown);
    }
    connection.update_mem_table(&mem).unwrap();
    drop(connection);
    let served = fake.served();
    let grown_table = Req::SetMemTable(vec![
        (0, MEM_SIZE, ram_inode),
        (MEM_SIZE, MEM_SIZE, added_inode),
    ]);
    assert_eq!(served.log.last(), Some(&grown_table), "{:#?}", served.log);

    // A backend that comes back gets the grown table.
    let mut again = backend.connect(true).unwrap();
    again.start(&mut session, &BASES).unwrap();
    drop(again);
    let served = fake.served();
    assert!(served.log.contains(&grown_table), "{:#?}", served.log);
}
