/**
 * qcow2's guest-to-host mapping (QEMU 7.2: block/qcow2-cluster.c): L1/L2 lookups, cluster
 * allocation for writes (COW, in-flight dependencies, linking into L2), L1 growth, discard and
 * zeroing at cluster and subcluster granularity, compressed cluster allocation.
 *
 * Every function here runs with `s.lock` held unless its comment says otherwise; `perform_cow`
 * drops the lock around its data I/O, as QEMU does. L2 slices are the cache's big-endian bytes;
 * `get_l2_entry`/`set_l2_entry` (and the bitmap pair) are the only accessors.
 */
import {
  BDRV_REQUEST_MAX_BYTES,
  BDRV_REQ_MAY_UNMAP,
  BDRV_SECTOR_SIZE,
  CoQueue,
  EAGAIN,
  EFBIG,
  EINVAL,
  EIO,
  ENOMEDIUM,
  ENOTSUP,
  QEMUIOVector,
  bdrv_co_pwritev,
  bdrv_co_pwrite_sync,
  bdrv_co_debug_event,
  qemu_blockalign,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_queue_wait,
  qemu_iovec_add,
  qemu_iovec_concat,
  qemu_iovec_init,
  qemu_iovec_reset,
  qemu_iovec_subvec_niov,
  qemu_vfree,
  type BlockDriverState,
  type CoroutineFn,
} from '../../../src/index.ts';
import {
  INV_OFFSET,
  L1E_OFFSET_MASK,
  L1E_SIZE,
  L2E_OFFSET_MASK,
  L2E_SIZE_EXTENDED,
  QCOW2_COMPRESSED_SECTOR_SIZE,
  QCOW2_DISCARD_ALWAYS,
  QCOW2_DISCARD_NEVER,
  QCOW2_DISCARD_OTHER,
  QCOW2_DISCARD_REQUEST,
  QCOW2_OL_ACTIVE_L1,
  QCOW_L2_BITMAP_ALL_ALLOC,
  QCOW_L2_BITMAP_ALL_ZEROES,
  QCOW_MAX_L1_SIZE,
  QCOW_OFLAG_COMPRESSED,
  QCOW_OFLAG_COPIED,
  QCOW_OFLAG_SUB_ALLOC_RANGE,
  QCOW_OFLAG_SUB_ZERO_RANGE,
  QCOW_OFLAG_ZERO,
  QCow2ClusterType,
  QCow2SubclusterType,
  has_subclusters,
  l2_entry_size,
  l2meta_cow_end,
  l2meta_cow_start,
  offset_into_cluster,
  offset_into_subcluster,
  offset_to_l1_index,
  offset_to_l2_index,
  offset_to_l2_slice_index,
  offset_to_sc_index,
  qcow2_cluster_is_allocated,
  qcow2_get_cluster_type,
  qcow2_get_subcluster_type,
  qcow2_need_accurate_refcounts,
  size_to_clusters,
  size_to_subclusters,
  start_of_cluster,
  type BDRVQcow2State,
  type QCowL2Meta,
  type Qcow2DiscardType,
} from './qcow2-state.ts';
import {
  qcow2_cache_depends_on_flush,
  qcow2_cache_entry_mark_dirty,
  qcow2_cache_flush,
  qcow2_cache_get,
  qcow2_cache_get_empty,
  qcow2_cache_put,
  qcow2_cache_set_dependency,
} from './qcow2-cache.ts';
import {
  qcow2_alloc_bytes,
  qcow2_alloc_clusters,
  qcow2_alloc_clusters_at,
  qcow2_free_any_cluster,
  qcow2_free_clusters,
  qcow2_pre_write_overlap_check,
  qcow2_process_discards,
} from './qcow2-refcount.ts';
import { qcow2_mark_dirty, qcow2_signal_corruption } from './qcow2.ts';

// ---------------------------------------------------------------------------------------------
// L2 entry accessors

/** One DataView per cache table view: the cache hands out the same views, so this is a hit. */
const views = new WeakMap<Uint8Array, DataView>();
function dv(slice: Uint8Array): DataView {
  let v = views.get(slice);
  if (v === undefined) {
    v = new DataView(slice.buffer, slice.byteOffset, slice.byteLength);
    views.set(slice, v);
  }
  return v;
}

/** L2 entry `idx` of `l2_slice` (big-endian in the cache). QEMU: `get_l2_entry`. */
export function get_l2_entry(s: BDRVQcow2State, l2_slice: Uint8Array, idx: number): bigint {
  return dv(l2_slice).getBigUint64(idx * l2_entry_size(s));
}

/** Stores L2 entry `idx`. QEMU: `set_l2_entry`. The caller marks the slice dirty. */
export function set_l2_entry(s: BDRVQcow2State, l2_slice: Uint8Array, idx: number, entry: bigint): void {
  dv(l2_slice).setBigUint64(idx * l2_entry_size(s), entry);
}

/** Subcluster bitmap of entry `idx` (0 without extended L2). QEMU: `get_l2_bitmap`. */
export function get_l2_bitmap(s: BDRVQcow2State, l2_slice: Uint8Array, idx: number): bigint {
  if (!has_subclusters(s)) return 0n;
  return dv(l2_slice).getBigUint64(idx * L2E_SIZE_EXTENDED + 8);
}

/** Stores the subcluster bitmap of entry `idx`. QEMU: `set_l2_bitmap` (extended L2 only). */
export function set_l2_bitmap(s: BDRVQcow2State, l2_slice: Uint8Array, idx: number, bitmap: bigint): void {
  if (!has_subclusters(s)) throw new Error('set_l2_bitmap: image has no subclusters');
  dv(l2_slice).setBigUint64(idx * L2E_SIZE_EXTENDED + 8, bitmap);
}

/**
 * Fast path for standard L2 entries: the entry's high and low 32-bit words, without a bigint.
 * @internal used by the read path.
 */
function l2_words(s: BDRVQcow2State, l2_slice: Uint8Array, idx: number, out: { hi: number; lo: number }): void {
  const v = dv(l2_slice);
  const o = idx * l2_entry_size(s);
  out.hi = v.getUint32(o);
  out.lo = v.getUint32(o + 4);
}

function ctz32(v: number): number {
  v >>>= 0;
  if (v === 0) return 32;
  return 31 - Math.clz32(v & -v);
}
function cto32(v: number): number {
  return ctz32(~v >>> 0);
}

/** C's `%#x`: "0x" prefix except for zero, which prints as "0". */
function hex(n: number | bigint): string {
  return n == 0 ? '0' : '0x' + n.toString(16);
}

// ---------------------------------------------------------------------------------------------
// L1 table

/**
 * Grows the active L1 table to at least `min_size` entries (exactly `min_size` with
 * `exact_size`), writing the new table, then the header's l1_size/l1_table_offset, then freeing
 * the old table. QEMU: `qcow2_grow_l1_table`. Returns 0 or -errno (-EFBIG past QEMU's 32 MiB).
 * Surprise: without `exact_size` the table grows by half again each time, like QEMU.
 */
