/**
 * Moving coroutines between contexts: aio_co_schedule, aio_co_wake, aio_co_enter,
 * aio_co_reschedule_self. QEMU: util/async.c (S65-S70).
 */
import {
  CoroutineError,
  coroutineQueueWakeup,
  coroutineSetWakeHook,
  qemu_aio_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from '../coroutine/coroutine.ts';
import type { AioContext } from './aio-context.ts';
import { qemu_get_current_aio_context } from './aio-context.ts';
import { aio_bh_schedule_oneshot, qemu_bh_schedule } from './bh.ts';

/**
 * Queues `co` to be entered by `ctx`'s next BH round. QEMU: `aio_co_schedule`.
 * Surprise: never runs `co` synchronously, even when `ctx` is the current context (S65);
 * a coroutine already scheduled (or sleeping) throws
 * `aio_co_schedule: Co-routine was already scheduled in '...'`.
 */
export function aio_co_schedule(ctx: AioContext, co: Coroutine): void {
  if (co.scheduled !== null) {
    throw new CoroutineError(`aio_co_schedule: Co-routine was already scheduled in '${co.scheduled}'`);
  }
  co.scheduled = 'aio_co_schedule';
  co.co_scheduled_next = null;
  if (ctx.scheduledTail === null) ctx.scheduledHead = co;
  else ctx.scheduledTail.co_scheduled_next = co;
  ctx.scheduledTail = co;
  qemu_bh_schedule(ctx.co_schedule_bh);
}

/**
 * @internal The context's co_schedule_bh: enters, oldest first, the coroutines scheduled
 * before it started (S66); those scheduled meanwhile wait for the next round. If an entry
 * throws, the coroutines not yet entered go back to the front and the BH is rescheduled
 * before the error propagates.
 */
export function co_schedule_bh_cb(ctx: AioContext): void {
  let co = ctx.scheduledHead;
  ctx.scheduledHead = ctx.scheduledTail = null;
  while (co !== null) {
    const next: Coroutine | null = co.co_scheduled_next;
    co.co_scheduled_next = null;
    co.scheduled = null;
    try {
      qemu_aio_coroutine_enter(ctx, co);
    } catch (e) {
      if (next !== null) {
        let tail = next;
        while (tail.co_scheduled_next !== null) tail = tail.co_scheduled_next;
        tail.co_scheduled_next = ctx.scheduledHead;
        if (ctx.scheduledHead === null) ctx.scheduledTail = tail;
        ctx.scheduledHead = next;
        qemu_bh_schedule(ctx.co_schedule_bh);
      }
      throw e;
    }
    co = next;
  }
}

/**
 * Enters `co` in `ctx` now or later. QEMU: `aio_co_enter`. (a) Another context: scheduled
 * there. (b) Same context, called from a coroutine: `co` runs when the caller next yields
 * or ends (S69b). (c) Same context from plain code: entered before this returns.
 */
export function aio_co_enter(ctx: AioContext, co: Coroutine): void {
  if (ctx !== qemu_get_current_aio_context()) {
    aio_co_schedule(ctx, co);
    return;
  }
  if (qemu_in_coroutine()) {
    const self = qemu_coroutine_self();
    if (self === co) throw new CoroutineError('Co-routine re-entered recursively');
    coroutineQueueWakeup(self, co);
  } else {
    qemu_aio_coroutine_enter(ctx, co);
  }
}

/**
 * Resumes `co` in the context where it last ran. QEMU: `aio_co_wake`. It must have been
 * entered before (its context is unknown otherwise). Surprise (S69): from a coroutine in
 * that context it is deferred until the caller yields; from another context it is
 * scheduled there; only from plain code in that context does it run before this returns.
 */
export function aio_co_wake(co: Coroutine): void {
  const ctx = co.ctx as AioContext | null;
  if (ctx === null) {
    throw new CoroutineError(`aio_co_wake: Co-routine${co.name !== undefined ? ` '${co.name}'` : ''} was never entered, so it has no AioContext`);
  }
  aio_co_enter(ctx, co);
}

interface Reschedule {
  ctx: AioContext;
  co: Coroutine;
}
function aio_co_reschedule_self_bh(r: Reschedule): void {
  aio_co_schedule(r.ctx, r.co);
}

/**
 * Moves the running coroutine to `new_ctx`. QEMU: `aio_co_reschedule_self`. A oneshot BH
 * in the old context schedules it in the new one, so it has yielded before anyone can
 * enter it; it resumes from `new_ctx`'s BH round. A no-op if already there.
 */
export function* aio_co_reschedule_self(new_ctx: AioContext): CoroutineFn<void> {
  const old_ctx = qemu_get_current_aio_context();
  if (old_ctx === new_ctx) return;
  if (!qemu_in_coroutine()) throw new CoroutineError('Co-routine is yielding to no one');
  aio_bh_schedule_oneshot(old_ctx, aio_co_reschedule_self_bh, { ctx: new_ctx, co: qemu_coroutine_self() });
  yield* qemu_coroutine_yield();
}

/** The context `co` last ran in, null before its first entry (S64). QEMU: `qemu_coroutine_get_aio_context`. */
export function qemu_coroutine_get_aio_context(co: Coroutine): AioContext | null {
  return co.ctx as AioContext | null;
}

coroutineSetWakeHook(aio_co_wake);
