/**
 * The `null-co` and `null-aio` protocol drivers (QEMU 7.2 block/null.c): a disk of a given size
 * that stores nothing. Writes and flushes succeed without effect; reads succeed and either leave
 * the caller's buffer as it was or, with `read-zeroes=on`, fill it with zeroes. Each request can
 * be delayed by `latency-ns` on the realtime clock.
 *
 * `null-co` implements coroutine callbacks; `null-aio` implements the AIOCB interface
 * (`bdrv_aio_preadv/pwritev/flush`), completing from a one-shot BH, or from a realtime timer
 * when a latency is set. Its AIOCBInfo has no `cancel_async`: cancelling waits for completion.
 *
 * Importing this module registers both drivers. Open with `blk_new_open('null-co://', ...)`
 * or `{ driver: 'null-aio', size: 4096, 'read-zeroes': 'on', 'latency-ns': 1000000 }`.
 */
import {
  aio_bh_schedule_oneshot,
  aio_timer_new,
  bdrv_get_aio_context,
  bdrv_register,
  BlockAIOCB,
  qemu_aio_get,
  qemu_aio_unref,
  qemu_clock_get_ns,
  qemu_co_sleep_ns,
  qemu_iovec_memset,
  timer_free,
  timer_mod_ns,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_ZERO,
  BDRV_REQ_FUA,
  QEMU_CLOCK_REALTIME,
  QemuError,
  SCALE_NS,
  type AIOCBInfo,
  type BlockCompletionFunc,
  type BlockDriver,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
  type QEMUIOVector,
  type QEMUTimer,
  qemu_opt_get_size,
} from '../../src/index.ts';

/** Per-node state (QEMU's BDRVNullState). */
export interface BDRVNullState {
  length: number;
  latency_ns: number;
  read_zeroes: boolean;
}

/** Option names (QEMU: NULL_OPT_LATENCY, NULL_OPT_ZEROES, BLOCK_OPT_SIZE). */
export const NULL_OPT_LATENCY = 'latency-ns';
export const NULL_OPT_ZEROES = 'read-zeroes';
const NULL_OPT_SIZE = 'size';

/** Parses a QEMU_OPT_NUMBER value (an integer, negative allowed as QEMU's wrap-around). @internal */
function opt_get_number(options: Record<string, unknown>, name: string, def: number): number {
  const v = options[name];
  if (v === undefined || v === null) return def;
  const n = typeof v === 'number' ? v : /^\s*-?\d+\s*$/.test(String(v)) ? Number(v) : Number.NaN;
  if (!Number.isSafeInteger(n)) throw new QemuError(`Parameter '${name}' expects a number`);
  return n;
}

/** Parses a QEMU_OPT_BOOL value. @internal */
function opt_get_bool(options: Record<string, unknown>, name: string, def: boolean): boolean {
  const v = options[name];
  if (v === undefined || v === null) return def;
  if (v === true || v === 'on' || v === 'true') return true;
  if (v === false || v === 'off' || v === 'false') return false;
  throw new QemuError(`Parameter '${name}' expects 'on' or 'off'`);
}

function null_parse_filename(proto: string): (filename: string, options: Record<string, unknown>) => void {
  const only = `${proto}://`;
  return (filename) => {
    if (filename !== only) throw new QemuError(`The only allowed filename for this driver is '${only}'`);
  };
}

function null_file_open(bs: BlockDriverState, options: Record<string, unknown>): void {
  const length = qemu_opt_get_size(options, NULL_OPT_SIZE, 1 << 30);
  const latency_ns = opt_get_number(options, NULL_OPT_LATENCY, 0);
  const read_zeroes = opt_get_bool(options, NULL_OPT_ZEROES, false);
  if (latency_ns < 0) throw new QemuError('latency-ns is invalid');
  bs.opaque = { length, latency_ns, read_zeroes } satisfies BDRVNullState;
  bs.supported_write_flags = BDRV_REQ_FUA;
}

function null_getlength(bs: BlockDriverState): number {
  return (bs.opaque as BDRVNullState).length;
}

function* null_co_common(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVNullState;
  if (s.latency_ns) yield* qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, s.latency_ns);
  return 0;
}

// null_co_common is entered only when there is a latency to sleep: a generator per request
// costs a measurable share of null-co's request rate, and most null-co nodes have no latency.

function* null_co_preadv(bs: BlockDriverState, _offset: number, bytes: number, qiov: QEMUIOVector, _flags: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVNullState;
  if (s.read_zeroes) qemu_iovec_memset(qiov, 0, 0, bytes);
  return s.latency_ns ? yield* null_co_common(bs) : 0;
}

