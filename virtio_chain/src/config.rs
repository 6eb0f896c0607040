//! Reading a device's configuration space.

/// Copies `config[offset..offset + data.len()]` into `data`; bytes of `data` that fall outside
/// `config` (or past `u64`) read as 0. Never panics, whatever the driver's offset and length.
///
/// # Example
///
/// ```
/// let mut data = [0xff; 4];
/// virtio_chain::read_config(&[1, 2, 3], 1, &mut data);
/// assert_eq!(data, [2, 3, 0, 0]);
/// ```
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(available) = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
    else {
        return;
    };
    let n = available.len().min(data.len());
    data[..n].copy_from_slice(&available[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_past_the_end_read_as_zero() {
        let config = [1, 2, 3];
        let mut d = [0xffu8; 4];
        read_config(&config, 1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        let mut d = [0xffu8; 2];
        read_config(&config, 0, &mut d);
        assert_eq!(d, [1, 2]);
        let mut d = [0xffu8; 4];
        read_config(&config, 3, &mut d);
        assert_eq!(d, [0; 4]);
        let mut d = [0xffu8; 4];
        read_config(&config, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
        read_config(&config, 1, &mut []);
    }
}
