/**
 * `aioco-img convert` (qemu-block.md 5.5): QEMU 7.2's `img_convert` and its copy engine
 * (`convert_do_copy`, `convert_co_do_copy` workers, `convert_iteration_sectors`,
 * `convert_co_read`, `convert_co_write`, `is_allocated_sectors(_min)`), progress with `-p`.
 * The workers are coroutines on the main AioContext (driven by Node's loop); `-m` of them are
 * in flight, writing in order unless `-W`. Ctrl-C makes them stop after their current request;
 * the target is then closed normally (a qcow2 target's metadata is flushed), and the exit
 * status is 130 (effection's main).
 */
import type { Operation } from 'effection';
import {
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_ZERO,
  BDRV_O_NOCACHE,
  BDRV_O_RDWR,
  BDRV_O_RESIZE,
  BDRV_O_UNMAP,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_WRITE_COMPRESSED,
  CoMutex,
  ECANCELED,
  EINPROGRESS,
  EINVAL,
  QEMUIOVector,
  QemuError,
  aio_co_wake,
  bdrv_co_block_status_above,
  bdrv_create,
  bdrv_find_format,
  bdrv_get_info,
  bdrv_getlength,
  blk_bs,
  blk_co_preadv,
  blk_co_pwrite_zeroes,
  blk_co_pwritev,
  blk_getlength,
  blk_unref,
  block_driver_info_new,
  qemu_blockalign,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_iovec_init_buf,
  qemu_opt_get,
  qemu_opt_set,
  qemu_opts_create,
  qemu_opts_do_parse,
  strerror,
  type BlockBackend,
  type BlockDriver,
  type BlockDriverState,
  type BlockStatusOut,
  type Coroutine,
  type CoroutineFn,
  type QemuOpts,
} from '../../src/index.ts';
import {
  FORCE_SHARE_OPT,
  HELP_OPT,
  IMAGE_OPTS_OPT,
  OBJECT_OPT,
  QemuProgress,
  bdrv_parse_cache_mode,
  coTask,
  coYieldIfDue,
  cvtnum,
  error_report,
  getopt_long,
  img_open,
  not_supported,
  type CoTask,
  type ImgIo,
} from './qemu-img-cmds.ts';
import { accumulate_options, create_opts_for, has_help_option, print_block_option_help, report_err } from './qemu-img-create.ts';
import { IO_BUF_SIZE } from './qemu-img-compare.ts';
import { strtol0 } from './qemu-io-format.ts';

const SECTOR = 512;
const MAX_COROUTINES = 16;
const MAX_BUF_SECTORS = 32768;
/** BDRV_REQUEST_MAX_SECTORS: INT_MAX >> 9. */
const BDRV_REQUEST_MAX_SECTORS = 0x7fffffff >> 9;

/** What a stretch of the source is, for the target: `enum ImgConvertBlockStatus`. */
export const BLK_DATA = 0;
export const BLK_ZERO = 1;
export const BLK_BACKING_FILE = 2;

