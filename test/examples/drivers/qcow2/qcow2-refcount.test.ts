import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import {
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  EINVAL,
  bdrv_open,
  bdrv_poll_co,
  bdrv_unref,
  blk_new_open,
  blk_pwrite,
  blk_unref,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  type BlockDriverState,
  type CoroutineFn,
} from '../../../../src/index.ts';
import {
  qcow2_alloc_bytes,
  qcow2_alloc_clusters,
  qcow2_alloc_clusters_at,
  qcow2_check_metadata_overlap,
  qcow2_free_clusters,
  qcow2_get_refcount,
  qcow2_process_discards,
  qcow2_refcount_funcs,
  qcow2_refcount_metadata_size,
  qcow2_update_cluster_refcount,
} from '../../../../examples/drivers/qcow2/qcow2-refcount.ts';
import {
  QCOW2_DISCARD_NEVER,
  QCOW2_DISCARD_OTHER,
  QCOW2_OL_ACTIVE_L1,
  QCOW2_OL_ACTIVE_L2,
  QCOW2_OL_ALL,
  QCOW2_OL_MAIN_HEADER,
  QCOW2_OL_REFCOUNT_BLOCK,
  QCOW2_OL_REFCOUNT_TABLE,
  type BDRVQcow2State,
} from '../../../../examples/drivers/qcow2/qcow2-state.ts';
import {
  aiocoCheck,
  be16,
  be64,
  fileRefcount,
  l2EntryAddr,
  patch,
  qemuCheck,
  qemuImg,
  qemuIo,
  qemuMissing,
  readBe64,
  readHeader,
  run,
  setFileRefcount,
  tempDir,
} from './qcow2-meta-helpers.ts';
import { ensureRegistered, makeProto, st } from '../../../helpers/mem-driver.ts';

// Facts: qemu-block.md §6.3 (refcount widths, LSB-first sub-byte entries), §5.3 and §6.9
// (qemu-img check output and counters), QEMU 7.2 block/qcow2-refcount.c.

const WIDTHS = [1, 2, 4, 8, 16, 32, 64];

// ---------------------------------------------------------------------------------------------
// Refcount entry accessors

test('refcount accessors: every width packs entries as qcow2.txt says (sub-byte LSB first, big-endian)', () => {
  const expect: Record<number, { idx: number; v: number; bytes: number[] }> = {
    0: { idx: 3, v: 1, bytes: [0x08] },
    1: { idx: 1, v: 3, bytes: [0x0c] },
    2: { idx: 1, v: 0xa, bytes: [0xa0] },
    3: { idx: 1, v: 0xab, bytes: [0x00, 0xab] },
    4: { idx: 0, v: 0x1234, bytes: [0x12, 0x34] },
    5: { idx: 0, v: 0xdeadbeef, bytes: [0xde, 0xad, 0xbe, 0xef] },
    6: { idx: 0, v: 2 ** 40 + 5, bytes: [0, 0, 1, 0, 0, 0, 0, 5] },
  };
  for (let order = 0; order <= 6; order++) {
    const f = qcow2_refcount_funcs(order);
    const b = new Uint8Array(16);
    const e = expect[order]!;
    f.set(b, e.idx, e.v);
    assert.equal(Array.from(b.subarray(0, e.bytes.length)), e.bytes, `order ${order}`);
    assert.is(f.get(b, e.idx), e.v);
    // Neighbours untouched.
    assert.is(f.get(b, e.idx + 1), 0);
    if (e.idx > 0) assert.is(f.get(b, e.idx - 1), 0);
    assert.is(f.max, order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1);
    f.set(b, e.idx + 1, f.max);
    assert.is(f.get(b, e.idx + 1), f.max);
    assert.is(f.get(b, e.idx), e.v, 'setting a neighbour keeps the entry');
    assert.throws(() => f.set(b, 0, f.max + 1), /does not fit/);
  }
  // A 64-bit refcount beyond 2^53 - 1 reads as the maximum.
  const f6 = qcow2_refcount_funcs(6);
  assert.is(f6.get(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff), 0), Number.MAX_SAFE_INTEGER);
  assert.throws(() => qcow2_refcount_funcs(7), /out of range/);
});

