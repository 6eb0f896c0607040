//! The daemon's command line: `--net-backend <option> [--keep-running] [-v...]`.

use std::ffi::OsString;
use std::fmt::Write as _;

use crate::config::{BackendConfig, ConfigError, KEYS, SYNTAX};

/// Errors on the command line; each is reported as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// `--net-backend` is absent.
    #[error("--net-backend is required (try --help)")]
    MissingBackend,
    /// An option that takes a value is last.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// An option given twice.
    #[error("{0} is given more than once")]
    Duplicate(&'static str),
    /// An argument the daemon does not know.
    #[error("unexpected argument '{0}' (try --help)")]
    Unexpected(String),
    /// An argument that is not UTF-8.
    #[error("argument '{0}' is not valid UTF-8")]
    NotUtf8(String),
    /// `--keep-running` with `client=on`: a client serves the one VMM it connected to.
    #[error("--keep-running cannot be used with client=on")]
    KeepRunningClient,
    /// The `--net-backend` value is wrong.
    #[error("--net-backend: {0}")]
    Backend(#[from] ConfigError),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Serve a network device.
    Run(Args),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

/// The options of a [`Command::Run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The `--net-backend` option.
    pub backend: BackendConfig,
    /// Serve frontend after frontend until terminated, instead of exiting when the first one
    /// disconnects (listening mode only).
    pub keep_running: bool,
    /// `-v` count: 0 warnings and errors, 1 info, 2 debug, 3 trace.
    pub verbose: u8,
}

/// Parses the arguments after the program name. `--help` or `--version` anywhere wins (as
/// long as the arguments before it parse).
///
/// # Errors
///
/// A [`CliError`] for a missing, repeated, unknown or invalid argument.
///
/// # Example
///
/// ```
/// use vhost_user_net::cli::{parse_args, Command};
///
/// let cmd = parse_args(["--net-backend", "ip=10.0.0.1,mask=255.255.255.0,socket=/s", "-v"].map(Into::into)).unwrap();
/// let Command::Run(args) = cmd else { panic!() };
/// assert_eq!(args.backend.socket.to_str(), Some("/s"));
/// assert_eq!(args.verbose, 1);
/// assert!(!args.keep_running);
/// ```
pub fn parse_args<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut backend = None;
    let mut keep_running = false;
    let mut verbose: u8 = 0;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| CliError::NotUtf8(a.to_string_lossy().into_owned()))?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "--net-backend" => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .ok_or(CliError::MissingValue("--net-backend"))?
                        .into_string()
                        .map_err(|a| CliError::NotUtf8(a.to_string_lossy().into_owned()))?,
                };
                if backend.is_some() {
                    return Err(CliError::Duplicate("--net-backend"));
                }
                backend = Some(BackendConfig::parse(&value)?);
            }
            "--keep-running" if inline.is_none() => keep_running = true,
            "--verbose" if inline.is_none() => verbose = verbose.saturating_add(1),
            "-h" | "--help" if inline.is_none() => return Ok(Command::Help),
            "-V" | "--version" if inline.is_none() => return Ok(Command::Version),
            s if s.len() > 1 && s.starts_with('-') && s[1..].bytes().all(|b| b == b'v') => {
                verbose = verbose.saturating_add(u8::try_from(s.len() - 1).unwrap_or(u8::MAX));
            }
            _ => return Err(CliError::Unexpected(arg)),
        }
    }
    let backend = backend.ok_or(CliError::MissingBackend)?;
    if keep_running && backend.client {
        return Err(CliError::KeepRunningClient);
    }
    Ok(Command::Run(Args {
        backend,
        keep_running,
        verbose,
    }))
}

