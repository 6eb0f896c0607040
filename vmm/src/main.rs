//! `nimbus`: parse the command line, start the VMM's command loop, serve the API if asked,
//! boot the VM the command line describes; exit 0 when the guest powers off, on
//! `vmm.shutdown` or on SIGTERM/SIGINT, 1 when the VM fails.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use hypervisor::kvm::{KvmHypervisor, KVM_DEVICE};
use vmm::api::ApiRequest;
use vmm::cli::{version_line, Cli};
use vmm::controller::{Command, Outcome, Vmm};
use vmm::events::EventMonitor;
use vmm::fds::FdStore;

fn fail(message: &str) -> ExitCode {
    eprintln!("nimbus: error: {message}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let start = Instant::now();
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
        println!("{}", version_line());
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
    match run(&cli, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            if cli.log_file.is_some() {
                log::error!("{message}");
            }
            fail(&message)
        }
    }
}

fn run(cli: &Cli, start: Instant) -> Result<(), String> {
    let chain = |e: &dyn std::error::Error| nimbus_log::error_chain(e);
    let seccomp = cli.seccomp_mode().map_err(|e| chain(&e))?;
    let config = if cli.has_payload() {
        let config = cli.vm_config().map_err(|e| chain(&e))?;
        config.validate().map_err(|e| chain(&e))?;
        Some(config)
    } else {
        let stray = cli.vm_options_without_payload();
        if !stray.is_empty() {
            let verb = if stray.len() == 1 { "needs" } else { "need" };
            return Err(format!(
                "no kernel given: {} {verb} --kernel (without it, the VM is created with \
                 vm.create on --api-socket)",
                stray.join(", ")
            ));
        }
        if cli.api_socket.is_none() {
            return Err(
                "nothing to run: give --kernel (and the VM's options) or --api-socket".into(),
            );
        }
        None
    };
    // Before any thread starts, so every thread inherits the mask and the signal thread alone
    // takes them.
    nimbus_thread::block_termination_signals()
        .map_err(|e| format!("cannot block the termination signals: {e}"))?;
    // Every thread from here on is filtered, this one included.
    nimbus_thread::seccomp::install(seccomp, vmm::seccomp::rules()).map_err(|e| chain(&e))?;
    nimbus_thread::enter(nimbus_thread::ThreadClass::Main, "main");
    let hv = KvmHypervisor::open(KVM_DEVICE).map_err(|e| chain(&e))?;
    let mut fds = FdStore::default();
    for n in config.iter().flat_map(|c| c.net.iter().flatten()) {
        for &fd in n.fds.iter().flatten() {
            fds.claim_inherited(fd)
                .map_err(|e| format!("--net fd={fd}: {e}"))?;
        }
    }
    let events = match &cli.event_monitor {
        Some(option) => EventMonitor::open(option, start).map_err(|e| chain(&e))?,
        None => EventMonitor::none(start),
    };
    let mut vmm = Vmm::new(Arc::new(hv), fds, events, start);
    vmm.emit("vmm", "starting");
    let signals = vmm.sender();
    nimbus_thread::spawn_signal_thread("signal", move |signal| {
        let _ = signals.send(Command::Signal(signal));
    })
    .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    let api = match &cli.api_socket {
        Some(option) => Some(vmm::api::serve(option, vmm.sender()).map_err(|e| chain(&e))?),
        None => None,
    };
    if let Some(config) = config {
        for request in [ApiRequest::VmCreate(Box::new(config)), ApiRequest::VmBoot] {
            vmm.request(request)
                .map_err(|e| e.messages.get(1..).unwrap_or_default().join(": "))?;
        }
    }
    let outcome = vmm.run();
    // Answers already queued (vmm.shutdown's) are written before the socket goes.
    if let Some(api) = api {
        api.stop();
    }
    // Restores the terminal.
    drop(vmm);
    match outcome {
        Outcome::Done => Ok(()),
        Outcome::Failed(why) => Err(why),
    }
}
