/**
 * qcow2 reference counting (QEMU 7.2: block/qcow2-refcount.c): the refcount table and blocks,
 * cluster allocation and freeing, the metadata overlap checks that guard every write, and
 * `qemu-img check`'s consistency check with repair.
 *
 * Every function here runs under the driver's metadata lock (`s.lock`) in a coroutine, like its
 * QEMU counterpart. Refcounts are plain numbers whatever the entry width (1..64 bits); a 64-bit
 * refcount above 2^53 - 1 reads as 2^53 - 1 (the state's representation rule).
 */
import {
  bdrv_check_result_new,
  BDRV_FIX_ERRORS,
  BDRV_FIX_LEAKS,
  EAGAIN,
  EFBIG,
  EINVAL,
  EIO,
  ENOMEM,
  bdrv_co_pdiscard,
  bdrv_co_pread,
  bdrv_co_pwrite,
  bdrv_co_pwrite_sync,
  bdrv_co_truncate,
  bdrv_co_debug_event,
  bdrv_getlength,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  strerror,
} from '../../../src/index.ts';
import type { BdrvCheckResult, BlockDriverState, CoroutineFn } from '../../../src/index.ts';
import type { BDRVQcow2State, Qcow2DiscardType } from './qcow2-state.ts';
import {
  L1E_OFFSET_MASK,
  L1E_RESERVED_MASK,
  L2E_OFFSET_MASK,
  L2E_STD_RESERVED_MASK,
  QCOW2_DISCARD_ALWAYS,
  QCOW2_DISCARD_NEVER,
  QCOW2_DISCARD_OTHER,
  QCOW2_INCOMPAT_CORRUPT,
  QCOW2_OL_ACTIVE_L1,
  QCOW2_OL_ACTIVE_L2,
  QCOW2_OL_BITMAP_DIRECTORY,
  QCOW2_OL_INACTIVE_L1,
  QCOW2_OL_INACTIVE_L2,
  QCOW2_OL_MAIN_HEADER,
  QCOW2_OL_NAMES,
  QCOW2_OL_REFCOUNT_BLOCK,
  QCOW2_OL_REFCOUNT_TABLE,
  QCOW2_OL_SNAPSHOT_TABLE,
  QCOW2_AUTOCLEAR_BITMAPS,
  QCOW_L2_BITMAP_ALL_ALLOC,
  QCOW_L2_BITMAP_ALL_ZEROES,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_OFLAG_COPIED,
  QCOW_OFLAG_ZERO,
  QCow2ClusterType,
  has_subclusters,
  l2_entry_size,
  qcow2_get_cluster_type,
  qcow2_parse_compressed_l2_entry,
} from './qcow2-state.ts';
import {
  qcow2_cache_discard,
  qcow2_cache_empty,
  qcow2_cache_entry_mark_dirty,
  qcow2_cache_flush,
  qcow2_cache_get,
  qcow2_cache_get_empty,
  qcow2_cache_is_table_offset,
  qcow2_cache_put,
  qcow2_cache_set_dependency,
} from './qcow2-cache.ts';
import { qcow2_flush_caches, qcow2_signal_corruption, qcow2_mark_clean, qcow2_update_header } from './qcow2.ts';
import { qcow2_write_l1_entry } from './qcow2-cluster.ts';
import { qcow2_check_read_snapshot_table, qcow2_check_fix_snapshot_table } from './qcow2-snapshot.ts';
import { qcow2_check_bitmaps_refcounts } from './qcow2-bitmap.ts';

/** Bytes per refcount table entry. QEMU: REFTABLE_ENTRY_SIZE. */
export const REFTABLE_ENTRY_SIZE = 8;
/** Largest host offset a cluster may have. QEMU: QCOW_MAX_CLUSTER_OFFSET (2^56 - 1), capped to exact JS integers. */
const QCOW_MAX_CLUSTER_OFFSET = Number.MAX_SAFE_INTEGER;
const TWO32 = 4294967296;

/** Reads refcount entry `index` of a refcount block (or in-memory refcount array). */
export type Qcow2GetRefcountFunc = (block: Uint8Array, index: number) => number;
/** Writes refcount entry `index`; the value must fit the entry width. */
export type Qcow2SetRefcountFunc = (block: Uint8Array, index: number, value: number) => void;

function bad_refcount(value: number, bits: number): never {
  throw new RangeError(`refcount ${value} does not fit in ${bits} bits`);
}

const get_refcount_funcs: Qcow2GetRefcountFunc[] = [
  (b, i) => (b[i >>> 3] >>> (i & 7)) & 1,
  (b, i) => (b[i >>> 2] >>> (2 * (i & 3))) & 3,
  (b, i) => (b[i >>> 1] >>> (4 * (i & 1))) & 0xf,
  (b, i) => b[i],
  (b, i) => (b[2 * i] << 8) | b[2 * i + 1],
  (b, i) => b[4 * i] * 0x1000000 + ((b[4 * i + 1] << 16) | (b[4 * i + 2] << 8) | b[4 * i + 3]),
  (b, i) => {
    const o = 8 * i;
    const hi = b[o] * 0x1000000 + ((b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]);
    const lo = b[o + 4] * 0x1000000 + ((b[o + 5] << 16) | (b[o + 6] << 8) | b[o + 7]);
    // Above 2^53 - 1 a number cannot hold the refcount exactly: it reads as the maximum.
    if (hi > 0x1fffff) return Number.MAX_SAFE_INTEGER;
    return hi * TWO32 + lo;
  },
];

const set_refcount_funcs: Qcow2SetRefcountFunc[] = [
  (b, i, v) => {
    if (v > 1 || v < 0) bad_refcount(v, 1);
    b[i >>> 3] = (b[i >>> 3] & ~(1 << (i & 7))) | (v << (i & 7));
  },
  (b, i, v) => {
    if (v > 3 || v < 0) bad_refcount(v, 2);
    const sh = 2 * (i & 3);
    b[i >>> 2] = (b[i >>> 2] & ~(3 << sh)) | (v << sh);
  },
  (b, i, v) => {
    if (v > 15 || v < 0) bad_refcount(v, 4);
    const sh = 4 * (i & 1);
    b[i >>> 1] = (b[i >>> 1] & ~(0xf << sh)) | (v << sh);
  },
  (b, i, v) => {
    if (v > 0xff || v < 0) bad_refcount(v, 8);
    b[i] = v;
  },
  (b, i, v) => {
    if (v > 0xffff || v < 0) bad_refcount(v, 16);
    b[2 * i] = v >>> 8;
    b[2 * i + 1] = v & 0xff;
  },
  (b, i, v) => {
    if (v > 0xffffffff || v < 0) bad_refcount(v, 32);
    const o = 4 * i;
    b[o] = v >>> 24;
    b[o + 1] = (v >>> 16) & 0xff;
    b[o + 2] = (v >>> 8) & 0xff;
    b[o + 3] = v & 0xff;
  },
  (b, i, v) => {
    if (v > Number.MAX_SAFE_INTEGER || v < 0) bad_refcount(v, 64);
    const o = 8 * i;
    const hi = Math.floor(v / TWO32);
    const lo = v >>> 0;
    b[o] = hi >>> 24;
    b[o + 1] = (hi >>> 16) & 0xff;
    b[o + 2] = (hi >>> 8) & 0xff;
    b[o + 3] = hi & 0xff;
    b[o + 4] = lo >>> 24;
    b[o + 5] = (lo >>> 16) & 0xff;
    b[o + 6] = (lo >>> 8) & 0xff;
    b[o + 7] = lo & 0xff;
  },
];

/**
 * The refcount accessors for `refcount_order` (0..6) and the largest refcount. QEMU: the
 * `get_refcount_funcs` / `set_refcount_funcs` tables and `s->refcount_max`. Surprise: for 64-bit
 * refcounts the maximum is 2^53 - 1 here (QEMU: 2^64 - 1), the largest exact JS integer.
 */
export function qcow2_refcount_funcs(refcount_order: number): { get: Qcow2GetRefcountFunc; set: Qcow2SetRefcountFunc; max: number } {
  if (!(refcount_order >= 0 && refcount_order <= 6)) throw new RangeError(`refcount_order ${refcount_order} out of range`);
  const bits = 1 << refcount_order;
  return {
    get: get_refcount_funcs[refcount_order],
    set: set_refcount_funcs[refcount_order],
    max: bits === 64 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1,
  };
}

/** Big-endian u64 at `off` as a number (exact below 2^53). */
function be64(buf: Uint8Array, off: number): number {
  const hi = buf[off] * 0x1000000 + ((buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3]);
  const lo = buf[off + 4] * 0x1000000 + ((buf[off + 5] << 16) | (buf[off + 6] << 8) | buf[off + 7]);
  return hi * TWO32 + lo;
}

function put_be64(buf: Uint8Array, off: number, v: number): void {
  const hi = Math.floor(v / TWO32);
  const lo = v >>> 0;
  buf[off] = hi >>> 24;
  buf[off + 1] = (hi >>> 16) & 0xff;
  buf[off + 2] = (hi >>> 8) & 0xff;
  buf[off + 3] = hi & 0xff;
  buf[off + 4] = lo >>> 24;
  buf[off + 5] = (lo >>> 16) & 0xff;
  buf[off + 6] = (lo >>> 8) & 0xff;
  buf[off + 7] = lo & 0xff;
}

/** Offset part of a refcount table entry (QEMU: `entry & REFT_OFFSET_MASK`). */
function reft_offset(entry: number): number {
  return entry - (entry % 512);
}

function hex(n: number | bigint): string {
  return n.toString(16);
}

function stderr_print(line: string): void {
  process.stderr.write(line);
}

let error_report_fn: (msg: string) => void = (msg) => process.stderr.write(`${msg}\n`);

