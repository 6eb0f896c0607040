//! System-call filters, one per [`ThreadClass`] (seccomp, built with rust-vmm's seccompiler).
//!
//! A program describes what each class of its threads may do ([`Rule`]s) once, at start
//! ([`install`]); from then on every thread started with [`crate::spawn`] applies its class's
//! filter before it runs anything, and the main thread applies its own with [`apply`]. A filter
//! is inherited by the threads a thread starts and stacks with theirs, so a class's rules must
//! also cover what the threads it starts do before they apply their own (the thread start).
//!
//! With [`SeccompMode::Trap`] (the default) a forbidden system call raises SIGSYS, whose handler
//! writes one line naming the thread, its class and the call to standard error and ends the
//! process with status [`FORBIDDEN_EXIT_CODE`]; with [`SeccompMode::Log`] the kernel logs the call
//! (audit) and lets it through; [`SeccompMode::Off`] installs nothing.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::ThreadClass;

/// The exit status of a process ended by a forbidden system call.
pub const FORBIDDEN_EXIT_CODE: i32 = 159;

/// Errors setting filters up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `--seccomp` has a value other than true, false or log.
    #[error("--seccomp: '{0}' is not true, false or log")]
    Mode(String),
    /// A class's rules do not make a filter.
    #[error("the system call filter of {class} threads")]
    Build {
        /// The class.
        class: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// Filters were installed twice.
    #[error("system call filters are already installed")]
    Twice,
    /// No filter was given for a class a thread belongs to.
    #[error("no system call filter for {0} threads")]
    Missing(&'static str),
    /// The kernel refused a filter.
    #[error("cannot apply the system call filter of {class} threads")]
    Apply {
        /// The class.
        class: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// What a forbidden system call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filters (`--seccomp false`).
    Off,
    /// The kernel logs forbidden calls and lets them through (`--seccomp log`).
    Log,
    /// A forbidden call ends the process with a line naming it (`--seccomp true`, the default).
    Trap,
}

impl SeccompMode {
    /// Parses `--seccomp`'s value (Cloud Hypervisor's: `true`, `false`, `log`).
    pub fn parse(value: &str) -> Result<Self, SeccompError> {
        match value {
            "true" => Ok(Self::Trap),
            "false" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            other => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

/// One thing a class of threads may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The system call, with any arguments.
    Allow(i64),
    /// `ioctl` with one of these requests (compared on the low 32 bits, as the kernel does).
    Ioctl(Vec<u64>),
    /// The system call when argument `arg` (0-based) is one of `values`.
    ArgIn {
        /// System call number.
        nr: i64,
        /// Argument index.
        arg: u8,
        /// Allowed values.
        values: Vec<u64>,
    },
}

/// What every thread may do whatever its class: report a forbidden call and end, return from a
/// signal handler, and add filters (a thread it starts applies its own under this one; adding
/// a filter can only take rights away).
pub const BASE: &[i64] = &[
    libc::SYS_write,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_seccomp,
];

/// What every thread does to live and end: memory for its stack and allocations (`brk` when
/// malloc falls back to the main arena), futexes, its random hash keys, yielding, the clock
/// (when the vDSO cannot answer), a call restarted after a stop, and its exit (the alternate
/// signal stack Rust gives it is taken down, signals are blocked). [`BASE`] (`write`, `exit`,
/// ...) is in every filter anyway.
pub const THREAD: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
];

struct Installed {
    mode: SeccompMode,
    filters: HashMap<ThreadClass, BpfProgram>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

thread_local! {
    /// The thread's name (its first 48 bytes) and class, for the SIGSYS handler (which may
    /// not allocate).
    static IDENTITY: Cell<([u8; 48], usize, &'static str)> = const { Cell::new(([0; 48], 0, "")) };
}

fn condition(
    arg: u8,
    value: u64,
    len: SeccompCmpArgLen,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value)
}

/// The filter program for `rules`.
fn build(
    class: ThreadClass,
    rules: &[Rule],
    mode: SeccompMode,
) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build {
        class: class.as_str(),
        source,
    };
    // A system call allowed outright stays so whatever conditions other rules add for it.
    let mut unconditional: std::collections::BTreeSet<i64> = BASE.iter().copied().collect();
    let mut conditional: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in rules {
        match rule {
            Rule::Allow(nr) => {
                unconditional.insert(*nr);
            }
            Rule::Ioctl(requests) => {
                let entry = conditional.entry(libc::SYS_ioctl).or_default();
                for r in requests {
                    let c = condition(1, r & 0xffff_ffff, SeccompCmpArgLen::Dword).map_err(err)?;
                    entry.push(SeccompRule::new(vec![c]).map_err(err)?);
                }
            }
            Rule::ArgIn { nr, arg, values } => {
                let entry = conditional.entry(*nr).or_default();
                for v in values {
                    let c = condition(*arg, *v, SeccompCmpArgLen::Qword).map_err(err)?;
                    entry.push(SeccompRule::new(vec![c]).map_err(err)?);
                }
            }
        }
    }
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = conditional
        .into_iter()
        .filter(|(nr, _)| !unconditional.contains(nr))
        .collect();
    for nr in unconditional {
        map.insert(nr, Vec::new());
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Trap | SeccompMode::Off => SeccompAction::Trap,
    };
    let filter =
        SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    filter.try_into().map_err(err)
}

/// The system calls `rules` allow in some form (with any arguments, or some), the ones every
/// class may make included: what docs/security.md counts per class.
pub fn allowed(rules: &[Rule]) -> std::collections::BTreeSet<i64> {
    let mut calls: std::collections::BTreeSet<i64> = BASE.iter().copied().collect();
    for rule in rules {
        calls.insert(match rule {
            Rule::Allow(nr) | Rule::ArgIn { nr, .. } => *nr,
            Rule::Ioctl(_) => libc::SYS_ioctl,
        });
    }
    calls
}

/// The ioctl requests `rules` allow.
pub fn allowed_ioctls(rules: &[Rule]) -> std::collections::BTreeSet<u64> {
    rules
        .iter()
        .filter_map(|r| match r {
            Rule::Ioctl(requests) => Some(requests.iter().map(|r| r & 0xffff_ffff)),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Compiles the filter of every class in `rules` and, unless `mode` is off, installs the SIGSYS
/// handler and keeps malloc from trimming thread heaps ([`keep_thread_heaps`]); threads started
/// from now on are filtered. Call once, before starting threads.
pub fn install(
    mode: SeccompMode,
    rules: impl IntoIterator<Item = (ThreadClass, Vec<Rule>)>,
) -> Result<(), SeccompError> {
    let mut filters = HashMap::new();
    if mode != SeccompMode::Off {
        for (class, class_rules) in rules {
            filters.insert(class, build(class, &class_rules, mode)?);
        }
        install_handler()?;
        keep_thread_heaps();
    }
    INSTALLED
        .set(Installed { mode, filters })
        .map_err(|_| SeccompError::Twice)
}

/// Stops glibc's malloc from trimming its heaps. The first time it would shrink the heap of a
/// per-thread arena (memory freed in an arena of a filtered thread, or by another thread), glibc
/// opens `/proc/sys/vm/overcommit_memory` to learn how, which no filtered thread may: the
/// process died with exit status 159 depending on its allocation pattern (seen in the daemons at
/// the end of a connection, and in the VMM's vsock thread). With the trim threshold at its
/// maximum no heap top is trimmed (the main arena's neither); a heap that becomes wholly free is
/// still unmapped, and large blocks are still mapped and unmapped on their own. The heaps of the
/// VMM and the daemons are small and steady.
fn keep_thread_heaps() {
    // SAFETY: mallopt only sets a malloc parameter.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } != 1 {
        log::warn!(
            "cannot set malloc's trim threshold: a thread's heap may be shrunk under the filters"
        );
    }
}

/// The mode installed (off before [`install`]).
pub fn mode() -> SeccompMode {
    INSTALLED.get().map_or(SeccompMode::Off, |i| i.mode)
}

/// Applies `class`'s filter to the calling thread, called `name` in the SIGSYS message. Does
/// nothing when filters are off or not installed.
pub fn apply(class: ThreadClass, name: &str) -> Result<(), SeccompError> {
    let Some(installed) = INSTALLED.get() else {
        return Ok(());
    };
    if installed.mode == SeccompMode::Off {
        return Ok(());
    }
    remember_identity(class, name);
    let program = installed
        .filters
        .get(&class)
        .ok_or(SeccompError::Missing(class.as_str()))?;
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
        class: class.as_str(),
        source,
    })
}

fn remember_identity(class: ThreadClass, name: &str) {
    let mut buf = [0u8; 48];
    let len = name.len().min(buf.len());
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    IDENTITY.with(|id| id.set((buf, len, class.as_str())));
}

/// Names of the system calls worth naming in the SIGSYS line (others are given by number).
const NAMES: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_close, "close"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_getppid, "getppid"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_preadv, "preadv"),
    (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_newfstatat, "newfstatat"),
];

fn syscall_name(nr: i64) -> &'static str {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("see the x86_64 system call table", |(_, name)| name)
}

