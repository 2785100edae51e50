// IOThreads: iothread_create / iothread_get_aio_context / iothread_destroy, their polling
// parameters, and a coroutine moving main -> IOThread -> main (S70, S39; DESIGN "Contexts
// and the one JS thread", "Blocking, and the host loop").
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AIO_WAIT_WHILE,
  AioContext,
  IOThread,
  QEMU_CLOCK_REALTIME,
  SCALE_NS,
  aio_bh_new,
  aio_bh_schedule_oneshot,
  aio_co_reschedule_self,
  aio_co_schedule,
  aio_context_set_poll_params,
  aio_get_thread_pool,
  aio_poll,
  aio_timer_new,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_bh_schedule,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_get_aio_context,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_init_main_loop,
  qemu_clock_get_ns,
  thread_pool_nop,
  thread_pool_submit_aio,
  timer_del,
  timer_mod_ns,
  type CoroutineFn,
} from '../../src/index.ts';
import { isQemuErr } from '../helpers/assert.ts';
import { within } from '../helpers/async.ts';

const main = qemu_get_aio_context();
const MAX = '9223372036854775807'; // QEMU's INT64_MAX, as its property setter prints it

test('iothread_create gives an IOThread with its own context; destroy finalizes that context', () => {
  const t = iothread_create('io-basic');
  assert.ok(t instanceof IOThread);
  assert.is(t.id, 'io-basic');
  const ctx = iothread_get_aio_context(t);
  assert.ok(ctx instanceof AioContext);
  assert.is.not(ctx, main);
  assert.is(iothread_get_aio_context(t), ctx, 'the same context every time');
  assert.is(ctx.name, 'io-basic', 'messages name the context after the IOThread');
  // it is a working context
  const log: string[] = [];
  aio_bh_schedule_oneshot(ctx, () => log.push(qemu_get_current_aio_context().name));
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['io-basic']);
  const t2 = iothread_create('io-basic-2');
  assert.is.not(iothread_get_aio_context(t2), ctx);
  iothread_destroy(t2);
  iothread_destroy(t);
  assert.throws(() => aio_poll(ctx, false), isQemuErr("aio_poll: context 'io-basic' was finalized"));
  assert.throws(() => iothread_destroy(t), isQemuErr("iothread_destroy: IOThread 'io-basic' does not exist"));
});

test("S39 IOThread poll parameters default to QEMU's (max 32768 ns, grow 0, shrink 0) and take options", () => {
  const d = iothread_create('io-defaults');
  const dc = iothread_get_aio_context(d);
  assert.equal([dc.poll_max_ns, dc.poll_grow, dc.poll_shrink, dc.poll_ns], [32768, 0, 0, 0]);
  const o = iothread_create('io-opts', { poll_max_ns: 100000, poll_grow: 3, poll_shrink: 4 });
  const oc = iothread_get_aio_context(o);
  assert.equal([oc.poll_max_ns, oc.poll_grow, oc.poll_shrink], [100000, 3, 4]);
  const off = iothread_create('io-off', { poll_max_ns: 0 });
  const offc = iothread_get_aio_context(off);
  assert.equal([offc.poll_max_ns, offc.poll_grow, offc.poll_shrink], [0, 0, 0]);
  // a partial set keeps the other defaults
  const g = iothread_create('io-grow', { poll_grow: 2 });
  const gc = iothread_get_aio_context(g);
  assert.equal([gc.poll_max_ns, gc.poll_grow, gc.poll_shrink], [32768, 2, 0]);
  // later changes through aio_context_set_poll_params apply to the IOThread's context
  aio_context_set_poll_params(gc, 5000, 0, 2);
  assert.equal([gc.poll_max_ns, gc.poll_grow, gc.poll_shrink], [5000, 0, 2]);
  for (const t of [d, o, off, g]) {
    aio_poll(iothread_get_aio_context(t), false); // consume the set_poll_params notification
    iothread_destroy(t);
  }
});

test("iothread_create with a duplicate id throws QemuError \"Duplicate ID 'x' for object\"; the id is free again after destroy", () => {
  const t = iothread_create('x');
  assert.throws(() => iothread_create('x'), isQemuErr("Duplicate ID 'x' for object"));
  assert.throws(() => iothread_create('x', { poll_max_ns: 0 }), isQemuErr("Duplicate ID 'x' for object"));
  // the first one is untouched
  const log: string[] = [];
  aio_bh_schedule_oneshot(iothread_get_aio_context(t), () => log.push('ran'));
  assert.is(aio_poll(iothread_get_aio_context(t), false), true);
  assert.equal(log, ['ran']);
  iothread_destroy(t);
  const again = iothread_create('x');
  assert.is.not(iothread_get_aio_context(again), iothread_get_aio_context(t));
  iothread_destroy(again);
});

