/**
 * `aioco-img bench` (qemu-block.md 5.7): QEMU 7.2's `img_bench` and `bench_cb`: sequential
 * AIO requests (`blk_aio_preadv/pwritev` issued from the completion callback, `depth` in
 * flight), optional flushes. Completions arrive through the main AioContext attached to
 * Node's loop, so the run never blocks the loop. `-i threads` is what aioco has; `-i native`,
 * `-i io_uring` and `-n` are refused.
 */
import { withResolvers, type Operation } from 'effection';
import {
  BDRV_O_RDWR,
  QEMUIOVector,
  blk_aio_flush,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_bs,
  blk_drain,
  blk_getlength,
  blk_unref,
  qemu_blockalign,
  qemu_iovec_init_buf,
  strerror,
  type BlockBackend,
} from '../../src/index.ts';
import {
  FORCE_SHARE_OPT,
  HELP_OPT,
  IMAGE_OPTS_OPT,
  OBJECT_OPT,
  bdrv_parse_cache_mode,
  cvtnum,
  cvtnum_full,
  error_exit,
  error_report,
  getopt_long,
  img_open,
  not_supported,
  type ImgIo,
} from './qemu-img-cmds.ts';
import { strtol0 } from './qemu-io-format.ts';

const INT_MAX = 0x7fffffff;

/** QEMU's `BenchData`, plus how the run ends. */
export interface BenchData {
  io: ImgIo;
  blk: BlockBackend;
  image_size: number;
  write: boolean;
  bufsize: number;
  step: number;
  nrreq: number;
  n: number;
  flush_interval: number;
  drain_on_flush: boolean;
  qiov: QEMUIOVector[];
  in_flight: number;
  in_flush: boolean;
  offset: number;
  next_qiov: number;
  failed: boolean;
  /** Set when the run is halted (Ctrl-C): completions are then only drained. */
  stopped: boolean;
  finish: (() => void) | null;
}

function bench_fail(b: BenchData, what: string, ret: number): void {
  if (b.failed) return;
  error_report(b.io, `${what}: ${strerror(-ret)}`);
  b.failed = true;
  b.finish?.();
}

function bench_undrained_flush_cb(opaque: unknown, ret: number): void {
  if (ret < 0) bench_fail(opaque as BenchData, 'Failed flush request', ret);
}

/** Completion of one request (or the start): issues requests up to the depth. QEMU: `bench_cb`. */
export function bench_cb(opaque: unknown, ret: number): void {
  const b = opaque as BenchData;
  if (b.failed || b.stopped) return;
  if (ret < 0) {
    bench_fail(b, 'Failed request', ret);
    return;
  }
  if (b.in_flush) {
    // A flush with a drained queue finished: go on with requests.
    b.in_flush = false;
  } else if (b.in_flight > 0) {
    const remaining = b.n - b.in_flight;
    b.n--;
    b.in_flight--;
    if (b.flush_interval && remaining % b.flush_interval === 0) {
      if (!b.in_flight || !b.drain_on_flush) {
        if (b.drain_on_flush) b.in_flush = true;
        blk_aio_flush(b.blk, b.drain_on_flush ? bench_cb : bench_undrained_flush_cb, b);
      }
      if (b.drain_on_flush) {
        if (b.n === 0) b.finish?.();
        return;
      }
    }
  }
  while (b.n > b.in_flight && b.in_flight < b.nrreq) {
    const offset = b.offset;
    // Counted before submitting: a request may complete before blk_aio_* returns.
    b.in_flight++;
    // 7.2 wraps at the image size (a request may then end past it and fail, as in QEMU).
    b.offset = (b.offset + b.step) % b.image_size;
    const q = b.qiov[b.next_qiov]!;
    b.next_qiov = (b.next_qiov + 1) % b.nrreq;
    if (b.write) blk_aio_pwritev(b.blk, offset, q, 0, bench_cb, b);
    else blk_aio_preadv(b.blk, offset, q, 0, bench_cb, b);
  }
  // QEMU's loop ends when no request is left, even with a flush still in flight.
  if (b.n === 0) b.finish?.();
}

