//! The `--block-backend` option: Cloud Hypervisor's `key=value,...` syntax parsed into one typed
//! [`BackendConfig`].

use std::path::PathBuf;

use vhost_user_daemon::options;

/// The `--block-backend` syntax, for help and error messages.
pub const SYNTAX: &str =
    "path=<image>,socket=<socket>[,num_queues=<1..64>][,queue_size=<2..1024, power of two>]\
[,readonly=true|false][,direct=true|false][,serial=<at most 20 bytes>][,poll_queue=true|false][,poll_us=<0..1000>]\
[,image_type=raw|unknown]";

/// Each key of the option, with a one-line description (the help text is built from it).
pub const KEYS: &[(&str, &str)] = &[
    ("path", "disk image or block device (required)"),
    (
        "socket",
        "vhost-user socket to create and listen on (required)",
    ),
    (
        "num_queues",
        "request queues, one worker thread each (default 1)",
    ),
    (
        "queue_size",
        "largest ring the frontend may set, also sets seg_max (default 128)",
    ),
    (
        "readonly",
        "open the image read-only and offer VIRTIO_BLK_F_RO (default false)",
    ),
    (
        "direct",
        "open the image with O_DIRECT, bypassing the host page cache (default false)",
    ),
    ("serial", "the GET_ID answer (default: empty, 20 NUL bytes)"),
    (
        "poll_queue",
        "poll queues after serving them, as Cloud Hypervisor's key (default true)",
    ),
    (
        "poll_us",
        "microseconds a worker keeps polling its queue after serving it, 0: never (default 32)",
    ),
    (
        "image_type",
        "unknown: refuse qcow2, vhdx, vmdk and vhd headers; raw: skip the check (default unknown)",
    ),
];

/// Default `num_queues`.
pub const DEFAULT_NUM_QUEUES: u16 = 1;
/// Default `queue_size`: Nimbus's in-process disk default and QEMU's `vhost-user-blk` default, so
/// the `seg_max` the daemon advertises fits the ring a frontend uses by default.
pub const DEFAULT_QUEUE_SIZE: u16 = 128;
/// Most request queues: the backend crate maps queues to worker threads with a 64-bit mask.
pub const MAX_NUM_QUEUES: u16 = 64;
/// Largest ring size (QEMU's `VIRTQUEUE_MAX_SIZE`, the limit Nimbus's own disks use too).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Default `poll_us`: [`virtio_chain::poll::DEFAULT_POLL`].
pub const DEFAULT_POLL_US: u32 = virtio_chain::poll::DEFAULT_POLL.as_micros() as u32;
/// Largest `poll_us`: a millisecond of spinning per wake-up is already a lot of CPU.
pub const MAX_POLL_US: u32 = 1000;
/// Longest serial: the size of the `GET_ID` answer.
pub const MAX_SERIAL_LEN: usize = block::VIRTIO_BLK_ID_BYTES;

/// Errors in a `--block-backend` value.
pub use vhost_user_daemon::options::OptionError as ConfigError;

/// What the daemon serves and how: one disk image on one socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Disk image (raw) or block device.
    pub path: PathBuf,
    /// The vhost-user socket the daemon creates and listens on.
    pub socket: PathBuf,
    /// Request queues (1..=64), each served by its own worker thread.
    pub num_queues: u16,
    /// Largest ring size a frontend may set (a power of two in 2..=1024); the configuration
    /// space's `seg_max` is `queue_size - 2`.
    pub queue_size: u16,
    /// Open the image read-only; the device offers `VIRTIO_BLK_F_RO` and fails writes.
    pub readonly: bool,
    /// Open the image with `O_DIRECT`.
    pub direct: bool,
    /// Serial number for `GET_ID` (at most 20 bytes).
    pub serial: Option<String>,
    /// Microseconds a worker busy-polls its queue after serving it before it sleeps
    /// (0..=1000; 0 never polls).
    pub poll_us: u32,
    /// The image is known to be raw (`image_type=raw`): its header is not checked. Otherwise
    /// an image whose header says qcow2, vhdx, vmdk or vhd is refused, never served as raw.
    pub raw: bool,
}

