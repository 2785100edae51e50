/**
 * The host-loop drive: contexts attached to Node's event loop, QEMU's GSource (S45).
 *
 * An attached context is dispatched (aio_dispatch semantics, S102) at most once per Node
 * loop turn, from setImmediate, never from a microtask loop: `aio_notify` schedules it;
 * the earliest timer on an enabled, non-manual clock arms one setTimeout; workers wake it
 * through Atomics.waitAsync on the wake word. Node is kept alive only while there is
 * work: a pending dispatch, an armed timer, an outstanding pool request or a coroutine
 * parked on a promise; disarming a timer or stopping a clock re-checks at once.
 * Busy-polling never happens here.
 */
import type { AioContext } from './aio-context.ts';
import {
  aio_notify_accept,
  drivenContexts,
  notifyHooks,
  poolHooks,
  qemu_get_aio_context,
} from './aio-context.ts';
import { qemu_soonest_timeout, realtimeNs } from './clock.ts';
import { QemuError } from './error.ts';
import { aio_dispatch, aio_timers_deadline } from './aio-poll.ts';
import { parkedCoroutines } from './aio-wait.ts';
import { wakeSeq, wakeWord } from './wake.ts';

const attachedContexts = new Set<AioContext>();
const pending = new Set<AioContext>();
let immediate: NodeJS.Immediate | null = null;
let timer: NodeJS.Timeout | null = null;
let timerAt = -1;
let keepAlive: NodeJS.Timeout | null = null;
let waitAsyncArmed = false;

/** The source `aio_get_g_source` hands out: attach to / detach from Node's loop. */
export interface AioGSource {
  /** Starts dispatching the context from Node's loop. Idempotent. */
  attach(): void;
  /** Detaches the context; `aio_poll` on it keeps working. */
  destroy(): void;
}

class AioContextGSource implements AioGSource {
  constructor(private readonly ctx: AioContext) {}
  attach(): void {
    const ctx = this.ctx;
    if (ctx.finalized) throw new QemuError(`aio_get_g_source: context '${ctx.name}' was finalized`);
    if (ctx.attached) return;
    ctx.attached = true;
    attachedContexts.add(ctx);
    drivenContexts.add(ctx);
    hostKick(ctx);
  }
  destroy(): void {
    const ctx = this.ctx;
    ctx.attached = false;
    attachedContexts.delete(ctx);
    pending.delete(ctx);
    if (!ctx.isIOThread && ctx !== qemu_get_aio_context()) drivenContexts.delete(ctx);
    ctx.gsource = null;
    hostLoopUpdate();
  }
}

/**
 * The context as a source for Node's event loop. QEMU: `aio_get_g_source`.
 * Surprise: nothing runs from Node's loop until `attach()`; a context may be attached and
 * still be polled synchronously.
 */
export function aio_get_g_source(ctx: AioContext): AioGSource {
  return (ctx.gsource ??= new AioContextGSource(ctx)) as AioGSource;
}

/**
 * Attaches the main context to Node's event loop. QEMU: `qemu_init_main_loop`.
 * Idempotent. Needed for BHs, timers and coroutines of the main context to run without
 * an explicit aio_poll.
 */
export function qemu_init_main_loop(): void {
  aio_get_g_source(qemu_get_aio_context()).attach();
}

/** @internal an attached context has something for Node's loop. */
function hostKick(ctx: AioContext): void {
  pending.add(ctx);
  if (immediate === null) immediate = setImmediate(hostDispatch);
}

let inHostDispatch = false;

function hostDispatch(): void {
  immediate = null;
  let errors: unknown[] | null = null;
  const list = [...pending];
  pending.clear();
  inHostDispatch = true;
  try {
    for (const ctx of list) {
      if (!ctx.attached || ctx.finalized) continue;
      try {
        aio_notify_accept(ctx);
        aio_dispatch(ctx);
      } catch (e) {
        // Whatever was left queued runs in the next turn; the errors surface after.
        (errors ??= []).push(e);
        hostKick(ctx);
      }
    }
  } finally {
    inHostDispatch = false;
  }
  hostLoopUpdate();
  if (errors !== null) {
    throw errors.length === 1 ? errors[0] : new AggregateError(errors, 'aio_dispatch: several callbacks failed in one Node loop turn');
  }
}

/** Due timers join the next dispatch: still at most one dispatch per loop turn. */
function onTimer(): void {
  timer = null;
  timerAt = -1;
  let due = false;
  for (const ctx of attachedContexts) {
    if (aio_timers_deadline(ctx, true) === 0) {
      pending.add(ctx);
      due = true;
    }
  }
  if (due) {
    if (immediate === null) immediate = setImmediate(hostDispatch);
  } else {
    hostLoopUpdate();
  }
  // hostLoopUpdate also gave the thread pool its stall check (poolHooks.tick).
}

function hasOutstanding(): boolean {
  for (const ctx of attachedContexts) {
    if (ctx.thread_pool !== null && ctx.thread_pool.outstanding() > 0) return true;
  }
  return false;
}

function armWaitAsync(): void {
  if (waitAsyncArmed) return;
  const seq = wakeSeq();
  waitAsyncArmed = true;
  // A completion posted before `seq` was read would not wake the wait: look first.
  const r = poolHooks.ringPending()
    ? ({ async: false } as const)
    : Atomics.waitAsync(wakeWord, 0, seq);
  const fire = () => {
    waitAsyncArmed = false;
    // Moving completions to their pools' BHs notifies (and so kicks) their contexts.
    poolHooks.drain();
    hostLoopUpdate();
  };
  if (r.async) r.value.then(fire);
  else queueMicrotask(fire);
}

/**
 * @internal Re-arms the timer and the worker watch and sets whether Node is kept alive.
 * Called after every host dispatch and whenever outstanding work or parked coroutines
 * change (the thread pool and the bridges call it).
 */
export function hostLoopUpdate(): void {
  let next = -1;
  for (const ctx of attachedContexts) {
    const t = aio_timers_deadline(ctx, true);
    if (t >= 0 && (next < 0 || t < next)) next = t;
  }
  if (poolHooks.inFlight !== 0) next = qemu_soonest_timeout(next, poolHooks.tick());
  if (next < 0) {
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
      timerAt = -1;
    }
  } else {
    const at = realtimeNs() + next;
    if (timer === null || at < timerAt - 500_000) {
      if (timer !== null) clearTimeout(timer);
      timerAt = at;
      timer = setTimeout(onTimer, Math.ceil(next / 1e6));
    }
  }
  const outstanding = hasOutstanding();
  if (outstanding) armWaitAsync();
  const need = outstanding || parkedCoroutines.size > 0;
  if (need && keepAlive === null) keepAlive = setInterval(() => {}, 1 << 30);
  else if (!need && keepAlive !== null) {
    clearInterval(keepAlive);
    keepAlive = null;
  }
}

notifyHooks.hostKick = hostKick;
notifyHooks.hostTimersChanged = (ctx) => {
  // After a host dispatch hostLoopUpdate runs anyway; elsewhere a stale setTimeout
  // would keep Node alive for a timer that no longer exists.
  if (!inHostDispatch && (ctx === null || ctx.attached)) hostLoopUpdate();
};
notifyHooks.hostDetach = (ctx) => {
  attachedContexts.delete(ctx);
  pending.delete(ctx);
  ctx.gsource = null;
  hostLoopUpdate();
};
