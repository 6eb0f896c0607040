/*
 * nimbus-init: the /init of the Nimbus test initramfs (docs/linux-guest.md).
 *
 * It runs as PID 1 of the tailored test kernel, reports what the guest sees as
 * machine-readable lines on its console (the serial port), performs the
 * actions the kernel command line asks for, and powers the VM off. It is one
 * process (no fork, no exec, no threads) and uses no C library: raw system
 * calls only, built with -nostdlib -static -mgeneral-regs-only, so it never
 * touches x87/SSE/AVX state (the test kernel runs with `noxsave`) and each
 * system call (~0.3 ms) and page fault (~1.6 ms) on the emulated PVM hosts
 * is one we chose.
 *
 * Output protocol, one item per line:
 *   NIMBUS-LINUX-INIT pid=1                 first line, as soon as it runs
 *   NIMBUS-LINUX uptime <s> <idle>          /proc/uptime at start
 *   NIMBUS-LINUX cmdline <text>             /proc/cmdline
 *   NIMBUS-LINUX pci <bdf> vendor=<hex> device=<hex> class=<hex> driver=<name|none>
 *                msix=<n> msi=<n>           per PCI device (n: vectors in msi_irqs/)
 *   NIMBUS-LINUX bar <bdf> <i> start=<hex> end=<hex> flags=<hex>
 *                                           per assigned BAR (i 0-5), ROM (6)
 *   NIMBUS-LINUX irq <line>                 /proc/interrupts, line by line
 *   NIMBUS-LINUX iomem <line>               /proc/iomem, line by line
 *   NIMBUS-LINUX block <name> sectors=<n> ro=<0|1>      per disk in /sys/block
 *   NIMBUS-LINUX net <if> mac=<mac> operstate=<state> rx_queues=<n> tx_queues=<n>
 *                                                     per interface in /sys/class/net
 *   NIMBUS-LINUX <action> ...               one result line per action (below)
 *   NIMBUS-LINUX power-off                  last line, then reboot(POWER_OFF)
 *   NIMBUS-LINUX error <what> <errno>       a setup step failed (init goes on)
 *
 * Actions (kernel command-line words, in the order given; errors are -errno).
 * A disk action works on /dev/vda, or on /dev/vdX when written nimbus.disk=vdX:...,
 * or on /dev/pmemN (virtio-pmem) when written nimbus.disk=pmemN:...
 *   nimbus.disk=read:<sector>          prints `disk-read dev=<d> sector=<s> text=<t>`:
 *                                      the printable bytes at the start of that
 *                                      sector (up to the first other byte)
 *   nimbus.disk=write:<sector>:<text>  writes <text> and zeros to the rest of the
 *                                      sector, fsyncs; `disk-write dev=<d> sector=<s>
 *                                      write=<n|-errno> fsync=<0|-errno>`
 *   nimbus.disk=rowrite:<sector>       the same with the text NIMBUS-RO-WRITE, for a
 *                                      read-only disk: `disk-rowrite dev=<d>
 *                                      sector=<s> open=<fd|-errno> [write=<n|-errno>
 *                                      fsync=<0|-errno>]` (write/fsync if it opened)
 *   nimbus.net=udp:<ipv4>:<port>:<text> sends <text> in one UDP datagram from a
 *                                      connected socket, then waits up to 20 s
 *                                      for the answer: the host has nothing on
 *                                      that port, so its ICMP "port unreachable"
 *                                      makes recv fail with ECONNREFUSED (-111);
 *                                      `net-udp send=<n|-errno> recv=<n|-errno>`
 *   nimbus.net=channels:<if>:<n>       asks the interface's driver for <n> combined
 *                                      channels (ethtool -L <if> combined <n>; for
 *                                      virtio-net: VQ_PAIRS_SET(n) on the control
 *                                      queue), then reads them back; `net-channels
 *                                      <if> set=<0|-errno> combined=<n|-errno>
 *                                      max=<n> rx_queues=<n> tx_queues=<n>`
 *   nimbus.reboot=<sector>             reboots once: if that sector of /dev/vda
 *                                      does not start with NIMBUS-REBOOTED, writes
 *                                      it, fsyncs, prints `reboot restarting` and
 *                                      restarts the machine; otherwise prints
 *                                      `reboot second-boot` and carries on
 *   nimbus.vsock=listen:<port>         listens on vsock port <port> (any CID) as
 *                                      Kata's agent does, prints `vsock-listening
 *                                      port=<p> listen=<0|-errno>`, accepts one
 *                                      stream (20 s), reads one line and answers
 *                                      `NIMBUS-ECHO <line>`; `vsock-accept
 *                                      accept=<fd|-errno> recv=<n|-errno>
 *                                      send=<n|-errno> text=<line>`
 *   nimbus.vsock=connect:<port>:<text> connects to host (CID 2) port <port>, sends
 *                                      <text> and a newline, reads the answer line
 *                                      (20 s); `vsock-connect port=<p>
 *                                      connect=<0|-errno> send=<n|-errno>
 *                                      recv=<n|-errno> text=<answer>`
 *   nimbus.hotplug=<vdX>:<cycles>      for each cycle: prints `hotplug-waiting
 *                                      dev=<d> cycle=<i>`, waits (180 s) for disk <d>
 *                                      to be hot-added, prints `hotplug-added dev=<d>
 *                                      sectors=<n>`, reads sector 0 (`disk-read ...`),
 *                                      writes NIMBUS-HOTPLUG-<i> to sector 1
 *                                      (`disk-write ...`), then waits (180 s) for it to
 *                                      be removed: `hotplug-removed dev=<d>`; on a
 *                                      timeout `hotplug-timeout dev=<d>` and
 *                                      the action ends
 *   nimbus.ifup=<if>:<ipv4>            waits (180 s) for interface <if> (hot-added),
 *                                      gives it <ipv4>/24 and brings it up: `ifup <if>
 *                                      wait=<0|-110> addr=<0|-errno> mask=<0|-errno>
 *                                      up=<0|-errno>`
 *   nimbus.ifgone=<if>                 waits (180 s) for interface <if> to go (hot
 *                                      removal): `ifgone <if> gone=<1|0>`
 *   nimbus.memhp=<grow>:<touch>        prints `memhp-waiting memtotal_kb=<k>`, waits (180 s)
 *                                      for MemTotal to grow by <grow> MiB (RAM hot-added
 *                                      and onlined): `memhp-added memtotal_kb=<k>
 *                                      grew_kb=<k> free_grew_kb=<k>` (MemFree's growth:
 *                                      the pages reached the allocator; or `memhp-timeout
 *                                      memtotal_kb=<k>`), then writes every page of <touch>
 *                                      MiB of anonymous memory and frees it: `memhp-touched
 *                                      mib=<n>`
 *   nimbus.sleep=<s>                   sleeps <s> seconds (the host checks what the VMM
 *                                      released after the guest's last action)
 *   nimbus.dump=0                      skips the pci/bar/irq/iomem/net lines
 *   nimbus.balloon=<touch>:<want>      writes every page of <touch> MiB of anonymous
 *                                      memory and frees it (`balloon-touched mib=<n>
 *                                      memtotal_kb=<k>`), then waits up to 60 s for
 *                                      MemTotal to fall by <want> MiB (the host raises
 *                                      the balloon; the driver takes pages, most of them
 *                                      the touched ones): `balloon-inflated
 *                                      memtotal_kb=<k> fell_kb=<k>` or `balloon-timeout
 *                                      memtotal_kb=<k>`
 */

