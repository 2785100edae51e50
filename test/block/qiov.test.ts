// QEMUIOVector and the iov_* helpers (src/block/qiov.ts), QEMU 7.2's include/qemu/iov.h and
// util/iov.c. The intent of QEMU's tests/unit/test-iov.c: every operation is checked against a
// reference model (a flat Uint8Array holding the vector's logical content) over random
// layouts from a seeded PRNG (deterministic), plus the edge rules: empty elements, offset ==
// size, and the exact errors for what QEMU asserts. No S-number applies (the reference facts
// cover the AIO core only); each test is named after the rule it checks.
//
// src/index.ts does not export the block layer yet, so this file imports src/block/qiov.ts.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Buffer } from 'node:buffer';
import { EINVAL, QemuError } from '../../src/index.ts';
import {
  IOV_MAX,
  QEMUIOVector,
  QEMU_IOVEC_INIT_BUF,
  iov_discard_back,
  iov_discard_front,
  iov_from_buf,
  iov_memset,
  iov_size,
  iov_to_buf,
  qemu_iovec_add,
  qemu_iovec_buf,
  qemu_iovec_clone,
  qemu_iovec_compare,
  qemu_iovec_concat,
  qemu_iovec_concat_iov,
  qemu_iovec_destroy,
  qemu_iovec_discard_back,
  qemu_iovec_from_buf,
  qemu_iovec_init,
  qemu_iovec_init_buf,
  qemu_iovec_init_extended,
  qemu_iovec_init_external,
  qemu_iovec_init_slice,
  qemu_iovec_is_shared,
  qemu_iovec_is_zero,
  qemu_iovec_memset,
  qemu_iovec_reset,
  qemu_iovec_slice,
  qemu_iovec_subvec_niov,
  qemu_iovec_to_buf,
  type IOVCursor,
} from '../../src/block/qiov.ts';
import { prng } from '../helpers/prng.ts';

// ---------------------------------------------------------------------------------------
// Helpers

type Rng = () => number;
/** Integer in [lo, hi]. */
function rint(rng: Rng, lo: number, hi: number): number {
  return lo + Math.floor(rng() * (hi - lo + 1));
}
function randomBytes(rng: Rng, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = rng() < 0.1 ? 0 : rint(rng, 1, 255);
  return b;
}

const isQemuErr = (msg: string) => (e: unknown) => e instanceof QemuError && (e as Error).message === msg;

/** The logical content of iov[0..cnt), read element by element (independent of to_buf). */
function flat(iov: Uint8Array[], cnt: number): Uint8Array {
  let n = 0;
  for (let i = 0; i < cnt; i++) n += iov[i]!.length;
  const out = new Uint8Array(n);
  let k = 0;
  for (let i = 0; i < cnt; i++) for (const b of iov[i]!) out[k++] = b;
  return out;
}
const content = (q: QEMUIOVector) => flat(q.iov, q.niov);
const arr = (u: Uint8Array) => Array.from(u);
function concatBytes(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let k = 0;
  for (const p of parts) {
    out.set(p, k);
    k += p.length;
  }
  return out;
}

interface Layout {
  lens: number[];
  /** Element views, in logical order. */
  views: Uint8Array[];
  /** The backing memories the views live on (with gaps between elements). */
  backings: Uint8Array[];
  model: Uint8Array;
}

/**
 * A random iovec: `n` elements (some empty), placed without overlap, in shuffled order and
 * with gaps, on 1-3 backings, each a SharedArrayBuffer or an ordinary ArrayBuffer.
 */
function makeLayout(rng: Rng, opts: { maxElems?: number; maxLen?: number; shared?: boolean } = {}): Layout {
  const n = rint(rng, 0, opts.maxElems ?? 10);
  const maxLen = opts.maxLen ?? 24;
  const lens: number[] = [];
  for (let i = 0; i < n; i++) lens.push(rng() < 0.2 ? 0 : rint(rng, 1, rng() < 0.15 ? maxLen * 8 : maxLen));
  const nb = rint(rng, 1, 3);
  const owner = lens.map(() => rint(rng, 0, nb - 1));
  const backings: Uint8Array[] = [];
  const views: Uint8Array[] = new Array(n);
  for (let b = 0; b < nb; b++) {
    const mine = lens.map((_, i) => i).filter((i) => owner[i] === b);
    for (let i = mine.length - 1; i > 0; i--) {
      const j = rint(rng, 0, i);
      [mine[i], mine[j]] = [mine[j]!, mine[i]!];
    }
    const gaps = mine.map(() => rint(rng, 0, 7));
    const total = mine.reduce((s, i) => s + lens[i]!, 0) + gaps.reduce((s, g) => s + g, 0) + 8;
    const shared = opts.shared ?? rng() < 0.5;
    const mem = new Uint8Array(shared ? new SharedArrayBuffer(total) : new ArrayBuffer(total));
    mem.set(randomBytes(rng, total));
    let pos = rint(rng, 0, 4);
    mine.forEach((i, k) => {
      views[i] = mem.subarray(pos, pos + lens[i]!);
      pos += lens[i]! + gaps[k]!;
    });
    backings.push(mem);
  }
  return { lens, views, backings, model: flat(views, n) };
}

/** An owned (qemu_iovec_add) or external (qemu_iovec_init_external) vector over the layout. */
function qiovOf(L: Layout, external: boolean): QEMUIOVector {
  const q = new QEMUIOVector();
  if (external) {
    qemu_iovec_init_external(q, L.views.slice(), L.views.length);
  } else {
    qemu_iovec_init(q, 0);
    for (const v of L.views) qemu_iovec_add(q, v, v.length);
  }
  return q;
}

/** Snapshot of the backings, to prove an operation wrote nothing outside the elements. */
function snapshot(L: Layout): Uint8Array[] {
  return L.backings.map((b) => b.slice());
}
/** The backings expected when the elements hold `model` and nothing else changed. */
function expectBackings(L: Layout, snap: Uint8Array[], model: Uint8Array): void {
  const exp = snap.map((s) => s.slice());
  let k = 0;
  for (const v of L.views) {
    const b = L.backings.findIndex((m) => m.buffer === v.buffer);
    const base = v.byteOffset - L.backings[b]!.byteOffset;
    for (let i = 0; i < v.length; i++) exp[b]![base + i] = model[k++]!;
  }
  L.backings.forEach((m, b) => assert.equal(arr(m), arr(exp[b]!), `backing ${b}`));
}

/** Start offsets of elements with lengths `lens`. */
function starts(lens: number[]): number[] {
  const s: number[] = [];
  let p = 0;
  for (const l of lens) {
    s.push(p);
    p += l;
  }
  return s;
}

/**
 * Reference for QEMU's slice walk, on absolute positions: the element a range boundary `pos`
 * falls in is the first one that starts exactly at `pos` or ends after it.
 */
