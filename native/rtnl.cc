// The kernel's own view of links over rtnetlink (RTM_GETLINK), including the
// tun driver's IFLA_TUN_* attributes (numqueues, numdisabled, ...),
// RTM_DELLINK, IFLA_TXQLEN (RTM_NEWLINK), and a device's qdiscs with their counters (RTM_GETQDISC).
// Each exported function is one request/response exchange on a short-lived
// NETLINK_ROUTE socket; attribute decoding is plain marshalling (no policy:
// the library decides what a "tap" is and which qdisc counts which queue).
#include <linux/gen_stats.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <linux/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <algorithm>
#include <vector>

#include "common.h"

namespace mqtap {
namespace {

class NetlinkSocket {
 public:
  NetlinkSocket(Napi::Env env, const char* op) : env_(env), op_(op) {
    fd_ = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd_ < 0) ThrowSys(env, op, "socket", errno);
    // Ask for extended ACKs so EINVAL & co come with the kernel's reason.
    int one = 1;
    setsockopt(fd_, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
  }
  ~NetlinkSocket() { close(fd_); }
  NetlinkSocket(const NetlinkSocket&) = delete;
  NetlinkSocket& operator=(const NetlinkSocket&) = delete;

  void Send(struct nlmsghdr* msg) {
    struct sockaddr_nl kernel;
    memset(&kernel, 0, sizeof kernel);
    kernel.nl_family = AF_NETLINK;
    ssize_t n;
    n = NoEintr([&] { return sendto(fd_, msg, msg->nlmsg_len, 0, reinterpret_cast<struct sockaddr*>(&kernel), sizeof kernel); });
    if (n < 0) ThrowSys(env_, op_, "sendto", errno);
  }

  // One datagram (possibly several netlink messages).  Returns its length.
  size_t Recv(std::vector<char>* buf) {
    ssize_t n;
    n = NoEintr([&] { return recv(fd_, buf->data(), buf->size(), MSG_TRUNC); });
    if (n < 0) ThrowSys(env_, op_, "recv", errno);
    if (static_cast<size_t>(n) > buf->size()) ThrowSys(env_, op_, "recv", EMSGSIZE, "netlink reply truncated");
    return static_cast<size_t>(n);
  }

 private:
  Napi::Env env_;
  const char* op_;
  int fd_;
};

// Request buffer: header + ifinfomsg + room for a few attributes.
struct LinkRequest {
  struct nlmsghdr hdr;
  struct ifinfomsg ifi;
  char attrs[256];

