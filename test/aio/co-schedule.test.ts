// Moving coroutines between contexts: aio_co_schedule, aio_co_enter, aio_co_wake,
// aio_co_reschedule_self, qemu_coroutine_get_aio_context (S64-S70, DESIGN "Contexts and the
// one JS thread", "Exceptions never drop queued work").
// No context here is attached to Node's loop: everything runs from explicit aio_poll calls.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AioContext,
  QEMU_CLOCK_VIRTUAL,
  aio_bh_schedule_oneshot,
  aio_co_enter,
  aio_co_reschedule_self,
  aio_co_schedule,
  aio_co_wake,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_clock_set_manual,
  qemu_co_sleep_ns,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_entered,
  qemu_coroutine_get_aio_context,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from '../../src/index.ts';
import { isCoErr } from '../helpers/assert.ts';
import { pollUntilIdle } from '../helpers/aio.ts';

const main = qemu_get_aio_context();

interface Step {
  log: string[];
  name: string;
}

/** Logs each resumption together with the context it runs in; yields `n` times. */
function* loggingYielder(s: Step & { n: number }): CoroutineFn<void> {
  for (let i = 0; i < s.n; i++) {
    s.log.push(`${s.name}:${i}@${qemu_get_current_aio_context().name}`);
    yield* qemu_coroutine_yield();
  }
  s.log.push(`${s.name}:end@${qemu_get_current_aio_context().name}`);
}

function* logOnce(s: Step): CoroutineFn<void> {
  s.log.push(`${s.name}@${qemu_get_current_aio_context().name}`);
}

// --- S65: aio_co_schedule never runs the coroutine synchronously ---

test('S65 aio_co_schedule to the current context from plain code does not run the coroutine before the next BH round', () => {
  const s = { log: [] as string[], name: 'a', n: 1 };
  const co = qemu_coroutine_create(loggingYielder, s);
  qemu_coroutine_enter(co);
  assert.equal(s.log, ['a:0@main']);
  assert.is(qemu_get_current_aio_context(), main);
  aio_co_schedule(main, co);
  assert.equal(s.log, ['a:0@main'], 'scheduling ran the coroutine synchronously');
  assert.is(aio_poll(main, false), true, 'co_schedule_bh entering a coroutine is progress');
  assert.equal(s.log, ['a:0@main', 'a:end@main']);
  assert.is(aio_poll(main, false), false);
});

function* scheduleSelfThenYield(s: Step): CoroutineFn<void> {
  s.log.push('before');
  aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self());
  s.log.push('scheduled');
  yield* qemu_coroutine_yield();
  s.log.push('resumed');
}

test('S65/S67 a coroutine scheduling itself in its own context then yielding resumes from the next BH round, not before', () => {
  const s = { log: [] as string[], name: 'x' };
  const co = qemu_coroutine_create(scheduleSelfThenYield, s);
  qemu_coroutine_enter(co);
  assert.equal(s.log, ['before', 'scheduled']);
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, ['before', 'scheduled', 'resumed']);
  assert.is(qemu_coroutine_entered(co), false);
});

// --- S66: FIFO order, snapshot of the scheduled list ---

test('S66 several coroutines scheduled in one context run oldest first in one BH round', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const cos = ['a', 'b', 'c', 'd'].map((name) => qemu_coroutine_create(logOnce, { log, name }));
  for (const co of cos) aio_co_schedule(ctx, co);
  assert.equal(log, []);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, [`a@${ctx.name}`, `b@${ctx.name}`, `c@${ctx.name}`, `d@${ctx.name}`]);
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
});

interface Chain {
  log: string[];
  ctx: AioContext;
  later: Coroutine[];
}
function* scheduleOthersWhileRunning(c: Chain): CoroutineFn<void> {
  c.log.push('first');
  for (const co of c.later) aio_co_schedule(c.ctx, co);
  // and itself again: also the next round
  aio_co_schedule(c.ctx, qemu_coroutine_self());
  yield* qemu_coroutine_yield();
  c.log.push('first again');
}

