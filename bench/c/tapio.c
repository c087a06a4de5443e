// SPDX-License-Identifier: MIT
/*
 * tapio — data-path micro-benchmark for one queue of a Linux multi-queue tap.
 *
 * Build:  cc -O2 -Wall -Wextra -Werror -o tapio tapio.c
 *         (io_uring through raw syscalls: no liburing needed)
 * Run ONLY inside a throw-away network namespace (see run.sh / README.md).
 *
 * The program opens /dev/net/tun --queues times with
 * IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE (creating the tap on the first
 * open if it does not exist, attaching further queues otherwise), sets the
 * virtio-net header size to 12, enables TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO6,
 * brings the interface up, and drives queue --queue with one of:
 *
 *   write           plain write() loop, one frame per syscall
 *   uring-write     naive io_uring: batches of 32 IORING_OP_WRITE per submit, blocking fd
 *   uring-write256  best io_uring write loop: O_NONBLOCK registered fd, 256 writes per
 *                   submit, SINGLE_ISSUER|DEFER_TASKRUN
 *   read            plain read() loop, one frame per syscall
 *   uring-read      naive io_uring: 32 IORING_OP_READ kept in flight, blocking fd
 *   uring-mshot     best io_uring read loop (Linux 6.7+): IORING_OP_READ_MULTISHOT into
 *                   a provided-buffer ring (see run_uring_mshot)
 *   uring-mshot-drain  uring-mshot --drain: the multishot waits, a backlog is drained with
 *                   batches of RWF_NOWAIT reads (the best read loop, see run_uring_mshot)
 *   uring-batch     batches of 64 one-shot RWF_NOWAIT reads from the same provided-buffer
 *                   ring, a one-shot poll only when a batch found the ring empty: the
 *                   cheapest per frame while the reader is behind (see run_uring_batch)
 *   probe           (no --dev) what io_uring offers here, as one JSON line
 *
 * Frame sizes (--size): 60 (minimum Ethernet frame without FCS), 1514 (maximum
 * untagged 1500-MTU frame) or "gso": a 65214-byte Ethernet/IPv4/TCP frame
 * (IPv4 total length 65200 = 45 segments of 1448) with a virtio-net header
 * saying NEEDS_CSUM, gso_type TCPV4, gso_size 1448, hdr_len 54, csum_start 34,
 * csum_offset 16 — what virtio_net_hdr_from_skb() reports for a TSO skb.
 *
 * ---------------------------------------------------------------------------
 * What "write" measures.  A frame written into a tap is *received* by the
 * kernel (tun_get_user): it is copied into an skb, counted in the tap's
 * rx_packets/rx_bytes, and handed to the stack synchronously in the writer's
 * context (netif_receive_skb under local_bh_disable). To measure the tap and
 * not the IP stack, frames are addressed to a unicast MAC that is not the
 * tap's: eth_type_trans() marks them PACKET_OTHERHOST and ip_rcv() drops them
 * immediately (reason OTHERHOST, counted in the "otherhost" core stat, not in
 * rx_dropped). The program checks that rx_packets (read from /proc/net/dev,
 * which — unlike /sys/class/net — always reflects the caller's network
 * namespace) grew by exactly the number of frames written and reports it as
 * "kernelRxPackets".  GSO frames are dropped the same way, before any
 * segmentation, so the gso number measures the 64 KB copy + skb setup.
 *
 * What "read" measures.  For a tap, a frame the kernel *transmits* is what the
 * user reads.  Something must generate frames faster than one queue can be
 * read, so "read" forks a generator process (pinned with --gen-cpu) that
 * transmits on the tap through an AF_PACKET socket with PACKET_QDISC_BYPASS
 * (dev_direct_xmit → tun_net_xmit, no IP stack and no qdisc) using
 * sendmmsg() batches of 64 copies of the same frame; for --size gso it sends
 * 64 KB TCPv4 GSO frames with PACKET_VNET_HDR, which reach the reader
 * unsegmented because the tap has TSO enabled.  Alternatives considered: a UDP
 * socket sending to a neighbour address routed via the tap costs a full
 * IP/UDP/neighbour path per frame and is slower than the reader; "write" on a
 * second queue goes the wrong way (into the stack, not out of the tap).  When
 * the tap's ring (tx_queue_len: 500 or 1000 by default, by kernel) is full, tun_net_xmit()
 * drops the frame and counts tx_dropped — the generator simply keeps going.
 * A non-zero "kernelTxDropped" therefore shows that the generator outpaced the
 * reader, i.e. that the reader was the bottleneck being measured
 * ("generatorLimited": false).  Timing starts at the first frame read.
 * With --queues > 1 the kernel spreads flows over the attached queues by flow
 * hash; the generator sends a single flow, so run one reader per queue (or
 * keep --queues 1) when reading.
 * ---------------------------------------------------------------------------
 *
 * Output: one JSON line on stdout:
 *   {"mode","size","frames","bytes","seconds","pps","gbps","cpuSeconds","cpuUsPerFrame",...}
 * "bytes" counts Ethernet frame bytes (virtio-net header excluded), "gbps" is
 * bytes*8/seconds/1e9.  "cpuSeconds" is the CPU time this process (including
 * io_uring worker threads, excluding the generator) used during the run;
 * cpuUsPerFrame = cpuSeconds/frames is much less sensitive than pps to other
 * load on the machine, since time spent descheduled is not counted.  Where it
 * went, by thread: "mainCpuSeconds" (the thread running the loop),
 * "workerCpuSeconds" and "workers" (io_uring's own threads, io-wq
 * "iou-wrk-*": they are not bound by --cpu and may run on the generator's CPU
 * in parallel), "workerCpus" (bit mask of the CPUs they last ran on),
 * "mainVoluntaryCsw" (the loop's sleeps), "enters"/"framesPerEnter"
 * (io_uring_enter calls of the read loops).  Reads are measured from their
 * first frame (which only starts the clock), or with --warmup-ms T from the
 * first frame read T ms later (steady state, see read_clock); their CPU time
 * from the same point, ring and buffer set-up excluded.  Exit status: 0 ok, 1 error, 2 timeout before any
 * frame, 3 io_uring unavailable (ENOSYS, EPERM, disabled by
 * kernel.io_uring_disabled, or lacking what the mode needs).  With --warmup-ms,
 * "before any frame" means before any measured frame.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/io_uring.h>
#include <linux/virtio_net.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>


#define VNET_HDR_SZ 12
#define MAX_QUEUES 256
#define URING_BATCH 32
#define GEN_BATCH 64
/*
 * GSO frame: 45 full 1448-byte segments, as Linux TCP would build it. The skb
 * must stay below gso_max_size (65536, Ethernet header included), otherwise
 * gso_features_check() disables TSO for it and it is segmented in software
 * (and dev_direct_xmit() drops it).
 */
#define GSO_MSS 1448
#define GSO_SEGS 45
#define GSO_IP_TOTLEN (IP4_LEN + TCP_LEN + GSO_SEGS * GSO_MSS) /* 65200 */
#define ETH_LEN 14
#define IP4_LEN 20
#define UDP_LEN 8
#define TCP_LEN 20
#define RX_BUF_SZ (VNET_HDR_SZ + 65536 + 64) /* any frame the tap can hand us */

enum mode { MODE_WRITE, MODE_READ, MODE_URING_WRITE, MODE_URING_READ, MODE_URING_WRITE256, MODE_URING_MSHOT, MODE_URING_BATCH };

struct opts {
	const char *dev;
	enum mode mode;
	const char *mode_name;
	int queues;
	int queue;
	long long frames;
	int size; /* Ethernet frame length; 0 = gso */
	double timeout;
	int cpu;
	int gen_cpu;
	bool gen;
	long long gen_rate; /* frames/s, 0 = as fast as possible */
	int flow;           /* written frames: UDP/TCP source port 40000 + flow */
	unsigned bufs;      /* uring-mshot: provided buffers (power of two) */
	bool drain;         /* uring-mshot: drain a backlog with RWF_NOWAIT batches instead of re-arming after -ENOBUFS */
	long long warmup_ms; /* reads: frames read in the first warmup_ms ms after the first one are not measured */
};

