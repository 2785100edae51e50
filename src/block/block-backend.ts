/**
 * `BlockBackend`: the device-facing end of the graph. QEMU: block/block-backend.c (7.2):
 * range checks, queueing while drained, write-cache (FUA), `blk_aio_*` AIOCB emulation and
 * synchronous wrappers.
 */
import type { AioContext } from '../aio/aio-context.ts';
import { AIO_WAIT_WHILE, aio_wait_kick } from '../aio/aio-wait.ts';
import { aio_bh_schedule_oneshot } from '../aio/bh.ts';
import { aio_co_enter } from '../aio/co-schedule.ts';
import { EIO, ENOMEDIUM } from '../aio/errno.ts';
import { QemuError } from '../aio/error.ts';
import { BlockAIOCB, qemu_aio_get, qemu_aio_unref, type AIOCBInfo, type BlockCompletionFunc } from '../aio/aiocb.ts';
import { qemu_coroutine_create, qemu_in_coroutine, type CoroutineEntry, type CoroutineFn } from '../coroutine/coroutine.ts';
import { CoQueue, qemu_co_enter_next, qemu_co_queue_wait } from '../coroutine/co-queue.ts';
import { QEMUIOVector, qemu_iovec_init_buf } from './qiov.ts';
import { BDRV_O_RDWR, BDRV_REQ_FUA, BDRV_REQ_ZERO_WRITE } from './block-common.ts';
import {
  BDRV_CHILD_DATA,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_PRIMARY,
  BdrvChild,
  bdrv_getlength,
  bdrv_open,
  bdrv_unref,
  type BdrvChildClass,
  type BlockDriverState,
} from './block-driver-state.ts';
import { bdrv_dec_in_flight, bdrv_drained_begin, bdrv_drained_end, bdrv_inc_in_flight } from './drain.ts';
import { bdrv_co_flush, bdrv_co_pdiscard, bdrv_co_preadv_part, bdrv_co_pwritev_part } from './io.ts';

/** QEMU's `BlockBackend`. */
export class BlockBackend {
  root: BdrvChild | null = null;
  ctx: AioContext;
  refcnt = 1;
  in_flight = 0;
  quiesce_counter = 0;
  /** @internal requests parked while drained. */ queued_requests = new CoQueue();
  disable_request_queuing = false;
  /** false = cache=writethrough: every write gets BDRV_REQ_FUA. */
  enable_write_cache = true;
  allow_write_beyond_eof = false;
  constructor(ctx: AioContext) {
    this.ctx = ctx;
  }
}

const blkRootClass: BdrvChildClass = {
  drained_begin(c) {
    const blk = c.opaque as BlockBackend;
    blk.quiesce_counter++;
  },
  drained_end(c) {
    const blk = c.opaque as BlockBackend;
    if (--blk.quiesce_counter === 0) while (qemu_co_enter_next(blk.queued_requests)) {}
  },
  drained_poll(c) {
    return (c.opaque as BlockBackend).in_flight > 0;
  },
  set_aio_ctx(c, ctx) {
    (c.opaque as BlockBackend).ctx = ctx;
  },
};

/** The root node, or null. QEMU: `blk_bs`. */
export function blk_bs(blk: BlockBackend): BlockDriverState | null {
  return blk.root?.bs ?? null;
}

/** The backend's context (its root's). QEMU: `blk_get_aio_context`. */
export function blk_get_aio_context(blk: BlockBackend): AioContext {
  return blk.root?.bs.aio_context ?? blk.ctx;
}

/** Attaches `bs` as root (takes a reference of the caller's). QEMU: `blk_insert_bs`. */
export function blk_insert_bs(blk: BlockBackend, bs: BlockDriverState): void {
  const c = new BdrvChild(bs, 'root', BDRV_CHILD_DATA | BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY, blk, blkRootClass);
  bs.parents.push(c);
  blk.root = c;
  blk.ctx = bs.aio_context;
  if (bs.quiesce_counter > 0) {
    c.quiesced_parent = true;
    blkRootClass.drained_begin!(c);
  }
}

/**
 * Opens `filename`/`options` (see `bdrv_open`) under a new backend. QEMU: `blk_new_open`.
 * `reference` (a node name) attaches an existing node instead. Flags: BDRV_O_RDWR,
 * BDRV_O_NO_FLUSH, BDRV_O_NOCACHE, BDRV_O_UNMAP...; option `cache.writeback`=off (or false)
 * makes it writethrough. Throws QemuError with QEMU's messages.
 */
