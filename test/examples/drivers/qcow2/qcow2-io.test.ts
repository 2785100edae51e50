// qcow2 I/O path interop: images made and written by real QEMU 7.2 (qemu-img, qemu-io) are read
// by aioco; images written by aioco (random writes, zero writes, discards, concurrent requests
// sharing clusters) are verified with `qemu-img check`, `qemu-img compare` against a raw
// reference, and `qemu-io -c 'read -P ...'`. Facts: reference/qemu-block.md sections 5 and 6.
import { test } from 'uvu';
import * as path from 'node:path';
import { root } from '../../../helpers/child.ts';
import * as assert from 'uvu/assert';
import {
  BDRV_REQ_MAY_UNMAP,
  apply_ref,
  blk_flush,
  blk_unref,
  first_diff,
  aioco_read,
  open_ro,
  open_rw,
  prng,
  qemu_img,
  qemu_io,
  run,
  run_concurrently,
  skipReason,
  tmp,
  writeFileSync,
  type Op,
} from './qcow2-io-helpers.ts';

interface Config {
  name: string;
  size: number;
  create: string[];
  cluster: number;
  v2?: boolean;
  backing?: boolean;
  /** Made by `qemu-img convert -c` from a partly compressible raw image. */
  compressed?: boolean;
  /** An internal snapshot taken after qemu-io's writes: aioco's writes must COW shared clusters. */
  snapshot?: boolean;
}

const MiB = 1024 * 1024;
const configs: Config[] = [
  { name: 'v3 64k', size: 16 * MiB, create: [], cluster: 65536 },
  { name: 'v3 512', size: 2 * MiB, create: ['-o', 'cluster_size=512'], cluster: 512 },
  { name: 'v3 2M', size: 24 * MiB, create: ['-o', 'cluster_size=2M'], cluster: 2 * MiB },
  { name: 'compat=0.10', size: 16 * MiB, create: ['-o', 'compat=0.10'], cluster: 65536, v2: true },
  { name: 'lazy_refcounts', size: 16 * MiB, create: ['-o', 'lazy_refcounts=on'], cluster: 65536 },
  { name: 'refcount_bits=1', size: 8 * MiB, create: ['-o', 'refcount_bits=1,cluster_size=4k'], cluster: 4096 },
  { name: 'backing chain', size: 16 * MiB, create: [], cluster: 65536, backing: true },
  { name: 'extended_l2', size: 8 * MiB, create: ['-o', 'extended_l2=on'], cluster: 65536 },
  { name: 'extended_l2 backing chain', size: 8 * MiB, create: ['-o', 'extended_l2=on,cluster_size=16k'], cluster: 16384, backing: true },
  { name: 'compressed (convert -c)', size: 4 * MiB, create: [], cluster: 65536, compressed: true },
  { name: 'internal snapshot', size: 8 * MiB, create: [], cluster: 65536, snapshot: true },
  { name: 'internal snapshot 4k', size: 4 * MiB, create: ['-o', 'cluster_size=4k'], cluster: 4096, snapshot: true },
  { name: 'backing chain v2', size: 16 * MiB, create: ['-o', 'compat=0.10'], cluster: 65536, v2: true, backing: true },
];

/** Writes qemu-io performs before aioco touches the image (also applied to the reference). */
function qemu_io_ops(c: Config): Op[] {
  const cs = c.cluster;
  return [
    { kind: 'write', offset: 0, bytes: Math.min(c.size, 3 * cs), pattern: 0x10, constant: true },
    { kind: 'write', offset: cs + 1000, bytes: 5000, pattern: 0x20, constant: true },
    { kind: 'zero', offset: 2 * cs, bytes: cs, flags: 0 },
    { kind: 'write', offset: c.size - 4096, bytes: 4096, pattern: 0x30, constant: true },
    { kind: 'write', offset: Math.floor(c.size / 2) + 512, bytes: 7 * 512, pattern: 0x40, constant: true },
  ];
}

function qemu_io_cmd(op: Op): string {
  if (op.kind === 'zero') return `write -z ${op.offset} ${op.bytes}`;
  if (op.kind === 'write') return `write -P ${op.pattern} ${op.offset} ${op.bytes}`;
  throw new Error('unexpected op');
}

