/**
 * CoMutex: a fair coroutine mutex with direct hand-off. QEMU: util/qemu-coroutine-lock.c.
 * With every context on one JS thread, QEMU's spin and lock-free hand-off protocol are
 * dead code (S76, S78); what remains is the observable contract: FIFO, no barging, the
 * woken waiter owns the lock before it runs.
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

/** QEMU's `CoMutex`. `new CoMutex()` is unlocked. */
export class CoMutex {
  /** @internal number of lockers: 0 free, 1 held, >1 held with waiters. */
  locked = 0;
  /** @internal */ holder: Coroutine | null = null;
  /** @internal FIFO of waiters, through `co_queue_next`. */
  waitHead: Coroutine | null = null;
  waitTail: Coroutine | null = null;
}

/** Resets `m` to unlocked with no waiters (QEMU: `qemu_co_mutex_init`). */
export function qemu_co_mutex_init(m: CoMutex): void {
  m.locked = 0;
  m.holder = null;
  m.waitHead = m.waitTail = null;
}

/** @internal take `m` if free, without waiting. */
export function coMutexTryLock(m: CoMutex): boolean {
  if (m.locked !== 0) return false;
  const self = qemu_coroutine_self();
  m.locked = 1;
  m.holder = self;
  self.locks_held++;
  return true;
}

/**
 * Takes `m`, waiting in FIFO order if it is held. QEMU: `qemu_co_mutex_lock`.
 * Surprise: not recursive; locking a mutex you hold waits for yourself forever (S79).
 */
export function* qemu_co_mutex_lock(m: CoMutex): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  if (m.locked === 0) {
    m.locked = 1;
    m.holder = self;
    self.locks_held++;
    return;
  }
  if (!qemu_in_coroutine()) throw new CoroutineError('Co-routine is yielding to no one');
  m.locked++;
  self.co_queue_next = null;
  if (m.waitTail === null) m.waitHead = self;
  else m.waitTail.co_queue_next = self;
  m.waitTail = self;
  yield* qemu_coroutine_yield();
  // The unlocker handed the mutex to us: `locked` never dropped to 0.
  m.holder = self;
  self.locks_held++;
}

/**
 * Releases `m`, handing it directly to the oldest waiter. QEMU: `qemu_co_mutex_unlock`.
 * Surprise: the waiter owns the lock at once but, woken from a coroutine, runs only when
 * the unlocker yields or ends (S77, S80); until then `holder` is null.
 */
export function qemu_co_mutex_unlock(m: CoMutex): void {
  const self = qemu_coroutine_self();
  if (m.locked === 0) throw new CoroutineError("qemu_co_mutex_unlock: Assertion 'mutex->locked' failed");
  if (m.holder !== self) throw new CoroutineError("qemu_co_mutex_unlock: Assertion 'mutex->holder == self' failed");
  if (!qemu_in_coroutine()) throw new CoroutineError("qemu_co_mutex_unlock: Assertion 'qemu_in_coroutine()' failed");
  m.holder = null;
  self.locks_held--;
  if (--m.locked === 0) return;
  const next = m.waitHead as Coroutine;
  m.waitHead = next.co_queue_next;
  if (m.waitHead === null) m.waitTail = null;
  next.co_queue_next = null;
  coroutineWake(next);
}

/** Throws unless the running coroutine holds `m`. QEMU: `qemu_co_mutex_assert_locked`. */
export function qemu_co_mutex_assert_locked(m: CoMutex): void {
  if (m.locked === 0 || m.holder !== qemu_coroutine_self()) {
    throw new CoroutineError("qemu_co_mutex_assert_locked: Assertion 'mutex->locked && mutex->holder == qemu_coroutine_self()' failed");
  }
}
