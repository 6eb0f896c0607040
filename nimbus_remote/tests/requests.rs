//! Every subcommand, run as the real binary against a fake VMM: the method, path, JSON body
//! and descriptors it sends, and what it prints.

#![allow(clippy::unwrap_used)]

mod common;

use api_http::Response;
use common::{identity, pipe, raw, success, FakeVmm, GET_BODY};
use vm_config::{DiskConfig, FsConfig, NetConfig};

#[test]
fn subcommands_without_a_body() {
    let cases = [
        ("boot", "PUT", "/api/v1/vm.boot"),
        ("delete", "PUT", "/api/v1/vm.delete"),
        ("shutdown-vmm", "PUT", "/api/v1/vmm.shutdown"),
        ("resume", "PUT", "/api/v1/vm.resume"),
        ("power-button", "PUT", "/api/v1/vm.power-button"),
        ("reboot", "PUT", "/api/v1/vm.reboot"),
        ("pause", "PUT", "/api/v1/vm.pause"),
        ("info", "GET", "/api/v1/vm.info"),
        ("counters", "GET", "/api/v1/vm.counters"),
        ("ping", "GET", "/api/v1/vmm.ping"),
        ("shutdown", "PUT", "/api/v1/vm.shutdown"),
        ("nmi", "PUT", "/api/v1/vm.nmi"),
    ];
    let vmm = FakeVmm::start();
    for (subcommand, method, path) in cases {
        success(&vmm.run(&[subcommand]));
        let seen = vmm.requests().pop().unwrap();
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            (method, path),
            "{subcommand}"
        );
        assert_eq!(seen.body, "", "{subcommand}");
        assert!(seen.fds.is_empty(), "{subcommand}");
        assert!(seen.headers.iter().all(|(n, _)| n != "Content-Type"));
    }
    assert_eq!(vmm.requests().len(), cases.len());
}

/// (arguments, path, the exact body: Cloud Hypervisor's fields, unset device options left out
/// as Cloud Hypervisor 53 writes them, request options written as `null` as ch-remote does).
const BODIES: &[(&[&str], &str, &str)] = &[
    (
        &["add-pmem", "file=/pm,size=1G,discard_writes=on,id=pmem0"],
        "vm.add-pmem",
        r#"{"file":"/pm","size":1073741824,"discard_writes":true,"id":"pmem0","pci_segment":0}"#,
    ),
    (
        &["add-vsock", "cid=3,socket=/tmp/vsock"],
        "vm.add-vsock",
        r#"{"cid":3,"socket":"/tmp/vsock","pci_segment":0}"#,
    ),
    (
        &[
            "add-device",
            "path=/sys/bus/pci/devices/0000:01:00.0/,iommu=on",
        ],
        "vm.add-device",
        r#"{"path":"/sys/bus/pci/devices/0000:01:00.0/","iommu":true,"pci_segment":0}"#,
    ),
    (
        &["add-user-device", "socket=/tmp/vfio-user.sock,id=user0"],
        "vm.add-user-device",
        r#"{"socket":"/tmp/vfio-user.sock","id":"user0","pci_segment":0}"#,
    ),
    (
        &["add-vdpa", "path=/dev/vhost-vdpa-0,num_queues=2"],
        "vm.add-vdpa",
        r#"{"path":"/dev/vhost-vdpa-0","num_queues":2,"pci_segment":0}"#,
    ),
    (
        &[
            "add-generic-vhost-user",
            "socket=/tmp/gpu.sock,device_type=gpu,queue_sizes=[256,16],id=gpu0",
        ],
        "vm.add-generic-vhost-user",
        r#"{"id":"gpu0","pci_segment":0,"socket":"/tmp/gpu.sock","queue_sizes":[256,16],"device_type":16}"#,
    ),
    (
        &["remove-device", "_disk0"],
        "vm.remove-device",
        r#"{"id":"_disk0"}"#,
    ),
    (
        &["resize", "--cpus", "4", "--memory", "2G"],
        "vm.resize",
        r#"{"desired_vcpus":4,"desired_ram":2147483648,"desired_balloon":null}"#,
    ),
    (
        &["resize", "--balloon", "512M"],
        "vm.resize",
        r#"{"desired_vcpus":null,"desired_ram":null,"desired_balloon":536870912}"#,
    ),
    (
        &["resize-zone", "--id", "mem0", "--size", "4G"],
        "vm.resize-zone",
        r#"{"id":"mem0","desired_ram":4294967296}"#,
    ),
    (
        &["resize-disk", "--disk", "_disk0", "--size", "10G"],
        "vm.resize-disk",
        r#"{"id":"_disk0","desired_size":10737418240}"#,
    ),
    (
        &["snapshot", "file:///tmp/snap"],
        "vm.snapshot",
        r#"{"destination_url":"file:///tmp/snap"}"#,
    ),
    (
        &["coredump", "file:///tmp/core"],
        "vm.coredump",
        r#"{"destination_url":"file:///tmp/core"}"#,
    ),
    (
        &["restore", "source_url=file:///tmp/snap,prefault=on"],
        "vm.restore",
        r#"{"source_url":"file:///tmp/snap","prefault":true,"net_fds":null}"#,
    ),
    (
        &["send-migration", "unix:/tmp/mig.sock"],
        "vm.send-migration",
        r#"{"destination_url":"unix:/tmp/mig.sock","local":false}"#,
    ),
    (
        &["send-migration", "--local", "unix:/tmp/mig.sock"],
        "vm.send-migration",
        r#"{"destination_url":"unix:/tmp/mig.sock","local":true}"#,
    ),
    (
        &["receive-migration", "unix:/tmp/mig.sock"],
        "vm.receive-migration",
        r#"{"receiver_url":"unix:/tmp/mig.sock"}"#,
    ),
];

