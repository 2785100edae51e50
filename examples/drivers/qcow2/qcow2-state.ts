/**
 * qcow2's on-disk constants and the driver's per-node state (QEMU: block/qcow2.h). Every
 * qcow2 module imports its shared types from here.
 *
 * Representation rules (shared by all qcow2 modules):
 * - Host and guest offsets are JS numbers (exact below 2^53, far beyond any real image).
 * - 64-bit table entries that carry flags (L1 and L2 entries) are `bigint` while being decoded;
 *   in memory the L1 table is a BigUint64Array in host order, L2 slices live big-endian in the
 *   L2 cache's buffers (read and written with DataView getBigUint64/setBigUint64).
 * - Refcount table entries are numbers (Float64Array); refcounts are numbers (a refcount above
 *   2^53 - 1 cannot be represented and is treated as the maximum).
 */
import { EFBIG, EINVAL, type CoMutex, type CoQueue } from '../../../src/index.ts';
import type { Qcow2Cache } from './qcow2-cache.ts';

export const QCOW_MAGIC = 0x514649fb; // 'Q' 'F' 'I' 0xfb

export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
export const QCOW_CRYPT_LUKS = 2;

export const QCOW_MAX_CRYPT_CLUSTERS = 32;
export const QCOW_MAX_SNAPSHOTS = 65536;
/** Largest refcount table QEMU accepts (bytes). */
export const QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
/** Largest L1 table QEMU accepts (bytes). */
export const QCOW_MAX_L1_SIZE = 32 * 1024 * 1024;
export const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const QCOW2_MAX_BITMAPS = 65535;

// L1/L2 entry flags and masks.
export const QCOW_OFLAG_COPIED = 1n << 63n;
export const QCOW_OFLAG_COMPRESSED = 1n << 62n;
export const QCOW_OFLAG_ZERO = 1n;
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L1E_RESERVED_MASK = 0x7f000000000001ffn;
export const L2E_STD_RESERVED_MASK = 0x3f000000000001fen;
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
export const REFT_RESERVED_MASK = 0x1ffn;
export const QCOW_L2_BITMAP_ALL_ALLOC = (1n << 32n) - 1n;
export const QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32n;
/** Size of an L2 entry in bytes: 8, or 16 with extended L2 (entry + subcluster bitmap). */
export const L2E_SIZE_NORMAL = 8;
export const L2E_SIZE_EXTENDED = 16;

// Header feature bits.
export const QCOW2_INCOMPAT_DIRTY = 1n << 0n;
export const QCOW2_INCOMPAT_CORRUPT = 1n << 1n;
export const QCOW2_INCOMPAT_DATA_FILE = 1n << 2n;
export const QCOW2_INCOMPAT_COMPRESSION = 1n << 3n;
export const QCOW2_INCOMPAT_EXTL2 = 1n << 4n;
export const QCOW2_INCOMPAT_MASK = 0x1fn;
export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const QCOW2_COMPAT_FEAT_MASK = 1n;
export const QCOW2_AUTOCLEAR_BITMAPS = 1n << 0n;
export const QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const QCOW2_AUTOCLEAR_MASK = 3n;

export const QCOW2_COMPRESSION_TYPE_ZLIB = 0;
export const QCOW2_COMPRESSION_TYPE_ZSTD = 1;

// Header extension magics.
export const QCOW2_EXT_MAGIC_END = 0;
export const QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xe2792aca;
export const QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803f857;
export const QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537be77;
export const QCOW2_EXT_MAGIC_BITMAPS = 0x23852875;
export const QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441;

