/**
 * Scatter-gather I/O vectors over guest memory. QEMU: include/qemu/iov.h, util/iov.c
 * (QEMU 7.2 behaviour).
 *
 * An element of an iovec (C's `struct iovec`) is a `Uint8Array` view: its `byteOffset`
 * and `byteLength` are `iov_base` and `iov_len`. Views usually sit on SharedArrayBuffers
 * (guest memory from `qemu_blockalign`), but ordinary memory works too; see
 * `qemu_iovec_is_shared` and `qemu_iovec_clone` for bouncing.
 *
 * Building a vector never copies data: every element is a view of the caller's memory.
 * Only `*_to_buf`, `*_from_buf` and `*_memset` touch bytes.
 *
 * What QEMU asserts throws `QemuError("<function>: Assertion '<QEMU's condition>' failed
 * (<what was wrong>)")`. Arguments C cannot get wrong but JS can (a negative or fractional
 * offset, a count larger than the array, a buffer shorter than the length given with it)
 * throw `QemuError("<function>: <what was wrong>")`.
 */
import { Buffer } from 'node:buffer';
import { EINVAL } from '../aio/errno.ts';
import { QemuError } from '../aio/error.ts';

/** Linux's IOV_MAX: the most elements one preadv/pwritev takes. */
export const IOV_MAX = 1024;

/**
 * QEMU's `QEMUIOVector`. `iov[0..niov)` are the elements; `size` is the sum of their
 * lengths. `nalloc` is -1 when the vector does not own `iov` (made by
 * `qemu_iovec_init_external`, `qemu_iovec_init_buf`, or a one-element
 * `qemu_iovec_init_extended`/`init_slice`); such a vector cannot grow.
 * `local_iov` is the one-element array `qemu_iovec_init_buf` uses as `iov`
 * (C embeds it in the struct). A new vector is empty and growable, like a zeroed C struct.
 */
export class QEMUIOVector {
  iov: Uint8Array[] = [];
  niov = 0;
  nalloc = 0;
  size = 0;
  local_iov: Uint8Array[] | null = null;
}

/**
 * `qemu_iovec_slice`'s answer. `iov` holds the `niov` elements of the source that the
 * range touches, untrimmed (they are `source.iov[index .. index + niov)`): the range starts
 * `head` bytes into `iov[0]` and ends `tail` bytes before the end of `iov[niov - 1]`.
 */
export interface QEMUIOVectorSlice {
  iov: Uint8Array[];
  index: number;
  niov: number;
  head: number;
  tail: number;
}

/**
 * A movable iovec for `iov_discard_front` / `iov_discard_back`: the elements and how many
 * of them count (C's `struct iovec **iov` and `unsigned int *iov_cnt`).
 */
export interface IOVCursor {
  iov: Uint8Array[];
  iov_cnt: number;
}

// ---------------------------------------------------------------------------------------
// Internal helpers (module-level, so no closure is created per call)

/** Ranges up to this long are scanned/compared in JS; longer ones natively. */
const SMALL = 64;
/** Never written: compared against to test ranges for zeroes. */
const ZERO = Buffer.alloc(64 * 1024);
const EMPTY = new Uint8Array(0);
const EMPTY_IOV: Uint8Array[] = [];

function assertFailed(fn: string, cond: string, detail: string): QemuError {
  return new QemuError(`${fn}: Assertion '${cond}' failed (${detail})`);
}

function checkLen(fn: string, name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0) {
    throw new QemuError(`${fn}: ${name} must be a non-negative integer, got ${v}`);
  }
}

/** Byte counts where C accepts "very large" to mean "up to the end": Infinity is allowed. */
function checkBytes(fn: string, name: string, v: number): void {
  if (!(v >= 0) || (!Number.isInteger(v) && v !== Infinity)) {
    throw new QemuError(`${fn}: ${name} must be a non-negative integer or Infinity, got ${v}`);
  }
}

function checkCount(fn: string, name: string, cnt: number, iov: Uint8Array[]): void {
  checkLen(fn, name, cnt);
  if (cnt > iov.length) {
    throw new QemuError(`${fn}: ${name} ${cnt} exceeds the iovec array (${iov.length} elements)`);
  }
}

function checkBuf(fn: string, name: string, buf: Uint8Array | null, bufName: string, len: number): void {
  checkLen(fn, name, len);
  const have = buf === null ? 0 : buf.length;
  if (len > have) {
    throw new QemuError(`${fn}: ${name} ${len} exceeds ${bufName} (${buf === null ? 'null' : `${have} bytes`})`);
  }
}

function notOwned(fn: string, cond: string): QemuError {
  return assertFailed(
    fn,
    cond,
    'the vector does not own its iovec array: it was made by qemu_iovec_init_external or qemu_iovec_init_buf',
  );
}

