/**
 * The commands of QEMU 7.2's qemu-io (qemu-io-cmds.c; qemu-block.md 4.2-4.6) on an aioco
 * BlockBackend. Each command is an effection operation returning 0 or -errno; a synchronous
 * command waits only for its own request (a blocking aio_poll bounded by that request), during
 * which completions of earlier aio_read/aio_write print, as in qemu-io.
 */
import { sleep, type Operation } from 'effection';
import { constants as osConstants } from 'node:os';
import { match } from 'ts-pattern';
import {
  AIO_WAIT_WHILE,
  BDRV_O_NATIVE_AIO,
  BDRV_O_IO_URING,
  BDRV_O_NOCACHE,
  BDRV_O_NO_FLUSH,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_REQUEST_MAX_BYTES,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_WRITE_COMPRESSED,
  BDRV_SECTOR_SIZE,
  EINVAL,
  EIO,
  ENOTSUP,
  EPERM,
  QEMUIOVector,
  QemuError,
  aio_poll,
  AioWaitError,
  bdrv_debug_breakpoint,
  bdrv_debug_is_suspended,
  bdrv_debug_remove_breakpoint,
  bdrv_debug_resume,
  aio_co_enter,
  bdrv_co_is_allocated,
  bdrv_co_truncate,
  bdrv_get_info,
  bdrv_get_specific_info,
  bdrv_image_info_specific_dump,
  block_driver_info_new,
  qemu_blockalign,
  qemu_strtosz,
  qemu_vfree,
  blk_aio_preadv,
  blk_aio_pwrite_zeroes,
  blk_aio_pwritev,
  blk_bs,
  blk_co_pwrite_zeroes,
  blk_drain,
  blk_flush,
  blk_get_aio_context,
  blk_getlength,
  blk_is_writable,
  blk_new_open,
  blk_pdiscard,
  blk_pread,
  blk_pwrite,
  blk_set_enable_write_cache,
  blk_unref,
  qemu_coroutine_create,
  qemu_iovec_add,
  qemu_iovec_init,
  strerror,
  type BlockBackend,
  type BlockDriverState,
  type CoroutineFn,
  type PreallocMode,
} from '../../src/index.ts';
import { EXTENDED_HELP } from './qemu-io-help.ts';
import { cvtnum, cvtnumErr, cvtstr, dump_buffer, getopt, parse_pattern, print_report, strtol0, type CvtErr } from './qemu-io-format.ts';

/** Where output goes; qemu-io prints results on stdout and `error_report` on stderr. */
export interface IoSink {
  out(s: string): void;
  err(s: string): void;
}

/** The tool's state: the open backend (qemu-io's `qemuio_blk`) and where to print. */
export interface QemuIo extends IoSink {
  blk: BlockBackend | null;
  /** Set by `quit`. */
  quit: boolean;
  /** `-m`: I/O buffers start 16 bytes past an aligned address (qemu-io's `qemuio_misalign`). */
  misalign?: boolean;
  /** `--image-opts`: `open` takes its path as an option string (qemu-io's `imageOpts`). */
  imageOpts?: boolean;
  /** C's `fflush(stdout)`; absent when `out` does not buffer. */
  flush?(): void;
  /** Drops what stdout still buffers, as a death without `exit()` (abort, SIGSEGV) does. */
  drop_stdout?(): void;
  /** C's `raise(sig)` for tests (0, or -1 for an invalid signal); absent: `qemu_raise`. */
  raise?(sig: number): number;
}

/** qemu-io's `error_report`: `qemu-io: ` + message on stderr. */
export function error_report(io: IoSink, msg: string): void {
  io.err(`qemu-io: ${msg}\n`);
}

const now = (): bigint => process.hrtime.bigint();

function isErr(v: number | CvtErr): v is CvtErr {
  return typeof v !== 'number';
}

/** Parses a number argument; prints the cvtnum error and returns null on failure. */
function num(io: IoSink, arg: string): number | null {
  const v = cvtnum(arg);
  if (isErr(v)) {
    io.out(cvtnumErr(v, arg));
    return null;
  }
  return v;
}

/** Runs a coroutine_fn to completion from outside any coroutine, waiting only for it. */
interface CoRun<T> {
  body: () => CoroutineFn<T>;
  done: boolean;
  v?: T;
}

function* runCoEntry<T>(st: CoRun<T>): CoroutineFn<void> {
  st.v = yield* st.body();
  st.done = true;
}

function runCo<T>(blk: BlockBackend, body: () => CoroutineFn<T>): T {
  const st: CoRun<T> = { body, done: false };
  const co = qemu_coroutine_create(runCoEntry<T>, st, 'qemu-io');
  const ctx = blk_get_aio_context(blk);
  aio_co_enter(ctx, co);
  AIO_WAIT_WHILE(ctx, () => !st.done);
  return st.v as T;
}

/** How far `-m` moves buffers off their alignment (qemu-io's MISALIGN_OFFSET). */
const MISALIGN_OFFSET = 16;
/** The allocation behind each buffer `qemu_io_alloc` handed out, for `qemu_io_free`. */
const ioAllocations = new WeakMap<Uint8Array, Uint8Array>();

/**
 * qemu-io's `qemu_io_alloc`: `len` bytes of I/O memory for `blk` (`qemu_blockalign`), filled
 * with `pattern`; with `-m` the buffer starts MISALIGN_OFFSET bytes into the allocation, so
 * O_DIRECT requests must bounce.
 */
function qemu_io_alloc(io: QemuIo, blk: BlockBackend, len: number, pattern: number): Uint8Array {
  const extra = io.misalign ? MISALIGN_OFFSET : 0;
  const mem = qemu_blockalign(blk_bs(blk), len + extra);
  mem.fill(pattern);
  const buf = mem.subarray(extra);
  ioAllocations.set(buf, mem);
  return buf;
}

/** qemu-io's `qemu_io_free`. */
function qemu_io_free(buf: Uint8Array): void {
  const mem = ioAllocations.get(buf);
  if (mem === undefined) return;
  ioAllocations.delete(buf);
  qemu_vfree(mem);
}

/** qemu-io's `create_iovec`: one buffer split by the given lengths, or null (message printed). */
function create_iovec(io: QemuIo, blk: BlockBackend, args: readonly string[], pattern: number): { qiov: QEMUIOVector; buf: Uint8Array } | null {
  const sizes: number[] = [];
  let count = 0;
  for (const arg of args) {
    const len = num(io, arg);
    if (len === null) return null;
    if (len > BDRV_REQUEST_MAX_BYTES) {
      io.out(`Argument '${arg}' exceeds maximum size ${BDRV_REQUEST_MAX_BYTES}\n`);
      return null;
    }
    if (count > BDRV_REQUEST_MAX_BYTES - len) {
      io.out(`The total number of bytes exceed the maximum size ${BDRV_REQUEST_MAX_BYTES}\n`);
      return null;
    }
    sizes.push(len);
    count += len;
  }
  const buf = qemu_io_alloc(io, blk, count, pattern);
  const qiov = new QEMUIOVector();
  qemu_iovec_init(qiov, sizes.length);
  let p = 0;
  for (const s of sizes) {
    qemu_iovec_add(qiov, buf.subarray(p, p + s), s);
    p += s;
  }
  return { qiov, buf };
}

function allEqual(buf: Uint8Array, start: number, len: number, v: number): boolean {
  for (let i = start; i < start + len; i++) if (buf[i] !== v) return false;
  return true;
}

/** A command: qemu-io's cmdinfo_t. */
export interface CmdInfo {
  name: string;
  altname?: string;
  argmin: number;
  /** -1: no maximum. */
  argmax: number;
  /** Runs without an open file. */
  nofile?: boolean;
  /** Needs a writable node (qemu-io's BLK_PERM_WRITE). */
  write?: boolean;
  /** null: none (help prints no field); '' for map, which prints an empty one. */
  args: string | null;
  oneline: string;
  cfunc(io: QemuIo, blk: BlockBackend, argv: string[]): Operation<number>;
}

/**
 * The `off len` operands of read and discard: both numbers, the length at most
 * BDRV_REQUEST_MAX_BYTES. Null after qemu-io's message (write has its own check: `-n` lifts it).
 */
