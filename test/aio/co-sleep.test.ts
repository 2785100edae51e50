/**
 * Behaviour of src/aio/co-sleep.ts: QemuCoSleep, QEMU 6.1's API (S83-S85), on the manual
 * virtual clock.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  Coroutine,
  QEMU_CLOCK_VIRTUAL,
  QemuCoSleep,
  aio_co_schedule,
  aio_co_wake,
  aio_compute_timeout,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_clock_set_manual,
  qemu_co_sleep,
  qemu_co_sleep_ns,
  qemu_co_sleep_ns_wakeable,
  qemu_co_sleep_wake,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  type CoroutineFn,
} from '../../src/index.ts';
import { assertCoError, throwsCo } from '../helpers/assert.ts';
import { selfName } from '../helpers/coroutines.ts';

const main = qemu_get_aio_context();
qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
test.after(() => {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
});

function now(): number {
  return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
}

/** Moves the manual clock forward by `ns`. */
function advance(ns: number): void {
  qemu_clock_advance_virtual_time(now() + ns);
}

const SCHED_MSG = "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'qemu_co_sleep_ns'";

interface Sleeper {
  w: QemuCoSleep;
  ns: number;
  log: string[];
  wokeAt?: number;
}

function* sleepNs(s: Sleeper): CoroutineFn<void> {
  s.log.push(`${selfName('S')}:sleep`);
  yield* qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, s.ns);
  s.wokeAt = now();
  s.log.push(`${selfName('S')}:woke`);
}

function* sleepWakeable(s: Sleeper): CoroutineFn<void> {
  s.log.push(`${selfName('S')}:sleep`);
  yield* qemu_co_sleep_ns_wakeable(s.w, QEMU_CLOCK_VIRTUAL, s.ns);
  s.wokeAt = now();
  s.log.push(`${selfName('S')}:woke`);
}

function sleeper(ns: number, log: string[] = []): Sleeper {
  return { w: new QemuCoSleep(), ns, log };
}

test('S83: qemu_co_sleep_ns resumes exactly at the deadline, in the next aio_poll, not inside the clock advance', () => {
  const t0 = now();
  const s = sleeper(1000);
  qemu_coroutine_enter(qemu_coroutine_create(sleepNs, s));
  assert.equal(s.log, ['S:sleep']);
  assert.is(aio_compute_timeout(main), 1000);
  qemu_clock_advance_virtual_time(t0 + 999);
  assert.is(aio_compute_timeout(main), 1);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['S:sleep']);
  qemu_clock_advance_virtual_time(t0 + 1000);
  assert.equal(s.log, ['S:sleep']); // not inside qemu_clock_advance_virtual_time
  assert.is(aio_compute_timeout(main), 0);
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, ['S:sleep', 'S:woke']);
  assert.is(s.wokeAt, t0 + 1000);
  assert.is(aio_compute_timeout(main), -1);
  assert.is(aio_poll(main, false), false);
});

test('S83: advancing well past the deadline resumes the sleeper once, with the clock where it was moved', () => {
  const t0 = now();
  const s = sleeper(500);
  qemu_coroutine_enter(qemu_coroutine_create(sleepNs, s));
  qemu_clock_advance_virtual_time(t0 + 10_000);
  assert.is(aio_poll(main, false), true);
  assert.is(s.wokeAt, t0 + 10_000);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['S:sleep', 'S:woke']);
});

test('S83: qemu_co_sleep_ns always yields, even for ns = 0; it resumes in the next aio_poll', () => {
  const t0 = now();
  const s = sleeper(0);
  qemu_coroutine_enter(qemu_coroutine_create(sleepNs, s));
  assert.equal(s.log, ['S:sleep']);
  assert.is(aio_compute_timeout(main), 0);
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, ['S:sleep', 'S:woke']);
  assert.is(s.wokeAt, t0);
});

test('S50/S83: several sleepers wake in deadline order within one aio_poll', () => {
  const log: string[] = [];
  const a = sleeper(300, log);
  const b = sleeper(100, log);
  const c = sleeper(200, log);
  qemu_coroutine_enter(qemu_coroutine_create(sleepNs, a, 'A'));
  qemu_coroutine_enter(qemu_coroutine_create(sleepNs, b, 'B'));
  qemu_coroutine_enter(qemu_coroutine_create(sleepNs, c, 'C'));
  assert.is(aio_compute_timeout(main), 100);
  advance(300);
  assert.is(aio_poll(main, false), true);
  assert.equal(log, ['A:sleep', 'B:sleep', 'C:sleep', 'B:woke', 'C:woke', 'A:woke']);
  assert.is(aio_compute_timeout(main), -1);
});