export function blk_new_open(
  filename: string | null,
  reference: string | null,
  options: Record<string, unknown>,
  flags: number,
): BlockBackend {
  const opts = { ...options };
  let writeback = true;
  if ('cache.writeback' in opts) {
    const v = opts['cache.writeback'];
    writeback = !(v === false || v === 'off' || v === 'false');
    delete opts['cache.writeback'];
  }
  let bs: BlockDriverState;
  if (reference !== null) {
    bs = bdrv_open_reference(reference, filename, options);
  } else {
    bs = bdrv_open(filename, opts, flags);
  }
  const blk = new BlockBackend(bs.aio_context);
  blk.enable_write_cache = writeback;
  blk_insert_bs(blk, bs);
  return blk;
}

import { bdrv_open_reference } from './block-driver-state.ts';

/** Drops a reference; the last one detaches and unrefs the root. QEMU: `blk_unref`. */
export function blk_unref(blk: BlockBackend): void {
  if (--blk.refcnt > 0) return;
  if (blk.root) {
    blk_drain(blk);
    const c = blk.root;
    c.bs.parents = c.bs.parents.filter((x) => x !== c);
    blk.root = null;
    bdrv_unref(c.bs);
  }
}

/** Sets write caching (false = writethrough: writes carry FUA). QEMU: `blk_set_enable_write_cache`. */
export function blk_set_enable_write_cache(blk: BlockBackend, wce: boolean): void {
  blk.enable_write_cache = wce;
}

/** Length in bytes (sector-granular in 7.2) or -ENOMEDIUM. QEMU: `blk_getlength`. */
export function blk_getlength(blk: BlockBackend): number {
  const bs = blk_bs(blk);
  return bs ? bdrv_getlength(bs) : -ENOMEDIUM;
}

/** QEMU: `blk_inc_in_flight`. */
export function blk_inc_in_flight(blk: BlockBackend): void {
  blk.in_flight++;
}
/** QEMU: `blk_dec_in_flight` (kicks waiters). */
export function blk_dec_in_flight(blk: BlockBackend): void {
  blk.in_flight--;
  aio_wait_kick();
}

/**
 * Range check: `bytes < 0` or `offset < 0` ⇒ -EIO; no medium ⇒ -ENOMEDIUM; beyond the length ⇒
 * -EIO (unless allow_write_beyond_eof). QEMU: `blk_check_byte_request`.
 */
export function blk_check_byte_request(blk: BlockBackend, offset: number, bytes: number): number {
  if (bytes < 0) return -EIO;
  const bs = blk_bs(blk);
  if (!bs || !bs.drv) return -ENOMEDIUM;
  if (offset < 0) return -EIO;
  if (!blk.allow_write_beyond_eof) {
    const len = bdrv_getlength(bs);
    if (len < 0) return len;
    if (offset > len || len - offset < bytes) return -EIO;
  }
  return 0;
}

/** Callers check `blk.quiesce_counter` first: a generator per request only to find it 0 costs. */
function* blk_wait_while_drained(blk: BlockBackend): CoroutineFn<void> {
  if (blk.quiesce_counter && !blk.disable_request_queuing) {
    blk_dec_in_flight(blk);
    yield* qemu_co_queue_wait(blk.queued_requests);
    blk_inc_in_flight(blk);
  }
}

/**
 * To be called between blk_inc/dec_in_flight. QEMU: `blk_co_do_preadv_part`. With `acb` it also
 * ends that blk_aio request (QEMU's `blk_aio_read_entry`: sets its ret, then
 * `blk_aio_complete`): the coroutine of blk_aio_preadv is this generator itself, one less per
 * request on the hottest path.
 */
function* blk_co_do_preadv_part(
  blk: BlockBackend,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
  acb: BlkAioEmAIOCB | null = null,
): CoroutineFn<number> {
  if (blk.quiesce_counter) yield* blk_wait_while_drained(blk);
  let ret = blk_check_byte_request(blk, offset, bytes);
  if (ret === 0) {
    const bs = blk_bs(blk)!;
    bdrv_inc_in_flight(bs);
    try {
      ret = yield* bdrv_co_preadv_part(blk.root!, offset, bytes, qiov, qiov_offset, flags);
    } finally {
      bdrv_dec_in_flight(bs);
    }
  }
  if (acb !== null) {
    acb.ret = ret;
    blk_aio_complete(acb);
  }
  return ret;
}

