// Timers bound to an AioContext (src/aio/timer.ts): the intent of QEMU's /aio/timer/schedule
// plus rules S23, S46-S53 and DESIGN.md's "Later due timers stay armed". Ordering is checked
// on the manual QEMU_CLOCK_VIRTUAL.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  EventNotifier,
  QemuError,
  QEMU_CLOCK_HOST,
  QEMU_CLOCK_REALTIME,
  QEMU_CLOCK_VIRTUAL,
  QEMU_CLOCK_VIRTUAL_RT,
  QEMU_TIMER_ATTR_ALL,
  QEMU_TIMER_ATTR_EXTERNAL,
  SCALE_MS,
  SCALE_NS,
  SCALE_US,
  aio_bh_new,
  aio_compute_timeout,
  aio_context_new,
  aio_notify_accept,
  aio_poll,
  aio_set_event_notifier,
  aio_timer_new,
  aio_timer_new_with_attrs,
  event_notifier_cleanup,
  event_notifier_test_and_clear,
  qemu_bh_schedule,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  timer_del,
  timer_expire_time_ns,
  timer_expired,
  timer_free,
  timer_mod,
  timer_mod_anticipate,
  timer_mod_anticipate_ns,
  timer_mod_ns,
  timer_pending,
  type AioContext,
  type QEMUClockType,
  type QEMUTimer,
} from '../../src/index.ts';
import { assertNotNotified, thrown, throwsExactly } from '../helpers/assert.ts';
import { withManualClock } from '../helpers/aio.ts';

/** A virtual-clock (ns) timer on `ctx` that records `name` in `log` when it fires. */
function vtimer(ctx: AioContext, log: string[], name: string, type: QEMUClockType = QEMU_CLOCK_VIRTUAL): QEMUTimer {
  return aio_timer_new(ctx, type, SCALE_NS, () => log.push(name));
}

test('S48 equal deadlines fire in arming order (FIFO); earlier deadlines first', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const a = vtimer(ctx, log, 'A');
    const b = vtimer(ctx, log, 'B');
    const c = vtimer(ctx, log, 'C');
    const early = vtimer(ctx, log, 'early');
    const late = vtimer(ctx, log, 'late');
    timer_mod_ns(late, t0 + 200);
    timer_mod_ns(a, t0 + 100);
    timer_mod_ns(b, t0 + 100);
    timer_mod_ns(c, t0 + 100);
    timer_mod_ns(early, t0 + 50);
    qemu_clock_advance_virtual_time(t0 + 200);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['early', 'A', 'B', 'C', 'late']);
    // Re-arming a timer at the same deadline puts it behind the others again.
    log.length = 0;
    for (const t of [a, b, c]) timer_mod_ns(t, t0 + 300);
    timer_mod_ns(a, t0 + 300);
    qemu_clock_advance_virtual_time(t0 + 300);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['B', 'C', 'A']);
    assert.is(aio_poll(ctx, false), false);
  });
});

test('S48/S22 timer_mod notifies only when the timer becomes the head of its list', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const a = vtimer(ctx, log, 'A');
    const b = vtimer(ctx, log, 'B');
    timer_mod_ns(a, t0 + 1000); // new head
    assert.is(aio_poll(ctx, true), false); // woken at once by the notification; nothing due
    assertNotNotified(ctx); // a manual-clock timer is never slept for

    timer_mod_ns(b, t0 + 2000); // behind A: no notification
    assertNotNotified(ctx);
    timer_mod_ns(b, t0 + 1000); // equal deadline goes behind A: still not the head
    assertNotNotified(ctx);
    timer_mod_ns(b, t0 + 500); // now the head
    assert.is(aio_poll(ctx, true), false);
    timer_mod_ns(b, t0 + 3000); // moved from head to tail: not a new head
    assertNotNotified(ctx);
    timer_mod_anticipate_ns(b, t0 + 100); // becomes the head again
    assert.is(aio_poll(ctx, true), false);
    timer_del(b); // deleting never notifies
    assertNotNotified(ctx);
    assert.equal(log, []);
    timer_del(a);
  });
});

