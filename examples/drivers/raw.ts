/**
 * The `raw` format driver (QEMU 7.2 block/raw-format.c): the image is its `file` child's bytes,
 * optionally a window of them (`offset`, `size`). Requests are forwarded to the child with the
 * offset added; with `size` set, requests leaving the window fail (-ENOSPC for writes, zero
 * writes and discards, -EINVAL for reads) so nothing outside it is touched.
 *
 * Without offset/size the child is FILTERED (raw acts like a filter); with either it is DATA.
 * Block status is RAW|OFFSET_VALID pointing into the child (the block layer asks the child).
 * `bdrv_probe` scores 1: raw is picked only when no other format recognises the image. A probed,
 * writable raw node restricts writes to the first 512 bytes (request_alignment 512, and the new
 * first sector must still probe as raw, else -EPERM).
 *
 * Importing this module registers the driver.
 */
import {
  bdrv_co_create_file,
  type QemuOpts,
  type QemuOptsList,
  bdrv_co_pdiscard,
  bdrv_co_preadv,
  bdrv_co_pwrite_zeroes,
  bdrv_co_pwritev,
  bdrv_co_truncate,
  bdrv_co_debug_event,
  bdrv_drivers,
  bdrv_get_info,
  bdrv_getlength,
  bdrv_open_child,
  bdrv_register,
  qemu_iovec_add,
  qemu_iovec_concat,
  qemu_iovec_init,
  qemu_iovec_to_buf,
  strerror,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_RAW,
  BDRV_CHILD_DATA,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_PRIMARY,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_WRITE_UNCHANGED,
  BDRV_REQ_ZERO_WRITE,
  BDRV_SECTOR_SIZE,
  BDRV_MAX_LENGTH,
  EINVAL,
  ENOSPC,
  EPERM,
  QEMUIOVector,
  QemuError,
  type BlockDriver,
  type BlockDriverInfo,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
  type PreallocMode,
  qemu_opt_get_size,
} from '../../src/index.ts';

/** Per-node state (QEMU's BDRVRawState). */
export interface BDRVRawState {
  offset: number;
  size: number;
  has_size: boolean;
}

/** Bytes of the first sector guarded on probed images (QEMU: BLOCK_PROBE_BUF_SIZE). */
const BLOCK_PROBE_BUF_SIZE = 512;

/** A size option, undefined when absent. */
function opt_get_size(options: Record<string, unknown>, name: string): number | undefined {
  return options[name] === undefined || options[name] === null ? undefined : qemu_opt_get_size(options, name, 0);
}

/**
 * Validates offset/size against the child's length and fills `s`. QEMU: `raw_apply_options`.
 * Unlike QEMU 7.2, whose messages print the node's previous offset/size (0 on the first open),
 * the messages show the requested values.
 */
function raw_apply_options(bs: BlockDriverState, s: BDRVRawState, offset: number, has_size: boolean, size: number): void {
  const real_size = bdrv_getlength(bs.file!.bs);
  if (real_size < 0) throw new QemuError(`Could not get image size: ${strerror(-real_size)}`);
  if (offset > real_size) {
    throw new QemuError(`Offset (${offset}) cannot be greater than size of the containing file (${real_size})`);
  }
  if (has_size && real_size - offset < size) {
    throw new QemuError(
      `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the ` +
        ` actual size of the containing file (${real_size})`,
    );
  }
  if (has_size && size % BDRV_SECTOR_SIZE !== 0) {
    throw new QemuError(`Specified size is not multiple of ${BDRV_SECTOR_SIZE}`);
  }
  s.offset = offset;
  s.has_size = has_size;
  s.size = has_size ? size : real_size - offset;
}