// Metadata overlap check bits (QEMU: QCow2MetadataOverlap).
export const QCOW2_OL_MAIN_HEADER = 1 << 0;
export const QCOW2_OL_ACTIVE_L1 = 1 << 1;
export const QCOW2_OL_ACTIVE_L2 = 1 << 2;
export const QCOW2_OL_REFCOUNT_TABLE = 1 << 3;
export const QCOW2_OL_REFCOUNT_BLOCK = 1 << 4;
export const QCOW2_OL_SNAPSHOT_TABLE = 1 << 5;
export const QCOW2_OL_INACTIVE_L1 = 1 << 6;
export const QCOW2_OL_INACTIVE_L2 = 1 << 7;
export const QCOW2_OL_BITMAP_DIRECTORY = 1 << 8;
export const QCOW2_OL_MAX_BITNR = 9;
export const QCOW2_OL_NONE = 0;
export const QCOW2_OL_ALL = (1 << QCOW2_OL_MAX_BITNR) - 1;
/** QEMU's default overlap-check template ("cached": everything but inactive L2 tables). */
export const QCOW2_OL_CACHED = QCOW2_OL_ALL & ~QCOW2_OL_INACTIVE_L2;
export const QCOW2_OL_CONSTANT = QCOW2_OL_MAIN_HEADER | QCOW2_OL_ACTIVE_L1 | QCOW2_OL_REFCOUNT_TABLE | QCOW2_OL_SNAPSHOT_TABLE | QCOW2_OL_BITMAP_DIRECTORY;
/** Names used in "Marking image as corrupt: Preventing invalid write on metadata (overlaps with %s)". */
export const QCOW2_OL_NAMES = [
  'qcow2_header',
  'active L1 table',
  'active L2 table',
  'refcount table',
  'refcount block',
  'snapshot table',
  'inactive L1 table',
  'inactive L2 table',
  'bitmap directory',
];

// Cluster and subcluster types (QEMU: QCow2ClusterType, QCow2SubclusterType).
export const enum QCow2ClusterType {
  UNALLOCATED,
  ZERO_PLAIN,
  ZERO_ALLOC,
  NORMAL,
  COMPRESSED,
}
export const enum QCow2SubclusterType {
  UNALLOCATED_PLAIN,
  UNALLOCATED_ALLOC,
  ZERO_PLAIN,
  ZERO_ALLOC,
  NORMAL,
  COMPRESSED,
  INVALID,
}

/** The fixed header fields (QEMU: QCowHeader), decoded to host order. */
export interface QCowHeader {
  magic: number;
  version: number;
  backing_file_offset: number;
  backing_file_size: number;
  cluster_bits: number;
  size: number;
  crypt_method: number;
  l1_size: number;
  l1_table_offset: number;
  refcount_table_offset: number;
  refcount_table_clusters: number;
  nb_snapshots: number;
  snapshots_offset: number;
  // Version 3 only (version 2 images behave as if these were 0 / 4 / 72).
  incompatible_features: bigint;
  compatible_features: bigint;
  autoclear_features: bigint;
  refcount_order: number;
  header_length: number;
  compression_type: number;
}

/** A header extension aioco does not interpret, kept byte for byte when the header is rewritten. */
export interface Qcow2UnknownHeaderExtension {
  magic: number;
  data: Uint8Array;
}

/** One internal snapshot's table entry (QEMU: QCowSnapshot). Kept, listed, never edited. */
export interface QCowSnapshot {
  l1_table_offset: number;
  l1_size: number;
  id_str: string;
  name: string;
  disk_size: number;
  vm_state_size: number;
  date_sec: number;
  date_nsec: number;
  vm_clock_nsec: number;
  icount: number;
  extra_data_size: number;
  /** Extra data bytes aioco does not understand, kept as they are. */
  unknown_extra_data: Uint8Array | null;
}

/** One cluster allocation in flight (QEMU: QCowL2Meta), for COW and request dependencies. */
export interface QCowL2Meta {
  /** Guest offset of the first allocated cluster. */
  offset: number;
  /** Host offset of the first allocated cluster. */
  alloc_offset: number;
  nb_clusters: number;
  keep_old_clusters: boolean;
  /** Bytes to copy before the guest data: [offset, offset + nb_bytes) of the first cluster. */
  cow_start: { offset: number; nb_bytes: number };
  cow_end: { offset: number; nb_bytes: number };
  /** Whether the data cluster needs zeroing instead of COW (BDRV_REQ_ZERO_WRITE). */
  skip_cow: boolean;
  /** Requests that overlap this allocation wait here until its L2 update is done. */
  dependent_requests: CoQueue;
  next: QCowL2Meta | null;
}

