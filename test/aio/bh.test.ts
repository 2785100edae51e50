// Bottom halves (src/aio/bh.ts): the intent of QEMU's /aio/bh/* tests plus rules S7-S17
// of reference/qemu-aio-semantics.md and DESIGN.md's "Exceptions never drop queued work".
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_bh_new,
  aio_bh_poll,
  aio_bh_schedule_oneshot,
  aio_compute_timeout,
  aio_context_new,
  aio_notify_accept,
  aio_poll,
  qemu_bh_cancel,
  qemu_bh_delete,
  qemu_bh_schedule,
  qemu_bh_schedule_idle,
  qemu_clock_get_ns,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  QEMU_CLOCK_REALTIME,
  type AioContext,
  type QEMUBH,
} from '../../src/index.ts';
import { assertNotNotified, thrown } from '../helpers/assert.ts';
import { drain } from '../helpers/aio.ts';

/** QEMU's BHTestData: a BH that reschedules itself until it has run `max` times. */
interface BHData {
  bh: QEMUBH | null;
  n: number;
  max: number;
}
function bh_test_cb(d: BHData): void {
  if (++d.n < d.max) qemu_bh_schedule(d.bh as QEMUBH);
}
/** Like bh_test_cb, but deletes its BH (from its own callback) on the last run. */
function bh_delete_cb(d: BHData): void {
  if (++d.n < d.max) {
    qemu_bh_schedule(d.bh as QEMUBH);
  } else {
    qemu_bh_delete(d.bh as QEMUBH);
    d.bh = null;
  }
}

test('S7 aio_bh_new queues nothing and notifies nobody', () => {
  const ctx = aio_context_new();
  let n = 0;
  aio_bh_new(ctx, () => n++);
  assert.is(aio_compute_timeout(ctx), -1);
  assert.is(aio_bh_poll(ctx), 0);
  assert.is(n, 0);
  // No notification: a blocking poll has nothing that could ever end it.
  assertNotNotified(ctx);
  assert.is(aio_poll(ctx, false), false);
  assert.is(n, 0);
});

test('S8 /aio/bh/schedule: a blocking aio_poll runs a scheduled BH once and returns true', () => {
  const ctx = aio_context_new();
  const d: BHData = { bh: null, n: 0, max: 0 };
  d.bh = aio_bh_new(ctx, bh_test_cb, d);
  qemu_bh_schedule(d.bh);
  assert.is(d.n, 0);
  assert.is(aio_poll(ctx, true), true);
  assert.is(d.n, 1);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 1);
  qemu_bh_delete(d.bh);
  drain(ctx);
});

test('S8 scheduling an already pending BH runs it once, but every schedule notifies', () => {
  const ctx = aio_context_new();
  const calls: string[] = [];
  const bh = aio_bh_new(ctx, (tag: string) => calls.push(tag), 'x');
  qemu_bh_schedule(bh);
  qemu_bh_schedule(bh);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['x']);
  assert.is(aio_poll(ctx, false), false);

  // The second schedule of a pending BH still notifies (S8).
  qemu_bh_schedule(bh);
  aio_notify_accept(ctx);
  qemu_bh_schedule(bh);
  assert.is(aio_bh_poll(ctx), 1); // runs the BH without consuming the notification
  assert.equal(calls, ['x', 'x']);
  assert.is(aio_poll(ctx, true), false); // woken by the stale notification, nothing ran
  assertNotNotified(ctx);
  qemu_bh_delete(bh);
  drain(ctx);
});

test('S12 /aio/bh/schedule10: each aio_poll advances a self-rescheduling BH by exactly one', () => {
  const ctx = aio_context_new();
  const d: BHData = { bh: null, n: 0, max: 10 };
  d.bh = aio_bh_new(ctx, bh_test_cb, d);
  qemu_bh_schedule(d.bh);
  assert.is(d.n, 0);
  assert.is(aio_poll(ctx, false), true);
  assert.is(d.n, 1);
  assert.is(aio_poll(ctx, true), true);
  assert.is(d.n, 2);
  const seen: number[] = [];
  for (let i = 0; i < 20 && d.n < 10; i++) {
    assert.is(aio_poll(ctx, true), true);
    seen.push(d.n);
  }
  assert.equal(seen, [3, 4, 5, 6, 7, 8, 9, 10]);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 10);
  qemu_bh_delete(d.bh);
  drain(ctx);
});

test('S13 BHs scheduled before one poll run newest first (LIFO)', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => order.push('B'));
  const c = aio_bh_new(ctx, () => order.push('C'));
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  qemu_bh_schedule(c);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['C', 'B', 'A']);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(order, ['C', 'B', 'A']);
});

