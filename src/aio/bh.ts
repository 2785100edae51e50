/**
 * Bottom halves: callbacks queued to run in a context's next aio_bh_poll. QEMU:
 * util/async.c (S7-S17).
 */
import type { AioContext } from './aio-context.ts';
import { aio_notify } from './aio-context.ts';
import { QemuError } from './error.ts';

/** Queued, waiting for aio_bh_poll. */
export const BH_PENDING = 1 << 0;
/** Invoke the callback. */
export const BH_SCHEDULED = 1 << 1;
/** Free without invoking. */
export const BH_DELETED = 1 << 2;
/** Free after invoking once. */
export const BH_ONESHOT = 1 << 3;
/** Idle BH: up to 10 ms latency, not progress. */
export const BH_IDLE = 1 << 4;

/** A bottom-half callback: receives the opaque given at creation. */
export type QEMUBHFunc<T = any> = (opaque: T) => void;

/** QEMU's `QEMUBH`. Made by `aio_bh_new`; freed after `qemu_bh_delete` by the next poll. */
export class QEMUBH {
  /** @internal */ ctx: AioContext;
  /** @internal */ cb: QEMUBHFunc;
  /** @internal */ opaque: unknown;
  /** @internal */ flags = 0;
  /** @internal link in the context's bh_list or a slice. */ next: QEMUBH | null = null;
  /** @internal the name given; else `name` asks the callback when read (a oneshot BH per request must not pay for it). */
  _name: string | undefined;

  constructor(ctx: AioContext, cb: QEMUBHFunc, opaque: unknown, name?: string) {
    this.ctx = ctx;
    this.cb = cb;
    this.opaque = opaque;
    this._name = name;
  }

  /** For the leak message (QEMU >= 6.1 names BHs after their callback). */
  get name(): string {
    return this._name ?? (this.cb.name || 'anonymous');
  }
  set name(v: string) {
    this._name = v;
  }
}

/** @internal a detached run of the bh_list being processed by aio_bh_poll (S12). */
export interface BHListSlice {
  head: QEMUBH | null;
}

/** Pushes `bh` at the head of its context's list if it was not pending; always notifies (S8). */
function aio_bh_enqueue(bh: QEMUBH, new_flags: number): void {
  const old = bh.flags;
  bh.flags = old | new_flags | BH_PENDING;
  if ((old & BH_PENDING) === 0) {
    const ctx = bh.ctx;
    bh.next = ctx.bh_list;
    ctx.bh_list = bh;
  }
  aio_notify(bh.ctx);
}

/**
 * Allocates a BH in `ctx`; nothing is queued and nobody is notified (S7). QEMU:
 * `aio_bh_new`. Surprise: a BH that is neither scheduled nor deleted is simply garbage;
 * one left scheduled when its context is finalized is reported as leaked.
 */
export function aio_bh_new<T>(ctx: AioContext, cb: QEMUBHFunc<T>, opaque?: T): QEMUBH {
  return new QEMUBH(ctx, cb as QEMUBHFunc, opaque);
}

/**
 * Schedules `cb(opaque)` to run once in `ctx`'s next aio_bh_poll, and frees it after.
 * QEMU: `aio_bh_schedule_oneshot`. There is no handle, so it cannot be cancelled.
 */
export function aio_bh_schedule_oneshot<T>(ctx: AioContext, cb: QEMUBHFunc<T>, opaque?: T): void {
  aio_bh_enqueue(new QEMUBH(ctx, cb as QEMUBHFunc, opaque), BH_SCHEDULED | BH_ONESHOT);
}

/**
 * Schedules `bh`. QEMU: `qemu_bh_schedule`. Scheduling an already pending BH only
 * notifies; the callback runs once (S8). Surprise: a BH scheduled while aio_bh_poll runs
 * (itself included) runs in the next aio_bh_poll, not this one (S12); within one poll,
 * BHs run newest first (S13).
 */
export function qemu_bh_schedule(bh: QEMUBH): void {
  if (bh.flags & BH_DELETED) return;
  aio_bh_enqueue(bh, BH_SCHEDULED);
}

/**
 * Schedules `bh` as idle: it may wait up to 10 ms and does not count as progress (S16).
 * QEMU: `qemu_bh_schedule_idle`.
 */
export function qemu_bh_schedule_idle(bh: QEMUBH): void {
  if (bh.flags & BH_DELETED) return;
  aio_bh_enqueue(bh, BH_SCHEDULED | BH_IDLE);
}

/**
 * Cancels a scheduled BH. QEMU: `qemu_bh_cancel`. Surprise: it stays queued (and is
 * dropped silently by the next poll); rescheduled first, it runs in its old place (S9).
 */