test('qcow2_refcount_metadata_size: the fixed point covers the metadata itself', () => {
  // 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters, one table cluster 8192 blocks.
  const out = { refblock_count: 0 };
  assert.is(qcow2_refcount_metadata_size(100, 65536, 4, false, out), 2 * 65536);
  assert.is(out.refblock_count, 1);
  assert.is(qcow2_refcount_metadata_size(32767, 65536, 4, false, out), 3 * 65536);
  assert.is(out.refblock_count, 2, '32767 + 1 block + 1 table cluster > 32768');
  // 512-byte clusters, 64-bit refcounts: 64 refcounts per block, 64 entries per table cluster.
  // 4000 clusters + 64 blocks + 1 table cluster = 4065 <= 64 * 64.
  assert.is(qcow2_refcount_metadata_size(4000, 512, 6, false, out), (64 + 1) * 512);
  assert.is(out.refblock_count, 64);
  // The generous variant counts half a table cluster more: not enough for another block here.
  assert.is(qcow2_refcount_metadata_size(4000, 512, 6, true, out), (64 + 1) * 512);
  assert.is(qcow2_refcount_metadata_size(4031, 512, 6, false, out), (64 + 1) * 512, "4031 + 65 = 64 * 64 exactly");
  assert.is(qcow2_refcount_metadata_size(4032, 512, 6, false, out), (65 + 2) * 512);
  assert.is(out.refblock_count, 65);
});

// ---------------------------------------------------------------------------------------------
// Interop with real images

function skip(name: string): boolean {
  if (qemuMissing) {
    console.log(`skipping "${name}": ${qemuMissing}`);
    return true;
  }
  return false;
}

function withLock<T>(bs: BlockDriverState, body: (s: BDRVQcow2State) => CoroutineFn<T>): T {
  const s = bs.opaque as BDRVQcow2State;
  return bdrv_poll_co(bs, 'test', function* () {
    yield* qemu_co_mutex_lock(s.lock);
    try {
      return yield* body(s);
    } finally {
      qemu_co_mutex_unlock(s.lock);
    }
  });
}

function refcountOf(bs: BlockDriverState, cluster: number): number {
  const out = { refcount: -1 };
  const ret = withLock(bs, () => qcow2_get_refcount(bs, cluster, out));
  assert.is(ret, 0);
  return out.refcount;
}

test('qemu-img images of every refcount width: aioco reads the same refcounts as the file holds', () => {
  if (skip('refcount widths')) return;
  const t = tempDir();
  try {
    for (const n of WIDTHS) {
      const f = t.file(`r${n}.qcow2`);
      assert.is(qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${n},cluster_size=4k`, f, '8M').code, 0);
      assert.is(qemuIo(f, 'write -P 1 0 200k', 'write -P 2 4M 12k').code, 0);
      if (n >= 2) assert.is(qemuImg('snapshot', '-c', 's1', f).code, 0);
      const clusters = Math.ceil(statSync(f).size / 4096);
      const bs = bdrv_open(f, { driver: 'qcow2' }, 0);
      try {
        const s = bs.opaque as BDRVQcow2State;
        assert.is(s.refcount_bits, n);
        let shared = 0;
        for (let i = 0; i < clusters + 3; i++) {
          const want = Number(fileRefcount(f, i));
          assert.is(refcountOf(bs, i), want, `width ${n}, cluster ${i}`);
          if (want === 2) shared++;
        }
        // With a snapshot, the 53 data clusters and their L2 tables are shared.
        assert.is(shared, n >= 2 ? 53 + 2 : 0, `width ${n}`);
        assert.is(refcountOf(bs, 1e6), 0, 'a cluster past the refcount table');
      } finally {
        bdrv_unref(bs);
      }
    }
  } finally {
    t.cleanup();
  }
});

test('allocation through aioco at every width: qemu-img check sees exactly the clusters it took', () => {
  if (skip('allocation at every width')) return;
  const t = tempDir();
  try {
    for (const n of WIDTHS) {
      const f = t.file(`a${n}.qcow2`);
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${n},cluster_size=4k`, f, '8M');
      // Leaks past the end of the file are invisible to qemu-img check: make room first.
      truncateSync(f, 16 * 4096);
      const bs = bdrv_open(f, { driver: 'qcow2' }, BDRV_O_RDWR);
      let a: number, b: number, c: number, d: number, e: number;
      try {
        // Fresh image: header, reftable, refblock, L1 in clusters 0-3.
        a = withLock(bs, () => qcow2_alloc_clusters(bs, 3 * 4096));
        assert.is(a, 4 * 4096);
        b = withLock(bs, () => qcow2_alloc_clusters_at(bs, 10 * 4096, 2));
        assert.is(b, 2);
        assert.is(withLock(bs, () => qcow2_alloc_clusters_at(bs, 10 * 4096, 2)), 0, 'already in use');
        c = withLock(bs, () => qcow2_alloc_bytes(bs, 1000));
        d = withLock(bs, () => qcow2_alloc_bytes(bs, 1000));
        e = withLock(bs, () => qcow2_alloc_clusters(bs, 4096));
        withLock(bs, () => qcow2_free_clusters(bs, a + 4096, 4096, QCOW2_DISCARD_NEVER));
        assert.is(refcountOf(bs, 5), 0);
      } finally {
        bdrv_unref(bs);
      }
      // Packed compressed allocations share a cluster; with 1-bit refcounts it is full after one.
      assert.is(c, 7 * 4096, `width ${n}`);
      assert.is(d, n === 1 ? 8 * 4096 : 7 * 4096 + 1000, `width ${n}`);
      assert.is(e, n === 1 ? 9 * 4096 : 8 * 4096, `width ${n}`);
      const leaked = n === 1 ? [4, 6, 7, 8, 9, 10, 11] : [4, 6, 7, 8, 10, 11];
      const r = qemuCheck(f, '');
      assert.is(r.exit, 3, `width ${n}: leaks only`);
      const want = leaked.map((k) => `Leaked cluster ${k} refcount=${k === 7 && n > 1 ? 2 : 1} reference=0\n`).join('');
      assert.is(r.stderr, want, `width ${n}`);
      assert.is(r.counters['leaks'], leaked.length);
      // aioco's check agrees, and its repair leaves an image QEMU finds clean.
      const mine = aiocoCheck(f, 'leaks');
      assert.is(mine.exit, 0);
      assert.is(mine.counters['leaks-fixed'], leaked.length);
      assert.is(qemuCheck(f, '').exit, 0, `width ${n}: clean after aioco's repair`);
    }
  } finally {
    t.cleanup();
  }
});

