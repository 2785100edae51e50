/**
 * Block-layer benchmarks: 4 KiB random reads and writes at queue depth 1 and 32 through
 * `blk_aio_preadv`/`blk_aio_pwritev` on a 1 GiB raw file in the page cache (the `file` driver
 * alone, and `raw` over `file` as qemu-img opens it) and on `null-co`, beside
 * `qemu-img bench` (QEMU 7.2's C block layer, `-t writeback`, `-i threads` and `-i io_uring`)
 * on the same files in the same run.
 *
 * Part of `npm run bench` (BENCH_BLOCK=0 skips it); alone: `node --import tsx bench/block.ts`.
 *
 * Files (under .bench-data/, created once): reads use the thread-pool benchmark's 1 GiB file
 * (every 4 KiB block filled with one byte derived from its index, so each read is checked;
 * BENCH_TP_FILE overrides it), writes a second 1 GiB file (BENCH_BLOCK_WFILE) so the read
 * file stays intact. Both are read through once per run to keep them in the page cache (only
 * when a figure uses them: null-co figures alone, e.g. BENCH_BLOCK_ONLY='^null', start at once).
 *
 * aioco figures run continuously (the pipeline is never drained between slices): a warm-up,
 * then BENCH_BLOCK_SLICES (default 3) slices of BENCH_BLOCK_SLICE_MS (default 700) ms, driven
 * by a blocking `aio_poll(ctx, true)` loop, and for a few figures by Node's event loop (the
 * host loop, `qemu_init_main_loop`); the figure is the median slice rate. Offsets are random
 * 4 KiB blocks (xorshift32).
 *
 * qemu-img bench has no random mode: it starts at offset 0 and adds a step (-S) after each
 * request, wrapping at the image's end. The step here is 104729 blocks (a prime, so the
 * offsets visit every block once per 262144 requests, each ~409 MiB from the last): a
 * strided walk, not random, but with no locality either. Each qemu-img figure is one short
 * calibration run, then BENCH_BLOCK_SLICES runs sized to about one slice; the rate is the
 * request count over qemu-img's own "Run completed in" time (process start-up excluded).
 *
 * Page-cache writes are slow on some hosts whatever does them (ext4 on a virtual disk here:
 * fio psync randwrite ~9k/s), so the write rows mostly measure the host; compare their ratios.
 * BENCH_BLOCK_ONLY=<regex> runs only the figures whose ids match (file.r.32, raw.w.1,
 * null.r.32.host, qemu.threads.r.32, qemu.io_uring.w.1, qemu.null.r.32...), e.g. for
 * `node --cpu-prof`; BENCH_VERBOSE=1 prints every slice.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import {
  BDRV_O_RDWR,
  QEMUIOVector,
  aio_poll,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_bs,
  blk_get_aio_context,
  blk_unref,
  blk_new_open,
  qemu_blockalign,
  qemu_init_main_loop,
  qemu_iovec_init_buf,
  qemu_vfree,
  type BlockBackend,
} from '../src/index.ts';
import { threadPoolWorkerCount } from '../src/aio/thread-pool.ts';
import '../examples/drivers/file.ts';
import '../examples/drivers/raw.ts';
import '../examples/drivers/null.ts';
import { formatTable } from './harness.ts';
import {
  BLOCK,
  BLOCKS,
  DEPTH,
  FILE_SIZE,
  blockByte,
  createFile,
  dataDir,
  envNumber,
  fail,
  readFileLooksRight,
  readFilePath,
  warmPageCache,
} from './data-file.ts';

/** qemu-img bench's step, in blocks (prime: a permutation of the 2^18 blocks). */
const QEMU_STEP_BLOCKS = 104729;
/** Byte aioco and qemu-img write. */
const WRITE_BYTE = 0x5a;

const SLICES = Math.round(envNumber('BENCH_BLOCK_SLICES', 3));
const SLICE_MS = envNumber('BENCH_BLOCK_SLICE_MS', 700);
const WARM_MS = 300;

function writeFilePath(): string {
  return process.env.BENCH_BLOCK_WFILE ?? path.join(dataDir(), 'block-write-1g.bin');
}