test('S66 coroutines scheduled while co_schedule_bh runs are entered by the next BH round', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const later = [qemu_coroutine_create(logOnce, { log, name: 'x' }), qemu_coroutine_create(logOnce, { log, name: 'y' })];
  const first = qemu_coroutine_create(scheduleOthersWhileRunning, { log, ctx, later });
  const second = qemu_coroutine_create(logOnce, { log, name: 'second' });
  aio_co_schedule(ctx, first);
  aio_co_schedule(ctx, second);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['first', `second@${ctx.name}`]);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['first', `second@${ctx.name}`, `x@${ctx.name}`, `y@${ctx.name}`, 'first again']);
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
});

// --- S65/S56: double scheduling and entering a scheduled coroutine ---

test('S65 scheduling an already scheduled coroutine throws CoroutineError with QEMU\'s message, and the first schedule still holds', () => {
  const ctx = aio_context_new();
  const s = { log: [] as string[], name: 'a', n: 1 };
  const co = qemu_coroutine_create(loggingYielder, s);
  qemu_coroutine_enter(co);
  aio_co_schedule(ctx, co);
  assert.throws(() => aio_co_schedule(ctx, co), isCoErr("aio_co_schedule: Co-routine was already scheduled in 'aio_co_schedule'"));
  assert.throws(() => aio_co_schedule(main, co), isCoErr("aio_co_schedule: Co-routine was already scheduled in 'aio_co_schedule'"));
  assert.is(aio_poll(main, false), false, 'the refused schedule in main must not have queued anything');
  assert.is(aio_poll(ctx, false), true);
  assert.equal(s.log, ['a:0@main', `a:end@${ctx.name}`]);
  assert.is(aio_poll(ctx, false), false, 'entered exactly once');
  aio_context_unref(ctx);
});

test('S56/S67 entering a scheduled coroutine throws the qemu_aio_coroutine_enter message; the scheduled entry still runs once', () => {
  const ctx = aio_context_new();
  const s = { log: [] as string[], name: 'a', n: 1 };
  const co = qemu_coroutine_create(loggingYielder, s);
  qemu_coroutine_enter(co);
  aio_co_schedule(ctx, co);
  const msg = "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'";
  assert.throws(() => qemu_coroutine_enter(co), isCoErr(msg));
  assert.throws(() => qemu_aio_coroutine_enter(ctx, co), isCoErr(msg));
  assert.throws(() => aio_co_enter(main, co), isCoErr(msg));
  assert.throws(() => aio_co_wake(co), isCoErr(msg), 'aio_co_wake in main (its last context) enters directly');
  assert.equal(s.log, ['a:0@main']);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(s.log, ['a:0@main', `a:end@${ctx.name}`]);
  aio_context_unref(ctx);
});

function* sleeper(s: Step): CoroutineFn<void> {
  s.log.push('sleep');
  yield* qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 1000);
  s.log.push('woke');
}

test("S65/S84 scheduling a sleeping coroutine throws naming 'qemu_co_sleep_ns'", () => {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    const s = { log: [] as string[], name: 's' };
    const co = qemu_coroutine_create(sleeper, s);
    qemu_coroutine_enter(co);
    assert.throws(() => aio_co_schedule(main, co), isCoErr("aio_co_schedule: Co-routine was already scheduled in 'qemu_co_sleep_ns'"));
    assert.throws(() => qemu_coroutine_enter(co), isCoErr("qemu_aio_coroutine_enter: Co-routine was already scheduled in 'qemu_co_sleep_ns'"));
    qemu_clock_advance_virtual_time(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + 1000);
    assert.is(aio_poll(main, false), true);
    assert.equal(s.log, ['sleep', 'woke']);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
});

// --- S69: aio_co_enter ---

