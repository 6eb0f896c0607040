//! The command line: Cloud Hypervisor 51.1's ch-remote, subcommand for subcommand (names,
//! positional arguments, options and help), so scripts written for ch-remote run unchanged;
//! plus two later additions that do not change 51.1's syntax: `add-generic-vhost-user` and
//! `add-device fd=`. Positional arguments ch-remote needs but does not mark required (it then
//! panics) are required here, and `resize-zone`/`resize-disk` options likewise.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// What `--version` prints after the program name, in the form ch-remote prints its own: the
/// Cloud Hypervisor release whose API this follows (the one `nimbus --version` reports,
/// `vmm::cli::CH_COMPAT_VERSION`), then Nimbus's version.
const VERSION: &str = concat!("v51.1.0 (nimbus ", env!("CARGO_PKG_VERSION"), ")");

const DISK_SYNTAX: &str = "Disk parameters \"path=<disk_image_path>,readonly=on|off,\
direct=on|off,iommu=on|off,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,\
vhost_user=on|off,socket=<vhost_user_socket_path>,id=<device_id>,pci_segment=<segment_id>,\
serial=<serial_number>,image_type=<image_type>\" (the keys Nimbus's --disk reads)";

const NET_SYNTAX: &str = "Network parameters \"tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,\
mac=<mac_addr>,host_mac=<mac_addr>,mtu=<mtu>,fd=<[fd1,fd2,...]>,iommu=on|off,\
num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,\
vhost_user=on|off,socket=<vhost_user_socket_path>,vhost_mode=client|server,\
pci_segment=<segment_id>,offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off\" \
(fd=: descriptors open in this process, passed to the VMM)";

const FS_SYNTAX: &str = "virtio-fs parameters \"tag=<tag_name>,socket=<socket_path>,\
num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,\
pci_segment=<segment_id>\"";

const PMEM_SYNTAX: &str = "Persistent memory parameters \"file=<backing_file_path>,\
size=<persistent_memory_size>,iommu=on|off,discard_writes=on|off,id=<device_id>,\
pci_segment=<segment_id>\"";

const DEVICE_SYNTAX: &str = "Direct device assignment parameters \"path=<device_path>,\
iommu=on|off,id=<device_id>,pci_segment=<segment_id>,x_nv_gpudirect_clique=<clique_id>,\
fd=<vfio_cdev_fd>\" (fd=: a descriptor open in this process, passed to the VMM)";

const USER_DEVICE_SYNTAX: &str =
    "Userspace device \"socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>\"";

const VDPA_SYNTAX: &str = "vDPA device \"path=<device_path>,num_queues=<number_of_queues>,\
iommu=on|off,id=<device_id>,pci_segment=<segment_id>\"";

const VSOCK_SYNTAX: &str = "Virtio VSOCK parameters \"cid=<context_id>,socket=<socket_path>,\
iommu=on|off,id=<device_id>,pci_segment=<segment_id>\"";

const GENERIC_VHOST_USER_SYNTAX: &str = "Generic vhost-user parameters \
\"device_type=<virtio device type number or name (net, block, fs, ...)>,socket=<socket_path>,\
queue_sizes=<[size1,size2,...]>,id=<device_id>,iommu=on|off,pci_segment=<segment_id>,\
pci_device_id=<pci_slot>\"";

const RESTORE_SYNTAX: &str = "Restore from a VM snapshot. \
\nRestore parameters \"source_url=<source_url>,prefault=on|off,\
net_fds=<list_of_net_ids_with_their_associated_fds>\" \
\n`source_url` should be a valid URL (e.g file:///foo/bar) \
\n`prefault` brings memory pages in when enabled (disabled by default) \
\n`net_fds` is a list of net ids with new file descriptors, e.g. [net0@[3,4],net1@[5]]. \
Only net devices backed by FDs directly are needed as input.";

