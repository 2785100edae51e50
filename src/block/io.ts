/**
 * The request path of block/io.c (QEMU 7.2): reads and writes with request_alignment padding and
 * read-modify-write, max_transfer splitting, zero-fill beyond EOF, BDRV_REQ_* flags and their
 * fallbacks, write-zeroes emulation, flush generations, discard and truncate. Every request is
 * counted in `bs.in_flight` and tracked (see tracked-request.ts).
 */
import { EBUSY, EINVAL, EIO, ENOMEDIUM, ENOTSUP, EPERM, strerror } from '../aio/errno.ts';
import { QemuError } from '../aio/error.ts';
import { aio_co_wake } from '../aio/co-schedule.ts';
import type { BlockAIOCB } from '../aio/aiocb.ts';
import { qemu_coroutine_self, qemu_coroutine_yield, type Coroutine, type CoroutineFn, type CoroutineYield } from '../coroutine/coroutine.ts';
import { qemu_co_queue_next, qemu_co_queue_wait } from '../coroutine/co-queue.ts';
import {
  QEMUIOVector,
  qemu_iovec_init_buf,
  qemu_iovec_init_extended,
  qemu_iovec_init_slice,
  qemu_iovec_memset,
} from './qiov.ts';
import {
  ALIGN_DOWN,
  BDRV_MAX_LENGTH,
  BDRV_O_NO_FLUSH,
  BDRV_O_UNMAP,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_NO_WAIT,
  BDRV_REQ_REGISTERED_BUF,
  BDRV_REQ_SERIALISING,
  BDRV_REQ_WRITE_COMPRESSED,
  BDRV_REQ_ZERO_WRITE,
  BDRV_REQUEST_MAX_BYTES,
  BDRV_SECTOR_SIZE,
  INT_MAX,
  MAX_BOUNCE_BUFFER,
  MIN_NON_ZERO,
  type PreallocMode,
} from './block-common.ts';
import {
  bdrv_bsc_invalidate_range,
  bdrv_getlength,
  bdrv_is_inserted,
  bdrv_primary_bs,
  bdrv_primary_child,
  refresh_total_sectors,
  type BdrvChild,
  type BlockDriverState,
} from './block-driver-state.ts';
import { bdrv_dec_in_flight, bdrv_inc_in_flight } from './drain.ts';
import {
  bdrv_find_conflicting_request,
  bdrv_make_request_serialising,
  bdrv_wait_serialising_requests,
  tracked_request_begin,
  tracked_request_end,
  type BdrvTrackedRequest,
} from './tracked-request.ts';

/**
 * Why a request's range is invalid, as QEMU's `bdrv_check_qiov_request` words it through errp, or
 * null when it is valid: negative values, a request beyond BDRV_MAX_LENGTH, or a qiov too small.
 * (A value that is not a safe integer cannot occur in C's int64 and is refused first.)
 */
export function bdrv_check_request_error(offset: number, bytes: number, qiov: QEMUIOVector | null = null, qiov_offset = 0): string | null {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes)) return `invalid request: offset(${offset}) bytes(${bytes})`;
  if (offset < 0) return `offset is negative: ${offset}`;
  if (bytes < 0) return `bytes is negative: ${bytes}`;
  if (bytes > BDRV_MAX_LENGTH) return `bytes(${bytes}) exceeds maximum(${BDRV_MAX_LENGTH})`;
  if (offset > BDRV_MAX_LENGTH) return `offset(${offset}) exceeds maximum(${BDRV_MAX_LENGTH})`;
  if (offset > BDRV_MAX_LENGTH - bytes) {
    return `sum of offset(${offset}) and bytes(${bytes}) exceeds maximum(${BDRV_MAX_LENGTH})`;
  }
  if (!qiov) return null;
  if (qiov_offset > qiov.size) return `qiov_offset(${qiov_offset}) overflow io vector size(${qiov.size})`;
  if (bytes > qiov.size - qiov_offset) {
    return `bytes(${bytes}) + qiov_offset(${qiov_offset}) overflow io vector size(${qiov.size})`;
  }
  return null;
}

/**
 * Range check of a request: -EIO for negative values, a request beyond BDRV_MAX_LENGTH, or a
 * qiov too small (see `bdrv_check_request_error` for the message). QEMU: `bdrv_check_qiov_request`
 * / `bdrv_check_request`.
 */
export function bdrv_check_request(offset: number, bytes: number, qiov: QEMUIOVector | null = null, qiov_offset = 0): number {
  return bdrv_check_request_error(offset, bytes, qiov, qiov_offset) === null ? 0 : -EIO;
}

/** As `bdrv_check_request`, plus `bytes <= BDRV_REQUEST_MAX_BYTES`. QEMU: `bdrv_check_request32`. */
export function bdrv_check_request32(offset: number, bytes: number, qiov: QEMUIOVector | null = null, qiov_offset = 0): number {
  const ret = bdrv_check_request(offset, bytes, qiov, qiov_offset);
  if (ret < 0) return ret;
  return bytes > BDRV_REQUEST_MAX_BYTES ? -EIO : 0;
}

/**
 * What `bdrv_co_debug_event` hands back when no driver listens: one finished coroutine_fn shared
 * by every call, so announcing an event on an ordinary node allocates nothing.
 */
const DEBUG_EVENT_DONE: IteratorResult<CoroutineYield, void> = Object.freeze({ done: true, value: undefined });
const NO_DEBUG_EVENT = {
  next: () => DEBUG_EVENT_DONE,
  return: () => DEBUG_EVENT_DONE,
  throw(e?: unknown): never {
    throw e;
  },
  [Symbol.iterator]() {
    return this;
  },
} as unknown as CoroutineFn<void>;

