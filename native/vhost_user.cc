// The vhost-user data plane (lib/vhost-user/dataplane.ts holds the typed
// wrapper, lib/vhost-user/dataplane-api.ts the contract, docs/vhost-user-dataplane.md
// the design).
//
// QEMU (the "frontend") shares the guest's memory (memfd regions) and split
// virtqueues with us; each queue pair i (virtqueue 2i = RX, 2i+1 = TX) is
// bridged to one tap queue fd.  Like the kernel's vhost worker, each pair has
// one thread: it sleeps in epoll_wait on the TX and RX kick eventfds, the tap
// fd and a control eventfd, and moves frames:
//
//   TX  guest -> tap: each avail chain's readable descriptors are one frame
//       (starting with the virtio-net header, which IS the tap's vnet header),
//       written straight from guest memory: a batch of up to 256 chains is
//       walked first, then written with one io_uring_enter of WRITEV SQEs
//       (or one writev(2) each), then returned to the used ring.
//   RX  tap -> guest: up to 64 frames are read into per-pair slots with one
//       io_uring_enter of READ SQEs (or read(2) until EAGAIN), then each is
//       copied into one device-writable chain (or, with MRG_RXBUF, several,
//       num_buffers set in the header).  With no guest buffer the tap is not
//       read: frames wait in the kernel until the RX kick.
//
// The io_uring (native/uring.h, a batching syscall: RWF_NOWAIT ops complete
// inline, nothing is in flight between calls) is per pair, created and used
// on its worker only; where it cannot be set up the worker uses writev/read
// and reports it (counters: tapEngine, tapEngineErrno); lib/ decides whether
// that is an error.
//
// No policy: rings start and stop when JavaScript says so (synchronously:
// the control eventfd hands the worker a function and waits until it ran).
// A ring stops on its own only when the guest's ring is malformed; then its
// state is 'failed' with a reason, its err eventfd and the plane's notify
// eventfd are signalled, and the rest goes on.
//
// Guest memory is untrusted: every address is translated with bounds checks
// (a range must lie in the mapped regions; it is split at region borders),
// every descriptor is copied once before use, chains are counted (a loop or a
// chain longer than the ring fails the ring), indices are checked against
// the ring size.  The regions table is guarded by a writer-preferring
// read/write lock: workers
// hold it shared while they touch guest memory, removeRegion takes it
// exclusively before munmap.
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "uring.h"

// From <linux/virtio_ring.h>, through native/vhost_user_consts.c.
extern "C" {
extern const uint16_t mqtap_vring_desc_f_next, mqtap_vring_desc_f_write, mqtap_vring_desc_f_indirect;
extern const uint16_t mqtap_vring_used_f_no_notify, mqtap_vring_avail_f_no_interrupt;
}

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio 1.x rings are little-endian; this data plane reads them natively");

namespace mqtap {
namespace {

constexpr uint32_t kMaxQueueSize = 32768;
constexpr uint32_t kMaxPairs = 256;
constexpr int kBudget = 256;              // frames per ring per wake-up before looking at other events
constexpr size_t kBounce = 65536 + 4096;  // one RX slot: largest tap frame (GSO) + vnet header, page-rounded
constexpr unsigned kRxSlots = 64;          // RX frames read per io_uring_enter at most (one slot each)
constexpr unsigned kUringEntries = 256;    // >= kBudget: a TX batch is one io_uring_enter
constexpr size_t kIovMax = 1024;          // IOV_MAX
constexpr int kTapRetryMs = 100;           // a broken tap fd (device deleted) is looked at again this often
constexpr int kSlotsIdleMs = 1000;         // slots that held frames over a page are given back after this long idle
constexpr size_t kPage = 4096;
constexpr uint32_t kMaxIndirect = 65536;  // entries of one indirect table (as the kernel's vhost: USHRT_MAX + 1)

// A read/write lock that prefers writers: workers take it shared around each
// batch, back to back, so a reader-preferring lock (glibc's default, and
// std::shared_mutex) could starve removeRegion.  Meets SharedLockable.
class RwLock {
 public:
  RwLock() {
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&l_, &a);
    pthread_rwlockattr_destroy(&a);
  }
  ~RwLock() { pthread_rwlock_destroy(&l_); }
  RwLock(const RwLock&) = delete;
  RwLock& operator=(const RwLock&) = delete;
  void lock() { pthread_rwlock_wrlock(&l_); }
  void unlock() { pthread_rwlock_unlock(&l_); }
  void lock_shared() { pthread_rwlock_rdlock(&l_); }
  void unlock_shared() { pthread_rwlock_unlock(&l_); }

 private:
  pthread_rwlock_t l_;
};

template <typename L>
class SharedLock {  // std::shared_lock needs <shared_mutex>; this is all we use of it
 public:
  explicit SharedLock(L& l) : l_(l) { l_.lock_shared(); }
  ~SharedLock() { l_.unlock_shared(); }
  SharedLock(const SharedLock&) = delete;
  SharedLock& operator=(const SharedLock&) = delete;

 private:
  L& l_;
};

enum RingState : int { STOPPED = 0, RUNNING = 1, FAILED = 2 };
enum Tag : uint32_t { TAG_CTL = 0, TAG_TX_KICK = 1, TAG_RX_KICK = 2, TAG_TAP = 3 };

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(Desc) == 16, "vring_desc layout");

struct Region {
  uint64_t gpa, size, ua;
  uint8_t* host;   // host address of gpa
  void* mapBase;   // what mmap returned
  size_t mapLen;
};

struct Features {
  bool eventIdx = false, mrg = false, indirect = false;
  uint32_t hdr = 12;
};

struct VRing {
  // Set by startRing before the worker sees the ring; constant while running.
  uint32_t num = 0;
  Desc* desc = nullptr;
  uint16_t* avail = nullptr;  // flags, idx, ring[num], used_event
  uint16_t* used = nullptr;   // flags, idx, then {u32 id, u32 len}[num], avail_event
  uint64_t descUa = 0, availUa = 0, usedUa = 0;
  int kick = -1, call = -1, err = -1;
  Features f;
  // Worker-owned while running.
  uint16_t lastAvail = 0, usedIdx = 0, signalledUsed = 0;
  bool signalledValid = false;
  bool more = false;  // work may be left (budget ran out)
  // Read by JavaScript.
  std::atomic<int> state{STOPPED};
  std::atomic<uint32_t> lastAvailPub{0};
  std::string reason;  // under Pair::mu

  uint16_t* UsedFlags() { return used; }
  uint16_t* UsedIdx() { return used + 1; }
  uint32_t* UsedElem(uint32_t slot) { return reinterpret_cast<uint32_t*>(used + 2) + 2 * slot; }
  uint16_t* AvailEvent() { return reinterpret_cast<uint16_t*>(reinterpret_cast<uint8_t*>(used) + 4 + 8 * num); }
  uint16_t* UsedEvent() { return avail + 2 + num; }
};

struct Counters {
  std::atomic<uint64_t> txFrames{0}, txBytes{0}, txDropped{0}, rxFrames{0}, rxBytes{0}, rxDropped{0}, kicks{0}, calls{0};
  // Tap syscalls (writev / read / io_uring_enter) and epoll wake-ups of the worker.
  std::atomic<uint64_t> txSyscalls{0}, rxSyscalls{0}, wakeups{0};
};

