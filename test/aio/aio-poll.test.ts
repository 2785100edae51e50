// aio_poll and the AioContext core (src/aio/aio-poll.ts, src/aio/aio-context.ts): the intent
// of QEMU's test-aio.c (/aio/acquire's "consume aio_notify" idiom, /aio/bh/flush) plus
// rules S2, S6, S17-S27, S35-S39 and API.md's current-context rules.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  EventNotifier,
  QemuError,
  QEMU_CLOCK_REALTIME,
  QEMU_CLOCK_VIRTUAL,
  SCALE_NS,
  aio_bh_new,
  aio_bh_schedule_oneshot,
  aio_co_schedule,
  aio_compute_timeout,
  aio_context_acquire,
  aio_context_new,
  aio_context_ref,
  aio_context_release,
  aio_context_set_poll_params,
  aio_context_unref,
  aio_disable_external,
  aio_dispatch,
  aio_enable_external,
  aio_notify,
  aio_notify_accept,
  aio_pending,
  aio_poll,
  aio_prepare,
  aio_set_event_notifier,
  aio_set_event_notifier_poll,
  aio_set_fd_handler,
  aio_timer_new,
  event_notifier_get_fd,
  event_notifier_set,
  event_notifier_test_and_clear,
  qemu_bh_cancel,
  qemu_bh_delete,
  qemu_bh_schedule,
  qemu_bh_schedule_idle,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_clock_set_manual,
  qemu_coroutine_create,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  timer_del,
  timer_mod_ns,
  type AioContext,
  type CoroutineFn,
} from '../../src/index.ts';
import { assertNotNotified, thrown, throwsExactly } from '../helpers/assert.ts';
import { drain } from '../helpers/aio.ts';
import { runNode } from '../helpers/child.ts';

/** A blocking aio_poll that ends when a REALTIME timer fires after `ns`: it lasts at least `ns`. */
function pollFor(ctx: AioContext, ns: number): void {
  let fired = 0;
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => fired++);
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + ns);
  aio_notify_accept(ctx); // the timer_mod's notification must not cut the wait short
  assert.is(aio_poll(ctx, true), true);
  assert.is(fired, 1);
}

// ---------------------------------------------------------------- notify (S18-S22)

test('S20 aio_notify then aio_poll(ctx, false) returns false: the "consume aio_notify" idiom', () => {
  const ctx = aio_context_new();
  aio_notify(ctx);
  assert.is(aio_poll(ctx, false), false);
  // Consumed: a blocking poll now has nothing that could end it.
  assertNotNotified(ctx);
});

test('S20 a stale aio_notify makes the next blocking aio_poll return false at once', () => {
  const ctx = aio_context_new();
  aio_notify(ctx);
  aio_notify(ctx);
  assert.is(aio_poll(ctx, true), false);
  assertNotNotified(ctx);
  // aio_notify_accept consumes it just the same.
  aio_notify(ctx);
  aio_notify_accept(ctx);
  assertNotNotified(ctx);
});

test('S24 /aio/bh/flush: blocking aio_poll returns true after qemu_bh_schedule, even with the notify consumed', () => {
  const ctx = aio_context_new();
  let n = 0;
  const bh = aio_bh_new(ctx, () => n++);
  qemu_bh_schedule(bh);
  assert.is(aio_poll(ctx, true), true);
  assert.is(n, 1);
  qemu_bh_schedule(bh);
  aio_notify_accept(ctx);
  assert.is(aio_poll(ctx, true), true);
  assert.is(n, 2);
  assert.is(aio_poll(ctx, false), false);
  qemu_bh_delete(bh);
  drain(ctx);
});

test('S24 aio_poll(ctx, false) returns false when nothing is pending', () => {
  const ctx = aio_context_new();
  assert.is(aio_poll(ctx, false), false);
  assert.is(aio_poll(ctx, false), false);
  assert.is(aio_poll(qemu_get_aio_context(), false), false);
});

test('S21/S24 a notification is never progress, whatever else is idle', () => {
  const ctx = aio_context_new();
  const e = new EventNotifier();
  aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => event_notifier_test_and_clear(x), null);
  assert.is(aio_poll(ctx, false), false); // registration notified; consumed, not progress
  aio_notify(ctx);
  assert.is(aio_poll(ctx, true), false);
  aio_set_event_notifier(ctx, e, false, null, null);
  assert.is(aio_poll(ctx, false), false);
});