typedef unsigned long u64;
typedef long s64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_nanosleep 35
#define SYS_mmap 9
#define SYS_munmap 11
#define SYS_socket 41
#define SYS_connect 42
#define SYS_sendto 44
#define SYS_recvfrom 45
#define SYS_setsockopt 54
#define SYS_accept 43
#define SYS_bind 49
#define SYS_listen 50
#define SYS_ioctl 16
#define SYS_exit 60
#define SYS_fsync 74
#define SYS_mkdir 83
#define SYS_readlink 89
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_getdents64 217
#define SYS_pread64 17
#define SYS_pwrite64 18

#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECTORY 0200000
#define AF_INET 2
#define SOCK_DGRAM 2
#define SOL_SOCKET 1
#define SO_RCVTIMEO 20
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define VMADDR_CID_ANY 0xffffffffu
#define VMADDR_CID_HOST 2

#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc

#define SECTOR 512

static s64 sys6(s64 n, s64 a, s64 b, s64 c, s64 d, s64 e, s64 f)
{
	register s64 r10 __asm__("r10") = d;
	register s64 r8 __asm__("r8") = e;
	register s64 r9 __asm__("r9") = f;
	s64 ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) sys6((n), (s64)(a), (s64)(b), (s64)(c), 0, 0, 0)

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, u64 n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static int starts(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* ---- output: one line is assembled in `line` and written with one write(2) ---- */

static char line[4096];
static u64 line_len;

static void put(const char *s)
{
	while (*s && line_len < sizeof(line) - 1)
		line[line_len++] = *s++;
}

static void put_n(const char *s, u64 n)
{
	while (n-- && *s && line_len < sizeof(line) - 1)
		line[line_len++] = *s++;
}

static void put_dec(s64 v)
{
	char tmp[24];
	int i = 0;
	u64 u = v < 0 ? -(u64)v : (u64)v;
	if (v < 0)
		put("-");
	do {
		tmp[i++] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	while (i--)
		if (line_len < sizeof(line) - 1)
			line[line_len++] = tmp[i];
}

static void flush_line(void)
{
	line[line_len++] = '\n';
	sys3(SYS_write, 1, line, line_len);
	line_len = 0;
}

static void say(const char *a, const char *b)
{
	put("NIMBUS-LINUX ");
	put(a);
	put(b);
	flush_line();
}

static void error(const char *what, s64 err)
{
	put("NIMBUS-LINUX error ");
	put(what);
	put(" ");
	put_dec(err);
	flush_line();
}

/* ---- files ---- */

static char fbuf[16384];

/* Reads a whole (small) file into fbuf, NUL-terminated; returns its length or -errno. */
static s64 read_file(const char *path)
{
	s64 fd = sys3(SYS_open, path, O_RDONLY, 0);
	s64 total = 0;
	if (fd < 0)
		return fd;
	for (;;) {
		s64 n = sys3(SYS_read, fd, fbuf + total, sizeof(fbuf) - 1 - total);
		if (n <= 0) {
			if (n < 0 && total == 0)
				total = n;
			break;
		}
		total += n;
		if (total >= (s64)sizeof(fbuf) - 1)
			break;
	}
	sys3(SYS_close, fd, 0, 0);
	fbuf[total > 0 ? total : 0] = 0;
	return total;
}

/* The first line of a file (without the newline) into out[cap]; "?" if unreadable. */
static void read_value(const char *path, char *out, u64 cap)
{
	u64 i = 0;
	if (read_file(path) < 0) {
		out[0] = '?';
		out[1] = 0;
		return;
	}
	while (fbuf[i] && fbuf[i] != '\n' && i < cap - 1) {
		out[i] = fbuf[i];
		i++;
	}
	out[i] = 0;
}

/* Prints every line of fbuf as `NIMBUS-LINUX <tag> <line>`. */
static void dump_lines(const char *tag)
{
	char *p = fbuf;
	while (*p) {
		char *e = p;
		while (*e && *e != '\n')
			e++;
		put("NIMBUS-LINUX ");
		put(tag);
		put(" ");
		put_n(p, (u64)(e - p));
		flush_line();
		p = *e ? e + 1 : e;
	}
}

static char path[512];

/* path = a b c d (NULL parts are empty). */
static void path_set4(const char *a, const char *b, const char *c, const char *d)
{
	u64 n = 0;
	const char *parts[4] = { a, b, c, d };
	for (int i = 0; i < 4; i++)
		for (const char *s = parts[i]; s && *s && n < sizeof(path) - 1; s++)
			path[n++] = *s;
	path[n] = 0;
}

static void path_set(const char *a, const char *b, const char *c)
{
	path_set4(a, b, c, 0);
}

struct dirent64 {
	u64 d_ino;
	s64 d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

/*
 * Calls fn(name) for every entry of directory dir except . and .., in name
 * order (at most 64 entries); the names are copied first, so fn may use fbuf
 * and path, and call for_each_entry once more (two levels of nesting).
 * Returns the count or -errno.
 */
static s64 for_each_entry(const char *dir, void (*fn)(const char *name))
{
	static char names_by_depth[2][64][64];
	static int depth;
	char (*names)[64];
	char dents[4096];
	s64 count = 0;
	s64 fd;

	if (depth >= 2)
		return -1;
	names = names_by_depth[depth];
	fd = sys3(SYS_open, dir, O_RDONLY | O_DIRECTORY, 0);
	if (fd < 0)
		return fd;
	for (;;) {
		s64 n = sys3(SYS_getdents64, fd, dents, sizeof(dents));
		if (n <= 0)
			break;
		for (s64 off = 0; off < n;) {
			struct dirent64 *d = (struct dirent64 *)(dents + off);
			off += d->d_reclen;
			if (d->d_name[0] == '.' &&
			    (d->d_name[1] == 0 || (d->d_name[1] == '.' && d->d_name[2] == 0)))
				continue;
			if (count < 64) {
				u64 i = 0;
				while (d->d_name[i] && i < 63) {
					names[count][i] = d->d_name[i];
					i++;
				}
				names[count][i] = 0;
				count++;
			}
		}
	}
	sys3(SYS_close, fd, 0, 0);
	/* Sorted, for a stable output order (insertion sort, at most 64 names). */
	for (s64 i = 1; i < count; i++) {
		for (s64 j = i; j > 0; j--) {
			char *a = names[j - 1], *b = names[j], t;
			u64 k = 0;
			while (a[k] && a[k] == b[k])
				k++;
			if ((unsigned char)a[k] <= (unsigned char)b[k])
				break;
			for (k = 0; k < 64; k++) {
				t = a[k];
				a[k] = b[k];
				b[k] = t;
			}
		}
	}
	depth++;
	if (fn)
		for (s64 i = 0; i < count; i++)
			fn(names[i]);
	depth--;
	return count;
}

/* ---- PCI devices, their BARs and MSI/MSI-X vectors, from sysfs ---- */

static int msix_count, msi_count;
static const char *msi_dev;

static void count_msi(const char *irq)
{
	char kind[16];
	path_set4("/sys/bus/pci/devices/", msi_dev, "/msi_irqs/", irq);
	read_value(path, kind, sizeof(kind));
	if (starts(kind, "msix"))
		msix_count++;
	else if (starts(kind, "msi"))
		msi_count++;
}

static const char *skip_0x(const char *s)
{
	return starts(s, "0x") ? s + 2 : s;
}

/* Whether the resource line s[0..n) is all zeros ("0x0000000000000000 0x0... 0x0..."). */
static int all_zero_hex(const char *s, u64 n)
{
	for (u64 i = 0; i < n; i++)
		if (s[i] != '0' && s[i] != 'x' && s[i] != ' ')
			return 0;
	return 1;
}

static void pci_device(const char *bdf)
{
	char vendor[16], device[16], class[16], link[256];
	const char *driver = "none";
	s64 n;

	path_set("/sys/bus/pci/devices/", bdf, "/vendor");
	read_value(path, vendor, sizeof(vendor));
	path_set("/sys/bus/pci/devices/", bdf, "/device");
	read_value(path, device, sizeof(device));
	path_set("/sys/bus/pci/devices/", bdf, "/class");
	read_value(path, class, sizeof(class));
	path_set("/sys/bus/pci/devices/", bdf, "/driver");
	n = sys3(SYS_readlink, path, link, sizeof(link) - 1);
	if (n > 0) {
		link[n] = 0;
		driver = link;
		for (s64 i = 0; i < n; i++)
			if (link[i] == '/')
				driver = link + i + 1;
	}
	msix_count = msi_count = 0;
	msi_dev = bdf;
	path_set("/sys/bus/pci/devices/", bdf, "/msi_irqs");
	for_each_entry(path, count_msi);

	put("NIMBUS-LINUX pci ");
	put(bdf);
	put(" vendor=");
	put(skip_0x(vendor));
	put(" device=");
	put(skip_0x(device));
	put(" class=");
	put(class);
	put(" driver=");
	put(driver);
	put(" msix=");
	put_dec(msix_count);
	put(" msi=");
	put_dec(msi_count);
	flush_line();

	/* resource: one "start end flags" line per resource; 0-5 BARs, 6 ROM. */
	path_set("/sys/bus/pci/devices/", bdf, "/resource");
	if (read_file(path) < 0)
		return;
	char *p = fbuf;
	for (int i = 0; *p && i <= 6; i++) {
		char *e = p;
		while (*e && *e != '\n')
			e++;
		/* Unassigned resources are all zeros: "0x0000000000000000 0x0... 0x0..." */
		if (!all_zero_hex(p, (u64)(e - p))) {
			char *f1 = p, *f2, *f3;
			f2 = f1;
			while (f2 < e && *f2 != ' ')
				f2++;
			f3 = f2 + 1;
			while (f3 < e && *f3 != ' ')
				f3++;
			put("NIMBUS-LINUX bar ");
			put(bdf);
			put(" ");
			put_dec(i);
			put(" start=");
			put_n(f1, (u64)(f2 - f1));
			put(" end=");
			put_n(f2 + 1, (u64)(f3 - f2 - 1));
			put(" flags=");
			put_n(f3 + 1, (u64)(e - f3 - 1));
			flush_line();
		}
		p = *e ? e + 1 : e;
	}
}

static s64 rx_queues, tx_queues;

static void count_queue(const char *name)
{
	if (starts(name, "rx-"))
		rx_queues++;
	else if (starts(name, "tx-"))
		tx_queues++;
}

static void net_device(const char *ifname)
{
	char mac[32], state[32];
	path_set("/sys/class/net/", ifname, "/address");
	read_value(path, mac, sizeof(mac));
	path_set("/sys/class/net/", ifname, "/operstate");
	read_value(path, state, sizeof(state));
	/* The queues the driver uses: for virtio-net, the pairs it asked for with VQ_PAIRS_SET. */
	rx_queues = tx_queues = 0;
	path_set("/sys/class/net/", ifname, "/queues");
	for_each_entry(path, count_queue);
	put("NIMBUS-LINUX net ");
	put(ifname);
	put(" mac=");
	put(mac);
	put(" operstate=");
	put(state);
	put(" rx_queues=");
	put_dec(rx_queues);
	put(" tx_queues=");
	put_dec(tx_queues);
	flush_line();
}

static void block_device(const char *name)
{
	char size[32], ro[8];
	path_set("/sys/block/", name, "/size");
	read_value(path, size, sizeof(size));
	path_set("/sys/block/", name, "/ro");
	read_value(path, ro, sizeof(ro));
	put("NIMBUS-LINUX block ");
	put(name);
	put(" sectors=");
	put(size);
	put(" ro=");
	put(ro);
	flush_line();
}

static void dump_machine(void)
{
	s64 n = for_each_entry("/sys/bus/pci/devices", pci_device);
	if (n < 0)
		error("pci-devices", n);
	if (read_file("/proc/interrupts") >= 0)
		dump_lines("irq");
	if (read_file("/proc/iomem") >= 0)
		dump_lines("iomem");
	for_each_entry("/sys/block", block_device);
	for_each_entry("/sys/class/net", net_device);
}

/* ---- actions ---- */

static u64 parse_dec(const char **s)
{
	u64 v = 0;
	while (**s >= '0' && **s <= '9')
		v = v * 10 + (u64)(*(*s)++ - '0');
	return v;
}

static char sector_buf[SECTOR];

/* Copies the word's text (up to a space or the end) into sector_buf, zero-padded. */
static u64 fill_sector(const char *text)
{
	u64 n = 0;
	memset(sector_buf, 0, sizeof(sector_buf));
	while (text[n] && text[n] != ' ' && text[n] != '\n' && n < SECTOR)
		sector_buf[n] = text[n], n++;
	return n;
}

/* The disk the current nimbus.disk= word acts on: /dev/vda unless it starts with vdX: */
static char disk_dev[16] = "/dev/vda";

static void disk_read(u64 sector)
{
	s64 fd = sys3(SYS_open, disk_dev, O_RDONLY, 0);
	s64 n;
	u64 len = 0;
	if (fd < 0) {
		error("open-vda", fd);
		return;
	}
	n = sys6(SYS_pread64, fd, (s64)sector_buf, SECTOR, (s64)(sector * SECTOR), 0, 0);
	sys3(SYS_close, fd, 0, 0);
	put("NIMBUS-LINUX disk-read dev=");
	put(disk_dev + 5);
	put(" sector=");
	put_dec((s64)sector);
	if (n < 0) {
		put(" error=");
		put_dec(n);
	} else {
		while (len < (u64)n && sector_buf[len] >= 0x21 && sector_buf[len] < 0x7f)
			len++;
		put(" text=");
		put_n(sector_buf, len);
	}
	flush_line();
}

/* Writes sector_buf at `sector`; prints `<tag> open=.. write=.. fsync=..` (open only if show_open). */
static void disk_write(const char *tag, u64 sector, int show_open)
{
	s64 fd = sys3(SYS_open, disk_dev, O_RDWR, 0);
	s64 w = 0, f = 0;
	if (fd >= 0) {
		w = sys6(SYS_pwrite64, fd, (s64)sector_buf, SECTOR, (s64)(sector * SECTOR), 0, 0);
		f = sys3(SYS_fsync, fd, 0, 0);
		sys3(SYS_close, fd, 0, 0);
	}
	put("NIMBUS-LINUX ");
	put(tag);
	put(" dev=");
	put(disk_dev + 5);
	put(" sector=");
	put_dec((s64)sector);
	if (show_open || fd < 0) {
		put(" open=");
		put_dec(fd);
	}
	if (fd >= 0) {
		put(" write=");
		put_dec(w);
		put(" fsync=");
		put_dec(f);
	}
	flush_line();
}

static void disk_action(const char *arg)
{
	memcpy(disk_dev, "/dev/vda", 9);
	if (arg[0] == 'v' && arg[1] == 'd' && arg[2] >= 'a' && arg[2] <= 'z' && arg[3] == ':') {
		disk_dev[7] = arg[2];
		arg += 4;
	} else if (starts(arg, "pmem") && arg[4] >= '0' && arg[4] <= '9' && arg[5] == ':') {
		memcpy(disk_dev, "/dev/pmem0", 11);
		disk_dev[9] = arg[4];
		arg += 6;
	}
	if (starts(arg, "read:")) {
		arg += 5;
		disk_read(parse_dec(&arg));
	} else if (starts(arg, "write:")) {
		arg += 6;
		u64 sector = parse_dec(&arg);
		if (*arg == ':')
			arg++;
		fill_sector(arg);
		disk_write("disk-write", sector, 0);
	} else if (starts(arg, "rowrite:")) {
		arg += 8;
		u64 sector = parse_dec(&arg);
		fill_sector("NIMBUS-RO-WRITE");
		disk_write("disk-rowrite", sector, 1);
	} else {
		say("error unknown-disk-action ", arg);
	}
}

struct sockaddr_in {
	unsigned short sin_family;
	unsigned short sin_port;
	unsigned int sin_addr;
	unsigned char zero[8];
};

static void net_udp(const char *arg)
{
	struct sockaddr_in sa;
	unsigned char ip[4];
	struct {
		s64 sec, usec;
	} tv = { 20, 0 };
	s64 fd, sent, got;
	char reply[64];
	u64 port, len;

	for (int i = 0; i < 4; i++) {
		ip[i] = (unsigned char)parse_dec(&arg);
		if (*arg == '.' || *arg == ':')
			arg++;
	}
	port = parse_dec(&arg);
	if (*arg == ':')
		arg++;
	len = fill_sector(arg);

	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = (unsigned short)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
	memcpy(&sa.sin_addr, ip, 4);
	fd = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		error("socket", fd);
		return;
	}
	sys6(SYS_setsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, (s64)&tv, sizeof(tv), 0);
	sent = sys3(SYS_connect, fd, &sa, sizeof(sa));
	if (sent == 0)
		sent = sys6(SYS_sendto, fd, (s64)sector_buf, (s64)len, 0, 0, 0);
	got = sys6(SYS_recvfrom, fd, (s64)reply, sizeof(reply), 0, 0, 0);
	sys3(SYS_close, fd, 0, 0);
	put("NIMBUS-LINUX net-udp send=");
	put_dec(sent);
	put(" recv=");
	put_dec(got);
	flush_line();
}

/* SIOCETHTOOL with struct ethtool_channels (linux/ethtool.h). */
#define SIOCETHTOOL 0x8946
#define ETHTOOL_GCHANNELS 0x3c
#define ETHTOOL_SCHANNELS 0x3d

struct ethtool_channels {
	unsigned int cmd, max_rx, max_tx, max_other, max_combined;
	unsigned int rx_count, tx_count, other_count, combined_count;
};

struct ifreq_data {
	char name[16];
	void *data;
	char pad[16];
};

static s64 ethtool_channels(s64 fd, const char *ifname, struct ethtool_channels *ch)
{
	struct ifreq_data ifr;
	u64 i = 0;
	memset(&ifr, 0, sizeof(ifr));
	while (ifname[i] && i < sizeof(ifr.name) - 1) {
		ifr.name[i] = ifname[i];
		i++;
	}
	ifr.data = ch;
	return sys3(SYS_ioctl, fd, SIOCETHTOOL, &ifr);
}

static void net_channels(const char *arg)
{
	char ifname[16];
	struct ethtool_channels ch;
	s64 fd, set, got;
	u64 i = 0, n;

	while (*arg && *arg != ':' && i < sizeof(ifname) - 1)
		ifname[i++] = *arg++;
	ifname[i] = 0;
	if (*arg == ':')
		arg++;
	n = parse_dec(&arg);
	fd = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		error("socket", fd);
		return;
	}
	memset(&ch, 0, sizeof(ch));
	ch.cmd = ETHTOOL_GCHANNELS;
	set = ethtool_channels(fd, ifname, &ch);
	if (set == 0) {
		ch.cmd = ETHTOOL_SCHANNELS;
		ch.combined_count = (unsigned int)n;
		set = ethtool_channels(fd, ifname, &ch);
	}
	memset(&ch, 0, sizeof(ch));
	ch.cmd = ETHTOOL_GCHANNELS;
	got = ethtool_channels(fd, ifname, &ch);
	sys3(SYS_close, fd, 0, 0);
	rx_queues = tx_queues = 0;
	path_set("/sys/class/net/", ifname, "/queues");
	for_each_entry(path, count_queue);
	put("NIMBUS-LINUX net-channels ");
	put(ifname);
	put(" set=");
	put_dec(set);
	put(" combined=");
	put_dec(got == 0 ? (s64)ch.combined_count : got);
	put(" max=");
	put_dec((s64)ch.max_combined);
	put(" rx_queues=");
	put_dec(rx_queues);
	put(" tx_queues=");
	put_dec(tx_queues);
	flush_line();
}

struct sockaddr_vm {
	unsigned short svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_zero[4];
};

static char vsock_buf[512];

/* Reads one line (without its newline) into vsock_buf; the byte count or -errno. */
static s64 vsock_read_line(s64 fd)
{
	s64 len = 0;
	while (len < (s64)sizeof(vsock_buf) - 1) {
		s64 n = sys6(SYS_recvfrom, fd, (s64)(vsock_buf + len), 1, 0, 0, 0);
		if (n <= 0)
			return len > 0 ? len : n;
		if (vsock_buf[len] == '\n')
			break;
		len++;
	}
	vsock_buf[len] = 0;
	return len;
}

static s64 vsock_socket(void)
{
	struct {
		s64 sec, usec;
	} tv = { 20, 0 };
	s64 fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	if (fd >= 0)
		sys6(SYS_setsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, (s64)&tv, sizeof(tv), 0);
	return fd;
}

static void vsock_listen(const char *arg)
{
	struct sockaddr_vm sa;
	char reply[600];
	u64 port = parse_dec(&arg), rlen = 0;
	s64 fd = vsock_socket(), r, conn = -1, got = 0, sent = 0;

	if (fd < 0) {
		error("vsock-socket", fd);
		return;
	}
	memset(&sa, 0, sizeof(sa));
	sa.svm_family = AF_VSOCK;
	sa.svm_port = (unsigned int)port;
	sa.svm_cid = VMADDR_CID_ANY;
	r = sys3(SYS_bind, fd, &sa, sizeof(sa));
	if (r == 0)
		r = sys3(SYS_listen, fd, 4, 0);
	put("NIMBUS-LINUX vsock-listening port=");
	put_dec((s64)port);
	put(" listen=");
	put_dec(r);
	flush_line();
	if (r == 0)
		conn = sys3(SYS_accept, fd, 0, 0);
	vsock_buf[0] = 0;
	if (conn >= 0) {
		got = vsock_read_line(conn);
		memcpy(reply, "NIMBUS-ECHO ", 12);
		rlen = 12;
		for (u64 i = 0; vsock_buf[i] && rlen < sizeof(reply) - 1; i++)
			reply[rlen++] = vsock_buf[i];
		reply[rlen++] = '\n';
		sent = sys6(SYS_sendto, conn, (s64)reply, (s64)rlen, 0, 0, 0);
		sys3(SYS_close, conn, 0, 0);
	}
	sys3(SYS_close, fd, 0, 0);
	put("NIMBUS-LINUX vsock-accept accept=");
	put_dec(conn);
	put(" recv=");
	put_dec(got);
	put(" send=");
	put_dec(sent);
	put(" text=");
	put(vsock_buf);
	flush_line();
}

static void vsock_connect(const char *arg)
{
	struct sockaddr_vm sa;
	u64 port = parse_dec(&arg), len;
	s64 fd, r, sent = 0, got = 0;

	if (*arg == ':')
		arg++;
	len = fill_sector(arg);
	if (len >= SECTOR)
		len = SECTOR - 1;
	sector_buf[len++] = '\n';
	fd = vsock_socket();
	if (fd < 0) {
		error("vsock-socket", fd);
		return;
	}
	memset(&sa, 0, sizeof(sa));
	sa.svm_family = AF_VSOCK;
	sa.svm_port = (unsigned int)port;
	sa.svm_cid = VMADDR_CID_HOST;
	r = sys3(SYS_connect, fd, &sa, sizeof(sa));
	vsock_buf[0] = 0;
	if (r == 0) {
		sent = sys6(SYS_sendto, fd, (s64)sector_buf, (s64)len, 0, 0, 0);
		got = vsock_read_line(fd);
	}
	sys3(SYS_close, fd, 0, 0);
	put("NIMBUS-LINUX vsock-connect port=");
	put_dec((s64)port);
	put(" connect=");
	put_dec(r);
	put(" send=");
	put_dec(sent);
	put(" recv=");
	put_dec(got);
	put(" text=");
	put(vsock_buf);
	flush_line();
}

/* MemTotal from /proc/meminfo in KiB, or -errno. */
/* A /proc/meminfo field ("MemTotal:", "MemFree:") in kB. */
static s64 meminfo_kb(const char *key)
{
	s64 r = read_file("/proc/meminfo");
	const char *p = fbuf;
	u64 n = 0;
	if (r < 0)
		return r;
	while (key[n])
		n++;
	while (*p && !starts(p, key))
		p++;
	if (!*p)
		return -2;
	p += n;
	while (*p == ' ')
		p++;
	return (s64)parse_dec(&p);
}

static s64 memtotal_kb(void)
{
	return meminfo_kb("MemTotal:");
}

/* Sleeps a tenth of a second. */
static void sleep_tenth(void)
{
	struct {
		s64 sec, nsec;
	} ts = { 0, 100000000 };
	sys3(SYS_nanosleep, &ts, 0, 0);
}

/* Reads MemTotal every tenth of a second, at most `tenths` times, until it has grown (grow=1)
 * or fallen (grow=0) by at least `kb` from `before`; returns the last value read. */
static s64 wait_memtotal(s64 before, int grow, s64 kb, int tenths)
{
	s64 now = before;
	for (int i = 0; i < tenths; i++) {
		now = memtotal_kb();
		if ((grow ? now - before : before - now) >= kb)
			break;
		sleep_tenth();
	}
	return now;
}

/* Writes every page of <mib> MiB of fresh anonymous memory, then frees it; <0 on failure. */
static s64 touch_mib(u64 mib, const char *what)
{
	u64 len = mib << 20;
	/* PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS */
	s64 m = sys6(SYS_mmap, 0, (s64)len, 3, 0x22, -1, 0);
	if (m < 0 && m > -4096) {
		error(what, m);
		return m;
	}
	for (u64 o = 0; o < len; o += 4096)
		((volatile char *)m)[o] = 0x5a;
	sys3(SYS_munmap, m, len, 0);
	return 0;
}

static void memhp_action(const char *arg)
{
	u64 grow = parse_dec(&arg), touch;
	s64 before, now = 0, free_before = meminfo_kb("MemFree:");
	if (*arg == ':')
		arg++;
	touch = parse_dec(&arg);
	before = memtotal_kb();
	put("NIMBUS-LINUX memhp-waiting memtotal_kb=");
	put_dec(before);
	flush_line();
	now = wait_memtotal(before, 1, (s64)(grow << 10), 1800);
	if (now - before < (s64)(grow << 10)) {
		put("NIMBUS-LINUX memhp-timeout memtotal_kb=");
		put_dec(now);
		flush_line();
		return;
	}
	put("NIMBUS-LINUX memhp-added memtotal_kb=");
	put_dec(now);
	put(" grew_kb=");
	put_dec(now - before);
	put(" free_grew_kb=");
	put_dec(meminfo_kb("MemFree:") - free_before);
	flush_line();
	if (touch_mib(touch, "memhp-mmap") == 0) {
		put("NIMBUS-LINUX memhp-touched mib=");
		put_dec((s64)touch);
		flush_line();
	}
}

static void balloon_action(const char *arg)
{
	u64 touch = parse_dec(&arg), want;
	s64 before, now = 0;
	if (*arg == ':')
		arg++;
	want = parse_dec(&arg);
	if (touch && touch_mib(touch, "balloon-mmap") < 0)
		return;
	before = memtotal_kb();
	put("NIMBUS-LINUX balloon-touched mib=");
	put_dec((s64)touch);
	put(" memtotal_kb=");
	put_dec(before);
	flush_line();
	now = wait_memtotal(before, 0, (s64)(want << 10), 600);
	if (before - now >= (s64)(want << 10)) {
		put("NIMBUS-LINUX balloon-inflated memtotal_kb=");
		put_dec(now);
		put(" fell_kb=");
		put_dec(before - now);
		flush_line();
		return;
	}
	put("NIMBUS-LINUX balloon-timeout memtotal_kb=");
	put_dec(now);
	flush_line();
}

/* Waits up to `tenths` tenths of a second for `path` to exist (want=1) or not (want=0). */
static int wait_path(const char *p, int want, int tenths)
{
	for (int i = 0; i < tenths; i++) {
		s64 fd = sys3(SYS_open, p, O_RDONLY | O_DIRECTORY, 0);
		if (fd >= 0)
			sys3(SYS_close, fd, 0, 0);
		if ((fd >= 0) == want)
			return 1;
		sleep_tenth();
	}
	return 0;
}

static void hotplug_action(const char *arg)
{
	char name[8] = "vda", sysdir[32], size[32];
	u64 cycles;
	if (!(arg[0] == 'v' && arg[1] == 'd' && arg[2] >= 'a' && arg[2] <= 'z' && arg[3] == ':')) {
		say("error unknown-hotplug-action ", arg);
		return;
	}
	name[2] = arg[2];
	arg += 4;
	cycles = parse_dec(&arg);
	memcpy(sysdir, "/sys/block/vda", 15);
	sysdir[13] = name[2];
	for (u64 i = 0; i < cycles; i++) {
		char text[32] = "NIMBUS-HOTPLUG-";
		put("NIMBUS-LINUX hotplug-waiting dev=");
		put(name);
		put(" cycle=");
		put_dec((s64)i);
		flush_line();
		if (!wait_path(sysdir, 1, 1800))
			goto timeout;
		path_set("/sys/block/", name, "/size");
		read_value(path, size, sizeof(size));
		put("NIMBUS-LINUX hotplug-added dev=");
		put(name);
		put(" sectors=");
		put(size);
		flush_line();
		memcpy(disk_dev, "/dev/vda", 9);
		disk_dev[7] = name[2];
		disk_read(0);
		text[15] = (char)('0' + i % 10);
		fill_sector(text);
		disk_write("disk-write", 1, 0);
		if (!wait_path(sysdir, 0, 1800))
			goto timeout;
		put("NIMBUS-LINUX hotplug-removed dev=");
		put(name);
		flush_line();
	}
	return;
timeout:
	put("NIMBUS-LINUX hotplug-timeout dev=");
	put(name);
	flush_line();
}

#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define IFF_UP 0x1

struct ifreq {
	char name[16];
	union {
		struct sockaddr_in addr;
		short flags;
		char pad[24];
	} u;
};

/* Copies the interface name of `arg` (up to ':' or a space) into `name`; returns past it. */
static const char *if_name(const char *arg, char *name)
{
	int n = 0;
	while (*arg && *arg != ':' && *arg != ' ' && n < 15)
		name[n++] = *arg++;
	name[n] = 0;
	return *arg == ':' ? arg + 1 : arg;
}

static void ifup_action(const char *arg)
{
	struct ifreq req;
	char name[16];
	unsigned char ip[4];
	s64 fd, addr = -1, mask = -1, up = -1;
	int found;

	arg = if_name(arg, name);
	for (int i = 0; i < 4; i++) {
		ip[i] = (unsigned char)parse_dec(&arg);
		if (*arg == '.')
			arg++;
	}
	path_set("/sys/class/net/", name, "");
	found = wait_path(path, 1, 1800);
	fd = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (found && fd >= 0) {
		memset(&req, 0, sizeof(req));
		memcpy(req.name, name, 16);
		req.u.addr.sin_family = AF_INET;
		memcpy(&req.u.addr.sin_addr, ip, 4);
		addr = sys3(SYS_ioctl, fd, SIOCSIFADDR, (s64)&req);
		req.u.addr.sin_addr = 0x00ffffff;
		mask = sys3(SYS_ioctl, fd, SIOCSIFNETMASK, (s64)&req);
		memset(&req.u, 0, sizeof(req.u));
		up = sys3(SYS_ioctl, fd, SIOCGIFFLAGS, (s64)&req);
		if (up == 0) {
			req.u.flags |= IFF_UP;
			up = sys3(SYS_ioctl, fd, SIOCSIFFLAGS, (s64)&req);
		}
	}
	if (fd >= 0)
		sys3(SYS_close, fd, 0, 0);
	put("NIMBUS-LINUX ifup ");
	put(name);
	put(found ? " wait=0" : " wait=-110");
	put(" addr=");
	put_dec(addr);
	put(" mask=");
	put_dec(mask);
	put(" up=");
	put_dec(up);
	flush_line();
}

static void ifgone_action(const char *arg)
{
	char name[16];
	if_name(arg, name);
	path_set("/sys/class/net/", name, "");
	put("NIMBUS-LINUX ifgone ");
	put(name);
	put(wait_path(path, 0, 1800) ? " gone=1" : " gone=0");
	flush_line();
}

static void power(unsigned int cmd)
{
	sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, cmd, 0, 0, 0);
}

