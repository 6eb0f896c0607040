//! Hostile frontends against a daemon binary ([`assert_hostile_frontends_are_survived`]): each
//! of [`CASES`] is a frontend that sends something a well-behaved one never does — absurd
//! memory tables, descriptors that are not what the message needs, rings outside memory, bad
//! sizes and indices, broken framing, garbage in the rings, guest memory that shrinks under the
//! daemon — spoken through [`RawFrontend`](super::raw::RawFrontend).
//!
//! Every case runs twice: against a daemon in its default mode, which must end by itself with
//! the documented status (1 and one `frontend connection failed` line when it dropped the
//! connection, 0 after a frontend that merely went away) and never by a signal or a panic;
//! and against one `--keep-running` daemon, which must serve a well-behaved frontend
//! correctly after each case.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vhost::VhostUserMemoryRegionInfo;
use virtio_chain::testing::TestDriver;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::raw::{
    self, mem_table, req, u64_payload, vring_addr, vring_state, Answer, RawFrontend, Region,
    F_PROTOCOL_FEATURES, NEED_REPLY, PROTOCOL_FEATURES, REPLY, VERSION_1, VRING_NOFD,
};
use super::{handshake, shared_memory, Daemon, HandshakeOptions, Scratch, TIMEOUT};

/// Size of the guest memory the hostile frontends share (one memfd at guest address 0).
pub const MEM_SIZE: usize = 4 << 20;
/// Where the rings of queue `i` start in guest memory: `RING_AREA + i * RING_AREA_LEN`.
const RING_AREA: u64 = 0x10_0000;
const RING_AREA_LEN: u64 = 0x8_0000;
/// The ring size the hostile frontends use.
const RING_SIZE: u16 = 64;
/// `VIRTIO_RING_F_EVENT_IDX`, left out of the acked features.
const EVENT_IDX: u64 = 1 << 29;
/// Descriptor flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const DESC_INDIRECT: u16 = 4;

/// A daemon binary the hostile frontends are pointed at.
pub struct HostileSubject<'a> {
    /// The binary.
    pub bin: &'a str,
    /// Its arguments (backend option) for a socket at the path given, without
    /// `--keep-running` and `-v`.
    pub args: &'a dyn Fn(&Path) -> Vec<String>,
    /// How many queues it serves.
    pub num_queues: usize,
    /// The largest ring it accepts (its `queue_size`).
    pub queue_max_size: u16,
    /// The size of its configuration space.
    pub config_len: usize,
    /// The queue a well-behaved frontend sends its request on.
    pub serve_queue: usize,
    /// Adds one well-formed request to `driver` (of queue `serve_queue`) and returns the
    /// length the daemon puts in its used entry.
    pub request: &'a dyn Fn(&mut TestDriver) -> u32,
}

impl std::fmt::Debug for HostileSubject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileSubject")
            .field("bin", &self.bin)
            .field("num_queues", &self.num_queues)
            .finish_non_exhaustive()
    }
}