function offLen(io: IoSink, rest: readonly string[]): { offset: number; len: number } | null {
  const offset = num(io, rest[0]!);
  if (offset === null) return null;
  const len = num(io, rest[1]!);
  if (len === null) return null;
  if (len > BDRV_REQUEST_MAX_BYTES) {
    io.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}, given ${rest[1]}\n`);
    return null;
  }
  return { offset, len };
}

/** Whether offset and count are sector multiples (read -b, write -b/-c); false after qemu-io's message. */
function sectorAligned(io: IoSink, offset: number, count: number): boolean {
  if (offset % BDRV_SECTOR_SIZE) {
    io.out(`${offset} is not a sector-aligned value for 'offset'\n`);
    return false;
  }
  if (count % BDRV_SECTOR_SIZE) {
    io.out(`${count} is not a sector-aligned value for 'count'\n`);
    return false;
  }
  return true;
}

function usage(io: IoSink, ct: CmdInfo): number {
  io.out(`${ct.name} ${ct.args ?? ''} -- ${ct.oneline}\n`);
  return -EINVAL;
}

// ---- read ---------------------------------------------------------------------------------

const read_cmd: CmdInfo = {
  name: 'read',
  altname: 'r',
  argmin: 2,
  argmax: -1,
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
  oneline: 'reads a number of bytes at a specified offset',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'bCl:pP:qs:v', io.err);
    if (!g) return usage(io, read_cmd);
    let bflag = false, Cflag = false, lflag = false, Pflag = false, qflag = false, sflag = false, vflag = false;
    let pattern = 0, pattern_count = 0, pattern_offset = 0;
    for (const o of g.opts) {
      const r = match(o.c)
        .with('b', () => ((bflag = true), 0))
        .with('C', () => ((Cflag = true), 0))
        .with('l', () => {
          lflag = true;
          const v = num(io, o.arg!);
          if (v === null) return -EINVAL;
          pattern_count = v;
          return 0;
        })
        .with('p', () => 0)
        .with('P', () => {
          Pflag = true;
          const v = parse_pattern(o.arg!, io.out);
          if (v === null) return -EINVAL;
          pattern = v;
          return 0;
        })
        .with('q', () => ((qflag = true), 0))
        .with('s', () => {
          sflag = true;
          const v = num(io, o.arg!);
          if (v === null) return -EINVAL;
          pattern_offset = v;
          return 0;
        })
        .with('v', () => ((vflag = true), 0))
        .otherwise(() => usage(io, read_cmd));
      if (r < 0) return r;
    }
    if (g.rest.length !== 2) return usage(io, read_cmd);
    const ol = offLen(io, g.rest);
    if (!ol) return -EINVAL;
    const { offset, len: count } = ol;
    if (!Pflag && (lflag || sflag)) return usage(io, read_cmd);
    if (!lflag) pattern_count = count - pattern_offset;
    if (pattern_count < 0 || pattern_count + pattern_offset > count) {
      io.out('pattern verification range exceeds end of read data\n');
      return -EINVAL;
    }
    if (bflag && !sectorAligned(io, offset, count)) return -EINVAL;
    const buf = qemu_io_alloc(io, blk, count, 0xab);
    try {
      const t1 = now();
      // aioco has no VM state area: -b fails as on a driver without one.
      let ret = bflag ? -ENOTSUP : blk_pread(blk, offset, count, buf, 0);
      const t2 = now();
      if (ret < 0) {
        io.out(`read failed: ${strerror(-ret)}\n`);
        return ret;
      }
      ret = 0;
      if (Pflag && !allEqual(buf, pattern_offset, pattern_count, pattern)) {
        io.out(`Pattern verification failed at offset ${offset + pattern_offset}, ${pattern_count} bytes\n`);
        ret = -EINVAL;
      }
      if (qflag) return ret;
      if (vflag) io.out(dump_buffer(buf, offset, count));
      io.out(print_report('read', t2 - t1, offset, count, count, 1, Cflag));
      return ret;
    } finally {
      qemu_io_free(buf);
    }
  },
};

// ---- readv / writev -----------------------------------------------------------------------

/** Runs one vectored request and waits for it (qemu-io's do_aio_readv/do_aio_writev). */
function waitAio(blk: BlockBackend, start: (cb: (opaque: unknown, ret: number) => void) => void): number {
  const st = { ret: 0, done: false };
  start((_o, r) => {
    st.ret = r;
    st.done = true;
  });
  AIO_WAIT_WHILE(blk_get_aio_context(blk), () => !st.done);
  return st.ret;
}

const readv_cmd: CmdInfo = {
  name: 'readv',
  argmin: 2,
  argmax: -1,
  args: '[-Cqv] [-P pattern] off len [len..]',
  oneline: 'reads a number of bytes at a specified offset',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'CP:qv', io.err);
    if (!g) return usage(io, readv_cmd);
    let Cflag = false, qflag = false, vflag = false, Pflag = false, pattern = 0;
    for (const o of g.opts) {
      if (o.c === 'C') Cflag = true;
      else if (o.c === 'q') qflag = true;
      else if (o.c === 'v') vflag = true;
      else if (o.c === 'P') {
        Pflag = true;
        const v = parse_pattern(o.arg!, io.out);
        if (v === null) return -EINVAL;
        pattern = v;
      }
    }
    if (g.rest.length < 2) return usage(io, readv_cmd);
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const v = create_iovec(io, blk, g.rest.slice(1), 0xab);
    if (!v) return -EINVAL;
    try {
      const t1 = now();
      let ret = waitAio(blk, (cb) => blk_aio_preadv(blk, offset, v.qiov, 0, cb));
      const t2 = now();
      if (ret < 0) {
        io.out(`readv failed: ${strerror(-ret)}\n`);
        return ret;
      }
      ret = 0;
      const size = v.qiov.size;
      if (Pflag && !allEqual(v.buf, 0, size, pattern)) {
        io.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
        ret = -EINVAL;
      }
      if (qflag) return ret;
      if (vflag) io.out(dump_buffer(v.buf, offset, size));
      io.out(print_report('read', t2 - t1, offset, size, size, 1, Cflag));
      return ret;
    } finally {
      qemu_io_free(v.buf);
    }
  },
};

const writev_cmd: CmdInfo = {
  name: 'writev',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-Cfq] [-P pattern] off len [len..]',
  oneline: 'writes a number of bytes at a specified offset',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'CfqP:', io.err);
    if (!g) return usage(io, writev_cmd);
    let Cflag = false, qflag = false, flags = 0, pattern = 0xcd;
    for (const o of g.opts) {
      if (o.c === 'C') Cflag = true;
      else if (o.c === 'q') qflag = true;
      else if (o.c === 'f') flags |= BDRV_REQ_FUA;
      else if (o.c === 'P') {
        const v = parse_pattern(o.arg!, io.out);
        if (v === null) return -EINVAL;
        pattern = v;
      }
    }
    if (g.rest.length < 2) return usage(io, writev_cmd);
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const v = create_iovec(io, blk, g.rest.slice(1), pattern);
    if (!v) return -EINVAL;
    const t1 = now();
    const ret = waitAio(blk, (cb) => blk_aio_pwritev(blk, offset, v.qiov, flags, cb));
    const t2 = now();
    qemu_io_free(v.buf);
    if (ret < 0) {
      io.out(`writev failed: ${strerror(-ret)}\n`);
      return ret;
    }
    if (qflag) return 0;
    io.out(print_report('wrote', t2 - t1, offset, v.qiov.size, v.qiov.size, 1, Cflag));
    return 0;
  },
};

// ---- write --------------------------------------------------------------------------------

const write_cmd: CmdInfo = {
  name: 'write',
  altname: 'w',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
  oneline: 'writes a number of bytes at a specified offset',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'bcCfnpP:quzs:', io.err);
    if (!g) return usage(io, write_cmd);
    let bflag = false, cflag = false, Cflag = false, Pflag = false, qflag = false, zflag = false, sflag = false;
    let flags = 0, pattern = 0xcd;
    let source: string | null = null;
    for (const o of g.opts) {
      const r = match(o.c)
        .with('b', () => ((bflag = true), 0))
        .with('c', () => ((cflag = true), 0))
        .with('C', () => ((Cflag = true), 0))
        .with('f', () => ((flags |= BDRV_REQ_FUA), 0))
        .with('n', () => ((flags |= BDRV_REQ_NO_FALLBACK), 0))
        .with('p', () => 0)
        .with('P', () => {
          Pflag = true;
          const v = parse_pattern(o.arg!, io.out);
          if (v === null) return -EINVAL;
          pattern = v;
          return 0;
        })
        .with('q', () => ((qflag = true), 0))
        .with('s', () => ((sflag = true), (source = o.arg), 0))
        .with('u', () => ((flags |= BDRV_REQ_MAY_UNMAP), 0))
        .with('z', () => ((zflag = true), 0))
        .otherwise(() => usage(io, write_cmd));
      if (r < 0) return r;
    }
    if (g.rest.length !== 2) return usage(io, write_cmd);
    if (bflag && zflag) {
      io.out('-b and -z cannot be specified at the same time\n');
      return -EINVAL;
    }
    if (flags & BDRV_REQ_FUA && (bflag || cflag)) {
      io.out('-f and -b or -c cannot be specified at the same time\n');
      return -EINVAL;
    }
    if (flags & BDRV_REQ_NO_FALLBACK && !zflag) {
      io.out('-n requires -z to be specified\n');
      return -EINVAL;
    }
    if (flags & BDRV_REQ_MAY_UNMAP && !zflag) {
      io.out('-u requires -z to be specified\n');
      return -EINVAL;
    }
    if (Number(zflag) + Number(Pflag) + Number(sflag) > 1) {
      io.out('Only one of -z, -P, and -s can be specified at the same time\n');
      return -EINVAL;
    }
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const count = num(io, g.rest[1]!);
    if (count === null) return -EINVAL;
    if (count > BDRV_REQUEST_MAX_BYTES && !(flags & BDRV_REQ_NO_FALLBACK)) {
      io.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES} without -n, given ${g.rest[1]}\n`);
      return -EINVAL;
    }
    if ((bflag || cflag) && !sectorAligned(io, offset, count)) return -EINVAL;
    let buf: Uint8Array | null = null;
    if (!zflag) {
      if (source !== null) {
        const fs = yield* importFs();
        let src: Uint8Array;
        try {
          src = fs.readFileSync(source);
        } catch (e) {
          io.err(`${source}: ${strerror((e as NodeJS.ErrnoException).errno ? -(e as NodeJS.ErrnoException).errno! : EINVAL)}\n`);
          return -EINVAL;
        }
        if (src.length === 0) {
          io.out(`${source}: file is empty\n`);
          return -EINVAL;
        }
        buf = qemu_io_alloc(io, blk, count, 0);
        for (let i = 0; i < count; i += src.length) buf.set(src.subarray(0, Math.min(src.length, count - i)), i);
      } else {
        buf = qemu_io_alloc(io, blk, count, pattern);
      }
    }
    const t1 = now();
    // Compressed writes go through blk_pwrite with BDRV_REQ_WRITE_COMPRESSED (QEMU 7.2:
    // blk_pwrite_compressed); a driver that cannot compress answers -ENOTSUP.
    const ret = bflag
      ? -ENOTSUP // aioco has no VM state
      : cflag
        ? blk_pwrite(blk, offset, count, buf!, flags | BDRV_REQ_WRITE_COMPRESSED)
        : zflag
        ? runCo(blk, () => blk_co_pwrite_zeroes(blk, offset, count, flags))
        : blk_pwrite(blk, offset, count, buf!, flags);
    const t2 = now();
    if (buf) qemu_io_free(buf);
    if (ret < 0) {
      io.out(`write failed: ${strerror(-ret)}\n`);
      return ret;
    }
    if (qflag) return 0;
    io.out(print_report('wrote', t2 - t1, offset, count, count, 1, Cflag));
    return 0;
  },
};

