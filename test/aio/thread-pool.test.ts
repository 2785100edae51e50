// The thread pool (src/aio/thread-pool.ts and its worker, watchdog and layout modules):
// QEMU's tests/unit/test-thread-pool.c in intent (submit, submit-aio, submit-co,
// submit-many, cancel, cancel-async) and S90-S98 of the reference, plus aioco's own
// contract (DESIGN.md "Thread pool", API.md "Thread pool and AIOCBs"): completion under
// the blocking and the host-loop drive, worker death and OOM, user functions, built-in
// file operations on guest memory, pool parameters, and a 10,000-request stress run.
//
// User functions live in fixtures/pool-funcs.mjs and report through SharedArrayBuffers.
// Every wait is bounded: functions that block do so with a timeout, waitUntil() gives up
// after a few seconds, promises go through within().
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  closeSync,
  constants,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  rmdirSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  AIO_WAIT_WHILE,
  AioWaitError,
  BlockAIOCB,
  CoroutineError,
  EBADF,
  ECANCELED,
  EINPROGRESS,
  EINVAL,
  EIO,
  QEMU_CLOCK_REALTIME,
  QemuError,
  SCALE_MS,
  ThreadPool,
  ThreadPoolElement,
  aio_context_new,
  aio_context_unref,
  aio_get_g_source,
  aio_get_thread_pool,
  aio_poll,
  aio_timer_new,
  bdrv_aio_cancel,
  bdrv_aio_cancel_async,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_aio_count_live,
  qemu_clock_get_ms,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_memalign,
  qemu_vfree,
  thread_pool_fdatasync,
  thread_pool_fstat_size,
  thread_pool_fsync,
  thread_pool_ftruncate,
  thread_pool_func,
  thread_pool_nop,
  thread_pool_preadv,
  thread_pool_pwritev,
  thread_pool_submit,
  thread_pool_submit_aio,
  thread_pool_submit_co,
  thread_pool_update_params,
  thread_pool_write_zeroes,
  timer_del,
  timer_mod,
  type AioContext,
  type CoroutineFn,
  type ThreadPoolFunc,
} from '../../src/index.ts';
import { isQemuErr } from '../helpers/assert.ts';
import { pollUntilIdle } from '../helpers/aio.ts';
import { within } from '../helpers/async.ts';
import { root, runNode, type ChildResult } from '../helpers/child.ts';
// Internal, for what the public API cannot observe: how many workers exist, the wake
// word workers bump after posting a completion (to know that all of them are posted),
// and the O_DIRECT phase probe that the file driver runs.
import { threadPoolPostedCount, threadPoolWorkerCount } from '../../src/aio/thread-pool.ts';
import { guestMemoryProbePhase } from '../../src/aio/guest-memory.ts';

const main = qemu_get_aio_context();
const pool = aio_get_thread_pool(main);
const FUNCS = new URL('./fixtures/pool-funcs.mjs', import.meta.url);

interface SabArg {
  sab: SharedArrayBuffer;
  index?: number;
}
interface HeldArg {
  sab: SharedArrayBuffer;
  tag: number;
  ret?: number;
  timeoutMs?: number;
}
interface ClaimArg {
  sab: SharedArrayBuffer;
  index: number;
  ms: number;
  ret?: number;
}
interface TrackArg {
  sab: SharedArrayBuffer;
  tag: number;
  ms?: number;
}
const inc = thread_pool_func<SabArg>(FUNCS, 'inc');
const echo = thread_pool_func<{ value: unknown }>(FUNCS, 'echo');
const asyncEcho = thread_pool_func<{ value: unknown }>(FUNCS, 'asyncEcho');
const sleepFn = thread_pool_func<{ ms: number; ret?: number }>(FUNCS, 'sleep');
const held = thread_pool_func<HeldArg>(FUNCS, 'held');
const claimAndSleep = thread_pool_func<ClaimArg>(FUNCS, 'claimAndSleep');
const track = thread_pool_func<TrackArg>(FUNCS, 'track');
const throws = thread_pool_func<null>(FUNCS, 'throws');

const NOT_YET = 0x7fffffff;
const pause = new Int32Array(new SharedArrayBuffer(4));

