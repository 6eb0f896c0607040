//! The `--net-backend` option: Cloud Hypervisor's `key=value,...` syntax parsed into one typed
//! [`BackendConfig`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use net_util::{MacAddr, MIN_MTU};
use vhost_user_daemon::options;

/// The `--net-backend` syntax, for help and error messages.
pub const SYNTAX: &str =
    "ip=<ipv4>,mask=<ipv4>,socket=<socket>[,mac=<guest mac>][,host_mac=<tap mac>]\
[,tap=<name>][,num_queues=<2..64, even>][,queue_size=<2..1024, power of two>][,mtu=<68..65535>]\
[,client=on|off]";

/// Each key of the option, with a one-line description (the help text is built from it).
pub const KEYS: &[(&str, &str)] = &[
    ("ip", "IPv4 address given to the TAP interface on the host (required)"),
    ("mask", "netmask of that address (required)"),
    (
        "socket",
        "vhost-user socket: created and listened on, or with client=on connected to (required)",
    ),
    (
        "mac",
        "the guest's MAC address, in the configuration space (default: random, locally administered)",
    ),
    ("host_mac", "MAC address of the TAP interface (default: the kernel's)"),
    (
        "tap",
        "TAP interface to create or attach to (default: a new one the kernel names tapN)",
    ),
    (
        "num_queues",
        "virtqueues, rx and tx per pair; one worker thread and one TAP queue per pair (default 2)",
    ),
    ("queue_size", "largest ring the frontend may set (default 256)"),
    ("mtu", "MTU of the TAP interface, offered to the guest with VIRTIO_NET_F_MTU"),
    (
        "client",
        "on: connect to a socket the VMM listens on instead of listening (default off)",
    ),
];

/// Default `num_queues`: one pair.
pub const DEFAULT_NUM_QUEUES: u16 = 2;
/// Default `queue_size` (Cloud Hypervisor's).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most virtqueues: the backend crate maps queues to worker threads with a 64-bit mask.
pub const MAX_NUM_QUEUES: u16 = 64;
/// Largest ring size.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Errors in a `--net-backend` value.
pub use vhost_user_daemon::options::OptionError as ConfigError;

/// What the daemon serves and how: one TAP interface, one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Host address of the TAP interface.
    pub ip: Ipv4Addr,
    /// Its netmask.
    pub mask: Ipv4Addr,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The guest's MAC address (`None`: a random locally administered one, chosen at start).
    pub mac: Option<MacAddr>,
    /// The TAP interface's own MAC address (`None`: left as the kernel chose).
    pub host_mac: Option<MacAddr>,
    /// TAP interface name (`None`: the kernel chooses).
    pub tap: Option<String>,
    /// Virtqueues (even, 2..=64): `num_queues / 2` rx/tx pairs.
    pub num_queues: u16,
    /// Largest ring size a frontend may set (a power of two in 2..=1024).
    pub queue_size: u16,
    /// MTU of the TAP, offered with `VIRTIO_NET_F_MTU`.
    pub mtu: Option<u16>,
    /// Connect to `socket` (the VMM listens) instead of listening on it.
    pub client: bool,
}

impl BackendConfig {
    /// A configuration with the defaults for everything but the address and the socket.
    pub fn new(ip: Ipv4Addr, mask: Ipv4Addr, socket: impl Into<PathBuf>) -> Self {
        BackendConfig {
            ip,
            mask,
            socket: socket.into(),
            mac: None,
            host_mac: None,
            tap: None,
            num_queues: DEFAULT_NUM_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            mtu: None,
            client: false,
        }
    }

    /// Queue pairs (`num_queues / 2`).
    pub fn num_queue_pairs(&self) -> usize {
        usize::from(self.num_queues / 2)
    }

