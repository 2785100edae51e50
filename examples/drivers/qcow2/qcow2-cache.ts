/**
 * The L2-table and refcount-block caches of the qcow2 driver (QEMU 7.2: block/qcow2-cache.c).
 *
 * A cache holds `size` tables of `table_size` bytes each in one aligned buffer; a table is handed
 * out as a Uint8Array view into that buffer and identified by where the view starts, so callers
 * must pass back the very view they got (or one starting at the same byte). Entries are found by
 * their host offset; a miss evicts the least recently released unreferenced entry, writing it back
 * first if it is dirty. Write-back honours the ordering dependencies that keep a crashed image
 * consistent: a cache that depends on another flushes the other one (and the file) first.
 */
import {
  EIO,
  ENOSPC,
  bdrv_co_flush,
  bdrv_co_pread,
  bdrv_co_pwrite,
  bdrv_co_debug_event,
  qemu_blockalign,
  qemu_vfree,
} from '../../../src/index.ts';
import type { BlockDriverState, CoroutineFn } from '../../../src/index.ts';
import type { BDRVQcow2State } from './qcow2-state.ts';
import { QCOW2_OL_ACTIVE_L2, QCOW2_OL_REFCOUNT_BLOCK } from './qcow2-state.ts';
import { qcow2_pre_write_overlap_check } from './qcow2-refcount.ts';
import { qcow2_signal_corruption } from './qcow2.ts';

/** One cached table (QEMU: Qcow2CachedTable). `offset` 0 means the slot is empty. */
interface Qcow2CachedTable {
  offset: number;
  lru_counter: number;
  ref: number;
  dirty: boolean;
}

/** A table cache (QEMU: Qcow2Cache). Create with `qcow2_cache_create`. */
export class Qcow2Cache {
  /** All tables, back to back (QEMU: table_array). */
  table_array: Uint8Array;
  entries: Qcow2CachedTable[];
  /** The cache that must reach the disk before this one (QEMU: depends). */
  depends: Qcow2Cache | null = null;
  size: number;
  table_size: number;
  /** The file must be flushed before this cache writes anything (QEMU: depends_on_flush). */
  depends_on_flush = false;
  lru_counter = 0;
  /** `lru_counter` at the last `qcow2_cache_clean_unused` (QEMU: cache_clean_lru_counter). */
  cache_clean_lru_counter = 0;
  /** One view per entry, made once so lookups allocate nothing. */
  tables: Uint8Array[];

  constructor(table_array: Uint8Array, size: number, table_size: number) {
    this.table_array = table_array;
    this.size = size;
    this.table_size = table_size;
    this.entries = [];
    this.tables = [];
    for (let i = 0; i < size; i++) {
      this.entries.push({ offset: 0, lru_counter: 0, ref: 0, dirty: false });
      this.tables.push(table_array.subarray(i * table_size, (i + 1) * table_size));
    }
  }
}

function qcow2_cache_get_name(s: BDRVQcow2State, c: Qcow2Cache): string {
  if (c === s.refcount_block_cache) return 'refcount block';
  if (c === s.l2_table_cache) return 'L2 table';
  return 'unknown';
}

/** Index of the entry `table` belongs to; throws (QEMU asserts) for a foreign view. */
function qcow2_cache_get_table_idx(c: Qcow2Cache, table: Uint8Array): number {
  const rel = table.byteOffset - c.table_array.byteOffset;
  if (table.buffer !== c.table_array.buffer || rel < 0 || rel % c.table_size !== 0 || rel / c.table_size >= c.size) {
    throw new Error('qcow2_cache_get_table_idx: table does not belong to this cache');
  }
  return rel / c.table_size;
}

/**
 * Creates a cache of `num_tables` tables of `table_size` bytes (a power of two between 512 and
 * the cluster size). QEMU: `qcow2_cache_create`. Surprise: the tables are not zeroed; every
 * entry starts empty (offset 0), so nothing is read before a `qcow2_cache_get`.
 */