function* importFs(): Operation<typeof import('node:fs')> {
  return fsModule;
}
import * as fsModule from 'node:fs';

// ---- aio_read / aio_write / aio_flush -----------------------------------------------------

const aio_read_cmd: CmdInfo = {
  name: 'aio_read',
  argmin: 2,
  argmax: -1,
  args: '[-Ciqv] [-P pattern] off len [len..]',
  oneline: 'asynchronously reads a number of bytes',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'CiP:qv', io.err);
    if (!g) return usage(io, aio_read_cmd);
    let Cflag = false, qflag = false, vflag = false, Pflag = false, pattern = 0;
    for (const o of g.opts) {
      if (o.c === 'C') Cflag = true;
      else if (o.c === 'q') qflag = true;
      else if (o.c === 'v') vflag = true;
      else if (o.c === 'i') {
        io.out('injecting invalid read request\n');
        return 0;
      } else if (o.c === 'P') {
        Pflag = true;
        const v = parse_pattern(o.arg!, io.out);
        if (v === null) return -EINVAL;
        pattern = v;
      }
    }
    if (g.rest.length < 2) return usage(io, aio_read_cmd);
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const v = create_iovec(io, blk, g.rest.slice(1), 0xab);
    if (!v) return -EINVAL;
    const t1 = now();
    blk_aio_preadv(blk, offset, v.qiov, 0, (_o, ret) => {
      const t2 = now();
      try {
        if (ret < 0) {
          io.out(`readv failed: ${strerror(-ret)}\n`);
          return;
        }
        const size = v.qiov.size;
        if (Pflag && !allEqual(v.buf, 0, size, pattern)) io.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
        if (qflag) return;
        if (vflag) io.out(dump_buffer(v.buf, offset, size));
        io.out(print_report('read', t2 - t1, offset, size, size, 1, Cflag));
      } finally {
        qemu_io_free(v.buf);
      }
    });
    return 0;
  },
};

/** Monotonic time since boot, what qemu-io's `aio_write -z` measures from (its t1 is never set). */
function sinceBoot(): bigint {
  return BigInt(Math.round(((): number => {
    try {
      return Number(fsModule.readFileSync('/proc/uptime', 'utf8').split(' ')[0]) * 1e9;
    } catch {
      return performance.timeOrigin * 1e6;
    }
  })()));
}

const aio_write_cmd: CmdInfo = {
  name: 'aio_write',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-Cfiquz] [-P pattern] off len [len..]',
  oneline: 'asynchronously writes a number of bytes',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'CfiqP:uz', io.err);
    if (!g) return usage(io, aio_write_cmd);
    let Cflag = false, qflag = false, zflag = false, flags = 0, pattern = 0xcd;
    for (const o of g.opts) {
      if (o.c === 'C') Cflag = true;
      else if (o.c === 'q') qflag = true;
      else if (o.c === 'f') flags |= BDRV_REQ_FUA;
      else if (o.c === 'u') flags |= BDRV_REQ_MAY_UNMAP;
      else if (o.c === 'z') zflag = true;
      else if (o.c === 'i') {
        io.out('injecting invalid write request\n');
        return 0;
      } else if (o.c === 'P') {
        const v = parse_pattern(o.arg!, io.out);
        if (v === null) return -EINVAL;
        pattern = v;
      }
    }
    if (g.rest.length < 2) return usage(io, aio_write_cmd);
    if (zflag && g.rest.length !== 2) {
      io.out('-z supports only a single length parameter\n');
      return -EINVAL;
    }
    if (flags & BDRV_REQ_MAY_UNMAP && !zflag) {
      io.out('-u requires -z to be specified\n');
      return -EINVAL;
    }
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const done = (t1: bigint, size: number, buf: Uint8Array | null) => (_o: unknown, ret: number) => {
      const t2 = now();
      if (buf) qemu_io_free(buf);
      if (ret < 0) {
        io.out(`aio_write failed: ${strerror(-ret)}\n`);
        return;
      }
      if (qflag) return;
      io.out(print_report('wrote', t2 - t1, offset, size, size, 1, Cflag));
    };
    if (zflag) {
      const count = num(io, g.rest[1]!);
      if (count === null) return -EINVAL;
      // qemu-io 7.2 never records the start time of a zero write: the report measures from boot.
      const t1 = now() - sinceBoot();
      blk_aio_pwrite_zeroes(blk, offset, count, flags, done(t1, count, null));
      return 0;
    }
    const v = create_iovec(io, blk, g.rest.slice(1), pattern);
    if (!v) return -EINVAL;
    blk_aio_pwritev(blk, offset, v.qiov, flags, done(now(), v.qiov.size, v.buf));
    return 0;
  },
};

