// Waiting: AIO_WAIT_WHILE, aio_wait_kick, aio_wait_bh_oneshot and the blocking phase of
// aio_poll (S86-S88, S26; DESIGN "Contexts and the one JS thread" (waiting at any depth),
// "Blocking, and the host loop" (never hangs silently)).
// The main context is never attached to Node's loop in this file; IOThreads are (by
// iothread_create), but every test here drives them synchronously.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AIO_WAIT_WHILE,
  AioContext,
  AioWaitError,
  QEMU_CLOCK_REALTIME,
  QEMU_CLOCK_VIRTUAL,
  QemuError,
  SCALE_NS,
  aio_bh_schedule_oneshot,
  aio_co_wake,
  aio_compute_timeout,
  aio_context_new,
  aio_context_unref,
  aio_get_g_source,
  aio_notify,
  aio_poll,
  aio_timer_new,
  aio_wait_bh_oneshot,
  aio_wait_kick,
  coAwait,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_aio_coroutine_enter,
  qemu_clock_set_manual,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_get_aio_context,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_in_coroutine,
  timer_del,
  timer_mod_ns,
  timer_pending,
  type Coroutine,
  type CoroutineFn,
  type QEMUTimer,
} from '../../src/index.ts';
import { assertIdle } from '../helpers/assert.ts';
import { within } from '../helpers/async.ts';

const main = qemu_get_aio_context();
const PREFIX = 'aio_poll: this blocking wait can never end: ';

function isWaitErr(check: (msg: string) => boolean) {
  return (e: unknown) => e instanceof AioWaitError && e.message.startsWith(PREFIX) && check(e.message);
}

// --- S86: return value and when cond is evaluated ---

test('S86 AIO_WAIT_WHILE returns false without polling when cond is false at once', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  aio_bh_schedule_oneshot(main, () => log.push('main bh'));
  aio_bh_schedule_oneshot(ctx, () => log.push('ctx bh'));
  let calls = 0;
  assert.is(AIO_WAIT_WHILE(null, () => (calls++, false)), false);
  assert.is(AIO_WAIT_WHILE(ctx, () => (calls++, false)), false);
  assert.is(calls, 2);
  assert.equal(log, [], 'nothing may be polled');
  assert.is(aio_poll(main, false), true);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['main bh', 'ctx bh']);
  aio_context_unref(ctx);
});

test('S86 AIO_WAIT_WHILE(null, cond) polls main until cond is false and returns true', () => {
  let n = 0;
  const step = () => {
    n++;
    if (n < 3) aio_bh_schedule_oneshot(main, step);
  };
  aio_bh_schedule_oneshot(main, step);
  assert.is(AIO_WAIT_WHILE(null, () => n < 3), true);
  assert.is(n, 3);
  assertIdle(main);
});

test('DESIGN: AIO_WAIT_WHILE re-evaluates cond after each context\'s poll, its own context first', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  let done = false;
  aio_bh_schedule_oneshot(main, () => log.push('main bh'));
  aio_bh_schedule_oneshot(ctx, () => {
    log.push(`ctx bh@${qemu_get_current_aio_context() === ctx ? 'ctx' : 'other'}`);
    done = true;
  });
  assert.is(
    AIO_WAIT_WHILE(ctx, () => {
      log.push('cond');
      return !done;
    }),
    true,
  );
  assert.equal(log, ['cond', 'ctx bh@ctx', 'cond'], 'cond must be checked right after ctx\'s poll, before main is polled');
  assert.is(aio_poll(main, false), true);
  assert.equal(log, ['cond', 'ctx bh@ctx', 'cond', 'main bh']);
  aio_context_unref(ctx);
});

// --- Rules the contract pins down: work that ends cond may run in any context ---

test('contract: AIO_WAIT_WHILE(null, cond) finishes when an IOThread\'s BH ends cond, without aio_wait_kick', () => {
  const t = iothread_create('wait-no-kick');
  const io = iothread_get_aio_context(t);
  let where: AioContext | null = null;
  aio_bh_schedule_oneshot(io, () => {
    where = qemu_get_current_aio_context();
  });
  assert.is(AIO_WAIT_WHILE(null, () => where === null), true);
  assert.is(where, io);
  assertIdle(main, io);
  iothread_destroy(t);
});

