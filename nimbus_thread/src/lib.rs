//! The one way Nimbus starts a thread: every thread of the VMM and of the vhost-user daemons
//! goes through [`spawn`] (or [`spawn_scoped`]) with its name and its [`ThreadClass`], so what
//! each class of thread may do (its sandbox filter) is decided in one place.
#![deny(missing_docs)]

use std::io;
use std::thread::{Builder, JoinHandle, Scope, ScopedJoinHandle};

/// What a thread does; each class gets the same rules wherever it is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadClass {
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
    /// A vhost-user daemon's worker.
    DaemonWorker,
}

impl ThreadClass {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Api => "api",
            Self::Signal => "signal",
            Self::DeviceWorker => "device worker",
            Self::VhostUserRelay => "vhost-user relay",
            Self::VhostUserDeadline => "vhost-user deadline",
            Self::ConsoleInput => "console input",
            Self::DaemonWorker => "daemon worker",
        }
    }
}

/// Starts `f` on a new thread called `name`.
pub fn spawn<F, T>(class: ThreadClass, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    log::trace!("starting thread {name} ({})", class.as_str());
    Builder::new().name(name).spawn(f)
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
    Builder::new().name(name).spawn_scoped(scope, f)
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