/* ----------------------------------------------------------------------- */

static void die(const char *what)
{
	fprintf(stderr, "tapio: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * Where the CPU went, by thread: the main thread's CPU time and context
 * switches, and the io_uring worker threads' (io-wq "iou-wrk-*", SQPOLL
 * "iou-sqp-*"): they are threads of this process, so their CPU is in
 * cpuSeconds, but they are not bound by the main thread's --cpu pinning (their
 * affinity comes from the cpuset), so they may run on the generator's CPU in
 * parallel with the main thread: "workerCpuSeconds" and "workerCpus" (a bit
 * mask of the CPUs they were last seen on) show it.
 */
struct threadstats {
	double main_cpu, worker_cpu;
	long workers;
	unsigned long long worker_cpus; /* bit c: a worker last ran on CPU c (c < 64) */
	long long main_vcsw, main_ivcsw;
};

static void thread_stats(struct threadstats *t)
{
	memset(t, 0, sizeof(*t));
	struct rusage ru;
	struct timespec ts;
	if (getrusage(RUSAGE_THREAD, &ru) == 0) {
		t->main_vcsw = ru.ru_nvcsw;
		t->main_ivcsw = ru.ru_nivcsw;
	}
	if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
		t->main_cpu = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return;
	long tck = sysconf(_SC_CLK_TCK);
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		char path[300], buf[1024];
		snprintf(path, sizeof(path), "/proc/self/task/%s/stat", e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (n <= 0)
			continue;
		buf[n] = 0;
		char *lp = strchr(buf, '('), *rp = strrchr(buf, ')');
		if (!lp || !rp || strncmp(lp + 1, "iou-", 4) != 0)
			continue;
		/* After ") ": field 3 (state) ... utime is field 14, stime 15, processor 39. */
		unsigned long long utime = 0, stime = 0;
		int cpu = -1, field = 3;
		for (char *tok = strtok(rp + 2, " "); tok; tok = strtok(NULL, " "), field++) {
			if (field == 14)
				utime = strtoull(tok, NULL, 10);
			else if (field == 15)
				stime = strtoull(tok, NULL, 10);
			else if (field == 39) {
				cpu = atoi(tok);
				break;
			}
		}
		t->workers++;
		/* schedstat: nanoseconds on a CPU (stat's utime+stime are in clock ticks, too coarse for short runs). */
		double secs = (double)(utime + stime) / (double)tck;
		snprintf(path, sizeof(path), "/proc/self/task/%s/schedstat", e->d_name);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			n = read(fd, buf, sizeof(buf) - 1);
			close(fd);
			if (n > 0) {
				buf[n] = 0;
				secs = (double)strtoull(buf, NULL, 10) / 1e9;
			}
		}
		t->worker_cpu += secs;
		if (cpu >= 0 && cpu < 64)
			t->worker_cpus |= 1ULL << cpu;
	}
	closedir(d);
}

/* CPU time of this process (all threads, io_uring workers included; not the generator child). */
static double cpu_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pin_cpu(int cpu)
{
	cpu_set_t set;
	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) < 0)
		die("sched_setaffinity");
}

static volatile sig_atomic_t timed_out;

static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
}

/* Arms a one-shot SIGALRM that interrupts blocking syscalls (no SA_RESTART). */
static void arm_timeout(double seconds)
{
	struct sigaction sa;
	struct itimerval it;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGALRM, &sa, NULL) < 0)
		die("sigaction");
	memset(&it, 0, sizeof(it));
	it.it_value.tv_sec = (time_t)seconds;
	it.it_value.tv_usec = (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6);
	if (setitimer(ITIMER_REAL, &it, NULL) < 0)
		die("setitimer");
}

/* ---------------------------- tap setup -------------------------------- */

static int tap_open_queue(const char *dev)
{
	struct ifreq ifr;
	int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open /dev/net/tun");
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", dev);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		die("TUNSETIFF");
	int sz = VNET_HDR_SZ;
	if (ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0)
		die("TUNSETVNETHDRSZ");
	/* Offloads the reader can accept: lets GSO frames reach us unsegmented. */
	if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)) < 0)
		die("TUNSETOFFLOAD");
	return fd;
}

/* Brings the link up; returns its ifindex and MAC address. */
static int link_up(const char *dev, uint8_t mac[ETH_ALEN])
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket(AF_INET)");
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", dev);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		die("SIOCGIFFLAGS");
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		die("SIOCSIFFLAGS");
	if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0)
		die("SIOCGIFHWADDR");
	memcpy(mac, ifr.ifr_hwaddr.sa_data, ETH_ALEN);
	if (ioctl(s, SIOCGIFINDEX, &ifr) < 0)
		die("SIOCGIFINDEX");
	close(s);
	return ifr.ifr_ifindex;
}

struct devstats {
	unsigned long long rx_packets, rx_dropped, tx_packets, tx_dropped;
};

/* Reads the interface counters from /proc/net/dev (namespace of the caller). */
static struct devstats read_stats(const char *dev)
{
	struct devstats st = { 0, 0, 0, 0 };
	char line[512];
	size_t n = strlen(dev);
	FILE *f = fopen("/proc/net/dev", "re");
	if (!f)
		die("open /proc/net/dev");
	while (fgets(line, sizeof(line), f)) {
		char *p = line;
		unsigned long long v[16];
		while (*p == ' ')
			p++;
		if (strncmp(p, dev, n) != 0 || p[n] != ':')
			continue;
		if (sscanf(p + n + 1, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
			   &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11],
			   &v[12], &v[13], &v[14], &v[15]) == 16) {
			st.rx_packets = v[1];
			st.rx_dropped = v[3];
			st.tx_packets = v[9];
			st.tx_dropped = v[11];
		}
	}
	fclose(f);
	return st;
}

/* ---------------------------- frames ------------------------------------ */

static uint32_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;
	while (len > 1) {
		sum += (uint32_t)(p[0] << 8 | p[1]);
		p += 2;
		len -= 2;
	}
	if (len)
		sum += (uint32_t)(p[0] << 8);
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put16le(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static const uint8_t SRC_IP[4] = { 169, 254, 77, 1 };
static const uint8_t DST_IP[4] = { 169, 254, 77, 2 };

static void build_eth_ip4(uint8_t *f, const uint8_t dst_mac[ETH_ALEN], const uint8_t src_mac[ETH_ALEN],
			  uint16_t ip_totlen, uint8_t proto)
{
	memcpy(f, dst_mac, ETH_ALEN);
	memcpy(f + 6, src_mac, ETH_ALEN);
	put16(f + 12, ETH_P_IP);
	uint8_t *ip = f + ETH_LEN;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, ip_totlen);
	put16(ip + 4, 0x1234);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	memcpy(ip + 12, SRC_IP, 4);
	memcpy(ip + 16, DST_IP, 4);
	put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, IP4_LEN)));
}

/*
 * Fills buf (VNET_HDR_SZ + frame) and returns the Ethernet frame length.
 * size 0 selects the 64 KB TCPv4 GSO frame.
 */