/** Whether `buf[start, start + len)` is all zero. QEMU: `buffer_is_zero`. */
export function buffer_is_zero(buf: Uint8Array, start: number, len: number): boolean {
  if (len === 0) return true;
  // Data usually shows at either end: answer before making a word view (one allocation per sector).
  if (buf[start] !== 0 || buf[start + len - 1] !== 0) return false;
  let i = start;
  const end = start + len;
  const abs = buf.byteOffset + i;
  if ((abs & 3) === 0 && len >= 64) {
    const words = new Uint32Array(buf.buffer, abs, len >> 2);
    for (let k = 0; k < words.length; k++) if (words[k] !== 0) return false;
    i += words.length << 2;
  }
  for (; i < end; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * Whether the first sector of `buf` holds data, and in `out.pnum` how many sectors from there
 * share that state, ends aligned to `alignment` sectors where possible. QEMU:
 * `is_allocated_sectors`.
 */
export function is_allocated_sectors(buf: Uint8Array, off: number, n: number, out: { pnum: number }, sector_num: number, alignment: number): boolean {
  if (n <= 0) {
    out.pnum = 0;
    return false;
  }
  let is_zero = buffer_is_zero(buf, off, SECTOR);
  let i = 1;
  for (; i < n; i++) if (is_zero !== buffer_is_zero(buf, off + i * SECTOR, SECTOR)) break;
  if (i === n) {
    out.pnum = i;
    return !is_zero;
  }
  const tail = (sector_num + i) & (alignment - 1);
  if (tail) {
    // Zeroes up to the next aligned boundary would be rewritten by read-modify-write anyway.
    if (is_zero && i <= tail) is_zero = false;
    if (!is_zero) i = Math.min(i + alignment - tail, n);
    else i -= tail;
  }
  out.pnum = i;
  return !is_zero;
}

/**
 * Like `is_allocated_sectors`, but after data, runs of fewer than `min` zero sectors count as
 * data, so writes are not split for small holes. QEMU: `is_allocated_sectors_min`.
 */
export function is_allocated_sectors_min(buf: Uint8Array, off: number, n: number, out: { pnum: number }, min: number, sector_num: number, alignment: number): boolean {
  if (n < min) min = n;
  let ret = is_allocated_sectors(buf, off, n, out, sector_num, alignment);
  if (!ret) return ret;
  let num_used = out.pnum;
  let p = off + SECTOR * out.pnum;
  n -= out.pnum;
  sector_num += out.pnum;
  let num_checked = num_used;
  while (n > 0) {
    ret = is_allocated_sectors(buf, p, n, out, sector_num, alignment);
    p += SECTOR * out.pnum;
    n -= out.pnum;
    sector_num += out.pnum;
    num_checked += out.pnum;
    if (ret) num_used = num_checked;
    else if (out.pnum >= min) break;
  }
  out.pnum = num_used;
  return true;
}

/** QEMU's `ImgConvertState`, plus the Ctrl-C flag and where to print. */
export interface ImgConvertState extends CoTask {
  io: ImgIo;
  src: BlockBackend[];
  src_sectors: number[];
  src_alignment: number[];
  total_sectors: number;
  allocated_sectors: number;
  allocated_done: number;
  sector_num: number;
  wr_offs: number;
  status: number;
  sector_next_status: number;
  target: BlockBackend | null;
  has_zero_init: boolean;
  compressed: boolean;
  target_is_new: boolean;
  target_has_backing: boolean;
  target_backing_sectors: number;
  wr_in_order: boolean;
  quiet: boolean;
  min_sparse: number;
  alignment: number;
  cluster_sectors: number;
  buf_sectors: number;
  num_coroutines: number;
  running_coroutines: number;
  co: (Coroutine | null)[];
  wait_sector_num: number[];
  lock: CoMutex;
  ret: number;
  progress: QemuProgress;
  waiter: Coroutine | null;
}

function convert_select_part(s: ImgConvertState, sector_num: number): { src_cur: number; src_cur_offset: number } {
  let src_cur = 0;
  let src_cur_offset = 0;
  while (sector_num - src_cur_offset >= s.src_sectors[src_cur]!) {
    src_cur_offset += s.src_sectors[src_cur]!;
    src_cur++;
  }
  return { src_cur, src_cur_offset };
}

/**
 * How many sectors from `sector_num` share one status (set in `s.status`), or -errno. QEMU:
 * `convert_iteration_sectors`.
 */
function* convert_iteration_sectors(s: ImgConvertState, sector_num: number): CoroutineFn<number> {
  const { src_cur, src_cur_offset } = convert_select_part(s, sector_num);
  let n = Math.min(s.total_sectors - sector_num, BDRV_REQUEST_MAX_SECTORS);
  let post_backing_zero = false;
  if (s.target_backing_sectors >= 0) {
    if (sector_num >= s.target_backing_sectors) post_backing_zero = true;
    else if (sector_num + n > s.target_backing_sectors) n = s.target_backing_sectors - sector_num;
  }
  if (s.sector_next_status <= sector_num) {
    const offset = (sector_num - src_cur_offset) * SECTOR;
    const src_bs = blk_bs(s.src[src_cur]!)!;
    const base = s.target_has_backing ? (src_bs.backing?.bs ?? null) : null;
    const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
    const ret = yield* bdrv_co_block_status_above(src_bs, base, offset, n * SECTOR, out);
    if (ret < 0) {
      error_report(s.io, `error while reading block status at offset ${offset}: ${strerror(-ret)}`);
      return ret;
    }
    n = Math.ceil(out.pnum / SECTOR);
    // Keep the next status lookup aligned to the source's request alignment / cluster size.
    const tail = (sector_num - src_cur_offset + n) % s.src_alignment[src_cur]!;
    if (n > tail) n -= tail;
    if (ret & BDRV_BLOCK_ZERO) s.status = post_backing_zero ? BLK_BACKING_FILE : BLK_ZERO;
    else if (ret & BDRV_BLOCK_DATA) s.status = BLK_DATA;
    else s.status = s.target_has_backing ? BLK_BACKING_FILE : BLK_DATA;
    s.sector_next_status = sector_num + n;
  }
  n = Math.min(n, s.sector_next_status - sector_num);
  if (s.status === BLK_DATA) n = Math.min(n, s.buf_sectors);
  // Compressed images are written in whole clusters.
  if (s.compressed) {
    if (n < s.cluster_sectors) {
      n = Math.min(s.cluster_sectors, s.total_sectors - sector_num);
      s.status = BLK_DATA;
    } else {
      n -= n % s.cluster_sectors;
    }
  }
  return n;
}

function buf_qiov(buf: Uint8Array, off: number, bytes: number): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf.subarray(off, off + bytes), bytes);
  return q;
}