test('freed clusters are discarded in the file as the discard type allows, merged when queued', () => {
  if (skip('discard queue')) return;
  const t = tempDir();
  try {
    const f = t.file('d.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '4M');
    qemuIo(f, 'write -P 1 0 64k');
    const bytes = readFileSync(f);
    ensureRegistered(makeProto('q2dmem'));
    const mem = bdrv_open('q2dmem:d', { driver: 'q2dmem', size: bytes.length }, BDRV_O_RDWR | BDRV_O_UNMAP);
    st(mem).data.set(bytes);
    const bs = bdrv_open(null, { driver: 'qcow2', file: mem.node_name, 'pass-discard-other': true }, BDRV_O_RDWR);
    try {
      const log = st(mem).log;
      const C = 4096;
      // Data clusters 5.. hold guest 0..64k (header, reftable, refblock, L1, L2 first).
      log.length = 0;
      withLock(bs, () => qcow2_free_clusters(bs, 5 * C, 2 * C, QCOW2_DISCARD_OTHER));
      assert.equal(log.filter((x) => x.startsWith('discard')), [`discard ${5 * C} ${2 * C}`]);
      log.length = 0;
      withLock(bs, () => qcow2_free_clusters(bs, 7 * C, C, QCOW2_DISCARD_NEVER));
      assert.equal(log.filter((x) => x.startsWith('discard')), [], 'QCOW2_DISCARD_NEVER never reaches the file');
      // Queued: adjacent ranges freed one by one go out as one discard.
      const s = bs.opaque as BDRVQcow2State;
      log.length = 0;
      withLock(bs, function* () {
        s.cache_discards = true;
        yield* qcow2_free_clusters(bs, 10 * C, C, QCOW2_DISCARD_OTHER);
        yield* qcow2_free_clusters(bs, 12 * C, C, QCOW2_DISCARD_OTHER);
        yield* qcow2_free_clusters(bs, 11 * C, C, QCOW2_DISCARD_OTHER);
        s.cache_discards = false;
        assert.equal(log.filter((x) => x.startsWith('discard')), []);
        yield* qcow2_process_discards(bs, 0);
        return 0;
      });
      assert.equal(log.filter((x) => x.startsWith('discard')), [`discard ${10 * C} ${3 * C}`]);
      assert.is(s.discards!.length, 0);
      // An error drops the queue without discarding.
      log.length = 0;
      withLock(bs, function* () {
        s.cache_discards = true;
        yield* qcow2_free_clusters(bs, 14 * C, C, QCOW2_DISCARD_OTHER);
        s.cache_discards = false;
        yield* qcow2_process_discards(bs, -EINVAL);
        return 0;
      });
      assert.equal(log.filter((x) => x.startsWith('discard')), []);
      assert.is(refcountOf(bs, 5), 0);
      assert.is(refcountOf(bs, 14), 0);
    } finally {
      bdrv_unref(bs);
      bdrv_unref(mem);
    }
  } finally {
    t.cleanup();
  }
});

test('refcount overflow and underflow are refused with -EINVAL and change nothing', () => {
  if (skip('overflow')) return;
  const t = tempDir();
  try {
    const f = t.file('o.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=2,cluster_size=4k', f, '1M');
    const bs = bdrv_open(f, { driver: 'qcow2' }, BDRV_O_RDWR);
    try {
      assert.is(withLock(bs, () => qcow2_update_cluster_refcount(bs, 1, 2, false, QCOW2_DISCARD_NEVER)), 0);
      assert.is(refcountOf(bs, 1), 3);
      assert.is(withLock(bs, () => qcow2_update_cluster_refcount(bs, 1, 1, false, QCOW2_DISCARD_NEVER)), -EINVAL);
      assert.is(refcountOf(bs, 1), 3);
      assert.is(withLock(bs, () => qcow2_update_cluster_refcount(bs, 1, 2, true, QCOW2_DISCARD_NEVER)), 0);
      assert.is(withLock(bs, () => qcow2_update_cluster_refcount(bs, 1, 2, true, QCOW2_DISCARD_NEVER)), -EINVAL);
      assert.is(refcountOf(bs, 1), 1);
    } finally {
      bdrv_unref(bs);
    }
    assert.is(qemuCheck(f, '').exit, 0);
  } finally {
    t.cleanup();
  }
});

test('writes through aioco grow the refcount table exactly as QEMU does (byte-identical files)', () => {
  if (skip('layout')) return;
  const t = tempDir();
  try {
    for (const [bits, cs, n, range] of [
      [64, 512, 3000, 20000], // 64 refcounts per block, 64 table entries per cluster: the table moves twice
      [16, 512, 600, 2000],
      [1, 4096, 600, 2000],
      [16, 65536, 300, 1000],
    ] as const) {
      const a = t.file('a.qcow2');
      const q = t.file('q.qcow2');
      for (const f of [a, q]) qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=${cs}`, f, '64M');
      const writes: [number, number][] = [];
      for (let i = 0; i < n; i++) writes.push([((i * 37) % range) * cs, cs * (1 + (i % 3))]);
      const blk = blk_new_open(a, null, { driver: 'qcow2' }, BDRV_O_RDWR);
      try {
        for (const [off, len] of writes) assert.is(blk_pwrite(blk, off, len, new Uint8Array(len).fill(7), 0), 0);
      } finally {
        blk_unref(blk);
      }
      const script = t.file('cmds');
      writeFileSync(script, writes.map(([o, l]) => `write -P 7 ${o} ${l}`).join('\n') + '\n');
      assert.is(run('/bin/sh', ['-c', `/usr/bin/qemu-io ${q} < ${script} > /dev/null`]).code, 0);
      const h = readHeader(a);
      if (bits === 64) assert.ok(h.refcount_table_clusters > 1, 'the table grew');
      assert.is(run('/usr/bin/cmp', [a, q]).code, 0, `refcount_bits=${bits} cluster_size=${cs}: files differ`);
      assert.is(qemuCheck(a, '').exit, 0);
    }
  } finally {
    t.cleanup();
  }
});

test('metadata overlap check names the structure a write would hit', () => {
  if (skip('overlap')) return;
  const t = tempDir();
  try {
    const f = t.file('ov.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', f, '64M');
    qemuIo(f, 'write 0 64k');
    const bs = bdrv_open(f, { driver: 'qcow2' }, 0);
    try {
      const s = bs.opaque as BDRVQcow2State;
      s.overlap_check = QCOW2_OL_ALL;
      const C = 65536;
      assert.is(qcow2_check_metadata_overlap(bs, 0, 100, 10), QCOW2_OL_MAIN_HEADER);
      assert.is(qcow2_check_metadata_overlap(bs, 0, C + 8, 8), QCOW2_OL_REFCOUNT_TABLE);
      assert.is(qcow2_check_metadata_overlap(bs, 0, 2 * C, 1), QCOW2_OL_REFCOUNT_BLOCK);
      assert.is(qcow2_check_metadata_overlap(bs, 0, 3 * C, C), QCOW2_OL_ACTIVE_L1);
      assert.is(qcow2_check_metadata_overlap(bs, 0, 4 * C - 1, 2), QCOW2_OL_ACTIVE_L1, 'widened to whole clusters');
      assert.is(qcow2_check_metadata_overlap(bs, 0, 4 * C + 512, 512), QCOW2_OL_ACTIVE_L2);
      assert.is(qcow2_check_metadata_overlap(bs, QCOW2_OL_ACTIVE_L2, 4 * C, C), 0, 'ignored');
      assert.is(qcow2_check_metadata_overlap(bs, 0, 5 * C, C), 0, 'a data cluster');
      assert.is(qcow2_check_metadata_overlap(bs, 0, 0, 0), 0, 'an empty range');
      assert.is(qcow2_check_metadata_overlap(bs, QCOW2_OL_ACTIVE_L1, 3 * C, C), 0);
    } finally {
      bdrv_unref(bs);
    }
  } finally {
    t.cleanup();
  }
});

// ---------------------------------------------------------------------------------------------
// qemu-img check and repair, compared with the real one on the same corrupted images

const C64 = 0x10000;
/** Corruptions of the base image (64 MiB, 64 KiB clusters, data at 0..1M and 10M..10M+64k). */
const CORRUPTIONS: Record<string, (f: string) => void> = {
  clean: () => {},
  'leaked clusters past the data': (f) => {
    patch(f, 0x20000 + 2 * 22, be16(1));
    patch(f, 0x20000 + 2 * 23, be16(1));
    truncateSync(f, 24 * C64);
  },
  'zeroed refcount of a data cluster': (f) => patch(f, 0x20000 + 2 * 5, be16(0)),
  'refcount 2 on a COPIED cluster': (f) => patch(f, 0x20000 + 2 * 6, be16(2)),
  'L2 entry past the end of the file': (f) => patch(f, 0x40000 + 8, be64(0x8000000010000000n)),
  'L2 entry into the L1 table': (f) => patch(f, 0x40000 + 16, be64(0x8000000000030000n)),
  'unaligned L2 entry': (f) => patch(f, 0x40000 + 16, be64(0x8000000000070200n)),
  'unaligned preallocated zero cluster': (f) => patch(f, 0x40000 + 16, be64(0x8000000000070201n)),
  'L1 entry with reserved bits': (f) => patch(f, 0x30000, be64(0x8100000000040000n)),
  'L2 entry with reserved bits': (f) => patch(f, 0x40000 + 24, be64(0x8000000000080002n)),
  'refcount table entry with reserved bits': (f) => patch(f, 0x10000, be64(0x20001n)),
  'refcount block outside the image': (f) => patch(f, 0x10000 + 8, be64(0x1000000n)),
  'whole refcount block zeroed': (f) => patch(f, 0x20000, new Uint8Array(C64)),
  'L2 entry without COPIED': (f) => patch(f, 0x40000 + 24, be64(0x0000000000080000n)),
  'L1 entry without COPIED': (f) => patch(f, 0x30000, be64(0x0000000000040000n)),
};

function compareCheck(name: string, base: string, corrupt: (f: string) => void, t: ReturnType<typeof tempDir>): void {
  for (const mode of ['', 'leaks', 'all'] as const) {
    const a = t.file('a.qcow2');
    const q = t.file('q.qcow2');
    copyFileSync(base, a);
    corrupt(a);
    copyFileSync(a, q);
    const mine = aiocoCheck(a, mode);
    const real = qemuCheck(q, mode);
    const what = `${name}, -r ${mode || '(none)'}`;
    assert.is(mine.stderr, real.stderr, `${what}: stderr`);
    assert.equal(mine.counters, real.counters, `${what}: counters`);
    assert.is(mine.exit, real.exit, `${what}: exit code`);
    // The repaired image: QEMU judges aioco's result as it judges its own.
    if (mode) assert.is(qemuCheck(a, '').exit, qemuCheck(q, '').exit, `${what}: image after the check`);
  }
}

test('check and repair match qemu-img check on deliberately corrupted images', () => {
  if (skip('check vs qemu-img')) return;
  const t = tempDir();
  try {
    const base = t.file('base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '64M');
    qemuIo(base, 'write -P 0x11 0 1M', 'write -P 0x22 10M 64k');
    for (const [name, corrupt] of Object.entries(CORRUPTIONS)) compareCheck(name, base, corrupt, t);
  } finally {
    t.cleanup();
  }
});

test('check matches qemu-img on other image kinds: widths, 512-byte clusters, compressed, v2, extended L2, lazy dirty, bitmaps, zero clusters', () => {
  if (skip('check on image kinds')) return;
  const t = tempDir();
  const kinds: Record<string, (f: string) => void> = {};
  for (const n of [1, 8, 64]) {
    kinds[`refcount_bits=${n}`] = (f) => {
      qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${n},cluster_size=4k`, f, '16M');
      qemuIo(f, 'write -P 1 0 300k', 'write -P 2 8M 4k');
    };
  }
  kinds['512-byte clusters, 64-bit refcounts'] = (f) => {
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=64,cluster_size=512', f, '8M');
    qemuIo(f, 'write -P 1 0 1M', 'write -P 2 4M 64k');
  };
  kinds['compressed'] = (f) => {
    const r = t.file('raw.img');
    qemuImg('create', '-q', '-f', 'raw', r, '4M');
    qemuIo(r, 'write -P 3 0 2M');
    qemuImg('convert', '-c', '-O', 'qcow2', '-f', 'raw', r, f);
  };
  kinds['compat=0.10'] = (f) => {
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '16M');
    qemuIo(f, 'write -P 1 0 256k');
  };
  kinds['extended_l2'] = (f) => {
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', f, '16M');
    qemuIo(f, 'write -P 1 0 4k', 'write -P 2 1M 64k', 'write -z 2M 8k');
  };
  kinds['lazy refcounts, killed'] = (f) => {
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '16M');
    qemuIo(f, 'write -P 1 0 64k', 'sigraise 9');
  };
  kinds['zero and discarded clusters'] = (f) => {
    qemuImg('create', '-q', '-f', 'qcow2', f, '16M');
    qemuIo(f, 'write -P 1 0 256k', 'write -z 64k 64k', 'discard 128k 64k');
  };
  kinds['preallocation=metadata'] = (f) => qemuImg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', f, '16M');
  try {
    for (const [kind, build] of Object.entries(kinds)) {
      const base = t.file('kind.qcow2');
      build(base);
      compareCheck(`${kind}: clean`, base, () => {}, t);
      compareCheck(`${kind}: leak`, base, (f) => {
        const h = readHeader(f);
        const n = Math.ceil(statSync(f).size / h.cluster_size);
        setFileRefcount(f, n, 1n);
        truncateSync(f, (n + 1) * h.cluster_size);
      }, t);
      const e = readBe64(base, l2EntryAddr(base, 0));
      const off = Number(e & 0x00fffffffffffe00n);
      if (!(e & (1n << 62n)) && off) {
        compareCheck(`${kind}: zeroed data refcount`, base, (f) => setFileRefcount(f, off / readHeader(f).cluster_size, 0n), t);
      }
    }
  } finally {
    t.cleanup();
  }
});

