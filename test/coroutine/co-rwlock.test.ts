/**
 * Behaviour of src/coroutine/co-rwlock.ts: CoRwlock with QEMU 6.0's ticket semantics (S82).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  CoRwlock,
  CoroutineError,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_co_rwlock_downgrade,
  qemu_co_rwlock_init,
  qemu_co_rwlock_rdlock,
  qemu_co_rwlock_unlock,
  qemu_co_rwlock_upgrade,
  qemu_co_rwlock_wrlock,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  type CoroutineFn,
} from '../../src/index.ts';
import { thrown, throwsCo } from '../helpers/assert.ts';
import { selfName, start } from '../helpers/coroutines.ts';

const main = qemu_get_aio_context();

interface Shared {
  l: CoRwlock;
  log: string[];
  done: Set<string>;
}

function shared(): Shared {
  return { l: new CoRwlock(), log: [], done: new Set() };
}

// ---------------------------------------------------------------------------------------
// /locking/co-rwlock/upgrade and /locking/co-rwlock/downgrade (S82), ported

function* rdlockYieldUpgrade(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_rdlock(s.l);
  yield* qemu_coroutine_yield();
  yield* qemu_co_rwlock_upgrade(s.l);
  s.log.push(`${selfName()}:upgraded owners=${s.l.owners}`);
  qemu_co_rwlock_unlock(s.l);
  s.done.add(selfName());
}

function* wrlockYield(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_wrlock(s.l);
  s.log.push(`${selfName()}:wrlocked`);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(s.l);
  s.done.add(selfName());
}

test('S82 /locking/co-rwlock/upgrade: the sole reader goes back in line behind a queued writer when it upgrades', () => {
  const s = shared();
  const c1 = start(rdlockYieldUpgrade, s, 'c1'); // reads, yields
  const c2 = start(wrlockYield, s, 'c2'); // queues as writer
  assert.equal(s.log, []);
  qemu_coroutine_enter(c1); // upgrade: must not jump the queued writer
  assert.is(s.done.has('c1'), false);
  assert.equal(s.log, ['c2:wrlocked']); // the writer got in first
  qemu_coroutine_enter(c2); // writer unlocks: c1 gets the write lock
  assert.is(s.done.has('c1'), true);
  assert.is(s.done.has('c2'), true);
  assert.equal(s.log, ['c2:wrlocked', 'c1:upgraded owners=-1']);
  assert.is(s.l.owners, 0);
  assert.equal(s.l.tickets, []);
});

function* rdlockYieldUnlockYield(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_rdlock(s.l);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(s.l);
  yield* qemu_coroutine_yield();
  s.done.add(selfName());
}

function* wrlockDowngrade(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_wrlock(s.l);
  s.log.push(`${selfName()}:wrlocked`);
  qemu_co_rwlock_downgrade(s.l);
  s.log.push(`${selfName()}:downgraded owners=${s.l.owners}`);
  qemu_co_rwlock_unlock(s.l);
  s.done.add(selfName());
}

function* rdlockUnlock(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_rdlock(s.l);
  s.log.push(`${selfName()}:rdlocked owners=${s.l.owners}`);
  qemu_co_rwlock_unlock(s.l);
  s.done.add(selfName());
}

function* wrlockUnlock(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_wrlock(s.l);
  s.log.push(`${selfName()}:wrlocked owners=${s.l.owners}`);
  qemu_co_rwlock_unlock(s.l);
  s.done.add(selfName());
}

test('S82 /locking/co-rwlock/downgrade: reader, writer, reader, writer queued; downgrade does not hang anyone', () => {
  const s = shared();
  const c1 = start(rdlockYieldUnlockYield, s, 'c1');
  start(wrlockDowngrade, s, 'c2');
  start(rdlockUnlock, s, 'c3');
  start(wrlockUnlock, s, 'c4');
  assert.equal(s.log, []);
  assert.is(s.l.tickets.length, 3);
  qemu_coroutine_enter(c1); // c1 unlocks and yields: c2, c3 and c4 all finish
  // The downgrade grants c3's read ticket at once (owners 2); c3 runs once c2 has ended.
  assert.equal(s.log, ['c2:wrlocked', 'c2:downgraded owners=2', 'c3:rdlocked owners=1', 'c4:wrlocked owners=-1']);
  assert.ok(s.done.has('c2') && s.done.has('c3') && s.done.has('c4'));
  assert.is(s.done.has('c1'), false);
  qemu_coroutine_enter(c1);
  assert.is(s.done.has('c1'), true);
  assert.is(s.l.owners, 0);
  assert.equal(s.l.tickets, []);
});

// ---------------------------------------------------------------------------------------
// readers, writers and the ticket queue

function* rdlockHold(s: Shared): CoroutineFn<void> {
  s.log.push(`${selfName()}:rdlock`);
  yield* qemu_co_rwlock_rdlock(s.l);
  s.log.push(`${selfName()}:rd owners=${s.l.owners}`);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(s.l);
  s.log.push(`${selfName()}:unlocked`);
}

function* wrlockHold(s: Shared): CoroutineFn<void> {
  s.log.push(`${selfName()}:wrlock`);
  yield* qemu_co_rwlock_wrlock(s.l);
  s.log.push(`${selfName()}:wr owners=${s.l.owners}`);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(s.l);
  s.log.push(`${selfName()}:unlocked`);
}

test('S82: readers share the lock at once while nothing is queued', () => {
  const s = shared();
  const r1 = start(rdlockHold, s, 'R1');
  const r2 = start(rdlockHold, s, 'R2');
  const r3 = start(rdlockHold, s, 'R3');
  assert.equal(s.log, ['R1:rdlock', 'R1:rd owners=1', 'R2:rdlock', 'R2:rd owners=2', 'R3:rdlock', 'R3:rd owners=3']);
  for (const r of [r1, r2, r3]) qemu_coroutine_enter(r);
  assert.is(s.l.owners, 0);
});

test('S82: a writer waits for every reader; a reader arriving behind a queued writer queues even though readers hold the lock', () => {
  const s = shared();
  const r1 = start(rdlockHold, s, 'R1');
  const r2 = start(rdlockHold, s, 'R2');
  const w = start(wrlockHold, s, 'W');
  const r3 = start(rdlockHold, s, 'R3');
  assert.equal(s.log, ['R1:rdlock', 'R1:rd owners=1', 'R2:rdlock', 'R2:rd owners=2', 'W:wrlock', 'R3:rdlock']);
  assert.is(s.l.owners, 2);
  assert.is(s.l.tickets.length, 2);
  s.log.length = 0;
  qemu_coroutine_enter(r1);
  assert.equal(s.log, ['R1:unlocked']); // one reader left: the writer still waits
  qemu_coroutine_enter(r2);
  assert.equal(s.log, ['R1:unlocked', 'R2:unlocked', 'W:wr owners=-1']);
  qemu_coroutine_enter(w);
  assert.equal(s.log, ['R1:unlocked', 'R2:unlocked', 'W:wr owners=-1', 'W:unlocked', 'R3:rd owners=1']);
  qemu_coroutine_enter(r3);
  assert.is(s.l.owners, 0);
  assert.equal(s.l.tickets, []);
});

test('S82: tickets are served FIFO; a woken reader wakes the next reader in line, and stops at a writer', () => {
  const s = shared();
  const w1 = start(wrlockHold, s, 'W1');
  const r1 = start(rdlockHold, s, 'R1');
  const r2 = start(rdlockHold, s, 'R2');
  const r3 = start(rdlockHold, s, 'R3');
  const w2 = start(wrlockHold, s, 'W2');
  const r4 = start(rdlockHold, s, 'R4');
  s.log.length = 0;
  qemu_coroutine_enter(w1); // W1 unlocks: R1 wakes, which wakes R2, which wakes R3; W2 stops the chain
  // Each woken reader grants the next reader's ticket before it goes on (owners grows by one).
  assert.equal(s.log, ['W1:unlocked', 'R1:rd owners=2', 'R2:rd owners=3', 'R3:rd owners=3']);
  assert.is(s.l.owners, 3);
  assert.is(s.l.tickets.length, 2);
  s.log.length = 0;
  qemu_coroutine_enter(r2);
  qemu_coroutine_enter(r1);
  assert.equal(s.log, ['R2:unlocked', 'R1:unlocked']);
  qemu_coroutine_enter(r3);
  assert.equal(s.log, ['R2:unlocked', 'R1:unlocked', 'R3:unlocked', 'W2:wr owners=-1']);
  qemu_coroutine_enter(w2);
  assert.equal(s.log.slice(4), ['W2:unlocked', 'R4:rd owners=1']);
  qemu_coroutine_enter(r4);
  assert.is(s.l.owners, 0);
});

function* upgradeAndHold(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_rdlock(s.l);
  s.log.push(`${selfName()}:rd`);
  yield* qemu_coroutine_yield();
  s.log.push(`${selfName()}:upgrade`);
  yield* qemu_co_rwlock_upgrade(s.l);
  s.log.push(`${selfName()}:upgraded owners=${s.l.owners}`);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(s.l);
  s.log.push(`${selfName()}:unlocked`);
}

test('S82: upgrade is immediate for the sole reader with no tickets; readers arriving then queue', () => {
  const s = shared();
  const u = start(upgradeAndHold, s, 'U');
  qemu_coroutine_enter(u); // upgrade: nothing queued, sole reader
  assert.equal(s.log, ['U:rd', 'U:upgrade', 'U:upgraded owners=-1']);
  const r = start(rdlockHold, s, 'R');
  assert.equal(s.log.slice(3), ['R:rdlock']);
  qemu_coroutine_enter(u);
  assert.equal(s.log.slice(3), ['R:rdlock', 'U:unlocked', 'R:rd owners=1']);
  qemu_coroutine_enter(r);
  assert.is(s.l.owners, 0);
});

test('S82: upgrade with another reader present drops the read hold and waits until that reader leaves', () => {
  const s = shared();
  const u = start(upgradeAndHold, s, 'U');
  const r = start(rdlockHold, s, 'R');
  assert.is(s.l.owners, 2);
  qemu_coroutine_enter(u); // queues as a writer; its read hold is given up
  assert.equal(s.log, ['U:rd', 'R:rdlock', 'R:rd owners=2', 'U:upgrade']);
  assert.is(s.l.owners, 1);
  assert.is(s.l.tickets.length, 1);
  qemu_coroutine_enter(r);
  assert.equal(s.log.slice(4), ['R:unlocked', 'U:upgraded owners=-1']);
  qemu_coroutine_enter(u);
  assert.is(s.l.owners, 0);
});

function* downgradeAndHold(s: Shared): CoroutineFn<void> {
  yield* qemu_co_rwlock_wrlock(s.l);
  s.log.push(`${selfName()}:wr`);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_downgrade(s.l);
  s.log.push(`${selfName()}:downgraded`);
  yield* qemu_coroutine_yield();
  s.log.push(`${selfName()}:owners=${s.l.owners}`);
  qemu_co_rwlock_unlock(s.l);
  s.log.push(`${selfName()}:unlocked`);
}

test('S82: downgrade lets the queued readers in (chained) while the downgrader keeps reading; a writer behind them waits', () => {
  const s = shared();
  const d = start(downgradeAndHold, s, 'D');
  const r1 = start(rdlockHold, s, 'R1');
  const r2 = start(rdlockHold, s, 'R2');
  const w = start(wrlockHold, s, 'W');
  s.log.length = 0;
  qemu_coroutine_enter(d);
  assert.equal(s.log, ['D:downgraded', 'R1:rd owners=3', 'R2:rd owners=3']);
  assert.is(s.l.owners, 3);
  assert.is(s.l.tickets.length, 1);
  s.log.length = 0;
  qemu_coroutine_enter(r1);
  qemu_coroutine_enter(d);
  qemu_coroutine_enter(r2);
  assert.equal(s.log, ['R1:unlocked', 'D:owners=2', 'D:unlocked', 'R2:unlocked', 'W:wr owners=-1']);
  qemu_coroutine_enter(w);
  assert.is(s.l.owners, 0);
});

test('S82: a woken waiter that last ran in another context is scheduled there', () => {
  const ctx2 = aio_context_new();
  const s = shared();
  const w = start(wrlockHold, s, 'W');
  qemu_aio_coroutine_enter(ctx2, qemu_coroutine_create(rdlockUnlock, s, 'R'));
  qemu_coroutine_enter(w);
  assert.equal(s.log, ['W:wrlock', 'W:wr owners=-1', 'W:unlocked']);
  assert.is(s.l.owners, 1); // the ticket was granted to R already
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(ctx2, false), true);
  assert.equal(s.log.slice(3), ['R:rdlocked owners=1']);
  assert.is(s.l.owners, 0);
  aio_context_unref(ctx2);
});

// ---------------------------------------------------------------------------------------
// misuse

function* misuse(o: { l: CoRwlock; errors: unknown[] }): CoroutineFn<void> {
  o.errors.push(thrown(() => qemu_co_rwlock_unlock(o.l)));
  o.errors.push(thrown(() => qemu_co_rwlock_downgrade(o.l)));
  try {
    yield* qemu_co_rwlock_upgrade(o.l);
  } catch (e) {
    o.errors.push(e);
  }
}

function* readHolder(o: { l: CoRwlock }): CoroutineFn<void> {
  yield* qemu_co_rwlock_rdlock(o.l);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(o.l);
}

function* writeHolder(o: { l: CoRwlock }): CoroutineFn<void> {
  yield* qemu_co_rwlock_wrlock(o.l);
  yield* qemu_coroutine_yield();
  qemu_co_rwlock_unlock(o.l);
}

test('unlock, downgrade and upgrade of a lock in the wrong state throw QEMU\'s assertion messages', () => {
  const o = { l: new CoRwlock(), errors: [] as unknown[] };
  qemu_coroutine_enter(qemu_coroutine_create(misuse, o));
  const msgs = o.errors.map((e) => (e instanceof CoroutineError ? e.message : `not a CoroutineError: ${String(e)}`));
  assert.equal(msgs, [
    "qemu_co_rwlock_unlock: Assertion 'lock->owners == -1' failed",
    "qemu_co_rwlock_downgrade: Assertion 'lock->owners == -1' failed",
    "qemu_co_rwlock_upgrade: Assertion 'lock->owners > 0' failed",
  ]);
  assert.is(o.l.owners, 0);
  // Upgrading while a writer holds it; downgrading while a reader holds it.
  const w = qemu_coroutine_create(writeHolder, o);
  qemu_coroutine_enter(w);
  const o2 = { l: o.l, errors: [] as unknown[] };
  qemu_coroutine_enter(qemu_coroutine_create(upgradeOnly, o2));
  qemu_coroutine_enter(w);
  const r = qemu_coroutine_create(readHolder, o);
  qemu_coroutine_enter(r);
  qemu_coroutine_enter(qemu_coroutine_create(downgradeOnly, o2));
  qemu_coroutine_enter(r);
  const msgs2 = o2.errors.map((e) => (e instanceof CoroutineError ? e.message : `not a CoroutineError: ${String(e)}`));
  assert.equal(msgs2, [
    "qemu_co_rwlock_upgrade: Assertion 'lock->owners > 0' failed",
    "qemu_co_rwlock_downgrade: Assertion 'lock->owners == -1' failed",
  ]);
  assert.is(o.l.owners, 0);
});

function* upgradeOnly(o: { l: CoRwlock; errors: unknown[] }): CoroutineFn<void> {
  try {
    yield* qemu_co_rwlock_upgrade(o.l);
  } catch (e) {
    o.errors.push(e);
  }
}

function* downgradeOnly(o: { l: CoRwlock; errors: unknown[] }): CoroutineFn<void> {
  o.errors.push(thrown(() => qemu_co_rwlock_downgrade(o.l)));
}

test("qemu_co_rwlock_unlock outside a coroutine throws 'qemu_in_coroutine()'", () => {
  const o = { l: new CoRwlock() };
  const r = qemu_coroutine_create(readHolder, o);
  qemu_coroutine_enter(r);
  throwsCo(() => qemu_co_rwlock_unlock(o.l), "qemu_co_rwlock_unlock: Assertion 'qemu_in_coroutine()' failed");
  assert.is(o.l.owners, 1);
  qemu_coroutine_enter(r);
  assert.is(o.l.owners, 0);
});

test('outside a coroutine, rdlock/wrlock/upgrade that would have to wait throw "Co-routine is yielding to no one" and queue nothing', () => {
  const o = { l: new CoRwlock() };
  const w = qemu_coroutine_create(writeHolder, o);
  qemu_coroutine_enter(w);
  throwsCo(() => {
    qemu_co_rwlock_rdlock(o.l).next();
  }, 'Co-routine is yielding to no one');
  throwsCo(() => {
    qemu_co_rwlock_wrlock(o.l).next();
  }, 'Co-routine is yielding to no one');
  assert.equal(o.l.tickets, []);
  qemu_coroutine_enter(w);
  // Two readers: an upgrade would have to wait.
  const r1 = qemu_coroutine_create(readHolder, o);
  const r2 = qemu_coroutine_create(readHolder, o);
  qemu_coroutine_enter(r1);
  qemu_coroutine_enter(r2);
  throwsCo(() => {
    qemu_co_rwlock_upgrade(o.l).next();
  }, 'Co-routine is yielding to no one');
  assert.is(o.l.owners, 2);
  assert.equal(o.l.tickets, []);
  qemu_coroutine_enter(r1);
  qemu_coroutine_enter(r2);
  assert.is(o.l.owners, 0);
});

test('qemu_co_rwlock_init resets a held lock with waiters to free', () => {
  const s = shared();
  start(wrlockHold, s, 'W');
  start(rdlockHold, s, 'R');
  assert.is(s.l.owners, -1);
  assert.is(s.l.tickets.length, 1);
  qemu_co_rwlock_init(s.l);
  assert.is(s.l.owners, 0);
  assert.equal(s.l.tickets, []);
  const r = start(rdlockHold, s, 'R2');
  assert.equal(s.log.slice(-1), ['R2:rd owners=1']);
  qemu_coroutine_enter(r);
});

function* endHoldingWrlock(l: CoRwlock): CoroutineFn<void> {
  yield* qemu_co_rwlock_wrlock(l);
}

test('S79: ending while holding the write lock makes the enter throw the locks_held assertion', () => {
  throwsCo(
    () => qemu_coroutine_enter(qemu_coroutine_create(endHoldingWrlock, new CoRwlock(), 'writer')),
    "qemu_aio_coroutine_enter: Assertion '!to->locks_held' failed (co-routine 'writer' terminated holding 1 lock(s))",
  );
});

test.run();