// ---------------------------------------------------------------- phases (S23)

test('S23 one aio_poll runs BHs, then fd handlers, then timers', () => {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    const ctx = aio_context_new();
    const order: string[] = [];
    const t0 = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    // Registered in the opposite order to the phases.
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => order.push('timer'));
    timer_mod_ns(ts, t0 + 100);
    const e = new EventNotifier();
    aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => {
      event_notifier_test_and_clear(x);
      order.push('fd');
    }, null);
    const bh = aio_bh_new(ctx, () => order.push('bh'));
    qemu_clock_advance_virtual_time(t0 + 100);
    event_notifier_set(e);
    qemu_bh_schedule(bh);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(order, ['bh', 'fd', 'timer']);
    assert.is(aio_poll(ctx, false), false);

    // Work created by a later phase waits for the next poll; a timer armed by a BH is
    // due in this very poll, because timers come last.
    order.length = 0;
    const bh2 = aio_bh_new(ctx, () => order.push('bh2'));
    const ts2 = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      order.push('timer2');
      qemu_bh_schedule(bh2);
    });
    aio_bh_schedule_oneshot(ctx, () => {
      order.push('oneshot');
      timer_mod_ns(ts2, t0 + 100);
    });
    assert.is(aio_poll(ctx, false), true);
    assert.equal(order, ['oneshot', 'timer2']);
    assert.is(aio_poll(ctx, false), true);
    assert.equal(order, ['oneshot', 'timer2', 'bh2']);
    assert.is(aio_poll(ctx, false), false);
    aio_set_event_notifier(ctx, e, false, null, null);
    aio_context_unref(ctx);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
});

// ---------------------------------------------------------------- aio_compute_timeout (S17)

test('S17 aio_compute_timeout: 0 with a BH, -1 when idle, a manual timer\'s exact distance', () => {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    const ctx = aio_context_new();
    assert.is(aio_compute_timeout(ctx), -1);

    const bh = aio_bh_new(ctx, () => {});
    qemu_bh_schedule(bh);
    assert.is(aio_compute_timeout(ctx), 0);
    qemu_bh_cancel(bh);
    assert.is(aio_compute_timeout(ctx), -1);

    const t0 = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {});
    timer_mod_ns(ts, t0 + 5000);
    assert.is(aio_compute_timeout(ctx), 5000);
    qemu_clock_advance_virtual_time(t0 + 2000);
    assert.is(aio_compute_timeout(ctx), 3000);
    qemu_bh_schedule_idle(bh);
    assert.is(aio_compute_timeout(ctx), 3000); // sooner than the idle BH's 10 ms
    timer_mod_ns(ts, t0 + 2000 + 20_000_000);
    assert.is(aio_compute_timeout(ctx), 10_000_000); // the idle BH's cap is sooner
    // Flags are ORed (S8): scheduling a BH that is pending as idle leaves it idle.
    qemu_bh_schedule(bh);
    assert.is(aio_compute_timeout(ctx), 10_000_000);
    const bh2 = aio_bh_new(ctx, () => {});
    qemu_bh_schedule(bh2);
    assert.is(aio_compute_timeout(ctx), 0);
    qemu_bh_cancel(bh2);
    qemu_bh_cancel(bh);
    qemu_clock_advance_virtual_time(t0 + 2000 + 30_000_000);
    assert.is(aio_compute_timeout(ctx), 0); // an expired timer
    timer_del(ts);
    assert.is(aio_compute_timeout(ctx), -1);

    // A real-clock timer: its distance, at most what was asked.
    const rt = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => {});
    timer_mod_ns(rt, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000_000);
    const d = aio_compute_timeout(ctx);
    assert.ok(d > 0 && d <= 1_000_000_000, String(d));
    timer_del(rt);
    qemu_bh_delete(bh);
    qemu_bh_delete(bh2);
    drain(ctx);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
});

// ---------------------------------------------------------------- GSource pieces (S45, S102)

