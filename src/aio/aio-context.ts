/**
 * The AioContext object: identity, reference counting, notification, the current-context
 * rules, and the registry of contexts that waits drive. QEMU: util/async.c.
 */
import {
  coroutineAmbientContext,
  coroutineSetDefaultContext,
  type Coroutine,
} from '../coroutine/coroutine.ts';
import { QEMU_CLOCK_MAX, clockSetNotifyHook, type QEMUClockType } from './clock.ts';
import { QemuError } from './error.ts';
import { aio_bh_new, aio_bh_finalize_check, aio_bh_finalize_free, type QEMUBH, type BHListSlice } from './bh.ts';
import { co_schedule_bh_cb } from './co-schedule.ts';
import type { AioHandler } from './fd-handler.ts';
import { TimerList, timerlist_due_before } from './timer.ts';

/**
 * What a thread pool offers its context (src/aio/thread-pool.ts plugs in here): completions
 * that workers posted to shared memory are moved to the pool's BH by `drain`.
 * @internal
 */
export interface AioContextPool {
  /** Its completion BH, deleted by `free` (so finalize does not count it as leaked). */
  readonly completion_bh: QEMUBH;
  /** Requests submitted and not yet completed (their callbacks not yet run). */
  outstanding(): number;
  /** Called on the context's last unref, once nothing is outstanding (S2, S97). */
  free(): void;
}

let nextContextId = 1;

/**
 * QEMU's `AioContext`: an event loop with bottom halves, fd/event-notifier handlers,
 * timers and adaptive polling. All contexts live on the one JS thread; which one runs a
 * callback is which loop dispatches it.
 */
export class AioContext {
  /** A name for messages ('main', an IOThread's id, or 'ctx<N>'). */
  name: string;
  /** @internal */ refcnt = 1;
  /** @internal */ finalized = false;
  /** @internal LIFO list of pending BHs (S13). */ bh_list: QEMUBH | null = null;
  /** @internal slices of an aio_bh_poll in progress or interrupted (S12, S14). */
  bh_slice_list: BHListSlice[] = [];
  /** @internal the slice aio_bh_poll uses when no other is in progress (no allocation). */
  bh_spare_slice: BHListSlice = { head: null };
  /** @internal */ notified = false;
  /** @internal */ notify_me = 0;
  /** @internal FIFO of coroutines waiting for co_schedule_bh, through co_scheduled_next. */
  scheduledHead: Coroutine | null = null;
  scheduledTail: Coroutine | null = null;
  /** @internal created by aio_context_new. */ co_schedule_bh!: QEMUBH;
  /** @internal fd handlers, newest first. */ aio_handlers: AioHandler[] = [];
  /** @internal handlers that have fired once and have io_poll (S35). */
  poll_aio_handlers: AioHandler[] = [];
  /** @internal number of handlers without io_poll (S25, S42 need_wait). */ poll_disable_cnt = 0;
  /** @internal */ poll_started = false;
  /** @internal nesting of handler walks (QEMU's list_lock count). */ walking = 0;
  /** @internal */ external_disable_cnt = 0;
  /** @internal adaptive polling, all 0 = off (S39). */
  poll_ns = 0;
  poll_max_ns = 0;
  poll_grow = 0;
  poll_shrink = 0;
  /** @internal one timer list per clock type. */ tlg: TimerList[];
  /** @internal */ thread_pool: AioContextPool | null = null;
  /** @internal aio_poll/aio_dispatch frames of this context on the JS stack. */ dispatchDepth = 0;
  /** @internal attached to Node's loop through aio_get_g_source. */ attached = false;
  /** @internal an IOThread owns it: waits always drive it. */ isIOThread = false;
  /** @internal aio_context_acquire depth. */ acquireDepth = 0;
  /** @internal the GSource object handed out, one per context. */ gsource: unknown = null;

  constructor(name?: string) {
    this.name = name ?? `ctx${nextContextId++}`;
    this.tlg = [];
    for (let t = 0; t < QEMU_CLOCK_MAX; t++) this.tlg.push(new TimerList(this, t as QEMUClockType));
  }
}