/** Blocks the JS thread until `pred()` holds, checking every ms; throws after `ms`. */
function waitUntil(pred: () => boolean, what: string | (() => string), ms = 5000): void {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${typeof what === 'string' ? what : what()}`);
    Atomics.wait(pause, 0, 0, 1);
  }
}

/**
 * Runs `fn` with a guard timer armed in `ctx` on the real clock: should a request never
 * complete, a blocking wait inside `fn` (AIO_WAIT_WHILE, bdrv_aio_cancel) is ended by the
 * guard throwing after `ms`, and the test fails instead of hanging. The guard is deleted as
 * soon as `fn` returns, so it never slows a passing test.
 */
function guarded<T>(ctx: AioContext, ms: number, what: string, fn: () => T): T {
  const guard = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_MS, () => {
    throw new Error(`still waiting after ${ms} ms for ${what}`);
  });
  timer_mod(guard, qemu_clock_get_ms(QEMU_CLOCK_REALTIME) + ms);
  try {
    return fn();
  } finally {
    timer_del(guard);
  }
}

/** AIO_WAIT_WHILE(ctx, cond), bounded by a guard (see `guarded`). */
function waitWhile(ctx: AioContext, cond: () => boolean, what: string, ms = 10_000): void {
  guarded(ctx, ms, what, () => AIO_WAIT_WHILE(ctx, cond));
}

/** Submits to `ctx`'s pool and waits (bounded AIO_WAIT_WHILE) for the callback; returns ret. */
function runSync<A>(ctx: AioContext, func: ThreadPoolFunc<A>, arg: A): number {
  const box = { ret: NOT_YET, calls: 0 };
  thread_pool_submit_aio(aio_get_thread_pool(ctx), func, arg, (b: typeof box, r: number) => {
    b.ret = r;
    b.calls++;
  }, box);
  waitWhile(ctx, () => box.calls === 0, `${func.name} to complete`);
  assert.is(box.calls, 1);
  return box.ret;
}

/** Shared state of `held` requests: i32 [gate, started, done, start order..., done flags...]. */
const MAX_TAGS = 128;
type SharedI32 = Int32Array<SharedArrayBuffer>;
function heldState(): SharedI32 {
  return new Int32Array(new SharedArrayBuffer(4 * (3 + 2 * MAX_TAGS)));
}
function startOrder(a: Int32Array): number[] {
  return Array.from(a.subarray(3, 3 + Atomics.load(a, 1)));
}
/**
 * Submits quick requests tagged 1..n (each `inc`s its own word) with `cb(tag, ret)` as
 * callback, and returns once every one has run AND posted its completion (each posting
 * bumps the wake word once), without polling: they are then "found DONE in one scan"
 * whatever the number of workers.
 */
function finishTogether(n: number, cb: (tag: number, ret: number) => void): void {
  pollUntilIdle(main, 100);
  const a = new Int32Array(new SharedArrayBuffer(4 * (n + 1)));
  const seq0 = threadPoolPostedCount();
  for (let tag = 1; tag <= n; tag++) thread_pool_submit_aio(pool, inc, { sab: a.buffer, index: tag }, (_o, r) => cb(tag, r));
  const ran = () => a.subarray(1).every((x) => x === 1);
  waitUntil(
    () => ran() && ((threadPoolPostedCount() - seq0) | 0) >= n,
    () => `${n} requests to run and post their completions (ran: ${Array.from(a.subarray(1))}, posted ${(threadPoolPostedCount() - seq0) | 0})`,
  );
}

// --- S90: one pool per context ---

test('S90: aio_get_thread_pool gives each context one pool, created on first use and the same afterwards', () => {
  assert.ok(pool instanceof ThreadPool);
  assert.is(aio_get_thread_pool(main), pool);
  const ctx = aio_context_new();
  const p = aio_get_thread_pool(ctx);
  assert.ok(p instanceof ThreadPool);
  assert.is.not(p, pool);
  assert.is(aio_get_thread_pool(ctx), p);
  aio_context_unref(ctx);
});

// --- QEMU's /thread-pool/submit, submit-aio, submit-co, submit-many ---

test('/thread-pool/submit: thread_pool_submit runs the function on a worker (seen in shared memory) and frees its AIOCB', () => {
  guarded(main, 10_000, 'the requests of this test', () => {
    pollUntilIdle(main, 100);
    const live = qemu_aio_count_live();
    const n = new Int32Array(new SharedArrayBuffer(4));
    thread_pool_submit(pool, inc, { sab: n.buffer });
    assert.is(qemu_aio_count_live(), live + 1, 'the request holds an AIOCB until it completes');
    for (let i = 0; i < 1000 && Atomics.load(n, 0) === 0; i++) aio_poll(main, true);
    assert.is(Atomics.load(n, 0), 1);
    waitWhile(main, () => qemu_aio_count_live() > live, 'the AIOCB to be freed');
    assert.is(qemu_aio_count_live(), live);
    assert.is(Atomics.load(n, 0), 1, 'ran exactly once');
  });
});

test('/thread-pool/submit-aio (S91, S93): the callback waits for the first poll even when the work is done; it runs once with the result', () => {
  guarded(main, 10_000, 'the requests of this test', () => {
    pollUntilIdle(main, 100);
    const n = new Int32Array(new SharedArrayBuffer(4));
    const data = { ret: -EINPROGRESS, calls: 0 };
    const acb = thread_pool_submit_aio(pool, inc, { sab: n.buffer }, (d: typeof data, r: number) => {
      d.ret = r;
      d.calls++;
    }, data);
    assert.ok(acb instanceof ThreadPoolElement);
    assert.ok(acb instanceof BlockAIOCB);
    assert.is(acb.refcnt, 1);
    assert.is(acb.bs, null, 'pool AIOCBs have no BlockDriverState');
    assert.is(acb.opaque, data);
    assert.is(acb.aiocb_info.get_aio_context?.(acb), main);
    // The worker finishes; the callback still has not run: only the context's BH runs it.
    waitUntil(() => Atomics.load(n, 0) === 1, 'the worker to run inc');
    Atomics.wait(pause, 0, 0, 5);
    assert.is(data.calls, 0);
    assert.is(data.ret, -EINPROGRESS);
    while (data.ret === -EINPROGRESS) aio_poll(main, true);
    assert.is(data.calls, 1);
    assert.is(data.ret, 0, 'inc returns the old value, 0');
    assert.is(aio_poll(main, false), false);
    assert.is(data.calls, 1, 'exactly once');
    // A second request: the function's return value reaches the callback as is.
    assert.is(runSync(main, echo, { value: 12345 }), 12345);
    assert.is(runSync(main, echo, { value: -28 }), -28);
    assert.is(runSync(main, asyncEcho, { value: 77 }), 77, "an async function's promise value is the result");
  });
});

test('DESIGN blocking drive: one aio_poll(ctx, true) sleeps until the worker is done, runs the callback and returns true', () => {
  guarded(main, 10_000, 'the requests of this test', () => {
    pollUntilIdle(main, 100);
    const log: string[] = [];
    thread_pool_submit_aio(pool, sleepFn, { ms: 20, ret: 9 }, (_o, r) => log.push(`cb ${r}`));
    assert.equal(log, []);
    const t0 = Date.now();
    const progress = aio_poll(main, true);
    log.push(`aio_poll ${progress}`);
    assert.equal(log, ['cb 9', 'aio_poll true']);
    assert.ok(Date.now() - t0 >= 15, 'it really waited for the worker');
  });
});

interface CoData {
  n: SharedI32;
  ret: number;
  active: number;
  log: string[];
}
function* coSubmit(d: CoData): CoroutineFn<void> {
  d.active = 1;
  d.ret = -EINPROGRESS;
  d.log.push('co submits');
  const r = yield* thread_pool_submit_co(pool, inc, { sab: d.n.buffer });
  d.log.push(`co resumed with ${r}, n=${Atomics.load(d.n, 0)}, in ${qemu_get_current_aio_context().name}`);
  d.ret = r;
  d.active--;
}

test('/thread-pool/submit-co (S94): the coroutine yields in thread_pool_submit_co and resumes with the result inside the completion BH', () => {
  guarded(main, 10_000, 'the requests of this test', () => {
    pollUntilIdle(main, 100);
    const d: CoData = { n: new Int32Array(new SharedArrayBuffer(4)), ret: NOT_YET, active: 0, log: [] };
    qemu_coroutine_enter(qemu_coroutine_create(coSubmit, d));
    d.log.push('back from enter');
    assert.is(d.active, 1);
    assert.is(d.ret, -EINPROGRESS);
    let polls = 0;
    while (d.ret === -EINPROGRESS) {
      const p = aio_poll(main, true);
      polls++;
      d.log.push(`aio_poll ${p}`);
    }
    assert.is(d.active, 0);
    assert.is(d.ret, 0);
    assert.equal(d.log.slice(0, 2), ['co submits', 'back from enter']);
    assert.equal(d.log.slice(-2), ['co resumed with 0, n=1, in main', 'aio_poll true']);
    assert.is(d.log.length, 3 + polls);
  });
});

test('S94: thread_pool_submit_co outside a coroutine throws CoroutineError', () => {
  assert.throws(
    () => thread_pool_submit_co(pool, thread_pool_nop, null).next(),
    (e: unknown) => e instanceof CoroutineError && e.message === "thread_pool_submit_co: Assertion 'qemu_in_coroutine()' failed",
  );
});

function submitMany(n: number): { datas: { n: SharedI32; ret: number; calls: number }[]; polls: number } {
  const datas = Array.from({ length: n }, () => ({ n: new Int32Array(new SharedArrayBuffer(4)), ret: -EINPROGRESS, calls: 0 }));
  let active = n;
  for (const d of datas) {
    thread_pool_submit_aio(pool, inc, { sab: d.n.buffer }, (dd: typeof d, r: number) => {
      dd.ret = r;
      dd.calls++;
      active--;
    }, d);
  }
  let polls = 0;
  guarded(main, 10_000, `${n} requests`, () => {
    while (active > 0) {
      aio_poll(main, true);
      polls++;
    }
  });
  return { datas, polls };
}

test('/thread-pool/submit-many: 100 requests, more than the workers, all complete once with their result', () => {
  pollUntilIdle(main, 100);
  const live = qemu_aio_count_live();
  const { datas } = submitMany(100);
  assert.equal(datas.map((d) => [Atomics.load(d.n, 0), d.ret, d.calls]), datas.map(() => [1, 0, 1]));
  assert.is(qemu_aio_count_live(), live);
  assert.ok(threadPoolWorkerCount() <= 64, `at most max workers, got ${threadPoolWorkerCount()}`);
});

test('/thread-pool/submit-many with max 2: all complete, never more than 2 running at once', () => {
  pollUntilIdle(main, 100);
  thread_pool_update_params(pool, { max: 2 });
  try {
    const { datas } = submitMany(100);
    assert.equal(datas.map((d) => [Atomics.load(d.n, 0), d.ret, d.calls]), datas.map(() => [1, 0, 1]));
    const t = new Int32Array(new SharedArrayBuffer(4 * (3 + 20)));
    let left = 20;
    for (let i = 1; i <= 20; i++) thread_pool_submit_aio(pool, track, { sab: t.buffer, tag: i, ms: 2 }, () => left--);
    waitWhile(main, () => left > 0, 'the tracked requests');
    assert.is(Atomics.load(t, 2), 20);
    assert.ok(Atomics.load(t, 1) <= 2, `max running ${Atomics.load(t, 1)}`);
  } finally {
    thread_pool_update_params(pool, { max: 64 });
  }
});

// --- QEMU's /thread-pool/cancel and cancel-async (S95, S96) ---

interface CancelData {
  acb: BlockAIOCB | null;
  ret: number;
  calls: number;
}

function cancelRound(sync: boolean): { data: CancelData[]; n: SharedI32; cancelledFirstPass: number } {
  const N = 100;
  const n = new Int32Array(new SharedArrayBuffer(4 * N));
  let active = 0;
  const done = (d: CancelData, r: number) => {
    assert.ok(d.ret === -EINPROGRESS || d.ret === -ECANCELED, `callback of a finished request: ret was ${d.ret}`);
    d.ret = r;
    d.acb = null;
    d.calls++;
    active--;
  };
  const data: CancelData[] = [];
  for (let i = 0; i < N; i++) {
    const d: CancelData = { acb: null, ret: -EINPROGRESS, calls: 0 };
    data.push(d);
    d.acb = thread_pool_submit_aio(pool, claimAndSleep, { sab: n.buffer, index: i, ms: 150, ret: 7 }, done, d);
    active++;
  }
  // max 1 and nothing polled: only request 0 can be running.
  waitUntil(() => Atomics.load(n, 0) !== 0, 'the first request to start');
  let cancelledFirstPass = 0;
  for (let i = 0; i < N; i++) {
    const d = data[i] as CancelData;
    if (Atomics.compareExchange(n, i, 0, 4) === 0) {
      d.ret = -ECANCELED;
      if (sync) {
        bdrv_aio_cancel(d.acb as BlockAIOCB);
        assert.is(d.calls, 1, 'bdrv_aio_cancel returns only after the callback ran');
      } else {
        bdrv_aio_cancel_async(d.acb as BlockAIOCB);
      }
      cancelledFirstPass++;
    }
  }
  if (!sync) assert.is(active, N, 'bdrv_aio_cancel_async never calls the callback itself (S93)');
  for (let i = 0; i < N; i++) {
    const d = data[i] as CancelData;
    if (d.acb !== null && Atomics.load(n, i) < 4) {
      if (sync) {
        bdrv_aio_cancel(d.acb);
        assert.is(d.calls, 1, 'a running request: bdrv_aio_cancel waited for its real result');
      } else bdrv_aio_cancel_async(d.acb);
    }
  }
  waitWhile(main, () => active > 0, 'every cancelled or finished callback');
  return { data, n, cancelledFirstPass };
}

test('/thread-pool/cancel-async (S95), max 1: the 99 still queued end with -ECANCELED and never run; the running one gets its real result', () => {
  pollUntilIdle(main, 100);
  const live = qemu_aio_count_live();
  thread_pool_update_params(pool, { max: 1 });
  try {
    const { data, n, cancelledFirstPass } = guarded(main, 10_000, 'the cancel round', () => cancelRound(false));
    assert.is(cancelledFirstPass, 99);
    assert.equal(data.map((d) => d.calls), data.map(() => 1), 'every callback exactly once');
    assert.equal([Atomics.load(n, 0), (data[0] as CancelData).ret], [3, 7], 'request 0 ran to the end');
    for (let i = 1; i < 100; i++) {
      assert.equal([i, Atomics.load(n, i), (data[i] as CancelData).ret], [i, 4, -ECANCELED]);
    }
    assert.is(qemu_aio_count_live(), live);
  } finally {
    thread_pool_update_params(pool, { max: 64 });
  }
});

test('/thread-pool/cancel (S96): bdrv_aio_cancel returns after the callback; cancelled ones never ran, the others finished with their result', () => {
  pollUntilIdle(main, 100);
  const live = qemu_aio_count_live();
  thread_pool_update_params(pool, { max: 1 });
  try {
    const { data, n } = guarded(main, 10_000, 'the cancel round', () => cancelRound(true));
    let cancelled = 0;
    let finished = 0;
    for (let i = 0; i < 100; i++) {
      const d = data[i] as CancelData;
      const st = Atomics.load(n, i);
      assert.is(d.calls, 1);
      if (d.ret === -ECANCELED) {
        assert.is(st, 4, `request ${i} was cancelled, so its function never ran`);
        cancelled++;
      } else {
        // Real result: it ran to the end, or (claimed by the test too late) was already ACTIVE.
        assert.is(d.ret, 7, `request ${i}`);
        assert.ok(st === 3 || st === 4, `request ${i}: state ${st}`);
        finished++;
      }
    }
    assert.ok(finished >= 1 && cancelled >= 1, `finished ${finished}, cancelled ${cancelled}`);
    assert.is(finished + cancelled, 100);
    assert.is(Atomics.load(n, 0), 3, 'request 0 was running and finished');
    assert.is(qemu_aio_count_live(), live);
  } finally {
    thread_pool_update_params(pool, { max: 64 });
  }
});

test('S96: bdrv_aio_cancel of a running request waits for the function to finish; the AIOCB is freed afterwards', () => {
  pollUntilIdle(main, 100);
  const n = new Int32Array(new SharedArrayBuffer(4));
  const log: string[] = [];
  const acb = thread_pool_submit_aio(pool, claimAndSleep, { sab: n.buffer, index: 0, ms: 40, ret: 11 }, (_o, r) =>
    log.push(`cb ${r} state ${Atomics.load(n, 0)}`),
  );
  waitUntil(() => Atomics.load(n, 0) === 1, 'the request to start');
  guarded(main, 5000, 'bdrv_aio_cancel', () => bdrv_aio_cancel(acb));
  log.push('cancel returned');
  assert.equal(log, ['cb 11 state 3', 'cancel returned']);
  assert.throws(() => acb.refcnt, isQemuErr("BlockAIOCB used after it was freed (AIOCBInfo 'thread_pool_aiocb_info')"));
  assert.throws(() => bdrv_aio_cancel_async(acb), isQemuErr("BlockAIOCB used after it was freed (AIOCBInfo 'thread_pool_aiocb_info')"));
});

test('S95: cancelling a request twice, or after its function finished but before its callback, changes nothing: one callback, real result', () => {
  pollUntilIdle(main, 100);
  const log: string[] = [];
  const n = new Int32Array(new SharedArrayBuffer(4));
  const acb = thread_pool_submit_aio(pool, inc, { sab: n.buffer }, (_o, r) => log.push(`inc ${r}`));
  waitUntil(() => Atomics.load(n, 0) === 1, 'inc to run');
  bdrv_aio_cancel_async(acb);
  bdrv_aio_cancel_async(acb);
  waitWhile(main, () => log.length === 0, 'inc');
  assert.equal(log, ['inc 0']);
  // Cancelled while queued in JS (max 1 and a held request in front), then cancelled again.
  const a = heldState();
  thread_pool_update_params(pool, { max: 1 });
  try {
    thread_pool_submit_aio(pool, held, { sab: a.buffer, tag: 1 }, (_o, r) => log.push(`held ${r}`));
    const q = thread_pool_submit_aio(pool, echo, { value: 5 }, (_o, r) => log.push(`echo ${r}`));
    bdrv_aio_cancel_async(q);
    bdrv_aio_cancel_async(q);
    Atomics.store(a, 0, 1);
    Atomics.notify(a, 0);
    waitWhile(main, () => log.length < 3, 'held and the cancelled echo');
    assert.equal(log, ['inc 0', `echo ${-ECANCELED}`, 'held 1']);
  } finally {
    thread_pool_update_params(pool, { max: 64 });
  }
});

// --- S93: where, when and in which order callbacks run ---

test('S93: requests found DONE together complete newest-submitted first (4, 3, 2, 1), all in one aio_poll', () => {
  thread_pool_update_params(pool, { max: 4 });
  try {
    const order: number[] = [];
    finishTogether(4, (tag, r) => order.push(tag * 10 + r));
    assert.equal(order, [], 'nothing runs callbacks but the context');
    assert.is(aio_poll(main, true), true);
    assert.equal(order, [40, 30, 20, 10]);
    assert.is(aio_poll(main, false), false);
  } finally {
    thread_pool_update_params(pool, { max: 64 });
  }
});

test('S93: the completion BH is rescheduled before each callback, so a nested aio_poll in a callback completes the other finished request', () => {
  const log: string[] = [];
  finishTogether(2, (tag) => {
    if (tag === 1) {
      log.push('cb 1');
      return;
    }
    log.push('cb 2 start');
    log.push(`nested aio_poll ${aio_poll(main, false)}`);
    log.push('cb 2 end');
  });
  assert.is(aio_poll(main, false), true);
  assert.equal(log, ['cb 2 start', 'cb 1', 'nested aio_poll true', 'cb 2 end']);
  assert.is(aio_poll(main, false), false);
});

test('DESIGN: a throwing callback leaves aio_poll; its AIOCB is still freed and the other finished callback runs in the next aio_poll', () => {
  pollUntilIdle(main, 100);
  const live = qemu_aio_count_live();
  const log: string[] = [];
  finishTogether(2, (tag) => {
    log.push(`cb ${tag}`);
    if (tag === 2) throw new Error('callback failed');
  });
  assert.is(qemu_aio_count_live(), live + 2);
  assert.throws(() => aio_poll(main, false), (e: unknown) => e instanceof Error && e.message === 'callback failed');
  assert.equal(log, ['cb 2']);
  assert.is(qemu_aio_count_live(), live + 1, 'the thrower was freed, the other is still pending');
  assert.is(aio_poll(main, false), true);
  assert.equal(log, ['cb 2', 'cb 1']);
  assert.is(qemu_aio_count_live(), live);
});

test("S93: callbacks run in the pool's context: an IOThread's pool, driven by a wait in main and by Node's loop", async () => {
  const t = iothread_create('tp-io');
  try {
    const io = iothread_get_aio_context(t);
    const p = aio_get_thread_pool(io);
    assert.is.not(p, pool);
    let where: AioContext | null = null;
    let ret = NOT_YET;
    thread_pool_submit_aio(p, echo, { value: 3 }, (_o, r) => {
      where = qemu_get_current_aio_context();
      ret = r;
    });
    waitWhile(main, () => where === null, 'the IOThread pool callback');
    assert.is(where, io);
    assert.is(ret, 3);
    const [w, r] = await within(
      new Promise<[AioContext, number]>((resolve) =>
        thread_pool_submit_aio(p, echo, { value: 4 }, (_o, rr) => resolve([qemu_get_current_aio_context(), rr])),
      ),
      5000,
      "the IOThread pool's callback under the host-loop drive",
    );
    assert.is(w, io);
    assert.is(r, 4);
  } finally {
    iothread_destroy(t);
  }
});

test("S93: a pool of an aio_context_new() context completes in that context's own aio_poll, with it as the current context", () => {
  guarded(main, 10_000, 'the requests of this test', () => {
    const ctx = aio_context_new();
    const p = aio_get_thread_pool(ctx);
    const where: string[] = [];
    thread_pool_submit_aio(p, echo, { value: 1 }, (_o, r) => where.push(`${r} in ${qemu_get_current_aio_context() === ctx ? 'ctx' : 'other'}`));
    for (let i = 0; i < 1000 && where.length === 0; i++) aio_poll(ctx, true);
    assert.equal(where, ['1 in ctx']);
    assert.is(runSync(ctx, echo, { value: 2 }), 2);
    aio_context_unref(ctx);
  });
});

test("aio_wait: waiting in main for a request of a context nobody drives throws AioWaitError instead of hanging", () => {
  pollUntilIdle(main, 100);
  const ctx = aio_context_new();
  const p = aio_get_thread_pool(ctx);
  let done = false;
  thread_pool_submit_aio(p, echo, { value: 1 }, () => (done = true));
  assert.throws(
    () => AIO_WAIT_WHILE(null, () => !done),
    (e: unknown) =>
      e instanceof AioWaitError &&
      e.message ===
        'aio_poll: this blocking wait can never end: no context it drives has a scheduled BH, an armed timer on a running clock or an outstanding request',
  );
  waitWhile(ctx, () => !done, 'the request');
  assert.is(done, true);
  aio_context_unref(ctx);
});

test("DESIGN host-loop drive: an attached context's pool delivers its callback from Node's loop, in that context", async () => {
  const ctx = aio_context_new();
  const src = aio_get_g_source(ctx);
  src.attach();
  try {
    const p = aio_get_thread_pool(ctx);
    const [w, r] = await within(
      new Promise<[AioContext, number]>((resolve) =>
        thread_pool_submit_aio(p, sleepFn, { ms: 10, ret: 5 }, (_o, rr) => resolve([qemu_get_current_aio_context(), rr])),
      ),
      5000,
      'a pool callback under the host-loop drive',
    );
    assert.is(w, ctx);
    assert.is(r, 5);
    // Many at once.
    const rets = await within(
      Promise.all(
        Array.from(
          { length: 20 },
          (_, i) => new Promise<number>((resolve) => thread_pool_submit_aio(p, echo, { value: i }, (_o, rr) => resolve(rr))),
        ),
      ),
      5000,
      '20 pool callbacks under the host-loop drive',
    );
    assert.equal(rets, Array.from({ length: 20 }, (_, i) => i));
  } finally {
    src.destroy();
    aio_context_unref(ctx);
  }
});

test("S97: finalizing a context whose pool has a request outstanding throws thread_pool_free's assertion; after completion it finalizes", () => {
  const ctx = aio_context_new();
  let done = false;
  thread_pool_submit_aio(aio_get_thread_pool(ctx), sleepFn, { ms: 20 }, () => (done = true));
  assert.throws(
    () => aio_context_unref(ctx),
    isQemuErr(`thread_pool_free: Assertion 'QLIST_EMPTY(&pool->head)' failed (1 request(s) outstanding in context '${ctx.name}')`),
  );
  waitWhile(ctx, () => !done, 'the request');
  aio_context_unref(ctx);
  assert.throws(() => aio_poll(ctx, false), isQemuErr(`aio_poll: context '${ctx.name}' was finalized`));
});

// --- Pool parameters ---

test('thread_pool_update_params refuses bad values with QEMU-style messages and changes nothing', () => {
  const ctx = aio_context_new();
  const p = aio_get_thread_pool(ctx);
  const minRange = 'thread-pool-min value must be in range [0, 256]';
  const maxRange = 'thread-pool-max value must be in range [1, 256]';
  const order = 'thread-pool-min value must be less than or equal to thread-pool-max';
  assert.throws(() => thread_pool_update_params(p, { min: -1 }), isQemuErr(minRange));
  assert.throws(() => thread_pool_update_params(p, { min: 1.5 }), isQemuErr(minRange));
  assert.throws(() => thread_pool_update_params(p, { min: 257 }), isQemuErr(minRange));
  assert.throws(() => thread_pool_update_params(p, { min: Number.NaN }), isQemuErr(minRange));
  assert.throws(() => thread_pool_update_params(p, { max: 0 }), isQemuErr(maxRange));
  assert.throws(() => thread_pool_update_params(p, { max: 257 }), isQemuErr(maxRange));
  assert.throws(() => thread_pool_update_params(p, { max: 2.5 }), isQemuErr(maxRange));
  assert.throws(() => thread_pool_update_params(p, { min: 3, max: 2 }), isQemuErr(order));
  thread_pool_update_params(p, { max: 1 });
  assert.throws(() => thread_pool_update_params(p, { min: 2 }), isQemuErr(order));
  assert.throws(() => thread_pool_update_params(p, { max: 0 }), isQemuErr(maxRange));
  // Still max 1: requests run one at a time.
  const t = new Int32Array(new SharedArrayBuffer(4 * (3 + 6)));
  let left = 6;
  for (let tag = 1; tag <= 6; tag++) thread_pool_submit_aio(p, track, { sab: t.buffer, tag, ms: 2 }, () => left--);
  waitWhile(ctx, () => left > 0, 'the tracked requests');
  assert.is(Atomics.load(t, 1), 1, 'max running');
  aio_context_unref(ctx);
});

test('API: with max 1 requests run one at a time in submission order, and complete in that order', () => {
  pollUntilIdle(main, 100);
  thread_pool_update_params(pool, { max: 1 });
  try {
    const t = new Int32Array(new SharedArrayBuffer(4 * (3 + 12)));
    const cbs: number[] = [];
    for (let tag = 1; tag <= 12; tag++) thread_pool_submit_aio(pool, track, { sab: t.buffer, tag, ms: 1 }, (_o, r) => cbs.push(r));
    waitWhile(main, () => cbs.length < 12, 'the 12 requests');
    const tags = Array.from({ length: 12 }, (_, i) => i + 1);
    assert.equal(Array.from(t.subarray(3, 15)), tags, 'start order');
    assert.is(Atomics.load(t, 1), 1, 'never two at once');
    assert.equal(cbs, tags);
  } finally {
    thread_pool_update_params(pool, { max: 64 });
  }
});

test('API: thread_pool_update_params applies at once: raising max starts the requests waiting for it', () => {
  pollUntilIdle(main, 100);
  const a = heldState();
  let left = 3;
  // Enough workers up front (another pool's min), so this checks max alone, not how the
  // pool grows (see the 'grow' test below).
  const keeper = aio_context_new();
  thread_pool_update_params(aio_get_thread_pool(keeper), { min: 4, max: 4 });
  thread_pool_update_params(pool, { max: 1 });
  try {
    for (let tag = 1; tag <= 3; tag++) thread_pool_submit_aio(pool, held, { sab: a.buffer, tag }, () => left--);
    waitUntil(() => Atomics.load(a, 1) === 1, 'the first request to start');
    Atomics.wait(pause, 0, 0, 20);
    assert.is(Atomics.load(a, 1), 1, 'max 1: the others wait');
    thread_pool_update_params(pool, { max: 3 });
    waitUntil(() => Atomics.load(a, 1) === 3, () => `the waiting requests to start once max is 3 (started ${startOrder(a)})`);
    assert.equal(startOrder(a), [1, 2, 3]);
  } finally {
    Atomics.store(a, 0, 1);
    Atomics.notify(a, 0);
    waitWhile(main, () => left > 0, 'the held requests');
    thread_pool_update_params(pool, { max: 64 });
    aio_context_unref(keeper);
  }
});

test('thread_pool_update_params: min starts that many workers at once (and they serve requests)', () => {
  const ctx = aio_context_new();
  const p = aio_get_thread_pool(ctx);
  thread_pool_update_params(p, { min: 3, max: 8 });
  assert.ok(threadPoolWorkerCount() >= 3, `workers: ${threadPoolWorkerCount()}`);
  assert.is(runSync(ctx, echo, { value: 8 }), 8);
  thread_pool_update_params(p, { min: 0 });
  aio_context_unref(ctx);
});

// --- User functions ---

test('thread_pool_func: a function that throws completes with -EIO, a non-number with -EINVAL; the pool goes on', () => {
  assert.is(runSync(main, throws, null), -EIO);
  assert.is(runSync(main, echo, { value: 'seven' }), -EINVAL);
  assert.is(runSync(main, echo, { value: Number.NaN }), -EINVAL);
  assert.is(runSync(main, echo, { value: Number.POSITIVE_INFINITY }), -EINVAL);
  assert.is(runSync(main, echo, { value: null }), -EINVAL);
  assert.is(runSync(main, asyncEcho, { value: '1' }), -EINVAL, 'a promise of a non-number');
  assert.is(runSync(main, echo, { value: 6 }), 6);
});

test('thread_pool_func: a missing export, an export that is not a function or a missing module complete with -EIO', () => {
  assert.is(runSync(main, thread_pool_func<null>(FUNCS, 'noSuchExport'), null), -EIO);
  assert.is(runSync(main, thread_pool_func<null>(FUNCS, 'notAFunction'), null), -EIO);
  assert.is(runSync(main, thread_pool_func<null>(new URL('./fixtures/pool-no-such-module.mjs', import.meta.url), 'f'), null), -EIO);
  assert.is(runSync(main, echo, { value: 1 }), 1);
});

test('thread_pool_func: the module is named by URL (string or URL object); a path is refused with QemuError', () => {
  const f = thread_pool_func<{ value: unknown }>(FUNCS.href, 'echo');
  assert.is(f.name, 'echo');
  assert.is(runSync(main, f, { value: 31 }), 31);
  assert.throws(
    () => thread_pool_func('test/aio/fixtures/pool-funcs.mjs', 'echo'),
    isQemuErr("thread_pool_func: 'test/aio/fixtures/pool-funcs.mjs' is not a URL (use pathToFileURL or import.meta.resolve)"),
  );
});

test('thread_pool_func: a TypeScript module runs in the workers (through tsx)', () => {
  const mul = thread_pool_func<{ x: number; y: number; sab?: SharedArrayBuffer }>(new URL('./fixtures/pool-typed.ts', import.meta.url), 'mul');
  const sab = new SharedArrayBuffer(4);
  assert.is(runSync(main, mul, { x: 6, y: 7, sab }), 42);
  assert.is(Atomics.load(new Int32Array(sab), 0), 42, 'the SharedArrayBuffer in arg stayed shared');
});

// --- Stress ---

test('10,000 nop requests with seeded random cancellations: every callback exactly once, AIOCBs all freed', () => {
  guarded(main, 30_000, 'the 10,000 requests', () => {
    pollUntilIdle(main, 100);
    const live = qemu_aio_count_live();
    const N = 10_000;
    let seed = 0x2545f491;
    const rand = () => {
      // xorshift32
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) / 0x100000000;
    };
    const calls = new Uint8Array(N);
    const rets = new Int32Array(N);
    const acbs: BlockAIOCB[] = [];
    let completed = 0;
    const cb = (i: number, r: number) => {
      calls[i] = (calls[i] as number) + 1;
      rets[i] = r;
      completed++;
    };
    let syncCancels = 0;
    for (let i = 0; i < N; i++) {
      acbs.push(thread_pool_submit_aio(pool, thread_pool_nop, null, cb, i));
      if (rand() < 0.3) {
        const j = Math.floor(rand() * (i + 1));
        if (calls[j] === 0) bdrv_aio_cancel_async(acbs[j] as BlockAIOCB);
      }
      if (rand() < 0.002) {
        // A recent request: most likely still pending (callbacks run only when polled).
        const j = Math.max(0, i - Math.floor(rand() * 50));
        if (calls[j] === 0) {
          bdrv_aio_cancel(acbs[j] as BlockAIOCB);
          assert.is(calls[j], 1);
          syncCancels++;
        }
      }
      if (i % 997 === 0) aio_poll(main, false);
    }
    AIO_WAIT_WHILE(main, () => completed < N);
    assert.is(completed, N);
    let cancelled = 0;
    let ok = 0;
    for (let i = 0; i < N; i++) {
      if (calls[i] !== 1) assert.unreachable(`request ${i} called ${calls[i]} times`);
      if (rets[i] === -ECANCELED) cancelled++;
      else if (rets[i] === 0) ok++;
      else assert.unreachable(`request ${i} ret ${rets[i]}`);
    }
    assert.is(cancelled + ok, N);
    assert.ok(cancelled > 0 && ok > 0, `cancelled ${cancelled}, ok ${ok}`);
    assert.ok(syncCancels > 0);
    assert.is(qemu_aio_count_live(), live);
    assert.is(aio_poll(main, false), false);
  });
});

// --- Built-in functions on a real file and guest memory ---

function pattern(len: number, seed = 1): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (i * 7 + seed * 13 + (i >> 8)) & 255;
  return b;
}

function withFile(size: number, fn: (fd: number, path: string, data: Uint8Array) => void, dirBase = tmpdir()): void {
  const dir = mkdtempSync(join(dirBase, 'aioco-tp-'));
  const path = join(dir, 'f.bin');
  const data = pattern(size);
  writeFileSync(path, data);
  const fd = openSync(path, 'r+');
  try {
    fn(fd, path, data);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
}

test('thread_pool_preadv: several iovecs of guest memory are filled in place (qemu_memalign views, subarrays, a plain SharedArrayBuffer)', () => {
  withFile(10_000, (fd, _path, data) => {
    const a = qemu_memalign(4096, 100);
    const bBig = qemu_memalign(512, 3000);
    const b = bBig.subarray(5, 1005);
    const c = new Uint8Array(new SharedArrayBuffer(777), 3, 700);
    const iov = [a, b, c];
    a.fill(0xee);
    bBig.fill(0xee);
    c.fill(0xee);
    assert.is(runSync(main, thread_pool_preadv, { fd, offset: 123, iov }), 0);
    assert.equal(Array.from(a), Array.from(data.subarray(123, 223)));
    assert.equal(Array.from(b), Array.from(data.subarray(223, 1223)));
    assert.equal(Array.from(c), Array.from(data.subarray(1223, 1923)));
    assert.is(bBig[4], 0xee, 'bytes outside the iovec are untouched');
    assert.is(bBig[1005], 0xee);
    // One iovec.
    const one = qemu_memalign(4096, 4096);
    assert.is(runSync(main, thread_pool_preadv, { fd, offset: 4096, iov: [one] }), 0);
    assert.equal(Array.from(one), Array.from(data.subarray(4096, 8192)));
    qemu_vfree(a);
    qemu_vfree(bBig);
    qemu_vfree(one);
  });
});

test('thread_pool_preadv: reading past EOF gives zeroes and ret 0 (partly and wholly past the end)', () => {
  withFile(10_000, (fd, _path, data) => {
    const x = qemu_memalign(4096, 1500);
    const y = qemu_memalign(4096, 2596);
    x.fill(0xaa);
    y.fill(0xaa);
    assert.is(runSync(main, thread_pool_preadv, { fd, offset: 9000, iov: [x, y] }), 0);
    const want = new Uint8Array(4096);
    want.set(data.subarray(9000));
    assert.equal(Array.from(x), Array.from(want.subarray(0, 1500)));
    assert.equal(Array.from(y), Array.from(want.subarray(1500)));
    const z = qemu_memalign(4096, 512);
    z.fill(0xaa);
    assert.is(runSync(main, thread_pool_preadv, { fd, offset: 1 << 20, iov: [z] }), 0);
    assert.equal(Array.from(z), Array.from(new Uint8Array(512)));
    qemu_vfree(x);
    qemu_vfree(y);
    qemu_vfree(z);
  });
});

test('thread_pool_pwritev: several iovecs land in the file at the offset; the file grows', () => {
  withFile(1000, (fd, path, data) => {
    const a = qemu_memalign(4096, 300);
    const b = qemu_memalign(4096, 4000).subarray(100, 1100);
    a.set(pattern(300, 5));
    b.set(pattern(1000, 9));
    assert.is(runSync(main, thread_pool_pwritev, { fd, offset: 500, iov: [a, b] }), 0);
    const file = readFileSync(path);
    assert.is(file.length, 1800);
    assert.equal(Array.from(file.subarray(0, 500)), Array.from(data.subarray(0, 500)));
    assert.equal(Array.from(file.subarray(500, 800)), Array.from(a));
    assert.equal(Array.from(file.subarray(800, 1800)), Array.from(b));
  });
});

test('DESIGN: iovecs over ordinary memory work through a bounce buffer (read copies back before the callback, write copies out)', () => {
  withFile(5000, (fd, path, data) => {
    const plain = new Uint8Array(300);
    const buf = Buffer.alloc(200);
    const shared = qemu_memalign(4096, 100);
    let seen = '';
    let ret = NOT_YET;
    thread_pool_submit_aio(pool, thread_pool_preadv, { fd, offset: 10, iov: [plain, shared, buf] }, (_o, r) => {
      ret = r;
      seen = `${plain[0]},${buf[199]}`;
    });
    waitWhile(main, () => ret === NOT_YET, 'preadv');
    assert.is(ret, 0);
    assert.is(seen, `${data[10]},${data[609]}`, 'the data is in place when the callback runs');
    assert.equal(Array.from(plain), Array.from(data.subarray(10, 310)));
    assert.equal(Array.from(shared), Array.from(data.subarray(310, 410)));
    assert.equal(Array.from(buf), Array.from(data.subarray(410, 610)));
    const out = pattern(700, 3);
    assert.is(runSync(main, thread_pool_pwritev, { fd, offset: 4500, iov: [out.subarray(0, 350), Buffer.from(out.subarray(350))] }), 0);
    const file = readFileSync(path);
    assert.is(file.length, 5200);
    assert.equal(Array.from(file.subarray(4500)), Array.from(out));
    qemu_vfree(shared);
  });
});

test('DESIGN: more than 64 iovecs work (64 in place, 65 and 200 bounced), for reads and writes', () => {
  withFile(8192, (fd, path, data) => {
    for (const count of [64, 65, 200]) {
      const backing = qemu_memalign(4096, count * 16);
      const iov = Array.from({ length: count }, (_, i) => backing.subarray(i * 16, i * 16 + 15));
      assert.is(runSync(main, thread_pool_preadv, { fd, offset: 7, iov }), 0, `preadv with ${count} iovecs`);
      const got = iov.flatMap((v) => Array.from(v));
      assert.equal(got, Array.from(data.subarray(7, 7 + count * 15)), `${count} iovecs`);
      qemu_vfree(backing);
    }
    const w = Array.from({ length: 70 }, (_, i) => {
      const v = qemu_memalign(512, 10);
      v.fill(i);
      return v;
    });
    assert.is(runSync(main, thread_pool_pwritev, { fd, offset: 1000, iov: w }), 0);
    const file = readFileSync(path);
    assert.equal(Array.from(file.subarray(1000, 1700)), Array.from({ length: 700 }, (_, k) => Math.floor(k / 10)));
    for (const v of w) qemu_vfree(v);
  });
});

test('built-ins: fsync and fdatasync return 0, ftruncate changes the size, fstat_size returns it, write_zeroes writes zeroes', () => {
  withFile(10_000, (fd, path, data) => {
    assert.is(runSync(main, thread_pool_fsync, { fd }), 0);
    assert.is(runSync(main, thread_pool_fdatasync, { fd }), 0);
    assert.is(runSync(main, thread_pool_fstat_size, { fd }), 10_000);
    assert.is(runSync(main, thread_pool_ftruncate, { fd, length: 12_345 }), 0);
    assert.is(fstatSync(fd).size, 12_345);
    assert.is(runSync(main, thread_pool_fstat_size, { fd }), 12_345);
    assert.is(runSync(main, thread_pool_ftruncate, { fd, length: 3000 }), 0);
    assert.is(runSync(main, thread_pool_fstat_size, { fd }), 3000);
    assert.is(runSync(main, thread_pool_write_zeroes, { fd, offset: 100, length: 1000 }), 0);
    let file = readFileSync(path);
    assert.is(file.length, 3000);
    assert.equal(Array.from(file.subarray(0, 100)), Array.from(data.subarray(0, 100)));
    assert.ok(file.subarray(100, 1100).every((x) => x === 0));
    assert.equal(Array.from(file.subarray(1100)), Array.from(data.subarray(1100, 3000)));
    // Past the end, and more than one internal chunk (1 MiB): the file grows, all zeroes.
    assert.is(runSync(main, thread_pool_write_zeroes, { fd, offset: 4000, length: (1 << 20) + 5 }), 0);
    file = readFileSync(path);
    assert.is(file.length, 4000 + (1 << 20) + 5);
    assert.ok(file.subarray(3000).every((x) => x === 0));
    assert.is(runSync(main, thread_pool_nop, null), 0);
  });
});

test('built-ins: errors are -errno (a bad fd gives -EBADF for each operation; writing a read-only fd too)', () => {
  const bad = 987_654;
  const buf = qemu_memalign(4096, 512);
  assert.is(runSync(main, thread_pool_preadv, { fd: bad, offset: 0, iov: [buf] }), -EBADF);
  assert.is(runSync(main, thread_pool_preadv, { fd: bad, offset: 0, iov: [buf.subarray(0, 100), buf.subarray(200, 300)] }), -EBADF);
  assert.is(runSync(main, thread_pool_pwritev, { fd: bad, offset: 0, iov: [buf] }), -EBADF);
  assert.is(runSync(main, thread_pool_preadv, { fd: bad, offset: 0, iov: [new Uint8Array(8)] }), -EBADF, 'bounced');
  assert.is(runSync(main, thread_pool_fsync, { fd: bad }), -EBADF);
  assert.is(runSync(main, thread_pool_fdatasync, { fd: bad }), -EBADF);
  assert.is(runSync(main, thread_pool_ftruncate, { fd: bad, length: 0 }), -EBADF);
  assert.is(runSync(main, thread_pool_fstat_size, { fd: bad }), -EBADF);
  assert.is(runSync(main, thread_pool_write_zeroes, { fd: bad, offset: 0, length: 10 }), -EBADF);
  withFile(100, (_fd, path) => {
    const ro = openSync(path, 'r');
    try {
      assert.is(runSync(main, thread_pool_pwritev, { fd: ro, offset: 0, iov: [buf] }), -EBADF);
    } finally {
      closeSync(ro);
    }
  });
  qemu_vfree(buf);
});

/** Runs `fn` with a 16 KiB file under .tmp-tests opened O_RDWR|O_DIRECT (skips if refused). */
function withDirectFile(fn: (fd: number, data: Uint8Array) => void): void {
  const base = join(root, '.tmp-tests');
  mkdirSync(base, { recursive: true });
  try {
    withFile(
      16_384,
      (_fd, path, data) => {
        let fd: number;
        try {
          fd = openSync(path, constants.O_RDWR | constants.O_DIRECT);
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if (code === 'EINVAL' || code === 'EOPNOTSUPP') {
            console.log(`  skipped O_DIRECT check: the filesystem of ${base} refuses O_DIRECT (${code})`);
            return;
          }
          throw e;
        }
        try {
          fn(fd, data);
        } finally {
          closeSync(fd);
        }
      },
      base,
    );
  } finally {
    try {
      rmdirSync(base);
    } catch {
      // other tests' files are still there
    }
  }
}

function directRoundTrip(fd: number, data: Uint8Array): void {
  const buf = qemu_memalign(4096, 4096);
  buf.fill(0xcc);
  assert.is(runSync(main, thread_pool_preadv, { fd, offset: 8192, iov: [buf] }), 0, 'O_DIRECT preadv');
  assert.equal(Array.from(buf), Array.from(data.subarray(8192, 12_288)));
  buf.set(pattern(4096, 42));
  assert.is(runSync(main, thread_pool_pwritev, { fd, offset: 4096, iov: [buf] }), 0, 'O_DIRECT pwritev');
  const two = [qemu_memalign(4096, 4096), qemu_memalign(4096, 4096)];
  assert.is(runSync(main, thread_pool_preadv, { fd, offset: 0, iov: two }), 0, 'O_DIRECT preadv, two iovecs');
  assert.equal(Array.from(two[1] as Uint8Array), Array.from(pattern(4096, 42)));
  assert.equal(Array.from(two[0] as Uint8Array), Array.from(data.subarray(0, 4096)));
  qemu_vfree(buf);
  for (const v of two) qemu_vfree(v);
}

test('DESIGN: O_DIRECT preadv/pwritev into qemu_memalign(4096, 4096) succeed in place (no phase probe has run)', () => {
  withDirectFile(directRoundTrip);
});

test('DESIGN: after the phase probe (the file driver runs it on its first cache.direct=on open), O_DIRECT through the pool succeeds', () => {
  withDirectFile((fd, data) => {
    assert.ok(guestMemoryProbePhase(fd) >= 1, 'slabs probed');
    directRoundTrip(fd, data);
  });
});

// --- Whole programs (child processes): exit, worker death, OOM, cwd ---

function runChild(args: string[], opts: { cwd?: string; tsx?: boolean; timeoutMs?: number } = {}): Promise<ChildResult> {
  const argv = opts.tsx === false ? args : ['--import', 'tsx', ...args];
  return runNode(argv, { cwd: opts.cwd, timeoutMs: opts.timeoutMs ?? 9000 });
}
const CHILD = 'test/aio/fixtures/pool-child.ts';
const lines = (s: string) => s.split('\n').filter((l) => l !== '');

test('DESIGN host-loop: a program whose pool is idle exits by itself, even with min 2 workers kept (workers never keep Node alive)', async () => {
  const r = await runChild([CHILD, 'idle-exit']);
  assert.is(r.signal, null, `killed (still alive after 9 s): ${r.stdout} ${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'cb in main done 1\ncb in main done 2\ncb in main done 3\nexit 0 count 3 rets 0,1,2 workers>=2 true\n');
});

