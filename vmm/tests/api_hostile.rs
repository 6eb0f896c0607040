//! Hostile API clients against a running VM: truncated requests, oversized lines and bodies,
//! binary junk, bodies that are not the JSON a route wants, a client that never finishes its
//! request, and eleven connections at once. Every answer is a 4xx/5xx with a JSON array of
//! messages, nothing panics or hangs, and the guest keeps running throughout (its ticks go on
//! and `vm.info` still says `Running` at the end).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use e2e::api::{self, connect, read_answer, send_with_fds, ApiVmm};
use e2e::{require_kvm, spawn_vm, RunningVm};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");

fn tick_count(vm: &RunningVm) -> usize {
    e2e::lifecycle::ticks(vm).len()
}

/// Sends `bytes` then half-closes; returns everything the VMM answers until it closes.
fn exchange(socket: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = connect(socket, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status and JSON body of the first answer in `text`.
fn first_answer(text: &str) -> (u16, serde_json::Value) {
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.split(' ').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::Deserializer::from_str(body)
        .into_iter::<serde_json::Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn assert_json_error(text: &str, what: &str) -> u16 {
    let (status, json) = first_answer(text);
    assert!((400..600).contains(&status), "{what}: {text:?}");
    let messages = json
        .as_array()
        .unwrap_or_else(|| panic!("{what}: the error body is not a JSON array: {text:?}"));
    assert!(
        !messages.is_empty() && messages.iter().all(|m| m.is_string()),
        "{what}: {text:?}"
    );
    status
}

#[test]
fn hostile_clients_get_errors_and_the_vm_runs_on() {
    if !require_kvm("hostile_clients_get_errors_and_the_vm_runs_on") {
        return;
    }
    let v = ApiVmm::new("api-hostile");
    let mut cmd =
        e2e::lifecycle::lifecycle_command(NIMBUS, &v.dir, e2e::lifecycle::LIFECYCLE_CMDLINE);
    cmd.arg("--api-socket").arg(&v.socket);
    let vm = spawn_vm(cmd);
    v.wait_ready();
    let ticks_at_start = tick_count(&vm);
    let long = "x".repeat(8192);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "binary junk",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
        ("truncated request line", b"PUT /api/v1/vm.pau".to_vec()),
        (
            "truncated headers",
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Le".to_vec(),
        ),
        (
            "truncated body",
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"cpus\"".to_vec(),
        ),
        (
            "oversized header line",
            format!("GET /api/v1/vm.info HTTP/1.1\r\nX-Long: {long}\r\n\r\n").into_bytes(),
        ),
        (
            "oversized request line",
            format!("GET /api/v1/{long} HTTP/1.1\r\n\r\n").into_bytes(),
        ),
        (
            "oversized body",
            format!(
                "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                5 << 20
            )
            .into_bytes(),
        ),
        (
            "bad content length",
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -5\r\n\r\n".to_vec(),
        ),
        ("not HTTP", b"HELLO\r\n\r\n".to_vec()),
        (
            "body not JSON",
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\n\xff\xfe{[}".to_vec(),
        ),
        (
            "JSON of the wrong shape",
            b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 12\r\n\r\n[1,2,3,4,5]\n".to_vec(),
        ),
        (
            "deeply nested JSON",
            format!(
                "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 20000\r\n\r\n{}{}",
                "[".repeat(10000),
                "]".repeat(10000)
            )
            .into_bytes(),
        ),
        (
            "body on a body-less route",
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        (
            "unknown route",
            b"GET /api/v1/vm.self-destruct HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "wrong method",
            b"DELETE /api/v1/vm.info HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "a second VM",
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ),
        (
            "hot-add while running",
            b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"path\":\"/x\"}\n\n"
                .to_vec(),
        ),
    ];
    for (what, bytes) in &cases {
        let text = exchange(&v.socket, bytes);
        assert!(!text.is_empty(), "{what}: no answer");
        assert!(text.is_ascii(), "{what}: non-ASCII answer");
        assert_json_error(&text, what);
    }
    // A client that never finishes its request holds its connection, not the VMM: another
    // client is served at once, and the slow one gets 408 in the end.
    let mut slow = connect(&v.socket, Duration::from_secs(5)).expect("connect");
    slow.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: loc")
        .expect("slow");
    let t = Instant::now();
    let a = api::call(&v.socket, "GET", "vm.info", None);
    assert_eq!(a.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a slow client delayed another"
    );
    // Eleven connections: ten are served, the eleventh gets 503 and is closed.
    let mut held: Vec<UnixStream> = (0..9)
        .map(|_| connect(&v.socket, Duration::from_secs(5)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let eleventh = exchange(&v.socket, &api::request_bytes("GET", "vmm.ping", None));
    assert_eq!(
        assert_json_error(&eleventh, "11th connection"),
        503,
        "{eleventh}"
    );
    for s in held.iter_mut() {
        send_with_fds(s, &api::request_bytes("GET", "vmm.ping", None), &[]).expect("ping");
        assert_eq!(read_answer(s).expect("ping").status, 200);
    }
    drop(held);
    slow.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert_eq!(assert_json_error(&text, "slow client"), 408, "{text}");
    // The guest ran on all along.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        tick_count(&vm) > ticks_at_start + 5,
        "{}",
        vm.describe_so_far()
    );
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["state"], "Running", "{info}");
    let run = vm.kill();
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}
