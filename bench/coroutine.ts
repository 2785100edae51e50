/**
 * Coroutine benchmarks: QEMU's /perf/* scenarios of tests/unit/test-coroutine.c
 * (lifecycle, nesting, yield, cost), and the references they are judged against, all
 * measured in the same process: a raw generator round trip, async/await, effection,
 * setImmediate and queueMicrotask.
 *
 * Every coroutine entry and every generator here is a module-level function: a
 * `function*` closure created per iteration costs microseconds per call (DESIGN.md) and
 * would measure V8's closure set-up, not aioco.
 */
import { action, run, spawn, type Operation } from 'effection';
import {
  CoroutineError,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_yield,
  type Coroutine,
  type CoroutineFn,
} from '../src/index.ts';
import type { BenchCase } from './harness.ts';

function fail(what: string): never {
  throw new Error(`bench: ${what}`);
}

/** Checks that `co` has ended: entering it again must throw "... has already terminated". */
function assertTerminated(co: Coroutine, what: string): void {
  try {
    qemu_coroutine_enter(co);
  } catch (e) {
    if (e instanceof CoroutineError && e.message.endsWith('has already terminated')) return;
    throw e;
  }
  fail(`${what}: the coroutine had not terminated`);
}

// ---------------------------------------------------------------------------------------
// References: plain JavaScript

function* rawGenerator(): Generator<number, void, unknown> {
  for (;;) yield 0;
}

/**
 * One `gen.next()` round trip into a suspended generator and back: the base unit. Like
 * qemu_aio_coroutine_enter, the loop looks at the result's `done`.
 */
function benchRawNext(n: number): void {
  const g = rawGenerator();
  let count = 0;
  for (let i = 0; i < n; i++) if (!g.next().done) count++;
  if (count !== n) fail('raw generator: it ended');
}

/** `await` of an already resolved promise: one trip through the microtask queue. */
async function benchAwaitResolved(n: number): Promise<void> {
  const p = Promise.resolve(1);
  let sum = 0;
  for (let i = 0; i < n; i++) sum += await p;
  if (sum !== n) fail('await: wrong sum');
}

/** An async function that suspends once on `p` and then ends. */
async function asyncCostFunc(p: Promise<void>): Promise<void> {
  await p;
}

/**
 * The async/await counterpart of perf_cost: call an async function (create + enter), it
 * suspends on a pending promise (yield), resolve that promise (enter again), wait for the
 * function's promise (end).
 */
async function benchAsyncCost(n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    let resolve!: () => void;
    const p = new Promise<void>((r) => {
      resolve = r;
    });
    const done = asyncCostFunc(p);
    resolve();
    await done;
  }
}

/** A chain of n setImmediate callbacks. */
function benchSetImmediate(n: number): Promise<void> {
  return new Promise<void>((resolve) => {
    let i = n;
    const step = () => {
      if (--i > 0) setImmediate(step);
      else resolve();
    };
    setImmediate(step);
  });
}

/** A chain of n queueMicrotask callbacks. */
function benchQueueMicrotask(n: number): Promise<void> {
  return new Promise<void>((resolve) => {
    let i = n;
    const step = () => {
      if (--i > 0) queueMicrotask(step);
      else resolve();
    };
    queueMicrotask(step);
  });
}

// effection 4

let effChildren = 0;
function* effChild(): Operation<void> {
  effChildren++;
}
function* effSpawnJoin(): Operation<void> {
  const task = yield* spawn(effChild);
  yield* task;
}

/** `run` of an operation that spawns a child and joins it. */
async function benchEffectionRunSpawnJoin(n: number): Promise<void> {
  effChildren = 0;
  for (let i = 0; i < n; i++) await run(effSpawnJoin);
  if (effChildren !== n) fail('effection: children did not all run');
}

function noop(): void {}
function resolveAtOnce(resolve: (v: number) => void): () => void {
  resolve(1);
  return noop;
}
function* effActions(n: number): Operation<number> {
  let sum = 0;
  for (let i = 0; i < n; i++) sum += yield* action(resolveAtOnce);
  return sum;
}

/** `yield* action(...)` resolved synchronously by its executor, inside one `run`. */
async function benchEffectionAction(n: number): Promise<void> {
  const sum = await run(() => effActions(n));
  if (sum !== n) fail('effection action: wrong sum');
}

