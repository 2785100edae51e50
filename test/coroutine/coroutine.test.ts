/**
 * Behaviour of src/coroutine/coroutine.ts: create / enter / yield, self and entered, the
 * iterative wake-up queue (S55-S64, S69), errors, and the AIOCO_DEBUG backtraces.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { fileURLToPath } from 'node:url';
import {
  AioContext,
  Coroutine,
  CoMutex,
  CoRwlock,
  aio_co_enter,
  aio_co_schedule,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_rwlock_rdlock,
  qemu_co_rwlock_unlock,
  qemu_co_rwlock_wrlock,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_enter_if_inactive,
  qemu_coroutine_entered,
  qemu_coroutine_get_aio_context,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_in_coroutine,
  type CoroutineFn,
  type CoroutineYield,
} from '../../src/index.ts';
import { assertCoError, thrown, throwsCo } from '../helpers/assert.ts';
import { pollUntilIdle } from '../helpers/aio.ts';
import { runNodeSync } from '../helpers/child.ts';

// ---------------------------------------------------------------------------------------
// helpers

const main = qemu_get_aio_context();

// ---------------------------------------------------------------------------------------
// create / enter / yield (S55, S56, S58)

interface Log {
  log: string[];
}

function* recordOpaque(o: { log: string[]; seen?: unknown }): CoroutineFn<void> {
  o.log.push('body');
  o.seen = o;
}

test('S55: qemu_coroutine_create runs nothing; the entry gets opaque; name is kept', () => {
  const o: { log: string[]; seen?: unknown } = { log: [] };
  const co = qemu_coroutine_create(recordOpaque, o, 'named');
  assert.instance(co, Coroutine);
  assert.is(co.name, 'named');
  assert.equal(o.log, []);
  assert.is(qemu_coroutine_entered(co), false);
  qemu_coroutine_enter(co);
  assert.equal(o.log, ['body']);
  assert.is(o.seen, o);
  const unnamed = qemu_coroutine_create(recordOpaque, o);
  assert.is(unnamed.name, undefined);
});

function* setDone(d: { done: boolean }): CoroutineFn<void> {
  d.done = true;
}

test('S56 /basic/lifecycle: enter runs the coroutine synchronously to its end, twice in a row', () => {
  for (let round = 0; round < 2; round++) {
    const d = { done: false };
    const co = qemu_coroutine_create(setDone, d);
    qemu_coroutine_enter(co);
    assert.is(d.done, true);
  }
});

function* yieldFiveTimes(d: { done: boolean; resumed: number }): CoroutineFn<void> {
  for (let i = 0; i < 5; i++) {
    yield* qemu_coroutine_yield();
    d.resumed++;
  }
  d.done = true;
}

test('S58 /basic/yield: a coroutine that yields 5 times needs 6 enters; yield returns only on re-entry', () => {
  const d = { done: false, resumed: 0 };
  const co = qemu_coroutine_create(yieldFiveTimes, d);
  let enters = 0;
  while (!d.done && enters < 100) {
    assert.is(d.resumed, enters === 0 ? 0 : enters - 1);
    qemu_coroutine_enter(co);
    enters++;
  }
  assert.is(enters, 6);
  assert.is(d.resumed, 5);
});

function* orderBody(o: Log): CoroutineFn<void> {
  o.log.push('co:1');
  assert.ok(qemu_in_coroutine());
  yield* qemu_coroutine_yield();
  o.log.push('co:2');
  assert.ok(qemu_in_coroutine());
}

test('S56/S58 /basic/order: control alternates exactly between caller and coroutine', () => {
  const o: Log = { log: [] };
  const co = qemu_coroutine_create(orderBody, o);
  o.log.push('main:1');
  qemu_coroutine_enter(co);
  o.log.push('main:2');
  assert.is(qemu_in_coroutine(), false);
  qemu_coroutine_enter(co);
  o.log.push('main:3');
  assert.is(qemu_in_coroutine(), false);
  assert.equal(o.log, ['main:1', 'co:1', 'main:2', 'co:2', 'main:3']);
});

// ---------------------------------------------------------------------------------------
// self, in_coroutine, entered, enter_if_inactive (S59, S60)

function* recordSelf(o: { self?: Coroutine; inCo?: boolean }): CoroutineFn<void> {
  o.self = qemu_coroutine_self();
  o.inCo = qemu_in_coroutine();
}

test('S59 /basic/self, /basic/in_coroutine: self is the running coroutine; outside, the same leader every time', () => {
  const o: { self?: Coroutine; inCo?: boolean } = {};
  const co = qemu_coroutine_create(recordSelf, o);
  assert.is(qemu_in_coroutine(), false);
  const leader = qemu_coroutine_self();
  assert.instance(leader, Coroutine);
  assert.is(qemu_coroutine_self(), leader);
  qemu_coroutine_enter(co);
  assert.is(o.self, co);
  assert.is(o.inCo, true);
  assert.is.not(o.self, leader);
  assert.is(qemu_coroutine_self(), leader);
  assert.is(qemu_in_coroutine(), false);
  // The leader is never "entered" (S60: caller is null).
  assert.is(qemu_coroutine_entered(leader), false);
});

interface EnteredData {
  caller: Coroutine;
  checks: boolean[];
}

function* enteredStep2(d: EnteredData): CoroutineFn<void> {
  d.checks.push(qemu_coroutine_entered(d.caller), qemu_coroutine_entered(qemu_coroutine_self()));
  yield* qemu_coroutine_yield();
  d.checks.push(qemu_coroutine_entered(d.caller), qemu_coroutine_entered(qemu_coroutine_self()));
}

function* enteredStep1(out: { checks: boolean[]; child?: Coroutine }): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  out.checks.push(qemu_coroutine_entered(self));
  const d: EnteredData = { caller: self, checks: out.checks };
  const child = qemu_coroutine_create(enteredStep2, d);
  out.child = child;
  out.checks.push(qemu_coroutine_entered(child));
  qemu_coroutine_enter(child);
  out.checks.push(qemu_coroutine_entered(child));
  qemu_coroutine_enter(child);
}

test('S60 /basic/entered: true while running or while nested deeper; false before, after a yield, after the end', () => {
  const out: { checks: boolean[]; child?: Coroutine } = { checks: [] };
  const co = qemu_coroutine_create(enteredStep1, out);
  assert.is(qemu_coroutine_entered(co), false);
  qemu_coroutine_enter(co);
  assert.equal(out.checks, [
    true, // step1 sees itself entered
    false, // the child before its first entry
    true, true, // inside the child: its enterer (nested) and itself
    false, // the child after it yielded
    true, true, // inside the child after re-entry
  ]);
  assert.is(qemu_coroutine_entered(co), false);
  assert.is(qemu_coroutine_entered(out.child as Coroutine), false);
});

function* ifInactiveChild(o: { parent: Coroutine; log: string[] }): CoroutineFn<void> {
  // The parent is entered (it is waiting in its qemu_coroutine_enter of us): no-op.
  qemu_coroutine_enter_if_inactive(o.parent);
  // So are we: no-op, not a "re-entered recursively" error.
  qemu_coroutine_enter_if_inactive(qemu_coroutine_self());
  o.log.push('child');
}

function* ifInactiveParent(o: { parent?: Coroutine; log: string[] }): CoroutineFn<void> {
  o.log.push('parent:start');
  const child = qemu_coroutine_create(ifInactiveChild, { parent: qemu_coroutine_self(), log: o.log });
  qemu_coroutine_enter(child);
  o.log.push('parent:yield');
  yield* qemu_coroutine_yield();
  o.log.push('parent:end');
}

test('S60: qemu_coroutine_enter_if_inactive enters only a coroutine that is not entered', () => {
  const o: { log: string[] } = { log: [] };
  const co = qemu_coroutine_create(ifInactiveParent, o);
  qemu_coroutine_enter_if_inactive(co); // first entry
  assert.equal(o.log, ['parent:start', 'child', 'parent:yield']);
  qemu_coroutine_enter_if_inactive(co); // yielded: inactive, so entered
  assert.equal(o.log, ['parent:start', 'child', 'parent:yield', 'parent:end']);
});

// ---------------------------------------------------------------------------------------
// nesting (S61)

function* nestedChild(o: Log): CoroutineFn<void> {
  o.log.push('child:1');
  yield* qemu_coroutine_yield();
  o.log.push('child:2');
}

function* nestedParent(o: Log): CoroutineFn<void> {
  const child = qemu_coroutine_create(nestedChild, o);
  o.log.push('parent:1');
  qemu_coroutine_enter(child);
  o.log.push('parent:2');
  qemu_coroutine_enter(child);
  o.log.push('parent:3');
}

test("S61: a nested coroutine's yield returns to the coroutine that entered it, not to the top", () => {
  const o: Log = { log: [] };
  qemu_coroutine_enter(qemu_coroutine_create(nestedParent, o));
  assert.equal(o.log, ['parent:1', 'child:1', 'parent:2', 'child:2', 'parent:3']);
});

interface NestData {
  n_enter: number;
  n_return: number;
  max: number;
  maxDepthSeen: number;
  depth: number;
}

function* nest(nd: NestData): CoroutineFn<void> {
  nd.n_enter++;
  nd.depth++;
  if (nd.depth > nd.maxDepthSeen) nd.maxDepthSeen = nd.depth;
  if (nd.n_enter < nd.max) qemu_coroutine_enter(qemu_coroutine_create(nest, nd));
  nd.depth--;
  nd.n_return++;
}

function runNest(max: number): NestData {
  const nd: NestData = { n_enter: 0, n_return: 0, max, maxDepthSeen: 0, depth: 0 };
  qemu_coroutine_enter(qemu_coroutine_create(nest, nd));
  return nd;
}

test('S61 /basic/nesting: 128 levels of nested enters all enter and return', () => {
  const nd = runNest(128);
  assert.is(nd.n_enter, 128);
  assert.is(nd.n_return, 128);
  assert.is(nd.maxDepthSeen, 128);
  assert.is(qemu_in_coroutine(), false);
});

test('S61 /perf/nesting: depth 1000, repeated, all enter and return', () => {
  for (let cycle = 0; cycle < 20; cycle++) {
    const nd = runNest(1000);
    assert.is(nd.n_enter, 1000);
    assert.is(nd.n_return, 1000);
    assert.is(nd.maxDepthSeen, 1000);
  }
  assert.is(qemu_coroutine_self(), qemu_coroutine_self());
  assert.is(qemu_in_coroutine(), false);
});

// ---------------------------------------------------------------------------------------
// contexts (S64, S101)

function* recordContexts(o: { inside: AioContext[]; child?: Coroutine }): CoroutineFn<void> {
  o.inside.push(qemu_get_current_aio_context());
  const child = qemu_coroutine_create(recordChildContext, o);
  o.child = child;
  qemu_coroutine_enter(child);
  yield* qemu_coroutine_yield();
  o.inside.push(qemu_get_current_aio_context());
}

function* recordChildContext(o: { inside: AioContext[] }): CoroutineFn<void> {
  o.inside.push(qemu_get_current_aio_context());
}

test('S64: qemu_coroutine_get_aio_context is null before the first entry, then the context of the last entry', () => {
  const ctx2 = aio_context_new();
  const o: { inside: AioContext[]; child?: Coroutine } = { inside: [] };
  const co = qemu_coroutine_create(recordContexts, o);
  assert.is(qemu_coroutine_get_aio_context(co), null);
  qemu_aio_coroutine_enter(ctx2, co);
  assert.is(qemu_coroutine_get_aio_context(co), ctx2);
  // Inside, the current context is ctx2; a nested qemu_coroutine_enter uses it too.
  assert.is(o.inside[0], ctx2);
  assert.is(o.inside[1], ctx2);
  assert.is(qemu_coroutine_get_aio_context(o.child as Coroutine), ctx2);
  // Back at top level, the current context is main again.
  assert.is(qemu_get_current_aio_context(), main);
  // Entered again from top level by qemu_coroutine_enter: the main context.
  qemu_coroutine_enter(co);
  assert.is(o.inside[2], main);
  assert.is(qemu_coroutine_get_aio_context(co), main);
  assert.is(o.inside.length, 3);
  aio_context_unref(ctx2);
});

function* enterChildElsewhere(o: { ctx2: AioContext; seen: AioContext[]; child?: Coroutine }): CoroutineFn<void> {
  o.seen.push(qemu_get_current_aio_context());
  o.child = qemu_coroutine_create(recordChildContextInto, o);
  qemu_aio_coroutine_enter(o.ctx2, o.child);
  o.seen.push(qemu_get_current_aio_context());
}

function* recordChildContextInto(o: { seen: AioContext[] }): CoroutineFn<void> {
  o.seen.push(qemu_get_current_aio_context());
}

test('S64/S101: a coroutine entered in another context from inside a coroutine runs there; the enterer keeps its own', () => {
  const ctx2 = aio_context_new();
  const o: { ctx2: AioContext; seen: AioContext[]; child?: Coroutine } = { ctx2, seen: [] };
  const co = qemu_coroutine_create(enterChildElsewhere, o);
  qemu_coroutine_enter(co);
  assert.is(o.seen.length, 3);
  assert.is(o.seen[0], main);
  assert.is(o.seen[1], ctx2);
  assert.is(o.seen[2], main);
  assert.is(qemu_coroutine_get_aio_context(co), main);
  assert.is(qemu_coroutine_get_aio_context(o.child as Coroutine), ctx2);
  aio_context_unref(ctx2);
});

// ---------------------------------------------------------------------------------------
// the wake-up queue (S57, S69b)

interface WakeTree {
  log: string[];
  /** name -> the coroutine */
  cos: Map<string, Coroutine>;
  /** name -> names it wakes with aio_co_enter before yielding */
  wakes: Map<string, string[]>;
  /** name -> coroutines whose entered() state it records */
  probes: Map<string, string[]>;
}

