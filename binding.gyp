{
  "targets": [
    {
      "target_name": "mqtap",
      "sources": [
        "native/addon.cc",
        "native/errors.cc",
        "native/tun.cc",
        "native/link.cc",
        "native/rtnl.cc",
        "native/sys.cc",
        "native/vhost.cc",
        "native/mem.cc",
        "native/scm.cc",
        "native/io.cc",
        "native/bpf.cc",
        "native/vhost_user.cc",
        "native/vhost_user_consts.c",
        "native/virtio_consts.c"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "_GNU_SOURCE"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags": ["-Wall", "-Wextra", "-fvisibility=hidden"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-fvisibility=hidden", "-fvisibility-inlines-hidden"],
      "conditions": [
        ["'<!(node -p \"process.env.MQTAP_WERROR || 0\")'=='1'", {
          "cflags+": ["-Werror"],
          "cflags_cc+": ["-Werror"]
        }]
      ]
    }
  ]
}
