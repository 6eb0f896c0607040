//! The bodies of the API's requests that are not device configurations (Cloud Hypervisor's
//! `VmResizeData`, `VmSnapshotConfig`, `RestoreConfig`, ...): the server reads them, the
//! client writes them. Unset options are written as `null`, as ch-remote writes them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `vm.remove-device`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveDeviceData {
    /// The device's id.
    pub id: String,
}

/// `vm.resize`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeData {
    /// New vCPU count.
    #[serde(default)]
    pub desired_vcpus: Option<u32>,
    /// New RAM size in bytes.
    #[serde(default)]
    pub desired_ram: Option<u64>,
    /// New balloon size in bytes.
    #[serde(default)]
    pub desired_balloon: Option<u64>,
}

/// `vm.resize-zone`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeZoneData {
    /// The memory zone's id.
    pub id: String,
    /// New size in bytes.
    pub desired_ram: u64,
}

/// `vm.resize-disk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeDiskData {
    /// The disk's id.
    pub id: String,
    /// New size in bytes.
    pub desired_size: u64,
}

/// `vm.snapshot` and `vm.coredump`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDestinationData {
    /// Where the snapshot or dump goes (`file:///dir` for a snapshot).
    pub destination_url: String,
}

/// `vm.send-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSendMigrationData {
    /// Where the VM goes (`unix:<path>` or `tcp:<host>:<port>`).
    pub destination_url: String,
    /// Local migration: memory is handed over, not copied.
    #[serde(default)]
    pub local: bool,
}

/// `vm.receive-migration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReceiveMigrationData {
    /// Where the migration arrives.
    pub receiver_url: String,
}

/// `vm.restore` (CH `RestoreConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// The snapshot (`file:///dir`).
    pub source_url: PathBuf,
    /// Touch all of RAM while restoring.
    #[serde(default)]
    pub prefault: bool,
    /// Interfaces that get new descriptors, in the order the descriptors are sent.
    #[serde(default)]
    pub net_fds: Option<Vec<RestoredNetConfig>>,
}

/// One interface of `vm.restore`'s `net_fds`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredNetConfig {
    /// The interface's id.
    pub id: String,
    /// How many of the sent descriptors are this interface's.
    #[serde(default)]
    pub num_fds: usize,
    /// Descriptor numbers in a body mean nothing (they travel with `SCM_RIGHTS`): written as
    /// `null`, ignored when read.
    #[serde(default, deserialize_with = "crate::net::ignore_fds")]
    pub fds: Option<Vec<i32>>,
}