test('iothread_create with a negative poll parameter throws QemuError and creates nothing', () => {
  assert.throws(() => iothread_create('neg', { poll_max_ns: -1 }), isQemuErr(`poll-max-ns value must be in range [0, ${MAX}]`));
  assert.throws(() => iothread_create('neg', { poll_grow: -2 }), isQemuErr(`poll-grow value must be in range [0, ${MAX}]`));
  assert.throws(() => iothread_create('neg', { poll_shrink: -3 }), isQemuErr(`poll-shrink value must be in range [0, ${MAX}]`));
  // the id was not taken
  const t = iothread_create('neg');
  iothread_destroy(t);
});

function leakedTimer(_: unknown): void {}
function* yieldOnce(_: null): CoroutineFn<void> {
  yield* qemu_coroutine_yield();
}

test('S2 iothread_destroy with a scheduled BH throws naming it; the IOThread stays registered and usable', async () => {
  const t = iothread_create('io-leak');
  const ctx = iothread_get_aio_context(t);
  let runs = 0;
  const bh = aio_bh_new(ctx, function leakedBh() {
    runs++;
  });
  qemu_bh_schedule(bh);
  assert.throws(() => iothread_destroy(t), isQemuErr("aio_ctx_finalize: BH 'leakedBh' leaked, aborting..."));
  // still registered
  assert.throws(() => iothread_create('io-leak'), isQemuErr("Duplicate ID 'io-leak' for object"));
  assert.is(iothread_get_aio_context(t), ctx);
  // still attached to Node's loop: the leaked BH runs without any aio_poll
  await within(
    new Promise<void>((resolve) => {
      const check = () => (runs > 0 ? resolve() : setImmediate(check));
      check();
    }),
    2000,
    'IOThread BH dispatched by the host loop after a refused destroy',
  );
  assert.is(runs, 1);
  // still usable synchronously
  aio_bh_schedule_oneshot(ctx, () => runs++);
  assert.is(aio_poll(ctx, false), true);
  assert.is(runs, 2);
  iothread_destroy(t);
  assert.throws(() => aio_poll(ctx, false), isQemuErr("aio_poll: context 'io-leak' was finalized"));
});

test('S2 iothread_destroy with a scheduled coroutine or an armed timer throws naming it; destroy works once they are gone', () => {
  const t = iothread_create('io-leak2');
  const ctx = iothread_get_aio_context(t);
  const co = qemu_coroutine_create(yieldOnce, null, 'stuck-co');
  aio_co_schedule(ctx, co);
  assert.throws(() => iothread_destroy(t), isQemuErr("aio_ctx_finalize: coroutine 'stuck-co' is still scheduled in context 'io-leak2'"));
  assert.is(aio_poll(ctx, false), true); // enters it; it yields
  assert.is(qemu_coroutine_get_aio_context(co), ctx);
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, leakedTimer);
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1e9);
  assert.throws(
    () => iothread_destroy(t),
    isQemuErr(
      "aio_ctx_finalize: timer 'leakedTimer' is still armed in context 'io-leak2' (timerlist_free: Assertion '!timerlist_has_timers(timer_list)' failed)",
    ),
  );
  timer_del(ts);
  iothread_destroy(t);
});

// --- The README flow: main -> IOThread -> main ---

interface Trip {
  io: AioContext;
  log: string[];
  done?: () => void;
}
function* roundTrip(t: Trip): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  const here = () => `${qemu_get_current_aio_context().name}/${qemu_coroutine_get_aio_context(self)?.name}`;
  t.log.push(`start ${here()}`);
  yield* aio_co_reschedule_self(t.io);
  t.log.push(`in io ${here()}`);
  yield* aio_co_reschedule_self(qemu_get_aio_context());
  t.log.push(`back ${here()}`);
  t.done?.();
}

test('S70 README flow driven by AIO_WAIT_WHILE: a coroutine moves main -> IOThread -> main', () => {
  const t = iothread_create('io-trip');
  const io = iothread_get_aio_context(t);
  const trip: Trip = { io, log: [] };
  const co = qemu_coroutine_create(roundTrip, trip);
  qemu_coroutine_enter(co);
  assert.equal(trip.log, ['start main/main']);
  assert.is(AIO_WAIT_WHILE(null, () => trip.log.length < 3), true);
  assert.equal(trip.log, ['start main/main', 'in io io-trip/io-trip', 'back main/main']);
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(io, false), false);
  iothread_destroy(t);
});

