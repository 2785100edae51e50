/**
 * qcow2 benchmarks: `aioco-img` against QEMU 7.2's `qemu-img` on the same files in the same
 * run (issue 5's targets):
 * - `bench` (4 KiB requests, depth 32, `-t writeback`, qemu-img with `-i threads`) reads and
 *   writes on a fully allocated 1 GiB qcow2 (target: at least 0.8x qemu-img), and writes into an
 *   empty 1 GiB qcow2, so every request allocates a cluster (target: at least 0.5x);
 * - `convert` of 1 GiB qcow2 -> raw and raw -> qcow2 (target: at most 1.5x qemu-img's time).
 *
 * Part of `npm run bench` (BENCH_QCOW2=0 skips it); alone: `node --import tsx bench/qcow2.ts`.
 *
 * Both tools' `bench` are sequential with a step (-S): the step here is 104729 blocks of 4 KiB
 * (a prime, so the offsets visit every block of the 1 GiB image once per 262144 requests, each
 * ~409 MiB from the last: no locality, as with random offsets). A bench figure is the request
 * count over the tool's own "Run completed in" time (start-up excluded), median of
 * BENCH_QCOW2_RUNS (default 3) runs, tools alternating. convert is timed from spawn to exit, so
 * it includes each tool's start-up (aioco-img's, with tsx, is about 1 s; it is shown apart).
 *
 * Files (under .bench-data/): the thread-pool benchmark's patterned 1 GiB raw file, and
 * qcow2-alloc-1g.qcow2 made from it by qemu-img convert once. Allocating-write runs and convert
 * targets are fresh files each run, deleted afterwards.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { formatTable, median } from './harness.ts';
import { BLOCKS, FILE_SIZE, createFile, dataDir, envNumber, readFileLooksRight, readFilePath, warmPageCache } from './data-file.ts';

const QEMU_IMG = '/usr/bin/qemu-img';
const AIOCO_IMG = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'aioco-img.mjs');
const STEP_BLOCKS = 104729;
const DEPTH = 32;

interface Figure {
  id: string;
  label: string;
  /** ops/s (bench) or seconds (convert), per run. */
  runs: number[];
}

type Tool = 'qemu' | 'aioco';

function toolCmd(tool: Tool, args: string[]): [string, string[]] {
  return tool === 'qemu' ? [QEMU_IMG, args] : [process.execPath, [AIOCO_IMG, ...args]];
}

function run(tool: Tool, args: string[]): { code: number | null; out: string; ms: number } {
  const [cmd, argv] = toolCmd(tool, args);
  const t0 = performance.now();
  const p = spawnSync(cmd, argv, { encoding: 'utf8', timeout: 600_000, maxBuffer: 1 << 24 });
  const ms = performance.now() - t0;
  return { code: p.status, out: `${p.stdout ?? ''}${p.stderr ?? ''}`, ms };
}

function mustRun(tool: Tool, args: string[]): { out: string; ms: number } {
  const r = run(tool, args);
  if (r.code !== 0) throw new Error(`bench: ${tool}-img ${args.join(' ')} exited ${r.code}: ${r.out}`);
  return r;
}

/** Requests per second of one `bench` run, from the tool's own "Run completed in" line. */
function benchRate(tool: Tool, file: string, count: number, write: boolean): number {
  const args = ['bench', '-f', 'qcow2', '-t', 'writeback', '-d', String(DEPTH), '-c', String(count), '-s', '4096', '-S', String(STEP_BLOCKS * 4096)];
  if (tool === 'qemu') args.push('-i', 'threads');
  if (write) args.push('-w', '--pattern=90');
  args.push(file);
  const r = mustRun(tool, args);
  const m = /Run completed in ([0-9.]+) seconds/.exec(r.out);
  if (!m) throw new Error(`bench: no "Run completed in" from ${tool}-img: ${r.out}`);
  return count / Number(m[1]);
}

function allocatedImage(raw: string): string {
  const img = path.join(dataDir(), 'qcow2-alloc-1g.qcow2');
  const ok =
    fs.existsSync(img) &&
    (() => {
      const r = run('qemu', ['check', img]);
      return r.code === 0 && /16384\/16384 = 100\.00% allocated/.test(r.out);
    })();
  if (!ok) {
    fs.rmSync(img, { force: true });
    mustRun('qemu', ['convert', '-f', 'raw', '-O', 'qcow2', raw, img]);
  }
  return img;
}

