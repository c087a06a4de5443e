// The userspace data path: batched, event-loop driven frame I/O on one tap
// queue fd (lib/datapath/io.ts holds the policy; docs/datapath.md the design).
//
// A QueueIo object wraps one queue fd the library owns (it never closes it)
// and does three things, all on the JavaScript thread:
//
//   rxRead()       reads up to `batch` frames that are waiting now into a
//                  per-queue slab (one fixed slot per frame) and describes
//                  them as (offset, length) pairs in a shared table.  Never
//                  blocks: 0 means "nothing waiting" (EAGAIN).
//   txWrite()      writes a list of frames (described by (buffer, offset,
//                  length) triples) until all are written or the kernel says
//                  EAGAIN; reports where it stopped.  Never blocks.
//   pollSet()      one libuv uv_poll_t on the fd (libuv allows only one per
//                  fd) watching UV_READABLE and/or UV_WRITABLE; the callback
//                  tells lib/datapath/io.ts to call rxRead/txWrite again.
//
// Three engines do the syscalls:
//
//   poll   one read(2)/write(2)/writev(2) per frame.
//   uring  io_uring used as a batching syscall: one io_uring_enter(2) submits
//          a batch of IORING_OP_READ/WRITE(V) with RWF_NOWAIT and reaps all of
//          it before returning (a NOWAIT op on a tap fd completes inline or
//          fails with EAGAIN; nothing stays in flight between calls).  So no
//          kernel access to the slab or to JavaScript buffers outlives the
//          call that started it, and teardown needs no cancellation.  Raw
//          syscalls on <linux/io_uring.h>: no liburing needed to build.
//   uring-mshot (receive only)  one IORING_OP_READ_MULTISHOT on the tap fd
//          (registered file) stays armed between calls, on a ring of its own
//          (SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG) with the slab's slots
//          as its provided-buffer ring (IORING_REGISTER_PBUF_RING, buffer id
//          = slot).  With DEFER_TASKRUN the kernel reads frames only inside
//          this thread's io_uring_enter(GETEVENTS), i.e. inside rxRead: the
//          kernel never writes the slab while JavaScript runs, and frames
//          stay queued in the tap until then, so readiness is still the tap
//          fd's POLLIN (the uv_poll).  A batch's slots go back to the
//          buffer ring on the next rxRead (the batch is released then).
//          -ENOBUFS (all slots held) or any completion without
//          IORING_CQE_F_MORE ends the multishot: the next rxRead re-arms it.
//          close()/stopUring() cancel it and reap the cancellation before the
//          ring, the buffer ring and the registered file are released.
//          The write side of this engine is 'uring' on a separate ring (on
//          the same ring, a write's io_uring_enter would run the reads).
//
// Counters (frames, bytes, drops, EAGAIN, syscalls) live in a small shared
// memory block that lib/datapath/io.ts reads without calling in here.
//
// Policy is lib/datapath/io.ts's, not this file's: which errnos drop one frame
// (and the call goes on) rather than stop the call is a list lib/ passes in
// (applied here per frame, without a call into JavaScript); when
// io_uring_enter itself fails, this file only reports it (ST_RING_ERRNO)
// and lib/ decides what to do (it calls stopUring() and goes on with plain
// syscalls); when io_uring is not available at all, lib/ chooses 'poll'.
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/io_uring.h>
#include <linux/time_types.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>

#include <bitset>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "poll.h"
#include "uring.h"