function refFind(lens: number[], pos: number): number {
  let start = 0;
  for (let i = 0; i < lens.length; i++) {
    const end = start + lens[i]!;
    if (start === pos || end > pos) return i;
    start = end;
  }
  return lens.length;
}
function refSlice(lens: number[], offset: number, len: number) {
  const st = starts(lens);
  const index = refFind(lens, offset);
  const head = index < lens.length ? offset - st[index]! : 0;
  const e = offset + len;
  const j = refFind(lens, e);
  const t = j < lens.length ? e - st[j]! : 0;
  return t > 0
    ? { index, head, niov: j + 1 - index, tail: st[j]! + lens[j]! - e }
    : { index, head, niov: j - index, tail: 0 };
}

const ITER = 300;

// ---------------------------------------------------------------------------------------
// Copying data: to_buf / from_buf / memset against the model

test('qemu_iovec_to_buf and iov_to_buf copy min(bytes, size - offset) bytes of the logical content and return that count', () => {
  const rng = prng(1);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const q = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    assert.is(q.size, size);
    const offset = rint(rng, 0, size);
    const bytes = rng() < 0.1 ? Infinity : rint(rng, 0, size + 10);
    const n = Math.min(bytes, size - offset);
    const extra = rint(rng, 0, 5);
    const buf = new Uint8Array(n + extra).fill(0xee);
    const snap = snapshot(L);
    const useQiov = rng() < 0.5;
    const ret = useQiov ? qemu_iovec_to_buf(q, offset, buf, bytes) : iov_to_buf(L.views, L.views.length, offset, buf, bytes);
    assert.is(ret, n);
    assert.equal(arr(buf.subarray(0, n)), arr(L.model.subarray(offset, offset + n)));
    assert.equal(arr(buf.subarray(n)), new Array(extra).fill(0xee), 'bytes past the count are left alone');
    expectBackings(L, snap, L.model);
  }
});

test('qemu_iovec_from_buf and iov_from_buf write only the elements, at the logical offset, and return the count', () => {
  const rng = prng(2);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const q = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    const offset = rint(rng, 0, size);
    const bytes = rng() < 0.1 ? Infinity : rint(rng, 0, size + 10);
    const n = Math.min(bytes, size - offset);
    const data = randomBytes(rng, n + rint(rng, 0, 5));
    const snap = snapshot(L);
    const ret = rng() < 0.5 ? qemu_iovec_from_buf(q, offset, data, bytes) : iov_from_buf(L.views, L.views.length, offset, data, bytes);
    assert.is(ret, n);
    const model = L.model.slice();
    model.set(data.subarray(0, n), offset);
    assert.equal(arr(content(q)), arr(model));
    expectBackings(L, snap, model);
  }
});

test('qemu_iovec_memset and iov_memset fill min(bytes, size - offset) bytes with fillc & 0xff', () => {
  const rng = prng(3);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const q = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    const offset = rint(rng, 0, size);
    const bytes = rng() < 0.1 ? Infinity : rint(rng, 0, size + 10);
    const n = Math.min(bytes, size - offset);
    const fillc = rint(rng, -300, 600);
    const snap = snapshot(L);
    const ret = rng() < 0.5 ? qemu_iovec_memset(q, offset, fillc, bytes) : iov_memset(L.views, L.views.length, offset, fillc, bytes);
    assert.is(ret, n);
    const model = L.model.slice();
    model.fill(fillc & 0xff, offset, offset + n);
    assert.equal(arr(content(q)), arr(model));
    expectBackings(L, snap, model);
  }
});

test('iov_* count only iov_cnt elements, not the whole array', () => {
  const a = new Uint8Array([1, 2, 3]);
  const b = new Uint8Array([4, 5]);
  const c = new Uint8Array([6, 7, 8, 9]);
  const iov = [a, b, c];
  assert.is(iov_size(iov, 2), 5);
  assert.is(iov_size(iov, 0), 0);
  const buf = new Uint8Array(9);
  assert.is(iov_to_buf(iov, 2, 1, buf, Infinity), 4);
  assert.equal(arr(buf.subarray(0, 5)), [2, 3, 4, 5, 0]);
  assert.is(iov_from_buf(iov, 2, 4, new Uint8Array([50, 60]), 2), 1);
  assert.equal([arr(a), arr(b), arr(c)], [[1, 2, 3], [4, 50], [6, 7, 8, 9]]);
  assert.is(iov_memset(iov, 2, 0, 0, Infinity), 5);
  assert.equal([arr(a), arr(b), arr(c)], [[0, 0, 0], [0, 0], [6, 7, 8, 9]]);
  const q = new QEMUIOVector();
  qemu_iovec_init_external(q, iov, 2);
  assert.equal([q.niov, q.nalloc, q.size], [2, -1, 5]);
  assert.ok(q.iov === iov, 'init_external uses the caller array');
});

test('offset == size copies nothing and returns 0; offset > size throws QEMU\'s assertion', () => {
  const q = new QEMUIOVector();
  qemu_iovec_init(q, 1);
  qemu_iovec_add(q, new Uint8Array(4), 4);
  qemu_iovec_add(q, new Uint8Array(0), 0);
  qemu_iovec_add(q, new Uint8Array(3), 3);
  const buf = new Uint8Array(8);
  assert.is(qemu_iovec_to_buf(q, 7, buf, 5), 0);
  assert.is(qemu_iovec_from_buf(q, 7, buf, 5), 0);
  assert.is(qemu_iovec_memset(q, 7, 1, 5), 0);
  assert.is(qemu_iovec_to_buf(q, 0, buf, 0), 0);
  assert.throws(
    () => qemu_iovec_to_buf(q, 8, buf, 1),
    isQemuErr("qemu_iovec_to_buf: Assertion 'offset == 0' failed (offset 8 is beyond the end of the iovec (7 bytes))"),
  );
  assert.throws(
    () => qemu_iovec_from_buf(q, 9, buf, 0),
    isQemuErr("qemu_iovec_from_buf: Assertion 'offset == 0' failed (offset 9 is beyond the end of the iovec (7 bytes))"),
  );
  assert.throws(
    () => qemu_iovec_memset(q, 8, 0, 1),
    isQemuErr("qemu_iovec_memset: Assertion 'offset == 0' failed (offset 8 is beyond the end of the iovec (7 bytes))"),
  );
  assert.throws(
    () => iov_to_buf(q.iov, 1, 5, buf, 1),
    isQemuErr("iov_to_buf: Assertion 'offset == 0' failed (offset 5 is beyond the end of the iovec (4 bytes))"),
  );
  assert.throws(
    () => iov_from_buf([], 0, 1, buf, 1),
    isQemuErr("iov_from_buf: Assertion 'offset == 0' failed (offset 1 is beyond the end of the iovec (0 bytes))"),
  );
  assert.throws(
    () => iov_memset([], 0, 1, 0, 1),
    isQemuErr("iov_memset: Assertion 'offset == 0' failed (offset 1 is beyond the end of the iovec (0 bytes))"),
  );
});