test('check matches qemu-img on broken extended L2 bitmaps and compressed entries', () => {
  if (skip('extended L2 / compressed corruptions')) return;
  const t = tempDir();
  try {
    const ext = t.file('ext.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', ext, '16M');
    qemuIo(ext, 'write -P 1 0 4k', 'write -P 2 1M 64k', 'write -z 2M 8k');
    const comp = t.file('comp.qcow2');
    const raw = t.file('raw.img');
    qemuImg('create', '-q', '-f', 'raw', raw, '4M');
    qemuIo(raw, 'write -P 3 0 2M');
    qemuImg('convert', '-c', '-O', 'qcow2', '-f', 'raw', raw, comp);
    /** Address of the 16-byte extended L2 entry of guest cluster `gc`. */
    const l2x = (f: string, gc: number) => {
      const h = readHeader(f);
      const per = h.cluster_size / 16;
      const l1e = readBe64(f, h.l1_table_offset + 8 * Math.floor(gc / per));
      return Number(l1e & 0x00fffffffffffe00n) + 16 * (gc % per);
    };
    compareCheck('extended L2: allocated and zero bits both set', ext, (f) => {
      const a = l2x(f, 0);
      patch(f, a + 8, be64(readBe64(f, a + 8) | (1n << 32n) | 1n));
    }, t);
    compareCheck('extended L2: unallocated cluster with allocation bits', ext, (f) => patch(f, l2x(f, 5) + 8, be64(3n)), t);
    compareCheck('extended L2: unaligned preallocated zero cluster', ext, (f) => {
      const a = l2x(f, 0);
      patch(f, a, be64(readBe64(f, a) | 0x200n));
      patch(f, a + 8, be64(0xffffffff00000000n));
    }, t);
    compareCheck('COPIED set on a compressed entry', comp, (f) => {
      const a = l2EntryAddr(f, 1);
      patch(f, a, be64(readBe64(f, a) | (1n << 63n)));
    }, t);
    compareCheck('zeroed refcount of a cluster holding compressed data', comp, (f) => {
      const off = Number(readBe64(f, l2EntryAddr(f, 0)) & ((1n << 54n) - 1n));
      setFileRefcount(f, Math.floor(off / 65536), 0n);
    }, t);
  } finally {
    t.cleanup();
  }
});

