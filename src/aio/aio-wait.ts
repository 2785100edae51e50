/**
 * Waiting: the blocking phase of aio_poll, AIO_WAIT_WHILE, aio_wait_kick and
 * aio_wait_bh_oneshot (S86-S88), and the rule that a wait nothing could ever end throws.
 *
 * QEMU blocks one thread per context; here every context shares the JS thread, so a wait
 * drives the others itself: each round runs `aio_poll(C, false)` for its own context (when
 * it is the thing being waited on), the main context, every IOThread context and every
 * attached context, skipping contexts that are dispatching further up the JS stack. Only
 * when a whole round ran nothing does it sleep on the wake word, until the earliest timer
 * of those contexts or a worker's wake-up.
 */
import type { Coroutine } from '../coroutine/coroutine.ts';
import type { AioContext } from './aio-context.ts';
import { drivenContexts, poolHooks, qemu_get_aio_context, qemu_get_current_aio_context } from './aio-context.ts';
import { aio_bh_schedule_oneshot, aio_has_scheduled_bh } from './bh.ts';
import { qemu_soonest_timeout, realtimeNs } from './clock.ts';
import { AioWaitError, QemuError } from './error.ts';
import { aio_has_ready_handler } from './fd-handler.ts';
import { aio_poll, aio_timers_deadline, aio_wait_timeout } from './aio-poll.ts';
import { wakeSeq, wakeWait } from './wake.ts';

/** @internal coroutines parked on a promise or effection operation, with what they wait for. */
export const parkedCoroutines = new Map<Coroutine, string>();

/** QEMU's `global_aio_wait.num_waiters`. @internal */
export const global_aio_wait = { num_waiters: 0 };

function describe(co: Coroutine): string {
  return co.name !== undefined ? `'${co.name}'` : 'an unnamed coroutine';
}

/** The contexts a wait on `primary` drives, `primary` first. */
function waitOrder(primary: AioContext): AioContext[] {
  const order = [primary];
  for (const c of drivenContexts) if (c !== primary && !c.finalized) order.push(c);
  return order;
}

function hasWork(c: AioContext): boolean {
  return (
    c.notified ||
    aio_has_scheduled_bh(c) ||
    aio_has_ready_handler(c) ||
    (c.thread_pool !== null && c.thread_pool.outstanding() > 0) ||
    aio_timers_deadline(c, true) >= 0
  );
}

function neverEnds(order: AioContext[], primary: AioContext): never {
  const reasons: string[] = ['no context it drives has a scheduled BH, an armed timer on a running clock or an outstanding request'];
  const manual = order.filter((c) => aio_timers_deadline(c, false) >= 0 && aio_timers_deadline(c, true) < 0);
  if (manual.length) {
    reasons.push(
      `context ${manual.map((c) => `'${c.name}'`).join(', ')} has timers only on the manual clock (qemu_clock_advance_virtual_time moves it)`,
    );
  }
  const skipped = order.filter((c) => c !== primary && c.dispatchDepth > 0 && hasWork(c));
  if (skipped.length) {
    reasons.push(
      `context ${skipped.map((c) => `'${c.name}'`).join(', ')} has work but is dispatching further up the stack`,
    );
  }
  for (const [co, what] of parkedCoroutines) reasons.push(`coroutine ${describe(co)} is parked in ${what}, which only Node's event loop can resolve`);
  throw new AioWaitError(`aio_poll: this blocking wait can never end: ${reasons.join('; ')}`);
}

/**
 * Runs rounds over `order` until `done()`; sleeps when a round ran nothing.
 * `pollPrimary`: poll the first context too (AIO_WAIT_WHILE) or leave it to the caller
 * (aio_poll's own wait). `deadline`: absolute REALTIME ns at which to give up, or -1.
 */