#[test]
fn subcommands_with_a_body_send_ch_remotes_json() {
    let vmm = FakeVmm::start();
    for (args, endpoint, body) in BODIES {
        success(&vmm.run(args));
        let seen = vmm.requests().pop().unwrap();
        assert_eq!(seen.method, "PUT", "{args:?}");
        assert_eq!(seen.path, format!("/api/v1/{endpoint}"), "{args:?}");
        assert_eq!(seen.body, *body, "{args:?}");
        assert!(seen.fds.is_empty(), "{args:?}");
    }
}

#[test]
fn disks_and_shares_are_sent_as_vm_configs_structs() {
    let vmm = FakeVmm::start();
    let disk = "path=/img/root.raw,readonly=on,num_queues=2,id=root";
    success(&vmm.run(&["add-disk", disk]));
    let seen = vmm.only_request();
    assert_eq!(seen.path, "/api/v1/vm.add-disk");
    let expected: DiskConfig = vm_config::parse_option("disk", disk).unwrap();
    assert_eq!(seen.body, serde_json::to_string(&expected).unwrap());
    let json: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(json["path"], "/img/root.raw");
    assert_eq!(json["readonly"], true);
    assert_eq!(json["num_queues"], 2);
    assert_eq!(json["id"], "root");

    let vmm = FakeVmm::start();
    let fs = "tag=shared,socket=/tmp/virtiofsd.sock,num_queues=1,queue_size=512";
    success(&vmm.run(&["add-fs", fs]));
    let seen = vmm.only_request();
    assert_eq!(seen.path, "/api/v1/vm.add-fs");
    let expected: FsConfig = vm_config::parse_option("fs", fs).unwrap();
    assert_eq!(seen.body, serde_json::to_string(&expected).unwrap());
    let json: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(json["tag"], "shared");
    assert_eq!(json["queue_size"], 512);
}

#[test]
fn add_net_passes_the_named_descriptors_and_leaves_their_numbers_out() {
    let (first, _first_writer) = pipe();
    let (second, _second_writer) = pipe();
    let config = format!(
        "fd=[{},{}],num_queues=4,mac=12:34:56:78:9a:bc,id=net7",
        raw(&first),
        raw(&second)
    );
    let vmm = FakeVmm::start();
    success(&vmm.run_with(&["add-net", &config], None, &[raw(&first), raw(&second)]));
    let seen = vmm.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("PUT", "/api/v1/vm.add-net")
    );
    assert_eq!(seen.fds, vec![identity(&first), identity(&second)]);
    let json: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert!(json.get("fds").is_none_or(|f| f.is_null()), "{json}");
    assert_eq!(json["id"], "net7");
    assert_eq!(json["num_queues"], 4);
    assert_eq!(json["mac"], "12:34:56:78:9a:bc");
    let mut expected = NetConfig::parse("num_queues=4,mac=12:34:56:78:9a:bc,id=net7").unwrap();
    expected.fds = None;
    assert_eq!(seen.body, serde_json::to_string(&expected).unwrap());

    // One descriptor, CH's plain form.
    let vmm = FakeVmm::start();
    let config = format!("fd={},id=net8", raw(&second));
    success(&vmm.run_with(&["add-net", &config], None, &[raw(&second)]));
    assert_eq!(vmm.only_request().fds, vec![identity(&second)]);
}

