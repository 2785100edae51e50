// Bridges between coroutines, promises and effection: coAwait, coRun, coroutineOperation,
// useAioContext, useIOThread (API "Bridges to promises and effection"; DESIGN "Blocking,
// and the host loop"). The main context is attached to Node's loop for the whole file.
import { call, run, sleep, until } from 'effection';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AioContext,
  CoroutineError,
  IOThread,
  QEMU_CLOCK_REALTIME,
  QemuError,
  aio_bh_schedule_oneshot,
  aio_co_schedule,
  aio_context_new,
  aio_context_unref,
  aio_get_g_source,
  aio_poll,
  coAwait,
  coRun,
  coroutineOperation,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_clock_get_ns,
  qemu_co_sleep_ns,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_entered,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_init_main_loop,
  useAioContext,
  useIOThread,
  type CoroutineFn,
} from '../../src/index.ts';
import { deferred, turns, within } from '../helpers/async.ts';

const main = qemu_get_aio_context();
qemu_init_main_loop();

const here = () => qemu_get_current_aio_context().name;

// --- coAwait ---

interface AwaitState<T> {
  p: PromiseLike<T>;
  log: string[];
  done: () => void;
}
function* awaitAndLog<T>(s: AwaitState<T>): CoroutineFn<void> {
  s.log.push(`parked@${here()}`);
  try {
    const v = yield* coAwait(s.p);
    s.log.push(`value ${String(v)}@${here()}`);
  } catch (e) {
    s.log.push(`caught ${(e as Error).message}@${here()}`);
  }
  s.done();
}

test('coAwait returns the value of a resolved promise in the coroutine\'s context', async () => {
  const d = deferred();
  const s: AwaitState<number> = { p: Promise.resolve(5), log: [], done: d.resolve };
  const co = qemu_coroutine_create(awaitAndLog<number>, s);
  qemu_coroutine_enter(co);
  assert.equal(s.log, ['parked@main'], 'a real promise is not settled synchronously: the coroutine yields');
  await within(d.promise, 2000, 'coAwait resolved');
  assert.equal(s.log, ['parked@main', 'value 5@main']);
});

test('coAwait of a rejected promise throws the rejection in the coroutine', async () => {
  const d = deferred();
  const err = new Error('nope');
  let seen: unknown = null;
  const s: AwaitState<number> = {
    p: Promise.reject(err).catch((e) => {
      seen = e;
      throw e;
    }),
    log: [],
    done: d.resolve,
  };
  qemu_coroutine_enter(qemu_coroutine_create(awaitAndLog<number>, s));
  await within(d.promise, 2000, 'coAwait rejected');
  assert.equal(s.log, ['parked@main', 'caught nope@main']);
  assert.is(seen, err);
});

function* awaitSame(s: { p: PromiseLike<unknown>; got: unknown; done: () => void }): CoroutineFn<void> {
  try {
    yield* coAwait(s.p);
  } catch (e) {
    s.got = e;
  }
  s.done();
}

test('coAwait throws the very rejection value, errors and non-errors alike', async () => {
  const err = new RangeError('exact');
  for (const reason of [err, 'a string', 42]) {
    const d = deferred();
    const s = { p: Promise.reject(reason), got: undefined as unknown, done: d.resolve };
    qemu_coroutine_enter(qemu_coroutine_create(awaitSame, s));
    await within(d.promise, 2000, 'rejection');
    assert.is(s.got, reason);
  }
});

