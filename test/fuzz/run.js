#!/usr/bin/env node
// npm run fuzz -- [--runs N] [--seed S] [vitest file filters...]
// Runs the property-based tests in test/fuzz/ with more runs than npm test does.
'use strict';
const { spawnSync } = require('node:child_process');
const args = process.argv.slice(2);
const env = { ...process.env };
const rest = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--runs') env.MQTAP_FUZZ_RUNS = args[++i];
  else if (args[i] === '--seed') env.MQTAP_FUZZ_SEED = args[++i];
  else rest.push(args[i]);
}
if (env.MQTAP_FUZZ_RUNS !== undefined && !/^[1-9]\d*$/.test(env.MQTAP_FUZZ_RUNS)) {
  console.error(`fuzz: --runs takes a positive integer (got ${env.MQTAP_FUZZ_RUNS})`);
  process.exit(2);
}
if (env.MQTAP_FUZZ_SEED !== undefined && !/^-?\d+$/.test(env.MQTAP_FUZZ_SEED)) {
  console.error(`fuzz: --seed takes an integer (got ${env.MQTAP_FUZZ_SEED})`);
  process.exit(2);
}
console.log(`fuzz: ${env.MQTAP_FUZZ_RUNS ?? 'default'} runs per property, seed ${env.MQTAP_FUZZ_SEED ?? 'default'}`);
const r = spawnSync('npx', ['vitest', 'run', ...(rest.length ? rest : ['test/fuzz'])], { stdio: 'inherit', env });
process.exit(r.status ?? 1);