export function qcow2_cache_create(bs: BlockDriverState, num_tables: number, table_size: number): Qcow2Cache {
  const s = bs.opaque as BDRVQcow2State;
  if (num_tables <= 0 || table_size < 512 || (table_size & (table_size - 1)) !== 0 || (s && s.cluster_size && table_size > s.cluster_size)) {
    throw new Error(`qcow2_cache_create: bad geometry (${num_tables} tables of ${table_size} bytes)`);
  }
  const arr = qemu_blockalign(bs.file?.bs ?? null, num_tables * table_size);
  return new Qcow2Cache(arr, num_tables, table_size);
}

/**
 * Frees the cache's memory without writing anything back. QEMU: `qcow2_cache_destroy`.
 * Surprise: dirty entries are lost; flush first. Throws if a table is still referenced.
 */
export function qcow2_cache_destroy(c: Qcow2Cache): void {
  for (const e of c.entries) {
    if (e.ref !== 0) throw new Error('qcow2_cache_destroy: table still in use');
  }
  qemu_vfree(c.table_array);
}

function* qcow2_cache_flush_dependency(bs: BlockDriverState, c: Qcow2Cache): CoroutineFn<number> {
  const ret = yield* qcow2_cache_flush(bs, c.depends!);
  if (ret < 0) return ret;
  c.depends = null;
  c.depends_on_flush = false;
  return 0;
}

function* qcow2_cache_entry_flush(bs: BlockDriverState, c: Qcow2Cache, i: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const e = c.entries[i];
  if (!e.dirty || !e.offset) return 0;

  let ret = 0;
  if (c.depends) {
    ret = yield* qcow2_cache_flush_dependency(bs, c);
  } else if (c.depends_on_flush) {
    ret = yield* bdrv_co_flush(bs.file!.bs);
    if (ret >= 0) c.depends_on_flush = false;
  }
  if (ret < 0) return ret;

  // The entry's own kind of metadata is exempt from the overlap check: it is what we write.
  let ign = 0;
  if (c === s.refcount_block_cache) ign = QCOW2_OL_REFCOUNT_BLOCK;
  else if (c === s.l2_table_cache) ign = QCOW2_OL_ACTIVE_L2;
  ret = yield* qcow2_pre_write_overlap_check(bs, ign, e.offset, c.table_size, false);
  if (ret < 0) return ret;

  if (c === s.refcount_block_cache) yield* bdrv_co_debug_event(bs.file!.bs, 'refblock_update_part');
  else if (c === s.l2_table_cache) yield* bdrv_co_debug_event(bs.file!.bs, 'l2_update');

  ret = yield* bdrv_co_pwrite(bs.file!, e.offset, c.table_size, c.tables[i], 0);
  if (ret < 0) return ret;
  e.dirty = false;
  return 0;
}

/**
 * Writes every dirty entry back (after the caches it depends on), without flushing the file.
 * QEMU: `qcow2_cache_write`. Surprise: it keeps going after an error and returns the first
 * error, except that a later error replaces an earlier one until an -ENOSPC is seen.
 */
export function* qcow2_cache_write(bs: BlockDriverState, c: Qcow2Cache): CoroutineFn<number> {
  let result = 0;
  for (let i = 0; i < c.size; i++) {
    const ret = yield* qcow2_cache_entry_flush(bs, c, i);
    if (ret < 0 && result !== -ENOSPC) result = ret;
  }
  return result;
}

/**
 * `qcow2_cache_write`, then a flush of the file when the write-back succeeded. QEMU:
 * `qcow2_cache_flush`. Returns 0 or -errno.
 */
export function* qcow2_cache_flush(bs: BlockDriverState, c: Qcow2Cache): CoroutineFn<number> {
  let result = yield* qcow2_cache_write(bs, c);
  if (result === 0) {
    const ret = yield* bdrv_co_flush(bs.file!.bs);
    if (ret < 0) result = ret;
  }
  return result;
}

/**
 * Records that `c`'s entries may only be written after `dependency` is on disk (e.g. the L2
 * cache depends on the refcount cache). QEMU: `qcow2_cache_set_dependency`. Surprise: a cache
 * has a single dependency, and chains are not allowed: if `dependency` itself depends on
 * something, or `c` already depends on another cache, that other cache is flushed right now.
 */
