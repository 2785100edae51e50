/**
 * Behaviour of src/coroutine/co-queue.ts: CoQueue (S71-S74).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  CoMutex,
  CoQueue,
  CoroutineError,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_co_enter_next,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_queue_empty,
  qemu_co_queue_init,
  qemu_co_queue_next,
  qemu_co_queue_restart_all,
  qemu_co_queue_wait,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_in_coroutine,
  type CoroutineFn,
} from '../../src/index.ts';
import { thrown, throwsCo } from '../helpers/assert.ts';
import { selfName, start } from '../helpers/coroutines.ts';

const main = qemu_get_aio_context();

interface Shared {
  q: CoQueue;
  m: CoMutex;
  log: string[];
}

/** Waits on the queue (no lock) once, logging before and after. */
function* waiter(s: Shared): CoroutineFn<void> {
  s.log.push(`${selfName()}:wait`);
  yield* qemu_co_queue_wait(s.q);
  s.log.push(`${selfName()}:woken`);
}

/** Takes the mutex, waits on the queue with it, logs whether it holds the mutex after. */
function* lockedWaiter(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  s.log.push(`${selfName()}:wait`);
  yield* qemu_co_queue_wait(s.q, s.m);
  s.log.push(`${selfName()}:woken holder=${s.m.holder === qemu_coroutine_self()}`);
  qemu_co_mutex_unlock(s.m);
}

function shared(): Shared {
  return { q: new CoQueue(), m: new CoMutex(), log: [] };
}

test('S71: a new CoQueue is empty; next, restart_all and enter_next on it do nothing', () => {
  const q = new CoQueue();
  assert.is(qemu_co_queue_empty(q), true);
  assert.is(qemu_co_queue_next(q), false);
  qemu_co_queue_restart_all(q);
  // Empty: returns false without touching the lock (not held here, so unlocking would throw).
  assert.is(qemu_co_enter_next(q, new CoMutex()), false);
  assert.is(qemu_co_enter_next(q), false);
  assert.is(qemu_co_queue_empty(q), true);
});

test('S72: qemu_co_queue_wait always yields, even with nobody to wake it', () => {
  const s = shared();
  start(waiter, s, 'W');
  assert.equal(s.log, ['W:wait']);
  assert.is(qemu_co_queue_empty(s.q), false);
  assert.is(qemu_in_coroutine(), false);
  assert.is(qemu_co_queue_next(s.q), true);
  assert.equal(s.log, ['W:wait', 'W:woken']);
  assert.is(qemu_co_queue_empty(s.q), true);
});

test('S72/S73: waiters are woken in FIFO order; from plain code each runs before qemu_co_queue_next returns', () => {
  const s = shared();
  start(waiter, s, 'W1');
  start(waiter, s, 'W2');
  start(waiter, s, 'W3');
  s.log.length = 0;
  for (let i = 0; i < 3; i++) {
    assert.is(qemu_co_queue_next(s.q), true);
    s.log.push(`next#${i + 1} returned`);
  }
  assert.is(qemu_co_queue_next(s.q), false);
  assert.equal(s.log, ['W1:woken', 'next#1 returned', 'W2:woken', 'next#2 returned', 'W3:woken', 'next#3 returned']);
  assert.is(qemu_co_queue_empty(s.q), true);
});

test('S73: qemu_co_queue_restart_all from plain code wakes everyone, oldest first, before it returns', () => {
  const s = shared();
  start(waiter, s, 'A');
  start(waiter, s, 'B');
  start(waiter, s, 'C');
  s.log.length = 0;
  qemu_co_queue_restart_all(s.q);
  s.log.push('restart_all returned');
  assert.equal(s.log, ['A:woken', 'B:woken', 'C:woken', 'restart_all returned']);
  assert.is(qemu_co_queue_empty(s.q), true);
});

interface Waker {
  s: Shared;
  how: 'next' | 'restart_all' | 'enter_next' | 'next-and-end';
}

function* wakerCo(w: Waker): CoroutineFn<void> {
  const { s } = w;
  if (w.how === 'restart_all') {
    qemu_co_queue_restart_all(s.q);
    s.log.push('waker:restart_all returned');
  } else if (w.how === 'enter_next') {
    s.log.push(`waker:enter_next=${qemu_co_enter_next(s.q)}`);
  } else {
    s.log.push(`waker:next=${qemu_co_queue_next(s.q)}`);
  }
  s.log.push(`waker:empty=${qemu_co_queue_empty(s.q)}`);
  if (w.how === 'next-and-end') {
    s.log.push('waker:ends');
    return;
  }
  s.log.push('waker:yield');
  yield* qemu_coroutine_yield();
  s.log.push('waker:resumed');
}