/** The driver's per-node state (QEMU: BDRVQcow2State), `bs.opaque`. */
export interface BDRVQcow2State {
  cluster_bits: number;
  cluster_size: number;
  /** Entries per L2 slice in the cache (QEMU caches slices, not whole tables). */
  l2_slice_size: number;
  subcluster_bits: number;
  subcluster_size: number;
  subclusters_per_cluster: number;
  /** log2 of entries per L2 table. */
  l2_bits: number;
  /** Entries per L2 table. */
  l2_size: number;
  l1_size: number;
  l1_vm_state_index: number;
  refcount_block_bits: number;
  refcount_block_size: number;
  csize_shift: number;
  csize_mask: number;
  cluster_offset_mask: bigint;
  l1_table_offset: number;
  l1_table: BigUint64Array;

  l2_table_cache: Qcow2Cache;
  refcount_block_cache: Qcow2Cache;

  refcount_table: Float64Array;
  refcount_table_offset: number;
  /** Entries in the refcount table (QEMU: refcount_table_size). */
  refcount_table_size: number;
  max_refcount_table_index: number;
  free_cluster_index: number;
  free_byte_offset: number;
  refcount_order: number;
  refcount_bits: number;
  refcount_max: number;
  get_refcount: (block: Uint8Array, index: number) => number;
  set_refcount: (block: Uint8Array, index: number, value: number) => void;

  /** Protects metadata; data I/O runs outside it (QEMU: s->lock). */
  lock: CoMutex;
  /** Allocations in flight (QEMU: s->cluster_allocs). */
  cluster_allocs: Set<QCowL2Meta>;

  flags: number;
  qcow_version: number;
  use_lazy_refcounts: boolean;
  refcount_table_clusters?: number;
  incompatible_features: bigint;
  compatible_features: bigint;
  autoclear_features: bigint;
  compression_type: number;
  crypt_method_header: number;
  header_length: number;

  snapshots: QCowSnapshot[];
  nb_snapshots: number;
  snapshots_offset: number;
  snapshots_size: number;

  nb_bitmaps: number;
  bitmap_directory_size: number;
  bitmap_directory_offset: number;

  /** The overlap checks that run before each metadata write (QCOW2_OL_* bits). */
  overlap_check: number;
  signaled_corruption: boolean;
  /** Which discard requests reach the file: indexed by QEMU's Qcow2DiscardType. */
  discard_passthrough: boolean[];
  cache_clean_interval: number;

  /** Header bytes past the known fields of a v3 header, kept as they are. */
  unknown_header_fields: Uint8Array;
  unknown_header_ext: Qcow2UnknownHeaderExtension[];
  /** The backing file name and format stored in the image (bs.backing_file mirrors them). */
  image_backing_file: string | null;
  image_backing_format: string | null;
  /** Whether preallocated metadata was detected (block status then recurses into the file). */
  metadata_preallocation_checked: boolean;
  metadata_preallocation: boolean;
}

/** Bytes into the cluster of `offset`. QEMU: `offset_into_cluster`. */
export function offset_into_cluster(s: BDRVQcow2State, offset: number): number {
  return offset % s.cluster_size;
}

/** Bytes into the subcluster of `offset`. QEMU: `offset_into_subcluster`. */
export function offset_into_subcluster(s: BDRVQcow2State, offset: number): number {
  return offset % s.subcluster_size;
}

/** `offset` rounded down to its cluster. QEMU: `start_of_cluster`. */
export function start_of_cluster(s: BDRVQcow2State, offset: number): number {
  return offset - (offset % s.cluster_size);
}

/** Clusters needed for `size` bytes. QEMU: `size_to_clusters`. */
export function size_to_clusters(s: BDRVQcow2State, size: number): number {
  return Math.ceil(size / s.cluster_size);
}