// How a pair's worker does its tap I/O.  The caller (lib/) chooses WANT_*;
// the worker reports what it does (ENGINE_*) and, when it could not set up
// its io_uring, the errno why.
enum TapWant : int { WANT_URING = 0, WANT_WRITEV = 1 };
enum TapEngine : int { ENGINE_NONE = 0, ENGINE_URING = 1, ENGINE_WRITEV = 2 };

inline void Add(std::atomic<uint64_t>& c, uint64_t n = 1) { c.fetch_add(n, std::memory_order_relaxed); }

inline uint16_t LoadAcquire(uint16_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline uint16_t LoadRelaxed(uint16_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline void StoreRelease(uint16_t* p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline void StoreRelaxed(uint16_t* p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

// One copy of a descriptor the guest may be rewriting under us.
inline Desc ReadDesc(const Desc* d) {
  Desc out;
  out.addr = __atomic_load_n(&d->addr, __ATOMIC_RELAXED);
  out.len = __atomic_load_n(&d->len, __ATOMIC_RELAXED);
  out.flags = __atomic_load_n(&d->flags, __ATOMIC_RELAXED);
  out.next = __atomic_load_n(&d->next, __ATOMIC_RELAXED);
  return out;
}

void Signal(int fd) {
  if (fd < 0) return;
  uint64_t one = 1;
  NoEintr([&] { return write(fd, &one, sizeof one); });
}

void Drain(int fd) {
  uint64_t v;
  NoEintr([&] { return read(fd, &v, sizeof v); });
}

class DataPlane;

struct Pair {
  DataPlane* dp = nullptr;
  uint32_t index = 0;
  std::thread th;
  int ep = -1, ctl = -1;
  std::mutex mu;
  std::condition_variable cv;
  std::function<void()> cmd;
  bool cmdPending = false, cmdDone = false;
  bool quit = false;  // worker-owned
  VRing rings[2];      // 0 rx, 1 tx
  int tap = -1;       // worker-owned while the thread runs
  bool tapArmed = false;  // watched for EPOLLIN (implies tapInEp)
  bool tapInEp = false;   // registered in ep
  bool tapErr = false;    // taken out of ep after EPOLLERR/EPOLLHUP or a read error; retried every kTapRetryMs
  // RX: frames read from the tap, kRxSlots slots of kBounce bytes (anonymous
  // mmap: untouched slot tails cost nothing).  rxq[rxHead..] are waiting for
  // guest buffers, in order: (slot, length) pairs.
  uint8_t* slots = nullptr;
  std::vector<std::pair<uint32_t, uint32_t>> rxq;
  size_t rxHead = 0;
  unsigned rxWant = 8;  // adaptive read depth (io_uring)
  // A frame over a page was read since the slots were last given back
  // (MADV_DONTNEED after kSlotsIdleMs idle): GSO or jumbo frames fault in up
  // to 64 x 68 KiB, which an idle pair should not keep.
  bool slotsDirty = false;
  // Tap I/O engine.  The io_uring (tap fd registered as its file 0) is
  // created, used and destroyed on the worker only (SINGLE_ISSUER).
  int want = WANT_URING;
  std::unique_ptr<mqtap::Ring> uring;
  bool uringTried = false;              // worker-owned: set up once per tap fd
  std::atomic<int> engine{ENGINE_NONE};
  std::atomic<int> engineErrno{0};      // why not ENGINE_URING (0: asked for writev, or no tap)
  std::atomic<bool> engineBroke{false}; // engineErrno is io_uring_enter's (mid-run), not the setup's
  Counters c;

  bool Pending() const { return rxHead < rxq.size(); }
};

// On the worker: frames read from the tap but not yet placed (rxq[rxHead..])
// are dropped and counted.  Called when the RX ring stops or the tap changes,
// so frames of an old tap (or read with an old vnet header size) never reach
// a restarted ring.
void DropParked(Pair& p) {
  if (p.Pending()) p.c.rxDropped.fetch_add(p.rxq.size() - p.rxHead, std::memory_order_relaxed);
  p.rxq.clear();
  p.rxHead = 0;
}

// On the worker only (the ring is SINGLE_ISSUER): sets up the io_uring for
// the pair's current tap fd, once per fd, unless writev was asked for.  A
// ring that cannot be set up (io_uring disabled, old kernel, out of memory)
// leaves the pair on writev/read, with the errno reported to lib/.
void TapEngineSetup(Pair& p) {
  if (p.uringTried || p.tap < 0) return;
  p.uringTried = true;
  if (p.want == WANT_WRITEV) {
    p.engineErrno.store(0);
    p.engine.store(ENGINE_WRITEV);
    return;
  }
  std::unique_ptr<mqtap::Ring> r(new (std::nothrow) mqtap::Ring());
  int err = r ? r->Setup(kUringEntries, p.tap) : ENOMEM;
  if (err != 0) {
    p.engineErrno.store(err);
    p.engine.store(ENGINE_WRITEV);
    return;
  }
  p.uring = std::move(r);
  p.engineErrno.store(0);
  p.engineBroke.store(false);
  p.engine.store(ENGINE_URING);
}

// The tap fd changes or the worker ends: the ring lets go of the tap file.
void TapEngineDrop(Pair& p) {
  p.uring.reset();
  p.uringTried = false;
  p.engine.store(ENGINE_NONE);
  p.engineErrno.store(0);
  p.engineBroke.store(false);
}

// io_uring_enter itself failed mid-batch (never seen): the pair goes on with
// writev/read until its tap changes, and reports it (counters, and the
// plane's notify eventfd, signalled by the caller): lib/ decides whether
// that is an error.
void TapEngineBroken(Pair& p, int err) {
  p.uring.reset();
  p.engineErrno.store(err);
  p.engineBroke.store(true);
  p.engine.store(ENGINE_WRITEV);
}

class DataPlane : public Napi::ObjectWrap<DataPlane> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "VhostUserDataPlane",
                       {InstanceMethod<&DataPlane::AddRegion>("addRegion"), InstanceMethod<&DataPlane::RemoveRegion>("removeRegion"),
                        InstanceMethod<&DataPlane::SetTap>("setTap"), InstanceMethod<&DataPlane::StartRing>("startRing"),
                        InstanceMethod<&DataPlane::StopRing>("stopRing"), InstanceMethod<&DataPlane::RingStatus>("ringStatus"),
                        InstanceMethod<&DataPlane::GetCounters>("counters"), InstanceMethod<&DataPlane::Close>("close"),
                        InstanceAccessor<&DataPlane::GetNotifyFd>("notifyFd")});
  }

  explicit DataPlane(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DataPlane>(info) {
    Napi::Env env = info.Env();
    uint32_t n = ArgUint(info, 0);
    if (n < 1 || n > kMaxPairs) ThrowArg(env, "VhostUserDataPlane: pairs must be 1.." + std::to_string(kMaxPairs));
    int want = WANT_URING;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      std::string e = ArgString(info, 1);
      if (e == "writev") want = WANT_WRITEV;
      else if (e != "uring") ThrowArg(env, "VhostUserDataPlane: tap engine must be 'uring' or 'writev'");
    }
    notify_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (notify_ < 0) ThrowSys(env, "VHOST_USER_DATAPLANE", "eventfd", errno);
    for (uint32_t i = 0; i < n; i++) {
      pairs_.emplace_back(new Pair());
      pairs_.back()->dp = this;
      pairs_.back()->index = i;
      pairs_.back()->want = want;
    }
  }

  ~DataPlane() override { Shutdown(); }

  // Translates a QEMU-virtual range that must lie in one region.
  uint8_t* UaToHost(uint64_t ua, uint64_t len) {
    for (const Region& r : regions_) {
      if (ua >= r.ua && ua - r.ua <= r.size && len <= r.size - (ua - r.ua)) return r.host + (ua - r.ua);
    }
    return nullptr;
  }

  // Translates a guest-physical range into host segments appended to iov
  // (split at region borders).  False when any byte is outside the regions.
  bool GpaToIov(uint64_t gpa, uint64_t len, std::vector<iovec>& iov) {
    if (len > 0 && gpa + len < gpa) return false;
    while (len > 0) {
      const Region* hit = nullptr;
      for (const Region& r : regions_) {
        if (gpa >= r.gpa && gpa - r.gpa < r.size) {
          hit = &r;
          break;
        }
      }
      if (hit == nullptr) return false;
      uint64_t off = gpa - hit->gpa;
      uint64_t n = std::min<uint64_t>(len, hit->size - off);
      iov.push_back(iovec{hit->host + off, static_cast<size_t>(n)});
      gpa += n;
      len -= n;
    }
    return true;
  }

  // A contiguous guest-physical range (indirect tables): one region only.
  uint8_t* GpaToHost(uint64_t gpa, uint64_t len) {
    for (const Region& r : regions_) {
      if (gpa >= r.gpa && gpa - r.gpa <= r.size && len <= r.size - (gpa - r.gpa)) return r.host + (gpa - r.gpa);
    }
    return nullptr;
  }

  RwLock regionsMu_;

 private:
  std::vector<Region> regions_;
  std::vector<std::unique_ptr<Pair>> pairs_;
  int notify_ = -1;
  bool closed_ = false;

  friend void Worker(Pair* p);
  friend struct Engine;

  Pair& ArgPair(const Napi::CallbackInfo& info, size_t i) {
    uint32_t n = ArgUint(info, i);
    if (n >= pairs_.size()) ThrowArg(info.Env(), "pair " + std::to_string(n) + " out of range (0.." + std::to_string(pairs_.size() - 1) + ")");
    return *pairs_[n];
  }

  void Live(Napi::Env env, const char* op) {
    if (closed_) ThrowSys(env, op, "close", EBADF, "the data plane is closed");
  }

  static int ArgFdOrNone(const Napi::CallbackInfo& info, size_t i) {
    if (info.Length() > i && info[i].IsNumber() && info[i].As<Napi::Number>().Int32Value() == -1) return -1;
    return ArgFd(info, i);
  }

  // Runs fn on the pair's worker (or here when it has none) and waits.
  static void Exec(Pair& p, const std::function<void()>& fn) {
    if (!p.th.joinable()) {
      fn();
      return;
    }
    std::unique_lock<std::mutex> lk(p.mu);
    p.cmd = fn;
    p.cmdPending = true;
    p.cmdDone = false;
    Signal(p.ctl);
    p.cv.wait(lk, [&] { return p.cmdDone; });
  }

  void StartWorker(Napi::Env env, Pair& p);

  // addRegion(gpa, size, userAddr, mmapOffset, fd)
  Napi::Value AddRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const char* op = "VHOST_USER_ADD_MEM_REG";
    Live(env, op);
    uint64_t gpa = ArgU64(info, 0), size = ArgU64(info, 1), ua = ArgU64(info, 2), off = ArgU64(info, 3);
    int fd = ArgFd(info, 4);
    if (size == 0) ThrowSys(env, op, "mmap", EINVAL, "zero-size region");
    if (gpa + size < gpa || ua + size < ua || off + size < off) ThrowSys(env, op, "mmap", EINVAL, "region wraps around the address space");
    {
      SharedLock<RwLock> lk(regionsMu_);
      for (const Region& r : regions_) {
        if (gpa < r.gpa + r.size && r.gpa < gpa + size) ThrowSys(env, op, "mmap", EINVAL, "region overlaps another in guest-physical space");
        if (ua < r.ua + r.size && r.ua < ua + size) ThrowSys(env, op, "mmap", EINVAL, "region overlaps another in QEMU's address space");
      }
    }
    struct stat st;
    if (fstat(fd, &st) != 0) ThrowSys(env, op, "fstat", errno);
    if (st.st_size < 0 || off + size > static_cast<uint64_t>(st.st_size)) ThrowSys(env, op, "fstat", EINVAL, "region ends past the end of its fd");
    uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    uint64_t base = off & ~(page - 1);
    size_t len = static_cast<size_t>(size + (off - base));
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(base));
    if (m == MAP_FAILED) ThrowSys(env, op, "mmap", errno);
    std::unique_lock<RwLock> lk(regionsMu_);
    regions_.push_back(Region{gpa, size, ua, static_cast<uint8_t*>(m) + (off - base), m, len});
    return env.Undefined();
  }

  // removeRegion(gpa): refuses while a running ring's desc/avail/used is in it.
  Napi::Value RemoveRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const char* op = "VHOST_USER_REM_MEM_REG";
    Live(env, op);
    uint64_t gpa = ArgU64(info, 0);
    std::unique_lock<RwLock> lk(regionsMu_);
    size_t i = 0;
    while (i < regions_.size() && regions_[i].gpa != gpa) i++;
    if (i == regions_.size()) ThrowSys(env, op, "munmap", ENOENT, "no region starts at that guest-physical address");
    const Region& r = regions_[i];
    for (auto& p : pairs_) {
      for (VRing& g : p->rings) {
        if (g.state.load() != RUNNING) continue;
        uint64_t ends[3][2] = {{g.descUa, 16ull * g.num}, {g.availUa, 6ull + 2 * g.num}, {g.usedUa, 6ull + 8 * g.num}};
        for (auto& e : ends)
          if (e[0] < r.ua + r.size && r.ua < e[0] + e[1]) ThrowSys(env, op, "munmap", EBUSY, "a running ring lives in that region");
      }
    }
    munmap(r.mapBase, r.mapLen);
    regions_.erase(regions_.begin() + static_cast<long>(i));
    return env.Undefined();
  }

  // setTap(pair, fd | -1)
  Napi::Value SetTap(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Live(env, "VHOST_USER_SET_TAP");
    Pair& p = ArgPair(info, 0);
    int fd = ArgFdOrNone(info, 1);
    int err = 0;
    bool onWorker = p.th.joinable();
    Exec(p, [&] {
      if (p.tapInEp) epoll_ctl(p.ep, EPOLL_CTL_DEL, p.tap, nullptr);
      DropParked(p);
      TapEngineDrop(p);
      p.tap = -1;
      p.tapArmed = p.tapInEp = p.tapErr = false;
      if (fd >= 0 && p.ep >= 0) {
        epoll_event ev{};
        ev.data.u32 = TAG_TAP;
        ev.events = 0;
        if (epoll_ctl(p.ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
          err = errno;
          return;
        }
        p.tapInEp = true;
      }
      p.tap = fd;
      if (onWorker) TapEngineSetup(p);
      p.rings[0].more = p.rings[0].state.load() == RUNNING;
    });
    if (err != 0) ThrowSys(env, "VHOST_USER_SET_TAP", "epoll_ctl", err);
    return env.Undefined();
  }

  // startRing(pair, isTx, num, descUa, availUa, usedUa, base, kick, call, err, eventIdx, mrg, indirect, hdr)
  Napi::Value StartRing(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const char* op = "VHOST_USER_START_RING";
    Live(env, op);
    Pair& p = ArgPair(info, 0);
    bool tx = ArgBool(info, 1);
    uint32_t num = ArgUint(info, 2);
    uint64_t descUa = ArgU64(info, 3), availUa = ArgU64(info, 4), usedUa = ArgU64(info, 5);
    uint32_t base = ArgUint(info, 6);
    int kick = ArgFd(info, 7), call = ArgFdOrNone(info, 8), errFd = ArgFdOrNone(info, 9);
    Features f;
    f.eventIdx = ArgBool(info, 10);
    f.mrg = ArgBool(info, 11);
    f.indirect = ArgBool(info, 12);
    f.hdr = ArgUint(info, 13);
    if (num == 0 || num > kMaxQueueSize || (num & (num - 1)) != 0) ThrowSys(env, op, "vring", EINVAL, "ring size must be a power of two 1..32768");
    if (base > 0xffff) ThrowSys(env, op, "vring", EINVAL, "base must be 0..65535");
    if (f.hdr != 10 && f.hdr != 12) ThrowSys(env, op, "vring", EINVAL, "vnet header size must be 10 or 12");
    if (f.mrg && f.hdr != 12) ThrowSys(env, op, "vring", EINVAL, "MRG_RXBUF needs the 12-byte header");
    if ((descUa & 15) || (availUa & 1) || (usedUa & 3)) ThrowSys(env, op, "vring", EINVAL, "misaligned ring address (desc 16, avail 2, used 4)");
    VRing& g = p.rings[tx ? 1 : 0];
    VRing& other = p.rings[tx ? 0 : 1];
    if (g.state.load() == RUNNING) ThrowSys(env, op, "vring", EBUSY, "the ring is running: stop it first");
    if (other.state.load() == RUNNING && other.kick == kick) ThrowSys(env, op, "vring", EINVAL, "both rings of a pair cannot share a kick eventfd");
    if (kick == p.tap) ThrowSys(env, op, "vring", EINVAL, "the kick fd is the tap fd");
    {
      SharedLock<RwLock> lk(regionsMu_);
      uint8_t* d = UaToHost(descUa, 16ull * num);
      uint8_t* a = UaToHost(availUa, 6ull + 2 * num);
      uint8_t* u = UaToHost(usedUa, 6ull + 8 * num);
      if (d == nullptr || a == nullptr || u == nullptr) ThrowSys(env, op, "vring", EFAULT, "a ring part is not inside one mapped region");
      g.desc = reinterpret_cast<Desc*>(d);
      g.avail = reinterpret_cast<uint16_t*>(a);
      g.used = reinterpret_cast<uint16_t*>(u);
    }
    if (!p.th.joinable()) StartWorker(env, p);
    g.num = num;
    g.descUa = descUa;
    g.availUa = availUa;
    g.usedUa = usedUa;
    g.kick = kick;
    g.call = call;
    g.err = errFd;
    g.f = f;
    g.lastAvail = static_cast<uint16_t>(base);
    g.lastAvailPub.store(base);
    g.signalledValid = false;
    int err = 0;
    Exec(p, [&] {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u32 = tx ? TAG_TX_KICK : TAG_RX_KICK;
      if (epoll_ctl(p.ep, EPOLL_CTL_ADD, kick, &ev) != 0) {
        err = errno;
        return;
      }
      {
        SharedLock<RwLock> lk(regionsMu_);
        g.usedIdx = LoadAcquire(g.UsedIdx());
      }
      {
        std::lock_guard<std::mutex> lk(p.mu);
        g.reason.clear();
      }
      g.more = true;  // a kick may have come before we watched it
      g.state.store(RUNNING);
      TapEngineSetup(p);
    });
    if (err != 0) ThrowSys(env, op, "epoll_ctl", err);
    return env.Undefined();
  }

  // stopRing(pair, isTx) -> status before stopping ('failed' keeps its reason); the ring is 'stopped' after.
  Napi::Value StopRing(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Live(env, "VHOST_USER_STOP_RING");
    Pair& p = ArgPair(info, 0);
    bool tx = ArgBool(info, 1);
    VRing& g = p.rings[tx ? 1 : 0];
    int before = STOPPED;
    std::string reason;
    Exec(p, [&] { before = StopHere(p, g, tx); });
    {
      std::lock_guard<std::mutex> lk(p.mu);
      reason = g.reason;
    }
    Napi::Object o = Napi::Object::New(env);
    o.Set("state", before == FAILED ? "failed" : "stopped");
    if (before == FAILED) o.Set("reason", reason);
    o.Set("lastAvailIdx", Napi::Number::New(env, g.lastAvailPub.load()));
    return o;
  }

  // On the worker: forget the ring.  Returns the state it had.
  static int StopHere(Pair& p, VRing& g, bool tx) {
    int before = g.state.load();
    if (before == RUNNING && p.ep >= 0) epoll_ctl(p.ep, EPOLL_CTL_DEL, g.kick, nullptr);
    if (!tx && p.tapArmed) {
      epoll_event ev{};
      ev.data.u32 = TAG_TAP;
      epoll_ctl(p.ep, EPOLL_CTL_MOD, p.tap, &ev);
      p.tapArmed = false;
    }
    if (!tx) DropParked(p);
    g.lastAvailPub.store(g.lastAvail);
    g.state.store(STOPPED);
    g.more = false;
    return before;
  }

  Napi::Value RingStatus(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Pair& p = ArgPair(info, 0);
    bool tx = ArgBool(info, 1);
    VRing& g = p.rings[tx ? 1 : 0];
    int state = g.state.load();
    Napi::Object o = Napi::Object::New(env);
    o.Set("state", state == RUNNING ? "running" : state == FAILED ? "failed" : "stopped");
    if (state == FAILED) {
      std::lock_guard<std::mutex> lk(p.mu);
      o.Set("reason", g.reason);
    }
    o.Set("lastAvailIdx", Napi::Number::New(env, g.lastAvailPub.load()));
    return o;
  }

  Napi::Value GetCounters(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Pair& p = ArgPair(info, 0);
    Napi::Object o = Napi::Object::New(env);
    auto set = [&](const char* k, std::atomic<uint64_t>& v) { o.Set(k, Napi::BigInt::New(env, v.load(std::memory_order_relaxed))); };
    set("txFrames", p.c.txFrames);
    set("txBytes", p.c.txBytes);
    set("txDropped", p.c.txDropped);
    set("rxFrames", p.c.rxFrames);
    set("rxBytes", p.c.rxBytes);
    set("rxDropped", p.c.rxDropped);
    set("kicks", p.c.kicks);
    set("calls", p.c.calls);
    set("txSyscalls", p.c.txSyscalls);
    set("rxSyscalls", p.c.rxSyscalls);
    set("wakeups", p.c.wakeups);
    int eng = p.engine.load();
    o.Set("tapEngine", eng == ENGINE_URING ? "uring" : eng == ENGINE_WRITEV ? "writev" : "none");
    int eno = p.engineErrno.load();
    o.Set("tapEngineErrno", Napi::Number::New(env, eno));
    // The syscall tapEngineErrno is from: io_uring_setup stands for the whole setup (setup, mmap, register).
    o.Set("tapEngineSyscall", eno == 0 ? "" : p.engineBroke.load() ? "io_uring_enter" : "io_uring_setup");
    return o;
  }

  Napi::Value GetNotifyFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), notify_); }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  // Stops every worker (joins it), unmaps every region, closes our fds.
  void Shutdown() {
    if (closed_) return;
    closed_ = true;
    for (auto& pp : pairs_) {
      Pair& p = *pp;
      if (p.th.joinable()) {
        Exec(p, [&] {
          StopHere(p, p.rings[0], false);
          StopHere(p, p.rings[1], true);
          p.quit = true;
        });
        p.th.join();
      }
      if (p.ep >= 0) close(p.ep);
      if (p.ctl >= 0) close(p.ctl);
      p.ep = p.ctl = -1;
      p.tap = -1;
      if (p.slots != nullptr) munmap(p.slots, static_cast<size_t>(kRxSlots) * kBounce);
      p.slots = nullptr;
      p.rxq.clear();
      p.rxHead = 0;
    }
    std::unique_lock<RwLock> lk(regionsMu_);
    for (const Region& r : regions_) munmap(r.mapBase, r.mapLen);
    regions_.clear();
    if (notify_ >= 0) close(notify_);
    notify_ = -1;
  }


 public:
  int notifyFd() const { return notify_; }
};