/**
 * Where the check's `error_report` messages go (the few QEMU reports through an Error rather than
 * fprintf, e.g. "ERROR writing refblock: ..."). QEMU prefixes them with the program name
 * ("qemu-img: "); a tool sets a reporter that does the same. The default prints the bare message.
 */
export function qcow2_set_error_report(fn: (msg: string) => void): void {
  error_report_fn = fn;
}

/**
 * Reports `msg` (and an optional hint, printed as is after it) the way QEMU's `error_report` /
 * `error_report_err` do, through the reporter set with `qcow2_set_error_report`.
 */
export function qcow2_error_report(msg: string, hint?: string): void {
  error_report_fn(msg);
  if (hint) process.stderr.write(hint);
}

function update_max_refcount_table_index(s: BDRVQcow2State): void {
  let i = s.refcount_table_size - 1;
  while (i > 0 && reft_offset(s.refcount_table[i]) === 0) i--;
  s.max_refcount_table_index = Math.max(i, 0);
}

/**
 * Loads the refcount table into `s.refcount_table` and selects the refcount accessors for
 * `s.refcount_order`. QEMU: `qcow2_refcount_init`. Expects `refcount_table_offset` and
 * `refcount_table_size` (entries) validated by the open code. Returns 0 or -errno.
 */
export function* qcow2_refcount_init(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const f = qcow2_refcount_funcs(s.refcount_order);
  s.get_refcount = f.get;
  s.set_refcount = f.set;
  s.refcount_bits = 1 << s.refcount_order;
  s.refcount_max = f.max;
  s.refcount_block_bits = s.cluster_bits - (s.refcount_order - 3);
  s.refcount_block_size = 2 ** s.refcount_block_bits;
  s.discards ??= [];

  if (s.refcount_table_size * REFTABLE_ENTRY_SIZE > QCOW_MAX_REFTABLE_SIZE) return -EFBIG;
  s.refcount_table = new Float64Array(s.refcount_table_size);
  s.max_refcount_table_index = 0;
  if (s.refcount_table_size > 0) {
    const bytes = s.refcount_table_size * REFTABLE_ENTRY_SIZE;
    const buf = new Uint8Array(bytes);
    yield* bdrv_co_debug_event(bs.file!.bs, 'reftable_load');
    const ret = yield* bdrv_co_pread(bs.file!, s.refcount_table_offset, bytes, buf, 0);
    if (ret < 0) return ret;
    for (let i = 0; i < s.refcount_table_size; i++) s.refcount_table[i] = be64(buf, 8 * i);
    update_max_refcount_table_index(s);
  }
  return 0;
}

/** Drops the in-memory refcount table. QEMU: `qcow2_refcount_close`. */
export function qcow2_refcount_close(bs: BlockDriverState): void {
  const s = bs.opaque as BDRVQcow2State;
  s.refcount_table = new Float64Array(0);
}

function* load_refcount_block(bs: BlockDriverState, refcount_block_offset: number, out: { table: Uint8Array | null }): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_load');
  return yield* qcow2_cache_get(bs, s.refcount_block_cache, refcount_block_offset, out);
}

/**
 * Stores the refcount of cluster `cluster_index` in `out.refcount`. QEMU: `qcow2_get_refcount`.
 * A cluster beyond the refcount table or without a refcount block has refcount 0. An
 * unaligned refcount block offset marks the image corrupt (-EIO).
 */
export function* qcow2_get_refcount(bs: BlockDriverState, cluster_index: number, out: { refcount: number }): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const refcount_table_index = Math.floor(cluster_index / s.refcount_block_size);
  if (refcount_table_index >= s.refcount_table_size) {
    out.refcount = 0;
    return 0;
  }
  const refcount_block_offset = reft_offset(s.refcount_table[refcount_table_index]);
  if (!refcount_block_offset) {
    out.refcount = 0;
    return 0;
  }
  if (refcount_block_offset % s.cluster_size) {
    qcow2_signal_corruption(
      bs,
      true,
      -1,
      -1,
      `Refblock offset 0x${hex(refcount_block_offset)} unaligned (reftable index: 0x${hex(refcount_table_index)})`,
    );
    return -EIO;
  }
  const t = { table: null as Uint8Array | null };
  const ret = yield* qcow2_cache_get(bs, s.refcount_block_cache, refcount_block_offset, t);
  if (ret < 0) return ret;
  out.refcount = s.get_refcount(t.table!, cluster_index % s.refcount_block_size);
  qcow2_cache_put(s.refcount_block_cache, t.table!);
  return 0;
}

function in_same_refcount_block(s: BDRVQcow2State, offset_a: number, offset_b: number): boolean {
  const span = s.cluster_size * s.refcount_block_size;
  return Math.floor(offset_a / span) === Math.floor(offset_b / span);
}

/**
 * Loads (allocating it first if needed) the refcount block for `cluster_index` into `out.table`.
 * Returns 0; or -EAGAIN when it had to allocate metadata (the caller must restart its free-cluster
 * search; `out.table` may still hold a reference the caller releases); or -errno.
 */
function* alloc_refcount_block(bs: BlockDriverState, cluster_index: number, out: { table: Uint8Array | null }): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_alloc');
  const refcount_table_index = Math.floor(cluster_index / s.refcount_block_size);

  if (refcount_table_index < s.refcount_table_size) {
    const refcount_block_offset = reft_offset(s.refcount_table[refcount_table_index]);
    if (refcount_block_offset) {
      if (refcount_block_offset % s.cluster_size) {
        qcow2_signal_corruption(
          bs,
          true,
          -1,
          -1,
          `Refblock offset 0x${hex(refcount_block_offset)} unaligned (reftable index: 0x${hex(refcount_table_index)})`,
        );
        return -EIO;
      }
      return yield* load_refcount_block(bs, refcount_block_offset, out);
    }
  }

  // A new refcount block is needed. It cannot be allocated with qcow2_alloc_clusters (that
  // would recurse into this function), so it is placed where it can describe itself, or its
  // refcount is set in another block that exists already.
  out.table = null;

  // The refcount table is about to change; L2 tables written so far must not depend on it.
  let ret = yield* qcow2_cache_flush(bs, s.l2_table_cache);
  if (ret < 0) return ret;

  const new_block = yield* alloc_clusters_noref(bs, s.cluster_size, Number.MAX_SAFE_INTEGER);
  if (new_block < 0) return new_block;
  if (new_block === 0) {
    qcow2_signal_corruption(bs, true, -1, -1, 'Preventing invalid allocation of refcount block at offset 0');
    return -EIO;
  }

  if (in_same_refcount_block(s, new_block, cluster_index * s.cluster_size)) {
    ret = yield* qcow2_cache_get_empty(bs, s.refcount_block_cache, new_block, out);
    if (ret < 0) return fail(ret);
    out.table!.fill(0);
    s.set_refcount(out.table!, Math.floor(new_block / s.cluster_size) % s.refcount_block_size, 1);
  } else {
    // Described by a block elsewhere; that recursion ends at a block that describes itself.
    ret = yield* update_refcount(bs, new_block, s.cluster_size, 1, false, QCOW2_DISCARD_NEVER);
    if (ret < 0) return fail(ret);
    ret = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
    if (ret < 0) return fail(ret);
    // Only now: update_refcount used the cache and could have evicted our slot.
    ret = yield* qcow2_cache_get_empty(bs, s.refcount_block_cache, new_block, out);
    if (ret < 0) return fail(ret);
    out.table!.fill(0);
  }

  yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_alloc_write');
  qcow2_cache_entry_mark_dirty(s.refcount_block_cache, out.table!);
  ret = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
  if (ret < 0) return fail(ret);

  if (refcount_table_index < s.refcount_table_size) {
    // The table has room: hook the block up.
    const data = new Uint8Array(8);
    put_be64(data, 0, new_block);
    yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_alloc_hookup');
    ret = yield* bdrv_co_pwrite_sync(bs.file!, s.refcount_table_offset + refcount_table_index * REFTABLE_ENTRY_SIZE, 8, data, 0);
    if (ret < 0) return fail(ret);
    s.refcount_table[refcount_table_index] = new_block;
    s.max_refcount_table_index = Math.max(s.max_refcount_table_index, refcount_table_index);
    // The new block may sit where the caller meant to put its data.
    return -EAGAIN;
  }

  qcow2_cache_put(s.refcount_block_cache, out.table!);
  out.table = null;

  // The table is too small: build a new table plus refcount blocks covering themselves past
  // every cluster in use, then switch the header to it in one write.
  yield* bdrv_co_debug_event(bs.file!.bs, 'reftable_grow');
  const blocks_used = Math.ceil(Math.max(cluster_index + 1, Math.floor(new_block / s.cluster_size) + 1) / s.refcount_block_size);
  const meta_offset = blocks_used * s.refcount_block_size * s.cluster_size;
  const area = yield* qcow2_refcount_area(bs, meta_offset, 0, false, refcount_table_index, new_block);
  if (area < 0) return area;
  ret = yield* load_refcount_block(bs, new_block, out);
  if (ret < 0) return ret;
  return -EAGAIN;

  function fail(r: number): number {
    if (out.table) {
      qcow2_cache_put(s.refcount_block_cache, out.table);
      out.table = null;
    }
    return r;
  }
}

/**
 * Size in bytes of the refcount metadata (table + blocks) that covers `clusters` clusters and
 * itself; with `generous_increase`, room for half as many table clusters again. QEMU:
 * `qcow2_refcount_metadata_size` (block/qcow2.c). `out.refblock_count` gets the block count.
 */
