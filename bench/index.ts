/**
 * aioco's core benchmarks: `npm run bench` (node --expose-gc --import tsx bench/index.ts).
 *
 * Every figure is divided by a reference measured in the same process run, mostly the raw
 * `gen.next()` round trip, and compared with a target ratio. QEMU 7.2's C figures are shown
 * for context only. The process exits 0 even when a target is missed (the table says MISS).
 *
 * Environment: BENCH_SCALE (default 1) scales every case's operation count, BENCH_ROUNDS
 * (default 15) sets the number of timed runs per case, BENCH_QUIET=1 hides progress,
 * BENCH_VERBOSE=1 also prints every run's ns/op. The thread-pool section follows
 * (bench/thread-pool.ts, ~45 s; BENCH_THREAD_POOL=0 skips it), then the block-layer section
 * (bench/block.ts, ~80 s; BENCH_BLOCK=0 skips it), then qcow2 against qemu-img (bench/qcow2.ts;
 * BENCH_QCOW2=0 skips it).
 */
import os from 'node:os';
import { coroutineCases } from './coroutine.ts';
import { bhCases } from './bh.ts';
import { evaluate, fmtNs, formatResults, runCases, type Check } from './harness.ts';
import { runThreadPoolBench } from './thread-pool.ts';
import { runBlockBench } from './block.ts';
import { runQcow2Bench } from './qcow2.ts';

const checks: Check[] = [
  // The references themselves, against the base unit.
  { id: 'await', ref: 'gen.next' },
  { id: 'async.cost', ref: 'gen.next' },
  { id: 'queueMicrotask', ref: 'gen.next' },
  { id: 'setImmediate', ref: 'gen.next' },
  { id: 'effection.action', ref: 'gen.next' },
  { id: 'effection.spawn', ref: 'gen.next' },
  // QEMU's /perf/* scenarios.
  { id: 'co.lifecycle', ref: 'gen.next', qemuNs: 110 },
  { id: 'co.nesting', ref: 'gen.next' },
  { id: 'co.yield', ref: 'gen.next', target: { kind: 'max', value: 2.5 }, qemuNs: 75 },
  { id: 'co.cost', ref: 'gen.next', target: { kind: 'max', value: 7 }, qemuNs: 202 },
  { id: 'co.cost', ref: 'async.cost', label: '  same, vs async/await (>=2x faster)', target: { kind: 'max', value: 0.5 } },
  // The event loop.
  { id: 'bh.schedule', ref: 'gen.next', target: { kind: 'max', value: 4 }, qemuNs: 91 },
  { id: 'co.schedule', ref: 'gen.next', target: { kind: 'max', value: 9 }, qemuNs: 270 },
];

function envNumber(name: string, dflt: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return dflt;
  const x = Number(v);
  if (!Number.isFinite(x) || x <= 0) throw new Error(`bench: ${name} must be a positive number`);
  return x;
}

async function main(): Promise<void> {
  const quiet = process.env.BENCH_QUIET === '1';
  if (typeof globalThis.gc !== 'function') {
    process.stderr.write('bench: run with --expose-gc (npm run bench) for steadier figures\n');
  }
  const cases = [...coroutineCases(), ...bhCases()];
  const t0 = Date.now();
  const m = await runCases(cases, {
    scale: envNumber('BENCH_SCALE', 1),
    rounds: Math.round(envNumber('BENCH_ROUNDS', 15)),
    ...(quiet ? {} : { log: (msg: string) => process.stderr.write(`  ${msg}\n`) }),
  });
  const results = evaluate(checks, m);
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  console.log(
    `aioco core benchmarks: Node ${process.version}, ${cpu} x${os.cpus().length}, ` +
      `median of ${m.get('gen.next')?.samples.length} runs, ${((Date.now() - t0) / 1000).toFixed(0)} s`,
  );
  console.log(
    'ns/op = median over the runs; ratio = ns/op / reference ns/op (same process), judged against the target;\n' +
      'spread = (max - min) / median; min ratio = fastest run / fastest reference run (a cross-check on a busy\n' +
      'machine, not judged); vs C = ns/op / QEMU C ns\n',
  );
  console.log(formatResults(results));
  if (process.env.BENCH_VERBOSE === '1') {
    console.log('\nns/op of each run:');
    for (const x of m.values()) console.log(`  ${x.id.padEnd(18)} ${x.samples.map(fmtNs).join(' ')}`);
  }
  const missed = results.filter((r) => r.verdict === 'MISS').length;
  const judged = results.filter((r) => r.verdict !== '').length;
  console.log(`\n${judged - missed}/${judged} targets met${missed ? `, ${missed} MISS` : ''}`);
  if (process.env.BENCH_THREAD_POOL !== '0') {
    await runThreadPoolBench(quiet ? {} : { log: (msg: string) => process.stderr.write(`  ${msg}\n`) });
  }
  if (process.env.BENCH_BLOCK !== '0') {
    await runBlockBench(quiet ? {} : { log: (msg: string) => process.stderr.write(`  ${msg}\n`) });
  }
  if (process.env.BENCH_QCOW2 !== '0') {
    await runQcow2Bench(quiet ? {} : { log: (msg: string) => process.stderr.write(`  ${msg}\n`) });
  }
}

await main();
