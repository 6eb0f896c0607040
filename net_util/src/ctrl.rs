//! The control queue (virtio 1.2, 5.1.6.5): `class`, `command`, command data (device-readable)
//! and a one-byte `ack` (device-writable).

use log::debug;
use virtio_chain::{ChainError, MalformedChain, QueueError, SgList};
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use crate::virtio::{CTRL_ACK_ERR, CTRL_ACK_OK, CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET};

/// A control command, as the device handler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: the driver will use this many queue pairs. The value
    /// is as the driver wrote it; the handler checks its range.
    MqVqPairsSet(u16),
    /// A well-formed command of a class or with data Nimbus does not implement.
    Unsupported {
        /// Command class.
        class: u8,
        /// Command within the class.
        command: u8,
    },
}

/// What a [`process_ctrl`] call did.
#[derive(Debug, Default)]
pub struct CtrlOutcome {
    /// Chains put in the used ring, malformed ones included.
    pub completed: usize,
    /// Chains that were not a command (no header or no room for the ack; used length 0).
    pub malformed: usize,
    /// The first of them.
    pub first_malformed: Option<MalformedChain>,
    /// The driver must be notified (honours `EVENT_IDX`).
    pub needs_notification: bool,
    /// The call stopped at its budget with chains still available, and driver notifications
    /// are still disabled: call again before waiting for a notification.
    pub more_pending: bool,
}

/// Answers up to `max_chains` (at least one) commands of the control `queue`: each is parsed,
/// given to `handler` (true means success) and acknowledged with `VIRTIO_NET_OK` or
/// `VIRTIO_NET_ERR` (used length 1). Notification handling as for
/// [`crate::NetTx::process`].
///
/// # Errors
///
/// A [`QueueError`] when the queue itself is broken.
pub fn process_ctrl<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    max_chains: usize,
    handler: &mut dyn FnMut(CtrlCommand) -> bool,
) -> Result<CtrlOutcome, QueueError> {
    let mut out = CtrlOutcome::default();
    let drained = virtio_chain::queue::drain(queue, mem, max_chains, |chain| {
        let head = chain.head_index();
        match parse_command(chain, mem) {
            Ok((command, ack)) => {
                let status = if handler(command) {
                    CTRL_ACK_OK
                } else {
                    CTRL_ACK_ERR
                };
                u32::from(ack.write_from(mem, &[status]) == 1)
            }
            Err(error) => {
                debug!("virtio-net ctrl: malformed chain {head}: {error}");
                out.malformed += 1;
                out.first_malformed
                    .get_or_insert(MalformedChain { head, error });
                0
            }
        }
    })?;
    out.completed = drained.completed;
    out.needs_notification = drained.needs_notification;
    out.more_pending = drained.more_pending;
    Ok(out)
}

fn parse_command<M: GuestMemory>(
    mut chain: virtio_queue::DescriptorChain<&M>,
    mem: &M,
) -> Result<(CtrlCommand, SgList), ChainError> {
    let parsed = virtio_chain::split(&mut chain)?;
    if parsed.writable.is_empty() {
        return Err(ChainError::TooShort {
            what: "ack buffer",
            len: 0,
            min: 1,
        });
    }
    if parsed.readable.len() < 2 {
        return Err(ChainError::TooShort {
            what: "command header",
            len: parsed.readable.len(),
            min: 2,
        });
    }
    // Class, command and the first two bytes of data: all any supported command reads.
    let mut head = [0u8; 4];
    let n = parsed.readable.len().min(4) as usize;
    parsed
        .readable
        .read_into(mem, &mut head[..n])
        .map_err(|_| ChainError::MemoryAccess)?;
    let (class, command) = (head[0], head[1]);
    let cmd = if class == CTRL_CLASS_MQ && command == CTRL_MQ_VQ_PAIRS_SET && n == 4 {
        CtrlCommand::MqVqPairsSet(u16::from_le_bytes([head[2], head[3]]))
    } else {
        CtrlCommand::Unsupported { class, command }
    };
    Ok((cmd, parsed.writable))
}
