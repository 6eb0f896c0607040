//! The daemons' system-call filters (seccomp): what each class of a daemon's threads may call,
//! and the backend wrapper ([`Filtered`]) through which the threads the `vhost-user-backend`
//! crate starts apply their class's filter.
//!
//! A daemon's threads (docs/security.md):
//!
//! - `main` ([`ThreadClass::Main`]): opens the disk or TAP and binds the socket *before* its
//!   filter is applied ([`crate::program`]), then only accepts frontends, starts and joins each
//!   connection's threads, and removes the socket;
//! - the signal thread ([`ThreadClass::Signal`]): waits for SIGTERM/SIGINT and wakes the main
//!   thread or shuts the connection down;
//! - the protocol thread ([`ThreadClass::DaemonProtocol`], started by the crate per connection):
//!   answers the frontend's messages (maps the memory it sends, sets the rings up);
//! - the workers ([`ThreadClass::DaemonWorker`], started by the crate per connection, named
//!   [`WORKER_THREAD`]): serve the queues.
//!
//! Filters stack: a thread runs under the filter of the thread that started it as well as its
//! own, so the main thread's rules include every other class's. The crate starts its threads
//! with `std::thread`, not through `nimbus_thread::spawn`; each applies its class's filter at
//! its first call into the backend (through [`Filtered`]): a worker at its first event, the
//! protocol thread at the first message that reaches the backend. Until then it runs under the
//! main thread's filter.
//!
//! Found with `scripts/seccomp-survey` (the daemons' own tests and the end-to-end tests under
//! `strace`) and kept as narrow as the code allows; each daemon adds what its device needs
//! ([`DeviceRules`]).

use std::cell::Cell;
use std::fs::File;
use std::io::Result;
use std::sync::Arc;

pub use nimbus_thread::seccomp::{Rule, SeccompMode, BASE, THREAD};
pub use nimbus_thread::ThreadClass;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserShMemConfig, VhostUserSharedMsg,
};
use vhost::vhost_user::{Backend, GpuBackend};
use vhost_user_backend::VhostUserBackend;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

/// The name `vhost-user-backend` (0.24) gives its worker threads.
pub const WORKER_THREAD: &str = "vring_worker";

/// `fcntl(F_GETFD)`: a debug build checks a descriptor is open before it closes it.
fn fcntl(more: &[libc::c_int]) -> Rule {
    let mut values = vec![libc::F_GETFD as u64];
    values.extend(more.iter().map(|&c| c as u64));
    Rule::ArgIn {
        nr: libc::SYS_fcntl,
        arg: 1,
        values,
    }
}

/// What a daemon's device adds to the common rules of each class: its disk or TAP I/O, its
/// ioctls, a client connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRules {
    /// For the main thread's own work (the rules of the other classes are added to it anyway).
    pub main: Vec<Rule>,
    /// For the protocol thread (messages that reach the device: features, memory).
    pub protocol: Vec<Rule>,
    /// For the workers (the data path).
    pub worker: Vec<Rule>,
}

fn allow(lists: &[&[i64]]) -> Vec<Rule> {
    lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|&nr| Rule::Allow(nr))
        .collect()
}

/// The signal thread: waits for the termination signals, logs, and wakes the main thread
/// (eventfd) or shuts the frontend connection down.
fn signal_rules() -> Vec<Rule> {
    allow(&[THREAD, &[libc::SYS_rt_sigtimedwait, libc::SYS_shutdown]])
}

/// The protocol thread: messages (with descriptors) on the connection, guest memory mapped
/// from the frontend's descriptors (each region checked against its file's size, `statx`) and
/// unmapped when replaced, the rings' kick and call descriptors checked to be eventfds (`statx`)
/// and made non-blocking (`fcntl`), kick descriptors added to and removed from the workers'
/// epoll and the workers woken, the connection shut down at its end (or when the daemon drops
/// it).
fn protocol_rules() -> Vec<Rule> {
    let mut rules = allow(&[
        THREAD,
        &[
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_epoll_ctl,
            libc::SYS_close,
            libc::SYS_shutdown,
            libc::SYS_statx,
        ],
    ]);
    rules.push(fcntl(&[libc::F_GETFL, libc::F_SETFL]));
    rules
}

