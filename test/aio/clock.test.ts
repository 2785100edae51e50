// QEMU's clocks and aioco's manual virtual clock (src/aio/clock.ts): rules S46, S51, S54 and
// API.md's clock rules. The first tests need VIRTUAL untouched (fresh process), so they
// come first; every test restores manual mode and enabled state.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AioWaitError,
  QemuError,
  QEMU_CLOCK_HOST,
  QEMU_CLOCK_REALTIME,
  QEMU_CLOCK_VIRTUAL,
  QEMU_CLOCK_VIRTUAL_RT,
  SCALE_MS,
  SCALE_NS,
  SCALE_US,
  aio_compute_timeout,
  aio_context_new,
  aio_context_unref,
  aio_notify_accept,
  aio_poll,
  aio_timer_new,
  qemu_clock_advance_virtual_time,
  qemu_clock_enable,
  qemu_clock_get_ms,
  qemu_clock_get_ns,
  qemu_clock_get_us,
  qemu_clock_set_manual,
  qemu_get_aio_context,
  qemu_soonest_timeout,
  qemu_timeout_ns_to_ms,
  timer_del,
  timer_mod_ns,
  timer_pending,
  type QEMUClockType,
} from '../../src/index.ts';
import { assertNotNotified, throwsExactly } from '../helpers/assert.ts';
import { withManualClock } from '../helpers/aio.ts';
import { runNode } from '../helpers/child.ts';

const MINUTES_3 = 3 * 60 * 1e9;

test('S46 clock types and scales have QEMU\'s values', () => {
  assert.equal([QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL, QEMU_CLOCK_HOST, QEMU_CLOCK_VIRTUAL_RT], [0, 1, 2, 3]);
  assert.equal([SCALE_NS, SCALE_US, SCALE_MS], [1, 1000, 1000000]);
});

test('API: REALTIME and VIRTUAL count ns from process start; VIRTUAL follows REALTIME', () => {
  const rt1 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  const v = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
  const vrt = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL_RT);
  const rt2 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  assert.ok(rt1 > 0 && rt1 < MINUTES_3, String(rt1));
  assert.ok(Number.isSafeInteger(rt1));
  assert.ok(rt1 <= v && v <= vrt && vrt <= rt2, `${rt1} ${v} ${vrt} ${rt2}`);
  // Monotonic.
  let prev = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  for (let i = 0; i < 1000; i++) {
    const now = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    assert.ok(now >= prev);
    prev = now;
  }
});

test('API: HOST is epoch nanoseconds, close to Date.now()', () => {
  const before = Date.now() * 1e6;
  const host = qemu_clock_get_ns(QEMU_CLOCK_HOST);
  const after = Date.now() * 1e6;
  assert.ok(host >= before - 100e6 && host <= after + 100e6, `${before} ${host} ${after}`);
  assert.ok(Math.abs(qemu_clock_get_ms(QEMU_CLOCK_HOST) - Date.now()) < 100);
});

test('S46 qemu_clock_get_us/ms are the ns value rounded down', () => {
  withManualClock((t0) => {
    const base = Math.ceil((t0 + 1) / 1e9) * 1e9; // a whole second after now
    qemu_clock_advance_virtual_time(base + 123_456_789);
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), base + 123_456_789);
    assert.is(qemu_clock_get_us(QEMU_CLOCK_VIRTUAL), base / 1000 + 123_456);
    assert.is(qemu_clock_get_ms(QEMU_CLOCK_VIRTUAL), base / 1e6 + 123);
    qemu_clock_advance_virtual_time(base + 123_999_999);
    assert.is(qemu_clock_get_us(QEMU_CLOCK_VIRTUAL), base / 1000 + 123_999);
    assert.is(qemu_clock_get_ms(QEMU_CLOCK_VIRTUAL), base / 1e6 + 123);
  });
  const ns = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  const ms = qemu_clock_get_ms(QEMU_CLOCK_REALTIME);
  assert.ok(ms >= Math.floor(ns / 1e6) && Number.isInteger(ms));
  assert.ok(Number.isInteger(qemu_clock_get_us(QEMU_CLOCK_REALTIME)));
});

