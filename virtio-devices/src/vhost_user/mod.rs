//! vhost-user frontends: the device model stays in Nimbus (PCI, feature negotiation, config
//! space), the data path runs in a backend process. Guest RAM is shared with the backend through
//! its memfds; the queues' kick eventfds (the transport's ioeventfds) go to the backend, so a
//! guest notification reaches it without the VMM. Used-buffer notifications come back on call
//! eventfds that a relay thread turns into MSI-X interrupts (keeping per-vector masking right).

pub mod blk;
mod device;
pub mod fs;
pub mod net;

pub use device::VhostUserDevice;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::worker::{QueueHandler, Worker};
use crate::{ActivateError, Activation, ActiveQueue, GuestMemoryAtomic};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a virtio-feature bit that only frontend and backend see.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Connecting to the socket failed.
    #[error("cannot connect to vhost-user backend at {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// A protocol step failed.
    #[error("vhost-user {step} failed")]
    Protocol {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something the device needs.
    #[error("the vhost-user backend {0}")]
    Unsupported(String),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Protocol { step, source }
}

/// A connected backend after feature discovery.
pub struct Connection {
    frontend: Frontend,
    /// virtio features the backend offers (without the vhost-user protocol bit).
    pub features: u64,
    /// Whether the backend speaks protocol features (then rings start disabled).
    has_protocol_features: bool,
    /// Protocol features both sides use.
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend supports.
    pub max_queues: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("max_queues", &self.max_queues)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `path`, claims ownership and negotiates protocol features from `wanted`.
    pub fn connect(
        path: &str,
        max_queues: u64,
        wanted: VhostUserProtocolFeatures,
    ) -> Result<Self, VhostUserError> {
        let mut frontend =
            Frontend::connect(path, max_queues).map_err(|source| VhostUserError::Connect {
                path: path.to_string(),
                source,
            })?;
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let has_protocol_features = features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut queues = 1;
        if has_protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted;
            frontend
                .set_protocol_features(protocol)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                queues = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            }
        }
        Ok(Self {
            frontend,
            features: features & !VHOST_USER_F_PROTOCOL_FEATURES,
            has_protocol_features,
            protocol,
            max_queues: queues.min(max_queues),
        })
    }

    /// Reads `len` bytes of the backend's device configuration space.
    pub fn config(&mut self, len: u32) -> Result<Vec<u8>, VhostUserError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Unsupported(
                "does not serve its configuration space (CONFIG)".into(),
            ));
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(
                0,
                len,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .map_err(step("GET_CONFIG"))?;
        Ok(payload.to_vec())
    }

    /// Hands the driver's setup to the backend and starts the relay of its interrupts.
    pub fn start(&mut self, a: Activation, name: &str) -> Result<Worker, ActivateError> {
        let resource = |e: VhostUserError| ActivateError::Resource(std::io::Error::other(e));
        let acked = a.features
            | if self.has_protocol_features {
                VHOST_USER_F_PROTOCOL_FEATURES
            } else {
                0
            };
        self.frontend
            .set_features(acked)
            .map_err(step("SET_FEATURES"))
            .map_err(resource)?;
        let mem = a.mem.memory();
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                ActivateError::InvalidSetup(format!(
                    "guest memory cannot be shared ({e}); use --memory shared=on"
                ))
            })?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))
            .map_err(resource)?;
        let hva = |gpa: u64| -> Result<u64, ActivateError> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| {
                    ActivateError::InvalidSetup(format!("ring at {gpa:#x} is not in guest memory"))
                })
        };
        let mut relays = Vec::with_capacity(a.queues.len());
        for q in a.queues {
            let i = usize::from(q.index);
            let ring = &q.queue;
            let config = VringConfigData {
                queue_max_size: ring.max_size(),
                queue_size: ring.size(),
                flags: 0,
                desc_table_addr: hva(ring.desc_table())?,
                used_ring_addr: hva(ring.used_ring())?,
                avail_ring_addr: hva(ring.avail_ring())?,
                log_addr: None,
            };
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Resource)?;
            let f = &mut self.frontend;
            f.set_vring_num(i, ring.size())
                .map_err(step("SET_VRING_NUM"))
                .map_err(resource)?;
            f.set_vring_addr(i, &config)
                .map_err(step("SET_VRING_ADDR"))
                .map_err(resource)?;
            f.set_vring_base(i, ring.next_avail())
                .map_err(step("SET_VRING_BASE"))
                .map_err(resource)?;
            f.set_vring_call(i, &call)
                .map_err(step("SET_VRING_CALL"))
                .map_err(resource)?;
            f.set_vring_kick(i, &q.kick)
                .map_err(step("SET_VRING_KICK"))
                .map_err(resource)?;
            if self.has_protocol_features {
                f.set_vring_enable(i, true)
                    .map_err(step("SET_VRING_ENABLE"))
                    .map_err(resource)?;
            }
            // The relay waits on the call eventfd in the queue's place.
            relays.push(ActiveQueue {
                index: q.index,
                queue: q.queue,
                kick: call,
            });
        }
        drop(mem);
        let activation = Activation {
            mem: a.mem,
            features: a.features,
            interrupt: a.interrupt,
            queues: relays,
        };
        Worker::start(name, Box::new(CallRelay), activation)
    }

    /// Stops the backend's rings (GET_VRING_BASE) so it no longer touches guest memory.
    pub fn stop(&mut self, queues: usize) {
        for i in 0..queues {
            if self.has_protocol_features {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                log::warn!("vhost-user: stopping ring {i}: {e}");
            }
        }
    }
}

/// Each "kick" the relay sees is a backend's call eventfd: interrupt the driver for that queue.
struct CallRelay;

impl QueueHandler for CallRelay {
    fn process(
        &mut self,
        _queue: &mut ActiveQueue,
        _mem: &GuestMemoryAtomic,
    ) -> Result<bool, String> {
        Ok(true)
    }
}
