/**
 * Layering rules for lib/, checked by `npm run lint` (part of `npm test`'s
 * pretest, so CI fails on a broken rule and prints the offending import).
 *
 *   bin/, lib/index.ts                  the faces: may import anything below
 *   lib/daemon/                         management daemon
 *   lib/qemu/  lib/vhost-user/          handing queues to QEMU; being QEMU's vhost backend
 *   lib/vhost/  lib/datapath/           kernel vhost-net + vrings; per-queue frame I/O
 *   lib/tap/                            multi-queue taps and the kernel's view of them
 *   lib/sys/                            the addon's typed face, errors, validation, fds
 *
 * Imports only go down.  Parts on one row do not import each other.
 */
const PARTS = ['sys', 'tap', 'vhost', 'datapath', 'qemu', 'vhost-user', 'daemon'];
/** What each part may import from lib/ besides itself. */
const ALLOWED = {
  sys: [],
  tap: ['sys'],
  vhost: ['sys', 'tap'],
  datapath: ['sys', 'tap'],
  qemu: ['sys', 'tap', 'vhost', 'datapath'],
  'vhost-user': ['sys', 'tap', 'vhost', 'datapath'],
  daemon: ['sys', 'tap', 'vhost', 'datapath', 'qemu', 'vhost-user'],
};

const layerRules = PARTS.map((part) => {
  const forbidden = PARTS.filter((p) => p !== part && !ALLOWED[part].includes(p));
  return {
    name: `layer-${part}`,
    comment: `lib/${part}/ may import only ${ALLOWED[part].map((p) => `lib/${p}/`).join(', ') || 'nothing else in lib/'} (imports only go down)`,
    severity: 'error',
    from: { path: `^lib/${part}/` },
    to: { path: [`^lib/(${forbidden.join('|')})/`, '^lib/index\\.ts$'] },
  };
});

module.exports = {
  forbidden: [
    {
      name: 'no-circular',
      comment: 'a cycle makes the layers meaningless and the load order fragile',
      severity: 'error',
      from: {},
      to: { circular: true },
    },
    {
      name: 'lib-not-to-bin-test-bench',
      comment: 'the library never imports the CLI, the tests or the benchmarks',
      severity: 'error',
      from: { path: '^lib/' },
      to: { path: '^(bin|test|bench)/' },
    },
    ...layerRules,
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^(node_modules|dist|build)/' },
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.test.json' },
    enhancedResolveOptions: { extensions: ['.ts', '.js', '.json'] },
  },
};