function* wakeNode(t: WakeTree): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  const name = self.name as string;
  t.log.push(`${name}:run`);
  for (const p of t.probes.get(name) ?? []) {
    t.log.push(`${name}:entered(${p})=${qemu_coroutine_entered(t.cos.get(p) as Coroutine)}`);
  }
  for (const w of t.wakes.get(name) ?? []) {
    aio_co_enter(qemu_get_current_aio_context(), t.cos.get(w) as Coroutine);
    t.log.push(`${name}:woke-${w}`);
  }
  yield* qemu_coroutine_yield();
  t.log.push(`${name}:resumed`);
}

function makeTree(names: string[], wakes: Record<string, string[]>, probes: Record<string, string[]> = {}): WakeTree {
  const t: WakeTree = { log: [], cos: new Map(), wakes: new Map(Object.entries(wakes)), probes: new Map(Object.entries(probes)) };
  for (const n of names) t.cos.set(n, qemu_coroutine_create(wakeNode, t, n));
  return t;
}

test('S57/S69b: coroutines woken inside a coroutine run after it yields, depth-first, FIFO among siblings', () => {
  // A wakes B then C; B wakes D then E; D wakes F. Depth-first: A B D F E C.
  const t = makeTree(['A', 'B', 'C', 'D', 'E', 'F'], { A: ['B', 'C'], B: ['D', 'E'], D: ['F'] }, { B: ['A'] });
  qemu_coroutine_enter(t.cos.get('A') as Coroutine);
  t.log.push('top:returned');
  assert.equal(t.log, [
    'A:run',
    'A:woke-B', // B does not run at aio_co_enter ...
    'A:woke-C',
    'B:run', // ... but once A has yielded
    'B:entered(A)=false', // B was entered by the loop, not by A
    'B:woke-D',
    'B:woke-E',
    'D:run',
    'D:woke-F',
    'F:run',
    'E:run',
    'C:run',
    'top:returned',
  ]);
  // Every one of them yielded and none resumed: their yields went back to the loop.
  for (const n of ['A', 'B', 'C', 'D', 'E', 'F']) assert.is(qemu_coroutine_entered(t.cos.get(n) as Coroutine), false);
  qemu_coroutine_enter(t.cos.get('C') as Coroutine);
  assert.is(t.log[t.log.length - 1], 'C:resumed');
});

