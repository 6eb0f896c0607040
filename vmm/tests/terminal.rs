//! The terminal: with `--serial tty` on a terminal, Nimbus switches it to raw mode (keys go to
//! the guest at once, no echo) and puts it back when it exits — also when it is stopped with
//! Ctrl-C (SIGINT), which stops the guest and exits 0.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::require_kvm;

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");

fn termios(fd: i32) -> libc::termios {
    // SAFETY: a zeroed termios is a valid buffer for tcgetattr, which fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal; `t` is writable.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0, "tcgetattr");
    t
}

fn echo_and_canonical(fd: i32) -> (bool, bool) {
    let t = termios(fd);
    (t.c_lflag & libc::ECHO != 0, t.c_lflag & libc::ICANON != 0)
}

#[test]
fn ctrl_c_stops_the_vm_and_restores_the_terminal() {
    if !require_kvm("ctrl_c_stops_the_vm_and_restores_the_terminal") {
        return;
    }
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the name, termios and size pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    assert_eq!(echo_and_canonical(slave.as_raw_fd()), (true, true));
    let dir = e2e::ScratchDir::new("terminal");
    let mut child =
        e2e::lifecycle::lifecycle_command(NIMBUS, &dir, e2e::lifecycle::LIFECYCLE_CMDLINE)
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::null())
            .spawn()
            .expect("nimbus");
    // Drain the terminal all along, so the guest's output never blocks.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        let mut out = std::fs::File::from(master);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                if let Ok(mut s) = seen.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        })
    };
    let text = || seen.lock().map(|s| s.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text().contains("TICK ") {
        assert!(Instant::now() < deadline, "no tick: {}", text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        echo_and_canonical(slave.as_raw_fd()),
        (false, false),
        "the terminal is not in raw mode while the guest runs"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("Nimbus did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert_eq!(
        echo_and_canonical(slave.as_raw_fd()),
        (true, true),
        "the terminal was not restored"
    );
    drop(slave);
    let _ = reader.join();
}
