// The host-loop drive: contexts attached to Node's event loop (QEMU's GSource, S45, S102;
// DESIGN "Blocking, and the host loop"; API "Rules the contract pins down").
// Tests in this file run in order: the first one checks main before qemu_init_main_loop().
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AioContext,
  QEMU_CLOCK_REALTIME,
  QEMU_CLOCK_VIRTUAL,
  QemuError,
  SCALE_NS,
  aio_bh_new,
  aio_bh_schedule_oneshot,
  aio_context_new,
  aio_context_unref,
  aio_get_g_source,
  aio_poll,
  aio_timer_new,
  qemu_bh_delete,
  qemu_bh_schedule,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_clock_set_manual,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_init_main_loop,
  timer_del,
  timer_mod_ns,
  timer_pending,
  type QEMUBH,
  type QEMUTimer,
} from '../../src/index.ts';
import { deferred, turns, within } from '../helpers/async.ts';
import { runNode, type ChildResult } from '../helpers/child.ts';

const main = qemu_get_aio_context();

test('before qemu_init_main_loop() main is not driven by Node; after it, a BH on main runs without any aio_poll', async () => {
  const log: string[] = [];
  const d = deferred();
  aio_bh_schedule_oneshot(main, () => {
    log.push(`bh@${qemu_get_current_aio_context().name}`);
    d.resolve();
  });
  await turns(3);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(log, [], 'main is not attached yet');
  qemu_init_main_loop();
  qemu_init_main_loop(); // idempotent
  assert.equal(log, [], 'attaching does not dispatch synchronously');
  await within(d.promise, 2000, 'BH on main dispatched by the host loop');
  assert.equal(log, ['bh@main']);
  await turns(2);
  assert.equal(log, ['bh@main'], 'run once');
  assert.is(aio_poll(main, false), false);
});

test('contract: a context from aio_context_new() is not run by Node until aio_get_g_source(ctx).attach()', async () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const d = deferred();
  aio_bh_schedule_oneshot(ctx, () => {
    log.push(`bh@${qemu_get_current_aio_context() === ctx ? 'ctx' : qemu_get_current_aio_context().name}`);
    d.resolve();
  });
  await turns(3);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(log, []);
  const src = aio_get_g_source(ctx);
  assert.is(aio_get_g_source(ctx), src, 'one source per context');
  src.attach();
  src.attach(); // idempotent
  await within(d.promise, 2000, 'BH on attached ctx');
  assert.equal(log, ['bh@ctx']);
  src.destroy();
  aio_context_unref(ctx);
});

test('contract: destroy() detaches (BHs and timers no longer run from Node) and aio_poll still works; attach works again', async () => {
  const ctx = aio_context_new();
  aio_get_g_source(ctx).attach();
  const log: string[] = [];
  const first = deferred();
  aio_bh_schedule_oneshot(ctx, () => {
    log.push('attached bh');
    first.resolve();
  });
  await within(first.promise, 2000, 'BH while attached');
  aio_get_g_source(ctx).destroy();
  aio_bh_schedule_oneshot(ctx, () => log.push('detached bh'));
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, () => log.push('detached timer'));
  timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000);
  await turns(3);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(log, ['attached bh'], 'nothing runs from Node once detached');
  assert.is(aio_poll(ctx, false), true);
  assert.equal(log, ['attached bh', 'detached bh', 'detached timer']);
  // attach again: a fresh source drives it
  const again = deferred();
  aio_get_g_source(ctx).attach();
  aio_bh_schedule_oneshot(ctx, () => {
    log.push('reattached bh');
    again.resolve();
  });
  await within(again.promise, 2000, 'BH after re-attach');
  assert.equal(log, ['attached bh', 'detached bh', 'detached timer', 'reattached bh']);
  aio_get_g_source(ctx).destroy();
  aio_context_unref(ctx);
  assert.throws(
    () => aio_get_g_source(ctx).attach(),
    (e: unknown) => e instanceof QemuError && e.message === `aio_get_g_source: context '${ctx.name}' was finalized`,
  );
});