static size_t build_frame(uint8_t *buf, int size, const uint8_t dst_mac[ETH_ALEN], const uint8_t src_mac[ETH_ALEN], uint16_t sport)
{
	uint8_t *h = buf;
	uint8_t *f = buf + VNET_HDR_SZ;
	memset(buf, 0, VNET_HDR_SZ);
	if (size > 0) {
		size_t len = (size_t)size;
		memset(f, 0, len);
		build_eth_ip4(f, dst_mac, src_mac, (uint16_t)(len - ETH_LEN), IPPROTO_UDP);
		uint8_t *udp = f + ETH_LEN + IP4_LEN;
		put16(udp, sport);
		put16(udp + 2, 9); /* discard */
		put16(udp + 4, (uint16_t)(len - ETH_LEN - IP4_LEN));
		put16(udp + 6, 0); /* no UDP checksum */
		for (size_t i = ETH_LEN + IP4_LEN + UDP_LEN; i < len; i++)
			f[i] = (uint8_t)i;
		return len;
	}
	/* 64 KB TCP GSO super-frame. */
	size_t len = ETH_LEN + GSO_IP_TOTLEN;
	uint16_t tcp_len = GSO_IP_TOTLEN - IP4_LEN;
	memset(f, 0, len);
	build_eth_ip4(f, dst_mac, src_mac, GSO_IP_TOTLEN, IPPROTO_TCP);
	uint8_t *tcp = f + ETH_LEN + IP4_LEN;
	put16(tcp, sport);
	put16(tcp + 2, 5201);
	tcp[4] = 0x11; /* seq */
	tcp[11] = 0x01; /* ack */
	tcp[12] = (TCP_LEN / 4) << 4;
	tcp[13] = 0x18; /* PSH|ACK */
	put16(tcp + 14, 0xffff);
	for (size_t i = ETH_LEN + IP4_LEN + TCP_LEN; i < len; i++)
		f[i] = (uint8_t)i;
	/* CHECKSUM_PARTIAL convention: check field holds the folded pseudo-header sum. */
	uint32_t ph = csum_add(0, SRC_IP, 4);
	ph = csum_add(ph, DST_IP, 4);
	ph += IPPROTO_TCP;
	ph += tcp_len;
	put16(tcp + 16, csum_fold(ph));
	/* struct virtio_net_hdr_mrg_rxbuf, little-endian (tap VNET_LE / x86 native). */
	h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
	h[1] = VIRTIO_NET_HDR_GSO_TCPV4;
	put16le(h + 2, ETH_LEN + IP4_LEN + TCP_LEN); /* hdr_len */
	put16le(h + 4, GSO_MSS);                     /* gso_size */
	put16le(h + 6, ETH_LEN + IP4_LEN);           /* csum_start */
	put16le(h + 8, 16);                          /* csum_offset: offsetof(tcphdr, check) */
	put16le(h + 10, 0);                          /* num_buffers: ignored on transmit */
	return len;
}

/* ---------------------------- result ------------------------------------ */

struct result {
	long long frames;
	unsigned long long bytes;
	double seconds;
	long long errors;
	double cpu_seconds;
	long long batches; /* io_uring modes: io_uring_enter calls that completed frames */
	long long rearms;  /* uring-mshot: multishot reads re-armed (CQE without IORING_CQE_F_MORE) */
	long long enobufs; /* uring-mshot: -ENOBUFS completions (every provided buffer in use) */
	long long drains;  /* uring-mshot --drain: times the reader fell behind and drained with RWF_NOWAIT batches */
	long long polls;   /* uring-batch: waits for the tap to become readable (a batch found its ring empty) */
	long long enters;  /* io_uring modes: io_uring_enter calls in the loop (waits included) */
	struct threadstats t0, t1;
	/* Reads: the measurement's clock (read_clock) and the process's CPU time at its start and end. */
	int clock_state; /* 0: no frame yet, 1: warming up, 2: measuring */
	double first_frame, cpu_start, cpu_end;
};

/*
 * The read loops' clock.  Called with the time a frame (run_read,
 * run_uring_read) or a batch of frames (the multishot and batch loops) was
 * read; returns whether to count it.  The first one only starts the clock
 * (its wait for the generator is not the loop's speed); with --warmup-ms T,
 * so does the first one read T ms or more after it, and nothing before it
 * counts: the measurement is the loop's steady state, the same span the
 * library's reader skips in bench/data.ts.  The process's CPU time and the
 * thread statistics are taken where the clock starts, so setting up the
 * ring and its buffers is not in cpuSeconds.
 */
static bool read_clock(const struct opts *o, struct result *r, double now, double *t0)
{
	if (r->clock_state == 2)
		return true;
	if (r->clock_state == 0) {
		r->first_frame = now;
		r->clock_state = 1;
		if (o->warmup_ms > 0)
			return false;
	} else if ((now - r->first_frame) * 1e3 < (double)o->warmup_ms) {
		return false;
	}
	r->clock_state = 2;
	*t0 = now;
	r->cpu_start = cpu_s();
	thread_stats(&r->t0);
	/*
	 * The counts that are per frame (framesPerBatch, framesPerEnter) restart
	 * with the clock, as the frames do; rearms, drains, polls and -ENOBUFS
	 * count the whole run (a drain that began during the warm-up is one).
	 */
	r->batches = r->enters = 0;
	return false;
}

static void print_result(const struct opts *o, const struct result *r, const struct devstats *before,
			 const struct devstats *after)
{
	double pps = r->seconds > 0 ? (double)r->frames / r->seconds : 0;
	double gbps = r->seconds > 0 ? (double)r->bytes * 8 / r->seconds / 1e9 : 0;
	printf("{\"mode\":\"%s\",\"size\":", o->mode_name);
	if (o->size)
		printf("%d", o->size);
	else
		printf("\"gso\"");
	printf(",\"frames\":%lld,\"bytes\":%llu,\"seconds\":%.6f,\"pps\":%.0f,\"gbps\":%.3f", r->frames, r->bytes,
	       r->seconds, pps, gbps);
	printf(",\"cpuSeconds\":%.6f,\"cpuUsPerFrame\":%.3f,\"queues\":%d,\"queue\":%d", r->cpu_seconds,
	       r->frames > 0 ? r->cpu_seconds * 1e6 / (double)r->frames : 0.0, o->queues, o->queue);
	if (r->batches)
		printf(",\"batches\":%lld,\"framesPerBatch\":%.1f", r->batches, (double)r->frames / (double)r->batches);
	if (o->mode == MODE_URING_MSHOT)
		printf(",\"drain\":%s", o->drain ? "true" : "false");
	if (o->mode == MODE_URING_MSHOT)
		printf(",\"rearms\":%lld,\"enobufs\":%lld,\"drains\":%lld", r->rearms, r->enobufs, r->drains);
	if (o->mode == MODE_URING_BATCH)
		printf(",\"polls\":%lld", r->polls);
	if (r->enters)
		printf(",\"enters\":%lld,\"framesPerEnter\":%.2f", r->enters, r->frames > 0 ? (double)r->frames / (double)r->enters : 0.0);
	{
		double mcpu = r->t1.main_cpu - r->t0.main_cpu, wcpu = r->t1.worker_cpu - r->t0.worker_cpu;
		double fr = r->frames > 0 ? (double)r->frames : 1.0;
		printf(",\"mainCpuSeconds\":%.6f,\"mainCpuUsPerFrame\":%.3f,\"workerCpuSeconds\":%.6f,\"workerCpuUsPerFrame\":%.3f", mcpu,
		       mcpu * 1e6 / fr, wcpu, wcpu * 1e6 / fr);
		printf(",\"workers\":%ld,\"workerCpus\":%llu,\"mainVoluntaryCsw\":%lld,\"mainInvoluntaryCsw\":%lld", r->t1.workers,
		       r->t1.worker_cpus, r->t1.main_vcsw - r->t0.main_vcsw, r->t1.main_ivcsw - r->t0.main_ivcsw);
	}
	if (o->mode == MODE_WRITE || o->mode == MODE_URING_WRITE || o->mode == MODE_URING_WRITE256) {
		printf(",\"kernelRxPackets\":%llu,\"kernelRxDropped\":%llu,\"errors\":%lld",
		       after->rx_packets - before->rx_packets, after->rx_dropped - before->rx_dropped, r->errors);
	} else {
		unsigned long long dropped = after->tx_dropped - before->tx_dropped;
		printf(",\"kernelTxPackets\":%llu,\"kernelTxDropped\":%llu,\"generatorLimited\":%s",
		       after->tx_packets - before->tx_packets, dropped, dropped == 0 ? "true" : "false");
	}
	printf(",\"timedOut\":%s}\n", timed_out ? "true" : "false");
	fflush(stdout);
}

/* ---------------------------- plain syscalls ---------------------------- */