/** Every live context (for clock notifications). @internal */
export const liveContexts = new Set<AioContext>();
/** Contexts that every blocking wait drives besides its own: main, IOThreads, attached. @internal */
export const drivenContexts = new Set<AioContext>();

let mainContext: AioContext | null = null;

/**
 * The process-wide completion ring of the thread pool (one for all pools): `drain` moves
 * finished requests to their pools' completion BHs (which notifies those contexts).
 * Installed by thread-pool.ts when it is loaded. @internal
 */
export const poolHooks: {
  inFlight: number;
  ringPending: () => boolean;
  drain: () => boolean;
  tick: () => number;
} = {
  /** Shared-memory slots in use over all pools: the ring can only fill while non-zero. */
  inFlight: 0,
  ringPending: () => false,
  drain: () => false,
  /** Grows the workers if requests are stuck waiting; ns until it wants to look again, or -1. */
  tick: () => -1,
};

/** Set by aio-context users that must act on notify (the host-loop drive). @internal */
export const notifyHooks: {
  hostKick: (ctx: AioContext) => void;
  /** A context's earliest timer may be later now (timer_del, clock changes). */
  hostTimersChanged: (ctx: AioContext | null) => void;
  /** A finalized context leaves the host-loop drive. */
  hostDetach: (ctx: AioContext) => void;
} = { hostKick: () => {}, hostTimersChanged: () => {}, hostDetach: () => {} };

/**
 * Creates a context: no BHs, no handlers, polling off, no thread pool. QEMU:
 * `aio_context_new`. Surprise: it is not attached to Node's loop; it runs only when polled
 * (`aio_poll`) or after `aio_get_g_source(ctx).attach()`.
 */
export function aio_context_new(): AioContext {
  const ctx = new AioContext();
  ctx.co_schedule_bh = aio_bh_new(ctx, co_schedule_bh_cb, ctx);
  liveContexts.add(ctx);
  return ctx;
}

/** The main context (QEMU: `qemu_get_aio_context`); created on first use. */
export function qemu_get_aio_context(): AioContext {
  if (mainContext === null) {
    mainContext = aio_context_new();
    mainContext.name = 'main';
    drivenContexts.add(mainContext);
  }
  return mainContext;
}

/**
 * The context the caller runs in (S101): the innermost aio_poll/aio_dispatch in progress
 * or running coroutine's context; the main context at top level. QEMU:
 * `qemu_get_current_aio_context`.
 */
export function qemu_get_current_aio_context(): AioContext {
  return (coroutineAmbientContext() as AioContext | null) ?? qemu_get_aio_context();
}

/** Takes a reference. QEMU: `aio_context_ref`. */
export function aio_context_ref(ctx: AioContext): void {
  if (ctx.finalized) throw new QemuError(`aio_context_ref: context '${ctx.name}' was already finalized`);
  ctx.refcnt++;
}

/**
 * Drops a reference; the last one finalizes the context. QEMU: `aio_context_unref` /
 * `aio_ctx_finalize`. Surprise: finalizing checks what QEMU asserts (S2) and throws,
 * naming the culprit: an outstanding pool request, a scheduled coroutine, a BH still
 * queued and not deleted, an armed timer.
 */
export function aio_context_unref(ctx: AioContext): void {
  if (ctx.finalized) throw new QemuError(`aio_context_unref: context '${ctx.name}' was already finalized`);
  if (--ctx.refcnt > 0) return;
  if (ctx === mainContext) {
    ctx.refcnt = 1;
    throw new QemuError('aio_context_unref: the main context cannot be finalized');
  }
  try {
    aio_ctx_finalize(ctx);
  } catch (e) {
    ctx.refcnt = 1;
    throw e;
  }
  ctx.finalized = true;
  liveContexts.delete(ctx);
  drivenContexts.delete(ctx);
  ctx.attached = false;
}