test('S87 contract: AIO_WAIT_WHILE(null, cond) finishes when an IOThread\'s BH ends cond and kicks; the kick is a BH in main', () => {
  const t = iothread_create('wait-kick');
  const io = iothread_get_aio_context(t);
  let done = false;
  aio_bh_schedule_oneshot(io, () => {
    done = true;
    aio_wait_kick();
  });
  assert.is(AIO_WAIT_WHILE(null, () => !done), true);
  // cond was re-checked right after the IOThread's poll, so the kick BH is still queued in main
  assert.is(aio_poll(main, false), true, 'aio_wait_kick with a waiter schedules a BH in the main context');
  assertIdle(main, io);
  // without waiters, aio_wait_kick does nothing
  aio_wait_kick();
  assertIdle(main);
  iothread_destroy(t);
});

test('AIO_WAIT_WHILE(ctx, cond) with an unattached ctx: work bouncing between ctx, an IOThread and main completes', () => {
  const t = iothread_create('wait-bounce');
  const io = iothread_get_aio_context(t);
  const ctx = aio_context_new();
  const log: string[] = [];
  const where = () => qemu_get_current_aio_context().name;
  aio_bh_schedule_oneshot(ctx, () => {
    log.push(`1@${where()}`);
    aio_bh_schedule_oneshot(io, () => {
      log.push(`2@${where()}`);
      aio_bh_schedule_oneshot(main, () => {
        log.push(`3@${where()}`);
        aio_bh_schedule_oneshot(ctx, () => log.push(`4@${where()}`));
      });
    });
  });
  assert.is(AIO_WAIT_WHILE(ctx, () => log.length < 4), true);
  assert.equal(log, [`1@${ctx.name}`, '2@wait-bounce', '3@main', `4@${ctx.name}`]);
  assertIdle(main, io, ctx);
  iothread_destroy(t);
  aio_context_unref(ctx);
});

test('DESIGN: a context from aio_context_new() that is not attached is not driven by a wait on another context', () => {
  const ctx = aio_context_new();
  let ran = false;
  aio_bh_schedule_oneshot(ctx, () => {
    ran = true;
  });
  assert.throws(
    () => AIO_WAIT_WHILE(null, () => !ran),
    isWaitErr((m) => m === `${PREFIX}no context it drives has a scheduled BH, an armed timer on a running clock or an outstanding request`),
  );
  assert.is(ran, false);
  // once attached, waits on main drive it
  const src = aio_get_g_source(ctx);
  src.attach();
  try {
    assert.is(AIO_WAIT_WHILE(null, () => !ran), true);
    assert.is(ran, true);
  } finally {
    src.destroy();
  }
  assertIdle(ctx);
  aio_context_unref(ctx);
});

// --- S88: aio_wait_bh_oneshot ---

test('S88 aio_wait_bh_oneshot runs cb in ctx (ctx current inside cb) and returns after it ran', () => {
  const t = iothread_create('oneshot-io');
  const io = iothread_get_aio_context(t);
  const ctx = aio_context_new();
  const log: string[] = [];
  aio_wait_bh_oneshot(io, (o: { tag: string }) => log.push(`${o.tag}@${qemu_get_current_aio_context().name}`), { tag: 'io' });
  assert.equal(log, ['io@oneshot-io']);
  aio_wait_bh_oneshot(ctx, (o: string) => log.push(`${o}@${qemu_get_current_aio_context() === ctx ? 'ctx' : 'other'}`), 'plain');
  assert.equal(log, ['io@oneshot-io', 'plain@ctx']);
  aio_wait_bh_oneshot(main, () => log.push(`main@${qemu_get_current_aio_context().name}`));
  assert.equal(log, ['io@oneshot-io', 'plain@ctx', 'main@main']);
  assert.is(qemu_get_current_aio_context(), main);
  // the BH kicked (a waiter existed): that leaves one BH in main, nothing else anywhere
  assert.is(aio_poll(main, false), true);
  assertIdle(main, io, ctx);
  iothread_destroy(t);
  aio_context_unref(ctx);
});

test('S88 aio_wait_bh_oneshot outside the main context throws QemuError (QEMU asserts)', () => {
  const ctx = aio_context_new();
  let err: unknown = null;
  let ran = false;
  aio_bh_schedule_oneshot(ctx, () => {
    try {
      aio_wait_bh_oneshot(main, () => {
        ran = true;
      });
    } catch (e) {
      err = e;
    }
  });
  assert.is(aio_poll(ctx, false), true);
  assert.ok(
    err instanceof QemuError &&
      err.message === "aio_wait_bh_oneshot: Assertion 'qemu_get_current_aio_context() == qemu_get_aio_context()' failed",
    String(err),
  );
  assert.is(ran, false);
  assertIdle(main, ctx);
  aio_context_unref(ctx);
});

