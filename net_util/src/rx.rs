//! The receive path: packets from the TAP into the driver's receive buffers.

use std::io::{self, IoSliceMut};

use log::debug;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_chain::queue;
use virtio_chain::{ChainError, MalformedChain, QueueError, SgList, Split};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::tap::TapQueue;
use crate::virtio::{
    has_feature, ETH_HLEN, MAX_PACKET_LEN, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS_OFFSET,
};

/// Why a [`NetRx::process`] call stopped.
#[derive(Debug, Default)]
pub enum RxStop {
    /// The TAP has no more packets: wait for it to become readable.
    #[default]
    TapEmpty,
    /// A packet is waiting but the receive queue has no (or not enough) buffers. Driver
    /// notifications are enabled: stop polling the TAP until the driver notifies the queue,
    /// then call again (the packet is kept).
    NeedBuffers,
    /// The budget ran out; the TAP may still be readable.
    Budget,
    /// Reading the TAP failed (or it reported end of file): stop polling it.
    TapFailed(io::Error),
}

/// What a [`NetRx::process`] call did.
#[derive(Debug, Default)]
pub struct RxOutcome {
    /// Packets delivered to the driver.
    pub frames: usize,
    /// Bytes of those frames, virtio-net headers excluded.
    pub bytes: u64,
    /// Packets dropped: too big for a receive buffer (without `MRG_RXBUF`) or for the whole
    /// queue, or shorter than a virtio-net and an Ethernet header.
    pub dropped: usize,
    /// Receive chains that were unusable; they went to the used ring with length 0.
    pub malformed: usize,
    /// The first of them, for the device's log.
    pub first_malformed: Option<MalformedChain>,
    /// Chains put in the used ring.
    pub used: usize,
    /// The driver must be notified (honours `EVENT_IDX`).
    pub needs_notification: bool,
    /// Why the call returned.
    pub stop: RxStop,
}

/// A receive chain taken from the queue and not yet used.
#[derive(Debug)]
struct HeldChain {
    head: u16,
    buffers: SgList,
}

enum Placement {
    Done,
    TooBig,
    NoBuffers,
}

/// The receive side of one queue pair.
///
/// Packets are read from the TAP into a bounce buffer (header included) and copied into the
/// driver's device-writable buffers. With `MRG_RXBUF` a packet may span several chains and
/// `num_buffers` says how many; without it each chain must hold a whole packet, or the packet
/// is dropped. A packet read while the queue has no room stays here until buffers arrive,
/// and so do chains taken for a packet that did not fit yet; a device reset discards both.
#[derive(Debug)]
pub struct NetRx {
    buf: Box<[u8]>,
    pending: usize,
    held: Vec<HeldChain>,
    mrg_rxbuf: bool,
    guest_csum: bool,
}