export function* qcow2_grow_l1_table(bs: BlockDriverState, min_size: number, exact_size: boolean): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (min_size <= s.l1_size) return 0;
  if (min_size > 0x7fffffff / L1E_SIZE) return -EFBIG;
  let new_l1_size: number;
  if (exact_size) {
    new_l1_size = min_size;
  } else {
    new_l1_size = s.l1_size || 1;
    while (min_size > new_l1_size) new_l1_size = Math.ceil((new_l1_size * 3) / 2);
  }
  if (new_l1_size > QCOW_MAX_L1_SIZE / L1E_SIZE) return -EFBIG;

  const new_l1_size2 = L1E_SIZE * new_l1_size;
  const new_l1_table = new BigUint64Array(new_l1_size);
  new_l1_table.set(s.l1_table.subarray(0, s.l1_size));

  yield* bdrv_co_debug_event(bs.file!.bs, 'l1_grow_alloc_table');
  const new_l1_table_offset = yield* qcow2_alloc_clusters(bs, new_l1_size2);
  if (new_l1_table_offset < 0) return new_l1_table_offset;

  let ret = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
  if (ret >= 0) {
    // The L1 position is not updated yet, so these clusters must really be free.
    ret = yield* qcow2_pre_write_overlap_check(bs, 0, new_l1_table_offset, new_l1_size2, false);
  }
  if (ret >= 0) {
    yield* bdrv_co_debug_event(bs.file!.bs, 'l1_grow_write_table');
    const buf = qemu_blockalign(bs.file!.bs, new_l1_size2);
    const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let i = 0; i < new_l1_size; i++) v.setBigUint64(i * 8, new_l1_table[i]);
    ret = yield* bdrv_co_pwrite_sync(bs.file!, new_l1_table_offset, new_l1_size2, buf, 0);
    qemu_vfree(buf);
  }
  if (ret >= 0) {
    yield* bdrv_co_debug_event(bs.file!.bs, 'l1_grow_activate_table');
    const data = new Uint8Array(12);
    const v = new DataView(data.buffer);
    v.setUint32(0, new_l1_size);
    v.setBigUint64(4, BigInt(new_l1_table_offset));
    ret = yield* bdrv_co_pwrite_sync(bs.file!, 36, 12, data, 0); // offsetof(QCowHeader, l1_size)
  }
  if (ret < 0) {
    yield* qcow2_free_clusters(bs, new_l1_table_offset, new_l1_size2, QCOW2_DISCARD_OTHER);
    return ret;
  }
  const old_l1_table_offset = s.l1_table_offset;
  const old_l1_size = s.l1_size;
  s.l1_table_offset = new_l1_table_offset;
  s.l1_table = new_l1_table;
  s.l1_size = new_l1_size;
  yield* qcow2_free_clusters(bs, old_l1_table_offset, old_l1_size * L1E_SIZE, QCOW2_DISCARD_OTHER);
  return 0;
}

/**
 * Writes the L1 entry `l1_index` to disk with its neighbours, as many as fill the file's request
 * alignment (at least one entry; QEMU avoids a read-modify-write). QEMU: `qcow2_write_l1_entry`.
 * Synchronous to disk (pwrite + flush). 0 or -errno.
 */
export function* qcow2_write_l1_entry(bs: BlockDriverState, l1_index: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const bufsize = Math.max(L1E_SIZE, Math.min(bs.file!.bs.bl.request_alignment, s.cluster_size));
  const nentries = bufsize / L1E_SIZE;
  const buf = new Uint8Array(bufsize);
  const v = new DataView(buf.buffer);
  const l1_start_index = l1_index - (l1_index % nentries);
  for (let i = 0; i < Math.min(nentries, s.l1_size - l1_start_index); i++) v.setBigUint64(i * 8, s.l1_table[l1_start_index + i]);
  const off = s.l1_table_offset + L1E_SIZE * l1_start_index;
  const ret = yield* qcow2_pre_write_overlap_check(bs, QCOW2_OL_ACTIVE_L1, off, bufsize, false);
  if (ret < 0) return ret;
  yield* bdrv_co_debug_event(bs.file!.bs, 'l1_update');
  return yield* bdrv_co_pwrite_sync(bs.file!, off, bufsize, buf, 0);
}

// ---------------------------------------------------------------------------------------------
// L2 tables

/** Out-object of the L2 slice lookups. */
interface SliceOut {
  table: Uint8Array | null;
}

/** Loads the slice of the L2 table at `l2_offset` that maps guest `offset`. QEMU: `l2_load`. */
function* l2_load(bs: BlockDriverState, offset: number, l2_offset: number, out: SliceOut): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const start_of_slice = l2_entry_size(s) * (offset_to_l2_index(s, offset) - offset_to_l2_slice_index(s, offset));
  return yield* qcow2_cache_get(bs, s.l2_table_cache, l2_offset + start_of_slice, out);
}

/**
 * Allocates a new L2 table for L1 entry `l1_index` (a copy of the old one if there was one, else
 * zeroes), writes it, then points the L1 entry at it with COPIED. QEMU: `l2_allocate`. The
 * refcount cache is flushed before the table is written, and the table before the L1 entry.
 */
function* l2_allocate(bs: BlockDriverState, l1_index: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const old_l2_offset = s.l1_table[l1_index];
  const l2_bytes = s.l2_size * l2_entry_size(s);
  const l2_offset = yield* qcow2_alloc_clusters(bs, l2_bytes);
  if (l2_offset < 0) return l2_offset;
  let ret: number;
  function* fail(r: number): CoroutineFn<number> {
    s.l1_table[l1_index] = old_l2_offset;
    yield* qcow2_free_clusters(bs, l2_offset, l2_bytes, QCOW2_DISCARD_ALWAYS);
    return r;
  }
  if (l2_offset === 0) {
    qcow2_signal_corruption(bs, true, -1, -1, 'Preventing invalid allocation of L2 table at offset 0');
    return yield* fail(-EIO);
  }
  ret = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
  if (ret < 0) return yield* fail(ret);

  const slice_size2 = s.l2_slice_size * l2_entry_size(s);
  const n_slices = s.cluster_size / slice_size2;
  const out: SliceOut = { table: null };
  const old_out: SliceOut = { table: null };
  for (let slice = 0; slice < n_slices; slice++) {
    ret = yield* qcow2_cache_get_empty(bs, s.l2_table_cache, l2_offset + slice * slice_size2, out);
    if (ret < 0) return yield* fail(ret);
    const l2_slice = out.table!;
    if ((old_l2_offset & L1E_OFFSET_MASK) === 0n) {
      l2_slice.fill(0);
    } else {
      yield* bdrv_co_debug_event(bs.file!.bs, 'l2_alloc_cow_read');
      ret = yield* qcow2_cache_get(bs, s.l2_table_cache, Number(old_l2_offset & L1E_OFFSET_MASK) + slice * slice_size2, old_out);
      if (ret < 0) {
        qcow2_cache_put(s.l2_table_cache, l2_slice);
        return yield* fail(ret);
      }
      l2_slice.set(old_out.table!.subarray(0, slice_size2));
      qcow2_cache_put(s.l2_table_cache, old_out.table!);
    }
    yield* bdrv_co_debug_event(bs.file!.bs, 'l2_alloc_write');
    qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_slice);
    qcow2_cache_put(s.l2_table_cache, l2_slice);
  }
  ret = yield* qcow2_cache_flush(bs, s.l2_table_cache);
  if (ret < 0) return yield* fail(ret);

  s.l1_table[l1_index] = BigInt(l2_offset) | QCOW_OFLAG_COPIED;
  ret = yield* qcow2_write_l1_entry(bs, l1_index);
  if (ret < 0) return yield* fail(ret);
  return 0;
}

/**
 * Contiguous subclusters of the same type in one L2 entry from `sc_from`, and their type (in
 * `out.type`). QEMU: `qcow2_get_subcluster_range_type`. -EINVAL for an invalid entry.
 */
