//! `nimbus`: parse the command line, open KVM, run the VM; exit 0 when the guest powers off.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use hypervisor::kvm::{KvmHypervisor, KVM_DEVICE};
use vmm::cli::{version_line, Cli};

fn fail(message: &str) -> ExitCode {
    eprintln!("nimbus: error: {message}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let start = Instant::now();
    let argv0 = std::env::args().next().unwrap_or_default();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line without its "error: " prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    if cli.version {
        println!("{}", version_line(&argv0));
        return ExitCode::SUCCESS;
    }
    let log_out: Box<dyn Write + Send> = match &cli.log_file {
        Some(path) => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => Box::new(f),
            Err(e) => return fail(&format!("cannot open log file {}: {e}", path.display())),
        },
        None => Box::new(std::io::stderr()),
    };
    nimbus_log::init(start, cli.verbose, log_out);

    let config = match cli.vm_config() {
        Ok(c) => c,
        Err(e) => return fail(&nimbus_log::error_chain(&e)),
    };
    if let Err(e) = config.validate() {
        return fail(&nimbus_log::error_chain(&e));
    }
    let hv = match KvmHypervisor::open(KVM_DEVICE) {
        Ok(hv) => hv,
        Err(e) => return fail(&nimbus_log::error_chain(&e)),
    };
    let tty = vm_config::ConsoleOutputMode::Tty;
    let _terminal = (config.serial.mode == tty || config.console.mode == tty)
        .then(vmm::serial_input::TerminalGuard::raw_stdin);
    match vmm::vm::run(&hv, &config, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.log_file.is_some() {
                log::error!("{}", nimbus_log::error_chain(&e));
            }
            fail(&nimbus_log::error_chain(&e))
        }
    }
}
