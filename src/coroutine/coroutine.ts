/**
 * Coroutines on generators: create, enter, yield, and the iterative wake-up queue.
 *
 * QEMU counterpart: util/qemu-coroutine.c and util/coroutine-ucontext.c. A coroutine's
 * body is a generator; switching to it is `gen.next()`, and yielding is the generator
 * returning control to whoever called `next()`. This file imports nothing of aioco's:
 * the AioContext a coroutine runs in is an opaque value here (the aio layer sets it).
 */

declare const coroutineYieldBrand: unique symbol;

/**
 * The only value a coroutine_fn may yield. Opaque: user code never creates one, it only
 * passes it through with `yield* qemu_coroutine_yield()`. Because a generator typed
 * `CoroutineFn<T>` may only yield this type, a bare `yield` or a `yield*` of anything
 * that is not a coroutine_fn fails to compile.
 */
export interface CoroutineYield {
  readonly [coroutineYieldBrand]: true;
}

/** A coroutine_fn returning T: call it with `yield*` from another coroutine_fn. */
export type CoroutineFn<T = void> = Generator<CoroutineYield, T, unknown>;

/** A coroutine's entry point, QEMU's `CoroutineEntry`: receives the opaque argument. */
export type CoroutineEntry<A> = (opaque: A) => CoroutineFn<void>;

/** Opaque stand-in for an AioContext at this layer (coroutine <- aio). */
export type CoContext = object;

/** Thrown where QEMU aborts: the message is QEMU's, without the trailing newline. */
export class CoroutineError extends Error {
  override name = 'CoroutineError';
}

const YIELD_TOKEN = Object.freeze({}) as CoroutineYield;
/** Passed to `gen.next()` on every resume; the shared yield iterator ends on it. */
const RESUME = Symbol('aioco.resume');
const YIELD_RESULT: IteratorResult<CoroutineYield, void> = Object.freeze({ done: false, value: YIELD_TOKEN });
const RESUME_RESULT: IteratorResult<CoroutineYield, void> = Object.freeze({ done: true, value: undefined });

/**
 * The iterable behind `qemu_coroutine_yield()`. One object shared by every yield: the
 * first `next()` (from `yield*`) produces the token; the resume passes RESUME, which ends
 * the delegation. No generator object, no allocation per yield.
 */
const yieldIterator: Iterator<CoroutineYield, void, unknown> & Iterable<CoroutineYield> & CoroutineFn<void> = {
  next(arg?: unknown): IteratorResult<CoroutineYield, void> {
    return arg === RESUME ? RESUME_RESULT : YIELD_RESULT;
  },
  return(value?: unknown): IteratorResult<CoroutineYield, void> {
    return { done: true, value: value as void };
  },
  throw(e?: unknown): IteratorResult<CoroutineYield, void> {
    throw e;
  },
  [Symbol.iterator]() {
    return this;
  },
} as unknown as Iterator<CoroutineYield, void, unknown> & Iterable<CoroutineYield> & CoroutineFn<void>;

/**
 * Generator.prototype.next, called directly: every generator function has its own
 * prototype object, so `gen.next` turns megamorphic once a program has more than four
 * coroutine entry functions (measured: ~8 ns of a ~36 ns enter+yield).
 */
const GeneratorPrototype = Object.getPrototypeOf(function* () {}).prototype as Generator;
const genNext = GeneratorPrototype.next as (this: CoroutineFn<void>, v: unknown) => IteratorResult<CoroutineYield, void>;

const debug = typeof process !== 'undefined' && process.env?.AIOCO_DEBUG === '1';

/**
 * A coroutine: QEMU's `Coroutine`. An opaque handle; `name` is for messages and debugging.
 * Fields mirror QEMU's struct so the rules read the same (caller, scheduled, ctx,
 * locks_held, co_queue_wakeup).
 */