function raw_open(bs: BlockDriverState, options: Record<string, unknown>, _flags: number): void {
  const offset = opt_get_size(options, 'offset') ?? 0;
  const sizeOpt = opt_get_size(options, 'size');
  const has_size = sizeOpt !== undefined;
  delete options['offset'];
  delete options['size'];
  const file_role = offset || has_size ? BDRV_CHILD_DATA | BDRV_CHILD_PRIMARY : BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY;
  const s: BDRVRawState = { offset: 0, size: 0, has_size: false };
  bs.opaque = s;
  const file = bdrv_open_child(null, options, 'file', bs, file_role, false)!;
  const child = file.bs;
  bs.supported_write_flags = BDRV_REQ_WRITE_UNCHANGED | (BDRV_REQ_FUA & child.supported_write_flags);
  bs.supported_zero_flags =
    BDRV_REQ_WRITE_UNCHANGED | ((BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK) & child.supported_zero_flags);
  bs.supported_truncate_flags = child.supported_truncate_flags & BDRV_REQ_ZERO_WRITE;
  // The probing warning is printed by bdrv_open itself (src/block/block-driver-state.ts).
  raw_apply_options(bs, s, offset, has_size, sizeOpt ?? 0);
}

/**
 * Checks a request against the window and returns the child offset, or -errno. QEMU:
 * `raw_adjust_offset`.
 */
function raw_adjust_offset(bs: BlockDriverState, offset: number, bytes: number, is_write: boolean): number {
  const s = bs.opaque as BDRVRawState;
  if (s.has_size && (offset > s.size || bytes > s.size - offset)) return is_write ? -ENOSPC : -EINVAL;
  if (offset > BDRV_MAX_LENGTH - s.offset) return -EINVAL;
  return offset + s.offset;
}