static struct result run_write(const struct opts *o, int fd, const uint8_t *buf, size_t frame_len)
{
	struct result r = { 0 };
	size_t total = VNET_HDR_SZ + frame_len;
	double t0 = now_s();
	for (long long i = 0; i < o->frames && !timed_out; i++) {
		ssize_t n = write(fd, buf, total);
		if (n != (ssize_t)total) {
			if (n < 0 && errno == EINTR)
				break;
			if (n < 0 && r.errors == 0)
				fprintf(stderr, "tapio: write: %s\n", strerror(errno));
			r.errors++;
			continue;
		}
		r.frames++;
	}
	r.seconds = now_s() - t0;
	r.bytes = (unsigned long long)r.frames * frame_len;
	return r;
}

static struct result run_read(const struct opts *o, int fd)
{
	struct result r = { 0 };
	uint8_t *buf = malloc(RX_BUF_SZ);
	double t0 = 0, t1 = 0;
	if (!buf)
		die("malloc");
	while (r.frames < o->frames && !timed_out) {
		ssize_t n = read(fd, buf, RX_BUF_SZ);
		if (n < 0) {
			if (errno == EINTR)
				break;
			die("read");
		}
		t1 = now_s();
		if (!read_clock(o, &r, t1, &t0))
			continue; /* the clock starts here: count what arrives after it */
		r.frames++;
		r.bytes += (unsigned long long)(n - VNET_HDR_SZ);
	}
	r.cpu_end = cpu_s();
	r.seconds = r.frames > 0 ? t1 - t0 : 0;
	free(buf);
	return r;
}

/* ---------------------------- io_uring ---------------------------------- */

/*
 * io_uring through its three system calls, without liburing (whose -dev
 * package a fresh machine may lack): rings mapped as the kernel describes them
 * in struct io_uring_params, SQ array set to the identity once, head/tail
 * handed over with acquire/release.  One thread submits and reaps.
 *
 * IORING_OP_READ_MULTISHOT (Linux 6.7) follows IORING_OP_SENDMSG_ZC in the
 * kernel's enum io_uring_op; uapi headers older than 6.7 (Debian 12 ships 6.1)
 * stop before it, so it is derived from its neighbour, checked at compile time.
 */
_Static_assert(IORING_OP_SENDMSG_ZC == 48, "enum io_uring_op: IORING_OP_READ_MULTISHOT is SENDMSG_ZC + 1");
#define OP_READ_MULTISHOT (IORING_OP_SENDMSG_ZC + 1)

#define URING_BEST_WRITE_BATCH 256 /* writes per io_uring_enter in uring-write256 */
#define MSHOT_BUFS 256             /* provided buffers (power of two) in uring-mshot, by default (--bufs) */
#define MSHOT_BGID 7

struct uring {
	int fd;
	unsigned sq_entries, sq_mask, cq_mask;
	unsigned *sq_head, *sq_tail, *cq_head, *cq_tail;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
	unsigned sq_next;   /* our SQ tail: SQEs prepared */
	unsigned to_submit; /* prepared, not yet taken by the kernel */
	void *ring_map, *cq_map;
	size_t ring_len, cq_len, sqes_len;
};

static void uring_unavailable(const char *what, int err)
{
	fprintf(stderr, "tapio: io_uring unavailable (%s: %s); check kernel.io_uring_disabled and the kernel version\n", what,
		strerror(err));
	exit(3);
}

static void die_errno(const char *what, int err)
{
	errno = err;
	die(what);
}

/*
 * Sets up a ring with `flags`.  `fallback`: on EINVAL (a kernel without those
 * flags) retry with none, as the naive modes always did; the best modes need
 * theirs and report io_uring as unavailable instead.
 */