export function qcow2_get_subcluster_range_type(
  s: BDRVQcow2State,
  l2_entry: bigint,
  l2_bitmap: bigint,
  sc_from: number,
  out: { type: QCow2SubclusterType },
): number {
  const type = (out.type = qcow2_get_subcluster_type(s, l2_entry, l2_bitmap, sc_from));
  if (type === QCow2SubclusterType.INVALID) return -EINVAL;
  if (!has_subclusters(s) || type === QCow2SubclusterType.COMPRESSED) return s.subclusters_per_cluster - sc_from;
  const lo = Number(l2_bitmap & 0xffffffffn);
  const hi = Number(l2_bitmap >> 32n);
  const below = sc_from >= 32 ? 0xffffffff : ((1 << sc_from) - 1) >>> 0;
  switch (type) {
    case QCow2SubclusterType.NORMAL:
      return cto32((lo | below) >>> 0) - sc_from;
    case QCow2SubclusterType.ZERO_PLAIN:
    case QCow2SubclusterType.ZERO_ALLOC:
      return cto32((hi | below) >>> 0) - sc_from;
    default: // UNALLOCATED_*
      return ctz32((hi | lo) & ~below) - sc_from;
  }
}

/**
 * Subclusters of exactly the same type from cluster `l2_index.v`, subcluster `sc_index`, in up
 * to `nb_clusters` clusters of `l2_slice`; allocated ones must be contiguous on the host.
 * QEMU: `count_contiguous_subclusters`. On an invalid entry returns -EIO with `l2_index.v`
 * pointing at it.
 */
function count_contiguous_subclusters(
  s: BDRVQcow2State,
  nb_clusters: number,
  sc_index: number,
  l2_slice: Uint8Array,
  l2_index: { v: number },
): number {
  let count = 0;
  let check_offset = false;
  let expected_offset = 0n;
  let expected_type = QCow2SubclusterType.NORMAL;
  const t = { type: QCow2SubclusterType.NORMAL };
  for (let i = 0; i < nb_clusters; i++) {
    const first_sc = i === 0 ? sc_index : 0;
    const l2_entry = get_l2_entry(s, l2_slice, l2_index.v + i);
    const l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index.v + i);
    const ret = qcow2_get_subcluster_range_type(s, l2_entry, l2_bitmap, first_sc, t);
    if (ret < 0) {
      l2_index.v += i;
      return -EIO;
    }
    const type = t.type;
    if (i === 0) {
      if (type === QCow2SubclusterType.COMPRESSED) return ret;
      expected_type = type;
      expected_offset = l2_entry & L2E_OFFSET_MASK;
      check_offset =
        type === QCow2SubclusterType.NORMAL || type === QCow2SubclusterType.ZERO_ALLOC || type === QCow2SubclusterType.UNALLOCATED_ALLOC;
    } else if (type !== expected_type) {
      break;
    } else if (check_offset) {
      expected_offset += BigInt(s.cluster_size);
      if (expected_offset !== (l2_entry & L2E_OFFSET_MASK)) break;
    }
    count += ret;
    if (first_sc + ret < s.subclusters_per_cluster) break;
  }
  return count;
}

/** Out-object of `qcow2_get_host_offset`. */
export interface Qcow2HostOffsetOut {
  /** In: bytes wanted; out: bytes from `offset` with the same type (and contiguous on the host). */
  bytes: number;
  /** Host offset of `offset` (0 if unallocated; the whole L2 entry's offset+size bits if compressed). */
  host_offset: number;
  /** For compressed clusters: the raw L2 entry (offset and size fields). */
  l2_entry: bigint;
  type: QCow2SubclusterType;
}

const words = { hi: 0, lo: 0 };

/**
 * Maps guest `offset` to the image file: the subcluster type, the host offset, and how many
 * bytes from `offset` (at most `out.bytes`) share them, never past the L2 slice. QEMU:
 * `qcow2_get_host_offset`. Compressed clusters come back one at a time with their descriptor in
 * `out.l2_entry`. Metadata inconsistencies mark the image corrupt and return -EIO.
 */
export function* qcow2_get_host_offset(bs: BlockDriverState, offset: number, out: Qcow2HostOffsetOut): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const offset_in_cluster = offset_into_cluster(s, offset);
  let bytes_needed = out.bytes + offset_in_cluster;
  // Bytes between the start of this cluster and the end of its L2 slice.
  let bytes_available = (s.l2_slice_size - offset_to_l2_slice_index(s, offset)) * s.cluster_size;
  if (bytes_needed > bytes_available) bytes_needed = bytes_available;
  out.host_offset = 0;
  out.l2_entry = 0n;
  let type: QCow2SubclusterType;

  const l1_index = offset_to_l1_index(s, offset);
  const l1e = l1_index < s.l1_size ? s.l1_table[l1_index] : 0n;
  const l2_offset = Number(l1e & L1E_OFFSET_MASK);
  if (!l2_offset) {
    type = QCow2SubclusterType.UNALLOCATED_PLAIN;
  } else {
    if (offset_into_cluster(s, l2_offset)) {
      qcow2_signal_corruption(bs, true, -1, -1, `L2 table offset ${hex(l2_offset)} unaligned (L1 index: ${hex(l1_index)})`);
      return -EIO;
    }
    const sl: SliceOut = { table: null };
    let ret = yield* l2_load(bs, offset, l2_offset, sl);
    if (ret < 0) return ret;
    const l2_slice = sl.table!;
    const l2_index = offset_to_l2_slice_index(s, offset);
    const sc_index = offset_to_sc_index(s, offset);
    const nb_clusters = size_to_clusters(s, bytes_needed);

    // Fast path: a standard NORMAL cluster run (the hot path of guest reads).
    if (!has_subclusters(s)) {
      l2_words(s, l2_slice, l2_index, words);
      const hi = words.hi;
      const lo = words.lo;
      // NORMAL: not compressed, no zero flag, offset != 0, no reserved bits.
      if ((hi & 0x40000000) === 0 && (lo & 0x1ff) === 0 && ((hi & 0x00ffffff) !== 0 || lo !== 0) && (hi & 0x3f000000) === 0) {
        const host_cluster = (hi & 0x00ffffff) * 0x100000000 + lo;
        if (host_cluster % s.cluster_size === 0) {
          let n = 1;
          let expect = host_cluster + s.cluster_size;
          while (n < nb_clusters) {
            l2_words(s, l2_slice, l2_index + n, words);
            if ((words.hi & 0x7f000000) !== 0 || (words.lo & 0x1ff) !== 0) break;
            if ((words.hi & 0x00ffffff) * 0x100000000 + words.lo !== expect) break;
            expect += s.cluster_size;
            n++;
          }
          qcow2_cache_put(s.l2_table_cache, l2_slice);
          out.host_offset = host_cluster + offset_in_cluster;
          bytes_available = n * s.cluster_size;
          if (bytes_available > bytes_needed) bytes_available = bytes_needed;
          out.bytes = bytes_available - offset_in_cluster;
          out.type = QCow2SubclusterType.NORMAL;
          return 0;
        }
      }
    }

    const l2_entry = get_l2_entry(s, l2_slice, l2_index);
    const l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index);
    type = qcow2_get_subcluster_type(s, l2_entry, l2_bitmap, sc_index);
    const fail_put = (r: number): number => {
      qcow2_cache_put(s.l2_table_cache, l2_slice);
      return r;
    };
    if (s.qcow_version < 3 && (type === QCow2SubclusterType.ZERO_PLAIN || type === QCow2SubclusterType.ZERO_ALLOC)) {
      qcow2_signal_corruption(
        bs,
        true,
        -1,
        -1,
        `Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2_offset)}, L2 index: ${hex(l2_index)})`,
      );
      return fail_put(-EIO);
    }
    switch (type) {
      case QCow2SubclusterType.COMPRESSED:
        out.l2_entry = l2_entry;
        out.host_offset = Number(l2_entry & s.cluster_offset_mask);
        break;
      case QCow2SubclusterType.ZERO_ALLOC:
      case QCow2SubclusterType.NORMAL:
      case QCow2SubclusterType.UNALLOCATED_ALLOC: {
        const host_cluster_offset = Number(l2_entry & L2E_OFFSET_MASK);
        out.host_offset = host_cluster_offset + offset_in_cluster;
        if (offset_into_cluster(s, host_cluster_offset)) {
          qcow2_signal_corruption(
            bs,
            true,
            -1,
            -1,
            `Cluster allocation offset ${hex(host_cluster_offset)} unaligned (L2 offset: ${hex(l2_offset)}, L2 index: ${hex(l2_index)})`,
          );
          return fail_put(-EIO);
        }
        break;
      }
      default:
        break;
    }
    const idx = { v: l2_index };
    const sc = count_contiguous_subclusters(s, nb_clusters, sc_index, l2_slice, idx);
    if (sc < 0) {
      qcow2_signal_corruption(bs, true, -1, -1, `Invalid cluster entry found  (L2 offset: ${hex(l2_offset)}, L2 index: ${hex(idx.v)})`);
      return fail_put(-EIO);
    }
    qcow2_cache_put(s.l2_table_cache, l2_slice);
    bytes_available = (sc + sc_index) * s.subcluster_size;
    ret = 0;
  }
  if (bytes_available > bytes_needed) bytes_available = bytes_needed;
  out.bytes = bytes_available - offset_in_cluster;
  out.type = type;
  return 0;
}