// --- Timers: a wait sleeps until a real-clock timer is due ---

test('AIO_WAIT_WHILE waits for a real-clock timer of 3 ms in main', () => {
  let fired = 0;
  const ts = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    fired = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  });
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  timer_mod_ns(ts, t0 + 3_000_000);
  assert.is(AIO_WAIT_WHILE(null, () => fired === 0), true);
  const elapsed = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
  assert.ok(fired - t0 >= 3_000_000, `fired after ${fired - t0} ns`);
  assert.ok(elapsed < 1e9, `took ${elapsed} ns`);
  assertIdle(main);
});

test('AIO_WAIT_WHILE(null, cond) waits for a real-clock timer armed in an IOThread\'s context', () => {
  const t = iothread_create('timer-io');
  const io = iothread_get_aio_context(t);
  let where: string | null = null;
  const ts = aio_timer_new(io, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    where = qemu_get_current_aio_context().name;
  });
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  timer_mod_ns(ts, t0 + 2_000_000);
  assert.is(AIO_WAIT_WHILE(null, () => where === null), true);
  assert.is(where, 'timer-io');
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0 >= 2_000_000);
  assertIdle(main, io);
  iothread_destroy(t);
});

test('S26 a blocking aio_poll really blocks until a real-clock timer of 3 ms is due, then returns true', () => {
  const ctx = aio_context_new();
  let fired = 0;
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    fired = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  });
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  timer_mod_ns(ts, t0 + 3_000_000);
  // arming the first timer notified ctx; consume that (S20) so the next poll really blocks
  assert.is(aio_poll(ctx, false), false);
  assert.is(fired, 0);
  assert.is(aio_poll(ctx, true), true);
  const elapsed = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
  assert.ok(fired !== 0 && fired - t0 >= 3_000_000, `timer ran ${fired - t0} ns after arming`);
  assert.ok(elapsed >= 3_000_000 && elapsed < 1e9, `aio_poll blocked ${elapsed} ns`);
  assert.is(timer_pending(ts), false);
  aio_context_unref(ctx);
});

// --- aio_poll(ctx, true) drives the others, but only ctx's work is its progress ---

test('DESIGN: a blocking aio_poll(ctx) runs main\'s BH while it waits, but that work does not count toward its result', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  aio_bh_schedule_oneshot(main, () => {
    log.push(`main bh@${qemu_get_current_aio_context().name}`);
    aio_notify(ctx); // wakes ctx without giving it a callback to run
  });
  assert.is(aio_poll(ctx, true), false);
  assert.equal(log, ['main bh@main']);
  assert.is(qemu_get_current_aio_context(), main);
  assertIdle(main, ctx);
  aio_context_unref(ctx);
});

test('DESIGN: a blocking aio_poll(ctx) waiting for its own timer drives an IOThread meanwhile and returns true for the timer', () => {
  const t = iothread_create('drive-io');
  const io = iothread_get_aio_context(t);
  const ctx = aio_context_new();
  const log: string[] = [];
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => log.push(`timer@${qemu_get_current_aio_context() === ctx ? 'ctx' : 'other'}`));
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 2_000_000);
  assert.is(aio_poll(ctx, false), false);
  aio_bh_schedule_oneshot(io, () => log.push(`io bh@${qemu_get_current_aio_context().name}`));
  assert.is(aio_poll(ctx, true), true);
  assert.equal(log, ['io bh@drive-io', 'timer@ctx']);
  assertIdle(main, io, ctx);
  iothread_destroy(t);
  aio_context_unref(ctx);
});

// --- Never hangs silently ---

test('DESIGN: AIO_WAIT_WHILE that nothing can end throws AioWaitError and leaves no waiter behind', () => {
  assertIdle(main);
  let calls = 0;
  assert.throws(
    () => AIO_WAIT_WHILE(null, () => (calls++, true)),
    isWaitErr((m) => m === `${PREFIX}no context it drives has a scheduled BH, an armed timer on a running clock or an outstanding request`),
  );
  assert.ok(calls >= 2, 'cond is evaluated before and after polling');
  aio_wait_kick(); // num_waiters is back to 0: no BH
  assertIdle(main);
});

