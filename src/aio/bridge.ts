/**
 * Bridges between coroutines and the rest of JavaScript: promises and effection
 * operations (aioco's own; QEMU has no counterpart). Values cross from a macrotask, never
 * synchronously: a coroutine is woken with aio_co_wake from setImmediate, an operation is
 * resolved from setImmediate.
 */
import { resource, run, withResolvers, type Operation } from 'effection';
import {
  CoroutineError,
  qemu_coroutine_backtrace,
  qemu_coroutine_create,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from '../coroutine/coroutine.ts';
import type { AioContext } from './aio-context.ts';
import { aio_context_new, aio_context_unref } from './aio-context.ts';
import { aio_has_scheduled_bh } from './bh.ts';
import { aio_co_schedule, aio_co_wake } from './co-schedule.ts';
import { AioWaitError, QemuError } from './error.ts';
import { aio_get_g_source, hostLoopUpdate } from './g-source.ts';
import { iothread_create, iothread_destroy, iothread_get_aio_context, type IOThread, type IOThreadOptions } from './iothread.ts';
import { aioWaitWhileFor, parkedCoroutines } from './aio-wait.ts';

const PENDING = 0;
const FULFILLED = 1;
const REJECTED = 2;

interface Parked<T> {
  state: number;
  value: T | unknown;
  co: Coroutine;
  parked: boolean;
}

function wakeParked(p: Parked<unknown>): void {
  parkedCoroutines.delete(p.co);
  try {
    aio_co_wake(p.co);
  } finally {
    // After the coroutine ran: it may have armed or disarmed timers, or parked again.
    hostLoopUpdate();
  }
}

function settle(p: Parked<unknown>, state: number, value: unknown): void {
  if (p.state !== PENDING) return;
  p.state = state;
  p.value = value;
  if (p.parked) setImmediate(wakeParked, p);
}

function* park<T>(thenable: PromiseLike<T>, what: string): CoroutineFn<T> {
  if (!qemu_in_coroutine()) throw new CoroutineError('Co-routine is yielding to no one');
  const p: Parked<T> = { state: PENDING, value: undefined, co: qemu_coroutine_self(), parked: false };
  thenable.then(
    (v) => settle(p, FULFILLED, v),
    (e) => settle(p, REJECTED, e),
  );
  if (p.state === PENDING) {
    p.parked = true;
    parkedCoroutines.set(p.co, what);
    hostLoopUpdate();
    yield* qemu_coroutine_yield();
  }
  if (p.state === REJECTED) throw p.value;
  return p.value as T;
}

/**
 * Waits in a coroutine for a promise. aioco's own. The coroutine yields, and is woken with
 * aio_co_wake from a macrotask after the promise settles; a rejection is thrown. A
 * thenable that settles synchronously is detected before yielding.
 * Surprise: only Node's event loop settles promises, so this works under the host-loop
 * drive; a blocking wait (aio_poll(ctx, true), AIO_WAIT_WHILE) that has nothing else to
 * wait for throws AioWaitError naming the parked coroutine.
 */
export function* coAwait<T>(p: PromiseLike<T>): CoroutineFn<T> {
  return yield* park(p, 'coAwait');
}

/**
 * Runs an effection operation from a coroutine and returns its result. aioco's own. The
 * operation runs in its own effection scope; the coroutine is parked meanwhile, as with
 * coAwait.
 */
export function* coRun<T>(op: () => Operation<T>): CoroutineFn<T> {
  return yield* park(run(op), 'coRun (an effection operation)');
}

interface OperationState<A, T> {
  entry: (opaque: A) => CoroutineFn<T>;
  opaque: A;
  done: boolean;
  failed: boolean;
  value: T | undefined;
  error: unknown;
  resolve: ((v: T) => void) | null;
  reject: ((e: Error) => void) | null;
}

function deliver<A, T>(st: OperationState<A, T>): void {
  if (st.failed) st.reject?.(st.error instanceof Error ? st.error : new Error(String(st.error)));
  else st.resolve?.(st.value as T);
}

function* coroutineOperationEntry<A, T>(st: OperationState<A, T>): CoroutineFn<void> {
  try {
    st.value = yield* st.entry(st.opaque);
  } catch (e) {
    st.failed = true;
    st.error = e;
  } finally {
    st.done = true;
    setImmediate(deliver, st);
  }
}

/** How long the teardown of a halted coroutineOperation waits for its coroutine. */
const HALT_WAIT_NS = 5e9;

/**
 * Runs `entry(opaque)` as a coroutine in `ctx` and gives its result as an effection
 * Operation. aioco's own. The coroutine starts from `ctx`'s next BH round (aio_co_schedule),
 * so `ctx` must be attached to Node's loop (the main context after qemu_init_main_loop, an
 * IOThread's, or one attached with aio_get_g_source).
 * Surprise: halting the operation does not interrupt the coroutine (QEMU coroutines cannot
 * be cancelled): teardown waits for it with AIO_WAIT_WHILE for up to 5 s, then reports it
 * on stderr by name and creation stack (AIOCO_DEBUG=1 records the stack).
 */
export function coroutineOperation<A, T>(ctx: AioContext, entry: (opaque: A) => CoroutineFn<T>, opaque?: A): Operation<T> {
  return {
    *[Symbol.iterator]() {
      if (!ctx.attached) {
        throw new QemuError(
          `coroutineOperation: context '${ctx.name}' is not attached to Node's loop (aio_get_g_source(ctx).attach() or qemu_init_main_loop())`,
        );
      }
      const { operation, resolve, reject } = withResolvers<T>();
      const st: OperationState<A, T> = {
        entry,
        opaque: opaque as A,
        done: false,
        failed: false,
        value: undefined,
        error: undefined,
        resolve,
        reject,
      };
      const co = qemu_coroutine_create(coroutineOperationEntry<A, T>, st, entry.name || undefined);
      aio_co_schedule(ctx, co);
      try {
        return yield* operation;
      } finally {
        st.resolve = st.reject = null;
        if (!st.done) haltWait(ctx, co, st);
      }
    },
  };
}

function haltWait(ctx: AioContext, co: Coroutine, st: { done: boolean }): void {
  let why = 'did not finish within 5 s';
  try {
    if (aioWaitWhileFor(ctx, () => !st.done, HALT_WAIT_NS)) return;
  } catch (e) {
    if (!(e instanceof AioWaitError)) throw e;
    why = `cannot finish: ${e.message}`;
  }
  const bt = qemu_coroutine_backtrace(co);
  process.stderr.write(
    `aioco: coroutineOperation halted, but coroutine '${co.name ?? 'anonymous'}' ${why}\n` +
      (bt.created ? `  created at: ${bt.created}\n` : '  (run with AIOCO_DEBUG=1 to record where it was created)\n'),
  );
}

/** Runs the context's remaining BHs (bounded) so scope exit does not leak them. */
function drainContext(ctx: AioContext): void {
  try {
    aioWaitWhileFor(
      ctx,
      () => aio_has_scheduled_bh(ctx) || ctx.scheduledHead !== null || (ctx.thread_pool?.outstanding() ?? 0) > 0,
      HALT_WAIT_NS,
    );
  } catch (e) {
    if (!(e instanceof AioWaitError)) throw e;
  }
}

/**
 * An effection resource: a new AioContext attached to Node's loop for the scope's
 * lifetime. On scope exit it is drained (its pending BHs and coroutines run, up to 5 s),
 * detached and unreferenced (with the finalize checks). aioco's own.
 */
export function useAioContext(): Operation<AioContext> {
  return resource(function* (provide) {
    const ctx = aio_context_new();
    const src = aio_get_g_source(ctx);
    src.attach();
    try {
      yield* provide(ctx);
    } finally {
      drainContext(ctx);
      src.destroy();
      aio_context_unref(ctx);
    }
  });
}

/**
 * An effection resource: IOThread `id` for the scope's lifetime, drained and destroyed on
 * exit. aioco's own.
 */
export function useIOThread(id: string, opts?: IOThreadOptions): Operation<IOThread> {
  return resource(function* (provide) {
    const t = iothread_create(id, opts);
    try {
      yield* provide(t);
    } finally {
      drainContext(iothread_get_aio_context(t));
      iothread_destroy(t);
    }
  });
}