/// A worker: waits on its epoll, reads its kicks, writes its calls; may drop the last user of
/// guest memory replaced meanwhile (unmap, close); shuts the connection down when it finds
/// guest memory gone or its kick unreadable (`crate::serve::drop_connection`).
fn worker_rules() -> Vec<Rule> {
    let mut rules = allow(&[
        THREAD,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_read,
            libc::SYS_close,
            libc::SYS_shutdown,
        ],
    ]);
    rules.push(fcntl(&[]));
    rules
}

/// The main thread's own work once serving: waiting for and accepting a frontend, starting each
/// connection's threads (which name themselves and apply their filters under this one) with
/// their exit events and epolls, joining them and reclaiming the exit events the crate leaks
/// (`crate::exit`: `kcmp` of our own descriptors), removing the socket (checked to be ours).
fn main_rules() -> Vec<Rule> {
    let mut rules = allow(&[
        THREAD,
        &[
            libc::SYS_poll,
            libc::SYS_accept4,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_gettid,
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_close,
            libc::SYS_getpid,
            libc::SYS_statx,
            libc::SYS_unlink,
        ],
    ]);
    rules.push(fcntl(&[libc::F_DUPFD_CLOEXEC]));
    rules.push(Rule::ArgIn {
        nr: libc::SYS_prctl,
        arg: 0,
        values: vec![libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
    });
    // glibc installs the handlers of its internal signals when the first thread starts.
    rules.push(Rule::ArgIn {
        nr: libc::SYS_rt_sigaction,
        arg: 0,
        values: GLIBC_SIGNALS.to_vec(),
    });
    rules.push(Rule::ArgIn {
        nr: libc::SYS_kcmp,
        arg: 2,
        values: vec![KCMP_FILE],
    });
    rules
}

/// glibc's internal signals, the kernel's first two real-time signals (`SIGCANCEL`,
/// `SIGSETXID`; `libc::SIGRTMIN()` is the first one glibc leaves to programs).
const GLIBC_SIGNALS: [u64; 2] = [32, 33];

/// `KCMP_FILE` from `<linux/kcmp.h>`.
const KCMP_FILE: u64 = 0;

/// The rules of every class of a daemon's threads, with `device`'s additions.
pub fn rules(device: DeviceRules) -> Vec<(ThreadClass, Vec<Rule>)> {
    let DeviceRules {
        main: device_main,
        protocol: device_protocol,
        worker: device_worker,
    } = device;
    let signal = signal_rules();
    let mut protocol = protocol_rules();
    protocol.extend(device_protocol);
    let mut worker = worker_rules();
    worker.extend(device_worker);
    let mut main = main_rules();
    main.extend(device_main);
    // Every other thread starts under the main thread's filter.
    for rules in [&signal, &protocol, &worker] {
        main.extend(rules.iter().cloned());
    }
    vec![
        (ThreadClass::Main, main),
        (ThreadClass::Signal, signal),
        (ThreadClass::DaemonProtocol, protocol),
        (ThreadClass::DaemonWorker, worker),
    ]
}

thread_local! {
    /// Whether the calling thread applied its class's filter through [`Filtered`].
    static ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Applies `class`'s filter to the calling thread if it is the crate's thread called `name` and
/// has not applied one yet. Any other thread (the main thread, which the crate calls the backend
/// from too, or a test's) is left alone.
fn enter_once(class: ThreadClass, name: &str) {
    if ENTERED.get() {
        return;
    }
    if std::thread::current().name() != Some(name) {
        return;
    }
    ENTERED.set(true);
    nimbus_thread::enter(class, name);
    let state = match nimbus_thread::seccomp::mode() {
        SeccompMode::Off => "off",
        SeccompMode::Log | SeccompMode::Trap => "applied",
    };
    log::debug!(
        "thread {name} ({}): system call filter {state}",
        class.as_str()
    );
}

/// A backend as the crate's threads call it: each call first makes the calling thread apply its
/// class's filter (once), the protocol thread (`protocol_thread`) as
/// [`ThreadClass::DaemonProtocol`] and the workers ([`WORKER_THREAD`], the only callers of
/// [`handle_event`](VhostUserBackend::handle_event)) as [`ThreadClass::DaemonWorker`]; then the
/// call goes to the backend.
///
/// Every method of [`VhostUserBackend`] is passed on, the defaulted ones too (a method left out
/// here would silently get the crate's default instead of the backend's).
pub struct Filtered<B> {
    backend: Arc<B>,
    protocol_thread: &'static str,
}

impl<B> Clone for Filtered<B> {
    fn clone(&self) -> Self {
        Filtered {
            backend: self.backend.clone(),
            protocol_thread: self.protocol_thread,
        }
    }
}

impl<B> std::fmt::Debug for Filtered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filtered")
            .field("protocol_thread", &self.protocol_thread)
            .finish_non_exhaustive()
    }
}