/** As blk_co_do_preadv_part, for writes (QEMU: `blk_co_do_pwritev_part`, `blk_aio_write_entry`). */
function* blk_co_do_pwritev_part(
  blk: BlockBackend,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector | null,
  qiov_offset: number,
  flags: number,
  acb: BlkAioEmAIOCB | null = null,
): CoroutineFn<number> {
  if (blk.quiesce_counter) yield* blk_wait_while_drained(blk);
  let ret = blk_check_byte_request(blk, offset, bytes);
  if (ret === 0) {
    const bs = blk_bs(blk)!;
    bdrv_inc_in_flight(bs);
    try {
      if (!blk.enable_write_cache) flags |= BDRV_REQ_FUA;
      ret = yield* bdrv_co_pwritev_part(blk.root!, offset, bytes, qiov, qiov_offset, flags);
    } finally {
      bdrv_dec_in_flight(bs);
    }
  }
  if (acb !== null) {
    acb.ret = ret;
    blk_aio_complete(acb);
  }
  return ret;
}

function* blk_co_do_pdiscard(blk: BlockBackend, offset: number, bytes: number): CoroutineFn<number> {
  if (blk.quiesce_counter) yield* blk_wait_while_drained(blk);
  const ret = blk_check_byte_request(blk, offset, bytes);
  if (ret < 0) return ret;
  return yield* bdrv_co_pdiscard(blk.root, offset, bytes);
}

function* blk_co_do_flush(blk: BlockBackend): CoroutineFn<number> {
  if (blk.quiesce_counter) yield* blk_wait_while_drained(blk);
  const bs = blk_bs(blk);
  if (!bs || !bs.drv) return -ENOMEDIUM;
  return yield* bdrv_co_flush(bs);
}

/**
 * Reads through the backend. QEMU: `blk_co_preadv_part`: waits while drained, -EIO outside the
 * length, then `bdrv_co_preadv_part` on the root.
 */
export function* blk_co_preadv_part(blk: BlockBackend, offset: number, bytes: number, qiov: QEMUIOVector, qiov_offset: number, flags: number): CoroutineFn<number> {
  blk_inc_in_flight(blk);
  try {
    return yield* blk_co_do_preadv_part(blk, offset, bytes, qiov, qiov_offset, flags);
  } finally {
    blk_dec_in_flight(blk);
  }
}