// ---------------------------------------------------------------------------------------
// QEMU's /perf/* scenarios

function* emptyCoroutine(_opaque: null): CoroutineFn<void> {
  // Nothing: perf_lifecycle measures create + enter to completion.
}

/** perf_lifecycle: create a coroutine and enter it; it ends at once. */
function benchLifecycle(n: number): void {
  let co: Coroutine | null = null;
  for (let i = 0; i < n; i++) {
    co = qemu_coroutine_create(emptyCoroutine, null);
    qemu_coroutine_enter(co);
  }
  if (co !== null) assertTerminated(co, 'lifecycle');
}

interface NestData {
  n_enter: number;
  n_return: number;
  max: number;
}

function* nest(nd: NestData): CoroutineFn<void> {
  nd.n_enter++;
  if (nd.n_enter < nd.max) qemu_coroutine_enter(qemu_coroutine_create(nest, nd));
  nd.n_return++;
}

export const NEST_DEPTH = 1000;

/** perf_nesting: n counts nested coroutines; each cycle nests NEST_DEPTH deep. */
function benchNesting(n: number): void {
  const cycles = Math.max(1, Math.round(n / NEST_DEPTH));
  for (let i = 0; i < cycles; i++) {
    const nd: NestData = { n_enter: 0, n_return: 0, max: NEST_DEPTH };
    qemu_coroutine_enter(qemu_coroutine_create(nest, nd));
    if (nd.n_enter !== NEST_DEPTH || nd.n_return !== NEST_DEPTH) fail('nesting: wrong depth');
  }
}

interface Counter {
  n: number;
}

function* yieldLoop(c: Counter): CoroutineFn<void> {
  while (c.n > 0) {
    c.n--;
    yield* qemu_coroutine_yield();
  }
}

/** perf_yield: enter a coroutine that decrements a counter and yields, n times. */
function benchYield(n: number): void {
  const c: Counter = { n };
  const co = qemu_coroutine_create(yieldLoop, c);
  let enters = 0;
  while (c.n > 0) {
    qemu_coroutine_enter(co);
    enters++;
  }
  if (enters !== n) fail('yield: wrong number of entries');
}

function* costFunc(_opaque: null): CoroutineFn<void> {
  yield* qemu_coroutine_yield();
}

/** perf_cost: create, enter (it yields), enter again (it ends). */
function benchCost(n: number): void {
  let co: Coroutine | null = null;
  for (let i = 0; i < n; i++) {
    co = qemu_coroutine_create(costFunc, null);
    qemu_coroutine_enter(co);
    qemu_coroutine_enter(co);
  }
  if (co !== null) assertTerminated(co, 'cost');
}

/** The cases, ids used by bench/index.ts. `n` is ops per timed run. */
export function coroutineCases(): BenchCase[] {
  return [
    { id: 'gen.next', label: 'raw gen.next() round trip', n: 2_000_000, run: benchRawNext },
    { id: 'await', label: 'await of a resolved promise', n: 500_000, run: benchAwaitResolved },
    { id: 'async.cost', label: 'async fn: call, await, resolve, end', n: 250_000, run: benchAsyncCost },
    { id: 'queueMicrotask', label: 'queueMicrotask round trip', n: 500_000, run: benchQueueMicrotask },
    { id: 'setImmediate', label: 'setImmediate round trip', n: 50_000, run: benchSetImmediate },
    { id: 'effection.action', label: 'effection action (sync resolve)', n: 25_000, run: benchEffectionAction },
    { id: 'effection.spawn', label: 'effection run + spawn + join', n: 1_000, run: benchEffectionRunSpawnJoin },
    { id: 'co.lifecycle', label: 'lifecycle: create + enter to end', n: 1_000_000, run: benchLifecycle },
    { id: 'co.nesting', label: `nesting (depth ${NEST_DEPTH}), per level`, n: 300_000, run: benchNesting },
    { id: 'co.yield', label: 'enter + yield round trip', n: 2_000_000, run: benchYield },
    { id: 'co.cost', label: 'create+enter+yield+enter+end', n: 500_000, run: benchCost },
  ];
}