test('S69a aio_co_enter to another context schedules the coroutine there; it runs in that context\'s poll with that context current', () => {
  const ctx = aio_context_new();
  const s = { log: [] as string[], name: 'a', n: 1 };
  const co = qemu_coroutine_create(loggingYielder, s);
  aio_co_enter(ctx, co);
  assert.equal(s.log, [], 'must not run synchronously');
  assert.is(qemu_coroutine_get_aio_context(co), null);
  assert.is(aio_poll(main, false), false, 'main does not run it');
  assert.equal(s.log, []);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(s.log, [`a:0@${ctx.name}`]);
  assert.is(qemu_coroutine_get_aio_context(co), ctx);
  // a second time, from inside a BH of main: still "another context"
  aio_bh_schedule_oneshot(main, () => aio_co_enter(ctx, co));
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, [`a:0@${ctx.name}`]);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(s.log, [`a:0@${ctx.name}`, `a:end@${ctx.name}`]);
  aio_context_unref(ctx);
});

interface Enterer {
  log: string[];
  target: Coroutine;
  terminate: boolean;
}
function* enterSameContext(e: Enterer): CoroutineFn<void> {
  e.log.push('caller: before');
  aio_co_enter(qemu_get_current_aio_context(), e.target);
  e.log.push('caller: after aio_co_enter');
  if (e.terminate) return;
  yield* qemu_coroutine_yield();
  e.log.push('caller: resumed');
}

test('S69b aio_co_enter to the same context from a coroutine is deferred until the caller yields', () => {
  const log: string[] = [];
  const target = qemu_coroutine_create(logOnce, { log, name: 'target' });
  const caller = qemu_coroutine_create(enterSameContext, { log, target, terminate: false });
  qemu_coroutine_enter(caller);
  assert.equal(log, ['caller: before', 'caller: after aio_co_enter', 'target@main']);
  assert.is(aio_poll(main, false), false, 'nothing was scheduled');
  qemu_coroutine_enter(caller);
  assert.equal(log, ['caller: before', 'caller: after aio_co_enter', 'target@main', 'caller: resumed']);
});

test('S69b aio_co_enter to the same context from a coroutine runs the target when the caller terminates', () => {
  const log: string[] = [];
  const target = qemu_coroutine_create(logOnce, { log, name: 'target' });
  const caller = qemu_coroutine_create(enterSameContext, { log, target, terminate: true });
  qemu_coroutine_enter(caller);
  assert.equal(log, ['caller: before', 'caller: after aio_co_enter', 'target@main']);
});

function* enterSelf(_: null): CoroutineFn<void> {
  aio_co_enter(qemu_get_current_aio_context(), qemu_coroutine_self());
}

test('S69b aio_co_enter of the running coroutine itself throws "Co-routine re-entered recursively"', () => {
  const co = qemu_coroutine_create(enterSelf, null);
  assert.throws(() => qemu_coroutine_enter(co), isCoErr('Co-routine re-entered recursively'));
});

test('S69c aio_co_enter to the same context from plain code enters the coroutine before returning', () => {
  const s = { log: [] as string[], name: 'a', n: 1 };
  const co = qemu_coroutine_create(loggingYielder, s);
  aio_co_enter(main, co);
  assert.equal(s.log, ['a:0@main']);
  assert.is(qemu_coroutine_get_aio_context(co), main);
  // from a BH of another context, with that context current: also immediate
  const ctx = aio_context_new();
  const s2 = { log: [] as string[], name: 'b', n: 1 };
  const co2 = qemu_coroutine_create(loggingYielder, s2);
  aio_bh_schedule_oneshot(ctx, () => {
    assert.is(qemu_in_coroutine(), false);
    aio_co_enter(ctx, co2);
    s2.log.push('bh returns');
  });
  assert.is(aio_poll(ctx, false), true);
  assert.equal(s2.log, [`b:0@${ctx.name}`, 'bh returns']);
  assert.is(aio_poll(ctx, false), false);
  aio_co_enter(main, co);
  assert.equal(s.log, ['a:0@main', 'a:end@main']);
  // co2 last ran in ctx: from top level, waking it schedules it there
  aio_co_wake(co2);
  assert.equal(s2.log, [`b:0@${ctx.name}`, 'bh returns']);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(s2.log, [`b:0@${ctx.name}`, 'bh returns', `b:end@${ctx.name}`]);
  aio_context_unref(ctx);
});

