/**
 * Persistent dirty bitmaps of qcow2 (QEMU 7.2: block/qcow2-bitmap.c), as far as aioco needs
 * them without tracking dirty bits:
 * - open validates the bitmap directory (and the tables of bitmaps not in use) with QEMU's
 *   messages, and a read-write open marks every bitmap IN_USE in place, exactly as QEMU does
 *   when it loads bitmaps. QEMU clears IN_USE again when it stores the bitmaps at close; aioco
 *   never stores them, so they stay IN_USE, which is what QEMU leaves after a crash: the
 *   bitmaps are known to be inconsistent while every cluster stays referenced (no leaks).
 * - `qemu-img info` lists the bitmaps (name, granularity, flags) from the directory.
 * - `qemu-img check` counts the directory, the bitmap tables and the bitmap data clusters.
 */
import { BDRV_SECTOR_SIZE, EINVAL, QemuError, bdrv_co_flush, bdrv_co_pread, bdrv_co_pwrite, strerror } from '../../../src/index.ts';
import type { BdrvCheckResult, BlockDriverState, CoroutineFn } from '../../../src/index.ts';
import { QCOW2_AUTOCLEAR_BITMAPS, QCOW2_MAX_BITMAPS, QCOW2_OL_BITMAP_DIRECTORY } from './qcow2-state.ts';
import type { BDRVQcow2State } from './qcow2-state.ts';
import { qcow2_inc_refcounts_imrt, qcow2_pre_write_overlap_check } from './qcow2-refcount.ts';
import type { Qcow2Imrt } from './qcow2-refcount.ts';
import { qcow2_update_header } from './qcow2.ts';

/** Most entries a bitmap table may have. QEMU: BME_MAX_TABLE_SIZE. */
const BME_MAX_TABLE_SIZE = 0x8000000;
/** Most bytes a bitmap may occupy. QEMU: BME_MAX_PHYS_SIZE. */
const BME_MAX_PHYS_SIZE = 0x20000000;
const BME_MAX_GRANULARITY_BITS = 31;
const BME_MIN_GRANULARITY_BITS = 9;
const BME_MAX_NAME_SIZE = 1023;
const BME_RESERVED_FLAGS = 0xfffffffc;
/** The bitmap's data on disk is not in sync with the image (set while a writer has it loaded). */
export const BME_FLAG_IN_USE = 1 << 0;
/** The bitmap tracks writes whenever the image is opened read-write. */
export const BME_FLAG_AUTO = 1 << 1;
const BME_TABLE_ENTRY_RESERVED_MASK = 0xff000000000001fen;
const BME_TABLE_ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;
const BME_TABLE_ENTRY_FLAG_ALL_ONES = 1n;
/** The only bitmap type. QEMU: BT_DIRTY_TRACKING_BITMAP. */
const BT_DIRTY_TRACKING_BITMAP = 1;
/** Largest bitmap directory QEMU accepts. QEMU: QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
/** sizeof(Qcow2BitmapDirEntry) without extra data and name. */
const DIR_ENTRY_HEADER = 24;

/** One bitmap directory entry, decoded. QEMU: `Qcow2Bitmap` (with its `Qcow2BitmapTable`). */
export interface Qcow2Bitmap {
  table_offset: number;
  /** Number of 8-byte entries of the bitmap table. */
  table_size: number;
  flags: number;
  granularity_bits: number;
  /** The name's bytes up to the first NUL (QEMU keeps it as a C string). */
  name_bytes: Uint8Array;
  name: string;
}

/** One bitmap as `qemu-img info` shows it. QEMU: the `Qcow2BitmapInfo` QAPI type. */
export interface Qcow2BitmapInfo {
  flags: string[];
  name: string;
  granularity: number;
}

const utf8 = new TextDecoder('utf-8');