// ---- the worker ---------------------------------------------------------

struct Engine {
  // One TX batch: chains walked (their segments copied into txIov), then
  // written, then returned to the guest, in order.
  struct TxItem {
    uint16_t head;
    uint32_t off, cnt;  // segments txIov[off, off+cnt)
    uint64_t total;
    bool ok;            // writable at all (a tap, a whole header, <= IOV_MAX segments)
  };

  Engine(Pair& pp, DataPlane& d) : p(pp), dp(d) {}

  Pair& p;
  DataPlane& dp;
  std::vector<iovec> iov;
  std::vector<uint32_t> staged;  // RX: (head, len) pairs
  std::vector<iovec> firstIov;   // RX: the first chain's segments (num_buffers goes there)
  std::vector<iovec> txIov;      // TX: the segments of every frame of a batch
  std::vector<TxItem> txb;       // TX: the batch
  std::vector<io_uring_cqe> cqes;
  std::vector<int> res;          // per-frame results of a batch (bytes or -errno)

  // Marks the ring failed; the worker lets go of it at once.
  void Fail(VRing& g, bool tx, const std::string& why) {
    {
      std::lock_guard<std::mutex> lk(p.mu);
      g.reason = why;
    }
    epoll_ctl(p.ep, EPOLL_CTL_DEL, g.kick, nullptr);
    if (!tx && p.tapArmed) Arm(false);
    g.lastAvailPub.store(g.lastAvail);
    g.more = false;
    g.state.store(FAILED);
    Signal(g.err);
    Signal(dp.notifyFd());
  }