export function qcow2_refcount_metadata_size(
  clusters: number,
  cluster_size: number,
  refcount_order: number,
  generous_increase: boolean,
  out: { refblock_count: number } | null,
): number {
  const blocks_per_table_cluster = cluster_size / REFTABLE_ENTRY_SIZE;
  const refcounts_per_block = (cluster_size * 8) / (1 << refcount_order);
  let table = 0;
  let blocks = 0;
  let last: number;
  let n = 0;
  // Every cluster is refcounted, refcount metadata included: iterate to the fixed point.
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcounts_per_block);
    table = Math.ceil(blocks / blocks_per_table_cluster);
    n = clusters + blocks + table;
    if (n === last && generous_increase) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generous_increase = false;
    }
  } while (n !== last);
  if (out) out.refblock_count = blocks;
  return (blocks + table) * cluster_size;
}

/**
 * Creates, at `start_offset` (the end of the image: only free space beyond it), a new refcount
 * table and refcount blocks that cover themselves and `additional_clusters` more, copies the old
 * table's entries, switches the header to the new table and frees the old one. QEMU:
 * `qcow2_refcount_area`. Returns the offset just past the new structures, or -errno.
 * Surprise: without `exact_size` the table gets 50 % spare entries.
 */
export function* qcow2_refcount_area(
  bs: BlockDriverState,
  start_offset: number,
  additional_clusters: number,
  exact_size: boolean,
  new_refblock_index: number,
  new_refblock_offset: number,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (start_offset % s.cluster_size) throw new Error('qcow2_refcount_area: unaligned start');

  const cnt = { refblock_count: 0 };
  qcow2_refcount_metadata_size(start_offset / s.cluster_size + additional_clusters, s.cluster_size, s.refcount_order, !exact_size, cnt);
  const total_refblock_count = cnt.refblock_count;
  if (total_refblock_count > QCOW_MAX_REFTABLE_SIZE) return -EFBIG;

  const area_reftable_index = Math.floor(start_offset / s.cluster_size / s.refcount_block_size);
  let table_size = exact_size ? total_refblock_count : total_refblock_count + Math.ceil(total_refblock_count / 2);
  const per_cluster = s.cluster_size / REFTABLE_ENTRY_SIZE;
  table_size = Math.ceil(table_size / per_cluster) * per_cluster;
  const table_clusters = (table_size * REFTABLE_ENTRY_SIZE) / s.cluster_size;
  if (table_size > QCOW_MAX_REFTABLE_SIZE) return -EFBIG;

  const new_table = new Float64Array(table_size);
  if (table_size > s.max_refcount_table_index) {
    new_table.set(s.refcount_table.subarray(0, Math.min(s.max_refcount_table_index + 1, s.refcount_table_size)));
  } else {
    // Shrinking: the caller guarantees nothing is in use past start_offset.
    new_table.set(s.refcount_table.subarray(0, table_size));
  }
  if (new_refblock_offset) {
    if (new_refblock_index >= total_refblock_count) throw new Error('qcow2_refcount_area: refblock index out of range');
    new_table[new_refblock_index] = new_refblock_offset;
  }

  let additional_refblock_count = 0;
  for (let i = area_reftable_index; i < total_refblock_count; i++) {
    if (!new_table[i]) additional_refblock_count++;
  }
  const table_offset = start_offset + additional_refblock_count * s.cluster_size;
  const end_offset = table_offset + table_clusters * s.cluster_size;

  let ret: number;
  let block_offset = start_offset;
  const t = { table: null as Uint8Array | null };
  for (let i = area_reftable_index; i < total_refblock_count; i++) {
    if (new_table[i]) {
      ret = yield* qcow2_cache_get(bs, s.refcount_block_cache, reft_offset(new_table[i]), t);
      if (ret < 0) return ret;
    } else {
      ret = yield* qcow2_cache_get_empty(bs, s.refcount_block_cache, block_offset, t);
      if (ret < 0) return ret;
      t.table!.fill(0);
      qcow2_cache_entry_mark_dirty(s.refcount_block_cache, t.table!);
      new_table[i] = block_offset;
      block_offset += s.cluster_size;
    }
    const first_offset_covered = i * s.refcount_block_size * s.cluster_size;
    if (first_offset_covered < end_offset) {
      let j = first_offset_covered < start_offset ? (start_offset - first_offset_covered) / s.cluster_size : 0;
      const end_index = Math.min((end_offset - first_offset_covered) / s.cluster_size, s.refcount_block_size);
      for (; j < end_index; j++) {
        if (s.get_refcount(t.table!, j) !== 0) {
          // QEMU asserts: the space was supposed to be free. Only a corrupt image gets here.
          qcow2_cache_put(s.refcount_block_cache, t.table!);
          qcow2_signal_corruption(bs, true, -1, -1, `Refcount of cluster 0x${hex(first_offset_covered / s.cluster_size + j)} past the image end is not zero`);
          return -EIO;
        }
        s.set_refcount(t.table!, j, 1);
      }
      qcow2_cache_entry_mark_dirty(s.refcount_block_cache, t.table!);
    }
    qcow2_cache_put(s.refcount_block_cache, t.table!);
    t.table = null;
  }

  yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_alloc_write_blocks');
  ret = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
  if (ret < 0) return ret;

  const buf = new Uint8Array(table_size * REFTABLE_ENTRY_SIZE);
  for (let i = 0; i < table_size; i++) if (new_table[i]) put_be64(buf, 8 * i, new_table[i]);
  yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_alloc_write_table');
  ret = yield* bdrv_co_pwrite_sync(bs.file!, table_offset, buf.length, buf, 0);
  if (ret < 0) return ret;

  // Header fields refcount_table_offset (48) and refcount_table_clusters (56) in one write.
  const hdr = new Uint8Array(12);
  put_be64(hdr, 0, table_offset);
  new DataView(hdr.buffer).setUint32(8, table_clusters);
  yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_alloc_switch_table');
  ret = yield* bdrv_co_pwrite_sync(bs.file!, 48, 12, hdr, 0);
  if (ret < 0) return ret;

  const old_table_offset = s.refcount_table_offset;
  const old_table_size = s.refcount_table_size;
  s.refcount_table = new_table;
  s.refcount_table_size = table_size;
  s.refcount_table_offset = table_offset;
  s.refcount_table_clusters = table_clusters;
  update_max_refcount_table_index(s);

  yield* qcow2_free_clusters(bs, old_table_offset, old_table_size * REFTABLE_ENTRY_SIZE, QCOW2_DISCARD_OTHER);
  return end_offset;
}

/**
 * Sends the queued discards of freed clusters to the file (only when `ret` >= 0) and empties
 * the queue. QEMU: `qcow2_process_discards`. Discard errors are ignored (discard is advisory).
 */
export function* qcow2_process_discards(bs: BlockDriverState, ret: number): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  const list = s.discards ?? [];
  s.discards = [];
  for (const d of list) {
    if (ret >= 0) yield* bdrv_co_pdiscard(bs.file!, d.offset, d.bytes);
  }
}

function update_refcount_discard(s: BDRVQcow2State, offset: number, length: number): void {
  const list = (s.discards ??= []);
  let d = null;
  for (const r of list) {
    const new_start = Math.min(offset, r.offset);
    const new_end = Math.max(offset + length, r.offset + r.bytes);
    if (new_end - new_start <= length + r.bytes) {
      r.offset = new_start;
      r.bytes = new_end - new_start;
      d = r;
      break;
    }
  }
  if (!d) {
    d = { offset, bytes: length };
    list.push(d);
  }
  // Merge with neighbours that are adjacent now.
  for (let i = 0; i < list.length; i++) {
    const p = list[i];
    if (p === d || p.offset > d.offset + d.bytes || d.offset > p.offset + p.bytes) continue;
    d.offset = Math.min(d.offset, p.offset);
    d.bytes += p.bytes;
    list.splice(i, 1);
    i--;
  }
}

/**
 * Adds (or with `decrease`, subtracts) `addend` to the refcount of every cluster touched by
 * [offset, offset + length). On error, what was changed is undone as far as possible.
 */
function* update_refcount(
  bs: BlockDriverState,
  offset: number,
  length: number,
  addend: number,
  decrease: boolean,
  type: Qcow2DiscardType,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (length < 0) return -EINVAL;
  if (length === 0) return 0;

  if (decrease) {
    // Freed clusters must stay referenced on disk until the L2 tables dropping them are written.
    yield* qcow2_cache_set_dependency(bs, s.refcount_block_cache, s.l2_table_cache);
  }

  const start = offset - (offset % s.cluster_size);
  const lastpos = offset + length - 1;
  const last = lastpos - (lastpos % s.cluster_size);
  const t = { table: null as Uint8Array | null };
  let old_table_index = -1;
  let ret = 0;
  let cluster_offset = start;
  for (; cluster_offset <= last; cluster_offset += s.cluster_size) {
    const cluster_index = cluster_offset / s.cluster_size;
    const table_index = Math.floor(cluster_index / s.refcount_block_size);

    if (table_index !== old_table_index) {
      if (t.table) {
        qcow2_cache_put(s.refcount_block_cache, t.table);
        t.table = null;
      }
      ret = yield* alloc_refcount_block(bs, cluster_index, t);
      // The caller restarts its free-cluster search: let it try the same clusters first.
      if (ret === -EAGAIN && s.free_cluster_index > start / s.cluster_size) s.free_cluster_index = start / s.cluster_size;
      if (ret < 0) break;
    }
    old_table_index = table_index;

    qcow2_cache_entry_mark_dirty(s.refcount_block_cache, t.table!);
    const block_index = cluster_index % s.refcount_block_size;
    let refcount = s.get_refcount(t.table!, block_index);
    if (decrease ? refcount - addend < 0 : refcount + addend > s.refcount_max) {
      ret = -EINVAL;
      break;
    }
    refcount = decrease ? refcount - addend : refcount + addend;
    if (refcount === 0 && cluster_index < s.free_cluster_index) s.free_cluster_index = cluster_index;
    s.set_refcount(t.table!, block_index, refcount);

    if (refcount === 0) {
      // A freed cluster must not be written back from a cache later.
      const rb = qcow2_cache_is_table_offset(s.refcount_block_cache, cluster_offset);
      if (rb) {
        qcow2_cache_put(s.refcount_block_cache, t.table!);
        t.table = null;
        old_table_index = -1;
        qcow2_cache_discard(s.refcount_block_cache, rb);
      }
      discard_l2_slices(s, cluster_offset);
      if (s.discard_passthrough[type]) update_refcount_discard(s, cluster_offset, s.cluster_size);
    }
  }

  if (!s.cache_discards) yield* qcow2_process_discards(bs, ret);
  if (t.table) qcow2_cache_put(s.refcount_block_cache, t.table);

  if (ret < 0) {
    yield* update_refcount(bs, offset, cluster_offset - offset, addend, !decrease, QCOW2_DISCARD_NEVER);
  }
  return ret;
}