function name_of(bytes: Uint8Array): { name_bytes: Uint8Array; name: string } {
  const nul = bytes.indexOf(0);
  const name_bytes = nul < 0 ? bytes : bytes.subarray(0, nul);
  return { name_bytes, name: utf8.decode(name_bytes) };
}

function check_table_entry(entry: bigint, cluster_size: number): number {
  if (entry & BME_TABLE_ENTRY_RESERVED_MASK) return -EINVAL;
  const offset = entry & BME_TABLE_ENTRY_OFFSET_MASK;
  if (offset !== 0n) {
    if (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES) return -EINVAL;
    if (offset % BigInt(cluster_size)) return -EINVAL;
  }
  return 0;
}

function calc_dir_entry_size(name_size: number, extra_data_size: number): number {
  return Math.ceil((DIR_ENTRY_HEADER + name_size + extra_data_size) / 8) * 8;
}

interface RawDirEntry {
  table_offset: bigint;
  table_size: number;
  flags: number;
  type: number;
  granularity_bits: number;
  name_size: number;
}

/**
 * Whether an entry satisfies the format's constraints. QEMU: `check_dir_entry`. A bitmap not
 * in use must also have a table big enough to cover the whole image; one in use need not
 * (it may be stale from before a resize).
 */
function check_dir_entry(bs: BlockDriverState, e: RawDirEntry): number {
  const s = bs.opaque as BDRVQcow2State;
  if (
    e.table_size === 0 ||
    e.table_offset === 0n ||
    e.table_offset % BigInt(s.cluster_size) !== 0n ||
    e.table_size > BME_MAX_TABLE_SIZE ||
    e.granularity_bits > BME_MAX_GRANULARITY_BITS ||
    e.granularity_bits < BME_MIN_GRANULARITY_BITS ||
    (e.flags & BME_RESERVED_FLAGS) !== 0 ||
    e.name_size > BME_MAX_NAME_SIZE ||
    e.type !== BT_DIRTY_TRACKING_BITMAP
  ) {
    return -EINVAL;
  }
  const phys_bitmap_bytes = BigInt(e.table_size) * BigInt(s.cluster_size);
  if (phys_bitmap_bytes > BigInt(BME_MAX_PHYS_SIZE)) return -EINVAL;
  const len = BigInt(bs.total_sectors * BDRV_SECTOR_SIZE);
  if (!(e.flags & BME_FLAG_IN_USE) && len > (phys_bitmap_bytes * 8n) << BigInt(e.granularity_bits)) return -EINVAL;
  return 0;
}

/**
 * Reads the bitmap directory at `offset`/`size` and decodes it, checking every entry. QEMU:
 * `bitmap_list_load`. Read-only. Throws QemuError with QEMU's messages ("Broken bitmap
 * directory", "Bitmap 'x' doesn't satisfy the constraints", ...); QEMU refuses to open an image
 * whose directory fails this, read-only opens and `qemu-img check` included.
 */
