//! The daemon's command line: `--net-backend <option> [--keep-running] [-v...]`, parsed by
//! `vhost_user_daemon` with the keys of [`BackendConfig`].
//!
//! ```
//! use vhost_user_net::cli::{parse_args, Command};
//!
//! let cmd = parse_args(["--net-backend", "ip=10.0.0.1,mask=255.255.255.0,socket=/s", "-v"].map(Into::into)).unwrap();
//! let Command::Run(args) = cmd else { panic!() };
//! assert_eq!(args.backend.socket.to_str(), Some("/s"));
//! assert_eq!(args.verbose, 1);
//! assert!(!args.keep_running);
//! ```

pub use vhost_user_daemon::cli::parse_args;
use vhost_user_daemon::cli::BackendOption;

use crate::config::{BackendConfig, ConfigError, KEYS, SYNTAX};

/// Errors on the command line; each is reported as one line.
pub type CliError = vhost_user_daemon::cli::CliError<BackendConfig>;
/// What the command line asks for.
pub type Command = vhost_user_daemon::cli::Command<BackendConfig>;
/// The options of a [`Command::Run`].
pub type Args = vhost_user_daemon::cli::Args<BackendConfig>;

/// `--keep-running` with `client=on`: a client serves the one VMM it connected to.
pub const KEEP_RUNNING_CLIENT: &str = "--keep-running cannot be used with client=on";

impl BackendOption for BackendConfig {
    const OPTION: &'static str = "--net-backend";
    const SUMMARY: &'static str = "vhost-user-net backend forwarding to a TAP interface";
    const SYNTAX: &'static str = SYNTAX;
    const KEYS: &'static [(&'static str, &'static str)] = KEYS;
    type Error = ConfigError;

    fn parse(value: &str) -> Result<Self, ConfigError> {
        BackendConfig::parse(value)
    }

    fn check(&self, keep_running: bool) -> Result<(), &'static str> {
        if keep_running && self.client {
            return Err(KEEP_RUNNING_CLIENT);
        }
        Ok(())
    }
}

/// The `--help` text.
pub fn usage(program: &str) -> String {
    vhost_user_daemon::cli::usage::<BackendConfig>(program)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use vhost_user_daemon::cli::testing::{check_common, parse, run};

    use super::*;

    const VALID: &str = "ip=10.0.0.1,mask=255.255.255.0,socket=/s";

    #[test]
    fn good_command_lines() {
        let a = check_common::<BackendConfig>(VALID);
        assert_eq!(a.backend, BackendConfig::parse(VALID).unwrap());
        assert_eq!(a.backend.socket.to_str(), Some("/s"));
        let a: Args = run(&["--net-backend=ip=10.0.0.1,mask=255.255.255.0,socket=/s,num_queues=4"]);
        assert_eq!(a.backend.num_queues, 4);
    }

    #[test]
    fn bad_command_lines() {
        assert_eq!(
            parse::<BackendConfig>(&["--net-backend", "ip=10.0.0.1,mask=255.0.0.0"]).unwrap_err(),
            CliError::Backend(ConfigError::Missing("socket"))
        );
        let e = parse::<BackendConfig>(&[
            "--net-backend",
            "ip=10.0.0.1,mask=255.255.255.0,socket=/s,num_queues=0",
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net-backend: num_queues=0: expected an even number in 2..=64"
        );
        assert!(!e.to_string().contains('\n'));
        let e = parse::<BackendConfig>(&[
            "--net-backend",
            "ip=10.0.0.1,mask=255.0.0.0,socket=/s,client=on",
            "--keep-running",
        ])
        .unwrap_err();
        assert_eq!(e, CliError::Conflict(KEEP_RUNNING_CLIENT));
        assert_eq!(
            e.to_string(),
            "--keep-running cannot be used with client=on"
        );
        assert_eq!(
            parse::<BackendConfig>(&[]).unwrap_err().to_string(),
            "--net-backend is required (try --help)"
        );
    }

    #[test]
    fn usage_lists_every_key() {
        let text = usage("vhost_user_net");
        assert!(text
            .starts_with("vhost_user_net: vhost-user-net backend forwarding to a TAP interface\n"));
        assert!(text.contains("--net-backend keys:\n"));
    }
}