/**
 * Announces blkdebug event `event` on `bs` (a BlkdebugEvent name such as 'write_aio'): a
 * coroutine_fn, used as `yield* bdrv_co_debug_event(bs, event)`. QEMU: `bdrv_co_debug_event` /
 * `BLKDBG_CO_EVENT` (8.1's name; in 7.2 `bdrv_debug_event`, whose hook yields from a plain
 * function). The driver's `bdrv_co_debug_event` hook may suspend the calling request here (a
 * blkdebug `suspend` rule, set with `bdrv_debug_breakpoint`) until `bdrv_debug_resume`.
 * Surprise: the event goes to `bs` itself, not to a child; callers pass the child's node
 * (raw: `bs.file.bs`). Without a hook (or for a null `bs`) it returns a shared finished
 * coroutine_fn, so no generator is created; per-request paths still guard the call with
 * `if (bs.drv?.bdrv_co_debug_event)`, since a yield* costs tens of ns even on that one.
 */
export function bdrv_co_debug_event(bs: BlockDriverState | null, event: string): CoroutineFn<void> {
  const drv = bs?.drv;
  if (!drv?.bdrv_co_debug_event) return NO_DEBUG_EVENT;
  return drv.bdrv_co_debug_event(bs!, event);
}

/**
 * The non-coroutine form of `bdrv_co_debug_event`, for code outside any coroutine (a driver's
 * open: blkdebug's `none`). QEMU 7.2: `bdrv_debug_event` / `BLKDBG_EVENT`. The hook runs to its
 * end at once. Surprise: it cannot suspend. Outside a coroutine a `suspend` rule throws
 * CoroutineError `Co-routine is yielding to no one` (QEMU 7.2 aborts with that message, after
 * blkdebug printed `Suspended request`); inside a coroutine it throws QemuError, since a plain
 * function cannot yield on the caller's behalf: coroutine code must use `bdrv_co_debug_event`.
 */
export function bdrv_debug_event(bs: BlockDriverState | null, event: string): void {
  const drv = bs?.drv;
  if (!drv?.bdrv_co_debug_event) return;
  const co = drv.bdrv_co_debug_event(bs!, event);
  if (co.next().done) return;
  // Unwind the hook (blkdebug forgets the request it recorded as suspended).
  co.return(undefined);
  throw new QemuError(`bdrv_debug_event: event '${event}' suspends the request; a coroutine must use yield* bdrv_co_debug_event`);
}

/** The first node from `bs` down the primary children whose driver has breakpoints. QEMU: `bdrv_find_debug_node`. */
function bdrv_find_debug_node(bs: BlockDriverState | null): BlockDriverState | null {
  while (bs && bs.drv && !bs.drv.bdrv_debug_breakpoint) bs = bdrv_primary_bs(bs);
  if (bs && bs.drv?.bdrv_debug_breakpoint) {
    if (!bs.drv.bdrv_debug_remove_breakpoint) {
      throw new QemuError("bdrv_find_debug_node: Assertion 'bs->drv->bdrv_debug_remove_breakpoint' failed");
    }
    return bs;
  }
  return null;
}

/**
 * Sets a breakpoint: the next request that announces `event` on the debug node below `bs`
 * (found down the primary children: raw -> blkdebug) is suspended and tagged `tag`. QEMU:
 * `bdrv_debug_breakpoint` (qemu-io's `break`). Returns 0, -ENOTSUP when no node below has
 * breakpoints, or the driver's -errno (blkdebug: -ENOENT for an unknown event name).
 * Surprise: a breakpoint fires once; it is gone once it has suspended a request.
 */
export function bdrv_debug_breakpoint(bs: BlockDriverState | null, event: string, tag: string): number {
  const node = bdrv_find_debug_node(bs);
  return node ? node.drv!.bdrv_debug_breakpoint!(node, event, tag) : -ENOTSUP;
}

/**
 * Removes the breakpoints tagged `tag` and resumes every request suspended with it. QEMU:
 * `bdrv_debug_remove_breakpoint` (qemu-io's `remove_break`). Returns 0, -ENOTSUP without a debug
 * node, or the driver's -errno. Surprise (blkdebug, as 7.2): -ENOENT when no breakpoint was left
 * to remove, even if suspended requests were resumed.
 */
export function bdrv_debug_remove_breakpoint(bs: BlockDriverState | null, tag: string): number {
  const node = bdrv_find_debug_node(bs);
  return node ? node.drv!.bdrv_debug_remove_breakpoint!(node, tag) : -ENOTSUP;
}

/**
 * Resumes one request suspended with `tag` (blkdebug: the most recently suspended first). QEMU:
 * `bdrv_debug_resume` (qemu-io's `resume`). The request runs inside this call until it yields
 * again. Returns 0, -ENOTSUP when no node below `bs` has the hook, or the driver's -errno
 * (blkdebug: -ENOENT when nothing is suspended with `tag`). Surprise: unlike the breakpoint
 * functions, the walk also passes nodes without a driver.
 */
export function bdrv_debug_resume(bs: BlockDriverState | null, tag: string): number {
  while (bs && (!bs.drv || !bs.drv.bdrv_debug_resume)) bs = bdrv_primary_bs(bs);
  if (bs && bs.drv?.bdrv_debug_resume) return bs.drv.bdrv_debug_resume(bs, tag);
  return -ENOTSUP;
}

/**
 * Whether a request suspended with `tag` waits on the debug node below `bs`. QEMU:
 * `bdrv_debug_is_suspended` (qemu-io's `wait_break` polls it). Surprise: false, not an error,
 * when no node below has breakpoints.
 */
export function bdrv_debug_is_suspended(bs: BlockDriverState | null, tag: string): boolean {
  while (bs && bs.drv && !bs.drv.bdrv_debug_is_suspended) bs = bdrv_primary_bs(bs);
  if (bs && bs.drv?.bdrv_debug_is_suspended) return bs.drv.bdrv_debug_is_suspended(bs, tag);
  return false;
}

interface CoroutineIOCompletion {
  co: Coroutine;
  ret: number;
  done: boolean;
}