test('check: a cluster referenced twice with 1-bit refcounts is an overflow error, as in QEMU', () => {
  if (skip('overflow check')) return;
  const t = tempDir();
  try {
    const base = t.file('b1.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1,cluster_size=4k', base, '4M');
    qemuIo(base, 'write -P 1 0 16k');
    compareCheck('double reference', base, (f) => {
      const e0 = readBe64(f, l2EntryAddr(f, 0));
      patch(f, l2EntryAddr(f, 1), be64(e0));
    }, t);
  } finally {
    t.cleanup();
  }
});

test('check -r all clears the corrupt bit and the dirty bit of a repaired image, as qemu-img does', () => {
  if (skip('corrupt and dirty bits')) return;
  const t = tempDir();
  try {
    const base = t.file('bits.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', base, '16M');
    qemuIo(base, 'write -P 1 0 64k', 'sigraise 9');
    assert.is(readHeader(base).incompatible_features, 1n, 'dirty after the kill');
    // Corrupt bit too (bit 1).
    patch(base, 72, be64(3n));
    compareCheck('dirty + corrupt', base, () => {}, t);
    const a = t.file('a.qcow2');
    copyFileSync(base, a);
    assert.is(aiocoCheck(a, 'all').exit, 0);
    assert.is(readHeader(a).incompatible_features, 0n, 'both bits cleared');
    const info = JSON.parse(qemuImg('info', '--output=json', a).stdout) as { 'dirty-flag': boolean; 'format-specific': { data: { corrupt: boolean } } };
    assert.is(info['dirty-flag'], false);
    assert.is(info['format-specific'].data.corrupt, false);
    // A plain check (read-only) changes nothing.
    const b = t.file('b.qcow2');
    copyFileSync(base, b);
    aiocoCheck(b, '');
    assert.is(readHeader(b).incompatible_features, 3n);
  } finally {
    t.cleanup();
  }
});