test('API manual mode: the clock stands still, ends exactly at dest, never goes backwards', () => {
  withManualClock((t0) => {
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0);
    const spin = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000;
    while (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < spin); // 1 ms of real time passes
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0);
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL_RT), t0); // its twin reads the same

    qemu_clock_advance_virtual_time(t0 + 1000);
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0 + 1000);
    qemu_clock_advance_virtual_time(t0 + 10); // earlier: ignored
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0 + 1000);
    qemu_clock_advance_virtual_time(t0 + 1000);
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0 + 1000);
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL_RT), t0 + 1000);

    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true); // already manual: no jump
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0 + 1000);
    // REALTIME is unaffected.
    assert.ok(qemu_clock_get_ns(QEMU_CLOCK_REALTIME) >= spin);
  });
});

test('API manual mode: misuse throws QemuError', () => {
  throwsExactly(
    () => qemu_clock_advance_virtual_time(1e15),
    QemuError,
    'qemu_clock_advance_virtual_time: QEMU_CLOCK_VIRTUAL is not in manual mode (qemu_clock_set_manual)',
  );
  throwsExactly(
    () => qemu_clock_set_manual(QEMU_CLOCK_REALTIME, true),
    QemuError,
    'qemu_clock_set_manual: only QEMU_CLOCK_VIRTUAL can be manual, not clock 0',
  );
  throwsExactly(
    () => qemu_clock_set_manual(QEMU_CLOCK_HOST, true),
    QemuError,
    'qemu_clock_set_manual: only QEMU_CLOCK_VIRTUAL can be manual, not clock 2',
  );
  throwsExactly(() => qemu_clock_set_manual(9 as QEMUClockType, true), QemuError, 'qemu_clock_set_manual: invalid clock type 9');
  throwsExactly(() => qemu_clock_get_ns(9 as QEMUClockType), QemuError, 'qemu_clock_get_ns: invalid clock type 9');
  throwsExactly(() => qemu_clock_enable(9 as QEMUClockType, true), QemuError, 'qemu_clock_enable: invalid clock type 9');
  withManualClock((t0) => {
    throwsExactly(() => qemu_clock_advance_virtual_time(NaN), QemuError, 'qemu_clock_advance_virtual_time: invalid time NaN');
    throwsExactly(
      () => qemu_clock_advance_virtual_time(Infinity),
      QemuError,
      'qemu_clock_advance_virtual_time: invalid time Infinity',
    );
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), t0);
  });
  // The failed calls left the clock following REALTIME.
  const a = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
  const spin = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 100_000;
  while (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < spin);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) > a);
});

test('API leaving manual mode resumes following REALTIME from the value reached, never backwards', () => {
  let reached = 0;
  withManualClock((t0) => {
    qemu_clock_advance_virtual_time(t0 + 10e9); // 10 s ahead of real time
    reached = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    assert.is(reached, t0 + 10e9);
  });
  const v1 = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
  assert.ok(v1 >= reached, `${v1} < ${reached}`);
  assert.ok(v1 < reached + 1e9); // continues from there, not from REALTIME
  const spin = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 200_000;
  while (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < spin);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) >= v1 + 200_000);
  // Re-entering manual mode starts from the current value.
  withManualClock((t0) => {
    assert.ok(t0 >= v1);
  });
});

test('API due timers run in their context\'s next aio_poll, not inside the advance', () => {
  withManualClock((t0) => {
    const a = aio_context_new();
    const b = aio_context_new();
    const log: string[] = [];
    const ta = aio_timer_new(a, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => log.push('a'));
    const tb = aio_timer_new(b, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => log.push('b'));
    timer_mod_ns(ta, t0 + 100);
    timer_mod_ns(tb, t0 + 1000);
    aio_notify_accept(a);
    aio_notify_accept(b);
    qemu_clock_advance_virtual_time(t0 + 100);
    assert.equal(log, []); // nothing ran inside the call
    // b's timer is not due: b was not notified, and it would wait forever.
    assertNotNotified(b);
    assert.is(aio_poll(a, false), true);
    assert.equal(log, ['a']);
    qemu_clock_advance_virtual_time(t0 + 1000);
    assert.is(aio_poll(b, true), true);
    assert.equal(log, ['a', 'b']);
  });
});