    /// Parses `ip=...,mask=...,socket=...,...` (see [`SYNTAX`]). Keys are case-sensitive; an
    /// unknown or repeated key is an error.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the offending key or item.
    ///
    /// # Example
    ///
    /// ```
    /// use vhost_user_net::BackendConfig;
    ///
    /// let c = BackendConfig::parse("ip=192.168.10.1,mask=255.255.255.0,socket=/tmp/n.sock,num_queues=4")
    ///     .unwrap();
    /// assert_eq!(c.num_queue_pairs(), 2);
    /// assert_eq!(c.queue_size, 256);
    /// assert!(BackendConfig::parse("ip=1.2.3.4,mask=255.0.0.0").is_err());
    /// ```
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let mut ip = None;
        let mut mask = None;
        let mut socket = None;
        let mut config = BackendConfig::new(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, "");
        for item in options::items(input, KEYS)? {
            let value = item.value.as_str();
            match item.key {
                "ip" => ip = Some(value.parse().map_err(|_| item.invalid("an IPv4 address"))?),
                "mask" => {
                    let m: Ipv4Addr = value.parse().map_err(|_| item.invalid("an IPv4 netmask"))?;
                    let bits = u32::from(m);
                    // Contiguous ones from the top.
                    if bits.leading_ones() + bits.trailing_zeros() != 32 {
                        return Err(item.invalid("an IPv4 netmask"));
                    }
                    mask = Some(m);
                }
                "socket" => {
                    if value.is_empty() {
                        return Err(item.invalid("a path"));
                    }
                    socket = Some(PathBuf::from(value));
                }
                "mac" | "host_mac" => {
                    let mac: MacAddr = value
                        .parse()
                        .map_err(|_| item.invalid("a MAC address like 52:54:00:12:34:56"))?;
                    if mac.is_multicast() {
                        return Err(item.invalid("a unicast MAC address"));
                    }
                    if item.key == "mac" {
                        config.mac = Some(mac);
                    } else {
                        config.host_mac = Some(mac);
                    }
                }
                "tap" => {
                    // IFNAMSIZ - 1 bytes, no '/', whitespace or ':' (net_util checks again).
                    if value.is_empty()
                        || value.len() > 15
                        || value
                            .bytes()
                            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
                    {
                        return Err(item.invalid("an interface name of 1 to 15 bytes"));
                    }
                    config.tap = Some(value.to_string());
                }
                "num_queues" => {
                    config.num_queues = item.number(
                        |n: &u16| n & 1 == 0 && (2..=MAX_NUM_QUEUES).contains(n),
                        "an even number in 2..=64",
                    )?
                }
                "queue_size" => {
                    config.queue_size = item.number(
                        |n: &u16| n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(n),
                        "a power of two in 2..=1024",
                    )?
                }
                "mtu" => {
                    config.mtu = Some(item.number(|n| *n >= MIN_MTU, "a number in 68..=65535")?)
                }
                "client" => config.client = item.toggle()?,
                // `items` only returns keys of KEYS, and each has an arm above.
                _ => return Err(item.invalid("a key this daemon knows")),
            }
        }
        config.ip = ip.ok_or(ConfigError::Missing("ip"))?;
        config.mask = mask.ok_or(ConfigError::Missing("mask"))?;
        config.socket = socket.ok_or(ConfigError::Missing("socket"))?;
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = "ip=10.0.0.1,mask=255.255.255.0,socket=/s";

    #[test]
    fn full_option() {
        let c = BackendConfig::parse(
            "ip=192.168.1.1,mask=255.255.0.0,mac=52:54:00:00:00:01,socket=/run/n.sock,\
             num_queues=4,queue_size=512,tap=vun0,host_mac=52:54:00:00:00:02,mtu=9000,client=on",
        )
        .unwrap();
        assert_eq!(
            c,
            BackendConfig {
                ip: Ipv4Addr::new(192, 168, 1, 1),
                mask: Ipv4Addr::new(255, 255, 0, 0),
                socket: "/run/n.sock".into(),
                mac: Some("52:54:00:00:00:01".parse().unwrap()),
                host_mac: Some("52:54:00:00:00:02".parse().unwrap()),
                tap: Some("vun0".into()),
                num_queues: 4,
                queue_size: 512,
                mtu: Some(9000),
                client: true,
            }
        );
        assert_eq!(c.num_queue_pairs(), 2);
    }

