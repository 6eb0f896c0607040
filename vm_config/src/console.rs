//! The serial port, the virtio console and the debug console (Cloud Hypervisor's
//! `ConsoleConfig` and `DebugConsoleConfig`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Where a serial port or console goes (CH `ConsoleOutputMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    /// No device at all.
    Off,
    /// A pseudo-terminal (not supported yet).
    Pty,
    /// The VMM's own standard output (and input).
    Tty,
    /// Appended to a file.
    File,
    /// A Unix socket (not supported yet).
    Socket,
    /// The device exists; output is discarded.
    Null,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A serial port or console (CH `ConsoleConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// Output file (mode `File`) or allocated PTY path (mode `Pty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Where output goes.
    pub mode: ConsoleOutputMode,
    /// Behind a virtual IOMMU (not supported; must stay false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Socket path (mode `Socket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    pub(crate) fn with_mode(mode: ConsoleOutputMode) -> Self {
        Self {
            file: None,
            mode,
            iommu: false,
            socket: None,
        }
    }

    /// Parses CH's CLI form: one mode (`off`, `null`, `tty`, `pty`, `file=PATH`,
    /// `socket=PATH`), and for the console `iommu=on|off`; an empty value is unset.
    pub fn parse(option: &'static str, s: &str) -> Result<Self, ConfigError> {
        // The virtio console is a PCI device (CH's `iommu`); the serial port is not.
        let extra: &[&str] = if option == "console" { &["iommu"] } else { &[] };
        let parsed = parse_mode(option, s, extra)?;
        let mut config = Self {
            file: parsed.file,
            mode: parsed.mode,
            iommu: false,
            socket: parsed.socket,
        };
        for (key, value) in parsed.extra {
            config.iommu = on_off(option, &key, &value)?;
        }
        Ok(config)
    }

    pub(crate) fn validate(&self, option: &'static str) -> Result<(), ConfigError> {
        let err = |message: String| Err(ConfigError::Console { option, message });
        check_paths(option, self.mode, &self.file, &self.socket)?;
        if self.iommu {
            return err("iommu is not supported".into());
        }
        Ok(())
    }
}

/// The port of the debug console unless `iobase` says otherwise (Bochs' and QEMU's).
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;

/// The debug console: bytes the guest writes to one I/O port (CH `DebugConsoleConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugConsoleConfig {
    /// Output file (mode `File`) or allocated PTY path (mode `Pty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Where output goes.
    pub mode: ConsoleOutputMode,
    /// I/O port (0xe9 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iobase: Option<u16>,
    /// Socket path (mode `Socket`; a Nimbus extension: Cloud Hypervisor's debug console has
    /// no socket mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Default for DebugConsoleConfig {
    fn default() -> Self {
        Self {
            file: None,
            mode: ConsoleOutputMode::Off,
            iobase: Some(DEBUG_CONSOLE_PORT),
            socket: None,
        }
    }
}

impl DebugConsoleConfig {
    /// Parses CH's CLI form: one mode (`off`, `null`, `tty`, `pty`, `file=PATH`, and
    /// `socket=PATH`), and `iobase=0xNN`; an empty value is unset.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let option = "debug-console";
        let parsed = parse_mode(option, s, &["iobase"])?;
        let mut config = Self {
            file: parsed.file,
            mode: parsed.mode,
            iobase: Some(DEBUG_CONSOLE_PORT),
            socket: parsed.socket,
        };
        for (key, value) in parsed.extra {
            let port = value
                .strip_prefix("0x")
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            config.iobase = Some(port.ok_or_else(|| ConfigError::Console {
                option,
                message: format!(
                    "{key}={value}: not an I/O port (0x0 to 0xffff, in hex with 0x as Cloud \
                     Hypervisor takes it)"
                ),
            })?);
        }
        Ok(config)
    }

    /// The I/O port the console answers on.
    pub fn port(&self) -> u16 {
        self.iobase.unwrap_or(DEBUG_CONSOLE_PORT)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        check_paths("debug-console", self.mode, &self.file, &self.socket)
    }
}

/// A mode with its path, and the other keys of the option.
struct ParsedMode {
    mode: ConsoleOutputMode,
    file: Option<PathBuf>,
    socket: Option<PathBuf>,
    extra: Vec<(String, String)>,
}

const MODES: &str = "off, null, tty, pty, file=PATH, socket=PATH";

/// Reads one mode word (or `file=`/`socket=`) and the keys in `extra_keys` from `s`.
fn parse_mode(
    option: &'static str,
    s: &str,
    extra_keys: &[&str],
) -> Result<ParsedMode, ConfigError> {
    let err = |message: String| ConfigError::Console { option, message };
    let tokens = crate::kv::tokens(s).map_err(|e| err(e.to_string()))?;
    let mut parsed = ParsedMode {
        mode: ConsoleOutputMode::Off,
        file: None,
        socket: None,
        extra: Vec::new(),
    };
    let mut modes = Vec::new();
    for token in tokens {
        let (mode, path) = match token.split_once('=') {
            None => match token.as_str() {
                "off" => (ConsoleOutputMode::Off, None),
                "null" => (ConsoleOutputMode::Null, None),
                "tty" => (ConsoleOutputMode::Tty, None),
                "pty" => (ConsoleOutputMode::Pty, None),
                other => {
                    return Err(err(format!(
                        "unknown mode '{other}' (allowed: {})",
                        allowed(extra_keys)
                    )))
                }
            },
            // An empty value is unset.
            Some((_, "")) => continue,
            Some(("file", p)) => (ConsoleOutputMode::File, Some(PathBuf::from(p))),
            Some(("socket", p)) => (ConsoleOutputMode::Socket, Some(PathBuf::from(p))),
            Some((k, v)) if extra_keys.contains(&k) => {
                parsed.extra.push((k.to_string(), v.to_string()));
                continue;
            }
            Some((k, v)) => {
                return Err(err(format!(
                    "unknown key '{k}' (in '{k}={v}'; allowed: {})",
                    allowed(extra_keys)
                )))
            }
        };
        modes.push(token.clone());
        parsed.mode = mode;
        match mode {
            ConsoleOutputMode::File => parsed.file = path,
            ConsoleOutputMode::Socket => parsed.socket = path,
            _ => {}
        }
    }
    match modes.len() {
        1 => Ok(parsed),
        0 => Err(err(format!("no mode given (one of {MODES})"))),
        _ => Err(err(format!(
            "one mode only, not {} ({MODES})",
            modes.join(" and ")
        ))),
    }
}

/// The modes and keys an option takes, for errors.
fn allowed(extra_keys: &[&str]) -> String {
    let mut text = MODES.to_string();
    for k in extra_keys {
        text.push_str(&format!(", {k}="));
    }
    text
}

fn on_off(option: &'static str, key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(ConfigError::Console {
            option,
            message: format!("{key}={other}: not allowed (on, off, true, false)"),
        }),
    }
}

/// File mode needs a file, socket mode a socket.
fn check_paths(
    option: &'static str,
    mode: ConsoleOutputMode,
    file: &Option<PathBuf>,
    socket: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let missing = match mode {
        ConsoleOutputMode::File if file.is_none() => "mode File needs a file",
        ConsoleOutputMode::Socket if socket.is_none() => "mode Socket needs a socket path",
        _ => return Ok(()),
    };
    Err(ConfigError::Console {
        option,
        message: missing.into(),
    })
}
