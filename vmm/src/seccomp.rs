//! What each class of the VMM's threads may call (docs/security.md lists the counts).
//!
//! Found with `scripts/seccomp-survey` (the end-to-end tests under `strace`) and kept as narrow
//! as the code allows: the vCPU threads run guest exits only (device activation and reset run
//! on the command loop's thread); device workers move data between guest memory and their
//! backends; the main thread builds and tears down VMs and is the widest. A filter stacks with
//! the filters of the thread that started the thread, so every class is a subset of the main
//! thread's.

use nimbus_thread::seccomp::{Rule, THREAD};
use nimbus_thread::ThreadClass;

/// What the main thread does besides: sleep, read its process id.
const MAIN_THREAD: &[i64] = &[
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
];

/// Starting threads (the main thread starts vCPUs and device workers; the relay starts the
/// deadline threads of its exchanges with a backend): a new thread names itself, reads its
/// id and sets up its thread-local state (`prctl`, `gettid`, `rseq`, `set_robust_list`) under
/// its parent's filter, before it applies its own.
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_prctl,
    libc::SYS_gettid,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
];

/// Waiting on many descriptors and on eventfds.
const EVENTS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

/// Talking on Unix sockets (the API, vhost-user backends).
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
];

/// Disk and TAP data: vectored and positioned reads and writes, flushes, discards.
const IO: &[i64] = &[
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
];

/// The TAP requests of a running net device (queue attach, offloads).
fn tap_data_ioctls() -> Vec<u64> {
    vec![
        libc::TUNSETQUEUE,
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
    ]
}

/// Everything the main thread asks by ioctl: KVM, TAP set-up, interface addresses, the
/// terminal, non-blocking sockets.
fn main_ioctls() -> Vec<u64> {
    let mut requests = hypervisor::kvm::ioctls::vmm_ioctls();
    requests.extend(tap_data_ioctls());
    requests.extend([
        libc::TUNSETIFF,
        libc::TUNGETIFF,
        libc::SIOCGIFFLAGS,
        libc::SIOCSIFFLAGS,
        libc::SIOCSIFADDR,
        libc::SIOCGIFADDR,
        libc::SIOCSIFNETMASK,
        libc::SIOCGIFNETMASK,
        libc::SIOCSIFHWADDR,
        libc::SIOCGIFHWADDR,
        libc::SIOCSIFMTU,
        libc::SIOCGIFMTU,
        libc::TCGETS,
        libc::TCSETS,
        // Allocating a pseudo-terminal for a `pty` console.
        libc::TIOCGPTN,
        libc::TIOCSPTLCK,
        libc::FIONBIO,
        libc::FIOCLEX,
    ]);
    requests
}

/// Making a descriptor non-blocking or close-on-exec by ioctl (what the standard library does).
fn nonblocking_ioctls() -> Vec<u64> {
    vec![libc::FIONBIO, libc::FIOCLEX]
}

/// `lists` allowed outright, plus what dropping a descriptor does in a debug build (Rust's
/// `OwnedFd` checks it is open with `fcntl(F_GETFD)` first).
fn allow(lists: &[&[i64]]) -> Vec<Rule> {
    let mut rules: Vec<Rule> = lists
        .iter()
        .flat_map(|l| l.iter())
        .map(|&nr| Rule::Allow(nr))
        .collect();
    rules.push(Rule::ArgIn {
        nr: libc::SYS_fcntl,
        arg: 1,
        values: vec![libc::F_GETFD as u64],
    });
    rules
}

