import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BDRV_CHILD_IMAGE,
  BDRV_CHILD_PRIMARY,
  BDRV_O_RDWR,
  EIO,
  bdrv_open,
  bdrv_open_child,
  bdrv_poll_co,
  bdrv_unref,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  type BlockDriver,
  type BlockDriverState,
  type CoroutineFn,
} from '../../../../src/index.ts';
import { ensureRegistered, makeProto, releaseAll, st } from '../../../helpers/mem-driver.ts';
import { drain } from '../../../helpers/aio.ts';
import '../../../../examples/drivers/qcow2/qcow2.ts';
import {
  Qcow2Cache,
  qcow2_cache_clean_unused,
  qcow2_cache_create,
  qcow2_cache_depends_on_flush,
  qcow2_cache_destroy,
  qcow2_cache_discard,
  qcow2_cache_empty,
  qcow2_cache_entry_mark_dirty,
  qcow2_cache_flush,
  qcow2_cache_get,
  qcow2_cache_get_empty,
  qcow2_cache_is_table_offset,
  qcow2_cache_put,
  qcow2_cache_set_dependency,
  qcow2_cache_write,
} from '../../../../examples/drivers/qcow2/qcow2-cache.ts';
import { QCOW2_OL_ACTIVE_L1, QCOW2_OL_CACHED, type BDRVQcow2State } from '../../../../examples/drivers/qcow2/qcow2-state.ts';
import { captureStderr } from './qcow2-meta-helpers.ts';

// Facts: QEMU 7.2 block/qcow2-cache.c (LRU replacement, write-back with dependencies,
// depends_on_flush, discard, clean_unused) and qemu-block.md §6.8 (write ordering).

const T = 512; // table size (and cluster size) of the test caches

ensureRegistered(makeProto('q2mem'));

/** A format node that is just a BDRVQcow2State around a q2mem file: enough for the caches. */
const q2cache: BlockDriver = ensureRegistered({
  format_name: 'q2cachetest',
  bdrv_open(bs, options) {
    bdrv_open_child(null, options, 'file', bs, BDRV_CHILD_IMAGE | BDRV_CHILD_PRIMARY, false);
    const s = {
      cluster_size: T,
      cluster_bits: 9,
      overlap_check: 0,
      l1_size: 0,
      l1_table_offset: 0,
      l1_table: new BigUint64Array(0),
      refcount_table: new Float64Array(0),
      refcount_table_size: 0,
      refcount_table_offset: 0,
      max_refcount_table_index: 0,
      snapshots: [],
      snapshots_size: 0,
      autoclear_features: 0n,
      incompatible_features: 0n,
      signaled_corruption: false,
    } as unknown as BDRVQcow2State;
    bs.opaque = s;
  },
  bdrv_close(bs) {
    bs.opaque = null;
  },
});

interface Fixture {
  bs: BlockDriverState;
  s: BDRVQcow2State;
  log: string[];
  data: () => Uint8Array;
}

function setup(tables = 3, readOnly = false, mode = 'sync'): Fixture {
  const bs = bdrv_open('q2mem:x', { driver: q2cache.format_name, 'file.size': 16 * T, 'file.mode': mode }, readOnly ? 0 : BDRV_O_RDWR);
  const s = bs.opaque as BDRVQcow2State;
  s.l2_table_cache = qcow2_cache_create(bs, tables, T);
  s.refcount_block_cache = qcow2_cache_create(bs, tables, T);
  const file = bs.file!.bs;
  // Distinct bytes per table so reads are recognisable: table k is filled with k.
  for (let k = 0; k < 16; k++) st(file).data.fill(k, k * T, (k + 1) * T);
  return { bs, s, log: st(file).log, data: () => st(file).data };
}

function teardown(f: Fixture): void {
  qcow2_cache_destroy(f.s.l2_table_cache);
  qcow2_cache_destroy(f.s.refcount_block_cache);
  bdrv_unref(f.bs);
}