function inconsistent(fn: string, qiov: QEMUIOVector): QemuError {
  return assertFailed(
    fn,
    '*tail < end_iov->iov_len',
    `qiov->size ${qiov.size} is more than its ${qiov.niov} elements hold`,
  );
}

/** `v[start, end)` without allocating when that is all of `v`. */
function view(v: Uint8Array, start: number, end: number): Uint8Array {
  return start === 0 && end === v.length ? v : v.subarray(start, end);
}

function sumLengths(iov: Uint8Array[], cnt: number): number {
  let total = 0;
  for (let i = 0; i < cnt; i++) total += iov[i]!.length;
  return total;
}

function addElem(qiov: QEMUIOVector, v: Uint8Array): void {
  if (qiov.niov === qiov.nalloc) qiov.nalloc = 2 * qiov.nalloc + 1;
  qiov.iov[qiov.niov++] = v;
  qiov.size += v.length;
}

/**
 * Validates an iov_to_buf/from_buf/memset call and returns how many bytes it moves:
 * min(bytes, size - offset). `bufLen` is -1 for memset (no buffer).
 */
function transferLength(
  fn: string,
  iov: Uint8Array[],
  cnt: number,
  offset: number,
  bytes: number,
  bufLen: number,
): number {
  checkCount(fn, 'iov_cnt', cnt, iov);
  checkLen(fn, 'offset', offset);
  checkBytes(fn, 'bytes', bytes);
  const total = sumLengths(iov, cnt);
  if (offset > total) {
    throw assertFailed(fn, 'offset == 0', `offset ${offset} is beyond the end of the iovec (${total} bytes)`);
  }
  const n = Math.min(bytes, total - offset);
  if (bufLen >= 0 && n > bufLen) {
    throw new QemuError(`${fn}: buf holds ${bufLen} bytes, fewer than the ${n} to copy`);
  }
  return n;
}

const TO_BUF = 0;
const FROM_BUF = 1;
const MEMSET = 2;

/**
 * The one walk behind to_buf, from_buf and memset: visits the bytes [offset, offset + n)
 * of the vector element by element and copies to `buf`, from `buf`, or fills with
 * `fillc` (`mode`). Returns n, the bytes handled.
 */
function walkIov(
  fn: string,
  iov: Uint8Array[],
  cnt: number,
  offset: number,
  bytes: number,
  mode: number,
  buf: Uint8Array | null,
  fillc: number,
): number {
  const n = transferLength(fn, iov, cnt, offset, bytes, buf === null ? -1 : buf.length);
  let done = 0;
  let off = offset;
  for (let i = 0; done < n; i++) {
    const v = iov[i]!;
    const len = v.length;
    if (off >= len) {
      off -= len;
      continue;
    }
    const c = Math.min(len - off, n - done);
    if (mode === TO_BUF) (buf as Uint8Array).set(view(v, off, off + c), done);
    else if (mode === FROM_BUF) v.set(view(buf as Uint8Array, done, done + c), off);
    else v.fill(fillc, off, off + c);
    done += c;
    off = 0;
  }
  return done;
}

function toBuf(fn: string, iov: Uint8Array[], cnt: number, offset: number, buf: Uint8Array, bytes: number): number {
  return walkIov(fn, iov, cnt, offset, bytes, TO_BUF, buf, 0);
}

function fromBuf(fn: string, iov: Uint8Array[], cnt: number, offset: number, buf: Uint8Array, bytes: number): number {
  return walkIov(fn, iov, cnt, offset, bytes, FROM_BUF, buf, 0);
}

function memsetIov(fn: string, iov: Uint8Array[], cnt: number, offset: number, fillc: number, bytes: number): number {
  return walkIov(fn, iov, cnt, offset, bytes, MEMSET, null, fillc);
}

// Result of sliceCore, reused (never escapes).
const scratch = { index: 0, niov: 0, head: 0, tail: 0 };

/**
 * QEMU's slice walk: skip whole elements while the offset left is positive and at least
 * the element's length (so a range starting at 0 keeps leading empty elements, and one
 * starting exactly at an element boundary starts at the next element, empty or not).
 */
function sliceCore(fn: string, qiov: QEMUIOVector, offset: number, len: number): void {
  checkLen(fn, 'offset', offset);
  checkLen(fn, 'len', len);
  if (offset + len > qiov.size) {
    throw assertFailed(fn, 'offset + len <= qiov->size', `offset ${offset} + len ${len} > size ${qiov.size}`);
  }
  const iov = qiov.iov;
  const niov = qiov.niov;
  let i = 0;
  let off = offset;
  while (off > 0 && i < niov && off >= iov[i]!.length) {
    off -= iov[i]!.length;
    i++;
  }
  let j = i;
  let t = off + len;
  while (t > 0 && j < niov && t >= iov[j]!.length) {
    t -= iov[j]!.length;
    j++;
  }
  if (t > 0) {
    if (j >= niov) throw inconsistent(fn, qiov);
    t = iov[j]!.length - t;
    j++;
  }
  scratch.index = i;
  scratch.niov = j - i;
  scratch.head = off;
  scratch.tail = t;
}