/** The checks of QEMU's `aio_ctx_finalize` (S2), as thrown errors. */
function aio_ctx_finalize(ctx: AioContext): void {
  // Every check first: a refused finalize must leave the context fully working.
  if (ctx.thread_pool !== null && ctx.thread_pool.outstanding() !== 0) {
    throw new QemuError(
      `thread_pool_free: Assertion 'QLIST_EMPTY(&pool->head)' failed (${ctx.thread_pool.outstanding()} request(s) outstanding in context '${ctx.name}')`,
    );
  }
  if (ctx.dispatchDepth > 0) {
    throw new QemuError(`aio_ctx_finalize: context '${ctx.name}' is finalized while it is dispatching (Assertion 'QSIMPLEQ_EMPTY(&ctx->bh_slice_list)' failed)`);
  }
  if (ctx.scheduledHead !== null) {
    const co = ctx.scheduledHead;
    throw new QemuError(
      `aio_ctx_finalize: coroutine${co.name !== undefined ? ` '${co.name}'` : ''} is still scheduled in context '${ctx.name}'`,
    );
  }
  aio_bh_finalize_check(ctx);
  for (const tl of ctx.tlg) {
    const ts = tl.active_timers;
    if (ts !== null) {
      throw new QemuError(
        `aio_ctx_finalize: timer '${ts.name}' is still armed in context '${ctx.name}' (timerlist_free: Assertion '!timerlist_has_timers(timer_list)' failed)`,
      );
    }
  }
  if (ctx.thread_pool !== null) ctx.thread_pool.free();
  aio_bh_finalize_free(ctx);
  notifyHooks.hostDetach(ctx);
}

/**
 * Takes the context's recursive lock. QEMU 5.2: `aio_context_acquire`. It never blocks
 * (one JS thread, as in QEMU 9.0 where it is a no-op) but counts, so unbalanced release
 * is caught.
 */
export function aio_context_acquire(ctx: AioContext): void {
  ctx.acquireDepth++;
}

/**
 * Releases one level of `aio_context_acquire`. QEMU 5.2: `aio_context_release`. Throws
 * if the context is not acquired (QEMU's recursive mutex would assert).
 */
export function aio_context_release(ctx: AioContext): void {
  if (ctx.acquireDepth === 0) {
    throw new QemuError(`aio_context_release: context '${ctx.name}' is not acquired`);
  }
  ctx.acquireDepth--;
}

/**
 * Wakes the context: its next (or current blocking) aio_poll does not sleep. QEMU:
 * `aio_notify`. Surprise: a notify nobody consumed makes the next blocking aio_poll
 * return at once, possibly false (S20); attached contexts get a dispatch on Node's loop.
 */
export function aio_notify(ctx: AioContext): void {
  ctx.notified = true;
  if (ctx.attached) notifyHooks.hostKick(ctx);
}

/** Consumes a notification (QEMU: `aio_notify_accept`), as every aio_poll does in phase 7. */
export function aio_notify_accept(ctx: AioContext): void {
  ctx.notified = false;
}

/**
 * Sets adaptive polling parameters, resets poll_ns to 0 and notifies. QEMU:
 * `aio_context_set_poll_params`. `max_ns == 0` turns polling off. Surprise (a fix over
 * 5.2): negative values throw `QemuError`, with the IOThread property setter's message
 * (values above 2**53 are refused too, with the same message).
 */
export function aio_context_set_poll_params(ctx: AioContext, max_ns: number, grow: number, shrink: number): void {
  const check = (name: string, v: number) => {
    if (!Number.isInteger(v) || v < 0 || v > Number.MAX_SAFE_INTEGER) {
      // QEMU's text (INT64_MAX); JS numbers are exact only up to 2**53, which is checked.
      throw new QemuError(`${name} value must be in range [0, 9223372036854775807]`);
    }
  };
  check('poll-max-ns', max_ns);
  check('poll-grow', grow);
  check('poll-shrink', shrink);
  ctx.poll_max_ns = max_ns;
  ctx.poll_ns = 0;
  ctx.poll_grow = grow;
  ctx.poll_shrink = shrink;
  aio_notify(ctx);
}

coroutineSetDefaultContext(qemu_get_aio_context);

clockSetNotifyHook(
  (type: QEMUClockType, dueUpTo: number) => {
    for (const ctx of liveContexts) {
      const tl = ctx.tlg[type] as TimerList;
      if (tl.active_timers !== null && (dueUpTo === Infinity || timerlist_due_before(tl, dueUpTo))) aio_notify(ctx);
    }
  },
  () => notifyHooks.hostTimersChanged(null),
);