function discard_l2_slices(s: BDRVQcow2State, cluster_offset: number): void {
  const c = s.l2_table_cache;
  for (let i = 0; i < c.size; i++) {
    const e = c.entries[i];
    if (e.offset >= cluster_offset && e.offset < cluster_offset + s.cluster_size && e.ref === 0) {
      qcow2_cache_discard(c, c.tables[i]);
    }
  }
}

/**
 * Adds (`decrease` false) or subtracts `addend` to the refcount of one cluster. QEMU:
 * `qcow2_update_cluster_refcount`. Returns 0 or -errno (-EINVAL on overflow or underflow).
 */
export function* qcow2_update_cluster_refcount(
  bs: BlockDriverState,
  cluster_index: number,
  addend: number,
  decrease: boolean,
  type: Qcow2DiscardType,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const ret = yield* update_refcount(bs, cluster_index * s.cluster_size, 1, addend, decrease, type);
  return ret < 0 ? ret : 0;
}

/** Finds `size` bytes of free clusters from `free_cluster_index` on, without taking them. */
function* alloc_clusters_noref(bs: BlockDriverState, size: number, max: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  // Clusters queued for discard must be discarded before they are reused.
  if (s.cache_discards) yield* qcow2_process_discards(bs, 0);

  const nb_clusters = Math.ceil(size / s.cluster_size);
  const out = { refcount: 0 };
  retry: for (;;) {
    for (let i = 0; i < nb_clusters; i++) {
      const next_cluster_index = s.free_cluster_index++;
      const ret = yield* qcow2_get_refcount(bs, next_cluster_index, out);
      if (ret < 0) return ret;
      if (out.refcount !== 0) continue retry;
    }
    break;
  }
  if (s.free_cluster_index > 0 && s.free_cluster_index - 1 > Math.floor(max / s.cluster_size)) return -EFBIG;
  return (s.free_cluster_index - nb_clusters) * s.cluster_size;
}

/**
 * Allocates contiguous clusters for `size` bytes and sets their refcount to 1. QEMU:
 * `qcow2_alloc_clusters`. Returns the host offset or -errno. Surprise: the caller must make the
 * L2 cache depend on the refcount cache before linking the clusters (write ordering).
 */
export function* qcow2_alloc_clusters(bs: BlockDriverState, size: number): CoroutineFn<number> {
  yield* bdrv_co_debug_event(bs.file!.bs, 'cluster_alloc');
  let offset: number;
  let ret: number;
  do {
    offset = yield* alloc_clusters_noref(bs, size, QCOW_MAX_CLUSTER_OFFSET);
    if (offset < 0) return offset;
    ret = yield* update_refcount(bs, offset, size, 1, false, QCOW2_DISCARD_NEVER);
  } while (ret === -EAGAIN);
  return ret < 0 ? ret : offset;
}

/**
 * Allocates up to `nb_clusters` clusters starting exactly at `offset`, stopping at the first one
 * in use. QEMU: `qcow2_alloc_clusters_at`. Returns how many were allocated (0 if the first is in
 * use) or -errno.
 */
export function* qcow2_alloc_clusters_at(bs: BlockDriverState, offset: number, nb_clusters: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (nb_clusters < 0) throw new RangeError('qcow2_alloc_clusters_at: negative count');
  if (nb_clusters === 0) return 0;
  const out = { refcount: 0 };
  let i: number;
  let ret: number;
  do {
    let cluster_index = Math.floor(offset / s.cluster_size);
    for (i = 0; i < nb_clusters; i++) {
      ret = yield* qcow2_get_refcount(bs, cluster_index++, out);
      if (ret < 0) return ret;
      if (out.refcount !== 0) break;
    }
    ret = yield* update_refcount(bs, offset, i * s.cluster_size, 1, false, QCOW2_DISCARD_NEVER);
  } while (ret === -EAGAIN);
  return ret < 0 ? ret : i;
}

/**
 * Allocates `size` bytes (at most a cluster) for compressed data, packing them after the
 * previous compressed allocation when it fits (possibly spanning into the next cluster). QEMU:
 * `qcow2_alloc_bytes`. Each allocation adds 1 to the refcount of every cluster it touches.
 * Returns the host byte offset or -errno. Surprise: it also makes the L2 cache depend on the
 * refcount cache, so the caller's L2 update is ordered after the refcounts.
 */
export function* qcow2_alloc_bytes(bs: BlockDriverState, size: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  yield* bdrv_co_debug_event(bs.file!.bs, 'cluster_alloc_bytes');
  if (!(size > 0 && size <= s.cluster_size)) throw new RangeError(`qcow2_alloc_bytes: bad size ${size}`);

  let offset = s.free_byte_offset;
  if (offset) {
    const out = { refcount: 0 };
    const ret = yield* qcow2_get_refcount(bs, Math.floor(offset / s.cluster_size), out);
    if (ret < 0) return ret;
    if (out.refcount === s.refcount_max) offset = 0;
  }

  let free_in_cluster = s.cluster_size - (offset % s.cluster_size);
  let ret: number;
  do {
    if (!offset || free_in_cluster < size) {
      const max = Math.min(Number(s.cluster_offset_mask), QCOW_MAX_CLUSTER_OFFSET);
      const new_cluster = yield* alloc_clusters_noref(bs, s.cluster_size, max);
      if (new_cluster < 0) return new_cluster;
      if (new_cluster === 0) {
        qcow2_signal_corruption(bs, true, -1, -1, 'Preventing invalid allocation of compressed cluster at offset 0');
        return -EIO;
      }
      if (!offset || Math.ceil(offset / s.cluster_size) * s.cluster_size !== new_cluster) {
        offset = new_cluster;
        free_in_cluster = s.cluster_size;
      } else {
        free_in_cluster += s.cluster_size;
      }
    }
    ret = yield* update_refcount(bs, offset, size, 1, false, QCOW2_DISCARD_NEVER);
    if (ret < 0) offset = 0;
  } while (ret === -EAGAIN);
  if (ret < 0) return ret;

  yield* qcow2_cache_set_dependency(bs, s.l2_table_cache, s.refcount_block_cache);

  s.free_byte_offset = offset + size;
  if (s.free_byte_offset % s.cluster_size === 0) s.free_byte_offset = 0;
  return offset;
}

/**
 * Subtracts 1 from the refcount of every cluster touched by [offset, offset + size) and queues
 * discards for clusters that become free. QEMU: `qcow2_free_clusters` (void there too).
 * Surprise: errors are only printed ("qcow2_free_clusters failed: ..."); the clusters leak.
 */
export function* qcow2_free_clusters(bs: BlockDriverState, offset: number, size: number, type: Qcow2DiscardType): CoroutineFn<void> {
  yield* bdrv_co_debug_event(bs.file!.bs, 'cluster_free');
  const ret = yield* update_refcount(bs, offset, size, 1, true, type);
  if (ret < 0) stderr_print(`qcow2_free_clusters failed: ${strerror(-ret)}\n`);
}

/**
 * Frees the host space an L2 entry points to, whatever its type (compressed: its bytes; normal
 * or preallocated zero: its cluster; others: nothing). QEMU: `qcow2_free_any_cluster`. An
 * unaligned offset is reported as corruption (non-fatal) and nothing is freed.
 */
export function* qcow2_free_any_cluster(bs: BlockDriverState, l2_entry: bigint, type: Qcow2DiscardType): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  switch (qcow2_get_cluster_type(s, l2_entry)) {
    case QCow2ClusterType.COMPRESSED: {
      const { coffset, csize } = qcow2_parse_compressed_l2_entry(s, l2_entry);
      yield* qcow2_free_clusters(bs, coffset, csize, type);
      break;
    }
    case QCow2ClusterType.NORMAL:
    case QCow2ClusterType.ZERO_ALLOC: {
      const off = Number(l2_entry & L2E_OFFSET_MASK);
      if (off % s.cluster_size) {
        qcow2_signal_corruption(bs, false, -1, -1, `Cannot free unaligned cluster 0x${hex(off)}`);
      } else {
        yield* qcow2_free_clusters(bs, off, s.cluster_size, type);
      }
      break;
    }
    default:
      break;
  }
}

/**
 * Index of the last cluster below `size` bytes of the file with a non-zero refcount. QEMU:
 * `qcow2_get_last_cluster`. Returns -errno (printing "Can't get refcount for cluster N: ..."),
 * or -EIO after marking the image corrupt when no cluster is in use at all.
 */
export function* qcow2_get_last_cluster(bs: BlockDriverState, size: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const out = { refcount: 0 };
  for (let i = Math.ceil(size / s.cluster_size) - 1; i >= 0; i--) {
    const ret = yield* qcow2_get_refcount(bs, i, out);
    if (ret < 0) {
      stderr_print(`Can't get refcount for cluster ${i}: ${strerror(-ret)}\n`);
      return ret;
    }
    if (out.refcount > 0) return i;
  }
  qcow2_signal_corruption(bs, true, -1, -1, 'There are no references in the refcount table.');
  return -EIO;
}