export class Coroutine {
  /** @internal the body; null for the leader pseudo-coroutine. */
  gen: CoroutineFn<void> | null;
  /** @internal who entered us (null when not entered). */
  caller: Coroutine | null = null;
  /** @internal 'aio_co_schedule' or 'qemu_co_sleep_ns' while scheduled, else null. */
  scheduled: string | null = null;
  /** @internal the AioContext of the last entry (opaque here). */
  ctx: CoContext | null = null;
  /** @internal CoMutex and CoRwlock holds. */
  locks_held = 0;
  /** @internal true once the body returned or threw. */
  terminated = false;
  /** @internal the wake-up queue (S57): coroutines to enter after we yield or end. */
  wakeupHead: Coroutine | null = null;
  wakeupTail: Coroutine | null = null;
  /** @internal link in whichever single queue holds us (wake-up queue or CoQueue). */
  co_queue_next: Coroutine | null = null;
  /** @internal link in an AioContext's scheduled list. */
  co_scheduled_next: Coroutine | null = null;
  /** @internal AIOCO_DEBUG=1 only. */
  createdStack?: string;
  lastYieldStack?: string;
  name?: string;

  constructor(gen: CoroutineFn<void> | null, name?: string) {
    this.gen = gen;
    if (name !== undefined) this.name = name;
  }
}

/** The leader: what `qemu_coroutine_self()` returns outside any coroutine (S59). */
const leader = new Coroutine(null, 'leader');
let current: Coroutine = leader;

/**
 * The ambient AioContext, as a stack threaded through the JS stack: a running coroutine
 * gives its ctx; the aio layer sets it around aio_poll and dispatch (S101). null means
 * "the main context", which the aio layer supplies through `defaultContext`.
 */
let ambient: CoContext | null = null;
let defaultContext: () => CoContext = () => {
  throw new Error('aioco: no AioContext layer loaded');
};

/** @internal for the aio layer: read the ambient context (null = main). */
export function coroutineAmbientContext(): CoContext | null {
  return ambient;
}
/** @internal for the aio layer: replace the ambient context, returning the previous one. */
export function coroutineSwapAmbientContext(ctx: CoContext | null): CoContext | null {
  const prev = ambient;
  ambient = ctx;
  return prev;
}
/** @internal for the aio layer: how to find the main context. */
export function coroutineSetDefaultContext(fn: () => CoContext): void {
  defaultContext = fn;
}
function currentContext(): CoContext {
  return ambient ?? defaultContext();
}

/**
 * @internal Makes the leader current (or restores `co`), returning what was current. The
 * aio layer uses it when a wait inside a coroutine drives another context: that
 * context's callbacks run as on their own thread, outside any coroutine.
 */
export function coroutineSwapCurrent(co: Coroutine | null): Coroutine {
  const prev = current;
  current = co ?? leader;
  return prev;
}

/**
 * Creates a coroutine that will run `entry(opaque)`. QEMU: `qemu_coroutine_create`.
 * Nothing runs until it is entered; its context is null until then (S55, S64). The
 * generator object is created here, so `entry` must be a module-level generator
 * function on any hot path: a `function*` closure made per request costs ~5 µs a call.
 */
export function qemu_coroutine_create<A>(entry: CoroutineEntry<A>, opaque?: A, name?: string): Coroutine {
  const gen = entry(opaque as A);
  // Entering resumes with Generator.prototype.next itself: only a real generator will do.
  if (typeof gen !== 'object' || gen === null) notAGenerator(entry);
  const co = new Coroutine(gen, name);
  if (debug) co.createdStack = new Error('coroutine created').stack;
  return co;
}

function notAGenerator(entry: { name: string }): never {
  throw new CoroutineError(`qemu_coroutine_create: entry '${entry.name || 'anonymous'}' did not return a generator (declare it function*)`);
}

/** Appends `co` to `self`'s wake-up queue. @internal (aio_co_enter, S69b). */
export function coroutineQueueWakeup(self: Coroutine, co: Coroutine): void {
  co.co_queue_next = null;
  if (self.wakeupTail === null) self.wakeupHead = co;
  else self.wakeupTail.co_queue_next = co;
  self.wakeupTail = co;
}

function coName(co: Coroutine): string {
  return co.name !== undefined ? ` '${co.name}'` : '';
}