test('S45 aio_pending counts ready handlers only; aio_prepare returns false', () => {
  const ctx = aio_context_new();
  const bh = aio_bh_new(ctx, () => {});
  qemu_bh_schedule(bh);
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => {});
  timer_mod_ns(ts, 0); // already expired
  assert.is(aio_pending(ctx), false); // BHs and timers are not "pending" handlers
  assert.is(aio_prepare(ctx), false);

  const e = new EventNotifier();
  aio_set_event_notifier(ctx, e, true, (x: EventNotifier) => event_notifier_test_and_clear(x), null);
  assert.is(aio_pending(ctx), false);
  event_notifier_set(e);
  assert.is(aio_pending(ctx), true);
  aio_disable_external(ctx);
  assert.is(aio_pending(ctx), false); // an external handler is not pending while disabled
  aio_enable_external(ctx);
  assert.is(aio_pending(ctx), true);
  event_notifier_test_and_clear(e);
  assert.is(aio_pending(ctx), false);

  const w = new EventNotifier();
  aio_set_fd_handler(ctx, event_notifier_get_fd(w), false, null, () => {}, null, null);
  assert.is(aio_pending(ctx), true); // write interest is always ready
  aio_set_fd_handler(ctx, event_notifier_get_fd(w), false, null, null, null, null);
  assert.is(aio_pending(ctx), false);

  aio_set_event_notifier(ctx, e, true, null, null);
  qemu_bh_delete(bh);
  drain(ctx);
});

test('S102 aio_dispatch runs BHs, then every ready handler, then timers, in ctx', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => order.push('timer'));
  timer_mod_ns(ts, 0);
  const e1 = new EventNotifier();
  const e2 = new EventNotifier();
  const read = (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    order.push(x === e1 ? 'fd1' : 'fd2');
  };
  aio_set_event_notifier(ctx, e1, false, read, null);
  aio_set_event_notifier(ctx, e2, false, read, null);
  aio_bh_schedule_oneshot(ctx, () => order.push(qemu_get_current_aio_context() === ctx ? 'bh-in-ctx' : 'bh-elsewhere'));
  event_notifier_set(e1);
  aio_dispatch(ctx);
  assert.equal(order, ['bh-in-ctx', 'fd1', 'timer']);
  aio_dispatch(ctx); // nothing left: e2 was never set
  assert.equal(order, ['bh-in-ctx', 'fd1', 'timer']);
  assert.is(qemu_get_current_aio_context(), qemu_get_aio_context());
  aio_set_event_notifier(ctx, e1, false, null, null);
  aio_set_event_notifier(ctx, e2, false, null, null);
  drain(ctx);
});

test('S102/DESIGN an exception escaping aio_dispatch restores the current context; the rest runs next time', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const boom = new Error('dispatch boom');
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => order.push('timer'));
  timer_mod_ns(ts, 0);
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => {
    order.push('B');
    throw boom;
  });
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  assert.is(thrown(() => aio_dispatch(ctx)), boom);
  assert.equal(order, ['B']);
  assert.is(qemu_get_current_aio_context(), qemu_get_aio_context());
  aio_dispatch(ctx);
  assert.equal(order, ['B', 'A', 'timer']);
  drain(ctx);
});

// ---------------------------------------------------------------- nesting (S27)

test('S27 a nested aio_poll dispatches handlers ready in the parent, and each readiness only once', () => {
  const ctx = aio_context_new();
  const e1 = new EventNotifier();
  const e2 = new EventNotifier();
  const calls: string[] = [];
  let depth = 0;
  let nestedRet: boolean | null = null;
  const read = (x: EventNotifier) => {
    calls.push(`${x === e1 ? 'e1' : 'e2'}:${event_notifier_test_and_clear(x)}`);
    if (depth === 0) {
      depth++;
      nestedRet = aio_poll(ctx, false);
      depth--;
    }
  };
  aio_set_event_notifier(ctx, e1, false, read, null);
  aio_set_event_notifier(ctx, e2, false, read, null);
  assert.is(aio_poll(ctx, false), false);
  event_notifier_set(e1);
  event_notifier_set(e2);
  assert.is(aio_poll(ctx, false), true);
  // Whichever ran first (S32 leaves that open), the other one ran inside the nested poll,
  // and the parent did not dispatch it a second time.
  assert.is(calls.length, 2, calls.join());
  assert.equal([...calls].sort(), ['e1:true', 'e2:true']);
  assert.is(nestedRet, true);
  assert.is(aio_poll(ctx, false), false);
  aio_set_event_notifier(ctx, e1, false, null, null);
  aio_set_event_notifier(ctx, e2, false, null, null);
  drain(ctx);
});

// ---------------------------------------------------------------- adaptive polling (S35-S39)