test('coAwait of a thenable that settles synchronously returns without yielding', () => {
  const log: string[] = [];
  const sync: PromiseLike<number> = {
    then: <A, B>(res?: ((v: number) => A | PromiseLike<A>) | null) => {
      res?.(7);
      return undefined as unknown as PromiseLike<A | B>;
    },
  };
  const s: AwaitState<number> = { p: sync, log, done: () => log.push('done') };
  const co = qemu_coroutine_create(awaitAndLog<number>, s);
  qemu_coroutine_enter(co);
  assert.equal(log, ['parked@main', 'value 7@main', 'done']);
  assert.is(qemu_coroutine_entered(co), false);
  const failing: PromiseLike<number> = {
    then: <A, B>(_: unknown, rej?: ((e: unknown) => A | PromiseLike<A>) | null) => {
      rej?.(new Error('sync fail'));
      return undefined as unknown as PromiseLike<A | B>;
    },
  };
  const log2: string[] = [];
  qemu_coroutine_enter(qemu_coroutine_create(awaitAndLog<number>, { p: failing, log: log2, done: () => log2.push('done') }));
  assert.equal(log2, ['parked@main', 'caught sync fail@main', 'done']);
});

test('coAwait wakes the coroutine from a macrotask, never in a microtask', async () => {
  const log: string[] = [];
  const d = deferred();
  const s: AwaitState<string> = { p: Promise.resolve('x'), log, done: d.resolve };
  qemu_coroutine_enter(qemu_coroutine_create(awaitAndLog<string>, s));
  setImmediate(() => log.push('immediate queued after parking'));
  for (let i = 0; i < 10; i++) await Promise.resolve();
  assert.equal(log, ['parked@main'], 'still parked after the microtask queue drained');
  await within(d.promise, 2000, 'woken');
  assert.equal(log, ['parked@main', 'immediate queued after parking', 'value x@main']);
});

test('coAwait outside a coroutine throws "Co-routine is yielding to no one"', () => {
  const gen = coAwait(Promise.resolve(1));
  assert.throws(
    () => gen.next(),
    (e: unknown) => e instanceof CoroutineError && e.message === 'Co-routine is yielding to no one',
  );
});

interface IoAwait {
  io: AioContext;
  p: Promise<number>;
  log: string[];
  done: () => void;
}
function* awaitInIOThread(s: IoAwait): CoroutineFn<void> {
  s.log.push(`start@${here()}`);
  const v = yield* coAwait(s.p);
  s.log.push(`got ${v}@${here()}`);
  s.done();
}

test('S68 coAwait in a coroutine of an IOThread resumes it in that IOThread (aio_co_wake schedules it there)', async () => {
  const t = iothread_create('await-io');
  const io = iothread_get_aio_context(t);
  const d = deferred();
  const gate = deferred<number>();
  const s: IoAwait = { io, p: gate.promise, log: [], done: d.resolve };
  aio_co_schedule(io, qemu_coroutine_create(awaitInIOThread, s));
  await within(
    new Promise<void>((r) => {
      const check = () => (s.log.length > 0 ? r() : setImmediate(check));
      check();
    }),
    2000,
    'coroutine started in the IOThread',
  );
  gate.resolve(3);
  await within(d.promise, 2000, 'resumed');
  assert.equal(s.log, ['start@await-io', 'got 3@await-io']);
  iothread_destroy(t);
});

// --- coRun ---

interface RunState {
  log: string[];
  done: () => void;
  fail: boolean;
}
function* runEffection(s: RunState): CoroutineFn<void> {
  s.log.push(`before@${here()}`);
  try {
    const v = yield* coRun(function* () {
      yield* sleep(2);
      const x = yield* call(async () => 20);
      if (s.fail) throw new Error('op failed');
      return x + 1;
    });
    s.log.push(`value ${v}@${here()}`);
  } catch (e) {
    s.log.push(`caught ${(e as Error).message}@${here()}`);
  }
  s.done();
}

test('coRun runs an effection operation (sleep, call) from a coroutine and returns its value', async () => {
  const d = deferred();
  const s: RunState = { log: [], done: d.resolve, fail: false };
  qemu_coroutine_enter(qemu_coroutine_create(runEffection, s));
  assert.equal(s.log, ['before@main']);
  await within(d.promise, 2000, 'coRun');
  assert.equal(s.log, ['before@main', 'value 21@main']);
});