export function* qcow2_cache_set_dependency(bs: BlockDriverState, c: Qcow2Cache, dependency: Qcow2Cache): CoroutineFn<number> {
  if (dependency.depends) {
    const ret = yield* qcow2_cache_flush_dependency(bs, dependency);
    if (ret < 0) return ret;
  }
  if (c.depends && c.depends !== dependency) {
    const ret = yield* qcow2_cache_flush_dependency(bs, c);
    if (ret < 0) return ret;
  }
  c.depends = dependency;
  return 0;
}

/**
 * Makes the next write-back of `c` flush the file first (used after freeing clusters, so the
 * refcount decrease is stable before anything reuses them). QEMU: `qcow2_cache_depends_on_flush`.
 */
export function qcow2_cache_depends_on_flush(c: Qcow2Cache): void {
  c.depends_on_flush = true;
}

/**
 * Flushes the cache and forgets every entry. QEMU: `qcow2_cache_empty`. Throws if a table is
 * still referenced (QEMU asserts).
 */
export function* qcow2_cache_empty(bs: BlockDriverState, c: Qcow2Cache): CoroutineFn<number> {
  const ret = yield* qcow2_cache_flush(bs, c);
  if (ret < 0) return ret;
  for (const e of c.entries) {
    if (e.ref !== 0) throw new Error('qcow2_cache_empty: table still in use');
    e.offset = 0;
    e.lru_counter = 0;
  }
  return 0;
}

function* qcow2_cache_do_get(
  bs: BlockDriverState,
  c: Qcow2Cache,
  offset: number,
  out: { table: Uint8Array | null },
  read_from_disk: boolean,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (offset === 0) {
    // Offset 0 is the header and marks empty slots: QEMU asserts here. A corrupt image (say a
    // header cluster with refcount 0, so the allocator hands it out) must not crash aioco.
    qcow2_signal_corruption(bs, true, -1, -1, `Cannot get entry from ${qcow2_cache_get_name(s, c)} cache: offset 0 is the image header`);
    return -EIO;
  }
  if (offset % c.table_size !== 0) {
    qcow2_signal_corruption(
      bs,
      true,
      -1,
      -1,
      `Cannot get entry from ${qcow2_cache_get_name(s, c)} cache: offset 0x${offset.toString(16)} is unaligned`,
    );
    return -EIO;
  }

  // Callers hold s.lock, as in QEMU; still, the write-back and the read below yield, so the
  // slot is re-validated after the write-back and pinned during the read, and a table someone
  // else loaded meanwhile is used instead of a second copy.
  let i: number;
  for (;;) {
    // Start the search where this offset usually lands so hits are found in a step or two.
    const lookup_index = ((offset / c.table_size) * 4) % c.size;
    i = lookup_index;
    let min_lru_counter = Infinity;
    let min_lru_index = -1;
    do {
      const t = c.entries[i];
      if (t.offset === offset) {
        t.ref++;
        out.table = c.tables[i];
        return 0;
      }
      if (t.ref === 0 && t.lru_counter < min_lru_counter) {
        min_lru_counter = t.lru_counter;
        min_lru_index = i;
      }
      if (++i === c.size) i = 0;
    } while (i !== lookup_index);

    if (min_lru_index === -1) {
      // QEMU aborts here; every slot being held at once is a driver bug.
      throw new Error(`qcow2: ${qcow2_cache_get_name(s, c)} cache is full`);
    }
    i = min_lru_index;
    const ret = yield* qcow2_cache_entry_flush(bs, c, i);
    if (ret < 0) return ret;
    const v = c.entries[i];
    if (v.ref === 0 && !v.dirty) break;
  }

  const e = c.entries[i];
  e.offset = 0;
  e.ref = 1;
  if (read_from_disk) {
    if (c === s.l2_table_cache) yield* bdrv_co_debug_event(bs.file!.bs, 'l2_load');
    const ret = yield* bdrv_co_pread(bs.file!, offset, c.table_size, c.tables[i], 0);
    if (ret < 0) {
      e.ref = 0;
      return ret;
    }
  }
  for (let j = 0; j < c.size; j++) {
    if (j !== i && c.entries[j].offset === offset) {
      e.ref = 0;
      c.entries[j].ref++;
      out.table = c.tables[j];
      return 0;
    }
  }
  e.offset = offset;
  out.table = c.tables[i];
  return 0;
}