function prepareFiles(log: (s: string) => void): { rfile: string; wfile: string } {
  const rfile = readFilePath();
  if (!readFileLooksRight(rfile)) createFile(rfile, null, log);
  const wfile = writeFilePath();
  let ok = false;
  try {
    ok = fs.statSync(wfile).size === FILE_SIZE;
  } catch {
    ok = false;
  }
  if (!ok) createFile(wfile, WRITE_BYTE, log);
  const t0 = performance.now();
  warmPageCache(rfile);
  warmPageCache(wfile);
  log(`page cache warmed (${((performance.now() - t0) / 1000).toFixed(2)} s for 2 GiB)`);
  return { rfile, wfile };
}

// ---------------------------------------------------------------------------------------
// How busy the rest of the machine was (as bench/thread-pool.ts): CPU time of all
// processes minus this process's and its waited-for children's. Linux only.

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
// aioco: a pipeline of `depth` blk_aio_preadv/pwritev requests on random 4 KiB blocks.

type Target = 'file' | 'raw' | 'null';

interface Slot {
  st: PipeState;
  buf: Uint8Array;
  qiov: QEMUIOVector;
  block: number;
}

interface PipeState extends Sampler {
  blk: BlockBackend;
  write: boolean;
  /** Check read data (patterned file only). */
  verify: boolean;
  rnd: () => number;
  stop: boolean;
  inflight: number;
  bad: string | null;
}

function submit(s: Slot): void {
  const st = s.st;
  s.block = st.rnd();
  st.inflight++;
  if (st.write) blk_aio_pwritev(st.blk, s.block * BLOCK, s.qiov, 0, done, s);
  else blk_aio_preadv(st.blk, s.block * BLOCK, s.qiov, 0, done, s);
}

function done(opaque: unknown, ret: number): void {
  const s = opaque as Slot;
  const st = s.st;
  st.inflight--;
  if (ret !== 0) st.bad ??= `${st.write ? 'write' : 'read'} of block ${s.block} returned ${ret}`;
  else if (st.verify && s.buf[BLOCK - 1] !== blockByte(s.block)) st.bad ??= `wrong data in block ${s.block}`;
  st.count++;
  if (!st.stop) submit(s);
}

function openTarget(target: Target, write: boolean, files: { rfile: string; wfile: string }): BlockBackend {
  const flags = write ? BDRV_O_RDWR : 0;
  const file = write ? files.wfile : files.rfile;
  switch (target) {
    case 'file':
      return blk_new_open(file, null, { driver: 'file' }, flags);
    case 'raw':
      return blk_new_open(file, null, { driver: 'raw', 'file.driver': 'file' }, flags);
    case 'null':
      // By driver name: a bare 'null-co://' filename would probe raw on top (QEMU does too).
      return blk_new_open(null, null, { driver: 'null-co' }, flags);
  }
}

const TARGET_LABEL: Record<Target, string> = { file: 'file', raw: 'raw over file', null: 'null-co' };

function pipeLabel(target: Target, write: boolean, depth: number, host: boolean): string {
  return `aioco ${TARGET_LABEL[target]}, ${write ? 'write' : 'read'}, QD${depth}, ${host ? 'host loop' : 'aio_poll'}`;
}

function startPipe(target: Target, write: boolean, depth: number, files: { rfile: string; wfile: string }) {
  const blk = openTarget(target, write, files);
  const st: PipeState = {
    blk,
    write,
    verify: !write && target !== 'null',
    rnd: makeRandom(0x9e3779b9 ^ depth ^ (write ? 0x55 : 0)),
    stop: false,
    inflight: 0,
    bad: null,
    count: 0,
  };
  const slots: Slot[] = [];
  for (let i = 0; i < depth; i++) {
    const buf = qemu_blockalign(blk_bs(blk), BLOCK);
    buf.fill(WRITE_BYTE);
    const qiov = new QEMUIOVector();
    qemu_iovec_init_buf(qiov, buf, BLOCK);
    slots.push({ st, buf, qiov, block: 0 });
  }
  for (const s of slots) submit(s);
  return { st, slots };
}