function rangeIsZero(v: Uint8Array, start: number, end: number): boolean {
  if (end - start <= SMALL) {
    for (let i = start; i < end; i++) if (v[i] !== 0) return false;
    return true;
  }
  while (start < end) {
    const c = Math.min(end - start, ZERO.length);
    if (ZERO.compare(v, start, start + c, 0, c) !== 0) return false;
    start += c;
  }
  return true;
}

function asBuffer(v: Uint8Array): Buffer {
  return Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.length);
}

/** Index of the first byte where `p` and `q` (same length) differ, or their length. */
function firstDiff(p: Uint8Array, q: Uint8Array): number {
  const len = p.length;
  if (len <= SMALL) {
    let i = 0;
    while (i < len && p[i] === q[i]) i++;
    return i;
  }
  const pb = asBuffer(p);
  if (pb.compare(q) === 0) return len;
  // [0, lo) is equal, [lo, hi) holds a difference.
  let lo = 0;
  let hi = len;
  while (hi - lo > SMALL) {
    const mid = lo + Math.floor((hi - lo) / 2);
    if (pb.compare(q, lo, mid, lo, mid) === 0) lo = mid;
    else hi = mid;
  }
  let i = lo;
  while (p[i] === q[i]) i++;
  return i;
}

/** The common part of qemu_iovec_init_extended and qemu_iovec_init_slice (7.2). */
function initExtended(
  fn: string,
  qiov: QEMUIOVector,
  head_buf: Uint8Array | null,
  head_len: number,
  mid_qiov: QEMUIOVector | null,
  mid_offset: number,
  mid_len: number,
  tail_buf: Uint8Array | null,
  tail_len: number,
  limit: boolean,
): number {
  checkBuf(fn, 'head_len', head_buf, 'head_buf', head_len);
  checkBuf(fn, 'tail_len', tail_buf, 'tail_buf', tail_len);
  checkLen(fn, 'mid_len', mid_len);
  if (limit && mid_qiov !== null && mid_qiov.niov > IOV_MAX) {
    throw assertFailed(fn, 'mid_qiov->niov <= IOV_MAX', `mid_qiov has ${mid_qiov.niov} elements`);
  }
  const size = head_len + mid_len + tail_len;
  if (size > Number.MAX_SAFE_INTEGER) return -EINVAL;

  let mid_niov = 0;
  let mid_index = 0;
  let mid_head = 0;
  let mid_tail = 0;
  let src: Uint8Array[] = EMPTY_IOV;
  if (mid_len > 0) {
    if (mid_qiov === null) throw new QemuError(`${fn}: mid_len ${mid_len} needs a mid_qiov`);
    sliceCore(fn, mid_qiov, mid_offset, mid_len);
    src = mid_qiov.iov; // read before qiov changes: mid_qiov may be qiov itself
    mid_index = scratch.index;
    mid_niov = scratch.niov;
    mid_head = scratch.head;
    mid_tail = scratch.tail;
  }
  const total = (head_len > 0 ? 1 : 0) + mid_niov + (tail_len > 0 ? 1 : 0);
  if (limit && total > IOV_MAX) return -EINVAL;

  let out: Uint8Array[];
  if (total === 1) {
    out = qiov.local_iov ??= [EMPTY];
    qiov.nalloc = -1;
  } else {
    out = [];
    qiov.nalloc = total;
  }
  qiov.iov = out;
  qiov.niov = total;
  qiov.size = size;

  let k = 0;
  if (head_len > 0) out[k++] = view(head_buf!, 0, head_len);
  if (mid_niov > 0) {
    const last = mid_index + mid_niov - 1;
    for (let i = mid_index; i <= last; i++) {
      const v = src[i]!;
      const start = i === mid_index ? mid_head : 0;
      const end = i === last ? v.length - mid_tail : v.length;
      out[k++] = view(v, start, end);
    }
  }
  if (tail_len > 0) out[k] = view(tail_buf!, 0, tail_len);
  return 0;
}

function discardBackCore(iov: Uint8Array[], cnt: number, bytes: number): number {
  let total = 0;
  let i = cnt - 1;
  while (i >= 0) {
    const v = iov[i]!;
    if (v.length > bytes) {
      if (bytes > 0) iov[i] = v.subarray(0, v.length - bytes);
      total += bytes;
      break;
    }
    bytes -= v.length;
    total += v.length;
    i--;
  }
  discardBackCnt = i + 1;
  return total;
}
let discardBackCnt = 0;

interface SortElem {
  index: number;
  rank: number;
  start: number;
  len: number;
  dest: number;
}

