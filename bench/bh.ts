/**
 * Event-loop benchmarks: a bottom half scheduled and dispatched by a non-blocking
 * aio_poll, and a coroutine that reschedules itself with aio_co_schedule to the current
 * context and is resumed by aio_poll.
 */
import {
  aio_bh_new,
  aio_co_schedule,
  aio_context_new,
  aio_poll,
  qemu_aio_coroutine_enter,
  qemu_bh_delete,
  qemu_bh_schedule,
  qemu_coroutine_create,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_current_aio_context,
  type AioContext,
  type CoroutineFn,
} from '../src/index.ts';
import type { BenchCase } from './harness.ts';

function fail(what: string): never {
  throw new Error(`bench: ${what}`);
}

let ctx: AioContext | null = null;
/** One private context for these benchmarks (never attached to Node's loop). */
function benchContext(): AioContext {
  return (ctx ??= aio_context_new());
}

interface Counter {
  n: number;
}

function countBh(c: Counter): void {
  c.n++;
}

/** qemu_bh_schedule of one BH, then aio_poll(ctx, false) runs it. */
function benchBhSchedulePoll(n: number): void {
  const ctx = benchContext();
  const c: Counter = { n: 0 };
  const bh = aio_bh_new(ctx, countBh, c);
  let progress = 0;
  for (let i = 0; i < n; i++) {
    qemu_bh_schedule(bh);
    if (aio_poll(ctx, false)) progress++;
  }
  if (c.n !== n || progress !== n) fail('bh: the BH did not run once per aio_poll');
  qemu_bh_delete(bh);
  aio_poll(ctx, false);
}

interface CoLoop {
  n: number;
  done: boolean;
}

function* coScheduleLoop(s: CoLoop): CoroutineFn<void> {
  while (s.n > 0) {
    s.n--;
    aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self());
    yield* qemu_coroutine_yield();
  }
  s.done = true;
}

/**
 * The coroutine schedules itself in the current context and yields; each aio_poll(ctx,
 * false) resumes it through the context's co_schedule BH. n polls, n reschedules.
 */
function benchCoSchedulePoll(n: number): void {
  const ctx = benchContext();
  const s: CoLoop = { n, done: false };
  const co = qemu_coroutine_create(coScheduleLoop, s);
  qemu_aio_coroutine_enter(ctx, co);
  let progress = 0;
  for (let i = 0; i < n; i++) if (aio_poll(ctx, false)) progress++;
  if (!s.done || s.n !== 0 || progress !== n) fail('co_schedule: the coroutine was not resumed once per aio_poll');
  if (aio_poll(ctx, false)) fail('co_schedule: work left after the coroutine ended');
}

export function bhCases(): BenchCase[] {
  return [
    { id: 'bh.schedule', label: 'qemu_bh_schedule + aio_poll(false)', n: 1_000_000, run: benchBhSchedulePoll },
    { id: 'co.schedule', label: 'aio_co_schedule self + aio_poll(false)', n: 500_000, run: benchCoSchedulePoll },
  ];
}
