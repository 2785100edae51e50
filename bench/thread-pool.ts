/**
 * Thread-pool benchmarks: 4 KiB random preads at queue depth 32 from a 1 GiB file in the
 * page cache, and empty jobs at depth 1 and 32, each beside references measured in the
 * same run (libuv's pool through `fs.read`, libuv with io_uring in a child process, a
 * synchronous `fs.readSync` loop, fio, a `postMessage` round trip to a worker) and QEMU
 * 7.2's C thread pool figures measured earlier on this kind of machine (constants).
 *
 * Part of `npm run bench`; alone: `node --import tsx bench/thread-pool.ts`.
 *
 * Every figure runs continuously (the pipeline is never drained between slices): a warm-up,
 * then BENCH_TP_SLICES (default 3) slices of BENCH_TP_SLICE_MS (default 1000) ms; the
 * figure is the median slice rate, spread = (max - min) / median. The data file is created
 * once under .bench-data/ (BENCH_TP_FILE overrides the path) and read through once per run
 * to keep it in the page cache (fio runs with --invalidate=0, or it would drop it). fio runs
 * io_uring at iodepth 32 with one job, and psync (depth 1 per job) with 1 and 4 jobs; fio
 * missing prints "fio: not installed". The line "other processes used N of M CPUs" comes
 * from /proc/stat minus this process and its children: above 0.25 the figures are
 * distorted (on a 2-core VM a quiet machine is also slower at thread wake-ups than a busy
 * one, so compare ratios, and only within one run). BENCH_VERBOSE=1 prints every slice.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import {
  aio_get_thread_pool,
  aio_poll,
  qemu_get_aio_context,
  qemu_init_main_loop,
  qemu_memalign,
  qemu_vfree,
  thread_pool_nop,
  thread_pool_preadv,
  thread_pool_submit_aio,
  type AioContext,
  type ThreadPool,
} from '../src/index.ts';
import { threadPoolWorkerCount } from '../src/aio/thread-pool.ts';
import { formatTable } from './harness.ts';
import {
  BLOCK,
  BLOCKS,
  blockByte,
  DEPTH,
  createFile,
  envNumber,
  fail,
  readFileLooksRight,
  readFilePath,
  warmPageCache,
} from './data-file.ts';

const SLICES = Math.round(envNumber('BENCH_TP_SLICES', 3));
const SLICE_MS = envNumber('BENCH_TP_SLICE_MS', 1000);
const WARM_MS = 1000;
const SHORT_WARM_MS = 300;

/** Creates the file once and reads it through to warm the page cache. */
function prepareDataFile(log: (s: string) => void): string {
  const file = readFilePath();
  if (!readFileLooksRight(file)) createFile(file, null, log);
  const t0 = performance.now();
  warmPageCache(file);
  log(`page cache warmed (${((performance.now() - t0) / 1000).toFixed(2)} s for 1 GiB)`);
  return file;
}

// ---------------------------------------------------------------------------------------
// How busy the rest of the machine was: CPU time of all processes (/proc/stat) minus this
// process's and its waited-for children's (/proc/self/stat). Linux only; null elsewhere.

import {
  cpuSnapshot,
  otherCpus,
  rate,
  makeRandom as makeRandomIn,
  sampleBlocking as sampleBlockingFor,
  sampleAsync as sampleAsyncFor,
  type Rate,
  type Sampler,
} from './sampling.ts';

const makeRandom = (seed: number) => makeRandomIn(seed, BLOCKS);
const sampleBlocking = (st: Sampler, warmMs: number, step: () => void) => sampleBlockingFor(st, warmMs, step, SLICES, SLICE_MS);
const sampleAsync = (st: Sampler, warmMs: number) => sampleAsyncFor(st, warmMs, SLICES, SLICE_MS);

// ---------------------------------------------------------------------------------------
// aioco: thread_pool_submit_aio(pool, thread_pool_preadv, ...) at depth 32.

