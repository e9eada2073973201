// One Node process of the weighted-throughput benchmark, for the npm `redis-semaphore` MultiSemaphore:
//   node bench/semaphore_worker.js '<spec as JSON>'   (NODE_PATH: bench/.node/node_modules)
//
// The same protocol as bench/weighted_worker.py: random whole-GB sizes from a seeded sequence, each taken as
// that many permits of a MultiSemaphore of `capacity_gb` permits (its defaults: polled every 10 ms), held for
// `hold_ms`, released; phases behind a barrier (RPUSH ready_key, BLPOP go_key, run, RPUSH done_key); samples
// [size_gb, t_request, t_granted, t_release, t_released, null] on CLOCK_MONOTONIC (process.hrtime, the clock
// Python's time.monotonic() reads), written to `out` as JSON, then RPUSH final_key.
'use strict';

const fs = require('fs');
const Redis = require('ioredis');
const { MultiSemaphore } = require('redis-semaphore');

const spec = JSON.parse(process.argv[2]);
const mono = () => Number(process.hrtime.bigint()) / 1e9;
const cpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// mulberry32: a small seeded generator, so each worker draws its own repeatable sizes.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function client() {
  return new Redis({ path: spec.socket, lazyConnect: false, maxRetriesPerRequest: 3, enableOfflineQueue: true });
}

async function runPhase(redis, phase, random) {
  const samples = [];
  const hold = Number(phase.hold_ms);
  const deadline = mono() + Number(phase.max_s);
  const lo = Number(spec.min_gb);
  const hi = Number(spec.max_gb);
  const timeout = Number(spec.acquire_timeout_s) * 1000;
  while (mono() < deadline && samples.length < Number(spec.max_count)) {
    const size = lo + Math.floor(random() * (hi - lo + 1));
    const sem = new MultiSemaphore(redis, spec.semaphore_key, Number(spec.capacity_gb), size, {
      acquireTimeout: timeout,
      lockTimeout: 60000,
    });
    const tReq = mono();
    await sem.acquire();
    const tGranted = mono();
    if (hold > 0) {
      await sleep(hold);
    }
    const tRelease = mono();
    await sem.release();
    samples.push([size, tReq, tGranted, tRelease, mono(), null]);
  }
  return samples;
}

async function main() {
  const control = client();
  const redis = client();
  const random = rng(Number(spec.seed));
  const phases = [];
  let error = '';
  try {
    // warm up: load the scripts
    const warm = new MultiSemaphore(redis, spec.semaphore_key, Number(spec.capacity_gb), 1, { lockTimeout: 60000 });
    await warm.acquire();
    await warm.release();
  } catch (err) {
    error = `setup: ${err}`;
  }
  for (const phase of spec.phases) {
    await control.rpush(phase.ready_key, process.pid);
    const go = await control.blpop(phase.go_key, 60);
    if (go === null) {
      error = error || 'no start signal';
      break;
    }
    const start = mono();
    const cpuStart = cpu();
    let samples = [];
    if (!error) {
      try {
        samples = await runPhase(redis, phase, random);
      } catch (err) {
        error = `hold ${phase.hold_ms} ms: ${err}`;
      }
    }
    phases.push({ start, end: mono(), cpu_s: cpu() - cpuStart, samples });
    await control.rpush(phase.done_key, process.pid);
  }
  fs.writeFileSync(spec.out, JSON.stringify({ pid: process.pid, error, phases }));
  await control.rpush(spec.final_key, process.pid);
  redis.disconnect();
  control.disconnect();
  return error ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  },
);
