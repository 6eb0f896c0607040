//! A daemon's command line: `--<device>-backend <option> [--keep-running] [--seccomp <mode>]
//! [-v...]`, generic over the backend option ([`BackendOption`]).

use std::ffi::OsString;
use std::fmt::Write as _;

use nimbus_thread::seccomp::SeccompMode;

/// The daemon's backend option: its name, its syntax and keys, and its parser.
pub trait BackendOption: Sized {
    /// The option, `--block-backend`.
    const OPTION: &'static str;
    /// What the daemon does, the first line of the help text after the program name.
    const SUMMARY: &'static str;
    /// The option's syntax, for the help text.
    const SYNTAX: &'static str;
    /// Every key with its help line.
    const KEYS: &'static [(&'static str, &'static str)];
    /// Errors in the option's value.
    type Error: std::error::Error + Clone + PartialEq + Eq;

    /// Parses the option's value.
    ///
    /// # Errors
    ///
    /// When the value is wrong.
    fn parse(value: &str) -> Result<Self, Self::Error>;

    /// Checks the option against the rest of the command line; the message of a conflict.
    ///
    /// # Errors
    ///
    /// The message when `keep_running` cannot go with this option.
    fn check(&self, _keep_running: bool) -> Result<(), &'static str> {
        Ok(())
    }
}

/// Errors on the command line; each is reported as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError<C: BackendOption> {
    /// The backend option is absent.
    #[error("{option} is required (try --help)", option = C::OPTION)]
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
    /// Options that cannot go together ([`BackendOption::check`]).
    #[error("{0}")]
    Conflict(&'static str),
    /// The backend option's value is wrong.
    #[error("{option}: {0}", option = C::OPTION)]
    Backend(C::Error),
    /// `--seccomp` is not `true`, `false` or `log`.
    #[error("--seccomp: '{0}' is not true, false or log")]
    Seccomp(String),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<C> {
    /// Serve the device.
    Run(Args<C>),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

/// The options of a [`Command::Run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args<C> {
    /// The backend option.
    pub backend: C,
    /// Serve frontend after frontend until terminated, instead of exiting when the first one
    /// disconnects.
    pub keep_running: bool,
    /// `-v` count: 0 warnings and errors, 1 info, 2 debug, 3 trace.
    pub verbose: u8,
    /// `--seccomp`: what a system call outside the daemon's filters does (default: it ends the
    /// daemon).
    pub seccomp: SeccompMode,
    /// `--landlock`: no file-system access once the disk or TAP is open and the socket bound,
    /// but removing the socket at exit.
    pub landlock: bool,
}

/// Parses the arguments after the program name. `--help` or `--version` anywhere wins (as
/// long as the arguments before it parse).
///
/// # Errors
///
/// A [`CliError`] for a missing, repeated, unknown or invalid argument.
pub fn parse_args<C, I>(args: I) -> Result<Command<C>, CliError<C>>
where
    C: BackendOption,
    I: IntoIterator<Item = OsString>,
{
    let mut backend = None;
    let mut keep_running = false;
    let mut verbose: u8 = 0;
    let mut seccomp = None;
    let mut landlock = false;
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
            n if n == C::OPTION => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .ok_or(CliError::MissingValue(C::OPTION))?
                        .into_string()
                        .map_err(|a| CliError::NotUtf8(a.to_string_lossy().into_owned()))?,
                };
                if backend.is_some() {
                    return Err(CliError::Duplicate(C::OPTION));
                }
                backend = Some(C::parse(&value).map_err(CliError::Backend)?);
            }
            "--seccomp" => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .ok_or(CliError::MissingValue("--seccomp"))?
                        .into_string()
                        .map_err(|a| CliError::NotUtf8(a.to_string_lossy().into_owned()))?,
                };
                if seccomp.is_some() {
                    return Err(CliError::Duplicate("--seccomp"));
                }
                seccomp = Some(SeccompMode::parse(&value).map_err(|_| CliError::Seccomp(value))?);
            }
            "--keep-running" if inline.is_none() => keep_running = true,
            "--landlock" if inline.is_none() => landlock = true,
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
    backend.check(keep_running).map_err(CliError::Conflict)?;
    Ok(Command::Run(Args {
        backend,
        keep_running,
        verbose,
        seccomp: seccomp.unwrap_or(SeccompMode::Trap),
        landlock,
    }))
}