function co<T>(f: Fixture, body: () => CoroutineFn<T>): T {
  return bdrv_poll_co(f.bs, 'test', body);
}

function get(f: Fixture, c: Qcow2Cache, offset: number, empty = false): Uint8Array {
  const out = { table: null as Uint8Array | null };
  const ret = co(f, () => (empty ? qcow2_cache_get_empty(f.bs, c, offset, out) : qcow2_cache_get(f.bs, c, offset, out)));
  assert.is(ret, 0);
  return out.table!;
}

test('a miss reads the table from the file, a hit does not; the view is table_size bytes', () => {
  const f = setup();
  const c = f.s.l2_table_cache;
  const t = get(f, c, 3 * T);
  assert.is(t.length, T);
  assert.is(t[0], 3);
  assert.is(t[T - 1], 3);
  qcow2_cache_put(c, t);
  const again = get(f, c, 3 * T);
  assert.is(again, t, 'the same view comes back');
  qcow2_cache_put(c, again);
  assert.equal(f.log, [`read ${3 * T} ${T} 0`]);
  teardown(f);
});

test('get_empty does not read; the caller fills the table', () => {
  const f = setup();
  const c = f.s.refcount_block_cache;
  const t = get(f, c, 5 * T, true);
  t.fill(0xee);
  qcow2_cache_put(c, t);
  assert.equal(f.log, []);
  assert.is(qcow2_cache_is_table_offset(c, 5 * T), t);
  assert.is(qcow2_cache_is_table_offset(c, 6 * T), null);
  teardown(f);
});

test('eviction takes the least recently released table and writes it back first if dirty', () => {
  const f = setup(2);
  const c = f.s.l2_table_cache;
  const a = get(f, c, 1 * T);
  const b = get(f, c, 2 * T);
  a[0] = 0xaa;
  qcow2_cache_entry_mark_dirty(c, a);
  qcow2_cache_put(c, a); // released first: least recently used
  qcow2_cache_put(c, b);
  f.log.length = 0;
  const d = get(f, c, 4 * T);
  assert.equal(f.log, [`write ${1 * T} ${T} 0`, `read ${4 * T} ${T} 0`], 'dirty victim written before the new table is read');
  assert.is(f.data()[1 * T], 0xaa);
  assert.is(d, a, 'the victim slot is reused');
  assert.is(d[0], 4);
  qcow2_cache_put(c, d);
  // b is still cached; a is not.
  f.log.length = 0;
  qcow2_cache_put(c, get(f, c, 2 * T));
  assert.equal(f.log, []);
  qcow2_cache_put(c, get(f, c, 1 * T));
  assert.equal(f.log, [`read ${1 * T} ${T} 0`], 'a was evicted, so it is read again');
  teardown(f);
});

test('a referenced table is never evicted; a cache with every table referenced throws', () => {
  const f = setup(2);
  const c = f.s.l2_table_cache;
  const a = get(f, c, 1 * T);
  const b = get(f, c, 2 * T);
  let err: unknown = null;
  try {
    get(f, c, 3 * T);
  } catch (e) {
    err = e;
  }
  assert.instance(err, Error);
  assert.is((err as Error).message, 'qcow2: L2 table cache is full');
  qcow2_cache_put(c, a);
  qcow2_cache_put(c, b);
  teardown(f);
});

test('flush writes only dirty tables, in slot order, then flushes the file; write does not flush', () => {
  const f = setup(3);
  const c = f.s.l2_table_cache;
  const a = get(f, c, 7 * T);
  const b = get(f, c, 2 * T);
  const d = get(f, c, 9 * T);
  qcow2_cache_entry_mark_dirty(c, d);
  qcow2_cache_entry_mark_dirty(c, a);
  for (const t of [a, b, d]) qcow2_cache_put(c, t);
  const slots = [7, 9].map((k) => c.tables.indexOf(qcow2_cache_is_table_offset(c, k * T)!));
  const order = slots[0]! < slots[1]! ? [7, 9] : [9, 7];
  f.log.length = 0;
  assert.is(co(f, () => qcow2_cache_write(f.bs, c)), 0);
  assert.equal(f.log, order.map((k) => `write ${k * T} ${T} 0`));
  f.log.length = 0;
  assert.is(co(f, () => qcow2_cache_flush(f.bs, c)), 0);
  assert.equal(f.log, ['flush', 'flush done'], 'nothing dirty any more: only the file flush');
  teardown(f);
});