test('check counts persistent bitmaps (directory, tables, data) like qemu-img', () => {
  if (skip('bitmaps')) return;
  const t = tempDir();
  try {
    const base = t.file('bm.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
    qemuIo(base, 'write -P 1 0 256k');
    assert.is(qemuImg('bitmap', '--add', base, 'b0').code, 0);
    assert.is(qemuImg('bitmap', '--add', '-g', '512k', base, 'b1').code, 0);
    const mine = aiocoCheck(base, '');
    const real = qemuCheck(base, '');
    assert.is(mine.stderr, real.stderr);
    assert.equal(mine.counters, real.counters);
    assert.is(mine.exit, 0);
    // Leak one bitmap cluster's worth: the directory is counted, so only the new one leaks.
    const h = readHeader(base);
    const n = Math.ceil(statSync(base).size / h.cluster_size);
    setFileRefcount(base, n, 1n);
    truncateSync(base, (n + 1) * h.cluster_size);
    const mine2 = aiocoCheck(base, '');
    const real2 = qemuCheck(base, '');
    assert.is(mine2.stderr, real2.stderr);
    assert.is(mine2.stderr, `Leaked cluster ${n} refcount=1 reference=0\n`);
    assert.equal(mine2.counters, real2.counters);
  } finally {
    t.cleanup();
  }
});

test.run();