test('DESIGN: aio_poll(ctx, true) on an idle context throws AioWaitError', () => {
  const ctx = aio_context_new();
  assert.throws(() => aio_poll(ctx, true), isWaitErr(() => true));
  assert.throws(() => aio_poll(main, true), isWaitErr(() => true));
  assert.is(qemu_get_current_aio_context(), main, 'current context restored');
  // and the context keeps working
  let ran = false;
  aio_bh_schedule_oneshot(ctx, () => {
    ran = true;
  });
  assert.is(aio_poll(ctx, true), true);
  assert.is(ran, true);
  aio_context_unref(ctx);
});

test('DESIGN: with only manual-clock timers a blocking wait throws, naming the context and the manual clock', () => {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  const ctx = aio_context_new();
  try {
    let fired = false;
    const ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      fired = true;
    });
    const now = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    timer_mod_ns(ts, now + 1_000_000);
    assert.is(aio_poll(ctx, false), false);
    assert.is(aio_compute_timeout(ctx), 1_000_000, 'aio_compute_timeout still reports the manual-clock distance');
    const mentionsManual = (m: string) =>
      m.includes(`context '${ctx.name}' has timers only on the manual clock`) && m.includes('qemu_clock_advance_virtual_time');
    assert.throws(() => aio_poll(ctx, true), isWaitErr(mentionsManual));
    assert.throws(() => AIO_WAIT_WHILE(ctx, () => !fired), isWaitErr(mentionsManual));
    assert.is(fired, false);
    qemu_clock_advance_virtual_time(now + 1_000_000);
    assert.is(aio_poll(ctx, true), true);
    assert.is(fired, true);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
  aio_context_unref(ctx);
});

interface Parker {
  p: Promise<number>;
  got: number | null;
  done: () => void;
}
function* parkOnPromise(s: Parker): CoroutineFn<void> {
  s.got = yield* coAwait(s.p);
  s.done();
}

test('DESIGN: a blocking wait while a coroutine is parked in coAwait throws AioWaitError naming the coroutine', async () => {
  let resolve!: (v: number) => void;
  let finished!: () => void;
  const finishedP = new Promise<void>((r) => (finished = r));
  const s: Parker = { p: new Promise<number>((r) => (resolve = r)), got: null, done: finished };
  let resolve2!: (v: number) => void;
  let finished2!: () => void;
  const finished2P = new Promise<void>((r) => (finished2 = r));
  const s2: Parker = { p: new Promise<number>((r) => (resolve2 = r)), got: null, done: finished2 };
  try {
    qemu_coroutine_enter(qemu_coroutine_create(parkOnPromise, s, 'parker'));
    assert.is(s.got, null);
    assert.throws(
      () => AIO_WAIT_WHILE(null, () => s.got === null),
      isWaitErr((m) => m.includes("coroutine 'parker' is parked in coAwait, which only Node's event loop can resolve")),
    );
    assert.throws(() => aio_poll(main, true), isWaitErr((m) => m.includes("coroutine 'parker' is parked in coAwait")));
    // an unnamed one is reported too
    qemu_coroutine_enter(qemu_coroutine_create(parkOnPromise, s2));
    assert.throws(() => AIO_WAIT_WHILE(null, () => true), isWaitErr((m) => m.includes('coroutine an unnamed coroutine is parked in coAwait')));
  } finally {
    resolve(7);
    resolve2(8);
    await within(Promise.all([finishedP, finished2P]), 2000, 'parked coroutines resumed');
  }
  assert.is(s.got, 7);
  assert.is(s2.got, 8);
  // nothing is parked any more: the reason is gone
  assert.throws(() => AIO_WAIT_WHILE(null, () => true), isWaitErr((m) => !m.includes('parked')));
});

// --- Skipped contexts: dispatching further up the JS stack ---

test('DESIGN: a wait from inside a BH of an IOThread, whose needed work sits in that IOThread, throws naming the context', () => {
  const t = iothread_create('skipped-io');
  const io = iothread_get_aio_context(t);
  let done = false;
  let err: unknown = null;
  aio_bh_schedule_oneshot(io, () => {
    aio_bh_schedule_oneshot(io, () => {
      done = true;
    });
    try {
      AIO_WAIT_WHILE(null, () => !done);
    } catch (e) {
      err = e;
    }
  });
  assert.is(aio_poll(io, false), true);
  assert.ok(
    isWaitErr((m) => m.includes("context 'skipped-io' has work but is dispatching further up the stack"))(err),
    String(err),
  );
  assert.is(done, false);
  assert.is(aio_poll(io, false), true);
  assert.is(done, true);
  assertIdle(main, io);
  iothread_destroy(t);
});

