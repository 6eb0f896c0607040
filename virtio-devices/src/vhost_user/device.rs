//! The device half every vhost-user frontend shares: the link to the backend (kept across
//! guest reboots and backend restarts), what was learnt from the backend, and the relay thread
//! while the driver runs.

use std::sync::Arc;

use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use virtio_chain::QueueError;
use vmm_sys_util::eventfd::EventFd;

use super::relay::{Link, Relay};
use super::{Backend, Connection, Ring, Session, VhostUserError};
use crate::pause::PauseError;
use crate::worker::Worker;
use crate::{ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice};

/// A queue the frontend serves itself instead of handing it to the backend: virtio-net's
/// control queue, which vhost-user backends leave to the frontend.
pub(super) trait LocalQueue: std::fmt::Debug + Send + Sync {
    /// The queue's index once the driver accepted `features`; `None` when it has none.
    fn index(&self, features: u64) -> Option<u16>;

    /// How many of the backend's rings, from ring 0, run when the driver starts.
    fn initial_rings(&self) -> u16;

    /// Serves the queue after a kick from the driver; `use_rings(n)` runs the backend's rings
    /// below `n` and stops the others. Returns whether to interrupt the driver.
    ///
    /// # Errors
    ///
    /// A [`QueueError`] when the queue is broken (the device then needs a reset).
    fn process(
        &self,
        queue: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
        features: u64,
        use_rings: &mut dyn FnMut(u16),
    ) -> Result<bool, QueueError>;
}

#[derive(Debug)]
struct Shared {
    link: Arc<Link>,
    device_type: u32,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    features: u64,
    local: Option<Arc<dyn LocalQueue>>,
}

impl Shared {
    /// Queues the backend serves: all but the local one.
    fn backend_queues(&self) -> usize {
        self.queue_sizes.len() - usize::from(self.local.is_some())
    }
}

/// A virtio device whose data path runs in a vhost-user backend.
#[derive(Debug)]
pub struct VhostUserDevice {
    shared: Arc<Shared>,
    name: String,
    relay: Option<Worker>,
    /// The guest memory the driver's session uses, while it runs.
    mem: Option<GuestMemoryAtomic>,
}

impl VhostUserDevice {
    /// A device of `device_type` on `connection` to `backend`, offering the connection's
    /// features, with `config` as its configuration space and one queue per entry of
    /// `queue_sizes`; the last of them is `local` when there is one.
    pub(super) fn new(
        backend: Backend,
        connection: Connection,
        device_type: u32,
        config: Vec<u8>,
        queue_sizes: Vec<u16>,
        name: String,
        local: Option<Arc<dyn LocalQueue>>,
    ) -> Self {
        let shared = Shared {
            features: connection.features,
            link: Arc::new(Link {
                backend,
                connection: std::sync::Mutex::new(Some(connection)),
            }),
            device_type,
            config,
            queue_sizes,
            local,
        };
        Self {
            shared: Arc::new(shared),
            name,
            relay: None,
            mem: None,
        }
    }