const aio_flush_cmd: CmdInfo = {
  name: 'aio_flush',
  argmin: 0,
  argmax: 0,
  args: null,
  oneline: 'completes all outstanding aio requests',
  *cfunc(_io, blk) {
    // qemu-io: blk_drain_all(); the backend is the only one the tool opens.
    blk_drain(blk);
    return 0;
  },
};

// ---- break, remove_break, resume, wait_break (blkdebug breakpoints) ------------------------

/** A blkdebug operation's result as break/remove_break/resume report it: `<what>: <strerror>` on failure. */
function debugResult(io: IoSink, ret: number, what: string): number {
  if (ret < 0) io.out(`${what}: ${strerror(-ret)}\n`);
  return ret < 0 ? ret : 0;
}

const break_cmd: CmdInfo = {
  name: 'break',
  argmin: 2,
  argmax: 2,
  args: 'event tag',
  oneline: 'sets a breakpoint on event and tags the stopped request as tag',
  *cfunc(io, blk, argv) {
    return debugResult(io, bdrv_debug_breakpoint(blk_bs(blk), argv[1]!, argv[2]!), 'Could not set breakpoint');
  },
};

const remove_break_cmd: CmdInfo = {
  name: 'remove_break',
  argmin: 1,
  argmax: 1,
  args: 'tag',
  oneline: 'remove a breakpoint by tag',
  *cfunc(io, blk, argv) {
    // blkdebug resumes the requests suspended with the tag first, so they may print before this.
    return debugResult(io, bdrv_debug_remove_breakpoint(blk_bs(blk), argv[1]!), `Could not remove breakpoint ${argv[1]}`);
  },
};

const resume_cmd: CmdInfo = {
  name: 'resume',
  argmin: 1,
  argmax: 1,
  args: 'tag',
  oneline: 'resumes the request tagged as tag',
  *cfunc(io, blk, argv) {
    return debugResult(io, bdrv_debug_resume(blk_bs(blk), argv[1]!), 'Could not resume request');
  },
};

const wait_break_cmd: CmdInfo = {
  name: 'wait_break',
  argmin: 1,
  argmax: 1,
  args: 'tag',
  oneline: 'waits for the suspension of a request',
  *cfunc(io, blk, argv) {
    // As qemu-io: blocking polls until a request tagged argv[1] is suspended. Where qemu-io would
    // wait forever (nothing in flight can reach the breakpoint), aio_poll throws AioWaitError.
    const ctx = blk_get_aio_context(blk);
    try {
      while (!bdrv_debug_is_suspended(blk_bs(blk), argv[1]!)) aio_poll(ctx, true);
    } catch (e) {
      if (!(e instanceof AioWaitError)) throw e;
      error_report(io, `wait_break: no request tagged '${argv[1]}' is suspended and none can be (qemu-io 7.2 waits forever)`);
      return -EINVAL;
    }
    return 0;
  },
};

// ---- flush, discard, length, info, map, alloc ---------------------------------------------

const flush_cmd: CmdInfo = {
  name: 'flush',
  altname: 'f',
  argmin: 0,
  argmax: 0,
  args: null,
  oneline: 'flush all in-core file state to disk',
  *cfunc(_io, blk) {
    return blk_flush(blk);
  },
};

const discard_cmd: CmdInfo = {
  name: 'discard',
  altname: 'd',
  argmin: 2,
  argmax: -1,
  write: true,
  args: '[-Cq] off len',
  oneline: 'discards a number of bytes at a specified offset',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'Cq', io.err);
    if (!g) return usage(io, discard_cmd);
    const Cflag = g.opts.some((o) => o.c === 'C');
    const qflag = g.opts.some((o) => o.c === 'q');
    if (g.rest.length !== 2) return usage(io, discard_cmd);
    const ol = offLen(io, g.rest);
    if (!ol) return -EINVAL;
    const { offset, len: bytes } = ol;
    const t1 = now();
    const ret = blk_pdiscard(blk, offset, bytes);
    const t2 = now();
    if (ret < 0) {
      io.out(`discard failed: ${strerror(-ret)}\n`);
      return ret;
    }
    if (!qflag) io.out(print_report('discard', t2 - t1, offset, bytes, bytes, 1, Cflag));
    return 0;
  },
};

const length_cmd: CmdInfo = {
  name: 'length',
  altname: 'l',
  argmin: 0,
  argmax: 0,
  args: null,
  oneline: 'gets the length of the current file',
  *cfunc(io, blk) {
    const size = blk_getlength(blk);
    if (size < 0) {
      io.out(`getlength: ${strerror(-size)}\n`);
      return size;
    }
    io.out(`${cvtstr(size)}\n`);
    return 0;
  },
};

const info_cmd: CmdInfo = {
  name: 'info',
  altname: 'i',
  argmin: 0,
  argmax: 0,
  args: null,
  oneline: 'prints information about the current file',
  *cfunc(io, blk) {
    const bs = blk_bs(blk)!;
    if (bs.drv?.format_name) io.out(`format name: ${bs.drv.format_name}\n`);
    if (bs.drv?.protocol_name) io.out(`format name: ${bs.drv.protocol_name}\n`);
    const bdi = block_driver_info_new();
    // Any failure (null-co has no bdrv_get_info) ends the command silently, with its status.
    const ret = bdrv_get_info(bs, bdi);
    if (ret) return ret;
    io.out(`cluster size: ${cvtstr(bdi.cluster_size)}\n`);
    io.out(`vm state offset: ${cvtstr(bdi.vm_state_offset)}\n`);
    let spec;
    try {
      spec = bdrv_get_specific_info(bs);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      error_report(io, e.message);
      return -EIO;
    }
    if (spec) io.out('Format specific information:\n' + bdrv_image_info_specific_dump(spec));
    return 0;
  },
};

function is_allocated(blk: BlockBackend, offset: number, bytes: number): { ret: number; pnum: number } {
  const bs = blk_bs(blk)!;
  const out = { pnum: 0 };
  const ret = runCo(blk, () => bdrv_co_is_allocated(bs, offset, bytes, out));
  return { ret, pnum: out.pnum };
}

const alloc_cmd: CmdInfo = {
  name: 'alloc',
  altname: 'a',
  argmin: 1,
  argmax: 2,
  args: 'offset [count]',
  oneline: 'checks if offset is allocated in the file',
  *cfunc(io, blk, argv) {
    const start = num(io, argv[1]!);
    if (start === null) return -EINVAL;
    let count = BDRV_SECTOR_SIZE;
    if (argv.length === 3) {
      const c = num(io, argv[2]!);
      if (c === null) return -EINVAL;
      count = c;
    }
    let offset = start, remaining = count, sum_alloc = 0;
    while (remaining) {
      const { ret, pnum } = is_allocated(blk, offset, remaining);
      if (ret < 0) {
        io.out(`is_allocated failed: ${strerror(-ret)}\n`);
        return ret;
      }
      offset += pnum;
      remaining -= pnum;
      if (ret) sum_alloc += pnum;
      if (pnum === 0) {
        count -= remaining;
        remaining = 0;
      }
    }
    io.out(`${sum_alloc}/${count} bytes allocated at offset ${cvtstr(start)}\n`);
    return 0;
  },
};

const map_cmd: CmdInfo = {
  name: 'map',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'prints the allocated areas of a file',
  *cfunc(io, blk) {
    let offset = 0;
    let bytes = blk_getlength(blk);
    if (bytes < 0) {
      error_report(io, `Failed to query image length: ${strerror(-bytes)}`);
      return bytes;
    }
    while (bytes) {
      // qemu-io's map_is_allocated: merge consecutive runs with the same answer.
      let { ret, pnum } = is_allocated(blk, offset, bytes);
      if (ret < 0) {
        error_report(io, `Failed to get allocation status: ${strerror(-ret)}`);
        return ret;
      }
      const first = ret;
      let total = pnum, o = offset, b = bytes;
      while (b > 0 && ret === first) {
        o += pnum;
        b -= pnum;
        ({ ret, pnum } = is_allocated(blk, o, b));
        if (ret === first && pnum) total += pnum;
        else break;
      }
      if (!total) {
        error_report(io, 'Unexpected end of image');
        return -EINVAL;
      }
      const retstr = first ? '    allocated' : 'not allocated';
      io.out(`${cvtstr(total)} (0x${total.toString(16)}) bytes ${retstr} at offset ${cvtstr(offset)} (0x${offset.toString(16)})\n`);
      offset += total;
      bytes -= total;
    }
    return 0;
  },
};

