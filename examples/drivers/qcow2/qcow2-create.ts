/**
 * qcow2 image creation (QEMU 7.2: block/qcow2.c `qcow2_create_opts`, `qcow2_co_create_opts`,
 * `qcow2_co_create`, and the preallocation parts of `qcow2_co_truncate` / `preallocate_co`).
 *
 * The steps are QEMU's, so the images are laid out exactly as qemu-img lays them out: the
 * protocol file is created, a minimal header and an empty refcount table + block are written
 * raw, the image is opened as qcow2 to allocate the first three clusters with the driver's own
 * allocator, the full header is written, the image is grown to its size (with preallocation),
 * and the backing file is set.
 */
import { unlinkSync } from 'node:fs';
import {
  BDRV_MAX_LENGTH,
  BDRV_O_RDWR,
  CoQueue,
  EFBIG,
  QemuError,
  aio_bh_schedule_oneshot,
  aio_co_wake,
  bdrv_co_create_file,
  bdrv_co_pwrite_zeroes,
  bdrv_co_truncate,
  bdrv_getlength,
  bdrv_poll_co,
  blk_bs,
  blk_new_open,
  blk_pwrite,
  blk_unref,
  path_has_protocol,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_queue_init,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_current_aio_context,
  qemu_opt_find,
  qemu_opt_get_bool_del,
  qemu_opt_get_del,
  qemu_opt_get_number_del,
  qemu_opt_get_size_del,
  strerror,
} from '../../../src/index.ts';
import type { BlockBackend, BlockDriver, BlockDriverState, CoroutineFn, PreallocMode, QemuOpts, QemuOptsList } from '../../../src/index.ts';
import type { BDRVQcow2State, QCowL2Meta } from './qcow2-state.ts';
import {
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_DISCARD_OTHER,
  QCOW2_INCOMPAT_EXTL2,
  QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER,
  QCOW_MAGIC,
  QCOW_MAX_L1_SIZE,
  l2_entry_size,
  offset_to_l2_slice_index,
} from './qcow2-state.ts';
import { qcow2_alloc_cluster_link_l2, qcow2_alloc_host_offset } from './qcow2-cluster.ts';
import type { Qcow2AllocOut } from './qcow2-cluster.ts';
import { qcow2_alloc_clusters, qcow2_alloc_clusters_at, qcow2_free_clusters, qcow2_get_last_cluster, qcow2_refcount_area } from './qcow2-refcount.ts';
import { qcow2_handle_l2meta, qcow2_update_header } from './qcow2.ts';

/** Default cluster size. QEMU: DEFAULT_CLUSTER_SIZE. */
export const DEFAULT_CLUSTER_SIZE = 65536;
/** Bytes of the header QEMU 7.2 writes (QEMU: sizeof(QCowHeader)). */
const QCOW_HEADER_SIZE = 112;

/**
 * qcow2's creation options in QEMU 7.2's order (the order of qemu-img create's "Formatting ..."
 * line, which prints the merged format + protocol list in description order). QEMU:
 * `qcow2_create_opts`. A function (not a constant) so the driver object can use it whatever
 * order the qcow2 modules are loaded in.
 */