test('S1/S39 polling starts off; set_poll_params stores, resets poll_ns to 0 and notifies', () => {
  const ctx = aio_context_new();
  assert.equal([ctx.poll_ns, ctx.poll_max_ns, ctx.poll_grow, ctx.poll_shrink], [0, 0, 0, 0]);
  assert.is(aio_poll(ctx, false), false);
  assert.is(ctx.poll_ns, 0); // poll_max_ns == 0: no adjustment at all

  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  assert.equal([ctx.poll_max_ns, ctx.poll_grow, ctx.poll_shrink], [1_000_000_000, 0, 0]);
  pollFor(ctx, 200_000);
  assert.is(ctx.poll_ns, 4000);
  aio_notify_accept(ctx);
  aio_context_set_poll_params(ctx, 60_000_000, 3, 5);
  assert.equal([ctx.poll_ns, ctx.poll_max_ns, ctx.poll_grow, ctx.poll_shrink], [0, 60_000_000, 3, 5]);
  assert.is(aio_poll(ctx, true), false); // woken by set_poll_params' notification
  assertNotNotified(ctx);
});

test('S39 negative or non-integer poll params throw QemuError and change nothing', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1000, 2, 3);
  const max = '9223372036854775807'; // QEMU's text (INT64_MAX); the check itself stops at 2**53
  throwsExactly(() => aio_context_set_poll_params(ctx, -1, 0, 0), QemuError, 'poll-max-ns value must be in range [0, 9223372036854775807]');
  throwsExactly(() => aio_context_set_poll_params(ctx, 0, -1, 0), QemuError, `poll-grow value must be in range [0, ${max}]`);
  throwsExactly(() => aio_context_set_poll_params(ctx, 0, 0, -2), QemuError, `poll-shrink value must be in range [0, ${max}]`);
  throwsExactly(() => aio_context_set_poll_params(ctx, 1.5, 0, 0), QemuError, `poll-max-ns value must be in range [0, ${max}]`);
  throwsExactly(() => aio_context_set_poll_params(ctx, Number.MAX_SAFE_INTEGER + 2, 0, 0), QemuError, `poll-max-ns value must be in range [0, ${max}]`);
  assert.equal([ctx.poll_max_ns, ctx.poll_grow, ctx.poll_shrink], [1000, 2, 3]);
  aio_context_set_poll_params(ctx, Number.MAX_SAFE_INTEGER, 0, 0); // the bounds themselves are fine
  assert.is(ctx.poll_max_ns, Number.MAX_SAFE_INTEGER);
});

test('S38 poll_ns grows 0 -> 4000 -> x2 while polls block longer than poll_ns', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  const seen: number[] = [];
  for (let i = 0; i < 5; i++) {
    pollFor(ctx, 200_000);
    seen.push(ctx.poll_ns);
  }
  assert.equal(seen, [4000, 8000, 16000, 32000, 64000]);
});

test('S38 poll_grow multiplies poll_ns', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 3, 0);
  const seen: number[] = [];
  for (let i = 0; i < 3; i++) {
    pollFor(ctx, 200_000);
    seen.push(ctx.poll_ns);
  }
  assert.equal(seen, [4000, 12000, 36000]);
});

test('S38 a quick non-blocking aio_poll grows poll_ns from 0 to 4000', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  assert.is(aio_poll(ctx, false), false);
  assert.is(ctx.poll_ns, 4000);
});

// Real waits only have a reliable lower bound (a loaded machine may oversleep by
// milliseconds), so growth uses a poll_max_ns of 1 s that no wait here reaches.
test('S38 poll_ns is clamped at poll_max_ns and left alone in the sweet spot', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 1_000_000, 4);
  pollFor(ctx, 200_000);
  assert.is(ctx.poll_ns, 4000);
  pollFor(ctx, 200_000);
  assert.is(ctx.poll_ns, 1_000_000_000); // 4000 * 1e6 clamped
  pollFor(ctx, 200_000);
  assert.is(ctx.poll_ns, 1_000_000_000); // block_ns <= poll_ns: no change
});