// --- S68: aio_co_wake ---

test('S68 aio_co_wake resumes the coroutine in the context of its last entry', () => {
  const ctxA = aio_context_new();
  const ctxB = aio_context_new();
  const s = { log: [] as string[], name: 'w', n: 3 };
  const co = qemu_coroutine_create(loggingYielder, s);
  aio_co_schedule(ctxA, co);
  assert.is(aio_poll(ctxA, false), true);
  assert.is(qemu_coroutine_get_aio_context(co), ctxA);
  aio_co_wake(co); // from main: ctxA is another context -> scheduled in ctxA
  assert.equal(s.log, [`w:0@${ctxA.name}`]);
  assert.is(aio_poll(ctxB, false), false);
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(ctxA, false), true);
  assert.equal(s.log, [`w:0@${ctxA.name}`, `w:1@${ctxA.name}`]);
  // entered next from a BH of ctxB: its context becomes ctxB
  aio_bh_schedule_oneshot(ctxB, () => qemu_coroutine_enter(co));
  assert.is(aio_poll(ctxB, false), true);
  assert.equal(s.log, [`w:0@${ctxA.name}`, `w:1@${ctxA.name}`, `w:2@${ctxB.name}`]);
  assert.is(qemu_coroutine_get_aio_context(co), ctxB);
  // so a wake issued from a BH of ctxA goes to ctxB
  aio_bh_schedule_oneshot(ctxA, () => aio_co_wake(co));
  assert.is(aio_poll(ctxA, false), true);
  assert.equal(s.log.length, 3, 'not run by ctxA');
  assert.is(aio_poll(ctxA, false), false);
  assert.is(aio_poll(ctxB, false), true);
  assert.equal(s.log, [`w:0@${ctxA.name}`, `w:1@${ctxA.name}`, `w:2@${ctxB.name}`, `w:end@${ctxB.name}`]);
  aio_context_unref(ctxA);
  aio_context_unref(ctxB);
});

test('S68 aio_co_wake from a BH of another context schedules into the last context of the coroutine', () => {
  const ctxA = aio_context_new();
  const ctxB = aio_context_new();
  const s = { log: [] as string[], name: 'w', n: 1 };
  const co = qemu_coroutine_create(loggingYielder, s);
  aio_co_schedule(ctxA, co);
  aio_poll(ctxA, false);
  aio_bh_schedule_oneshot(ctxB, () => aio_co_wake(co));
  assert.is(aio_poll(ctxB, false), true);
  assert.equal(s.log, [`w:0@${ctxA.name}`], 'not run by ctxB');
  assert.is(aio_poll(ctxB, false), false);
  assert.is(aio_poll(ctxA, false), true);
  assert.equal(s.log, [`w:0@${ctxA.name}`, `w:end@${ctxA.name}`]);
  aio_context_unref(ctxA);
  aio_context_unref(ctxB);
});

test('S68 aio_co_wake of a coroutine never entered throws CoroutineError and leaves it untouched', () => {
  const log: string[] = [];
  const named = qemu_coroutine_create(logOnce, { log, name: 'n' }, 'never-run');
  assert.throws(
    () => aio_co_wake(named),
    isCoErr("aio_co_wake: Co-routine 'never-run' was never entered, so it has no AioContext"),
  );
  const anon = qemu_coroutine_create(logOnce, { log, name: 'anon' });
  assert.throws(() => aio_co_wake(anon), isCoErr('aio_co_wake: Co-routine was never entered, so it has no AioContext'));
  assert.is(aio_poll(main, false), false);
  assert.equal(log, []);
  qemu_coroutine_enter(named);
  assert.equal(log, ['n@main']);
});

// --- S64 / S70: aio_co_reschedule_self and the coroutine's context ---