/// The `--help` text.
pub fn usage(program: &str) -> String {
    let mut s = format!(
        "{program}: vhost-user-net backend forwarding to a TAP interface\n\n\
         Usage: {program} --net-backend {SYNTAX} [--keep-running] [-v...]\n\n\
         --net-backend keys:\n"
    );
    for (key, help) in KEYS {
        let _ = writeln!(s, "  {key:<11} {help}");
    }
    s.push_str(
        "\nOptions:\n\
         \x20 --keep-running  serve frontends one after another until SIGTERM/SIGINT\n\
         \x20                 (default: exit when the first frontend disconnects)\n\
         \x20 -v, --verbose   more log output on stderr (-v info, -vv debug)\n\
         \x20 -h, --help      this text\n\
         \x20 -V, --version   the version\n\n\
         Exit status: 0 after the frontend disconnected or on SIGTERM/SIGINT, 1 on any error.\n",
    );
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, CliError> {
        parse_args(args.iter().map(|s| OsString::from(*s)))
    }

    fn run(args: &[&str]) -> Args {
        match parse(args).unwrap() {
            Command::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn good_command_lines() {
        let a = run(&["--net-backend", "ip=10.0.0.1,mask=255.255.255.0,socket=/s"]);
        assert_eq!(
            a.backend,
            BackendConfig::parse("ip=10.0.0.1,mask=255.255.255.0,socket=/s").unwrap()
        );
        assert_eq!(a.backend.socket.to_str(), Some("/s"));
        assert!(!a.keep_running);
        assert_eq!(a.verbose, 0);
        let a = run(&[
            "-vv",
            "--net-backend=ip=10.0.0.1,mask=255.255.255.0,socket=/s,num_queues=4",
            "--keep-running",
            "--verbose",
        ]);
        assert_eq!(a.backend.num_queues, 4);
        assert!(a.keep_running);
        assert_eq!(a.verbose, 3);
        assert_eq!(parse(&["--help"]).unwrap(), Command::Help);
        assert_eq!(parse(&["-v", "-h"]).unwrap(), Command::Help);
        assert_eq!(parse(&["-V"]).unwrap(), Command::Version);
        assert_eq!(parse(&["--version"]).unwrap(), Command::Version);
    }

    #[test]
    fn bad_command_lines() {
        assert_eq!(parse(&[]).unwrap_err(), CliError::MissingBackend);
        assert_eq!(parse(&["-v"]).unwrap_err(), CliError::MissingBackend);
        assert_eq!(
            parse(&["--net-backend"]).unwrap_err(),
            CliError::MissingValue("--net-backend")
        );
        assert_eq!(
            parse(&[
                "--net-backend",
                "ip=10.0.0.1,mask=255.255.255.0,socket=/s",
                "--net-backend=ip=10.0.0.1,mask=255.255.255.0,socket=/s"
            ])
            .unwrap_err(),
            CliError::Duplicate("--net-backend")
        );
        assert_eq!(
            parse(&[
                "--net-backend",
                "ip=10.0.0.1,mask=255.255.255.0,socket=/s",
                "extra"
            ])
            .unwrap_err(),
            CliError::Unexpected("extra".into())
        );
        assert_eq!(
            parse(&["--keep-running=yes"]).unwrap_err(),
            CliError::Unexpected("--keep-running=yes".into())
        );
        assert_eq!(
            parse(&["-x"]).unwrap_err(),
            CliError::Unexpected("-x".into())
        );
        assert_eq!(
            parse(&["--net-backend", "ip=10.0.0.1,mask=255.0.0.0"]).unwrap_err(),
            CliError::Backend(ConfigError::Missing("socket"))
        );
        let e = parse(&[
            "--net-backend",
            "ip=10.0.0.1,mask=255.255.255.0,socket=/s,num_queues=0",
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net-backend: num_queues=0: expected an even number in 2..=64"
        );
        assert!(!e.to_string().contains('\n'));
        assert_eq!(
            parse(&[
                "--net-backend",
                "ip=10.0.0.1,mask=255.0.0.0,socket=/s,client=on",
                "--keep-running"
            ])
            .unwrap_err(),
            CliError::KeepRunningClient
        );
    }

    #[test]
    fn non_utf8_argument() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(vec![b'-', b'-', 0xff]);
        assert!(matches!(
            parse_args([bad]).unwrap_err(),
            CliError::NotUtf8(_)
        ));
    }

    #[test]
    fn usage_lists_every_key() {
        let text = usage("vhost_user_net");
        for (key, _) in KEYS {
            assert!(text.contains(&format!("  {key} ")), "{key}");
        }
        assert!(text.contains("--keep-running"));
    }
}