function bdrv_co_io_em_complete(c: CoroutineIOCompletion, ret: number): void {
  c.ret = ret;
  c.done = true;
  // A driver that completes inside the submit call must not re-enter us.
  if (qemu_coroutine_self() !== c.co) aio_co_wake(c.co);
}

/** Runs an AIO-style driver callback as a coroutine_fn (QEMU's CoroutineIOCompletion). */
function* bdrv_co_io_em(submit: (cb: (opaque: CoroutineIOCompletion, ret: number) => void, c: CoroutineIOCompletion) => BlockAIOCB | null): CoroutineFn<number> {
  const c: CoroutineIOCompletion = { co: qemu_coroutine_self(), ret: -EINVAL, done: false };
  const acb = submit(bdrv_co_io_em_complete, c);
  if (!acb) return -EIO;
  if (!c.done) yield* qemu_coroutine_yield();
  return c.ret;
}

/**
 * Calls the driver's read: `bdrv_co_preadv_part`, else `bdrv_co_preadv` (qiov sliced), else
 * `bdrv_aio_preadv` (a null AIOCB is -EIO). QEMU: `bdrv_driver_preadv`.
 */
export function bdrv_driver_preadv(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  // The driver's own coroutine_fn is handed back as it is when nothing needs doing around it:
  // one generator less per request.
  const drv = bs.drv;
  if (drv?.bdrv_co_preadv_part) return drv.bdrv_co_preadv_part(bs, offset, bytes, qiov, qiov_offset, flags);
  if (drv?.bdrv_co_preadv && qiov_offset === 0 && bytes === qiov.size) return drv.bdrv_co_preadv(bs, offset, bytes, qiov, flags);
  return bdrv_driver_preadv_slow(bs, offset, bytes, qiov, qiov_offset, flags);
}

function* bdrv_driver_preadv_slow(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  // bdrv_driver_preadv already handed any bdrv_co_preadv_part driver its own generator.
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  let q = qiov;
  if (qiov_offset > 0 || bytes !== qiov.size) {
    q = new QEMUIOVector();
    qemu_iovec_init_slice(q, qiov, qiov_offset, bytes);
  }
  if (drv.bdrv_co_preadv) return yield* drv.bdrv_co_preadv(bs, offset, bytes, q, flags);
  if (drv.bdrv_aio_preadv) {
    const aio = drv.bdrv_aio_preadv;
    return yield* bdrv_co_io_em((cb, c) => aio(bs, offset, bytes, q, flags, cb, c));
  }
  return -ENOTSUP;
}

/**
 * Calls the driver's write, masking flags by `supported_write_flags`. QEMU: `bdrv_driver_pwritev`.
 * Surprise: FUA the driver lacks is stripped and emulated by `bdrv_co_flush(bs)` after a
 * successful write.
 */
export function bdrv_driver_pwritev(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  // As bdrv_driver_preadv: without FUA to emulate, the driver's coroutine_fn is handed back.
  const drv = bs.drv;
  if (drv && !(flags & BDRV_REQ_FUA && !(bs.supported_write_flags & BDRV_REQ_FUA))) {
    if (drv.bdrv_co_pwritev_part) return drv.bdrv_co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, flags & bs.supported_write_flags);
    if (drv.bdrv_co_pwritev && qiov_offset === 0 && bytes === qiov.size) {
      return drv.bdrv_co_pwritev(bs, offset, bytes, qiov, flags & bs.supported_write_flags);
    }
  }
  return bdrv_driver_pwritev_slow(bs, offset, bytes, qiov, qiov_offset, flags);
}

function* bdrv_driver_pwritev_slow(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  let emulate_fua = false;
  if (flags & BDRV_REQ_FUA && !(bs.supported_write_flags & BDRV_REQ_FUA)) {
    flags &= ~BDRV_REQ_FUA;
    emulate_fua = true;
  }
  flags &= bs.supported_write_flags;
  let ret: number;
  if (drv.bdrv_co_pwritev_part) {
    ret = yield* drv.bdrv_co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, flags);
  } else {
    let q = qiov;
    if (qiov_offset > 0 || bytes !== qiov.size) {
      q = new QEMUIOVector();
      qemu_iovec_init_slice(q, qiov, qiov_offset, bytes);
    }
    if (drv.bdrv_co_pwritev) {
      ret = yield* drv.bdrv_co_pwritev(bs, offset, bytes, q, flags);
    } else if (drv.bdrv_aio_pwritev) {
      const aio = drv.bdrv_aio_pwritev;
      ret = yield* bdrv_co_io_em((cb, c) => aio(bs, offset, bytes, q, flags, cb, c));
    } else {
      ret = -ENOTSUP;
    }
  }
  if (ret === 0 && emulate_fua) ret = yield* bdrv_co_flush(bs);
  return ret;
}

/**
 * Reads an aligned range: waits for conflicting serialising requests, splits at max_transfer,
 * zero-fills the part beyond EOF without calling the driver. QEMU: `bdrv_aligned_preadv`.
 */
export function* bdrv_aligned_preadv(
  child: BdrvChild,
  req: BdrvTrackedRequest,
  offset: number,
  bytes: number,
  align: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  const bs = child.bs;
  const max_transfer = ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_transfer, INT_MAX), align);
  // Checked here too: a generator made per request only to find nothing serialising costs.
  if (req.bs.serialising_in_flight !== 0) yield* bdrv_wait_serialising_requests(req);
  const total_bytes = bdrv_getlength(bs);
  if (total_bytes < 0) return total_bytes;
  flags &= bs.supported_read_flags;
  let max_bytes = Math.ceil(Math.max(0, total_bytes - offset) / align) * align;
  if (bytes <= max_bytes && bytes <= max_transfer) {
    return yield* bdrv_driver_preadv(bs, offset, bytes, qiov, qiov_offset, flags);
  }
  let remaining = bytes;
  while (remaining > 0) {
    const done = bytes - remaining;
    let num: number;
    if (max_bytes > 0) {
      num = Math.min(remaining, max_bytes, max_transfer);
      const ret = yield* bdrv_driver_preadv(bs, offset + done, num, qiov, qiov_offset + done, flags);
      if (ret < 0) return ret;
      max_bytes -= num;
    } else {
      num = remaining;
      qemu_iovec_memset(qiov, qiov_offset + done, 0, num);
    }
    remaining -= num;
  }
  return 0;
}