/// What a case expects of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The hostile message is refused (a failure status when it asked for a reply, or no
    /// answer) and the connection dropped; the daemon's log has the needle.
    Refused(&'static str),
    /// The daemon deals with it and keeps the connection (it answers the next message); its
    /// log has the needle (empty: nothing in particular).
    Survives(&'static str),
    /// The frontend itself goes away (a cut message): a disconnection, exit status 0.
    Disconnects,
}

/// One hostile frontend.
#[derive(Clone, Copy)]
pub struct Case {
    /// Its name, in failure messages.
    pub name: &'static str,
    /// What the daemon must do.
    pub expect: Expect,
    /// Connects through the frontend of the context and misbehaves; returns the daemon's
    /// answer to the hostile message.
    pub run: fn(&mut Ctx<'_>) -> Answer,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("expect", &self.expect)
            .finish()
    }
}

/// What a case works with.
pub struct Ctx<'a> {
    /// The connection.
    pub fe: RawFrontend,
    /// Guest memory: [`MEM_SIZE`] bytes at guest address 0 in a memfd.
    pub mem: GuestMemoryMmap,
    /// The daemon under test.
    pub subject: &'a HostileSubject<'a>,
    /// A scratch directory for the case's files.
    pub dir: PathBuf,
    /// Descriptors a case hands over and must keep open while the daemon holds them.
    pub keep: Vec<OwnedFd>,
    /// Rings a case set up and uses later.
    pub rings: Vec<RawRing>,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("fe", &self.fe)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A ring set up by [`Ctx::ring`].
#[derive(Debug)]
pub struct RawRing {
    /// The driver side in guest memory.
    pub driver: TestDriver,
    /// Written to kick the daemon.
    pub kick: EventFd,
    /// Written by the daemon.
    pub call: EventFd,
}

impl Ctx<'_> {
    /// The region of the memory table, as the `vhost` crate would describe it.
    pub fn region(&self) -> (Region, RawFd) {
        let r = self.mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(r).unwrap();
        (
            Region {
                guest_addr: info.guest_phys_addr,
                size: info.memory_size,
                user_addr: info.userspace_addr,
                mmap_offset: info.mmap_offset,
            },
            info.mmap_handle,
        )
    }

    /// The memfd of guest memory.
    pub fn memfd(&self) -> &File {
        self.mem
            .iter()
            .next()
            .unwrap()
            .file_offset()
            .unwrap()
            .file()
    }

    /// The frontend's address of guest address `gpa`.
    pub fn hva(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// `SET_OWNER`, features (all offered but `EVENT_IDX`), protocol features (MQ, CONFIG,
    /// REPLY_ACK): every later request with `NEED_REPLY` is answered.
    pub fn negotiate(&mut self) {
        self.fe.send(req::SET_OWNER, VERSION_1, &[], &[]).unwrap();
        let offered = self.fe.get_u64(req::GET_FEATURES);
        assert_ne!(offered & F_PROTOCOL_FEATURES, 0);
        let protocol = self.fe.get_u64(req::GET_PROTOCOL_FEATURES);
        assert_eq!(protocol & PROTOCOL_FEATURES, PROTOCOL_FEATURES);
        self.fe.ok(
            req::SET_PROTOCOL_FEATURES,
            &u64_payload(PROTOCOL_FEATURES),
            &[],
        );
        self.fe
            .ok(req::SET_FEATURES, &u64_payload(offered & !EVENT_IDX), &[]);
    }

    /// [`negotiate`](Self::negotiate) and the memory table.
    pub fn with_memory(&mut self) {
        self.negotiate();
        let (region, fd) = self.region();
        self.fe
            .ok(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd]);
    }

    /// Sets queue `index` up in full (NUM, ADDR, BASE, CALL, KICK, ENABLE) with its rings at
    /// the queue's area; returns its position in [`rings`](Self::rings).
    pub fn ring(&mut self, index: u32) -> usize {
        let area = RING_AREA + RING_AREA_LEN * u64::from(index);
        let driver = TestDriver::new(&self.mem, RING_SIZE, area, RING_AREA_LEN);
        let q = driver.queue(false);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let fe = &self.fe;
        fe.ok(
            req::SET_VRING_NUM,
            &vring_state(index, u32::from(RING_SIZE)),
            &[],
        );
        fe.ok(
            req::SET_VRING_ADDR,
            &vring_addr(
                index,
                0,
                self.hva(q.desc_table()),
                self.hva(q.used_ring()),
                self.hva(q.avail_ring()),
            ),
            &[],
        );
        fe.ok(req::SET_VRING_BASE, &vring_state(index, 0), &[]);
        fe.ok(
            req::SET_VRING_CALL,
            &u64_payload(u64::from(index)),
            &[call.as_raw_fd()],
        );
        fe.ok(
            req::SET_VRING_KICK,
            &u64_payload(u64::from(index)),
            &[kick.as_raw_fd()],
        );
        fe.ok(req::SET_VRING_ENABLE, &vring_state(index, 1), &[]);
        self.rings.push(RawRing { driver, kick, call });
        self.rings.len() - 1
    }

    /// Kicks ring `at` (a position in [`rings`](Self::rings)) and waits until the daemon has
    /// had time to look at it; then checks the daemon still stops the ring (`GET_VRING_BASE`
    /// is answered: no worker holds the ring for ever) and returns that answer.
    pub fn kick_and_stop(&mut self, at: usize, index: u32) -> Answer {
        self.rings[at].kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        self.fe
            .call(req::GET_VRING_BASE, &vring_state(index, 0), &[])
    }

    /// A file of `len` bytes in the case's directory, open read-write.
    pub fn regular_file(&self, name: &str, len: u64) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join(name))
            .unwrap();
        f.set_len(len).unwrap();
        f
    }

    /// Keeps `fd` open for the rest of the case; returns its number.
    pub fn keep(&mut self, fd: OwnedFd) -> RawFd {
        let raw = fd.as_raw_fd();
        self.keep.push(fd);
        raw
    }
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just created both; nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A FIFO at `path`, open read-write (which does not wait for a peer).
pub fn fifo(path: &Path) -> File {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

fn dev(path: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// `SET_MEM_TABLE` with one region described by `region` on descriptor `fd`.
fn one_region(ctx: &mut Ctx<'_>, region: Region, fd: RawFd) -> Answer {
    ctx.negotiate();
    ctx.fe
        .call(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])
}

/// `SET_MEM_TABLE` with the guest memory's region on the descriptor `file`.
fn region_on(ctx: &mut Ctx<'_>, file: OwnedFd) -> Answer {
    let (region, _) = ctx.region();
    let fd = ctx.keep(file);
    one_region(ctx, region, fd)
}

/// Queue index `index` on every per-queue message: the first must be refused.
fn bad_index(ctx: &mut Ctx<'_>, request: u32, index: u32) -> Answer {
    ctx.with_memory();
    let payload = match request {
        req::SET_VRING_ADDR => {
            let at = ctx.hva(RING_AREA);
            vring_addr(index, 0, at, at + 0x1000, at + 0x800)
        }
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
            u64_payload(u64::from(index & 0xff))
        }
        req::SET_VRING_ENABLE => vring_state(index, 1),
        _ => vring_state(index, 64),
    };
    let fds = match request {
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
            vec![ctx.keep(eventfd())]
        }
        _ => Vec::new(),
    };
    ctx.fe.call(request, &payload, &fds)
}

