// EventNotifier (src/aio/event-notifier.ts) and its handlers: the intent of QEMU's
// /aio/event/* tests plus rules S30-S31 and API.md's notifier contract.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  EventNotifier,
  QemuError,
  aio_bh_schedule_oneshot,
  aio_context_new,
  aio_notify_accept,
  aio_poll,
  aio_set_event_notifier,
  aio_set_fd_handler,
  event_notifier_cleanup,
  event_notifier_get_fd,
  event_notifier_init,
  event_notifier_set,
  event_notifier_test_and_clear,
  qemu_get_aio_context,
  type AioContext,
} from '../../src/index.ts';
import { assertNotNotified, throwsExactly } from '../helpers/assert.ts';

/** QEMU's EventNotifierTestData and event_ready_cb, recording whether the notifier was set. */
interface EData {
  e: EventNotifier;
  n: number;
  active: number;
  auto_set: boolean;
  wasSet: boolean[];
}
function edata(active = 0, auto_set = false): EData {
  return { e: new EventNotifier(), n: 0, active, auto_set, wasSet: [] };
}
const byNotifier = new Map<EventNotifier, EData>();
function event_ready_cb(e: EventNotifier): void {
  const d = byNotifier.get(e) as EData;
  d.wasSet.push(event_notifier_test_and_clear(e));
  d.n++;
  if (d.active > 0) d.active--;
  if (d.auto_set && d.active) event_notifier_set(e);
}
function watch(ctx: AioContext, d: EData): void {
  byNotifier.set(d.e, d);
  aio_set_event_notifier(ctx, d.e, false, event_ready_cb, null);
}
function unwatch(ctx: AioContext, d: EData): void {
  aio_set_event_notifier(ctx, d.e, false, null, null);
}

// ---------------------------------------------------------------- the notifier itself

test('EventNotifier: set is level-triggered until test_and_clear', () => {
  const e = new EventNotifier();
  assert.is(event_notifier_test_and_clear(e), false);
  event_notifier_set(e);
  event_notifier_set(e);
  assert.is(event_notifier_test_and_clear(e), true);
  assert.is(event_notifier_test_and_clear(e), false);
  const active = new EventNotifier(true);
  assert.is(event_notifier_test_and_clear(active), true);
  assert.is(event_notifier_test_and_clear(active), false);
});

test('event_notifier_init returns 0, sets the initial state and gives a fresh fd', () => {
  const e = new EventNotifier();
  const fd0 = event_notifier_get_fd(e);
  assert.is(event_notifier_init(e, true), 0);
  const fd1 = event_notifier_get_fd(e);
  assert.is.not(fd1, fd0);
  assert.is(event_notifier_test_and_clear(e), true);
  assert.is(event_notifier_init(e, false), 0);
  assert.is(event_notifier_test_and_clear(e), false);
  // The superseded fd is no longer something aio_set_fd_handler accepts.
  const ctx = aio_context_new();
  throwsExactly(
    () => aio_set_fd_handler(ctx, fd0, false, () => {}, null, null, null),
    QemuError,
    `aio_set_fd_handler: fd ${fd0} is not an aioco notifier or channel`,
  );
  aio_set_fd_handler(ctx, event_notifier_get_fd(e), false, () => {}, null, null, null); // the current one is fine
  aio_set_fd_handler(ctx, event_notifier_get_fd(e), false, null, null, null, null);
});

test('event_notifier_get_fd: unique integers >= 2**30, stable until re-init', () => {
  const es = Array.from({ length: 50 }, () => new EventNotifier());
  const fds = es.map(event_notifier_get_fd);
  assert.ok(fds.every((fd) => Number.isInteger(fd) && fd >= 2 ** 30), fds.join());
  assert.is(new Set(fds).size, fds.length);
  assert.equal(es.map(event_notifier_get_fd), fds);
});

test('event_notifier_cleanup: reads as never set, set does nothing, the fd is refused', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier(true);
  const fd = event_notifier_get_fd(e);
  event_notifier_cleanup(e);
  assert.is(event_notifier_test_and_clear(e), false);
  event_notifier_set(e);
  assert.is(event_notifier_test_and_clear(e), false);
  throwsExactly(
    () => aio_set_fd_handler(ctx, fd, false, () => {}, null, null, null),
    QemuError,
    `aio_set_fd_handler: fd ${fd} is not an aioco notifier or channel`,
  );
  // It can be initialised again.
  assert.is(event_notifier_init(e, true), 0);
  assert.ok(event_notifier_get_fd(e) >= 2 ** 30);
  assert.is(event_notifier_test_and_clear(e), true);
});

// ---------------------------------------------------------------- QEMU's /aio/event/* tests

test('S31 /aio/event/add-remove: registering and removing run nothing', () => {
  const ctx = aio_context_new();
  const d = edata();
  watch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 0);
  unwatch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 0);
  event_notifier_cleanup(d.e);
});

