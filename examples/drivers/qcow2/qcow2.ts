/**
 * The `qcow2` format driver (QEMU 7.2: block/qcow2.c): probe, open with QEMU's validation,
 * header rewriting that keeps unknown fields and extensions, the dirty and corrupt bits, and the
 * guest I/O path (reads, allocating writes, zero writes, discard, compressed clusters, block
 * status, flush, truncate). Mapping and allocation live in qcow2-cluster.ts, refcounts in
 * qcow2-refcount.ts, the metadata caches in qcow2-cache.ts, snapshots in qcow2-snapshot.ts,
 * image creation in qcow2-create.ts.
 *
 * Locking: `s.lock` (a CoMutex) protects metadata; data is read and written outside it, so
 * requests to different clusters run in parallel. Writes to clusters being allocated by another
 * request wait for that allocation (QCowL2Meta.dependent_requests).
 *
 * Not supported (refused cleanly): encryption, external data files, zstd compression, shrinking.
 *
 * Importing this module registers the driver.
 */
import { fileURLToPath } from 'node:url';
import {
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_RECURSE,
  BDRV_BLOCK_ZERO,
  BDRV_CHILD_IMAGE,
  BDRV_CHILD_PRIMARY,
  BDRV_FIX_ERRORS,
  BDRV_FIX_LEAKS,
  BDRV_O_CHECK,
  BDRV_O_INACTIVE,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_ZERO_WRITE,
  BDRV_SECTOR_SIZE,
  CoMutex,
  CoQueue,
  qemu_co_queue_next,
  qemu_co_queue_wait,
  EAGAIN,
  EINVAL,
  EIO,
  ENOMEM,
  ENOSPC,
  ENOTSUP,
  QEMUIOVector,
  QemuError,
  aio_co_enter,
  aio_get_thread_pool,
  aio_task_pool_new,
  aio_task_pool_start_task,
  aio_task_pool_status,
  aio_task_pool_wait_all,
  bdrv_co_block_status_above,
  bdrv_co_flush,
  bdrv_co_pread,
  bdrv_co_preadv_part,
  bdrv_co_pwrite,
  bdrv_co_pwrite_sync,
  bdrv_co_pwritev_part,
  bdrv_co_pwrite_zeroes,
  bdrv_co_truncate,
  bdrv_co_debug_event,
  bdrv_dec_in_flight,
  bdrv_getlength,
  bdrv_get_allocated_file_size,
  bdrv_inc_in_flight,
  bdrv_open_child,
  bdrv_poll_co,
  bdrv_register,
  qemu_blockalign,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_queue_restart_all,
  qemu_coroutine_create,
  qemu_iovec_from_buf,
  qemu_iovec_init_buf,
  qemu_iovec_memset,
  qemu_iovec_subvec_niov,
  qemu_iovec_to_buf,
  qemu_opt_get_size,
  qemu_vfree,
  strerror,
  thread_pool_func,
  thread_pool_submit_co,
  IOV_MAX,
  type AioTask,
  type AioTaskPool,
  type BlockDriver,
  type BlockDriverInfo,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
  type ImageInfoSpecific,
  type PreallocMode,
  type QEMUSnapshotInfo,
  warn_report,
  error_report,
  bdrv_check_result_new,
} from '../../../src/index.ts';
import {
  L1E_SIZE,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  QCOW2_AUTOCLEAR_MASK,
  QCOW2_COMPRESSION_TYPE_ZLIB,
  QCOW2_DISCARD_ALWAYS,
  QCOW2_DISCARD_MAX,
  QCOW2_DISCARD_NEVER,
  QCOW2_DISCARD_OTHER,
  QCOW2_DISCARD_REQUEST,
  QCOW2_DISCARD_SNAPSHOT,
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_BITMAPS,
  QCOW2_EXT_MAGIC_CRYPTO_HEADER,
  QCOW2_EXT_MAGIC_DATA_FILE,
  QCOW2_EXT_MAGIC_END,
  QCOW2_EXT_MAGIC_FEATURE_TABLE,
  QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_CORRUPT,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_DIRTY,
  QCOW2_INCOMPAT_EXTL2,
  QCOW2_INCOMPAT_MASK,
  QCOW2_MAX_BITMAPS,
  QCOW2_OL_ALL,
  QCOW2_OL_CACHED,
  QCOW2_OL_CONSTANT,
  QCOW2_OL_MAX_BITNR,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW_CRYPT_AES,
  QCOW_CRYPT_LUKS,
  QCOW_CRYPT_NONE,
  QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER,
  QCOW_MAGIC,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_MAX_SNAPSHOTS,
  QCow2SubclusterType,
  l2_entry_size,
  offset_into_cluster,
  offset_into_subcluster,
  qcow2_need_accurate_refcounts,
  size_to_l1,
  type BDRVQcow2State,
  type QCowL2Meta,
  type Qcow2UnknownHeaderExtension,
  qcow2_parse_compressed_l2_entry,
  qcow2_validate_table,
} from './qcow2-state.ts';
import { qcow2_cache_create, qcow2_cache_destroy, qcow2_cache_flush, qcow2_cache_write } from './qcow2-cache.ts';
import {
  qcow2_alloc_cluster_abort,
  qcow2_alloc_cluster_link_l2,
  qcow2_alloc_compressed_cluster_offset,
  qcow2_alloc_host_offset,
  qcow2_cluster_discard,
  qcow2_get_host_offset,
  qcow2_grow_l1_table,
  qcow2_subcluster_zeroize,
  type Qcow2AllocOut,
  type Qcow2HostOffsetOut,
} from './qcow2-cluster.ts';
import { qcow2_co_check, qcow2_co_check_locked, qcow2_get_refcount, qcow2_pre_write_overlap_check, qcow2_refcount_close, qcow2_refcount_init } from './qcow2-refcount.ts';
import { qcow2_free_snapshots, qcow2_read_snapshots } from './qcow2-snapshot.ts';
import { qcow2_get_bitmap_info_list, qcow2_load_dirty_bitmaps } from './qcow2-bitmap.ts';
import { qcow2_co_create_opts, qcow2_create_opts_list } from './qcow2-create.ts';

/** Tasks a request splits into that may run at once. QEMU: QCOW2_MAX_WORKERS. */
const QCOW2_MAX_WORKERS = 8;
/** Compression/decompression jobs in the thread pool at once. QEMU: QCOW2_MAX_THREADS. */
const QCOW2_MAX_THREADS = 4;
/** QEMU's DEFAULT_L2_CACHE_MAX_SIZE on Linux (32 MiB). */
const DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024;
const MIN_L2_CACHE_SIZE = 2; // cache entries
const MIN_REFCOUNT_CACHE_SIZE = 4; // clusters
/** QEMU's DEFAULT_CACHE_CLEAN_INTERVAL on Linux (seconds). */
const DEFAULT_CACHE_CLEAN_INTERVAL = 600;
/** sizeof(QCowHeader) in QEMU 7.2 (104 bytes of v3 fields + compression_type + padding). */
const QCOW_HEADER_SIZE = 112;
/** sizeof(QCowSnapshotHeader). */
const QCOW_SNAPSHOT_HEADER_SIZE = 40;
/** Largest bitmap directory QEMU accepts. QEMU: QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;

// Header field offsets (QCowHeader).
const HDR_INCOMPATIBLE_FEATURES = 72;
const HDR_SIZE = 24;

/** The qcow2 runtime options (QEMU: qcow2_runtime_opts), all consumed by qcow2_update_options. */
const OVERLAP_BOOL_OPTION_NAMES = [
  'overlap-check.main-header',
  'overlap-check.active-l1',
  'overlap-check.active-l2',
  'overlap-check.refcount-table',
  'overlap-check.refcount-block',
  'overlap-check.snapshot-table',
  'overlap-check.inactive-l1',
  'overlap-check.inactive-l2',
  'overlap-check.bitmap-directory',
];
const QCOW2_RUNTIME_OPTS = [
  'lazy-refcounts',
  'pass-discard-request',
  'pass-discard-snapshot',
  'pass-discard-other',
  'overlap-check',
  'overlap-check.template',
  ...OVERLAP_BOOL_OPTION_NAMES,
  'cache-size',
  'l2-cache-size',
  'l2-cache-entry-size',
  'refcount-cache-size',
  'cache-clean-interval',
  'encrypt.key-secret',
  'encrypt.format',
];

// ---------------------------------------------------------------------------------------------
// Small helpers

function be32(b: Uint8Array, o: number): number {
  return ((b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]) >>> 0;
}
function be64n(b: Uint8Array, o: number): bigint {
  return (BigInt(be32(b, o)) << 32n) | BigInt(be32(b, o + 4));
}
/** A be64 field as a number; values past 2^53 become Infinity-like huge numbers (caught by the checks). */
function be64(b: Uint8Array, o: number): number {
  return be32(b, o) * 0x100000000 + be32(b, o + 4);
}
function put32(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 24) & 0xff;
  b[o + 1] = (v >>> 16) & 0xff;
  b[o + 2] = (v >>> 8) & 0xff;
  b[o + 3] = v & 0xff;
}
function put64(b: Uint8Array, o: number, v: number | bigint): void {
  const n = BigInt(v);
  put32(b, o, Number((n >> 32n) & 0xffffffffn));
  put32(b, o + 4, Number(n & 0xffffffffn));
}

function optBool(options: Record<string, unknown>, name: string, defval: boolean): boolean {
  const v = options[name];
  if (v === undefined || v === null) return defval;
  if (v === true || v === 'on' || v === 'true') return true;
  if (v === false || v === 'off' || v === 'false') return false;
  throw new QemuError(`Parameter '${name}' expects 'on' or 'off'`);
}

function optNumber(options: Record<string, unknown>, name: string, defval: number): number {
  const v = options[name];
  if (v === undefined || v === null) return defval;
  const n = typeof v === 'number' ? v : Number(String(v));
  if (!Number.isSafeInteger(n) || n < 0) throw new QemuError(`Parameter '${name}' expects a number`);
  return n;
}

function isPow2(n: number): boolean {
  return n > 0 && (n & (n - 1)) === 0;
}

// ---------------------------------------------------------------------------------------------
// Probe, feature table

/**
 * Scores `buf` as qcow2: 100 for the magic with version >= 2, else 0. QEMU: `qcow2_probe`.
 * Surprise: versions above 3 still probe as qcow2 (open then refuses them).
 */
export function qcow2_probe(buf: Uint8Array, buf_size: number, _filename: string | null): number {
  if (buf_size >= 104 && buf.length >= 8 && be32(buf, 0) === QCOW_MAGIC && be32(buf, 4) >= 2) return 100;
  return 0;
}

