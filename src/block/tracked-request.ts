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
  /** Made by the first request that waits for this one: most requests never have a waiter. */
  wait_queue: CoQueue | null = null;
  waiting_for: BdrvTrackedRequest | null = null;
  co: Coroutine;
  /** @internal the list holding it, and its links there (QEMU: `QLIST_ENTRY list`). */
  list: BdrvTrackedRequestList | null = null;
  /** @internal */ list_prev: BdrvTrackedRequest | null = null;
  /** @internal */ list_next: BdrvTrackedRequest | null = null;
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

/**
 * A node's tracked requests (QEMU: the QLIST `bs->tracked_requests`). Intrusive, through the
 * requests' own links, so adding and removing one allocate and hash nothing (a Set did both, a
 * measurable share of a null-co request). Iterates like the Set it replaced: oldest first (QEMU's
 * QLIST_INSERT_HEAD walks newest first); the request being visited may be removed meanwhile, no
 * other.
 */
export class BdrvTrackedRequestList implements Iterable<BdrvTrackedRequest> {
  /** @internal */ head: BdrvTrackedRequest | null = null;
  /** @internal */ tail: BdrvTrackedRequest | null = null;
  size = 0;

  /** Appends `req`; a request already in a list stays where it is (as Set.add). */
  add(req: BdrvTrackedRequest): this {
    if (req.list !== null) return this;
    req.list = this;
    req.list_next = null;
    req.list_prev = this.tail;
    if (this.tail === null) this.head = req;
    else this.tail.list_next = req;
    this.tail = req;
    this.size++;
    return this;
  }

  /** Removes `req`; false if it was not in this list. */
  delete(req: BdrvTrackedRequest): boolean {
    if (req.list !== this) return false;
    const prev = req.list_prev;
    const next = req.list_next;
    if (prev === null) this.head = next;
    else prev.list_next = next;
    if (next === null) this.tail = prev;
    else next.list_prev = prev;
    req.list = req.list_prev = req.list_next = null;
    this.size--;
    return true;
  }

  has(req: BdrvTrackedRequest): boolean {
    return req.list === this;
  }

  *[Symbol.iterator](): Iterator<BdrvTrackedRequest> {
    for (let req = this.head; req !== null; ) {
      const next: BdrvTrackedRequest | null = req.list_next;
      yield req;
      req = next;
    }
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
  if (req.wait_queue !== null) qemu_co_queue_restart_all(req.wait_queue);
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
  for (let req = self.bs.tracked_requests.head; req !== null; req = req.list_next) {
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
    yield* qemu_co_queue_wait((req.wait_queue ??= new CoQueue()));
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
