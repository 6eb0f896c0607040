//! The thread that serves a running vhost-user device: it turns the backend's call eventfds
//! into interrupts, and it watches the backend's socket. When the backend goes away the device
//! keeps its [`Session`] and waits — on a retry timer (Nimbus connects) or on its listening
//! socket (the backend connects) — then hands the session to the new backend with every ring
//! resuming at the used index in guest memory: what the old backend completed stays completed,
//! everything after it is served again. Backends that complete requests in order
//! (`vhost_user_block`, `vhost_user_net`) need nothing more; backends that keep an inflight
//! area (`INFLIGHT_SHMFD`, e.g. `qemu-storage-daemon`) get it back and resubmit from it.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use virtio_chain::QueueError;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::device::LocalQueue;
use super::{Backend, Connection, Session, VhostUserError};
use crate::worker::QueueHandler;
use crate::{ActiveQueue, GuestMemoryAtomic};

/// How often a client retries a backend that went away.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Backends that accept the connection and then refuse the setup this many times in a row
/// are given up on (the device then needs a reset).
const MAX_REFUSALS: u32 = 3;

const SOCKET: u64 = 0;
const RETRY: u64 = 1;

/// Errors that stop a vhost-user device's relay thread (the device then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The backend's socket, the retry timer or the listening socket cannot be watched.
    #[error("cannot watch for the vhost-user backend at {path}")]
    Watch {
        /// The backend's socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A ring's indices cannot be read to hand it to a backend that came back.
    #[error("cannot read the rings of queue {index}")]
    Rings {
        /// Queue index.
        index: u16,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// The driver's setup cannot be handed to a backend that came back (not the backend's
    /// fault: e.g. guest memory that cannot be shared).
    #[error("cannot hand the device to the vhost-user backend at {path}")]
    Setup {
        /// The backend's socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: VhostUserError,
    },
    /// A backend that came back refused the device's setup [`MAX_REFUSALS`] times in a row.
    #[error("the vhost-user backend at {path} keeps refusing the device's setup")]
    Refused {
        /// The backend's socket path.
        path: PathBuf,
    },
    /// The queue served by the relay itself is broken.
    #[error(transparent)]
    Local(#[from] QueueError),
}

/// A device's way to its backend: the address and the current connection (none while the
/// backend is away).
#[derive(Debug)]
pub(super) struct Link {
    pub(super) backend: Backend,
    pub(super) connection: Mutex<Option<Connection>>,
}

impl Link {
    pub(super) fn connection(&self) -> MutexGuard<'_, Option<Connection>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self) -> std::path::Display<'_> {
        self.backend.endpoint.path().display()
    }

    /// A [`RelayError::Watch`] on this link's backend.
    fn watch_error(&self, source: std::io::Error) -> RelayError {
        RelayError::Watch {
            path: self.backend.endpoint.path().to_path_buf(),
            source,
        }
    }
}

/// What the relay waits for besides calls.
enum Watch {
    /// The connected backend's socket, for a hang-up.
    Socket(RawFd),
    /// The retry timer (client) or the listening socket (server), for a backend coming back.
    Retry(Option<TimerFd>),
}

/// The [`QueueHandler`] of a vhost-user device's relay thread. Its queues' "kicks" are the
/// backend's call eventfds.
pub(super) struct Relay {
    link: Arc<Link>,
    session: Session,
    /// The queue served here rather than by the backend, with its index.
    local: Option<(u16, Arc<dyn LocalQueue>)>,
    name: String,
    poll: Epoll,
    watch: Watch,
    refusals: u32,
}

impl Relay {
    /// A relay for `session`, running on the link's connection when `connected`, else waiting
    /// for the backend.
    pub(super) fn new(
        link: Arc<Link>,
        session: Session,
        local: Option<(u16, Arc<dyn LocalQueue>)>,
        name: String,
        connected: bool,
        refusals: u32,
    ) -> std::io::Result<Self> {
        let mut relay = Self {
            link,
            session,
            local,
            name,
            poll: Epoll::new()?,
            watch: Watch::Retry(None),
            refusals,
        };
        if connected {
            relay.watch_socket()?;
        } else {
            relay.wait_for_backend()?;
        }
        Ok(relay)
    }

    fn watch_socket(&mut self) -> std::io::Result<()> {
        let Some(fd) = self.link.connection().as_ref().map(Connection::raw_fd) else {
            return self.wait_for_backend();
        };
        // Only a hang-up: replies are read by whoever sent the request.
        let hangup = EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        self.poll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(hangup, SOCKET))?;
        self.watch = Watch::Socket(fd);
        Ok(())
    }

    fn wait_for_backend(&mut self) -> std::io::Result<()> {
        let (fd, timer) = match self.link.backend.endpoint.listener_fd() {
            Some(fd) => (fd, None),
            None => {
                let mut timer = TimerFd::new()?;
                timer.reset(RETRY_INTERVAL, Some(RETRY_INTERVAL))?;
                (timer.as_raw_fd(), Some(timer))
            }
        };
        self.poll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, RETRY),
        )?;
        self.watch = Watch::Retry(timer);
        Ok(())
    }

    fn unwatch(&mut self) {
        let fd = match &self.watch {
            Watch::Socket(fd) => Some(*fd),
            Watch::Retry(Some(timer)) => Some(timer.as_raw_fd()),
            Watch::Retry(None) => self.link.backend.endpoint.listener_fd(),
        };
        if let Some(fd) = fd {
            let _ = self
                .poll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.watch = Watch::Retry(None);
    }

    fn disconnected(&mut self) -> Result<(), RelayError> {
        self.unwatch();
        *self.link.connection() = None;
        log::warn!(
            "{}: the vhost-user backend at {} went away; waiting for it to come back (the guest's requests wait)",
            self.name,
            self.link.path()
        );
        self.wait_for_backend()
            .map_err(|e| self.link.watch_error(e))
    }

    /// One attempt to get the backend back. Returns the queues to interrupt.
    fn reconnect(
        &mut self,
        queues: &[ActiveQueue],
        mem: &GuestMemoryAtomic,
    ) -> Result<Vec<u16>, RelayError> {
        if let Watch::Retry(Some(timer)) = &mut self.watch {
            let _ = timer.wait();
        }
        let mut connection = match self.link.backend.connect(false) {
            Ok(c) => c,
            Err(VhostUserError::Connect { .. }) => return Ok(Vec::new()),
            Err(e) => {
                log::warn!(
                    "{}: {}: {}",
                    self.name,
                    self.link.path(),
                    nimbus_log::error_chain(&e)
                );
                return Ok(Vec::new());
            }
        };
        // Every ring resumes where the backend's completions stopped.
        let m = mem.memory();
        let mut bases = Vec::with_capacity(queues.len());
        let mut resubmitted = 0u32;
        for q in queues.iter().filter(|q| !self.is_local(q.index)) {
            let rings = |source| RelayError::Rings {
                index: q.index,
                source,
            };
            let used = q.queue.used_idx(&*m, Ordering::Acquire).map_err(rings)?;
            let avail = q.queue.avail_idx(&*m, Ordering::Acquire).map_err(rings)?;
            bases.push(used.0);
            resubmitted += u32::from((avail - used).0);
        }
        drop(m);
        match connection.start(&mut self.session, &bases) {
            Ok(()) => {}
            Err(source @ VhostUserError::Setup(_)) => {
                return Err(RelayError::Setup {
                    path: self.link.backend.endpoint.path().to_path_buf(),
                    source,
                })
            }
            Err(e) => {
                self.refusals += 1;
                log::warn!(
                    "{}: the backend at {} is back but refused the device's setup ({}/{MAX_REFUSALS}): {}",
                    self.name,
                    self.link.path(),
                    self.refusals,
                    nimbus_log::error_chain(&e)
                );
                if self.refusals >= MAX_REFUSALS {
                    return Err(RelayError::Refused {
                        path: self.link.backend.endpoint.path().to_path_buf(),
                    });
                }
                return Ok(Vec::new());
            }
        }
        self.refusals = 0;
        self.unwatch();
        *self.link.connection() = Some(connection);
        self.watch_socket().map_err(|e| self.link.watch_error(e))?;
        // The old backend may have taken kicks it never served: look at every ring.
        for ring in &self.session.rings {
            let _ = ring.kick.write(1);
        }
        log::info!(
            "{}: reconnected to the vhost-user backend at {}; rings resume at the used index, {resubmitted} request(s) in flight served again",
            self.name,
            self.link.path()
        );
        // Completions the old backend published without a notification.
        Ok(queues
            .iter()
            .map(|q| q.index)
            .filter(|&i| !self.is_local(i))
            .collect())
    }

    fn is_local(&self, index: u16) -> bool {
        self.local.as_ref().is_some_and(|(i, _)| *i == index)
    }

    /// Runs the backend's rings below `count` and stops the others, now if the backend is
    /// there, at the reconnection otherwise. Rings that start running are kicked once: the
    /// driver may have made buffers available before they ran.
    fn use_rings(&mut self, count: u16) {
        let before = std::mem::replace(&mut self.session.active_rings, count);
        if before == count {
            return;
        }
        let mut connection = self.link.connection();
        let Some(c) = connection.as_mut() else {
            return;
        };
        if let Err(e) = c.enable_rings(&self.session) {
            // The socket watch sees the backend go; the next one gets the rings as they are.
            log::warn!(
                "{}: cannot switch the backend's rings: {}",
                self.name,
                nimbus_log::error_chain(&e)
            );
            return;
        }
        drop(connection);
        for ring in &self.session.rings {
            if (before..count).contains(&ring.index) {
                let _ = ring.kick.write(1);
            }
        }
        log::info!("{}: the backend runs rings 0..{count}", self.name);
    }
}

impl QueueHandler for Relay {
    type Error = RelayError;

    fn process(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, RelayError> {
        match &self.local {
            Some((index, local)) if *index == queue.index => {
                let local = local.clone();
                let features = self.session.features;
                Ok(local.process(queue, mem, features, &mut |n| self.use_rings(n))?)
            }
            // A call: interrupt the driver for this queue.
            _ => Ok(true),
        }
    }

    fn extra_fd(&self) -> Option<RawFd> {
        Some(self.poll.as_raw_fd())
    }

    fn on_extra(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &GuestMemoryAtomic,
    ) -> Result<Vec<u16>, RelayError> {
        let mut events = [EpollEvent::default(); 2];
        let n = self
            .poll
            .wait(0, &mut events)
            .map_err(|e| self.link.watch_error(e))?;
        let mut signal = Vec::new();
        for ev in &events[..n] {
            match ev.data() {
                SOCKET => self.disconnected()?,
                _ => signal.extend(self.reconnect(queues, mem)?),
            }
        }
        Ok(signal)
    }
}