/** The checks QEMU makes before switching to a coroutine (S56), as thrown errors. */
function checkEnter(to: Coroutine): void {
  if (to.scheduled !== null) {
    throw new CoroutineError(`qemu_aio_coroutine_enter: Co-routine was already scheduled in '${to.scheduled}'`);
  }
  if (to.caller !== null) throw new CoroutineError('Co-routine re-entered recursively');
  if (to.gen === null) {
    throw new CoroutineError(
      to.terminated
        ? `qemu_aio_coroutine_enter: Co-routine${coName(to)} has already terminated`
        : 'qemu_aio_coroutine_enter: cannot enter the leader pseudo-coroutine',
    );
  }
}

/**
 * Runs `co` in `ctx` synchronously until it yields or ends, then enters, one after the
 * other, every coroutine it woke (its wake-up queue), depth-first. QEMU:
 * `qemu_aio_coroutine_enter`. The queue is walked in a loop, not by recursion, so two
 * coroutines waking each other 25,000 times do not grow the JS stack (S57).
 *
 * Surprise: an exception escaping a coroutine ends that coroutine only; the loop still
 * enters the rest of the queue, then rethrows the first error (several become an
 * AggregateError).
 */
export function qemu_aio_coroutine_enter(ctx: CoContext, co: Coroutine): void {
  const gen = co.gen;
  if (co.scheduled !== null || co.caller !== null || gen === null) checkEnter(co);
  const self = current;
  const prevAmbient = ambient;
  co.caller = self;
  co.ctx = ctx;
  current = co;
  ambient = ctx;
  let r: IteratorResult<CoroutineYield, void>;
  try {
    r = genNext.call(gen as CoroutineFn<void>, RESUME);
  } catch (e) {
    current = self;
    ambient = prevAmbient;
    co.caller = null;
    enterRest(ctx, self, co, null, [isGenerator(gen) ? e : new CoroutineError(`Co-routine${coName(co)}'s entry did not return a generator (declare it function*)`)]);
    return;
  }
  current = self;
  ambient = prevAmbient;
  co.caller = null;
  // The fast path: it yielded our token or ended cleanly, and woke nobody.
  if (co.wakeupHead === null) {
    if (r.done !== true) {
      if (r.value === YIELD_TOKEN) return;
    } else if (co.locks_held === 0) {
      co.terminated = true;
      co.gen = null;
      return;
    }
  }
  enterRest(ctx, self, co, r, null);
}

/**
 * The rest of qemu_aio_coroutine_enter: how `first` came back (its result, or null if it
 * threw), then its wake-up queue, entered one after the other in a loop (S57).
 */
function isGenerator(g: unknown): boolean {
  return Object.prototype.toString.call(g) === '[object Generator]';
}

function enterRest(
  ctx: CoContext,
  self: Coroutine,
  first: Coroutine,
  firstResult: IteratorResult<CoroutineYield, void> | null,
  firstErrors: unknown[] | null,
): void {
  const prevAmbient = ambient;
  let to: Coroutine = first;
  let r = firstResult;
  let errors = firstErrors;
  let pendingHead: Coroutine | null = null;
  for (;;) {
    if (r === null || r.done === true) {
      to.terminated = true;
      to.gen = null;
      if (to.locks_held !== 0) {
        (errors ??= []).push(
          new CoroutineError(
            `qemu_aio_coroutine_enter: Assertion '!to->locks_held' failed (co-routine${coName(to)} terminated holding ${to.locks_held} lock(s))`,
          ),
        );
      }
    } else if (r.value !== YIELD_TOKEN) {
      (errors ??= []).push(
        new CoroutineError(`Co-routine${coName(to)} yielded a value that is not qemu_coroutine_yield()'s token (a bare yield?)`),
      );
    }
    // Prepend to's wake-up queue to the pending queue (S57: depth-first, FIFO within).
    if (to.wakeupHead !== null) {
      (to.wakeupTail as Coroutine).co_queue_next = pendingHead;
      pendingHead = to.wakeupHead;
      to.wakeupHead = to.wakeupTail = null;
    }
    // The next pending coroutine that may be entered; one that may not is skipped, as if
    // it had run and ended, with its error kept.
    let next: Coroutine | null = null;
    while (pendingHead !== null) {
      const c: Coroutine = pendingHead;
      pendingHead = c.co_queue_next;
      c.co_queue_next = null;
      try {
        checkEnter(c);
        next = c;
        break;
      } catch (e) {
        (errors ??= []).push(e);
      }
    }
    if (next === null) break;
    to = next;
    to.caller = self;
    to.ctx = ctx;
    current = to;
    ambient = ctx;
    try {
      r = genNext.call(to.gen as CoroutineFn<void>, RESUME);
    } catch (e) {
      r = null;
      (errors ??= []).push(e);
    }
    current = self;
    ambient = prevAmbient;
    to.caller = null;
  }
  if (errors !== null) {
    throw errors.length === 1 ? errors[0] : new AggregateError(errors, 'qemu_aio_coroutine_enter: several coroutines failed');
  }
}