impl BackendConfig {
    /// A configuration with the defaults for everything but the image and the socket.
    pub fn new(path: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Self {
        BackendConfig {
            path: path.into(),
            socket: socket.into(),
            num_queues: DEFAULT_NUM_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            readonly: false,
            direct: false,
            serial: None,
            poll_us: DEFAULT_POLL_US,
            raw: false,
        }
    }

    /// Parses `path=...,socket=...,...` (see [`SYNTAX`]). Keys are case-sensitive; an unknown
    /// or repeated key is an error, as is an empty `path` or `socket`. A value may be
    /// double-quoted to contain commas.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the offending key or item.
    ///
    /// # Example
    ///
    /// ```
    /// use vhost_user_block::BackendConfig;
    ///
    /// let c = BackendConfig::parse("path=/img,socket=/run/vub.sock,num_queues=2,readonly=true")
    ///     .unwrap();
    /// assert_eq!(c.num_queues, 2);
    /// assert!(c.readonly);
    /// assert_eq!(c.queue_size, 128);
    /// assert!(BackendConfig::parse("path=/img").is_err());
    /// ```
    pub fn parse(input: &str) -> Result<Self, ConfigError> {
        let mut path = None;
        let mut socket = None;
        let mut poll_queue = true;
        let mut config = BackendConfig::new("", "");
        for item in options::items(input, KEYS)? {
            let value = item.value.as_str();
            match item.key {
                "path" | "socket" => {
                    if value.is_empty() {
                        return Err(item.invalid("a path"));
                    }
                    if item.key == "path" {
                        path = Some(PathBuf::from(value));
                    } else {
                        socket = Some(PathBuf::from(value));
                    }
                }
                "num_queues" => {
                    config.num_queues =
                        item.number(|n| (1..=MAX_NUM_QUEUES).contains(n), "a number in 1..=64")?
                }
                "queue_size" => {
                    config.queue_size = item.number(
                        |n: &u16| n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(n),
                        "a power of two in 2..=1024",
                    )?
                }
                "readonly" => config.readonly = item.toggle()?,
                "direct" => config.direct = item.toggle()?,
                "serial" => {
                    if value.len() > MAX_SERIAL_LEN {
                        return Err(item.invalid("at most 20 bytes"));
                    }
                    config.serial = Some(value.to_string());
                }
                "poll_queue" => poll_queue = item.toggle()?,
                "poll_us" => {
                    config.poll_us = item.number(
                        |n| *n <= MAX_POLL_US,
                        "a number of microseconds in 0..=1000",
                    )?
                }
                "image_type" => {
                    config.raw = match value {
                        "raw" => true,
                        "unknown" => false,
                        _ => return Err(item.invalid("raw or unknown")),
                    }
                }
                // `items` only returns keys of KEYS, and each has an arm above.
                _ => return Err(item.invalid("a key this daemon knows")),
            }
        }
        if !poll_queue {
            config.poll_us = 0;
        }
        config.path = path.ok_or(ConfigError::Missing("path"))?;
        config.socket = socket.ok_or(ConfigError::Missing("socket"))?;
        Ok(config)
    }

    /// The `GET_ID` answer, as the in-process device builds it.
    pub fn serial_or_empty(&self) -> &str {
        self.serial.as_deref().unwrap_or("")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn full_option() {
        let c = BackendConfig::parse(
            "path=/a/b.img,socket=/run/x.sock,num_queues=4,queue_size=256,readonly=on,direct=true,serial=disk-7,poll_us=0,image_type=raw",
        )
        .unwrap();
        assert_eq!(
            c,
            BackendConfig {
                path: "/a/b.img".into(),
                socket: "/run/x.sock".into(),
                num_queues: 4,
                queue_size: 256,
                readonly: true,
                direct: true,
                serial: Some("disk-7".into()),
                poll_us: 0,
                raw: true,
            }
        );
        assert!(
            !BackendConfig::parse("path=p,socket=s,image_type=unknown")
                .unwrap()
                .raw
        );
        let e = BackendConfig::parse("path=p,socket=s,image_type=qcow2").unwrap_err();
        assert!(e.to_string().contains("raw or unknown"), "{e}");
        assert_eq!(c.serial_or_empty(), "disk-7");
    }

    #[test]
    fn defaults_and_order() {
        let c = BackendConfig::parse("socket=s,path=p,").unwrap();
        assert_eq!(c, BackendConfig::new("p", "s"));
        assert_eq!(c.num_queues, 1);
        assert_eq!(c.queue_size, 128);
        assert!(!c.readonly && !c.direct);
        assert_eq!(c.serial_or_empty(), "");
        assert_eq!(c.poll_us, 32);
        assert!(BackendConfig::parse("path=p,socket=s,poll_us=1001").is_err());
        let off = BackendConfig::parse("path=p,socket=s,poll_us=50,poll_queue=false").unwrap();
        assert_eq!(off.poll_us, 0);
        let on = BackendConfig::parse("path=p,socket=s,poll_queue=on,poll_us=50").unwrap();
        assert_eq!(on.poll_us, 50);
        assert!(BackendConfig::parse("path=p,socket=s,poll_us=-1").is_err());
        let c = BackendConfig::parse("path=p,socket=s,readonly=false,direct=off,serial=").unwrap();
        assert!(!c.readonly && !c.direct);
        assert_eq!(c.serial.as_deref(), Some(""));
        let c = BackendConfig::parse("path=p,socket=s,num_queues=64,queue_size=1024").unwrap();
        assert_eq!((c.num_queues, c.queue_size), (64, 1024));
        let c = BackendConfig::parse("path=p,socket=s,queue_size=2,serial=01234567890123456789")
            .unwrap();
        assert_eq!(c.queue_size, 2);
    }

    #[test]
    fn quoted_values() {
        let c = BackendConfig::parse(r#"path="/a,b.img",socket=/s,serial="x,y""#).unwrap();
        assert_eq!(c.path, PathBuf::from("/a,b.img"));
        assert_eq!(c.serial.as_deref(), Some("x,y"));
        assert_eq!(
            BackendConfig::parse(r#"path="/a,socket=/s"#).unwrap_err(),
            ConfigError::UnterminatedQuote(r#"path="/a,socket=/s"#.into())
        );
    }

    #[test]
    fn bad_options() {
        use ConfigError::*;
        let err = |s: &str| BackendConfig::parse(s).unwrap_err();
        assert_eq!(err(""), Missing("path"));
        assert_eq!(err("path=p"), Missing("socket"));
        assert_eq!(err("socket=s"), Missing("path"));
        assert!(matches!(err("path=p,socket=s,bogus=1"), UnknownKey { key, .. } if key == "bogus"));
        assert!(matches!(err("path=p,socket=s,Path=x"), UnknownKey { key, .. } if key == "Path"));
        assert_eq!(
            err("path=p,socket=s,readonly"),
            NotKeyValue("readonly".into())
        );
        assert_eq!(err("path=p,path=q,socket=s"), DuplicateKey("path".into()));
        for bad in [
            "path=,socket=s",
            "path=p,socket=",
            "path=p,socket=s,num_queues=0",
            "path=p,socket=s,num_queues=65",
            "path=p,socket=s,num_queues=-1",
            "path=p,socket=s,num_queues=two",
            "path=p,socket=s,queue_size=100",
            "path=p,socket=s,queue_size=1",
            "path=p,socket=s,queue_size=2048",
            "path=p,socket=s,queue_size=0",
            "path=p,socket=s,readonly=yes",
            "path=p,socket=s,direct=1",
            "path=p,socket=s,serial=012345678901234567890",
        ] {
            assert!(
                matches!(BackendConfig::parse(bad), Err(InvalidValue { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            err("path=p,socket=s,x=1").to_string(),
            "unknown key 'x' (known: path, socket, num_queues, queue_size, readonly, direct, serial, \
             poll_queue, poll_us, image_type)"
        );
        let msg = err("path=p,socket=s,queue_size=100").to_string();
        assert_eq!(msg, "queue_size=100: expected a power of two in 2..=1024");
    }

    #[test]
    fn every_key_is_parsed() {
        for (key, _) in KEYS {
            let value = match *key {
                "num_queues" | "queue_size" | "poll_us" => "2",
                "readonly" | "direct" | "poll_queue" => "true",
                "image_type" => "raw",
                _ => "x",
            };
            let input = match *key {
                "path" => format!("path={value},socket=s"),
                "socket" => format!("path=p,socket={value}"),
                _ => format!("path=p,socket=s,{key}={value}"),
            };
            BackendConfig::parse(&input).unwrap();
            assert!(
                SYNTAX.contains(&format!("{key}=")),
                "{key} missing from SYNTAX"
            );
        }
    }
}