test('a buffer shorter than the bytes to copy throws before anything is copied', () => {
  const a = new Uint8Array([1, 2, 3]);
  const b = new Uint8Array([4, 5, 6]);
  const q = new QEMUIOVector();
  qemu_iovec_init_external(q, [a, b], 2);
  const small = new Uint8Array(4);
  assert.throws(() => qemu_iovec_to_buf(q, 1, small, 10), isQemuErr('qemu_iovec_to_buf: buf holds 4 bytes, fewer than the 5 to copy'));
  assert.equal(arr(small), [0, 0, 0, 0]);
  assert.throws(() => qemu_iovec_from_buf(q, 0, small, Infinity), isQemuErr('qemu_iovec_from_buf: buf holds 4 bytes, fewer than the 6 to copy'));
  assert.equal([arr(a), arr(b)], [[1, 2, 3], [4, 5, 6]]);
  // bytes larger than buf is fine when the vector ends first.
  assert.is(qemu_iovec_to_buf(q, 2, small, 100), 4);
  assert.equal(arr(small), [3, 4, 5, 6]);
});

test('bad numbers and counts throw clear errors instead of indexing from the end', () => {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(8), 8);
  const buf = new Uint8Array(8);
  assert.throws(() => qemu_iovec_to_buf(q, -1, buf, 1), isQemuErr('qemu_iovec_to_buf: offset must be a non-negative integer, got -1'));
  assert.throws(() => qemu_iovec_to_buf(q, 1.5, buf, 1), isQemuErr('qemu_iovec_to_buf: offset must be a non-negative integer, got 1.5'));
  assert.throws(
    () => qemu_iovec_memset(q, 0, 0, NaN),
    isQemuErr('qemu_iovec_memset: bytes must be a non-negative integer or Infinity, got NaN'),
  );
  assert.throws(
    () => qemu_iovec_from_buf(q, 0, buf, 2.5),
    isQemuErr('qemu_iovec_from_buf: bytes must be a non-negative integer or Infinity, got 2.5'),
  );
  assert.throws(() => iov_size([buf], 2), isQemuErr('iov_size: iov_cnt 2 exceeds the iovec array (1 elements)'));
  assert.throws(() => iov_size([buf], -1), isQemuErr('iov_size: iov_cnt must be a non-negative integer, got -1'));
  assert.throws(
    () => qemu_iovec_init_external(new QEMUIOVector(), [buf], 3),
    isQemuErr('qemu_iovec_init_external: niov 3 exceeds the iovec array (1 elements)'),
  );
  assert.throws(() => qemu_iovec_init(new QEMUIOVector(), -2), isQemuErr('qemu_iovec_init: alloc_hint must be a non-negative integer, got -2'));
  assert.throws(() => qemu_iovec_is_zero(q, 0, -1), isQemuErr('qemu_iovec_is_zero: bytes must be a non-negative integer, got -1'));
  assert.throws(() => qemu_iovec_subvec_niov(q, -3, 1), isQemuErr('qemu_iovec_subvec_niov: offset must be a non-negative integer, got -3'));
  assert.throws(() => qemu_iovec_slice(q, 0, 0.5), isQemuErr('qemu_iovec_slice: len must be a non-negative integer, got 0.5'));
  assert.throws(() => qemu_iovec_discard_back(q, -1), isQemuErr('qemu_iovec_discard_back: bytes must be a non-negative integer, got -1'));
  assert.throws(
    () => qemu_iovec_concat(new QEMUIOVector(), q, -1, 1),
    isQemuErr('qemu_iovec_concat: soffset must be a non-negative integer, got -1'),
  );
  assert.throws(
    () => iov_discard_front({ iov: [buf], iov_cnt: 1 }, -1),
    isQemuErr('iov_discard_front: bytes must be a non-negative integer or Infinity, got -1'),
  );
  assert.throws(
    () => iov_discard_back({ iov: [buf], iov_cnt: 2 }, 1),
    isQemuErr('iov_discard_back: iov_cnt 2 exceeds the iovec array (1 elements)'),
  );
  assert.throws(() => qemu_iovec_init_slice(new QEMUIOVector(), q, 0, -1), isQemuErr('qemu_iovec_init_slice: len must be a non-negative integer, got -1'));
  assert.equal(arr(content(q)), [0, 0, 0, 0, 0, 0, 0, 0], 'nothing was written');
});

// ---------------------------------------------------------------------------------------
// Building vectors

test('qemu_iovec_init_buf does not copy: the element is the buffer or a view of its first len bytes', () => {
  const mem = new Uint8Array(new SharedArrayBuffer(16));
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, mem, 16);
  assert.equal([q.niov, q.nalloc, q.size], [1, -1, 16]);
  assert.ok(q.iov[0] === mem, 'whole buffer: the element is the buffer itself');
  assert.ok(qemu_iovec_buf(q) === mem);

  const part = mem.subarray(4, 12);
  qemu_iovec_init_buf(q, part, 5);
  assert.equal([q.niov, q.nalloc, q.size], [1, -1, 5]);
  assert.ok(q.iov[0]!.buffer === mem.buffer);
  assert.is(q.iov[0]!.byteOffset, 4);
  assert.is(q.iov[0]!.length, 5);
  assert.is(qemu_iovec_from_buf(q, 0, new Uint8Array([1, 2, 3, 4, 5, 6]), 6), 5);
  assert.equal(arr(mem), [0, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0], 'writes land in the caller buffer');

  const q2 = QEMU_IOVEC_INIT_BUF(mem, 2);
  assert.equal([q2.niov, q2.nalloc, q2.size, q2.iov[0]!.byteOffset, q2.iov[0]!.length], [1, -1, 2, 0, 2]);

  const q3 = QEMU_IOVEC_INIT_BUF(null, 0);
  assert.equal([q3.niov, q3.nalloc, q3.size, q3.iov[0]!.length], [1, -1, 0, 0]);
  assert.throws(() => qemu_iovec_init_buf(q, null, 1), isQemuErr('qemu_iovec_init_buf: len 1 exceeds buf (null)'));
  assert.throws(() => qemu_iovec_init_buf(q, mem, 17), isQemuErr('qemu_iovec_init_buf: len 17 exceeds buf (16 bytes)'));
});