test('S38 a poll longer than poll_max_ns shrinks poll_ns by poll_shrink, or to 0', () => {
  // Shrinking needs a poll longer than poll_max_ns after poll_ns has grown; growing under
  // a small poll_max_ns depends on the machine being fast, so poll_ns is seeded directly.
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 3_000_000, 0, 4);
  ctx.poll_ns = 2_000_000;
  pollFor(ctx, 4_000_000);
  assert.is(ctx.poll_ns, 500_000);
  pollFor(ctx, 4_000_000);
  assert.is(ctx.poll_ns, 125_000);

  aio_context_set_poll_params(ctx, 3_000_000, 0, 0);
  assert.is(ctx.poll_ns, 0);
  ctx.poll_ns = 2_000_000;
  pollFor(ctx, 4_000_000);
  assert.is(ctx.poll_ns, 0);
});

test('S25/S35/S37 io_poll joins polling only after a dispatch, and its success is the progress', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  const e = new EventNotifier();
  const calls: string[] = [];
  aio_set_event_notifier(
    ctx,
    e,
    false,
    (x: EventNotifier) => {
      calls.push(`read:${event_notifier_test_and_clear(x)}`);
    },
    (x: EventNotifier) => {
      const r = event_notifier_test_and_clear(x);
      calls.push(`poll:${r}`);
      return r;
    },
  );
  aio_set_event_notifier_poll(ctx, e, () => calls.push('begin'), () => calls.push('end'));
  assert.is(aio_poll(ctx, false), false); // consume the registration's notification
  assert.ok(ctx.poll_ns > 0, String(ctx.poll_ns));

  // S25: every handler has io_poll and polling is not active: a non-blocking poll does
  // not look at readiness at all.
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), false);
  assert.equal(calls, []);

  // A blocking poll waits, sees it ready and dispatches io_read; only now does the
  // handler join the poll list (S35). Polling was not started, so no io_poll_begin.
  assert.is(aio_poll(ctx, true), true);
  assert.equal(calls, ['read:true']);

  // Next time, busy-polling finds the event: io_poll's true is the handling and the
  // progress (5.2, S37); io_read is not called.
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true);
  assert.equal(calls, ['read:true', 'begin', 'poll:true']);

  // Polling mode stays started after a success; a non-blocking poll (max_ns 0) stops it:
  // io_poll_end, then one last io_poll.
  assert.is(aio_poll(ctx, false), false);
  assert.equal(calls, ['read:true', 'begin', 'poll:true', 'end', 'poll:false']);

  // Removing the handler takes it off the poll list: nothing is polled any more.
  aio_set_event_notifier(ctx, e, false, null, null);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, false), false);
  assertNotNotified(ctx);
  assert.equal(calls, ['read:true', 'begin', 'poll:true', 'end', 'poll:false']);
});

test('S36 the io_poll after io_poll_end finding work counts as progress, without blocking', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  const e = new EventNotifier();
  const calls: string[] = [];
  aio_set_event_notifier(
    ctx,
    e,
    false,
    (x: EventNotifier) => {
      calls.push(`read:${event_notifier_test_and_clear(x)}`);
    },
    (x: EventNotifier) => {
      const r = event_notifier_test_and_clear(x);
      calls.push(`poll:${r}`);
      return r;
    },
  );
  aio_set_event_notifier_poll(
    ctx,
    e,
    () => calls.push('begin'),
    (x: EventNotifier) => {
      calls.push('end');
      event_notifier_set(x); // an event racing with io_poll_end
    },
  );
  assert.is(aio_poll(ctx, false), false);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true); // joins the poll list
  assert.equal(calls.splice(0), ['read:true']);
  assert.ok(ctx.poll_ns > 0);

  // Nothing is set: io_poll fails until poll_ns runs out, then io_poll_end sets the
  // notifier and the final io_poll finds it. That is progress; the poll does not block.
  assert.is(aio_poll(ctx, true), true);
  assert.ok(calls.length >= 4, calls.join());
  assert.is(calls[0], 'begin');
  assert.equal(calls.slice(-2), ['end', 'poll:true']);
  assert.ok(calls.slice(1, -2).every((c) => c === 'poll:false'), calls.join());
  assert.is(event_notifier_test_and_clear(e), false);
  aio_set_event_notifier(ctx, e, false, null, null);
  drain(ctx);
});