function cmpSortElem(a: SortElem, b: SortElem): number {
  return a.rank - b.rank || a.start - b.start || a.index - b.index;
}

// ---------------------------------------------------------------------------------------
// Plain iovecs

/**
 * Total length of `iov[0..iov_cnt)`. QEMU: `iov_size`.
 * Surprise: it counts `iov_cnt` elements, not `iov.length`.
 */
export function iov_size(iov: Uint8Array[], iov_cnt: number): number {
  checkCount('iov_size', 'iov_cnt', iov_cnt, iov);
  return sumLengths(iov, iov_cnt);
}

/**
 * Copies `buf[0..n)` into the iovec starting `offset` bytes in, and returns
 * n = min(bytes, iov_size - offset). QEMU: `iov_from_buf`.
 * Surprise: fewer bytes than asked is not an error (`bytes` may be Infinity: "to the
 * end"); an `offset` beyond the end throws, `offset` equal to the size copies 0.
 * Throws if `buf` is shorter than n.
 */
export function iov_from_buf(iov: Uint8Array[], iov_cnt: number, offset: number, buf: Uint8Array, bytes: number): number {
  return fromBuf('iov_from_buf', iov, iov_cnt, offset, buf, bytes);
}

/**
 * Copies n = min(bytes, iov_size - offset) bytes of the iovec, from `offset` on, into
 * `buf[0..n)` and returns n. QEMU: `iov_to_buf`.
 * Surprise: returns the bytes copied, which may be fewer than asked; the rest of `buf` is
 * left alone. An `offset` beyond the end throws. Throws if `buf` is shorter than n.
 */
export function iov_to_buf(iov: Uint8Array[], iov_cnt: number, offset: number, buf: Uint8Array, bytes: number): number {
  return toBuf('iov_to_buf', iov, iov_cnt, offset, buf, bytes);
}

/**
 * Fills min(bytes, iov_size - offset) bytes of the iovec, from `offset` on, with
 * `fillc & 0xff`, and returns that count. QEMU: `iov_memset`.
 * Surprise: like `iov_to_buf`, it stops at the end of the iovec without complaint.
 */
export function iov_memset(iov: Uint8Array[], iov_cnt: number, offset: number, fillc: number, bytes: number): number {
  return memsetIov('iov_memset', iov, iov_cnt, offset, fillc, bytes);
}

/**
 * Drops `bytes` from the front of `cursor`'s iovec and returns how many were dropped
 * (min(bytes, size)). Whole elements leave: `cursor.iov` becomes a new array starting at
 * the first element kept, and `cursor.iov_cnt` shrinks. A partly dropped element is
 * replaced by a shorter view, in the original array too (C changes it in place).
 * QEMU: `iov_discard_front`.
 * Surprise: empty elements at the new front are dropped as well, even with `bytes` 0.
 */
export function iov_discard_front(cursor: IOVCursor, bytes: number): number {
  const fn = 'iov_discard_front';
  const iov = cursor.iov;
  const cnt = cursor.iov_cnt;
  checkCount(fn, 'iov_cnt', cnt, iov);
  checkBytes(fn, 'bytes', bytes);
  let total = 0;
  let i = 0;
  while (i < cnt) {
    const v = iov[i]!;
    if (v.length > bytes) {
      if (bytes > 0) iov[i] = v.subarray(bytes);
      total += bytes;
      break;
    }
    bytes -= v.length;
    total += v.length;
    i++;
  }
  if (i > 0) {
    cursor.iov = iov.slice(i);
    cursor.iov_cnt = cnt - i;
  }
  return total;
}

/**
 * Drops `bytes` from the back of `cursor`'s iovec and returns how many were dropped
 * (min(bytes, size)). `cursor.iov_cnt` shrinks past whole elements; a partly dropped last
 * element is replaced, in `cursor.iov`, by a shorter view. QEMU: `iov_discard_back`.
 * Surprise: empty elements at the new end are dropped as well, even with `bytes` 0.
 */
export function iov_discard_back(cursor: IOVCursor, bytes: number): number {
  const fn = 'iov_discard_back';
  checkCount(fn, 'iov_cnt', cursor.iov_cnt, cursor.iov);
  checkBytes(fn, 'bytes', bytes);
  const total = discardBackCore(cursor.iov, cursor.iov_cnt, bytes);
  cursor.iov_cnt = discardBackCnt;
  return total;
}

// ---------------------------------------------------------------------------------------
// QEMUIOVector

/**
 * Makes `qiov` an empty, growable vector. QEMU: `qemu_iovec_init`.
 * Surprise: `alloc_hint` only sets `nalloc`; elements are added with `qemu_iovec_add`.
 */