test('API an advance made elsewhere wakes a blocking aio_poll whose only timer is on the manual clock', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => log.push('virtual timer'));
    timer_mod_ns(ts, t0 + 5000);
    aio_notify_accept(ctx);
    // The main context (driven by every wait) advances the clock from a 1 ms real-time timer.
    const main = qemu_get_aio_context();
    const mover = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
      log.push('advance');
      qemu_clock_advance_virtual_time(t0 + 5000);
    });
    timer_mod_ns(mover, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000);
    assert.is(aio_poll(ctx, true), true);
    assert.equal(log, ['advance', 'virtual timer']);
  });
});

test('API/S17 aio_compute_timeout counts a manual timer by its distance; no wait sleeps for it', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {});
    timer_mod_ns(ts, t0 + 250_000);
    assert.is(aio_compute_timeout(ctx), 250_000);
    qemu_clock_advance_virtual_time(t0 + 200_000);
    assert.is(aio_compute_timeout(ctx), 50_000);
    aio_notify_accept(ctx);
    try {
      aio_poll(ctx, true);
      assert.unreachable('a wait on a manual-clock timer alone must not sleep');
    } catch (e) {
      assert.instance(e, AioWaitError);
      assert.ok((e as Error).message.startsWith('aio_poll: this blocking wait can never end: '));
    }
    assert.is(timer_pending(ts), true);
    timer_del(ts);
    assert.is(aio_compute_timeout(ctx), -1);
  });
});

test('S51 a disabled clock runs no timers and has no deadline; enabling it notifies', () => {
  withManualClock((t0) => {
    const ctx = aio_context_new();
    const log: string[] = [];
    const due = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => log.push('due'));
    const later = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => log.push('later'));
    timer_mod_ns(due, t0 + 10);
    timer_mod_ns(later, t0 + 1_000_000);
    qemu_clock_advance_virtual_time(t0 + 10);
    qemu_clock_enable(QEMU_CLOCK_VIRTUAL, false);
    try {
      assert.is(aio_compute_timeout(ctx), -1);
      assert.is(aio_poll(ctx, false), false);
      assert.equal(log, []);
      assert.is(timer_pending(due), true);
      timer_del(due);
      aio_notify_accept(ctx);
    } finally {
      qemu_clock_enable(QEMU_CLOCK_VIRTUAL, true);
    }
    // Enabling notified ctx, which has timers on that clock.
    assert.is(aio_poll(ctx, true), false);
    assert.is(aio_compute_timeout(ctx), 1_000_000 - 10);
    // Enabling an enabled clock notifies nobody.
    qemu_clock_enable(QEMU_CLOCK_VIRTUAL, true);
    assertNotNotified(ctx);
    qemu_clock_advance_virtual_time(t0 + 1_000_000);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(log, ['later']);
  });

  // REALTIME too.
  const ctx = aio_context_new();
  const log: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => log.push('rt'));
  timer_mod_ns(ts, 0);
  qemu_clock_enable(QEMU_CLOCK_REALTIME, false);
  try {
    assert.is(aio_compute_timeout(ctx), -1);
    assert.is(aio_poll(ctx, false), false);
  } finally {
    qemu_clock_enable(QEMU_CLOCK_REALTIME, true);
  }
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['rt']);
});

test('API leaving manual mode notifies contexts with virtual-clock timers, which then run in real time', () => {
  let deadline = 0;
  const ctx = aio_context_new();
  const log: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => log.push('virtual'));
  withManualClock((t0) => {
    deadline = t0 + 3_000_000; // 3 ms ahead
    timer_mod_ns(ts, deadline);
    aio_notify_accept(ctx);
  });
  assert.is(aio_poll(ctx, true), false); // woken by leaving manual mode (timer not due yet)
  assert.is(aio_poll(ctx, true), true); // now it really sleeps until the deadline
  assert.equal(log, ['virtual']);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) >= deadline);
});

