//! Answering `GET_CONFIG` from a device's configuration space.

use vhost::vhost_user::message::{VHOST_USER_CONFIG_OFFSET, VHOST_USER_CONFIG_SIZE};

/// The bytes to answer `GET_CONFIG(offset, size)` with: `size` bytes of the configuration space
/// from `offset`, as `read(offset, buf)` fills them (zeros past the space's end). QEMU (and
/// Nimbus) ask from offset 0; Cloud Hypervisor's frontend asks from `VHOST_USER_CONFIG_OFFSET`
/// (0x100, where the device configuration starts in a legacy virtio-pci BAR). Device
/// configuration spaces are far smaller than 0x100 bytes, so an offset of 0x100 or more can
/// only mean the latter and is taken relative to 0x100. A `size` above
/// `VHOST_USER_CONFIG_SIZE` gets no bytes, which the backend crate sends as an error reply.
pub fn config_reply(offset: u32, size: u32, read: impl FnOnce(u64, &mut [u8])) -> Vec<u8> {
    if size > VHOST_USER_CONFIG_SIZE {
        return Vec::new();
    }
    let offset = if offset >= VHOST_USER_CONFIG_OFFSET {
        offset - VHOST_USER_CONFIG_OFFSET
    } else {
        offset
    };
    let mut data = vec![0u8; size as usize];
    read(u64::from(offset), &mut data);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_from(space: &[u8]) -> impl FnOnce(u64, &mut [u8]) + '_ {
        move |offset, buf| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = space.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
    }

    #[test]
    fn both_offset_conventions_and_limits() {
        let space: Vec<u8> = (1..=24).collect();
        assert_eq!(config_reply(8, 2, read_from(&space)), vec![9, 10]);
        assert_eq!(config_reply(0x108, 2, read_from(&space)), vec![9, 10]);
        assert_eq!(config_reply(22, 4, read_from(&space)), vec![23, 24, 0, 0]);
        assert!(config_reply(0, VHOST_USER_CONFIG_SIZE + 1, read_from(&space)).is_empty());
    }
}