test('DESIGN host-loop: an outstanding request (with or without callback) keeps Node alive until it completes', async () => {
  const r = await runChild([CHILD, 'outstanding']);
  assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, 'done 7 after>=300ms true\nexit 0 fire-and-forget finished true live 0\n');
});

test('DESIGN worker death: a function that ends its worker completes with -EIO, one line on stderr each time, and the pool goes on', async () => {
  const r = await runChild([CHILD, 'death']);
  assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, `exitWorker ret ${-EIO}\ninc ret 0 count 1\nexitWorker ret ${-EIO}\ninc ret 1 count 2\n`);
  const errs = lines(r.stderr);
  assert.is(errs.length, 2, r.stderr);
  for (const l of errs) {
    assert.match(l, /^aioco: thread pool worker \d+ exited while running a request, which completes with -EIO; it will be replaced$/);
  }
});

test('DESIGN worker death: a worker out of memory while main blocks in AIO_WAIT_WHILE completes with -EIO (watchdog); the pool goes on', async () => {
  const r = await runChild([CHILD, 'oom'], { timeoutMs: 20_000 });
  assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, `allocForever ret ${-EIO}\ninc ret 0 count 1\n`);
  const errs = lines(r.stderr);
  assert.is(errs.length, 1, r.stderr);
  assert.match(errs[0] as string, /^aioco: thread pool worker \d+ (died|exited) while running a request, which completes with -EIO; it will be replaced$/);
});