interface PoolReadSlot {
  st: PoolReadState;
  buf: Uint8Array;
  block: number;
}
interface PoolReadState extends Sampler {
  pool: ThreadPool;
  fd: number;
  rnd: () => number;
  stop: boolean;
  inflight: number;
  bad: string | null;
}

function submitRead(s: PoolReadSlot): void {
  const st = s.st;
  s.block = st.rnd();
  st.inflight++;
  thread_pool_submit_aio(st.pool, thread_pool_preadv, { fd: st.fd, offset: s.block * BLOCK, iov: [s.buf] }, poolReadDone, s);
}

function poolReadDone(opaque: unknown, ret: number): void {
  const s = opaque as PoolReadSlot;
  const st = s.st;
  st.inflight--;
  if (ret !== 0) st.bad ??= `preadv returned ${ret}`;
  else if (s.buf[BLOCK - 1] !== blockByte(s.block)) st.bad ??= `wrong data in block ${s.block}`;
  st.count++;
  if (!st.stop) submitRead(s);
}

function startPoolReads(ctx: AioContext, fd: number): { st: PoolReadState; slots: PoolReadSlot[] } {
  const st: PoolReadState = {
    pool: aio_get_thread_pool(ctx),
    fd,
    rnd: makeRandom(0x9e3779b9),
    stop: false,
    inflight: 0,
    bad: null,
    count: 0,
  };
  const slots: PoolReadSlot[] = [];
  for (let i = 0; i < DEPTH; i++) slots.push({ st, buf: qemu_memalign(4096, BLOCK), block: 0 });
  for (const s of slots) submitRead(s);
  return { st, slots };
}

function finishPoolReads(ctx: AioContext, st: PoolReadState, slots: PoolReadSlot[]): void {
  st.stop = true;
  while (st.inflight > 0) aio_poll(ctx, true);
  for (const s of slots) qemu_vfree(s.buf);
  if (st.bad !== null) fail(`aioco preadv: ${st.bad}`);
}

function benchPoolReadsBlocking(fd: number): Rate {
  const ctx = qemu_get_aio_context();
  const { st, slots } = startPoolReads(ctx, fd);
  const slices = sampleBlocking(st, WARM_MS, () => {
    aio_poll(ctx, true);
  });
  const workers = threadPoolWorkerCount();
  finishPoolReads(ctx, st, slots);
  return rate('aioco.read.poll', 'aioco pool preadv, blocking aio_poll', slices, { workers });
}

async function benchPoolReadsHost(fd: number): Promise<Rate> {
  qemu_init_main_loop();
  const ctx = qemu_get_aio_context();
  const { st, slots } = startPoolReads(ctx, fd);
  const slices = await sampleAsync(st, WARM_MS);
  const workers = threadPoolWorkerCount();
  st.stop = true;
  const deadline = performance.now() + 10_000;
  while (st.inflight > 0) {
    if (performance.now() > deadline) fail('aioco host loop: requests did not finish');
    await new Promise((r) => setTimeout(r, 1));
  }
  for (const s of slots) qemu_vfree(s.buf);
  if (st.bad !== null) fail(`aioco preadv (host loop): ${st.bad}`);
  return rate('aioco.read.host', 'aioco pool preadv, host loop (Node)', slices, { workers });
}

// ---------------------------------------------------------------------------------------
// aioco: thread_pool_nop at depth 1 and 32.

interface NopState extends Sampler {
  pool: ThreadPool;
  stop: boolean;
  inflight: number;
  bad: string | null;
}

function nopDone(opaque: unknown, ret: number): void {
  const st = opaque as NopState;
  st.inflight--;
  if (ret !== 0) st.bad ??= `nop returned ${ret}`;
  st.count++;
  if (!st.stop) {
    st.inflight++;
    thread_pool_submit_aio(st.pool, thread_pool_nop, null, nopDone, st);
  }
}

