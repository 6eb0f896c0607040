//! The binaries' `main`: command line, logger, termination signals, system call filters, exit
//! status ([`main`]).
//!
//! A daemon starts in two steps: [`main`] calls the daemon's `start` with the rights of a
//! process that has just started (open the disk or TAP, bind the socket), then installs the
//! system call filters ([`crate::seccomp`], `--seccomp`) and applies the main thread's, starts
//! the signal thread (filtered too), and lets the started daemon ([`Started`]) serve.
//! SIGTERM/SIGINT are blocked from the start: one that comes before the signal thread runs
//! waits for it.
//!
//! Exit status 0 after the frontend disconnects (or, with `--keep-running`, on SIGTERM/SIGINT),
//! [`FORBIDDEN_EXIT_CODE`] after a forbidden system call (one line on stderr names the thread and
//! the call), 1 with one error line on stderr otherwise.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use nimbus_thread::seccomp::SeccompMode;
pub use nimbus_thread::seccomp::FORBIDDEN_EXIT_CODE;

use crate::cli::{parse_args, usage, BackendOption, Command};
use crate::seccomp::{rules, DeviceRules};
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

/// A daemon that has opened what it serves and its socket, ready to serve under its system
/// call filters.
pub trait Started {
    /// What stops it.
    type Error: std::error::Error;

    /// What its device adds to the system calls every daemon's threads may make.
    fn seccomp_rules(&self) -> DeviceRules;

    /// The file-system access it still needs once started (`--landlock`): everything it uses
    /// is open by then, so at most removing its socket at exit.
    fn landlock_rules(&self) -> Vec<nimbus_landlock::PathRule>;

    /// Serves frontends until the first one disconnects (or, with `--keep-running`, until
    /// `terminator` fires).
    ///
    /// # Errors
    ///
    /// The daemon's own.
    fn serve(self, terminator: &Terminator) -> Result<(), Self::Error>;
}

fn init_logger(verbose: u8) {
    nimbus_log::init(Instant::now(), verbose, Box::new(std::io::stderr()));
}

fn fail(program: &str, message: &str) -> ExitCode {
    eprintln!("{program}: error: {message}");
    ExitCode::FAILURE
}

fn mode_name(mode: SeccompMode) -> &'static str {
    match mode {
        SeccompMode::Trap => "true",
        SeccompMode::Log => "log",
        SeccompMode::Off => "false",
    }
}

/// A daemon binary's `main`: parses the command line (help, version), sets up the logger and
/// the termination signals, calls `start` with the backend option and `--keep-running`, installs
/// the system call filters, and serves. Any error is one line on stderr and exit status 1.
pub fn main<C, S>(program: Program, start: impl FnOnce(&C, bool) -> Result<S, S::Error>) -> ExitCode
where
    C: BackendOption,
    S: Started,
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
    let terminator = match Terminator::new() {
        Ok(t) => Arc::new(t),
        Err(e) => return fail(name, &format!("cannot create the termination eventfd: {e}")),
    };
    let started = match start(&args.backend, args.keep_running) {
        Ok(s) => s,
        Err(e) => return fail(name, &nimbus_log::error_chain(&e)),
    };
    // What the threads need once filtered: the SIGBUS handler for guest memory the frontend
    // shrinks, and what an eventfd looks like (to check the frontend's).
    if let Err(e) = crate::fault::install() {
        return fail(name, &format!("cannot install the SIGBUS handler: {e}"));
    }
    crate::vring::init();
    if args.landlock {
        match nimbus_landlock::restrict(&started.landlock_rules()) {
            Ok(e) if e.full => {}
            Ok(_) => log::warn!("landlock: this kernel enforces only some of the rules"),
            Err(e) => return fail(name, &nimbus_log::error_chain(&e)),
        }
    }
    // Every thread from here on is filtered, this one included.
    if let Err(e) = nimbus_thread::seccomp::install(args.seccomp, rules(started.seccomp_rules())) {
        return fail(name, &nimbus_log::error_chain(&e));
    }
    nimbus_thread::enter(nimbus_thread::ThreadClass::Main, "main");
    log::info!("system call filters: {}", mode_name(args.seccomp));
    let for_signals = terminator.clone();
    let on_signal = move |signal| {
        log::info!("signal {signal}: terminating");
        for_signals.request();
    };
    if let Err(e) = nimbus_thread::spawn_signal_thread(program.signal_thread, on_signal) {
        return fail(name, &format!("cannot start the signal thread: {e}"));
    }
    match started.serve(&terminator) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(name, &nimbus_log::error_chain(&e)),
    }
}
