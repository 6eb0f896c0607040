//! The daemon's command line: `--block-backend <option> [--keep-running] [-v...]`, parsed by
//! `vhost_user_daemon` with the keys of [`BackendConfig`].
//!
//! ```
//! use vhost_user_block::cli::{parse_args, Command};
//!
//! let cmd = parse_args(["--block-backend", "path=/img,socket=/s", "-v"].map(Into::into)).unwrap();
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

impl BackendOption for BackendConfig {
    const OPTION: &'static str = "--block-backend";
    const SUMMARY: &'static str = "vhost-user-blk backend serving a raw disk image";
    const SYNTAX: &'static str = SYNTAX;
    const KEYS: &'static [(&'static str, &'static str)] = KEYS;
    type Error = ConfigError;

    fn parse(value: &str) -> Result<Self, ConfigError> {
        BackendConfig::parse(value)
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

    #[test]
    fn good_command_lines() {
        let a = check_common::<BackendConfig>("path=/i,socket=/s");
        assert_eq!(a.backend, BackendConfig::new("/i", "/s"));
        let a: Args = run(&["--block-backend=path=/i,socket=/s,num_queues=2"]);
        assert_eq!(a.backend.num_queues, 2);
    }

    #[test]
    fn bad_command_lines() {
        assert_eq!(
            parse::<BackendConfig>(&["--block-backend", "path=a"]).unwrap_err(),
            CliError::Backend(ConfigError::Missing("socket"))
        );
        let e = parse::<BackendConfig>(&["--block-backend", "path=a,socket=b,num_queues=0"])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--block-backend: num_queues=0: expected a number in 1..=64"
        );
        assert!(!e.to_string().contains('\n'));
        assert_eq!(
            parse::<BackendConfig>(&[]).unwrap_err().to_string(),
            "--block-backend is required (try --help)"
        );
    }

    #[test]
    fn usage_lists_every_key() {
        let text = usage("vhost_user_block");
        assert!(
            text.starts_with("vhost_user_block: vhost-user-blk backend serving a raw disk image\n")
        );
        assert!(text.contains("--block-backend keys:\n"));
    }
}