static void reboot_once(const char *arg)
{
	u64 sector = parse_dec(&arg);
	s64 fd;
	s64 n = -1;

	memcpy(disk_dev, "/dev/vda", 9);
	fd = sys3(SYS_open, disk_dev, O_RDONLY, 0);
	if (fd >= 0) {
		n = sys6(SYS_pread64, fd, (s64)sector_buf, SECTOR, (s64)(sector * SECTOR), 0, 0);
		sys3(SYS_close, fd, 0, 0);
	}
	if (n == SECTOR && starts(sector_buf, "NIMBUS-REBOOTED")) {
		say("reboot second-boot", "");
		return;
	}
	fill_sector("NIMBUS-REBOOTED");
	disk_write("reboot-mark", sector, 0);
	say("reboot restarting", "");
	power(LINUX_REBOOT_CMD_RESTART);
	error("reboot", -1);
}

static char cmdline[4096];

static void run(void)
{
	int dump = 1;
	s64 r;

	sys3(SYS_mkdir, "/dev", 0755, 0);
	sys3(SYS_mkdir, "/proc", 0555, 0);
	sys3(SYS_mkdir, "/sys", 0555, 0);
	/* The initramfs has /dev/console (the kernel opened it as fds 0-2 for us). */
	r = sys6(SYS_mount, (s64) "devtmpfs", (s64) "/dev", (s64) "devtmpfs", 0, 0, 0);
	if (r < 0)
		sys3(SYS_write, 1, "NIMBUS-LINUX error mount-devtmpfs\n", 35);
	r = sys6(SYS_mount, (s64) "proc", (s64) "/proc", (s64) "proc", 0, 0, 0);
	if (r < 0)
		sys3(SYS_write, 1, "NIMBUS-LINUX error mount-proc\n", 30);
	r = sys6(SYS_mount, (s64) "sysfs", (s64) "/sys", (s64) "sysfs", 0, 0, 0);
	if (r < 0)
		sys3(SYS_write, 1, "NIMBUS-LINUX error mount-sysfs\n", 31);

	if (read_file("/proc/uptime") >= 0) {
		u64 i = 0;
		while (fbuf[i] && fbuf[i] != '\n')
			i++;
		fbuf[i] = 0;
		say("uptime ", fbuf);
	}
	r = read_file("/proc/cmdline");
	if (r < 0) {
		error("cmdline", r);
		fbuf[0] = 0;
	}
	memcpy(cmdline, fbuf, sizeof(cmdline) - 1);
	for (u64 i = 0; cmdline[i]; i++)
		if (cmdline[i] == '\n')
			cmdline[i] = 0;
	say("cmdline ", cmdline);

	for (const char *w = cmdline; *w;) {
		if (starts(w, "nimbus.dump=0"))
			dump = 0;
		while (*w && *w != ' ')
			w++;
		while (*w == ' ')
			w++;
	}
	if (dump)
		dump_machine();

	for (const char *w = cmdline; *w;) {
		if (starts(w, "nimbus.disk="))
			disk_action(w + 12);
		else if (starts(w, "nimbus.net=udp:"))
			net_udp(w + 15);
		else if (starts(w, "nimbus.net=channels:"))
			net_channels(w + 20);
		else if (starts(w, "nimbus.vsock=listen:"))
			vsock_listen(w + 20);
		else if (starts(w, "nimbus.vsock=connect:"))
			vsock_connect(w + 21);
		else if (starts(w, "nimbus.reboot="))
			reboot_once(w + 14);
		else if (starts(w, "nimbus.balloon="))
			balloon_action(w + 15);
		else if (starts(w, "nimbus.memhp="))
			memhp_action(w + 13);
		else if (starts(w, "nimbus.hotplug="))
			hotplug_action(w + 15);
		else if (starts(w, "nimbus.ifup="))
			ifup_action(w + 12);
		else if (starts(w, "nimbus.ifgone="))
			ifgone_action(w + 14);
		else if (starts(w, "nimbus.sleep=")) {
			const char *a = w + 13;
			struct {
				s64 sec, nsec;
			} ts = { (s64)parse_dec(&a), 0 };
			sys3(SYS_nanosleep, &ts, 0, 0);
		}
		while (*w && *w != ' ')
			w++;
		while (*w == ' ')
			w++;
	}

	say("power-off", "");
	power(LINUX_REBOOT_CMD_POWER_OFF);
	error("power-off", -1);
	for (;;) {
		struct {
			s64 sec, nsec;
		} ts = { 3600, 0 };
		sys3(SYS_nanosleep, &ts, 0, 0);
	}
}

void start_c(void) __attribute__((noreturn, used));
void start_c(void)
{
	sys3(SYS_write, 1, "NIMBUS-LINUX-INIT pid=1\n", 24);
	run();
	for (;;)
		sys3(SYS_exit, 0, 0, 0);
}

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	hlt\n");
