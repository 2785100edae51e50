/**
 * aio_poll and its relatives: QEMU 5.2 util/aio-posix.c, phase for phase (S23-S27,
 * S35-S38), and aio_dispatch for the host-loop drive (S45, S102).
 */
import { coroutineSwapAmbientContext, coroutineSwapCurrent, qemu_coroutine_self, qemu_in_coroutine, type Coroutine } from '../coroutine/coroutine.ts';
import type { AioContext } from './aio-context.ts';
import { aio_notify_accept, poolHooks } from './aio-context.ts';
import { aio_bh_poll, aio_compute_bh_timeout } from './bh.ts';
import { QEMU_CLOCK_MAX, qemu_soonest_timeout, realtimeNs } from './clock.ts';
import { QemuError } from './error.ts';
import {
  aio_collect_ready,
  aio_dispatch_handlers,
  aio_dispatch_ready_handlers,
  aio_free_deleted_handlers,
  aio_has_ready_handler,
  poll_set_started,
  run_poll_handlers_once,
} from './fd-handler.ts';
import { timerlist_deadline_ns, timerlist_run_timers, type TimerList } from './timer.ts';
import { aioBlockingWait } from './aio-wait.ts';

/**
 * @internal Nanoseconds until the context's first timer, -1 if none. With `skipManual`,
 * timers on a manual clock do not count (no wait ever sleeps for one).
 */
export function aio_timers_deadline(ctx: AioContext, skipManual: boolean): number {
  let d = -1;
  for (let t = 0; t < QEMU_CLOCK_MAX; t++) d = qemu_soonest_timeout(d, timerlist_deadline_ns(ctx.tlg[t] as TimerList, skipManual));
  return d;
}

/**
 * How long a blocking aio_poll of `ctx` may sleep, in ns: 0 if a BH is scheduled (pool
 * completions waiting in the ring are moved to their BHs first), 10 ms with only idle BHs, the first timer's distance, -1
 * for infinite (S16, S17). QEMU: `aio_compute_timeout`.
 * Surprise: a manual-clock timer counts by its distance on that clock, but no wait ever
 * sleeps for it.
 */
export function aio_compute_timeout(ctx: AioContext): number {
  if (poolHooks.inFlight !== 0) poolHooks.drain();
  const bh = aio_compute_bh_timeout(ctx);
  if (bh === 0) return 0;
  return qemu_soonest_timeout(bh, aio_timers_deadline(ctx, false));
}

/** @internal the timeout a wait may really sleep: manual-clock timers excluded. */
export function aio_wait_timeout(ctx: AioContext): number {
  const bh = aio_compute_bh_timeout(ctx);
  if (bh === 0) return 0;
  return qemu_soonest_timeout(bh, aio_timers_deadline(ctx, true));
}

function run_timers(ctx: AioContext): boolean {
  const tlg = ctx.tlg;
  if (
    (tlg[0] as TimerList).active_timers === null &&
    (tlg[1] as TimerList).active_timers === null &&
    (tlg[2] as TimerList).active_timers === null &&
    (tlg[3] as TimerList).active_timers === null
  ) {
    return false;
  }
  let progress = false;
  for (let t = 0; t < QEMU_CLOCK_MAX; t++) {
    const tl = ctx.tlg[t] as TimerList;
    if (tl.active_timers !== null && timerlist_run_timers(tl)) progress = true;
  }
  return progress;
}

/** S36: busy-poll the io_poll handlers for up to poll_ns. Returns [progress, timeout]. */
let pollTimeout = 0;
function try_poll_mode(ctx: AioContext, timeout: number): boolean {
  pollTimeout = timeout;
  const need_wait = ctx.poll_disable_cnt !== 0;
  let max_ns = qemu_soonest_timeout(timeout, ctx.poll_ns);
  if (max_ns !== 0 && !need_wait) {
    poll_set_started(ctx, true);
    const start = realtimeNs();
    let elapsed = 0;
    let progress = false;
    for (;;) {
      ctx.walking++;
      try {
        progress = run_poll_handlers_once(ctx);
      } finally {
        ctx.walking--;
        aio_free_deleted_handlers(ctx);
      }
      if (progress || ctx.notified) pollTimeout = 0;
      elapsed = realtimeNs() - start;
      max_ns = qemu_soonest_timeout(pollTimeout, max_ns);
      if (progress || elapsed >= max_ns || ctx.poll_disable_cnt !== 0) break;
    }
    if (pollTimeout !== -1) pollTimeout -= Math.min(pollTimeout, elapsed);
    if (progress) return true;
  }
  if (poll_set_started(ctx, false)) {
    pollTimeout = 0;
    return true;
  }
  return false;
}

/** S38: grow or shrink poll_ns from how long this aio_poll took. */
function adjust_poll_ns(ctx: AioContext, block_ns: number): void {
  if (block_ns <= ctx.poll_ns) return;
  if (block_ns > ctx.poll_max_ns) {
    ctx.poll_ns = ctx.poll_shrink ? Math.floor(ctx.poll_ns / ctx.poll_shrink) : 0;
  } else if (ctx.poll_ns < ctx.poll_max_ns && block_ns < ctx.poll_max_ns) {
    let ns = ctx.poll_ns === 0 ? 4000 : ctx.poll_ns * (ctx.poll_grow ? ctx.poll_grow : 2);
    if (ns > ctx.poll_max_ns) ns = ctx.poll_max_ns;
    ctx.poll_ns = ns;
  }
}

