/* Kernel constants gathered in C translation units: some uapi headers
 * (virtio_net.h uses `class` as a field name) do not compile as C++. */
#ifndef MQTAP_KCONST_H
#define MQTAP_KCONST_H

#ifdef __cplusplus
extern "C" {
#endif

struct mqtap_kconst {
  const char *name;
  double value;
};

/* Terminated by { 0, 0 }. */
extern const struct mqtap_kconst mqtap_virtio_consts[];

#ifdef __cplusplus
}
#endif

#endif