/// A new non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory arguments.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: eventfd just created it; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A ring whose kick (or call) descriptor is `fd`; the rest as [`Ctx::ring`].
fn ring_with_fd(ctx: &mut Ctx<'_>, request: u32, fd: RawFd) -> Answer {
    ctx.with_memory();
    let driver = TestDriver::new(&ctx.mem, RING_SIZE, RING_AREA, RING_AREA_LEN);
    let q = driver.queue(false);
    let eventfd = EventFd::new(EFD_NONBLOCK).unwrap();
    ctx.fe.ok(
        req::SET_VRING_NUM,
        &vring_state(0, u32::from(RING_SIZE)),
        &[],
    );
    ctx.fe.ok(
        req::SET_VRING_ADDR,
        &vring_addr(
            0,
            0,
            ctx.hva(q.desc_table()),
            ctx.hva(q.used_ring()),
            ctx.hva(q.avail_ring()),
        ),
        &[],
    );
    ctx.fe.ok(req::SET_VRING_BASE, &vring_state(0, 0), &[]);
    let (kick, call) = if request == req::SET_VRING_KICK {
        (fd, eventfd.as_raw_fd())
    } else {
        (eventfd.as_raw_fd(), fd)
    };
    for (r, fd) in [(req::SET_VRING_CALL, call), (req::SET_VRING_KICK, kick)] {
        let a = ctx.fe.call(r, &u64_payload(0), &[fd]);
        if a.ack() != Some(0) {
            return a;
        }
    }
    let a = ctx.fe.call(req::SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    if a.ack() != Some(0) {
        return a;
    }
    // A request, so that the daemon reads the kick and writes the call.
    let mut driver = driver;
    (ctx.subject.request)(&mut driver);
    let wake = EventFd::new(EFD_NONBLOCK).unwrap();
    let _ = wake.write(1);
    ctx.rings.push(RawRing {
        driver,
        kick: eventfd,
        call: wake,
    });
    std::thread::sleep(Duration::from_millis(100));
    // The daemon still stops the ring: no worker is stuck holding it.
    ctx.fe.call(req::GET_VRING_BASE, &vring_state(0, 0), &[])
}

/// A ring whose rings are garbage `garbage` writes after a valid setup; kicked, then stopped.
fn garbage_ring(ctx: &mut Ctx<'_>, garbage: fn(&mut TestDriver)) -> Answer {
    ctx.with_memory();
    // The queue the daemon reads requests from (a receive queue is read only for a packet).
    let index = ctx.subject.serve_queue as u32;
    let at = ctx.ring(index);
    garbage(&mut ctx.rings[at].driver);
    let a = ctx.kick_and_stop(at, index);
    // The daemon answers GET_VRING_BASE with the ring's state: a reply to that request.
    match &a {
        Answer::Message(m) if m.header.request == req::GET_VRING_BASE => {
            // The rest of the protocol still works: set the ring up again and kick it twice
            // more (a broken ring is reported once, not per kick).
            Answer::Message(raw::Message {
                header: m.header,
                payload: vec![0; 8],
                fds: Vec::new(),
            })
        }
        _ => a,
    }
}

/// The hostile frontends.
pub const CASES: &[Case] = &[
    // ---- memory tables ----
    Case {
        name: "mem_table_with_0_regions",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(req::SET_MEM_TABLE, &mem_table(0, &[]), &[])
        },
    },
    Case {
        name: "mem_table_with_33_regions",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            let (r, fd) = ctx.region();
            let regions: Vec<Region> = (0..33u64)
                .map(|i| Region {
                    guest_addr: i << 32,
                    ..r
                })
                .collect();
            let fds = vec![fd; 33];
            ctx.fe
                .call(req::SET_MEM_TABLE, &mem_table(33, &regions), &fds)
        },
    },
    Case {
        name: "mem_table_count_beyond_payload",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            let (r, fd) = ctx.region();
            ctx.fe
                .call(req::SET_MEM_TABLE, &mem_table(2, &[r]), &[fd, fd])
        },
    },
    Case {
        name: "mem_table_overlapping_regions",
        expect: Expect::Refused("handler failed"),
        run: |ctx| {
            ctx.negotiate();
            let (r, fd) = ctx.region();
            let half = Region {
                guest_addr: r.guest_addr + r.size / 2,
                user_addr: r.user_addr + r.size / 2,
                mmap_offset: r.size / 2,
                size: r.size / 2,
            };
            ctx.fe
                .call(req::SET_MEM_TABLE, &mem_table(2, &[r, half]), &[fd, fd])
        },
    },
    Case {
        name: "mem_table_region_larger_than_its_memfd",
        expect: Expect::Refused("memory region"),
        run: |ctx| {
            let (r, fd) = ctx.region();
            let region = Region {
                size: r.size * 2,
                ..r
            };
            let a = one_region(ctx, region, fd);
            if a.ack() != Some(0) {
                return a;
            }
            // Accepted: put a ring in the part beyond the file, where the daemon reads the
            // used index at once.
            let beyond = r.user_addr + r.size + 0x1000;
            ctx.fe.ok(req::SET_VRING_NUM, &vring_state(0, 64), &[]);
            ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0, beyond, beyond + 0x1000, beyond + 0x800),
                &[],
            )
        },
    },
    Case {
        name: "mem_table_mmap_offset_beyond_the_file",
        expect: Expect::Refused("memory region"),
        run: |ctx| {
            let (r, fd) = ctx.region();
            let region = Region {
                mmap_offset: 16 << 20,
                size: 1 << 20,
                ..r
            };
            let a = one_region(ctx, region, fd);
            if a.ack() != Some(0) {
                return a;
            }
            let ring = r.user_addr + 0x1000;
            ctx.fe.ok(req::SET_VRING_NUM, &vring_state(0, 64), &[]);
            ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0, ring, ring + 0x1000, ring + 0x800),
                &[],
            )
        },
    },
    Case {
        name: "mem_table_region_of_64_tib",
        expect: Expect::Refused("memory region"),
        run: |ctx| {
            let (r, fd) = ctx.region();
            one_region(ctx, Region { size: 1 << 46, ..r }, fd)
        },
    },
    Case {
        name: "mem_table_unaligned_mmap_offset",
        expect: Expect::Refused("handler failed"),
        run: |ctx| {
            let (r, fd) = ctx.region();
            let region = Region {
                mmap_offset: 100,
                size: r.size - 0x1000,
                ..r
            };
            one_region(ctx, region, fd)
        },
    },
    Case {
        name: "mem_table_guest_range_wraps",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            let (r, fd) = ctx.region();
            let region = Region {
                guest_addr: u64::MAX - 0xfff,
                ..r
            };
            one_region(ctx, region, fd)
        },
    },
    Case {
        name: "mem_table_without_its_fd",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            let (r, _) = ctx.region();
            ctx.fe.call(req::SET_MEM_TABLE, &mem_table(1, &[r]), &[])
        },
    },
    Case {
        name: "mem_table_with_fewer_fds_than_regions",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            let (r, fd) = ctx.region();
            let second = Region {
                guest_addr: 1 << 32,
                ..r
            };
            ctx.fe
                .call(req::SET_MEM_TABLE, &mem_table(2, &[r, second]), &[fd])
        },
    },
    Case {
        name: "mem_table_fd_is_a_pipe",
        expect: Expect::Refused("handler failed"),
        run: |ctx| {
            let (read, write) = pipe();
            ctx.keep(write);
            region_on(ctx, read)
        },
    },
    Case {
        name: "mem_table_fd_is_a_fifo",
        expect: Expect::Refused("handler failed"),
        run: |ctx| {
            let f = fifo(&ctx.dir.join("fifo"));
            region_on(ctx, f.into())
        },
    },
    Case {
        name: "mem_table_fd_is_dev_null",
        expect: Expect::Refused("handler failed"),
        run: |ctx| region_on(ctx, dev("/dev/null").into()),
    },
    Case {
        name: "mem_table_fd_is_dev_zero",
        expect: Expect::Refused("memory region"),
        run: |ctx| region_on(ctx, dev("/dev/zero").into()),
    },
    Case {
        name: "mem_table_fd_is_a_socket",
        expect: Expect::Refused("handler failed"),
        run: |ctx| {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            ctx.keep(b.into());
            region_on(ctx, a.into())
        },
    },
    // ---- rings ----
    Case {
        name: "vring_num_0",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            ctx.with_memory();
            ctx.fe.call(req::SET_VRING_NUM, &vring_state(0, 0), &[])
        },
    },
    Case {
        name: "vring_num_not_a_power_of_two",
        expect: Expect::Refused("not a power of two"),
        run: |ctx| {
            ctx.with_memory();
            ctx.fe.call(req::SET_VRING_NUM, &vring_state(0, 100), &[])
        },
    },
    Case {
        name: "vring_num_above_the_maximum",
        expect: Expect::Refused("out of range"),
        run: |ctx| {
            ctx.with_memory();
            let num = u32::from(ctx.subject.queue_max_size) * 2;
            ctx.fe.call(req::SET_VRING_NUM, &vring_state(0, num), &[])
        },
    },
    Case {
        name: "vring_num_u32_max",
        expect: Expect::Refused("out of range"),
        run: |ctx| {
            ctx.with_memory();
            ctx.fe
                .call(req::SET_VRING_NUM, &vring_state(0, u32::MAX), &[])
        },
    },
    Case {
        name: "vring_addr_before_any_mem_table",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0, 0x1000, 0x3000, 0x2000),
                &[],
            )
        },
    },
    Case {
        name: "vring_addr_outside_mapped_memory",
        expect: Expect::Refused("Missing memory mapping"),
        run: |ctx| {
            ctx.with_memory();
            let out = ctx.hva(0) + 64 * (1 << 20);
            ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0, out, out + 0x1000, out + 0x800),
                &[],
            )
        },
    },
    Case {
        name: "vring_addr_unaligned",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.with_memory();
            let at = ctx.hva(RING_AREA);
            ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0, at + 1, at + 0x1000, at + 0x800),
                &[],
            )
        },
    },
    Case {
        name: "vring_addr_unknown_flags",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.with_memory();
            let at = ctx.hva(RING_AREA);
            ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0xff, at, at + 0x1000, at + 0x800),
                &[],
            )
        },
    },
    Case {
        name: "vring_straddling_the_end_of_memory",
        expect: Expect::Survives("ignoring it"),
        run: |ctx| {
            ctx.with_memory();
            let q = ctx.subject.serve_queue as u32;
            let end = ctx.hva(0) + MEM_SIZE as u64;
            ctx.fe.ok(req::SET_VRING_NUM, &vring_state(q, 64), &[]);
            // Each ring starts inside memory and runs past its end.
            ctx.fe.ok(
                req::SET_VRING_ADDR,
                &vring_addr(q, 0, end - 0x10, end - 0x8, end - 0x4),
                &[],
            );
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            ctx.fe.ok(req::SET_VRING_BASE, &vring_state(q, 0), &[]);
            let index = u64_payload(u64::from(q));
            ctx.fe.ok(req::SET_VRING_CALL, &index, &[call.as_raw_fd()]);
            ctx.fe.ok(req::SET_VRING_KICK, &index, &[kick.as_raw_fd()]);
            ctx.fe.ok(req::SET_VRING_ENABLE, &vring_state(q, 1), &[]);
            // One request available: its entry in the avail ring is past the end.
            let idx = GuestAddress(MEM_SIZE as u64 - 2);
            ctx.mem.write_slice(&1u16.to_le_bytes(), idx).unwrap();
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            ctx.fe.call(req::GET_VRING_BASE, &vring_state(q, 0), &[])
        },
    },
    Case {
        name: "vring_base_out_of_range",
        expect: Expect::Survives("ignoring it"),
        run: |ctx| {
            ctx.with_memory();
            let q = ctx.subject.serve_queue as u32;
            let at = ctx.ring(q);
            // A base beyond 16 bits, then a kick: the daemon looks at the avail ring from
            // there.
            ctx.fe
                .ok(req::SET_VRING_BASE, &vring_state(q, 0x1_2345), &[]);
            ctx.kick_and_stop(at, q)
        },
    },
    Case {
        name: "vring_enable_with_2",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            ctx.with_memory();
            ctx.fe.call(req::SET_VRING_ENABLE, &vring_state(0, 2), &[])
        },
    },
    Case {
        name: "set_vring_num_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::SET_VRING_NUM, n)
        },
    },
    Case {
        name: "set_vring_num_queue_u32_max",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| bad_index(ctx, req::SET_VRING_NUM, u32::MAX),
    },
    Case {
        name: "set_vring_addr_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::SET_VRING_ADDR, n)
        },
    },
    Case {
        name: "set_vring_base_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::SET_VRING_BASE, n)
        },
    },
    Case {
        name: "get_vring_base_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::GET_VRING_BASE, n)
        },
    },
    Case {
        name: "set_vring_enable_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::SET_VRING_ENABLE, n)
        },
    },
    Case {
        name: "set_vring_kick_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::SET_VRING_KICK, n)
        },
    },
    Case {
        name: "set_vring_call_queue_255",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| bad_index(ctx, req::SET_VRING_CALL, 255),
    },
    Case {
        name: "set_vring_err_queue_beyond_the_last",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            let n = ctx.subject.num_queues as u32;
            bad_index(ctx, req::SET_VRING_ERR, n)
        },
    },
    Case {
        name: "set_vring_kick_without_its_fd",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.with_memory();
            ctx.fe.call(req::SET_VRING_KICK, &u64_payload(0), &[])
        },
    },
    Case {
        name: "set_vring_call_without_its_fd",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.with_memory();
            ctx.fe.call(req::SET_VRING_CALL, &u64_payload(0), &[])
        },
    },
    Case {
        name: "set_vring_kick_no_fd_flag_with_an_fd",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.with_memory();
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            ctx.fe.call(
                req::SET_VRING_KICK,
                &u64_payload(VRING_NOFD),
                &[e.as_raw_fd()],
            )
        },
    },
    Case {
        name: "set_vring_kick_regular_file",
        expect: Expect::Refused("not an eventfd"),
        run: |ctx| {
            let f = ctx.regular_file("kick", 8);
            let fd = ctx.keep(f.into());
            ring_with_fd(ctx, req::SET_VRING_KICK, fd)
        },
    },
    Case {
        name: "set_vring_kick_pipe_with_a_short_write",
        expect: Expect::Refused("not an eventfd"),
        run: |ctx| {
            let (read, write) = pipe();
            // Three bytes where the daemon reads eight: a blocking read would wait for ever.
            // SAFETY: writes 3 bytes from a live buffer to the pipe.
            unsafe { libc::write(write.as_raw_fd(), b"abc".as_ptr().cast(), 3) };
            ctx.keep(write);
            let fd = ctx.keep(read);
            ring_with_fd(ctx, req::SET_VRING_KICK, fd)
        },
    },
    Case {
        name: "set_vring_call_full_pipe",
        expect: Expect::Refused("not an eventfd"),
        run: |ctx| {
            let (read, write) = pipe();
            // Fill the pipe: a blocking write of the daemon's notification would wait for ever.
            // SAFETY: fcntl on our own descriptor.
            unsafe {
                libc::fcntl(write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            }
            let chunk = [0u8; 4096];
            // SAFETY: writes from a live buffer to the pipe until it is full.
            while unsafe { libc::write(write.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0
            {
            }
            // SAFETY: as above.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) };
            ctx.keep(read);
            let fd = ctx.keep(write);
            ring_with_fd(ctx, req::SET_VRING_CALL, fd)
        },
    },
    Case {
        name: "set_vring_call_dev_null",
        expect: Expect::Refused("not an eventfd"),
        run: |ctx| {
            let fd = ctx.keep(dev("/dev/null").into());
            ring_with_fd(ctx, req::SET_VRING_CALL, fd)
        },
    },
    // ---- framing ----
    Case {
        name: "size_field_larger_than_the_payload",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .send_sized(req::SET_FEATURES, VERSION_1 | NEED_REPLY, 8, &[0; 4], &[])
                .unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "size_field_smaller_than_the_body",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .send_sized(req::SET_VRING_NUM, VERSION_1 | NEED_REPLY, 4, &[0; 4], &[])
                .unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "size_field_above_the_protocol_maximum",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .send_sized(
                    req::SET_CONFIG,
                    VERSION_1 | NEED_REPLY,
                    0x1001,
                    &[0; 64],
                    &[],
                )
                .unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "size_field_u32_max",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.fe
                .send_sized(req::GET_FEATURES, VERSION_1, u32::MAX, &[], &[])
                .unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "truncated_header_then_eof",
        expect: Expect::Disconnects,
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.send_bytes(&[3, 0, 0, 0, 1, 0], &[]).unwrap();
            ctx.fe.stream().shutdown(std::net::Shutdown::Write).unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "header_then_eof_before_the_payload",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .send_sized(req::SET_FEATURES, VERSION_1 | NEED_REPLY, 8, &[], &[])
                .unwrap();
            ctx.fe.stream().shutdown(std::net::Shutdown::Write).unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "unknown_request_code",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(9999, &[], &[])
        },
    },
    Case {
        name: "request_code_0",
        expect: Expect::Refused("invalid message"),
        run: |ctx| ctx.fe.call(0, &[], &[]),
    },
    Case {
        name: "request_marked_as_a_reply",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.fe
                .send(req::GET_FEATURES, VERSION_1 | REPLY, &[], &[])
                .unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "protocol_version_2",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.fe.send(req::GET_FEATURES, 0x2, &[], &[]).unwrap();
            ctx.fe.receive(TIMEOUT)
        },
    },
    Case {
        name: "fd_attached_to_get_features",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            ctx.fe.call(req::GET_FEATURES, &[], &[e.as_raw_fd()])
        },
    },
    Case {
        name: "set_owner_twice",
        expect: Expect::Refused("already claimed"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(req::SET_OWNER, &[], &[])
        },
    },
    Case {
        name: "features_never_offered",
        expect: Expect::Refused("invalid parameters"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(req::SET_FEATURES, &u64_payload(1 << 63), &[])
        },
    },
    Case {
        name: "get_config_size_0",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .call(req::GET_CONFIG, &raw::config(0, 0, 0, &[]), &[])
        },
    },
    Case {
        name: "get_config_size_beyond_its_payload",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .call(req::GET_CONFIG, &raw::config(0, 4000, 0, &[0; 16]), &[])
        },
    },
    Case {
        name: "get_config_beyond_the_protocol_s_4_kib",
        expect: Expect::Refused("invalid message"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(
                req::GET_CONFIG,
                &raw::config(0xffff_0000, 16, 0, &[0; 16]),
                &[],
            )
        },
    },
    Case {
        name: "get_config_past_the_device_s_space",
        expect: Expect::Survives(""),
        run: |ctx| {
            ctx.negotiate();
            let a = ctx
                .fe
                .call(req::GET_CONFIG, &raw::config(0xe0, 16, 0, &[0xff; 16]), &[]);
            match &a {
                // Zeros past the end of the space.
                Answer::Message(m) if m.header.request == req::GET_CONFIG => {
                    assert_eq!(m.payload[12..], [0; 16], "{m:?}");
                    Answer::Message(raw::Message {
                        header: m.header,
                        payload: vec![0; 8],
                        fds: Vec::new(),
                    })
                }
                _ => a,
            }
        },
    },
    Case {
        name: "set_config_of_a_read_only_space",
        expect: Expect::Survives(""),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe
                .call(req::SET_CONFIG, &raw::config(0, 8, 0, &[0xff; 8]), &[])
        },
    },
    Case {
        name: "inflight_fd_never_offered",
        expect: Expect::Refused("inactive protocol operation"),
        run: |ctx| {
            ctx.negotiate();
            ctx.fe.call(req::GET_INFLIGHT_FD, &[0; 24], &[])
        },
    },
    Case {
        name: "add_mem_reg_never_offered",
        expect: Expect::Refused("inactive protocol operation"),
        run: |ctx| {
            ctx.negotiate();
            let (r, fd) = ctx.region();
            let mut p = u64_payload(0);
            p.extend_from_slice(&mem_table(1, &[r])[8..]);
            ctx.fe.call(req::ADD_MEM_REG, &p, &[fd])
        },
    },
    Case {
        name: "set_log_base_never_offered",
        expect: Expect::Refused("inactive protocol operation"),
        run: |ctx| {
            ctx.negotiate();
            let (_, fd) = ctx.region();
            ctx.fe.call(req::SET_LOG_BASE, &[0; 16], &[fd])
        },
    },
    // ---- garbage in the rings ----
    Case {
        name: "ring_descriptor_outside_memory",
        expect: Expect::Survives("malformed"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                d.store_desc(0, 0xdead_0000_0000, 4096, DESC_WRITE, 0);
                d.push_avail(0);
            })
        },
    },
    Case {
        name: "ring_descriptor_loop",
        expect: Expect::Survives("malformed"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                let buf = d.alloc(64, 0);
                d.store_desc(0, buf, 16, DESC_NEXT, 1);
                d.store_desc(1, buf + 16, 16, DESC_NEXT, 0);
                d.push_avail(0);
            })
        },
    },
    Case {
        name: "ring_descriptor_of_4_gib",
        expect: Expect::Survives("malformed"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                let buf = d.alloc(64, 0);
                d.store_desc(0, buf, 16, DESC_NEXT, 1);
                d.store_desc(1, 0, u32::MAX, DESC_WRITE, 0);
                d.push_avail(0);
            })
        },
    },
    Case {
        name: "ring_head_beyond_the_queue_size",
        expect: Expect::Survives("ignoring it"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                d.push_avail(1000);
            })
        },
    },
    Case {
        name: "ring_avail_index_far_ahead",
        expect: Expect::Survives("ignoring it"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                d.set_avail_idx(5000);
            })
        },
    },
    Case {
        name: "ring_indirect_table_of_4_gib",
        expect: Expect::Survives("malformed"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                d.store_desc(0, 0x20_0000, 0xffff_fff0, DESC_INDIRECT, 0);
                d.push_avail(0);
            })
        },
    },
    Case {
        name: "ring_indirect_table_outside_memory",
        expect: Expect::Survives("malformed"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                d.store_desc(0, 0xdead_0000_0000, 64, DESC_INDIRECT, 0);
                d.push_avail(0);
            })
        },
    },
    Case {
        name: "ring_nested_indirect_tables",
        expect: Expect::Survives("malformed"),
        run: |ctx| {
            garbage_ring(ctx, |d| {
                let table = d.alloc(32, 0);
                let mut e = [0u8; 16];
                e[0..8].copy_from_slice(&table.to_le_bytes());
                e[8..12].copy_from_slice(&32u32.to_le_bytes());
                e[12..14].copy_from_slice(&DESC_INDIRECT.to_le_bytes());
                let at = d.alloc_data(&e);
                // The table points at itself, indirect.
                d.store_desc(0, at, 16, DESC_INDIRECT, 0);
                d.push_avail(0);
            })
        },
    },
    // ---- guest memory that shrinks under the daemon ----
    Case {
        name: "memfd_truncated_while_serving",
        expect: Expect::Refused("guest memory"),
        run: |ctx| {
            ctx.with_memory();
            let at = ctx.ring(0);
            let expected = (ctx.subject.request)(&mut ctx.rings[at].driver);
            let _ = expected;
            // The rings are at 1 MiB and beyond: cut the file below them.
            ctx.memfd().set_len(RING_AREA / 2).unwrap();
            ctx.rings[at].kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            ctx.fe.call(req::GET_VRING_BASE, &vring_state(0, 0), &[])
        },
    },
    Case {
        name: "memfd_truncated_before_the_rings_are_set_up",
        expect: Expect::Refused("guest memory"),
        run: |ctx| {
            ctx.with_memory();
            ctx.memfd().set_len(RING_AREA / 2).unwrap();
            let at = ctx.hva(RING_AREA);
            ctx.fe.ok(req::SET_VRING_NUM, &vring_state(0, 64), &[]);
            // The daemon reads the used index there at once.
            let a = ctx.fe.call(
                req::SET_VRING_ADDR,
                &vring_addr(0, 0, at, at + 0x800, at + 0x400),
                &[],
            );
            if a.ack() != Some(0) {
                return a;
            }
            ctx.fe.call(req::GET_FEATURES, &[], &[])
        },
    },
];

