//! The binaries' `main`: command line, logger, termination signals, exit status
//! ([`main`]).
//!
//! Exit status 0 after the frontend disconnects (or, with `--keep-running`, on SIGTERM/SIGINT),
//! 1 with one error line on stderr otherwise.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::cli::{parse_args, usage, BackendOption, Command};
use crate::socket::Terminator;

/// What a binary tells [`main`] about itself.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The program name, in the help text and error lines.
    pub name: &'static str,
    /// Its version (`env!("CARGO_PKG_VERSION")`).
    pub version: &'static str,
    /// Name of the thread taking the termination signals.
    pub signal_thread: &'static str,
}

fn init_logger(verbose: u8) {
    nimbus_log::init(Instant::now(), verbose, Box::new(std::io::stderr()));
}

fn fail(program: &str, message: &str) -> ExitCode {
    eprintln!("{program}: error: {message}");
    ExitCode::FAILURE
}

/// A daemon binary's `main`: parses the command line (help, version), sets up the logger and the
/// termination signals, and calls `run` with the backend option, `--keep-running` and the
/// terminator. Any error is one line on stderr and exit status 1.
pub fn main<C, E>(
    program: Program,
    run: impl FnOnce(&C, bool, &Terminator) -> Result<(), E>,
) -> ExitCode
where
    C: BackendOption,
    E: std::error::Error,
{
    let name = program.name;
    let args = match parse_args::<C, _>(std::env::args_os().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            print!("{}", usage::<C>(name));
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("{name} {}", program.version);
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(name, &e.to_string()),
    };
    init_logger(args.verbose);
    // Before any thread exists, so that every thread inherits the mask.
    if let Err(e) = nimbus_thread::block_termination_signals() {
        return fail(name, &format!("cannot block termination signals: {e}"));
    }
    nimbus_thread::enter(nimbus_thread::ThreadClass::Main, "main");
    let terminator = match Terminator::new() {
        Ok(t) => Arc::new(t),
        Err(e) => return fail(name, &format!("cannot create the termination eventfd: {e}")),
    };
    let for_signals = terminator.clone();
    let on_signal = move |signal| {
        log::info!("signal {signal}: terminating");
        for_signals.request();
    };
    if let Err(e) = nimbus_thread::spawn_signal_thread(program.signal_thread, on_signal) {
        return fail(name, &format!("cannot start the signal thread: {e}"));
    }
    match run(&args.backend, args.keep_running, &terminator) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(name, &nimbus_log::error_chain(&e)),
    }
}