/**
 * Loads (allocating or COWing the L2 table if needed, growing L1 if needed) the L2 slice that
 * maps guest `offset`; returns it in `out.table` and its index in `out.index`. QEMU:
 * `get_cluster_table`. The caller puts the slice back.
 */
function* get_cluster_table(bs: BlockDriverState, offset: number, out: { table: Uint8Array | null; index: number }): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const l1_index = offset_to_l1_index(s, offset);
  let ret: number;
  if (l1_index >= s.l1_size) {
    ret = yield* qcow2_grow_l1_table(bs, l1_index + 1, false);
    if (ret < 0) return ret;
  }
  let l2_offset = Number(s.l1_table[l1_index] & L1E_OFFSET_MASK);
  if (offset_into_cluster(s, l2_offset)) {
    qcow2_signal_corruption(bs, true, -1, -1, `L2 table offset ${hex(l2_offset)} unaligned (L1 index: ${hex(l1_index)})`);
    return -EIO;
  }
  // COPIED with offset 0 is nonsense (a corrupt L1 entry); a fresh table is the safe reading.
  if (!(s.l1_table[l1_index] & QCOW_OFLAG_COPIED) || l2_offset === 0) {
    ret = yield* l2_allocate(bs, l1_index);
    if (ret < 0) return ret;
    if (l2_offset) yield* qcow2_free_clusters(bs, l2_offset, s.l2_size * l2_entry_size(s), QCOW2_DISCARD_OTHER);
    l2_offset = Number(s.l1_table[l1_index] & L1E_OFFSET_MASK);
  }
  ret = yield* l2_load(bs, offset, l2_offset, out);
  if (ret < 0) return ret;
  out.index = offset_to_l2_slice_index(s, offset);
  return 0;
}

/**
 * Allocates `compressed_size` bytes for the compressed cluster at guest `offset` and links it
 * (no COPIED flag, bitmap 0). QEMU: `qcow2_alloc_compressed_cluster_offset`. Returns the host
 * byte offset, or -errno: -EIO if the cluster is already allocated (compression cannot
 * overwrite).
 */
export function* qcow2_alloc_compressed_cluster_offset(bs: BlockDriverState, offset: number, compressed_size: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const t = { table: null as Uint8Array | null, index: 0 };
  let ret = yield* get_cluster_table(bs, offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  if (get_l2_entry(s, l2_slice, t.index) & L2E_OFFSET_MASK) {
    qcow2_cache_put(s.l2_table_cache, l2_slice);
    return -EIO;
  }
  const cluster_offset = yield* qcow2_alloc_bytes(bs, compressed_size);
  if (cluster_offset < 0) {
    qcow2_cache_put(s.l2_table_cache, l2_slice);
    return cluster_offset;
  }
  const nb_csectors =
    Math.floor((cluster_offset + compressed_size - 1) / QCOW2_COMPRESSED_SECTOR_SIZE) - Math.floor(cluster_offset / QCOW2_COMPRESSED_SECTOR_SIZE);
  const entry = BigInt(cluster_offset) | QCOW_OFLAG_COMPRESSED | (BigInt(nb_csectors) << BigInt(s.csize_shift));
  yield* bdrv_co_debug_event(bs.file!.bs, 'l2_update_compressed');
  qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_slice);
  set_l2_entry(s, l2_slice, t.index, entry);
  if (has_subclusters(s)) set_l2_bitmap(s, l2_slice, t.index, 0n);
  qcow2_cache_put(s.l2_table_cache, l2_slice);
  ret = cluster_offset;
  return ret;
}

// ---------------------------------------------------------------------------------------------
// Copy-on-write

function* do_perform_cow_read(bs: BlockDriverState, src_cluster_offset: number, offset_in_cluster: number, qiov: QEMUIOVector): CoroutineFn<number> {
  if (qiov.size === 0) return 0;
  yield* bdrv_co_debug_event(bs.file!.bs, 'cow_read');
  if (!bs.drv) return -ENOMEDIUM;
  // The driver's own read (not the block layer's) so the request is not tracked twice.
  const ret = yield* bs.drv.bdrv_co_preadv_part!(bs, src_cluster_offset + offset_in_cluster, qiov.size, qiov, 0, 0);
  return ret < 0 ? ret : 0;
}

function* do_perform_cow_write(bs: BlockDriverState, cluster_offset: number, offset_in_cluster: number, qiov: QEMUIOVector): CoroutineFn<number> {
  if (qiov.size === 0) return 0;
  let ret = yield* qcow2_pre_write_overlap_check(bs, 0, cluster_offset + offset_in_cluster, qiov.size, true);
  if (ret < 0) return ret;
  yield* bdrv_co_debug_event(bs.file!.bs, 'cow_write');
  ret = yield* bdrv_co_pwritev(bs.file!, cluster_offset + offset_in_cluster, qiov.size, qiov, 0);
  return ret < 0 ? ret : 0;
}

/**
 * Copies the untouched head and tail of a new allocation from the old data (via the driver's
 * read, so backing files and compressed clusters work) and writes them, merged with the guest
 * data when `m.data_qiov` is set. QEMU: `perform_cow`. Drops `s.lock` around the I/O; on
 * success the L2 cache is made to depend on a flush (the data must be stable before L2 points
 * at it).
 */