/**
 * A wait inside a coroutine may drive another context, which in QEMU runs on its own
 * thread, outside any coroutine: its callbacks must not see the waiting coroutine as
 * current. Polling the coroutine's own context keeps QEMU's behaviour (they do).
 */
function leaveForeignCoroutine(ctx: AioContext): Coroutine | null {
  if (!qemu_in_coroutine()) return null;
  const co = qemu_coroutine_self();
  if (co.ctx === ctx) return null;
  return coroutineSwapCurrent(null);
}

function checkLive(ctx: AioContext, fn: string): void {
  if (ctx.finalized) throw new QemuError(`${fn}: context '${ctx.name}' was finalized`);
}

/**
 * One iteration of `ctx`'s event loop; true iff a user callback ran. QEMU: `aio_poll`.
 * Phases (S23): busy-poll, wait (if `blocking`), accept the notification, BHs, fd
 * handlers, then timers last. With `blocking`, it sleeps until `ctx` has work or its
 * first timer is due, meanwhile running the other driven contexts (main, IOThreads,
 * attached) as their own threads would; their work never counts toward the result.
 * Surprises: a notify nobody consumed makes a blocking call return at once, maybe false
 * (S20); idle BHs and deleted BHs are not progress; a wait that nothing could ever end
 * throws AioWaitError instead of hanging. Called inside a coroutine, callbacks of that
 * coroutine's own context run in coroutine context (as in QEMU, so wake-ups they make are
 * deferred until it yields); other contexts' callbacks never do.
 */
export function aio_poll(ctx: AioContext, blocking: boolean): boolean {
  if (ctx.finalized) checkLive(ctx, 'aio_poll');
  const prevCo = leaveForeignCoroutine(ctx);
  const prevAmbient = coroutineSwapAmbientContext(ctx);
  ctx.dispatchDepth++;
  ctx.walking++;
  let walking = true;
  let raisedNotifyMe = false;
  try {
    let progress = false;
    const start = ctx.poll_max_ns !== 0 ? realtimeNs() : 0;
    let timeout = blocking ? aio_compute_timeout(ctx) : 0;
    if (ctx.poll_aio_handlers.length !== 0) {
      progress = try_poll_mode(ctx, timeout);
      timeout = pollTimeout;
    }
    if (timeout !== 0) {
      ctx.notify_me += 2;
      raisedNotifyMe = true;
      if (ctx.notified) timeout = 0;
    }
    let ready = null;
    let token: object | null = null;
    if (timeout !== 0 || ctx.poll_disable_cnt !== 0) {
      if (timeout !== 0) aioBlockingWait(ctx);
      token = {};
      ready = aio_collect_ready(ctx, token);
    }
    if (raisedNotifyMe) {
      ctx.notify_me -= 2;
      raisedNotifyMe = false;
    }
    aio_notify_accept(ctx);
    if (ctx.poll_max_ns !== 0) adjust_poll_ns(ctx, realtimeNs() - start);
    if (poolHooks.inFlight !== 0) poolHooks.drain();
    if (ctx.bh_list !== null || ctx.bh_slice_list.length !== 0) {
      if (aio_bh_poll(ctx)) progress = true;
    }
    if (ready !== null && aio_dispatch_ready_handlers(ctx, ready, token as object)) progress = true;
    ctx.walking--;
    walking = false;
    aio_free_deleted_handlers(ctx);
    if (run_timers(ctx)) progress = true;
    return progress;
  } finally {
    if (raisedNotifyMe) ctx.notify_me -= 2;
    if (walking) {
      ctx.walking--;
      aio_free_deleted_handlers(ctx);
    }
    ctx.dispatchDepth--;
    coroutineSwapAmbientContext(prevAmbient);
    if (prevCo !== null) coroutineSwapCurrent(prevCo);
  }
}

/**
 * Runs everything that is ready in `ctx` without waiting or busy-polling: BHs, every
 * handler (a full scan), then timers. QEMU: `aio_dispatch`, the GSource dispatch (S102).
 */
export function aio_dispatch(ctx: AioContext): void {
  checkLive(ctx, 'aio_dispatch');
  const prevCo = leaveForeignCoroutine(ctx);
  const prevAmbient = coroutineSwapAmbientContext(ctx);
  ctx.dispatchDepth++;
  ctx.walking++;
  let walking = true;
  try {
    if (poolHooks.inFlight !== 0) poolHooks.drain();
    aio_bh_poll(ctx);
    aio_dispatch_handlers(ctx);
    ctx.walking--;
    walking = false;
    aio_free_deleted_handlers(ctx);
    run_timers(ctx);
  } finally {
    if (walking) {
      ctx.walking--;
      aio_free_deleted_handlers(ctx);
    }
    ctx.dispatchDepth--;
    coroutineSwapAmbientContext(prevAmbient);
    if (prevCo !== null) coroutineSwapCurrent(prevCo);
  }
}

/**
 * GSource prepare: stops polling mode (polling is never used through the GSource) and
 * returns false. QEMU: `aio_prepare`.
 */
export function aio_prepare(ctx: AioContext): boolean {
  poll_set_started(ctx, false);
  return false;
}

/**
 * True if a handler of `ctx` is ready to dispatch. QEMU: `aio_pending`. Pool completions
 * waiting in the ring are moved to their BHs first. Surprise: BHs and timers are not
 * counted, as in QEMU.
 */
export function aio_pending(ctx: AioContext): boolean {
  if (poolHooks.inFlight !== 0) poolHooks.drain();
  return aio_has_ready_handler(ctx);
}