/// Starts `subject` on a socket in `dir` with `extra` arguments and `-v`.
fn start(subject: &HostileSubject<'_>, dir: &Scratch, extra: &[&str]) -> (Daemon, PathBuf) {
    let socket = dir.file("hostile.sock");
    let args = (subject.args)(&socket);
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(extra);
    all.push("-v");
    // A socket left by a daemon killed after an earlier case does not count.
    let stale = super::file_id(&socket);
    let mut d = Daemon::spawn(subject.bin, &all);
    d.wait_for_socket(&socket, stale);
    (d, socket)
}

/// Runs `case` on a new connection to `socket`; checks the daemon's answer and what became of
/// the connection.
fn run_case(subject: &HostileSubject<'_>, case: &Case, socket: &Path, dir: &Scratch) {
    let name = case.name;
    let mem = shared_memory(c"hostile-guest-ram", MEM_SIZE);
    let case_dir = dir.file(name);
    let _ = std::fs::remove_dir_all(&case_dir);
    std::fs::create_dir_all(&case_dir).unwrap();
    let mut ctx = Ctx {
        fe: RawFrontend::connect(socket),
        mem,
        subject,
        dir: case_dir,
        keep: Vec::new(),
        rings: Vec::new(),
    };
    let answer = (case.run)(&mut ctx);
    match case.expect {
        Expect::Refused(_) => {
            match &answer {
                Answer::Closed => {}
                a if a.ack().is_some_and(|s| s != 0) => {}
                Answer::Message(m) if m.header.request == req::GET_VRING_BASE => {}
                Answer::Message(m) if m.header.request == req::GET_FEATURES => {}
                a => panic!("{name}: expected a refusal, got {a:?}"),
            }
            assert!(
                ctx.fe.closed_within(TIMEOUT),
                "{name}: the daemon kept the connection after refusing"
            );
        }
        Expect::Survives(_) => {
            match &answer {
                a if a.ack() == Some(0) => {}
                Answer::Message(m) if m.header.request != 0 && m.header.flags & REPLY != 0 => {}
                a => panic!("{name}: expected the daemon to carry on, got {a:?}"),
            }
            // Still answering.
            let features = ctx.fe.call(req::GET_FEATURES, &[], &[]);
            assert!(
                matches!(&features, Answer::Message(m) if m.header.request == req::GET_FEATURES),
                "{name}: no answer after the hostile message: {features:?}"
            );
        }
        Expect::Disconnects => {
            assert!(
                matches!(answer, Answer::Closed | Answer::Silent),
                "{name}: {answer:?}"
            );
        }
    }
}