function* perform_cow(bs: BlockDriverState, m: QCowL2Meta): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const start = m.cow_start;
  const end = m.cow_end;
  const data_bytes = end.offset - (start.offset + start.nb_bytes);
  if ((start.nb_bytes === 0 && end.nb_bytes === 0) || m.skip_cow) return 0;

  const merge_reads = start.nb_bytes !== 0 && end.nb_bytes !== 0 && data_bytes <= 16384;
  let buffer_size: number;
  const align = bs.bl.opt_mem_alignment || 4096;
  if (merge_reads) {
    buffer_size = start.nb_bytes + data_bytes + end.nb_bytes;
  } else {
    buffer_size = Math.ceil(start.nb_bytes / align) * align + end.nb_bytes;
  }
  const start_buffer = qemu_blockalign(bs, buffer_size);
  const end_buffer = start_buffer.subarray(buffer_size - end.nb_bytes);
  const qiov = new QEMUIOVector();
  qemu_iovec_init(qiov, 2 + (m.data_qiov ? qemu_iovec_subvec_niov(m.data_qiov, m.data_qiov_offset ?? 0, data_bytes) : 0));

  qemu_co_mutex_unlock(s.lock);
  let ret: number;
  try {
    if (merge_reads) {
      qemu_iovec_add(qiov, start_buffer, buffer_size);
      ret = yield* do_perform_cow_read(bs, m.offset, start.offset, qiov);
    } else {
      qemu_iovec_add(qiov, start_buffer, start.nb_bytes);
      ret = yield* do_perform_cow_read(bs, m.offset, start.offset, qiov);
      if (ret >= 0) {
        qemu_iovec_reset(qiov);
        qemu_iovec_add(qiov, end_buffer, end.nb_bytes);
        ret = yield* do_perform_cow_read(bs, m.offset, end.offset, qiov);
      }
    }
    if (ret >= 0) {
      if (m.data_qiov) {
        qemu_iovec_reset(qiov);
        if (start.nb_bytes) qemu_iovec_add(qiov, start_buffer, start.nb_bytes);
        qemu_iovec_concat(qiov, m.data_qiov, m.data_qiov_offset ?? 0, data_bytes);
        if (end.nb_bytes) qemu_iovec_add(qiov, end_buffer, end.nb_bytes);
        // One write carries head COW, guest data and tail COW.
        if (bs.file!.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs.file!.bs, 'write_aio');
        ret = yield* do_perform_cow_write(bs, m.alloc_offset, start.offset, qiov);
      } else {
        qemu_iovec_reset(qiov);
        qemu_iovec_add(qiov, start_buffer, start.nb_bytes);
        ret = yield* do_perform_cow_write(bs, m.alloc_offset, start.offset, qiov);
        if (ret >= 0) {
          qemu_iovec_reset(qiov);
          qemu_iovec_add(qiov, end_buffer, end.nb_bytes);
          ret = yield* do_perform_cow_write(bs, m.alloc_offset, end.offset, qiov);
        }
      }
    }
  } finally {
    yield* qemu_co_mutex_lock(s.lock);
  }
  // L2 may point at the new cluster only after its refcount and COW data are stable.
  if (ret === 0) qcow2_cache_depends_on_flush(s.l2_table_cache);
  qemu_vfree(start_buffer);
  return ret;
}

/**
 * Completes an allocation: COW, then the L2 entries (new offset | COPIED, subcluster bits),
 * then the refcount decrease of clusters that were replaced. QEMU: `qcow2_alloc_cluster_link_l2`.
 * With lazy refcounts the dirty bit is set first; otherwise the L2 cache is made to depend on
 * the refcount cache.
 */
export function* qcow2_alloc_cluster_link_l2(bs: BlockDriverState, m: QCowL2Meta): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const cluster_offset = m.alloc_offset;
  const old_cluster: bigint[] = [];
  let ret = yield* perform_cow(bs, m);
  if (ret < 0) return ret;

  if (s.use_lazy_refcounts) yield* qcow2_mark_dirty(bs);
  if (qcow2_need_accurate_refcounts(s)) {
    ret = yield* qcow2_cache_set_dependency(bs, s.l2_table_cache, s.refcount_block_cache);
    if (ret < 0) return ret;
  }
  const t = { table: null as Uint8Array | null, index: 0 };
  ret = yield* get_cluster_table(bs, m.offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  const l2_index = t.index;
  qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_slice);
  for (let i = 0; i < m.nb_clusters; i++) {
    const offset = cluster_offset + i * s.cluster_size;
    // Two writers may have allocated the same cluster; the later one replaces the earlier
    // (its COW read the earlier's data) and frees it.
    const old = get_l2_entry(s, l2_slice, l2_index + i);
    if (old !== 0n) old_cluster.push(old);
    set_l2_entry(s, l2_slice, l2_index + i, BigInt(offset) | QCOW_OFLAG_COPIED);
    if (has_subclusters(s) && !m.prealloc) {
      let l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index + i);
      let written_from = m.cow_start.offset;
      let written_to = m.cow_end.offset + m.cow_end.nb_bytes;
      written_from = Math.max(written_from, i * s.cluster_size);
      written_to = Math.min(written_to, (i + 1) * s.cluster_size);
      const first_sc = offset_to_sc_index(s, written_from);
      const last_sc = offset_to_sc_index(s, written_to - 1);
      l2_bitmap |= QCOW_OFLAG_SUB_ALLOC_RANGE(first_sc, last_sc + 1);
      l2_bitmap &= ~QCOW_OFLAG_SUB_ZERO_RANGE(first_sc, last_sc + 1);
      set_l2_bitmap(s, l2_slice, l2_index + i, l2_bitmap);
    }
  }
  qcow2_cache_put(s.l2_table_cache, l2_slice);
  // Replaced clusters lose a reference; not discarded (the next write reuses them anyway).
  if (!m.keep_old_clusters) for (const e of old_cluster) yield* qcow2_free_any_cluster(bs, e, QCOW2_DISCARD_NEVER);
  return 0;
}

/** Frees the clusters of an allocation that will not be linked. QEMU: `qcow2_alloc_cluster_abort`. */
export function* qcow2_alloc_cluster_abort(bs: BlockDriverState, m: QCowL2Meta): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  if (!m.keep_old_clusters) yield* qcow2_free_clusters(bs, m.alloc_offset, m.nb_clusters * s.cluster_size, QCOW2_DISCARD_NEVER);
}

/**
 * Records an allocation (or an in-place write to clusters needing L2 changes) as a QCowL2Meta
 * prepended to `mm.m` and registered in `s.cluster_allocs`, with its COW regions. QEMU:
 * `calculate_l2_meta`. Does nothing when an in-place write needs no COW or metadata change.
 */