test('S83: the timer lives in the context the sleeper runs in: only that context resumes it', () => {
  const ctx2 = aio_context_new();
  const s = sleeper(50);
  const co = qemu_coroutine_create(sleepNs, s);
  qemu_aio_coroutine_enter(ctx2, co);
  assert.is(aio_compute_timeout(main), -1);
  assert.is(aio_compute_timeout(ctx2), 50);
  advance(50);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['S:sleep']);
  assert.is(aio_poll(ctx2, false), true);
  assert.equal(s.log, ['S:sleep', 'S:woke']);
  aio_context_unref(ctx2);
});

test('S85: qemu_co_sleep_wake from plain code resumes the sleeper before it returns and removes the timer', () => {
  const t0 = now();
  const s = sleeper(1_000_000);
  qemu_coroutine_enter(qemu_coroutine_create(sleepWakeable, s));
  assert.is(aio_compute_timeout(main), 1_000_000);
  qemu_co_sleep_wake(s.w);
  s.log.push('wake returned');
  assert.equal(s.log, ['S:sleep', 'S:woke', 'wake returned']);
  assert.is(s.wokeAt, t0);
  assert.is(aio_compute_timeout(main), -1);
  // The old deadline passes: nothing fires.
  qemu_clock_advance_virtual_time(t0 + 2_000_000);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['S:sleep', 'S:woke', 'wake returned']);
});

function* wakeFromCoroutine(o: { s: Sleeper }): CoroutineFn<void> {
  qemu_co_sleep_wake(o.s.w);
  o.s.log.push('waker:woke it, yields');
  yield* qemu_coroutine_yield();
}

test('S85/S69b: qemu_co_sleep_wake from a coroutine resumes the sleeper only when the waker yields', () => {
  const s = sleeper(1_000_000);
  qemu_coroutine_enter(qemu_coroutine_create(sleepWakeable, s));
  qemu_coroutine_enter(qemu_coroutine_create(wakeFromCoroutine, { s }));
  assert.equal(s.log, ['S:sleep', 'waker:woke it, yields', 'S:woke']);
  assert.is(aio_compute_timeout(main), -1);
});

test('S85: qemu_co_sleep_wake from another context schedules the sleeper in its own context', () => {
  const ctx2 = aio_context_new();
  const s = sleeper(1_000_000);
  qemu_aio_coroutine_enter(ctx2, qemu_coroutine_create(sleepWakeable, s));
  qemu_co_sleep_wake(s.w); // from main's top level
  assert.equal(s.log, ['S:sleep']);
  assert.is(aio_poll(main, false), false);
  assert.is(aio_poll(ctx2, false), true);
  assert.equal(s.log, ['S:sleep', 'S:woke']);
  assert.is(aio_compute_timeout(ctx2), -1);
  aio_context_unref(ctx2);
});

function* sleepThenPlainYield(s: Sleeper): CoroutineFn<void> {
  yield* qemu_co_sleep_ns_wakeable(s.w, QEMU_CLOCK_VIRTUAL, s.ns);
  s.log.push('woke');
  yield* qemu_coroutine_yield();
  s.log.push('resumed by enter');
}

test('S85: qemu_co_sleep_wake on a QemuCoSleep with nobody sleeping is a no-op', () => {
  qemu_co_sleep_wake(new QemuCoSleep());
  const s = sleeper(10);
  const co = qemu_coroutine_create(sleepThenPlainYield, s);
  qemu_coroutine_enter(co);
  advance(10);
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, ['woke']);
  // The coroutine now waits in a plain yield: waking its old QemuCoSleep must not resume it.
  qemu_co_sleep_wake(s.w);
  qemu_co_sleep_wake(s.w);
  assert.equal(s.log, ['woke']);
  assert.is(aio_poll(main, false), false);
  qemu_coroutine_enter(co);
  assert.equal(s.log, ['woke', 'resumed by enter']);
});

function* sleepNoTimer(s: Sleeper): CoroutineFn<void> {
  s.log.push('sleep');
  yield* qemu_co_sleep(s.w);
  s.log.push('woke');
}