/** Reads `nb_sectors` at `sector_num` across the sources into `buf`. QEMU: `convert_co_read`. */
function* convert_co_read(s: ImgConvertState, sector_num: number, nb_sectors: number, buf: Uint8Array): CoroutineFn<number> {
  let off = 0;
  while (nb_sectors > 0) {
    const { src_cur, src_cur_offset } = convert_select_part(s, sector_num);
    const blk = s.src[src_cur]!;
    const bs_sectors = s.src_sectors[src_cur]!;
    const offset = (sector_num - src_cur_offset) * SECTOR;
    const n = Math.min(nb_sectors, bs_sectors - (sector_num - src_cur_offset));
    const ret = yield* blk_co_preadv(blk, offset, n * SECTOR, buf_qiov(buf, off, n * SECTOR), 0);
    if (ret < 0) return ret;
    sector_num += n;
    nb_sectors -= n;
    off += n * SECTOR;
  }
  return 0;
}

/** Writes (or zeroes, or leaves to the backing file) a stretch. QEMU: `convert_co_write`. */
function* convert_co_write(s: ImgConvertState, sector_num: number, nb_sectors: number, buf: Uint8Array, status: number): CoroutineFn<number> {
  const target = s.target!;
  let off = 0;
  const pn = { pnum: 0 };
  while (nb_sectors > 0) {
    let n = nb_sectors;
    const flags = s.compressed ? BDRV_REQ_WRITE_COMPRESSED : 0;
    let zero = false;
    if (status === BLK_DATA) {
      let write = !s.min_sparse;
      if (!write && !s.compressed) {
        write = is_allocated_sectors_min(buf, off, n, pn, s.min_sparse, sector_num, s.alignment);
        n = pn.pnum;
      } else if (!write) {
        write = !buffer_is_zero(buf, off, n * SECTOR);
      }
      if (write) {
        const ret = yield* blk_co_pwritev(target, sector_num * SECTOR, n * SECTOR, buf_qiov(buf, off, n * SECTOR), flags);
        if (ret < 0) return ret;
      } else {
        zero = true;
      }
    } else if (status === BLK_ZERO) {
      zero = true;
    }
    if (zero && !s.has_zero_init) {
      const ret = yield* blk_co_pwrite_zeroes(target, sector_num * SECTOR, n * SECTOR, BDRV_REQ_MAY_UNMAP);
      if (ret < 0) return ret;
    }
    sector_num += n;
    nb_sectors -= n;
    off += n * SECTOR;
  }
  return 0;
}