function* wakeThenReturn(o: { other: Coroutine; log: string[] }): CoroutineFn<void> {
  aio_co_enter(qemu_get_current_aio_context(), o.other);
  o.log.push('waker:ends');
}

function* logAndEnd(o: Log): CoroutineFn<void> {
  o.log.push('woken:run');
}

test('S57/S69b: a coroutine woken by one that terminates runs when the waker ends, before enter returns', () => {
  const log: string[] = [];
  const o = { log, other: qemu_coroutine_create(logAndEnd, { log }) };
  qemu_coroutine_enter(qemu_coroutine_create(wakeThenReturn, o));
  o.log.push('top');
  assert.equal(o.log, ['waker:ends', 'woken:run', 'top']);
});

interface NestedWaker {
  log: string[];
  parent?: Coroutine;
  mid?: Coroutine;
  leaf?: Coroutine;
}

function* nwLeaf(o: NestedWaker): CoroutineFn<void> {
  o.log.push(`leaf:entered(parent)=${qemu_coroutine_entered(o.parent as Coroutine)}`);
  o.log.push(`leaf:entered(mid)=${qemu_coroutine_entered(o.mid as Coroutine)}`);
  yield* qemu_coroutine_yield();
}

function* nwMid(o: NestedWaker): CoroutineFn<void> {
  aio_co_enter(qemu_get_current_aio_context(), o.leaf as Coroutine);
  o.log.push('mid:yield');
  yield* qemu_coroutine_yield();
}