test('thread_pool_func: a throwing function is reported once on stderr (with its stack); a non-number result once per request', async () => {
  const r = await runChild([CHILD, 'throw']);
  assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(
    r.stdout,
    `throws ret ${-EIO}\nthrows ret ${-EIO}\necho 'x' ret ${-EINVAL}\necho NaN ret ${-EINVAL}\ninc ret 0 workers 1\n`,
  );
  const errs = lines(r.stderr);
  assert.is(
    errs.filter((l) => l === "aioco: thread pool function 'throws' threw (it completes with -EIO): Error: pool-funcs: thrown on purpose").length,
    1,
    r.stderr,
  );
  assert.ok(errs.some((l) => /^\s+at throws \(.*pool-funcs\.mjs:\d+:\d+\)$/.test(l)), 'the stack names the function');
  assert.equal(
    errs.filter((l) => l.includes('not a number')),
    [
      "aioco: thread pool function 'echo' returned x, not a number; it completes with -EINVAL",
      "aioco: thread pool function 'echo' returned NaN, not a number; it completes with -EINVAL",
    ],
  );
});

test('DESIGN: the workers grow on demand up to max: with 6 idle workers, 8 requests that wait for each other all run at once under max 8', async () => {
  // Three fresh programs: the shortfall depends on how fast idle workers wake.
  for (let run = 1; run <= 3; run++) {
    const r = await runChild([CHILD, 'grow']);
    assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout, 'warm-up: 6 running at once, workers 6\nmax 8: 8 running at once\n', `run ${run}`);
  }
});