export function qemu_iovec_init(qiov: QEMUIOVector, alloc_hint: number): void {
  checkLen('qemu_iovec_init', 'alloc_hint', alloc_hint);
  qiov.iov = [];
  qiov.niov = 0;
  qiov.nalloc = alloc_hint;
  qiov.size = 0;
}

/**
 * Makes `qiov` use the caller's array `iov[0..niov)` as its elements, without copying it.
 * QEMU: `qemu_iovec_init_external`.
 * Surprise: the vector cannot grow or be reset (`nalloc` is -1), and later changes to
 * the array show through it (but `size` is computed once, here).
 */
export function qemu_iovec_init_external(qiov: QEMUIOVector, iov: Uint8Array[], niov: number): void {
  checkCount('qemu_iovec_init_external', 'niov', niov, iov);
  qiov.iov = iov;
  qiov.niov = niov;
  qiov.nalloc = -1;
  qiov.size = sumLengths(iov, niov);
}

/**
 * Makes `qiov` a one-element vector over `buf[0..len)`. QEMU: `qemu_iovec_init_buf`.
 * Surprise: nothing is copied: the element is `buf` itself (or a view of its first `len`
 * bytes), so reads into the vector land in `buf`. The vector cannot grow (`nalloc` -1).
 * `buf` may be null when `len` is 0.
 */
export function qemu_iovec_init_buf(qiov: QEMUIOVector, buf: Uint8Array | null, len: number): void {
  checkBuf('qemu_iovec_init_buf', 'len', buf, 'buf', len);
  const local = (qiov.local_iov ??= [EMPTY]);
  local.length = 1;
  local[0] = buf === null ? EMPTY : view(buf, 0, len);
  qiov.iov = local;
  qiov.niov = 1;
  qiov.nalloc = -1;
  qiov.size = len;
}

/**
 * A new vector made by `qemu_iovec_init_buf(qiov, buf, len)`. QEMU: the
 * `QEMU_IOVEC_INIT_BUF` initializer (`QEMUIOVector qiov = QEMU_IOVEC_INIT_BUF(qiov, buf, len)`).
 * Surprise: as with `qemu_iovec_init_buf`, `buf` is not copied.
 */
export function QEMU_IOVEC_INIT_BUF(buf: Uint8Array | null, len: number): QEMUIOVector {
  const qiov = new QEMUIOVector();
  qemu_iovec_init_buf(qiov, buf, len);
  return qiov;
}

/**
 * The buffer of a vector made by `qemu_iovec_init_buf`. QEMU: `qemu_iovec_buf`.
 * Surprise: throws for any other vector, even a one-element external one.
 */
export function qemu_iovec_buf(qiov: QEMUIOVector): Uint8Array {
  if (qiov.nalloc !== -1 || qiov.local_iov === null || qiov.iov !== qiov.local_iov) {
    throw assertFailed(
      'qemu_iovec_buf',
      'qiov->nalloc == -1 && qiov->iov == &qiov->local_iov',
      'the vector was not made by qemu_iovec_init_buf',
    );
  }
  return qiov.local_iov[0]!;
}

/**
 * Makes `qiov` the vector `head_buf[0..head_len)`, then `mid_qiov`'s bytes
 * `[mid_offset, mid_offset + mid_len)`, then `tail_buf[0..tail_len)`; empty parts are
 * left out. Returns 0, or -EINVAL (leaving `qiov` untouched) when that takes more than
 * IOV_MAX elements or the size overflows. QEMU: `qemu_iovec_init_extended` (7.2; used by
 * the block layer's request padding).
 * Surprises: nothing is copied (elements are views of the buffers and of `mid_qiov`'s
 * elements); a one-element result cannot grow (`nalloc` -1, as `qemu_iovec_init_buf`);
 * `mid_qiov` with more than IOV_MAX elements throws. `mid_qiov` may be null when
 * `mid_len` is 0 (C would crash).
 */
export function qemu_iovec_init_extended(
  qiov: QEMUIOVector,
  head_buf: Uint8Array | null,
  head_len: number,
  mid_qiov: QEMUIOVector | null,
  mid_offset: number,
  mid_len: number,
  tail_buf: Uint8Array | null,
  tail_len: number,
): number {
  return initExtended(
    'qemu_iovec_init_extended',
    qiov,
    head_buf,
    head_len,
    mid_qiov,
    mid_offset,
    mid_len,
    tail_buf,
    tail_len,
    true,
  );
}

/**
 * Makes `qiov` the vector of `source`'s bytes `[offset, offset + len)`, as views of its
 * elements. QEMU: `qemu_iovec_init_slice`.
 * Surprises: nothing is copied; a one-element slice cannot grow (`nalloc` -1); a slice of
 * length 0 is an empty growable vector. Unlike 7.2 there is no IOV_MAX limit on `source`
 * (a slice never has more elements than its source).
 */