export function qemu_bh_cancel(bh: QEMUBH): void {
  bh.flags &= ~BH_SCHEDULED;
}

/**
 * Deletes a BH: its callback never runs again; it is freed by the next aio_bh_poll.
 * QEMU: `qemu_bh_delete`. Allowed from the BH's own callback. It notifies (S10).
 */
export function qemu_bh_delete(bh: QEMUBH): void {
  aio_bh_enqueue(bh, BH_DELETED);
}

/** Pops the head of a slice and clears its PENDING/SCHEDULED/IDLE bits, returning old flags in `bhFlags`. */
let bhFlags = 0;
function aio_bh_dequeue(slice: BHListSlice): QEMUBH | null {
  const bh = slice.head;
  if (bh === null) return null;
  slice.head = bh.next;
  bh.next = null;
  bhFlags = bh.flags;
  bh.flags = bhFlags & ~(BH_PENDING | BH_SCHEDULED | BH_IDLE);
  return bh;
}

/**
 * Runs the BHs that were pending when it started. QEMU: `aio_bh_poll`. Returns 1 iff a
 * scheduled, non-idle, non-deleted BH's callback ran (S15).
 * Surprise: a nested aio_bh_poll (a BH calling aio_poll on its own context) first
 * finishes the parent's slice (S14). If a callback throws, the rest of its slice stays
 * queued and runs first in the next aio_bh_poll.
 */
export function aio_bh_poll(ctx: AioContext): number {
  const slices = ctx.bh_slice_list;
  let ret = 0;
  if (ctx.bh_list !== null) {
    let s: BHListSlice;
    if (slices.length === 0) {
      s = ctx.bh_spare_slice;
      s.head = ctx.bh_list;
    } else {
      s = { head: ctx.bh_list };
    }
    slices.push(s);
    ctx.bh_list = null;
  }
  while (slices.length !== 0) {
    const s = slices[0] as BHListSlice;
    const bh = aio_bh_dequeue(s);
    if (bh === null) {
      if (slices.length === 1) slices.pop();
      else slices.shift();
      continue;
    }
    const flags = bhFlags;
    if ((flags & (BH_SCHEDULED | BH_DELETED)) === BH_SCHEDULED) {
      if ((flags & BH_IDLE) === 0) ret = 1;
      // A oneshot is gone whether or not its callback throws.
      if (flags & BH_ONESHOT) bh.flags |= BH_DELETED;
      bh.cb(bh.opaque);
    }
  }
  return ret;
}

/** @internal: true if `bh` would run (scheduled and not deleted). */
function isScheduled(bh: QEMUBH): boolean {
  return (bh.flags & (BH_SCHEDULED | BH_DELETED)) === BH_SCHEDULED;
}

/**
 * @internal The BH part of aio_compute_timeout (S16, S17): 0 if a non-idle BH is
 * scheduled (slices in progress included), 10 ms if only idle ones, -1 if none.
 */
export function aio_compute_bh_timeout(ctx: AioContext): number {
  let timeout = -1;
  for (let bh = ctx.bh_list; bh !== null; bh = bh.next) {
    if (isScheduled(bh)) {
      if ((bh.flags & BH_IDLE) === 0) return 0;
      timeout = 10000000;
    }
  }
  for (const s of ctx.bh_slice_list) {
    for (let bh = s.head; bh !== null; bh = bh.next) {
      if (isScheduled(bh)) {
        if ((bh.flags & BH_IDLE) === 0) return 0;
        timeout = 10000000;
      }
    }
  }
  return timeout;
}

/** @internal true if any BH (idle included) is scheduled in `ctx`. */
export function aio_has_scheduled_bh(ctx: AioContext): boolean {
  return aio_compute_bh_timeout(ctx) >= 0;
}

/** @internal S2: the BH checks of aio_ctx_finalize, as thrown errors; changes nothing. */
export function aio_bh_finalize_check(ctx: AioContext): void {
  if (ctx.bh_slice_list.some((s) => s.head !== null)) {
    throw new QemuError(`aio_ctx_finalize: context '${ctx.name}' is finalized while an aio_bh_poll has BHs left in its slice`);
  }
  for (let bh = ctx.bh_list; bh !== null; bh = bh.next) {
    if ((bh.flags & BH_DELETED) === 0 && bh !== ctx.co_schedule_bh && bh !== ctx.thread_pool?.completion_bh) {
      throw new QemuError(`aio_ctx_finalize: BH '${bh.name}' leaked, aborting...`);
    }
  }
}

/** @internal frees the BHs of a finalized context. */
export function aio_bh_finalize_free(ctx: AioContext): void {
  ctx.bh_list = null;
  ctx.bh_slice_list.length = 0;
  ctx.co_schedule_bh.flags |= BH_DELETED;
}