/** Number of L1 entries for an image of `size` bytes. QEMU: `size_to_l1`. */
export function size_to_l1(s: BDRVQcow2State, size: number): number {
  const shift = s.cluster_bits + s.l2_bits;
  return Math.ceil(size / 2 ** shift);
}

/** L1 index of guest `offset`. QEMU: `offset_to_l1_index`. */
export function offset_to_l1_index(s: BDRVQcow2State, offset: number): number {
  return Math.floor(offset / 2 ** (s.l2_bits + s.cluster_bits));
}

/** L2 index of guest `offset`. QEMU: `offset_to_l2_index`. */
export function offset_to_l2_index(s: BDRVQcow2State, offset: number): number {
  // `%`, not `&`: cluster indexes pass 2^31 on images over 128 TiB with 64 KiB clusters.
  return Math.floor(offset / s.cluster_size) % s.l2_size;
}

/** Index within the L2 slice of guest `offset`. QEMU: `offset_to_l2_slice_index`. */
export function offset_to_l2_slice_index(s: BDRVQcow2State, offset: number): number {
  return Math.floor(offset / s.cluster_size) % s.l2_slice_size;
}

/** Bytes per L2 entry (8, or 16 with extended L2). QEMU: `l2_entry_size`. */
export function l2_entry_size(s: BDRVQcow2State): number {
  return s.subclusters_per_cluster > 1 ? L2E_SIZE_EXTENDED : L2E_SIZE_NORMAL;
}

/** Whether the image has extended L2 entries. QEMU: `has_subclusters`. */
export function has_subclusters(s: BDRVQcow2State): boolean {
  return s.subclusters_per_cluster > 1;
}

/** Whether v3 zero clusters may be written. QEMU: `s->qcow_version >= 3`. */
export function qcow2_has_zero_flag(s: BDRVQcow2State): boolean {
  return s.qcow_version >= 3;
}

/** Whether `e` (an L2 entry) is a compressed cluster. */
export function l2_entry_is_compressed(e: bigint): boolean {
  return (e & QCOW_OFLAG_COMPRESSED) !== 0n;
}

/** The host offset of a standard (not compressed) L2 or L1 entry, as a number. */
export function l2_entry_offset(e: bigint): number {
  return Number(e & L2E_OFFSET_MASK);
}

// ---- Appended by Q1 (I/O path) ----

/** Why clusters are freed, selecting `discard_passthrough[type]` (QEMU: enum qcow2_discard_type). */
export type Qcow2DiscardType = number;
export const QCOW2_DISCARD_NEVER = 0;
export const QCOW2_DISCARD_ALWAYS = 1;
export const QCOW2_DISCARD_REQUEST = 2;
export const QCOW2_DISCARD_SNAPSHOT = 3;
export const QCOW2_DISCARD_OTHER = 4;
export const QCOW2_DISCARD_MAX = 5;

/** Subclusters per cluster with extended L2 entries. QEMU: QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER. */
export const QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32;
/** Bytes per L1 entry. QEMU: L1E_SIZE. */
export const L1E_SIZE = 8;
/** Unit of the compressed-cluster size field. QEMU: QCOW2_COMPRESSED_SECTOR_SIZE. */
export const QCOW2_COMPRESSED_SECTOR_SIZE = 512;
/** An invalid host offset (QEMU: INV_OFFSET, -1ULL). */
export const INV_OFFSET = -1;

/** Subcluster index of guest `offset` within its cluster. QEMU: `offset_to_sc_index`. */
export function offset_to_sc_index(s: BDRVQcow2State, offset: number): number {
  return Math.floor((offset % s.cluster_size) / s.subcluster_size);
}

/** Subclusters needed for `size` bytes. QEMU: `size_to_subclusters`. */
export function size_to_subclusters(s: BDRVQcow2State, size: number): number {
  return Math.ceil(size / s.subcluster_size);
}

/** Bits [first_sc, last_sc) of the "allocated" half of an L2 bitmap. QEMU: QCOW_OFLAG_SUB_ALLOC_RANGE. */
export function QCOW_OFLAG_SUB_ALLOC_RANGE(first_sc: number, last_sc: number): bigint {
  return ((1n << BigInt(last_sc)) - 1n) & ~((1n << BigInt(first_sc)) - 1n);
}

