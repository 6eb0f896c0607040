//! What `vhost_user_net`'s threads may call beyond every daemon's common rules
//! ([`vhost_user_daemon::seccomp`]): the workers' TAP I/O and the few TAP requests of a running
//! device.

use vhost_user_daemon::seccomp::Rule;
use vhost_user_daemon::DeviceRules;

/// The net daemon's additions. The TAP is created and configured (`TUNSETIFF`, addresses, MTU,
/// up) before the filters apply; afterwards the workers read and write packets and attach or
/// detach their TAP queue as the driver enables queue pairs (`TUNSETQUEUE`), and the protocol
/// thread sets the offloads the driver negotiated (`TUNSETOFFLOAD`). With `client` the main
/// thread connects to the VMM's socket (a Unix socket) when it serves.
pub fn rules(client: bool) -> DeviceRules {
    let worker = vec![
        Rule::Allow(libc::SYS_readv),
        Rule::Allow(libc::SYS_writev),
        Rule::Ioctl(vec![libc::TUNSETQUEUE]),
    ];
    let protocol = vec![Rule::Ioctl(vec![libc::TUNSETOFFLOAD])];
    let mut main = Vec::new();
    if client {
        main.push(Rule::ArgIn {
            nr: libc::SYS_socket,
            arg: 0,
            values: vec![libc::AF_UNIX as u64],
        });
        main.push(Rule::Allow(libc::SYS_connect));
    }
    DeviceRules {
        main,
        protocol,
        worker,
    }
}

#[cfg(test)]
mod tests {
    use vhost_user_daemon::seccomp::{summary, system_calls, ThreadClass};

    use super::*;

    #[test]
    fn only_a_client_connects_and_only_workers_move_packets() {
        for client in [false, true] {
            let all = vhost_user_daemon::seccomp::rules(rules(client));
            eprint!(
                "vhost_user_net{} system calls per class:\n{}",
                if client { " (client=on)" } else { "" },
                summary(&all)
            );
            for (class, class_rules) in &all {
                let calls = system_calls(class_rules);
                let main = *class == ThreadClass::Main;
                let data = main || *class == ThreadClass::DaemonWorker;
                assert_eq!(calls.contains(&libc::SYS_readv), data, "{}", class.as_str());
                assert_eq!(calls.contains(&libc::SYS_connect), main && client);
                assert_eq!(calls.contains(&libc::SYS_socket), main && client);
                let ioctl = data || *class == ThreadClass::DaemonProtocol;
                assert_eq!(
                    calls.contains(&libc::SYS_ioctl),
                    ioctl,
                    "{}",
                    class.as_str()
                );
            }
        }
    }
}