/** QEMU's `BdrvRequestPadding`. */
interface BdrvRequestPadding {
  buf: Uint8Array;
  buf_len: number;
  head: number;
  tail: number;
  merge_reads: boolean;
  local_qiov: QEMUIOVector;
}

function bdrv_init_padding(bs: BlockDriverState, offset: number, bytes: number): BdrvRequestPadding | null {
  const align = bs.bl.request_alignment;
  const head = offset % align;
  let tail = (offset + bytes) % align;
  if (tail) tail = align - tail;
  if (!head && !tail) return null;
  const sum = head + bytes + tail;
  const buf_len = sum > align && head && tail ? 2 * align : align;
  return { buf: new Uint8Array(buf_len), buf_len, head, tail, merge_reads: sum === buf_len, local_qiov: new QEMUIOVector() };
}

/** Widens a request to request_alignment. QEMU: `bdrv_pad_request`. */
function bdrv_pad_request(
  bs: BlockDriverState,
  r: { qiov: QEMUIOVector; qiov_offset: number; offset: number; bytes: number; flags: number },
): BdrvRequestPadding | null {
  const pad = bdrv_init_padding(bs, r.offset, r.bytes);
  if (!pad) return null;
  const ret = qemu_iovec_init_extended(
    pad.local_qiov,
    pad.buf,
    pad.head,
    r.qiov,
    r.qiov_offset,
    r.bytes,
    pad.buf.subarray(pad.buf_len - pad.tail),
    pad.tail,
  );
  if (ret < 0) throw new QemuError('bdrv_pad_request: qemu_iovec_init_extended failed');
  r.offset -= pad.head;
  r.bytes += pad.head + pad.tail;
  r.qiov = pad.local_qiov;
  r.qiov_offset = 0;
  r.flags &= ~BDRV_REQ_REGISTERED_BUF;
  return pad;
}

/**
 * Reads the head and/or tail alignment units of a padded write into the padding buffer (RMW).
 * QEMU: `bdrv_padding_rmw_read`; `zero_middle` zeroes the bytes between them (zero writes).
 */
function* bdrv_padding_rmw_read(child: BdrvChild, req: BdrvTrackedRequest, pad: BdrvRequestPadding, zero_middle: boolean): CoroutineFn<number> {
  const bs = child.bs;
  const align = bs.bl.request_alignment;
  if (pad.head || pad.merge_reads) {
    const bytes = pad.merge_reads ? pad.buf_len : align;
    const q = new QEMUIOVector();
    qemu_iovec_init_buf(q, pad.buf, bytes);
    if (pad.head) yield* bdrv_co_debug_event(bs, 'pwritev_rmw_head');
    if (pad.merge_reads && pad.tail) yield* bdrv_co_debug_event(bs, 'pwritev_rmw_tail');
    const ret = yield* bdrv_aligned_preadv(child, req, req.overlap_offset, bytes, align, q, 0, 0);
    if (ret < 0) return ret;
    if (pad.head) yield* bdrv_co_debug_event(bs, 'pwritev_rmw_after_head');
    if (pad.merge_reads && pad.tail) yield* bdrv_co_debug_event(bs, 'pwritev_rmw_after_tail');
  }
  if (!pad.merge_reads && pad.tail) {
    const q = new QEMUIOVector();
    qemu_iovec_init_buf(q, pad.buf.subarray(pad.buf_len - align), align);
    yield* bdrv_co_debug_event(bs, 'pwritev_rmw_tail');
    const ret = yield* bdrv_aligned_preadv(child, req, req.overlap_offset + req.overlap_bytes - align, align, align, q, 0, 0);
    if (ret < 0) return ret;
    yield* bdrv_co_debug_event(bs, 'pwritev_rmw_after_tail');
  }
  if (zero_middle) pad.buf.fill(0, pad.head, pad.buf_len - pad.tail);
  return 0;
}

/**
 * Reads `bytes` at `offset` of `child` into `qiov` from `qiov_offset`. QEMU: `bdrv_co_preadv_part`.
 * Unaligned requests are widened to `request_alignment` through a bounce buffer; the part beyond
 * EOF reads as zeroes; -EIO for a bad range, -ENOMEDIUM without a driver.
 * Surprise: a zero-length request at an unaligned offset returns 0 at once.
 */
export function* bdrv_co_preadv_part(
  child: BdrvChild,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  const bs = child.bs;
  if (!bdrv_is_inserted(bs)) return -ENOMEDIUM;
  const chk = bdrv_check_request32(offset, bytes, qiov, qiov_offset);
  if (chk < 0) return chk;
  const align = bs.bl.request_alignment;
  if (bytes === 0 && offset % align !== 0) return 0;
  bdrv_inc_in_flight(bs);
  if (align !== 1 && (offset % align !== 0 || bytes % align !== 0)) {
    // Only unaligned requests pay for the padding and the request copy it works on.
    const r = { qiov, qiov_offset, offset, bytes, flags };
    bdrv_pad_request(bs, r);
    ({ qiov, qiov_offset, offset, bytes, flags } = r);
  }
  const req = tracked_request_begin(bs, offset, bytes, 'read');
  try {
    return yield* bdrv_aligned_preadv(child, req, offset, bytes, align, qiov, qiov_offset, flags);
  } finally {
    tracked_request_end(req);
    bdrv_dec_in_flight(bs);
  }
}