function finishPipe(st: PipeState, slots: Slot[], what: string): void {
  const ctx = blk_get_aio_context(st.blk);
  st.stop = true;
  while (st.inflight > 0) aio_poll(ctx, true);
  blk_unref(st.blk);
  for (const s of slots) qemu_vfree(s.buf);
  if (st.bad !== null) fail(`${what}: ${st.bad}`);
}

function benchPipeBlocking(target: Target, write: boolean, depth: number, files: { rfile: string; wfile: string }): Rate {
  const { st, slots } = startPipe(target, write, depth, files);
  const ctx = blk_get_aio_context(st.blk);
  const slices = sampleBlocking(st, WARM_MS, () => {
    aio_poll(ctx, true);
  });
  const workers = threadPoolWorkerCount();
  const label = pipeLabel(target, write, depth, false);
  finishPipe(st, slots, label);
  return rate(`${target}.${write ? 'w' : 'r'}.${depth}`, label, slices, { workers });
}

async function benchPipeHost(target: Target, write: boolean, depth: number, files: { rfile: string; wfile: string }): Promise<Rate> {
  qemu_init_main_loop();
  const { st, slots } = startPipe(target, write, depth, files);
  const slices = await sampleAsync(st, WARM_MS);
  const workers = threadPoolWorkerCount();
  const label = pipeLabel(target, write, depth, true);
  st.stop = true;
  const deadline = performance.now() + 10_000;
  while (st.inflight > 0) {
    if (performance.now() > deadline) fail(`${label}: requests did not finish`);
    await new Promise((r) => setTimeout(r, 1));
  }
  finishPipe(st, slots, label);
  return rate(`${target}.${write ? 'w' : 'r'}.${depth}.host`, label, slices, { workers });
}

// ---------------------------------------------------------------------------------------
// qemu-img bench.

function hasQemuImg(): boolean {
  return spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).status === 0;
}

/** One qemu-img bench run: requests per second by its own clock, or an error string. */
function qemuImgRun(args: string[], count: number): number | string {
  const r = spawnSync('qemu-img', ['bench', '-c', String(count), ...args], { encoding: 'utf8', timeout: 60_000 });
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (r.status !== 0 || m === null) return `qemu-img failed: ${r.error?.message ?? out.trim().split('\n').pop()}`;
  const secs = Number(m[1]);
  // qemu-img prints milliseconds resolution: keep runs well above it.
  return count / Math.max(secs, 0.001);
}

function benchQemuImg(id: string, label: string, args: string[]): Rate | string {
  // Calibration (also warms up): about 60 ms at 300k/s, 1.5 s at 13k/s.
  const calib = qemuImgRun(args, 20_000);
  if (typeof calib === 'string') return calib;
  const count = Math.max(5_000, Math.round((calib * SLICE_MS) / 1000));
  const slices: number[] = [];
  for (let s = 0; s < SLICES; s++) {
    const r = qemuImgRun(args, count);
    if (typeof r === 'string') return r;
    slices.push(r);
  }
  return rate(id, label, slices, { note: `qemu-img bench -c ${count} ${args.join(' ')}` });
}

function qemuImgArgs(kind: 'threads' | 'io_uring' | 'null', write: boolean, depth: number, files: { rfile: string; wfile: string }): string[] {
  const common = ['-d', String(depth), '-s', String(BLOCK), '-S', String(QEMU_STEP_BLOCKS * BLOCK)];
  const w = write ? ['-w', `--pattern=${WRITE_BYTE}`] : [];
  if (kind === 'null') return [...common, ...w, '-f', 'null-co', 'null-co://'];
  return [...common, ...w, '-f', 'raw', '-t', 'writeback', '-i', kind, write ? files.wfile : files.rfile];
}

// ---------------------------------------------------------------------------------------
// The table.

interface Row {
  figure: string;
  ref: string;
  /** Target on figure / reference (>=). */
  target?: number;
}

/** Absolute targets (requests per second), judged without a reference. */
const NULL_TARGET = 1e6;