test('S30 /aio/event/wait: one set, one dispatch', () => {
  const ctx = aio_context_new();
  const d = edata(1);
  watch(ctx, d);
  for (let i = 0; i < 10 && aio_poll(ctx, false); i++);
  assert.is(d.n, 0);
  assert.is(d.active, 1);

  event_notifier_set(d.e);
  assert.is(aio_poll(ctx, false), true);
  assert.is(d.n, 1);
  assert.is(d.active, 0);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 1);

  unwatch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 1);
  assert.equal(d.wasSet, [true]);
  event_notifier_cleanup(d.e);
});

test('S30 /aio/event/flush: a handler that sets its notifier again runs once per aio_poll', () => {
  const ctx = aio_context_new();
  const d = edata(10, true);
  watch(ctx, d);
  for (let i = 0; i < 10 && aio_poll(ctx, false); i++);
  assert.is(d.n, 0);
  assert.is(d.active, 10);

  event_notifier_set(d.e);
  assert.is(aio_poll(ctx, false), true);
  assert.is(d.n, 1);
  assert.is(d.active, 9);
  assert.is(aio_poll(ctx, false), true);
  assert.is(d.n, 2);

  const seen: number[] = [];
  for (let i = 0; i < 20 && d.active > 0; i++) {
    assert.is(aio_poll(ctx, true), true);
    seen.push(d.n);
  }
  assert.equal(seen, [3, 4, 5, 6, 7, 8, 9, 10]);
  assert.is(d.active, 0);
  assert.is(aio_poll(ctx, false), false);
  assert.ok(d.wasSet.length === 10 && d.wasSet.every((x) => x));

  unwatch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  event_notifier_cleanup(d.e);
});

test('S30 /aio/event/wait/no-flush-cb: each set is dispatched exactly once, never blocking', () => {
  const ctx = aio_context_new();
  const d = edata();
  const dummy = edata(1);
  watch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 0);

  event_notifier_set(d.e);
  assert.is(aio_poll(ctx, true), true);
  assert.is(d.n, 1);

  watch(ctx, dummy);
  event_notifier_set(d.e);
  assert.is(aio_poll(ctx, false), true);
  assert.is(d.n, 2);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 2);

  event_notifier_set(d.e);
  assert.is(aio_poll(ctx, false), true);
  assert.is(d.n, 3);
  assert.is(aio_poll(ctx, false), false);

  event_notifier_set(dummy.e);
  for (let i = 0; i < 10 && dummy.active > 0; i++) aio_poll(ctx, true);
  assert.is(d.n, 3);
  assert.is(dummy.n, 1);
  assert.is(dummy.active, 0);

  unwatch(ctx, dummy);
  event_notifier_cleanup(dummy.e);
  unwatch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  assert.is(d.n, 3);
  assert.ok(d.wasSet.every((x) => x));
  event_notifier_cleanup(d.e);
});

test('S30 level-triggered: a read handler that does not clear its notifier runs on every aio_poll', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  let n = 0;
  aio_set_event_notifier(ctx, e, false, () => n++, null);
  assert.is(aio_poll(ctx, false), false);
  event_notifier_set(e);
  const rets = [aio_poll(ctx, false), aio_poll(ctx, true), aio_poll(ctx, false)];
  assert.equal(rets, [true, true, true]);
  assert.is(n, 3);
  assert.is(event_notifier_test_and_clear(e), true);
  assert.is(aio_poll(ctx, false), false);
  assert.is(n, 3);
  aio_set_event_notifier(ctx, e, false, null, null);
});

test('S26 a blocking aio_poll is ended by a notifier set from work in another context', () => {
  const ctx = aio_context_new();
  const d = edata();
  watch(ctx, d);
  assert.is(aio_poll(ctx, false), false);
  // Main's BH runs while ctx waits (waits drive the main context) and sets the notifier.
  aio_bh_schedule_oneshot(qemu_get_aio_context(), (e: EventNotifier) => event_notifier_set(e), d.e);
  aio_notify_accept(ctx);
  assert.is(aio_poll(ctx, true), true);
  assert.is(d.n, 1);
  assert.equal(d.wasSet, [true]);
  unwatch(ctx, d);
  assertNotNotified(aio_context_new());
});

test('one notifier watched by two contexts: each context dispatches its own handler', () => {
  const ctx1 = aio_context_new();
  const ctx2 = aio_context_new();
  const e = new EventNotifier();
  const calls: string[] = [];
  aio_set_event_notifier(ctx1, e, false, () => calls.push('ctx1'), null);
  aio_set_event_notifier(ctx2, e, false, () => calls.push('ctx2'), null);
  aio_poll(ctx1, false);
  aio_poll(ctx2, false);
  event_notifier_set(e);
  assert.is(aio_poll(ctx2, false), true);
  assert.is(aio_poll(ctx1, false), true);
  assert.equal(calls, ['ctx2', 'ctx1']);
  aio_set_event_notifier(ctx1, e, false, null, null);
  assert.is(aio_poll(ctx1, false), false);
  assert.is(aio_poll(ctx2, false), true); // still watched there
  assert.equal(calls, ['ctx2', 'ctx1', 'ctx2']);
  aio_set_event_notifier(ctx2, e, false, null, null);
  event_notifier_cleanup(e);
});

test.run();
