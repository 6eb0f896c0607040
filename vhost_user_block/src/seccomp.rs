//! What `vhost_user_block`'s threads may call beyond every daemon's common rules
//! ([`vhost_user_daemon::seccomp`]): the workers' disk I/O.

use vhost_user_daemon::seccomp::Rule;
use vhost_user_daemon::DeviceRules;

/// The `fallocate` modes the disk uses: discard (`PUNCH_HOLE`) and write-zeroes
/// (`ZERO_RANGE`), both keeping the size.
const FALLOCATE_MODES: [i32; 2] = [
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
];

/// The block daemon's additions: the workers read and write the image (vectored straight to
/// guest memory, or through a bounce buffer), flush it, and discard or zero ranges of it. The
/// disk is opened before the filters apply; nothing else differs from the common rules.
pub fn rules() -> DeviceRules {
    let mut worker: Vec<Rule> = [
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
    ]
    .into_iter()
    .map(Rule::Allow)
    .collect();
    worker.push(Rule::ArgIn {
        nr: libc::SYS_fallocate,
        arg: 1,
        values: FALLOCATE_MODES.iter().map(|&m| m as u64).collect(),
    });
    DeviceRules {
        worker,
        ..DeviceRules::default()
    }
}

#[cfg(test)]
mod tests {
    use vhost_user_daemon::seccomp::{summary, system_calls, ThreadClass};

    use super::*;

    #[test]
    fn only_the_workers_touch_the_disk() {
        let all = vhost_user_daemon::seccomp::rules(rules());
        eprint!(
            "vhost_user_block system calls per class:\n{}",
            summary(&all)
        );
        for (class, class_rules) in &all {
            let calls = system_calls(class_rules);
            let disk = [libc::SYS_preadv, libc::SYS_pwritev, libc::SYS_fallocate];
            let expected = matches!(class, ThreadClass::Main | ThreadClass::DaemonWorker);
            for nr in disk {
                assert_eq!(calls.contains(&nr), expected, "{}: {nr}", class.as_str());
            }
            // No thread asks anything by ioctl once serving.
            assert!(!calls.contains(&libc::SYS_ioctl), "{}", class.as_str());
        }
    }
}
