#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/.

Each seed is a meaningful input in the format the target's header comment describes (and
fuzz/src/lib.rs for the shared ones): real virtio-blk requests, network frames, driver
sequences for virtio-pci, a vmlinux ELF with a PVH note and a bzImage, command lines, HTTP
requests and responses, JSON bodies, vhost-user message streams in both directions.
Deterministic: running it again rewrites the same files. Usage: fuzz/seeds.py
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def piece(b):
    return u16(len(b)) + b


# --- split virtqueues (fuzz/src/lib.rs: QueueInput, RingLayout) -----------------------------

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Ring:
    """A driver writing a guest memory image: rings at the start, buffers after them."""

    def __init__(self, size_log2=3, base=0x400, at=0):
        """Rings at guest address `at`, buffers from `at + base`."""
        self.size_log2 = size_log2
        self.size = 1 << size_log2
        self.at = at
        self.desc = at
        self.avail = self.desc + 16 * self.size
        self.used = (self.avail + 6 + 2 * self.size + 3) & ~3
        self.mem = bytearray(max(base, self.used - at + 6 + 8 * self.size))
        self.next_desc = 0
        self.avail_idx = 0
        self.next_buf = at + base

    def poke(self, addr, data):
        addr -= self.at
        end = addr + len(data)
        if end > len(self.mem):
            self.mem.extend(b"\0" * (end - len(self.mem)))
        self.mem[addr:end] = data

    def alloc(self, data):
        addr = self.next_buf
        self.poke(addr, data)
        self.next_buf = (addr + len(data) + 15) & ~15
        return addr

    def buf(self, n):
        return self.alloc(b"\0" * n)

    def store_desc(self, i, addr, ln, flags, nxt):
        self.poke(self.desc + 16 * (i % self.size), u64(addr) + u32(ln) + u16(flags) + u16(nxt))

    def push_avail(self, head):
        self.poke(self.avail + 4 + 2 * (self.avail_idx % self.size), u16(head))
        self.avail_idx += 1
        self.poke(self.avail + 2, u16(self.avail_idx))

    def chain(self, bufs):
        """bufs: (addr, len, write)"""
        head = self.next_desc
        for k, (addr, ln, w) in enumerate(bufs):
            i = (head + k) % self.size
            flags = (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(bufs) else 0)
            self.store_desc(i, addr, ln, flags, (i + 1) % self.size)
        self.next_desc = (head + len(bufs)) % self.size
        self.push_avail(head)

    def indirect(self, bufs):
        table = b""
        for k, (addr, ln, w) in enumerate(bufs):
            flags = (F_WRITE if w else 0) | (F_NEXT if k + 1 < len(bufs) else 0)
            table += u64(addr) + u32(ln) + u16(flags) + u16(k + 1)
        t = self.alloc(table)
        head = self.next_desc
        self.store_desc(head, t, len(table), F_INDIRECT, 0)
        self.next_desc = (head + 1) % self.size
        self.push_avail(head)

    def input(self, flags=0, budget=16, extra=0, rest=b""):
        img = bytes(self.mem)
        return bytes([self.size_log2, flags, budget, extra]) + piece(img) + rest


def R(addr, ln):
    return (addr, ln, False)


def W(addr, ln):
    return (addr, ln, True)


def blk_header(t, sector=0):
    return u32(t) + u32(0) + u64(sector)