interface Mover {
  log: string[];
  to: AioContext;
}
function* moveThereAndBack(m: Mover): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  m.log.push(`start@${qemu_get_current_aio_context().name} co=${qemu_coroutine_get_aio_context(self)?.name}`);
  yield* aio_co_reschedule_self(m.to);
  m.log.push(`moved@${qemu_get_current_aio_context().name} co=${qemu_coroutine_get_aio_context(self)?.name}`);
  yield* aio_co_reschedule_self(m.to); // already there: no-op, no yield
  m.log.push(`still@${qemu_get_current_aio_context().name}`);
  yield* aio_co_reschedule_self(main);
  m.log.push(`back@${qemu_get_current_aio_context().name} co=${qemu_coroutine_get_aio_context(self)?.name}`);
}

test('S70 aio_co_reschedule_self moves main -> other -> main with at least one BH round in each context', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const co = qemu_coroutine_create(moveThereAndBack, { log, to: ctx });
  assert.is(qemu_coroutine_get_aio_context(co), null, 'S64: null before the first entry');
  qemu_coroutine_enter(co);
  assert.equal(log, ['start@main co=main']);
  assert.is(qemu_coroutine_get_aio_context(co), main);
  // the move starts with a BH in the OLD context: ctx has nothing yet
  assert.is(aio_poll(ctx, false), false);
  assert.equal(log, ['start@main co=main']);
  // main's BH schedules the coroutine in ctx, it does not run it
  assert.is(aio_poll(main, false), true);
  assert.equal(log, ['start@main co=main']);
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['start@main co=main', `moved@${ctx.name} co=${ctx.name}`, `still@${ctx.name}`]);
  assert.is(qemu_coroutine_get_aio_context(co), ctx);
  // the way back: a BH of ctx first, then main's co_schedule_bh
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log.length, 3);
  assert.is(aio_poll(main, false), true);
  assert.equal(log, [
    'start@main co=main',
    `moved@${ctx.name} co=${ctx.name}`,
    `still@${ctx.name}`,
    'back@main co=main',
  ]);
  assert.is(qemu_coroutine_get_aio_context(co), main);
  assert.is(pollUntilIdle(main) + pollUntilIdle(ctx), 0);
  aio_context_unref(ctx);
});

function* rescheduleToCurrent(log: string[]): CoroutineFn<void> {
  log.push('a');
  yield* aio_co_reschedule_self(qemu_get_current_aio_context());
  log.push('b');
}

test('S70 aio_co_reschedule_self to the current context is a no-op: no yield, nothing scheduled', () => {
  const log: string[] = [];
  const co = qemu_coroutine_create(rescheduleToCurrent, log);
  qemu_coroutine_enter(co);
  assert.equal(log, ['a', 'b']);
  assert.is(qemu_coroutine_entered(co), false);
  assert.is(aio_poll(main, false), false);
});

test('S70 aio_co_reschedule_self to another context from plain code throws "Co-routine is yielding to no one"', () => {
  const ctx = aio_context_new();
  const gen = aio_co_reschedule_self(ctx);
  assert.throws(() => gen.next(), isCoErr('Co-routine is yielding to no one'));
  assert.is(aio_poll(main, false), false, 'no BH was left behind');
  aio_context_unref(ctx);
});

// --- DESIGN "Exceptions never drop queued work": co_schedule_bh ---

class Boom extends Error {}
function* throwOnEntry(s: Step): CoroutineFn<void> {
  s.log.push(s.name);
  throw new Boom(`boom from ${s.name}`);
}
interface LateScheduler extends Step {
  ctx: AioContext;
  late: Coroutine;
}
function* scheduleLate(s: LateScheduler): CoroutineFn<void> {
  s.log.push(s.name);
  aio_co_schedule(s.ctx, s.late);
}