namespace mqtap {
namespace {

// Shared control block layout; mirrored in lib/datapath/io.ts (CTL_* constants).
enum Counter {
  RX_FRAMES = 0,
  RX_BYTES,
  RX_BATCHES,
  RX_DROPS,
  RX_WAITS,  // maintained by lib/datapath/io.ts
  RX_SYSCALLS,
  TX_FRAMES,
  TX_BYTES,
  TX_BATCHES,  // maintained by lib/datapath/io.ts
  TX_DROPS,
  TX_EAGAIN,
  TX_WAITS,  // maintained by lib/datapath/io.ts
  TX_SYSCALLS,
  TX_REORDERED,
  RX_REARMS,  // uring-mshot: times the multishot read ended (ENOBUFS, ...) and was armed again
  RX_DRAINS,  // uring-mshot: times a backlog (ENOBUFS) was drained with RWF_NOWAIT reads instead of re-arming
  RX_TRUNCATED,  // frames that filled their slot (maybe cut short), counted in RX_DROPS too (EMSGSIZE)
};
constexpr int kCounters = 24;  // Float64 counters (room to grow)
constexpr int kStates = 8;  // Int32 state words
enum StateWord {
  ST_NEXT = 0,      // txWrite: index of the first frame not written (== count when done)
  ST_COUNT,         // txWrite: frames left in the (possibly compacted) list
  ST_DROPPED,       // txWrite: frames the kernel refused in this call
  ST_DROP_ERRNO,    // txWrite: errno of the first refused frame
  ST_DROP_INDEX,    // txWrite: list index of the first refused frame
  ST_RX_DROP_ERRNO, // rxRead: errno/reason of the last rx drop (EMSGSIZE = truncated)
  ST_RING_ERRNO,    // io_uring_enter failed with this errno (the ring is not used again until lib/ calls stopUring)
};
constexpr size_t kCtlHeader = kCounters * sizeof(double) + kStates * sizeof(int32_t);

constexpr unsigned kMaxBatch = 1024;
// A receive batch stops after about this many bytes: 64 KB GSO frames then
// come 8 to a batch and keep reusing the first slots (cache-warm), instead
// of streaming through the whole slab (16 MiB with 256 slots of 64 KiB).
constexpr size_t kRxByteBudget = 512 * 1024;

// errnos up to this bound can be named in the drop lists.
constexpr int kMaxErrno = 4096;

// ---------------------------------------------------------------- slab


// One frame to write: where it is and how long.
struct TxFrame {
  const uint8_t* data;
  uint32_t len;
};

// ---------------------------------------------------------------- QueueIo

// new QueueIo(fd, { rx: 'poll' | 'uring' | 'uring-mshot', tx: 'poll' | 'uring', batch, slotSize, hdrLen,
//                   rxDropErrnos: number[], txDropErrnos: number[] }, onPoll)
//   rxDropErrnos / txDropErrnos: errnos that mean "the kernel dropped (or
//              refused) this one frame": counted as a drop, the call goes on.
//              Any other errno stops the call and is thrown.  lib/ decides.
//   .slab      ArrayBuffer: batch slots of slotSize bytes (mmap, committed lazily)
//   .control   ArrayBuffer: Float64 counters[24] | Int32 state[8] | Uint32 rxDesc[2*batch]
//   .engine    { rx, tx }: the engines in use
//   .rxRead()  -> frames read into the slab (0: nothing waiting)
//   .txWrite(buffers, desc, start, count, withHdr) -> see TxWrite
//   .pollSet(events)   UV_READABLE|UV_WRITABLE, 0 stops
//   .stopUring()  stops using io_uring for good (plain syscalls from now on)
//   .close()   stops polling and tears the engine down; the fd stays open
class QueueIo : public Napi::ObjectWrap<QueueIo> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "QueueIo",
                       {InstanceMethod<&QueueIo::RxRead>("rxRead"), InstanceMethod<&QueueIo::TxWrite>("txWrite"),
                        InstanceMethod<&QueueIo::PollSet>("pollSet"), InstanceMethod<&QueueIo::PollRef>("pollRef"),
                        InstanceMethod<&QueueIo::Close>("close"), InstanceMethod<&QueueIo::StopUring>("stopUring"),
                        InstanceAccessor<&QueueIo::GetSlab>("slab"), InstanceAccessor<&QueueIo::GetControl>("control"),
                        InstanceAccessor<&QueueIo::GetEngine>("engine"), InstanceAccessor<&QueueIo::GetOrdered>("ordered")});
  }

  explicit QueueIo(const Napi::CallbackInfo& info) : Napi::ObjectWrap<QueueIo>(info) {
    Napi::Env env = info.Env();
    fd_ = ArgFd(info, 0);
    if (info.Length() < 3 || !info[1].IsObject() || !info[2].IsFunction()) ThrowArg(env, "QueueIo(fd, options, onPoll)");
    Napi::Object o = info[1].As<Napi::Object>();
    std::string rx = o.Get("rx").ToString().Utf8Value();
    std::string tx = o.Get("tx").ToString().Utf8Value();
    batch_ = o.Get("batch").ToNumber().Uint32Value();
    slot_size_ = o.Get("slotSize").ToNumber().Uint32Value();
    hdr_len_ = o.Get("hdrLen").ToNumber().Uint32Value();
    if ((rx != "poll" && rx != "uring" && rx != "uring-mshot") || (tx != "poll" && tx != "uring"))
      ThrowArg(env, "QueueIo: rx must be 'poll', 'uring' or 'uring-mshot', tx 'poll' or 'uring'");
    if (batch_ < 1 || batch_ > kMaxBatch) ThrowArg(env, "QueueIo: batch out of range");
    if (slot_size_ < 64 || slot_size_ > (1u << 20) || hdr_len_ > 64 || hdr_len_ >= slot_size_) ThrowArg(env, "QueueIo: bad slot or header size");
    rx_uring_ = rx == "uring";
    rx_mshot_ = rx == "uring-mshot";
    tx_uring_ = tx == "uring";
    ErrnoSet(env, o.Get("rxDropErrnos"), "rxDropErrnos", &rx_drop_);
    ErrnoSet(env, o.Get("txDropErrnos"), "txDropErrnos", &tx_drop_);

    // Shared control block: counters, state words, rx descriptors.
    size_t ctl_len = kCtlHeader + 2 * batch_ * sizeof(uint32_t);
    Napi::ArrayBuffer control = MappedArrayBuffer(env, ctl_len, "QUEUE_IO", -1, 0, false);
    void* ctl = control.Data();
    counters_ = static_cast<double*>(ctl);
    state_ = reinterpret_cast<int32_t*>(static_cast<char*>(ctl) + kCounters * sizeof(double));
    rx_desc_ = reinterpret_cast<uint32_t*>(static_cast<char*>(ctl) + kCtlHeader);
    control_ = Napi::Persistent(control);

    // The receive slab: anonymous memory, so untouched slot tails cost nothing.
    Napi::ArrayBuffer slab = MappedArrayBuffer(env, static_cast<size_t>(batch_) * slot_size_, "QUEUE_IO", -1, 0, false);
    slab_base_ = static_cast<uint8_t*>(slab.Data());
    slab_ = Napi::Persistent(slab);

    if (rx_uring_ || tx_uring_) {
      // At least 256 entries: a writeBatch of up to 256 frames is one
      // io_uring_enter whatever the receive batch (~30 KB per queue).
      unsigned entries = 256;
      while (entries < batch_) entries <<= 1;
      ring_ = std::make_unique<Ring>();
      TagRing(rx_uring_ && tx_uring_ ? "rx,tx" : rx_uring_ ? "rx" : "tx", [&] {
        int err = ring_->Setup(entries, fd_);
        if (err != 0) ThrowSys(env, "IO_URING_SETUP", "io_uring_setup", err);
      });
      cqes_.reserve(ring_->entries() + 1);
      iov_.resize(2 * ring_->entries());
    }
    rx_want_ = rx_uring_ ? std::min<unsigned>(8, batch_) : batch_;
    if (rx_mshot_) TagRing("rx", [&] { MshotSetup(env); });

    poll_.Init(env, this, fd_, info[2].As<Napi::Function>(), "mqtap.QueueIo");
  }

  ~QueueIo() override { Teardown(); }

 private:
  // Runs `fn`; an error it throws says whose ring failed to set up (its
  // `ring` property: "rx", "tx" or "rx,tx"), so that lib/ steps down only
  // that direction.
  template <typename F>
  static void TagRing(const char* ring, F&& fn) {
    try {
      fn();
    } catch (Napi::Error& e) {
      e.Value().Set("ring", ring);
      throw;
    }
  }

  static void ErrnoSet(Napi::Env env, Napi::Value v, const char* what, std::bitset<kMaxErrno>* out) {
    if (!v.IsArray()) ThrowArg(env, std::string("QueueIo: ") + what + " must be an array of errno numbers");
    Napi::Array a = v.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Value e = a.Get(i);
      double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 1 && d < kMaxErrno) || d != static_cast<int>(d)) ThrowArg(env, std::string("QueueIo: ") + what + ": errno numbers are 1.." + std::to_string(kMaxErrno - 1));
      out->set(static_cast<size_t>(d));
    }
  }
  bool RxDrops(int err) const { return err > 0 && err < kMaxErrno && rx_drop_[err]; }
  bool TxDrops(int err) const { return err > 0 && err < kMaxErrno && tx_drop_[err]; }

  void Live(Napi::Env env, const char* op) {
    if (fd_ < 0) ThrowSys(env, op, "none", EBADF, "queue I/O is closed");
    // The shared blocks are written through raw pointers: refuse to go on if
    // JavaScript detached (transferred) them.
    if (control_.Value().IsDetached() || slab_.Value().IsDetached()) ThrowArg(env, "QueueIo: its control block or slab was detached (transferred)");
  }

  // ---- receive

  // Reads what is waiting (up to `batch` frames) into the slab; fills
  // rxDesc with (offset, length) pairs, lengths including the virtio-net
  // header.  Returns the number of frames.  Frames the kernel could not hand
  // over whole (one that fills its slot: slotSize bytes or more, header
  // included; EINVAL: a header the kernel could not express)
  // are counted in RX_DROPS, not returned.  A hard error (EBADFD: device
  // deleted) is thrown, after the frames read before it were returned.
  // -1: end of file (a tap never says so; a socket whose peer closed does).
  Napi::Value RxRead(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Live(env, "READ");
    if (rx_pending_errno_ != 0) {
      int err = rx_pending_errno_;
      rx_pending_errno_ = 0;
      ThrowSys(env, "READ", kRxErrSyscall, err);
    }
    if (rx_eof_) return Napi::Number::New(env, -1);
    // The ring failed (ST_RING_ERRNO, e.g. set by a txWrite that threw) and
    // lib/ has not called stopUring yet: the multishot may still be armed
    // with every free slot in the buffer ring, so read(2) into the slab is
    // not safe until it is torn down.  If it cannot be (still armed after
    // the bounded wait) nothing is read until stopUring.
    if (rx_mshot_ && !RingOk() && rx_ring_ && !MshotTeardown()) return Napi::Number::New(env, 0);
    unsigned got = rx_mshot_ && RingOk() ? RxMshot() : rx_uring_ && RingOk() ? RxUring() : RxPoll();
    if (got > 0) counters_[RX_BATCHES] += 1;
    if (got == 0 && rx_eof_) return Napi::Number::New(env, -1);
    if (got == 0 && rx_pending_errno_ != 0) {
      int err = rx_pending_errno_;
      rx_pending_errno_ = 0;
      ThrowSys(env, "READ", kRxErrSyscall, err);
    }
    return Napi::Number::New(env, got);
  }

  // The syscall named in a read's error: rx_pending_errno_ is the result of
  // the read itself (read(2), or the completion of a READ or
  // READ_MULTISHOT op), never of io_uring_enter (that one is ST_RING_ERRNO,
  // lib/ decides), so every engine names it "read".
  static constexpr const char* kRxErrSyscall = "read";

  // One read result for slot `slot`: true when it produced a frame.
  bool RxResult(unsigned slot, ssize_t n, unsigned* got) {
    // A frame that filled its slot may have been cut short: tun copies what
    // fits and (Linux 6.x) returns that length (older kernels returned the
    // full length).  Slots are one byte longer than the longest frame taken.
    if (n >= static_cast<ssize_t>(slot_size_)) {
      counters_[RX_DROPS] += 1;
      counters_[RX_TRUNCATED] += 1;
      state_[ST_RX_DROP_ERRNO] = EMSGSIZE;
      return false;
    }
    rx_desc_[2 * *got] = slot * slot_size_;
    rx_desc_[2 * *got + 1] = static_cast<uint32_t>(n);
    counters_[RX_FRAMES] += 1;
    counters_[RX_BYTES] += static_cast<double>(n - hdr_len_);
    ++*got;
    return true;
  }

  unsigned RxPoll() {
    unsigned got = 0;
    unsigned slot = 0;
    size_t bytes = 0;
    while (slot < batch_ && bytes < kRxByteBudget) {
      ssize_t n = read(fd_, slab_base_ + static_cast<size_t>(slot) * slot_size_, slot_size_);
      counters_[RX_SYSCALLS] += 1;
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) break;
        if (RxDrops(errno)) {  // e.g. EINVAL: the kernel dropped a frame it could not describe
          counters_[RX_DROPS] += 1;
          state_[ST_RX_DROP_ERRNO] = errno;
          continue;
        }
        rx_pending_errno_ = errno;
        break;
      }
      if (n == 0) {
        rx_eof_ = true;
        break;
      }
      if (RxResult(slot, n, &got)) {
        slot++;
        bytes += static_cast<size_t>(n);
      }
    }
    return got;
  }

  // io_uring_enter itself failed (never seen; see Ring::SubmitAndWait): what
  // completed was processed.  Reported to lib/ (ST_RING_ERRNO), which decides.
  void RingFailed(int err) { state_[ST_RING_ERRNO] = err; }
  bool RingOk() const { return state_[ST_RING_ERRNO] == 0; }

  unsigned RxUring() {
    unsigned got = 0;
    // Adaptive depth: a NOWAIT read of an empty queue costs a little, so ask
    // for about twice what the last call found (at least 4, at most batch).
    unsigned want = std::min(rx_want_, std::min(batch_, ring_->entries()));
    for (unsigned i = 0; i < want; i++) {
      io_uring_sqe* s = ring_->Sqe(i);
      s->opcode = IORING_OP_READ;
      s->flags = IOSQE_FIXED_FILE;
      s->fd = 0;
      s->addr = reinterpret_cast<uint64_t>(slab_base_ + static_cast<size_t>(i) * slot_size_);
      s->len = slot_size_;
      s->rw_flags = RWF_NOWAIT;
      s->user_data = i;
    }
    cqes_.clear();
    unsigned enters = 0;
    int err = ring_->SubmitAndWait(want, &cqes_, &enters);
    counters_[RX_SYSCALLS] += enters;  // io_uring_enter calls, usually one
    unsigned answered = 0;
    for (const io_uring_cqe& c : cqes_) {
      if (c.user_data >= want) continue;  // not one of this call's reads (never expected)
      unsigned slot = static_cast<unsigned>(c.user_data);
      if (c.res == 0) {
        rx_eof_ = true;
      } else if (c.res > 0) {
        RxResult(slot, c.res, &got);
        answered++;
      } else if (c.res == -EAGAIN || c.res == -ECANCELED) {
        // nothing was waiting for this read
      } else if (RxDrops(-c.res)) {  // e.g. EINVAL: the kernel dropped a frame it could not describe
        counters_[RX_DROPS] += 1;
        state_[ST_RX_DROP_ERRNO] = -c.res;
        answered++;
      } else if (rx_pending_errno_ == 0) {
        rx_pending_errno_ = -c.res;
      }
    }
    rx_want_ = answered >= want ? std::min(batch_, want * 2) : std::max(4u, std::min(batch_, answered * 2));
    if (got > 0) {
      size_t avg = 0;
      for (unsigned i = 0; i < got; i++) avg += rx_desc_[2 * i + 1];
      avg /= got;
      rx_want_ = std::max(4u, std::min<unsigned>(rx_want_, static_cast<unsigned>(kRxByteBudget / std::max<size_t>(avg, 1))));
    }
    if (err != 0) RingFailed(err);
    return got;
  }

  // ---- receive: multishot read into the provided-buffer ring

  static constexpr uint64_t kMshotTag = 1;   // user_data of the multishot read
  static constexpr uint64_t kCancelTag = 2;  // user_data of its cancellation
  static constexpr uint64_t kDrainTag = 3;   // user_data of the RWF_NOWAIT reads that drain a backlog
  static constexpr unsigned kBufGroup = 0;
  static constexpr unsigned kMshotFailStreak = 8;  // = kRounds: a call re-arming a failing multishot every round reports it

  // The ring and the buffer ring over the slab's slots.  Any
  // failure throws (op IO_URING_SETUP or IO_URING_REGISTER) and leaves
  // nothing behind (the members release what was made).
  void MshotSetup(Napi::Env env) {
    // Safety precondition: on a blocking file a drain read (RWF_NOWAIT is
    // honoured, but the multishot's retries are not bounded by it) could be
    // left in flight, writing a slot after rxRead returned.  The slab is
    // written only inside rxRead when the file is O_NONBLOCK (lib/ sets it).
    int fl = fcntl(fd_, F_GETFL);
    if (fl < 0) ThrowSys(env, "IO_URING_SETUP", "fcntl", errno, "F_GETFL on the queue fd");
    if (!(fl & O_NONBLOCK)) ThrowSys(env, "IO_URING_SETUP", "fcntl", EINVAL, "the multishot receive engine needs an O_NONBLOCK fd: set O_NONBLOCK (fcntl F_SETFL) before opening the queue I/O");
    unsigned entries = 16;
    while (entries < batch_) entries <<= 1;  // CQ: 2 x entries >= every slot's completion + the final one
    rx_ring_ = std::make_unique<Ring>();
    int err = rx_ring_->SetupExact(entries, fd_, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG);
    if (err != 0) ThrowSys(env, "IO_URING_SETUP", "io_uring_setup", err, "multishot receive ring (SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG)");
    buf_entries_ = 1;
    while (buf_entries_ < batch_) buf_entries_ <<= 1;
    buf_ring_len_ = (buf_entries_ * sizeof(io_uring_buf) + 4095) & ~static_cast<size_t>(4095);
    void* mem = mmap(nullptr, buf_ring_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) ThrowSys(env, "IO_URING_SETUP", "mmap", errno, "provided-buffer ring");
    buf_ring_.reset(static_cast<io_uring_buf_ring*>(mem), buf_ring_len_);
    err = rx_ring_->RegisterBufRing(mem, buf_entries_, kBufGroup);
    if (err != 0) ThrowSys(env, "IO_URING_REGISTER", "io_uring_register", err, "IORING_REGISTER_PBUF_RING");
    buf_registered_ = true;
    for (unsigned i = 0; i < batch_; i++) BufAdd(static_cast<uint16_t>(i));
    BufCommit();
  }

  // Slot `bid` back into the buffer ring (visible to the kernel at BufCommit).
  void BufAdd(uint16_t bid) {
    // Entry i is at byte 16 * i of the ring (the tail overlays entry 0's
    // resv).  Not `ring->bufs[i]`: compiled as C++, the header's
    // __DECLARE_FLEX_ARRAY puts an empty struct (1 byte in C++) before
    // `bufs`, which lands at offset 8 instead of 0.
    io_uring_buf* b = reinterpret_cast<io_uring_buf*>(buf_ring_.get()) + ((buf_tail_ + buf_pending_) & (buf_entries_ - 1));
    b->addr = reinterpret_cast<uint64_t>(slab_base_ + static_cast<size_t>(bid) * slot_size_);
    b->len = slot_size_;
    b->bid = bid;
    buf_pending_++;
  }
  void BufCommit() {
    if (buf_pending_ == 0) return;
    buf_tail_ = static_cast<uint16_t>(buf_tail_ + buf_pending_);
    buf_avail_ += buf_pending_;
    buf_pending_ = 0;
    __atomic_store_n(&buf_ring_.get()->tail, buf_tail_, __ATOMIC_RELEASE);
  }

  // Completions already posted, up to `batch` frames: frames into rxDesc
  // (their slots held until the next call), truncated ones counted and
  // their slots returned at once, whether the multishot is still armed, and
  // the drain's switch points: the multishot ending with -ENOBUFS starts a
  // drain (the reader is behind), a drain read meeting -EAGAIN ends it.
  void MshotConsume(unsigned* got) {
    while (const io_uring_cqe* c = rx_ring_->Peek()) {
      const bool mshot = c->user_data == kMshotTag;
      if (!mshot && c->user_data != kDrainTag) {  // the cancellation's own completion
        rx_ring_->Advance();
        continue;
      }
      int res = c->res;
      unsigned flags = c->flags;
      // The batch is full, or holds kRxByteBudget bytes (as the other
      // engines): this one waits for the next call.
      if (res > 0 && (*got >= batch_ || rx_call_bytes_ >= kRxByteBudget)) break;
      if (flags & IORING_CQE_F_BUFFER) {
        uint16_t bid = static_cast<uint16_t>(flags >> IORING_CQE_BUFFER_SHIFT);
        if (bid >= batch_) {
          // Never one of ours (only slots 0..batch-1 are added): not a slot
          // of the slab, so never given back to the kernel; the frame in it
          // is lost.
          counters_[RX_DROPS] += 1;
          state_[ST_RX_DROP_ERRNO] = EFAULT;
        } else {
          buf_avail_--;
          if (res > 0 && RxResult(bid, res, got)) {
            held_.push_back(bid);
            rx_call_bytes_ += static_cast<size_t>(res);
          } else {
            BufAdd(bid);  // truncated (counted by RxResult), or no frame in it
          }
        }
      }
      if (res > 0) mshot_fail_streak_ = 0;  // frames flow
      if (res == 0) {
        rx_eof_ = true;
      } else if (res == -EAGAIN && !mshot) {
        draining_ = false;  // a drain read found the tap's ring empty: caught up
      } else if (res < 0 && res != -ENOBUFS && res != -ECANCELED && res != -EAGAIN) {
        // A drop errno is a lost frame for a drain read (one read, one
        // frame).  A multishot's ends it (no F_MORE): tun dropped a frame it
        // could not describe, which may well be the first one after arming,
        // or the arming itself failed (e.g. EINVAL from the read's prep),
        // which would then "drop" a phantom frame and re-arm every round.
        // Told apart by persistence: the multishot failing kMshotFailStreak
        // times in a row without delivering a frame is reported to lib/.
        bool drop = RxDrops(-res);
        if (drop && mshot && ++mshot_fail_streak_ >= kMshotFailStreak) {
          mshot_fail_streak_ = 0;
          drop = false;
        }
        if (drop) {
          counters_[RX_DROPS] += 1;
          state_[ST_RX_DROP_ERRNO] = -res;
        } else if (rx_pending_errno_ == 0) {
          rx_pending_errno_ = -res;
        }
      }
      // ENOBUFS: every slot is used, the frame is still queued in the tap.
      // Without F_MORE the multishot is over, whatever the reason.  After
      // ENOBUFS the backlog is read with RWF_NOWAIT batches (no poll armed
      // on the tap meanwhile); otherwise it is re-armed on the next round
      // or call.
      if (mshot && !(flags & IORING_CQE_F_MORE)) {
        armed_ = false;
        if (res == -ENOBUFS && !draining_) {
          draining_ = true;
          counters_[RX_DRAINS] += 1;
        }
      }
      rx_ring_->Advance();
    }
    BufCommit();
  }

  // Up to n one-shot reads of the backlog: IORING_OP_READ with RWF_NOWAIT
  // and IOSQE_BUFFER_SELECT from the same buffer ring as the multishot.  On
  // the O_NONBLOCK registered file each completes inside the io_uring_enter
  // that submits it (a frame, or -EAGAIN when the tap's ring is empty; never
  // a poll, never io-wq), so nothing stays in flight.
  void PrepDrain(unsigned n) {
    for (unsigned i = 0; i < n; i++) {
      io_uring_sqe* s = rx_ring_->Sqe(i);
      s->opcode = IORING_OP_READ;
      s->flags = IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT;
      s->fd = 0;
      s->len = slot_size_;
      s->rw_flags = RWF_NOWAIT;
      s->buf_group = kBufGroup;
      s->user_data = kDrainTag;
    }
    rx_ring_->Publish(n);
  }

  unsigned RxMshot() {
    // The previous batch was released (lib/ bumped its generation before
    // calling): its slots go back to the kernel.
    for (uint16_t bid : held_) BufAdd(bid);
    held_.clear();
    BufCommit();
    unsigned got = 0;
    bool entered = false;
    // Bounded work per call (a flood of over-long frames keeps ending the
    // multishot with ENOBUFS after every slot is recycled): kRounds rounds,
    // the last one submitting nothing (see `arm` below).
    constexpr int kRounds = 8;
    rx_call_bytes_ = 0;
    for (int round = 0;; round++) {
      MshotConsume(&got);
      if (got >= batch_ || rx_call_bytes_ >= kRxByteBudget || rx_eof_ || rx_pending_errno_ != 0) break;
      bool last = round + 1 >= kRounds;
      // Behind: a batch of drain reads for the slots this call has left
      // (the multishot is not armed meanwhile).
      unsigned drain = draining_ && !armed_ ? std::min(buf_avail_, batch_ - got) : 0;
      if (drain > 0 && last) break;  // the drain goes on in the next call (the tap stays readable)
      // Never armed on the last round: a re-arm submitted without GETEVENTS
      // could read a frame at once and leave its completion unconsumed,
      // and with the tap then empty nothing would wake lib/ for it.  Left
      // unarmed, the frames still in the tap keep its POLLIN up and the next
      // call arms it.
      bool arm = drain == 0 && !draining_ && !armed_ && buf_avail_ > 0 && !last;
      // Nothing to submit and no task work queued: done, except that before
      // saying "nothing waiting" the kernel is entered once in any case, so
      // that no queued work is left behind a wait.
      if (drain == 0 && !arm && !rx_ring_->TaskWorkPending() && (got > 0 || entered)) break;
      unsigned submit = drain > 0 ? drain : arm ? 1 : 0;
      if (drain > 0) {
        PrepDrain(drain);
      } else if (arm) {
        io_uring_sqe* s = rx_ring_->Sqe(0);
        s->opcode = static_cast<uint8_t>(kOpReadMultishot);
        s->flags = IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT;
        s->fd = 0;
        s->buf_group = kBufGroup;
        s->user_data = kMshotTag;
        rx_ring_->Publish(1);
      }
      if (last) break;
      // Submits the drain reads or the re-arm (if any) and runs the deferred
      // task work: the multishot's reads, whose completions are then in the
      // CQ (the drain reads complete inline), consumed by the next round.
      int r = rx_ring_->Enter(submit, 0, IORING_ENTER_GETEVENTS);
      counters_[RX_SYSCALLS] += 1;
      entered = true;
      if (r < 0 && r != -EAGAIN && r != -EBUSY) {
        if (submit > 0) rx_ring_->Publish(static_cast<unsigned>(-static_cast<int>(submit)));  // take the unsubmitted SQEs back
        RingFailed(-r);
        break;
      }
      unsigned taken = r > 0 ? static_cast<unsigned>(r) : 0;
      if (taken < submit) rx_ring_->Publish(static_cast<unsigned>(-static_cast<int>(submit - taken)));  // not consumed: not submitted
      if (arm && taken >= 1) {
        armed_ = true;
        if (rearm_count_++ > 0) counters_[RX_REARMS] += 1;
      }
    }
    return got;
  }

  // Cancels the multishot read and reaps until its last completion is seen
  // (the cancel's submission retried, then up to 100 waits of 10 ms), so the
  // kernel holds no reference to the slab, the buffer ring or the file
  // afterwards; then releases the ring.  Frames in completions reaped here
  // are counted as RX_DROPS (nobody will read them).  If the multishot is
  // still armed after that (never seen), the buffer ring is neither
  // unregistered nor unmapped: its mapping is leaked on purpose (one page or
  // a few) so the kernel never reads freed memory; closing the ring then
  // cancels the request.  Returns false in that case.
  bool MshotTeardown() {
    if (!rx_ring_) return true;
    bool quiet = true;
    if (armed_) {
      int sent = 0;
      for (int i = 0; i < 100 && armed_ && sent < 1; i++) {
        io_uring_sqe* s = rx_ring_->Sqe(0);
        s->opcode = IORING_OP_ASYNC_CANCEL;
        s->fd = -1;
        s->addr = kMshotTag;
        s->user_data = kCancelTag;
        rx_ring_->Publish(1);
        int r = rx_ring_->Enter(1, 0, IORING_ENTER_GETEVENTS);
        sent = r > 0 ? r : 0;
        if (sent < 1) rx_ring_->Publish(static_cast<unsigned>(-1));  // not consumed: take it back
        MshotReap();
        if (armed_ && sent < 1) rx_ring_->WaitOneMs(10);  // e.g. EBUSY: completions to reap first
      }
      for (int i = 0; armed_ && i < 100; i++) {
        rx_ring_->WaitOneMs(10);
        MshotReap();
      }
      quiet = !armed_;
    }
    if (quiet) {
      if (buf_registered_) rx_ring_->UnregisterBufRing(kBufGroup);
    } else {
      buf_ring_.release();  // leaked on purpose (see above)
    }
    buf_registered_ = false;
    rx_ring_.reset();  // unregisters the tap file, closes the ring
    buf_ring_.reset(nullptr, 0);
    held_.clear();
    armed_ = false;
    draining_ = false;
    return quiet;
  }

  // Teardown's reaping: what is in the CQ, frames counted as drops.
  void MshotReap() {
    while (const io_uring_cqe* c = rx_ring_->Peek()) {
      if ((c->user_data == kMshotTag || c->user_data == kDrainTag) && c->res > 0) counters_[RX_DROPS] += 1;
      if (c->user_data == kMshotTag && !(c->flags & IORING_CQE_F_MORE)) armed_ = false;
      rx_ring_->Advance();
    }
  }

  // ---- transmit

  // txWrite(buffers, desc, start, count, withHdr): desc is a Uint32Array of
  // (buffer index, byte offset, byte length) triples; buffers an array of
  // ArrayBuffers.  Writes frames start..count-1 in order.  When withHdr is
  // false and the tap has a virtio-net header, a zeroed header is sent in
  // front of each frame (writev).  Stops at EAGAIN.  Afterwards
  // state[ST_NEXT] is the first frame not written and state[ST_COUNT] the
  // list length (the uring engine may compact unwritten frames to the front
  // of the remaining range after an EAGAIN, see below).  Frames refused with
  // a per-frame error are dropped and counted (state[ST_DROPPED], TX_DROPS);
  // any other error is thrown.
  Napi::Value TxWrite(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Live(env, "WRITE");
    if (info.Length() < 5 || !info[0].IsArray() || !info[1].IsTypedArray()) ThrowArg(env, "txWrite(buffers, desc, start, count, withHdr)");
    Napi::Array bufs = info[0].As<Napi::Array>();
    uint32_t start = ArgUint(info, 2);
    uint32_t count = ArgUint(info, 3);
    bool with_hdr = ArgBool(info, 4);

    // The buffers array's elements first: napi_get_element can run
    // JavaScript (a getter), which could detach or resize any buffer,
    // the descriptor array's included.  No raw pointer is taken until the
    // last element was fetched; the values are held (as handles) meanwhile.
    uint32_t nbufs = bufs.Length();
    buf_vals_.resize(nbufs);
    for (uint32_t i = 0; i < nbufs; i++) {
      if (napi_get_element(env, bufs, i, &buf_vals_[i]) != napi_ok) throw Napi::Error::New(env);
    }
    // From here on nothing runs JavaScript: base pointers and sizes of the
    // (few, usually one) backing buffers, then the descriptor array in one
    // call (type, length, data), not one per property.
    bases_.resize(nbufs);
    sizes_.resize(nbufs);
    for (uint32_t i = 0; i < nbufs; i++) {
      bool is_ab = false;
      void* data = nullptr;
      size_t len = 0;
      if (napi_is_arraybuffer(env, buf_vals_[i], &is_ab) != napi_ok || !is_ab) ThrowArg(env, "txWrite: buffers must be ArrayBuffers");
      if (napi_get_arraybuffer_info(env, buf_vals_[i], &data, &len) != napi_ok) throw Napi::Error::New(env);
      bases_[i] = static_cast<const uint8_t*>(data);
      sizes_[i] = len;  // a detached buffer has none: its frames fail the check below
    }
    napi_typedarray_type type;
    size_t desc_len = 0;
    void* desc_data = nullptr;
    if (napi_get_typedarray_info(env, info[1], &type, &desc_len, &desc_data, nullptr, nullptr) != napi_ok) throw Napi::Error::New(env);
    if (type != napi_uint32_array) ThrowArg(env, "txWrite: desc must be a Uint32Array");
    if (count > desc_len / 3 || start > count) ThrowArg(env, "txWrite: start/count out of range");
    uint32_t* desc = static_cast<uint32_t*>(desc_data);
    state_[ST_DROPPED] = 0;
    state_[ST_DROP_ERRNO] = 0;
    state_[ST_DROP_INDEX] = -1;
    state_[ST_COUNT] = static_cast<int32_t>(count);
    bool prepend = !with_hdr && hdr_len_ > 0;
    uint32_t hdr_bytes = with_hdr ? hdr_len_ : 0;
    uint32_t next;
    if (tx_uring_ && !ordered_ && RingOk()) {
      // The uring engine reads the triples straight into its SQEs (see
      // TxUring): no per-frame list is built.  Every frame is checked before
      // the first one is submitted.
      if (count - start > ring_->entries() && !TxCheck(desc, start, count)) TxBadFrame(env, desc, start, count);
      next = TxUring(env, desc, start, count, prepend, hdr_bytes);
    } else {
      frames_.resize(count);
      for (uint32_t i = start; i < count; i++) {
        uint32_t b = desc[3 * i], off = desc[3 * i + 1], len = desc[3 * i + 2];
        if (b >= nbufs || static_cast<size_t>(off) + len > sizes_[b] || len == 0) TxBadFrame(env, desc, i, i + 1);
        frames_[i] = TxFrame{bases_[b] + off, len};
      }
      next = TxPoll(env, start, count, prepend, hdr_bytes);
    }
    state_[ST_NEXT] = static_cast<int32_t>(next);
    return Napi::Number::New(env, next);
  }

  // Whether the triples start..count-1 all lie inside their buffers.
  bool TxCheck(const uint32_t* desc, uint32_t start, uint32_t count) const {
    const size_t nbufs = sizes_.size();
    bool ok = true;
    for (uint32_t i = start; i < count; i++) {
      uint32_t b = desc[3 * i], off = desc[3 * i + 1], len = desc[3 * i + 2];
      ok &= b < nbufs && len != 0 && static_cast<size_t>(off) + len <= sizes_[b < nbufs ? b : 0];
    }
    return ok;
  }

  // Throws for the first triple in start..count-1 outside its buffer.
  [[noreturn]] void TxBadFrame(Napi::Env env, const uint32_t* desc, uint32_t start, uint32_t count) const {
    uint32_t i = start;
    while (i + 1 < count && TxCheck(desc, i, i + 1)) i++;
    ThrowArg(env, "txWrite: frame " + std::to_string(i) + " is outside its buffer");
  }

  void TxDrop(uint32_t i, int err) {
    counters_[TX_DROPS] += 1;
    if (state_[ST_DROPPED]++ == 0) {
      state_[ST_DROP_ERRNO] = err;
      state_[ST_DROP_INDEX] = static_cast<int32_t>(i);
    }
  }

  void TxDone(uint32_t len, uint32_t hdr_bytes) {
    counters_[TX_FRAMES] += 1;
    counters_[TX_BYTES] += static_cast<double>(len - std::min(len, hdr_bytes));
  }

  uint32_t TxPoll(Napi::Env env, uint32_t start, uint32_t count, bool prepend, uint32_t hdr_bytes) {
    static const uint8_t kZeroHdr[64] = {0};
    uint32_t i = start;
    while (i < count) {
      const TxFrame& f = frames_[i];
      ssize_t n;
      if (prepend) {
        struct iovec iov[2] = {{const_cast<uint8_t*>(kZeroHdr), hdr_len_}, {const_cast<uint8_t*>(f.data), f.len}};
        n = writev(fd_, iov, 2);
      } else {
        n = write(fd_, f.data, f.len);
      }
      counters_[TX_SYSCALLS] += 1;
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
          counters_[TX_EAGAIN] += 1;
          return i;
        }
        if (!TxDrops(errno)) ThrowSys(env, "WRITE", prepend ? "writev" : "write", errno);
        TxDrop(i, errno);
      } else {
        TxDone(f.len, hdr_bytes);
      }
      i++;
    }
    return i;
  }

  // Batches of up to ring-size WRITE(V)s with RWF_NOWAIT, reaped in order.
  // Without links the kernel runs them in submission order but does not stop
  // after a failure, so a frame refused with EAGAIN may be followed by one
  // that was written: that would reorder frames.  A tap write only says
  // EAGAIN when its socket's send buffer (TUNSETSNDBUF, INT_MAX unless
  // someone lowered it) is full, which lib/datapath/io.ts checks before choosing this
  // engine; if it happens anyway, the frames written past the first EAGAIN
  // are counted in TX_REORDERED, the unwritten ones are moved (in order) to
  // the front of the remaining list, and this queue writes in order with
  // plain syscalls from then on (`ordered`).
  uint32_t TxUring(Napi::Env env, uint32_t* desc, uint32_t start, uint32_t count, bool prepend, uint32_t hdr_bytes) {
    static const uint8_t kZeroHdr[64] = {0};
    uint32_t i = start;
    const unsigned depth = ring_->entries();
    const size_t nbufs = sizes_.size();
    while (i < count) {
      unsigned k = std::min<unsigned>(depth, count - i);
      double chunk_bytes = 0;  // what the chunk adds to TX_BYTES if every frame is written
      // One pass over the triples: checked (a single-chunk call was not
      // checked before: nothing is submitted until the whole chunk is) and
      // turned into SQEs; the SQEs only become visible in SubmitAndWait.
      for (unsigned j = 0; j < k; j++) {
        const uint32_t* t = &desc[3 * (i + j)];
        uint32_t b = t[0], off = t[1], len = t[2];
        if (b >= nbufs || static_cast<size_t>(off) + len > sizes_[b] || len == 0) TxBadFrame(env, desc, i + j, i + j + 1);
        const uint8_t* data = bases_[b] + off;
        chunk_bytes += static_cast<double>(len - std::min(len, hdr_bytes));
        io_uring_sqe* s = ring_->Sqe(j);
        s->flags = IOSQE_FIXED_FILE;
        s->rw_flags = RWF_NOWAIT;
        s->user_data = j;
        if (prepend) {
          iov_[2 * j] = {const_cast<uint8_t*>(kZeroHdr), hdr_len_};
          iov_[2 * j + 1] = {const_cast<uint8_t*>(data), len};
          s->opcode = IORING_OP_WRITEV;
          s->addr = reinterpret_cast<uint64_t>(&iov_[2 * j]);
          s->len = 2;
        } else {
          // Single segment: IORING_OP_WRITE, no iovec to copy in.
          s->opcode = IORING_OP_WRITE;
          s->addr = reinterpret_cast<uint64_t>(data);
          s->len = len;
        }
      }
      cqes_.clear();
      unsigned enters = 0;
      int err = ring_->SubmitAndWait(k, &cqes_, &enters);
      counters_[TX_SYSCALLS] += enters;  // io_uring_enter calls, usually one per chunk
      // Results by position (completion order is submission order for inline ops, but do not rely on it).
      // An op with no completion (only if io_uring_enter itself failed) counts as EAGAIN: retried in order.
      // The usual case (every op completed and wrote its frame) is one pass over the CQEs.
      double frames = 0, bytes = 0;
      bool all_written = err == 0 && cqes_.size() == k;
      if (all_written) {
        for (const io_uring_cqe& c : cqes_) {
          if (c.res < 0 || c.user_data >= k) {
            all_written = false;
            break;
          }
        }
      }
      if (all_written) {
        counters_[TX_FRAMES] += k;
        counters_[TX_BYTES] += chunk_bytes;
        i += k;
        continue;
      }
      res_.assign(k, -EAGAIN);
      for (const io_uring_cqe& c : cqes_)
        if (c.user_data < k) res_[c.user_data] = c.res;
      int fatal = 0;
      unsigned first_again = k;
      for (unsigned j = 0; j < k; j++) {
        int r = res_[j];
        if (r >= 0) {
          uint32_t len = desc[3 * (i + j) + 2];
          frames += 1;
          bytes += static_cast<double>(len - std::min(len, hdr_bytes));
          if (first_again < k) counters_[TX_REORDERED] += 1;
        } else if (r == -EAGAIN) {
          if (first_again == k) first_again = j;
        } else if (TxDrops(-r)) {
          TxDrop(i + j, -r);
        } else if (fatal == 0) {
          fatal = -r;
        }
      }
      counters_[TX_FRAMES] += frames;
      counters_[TX_BYTES] += bytes;
      if (err != 0) RingFailed(err);
      if (fatal != 0) ThrowSys(env, "WRITE", prepend ? "writev" : "write", fatal);  // the write op's own result
      if (first_again < k) {
        // Keep the unwritten frames (EAGAIN'd ones of this batch, then the
        // ones not yet submitted) in order at i.., and write in order from now on.
        if (err == 0) counters_[TX_EAGAIN] += 1;
        ordered_ = true;
        uint32_t w = i;
        for (unsigned j = 0; j < k; j++) {
          if (res_[j] != -EAGAIN) continue;
          uint32_t src = i + j;
          if (w != src) memmove(&desc[3 * w], &desc[3 * src], 3 * sizeof(uint32_t));
          w++;
        }
        for (uint32_t src = i + k; src < count; src++, w++) memmove(&desc[3 * w], &desc[3 * src], 3 * sizeof(uint32_t));
        state_[ST_COUNT] = static_cast<int32_t>(w);
        return i;
      }
      i += k;
      if (err != 0) return i;  // lib/ sees ST_RING_ERRNO and decides how to go on
    }
    return i;
  }

  // ---- polling

  Napi::Value PollSet(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Live(env, "POLL");
    int events = ArgInt(info, 0) & (UV_READABLE | UV_WRITABLE);
    events_ = events;
    int r = ApplyPoll();
    if (r != 0) ThrowSys(env, "POLL_START", "uv_poll_start", -r);
    bool active = events != 0;
    if (active && !active_) Ref();
    if (!active && active_) Unref();
    active_ = active;
    return env.Undefined();
  }

  // pollRef(on): whether an armed poll keeps the event loop alive (uv_ref /
  // uv_unref; no syscall).  lib/datapath/io.ts leaves reads armed between batches
  // (saving an epoll_ctl pair per wakeup) but only keeps the loop alive
  // while someone actually waits.
  Napi::Value PollRef(const Napi::CallbackInfo& info) {
    poll_.SetRef(ArgBool(info, 0));
    return info.Env().Undefined();
  }

  // The interest in events_ on the tap fd's handle.  0 or a libuv error.
  int ApplyPoll() {
    if (events_ == 0) {
      poll_.Stop();
      return 0;
    }
    return poll_.Start(events_);
  }

  // Stops polling (which removes the fd from epoll, so it may be closed
  // right after) and tears the engine down.  The fd itself is not closed.
  void Teardown() {
    poll_.Close();
    MshotTeardown();
    if (ring_) ring_.reset();
    fd_ = -1;
  }

  // stopUring(): no io_uring from now on (the ring is torn down; reads and
  // writes are plain syscalls, in order).  lib/ calls it when ST_RING_ERRNO
  // says io_uring_enter failed.
  Napi::Value StopUring(const Napi::CallbackInfo& info) {
    MshotTeardown();
    ring_.reset();
    rx_uring_ = tx_uring_ = rx_mshot_ = false;
    ordered_ = true;
    state_[ST_RING_ERRNO] = 0;
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (active_) {
      active_ = false;
      Unref();
    }
    Teardown();
    return info.Env().Undefined();
  }

  Napi::Value GetSlab(const Napi::CallbackInfo&) { return slab_.Value(); }
  Napi::Value GetControl(const Napi::CallbackInfo&) { return control_.Value(); }
  Napi::Value GetEngine(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("rx", rx_mshot_ ? "uring-mshot" : rx_uring_ ? "uring" : "poll");
    o.Set("tx", tx_uring_ ? "uring" : "poll");
    return o;
  }
  Napi::Value GetOrdered(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !tx_uring_ || ordered_); }

  // A mapping unmapped with its owner.
  struct BufRingMem {
    io_uring_buf_ring* p = nullptr;
    size_t len = 0;
    ~BufRingMem() { reset(nullptr, 0); }
    io_uring_buf_ring* get() const { return p; }
    void reset(io_uring_buf_ring* np, size_t nl) {
      if (p != nullptr) munmap(p, len);
      p = np;
      len = nl;
    }
    // Forgets the mapping without unmapping it.
    void release() {
      p = nullptr;
      len = 0;
    }
  };

  int fd_ = -1;
  bool rx_uring_ = false;
  bool rx_mshot_ = false;
  bool armed_ = false;
  unsigned mshot_fail_streak_ = 0;  // uring-mshot: multishots in a row that ended with a drop errno before any frame
  size_t rx_call_bytes_ = 0;      // uring-mshot: bytes of the frames this rxRead returns
  bool draining_ = false;  // uring-mshot: behind (ENOBUFS); reading with RWF_NOWAIT batches, the multishot not armed
  bool buf_registered_ = false;
  int events_ = 0;
  unsigned rearm_count_ = 0;
  unsigned buf_entries_ = 0;
  unsigned buf_avail_ = 0;
  unsigned buf_pending_ = 0;
  uint16_t buf_tail_ = 0;
  size_t buf_ring_len_ = 0;
  std::vector<uint16_t> held_;
  bool tx_uring_ = false;
  bool ordered_ = false;
  bool active_ = false;
  unsigned batch_ = 0;
  unsigned rx_want_ = 0;
  uint32_t slot_size_ = 0;
  uint32_t hdr_len_ = 0;
  int rx_pending_errno_ = 0;
  bool rx_eof_ = false;
  uint8_t* slab_base_ = nullptr;
  double* counters_ = nullptr;
  int32_t* state_ = nullptr;
  uint32_t* rx_desc_ = nullptr;
  Napi::Reference<Napi::ArrayBuffer> slab_;
  Napi::Reference<Napi::ArrayBuffer> control_;
  UvPoll<QueueIo> poll_;
  std::unique_ptr<Ring> ring_;
  // Declared so that the ring goes before the buffer ring memory.
  BufRingMem buf_ring_;
  std::unique_ptr<Ring> rx_ring_;
  std::vector<io_uring_cqe> cqes_;
  std::vector<struct iovec> iov_;
  std::vector<const uint8_t*> bases_;
  std::vector<size_t> sizes_;
  std::vector<napi_value> buf_vals_;  // txWrite: the buffers array's elements, within one call only
  std::vector<TxFrame> frames_;
  std::vector<int> res_;
  std::bitset<kMaxErrno> rx_drop_;
  std::bitset<kMaxErrno> tx_drop_;
};