test('S12 snapshot: a BH scheduled during aio_bh_poll runs in the next poll, not this one', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  let timeoutInside = -2;
  const b = aio_bh_new(ctx, () => order.push('B'));
  const a = aio_bh_new(ctx, () => {
    order.push('A');
    qemu_bh_schedule(b);
    aio_bh_schedule_oneshot(ctx, () => order.push('O'));
    timeoutInside = aio_compute_timeout(ctx);
  });
  qemu_bh_schedule(a);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['A']);
  assert.is(timeoutInside, 0); // S17: the newly scheduled BHs make the timeout 0
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['A', 'O', 'B']); // LIFO among the BHs scheduled by A
  assert.is(aio_poll(ctx, false), false);
});

test('S8/S12 a BH rescheduled while still queued in the running slice runs once, in this poll', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => {
    order.push('B');
    qemu_bh_schedule(a); // A is still pending in this slice: no second enqueue
  });
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['B', 'A']);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(order, ['B', 'A']);
});

test('S9/S10 cancelling or deleting a BH still queued in the running slice skips its callback', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const a = aio_bh_new(ctx, () => order.push('A'));
  const c = aio_bh_new(ctx, () => order.push('C'));
  const b = aio_bh_new(ctx, () => {
    order.push('B');
    qemu_bh_cancel(a);
    qemu_bh_delete(c);
  });
  qemu_bh_schedule(a);
  qemu_bh_schedule(c);
  qemu_bh_schedule(b);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['B']);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(order, ['B']);
  qemu_bh_schedule(c); // deleted: scheduling again does nothing
  assert.is(aio_compute_timeout(ctx), -1);
  qemu_bh_schedule(a); // only cancelled: it can run again
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['B', 'A']);
});

test('S14 a nested aio_poll inside a BH first drains the rest of the parent slice', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  let nestedRet: boolean | null = null;
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => order.push('B'));
  const d = aio_bh_new(ctx, () => order.push('D'));
  const c = aio_bh_new(ctx, () => {
    order.push('C:start');
    qemu_bh_schedule(d);
    nestedRet = aio_poll(ctx, false);
    order.push('C:end');
  });
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  qemu_bh_schedule(c);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['C:start', 'B', 'A', 'D', 'C:end']);
  assert.is(nestedRet, true);
  // Each BH ran once: nothing is left for the next poll.
  assert.is(aio_poll(ctx, false), false);
  assert.equal(order, ['C:start', 'B', 'A', 'D', 'C:end']);
});

test('S9 /aio/bh/cancel: a cancelled BH does not run, and cancel is silent', () => {
  const ctx = aio_context_new();
  const d: BHData = { bh: null, n: 0, max: 0 };
  d.bh = aio_bh_new(ctx, bh_test_cb, d);
  qemu_bh_schedule(d.bh);
  assert.is(d.n, 0);
  qemu_bh_cancel(d.bh);
  assert.is(d.n, 0);
  assert.is(aio_compute_timeout(ctx), -1);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 0);

  // Silent: cancel does not notify (and a cancelled BH is no work to wait for).
  qemu_bh_schedule(d.bh);
  aio_notify_accept(ctx);
  qemu_bh_cancel(d.bh);
  assertNotNotified(ctx);
  assert.is(aio_bh_poll(ctx), 0); // the cancelled BH is dropped without running
  assert.is(d.n, 0);
  qemu_bh_delete(d.bh);
  drain(ctx);
});

test('S9 a cancelled BH rescheduled before the poll runs in its original list position', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => order.push('B'));
  const c = aio_bh_new(ctx, () => order.push('C'));
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  qemu_bh_schedule(c);
  qemu_bh_cancel(b);
  qemu_bh_schedule(b); // would be first (newest) if it had been re-queued
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['C', 'B', 'A']);
});

test('S10 /aio/bh/delete: a scheduled then deleted BH never runs; delete notifies once', () => {
  const ctx = aio_context_new();
  const d: BHData = { bh: null, n: 0, max: 0 };
  d.bh = aio_bh_new(ctx, bh_test_cb, d);
  qemu_bh_schedule(d.bh);
  assert.is(d.n, 0);
  qemu_bh_delete(d.bh);
  assert.is(d.n, 0);
  assert.is(aio_compute_timeout(ctx), -1); // a deleted BH is not work
  assert.is(aio_poll(ctx, false), false); // freeing it is not progress
  assert.is(d.n, 0);
  qemu_bh_schedule(d.bh); // no effect after delete
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 0);

  // Deleting a BH that was never scheduled still notifies (the GSource "true once" of S10).
  const idle = aio_bh_new(ctx, () => assert.unreachable('deleted BH ran'));
  qemu_bh_delete(idle);
  assert.is(aio_poll(ctx, true), false); // returns at once, woken by the delete's notify
  assertNotNotified(ctx); // only once
});

