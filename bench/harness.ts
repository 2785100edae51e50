/**
 * A small timing harness for aioco's benchmarks.
 *
 * A case is a function that performs `n` operations (the loop lives inside the case, so
 * the harness adds no per-operation call). Every case is warmed up first, then all cases
 * are timed in interleaved rounds (round 1 runs every case once, then round 2, ...), so
 * slow drift of the machine (other processes on a 2-core box, frequency changes) hits a
 * figure and its reference alike. The figure kept is the median ns/op over the rounds.
 * Timing uses performance.now(); with `--expose-gc` a full GC runs before each timed run
 * so garbage left by one case is not collected on another's clock.
 */
import { performance } from 'node:perf_hooks';

/** One benchmark: `run(n)` performs n operations (synchronously or not). */
export interface BenchCase {
  /** Key used by checks ('gen.next', 'co.yield', ...). */
  id: string;
  /** What one operation is, for the table. */
  label: string;
  /** Operations per timed run. */
  n: number;
  /** Performs n operations. Should throw if the work did not happen as intended. */
  run(n: number): void | Promise<void>;
}

/** The timings of one case. */
export interface Measurement {
  id: string;
  label: string;
  n: number;
  /** ns/op of each timed run, in run order. */
  samples: number[];
  median: number;
  min: number;
  max: number;
}

export interface HarnessOptions {
  /** Timed runs per case (odd is best for a median). */
  rounds: number;
  /** Untimed runs per case before timing starts. */
  warmupRuns: number;
  /** Fraction of n used by a warm-up run. */
  warmupFraction: number;
  /** Scales every case's n (e.g. 0.1 for a quick smoke run). */
  scale: number;
  /** Called with progress messages (to stderr, so the table stays clean). */
  log?: (msg: string) => void;
}

export const defaultOptions: HarnessOptions = {
  rounds: 15,
  warmupRuns: 2,
  warmupFraction: 0.25,
  scale: 1,
};

function collectGarbage(): void {
  if (typeof globalThis.gc === 'function') globalThis.gc();
}

/** Median of a non-empty list. */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

async function timeOnce(c: BenchCase, n: number): Promise<number> {
  collectGarbage();
  const t0 = performance.now();
  const r = c.run(n);
  if (r !== undefined) await r;
  const t1 = performance.now();
  return ((t1 - t0) * 1e6) / n;
}

/** Warms up every case, then times them all in interleaved rounds. */
export async function runCases(cases: readonly BenchCase[], opts: Partial<HarnessOptions> = {}): Promise<Map<string, Measurement>> {
  const o: HarnessOptions = { ...defaultOptions, ...opts };
  const log = o.log ?? (() => {});
  const ids = new Set<string>();
  for (const c of cases) {
    if (ids.has(c.id)) throw new Error(`bench: duplicate case id '${c.id}'`);
    ids.add(c.id);
  }
  const sizes = new Map<string, number>();
  for (const c of cases) sizes.set(c.id, Math.max(1, Math.round(c.n * o.scale)));

  for (const c of cases) {
    const n = Math.max(1, Math.round((sizes.get(c.id) as number) * o.warmupFraction));
    log(`warm-up ${c.id} (${o.warmupRuns} x ${n})`);
    for (let i = 0; i < o.warmupRuns; i++) await timeOnce(c, n);
  }

  const samples = new Map<string, number[]>();
  for (const c of cases) samples.set(c.id, []);
  for (let r = 0; r < o.rounds; r++) {
    log(`round ${r + 1}/${o.rounds}`);
    for (const c of cases) {
      (samples.get(c.id) as number[]).push(await timeOnce(c, sizes.get(c.id) as number));
    }
  }

  const out = new Map<string, Measurement>();
  for (const c of cases) {
    const s = samples.get(c.id) as number[];
    out.set(c.id, {
      id: c.id,
      label: c.label,
      n: sizes.get(c.id) as number,
      samples: s,
      median: median(s),
      min: Math.min(...s),
      max: Math.max(...s),
    });
  }
  return out;
}