// TUNGETSNDBUF / TUNSETSNDBUF: the per-queue socket send buffer a tap write
// is charged against until the frame is consumed.  INT_MAX (the default)
// means a write never says EAGAIN; a smaller value gives writers
// backpressure (EAGAIN, then POLLOUT once frames have been consumed).  The
// value is per device: setting it through one queue sets it for every queue.
Napi::Value TunGetSndbuf(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int v = 0;
  if (ioctl(fd, TUNGETSNDBUF, &v) < 0) ThrowSys(info.Env(), "TUNGETSNDBUF", "ioctl", errno);
  return Napi::Number::New(info.Env(), v);
}

Napi::Value TunSetSndbuf(const Napi::CallbackInfo& info) {
  int fd = ArgFd(info, 0);
  int v = ArgInt(info, 1);
  if (ioctl(fd, TUNSETSNDBUF, &v) < 0) ThrowSys(info.Env(), "TUNSETSNDBUF", "ioctl", errno);
  return info.Env().Undefined();
}

// ioUringProbe(): what the running kernel's io_uring offers (ProbeUring in
// native/uring.h); lib/datapath/io.ts decides what to use.
Napi::Value IoUringProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  UringCaps c = ProbeUring();
  Napi::Object o = Napi::Object::New(env);
  o.Set("setupErrno", c.setup_errno);
  o.Set("deferTaskrun", c.defer_taskrun);
  o.Set("deferErrno", c.defer_errno);
  o.Set("extArg", c.ext_arg);
  o.Set("probeErrno", c.probe_errno);
  o.Set("lastOp", c.last_op);
  Napi::Object ops = Napi::Object::New(env);
  ops.Set("read", c.op_read);
  ops.Set("write", c.op_write);
  ops.Set("writev", c.op_writev);
  ops.Set("readMultishot", c.op_read_multishot);
  o.Set("ops", ops);
  o.Set("pbufRingErrno", c.pbuf_ring_errno);
  return o;
}

}  // namespace

