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

    /// Parses CH's CLI form: `off`, `null`, `tty`, `pty`, `file=PATH`, `socket=PATH`.
    pub fn parse(option: &'static str, s: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError::Console { option, message };
        let (mode, file, socket) = match s.split_once('=') {
            None => match s {
                "off" => (ConsoleOutputMode::Off, None, None),
                "null" => (ConsoleOutputMode::Null, None, None),
                "tty" => (ConsoleOutputMode::Tty, None, None),
                "pty" => (ConsoleOutputMode::Pty, None, None),
                other => {
                    return Err(err(format!(
                        "unknown mode '{other}' (off, null, tty, pty, file=PATH, socket=PATH)"
                    )))
                }
            },
            Some(("file", "")) | Some(("socket", "")) => return Err(err("empty path".into())),
            Some(("file", p)) => (ConsoleOutputMode::File, Some(PathBuf::from(p)), None),
            Some(("socket", p)) => (ConsoleOutputMode::Socket, None, Some(PathBuf::from(p))),
            Some((k, _)) => return Err(err(format!("unknown key '{k}'"))),
        };
        Ok(Self {
            file,
            mode,
            iommu: false,
            socket,
        })
    }

    pub(crate) fn validate(&self, option: &'static str) -> Result<(), ConfigError> {
        let err = |message: String| Err(ConfigError::Console { option, message });
        match self.mode {
            ConsoleOutputMode::Pty | ConsoleOutputMode::Socket => {
                return err(format!(
                    "mode {:?} is not supported by Nimbus yet",
                    self.mode
                ))
            }
            ConsoleOutputMode::File if self.file.is_none() => {
                return err("mode File needs a file".into())
            }
            _ => {}
        }
        if self.iommu {
            return err("iommu is not supported".into());
        }
        Ok(())
    }
}

/// The debug console at I/O port 0xe9 (CH `DebugConsoleConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugConsoleConfig {
    /// Output file (mode `File`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Where output goes (only `Off` for now).
    pub mode: ConsoleOutputMode,
    /// I/O port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iobase: Option<u16>,
}

impl Default for DebugConsoleConfig {
    fn default() -> Self {
        Self {
            file: None,
            mode: ConsoleOutputMode::Off,
            iobase: Some(0xe9),
        }
    }
}

impl DebugConsoleConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.mode != ConsoleOutputMode::Off {
            return Err(ConfigError::Console {
                option: "debug-console",
                message: format!("mode {:?} is not supported by Nimbus yet", self.mode),
            });
        }
        Ok(())
    }
}
