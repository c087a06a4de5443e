// A minimal io_uring used as a batching syscall, shared by the data path
// (native/io.cc) and the vhost-user workers (native/vhost_user.cc).  Raw
// syscalls on <linux/io_uring.h>: no liburing needed to build.  One Ring has
// one owner thread; nothing is in flight between SubmitAndWait calls.
//
// The multishot receive engine (native/io.cc, rx 'uring-mshot') also uses
// the lower-level pieces at the end of the class (SetupExact, Publish,
// Enter, Peek/Advance, TaskWorkPending, the buffer-ring registration):
// with those, a request does stay in flight between calls,
// and its owner cancels and reaps it before tearing the ring down.
// ProbeUring() reports what the running kernel's io_uring offers.
#pragma once

#include <errno.h>
#include <linux/io_uring.h>
#include <linux/time_types.h>
#include <linux/version.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mqtap {

// IORING_OP_READ_MULTISHOT (Linux 6.7).  Older build headers lack it; the
// UAPI opcode numbers never change (it follows IORING_OP_SENDMSG_ZC), and the
// running kernel is asked (IORING_REGISTER_PROBE) before it is used.
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 7, 0)
constexpr unsigned kOpReadMultishot = IORING_OP_READ_MULTISHOT;
#else
constexpr unsigned kOpReadMultishot = IORING_OP_SENDMSG_ZC + 1;
static_assert(IORING_OP_SENDMSG_ZC == 48, "io_uring opcode numbering");
#endif

inline int SysSetup(unsigned entries, io_uring_params* p) { return static_cast<int>(syscall(__NR_io_uring_setup, entries, p)); }
inline int SysEnter(int fd, unsigned submit, unsigned min_complete, unsigned flags, const void* arg, size_t argsz) {
  return static_cast<int>(syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, arg, argsz));
}
inline int SysRegister(int fd, unsigned op, const void* arg, unsigned n) { return static_cast<int>(syscall(__NR_io_uring_register, fd, op, arg, n)); }

class Ring {
 public:
  ~Ring() { Destroy(); }

  // 0 or an errno.  Tries SINGLE_ISSUER|DEFER_TASKRUN (6.1+), then
  // COOP_TASKRUN (5.19+), then no flags.
  int Setup(unsigned entries, int file) {
    const unsigned tries[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_COOP_TASKRUN, 0};
    return SetupTries(entries, file, tries, 3);
  }

  // 0 or an errno: exactly these setup flags (no fallback; EINVAL when the
  // kernel lacks one of them).
  int SetupExact(unsigned entries, int file, unsigned flags) { return SetupTries(entries, file, &flags, 1); }