/** Random ops within [0, size): writes, zero writes, cluster-aligned discards. */
function random_ops(c: Config, seed: number, n: number): Op[] {
  const r = prng(seed);
  const ops: Op[] = [];
  const cs = c.cluster;
  for (let i = 0; i < n; i++) {
    const k = r();
    if (k < 0.65) {
      const bytes = 1 + Math.floor(r() * Math.min(3 * cs, 256 * 1024));
      const offset = Math.floor(r() * (c.size - bytes));
      ops.push({ kind: 'write', offset, bytes, pattern: Math.floor(r() * 256) });
    } else if (k < 0.85) {
      const bytes = 1 + Math.floor(r() * Math.min(2 * cs, 256 * 1024));
      const offset = Math.floor(r() * (c.size - bytes));
      ops.push({ kind: 'zero', offset, bytes, flags: r() < 0.5 ? BDRV_REQ_MAY_UNMAP : 0 });
    } else {
      const nc = 1 + Math.floor(r() * 2);
      const first = Math.floor(r() * (c.size / cs - nc));
      ops.push({ kind: 'discard', offset: first * cs, bytes: nc * cs });
    }
  }
  return ops;
}

/** Groups ops into batches of byte-disjoint ops (runnable concurrently with a defined result). */
function batches(ops: Op[], max: number): Op[][] {
  const out: Op[][] = [];
  let cur: Op[] = [];
  for (const op of ops) {
    const clash = cur.some((o) => o.offset < op.offset + op.bytes && op.offset < o.offset + o.bytes);
    if (clash || cur.length === max) {
      out.push(cur);
      cur = [];
    }
    cur.push(op);
  }
  if (cur.length) out.push(cur);
  return out;
}

function make_image(c: Config, t: ReturnType<typeof tmp>): { img: string; ref: Uint8Array } {
  const img = t.file('img.qcow2');
  const ref = new Uint8Array(c.size);
  if (c.compressed) {
    // Compressible runs (constant bytes) alternate with random data that does not compress.
    const r = prng(99);
    for (let o = 0; o < c.size; o += 4096) {
      if ((o >> 16) % 3 === 2) for (let i = 0; i < 4096; i++) ref[o + i] = (r() * 256) | 0;
      else ref.fill((o >> 12) & 0xff, o, o + 4096);
    }
    const raw = t.file('src.raw');
    writeFileSync(raw, ref);
    const r2 = qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, img);
    assert.is(r2.status, 0, r2.stderr);
  } else if (c.backing) {
    const base = t.file('base.qcow2');
    let r = qemu_img('create', '-q', '-f', 'qcow2', ...c.create, base, String(c.size));
    assert.is(r.status, 0, r.stderr);
    const bops: Op[] = [
      { kind: 'write', offset: 0, bytes: c.size / 2, pattern: 0x70, constant: true },
      { kind: 'write', offset: c.size - 3 * c.cluster, bytes: 2 * c.cluster + 100, pattern: 0x71, constant: true },
    ];
    r = qemu_io('-f', 'qcow2', ...bops.flatMap((o) => ['-c', qemu_io_cmd(o)]), base);
    assert.is(r.status, 0, r.stderr);
    for (const o of bops) apply_ref(ref, o);
    r = qemu_img('create', '-q', '-f', 'qcow2', ...c.create, '-b', 'base.qcow2', '-F', 'qcow2', img);
    assert.is(r.status, 0, r.stderr);
  } else {
    const r = qemu_img('create', '-q', '-f', 'qcow2', ...c.create, img, String(c.size));
    assert.is(r.status, 0, r.stderr);
  }
  const ops = qemu_io_ops(c);
  const r = qemu_io('-f', 'qcow2', ...ops.flatMap((o) => ['-c', qemu_io_cmd(o)]), img);
  assert.is(r.status, 0, r.stderr);
  for (const o of ops) apply_ref(ref, o);
  if (c.snapshot) {
    const s = qemu_img('snapshot', '-c', 's1', img);
    assert.is(s.status, 0, s.stderr);
  }
  return { img, ref };
}

function assert_reads_as(file: string, ref: Uint8Array, what: string): void {
  const blk = open_ro(file);
  try {
    const { ret, buf } = aioco_read(blk, 0, ref.length);
    assert.is(ret, 0);
    const d = first_diff(buf, ref);
    assert.is(d, -1, `${what}: first difference at byte ${d} (got ${buf[d]}, want ${ref[d]})`);
  } finally {
    blk_unref(blk);
  }
}

function assert_qemu_agrees(file: string, ref: Uint8Array, t: ReturnType<typeof tmp>, probe: Op | null): void {
  const chk = qemu_img('check', file);
  assert.is(chk.status, 0, `qemu-img check: ${chk.stdout}${chk.stderr}`);
  assert.match(chk.stdout, /^No errors were found on the image\.\n/);
  const raw = t.file('ref.raw');
  writeFileSync(raw, ref);
  const cmp = qemu_img('compare', '-f', 'qcow2', '-F', 'raw', file, raw);
  assert.is(cmp.stdout, 'Images are identical.\n', cmp.stdout + cmp.stderr);
  assert.is(cmp.status, 0);
  if (probe && probe.kind === 'write') {
    // qemu-io's pattern check on the first 512-byte run of the last write that survived.
    const io = qemu_io('-r', '-f', 'qcow2', '-c', `read -P ${ref[probe.offset]} ${probe.offset} 1`, file);
    assert.is(io.status, 0);
    assert.match(io.stdout, `read 1/1 bytes at offset ${probe.offset}\n`);
    assert.not.match(io.stdout, 'Pattern verification failed');
  }
}