function buildRows(): Row[] {
  const rows: Row[] = [];
  for (const rw of ['r', 'w'] as const) {
    for (const depth of [1, DEPTH]) {
      const judged = depth === DEPTH ? 1.0 : undefined;
      for (const t of ['file', 'raw'] as const) {
        rows.push({ figure: `${t}.${rw}.${depth}`, ref: `qemu.threads.${rw}.${depth}`, ...(judged !== undefined ? { target: judged } : {}) });
        rows.push({ figure: `${t}.${rw}.${depth}`, ref: `qemu.io_uring.${rw}.${depth}` });
      }
    }
  }
  rows.push({ figure: 'file.r.32.host', ref: 'qemu.threads.r.32', target: 1.0 });
  rows.push({ figure: 'file.r.32.host', ref: 'file.r.32' });
  for (const rw of ['r', 'w'] as const) {
    for (const depth of [1, DEPTH]) {
      rows.push({ figure: `null.${rw}.${depth}`, ref: '1M/s', ...(depth === DEPTH ? { target: 1.0 } : {}) });
      rows.push({ figure: `null.${rw}.${depth}`, ref: `qemu.null.${rw}.${depth}` });
    }
  }
  rows.push({ figure: 'null.r.32.host', ref: '1M/s' });
  return rows;
}

function fmtRate(x: number): string {
  return x >= 1e6 ? `${(x / 1e6).toFixed(2)}M` : `${(x / 1e3).toFixed(1)}k`;
}
function fmtRatio(r: number): string {
  return r >= 10 ? `${r.toFixed(1)}x` : `${r.toFixed(2)}x`;
}
function spread(r: Rate): string {
  return r.slices.length < 2 ? '-' : `${(((Math.max(...r.slices) - Math.min(...r.slices)) / r.median) * 100).toFixed(0)}%`;
}

export interface BlockBenchResult {
  judged: number;
  missed: number;
}

