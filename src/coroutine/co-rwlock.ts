/**
 * CoRwlock, QEMU 6.0's ticket design (S82): `owners` is the reader count, or -1 for a
 * writer, and waiters queue as FIFO tickets. QEMU 5.2's design can hang on downgrade, so
 * aioco follows 6.0 (DESIGN.md). QEMU's internal CoMutex only guards against other threads
 * and is never held across a yield, so on one JS thread it is left out.
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

interface CoRwTicket {
  read: boolean;
  co: Coroutine;
}

/** QEMU's `CoRwlock`. `new CoRwlock()` is free. */
export class CoRwlock {
  /** @internal >0 readers, -1 one writer, 0 free. */
  owners = 0;
  /** @internal FIFO of waiters. */
  tickets: CoRwTicket[] = [];
}

/** Resets `l` to free with no waiters (QEMU: `qemu_co_rwlock_init`). */
export function qemu_co_rwlock_init(l: CoRwlock): void {
  l.owners = 0;
  l.tickets = [];
}

/** Wakes the head ticket if it is compatible with the current owners. */
function maybeWakeOne(l: CoRwlock): void {
  const t = l.tickets[0];
  if (t === undefined) return;
  if (t.read) {
    if (l.owners < 0) return;
    l.owners++;
  } else {
    if (l.owners !== 0) return;
    l.owners = -1;
  }
  l.tickets.shift();
  coroutineWake(t.co);
}

function mustYield(): void {
  if (!qemu_in_coroutine()) throw new CoroutineError('Co-routine is yielding to no one');
}

/**
 * Takes a read hold. QEMU: `qemu_co_rwlock_rdlock`. Surprise: a new reader queues behind
 * any queued ticket (even when readers hold the lock), so writers are not starved; a woken
 * reader wakes the next reader in line.
 */
export function* qemu_co_rwlock_rdlock(l: CoRwlock): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  if (l.owners === 0 || (l.owners > 0 && l.tickets.length === 0)) {
    l.owners++;
  } else {
    mustYield();
    l.tickets.push({ read: true, co: self });
    yield* qemu_coroutine_yield();
    maybeWakeOne(l);
  }
  self.locks_held++;
}

/** Takes the write hold, waiting until there are no owners. QEMU: `qemu_co_rwlock_wrlock`. */
export function* qemu_co_rwlock_wrlock(l: CoRwlock): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  if (l.owners === 0) {
    l.owners = -1;
  } else {
    mustYield();
    l.tickets.push({ read: false, co: self });
    yield* qemu_coroutine_yield();
  }
  self.locks_held++;
}

/**
 * Turns the caller's read hold into the write hold. QEMU: `qemu_co_rwlock_upgrade`.
 * Surprise: immediate only for the sole reader with nobody queued; otherwise it drops
 * its read hold and queues as a writer behind everyone already waiting.
 */
export function* qemu_co_rwlock_upgrade(l: CoRwlock): CoroutineFn<void> {
  if (l.owners <= 0) throw new CoroutineError("qemu_co_rwlock_upgrade: Assertion 'lock->owners > 0' failed");
  if (l.owners === 1 && l.tickets.length === 0) {
    l.owners = -1;
    return;
  }
  mustYield();
  l.owners--;
  l.tickets.push({ read: false, co: qemu_coroutine_self() });
  maybeWakeOne(l);
  yield* qemu_coroutine_yield();
}

/** Releases a read or write hold and wakes the next compatible waiter. QEMU: `qemu_co_rwlock_unlock`. */
export function qemu_co_rwlock_unlock(l: CoRwlock): void {
  if (!qemu_in_coroutine()) throw new CoroutineError("qemu_co_rwlock_unlock: Assertion 'qemu_in_coroutine()' failed");
  if (l.owners > 0) l.owners--;
  else if (l.owners === -1) l.owners = 0;
  else throw new CoroutineError("qemu_co_rwlock_unlock: Assertion 'lock->owners == -1' failed");
  qemu_coroutine_self().locks_held--;
  maybeWakeOne(l);
}

/** Turns the write hold into a read hold and lets queued readers in. QEMU: `qemu_co_rwlock_downgrade`. */
export function qemu_co_rwlock_downgrade(l: CoRwlock): void {
  if (l.owners !== -1) throw new CoroutineError("qemu_co_rwlock_downgrade: Assertion 'lock->owners == -1' failed");
  l.owners = 1;
  maybeWakeOne(l);
}
