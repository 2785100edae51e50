// Bad input, property-based: seeded random mutations of the header, L1 table, refcount table,
// an L2 table and a refcount block of valid qemu-img-made images. For every case: opening
// either works or throws QemuError (never another exception, never a hang), a refused open
// leaves the file byte for byte unchanged, and an image that opens survives reads, a write, a
// check and close without throwing. On a sample of the cases real `qemu-img info` opens the
// same bytes, and where it refuses, aioco must refuse with the same message.
// Replay one case: AIOCO_FUZZ_SEED=<seed> AIOCO_FUZZ_CASES=1.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import '../../../../examples/drivers/file.ts';
import '../../../../examples/drivers/qcow2/qcow2.ts';
import {
  BDRV_O_RDWR,
  QemuError,
  bdrv_check,
  bdrv_check_result_new,
  blk_bs,
  blk_getlength,
  blk_new_open,
  blk_pread,
  blk_pwrite,
  blk_unref,
  bdrv_all_states,
} from '../../../../src/index.ts';
import { prng } from '../../../helpers/prng.ts';

const QEMU_IMG = '/usr/bin/qemu-img';
const QEMU_IO = '/usr/bin/qemu-io';
const haveQemu = existsSync(QEMU_IMG) && existsSync(QEMU_IO);
const CASES = Number(process.env.AIOCO_FUZZ_CASES ?? 2000);
const FIRST_SEED = Number(process.env.AIOCO_FUZZ_SEED ?? 1);
/** One case in this many is also opened by real qemu-img to compare refusals. */
const COMPARE_EVERY = 10;

function sh(cmd: string, args: string[]): { code: number | null; out: string; err: string } {
  const p = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  return { code: p.status, out: p.stdout ?? '', err: p.stderr ?? '' };
}

interface Base {
  name: string;
  bytes: Uint8Array;
  /** Regions worth mutating: [offset, length]. */
  regions: Array<[string, number, number]>;
}

const be64 = (b: Uint8Array, o: number) => Number(new DataView(b.buffer, b.byteOffset).getBigUint64(o));
const be32 = (b: Uint8Array, o: number) => new DataView(b.buffer, b.byteOffset).getUint32(o);

function describe(name: string, bytes: Uint8Array): Base {
  const cluster_size = 2 ** be32(bytes, 20);
  const l1_off = be64(bytes, 40);
  const l1_size = be32(bytes, 36);
  const rt_off = be64(bytes, 48);
  const regions: Array<[string, number, number]> = [['header', 0, Math.min(cluster_size, 512)]];
  regions.push(['l1', l1_off, Math.max(8, l1_size * 8)]);
  regions.push(['reftable', rt_off, 64]);
  const l2 = l1_size > 0 ? be64(bytes, l1_off) & 0x00fffffffffffe00 : 0;
  if (l2 > 0 && l2 < bytes.length) regions.push(['l2', l2, Math.min(cluster_size, 4096)]);
  const rb = be64(bytes, rt_off);
  if (rb > 0 && rb < bytes.length) regions.push(['refblock', rb, Math.min(cluster_size, 1024)]);
  return { name, bytes, regions };
}

function makeBases(dir: string): Base[] {
  const bases: Base[] = [];
  const mk = (name: string, opts: string, writes: string[]) => {
    const f = join(dir, name);
    const c = sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-o', opts, f, '4M']);
    if (c.code !== 0) throw new Error(c.err);
    if (writes.length) sh(QEMU_IO, [...writes.flatMap((w) => ['-c', w]), f]);
    bases.push(describe(name, new Uint8Array(readFileSync(f))));
  };
  mk('v3-64k.qcow2', 'cluster_size=65536', ['write -P 1 0 64k', 'write -P 2 1M 4k', 'write -z 2M 64k']);
  mk('v2-4k.qcow2', 'cluster_size=4096,compat=0.10', ['write -P 3 0 8k', 'write -P 4 3M 4k']);
  mk('v3-512-rc1.qcow2', 'cluster_size=512,refcount_bits=1', ['write -P 5 0 4k']);
  mk('v3-lazy-rc64.qcow2', 'cluster_size=65536,lazy_refcounts=on,refcount_bits=64', ['write -P 6 64k 64k']);
  return bases;
}

const INTERESTING = [0, 1, 0x200, 0x1ff, 0x7fffffff, 0xffffffff, 2 ** 40, 2 ** 53 - 1];