/** `bdrv_co_preadv_part` with `qiov_offset` 0. QEMU: `bdrv_co_preadv`. */
export function* bdrv_co_preadv(child: BdrvChild, offset: number, bytes: number, qiov: QEMUIOVector | null, flags: number): CoroutineFn<number> {
  const q = qiov ?? new QEMUIOVector();
  return yield* bdrv_co_preadv_part(child, offset, bytes, q, 0, flags);
}

/** Reads into `buf`. QEMU: `bdrv_co_pread`; returns 0 or -errno (7.2). */
export function* bdrv_co_pread(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags: number): CoroutineFn<number> {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  return yield* bdrv_co_preadv(child, offset, bytes, q, flags);
}

/** Writes from `buf`. QEMU: `bdrv_co_pwrite`; returns 0 or -errno (7.2). */
export function* bdrv_co_pwrite(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags: number): CoroutineFn<number> {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  return yield* bdrv_co_pwritev(child, offset, bytes, q, flags);
}

/**
 * Writes zeroes through the driver: head fragment, aligned bulk (≤ max_pwrite_zeroes), tail.
 * QEMU: `bdrv_co_do_pwrite_zeroes`. Surprises: -ENOTSUP from the driver falls back to writing a
 * zeroed buffer (≤ max_transfer, at most 16 MiB, per write) unless NO_FALLBACK, which fails
 * -ENOTSUP at once when the driver does not support it; FUA the paths lack is one flush at the end.
 */
export function* bdrv_co_do_pwrite_zeroes(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  if ((flags & ~bs.supported_zero_flags) & BDRV_REQ_NO_FALLBACK) return -ENOTSUP;
  if (flags & BDRV_REQ_REGISTERED_BUF) return -EINVAL;
  bdrv_bsc_invalidate_range(bs, offset, bytes);
  const alignment = Math.max(bs.bl.pwrite_zeroes_alignment, bs.bl.request_alignment);
  const max_write_zeroes = ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_pwrite_zeroes, Number.MAX_SAFE_INTEGER), alignment);
  const max_transfer = MIN_NON_ZERO(bs.bl.max_transfer, MAX_BOUNCE_BUFFER);
  let head = offset % alignment;
  const tail = (offset + bytes) % alignment;
  let need_flush = false;
  let buf: Uint8Array | null = null;
  let ret = 0;
  while (bytes > 0 && ret === 0) {
    let num = bytes;
    if (head) {
      num = Math.min(bytes, max_transfer, alignment - head);
      head = (head + num) % alignment;
    } else if (tail && num > alignment) {
      num -= tail;
    }
    if (num > max_write_zeroes) num = max_write_zeroes;
    ret = -ENOTSUP;
    if (drv.bdrv_co_pwrite_zeroes) {
      ret = yield* drv.bdrv_co_pwrite_zeroes(bs, offset, num, flags & bs.supported_zero_flags);
      if (ret !== -ENOTSUP && flags & BDRV_REQ_FUA && !(bs.supported_zero_flags & BDRV_REQ_FUA)) need_flush = true;
    }
    if (ret === -ENOTSUP && !(flags & BDRV_REQ_NO_FALLBACK)) {
      let write_flags = flags & ~BDRV_REQ_ZERO_WRITE;
      if (flags & BDRV_REQ_FUA && !(bs.supported_write_flags & BDRV_REQ_FUA)) {
        write_flags &= ~BDRV_REQ_FUA;
        need_flush = true;
      }
      num = Math.min(num, max_transfer);
      if (!buf || buf.length < num) buf = new Uint8Array(num);
      const q = new QEMUIOVector();
      qemu_iovec_init_buf(q, buf, num);
      ret = yield* bdrv_driver_pwritev(bs, offset, num, q, 0, write_flags);
    }
    offset += num;
    bytes -= num;
  }
  if (ret === 0 && need_flush) ret = yield* bdrv_co_flush(bs);
  return ret;
}

/**
 * Prepares a write: read-only ⇒ -EPERM; SERIALISING (+NO_WAIT ⇒ -EBUSY); waits. QEMU: `bdrv_co_write_req_prepare`.
 * bdrv_aligned_pwritev does not call it when none of these apply: keep its test in step.
 */
function* bdrv_co_write_req_prepare(bs: BlockDriverState, req: BdrvTrackedRequest, flags: number): CoroutineFn<number> {
  if (bs.read_only) return -EPERM;
  if (flags & BDRV_REQ_SERIALISING) {
    if (flags & BDRV_REQ_NO_WAIT) {
      const align = bs.bl.request_alignment;
      const save = { o: req.overlap_offset, b: req.overlap_bytes, s: req.serialising };
      req.serialising = true;
      req.overlap_offset = ALIGN_DOWN(req.offset, align);
      req.overlap_bytes = Math.ceil((req.offset + req.bytes) / align) * align - req.overlap_offset;
      const conflict = bdrv_find_conflicting_request(req);
      req.serialising = save.s;
      req.overlap_offset = save.o;
      req.overlap_bytes = save.b;
      if (conflict) return -EBUSY;
    }
    yield* bdrv_make_request_serialising(req, bs.bl.request_alignment);
  } else if (req.bs.serialising_in_flight !== 0) {
    yield* bdrv_wait_serialising_requests(req);
  }
  return 0;
}

/**
 * Hands a compressed write to the driver. QEMU: `bdrv_driver_pwritev_compressed`. -ENOTSUP when
 * the driver cannot compress; the driver itself decides which offsets it takes (qcow2: whole
 * clusters only, -EINVAL otherwise).
 */
function* bdrv_driver_pwritev_compressed(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector,
  qiov_offset: number,
): CoroutineFn<number> {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  if (drv.bdrv_co_pwritev_compressed_part) {
    return yield* drv.bdrv_co_pwritev_compressed_part(bs, offset, bytes, qiov, qiov_offset);
  }
  if (!drv.bdrv_co_pwritev_compressed) return -ENOTSUP;
  if (qiov_offset === 0 && qiov.size === bytes) return yield* drv.bdrv_co_pwritev_compressed(bs, offset, bytes, qiov);
  const local = new QEMUIOVector();
  qemu_iovec_init_slice(local, qiov, qiov_offset, bytes);
  return yield* drv.bdrv_co_pwritev_compressed(bs, offset, bytes, local);
}