function benchPoolNop(depth: number): Rate {
  const ctx = qemu_get_aio_context();
  const st: NopState = { pool: aio_get_thread_pool(ctx), stop: false, inflight: 0, bad: null, count: 0 };
  for (let i = 0; i < depth; i++) {
    st.inflight++;
    thread_pool_submit_aio(st.pool, thread_pool_nop, null, nopDone, st);
  }
  const slices = sampleBlocking(st, SHORT_WARM_MS, () => {
    aio_poll(ctx, true);
  });
  const workers = threadPoolWorkerCount();
  st.stop = true;
  while (st.inflight > 0) aio_poll(ctx, true);
  if (st.bad !== null) fail(`aioco nop: ${st.bad}`);
  return rate(`aioco.nop.${depth}`, `aioco pool nop, depth ${depth}, blocking aio_poll`, slices, { workers });
}

// ---------------------------------------------------------------------------------------
// References.

/** Node's fs.read (callback API) at depth 32 on libuv's pool (this process). */
async function benchFsRead(fd: number): Promise<Rate> {
  const st = { count: 0, stop: false, inflight: 0, bad: null as string | null };
  const rnd = makeRandom(0x2545f491);
  const issue = (buf: Buffer) => {
    const block = rnd();
    st.inflight++;
    fs.read(fd, buf, 0, BLOCK, block * BLOCK, (err, n) => {
      st.inflight--;
      if (err !== null) st.bad ??= String(err);
      else if (n !== BLOCK || buf[BLOCK - 1] !== blockByte(block)) st.bad ??= `wrong data in block ${block}`;
      st.count++;
      if (!st.stop) issue(buf);
    });
  };
  for (let i = 0; i < DEPTH; i++) issue(Buffer.allocUnsafe(BLOCK));
  const slices = await sampleAsync(st, SHORT_WARM_MS);
  st.stop = true;
  while (st.inflight > 0) await new Promise((r) => setImmediate(r));
  if (st.bad !== null) fail(`fs.read: ${st.bad}`);
  const size = process.env.UV_THREADPOOL_SIZE ?? '4 (default)';
  return rate('fs.read', `fs.read, libuv pool (UV_THREADPOOL_SIZE ${size})`, slices);
}

/**
 * The same in a child process with UV_USE_IO_URING=1 (libuv reads it when it starts). The
 * child prints its slice rates as JSON on stdout. Plain JS, so it starts fast.
 */
const URING_CHILD = `
const fs = require('node:fs');
const { performance } = require('node:perf_hooks');
const [file, depth, slices, sliceMs, warmMs] = process.argv.slice(1).map((x, i) => (i === 0 ? x : Number(x)));
const BLOCK = 4096, BLOCKS = ${BLOCKS};
const fd = fs.openSync(file, 'r');
let x = 0x2545f491, count = 0, bad = null;
const rnd = () => { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; return (x >>> 0) % BLOCKS; };
let stop = false;
const issue = (buf) => {
  const block = rnd();
  fs.read(fd, buf, 0, BLOCK, block * BLOCK, (err, n) => {
    if (err) bad ??= String(err);
    else if (n !== BLOCK || buf[BLOCK - 1] !== (block % 251) + 1) bad ??= 'wrong data in block ' + block;
    count++;
    if (!stop) issue(buf);
  });
};
for (let i = 0; i < depth; i++) issue(Buffer.allocUnsafe(BLOCK));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  await sleep(warmMs);
  const out = [];
  for (let s = 0; s < slices; s++) {
    const c0 = count, t0 = performance.now();
    await sleep(sliceMs);
    out.push(((count - c0) * 1000) / (performance.now() - t0));
  }
  stop = true;
  process.stdout.write(JSON.stringify({ slices: out, bad }) + '\\n');
  process.exit(0);
})();
`;

function benchFsReadUring(file: string): Rate | string {
  const r = spawnSync(
    process.execPath,
    ['-e', URING_CHILD, file, String(DEPTH), String(SLICES), String(SLICE_MS), String(SHORT_WARM_MS)],
    { env: { ...process.env, UV_USE_IO_URING: '1' }, encoding: 'utf8', timeout: 60_000 },
  );
  if (r.status !== 0) return `child failed: ${r.error?.message ?? r.stderr.trim().split('\n').pop()}`;
  const out = JSON.parse(r.stdout.trim().split('\n').pop() as string) as { slices: number[]; bad: string | null };
  if (out.bad !== null) fail(`fs.read with io_uring: ${out.bad}`);
  return rate('fs.read.uring', 'fs.read, UV_USE_IO_URING=1 (child process)', out.slices);
}

