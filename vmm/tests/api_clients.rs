//! Cloud Hypervisor's API clients, replayed byte for byte against Nimbus running the test
//! guest in its lifecycle mode (see docs/test-guest.md): Kata Containers' Go runtime (a new
//! connection per call, TAP descriptors with `vm.add-net` in the request's `sendmsg`, two NICs
//! on one raw connection), Kata's Rust runtime (everything on one persistent connection),
//! libvirt (a listening socket passed as `--api-socket fd=N`, the event monitor on a FIFO,
//! one connection per call, the `vm.add-net` answer read with one 1023-byte `recv`) and
//! ch-remote (request head and descriptors, then `Content-Length`, then the blank line, then the
//! body, as separate writes). The facts come from those clients' sources.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::api::{
    self, connect, read_answer, request_bytes, send_with_fds, write_part, Answer, ApiVmm,
};
use e2e::{require_kvm, spawn_vm, RunningVm, ScratchDir, Virtiofsd};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const BOOT: Duration = Duration::from_secs(30);

use e2e::lifecycle::LIFECYCLE_CMDLINE as LIFECYCLE;

fn scratch_disk(dir: &ScratchDir, name: &str, mib: u64) -> String {
    let path = dir.file(name);
    let f = std::fs::File::create(&path).expect("disk");
    f.set_len(mib << 20).expect("size");
    path.display().to_string()
}

/// A TAP queue in the test's network namespace, for handing to the VMM (Kata and libvirt
/// open the TAP and pass its descriptor).
fn tap(name: &str) -> net_util::Tap {
    let mut taps = net_util::Tap::open_named(name, 1).unwrap_or_else(|e| panic!("TAP {name}: {e}"));
    taps.pop().expect("one queue")
}

fn tap_name(tag: &str) -> String {
    format!("n{tag}{}", std::process::id() % 100_000)
}

fn assert_no_content(a: &Answer, what: &str) {
    assert_eq!(a.status, 204, "{what}: {}", String::from_utf8_lossy(&a.raw));
    assert_eq!(a.status_line, "HTTP/1.1 204 ", "{what}: no reason phrase");
    assert!(
        a.header("Content-Length").is_none(),
        "{what}: 204 with a length"
    );
    assert!(a.body.is_empty(), "{what}");
}

fn assert_json(a: &Answer, what: &str) -> serde_json::Value {
    assert_eq!(a.status, 200, "{what}: {}", String::from_utf8_lossy(&a.raw));
    assert_eq!(a.status_line, "HTTP/1.1 200 ", "{what}: no reason phrase");
    assert_eq!(a.header("Content-Type"), Some("application/json"), "{what}");
    assert_eq!(
        a.header("Content-Length"),
        Some(a.body.len().to_string().as_str()),
        "{what}"
    );
    assert!(a.raw.is_ascii(), "{what}: non-ASCII answer");
    a.json()
}

fn state(info: &serde_json::Value) -> &str {
    info["state"].as_str().unwrap_or("?")
}

/// Waits for the guest's `TICK` line after `after` ticks have been seen; returns its `n=`.
fn next_tick(vm: &RunningVm, after: usize) -> u64 {
    let ticks = e2e::lifecycle::wait_ticks(vm, after + 1, BOOT);
    e2e::lifecycle::field(&ticks[after], "n")
}

fn ticks_seen(vm: &RunningVm) -> usize {
    e2e::lifecycle::ticks(vm).len()
}