function* nwParent(o: NestedWaker): CoroutineFn<void> {
  o.mid = qemu_coroutine_create(nwMid, o);
  o.leaf = qemu_coroutine_create(nwLeaf, o);
  qemu_coroutine_enter(o.mid);
  o.log.push('parent:enter-returned');
}

test("S57: the wake-up loop belongs to the enter call: queued coroutines run with the enterer as caller, before it returns", () => {
  const o: NestedWaker = { log: [] };
  o.parent = qemu_coroutine_create(nwParent, o);
  qemu_coroutine_enter(o.parent);
  assert.equal(o.log, [
    'mid:yield',
    'leaf:entered(parent)=true', // the nested enter in parent is still on the stack
    'leaf:entered(mid)=false', // mid yielded: it is not the caller
    'parent:enter-returned',
  ]);
});

// ---------------------------------------------------------------------------------------
// queue chaining (S69): /aio/coroutine/queue-chaining

interface ChainData {
  other: Coroutine | null;
  i: number;
  max: number;
  depthFirst: number;
  depthLast: number;
}

function stackDepth(): number {
  return (new Error().stack ?? '').split('\n').length;
}

function* chain(d: ChainData): CoroutineFn<void> {
  for (d.i = 0; d.i < d.max; d.i++) {
    if (d.i === 1) d.depthFirst = stackDepth();
    if (d.i === d.max - 1) d.depthLast = stackDepth();
    aio_co_enter(qemu_get_aio_context(), d.other as Coroutine);
    yield* qemu_coroutine_yield();
  }
}