test('DESIGN: dispatch happens from setImmediate: not inside qemu_bh_schedule, not in a microtask', async () => {
  const log: string[] = [];
  const d = deferred();
  const bh = aio_bh_new(main, () => {
    log.push('bh');
    d.resolve();
  });
  qemu_bh_schedule(bh);
  log.push('scheduled');
  queueMicrotask(() => log.push('microtask'));
  void Promise.resolve().then(() => log.push('promise'));
  process.nextTick(() => log.push('nextTick'));
  setImmediate(() => log.push('immediate queued after'));
  await within(d.promise, 2000, 'BH');
  await turns(1);
  // (nextTick's place among the microtasks depends on where the test body runs: not our concern)
  assert.equal(log[0], 'scheduled');
  assert.equal([...log.slice(1, 4)].sort(), ['microtask', 'nextTick', 'promise']);
  assert.equal(log.slice(4), ['bh', 'immediate queued after']);
  qemu_bh_delete(bh);
  assert.is(aio_poll(main, false), false);
});

test('DESIGN: a context may be attached and also polled synchronously; work runs once', async () => {
  let runs = 0;
  aio_bh_schedule_oneshot(main, () => runs++);
  assert.is(aio_poll(main, false), true);
  assert.is(runs, 1);
  await turns(3);
  assert.is(runs, 1);
});

interface Spinner {
  bh: QEMUBH | null;
  log: string[];
  stop: boolean;
}
function spin(s: Spinner): void {
  s.log.push('B');
  if (!s.stop) qemu_bh_schedule(s.bh as QEMUBH);
}

test('S12/DESIGN: a self-rescheduling BH runs once per Node loop turn and starves neither setImmediate nor setTimeout', async () => {
  const s: Spinner = { bh: null, log: [], stop: false };
  s.bh = aio_bh_new(main, spin, s);
  qemu_bh_schedule(s.bh);
  // our own once-per-turn chain, queued after the drive's immediate
  const chainDone = deferred();
  let n = 0;
  const tick = () => {
    s.log.push('I');
    if (++n < 6) setImmediate(tick);
    else chainDone.resolve();
  };
  setImmediate(tick);
  await within(chainDone.promise, 2000, 'six loop turns');
  assert.equal(s.log.slice(0, 12), ['B', 'I', 'B', 'I', 'B', 'I', 'B', 'I', 'B', 'I', 'B', 'I']);
  // timers still fire while it spins
  const before = s.log.filter((x) => x === 'B').length;
  await within(new Promise<void>((r) => setTimeout(r, 0)), 2000, 'setTimeout(0) while a BH reschedules itself');
  await within(new Promise<void>((r) => setTimeout(r, 5)), 2000, 'setTimeout(5) while a BH reschedules itself');
  assert.ok(s.log.filter((x) => x === 'B').length > before, 'the BH kept running meanwhile');
  s.stop = true;
  await turns(2);
  const final = s.log.length;
  await turns(3);
  assert.is(s.log.length, final, 'stopped');
  qemu_bh_delete(s.bh);
  assert.is(aio_poll(main, false), false);
});

test('DESIGN: real-clock timers of attached contexts fire from Node\'s loop, in their context', async () => {
  const ctx = aio_context_new();
  aio_get_g_source(ctx).attach();
  const log: string[] = [];
  const d = deferred();
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  const at: Record<string, number> = {};
  const mk = (c: AioContext, tag: string, last: boolean) =>
    aio_timer_new(c, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
      at[tag] = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
      log.push(`${tag}@${qemu_get_current_aio_context() === ctx ? 'ctx' : qemu_get_current_aio_context().name}`);
      if (last) d.resolve();
    });
  const tMain = mk(main, 'main', false);
  const tCtx = mk(ctx, 'ctx', true);
  timer_mod_ns(tMain, t0 + 2_000_000);
  timer_mod_ns(tCtx, t0 + 4_000_000);
  await within(d.promise, 2000, 'timers via the host loop');
  assert.equal(log, ['main@main', 'ctx@ctx']);
  assert.ok((at['main'] as number) >= 2_000_000 && (at['ctx'] as number) >= 4_000_000, JSON.stringify(at));
  aio_get_g_source(ctx).destroy();
  aio_context_unref(ctx);
});