// ---------------------------------------------------------------------------------------------
// Metadata overlap checks

function overlaps(offset: number, size: number, ofs: number, sz: number): boolean {
  return sz > 0 && offset < ofs + sz && ofs < offset + size;
}

/**
 * Which metadata structure (a QCOW2_OL_* bit) [offset, offset + size) would overwrite, or 0;
 * checks the structures in `s.overlap_check` minus `ign`. QEMU: `qcow2_check_metadata_overlap`.
 * Surprise: the range is widened to whole clusters first (except for the header check); and the
 * inactive-L2 check uses the offsets loaded by `qcow2_read_snapshots` instead of reading the
 * snapshot L1 tables each time.
 */
export function qcow2_check_metadata_overlap(bs: BlockDriverState, ign: number, offset: number, size: number): number {
  const s = bs.opaque as BDRVQcow2State;
  const chk = s.overlap_check & ~ign;
  if (!size) return 0;

  if (chk & QCOW2_OL_MAIN_HEADER && offset < s.cluster_size) return QCOW2_OL_MAIN_HEADER;

  const cs = s.cluster_size;
  size = Math.ceil(((offset % cs) + size) / cs) * cs;
  offset -= offset % cs;

  if (chk & QCOW2_OL_ACTIVE_L1 && s.l1_size) {
    if (overlaps(offset, size, s.l1_table_offset, s.l1_size * 8)) return QCOW2_OL_ACTIVE_L1;
  }
  if (chk & QCOW2_OL_REFCOUNT_TABLE && s.refcount_table_size) {
    if (overlaps(offset, size, s.refcount_table_offset, s.refcount_table_size * REFTABLE_ENTRY_SIZE)) return QCOW2_OL_REFCOUNT_TABLE;
  }
  if (chk & QCOW2_OL_SNAPSHOT_TABLE && s.snapshots_size) {
    if (overlaps(offset, size, s.snapshots_offset, s.snapshots_size)) return QCOW2_OL_SNAPSHOT_TABLE;
  }
  if (chk & QCOW2_OL_INACTIVE_L1 && s.snapshots) {
    for (const sn of s.snapshots) {
      if (sn.l1_size && overlaps(offset, size, sn.l1_table_offset, sn.l1_size * 8)) return QCOW2_OL_INACTIVE_L1;
    }
  }
  if (chk & QCOW2_OL_ACTIVE_L2 && s.l1_table) {
    const l1 = s.l1_table;
    const n = Math.min(s.l1_size, l1.length);
    for (let i = 0; i < n; i++) {
      const e = l1[i];
      if (e === 0n) continue;
      const l2 = Number(e & L1E_OFFSET_MASK);
      if (l2 && l2 < offset + size && offset < l2 + cs) return QCOW2_OL_ACTIVE_L2;
    }
  }
  if (chk & QCOW2_OL_REFCOUNT_BLOCK && s.refcount_table) {
    const rt = s.refcount_table;
    const last = Math.min(s.max_refcount_table_index, rt.length - 1);
    for (let i = 0; i <= last; i++) {
      const rb = reft_offset(rt[i]);
      if (rb && rb < offset + size && offset < rb + cs) return QCOW2_OL_REFCOUNT_BLOCK;
    }
  }
  if (chk & QCOW2_OL_INACTIVE_L2 && s.inactive_l2_offsets) {
    for (const l2 of s.inactive_l2_offsets) {
      if (l2 < offset + size && offset < l2 + cs) return QCOW2_OL_INACTIVE_L2;
    }
  }
  if (chk & QCOW2_OL_BITMAP_DIRECTORY && s.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) {
    if (overlaps(offset, size, s.bitmap_directory_offset, s.bitmap_directory_size)) return QCOW2_OL_BITMAP_DIRECTORY;
  }
  return 0;
}

/**
 * Refuses a write that would overwrite metadata: marks the image corrupt ("Preventing invalid
 * write on metadata (overlaps with <structure>)") and returns -EIO; 0 when the write is safe.
 * QEMU: `qcow2_pre_write_overlap_check`. `data_file` is true for guest data writes (which skip
 * the check only with an external data file, which aioco does not support). A coroutine_fn like
 * QEMU's, though it does no I/O here (`qcow2_check_metadata_overlap` is the synchronous core).
 */