#[test]
fn add_device_and_restore_pass_their_descriptors() {
    let (device, _device_writer) = pipe();
    let vmm = FakeVmm::start();
    let config = format!("fd={},id=vfio0", raw(&device));
    success(&vmm.run_with(&["add-device", &config], None, &[raw(&device)]));
    let seen = vmm.only_request();
    assert_eq!(seen.path, "/api/v1/vm.add-device");
    assert_eq!(seen.fds, vec![identity(&device)]);
    assert_eq!(seen.body, r#"{"id":"vfio0","pci_segment":0}"#);

    let (tap0, _w0) = pipe();
    let (tap1, _w1) = pipe();
    let (tap2, _w2) = pipe();
    let vmm = FakeVmm::start();
    let config = format!(
        "source_url=file:///tmp/snap,net_fds=[net0@[{},{}],net1@[{}]]",
        raw(&tap0),
        raw(&tap1),
        raw(&tap2)
    );
    let fds = [raw(&tap0), raw(&tap1), raw(&tap2)];
    success(&vmm.run_with(&["restore", &config], None, &fds));
    let seen = vmm.only_request();
    assert_eq!(seen.path, "/api/v1/vm.restore");
    assert_eq!(
        seen.fds,
        vec![identity(&tap0), identity(&tap1), identity(&tap2)]
    );
    assert_eq!(
        seen.body,
        r#"{"source_url":"file:///tmp/snap","prefault":false,"net_fds":[{"id":"net0","num_fds":2,"fds":null},{"id":"net1","num_fds":1,"fds":null}]}"#
    );
}

#[test]
fn create_sends_the_file_or_standard_input_as_it_is() {
    let config = "{\"cpus\": {\"boot_vcpus\": 2}, \"payload\": {\"kernel\": \"/k\"}}\n";
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/nimbus_remote_create").unwrap();
    let file = dir.as_path().join("vm.json");
    std::fs::write(&file, config).unwrap();

    let vmm = FakeVmm::start();
    success(&vmm.run(&["create", file.to_str().unwrap()]));
    let seen = vmm.only_request();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("PUT", "/api/v1/vm.create")
    );
    assert_eq!(seen.body, config);

    for args in [&["create", "-"][..], &["create"][..]] {
        let vmm = FakeVmm::start();
        success(&vmm.run_with(args, Some(config.as_bytes()), &[]));
        let seen = vmm.only_request();
        assert_eq!(seen.path, "/api/v1/vm.create");
        assert_eq!(seen.body, config);
    }
}

#[test]
fn the_body_is_printed_as_received() {
    let vmm = FakeVmm::start();
    assert_eq!(success(&vmm.run(&["info"])), format!("{GET_BODY}\n"));
    assert_eq!(success(&vmm.run(&["ping"])), format!("{GET_BODY}\n"));
    // A 204 carries no body: nothing is printed.
    assert_eq!(success(&vmm.run(&["pause"])), "");

    // A hot-plugged device's PCI address (200 with a body).
    let info = r#"{"id":"_disk3","bdf":"0000:00:06.0"}"#;
    let vmm = FakeVmm::replying(Response::json(200, info.as_bytes().to_vec()));
    assert_eq!(
        success(&vmm.run(&["add-disk", "path=/img/data.raw"])),
        format!("{info}\n")
    );

    // vmm.shutdown answers 200 with Content-Length: 0; ch-remote prints an empty line.
    let vmm = FakeVmm::replying(Response::json(200, Vec::new()));
    assert_eq!(success(&vmm.run(&["shutdown-vmm"])), "\n");
}