export function* bitmap_list_load(bs: BlockDriverState, offset: number, size: number): CoroutineFn<Qcow2Bitmap[]> {
  const s = bs.opaque as BDRVQcow2State;
  if (size === 0) throw new QemuError('Requested bitmap directory size is zero');
  if (size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) throw new QemuError('Requested bitmap directory size is too big');
  const dir = new Uint8Array(size);
  const ret = yield* bdrv_co_pread(bs.file!, offset, size, dir, 0);
  if (ret < 0) throw new QemuError(`Failed to read bitmap directory: ${strerror(-ret)}`);
  const dv = new DataView(dir.buffer);
  const list: Qcow2Bitmap[] = [];
  let pos = 0;
  let nb_dir_entries = 0;
  while (pos < size) {
    if (pos + DIR_ENTRY_HEADER > size) throw new QemuError('Broken bitmap directory');
    if (++nb_dir_entries > s.nb_bitmaps) throw new QemuError('More bitmaps found than specified in header extension');
    const e: RawDirEntry = {
      table_offset: dv.getBigUint64(pos),
      table_size: dv.getUint32(pos + 8),
      flags: dv.getUint32(pos + 12),
      type: dir[pos + 16]!,
      granularity_bits: dir[pos + 17]!,
      name_size: dv.getUint16(pos + 18),
    };
    const extra_data_size = dv.getUint32(pos + 20);
    const next = pos + calc_dir_entry_size(e.name_size, extra_data_size);
    if (next > size) throw new QemuError('Broken bitmap directory');
    if (extra_data_size !== 0) throw new QemuError('Bitmap extra data is not supported');
    const name_field = dir.subarray(pos + DIR_ENTRY_HEADER, pos + DIR_ENTRY_HEADER + e.name_size);
    if (check_dir_entry(bs, e) < 0) {
      throw new QemuError(`Bitmap '${name_of(name_field).name}' doesn't satisfy the constraints`);
    }
    list.push({
      table_offset: Number(e.table_offset),
      table_size: e.table_size,
      flags: e.flags,
      granularity_bits: e.granularity_bits,
      ...name_of(name_field.slice()),
    });
    pos = next;
  }
  if (nb_dir_entries !== s.nb_bitmaps) throw new QemuError('Less bitmaps found than specified in header extension');
  return list;
}

/** Reads a bitmap table and checks every entry. QEMU: `bitmap_table_load`. Entries or -errno. */
function* bitmap_table_load(bs: BlockDriverState, bm: Qcow2Bitmap): CoroutineFn<BigUint64Array | number> {
  const s = bs.opaque as BDRVQcow2State;
  const raw = new Uint8Array(bm.table_size * 8);
  const ret = yield* bdrv_co_pread(bs.file!, bm.table_offset, raw.length, raw, 0);
  if (ret < 0) return ret;
  const dv = new DataView(raw.buffer);
  const table = new BigUint64Array(bm.table_size);
  for (let i = 0; i < bm.table_size; i++) {
    table[i] = dv.getBigUint64(i * 8);
    if (check_table_entry(table[i]!, s.cluster_size) < 0) return -EINVAL;
  }
  return table;
}

/**
 * Entries the table of a bitmap of `granularity_bits` over the whole image must have: the
 * bitmap serialized in 64-bit words, in clusters. QEMU: the `tab_size` of `load_bitmap_data`.
 */
function bitmap_table_entries_needed(s: BDRVQcow2State, len: number, granularity_bits: number): number {
  if (len === 0) return 0;
  const words = Math.floor((len - 1) / 2 ** granularity_bits / 64) + 1;
  return Math.ceil((words * 8) / s.cluster_size);
}

/**
 * Writes the directory of `list` back where it is, after checking every entry again. QEMU:
 * `bitmap_list_store` with `in_place`. The bitmaps autoclear bit must be clear while this runs,
 * so the overlap check ignores the directory itself. 0 or -errno.
 */
function* bitmap_list_store_in_place(bs: BlockDriverState, list: Qcow2Bitmap[]): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let dir_size = 0;
  for (const bm of list) dir_size += calc_dir_entry_size(bm.name_bytes.length, 0);
  if (dir_size === 0 || dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) return -EINVAL;
  // A name with a NUL inside comes back shorter, so the directory no longer fits in place.
  if (s.bitmap_directory_size !== dir_size || s.bitmap_directory_offset === 0) return -EINVAL;
  const dir = new Uint8Array(dir_size);
  const dv = new DataView(dir.buffer);
  let pos = 0;
  for (const bm of list) {
    dv.setBigUint64(pos, BigInt(bm.table_offset));
    dv.setUint32(pos + 8, bm.table_size);
    dv.setUint32(pos + 12, bm.flags);
    dir[pos + 16] = BT_DIRTY_TRACKING_BITMAP;
    dir[pos + 17] = bm.granularity_bits;
    dv.setUint16(pos + 18, bm.name_bytes.length);
    dir.set(bm.name_bytes, pos + DIR_ENTRY_HEADER);
    const e: RawDirEntry = {
      table_offset: BigInt(bm.table_offset),
      table_size: bm.table_size,
      flags: bm.flags,
      type: BT_DIRTY_TRACKING_BITMAP,
      granularity_bits: bm.granularity_bits,
      name_size: bm.name_bytes.length,
    };
    if (check_dir_entry(bs, e) < 0) return -EINVAL;
    pos += calc_dir_entry_size(bm.name_bytes.length, 0);
  }
  let ret = yield* qcow2_pre_write_overlap_check(bs, QCOW2_OL_BITMAP_DIRECTORY, s.bitmap_directory_offset, dir_size, false);
  if (ret < 0) return ret;
  ret = yield* bdrv_co_pwrite(bs.file!, s.bitmap_directory_offset, dir_size, dir, 0);
  return ret < 0 ? ret : 0;
}