impl<B> Filtered<B> {
    /// `backend`, served by a protocol thread called `protocol_thread`.
    pub fn new(backend: Arc<B>, protocol_thread: &'static str) -> Self {
        Filtered {
            backend,
            protocol_thread,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    fn protocol(&self) -> &B {
        enter_once(ThreadClass::DaemonProtocol, self.protocol_thread);
        // The messages before this one may have touched guest memory that had vanished.
        crate::fault::check();
        &self.backend
    }
}

impl<B: VhostUserBackend> VhostUserBackend for Filtered<B> {
    type Bitmap = B::Bitmap;
    type Vring = B::Vring;

    fn num_queues(&self) -> usize {
        self.protocol().num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.protocol().max_queue_size()
    }

    fn features(&self) -> u64 {
        self.protocol().features()
    }

    fn acked_features(&self, features: u64) {
        self.protocol().acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol().protocol_features()
    }

    fn reset_device(&self) {
        self.protocol().reset_device();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.protocol().set_event_idx(enabled);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.protocol().get_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> Result<()> {
        self.protocol().set_config(offset, buf)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<B::Bitmap>>) -> Result<()> {
        self.protocol().update_memory(mem)
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        self.protocol().set_backend_req_fd(backend);
    }

    fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> Result<File> {
        self.protocol().get_shared_object(uuid)
    }

    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> Result<()> {
        self.protocol().set_gpu_socket(gpu_backend)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.protocol().queues_per_thread()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.protocol().exit_event(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> Result<()> {
        self.protocol().stop_vring(queue_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> Result<()> {
        enter_once(ThreadClass::DaemonWorker, WORKER_THREAD);
        let result = self
            .backend
            .handle_event(device_event, evset, vrings, thread_id);
        // Serving the rings may have touched guest memory that had vanished.
        crate::fault::check();
        result
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> Result<Option<File>> {
        self.protocol().set_device_state_fd(direction, phase, file)
    }

    fn check_device_state(&self) -> Result<()> {
        self.protocol().check_device_state()
    }

    fn get_shmem_config(&self) -> Result<VhostUserShMemConfig> {
        self.protocol().get_shmem_config()
    }
}

/// The system calls `rules` let through in some form (outright, or for some arguments), with
/// [`BASE`]. For docs/security.md's counts and the tests.
pub fn system_calls(rules: &[Rule]) -> std::collections::BTreeSet<i64> {
    rules
        .iter()
        .map(|r| match r {
            Rule::Allow(nr) | Rule::ArgIn { nr, .. } => *nr,
            Rule::Ioctl(_) => libc::SYS_ioctl,
        })
        .chain(BASE.iter().copied())
        .collect()
}

/// The `ioctl` requests `rules` allow.
pub fn ioctl_requests(rules: &[Rule]) -> std::collections::BTreeSet<u64> {
    rules
        .iter()
        .flat_map(|r| match r {
            Rule::Ioctl(requests) => requests.clone(),
            _ => Vec::new(),
        })
        .collect()
}

/// One line per class of `rules`: its name, how many system calls ([`system_calls`]) and
/// `ioctl` requests it allows.
pub fn summary(rules: &[(ThreadClass, Vec<Rule>)]) -> String {
    rules
        .iter()
        .map(|(class, r)| {
            format!(
                "{}: {} system calls, {} ioctl requests\n",
                class.as_str(),
                system_calls(r).len(),
                ioctl_requests(r).len()
            )
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A backend that answers what the tests ask and records nothing.
    struct Nothing;

    impl VhostUserBackend for Nothing {
        type Bitmap = ();
        type Vring = crate::Vring;

        fn num_queues(&self) -> usize {
            1
        }
        fn max_queue_size(&self) -> usize {
            256
        }
        fn features(&self) -> u64 {
            0x1234
        }
        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::MQ
        }
        fn set_event_idx(&self, _enabled: bool) {}
        fn update_memory(&self, _mem: crate::GuestMemory) -> Result<()> {
            Ok(())
        }
        fn queues_per_thread(&self) -> Vec<u64> {
            vec![0b1]
        }
        fn handle_event(
            &self,
            _device_event: u16,
            _evset: EventSet,
            _vrings: &[Self::Vring],
            _thread_id: usize,
        ) -> Result<()> {
            Ok(())
        }
    }

    /// Runs `f` on a thread called `name`; returns whether that thread applied a filter.
    fn entered_on(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                f();
                ENTERED.get()
            })
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn crate_threads_enter_their_class_by_name_only() {
        let filtered = Filtered::new(Arc::new(Nothing), "test-protocol");
        // The crate's other callers (the main thread) and foreign threads apply nothing.
        let f = filtered.clone();
        assert!(!entered_on("main", move || {
            assert_eq!(f.num_queues(), 1);
            assert_eq!(f.queues_per_thread(), vec![0b1]);
        }));
        let f = filtered.clone();
        assert!(!entered_on("test-protocol", move || {
            // A worker's call from a thread that is not a worker.
            f.handle_event(0, EventSet::IN, &[], 0).unwrap();
        }));
        let f = filtered.clone();
        assert!(entered_on("test-protocol", move || {
            assert_eq!(f.features(), 0x1234);
        }));
        let f = filtered.clone();
        assert!(entered_on(WORKER_THREAD, move || {
            f.handle_event(0, EventSet::IN, &[], 0).unwrap();
        }));
        // Calls go through whatever the thread.
        assert_eq!(filtered.protocol_features(), VhostUserProtocolFeatures::MQ);
        assert!(filtered.get_shmem_config().is_err(), "the crate's default");
    }

    #[test]
    fn every_class_fits_in_the_main_threads_filter() {
        let device = DeviceRules {
            main: vec![Rule::Allow(libc::SYS_connect)],
            protocol: vec![Rule::Ioctl(vec![1])],
            worker: vec![Rule::Allow(libc::SYS_preadv)],
        };
        let all = rules(device);
        let classes: Vec<ThreadClass> = all.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            classes,
            [
                ThreadClass::Main,
                ThreadClass::Signal,
                ThreadClass::DaemonProtocol,
                ThreadClass::DaemonWorker
            ]
        );
        let main = &all[0].1;
        for (class, class_rules) in &all[1..] {
            for rule in class_rules {
                assert!(main.contains(rule), "{}: {rule:?}", class.as_str());
            }
        }
        assert!(all[3].1.contains(&Rule::Allow(libc::SYS_preadv)));
        assert!(!all[2].1.contains(&Rule::Allow(libc::SYS_preadv)));
        assert!(all[2].1.contains(&Rule::Ioctl(vec![1])));
        // What only the main thread does.
        for nr in [
            libc::SYS_clone3,
            libc::SYS_accept4,
            libc::SYS_unlink,
            libc::SYS_kcmp,
        ] {
            assert!(system_calls(main).contains(&nr));
            for (class, class_rules) in &all[1..] {
                assert!(
                    !system_calls(class_rules).contains(&nr),
                    "{}",
                    class.as_str()
                );
            }
        }
        // No class opens files, executes programs or makes sockets of its own accord.
        for (class, class_rules) in &all {
            let calls = system_calls(class_rules);
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_socket,
            ] {
                assert!(!calls.contains(&nr), "{}: {nr}", class.as_str());
            }
        }
    }
}