/**
 * Enters `co` in the current AioContext. QEMU: `qemu_coroutine_enter`. Runs it
 * synchronously; from inside another coroutine this nests (the callee's yield returns
 * here, S61), unlike `aio_co_enter`, which defers.
 */
export function qemu_coroutine_enter(co: Coroutine): void {
  qemu_aio_coroutine_enter(currentContext(), co);
}

/** Enters `co` only if it is not currently entered (S60). QEMU: `qemu_coroutine_enter_if_inactive`. */
export function qemu_coroutine_enter_if_inactive(co: Coroutine): void {
  if (co.caller === null) qemu_coroutine_enter(co);
}

/**
 * Yields to whoever entered the running coroutine. QEMU: `qemu_coroutine_yield`.
 * Use as `yield* qemu_coroutine_yield()`; returns when someone enters us again.
 * Surprise: outside a coroutine it throws `Co-routine is yielding to no one` at once.
 */
export function qemu_coroutine_yield(): CoroutineFn<void> {
  if (current === leader) throw new CoroutineError('Co-routine is yielding to no one');
  if (debug) current.lastYieldStack = new Error('coroutine yielded').stack;
  return yieldIterator;
}

/** The running coroutine, or the leader pseudo-coroutine outside any (never null, S59). QEMU: `qemu_coroutine_self`. */
export function qemu_coroutine_self(): Coroutine {
  return current;
}

/**
 * True inside an entered coroutine, false on the leader (S59). QEMU: `qemu_in_coroutine`.
 * Surprise: true in callbacks run by an aio_poll that a coroutine made on its own context.
 */
export function qemu_in_coroutine(): boolean {
  return current !== leader;
}

/**
 * True while `co` runs or has entered another coroutine that has not yielded back; false
 * before the first entry, after a yield and after termination (S60). QEMU:
 * `qemu_coroutine_entered`.
 */
export function qemu_coroutine_entered(co: Coroutine): boolean {
  return co.caller !== null;
}

/**
 * Where `co` was created and where it last yielded, recorded only under AIOCO_DEBUG=1
 * (aioco's own; QEMU has gdb scripts instead). Both are undefined otherwise.
 */
export function qemu_coroutine_backtrace(co: Coroutine): { created?: string; lastYield?: string } {
  const out: { created?: string; lastYield?: string } = {};
  if (co.createdStack !== undefined) out.created = co.createdStack;
  if (co.lastYieldStack !== undefined) out.lastYield = co.lastYieldStack;
  return out;
}

/** @internal true when AIOCO_DEBUG=1 was set at load. */
export function coroutineDebugEnabled(): boolean {
  return debug;
}

/** How a lock or queue wakes a coroutine: the aio layer installs `aio_co_wake` here. */
let wakeHook: (co: Coroutine) => void = () => {
  throw new Error('aioco: no AioContext layer loaded');
};
/** @internal for the aio layer. */
export function coroutineSetWakeHook(fn: (co: Coroutine) => void): void {
  wakeHook = fn;
}
/** @internal wake `co` as `aio_co_wake` does. */
export function coroutineWake(co: Coroutine): void {
  wakeHook(co);
}