  void Arm(bool on) {
    if (p.tap < 0 || !p.tapInEp || p.tapArmed == on) return;
    epoll_event ev{};
    ev.events = on ? static_cast<uint32_t>(EPOLLIN) : 0u;
    ev.data.u32 = TAG_TAP;
    epoll_ctl(p.ep, EPOLL_CTL_MOD, p.tap, &ev);
    p.tapArmed = on;
  }

  // The tap fd reports an error for good (its device was deleted) or fails
  // reads: stop watching it (level-triggered EPOLLERR would spin the worker);
  // the loop adds it back every kTapRetryMs and on an RX kick.
  void TapBroken() {
    if (p.tapInEp) epoll_ctl(p.ep, EPOLL_CTL_DEL, p.tap, nullptr);
    p.tapInEp = p.tapArmed = false;
    p.tapErr = true;
  }

  void TapRetry() {
    epoll_event ev{};
    ev.data.u32 = TAG_TAP;
    if (epoll_ctl(p.ep, EPOLL_CTL_ADD, p.tap, &ev) != 0) return;
    p.tapInEp = true;
    p.tapErr = false;
    p.rings[0].more = p.rings[0].state.load() == RUNNING;
  }

  // Walks one chain from head: its segments (all device-readable for TX,
  // all device-writable for RX) go to iov, their total to `total`.  Empty
  // string: fine; else why the ring is malformed.
  std::string Walk(VRing& g, uint16_t head, bool wantWrite, std::vector<iovec>& out, uint64_t& total) {
    out.clear();
    total = 0;
    if (head >= g.num) return "head index " + std::to_string(head) + " >= ring size " + std::to_string(g.num);
    uint32_t idx = head, seen = 0;
    auto seg = [&](const Desc& d) -> std::string {
      bool w = (d.flags & mqtap_vring_desc_f_write) != 0;
      if (w != wantWrite) return wantWrite ? "device-readable descriptor in an RX chain" : "device-writable descriptor in a TX chain";
      if (!dp.GpaToIov(d.addr, d.len, out)) return "descriptor [0x" + Hex(d.addr) + ", +" + std::to_string(d.len) + ") is outside guest memory";
      total += d.len;
      return std::string();
    };
    for (;;) {
      if (idx >= g.num) return "next index " + std::to_string(idx) + " >= ring size " + std::to_string(g.num);
      if (++seen > g.num) return "descriptor chain loops or is longer than the ring (" + std::to_string(g.num) + ")";
      Desc d = ReadDesc(&g.desc[idx]);
      if (d.flags & mqtap_vring_desc_f_indirect) {
        if (!g.f.indirect) return "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC";
        if (d.len == 0 || d.len % sizeof(Desc) != 0) return "indirect table length " + std::to_string(d.len) + " is not a multiple of 16";
        const Desc* t = reinterpret_cast<const Desc*>(dp.GpaToHost(d.addr, d.len));
        if (t == nullptr) return "indirect table [0x" + Hex(d.addr) + ", +" + std::to_string(d.len) + ") is outside guest memory";
        uint32_t n = d.len / sizeof(Desc), j = 0, cnt = 0;
        if (n > kMaxIndirect) return "indirect table too long (" + std::to_string(n) + " entries, at most " + std::to_string(kMaxIndirect) + ")";
        for (;;) {
          if (++cnt > n) return "indirect chain loops or is longer than its table (" + std::to_string(n) + ")";
          Desc e = ReadDesc(&t[j]);
          if (e.flags & mqtap_vring_desc_f_indirect) return "nested indirect descriptor";
          std::string why = seg(e);
          if (!why.empty()) return why;
          if (!(e.flags & mqtap_vring_desc_f_next)) break;
          j = e.next;
          if (j >= n) return "indirect next index " + std::to_string(j) + " >= table size " + std::to_string(n);
        }
      } else {
        std::string why = seg(d);
        if (!why.empty()) return why;
      }
      if (!(d.flags & mqtap_vring_desc_f_next)) break;
      idx = d.next;
    }
    return std::string();
  }