interface Qcow2Feature {
  type: number;
  bit: number;
  name: string;
}

/** "Unsupported qcow2 feature(s): ..." with the names the image's feature table gives. */
function report_unsupported_feature(table: Qcow2Feature[] | null, mask: bigint): QemuError {
  const names: string[] = [];
  for (const f of table ?? []) {
    if (f.name === '') break;
    if (f.type === 0 && mask & (1n << BigInt(f.bit))) {
      names.push(f.name.slice(0, 46));
      mask &= ~(1n << BigInt(f.bit));
    }
  }
  if (mask) names.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return new QemuError(`Unsupported qcow2 feature(s): ${names.join(', ')}`);
}

function decode_feature_table(data: Uint8Array): Qcow2Feature[] {
  const out: Qcow2Feature[] = [];
  for (let o = 0; o + 48 <= data.length; o += 48) {
    let end = o + 2;
    while (end < o + 48 && data[end] !== 0) end++;
    out.push({ type: data[o], bit: data[o + 1], name: new TextDecoder('latin1').decode(data.subarray(o + 2, end)) });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Header extensions

interface ReadExtResult {
  feature_table: Qcow2Feature[] | null;
  need_update_header: boolean;
}

/**
 * Reads the header extensions in `[start_offset, end_offset)`. QEMU: `qcow2_read_extensions`.
 * Fills the backing format, bitmaps extension and unknown extensions (kept for header
 * rewrites); throws QemuError with QEMU's messages. With `want_feature_table` it only collects
 * the feature table (errors then end the walk quietly, as QEMU ignores them there).
 */
function* qcow2_read_extensions(
  bs: BlockDriverState,
  start_offset: number,
  end_offset: number,
  want_feature_table: boolean,
  flags: number,
): CoroutineFn<ReadExtResult> {
  const s = bs.opaque as BDRVQcow2State;
  const res: ReadExtResult = { feature_table: null, need_update_header: false };
  let offset = start_offset;
  const hdr = new Uint8Array(8);
  while (offset < end_offset) {
    let ret = yield* bdrv_co_pread(bs.file!, offset, 8, hdr, 0);
    if (ret < 0) {
      if (want_feature_table) return res;
      throw new QemuError(`qcow2_read_extension: ERROR: pread fail from offset ${offset}: ${strerror(-ret)}`);
    }
    const magic = be32(hdr, 0);
    const len = be32(hdr, 4);
    offset += 8;
    if (offset > end_offset || len > end_offset - offset) {
      if (want_feature_table) return res;
      throw new QemuError('Header extension too large');
    }
    const data = new Uint8Array(len);
    if (len) {
      ret = yield* bdrv_co_pread(bs.file!, offset, len, data, 0);
      if (ret < 0) {
        if (want_feature_table) return res;
        throw new QemuError(`ERROR: Could not read header extension: ${strerror(-ret)}`);
      }
    }
    switch (magic) {
      case QCOW2_EXT_MAGIC_END:
        return res;
      case QCOW2_EXT_MAGIC_BACKING_FORMAT:
        if (want_feature_table) break;
        if (len >= 16) throw new QemuError(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
        s.image_backing_format = new TextDecoder('latin1').decode(data);
        bs.backing_format = s.image_backing_format;
        break;
      case QCOW2_EXT_MAGIC_FEATURE_TABLE:
        if (want_feature_table) res.feature_table = decode_feature_table(data);
        break;
      case QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        if (want_feature_table) break;
        if (s.crypt_method_header !== QCOW_CRYPT_LUKS) throw new QemuError('CRYPTO header extension only expected with LUKS encryption method');
        if (len !== 16) throw new QemuError(`CRYPTO header extension size ${len}, but expected size 16`);
        s.crypto_header_offset = be64(data, 0);
        break;
      case QCOW2_EXT_MAGIC_BITMAPS: {
        if (want_feature_table) break;
        if (len !== 24) throw new QemuError('bitmaps_ext: Invalid extension length');
        if (!(s.autoclear_features & 1n)) {
          // A program without bitmap support wrote the image: the bitmaps are stale; dropping
          // the extension from the header is what QEMU does.
          warn_report(
            s.qcow_version < 3
              ? 'This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent'
              : 'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent',
          );
          process.stderr.write("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.");
          res.need_update_header = true;
          break;
        }
        if (be32(data, 4) !== 0) throw new QemuError('bitmaps_ext: Reserved field is not zero');
        const nb_bitmaps = be32(data, 0);
        const dir_size = be64(data, 8);
        const dir_offset = be64(data, 16);
        if (nb_bitmaps > QCOW2_MAX_BITMAPS) {
          throw new QemuError(`bitmaps_ext: Image has ${nb_bitmaps} bitmaps, exceeding the QEMU supported maximum of ${QCOW2_MAX_BITMAPS}`);
        }
        if (nb_bitmaps === 0) throw new QemuError('found bitmaps extension with zero bitmaps');
        if (offset_into_cluster(s, dir_offset)) throw new QemuError('bitmaps_ext: invalid bitmap directory offset');
        if (dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
          throw new QemuError(`bitmaps_ext: bitmap directory size (${dir_size}) exceeds the maximum supported size (${QCOW2_MAX_BITMAP_DIRECTORY_SIZE})`);
        }
        s.nb_bitmaps = nb_bitmaps;
        s.bitmap_directory_offset = dir_offset;
        s.bitmap_directory_size = dir_size;
        break;
      }
      case QCOW2_EXT_MAGIC_DATA_FILE:
        if (want_feature_table) break;
        s.image_data_file = new TextDecoder('latin1').decode(data);
        break;
      default:
        if (want_feature_table) break;
        // Unknown extension: kept so a header rewrite preserves it. QEMU prepends to its list,
        // so a rewrite stores several unknown extensions in reverse order; so does aioco.
        s.unknown_header_ext.unshift({ magic, data });
        break;
    }
    offset += (len + 7) & ~7;
  }
  void flags;
  return res;
}

// ---------------------------------------------------------------------------------------------
// Header update, dirty and corrupt bits

function header_ext_add(buf: Uint8Array, pos: number, magic: number, data: Uint8Array): number {
  const ext_len = 8 + ((data.length + 7) & ~7);
  if (pos + ext_len > buf.length) return -ENOSPC;
  put32(buf, pos, magic);
  put32(buf, pos + 4, data.length);
  buf.set(data, pos + 8);
  return pos + ext_len;
}

const FEATURE_TABLE: Qcow2Feature[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

function encode_feature_table(): Uint8Array {
  const out = new Uint8Array(FEATURE_TABLE.length * 48);
  FEATURE_TABLE.forEach((f, i) => {
    out[i * 48] = f.type;
    out[i * 48 + 1] = f.bit;
    for (let j = 0; j < f.name.length; j++) out[i * 48 + 2 + j] = f.name.charCodeAt(j);
  });
  return out;
}

function latin1(str: string): Uint8Array {
  const b = new Uint8Array(str.length);
  for (let i = 0; i < str.length; i++) b[i] = str.charCodeAt(i) & 0xff;
  return b;
}

/**
 * Rewrites cluster 0: the header from the in-memory state, unknown header fields, then the
 * extensions (backing format, feature table for clusters > 4 KiB, bitmaps, unknown ones), the
 * end marker and the backing file name. QEMU: `qcow2_update_header`. 0 or -errno (-ENOSPC when
 * it does not fit in one cluster). Not synced: callers that need ordering flush afterwards.
 */
export function* qcow2_update_header(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const buflen = s.cluster_size;
  const buf = qemu_blockalign(bs, buflen);
  buf.fill(0);
  try {
    const header_length = QCOW_HEADER_SIZE + s.unknown_header_fields.length;
    const total_size = bs.total_sectors * BDRV_SECTOR_SIZE;
    const refcount_table_clusters = s.refcount_table_size / (s.cluster_size / 8);
    put32(buf, 0, QCOW_MAGIC);
    put32(buf, 4, s.qcow_version);
    put32(buf, 20, s.cluster_bits);
    put64(buf, 24, total_size);
    put32(buf, 32, s.crypt_method_header);
    put32(buf, 36, s.l1_size);
    put64(buf, 40, s.l1_table_offset);
    put64(buf, 48, s.refcount_table_offset);
    put32(buf, 56, refcount_table_clusters);
    put32(buf, 60, s.nb_snapshots);
    put64(buf, 64, s.snapshots_offset);
    let pos: number;
    if (s.qcow_version === 2) {
      pos = 72;
    } else if (s.qcow_version === 3) {
      put64(buf, 72, s.incompatible_features);
      put64(buf, 80, s.compatible_features);
      put64(buf, 88, s.autoclear_features);
      put32(buf, 96, s.refcount_order);
      put32(buf, 100, header_length);
      buf[104] = s.compression_type;
      pos = QCOW_HEADER_SIZE;
    } else {
      return -EINVAL;
    }
    if (s.unknown_header_fields.length) {
      if (pos + s.unknown_header_fields.length > buflen) return -ENOSPC;
      buf.set(s.unknown_header_fields, pos);
      pos += s.unknown_header_fields.length;
    }
    if (s.image_backing_format) {
      pos = header_ext_add(buf, pos, QCOW2_EXT_MAGIC_BACKING_FORMAT, latin1(s.image_backing_format));
      if (pos < 0) return pos;
    }
    if (s.qcow_version >= 3 && s.cluster_size > 4096) {
      pos = header_ext_add(buf, pos, QCOW2_EXT_MAGIC_FEATURE_TABLE, encode_feature_table());
      if (pos < 0) return pos;
    }
    if (s.nb_bitmaps > 0) {
      const b = new Uint8Array(24);
      put32(b, 0, s.nb_bitmaps);
      put64(b, 8, s.bitmap_directory_size);
      put64(b, 16, s.bitmap_directory_offset);
      pos = header_ext_add(buf, pos, QCOW2_EXT_MAGIC_BITMAPS, b);
      if (pos < 0) return pos;
    }
    for (const u of s.unknown_header_ext) {
      pos = header_ext_add(buf, pos, u.magic, u.data);
      if (pos < 0) return pos;
    }
    pos = header_ext_add(buf, pos, QCOW2_EXT_MAGIC_END, new Uint8Array(0));
    if (pos < 0) return pos;
    if (s.image_backing_file) {
      const name = latin1(s.image_backing_file);
      if (pos + name.length > buflen) return -ENOSPC;
      buf.set(name, pos);
      put64(buf, 8, pos);
      put32(buf, 16, name.length);
    }
    const ret = yield* bdrv_co_pwrite(bs.file!, 0, s.cluster_size, buf, 0);
    return ret < 0 ? ret : 0;
  } finally {
    qemu_vfree(buf);
  }
}

/**
 * Sets the dirty bit on disk (written and flushed) before the first metadata change that
 * postpones refcount updates (lazy refcounts). QEMU: `qcow2_mark_dirty`. The in-memory bit is
 * set only when the write succeeded. v3 only.
 */
export function* qcow2_mark_dirty(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (s.qcow_version < 3) throw new Error("qcow2_mark_dirty: Assertion 's->qcow_version >= 3' failed");
  if (s.incompatible_features & QCOW2_INCOMPAT_DIRTY) return 0;
  const val = new Uint8Array(8);
  put64(val, 0, s.incompatible_features | QCOW2_INCOMPAT_DIRTY);
  const ret = yield* bdrv_co_pwrite_sync(bs.file!, HDR_INCOMPATIBLE_FEATURES, 8, val, 0);
  if (ret < 0) return ret;
  s.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
  return 0;
}

/**
 * Writes the caches, flushes, then clears the dirty bit in the header. QEMU: `qcow2_mark_clean`.
 * Only safe without concurrent writers (close, check, reopen).
 */
export function* qcow2_mark_clean(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (s.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
    s.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
    const ret = yield* qcow2_flush_caches(bs);
    if (ret < 0) return ret;
    return yield* qcow2_update_header(bs);
  }
  return 0;
}

/** Sets the corrupt bit and rewrites the header. QEMU: `qcow2_mark_corrupt`. */
export function* qcow2_mark_corrupt(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  s.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
  return yield* qcow2_update_header(bs);
}

function* mark_corrupt_co(bs: BlockDriverState): CoroutineFn<void> {
  try {
    yield* qcow2_mark_corrupt(bs);
  } finally {
    bdrv_dec_in_flight(bs);
  }
}

/**
 * Reports inconsistent metadata on stderr. If `fatal` and the node is writable: "qcow2: Marking
 * image as corrupt: <message>; further corruption events will be suppressed", sets the corrupt
 * bit in the header and makes the node unusable (`bs.drv = null`, every later request fails
 * with -ENOMEDIUM); otherwise "qcow2: Image is corrupt: <message>; further non-fatal corruption
 * events will be suppressed". QEMU: `qcow2_signal_corruption` (`offset`/`size` go into QEMU's
 * QMP event, which aioco does not have). Surprise: it returns at once; the header write runs in
 * its own coroutine (tracked as in-flight, so a drain waits for it).
 */
export function qcow2_signal_corruption(bs: BlockDriverState, fatal: boolean, offset: number, size: number, message: string): void {
  const s = bs.opaque as BDRVQcow2State | null;
  if (!s) return;
  fatal = fatal && !bs.read_only;
  if (s.signaled_corruption && (!fatal || s.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) return;
  if (fatal) {
    process.stderr.write(`qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed\n`);
  } else {
    process.stderr.write(`qcow2: Image is corrupt: ${message}; further non-fatal corruption events will be suppressed\n`);
  }
  void offset;
  void size;
  s.signaled_corruption = true;
  if (fatal) {
    s.incompatible_features |= QCOW2_INCOMPAT_CORRUPT;
    bdrv_inc_in_flight(bs);
    const co = qemu_coroutine_create(mark_corrupt_co, bs, 'qcow2_mark_corrupt');
    aio_co_enter(bs.aio_context, co);
    bs.drv = null;
  }
}

// ---------------------------------------------------------------------------------------------
// Options, open, close

/**
 * Applies the runtime options: cache sizes, lazy refcounts, overlap checks, discard
 * passthrough. QEMU: `qcow2_update_options` (prepare + commit). Consumes the options it knows
 * from `options`; throws QemuError with QEMU's messages.
 */
function* qcow2_update_options(bs: BlockDriverState, options: Record<string, unknown>, flags: number): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  // Cache sizes (QEMU: read_cache_sizes).
  const virtual_disk_size = bs.total_sectors * BDRV_SECTOR_SIZE;
  const max_l2_entries = Math.ceil(virtual_disk_size / s.cluster_size);
  const max_l2_cache = Math.ceil((max_l2_entries * l2_entry_size(s)) / s.cluster_size) * s.cluster_size;
  const min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * s.cluster_size;
  const has = (k: string): boolean => options[k] !== undefined && options[k] !== null;
  const combined_set = has('cache-size');
  const l2_set = has('l2-cache-size');
  const rc_set = has('refcount-cache-size');
  const entry_set = has('l2-cache-entry-size');
  const combined = qemu_opt_get_size(options, 'cache-size', 0);
  const l2_max_setting = qemu_opt_get_size(options, 'l2-cache-size', DEFAULT_L2_CACHE_MAX_SIZE);
  let refcount_cache_size = qemu_opt_get_size(options, 'refcount-cache-size', 0);
  let l2_cache_entry_size = qemu_opt_get_size(options, 'l2-cache-entry-size', s.cluster_size);
  let l2_cache_size = Math.min(max_l2_cache, l2_max_setting);
  if (combined_set) {
    if (l2_set && rc_set) throw new QemuError('cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
    if (l2_set && l2_max_setting > combined) throw new QemuError('l2-cache-size may not exceed cache-size');
    if (refcount_cache_size > combined) throw new QemuError('refcount-cache-size may not exceed cache-size');
    if (l2_set) refcount_cache_size = combined - l2_cache_size;
    else if (rc_set) l2_cache_size = combined - refcount_cache_size;
    else if (combined >= max_l2_cache + min_refcount_cache) {
      l2_cache_size = max_l2_cache;
      refcount_cache_size = combined - l2_cache_size;
    } else {
      refcount_cache_size = Math.min(combined, min_refcount_cache);
      l2_cache_size = combined - refcount_cache_size;
    }
  }
  // A cache too small for the whole disk uses 4 KiB slices: cheaper misses.
  if (l2_cache_size < max_l2_cache && !entry_set) l2_cache_entry_size = Math.min(s.cluster_size, 4096);
  if (l2_cache_entry_size < 1 << MIN_CLUSTER_BITS || l2_cache_entry_size > s.cluster_size || !isPow2(l2_cache_entry_size)) {
    throw new QemuError(`L2 cache entry size must be a power of two between ${1 << MIN_CLUSTER_BITS} and the cluster size (${s.cluster_size})`);
  }
  let l2_entries = Math.floor(l2_cache_size / l2_cache_entry_size);
  if (l2_entries < MIN_L2_CACHE_SIZE) l2_entries = MIN_L2_CACHE_SIZE;
  if (l2_entries > 0x7fffffff) throw new QemuError('L2 cache size too big');
  let rc_entries = Math.floor(refcount_cache_size / s.cluster_size);
  if (rc_entries < MIN_REFCOUNT_CACHE_SIZE) rc_entries = MIN_REFCOUNT_CACHE_SIZE;
  if (rc_entries > 0x7fffffff) throw new QemuError('Refcount cache size too big');

  const cache_clean_interval = optNumber(options, 'cache-clean-interval', DEFAULT_CACHE_CLEAN_INTERVAL);
  if (cache_clean_interval > 0xffffffff) throw new QemuError('Cache clean interval too big');

  const use_lazy_refcounts = optBool(options, 'lazy-refcounts', (s.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n);
  if (use_lazy_refcounts && s.qcow_version < 3) {
    throw new QemuError('Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
  }

  const ov = options['overlap-check'] as string | undefined;
  const ovt = options['overlap-check.template'] as string | undefined;
  if (ov !== undefined && ovt !== undefined && String(ov) !== String(ovt)) {
    throw new QemuError(`Conflicting values for qcow2 options 'overlap-check' ('${ov}') and 'overlap-check.template' ('${ovt}')`);
  }
  const ovname = String(ov ?? ovt ?? 'cached');
  let template: number;
  if (ovname === 'none') template = 0;
  else if (ovname === 'constant') template = QCOW2_OL_CONSTANT;
  else if (ovname === 'cached') template = QCOW2_OL_CACHED;
  else if (ovname === 'all') template = QCOW2_OL_ALL;
  else {
    throw new QemuError(
      `Unsupported value '${ovname}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all`,
    );
  }
  let overlap_check = 0;
  for (let i = 0; i < QCOW2_OL_MAX_BITNR; i++) {
    if (optBool(options, OVERLAP_BOOL_OPTION_NAMES[i], (template & (1 << i)) !== 0)) overlap_check |= 1 << i;
  }
  const passthrough: boolean[] = new Array(QCOW2_DISCARD_MAX).fill(false);
  passthrough[QCOW2_DISCARD_NEVER] = false;
  passthrough[QCOW2_DISCARD_ALWAYS] = true;
  passthrough[QCOW2_DISCARD_REQUEST] = optBool(options, 'pass-discard-request', (flags & BDRV_O_UNMAP) !== 0);
  passthrough[QCOW2_DISCARD_SNAPSHOT] = optBool(options, 'pass-discard-snapshot', true);
  passthrough[QCOW2_DISCARD_OTHER] = optBool(options, 'pass-discard-other', false);

  const encryptfmt = options['encrypt.format'];
  if (s.crypt_method_header === QCOW_CRYPT_NONE && encryptfmt !== undefined) {
    throw new QemuError(`No encryption in image header, but options specified format '${String(encryptfmt)}'`);
  }
  if (s.crypt_method_header !== QCOW_CRYPT_NONE && s.crypt_method_header !== QCOW_CRYPT_AES && s.crypt_method_header !== QCOW_CRYPT_LUKS) {
    throw new QemuError(`Unsupported encryption method ${s.crypt_method_header}`);
  }

  // Going from lazy to accurate refcounts: the postponed updates must reach the disk first.
  if (s.l2_table_cache && s.use_lazy_refcounts && !use_lazy_refcounts) {
    const r = yield* qcow2_mark_clean(bs);
    if (r < 0) throw new QemuError(`Failed to disable lazy refcounts: ${strerror(-r)}`);
  }
  if (s.l2_table_cache) {
    let r = yield* qcow2_cache_flush(bs, s.l2_table_cache);
    if (r) throw new QemuError(`Failed to flush the L2 table cache: ${strerror(-r)}`);
    r = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
    if (r) throw new QemuError(`Failed to flush the refcount block cache: ${strerror(-r)}`);
    qcow2_cache_destroy(s.l2_table_cache);
    qcow2_cache_destroy(s.refcount_block_cache);
  }
  s.l2_slice_size = l2_cache_entry_size / l2_entry_size(s);
  s.l2_table_cache = qcow2_cache_create(bs, l2_entries, l2_cache_entry_size);
  s.refcount_block_cache = qcow2_cache_create(bs, rc_entries, s.cluster_size);
  s.overlap_check = overlap_check;
  s.use_lazy_refcounts = use_lazy_refcounts;
  s.discard_passthrough = passthrough;
  // aioco has no cache-clean timer: unused entries stay until evicted.
  s.cache_clean_interval = cache_clean_interval;
  for (const k of QCOW2_RUNTIME_OPTS) delete options[k];
}

/** `qcow2_validate_table` at open: its message becomes the QemuError open fails with. */
function validate_table_or_throw(s: BDRVQcow2State, offset: number, entries: number, entry_len: number, max_size_bytes: number, table_name: string): void {
  const err = { msg: '' };
  if (qcow2_validate_table(s, offset, entries, entry_len, max_size_bytes, table_name, err) < 0) throw new QemuError(err.msg);
}

function new_state(): BDRVQcow2State {
  return {
    cluster_bits: 0,
    cluster_size: 0,
    l2_slice_size: 0,
    subcluster_bits: 0,
    subcluster_size: 0,
    subclusters_per_cluster: 1,
    l2_bits: 0,
    l2_size: 0,
    l1_size: 0,
    l1_vm_state_index: 0,
    refcount_block_bits: 0,
    refcount_block_size: 0,
    csize_shift: 0,
    csize_mask: 0,
    cluster_offset_mask: 0n,
    l1_table_offset: 0,
    l1_table: new BigUint64Array(0),
    l2_table_cache: null as never,
    refcount_block_cache: null as never,
    refcount_table: new Float64Array(0),
    refcount_table_offset: 0,
    refcount_table_size: 0,
    max_refcount_table_index: 0,
    free_cluster_index: 0,
    free_byte_offset: 0,
    refcount_order: 4,
    refcount_bits: 16,
    refcount_max: 0xffff,
    get_refcount: () => 0,
    set_refcount: () => undefined,
    lock: new CoMutex(),
    cluster_allocs: new Set<QCowL2Meta>(),
    flags: 0,
    qcow_version: 3,
    use_lazy_refcounts: false,
    incompatible_features: 0n,
    compatible_features: 0n,
    autoclear_features: 0n,
    compression_type: QCOW2_COMPRESSION_TYPE_ZLIB,
    crypt_method_header: 0,
    header_length: 0,
    snapshots: [],
    nb_snapshots: 0,
    snapshots_offset: 0,
    snapshots_size: 0,
    nb_bitmaps: 0,
    bitmap_directory_size: 0,
    bitmap_directory_offset: 0,
    overlap_check: 0,
    signaled_corruption: false,
    discard_passthrough: new Array(QCOW2_DISCARD_MAX).fill(false),
    cache_clean_interval: 0,
    unknown_header_fields: new Uint8Array(0),
    unknown_header_ext: [] as Qcow2UnknownHeaderExtension[],
    image_backing_file: null,
    image_backing_format: null,
    metadata_preallocation_checked: false,
    metadata_preallocation: false,
  };
}

/** Frees what a failed or finished open allocated (caches, refcount state, snapshots). */
function qcow2_free_state(bs: BlockDriverState): void {
  const s = bs.opaque as BDRVQcow2State;
  qcow2_free_snapshots(bs);
  qcow2_refcount_close(bs);
  if (s.l2_table_cache) qcow2_cache_destroy(s.l2_table_cache);
  if (s.refcount_block_cache) qcow2_cache_destroy(s.refcount_block_cache);
  s.l2_table_cache = null as never;
  s.refcount_block_cache = null as never;
  s.l1_table = new BigUint64Array(0);
}

/**
 * The body of open, run as a coroutine with `s.lock` held. QEMU: `qcow2_do_open`. Reads and
 * validates the header (QEMU's messages, section 6.10 of the reference), extensions, L1 table,
 * refcounts and snapshots; repairs a dirty image on a read-write open. Throws QemuError.
 * Nothing is written to the file unless the open succeeds up to marking persistent bitmaps
 * IN_USE (read-write only), the header update (clearing unknown autoclear bits) or the dirty
 * repair.
 */
export function* qcow2_do_open(bs: BlockDriverState, options: Record<string, unknown>, flags: number): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  const h = new Uint8Array(QCOW_HEADER_SIZE);
  // A file shorter than the header reads as zeroes past EOF (the magic check then fails).
  let ret = yield* bdrv_co_pread(bs.file!, 0, QCOW_HEADER_SIZE, h, 0);
  if (ret < 0) throw new QemuError(`Could not read qcow2 header: ${strerror(-ret)}`);
  const magic = be32(h, 0);
  const version = be32(h, 4);
  const backing_file_offset = be64(h, 8);
  const backing_file_size = be32(h, 16);
  const cluster_bits = be32(h, 20);
  const size = be64(h, 24);
  const crypt_method = be32(h, 32);
  const l1_size = be32(h, 36);
  const l1_table_offset = be64(h, 40);
  const refcount_table_offset = be64(h, 48);
  const refcount_table_clusters = be32(h, 56);
  const nb_snapshots = be32(h, 60);
  const snapshots_offset = be64(h, 64);

  if (magic !== QCOW_MAGIC) throw new QemuError('Image is not in qcow2 format');
  if (version < 2 || version > 3) throw new QemuError(`Unsupported qcow2 version ${version}`);
  s.qcow_version = version;
  if (cluster_bits < MIN_CLUSTER_BITS || cluster_bits > MAX_CLUSTER_BITS) throw new QemuError(`Unsupported cluster size: 2^${cluster_bits}`);
  s.cluster_bits = cluster_bits;
  s.cluster_size = 1 << cluster_bits;

  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcount_order = 4;
  let header_length = 72;
  if (version === 3) {
    incompatible = be64n(h, 72);
    compatible = be64n(h, 80);
    autoclear = be64n(h, 88);
    refcount_order = be32(h, 96);
    header_length = be32(h, 100);
    if (header_length < 104) throw new QemuError('qcow2 header too short');
  }
  if (header_length > s.cluster_size) throw new QemuError('qcow2 header exceeds cluster size');
  s.header_length = header_length;
  if (header_length > QCOW_HEADER_SIZE) {
    s.unknown_header_fields = new Uint8Array(header_length - QCOW_HEADER_SIZE);
    ret = yield* bdrv_co_pread(bs.file!, QCOW_HEADER_SIZE, s.unknown_header_fields.length, s.unknown_header_fields, 0);
    if (ret < 0) throw new QemuError(`Could not read unknown qcow2 header fields: ${strerror(-ret)}`);
  }
  if (backing_file_offset > s.cluster_size) throw new QemuError('Invalid backing file offset');
  const ext_end = backing_file_offset ? backing_file_offset : s.cluster_size;

  s.incompatible_features = incompatible;
  s.compatible_features = compatible;
  s.autoclear_features = autoclear;
  // The compression type byte exists only in headers long enough to hold it.
  s.compression_type = header_length > 104 ? h[104] : QCOW2_COMPRESSION_TYPE_ZLIB;
  if (s.compression_type !== QCOW2_COMPRESSION_TYPE_ZLIB) {
    if (s.compression_type === 1) {
      if (!(incompatible & QCOW2_INCOMPAT_COMPRESSION)) throw new QemuError('qcow2: Compression type incompatible feature bit must be set');
      throw new QemuError('qcow2: unknown compression type: 1');
    }
    throw new QemuError(`qcow2: unknown compression type: ${s.compression_type}`);
  }
  if (incompatible & QCOW2_INCOMPAT_COMPRESSION) throw new QemuError('qcow2: Compression type incompatible feature bit must not be set');

  if (incompatible & ~QCOW2_INCOMPAT_MASK) {
    const r = yield* qcow2_read_extensions(bs, header_length, ext_end, true, flags);
    throw report_unsupported_feature(r.feature_table, incompatible & ~QCOW2_INCOMPAT_MASK);
  }
  if (incompatible & QCOW2_INCOMPAT_CORRUPT && flags & BDRV_O_RDWR && !(flags & BDRV_O_CHECK)) {
    throw new QemuError('qcow2: Image is corrupt; cannot be opened read/write');
  }

  s.subclusters_per_cluster = incompatible & QCOW2_INCOMPAT_EXTL2 ? QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER : 1;
  s.subcluster_size = s.cluster_size / s.subclusters_per_cluster;
  s.subcluster_bits = Math.log2(s.subcluster_size);
  if (s.subcluster_size < 1 << MIN_CLUSTER_BITS) throw new QemuError(`Unsupported subcluster size: ${s.subcluster_size}`);

  if (refcount_order > 6) throw new QemuError('Reference count entry width too large; may not exceed 64 bits');
  s.refcount_order = refcount_order;
  s.refcount_bits = 1 << refcount_order;
  s.refcount_max = s.refcount_bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** s.refcount_bits - 1;

  s.crypt_method_header = crypt_method;
  if (crypt_method) {
    // aioco has no encryption: refuse instead of returning ciphertext.
    if (crypt_method !== QCOW_CRYPT_AES && crypt_method !== QCOW_CRYPT_LUKS) throw new QemuError(`Unsupported encryption method ${crypt_method}`);
    throw new QemuError('aioco: encrypted qcow2 images are not supported');
  }

  s.l2_bits = s.cluster_bits - Math.log2(l2_entry_size(s));
  s.l2_size = 1 << s.l2_bits;
  s.refcount_block_bits = s.cluster_bits - (s.refcount_order - 3);
  s.refcount_block_size = 2 ** s.refcount_block_bits;
  bs.total_sectors = Math.floor(size / BDRV_SECTOR_SIZE);
  s.csize_shift = 62 - (s.cluster_bits - 8);
  s.csize_mask = (1 << (s.cluster_bits - 8)) - 1;
  s.cluster_offset_mask = (1n << BigInt(s.csize_shift)) - 1n;

  s.refcount_table_offset = refcount_table_offset;
  s.refcount_table_size = refcount_table_clusters * (s.cluster_size / 8);
  if (refcount_table_clusters === 0 && !(flags & BDRV_O_CHECK)) throw new QemuError('Image does not contain a reference count table');
  validate_table_or_throw(s, refcount_table_offset, refcount_table_clusters, s.cluster_size, QCOW_MAX_REFTABLE_SIZE, 'Reference count table');
  if (!(flags & BDRV_O_CHECK)) {
    validate_table_or_throw(s, snapshots_offset, nb_snapshots, QCOW_SNAPSHOT_HEADER_SIZE, QCOW_SNAPSHOT_HEADER_SIZE * QCOW_MAX_SNAPSHOTS, 'Snapshot table');
  }
  validate_table_or_throw(s, l1_table_offset, l1_size, L1E_SIZE, QCOW_MAX_L1_SIZE, 'Active L1 table');
  s.l1_size = l1_size;
  s.l1_table_offset = l1_table_offset;
  if (size > Number.MAX_SAFE_INTEGER) throw new QemuError('Image is too big');
  const l1_vm_state_index = size_to_l1(s, size);
  if (l1_vm_state_index > 0x7fffffff) throw new QemuError('Image is too big');
  s.l1_vm_state_index = l1_vm_state_index;
  if (s.l1_size < s.l1_vm_state_index) throw new QemuError('L1 table is too small');

  if (s.l1_size > 0) {
    const raw = qemu_blockalign(bs.file!.bs, s.l1_size * L1E_SIZE);
    try {
      ret = yield* bdrv_co_pread(bs.file!, s.l1_table_offset, s.l1_size * L1E_SIZE, raw, 0);
      if (ret < 0) throw new QemuError(`Could not read L1 table: ${strerror(-ret)}`);
      const v = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
      s.l1_table = new BigUint64Array(s.l1_size);
      for (let i = 0; i < s.l1_size; i++) s.l1_table[i] = v.getBigUint64(i * 8);
    } finally {
      qemu_vfree(raw);
    }
  }

  yield* qcow2_update_options(bs, options, flags);
  s.flags = flags;

  ret = yield* qcow2_refcount_init(bs);
  if (ret !== 0) throw new QemuError(`Could not initialize refcount handling: ${strerror(-ret)}`);
  s.cluster_allocs = new Set();

  const ext = yield* qcow2_read_extensions(bs, header_length, ext_end, false, flags);
  let update_header = ext.need_update_header;

  if (s.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
    throw new QemuError("'data-file' is required for this image");
  }
  if (s.autoclear_features & 2n) throw new QemuError('data-file-raw requires a data file');
  if (options['data-file'] !== undefined) throw new QemuError("'data-file' can only be set for images with an external data file");

  if (backing_file_offset !== 0) {
    const len = backing_file_size;
    if (len > Math.min(1023, s.cluster_size - backing_file_offset) || len >= 4096) throw new QemuError('Backing file name too long');
    const name = new Uint8Array(len);
    ret = yield* bdrv_co_pread(bs.file!, backing_file_offset, len, name, 0);
    if (ret < 0) throw new QemuError(`Could not read backing file name: ${strerror(-ret)}`);
    s.image_backing_file = new TextDecoder('latin1').decode(name);
    bs.backing_file = s.image_backing_file;
  }

  if (!(flags & BDRV_O_CHECK)) {
    s.snapshots_offset = snapshots_offset;
    s.nb_snapshots = nb_snapshots;
    yield* qcow2_read_snapshots(bs);
  }

  // Unknown autoclear bits are cleared by any writer (they mark data we may have invalidated).
  update_header = update_header || (s.autoclear_features & ~QCOW2_AUTOCLEAR_MASK) !== 0n;
  const writable = (flags & BDRV_O_RDWR) !== 0 && !(flags & BDRV_O_INACTIVE);
  update_header = update_header && writable;
  if (update_header) s.autoclear_features &= QCOW2_AUTOCLEAR_MASK;
  // Bitmaps stay valid metadata: a read-write open marks them IN_USE (aioco does not track
  // dirty bits), which rewrites the header itself.
  if (!(flags & BDRV_O_INACTIVE)) {
    const header_updated = yield* qcow2_load_dirty_bitmaps(bs, writable);
    update_header = update_header && !header_updated;
  }
  if (update_header) {
    ret = yield* qcow2_update_header(bs);
    if (ret < 0) throw new QemuError(`Could not update qcow2 header: ${strerror(-ret)}`);
  }

  bs.supported_zero_flags = version >= 3 ? BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK : 0;
  bs.supported_truncate_flags = BDRV_REQ_ZERO_WRITE;

  if (!(flags & BDRV_O_CHECK) && writable && s.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
    const result = bdrv_check_result_new();
    ret = yield* qcow2_co_check_locked(bs, result, BDRV_FIX_ERRORS | BDRV_FIX_LEAKS);
    if (ret < 0 || result.check_errors) {
      if (ret >= 0) ret = -EIO;
      throw new QemuError(`Could not repair dirty image: ${strerror(-ret)}`);
    }
  }
}

interface OpenCo {
  bs: BlockDriverState;
  options: Record<string, unknown>;
  flags: number;
}

function* qcow2_open_entry(o: OpenCo): CoroutineFn<void> {
  const s = o.bs.opaque as BDRVQcow2State;
  yield* qemu_co_mutex_lock(s.lock);
  try {
    yield* qcow2_do_open(o.bs, o.options, o.flags);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}

/**
 * Opens the `file` child, then runs `qcow2_do_open` in a coroutine under `s.lock` and polls
 * until it is done. QEMU: `qcow2_open`. Throws QemuError (QEMU's messages); a failed open
 * leaves nothing behind and writes nothing.
 */
function qcow2_open(bs: BlockDriverState, options: Record<string, unknown>, flags: number): void {
  bdrv_open_child(null, options, 'file', bs, BDRV_CHILD_IMAGE | BDRV_CHILD_PRIMARY, false);
  const s = new_state();
  bs.opaque = s;
  try {
    bdrv_poll_co(bs, 'qcow2_open', () => qcow2_open_entry({ bs, options, flags }));
  } catch (e) {
    qcow2_free_state(bs);
    // bdrv_open_common calls bdrv_close only for a non-null opaque; the state is already freed.
    bs.opaque = null;
    throw e;
  }
}

function qcow2_refresh_limits(bs: BlockDriverState): void {
  const s = bs.opaque as BDRVQcow2State;
  bs.bl.pwrite_zeroes_alignment = s.subcluster_size;
  bs.bl.pdiscard_alignment = s.cluster_size;
}

/** Writes dirty L2 and refcount-block cache entries (refcounts only if kept accurate). QEMU: `qcow2_write_caches`. */
export function* qcow2_write_caches(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let ret = yield* qcow2_cache_write(bs, s.l2_table_cache);
  if (ret < 0) return ret;
  if (qcow2_need_accurate_refcounts(s)) {
    ret = yield* qcow2_cache_write(bs, s.refcount_block_cache);
    if (ret < 0) return ret;
  }
  return 0;
}

/** `qcow2_write_caches` then a flush of the file. QEMU: `qcow2_flush_caches`. */
export function* qcow2_flush_caches(bs: BlockDriverState): CoroutineFn<number> {
  const ret = yield* qcow2_write_caches(bs);
  if (ret < 0) return ret;
  return yield* bdrv_co_flush(bs.file!.bs);
}

function* qcow2_inactivate(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let result = 0;
  let ret = yield* qcow2_cache_flush(bs, s.l2_table_cache);
  if (ret) {
    result = ret;
    process.stderr.write(`qemu: Failed to flush the L2 table cache: ${strerror(-ret)}\n`);
  }
  ret = yield* qcow2_cache_flush(bs, s.refcount_block_cache);
  if (ret) {
    result = ret;
    process.stderr.write(`qemu: Failed to flush the refcount block cache: ${strerror(-ret)}\n`);
  }
  if (result === 0) yield* qcow2_mark_clean(bs);
  return result;
}

/**
 * Flushes the caches, clears the dirty bit (if everything reached the disk) and frees the
 * state. QEMU: `qcow2_close`. Runs the flush through `bdrv_poll_co`, so it must not be called
 * from a coroutine.
 */
function qcow2_close(bs: BlockDriverState): void {
  const s = bs.opaque as BDRVQcow2State;
  if (!(s.flags & BDRV_O_INACTIVE) && !bs.read_only && s.l2_table_cache) {
    try {
      bdrv_poll_co(bs, 'qcow2_close', () => qcow2_inactivate(bs));
    } catch (e) {
      error_report(`qcow2_close: ${(e as Error).message}`);
    }
  }
  qcow2_free_state(bs);
}

// ---------------------------------------------------------------------------------------------
// Check


// ---------------------------------------------------------------------------------------------
// Block status

/**
 * 1 if the image looks preallocated (far more clusters are refcounted than the file really
 * occupies), else 0, or -errno. Block status then asks the file whether data clusters read as
 * zero (BDRV_BLOCK_RECURSE). QEMU: `qcow2_detect_metadata_preallocation`. Called with `s.lock`.
 */
function* qcow2_detect_metadata_preallocation(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const file_length = bdrv_getlength(bs.file!.bs);
  if (file_length < 0) return file_length;
  const real_allocation = bdrv_get_allocated_file_size(bs.file!.bs);
  if (real_allocation < 0) return real_allocation;
  const real_clusters = Math.floor(real_allocation / s.cluster_size);
  const threshold = Math.max(Math.floor((real_clusters * 10) / 9), real_clusters + 2);
  const end_cluster = Math.ceil(file_length / s.cluster_size);
  let cluster_count = 0;
  const out = { refcount: 0 };
  for (let i = 0; i < end_cluster && cluster_count < threshold; i++) {
    const ret = yield* qcow2_get_refcount(bs, i, out);
    if (ret < 0) return ret;
    if (out.refcount) cluster_count++;
  }
  return cluster_count >= threshold ? 1 : 0;
}

/**
 * Block status of guest `[offset, offset + bytes)`: DATA for data clusters (OFFSET_VALID with the
 * host offset for uncompressed ones), ZERO for zero clusters, 0 for unallocated ones (the block
 * layer asks the backing file). QEMU: `qcow2_co_block_status`.
 */
function* qcow2_co_block_status(bs: BlockDriverState, _want_zero: boolean, offset: number, count: number, out: BlockStatusOut): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  yield* qemu_co_mutex_lock(s.lock);
  if (!s.metadata_preallocation_checked) {
    const r = yield* qcow2_detect_metadata_preallocation(bs);
    s.metadata_preallocation = r === 1;
    s.metadata_preallocation_checked = true;
  }
  const o: Qcow2HostOffsetOut = { bytes: Math.min(0x7fffffff, count), host_offset: 0, l2_entry: 0n, type: QCow2SubclusterType.UNALLOCATED_PLAIN };
  const ret = yield* qcow2_get_host_offset(bs, offset, o);
  qemu_co_mutex_unlock(s.lock);
  if (ret < 0) return ret;
  out.pnum = o.bytes;
  let status = 0;
  const type = o.type;
  if (type === QCow2SubclusterType.NORMAL || type === QCow2SubclusterType.ZERO_ALLOC || type === QCow2SubclusterType.UNALLOCATED_ALLOC) {
    out.map = o.host_offset;
    out.file = bs.file!.bs;
    status |= BDRV_BLOCK_OFFSET_VALID;
  }
  if (type === QCow2SubclusterType.ZERO_PLAIN || type === QCow2SubclusterType.ZERO_ALLOC) {
    status |= BDRV_BLOCK_ZERO;
  } else if (type !== QCow2SubclusterType.UNALLOCATED_PLAIN && type !== QCow2SubclusterType.UNALLOCATED_ALLOC) {
    status |= BDRV_BLOCK_DATA;
  }
  if (s.metadata_preallocation && status & BDRV_BLOCK_DATA && status & BDRV_BLOCK_OFFSET_VALID) status |= BDRV_BLOCK_RECURSE;
  return status;
}

// ---------------------------------------------------------------------------------------------
// Reads

/** One part of a request (QEMU: Qcow2AioTask). */
interface Qcow2AioTask extends AioTask {
  bs: BlockDriverState;
  subcluster_type: QCow2SubclusterType;
  host_offset: number;
  l2_entry: bigint;
  offset: number;
  bytes: number;
  qiov: QEMUIOVector;
  qiov_offset: number;
  l2meta: QCowL2Meta | null;
}

function* qcow2_add_task(pool: AioTaskPool | null, task: Qcow2AioTask): CoroutineFn<number> {
  if (!pool) return yield* task.func(task);
  yield* aio_task_pool_start_task(pool, task);
  return 0;
}

const compress_url = new URL('./qcow2-threads.mjs', import.meta.url);
const decompress_func = thread_pool_func<ThreadArg>(compress_url, 'qcow2_zlib_decompress');
const compress_func = thread_pool_func<ThreadArg>(compress_url, 'qcow2_zlib_compress');

/** What the worker functions get: SharedArrayBuffer-backed source and destination. */
interface ThreadArg {
  src: SharedArrayBuffer;
  src_offset: number;
  src_len: number;
  dst: SharedArrayBuffer;
  dst_offset: number;
  dst_len: number;
}

/** Compression jobs running per node, and coroutines waiting for a slot (QEMU: nb_threads, thread_task_queue). */
const thread_slots = new WeakMap<BDRVQcow2State, { busy: number; waiters: CoQueue }>();

/**
 * Runs a (de)compression function in the thread pool, at most QCOW2_MAX_THREADS at once per
 * node. QEMU: `qcow2_co_process`. Returns the function's result (a length or -errno).
 */
function* qcow2_co_do_compress(bs: BlockDriverState, func: typeof compress_func, dst: Uint8Array, src: Uint8Array): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let slot = thread_slots.get(s);
  if (!slot) {
    slot = { busy: 0, waiters: new CoQueue() };
    thread_slots.set(s, slot);
  }
  while (slot.busy >= QCOW2_MAX_THREADS) yield* qemu_co_queue_wait(slot.waiters, null);
  slot.busy++;
  try {
    const arg: ThreadArg = {
      src: src.buffer as SharedArrayBuffer,
      src_offset: src.byteOffset,
      src_len: src.byteLength,
      dst: dst.buffer as SharedArrayBuffer,
      dst_offset: dst.byteOffset,
      dst_len: dst.byteLength,
    };
    return yield* thread_pool_submit_co(aio_get_thread_pool(bs.aio_context), func, arg);
  } finally {
    slot.busy--;
    qemu_co_queue_next(slot.waiters);
  }
}

/**
 * Reads a compressed cluster: the compressed bytes (which may span host clusters), inflated in
 * a worker, then the wanted part copied out. QEMU: `qcow2_co_preadv_compressed`.
 */
function* qcow2_co_preadv_compressed(
  bs: BlockDriverState,
  l2_entry: bigint,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const { coffset, csize } = qcow2_parse_compressed_l2_entry(s, l2_entry);
  const offset_in_cluster = offset_into_cluster(s, offset);
  const buf = qemu_blockalign(bs.file!.bs, csize);
  const out_buf = qemu_blockalign(bs, s.cluster_size);
  try {
    yield* bdrv_co_debug_event(bs.file!.bs, 'read_compressed');
    let ret = yield* bdrv_co_pread(bs.file!, coffset, csize, buf, 0);
    if (ret < 0) return ret;
    ret = yield* qcow2_co_do_compress(bs, decompress_func, out_buf, buf);
    if (ret < 0) return -EIO;
    qemu_iovec_from_buf(qiov, qiov_offset, out_buf.subarray(offset_in_cluster, offset_in_cluster + bytes), bytes);
    return 0;
  } finally {
    qemu_vfree(buf);
    qemu_vfree(out_buf);
  }
}

function* qcow2_co_preadv_task(t: Qcow2AioTask): CoroutineFn<number> {
  const bs = t.bs;
  switch (t.subcluster_type) {
    case QCow2SubclusterType.UNALLOCATED_PLAIN:
    case QCow2SubclusterType.UNALLOCATED_ALLOC:
      if (bs.file!.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs.file!.bs, 'read_backing_aio');
      return yield* bdrv_co_preadv_part(bs.backing!, t.offset, t.bytes, t.qiov, t.qiov_offset, 0);
    case QCow2SubclusterType.COMPRESSED:
      return yield* qcow2_co_preadv_compressed(bs, t.l2_entry, t.offset, t.bytes, t.qiov, t.qiov_offset);
    case QCow2SubclusterType.NORMAL:
      if (bs.file!.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs.file!.bs, 'read_aio');
      return yield* bdrv_co_preadv_part(bs.file!, t.host_offset, t.bytes, t.qiov, t.qiov_offset, 0);
    default:
      throw new Error('qcow2_co_preadv_task: unexpected subcluster type');
  }
}

/**
 * Reads guest `[offset, offset + bytes)`: zero and unbacked-unallocated ranges are filled with
 * zeroes, the rest is read from the file, the backing file or decompressed; a request spanning
 * several mappings runs its parts concurrently. QEMU: `qcow2_co_preadv_part`.
 */
function* qcow2_co_preadv_part(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  _flags: number,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let ret = 0;
  let aio: AioTaskPool | null = null;
  const o: Qcow2HostOffsetOut = { bytes: 0, host_offset: 0, l2_entry: 0n, type: QCow2SubclusterType.UNALLOCATED_PLAIN };
  while (bytes !== 0 && aio_task_pool_status(aio) === 0) {
    o.bytes = Math.min(bytes, 0x7fffffff);
    yield* qemu_co_mutex_lock(s.lock);
    ret = yield* qcow2_get_host_offset(bs, offset, o);
    qemu_co_mutex_unlock(s.lock);
    if (ret < 0) break;
    const cur_bytes = o.bytes;
    const type = o.type;
    if (
      type === QCow2SubclusterType.ZERO_PLAIN ||
      type === QCow2SubclusterType.ZERO_ALLOC ||
      ((type === QCow2SubclusterType.UNALLOCATED_PLAIN || type === QCow2SubclusterType.UNALLOCATED_ALLOC) && !bs.backing)
    ) {
      qemu_iovec_memset(qiov, qiov_offset, 0, cur_bytes);
    } else {
      if (!aio && cur_bytes !== bytes) aio = aio_task_pool_new(QCOW2_MAX_WORKERS);
      ret = yield* qcow2_add_task(aio, {
        func: qcow2_co_preadv_task,
        bs,
        subcluster_type: type,
        host_offset: o.host_offset,
        l2_entry: o.l2_entry,
        offset,
        bytes: cur_bytes,
        qiov,
        qiov_offset,
        l2meta: null,
      });
      if (ret < 0) break;
    }
    bytes -= cur_bytes;
    offset += cur_bytes;
    qiov_offset += cur_bytes;
  }
  if (aio) {
    yield* aio_task_pool_wait_all(aio);
    if (ret === 0) ret = aio_task_pool_status(aio);
  }
  return ret;
}

// ---------------------------------------------------------------------------------------------
// Writes

/**
 * Links (or, with `link_l2` false, aborts) every allocation in the list, waking the requests
 * that waited on each. QEMU: `qcow2_handle_l2meta`. Called with `s.lock` held. Returns the
 * first link error; the unlinked rest is left in `pm.m` for the caller to abort.
 */
export function* qcow2_handle_l2meta(bs: BlockDriverState, pm: { m: QCowL2Meta | null }, link_l2: boolean): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let ret = 0;
  while (pm.m !== null) {
    const l2meta = pm.m;
    if (link_l2) {
      ret = yield* qcow2_alloc_cluster_link_l2(bs, l2meta);
      if (ret) return ret;
    } else {
      yield* qcow2_alloc_cluster_abort(bs, l2meta);
    }
    s.cluster_allocs.delete(l2meta);
    qemu_co_queue_restart_all(l2meta.dependent_requests);
    pm.m = l2meta.next;
  }
  return ret;
}

/** Whether the guest data can go out in the same write as the COW regions. QEMU: `merge_cow`. */
function merge_cow(offset: number, bytes: number, qiov: QEMUIOVector, qiov_offset: number, l2meta: QCowL2Meta | null): boolean {
  for (let m = l2meta; m !== null; m = m.next) {
    if (m.cow_start.nb_bytes === 0 && m.cow_end.nb_bytes === 0) continue;
    if (m.skip_cow) continue;
    // The request may span clusters this allocation does not cover.
    if (m.offset + m.cow_start.offset + m.cow_start.nb_bytes !== offset) continue;
    if (m.offset + m.cow_end.offset !== offset + bytes) continue;
    if (qemu_iovec_subvec_niov(qiov, qiov_offset, bytes) > IOV_MAX - 2) continue;
    m.data_qiov = qiov;
    m.data_qiov_offset = qiov_offset;
    return true;
  }
  return false;
}

/** Whether both COW regions of `m` read as zeroes. QEMU: `is_zero_cow`. */
function* is_zero_cow(bs: BlockDriverState, m: QCowL2Meta): CoroutineFn<boolean> {
  if (!(yield* is_zero(bs, m.offset + m.cow_start.offset, m.cow_start.nb_bytes))) return false;
  return yield* is_zero(bs, m.offset + m.cow_end.offset, m.cow_end.nb_bytes);
}

/**
 * Zeroes COW regions that read as zeroes with one NO_FALLBACK write-zeroes over the whole new
 * area instead of copying them. QEMU: `handle_alloc_space`. Surprise: aioco's file driver
 * refuses NO_FALLBACK zeroing (-ENOTSUP, it has no fallocate), so with it the regions are
 * always copied; aioco does not leave them as holes instead, since holes change what
 * `qemu-img map` reports (QEMU then takes the image for a preallocated one).
 */
function* handle_alloc_space(bs: BlockDriverState, l2meta: QCowL2Meta | null): CoroutineFn<number> {
  if (!(bs.file!.bs.supported_zero_flags & BDRV_REQ_NO_FALLBACK)) return 0;
  for (let m = l2meta; m !== null; m = m.next) {
    if (!m.cow_start.nb_bytes && !m.cow_end.nb_bytes) continue;
    if (!(yield* is_zero_cow(bs, m))) continue;
    const start_offset = m.alloc_offset + m.cow_start.offset;
    const nb_bytes = m.cow_end.offset + m.cow_end.nb_bytes - m.cow_start.offset;
    let ret = yield* qcow2_pre_write_overlap_check(bs, 0, start_offset, nb_bytes, true);
    if (ret < 0) return ret;
    yield* bdrv_co_debug_event(bs.file!.bs, 'cluster_alloc_space');
    ret = yield* bdrv_co_pwrite_zeroes(bs.file!, start_offset, nb_bytes, BDRV_REQ_NO_FALLBACK);
    if (ret < 0) {
      if (ret !== -ENOTSUP && ret !== -EAGAIN) return ret;
      continue;
    }
    m.skip_cow = true;
  }
  return 0;
}

/**
 * Writes one mapped part: the data (merged with its COW when possible) outside the lock, then
 * links its allocations under the lock (or aborts them on error). QEMU: `qcow2_co_pwritev_task`.
 */
function* qcow2_co_pwritev_task(t: Qcow2AioTask): CoroutineFn<number> {
  const bs = t.bs;
  const s = bs.opaque as BDRVQcow2State;
  const pm = { m: t.l2meta };
  let ret = 0;
  ret = yield* handle_alloc_space(bs, pm.m);
  if (ret >= 0 && !merge_cow(t.offset, t.bytes, t.qiov, t.qiov_offset, pm.m)) {
    if (bs.file!.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs.file!.bs, 'write_aio');
    ret = yield* bdrv_co_pwritev_part(bs.file!, t.host_offset, t.bytes, t.qiov, t.qiov_offset, 0);
  }
  yield* qemu_co_mutex_lock(s.lock);
  try {
    if (ret >= 0) ret = yield* qcow2_handle_l2meta(bs, pm, true);
    yield* qcow2_handle_l2meta(bs, pm, false);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
  return ret;
}

/**
 * Writes guest `[offset, offset + bytes)`: maps or allocates host clusters under the lock, runs
 * the overlap check, then writes each mapped part (in parallel when there are several).
 * QEMU: `qcow2_co_pwritev_part`.
 */
function* qcow2_co_pwritev_part(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  _flags: number,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  let aio: AioTaskPool | null = null;
  let ret = 0;
  const a: Qcow2AllocOut = { bytes: 0, host_offset: 0, m: null };
  let failed_locked = false;
  while (bytes !== 0 && aio_task_pool_status(aio) === 0) {
    a.m = null;
    a.bytes = Math.min(bytes, 0x7fffffff);
    yield* qemu_co_mutex_lock(s.lock);
    ret = yield* qcow2_alloc_host_offset(bs, offset, a);
    if (ret >= 0) ret = yield* qcow2_pre_write_overlap_check(bs, 0, a.host_offset, a.bytes, true);
    if (ret < 0) {
      failed_locked = true;
      break;
    }
    qemu_co_mutex_unlock(s.lock);
    const cur_bytes = a.bytes;
    if (!aio && cur_bytes !== bytes) aio = aio_task_pool_new(QCOW2_MAX_WORKERS);
    const m = a.m;
    a.m = null;
    ret = yield* qcow2_add_task(aio, {
      func: qcow2_co_pwritev_task,
      bs,
      subcluster_type: QCow2SubclusterType.UNALLOCATED_PLAIN,
      host_offset: a.host_offset,
      l2_entry: 0n,
      offset,
      bytes: cur_bytes,
      qiov,
      qiov_offset,
      l2meta: m,
    });
    if (ret < 0) break;
    bytes -= cur_bytes;
    offset += cur_bytes;
    qiov_offset += cur_bytes;
  }
  if (failed_locked) {
    try {
      yield* qcow2_handle_l2meta(bs, a, false);
    } finally {
      qemu_co_mutex_unlock(s.lock);
    }
  }
  if (aio) {
    yield* aio_task_pool_wait_all(aio);
    if (ret === 0) ret = aio_task_pool_status(aio);
  }
  return ret;
}

// ---------------------------------------------------------------------------------------------
// Zero writes, discard

/** Whether guest `[offset, offset + bytes)` reads as zeroes through the whole chain. QEMU: `is_zero`. */
function* is_zero(bs: BlockDriverState, offset: number, bytes: number): CoroutineFn<boolean> {
  const end = bs.total_sectors * BDRV_SECTOR_SIZE;
  if (offset + bytes > end) bytes = end - offset;
  if (bytes <= 0) return true;
  const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
  let res: number;
  do {
    res = yield* bdrv_co_block_status_above(bs, null, offset, bytes, out);
    offset += out.pnum;
    bytes -= out.pnum;
  } while (res >= 0 && res & BDRV_BLOCK_ZERO && out.pnum && bytes);
  return res >= 0 && (res & BDRV_BLOCK_ZERO) !== 0 && bytes === 0;
}

/**
 * Zeroes guest `[offset, offset + bytes)` through metadata. A request not aligned to
 * subclusters works only if the rest of its subcluster already reads as zero, else -ENOTSUP
 * (the block layer then writes a zero buffer). QEMU: `qcow2_co_pwrite_zeroes`.
 */
function* qcow2_co_pwrite_zeroes(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const head = offset_into_subcluster(s, offset);
  let tail = Math.ceil((offset + bytes) / s.subcluster_size) * s.subcluster_size - (offset + bytes);
  if (offset + bytes === bs.total_sectors * BDRV_SECTOR_SIZE) tail = 0;
  if (head || tail) {
    if (!((yield* is_zero(bs, offset - head, head)) && (yield* is_zero(bs, offset + bytes, tail)))) return -ENOTSUP;
    yield* qemu_co_mutex_lock(s.lock);
    // A write may have come in since the check.
    offset -= head;
    bytes = s.subcluster_size;
    const o: Qcow2HostOffsetOut = { bytes: s.subcluster_size, host_offset: 0, l2_entry: 0n, type: QCow2SubclusterType.UNALLOCATED_PLAIN };
    const ret = yield* qcow2_get_host_offset(bs, offset, o);
    if (
      ret < 0 ||
      (o.type !== QCow2SubclusterType.UNALLOCATED_PLAIN &&
        o.type !== QCow2SubclusterType.UNALLOCATED_ALLOC &&
        o.type !== QCow2SubclusterType.ZERO_PLAIN &&
        o.type !== QCow2SubclusterType.ZERO_ALLOC)
    ) {
      qemu_co_mutex_unlock(s.lock);
      return ret < 0 ? ret : -ENOTSUP;
    }
  } else {
    yield* qemu_co_mutex_lock(s.lock);
  }
  try {
    return yield* qcow2_subcluster_zeroize(bs, offset, bytes, flags);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}

/**
 * Discards whole clusters (they read as zeroes afterwards on v3). Partial clusters are ignored
 * (-ENOTSUP) except the last partial cluster of an unaligned image; v2 images with a backing
 * file cannot discard (stale backing data would show). QEMU: `qcow2_co_pdiscard`.
 */
function* qcow2_co_pdiscard(bs: BlockDriverState, offset: number, bytes: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (s.qcow_version < 3 && bs.backing) return -ENOTSUP;
  if (offset % s.cluster_size !== 0 || bytes % s.cluster_size !== 0) {
    // Partial clusters are ignored, except the whole last partial cluster of an unaligned image.
    if (offset % s.cluster_size !== 0 || offset + bytes !== bs.total_sectors * BDRV_SECTOR_SIZE) return -ENOTSUP;
  }
  yield* qemu_co_mutex_lock(s.lock);
  try {
    return yield* qcow2_cluster_discard(bs, offset, bytes, QCOW2_DISCARD_REQUEST, false);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}

// ---------------------------------------------------------------------------------------------
// Compressed writes

function* qcow2_co_pwritev_compressed_task(t: Qcow2AioTask): CoroutineFn<number> {
  const bs = t.bs;
  const s = bs.opaque as BDRVQcow2State;
  let bytes = t.bytes;
  const offset = t.offset;
  if (bytes !== s.cluster_size) {
    if (bytes > s.cluster_size || offset + bytes !== bs.total_sectors * BDRV_SECTOR_SIZE) return -EINVAL;
  }
  const buf = qemu_blockalign(bs, s.cluster_size);
  const out_buf = qemu_blockalign(bs, s.cluster_size - 1);
  try {
    // The last cluster of an unaligned image is padded with zeroes.
    buf.fill(0, bytes);
    qemu_iovec_to_buf(t.qiov, t.qiov_offset, buf, bytes);
    const out_len = yield* qcow2_co_do_compress(bs, compress_func, out_buf, buf);
    if (out_len === -ENOMEM) {
      // Does not compress: a normal cluster instead.
      const r = yield* qcow2_co_pwritev_part(bs, offset, bytes, t.qiov, t.qiov_offset, 0);
      return r < 0 ? r : 0;
    } else if (out_len < 0) {
      return -EINVAL;
    }
    yield* qemu_co_mutex_lock(s.lock);
    let cluster_offset: number;
    let ret: number;
    try {
      cluster_offset = yield* qcow2_alloc_compressed_cluster_offset(bs, offset, out_len);
      if (cluster_offset < 0) return cluster_offset;
      ret = yield* qcow2_pre_write_overlap_check(bs, 0, cluster_offset, out_len, true);
    } finally {
      qemu_co_mutex_unlock(s.lock);
    }
    if (ret < 0) return ret;
    yield* bdrv_co_debug_event(bs.file!.bs, 'write_compressed');
    ret = yield* bdrv_co_pwrite(bs.file!, cluster_offset, out_len, out_buf.subarray(0, out_len), 0);
    return ret < 0 ? ret : 0;
  } finally {
    qemu_vfree(buf);
    qemu_vfree(out_buf);
    bytes = 0;
  }
}

/**
 * Writes whole clusters compressed (the last cluster of an unaligned image may be partial);
 * clusters that do not shrink are written normally. A zero-length request aligns the file end
 * to a sector. QEMU: `qcow2_co_pwritev_compressed_part`. -EINVAL for unaligned requests, -EIO
 * if a target cluster is already allocated.
 */
function* qcow2_co_pwritev_compressed_part(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, qiov_offset: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (bytes === 0) {
    const len = bdrv_getlength(bs.file!.bs);
    if (len < 0) return len;
    return yield* bdrv_co_truncate(bs.file!, len, false, 'off', 0);
  }
  if (offset_into_cluster(s, offset)) return -EINVAL;
  if (offset_into_cluster(s, bytes) && offset + bytes !== bs.total_sectors * BDRV_SECTOR_SIZE) return -EINVAL;
  let aio: AioTaskPool | null = null;
  let ret = 0;
  while (bytes && aio_task_pool_status(aio) === 0) {
    const chunk_size = Math.min(bytes, s.cluster_size);
    if (!aio && chunk_size !== bytes) aio = aio_task_pool_new(QCOW2_MAX_WORKERS);
    ret = yield* qcow2_add_task(aio, {
      func: qcow2_co_pwritev_compressed_task,
      bs,
      subcluster_type: QCow2SubclusterType.UNALLOCATED_PLAIN,
      host_offset: 0,
      l2_entry: 0n,
      offset,
      bytes: chunk_size,
      qiov,
      qiov_offset,
      l2meta: null,
    });
    if (ret < 0) break;
    qiov_offset += chunk_size;
    offset += chunk_size;
    bytes -= chunk_size;
  }
  if (aio) {
    yield* aio_task_pool_wait_all(aio);
    if (ret === 0) ret = aio_task_pool_status(aio);
  }
  return ret;
}

// ---------------------------------------------------------------------------------------------
// Flush, truncate, info

/** Writes the metadata caches to the file (the block layer then flushes it). QEMU: `qcow2_co_flush_to_os`. */
function* qcow2_co_flush_to_os(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  yield* qemu_co_mutex_lock(s.lock);
  try {
    return yield* qcow2_write_caches(bs);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}

/**
 * Resizes the image. Growing (prealloc off): the L1 table grows to fit, new space reads as
 * zeroes (with BDRV_REQ_ZERO_WRITE it is zeroed explicitly, hiding a longer backing file), and
 * the header's size is written. QEMU: `qcow2_co_truncate`. Throws QemuError with QEMU's
 * messages. Shrinking and preallocation are refused (-ENOTSUP) in aioco.
 */
function* qcow2_co_truncate(bs: BlockDriverState, offset: number, _exact: boolean, prealloc: PreallocMode, flags: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  if (prealloc !== 'off' && prealloc !== 'metadata' && prealloc !== 'falloc' && prealloc !== 'full') {
    throw new QemuError(`Unsupported preallocation mode '${String(prealloc)}'`);
  }
  yield* qemu_co_mutex_lock(s.lock);
  try {
    if (s.nb_snapshots) throw new QemuError("Can't resize an image which has snapshots");
    if (s.nb_bitmaps) throw new QemuError("aioco: qcow2 images with persistent bitmaps cannot be resized");
    const old_length = bs.total_sectors * BDRV_SECTOR_SIZE;
    const new_l1_size = size_to_l1(s, offset);
    if (offset < old_length) {
      if (prealloc !== 'off') throw new QemuError("Preallocation can't be used for shrinking an image");
      throw new QemuError('aioco: qcow2 images cannot be shrunk');
    }
    if (prealloc !== 'off') throw new QemuError(`aioco: qcow2 does not support preallocation mode '${prealloc}' when resizing`);
    let ret = yield* qcow2_grow_l1_table(bs, new_l1_size, true);
    if (ret < 0) throw new QemuError(`Failed to grow the L1 table: ${strerror(-ret)}`);

    if (flags & BDRV_REQ_ZERO_WRITE && offset > old_length) {
      const zero_start = Math.ceil(old_length / s.subcluster_size) * s.subcluster_size;
      if (offset > zero_start) {
        // The end may be unaligned: it lies past the (old) image end, which zeroize accepts.
        ret = yield* qcow2_subcluster_zeroize(bs, zero_start, offset - zero_start, 0);
        if (ret < 0) throw new QemuError(`Failed to zero out new clusters: ${strerror(-ret)}`);
      }
      if (zero_start > old_length) {
        const len = Math.min(zero_start, offset) - old_length;
        const buf = qemu_blockalign(bs, len);
        buf.fill(0);
        const q = new QEMUIOVector();
        qemu_iovec_init_buf(q, buf, len);
        qemu_co_mutex_unlock(s.lock);
        try {
          ret = yield* qcow2_co_pwritev_part(bs, old_length, len, q, 0, 0);
        } finally {
          yield* qemu_co_mutex_lock(s.lock);
          qemu_vfree(buf);
        }
        if (ret < 0) throw new QemuError(`Failed to zero out the new area: ${strerror(-ret)}`);
      }
    }
    bs.total_sectors = Math.floor(offset / BDRV_SECTOR_SIZE);
    const b = new Uint8Array(8);
    put64(b, 0, offset);
    ret = yield* bdrv_co_pwrite_sync(bs.file!, HDR_SIZE, 8, b, 0);
    if (ret < 0) throw new QemuError(`Failed to update the image size: ${strerror(-ret)}`);
    s.l1_vm_state_index = new_l1_size;
    // The cache sizes follow the virtual size.
    yield* qcow2_update_options(bs, { ...bs.options }, s.flags);
    return 0;
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}

/** QEMU: `qcow2_get_info`. */
function qcow2_get_info(bs: BlockDriverState, bdi: BlockDriverInfo): number {
  const s = bs.opaque as BDRVQcow2State;
  bdi.cluster_size = s.cluster_size;
  bdi.vm_state_offset = s.l1_vm_state_index * 2 ** (s.cluster_bits + s.l2_bits);
  bdi.is_dirty = (s.incompatible_features & QCOW2_INCOMPAT_DIRTY) !== 0n;
  return 0;
}

/** The internal snapshots as qemu-img info lists them. QEMU: `qcow2_snapshot_list`. */
function qcow2_snapshot_list(bs: BlockDriverState): QEMUSnapshotInfo[] {
  const s = bs.opaque as BDRVQcow2State;
  return s.snapshots.slice(0, s.nb_snapshots).map((sn) => ({
    id_str: sn.id_str,
    name: sn.name,
    vm_state_size: sn.vm_state_size,
    date_sec: sn.date_sec,
    date_nsec: sn.date_nsec,
    vm_clock_nsec: sn.vm_clock_nsec,
    icount: sn.icount,
  }));
}

/**
 * The `Format specific information` qemu-img info prints, in its key order. QEMU:
 * `qcow2_get_specific_info`. v3 images with bitmaps list them (`bitmaps`, read from the
 * directory on disk each time); throws QemuError if the directory cannot be read.
 */
function qcow2_get_specific_info(bs: BlockDriverState): ImageInfoSpecific {
  const s = bs.opaque as BDRVQcow2State;
  if (s.qcow_version === 2) {
    return { type: 'qcow2', data: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': s.refcount_bits } };
  }
  const bitmaps = bdrv_poll_co(bs, 'qcow2_get_specific_info', () => qcow2_get_bitmap_info_list(bs));
  return {
    type: 'qcow2',
    data: {
      compat: '1.1',
      'compression-type': 'zlib',
      'lazy-refcounts': (s.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0n,
      ...(bitmaps ? { bitmaps } : {}),
      'refcount-bits': s.refcount_bits,
      corrupt: (s.incompatible_features & QCOW2_INCOMPAT_CORRUPT) !== 0n,
      'extended-l2': (s.incompatible_features & QCOW2_INCOMPAT_EXTL2) !== 0n,
    },
  };
}

/**
 * Stores a new backing file name and format in the header. QEMU: `qcow2_change_backing_file`.
 * -EINVAL for names over 1023 bytes. Synchronous (runs the header write through bdrv_poll_co).
 */
function qcow2_change_backing_file(bs: BlockDriverState, backing_file: string | null, backing_fmt: string | null): number {
  const s = bs.opaque as BDRVQcow2State;
  if (backing_file && backing_file.length > 1023) return -EINVAL;
  bs.backing_file = backing_file ?? '';
  bs.backing_format = backing_fmt ?? '';
  s.image_backing_file = backing_file ? backing_file : null;
  s.image_backing_format = backing_fmt ? backing_fmt : null;
  return bdrv_poll_co(bs, 'qcow2_change_backing_file', () => qcow2_update_header(bs));
}

/**
 * Drops every cluster of the active image (all entries become unallocated, so reads fall
 * through to the backing file). QEMU: `qcow2_make_empty`, whose fast path (rewriting the whole
 * refcount structure for v3 images without snapshots) aioco does not take: it always discards
 * cluster by cluster (QCOW2_DISCARD_SNAPSHOT), which is slower and leaves the file size alone.
 */
function* qcow2_make_empty(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const step = Math.floor(0x7fffffff / s.cluster_size) * s.cluster_size;
  const end_offset = bs.total_sectors * BDRV_SECTOR_SIZE;
  let ret = 0;
  yield* qemu_co_mutex_lock(s.lock);
  try {
    for (let offset = 0; offset < end_offset; offset += step) {
      ret = yield* qcow2_cluster_discard(bs, offset, Math.min(step, end_offset - offset), QCOW2_DISCARD_SNAPSHOT, true);
      if (ret < 0) break;
    }
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
  return ret;
}

/** The `qcow2` format driver. */
export const bdrv_qcow2: BlockDriver = {
  format_name: 'qcow2',
  is_format: true,
  supports_backing: true,
  runtime_opts: QCOW2_RUNTIME_OPTS,
  bdrv_probe: qcow2_probe,
  bdrv_open: qcow2_open,
  bdrv_close: qcow2_close,
  bdrv_refresh_limits: qcow2_refresh_limits,
  bdrv_co_block_status: qcow2_co_block_status,
  bdrv_co_preadv_part: qcow2_co_preadv_part,
  bdrv_co_pwritev_part: qcow2_co_pwritev_part,
  bdrv_co_pwrite_zeroes: qcow2_co_pwrite_zeroes,
  bdrv_co_pdiscard: qcow2_co_pdiscard,
  bdrv_co_flush_to_os: qcow2_co_flush_to_os,
  bdrv_co_truncate: qcow2_co_truncate,
  bdrv_co_pwritev_compressed_part: qcow2_co_pwritev_compressed_part,
  bdrv_co_check: qcow2_co_check,
  create_opts: qcow2_create_opts_list(),
  bdrv_co_create_opts: qcow2_co_create_opts,
  bdrv_get_info: qcow2_get_info,
  bdrv_get_specific_info: qcow2_get_specific_info,
  bdrv_snapshot_list: qcow2_snapshot_list,
  bdrv_change_backing_file: qcow2_change_backing_file,
  bdrv_make_empty: qcow2_make_empty,
};

bdrv_register(bdrv_qcow2);

/** @internal the worker module's path, for tests. */
export const QCOW2_THREADS_MODULE = fileURLToPath(compress_url);