test('S45 aio_prepare stops polling mode (io_poll_end and a last io_poll); aio_dispatch adds poll handlers', () => {
  const ctx = aio_context_new();
  aio_context_set_poll_params(ctx, 1_000_000_000, 0, 0);
  const e = new EventNotifier();
  const calls: string[] = [];
  const poll = (x: EventNotifier) => {
    const r = event_notifier_test_and_clear(x);
    calls.push(`poll:${r}`);
    return r;
  };
  aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => calls.push(`read:${event_notifier_test_and_clear(x)}`), poll);
  aio_set_event_notifier_poll(ctx, e, () => calls.push('begin'), () => calls.push('end'));
  assert.is(aio_poll(ctx, false), false);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true);
  event_notifier_set(e);
  assert.is(aio_poll(ctx, true), true); // polling mode now started
  assert.equal(calls.splice(0), ['read:true', 'begin', 'poll:true']);

  // A second poll handler joining through aio_dispatch while polling mode is on gets
  // io_poll_begin at once (S35).
  const e2 = new EventNotifier();
  aio_set_event_notifier(ctx, e2, false, () => calls.push('read2'), (x: EventNotifier) => {
    calls.push('poll2');
    return event_notifier_test_and_clear(x);
  });
  aio_set_event_notifier_poll(ctx, e2, () => calls.push('begin2'), () => calls.push('end2'));
  aio_dispatch(ctx);
  assert.equal(calls.splice(0), ['begin2']);

  assert.is(aio_prepare(ctx), false);
  assert.equal([...calls].sort(), ['end', 'end2', 'poll2', 'poll:false'].sort());
  calls.length = 0;
  assert.is(aio_prepare(ctx), false); // already stopped: nothing
  assert.equal(calls, []);
  aio_set_event_notifier(ctx, e, false, null, null);
  aio_set_event_notifier(ctx, e2, false, null, null);
  drain(ctx);
});

// ---------------------------------------------------------------- finalize (S2)

function my_leaked_bh(): void {}
function my_armed_timer_cb(): void {}
function* scheduled_entry(log: string[]): CoroutineFn<void> {
  log.push('ran');
}

test('S2 ref/unref: only the last unref finalizes; a finalized context refuses further use', () => {
  const ctx = aio_context_new();
  aio_context_ref(ctx);
  aio_context_unref(ctx);
  let n = 0;
  aio_bh_schedule_oneshot(ctx, () => n++);
  assert.is(aio_poll(ctx, false), true); // still alive
  assert.is(n, 1);
  // An unscheduled BH is simply garbage; a deleted one is freed by finalize.
  aio_bh_new(ctx, my_leaked_bh);
  const del = aio_bh_new(ctx, my_leaked_bh);
  qemu_bh_schedule(del);
  qemu_bh_delete(del);
  aio_context_unref(ctx);
  const name = ctx.name;
  throwsExactly(() => aio_context_unref(ctx), QemuError, `aio_context_unref: context '${name}' was already finalized`);
  throwsExactly(() => aio_context_ref(ctx), QemuError, `aio_context_ref: context '${name}' was already finalized`);
  throwsExactly(() => aio_poll(ctx, false), QemuError, `aio_poll: context '${name}' was finalized`);
  throwsExactly(() => aio_dispatch(ctx), QemuError, `aio_dispatch: context '${name}' was finalized`);
});

test('S2 finalizing with a scheduled BH throws the leak message; the context stays usable', () => {
  const ctx = aio_context_new();
  const bh = aio_bh_new(ctx, my_leaked_bh);
  qemu_bh_schedule(bh);
  throwsExactly(() => aio_context_unref(ctx), QemuError, "aio_ctx_finalize: BH 'my_leaked_bh' leaked, aborting...");
  // A cancelled BH is still queued, so still leaked (only BH_DELETED is accepted).
  qemu_bh_cancel(bh);
  throwsExactly(() => aio_context_unref(ctx), QemuError, "aio_ctx_finalize: BH 'my_leaked_bh' leaked, aborting...");
  qemu_bh_schedule(bh);
  assert.is(aio_poll(ctx, false), true);
  aio_context_unref(ctx); // nothing queued any more
  throwsExactly(() => aio_poll(ctx, false), QemuError, `aio_poll: context '${ctx.name}' was finalized`);
});

test('S2 finalizing with an armed timer throws naming the timer\'s callback', () => {
  const ctx = aio_context_new();
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, my_armed_timer_cb);
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 60_000_000_000);
  throwsExactly(
    () => aio_context_unref(ctx),
    QemuError,
    `aio_ctx_finalize: timer 'my_armed_timer_cb' is still armed in context '${ctx.name}' (timerlist_free: Assertion '!timerlist_has_timers(timer_list)' failed)`,
  );
  timer_del(ts);
  aio_context_unref(ctx);
});