test('S49 timer_mod_anticipate only ever moves a deadline earlier', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {});
    timer_mod_anticipate_ns(ts, t0 + 500); // not pending: arms it
    assert.is(timer_expire_time_ns(ts), t0 + 500);
    timer_mod_anticipate_ns(ts, t0 + 900);
    assert.is(timer_expire_time_ns(ts), t0 + 500);
    timer_mod_anticipate_ns(ts, t0 + 500);
    assert.is(timer_expire_time_ns(ts), t0 + 500);
    timer_mod_anticipate_ns(ts, t0 + 200);
    assert.is(timer_expire_time_ns(ts), t0 + 200);
    timer_mod_ns(ts, t0 + 900); // plain timer_mod may move it later
    assert.is(timer_expire_time_ns(ts), t0 + 900);
    timer_del(ts);

    // In the timer's scale units.
    const ms = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_MS, () => {});
    timer_mod(ms, 7);
    timer_mod_anticipate(ms, 9);
    assert.is(timer_expire_time_ns(ms), 7 * SCALE_MS);
    timer_mod_anticipate(ms, 3);
    assert.is(timer_expire_time_ns(ms), 3 * SCALE_MS);
    timer_del(ms);
  });
});

test('S49 timer_del disarms and is idempotent', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const a = vtimer(ctx, log, 'A');
    const b = vtimer(ctx, log, 'B');
    const c = vtimer(ctx, log, 'C');
    timer_del(a); // never armed
    timer_mod_ns(a, t0 + 10);
    timer_mod_ns(b, t0 + 20);
    timer_mod_ns(c, t0 + 30);
    timer_del(b); // from the middle of the list
    timer_del(b);
    assert.is(timer_pending(b), false);
    assert.is(timer_expire_time_ns(b), -1);
    timer_del(a); // the head
    assert.is(aio_compute_timeout(ctx), 30);
    qemu_clock_advance_virtual_time(t0 + 30);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['C']);
    assert.is(aio_poll(ctx, false), false);
  });
});

test('S53 timer_free disarms the timer (QEMU >= 6.0); timer_free(null) is allowed', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const a = vtimer(ctx, log, 'A');
    timer_mod_ns(a, t0 + 10);
    timer_free(a);
    timer_free(null);
    assert.is(timer_pending(a), false);
    assert.is(aio_compute_timeout(ctx), -1);
    qemu_clock_advance_virtual_time(t0 + 10);
    assert.is(aio_poll(ctx, false), false);
    assert.equal(log, []);
  });
});

test('S49 timer_pending, timer_expired (in scale units) and timer_expire_time_ns', () => {
  const ctx = aio_context_new();
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_MS, () => {});
  assert.is(timer_pending(ts), false);
  assert.is(timer_expire_time_ns(ts), -1);
  assert.is(timer_expired(ts, 0), true); // not pending counts as expired, as in QEMU

  const far = 1_000_000_000; // ms: far in the future, never fires here
  timer_mod(ts, far);
  assert.is(timer_pending(ts), true);
  assert.is(timer_expire_time_ns(ts), far * SCALE_MS);
  assert.is(timer_expired(ts, far - 1), false);
  assert.is(timer_expired(ts, far), true);
  assert.is(timer_expired(ts, far + 1), true);

  const us = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_US, () => {});
  timer_mod(us, far);
  assert.is(timer_expire_time_ns(us), far * SCALE_US);
  assert.is(timer_expired(us, far - 1), false);
  assert.is(timer_expired(us, far), true);
  timer_del(ts);
  timer_del(us);
  assert.is(timer_pending(us), false);
});

test('S48 a negative expiry is clamped to 0 (due at once)', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => log.push('fired'));
  timer_mod_ns(ts, -5);
  assert.is(timer_expire_time_ns(ts), 0);
  assert.is(aio_compute_timeout(ctx), 0);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['fired']);
});

test('S50 now is sampled once per run: a re-arm at or before now runs again in the same poll', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    let n = 0;
    const a: QEMUTimer = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      log.push('A');
      n++;
      if (n === 1) timer_mod_ns(a, t0); // exactly now: behind B
      else if (n === 2) timer_mod_ns(a, t0 - 5); // before now: at the head
    });
    const b: QEMUTimer = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      log.push('B');
      timer_mod_ns(b, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + 1); // future: not this poll
    });
    timer_mod_ns(a, t0);
    timer_mod_ns(b, t0);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['A', 'B', 'A', 'A']);
    assert.is(timer_expire_time_ns(b), t0 + 1);
    assert.is(aio_poll(ctx, false), false);
    qemu_clock_advance_virtual_time(t0 + 1);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['A', 'B', 'A', 'A', 'B']);
    timer_del(b);
  });
});