function* null_co_pwritev(bs: BlockDriverState, _offset: number, _bytes: number, _qiov: QEMUIOVector, _flags: number): CoroutineFn<number> {
  return (bs.opaque as BDRVNullState).latency_ns ? yield* null_co_common(bs) : 0;
}

function* null_co_flush(bs: BlockDriverState): CoroutineFn<number> {
  return (bs.opaque as BDRVNullState).latency_ns ? yield* null_co_common(bs) : 0;
}

function* null_co_block_status(
  bs: BlockDriverState,
  _want_zero: boolean,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
): CoroutineFn<number> {
  out.pnum = bytes;
  out.map = offset;
  out.file = bs;
  return (bs.opaque as BDRVNullState).read_zeroes ? BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ZERO : BDRV_BLOCK_OFFSET_VALID;
}

/** QEMU's NullAIOCB: the AIOCB plus the latency timer. */
export class NullAIOCB extends BlockAIOCB {
  timer: QEMUTimer | null = null;
}

/** No cancel_async (QEMU): a null-aio request always completes with 0. */
export const null_aiocb_info: AIOCBInfo<NullAIOCB> = {
  aiocb_class: NullAIOCB,
  name: 'null_aiocb_info',
};

function null_bh_cb(acb: NullAIOCB): void {
  const cb = acb.cb!;
  cb(acb.opaque, 0);
  qemu_aio_unref(acb);
}

function null_timer_cb(acb: NullAIOCB): void {
  const cb = acb.cb!;
  cb(acb.opaque, 0);
  timer_free(acb.timer);
  acb.timer = null;
  qemu_aio_unref(acb);
}

function null_aio_common(bs: BlockDriverState, cb: BlockCompletionFunc, opaque: unknown): BlockAIOCB {
  const s = bs.opaque as BDRVNullState;
  const acb = qemu_aio_get(null_aiocb_info, bs, cb, opaque);
  const ctx = bdrv_get_aio_context(bs);
  if (s.latency_ns) {
    acb.timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, null_timer_cb, acb);
    timer_mod_ns(acb.timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + s.latency_ns);
  } else {
    aio_bh_schedule_oneshot(ctx, null_bh_cb, acb);
  }
  return acb;
}

function null_aio_preadv(
  bs: BlockDriverState,
  _offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  _flags: number,
  cb: BlockCompletionFunc,
  opaque: unknown,
): BlockAIOCB {
  if ((bs.opaque as BDRVNullState).read_zeroes) qemu_iovec_memset(qiov, 0, 0, bytes);
  return null_aio_common(bs, cb, opaque);
}

function null_aio_pwritev(
  bs: BlockDriverState,
  _offset: number,
  _bytes: number,
  _qiov: QEMUIOVector,
  _flags: number,
  cb: BlockCompletionFunc,
  opaque: unknown,
): BlockAIOCB {
  return null_aio_common(bs, cb, opaque);
}

function null_aio_flush(bs: BlockDriverState, cb: BlockCompletionFunc, opaque: unknown): BlockAIOCB {
  return null_aio_common(bs, cb, opaque);
}

const runtime_opts = [NULL_OPT_SIZE, NULL_OPT_LATENCY, NULL_OPT_ZEROES];

/** The `null-co` driver (coroutine callbacks). */
export const bdrv_null_co: BlockDriver = {
  format_name: 'null-co',
  protocol_name: 'null-co',
  runtime_opts,
  bdrv_file_open: null_file_open,
  bdrv_parse_filename: null_parse_filename('null-co'),
  bdrv_getlength: null_getlength,
  bdrv_co_preadv: null_co_preadv,
  bdrv_co_pwritev: null_co_pwritev,
  bdrv_co_flush_to_disk: null_co_flush,
  bdrv_co_block_status: null_co_block_status,
};

/** The `null-aio` driver (AIOCB callbacks). */
export const bdrv_null_aio: BlockDriver = {
  format_name: 'null-aio',
  protocol_name: 'null-aio',
  runtime_opts,
  bdrv_file_open: null_file_open,
  bdrv_parse_filename: null_parse_filename('null-aio'),
  bdrv_getlength: null_getlength,
  bdrv_aio_preadv: null_aio_preadv,
  bdrv_aio_pwritev: null_aio_pwritev,
  bdrv_aio_flush: null_aio_flush,
  bdrv_co_block_status: null_co_block_status,
};

bdrv_register(bdrv_null_co);
bdrv_register(bdrv_null_aio);
