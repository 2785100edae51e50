/**
 * Tracked requests and serialisation. QEMU: block/io.c (`tracked_request_begin/end`,
 * `tracked_request_set_serialising`, `bdrv_find_conflicting_request`,
 * `bdrv_wait_serialising_requests`, `bdrv_make_request_serialising`).
 * aioco runs every coroutine on one JS thread, so `bs->reqs_lock` is not needed: no other code
 * runs between a check and the following wait.
 */
import type { Coroutine, CoroutineFn } from '../coroutine/coroutine.ts';
import { qemu_coroutine_self } from '../coroutine/coroutine.ts';
import { CoQueue, qemu_co_queue_restart_all, qemu_co_queue_wait } from '../coroutine/co-queue.ts';
import type { BlockDriverState } from './block-driver-state.ts';
import { ALIGN_DOWN, ALIGN_UP } from './block-common.ts';

/** QEMU's `BdrvTrackedRequestType`. */
export type BdrvTrackedRequestType = 'read' | 'write' | 'discard' | 'truncate';

/** QEMU's `BdrvTrackedRequest`. */
export class BdrvTrackedRequest {
  serialising = false;
  overlap_offset: number;
  overlap_bytes: number;
  wait_queue = new CoQueue();
  waiting_for: BdrvTrackedRequest | null = null;
  co: Coroutine;
  constructor(
    public bs: BlockDriverState,
    public offset: number,
    public bytes: number,
    public type: BdrvTrackedRequestType,
  ) {
    this.overlap_offset = offset;
    this.overlap_bytes = bytes;
    this.co = qemu_coroutine_self();
  }
}

/** Starts tracking a request on `bs`. QEMU: `tracked_request_begin`. */
export function tracked_request_begin(
  bs: BlockDriverState,
  offset: number,
  bytes: number,
  type: BdrvTrackedRequestType,
): BdrvTrackedRequest {
  const req = new BdrvTrackedRequest(bs, offset, bytes, type);
  bs.tracked_requests.add(req);
  return req;
}

/** Ends a request and wakes every request waiting for it. QEMU: `tracked_request_end`. */
export function tracked_request_end(req: BdrvTrackedRequest): void {
  if (req.serialising) req.bs.serialising_in_flight--;
  req.bs.tracked_requests.delete(req);
  qemu_co_queue_restart_all(req.wait_queue);
}

/**
 * Marks `req` serialising and widens its overlap range to `align` boundaries.
 * QEMU: `tracked_request_set_serialising`. Widening never shrinks an earlier range.
 */
export function tracked_request_set_serialising(req: BdrvTrackedRequest, align: number): void {
  const overlap_offset = ALIGN_DOWN(req.offset, align);
  const overlap_bytes = ALIGN_UP(req.offset + req.bytes, align) - overlap_offset;
  if (!req.serialising) {
    req.bs.serialising_in_flight++;
    req.serialising = true;
  }
  const end = Math.max(req.overlap_offset + req.overlap_bytes, overlap_offset + overlap_bytes);
  req.overlap_offset = Math.min(req.overlap_offset, overlap_offset);
  req.overlap_bytes = end - req.overlap_offset;
}

function tracked_request_overlaps(req: BdrvTrackedRequest, offset: number, bytes: number): boolean {
  if (offset >= req.overlap_offset + req.overlap_bytes) return false;
  if (req.overlap_offset >= offset + bytes) return false;
  return true;
}

/**
 * The first request that conflicts with `self` (ranges overlap and one of them is serialising),
 * skipping requests that already wait for someone (deadlock avoidance). QEMU:
 * `bdrv_find_conflicting_request`.
 */
export function bdrv_find_conflicting_request(self: BdrvTrackedRequest): BdrvTrackedRequest | null {
  for (const req of self.bs.tracked_requests) {
    if (req === self || (!req.serialising && !self.serialising)) continue;
    if (tracked_request_overlaps(req, self.overlap_offset, self.overlap_bytes)) {
      if (req.waiting_for !== null) continue;
      return req;
    }
  }
  return null;
}

/**
 * Waits until no request conflicts with `self`. QEMU: `bdrv_wait_serialising_requests`.
 * Returns whether it waited. Fast path: nothing serialising in flight.
 */
export function* bdrv_wait_serialising_requests(self: BdrvTrackedRequest): CoroutineFn<boolean> {
  if (self.bs.serialising_in_flight === 0) return false;
  let waited = false;
  for (;;) {
    const req = bdrv_find_conflicting_request(self);
    if (!req) return waited;
    self.waiting_for = req;
    yield* qemu_co_queue_wait(req.wait_queue);
    self.waiting_for = null;
    waited = true;
  }
}

/**
 * Makes `req` serialising at `align` and waits for conflicting requests.
 * QEMU: `bdrv_make_request_serialising`. Returns whether it waited.
 */
export function* bdrv_make_request_serialising(req: BdrvTrackedRequest, align: number): CoroutineFn<boolean> {
  tracked_request_set_serialising(req, align);
  return yield* bdrv_wait_serialising_requests(req);
}