test('a vector that does not own its array cannot grow or be reset (nalloc == -1)', () => {
  const mem = new Uint8Array(8);
  const e = new QEMUIOVector();
  qemu_iovec_init_external(e, [mem], 1);
  const b = QEMU_IOVEC_INIT_BUF(mem, 8);
  const growMsg =
    "Assertion 'qiov->nalloc != -1' failed (the vector does not own its iovec array: it was made by qemu_iovec_init_external or qemu_iovec_init_buf)";
  for (const q of [e, b]) {
    assert.throws(() => qemu_iovec_add(q, mem, 1), isQemuErr(`qemu_iovec_add: ${growMsg}`));
    assert.throws(() => qemu_iovec_reset(q), isQemuErr(`qemu_iovec_reset: ${growMsg}`));
    assert.throws(
      () => qemu_iovec_concat(q, e, 0, 1),
      isQemuErr(
        "qemu_iovec_concat: Assertion 'dst->nalloc != -1' failed (the vector does not own its iovec array: it was made by qemu_iovec_init_external or qemu_iovec_init_buf)",
      ),
    );
    assert.throws(
      () => qemu_iovec_concat_iov(q, [mem], 1, 0, Infinity),
      isQemuErr(
        "qemu_iovec_concat_iov: Assertion 'dst->nalloc != -1' failed (the vector does not own its iovec array: it was made by qemu_iovec_init_external or qemu_iovec_init_buf)",
      ),
    );
    assert.throws(() => qemu_iovec_clone(q, e), isQemuErr(`qemu_iovec_clone: ${growMsg}`));
    // sbytes 0 returns before the check, as in QEMU; cloning nothing adds nothing.
    assert.is(qemu_iovec_concat_iov(q, [mem], 1, 999, 0), 0);
    qemu_iovec_clone(q, new QEMUIOVector());
    assert.equal([q.niov, q.size], [1, 8]);
  }
  assert.throws(
    () => qemu_iovec_buf(e),
    isQemuErr(
      "qemu_iovec_buf: Assertion 'qiov->nalloc == -1 && qiov->iov == &qiov->local_iov' failed (the vector was not made by qemu_iovec_init_buf)",
    ),
  );
  const owned = new QEMUIOVector();
  assert.throws(
    () => qemu_iovec_buf(owned),
    isQemuErr(
      "qemu_iovec_buf: Assertion 'qiov->nalloc == -1 && qiov->iov == &qiov->local_iov' failed (the vector was not made by qemu_iovec_init_buf)",
    ),
  );
});

test('qemu_iovec_add grows nalloc as 2 * nalloc + 1, adds empty elements, and never copies', () => {
  const q = new QEMUIOVector();
  assert.equal([q.niov, q.nalloc, q.size, q.iov.length], [0, 0, 0, 0], 'a new vector is empty and growable');
  const mem = new Uint8Array(new SharedArrayBuffer(32));
  const seen: number[][] = [];
  for (let i = 0; i < 8; i++) {
    qemu_iovec_add(q, mem.subarray(i * 4), i % 3 === 0 ? 0 : 2);
    seen.push([q.niov, q.nalloc, q.size]);
  }
  assert.equal(seen, [
    [1, 1, 0],
    [2, 3, 2],
    [3, 3, 4],
    [4, 7, 4],
    [5, 7, 6],
    [6, 7, 8],
    [7, 7, 8],
    [8, 15, 10],
  ]);
  assert.ok(q.iov[1]!.buffer === mem.buffer && q.iov[1]!.byteOffset === 4 && q.iov[1]!.length === 2);
  const q2 = new QEMUIOVector();
  qemu_iovec_init(q2, 2);
  for (let i = 0; i < 3; i++) qemu_iovec_add(q2, mem, 1);
  assert.equal([q2.niov, q2.nalloc, q2.size], [3, 5, 3]);
  assert.throws(() => qemu_iovec_add(q2, mem.subarray(30), 3), isQemuErr('qemu_iovec_add: len 3 exceeds base (2 bytes)'));
  assert.equal([q2.niov, q2.size], [3, 3]);
});

test('qemu_iovec_reset empties a growable vector and keeps nalloc; qemu_iovec_destroy works on any vector', () => {
  const mem = new Uint8Array([1, 2, 3, 4]);
  const q = new QEMUIOVector();
  qemu_iovec_init(q, 4);
  qemu_iovec_add(q, mem, 2);
  qemu_iovec_add(q, mem.subarray(2), 2);
  qemu_iovec_reset(q);
  assert.equal([q.niov, q.nalloc, q.size, q.iov.length], [0, 4, 0, 0]);
  qemu_iovec_add(q, mem.subarray(1), 1);
  assert.equal(arr(content(q)), [2]);
  qemu_iovec_destroy(q);
  assert.equal([q.niov, q.nalloc, q.size, q.iov.length], [0, 0, 0, 0]);

  const callerArray = [mem];
  const e = new QEMUIOVector();
  qemu_iovec_init_external(e, callerArray, 1);
  qemu_iovec_destroy(e);
  assert.equal([e.niov, e.nalloc, e.size, e.iov.length], [0, 0, 0, 0]);
  assert.ok(callerArray.length === 1 && callerArray[0] === mem, 'the caller array is not touched');
  qemu_iovec_add(e, mem, 4);
  assert.equal([e.niov, e.nalloc, e.size], [1, 1, 4], 'a destroyed vector is growable again');
});

// ---------------------------------------------------------------------------------------
// Comparing and scanning

test('qemu_iovec_compare returns the offset of the first differing byte, or -1', () => {
  const rng = prng(4);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng, { maxLen: rng() < 0.3 ? 400 : 24 });
    const a = qiovOf(L, rng() < 0.5);
    // b: same shape in other memory (sometimes a Buffer), same content.
    const mem = rng() < 0.3 ? Buffer.alloc(L.model.length) : new Uint8Array(L.model.length);
    const b = new QEMUIOVector();
    qemu_iovec_init(b, 0);
    let pos = 0;
    for (const l of L.lens) {
      qemu_iovec_add(b, mem.subarray(pos), l);
      pos += l;
    }
    mem.set(L.model);
    assert.is(qemu_iovec_compare(a, b), -1);
    const flips = L.model.length === 0 ? 0 : rint(rng, 0, 3);
    const flipped = new Set<number>();
    for (let f = 0; f < flips; f++) {
      const p = rint(rng, 0, L.model.length - 1);
      if (flipped.has(p)) continue; // a second flip could undo the first
      mem[p] = mem[p]! ^ (1 << rint(rng, 0, 7));
      flipped.add(p);
    }
    const first = flipped.size === 0 ? -1 : Math.min(...flipped);
    assert.is(qemu_iovec_compare(a, b), first);
    assert.is(qemu_iovec_compare(b, a), first);
  }
});

test('qemu_iovec_compare finds the first difference in long elements at every position class', () => {
  const n = 10000;
  const p = new Uint8Array(new SharedArrayBuffer(n));
  const q = new Uint8Array(n);
  for (let i = 0; i < n; i++) p[i] = q[i] = (i * 7) & 0xff;
  const a = QEMU_IOVEC_INIT_BUF(p, n);
  const b = QEMU_IOVEC_INIT_BUF(q, n);
  assert.is(qemu_iovec_compare(a, b), -1);
  for (const at of [0, 1, 63, 64, 65, 4999, 5000, 8191, 9998, 9999]) {
    q[at] = q[at]! ^ 0x80;
    assert.is(qemu_iovec_compare(a, b), at);
    q[at] = q[at]! ^ 0x80;
  }
  q[9000] = 1;
  q[300] = 2;
  assert.is(qemu_iovec_compare(a, b), 300);
});

