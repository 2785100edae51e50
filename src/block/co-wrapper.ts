/**
 * Synchronous forms of node-level coroutine functions: each runs its `bdrv_co_*` counterpart
 * in a coroutine and drives the node's AioContext until it is done. QEMU: the
 * `generated_co_wrapper` functions of block/block-gen.c (`bdrv_pread`, `bdrv_pwrite`, ...) and
 * `bdrv_poll_co`. They serve code that is not a coroutine in QEMU either: a driver's
 * `bdrv_open`, qemu-img's set-up, tests.
 */
import { qemu_get_aio_context } from '../aio/aio-context.ts';
import { AIO_WAIT_WHILE } from '../aio/aio-wait.ts';
import { aio_co_enter } from '../aio/co-schedule.ts';
import { QemuError } from '../aio/error.ts';
import { qemu_coroutine_create, qemu_in_coroutine, type CoroutineFn } from '../coroutine/coroutine.ts';
import type { BdrvChild, BlockDriverState } from './block-driver-state.ts';
import { bdrv_co_flush, bdrv_co_preadv, bdrv_co_pwrite_zeroes, bdrv_co_pwritev } from './io.ts';
import { QEMUIOVector, qemu_iovec_init_buf } from './qiov.ts';

interface PollCo<T> {
  body: () => CoroutineFn<T>;
  done: boolean;
  ret: T | undefined;
  failed: boolean;
  error: unknown;
}

/** The coroutine every wrapper runs: module-level, so no closure is made per call. */
function* bdrv_poll_co_entry<T>(s: PollCo<T>): CoroutineFn<void> {
  try {
    s.ret = yield* s.body();
  } catch (e) {
    s.failed = true;
    s.error = e;
  } finally {
    s.done = true;
  }
}

/**
 * Runs `body` in a new coroutine in `bs`'s AioContext (the main one for null) and polls until it returns; a throw
 * inside is rethrown here. QEMU: `bdrv_poll_co` (BDRV_POLL_WHILE around a coroutine).
 * Surprise: called from inside a coroutine it throws QemuError naming `name` (QEMU's mixed
 * wrappers would call the coroutine directly; a generator cannot block), so coroutine code must
 * use the `bdrv_co_*` form.
 */
export function bdrv_poll_co<T>(bs: BlockDriverState | null, name: string, body: () => CoroutineFn<T>): T {
  if (qemu_in_coroutine()) {
    throw new QemuError(`${name}: called from a coroutine; use the coroutine_fn form (aioco cannot block inside a coroutine)`);
  }
  const s: PollCo<T> = { body, done: false, ret: undefined, failed: false, error: undefined };
  const co = qemu_coroutine_create(bdrv_poll_co_entry<T>, s, name);
  const ctx = bs?.aio_context ?? qemu_get_aio_context();
  aio_co_enter(ctx, co);
  AIO_WAIT_WHILE(ctx, () => !s.done);
  // A flag, not `error !== undefined`: `throw undefined` must come back as a throw too.
  if (s.failed) throw s.error;
  return s.ret as T;
}

function buf_qiov(buf: Uint8Array, bytes: number): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  return q;
}

/**
 * Writes `bytes` of `buf` then flushes the node. QEMU: `bdrv_co_pwrite_sync`, which metadata
 * writers use where ordering against later writes matters. 0 or -errno.
 */
export function* bdrv_co_pwrite_sync(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags: number): CoroutineFn<number> {
  const ret = yield* bdrv_co_pwritev(child, offset, bytes, buf_qiov(buf, bytes), flags);
  if (ret < 0) return ret;
  return yield* bdrv_co_flush(child.bs);
}

/** Reads synchronously. QEMU 7.2: `bdrv_pread(child, offset, bytes, buf, flags)`; 0 or -errno. */
export function bdrv_pread(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags: number): number {
  const q = buf_qiov(buf, bytes);
  return bdrv_poll_co(child.bs, 'bdrv_pread', () => bdrv_co_preadv(child, offset, bytes, q, flags));
}

/** Writes synchronously. QEMU 7.2: `bdrv_pwrite`; 0 or -errno. */
export function bdrv_pwrite(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags: number): number {
  const q = buf_qiov(buf, bytes);
  return bdrv_poll_co(child.bs, 'bdrv_pwrite', () => bdrv_co_pwritev(child, offset, bytes, q, flags));
}

/** Writes then flushes, synchronously. QEMU 7.2: `bdrv_pwrite_sync`; 0 or -errno. */
export function bdrv_pwrite_sync(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags: number): number {
  return bdrv_poll_co(child.bs, 'bdrv_pwrite_sync', () => bdrv_co_pwrite_sync(child, offset, bytes, buf, flags));
}

/** Writes zeroes synchronously. QEMU: `bdrv_pwrite_zeroes`; 0 or -errno. */
export function bdrv_pwrite_zeroes(child: BdrvChild, offset: number, bytes: number, flags: number): number {
  return bdrv_poll_co(child.bs, 'bdrv_pwrite_zeroes', () => bdrv_co_pwrite_zeroes(child, offset, bytes, flags));
}

/** Flushes synchronously. QEMU: `bdrv_flush`; 0 or -errno. */
export function bdrv_flush(bs: BlockDriverState): number {
  return bdrv_poll_co(bs, 'bdrv_flush', () => bdrv_co_flush(bs));
}