/// Remotely control a Nimbus (Cloud Hypervisor compatible) VMM.
#[derive(Debug, Parser)]
#[command(
    name = "nimbus-remote",
    version = VERSION,
    about = "Remotely control a Nimbus VMM (Cloud Hypervisor's ch-remote interface).",
    arg_required_else_help = true,
    subcommand_required = true
)]
pub struct Cli {
    /// HTTP API socket path (UNIX domain socket).
    #[arg(long = "api-socket", value_name = "api-socket")]
    pub api_socket: Option<PathBuf>,
    /// What to ask the VMM.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands, in ch-remote's (alphabetical) order.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add VFIO device
    AddDevice {
        /// The device.
        #[arg(value_name = "device_config", help = DEVICE_SYNTAX)]
        device_config: String,
    },
    /// Add block device
    AddDisk {
        /// The disk.
        #[arg(value_name = "disk_config", help = DISK_SYNTAX)]
        disk_config: String,
    },
    /// Add virtio-fs backed fs device
    AddFs {
        /// The share.
        #[arg(value_name = "fs_config", help = FS_SYNTAX)]
        fs_config: String,
    },
    /// Add generic vhost-user device
    AddGenericVhostUser {
        /// The device.
        #[arg(value_name = "generic_vhost_user_config", help = GENERIC_VHOST_USER_SYNTAX)]
        generic_vhost_user_config: String,
    },
    /// Add network device
    AddNet {
        /// The interface.
        #[arg(value_name = "net_config", help = NET_SYNTAX)]
        net_config: String,
    },
    /// Add persistent memory device
    AddPmem {
        /// The device.
        #[arg(value_name = "pmem_config", help = PMEM_SYNTAX)]
        pmem_config: String,
    },
    /// Add userspace device
    AddUserDevice {
        /// The device.
        #[arg(value_name = "device_config", help = USER_DEVICE_SYNTAX)]
        device_config: String,
    },
    /// Add vDPA device
    AddVdpa {
        /// The device.
        #[arg(value_name = "vdpa_config", help = VDPA_SYNTAX)]
        vdpa_config: String,
    },
    /// Add vsock device
    AddVsock {
        /// The device.
        #[arg(value_name = "vsock_config", help = VSOCK_SYNTAX)]
        vsock_config: String,
    },
    /// Boot a created VM
    Boot,
    /// Create a coredump from VM
    Coredump {
        /// The file to write.
        #[arg(value_name = "coredump_config", help = "<file_path>")]
        coredump_config: String,
    },
    /// Counters from the VM
    Counters,
    /// Create VM from a JSON configuration
    Create {
        /// The VmConfig JSON file; `-` reads standard input.
        #[arg(value_name = "path", default_value = "-")]
        path: String,
    },
    /// Delete a VM
    Delete,
    /// Info on the VM
    Info,
    /// Trigger NMI
    Nmi,
    /// Pause the VM
    Pause,
    /// Ping the VMM to check for API server availability
    Ping,
    /// Trigger a power button in the VM
    PowerButton,
    /// Reboot the VM
    Reboot,
    /// Receive a VM migration
    ReceiveMigration {
        /// Where the migration arrives.
        #[arg(value_name = "receive_migration_config", help = "<receiver_url>")]
        receive_migration_config: String,
    },
    /// Remove VFIO and PCI device
    RemoveDevice {
        /// The device's id.
        #[arg(value_name = "id", help = "<device_id>")]
        id: String,
    },
    /// Resize the VM
    Resize {
        /// New balloon size in bytes (supports K/M/G suffix)
        #[arg(long, value_name = "balloon")]
        balloon: Option<String>,
        /// New vCPUs count
        #[arg(long, value_name = "cpus")]
        cpus: Option<String>,
        /// New memory size in bytes (supports K/M/G suffix)
        #[arg(long, value_name = "memory")]
        memory: Option<String>,
    },
    /// Resize an attached disk
    ResizeDisk {
        /// Disk identifier
        #[arg(long, value_name = "disk")]
        disk: String,
        /// New disk size
        #[arg(long, value_name = "size")]
        size: String,
    },
    /// Resize a memory zone
    ResizeZone {
        /// Memory zone identifier
        #[arg(long, value_name = "id")]
        id: String,
        /// New memory zone size in bytes (supports K/M/G suffix)
        #[arg(long, value_name = "size")]
        size: String,
    },
    /// Restore VM from a snapshot
    Restore {
        /// The snapshot and the descriptors to hand over.
        #[arg(value_name = "restore_config", help = RESTORE_SYNTAX)]
        restore_config: String,
    },
    /// Resume the VM
    Resume,
    /// Initiate a VM migration
    SendMigration {
        /// Where the VM goes.
        #[arg(value_name = "send_migration_config", help = "<destination_url>")]
        send_migration_config: String,
        /// Local migration (memory is handed over, not copied).
        #[arg(long = "local")]
        send_migration_local: bool,
    },
    /// Shutdown the VM
    Shutdown,
    /// Shutdown the VMM
    ShutdownVmm,
    /// Create a snapshot from VM
    Snapshot {
        /// Where the snapshot goes.
        #[arg(value_name = "snapshot_config", help = "<destination_url>")]
        snapshot_config: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_have_ch_remotes_names_in_its_order() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for name in [
            "add-generic-vhost-user",
            "power-button",
            "shutdown-vmm",
            "resize-zone",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
    }

    #[test]
    fn version_names_cloud_hypervisors_release() {
        assert!(VERSION.starts_with("v51.1.0 (nimbus "));
    }
}