test('S10 /aio/bh/callback-delete/one: a BH may delete itself from its own callback', () => {
  const ctx = aio_context_new();
  const d: BHData = { bh: null, n: 0, max: 1 };
  d.bh = aio_bh_new(ctx, bh_delete_cb, d);
  qemu_bh_schedule(d.bh);
  assert.is(d.n, 0);
  for (let i = 0; i < 10 && d.n < d.max; i++) aio_poll(ctx, true);
  assert.is(d.n, 1);
  assert.is(d.bh, null);
  // The delete inside the callback came after this poll accepted notifications: the next
  // blocking poll is woken once by it and finds nothing to run.
  assert.is(aio_poll(ctx, true), false);
  assertNotNotified(ctx);
  assert.is(aio_poll(ctx, false), false);
});

test('S10/S13 /aio/bh/callback-delete/many: exact run order of four self-deleting BHs', () => {
  const ctx = aio_context_new();
  const trace: number[] = [];
  const datas: BHData[] = [1, 3, 2, 4].map((max) => ({ bh: null, n: 0, max }));
  datas.forEach((d, i) => {
    d.bh = aio_bh_new(ctx, (x: BHData) => {
      trace.push(i + 1);
      bh_delete_cb(x);
    }, d);
  });
  for (const d of datas) qemu_bh_schedule(d.bh as QEMUBH);
  assert.equal(datas.map((d) => d.n), [0, 0, 0, 0]);

  const polls: number[][] = [];
  assert.is(aio_poll(ctx, false), true);
  polls.push(trace.splice(0));
  assert.equal(datas.map((d) => d.n), [1, 1, 1, 1]);
  assert.is(datas[0]?.bh, null);
  for (let i = 0; i < 10 && datas.some((d) => d.n < d.max); i++) {
    assert.is(aio_poll(ctx, true), true);
    polls.push(trace.splice(0));
  }
  // LIFO per poll; a BH rescheduled from its callback lands in the next poll.
  assert.equal(polls, [[4, 3, 2, 1], [2, 3, 4], [4, 2], [4]]);
  assert.equal(datas.map((d) => d.n), [1, 3, 2, 4]);
  assert.ok(datas.every((d) => d.bh === null));
  drain(ctx);
});

test('S11 aio_bh_schedule_oneshot runs once with its opaque, in LIFO order with other BHs', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => order.push('B'));
  qemu_bh_schedule(a);
  aio_bh_schedule_oneshot(ctx, (o: { tag: string }) => order.push(o.tag), { tag: 'O' });
  qemu_bh_schedule(b);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['B', 'O', 'A']);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(order, ['B', 'O', 'A']);

  // It notifies like any schedule.
  aio_bh_schedule_oneshot(ctx, () => order.push('P'));
  assert.is(aio_bh_poll(ctx), 1);
  assert.is(aio_poll(ctx, true), false);
  assert.equal(order, ['B', 'O', 'A', 'P']);
});

test('S15 aio_bh_poll returns 1 iff a scheduled, non-deleted, non-idle callback ran', () => {
  const ctx = aio_context_new();
  const ran: string[] = [];
  const bh = aio_bh_new(ctx, (t: string) => ran.push(t), 'bh');
  const idle = aio_bh_new(ctx, (t: string) => ran.push(t), 'idle');

  assert.is(aio_bh_poll(ctx), 0); // nothing queued

  qemu_bh_schedule(bh);
  assert.is(aio_bh_poll(ctx), 1);

  qemu_bh_schedule(bh);
  qemu_bh_cancel(bh);
  assert.is(aio_bh_poll(ctx), 0); // skipped

  qemu_bh_schedule_idle(idle);
  assert.is(aio_bh_poll(ctx), 0); // ran, but idle

  aio_bh_schedule_oneshot(ctx, (t: string) => ran.push(t), 'oneshot');
  assert.is(aio_bh_poll(ctx), 1); // its callback ran

  qemu_bh_schedule_idle(idle);
  qemu_bh_schedule(bh);
  assert.is(aio_bh_poll(ctx), 1); // one non-idle callback is enough

  const doomed = aio_bh_new(ctx, () => ran.push('doomed'));
  qemu_bh_schedule(doomed);
  qemu_bh_delete(doomed);
  assert.is(aio_bh_poll(ctx), 0); // freeing a deleted BH is not progress

  assert.equal(ran, ['bh', 'idle', 'oneshot', 'bh', 'idle']);
  qemu_bh_delete(bh);
  qemu_bh_delete(idle);
  assert.is(aio_bh_poll(ctx), 0);
});