function calculate_l2_meta(
  bs: BlockDriverState,
  host_cluster_offset: number,
  guest_offset: number,
  bytes: number,
  l2_slice: Uint8Array,
  mm: { m: QCowL2Meta | null },
  keep_old: boolean,
): number {
  const s = bs.opaque as BDRVQcow2State;
  let l2_index = offset_to_l2_slice_index(s, guest_offset);
  const cow_start_to = offset_into_cluster(s, guest_offset);
  const cow_end_from = cow_start_to + bytes;
  const nb_clusters = size_to_clusters(s, cow_end_from);
  let skip_cow = keep_old;
  const t = { type: QCow2SubclusterType.NORMAL };
  let type: QCow2SubclusterType = QCow2SubclusterType.NORMAL;
  for (let i = 0; i < nb_clusters; i++) {
    const l2_entry = get_l2_entry(s, l2_slice, l2_index + i);
    const l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index + i);
    if (skip_cow) {
      const write_from = Math.max(cow_start_to, i * s.cluster_size);
      const write_to = Math.min(cow_end_from, (i + 1) * s.cluster_size);
      const first_sc = offset_to_sc_index(s, write_from);
      const last_sc = offset_to_sc_index(s, write_to - 1);
      const cnt = qcow2_get_subcluster_range_type(s, l2_entry, l2_bitmap, first_sc, t);
      type = t.type;
      if (type !== QCow2SubclusterType.NORMAL || first_sc + cnt <= last_sc) skip_cow = false;
    } else {
      type = qcow2_get_subcluster_type(s, l2_entry, l2_bitmap, 0);
    }
    if (type === QCow2SubclusterType.INVALID) {
      const l1_index = offset_to_l1_index(s, guest_offset);
      const l2_offset = Number(s.l1_table[l1_index] & L1E_OFFSET_MASK);
      qcow2_signal_corruption(bs, true, -1, -1, `Invalid cluster entry found (L2 offset: ${hex(l2_offset)}, L2 index: ${hex(l2_index + i)})`);
      return -EIO;
    }
  }
  if (skip_cow) return 0;

  // Head: where the COW before the guest data starts.
  let l2_entry = get_l2_entry(s, l2_slice, l2_index);
  let l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index);
  let sc_index = offset_to_sc_index(s, guest_offset);
  type = qcow2_get_subcluster_type(s, l2_entry, l2_bitmap, sc_index);
  let cow_start_from: number;
  if (!keep_old) {
    switch (type) {
      case QCow2SubclusterType.COMPRESSED:
        cow_start_from = 0;
        break;
      case QCow2SubclusterType.NORMAL:
      case QCow2SubclusterType.ZERO_ALLOC:
      case QCow2SubclusterType.UNALLOCATED_ALLOC:
        if (has_subclusters(s)) {
          const alloc_bitmap = Number(l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC);
          cow_start_from = Math.min(sc_index, ctz32(alloc_bitmap)) * s.subcluster_size;
        } else {
          cow_start_from = 0;
        }
        break;
      default: // ZERO_PLAIN, UNALLOCATED_PLAIN
        cow_start_from = sc_index * s.subcluster_size;
        break;
    }
  } else {
    cow_start_from = type === QCow2SubclusterType.NORMAL ? cow_start_to : sc_index * s.subcluster_size;
  }

  // Tail: where the COW after the guest data ends.
  l2_index += nb_clusters - 1;
  l2_entry = get_l2_entry(s, l2_slice, l2_index);
  l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index);
  sc_index = offset_to_sc_index(s, guest_offset + bytes - 1);
  type = qcow2_get_subcluster_type(s, l2_entry, l2_bitmap, sc_index);
  const round_up = (n: number, a: number): number => Math.ceil(n / a) * a;
  let cow_end_to: number;
  if (!keep_old) {
    switch (type) {
      case QCow2SubclusterType.COMPRESSED:
        cow_end_to = round_up(cow_end_from, s.cluster_size);
        break;
      case QCow2SubclusterType.NORMAL:
      case QCow2SubclusterType.ZERO_ALLOC:
      case QCow2SubclusterType.UNALLOCATED_ALLOC:
        cow_end_to = round_up(cow_end_from, s.cluster_size);
        if (has_subclusters(s)) {
          const alloc_bitmap = Number(l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC) >>> 0;
          cow_end_to -= Math.min(s.subclusters_per_cluster - sc_index - 1, Math.clz32(alloc_bitmap)) * s.subcluster_size;
        }
        break;
      default:
        cow_end_to = round_up(cow_end_from, s.subcluster_size);
        break;
    }
  } else {
    cow_end_to = type === QCow2SubclusterType.NORMAL ? cow_end_from : round_up(cow_end_from, s.subcluster_size);
  }

  const m: QCowL2Meta = {
    next: mm.m,
    alloc_offset: host_cluster_offset,
    offset: start_of_cluster(s, guest_offset),
    nb_clusters,
    keep_old_clusters: keep_old,
    cow_start: { offset: cow_start_from, nb_bytes: cow_start_to - cow_start_from },
    cow_end: { offset: cow_end_from, nb_bytes: cow_end_to - cow_end_from },
    skip_cow: false,
    dependent_requests: new CoQueue(),
    data_qiov: null,
    data_qiov_offset: 0,
    prealloc: false,
  };
  mm.m = m;
  s.cluster_allocs.add(m);
  return 0;
}

/** Whether writing to the cluster of `l2_entry` needs a new cluster. QEMU: `cluster_needs_new_alloc`. */
function cluster_needs_new_alloc(s: BDRVQcow2State, l2_entry: bigint): boolean {
  switch (qcow2_get_cluster_type(s, l2_entry)) {
    case QCow2ClusterType.NORMAL:
    case QCow2ClusterType.ZERO_ALLOC:
      return !(l2_entry & QCOW_OFLAG_COPIED);
    default:
      return true;
  }
}

/**
 * Clusters from `l2_index` that one write can cover: all needing allocation (`new_alloc`), or
 * all writable in place and contiguous on the host. QEMU: `count_single_write_clusters`.
 */
function count_single_write_clusters(s: BDRVQcow2State, nb_clusters: number, l2_slice: Uint8Array, l2_index: number, new_alloc: boolean): number {
  let expected_offset = get_l2_entry(s, l2_slice, l2_index) & L2E_OFFSET_MASK;
  let i: number;
  for (i = 0; i < nb_clusters; i++) {
    const l2_entry = get_l2_entry(s, l2_slice, l2_index + i);
    if (cluster_needs_new_alloc(s, l2_entry) !== new_alloc) break;
    if (!new_alloc) {
      if (expected_offset !== (l2_entry & L2E_OFFSET_MASK)) break;
      expected_offset += BigInt(s.cluster_size);
    }
  }
  return i;
}

/**
 * Checks for in-flight allocations overlapping `[guest_offset, +cur.bytes)`. Shortens the
 * request to stop before one; if the request starts inside one, waits for it (releasing
 * `s.lock`) and returns -EAGAIN so the caller starts over. QEMU: `handle_dependencies`.
 */
function* handle_dependencies(bs: BlockDriverState, guest_offset: number, cur: { bytes: number }, mm: { m: QCowL2Meta | null }): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let bytes = cur.bytes;
  for (const old_alloc of s.cluster_allocs) {
    const start = guest_offset;
    const end = start + bytes;
    const old_start = start_of_cluster(s, l2meta_cow_start(old_alloc));
    const old_end = Math.ceil(l2meta_cow_end(old_alloc) / s.cluster_size) * s.cluster_size;
    if (end <= old_start || start >= old_end) continue;
    bytes = start < old_start ? old_start - start : 0;
    // Waiting would invalidate the QCowL2Metas gathered so far: stop here instead.
    if (bytes === 0 && mm.m) {
      cur.bytes = 0;
      return 0;
    }
    if (bytes === 0) {
      yield* qemu_co_queue_wait(old_alloc.dependent_requests, s.lock);
      return -EAGAIN;
    }
  }
  cur.bytes = bytes;
  return 0;
}

/**
 * Counts clusters at `guest_offset` that can be written in place (COPIED), starting at
 * `host.v` if it is set. QEMU: `handle_copied`. 1 with `cur.bytes` shortened and `host.v` set,
 * 0 if none (cur.bytes 0 if the in-place cluster is not where `host.v` required), or -errno.
 */