export function* qcow2_pre_write_overlap_check(bs: BlockDriverState, ign: number, offset: number, size: number, data_file: boolean): CoroutineFn<number> {
  void data_file;
  const ret = qcow2_check_metadata_overlap(bs, ign, offset, size);
  if (ret < 0) return ret;
  if (ret > 0) {
    const bitnr = 31 - Math.clz32(ret & -ret);
    qcow2_signal_corruption(bs, true, offset, size, `Preventing invalid write on metadata (overlaps with ${QCOW2_OL_NAMES[bitnr]})`);
    return -EIO;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Consistency check (qemu-img check)

/**
 * The in-memory refcount table (QEMU: "IMRT", `void **refcount_table` + `int64_t *nb_clusters`)
 * that `qemu-img check` builds from the references it finds. Its bytes use the image's refcount
 * entry format and are a whole number of clusters, so slices can be written as refcount blocks.
 */
export interface Qcow2Imrt {
  table: Uint8Array;
  nb_clusters: number;
  /** Length of the image file (references past it by a cluster or more are corruption). */
  file_len: number;
}

function refcount_array_byte_size(s: BDRVQcow2State, entries: number): number {
  return Math.ceil((entries * (1 << s.refcount_order)) / 8);
}

function realloc_refcount_array(s: BDRVQcow2State, imrt: Qcow2Imrt, new_size: number): number {
  const cs = s.cluster_size;
  const old_bytes = Math.ceil(refcount_array_byte_size(s, imrt.nb_clusters) / cs) * cs;
  const new_bytes = Math.ceil(refcount_array_byte_size(s, new_size) / cs) * cs;
  if (new_bytes !== old_bytes) {
    let t: Uint8Array;
    try {
      t = new Uint8Array(new_bytes);
    } catch {
      return -ENOMEM;
    }
    t.set(imrt.table.subarray(0, Math.min(old_bytes, new_bytes)));
    imrt.table = t;
  }
  imrt.nb_clusters = new_size;
  return 0;
}

/**
 * Adds 1 to the in-memory refcount of every cluster touched by [offset, offset + size).
 * QEMU: `qcow2_inc_refcounts_imrt`. A range reaching a cluster or more past the end of the file
 * is a corruption ("ERROR: counting reference for region exceeding the end of the file by one
 * cluster or more: ..."), and a refcount at its maximum stays there (overflow error).
 */
export function qcow2_inc_refcounts_imrt(bs: BlockDriverState, res: BdrvCheckResult, imrt: Qcow2Imrt, offset: number, size: number): number {
  const s = bs.opaque as BDRVQcow2State;
  if (size <= 0) return 0;
  if (offset + size - imrt.file_len >= s.cluster_size) {
    stderr_print(
      `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}\n`,
    );
    res.corruptions++;
    return 0;
  }
  const cs = s.cluster_size;
  const start = offset - (offset % cs);
  const lastpos = offset + size - 1;
  const last = lastpos - (lastpos % cs);
  for (let cluster_offset = start; cluster_offset <= last; cluster_offset += cs) {
    const k = cluster_offset / cs;
    if (k >= imrt.nb_clusters) {
      const ret = realloc_refcount_array(s, imrt, k + 1);
      if (ret < 0) {
        res.check_errors++;
        return ret;
      }
    }
    const refcount = s.get_refcount(imrt.table, k);
    if (refcount === s.refcount_max) {
      stderr_print(`ERROR: overflow cluster offset=0x${hex(cluster_offset)}\n`);
      stderr_print(
        'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing\n',
      );
      res.corruptions++;
      continue;
    }
    s.set_refcount(imrt.table, k, refcount + 1);
  }
  return 0;
}

const CHECK_FRAG_INFO = 0x2;

function get_l2_entry(s: BDRVQcow2State, dv: DataView, idx: number): bigint {
  return dv.getBigUint64(idx * l2_entry_size(s));
}

function get_l2_bitmap(s: BDRVQcow2State, dv: DataView, idx: number): bigint {
  return has_subclusters(s) ? dv.getBigUint64(idx * l2_entry_size(s) + 8) : 0n;
}

/** Makes L2 entry `l2_index` read as zeros (no host cluster) and writes it; for check -r. */
function* fix_l2_entry_by_zero(
  bs: BlockDriverState,
  res: BdrvCheckResult,
  l2_offset: number,
  l2_table: Uint8Array,
  l2_index: number,
  active: boolean,
  overlap: { hit: boolean },
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const esz = l2_entry_size(s);
  const dv = new DataView(l2_table.buffer, l2_table.byteOffset, l2_table.byteLength);
  if (has_subclusters(s)) {
    let bitmap = get_l2_bitmap(s, dv, l2_index);
    bitmap |= bitmap << 32n;
    bitmap &= QCOW_L2_BITMAP_ALL_ZEROES;
    dv.setBigUint64(l2_index * esz + 8, bitmap);
    dv.setBigUint64(l2_index * esz, 0n);
  } else {
    dv.setBigUint64(l2_index * esz, QCOW_OFLAG_ZERO);
  }
  const l2e_offset = l2_offset + l2_index * esz;
  let ret = yield* qcow2_pre_write_overlap_check(bs, active ? QCOW2_OL_ACTIVE_L2 : QCOW2_OL_INACTIVE_L2, l2e_offset, esz, false);
  overlap.hit = ret < 0;
  if (ret < 0) {
    stderr_print('ERROR: Overlap check failed\n');
    res.check_errors++;
    return ret;
  }
  ret = yield* bdrv_co_pwrite_sync(bs.file!, l2e_offset, esz, l2_table.subarray(l2_index * esz, (l2_index + 1) * esz), 0);
  if (ret < 0) {
    stderr_print(`ERROR: Failed to overwrite L2 table entry: ${strerror(-ret)}\n`);
    res.check_errors++;
    return ret;
  }
  res.corruptions--;
  res.corruptions_fixed++;
  return 0;
}

function* check_refcounts_l2(
  bs: BlockDriverState,
  res: BdrvCheckResult,
  imrt: Qcow2Imrt,
  l2_offset: number,
  flags: number,
  fix: number,
  active: boolean,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const bytes = s.l2_size * l2_entry_size(s);
  const l2_table = new Uint8Array(bytes);
  let ret = yield* bdrv_co_pread(bs.file!, l2_offset, bytes, l2_table, 0);
  if (ret < 0) {
    stderr_print('ERROR: I/O error in check_refcounts_l2\n');
    res.check_errors++;
    return ret;
  }
  const dv = new DataView(l2_table.buffer);
  let next_contiguous_offset = 0;

  for (let i = 0; i < s.l2_size; i++) {
    let l2_entry = get_l2_entry(s, dv, i);
    const l2_bitmap = get_l2_bitmap(s, dv, i);
    if (l2_entry === 0n && l2_bitmap === 0n) continue;
    const type = qcow2_get_cluster_type(s, l2_entry);

    if (type !== QCow2ClusterType.COMPRESSED && l2_entry & L2E_STD_RESERVED_MASK) {
      stderr_print(`ERROR found l2 entry with reserved bits set: ${hex(l2_entry)}\n`);
      res.corruptions++;
    }

    switch (type) {
      case QCow2ClusterType.COMPRESSED: {
        if (l2_entry & QCOW_OFLAG_COPIED) {
          stderr_print(`ERROR: coffset=0x${hex(l2_entry & s.cluster_offset_mask)}: copied flag must never be set for compressed clusters\n`);
          l2_entry &= ~QCOW_OFLAG_COPIED;
          res.corruptions++;
        }
        if (l2_bitmap) {
          stderr_print(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex(l2_entry)}\n`);
          res.corruptions++;
          break;
        }
        const { coffset, csize } = qcow2_parse_compressed_l2_entry(s, l2_entry);
        ret = qcow2_inc_refcounts_imrt(bs, res, imrt, coffset, csize);
        if (ret < 0) return ret;
        if (flags & CHECK_FRAG_INFO) {
          res.bfi.allocated_clusters++;
          res.bfi.compressed_clusters++;
          // Compressed clusters count as fragmented: neighbours share sectors.
          res.bfi.fragmented_clusters++;
        }
        break;
      }
      case QCow2ClusterType.ZERO_ALLOC:
      case QCow2ClusterType.NORMAL: {
        const offset = Number(l2_entry & L2E_OFFSET_MASK);
        if ((l2_bitmap >> 32n) & l2_bitmap) {
          res.corruptions++;
          stderr_print(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap\n`);
        }
        if (offset % s.cluster_size) {
          res.corruptions++;
          const contains_data = has_subclusters(s) ? (l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC) !== 0n : !(l2_entry & QCOW_OFLAG_ZERO);
          if (!contains_data) {
            stderr_print(`${fix & BDRV_FIX_ERRORS ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.\n`);
            if (fix & BDRV_FIX_ERRORS) {
              const ov = { hit: false };
              ret = yield* fix_l2_entry_by_zero(bs, res, l2_offset, l2_table, i, active, ov);
              if (ov.hit) return ret;
              if (ret === 0) continue;
            }
          } else {
            stderr_print(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.\n`);
          }
        }
        if (flags & CHECK_FRAG_INFO) {
          res.bfi.allocated_clusters++;
          if (next_contiguous_offset && offset !== next_contiguous_offset) res.bfi.fragmented_clusters++;
          next_contiguous_offset = offset + s.cluster_size;
        }
        ret = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, s.cluster_size);
        if (ret < 0) return ret;
        break;
      }
      case QCow2ClusterType.ZERO_PLAIN:
        break;
      case QCow2ClusterType.UNALLOCATED:
        if (l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC) {
          res.corruptions++;
          stderr_print('ERROR: Unallocated cluster has non-zero subcluster allocation map\n');
        }
        break;
    }
  }
  return 0;
}

function* check_refcounts_l1(
  bs: BlockDriverState,
  res: BdrvCheckResult,
  imrt: Qcow2Imrt,
  l1_table_offset: number,
  l1_size: number,
  flags: number,
  fix: number,
  active: boolean,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (!l1_size) return 0;
  const bytes = l1_size * 8;
  let ret = qcow2_inc_refcounts_imrt(bs, res, imrt, l1_table_offset, bytes);
  if (ret < 0) return ret;

  let l1: Uint8Array;
  try {
    l1 = new Uint8Array(bytes);
  } catch {
    res.check_errors++;
    return -ENOMEM;
  }
  ret = yield* bdrv_co_pread(bs.file!, l1_table_offset, bytes, l1, 0);
  if (ret < 0) {
    stderr_print('ERROR: I/O error in check_refcounts_l1\n');
    res.check_errors++;
    return ret;
  }
  const dv = new DataView(l1.buffer);
  for (let i = 0; i < l1_size; i++) {
    const e = dv.getBigUint64(8 * i);
    if (!e) continue;
    if (e & L1E_RESERVED_MASK) {
      stderr_print(`ERROR found L1 entry with reserved bits set: ${hex(e)}\n`);
      res.corruptions++;
    }
    const l2_offset = Number(e & L1E_OFFSET_MASK);
    ret = qcow2_inc_refcounts_imrt(bs, res, imrt, l2_offset, s.cluster_size);
    if (ret < 0) return ret;
    if (l2_offset % s.cluster_size) {
      stderr_print(`ERROR l2_offset=${hex(l2_offset)}: Table is not cluster aligned; L1 entry corrupted\n`);
      res.corruptions++;
    }
    ret = yield* check_refcounts_l2(bs, res, imrt, l2_offset, flags, fix, active);
    if (ret < 0) return ret;
  }
  return 0;
}

/** L1/L2 COPIED flags must be set exactly when the refcount is 1; repairs them when allowed. */
function* check_oflag_copied(bs: BlockDriverState, res: BdrvCheckResult, fix: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const bytes = s.l2_size * l2_entry_size(s);
  const l2_table = new Uint8Array(bytes);
  const dv = new DataView(l2_table.buffer);
  const out = { refcount: 0 };
  let repair: boolean;
  if (fix & BDRV_FIX_ERRORS) repair = true;
  else if (fix & BDRV_FIX_LEAKS) repair = !res.check_errors && !res.corruptions && !res.leaks;
  else repair = false;

  for (let i = 0; i < s.l1_size; i++) {
    const l1_entry = s.l1_table[i];
    const l2_offset = Number(l1_entry & L1E_OFFSET_MASK);
    if (!l2_offset) continue;

    let ret = yield* qcow2_get_refcount(bs, Math.floor(l2_offset / s.cluster_size), out);
    if (ret < 0) continue;
    if ((out.refcount === 1) !== ((l1_entry & QCOW_OFLAG_COPIED) !== 0n)) {
      res.corruptions++;
      stderr_print(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(l1_entry)} refcount=${out.refcount}\n`);
      if (repair) {
        s.l1_table[i] = out.refcount === 1 ? l1_entry | QCOW_OFLAG_COPIED : l1_entry & ~QCOW_OFLAG_COPIED;
        ret = yield* qcow2_write_l1_entry(bs, i);
        if (ret < 0) {
          res.check_errors++;
          return ret;
        }
        res.corruptions--;
        res.corruptions_fixed++;
      }
    }

    ret = yield* bdrv_co_pread(bs.file!, l2_offset, bytes, l2_table, 0);
    if (ret < 0) {
      stderr_print(`ERROR: Could not read L2 table: ${strerror(-ret)}\n`);
      res.check_errors++;
      return ret;
    }
    let l2_dirty = 0;
    for (let j = 0; j < s.l2_size; j++) {
      const l2_entry = get_l2_entry(s, dv, j);
      const type = qcow2_get_cluster_type(s, l2_entry);
      if (type !== QCow2ClusterType.NORMAL && type !== QCow2ClusterType.ZERO_ALLOC) continue;
      const data_offset = Number(l2_entry & L2E_OFFSET_MASK);
      ret = yield* qcow2_get_refcount(bs, Math.floor(data_offset / s.cluster_size), out);
      if (ret < 0) continue;
      if ((out.refcount === 1) !== ((l2_entry & QCOW_OFLAG_COPIED) !== 0n)) {
        res.corruptions++;
        stderr_print(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex(l2_entry)} refcount=${out.refcount}\n`);
        if (repair) {
          dv.setBigUint64(j * l2_entry_size(s), out.refcount === 1 ? l2_entry | QCOW_OFLAG_COPIED : l2_entry & ~QCOW_OFLAG_COPIED);
          l2_dirty++;
        }
      }
    }
    if (l2_dirty > 0) {
      ret = yield* qcow2_pre_write_overlap_check(bs, QCOW2_OL_ACTIVE_L2, l2_offset, s.cluster_size, false);
      if (ret < 0) {
        stderr_print(`ERROR: Could not write L2 table; metadata overlap check failed: ${strerror(-ret)}\n`);
        res.check_errors++;
        return ret;
      }
      ret = yield* bdrv_co_pwrite(bs.file!, l2_offset, s.cluster_size, l2_table, 0);
      if (ret < 0) {
        stderr_print(`ERROR: Could not write L2 table: ${strerror(-ret)}\n`);
        res.check_errors++;
        return ret;
      }
      // The L2 cache may hold the old slice: drop it so nobody writes stale flags back.
      discard_l2_slices(s, l2_offset);
      res.corruptions -= l2_dirty;
      res.corruptions_fixed += l2_dirty;
    }
  }
  return 0;
}

function* check_refblocks(bs: BlockDriverState, res: BdrvCheckResult, fix: number, rebuild: { v: boolean }, imrt: Qcow2Imrt): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  for (let i = 0; i < s.refcount_table_size; i++) {
    const entry = s.refcount_table[i];
    const offset = reft_offset(entry);
    const cluster = Math.floor(offset / s.cluster_size);

    if (entry % 512) {
      stderr_print(`ERROR refcount table entry ${i} has reserved bits set\n`);
      res.corruptions++;
      rebuild.v = true;
      continue;
    }
    if (offset % s.cluster_size) {
      stderr_print(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted\n`);
      res.corruptions++;
      rebuild.v = true;
      continue;
    }
    if (cluster >= imrt.nb_clusters) {
      res.corruptions++;
      stderr_print(`${fix & BDRV_FIX_ERRORS ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image\n`);
      if (fix & BDRV_FIX_ERRORS) {
        let ret = yield* bdrv_co_truncate(bs.file!, offset + s.cluster_size, false, 'off', 0);
        let size = -1;
        if (ret >= 0) {
          size = bdrv_getlength(bs.file!.bs);
          if (size < 0) ret = size;
        }
        if (ret >= 0) {
          imrt.file_len = size;
          const new_nb_clusters = Math.ceil(size / s.cluster_size);
          const r = realloc_refcount_array(s, imrt, new_nb_clusters);
          if (r < 0) {
            res.check_errors++;
            return r;
          }
          if (cluster >= imrt.nb_clusters) ret = -EINVAL;
        }
        if (ret >= 0) {
          res.corruptions--;
          res.corruptions_fixed++;
          const r = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, s.cluster_size);
          if (r < 0) return r;
          continue;
        }
        rebuild.v = true;
        stderr_print(`ERROR could not resize image: ${strerror(-ret)}\n`);
      }
      continue;
    }
    if (offset !== 0) {
      const r = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, s.cluster_size);
      if (r < 0) return r;
      const rc = s.get_refcount(imrt.table, cluster);
      if (rc !== 1) {
        stderr_print(`ERROR refcount block ${i} refcount=${rc}\n`);
        res.corruptions++;
        rebuild.v = true;
      }
    }
  }
  return 0;
}

function* calculate_refcounts(bs: BlockDriverState, res: BdrvCheckResult, fix: number, rebuild: { v: boolean }, imrt: Qcow2Imrt): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  // The file may have grown since the last pass (rebuilt refcount structures are appended).
  const file_len = bdrv_getlength(bs.file!.bs);
  if (file_len < 0) {
    res.check_errors++;
    return file_len;
  }
  imrt.file_len = file_len;
  // header
  let ret = qcow2_inc_refcounts_imrt(bs, res, imrt, 0, s.cluster_size);
  if (ret < 0) return ret;
  // active L1
  ret = yield* check_refcounts_l1(bs, res, imrt, s.l1_table_offset, s.l1_size, CHECK_FRAG_INFO, fix, true);
  if (ret < 0) return ret;
  // snapshots
  for (const sn of s.snapshots ?? []) {
    if (sn.l1_table_offset % s.cluster_size) {
      stderr_print(
        `ERROR snapshot ${sn.id_str} (${sn.name}) l1_offset=0x${hex(sn.l1_table_offset)}: L1 table is not cluster aligned; snapshot table entry corrupted\n`,
      );
      res.corruptions++;
      continue;
    }
    if (sn.l1_size > QCOW_MAX_L1_SIZE / 8) {
      stderr_print(`ERROR snapshot ${sn.id_str} (${sn.name}) l1_size=0x${hex(sn.l1_size)}: L1 table is too large; snapshot table entry corrupted\n`);
      res.corruptions++;
      continue;
    }
    ret = yield* check_refcounts_l1(bs, res, imrt, sn.l1_table_offset, sn.l1_size, 0, fix, false);
    if (ret < 0) return ret;
  }
  ret = qcow2_inc_refcounts_imrt(bs, res, imrt, s.snapshots_offset, s.snapshots_size);
  if (ret < 0) return ret;
  // refcount table
  ret = qcow2_inc_refcounts_imrt(bs, res, imrt, s.refcount_table_offset, s.refcount_table_size * REFTABLE_ENTRY_SIZE);
  if (ret < 0) return ret;
  // bitmaps
  ret = yield* qcow2_check_bitmaps_refcounts(bs, res, imrt);
  if (ret < 0) return ret;
  return yield* check_refblocks(bs, res, fix, rebuild, imrt);
}

function* compare_refcounts(
  bs: BlockDriverState,
  res: BdrvCheckResult,
  fix: number,
  rebuild: { v: boolean },
  highest: { v: number },
  imrt: Qcow2Imrt,
): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  const out = { refcount: 0 };
  highest.v = 0;
  for (let i = 0; i < imrt.nb_clusters; i++) {
    const ret = yield* qcow2_get_refcount(bs, i, out);
    if (ret < 0) {
      stderr_print(`Can't get refcount for cluster ${i}: ${strerror(-ret)}\n`);
      res.check_errors++;
      continue;
    }
    const refcount1 = out.refcount;
    const refcount2 = s.get_refcount(imrt.table, i);
    if (refcount1 > 0 || refcount2 > 0) highest.v = i;
    if (refcount1 === refcount2) continue;

    let num_fixed: 'leaks_fixed' | 'corruptions_fixed' | null = null;
    if (refcount1 === 0) rebuild.v = true;
    else if (refcount1 > refcount2 && fix & BDRV_FIX_LEAKS) num_fixed = 'leaks_fixed';
    else if (refcount1 < refcount2 && fix & BDRV_FIX_ERRORS) num_fixed = 'corruptions_fixed';

    stderr_print(
      `${num_fixed !== null ? 'Repairing' : refcount1 < refcount2 ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${refcount1} reference=${refcount2}\n`,
    );
    if (num_fixed) {
      const r = yield* update_refcount(
        bs,
        i * s.cluster_size,
        1,
        Math.abs(refcount1 - refcount2),
        refcount1 > refcount2,
        QCOW2_DISCARD_ALWAYS,
      );
      if (r >= 0) {
        res[num_fixed]++;
        continue;
      }
    }
    if (refcount1 < refcount2) res.corruptions++;
    else res.leaks++;
  }
}