function noteCancel(s: ImgConvertState): void {
  if (s.cancelled && s.ret === -EINPROGRESS) s.ret = -ECANCELED;
}

/** One worker: takes the next stretch under the lock, reads, writes (in order unless -W). QEMU: `convert_co_do_copy`. */
function* convert_co_do_copy(s: ImgConvertState): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  const index = s.co.indexOf(self);
  s.running_coroutines++;
  const buf = qemu_blockalign(blk_bs(s.target!), s.buf_sectors * SECTOR);
  for (;;) {
    yield* coYieldIfDue(s);
    noteCancel(s);
    yield* qemu_co_mutex_lock(s.lock);
    if (s.ret !== -EINPROGRESS || s.sector_num >= s.total_sectors) {
      qemu_co_mutex_unlock(s.lock);
      break;
    }
    let n = yield* convert_iteration_sectors(s, s.sector_num);
    if (n < 0) {
      qemu_co_mutex_unlock(s.lock);
      s.ret = n;
      break;
    }
    const sector_num = s.sector_num;
    let status = s.status;
    if (!s.min_sparse && s.status === BLK_ZERO) n = Math.min(n, s.buf_sectors);
    // Others may look past this stretch while it is copied.
    s.sector_num += n;
    qemu_co_mutex_unlock(s.lock);
    if (status === BLK_DATA || (!s.min_sparse && status === BLK_ZERO)) {
      s.allocated_done += n;
      s.progress.print((100.0 * s.allocated_done) / s.allocated_sectors, 0);
    }
    if (status === BLK_DATA) {
      const ret = yield* convert_co_read(s, sector_num, n, buf);
      if (ret < 0) {
        error_report(s.io, `error while reading at byte ${sector_num * SECTOR}: ${strerror(-ret)}`);
        s.ret = ret;
      }
    } else if (!s.min_sparse && status === BLK_ZERO) {
      status = BLK_DATA;
      buf.fill(0, 0, n * SECTOR);
    }
    noteCancel(s);
    if (s.wr_in_order) {
      while (s.wr_offs !== sector_num && s.ret === -EINPROGRESS) {
        s.wait_sector_num[index] = sector_num;
        yield* qemu_coroutine_yield();
      }
      s.wait_sector_num[index] = -1;
    }
    if (s.ret === -EINPROGRESS) {
      const ret = yield* convert_co_write(s, sector_num, n, buf, status);
      if (ret < 0) {
        error_report(s.io, `error while writing at byte ${sector_num * SECTOR}: ${strerror(-ret)}`);
        s.ret = ret;
      }
    }
    if (s.wr_in_order) {
      // Let the worker waiting for this stretch to be written go on.
      s.wr_offs = sector_num + n;
      for (let i = 0; i < s.num_coroutines; i++) {
        const c = s.co[i];
        if (c && s.wait_sector_num[i] === s.wr_offs) {
          qemu_coroutine_enter(c);
          break;
        }
      }
    }
  }
  s.co[index] = null;
  s.running_coroutines--;
  if (!s.running_coroutines && s.ret === -EINPROGRESS) s.ret = 0;
  // Wake a worker still parked for order (after an error or Ctrl-C nobody else will).
  for (let i = 0; i < s.num_coroutines; i++) {
    const c = s.co[i];
    if (c && s.wait_sector_num[i] !== -1) {
      s.wait_sector_num[i] = -1;
      qemu_coroutine_enter(c);
      break;
    }
  }
  if (!s.running_coroutines && s.waiter) {
    const w = s.waiter;
    s.waiter = null;
    aio_co_wake(w);
  }
}

