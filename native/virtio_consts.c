/* virtio / vhost-net constants, straight from the kernel headers. */
#include <linux/vhost.h>
#include <linux/virtio_config.h>
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>

#include "kconst.h"

#define K(name) { #name, (double)(name) }

const struct mqtap_kconst mqtap_virtio_consts[] = {
  K(VHOST_FILE_UNBIND),
  K(VIRTIO_F_NOTIFY_ON_EMPTY),
  K(VIRTIO_F_ANY_LAYOUT),
  K(VIRTIO_F_VERSION_1),
  K(VIRTIO_F_ACCESS_PLATFORM),
  K(VIRTIO_F_RING_PACKED),
  K(VIRTIO_F_IN_ORDER),
  K(VIRTIO_RING_F_INDIRECT_DESC),
  K(VIRTIO_RING_F_EVENT_IDX),
  K(VHOST_F_LOG_ALL),
  K(VHOST_NET_F_VIRTIO_NET_HDR),
  K(VIRTIO_NET_F_CSUM),
  K(VIRTIO_NET_F_GUEST_CSUM),
  K(VIRTIO_NET_F_MAC),
  K(VIRTIO_NET_F_GUEST_TSO4),
  K(VIRTIO_NET_F_GUEST_TSO6),
  K(VIRTIO_NET_F_GUEST_ECN),
  K(VIRTIO_NET_F_GUEST_UFO),
  K(VIRTIO_NET_F_HOST_TSO4),
  K(VIRTIO_NET_F_HOST_TSO6),
  K(VIRTIO_NET_F_HOST_ECN),
  K(VIRTIO_NET_F_HOST_UFO),
  K(VIRTIO_NET_F_MRG_RXBUF),
  K(VIRTIO_NET_F_STATUS),
  K(VIRTIO_NET_F_CTRL_VQ),
  K(VIRTIO_NET_F_MQ),
  K(VIRTIO_NET_HDR_F_NEEDS_CSUM),
  K(VIRTIO_NET_HDR_F_DATA_VALID),
  K(VIRTIO_NET_HDR_GSO_NONE),
  K(VIRTIO_NET_HDR_GSO_TCPV4),
  K(VIRTIO_NET_HDR_GSO_UDP),
  K(VIRTIO_NET_HDR_GSO_TCPV6),
  K(VIRTIO_NET_HDR_GSO_ECN),
  K(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN),
  K(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX),
  K(VRING_DESC_F_NEXT),
  K(VRING_DESC_F_WRITE),
  K(VRING_DESC_F_INDIRECT),
  K(VRING_USED_F_NO_NOTIFY),
  K(VRING_AVAIL_F_NO_INTERRUPT),
  { "SIZEOF_VIRTIO_NET_HDR", (double)sizeof(struct virtio_net_hdr) },
  { "SIZEOF_VIRTIO_NET_HDR_MRG_RXBUF", (double)sizeof(struct virtio_net_hdr_mrg_rxbuf) },
  { "SIZEOF_VRING_DESC", (double)sizeof(struct vring_desc) },
  { "SIZEOF_VRING_USED_ELEM", (double)sizeof(struct vring_used_elem) },
  { 0, 0 },
};