// ---- truncate, reopen, abort, sigraise ----------------------------------------------------

/** C's NSIG on Linux/glibc: sigraise refuses only numbers above it. */
const NSIG = 65;
const SIG = osConstants.signals;
/** Signals whose default action leaves the process running (stop signals stop it first). */
const SIG_NOT_FATAL: ReadonlySet<number> = new Set([
  0,
  SIG.SIGCHLD,
  SIG.SIGCONT,
  SIG.SIGSTOP,
  SIG.SIGTSTP,
  SIG.SIGTTIN,
  SIG.SIGTTOU,
  SIG.SIGURG,
  SIG.SIGWINCH,
]);

/**
 * Signals that cannot reach qemu-io 7.2: SIGPIPE is ignored, and its main loop blocks SIGUSR1
 * (SIG_IPI) and takes SIGBUS, SIGALRM and SIGIO through a signalfd that never runs a default
 * action (`qemu_signal_init`).
 */
const QEMU_IO_NO_EFFECT: ReadonlySet<number> = new Set([SIG.SIGPIPE, SIG.SIGUSR1, SIG.SIGBUS, SIG.SIGALRM, SIG.SIGIO]);
/** glibc's own signals (SIGCANCEL, SIGSETXID): its raise() refuses them. */
const GLIBC_INTERNAL: ReadonlySet<number> = new Set([32, 33]);

/**
 * C's `raise(sig)` in a process whose dispositions are qemu-io 7.2's (see QEMU_IO_NO_EFFECT;
 * the default action for the rest). Returns 0, or -1 for a number raise() refuses (65, and
 * glibc's 32 and 33). Node listens to some signals itself (effection's SIGINT/SIGTERM): their
 * listeners are dropped first, which restores the default action (and Node's SIG_IGN of
 * SIGXFSZ is undone the same way). A fatal signal ends the
 * process before this returns. Surprise: the process really dies.
 */
export function qemu_raise(sig: number): number {
  if (QEMU_IO_NO_EFFECT.has(sig)) return 0;
  if (GLIBC_INTERNAL.has(sig)) return -1;
  const name = (Object.keys(SIG) as NodeJS.Signals[]).find((k) => SIG[k] === sig);
  // Node ignores SIGXFSZ from the start.
  if (name !== undefined && (name === 'SIGXFSZ' || process.listenerCount(name) > 0)) {
    // libuv puts back SIG_DFL when the last listener of a signal goes away.
    process.on(name, () => {});
    process.removeAllListeners(name);
  }
  try {
    process.kill(process.pid, sig);
  } catch {
    return -1;
  }
  if (!SIG_NOT_FATAL.has(sig)) {
    // kill(2) delivers a signal sent to oneself before returning; this only covers a signal
    // another thread has to take.
    const w = new Int32Array(new SharedArrayBuffer(4));
    for (let i = 0; i < 100; i++) Atomics.wait(w, 0, 0, 10);
  }
  return 0;
}

/** `raise` through the tool's hook (tests), else on this process; `lose_stdout` for a crash. */
function do_raise(io: QemuIo, sig: number, lose_stdout: boolean): number {
  if (lose_stdout) io.drop_stdout?.();
  return io.raise ? io.raise(sig) : qemu_raise(sig);
}

const PREALLOC_MODES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];

function* co_truncate(blk: BlockBackend, offset: number, prealloc: PreallocMode): CoroutineFn<{ ret: number; err: string | null }> {
  // qemu-io 7.2 passes exact=false, whatever its comment there says.
  try {
    const ret = yield* bdrv_co_truncate(blk.root!, offset, false, prealloc, 0);
    return { ret, err: ret < 0 ? strerror(-ret) : null };
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    return { ret: -EINVAL, err: e.message };
  }
}

const truncate_cmd: CmdInfo = {
  name: 'truncate',
  altname: 't',
  argmin: 1,
  argmax: 3,
  // qemu-io asks for WRITE|RESIZE: on a read-only node the dispatcher refuses it.
  write: true,
  args: '[-m prealloc_mode] off',
  oneline: 'truncates the current file at the given offset',
  *cfunc(io, blk, argv) {
    const g = getopt(argv, 'm:', io.err);
    if (!g) return usage(io, truncate_cmd);
    let prealloc: PreallocMode = 'off';
    for (const o of g.opts) {
      const m = PREALLOC_MODES.find((x) => x === o.arg);
      if (m === undefined) {
        error_report(io, `Invalid preallocation mode '${o.arg}'`);
        return -EINVAL;
      }
      prealloc = m;
    }
    if (g.rest.length === 0) {
      // qemu-io 7.2 parses argv[optind], NULL here: it dies of SIGSEGV, stdout unflushed.
      do_raise(io, SIG.SIGSEGV, true);
      return -EINVAL;
    }
    // Further operands are ignored, and a bad number is reported under argv[1] (`-m` with -m).
    const offset = cvtnum(g.rest[0]!);
    if (isErr(offset)) {
      io.out(cvtnumErr(offset, argv[1]!));
      return -EINVAL;
    }
    const r = runCo(blk, () => co_truncate(blk, offset, prealloc));
    if (r.err !== null) {
      error_report(io, r.err);
      return r.ret < 0 ? r.ret : -EINVAL;
    }
    return 0;
  },
};

const abort_cmd: CmdInfo = {
  name: 'abort',
  argmin: 0,
  argmax: 0,
  nofile: true,
  args: null,
  oneline: 'simulate a program crash using abort(3)',
  *cfunc(io) {
    // abort(3): SIGABRT without flushing stdio, so buffered stdout is lost as in qemu-io; like
    // abort(3) it does not return, even if the signal did not end the process.
    do_raise(io, SIG.SIGABRT, true);
    if (!io.raise) process.abort();
    return 0;
  },
};

const sigraise_cmd: CmdInfo = {
  name: 'sigraise',
  argmin: 1,
  argmax: 1,
  nofile: true,
  args: 'signal',
  oneline: 'raises a signal',
  *cfunc(io, _blk, argv) {
    const sig = cvtnum(argv[1]!);
    if (isErr(sig)) {
      io.out(cvtnumErr(sig, argv[1]!));
      return -EINVAL;
    }
    if (sig > NSIG) {
      io.out(`signal argument '${argv[1]}' is too large to be a valid signal\n`);
      return -EINVAL;
    }
    // qemu-io flushes stdout and stderr first; a failing raise (65) goes unreported.
    io.flush?.();
    do_raise(io, sig, false);
    return 0;
  },
};

/** Which nodes' drivers opened their resources read-write / how (`reopen` must not exceed it). */
const opened_flags = new WeakMap<BlockDriverState, number>();
/** Whether the backend holds the WRITE permission (qemu-io's blk perms; `reopen -r` drops it). */
const blk_write_perm = new WeakMap<BlockBackend, boolean>();

function remember_open_flags(bs: BlockDriverState): void {
  opened_flags.set(bs, bs.open_flags);
  for (const c of bs.children) remember_open_flags(c.bs);
}

/** The flags a node takes from its parent on reopen (QEMU's inherited read-only and cache). */
const REOPEN_INHERITED = BDRV_O_RDWR | BDRV_O_NOCACHE | BDRV_O_NO_FLUSH;

/** One node of a reopen (QEMU's BDRVReopenState): its new flags and changed driver options. */
interface ReopenState {
  bs: BlockDriverState;
  flags: number;
  /** Driver options the node's driver changes on reopen (raw's offset/size). */
  driver_opts: Record<string, string>;
}

/** QemuOpts' bool parsing (`qapi_bool_parse`); throws QEMU's message. */
function reopen_bool(name: string, v: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new QemuError(`Parameter '${name}' expects 'on' or 'off'`);
}