 private:
  int SetupTries(unsigned entries, int file, const unsigned* tries, unsigned ntries) {
    io_uring_params p;
    int fd = -1;
    for (unsigned i = 0; i < ntries; i++) {
      memset(&p, 0, sizeof p);
      p.flags = tries[i];
      fd = SysSetup(entries, &p);
      if (fd >= 0 || errno != EINVAL) break;
    }
    if (fd < 0) return errno;
    fd_ = fd;
    flags_ = p.flags;
    if (!(p.features & IORING_FEAT_EXT_ARG)) return Fail(ENOSYS);  // Linux < 5.11: no bounded wait
    entries_ = p.sq_entries;
    sq_len_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) sq_len_ = cq_len_ = std::max(sq_len_, cq_len_);
    sq_map_ = mmap(nullptr, sq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQ_RING);
    if (sq_map_ == MAP_FAILED) return Fail(errno);
    if (single) {
      cq_map_ = sq_map_;
    } else {
      cq_map_ = mmap(nullptr, cq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_CQ_RING);
      if (cq_map_ == MAP_FAILED) return Fail(errno);
    }
    sqe_len_ = p.sq_entries * sizeof(io_uring_sqe);
    sqe_map_ = mmap(nullptr, sqe_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, IORING_OFF_SQES);
    if (sqe_map_ == MAP_FAILED) return Fail(errno);
    char* sq = static_cast<char*>(sq_map_);
    char* cq = static_cast<char*>(cq_map_);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
    sq_flags_ = reinterpret_cast<unsigned*>(sq + p.sq_off.flags);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
    unsigned* array = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
    for (unsigned i = 0; i < p.sq_entries; i++) array[i] = i;  // identity: SQE i is slot i
    sqes_ = static_cast<io_uring_sqe*>(sqe_map_);
    cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
    // The tap fd as registered file 0: no fget/fput per op.
    if (SysRegister(fd_, IORING_REGISTER_FILES, &file, 1) < 0) return Fail(errno);
    registered_ = true;
    return 0;
  }

 public:
  void Destroy() {
    if (fd_ < 0) return;
    // Drop the ring's reference to the tap file now (nothing is in flight
    // between calls), not in the ring's asynchronous teardown: the queue
    // must be gone from the device as soon as its fd is closed.
    if (registered_) SysRegister(fd_, IORING_UNREGISTER_FILES, nullptr, 0);
    registered_ = false;
    if (sqe_map_ != MAP_FAILED) munmap(sqe_map_, sqe_len_);
    if (cq_map_ != MAP_FAILED && cq_map_ != sq_map_) munmap(cq_map_, cq_len_);
    if (sq_map_ != MAP_FAILED) munmap(sq_map_, sq_len_);
    sqe_map_ = cq_map_ = sq_map_ = MAP_FAILED;
    close(fd_);
    fd_ = -1;
  }

  unsigned entries() const { return entries_; }

  // The i-th SQE after the current tail (i < entries), zeroed.
  io_uring_sqe* Sqe(unsigned i) {
    io_uring_sqe* s = &sqes_[(*sq_tail_ + i) & sq_mask_];
    memset(s, 0, sizeof *s);
    return s;
  }

  // Publishes n SQEs, submits them and waits until all n have completed.
  // Returns 0 or an errno.  NOWAIT ops on a tap complete inline, so the wait
  // is normally over when the submit returns; the bounded wait (1 s) is a
  // safety net: if it ever expires, everything still in flight is cancelled
  // and reaped before returning ETIME, so nothing outlives the call.  When
  // io_uring_enter fails for good, the completions already posted are reaped
  // into `out` before the errno is returned (ops without one: unknown).
  // `enters` (optional) gets the number of io_uring_enter calls made.
  int SubmitAndWait(unsigned n, std::vector<io_uring_cqe>* out, unsigned* enters = nullptr) {
    unsigned dummy = 0;
    unsigned& calls = enters != nullptr ? *enters : dummy;
    calls = 0;
    __atomic_store_n(sq_tail_, *sq_tail_ + n, __ATOMIC_RELEASE);
    unsigned submitted = 0;
    int err = 0;
    for (int busy = 0; submitted < n;) {
      int r = SysEnter(fd_, n - submitted, 0, IORING_ENTER_GETEVENTS, nullptr, 0);
      calls++;
      if (r < 0) {
        if (errno == EINTR) continue;
        // EAGAIN/EBUSY: out of memory for requests, or completions to reap
        // first.  Reap and retry a bounded number of times.
        if ((errno == EAGAIN || errno == EBUSY) && ++busy < 100) {
          Reap(out);
          continue;
        }
        int e = errno;
        Reap(out);  // what the chunks submitted before completed
        return e;   // nothing more was submitted: the caller gives up on this ring
      }
      submitted += static_cast<unsigned>(r);
    }
    Reap(out);
    while (out->size() < n) {
      __kernel_timespec ts = {1, 0};
      io_uring_getevents_arg arg;
      memset(&arg, 0, sizeof arg);
      arg.ts = reinterpret_cast<uint64_t>(&ts);
      int r = SysEnter(fd_, 0, static_cast<unsigned>(n - out->size()), IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
      calls++;
      Reap(out);
      if (r < 0 && errno == ETIME && out->size() < n) {
        calls += CancelAll(n, out);
        err = ETIME;
        break;
      }
    }
    return err;
  }

  // ---- lower level: requests that stay in flight between calls (multishot)

  int fd() const { return fd_; }
  unsigned setup_flags() const { return flags_; }

  // Makes the next n SQEs (filled through Sqe(0..n-1)) visible to the kernel.
  void Publish(unsigned n) { __atomic_store_n(sq_tail_, *sq_tail_ + n, __ATOMIC_RELEASE); }

  // io_uring_enter(submit, min_complete, flags), EINTR retried: what it
  // returned (SQEs consumed), or -errno.
  int Enter(unsigned submit, unsigned min_complete, unsigned flags) {
    int r;
    do r = SysEnter(fd_, submit, min_complete, flags, nullptr, 0);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
  }

  // Waits up to `ms` milliseconds for at least one CQE (running deferred task work).
  // 0, or -errno (-ETIME when none came).
  int WaitOneMs(long ms) {
    __kernel_timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.ts = reinterpret_cast<uint64_t>(&ts);
    int r;
    do r = SysEnter(fd_, 0, 1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
  }

  // With IORING_SETUP_TASKRUN_FLAG: the kernel has task work queued for the
  // owner (with DEFER_TASKRUN, completions waiting to be produced by an
  // io_uring_enter with GETEVENTS).
  bool TaskWorkPending() const { return (__atomic_load_n(sq_flags_, __ATOMIC_ACQUIRE) & IORING_SQ_TASKRUN) != 0; }

  // The oldest unconsumed CQE, or nullptr; Advance() consumes it.
  const io_uring_cqe* Peek() const {
    unsigned head = *cq_head_;
    if (head == __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE)) return nullptr;
    return &cqes_[head & cq_mask_];
  }
  void Advance() { __atomic_store_n(cq_head_, *cq_head_ + 1, __ATOMIC_RELEASE); }

  // IORING_(UN)REGISTER_PBUF_RING: a provided-buffer ring of `entries`
  // (a power of two) io_uring_buf at `ring` (page-aligned), group `bgid`.
  int RegisterBufRing(void* ring, unsigned entries, unsigned bgid) {
    io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = reinterpret_cast<uint64_t>(ring);
    reg.ring_entries = entries;
    reg.bgid = static_cast<uint16_t>(bgid);
    return SysRegister(fd_, IORING_REGISTER_PBUF_RING, &reg, 1) < 0 ? errno : 0;
  }
  int UnregisterBufRing(unsigned bgid) {
    io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.bgid = static_cast<uint16_t>(bgid);
    return SysRegister(fd_, IORING_UNREGISTER_PBUF_RING, &reg, 1) < 0 ? errno : 0;
  }

 private:
  int Fail(int err) {
    Destroy();
    return err;
  }

  void Reap(std::vector<io_uring_cqe>* out) {
    unsigned head = *cq_head_;
    unsigned tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
    while (head != tail) out->push_back(cqes_[head++ & cq_mask_]);
    __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
  }

  // Cancels everything in flight and reaps it; every wait is bounded (EXT_ARG
  // timeout, 10 ms, at most 100 of them: 1 s in all), so an op that never
  // completes cannot hang the caller (the vhost-user worker holds the regions
  // lock meanwhile).  Returns the io_uring_enter calls made.
  unsigned CancelAll(unsigned n, std::vector<io_uring_cqe>* out) {
    io_uring_sqe* s = Sqe(0);
    s->opcode = IORING_OP_ASYNC_CANCEL;
    s->fd = -1;
    s->cancel_flags = IORING_ASYNC_CANCEL_ANY;
    s->user_data = ~0ULL;
    __atomic_store_n(sq_tail_, *sq_tail_ + 1, __ATOMIC_RELEASE);
    SysEnter(fd_, 1, 0, IORING_ENTER_GETEVENTS, nullptr, 0);
    unsigned calls = 1;
    size_t want = n + 1;
    std::vector<io_uring_cqe> all(out->begin(), out->end());
    Reap(&all);
    for (int spins = 0; all.size() < want && spins < 100; spins++) {
      __kernel_timespec ts = {0, 10 * 1000 * 1000};
      io_uring_getevents_arg arg;
      memset(&arg, 0, sizeof arg);
      arg.ts = reinterpret_cast<uint64_t>(&ts);
      SysEnter(fd_, 0, 1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
      calls++;
      Reap(&all);
    }
    out->clear();
    for (const auto& c : all)
      if (c.user_data != ~0ULL) out->push_back(c);
    return calls;
  }

  int fd_ = -1;
  unsigned flags_ = 0;
  unsigned entries_ = 0;
  unsigned* sq_tail_ = nullptr;
  unsigned* sq_flags_ = nullptr;
  unsigned sq_mask_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  unsigned* cq_head_ = nullptr;
  unsigned* cq_tail_ = nullptr;
  unsigned cq_mask_ = 0;
  io_uring_cqe* cqes_ = nullptr;
  void* sq_map_ = MAP_FAILED;
  void* cq_map_ = MAP_FAILED;
  void* sqe_map_ = MAP_FAILED;
  size_t sq_len_ = 0, cq_len_ = 0, sqe_len_ = 0;
  bool registered_ = false;
};

// What the running kernel's io_uring offers (for lib/ to decide; nothing
// here decides).  setup_errno: io_uring_setup of a small ring without flags
// (ENOSYS: no io_uring or seccomp; EPERM: kernel.io_uring_disabled or an
// LSM; EMFILE/ENOMEM: transient).  The rest only when it worked.
struct UringCaps {
  int setup_errno = 0;
  bool defer_taskrun = false;  // SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG accepted
  int defer_errno = -1;        // that setup's errno (0: accepted; -1: not tried)
  bool ext_arg = false;        // IORING_FEAT_EXT_ARG (5.11+): Ring's bounded waits need it
  int probe_errno = -1;        // IORING_REGISTER_PROBE (-1: not tried)
  unsigned last_op = 0;        // opcodes below this are known to the kernel
  bool op_read = false, op_write = false, op_writev = false, op_read_multishot = false;
  int pbuf_ring_errno = -1;    // IORING_REGISTER_PBUF_RING of a one-entry ring
};

inline UringCaps ProbeUring() {
  UringCaps caps;
  io_uring_params p;
  memset(&p, 0, sizeof p);
  p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  int fd = SysSetup(4, &p);
  caps.defer_errno = fd >= 0 ? 0 : errno;
  if (fd >= 0) {
    caps.defer_taskrun = true;
  } else {
    memset(&p, 0, sizeof p);
    fd = SysSetup(4, &p);
    if (fd < 0) {
      caps.setup_errno = errno;
      return caps;
    }
  }
  caps.ext_arg = (p.features & IORING_FEAT_EXT_ARG) != 0;
  constexpr unsigned kOps = 256;
  std::vector<char> buf(sizeof(io_uring_probe) + kOps * sizeof(io_uring_probe_op), 0);
  auto* probe = reinterpret_cast<io_uring_probe*>(buf.data());
  if (SysRegister(fd, IORING_REGISTER_PROBE, probe, kOps) < 0) {
    caps.probe_errno = errno;
  } else {
    caps.probe_errno = 0;
    caps.last_op = probe->last_op;
    auto has = [&](unsigned op) { return op < probe->ops_len && (probe->ops[op].flags & IO_URING_OP_SUPPORTED) != 0; };
    caps.op_read = has(IORING_OP_READ);
    caps.op_write = has(IORING_OP_WRITE);
    caps.op_writev = has(IORING_OP_WRITEV);
    caps.op_read_multishot = has(kOpReadMultishot);
  }
  long page = sysconf(_SC_PAGESIZE);
  void* ring = mmap(nullptr, static_cast<size_t>(page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ring == MAP_FAILED) {
    caps.pbuf_ring_errno = errno;
  } else {
    io_uring_buf_reg reg;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = reinterpret_cast<uint64_t>(ring);
    reg.ring_entries = 1;
    caps.pbuf_ring_errno = SysRegister(fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0 ? errno : 0;
    if (caps.pbuf_ring_errno == 0) SysRegister(fd, IORING_UNREGISTER_PBUF_RING, &reg, 1);
    munmap(ring, static_cast<size_t>(page));
  }
  close(fd);
  return caps;
}

}  // namespace mqtap