test('S85: qemu_co_sleep sleeps with no timer until qemu_co_sleep_wake', () => {
  const s = sleeper(0);
  qemu_coroutine_enter(qemu_coroutine_create(sleepNoTimer, s));
  assert.is(aio_compute_timeout(main), -1);
  advance(1_000_000_000);
  assert.is(aio_poll(main, false), false);
  assert.equal(s.log, ['sleep']);
  qemu_co_sleep_wake(s.w);
  assert.equal(s.log, ['sleep', 'woke']);
});

test('S56/S65/S84: a sleeping coroutine cannot be scheduled, entered or woken by other means', () => {
  const s = sleeper(100);
  const co = qemu_coroutine_create(sleepWakeable, s);
  qemu_coroutine_enter(co);
  throwsCo(() => aio_co_schedule(main, co), "aio_co_schedule: Co-routine was already scheduled in 'qemu_co_sleep_ns'");
  throwsCo(() => qemu_coroutine_enter(co), SCHED_MSG);
  throwsCo(() => qemu_aio_coroutine_enter(main, co), SCHED_MSG);
  throwsCo(() => aio_co_wake(co), SCHED_MSG);
  assert.equal(s.log, ['S:sleep']);
  // Still sleeping normally: the timer resumes it.
  advance(100);
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, ['S:sleep', 'S:woke']);
  assert.is(aio_poll(main, false), false);
});

function* scheduleSelfThenSleep(o: { w: QemuCoSleep; log: string[]; error?: unknown; useTimer: boolean }): CoroutineFn<void> {
  aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self());
  try {
    if (o.useTimer) yield* qemu_co_sleep_ns_wakeable(o.w, QEMU_CLOCK_VIRTUAL, 1000);
    else yield* qemu_co_sleep(o.w);
  } catch (e) {
    o.error = e;
  }
  o.log.push('yield');
  yield* qemu_coroutine_yield();
  o.log.push('resumed by the schedule');
}

test("S85: sleeping while scheduled throws \"qemu_co_sleep: Co-routine was already scheduled in 'aio_co_schedule'\"", () => {
  for (const useTimer of [false, true]) {
    const o = { w: new QemuCoSleep(), log: [] as string[], error: undefined as unknown, useTimer };
    qemu_coroutine_enter(qemu_coroutine_create(scheduleSelfThenSleep, o));
    assertCoError(o.error, "qemu_co_sleep: Co-routine was already scheduled in 'aio_co_schedule'");
    // No timer was left behind, and the QemuCoSleep holds nobody.
    assert.is(aio_compute_timeout(main), 0); // only the co_schedule BH
    qemu_co_sleep_wake(o.w);
    assert.equal(o.log, ['yield']);
    assert.is(aio_poll(main, false), true);
    assert.equal(o.log, ['yield', 'resumed by the schedule']);
    assert.is(aio_compute_timeout(main), -1);
  }
});

test('S58: sleeping outside a coroutine throws "Co-routine is yielding to no one" and leaves no timer', () => {
  throwsCo(() => {
    qemu_co_sleep(new QemuCoSleep()).next();
  }, 'Co-routine is yielding to no one');
  throwsCo(() => {
    qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 1000).next();
  }, 'Co-routine is yielding to no one');
  assert.is(aio_compute_timeout(main), -1);
});

function* sleepTwice(s: Sleeper): CoroutineFn<void> {
  yield* qemu_co_sleep_ns_wakeable(s.w, QEMU_CLOCK_VIRTUAL, s.ns);
  s.log.push(`first at +${now() - (s.wokeAt as number)}`);
  yield* qemu_co_sleep_ns_wakeable(s.w, QEMU_CLOCK_VIRTUAL, s.ns);
  s.log.push(`second at +${now() - (s.wokeAt as number)}`);
}

test('S85: a QemuCoSleep can be reused for a second sleep; each sleep has its own deadline', () => {
  const s = sleeper(100);
  s.wokeAt = now();
  const co: Coroutine = qemu_coroutine_create(sleepTwice, s);
  qemu_coroutine_enter(co);
  advance(100);
  assert.is(aio_poll(main, false), true);
  assert.equal(s.log, ['first at +100']);
  assert.is(aio_compute_timeout(main), 100); // the second sleep counts from the first wake
  qemu_co_sleep_wake(s.w); // cut the second one short
  assert.equal(s.log, ['first at +100', 'second at +100']);
  assert.is(aio_compute_timeout(main), -1);
});

test.run();