/** An option's current value as the string `-o` would give. */
function opt_string(v: unknown): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (v === true) return 'on';
  if (v === false) return 'off';
  if (typeof v === 'object' && 'node_name' in v) return String((v as BlockDriverState).node_name);
  return String(v);
}

/**
 * QEMU's `bdrv_reopen_queue_child` + `bdrv_reopen_prepare` for `bs` and its children: the new
 * flags (children inherit read-only and cache from their parent), the generic options
 * (read-only, cache.direct, cache.no-flush, discard, auto-read-only, detect-zeroes), what the
 * driver may change (raw: offset and size; file: drop-cache), and every other option given
 * must equal the current one: `Cannot change the option 'x'`. Throws QemuError.
 */
function reopen_prepare(bs: BlockDriverState, given: Record<string, string>, flags: number, queue: ReopenState[]): void {
  const own: Record<string, string> = {};
  const per_child = new Map<BlockDriverState, Record<string, string>>();
  for (const [k, v] of Object.entries(given)) {
    const c = bs.children.find((ch) => k.startsWith(ch.name + '.'));
    if (c) {
      const m = per_child.get(c.bs) ?? {};
      m[k.slice(c.name.length + 1)] = v;
      per_child.set(c.bs, m);
    } else {
      own[k] = v;
    }
  }
  const take = (k: string): string | undefined => {
    const v = own[k];
    delete own[k];
    return v;
  };
  let v: string | undefined;
  if ((v = take('read-only')) !== undefined) flags = reopen_bool('read-only', v) ? flags & ~BDRV_O_RDWR : flags | BDRV_O_RDWR;
  if ((v = take('cache.direct')) !== undefined) flags = reopen_bool('cache.direct', v) ? flags | BDRV_O_NOCACHE : flags & ~BDRV_O_NOCACHE;
  if ((v = take('cache.no-flush')) !== undefined) flags = reopen_bool('cache.no-flush', v) ? flags | BDRV_O_NO_FLUSH : flags & ~BDRV_O_NO_FLUSH;
  if ((v = take('auto-read-only')) !== undefined && reopen_bool('auto-read-only', v)) {
    throw new QemuError("auto-read-only=on is not supported by aioco-io's reopen: aioco has no auto-read-only");
  }
  if ((v = take('discard')) !== undefined) {
    const s: OpenSettings = { flags, writethrough: false };
    if (!parse_discard(v, s)) throw new QemuError('Invalid discard option');
    flags = s.flags;
  }
  if ((v = take('detect-zeroes')) !== undefined) {
    if (!['off', 'on', 'unmap'].includes(v)) throw new QemuError(`Parameter 'detect-zeroes' does not accept value '${v}'`);
    if (v !== 'off') throw new QemuError(`detect-zeroes=${v} is not supported by aioco-io's reopen: aioco has no zero detection`);
  }
  const driver_opts: Record<string, string> = {};
  const drv = bs.drv?.format_name;
  if (drv === 'raw') {
    for (const k of ['offset', 'size']) {
      if ((v = take(k)) === undefined) continue;
      const n = qemu_strtosz(v);
      if (typeof n !== 'bigint') {
        throw new QemuError(
          `Parameter '${k}' expects a non-negative number below 2^64\n` +
            'Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.',
        );
      }
      if (opt_string(bs.options[k]) !== v) driver_opts[k] = v;
    }
  } else if (drv === 'file') {
    for (const k of ['drop-cache', 'x-check-cache-dropped']) if ((v = take(k)) !== undefined) reopen_bool(k, v);
  }
  for (const [k, nv] of Object.entries(own)) {
    const old = k === 'node-name' ? bs.node_name : opt_string(bs.options[k]);
    if (old !== nv) throw new QemuError(`Cannot change the option '${k}'`);
  }
  queue.push({ bs, flags, driver_opts });
  for (const c of bs.children) {
    const cflags = (c.bs.open_flags & ~REOPEN_INHERITED) | (flags & REOPEN_INHERITED);
    reopen_prepare(c.bs, per_child.get(c.bs) ?? {}, cflags, queue);
  }
}

/** The options that open the graph under `bs` again with the reopen's flags and changes. */
function reopen_rebuild_options(bs: BlockDriverState, queue: ReopenState[], prefix: string, out: Record<string, unknown>): void {
  const st = queue.find((q) => q.bs === bs)!;
  if (!bs.node_name.startsWith('#')) {
    throw new QemuError(
      `reopen: this change opens the graph again in aioco-io (its drivers cannot reopen), which cannot keep the node-name '${bs.node_name}'`,
    );
  }
  for (const [k, v] of Object.entries(bs.options)) {
    if (bs.children.some((c) => c.name === k)) continue;
    out[prefix + k] = v;
  }
  for (const [k, v] of Object.entries(st.driver_opts)) out[prefix + k] = v;
  out[prefix + 'read-only'] = st.flags & BDRV_O_RDWR ? 'off' : 'on';
  out[prefix + 'cache.direct'] = st.flags & BDRV_O_NOCACHE ? 'on' : 'off';
  out[prefix + 'cache.no-flush'] = st.flags & BDRV_O_NO_FLUSH ? 'on' : 'off';
  out[prefix + 'discard'] = st.flags & BDRV_O_UNMAP ? 'unmap' : 'ignore';
  for (const c of bs.children) reopen_rebuild_options(c.bs, queue, `${prefix}${c.name}.`, out);
}

/**
 * QEMU's `bdrv_reopen(bs, opts, keep_old_opts=true)` as far as aioco's drivers allow: none has
 * `bdrv_reopen_prepare`, so changes that only the block layer sees (read-write to read-only and
 * back on a node its driver opened read-write, cache.no-flush, discard) are made in place, and
 * the rest (cache.direct, raw's offset/size, writing to a node opened read-only) open the whole
 * graph again from its options and replace the backend. Surprise: that second way starts the
 * drivers afresh (blkdebug's fired once-rules fire again, a probed raw node no longer counts as
 * probed) and gives the nodes new names. Throws QemuError with QEMU's messages.
 */
function bdrv_reopen_qemuio(io: QemuIo, blk: BlockBackend, opts: Record<string, string>, root_flags: number): void {
  const bs = blk_bs(blk)!;
  const queue: ReopenState[] = [];
  reopen_prepare(bs, opts, root_flags, queue);
  const root = queue[0]!;
  if (!(root.flags & BDRV_O_RDWR) && blk_write_perm.get(blk)) {
    throw new QemuError(`Read-only block node '${bs.node_name}' cannot support read-write users`);
  }
  const rebuild = queue.some(
    (q) =>
      Object.keys(q.driver_opts).length > 0 ||
      (q.flags ^ q.bs.open_flags) & BDRV_O_NOCACHE ||
      (q.flags & BDRV_O_RDWR && !((opened_flags.get(q.bs) ?? 0) & BDRV_O_RDWR)),
  );
  if (!rebuild) {
    const CHANGED = REOPEN_INHERITED | BDRV_O_UNMAP;
    for (const q of queue) {
      q.bs.open_flags = (q.bs.open_flags & ~CHANGED) | (q.flags & CHANGED);
      q.bs.read_only = !(q.flags & BDRV_O_RDWR);
    }
    return;
  }
  const options: Record<string, unknown> = {};
  reopen_rebuild_options(bs, queue, '', options);
  const nblk = blk_new_open(null, null, options, root.flags);
  nblk.enable_write_cache = blk.enable_write_cache;
  remember_open_flags(blk_bs(nblk)!);
  blk_write_perm.set(nblk, !!(root.flags & BDRV_O_RDWR) && !!blk_write_perm.get(blk));
  blk_unref(blk);
  io.blk = nblk;
}

/**
 * QEMU's QemuOpts parsing of one `-o` string into `into` (later keys win, as the merged option
 * list of `reopen`/`open` does): `k=v`, `,,` for a comma, a bare `k` as k=on and `nok` as k=off,
 * each with QEMU 7.2's deprecation warning on stderr.
 */
function qemu_opts_parse_into(io: IoSink, str: string, into: Record<string, string>): void {
  Object.assign(into, parse_opts(str, undefined, opts_warning(io)));
}