function* handle_copied(
  bs: BlockDriverState,
  guest_offset: number,
  host: { v: number },
  cur: { bytes: number },
  mm: { m: QCowL2Meta | null },
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let nb_clusters = size_to_clusters(s, offset_into_cluster(s, guest_offset) + cur.bytes);
  const idx0 = offset_to_l2_slice_index(s, guest_offset);
  nb_clusters = Math.min(nb_clusters, s.l2_slice_size - idx0);
  nb_clusters = Math.min(nb_clusters, Math.floor(BDRV_REQUEST_MAX_BYTES / s.cluster_size));
  const t = { table: null as Uint8Array | null, index: 0 };
  let ret = yield* get_cluster_table(bs, guest_offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  const l2_index = t.index;
  const l2_entry = get_l2_entry(s, l2_slice, l2_index);
  const cluster_offset = Number(l2_entry & L2E_OFFSET_MASK);
  ret = 0;
  if (!cluster_needs_new_alloc(s, l2_entry)) {
    if (offset_into_cluster(s, cluster_offset)) {
      qcow2_signal_corruption(
        bs,
        true,
        -1,
        -1,
        `${l2_entry & QCOW_OFLAG_ZERO ? 'Preallocated zero' : 'Data'} cluster offset ${hex(cluster_offset)} unaligned (guest offset: ${hex(guest_offset)})`,
      );
      ret = -EIO;
    } else if (host.v !== INV_OFFSET && cluster_offset !== host.v) {
      cur.bytes = 0;
      ret = 0;
    } else {
      const keep_clusters = count_single_write_clusters(s, nb_clusters, l2_slice, l2_index, false);
      cur.bytes = Math.min(cur.bytes, keep_clusters * s.cluster_size - offset_into_cluster(s, guest_offset));
      ret = calculate_l2_meta(bs, cluster_offset, guest_offset, cur.bytes, l2_slice, mm, true);
      if (ret >= 0) ret = 1;
    }
  }
  qcow2_cache_put(s.l2_table_cache, l2_slice);
  if (ret > 0) host.v = cluster_offset + offset_into_cluster(s, guest_offset);
  return ret;
}

/**
 * Allocates new clusters for `[guest_offset, +cur.bytes)` (contiguous with `host.v` if set).
 * QEMU: `handle_alloc`. 1 with `host.v` at the guest offset's byte and `cur.bytes` possibly
 * shortened, 0 if nothing could be allocated at the required place, or -errno.
 */
function* handle_alloc(
  bs: BlockDriverState,
  guest_offset: number,
  host: { v: number },
  cur: { bytes: number },
  mm: { m: QCowL2Meta | null },
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let nb_clusters = size_to_clusters(s, offset_into_cluster(s, guest_offset) + cur.bytes);
  const idx0 = offset_to_l2_slice_index(s, guest_offset);
  nb_clusters = Math.min(nb_clusters, s.l2_slice_size - idx0);
  nb_clusters = Math.min(nb_clusters, Math.floor(BDRV_REQUEST_MAX_BYTES / s.cluster_size));
  const t = { table: null as Uint8Array | null, index: 0 };
  let ret = yield* get_cluster_table(bs, guest_offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  try {
    nb_clusters = count_single_write_clusters(s, nb_clusters, l2_slice, t.index, true);
    if (nb_clusters <= 0) throw new Error('handle_alloc: no cluster to allocate');
    let alloc_cluster_offset: number;
    if (host.v === INV_OFFSET) {
      const r = yield* qcow2_alloc_clusters(bs, nb_clusters * s.cluster_size);
      if (r < 0) return r;
      alloc_cluster_offset = r;
    } else {
      alloc_cluster_offset = start_of_cluster(s, host.v);
      const r = yield* qcow2_alloc_clusters_at(bs, alloc_cluster_offset, nb_clusters);
      if (r < 0) return r;
      nb_clusters = r;
    }
    if (nb_clusters === 0) {
      cur.bytes = 0;
      return 0;
    }
    const requested_bytes = cur.bytes + offset_into_cluster(s, guest_offset);
    const avail_bytes = nb_clusters * s.cluster_size;
    const nb_bytes = Math.min(requested_bytes, avail_bytes);
    host.v = alloc_cluster_offset + offset_into_cluster(s, guest_offset);
    cur.bytes = Math.min(cur.bytes, nb_bytes - offset_into_cluster(s, guest_offset));
    ret = calculate_l2_meta(bs, alloc_cluster_offset, guest_offset, cur.bytes, l2_slice, mm, false);
    if (ret < 0) return ret;
    return 1;
  } finally {
    qcow2_cache_put(s.l2_table_cache, l2_slice);
  }
}

/** Out-object of `qcow2_alloc_host_offset`. */
export interface Qcow2AllocOut {
  /** In: bytes to write; out: bytes mapped contiguously at `host_offset`. */
  bytes: number;
  host_offset: number;
  /** Allocations to link (or abort) after the data write, newest first. */
  m: QCowL2Meta | null;
}

/**
 * Finds or allocates host space for guest `[offset, offset + out.bytes)`: in-place clusters
 * first, then new ones, contiguous on the host; waits for overlapping in-flight allocations.
 * QEMU: `qcow2_alloc_host_offset`. On return `out.m` lists the allocations, which the caller
 * must link with `qcow2_alloc_cluster_link_l2` after writing the data (or abort), even on
 * error.
 */
export function* qcow2_alloc_host_offset(bs: BlockDriverState, offset: number, out: Qcow2AllocOut): CoroutineFn<number> {
  const mm = { m: null as QCowL2Meta | null };
  const cluster = { v: INV_OFFSET };
  const cur = { bytes: 0 };
  let start: number;
  let remaining: number;
  let host_offset: number;
  again: for (;;) {
    start = offset;
    remaining = out.bytes;
    cluster.v = INV_OFFSET;
    host_offset = INV_OFFSET;
    cur.bytes = 0;
    mm.m = null;
    for (;;) {
      if (host_offset === INV_OFFSET && cluster.v !== INV_OFFSET) host_offset = cluster.v;
      start += cur.bytes;
      remaining -= cur.bytes;
      if (cluster.v !== INV_OFFSET) cluster.v += cur.bytes;
      if (remaining === 0) break;
      cur.bytes = remaining;

      let ret = yield* handle_dependencies(bs, start, cur, mm);
      if (ret === -EAGAIN) continue again;
      if (ret < 0) {
        out.m = mm.m;
        return ret;
      }
      if (cur.bytes === 0) break;

      ret = yield* handle_copied(bs, start, cluster, cur, mm);
      if (ret < 0) {
        out.m = mm.m;
        return ret;
      }
      if (ret) continue;
      if (cur.bytes === 0) break;

      ret = yield* handle_alloc(bs, start, cluster, cur, mm);
      if (ret < 0) {
        out.m = mm.m;
        return ret;
      }
      if (ret) continue;
      break;
    }
    break;
  }
  out.bytes -= remaining;
  out.host_offset = host_offset;
  out.m = mm.m;
  if (out.bytes <= 0 || host_offset === INV_OFFSET) throw new Error('qcow2_alloc_host_offset: no progress');
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Discard and zeroing

function* discard_in_l2_slice(bs: BlockDriverState, offset: number, nb_clusters: number, type: Qcow2DiscardType, full_discard: boolean): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const t = { table: null as Uint8Array | null, index: 0 };
  const ret = yield* get_cluster_table(bs, offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  const l2_index = t.index;
  nb_clusters = Math.min(nb_clusters, s.l2_slice_size - l2_index);
  for (let i = 0; i < nb_clusters; i++) {
    const old_l2_entry = get_l2_entry(s, l2_slice, l2_index + i);
    const old_l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index + i);
    let new_l2_entry = old_l2_entry;
    let new_l2_bitmap = old_l2_bitmap;
    const cluster_type = qcow2_get_cluster_type(s, old_l2_entry);
    // A full discard falls through to the backing file; otherwise the range must read as zeroes
    // (v3: zero flag; v2 cannot express it and only drops allocations).
    if (full_discard) {
      new_l2_entry = new_l2_bitmap = 0n;
    } else if (bs.backing || qcow2_cluster_is_allocated(cluster_type)) {
      if (has_subclusters(s)) {
        new_l2_entry = 0n;
        new_l2_bitmap = QCOW_L2_BITMAP_ALL_ZEROES;
      } else {
        new_l2_entry = s.qcow_version >= 3 ? QCOW_OFLAG_ZERO : 0n;
      }
    }
    if (old_l2_entry === new_l2_entry && old_l2_bitmap === new_l2_bitmap) continue;
    qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_slice);
    set_l2_entry(s, l2_slice, l2_index + i, new_l2_entry);
    if (has_subclusters(s)) set_l2_bitmap(s, l2_slice, l2_index + i, new_l2_bitmap);
    yield* qcow2_free_any_cluster(bs, old_l2_entry, type);
  }
  qcow2_cache_put(s.l2_table_cache, l2_slice);
  return nb_clusters;
}

/**
 * Discards the clusters of `[offset, offset + bytes)` (cluster aligned, or ending at the image
 * end): entries become zero (or unallocated with `full_discard`) and the host clusters are
 * freed with discard type `type`. QEMU: `qcow2_cluster_discard`.
 */
export function* qcow2_cluster_discard(bs: BlockDriverState, offset: number, bytes: number, type: Qcow2DiscardType, full_discard: boolean): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let nb_clusters = size_to_clusters(s, bytes);
  s.cache_discards = true;
  let ret = 0;
  while (nb_clusters > 0) {
    const cleared = yield* discard_in_l2_slice(bs, offset, nb_clusters, type, full_discard);
    if (cleared < 0) {
      ret = cleared;
      break;
    }
    nb_clusters -= cleared;
    offset += cleared * s.cluster_size;
  }
  s.cache_discards = false;
  yield* qcow2_process_discards(bs, ret);
  return ret;
}