/// Kata Containers' Go runtime: it polls `vmm.ping` on a new connection every 10 ms, creates
/// the VM (two PCI segments, virtio-fs on segment 1, served by virtiofsd), checks `Created`,
/// sends every `vm.add-net` (request and TAP descriptor in one `sendmsg`) on one raw
/// connection (the second NIC asks for segment 1), boots, checks `Running` and where the
/// devices are (`SSSS:00:DD.0`), pauses and resumes, and stops with `vmm.shutdown`, then waits
/// for the process to exit.
#[test]
fn kata_go_runtime() {
    if !require_kvm("kata_go_runtime") {
        return;
    }
    let v = ApiVmm::new("kata-go");
    let disk = scratch_disk(&v.dir, "scratch.img", 8);
    let image = scratch_disk(&v.dir, "image.img", 1);
    let shared = v.dir.file("share");
    std::fs::create_dir_all(&shared).expect("share dir");
    let fs_socket = v.dir.file("fs.sock");
    let virtiofsd = Virtiofsd::start(&shared, &fs_socket, &v.dir.file("virtiofsd.log"), &[]);
    let vm = spawn_vm(v.command(NIMBUS, &["-v"]));
    // Readiness: a ping every 10 ms on a new connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = UnixStream::connect(&v.socket) {
            s.set_read_timeout(Some(Duration::from_secs(1))).ok();
            let ping = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nUser-Agent: OpenAPI-Generator/1.0.0/go\r\nAccept: application/json\r\n\r\n";
            if send_with_fds(&s, ping, &[]).is_ok() {
                if let Ok(a) = read_answer(&mut s) {
                    let ping = assert_json(&a, "vmm.ping");
                    assert!(
                        ping["version"].is_string() && ping["pid"].is_i64(),
                        "{ping}"
                    );
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "no ping answer");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Kata Go's body (clh.go): two PCI segments, virtio-fs on segment 1, its hybrid vsock for
    // the agent.
    let vsock = v.dir.file("kata.hvsock");
    let body = serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "nested": true,
                 "topology": {"threads_per_core": 1, "cores_per_die": 1,
                              "dies_per_package": 1, "packages": 1}},
        "memory": {"size": 128u64 << 20, "hotplug_method": "Acpi", "hotplug_size": 256u64 << 20,
                   "shared": true, "hugepages": false, "thp": true},
        "payload": {"kernel": e2e::guest_elf(), "cmdline": LIFECYCLE},
        "disks": [{"path": disk, "readonly": false, "num_queues": 1, "queue_size": 128},
                  {"path": image, "readonly": true, "num_queues": 1, "queue_size": 128,
                   "image_type": "Raw"}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "fs": [{"tag": "kataShared", "socket": fs_socket, "num_queues": 1, "queue_size": 1024,
                "pci_segment": 1}],
        "platform": {"num_pci_segments": 2},
        "vsock": {"cid": 3, "socket": vsock},
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false
    })
    .to_string();
    let kata_request = |method: &str, route: &str, body: Option<&str>| {
        let mut r = format!(
            "{method} /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: OpenAPI-Generator/1.0.0/go\r\n"
        );
        if let Some(b) = body {
            r.push_str(&format!(
                "Content-Length: {}\r\nAccept: application/json\r\nContent-Type: application/json\r\n\r\n{b}",
                b.len()
            ));
        } else {
            r.push_str("Accept: application/json\r\n\r\n");
        }
        r.into_bytes()
    };
    let call = |method: &str, route: &str, body: Option<&str>| {
        let mut s = connect(&v.socket, Duration::from_secs(5)).expect("connect");
        send_with_fds(&s, &kata_request(method, route, body), &[]).expect("send");
        read_answer(&mut s).expect(route)
    };
    assert_no_content(&call("PUT", "vm.create", Some(&body)), "vm.create");
    let info = assert_json(&call("GET", "vm.info", None), "vm.info");
    assert_eq!(state(&info), "Created", "{info}");
    // Two NICs on one raw connection, each request with its TAP descriptor in one sendmsg.
    let taps = [tap(&tap_name("kga")), tap(&tap_name("kgb"))];
    let mut raw = connect(&v.socket, Duration::from_secs(5)).expect("connect");
    for (i, t) in taps.iter().enumerate() {
        let net = format!(
            r#"{{"mac":"52:54:00:00:0{i}:01","num_queues":2,"queue_size":256,"pci_segment":{i}}}"#
        );
        send_with_fds(
            &raw,
            &kata_request("PUT", "vm.add-net", Some(&net)),
            &[t.as_raw_fd()],
        )
        .expect("add-net");
        let a = read_answer(&mut raw).expect("add-net answer");
        assert_no_content(&a, "vm.add-net before boot");
    }
    drop(raw);
    assert_no_content(&call("PUT", "vm.boot", None), "vm.boot");
    let info = assert_json(&call("GET", "vm.info", None), "vm.info");
    assert_eq!(state(&info), "Running", "{info}");
    let nets = info["config"]["net"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(nets.len(), 2, "{info}");
    assert_eq!(info["config"]["platform"]["num_pci_segments"], 2, "{info}");
    let bdf = |id: &str| {
        info["device_tree"][format!("_virtio-pci-{id}")]["pci_bdf"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mut segment1 = Vec::new();
    for (i, n) in nets.iter().enumerate() {
        let id = n["id"].as_str().unwrap_or_default();
        assert!(id.starts_with("_net"), "{n}");
        assert_eq!(n["pci_segment"], i, "{n}");
        let want = if i == 0 { "0000:00:" } else { "0001:00:" };
        assert!(bdf(id).starts_with(want), "{id} at {:?}: {info}", bdf(id));
        if i == 1 {
            segment1.push(bdf(id));
        }
    }
    let fs = &info["config"]["fs"][0];
    let fs_id = fs["id"].as_str().unwrap_or_default();
    assert!(fs_id.starts_with("_fs") && fs["pci_segment"] == 1, "{info}");
    segment1.push(bdf(fs_id));
    // The NIC and the share share segment 1's bus: slots 1 and 2 behind its host bridge.
    segment1.sort();
    assert_eq!(segment1, ["0001:00:01.0", "0001:00:02.0"], "{info}");
    assert!(
        info["memory_actual_size"].as_u64() == Some(128 << 20),
        "{info}"
    );
    // The vsock device is on the bus, its socket listening.
    let vsock_id = info["config"]["vsock"]["id"].as_str().unwrap_or_default();
    assert!(vsock_id.starts_with("_vsock"), "{info}");
    assert_eq!(info["config"]["vsock"]["cid"], 3, "{info}");
    assert!(
        info["device_tree"][format!("_virtio-pci-{vsock_id}")]["pci_bdf"]
            .as_str()
            .is_some_and(|b| b.starts_with("0000:00:")),
        "{info}"
    );
    assert!(
        UnixStream::connect(&vsock).is_ok(),
        "the vsock socket does not listen"
    );
    next_tick(&vm, 1);
    assert_no_content(&call("PUT", "vm.pause", None), "vm.pause");
    assert_eq!(
        state(&assert_json(&call("GET", "vm.info", None), "info")),
        "Paused"
    );
    assert_no_content(&call("PUT", "vm.resume", None), "vm.resume");
    let seen = ticks_seen(&vm);
    next_tick(&vm, seen);
    // Stop: vmm.shutdown answers 200 with an empty body, then the process exits.
    let a = call("PUT", "vmm.shutdown", None);
    assert_eq!(
        a.status_line,
        "HTTP/1.1 200 ",
        "{}",
        String::from_utf8_lossy(&a.raw)
    );
    assert_eq!(a.header("Content-Length"), Some("0"));
    let run = vm.finish(Duration::from_secs(3));
    run.assert_success();
    assert!(!v.socket.exists(), "the API socket is left behind");
    virtiofsd
        .finish(Duration::from_secs(10))
        .assert_clean_exit();
    assert!(!vsock.exists(), "the vsock socket is left behind");
}

/// Kata Containers' Rust runtime: Cloud Hypervisor's `api_client` on one persistent
/// connection for every call (requests without `Content-Type`, `Accept: */*`), the TAP
/// descriptor in `vm.add-net`'s `sendmsg`; `vm.info` must parse with its strict types.
#[test]
fn kata_rust_runtime() {
    if !require_kvm("kata_rust_runtime") {
        return;
    }
    let v = ApiVmm::new("kata-rust");
    let disk = scratch_disk(&v.dir, "scratch.img", 8);
    let vm = spawn_vm(v.command(NIMBUS, &[]));
    let mut s = connect(&v.socket, Duration::from_secs(10)).expect("connect");
    let mut call = |method: &str, route: &str, body: Option<&str>, fds: &[RawFd]| {
        let mut r =
            format!("{method} /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        if let Some(b) = body {
            r.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
        } else {
            r.push_str("\r\n");
        }
        send_with_fds(&s, r.as_bytes(), fds).expect("send");
        let a = read_answer(&mut s).expect(route);
        // api_client: the status is everything after "HTTP/1.1 " up to '\r', trimmed.
        let code = a.status_line["HTTP/1.1 ".len()..].trim();
        assert!(
            code.parse::<u16>().is_ok(),
            "api_client cannot parse {:?}",
            a.status_line
        );
        a
    };
    assert_json(&call("GET", "vmm.ping", None, &[]), "ping");
    let body = api::guest_vm_body(
        1,
        128,
        LIFECYCLE,
        &format!(
            r#""disks": [{{"path": "{disk}", "readonly": false, "num_queues": 1, "queue_size": 128, "image_type": "Unknown"}}],
               "serial": {{"file": null, "mode": "Tty", "iommu": false}},
               "console": {{"file": null, "mode": "Off", "iommu": false}}"#
        ),
    );
    assert_no_content(&call("PUT", "vm.create", Some(&body), &[]), "create");
    let t = tap(&tap_name("kr"));
    let net = r#"{"ip":"192.168.249.1","mask":"255.255.255.0","mac":"52:54:00:00:01:02","num_queues":2,"queue_size":256,"id":"eth0"}"#;
    assert_no_content(
        &call("PUT", "vm.add-net", Some(net), &[t.as_raw_fd()]),
        "add-net",
    );
    // The agent's hybrid vsock, added before boot; a VM has one (CH answers a second with 500).
    let vsock = v.dir.file("kata-rust.hvsock");
    let add_vsock = format!(r#"{{"cid":3,"socket":"{}"}}"#, vsock.display());
    assert_no_content(
        &call("PUT", "vm.add-vsock", Some(&add_vsock), &[]),
        "add-vsock",
    );
    let again = call("PUT", "vm.add-vsock", Some(&add_vsock), &[]);
    assert!(
        again.status_line.starts_with("HTTP/1.1 500"),
        "{}",
        again.text()
    );
    assert_no_content(&call("PUT", "vm.boot", None, &[]), "boot");
    assert!(
        UnixStream::connect(&vsock).is_ok(),
        "the vsock socket does not listen"
    );
    let hot = call("PUT", "vm.add-vsock", Some(&add_vsock), &[]);
    assert!(
        hot.status_line.starts_with("HTTP/1.1 500") && hot.text().contains("only one"),
        "a second vsock while running: {}",
        hot.text()
    );
    // A container's disk, hot-added as Kata does: 200 with the id and a segment 0, bus 0,
    // function 0 address (this guest does not scan for it; Linux does: linux_guest.rs).
    let extra = v.dir.file("kata-rust-extra.img");
    std::fs::write(&extra, vec![0u8; 1 << 20]).expect("image");
    let add_disk = format!(
        r#"{{"path":"{}","readonly":false,"num_queues":1,"queue_size":128,"id":"drive-1"}}"#,
        extra.display()
    );
    let added = assert_json(
        &call("PUT", "vm.add-disk", Some(&add_disk), &[]),
        "add-disk",
    );
    assert_eq!(added["id"], "drive-1", "{added}");
    let bdf = added["bdf"].as_str().unwrap_or_default();
    assert!(
        bdf.len() == 12 && bdf.starts_with("0000:00:") && bdf.ends_with(".0"),
        "{added}"
    );
    let dup = call("PUT", "vm.add-disk", Some(&add_disk), &[]);
    assert!(
        dup.status_line.starts_with("HTTP/1.1 409"),
        "{}",
        dup.text()
    );
    assert_no_content(
        &call("PUT", "vm.remove-device", Some(r#"{"id":"drive-1"}"#), &[]),
        "remove-device (ejection requested)",
    );
    let info = assert_json(&call("GET", "vm.info", None, &[]), "info");
    // What Kata Rust's types require, present and not null.
    let c = &info["config"];
    for (path, v) in [
        ("cpus.boot_vcpus", &c["cpus"]["boot_vcpus"]),
        ("cpus.max_vcpus", &c["cpus"]["max_vcpus"]),
        ("cpus.max_phys_bits", &c["cpus"]["max_phys_bits"]),
        ("memory.size", &c["memory"]["size"]),
        ("serial.mode", &c["serial"]["mode"]),
        ("console.mode", &c["console"]["mode"]),
        ("rng.src", &c["rng"]["src"]),
        ("disks[0].num_queues", &c["disks"][0]["num_queues"]),
        ("disks[0].queue_size", &c["disks"][0]["queue_size"]),
        ("net[0].ip", &c["net"][0]["ip"]),
        ("net[0].mask", &c["net"][0]["mask"]),
        ("net[0].mac", &c["net"][0]["mac"]),
        ("net[0].num_queues", &c["net"][0]["num_queues"]),
        ("net[0].queue_size", &c["net"][0]["queue_size"]),
        ("vsock.cid", &c["vsock"]["cid"]),
        ("vsock.socket", &c["vsock"]["socket"]),
    ] {
        assert!(!v.is_null(), "{path} missing in {info}");
    }
    assert_eq!(c["net"][0]["id"], "eth0");
    assert_eq!(
        c["disks"][0]["image_type"], "Raw",
        "the probed format is written back"
    );
    assert!(
        !info.to_string().contains("null"),
        "a null where Kata Rust wants a value: {info}"
    );
    assert!(
        ["Created", "Running", "Shutdown", "Paused"].contains(&state(&info)),
        "{info}"
    );
    next_tick(&vm, 1);
    assert_no_content(&call("PUT", "vm.pause", None, &[]), "pause");
    assert_eq!(
        state(&assert_json(&call("GET", "vm.info", None, &[]), "info")),
        "Paused"
    );
    assert_no_content(&call("PUT", "vm.resume", None, &[]), "resume");
    let a = call("PUT", "vmm.shutdown", None, &[]);
    assert_eq!(a.status, 200);
    vm.finish(Duration::from_secs(5)).assert_success();
}

/// Makes `fd` survive exec in the child (libvirt passes the listening socket this way).
fn inherit(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads the event monitor FIFO until `event` of `source` arrives; returns every event so far.
fn read_events_until(
    fifo: &mut std::fs::File,
    text: &mut String,
    source: &str,
    event: &str,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<serde_json::Value> = text
            .split("\n\n")
            .filter(|t| !t.trim().is_empty())
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect();
        if events
            .iter()
            .any(|e| e["source"] == source && e["event"] == event)
        {
            return events;
        }
        assert!(Instant::now() < deadline, "no {source}/{event} in {text}");
        let mut buf = [0u8; 4096];
        match fifo.read(&mut buf) {
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("event monitor: {e}"),
        }
    }
}

/// libvirt's ch driver: it binds the API socket itself and passes it as `--api-socket fd=N`,
/// reads events from a FIFO (`--event-monitor path=...`), makes one connection per call (with
/// curl), sends `vm.add-net` with the TAP descriptor and reads the answer with one 1023-byte
/// `recv` after a 500 ms poll, and stops the domain when the event monitor says `shutdown`.
#[test]
fn libvirt_ch_driver() {
    if !require_kvm("libvirt_ch_driver") {
        return;
    }
    let v = ApiVmm::new("libvirt");
    let disk = scratch_disk(&v.dir, "scratch.img", 8);
    let listener = UnixListener::bind(&v.socket).expect("bind");
    let fifo_path = v.dir.file("dom-event-monitor-fifo");
    let c_path = std::ffi::CString::new(fifo_path.display().to_string()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // libvirt opens its read end first (non-blocking, so this does not wait for a writer).
    // SAFETY: a valid path; the descriptor is owned right away.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let mut fifo = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let lfd = listener.as_raw_fd();
    let mut cmd = Command::new(NIMBUS);
    cmd.arg("--api-socket")
        .arg(format!("fd={lfd}"))
        .arg("--event-monitor")
        .arg(format!("path={}", fifo_path.display()));
    inherit(&mut cmd, lfd);
    let vm = spawn_vm(cmd);
    let mut events_text = String::new();
    read_events_until(&mut fifo, &mut events_text, "vmm", "starting");
    // curl: one connection per call; a body-less PUT with Content-Length: 0; a create with
    // Expect: 100-continue.
    let body = api::guest_vm_body(
        1,
        128,
        LIFECYCLE,
        &format!(r#""disks": [{{"path": "{disk}"}}]"#),
    );
    let mut s = connect(&v.socket, Duration::from_secs(5)).expect("connect");
    let head = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    write_part(&mut s, head.as_bytes());
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).expect("100 Continue");
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    write_part(&mut s, body.as_bytes());
    assert_no_content(&read_answer(&mut s).expect("create"), "vm.create");
    drop(s);
    // vm.add-net on a raw socket, answer read the libvirt way.
    let t = tap(&tap_name("lv"));
    let net = r#"{"id":"net_0","ip":"192.168.122.1","mask":"255.255.255.0","mac":"52:54:00:aa:bb:cc","num_queues":2,"queue_size":256,"mtu":1500}"#;
    let raw = connect(&v.socket, Duration::from_secs(5)).expect("connect");
    send_with_fds(
        &raw,
        &request_bytes("PUT", "vm.add-net", Some(net)),
        &[t.as_raw_fd()],
    )
    .expect("add-net");
    let mut pfd = libc::pollfd {
        fd: raw.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, 500) };
    assert_eq!(ready, 1, "no answer within 500 ms");
    let mut buf = [0u8; 1023];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(raw.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n > 0);
    let reply = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
    assert!(reply.starts_with("HTTP/1.1 204 \r\n"), "{reply:?}");
    assert!(
        reply.ends_with("\r\n\r\n"),
        "the whole answer in one recv: {reply:?}"
    );
    drop(raw);
    let put = |route: &str| {
        let mut s = connect(&v.socket, Duration::from_secs(5)).expect("connect");
        let r = format!(
            "PUT /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n"
        );
        write_part(&mut s, r.as_bytes());
        read_answer(&mut s).expect(route)
    };
    assert_no_content(&put("vm.boot"), "vm.boot");
    let info = assert_json(&api::call(&v.socket, "GET", "vm.info", None), "vm.info");
    assert_eq!(state(&info), "Running");
    assert_eq!(info["config"]["net"][0]["id"], "net_0");
    next_tick(&vm, 1);
    assert_no_content(&put("vm.pause"), "vm.pause");
    assert_no_content(&put("vm.resume"), "vm.resume");
    assert_no_content(&put("vm.shutdown"), "vm.shutdown");
    let events = read_events_until(&mut fifo, &mut events_text, "vm", "shutdown");
    let names: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["source"].as_str().unwrap_or(""),
                e["event"].as_str().unwrap_or("")
            )
        })
        .collect();
    for want in [
        "vmm/starting",
        "vm/booting",
        "vm/booted",
        "vm/pausing",
        "vm/paused",
        "vm/resuming",
        "vm/resumed",
        "vm/shutdown",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    for part in events_text.split("\n\n").filter(|t| !t.trim().is_empty()) {
        assert!(part.len() < 4096, "event over 4 KiB");
        assert!(part.starts_with("{\n"), "not pretty-printed: {part}");
    }
    let info = assert_json(&api::call(&v.socket, "GET", "vm.info", None), "vm.info");
    assert_eq!(state(&info), "Shutdown");
    // libvirt destroys with SIGTERM.
    let pid = vm_pid(&v.socket);
    // SAFETY: kill(2) with a pid read from the VMM's own answer.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    vm.finish(Duration::from_secs(5)).assert_success();
    drop(listener);
}

fn vm_pid(socket: &Path) -> i32 {
    let ping = api::call(socket, "GET", "vmm.ping", None).json();
    ping["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .expect("pid")
}

/// ch-remote: one connection per call, and a request in four writes: the request line and
/// headers (with the descriptors), then `Content-Length`, then the blank line, then the body.
#[test]
fn ch_remote_split_writes() {
    if !require_kvm("ch_remote_split_writes") {
        return;
    }
    let v = ApiVmm::new("ch-remote");
    let disk = scratch_disk(&v.dir, "scratch.img", 8);
    let vm = spawn_vm(v.command(NIMBUS, &[]));
    v.wait_ready();
    let split = |route: &str, body: &str, fds: &[RawFd]| {
        let mut s = connect(&v.socket, Duration::from_secs(5)).expect("connect");
        let head = format!("PUT /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Type: application/json\r\n");
        send_with_fds(&s, head.as_bytes(), fds).expect("head");
        std::thread::sleep(Duration::from_millis(5));
        write_part(
            &mut s,
            format!("Content-Length: {}\r\n", body.len()).as_bytes(),
        );
        std::thread::sleep(Duration::from_millis(5));
        write_part(&mut s, b"\r\n");
        std::thread::sleep(Duration::from_millis(5));
        write_part(&mut s, body.as_bytes());
        read_answer(&mut s).expect(route)
    };
    let body = api::guest_vm_body(
        1,
        128,
        LIFECYCLE,
        &format!(r#""disks": [{{"path": "{disk}"}}]"#),
    );
    assert_no_content(&split("vm.create", &body, &[]), "create");
    let t = tap(&tap_name("cr"));
    assert_no_content(
        &split("vm.add-net", r#"{"num_queues":2}"#, &[t.as_raw_fd()]),
        "add-net",
    );
    let a = api::call(&v.socket, "PUT", "vm.boot", None);
    assert_no_content(&a, "boot");
    let info = assert_json(&api::call(&v.socket, "GET", "vm.info", None), "info");
    let net_id = info["config"]["net"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(net_id.starts_with("_net"), "{info}");
    next_tick(&vm, 1);
    let counters = assert_json(
        &api::call(&v.socket, "GET", "vm.counters", None),
        "counters",
    );
    assert!(counters[&net_id]["tx_frames"].is_u64(), "{counters}");
    assert!(counters["_disk0"]["write_ops"].is_u64(), "{counters}");
    let a = api::call(&v.socket, "PUT", "vmm.shutdown", None);
    assert_eq!(a.status, 200);
    vm.finish(Duration::from_secs(5)).assert_success();
}

/// `nimbus-remote` drives a whole lifecycle: create from a file, add a disk and a TAP (the
/// descriptor passed along), boot, info, pause, resume, counters, reboot, shutdown, boot again
/// from the kept configuration, remove a device after the shutdown, delete, and stop the VMM.
#[test]
fn nimbus_remote_drives_a_lifecycle() {
    if !require_kvm("nimbus_remote_drives_a_lifecycle") {
        return;
    }
    let remote = e2e::workspace_bin("nimbus_remote", "nimbus-remote", "NIMBUS_REMOTE");
    let v = ApiVmm::new("nimbus-remote");
    let disk = scratch_disk(&v.dir, "scratch.img", 8);
    let extra = scratch_disk(&v.dir, "extra.img", 1);
    let vm = spawn_vm(v.command(NIMBUS, &["-v"]));
    v.wait_ready();
    let run = |args: &[&str]| -> (bool, String, String) {
        let out = Command::new(&remote)
            .arg("--api-socket")
            .arg(&v.socket)
            .args(args)
            .output()
            .expect("nimbus-remote");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| -> String {
        let (success, stdout, stderr) = run(args);
        assert!(success, "nimbus-remote {args:?}: {stderr}");
        stdout
    };
    let state = |out: &str| {
        serde_json::from_str::<serde_json::Value>(out).expect("info")["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    };
    let config = v.dir.file("vm.json");
    let body = api::guest_vm_body(
        1,
        128,
        LIFECYCLE,
        &format!(r#""disks": [{{"path": "{disk}"}}]"#),
    );
    std::fs::write(&config, body).expect("config");
    let ping: serde_json::Value = serde_json::from_str(&ok(&["ping"])).expect("ping");
    assert!(ping["pid"].is_i64(), "{ping}");
    ok(&["create", &config.display().to_string()]);
    ok(&["add-disk", &format!("path={extra},readonly=on,id=extra")]);
    let t = tap(&tap_name("nr"));
    let fd = t.as_raw_fd();
    // The child inherits the TAP descriptor, as a manager's would.
    let mut cmd = Command::new(&remote);
    cmd.arg("--api-socket")
        .arg(&v.socket)
        .args(["add-net", &format!("fd={fd},mac=52:54:00:00:02:01")]);
    inherit(&mut cmd, fd);
    let out = cmd.output().expect("add-net");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(state(&ok(&["info"])), "Created");
    ok(&["boot"]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info"])).expect("info");
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["config"]["disks"][1]["id"], "extra", "{info}");
    next_tick(&vm, 1);
    ok(&["pause"]);
    assert_eq!(state(&ok(&["info"])), "Paused");
    let (success, _, stderr) = run(&["pause"]);
    assert!(
        !success && stderr.contains("500") && stderr.contains("paused"),
        "{stderr}"
    );
    ok(&["resume"]);
    let counters: serde_json::Value = serde_json::from_str(&ok(&["counters"])).expect("counters");
    assert!(
        counters["_disk0"]["write_ops"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{counters}"
    );
    ok(&["nmi"]);
    ok(&["reboot"]);
    vm.wait_for_line("LIFECYCLE boot=1", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    ok(&["shutdown"]);
    assert_eq!(state(&ok(&["info"])), "Shutdown");
    // Booted again from the kept configuration (the TAP descriptor is still held).
    ok(&["boot"]);
    assert_eq!(state(&ok(&["info"])), "Running");
    let deadline = std::time::Instant::now() + BOOT;
    while vm
        .stdout_so_far()
        .matches("NIMBUS-TEST-GUEST stage1")
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            vm.describe_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(&["shutdown"]);
    ok(&["remove-device", "extra"]);
    let (success, _, stderr) = run(&["remove-device", "extra"]);
    assert!(!success && stderr.contains("404"), "{stderr}");
    ok(&["delete"]);
    let (success, _, stderr) = run(&["info"]);
    assert!(!success && stderr.contains("404"), "{stderr}");
    ok(&["shutdown-vmm"]);
    let run = vm.finish(Duration::from_secs(5));
    run.assert_success();
    assert_eq!(
        run.stdout.matches("NIMBUS-TEST-GUEST stage1").count(),
        3,
        "{}",
        run.describe()
    );
}