export function qcow2_create_opts_list(): QemuOptsList {
  return {
    name: 'qcow2-create-opts',
    desc: [
      { name: 'encryption', type: 'bool', help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
      { name: 'encrypt.format', type: 'string', help: "Encrypt the image, format choices: 'aes', 'luks'" },
      { name: 'encrypt.key-secret', type: 'string', help: 'ID of secret providing qcow AES key or LUKS passphrase' },
      { name: 'encrypt.cipher-alg', type: 'string', help: 'Name of encryption cipher algorithm' },
      { name: 'encrypt.cipher-mode', type: 'string', help: 'Name of encryption cipher mode' },
      { name: 'encrypt.ivgen-alg', type: 'string', help: 'Name of IV generator algorithm' },
      { name: 'encrypt.ivgen-hash-alg', type: 'string', help: 'Name of IV generator hash algorithm' },
      { name: 'encrypt.hash-alg', type: 'string', help: 'Name of encryption hash algorithm' },
      { name: 'encrypt.iter-time', type: 'number', help: 'Time to spend in PBKDF in milliseconds' },
      { name: 'cluster_size', type: 'size', help: 'qcow2 cluster size', def_value_str: String(DEFAULT_CLUSTER_SIZE) },
      { name: 'extended_l2', type: 'bool', help: 'Extended L2 tables', def_value_str: 'off' },
      { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, metadata, falloc, full)' },
      { name: 'compression_type', type: 'string', help: 'Compression method used for image cluster compression', def_value_str: 'zlib' },
      { name: 'size', type: 'size', help: 'Virtual disk size' },
      { name: 'compat', type: 'string', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
      { name: 'backing_file', type: 'string', help: 'File name of a base image' },
      { name: 'backing_fmt', type: 'string', help: 'Image format of the base image' },
      { name: 'data_file', type: 'string', help: 'File name of an external data file' },
      { name: 'data_file_raw', type: 'bool', help: 'The external data file must stay valid as a raw image' },
      { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates', def_value_str: 'off' },
      { name: 'refcount_bits', type: 'number', help: 'Width of a reference count entry in bits', def_value_str: '16' },
    ],
  };
}

/** The values QEMU 7.2's BlockdevDriver enum accepts for backing_fmt. */
const BLOCKDEV_DRIVERS = new Set([
  'blkdebug', 'blklogwrites', 'blkreplay', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read',
  'dmg', 'file', 'snapshot-access', 'ftp', 'ftps', 'gluster', 'host_cdrom', 'host_device', 'http', 'https', 'io_uring',
  'iscsi', 'luks', 'nbd', 'nfs', 'null-aio', 'null-co', 'nvme', 'nvme-io_uring', 'parallels', 'preallocate', 'qcow',
  'qcow2', 'qed', 'quorum', 'raw', 'rbd', 'replication', 'ssh', 'throttle', 'vdi', 'vhdx', 'virtio-blk-vfio-pci',
  'virtio-blk-vhost-user', 'virtio-blk-vhost-vdpa', 'vmdk', 'vpc', 'vvfat',
]);

/** What `qcow2_co_create` needs, validated (QEMU: BlockdevCreateOptionsQcow2). */
interface Qcow2CreateOptions {
  size: number;
  version: number;
  cluster_size: number;
  extended_l2: boolean;
  preallocation: PreallocMode;
  backing_file: string | null;
  backing_fmt: string | null;
  lazy_refcounts: boolean;
  refcount_bits: number;
  compression_type: string;
}

/**
 * Takes qcow2's options out of `opts` (what QEMU's `qemu_opts_to_qdict_filtered(..., true)`
 * does), leaving only the protocol's, and checks them in the order QEMU's QAPI visitor and
 * `qcow2_co_create` do. Throws QemuError with QEMU's messages.
 */
function qcow2_parse_create_opts(opts: QemuOpts): { o: Qcow2CreateOptions; encrypt: boolean; data_file: string | null } {
  const has = (n: string) => qemu_opt_find(opts, n) !== null;
  const str = (n: string) => (has(n) ? qemu_opt_get_del(opts, n) : null);
  const bool = (n: string, def: boolean) => qemu_opt_get_bool_del(opts, n, def);

  // The QAPI visitor's checks, in BlockdevCreateOptionsQcow2's member order.
  const data_file = str('data_file');
  const data_file_raw = bool('data_file_raw', false);
  const extended_l2 = bool('extended_l2', false);
  if (!has('size')) throw new QemuError("Parameter 'size' is missing");
  const size = qemu_opt_get_size_del(opts, 'size', 0);
  let version = 3;
  const compat = str('compat');
  if (compat !== null) {
    if (compat === '0.10' || compat === 'v2') version = 2;
    else if (compat === '1.1' || compat === 'v3') version = 3;
    else throw new QemuError(`Parameter 'version' does not accept value '${compat}'`);
  }
  const backing_file = str('backing_file');
  const backing_fmt = str('backing_fmt');
  if (backing_fmt !== null && !BLOCKDEV_DRIVERS.has(backing_fmt)) {
    throw new QemuError(`Parameter 'backing-fmt' does not accept value '${backing_fmt}'`);
  }
  let encrypt_format = str('encrypt.format');
  const encryption = has('encryption') ? bool('encryption', false) : null;
  if (encryption === true) {
    if (encrypt_format !== null) throw new QemuError("Parameter 'encrypt.format' is missing");
    encrypt_format = 'aes';
  }
  const cluster_size = qemu_opt_get_size_del(opts, 'cluster_size', DEFAULT_CLUSTER_SIZE);
  const prealloc = str('preallocation') ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'metadata' && prealloc !== 'falloc' && prealloc !== 'full') {
    throw new QemuError(`Parameter 'preallocation' does not accept value '${prealloc}'`);
  }
  const lazy_refcounts = bool('lazy_refcounts', false);
  const refcount_bits = qemu_opt_get_number_del(opts, 'refcount_bits', 16);
  const compression_type = qemu_opt_get_del(opts, 'compression_type') ?? 'zlib';
  if (compression_type !== 'zlib' && compression_type !== 'zstd') {
    throw new QemuError(`Parameter 'compression-type' does not accept value '${compression_type}'`);
  }
  if (encrypt_format !== null && !has('encrypt.key-secret')) {
    throw new QemuError("Parameter 'encrypt.key-secret' is required for cipher");
  }
  // Whatever else qcow2 describes (the encryption parameters) is qcow2's, not the protocol's.
  for (const d of qcow2_create_opts_list().desc) qemu_opt_get_del(opts, d.name);

  // qcow2_co_create's own checks, in its order.
  if (extended_l2 && version < 3) {
    throw new QemuError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const cluster_bits = Math.log2(cluster_size);
  if (!Number.isInteger(cluster_bits) || cluster_bits < MIN_CLUSTER_BITS || cluster_bits > MAX_CLUSTER_BITS) {
    throw new QemuError(`Cluster size must be a power of two between ${1 << MIN_CLUSTER_BITS} and ${1 << (MAX_CLUSTER_BITS - 10)}k`);
  }
  if (extended_l2) {
    const min_cluster_size = 1 << (MIN_CLUSTER_BITS + Math.log2(QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER));
    if (cluster_size < min_cluster_size) {
      throw new QemuError(`Extended L2 entries are only supported with cluster sizes of at least ${min_cluster_size} bytes`);
    }
  }
  if (backing_file !== null && prealloc !== 'off' && !extended_l2) {
    throw new QemuError('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (backing_fmt !== null && backing_file === null) throw new QemuError('Backing format cannot be used without backing file');
  if (version < 3 && lazy_refcounts) {
    throw new QemuError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (refcount_bits > 64 || refcount_bits <= 0 || (refcount_bits & (refcount_bits - 1)) !== 0) {
    throw new QemuError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && refcount_bits !== 16) {
    throw new QemuError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)');
  }
  if (data_file_raw && data_file === null) throw new QemuError('data-file-raw requires data-file');
  if (data_file_raw && backing_file !== null) throw new QemuError('Backing file and data-file-raw cannot be used at the same time');
  if (data_file !== null && version < 3) {
    throw new QemuError('External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (compression_type !== 'zlib' && version < 3) {
    throw new QemuError('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  return {
    o: {
      // QEMU silently rounds the size up to a sector.
      size: Math.ceil(size / 512) * 512,
      version,
      cluster_size,
      extended_l2,
      preallocation: prealloc,
      backing_file,
      backing_fmt,
      lazy_refcounts,
      refcount_bits,
      compression_type,
    },
    encrypt: encrypt_format !== null,
    data_file,
  };
}

/**
 * Runs `fn` (synchronous code that may drive the event loop, such as opening and closing
 * images) from a bottom half, outside the calling coroutine, and resumes the coroutine with its
 * result. aioco's sync wrappers (bdrv_open of a qcow2 image, blk_unref) cannot run inside a
 * coroutine, where QEMU 7.2's qcow2_co_create calls blk_new_open and blk_unref directly.
 */
function* run_outside_coroutine<T>(fn: () => T): CoroutineFn<T> {
  const co = qemu_coroutine_self();
  const st: { done: boolean; value?: T; failed: boolean; error?: unknown } = { done: false, failed: false };
  aio_bh_schedule_oneshot(qemu_get_current_aio_context(), () => {
    try {
      st.value = fn();
    } catch (e) {
      st.failed = true;
      st.error = e;
    }
    st.done = true;
    aio_co_wake(co);
  });
  while (!st.done) yield* qemu_coroutine_yield();
  if (st.failed) throw st.error;
  return st.value as T;
}

/**
 * Allocates the L2 tables and data clusters of guest [offset, new_length) without writing data
 * (zero-filled on read: the data clusters are past the old end of the file), then makes the file
 * long enough to hold them. QEMU: `preallocate_co`. Called with `s.lock` held. Throws QemuError.
 */
function* preallocate_co(bs: BlockDriverState, offset: number, new_length: number, mode: PreallocMode): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  let bytes = new_length - offset;
  const out: Qcow2AllocOut = { bytes: 0, host_offset: 0, m: null };
  let cur_bytes = 0;
  const max = Math.floor(0x7fffffff / s.cluster_size) * s.cluster_size;
  try {
    while (bytes) {
      cur_bytes = Math.min(bytes, max);
      out.bytes = cur_bytes;
      out.m = null;
      let ret = yield* qcow2_alloc_host_offset(bs, offset, out);
      if (ret < 0) throw new QemuError(`Allocating clusters failed: ${strerror(-ret)}`);
      cur_bytes = out.bytes;
      for (let m = out.m as QCowL2Meta | null; m !== null; m = m.next) m.prealloc = true;
      const pm = { m: out.m };
      ret = yield* qcow2_handle_l2meta(bs, pm, true);
      out.m = pm.m;
      if (ret < 0) throw new QemuError(`Mapping clusters failed: ${strerror(-ret)}`);
      bytes -= cur_bytes;
      offset += cur_bytes;
    }
    // Reads past the end of the file would fail: extend it to the last allocated cluster.
    const file_length = bdrv_getlength(bs.file!.bs);
    if (file_length < 0) throw new QemuError(`Could not get file size: ${strerror(-file_length)}`);
    if (out.host_offset + cur_bytes > file_length) {
      const ret = yield* bdrv_co_truncate(bs.file!, out.host_offset + cur_bytes, false, mode === 'metadata' ? 'off' : mode, 0);
      if (ret < 0) throw new QemuError(`Could not resize file: ${strerror(-ret)}`);
    }
  } finally {
    if (out.m) yield* qcow2_handle_l2meta(bs, { m: out.m }, false);
  }
}

/**
 * Grows the file to `new_size` with `mode` preallocation of the new area. A protocol driver
 * that only truncates ('off' only, like aioco's file driver) gets the area written with zeroes
 * instead, which allocates it as QEMU's file-posix does for `full`.
 */
function* grow_file(bs: BlockDriverState, new_size: number, mode: PreallocMode): CoroutineFn<number> {
  const child = bs.file!;
  try {
    return yield* bdrv_co_truncate(child, new_size, false, mode, 0);
  } catch (e) {
    if (!(e instanceof QemuError) || mode === 'off') throw e;
  }
  const old_size = bdrv_getlength(child.bs);
  if (old_size < 0) return old_size;
  const ret = yield* bdrv_co_truncate(child, new_size, false, 'off', 0);
  if (ret < 0 || new_size <= old_size) return ret;
  return yield* bdrv_co_pwrite_zeroes(child, old_size, new_size - old_size, 0);
}

/**
 * Allocates the data clusters of guest [old_length, new_length) contiguously after new refcount
 * structures at the end of the file, writes them (zeroes, or `falloc`) by growing the file, and
 * links them into the L2 tables. QEMU: the falloc/full branch of `qcow2_co_truncate`. Called
 * with `s.lock` held. Throws QemuError.
 */
function* preallocate_full(bs: BlockDriverState, old_length: number, new_length: number, mode: PreallocMode): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  let old_file_size = bdrv_getlength(bs.file!.bs);
  if (old_file_size < 0) throw new QemuError(`Failed to inquire current file length: ${strerror(-old_file_size)}`);
  const last_cluster = yield* qcow2_get_last_cluster(bs, old_file_size);
  if (last_cluster >= 0) old_file_size = (last_cluster + 1) * s.cluster_size;
  else old_file_size = Math.ceil(old_file_size / s.cluster_size) * s.cluster_size;

  let nb_new_data_clusters = (Math.ceil(new_length / s.cluster_size) * s.cluster_size - (old_length - (old_length % s.cluster_size))) / s.cluster_size;
  // An overestimate, so that linking the data never needs new refcount blocks.
  const nb_new_l2_tables = Math.ceil(nb_new_data_clusters / (s.cluster_size / l2_entry_size(s))) + 1;
  const allocation_start = yield* qcow2_refcount_area(bs, old_file_size, nb_new_data_clusters + nb_new_l2_tables, true, 0, 0);
  if (allocation_start < 0) throw new QemuError(`Failed to resize refcount structures: ${strerror(-allocation_start)}`);
  const allocated = yield* qcow2_alloc_clusters_at(bs, allocation_start, nb_new_data_clusters);
  if (allocated < 0) throw new QemuError(`Failed to allocate data clusters: ${strerror(-allocated)}`);
  if (allocated !== nb_new_data_clusters) throw new QemuError('Failed to allocate data clusters: the area past the image end is in use');

  const new_file_size = allocation_start + nb_new_data_clusters * s.cluster_size;
  let ret = yield* grow_file(bs, new_file_size, mode);
  if (ret < 0) {
    yield* qcow2_free_clusters(bs, allocation_start, nb_new_data_clusters * s.cluster_size, QCOW2_DISCARD_OTHER);
    throw new QemuError(`Failed to resize underlying file: ${strerror(-ret)}`);
  }

  let host_offset = allocation_start;
  let guest_offset = old_length;
  while (nb_new_data_clusters) {
    const nb_clusters = Math.min(nb_new_data_clusters, s.l2_slice_size - offset_to_l2_slice_index(s, guest_offset));
    const cow_start_length = guest_offset % s.cluster_size;
    guest_offset -= cow_start_length;
    const q = new CoQueue();
    qemu_co_queue_init(q);
    const m: QCowL2Meta = {
      offset: guest_offset,
      alloc_offset: host_offset,
      nb_clusters,
      keep_old_clusters: false,
      cow_start: { offset: 0, nb_bytes: cow_start_length },
      cow_end: { offset: nb_clusters * s.cluster_size, nb_bytes: 0 },
      skip_cow: false,
      dependent_requests: q,
      next: null,
      prealloc: true,
    };
    ret = yield* qcow2_alloc_cluster_link_l2(bs, m);
    if (ret < 0) {
      yield* qcow2_free_clusters(bs, host_offset, nb_new_data_clusters * s.cluster_size, QCOW2_DISCARD_OTHER);
      throw new QemuError(`Failed to update L2 tables: ${strerror(-ret)}`);
    }
    guest_offset += nb_clusters * s.cluster_size;
    host_offset += nb_clusters * s.cluster_size;
    nb_new_data_clusters -= nb_clusters;
  }
}

/**
 * Preallocates guest [old_length, new_length) of an open qcow2 node that already has that size
 * (its L1 table grown): `metadata` allocates L2 tables and data clusters without writing data;
 * `falloc` / `full` also write the data area (zeroes). QEMU: the preallocation branches of
 * `qcow2_co_truncate`. Takes `s.lock`. Throws QemuError with QEMU's messages.
 */
export function* qcow2_co_preallocate(bs: BlockDriverState, old_length: number, new_length: number, mode: PreallocMode): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  if (mode === 'off' || new_length <= old_length) return;
  yield* qemu_co_mutex_lock(s.lock);
  try {
    if (mode === 'metadata') yield* preallocate_co(bs, old_length, new_length, mode);
    else yield* preallocate_full(bs, old_length, new_length, mode);
  } finally {
    qemu_co_mutex_unlock(s.lock);
  }
}

/** Writes `n` at `off` big-endian (u32). */
function put32(b: Uint8Array, off: number, n: number): void {
  new DataView(b.buffer, b.byteOffset).setUint32(off, n);
}

/**
 * The qcow2 half of creation, on an existing empty protocol file (QEMU: `qcow2_co_create`).
 * Synchronous: it opens and closes the image through the block layer.
 */
function qcow2_create_sync(filename: string, o: Qcow2CreateOptions): void {
  const cluster_size = o.cluster_size;
  const cluster_bits = Math.log2(cluster_size);

  // A minimal header and an empty refcount table + refcount block, written raw.
  let blk: BlockBackend | null = blk_new_open(filename, null, { driver: 'file' }, BDRV_O_RDWR);
  blk.allow_write_beyond_eof = true;
  try {
    const header = new Uint8Array(cluster_size);
    const dv = new DataView(header.buffer);
    put32(header, 0, QCOW_MAGIC);
    put32(header, 4, o.version);
    put32(header, 20, cluster_bits);
    dv.setBigUint64(48, BigInt(cluster_size)); // refcount_table_offset
    put32(header, 56, 1); // refcount_table_clusters
    let compatible = 0n;
    let incompatible = 0n;
    if (o.lazy_refcounts) compatible |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    if (o.extended_l2) incompatible |= QCOW2_INCOMPAT_EXTL2;
    dv.setBigUint64(72, incompatible);
    dv.setBigUint64(80, compatible);
    put32(header, 96, Math.log2(o.refcount_bits));
    put32(header, 100, QCOW_HEADER_SIZE);
    let ret = blk_pwrite(blk, 0, cluster_size, header, 0);
    if (ret < 0) throw new QemuError(`Could not write qcow2 header: ${strerror(-ret)}`);

    const reftable = new Uint8Array(2 * cluster_size);
    new DataView(reftable.buffer).setBigUint64(0, BigInt(2 * cluster_size));
    ret = blk_pwrite(blk, cluster_size, 2 * cluster_size, reftable, 0);
    if (ret < 0) throw new QemuError(`Could not write refcount table: ${strerror(-ret)}`);
  } finally {
    blk_unref(blk);
    blk = null;
  }

  // Open it as qcow2 and make it consistent: the header, refcount table and block get refcounts.
  blk = blk_new_open(filename, null, { driver: 'qcow2' }, BDRV_O_RDWR);
  try {
    const bs = blk_bs(blk)!;
    const s = bs.opaque as BDRVQcow2State;
    bdrv_poll_co(bs, 'qcow2_co_create', function* () {
      yield* qemu_co_mutex_lock(s.lock);
      try {
        const off = yield* qcow2_alloc_clusters(bs, 3 * cluster_size);
        if (off < 0) throw new QemuError(`Could not allocate clusters for qcow2 header and refcount table: ${strerror(-off)}`);
        if (off !== 0) throw new Error('Huh, first cluster in empty image is already in use?');
        const r = yield* qcow2_update_header(bs);
        if (r < 0) throw new QemuError(`Could not update qcow2 header: ${strerror(-r)}`);
      } finally {
        qemu_co_mutex_unlock(s.lock);
      }
      return 0;
    });

    // The right size, then the preallocation QEMU's truncate would do.
    bdrv_poll_co(bs, 'qcow2_co_create', function* () {
      try {
        const r = yield* bdrv_co_truncate(blk!.root!, o.size, false, 'off', 0);
        if (r < 0) throw new QemuError(strerror(-r));
        yield* qcow2_co_preallocate(bs, 0, o.size, o.preallocation);
      } catch (e) {
        if (e instanceof QemuError) throw new QemuError(`Could not resize image: ${e.message}`);
        throw e;
      }
      return 0;
    });

    if (o.backing_file !== null) {
      const r = bs.drv!.bdrv_change_backing_file!(bs, o.backing_file, o.backing_fmt);
      if (r < 0) {
        throw new QemuError(`Could not assign backing file '${o.backing_file}' with format '${o.backing_fmt ?? '(null)'}': ${strerror(-r)}`);
      }
    }
  } finally {
    blk_unref(blk);
  }
}

/**
 * Creates a qcow2 image at `filename` from qemu-img style options. QEMU:
 * `qcow2_co_create_opts` + `qcow2_co_create`. Consumes every qcow2 option from `opts` (the rest
 * goes to the protocol driver), creates the file, and on failure deletes it again. Throws
 * QemuError with QEMU's messages (qemu-img prefixes them with the file name). Surprise: unlike
 * QEMU the file is created only after the options were validated, and external data files,
 * encryption and zstd compression are refused (aioco does not implement them).
 */
export function* qcow2_co_create_opts(_drv: BlockDriver, filename: string, opts: QemuOpts): CoroutineFn<number> {
  const { o, encrypt, data_file } = qcow2_parse_create_opts(opts);
  if (data_file !== null) throw new QemuError('aioco: qcow2 images with an external data file are not supported');
  if (encrypt) throw new QemuError('aioco: encrypted qcow2 images are not supported');
  if (o.compression_type !== 'zlib') throw new QemuError(`aioco: qcow2 compression type '${o.compression_type}' is not supported`);
  // What QEMU's truncate would refuse with -EFBIG (an L1 table over 32 MiB), and sizes beyond
  // aioco's exact-integer limit: -EFBIG, which qemu-img turns into "The image size is too large
  // for file format 'qcow2' (try using a larger cluster size)".
  const l2_entries = o.cluster_size / (o.extended_l2 ? 16 : 8);
  if (o.size > BDRV_MAX_LENGTH || Math.ceil(o.size / (o.cluster_size * l2_entries)) > QCOW_MAX_L1_SIZE / 8) return -EFBIG;

  yield* bdrv_co_create_file(filename, opts);
  try {
    yield* run_outside_coroutine(() => qcow2_create_sync(filename, o));
  } catch (e) {
    // QEMU: bdrv_co_delete_file_noerr.
    if (!path_has_protocol(filename)) {
      try {
        unlinkSync(filename);
      } catch {
        // Nothing to delete.
      }
    }
    throw e;
  }
  return 0;
}