test('a cache depending on another writes the other (and flushes) before its own tables', () => {
  const f = setup(2);
  const l2 = f.s.l2_table_cache;
  const rb = f.s.refcount_block_cache;
  const r = get(f, rb, 3 * T);
  qcow2_cache_entry_mark_dirty(rb, r);
  qcow2_cache_put(rb, r);
  const l = get(f, l2, 6 * T);
  qcow2_cache_entry_mark_dirty(l2, l);
  qcow2_cache_put(l2, l);
  assert.is(co(f, () => qcow2_cache_set_dependency(f.bs, l2, rb)), 0);
  f.log.length = 0;
  assert.is(co(f, () => qcow2_cache_flush(f.bs, l2)), 0);
  assert.equal(f.log, [`write ${3 * T} ${T} 0`, 'flush', 'flush done', `write ${6 * T} ${T} 0`, 'flush', 'flush done']);
  assert.is(l2.depends, null, 'the dependency is gone once satisfied');
  teardown(f);
});

test('evicting a dirty table of a dependent cache flushes the dependency first', () => {
  const f = setup(1);
  const l2 = f.s.l2_table_cache;
  const rb = f.s.refcount_block_cache;
  const r = get(f, rb, 3 * T);
  qcow2_cache_entry_mark_dirty(rb, r);
  qcow2_cache_put(rb, r);
  const l = get(f, l2, 6 * T);
  qcow2_cache_entry_mark_dirty(l2, l);
  qcow2_cache_put(l2, l);
  co(f, () => qcow2_cache_set_dependency(f.bs, l2, rb));
  f.log.length = 0;
  qcow2_cache_put(l2, get(f, l2, 8 * T));
  assert.equal(f.log, [`write ${3 * T} ${T} 0`, 'flush', 'flush done', `write ${6 * T} ${T} 0`, `read ${8 * T} ${T} 0`]);
  teardown(f);
});

test('set_dependency: no chains (the dependency\'s own dependency is flushed now) and a new target flushes the old one', () => {
  const f = setup(2);
  const l2 = f.s.l2_table_cache;
  const rb = f.s.refcount_block_cache;
  const r = get(f, rb, 3 * T);
  qcow2_cache_entry_mark_dirty(rb, r);
  qcow2_cache_put(rb, r);
  co(f, () => qcow2_cache_set_dependency(f.bs, rb, l2)); // rb depends on l2 (nothing dirty in l2)
  const l = get(f, l2, 6 * T);
  qcow2_cache_entry_mark_dirty(l2, l);
  qcow2_cache_put(l2, l);
  f.log.length = 0;
  // l2 -> rb while rb -> l2: rb's dependency (l2) is flushed first, breaking the cycle.
  assert.is(co(f, () => qcow2_cache_set_dependency(f.bs, l2, rb)), 0);
  assert.equal(f.log, [`write ${6 * T} ${T} 0`, 'flush', 'flush done']);
  assert.is(rb.depends, null);
  assert.is(l2.depends, rb);
  teardown(f);
});