test('S50 a timer that becomes due while the timers run waits for the next poll', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const a = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      log.push('A');
      qemu_clock_advance_virtual_time(t0 + 20);
    });
    const b = vtimer(ctx, log, 'B');
    timer_mod_ns(a, t0 + 10);
    timer_mod_ns(b, t0 + 20);
    qemu_clock_advance_virtual_time(t0 + 10);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['A']);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['A', 'B']);
  });
});

test('S23 timers run last: after BHs and fd handlers of the same poll', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const bhNext = aio_bh_new(ctx, () => log.push('bh-from-timer'));
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      log.push('timer');
      qemu_bh_schedule(bhNext); // the BH phase is over: next poll
    });
    timer_mod_ns(ts, t0);
    const e = new EventNotifier(true);
    aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => {
      event_notifier_test_and_clear(x);
      log.push('fd');
    }, null);
    const bh = aio_bh_new(ctx, () => log.push('bh'));
    qemu_bh_schedule(bh);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['bh', 'fd', 'timer']);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['bh', 'fd', 'timer', 'bh-from-timer']);
    aio_set_event_notifier(ctx, e, false, null, null);
    event_notifier_cleanup(e);
    assert.is(aio_poll(ctx, false), false);
  });
});

test('DESIGN: a throwing timer leaves later due timers armed; they run in the next poll', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const boom = new Error('timer boom');
    const a = vtimer(ctx, log, 'A');
    const b = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      log.push('B');
      throw boom;
    });
    const c = vtimer(ctx, log, 'C');
    const host = vtimer(ctx, log, 'host', QEMU_CLOCK_HOST); // a later clock list, due too
    for (const t of [a, b, c]) timer_mod_ns(t, t0);
    timer_mod_ns(host, 0);
    assert.is(thrown(() => aio_poll(ctx, false)), boom);
    assert.equal(log, ['A', 'B']);
    assert.equal([timer_pending(a), timer_pending(b), timer_pending(c), timer_pending(host)], [false, false, true, true]);
    assert.is(qemu_get_current_aio_context(), qemu_get_aio_context());
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['A', 'B', 'C', 'host']);
    assert.is(aio_poll(ctx, false), false);
  });
});

test('DESIGN: when a BH throws, the timers of that poll run in the next one', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const ts = vtimer(ctx, log, 'timer');
    timer_mod_ns(ts, t0);
    const boom = new Error('bh boom');
    const bh = aio_bh_new(ctx, () => {
      log.push('bh');
      throw boom;
    });
    qemu_bh_schedule(bh);
    assert.is(thrown(() => aio_poll(ctx, false)), boom);
    assert.equal(log, ['bh']);
    assert.is(timer_pending(ts), true);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['bh', 'timer']);
  });
});

test('S46 scales: SCALE_MS and SCALE_US timers are armed in their units and fire on the ns clock', () => {
  withManualClock((t0) => {
    const base = (Math.floor(t0 / SCALE_MS) + 1) * SCALE_MS; // a whole millisecond
    qemu_clock_advance_virtual_time(base);
    const ms = base / SCALE_MS;
    const ctx = aio_context_new();
    const log: string[] = [];
    const tms = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_MS, () => log.push('ms'));
    const tus = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_US, () => log.push('us'));
    timer_mod(tms, ms + 3);
    timer_mod(tus, (base + 7000) / SCALE_US);
    assert.is(timer_expire_time_ns(tms), base + 3_000_000);
    assert.is(timer_expire_time_ns(tus), base + 7000);
    assert.is(aio_compute_timeout(ctx), 7000);
    qemu_clock_advance_virtual_time(base + 6999);
    assert.is(aio_poll(ctx, false), false);
    qemu_clock_advance_virtual_time(base + 7000);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['us']);
    assert.is(aio_compute_timeout(ctx), 3_000_000 - 7000);
    assert.is(timer_expired(tms, ms + 2), false);
    qemu_clock_advance_virtual_time(base + 2_999_999);
    assert.is(aio_poll(ctx, false), false);
    qemu_clock_advance_virtual_time(base + 3_000_000);
    assert.is(timer_expired(tms, ms + 3), true);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['us', 'ms']);
  });
});

