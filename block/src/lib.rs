//! Disk images and virtio-blk request handling, shared by the in-process device and the vhost-user daemon.
#![deny(missing_docs)]