/** One thread calling fs.readSync in a loop (depth 1). */
function benchReadSync(fd: number): Rate {
  const buf = Buffer.allocUnsafe(BLOCK);
  const rnd = makeRandom(0x6a09e667);
  const st = { count: 0 };
  let bad: string | null = null;
  const slices = sampleBlocking(st, SHORT_WARM_MS, () => {
    for (let i = 0; i < 64; i++) {
      const block = rnd();
      const n = fs.readSync(fd, buf, 0, BLOCK, block * BLOCK);
      if (n !== BLOCK || buf[BLOCK - 1] !== blockByte(block)) bad ??= `wrong data in block ${block}`;
    }
    st.count += 64;
  });
  if (bad !== null) fail(`readSync: ${bad}`);
  return rate('readSync', 'fs.readSync loop, one thread', slices);
}

function hasFio(): boolean {
  return spawnSync('which', ['fio'], { encoding: 'utf8' }).status === 0;
}

/** fio's total read IOPS (its own mean over the run, so a single "slice"). */
function benchFio(file: string, id: string, label: string, args: string[]): Rate | string {
  const seconds = Math.max(1, Math.round((SLICES * SLICE_MS) / 1000));
  const r = spawnSync(
    'fio',
    [
      '--name=r',
      `--filename=${file}`,
      '--rw=randread',
      '--bs=4k',
      '--direct=0',
      // fio drops the file's page cache before starting unless told not to.
      '--invalidate=0',
      '--ramp_time=0.3',
      `--runtime=${seconds}`,
      '--time_based',
      '--group_reporting',
      '--output-format=json',
      ...args,
    ],
    { encoding: 'utf8', timeout: 60_000 },
  );
  if (r.status !== 0) return `fio failed: ${(r.stderr || r.stdout).trim().split('\n').pop()}`;
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { read: { iops: number } }[] };
  const iops = j.jobs.reduce((a, job) => a + job.read.iops, 0);
  return rate(id, label, [iops], { note: `fio ${args.join(' ')}` });
}

/** postMessage round trips to one worker that echoes, `depth` messages in flight. */
async function benchPostMessage(depth: number): Promise<Rate> {
  const w = new Worker(
    `const { parentPort } = require('node:worker_threads'); parentPort.on('message', (m) => parentPort.postMessage(m));`,
    { eval: true },
  );
  const st = { count: 0, stop: false, inflight: 0 };
  w.on('message', (m: number) => {
    st.inflight--;
    st.count++;
    if (!st.stop) {
      st.inflight++;
      w.postMessage(m);
    }
  });
  await new Promise<void>((resolve, reject) => {
    w.once('online', resolve);
    w.once('error', reject);
  });
  for (let i = 0; i < depth; i++) {
    st.inflight++;
    w.postMessage(i);
  }
  const slices = await sampleAsync(st, SHORT_WARM_MS);
  st.stop = true;
  await w.terminate();
  return rate(`postMessage.${depth}`, `postMessage round trip to a worker, depth ${depth}`, slices);
}

// ---------------------------------------------------------------------------------------
// QEMU 7.2's C thread pool (measured earlier on this kind of machine; constants).

const QEMU_NOP_1: [number, number] = [35_000, 44_000];
const QEMU_NOP_32: [number, number] = [83_000, 204_000];

// ---------------------------------------------------------------------------------------
// The table.

interface Row {
  figure: string;
  ref: string;
  /** Target on figure / reference (>=). */
  target?: number;
}