static void uring_setup(struct uring *u, unsigned entries, unsigned flags, bool fallback)
{
	struct io_uring_params p;
	memset(u, 0, sizeof(*u));
	memset(&p, 0, sizeof(p));
	p.flags = flags;
	int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	if (fd < 0 && errno == EINVAL && fallback && flags) {
		memset(&p, 0, sizeof(p));
		fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	}
	if (fd < 0) {
		if (errno == ENOSYS || errno == EPERM || errno == EINVAL)
			uring_unavailable("io_uring_setup", errno);
		die("io_uring_setup");
	}
	u->fd = fd;
	u->sq_entries = p.sq_entries;
	u->ring_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	u->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
	if (single && u->cq_len > u->ring_len)
		u->ring_len = u->cq_len;
	u->ring_map = mmap(NULL, u->ring_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
	if (u->ring_map == MAP_FAILED)
		die("mmap SQ ring");
	u->cq_map = u->ring_map;
	if (!single) {
		u->cq_map = mmap(NULL, u->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
		if (u->cq_map == MAP_FAILED)
			die("mmap CQ ring");
	}
	u->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
	u->sqes = mmap(NULL, u->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
	if (u->sqes == MAP_FAILED)
		die("mmap SQEs");
	char *sq = u->ring_map, *cq = u->cq_map;
	u->sq_head = (unsigned *)(sq + p.sq_off.head);
	u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
	u->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
	unsigned *array = (unsigned *)(sq + p.sq_off.array);
	for (unsigned i = 0; i < p.sq_entries; i++)
		array[i] = i; /* SQE i is always slot i */
	u->cq_head = (unsigned *)(cq + p.cq_off.head);
	u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
	u->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
	u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
	u->sq_next = *u->sq_tail;
}

static void uring_close(struct uring *u)
{
	munmap(u->sqes, u->sqes_len);
	if (u->cq_map != u->ring_map)
		munmap(u->cq_map, u->cq_len);
	munmap(u->ring_map, u->ring_len);
	close(u->fd);
}

/* Registers the tap queue as fixed file 0. */
static void uring_register_fd(struct uring *u, int fd)
{
	if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_FILES, &fd, 1) < 0)
		die("IORING_REGISTER_FILES");
}

static struct io_uring_sqe *uring_sqe(struct uring *u)
{
	unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
	if (u->sq_next - head >= u->sq_entries) {
		fprintf(stderr, "tapio: io_uring submission queue full\n");
		exit(1);
	}
	struct io_uring_sqe *sqe = &u->sqes[u->sq_next & u->sq_mask];
	memset(sqe, 0, sizeof(*sqe));
	u->sq_next++;
	u->to_submit++;
	return sqe;
}

/* Publishes the prepared SQEs and enters: submits them and waits for min_complete CQEs.  Returns 0 or -errno. */
static int uring_enter(struct uring *u, unsigned min_complete)
{
	__atomic_store_n(u->sq_tail, u->sq_next, __ATOMIC_RELEASE);
	int n = (int)syscall(__NR_io_uring_enter, u->fd, u->to_submit, min_complete,
			     min_complete ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
	if (n < 0)
		return -errno;
	u->to_submit -= (unsigned)n;
	return 0;
}

static void prep_rw(struct io_uring_sqe *sqe, int op, void *addr, unsigned len, uint64_t data)
{
	sqe->opcode = (uint8_t)op;
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->fd = 0; /* index 0 of the registered file table */
	sqe->addr = (uint64_t)(uintptr_t)addr;
	sqe->len = len;
	sqe->off = 0;
	sqe->user_data = data;
}

/*
 * Reaps every CQE there is: fn(ctx, cqe) for each, then one store of the CQ
 * head.  Returns how many.
 */
#define URING_FOR_EACH_CQE(u, cqe, body)                                                   \
	do {                                                                               \
		unsigned head_ = *(u)->cq_head;                                            \
		unsigned tail_ = __atomic_load_n((u)->cq_tail, __ATOMIC_ACQUIRE);          \
		for (; head_ != tail_; head_++) {                                          \
			const struct io_uring_cqe *cqe = &(u)->cqes[head_ & (u)->cq_mask]; \
			body                                                               \
		}                                                                          \
		__atomic_store_n((u)->cq_head, head_, __ATOMIC_RELEASE);                   \
	} while (0)

/*
 * Ends everything still in flight (IORING_OP_ASYNC_CANCEL, any request) and
 * reaps until `inflight` requests have completed for good; then unregisters
 * the tap fd.  Without this the ring's teardown after close() is
 * asynchronous, and the registered tap queue stays attached for a while after
 * the program exits (the next benchmark run would find one queue too many).
 */
static void uring_quiesce(struct uring *u, unsigned inflight, bool multishot)
{
	if (inflight) {
		struct io_uring_sqe *sqe = uring_sqe(u);
		sqe->opcode = IORING_OP_ASYNC_CANCEL;
		sqe->fd = -1;
		sqe->cancel_flags = IORING_ASYNC_CANCEL_ANY;
		sqe->user_data = UINT64_MAX;
		inflight++; /* the cancel's own CQE */
	}
	while (inflight) {
		int ret = uring_enter(u, 1);
		if (ret < 0 && ret != -EINTR)
			die_errno("io_uring_enter (cancel)", -ret);
		URING_FOR_EACH_CQE(u, cqe, {
			if (cqe->user_data == UINT64_MAX || !multishot || !(cqe->flags & IORING_CQE_F_MORE))
				inflight--;
		});
	}
	if (syscall(__NR_io_uring_register, u->fd, IORING_UNREGISTER_FILES, NULL, 0) < 0)
		die("IORING_UNREGISTER_FILES");
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		die("fcntl O_NONBLOCK");
}

/*
 * Naive io_uring write: batches of 32 IORING_OP_WRITE on the registered
 * (blocking) fd, SINGLE_ISSUER|COOP_TASKRUN, one enter per batch.  tun has no
 * FMODE_NOWAIT, so on a blocking fd io_uring hands each write to an io-wq
 * worker thread (their CPU time is counted).
 */
static struct result run_uring_write(const struct opts *o, int fd, const uint8_t *buf, size_t frame_len, unsigned max_batch, bool best)
{
	struct result r = { 0 };
	struct uring u;
	unsigned total = (unsigned)(VNET_HDR_SZ + frame_len);
	if (best)
		set_nonblock(fd); /* before registering: io_uring then writes inline, no io-wq */
	uring_setup(&u, max_batch, best ? IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
					 : IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN, !best);
	uring_register_fd(&u, fd);
	double t0 = now_s();
	long long submitted = 0;
	unsigned inflight = 0;
	while (submitted < o->frames && !timed_out) {
		unsigned batch = max_batch;
		if (o->frames - submitted < batch)
			batch = (unsigned)(o->frames - submitted);
		for (unsigned i = 0; i < batch; i++)
			prep_rw(uring_sqe(&u), IORING_OP_WRITE, (void *)buf, total, 0); /* the buffer is only read */
		int ret = uring_enter(&u, batch);
		inflight = batch;
		if (ret == -EINTR)
			break;
		if (ret < 0)
			die_errno("io_uring_enter", -ret);
		r.batches++;
		submitted += batch;
		unsigned seen = 0;
		while (seen < batch) {
			URING_FOR_EACH_CQE(&u, cqe, {
				if (cqe->res == (int)total) {
					r.frames++;
				} else {
					if (r.errors == 0)
						fprintf(stderr, "tapio: uring write: %s\n", cqe->res < 0 ? strerror(-cqe->res) : "short write");
					r.errors++;
				}
				seen++;
				inflight--;
			});
			if (seen < batch) {
				ret = uring_enter(&u, batch - seen);
				if (ret < 0 && ret != -EINTR)
					die_errno("io_uring_enter", -ret);
				if (ret == -EINTR && timed_out)
					break;
			}
		}
	}
	r.seconds = now_s() - t0;
	r.bytes = (unsigned long long)r.frames * frame_len;
	uring_quiesce(&u, inflight, false);
	uring_close(&u);
	return r;
}

/*
 * Naive io_uring read: 32 IORING_OP_READ into their own buffers kept in
 * flight on the registered (blocking) fd, each re-armed as it completes.
 */
static struct result run_uring_read(const struct opts *o, int fd)
{
	struct result r = { 0 };
	struct uring u;
	uint8_t *bufs = malloc((size_t)URING_BATCH * RX_BUF_SZ);
	double t0 = 0, t1 = 0;
	if (!bufs)
		die("malloc");
	uring_setup(&u, URING_BATCH * 2, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN, true);
	uring_register_fd(&u, fd);
	for (unsigned i = 0; i < URING_BATCH; i++)
		prep_rw(uring_sqe(&u), IORING_OP_READ, bufs + (size_t)i * RX_BUF_SZ, RX_BUF_SZ, i);
	long long total = 0;
	unsigned inflight = URING_BATCH;
	while (total < o->frames && !timed_out) {
		int ret = uring_enter(&u, 1);
		if (ret == -EINTR)
			break;
		if (ret < 0)
			die_errno("io_uring_enter", -ret);
		URING_FOR_EACH_CQE(&u, cqe, {
			unsigned idx = (unsigned)cqe->user_data;
			inflight--;
			if (total < o->frames) { /* done: leave the rest of the batch uncounted */
				if (cqe->res < 0)
					die_errno("uring read", -cqe->res);
				t1 = now_s();
				if (read_clock(o, &r, t1, &t0)) { /* else the clock starts here, or has not yet */
					total++;
					r.bytes += (unsigned long long)(cqe->res - VNET_HDR_SZ);
				}
				prep_rw(uring_sqe(&u), IORING_OP_READ, bufs + (size_t)idx * RX_BUF_SZ, RX_BUF_SZ, idx);
				inflight++;
			}
		});
		/* Counted after the batch: the one that starts the clock (read_clock zeroes
		 * these) counts with the frames it read after that. */
		r.enters++;
		r.batches++;
	}
	thread_stats(&r.t1); /* before the teardown: io-wq workers exit with the ring */
	r.cpu_end = cpu_s();
	uring_quiesce(&u, inflight, false);
	r.frames = total;
	r.seconds = total > 0 ? t1 - t0 : 0;
	uring_close(&u);
	free(bufs);
	return r;
}

/* A provided-buffer ring (IORING_REGISTER_PBUF_RING): `entries` buffers of RX_BUF_SZ bytes. */
struct pbuf_ring {
	struct io_uring_buf_ring *br;
	uint8_t *mem;
	unsigned entries;
	unsigned short tail; /* ours; published with one release store per batch */
};

static int pbuf_ring_register(struct uring *u, struct pbuf_ring *pr, unsigned entries, size_t buf_sz)
{
	size_t ring_bytes = entries * sizeof(struct io_uring_buf);
	pr->br = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (pr->br == MAP_FAILED)
		die("mmap buffer ring");
	pr->mem = NULL;
	if (buf_sz) {
		pr->mem = mmap(NULL, entries * buf_sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (pr->mem == MAP_FAILED)
			die("mmap buffers");
	}
	pr->tail = 0;
	pr->entries = entries;
	struct io_uring_buf_reg reg;
	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (uint64_t)(uintptr_t)pr->br;
	reg.ring_entries = entries;
	reg.bgid = MSHOT_BGID;
	if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0)
		return -errno;
	return 0;
}

static void pbuf_add(struct pbuf_ring *pr, unsigned bid)
{
	struct io_uring_buf *b = &pr->br->bufs[pr->tail & (pr->entries - 1)];
	b->addr = (uint64_t)(uintptr_t)(pr->mem + (size_t)bid * RX_BUF_SZ);
	b->len = RX_BUF_SZ;
	b->bid = (uint16_t)bid;
	pr->tail++;
}

static void pbuf_publish(struct pbuf_ring *pr)
{
	__atomic_store_n(&pr->br->tail, pr->tail, __ATOMIC_RELEASE);
}

static void prep_read_mshot(struct uring *u)
{
	struct io_uring_sqe *sqe = uring_sqe(u);
	prep_rw(sqe, OP_READ_MULTISHOT, NULL, 0, 1); /* addr and len 0: the kernel picks a provided buffer */
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = MSHOT_BGID;
}

/* n one-shot RWF_NOWAIT reads from the provided-buffer ring, tagged `data`:
 * each completes inside the io_uring_enter that submits it, or fails -EAGAIN. */
static void prep_nowait_reads(struct uring *u, unsigned n, uint64_t data)
{
	for (unsigned i = 0; i < n; i++) {
		struct io_uring_sqe *sqe = uring_sqe(u);
		prep_rw(sqe, IORING_OP_READ, NULL, RX_BUF_SZ, data);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = MSHOT_BGID;
		sqe->rw_flags = RWF_NOWAIT;
	}
}

/*
 * The best read loop there is for a tap queue (Linux 6.7+): one
 * IORING_OP_READ_MULTISHOT on the registered fd, opened O_NONBLOCK before
 * registering (tun has no FMODE_NOWAIT: with a blocking fd io_uring would
 * poll before every read), into a ring of MSHOT_BUFS provided buffers, the
 * ring SINGLE_ISSUER|DEFER_TASKRUN.  Each io_uring_enter waits for at least
 * one CQE and takes all there are; the buffers they used go back to the
 * buffer ring once per batch (one tail store), then the read is re-armed if
 * the kernel ended it: any CQE without IORING_CQE_F_MORE, e.g. -ENOBUFS when
 * every buffer was in use (the frame stays queued in the tap and is read
 * after the refill).  Buffers hold any frame the tap hands out (vnet header +
 * 64 KB: the bench tap has TSO on), so nothing is truncated.
 *
 * --drain (mode uring-mshot-drain): a multishot read keeps a poll armed on
 * the tap, so while the reader is behind every frame the sender queues costs
 * an io_uring poll wake and a task-work round (see run_uring_batch).  With
 * --drain, -ENOBUFS (every buffer used in one enter: the reader is behind)
 * does not re-arm the multishot: the loop reads batches of 64 RWF_NOWAIT
 * buffer-select reads (complete inline, no poll) until one meets -EAGAIN
 * (caught up), then re-arms the multishot to wait.
 */
static struct result run_uring_mshot(const struct opts *o, int fd)
{
	struct result r = { 0 };
	struct uring u;
	struct pbuf_ring pr;
	unsigned nbufs = o->bufs;
	unsigned short *done = malloc(nbufs * sizeof(*done));
	double t0 = 0, t1 = 0;
	if (!done)
		die("malloc");
	set_nonblock(fd);
	/*
	 * CQ ring (2 x the buffers) larger than the buffers that can be in use:
	 * a multishot read whose CQE does not fit (CQ overflow) is ended by the
	 * kernel, and would need a re-arm per batch.
	 */
	uring_setup(&u, nbufs < 8 ? 8 : nbufs, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, false);
	uring_register_fd(&u, fd);
	int ret = pbuf_ring_register(&u, &pr, nbufs, RX_BUF_SZ);
	if (ret < 0)
		uring_unavailable("IORING_REGISTER_PBUF_RING", -ret);
	for (unsigned i = 0; i < nbufs; i++)
		pbuf_add(&pr, i);
	pbuf_publish(&pr);
	prep_read_mshot(&u);
	bool armed = true; /* a multishot read is submitted or about to be */
	bool draining = false; /* --drain: RWF_NOWAIT batches instead of the multishot */
	unsigned dbatch = nbufs < 64 ? nbufs : 64;
	long long total = 0;
	while (total < o->frames && !timed_out) {
		unsigned want = 1;
		if (draining) {
			prep_nowait_reads(&u, dbatch, 3);
			want = dbatch;
		}
		ret = uring_enter(&u, want);
		r.enters++;
		if (ret == -EINTR)
			break;
		if (ret < 0)
			die_errno("io_uring_enter", -ret);
		unsigned ndone = 0;
		bool rearm = false, enobufs = false, caught_up = false;
		long long got = 0;
		unsigned long long bytes = 0;
		URING_FOR_EACH_CQE(&u, cqe, {
			if (cqe->flags & IORING_CQE_F_BUFFER)
				done[ndone++] = (unsigned short)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
			if (cqe->res > 0) {
				got++;
				bytes += (unsigned long long)(cqe->res - VNET_HDR_SZ);
			} else if (cqe->res == -ENOBUFS) {
				r.enobufs++;
				enobufs = true;
			} else if (cqe->res == -EAGAIN && cqe->user_data == 3) {
				caught_up = true; /* a drain read found the tap's ring empty */
			} else if (cqe->res < 0 && cqe->res != -EAGAIN && cqe->res != -EINTR) {
				if (cqe->res == -EINVAL && r.clock_state == 0)
					uring_unavailable("IORING_OP_READ_MULTISHOT (Linux 6.7+)", EINVAL);
				die_errno("uring multishot read", -cqe->res);
			}
			if (cqe->user_data == 1 && !(cqe->flags & IORING_CQE_F_MORE)) {
				rearm = true;
				armed = false;
			}
		});
		/* Recycle first, then re-arm: after -ENOBUFS the re-armed read needs buffers. */
		for (unsigned i = 0; i < ndone; i++)
			pbuf_add(&pr, done[i]);
		if (ndone)
			pbuf_publish(&pr);
		if (o->drain && rearm && enobufs) {
			draining = true; /* behind: drain with RWF_NOWAIT batches, no poll armed meanwhile */
			r.drains++;
		} else if (draining && caught_up) {
			draining = false;
			rearm = true;
		}
		if (rearm && !draining) {
			r.rearms++;
			prep_read_mshot(&u);
			armed = true;
		}
		if (!got)
			continue;
		t1 = now_s();
		if (!read_clock(o, &r, t1, &t0))
			continue; /* the clock starts with this batch, or has not yet */
		r.batches++;
		total += got;
		r.bytes += bytes;
	}
	r.frames = total;
	r.seconds = total > 0 ? t1 - t0 : 0;
	thread_stats(&r.t1);
	r.cpu_end = cpu_s();
	uring_quiesce(&u, (armed ? 1 : 0) + (draining ? u.to_submit : 0), true);
	uring_close(&u);
	munmap(pr.mem, (size_t)nbufs * RX_BUF_SZ);
	munmap(pr.br, nbufs * sizeof(struct io_uring_buf));
	free(done);
	return r;
}

/*
 * Batched one-shot reads (issue 12): batches of up to 64 IORING_OP_READ with
 * RWF_NOWAIT and IOSQE_BUFFER_SELECT from a provided-buffer ring like
 * uring-mshot's, on the O_NONBLOCK registered fd, each batch submitted and
 * reaped in one io_uring_enter (every read completes inline: a frame, or
 * -EAGAIN when the tap's ring is empty), buffers given back once per batch.
 * Only when a batch found the ring empty does the loop wait, on one one-shot
 * IORING_OP_POLL_ADD (POLLIN), and then reads a batch again.  So while the
 * reader is behind no poll is armed on the tap and the generator's per-frame
 * wake-up of the tap's wait queue finds no io_uring waiter; the multishot
 * read keeps its poll armed all the time: every frame queued costs an
 * io_uring poll wake on the producer's CPU and a poll/task-work round on the
 * reader's, with the request's poll reference count written from both CPUs:
 * the difference this loop measures.  The price: a reader that keeps up reads
 * a frame or two per poll wake-up, one enter per batch plus one per wait.
 * Without RWF_NOWAIT (O_NONBLOCK alone) io_uring would arm a poll for every
 * read that finds the ring empty: 64 armed polls, all woken by every frame.
 */
static struct result run_uring_batch(const struct opts *o, int fd)
{
	struct result r = { 0 };
	struct uring u;
	struct pbuf_ring pr;
	unsigned nbufs = o->bufs, batch = nbufs < 64 ? nbufs : 64;
	double t0 = 0, t1 = 0;
	set_nonblock(fd);
	uring_setup(&u, batch * 2, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, false);
	uring_register_fd(&u, fd);
	int ret = pbuf_ring_register(&u, &pr, nbufs, RX_BUF_SZ);
	if (ret < 0)
		uring_unavailable("IORING_REGISTER_PBUF_RING", -ret);
	for (unsigned i = 0; i < nbufs; i++)
		pbuf_add(&pr, i);
	pbuf_publish(&pr);
	long long total = 0;
	bool polling = false;
	while (total < o->frames && !timed_out) {
		unsigned want = 1;
		if (!polling) {
			prep_nowait_reads(&u, batch, 1);
			want = batch;
		}
		ret = uring_enter(&u, want);
		r.enters++;
		if (ret == -EINTR)
			break;
		if (ret < 0)
			die_errno("io_uring_enter", -ret);
		long long got = 0;
		unsigned long long bytes = 0;
		bool empty = false;
		URING_FOR_EACH_CQE(&u, cqe, {
			if (cqe->user_data == 2) { /* the poll: readable */
				polling = false;
				continue;
			}
			if (cqe->flags & IORING_CQE_F_BUFFER)
				pbuf_add(&pr, cqe->flags >> IORING_CQE_BUFFER_SHIFT);
			if (cqe->res > 0) {
				got++;
				bytes += (unsigned long long)(cqe->res - VNET_HDR_SZ);
			} else if (cqe->res == -EAGAIN) {
				empty = true;
			} else if (cqe->res != -EINTR) {
				if (cqe->res == -EOPNOTSUPP || cqe->res == -EINVAL)
					uring_unavailable("IORING_OP_READ with RWF_NOWAIT and a provided buffer", -cqe->res);
				die_errno("uring read", -cqe->res);
			}
		});
		pbuf_publish(&pr);
		if (empty) {
			struct io_uring_sqe *sqe = uring_sqe(&u);
			prep_rw(sqe, IORING_OP_POLL_ADD, NULL, 0, 2);
			sqe->poll32_events = POLLIN;
			polling = true;
			r.polls++;
		}
		if (!got)
			continue;
		t1 = now_s();
		if (!read_clock(o, &r, t1, &t0))
			continue; /* the clock starts with this batch, or has not yet */
		r.batches++;
		total += got;
		r.bytes += bytes;
	}
	r.frames = total;
	r.seconds = total > 0 ? t1 - t0 : 0;
	thread_stats(&r.t1);
	r.cpu_end = cpu_s();
	/* A poll prepared but not submitted yet (timeout) is submitted by the cancel's enter and cancelled with it. */
	uring_quiesce(&u, polling ? 1 : 0, false);
	uring_close(&u);
	munmap(pr.mem, (size_t)nbufs * RX_BUF_SZ);
	munmap(pr.br, nbufs * sizeof(struct io_uring_buf));
	return r;
}

/*
 * --mode probe: what this kernel's io_uring offers the modes above, as one
 * JSON line: setup at all, SINGLE_ISSUER|DEFER_TASKRUN (6.1), the read and
 * write ops, READ_MULTISHOT (6.7), provided-buffer rings (5.19).
 */
static int run_probe(void)
{
	bool uring = false, defer = false, rw = false, mshot = false, pbuf = false;
	const char *why = "";
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	int fd = (int)syscall(__NR_io_uring_setup, 4, &p);
	if (fd < 0) {
		why = strerror(errno);
	} else {
		uring = true;
		close(fd);
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
		fd = (int)syscall(__NR_io_uring_setup, 4, &p);
		if (fd >= 0) {
			defer = true;
			size_t len = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
			struct io_uring_probe *pb = calloc(1, len);
			if (!pb)
				die("calloc");
			if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PROBE, pb, 256) == 0) {
				bool ok_r = pb->ops_len > IORING_OP_READ && (pb->ops[IORING_OP_READ].flags & IO_URING_OP_SUPPORTED);
				bool ok_w = pb->ops_len > IORING_OP_WRITE && (pb->ops[IORING_OP_WRITE].flags & IO_URING_OP_SUPPORTED);
				rw = ok_r && ok_w;
				mshot = pb->ops_len > OP_READ_MULTISHOT && (pb->ops[OP_READ_MULTISHOT].flags & IO_URING_OP_SUPPORTED);
			}
			free(pb);
			struct uring u;
			memset(&u, 0, sizeof(u));
			u.fd = fd;
			struct pbuf_ring pr;
			pbuf = pbuf_ring_register(&u, &pr, MSHOT_BUFS, 0) == 0;
			munmap(pr.br, MSHOT_BUFS * sizeof(struct io_uring_buf));
			close(fd);
		}
	}
	printf("{\"uring\":%s,\"deferTaskrun\":%s,\"readWrite\":%s,\"readMultishot\":%s,\"pbufRing\":%s,\"error\":\"%s\"}\n",
	       uring ? "true" : "false", defer ? "true" : "false", rw ? "true" : "false", mshot ? "true" : "false",
	       pbuf ? "true" : "false", why);
	return 0;
}