for (const when of ['cold', 'warm']) {
  test(`thread_pool_submit_aio: an arg that cannot be cloned fails that submit only, leaving nothing behind (${when} pool)`, async () => {
    const r = await runChild([CHILD, 'clone', when]);
    assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
    assert.is(r.code, 0, r.stderr);
    const out = lines(r.stdout);
    // Either submit throws the clone error and leaves no request behind, or it accepts the
    // request and completes it (once) with an error; in both cases the pool goes on.
    if (out[0] === 'submit threw DataCloneError') {
      assert.equal(out, ['submit threw DataCloneError', 'live +0 called 0', 'next request 5 live +0 called 0']);
    } else {
      assert.equal(out, ['submit returned', 'live +1 called 0', 'next request 5 live +0 called 1']);
    }
  });
}

test('thread_pool_func: a TypeScript function works from a program started elsewhere (cwd /tmp, no --import, package by absolute path)', async () => {
  const r = await runChild([join(root, 'test/aio/fixtures/pool-cwd.mjs')], { cwd: tmpdir(), tsx: false });
  assert.is(r.signal, null, `killed: ${r.stdout} ${r.stderr}`);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, `mul 42 shared 42 cwd ${tmpdir()}\n`);
  assert.is(r.stderr, '');
});

// --- Last: a context that refused to finalize keeps a working pool ---

test('DESIGN: a finalize refused by a later check (armed timer) leaves the context and its pool working', () => {
  const ctx = aio_context_new();
  const p = aio_get_thread_pool(ctx);
  assert.is(runSync(ctx, echo, { value: 1 }), 1);
  const ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_MS, () => {});
  timer_mod(ts, 1e12);
  assert.throws(() => aio_context_unref(ctx), (e: unknown) => e instanceof QemuError && e.message.startsWith('aio_ctx_finalize: timer'));
  timer_del(ts);
  let ret = NOT_YET;
  thread_pool_submit_aio(p, echo, { value: 2 }, (_o, r) => (ret = r));
  // Bounded (not AIO_WAIT_WHILE): if the pool were broken, its request would never end.
  const end = Date.now() + 3000;
  while (ret === NOT_YET && Date.now() < end) {
    aio_poll(ctx, false);
    Atomics.wait(pause, 0, 0, 2);
  }
  assert.is(ret, 2, "the pool's callback ran");
  if (ret === 2) aio_context_unref(ctx);
});

test.run();