/// The `--help` text.
pub fn usage<C: BackendOption>(program: &str) -> String {
    let (summary, option, syntax) = (C::SUMMARY, C::OPTION, C::SYNTAX);
    let mut s = format!(
        "{program}: {summary}\n\n\
         Usage: {program} {option} {syntax} [--keep-running] [--seccomp <mode>]\n\
         \x20      [--landlock] [-v...]\n\n\
         {option} keys:\n"
    );
    for (key, help) in C::KEYS {
        let _ = writeln!(s, "  {key:<11} {help}");
    }
    s.push_str(
        "\nOptions:\n\
         \x20 --keep-running    serve frontends one after another until SIGTERM/SIGINT\n\
         \x20                   (default: exit when the first frontend disconnects)\n\
         \x20 --seccomp <mode>  system call filters: true (default) ends the daemon on a call\n\
         \x20                   its threads may not make, log lets it through and has the\n\
         \x20                   kernel log it, false installs none\n\
         \x20 --landlock        once the disk or TAP is open and the socket bound, allow no\n\
         \x20                   file-system access but removing the socket at exit\n\
         \x20 -v, --verbose     more log output on stderr (-v info, -vv debug)\n\
         \x20 -h, --help        this text\n\
         \x20 -V, --version     the version\n\n\
         Exit status: 0 after the frontend disconnected or on SIGTERM/SIGINT, 159 after a\n\
         forbidden system call (one line on stderr names it), 1 on any other error.\n",
    );
    s
}

/// What every daemon's command-line tests check, whatever its backend option.
#[cfg(feature = "test-utils")]
#[allow(clippy::unwrap_used)]
pub mod testing {
    use std::ffi::OsString;
    use std::fmt::Debug;

    use nimbus_thread::seccomp::SeccompMode;

    use super::{parse_args, usage, Args, BackendOption, CliError, Command};

    /// Parses `args` (after the program name).
    ///
    /// # Errors
    ///
    /// As [`parse_args`].
    pub fn parse<C: BackendOption>(args: &[&str]) -> Result<Command<C>, CliError<C>> {
        parse_args(args.iter().map(|s| OsString::from(*s)))
    }