if (skipReason) {
  test(skipReason, () => {});
} else {
  for (const c of configs) {
    test(`${c.name}: aioco reads what qemu-io wrote`, () => {
      const t = tmp();
      try {
        const { img, ref } = make_image(c, t);
        assert_reads_as(img, ref, c.name);
      } finally {
        t.cleanup();
      }
    });

    test(`${c.name}: random aioco writes, zero writes and discards (4 at a time) pass qemu-img check and compare`, () => {
      const t = tmp();
      try {
        const { img, ref } = make_image(c, t);
        const snapshot_ref = ref.slice();
        const ops = random_ops(c, 1234 + c.size + c.cluster, 60);
        const blk = open_rw(img);
        let last_write: Op | null = null;
        try {
          for (const batch of batches(ops, 4)) {
            const rets = run_concurrently(blk, batch);
            assert.equal(rets, batch.map(() => 0), `batch ${JSON.stringify(batch)}`);
            for (const op of batch) {
              if (op.kind === 'discard') {
                // v2 with a backing file cannot discard (stale backing data); otherwise the
                // discarded clusters read as zeroes (zero flag, or unallocated without backing).
                if (!(c.v2 && c.backing)) ref.fill(0, op.offset, op.offset + op.bytes);
              } else {
                apply_ref(ref, op);
              }
              if (op.kind === 'write') last_write = op;
            }
          }
          const { ret, buf } = aioco_read(blk, 0, c.size);
          assert.is(ret, 0);
          assert.is(first_diff(buf, ref), -1);
          assert.is(blk_flush(blk), 0);
        } finally {
          blk_unref(blk);
        }
        assert_qemu_agrees(img, ref, t, last_write);
        assert_reads_as(img, ref, `${c.name} reopened`);
        if (c.snapshot) {
          // The snapshot still holds qemu-io's data: aioco copied shared clusters before writing.
          assert.match(qemu_img('snapshot', '-l', img).stdout, /\n1 +s1 /);
          const snap = t.file('snap.raw');
          const cv = qemu_img('convert', '-f', 'qcow2', '-l', 'snapshot.name=s1', '-O', 'raw', img, snap);
          assert.is(cv.status, 0, cv.stderr);
          const before = t.file('before.raw');
          writeFileSync(before, snapshot_ref);
          assert.is(qemu_img('compare', '-f', 'raw', '-F', 'raw', snap, before).stdout, 'Images are identical.\n');
        }
      } finally {
        t.cleanup();
      }
    });
  }
}

if (!skipReason) {
  test('aioco-io loads the qcow2 driver: read -P, readv, map, and alloc print what qemu-io prints', () => {
    const t = tmp();
    try {
      const img = t.file('io.qcow2');
      assert.is(qemu_img('create', '-q', '-f', 'qcow2', img, '16M').status, 0);
      // (Extents end on exact 3-decimal MiB values: aioco-io's size formatting rounds ties up
      // where QEMU's printf rounds them to even, reported separately.)
      const w = qemu_io('-c', 'write -P 0x11 0 96k', '-c', 'write -z 1M 128k', '-c', 'write -P 0x22 4224k 512', '-c', 'write -P 0x24 4288k 512', img);
      assert.is(w.status, 0, w.stderr);
      const cmds = ['read -P 0x11 0 96k', 'read -P 0 96k 32k', 'read -P 0x22 4224k 512', 'read -P 0x23 4224k 512', 'readv -P 0 1M 4k 4k', 'map', 'alloc 0 2M'];
      const args = [...cmds.flatMap((c) => ['-c', c]), '-r', '-f', 'qcow2', img];
      // Timing lines ("... ops; 00.00 sec (...)") differ from run to run.
      const strip = (out: string): string => out.replace(/^.* ops; .*$\n/gm, '');
      const theirs = qemu_io(...args);
      const ours = run(process.execPath, ['--import', 'tsx', path.join(root, 'examples/tools/aioco-io.ts'), ...args]);
      assert.is(ours.stderr, theirs.stderr);
      assert.is(strip(ours.stdout), strip(theirs.stdout));
      assert.match(ours.stdout, 'Pattern verification failed at offset 4325376, 512 bytes');
      assert.is(ours.status, theirs.status);
    } finally {
      t.cleanup();
    }
  });
}

test.run();