test('S73/S69b: qemu_co_queue_next from a coroutine defers the waiter until the caller yields', () => {
  const s = shared();
  start(waiter, s, 'W1');
  start(waiter, s, 'W2');
  s.log.length = 0;
  start(wakerCo, { s, how: 'next' } satisfies Waker, 'K');
  assert.equal(s.log, ['waker:next=true', 'waker:empty=false', 'waker:yield', 'W1:woken']);
  assert.is(qemu_co_queue_empty(s.q), false);
  assert.is(qemu_co_queue_next(s.q), true);
  assert.equal(s.log.slice(4), ['W2:woken']);
});

test('S73/S69b: ... or until it terminates', () => {
  const s = shared();
  start(waiter, s, 'W1');
  s.log.length = 0;
  start(wakerCo, { s, how: 'next-and-end' } satisfies Waker, 'K');
  assert.equal(s.log, ['waker:next=true', 'waker:empty=true', 'waker:ends', 'W1:woken']);
});

test('S73/S69b: qemu_co_queue_restart_all from a coroutine wakes all, FIFO, after the caller yields', () => {
  const s = shared();
  start(waiter, s, 'A');
  start(waiter, s, 'B');
  start(waiter, s, 'C');
  s.log.length = 0;
  const k = start(wakerCo, { s, how: 'restart_all' } satisfies Waker, 'K');
  assert.equal(s.log, ['waker:restart_all returned', 'waker:empty=true', 'waker:yield', 'A:woken', 'B:woken', 'C:woken']);
  qemu_coroutine_enter(k);
  assert.is(s.log[s.log.length - 1], 'waker:resumed');
});

test('S73: a waiter from another context is scheduled there, not run by qemu_co_queue_next', () => {
  const ctx2 = aio_context_new();
  const s = shared();
  qemu_aio_coroutine_enter(ctx2, qemu_coroutine_create(waiter, s, 'W'));
  assert.equal(s.log, ['W:wait']);
  assert.is(qemu_co_queue_next(s.q), true);
  assert.equal(s.log, ['W:wait']);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['W:wait']);
  assert.is(aio_poll(ctx2, false), true);
  assert.equal(s.log, ['W:wait', 'W:woken']);
  aio_context_unref(ctx2);
});

test('S74: qemu_co_enter_next without a lock: immediate from plain code, deferred from a coroutine', () => {
  const s = shared();
  start(waiter, s, 'W1');
  start(waiter, s, 'W2');
  s.log.length = 0;
  assert.is(qemu_co_enter_next(s.q), true);
  s.log.push('enter_next returned');
  assert.equal(s.log, ['W1:woken', 'enter_next returned']);
  s.log.length = 0;
  start(wakerCo, { s, how: 'enter_next' } satisfies Waker, 'K');
  assert.equal(s.log, ['waker:enter_next=true', 'waker:empty=true', 'waker:yield', 'W2:woken']);
  assert.is(qemu_co_enter_next(s.q, null), false);
});

function* enterNextHoldingLock(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  const r = qemu_co_enter_next(s.q, s.m);
  s.log.push(`K:enter_next=${r} holder=${s.m.holder === qemu_coroutine_self()}`);
  qemu_co_mutex_unlock(s.m);
  s.log.push('K:unlocked, yield');
  yield* qemu_coroutine_yield();
}

test('S74: qemu_co_enter_next with a lock from a coroutine: the caller still holds it after; the waiter re-takes it later', () => {
  const s = shared();
  start(lockedWaiter, s, 'W');
  assert.equal(s.m.locked, 0); // released by the wait
  s.log.length = 0;
  start(enterNextHoldingLock, s, 'K');
  assert.equal(s.log, ['K:enter_next=true holder=true', 'K:unlocked, yield', 'W:woken holder=true']);
  assert.is(s.m.locked, 0);
  assert.is(s.m.holder, null);
});

function* plainLocker(s: Shared): CoroutineFn<void> {
  s.log.push(`${selfName()}:lock`);
  yield* qemu_co_mutex_lock(s.m);
  s.log.push(`${selfName()}:got`);
  qemu_co_mutex_unlock(s.m);
}