function drive(primary: AioContext, pollPrimary: boolean, done: () => boolean, deadline: number): void {
  for (;;) {
    const order = waitOrder(primary);
    let progress = false;
    for (const c of order) {
      if (c === primary ? !pollPrimary : c.dispatchDepth > 0) continue;
      if (aio_poll(c, false)) progress = true;
      if (done()) return;
    }
    const seq = wakeSeq();
    if (done()) return;
    // A completion that arrived after this round drained the ring bumped the wake word
    // before `seq` was read: sleeping now would miss it.
    if (poolHooks.inFlight !== 0 && poolHooks.ringPending()) continue;
    const now = realtimeNs();
    if (deadline >= 0 && now >= deadline) return;
    if (progress) continue;
    // Whether anything could ever end the wait is decided by the contexts' own wake
    // sources; the deadline only bounds how long to sleep.
    let workNs = -1;
    let outstanding = false;
    for (const c of order) {
      if (c !== primary && c.dispatchDepth > 0) continue;
      workNs = qemu_soonest_timeout(workNs, aio_wait_timeout(c));
      if (c.thread_pool !== null && c.thread_pool.outstanding() > 0) outstanding = true;
    }
    if (workNs < 0 && !outstanding) neverEnds(order, primary);
    if (poolHooks.inFlight !== 0) workNs = qemu_soonest_timeout(workNs, poolHooks.tick());
    const sleepNs = deadline >= 0 ? qemu_soonest_timeout(workNs, deadline - now) : workNs;
    if (sleepNs === 0) continue;
    wakeWait(seq, sleepNs < 0 ? Infinity : sleepNs / 1e6);
  }
}

/**
 * @internal The wait phase of a blocking aio_poll(ctx): returns when `ctx` is notified,
 * has a ready handler or pool completion, or its first timer on a running clock (or idle
 * BH) is due. Timers on a manual clock are never slept for.
 */
export function aioBlockingWait(ctx: AioContext): void {
  const ready = () => {
    // A worker's completion for this context notifies it once moved to its pool's BH.
    if (poolHooks.inFlight !== 0) poolHooks.drain();
    return ctx.notified || aio_has_ready_handler(ctx);
  };
  if (ready()) return;
  const own = aio_wait_timeout(ctx);
  drive(ctx, false, ready, own >= 0 ? realtimeNs() + own : -1);
}

/**
 * Polls until `cond()` is false; true if it polled at all. QEMU: `AIO_WAIT_WHILE`.
 * `ctx` (null: the main context) is polled first each round, then main, IOThreads and
 * attached contexts; `cond` is re-checked after every context's poll, so work that ends
 * it may run anywhere and `aio_wait_kick` is optional.
 * Surprise: if nothing anywhere could ever make `cond` false (no BH, no timer on a
 * running clock, no outstanding request) it throws AioWaitError instead of hanging.
 */
export function AIO_WAIT_WHILE(ctx: AioContext | null, cond: () => boolean): boolean {
  global_aio_wait.num_waiters++;
  try {
    if (!cond()) return false;
    const primary = ctx ?? qemu_get_aio_context();
    drive(primary, true, () => !cond(), -1);
    return true;
  } finally {
    global_aio_wait.num_waiters--;
  }
}

/** @internal AIO_WAIT_WHILE with a time limit in ns; true if `cond` became false. */
export function aioWaitWhileFor(ctx: AioContext | null, cond: () => boolean, limitNs: number): boolean {
  global_aio_wait.num_waiters++;
  try {
    if (!cond()) return true;
    drive(ctx ?? qemu_get_aio_context(), true, () => !cond(), realtimeNs() + limitNs);
    return !cond();
  } finally {
    global_aio_wait.num_waiters--;
  }
}

function aio_wait_bh(): void {}

/**
 * Makes a waiting AIO_WAIT_WHILE re-check its condition: schedules an empty BH in the
 * main context if anyone waits. QEMU: `aio_wait_kick`. aioco re-checks after every
 * context's poll anyway, so this is only needed for code ported as is.
 */
export function aio_wait_kick(): void {
  if (global_aio_wait.num_waiters > 0) aio_bh_schedule_oneshot(qemu_get_aio_context(), aio_wait_bh);
}

interface OneshotState {
  cb: (opaque: any) => void;
  opaque: unknown;
  done: boolean;
}
function aio_wait_bh_oneshot_cb(s: OneshotState): void {
  s.cb(s.opaque);
  s.done = true;
  aio_wait_kick();
}

/**
 * Runs `cb(opaque)` as a BH in `ctx` and waits until it has run. QEMU:
 * `aio_wait_bh_oneshot`. Main context only, as in QEMU (it throws elsewhere).
 */
export function aio_wait_bh_oneshot<T>(ctx: AioContext, cb: (opaque: T) => void, opaque?: T): void {
  if (qemu_get_current_aio_context() !== qemu_get_aio_context()) {
    throw new QemuError("aio_wait_bh_oneshot: Assertion 'qemu_get_current_aio_context() == qemu_get_aio_context()' failed");
  }
  const s: OneshotState = { cb, opaque, done: false };
  aio_bh_schedule_oneshot(ctx, aio_wait_bh_oneshot_cb, s);
  AIO_WAIT_WHILE(ctx, () => !s.done);
}
