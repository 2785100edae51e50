// Assertion helpers shared by the test files (not a test file itself: the runner only runs
// *.test.ts). Each one checks exact error classes and messages.
import * as assert from 'uvu/assert';
import { AioWaitError, CoroutineError, QemuError, aio_poll, type AioContext } from '../../src/index.ts';

/** Runs `fn`, which must throw; returns what it threw. */
export function thrown(fn: () => void): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  assert.unreachable('expected the call to throw');
  return undefined;
}

/** Asserts `fn` throws an instance of `cls` with exactly `message`. */
export function throwsExactly(fn: () => unknown, cls: new (...args: any[]) => Error, message: string): void {
  try {
    fn();
  } catch (e) {
    assert.instance(e, cls);
    assert.is((e as Error).message, message);
    return;
  }
  assert.unreachable(`expected ${cls.name}: ${message}`);
}

/** Asserts `e` is a CoroutineError with exactly `message`. */
export function assertCoError(e: unknown, message: string): void {
  assert.instance(e, CoroutineError);
  assert.is((e as Error).message, message);
}

/** Asserts `fn` throws a CoroutineError with exactly `message`. */
export function throwsCo(fn: () => void, message: string): void {
  assertCoError(thrown(fn), message);
}

/** For assert.throws: a QemuError with exactly `msg`. */
export function isQemuErr(msg: string) {
  return (e: unknown) => e instanceof QemuError && e.message === msg;
}

/** For assert.throws: a CoroutineError with exactly `msg`. */
export function isCoErr(msg: string) {
  return (e: unknown) => e instanceof CoroutineError && e.message === msg;
}

/**
 * A blocking aio_poll with nothing to wait for throws AioWaitError instead of hanging.
 * So this proves that `ctx` was not notified and has no runnable work.
 */
export function assertNotNotified(ctx: AioContext): void {
  try {
    aio_poll(ctx, true);
  } catch (e) {
    assert.instance(e, AioWaitError);
    assert.ok((e as Error).message.startsWith('aio_poll: this blocking wait can never end: '), (e as Error).message);
    return;
  }
  assert.unreachable('aio_poll(ctx, true) returned: the context was notified or had work');
}

/** Asserts a non-blocking aio_poll of each context makes no progress. */
export function assertIdle(...ctxs: AioContext[]): void {
  for (const c of ctxs) assert.is(aio_poll(c, false), false, `context '${c.name}' still had work`);
}