/** Bits [first_sc, last_sc) of the "reads as zero" half of an L2 bitmap. QEMU: QCOW_OFLAG_SUB_ZERO_RANGE. */
export function QCOW_OFLAG_SUB_ZERO_RANGE(first_sc: number, last_sc: number): bigint {
  return QCOW_OFLAG_SUB_ALLOC_RANGE(first_sc, last_sc) << 32n;
}

/**
 * The cluster type of an L2 entry. QEMU: `qcow2_get_cluster_type` (qcow2.h). Surprise: with
 * extended L2 entries bit 0 is not the zero flag, so ZERO_* never comes back (the bitmap says it).
 * aioco has no external data files, so an entry with offset 0 is always UNALLOCATED.
 */
export function qcow2_get_cluster_type(s: BDRVQcow2State, l2_entry: bigint): QCow2ClusterType {
  if (l2_entry & QCOW_OFLAG_COMPRESSED) return QCow2ClusterType.COMPRESSED;
  if (l2_entry & QCOW_OFLAG_ZERO && !has_subclusters(s)) {
    return l2_entry & L2E_OFFSET_MASK ? QCow2ClusterType.ZERO_ALLOC : QCow2ClusterType.ZERO_PLAIN;
  }
  if (!(l2_entry & L2E_OFFSET_MASK)) return QCow2ClusterType.UNALLOCATED;
  return QCow2ClusterType.NORMAL;
}

/** Whether a cluster type has a host cluster. QEMU: `qcow2_cluster_is_allocated`. */
export function qcow2_cluster_is_allocated(type: QCow2ClusterType): boolean {
  return type === QCow2ClusterType.COMPRESSED || type === QCow2ClusterType.NORMAL || type === QCow2ClusterType.ZERO_ALLOC;
}

/**
 * The type of subcluster `sc_index` of an L2 entry + bitmap. QEMU: `qcow2_get_subcluster_type`.
 * Returns INVALID for bitmaps that break the extended-L2 rules (zero and allocated both set, or
 * allocated bits on an unallocated cluster).
 */
export function qcow2_get_subcluster_type(s: BDRVQcow2State, l2_entry: bigint, l2_bitmap: bigint, sc_index: number): QCow2SubclusterType {
  const type = qcow2_get_cluster_type(s, l2_entry);
  if (has_subclusters(s)) {
    const alloc = 1n << BigInt(sc_index);
    const zero = alloc << 32n;
    switch (type) {
      case QCow2ClusterType.COMPRESSED:
        return QCow2SubclusterType.COMPRESSED;
      case QCow2ClusterType.NORMAL:
        if ((l2_bitmap >> 32n) & l2_bitmap) return QCow2SubclusterType.INVALID;
        if (l2_bitmap & zero) return QCow2SubclusterType.ZERO_ALLOC;
        if (l2_bitmap & alloc) return QCow2SubclusterType.NORMAL;
        return QCow2SubclusterType.UNALLOCATED_ALLOC;
      default: // UNALLOCATED
        if (l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC) return QCow2SubclusterType.INVALID;
        if (l2_bitmap & zero) return QCow2SubclusterType.ZERO_PLAIN;
        return QCow2SubclusterType.UNALLOCATED_PLAIN;
    }
  }
  switch (type) {
    case QCow2ClusterType.COMPRESSED:
      return QCow2SubclusterType.COMPRESSED;
    case QCow2ClusterType.ZERO_PLAIN:
      return QCow2SubclusterType.ZERO_PLAIN;
    case QCow2ClusterType.ZERO_ALLOC:
      return QCow2SubclusterType.ZERO_ALLOC;
    case QCow2ClusterType.NORMAL:
      return QCow2SubclusterType.NORMAL;
    default:
      return QCow2SubclusterType.UNALLOCATED_PLAIN;
  }
}