/** Runs the block-layer benchmarks and prints their table; returns the target count. */
export async function runBlockBench(opts: { log?: (msg: string) => void } = {}): Promise<BlockBenchResult> {
  const log = opts.log ?? (() => {});
  const t0 = Date.now();
  const cpu0 = cpuSnapshot();
  // The 1 GiB files only when a figure uses them: null-co figures alone start at once.
  let prepared: { rfile: string; wfile: string } | null = null;
  const filesFor = (needed: boolean) => (needed ? (prepared ??= prepareFiles(log)) : { rfile: '', wfile: '' });
  const m = new Map<string, Rate>();
  const unavailable = new Map<string, string>();
  const put = (id: string, r: Rate | string) => {
    if (typeof r === 'string') unavailable.set(id, r);
    else m.set(id, r);
  };

  const only = process.env.BENCH_BLOCK_ONLY !== undefined ? new RegExp(process.env.BENCH_BLOCK_ONLY) : null;
  const wanted = (id: string) => only === null || only.test(id);

  // aioco, blocking aio_poll first (pool workers stay warm back to back), then the host loop.
  for (const target of ['file', 'raw', 'null'] as const) {
    for (const write of [false, true]) {
      for (const depth of [1, DEPTH]) {
        if (!wanted(`${target}.${write ? 'w' : 'r'}.${depth}`)) continue;
        const r = benchPipeBlocking(target, write, depth, filesFor(target !== 'null'));
        log(`${r.label}: ${fmtRate(r.median)}/s`);
        put(r.id, r);
      }
    }
  }
  for (const target of ['file', 'null'] as const) {
    if (!wanted(`${target}.r.${DEPTH}.host`)) continue;
    const r = await benchPipeHost(target, false, DEPTH, filesFor(target !== 'null'));
    log(`${r.label}: ${fmtRate(r.median)}/s`);
    put(r.id, r);
  }

  // qemu-img bench on the same files.
  const qemuIds: string[] = [];
  if (hasQemuImg()) {
    for (const kind of ['threads', 'io_uring', 'null'] as const) {
      for (const write of [false, true]) {
        for (const depth of [1, DEPTH]) {
          const id = `qemu.${kind}.${write ? 'w' : 'r'}.${depth}`;
          if (!wanted(id)) continue;
          const what = kind === 'null' ? 'null-co' : `-f raw -t writeback -i ${kind}`;
          const label = `qemu-img bench ${what}, ${write ? 'write' : 'read'}, QD${depth}`;
          const r = benchQemuImg(id, label, qemuImgArgs(kind, write, depth, filesFor(kind !== 'null')));
          log(`${label}: ${typeof r === 'string' ? r : `${fmtRate(r.median)}/s`}`);
          put(id, r);
          qemuIds.push(id);
        }
      }
    }
  } else {
    for (const kind of ['threads', 'io_uring', 'null'])
      for (const rw of ['r', 'w']) for (const d of [1, DEPTH]) unavailable.set(`qemu.${kind}.${rw}.${d}`, 'qemu-img: not installed');
  }

  let judged = 0;
  let missed = 0;
  const table: string[][] = [];
  for (const row of buildRows()) {
    const f = m.get(row.figure);
    if (f === undefined) continue; // left out by BENCH_BLOCK_ONLY
    const cells = [f.label, fmtRate(f.median), spread(f), f.workers !== undefined ? String(f.workers) : '-'];
    let refLabel: string;
    let refRate: number;
    if (row.ref === '1M/s') {
      refLabel = 'target: 1 million requests/s';
      refRate = NULL_TARGET;
    } else {
      const r = m.get(row.ref);
      if (r === undefined) {
        table.push([...cells, unavailable.get(row.ref) ?? `${row.ref}: not measured`, '-', '-', '-', 'n/a']);
        continue;
      }
      refLabel = r.label;
      refRate = r.median;
    }
    const ratio = f.median / refRate;
    let verdict = 'info';
    if (row.target !== undefined) {
      judged++;
      const ok = ratio >= row.target;
      if (!ok) missed++;
      verdict = ok ? 'PASS' : 'MISS';
    }
    table.push([...cells, refLabel, fmtRate(refRate), fmtRatio(ratio), row.target !== undefined ? `>= ${fmtRatio(row.target)}` : '-', verdict]);
  }

  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  console.log(
    `\naioco block-layer benchmarks: Node ${process.version}, ${cpu} x${os.cpus().length}, 4 KiB requests through ` +
      `blk_aio_preadv/pwritev on a 1 GiB raw file in page cache and on null-co; median of ${SLICES} x ${SLICE_MS} ms ` +
      `slices, ${((Date.now() - t0) / 1000).toFixed(0)} s`,
  );
  const others = otherCpus(cpu0, cpuSnapshot());
  if (others !== null) {
    console.log(
      `other processes used ${others.toFixed(2)} of ${os.cpus().length} CPUs on average during the run` +
        (others > 0.25 ? ' -- BUSY MACHINE: these figures are distorted (ratios less so: figures and references share it)' : ''),
    );
  }
  console.log(
    'ops/s = median slice rate; spread = (max - min) / median; workers = live pool workers at the end of the figure;\n' +
      'ratio = figure / reference. aioco offsets are random 4 KiB blocks; qemu-img bench has no random mode and\n' +
      `walks the file in steps of ${QEMU_STEP_BLOCKS} blocks (wrapping), which has no locality either.\n`,
  );
  console.log(formatTable(['benchmark', 'ops/s', 'spread', 'workers', 'reference', 'ref ops/s', 'ratio', 'target', 'result'], table));
  console.log('\nreferences:');
  console.log(
    formatTable(
      ['reference', 'ops/s', 'spread', 'how'],
      qemuIds.map((id) => {
        const r = m.get(id);
        if (r === undefined) return [id, '-', '-', unavailable.get(id) ?? 'not measured'];
        return [r.label, fmtRate(r.median), spread(r), r.note ?? ''];
      }),
    ),
  );
  if (process.env.BENCH_VERBOSE === '1') {
    console.log('\nops/s of each slice:');
    for (const r of m.values()) console.log(`  ${r.id.padEnd(18)} ${r.slices.map(fmtRate).join(' ')}`);
  }
  console.log(`\nblock layer: ${judged - missed}/${judged} targets met${missed ? `, ${missed} MISS` : ''}`);
  return { judged, missed };
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  await runBlockBench({
    ...(process.env.BENCH_QUIET === '1' ? {} : { log: (msg: string) => process.stderr.write(`  ${msg}\n`) }),
  });
}