export async function runQcow2Bench(opts: { log?: (msg: string) => void } = {}): Promise<void> {
  const log = opts.log ?? (() => {});
  if (!fs.existsSync(QEMU_IMG)) {
    console.log(`\nqcow2 benchmarks skipped: ${QEMU_IMG} is absent (apt-get install qemu-utils)`);
    return;
  }
  const runs = Math.round(envNumber('BENCH_QCOW2_RUNS', 3));
  const count = Math.round(envNumber('BENCH_QCOW2_COUNT', 200_000));
  const allocCount = Math.round(envNumber('BENCH_QCOW2_ALLOC_COUNT', 16_384));
  fs.mkdirSync(dataDir(), { recursive: true });
  const raw = readFilePath();
  if (!readFileLooksRight(raw)) createFile(raw, null, log);
  log('preparing the allocated qcow2 image');
  const alloc = allocatedImage(raw);
  const tmp = fs.mkdtempSync(path.join(dataDir(), 'qcow2-run-'));
  const figures = new Map<string, Figure>();
  const add = (id: string, label: string, v: number) => {
    const f = figures.get(id) ?? { id, label, runs: [] };
    f.runs.push(v);
    figures.set(id, f);
  };
  try {
    warmPageCache(raw);
    warmPageCache(alloc);
    const startup = run('aioco', ['--version']);
    if (startup.code !== 0) throw new Error(`bench: aioco-img --version exited ${startup.code}: ${startup.out}`);
    for (let i = 0; i < runs; i++) {
      for (const tool of ['qemu', 'aioco'] as const) {
        log(`run ${i + 1}/${runs}: ${tool}-img bench on allocated clusters`);
        add(`${tool}.read`, `${tool}-img bench, allocated, reads`, benchRate(tool, alloc, count, false));
        add(`${tool}.write`, `${tool}-img bench, allocated, writes`, benchRate(tool, alloc, Math.round(count / 4), true));
        const empty = path.join(tmp, `empty-${tool}.qcow2`);
        mustRun('qemu', ['create', '-q', '-f', 'qcow2', empty, String(FILE_SIZE)]);
        log(`run ${i + 1}/${runs}: ${tool}-img bench, allocating writes`);
        add(`${tool}.alloc`, `${tool}-img bench, allocating writes`, benchRate(tool, empty, allocCount, true));
        fs.rmSync(empty, { force: true });
        const outRaw = path.join(tmp, `out-${tool}.raw`);
        log(`run ${i + 1}/${runs}: ${tool}-img convert qcow2 -> raw`);
        add(`${tool}.q2r`, `${tool}-img convert qcow2 -> raw`, mustRun(tool, ['convert', '-f', 'qcow2', '-O', 'raw', alloc, outRaw]).ms / 1000);
        fs.rmSync(outRaw, { force: true });
        const outQ = path.join(tmp, `out-${tool}.qcow2`);
        log(`run ${i + 1}/${runs}: ${tool}-img convert raw -> qcow2`);
        add(`${tool}.r2q`, `${tool}-img convert raw -> qcow2`, mustRun(tool, ['convert', '-f', 'raw', '-O', 'qcow2', raw, outQ]).ms / 1000);
        fs.rmSync(outQ, { force: true });
      }
    }
    const rows: string[][] = [];
    const row = (id: string, unit: 'ops/s' | 's', target: number, kind: 'min' | 'max') => {
      const a = median(figures.get(`aioco.${id}`)!.runs);
      const q = median(figures.get(`qemu.${id}`)!.runs);
      const ratio = a / q;
      const ok = kind === 'min' ? ratio >= target : ratio <= target;
      const fmt = (v: number) => (unit === 's' ? `${v.toFixed(2)} s` : `${(v / 1000).toFixed(1)}k/s`);
      rows.push([figures.get(`aioco.${id}`)!.label.replace('aioco-img ', ''), fmt(a), fmt(q), `${ratio.toFixed(2)}x`, `${kind === 'min' ? '>=' : '<='} ${target}x`, ok ? 'PASS' : 'MISS']);
    };
    row('read', 'ops/s', 0.8, 'min');
    row('write', 'ops/s', 0.8, 'min');
    row('alloc', 'ops/s', 0.5, 'min');
    row('q2r', 's', 1.5, 'max');
    row('r2q', 's', 1.5, 'max');
    console.log(`\nqcow2: aioco-img vs qemu-img 7.2 (-t writeback; bench: depth ${DEPTH}, 4 KiB, step ${STEP_BLOCKS} blocks of ${BLOCKS}, qemu-img -i threads), median of ${runs} runs`);
    console.log(formatTable(['benchmark', 'aioco-img', 'qemu-img', 'ratio', 'target', 'result'], rows));
    console.log(`aioco-img start-up (tsx, included in the convert times): ${(startup.ms / 1000).toFixed(2)} s`);
    if (process.env.BENCH_VERBOSE === '1') {
      for (const f of figures.values()) console.log(`  ${f.id.padEnd(12)} ${f.runs.map((v) => v.toFixed(2)).join(' ')}`);
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  await runQcow2Bench({ log: (msg) => process.stderr.write(`  ${msg}\n`) });
}
