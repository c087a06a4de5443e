/* The split-ring flag bits native/vhost_user.cc needs, straight from the
 * kernel header (<linux/virtio_ring.h> has inline functions that do not
 * compile as C++). */
#include <linux/virtio_ring.h>
#include <stdint.h>

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc is 16 bytes");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem is 8 bytes");

const uint16_t mqtap_vring_desc_f_next = VRING_DESC_F_NEXT;
const uint16_t mqtap_vring_desc_f_write = VRING_DESC_F_WRITE;
const uint16_t mqtap_vring_desc_f_indirect = VRING_DESC_F_INDIRECT;
const uint16_t mqtap_vring_used_f_no_notify = VRING_USED_F_NO_NOTIFY;
const uint16_t mqtap_vring_avail_f_no_interrupt = VRING_AVAIL_F_NO_INTERRUPT;