export function qemu_iovec_init_slice(qiov: QEMUIOVector, source: QEMUIOVector, offset: number, len: number): void {
  const fn = 'qemu_iovec_init_slice';
  checkLen(fn, 'offset', offset);
  checkLen(fn, 'len', len);
  if (source.size < len) {
    throw assertFailed(fn, 'source->size >= len', `len ${len} > size ${source.size}`);
  }
  if (source.size - len < offset) {
    throw assertFailed(fn, 'source->size - len >= offset', `offset ${offset} + len ${len} > size ${source.size}`);
  }
  initExtended(fn, qiov, null, 0, source, offset, len, null, 0, false);
}

/**
 * Finds the elements of `qiov` that hold bytes `[offset, offset + len)`.
 * QEMU: `qemu_iovec_slice` (C returns a pointer into `qiov->iov` and `head`, `tail`,
 * `niov` through out-pointers; here one object, with `index` the position of `iov[0]`
 * in `qiov.iov`).
 * Surprises: the elements are not trimmed (`head`/`tail` say by how much they should be);
 * a range starting at 0 keeps leading empty elements; `len` 0 still yields one element
 * when the offset falls inside an element.
 */
export function qemu_iovec_slice(qiov: QEMUIOVector, offset: number, len: number): QEMUIOVectorSlice {
  sliceCore('qemu_iovec_slice', qiov, offset, len);
  const { index, niov, head, tail } = scratch;
  return { iov: qiov.iov.slice(index, index + niov), index, niov, head, tail };
}

/**
 * How many elements of `qiov` hold bytes `[offset, offset + len)`: the `niov` of
 * `qemu_iovec_slice`. QEMU: `qemu_iovec_subvec_niov`.
 * Surprise: counts empty elements inside the range (and a leading one when `offset` is 0).
 */
export function qemu_iovec_subvec_niov(qiov: QEMUIOVector, offset: number, len: number): number {
  sliceCore('qemu_iovec_subvec_niov', qiov, offset, len);
  return scratch.niov;
}

/**
 * Appends the element `base[0..len)` to `qiov`. QEMU: `qemu_iovec_add`.
 * Surprises: nothing is copied (the element is a view of `base`); throws for a vector that
 * does not own its array (`qemu_iovec_init_external`, `qemu_iovec_init_buf`); `nalloc`
 * grows as 2 * nalloc + 1 when full. An empty element is added too.
 */
export function qemu_iovec_add(qiov: QEMUIOVector, base: Uint8Array, len: number): void {
  const fn = 'qemu_iovec_add';
  if (qiov.nalloc === -1) throw notOwned(fn, 'qiov->nalloc != -1');
  checkBuf(fn, 'len', base, 'base', len);
  addElem(qiov, view(base, 0, len));
}

/**
 * Appends to `dst` views of `src_iov[0..src_cnt)`'s bytes from `soffset` on, up to
 * `sbytes` bytes (Infinity: to the end), and returns how many bytes were appended.
 * QEMU: `qemu_iovec_concat_iov`.
 * Surprises: data is not copied, only views; empty source elements are skipped;
 * `sbytes` 0 returns 0 at once, without checking `dst` or `soffset`; a `soffset` beyond
 * the end of the source throws.
 */
export function qemu_iovec_concat_iov(
  dst: QEMUIOVector,
  src_iov: Uint8Array[],
  src_cnt: number,
  soffset: number,
  sbytes: number,
): number {
  return concatCore('qemu_iovec_concat_iov', dst, src_iov, src_cnt, soffset, sbytes);
}

/**
 * Appends to `dst` views of `src`'s bytes `[soffset, soffset + sbytes)` (clipped to the
 * end of `src`; `sbytes` may be Infinity). QEMU: `qemu_iovec_concat`.
 * Surprises: as `qemu_iovec_concat_iov`: no data is copied, empty elements are skipped,
 * and `dst` must own its array. `dst` may be `src`.
 */
export function qemu_iovec_concat(dst: QEMUIOVector, src: QEMUIOVector, soffset: number, sbytes: number): void {
  concatCore('qemu_iovec_concat', dst, src.iov, src.niov, soffset, sbytes);
}

function concatCore(
  fn: string,
  dst: QEMUIOVector,
  src: Uint8Array[],
  cnt: number,
  soffset: number,
  sbytes: number,
): number {
  checkCount(fn, 'src_cnt', cnt, src);
  checkLen(fn, 'soffset', soffset);
  checkBytes(fn, 'sbytes', sbytes);
  if (sbytes === 0) return 0;
  if (dst.nalloc === -1) throw notOwned(fn, 'dst->nalloc != -1');
  let done = 0;
  let off = soffset;
  for (let i = 0; done < sbytes && i < cnt; i++) {
    const v = src[i]!;
    const len = v.length;
    if (off < len) {
      const c = Math.min(len - off, sbytes - done);
      addElem(dst, view(v, off, off + c));
      done += c;
      off = 0;
    } else {
      off -= len;
    }
  }
  if (off !== 0) {
    throw assertFailed(fn, 'soffset == 0', `soffset ${soffset} is beyond the end of the source (${sumLengths(src, cnt)} bytes)`);
  }
  return done;
}

