//! Failures: an error answer, an unreachable socket, bad arguments, descriptors that are not
//! open. Each exits 1 with one line on standard error (clap's usage errors exit 2).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use api_http::Response;
use common::{stderr, stdout, FakeVmm, BINARY};

#[test]
fn an_error_answer_exits_1_with_the_vmms_messages() {
    let messages = [
        "Error from API".to_string(),
        "The VM could not be paused".to_string(),
        "VM is not running".to_string(),
    ];
    let vmm = FakeVmm::replying(Response::error(500, &messages));
    let output = vmm.run(&["pause"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert_eq!(
        stderr(&output),
        "nimbus-remote: error: 500: Error from API: The VM could not be paused: VM is not running\n"
    );
    assert_eq!(vmm.only_request().path, "/api/v1/vm.pause");

    let vmm = FakeVmm::replying(Response::json(404, Vec::new()));
    let output = vmm.run(&["info"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output), "nimbus-remote: error: 404\n");

    let vmm = FakeVmm::replying(Response::json(400, b"not json".to_vec()));
    let output = vmm.run(&["boot"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output), "nimbus-remote: error: 400: not json\n");
}

#[test]
fn a_missing_socket_is_named() {
    let output = Command::new(BINARY)
        .args([
            "--api-socket",
            "/nonexistent/nimbus-remote/api.sock",
            "ping",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.starts_with(
            "nimbus-remote: error: cannot connect to /nonexistent/nimbus-remote/api.sock: "
        ),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[test]
fn no_socket_option_exits_1() {
    let output = Command::new(BINARY).arg("ping").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("--api-socket"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_arguments_send_nothing() {
    let vmm = FakeVmm::start();
    let cases: &[(&[&str], &str)] = &[
        (&["add-disk", "path=/img,colour=red"], "invalid disk syntax"),
        (&["add-net", "fd=[3,4"], "invalid net syntax"),
        (&["add-net", "tap=t0,num_queues=two"], "invalid net syntax"),
        (&["add-pmem", "size=1G"], "missing field `file`"),
        (&["add-vsock", "socket=/v"], "missing field `cid`"),
        (&["add-device", "id=x"], "path=<device_path>"),
        (
            &[
                "add-generic-vhost-user",
                "device_type=watchdog,socket=/s,queue_sizes=[8]",
            ],
            "device type",
        ),
        (&["resize", "--cpus", "two"], "invalid CPU count"),
        (&["resize", "--memory", "1Q"], "invalid memory size"),
        (
            &["resize-zone", "--id", "z", "--size", "big"],
            "invalid memory size",
        ),
        (
            &["resize-disk", "--disk", "d", "--size", "ten"],
            "invalid disk size",
        ),
        (
            &["restore", "source_url=/s,net_fds=net0@3"],
            "invalid restore syntax",
        ),
        (
            &["create", "/nonexistent/vm.json"],
            "cannot read /nonexistent/vm.json",
        ),
    ];
    for (args, expected) in cases {
        let output = vmm.run(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let message = stderr(&output);
        assert!(message.starts_with("nimbus-remote: error: "), "{message}");
        assert!(message.contains(expected), "{args:?}: {message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }
    assert!(vmm.requests().is_empty());
}

#[test]
fn descriptors_that_are_not_open_are_refused() {
    let vmm = FakeVmm::start();
    // The binary inherits only 0, 1 and 2 from the test.
    let output = vmm.run(&["add-net", "fd=[900,901],num_queues=4"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "nimbus-remote: error: file descriptor 900 is not open in nimbus-remote (the caller must pass it)\n"
    );
    assert!(vmm.requests().is_empty());
}

#[test]
fn usage_errors_and_version() {
    // A missing positional argument is a usage error, as any clap error.
    let output = Command::new(BINARY)
        .args(["--api-socket", "/x", "add-disk"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = Command::new(BINARY)
        .args(["--api-socket", "/x", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));

    let output = Command::new(BINARY).arg("--version").output().unwrap();
    assert!(output.status.success());
    let line = stdout(&output);
    assert!(line.starts_with("nimbus-remote v51.1.0 (nimbus "), "{line}");
    assert_eq!(line.lines().count(), 1);
}
