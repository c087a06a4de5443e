#!/usr/bin/env node
/**
 * Reads the sanitizer logs of a `npm run test:asan` run and fails when any
 * of them blames the addon:
 *  - an AddressSanitizer error or a UBSan "runtime error" whose report has a
 *    frame in the addon (any process that loaded mqtap.node);
 *  - a leak whose allocation stack, past the allocator's own frames, starts
 *    in the addon.  node and V8 keep memory until exit by design and the
 *    preloaded runtime also watches child programs (ip, setpriv, QEMU): those
 *    leaks are counted and summarised, never blamed on the addon.
 * Usage: node test/asan/leaks.js LOG_DIR ADDON_PATH
 */
'use strict';
const { readdirSync, readFileSync } = require('node:fs');
const { join } = require('node:path');

const [dir] = process.argv.slice(2);
if (!dir) {
  console.error('usage: leaks.js LOG_DIR ADDON_PATH');
  process.exit(2);
}
const ADDON_FRAME = /mqtap\.node|\/native\/[\w-]+\.(cc|h|c):|node-addon-api\/napi/;
const ALLOCATOR_FRAME = /asan_|libasan|sanitizer_common|\b(malloc|calloc|realloc|posix_memalign|aligned_alloc|strdup|operator new|operator new\[\])\b|libstdc\+\+/;

let blamed = 0;
let otherLeaks = 0;
let otherErrors = 0;
const files = readdirSync(dir).filter((f) => /^(asan|ubsan)\./.test(f));
for (const f of files) {
  const text = readFileSync(join(dir, f), 'utf8');
  // UBSan: one "runtime error" line per report, followed by its stack.
  for (const m of text.matchAll(/^.*runtime error:.*(?:\n\s+#\d+.*)*/gm)) {
    if (ADDON_FRAME.test(m[0])) {
      blamed++;
      console.error(`test:asan: undefined behaviour in the addon (${f}):\n${m[0]}\n`);
    } else otherErrors++;
  }
  // ASan errors other than leaks: the whole report up to SUMMARY.
  for (const m of text.matchAll(/ERROR: AddressSanitizer: (?!.*leak)[\s\S]*?SUMMARY:.*$/gm)) {
    if (ADDON_FRAME.test(m[0])) {
      blamed++;
      console.error(`test:asan: memory error in the addon (${f}):\n${m[0]}\n`);
    } else otherErrors++;
  }
  // Leaks: "Direct/Indirect leak of N byte(s) in K object(s) allocated from:" + frames.
  for (const m of text.matchAll(/^(Direct|Indirect) leak of .*\n((?:\s+#\d+.*\n?)+)/gm)) {
    const frames = m[2].split('\n').filter((l) => /^\s+#\d+/.test(l));
    const first = frames.find((l) => !ALLOCATOR_FRAME.test(l));
    if (first && ADDON_FRAME.test(first)) {
      blamed++;
      console.error(`test:asan: leak from the addon (${f}):\n${m[0]}`);
    } else otherLeaks++;
  }
}
console.log(
  `test:asan: ${files.length} sanitizer log(s); ${blamed} report(s) blaming the addon; ` +
    `${otherLeaks} leak(s) and ${otherErrors} error(s) elsewhere (node, V8, child programs), not the addon's`,
);
process.exit(blamed ? 1 : 0);