test('depends_on_flush: earlier writes are flushed before the first table write, once', () => {
  const f = setup(2);
  const l2 = f.s.l2_table_cache;
  const rb = f.s.refcount_block_cache;
  // An L2 update that reached the file but is not stable yet.
  const l = get(f, l2, 6 * T);
  qcow2_cache_entry_mark_dirty(l2, l);
  qcow2_cache_put(l2, l);
  co(f, () => qcow2_cache_write(f.bs, l2));
  const a = get(f, rb, 1 * T);
  const b = get(f, rb, 2 * T);
  qcow2_cache_entry_mark_dirty(rb, a);
  qcow2_cache_entry_mark_dirty(rb, b);
  qcow2_cache_put(rb, a);
  qcow2_cache_put(rb, b);
  qcow2_cache_depends_on_flush(rb);
  f.log.length = 0;
  co(f, () => qcow2_cache_write(f.bs, rb));
  assert.equal(f.log.slice(0, 2), ['flush', 'flush done']);
  assert.equal(f.log.slice(2).sort(), [`write ${1 * T} ${T} 0`, `write ${2 * T} ${T} 0`].sort());
  assert.is(rb.depends_on_flush, false);
  teardown(f);
});

test('discard drops a dirty table without writing it; empty forgets everything after a flush', () => {
  const f = setup(2);
  const c = f.s.l2_table_cache;
  const a = get(f, c, 1 * T);
  qcow2_cache_entry_mark_dirty(c, a);
  qcow2_cache_put(c, a);
  qcow2_cache_discard(c, a);
  assert.is(qcow2_cache_is_table_offset(c, 1 * T), null);
  const b = get(f, c, 2 * T);
  qcow2_cache_entry_mark_dirty(c, b);
  qcow2_cache_put(c, b);
  f.log.length = 0;
  assert.is(co(f, () => qcow2_cache_empty(f.bs, c)), 0);
  assert.equal(f.log, [`write ${2 * T} ${T} 0`, 'flush', 'flush done']);
  assert.is(qcow2_cache_is_table_offset(c, 2 * T), null);
  teardown(f);
});

test('clean_unused drops clean tables not used since the previous call, keeps dirty and referenced ones', () => {
  const f = setup(3);
  const c = f.s.l2_table_cache;
  qcow2_cache_put(c, get(f, c, 1 * T));
  const d = get(f, c, 2 * T);
  qcow2_cache_entry_mark_dirty(c, d);
  qcow2_cache_put(c, d);
  const held = get(f, c, 3 * T);
  qcow2_cache_clean_unused(c); // first round: everything was used since "the last call"
  assert.ok(qcow2_cache_is_table_offset(c, 1 * T));
  qcow2_cache_clean_unused(c); // second round: 1 unused since, clean -> dropped
  assert.is(qcow2_cache_is_table_offset(c, 1 * T), null);
  assert.ok(qcow2_cache_is_table_offset(c, 2 * T), 'dirty survives');
  assert.ok(qcow2_cache_is_table_offset(c, 3 * T), 'referenced survives');
  qcow2_cache_put(c, held);
  teardown(f);
});

test('an unaligned offset is a corruption (-EIO) and reads nothing', () => {
  const f = setup(2, true);
  const c = f.s.l2_table_cache;
  const out = { table: null as Uint8Array | null };
  const { value, stderr } = captureStderr(() => co(f, () => qcow2_cache_get(f.bs, c, T + 8, out)));
  assert.is(value, -EIO);
  assert.is(out.table, null);
  assert.is(stderr, `qcow2: Image is corrupt: Cannot get entry from L2 table cache: offset 0x${(T + 8).toString(16)} is unaligned; further non-fatal corruption events will be suppressed\n`);
  assert.equal(f.log, []);
  teardown(f);
});

test('offset 0 (the header, and the mark of an empty slot) is a corruption, not a hit on an empty slot', () => {
  const f = setup(2, true);
  const c = f.s.refcount_block_cache;
  const out = { table: null as Uint8Array | null };
  const { value, stderr } = captureStderr(() => co(f, () => qcow2_cache_get_empty(f.bs, c, 0, out)));
  assert.is(value, -EIO);
  assert.is(out.table, null);
  assert.is(stderr, 'qcow2: Image is corrupt: Cannot get entry from refcount block cache: offset 0 is the image header; further non-fatal corruption events will be suppressed\n');
  assert.ok(c.entries.every((e) => e.ref === 0));
  teardown(f);
});