  // An ifinfomsg request of `type` with `flags` for `index` (0: none), no attributes yet.
  LinkRequest(unsigned short type, unsigned short flags, int index) {
    memset(this, 0, sizeof *this);
    hdr.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
    hdr.nlmsg_type = type;
    hdr.nlmsg_flags = flags;
    hdr.nlmsg_seq = 1;
    ifi.ifi_family = AF_UNSPEC;
    ifi.ifi_index = index;
  }
};

void AddAttr(struct nlmsghdr* n, unsigned short type, const void* data, size_t len) {
  struct rtattr* rta = reinterpret_cast<struct rtattr*>(reinterpret_cast<char*>(n) + NLMSG_ALIGN(n->nlmsg_len));
  rta->rta_type = type;
  rta->rta_len = static_cast<unsigned short>(RTA_LENGTH(len));
  memcpy(RTA_DATA(rta), data, len);
  n->nlmsg_len = NLMSG_ALIGN(n->nlmsg_len) + RTA_ALIGN(rta->rta_len);
}

uint32_t U32(const struct rtattr* a) {
  uint32_t v;
  memcpy(&v, RTA_DATA(a), sizeof v);
  return v;
}
uint8_t U8(const struct rtattr* a) { return *static_cast<const uint8_t*>(RTA_DATA(a)); }
std::string Str(const struct rtattr* a) {
  const char* s = static_cast<const char*>(RTA_DATA(a));
  return std::string(s, strnlen(s, RTA_PAYLOAD(a)));
}

Napi::Object DecodeTun(Napi::Env env, const struct rtattr* data) {
  Napi::Object tun = Napi::Object::New(env);
  int len = RTA_PAYLOAD(data);
  for (const struct rtattr* a = static_cast<const struct rtattr*>(RTA_DATA(data)); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    switch (a->rta_type) {
      case IFLA_TUN_OWNER: tun.Set("owner", U32(a)); break;
      case IFLA_TUN_GROUP: tun.Set("group", U32(a)); break;
      case IFLA_TUN_TYPE: tun.Set("type", U8(a)); break;
      case IFLA_TUN_PI: tun.Set("pi", U8(a) != 0); break;
      case IFLA_TUN_VNET_HDR: tun.Set("vnetHdr", U8(a) != 0); break;
      case IFLA_TUN_PERSIST: tun.Set("persist", U8(a) != 0); break;
      case IFLA_TUN_MULTI_QUEUE: tun.Set("multiQueue", U8(a) != 0); break;
      case IFLA_TUN_NUM_QUEUES: tun.Set("numQueues", U32(a)); break;
      case IFLA_TUN_NUM_DISABLED_QUEUES: tun.Set("numDisabledQueues", U32(a)); break;
      default: break;
    }
  }
  return tun;
}

Napi::Object DecodeLink(Napi::Env env, const struct nlmsghdr* h) {
  const struct ifinfomsg* ifi = static_cast<const struct ifinfomsg*>(NLMSG_DATA(h));
  Napi::Object link = Napi::Object::New(env);
  link.Set("index", Napi::Number::New(env, ifi->ifi_index));
  link.Set("flags", Napi::Number::New(env, ifi->ifi_flags));
  link.Set("type", Napi::Number::New(env, ifi->ifi_type));
  int len = IFLA_PAYLOAD(h);
  for (const struct rtattr* a = IFLA_RTA(ifi); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    switch (a->rta_type) {
      case IFLA_IFNAME: link.Set("name", Str(a)); break;
      case IFLA_MTU: link.Set("mtu", U32(a)); break;
      case IFLA_TXQLEN: link.Set("txqlen", U32(a)); break;
      case IFLA_OPERSTATE: link.Set("operstate", U8(a)); break;
      case IFLA_NUM_TX_QUEUES: link.Set("numTxQueues", U32(a)); break;
      case IFLA_NUM_RX_QUEUES: link.Set("numRxQueues", U32(a)); break;
      case IFLA_ADDRESS: {
        const uint8_t* b = static_cast<const uint8_t*>(RTA_DATA(a));
        std::string mac;
        char part[4];
        for (size_t i = 0; i < RTA_PAYLOAD(a); i++) {
          snprintf(part, sizeof part, i ? ":%02x" : "%02x", b[i]);
          mac += part;
        }
        link.Set("address", mac);
        break;
      }
      case IFLA_STATS64: {
        // Unaligned in the message: copy out before reading.
        struct rtnl_link_stats64 st;
        memset(&st, 0, sizeof st);
        memcpy(&st, RTA_DATA(a), std::min(sizeof st, static_cast<size_t>(RTA_PAYLOAD(a))));
        Napi::Object stats = Napi::Object::New(env);
        stats.Set("rxPackets", static_cast<double>(st.rx_packets));
        stats.Set("txPackets", static_cast<double>(st.tx_packets));
        stats.Set("rxBytes", static_cast<double>(st.rx_bytes));
        stats.Set("txBytes", static_cast<double>(st.tx_bytes));
        stats.Set("rxErrors", static_cast<double>(st.rx_errors));
        stats.Set("txErrors", static_cast<double>(st.tx_errors));
        stats.Set("rxDropped", static_cast<double>(st.rx_dropped));
        stats.Set("txDropped", static_cast<double>(st.tx_dropped));
        link.Set("stats", stats);
        break;
      }
      case IFLA_LINKINFO: {
        int ilen = RTA_PAYLOAD(a);
        const struct rtattr* data = nullptr;
        for (const struct rtattr* i = static_cast<const struct rtattr*>(RTA_DATA(a)); RTA_OK(i, ilen); i = RTA_NEXT(i, ilen)) {
          if (i->rta_type == IFLA_INFO_KIND) link.Set("kind", Str(i));
          if (i->rta_type == IFLA_INFO_DATA) data = i;
        }
        if (data != nullptr && link.Has("kind") && link.Get("kind").As<Napi::String>().Utf8Value() == "tun")
          link.Set("tun", DecodeTun(env, data));
        break;
      }
      default: break;
    }
  }
  return link;
}

// Reads replies for `seq` until NLMSG_DONE (dump) or the one reply / ACK.
// Calls on_msg for each message of type `want` (RTM_NEWLINK, RTM_NEWQDISC).
// Returns the negative errno carried by an NLMSG_ERROR (0 for an ACK), with
// the extended-ACK text in *ext.
template <typename F>
int ReadReplies(Napi::Env env, NetlinkSocket* sock, uint32_t seq, bool dump, uint16_t want, F on_msg, std::string* ext) {
  std::vector<char> buf(64 * 1024);
  for (;;) {
    size_t n = sock->Recv(&buf);
    int len = static_cast<int>(n);
    for (struct nlmsghdr* h = reinterpret_cast<struct nlmsghdr*>(buf.data()); NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
      if (h->nlmsg_seq != seq) continue;
      if (h->nlmsg_type == NLMSG_DONE) return 0;
      if (h->nlmsg_type == NLMSG_ERROR) {
        const struct nlmsgerr* e = static_cast<const struct nlmsgerr*>(NLMSG_DATA(h));
        if (e->error != 0 && (h->nlmsg_flags & NLM_F_ACK_TLVS)) {
          // Extended ACK attributes follow the echoed request header (or the
          // whole request when NLM_F_CAPPED is not set).
          size_t off = sizeof(*e) + ((h->nlmsg_flags & NLM_F_CAPPED) ? 0 : e->msg.nlmsg_len - sizeof(e->msg));
          if (NLMSG_LENGTH(off) < h->nlmsg_len) {
            int alen = static_cast<int>(h->nlmsg_len - NLMSG_LENGTH(off));
            for (const struct rtattr* a = reinterpret_cast<const struct rtattr*>(static_cast<const char*>(NLMSG_DATA(h)) + off);
                 RTA_OK(a, alen); a = RTA_NEXT(a, alen)) {
              if (a->rta_type == NLMSGERR_ATTR_MSG) *ext = Str(a);
            }
          }
        }
        return e->error;
      }
      if (h->nlmsg_type == want) {
        on_msg(h);
        if (!dump) return 0;
      }
    }
    (void)env;
  }
}

// Sends `req` and reads the kernel's ack; a refusal throws as `op` (with the extended ack text).
void SendAndAck(Napi::Env env, NetlinkSocket* sock, LinkRequest* req, const char* op) {
  sock->Send(&req->hdr);
  std::string ext;
  int err = ReadReplies(env, sock, 1, false, RTM_NEWLINK, [](const struct nlmsghdr*) {}, &ext);
  if (err != 0) ThrowSys(env, op, "netlink", -err, ext);
}

// rtnlGetLinks(name?): every link in this network namespace, or just `name`.
// A name the kernel does not know is an error (ENODEV, the name in the
// detail), never an empty list: whether a missing device is fine is lib/'s
// decision (lib/tap/links.ts getLink).
Napi::Value RtnlGetLinks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool one = info.Length() > 0 && !info[0].IsUndefined() && !info[0].IsNull();
  std::string name = one ? ArgIfName(info, 0) : std::string();
  NetlinkSocket sock(env, "RTM_GETLINK");
  LinkRequest req(RTM_GETLINK, NLM_F_REQUEST | (one ? 0 : NLM_F_DUMP), 0);
  if (one) AddAttr(&req.hdr, IFLA_IFNAME, name.c_str(), name.size() + 1);
  sock.Send(&req.hdr);
  Napi::Array out = Napi::Array::New(env);
  std::string ext;
  int err = ReadReplies(env, &sock, 1, !one, RTM_NEWLINK, [&](const struct nlmsghdr* h) { out.Set(out.Length(), DecodeLink(env, h)); }, &ext);
  if (err != 0) ThrowSys(env, "RTM_GETLINK", "netlink", -err, one ? (ext.empty() ? name : name + ": " + ext) : ext);
  return out;
}

// rtnlDelLink(ifindex): RTM_DELLINK, as `ip link del` does.
Napi::Value RtnlDelLink(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t index = ArgInt(info, 0);
  NetlinkSocket sock(env, "RTM_DELLINK");
  LinkRequest req(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, index);
  SendAndAck(env, &sock, &req, "RTM_DELLINK");
  return env.Undefined();
}

// rtnlSetTxQueueLen(ifindex, len): RTM_NEWLINK with IFLA_TXQLEN, as `ip link
// set DEV txqueuelen N` does.  For a tun/tap device this is the length of
// each queue's ring (the kernel resizes the rings of attached queues).
Napi::Value RtnlSetTxQueueLen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t index = ArgInt(info, 0);
  uint32_t len = ArgUint(info, 1);
  if (index <= 0) ThrowArg(env, "rtnlSetTxQueueLen: ifindex must be positive");
  NetlinkSocket sock(env, "IFLA_TXQLEN");
  LinkRequest req(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, index);
  AddAttr(&req.hdr, IFLA_TXQLEN, &len, sizeof len);
  SendAndAck(env, &sock, &req, "IFLA_TXQLEN");
  return env.Undefined();
}