/* ---------------------------- generator --------------------------------- */

/*
 * Child process: transmits copies of one frame on the tap through an AF_PACKET
 * socket with PACKET_QDISC_BYPASS until killed. ENOBUFS (tap ring full) is
 * expected and ignored.
 */
static pid_t start_generator(const struct opts *o, int ifindex)
{
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid > 0)
		return pid;
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	pin_cpu(o->gen_cpu);
	int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("generator: socket(AF_PACKET)");
	int one = 1;
	if (setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
		die("generator: PACKET_QDISC_BYPASS");
	if (o->size == 0 && setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)) < 0)
		die("generator: PACKET_VNET_HDR");
	struct sockaddr_ll sll;
	memset(&sll, 0, sizeof(sll));
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(ETH_P_ALL);
	sll.sll_ifindex = ifindex;
	if (bind(s, (struct sockaddr *)&sll, sizeof(sll)) < 0)
		die("generator: bind");
	static const uint8_t dst[ETH_ALEN] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x02 };
	static const uint8_t src[ETH_ALEN] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };
	uint8_t *buf = malloc(RX_BUF_SZ);
	if (!buf)
		die("malloc");
	size_t len = build_frame(buf, o->size, dst, src, 40000);
	/* PACKET_VNET_HDR takes a 10-byte struct virtio_net_hdr: skip num_buffers. */
	uint8_t *start = buf + VNET_HDR_SZ;
	size_t total = len;
	if (o->size == 0) {
		start -= sizeof(struct virtio_net_hdr);
		total += sizeof(struct virtio_net_hdr);
		memmove(start, buf, sizeof(struct virtio_net_hdr));
	}
	struct iovec iov = { .iov_base = start, .iov_len = total };
	struct mmsghdr msgs[GEN_BATCH];
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < GEN_BATCH; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	double t0 = now_s();
	long long sent = 0;
	for (;;) {
		int n = sendmmsg(s, msgs, GEN_BATCH, 0);
		if (n < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR)
			die("generator: sendmmsg");
		if (o->gen_rate <= 0)
			continue;
		/* Paced: count attempts (a full ring drops, that is fine) and wait for the schedule. */
		sent += GEN_BATCH;
		double due = t0 + (double)sent / (double)o->gen_rate;
		while (now_s() < due)
			;
	}
}