function* enterNextContended(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  // Queue a locker behind us (nested: it blocks and yields back here).
  qemu_coroutine_enter(qemu_coroutine_create(plainLocker, s, 'X'));
  const e = thrown(() => qemu_co_enter_next(s.q, s.m));
  s.log.push(`K:${(e as Error).message}`);
  s.log.push(`K:holder=${s.m.holder === qemu_coroutine_self()}`);
  yield* qemu_coroutine_yield();
}

test('S74: qemu_co_enter_next cannot re-take a contended CoMutex: it throws, and both woken coroutines still run', () => {
  const s = shared();
  start(lockedWaiter, s, 'W');
  s.log.length = 0;
  const k = start(enterNextContended, s, 'K');
  assert.equal(s.log, [
    'X:lock',
    'K:qemu_co_enter_next: the CoMutex is contended; it cannot be re-taken outside a coroutine_fn',
    'K:holder=false', // the unlock inside enter_next handed the mutex to X
    'X:got', // X first (its wake came first), then W re-takes the free mutex
    'W:woken holder=true',
  ]);
  assert.is(s.m.locked, 0);
  qemu_coroutine_enter(k);
});

function* enterNextNotHolding(s: Shared): CoroutineFn<void> {
  s.log.push(`K:${(thrown(() => qemu_co_enter_next(s.q, s.m)) as Error).message}`);
}

function* holdMutex(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  yield* qemu_coroutine_yield();
  qemu_co_mutex_unlock(s.m);
}

test('S74 + "exceptions never drop queued work": qemu_co_enter_next with a lock the caller does not hold throws and leaves the waiter queued', () => {
  const s = shared();
  start(waiter, s, 'W');
  const h = start(holdMutex, s, 'H'); // someone else holds the mutex
  s.log.length = 0;
  start(enterNextNotHolding, s, 'K');
  assert.equal(s.log, ["K:qemu_co_mutex_unlock: Assertion 'mutex->holder == self' failed"]);
  // Nobody was woken, and the waiter is still in the queue.
  assert.is(qemu_co_queue_empty(s.q), false);
  assert.is(qemu_co_queue_next(s.q), true);
  assert.equal(s.log.slice(1), ['W:woken']);
  qemu_coroutine_enter(h);
});

function* wakeWhileHolding(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  qemu_co_queue_next(s.q);
  s.log.push('K:woke W, yields holding the mutex');
  yield* qemu_coroutine_yield();
  s.log.push('K:unlocks');
  qemu_co_mutex_unlock(s.m);
}

test('S72: after the wake, re-taking the lock may wait again (the waiter queues behind the holder)', () => {
  const s = shared();
  start(lockedWaiter, s, 'W');
  s.log.length = 0;
  const k = start(wakeWhileHolding, s, 'K');
  // W ran after K yielded, found the mutex held and queued on it: not woken yet.
  assert.equal(s.log, ['K:woke W, yields holding the mutex']);
  assert.is(s.m.locked, 2);
  qemu_coroutine_enter(k);
  assert.equal(s.log, ['K:woke W, yields holding the mutex', 'K:unlocks', 'W:woken holder=true']);
  assert.is(s.m.locked, 0);
});

test('qemu_co_queue_init empties the queue; its waiters are forgotten, not woken', () => {
  const s = shared();
  start(waiter, s, 'W1');
  start(waiter, s, 'W2');
  assert.is(qemu_co_queue_empty(s.q), false);
  qemu_co_queue_init(s.q);
  assert.is(qemu_co_queue_empty(s.q), true);
  assert.is(qemu_co_queue_next(s.q), false);
  qemu_co_queue_restart_all(s.q);
  assert.equal(s.log, ['W1:wait', 'W2:wait']);
  // The queue works normally afterwards.
  start(waiter, s, 'W3');
  assert.is(qemu_co_queue_next(s.q), true);
  assert.equal(s.log, ['W1:wait', 'W2:wait', 'W3:wait', 'W3:woken']);
});

test('S58: qemu_co_queue_wait outside a coroutine throws "Co-routine is yielding to no one" and queues nothing', () => {
  const q = new CoQueue();
  throwsCo(() => {
    qemu_co_queue_wait(q).next();
  }, 'Co-routine is yielding to no one');
  assert.is(qemu_co_queue_empty(q), true);
});

