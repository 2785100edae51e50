/**
 * `aioco-img compare` (qemu-block.md 5.6): QEMU 7.2's `img_compare`, `check_empty_sectors`,
 * `compare_buffers` and `find_nonzero`. Exit codes: 0 identical, 1 different, 2 open error,
 * 3 block-status error, 4 read error.
 */
import type { Operation } from 'effection';
import {
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_ZERO,
  bdrv_co_block_status_above,
  blk_bs,
  blk_co_preadv,
  blk_getlength,
  blk_unref,
  qemu_blockalign,
  qemu_iovec_init_buf,
  QEMUIOVector,
  strerror,
  type BlockBackend,
  type BlockStatusOut,
  type CoroutineFn,
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
  error_exit,
  error_report,
  getopt_long,
  img_open,
  not_supported,
  type CoTask,
  type ImgIo,
} from './qemu-img-cmds.ts';

/** qemu-img's IO_BUF_SIZE: 2 MiB per read. */
export const IO_BUF_SIZE = 2 * 1024 * 1024;
const SECTOR = 512;

function is_zero(buf: Uint8Array, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (buf[i] !== 0) return false;
  return true;
}

/**
 * The offset of the first 512-byte sector of `buf[0, n)` holding a non-zero byte, or -1.
 * QEMU: `find_nonzero`.
 */
export function find_nonzero(buf: Uint8Array, n: number): number {
  const end = n - (n % SECTOR);
  let i = 0;
  for (; i < end; i += SECTOR) if (!is_zero(buf, i, i + SECTOR)) return i;
  if (i < n && !is_zero(buf, i, n)) return i;
  return -1;
}

/**
 * Compares two buffers sector by sector: whether the first sector differs, and in `out.pnum`
 * how many bytes from the start share that state. QEMU: `compare_buffers` with the default chunk.
 */
export function compare_buffers(b1: Uint8Array, b2: Uint8Array, bytes: number, out: { pnum: number }): boolean {
  const same = (a: number, len: number): boolean => {
    for (let k = a; k < a + len; k++) if (b1[k] !== b2[k]) return false;
    return true;
  };
  let i = Math.min(bytes, SECTOR);
  const res = !same(0, i);
  while (i < bytes) {
    const len = Math.min(bytes - i, SECTOR);
    if (!same(i, len) !== res) break;
    i += len;
  }
  out.pnum = i;
  return res;
}

function* pread(blk: BlockBackend, offset: number, bytes: number, buf: Uint8Array): CoroutineFn<number> {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  return yield* blk_co_preadv(blk, offset, bytes, q, 0);
}

interface CompareTask extends CoTask {
  io: ImgIo;
  quiet: boolean;
  strict: boolean;
  blk1: BlockBackend;
  blk2: BlockBackend;
  filename1: string;
  filename2: string;
  progress: QemuProgress;
}

function* check_empty_sectors(t: CompareTask, blk: BlockBackend, offset: number, bytes: number, filename: string, buf: Uint8Array): CoroutineFn<number> {
  const ret = yield* pread(blk, offset, bytes, buf);
  if (ret < 0) {
    error_report(t.io, `Error while reading offset ${offset} of ${filename}: ${strerror(-ret)}`);
    return 4;
  }
  const idx = find_nonzero(buf, bytes);
  if (idx >= 0) {
    if (!t.quiet) t.io.out(`Content mismatch at offset ${offset + idx}!\n`);
    return 1;
  }
  return 0;
}