/**
 * Returns (in `out.table`) the table at host `offset`, reading it from the file on a miss, and
 * takes a reference that `qcow2_cache_put` releases. QEMU: `qcow2_cache_get`. Surprise: an
 * unaligned offset, or offset 0 (QEMU asserts), marks the image corrupt (-EIO); a cache whose
 * entries are all referenced throws.
 */
export function* qcow2_cache_get(bs: BlockDriverState, c: Qcow2Cache, offset: number, out: { table: Uint8Array | null }): CoroutineFn<number> {
  return yield* qcow2_cache_do_get(bs, c, offset, out, true);
}

/**
 * Like `qcow2_cache_get` but does not read the table on a miss (its contents are then stale
 * bytes the caller must overwrite entirely). QEMU: `qcow2_cache_get_empty`.
 */
export function* qcow2_cache_get_empty(bs: BlockDriverState, c: Qcow2Cache, offset: number, out: { table: Uint8Array | null }): CoroutineFn<number> {
  return yield* qcow2_cache_do_get(bs, c, offset, out, false);
}

/**
 * Releases a reference from `qcow2_cache_get`. QEMU: `qcow2_cache_put` (which also NULLs the
 * caller's pointer; here the caller drops its variable). The entry becomes the most recently
 * used one when its last reference goes.
 */
export function qcow2_cache_put(c: Qcow2Cache, table: Uint8Array): void {
  const i = qcow2_cache_get_table_idx(c, table);
  const e = c.entries[i];
  if (e.ref <= 0) throw new Error('qcow2_cache_put: table not referenced');
  e.ref--;
  if (e.ref === 0) e.lru_counter = ++c.lru_counter;
}

/**
 * Marks a referenced table as modified so it is written back on flush or eviction. QEMU:
 * `qcow2_cache_entry_mark_dirty`. Throws for an empty slot (QEMU asserts offset != 0).
 */
export function qcow2_cache_entry_mark_dirty(c: Qcow2Cache, table: Uint8Array): void {
  const i = qcow2_cache_get_table_idx(c, table);
  if (c.entries[i].offset === 0) throw new Error('qcow2_cache_entry_mark_dirty: empty entry');
  c.entries[i].dirty = true;
}

/**
 * Drops an unreferenced table from the cache without writing it (its cluster was freed).
 * QEMU: `qcow2_cache_discard`.
 */
export function qcow2_cache_discard(c: Qcow2Cache, table: Uint8Array): void {
  const i = qcow2_cache_get_table_idx(c, table);
  const e = c.entries[i];
  if (e.ref !== 0) throw new Error('qcow2_cache_discard: table still in use');
  e.offset = 0;
  e.lru_counter = 0;
  e.dirty = false;
}

/**
 * Forgets clean, unreferenced entries not used since the previous call (the cache-clean-interval
 * timer). QEMU: `qcow2_cache_clean_unused`. Surprise: an entry used once after the last
 * clean survives one more round.
 */
export function qcow2_cache_clean_unused(c: Qcow2Cache): void {
  for (const e of c.entries) {
    if (e.ref === 0 && !e.dirty && e.offset !== 0 && e.lru_counter <= c.cache_clean_lru_counter) {
      e.offset = 0;
      e.lru_counter = 0;
    }
  }
  c.cache_clean_lru_counter = c.lru_counter;
}

/**
 * The cached table at host `offset`, or null, without taking a reference. QEMU:
 * `qcow2_cache_is_table_offset`.
 */
export function qcow2_cache_is_table_offset(c: Qcow2Cache, offset: number): Uint8Array | null {
  for (let i = 0; i < c.size; i++) {
    if (c.entries[i].offset === offset) return c.tables[i];
  }
  return null;
}