test('S50 clock lists run in clock-type order: REALTIME, VIRTUAL, HOST, VIRTUAL_RT', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    // Armed in the reverse order.
    timer_mod_ns(vtimer(ctx, log, 'virtual_rt', QEMU_CLOCK_VIRTUAL_RT), t0);
    timer_mod_ns(vtimer(ctx, log, 'host', QEMU_CLOCK_HOST), 0);
    timer_mod_ns(vtimer(ctx, log, 'virtual', QEMU_CLOCK_VIRTUAL), t0);
    timer_mod_ns(vtimer(ctx, log, 'realtime', QEMU_CLOCK_REALTIME), 0);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['realtime', 'virtual', 'host', 'virtual_rt']);
  });
});

test('S47 a timer runs only in its own context, with its opaque, in that context', () => {
  const ctx1 = aio_context_new();
  const ctx2 = aio_context_new();
  const seen: [string, AioContext][] = [];
  const ts = aio_timer_new(ctx1, QEMU_CLOCK_REALTIME, SCALE_NS, (tag: string) => seen.push([tag, qemu_get_current_aio_context()]), 'op');
  timer_mod_ns(ts, 0);
  assert.is(aio_poll(ctx2, false), false);
  assert.is(aio_compute_timeout(ctx2), -1);
  assert.equal(seen, []);
  assert.is(aio_poll(ctx1, false), true);
  assert.is(seen.length, 1);
  assert.is(seen[0]?.[0], 'op');
  assert.is(seen[0]?.[1], ctx1);
});

test('/aio/timer/schedule: a REALTIME timer ends a blocking aio_poll, and re-arms itself', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => event_notifier_test_and_clear(x), null);
  assert.is(aio_poll(ctx, false), false);
  const interval = 3 * SCALE_MS;
  const d = { n: 0, max: 2 };
  const ts: QEMUTimer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    if (++d.n < d.max) timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + interval);
  });
  let expiry = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + interval;
  timer_mod_ns(ts, expiry);
  assert.is(d.n, 0);
  aio_notify_accept(ctx); // consume timer_mod's notification

  assert.is(aio_poll(ctx, true), true); // sleeps until the timer is due
  assert.is(d.n, 1);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_REALTIME) >= expiry);
  expiry = timer_expire_time_ns(ts);
  assert.ok(expiry > 0);
  for (let i = 0; i < 10 && d.n < 2; i++) aio_poll(ctx, true);
  assert.is(d.n, 2);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_REALTIME) >= expiry);
  assert.is(timer_pending(ts), false);
  assert.is(aio_poll(ctx, false), false);
  aio_set_event_notifier(ctx, e, false, null, null);
  event_notifier_cleanup(e);
});

test('aio_timer_new rejects an invalid clock type or scale', () => {
  const ctx = aio_context_new();
  throwsExactly(() => aio_timer_new(ctx, 7 as QEMUClockType, SCALE_NS, () => {}), QemuError, 'aio_timer_new: invalid clock type 7');
  throwsExactly(() => aio_timer_new(ctx, QEMU_CLOCK_REALTIME, 0, () => {}), QemuError, 'aio_timer_new: invalid scale 0');
  throwsExactly(() => aio_timer_new(ctx, QEMU_CLOCK_REALTIME, -1, () => {}), QemuError, 'aio_timer_new: invalid scale -1');
});

test('S52 attributes: QEMU_TIMER_ATTR_* values; an external timer behaves like any other', () => {
  assert.is(QEMU_TIMER_ATTR_EXTERNAL, 1);
  assert.is(QEMU_TIMER_ATTR_ALL, 0xffffffff);
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const ext = aio_timer_new_with_attrs(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, QEMU_TIMER_ATTR_EXTERNAL, (o: string) => log.push(o), 'ext');
    const plain = vtimer(ctx, log, 'plain');
    timer_mod_ns(ext, t0 + 5);
    timer_mod_ns(plain, t0 + 5);
    assert.is(aio_compute_timeout(ctx), 5);
    qemu_clock_advance_virtual_time(t0 + 5);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['ext', 'plain']);
  });
});

test.run();