test('co_schedule_bh: a coroutine that throws when entered leaves the not-yet-entered ones for the next poll, in order', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const late = qemu_coroutine_create(logOnce, { log, name: 'late' });
  const a = qemu_coroutine_create(scheduleLate, { log, name: 'a', ctx, late });
  const bad = qemu_coroutine_create(throwOnEntry, { log, name: 'bad' });
  const c = qemu_coroutine_create(logOnce, { log, name: 'c' });
  const d = qemu_coroutine_create(logOnce, { log, name: 'd' });
  for (const co of [a, bad, c, d]) aio_co_schedule(ctx, co);
  let thrown: unknown = null;
  try {
    aio_poll(ctx, false);
  } catch (e) {
    thrown = e;
  }
  assert.ok(thrown instanceof Boom && thrown.message === 'boom from bad', `got ${String(thrown)}`);
  assert.equal(log, ['a', 'bad']);
  assert.is(qemu_get_current_aio_context(), main, 'current context restored after the exception');
  // scheduled after the failure: goes behind the left-over ones
  const e = qemu_coroutine_create(logOnce, { log, name: 'e' });
  aio_co_schedule(ctx, e);
  // the left-over ones are still scheduled: entering or rescheduling them is refused
  assert.throws(() => aio_co_schedule(ctx, c), isCoErr("aio_co_schedule: Co-routine was already scheduled in 'aio_co_schedule'"));
  assert.is(aio_poll(ctx, false), true);
  const n = ctx.name;
  assert.equal(log, ['a', 'bad', `c@${n}`, `d@${n}`, `late@${n}`, `e@${n}`]);
  assert.is(aio_poll(ctx, false), false);
  // the coroutine that threw has terminated
  assert.throws(() => qemu_coroutine_enter(bad), isCoErr('qemu_aio_coroutine_enter: Co-routine has already terminated'));
  aio_context_unref(ctx);
});

test('co_schedule_bh: when the last scheduled coroutine throws, nothing is left and the context keeps working', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const a = qemu_coroutine_create(logOnce, { log, name: 'a' });
  const bad = qemu_coroutine_create(throwOnEntry, { log, name: 'bad' });
  aio_co_schedule(ctx, a);
  aio_co_schedule(ctx, bad);
  assert.throws(() => aio_poll(ctx, false), (e: unknown) => e instanceof Boom && e.message === 'boom from bad');
  assert.equal(log, [`a@${ctx.name}`, 'bad']);
  assert.is(aio_poll(ctx, false), false);
  const b = qemu_coroutine_create(logOnce, { log, name: 'b' });
  aio_co_schedule(ctx, b);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, [`a@${ctx.name}`, 'bad', `b@${ctx.name}`]);
  aio_context_unref(ctx);
});

test('co_schedule_bh: after a failure with nothing scheduled meanwhile, the left-over list takes new coroutines behind it', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const bad = qemu_coroutine_create(throwOnEntry, { log, name: 'bad' });
  const b = qemu_coroutine_create(logOnce, { log, name: 'b' });
  const c = qemu_coroutine_create(logOnce, { log, name: 'c' });
  aio_co_schedule(ctx, bad);
  aio_co_schedule(ctx, b);
  aio_co_schedule(ctx, c);
  assert.throws(() => aio_poll(ctx, false), (e: unknown) => e instanceof Boom && e.message === 'boom from bad');
  assert.equal(log, ['bad']);
  const d = qemu_coroutine_create(logOnce, { log, name: 'd' });
  const e = qemu_coroutine_create(logOnce, { log, name: 'e' });
  aio_co_schedule(ctx, d);
  aio_co_schedule(ctx, e);
  assert.is(aio_poll(ctx, false), true);
  const n = ctx.name;
  assert.equal(log, ['bad', `b@${n}`, `c@${n}`, `d@${n}`, `e@${n}`]);
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
});

test('S2 finalizing a context with a coroutine still scheduled throws naming it; after it ran, finalize succeeds', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const co = qemu_coroutine_create(logOnce, { log, name: 'p' }, 'pending-co');
  aio_co_schedule(ctx, co);
  assert.throws(
    () => aio_context_unref(ctx),
    (e: unknown) => e instanceof Error && e.message === `aio_ctx_finalize: coroutine 'pending-co' is still scheduled in context '${ctx.name}'`,
  );
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, [`p@${ctx.name}`]);
  aio_context_unref(ctx);
});

test.run();