/** The header, written and flushed. QEMU: `update_header_sync`. */
function* update_header_sync(bs: BlockDriverState): CoroutineFn<number> {
  const ret = yield* qcow2_update_header(bs);
  if (ret < 0) return ret;
  return yield* bdrv_co_flush(bs.file!.bs);
}

/**
 * Rewrites the directory in place with the flags of `list`. QEMU:
 * `update_ext_header_and_dir_in_place`. The order makes a crash at any point safe: first the
 * header without the bitmaps autoclear bit (flushed), so a torn directory is never trusted;
 * then the directory (flushed with a second header write); then the bit again (flushed). A
 * crash in between leaves the bit clear: the next writer drops the extension and its clusters
 * leak, which `qemu-img check -r leaks` repairs. 0 or -errno.
 */
function* update_ext_header_and_dir_in_place(bs: BlockDriverState, list: Qcow2Bitmap[]): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (!(s.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) || list.length === 0 || list.length !== s.nb_bitmaps) return -EINVAL;
  s.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
  let ret = yield* update_header_sync(bs);
  if (ret < 0) return ret;
  ret = yield* bitmap_list_store_in_place(bs, list);
  if (ret < 0) return ret;
  ret = yield* update_header_sync(bs);
  if (ret < 0) return ret;
  s.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
  return yield* update_header_sync(bs);
}

/**
 * What QEMU's open does with persistent bitmaps, minus keeping them in memory. QEMU:
 * `qcow2_load_dirty_bitmaps`. Validates the directory, and for each bitmap not in use its
 * name (no duplicate), its table entries and the table's size; then, if `can_write` and some
 * bitmap is not yet IN_USE, marks them all IN_USE on disk (`update_ext_header_and_dir_in_place`).
 * aioco does not track dirty bits, so a bitmap it opened read-write is inconsistent from then on;
 * QEMU, seeing IN_USE, treats it so (it skips its data and `qemu-img info` shows `in-use`).
 * Returns whether the header was rewritten; throws QemuError with QEMU's messages (the open
 * then fails, as in QEMU). Must run with `s.lock` held. Reads the bitmap tables but not the
 * bitmap data clusters (QEMU reads those too; only an I/O error there would differ).
 */
