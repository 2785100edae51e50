/**
 * The commands of QEMU 7.2's qemu-io (qemu-io-cmds.c; qemu-block.md 4.2-4.6) on an aioco
 * BlockBackend. Each command is an effection operation returning 0 or -errno; a synchronous
 * command waits only for its own request (a blocking aio_poll bounded by that request), during
 * which completions of earlier aio_read/aio_write print, as in qemu-io.
 */
import { sleep, type Operation } from 'effection';
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
  BDRV_SECTOR_SIZE,
  EINVAL,
  ENOTSUP,
  EPERM,
  QEMUIOVector,
  QemuError,
  aio_poll,
  aio_co_enter,
  bdrv_co_is_allocated,
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
} from '../../src/index.ts';
import { EXTENDED_HELP, HELP_ALL } from './qemu-io-help.ts';
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

function fillBuf(len: number, pattern: number): Uint8Array {
  return new Uint8Array(len).fill(pattern);
}

/** qemu-io's `create_iovec`: one buffer split by the given lengths, or null (message printed). */
function create_iovec(io: IoSink, args: readonly string[], pattern: number): { qiov: QEMUIOVector; buf: Uint8Array } | null {
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
  const buf = fillBuf(count, pattern);
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
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const count = num(io, g.rest[1]!);
    if (count === null) return -EINVAL;
    if (count > BDRV_REQUEST_MAX_BYTES) {
      io.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}, given ${g.rest[1]}\n`);
      return -EINVAL;
    }
    if (!Pflag && (lflag || sflag)) return usage(io, read_cmd);
    if (!lflag) pattern_count = count - pattern_offset;
    if (pattern_count < 0 || pattern_count + pattern_offset > count) {
      io.out('pattern verification range exceeds end of read data\n');
      return -EINVAL;
    }
    if (bflag) {
      if (offset % BDRV_SECTOR_SIZE) {
        io.out(`${offset} is not a sector-aligned value for 'offset'\n`);
        return -EINVAL;
      }
      if (count % BDRV_SECTOR_SIZE) {
        io.out(`${count} is not a sector-aligned value for 'count'\n`);
        return -EINVAL;
      }
    }
    const buf = fillBuf(count, 0xab);
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
    const v = create_iovec(io, g.rest.slice(1), 0xab);
    if (!v) return -EINVAL;
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
    const v = create_iovec(io, g.rest.slice(1), pattern);
    if (!v) return -EINVAL;
    const t1 = now();
    const ret = waitAio(blk, (cb) => blk_aio_pwritev(blk, offset, v.qiov, flags, cb));
    const t2 = now();
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
    if (bflag || cflag) {
      if (offset % BDRV_SECTOR_SIZE) {
        io.out(`${offset} is not a sector-aligned value for 'offset'\n`);
        return -EINVAL;
      }
      if (count % BDRV_SECTOR_SIZE) {
        io.out(`${count} is not a sector-aligned value for 'count'\n`);
        return -EINVAL;
      }
    }
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
        buf = new Uint8Array(count);
        for (let i = 0; i < count; i += src.length) buf.set(src.subarray(0, Math.min(src.length, count - i)), i);
      } else {
        buf = fillBuf(count, pattern);
      }
    }
    const t1 = now();
    const ret = bflag || cflag
      ? -ENOTSUP // aioco has neither VM state nor compressed writes in any driver
      : zflag
        ? runCo(blk, () => blk_co_pwrite_zeroes(blk, offset, count, flags))
        : blk_pwrite(blk, offset, count, buf!, flags);
    const t2 = now();
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
    const v = create_iovec(io, g.rest.slice(1), 0xab);
    if (!v) return -EINVAL;
    const t1 = now();
    blk_aio_preadv(blk, offset, v.qiov, 0, (_o, ret) => {
      const t2 = now();
      if (ret < 0) {
        io.out(`readv failed: ${strerror(-ret)}\n`);
        return;
      }
      const size = v.qiov.size;
      if (Pflag && !allEqual(v.buf, 0, size, pattern)) io.out(`Pattern verification failed at offset ${offset}, ${size} bytes\n`);
      if (qflag) return;
      if (vflag) io.out(dump_buffer(v.buf, offset, size));
      io.out(print_report('read', t2 - t1, offset, size, size, 1, Cflag));
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
    const done = (t1: bigint, size: number) => (_o: unknown, ret: number) => {
      const t2 = now();
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
      blk_aio_pwrite_zeroes(blk, offset, count, flags, done(t1, count));
      return 0;
    }
    const v = create_iovec(io, g.rest.slice(1), pattern);
    if (!v) return -EINVAL;
    blk_aio_pwritev(blk, offset, v.qiov, flags, done(now(), v.qiov.size));
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
    const offset = num(io, g.rest[0]!);
    if (offset === null) return -EINVAL;
    const bytes = num(io, g.rest[1]!);
    if (bytes === null) return -EINVAL;
    if (bytes > BDRV_REQUEST_MAX_BYTES) {
      io.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}, given ${g.rest[1]}\n`);
      return -EINVAL;
    }
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