/// Writes `parts` to standard error with plain `write` calls (async-signal-safe).
/// The parts go out in one `write` (up to 256 bytes, the rest cut), so that the lines of threads
/// failing at the same time do not interleave.
fn write_stderr(parts: &[&[u8]]) {
    let mut line = [0u8; 256];
    let mut len = 0;
    for p in parts {
        let n = p.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&p[..n]);
        len += n;
    }
    // SAFETY: writing a valid buffer to descriptor 2; a failure is ignored.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
}

/// Formats `n` in decimal into `buf` without allocating; returns the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SIGSYS's siginfo carries the call number after the call address (x86_64 layout:
    // signo, errno, code, padding, then `_sigsys { void *call_addr; int syscall; u32 arch; }`).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel hands a valid siginfo_t; offset 24 lies inside it.
        unsafe { *(info.cast::<u8>().add(24).cast::<libc::c_int>()) }
    };
    let (name, len, class) = IDENTITY.with(Cell::get);
    // A thread that has not applied its own filter yet runs under its parent's.
    let (name, class): (&[u8], &str) = if class.is_empty() {
        (b"?", "starting, under its parent's filter")
    } else {
        (&name[..len], class)
    };
    let mut digits = [0u8; 20];
    let number = decimal(u64::from(nr.unsigned_abs()), &mut digits);
    write_stderr(&[
        b"nimbus: seccomp: thread ",
        name,
        b" (",
        class.as_bytes(),
        b") made a forbidden system call ",
        number,
        b" (",
        syscall_name(i64::from(nr)).as_bytes(),
        b"); ending the process\n",
    ]);
    // SAFETY: ends the process at once; nothing else is touched.
    unsafe { libc::_exit(FORBIDDEN_EXIT_CODE) };
}

fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid start; the handler only writes to stderr and exits,
    // both async-signal-safe; the result is checked.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_cloud_hypervisors() {
        assert_eq!(SeccompMode::parse("true").ok(), Some(SeccompMode::Trap));
        assert_eq!(SeccompMode::parse("false").ok(), Some(SeccompMode::Off));
        assert_eq!(SeccompMode::parse("log").ok(), Some(SeccompMode::Log));
        assert!(SeccompMode::parse("yes").is_err());
    }

    #[test]
    fn decimal_formats_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), b"0");
        assert_eq!(decimal(159, &mut buf), b"159");
        assert_eq!(decimal(u64::MAX, &mut buf), b"18446744073709551615");
    }

    #[test]
    fn rules_compile_into_filters() {
        let rules = vec![
            Rule::Allow(libc::SYS_read),
            Rule::Ioctl(vec![0xae80, 0x4008_ae8a]),
            Rule::ArgIn {
                nr: libc::SYS_fcntl,
                arg: 1,
                values: vec![libc::F_GETFL as u64],
            },
        ];
        let program = build(ThreadClass::Vcpu, &rules, SeccompMode::Trap).expect("filter");
        assert!(!program.is_empty());
    }
}