test('write-back refuses to overwrite other metadata (overlap check) and leaves the table dirty', () => {
  const f = setup(2, true);
  const c = f.s.l2_table_cache;
  f.s.overlap_check = QCOW2_OL_CACHED;
  f.s.l1_size = 1;
  f.s.l1_table_offset = 4 * T;
  const a = get(f, c, 4 * T);
  qcow2_cache_entry_mark_dirty(c, a);
  qcow2_cache_put(c, a);
  f.log.length = 0;
  const { value, stderr } = captureStderr(() => co(f, () => qcow2_cache_flush(f.bs, c)));
  assert.is(value, -EIO);
  assert.ok(stderr.includes('Preventing invalid write on metadata (overlaps with active L1 table)'));
  assert.equal(f.log, []);
  assert.is(c.entries[c.tables.indexOf(a)]!.dirty, true);
  assert.is(QCOW2_OL_ACTIVE_L1 & f.s.overlap_check, QCOW2_OL_ACTIVE_L1);
  teardown(f);
});

test('two coroutines loading the same table while the read is in flight share one slot', () => {
  const f = setup(3, false, 'hold');
  const c = f.s.l2_table_cache;
  const got: (Uint8Array | null)[] = [];
  for (let k = 0; k < 2; k++) {
    const co = qemu_coroutine_create(function* () {
      const out = { table: null as Uint8Array | null };
      assert.is(yield* qcow2_cache_get(f.bs, c, 7 * T, out), 0);
      got.push(out.table);
    }, undefined, `get${k}`);
    qemu_coroutine_enter(co);
  }
  // Both are reading (the first one's slot is pinned, so the second took another slot).
  assert.equal(f.log, [`read ${7 * T} ${T} 0`, `read ${7 * T} ${T} 0`]);
  assert.is(releaseAll(f.bs.file!.bs), 2);
  drain(f.bs.aio_context);
  assert.is(got.length, 2);
  assert.is(got[0], got[1], 'one table, two references');
  assert.is(got[0]![0], 7);
  assert.is(c.entries.filter((e) => e.offset === 7 * T).length, 1);
  assert.is(c.entries[c.tables.indexOf(got[0]!)]!.ref, 2);
  qcow2_cache_put(c, got[0]!);
  qcow2_cache_put(c, got[1]!);
  assert.ok(c.entries.every((e) => e.ref === 0));
  teardown(f);
});

test('a slot being read into is pinned: a concurrent miss for another table takes another slot', () => {
  const f = setup(2, false, 'hold');
  const c = f.s.l2_table_cache;
  const got = new Map<number, Uint8Array>();
  for (const k of [7, 9]) {
    const co = qemu_coroutine_create(function* () {
      const out = { table: null as Uint8Array | null };
      assert.is(yield* qcow2_cache_get(f.bs, c, k * T, out), 0);
      got.set(k, out.table!);
    }, undefined, `get${k}`);
    qemu_coroutine_enter(co);
  }
  assert.is(releaseAll(f.bs.file!.bs), 2);
  drain(f.bs.aio_context);
  assert.is(got.get(7)![0], 7);
  assert.is(got.get(9)![0], 9);
  assert.is.not(got.get(7), got.get(9));
  qcow2_cache_put(c, got.get(7)!);
  qcow2_cache_put(c, got.get(9)!);
  teardown(f);
});

test('a view that does not belong to the cache is refused', () => {
  const f = setup(2);
  assert.throws(() => qcow2_cache_put(f.s.l2_table_cache, new Uint8Array(T)), /does not belong/);
  assert.throws(() => qcow2_cache_create(f.bs, 2, 768), /bad geometry/);
  teardown(f);
});

test.run();