// One RTM_NEWQDISC message: identity and counters.  TCA_STATS2 (gen_stats.h)
// is preferred; TCA_STATS_PKT64 carries the packet count when it no longer
// fits the 32 bits of gnet_stats_basic.  The legacy TCA_STATS (struct
// tc_stats) is read only when TCA_STATS2 is absent.
Napi::Object DecodeQdisc(Napi::Env env, const struct nlmsghdr* h) {
  const struct tcmsg* t = static_cast<const struct tcmsg*>(NLMSG_DATA(h));
  Napi::Object q = Napi::Object::New(env);
  q.Set("ifindex", Napi::Number::New(env, t->tcm_ifindex));
  q.Set("handle", Napi::Number::New(env, t->tcm_handle));
  q.Set("parent", Napi::Number::New(env, t->tcm_parent));
  double bytes = 0, packets = 0, drops = 0, overlimits = 0, requeues = 0, qlen = 0, backlog = 0;
  bool have_stats2 = false, have_pkt64 = false;
  struct tc_stats legacy;
  bool have_legacy = false;
  int len = static_cast<int>(h->nlmsg_len) - static_cast<int>(NLMSG_LENGTH(sizeof(struct tcmsg)));
  for (const struct rtattr* a = TCA_RTA(t); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
    switch (a->rta_type) {
      case TCA_KIND: q.Set("kind", Str(a)); break;
      case TCA_STATS2: {
        have_stats2 = true;
        int slen = RTA_PAYLOAD(a);
        for (const struct rtattr* s = static_cast<const struct rtattr*>(RTA_DATA(a)); RTA_OK(s, slen); s = RTA_NEXT(s, slen)) {
          if (s->rta_type == TCA_STATS_BASIC) {
            struct gnet_stats_basic b;
            memset(&b, 0, sizeof b);
            memcpy(&b, RTA_DATA(s), std::min(sizeof b, static_cast<size_t>(RTA_PAYLOAD(s))));
            bytes = static_cast<double>(b.bytes);
            if (!have_pkt64) packets = static_cast<double>(b.packets);
          } else if (s->rta_type == TCA_STATS_PKT64 && RTA_PAYLOAD(s) >= sizeof(uint64_t)) {
            uint64_t p;
            memcpy(&p, RTA_DATA(s), sizeof p);
            packets = static_cast<double>(p);
            have_pkt64 = true;
          } else if (s->rta_type == TCA_STATS_QUEUE) {
            struct gnet_stats_queue qs;
            memset(&qs, 0, sizeof qs);
            memcpy(&qs, RTA_DATA(s), std::min(sizeof qs, static_cast<size_t>(RTA_PAYLOAD(s))));
            qlen = qs.qlen;
            backlog = qs.backlog;
            drops = qs.drops;
            requeues = qs.requeues;
            overlimits = qs.overlimits;
          }
        }
        break;
      }
      case TCA_STATS: {
        memset(&legacy, 0, sizeof legacy);
        memcpy(&legacy, RTA_DATA(a), std::min(sizeof legacy, static_cast<size_t>(RTA_PAYLOAD(a))));
        have_legacy = true;
        break;
      }
      default: break;
    }
  }
  if (!have_stats2 && have_legacy) {
    bytes = static_cast<double>(legacy.bytes);
    packets = legacy.packets;
    drops = legacy.drops;
    overlimits = legacy.overlimits;
    qlen = legacy.qlen;
    backlog = legacy.backlog;
  }
  q.Set("bytes", bytes);
  q.Set("packets", packets);
  q.Set("drops", drops);
  q.Set("overlimits", overlimits);
  q.Set("requeues", requeues);
  q.Set("qlen", qlen);
  q.Set("backlog", backlog);
  return q;
}