test('S2 finalizing with a scheduled coroutine throws naming it', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const co = qemu_coroutine_create(scheduled_entry, log, 'sched-co');
  aio_co_schedule(ctx, co);
  throwsExactly(
    () => aio_context_unref(ctx),
    QemuError,
    `aio_ctx_finalize: coroutine 'sched-co' is still scheduled in context '${ctx.name}'`,
  );
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['ran']);
  aio_context_unref(ctx);
});

test('S2 finalizing from inside aio_bh_poll with BHs left in the slice throws; they still run', () => {
  const ctx = aio_context_new();
  const order: string[] = [];
  const a = aio_bh_new(ctx, () => order.push('A'));
  const b = aio_bh_new(ctx, () => {
    order.push('B');
    aio_context_unref(ctx);
  });
  qemu_bh_schedule(a);
  qemu_bh_schedule(b);
  throwsExactly(
    () => aio_poll(ctx, false),
    QemuError,
    `aio_ctx_finalize: context '${ctx.name}' is finalized while it is dispatching (Assertion 'QSIMPLEQ_EMPTY(&ctx->bh_slice_list)' failed)`,
  );
  assert.equal(order, ['B']);
  assert.is(qemu_get_current_aio_context(), qemu_get_aio_context());
  assert.is(aio_poll(ctx, false), true);
  assert.equal(order, ['B', 'A']);
  aio_context_unref(ctx);
});

test('S2 the main context cannot be finalized', () => {
  const main = qemu_get_aio_context();
  throwsExactly(() => aio_context_unref(main), QemuError, 'aio_context_unref: the main context cannot be finalized');
  let n = 0;
  aio_bh_schedule_oneshot(main, () => n++);
  assert.is(aio_poll(main, false), true);
  assert.is(n, 1);
});

// ---------------------------------------------------------------- acquire/release (S6)

test('S6 aio_context_acquire/release count recursively; an unbalanced release throws', () => {
  const ctx = aio_context_new();
  aio_context_acquire(ctx);
  aio_context_acquire(ctx); // recursive, never blocks
  aio_context_release(ctx);
  aio_context_release(ctx);
  throwsExactly(() => aio_context_release(ctx), QemuError, `aio_context_release: context '${ctx.name}' is not acquired`);
  // A poll does not take it (S6).
  aio_context_acquire(ctx);
  aio_bh_schedule_oneshot(ctx, () => {});
  assert.is(aio_poll(ctx, true), true);
  aio_context_release(ctx);
  throwsExactly(() => aio_context_release(ctx), QemuError, `aio_context_release: context '${ctx.name}' is not acquired`);
});

// ---------------------------------------------------------------- current context (S101)

test('S101 qemu_get_current_aio_context is ctx during aio_poll(ctx), main at top level', () => {
  const main = qemu_get_aio_context();
  const ctx = aio_context_new();
  const seen: AioContext[] = [];
  assert.is(qemu_get_current_aio_context(), main);
  aio_bh_schedule_oneshot(ctx, () => seen.push(qemu_get_current_aio_context()));
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => seen.push(qemu_get_current_aio_context()));
  timer_mod_ns(ts, 0);
  const e = new EventNotifier(true);
  aio_set_event_notifier(ctx, e, false, (x: EventNotifier) => {
    event_notifier_test_and_clear(x);
    seen.push(qemu_get_current_aio_context());
  }, null);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(seen, [ctx, ctx, ctx]);
  assert.is(qemu_get_current_aio_context(), main);
  aio_set_event_notifier(ctx, e, false, null, null);
  drain(ctx);
});