/**
 * After a write: write_gen++, extend the length; only write requests move wr_highest_offset.
 * QEMU: `bdrv_co_write_req_finish`.
 */
function bdrv_co_write_req_finish(bs: BlockDriverState, offset: number, bytes: number, req: BdrvTrackedRequest, ret: number): void {
  const end = offset + bytes;
  const end_sector = Math.ceil(end / BDRV_SECTOR_SIZE);
  bs.write_gen++;
  if (ret === 0 && (req.type === 'truncate' || end_sector > bs.total_sectors) && req.type !== 'discard') {
    bs.total_sectors = end_sector;
  }
  if (req.bytes && req.type === 'write') bs.wr_highest_offset = Math.max(bs.wr_highest_offset, end);
}

/**
 * Writes an aligned range: prepare (read-only, serialising), zero writes, max_transfer splitting
 * (FUA only on the last chunk when emulated), then finish. QEMU: `bdrv_aligned_pwritev`.
 */
export function* bdrv_aligned_pwritev(
  child: BdrvChild,
  req: BdrvTrackedRequest,
  offset: number,
  bytes: number,
  align: number,
  qiov: QEMUIOVector | null,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  const bs = child.bs;
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  const max_transfer = ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_transfer, INT_MAX), align);
  // Skipped when it has nothing to refuse or wait for (most writes): no generator for them.
  let ret = bs.read_only || flags & BDRV_REQ_SERIALISING || req.bs.serialising_in_flight !== 0 ? yield* bdrv_co_write_req_prepare(bs, req, flags) : 0;
  if (ret < 0) return ret;
  // The events are guarded here, per write: even the shared finished coroutine_fn costs a
  // yield* (tens of ns) when no driver listens, which is nearly always.
  if (flags & BDRV_REQ_ZERO_WRITE) {
    if (drv.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs, 'pwritev_zero');
    ret = yield* bdrv_co_do_pwrite_zeroes(bs, offset, bytes, flags);
  } else if (flags & BDRV_REQ_WRITE_COMPRESSED) {
    ret = yield* bdrv_driver_pwritev_compressed(bs, offset, bytes, qiov!, qiov_offset);
  } else if (bytes <= max_transfer) {
    if (drv.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs, 'pwritev');
    ret = yield* bdrv_driver_pwritev(bs, offset, bytes, qiov!, qiov_offset, flags);
  } else {
    if (drv.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs, 'pwritev');
    let remaining = bytes;
    ret = 0;
    while (remaining > 0) {
      const num = Math.min(remaining, max_transfer);
      let local_flags = flags;
      if (num < remaining && flags & BDRV_REQ_FUA && !(bs.supported_write_flags & BDRV_REQ_FUA)) local_flags &= ~BDRV_REQ_FUA;
      const done = bytes - remaining;
      ret = yield* bdrv_driver_pwritev(bs, offset + done, num, qiov!, qiov_offset + done, local_flags);
      if (ret < 0) break;
      remaining -= num;
    }
  }
  if (bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(bs, 'pwritev_done');
  bdrv_co_write_req_finish(bs, offset, bytes, req, ret);
  return ret;
}

/** Zero write with its own padding (head/tail written as data). QEMU: `bdrv_co_do_zero_pwritev`. */
function* bdrv_co_do_zero_pwritev(child: BdrvChild, offset: number, bytes: number, flags: number, req: BdrvTrackedRequest): CoroutineFn<number> {
  const bs = child.bs;
  const align = bs.bl.request_alignment;
  const pad = bdrv_init_padding(bs, offset, bytes);
  if (pad) {
    yield* bdrv_make_request_serialising(req, align);
    let ret = yield* bdrv_padding_rmw_read(child, req, pad, true);
    if (ret < 0) return ret;
    if (pad.head || pad.merge_reads) {
      const aligned_offset = offset - pad.head;
      const write_bytes = pad.merge_reads ? pad.buf_len : align;
      const q = new QEMUIOVector();
      qemu_iovec_init_buf(q, pad.buf, write_bytes);
      ret = yield* bdrv_aligned_pwritev(child, req, aligned_offset, write_bytes, align, q, 0, flags & ~BDRV_REQ_ZERO_WRITE);
      if (ret < 0 || pad.merge_reads) return ret;
      offset = aligned_offset + write_bytes;
      bytes -= write_bytes - pad.head;
    }
  }
  let ret = 0;
  if (bytes >= align) {
    const aligned_bytes = bytes - (bytes % align);
    ret = yield* bdrv_aligned_pwritev(child, req, offset, aligned_bytes, align, null, 0, flags);
    if (ret < 0) return ret;
    bytes -= aligned_bytes;
    offset += aligned_bytes;
  }
  if (bytes && pad) {
    const tail = pad.buf.subarray(pad.buf_len - align);
    tail.fill(0, 0, bytes);
    const q = new QEMUIOVector();
    qemu_iovec_init_buf(q, tail, align);
    ret = yield* bdrv_aligned_pwritev(child, req, offset, align, align, q, 0, flags & ~BDRV_REQ_ZERO_WRITE);
  }
  return ret;
}

/**
 * Writes `bytes` at `offset` of `child` from `qiov` (null with BDRV_REQ_ZERO_WRITE).
 * QEMU: `bdrv_co_pwritev_part`. Unaligned writes are read-modify-write: the request becomes
 * serialising at request_alignment, so overlapping writes never tear. Surprises: NO_FALLBACK on an
 * unaligned request is -ENOTSUP; a zero-length unaligned request returns 0; zero writes use the
 * 64-bit range check (may exceed 2 GiB); read-only nodes give -EPERM.
 */