test('S57/S69 /aio/coroutine/queue-chaining: 25,000 mutual aio_co_enter hops, exact counts, flat JS stack', () => {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = Infinity;
  try {
    const a: ChainData = { other: null, i: -1, max: 25000, depthFirst: 0, depthLast: 0 };
    const b: ChainData = { other: null, i: -1, max: 25000, depthFirst: 0, depthLast: 0 };
    b.other = qemu_coroutine_create(chain, a);
    a.other = qemu_coroutine_create(chain, b);
    qemu_coroutine_enter(b.other);
    assert.is(a.i, a.max);
    assert.is(b.i, b.max - 1);
    // Let the second coroutine end.
    qemu_coroutine_enter(a.other);
    assert.is(b.i, b.max);
    // The stack at the last hop is as deep as at the second: the loop is iterative.
    assert.ok(a.depthFirst > 0);
    assert.is(a.depthLast, a.depthFirst);
    assert.is(b.depthLast, b.depthFirst);
  } finally {
    Error.stackTraceLimit = limit;
  }
});

// ---------------------------------------------------------------------------------------
// errors the contract pins down (API.md "Rules the contract pins down", S56, S58, S62)

function* yieldFromPlainHelper(): CoroutineFn<void> {
  yield* qemu_coroutine_yield();
}

test('S58: qemu_coroutine_yield outside a coroutine throws "Co-routine is yielding to no one"', () => {
  throwsCo(() => {
    qemu_coroutine_yield().next();
  }, 'Co-routine is yielding to no one');
  // Through a coroutine_fn driven from plain code: at the call or its first resumption.
  throwsCo(() => {
    const g = yieldFromPlainHelper();
    g.next();
    g.next();
  }, 'Co-routine is yielding to no one');
  assert.is(qemu_in_coroutine(), false);
});

function* selfEnter(o: { errors: unknown[]; log: string[] }): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  o.errors.push(thrown(() => qemu_coroutine_enter(self)));
  o.errors.push(thrown(() => qemu_aio_coroutine_enter(qemu_get_aio_context(), self)));
  o.errors.push(thrown(() => aio_co_enter(qemu_get_current_aio_context(), self)));
  o.log.push('still running');
  yield* qemu_coroutine_yield();
  o.log.push('resumed');
}

test('S56: entering the running coroutine throws "Co-routine re-entered recursively" and the coroutine goes on', () => {
  const o = { errors: [] as unknown[], log: [] as string[] };
  const co = qemu_coroutine_create(selfEnter, o);
  qemu_coroutine_enter(co);
  assert.is(o.errors.length, 3);
  for (const e of o.errors) assertCoError(e, 'Co-routine re-entered recursively');
  assert.equal(o.log, ['still running']);
  qemu_coroutine_enter(co);
  assert.equal(o.log, ['still running', 'resumed']);
});

function* enterParent(o: { parent: Coroutine; error?: unknown }): CoroutineFn<void> {
  o.error = thrown(() => qemu_coroutine_enter(o.parent));
}

function* enterChildThatEntersUs(o: { error?: unknown; done?: boolean }): CoroutineFn<void> {
  const d = { parent: qemu_coroutine_self(), error: undefined as unknown };
  qemu_coroutine_enter(qemu_coroutine_create(enterParent, d));
  o.error = d.error;
  o.done = true;
}

test('S56: a child entering the coroutine that entered it throws "Co-routine re-entered recursively"', () => {
  const o: { error?: unknown; done?: boolean } = {};
  qemu_coroutine_enter(qemu_coroutine_create(enterChildThatEntersUs, o));
  assertCoError(o.error, 'Co-routine re-entered recursively');
  assert.is(o.done, true);
});

function* yieldOnce(o: { runs: number }): CoroutineFn<void> {
  o.runs++;
  yield* qemu_coroutine_yield();
  o.runs++;
}

test("S56/S65: entering a coroutine scheduled by aio_co_schedule throws; scheduling it twice throws", () => {
  const o = { runs: 0 };
  const co = qemu_coroutine_create(yieldOnce, o);
  qemu_coroutine_enter(co);
  aio_co_schedule(main, co);
  throwsCo(() => qemu_coroutine_enter(co), "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'");
  throwsCo(() => qemu_aio_coroutine_enter(main, co), "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'");
  throwsCo(() => qemu_coroutine_enter_if_inactive(co), "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'");
  throwsCo(() => aio_co_schedule(main, co), "aio_co_schedule: Co-routine was already scheduled in 'aio_co_schedule'");
  assert.is(o.runs, 1);
  // The failed attempts did not disturb the schedule: the BH round enters it once.
  assert.is(aio_poll(main, false), true);
  assert.is(o.runs, 2);
  assert.is(aio_poll(main, false), false);
});