    #[test]
    fn defaults_and_order() {
        let c = BackendConfig::parse("socket=/s,mask=255.255.255.0,ip=10.0.0.1,").unwrap();
        assert_eq!(
            c,
            BackendConfig::new(
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(255, 255, 255, 0),
                "/s"
            )
        );
        assert_eq!(
            (c.num_queues, c.queue_size, c.mtu, c.client),
            (2, 256, None, false)
        );
        assert_eq!((c.mac, c.host_mac, c.tap.as_deref()), (None, None, None));
        let c =
            BackendConfig::parse(&format!("{BASE},num_queues=64,queue_size=2,client=off")).unwrap();
        assert_eq!((c.num_queues, c.queue_size, c.client), (64, 2, false));
        let c = BackendConfig::parse("ip=1.2.3.4,mask=0.0.0.0,socket=s,mtu=68").unwrap();
        assert_eq!(c.mtu, Some(68));
    }

    #[test]
    fn bad_options() {
        use ConfigError::*;
        let err = |s: &str| BackendConfig::parse(s).unwrap_err();
        assert_eq!(err(""), Missing("ip"));
        assert_eq!(err("ip=1.2.3.4"), Missing("mask"));
        assert_eq!(err("ip=1.2.3.4,mask=255.0.0.0"), Missing("socket"));
        assert!(
            matches!(err(&format!("{BASE},bogus=1")), UnknownKey { key, .. } if key == "bogus")
        );
        assert_eq!(err(&format!("{BASE},client")), NotKeyValue("client".into()));
        assert_eq!(
            err(&format!("{BASE},ip=1.1.1.1")),
            DuplicateKey("ip".into())
        );
        for bad in [
            "ip=1.2.3,mask=255.0.0.0,socket=s",
            "ip=::1,mask=255.0.0.0,socket=s",
            "ip=1.2.3.4,mask=255.0.255.0,socket=s",
            "ip=1.2.3.4,mask=x,socket=s",
            "ip=1.2.3.4,mask=255.0.0.0,socket=",
        ] {
            assert!(
                matches!(BackendConfig::parse(bad), Err(InvalidValue { .. })),
                "{bad}"
            );
        }
        for bad in [
            "mac=52:54:00:00:00",
            "mac=01:00:5e:00:00:01",
            "host_mac=zz:54:00:00:00:01",
            "tap=",
            "tap=a/b",
            "tap=0123456789abcdef",
            "num_queues=0",
            "num_queues=3",
            "num_queues=66",
            "num_queues=two",
            "queue_size=100",
            "queue_size=1",
            "queue_size=2048",
            "mtu=67",
            "mtu=65536",
            "client=yes",
        ] {
            let input = format!("{BASE},{bad}");
            assert!(
                matches!(BackendConfig::parse(&input), Err(InvalidValue { .. })),
                "{bad}"
            );
        }
        let msg = err(&format!("{BASE},num_queues=3")).to_string();
        assert_eq!(msg, "num_queues=3: expected an even number in 2..=64");
        assert!(err(&format!("{BASE},x=1"))
            .to_string()
            .starts_with("unknown key 'x' (known: ip, mask, socket, mac,"));
    }

    #[test]
    fn every_key_is_parsed_and_in_the_syntax() {
        for (key, _) in KEYS {
            let value = match *key {
                "ip" => "10.0.0.2",
                "mask" => "255.255.255.0",
                "socket" => "/x",
                "mac" | "host_mac" => "52:54:00:aa:bb:cc",
                "tap" => "t0",
                "num_queues" | "queue_size" => "2",
                "mtu" => "1500",
                "client" => "on",
                _ => panic!("no sample value for {key}"),
            };
            let input = match *key {
                "ip" | "mask" | "socket" => BASE.replace(
                    &format!(
                        "{key}={}",
                        BASE.split(',')
                            .find(|i| i.starts_with(&format!("{key}=")))
                            .unwrap()
                            .split_once('=')
                            .unwrap()
                            .1
                    ),
                    &format!("{key}={value}"),
                ),
                _ => format!("{BASE},{key}={value}"),
            };
            BackendConfig::parse(&input).unwrap();
            assert!(
                SYNTAX.contains(&format!("{key}=")),
                "{key} missing from SYNTAX"
            );
        }
    }
}