test('coRun throws the operation\'s error in the coroutine', async () => {
  const d = deferred();
  const s: RunState = { log: [], done: d.resolve, fail: true };
  qemu_coroutine_enter(qemu_coroutine_create(runEffection, s));
  await within(d.promise, 2000, 'coRun failing');
  assert.equal(s.log, ['before@main', 'caught op failed@main']);
});

// --- coroutineOperation ---

function* addInContext(o: { a: number; b: number; log: string[] }): CoroutineFn<number> {
  o.log.push(`entry@${here()}`);
  yield* qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 1_000_000);
  o.log.push(`after sleep@${here()}`);
  return o.a + o.b;
}

test('coroutineOperation runs the coroutine in ctx (main) and returns its value', async () => {
  const log: string[] = [];
  const v = await within(
    run(function* () {
      const op = coroutineOperation(main, addInContext, { a: 2, b: 3, log });
      log.push('operation created');
      const r = yield* op;
      log.push('operation returned');
      return r;
    }),
    2000,
    'coroutineOperation on main',
  );
  assert.is(v, 5);
  assert.equal(log, ['operation created', 'entry@main', 'after sleep@main', 'operation returned']);
});

test('coroutineOperation on an IOThread\'s context runs the coroutine there', async () => {
  const t = iothread_create('op-io');
  const log: string[] = [];
  const v = await within(
    run(() => coroutineOperation(iothread_get_aio_context(t), addInContext, { a: 1, b: 1, log })),
    2000,
    'coroutineOperation on IOThread',
  );
  assert.is(v, 2);
  assert.equal(log, ['entry@op-io', 'after sleep@op-io']);
  iothread_destroy(t);
});

class OpFailure extends Error {}
function* failAfterYield(what: unknown): CoroutineFn<number> {
  aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self());
  yield* qemu_coroutine_yield();
  throw what;
}

test('coroutineOperation propagates the coroutine\'s exception (the same Error object)', async () => {
  const err = new OpFailure('coroutine failed');
  let got: unknown = null;
  try {
    await within(run(() => coroutineOperation(main, failAfterYield, err)), 2000, 'failing operation');
  } catch (e) {
    got = e;
  }
  assert.is(got, err);
  // a non-Error throw reaches effection as an Error carrying its text
  got = null;
  try {
    await within(run(() => coroutineOperation(main, failAfterYield, 'plain string')), 2000, 'failing operation');
  } catch (e) {
    got = e;
  }
  assert.ok(got instanceof Error && got.message === 'plain string', String(got));
});

function* neverRuns(_: null): CoroutineFn<number> {
  return 1;
}

test('coroutineOperation on a context not attached to Node\'s loop throws QemuError and schedules nothing', async () => {
  const ctx = aio_context_new();
  let got: unknown = null;
  try {
    await within(run(() => coroutineOperation(ctx, neverRuns, null)), 2000, 'non-attached');
  } catch (e) {
    got = e;
  }
  assert.ok(
    got instanceof QemuError &&
      got.message ===
        `coroutineOperation: context '${ctx.name}' is not attached to Node's loop (aio_get_g_source(ctx).attach() or qemu_init_main_loop())`,
    String(got),
  );
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
});

interface Sleeper {
  log: string[];
  started: () => void;
  sleptNs: number;
}
function* sleepTwentyMs(s: Sleeper): CoroutineFn<number> {
  s.log.push(`start@${here()}`);
  s.started();
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  yield* qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 20_000_000);
  s.sleptNs = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
  s.log.push('end');
  return 0;
}