export function* bdrv_co_pwritev_part(
  child: BdrvChild,
  offset: number,
  bytes: number,
  qiov: QEMUIOVector | null,
  qiov_offset: number,
  flags: number,
): CoroutineFn<number> {
  const bs = child.bs;
  if (!bdrv_is_inserted(bs)) return -ENOMEDIUM;
  const chk = flags & BDRV_REQ_ZERO_WRITE ? bdrv_check_request(offset, bytes) : bdrv_check_request32(offset, bytes, qiov, qiov_offset);
  if (chk < 0) return chk;
  const align = bs.bl.request_alignment;
  if (flags & BDRV_REQ_NO_FALLBACK && (offset % align !== 0 || bytes % align !== 0)) return -ENOTSUP;
  if (bytes === 0 && offset % align !== 0) return 0;
  let pad: BdrvRequestPadding | null = null;
  let q = qiov ?? new QEMUIOVector();
  if (!(flags & BDRV_REQ_ZERO_WRITE) && align !== 1 && (offset % align !== 0 || bytes % align !== 0)) {
    // Only unaligned requests pay for the padding and the request copy it works on.
    const r = { qiov: q, qiov_offset, offset, bytes, flags };
    pad = bdrv_pad_request(bs, r);
    ({ qiov: q, qiov_offset, offset, bytes, flags } = r);
  }
  bdrv_inc_in_flight(bs);
  const req = tracked_request_begin(bs, offset, bytes, 'write');
  try {
    if (flags & BDRV_REQ_ZERO_WRITE) return yield* bdrv_co_do_zero_pwritev(child, offset, bytes, flags, req);
    if (pad) {
      yield* bdrv_make_request_serialising(req, align);
      // As 7.2: the RMW read's result is not checked.
      yield* bdrv_padding_rmw_read(child, req, pad, false);
    }
    return yield* bdrv_aligned_pwritev(child, req, offset, bytes, align, q, qiov_offset, flags);
  } finally {
    tracked_request_end(req);
    bdrv_dec_in_flight(bs);
  }
}

/** `bdrv_co_pwritev_part` with `qiov_offset` 0. QEMU: `bdrv_co_pwritev`. */
export function* bdrv_co_pwritev(child: BdrvChild, offset: number, bytes: number, qiov: QEMUIOVector | null, flags: number): CoroutineFn<number> {
  return yield* bdrv_co_pwritev_part(child, offset, bytes, qiov, 0, flags);
}

/**
 * Writes zeroes. QEMU: `bdrv_co_pwrite_zeroes`. Surprise: MAY_UNMAP is dropped unless the node
 * was opened with BDRV_O_UNMAP.
 */
export function* bdrv_co_pwrite_zeroes(child: BdrvChild, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  if (!(child.bs.open_flags & BDRV_O_UNMAP)) flags &= ~BDRV_REQ_MAY_UNMAP;
  return yield* bdrv_co_pwritev(child, offset, bytes, null, BDRV_REQ_ZERO_WRITE | flags);
}

/**
 * Flushes `bs` and its children. QEMU: `bdrv_co_flush`. Flushes of one node run one at a time
 * in generation order; the driver's `bdrv_co_flush` does everything if present; else
 * `bdrv_co_flush_to_os`, then (unless BDRV_O_NO_FLUSH or nothing was written since the last
 * successful flush: `flushed_gen == write_gen`) `bdrv_co_flush_to_disk` / `bdrv_aio_flush`, then
 * every child except `backing` (all are tried; the first error is returned).
 * Surprise: read-only or driverless nodes return 0 without flushing.
 */