/* ---------------------------- main -------------------------------------- */

static void usage(void)
{
	fprintf(stderr,
		"usage: tapio --dev NAME --mode write|read|uring-write|uring-read|uring-write256|uring-mshot|uring-mshot-drain|uring-batch [options]\n"
		"       tapio --mode probe    (what io_uring offers here, as JSON)\n"
		"  --queues Q      queues to attach in this process (default 1, max %d)\n"
		"  --queue I       queue (0..Q-1) to do I/O on (default 0)\n"
		"  --frames N      frames to write / read (default 1000000)\n"
		"  --size S        60 | 1514 | gso (default 60)\n"
		"  --timeout SEC   stop after SEC seconds (default 30)\n"
		"  --cpu C         pin this process to CPU C\n"
		"  --gen-cpu C     pin the read generator to CPU C\n"
		"  --gen-rate PPS  read: pace the generator to PPS frames/s (default 0 = flat out)\n"
		"  --no-gen        read: do not fork the AF_PACKET generator (use an external one)\n"
		"  --flow K        write: source port 40000+K (one flow per queue, as a guest's queues carry their own flows)\n"
		"  --bufs N        uring-mshot, uring-batch: provided buffers, a power of two (default %d)\n"
		"  --drain         uring-mshot: after -ENOBUFS (the reader is behind) read batches of 64\n"
		"                  RWF_NOWAIT reads from the buffer ring until one meets -EAGAIN, then re-arm\n"
		"  --warmup-ms T   reads: measure from the first frame read T ms after the first one\n"
		"                  (default 0: from the first frame; --frames counts measured frames)\n",
		MAX_QUEUES, MSHOT_BUFS);
	exit(1);
}