/** Whether refcounts on disk must be kept exact (not while the dirty bit is set). QEMU: `qcow2_need_accurate_refcounts`. */
export function qcow2_need_accurate_refcounts(s: BDRVQcow2State): boolean {
  return !(s.incompatible_features & QCOW2_INCOMPAT_DIRTY);
}

/** Guest offset where an allocation's head COW starts. QEMU: `l2meta_cow_start`. */
export function l2meta_cow_start(m: QCowL2Meta): number {
  return m.offset + m.cow_start.offset;
}

/** Guest offset where an allocation's tail COW ends. QEMU: `l2meta_cow_end`. */
export function l2meta_cow_end(m: QCowL2Meta): number {
  return m.offset + m.cow_end.offset + m.cow_end.nb_bytes;
}

/** QCowL2Meta fields the write path adds (declaration merging keeps the original block intact). */
export interface QCowL2Meta {
  /** Guest data to write together with the COW regions, when they can be merged (QEMU: data_qiov). */
  data_qiov?: import('../../../src/index.ts').QEMUIOVector | null;
  data_qiov_offset?: number;
  /** Preallocation: link the clusters without touching the subcluster bitmap (QEMU: prealloc). */
  prealloc?: boolean;
}

/** BDRVQcow2State fields the I/O path adds. */
export interface BDRVQcow2State {
  /** Whether freed clusters are queued instead of discarded at once (QEMU: cache_discards). */
  cache_discards?: boolean;
  /** Size of the unknown header fields (QEMU: unknown_header_fields_size = its length). */
  /** Crypto header extension (kept only to refuse encrypted images cleanly). */
  crypto_header_offset?: number;
  /** Image data file name from the header extension (external data files are refused). */
  image_data_file?: string | null;
}

// ---- Appended by Q2 (metadata) ----

/** A host range freed while discards are queued (QEMU: Qcow2DiscardRegion). */
export interface Qcow2DiscardRegion {
  offset: number;
  bytes: number;
}

/** BDRVQcow2State fields the refcount and snapshot code adds. */
export interface BDRVQcow2State {
  /** Freed host ranges waiting for `qcow2_process_discards` (QEMU: s->discards). */
  discards?: Qcow2DiscardRegion[];
  /**
   * Host offsets of the L2 tables of all snapshots, loaded by `qcow2_read_snapshots` so the
   * "inactive L2" overlap check needs no I/O (QEMU re-reads the snapshot L1 tables each time).
   * Null when not loaded (too large to keep).
   */
  inactive_l2_offsets?: Set<number> | null;
}

/**
 * Checks a table's entry count and offset before anything is allocated for it. QEMU:
 * `qcow2_validate_table`. Returns 0, or -EFBIG ("<name> too large") / -EINVAL ("<name> offset
 * invalid") with the message in `err.msg` (QEMU's errp): open throws it, check reports it.
 */
export function qcow2_validate_table(
  s: BDRVQcow2State,
  offset: number,
  entries: number,
  entry_len: number,
  max_size_bytes: number,
  table_name: string,
  err: { msg: string },
): number {
  if (entries > max_size_bytes / entry_len) {
    err.msg = `${table_name} too large`;
    return -EFBIG;
  }
  if (Number.MAX_SAFE_INTEGER - entries * entry_len < offset || offset % s.cluster_size !== 0) {
    err.msg = `${table_name} offset invalid`;
    return -EINVAL;
  }
  return 0;
}

/**
 * Host offset and byte count of a compressed L2 entry; the count runs from `coffset` to the end
 * of its last 512-byte sector. QEMU: `qcow2_parse_compressed_l2_entry`.
 */
export function qcow2_parse_compressed_l2_entry(s: BDRVQcow2State, l2_entry: bigint): { coffset: number; csize: number } {
  const coffset = Number(l2_entry & s.cluster_offset_mask);
  const nb_csectors = Number((l2_entry >> BigInt(s.csize_shift)) & BigInt(s.csize_mask)) + 1;
  return { coffset, csize: nb_csectors * 512 - (coffset % 512) };
}