/**
 * A target on the ratio figure/reference (both medians of the same process run).
 * `max`: the ratio must be <= value; `min`: >= value.
 */
export interface Target {
  kind: 'max' | 'min';
  value: number;
}

/** One table line: a figure beside its reference. */
export interface Check {
  /** The case measured. */
  id: string;
  /** The reference case it is divided by. */
  ref: string;
  /** Optional display label (defaults to the case's label). */
  label?: string;
  /** Absent: informational line (no PASS/MISS). */
  target?: Target;
  /** QEMU's C figure for the same operation, for context (ns/op). */
  qemuNs?: number;
}

export interface CheckResult {
  check: Check;
  figure: Measurement;
  reference: Measurement;
  ratio: number;
  verdict: 'PASS' | 'MISS' | '';
}

/** Evaluates checks against measurements (throws on an unknown case id). */
export function evaluate(checks: readonly Check[], m: ReadonlyMap<string, Measurement>): CheckResult[] {
  return checks.map((check) => {
    const figure = m.get(check.id);
    const reference = m.get(check.ref);
    if (figure === undefined) throw new Error(`bench: no measurement for '${check.id}'`);
    if (reference === undefined) throw new Error(`bench: no measurement for reference '${check.ref}'`);
    const ratio = figure.median / reference.median;
    let verdict: CheckResult['verdict'] = '';
    if (check.target !== undefined) {
      const ok = check.target.kind === 'max' ? ratio <= check.target.value : ratio >= check.target.value;
      verdict = ok ? 'PASS' : 'MISS';
    }
    return { check, figure, reference, ratio, verdict };
  });
}

/** Formats ns with a sensible number of digits (12.3, 456, 12.3k...). */
export function fmtNs(ns: number): string {
  if (ns >= 1e6) return `${(ns / 1e6).toFixed(2)}M`;
  if (ns >= 1e4) return `${(ns / 1e3).toFixed(1)}k`;
  if (ns >= 100) return ns.toFixed(0);
  return ns.toFixed(1);
}

function fmtRatio(r: number): string {
  return r >= 100 ? `${r.toFixed(0)}x` : r >= 10 ? `${r.toFixed(1)}x` : `${r.toFixed(2)}x`;
}

function fmtTarget(t: Target | undefined): string {
  if (t === undefined) return '-';
  return `${t.kind === 'max' ? '<=' : '>='} ${fmtRatio(t.value)}`;
}

/** Prints rows as an aligned text table; numeric-looking cells are right-aligned. */
export function formatTable(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const numeric = headers.map((_, i) => rows.every((r) => /^[-+]?[\d.,]+[a-zA-Z%]*$|^-$|^$/.test(r[i] ?? '')));
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => (numeric[i] ? c.padStart(widths[i] as number) : c.padEnd(widths[i] as number)))
      .join('  ')
      .trimEnd();
  const sep = widths.map((w) => '-'.repeat(w)).join('  ');
  return [line(headers), sep, ...rows.map(line)].join('\n');
}

/** The results table: figure, reference, ratio, target, QEMU's C figure (and figure / C), verdict. */
export function formatResults(results: readonly CheckResult[]): string {
  const headers = ['benchmark', 'ns/op', 'spread', 'reference', 'ref ns/op', 'ratio', 'min ratio', 'target', 'QEMU C ns', 'vs C', 'result'];
  const rows = results.map((r) => [
    r.check.label ?? r.figure.label,
    fmtNs(r.figure.median),
    `${(((r.figure.max - r.figure.min) / r.figure.median) * 100).toFixed(0)}%`,
    r.reference.label,
    fmtNs(r.reference.median),
    fmtRatio(r.ratio),
    fmtRatio(r.figure.min / r.reference.min),
    fmtTarget(r.check.target),
    r.check.qemuNs !== undefined ? String(r.check.qemuNs) : '-',
    r.check.qemuNs !== undefined ? fmtRatio(r.figure.median / r.check.qemuNs) : '-',
    r.verdict === '' ? 'info' : r.verdict,
  ]);
  return formatTable(headers, rows);
}
