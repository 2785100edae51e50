/**
 * Behaviour of src/coroutine/co-mutex.ts: CoMutex (S75-S80).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AioContext,
  CoMutex,
  Coroutine,
  aio_co_schedule,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_co_mutex_assert_locked,
  qemu_co_mutex_init,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  type CoroutineFn,
} from '../../src/index.ts';
import { assertCoError, thrown, throwsCo } from '../helpers/assert.ts';
import { selfName } from '../helpers/coroutines.ts';

const main = qemu_get_aio_context();

const MSG_LOCKED = "qemu_co_mutex_unlock: Assertion 'mutex->locked' failed";
const MSG_HOLDER = "qemu_co_mutex_unlock: Assertion 'mutex->holder == self' failed";
const MSG_IN_CO = "qemu_co_mutex_unlock: Assertion 'qemu_in_coroutine()' failed";
const MSG_ASSERT =
  "qemu_co_mutex_assert_locked: Assertion 'mutex->locked && mutex->holder == qemu_coroutine_self()' failed";

// ---------------------------------------------------------------------------------------
// /locking/co-mutex (S80)

interface CoMutexTest {
  m: CoMutex;
  locked: boolean;
  done: number;
  violations: number;
}

function* mutexFn(t: CoMutexTest): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(t.m);
  if (t.locked) t.violations++;
  t.locked = true;
  yield* qemu_coroutine_yield();
  t.locked = false;
  qemu_co_mutex_unlock(t.m);
  t.done++;
}

test('S80 /locking/co-mutex: after re-entering the holder once, done == 1 and the waiter already holds the lock', () => {
  const t: CoMutexTest = { m: new CoMutex(), locked: false, done: 0, violations: 0 };
  const c1 = qemu_coroutine_create(mutexFn, t);
  const c2 = qemu_coroutine_create(mutexFn, t);
  qemu_coroutine_enter(c1);
  assert.is(t.locked, true);
  qemu_coroutine_enter(c2); // blocks on the mutex
  assert.is(t.done, 0);
  // c1 unlocks, which queues c2; c2 runs when c1 ends, inside this same enter.
  qemu_coroutine_enter(c1);
  assert.is(t.done, 1);
  assert.is(t.locked, true);
  assert.is(t.m.holder, c2);
  qemu_coroutine_enter(c2);
  assert.is(t.done, 2);
  assert.is(t.locked, false);
  assert.is(t.violations, 0);
  assert.is(t.m.locked, 0);
  assert.is(t.m.holder, null);
});

// ---------------------------------------------------------------------------------------
// fast path, FIFO hand-off, no barging (S76, S77)

interface Shared {
  m: CoMutex;
  log: string[];
}

function* lockLogUnlock(s: Shared): CoroutineFn<void> {
  s.log.push(`${selfName()}:lock`);
  yield* qemu_co_mutex_lock(s.m);
  s.log.push(`${selfName()}:got`);
  qemu_co_mutex_unlock(s.m);
  s.log.push(`${selfName()}:unlocked`);
}

function* holdUntilReentered(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  s.log.push(`${selfName()}:got`);
  yield* qemu_coroutine_yield();
  qemu_co_mutex_unlock(s.m);
  s.log.push(`${selfName()}:unlocked`);
}

test('S76: an uncontended lock is taken without yielding', () => {
  const s: Shared = { m: new CoMutex(), log: [] };
  const co = qemu_coroutine_create(lockLogUnlock, s, 'A');
  qemu_coroutine_enter(co);
  assert.equal(s.log, ['A:lock', 'A:got', 'A:unlocked']);
  assert.is(s.m.locked, 0);
});

test('S77: waiters get the mutex in arrival order (FIFO hand-off), each when the previous holder ends', () => {
  const s: Shared = { m: new CoMutex(), log: [] };
  const h = qemu_coroutine_create(holdUntilReentered, s, 'H');
  qemu_coroutine_enter(h);
  // Arrival order W3, W1, W2 (creation order differs on purpose).
  const w1 = qemu_coroutine_create(lockLogUnlock, s, 'W1');
  const w2 = qemu_coroutine_create(lockLogUnlock, s, 'W2');
  const w3 = qemu_coroutine_create(lockLogUnlock, s, 'W3');
  qemu_coroutine_enter(w3);
  qemu_coroutine_enter(w1);
  qemu_coroutine_enter(w2);
  assert.is(s.m.locked, 4); // holder + three waiters
  qemu_coroutine_enter(h);
  assert.equal(s.log, [
    'H:got',
    'W3:lock',
    'W1:lock',
    'W2:lock',
    'H:unlocked',
    'W3:got',
    'W3:unlocked',
    'W1:got',
    'W1:unlocked',
    'W2:got',
    'W2:unlocked',
  ]);
  assert.is(s.m.locked, 0);
});

interface Barging extends Shared {
  waiter?: Coroutine;
  holderAfterUnlock?: Coroutine | null;
  lockedAfterUnlock?: number;
  assertError?: unknown;
}

function* unlockThenLetNewcomerTry(s: Barging): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  yield* qemu_coroutine_yield();
  qemu_co_mutex_unlock(s.m);
  s.log.push('H:unlocked');
  s.holderAfterUnlock = s.m.holder;
  s.lockedAfterUnlock = s.m.locked;
  s.assertError = thrown(() => qemu_co_mutex_assert_locked(s.m));
  // A newcomer tries to lock before the woken waiter has run: it must queue.
  qemu_coroutine_enter(qemu_coroutine_create(lockLogUnlock, s, 'N'));
  s.log.push('H:ends');
}

test('S77: no barging: between unlock and the waiter running, holder is null, and a newcomer queues behind the waiter', () => {
  const s: Barging = { m: new CoMutex(), log: [] };
  const h = qemu_coroutine_create(unlockThenLetNewcomerTry, s, 'H');
  qemu_coroutine_enter(h);
  s.waiter = qemu_coroutine_create(lockLogUnlock, s, 'W');
  qemu_coroutine_enter(s.waiter);
  qemu_coroutine_enter(h);
  assert.equal(s.log, ['W:lock', 'H:unlocked', 'N:lock', 'H:ends', 'W:got', 'W:unlocked', 'N:got', 'N:unlocked']);
  assert.is(s.holderAfterUnlock, null);
  assert.ok((s.lockedAfterUnlock as number) >= 1, 'locked never drops to 0 during a hand-off');
  assertCoError(s.assertError, MSG_ASSERT);
  assert.is(s.m.locked, 0);
  assert.is(s.m.holder, null);
});

function* unlockFromPlainWaker(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  s.log.push(`${selfName()}:got`);
  yield* qemu_coroutine_yield();
  qemu_co_mutex_unlock(s.m);
  s.log.push(`${selfName()}:unlocked`);
  yield* qemu_coroutine_yield();
  s.log.push(`${selfName()}:resumed`);
}

test('S77: the woken waiter becomes holder when it runs (holder set by the waiter itself)', () => {
  const s: Shared = { m: new CoMutex(), log: [] };
  const h = qemu_coroutine_create(unlockFromPlainWaker, s, 'H');
  const w = qemu_coroutine_create(holdUntilReentered, s, 'W');
  qemu_coroutine_enter(h);
  qemu_coroutine_enter(w);
  assert.is(s.m.holder, h);
  qemu_coroutine_enter(h); // H unlocks and yields: W runs in the same enter
  assert.equal(s.log, ['H:got', 'H:unlocked', 'W:got']);
  assert.is(s.m.holder, w);
  assert.is(s.m.locked, 1);
  qemu_coroutine_enter(w);
  qemu_coroutine_enter(h);
  assert.equal(s.log, ['H:got', 'H:unlocked', 'W:got', 'W:unlocked', 'H:resumed']);
});

test('S77/S69a: a waiter that last ran in another context is scheduled there by the unlock', () => {
  const ctx2 = aio_context_new();
  const s: Shared = { m: new CoMutex(), log: [] };
  const h = qemu_coroutine_create(holdUntilReentered, s, 'H');
  qemu_coroutine_enter(h);
  qemu_aio_coroutine_enter(ctx2, qemu_coroutine_create(lockLogUnlock, s, 'W'));
  qemu_coroutine_enter(h);
  assert.equal(s.log, ['H:got', 'W:lock', 'H:unlocked']);
  assert.is(s.m.locked, 1); // owned by W already
  assert.is(s.m.holder, null);
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(ctx2, false), true);
  assert.equal(s.log, ['H:got', 'W:lock', 'H:unlocked', 'W:got', 'W:unlocked']);
  assert.is(s.m.locked, 0);
  aio_context_unref(ctx2);
});

// ---------------------------------------------------------------------------------------
// misuse (S77, S79)

function* unlockNotHolder(o: { m: CoMutex; errors: unknown[] }): CoroutineFn<void> {
  o.errors.push(thrown(() => qemu_co_mutex_unlock(o.m)));
  o.errors.push(thrown(() => qemu_co_mutex_assert_locked(o.m)));
}

function* holdAndCheck(o: { m: CoMutex; errors: unknown[]; ok?: boolean }): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(o.m);
  qemu_co_mutex_assert_locked(o.m);
  o.ok = true;
  yield* qemu_coroutine_yield();
  qemu_co_mutex_unlock(o.m);
}

test('S77: unlocking a mutex held by another coroutine throws and changes nothing', () => {
  const o: { m: CoMutex; errors: unknown[]; ok?: boolean } = { m: new CoMutex(), errors: [] };
  const h = qemu_coroutine_create(holdAndCheck, o, 'H');
  qemu_coroutine_enter(h);
  assert.is(o.ok, true);
  qemu_coroutine_enter(qemu_coroutine_create(unlockNotHolder, o));
  assert.is(o.errors.length, 2);
  assertCoError(o.errors[0], MSG_HOLDER);
  assertCoError(o.errors[1], MSG_ASSERT);
  // From plain code, too.
  throwsCo(() => qemu_co_mutex_unlock(o.m), MSG_HOLDER);
  throwsCo(() => qemu_co_mutex_assert_locked(o.m), MSG_ASSERT);
  assert.is(o.m.holder, h);
  assert.is(o.m.locked, 1);
  qemu_coroutine_enter(h); // the real holder unlocks fine
  assert.is(o.m.locked, 0);
});

test('S77: unlocking or asserting a free mutex throws', () => {
  const o: { m: CoMutex; errors: unknown[] } = { m: new CoMutex(), errors: [] };
  qemu_coroutine_enter(qemu_coroutine_create(unlockNotHolder, o));
  assertCoError(o.errors[0], MSG_LOCKED);
  assertCoError(o.errors[1], MSG_ASSERT);
  throwsCo(() => qemu_co_mutex_unlock(o.m), MSG_LOCKED);
  throwsCo(() => qemu_co_mutex_assert_locked(o.m), MSG_ASSERT);
  assert.is(o.m.locked, 0);
});

test("S79: outside a coroutine, lock works only uncontended; unlock there throws 'qemu_in_coroutine()'", () => {
  const m = new CoMutex();
  // Uncontended: taken at once (the generator ends on its first step, no yield).
  const step = qemu_co_mutex_lock(m).next();
  assert.is(step.done, true);
  assert.is(m.locked, 1);
  assert.is(m.holder, qemu_coroutine_self());
  qemu_co_mutex_assert_locked(m); // the leader holds it
  throwsCo(() => qemu_co_mutex_unlock(m), MSG_IN_CO);
  assert.is(m.locked, 1);
  // Contended from plain code: it would have to yield.
  const m2 = new CoMutex();
  const o = { m: m2, errors: [] as unknown[] };
  const h = qemu_coroutine_create(holdAndCheck, o);
  qemu_coroutine_enter(h);
  throwsCo(() => {
    qemu_co_mutex_lock(m2).next();
  }, 'Co-routine is yielding to no one');
  assert.is(m2.locked, 1); // no phantom waiter was counted
  qemu_coroutine_enter(h);
  assert.is(m2.locked, 0);
  assert.is(m2.holder, null);
  qemu_co_mutex_init(m);
});

function* relockHeld(s: Shared): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(s.m);
  s.log.push('first lock');
  yield* qemu_co_mutex_lock(s.m);
  s.log.push('second lock');
}

test('S79: CoMutex is not recursive: re-locking a held mutex queues behind yourself and never returns', () => {
  const s: Shared = { m: new CoMutex(), log: [] };
  const co = qemu_coroutine_create(relockHeld, s);
  qemu_coroutine_enter(co);
  assert.equal(s.log, ['first lock']);
  assert.is(s.m.locked, 2);
  assert.is(s.m.holder, co);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['first lock']);
});

test('qemu_co_mutex_init resets a held mutex with waiters to free', () => {
  const s: Shared = { m: new CoMutex(), log: [] };
  qemu_coroutine_enter(qemu_coroutine_create(holdUntilReentered, s, 'H'));
  qemu_coroutine_enter(qemu_coroutine_create(lockLogUnlock, s, 'W'));
  assert.is(s.m.locked, 2);
  qemu_co_mutex_init(s.m);
  assert.is(s.m.locked, 0);
  assert.is(s.m.holder, null);
  assert.is(s.m.waitHead, null);
  assert.is(s.m.waitTail, null);
  qemu_coroutine_enter(qemu_coroutine_create(lockLogUnlock, s, 'N'));
  assert.equal(s.log, ['H:got', 'W:lock', 'N:lock', 'N:got', 'N:unlocked']);
});

// ---------------------------------------------------------------------------------------
// lockcnt-style stress: counter increments under the mutex with yields in the critical section

interface Stress {
  m: CoMutex;
  ctx: AioContext;
  counter: number;
  inside: number;
  maxInside: number;
  finished: number;
  iterations: number;
  order: string[];
}

function* yieldToLoop(ctx: AioContext): CoroutineFn<void> {
  aio_co_schedule(ctx, qemu_coroutine_self());
  yield* qemu_coroutine_yield();
}

function* stressWorker(s: Stress): CoroutineFn<void> {
  const ctx = qemu_get_current_aio_context();
  for (let i = 0; i < s.iterations; i++) {
    yield* qemu_co_mutex_lock(s.m);
    qemu_co_mutex_assert_locked(s.m);
    s.inside++;
    if (s.inside > s.maxInside) s.maxInside = s.inside;
    const seen = s.counter;
    yield* yieldToLoop(ctx); // others run here and must queue on the mutex
    if (i % 3 === 0) yield* yieldToLoop(ctx);
    s.counter = seen + 1;
    s.inside--;
    if (i === 0) s.order.push(selfName());
    qemu_co_mutex_unlock(s.m);
    if (i % 2 === 1) yield* yieldToLoop(ctx);
  }
  s.finished++;
}

test('lockcnt-style stress: 8 coroutines x 250 read-yield-write increments under the mutex give the exact count', () => {
  const ctx = aio_context_new();
  const s: Stress = {
    m: new CoMutex(),
    ctx,
    counter: 0,
    inside: 0,
    maxInside: 0,
    finished: 0,
    iterations: 250,
    order: [],
  };
  const n = 8;
  for (let i = 0; i < n; i++) qemu_aio_coroutine_enter(ctx, qemu_coroutine_create(stressWorker, s, `w${i}`));
  let polls = 0;
  while (s.finished < n && polls < 100_000) {
    aio_poll(ctx, false);
    polls++;
  }
  assert.is(s.finished, n);
  assert.is(s.counter, n * s.iterations);
  assert.is(s.maxInside, 1);
  assert.is(s.inside, 0);
  // First critical sections complete in arrival order (FIFO).
  assert.equal(s.order, ['w0', 'w1', 'w2', 'w3', 'w4', 'w5', 'w6', 'w7']);
  assert.is(s.m.locked, 0);
  assert.is(s.m.holder, null);
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
});

test.run();