/** Counts what to copy, runs the workers, waits for them. QEMU: `convert_do_copy`. Returns 0 or -errno. */
export function* convert_do_copy(s: ImgConvertState): CoroutineFn<number> {
  if (!s.has_zero_init && s.target_is_new && s.min_sparse && !s.target_has_backing) s.has_zero_init = has_zero_init(blk_bs(s.target!)!);
  if (s.compressed) {
    if (s.cluster_sectors <= 0 || s.cluster_sectors > s.buf_sectors) {
      error_report(s.io, 'invalid cluster size');
      return -EINVAL;
    }
    s.buf_sectors = s.cluster_sectors;
  }
  let sector_num = 0;
  while (sector_num < s.total_sectors) {
    yield* coYieldIfDue(s);
    if (s.cancelled) return -ECANCELED;
    const n = yield* convert_iteration_sectors(s, sector_num);
    if (n < 0) return n;
    if (s.status === BLK_DATA || (!s.min_sparse && s.status === BLK_ZERO)) s.allocated_sectors += n;
    sector_num += n;
  }
  s.sector_next_status = 0;
  s.ret = -EINPROGRESS;
  for (let i = 0; i < s.num_coroutines; i++) {
    s.co[i] = qemu_coroutine_create(convert_co_do_copy, s, `convert-${i}`);
    s.wait_sector_num[i] = -1;
  }
  for (let i = 0; i < s.num_coroutines; i++) if (s.co[i]) qemu_coroutine_enter(s.co[i]!);
  while (s.running_coroutines) {
    // Only a parked waiter may be woken: workers can also finish inside the enters above.
    s.waiter = qemu_coroutine_self();
    yield* qemu_coroutine_yield();
    s.waiter = null;
  }
  if (s.compressed && !s.ret) {
    // A zero-length compressed write tells the driver the stream ended (it aligns the file).
    const ret = yield* blk_co_pwritev(s.target!, 0, 0, null, BDRV_REQ_WRITE_COMPRESSED);
    if (ret < 0) return ret;
  }
  return s.ret;
}

/**
 * Whether a newly created node reads as zeroes everywhere. QEMU's `bdrv_has_zero_init`, which
 * aioco's core lacks: raw and qcow2 (without preallocated data file) on a regular host file
 * answer 1 in QEMU 7.2, anything else 0 (then zeroes are written explicitly).
 */
function has_zero_init(bs: BlockDriverState): boolean {
  if (bs.backing) return false;
  const name = bs.drv?.format_name;
  if (name === 'file') return true;
  if ((name === 'raw' || name === 'qcow2') && bs.file) return has_zero_init(bs.file.bs);
  return false;
}

function block_driver_can_compress(drv: BlockDriver | null | undefined): boolean {
  return !!(drv?.bdrv_co_pwritev_compressed || drv?.bdrv_co_pwritev_compressed_part);
}

/**
 * `qemu-img convert [-f fmt] [-O output_fmt] [-o options] [-c] [-p] [-q] [-n] [-S sparse_size]
 * [-m num] [-W] [-t cache] [-T src_cache] [-B backing [-F fmt]] [--target-is-zero]
 * [--image-opts] [--target-image-opts] [-U] [-C] filename [filename2 [...]] output_filename`.
 * Refused: -l, -r, --bitmaps, --skip-broken-bitmaps, --salvage, --object. `-C` is accepted and
 * falls back to ordinary copying, as QEMU does where offloading is unavailable.
 */