def block_seeds():
    IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
    # One of each request, one chain each.
    r = Ring()
    r.chain([R(r.alloc(blk_header(IN, 1)), 16), W(r.buf(512), 512), W(r.buf(1), 1)])
    r.chain([R(r.alloc(blk_header(OUT, 2)), 16), R(r.alloc(b"\xa5" * 512), 512), W(r.buf(1), 1)])
    r.chain([R(r.alloc(blk_header(FLUSH)), 16), W(r.buf(1), 1)])
    r.chain([R(r.alloc(blk_header(GET_ID)), 16), W(r.buf(20), 20), W(r.buf(1), 1)])
    seg = u64(4) + u32(8) + u32(0)
    r.chain([R(r.alloc(blk_header(DISCARD)) , 16), R(r.alloc(seg), 16), W(r.buf(1), 1)])
    seg = u64(16) + u32(4) + u32(1)  # unmap
    r.chain([R(r.alloc(blk_header(WRITE_ZEROES)), 16), R(r.alloc(seg), 16), W(r.buf(1), 1)])
    put("block_queue", "each-request", r.input())
    put("block_queue", "each-request-bounded-readonly", r.input(flags=2 | 4, budget=2))
    # Header, data and status in one descriptor each way; an indirect table; two segments.
    r = Ring(size_log2=2)
    r.chain([R(r.alloc(blk_header(OUT, 0) + b"\x11" * 1024), 16 + 1024), W(r.buf(1), 1)])
    r.indirect([R(r.alloc(blk_header(IN, 0)), 16), W(r.buf(1024 + 1), 1024 + 1)])
    segs = u64(0) + u32(1) + u32(0) + u64(8) + u32(1) + u32(0)
    r.chain([R(r.alloc(blk_header(DISCARD) + segs), 48), W(r.buf(1), 1)])
    put("block_queue", "merged-and-indirect", r.input(flags=1))
    # Out of range, not whole sectors, unknown type.
    r = Ring(size_log2=2)
    r.chain([R(r.alloc(blk_header(IN, 1 << 40)), 16), W(r.buf(512), 512), W(r.buf(1), 1)])
    r.chain([R(r.alloc(blk_header(OUT, 0)), 16), R(r.alloc(b"x" * 100), 100), W(r.buf(1), 1)])
    r.chain([R(r.alloc(blk_header(99, 0)), 16), W(r.buf(1), 1)])
    put("block_queue", "bad-requests", r.input())


def eth_frame(payload=b"hello", ethertype=0x0800):
    dst = bytes.fromhex("525400123456")
    src = bytes.fromhex("525400abcdef")
    frame = dst + src + struct.pack(">H", ethertype) + payload
    return frame + b"\0" * max(0, 60 - len(frame))


VNET_HDR = b"\0" * 12


def net_seeds():
    # Transmit: a packet in one descriptor, one in three, and a device-writable one (dropped).
    r = Ring()
    pkt = VNET_HDR + eth_frame(b"ping" * 10)
    r.chain([R(r.alloc(pkt), len(pkt))])
    f = eth_frame(b"split" * 20)
    r.chain([R(r.alloc(VNET_HDR), 12), R(r.alloc(f[:14]), 14), R(r.alloc(f[14:]), len(f) - 14)])
    r.chain([R(r.alloc(VNET_HDR), 12), W(r.buf(64), 64)])
    put("net_tx", "three-packets", r.input(budget=8, extra=1))
    # A packet with a GSO header asking for a checksum.
    r = Ring(size_log2=1)
    hdr = bytes([1, 1]) + u16(14) + u16(1448) + u16(34) + u16(16) + u16(0)
    pkt = hdr + eth_frame(b"\x45" + b"\0" * 60)
    r.chain([R(r.alloc(pkt), len(pkt))])
    put("net_tx", "gso", r.input(flags=1))

    # Receive: big buffers without MRG_RXBUF; small ones with it.
    r = Ring()
    for _ in range(3):
        r.chain([W(r.buf(1526), 1526)])
    packets = b"".join(piece(VNET_HDR + eth_frame(bytes([i]) * 100)) for i in range(2))
    put("net_rx", "two-packets", r.input(budget=8, rest=packets))
    r = Ring()
    for _ in range(5):
        r.chain([W(r.buf(64), 64)])
    packets = piece(VNET_HDR + eth_frame(b"m" * 200)) + piece(VNET_HDR + eth_frame(b"s"))
    put("net_rx", "mergeable", r.input(flags=2 | 4, budget=8, extra=1, rest=packets))
    r = Ring(size_log2=1)
    r.chain([W(r.buf(12), 12), W(r.buf(30), 30)])
    put("net_rx", "too-small", r.input(budget=4, rest=piece(VNET_HDR + eth_frame(b"z" * 80))))

    # Control queue: VQ_PAIRS_SET 2, an unsupported class, a chain without ack room.
    r = Ring()
    r.chain([R(r.alloc(bytes([4, 0])), 2), R(r.alloc(u16(2)), 2), W(r.buf(1), 1)])
    r.chain([R(r.alloc(bytes([0, 1, 1])), 3), W(r.buf(1), 1)])
    r.chain([R(r.alloc(bytes([4, 0]) + u16(1)), 4)])
    put("net_ctrl", "pairs-set", r.input(budget=8, extra=1))