void InitIo(Napi::Env env, Napi::Object exports) {
  exports.Set("QueueIo", QueueIo::Define(env));
  exports.Set("ioUringProbe", Napi::Function::New(env, IoUringProbe, "ioUringProbe"));
  exports.Set("tunGetSndbuf", Napi::Function::New(env, TunGetSndbuf, "tunGetSndbuf"));
  exports.Set("tunSetSndbuf", Napi::Function::New(env, TunSetSndbuf, "tunSetSndbuf"));
  // Constants of this module (kept apart from `constants`, whose typed
  // interface belongs to the core): poll bits and the shared block layout.
  Napi::Object c = Napi::Object::New(env);
  c.Set("UV_READABLE", Napi::Number::New(env, UV_READABLE));
  c.Set("UV_WRITABLE", Napi::Number::New(env, UV_WRITABLE));
  c.Set("UV_DISCONNECT", Napi::Number::New(env, UV_DISCONNECT));
  MQTAP_CONST(c, EAGAIN);
  MQTAP_CONST(c, EMSGSIZE);
  MQTAP_CONST(c, EINVAL);
  MQTAP_CONST(c, EFAULT);
  MQTAP_CONST(c, ENOMEM);
  MQTAP_CONST(c, ENOBUFS);
  MQTAP_CONST(c, ENOSYS);
  MQTAP_CONST(c, EPERM);
  MQTAP_CONST(c, EMFILE);
  MQTAP_CONST(c, ENFILE);
  c.Set("COUNTERS", Napi::Number::New(env, kCounters));
  c.Set("STATES", Napi::Number::New(env, kStates));
  c.Set("MAX_BATCH", Napi::Number::New(env, kMaxBatch));
  c.Set("INT_MAX", Napi::Number::New(env, 2147483647));
  exports.Set("ioConstants", c);
}

}  // namespace mqtap
