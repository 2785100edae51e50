/**
 * CoQueue: a FIFO of coroutines waiting for a condition. QEMU: util/qemu-coroutine-lock.c.
 * No internal lock (S71): the lock passed to `qemu_co_queue_wait` protects the caller's
 * condition, and one JS thread protects the queue itself.
 */
import {
  CoroutineError,
  coroutineWake,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from './coroutine.ts';
import { coMutexTryLock, qemu_co_mutex_lock, qemu_co_mutex_unlock, type CoMutex } from './co-mutex.ts';

/** QEMU's `CoQueue`. `new CoQueue()` is empty. */
export class CoQueue {
  /** @internal */ head: Coroutine | null = null;
  /** @internal */ tail: Coroutine | null = null;
}

/** @internal append at the tail (intrusive, through `co_queue_next`). */
export function coQueuePush(q: CoQueue, co: Coroutine): void {
  co.co_queue_next = null;
  if (q.tail === null) q.head = co;
  else q.tail.co_queue_next = co;
  q.tail = co;
}

/** @internal remove and return the head, or null. */
export function coQueuePop(q: CoQueue): Coroutine | null {
  const co = q.head;
  if (co !== null) {
    q.head = co.co_queue_next;
    if (q.head === null) q.tail = null;
    co.co_queue_next = null;
  }
  return co;
}

/** Empties the queue (QEMU: `qemu_co_queue_init`). Waiters on it are forgotten, not woken. */
export function qemu_co_queue_init(q: CoQueue): void {
  q.head = q.tail = null;
}

/**
 * Waits at the tail of `q` until woken, releasing `lock` meanwhile. QEMU:
 * `qemu_co_queue_wait`. Surprise: it always yields (no fast path), and re-taking `lock`
 * after the wake may yield again, so re-check the condition in a loop (S72).
 */
export function* qemu_co_queue_wait(q: CoQueue, lock?: CoMutex | null): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  if (!qemu_in_coroutine()) throw new CoroutineError('Co-routine is yielding to no one');
  // Unlock first: if it throws, we are not left queued. Its hand-off wake-up is deferred
  // until we yield (we are in a coroutine), so queueing after it changes nothing else.
  if (lock) qemu_co_mutex_unlock(lock);
  coQueuePush(q, self);
  yield* qemu_coroutine_yield();
  if (lock) yield* qemu_co_mutex_lock(lock);
}

/**
 * Wakes the oldest waiter; true iff there was one. QEMU: `qemu_co_queue_next`.
 * Surprise: from a coroutine in the same context the waiter runs only when the caller
 * yields or ends; from plain code it runs before this returns; another context: scheduled.
 */
export function qemu_co_queue_next(q: CoQueue): boolean {
  const co = coQueuePop(q);
  if (co === null) return false;
  coroutineWake(co);
  return true;
}

/**
 * Wakes every waiter, oldest first, with `qemu_co_queue_next`'s timing. QEMU:
 * `qemu_co_queue_restart_all`. Surprise: from plain code each runs at once; if one throws,
 * the rest are still woken, then the error is rethrown (several: an AggregateError).
 */
export function qemu_co_queue_restart_all(q: CoQueue): void {
  let co: Coroutine | null;
  let errors: unknown[] | null = null;
  while ((co = coQueuePop(q)) !== null) {
    try {
      coroutineWake(co);
    } catch (e) {
      // From plain code a waiter runs at once and may throw: the others are still woken.
      (errors ??= []).push(e);
    }
  }
  if (errors !== null) {
    throw errors.length === 1 ? errors[0] : new AggregateError(errors, 'qemu_co_queue_restart_all: several coroutines failed');
  }
}

/**
 * Like `qemu_co_queue_next`, but drops `lock` around the wake so a waiter entered at once
 * can take it. QEMU: `qemu_co_enter_next`. QEMU meant it for plain callers holding a
 * QemuMutex; aioco's only lock is a CoMutex, which only a coroutine can hold, so with a
 * lock it must be called from the coroutine holding it.
 * Surprise: re-taking the CoMutex here cannot wait, so it throws if the woken waiter
 * (or anyone) took it meanwhile.
 */
export function qemu_co_enter_next(q: CoQueue, lock?: CoMutex | null): boolean {
  if (q.head === null) return false;
  // Unlock first: if it throws, the waiter stays queued.
  if (lock) qemu_co_mutex_unlock(lock);
  coroutineWake(coQueuePop(q) as Coroutine);
  if (lock && !coMutexTryLock(lock)) {
    throw new CoroutineError('qemu_co_enter_next: the CoMutex is contended; it cannot be re-taken outside a coroutine_fn');
  }
  return true;
}

/** True iff nobody waits on `q`. QEMU: `qemu_co_queue_empty`. */
export function qemu_co_queue_empty(q: CoQueue): boolean {
  return q.head === null;
}