def virtio_seeds():
    r = Ring()
    r.chain([W(r.buf(16), 16)])
    r.chain([W(r.buf(64), 64), W(r.buf(8), 8)])
    r.chain([R(r.alloc(b"junk"), 4), W(r.buf(32), 32)])
    put("rng_queue", "buffers", r.input(extra=1))

    # pmem: a FLUSH, an unknown request type, a chain without a response buffer.
    r = Ring()
    r.chain([R(r.alloc(u32(0)), 4), W(r.buf(4), 4)])
    r.chain([R(r.alloc(u32(7)), 4), W(r.buf(4), 4)])
    r.chain([R(r.alloc(u32(0)), 4)])
    put("memory_queues", "pmem-flush", r.input(extra=0))
    # balloon inflate: pages inside the image's memory and far outside it.
    r = Ring()
    r.chain([R(r.alloc(u32(8) + u32(9) + u32(0xFFFFFFFF) + u32(0x100000)), 16)])
    put("memory_queues", "balloon-inflate", r.input(extra=1))
    # balloon stats: two statistics; reporting: one free range.
    r = Ring()
    r.chain([R(r.alloc(u16(4) + u64(1 << 20) + u16(5) + u64(1 << 24)), 20)])
    put("memory_queues", "balloon-stats", r.input(extra=3))
    r = Ring()
    r.chain([W(0x2000, 0x1000)])
    put("memory_queues", "balloon-report", r.input(extra=4))

    tx = Ring()
    tx.chain([R(tx.alloc(b"hello, console\n"), 15)])
    tx.chain([R(tx.alloc(b"two "), 4), R(tx.alloc(b"parts\n"), 6), W(tx.buf(8), 8)])
    rx = Ring()
    rx.chain([W(rx.buf(4), 4)])
    rx.chain([W(rx.buf(64), 64)])
    rx_in = rx.input()
    put("console_queue", "output-and-input", tx.input(extra=2) + piece(b"typed input\r") + rx_in)


# --- vsock (fuzz_targets/vsock_queue.rs) -------------------------------------------------------

def vsock_header(op, src_port, dst_port, length=0, flags=0, buf_alloc=65536, fwd_cnt=0,
                 src_cid=3, dst_cid=2, type_=1):
    """struct virtio_vsock_hdr, little-endian (virtio 1.2 5.10.6)."""
    return (u64(src_cid) + u64(dst_cid) + u32(src_port) + u32(dst_port) + u32(length)
            + u16(type_) + u16(op) + u32(flags) + u32(buf_alloc) + u32(fwd_cnt))


def vsock_seeds():
    REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE = 1, 2, 3, 4, 5, 6
    tx = Ring(size_log2=4)
    # The guest connects to host port 1234 (a listener exists) and sends data.
    tx.chain([R(tx.alloc(vsock_header(REQUEST, 5000, 1234)), 44)])
    tx.chain([R(tx.alloc(vsock_header(RW, 5000, 1234, 5)), 44), R(tx.alloc(b"hello"), 5)])
    tx.chain([R(tx.alloc(vsock_header(CREDIT_UPDATE, 5000, 1234, fwd_cnt=0)), 44)])
    # To a port nobody listens on, then a shutdown and a stray reset.
    tx.chain([R(tx.alloc(vsock_header(REQUEST, 5001, 77)), 44)])
    tx.chain([R(tx.alloc(vsock_header(SHUTDOWN, 5000, 1234, flags=3)), 44)])
    tx.chain([R(tx.alloc(vsock_header(RST, 6000, 1)), 44)])
    # Answers to the host clients' requests (host ports are given from 2^30).
    tx.chain([R(tx.alloc(vsock_header(RESPONSE, 5, 1 << 30)), 44)])
    tx.chain([R(tx.alloc(vsock_header(RST, 1234, (1 << 30) + 1)), 44)])
    # Misaddressed and short.
    tx.chain([R(tx.alloc(vsock_header(REQUEST, 1, 2, src_cid=9)), 44)])
    tx.chain([R(tx.alloc(b"short"), 5)])
    rx = Ring(size_log2=4)
    for _ in range(8):
        rx.chain([W(rx.buf(128), 128)])
    clients = piece(b"CONNECT 5\n") + piece(b"connect 1234\nearly bytes") + piece(b"GET / HTTP/1.1\r\n")
    put("vsock_queue", "both-ways", tx.input(extra=3, rest=clients + rx.input()))
    # Header and payload in one descriptor, a full rx buffer list in one chain.
    tx = Ring(size_log2=3)
    tx.chain([R(tx.alloc(vsock_header(REQUEST, 7000, 1234)), 44)])
    tx.chain([R(tx.alloc(vsock_header(RW, 7000, 1234, 3) + b"abc"), 47)])
    rx = Ring(size_log2=3)
    rx.chain([W(rx.buf(20), 20), W(rx.buf(60), 60)])
    rx.chain([W(rx.buf(44), 44)])
    put("vsock_queue", "one-descriptor", tx.input(extra=1, rest=piece(b"") * 3 + rx.input()))