const reopen_cmd: CmdInfo = {
  name: 'reopen',
  argmin: 0,
  argmax: -1,
  args: '[(-r|-w)] [-c cache] [-o options]',
  oneline: 'reopens an image with new options',
  *cfunc(io, blk, argv) {
    const bs = blk_bs(blk)!;
    const s: OpenSettings = { flags: bs.open_flags, writethrough: !blk.enable_write_cache };
    let has_rw_option = false;
    let has_cache_option = false;
    const opts: Record<string, string> = {};
    const g = getopt(argv, 'c:o:rw', io.err);
    if (!g) return usage(io, reopen_cmd);
    for (const o of g.opts) {
      if (o.c === 'c') {
        if (!parse_cache_mode(o.arg!, s)) {
          error_report(io, `Invalid cache option: ${o.arg}`);
          return -EINVAL;
        }
        has_cache_option = true;
      } else if (o.c === 'o') {
        qemu_opts_parse_into(io, o.arg!, opts);
      } else {
        if (has_rw_option) {
          error_report(io, 'Only one -r/-w option may be given');
          return -EINVAL;
        }
        s.flags = o.c === 'r' ? s.flags & ~BDRV_O_RDWR : s.flags | BDRV_O_RDWR;
        has_rw_option = true;
      }
    }
    if (g.rest.length > 0) return usage(io, reopen_cmd);
    if (!(s.flags & BDRV_O_RDWR)) {
      // qemu-io drops the backend's WRITE permission before anything else can fail.
      blk_drain(blk);
      blk_write_perm.set(blk, false);
    }
    if ('read-only' in opts) {
      if (has_rw_option) {
        error_report(io, "Cannot set both -r/-w and 'read-only'");
        return -EINVAL;
      }
    } else {
      opts['read-only'] = s.flags & BDRV_O_RDWR ? 'off' : 'on';
    }
    if ('cache.direct' in opts || 'cache.no-flush' in opts) {
      if (has_cache_option) {
        error_report(io, 'Cannot set both -c and the cache options');
        return -EINVAL;
      }
    } else {
      opts['cache.direct'] = s.flags & BDRV_O_NOCACHE ? 'on' : 'off';
      opts['cache.no-flush'] = s.flags & BDRV_O_NO_FLUSH ? 'on' : 'off';
    }
    // bdrv_reopen runs drained: requests in flight complete (and print) first.
    blk_drain(blk);
    try {
      bdrv_reopen_qemuio(io, blk, opts, s.flags);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      error_report(io, e.message);
      return -EINVAL;
    }
    blk_set_enable_write_cache(io.blk!, !s.writethrough);
    return 0;
  },
};

// ---- open, close, sleep, help, quit -------------------------------------------------------

/** Open settings shared by the command line and `open` (qemu-io.c's flags/writethrough). */
export interface OpenSettings {
  flags: number;
  writethrough: boolean;
  /** `-U`: force-share=on. */
  force_share?: boolean;
}

/**
 * How aioco-io refuses a qemu-io option it does not implement (API.md: refused with an error
 * that names it, never ignored): `qemu-io: option '-s' (--snapshot) is not supported by aioco-io: why`.
 */
export function unsupported_option(io: IoSink, opt: string, why: string): void {
  error_report(io, `option '${opt}' is not supported by aioco-io: ${why}`);
}

/** Why aioco-io refuses `-s`, `-C`, `-T` and `--object` (on the command line and for `open`). */
export const UNSUPPORTED_WHY = {
  snapshot: 'aioco cannot create the temporary qcow2 overlay (bdrv_append_temp_snapshot) a snapshot needs',
  copy_on_read: "aioco's block layer has no copy-on-read",
  trace: 'aioco has no trace events',
  object: 'aioco has no QOM objects (secret, iothread, throttle-group)',
} as const;

/** QEMU's `bdrv_parse_cache_mode`; false on an unknown mode. */
export function parse_cache_mode(mode: string, s: OpenSettings): boolean {
  const r = match(mode)
    .with('off', 'none', () => ({ set: BDRV_O_NOCACHE, wt: false }))
    .with('directsync', () => ({ set: BDRV_O_NOCACHE, wt: true }))
    .with('writeback', () => ({ set: 0, wt: false }))
    .with('unsafe', () => ({ set: BDRV_O_NO_FLUSH, wt: false }))
    .with('writethrough', () => ({ set: 0, wt: true }))
    .otherwise(() => null);
  if (!r) return false;
  s.flags = (s.flags & ~(BDRV_O_NOCACHE | BDRV_O_NO_FLUSH)) | r.set;
  s.writethrough = r.wt;
  return true;
}

/** QEMU's `bdrv_parse_aio`; false on an unknown mode. */
export function parse_aio(mode: string, s: OpenSettings): boolean {
  const r = match(mode)
    .with('threads', () => 0)
    .with('native', () => BDRV_O_NATIVE_AIO)
    .with('io_uring', () => BDRV_O_IO_URING)
    .otherwise(() => -1);
  if (r < 0) return false;
  s.flags = (s.flags & ~(BDRV_O_NATIVE_AIO | BDRV_O_IO_URING)) | r;
  return true;
}

/** QEMU's `bdrv_parse_discard_flags`; false on an unknown mode. */
export function parse_discard(mode: string, s: OpenSettings): boolean {
  const r = match(mode)
    .with('off', 'ignore', () => 0)
    .with('on', 'unmap', () => BDRV_O_UNMAP)
    .otherwise(() => -1);
  if (r < 0) return false;
  s.flags = (s.flags & ~BDRV_O_UNMAP) | r;
  return true;
}

/** The warning QEMU 7.2 prints for a short-form boolean (`foo`, `nofoo`) in an option string. */
export function opts_warning(io: IoSink): (name: string, value: 'on' | 'off') => void {
  return (name, value) => {
    const key = value === 'on' ? name : name.slice(2);
    io.err(`qemu-io: warning: short-form boolean option '${name}' deprecated\nPlease use ${key}=${value} instead\n`);
  };
}

/**
 * Parses `k=v,k2=v2` (QEMU's QemuOpts, `,,` escaping a comma). A part without `=` is the
 * `implied` option's value when it comes first, else a short-form boolean: `k` is k=on, `nok`
 * is k=off, each reported to `warn` (QEMU 7.2 deprecates them; `help` and `?` excepted).
 */