/** QEMU: `blk_co_preadv`. */
export function* blk_co_preadv(blk: BlockBackend, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number> {
  return yield* blk_co_preadv_part(blk, offset, bytes, qiov, 0, flags);
}

/**
 * Writes through the backend. QEMU: `blk_co_pwritev_part`. Surprise: with write caching off
 * (cache=writethrough) every write carries BDRV_REQ_FUA.
 */
export function* blk_co_pwritev_part(blk: BlockBackend, offset: number, bytes: number, qiov: QEMUIOVector | null, qiov_offset: number, flags: number): CoroutineFn<number> {
  blk_inc_in_flight(blk);
  try {
    return yield* blk_co_do_pwritev_part(blk, offset, bytes, qiov, qiov_offset, flags);
  } finally {
    blk_dec_in_flight(blk);
  }
}

/** QEMU: `blk_co_pwritev`. */
export function* blk_co_pwritev(blk: BlockBackend, offset: number, bytes: number, qiov: QEMUIOVector | null, flags: number): CoroutineFn<number> {
  return yield* blk_co_pwritev_part(blk, offset, bytes, qiov, 0, flags);
}

/** Writes zeroes (no buffer). QEMU: `blk_co_pwrite_zeroes` (adds BDRV_REQ_ZERO_WRITE). */
export function* blk_co_pwrite_zeroes(blk: BlockBackend, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  return yield* blk_co_pwritev(blk, offset, bytes, null, flags | BDRV_REQ_ZERO_WRITE);
}

/** Discards. QEMU: `blk_co_pdiscard` (range-checked, then `bdrv_co_pdiscard`). */
export function* blk_co_pdiscard(blk: BlockBackend, offset: number, bytes: number): CoroutineFn<number> {
  blk_inc_in_flight(blk);
  try {
    return yield* blk_co_do_pdiscard(blk, offset, bytes);
  } finally {
    blk_dec_in_flight(blk);
  }
}

/** Flushes the root node. QEMU: `blk_co_flush` (no range check). */
export function* blk_co_flush(blk: BlockBackend): CoroutineFn<number> {
  blk_inc_in_flight(blk);
  try {
    return yield* blk_co_do_flush(blk);
  } finally {
    blk_dec_in_flight(blk);
  }
}

const NOT_DONE = 0x7fffffff;

/** QEMU's `BlkAioEmAIOCB`. */
export class BlkAioEmAIOCB extends BlockAIOCB {
  blk!: BlockBackend;
  offset = 0;
  bytes = 0;
  iobuf: QEMUIOVector | null = null;
  ret = NOT_DONE;
  flags = 0;
  has_returned = false;
}

/** No cancel_async: cancelling a blk_aio_* request only waits for it (QEMU). */
const blk_aio_em_aiocb_info: AIOCBInfo<BlkAioEmAIOCB> = {
  aiocb_class: BlkAioEmAIOCB,
  name: 'blk_aio_em_aiocb_info',
  get_aio_context: (acb) => blk_get_aio_context(acb.blk),
};

function blk_aio_complete(acb: BlkAioEmAIOCB): void {
  if (acb.has_returned) {
    const cb = acb.cb;
    const blk = acb.blk;
    cb?.(acb.opaque, acb.ret);
    blk_dec_in_flight(blk);
    qemu_aio_unref(acb);
  }
}

function blk_aio_prwv(
  blk: BlockBackend,
  offset: number,
  bytes: number,
  iobuf: QEMUIOVector | null,
  co_entry: (acb: BlkAioEmAIOCB) => CoroutineFn<unknown>,
  flags: number,
  cb: BlockCompletionFunc,
  opaque: unknown,
): BlkAioEmAIOCB {
  blk_inc_in_flight(blk);
  const acb = qemu_aio_get(blk_aio_em_aiocb_info, blk_bs(blk), cb, opaque);
  acb.blk = blk;
  acb.offset = offset;
  acb.bytes = bytes;
  acb.iobuf = iobuf;
  acb.flags = flags;
  acb.ret = NOT_DONE;
  acb.has_returned = false;
  // The entries' generators return the request's result; a coroutine's return value is dropped.
  const co = qemu_coroutine_create(co_entry as CoroutineEntry<BlkAioEmAIOCB>, acb, 'blk_aio');
  aio_co_enter(blk_get_aio_context(blk), co);
  acb.has_returned = true;
  if (acb.ret !== NOT_DONE) aio_bh_schedule_oneshot(blk_get_aio_context(blk), blk_aio_complete, acb);
  return acb;
}

// The coroutines of blk_aio_preadv/pwritev: the blk_co_do_* generators themselves, which end
// the request (their number result is dropped, as a coroutine's is).
function blk_aio_read_entry(acb: BlkAioEmAIOCB): CoroutineFn<unknown> {
  return blk_co_do_preadv_part(acb.blk, acb.offset, acb.bytes, acb.iobuf!, 0, acb.flags, acb);
}
function blk_aio_write_entry(acb: BlkAioEmAIOCB): CoroutineFn<unknown> {
  return blk_co_do_pwritev_part(acb.blk, acb.offset, acb.bytes, acb.iobuf, 0, acb.flags, acb);
}
function* blk_aio_flush_entry(acb: BlkAioEmAIOCB): CoroutineFn<void> {
  acb.ret = yield* blk_co_do_flush(acb.blk);
  blk_aio_complete(acb);
}
function* blk_aio_pdiscard_entry(acb: BlkAioEmAIOCB): CoroutineFn<void> {
  acb.ret = yield* blk_co_do_pdiscard(acb.blk, acb.offset, acb.bytes);
  blk_aio_complete(acb);
}

/**
 * Starts a read; `cb(opaque, ret)` runs once when it ends. QEMU: `blk_aio_preadv`. Surprise: the
 * request starts running inside this call, but the callback never runs before it returns (a
 * synchronous completion is deferred to a BH in the backend's context); an asynchronous one
 * runs directly in the request's coroutine.
 */
export function blk_aio_preadv(blk: BlockBackend, offset: number, qiov: QEMUIOVector, flags: number, cb: BlockCompletionFunc, opaque?: unknown): BlockAIOCB {
  return blk_aio_prwv(blk, offset, qiov.size, qiov, blk_aio_read_entry, flags, cb, opaque);
}

/** Starts a write. QEMU: `blk_aio_pwritev` (same callback rules as `blk_aio_preadv`). */
export function blk_aio_pwritev(blk: BlockBackend, offset: number, qiov: QEMUIOVector, flags: number, cb: BlockCompletionFunc, opaque?: unknown): BlockAIOCB {
  return blk_aio_prwv(blk, offset, qiov.size, qiov, blk_aio_write_entry, flags, cb, opaque);
}

/** Starts a zero write. QEMU: `blk_aio_pwrite_zeroes`. */
export function blk_aio_pwrite_zeroes(blk: BlockBackend, offset: number, bytes: number, flags: number, cb: BlockCompletionFunc, opaque?: unknown): BlockAIOCB {
  return blk_aio_prwv(blk, offset, bytes, null, blk_aio_write_entry, flags | BDRV_REQ_ZERO_WRITE, cb, opaque);
}

/** Starts a flush. QEMU: `blk_aio_flush`. */
export function blk_aio_flush(blk: BlockBackend, cb: BlockCompletionFunc, opaque?: unknown): BlockAIOCB {
  return blk_aio_prwv(blk, 0, 0, null, blk_aio_flush_entry, 0, cb, opaque);
}

/** Starts a discard. QEMU: `blk_aio_pdiscard`. */
export function blk_aio_pdiscard(blk: BlockBackend, offset: number, bytes: number, cb: BlockCompletionFunc, opaque?: unknown): BlockAIOCB {
  return blk_aio_prwv(blk, offset, bytes, null, blk_aio_pdiscard_entry, 0, cb, opaque);
}

interface SyncRun {
  body: () => CoroutineFn<number>;
  ret: number;
}

/** The coroutine of a synchronous wrapper: module-level, not a closure made per call (~5 µs). */
function* blk_run_sync_entry(st: SyncRun): CoroutineFn<void> {
  st.ret = yield* st.body();
}

function blk_run_sync(blk: BlockBackend, fn: string, body: () => CoroutineFn<number>): number {
  if (qemu_in_coroutine()) throw new QemuError(`${fn}: called from a coroutine; use the blk_co_* function (aioco cannot block inside a coroutine)`);
  const st: SyncRun = { body, ret: NOT_DONE };
  const co = qemu_coroutine_create(blk_run_sync_entry, st, fn);
  const ctx = blk_get_aio_context(blk);
  aio_co_enter(ctx, co);
  AIO_WAIT_WHILE(ctx, () => st.ret === NOT_DONE);
  return st.ret;
}

/**
 * Reads synchronously, driving the event loop until done. QEMU 7.2: `blk_pread` (a
 * generated_co_wrapper). Returns 0 or -errno (7.2; 5.2 returned the byte count). Throws
 * QemuError when called inside a coroutine.
 */
export function blk_pread(blk: BlockBackend, offset: number, bytes: number, buf: Uint8Array, flags: number): number {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  return blk_run_sync(blk, 'blk_pread', () => blk_co_preadv(blk, offset, bytes, q, flags));
}

/** Writes synchronously. QEMU 7.2: `blk_pwrite`; 0 or -errno. */
export function blk_pwrite(blk: BlockBackend, offset: number, bytes: number, buf: Uint8Array, flags: number): number {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  return blk_run_sync(blk, 'blk_pwrite', () => blk_co_pwritev(blk, offset, bytes, q, flags));
}

/** Writes zeroes synchronously. QEMU: `blk_pwrite_zeroes`; 0 or -errno. */
export function blk_pwrite_zeroes(blk: BlockBackend, offset: number, bytes: number, flags: number): number {
  return blk_run_sync(blk, 'blk_pwrite_zeroes', () => blk_co_pwrite_zeroes(blk, offset, bytes, flags));
}

/** Flushes synchronously. QEMU: `blk_flush`; 0 or -errno. */
export function blk_flush(blk: BlockBackend): number {
  return blk_run_sync(blk, 'blk_flush', () => blk_co_flush(blk));
}

/** Discards synchronously. QEMU: `blk_pdiscard`; 0 or -errno. */
export function blk_pdiscard(blk: BlockBackend, offset: number, bytes: number): number {
  return blk_run_sync(blk, 'blk_pdiscard', () => blk_co_pdiscard(blk, offset, bytes));
}

/**
 * Waits until the backend has no request in flight (including AIO callbacks not yet run) and its
 * root node is idle. QEMU: `blk_drain`.
 */
export function blk_drain(blk: BlockBackend): void {
  const bs = blk_bs(blk);
  if (bs) bdrv_drained_begin(bs);
  AIO_WAIT_WHILE(blk_get_aio_context(blk), () => blk.in_flight > 0);
  if (bs) bdrv_drained_end(bs);
}

/** Whether the backend is writable. QEMU: `blk_is_writable` (root opened with BDRV_O_RDWR). */
export function blk_is_writable(blk: BlockBackend): boolean {
  const bs = blk_bs(blk);
  return !!bs && !!(bs.open_flags & BDRV_O_RDWR) && !bs.read_only;
}