test('qemu_iovec_compare throws when the shapes differ, but only up to the first difference', () => {
  const x = new QEMUIOVector();
  qemu_iovec_init_external(x, [new Uint8Array([1, 2]), new Uint8Array([3])], 2);
  const y = new QEMUIOVector();
  qemu_iovec_init_external(y, [new Uint8Array([1, 2, 3])], 1);
  assert.throws(() => qemu_iovec_compare(x, y), isQemuErr("qemu_iovec_compare: Assertion 'a->niov == b->niov' failed (a has 2 elements, b has 1)"));
  const z = new QEMUIOVector();
  qemu_iovec_init_external(z, [new Uint8Array([1, 2]), new Uint8Array([3, 4])], 2);
  assert.throws(
    () => qemu_iovec_compare(x, z),
    isQemuErr("qemu_iovec_compare: Assertion 'a->iov[i].iov_len == b->iov[i].iov_len' failed (element 1: 1 bytes in a, 2 in b)"),
  );
  const w = new QEMUIOVector();
  qemu_iovec_init_external(w, [new Uint8Array([1, 9]), new Uint8Array([3, 4])], 2);
  assert.is(qemu_iovec_compare(x, w), 1, 'the difference in element 0 is reported before element 1 is checked');
});

test('qemu_iovec_is_zero answers for the range as the model does', () => {
  const rng = prng(5);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng, { maxLen: rng() < 0.3 ? 300 : 24 });
    const q = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    const model = L.model.slice();
    // Zero some ranges so that zero answers are common.
    for (let z = rint(rng, 0, 3); z > 0; z--) {
      const o = rint(rng, 0, size);
      const b = rint(rng, 0, size - o);
      qemu_iovec_memset(q, o, 0, b);
      model.fill(0, o, o + b);
    }
    for (let k = 0; k < 5; k++) {
      const offset = rint(rng, 0, size);
      const bytes = rint(rng, 0, size - offset);
      const expected = model.subarray(offset, offset + bytes).every((v) => v === 0);
      assert.is(qemu_iovec_is_zero(q, offset, bytes), expected);
    }
  }
});

test('qemu_iovec_is_zero scans long elements and finds a lone non-zero byte anywhere', () => {
  const n = 200 * 1024;
  const big = new Uint8Array(new SharedArrayBuffer(n));
  const q = new QEMUIOVector();
  qemu_iovec_init(q, 0);
  qemu_iovec_add(q, new Uint8Array(3), 3);
  qemu_iovec_add(q, big, n);
  assert.is(qemu_iovec_is_zero(q, 0, n + 3), true);
  for (const at of [0, 100, 65535, 65536, 65537, 150000, n - 1]) {
    big[at] = 9;
    assert.is(qemu_iovec_is_zero(q, 0, n + 3), false, `byte ${at}`);
    assert.is(qemu_iovec_is_zero(q, at + 4, n - at - 1), true, `after ${at}`);
    big[at] = 0;
  }
  assert.is(qemu_iovec_is_zero(q, n + 3, 0), true, 'an empty range at the end');
  assert.throws(
    () => qemu_iovec_is_zero(q, n, 4),
    isQemuErr(`qemu_iovec_is_zero: Assertion 'offset + bytes <= qiov->size' failed (offset ${n} + bytes 4 > size ${n + 3})`),
  );
});

test('qemu_iovec_is_shared: true only when every element lies on a SharedArrayBuffer', () => {
  const sab = new Uint8Array(new SharedArrayBuffer(8));
  const ord = new Uint8Array(8);
  const q = new QEMUIOVector();
  assert.is(qemu_iovec_is_shared(q), true, 'an empty vector');
  qemu_iovec_add(q, sab, 4);
  qemu_iovec_add(q, sab.subarray(4), 4);
  assert.is(qemu_iovec_is_shared(q), true);
  qemu_iovec_add(q, ord, 0);
  assert.is(qemu_iovec_is_shared(q), false, 'an empty element on ordinary memory counts');
  assert.is(qemu_iovec_is_shared(QEMU_IOVEC_INIT_BUF(Buffer.alloc(4), 4)), false);
  const e = new QEMUIOVector();
  qemu_iovec_init_external(e, [sab, ord], 1);
  assert.is(qemu_iovec_is_shared(e), true, 'elements past niov do not count');
});

// ---------------------------------------------------------------------------------------
// Concatenation, slices, padding

test('qemu_iovec_concat / concat_iov append views of the source range and skip empty elements', () => {
  const rng = prng(6);
  for (let it = 0; it < ITER; it++) {
    const S = makeLayout(rng);
    const src = qiovOf(S, rng() < 0.5);
    const D = makeLayout(rng, { maxElems: 3 });
    const dst = qiovOf(D, false);
    const before = content(dst);
    const niovBefore = dst.niov;
    const size = S.model.length;
    const soffset = rint(rng, 0, size);
    const sbytes = rng() < 0.1 ? Infinity : rint(rng, 0, size + 5);
    const n = Math.min(sbytes, size - soffset);
    const st = starts(S.lens);
    const pieces = S.lens.filter((l, i) => n > 0 && l > 0 && st[i]! < soffset + n && st[i]! + l > soffset).length;
    if (rng() < 0.5) {
      qemu_iovec_concat(dst, src, soffset, sbytes);
    } else {
      assert.is(qemu_iovec_concat_iov(dst, S.views, S.views.length, soffset, sbytes), n);
    }
    assert.is(dst.niov, niovBefore + pieces);
    assert.is(dst.size, before.length + n);
    assert.equal(arr(content(dst)), arr(concatBytes(before, S.model.subarray(soffset, soffset + n))));
    for (let i = niovBefore; i < dst.niov; i++) assert.ok(dst.iov[i]!.length > 0);
    // The appended elements are views of the source: writing through dst shows in src.
    const data = randomBytes(rng, n);
    assert.is(qemu_iovec_from_buf(dst, before.length, data, n), n);
    const model = S.model.slice();
    model.set(data, soffset);
    assert.equal(arr(content(src)), arr(model));
  }
});