test('DESIGN: a skipped IOThread whose only work is an armed timer is named too; the timer still runs later', () => {
  const t = iothread_create('skipped-timer-io');
  const io = iothread_get_aio_context(t);
  let fired = false;
  let err: unknown = null;
  const ts = aio_timer_new(io, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    fired = true;
  });
  // Far enough ahead that a loaded machine cannot reach it before the BH runs.
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 300_000_000);
  aio_bh_schedule_oneshot(io, () => {
    try {
      AIO_WAIT_WHILE(null, () => !fired);
    } catch (e) {
      err = e;
    }
  });
  // this poll accepts the notifications (phase 7) before running the BH (phase 9)
  assert.is(aio_poll(io, false), true);
  assert.ok(
    isWaitErr((m) => m.includes("context 'skipped-timer-io' has work but is dispatching further up the stack"))(err),
    String(err),
  );
  assert.is(fired, false);
  assert.is(AIO_WAIT_WHILE(io, () => !fired), true);
  assertIdle(main, io);
  iothread_destroy(t);
});

test('DESIGN: a wait on ctx from inside a BH of ctx itself nests and completes (ctx may nest, as in QEMU)', () => {
  const t = iothread_create('nesting-io');
  const io = iothread_get_aio_context(t);
  const log: string[] = [];
  aio_bh_schedule_oneshot(io, () => {
    aio_bh_schedule_oneshot(io, () => log.push(`inner@${qemu_get_current_aio_context().name}`));
    log.push(`waited=${AIO_WAIT_WHILE(io, () => log.length === 0)}`);
  });
  assert.is(aio_poll(io, false), true);
  assert.equal(log, ['inner@nesting-io', 'waited=true']);
  assertIdle(main, io);
  iothread_destroy(t);
});

test('DESIGN: a blocking aio_poll(main) inside a BH of another context skips that context but drives the rest', () => {
  const t = iothread_create('waker-io');
  const io = iothread_get_aio_context(t);
  const ctx = aio_context_new();
  const src = aio_get_g_source(ctx);
  src.attach();
  const log: string[] = [];
  let result: boolean | null = null;
  aio_bh_schedule_oneshot(ctx, () => {
    aio_bh_schedule_oneshot(ctx, () => log.push('ctx second bh'));
    aio_bh_schedule_oneshot(io, () => {
      log.push(`io bh@${qemu_get_current_aio_context().name}`);
      aio_bh_schedule_oneshot(main, () => log.push(`main bh@${qemu_get_current_aio_context().name}`));
    });
    result = aio_poll(main, true);
  });
  assert.is(aio_poll(ctx, false), true);
  assert.is(result, true);
  assert.equal(log, ['io bh@waker-io', 'main bh@main'], 'ctx is dispatching further up the stack: its second BH must wait');
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['io bh@waker-io', 'main bh@main', 'ctx second bh']);
  src.destroy();
  assertIdle(main, io, ctx);
  iothread_destroy(t);
  aio_context_unref(ctx);
});

// --- A wait inside a coroutine (S69, S101; DESIGN "Contexts and the one JS thread") ---
// Another context's callbacks run as on that context's own thread: outside any coroutine,
// so a coroutine they wake is entered at once, in its own context. The coroutine's own
// context keeps QEMU's behaviour: its callbacks run inside the waiting coroutine, and a
// wake-up they make waits until the coroutine yields (S69b).

interface InCoWait {
  io: AioContext;
  log: string[];
  mainWorker: Coroutine | null;
  ioWorker: Coroutine | null;
  ioDone: boolean;
  deadline: number; // REALTIME ns after which the wait gives up (a hang would be a failure too)
}

function* parkedWorker(s: InCoWait): CoroutineFn<void> {
  yield* qemu_coroutine_yield();
  const self = qemu_coroutine_self();
  s.log.push(
    `${self.name} resumed@${qemu_get_current_aio_context().name} home=${qemu_coroutine_get_aio_context(self)?.name} in_coroutine=${qemu_in_coroutine()}`,
  );
  if (self === s.ioWorker) s.ioDone = true;
}