  static std::string Hex(uint64_t v) {
    char b[24];
    snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(v));
    return b;
  }

  // Avail entries waiting (checked against the ring size).  -1: the guest moved idx too far.
  int Waiting(VRing& g, uint16_t& aidx) {
    aidx = LoadAcquire(g.avail + 1);
    uint16_t n = static_cast<uint16_t>(aidx - g.lastAvail);
    if (n > g.num) return -1;
    return n;
  }

  void NotifyOff(VRing& g) {
    if (!g.f.eventIdx) StoreRelaxed(g.UsedFlags(), static_cast<uint16_t>(LoadRelaxed(g.UsedFlags()) | mqtap_vring_used_f_no_notify));
  }

  // Asks for a kick when the guest adds past `aidx`, then looks again (no lost wake-up).
  // True when there is work after all.
  bool NotifyOnAndRecheck(VRing& g, uint16_t aidx) {
    if (g.f.eventIdx) StoreRelaxed(g.AvailEvent(), aidx);
    else StoreRelaxed(g.UsedFlags(), static_cast<uint16_t>(LoadRelaxed(g.UsedFlags()) & ~mqtap_vring_used_f_no_notify));
    std::atomic_thread_fence(std::memory_order_seq_cst);
    uint16_t now = LoadAcquire(g.avail + 1);
    if (now != aidx) {
      NotifyOff(g);
      return true;
    }
    return false;
  }

  void PutUsed(VRing& g, uint32_t head, uint32_t len) {
    uint32_t* e = g.UsedElem(g.usedIdx & (g.num - 1));
    __atomic_store_n(e, head, __ATOMIC_RELAXED);
    __atomic_store_n(e + 1, len, __ATOMIC_RELAXED);
    g.usedIdx++;
  }

  // Publishes the used index and signals the call eventfd if the guest wants it.
  void Publish(VRing& g) {
    StoreRelease(g.UsedIdx(), g.usedIdx);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    bool need;
    if (g.f.eventIdx) {
      uint16_t ev = LoadRelaxed(g.UsedEvent());
      uint16_t old = g.signalledUsed, nw = g.usedIdx;
      need = !g.signalledValid || static_cast<uint16_t>(nw - ev - 1) < static_cast<uint16_t>(nw - old);
    } else {
      need = (LoadRelaxed(g.avail) & mqtap_vring_avail_f_no_interrupt) == 0;
    }
    g.signalledUsed = g.usedIdx;
    g.signalledValid = true;
    if (need && g.call >= 0) {
      Signal(g.call);
      Add(p.c.calls);
    }
  }

  void Tx() {
    VRing& g = p.rings[1];
    g.more = false;
    uint16_t start = g.usedIdx;
    NotifyOff(g);
    for (int done = 0;;) {
      if (done >= kBudget) {
        g.more = true;
        break;
      }
      uint16_t aidx;
      int n = Waiting(g, aidx);
      if (n < 0) {
        if (g.usedIdx != start) Publish(g);  // the chains already written go back first
        return Fail(g, true, "avail idx jumped by more than the ring size (" + std::to_string(static_cast<uint16_t>(aidx - g.lastAvail)) + " > " + std::to_string(g.num) + ")");
      }
      if (n == 0) {
        if (NotifyOnAndRecheck(g, aidx)) continue;
        break;
      }
      txb.clear();
      txIov.clear();
      std::string why;
      for (; n > 0 && done < kBudget; n--, done++) {
        uint16_t head = LoadRelaxed(g.avail + 2 + (g.lastAvail & (g.num - 1)));
        uint64_t total = 0;
        why = Walk(g, head, false, iov, total);
        if (!why.empty()) break;
        bool ok = p.tap >= 0 && total >= g.f.hdr && iov.size() <= kIovMax;
        txb.push_back(TxItem{head, static_cast<uint32_t>(txIov.size()), ok ? static_cast<uint32_t>(iov.size()) : 0u, total, ok});
        if (ok) txIov.insert(txIov.end(), iov.begin(), iov.end());
        g.lastAvail++;
      }
      WriteBatch(g);  // the chains walked before a malformed one still go out
      g.lastAvailPub.store(g.lastAvail);
      if (!why.empty()) {
        if (g.usedIdx != start) Publish(g);
        return Fail(g, true, why);
      }
    }
    g.lastAvailPub.store(g.lastAvail);
    if (g.usedIdx != start) Publish(g);
  }

  // Writes txb: with the io_uring, one WRITEV SQE per frame (RWF_NOWAIT: a
  // tap write completes inline), all submitted and reaped by one
  // io_uring_enter; else one writev(2) each.  Then counts and returns every
  // chain to the used ring (length 0), in order.
  void WriteBatch(VRing& g) {
    size_t k = txb.size();
    res.assign(k, -ECANCELED);  // a frame with no completion (io_uring_enter failed) is dropped
    if (p.uring) {
      unsigned m = 0;
      for (size_t j = 0; j < k; j++) {
        if (!txb[j].ok) continue;
        io_uring_sqe* s = p.uring->Sqe(m++);
        s->opcode = IORING_OP_WRITEV;
        s->flags = IOSQE_FIXED_FILE;
        s->fd = 0;
        s->addr = reinterpret_cast<uint64_t>(&txIov[txb[j].off]);
        s->len = txb[j].cnt;
        s->rw_flags = RWF_NOWAIT;
        s->user_data = j;
      }
      if (m > 0) {
        cqes.clear();
        unsigned enters = 0;
        int err = p.uring->SubmitAndWait(m, &cqes, &enters);
        Add(p.c.txSyscalls, enters);
        for (const io_uring_cqe& c : cqes)
          if (c.user_data < k) res[c.user_data] = c.res;
        if (err != 0) {
          TapEngineBroken(p, err);
          Signal(dp.notifyFd());
        }
      }
    } else {
      for (size_t j = 0; j < k; j++) {
        if (!txb[j].ok) continue;
        ssize_t w = NoEintr([&] { return writev(p.tap, &txIov[txb[j].off], static_cast<int>(txb[j].cnt)); });
        Add(p.c.txSyscalls);
        res[j] = w >= 0 ? 0 : -errno;
      }
    }
    for (size_t j = 0; j < k; j++) {
      if (txb[j].ok && res[j] >= 0) {
        Add(p.c.txFrames);
        Add(p.c.txBytes, txb[j].total - g.f.hdr);
      } else {
        Add(p.c.txDropped);
      }
      PutUsed(g, txb[j].head, 0);
    }
  }

  // Copies src[0, len) into the segments.
  static void Scatter(const std::vector<iovec>& v, const uint8_t* src, size_t len) {
    for (const iovec& s : v) {
      if (len == 0) break;
      size_t n = std::min(len, s.iov_len);
      memcpy(s.iov_base, src, n);
      src += n;
      len -= n;
    }
  }

  enum ReadState { READ_MORE = 0, READ_EMPTY = 1, READ_BROKEN = 2 };

  // Reads up to `n` frames (the guest has at least n chains) into the slots,
  // in the tap's order, into p.rxq.  With the io_uring: one READ SQE per
  // slot (RWF_NOWAIT: EAGAIN on the k-th means fewer frames were waiting),
  // one io_uring_enter; the depth adapts (about twice what the last call
  // found).  Else read(2) until EAGAIN.  READ_EMPTY: the tap ran dry;
  // READ_BROKEN: a read failed otherwise (e.g. EBADFD: the device is gone).
  int ReadBatch(VRing& g, unsigned n) {
    p.rxq.clear();
    p.rxHead = 0;
    unsigned want = std::min(n, kRxSlots);
    const bool ring = p.uring != nullptr;
    if (ring) want = std::min(want, p.rxWant);
    constexpr int kNoCompletion = INT_MIN;  // io_uring_enter failed before this slot's read completed
    res.assign(want, -EAGAIN);
    if (p.uring) {
      res.assign(want, kNoCompletion);
      for (unsigned i = 0; i < want; i++) {
        io_uring_sqe* s = p.uring->Sqe(i);
        s->opcode = IORING_OP_READ;
        s->flags = IOSQE_FIXED_FILE;
        s->fd = 0;
        s->addr = reinterpret_cast<uint64_t>(p.slots + static_cast<size_t>(i) * kBounce);
        s->len = static_cast<uint32_t>(kBounce);
        s->rw_flags = RWF_NOWAIT;
        s->user_data = i;
      }
      cqes.clear();
      unsigned enters = 0;
      int err = p.uring->SubmitAndWait(want, &cqes, &enters);
      Add(p.c.rxSyscalls, enters);
      for (const io_uring_cqe& c : cqes)
        if (c.user_data < want) res[c.user_data] = c.res;
      if (err != 0) {
          TapEngineBroken(p, err);
          Signal(dp.notifyFd());
        }
    } else {
      for (unsigned i = 0; i < want; i++) {
        ssize_t r = NoEintr([&] { return read(p.tap, p.slots + static_cast<size_t>(i) * kBounce, kBounce); });
        Add(p.c.rxSyscalls);
        if (r < 0) {
          res[i] = -errno;
          break;
        }
        res[i] = static_cast<int>(r);
      }
    }
    int st = READ_MORE;
    unsigned answered = 0;
    for (unsigned i = 0; i < want; i++) {
      int r = res[i];
      if (r == kNoCompletion) {  // its read may have taken a frame: count it as lost
        Add(p.c.rxDropped);
        st = std::max<int>(st, READ_EMPTY);
        continue;
      }
      if (r == -EAGAIN || r == -ECANCELED) {
        st = std::max<int>(st, READ_EMPTY);
        continue;
      }
      if (r < 0) {
        st = READ_BROKEN;
        continue;
      }
      answered++;
      if (static_cast<size_t>(r) > kPage) p.slotsDirty = true;
      // tun returns a frame's full length even when it copied only what fit:
      // a frame longer than its slot was truncated, never placed.
      if (static_cast<size_t>(r) < g.f.hdr || static_cast<size_t>(r) > kBounce) {
        Add(p.c.rxDropped);
        continue;
      }
      memset(p.slots + static_cast<size_t>(i) * kBounce + 10, 0, g.f.hdr - 10);  // the tap leaves num_buffers alone
      p.rxq.emplace_back(i, static_cast<uint32_t>(r));
    }
    if (ring) {
      if (answered >= want) p.rxWant = std::min(kRxSlots, std::max(p.rxWant, 2 * want));
      else p.rxWant = std::max(4u, std::min(kRxSlots, 2 * answered));
    }
    return st;
  }

  void Rx() {
    VRing& g = p.rings[0];
    g.more = false;
    if (p.tap < 0) return;
    uint16_t start = g.usedIdx;
    NotifyOff(g);
    bool dry = false;  // this call's last read found the tap empty (or broken): do not read again
    for (int done = 0;; done++) {
      if (done >= kBudget) {
        g.more = true;
        break;
      }
      uint16_t aidx;
      if (!p.Pending()) {
        if (dry) {
          Arm(true);  // level-triggered: wakes at once if a frame came in meanwhile
          break;
        }
        int n = Waiting(g, aidx);
        if (n < 0) return FailRx(g, start, aidx);
        if (n == 0) {
          if (NotifyOnAndRecheck(g, aidx)) continue;
          Arm(false);  // no guest buffer: leave frames in the kernel until the RX kick
          break;
        }
        int st = ReadBatch(g, static_cast<unsigned>(n));
        if (st == READ_BROKEN) TapBroken();
        if (st != READ_MORE) dry = true;
        if (!p.Pending()) {
          if (st == READ_BROKEN) break;
          continue;  // READ_EMPTY: Arm above; READ_MORE: only runts were read
        }
      }
      // Place the next pending frame: one chain, or several with MRG_RXBUF.
      uint8_t* frame = p.slots + static_cast<size_t>(p.rxq[p.rxHead].first) * kBounce;
      uint16_t first = g.lastAvail;
      size_t len = p.rxq[p.rxHead].second, off = 0;
      staged.clear();
      bool placed = false, wait = false, drop = false;
      while (!placed) {
        int n = Waiting(g, aidx);
        if (n < 0) return FailRx(g, start, aidx);
        if (n == 0) {
          g.lastAvail = first;  // nothing published: the chains go back
          if (NotifyOnAndRecheck(g, aidx)) continue;
          wait = true;
          break;
        }
        uint16_t head = LoadRelaxed(g.avail + 2 + (g.lastAvail & (g.num - 1)));
        uint64_t cap = 0;
        std::string why = Walk(g, head, true, iov, cap);
        if (!why.empty()) {
          g.lastAvail = first;
          if (g.usedIdx != start) Publish(g);
          return Fail(g, false, why);
        }
        g.lastAvail++;
        if (!g.f.mrg) {
          if (cap < len) {  // does not fit one chain: drop the frame, keep the chain
            g.lastAvail = first;
            drop = true;
            break;
          }
          if (g.f.hdr == 12) frame[10] = 1;  // VERSION_1 without MRG_RXBUF: num_buffers is 1
          Scatter(iov, frame, len);
          staged.push_back(head);
          staged.push_back(static_cast<uint32_t>(len));
          placed = true;
        } else {
          if (staged.empty()) firstIov = iov;
          size_t n2 = static_cast<size_t>(std::min<uint64_t>(cap, len - off));
          Scatter(iov, frame + off, n2);
          off += n2;
          staged.push_back(head);
          staged.push_back(static_cast<uint32_t>(n2));
          if (off == len) {
            uint16_t nb = static_cast<uint16_t>(staged.size() / 2);
            WriteAt(firstIov, 10, &nb, 2);
            placed = true;
          } else if (staged.size() / 2 >= g.num) {  // needs more chains than the ring has: would wait forever
            g.lastAvail = first;
            drop = true;
            break;
          }
        }
      }
      if (wait) {
        Arm(false);  // the frames read stay in their slots until the RX kick
        break;
      }
      p.rxHead++;
      if (drop) {
        Add(p.c.rxDropped);
        continue;
      }
      for (size_t i = 0; i < staged.size(); i += 2) PutUsed(g, staged[i], staged[i + 1]);
      Add(p.c.rxFrames);
      Add(p.c.rxBytes, len - g.f.hdr);
      g.lastAvailPub.store(g.lastAvail);
    }
    g.lastAvailPub.store(g.lastAvail);
    if (g.usedIdx != start) Publish(g);
  }

  void FailRx(VRing& g, uint16_t start, uint16_t aidx) {
    if (g.usedIdx != start) Publish(g);
    Fail(g, false, "avail idx jumped by more than the ring size (" + std::to_string(static_cast<uint16_t>(aidx - g.lastAvail)) + " > " + std::to_string(g.num) + ")");
  }

  // Writes `n` bytes at byte offset `at` of a chain's segments (ignored past its end).
  static void WriteAt(const std::vector<iovec>& v, size_t at, const void* src, size_t n) {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    for (const iovec& seg : v) {
      if (n == 0) return;
      if (at >= seg.iov_len) {
        at -= seg.iov_len;
        continue;
      }
      size_t k = std::min(n, seg.iov_len - at);
      memcpy(static_cast<uint8_t*>(seg.iov_base) + at, s, k);
      s += k;
      n -= k;
      at = 0;
    }
  }
};