/// The rules of every class of the VMM's threads.
pub fn rules() -> Vec<(ThreadClass, Vec<Rule>)> {
    let mut main = allow(&[THREAD, MAIN_THREAD, SPAWN, EVENTS, SOCKETS, IO]);
    main.extend(allow(&[&[
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_access,
        libc::SYS_newfstatat,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_ftruncate,
        libc::SYS_memfd_create,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_readlink,
        libc::SYS_getcwd,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_rt_sigaction,
        libc::SYS_tgkill,
        libc::SYS_prlimit64,
        libc::SYS_exit_group,
        libc::SYS_wait4,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_flock,
        // Pinning vCPU threads (--cpus affinity=).
        libc::SYS_sched_setaffinity,
        // --landlock, applied when a VM is created.
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_restrict_self,
    ]]));
    main.push(Rule::Ioctl(main_ioctls()));

    let mut vcpu = allow(&[
        THREAD,
        &[libc::SYS_write, libc::SYS_writev, libc::SYS_close],
    ]);
    // The kick signal's handler returns through rt_sigreturn (allowed everywhere).
    vcpu.push(Rule::Ioctl(hypervisor::kvm::ioctls::vcpu_ioctls()));

    let mut worker = allow(&[THREAD, EVENTS, IO]);
    worker.push(Rule::Ioctl(tap_data_ioctls()));

    let mut relay = allow(&[THREAD, SPAWN, EVENTS, SOCKETS]);
    relay.push(Rule::Ioctl(nonblocking_ioctls()));

    let deadline = allow(&[THREAD, &[libc::SYS_shutdown, libc::SYS_close]]);
    // The relay starts deadline threads: they run under its filter too.
    relay.extend(deadline.iter().cloned());
    // The server's epoll set and eventfds are made by the main thread; this one waits on them,
    // accepts, reads requests with their descriptors and writes answers.
    let mut api = allow(&[
        THREAD,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_close,
            libc::SYS_accept4,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
        ],
    ]);
    // Accepted connections are made non-blocking.
    api.push(Rule::Ioctl(nonblocking_ioctls()));
    // PTY and socket consoles: wait for output, a client or input; accept the client (made
    // non-blocking), read its input, write output, hang the replaced client up.
    let mut console_relay = allow(&[
        THREAD,
        &[
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_accept4,
            // The client's socket: std writes with send (MSG_NOSIGNAL), may read with recv.
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
            libc::SYS_close,
        ],
    ]);
    console_relay.push(Rule::Ioctl(nonblocking_ioctls()));
    // The vsock thread accepts host clients on the device's listening socket, connects to
    // `<socket>_<port>` for the guest (a socket it makes itself), peeks at `CONNECT` lines
    // and moves stream bytes; its epoll set, eventfd and timer come from the main thread.
    let mut vsock = allow(&[
        THREAD,
        EVENTS,
        &[
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
        ],
    ]);
    vsock.push(Rule::Ioctl(nonblocking_ioctls()));
    let others = vec![
        (ThreadClass::Vcpu, vcpu),
        (ThreadClass::Api, api),
        (
            ThreadClass::Signal,
            allow(&[THREAD, &[libc::SYS_rt_sigtimedwait]]),
        ),
        (ThreadClass::DeviceWorker, worker),
        (ThreadClass::VhostUserRelay, relay),
        (ThreadClass::VhostUserDeadline, deadline),
        (
            ThreadClass::ConsoleInput,
            allow(&[THREAD, &[libc::SYS_read]]),
        ),
        (ThreadClass::ConsoleRelay, console_relay),
        (ThreadClass::Vsock, vsock),
    ];
    // Every other thread is started by the main thread and runs under its filter as well as
    // its own: the main thread's rules cover theirs.
    for (_, rules) in &others {
        main.extend(rules.iter().cloned());
    }
    let mut all = vec![(ThreadClass::Main, main)];
    all.extend(others);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_thread::seccomp::{allowed, allowed_ioctls};

    /// The table of docs/security.md ("| `class` | calls | ioctls |" rows) matches the rules.
    #[test]
    fn docs_list_every_class_with_its_counts() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md");
        let docs = std::fs::read_to_string(&path).expect("docs/security.md");
        let mut problems = Vec::new();
        for (class, rules) in rules() {
            let calls = allowed(&rules).len();
            let ioctls = allowed_ioctls(&rules).len();
            let row = format!("| `{}` | {calls} | {ioctls} |", class.as_str());
            if !docs.contains(&row) {
                problems.push(row);
            }
        }
        assert!(
            problems.is_empty(),
            "docs/security.md lacks these rows (or has other counts):\n{}",
            problems.join("\n")
        );
    }
}