test('DESIGN: a timer that becomes the new head re-arms the host timer earlier', async () => {
  const log: string[] = [];
  const d = deferred();
  const late = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_NS, () => log.push('late'));
  const early = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_NS, () => {
    log.push('early');
    d.resolve();
  });
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  timer_mod_ns(late, t0 + 400_000_000);
  await turns(2); // let the drive arm its timer for the late one
  timer_mod_ns(early, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 3_000_000);
  await within(d.promise, 2000, 'early timer');
  const elapsed = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
  assert.equal(log, ['early']);
  assert.ok(elapsed < 300_000_000, `the early timer waited for the late one (${elapsed} ns)`);
  assert.is(timer_pending(late), true);
  timer_del(late);
});

test('DESIGN: a manual-clock timer on an attached context runs from Node\'s loop after the clock is advanced, not inside the advance', async () => {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    const log: string[] = [];
    const d = deferred();
    const ts = aio_timer_new(main, QEMU_CLOCK_VIRTUAL, SCALE_NS, () => {
      log.push(`timer@${qemu_get_current_aio_context().name}`);
      d.resolve();
    });
    const now = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
    timer_mod_ns(ts, now + 1000);
    await turns(3);
    await new Promise((r) => setTimeout(r, 5));
    assert.equal(log, [], 'the manual clock has not moved');
    qemu_clock_advance_virtual_time(now + 1000);
    assert.equal(log, [], 'due timers do not run inside qemu_clock_advance_virtual_time');
    await within(d.promise, 2000, 'manual timer after advance');
    assert.equal(log, ['timer@main']);
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
});

class BhFailure extends Error {}

test('DESIGN: an exception from a host-dispatched BH surfaces from the loop, and the rest of its slice runs in the next turn', async () => {
  const ctx = aio_context_new();
  aio_get_g_source(ctx).attach();
  const log: string[] = [];
  const caught = deferred<unknown>();
  const d = deferred();
  const listeners = process.listeners('uncaughtException');
  process.removeAllListeners('uncaughtException');
  process.once('uncaughtException', (e) => {
    log.push('uncaught');
    caught.resolve(e);
  });
  try {
    // LIFO: 'thrower' (scheduled last) runs first
    aio_bh_schedule_oneshot(ctx, () => {
      log.push('survivor');
      d.resolve();
    });
    aio_bh_schedule_oneshot(ctx, () => {
      log.push('thrower');
      throw new BhFailure('bh failed');
    });
    const e = await within(caught.promise, 2000, 'the BH exception');
    assert.ok(e instanceof BhFailure && e.message === 'bh failed');
    await within(d.promise, 2000, 'the rest of the slice');
    assert.equal(log, ['thrower', 'uncaught', 'survivor']);
    assert.is(aio_poll(ctx, false), false);
  } finally {
    process.removeAllListeners('uncaughtException');
    for (const l of listeners) process.on('uncaughtException', l);
  }
  aio_get_g_source(ctx).destroy();
  aio_context_unref(ctx);
});

// --- Whole programs: a finished program exits by itself ---

function runFixture(name: string, timeoutMs = 10_000, args: string[] = []): Promise<ChildResult> {
  return runNode(['--import', 'tsx', `test/aio/fixtures/${name}`, ...args], { timeoutMs });
}

test('DESIGN: a program that attached main and finished its work (BH, timer, IOThread hop) exits 0 by itself', async () => {
  const r = await runFixture('host-exit-after-work.ts');
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(
    r.stdout,
    ['bh in main', 'co start in main', 'co in fixture-io', 'co back in main', 'timer in main', 'exit 0', ''].join('\n'),
  );
});