test('halting a coroutineOperation waits for its coroutine (sleeping 20 ms on an attached context) to finish', async () => {
  const ctx = aio_context_new();
  const src = aio_get_g_source(ctx);
  src.attach();
  const started = deferred();
  const s: Sleeper = { log: [], started: started.resolve, sleptNs: 0 };
  const task = run(() => coroutineOperation(ctx, sleepTwentyMs, s));
  await within(started.promise, 2000, 'coroutine started');
  assert.equal(s.log, [`start@${ctx.name}`]);
  await within(task.halt(), 2000, 'halt');
  assert.equal(s.log, [`start@${ctx.name}`, 'end'], 'halt returned before the coroutine finished');
  assert.ok(s.sleptNs >= 20_000_000, `slept ${s.sleptNs} ns`);
  let got: unknown = null;
  try {
    await within(task, 2000, 'halted task');
  } catch (e) {
    got = e;
  }
  assert.ok(got instanceof Error && got.message === 'halted', String(got));
  src.destroy();
  assert.is(aio_poll(ctx, false), false);
  aio_context_unref(ctx);
});

test('halting a coroutineOperation before its coroutine started still runs it to the end', async () => {
  const ctx = aio_context_new();
  const src = aio_get_g_source(ctx);
  src.attach();
  const s: Sleeper = { log: [], started: () => {}, sleptNs: 0 };
  const task = run(() => coroutineOperation(ctx, sleepTwentyMs, s));
  await within(task.halt(), 2000, 'halt');
  assert.equal(s.log, [`start@${ctx.name}`, 'end']);
  await task.catch(() => {});
  src.destroy();
  aio_context_unref(ctx);
});

function* stuckEntry(s: { p: Promise<void>; done: () => void }): CoroutineFn<number> {
  yield* coAwait(s.p);
  s.done();
  return 0;
}

test('halting a coroutineOperation whose coroutine can never finish reports it by name on stderr at once', async () => {
  const gate = deferred();
  const finished = deferred();
  const task = run(() => coroutineOperation(main, stuckEntry, { p: gate.promise, done: finished.resolve }));
  try {
    await turns(5); // let it start and park
    const written: string[] = [];
    const orig = process.stderr.write;
    process.stderr.write = ((chunk: string | Uint8Array) => {
      written.push(String(chunk));
      return true;
    }) as typeof process.stderr.write;
    const t0 = Date.now();
    try {
      await within(task.halt(), 10_000, 'halt');
    } finally {
      process.stderr.write = orig;
    }
    const text = written.join('');
    // Nothing but Node's loop can settle its promise: the teardown's AIO_WAIT_WHILE knows at
    // once that it can never end (DESIGN "Never hangs silently"), it must not block 5 s.
    assert.ok(
      text.startsWith(
        "aioco: coroutineOperation halted, but coroutine 'stuckEntry' cannot finish: aio_poll: this blocking wait can never end: ",
      ),
      text,
    );
    assert.ok(text.includes("coroutine 'stuckEntry' is parked in coAwait"), text);
    assert.ok(text.endsWith('  (run with AIOCO_DEBUG=1 to record where it was created)\n'), text);
    assert.ok(Date.now() - t0 < 1000, `halt blocked ${Date.now() - t0} ms`);
  } finally {
    // it is not cancelled: once its promise settles it finishes
    gate.resolve();
    await within(finished.promise, 2000, 'the halted coroutine finishing later');
    await task.catch(() => {});
  }
});

// --- Resources ---

function* reportContext(log: string[]): CoroutineFn<string> {
  log.push(`co@${here()}`);
  return here();
}
function* logOnce(log: string[]): CoroutineFn<void> {
  log.push(`late co@${here()}`);
}