// rtnlGetQdiscs(ifindex): every qdisc of one device (RTM_GETQDISC dump, as
// `tc -s qdisc show dev X`): { ifindex, handle, parent, kind, bytes, packets,
// drops, overlimits, requeues, qlen, backlog } each.  The request names the
// device; replies for other devices are skipped as well (older kernels dump
// every device).  Decoding only: which qdisc counts which queue is lib/'s
// business.
Napi::Value RtnlGetQdiscs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t index = ArgInt(info, 0);
  if (index <= 0) ThrowArg(env, "rtnlGetQdiscs: ifindex must be positive");
  NetlinkSocket sock(env, "RTM_GETQDISC");
  struct {
    struct nlmsghdr hdr;
    struct tcmsg tcm;
  } req;
  memset(&req, 0, sizeof req);
  req.hdr.nlmsg_len = NLMSG_LENGTH(sizeof(struct tcmsg));
  req.hdr.nlmsg_type = RTM_GETQDISC;
  req.hdr.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  req.hdr.nlmsg_seq = 1;
  req.tcm.tcm_family = AF_UNSPEC;
  req.tcm.tcm_ifindex = index;
  sock.Send(&req.hdr);
  Napi::Array out = Napi::Array::New(env);
  std::string ext;
  int err = ReadReplies(env, &sock, 1, true, RTM_NEWQDISC, [&](const struct nlmsghdr* h) {
    const struct tcmsg* t = static_cast<const struct tcmsg*>(NLMSG_DATA(h));
    if (h->nlmsg_len >= NLMSG_LENGTH(sizeof(struct tcmsg)) && t->tcm_ifindex == index) out.Set(out.Length(), DecodeQdisc(env, h));
  }, &ext);
  if (err != 0) ThrowSys(env, "RTM_GETQDISC", "netlink", -err, ext);
  return out;
}

}  // namespace