impl NetRx {
    /// A receive path for a driver that accepted `negotiated` features (`MRG_RXBUF`,
    /// `GUEST_CSUM` matter).
    pub fn new(negotiated: u64) -> Self {
        NetRx {
            buf: vec![0u8; MAX_PACKET_LEN].into_boxed_slice(),
            pending: 0,
            held: Vec::new(),
            mrg_rxbuf: has_feature(negotiated, VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: has_feature(negotiated, VIRTIO_NET_F_GUEST_CSUM),
        }
    }

    /// Whether a packet read from the TAP waits for receive buffers.
    pub fn has_pending_packet(&self) -> bool {
        self.pending != 0
    }

    /// Moves up to `max_frames` (at least one) packets from `tap` into `queue`, then decides
    /// whether the driver needs a notification. See [`RxStop`] for what to do next.
    ///
    /// Driver notifications are disabled while the device has work and enabled only when it
    /// runs out of buffers, re-checking the ring so buffers added meanwhile are not missed.
    ///
    /// # Errors
    ///
    /// A [`QueueError`] when the queue itself is broken.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        tap: &dyn TapQueue,
        max_frames: usize,
    ) -> Result<RxOutcome, QueueError> {
        let mut out = RxOutcome::default();
        let budget = max_frames.max(1);
        queue::disable_notification(queue, mem)?;
        loop {
            if out.frames + out.dropped >= budget {
                out.stop = RxStop::Budget;
                break;
            }
            if self.pending == 0 {
                match tap.read_packet(&mut [IoSliceMut::new(&mut self.buf)]) {
                    Ok(0) => {
                        out.stop = RxStop::TapFailed(io::ErrorKind::UnexpectedEof.into());
                        break;
                    }
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        debug!("virtio-net rx: {} gave a {n}-byte packet", tap.if_name());
                        out.dropped += 1;
                        continue;
                    }
                    Ok(n) => self.pending = n.min(self.buf.len()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        out.stop = RxStop::TapEmpty;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        out.stop = RxStop::TapFailed(e);
                        break;
                    }
                }
            }
            match self.place(queue, mem, &mut out)? {
                Placement::Done => {
                    out.frames += 1;
                    out.bytes += (self.pending - VNET_HDR_LEN) as u64;
                    self.pending = 0;
                }
                Placement::TooBig => {
                    debug!(
                        "virtio-net rx: {}-byte packet from {} does not fit the receive buffers",
                        self.pending,
                        tap.if_name()
                    );
                    out.dropped += 1;
                    self.pending = 0;
                }
                Placement::NoBuffers => {
                    if queue::enable_notification(queue, mem)? {
                        // Buffers arrived meanwhile.
                        queue::disable_notification(queue, mem)?;
                        continue;
                    }
                    out.stop = RxStop::NeedBuffers;
                    break;
                }
            }
        }
        if out.used > 0 {
            out.needs_notification = queue::needs_notification(queue, mem)?;
        }
        Ok(out)
    }

    /// Puts the pending packet into held chains, taking more from the queue as needed.
    fn place<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        out: &mut RxOutcome,
    ) -> Result<Placement, QueueError> {
        let len = self.pending;
        loop {
            let room: u64 = self.held.iter().map(|c| c.buffers.len()).sum();
            if room >= len as u64 {
                break;
            }
            if !self.held.is_empty()
                && (!self.mrg_rxbuf || self.held.len() >= usize::from(queue.size()))
            {
                return Ok(Placement::TooBig);
            }
            let Some(mut chain) = queue::pop(queue, mem)? else {
                return Ok(Placement::NoBuffers);
            };
            let head = chain.head_index();
            let first = self.held.is_empty();
            match virtio_chain::split(&mut chain).and_then(|p| receive_buffers(p, first)) {
                Ok(buffers) => self.held.push(HeldChain { head, buffers }),
                Err(error) => {
                    debug!("virtio-net rx: malformed chain {head}: {error}");
                    queue::add_used(queue, mem, head, 0)?;
                    out.used += 1;
                    out.malformed += 1;
                    out.first_malformed
                        .get_or_insert(MalformedChain { head, error });
                }
            }
        }
        // The fewest held chains that hold the packet; any others wait for the next one.
        let mut chains = 0usize;
        let mut room = 0u64;
        for c in &self.held {
            chains += 1;
            room += c.buffers.len();
            if room >= len as u64 {
                break;
            }
        }
        // At most the queue size (<= 32768) chains are held.
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        if !self.guest_csum {
            // The TAP may flag checksums as valid; without GUEST_CSUM flags must be 0.
            self.buf[..VNET_HDR_NUM_BUFFERS_OFFSET].fill(0);
        }
        self.buf[VNET_HDR_NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0usize;
        for c in self.held.drain(..chains) {
            let n = usize::try_from(c.buffers.len())
                .unwrap_or(usize::MAX)
                .min(len - offset);
            let written = c.buffers.write_from(mem, &self.buf[offset..offset + n]);
            // `written <= n <= MAX_PACKET_LEN`.
            queue::add_used(queue, mem, c.head, written as u32)?;
            out.used += 1;
            offset += n;
        }
        Ok(Placement::Done)
    }
}

/// The device-writable buffers of a receive chain; the first chain of a packet must hold the
/// whole virtio-net header.
fn receive_buffers(chain: Split, first: bool) -> Result<SgList, ChainError> {
    if !chain.readable.is_empty() {
        return Err(ChainError::WrongDirection("device-readable"));
    }
    let min = if first { VNET_HDR_LEN as u64 } else { 1 };
    if chain.writable.len() < min {
        return Err(ChainError::TooShort {
            what: "receive buffer",
            len: chain.writable.len(),
            min,
        });
    }
    Ok(chain.writable)
}