test('DESIGN: a manual-clock timer never keeps Node alive: the program exits at once without running it', async () => {
  const r = await runFixture('host-exit-manual-timer.ts');
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'armed true\nexit 0 promptly pending=true\n');
});

test('DESIGN: a coroutine parked in coAwait keeps Node alive until its promise settles; then the program exits', async () => {
  const r = await runFixture('host-exit-coawait.ts');
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'parked\nresumed 42 after >=50ms\nexit 0\n');
});

// --- Review regressions: one dispatch per turn, stale host timers, errors of one turn ---

interface TurnCounter {
  bh: QEMUBH | null;
  runs: number;
  stop: boolean;
}
function countRun(c: TurnCounter): void {
  c.runs++;
  if (!c.stop) qemu_bh_schedule(c.bh as QEMUBH);
}
interface Ticker {
  timer: QEMUTimer | null;
  ticks: number;
}
function tick1ms(k: Ticker): void {
  k.ticks++;
  timer_mod_ns(k.timer as QEMUTimer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000);
}

test('DESIGN: an attached context is dispatched at most once per Node loop turn, also in turns where a host timer fires', async () => {
  const c: TurnCounter = { bh: null, runs: 0, stop: false };
  c.bh = aio_bh_new(main, countRun, c);
  const k: Ticker = { timer: null, ticks: 0 };
  k.timer = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_NS, tick1ms, k);
  qemu_bh_schedule(c.bh);
  timer_mod_ns(k.timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000);
  // Runs of the self-rescheduling BH between two consecutive check phases (one loop turn).
  const perTurn: number[] = [];
  const done = deferred();
  const marker = () => {
    perTurn.push(c.runs);
    c.runs = 0;
    if (perTurn.length < 300 || k.ticks < 5) setImmediate(marker);
    else done.resolve();
  };
  setImmediate(marker);
  await within(done.promise, 5000, '300 loop turns with at least 5 timer ticks');
  c.stop = true;
  timer_del(k.timer);
  await turns(2);
  qemu_bh_delete(c.bh);
  assert.ok(k.ticks >= 5, `the timer fired ${k.ticks} times`);
  // The first marker may run before the drive's first immediate; every later turn has exactly one run.
  assert.equal(perTurn.slice(1).filter((n) => n !== 1), [], `runs per turn: ${JSON.stringify(perTurn)}`);
  assert.is(aio_poll(main, false), false);
});

test('DESIGN: a finished program exits at once after timer_del of the timer the host timer was armed for', async () => {
  const r = await runFixture('host-exit-stale-timer.ts', 10_000, ['timer_del']);
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'armed true\ntimer_del pending=false\nexit 0 promptly\n');
});

test('DESIGN: a finished program exits at once when its only timer\'s clock is put in manual mode', async () => {
  const r = await runFixture('host-exit-stale-timer.ts', 10_000, ['manual']);
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'armed true\nmanual pending=true\nexit 0 promptly\n');
});

test('S51/DESIGN: a finished program exits at once when its only timer\'s clock is disabled', async () => {
  const r = await runFixture('host-exit-stale-timer.ts', 10_000, ['disable']);
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'armed true\ndisable pending=true\nexit 0 promptly\n');
});

test('DESIGN: a coroutine resumed from coAwait that deletes its guard timer lets the program exit at once', async () => {
  const r = await runFixture('host-exit-coawait-timer-del.ts');
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'guard armed true\nresumed 7, guard pending=false\nexit 0 promptly\n');
});

test('DESIGN ("never swallowed"): errors of two contexts in one host dispatch surface together as an AggregateError, in dispatch order', async () => {
  const r = await runFixture('host-dispatch-two-errors.ts');
  assert.is(r.signal, null, `killed: stdout=${r.stdout} stderr=${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(
    r.stdout,
    'caught AggregateError: aio_dispatch: several callbacks failed in one Node loop turn [MainFailure: main failed, IoFailure: io failed]\nexit 0\n',
  );
});

test.run();