function* zero_in_l2_slice(bs: BlockDriverState, offset: number, nb_clusters: number, flags: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const t = { table: null as Uint8Array | null, index: 0 };
  const ret = yield* get_cluster_table(bs, offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  const l2_index = t.index;
  nb_clusters = Math.min(nb_clusters, s.l2_slice_size - l2_index);
  for (let i = 0; i < nb_clusters; i++) {
    const old_l2_entry = get_l2_entry(s, l2_slice, l2_index + i);
    const old_l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index + i);
    const type = qcow2_get_cluster_type(s, old_l2_entry);
    const unmap = type === QCow2ClusterType.COMPRESSED || ((flags & BDRV_REQ_MAY_UNMAP) !== 0 && qcow2_cluster_is_allocated(type));
    let new_l2_entry = unmap ? 0n : old_l2_entry;
    let new_l2_bitmap = old_l2_bitmap;
    if (has_subclusters(s)) new_l2_bitmap = QCOW_L2_BITMAP_ALL_ZEROES;
    else new_l2_entry |= QCOW_OFLAG_ZERO;
    if (old_l2_entry === new_l2_entry && old_l2_bitmap === new_l2_bitmap) continue;
    qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_slice);
    set_l2_entry(s, l2_slice, l2_index + i, new_l2_entry);
    if (has_subclusters(s)) set_l2_bitmap(s, l2_slice, l2_index + i, new_l2_bitmap);
    if (unmap) yield* qcow2_free_any_cluster(bs, old_l2_entry, QCOW2_DISCARD_REQUEST);
  }
  qcow2_cache_put(s.l2_table_cache, l2_slice);
  return nb_clusters;
}

function* zero_l2_subclusters(bs: BlockDriverState, offset: number, nb_subclusters: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const sc = offset_to_sc_index(s, offset);
  const t = { table: null as Uint8Array | null, index: 0 };
  let ret = yield* get_cluster_table(bs, offset, t);
  if (ret < 0) return ret;
  const l2_slice = t.table!;
  const l2_index = t.index;
  switch (qcow2_get_cluster_type(s, get_l2_entry(s, l2_slice, l2_index))) {
    case QCow2ClusterType.COMPRESSED:
      qcow2_cache_put(s.l2_table_cache, l2_slice);
      return -ENOTSUP; // a compressed cluster cannot be zeroed in part
    default:
      break;
  }
  const old_l2_bitmap = get_l2_bitmap(s, l2_slice, l2_index);
  let l2_bitmap = old_l2_bitmap | QCOW_OFLAG_SUB_ZERO_RANGE(sc, sc + nb_subclusters);
  l2_bitmap &= ~QCOW_OFLAG_SUB_ALLOC_RANGE(sc, sc + nb_subclusters);
  if (old_l2_bitmap !== l2_bitmap) {
    set_l2_bitmap(s, l2_slice, l2_index, l2_bitmap);
    qcow2_cache_entry_mark_dirty(s.l2_table_cache, l2_slice);
  }
  qcow2_cache_put(s.l2_table_cache, l2_slice);
  ret = 0;
  return ret;
}

/**
 * Makes `[offset, offset + bytes)` read as zeroes through metadata only (subcluster aligned, or
 * ending at the image end). QEMU: `qcow2_subcluster_zeroize`. v2 images without a backing file
 * are discarded instead; v2 with a backing file gives -ENOTSUP (the caller falls back to
 * writing zeroes). With BDRV_REQ_MAY_UNMAP allocated clusters are freed.
 */
export function* qcow2_subcluster_zeroize(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let end_offset = offset + bytes;
  const disk_end = bs.total_sectors * BDRV_SECTOR_SIZE;
  if (offset_into_subcluster(s, offset) !== 0 || (offset_into_subcluster(s, end_offset) !== 0 && end_offset < disk_end)) {
    throw new Error('qcow2_subcluster_zeroize: unaligned request');
  }
  if (s.qcow_version < 3) {
    if (!bs.backing) return yield* qcow2_cluster_discard(bs, offset, bytes, QCOW2_DISCARD_REQUEST, false);
    return -ENOTSUP;
  }
  const head = Math.min(end_offset, Math.ceil(offset / s.cluster_size) * s.cluster_size) - offset;
  offset += head;
  const tail = end_offset >= disk_end ? 0 : end_offset - Math.max(offset, start_of_cluster(s, end_offset));
  end_offset -= tail;

  s.cache_discards = true;
  let ret = 0;
  do {
    if (head) {
      ret = yield* zero_l2_subclusters(bs, offset - head, size_to_subclusters(s, head));
      if (ret < 0) break;
    }
    let nb_clusters = size_to_clusters(s, end_offset - offset);
    while (nb_clusters > 0) {
      const cleared = yield* zero_in_l2_slice(bs, offset, nb_clusters, flags);
      if (cleared < 0) {
        ret = cleared;
        break;
      }
      nb_clusters -= cleared;
      offset += cleared * s.cluster_size;
    }
    if (ret < 0) break;
    if (tail) {
      ret = yield* zero_l2_subclusters(bs, end_offset, size_to_subclusters(s, tail));
      if (ret < 0) break;
    }
    ret = 0;
  } while (false);
  s.cache_discards = false;
  yield* qcow2_process_discards(bs, ret);
  return ret;
}