/**
 * True when bytes `[offset, offset + bytes)` of `qiov` are all zero.
 * QEMU: `qemu_iovec_is_zero` (7.2 signature).
 * Surprise: the range must lie inside the vector (it throws, it does not clip); an empty
 * range is zero.
 */
export function qemu_iovec_is_zero(qiov: QEMUIOVector, offset: number, bytes: number): boolean {
  const fn = 'qemu_iovec_is_zero';
  checkLen(fn, 'offset', offset);
  checkLen(fn, 'bytes', bytes);
  if (offset + bytes > qiov.size) {
    throw assertFailed(fn, 'offset + bytes <= qiov->size', `offset ${offset} + bytes ${bytes} > size ${qiov.size}`);
  }
  const iov = qiov.iov;
  const niov = qiov.niov;
  let i = 0;
  let off = offset;
  while (off > 0 && i < niov && off >= iov[i]!.length) {
    off -= iov[i]!.length;
    i++;
  }
  while (bytes > 0) {
    if (i >= niov) throw inconsistent(fn, qiov);
    const v = iov[i]!;
    const c = Math.min(v.length - off, bytes);
    if (!rangeIsZero(v, off, off + c)) return false;
    bytes -= c;
    off = 0;
    i++;
  }
  return true;
}

/**
 * Frees the vector: it becomes empty and growable again (`nalloc` 0), as after
 * `new QEMUIOVector()`. QEMU: `qemu_iovec_destroy`.
 * Surprise: allowed on any vector (external ones included); the caller's array and memory
 * are not touched.
 */
export function qemu_iovec_destroy(qiov: QEMUIOVector): void {
  qiov.iov = [];
  qiov.niov = 0;
  qiov.nalloc = 0;
  qiov.size = 0;
}

/**
 * Empties a growable vector, keeping `nalloc`. QEMU: `qemu_iovec_reset`.
 * Surprise: throws for a vector that does not own its array (external or init_buf).
 */
export function qemu_iovec_reset(qiov: QEMUIOVector): void {
  if (qiov.nalloc === -1) throw notOwned('qemu_iovec_reset', 'qiov->nalloc != -1');
  qiov.iov.length = 0;
  qiov.niov = 0;
  qiov.size = 0;
}

/**
 * Copies n = min(bytes, size - offset) bytes of `qiov`, from `offset` on, into
 * `buf[0..n)` and returns n. QEMU: `qemu_iovec_to_buf`.
 * Surprise: returns the bytes copied, which may be fewer than asked (`bytes` may be
 * Infinity); `offset` equal to the size copies 0, beyond it throws. Throws if `buf` is
 * shorter than n.
 */
export function qemu_iovec_to_buf(qiov: QEMUIOVector, offset: number, buf: Uint8Array, bytes: number): number {
  return toBuf('qemu_iovec_to_buf', qiov.iov, qiov.niov, offset, buf, bytes);
}

/**
 * Copies `buf[0..n)` into `qiov` from `offset` on, n = min(bytes, size - offset), and
 * returns n. QEMU: `qemu_iovec_from_buf`.
 * Surprise: as `qemu_iovec_to_buf`, a short copy is not an error.
 */
export function qemu_iovec_from_buf(qiov: QEMUIOVector, offset: number, buf: Uint8Array, bytes: number): number {
  return fromBuf('qemu_iovec_from_buf', qiov.iov, qiov.niov, offset, buf, bytes);
}

/**
 * Sets min(bytes, size - offset) bytes of `qiov`, from `offset` on, to `fillc & 0xff`,
 * and returns that count. QEMU: `qemu_iovec_memset`.
 * Surprise: as `qemu_iovec_to_buf`, it stops at the end of the vector without complaint.
 */
export function qemu_iovec_memset(qiov: QEMUIOVector, offset: number, fillc: number, bytes: number): number {
  return memsetIov('qemu_iovec_memset', qiov.iov, qiov.niov, offset, fillc, bytes);
}

/**
 * Compares two vectors of the same shape and returns the offset of the first differing
 * byte, or -1 when they are equal. QEMU: `qemu_iovec_compare`.
 * Surprise: the shapes must match element by element (same count, same lengths; typically
 * `b` is a `qemu_iovec_clone` of `a`), else it throws; a length mismatch after the first
 * difference is not noticed.
 */