export function* bdrv_co_flush(bs: BlockDriverState): CoroutineFn<number> {
  bdrv_inc_in_flight(bs);
  try {
    if (!bdrv_is_inserted(bs) || bs.read_only) return 0;
    const current_gen = bs.write_gen;
    while (bs.active_flush_req) yield* qemu_co_queue_wait(bs.flush_queue);
    bs.active_flush_req = true;
    let ret = 0;
    try {
      const drv = bs.drv!;
      if (drv.bdrv_co_flush) {
        ret = yield* drv.bdrv_co_flush(bs);
      } else {
        // 7.2 announces the flush events on the primary child (raw -> blkdebug), not on bs.
        const primary = bdrv_primary_child(bs);
        if (primary?.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(primary.bs, 'flush_to_os');
        if (drv.bdrv_co_flush_to_os) ret = yield* drv.bdrv_co_flush_to_os(bs);
        if (ret >= 0 && !(bs.open_flags & BDRV_O_NO_FLUSH) && bs.flushed_gen !== current_gen) {
          if (primary?.bs.drv?.bdrv_co_debug_event) yield* bdrv_co_debug_event(primary.bs, 'flush_to_disk');
          if (!bs.drv) ret = -ENOMEDIUM;
          else if (drv.bdrv_co_flush_to_disk) ret = yield* drv.bdrv_co_flush_to_disk(bs);
          else if (drv.bdrv_aio_flush) {
            const aio = drv.bdrv_aio_flush;
            ret = yield* bdrv_co_io_em((cb, c) => aio(bs, cb, c));
          }
        }
        if (ret >= 0) {
          ret = 0;
          for (const c of [...bs.children]) {
            if (c === bs.backing) continue;
            const r = yield* bdrv_co_flush(c.bs);
            if (ret === 0) ret = r;
          }
        }
      }
      if (ret === 0) bs.flushed_gen = current_gen;
      return ret;
    } finally {
      bs.active_flush_req = false;
      qemu_co_queue_next(bs.flush_queue);
    }
  } finally {
    bdrv_dec_in_flight(bs);
  }
}

/**
 * Discards a range. QEMU: `bdrv_co_pdiscard`. Surprises: returns 0 without doing anything when
 * the node lacks BDRV_O_UNMAP or the driver has no discard; the range is split into a head
 * fragment, an aligned bulk (≤ max_pdiscard) and a tail; -ENOTSUP from the driver is ignored.
 * -EIO for a bad range, -EPERM on a read-only node.
 */
export function* bdrv_co_pdiscard(child: BdrvChild | null, offset: number, bytes: number): CoroutineFn<number> {
  if (!child || !bdrv_is_inserted(child.bs)) return -ENOMEDIUM;
  const bs = child.bs;
  const chk = bdrv_check_request(offset, bytes);
  if (chk < 0) return chk;
  if (!(bs.open_flags & BDRV_O_UNMAP)) return 0;
  const drv = bs.drv!;
  if (!drv.bdrv_co_pdiscard && !drv.bdrv_aio_pdiscard) return 0;
  bdrv_bsc_invalidate_range(bs, offset, bytes);
  const align = Math.max(bs.bl.pdiscard_alignment, bs.bl.request_alignment);
  let head = offset % align;
  let tail = (offset + bytes) % align;
  bdrv_inc_in_flight(bs);
  const req = tracked_request_begin(bs, offset, bytes, 'discard');
  let ret = 0;
  try {
    ret = yield* bdrv_co_write_req_prepare(bs, req, 0);
    if (ret < 0) return ret;
    const max_pdiscard = ALIGN_DOWN(MIN_NON_ZERO(bs.bl.max_pdiscard, Number.MAX_SAFE_INTEGER), align);
    const ra = bs.bl.request_alignment;
    while (bytes > 0) {
      let num = bytes;
      if (head) {
        num = Math.min(bytes, align - head);
        if (num % ra !== 0) num %= ra;
        head = (head + num) % align;
      } else if (tail) {
        if (num > align) num -= tail;
        else if (tail % ra !== 0 && tail > ra) {
          tail %= ra;
          num -= tail;
        }
      }
      if (num > max_pdiscard) num = max_pdiscard;
      if (!bs.drv) {
        ret = -ENOMEDIUM;
        return ret;
      }
      if (drv.bdrv_co_pdiscard) {
        ret = yield* drv.bdrv_co_pdiscard(bs, offset, num);
      } else {
        const aio = drv.bdrv_aio_pdiscard!;
        const o = offset;
        ret = yield* bdrv_co_io_em((cb, c) => aio(bs, o, num, cb, c));
      }
      if (ret && ret !== -ENOTSUP) return ret;
      offset += num;
      bytes -= num;
    }
    ret = 0;
    return ret;
  } finally {
    bdrv_co_write_req_finish(bs, req.offset, req.bytes, req, ret);
    tracked_request_end(req);
    bdrv_dec_in_flight(bs);
  }
}

/**
 * Resizes the node to `offset` bytes. QEMU: `bdrv_co_truncate`. Throws QemuError with QEMU's
 * messages ("No medium inserted", "Image size cannot be negative", "Image is read-only",
 * "Block driver does not support requested flags", "Image format driver does not support
 * resize"); returns 0, or a driver's -errno when it failed without throwing. Growth is a
 * serialising TRUNCATE request over [old size, offset); growing over a longer backing file adds
 * BDRV_REQ_ZERO_WRITE. Filters without the callback forward to their `file` child.
 */
export function* bdrv_co_truncate(
  child: BdrvChild,
  offset: number,
  exact: boolean,
  prealloc: PreallocMode,
  flags: number,
): CoroutineFn<number> {
  const bs = child.bs;
  const drv = bs.drv;
  if (!drv) throw new QemuError('No medium inserted');
  if (offset < 0) throw new QemuError('Image size cannot be negative');
  const chk = bdrv_check_request_error(offset, 0);
  if (chk !== null) throw new QemuError(chk);
  const old_size = bdrv_getlength(bs);
  if (old_size < 0) throw new QemuError(`Failed to get old image size: ${strerror(-old_size)}`);
  if (bs.read_only) throw new QemuError('Image is read-only');
  const new_bytes = offset > old_size ? offset - old_size : 0;
  bdrv_inc_in_flight(bs);
  const req = tracked_request_begin(bs, offset - new_bytes, new_bytes, 'truncate');
  try {
    if (new_bytes) yield* bdrv_make_request_serialising(req, 1);
    const r = yield* bdrv_co_write_req_prepare(bs, req, 0);
    if (r < 0) throw new QemuError(`Failed to prepare request for truncation: ${strerror(-r)}`);
    if (new_bytes && bs.backing) {
      const backing_len = bdrv_getlength(bs.backing.bs);
      if (backing_len < 0) throw new QemuError(`Could not get backing file size: ${strerror(-backing_len)}`);
      if (backing_len > old_size) flags |= BDRV_REQ_ZERO_WRITE;
    }
    let ret: number;
    if (drv.bdrv_co_truncate) {
      if (flags & ~bs.supported_truncate_flags) throw new QemuError('Block driver does not support requested flags');
      ret = yield* drv.bdrv_co_truncate(bs, offset, exact, prealloc, flags);
    } else if (drv.is_filter && bs.file) {
      ret = yield* bdrv_co_truncate(bs.file, offset, exact, prealloc, flags);
    } else {
      throw new QemuError('Image format driver does not support resize');
    }
    if (ret < 0) return ret;
    // The hint is in whole sectors, rounded down (QEMU: offset >> BDRV_SECTOR_BITS).
    const rr = refresh_total_sectors(bs, Math.floor(offset / BDRV_SECTOR_SIZE));
    if (rr >= 0) offset = bs.total_sectors * BDRV_SECTOR_SIZE;
    // Finished even when the refresh failed: the truncation itself happened.
    bdrv_co_write_req_finish(bs, offset - new_bytes, new_bytes, req, 0);
    if (rr < 0) throw new QemuError(`Could not refresh total sector count: ${strerror(-rr)}`);
    return 0;
  } finally {
    tracked_request_end(req);
    bdrv_dec_in_flight(bs);
  }
}