test('qemu_iovec_concat: a source offset beyond the end throws without adding anything; dst may be src', () => {
  const src = new QEMUIOVector();
  qemu_iovec_init_external(src, [new Uint8Array([1, 2]), new Uint8Array(0), new Uint8Array([3])], 3);
  const dst = new QEMUIOVector();
  assert.throws(
    () => qemu_iovec_concat(dst, src, 4, 1),
    isQemuErr("qemu_iovec_concat: Assertion 'soffset == 0' failed (soffset 4 is beyond the end of the source (3 bytes))"),
  );
  assert.equal([dst.niov, dst.size], [0, 0]);
  qemu_iovec_concat(dst, src, 3, Infinity);
  assert.equal([dst.niov, dst.size], [0, 0], 'soffset == size appends nothing');
  assert.throws(
    () => qemu_iovec_concat_iov(dst, src.iov, 4, 0, 1),
    isQemuErr('qemu_iovec_concat_iov: src_cnt 4 exceeds the iovec array (3 elements)'),
  );
  qemu_iovec_concat(dst, src, 1, Infinity);
  qemu_iovec_concat(dst, dst, 0, Infinity);
  assert.equal(arr(content(dst)), [2, 3, 2, 3]);
  assert.equal([dst.niov, dst.size], [4, 4]);
});

test('qemu_iovec_slice and qemu_iovec_subvec_niov find the elements of a range as QEMU walks them', () => {
  const rng = prng(7);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const q = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    for (let k = 0; k < 4; k++) {
      const offset = rint(rng, 0, size);
      const len = rint(rng, 0, size - offset);
      const exp = refSlice(L.lens, offset, len);
      const s = qemu_iovec_slice(q, offset, len);
      assert.equal({ index: s.index, niov: s.niov, head: s.head, tail: s.tail }, exp, `offset ${offset} len ${len} lens ${L.lens}`);
      assert.is(s.iov.length, s.niov);
      for (let i = 0; i < s.niov; i++) assert.ok(s.iov[i] === q.iov[s.index + i], 'untrimmed elements of the source');
      assert.is(qemu_iovec_subvec_niov(q, offset, len), exp.niov);
      // The parts the slice describes hold exactly the range.
      const t = new QEMUIOVector();
      if (len > 0) assert.is(qemu_iovec_concat_iov(t, s.iov, s.niov, s.head, len), len);
      assert.equal(arr(content(t)), arr(L.model.subarray(offset, offset + len)));
    }
  }
});

test('slices around empty elements: a range at 0 keeps a leading empty element, one at a boundary starts past it', () => {
  const e = () => new Uint8Array(0);
  const a = new Uint8Array([1, 2, 3]);
  const b = new Uint8Array([4, 5]);
  const q = new QEMUIOVector();
  qemu_iovec_init_external(q, [e(), a, e(), e(), b, e()], 6);
  const sl = (o: number, l: number) => {
    const s = qemu_iovec_slice(q, o, l);
    return [s.index, s.niov, s.head, s.tail];
  };
  assert.equal(sl(0, 0), [0, 0, 0, 0]);
  assert.equal(sl(0, 1), [0, 2, 0, 2]);
  assert.equal(sl(3, 2), [2, 3, 0, 0]);
  assert.equal(sl(1, 0), [1, 1, 1, 2], 'an empty range inside an element still names it');
  assert.equal(sl(5, 0), [5, 0, 0, 0]);
  assert.equal(sl(2, 3), [1, 4, 2, 0]);
  assert.is(qemu_iovec_subvec_niov(q, 0, 5), 5);
  assert.throws(
    () => qemu_iovec_slice(q, 4, 2),
    isQemuErr("qemu_iovec_slice: Assertion 'offset + len <= qiov->size' failed (offset 4 + len 2 > size 5)"),
  );
  assert.throws(
    () => qemu_iovec_subvec_niov(q, 6, 0),
    isQemuErr("qemu_iovec_subvec_niov: Assertion 'offset + len <= qiov->size' failed (offset 6 + len 0 > size 5)"),
  );
});

test('qemu_iovec_init_slice makes views of the range: one element is embedded (nalloc -1), zero is an empty growable vector', () => {
  const rng = prng(8);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const src = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    const offset = rint(rng, 0, size);
    const len = rint(rng, 0, size - offset);
    const q = new QEMUIOVector();
    qemu_iovec_init_slice(q, src, offset, len);
    const niov = len === 0 ? 0 : refSlice(L.lens, offset, len).niov;
    assert.is(q.niov, niov);
    assert.is(q.nalloc, niov === 1 ? -1 : niov);
    assert.is(q.size, len);
    assert.equal(arr(content(q)), arr(L.model.subarray(offset, offset + len)));
    if (len > 0) {
      const data = randomBytes(rng, len);
      qemu_iovec_from_buf(q, 0, data, len);
      const model = L.model.slice();
      model.set(data, offset);
      assert.equal(arr(content(src)), arr(model), 'the slice shares memory with its source');
    }
  }
});

test('qemu_iovec_init_slice: QEMU\'s range assertions; a vector may be sliced into itself', () => {
  const src = new QEMUIOVector();
  qemu_iovec_init_external(src, [new Uint8Array([1, 2, 3]), new Uint8Array([4, 5, 6])], 2);
  const q = new QEMUIOVector();
  assert.throws(() => qemu_iovec_init_slice(q, src, 0, 7), isQemuErr("qemu_iovec_init_slice: Assertion 'source->size >= len' failed (len 7 > size 6)"));
  assert.throws(
    () => qemu_iovec_init_slice(q, src, 2, 5),
    isQemuErr("qemu_iovec_init_slice: Assertion 'source->size - len >= offset' failed (offset 2 + len 5 > size 6)"),
  );
  assert.equal([q.niov, q.nalloc, q.size], [0, 0, 0]);
  const self = new QEMUIOVector();
  qemu_iovec_init_external(self, src.iov.slice(), 2);
  qemu_iovec_init_slice(self, self, 1, 4);
  assert.equal([self.niov, self.nalloc, self.size], [2, 2, 4]);
  assert.equal(arr(content(self)), [2, 3, 4, 5]);
  qemu_iovec_init_slice(self, self, 2, 1);
  assert.equal([self.niov, self.nalloc, self.size], [1, -1, 1]);
  assert.equal(arr(content(self)), [4]);
  qemu_iovec_init_slice(self, self, 0, 1);
  assert.equal(arr(qemu_iovec_buf(self)), [4], 'a one-element slice is an init_buf vector');
});

test('qemu_iovec_init_extended builds head + mid range + tail, leaving out empty parts', () => {
  const rng = prng(9);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const mid = qiovOf(L, rng() < 0.5);
    const size = L.model.length;
    const mo = rint(rng, 0, size);
    const ml = rint(rng, 0, size - mo);
    const headMem = new Uint8Array(new SharedArrayBuffer(8));
    headMem.set(randomBytes(rng, 8));
    const tailMem = randomBytes(rng, 8);
    const hl = rint(rng, 0, 3) === 0 ? 0 : rint(rng, 1, 8);
    const tl = rint(rng, 0, 3) === 0 ? 0 : rint(rng, 1, 8);
    const q = new QEMUIOVector();
    const ret = qemu_iovec_init_extended(q, headMem, hl, mid, mo, ml, tailMem, tl);
    assert.is(ret, 0);
    const midNiov = ml === 0 ? 0 : refSlice(L.lens, mo, ml).niov;
    const total = (hl > 0 ? 1 : 0) + midNiov + (tl > 0 ? 1 : 0);
    assert.is(q.niov, total);
    assert.is(q.nalloc, total === 1 ? -1 : total);
    assert.is(q.size, hl + ml + tl);
    assert.equal(arr(content(q)), arr(concatBytes(headMem.subarray(0, hl), L.model.subarray(mo, mo + ml), tailMem.subarray(0, tl))));
    if (hl > 0) assert.ok(q.iov[0]!.buffer === headMem.buffer && q.iov[0]!.byteOffset === 0, 'the head is a view, not a copy');
    if (tl > 0) assert.ok(q.iov[total - 1]!.buffer === tailMem.buffer, 'the tail is a view, not a copy');
  }
});