export function parse_opts(str: string, implied?: string, warn?: (name: string, value: 'on' | 'off') => void): Record<string, string> {
  const out: Record<string, string> = {};
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < str.length; i++) {
    if (str[i] === ',') {
      if (str[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      parts.push(cur);
      cur = '';
    } else cur += str[i];
  }
  parts.push(cur);
  parts.forEach((p, i) => {
    if (p === '') return;
    const eq = p.indexOf('=');
    if (eq < 0) {
      if (i === 0 && implied) out[implied] = p;
      else if (p === 'help' || p === '?') out[p] = 'on';
      else if (p.startsWith('no')) {
        warn?.(p, 'off');
        out[p.slice(2)] = 'off';
      } else {
        warn?.(p, 'on');
        out[p] = 'on';
      }
    } else out[p.slice(0, eq)] = p.slice(eq + 1);
  });
  return out;
}

/**
 * qemu-io.c's `openfile`: 0, or 1 after reporting the error. `force-share` (from `-U` or the
 * options) keeps QEMU's rule that it needs a read-only image, then is dropped: aioco takes no
 * image locks and has no permissions to share, so there is nothing more to relax.
 */
export function openfile(io: QemuIo, name: string | null, s: OpenSettings, opts: Record<string, unknown>): number {
  if (io.blk) {
    error_report(io, "file open already, try 'help close'");
    return 1;
  }
  const what = `can't open${name !== null ? ' device ' + name : ''}`;
  opts = { ...opts };
  if (s.force_share) {
    if ('force-share' in opts && opts['force-share'] !== 'on') {
      error_report(io, '-U conflicts with image options');
      return 1;
    }
    opts['force-share'] = 'on';
  }
  try {
    if ('force-share' in opts) {
      const v = opt_string(opts['force-share'])!;
      if (reopen_bool('force-share', v) && s.flags & BDRV_O_RDWR) {
        throw new QemuError('force-share=on can only be used with read-only images');
      }
      delete opts['force-share'];
    }
    io.blk = blk_new_open(name, null, opts, s.flags);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    error_report(io, `${what}: ${e.message}`);
    return 1;
  }
  blk_set_enable_write_cache(io.blk, !s.writethrough);
  remember_open_flags(blk_bs(io.blk)!);
  blk_write_perm.set(io.blk, !!(s.flags & BDRV_O_RDWR));
  return 0;
}

const open_cmd: CmdInfo = {
  name: 'open',
  altname: 'o',
  argmin: 1,
  argmax: -1,
  nofile: true,
  args: '[-rsCnkU] [-t cache] [-d discard] [-o options] [path]',
  oneline: 'open the file specified by path',
  *cfunc(io, _blk, argv) {
    const g = getopt(argv, 'snCro:ki:t:d:U', io.err);
    if (!g) return usage(io, open_cmd);
    const s: OpenSettings = { flags: BDRV_O_UNMAP, writethrough: true };
    let readonly = false;
    let opts: Record<string, string> = {};
    for (const o of g.opts) {
      const r = match(o.c)
        .with('s', () => (unsupported_option(io, 'open -s', UNSUPPORTED_WHY.snapshot), -EINVAL))
        .with('C', () => (unsupported_option(io, 'open -C', UNSUPPORTED_WHY.copy_on_read), -EINVAL))
        .with('U', () => ((s.force_share = true), 0))
        .with('n', () => ((s.flags |= BDRV_O_NOCACHE), (s.writethrough = false), 0))
        .with('r', () => ((readonly = true), 0))
        .with('k', () => ((s.flags |= BDRV_O_NATIVE_AIO), 0))
        .with('t', () => {
          if (parse_cache_mode(o.arg!, s)) return 0;
          error_report(io, `Invalid cache option: ${o.arg}`);
          return -EINVAL;
        })
        .with('d', () => {
          if (parse_discard(o.arg!, s)) return 0;
          error_report(io, `Invalid discard option: ${o.arg}`);
          return -EINVAL;
        })
        .with('i', () => {
          if (parse_aio(o.arg!, s)) return 0;
          error_report(io, `Invalid aio option: ${o.arg}`);
          return -EINVAL;
        })
        .with('o', () => {
          if (io.imageOpts) {
            io.out("--image-opts and 'open -o' are mutually exclusive\n");
            return -EINVAL;
          }
          qemu_opts_parse_into(io, o.arg!, opts);
          return 0;
        })
        .otherwise(() => usage(io, open_cmd));
      if (r < 0) return r;
    }
    if (!readonly) s.flags |= BDRV_O_RDWR;
    let rest = g.rest;
    if (io.imageOpts && rest.length === 1) {
      opts = parse_opts(rest[0]!, undefined, opts_warning(io));
      rest = [];
    }
    if (rest.length > 1) return usage(io, open_cmd);
    return openfile(io, rest[0] ?? null, s, opts) ? -EINVAL : 0;
  },
};

const close_cmd: CmdInfo = {
  name: 'close',
  altname: 'c',
  argmin: 0,
  argmax: 0,
  args: null,
  oneline: 'close the current open file',
  *cfunc(io, blk) {
    blk_unref(blk);
    io.blk = null;
    return 0;
  },
};

const sleep_cmd: CmdInfo = {
  name: 'sleep',
  argmin: 1,
  argmax: 1,
  nofile: true,
  args: null,
  oneline: 'waits for the given value in milliseconds',
  *cfunc(io, _blk, argv) {
    const ms = strtol0(argv[1]!);
    if (ms === null || ms < 0) {
      io.out(`${argv[1]} is not a valid number\n`);
      return -EINVAL;
    }
    // Like qemu-io's main_loop_wait loop: earlier aio requests complete (and print) meanwhile,
    // and Node's loop (signals) runs between short polls.
    const end = now() + BigInt(ms) * 1_000_000n;
    for (;;) {
      if (io.blk) while (aio_poll(blk_get_aio_context(io.blk), false)) {}
      const left = end - now();
      if (left <= 0n) break;
      yield* sleep(Math.min(5, Math.ceil(Number(left) / 1e6)));
    }
    return 0;
  },
};

const quit_cmd: CmdInfo = {
  name: 'quit',
  altname: 'q',
  argmin: 0,
  argmax: -1,
  nofile: true,
  args: null,
  oneline: 'exit the program',
  *cfunc(io) {
    io.quit = true;
    return 0;
  },
};

const help_cmd: CmdInfo = {
  name: 'help',
  altname: '?',
  argmin: 0,
  argmax: 1,
  nofile: true,
  args: '[command]',
  oneline: 'help for one or all commands',
  *cfunc(io, _blk, argv) {
    if (argv.length === 1) {
      io.out(help_all());
      return 0;
    }
    const typed = argv[1]!;
    const ct = find_command(typed);
    if (!ct) {
      io.out(`command ${typed} not found\n`);
      return -EINVAL;
    }
    io.out(help_oneline(typed, ct));
    io.out(EXTENDED_HELP[ct.name] ?? '');
    return 0;
  },
};

/** qemu-io's `help_oneline`: `name [args ]-- oneline` under the name the user typed. */
function help_oneline(cmd: string, ct: CmdInfo): string {
  return `${cmd} ${ct.args !== null ? ct.args + ' ' : ''}-- ${ct.oneline}\n`;
}

/** qemu-io's `help_all`: every command of the table, by name (strcmp order), then the hint. */
export function help_all(): string {
  const sorted = [...COMMANDS].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return sorted.map((ct) => help_oneline(ct.name, ct)).join('') + "\nUse 'help commandname' for extended help.\n";
}

/** The command table (sorted by name, as qemu-io keeps it). */
export const COMMANDS: readonly CmdInfo[] = [
  abort_cmd,
  aio_flush_cmd,
  aio_read_cmd,
  aio_write_cmd,
  alloc_cmd,
  break_cmd,
  close_cmd,
  discard_cmd,
  flush_cmd,
  help_cmd,
  info_cmd,
  length_cmd,
  map_cmd,
  open_cmd,
  quit_cmd,
  read_cmd,
  readv_cmd,
  remove_break_cmd,
  reopen_cmd,
  resume_cmd,
  sigraise_cmd,
  sleep_cmd,
  truncate_cmd,
  wait_break_cmd,
  write_cmd,
  writev_cmd,
];

/** qemu-io's `find_command`: by name or alias. */
export function find_command(name: string): CmdInfo | null {
  return COMMANDS.find((c) => c.name === name || c.altname === name) ?? null;
}

/** qemu-io's `breakline`: split on single spaces, empty fields dropped. */
export function breakline(line: string): string[] {
  return line.split(' ').filter((p) => p !== '');
}

/**
 * qemu-io's `qemuio_command`: runs one command line; returns 0 or -errno (negative ⇒ exit
 * status 1). Dispatcher errors (unknown command, argument count, no file, read-only) as qemu-io.
 */
export function* qemuio_command(io: QemuIo, line: string): Operation<number> {
  const argv = breakline(line);
  if (argv.length === 0) return 0;
  const cmd = argv[0]!;
  const ct = find_command(cmd);
  if (!ct) {
    io.err(`command "${cmd}" not found\n`);
    return -EINVAL;
  }
  if (!ct.nofile && !io.blk) {
    io.err("no file open, try 'help open'\n");
    return -EINVAL;
  }
  const n = argv.length - 1;
  if (n < ct.argmin || (ct.argmax !== -1 && n > ct.argmax)) {
    if (ct.argmax === -1) io.err(`bad argument count ${n} to ${cmd}, expected at least ${ct.argmin} arguments\n`);
    else if (ct.argmin === ct.argmax) io.err(`bad argument count ${n} to ${cmd}, expected ${ct.argmin} arguments\n`);
    else io.err(`bad argument count ${n} to ${cmd}, expected between ${ct.argmin} and ${ct.argmax} arguments\n`);
    return -EINVAL;
  }
  if (ct.write && io.blk) {
    if (!blk_is_writable(io.blk)) {
      error_report(io, 'Block node is read-only');
      return -EPERM;
    }
    // The WRITE permission qemu-io asks for here stays with the backend (until `reopen -r`).
    blk_write_perm.set(io.blk, true);
  }
  return yield* ct.cfunc(io, io.blk!, argv);
}