/** `qemu-img bench [-c count] [-d depth] [-f fmt] [--flush-interval=n] [-i aio] [--no-drain] [-o offset] [--pattern=p] [-q] [-s size] [-S step] [-t cache] [-w] [-U] filename`. */
export function* img_bench(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'hc:d:f:ni:o:qs:S:t:wU', [
    HELP_OPT,
    { name: 'flush-interval', arg: true, key: 'flush-interval' },
    IMAGE_OPTS_OPT,
    { name: 'pattern', arg: true, key: 'pattern' },
    { name: 'no-drain', arg: false, key: 'no-drain' },
    FORCE_SHARE_OPT,
    OBJECT_OPT,
  ]);
  if (typeof g === 'number') return g;
  let fmt: string | null = null;
  let image_opts = false;
  let is_write = false;
  let count = 75000;
  let depth = 64;
  let offset = 0;
  let bufsize = 4096;
  let pattern = 0;
  let step = 0;
  let flush_interval = 0;
  let drain_on_flush = true;
  let flags = 0;
  let writethrough = false;
  // QEMU's qemu_strtoul(arg, NULL, 0, &res) then `res > max`: a negative wraps and fails too.
  const ul = (arg: string, max: number, msg: string): number | null => {
    const v = strtol0(arg);
    if (v === null || v < 0 || v > max) {
      error_report(io, msg);
      return null;
    }
    return v;
  };
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'c': {
        const v = ul(o.arg!, INT_MAX, 'Invalid request count specified');
        if (v === null) return 1;
        count = v;
        break;
      }
      case 'd': {
        const v = ul(o.arg!, INT_MAX, 'Invalid queue depth specified');
        if (v === null) return 1;
        // QEMU 7.2 accepts 0 and then never finishes; aioco-img refuses it.
        if (v === 0) {
          error_report(io, 'Invalid queue depth specified');
          return 1;
        }
        depth = v;
        break;
      }
      case 'f':
        fmt = o.arg;
        break;
      case 'n':
        return not_supported(io, '-n (native AIO)');
      case 'i':
        if (o.arg === 'threads') break;
        if (o.arg === 'native' || o.arg === 'io_uring') return not_supported(io, `-i ${o.arg}`);
        error_report(io, `Invalid aio option: ${o.arg}`);
        return 1;
      case 'o': {
        const v = cvtnum(io, 'offset', o.arg!);
        if (v === null) return 1;
        offset = v;
        break;
      }
      case 'q':
        break;
      case 's': {
        const v = cvtnum_full(io, 'buffer size', o.arg!, 0n, BigInt(INT_MAX));
        if (v === null) return 1;
        bufsize = v;
        break;
      }
      case 'S': {
        const v = cvtnum_full(io, 'step_size', o.arg!, 0n, BigInt(INT_MAX));
        if (v === null) return 1;
        step = v;
        break;
      }
      case 't': {
        const cm = bdrv_parse_cache_mode(o.arg!, flags);
        if (!cm) {
          error_report(io, 'Invalid cache mode');
          return 1;
        }
        flags = cm.flags;
        writethrough = cm.writethrough;
        break;
      }
      case 'w':
        flags |= BDRV_O_RDWR;
        is_write = true;
        break;
      case 'U':
        break;
      case 'pattern': {
        const v = ul(o.arg!, 0xff, 'Invalid pattern byte specified');
        if (v === null) return 1;
        pattern = v;
        break;
      }
      case 'flush-interval': {
        const v = ul(o.arg!, INT_MAX, 'Invalid flush interval specified');
        if (v === null) return 1;
        flush_interval = v;
        break;
      }
      case 'no-drain':
        drain_on_flush = false;
        break;
      case 'image-opts':
        image_opts = true;
        break;
      case 'object':
        return not_supported(io, '--object');
    }
  }
  if (g.rest.length !== 1) return error_exit(io, 'Expecting one image file name');
  const filename = g.rest[0]!;
  if (!is_write && flush_interval) {
    error_report(io, '--flush-interval is only available in write tests');
    return 1;
  }
  if (flush_interval && flush_interval < depth) {
    error_report(io, "Flush interval can't be smaller than depth");
    return 1;
  }
  const blk = img_open(io, image_opts, filename, fmt, flags, writethrough);
  if (!blk) return 1;
  let bench: BenchData | null = null;
  try {
    const image_size = blk_getlength(blk);
    if (image_size < 0) return 1;
    const b: BenchData = {
      io,
      blk,
      image_size,
      write: is_write,
      bufsize,
      step: step || bufsize,
      nrreq: depth,
      n: count,
      flush_interval,
      drain_on_flush,
      qiov: [],
      in_flight: 0,
      in_flush: false,
      offset,
      next_qiov: 0,
      failed: false,
      stopped: false,
      finish: null,
    };
    bench = b;
    io.out(`Sending ${b.n} ${b.write ? 'write' : 'read'} requests, ${b.bufsize} bytes each, ${b.nrreq} in parallel (starting at offset ${b.offset}, step size ${b.step})\n`);
    if (flush_interval) io.out(`Sending flush every ${flush_interval} requests\n`);
    const buf = qemu_blockalign(blk_bs(blk), Math.max(1, b.nrreq * b.bufsize));
    buf.fill(pattern);
    for (let i = 0; i < b.nrreq; i++) {
      const q = new QEMUIOVector();
      qemu_iovec_init_buf(q, buf.subarray(i * b.bufsize, (i + 1) * b.bufsize), b.bufsize);
      b.qiov.push(q);
    }
    const { operation, resolve } = withResolvers<void>();
    let finished = false;
    b.finish = () => {
      if (finished) return;
      finished = true;
      setImmediate(resolve);
    };
    const t1 = process.hrtime.bigint();
    bench_cb(b, 0);
    if (!finished || b.n > 0) yield* operation;
    const t2 = process.hrtime.bigint();
    if (b.failed) return 1;
    io.out(`Run completed in ${(Number(t2 - t1) / 1e9).toFixed(3)} seconds.\n`);
    return 0;
  } finally {
    // Halted (Ctrl-C) or done: issue nothing more, wait for what is in flight.
    if (bench) bench.stopped = true;
    blk_drain(blk);
    blk_unref(blk);
  }
}