function alloc_clusters_imrt(bs: BlockDriverState, cluster_count: number, imrt: Qcow2Imrt, first_free: { v: number }): number {
  const s = bs.opaque as BDRVQcow2State;
  let cluster = first_free.v;
  let first_gap = true;
  let contiguous = 0;
  for (; cluster < imrt.nb_clusters && contiguous < cluster_count; cluster++) {
    if (!s.get_refcount(imrt.table, cluster)) {
      contiguous++;
      if (first_gap) {
        first_free.v = cluster;
        first_gap = false;
      }
    } else if (contiguous) {
      contiguous = 0;
    }
  }
  if (contiguous < cluster_count) {
    const ret = realloc_refcount_array(s, imrt, cluster + cluster_count - contiguous);
    if (ret < 0) return ret;
  }
  cluster -= contiguous;
  for (let i = 0; i < cluster_count; i++) s.set_refcount(imrt.table, cluster + i, 1);
  return cluster * s.cluster_size;
}

/** Writes refblocks for the allocated clusters in [first_cluster, end_cluster); 1 if the reftable grew. */
function* rebuild_refcounts_write_refblocks(
  bs: BlockDriverState,
  imrt: Qcow2Imrt,
  first_cluster: number,
  end_cluster: number,
  rt: { table: Float64Array; entries: number },
  err: { msg: string },
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const first_free = { v: 0 };
  let grown = false;
  for (let cluster = first_cluster; cluster < end_cluster; cluster++) {
    if (!s.get_refcount(imrt.table, cluster)) continue;
    const refblock_index = Math.floor(cluster / s.refcount_block_size);
    const refblock_start = refblock_index * s.refcount_block_size;
    let refblock_offset: number;
    if (rt.entries > refblock_index && rt.table[refblock_index]) {
      refblock_offset = rt.table[refblock_index];
    } else {
      if (first_free.v < refblock_start) first_free.v = refblock_start;
      refblock_offset = alloc_clusters_imrt(bs, 1, imrt, first_free);
      if (refblock_offset < 0) {
        err.msg = `ERROR allocating refblock: ${strerror(-refblock_offset)}`;
        return refblock_offset;
      }
      const rci = refblock_offset / s.cluster_size;
      if (rci >= end_cluster) end_cluster = rci + 1;
      if (rt.entries <= refblock_index) {
        const per = s.cluster_size / REFTABLE_ENTRY_SIZE;
        const entries = Math.ceil((refblock_index + 1) / per) * per;
        const t = new Float64Array(entries);
        t.set(rt.table.subarray(0, rt.entries));
        rt.table = t;
        rt.entries = entries;
        grown = true;
      }
      rt.table[refblock_index] = refblock_offset;
    }

    let ret = yield* qcow2_pre_write_overlap_check(bs, 0, refblock_offset, s.cluster_size, false);
    if (ret < 0) {
      err.msg = `ERROR writing refblock: ${strerror(-ret)}`;
      return ret;
    }
    // A refblock is simply a slice of the in-memory array (its size is whole clusters).
    const slice = imrt.table.subarray(refblock_index * s.cluster_size, (refblock_index + 1) * s.cluster_size);
    ret = yield* bdrv_co_pwrite(bs.file!, refblock_offset, s.cluster_size, slice, 0);
    if (ret < 0) {
      err.msg = `ERROR writing refblock: ${strerror(-ret)}`;
      return ret;
    }
    cluster = refblock_start + s.refcount_block_size - 1;
  }
  return grown ? 1 : 0;
}