test('S62: entering a terminated coroutine throws a CoroutineError and does not run the body again', () => {
  const o = { runs: 0 };
  const named = qemu_coroutine_create(yieldOnce, o, 'worker');
  qemu_coroutine_enter(named);
  qemu_coroutine_enter(named);
  assert.is(o.runs, 2);
  throwsCo(() => qemu_coroutine_enter(named), "qemu_aio_coroutine_enter: Co-routine 'worker' has already terminated");
  throwsCo(() => qemu_coroutine_enter_if_inactive(named), "qemu_aio_coroutine_enter: Co-routine 'worker' has already terminated");
  const unnamed = qemu_coroutine_create(setDone, { done: false });
  qemu_coroutine_enter(unnamed);
  throwsCo(() => qemu_coroutine_enter(unnamed), 'qemu_aio_coroutine_enter: Co-routine has already terminated');
  assert.is(o.runs, 2);
  assert.is(qemu_coroutine_entered(named), false);
});

test('S59: the leader pseudo-coroutine cannot be entered', () => {
  throwsCo(() => qemu_coroutine_enter(qemu_coroutine_self()), 'qemu_aio_coroutine_enter: cannot enter the leader pseudo-coroutine');
  assert.is(qemu_in_coroutine(), false);
});

function* bareYield(o: { after: boolean }): CoroutineFn<void> {
  yield 42 as unknown as CoroutineYield;
  o.after = true;
}

test('a bare yield of anything but the token is reported as a CoroutineError', () => {
  const o = { after: false };
  const co = qemu_coroutine_create(bareYield, o, 'bare');
  throwsCo(() => qemu_coroutine_enter(co), "Co-routine 'bare' yielded a value that is not qemu_coroutine_yield()'s token (a bare yield?)");
  assert.is(o.after, false);
  assert.is(qemu_in_coroutine(), false);
  const anon = qemu_coroutine_create(bareYield, { after: false });
  throwsCo(() => qemu_coroutine_enter(anon), "Co-routine yielded a value that is not qemu_coroutine_yield()'s token (a bare yield?)");
});

// ---------------------------------------------------------------------------------------
// ending while holding locks (S57, S79)

function* endHoldingMutex(m: CoMutex): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(m);
}

function* endHoldingRdlock(l: CoRwlock): CoroutineFn<void> {
  yield* qemu_co_rwlock_rdlock(l);
}

function* endHoldingBoth(o: { m: CoMutex; l: CoRwlock }): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(o.m);
  yield* qemu_co_rwlock_wrlock(o.l);
}

function* lockAndRelease(o: { m: CoMutex; l: CoRwlock }): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(o.m);
  yield* qemu_co_rwlock_rdlock(o.l);
  qemu_co_rwlock_unlock(o.l);
  qemu_co_mutex_unlock(o.m);
}

test("S57/S79: a coroutine that ends holding a CoMutex or a CoRwlock makes its enter throw '!to->locks_held'", () => {
  throwsCo(
    () => qemu_coroutine_enter(qemu_coroutine_create(endHoldingMutex, new CoMutex(), 'm-holder')),
    "qemu_aio_coroutine_enter: Assertion '!to->locks_held' failed (co-routine 'm-holder' terminated holding 1 lock(s))",
  );
  throwsCo(
    () => qemu_coroutine_enter(qemu_coroutine_create(endHoldingRdlock, new CoRwlock())),
    "qemu_aio_coroutine_enter: Assertion '!to->locks_held' failed (co-routine terminated holding 1 lock(s))",
  );
  throwsCo(
    () => qemu_coroutine_enter(qemu_coroutine_create(endHoldingBoth, { m: new CoMutex(), l: new CoRwlock() }, 'both')),
    "qemu_aio_coroutine_enter: Assertion '!to->locks_held' failed (co-routine 'both' terminated holding 2 lock(s))",
  );
  // Balanced lock/unlock ends cleanly.
  qemu_coroutine_enter(qemu_coroutine_create(lockAndRelease, { m: new CoMutex(), l: new CoRwlock() }));
  assert.is(qemu_in_coroutine(), false);
});

function* lockWakeAndEnd(o: { m: CoMutex; other: Coroutine }): CoroutineFn<void> {
  yield* qemu_co_mutex_lock(o.m);
  aio_co_enter(qemu_get_current_aio_context(), o.other);
}

function* reportMutexState(o: { m: CoMutex; log: string[] }): CoroutineFn<void> {
  o.log.push(`woken: locked=${o.m.locked}`);
}

test('S57: the locks_held error of a coroutine that ended holding a lock is thrown after its queued coroutines ran', () => {
  const m = new CoMutex();
  const log: string[] = [];
  const other = qemu_coroutine_create(reportMutexState, { m, log });
  throwsCo(
    () => qemu_coroutine_enter(qemu_coroutine_create(lockWakeAndEnd, { m, other }, 'leaky')),
    "qemu_aio_coroutine_enter: Assertion '!to->locks_held' failed (co-routine 'leaky' terminated holding 1 lock(s))",
  );
  assert.equal(log, ['woken: locked=1']);
  assert.is(qemu_in_coroutine(), false);
});

