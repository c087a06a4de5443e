// SPDX-License-Identifier: MIT
/*
 * ctl — control-plane benchmark for Linux multi-queue taps.
 *
 * Build:  cc -O2 -Wall -Wextra -Werror -o ctl ctl.c
 * Run ONLY inside a throw-away network namespace (see run.sh / README.md).
 *
 * For every queue count Q in the list (default 1,2,4,8,16,32,64,128,256) and
 * for R repeats (default 5):
 *
 *   create  open("/dev/net/tun", O_RDWR|O_CLOEXEC) + TUNSETIFF with
 *           IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_MULTI_QUEUE, Q times (the first
 *           call creates the device, the others attach queues 1..Q-1);
 *   toggle  for every queue: TUNSETQUEUE IFF_DETACH_QUEUE, then
 *           TUNSETQUEUE IFF_ATTACH_QUEUE (2*Q ioctls, each under RTNL; a detach
 *           waits for an expedited RCU grace period via synchronize_net());
 *   close   close() all Q descriptors; the last close unregisters the device,
 *           which is synchronous and dominated by RCU / netdev teardown.
 *
 * Output, one JSON line per Q, microseconds for the *whole* operation (all Q
 * queues), median over the repeats, plus min and max:
 *   {"queues":Q,"repeats":R,"createUs":..,"toggleUs":..,"closeUs":..,
 *    "createUsMin":..,"createUsMax":..,...}
 *
 * Usage: ctl [-q 1,2,4,...] [-r REPEATS] [-n IFNAME]
 * Exit status 0 ok, 1 error.  Needs RLIMIT_NOFILE > max Q (256) + a few.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_QUEUES 256 /* MAX_TAP_QUEUES in drivers/net/tun.c */
#define MAX_REPEATS 1000
#define MAX_LIST 64

static void die(const char *what)
{
	fprintf(stderr, "ctl: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* Median of n values (sorts v in place). */
static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int open_queue(const char *name)
{
	struct ifreq ifr;
	int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open /dev/net/tun");
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		die("TUNSETIFF");
	return fd;
}

static void set_queue(int fd, short flag, const char *what)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = flag;
	if (ioctl(fd, TUNSETQUEUE, &ifr) < 0)
		die(what);
}

struct sample {
	double create, toggle, close;
};

static struct sample run_once(const char *name, int q)
{
	int fds[MAX_QUEUES];
	struct sample s;
	double t0 = now_us();
	for (int i = 0; i < q; i++)
		fds[i] = open_queue(name);
	double t1 = now_us();
	for (int i = 0; i < q; i++) {
		set_queue(fds[i], IFF_DETACH_QUEUE, "TUNSETQUEUE IFF_DETACH_QUEUE");
		set_queue(fds[i], IFF_ATTACH_QUEUE, "TUNSETQUEUE IFF_ATTACH_QUEUE");
	}
	double t2 = now_us();
	for (int i = 0; i < q; i++)
		if (close(fds[i]) < 0)
			die("close");
	double t3 = now_us();
	s.create = t1 - t0;
	s.toggle = t2 - t1;
	s.close = t3 - t2;
	return s;
}

static int parse_list(const char *arg, int *out)
{
	int n = 0;
	char *copy = strdup(arg), *save = NULL;
	if (!copy)
		die("strdup");
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *end;
		long v = strtol(tok, &end, 10);
		if (*end || v < 1 || v > MAX_QUEUES || n == MAX_LIST) {
			fprintf(stderr, "ctl: bad queue count '%s' (1..%d)\n", tok, MAX_QUEUES);
			exit(1);
		}
		out[n++] = (int)v;
	}
	free(copy);
	return n;
}

int main(int argc, char **argv)
{
	int list[MAX_LIST];
	int nlist = parse_list("1,2,4,8,16,32,64,128,256", list);
	int repeats = 5;
	char name[IFNAMSIZ];
	int c;
	snprintf(name, sizeof(name), "mqctl%d", (int)(getpid() % 100000));
	while ((c = getopt(argc, argv, "q:r:n:")) != -1) {
		switch (c) {
		case 'q':
			nlist = parse_list(optarg, list);
			break;
		case 'r':
			repeats = atoi(optarg);
			if (repeats < 1 || repeats > MAX_REPEATS) {
				fprintf(stderr, "ctl: repeats must be 1..%d\n", MAX_REPEATS);
				return 1;
			}
			break;
		case 'n':
			if (strlen(optarg) >= IFNAMSIZ) {
				fprintf(stderr, "ctl: interface name too long\n");
				return 1;
			}
			snprintf(name, sizeof(name), "%s", optarg);
			break;
		default:
			fprintf(stderr, "usage: ctl [-q 1,2,4,...] [-r REPEATS] [-n IFNAME]\n");
			return 1;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "usage: ctl [-q 1,2,4,...] [-r REPEATS] [-n IFNAME]\n");
		return 1;
	}

	/* Warm-up: first device creation in a fresh namespace pays one-off costs. */
	run_once(name, 1);

	static double cr[MAX_REPEATS], tg[MAX_REPEATS], cl[MAX_REPEATS];
	for (int li = 0; li < nlist; li++) {
		int q = list[li];
		for (int r = 0; r < repeats; r++) {
			struct sample s = run_once(name, q);
			cr[r] = s.create;
			tg[r] = s.toggle;
			cl[r] = s.close;
		}
		double crm = median(cr, repeats), tgm = median(tg, repeats), clm = median(cl, repeats);
		printf("{\"queues\":%d,\"repeats\":%d,\"createUs\":%.1f,\"toggleUs\":%.1f,\"closeUs\":%.1f,"
		       "\"createUsMin\":%.1f,\"createUsMax\":%.1f,\"toggleUsMin\":%.1f,\"toggleUsMax\":%.1f,"
		       "\"closeUsMin\":%.1f,\"closeUsMax\":%.1f}\n",
		       q, repeats, crm, tgm, clm, cr[0], cr[repeats - 1], tg[0], tg[repeats - 1], cl[0],
		       cl[repeats - 1]);
		fflush(stdout);
	}
	return 0;
}