export function qemu_iovec_compare(a: QEMUIOVector, b: QEMUIOVector): number {
  const fn = 'qemu_iovec_compare';
  if (a.niov !== b.niov) {
    throw assertFailed(fn, 'a->niov == b->niov', `a has ${a.niov} elements, b has ${b.niov}`);
  }
  let offset = 0;
  for (let i = 0; i < a.niov; i++) {
    const p = a.iov[i]!;
    const q = b.iov[i]!;
    if (p.length !== q.length) {
      throw assertFailed(
        fn,
        'a->iov[i].iov_len == b->iov[i].iov_len',
        `element ${i}: ${p.length} bytes in a, ${q.length} in b`,
      );
    }
    const d = firstDiff(p, q);
    offset += d;
    if (d !== p.length) return offset;
  }
  return -1;
}

/**
 * Appends to `dest` one element per element of `src`, with the same lengths, laid out in
 * `buf` so that elements of `src` that overlap in memory overlap the same way in `buf`.
 * Without `buf`, a new SharedArrayBuffer of exactly the needed size is used (a bounce
 * vector for `src` over ordinary memory). QEMU: `qemu_iovec_clone`.
 * Surprises: no data is copied, only the layout (copy with `qemu_iovec_to_buf`/`from_buf`
 * or element by element); `buf` needs at most `src.size` bytes (less when elements
 * overlap) and throws if shorter than needed; `dest` must be growable.
 */
export function qemu_iovec_clone(dest: QEMUIOVector, src: QEMUIOVector, buf?: Uint8Array): void {
  const fn = 'qemu_iovec_clone';
  const n = src.niov;
  if (n > 0 && dest.nalloc === -1) throw notOwned(fn, 'qiov->nalloc != -1');
  const ranks = new Map<ArrayBufferLike, number>();
  const elems: SortElem[] = new Array(n);
  for (let i = 0; i < n; i++) {
    const v = src.iov[i]!;
    let rank = ranks.get(v.buffer);
    if (rank === undefined) {
      rank = ranks.size;
      ranks.set(v.buffer, rank);
    }
    elems[i] = { index: i, rank, start: v.byteOffset, len: v.length, dest: 0 };
  }
  const order = elems.slice().sort(cmpSortElem);
  let pos = 0;
  let lastRank = -1;
  let lastEnd = 0;
  for (const e of order) {
    const same = e.rank === lastRank;
    const rewind = same && lastEnd > e.start ? lastEnd - e.start : 0;
    e.dest = pos - rewind;
    pos += e.len - Math.min(rewind, e.len);
    lastEnd = same ? Math.max(lastEnd, e.start + e.len) : e.start + e.len;
    lastRank = e.rank;
  }
  let mem: Uint8Array;
  if (buf === undefined) {
    mem = new Uint8Array(new SharedArrayBuffer(pos));
  } else {
    if (buf.length < pos) throw new QemuError(`${fn}: buf holds ${buf.length} bytes, fewer than the ${pos} the layout needs`);
    mem = buf;
  }
  for (let i = 0; i < n; i++) {
    const e = elems[i]!;
    addElem(dest, mem.subarray(e.dest, e.dest + e.len));
  }
}

/**
 * Drops the last `bytes` bytes of `qiov`: whole elements leave (`niov` shrinks), a partly
 * dropped last element is replaced by a shorter view. QEMU: `qemu_iovec_discard_back`.
 * Surprises: `bytes` must not exceed the size (it throws, it does not clip); empty
 * elements at the new end go too; for an external vector, the shortened element is written
 * into the caller's array (C shortens it in place).
 */
export function qemu_iovec_discard_back(qiov: QEMUIOVector, bytes: number): void {
  const fn = 'qemu_iovec_discard_back';
  checkLen(fn, 'bytes', bytes);
  if (qiov.size < bytes) {
    throw assertFailed(fn, 'qiov->size >= bytes', `discarding ${bytes} bytes of ${qiov.size}`);
  }
  const total = discardBackCore(qiov.iov, qiov.niov, bytes);
  if (total !== bytes) {
    throw assertFailed(fn, 'total == bytes', `qiov->size ${qiov.size} is more than its ${qiov.niov} elements hold`);
  }
  qiov.niov = discardBackCnt;
  qiov.size -= bytes;
  if (qiov.nalloc !== -1) qiov.iov.length = qiov.niov;
}

/**
 * True when every element of `qiov` lies on a SharedArrayBuffer, so worker threads can
 * read and write it in place; otherwise the request must go through a bounce buffer
 * (e.g. `qemu_iovec_clone(bounce, qiov)` and a copy). aioco's own (QEMU has no such
 * distinction).
 * Surprise: empty elements count too; an empty vector is shared.
 */
export function qemu_iovec_is_shared(qiov: QEMUIOVector): boolean {
  const iov = qiov.iov;
  for (let i = 0; i < qiov.niov; i++) {
    if (!(iov[i]!.buffer instanceof SharedArrayBuffer)) return false;
  }
  return true;
}