test('qemu_iovec_init_extended: -EINVAL past IOV_MAX elements or on size overflow, leaving qiov untouched; its other checks', () => {
  const one = new Uint8Array(1);
  const mid = new QEMUIOVector();
  qemu_iovec_init(mid, 0);
  for (let i = 0; i < IOV_MAX; i++) qemu_iovec_add(mid, one, 1);
  const q = new QEMUIOVector();
  const head = new Uint8Array([7]);
  assert.is(qemu_iovec_init_extended(q, null, 0, mid, 0, IOV_MAX, null, 0), 0);
  assert.equal([q.niov, q.size], [IOV_MAX, IOV_MAX]);
  const q2 = new QEMUIOVector();
  assert.is(qemu_iovec_init_extended(q2, head, 1, mid, 0, IOV_MAX, null, 0), -EINVAL);
  assert.equal([q2.niov, q2.nalloc, q2.size, q2.iov.length], [0, 0, 0, 0]);
  assert.is(qemu_iovec_init_extended(q2, head, 1, mid, 1, IOV_MAX - 1, null, 0), 0);
  assert.is(q2.niov, IOV_MAX);
  assert.is(qemu_iovec_init_extended(q2, null, 0, mid, 0, 2 ** 53, null, 0), -EINVAL);
  assert.is(q2.niov, IOV_MAX, 'untouched by the failed call');

  qemu_iovec_add(mid, one, 1);
  assert.throws(
    () => qemu_iovec_init_extended(q, head, 1, mid, 0, 1, null, 0),
    isQemuErr(`qemu_iovec_init_extended: Assertion 'mid_qiov->niov <= IOV_MAX' failed (mid_qiov has ${IOV_MAX + 1} elements)`),
  );
  const big = new QEMUIOVector();
  qemu_iovec_init_slice(big, mid, 0, IOV_MAX + 1);
  assert.is(big.niov, IOV_MAX + 1, 'init_slice has no IOV_MAX limit');

  assert.throws(() => qemu_iovec_init_extended(q, head, 2, null, 0, 0, null, 0), isQemuErr('qemu_iovec_init_extended: head_len 2 exceeds head_buf (1 bytes)'));
  assert.throws(() => qemu_iovec_init_extended(q, null, 0, null, 0, 0, null, 1), isQemuErr('qemu_iovec_init_extended: tail_len 1 exceeds tail_buf (null)'));
  assert.throws(() => qemu_iovec_init_extended(q, null, 0, null, 0, 3, null, 0), isQemuErr('qemu_iovec_init_extended: mid_len 3 needs a mid_qiov'));
  assert.throws(
    () => qemu_iovec_init_extended(q, null, 0, QEMU_IOVEC_INIT_BUF(head, 1), 1, 1, null, 0),
    isQemuErr("qemu_iovec_init_extended: Assertion 'offset + len <= qiov->size' failed (offset 1 + len 1 > size 1)"),
  );

  const h = new QEMUIOVector();
  assert.is(qemu_iovec_init_extended(h, head, 1, null, 0, 0, null, 0), 0);
  assert.equal([h.niov, h.nalloc, h.size], [1, -1, 1]);
  assert.ok(qemu_iovec_buf(h) === head, 'a one-element result is an init_buf vector');
  const empty = new QEMUIOVector();
  assert.is(qemu_iovec_init_extended(empty, null, 0, null, 0, 0, null, 0), 0);
  assert.equal([empty.niov, empty.nalloc, empty.size], [0, 0, 0]);
});

// ---------------------------------------------------------------------------------------
// Discarding

test('qemu_iovec_discard_back drops the last bytes: whole elements leave, empty ones at the new end too', () => {
  const rng = prng(10);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const external = rng() < 0.5;
    const q = qiovOf(L, external);
    const size = L.model.length;
    const bytes = rint(rng, 0, size);
    const e = size - bytes;
    const st = starts(L.lens);
    const niov = st.filter((s) => s < e).length;
    qemu_iovec_discard_back(q, bytes);
    assert.is(q.size, e);
    assert.is(q.niov, niov);
    assert.equal(arr(content(q)), arr(L.model.subarray(0, e)));
    if (!external) assert.is(q.iov.length, niov);
  }
});

test('qemu_iovec_discard_back: more than the size throws; bytes 0 drops trailing empty elements; init_buf vectors shrink', () => {
  const q = new QEMUIOVector();
  qemu_iovec_init_external(q, [new Uint8Array([1, 2]), new Uint8Array(0)], 2);
  assert.throws(() => qemu_iovec_discard_back(q, 3), isQemuErr("qemu_iovec_discard_back: Assertion 'qiov->size >= bytes' failed (discarding 3 bytes of 2)"));
  qemu_iovec_discard_back(q, 0);
  assert.equal([q.niov, q.size], [1, 2]);
  const mem = new Uint8Array([1, 2, 3, 4]);
  const b = QEMU_IOVEC_INIT_BUF(mem, 4);
  qemu_iovec_discard_back(b, 1);
  assert.equal([b.niov, b.nalloc, b.size], [1, -1, 3]);
  assert.equal(arr(qemu_iovec_buf(b)), [1, 2, 3]);
  qemu_iovec_discard_back(b, 3);
  assert.equal([b.niov, b.size], [0, 0]);
});

test('iov_discard_front and iov_discard_back return min(bytes, size) and move the cursor as QEMU does', () => {
  const rng = prng(11);
  for (let it = 0; it < ITER; it++) {
    const L = makeLayout(rng);
    const extra = rng() < 0.3 ? [new Uint8Array([99])] : [];
    const original = [...L.views, ...extra];
    const cursor: IOVCursor = { iov: original, iov_cnt: L.views.length };
    const size = L.model.length;
    const bytes = rng() < 0.1 ? Infinity : rint(rng, 0, size + 5);
    const total = Math.min(bytes, size);
    const st = starts(L.lens);
    if (rng() < 0.5) {
      const dropped = L.lens.filter((l, i) => st[i]! + l <= total).length;
      assert.is(iov_discard_front(cursor, bytes), total);
      assert.is(cursor.iov_cnt, L.views.length - dropped);
      assert.equal(arr(flat(cursor.iov, cursor.iov_cnt)), arr(L.model.subarray(total)));
      if (dropped === 0) assert.ok(cursor.iov === original, 'no element left: same array');
      else assert.ok(cursor.iov[0] === original[dropped], 'the new front is the first kept element, trimmed in the original array too');
    } else {
      const e = size - total;
      assert.is(iov_discard_back(cursor, bytes), total);
      assert.is(cursor.iov_cnt, st.filter((s) => s < e).length);
      assert.equal(arr(flat(cursor.iov, cursor.iov_cnt)), arr(L.model.subarray(0, e)));
      assert.ok(cursor.iov === original);
    }
    if (extra.length > 0) assert.ok(original[original.length - 1] === extra[0], 'elements past iov_cnt are not touched');
  }
});