function* waitsInCoroutine(s: InCoWait): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  const who = () => `in_coroutine=${qemu_in_coroutine()} self_is_waiter=${qemu_coroutine_self() === self}`;
  // Own context (main): the BH runs inside this coroutine; the wake-up is deferred.
  aio_bh_schedule_oneshot(main, () => {
    s.log.push(`main bh ${who()}`);
    aio_co_wake(s.mainWorker as Coroutine);
    s.log.push('main bh woke main-worker');
  });
  s.log.push(`poll main=${aio_poll(main, false)}`);
  s.log.push('waiter yields');
  yield* qemu_coroutine_yield();
  // Another context: its BH runs outside any coroutine; the wake-up enters at once, in io.
  aio_bh_schedule_oneshot(s.io, () => {
    s.log.push(`io bh ${who()}`);
    aio_co_wake(s.ioWorker as Coroutine);
    s.log.push(`io bh woke io-worker done=${s.ioDone}`);
  });
  try {
    s.log.push(`waited=${AIO_WAIT_WHILE(s.io, () => !s.ioDone && qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < s.deadline)}`);
  } catch (e) {
    s.log.push(`wait threw ${(e as Error).name}`);
  }
  s.log.push(`waiter after the wait ${who()}@${qemu_get_current_aio_context().name}`);
}

test('S69/DESIGN: inside a coroutine, a wait runs another context\'s callbacks outside it (a wake-up there enters at once, in that context); its own context\'s inside it (deferred, S69b)', () => {
  const t = iothread_create('in-co-wait-io');
  const io = iothread_get_aio_context(t);
  const s: InCoWait = {
    io,
    log: [],
    mainWorker: null,
    ioWorker: null,
    ioDone: false,
    deadline: qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 2e9,
  };
  s.mainWorker = qemu_coroutine_create(parkedWorker, s, 'main-worker');
  qemu_coroutine_enter(s.mainWorker); // parked, home main
  s.ioWorker = qemu_coroutine_create(parkedWorker, s, 'io-worker');
  qemu_aio_coroutine_enter(io, s.ioWorker); // parked, home io
  const waiter = qemu_coroutine_create(waitsInCoroutine, s, 'waiter');
  qemu_coroutine_enter(waiter);
  s.log.push('enter returned');
  qemu_coroutine_enter(waiter);
  assert.equal(s.log, [
    'main bh in_coroutine=true self_is_waiter=true',
    'main bh woke main-worker',
    'poll main=true',
    'waiter yields',
    'main-worker resumed@main home=main in_coroutine=true',
    'enter returned',
    'io bh in_coroutine=false self_is_waiter=false',
    'io-worker resumed@in-co-wait-io home=in-co-wait-io in_coroutine=true',
    'io bh woke io-worker done=true',
    'waited=true',
    'waiter after the wait in_coroutine=true self_is_waiter=true@main',
  ]);
  assert.is(qemu_in_coroutine(), false);
  assert.is(qemu_get_current_aio_context(), main);
  assertIdle(main, io);
  iothread_destroy(t);
});

interface Ticker {
  timer: QEMUTimer | null;
}

function tick1ms(k: Ticker): void {
  timer_mod_ns(k.timer as QEMUTimer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000);
}

function* wakesIoWorkerAndWaits(s: InCoWait): CoroutineFn<void> {
  aio_bh_schedule_oneshot(s.io, () => aio_co_wake(s.ioWorker as Coroutine));
  s.log.push(`waited=${AIO_WAIT_WHILE(s.io, () => !s.ioDone && qemu_clock_get_ns(QEMU_CLOCK_REALTIME) < s.deadline)}`);
}

test('S69/DESIGN: a wait inside a coroutine for an IOThread coroutine woken by that IOThread\'s BH ends at once, even with a periodic timer that keeps the wait alive', () => {
  const t = iothread_create('in-co-wait-tick-io');
  const io = iothread_get_aio_context(t);
  // An unrelated periodic timer, as any real program has: nothing can prove the wait endless.
  const tick: Ticker = { timer: null };
  tick.timer = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_NS, tick1ms, tick);
  timer_mod_ns(tick.timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000);
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  const s: InCoWait = { io, log: [], mainWorker: null, ioWorker: null, ioDone: false, deadline: t0 + 500_000_000 };
  s.ioWorker = qemu_coroutine_create(parkedWorker, s, 'io-worker');
  qemu_aio_coroutine_enter(io, s.ioWorker);
  qemu_coroutine_enter(qemu_coroutine_create(wakesIoWorkerAndWaits, s, 'waiter'));
  const elapsed = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
  assert.equal(s.log, ['io-worker resumed@in-co-wait-tick-io home=in-co-wait-tick-io in_coroutine=true', 'waited=true']);
  assert.ok(elapsed < 400_000_000, `the wait spun for ${elapsed} ns`);
  assert.is(timer_pending(tick.timer), true, 'the periodic timer stayed armed throughout');
  timer_del(tick.timer);
  assertIdle(main, io);
  iothread_destroy(t);
});

test.run();