    /// Parses `args`, which must be a [`Command::Run`].
    ///
    /// # Panics
    ///
    /// If they are not.
    pub fn run<C: BackendOption + Debug>(args: &[&str]) -> Args<C> {
        match parse::<C>(args).unwrap() {
            Command::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    /// Checks the options and errors every daemon shares, with `valid` a correct value of the
    /// backend option (which `keep_running` does not conflict with); returns its [`Args`].
    ///
    /// # Panics
    ///
    /// On the first check that fails.
    pub fn check_common<C: BackendOption + Debug + PartialEq>(valid: &str) -> Args<C> {
        let option = C::OPTION;
        let a = run::<C>(&[option, valid]);
        assert!(!a.keep_running);
        assert_eq!(a.verbose, 0);
        assert_eq!(a.seccomp, SeccompMode::Trap, "filters on by default");
        assert!(!a.landlock, "landlock off by default");
        assert!(run::<C>(&[option, valid, "--landlock"]).landlock);
        assert!(matches!(
            parse::<C>(&[option, valid, "--landlock=yes"]).unwrap_err(),
            CliError::Unexpected(_)
        ));
        let inline = format!("{option}={valid}");
        let b = run::<C>(&["-vv", &inline, "--keep-running", "--verbose"]);
        assert_eq!(b.backend, a.backend);
        assert!(b.keep_running);
        assert_eq!(b.verbose, 3);
        for (value, mode) in [
            ("true", SeccompMode::Trap),
            ("log", SeccompMode::Log),
            ("false", SeccompMode::Off),
        ] {
            assert_eq!(run::<C>(&["--seccomp", value, option, valid]).seccomp, mode);
            let inline_mode = format!("--seccomp={value}");
            assert_eq!(run::<C>(&[&inline, &inline_mode]).seccomp, mode);
        }
        let bad = parse::<C>(&[option, valid, "--seccomp", "on"]).unwrap_err();
        assert_eq!(bad, CliError::Seccomp("on".into()));
        assert_eq!(bad.to_string(), "--seccomp: 'on' is not true, false or log");
        assert_eq!(
            parse::<C>(&[option, valid, "--seccomp"]).unwrap_err(),
            CliError::MissingValue("--seccomp")
        );
        assert_eq!(
            parse::<C>(&["--seccomp=log", option, valid, "--seccomp", "log"]).unwrap_err(),
            CliError::Duplicate("--seccomp")
        );
        assert_eq!(parse::<C>(&["--help"]).unwrap(), Command::Help);
        assert_eq!(parse::<C>(&["-v", "-h"]).unwrap(), Command::Help);
        assert_eq!(parse::<C>(&["-V"]).unwrap(), Command::Version);
        assert_eq!(parse::<C>(&["--version"]).unwrap(), Command::Version);

        assert_eq!(parse::<C>(&[]).unwrap_err(), CliError::MissingBackend);
        assert_eq!(parse::<C>(&["-v"]).unwrap_err(), CliError::MissingBackend);
        assert_eq!(
            parse::<C>(&[option]).unwrap_err(),
            CliError::MissingValue(option)
        );
        assert_eq!(
            parse::<C>(&[option, valid, &inline]).unwrap_err(),
            CliError::Duplicate(option)
        );
        assert_eq!(
            parse::<C>(&[option, valid, "extra"]).unwrap_err(),
            CliError::Unexpected("extra".into())
        );
        assert_eq!(
            parse::<C>(&["--keep-running=yes"]).unwrap_err(),
            CliError::Unexpected("--keep-running=yes".into())
        );
        assert_eq!(
            parse::<C>(&["-x"]).unwrap_err(),
            CliError::Unexpected("-x".into())
        );
        {
            use std::os::unix::ffi::OsStringExt;
            let bad = OsString::from_vec(vec![b'-', b'-', 0xff]);
            assert!(matches!(
                parse_args::<C, _>([bad]).unwrap_err(),
                CliError::NotUtf8(_)
            ));
        }

        let text = usage::<C>("program");
        for (key, _) in C::KEYS {
            assert!(text.contains(&format!("  {key} ")), "{key}");
        }
        assert!(text.contains("--keep-running"));
        assert!(text.contains("--seccomp <mode>"));
        assert!(text.contains(option));
        a
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use nimbus_thread::seccomp::SeccompMode;

    use super::*;

    /// The smallest backend option: `--x-backend <anything but "bad">`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct X(String);

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("bad")]
    struct Bad;

    impl BackendOption for X {
        const OPTION: &'static str = "--x-backend";
        const SUMMARY: &'static str = "test";
        const SYNTAX: &'static str = "<x>";
        const KEYS: &'static [(&'static str, &'static str)] = &[];
        type Error = Bad;

        fn parse(value: &str) -> Result<Self, Bad> {
            (value != "bad").then(|| X(value.into())).ok_or(Bad)
        }
    }

    fn parse(args: &[&str]) -> Result<Command<X>, CliError<X>> {
        parse_args(args.iter().map(|s| OsString::from(*s)))
    }

    fn seccomp(args: &[&str]) -> SeccompMode {
        match parse(args).unwrap() {
            Command::Run(a) => a.seccomp,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn seccomp_takes_cloud_hypervisors_values() {
        assert_eq!(seccomp(&["--x-backend", "a"]), SeccompMode::Trap);
        assert_eq!(
            seccomp(&["--seccomp", "true", "--x-backend", "a"]),
            SeccompMode::Trap
        );
        assert_eq!(
            seccomp(&["--x-backend", "a", "--seccomp=log"]),
            SeccompMode::Log
        );
        assert_eq!(
            seccomp(&["--x-backend", "a", "--seccomp", "false"]),
            SeccompMode::Off
        );
        for bad in ["yes", "", "True", "off"] {
            let e = parse(&["--x-backend", "a", "--seccomp", bad]).unwrap_err();
            assert_eq!(e, CliError::Seccomp(bad.into()));
            assert_eq!(
                e.to_string(),
                format!("--seccomp: '{bad}' is not true, false or log")
            );
        }
        assert_eq!(
            parse(&["--x-backend", "a", "--seccomp"]).unwrap_err(),
            CliError::MissingValue("--seccomp")
        );
        assert_eq!(
            parse(&["--seccomp=true", "--seccomp=true", "--x-backend", "a"]).unwrap_err(),
            CliError::Duplicate("--seccomp")
        );
        assert!(usage::<X>("x").contains("--seccomp <mode>"));
    }
}