static long long parse_num(const char *s, long long min, long long max)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || *end || v < min || v > max) {
		fprintf(stderr, "tapio: bad number '%s' (expected %lld..%lld)\n", s, min, max);
		exit(1);
	}
	return v;
}

static struct opts parse_opts(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "dev", required_argument, NULL, 'd' },     { "mode", required_argument, NULL, 'm' },
		{ "queues", required_argument, NULL, 'q' },  { "queue", required_argument, NULL, 'i' },
		{ "frames", required_argument, NULL, 'n' },  { "size", required_argument, NULL, 's' },
		{ "timeout", required_argument, NULL, 't' }, { "cpu", required_argument, NULL, 'c' },
		{ "gen-cpu", required_argument, NULL, 'g' }, { "no-gen", no_argument, NULL, 'G' },
		{ "gen-rate", required_argument, NULL, 'r' }, { "flow", required_argument, NULL, 'f' },
		{ "bufs", required_argument, NULL, 'b' },    { "drain", no_argument, NULL, 'D' },
		{ "warmup-ms", required_argument, NULL, 'w' }, { "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct opts o = { NULL, MODE_WRITE, NULL, 1, 0, 1000000, 60, 30.0, -1, -1, true, 0, 0, MSHOT_BUFS, false, 0 };
	int c;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'd':
			o.dev = optarg;
			break;
		case 'm':
			o.mode_name = optarg;
			break;
		case 'q':
			o.queues = (int)parse_num(optarg, 1, MAX_QUEUES);
			break;
		case 'i':
			o.queue = (int)parse_num(optarg, 0, MAX_QUEUES - 1);
			break;
		case 'n':
			o.frames = parse_num(optarg, 1, 1LL << 40);
			break;
		case 's':
			o.size = strcmp(optarg, "gso") == 0 ? 0 : (int)parse_num(optarg, 60, 1514);
			break;
		case 't':
			o.timeout = (double)parse_num(optarg, 1, 3600);
			break;
		case 'c':
			o.cpu = (int)parse_num(optarg, 0, 4095);
			break;
		case 'g':
			o.gen_cpu = (int)parse_num(optarg, 0, 4095);
			break;
		case 'D':
			o.drain = true;
			break;
		case 'w':
			o.warmup_ms = parse_num(optarg, 0, 600000);
			break;
		case 'G':
			o.gen = false;
			break;
		case 'r':
			o.gen_rate = parse_num(optarg, 0, 100000000);
			break;
		case 'f':
			o.flow = (int)parse_num(optarg, 0, 25535);
			break;
		case 'b':
			o.bufs = (unsigned)parse_num(optarg, 1, 32768);
			if (o.bufs & (o.bufs - 1)) {
				fprintf(stderr, "tapio: --bufs must be a power of two\n");
				exit(1);
			}
			break;
		default:
			usage();
		}
	}
	if (o.mode_name && strcmp(o.mode_name, "probe") == 0 && optind == argc) {
		o.mode_name = "probe";
		return o;
	}
	if (!o.dev || !o.mode_name || optind != argc || o.queue >= o.queues || strlen(o.dev) >= IFNAMSIZ)
		usage();
	if (strcmp(o.mode_name, "write") == 0)
		o.mode = MODE_WRITE;
	else if (strcmp(o.mode_name, "read") == 0)
		o.mode = MODE_READ;
	else if (strcmp(o.mode_name, "uring-write") == 0)
		o.mode = MODE_URING_WRITE;
	else if (strcmp(o.mode_name, "uring-read") == 0)
		o.mode = MODE_URING_READ;
	else if (strcmp(o.mode_name, "uring-write256") == 0)
		o.mode = MODE_URING_WRITE256;
	else if (strcmp(o.mode_name, "uring-mshot") == 0)
		o.mode = MODE_URING_MSHOT;
	else if (strcmp(o.mode_name, "uring-mshot-drain") == 0) { /* = uring-mshot --drain */
		o.mode = MODE_URING_MSHOT;
		o.drain = true;
	}
	else if (strcmp(o.mode_name, "uring-batch") == 0)
		o.mode = MODE_URING_BATCH;
	else
		usage();
	return o;
}

int main(int argc, char **argv)
{
	struct opts o = parse_opts(argc, argv);
	int fds[MAX_QUEUES];
	uint8_t tap_mac[ETH_ALEN];
	pid_t gen = -1;

	if (strcmp(o.mode_name, "probe") == 0)
		return run_probe();
	pin_cpu(o.cpu);
	for (int i = 0; i < o.queues; i++)
		fds[i] = tap_open_queue(o.dev);
	int ifindex = link_up(o.dev, tap_mac);
	int fd = fds[o.queue];

	uint8_t *buf = malloc(RX_BUF_SZ);
	if (!buf)
		die("malloc");
	/* Destination: a locally administered unicast MAC that is not the tap's → PACKET_OTHERHOST. */
	uint8_t dst[ETH_ALEN] = { 0x02, 0x6d, 0x71, 0x74, 0x61, 0x70 };
	static const uint8_t src[ETH_ALEN] = { 0x02, 0x6d, 0x71, 0x74, 0x61, 0x71 };
	if (memcmp(dst, tap_mac, ETH_ALEN) == 0)
		dst[5] ^= 0x80;
	size_t frame_len = build_frame(buf, o.size, dst, src, (uint16_t)(40000 + o.flow));

	if (o.mode == MODE_READ || o.mode == MODE_URING_READ || o.mode == MODE_URING_MSHOT || o.mode == MODE_URING_BATCH) {
		if (o.gen)
			gen = start_generator(&o, ifindex);
	}
	struct devstats before = read_stats(o.dev);
	arm_timeout(o.timeout);
	double cpu0 = cpu_s();
	struct threadstats ts0;
	thread_stats(&ts0);
	struct result r = { 0 };
	switch (o.mode) {
	case MODE_WRITE:
		r = run_write(&o, fd, buf, frame_len);
		break;
	case MODE_READ:
		r = run_read(&o, fd);
		break;
	case MODE_URING_WRITE:
		r = run_uring_write(&o, fd, buf, frame_len, URING_BATCH, false);
		break;
	case MODE_URING_READ:
		r = run_uring_read(&o, fd);
		break;
	case MODE_URING_WRITE256:
		r = run_uring_write(&o, fd, buf, frame_len, URING_BEST_WRITE_BATCH, true);
		break;
	case MODE_URING_MSHOT:
		r = run_uring_mshot(&o, fd);
		break;
	case MODE_URING_BATCH:
		r = run_uring_batch(&o, fd);
		break;
	}
	r.cpu_seconds = cpu_s() - cpu0;
	if (r.clock_state == 2) /* a read loop: its CPU time from where its clock started */
		r.cpu_seconds = r.cpu_end - r.cpu_start;
	else
		r.t0 = ts0;
	if (r.t1.main_cpu == 0) /* the io_uring read modes took it before their teardown */
		thread_stats(&r.t1);
	struct devstats after = read_stats(o.dev);
	if (gen > 0) {
		kill(gen, SIGKILL);
		waitpid(gen, NULL, 0);
	}
	print_result(&o, &r, &before, &after);
	for (int i = 0; i < o.queues; i++)
		close(fds[i]);
	free(buf);
	if (r.frames == 0 && timed_out)
		return 2;
	return r.errors ? 1 : 0;
}