void Worker(Pair* pp) {
  Pair& p = *pp;
  Engine e{p, *p.dp};
  epoll_event evs[8];
  while (!p.quit) {
    VRing& rx = p.rings[0];
    VRing& tx = p.rings[1];
    bool more = (rx.more && rx.state.load() == RUNNING) || (tx.more && tx.state.load() == RUNNING);
    bool retry = p.tapErr && p.tap >= 0;
    bool release = p.slotsDirty && !p.Pending();
    int n = epoll_wait(p.ep, evs, 8, more ? 0 : retry ? kTapRetryMs : release ? kSlotsIdleMs : -1);
    const bool timedOut = n == 0;
    if (n < 0) n = 0;  // EINTR; the worker never leaves on its own (Exec waits for it)
    if (timedOut && !more && release) {
      // Idle: the slots' pages go back to the kernel (they read as zeros
      // and fault in again on the next frames; nothing is parked in them).
      madvise(p.slots, static_cast<size_t>(kRxSlots) * kBounce, MADV_DONTNEED);
      p.slotsDirty = false;
    }
    for (int i = 0; i < n; i++) {
      if (evs[i].data.u32 != TAG_CTL) {  // a command from JavaScript is not a data wake-up
        Add(p.c.wakeups);
        break;
      }
    }
    bool rxKick = false;
    for (int i = 0; i < n; i++) {
      switch (evs[i].data.u32) {
        case TAG_CTL: {
          Drain(p.ctl);
          std::function<void()> fn;
          {
            std::lock_guard<std::mutex> lk(p.mu);
            if (p.cmdPending) fn = std::move(p.cmd);
            p.cmdPending = false;
          }
          if (fn) {
            fn();
            std::lock_guard<std::mutex> lk(p.mu);
            p.cmdDone = true;
            p.cv.notify_all();
          }
          break;
        }
        case TAG_TX_KICK:
          if (tx.state.load() == RUNNING) {
            Drain(tx.kick);
            Add(p.c.kicks);
            tx.more = true;
          }
          break;
        case TAG_RX_KICK:
          if (rx.state.load() == RUNNING) {
            Drain(rx.kick);
            Add(p.c.kicks);
            rx.more = true;
            rxKick = true;
            e.Arm(true);
          }
          break;
        case TAG_TAP:
          if (evs[i].events & (EPOLLERR | EPOLLHUP)) e.TapBroken();
          else rx.more = true;
          break;
      }
    }
    if (p.quit) break;
    if (retry && p.tapErr && (n == 0 || rxKick)) e.TapRetry();
    SharedLock<RwLock> lk(p.dp->regionsMu_);
    if (tx.state.load() == RUNNING && tx.more) e.Tx();
    if (rx.state.load() == RUNNING && rx.more) {
      if (p.tap >= 0 && !p.tapArmed && !p.Pending()) e.Arm(true);
      e.Rx();
    }
  }
  TapEngineDrop(p);  // on this thread: the ring is SINGLE_ISSUER
}

