//! Shared helpers for Nimbus end-to-end tests.
//!
//! The end-to-end tests boot the freestanding test guest (`guest/`, see
//! `docs/test-guest.md`) under a VMM — Nimbus or, as a reference, QEMU — and
//! check what it reports on its serial port:
//!
//! * [`guest_elf`] builds the guest once per test process and returns its path;
//! * [`run_vm`] runs a VMM command with a hard timeout and collects its output;
//! * [`GuestReport`] parses the guest's output protocol and asserts on it;
//! * [`require_kvm`] and [`qemu_binary`] implement the environment policy:
//!   without `/dev/kvm` a test is skipped loudly, a missing QEMU is a failure;
//! * stage 2 (PCI, virtio-pci): [`Stage2Keys`] builds the command-line keys,
//!   [`write_disk_pattern`] / [`verify_disk_pattern`] prepare and check a disk
//!   image for the virtio-blk checks, [`virtio_checks`] names the checks a
//!   device reports, [`ScratchDir`] holds the files of one test;
//! * hostile mode: [`Stage2Keys::hostile`] turns it on, [`hostile_checks`]
//!   names its checks;
//! * [`spawn_vm`] starts a VMM and returns a [`RunningVm`] whose serial
//!   output can be watched while it runs ([`RunningVm::wait_for_line`]);
//! * vsock: [`vsock_connect`] speaks the hybrid backend's `CONNECT` as Kata does,
//!   [`vsock_exchange`] is the host end of the guest's vsock streams;
//! * virtio-net: [`NetNs`] is a network namespace for the VMM's TAP,
//!   [`PacketSocket`] sends and captures frames on that TAP,
//!   [`net_test_frame`] / [`verify_net_tx_frames`] define and check the test
//!   frames, and [`exchange_test_frames`] is the whole host side of the
//!   guest's `rx` and `tx` checks.
//!
//! This is test support code: its functions panic with a descriptive message
//! when the environment is broken (guest does not build, QEMU missing).

#![deny(missing_docs)]

// One file per concern (the VMM run, the guest's report, disks, networking, QEMU, the daemons);
// everything public is re-exported here, so tests name it `e2e::<item>`.
pub mod api;
mod checks;
mod daemon;
mod disk;
mod guest;
mod held;
pub mod lifecycle;
mod net;
mod net_boot;
mod parallel;
mod qemu;
mod report;
mod scratch;
mod stream;
mod vhost_user_block;
mod virtiofsd;
mod vm;
mod vsock;

pub use checks::{
    hostile_checks, stage1_cmdline, unix_now, virtio_checks, Stage2Keys, HOSTILE_ATTACKS,
    STAGE1_CHECKS, STAGE2_PCI_CHECKS, VIRTIO_BLK_CHECKS, VIRTIO_CONSOLE_CHECKS, VIRTIO_NET_CHECKS,
    VIRTIO_NET_MQ_CHECKS, VIRTIO_RNG_CHECKS,
};
pub use disk::{
    compare_image, disk_pattern_byte, guest_pattern_byte, soak_blk_keys, soak_blk_written_line,
    verify_disk_pattern, verify_guest_pattern, write_disk_pattern, GUEST_WRITE_SECTORS,
    SECTOR_SIZE,
};
pub use guest::{guest_elf, kvm_available, nimbus_test_guest, repo_root, require_kvm};
pub use held::{is_ofd_locked, process_holds};
pub use net::{
    capture_frames, exchange_test_frames, format_mac, net_test_frame, net_test_frame_index,
    net_test_payload, send_frames, verify_net_tx_frames, NetDir, NetExchange, NetNs, PacketSocket,
    BROADCAST_MAC, HOST_TEST_MAC, NET_PAYLOAD_SIZES, NET_TEST_ETHERTYPE,
};
pub use net_boot::{
    boot_net, boot_net_mq, check_net_mq_report, net_tx_frames_of_pair, net_tx_frames_per_pair, Nic,
};
pub use parallel::{spawn_vm_parallel, LineMatch, PARALLEL_VMS};
pub use qemu::{
    qemu_binary, qemu_q35_command, qemu_vhost_user_blk_args, qemu_vhost_user_fs_args, Qmp,
};
pub use report::{GuestReport, TestLine};
pub use scratch::ScratchDir;
pub use stream::read_until;
pub use vhost_user_block::{
    vhost_user_block_binary, workspace_bin, workspace_binary, VhostUserBlockDaemon,
    VhostUserBlockRun, VHOST_USER_BLOCK_ENV,
};
pub use virtiofsd::{
    virtiofs_keys, virtiofsd_binary, Virtiofsd, VirtiofsdRun, VIRTIOFSD_ENV, VIRTIO_FS_CHECKS,
};
pub use vm::{run_vm, spawn_vm, RunningVm, VmRun};
pub use vsock::{
    accept_n, expect_closed, read_line, vsock_connect, vsock_exchange, vsock_pattern, GUEST_SEED,
    HOST_SEED,
};