test('S70 README flow driven by the host loop: main -> IOThread -> main without any aio_poll', async () => {
  qemu_init_main_loop();
  const t = iothread_create('io-trip-host');
  const io = iothread_get_aio_context(t);
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const trip: Trip = { io, log: [], done };
  const co = qemu_coroutine_create(roundTrip, trip);
  aio_co_schedule(main, co);
  assert.equal(trip.log, [], 'aio_co_schedule never runs synchronously');
  await within(finished, 2000, 'coroutine round trip through the host loop');
  assert.equal(trip.log, ['start main/main', 'in io io-trip-host/io-trip-host', 'back main/main']);
  assert.is(qemu_get_current_aio_context(), main);
  iothread_destroy(t);
});

test('S70 several coroutines hop to the same IOThread and back under the host loop, each in order', async () => {
  const t = iothread_create('io-many');
  const io = iothread_get_aio_context(t);
  const trips: Trip[] = [];
  const all: Promise<void>[] = [];
  for (let i = 0; i < 3; i++) {
    let done!: () => void;
    all.push(new Promise<void>((r) => (done = r)));
    const trip: Trip = { io, log: [], done };
    trips.push(trip);
    qemu_coroutine_enter(qemu_coroutine_create(roundTrip, trip));
  }
  await within(Promise.all(all), 2000, 'three round trips');
  for (const trip of trips) assert.equal(trip.log, ['start main/main', 'in io io-many/io-many', 'back main/main']);
  iothread_destroy(t);
});

// --- A refused iothread_destroy changes nothing (S2: finalize checks before it frees) ---

function* logWhere(log: string[]): CoroutineFn<void> {
  log.push(`co@${qemu_get_current_aio_context().name}`);
}

test('S2 an iothread_destroy refused for an armed timer leaves the IOThread working: aio_co_schedule and BHs still run; a later destroy succeeds', () => {
  const t = iothread_create('io-refused');
  const ctx = iothread_get_aio_context(t);
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, leakedTimer);
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 60e9);
  assert.throws(
    () => iothread_destroy(t),
    isQemuErr(
      "aio_ctx_finalize: timer 'leakedTimer' is still armed in context 'io-refused' (timerlist_free: Assertion '!timerlist_has_timers(timer_list)' failed)",
    ),
  );
  timer_del(ts);
  const log: string[] = [];
  aio_co_schedule(ctx, qemu_coroutine_create(logWhere, log, 'scheduled-after-refusal'));
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['co@io-refused']);
  aio_bh_schedule_oneshot(ctx, () => log.push(`bh@${qemu_get_current_aio_context().name}`));
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['co@io-refused', 'bh@io-refused']);
  iothread_destroy(t);
  assert.throws(() => aio_poll(ctx, false), isQemuErr("aio_poll: context 'io-refused' was finalized"));
  // the id is free again
  iothread_destroy(iothread_create('io-refused'));
});

test('S2/S97 an iothread_destroy refused for an armed timer leaves its thread pool working: a request submitted after it completes; a later destroy succeeds', () => {
  const t = iothread_create('io-refused-pool');
  const ctx = iothread_get_aio_context(t);
  const pool = aio_get_thread_pool(ctx);
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, leakedTimer);
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 60e9);
  assert.throws(
    () => iothread_destroy(t),
    isQemuErr(
      "aio_ctx_finalize: timer 'leakedTimer' is still armed in context 'io-refused-pool' (timerlist_free: Assertion '!timerlist_has_timers(timer_list)' failed)",
    ),
  );
  timer_del(ts);
  assert.is(aio_get_thread_pool(ctx), pool, 'the same pool');
  const log: string[] = [];
  thread_pool_submit_aio(pool, thread_pool_nop, null, (opaque: unknown, ret: number) => {
    log.push(`cb ${String(opaque)} ret=${ret}@${qemu_get_current_aio_context().name}`);
  }, 'req');
  // A guard timer bounds the wait: should the request never complete, the test fails instead of hanging.
  const guard = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => log.push('guard fired'));
  timer_mod_ns(guard, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 5e9);
  assert.is(AIO_WAIT_WHILE(ctx, () => log.length === 0), true);
  timer_del(guard);
  assert.equal(log, ['cb req ret=0@io-refused-pool']);
  iothread_destroy(t);
  assert.throws(() => aio_poll(ctx, false), isQemuErr("aio_poll: context 'io-refused-pool' was finalized"));
});

test.run();
