//! The one way Nimbus starts a thread: every thread of the VMM and of the vhost-user daemons
//! goes through [`spawn`] (or [`spawn_scoped`]) with its name and its [`ThreadClass`], so what
//! each class of thread may do (its sandbox filter) is decided in one place.
#![deny(missing_docs)]

pub mod seccomp;

use std::io;
use std::thread::{Builder, JoinHandle, Scope, ScopedJoinHandle};

/// What a thread does; each class gets the same rules wherever it is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadClass {
    /// The program's main thread (the VMM's command loop, a daemon's main).
    Main,
    /// Runs guest code (`vcpu<N>`).
    Vcpu,
    /// Serves the REST API socket.
    Api,
    /// Waits for SIGTERM/SIGINT and turns them into commands.
    Signal,
    /// Serves a virtio device's queues (`_disk0`, `_net1`, ...).
    DeviceWorker,
    /// Relays a vhost-user backend's interrupts and watches its socket.
    VhostUserRelay,
    /// Bounds one exchange with a vhost-user backend.
    VhostUserDeadline,
    /// Copies the VMM's standard input to the guest's console.
    ConsoleInput,
    /// Relays a PTY or socket console: the guest's output out, the user's input in.
    ConsoleRelay,
    /// Serves a vsock device's queues and its host Unix sockets (`_vsock0`, ...).
    Vsock,
    /// A vhost-user daemon's worker: serves its queues.
    DaemonWorker,
    /// A vhost-user daemon's protocol thread: answers the frontend's messages.
    DaemonProtocol,
}

impl ThreadClass {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Api => "api",
            Self::Signal => "signal",
            Self::DeviceWorker => "device worker",
            Self::VhostUserRelay => "vhost-user relay",
            Self::VhostUserDeadline => "vhost-user deadline",
            Self::ConsoleInput => "console input",
            Self::ConsoleRelay => "console relay",
            Self::Vsock => "vsock",
            Self::DaemonWorker => "daemon worker",
            Self::DaemonProtocol => "daemon protocol",
        }
    }
}

/// Every class, for programs that list their filters.
pub const CLASSES: &[ThreadClass] = &[
    ThreadClass::Main,
    ThreadClass::Vcpu,
    ThreadClass::Api,
    ThreadClass::Signal,
    ThreadClass::DeviceWorker,
    ThreadClass::VhostUserRelay,
    ThreadClass::VhostUserDeadline,
    ThreadClass::ConsoleInput,
    ThreadClass::ConsoleRelay,
    ThreadClass::Vsock,
    ThreadClass::DaemonWorker,
    ThreadClass::DaemonProtocol,
];

/// Environment variable naming thread classes (comma-separated) whose threads make a forbidden
/// system call (acct) right after applying their filter: the self-test that proves the class
/// is filtered.
pub const SELF_TEST_ENV: &str = "NIMBUS_SECCOMP_SELF_TEST";

/// Environment variable naming a file to which every thread appends `pid tid class name` when
/// it starts: `scripts/seccomp-survey` joins it with `strace` output to list what each class
/// of thread really calls.
pub const SURVEY_ENV: &str = "NIMBUS_SECCOMP_SURVEY";

/// The survey's file ([`SURVEY_ENV`]), opened once by the first thread to enter (the main
/// thread, before any filter), so that the others only write to it.
fn survey_file() -> Option<&'static std::fs::File> {
    static SURVEY: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    SURVEY
        .get_or_init(|| {
            let path = std::env::var_os(SURVEY_ENV)?;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .ok()
        })
        .as_ref()
}

/// Applies `class`'s system-call filter to the calling thread (see [`seccomp`]); a thread that
/// cannot be filtered while filtering is on must not run, so that ends the process.
pub fn enter(class: ThreadClass, name: &str) {
    if let Some(mut survey) = survey_file() {
        use std::io::Write;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let line = format!(
            "{} {tid} {} {name}\n",
            std::process::id(),
            class.as_str().replace(' ', "-")
        );
        let _ = survey.write_all(line.as_bytes());
    }
    if let Err(e) = seccomp::apply(class, name) {
        let mut text = format!("nimbus: error: thread {name}: {e}");
        let mut next = std::error::Error::source(&e);
        while let Some(cause) = next {
            text.push_str(&format!(": {cause}"));
            next = cause.source();
        }
        eprintln!("{text}");
        std::process::exit(1);
    }
    if std::env::var(SELF_TEST_ENV).is_ok_and(|v| v.split(',').any(|c| c == class.as_str())) {
        // acct(2) is in no class's rules.
        // SAFETY: a system call with a null path; the filter stops it before the kernel runs it.
        unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) };
    }
}

/// Starts `f` on a new thread called `name`, filtered as `class`.
pub fn spawn<F, T>(class: ThreadClass, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    log::trace!("starting thread {name} ({})", class.as_str());
    let thread_name = name.clone();
    Builder::new().name(name).spawn(move || {
        enter(class, &thread_name);
        f()
    })
}

/// Starts `f` on a new thread called `name` inside `scope`.
pub fn spawn_scoped<'scope, 'env, F, T>(
    scope: &'scope Scope<'scope, 'env>,
    class: ThreadClass,
    name: impl Into<String>,
    f: F,
) -> io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    let name = name.into();
    log::trace!("starting thread {name} ({})", class.as_str());
    let thread_name = name.clone();
    Builder::new().name(name).spawn_scoped(scope, move || {
        enter(class, &thread_name);
        f()
    })
}

/// The termination signals (SIGTERM, SIGINT, SIGHUP), blocked in every thread and taken by
/// the thread of [`spawn_signal_thread`] with `sigwait`, so they never interrupt a worker.
fn termination_signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Blocks the termination signals in the calling thread and every thread it starts later:
/// call it before starting any thread.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_signals();
    // SAFETY: `set` is a valid signal set; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts the thread called `name` that waits for the (blocked) termination signals and calls
/// `on_signal` with each one's number.
pub fn spawn_signal_thread(
    name: &str,
    on_signal: impl Fn(i32) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    spawn(ThreadClass::Signal, name, move || {
        let set = termination_signals();
        loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` and `signal` are valid for the call; the signals are blocked in
            // every thread, so sigwait is the only consumer.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc != 0 {
                log::error!("sigwait failed: {}", io::Error::from_raw_os_error(rc));
                return;
            }
            on_signal(signal);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_carry_their_names() {
        let t = spawn(ThreadClass::DeviceWorker, "_disk0", || {
            std::thread::current().name().map(str::to_string)
        })
        .expect("spawn");
        assert_eq!(t.join().ok().flatten().as_deref(), Some("_disk0"));
        let name = std::thread::scope(|s| {
            spawn_scoped(s, ThreadClass::VhostUserDeadline, "deadline", || {
                std::thread::current().name().map(str::to_string)
            })
            .expect("spawn")
            .join()
            .ok()
            .flatten()
        });
        assert_eq!(name.as_deref(), Some("deadline"));
    }
}
