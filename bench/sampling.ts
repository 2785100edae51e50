// Sampling shared by the thread-pool and block benchmarks: rates of a continuously
// running pipeline, in slices, and how busy the rest of the machine was.
import * as fs from 'node:fs';
import { median } from './harness.ts';

export interface CpuSnapshot {
  all: number;
  own: number;
  at: number;
}

export function cpuSnapshot(): CpuSnapshot | null {
  try {
    const cpu = (fs.readFileSync('/proc/stat', 'utf8').split('\n')[0] as string).trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    const all = cpu.slice(0, 8).reduce((a, v, i) => (i === 3 || i === 4 ? a : a + v), 0);
    const self = fs.readFileSync('/proc/self/stat', 'utf8');
    const f = self.slice(self.lastIndexOf(')') + 2).split(' ').map(Number);
    // Fields 14-17 (utime stime cutime cstime) are 11-14 after the command name.
    const own = (f[11] as number) + (f[12] as number) + (f[13] as number) + (f[14] as number);
    return { all, own, at: performance.now() };
  } catch {
    return null;
  }
}

/** CPUs used on average by other processes between two snapshots (clock ticks of 10 ms). */
export function otherCpus(a: CpuSnapshot | null, b: CpuSnapshot | null): number | null {
  if (a === null || b === null || b.at <= a.at) return null;
  const ticks = b.all - a.all - (b.own - a.own);
  return Math.max(0, (ticks * 10) / (b.at - a.at));
}

// ---------------------------------------------------------------------------------------
// Measurement of a continuously running pipeline.

/** A figure: operations per second of each slice. */
export interface Rate {
  id: string;
  label: string;
  slices: number[];
  median: number;
  /** Physical pool workers at the end (aioco figures only). */
  workers?: number;
  note?: string;
}

export function rate(id: string, label: string, slices: number[], extra: Partial<Rate> = {}): Rate {
  return { id, label, slices, median: median(slices), ...extra };
}

/** Cheap PRNG (xorshift32) for random block numbers. */
export function makeRandom(seed: number, blocks: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % blocks;
  };
}

/** Counter sampled at slice boundaries: warm-up, then `slices` slices. */
export interface Sampler {
  count: number;
}

/** Drives `step()` (one blocking poll) until the warm-up and the slices have passed. */
export function sampleBlocking(st: Sampler, warmMs: number, step: () => void, slices: number, sliceMs: number): number[] {
  let end = performance.now() + warmMs;
  while (performance.now() < end) step();
  const out: number[] = [];
  for (let s = 0; s < slices; s++) {
    const c0 = st.count;
    const t0 = performance.now();
    end = t0 + sliceMs;
    let t = t0;
    while (t < end) {
      step();
      t = performance.now();
    }
    out.push(((st.count - c0) * 1000) / (t - t0));
  }
  return out;
}

/** The same for pipelines driven by Node's event loop: samples on timers. */
export async function sampleAsync(st: Sampler, warmMs: number, slices: number, sliceMs: number): Promise<number[]> {
  await new Promise((r) => setTimeout(r, warmMs));
  const out: number[] = [];
  for (let s = 0; s < slices; s++) {
    const c0 = st.count;
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, sliceMs));
    out.push(((st.count - c0) * 1000) / (performance.now() - t0));
  }
  return out;
}