/** Replaces the refcount structure by one built from the in-memory refcounts (the old one leaks). */
function* rebuild_refcount_structure(bs: BlockDriverState, res: BdrvCheckResult, imrt: Qcow2Imrt, err: { msg: string }): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const rt = { table: new Float64Array(0), entries: 0 };
  let reftable_offset = -1;
  let reftable_clusters = 0;

  yield* qcow2_cache_empty(bs, s.refcount_block_cache);

  let changed = yield* rebuild_refcounts_write_refblocks(bs, imrt, 0, imrt.nb_clusters, rt, err);
  if (changed < 0) {
    res.check_errors++;
    return changed;
  }
  do {
    const first_free = { v: 0 };
    reftable_clusters = Math.ceil((rt.entries * REFTABLE_ENTRY_SIZE) / s.cluster_size);
    reftable_offset = alloc_clusters_imrt(bs, reftable_clusters, imrt, first_free);
    if (reftable_offset < 0) {
      err.msg = `ERROR allocating reftable: ${strerror(-reftable_offset)}`;
      res.check_errors++;
      return reftable_offset;
    }
    const start = reftable_offset / s.cluster_size;
    changed = yield* rebuild_refcounts_write_refblocks(bs, imrt, start, start + reftable_clusters, rt, err);
    if (changed < 0) {
      res.check_errors++;
      return changed;
    }
  } while (changed);

  const reftable_length = rt.entries * REFTABLE_ENTRY_SIZE;
  const buf = new Uint8Array(reftable_length);
  for (let i = 0; i < rt.entries; i++) if (rt.table[i]) put_be64(buf, 8 * i, rt.table[i]);
  let ret = yield* qcow2_pre_write_overlap_check(bs, 0, reftable_offset, reftable_length, false);
  if (ret < 0) {
    err.msg = `ERROR writing reftable: ${strerror(-ret)}`;
    return ret;
  }
  ret = yield* bdrv_co_pwrite(bs.file!, reftable_offset, reftable_length, buf, 0);
  if (ret < 0) {
    err.msg = `ERROR writing reftable: ${strerror(-ret)}`;
    return ret;
  }
  const hdr = new Uint8Array(12);
  put_be64(hdr, 0, reftable_offset);
  new DataView(hdr.buffer).setUint32(8, reftable_clusters);
  ret = yield* bdrv_co_pwrite_sync(bs.file!, 48, 12, hdr, 0);
  if (ret < 0) {
    err.msg = `ERROR setting reftable: ${strerror(-ret)}`;
    return ret;
  }
  s.refcount_table = rt.table;
  s.refcount_table_offset = reftable_offset;
  s.refcount_table_size = rt.entries;
  s.refcount_table_clusters = reftable_clusters;
  update_max_refcount_table_index(s);
  return 0;
}

function copy_result(dst: BdrvCheckResult, src: BdrvCheckResult): void {
  dst.corruptions = src.corruptions;
  dst.leaks = src.leaks;
  dst.check_errors = src.check_errors;
  dst.corruptions_fixed = src.corruptions_fixed;
  dst.leaks_fixed = src.leaks_fixed;
  dst.image_end_offset = src.image_end_offset;
  dst.bfi = { ...src.bfi };
}

/**
 * Checks every refcount against the references found by walking the header, L1/L2 tables,
 * snapshots, refcount structures and bitmaps; with `fix` (BDRV_FIX_LEAKS | BDRV_FIX_ERRORS)
 * repairs leaks, refcount errors and COPIED flags, rebuilding the whole refcount structure when
 * a referenced cluster has refcount 0. QEMU: `qcow2_check_refcounts`. Per-problem lines go to
 * stderr exactly as QEMU prints them. Returns 0 or -errno; the counters are in `res`.
 * Surprise: clusters past the end of the file are not checked for leaks.
 */
export function* qcow2_check_refcounts(bs: BlockDriverState, res: BdrvCheckResult, fix: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const size = bdrv_getlength(bs.file!.bs);
  if (size < 0) {
    res.check_errors++;
    return size;
  }
  const nb_clusters = Math.ceil(size / s.cluster_size);
  if (nb_clusters > 0x7fffffff) {
    res.check_errors++;
    return -EFBIG;
  }
  res.bfi.total_clusters = Math.ceil((bs.total_sectors * 512) / s.cluster_size);

  const imrt: Qcow2Imrt = { table: new Uint8Array(0), nb_clusters: 0, file_len: size };
  let ret = realloc_refcount_array(s, imrt, nb_clusters);
  if (ret < 0) {
    res.check_errors++;
    return ret;
  }
  const rebuild = { v: false };
  const highest = { v: 0 };

  ret = yield* calculate_refcounts(bs, res, fix, rebuild, imrt);
  if (ret < 0) return ret;

  // When something is to be fixed without a rebuild, the comparison runs again with `fix`.
  const pre_compare_res = bdrv_check_result_new();
  copy_result(pre_compare_res, res);
  yield* compare_refcounts(bs, res, 0, rebuild, highest, imrt);

  if (rebuild.v && fix & BDRV_FIX_ERRORS) {
    const old_res = bdrv_check_result_new();
    copy_result(old_res, res);
    let fresh_leaks = 0;
    const err = { msg: '' };

    stderr_print('Rebuilding refcount structure\n');
    ret = yield* rebuild_refcount_structure(bs, res, imrt, err);
    if (ret < 0) {
      error_report_fn(err.msg);
      return ret;
    }
    res.corruptions = 0;
    res.leaks = 0;

    // The reftable changed: count the references again from scratch.
    rebuild.v = false;
    imrt.table.fill(0);
    ret = yield* calculate_refcounts(bs, res, 0, rebuild, imrt);
    if (ret < 0) return ret;

    if (fix & BDRV_FIX_LEAKS) {
      // The old refcount structure is leaked now; fix that and keep only leaks we caused.
      const saved_res = bdrv_check_result_new();
      copy_result(saved_res, res);
      copy_result(res, bdrv_check_result_new());
      yield* compare_refcounts(bs, res, BDRV_FIX_LEAKS, rebuild, highest, imrt);
      if (rebuild.v) stderr_print('ERROR rebuilt refcount structure is still broken\n');
      fresh_leaks = res.leaks;
      copy_result(res, saved_res);
    }
    if (res.corruptions < old_res.corruptions) res.corruptions_fixed += old_res.corruptions - res.corruptions;
    if (res.leaks < old_res.leaks) res.leaks_fixed += old_res.leaks - res.leaks;
    res.leaks += fresh_leaks;
  } else if (fix) {
    if (rebuild.v) {
      stderr_print('ERROR need to rebuild refcount structures\n');
      res.check_errors++;
      return -EIO;
    }
    if (res.leaks || res.corruptions) {
      copy_result(res, pre_compare_res);
      yield* compare_refcounts(bs, res, fix, rebuild, highest, imrt);
    }
  }

  ret = yield* check_oflag_copied(bs, res, fix);
  if (ret < 0) return ret;

  res.image_end_offset = (highest.v + 1) * s.cluster_size;
  return 0;
}

function add_check_result(out: BdrvCheckResult, src: BdrvCheckResult, set_allocation_info: boolean): void {
  out.corruptions += src.corruptions;
  out.leaks += src.leaks;
  out.check_errors += src.check_errors;
  out.corruptions_fixed += src.corruptions_fixed;
  out.leaks_fixed += src.leaks_fixed;
  if (set_allocation_info) {
    out.image_end_offset = src.image_end_offset;
    out.bfi = { ...src.bfi };
  }
}

/**
 * `qcow2_co_check` without taking the lock (the caller holds `s.lock`): snapshot table check,
 * refcount check, snapshot table repair, then, after a repair run that left no corruption, clears
 * the dirty and corrupt bits. QEMU: `qcow2_co_check_locked` (block/qcow2.c).
 */
export function* qcow2_co_check_locked(bs: BlockDriverState, result: BdrvCheckResult, fix: number): CoroutineFn<number> {
  const snapshot_res = bdrv_check_result_new();
  const refcount_res = bdrv_check_result_new();
  copy_result(result, bdrv_check_result_new());

  let ret = yield* qcow2_check_read_snapshot_table(bs, snapshot_res, fix);
  if (ret < 0) {
    add_check_result(result, snapshot_res, false);
    return ret;
  }
  ret = yield* qcow2_check_refcounts(bs, refcount_res, fix);
  add_check_result(result, refcount_res, true);
  if (ret < 0) {
    add_check_result(result, snapshot_res, false);
    return ret;
  }
  ret = yield* qcow2_check_fix_snapshot_table(bs, snapshot_res, fix);
  add_check_result(result, snapshot_res, false);
  if (ret < 0) return ret;

  if (fix && result.check_errors === 0 && result.corruptions === 0) {
    ret = yield* qcow2_mark_clean(bs);
    if (ret < 0) return ret;
    return yield* qcow2_mark_consistent(bs);
  }
  return ret;
}

/**
 * Clears the corrupt bit in the header (after a successful repair). QEMU: `qcow2_mark_consistent`.
 * Returns 0 or -errno.
 */
export function* qcow2_mark_consistent(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (s.incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
    // The repaired metadata must be on disk before the header says the image is consistent.
    const ret = yield* qcow2_flush_caches(bs);
    if (ret < 0) return ret;
    s.incompatible_features &= ~QCOW2_INCOMPAT_CORRUPT;
    return yield* qcow2_update_header(bs);
  }
  return 0;
}

/**
 * The driver's `bdrv_co_check`: `qcow2_co_check_locked` under `s.lock`. QEMU: `qcow2_co_check`.
 * With `fix`, a dirty (lazy refcounts) image comes out clean and a corrupt one consistent when
 * nothing was left unrepaired.
 */
export function* qcow2_co_check(bs: BlockDriverState, result: BdrvCheckResult, fix: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  yield* qemu_co_mutex_lock(s.lock);
  try {
    return yield* qcow2_co_check_locked(bs, result, fix);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}