test('useAioContext provides an attached context; on scope exit its BHs and coroutines ran and it is detached and finalized', async () => {
  const log: string[] = [];
  let captured: AioContext | null = null;
  await within(
    run(function* () {
      const ctx = yield* useAioContext();
      captured = ctx;
      assert.ok(ctx instanceof AioContext);
      assert.is.not(ctx, main);
      // attached: a BH runs without aio_poll
      const d = deferred();
      aio_bh_schedule_oneshot(ctx, () => {
        log.push(`bh@${here()}`);
        d.resolve();
      });
      yield* until(within(d.promise, 2000, 'BH on the resource context'));
      // coroutineOperation accepts it
      const where = yield* coroutineOperation(ctx, reportContext, log);
      log.push(`returned ${where === ctx.name ? 'ctx' : where}`);
      // left for teardown
      aio_bh_schedule_oneshot(ctx, () => log.push(`late bh@${here()}`));
      aio_co_schedule(ctx, qemu_coroutine_create(logOnce, log));
    }),
    3000,
    'useAioContext scope',
  );
  const ctx = captured as AioContext | null;
  assert.ok(ctx !== null);
  const n = ctx.name;
  // the two left-over BHs (the oneshot, then co_schedule_bh) ran newest first (S13)
  assert.equal(log, [`bh@${n}`, `co@${n}`, 'returned ctx', `late co@${n}`, `late bh@${n}`]);
  assert.throws(
    () => aio_poll(ctx, false),
    (e: unknown) => e instanceof QemuError && e.message === `aio_poll: context '${n}' was finalized`,
  );
  assert.throws(
    () => aio_get_g_source(ctx).attach(),
    (e: unknown) => e instanceof QemuError && e.message === `aio_get_g_source: context '${n}' was finalized`,
  );
});

test('useAioContext tears down when the scope fails too', async () => {
  let captured: AioContext | null = null;
  const boom = new Error('scope failed');
  let got: unknown = null;
  try {
    await within(
      run(function* () {
        const ctx = yield* useAioContext();
        captured = ctx;
        aio_bh_schedule_oneshot(ctx, () => {});
        throw boom;
      }),
      3000,
      'failing scope',
    );
  } catch (e) {
    got = e;
  }
  assert.is(got, boom);
  const ctx = captured as AioContext | null;
  assert.ok(ctx !== null);
  assert.throws(() => aio_poll(ctx, false), (e: unknown) => e instanceof QemuError && e.message === `aio_poll: context '${ctx.name}' was finalized`);
});

test('useIOThread provides a working IOThread; on scope exit its work ran and it is destroyed', async () => {
  const log: string[] = [];
  let captured: IOThread | null = null;
  await within(
    run(function* () {
      const t = yield* useIOThread('res-io', { poll_max_ns: 0 });
      captured = t;
      assert.ok(t instanceof IOThread);
      assert.is(t.id, 'res-io');
      const io = iothread_get_aio_context(t);
      assert.is(io.poll_max_ns, 0);
      assert.throws(
        () => iothread_create('res-io'),
        (e: unknown) => e instanceof QemuError && e.message === "Duplicate ID 'res-io' for object",
      );
      const where = yield* coroutineOperation(io, reportContext, log);
      log.push(`returned ${where}`);
      aio_bh_schedule_oneshot(io, () => log.push(`late bh@${here()}`));
    }),
    3000,
    'useIOThread scope',
  );
  assert.equal(log, ['co@res-io', 'returned res-io', 'late bh@res-io']);
  const t = captured as IOThread | null;
  assert.ok(t !== null);
  const io = iothread_get_aio_context(t);
  assert.throws(() => aio_poll(io, false), (e: unknown) => e instanceof QemuError && e.message === "aio_poll: context 'res-io' was finalized");
  // the id is free again
  const again = iothread_create('res-io');
  iothread_destroy(again);
});

test('useIOThread with a duplicate id fails the scope with QemuError', async () => {
  const t = iothread_create('taken');
  let got: unknown = null;
  try {
    await within(
      run(function* () {
        yield* useIOThread('taken');
      }),
      2000,
      'duplicate useIOThread',
    );
  } catch (e) {
    got = e;
  }
  assert.ok(got instanceof QemuError && got.message === "Duplicate ID 'taken' for object", String(got));
  iothread_destroy(t);
});

test.run();
