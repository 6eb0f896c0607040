//! `vhost_user_block --block-backend path=...,socket=...`: serve a disk image over vhost-user.
//!
//! Exit status 0 after the frontend disconnects (or, with `--keep-running`, on SIGTERM/SIGINT),
//! 1 with one error line on stderr otherwise.

use std::process::ExitCode;

use vhost_user_daemon::program::{main as daemon_main, Program};

fn main() -> ExitCode {
    daemon_main(
        Program {
            name: "vhost_user_block",
            version: env!("CARGO_PKG_VERSION"),
            signal_thread: "vub-signals",
        },
        vhost_user_block::start,
    )
}
