// Helpers that drive AioContexts and clocks in tests (not a test file: the runner only runs
// *.test.ts).
import * as assert from 'uvu/assert';
import { QEMU_CLOCK_VIRTUAL, aio_poll, qemu_clock_get_ns, qemu_clock_set_manual, type AioContext } from '../../src/index.ts';

/**
 * Polls `ctx` without blocking until a poll makes no progress, or until `max` polls in a
 * row made progress; returns how many made progress.
 */
export function pollUntilIdle(ctx: AioContext, max = Infinity): number {
  let n = 0;
  while (n < max && aio_poll(ctx, false)) n++;
  return n;
}

/** Polls without blocking until nothing runs (bounded), so a test ends with a drained context. */
export function drain(ctx: AioContext): void {
  if (pollUntilIdle(ctx, 1000) === 1000) assert.unreachable('context did not drain');
}

/** Runs `fn` with QEMU_CLOCK_VIRTUAL in manual mode, passing its value; always restores. */
export function withManualClock(fn: (t0: number) => void): void {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  try {
    fn(qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL));
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
}