// --- Errors leave the queue consistent (DESIGN "Exceptions never drop queued work") ---

/** Waits with a lock it does not hold, reports the error, then waits for real (no lock). */
function* waitWithUnheldLock(s: Shared): CoroutineFn<void> {
  try {
    yield* qemu_co_queue_wait(s.q, s.m);
    s.log.push(`${selfName()}:first wait returned`);
  } catch (e) {
    const err = e as Error;
    s.log.push(`${selfName()}:${err instanceof CoroutineError ? 'CoroutineError' : err.name} ${err.message} empty=${qemu_co_queue_empty(s.q)}`);
  }
  yield* qemu_co_queue_wait(s.q);
  s.log.push(`${selfName()}:woken`);
}

test('S72: qemu_co_queue_wait whose unlock throws (lock free, or held by another) never queued the caller; it can wait normally afterwards', () => {
  // The mutex is free: QEMU's 'mutex->locked' assertion.
  const s = shared();
  start(waitWithUnheldLock, s, 'W');
  assert.equal(s.log, ["W:CoroutineError qemu_co_mutex_unlock: Assertion 'mutex->locked' failed empty=true"]);
  assert.is(qemu_co_queue_empty(s.q), false, 'W now waits for real');
  assert.is(qemu_co_queue_next(s.q), true);
  assert.equal(s.log.slice(1), ['W:woken']);
  assert.is(qemu_co_queue_empty(s.q), true);
  assert.is(qemu_co_queue_next(s.q), false);

  // Another coroutine holds it: the 'mutex->holder == self' assertion; the holder keeps it.
  const t = shared();
  const h = start(holdMutex, t, 'H');
  start(waitWithUnheldLock, t, 'W2');
  assert.equal(t.log, ["W2:CoroutineError qemu_co_mutex_unlock: Assertion 'mutex->holder == self' failed empty=true"]);
  assert.is(t.m.holder, h);
  assert.is(qemu_co_queue_next(t.q), true);
  assert.equal(t.log.slice(1), ['W2:woken']);
  assert.is(qemu_co_queue_empty(t.q), true);
  qemu_coroutine_enter(h);
  assert.is(t.m.locked, 0);
});

class WaiterFailure extends Error {}

interface Failing {
  s: Shared;
  fail: string[];
}

/** Waits on the queue; once woken, logs and throws if its name is in `fail`. */
function* failingWaiter(f: Failing): CoroutineFn<void> {
  yield* qemu_co_queue_wait(f.s.q);
  f.s.log.push(`${selfName()}:woken`);
  if (f.fail.includes(selfName())) throw new WaiterFailure(`${selfName()} failed`);
}

test('S73 + "exceptions never drop queued work": restart_all from plain code wakes every waiter even if the first throws, then rethrows its error', () => {
  const f: Failing = { s: shared(), fail: ['A'] };
  start(failingWaiter, f, 'A');
  start(failingWaiter, f, 'B');
  start(failingWaiter, f, 'C');
  const e = thrown(() => qemu_co_queue_restart_all(f.s.q));
  assert.ok(e instanceof WaiterFailure && e.message === 'A failed', String(e));
  assert.equal(f.s.log, ['A:woken', 'B:woken', 'C:woken']);
  assert.is(qemu_co_queue_empty(f.s.q), true);
  assert.is(qemu_co_queue_next(f.s.q), false);
});

test('S73 + "exceptions never drop queued work": restart_all from plain code with several throwing waiters wakes all, then throws an AggregateError of their errors in order', () => {
  const f: Failing = { s: shared(), fail: ['A', 'C'] };
  start(failingWaiter, f, 'A');
  start(failingWaiter, f, 'B');
  start(failingWaiter, f, 'C');
  const e = thrown(() => qemu_co_queue_restart_all(f.s.q));
  assert.instance(e, AggregateError);
  const agg = e as AggregateError;
  assert.is(agg.message, 'qemu_co_queue_restart_all: several coroutines failed');
  assert.equal(
    agg.errors.map((x: unknown) => (x instanceof WaiterFailure ? `WaiterFailure ${x.message}` : String(x))),
    ['WaiterFailure A failed', 'WaiterFailure C failed'],
  );
  assert.equal(f.s.log, ['A:woken', 'B:woken', 'C:woken']);
  assert.is(qemu_co_queue_empty(f.s.q), true);
});

test.run();