export function* qcow2_load_dirty_bitmaps(bs: BlockDriverState, can_write: boolean): CoroutineFn<boolean> {
  const s = bs.opaque as BDRVQcow2State;
  if (s.nb_bitmaps === 0) return false;
  const list = yield* bitmap_list_load(bs, s.bitmap_directory_offset, s.bitmap_directory_size);
  const len = bs.total_sectors * BDRV_SECTOR_SIZE;
  const names = new Set<string>();
  let needs_update = false;
  for (const bm of list) {
    const key = bm.name_bytes.join(',');
    // QEMU skips an in-use bitmap whose name it already has (a migration leftover).
    if (bm.flags & BME_FLAG_IN_USE && names.has(key)) continue;
    if (names.has(key)) throw new QemuError(`Bitmap already exists: ${bm.name}`);
    names.add(key);
    if (bm.flags & BME_FLAG_IN_USE) continue;
    const table = yield* bitmap_table_load(bs, bm);
    if (typeof table === 'number') {
      throw new QemuError(`Could not read bitmap_table table from image for bitmap '${bm.name}': ${strerror(-table)}`);
    }
    const tab_size = bitmap_table_entries_needed(s, len, bm.granularity_bits);
    if (tab_size !== bm.table_size || tab_size > BME_MAX_TABLE_SIZE) {
      throw new QemuError(`Could not read bitmap '${bm.name}' from image: ${strerror(EINVAL)}`);
    }
    bm.flags |= BME_FLAG_IN_USE;
    needs_update = true;
  }
  if (!needs_update || !can_write) return false;
  const ret = yield* update_ext_header_and_dir_in_place(bs, list);
  if (ret < 0) throw new QemuError(`Can't update bitmap directory: ${strerror(-ret)}`);
  return true;
}

/**
 * The bitmaps `qemu-img info` lists: directory order, flags `in-use` then `auto`, members in
 * the order qemu-img prints them. QEMU: `qcow2_get_bitmap_info_list`. Reads the directory
 * (read-only); null when the image has no bitmaps (QEMU then omits the `bitmaps` key, which
 * also happens when the autoclear bit was clear at open: the extension is ignored). Throws
 * QemuError when the directory cannot be read or parsed.
 */
export function* qcow2_get_bitmap_info_list(bs: BlockDriverState): CoroutineFn<Qcow2BitmapInfo[] | null> {
  const s = bs.opaque as BDRVQcow2State;
  if (s.nb_bitmaps === 0) return null;
  const list = yield* bitmap_list_load(bs, s.bitmap_directory_offset, s.bitmap_directory_size);
  return list.map((bm) => {
    const flags: string[] = [];
    if (bm.flags & BME_FLAG_IN_USE) flags.push('in-use');
    if (bm.flags & BME_FLAG_AUTO) flags.push('auto');
    return { flags, name: bm.name, granularity: 2 ** bm.granularity_bits };
  });
}

/**
 * Adds the bitmap directory, every bitmap table and every bitmap data cluster to the in-memory
 * refcounts of `qemu-img check`. QEMU: `qcow2_check_bitmaps_refcounts`. A directory that cannot
 * be loaded, or a table that cannot be read or has an invalid entry, counts as one corruption
 * and ends the walk (-EINVAL for the directory, the table's error otherwise), as in QEMU.
 * Does nothing when the image has no (valid) bitmaps extension.
 */
export function* qcow2_check_bitmaps_refcounts(bs: BlockDriverState, res: BdrvCheckResult, imrt: Qcow2Imrt): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (!s.nb_bitmaps) return 0;

  let ret = qcow2_inc_refcounts_imrt(bs, res, imrt, s.bitmap_directory_offset, s.bitmap_directory_size);
  if (ret < 0) return ret;

  let list: Qcow2Bitmap[];
  try {
    list = yield* bitmap_list_load(bs, s.bitmap_directory_offset, s.bitmap_directory_size);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    res.corruptions++;
    return -EINVAL;
  }

  for (const bm of list) {
    ret = qcow2_inc_refcounts_imrt(bs, res, imrt, bm.table_offset, bm.table_size * 8);
    if (ret < 0) return ret;
    const table = yield* bitmap_table_load(bs, bm);
    if (typeof table === 'number') {
      res.corruptions++;
      return table;
    }
    for (const entry of table) {
      const offset = Number(entry & BME_TABLE_ENTRY_OFFSET_MASK);
      if (!offset) continue;
      ret = qcow2_inc_refcounts_imrt(bs, res, imrt, offset, s.cluster_size);
      if (ret < 0) return ret;
    }
  }
  return 0;
}