// ---------------------------------------------------------------------------------------
// exceptions escaping a coroutine body (DESIGN.md "Coroutines", "Contexts")

const boom = new Error('boom');

function* throwAfterYield(o: { log: string[] }): CoroutineFn<void> {
  o.log.push('first');
  yield* qemu_coroutine_yield();
  o.log.push('second');
  throw boom;
}

test('an exception escaping a body ends that coroutine and is rethrown from the enter that resumed it', () => {
  const ctx2 = aio_context_new();
  const o = { log: [] as string[] };
  const co = qemu_coroutine_create(throwAfterYield, o, 'thrower');
  qemu_aio_coroutine_enter(ctx2, co);
  assert.equal(o.log, ['first']);
  const e = thrown(() => qemu_aio_coroutine_enter(ctx2, co));
  assert.is(e, boom);
  assert.equal(o.log, ['first', 'second']);
  // State restored: no coroutine running, current context main again.
  assert.is(qemu_in_coroutine(), false);
  assert.is(qemu_get_current_aio_context(), main);
  assert.is(qemu_coroutine_entered(co), false);
  // The coroutine has ended.
  throwsCo(() => qemu_coroutine_enter(co), "qemu_aio_coroutine_enter: Co-routine 'thrower' has already terminated");
  aio_context_unref(ctx2);
});

function* throwNow(e: unknown): CoroutineFn<void> {
  throw e;
}

function* catchChildError(o: { caught?: unknown; after: boolean; inCo?: boolean; self?: boolean }): CoroutineFn<void> {
  const self = qemu_coroutine_self();
  try {
    qemu_coroutine_enter(qemu_coroutine_create(throwNow, boom));
  } catch (e) {
    o.caught = e;
  }
  o.inCo = qemu_in_coroutine();
  o.self = qemu_coroutine_self() === self;
  yield* qemu_coroutine_yield();
  o.after = true;
}

test("an exception from a nested coroutine is thrown into its enterer's qemu_coroutine_enter, which can catch it", () => {
  const o: { caught?: unknown; after: boolean; inCo?: boolean; self?: boolean } = { after: false };
  const co = qemu_coroutine_create(catchChildError, o);
  qemu_coroutine_enter(co);
  assert.is(o.caught, boom);
  assert.is(o.inCo, true);
  assert.is(o.self, true);
  qemu_coroutine_enter(co);
  assert.is(o.after, true);
});

interface ThrowWaker {
  log: string[];
  wake: Coroutine[];
  error: unknown;
}

function* wakeAllThenThrow(o: ThrowWaker): CoroutineFn<void> {
  for (const co of o.wake) aio_co_enter(qemu_get_current_aio_context(), co);
  o.log.push('waker:throws');
  throw o.error;
}

function* logName(o: Log): CoroutineFn<void> {
  o.log.push(`${qemu_coroutine_self().name}:run`);
}

function* logNameThenThrow(o: { log: string[]; error: unknown }): CoroutineFn<void> {
  o.log.push(`${qemu_coroutine_self().name}:throws`);
  throw o.error;
}

test('the wake-up loop enters every pending coroutine before rethrowing the one error', () => {
  const o: ThrowWaker = { log: [], wake: [], error: boom };
  o.wake = [qemu_coroutine_create(logName, o, 'B'), qemu_coroutine_create(logName, o, 'C')];
  const e = thrown(() => qemu_coroutine_enter(qemu_coroutine_create(wakeAllThenThrow, o)));
  assert.is(e, boom);
  assert.equal(o.log, ['waker:throws', 'B:run', 'C:run']);
  assert.is(qemu_in_coroutine(), false);
});

test('several errors in one wake-up loop become an AggregateError, in the order they happened', () => {
  const errB = new Error('B failed');
  const o: ThrowWaker = { log: [], wake: [], error: boom };
  o.wake = [
    qemu_coroutine_create(logNameThenThrow, { log: o.log, error: errB }, 'B'),
    qemu_coroutine_create(logName, o, 'C'),
  ];
  const e = thrown(() => qemu_coroutine_enter(qemu_coroutine_create(wakeAllThenThrow, o)));
  assert.instance(e, AggregateError);
  assert.is((e as AggregateError).message, 'qemu_aio_coroutine_enter: several coroutines failed');
  assert.equal((e as AggregateError).errors, [boom, errB]);
  assert.equal(o.log, ['waker:throws', 'B:throws', 'C:run']);
});

interface ScheduledWaker {
  log: string[];
  queued: Coroutine[];
  scheduled: Coroutine[];
}

function* wakeThenScheduleThenYield(o: ScheduledWaker): CoroutineFn<void> {
  const ctx = qemu_get_current_aio_context();
  for (const co of o.queued) aio_co_enter(ctx, co);
  for (const co of o.scheduled) aio_co_schedule(ctx, co);
  o.log.push('waker:yield');
  yield* qemu_coroutine_yield();
}