/** What `bdrv_get_info` fills in (the fields qemu-io prints). */
export interface BlockDriverInfo {
  cluster_size: number;
  vm_state_offset: number;
}
/** A driver may provide QEMU's `bdrv_get_info` (not yet part of aioco's BlockDriver). */
type WithGetInfo = { bdrv_get_info?(bs: BlockDriverState, bdi: BlockDriverInfo): number };

/**
 * QEMU's `bdrv_get_info`: the driver's callback; without one, QEMU 7.2's raw and file drivers
 * report zeroes (raw through its file child), filters ask their child, others -ENOTSUP.
 */
function bdrv_get_info(bs: BlockDriverState, bdi: BlockDriverInfo): number {
  const drv = bs.drv;
  if (!drv) return -ENOTSUP;
  const gi = (drv as WithGetInfo).bdrv_get_info;
  if (gi) return gi(bs, bdi);
  if (drv.format_name === 'raw' && bs.file) return bdrv_get_info(bs.file.bs, bdi);
  if (drv.protocol_name === 'file') return 0;
  if (drv.is_filter && bs.file) return bdrv_get_info(bs.file.bs, bdi);
  return -ENOTSUP;
}

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
    const bdi: BlockDriverInfo = { cluster_size: 0, vm_state_offset: 0 };
    const ret = bdrv_get_info(bs, bdi);
    if (ret) return ret;
    io.out(`cluster size: ${cvtstr(bdi.cluster_size)}\n`);
    io.out(`vm state offset: ${cvtstr(bdi.vm_state_offset)}\n`);
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

// ---- open, close, sleep, help, quit -------------------------------------------------------

/** Open settings shared by the command line and `open` (qemu-io.c's flags/writethrough). */
export interface OpenSettings {
  flags: number;
  writethrough: boolean;
}

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

/** Parses `k=v,k2=v2` (QEMU's keyval/QemuOpts, `,,` escaping a comma). */
export function parse_opts(str: string, implied?: string): Record<string, string> {
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
      else out[p] = 'on';
    } else out[p.slice(0, eq)] = p.slice(eq + 1);
  });
  return out;
}

/** qemu-io.c's `openfile`: 0, or 1 after reporting the error. */
export function openfile(io: QemuIo, name: string | null, s: OpenSettings, opts: Record<string, unknown>): number {
  if (io.blk) {
    error_report(io, "file open already, try 'help close'");
    return 1;
  }
  try {
    io.blk = blk_new_open(name, null, opts, s.flags);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    error_report(io, `can't open${name !== null ? ' device ' + name : ''}: ${e.message}`);
    return 1;
  }
  blk_set_enable_write_cache(io.blk, !s.writethrough);
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
    let opts: Record<string, unknown> = {};
    for (const o of g.opts) {
      const r = match(o.c)
        .with('s', 'C', 'U', () => 0)
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
        .with('o', () => ((opts = { ...opts, ...parse_opts(o.arg!) }), 0))
        .otherwise(() => usage(io, open_cmd));
      if (r < 0) return r;
    }
    if (!readonly) s.flags |= BDRV_O_RDWR;
    if (g.rest.length > 1) return usage(io, open_cmd);
    return openfile(io, g.rest[0] ?? null, s, opts) ? -EINVAL : 0;
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
      io.out(HELP_ALL);
      return 0;
    }
    const typed = argv[1]!;
    const ct = find_command(typed);
    if (!ct) {
      io.out(`command ${typed} not found\n`);
      return -EINVAL;
    }
    io.out(`${typed} ${ct.args !== null ? ct.args + ' ' : ''}-- ${ct.oneline}\n`);
    io.out(EXTENDED_HELP[ct.name] ?? '');
    return 0;
  },
};

/** The command table (sorted by name, as qemu-io keeps it). */
export const COMMANDS: readonly CmdInfo[] = [
  aio_flush_cmd,
  aio_read_cmd,
  aio_write_cmd,
  alloc_cmd,
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
  sleep_cmd,
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
  if (ct.write && io.blk && !blk_is_writable(io.blk)) {
    error_report(io, 'Block node is read-only');
    return -EPERM;
  }
  return yield* ct.cfunc(io, io.blk!, argv);
}