    /// A device for a new VM instance on the same backend link.
    pub fn fresh(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            name: self.name.clone(),
            relay: None,
            mem: None,
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.shared.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.shared.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio_chain::read_config(&self.shared.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.is_empty() {
            return Err(ActivateError::InvalidSetup("no queue enabled".into()));
        }
        let local = self
            .shared
            .local
            .as_ref()
            .and_then(|l| Some((l.index(a.features)?, l.clone())));
        let mut rings = Vec::with_capacity(a.queues.len());
        let mut calls = Vec::with_capacity(a.queues.len());
        let mut bases = Vec::with_capacity(a.queues.len());
        for q in a.queues {
            use virtio_queue::QueueT;
            if local.as_ref().is_some_and(|(index, _)| *index == q.index) {
                // Served by the relay itself, on the transport's ioeventfd.
                calls.push(q);
                continue;
            }
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Resource)?;
            let ring = &q.queue;
            rings.push(Ring {
                index: q.index,
                size: ring.size(),
                max_size: ring.max_size(),
                desc: ring.desc_table(),
                avail: ring.avail_ring(),
                used: ring.used_ring(),
                kick: q.kick,
                call: call.try_clone().map_err(ActivateError::Resource)?,
            });
            bases.push(ring.next_avail());
            // The relay waits on the call eventfd in the queue's place.
            calls.push(ActiveQueue {
                index: q.index,
                queue: q.queue,
                kick: call,
            });
        }
        let sizes = &self.shared.queue_sizes[..self.shared.backend_queues()];
        let mut session = Session {
            mem: a.mem.clone(),
            features: a.features,
            rings,
            active_rings: local.as_ref().map_or(u16::MAX, |(_, l)| l.initial_rings()),
            inflight_shape: (sizes.len() as u16, sizes.iter().copied().max().unwrap_or(0)),
            inflight: None,
        };
        let link = &self.shared.link;
        let mut connection = link.connection();
        if connection.is_none() {
            *connection = link.backend.connect(false).ok();
        }
        let started = match connection.as_mut() {
            Some(c) => match c.start(&mut session, &bases) {
                Ok(()) => true,
                Err(VhostUserError::Setup(m)) => return Err(ActivateError::InvalidSetup(m)),
                Err(e) => {
                    log::warn!(
                        "{}: the vhost-user backend at {} failed the device's setup: {}; reconnecting",
                        self.name,
                        link.backend.endpoint.path().display(),
                        nimbus_log::error_chain(&e)
                    );
                    *connection = None;
                    false
                }
            },
            None => {
                log::warn!(
                    "{}: the vhost-user backend at {} is away; the device waits for it",
                    self.name,
                    link.backend.endpoint.path().display()
                );
                false
            }
        };
        drop(connection);
        let relay = Relay::new(
            link.clone(),
            session,
            local,
            self.name.clone(),
            started,
            u32::from(!started),
        )
        .map_err(ActivateError::Resource)?;
        let relay = Worker::spawn(
            nimbus_thread::ThreadClass::VhostUserRelay,
            self.name.clone(),
            relay,
            calls,
            a.mem.clone(),
            a.interrupt,
        )
        .map_err(ActivateError::Resource)?;
        self.relay = Some(relay);
        self.mem = Some(a.mem);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        // The relay stops forwarding the backend's completions (they wait in the call
        // eventfds); the backend has no new kick to take while the vCPUs are paused.
        self.relay.as_ref().map_or(Ok(()), Worker::pause)
    }

    fn resume(&mut self) {
        if let Some(relay) = &self.relay {
            relay.resume();
        }
    }

    fn memory_changed(&mut self) {
        let Some(mem) = &self.mem else {
            return;
        };
        // A backend that is away gets the whole memory when it is back (the session holds
        // the same guest memory).
        let link = &self.shared.link;
        if let Some(c) = link.connection().as_mut() {
            match c.update_mem_table(mem) {
                Ok(()) => log::info!(
                    "{}: the vhost-user backend has the new memory table ({} regions)",
                    self.name,
                    mem.memory().num_regions()
                ),
                Err(e) => log::warn!(
                    "{}: the vhost-user backend at {} did not take the new memory table: {}",
                    self.name,
                    link.backend.endpoint.path().display(),
                    nimbus_log::error_chain(&e)
                ),
            }
        }
    }

    fn reset(&mut self) {
        self.mem = None;
        if let Some(relay) = self.relay.take() {
            // The relay (and the session it holds) goes first: it may be reconnecting.
            drop(relay);
            let queues = self.shared.backend_queues();
            let mut connection = self.shared.link.connection();
            if let Some(c) = connection.as_mut() {
                if !c.stop(queues) {
                    *connection = None;
                }
            }
        }
    }
}