test('S16/S17 idle BH: aio_compute_timeout is exactly 10,000,000 and its callback is not progress', () => {
  const ctx = aio_context_new();
  let n = 0;
  const idle = aio_bh_new(ctx, () => n++);
  const bh = aio_bh_new(ctx, () => n++);
  qemu_bh_schedule_idle(idle);
  assert.is(aio_compute_timeout(ctx), 10_000_000);
  qemu_bh_schedule(bh);
  assert.is(aio_compute_timeout(ctx), 0); // a non-idle BH wins
  qemu_bh_cancel(bh);
  assert.is(aio_compute_timeout(ctx), 10_000_000);
  assert.is(aio_poll(ctx, false), false); // only the idle BH ran
  assert.is(n, 1);
  assert.is(aio_compute_timeout(ctx), -1);
  qemu_bh_delete(idle);
  qemu_bh_delete(bh);
  drain(ctx);
});

test('S16 a blocking aio_poll whose only work is an idle BH returns false (after up to 10 ms)', () => {
  const ctx = aio_context_new();
  let n = 0;
  const idle = aio_bh_new(ctx, () => n++);

  // With the schedule's notification still pending it does not wait at all.
  qemu_bh_schedule_idle(idle);
  assert.is(aio_poll(ctx, true), false);
  assert.is(n, 1);

  // Without it, it sleeps the idle BH's 10 ms, runs it, and still reports no progress.
  qemu_bh_schedule_idle(idle);
  aio_notify_accept(ctx);
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  assert.is(aio_poll(ctx, true), false);
  const elapsed = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
  assert.is(n, 2);
  assert.ok(elapsed >= 10_000_000, `waited ${elapsed} ns`);
  assert.ok(elapsed < 1_000_000_000, `waited ${elapsed} ns`);
  qemu_bh_delete(idle);
  drain(ctx);
});

test('DESIGN: a throwing BH leaves the rest of its slice queued, and that rest runs first next time', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const boom = new Error('boom');
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => {
    order.push('B');
    throw boom;
  });
  const c = aio_bh_new(ctx, () => order.push('C'));
  const d = aio_bh_new(ctx, () => order.push('D'));
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  qemu_bh_schedule(c);
  assert.is(thrown(() => aio_poll(ctx, false)), boom);
  assert.equal(order, ['C', 'B']);
  assert.is(aio_compute_timeout(ctx), 0); // S17: A is still scheduled inside the slice
  qemu_bh_schedule(d); // scheduled after the throw: it belongs to a newer slice
  assert.is(aio_bh_poll(ctx), 1);
  assert.equal(order, ['C', 'B', 'A', 'D']);
  assert.is(aio_poll(ctx, false), false);
  assert.is(qemu_get_current_aio_context(), qemu_get_aio_context());
});

test('DESIGN/S16 an idle BH left in an interrupted slice still caps the timeout at 10 ms', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const idle = aio_bh_new(ctx, () => order.push('idle'));
  const thrower = aio_bh_new(ctx, () => {
    order.push('thrower');
    throw new Error('thrower');
  });
  qemu_bh_schedule_idle(idle);
  qemu_bh_schedule(thrower);
  assert.throws(() => aio_poll(ctx, false), (e: unknown) => e instanceof Error && e.message === 'thrower');
  assert.equal(order, ['thrower']);
  assert.is(aio_compute_timeout(ctx), 10_000_000);
  assert.is(aio_bh_poll(ctx), 0);
  assert.equal(order, ['thrower', 'idle']);
  assert.is(aio_compute_timeout(ctx), -1);
});

test('S101 during a BH the current context is the BH\'s context', () => {
  const main = qemu_get_aio_context();
  const ctx1 = aio_context_new();
  const ctx2 = aio_context_new();
  const seen: AioContext[] = [];
  const inner = aio_bh_new(ctx2, () => seen.push(qemu_get_current_aio_context()));
  const outer = aio_bh_new(ctx1, () => {
    seen.push(qemu_get_current_aio_context());
    qemu_bh_schedule(inner);
    assert.is(aio_poll(ctx2, false), true);
    seen.push(qemu_get_current_aio_context());
  });
  qemu_bh_schedule(outer);
  assert.is(qemu_get_current_aio_context(), main);
  assert.is(aio_poll(ctx1, false), true);
  assert.equal(seen, [ctx1, ctx2, ctx1]);
  assert.is(qemu_get_current_aio_context(), main);
});

test('S103 a BH runs only in its own context\'s poll', () => {
  const ctx1 = aio_context_new();
  const ctx2 = aio_context_new();
  let n = 0;
  const bh = aio_bh_new(ctx1, () => n++);
  qemu_bh_schedule(bh);
  assert.is(aio_poll(ctx2, false), false);
  assert.is(aio_compute_timeout(ctx2), -1);
  assert.is(n, 0);
  assert.is(aio_poll(ctx1, false), true);
  assert.is(n, 1);
});

test.run();