function* logRunYieldLog(o: Log): CoroutineFn<void> {
  const name = qemu_coroutine_self().name as string;
  o.log.push(`${name}:run`);
  yield* qemu_coroutine_yield();
  o.log.push(`${name}:resumed`);
}

test('S56/S57: a queued coroutine that was scheduled meanwhile is not entered by the loop; the others are, then it throws', () => {
  // One unenterable coroutine: its error alone.
  const o: ScheduledWaker = { log: [], queued: [], scheduled: [] };
  const b = qemu_coroutine_create(logRunYieldLog, o, 'B');
  const c = qemu_coroutine_create(logRunYieldLog, o, 'C');
  qemu_coroutine_enter(b);
  o.queued = [b, c];
  o.scheduled = [b];
  const e = thrown(() => qemu_coroutine_enter(qemu_coroutine_create(wakeThenScheduleThenYield, o)));
  assertCoError(e, "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'");
  assert.equal(o.log, ['B:run', 'waker:yield', 'C:run']);
  // The schedule still stands: B resumes from the BH round.
  assert.is(aio_poll(main, false), true);
  assert.equal(o.log, ['B:run', 'waker:yield', 'C:run', 'B:resumed']);

  // Two unenterable in a row, then one that can run.
  const p: ScheduledWaker = { log: [], queued: [], scheduled: [] };
  const x = qemu_coroutine_create(logRunYieldLog, p, 'X');
  const y = qemu_coroutine_create(logRunYieldLog, p, 'Y');
  const z = qemu_coroutine_create(logRunYieldLog, p, 'Z');
  qemu_coroutine_enter(x);
  qemu_coroutine_enter(y);
  p.queued = [x, y, z];
  p.scheduled = [x, y];
  const agg = thrown(() => qemu_coroutine_enter(qemu_coroutine_create(wakeThenScheduleThenYield, p)));
  assert.instance(agg, AggregateError);
  const errs = (agg as AggregateError).errors;
  assert.is(errs.length, 2);
  for (const err of errs) assertCoError(err, "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'");
  assert.equal(p.log, ['X:run', 'Y:run', 'waker:yield', 'Z:run']);
  pollUntilIdle(main, 100);
  assert.equal(p.log, ['X:run', 'Y:run', 'waker:yield', 'Z:run', 'X:resumed', 'Y:resumed']);

  // Only unenterable ones queued: the loop ends after skipping them.
  const q: ScheduledWaker = { log: [], queued: [], scheduled: [] };
  const only = qemu_coroutine_create(logRunYieldLog, q, 'O');
  qemu_coroutine_enter(only);
  q.queued = [only];
  q.scheduled = [only];
  const e2 = thrown(() => qemu_coroutine_enter(qemu_coroutine_create(wakeThenScheduleThenYield, q)));
  assertCoError(e2, "qemu_aio_coroutine_enter: Co-routine was already scheduled in 'aio_co_schedule'");
  pollUntilIdle(main, 100);
  assert.equal(q.log, ['O:run', 'waker:yield', 'O:resumed']);
});

// ---------------------------------------------------------------------------------------
// AIOCO_DEBUG=1 backtraces

const fixture = fileURLToPath(new URL('./fixtures/backtrace-fixture.ts', import.meta.url));

interface FixtureOut {
  created: string | null;
  lastYield: string | null;
  beforeYield: string | null;
  keys: string;
}

function runFixture(debug: boolean): FixtureOut {
  const env = { ...process.env };
  delete env.AIOCO_DEBUG;
  if (debug) env.AIOCO_DEBUG = '1';
  const r = runNodeSync(['--import', 'tsx', fixture], { env, timeoutMs: 30_000 });
  assert.is(r.status, 0, `fixture failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop() as string) as FixtureOut;
}

test('AIOCO_DEBUG=1: qemu_coroutine_backtrace gives the creation stack and the last yield stack', () => {
  const bt = runFixture(true);
  assert.type(bt.created, 'string');
  assert.type(bt.lastYield, 'string');
  // Created from createTheWorker, last yielded in secondYieldSite (called from the body).
  assert.ok((bt.created as string).includes('createTheWorker'), bt.created as string);
  assert.not.ok((bt.created as string).includes('secondYieldSite'));
  assert.ok((bt.lastYield as string).includes('secondYieldSite'), bt.lastYield as string);
  assert.ok((bt.lastYield as string).includes('theWorkerBody'), bt.lastYield as string);
  assert.not.ok((bt.lastYield as string).includes('firstYieldSite'));
  // Before the first yield there is a creation stack and no yield stack.
  assert.is(bt.beforeYield, null);
  assert.is(bt.keys, 'created,lastYield');
});

test('without AIOCO_DEBUG both backtraces are undefined', () => {
  const bt = runFixture(false);
  assert.is(bt.created, null);
  assert.is(bt.lastYield, null);
  assert.is(bt.beforeYield, null);
  assert.is(bt.keys, '');
});

test.run();
