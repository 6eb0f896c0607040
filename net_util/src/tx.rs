//! The transmit path: descriptor chains from a transmit queue to the TAP.

use std::io::{self, IoSlice};

use log::debug;
use virtio_chain::{ChainError, MalformedChain, QueueError};
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use crate::tap::TapQueue;
use crate::virtio::{ETH_HLEN, MAX_PACKET_LEN, VNET_HDR_LEN};

/// What a [`NetTx::process`] call did.
#[derive(Debug, Default)]
pub struct TxOutcome {
    /// Chains put in the used ring (all with length 0), malformed ones included.
    pub completed: usize,
    /// Frames the TAP accepted.
    pub frames: usize,
    /// Bytes of those frames, virtio-net headers excluded.
    pub bytes: u64,
    /// Chains that were not a usable packet (dropped).
    pub malformed: usize,
    /// The first of them, for the device's log.
    pub first_malformed: Option<MalformedChain>,
    /// Packets the TAP refused (dropped): interface down, invalid virtio-net header, ...
    pub tap_errors: usize,
    /// The first TAP error.
    pub first_tap_error: Option<io::Error>,
    /// The driver must be notified (honours `EVENT_IDX`).
    pub needs_notification: bool,
    /// The call stopped at its budget with chains still available, and driver notifications
    /// are still disabled: call again before waiting for a notification.
    pub more_pending: bool,
}

/// The transmit side of one queue pair: a bounce buffer for one packet.
///
/// Each chain of the transmit queue must be device-readable only and hold one packet: the
/// 12-byte `virtio_net_hdr_v1` (passed to the TAP as is; the TAP validates it) followed by an
/// Ethernet frame of at most [`crate::MAX_FRAME_LEN`] bytes. Anything else is dropped.
#[derive(Debug)]
pub struct NetTx {
    buf: Box<[u8]>,
}

impl Default for NetTx {
    fn default() -> Self {
        Self::new()
    }
}

impl NetTx {
    /// A transmit path with its 64 KiB bounce buffer.
    pub fn new() -> Self {
        NetTx {
            buf: vec![0u8; MAX_PACKET_LEN].into_boxed_slice(),
        }
    }

    /// Sends up to `max_chains` (at least one) available packets of `queue` to `tap`, returning
    /// each chain with used length 0, then decides whether the driver needs a notification.
    ///
    /// Driver notifications are disabled while the queue is drained and enabled again before
    /// returning (re-checking the ring so a chain added meanwhile is not missed), unless the
    /// budget ran out ([`TxOutcome::more_pending`]). Malformed chains and packets the TAP
    /// refuses are dropped and counted; processing goes on.
    ///
    /// # Errors
    ///
    /// A [`QueueError`] when the queue itself is broken.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        tap: &dyn TapQueue,
        max_chains: usize,
    ) -> Result<TxOutcome, QueueError> {
        let mut out = TxOutcome::default();
        let drained = virtio_chain::queue::drain(queue, mem, max_chains, |chain| {
            let head = chain.head_index();
            match self.load(chain, mem) {
                Ok(len) => match write_packet(tap, &self.buf[..len]) {
                    Ok(()) => {
                        out.frames += 1;
                        out.bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    Err(e) => {
                        debug!("virtio-net tx: {} refused a packet: {e}", tap.if_name());
                        out.tap_errors += 1;
                        out.first_tap_error.get_or_insert(e);
                    }
                },
                Err(error) => {
                    debug!("virtio-net tx: malformed chain {head}: {error}");
                    out.malformed += 1;
                    out.first_malformed
                        .get_or_insert(MalformedChain { head, error });
                }
            }
            0
        })?;
        out.completed = drained.completed;
        out.needs_notification = drained.needs_notification;
        out.more_pending = drained.more_pending;
        Ok(out)
    }

    /// Copies the packet of `chain` into the bounce buffer; returns its length.
    fn load<M>(
        &mut self,
        mut chain: virtio_queue::DescriptorChain<&M>,
        mem: &M,
    ) -> Result<usize, ChainError>
    where
        M: GuestMemory,
    {
        let parsed = virtio_chain::split(&mut chain)?;
        if !parsed.writable.is_empty() {
            return Err(ChainError::WrongDirection("device-writable"));
        }
        let len = parsed.readable.len();
        let min = (VNET_HDR_LEN + ETH_HLEN) as u64;
        if len < min {
            return Err(ChainError::TooShort {
                what: "packet",
                len,
                min,
            });
        }
        if len > MAX_PACKET_LEN as u64 {
            return Err(ChainError::TooLong {
                len,
                max: MAX_PACKET_LEN as u64,
            });
        }
        // `len <= MAX_PACKET_LEN`, the buffer's length.
        let len = len as usize;
        parsed
            .readable
            .read_into(mem, &mut self.buf[..len])
            .map_err(|_| ChainError::MemoryAccess)?;
        Ok(len)
    }
}

fn write_packet(tap: &dyn TapQueue, packet: &[u8]) -> io::Result<()> {
    let mut attempts = 0;
    loop {
        match tap.write_packet(&[IoSlice::new(packet)]) {
            Ok(n) if n == packet.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {n} of {} bytes", packet.len()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted && attempts < 3 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}