test('S17 qemu_soonest_timeout treats -1 as infinite', () => {
  assert.is(qemu_soonest_timeout(-1, -1), -1);
  assert.is(qemu_soonest_timeout(-1, 5), 5);
  assert.is(qemu_soonest_timeout(5, -1), 5);
  assert.is(qemu_soonest_timeout(3, 7), 3);
  assert.is(qemu_soonest_timeout(7, 3), 3);
  assert.is(qemu_soonest_timeout(0, -1), 0);
  assert.is(qemu_soonest_timeout(-1, 0), 0);
});

test('S54 qemu_timeout_ns_to_ms rounds up, keeps -1, clamps to INT32_MAX', () => {
  assert.is(qemu_timeout_ns_to_ms(-1), -1);
  assert.is(qemu_timeout_ns_to_ms(0), 0);
  assert.is(qemu_timeout_ns_to_ms(1), 1);
  assert.is(qemu_timeout_ns_to_ms(999_999), 1);
  assert.is(qemu_timeout_ns_to_ms(1_000_000), 1);
  assert.is(qemu_timeout_ns_to_ms(1_000_001), 2);
  assert.is(qemu_timeout_ns_to_ms(10_000_000), 10);
  assert.is(qemu_timeout_ns_to_ms(1e18), 0x7fffffff);
});

// --- Leaving manual mode (review regressions) ---

test('API leaving manual mode continues from the value reached: no jump for the real time spent in manual mode', () => {
  const spinMs = (ms: number) => {
    const until = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + ms * 1e6;
    while (qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < until);
  };
  // Left without advancing: 20 ms of real time pass in manual mode.
  let reached = 0;
  let r0 = 0;
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    reached = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    spinMs(20);
    assert.is(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL), reached);
    r0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
  let after = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
  let r1 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  // From the value reached it moves at REALTIME's pace: by at most the real time between r0 and r1.
  assert.ok(after >= reached && after - reached <= r1 - r0, `jumped by ${after - reached} ns; at most ${r1 - r0} ns allowed`);

  // Advanced by 5 ms while 20 ms of real time pass: it continues from the advanced value.
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    const t0 = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    spinMs(20);
    qemu_clock_advance_virtual_time(t0 + 5_000_000);
    reached = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    assert.is(reached, t0 + 5_000_000);
    r0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
  after = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
  r1 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  assert.ok(after >= reached && after - reached <= r1 - r0, `jumped by ${after - reached} ns; at most ${r1 - r0} ns allowed`);
  // and then follows REALTIME
  spinMs(1);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) >= after + 1_000_000);
});

test('API leaving manual mode notifies contexts whose timers are on QEMU_CLOCK_VIRTUAL_RT too', () => {
  let deadline = 0;
  const ctx = aio_context_new();
  const log: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL_RT, SCALE_NS, () => log.push('virtual_rt'));
  withManualClock((t0) => {
    deadline = t0 + 20_000_000; // 20 ms ahead
    timer_mod_ns(ts, deadline);
    aio_notify_accept(ctx);
  });
  assert.is(aio_poll(ctx, true), false); // woken by leaving manual mode (the timer is not due yet)
  assert.equal(log, []);
  assert.is(aio_poll(ctx, true), true); // now it sleeps until the deadline
  assert.equal(log, ['virtual_rt']);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL_RT) >= deadline);
  aio_context_unref(ctx);
});

test('DESIGN (host loop): a QEMU_CLOCK_VIRTUAL_RT timer armed in manual mode keeps Node alive once manual mode is left, and runs', async () => {
  const r = await runNode(['--import', 'tsx', 'test/aio/fixtures/host-virtual-rt-manual-off.ts']);
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'manual mode left\nexit 0 ran=["virtual_rt timer@main"] pending=false\n');
});

test.run();