# --- PCI (fuzz_targets/pci_config.rs, virtio_pci.rs) ------------------------------------------

MSIX_CAP = 0x98  # after the common, notify, ISR, device and PCI-access capabilities
PCICFG_CAP = 0x84


def pci_seeds():
    ops = b""
    dev1 = 1 << 11
    # Read the ids of slot 1 through both mechanisms, size BAR 0, place it, turn decoding on.
    ops += bytes([4, 1]) + u16(0)
    ops += bytes([0]) + u32(0x8000_0000 | dev1 | 0x10)
    ops += bytes([1, 0, 2]) + u32(0xFFFF_FFFF)
    ops += bytes([2, 0, 2])
    ops += bytes([1, 0, 2]) + u32(0xC000_0000)
    ops += bytes([0]) + u32(0x8000_0000 | dev1 | 0x04)
    ops += bytes([1, 0, 1]) + u32(0x0006)
    # MSI-X: enable through ECAM, program and unmask vector 0 in the table, raise it.
    ops += bytes([3]) + u32((1 << 15) | MSIX_CAP) + bytes([2]) + u32(0x8000_0000)
    ops += bytes([5, 0]) + u16(0x4000) + bytes([3]) + u64(0xFEE0_0000)
    ops += bytes([5, 0]) + u16(0x4008) + bytes([2]) + u64(0x41)
    ops += bytes([5, 0]) + u16(0x400C) + bytes([2]) + u64(0)
    ops += bytes([6, 0]) + u16(0x5000) + bytes([3])
    ops += bytes([4, 1]) + u16(MSIX_CAP // 4)
    put("pci_config", "size-place-msix", ops)
    # Slot 2's BAR moved over slot 1's, then away again.
    ops = b""
    for dev in (1, 2):
        ops += bytes([3]) + u32((dev << 15) | 0x04) + bytes([1]) + u32(0x0002)
    ops += bytes([3]) + u32((2 << 15) | 0x10) + bytes([2]) + u32(0xC000_0000)
    ops += bytes([3]) + u32((2 << 15) | 0x10) + bytes([2]) + u32(0xC100_0000)
    ops += bytes([6, 0]) + u16(0x2000) + bytes([0])
    put("pci_config", "bar-over-bar", ops)

    def w(off, ln, v):
        return bytes([0, off >> 12]) + u16(off & 0xFFF) + bytes([{1: 0, 2: 1, 4: 2, 8: 3}[ln]]) + u64(v)

    def rd(off, ln):
        return bytes([1, off >> 12]) + u16(off & 0xFFF) + bytes([{1: 0, 2: 1, 4: 2, 8: 3}[ln]])

    def cfg(reg, byte, ln, v):
        return bytes([2]) + u16(reg) + bytes([byte, {1: 0, 2: 1, 4: 2}[ln]]) + u32(v)

    drv = b""
    drv += w(0x14, 1, 1) + w(0x14, 1, 3)
    drv += w(0x00, 4, 0) + rd(0x04, 4) + w(0x00, 4, 1) + rd(0x04, 4)
    drv += w(0x08, 4, 0) + w(0x0C, 4, 0x3000_0001) + w(0x08, 4, 1) + w(0x0C, 4, 1)
    drv += w(0x14, 1, 0xB) + rd(0x14, 1)
    drv += cfg(MSIX_CAP // 4, 2, 2, 0x8000)
    for v in range(3):
        drv += w(0x4000 + 16 * v, 8, 0xFEE0_0000) + w(0x4008 + 16 * v, 4, 0x40 + v)
        drv += w(0x400C + 16 * v, 4, 0)
    drv += w(0x10, 2, 0)
    for q, base in ((0, 0x1000), (1, 0x2000)):
        drv += w(0x16, 2, q) + rd(0x18, 2) + w(0x18, 2, 16) + w(0x1A, 2, q + 1)
        drv += w(0x20, 8, base) + w(0x28, 8, base + 0x100) + w(0x30, 8, base + 0x200)
        drv += w(0x1C, 2, 1)
    drv += w(0x2000, 4, 0x1234) + rd(0x2000, 8)
    drv += w(0x14, 1, 0xF) + bytes([3]) + rd(0x14, 1)
    drv += bytes([5, 0]) + bytes([4, 0]) + bytes([4, 0xFF]) + rd(0x1000, 1) + rd(0x5000, 8)
    # The PCI configuration access window: read the status through it.
    drv += cfg(PCICFG_CAP // 4 + 1, 0, 1, 0) + cfg(PCICFG_CAP // 4 + 2, 0, 4, 0x14)
    drv += cfg(PCICFG_CAP // 4 + 3, 0, 4, 1) + cfg(PCICFG_CAP // 4 + 4, 0, 1, 0)
    # BAR 0 moves (the ioeventfds follow), then the driver resets the device.
    drv += cfg(4, 0, 4, 0xD000_0000) + w(0x14, 1, 0) + bytes([3]) + rd(0x14, 1)
    put("virtio_pci", "driver-direct", bytes([0]) + drv)
    put("virtio_pci", "driver-control", bytes([1]) + drv)
    bad = w(0x14, 1, 3) + w(0x08, 4, 0) + w(0x0C, 4, 0xFFFF_FFFF) + w(0x14, 1, 0xB)
    bad += w(0x16, 2, 0) + w(0x18, 2, 3) + w(0x1C, 2, 1) + w(0x14, 1, 0xF) + rd(0x14, 1)
    put("virtio_pci", "bad-setup", bytes([0]) + bad)


# --- kernels (fuzz_targets/kernel_loader.rs) -------------------------------------------------


def elf_vmlinux(pvh_entry=0x1000000, with_note=True):
    code = b"\xf4" * 64  # hlt
    note = b""
    if with_note:
        name = b"Xen\0"
        desc = u32(pvh_entry)
        note = u32(len(name)) + u32(len(desc)) + u32(18) + name + desc
    phnum = 2 if with_note else 1
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phnum * phentsize
    code_off = data_off
    note_off = code_off + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    eh = ident + u16(2) + u16(62) + u32(1) + u64(0x1000000) + u64(phoff) + u64(0)
    eh += u32(0) + u16(ehsize) + u16(phentsize) + u16(phnum) + u16(64) + u16(0) + u16(0)
    ph = u32(1) + u32(5) + u64(code_off) + u64(0xFFFFFFFF81000000) + u64(0x1000000)
    ph += u64(len(code)) + u64(len(code) + 0x1000) + u64(0x1000)
    if with_note:
        ph += u32(4) + u32(4) + u64(note_off) + u64(0) + u64(0) + u64(len(note)) + u64(len(note))
        ph += u64(4)
    return eh + ph + code + note


def bzimage():
    setup_sects = 4
    img = bytearray((setup_sects + 1) * 512 + 4096)
    img[0x1F1] = setup_sects
    img[0x1FE:0x200] = u16(0xAA55)
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = u16(0x020F)
    img[0x211] = 0x01
    img[0x214:0x218] = u32(0x100000)
    img[0x230:0x234] = u32(0x1000000)
    return bytes(img)


def kernel_seeds():
    cmd = b"console=ttyS0 reboot=k panic=1"
    initrd = b"070701" + b"0" * 100
    put("kernel_loader", "vmlinux-pvh", piece(cmd) + piece(b"") + b"\0" + elf_vmlinux())
    put("kernel_loader", "vmlinux-pvh-initramfs", piece(cmd) + piece(initrd) + b"\1" + elf_vmlinux())
    put("kernel_loader", "vmlinux-no-note", piece(b"") + piece(b"") + b"\0" + elf_vmlinux(with_note=False))
    put("kernel_loader", "bzimage", piece(cmd) + piece(b"") + b"\0" + bzimage())
    put("kernel_loader", "bzimage-initramfs", piece(cmd) + piece(initrd) + b"\1" + bzimage())


# --- command lines, HTTP, API (cli.rs, api_http.rs, api_request.rs) -------------------------


def text_seeds():
    nimbus = [
        ["--kernel", "/boot/vmlinux", "--cmdline", "console=hvc0 root=/dev/vda1 rw",
         "--cpus", "boot=2,max=4", "--memory", "size=1G,shared=on",
         "--disk", "path=/img/root.raw,num_queues=2,queue_size=256",
         "path=/img/data.raw,readonly=on,serial=data",
         "--net", "tap=tap0,mac=52:54:00:12:34:56,num_queues=4,queue_size=256",
         "--rng", "src=/dev/urandom", "--serial", "tty", "--console", "off"],
        ["--kernel", "/k", "--initramfs", "/i", "--memory", "size=512M,shared=on,hugepages=off",
         "--disk", "vhost_user=on,socket=/run/vub.sock,num_queues=4",
         "--net", "vhost_user=on,socket=/run/vun.sock,vhost_mode=server,num_queues=2",
         "--fs", "tag=share,socket=/run/virtiofsd.sock,num_queues=1,queue_size=512",
         "--api-socket", "path=/run/nimbus.sock", "-v"],
        ["--kernel", "/k", "--cpus", "boot=1,max_phys_bits=40,nested=off",
         "--memory", "size=2G,hotplug_size=4G,hotplug_method=acpi,thp=on,prefault=on",
         "--net", "fd=[3,4],mac=52:54:00:00:00:02", "ip=192.168.1.1,mask=255.255.255.0",
         "--console", "file=/tmp/console.log", "--serial", "null"],
        ["--api-socket", "fd=3"],
        # Consoles on PTYs and sockets, the debug console, empty values, bracket lists, the
        # topology and affinity.
        ["--kernel", "/k", "--serial", "pty", "--console", "socket=\"/run/a,b.sock\",iommu=off",
         "--debug-console", "file=/tmp/dbg.log,iobase=0x402",
         "--cpus", "boot=4,max=6,topology=1:3:1:2,affinity=[0@[0,1],1@[2-3],5@4],features=[],nested=on",
         "--net", "tap=,mac=,ip=,fd=", "--disk", "path=/img/a.raw,serial=,image_type=raw"],
        ["--kernel", "/k", "--serial", "socket=/run/serial.sock", "--console", "pty",
         "--debug-console", "pty", "--cpus", "boot=2,topology=2:1:1:1,features=amx,kvm_hyperv=off"],
    ]
    for i, args in enumerate(nimbus):
        put("cli", f"nimbus-{i}", b"\0" + "\0".join(args).encode())
    put("cli", "block-backend", b"\1" + b"path=/img/disk.raw,socket=/run/vub.sock,num_queues=2,"
        b"queue_size=256,readonly=true,direct=false,serial=disk0,poll_queue=true,poll_us=50,"
        b"image_type=unknown")
    put("cli", "net-backend", b"\2" + b"ip=192.168.10.1,mask=255.255.255.0,socket=/run/vun.sock,"
        b"num_queues=4,queue_size=256,tap=vun0,mac=52:54:00:00:00:01,host_mac=52:54:00:00:00:02,"
        b"mtu=1500,client=off")

    vm = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 536870912, "shared": True},
        "payload": {"kernel": "/boot/vmlinux", "cmdline": "console=hvc0", "initramfs": "/boot/initrd"},
        "disks": [{"path": "/img/root.raw", "num_queues": 2, "queue_size": 128, "id": "root"},
                  {"vhost_user": True, "vhost_socket": "/run/vub.sock"}],
        "net": [{"tap": "tap0", "mac": "52:54:00:12:34:56", "num_queues": 2, "queue_size": 256}],
        "fs": [{"tag": "share", "socket": "/run/virtiofsd.sock", "num_queues": 1, "queue_size": 1024}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Null"},
        "console": {"mode": "Tty"},
    }
    create = json.dumps(vm).encode()
    reqs = {
        "vm-create": (1, "/api/v1/vm.create", create),
        "vm-create-minimal": (1, "/api/v1/vm.create", b'{"payload":{"kernel":"/k"}}'),
        "add-disk": (1, "/api/v1/vm.add-disk", b'{"path":"/img/new.raw","readonly":true,"id":"d1"}'),
        "add-net": (1, "/api/v1/vm.add-net", b'{"tap":"tap1","num_queues":2,"mac":"52:54:00:00:00:09"}'),
        "add-fs": (1, "/api/v1/vm.add-fs", b'{"tag":"t","socket":"/s.sock"}'),
        "remove-device": (1, "/api/v1/vm.remove-device", b'{"id":"_disk0"}'),
        "resize": (1, "/api/v1/vm.resize", b'{"desired_vcpus":4,"desired_ram":1073741824}'),
        "snapshot": (1, "/api/v1/vm.snapshot", b'{"destination_url":"file:///tmp/snap"}'),
        "ping": (0, "/api/v1/vmm.ping", b""),
        "info": (0, "/api/v1/vm.info", b""),
        "boot": (1, "/api/v1/vm.boot", b""),
        "wrong-method": (0, "/api/v1/vm.boot", b""),
        "unknown": (1, "/api/v1/vm.nothing?x=1", b"{}"),
    }
    for name, (m, path, body) in reqs.items():
        put("api_request", name, bytes([m]) + piece(path.encode()) + body)

    def http(method, path, body=None, extra=""):
        h = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n{extra}"
        if body is not None:
            h += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return h.encode() + b"\r\n" + (body or b"")

    server = {
        "put-create": http("PUT", "/api/v1/vm.create", create),
        "pipelined": http("GET", "/api/v1/vmm.ping") + http("PUT", "/api/v1/vm.boot", b"")
        + http("GET", "/api/v1/vm.info", None, "Connection: close\r\n"),
        "chunked": b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\n{\"pat\r\n11\r\nh\":\"/img/a.raw\"}\r\n"
        b"0\r\nTrailer: x\r\n\r\n",
        "expect-continue": http("PUT", "/api/v1/vm.add-net", b'{"tap":"t0"}', "Expect: 100-continue\r\n"),
        "http10": b"\r\nGET /api/v1/vmm.ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "bad-length": b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n{}",
    }
    for name, data in server.items():
        put("api_http", "server-" + name, b"\0" + u16(len(data) // 2) + data)
    client = {
        "ok-json": b"HTTP/1.1 200\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: 47\r\n\r\n"
        b'{"build_version":"v","version":"1","pid":1,"fe":1}'[:47],
        "no-content": b"HTTP/1.1 204\r\nServer: Cloud Hypervisor API\r\n\r\n",
        "continue-then-error": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400\r\n"
        b"Content-Type: application/json\r\nContent-Length: 26\r\n\r\n[\"Error from API\",\"bad x\"]",
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n0\r\n\r\n",
        "until-close": b"HTTP/1.0 500\r\nConnection: close\r\n\r\n[\"boom\"]",
    }
    for name, data in client.items():
        put("api_http", "client-" + name, b"\1" + data)


# --- vhost-user (vhost_user_block.rs, vhost_user_net.rs, vhost_user_frontend.rs) -------------

GET_FEATURES, SET_FEATURES, SET_OWNER = 1, 2, 3
SET_MEM_TABLE = 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
GET_MAX_MEM_SLOTS, ADD_MEM_REG = 36, 37

P_MQ, P_REPLY_ACK, P_CONFIG, P_INFLIGHT = 1 << 0, 1 << 3, 1 << 9, 1 << 12
VERSION_1, PROTOCOL_FEATURES, EVENT_IDX = 1 << 32, 1 << 30, 1 << 29

UADDR = 0x7F00_0000_0000


def msg(req, payload=b"", flags=1):
    return u32(req) + u32(flags) + u32(len(payload)) + payload


def record(data, fds=0):
    return bytes([fds]) + piece(data)


MEMFD, KICK, CALL, WAIT = 1, 1 | 4, 1 | 4 | 0x10, 0x40


def ring_addrs(q):
    base = 0x1000 * (q + 1) * 4
    r = Ring(size_log2=4, at=base)
    return r, base


def frontend_stream(queues, features, requests=None):
    """A frontend's session; `requests(ring)` fills queue 0's ring in guest memory."""
    s = b""
    if requests is not None:
        r, base = ring_addrs(0)
        requests(r)
        s += record(u32(base) + bytes(r.mem), 8)
    s += record(msg(SET_OWNER))
    s += record(msg(GET_FEATURES))
    s += record(msg(GET_PROTOCOL_FEATURES))
    s += record(msg(SET_PROTOCOL_FEATURES, u64(P_MQ | P_REPLY_ACK | P_CONFIG)))
    s += record(msg(GET_QUEUE_NUM))
    s += record(msg(GET_CONFIG, u32(0) + u32(60) + u32(0) + b"\0" * 60))
    s += record(msg(SET_FEATURES, u64(features)))
    region = u64(0) + u64(0x10_0000) + u64(UADDR) + u64(0)
    s += record(msg(SET_MEM_TABLE, u32(1) + u32(0) + region, flags=1 | 8), MEMFD)
    for q in range(queues):
        r, base = ring_addrs(q)
        s += record(msg(SET_VRING_NUM, u32(q) + u32(16)))
        addr = u32(q) + u32(0) + u64(UADDR + r.desc) + u64(UADDR + r.used)
        addr += u64(UADDR + r.avail) + u64(0)
        s += record(msg(SET_VRING_ADDR, addr))
        s += record(msg(SET_VRING_BASE, u32(q) + u32(0)))
        s += record(msg(SET_VRING_CALL, u64(q)), CALL)
        # Enabled before the kick: the kick eventfd comes signalled, so the ring is served as
        # soon as it is registered.
        s += record(msg(SET_VRING_ENABLE, u32(q) + u32(1)))
        s += record(msg(SET_VRING_KICK, u64(q)), KICK)
        if q == 0 and requests is not None:
            s += record(b"", WAIT)
    for q in range(queues):
        s += record(msg(GET_VRING_BASE, u32(q) + u32(0)))
    return s


def vhost_seeds():
    blk_features = VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX | (1 << 9)
    put("vhost_user_block", "handshake-two-queues", frontend_stream(2, blk_features))

    def blk_requests(r):
        r.chain([R(r.alloc(blk_header(1, 0)), 16), R(r.alloc(b"\x5a" * 512), 512), W(r.buf(1), 1)])
        r.chain([R(r.alloc(blk_header(0, 0)), 16), W(r.buf(512), 512), W(r.buf(1), 1)])
        r.chain([R(r.alloc(blk_header(4)), 16), W(r.buf(1), 1)])
        r.chain([R(r.alloc(blk_header(8)), 16), W(r.buf(21), 21)])

    put("vhost_user_block", "requests", frontend_stream(1, blk_features, blk_requests))
    s = record(msg(SET_OWNER)) + record(msg(GET_MAX_MEM_SLOTS))
    s += record(msg(ADD_MEM_REG, u64(0) + u64(0x10_0000) + u64(UADDR) + u64(0)), MEMFD)
    s += record(msg(GET_INFLIGHT_FD, u64(0) + u64(0) + u16(1) + u16(128)))
    s += record(msg(GET_CONFIG, u32(8) + u32(300) + u32(1)))
    put("vhost_user_block", "odd-requests", s)
    net_features = VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX | (1 << 15) | (1 << 22) | (1 << 5)
    put("vhost_user_net", "handshake-two-pairs", frontend_stream(4, net_features))

    def rx_buffers(r):
        for _ in range(4):
            r.chain([W(r.buf(1526), 1526)])

    put("vhost_user_net", "rx-buffers", frontend_stream(2, net_features, rx_buffers))

    def reply(req, payload=b""):
        return record(msg(req, payload, flags=1 | 4))

    def ack(req):
        return reply(req, u64(0))

    def backend_stream(features, protocol, queues, config, inflight, start):
        s = reply(GET_FEATURES, u64(features))
        if features & PROTOCOL_FEATURES:
            s += reply(GET_PROTOCOL_FEATURES, u64(protocol))
            if protocol & P_MQ:
                s += reply(GET_QUEUE_NUM, u64(queues))
        s += reply(GET_CONFIG, u32(0) + u32(len(config)) + u32(1) + config)
        if not start:
            return s
        acked = protocol & P_REPLY_ACK
        if acked:
            s += ack(SET_FEATURES)
        if inflight:
            info = u64(4096) + u64(0) + u16(queues) + u16(128)
            s += record(msg(GET_INFLIGHT_FD, info, flags=1 | 4), MEMFD)
            if acked:
                s += ack(SET_INFLIGHT_FD)
        if acked:
            s += ack(SET_MEM_TABLE)
            for _ in range(queues):
                for req in (SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_CALL,
                            SET_VRING_KICK, SET_VRING_ENABLE):
                    s += ack(req)
        for q in range(queues):
            if acked:
                s += ack(SET_VRING_ENABLE)
            s += reply(GET_VRING_BASE, u32(q) + u32(0))
        return s

    blk_config = u64(2048) + u32(0) + u32(128) + b"\0" * 44
    all_p = P_MQ | P_REPLY_ACK | P_CONFIG | P_INFLIGHT
    put("vhost_user_frontend", "blk-start",
        bytes([2, 1]) + backend_stream(blk_features, all_p, 1, blk_config, True, True))
    put("vhost_user_frontend", "blk-two-queues-no-ack",
        bytes([2, 2]) + backend_stream(blk_features, P_MQ | P_CONFIG, 2, blk_config, False, True))
    put("vhost_user_frontend", "blk-handshake",
        bytes([0, 1]) + backend_stream(blk_features, all_p, 1, blk_config, False, False))
    net_config = bytes.fromhex("525400123456") + u16(1) + u16(2) + u16(1500) + b"\0" * 8
    put("vhost_user_frontend", "net-start",
        bytes([3, 1]) + backend_stream(net_features, P_MQ | P_REPLY_ACK | P_CONFIG, 2, net_config,
                                      False, True))
    put("vhost_user_frontend", "no-version-1",
        bytes([0, 1]) + reply(GET_FEATURES, u64(PROTOCOL_FEATURES)))


if __name__ == "__main__":
    block_seeds()
    net_seeds()
    virtio_seeds()
    vsock_seeds()
    pci_seeds()
    kernel_seeds()
    text_seeds()
    vhost_seeds()