export function* img_convert(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:', [
    HELP_OPT,
    OBJECT_OPT,
    IMAGE_OPTS_OPT,
    FORCE_SHARE_OPT,
    { name: 'target-image-opts', arg: false, key: 'target-image-opts' },
    { name: 'salvage', arg: false, key: 'salvage' },
    { name: 'target-is-zero', arg: false, key: 'target-is-zero' },
    { name: 'bitmaps', arg: false, key: 'bitmaps' },
    { name: 'skip-broken-bitmaps', arg: false, key: 'skip-broken-bitmaps' },
  ]);
  if (typeof g === 'number') return g;
  let fmt: string | null = null;
  let out_fmt: string | null = null;
  let cache = 'unsafe';
  let src_cache = 'writeback';
  let out_baseimg: string | null = null;
  let backing_fmt: string | null = null;
  let options: string | null = null;
  let image_opts = false;
  let tgt_image_opts = false;
  let skip_create = false;
  let progress = false;
  const s: ImgConvertState = {
    cancelled: false,
    io,
    src: [],
    src_sectors: [],
    src_alignment: [],
    total_sectors: 0,
    allocated_sectors: 0,
    allocated_done: 0,
    sector_num: 0,
    wr_offs: 0,
    status: BLK_DATA,
    sector_next_status: 0,
    target: null,
    has_zero_init: false,
    compressed: false,
    target_is_new: false,
    target_has_backing: false,
    target_backing_sectors: -1,
    wr_in_order: true,
    quiet: false,
    min_sparse: 8,
    alignment: 1,
    cluster_sectors: 0,
    buf_sectors: IO_BUF_SIZE / SECTOR,
    num_coroutines: 8,
    running_coroutines: 0,
    co: [],
    wait_sector_num: [],
    lock: new CoMutex(),
    ret: 0,
    progress: new QemuProgress(io, false, 1.0),
    waiter: null,
  };
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'f':
        fmt = o.arg;
        break;
      case 'O':
        out_fmt = o.arg;
        break;
      case 'B':
        out_baseimg = o.arg;
        break;
      case 'F':
        backing_fmt = o.arg;
        break;
      case 'C':
        break;
      case 'c':
        s.compressed = true;
        break;
      case 'o': {
        const r = accumulate_options(io, options, o.arg!);
        if (r === false) return 1;
        options = r;
        break;
      }
      case 'S': {
        const v = cvtnum(io, 'buffer size for sparse output', o.arg!);
        if (v === null) return 1;
        if (v % SECTOR !== 0 || v / SECTOR > MAX_BUF_SECTORS) {
          error_report(
            io,
            `Invalid buffer size for sparse output specified. Valid sizes are multiples of ${SECTOR} up to ${MAX_BUF_SECTORS * SECTOR}. Select 0 to disable sparse detection (fully allocates output).`,
          );
          return 1;
        }
        s.min_sparse = v / SECTOR;
        break;
      }
      case 'p':
        progress = true;
        break;
      case 't':
        cache = o.arg!;
        break;
      case 'T':
        src_cache = o.arg!;
        break;
      case 'q':
        s.quiet = true;
        break;
      case 'n':
        skip_create = true;
        break;
      case 'm': {
        // QEMU: qemu_strtol(optarg, NULL, 0, &n), then 1 <= n <= MAX_COROUTINES.
        const v = strtol0(o.arg!);
        if (v === null || v < 1 || v > MAX_COROUTINES) {
          error_report(io, `Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_COROUTINES}`);
          return 1;
        }
        s.num_coroutines = Number(v);
        break;
      }
      case 'W':
        s.wr_in_order = false;
        break;
      case 'U':
        break;
      case 'image-opts':
        image_opts = true;
        break;
      case 'target-image-opts':
        tgt_image_opts = true;
        break;
      case 'target-is-zero':
        s.has_zero_init = true;
        break;
      case 'l':
        return not_supported(io, '-l (snapshots)');
      case 'r':
        return not_supported(io, '-r (rate limit)');
      case 'salvage':
      case 'bitmaps':
      case 'skip-broken-bitmaps':
      case 'object':
        return not_supported(io, `--${o.c}`);
    }
  }
  if (!out_fmt && !tgt_image_opts) out_fmt = 'raw';
  if (tgt_image_opts && !skip_create) {
    error_report(io, '--target-image-opts requires use of -n flag');
    return 1;
  }
  if (skip_create && options !== null) {
    error_report(io, '-o has no effect when skipping image creation');
    return 1;
  }
  if (s.has_zero_init && !skip_create) {
    error_report(io, '--target-is-zero requires use of -n flag');
    return 1;
  }
  const src_num = g.rest.length - 1;
  const out_filename = src_num >= 1 ? g.rest[g.rest.length - 1]! : null;
  if (options !== null && has_help_option(options)) {
    if (out_fmt) return print_block_option_help(io, out_filename, out_fmt);
    error_report(io, 'Option help requires a format be specified');
    return 1;
  }
  if (src_num < 1) {
    error_report(io, 'Must specify image file name');
    return 1;
  }
  const scm = bdrv_parse_cache_mode(src_cache, 0);
  if (!scm) {
    error_report(io, `Invalid source cache option: ${src_cache}`);
    return 1;
  }
  if (s.quiet) progress = false;
  s.progress = new QemuProgress(io, progress, 1.0);
  s.progress.print(0, 100);
  let ret = -EINVAL;
  try {
    ret = yield* convert_body(s, {
      srcs: g.rest.slice(0, src_num),
      out_filename: out_filename!,
      fmt,
      out_fmt,
      cache,
      src_flags: scm.flags,
      src_writethrough: scm.writethrough,
      image_opts,
      tgt_image_opts,
      skip_create,
      options,
      out_baseimg,
      backing_fmt,
    });
    if (!ret) s.progress.print(100, 0);
  } finally {
    s.progress.end();
    if (s.target) blk_unref(s.target);
    for (const b of s.src) blk_unref(b);
  }
  return ret ? 1 : 0;
}