const rows: Row[] = [
  { figure: 'aioco.read.poll', ref: 'fs.read.uring', target: 1.0 },
  { figure: 'aioco.read.poll', ref: 'fs.read', target: 1.5 },
  { figure: 'aioco.read.poll', ref: 'readSync' },
  { figure: 'aioco.read.poll', ref: 'fio.uring' },
  { figure: 'aioco.read.poll', ref: 'fio.psync.1' },
  { figure: 'aioco.read.poll', ref: 'fio.psync.4' },
  { figure: 'aioco.read.host', ref: 'fs.read.uring', target: 1.0 },
  { figure: 'aioco.read.host', ref: 'fs.read', target: 1.5 },
  { figure: 'aioco.read.host', ref: 'aioco.read.poll' },
  { figure: 'aioco.nop.1', ref: 'qemu.nop.1' },
  { figure: 'aioco.nop.1', ref: 'postMessage.1' },
  { figure: 'aioco.nop.32', ref: 'qemu.nop.32' },
  { figure: 'aioco.nop.32', ref: 'postMessage.32' },
];

function fmtRate(x: number): string {
  return x >= 1e6 ? `${(x / 1e6).toFixed(2)}M` : `${(x / 1e3).toFixed(1)}k`;
}
function fmtRatio(r: number): string {
  return r >= 10 ? `${r.toFixed(1)}x` : `${r.toFixed(2)}x`;
}
function spread(r: Rate): string {
  return r.slices.length < 2 ? '-' : `${(((Math.max(...r.slices) - Math.min(...r.slices)) / r.median) * 100).toFixed(0)}%`;
}

/** A reference that may be a range (QEMU's constants): low..high. */
interface RefValue {
  label: string;
  lo: number;
  hi: number;
}

export interface ThreadPoolBenchResult {
  judged: number;
  missed: number;
}

