// Crash consistency of the qcow2 driver: aioco-io writes to a qcow2 image and is killed with
// SIGKILL at a random moment; real `qemu-img check` must then find no corruption (leaks are
// allowed), and every write aioco-io reported complete must read back intact through real
// qemu-io. Seeded: a failure names its seed and the commands, so it can be replayed with
// AIOCO_CRASH_SEED=<seed> AIOCO_CRASH_RUNS=1.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { root } from '../../../helpers/child.ts';
import { prng } from '../../../helpers/prng.ts';

const QEMU_IMG = '/usr/bin/qemu-img';
const QEMU_IO = '/usr/bin/qemu-io';
const haveQemu = existsSync(QEMU_IMG) && existsSync(QEMU_IO);
const RUNS = Number(process.env.AIOCO_CRASH_RUNS ?? 50);
const FIRST_SEED = Number(process.env.AIOCO_CRASH_SEED ?? 1);
const PARALLEL = 2;
const bin = join(root, 'bin', 'aioco-io.mjs');

interface Write {
  cmd: string;
  offset: number;
  len: number;
  /** Byte every position of the range must read back as once the write completed. */
  pattern: number;
}

interface Plan {
  seed: number;
  cluster_size: number;
  compat: '0.10' | '1.1';
  lazy: boolean;
  backing: boolean;
  writes: Write[];
  /** Kill after this many completion lines were seen, and this many ms more. */
  killAfter: number;
  killDelay: number;
}

const SIZE = 64 << 20;

function makePlan(seed: number): Plan {
  const r = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const cluster_size = pick([512, 4096, 65536, 65536, 1 << 21]);
  const compat = pick(['0.10', '1.1'] as const);
  const lazy = compat === '1.1' && r() < 0.3;
  const backing = r() < 0.25;
  // Disjoint slots so every completed write has one expected content.
  const slot = 256 << 10;
  const slots = SIZE / slot;
  const order = [...Array(slots).keys()].sort(() => r() - 0.5);
  const writes: Write[] = [];
  const n = 12 + Math.floor(r() * 20);
  for (let i = 0; i < n; i++) {
    const base = order[i]! * slot;
    const kind = r();
    const offset = base + (r() < 0.5 ? 0 : Math.floor(r() * 64) * 512);
    const len = pick([512, 4096, 65536, 200 << 10].filter((l) => offset + l <= base + slot));
    const pattern = 1 + Math.floor(r() * 254);
    if (kind < 0.5) writes.push({ cmd: `write -P ${pattern} ${offset} ${len}`, offset, len, pattern });
    else if (kind < 0.75) writes.push({ cmd: `aio_write -P ${pattern} ${offset} ${len}`, offset, len, pattern });
    else writes.push({ cmd: `write -z ${offset} ${len}`, offset, len, pattern: 0 });
    if (kind >= 0.5 && kind < 0.75 && r() < 0.5) writes.push({ cmd: 'aio_flush', offset: -1, len: 0, pattern: 0 });
  }
  const completions = writes.filter((w) => w.offset >= 0).length;
  return { seed, cluster_size, compat, lazy, backing, writes, killAfter: 1 + Math.floor(r() * (completions - 1)), killDelay: Math.floor(r() * 4) };
}

function run(cmd: string, args: string[]): { code: number | null; out: string } {
  const p = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000 });
  return { code: p.status, out: (p.stdout ?? '') + (p.stderr ?? '') };
}

/** Runs aioco-io over the plan's commands and SIGKILLs it after `killAfter` completion lines. */
function writeAndKill(img: string, plan: Plan): Promise<{ done: Set<string>; signal: string | null; out: string; err: string }> {
  const args = [bin];
  for (const w of plan.writes) args.push('-c', w.cmd);
  args.push('-f', 'qcow2', img);
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, FORCE_COLOR: '0' } });
    let out = '';
    let err = '';
    const done = new Set<string>();
    let killed = false;
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.stdout.on('data', (b: Buffer) => {
      out += b;
      for (const m of out.matchAll(/wrote (\d+)\/\d+ bytes at offset (\d+)/g)) done.add(`${m[2]}+${m[1]}`);
      if (!killed && done.size >= plan.killAfter) {
        killed = true;
        setTimeout(() => child.kill('SIGKILL'), plan.killDelay);
      }
    });
    child.stderr.on('data', (b: Buffer) => (err += b));
    child.on('close', (_code, signal) => {
      clearTimeout(timer);
      resolve({ done, signal, out, err });
    });
  });
}

async function oneRun(seed: number, dir: string): Promise<string | null> {
  const plan = makePlan(seed);
  const img = join(dir, `crash-${seed}.qcow2`);
  const base = join(dir, `base-${seed}.qcow2`);
  const o = [`cluster_size=${plan.cluster_size}`, `compat=${plan.compat}`];
  if (plan.lazy) o.push('lazy_refcounts=on');
  if (plan.backing) {
    run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', base, String(SIZE)]);
    run(QEMU_IO, ['-c', `write -P 0x5a 0 ${SIZE}`, base]);
    o.push(`backing_file=${base}`, 'backing_fmt=qcow2');
  }
  const c = run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-o', o.join(','), img, String(SIZE)]);
  if (c.code !== 0) return `seed ${seed}: qemu-img create failed: ${c.out}`;
  const { done, out, err } = await writeAndKill(img, plan);
  const desc = `seed ${seed} (${o.join(',')}, kill after ${plan.killAfter}): ${plan.writes.map((w) => w.cmd).join(' ; ')}`;
  // Any error line is a failure: the plan only has valid requests.
  if (err !== '' || /failed/.test(out)) return `${desc}\naioco-io reported an error:\n${out}${err}`;
  const check = run(QEMU_IMG, ['check', img]);
  if (plan.lazy) {
    const rep = run(QEMU_IMG, ['check', '-r', 'all', img]);
    if (rep.code !== 0) return `${desc}\nqemu-img check -r all exited ${rep.code}:\n${rep.out}`;
  } else if (check.code !== 0 && check.code !== 3) {
    return `${desc}\nqemu-img check exited ${check.code}:\n${check.out}`;
  }
  const reads: string[] = [];
  for (const w of plan.writes) {
    if (w.offset >= 0 && done.has(`${w.offset}+${w.len}`)) reads.push('-c', `read -P ${w.pattern} ${w.offset} ${w.len}`);
  }
  if (reads.length > 0) {
    const r = run(QEMU_IO, ['-r', '-U', ...reads, img]);
    if (r.code !== 0 || /Pattern verification failed|failed/.test(r.out)) return `${desc}\nread back failed:\n${r.out}`;
  }
  rmSync(img, { force: true });
  rmSync(base, { force: true });
  return null;
}

if (!haveQemu) {
  console.log(`qcow2-crash: skipping ${RUNS} kill -9 runs: ${QEMU_IMG} or ${QEMU_IO} is absent`);
} else {
  test(`kill -9 at random moments: ${RUNS} seeded runs, qemu-img check finds no corruption and completed writes read back`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'aioco-crash-'));
    const failures: string[] = [];
    try {
      const seeds = [...Array(RUNS).keys()].map((i) => FIRST_SEED + i);
      const workers = Array.from({ length: PARALLEL }, async () => {
        for (let s = seeds.shift(); s !== undefined; s = seeds.shift()) {
          const f = await oneRun(s, dir);
          if (f) failures.push(f);
        }
      });
      await Promise.all(workers);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    assert.equal(failures, [], failures.join('\n\n'));
  });
}

test.run();