function* compare_co(t: CompareTask): CoroutineFn<number> {
  const { io, blk1, blk2, filename1, filename2 } = t;
  const out = (s: string): void => {
    if (!t.quiet) io.out(s);
  };
  const bs1 = blk_bs(blk1)!;
  const bs2 = blk_bs(blk2)!;
  const buf1 = qemu_blockalign(bs1, IO_BUF_SIZE);
  const buf2 = qemu_blockalign(bs2, IO_BUF_SIZE);
  const total_size1 = blk_getlength(blk1);
  if (total_size1 < 0) {
    error_report(io, `Can't get size of ${filename1}: ${strerror(-total_size1)}`);
    return 4;
  }
  const total_size2 = blk_getlength(blk2);
  if (total_size2 < 0) {
    error_report(io, `Can't get size of ${filename2}: ${strerror(-total_size2)}`);
    return 4;
  }
  const total_size = Math.min(total_size1, total_size2);
  const progress_base = Math.max(total_size1, total_size2);
  t.progress.print(0, 100);
  if (t.strict && total_size1 !== total_size2) {
    out('Strict mode: Image size mismatch!\n');
    return 1;
  }
  const s1: BlockStatusOut = { pnum: 0, map: 0, file: null };
  const s2: BlockStatusOut = { pnum: 0, map: 0, file: null };
  let offset = 0;
  while (offset < total_size) {
    yield* coYieldIfDue(t);
    if (t.cancelled) return 1;
    const status1 = yield* bdrv_co_block_status_above(bs1, null, offset, total_size1 - offset, s1);
    if (status1 < 0) {
      error_report(io, `Sector allocation test failed for ${filename1}`);
      return 3;
    }
    const allocated1 = status1 & BDRV_BLOCK_ALLOCATED;
    const status2 = yield* bdrv_co_block_status_above(bs2, null, offset, total_size2 - offset, s2);
    if (status2 < 0) {
      error_report(io, `Sector allocation test failed for ${filename2}`);
      return 3;
    }
    const allocated2 = status2 & BDRV_BLOCK_ALLOCATED;
    let chunk = Math.min(s1.pnum, s2.pnum);
    if (t.strict && status1 !== status2) {
      out(`Strict mode: Offset ${offset} block status mismatch!\n`);
      return 1;
    }
    if (status1 & BDRV_BLOCK_ZERO && status2 & BDRV_BLOCK_ZERO) {
      // both read as zeroes
    } else if (allocated1 === allocated2) {
      if (allocated1) {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        let ret = yield* pread(blk1, offset, chunk, buf1);
        if (ret < 0) {
          error_report(io, `Error while reading offset ${offset} of ${filename1}: ${strerror(-ret)}`);
          return 4;
        }
        ret = yield* pread(blk2, offset, chunk, buf2);
        if (ret < 0) {
          error_report(io, `Error while reading offset ${offset} of ${filename2}: ${strerror(-ret)}`);
          return 4;
        }
        const p = { pnum: 0 };
        const diff = compare_buffers(buf1, buf2, chunk, p);
        if (diff || p.pnum !== chunk) {
          out(`Content mismatch at offset ${offset + (diff ? 0 : p.pnum)}!\n`);
          return 1;
        }
      }
    } else {
      chunk = Math.min(chunk, IO_BUF_SIZE);
      const ret = allocated1
        ? yield* check_empty_sectors(t, blk1, offset, chunk, filename1, buf1)
        : yield* check_empty_sectors(t, blk2, offset, chunk, filename2, buf1);
      if (ret) return ret;
    }
    offset += chunk;
    t.progress.print(Math.fround(Math.fround(chunk) / progress_base) * 100, 100);
  }
  if (total_size1 !== total_size2) {
    out('Warning: Image size mismatch!\n');
    const [blk_over, filename_over] = total_size1 > total_size2 ? [blk1, filename1] : [blk2, filename2];
    const s: BlockStatusOut = { pnum: 0, map: 0, file: null };
    while (offset < progress_base) {
      yield* coYieldIfDue(t);
      if (t.cancelled) return 1;
      const ret = yield* bdrv_co_block_status_above(blk_bs(blk_over)!, null, offset, progress_base - offset, s);
      if (ret < 0) {
        error_report(io, `Sector allocation test failed for ${filename_over}`);
        return 3;
      }
      let chunk = s.pnum;
      if (ret & BDRV_BLOCK_ALLOCATED && !(ret & BDRV_BLOCK_ZERO)) {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        const r = yield* check_empty_sectors(t, blk_over, offset, chunk, filename_over, buf1);
        if (r) return r;
      }
      offset += chunk;
      t.progress.print(Math.fround(Math.fround(chunk) / progress_base) * 100, 100);
    }
  }
  out('Images are identical.\n');
  return 0;
}

/** `qemu-img compare [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2`. */
export function* img_compare(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'hf:F:T:pqsU', [HELP_OPT, OBJECT_OPT, IMAGE_OPTS_OPT, FORCE_SHARE_OPT]);
  if (typeof g === 'number') return g;
  let fmt1: string | null = null;
  let fmt2: string | null = null;
  let cache = 'writeback';
  let progress = false;
  let quiet = false;
  let strict = false;
  let imageOpts = false;
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'f':
        fmt1 = o.arg;
        break;
      case 'F':
        fmt2 = o.arg;
        break;
      case 'T':
        cache = o.arg!;
        break;
      case 'p':
        progress = true;
        break;
      case 'q':
        quiet = true;
        break;
      case 's':
        strict = true;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'U':
        break;
      case 'object':
        return not_supported(io, '--object');
    }
  }
  if (quiet) progress = false;
  if (g.rest.length !== 2) return error_exit(io, 'Expecting two image file names');
  const [filename1, filename2] = g.rest as [string, string];
  const prog = new QemuProgress(io, progress, 2.0);
  try {
    const cm = bdrv_parse_cache_mode(cache, 0);
    if (!cm) {
      error_report(io, `Invalid source cache option: ${cache}`);
      return 2;
    }
    const blk1 = img_open(io, imageOpts, filename1, fmt1, cm.flags, cm.writethrough);
    if (!blk1) return 2;
    try {
      const blk2 = img_open(io, imageOpts, filename2, fmt2, cm.flags, cm.writethrough);
      if (!blk2) return 2;
      try {
        return yield* coTask(compare_co, { cancelled: false, io, quiet, strict, blk1, blk2, filename1, filename2, progress: prog });
      } finally {
        blk_unref(blk2);
      }
    } finally {
      blk_unref(blk1);
    }
  } finally {
    prog.end();
  }
}