/** Runs the thread-pool benchmarks and prints their table; returns the target count. */
export async function runThreadPoolBench(opts: { log?: (msg: string) => void } = {}): Promise<ThreadPoolBenchResult> {
  const log = opts.log ?? (() => {});
  const t0 = Date.now();
  const cpu0 = cpuSnapshot();
  const file = prepareDataFile(log);
  const fd = fs.openSync(file, 'r');
  const m = new Map<string, Rate>();
  const unavailable = new Map<string, string>();
  const put = (id: string, r: Rate | string) => {
    if (typeof r === 'string') unavailable.set(id, r);
    else m.set(id, r);
  };
  try {
    // The aioco figures run back to back: pool workers exit after 10 s idle.
    log('aioco pool preadv, blocking aio_poll (1 s warm-up)');
    put('aioco.read.poll', benchPoolReadsBlocking(fd));
    log('aioco pool nop, depth 1 and 32');
    put('aioco.nop.1', benchPoolNop(1));
    put('aioco.nop.32', benchPoolNop(DEPTH));
    log('aioco pool preadv, host loop (1 s warm-up)');
    put('aioco.read.host', await benchPoolReadsHost(fd));
    log('fs.readSync loop');
    put('readSync', benchReadSync(fd));
    log('fs.read, libuv pool');
    put('fs.read', await benchFsRead(fd));
    log('fs.read, UV_USE_IO_URING=1 child');
    put('fs.read.uring', benchFsReadUring(file));
    if (hasFio()) {
      log('fio io_uring, fio psync');
      put('fio.uring', benchFio(file, 'fio.uring', 'fio io_uring, iodepth 32, 1 job', ['--ioengine=io_uring', `--iodepth=${DEPTH}`]));
      put('fio.psync.1', benchFio(file, 'fio.psync.1', 'fio psync, 1 job', ['--ioengine=psync', '--numjobs=1']));
      put('fio.psync.4', benchFio(file, 'fio.psync.4', 'fio psync, 4 jobs', ['--ioengine=psync', '--numjobs=4']));
    } else {
      for (const id of ['fio.uring', 'fio.psync.1', 'fio.psync.4']) unavailable.set(id, 'fio: not installed');
    }
    log('postMessage round trips');
    put('postMessage.1', await benchPostMessage(1));
    put('postMessage.32', await benchPostMessage(DEPTH));
  } finally {
    fs.closeSync(fd);
  }

  const refValue = (id: string): RefValue | string => {
    if (id === 'qemu.nop.1') return { label: 'QEMU 7.2 C pool, depth 1 (constant)', lo: QEMU_NOP_1[0], hi: QEMU_NOP_1[1] };
    if (id === 'qemu.nop.32') return { label: 'QEMU 7.2 C pool, depth 32 (constant)', lo: QEMU_NOP_32[0], hi: QEMU_NOP_32[1] };
    const r = m.get(id);
    if (r === undefined) return unavailable.get(id) ?? `${id}: not measured`;
    return { label: r.label, lo: r.median, hi: r.median };
  };

  let judged = 0;
  let missed = 0;
  const table: string[][] = [];
  for (const row of rows) {
    const f = m.get(row.figure) as Rate;
    const ref = refValue(row.ref);
    const cells = [f.label, fmtRate(f.median), spread(f), f.workers !== undefined ? String(f.workers) : '-'];
    if (typeof ref === 'string') {
      table.push([...cells, ref, '-', '-', '-', 'n/a']);
      continue;
    }
    const refStr = ref.lo === ref.hi ? fmtRate(ref.lo) : `${fmtRate(ref.lo)}-${fmtRate(ref.hi)}`;
    const ratio = ref.lo === ref.hi ? fmtRatio(f.median / ref.lo) : `${fmtRatio(f.median / ref.hi)}-${fmtRatio(f.median / ref.lo)}`;
    let verdict = 'info';
    if (row.target !== undefined) {
      judged++;
      const ok = f.median / ref.lo >= row.target;
      if (!ok) missed++;
      verdict = ok ? 'PASS' : 'MISS';
    }
    table.push([...cells, ref.label, refStr, ratio, row.target !== undefined ? `>= ${fmtRatio(row.target)}` : '-', verdict]);
  }

  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  console.log(
    `\naioco thread-pool benchmarks: Node ${process.version}, ${cpu} x${os.cpus().length}, 4 KiB random preads ` +
      `from a 1 GiB file in page cache at depth ${DEPTH}; median of ${SLICES} x ${SLICE_MS} ms slices, ` +
      `${((Date.now() - t0) / 1000).toFixed(0)} s`,
  );
  const others = otherCpus(cpu0, cpuSnapshot());
  const ncpu = os.cpus().length;
  if (others !== null) {
    console.log(
      `other processes used ${others.toFixed(2)} of ${ncpu} CPUs on average during the run` +
        (others > 0.25 ? ' -- BUSY MACHINE: these figures are distorted (ratios less so: figures and references share it)' : ''),
    );
  }
  console.log(
    'ops/s = median slice rate; spread = (max - min) / median; workers = live pool workers at the end of the figure;\n' +
      'ratio = figure / reference (a range for QEMU\'s constant ranges)\n',
  );
  console.log(
    formatTable(['benchmark', 'ops/s', 'spread', 'workers', 'reference', 'ref ops/s', 'ratio', 'target', 'result'], table),
  );
  console.log('\nreferences:');
  const refIds = ['fs.read', 'fs.read.uring', 'readSync', 'fio.uring', 'fio.psync.1', 'fio.psync.4', 'postMessage.1', 'postMessage.32'];
  console.log(
    formatTable(
      ['reference', 'ops/s', 'spread', 'how'],
      refIds.map((id) => {
        const r = m.get(id);
        if (r === undefined) return [id, '-', '-', unavailable.get(id) ?? 'not measured'];
        return [r.label, fmtRate(r.median), spread(r), r.note ?? ''];
      }),
    ),
  );
  if (process.env.BENCH_VERBOSE === '1') {
    console.log('\nops/s of each slice:');
    for (const r of m.values()) console.log(`  ${r.id.padEnd(16)} ${r.slices.map(fmtRate).join(' ')}`);
  }
  console.log(`\nthread pool: ${judged - missed}/${judged} targets met${missed ? `, ${missed} MISS` : ''}`);
  return { judged, missed };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  await runThreadPoolBench({
    ...(process.env.BENCH_QUIET === '1' ? {} : { log: (msg: string) => process.stderr.write(`  ${msg}\n`) }),
  });
}