/// [`run_case`], with the daemon's log in the failure message.
fn run_case_logged(
    subject: &HostileSubject<'_>,
    case: &Case,
    socket: &Path,
    dir: &Scratch,
    d: &Daemon,
) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_case(subject, case, socket, dir);
    }));
    if let Err(p) = r {
        panic!(
            "{}\n----- daemon log so far -----\n{}",
            panic_message(&p),
            d.log_so_far()
        );
    }
}

/// The needle a case expects in the daemon's log, if any.
fn needle(case: &Case) -> Option<&'static str> {
    match case.expect {
        Expect::Refused(n) | Expect::Survives(n) if !n.is_empty() => Some(n),
        _ => None,
    }
}

/// Asserts a daemon's stderr shows no panic and no signal.
fn assert_no_crash(name: &str, err: &str) {
    assert!(
        !err.contains("panicked"),
        "{name}: the daemon panicked:\n{err}"
    );
    assert!(
        !err.contains("nimbus: seccomp:"),
        "{name}: a forbidden system call:\n{err}"
    );
}

/// A well-behaved frontend: the whole setup, one request on the subject's queue, its
/// completion.
fn serve_well(subject: &HostileSubject<'_>, socket: &Path, what: &str) {
    let mem = shared_memory(c"well-behaved-guest-ram", MEM_SIZE);
    let mut frontend = Frontend::connect(socket, subject.num_queues as u64).unwrap();
    let options = HandshakeOptions {
        config_len: subject.config_len,
        event_idx: false,
        queue_max_size: subject.queue_max_size,
    };
    let mut h = handshake(&mut frontend, &mem, subject.num_queues, options);
    let ring = &mut h.rings[subject.serve_queue];
    let expected = (subject.request)(&mut ring.driver);
    ring.kick.write(1).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let used = ring.driver.take_used();
        if let Some(&(_, len)) = used.first() {
            assert_eq!(len, expected, "{what}: used length");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the well-behaved request was not served"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    drop((frontend, h));
}

/// Runs every case of [`CASES`] (those `NIMBUS_HOSTILE_CASES` names, if set) against
/// `subject`, as the module says: each against a daemon
/// in its default mode (exit status 1 with `frontend connection failed: ...` and the case's
/// needle after a refusal, 0 after a frontend that survived or went away; never a signal, a
/// panic or a hang), then all against one `--keep-running` daemon that serves a well-behaved
/// frontend after each.
///
/// # Panics
///
/// At the first case the daemon mishandles, naming it.
pub fn assert_hostile_frontends_are_survived(subject: &HostileSubject<'_>) {
    // `NIMBUS_HOSTILE_CASES=a,b` runs only the cases whose names contain `a` or `b`.
    let only = std::env::var("NIMBUS_HOSTILE_CASES").unwrap_or_default();
    let cases: Vec<Case> = CASES
        .iter()
        .filter(|c| only.is_empty() || only.split(',').any(|o| c.name.contains(o)))
        .copied()
        .collect();
    assert_hostile_frontends_are_survived_by(subject, &cases);
}

/// As [`assert_hostile_frontends_are_survived`], for `cases` only.
///
/// # Panics
///
/// As [`assert_hostile_frontends_are_survived`], after running every case, with the
/// failure of each case that failed.
pub fn assert_hostile_frontends_are_survived_by(subject: &HostileSubject<'_>, cases: &[Case]) {
    let dir = Scratch::new("hostile");
    let mut failures = Vec::new();
    for case in cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            default_mode(subject, case, &dir);
        }));
        if let Err(p) = r {
            failures.push(format!(
                "{} (default mode): {}",
                case.name,
                panic_message(&p)
            ));
        }
    }
    let mut daemon = None;
    for case in cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            keep_running_mode(subject, case, &dir, &mut daemon);
        }));
        if let Err(p) = r {
            failures.push(format!(
                "{} (--keep-running): {}",
                case.name,
                panic_message(&p)
            ));
            // A new daemon for the next case (this one is killed).
            daemon = None;
        }
    }
    if let Some((d, _)) = daemon {
        d.signal(libc::SIGTERM);
        let (status, err) = d.wait();
        if status.code() != Some(0) || err.contains("panicked") {
            failures.push(format!("--keep-running after the cases: {status}\n{err}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n\n{}",
        failures.len(),
        2 * cases.len(),
        failures.join("\n\n")
    );
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// `case` against a daemon in its default mode, which must end as the case says.
fn default_mode(subject: &HostileSubject<'_>, case: &Case, dir: &Scratch) {
    let name = case.name;
    let (d, socket) = start(subject, dir, &[]);
    run_case_logged(subject, case, &socket, dir, &d);
    let (status, err) = d.wait();
    assert_no_crash(name, &err);
    match case.expect {
        Expect::Refused(needle) => {
            assert_eq!(status.code(), Some(1), "{name}: {status}\n{err}");
            let last = err.lines().last().unwrap_or_default();
            assert!(
                last.contains("error: frontend connection failed"),
                "{name}: the last line should say the connection failed:\n{err}"
            );
            assert!(
                err.contains(needle),
                "{name}: no {needle:?} in the log:\n{err}"
            );
        }
        Expect::Survives(needle) => {
            assert_eq!(status.code(), Some(0), "{name}: {status}\n{err}");
            assert!(err.contains("frontend disconnected"), "{name}:\n{err}");
            assert!(
                err.contains(needle),
                "{name}: no {needle:?} in the log:\n{err}"
            );
        }
        Expect::Disconnects => {
            assert_eq!(status.code(), Some(0), "{name}: {status}\n{err}");
            assert!(err.contains("frontend disconnected"), "{name}:\n{err}");
        }
    }
}

/// `case` against the `--keep-running` daemon in `daemon` (started if `None`), which must
/// then serve a well-behaved frontend.
fn keep_running_mode(
    subject: &HostileSubject<'_>,
    case: &Case,
    dir: &Scratch,
    daemon: &mut Option<(Daemon, PathBuf)>,
) {
    let name = case.name;
    let (d, socket) = daemon.get_or_insert_with(|| start(subject, dir, &["--keep-running"]));
    let before = d.log_so_far().len();
    run_case_logged(subject, case, socket, dir, d);
    // The connection's end is logged before the daemon waits for the next one.
    let end = match case.expect {
        Expect::Refused(_) => "frontend connection failed",
        _ => "frontend disconnected",
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = d.log_so_far();
        let new = &log[before..];
        if new.contains(end) && needle(case).is_none_or(|n| new.contains(n)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no {end:?} / {:?} in the log:\n{new}",
            needle(case)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    serve_well(subject, socket, name);
    assert_no_crash(name, &d.log_so_far());
}
