//! Ethernet MAC addresses: parsing, printing and random locally administered addresses.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Length of a MAC address in bytes.
pub const MAC_ADDR_LEN: usize = 6;

/// A 48-bit Ethernet MAC address.
///
/// # Example
///
/// ```
/// use net_util::MacAddr;
///
/// let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
/// assert_eq!(mac.bytes(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// assert_eq!(mac.to_string(), "52:54:00:12:34:56");
/// assert!("52:54:00:12:34".parse::<MacAddr>().is_err());
///
/// let random = MacAddr::random_local();
/// assert!(random.is_local() && !random.is_multicast());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; MAC_ADDR_LEN]);

/// Why a string is not a MAC address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {input:?}: {reason}, expected six hex bytes like 52:54:00:12:34:56")]
pub struct ParseMacError {
    /// The string that was parsed.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl MacAddr {
    /// The address made of `bytes`, first byte first (as written and sent on the wire).
    pub const fn from_bytes(bytes: [u8; MAC_ADDR_LEN]) -> Self {
        MacAddr(bytes)
    }

    /// The six bytes, first byte first.
    pub const fn bytes(&self) -> [u8; MAC_ADDR_LEN] {
        self.0
    }

    /// Whether this is a group (multicast or broadcast) address: bit 0 of the first byte.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether this address is locally administered: bit 1 of the first byte.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// A random locally administered unicast address.
    ///
    /// The randomness comes from the standard library's per-process random hash keys mixed
    /// with the clock: unpredictable enough to avoid collisions between VMs, not meant for
    /// cryptography.
    pub fn random_local() -> Self {
        let mut hasher = RandomState::new().build_hasher();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        let random = hasher.finish().to_le_bytes();
        let mut bytes = [0u8; MAC_ADDR_LEN];
        bytes.copy_from_slice(&random[..MAC_ADDR_LEN]);
        // Locally administered, unicast.
        bytes[0] = (bytes[0] | 0x02) & !0x01;
        MacAddr(bytes)
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    /// Parses six groups of one or two hex digits separated by `:` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParseMacError {
            input: s.to_string(),
            reason,
        };
        let mut bytes = [0u8; MAC_ADDR_LEN];
        let mut groups = s.split(':');
        for byte in bytes.iter_mut() {
            let group = groups.next().ok_or_else(|| error("fewer than six bytes"))?;
            if group.is_empty() || group.len() > 2 || !group.bytes().all(|c| c.is_ascii_hexdigit())
            {
                return Err(error("each byte must be one or two hex digits"));
            }
            *byte = u8::from_str_radix(group, 16)
                .map_err(|_| error("each byte must be one or two hex digits"))?;
        }
        if groups.next().is_some() {
            return Err(error("more than six bytes"));
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl From<[u8; MAC_ADDR_LEN]> for MacAddr {
    fn from(bytes: [u8; MAC_ADDR_LEN]) -> Self {
        MacAddr(bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.bytes(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(
            "2:4:0:1:2:3".parse::<MacAddr>().unwrap().to_string(),
            "02:04:00:01:02:03"
        );
        assert!(!mac.is_multicast());
        assert!(mac.is_local());
        assert!(MacAddr::from_bytes([0xff; 6]).is_multicast());
    }

    #[test]
    fn parse_errors_name_the_input() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:",
            "52:54:00:123:34:56",
            "52-54-00-12-34-56",
            "+5:54:00:12:34:56",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let a = MacAddr::random_local();
        let b = MacAddr::random_local();
        for m in [a, b] {
            assert!(m.is_local());
            assert!(!m.is_multicast());
        }
        assert_ne!(a, b);
    }
}