function* raw_co_preadv(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number> {
  const off = raw_adjust_offset(bs, offset, bytes, false);
  if (off < 0) return off;
  // Guarded: a yield* costs even when no driver listens (blkdebug below raw is rare).
  if (bs.file!.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs.file!.bs, 'read_aio');
  return yield* bdrv_co_preadv(bs.file!, off, bytes, qiov, flags);
}

/** The registered format with the highest probe score for `buf` (QEMU: `bdrv_probe_all`). */
function probe_all(buf: Uint8Array): BlockDriver | null {
  let best: BlockDriver | null = null;
  let score = 0;
  for (const d of bdrv_drivers()) {
    if (!d.bdrv_probe) continue;
    const sc = d.bdrv_probe(buf, buf.length, null);
    if (sc > score) {
      score = sc;
      best = d;
    }
  }
  return best;
}

function* raw_co_pwritev(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number> {
  if (bs.probed && offset < BLOCK_PROBE_BUF_SIZE && bytes) {
    // request_alignment is 512 on probed nodes, so the request covers the whole first sector.
    if (offset !== 0 || bytes < BLOCK_PROBE_BUF_SIZE) return -EINVAL;
    const buf = new Uint8Array(BLOCK_PROBE_BUF_SIZE);
    if (qemu_iovec_to_buf(qiov, 0, buf, BLOCK_PROBE_BUF_SIZE) !== BLOCK_PROBE_BUF_SIZE) return -EINVAL;
    if (probe_all(buf) !== bs.drv) return -EPERM;
    // Write the checked copy: the caller's buffer could change meanwhile.
    const local = new QEMUIOVector();
    qemu_iovec_init(local, qiov.niov + 1);
    qemu_iovec_add(local, buf, BLOCK_PROBE_BUF_SIZE);
    qemu_iovec_concat(local, qiov, BLOCK_PROBE_BUF_SIZE, qiov.size - BLOCK_PROBE_BUF_SIZE);
    qiov = local;
  }
  const off = raw_adjust_offset(bs, offset, bytes, true);
  if (off < 0) return off;
  if (bs.file!.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs.file!.bs, 'write_aio');
  return yield* bdrv_co_pwritev(bs.file!, off, bytes, qiov, flags);
}

function* raw_co_pwrite_zeroes(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  const off = raw_adjust_offset(bs, offset, bytes, true);
  if (off < 0) return off;
  return yield* bdrv_co_pwrite_zeroes(bs.file!, off, bytes, flags);
}

function* raw_co_pdiscard(bs: BlockDriverState, offset: number, bytes: number): CoroutineFn<number> {
  const off = raw_adjust_offset(bs, offset, bytes, true);
  if (off < 0) return off;
  return yield* bdrv_co_pdiscard(bs.file!, off, bytes);
}

function* raw_co_block_status(
  bs: BlockDriverState,
  _want_zero: boolean,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
): CoroutineFn<number> {
  const s = bs.opaque as BDRVRawState;
  out.pnum = bytes;
  out.file = bs.file!.bs;
  out.map = offset + s.offset;
  return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID;
}

/** The child's length minus the offset, kept within `size`. QEMU: `raw_getlength`. */
function raw_getlength(bs: BlockDriverState): number {
  const s = bs.opaque as BDRVRawState;
  const len = bdrv_getlength(bs.file!.bs);
  if (len < 0) return len;
  if (len < s.offset) s.size = 0;
  else if (s.has_size) s.size = Math.min(s.size, len - s.offset);
  else s.size = len - s.offset;
  return s.size;
}

function raw_refresh_limits(bs: BlockDriverState): void {
  // Probed images: sub-sector writes become read-modify-write, so the first sector can be checked.
  if (bs.probed) bs.bl.request_alignment = BDRV_SECTOR_SIZE;
}

function* raw_co_truncate(bs: BlockDriverState, offset: number, exact: boolean, prealloc: PreallocMode, flags: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVRawState;
  if (s.has_size) throw new QemuError('Cannot resize fixed-size raw disks');
  if (BDRV_MAX_LENGTH - offset < s.offset) throw new QemuError('Disk size too large for the chosen offset');
  s.size = offset;
  return yield* bdrv_co_truncate(bs.file!, offset + s.offset, exact, prealloc, flags);
}

function raw_probe(_buf: Uint8Array, _buf_size: number, _filename: string | null): number {
  // Lowest positive score: raw only when nothing else matches.
  return 1;
}

/** What the file child says (qemu-img info's dirty-flag for raw comes from here). QEMU: `raw_get_info`. */
function raw_get_info(bs: BlockDriverState, bdi: BlockDriverInfo): number {
  return bdrv_get_info(bs.file!.bs, bdi);
}

/** QEMU's raw_create_opts: only the size; the protocol adds its own options. */
const raw_create_opts: QemuOptsList = {
  name: 'raw-create-opts',
  desc: [{ name: 'size', type: 'size', help: 'Virtual disk size' }],
};

/** A raw image is just its file. QEMU: `raw_co_create_opts` (bdrv_co_create_file). */
function* raw_co_create_opts(_drv: BlockDriver, filename: string, opts: QemuOpts): CoroutineFn<number> {
  return yield* bdrv_co_create_file(filename, opts);
}

/** The `raw` format driver. */
export const bdrv_raw: BlockDriver = {
  format_name: 'raw',
  is_format: true,
  has_variable_length: true,
  runtime_opts: ['offset', 'size'],
  bdrv_probe: raw_probe,
  bdrv_open: raw_open,
  bdrv_getlength: raw_getlength,
  bdrv_refresh_limits: raw_refresh_limits,
  bdrv_co_preadv: raw_co_preadv,
  bdrv_co_pwritev: raw_co_pwritev,
  bdrv_co_pwrite_zeroes: raw_co_pwrite_zeroes,
  bdrv_co_pdiscard: raw_co_pdiscard,
  bdrv_co_block_status: raw_co_block_status,
  bdrv_co_truncate: raw_co_truncate,
  bdrv_get_info: raw_get_info,
  create_opts: raw_create_opts,
  bdrv_co_create_opts: raw_co_create_opts,
};

bdrv_register(bdrv_raw);