void InitRtnl(Napi::Env env, Napi::Object exports) {
  exports.Set("rtnlGetLinks", Napi::Function::New(env, RtnlGetLinks, "rtnlGetLinks"));
  exports.Set("rtnlDelLink", Napi::Function::New(env, RtnlDelLink, "rtnlDelLink"));
  exports.Set("rtnlSetTxQueueLen", Napi::Function::New(env, RtnlSetTxQueueLen, "rtnlSetTxQueueLen"));
  exports.Set("rtnlGetQdiscs", Napi::Function::New(env, RtnlGetQdiscs, "rtnlGetQdiscs"));
  Napi::Object c = Constants(exports);
  MQTAP_CONST(c, TC_H_ROOT);
  MQTAP_CONST(c, TC_H_INGRESS);
  MQTAP_CONST(c, IF_OPER_UNKNOWN);
  MQTAP_CONST(c, IF_OPER_NOTPRESENT);
  MQTAP_CONST(c, IF_OPER_DOWN);
  MQTAP_CONST(c, IF_OPER_LOWERLAYERDOWN);
  MQTAP_CONST(c, IF_OPER_TESTING);
  MQTAP_CONST(c, IF_OPER_DORMANT);
  MQTAP_CONST(c, IF_OPER_UP);
}

}  // namespace mqtap