test('iov_discard_front with bytes 0 drops leading empty elements only', () => {
  const a = new Uint8Array([1, 2]);
  const cursor: IOVCursor = { iov: [new Uint8Array(0), new Uint8Array(0), a], iov_cnt: 3 };
  assert.is(iov_discard_front(cursor, 0), 0);
  assert.equal(cursor.iov_cnt, 1);
  assert.ok(cursor.iov[0] === a, 'a kept element trimmed by 0 bytes is the same view');
  assert.is(iov_discard_back({ iov: [], iov_cnt: 0 }, 5), 0);
});

// ---------------------------------------------------------------------------------------
// Cloning (the bounce layout)

test('qemu_iovec_clone lays elements out in one buffer, keeping exactly the overlaps of the source', () => {
  const rng = prng(12);
  for (let it = 0; it < 150; it++) {
    const nb = rint(rng, 1, 3);
    const backs = Array.from({ length: nb }, () => new Uint8Array(rng() < 0.5 ? new SharedArrayBuffer(48) : new ArrayBuffer(48)));
    const src = new QEMUIOVector();
    const n = rint(rng, 0, 8);
    for (let i = 0; i < n; i++) {
      const b = rint(rng, 0, nb - 1);
      const start = rint(rng, 0, 40);
      qemu_iovec_add(src, backs[b]!.subarray(start), rint(rng, 0, 48 - start));
    }
    const dest = new QEMUIOVector();
    qemu_iovec_clone(dest, src);
    assert.is(dest.niov, src.niov);
    assert.is(dest.size, src.size);
    assert.is(qemu_iovec_is_shared(dest), true, 'the default layout buffer is shared memory');
    const srcAddr: string[] = [];
    const dstAddr: number[] = [];
    for (let i = 0; i < n; i++) {
      const s = src.iov[i]!;
      const d = dest.iov[i]!;
      assert.is(d.length, s.length);
      assert.ok(d.buffer === dest.iov[0]!.buffer, 'one buffer');
      const b = backs.findIndex((m) => m.buffer === s.buffer);
      for (let k = 0; k < s.length; k++) {
        srcAddr.push(`${b}:${s.byteOffset + k}`);
        dstAddr.push(d.byteOffset + k);
      }
    }
    for (let x = 0; x < srcAddr.length; x++) {
      for (let y = x + 1; y < srcAddr.length; y++) {
        assert.is(srcAddr[x] === srcAddr[y], dstAddr[x] === dstAddr[y], `bytes ${x} and ${y}`);
      }
    }
    const union = new Set(srcAddr).size;
    if (n > 0) assert.is(dest.iov[0]!.buffer.byteLength, union, 'exactly the union of the elements');
    assert.is(Math.max(0, ...dstAddr.map((a) => a + 1)), union);
    // With a caller buffer: the same layout, in that buffer.
    const mine = new Uint8Array(union + 3);
    const d2 = new QEMUIOVector();
    qemu_iovec_clone(d2, src, mine.subarray(3));
    for (let i = 0; i < n; i++) {
      assert.ok(d2.iov[i]!.buffer === mine.buffer);
      assert.is(d2.iov[i]!.byteOffset - 3, dest.iov[i]!.byteOffset);
    }
    if (union > 0) {
      assert.throws(
        () => qemu_iovec_clone(new QEMUIOVector(), src, new Uint8Array(union - 1)),
        isQemuErr(`qemu_iovec_clone: buf holds ${union - 1} bytes, fewer than the ${union} the layout needs`),
      );
    }
  }
});

test('qemu_iovec_clone copies the layout, not the data: a bounce of ordinary memory', () => {
  const ord = new Uint8Array([1, 2, 3, 4, 5, 6]);
  const src = new QEMUIOVector();
  qemu_iovec_add(src, ord.subarray(2), 3);
  qemu_iovec_add(src, ord, 4);
  assert.is(qemu_iovec_is_shared(src), false);
  const bounce = new QEMUIOVector();
  qemu_iovec_clone(bounce, src);
  assert.equal(arr(content(bounce)), [0, 0, 0, 0, 0, 0, 0], 'no data was copied');
  assert.is(bounce.iov[0]!.buffer.byteLength, 5, 'the two elements overlap by two bytes');
  // Copy element by element; the overlap is kept, so the logical content matches.
  for (let i = 0; i < src.niov; i++) bounce.iov[i]!.set(src.iov[i]!);
  assert.equal(arr(content(bounce)), [3, 4, 5, 1, 2, 3, 4]);
  assert.is(qemu_iovec_compare(src, bounce), -1);
  qemu_iovec_memset(bounce, 0, 0, 1);
  assert.equal(arr(content(bounce)), [0, 4, 5, 1, 2, 0, 4], 'the overlap is shared in the bounce buffer as in the source');
});

// ---------------------------------------------------------------------------------------
// A vector whose size no longer matches its elements (fields changed by hand)

test('a size field larger than the elements hold is reported, not read past the array', () => {
  const q = new QEMUIOVector();
  qemu_iovec_init(q, 0);
  qemu_iovec_add(q, new Uint8Array(4), 4);
  q.size = 10;
  const msg = (fn: string) => `${fn}: Assertion '*tail < end_iov->iov_len' failed (qiov->size 10 is more than its 1 elements hold)`;
  assert.throws(() => qemu_iovec_slice(q, 2, 6), isQemuErr(msg('qemu_iovec_slice')));
  assert.throws(() => qemu_iovec_subvec_niov(q, 6, 1), isQemuErr(msg('qemu_iovec_subvec_niov')));
  assert.throws(() => qemu_iovec_is_zero(q, 2, 6), isQemuErr(msg('qemu_iovec_is_zero')));
  assert.throws(() => qemu_iovec_is_zero(q, 7, 1), isQemuErr(msg('qemu_iovec_is_zero')));
  assert.throws(
    () => qemu_iovec_discard_back(q, 6),
    isQemuErr("qemu_iovec_discard_back: Assertion 'total == bytes' failed (qiov->size 10 is more than its 1 elements hold)"),
  );
  assert.is(qemu_iovec_is_zero(q, 0, 4), true);
});

test.run();