test('API: after an exception escapes a callback through aio_poll the current context is restored', () => {
  const main = qemu_get_aio_context();
  const ctx = aio_context_new();
  const boom = new Error('bh boom');
  let caught: unknown = null;

  aio_bh_schedule_oneshot(ctx, () => {
    throw boom;
  });
  try {
    aio_poll(ctx, false);
  } catch (e) {
    caught = e;
  }
  assert.is(caught, boom);
  assert.is(qemu_get_current_aio_context(), main);

  // From a nested poll of another context inside a BH: each level is restored.
  const ctx2 = aio_context_new();
  const seen: AioContext[] = [];
  aio_bh_schedule_oneshot(ctx2, () => {
    throw boom;
  });
  aio_bh_schedule_oneshot(ctx, () => {
    try {
      aio_poll(ctx2, false);
    } catch {
      seen.push(qemu_get_current_aio_context());
    }
  });
  assert.is(aio_poll(ctx, false), true);
  assert.equal(seen, [ctx]);

  // From an fd handler and from a timer.
  const e = new EventNotifier(true);
  aio_set_event_notifier(ctx, e, false, () => {
    throw boom;
  }, null);
  caught = null;
  try {
    aio_poll(ctx, false);
  } catch (err) {
    caught = err;
  }
  assert.is(caught, boom);
  assert.is(qemu_get_current_aio_context(), main);
  aio_set_event_notifier(ctx, e, false, null, null);

  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    throw boom;
  });
  timer_mod_ns(ts, 0);
  caught = null;
  try {
    aio_poll(ctx, false);
  } catch (err) {
    caught = err;
  }
  assert.is(caught, boom);
  assert.is(qemu_get_current_aio_context(), main);

  // And the loop keeps working.
  let n = 0;
  aio_bh_schedule_oneshot(ctx, () => n++);
  assert.is(aio_poll(ctx, false), true);
  assert.is(n, 1);
  drain(ctx);
});

// ---------------------------------------------------------------- finalize (S2): review regressions

test('S2 the last unref from inside the context\'s own dispatch is refused even with nothing left in the slice (BH, timer, aio_dispatch); the context keeps working', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const dispatching = `aio_ctx_finalize: context '${ctx.name}' is finalized while it is dispatching (Assertion 'QSIMPLEQ_EMPTY(&ctx->bh_slice_list)' failed)`;
  const tryUnref = (where: string) => {
    try {
      aio_context_unref(ctx);
      log.push(`${where}: finalized`);
    } catch (e) {
      log.push(`${where}: ${e instanceof QemuError ? 'QemuError' : 'other'} ${(e as Error).message}`);
    }
  };
  // the only BH of its aio_bh_poll: its slice is already empty when it runs
  aio_bh_schedule_oneshot(ctx, () => tryUnref('last bh'));
  assert.is(aio_poll(ctx, false), true);
  // a timer callback: aio_bh_poll is over by then
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => tryUnref('timer'));
  timer_mod_ns(ts, 0);
  assert.is(aio_poll(ctx, false), true);
  // a BH run by aio_dispatch (the host-loop drive's entry point)
  aio_bh_schedule_oneshot(ctx, () => tryUnref('aio_dispatch bh'));
  aio_dispatch(ctx);
  assert.equal(log, [`last bh: QemuError ${dispatching}`, `timer: QemuError ${dispatching}`, `aio_dispatch bh: QemuError ${dispatching}`]);
  // nothing changed: the context works, and its one reference is still there
  let n = 0;
  aio_bh_schedule_oneshot(ctx, () => n++);
  assert.is(aio_poll(ctx, false), true);
  assert.is(n, 1);
  aio_context_unref(ctx);
  throwsExactly(() => aio_poll(ctx, false), QemuError, `aio_poll: context '${ctx.name}' was finalized`);
});

test('S2 a finalize refused for an armed timer changes nothing: a coroutine scheduled after it runs, BHs run, and a later unref finalizes', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, my_armed_timer_cb);
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 60_000_000_000);
  throwsExactly(
    () => aio_context_unref(ctx),
    QemuError,
    `aio_ctx_finalize: timer 'my_armed_timer_cb' is still armed in context '${ctx.name}' (timerlist_free: Assertion '!timerlist_has_timers(timer_list)' failed)`,
  );
  timer_del(ts);
  aio_co_schedule(ctx, qemu_coroutine_create(scheduled_entry, log, 'after-refusal'));
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['ran']);
  aio_bh_schedule_oneshot(ctx, () => log.push('bh'));
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['ran', 'bh']);
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
  throwsExactly(() => aio_poll(ctx, false), QemuError, `aio_poll: context '${ctx.name}' was finalized`);
});

test('S2/DESIGN a finalized context that was attached to Node\'s loop is released (garbage collected), with or without destroy() first', async () => {
  const r = await runNode(['--expose-gc', '--import', 'tsx', 'test/aio/fixtures/finalized-attached-gc.ts']);
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'destroy() then unref: 50/50 collected\nunref only: 50/50 collected\n');
});

test.run();