void DataPlane::StartWorker(Napi::Env env, Pair& p) {
  p.ep = epoll_create1(EPOLL_CLOEXEC);
  if (p.ep < 0) ThrowSys(env, "VHOST_USER_START_RING", "epoll_create1", errno);
  p.ctl = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  int err = p.ctl < 0 ? errno : 0;
  const char* what = err != 0 ? "eventfd" : "epoll_ctl";
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u32 = TAG_CTL;
  if (err == 0 && epoll_ctl(p.ep, EPOLL_CTL_ADD, p.ctl, &ev) != 0) err = errno;
  if (err == 0 && p.tap >= 0) {
    epoll_event tv{};
    tv.data.u32 = TAG_TAP;
    if (epoll_ctl(p.ep, EPOLL_CTL_ADD, p.tap, &tv) != 0) err = errno;
    else p.tapInEp = true;
  }
  if (err == 0) {
    void* m = mmap(nullptr, static_cast<size_t>(kRxSlots) * kBounce, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      err = errno;
      what = "mmap";
    } else p.slots = static_cast<uint8_t*>(m);
  }
  if (err == 0) {
    what = "pthread_create";
    try {
      p.rxq.reserve(kRxSlots);
      p.quit = false;
      p.th = std::thread(Worker, &p);
    } catch (const std::system_error& x) {
      err = x.code().value();
    } catch (const std::bad_alloc&) {
      err = ENOMEM;
    }
  }
  if (err != 0) {
    close(p.ep);
    if (p.ctl >= 0) close(p.ctl);
    p.ep = p.ctl = -1;
    if (p.slots != nullptr) munmap(p.slots, static_cast<size_t>(kRxSlots) * kBounce);
    p.slots = nullptr;
    ThrowSys(env, "VHOST_USER_START_RING", what, err);
  }
}