function mutate(base: Base, r: () => number): { bytes: Uint8Array; what: string } {
  const bytes = base.bytes.slice();
  const [rname, roff, rlen] = base.regions[Math.floor(r() * base.regions.length)]!;
  const kind = r();
  const pos = roff + Math.floor(r() * Math.max(1, rlen - 8));
  if (pos + 8 > bytes.length) return { bytes, what: `${rname}: none` };
  const dv = new DataView(bytes.buffer);
  if (kind < 0.35) {
    const bit = Math.floor(r() * 8);
    bytes[pos] = bytes[pos]! ^ (1 << bit);
    return { bytes, what: `${rname}: flip bit ${bit} at ${pos}` };
  }
  if (kind < 0.6) {
    const v = Math.floor(r() * 256);
    bytes[pos] = v;
    return { bytes, what: `${rname}: byte ${v} at ${pos}` };
  }
  const aligned = pos - (pos % 8);
  let v: number;
  const k = r();
  if (k < 0.5) v = INTERESTING[Math.floor(r() * INTERESTING.length)]!;
  else if (k < 0.8) v = Math.floor(r() * bytes.length * 2);
  else v = Math.floor(r() * 2 ** 32) * 512;
  dv.setBigUint64(aligned, BigInt(v) | (r() < 0.2 ? 1n << 63n : 0n));
  return { bytes, what: `${rname}: u64 ${v} at ${aligned}` };
}

function errOf(e: unknown): string {
  return e instanceof Error ? `${e.constructor.name}: ${e.message}\n${e.stack ?? ''}` : String(e);
}

if (!haveQemu) {
  console.log(`qcow2-fuzz: skipping ${CASES} mutation cases: ${QEMU_IMG} or ${QEMU_IO} is absent (they make the base images)`);
} else {
  test(`${CASES} mutated images: QemuError or a working image, refused opens write nothing, refusals match qemu-img`, () => {
    const dir = mkdtempSync(join(tmpdir(), 'aioco-fuzz-'));
    const failures: string[] = [];
    const mismatches: string[] = [];
    let opened = 0;
    let refused = 0;
    let compared = 0;
    try {
      const bases = makeBases(dir);
      const nodesBefore = bdrv_all_states().length;
      for (let i = 0; i < CASES; i++) {
        const seed = FIRST_SEED + i;
        const r = prng(seed);
        const base = bases[Math.floor(r() * bases.length)]!;
        const { bytes, what } = mutate(base, r);
        const f = join(dir, `case.qcow2`);
        writeFileSync(f, bytes);
        const tag = `seed ${seed} ${base.name} ${what}`;
        const rw = r() < 0.5;
        let blk;
        let ourError: string | null = null;
        try {
          blk = blk_new_open(f, null, { driver: 'qcow2' }, rw ? BDRV_O_RDWR : 0);
        } catch (e) {
          if (!(e instanceof QemuError)) {
            failures.push(`${tag}: open threw ${errOf(e)}`);
            continue;
          }
          ourError = e.message;
        }
        if (ourError !== null) {
          refused++;
          const after = new Uint8Array(readFileSync(f));
          if (Buffer.compare(Buffer.from(after), Buffer.from(bytes)) !== 0) failures.push(`${tag}: refused open (${ourError}) changed the file`);
        } else {
          opened++;
          try {
            const len = blk_getlength(blk!);
            const buf = new Uint8Array(65536);
            for (const off of [0, 1 << 20, 2 << 20, Math.max(0, len - 65536)]) {
              if (off + 65536 <= len) {
                const ret = blk_pread(blk!, off, 65536, buf, 0);
                if (ret > 0 || !Number.isInteger(ret)) failures.push(`${tag}: blk_pread returned ${ret}`);
              }
            }
            if (rw && len >= 8192) {
              const ret = blk_pwrite(blk!, 4096, 4096, new Uint8Array(4096).fill(7), 0);
              if (ret > 0 || !Number.isInteger(ret)) failures.push(`${tag}: blk_pwrite returned ${ret}`);
            }
            const res = bdrv_check_result_new();
            bdrv_check(blk_bs(blk!)!, res, 0);
          } catch (e) {
            if (!(e instanceof QemuError)) failures.push(`${tag}: I/O threw ${errOf(e)}`);
          }
          try {
            blk_unref(blk!);
          } catch (e) {
            failures.push(`${tag}: close threw ${errOf(e)}`);
          }
        }
        if (i % COMPARE_EVERY === 0) {
          // Compare read-only refusals with qemu-img info (which opens read-only, without backing).
          compared++;
          writeFileSync(f, bytes);
          let ro: string | null = null;
          try {
            blk_unref(blk_new_open(f, null, { driver: 'qcow2' }, 0));
          } catch (e) {
            ro = e instanceof Error ? e.message : String(e);
          }
          const q = sh(QEMU_IMG, ['info', '-f', 'qcow2', f]);
          const m = /^qemu-img: Could not open '[^']*': (.*)$/m.exec(q.err);
          const theirs = q.code === 0 ? null : (m?.[1] ?? q.err.trim());
          if (theirs !== ro) mismatches.push(`${tag}: qemu-img: ${theirs ?? 'opens'} | aioco: ${ro ?? 'opens'}`);
        }
      }
      if (bdrv_all_states().length !== nodesBefore) failures.push(`nodes leaked: ${bdrv_all_states().length - nodesBefore}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    console.log(`qcow2-fuzz: ${CASES} cases, ${opened} opened, ${refused} refused, ${compared} compared with qemu-img, ${mismatches.length} refusal mismatches`);
    assert.equal(failures, [], failures.slice(0, 20).join('\n'));
    assert.equal(mismatches, [], mismatches.slice(0, 20).join('\n'));
  });
}

test.run();