interface ConvertArgs {
  srcs: string[];
  out_filename: string;
  fmt: string | null;
  out_fmt: string | null;
  cache: string;
  src_flags: number;
  src_writethrough: boolean;
  image_opts: boolean;
  tgt_image_opts: boolean;
  skip_create: boolean;
  options: string | null;
  out_baseimg: string | null;
  backing_fmt: string | null;
}

/** img_convert after option parsing: opens, creates, copies. Returns 0 or non-zero. */
function* convert_body(s: ImgConvertState, a: ConvertArgs): Operation<number> {
  const io = s.io;
  for (const name of a.srcs) {
    const blk = img_open(io, a.image_opts, name, a.fmt, a.src_flags, a.src_writethrough);
    if (!blk) return -1;
    s.src.push(blk);
    const len = blk_getlength(blk);
    if (len < 0) {
      error_report(io, `Could not get size of ${name}: ${strerror(-len)}`);
      return -1;
    }
    const sectors = Math.ceil(len / SECTOR);
    s.src_sectors.push(sectors);
    const bs = blk_bs(blk)!;
    let align = Math.ceil(bs.bl.request_alignment / SECTOR);
    const bdi = block_driver_info_new();
    if (!bdrv_get_info(bs, bdi)) align = Math.max(align, bdi.cluster_size / SECTOR);
    s.src_alignment.push(Math.max(align, 1));
    s.total_sectors += sectors;
  }
  let drv: BlockDriver | null = null;
  let opts: QemuOpts | null = null;
  if (!a.skip_create) {
    drv = bdrv_find_format(a.out_fmt!);
    try {
      opts = qemu_opts_create(create_opts_for(a.out_fmt!, a.out_filename));
      if (a.options !== null) qemu_opts_do_parse(opts, a.options);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      error_report(io, e.message);
      return -1;
    }
    qemu_opt_set(opts, 'size', String(s.total_sectors * SECTOR));
    if (a.out_baseimg !== null) {
      try {
        qemu_opt_set(opts, 'backing_file', a.out_baseimg);
      } catch {
        error_report(io, `Backing file not supported for file format '${a.out_fmt}'`);
        return -1;
      }
    }
    if (a.backing_fmt !== null) {
      try {
        qemu_opt_set(opts, 'backing_fmt', a.backing_fmt);
      } catch {
        error_report(io, `Backing file format not supported for file format '${a.out_fmt}'`);
        return -1;
      }
    }
  }
  const has = (n: string): boolean => !!opts && opts.list.desc.some((d) => d.name === n);
  const out_baseimg_param = has('backing_file') ? qemu_opt_get(opts!, 'backing_file') : null;
  const out_baseimg = out_baseimg_param ?? a.out_baseimg;
  s.target_has_backing = out_baseimg !== null;
  if (s.has_zero_init && s.target_has_backing) {
    error_report(io, 'Cannot use --target-is-zero when the destination image has a backing file');
    return -1;
  }
  if (a.srcs.length > 1 && out_baseimg !== null) {
    error_report(io, 'Having a backing file for the target makes no sense when concatenating multiple input images');
    return -1;
  }
  if (out_baseimg_param !== null && !(has('backing_fmt') && qemu_opt_get(opts!, 'backing_fmt'))) {
    error_report(io, 'Use of backing file requires explicit backing format');
    return -1;
  }
  if (s.compressed) {
    if (drv && !block_driver_can_compress(drv)) {
      error_report(io, 'Compression not supported for this file format');
      return -1;
    }
    const encrypt = has('encrypt') ? qemu_opt_get(opts!, 'encrypt') : null;
    if ((encrypt !== null && encrypt !== 'off') || (has('encrypt.format') && qemu_opt_get(opts!, 'encrypt.format'))) {
      error_report(io, 'Compression and encryption not supported at the same time');
      return -1;
    }
    const prealloc = has('preallocation') ? qemu_opt_get(opts!, 'preallocation') : null;
    if (prealloc !== null && prealloc !== 'off') {
      error_report(io, 'Compression and preallocation not supported at the same time');
      return -1;
    }
  }
  if (!a.skip_create) {
    try {
      bdrv_create(drv!, a.out_filename, opts!);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      report_err(io, `${a.out_filename}: error while converting ${a.out_fmt}: `, e);
      return -1;
    }
  }
  s.target_is_new = !a.skip_create;
  let flags = s.min_sparse ? BDRV_O_RDWR | BDRV_O_UNMAP : BDRV_O_RDWR;
  const cm = bdrv_parse_cache_mode(a.cache, flags);
  if (!cm) {
    error_report(io, `Invalid cache option: ${a.cache}`);
    return -1;
  }
  flags = cm.flags;
  // With O_DIRECT the target may need to grow to the physical sector size.
  if (flags & BDRV_O_NOCACHE) flags |= BDRV_O_RESIZE;
  s.target = img_open(io, a.tgt_image_opts, a.out_filename, a.tgt_image_opts ? null : a.out_fmt, flags, cm.writethrough);
  if (!s.target) return -1;
  const out_bs = blk_bs(s.target)!;
  if (s.compressed && !block_driver_can_compress(out_bs.drv)) {
    error_report(io, 'Compression not supported for this file format');
    return -1;
  }
  s.buf_sectors = Math.min(MAX_BUF_SECTORS, Math.max(s.buf_sectors, out_bs.bl.opt_transfer / SECTOR, out_bs.bl.pdiscard_alignment / SECTOR));
  const pow2floor = (v: number): number => (v <= 0 ? 0 : 2 ** Math.floor(Math.log2(v)));
  s.alignment = Math.max(pow2floor(s.min_sparse), Math.ceil(out_bs.bl.request_alignment / SECTOR), 1);
  if (a.skip_create) {
    const len = blk_getlength(s.target);
    if (len < 0) {
      error_report(io, `unable to get output image length: ${strerror(-len)}`);
      return -1;
    }
    if (Math.ceil(len / SECTOR) < s.total_sectors) {
      error_report(io, 'output file is smaller than input file');
      return -1;
    }
  }
  if (s.target_has_backing && s.target_is_new && out_bs.backing) {
    const len = bdrv_getlength(out_bs.backing.bs);
    s.target_backing_sectors = len < 0 ? -1 : Math.ceil(len / SECTOR);
  } else {
    s.target_backing_sectors = -1;
  }
  const bdi = block_driver_info_new();
  if (bdrv_get_info(out_bs, bdi) < 0) {
    if (s.compressed) {
      error_report(io, 'could not get block driver info');
      return -1;
    }
  } else {
    s.compressed = s.compressed || bdi.needs_compressed_writes;
    s.cluster_sectors = bdi.cluster_size / SECTOR;
  }
  return yield* coTask(convert_do_copy, s);
}