// memfdCreate(name): memfd_create(name, MFD_CLOEXEC).
Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  std::string name = ArgString(info, 0);
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) ThrowSys(info.Env(), "MEMFD_CREATE", "memfd_create", errno);
  return Napi::Number::New(info.Env(), fd);
}

// ftruncate(fd, bytes)
Napi::Value Ftruncate(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  if (info.Length() < 2 || !info[1].IsNumber()) ThrowArg(info.Env(), "argument 1: number expected");
  double v = info[1].As<Napi::Number>().DoubleValue();
  if (!(v >= 0 && v <= 9007199254740991.0) || v != static_cast<double>(static_cast<int64_t>(v))) ThrowArg(info.Env(), "argument 1: size out of range");
  if (ftruncate(fd, static_cast<off_t>(v)) != 0) ThrowSys(info.Env(), "FTRUNCATE", "ftruncate", errno);
  return info.Env().Undefined();
}

// fdSize(fd): fstat's st_size as a bigint.
Napi::Value FdSize(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  struct stat st;
  if (fstat(fd, &st) != 0) ThrowSys(info.Env(), "FSTAT", "fstat", errno);
  return Napi::BigInt::New(info.Env(), static_cast<int64_t>(st.st_size));
}

// mmapShared(fd, bytes, offset): MAP_SHARED read/write as an ArrayBuffer (unmapped when collected).
Napi::Value MmapShared(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  uint32_t len = ArgUint(info, 1);
  uint32_t off = info.Length() > 2 ? ArgUint(info, 2) : 0;
  if (len == 0) ThrowArg(info.Env(), "mmapShared: size must be > 0");
  return MappedArrayBuffer(info.Env(), len, "MMAP_SHARED", fd, off, true);
}

}  // namespace

void InitVhostUser(Napi::Env env, Napi::Object exports) {
  exports.Set("VhostUserDataPlane", DataPlane::Define(env));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("ftruncate", Napi::Function::New(env, Ftruncate, "ftruncate"));
  exports.Set("fdSize", Napi::Function::New(env, FdSize, "fdSize"));
  exports.Set("mmapShared", Napi::Function::New(env, MmapShared, "mmapShared"));
}

}  // namespace mqtap
