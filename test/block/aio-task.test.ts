import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  qemu_clock_advance_virtual_time,
  qemu_clock_get_ns,
  qemu_clock_set_manual,
  qemu_co_sleep_ns,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_get_aio_context,
  QemuError,
  QEMU_CLOCK_VIRTUAL,
  EIO,
  ENOSPC,
  type CoroutineFn,
} from '../../src/index.ts';
import {
  aio_task_pool_empty,
  aio_task_pool_free,
  aio_task_pool_new,
  aio_task_pool_start_task,
  aio_task_pool_status,
  aio_task_pool_wait_all,
  aio_task_pool_wait_one,
  aio_task_pool_wait_slot,
  type AioTask,
  type AioTaskPool,
} from '../../src/block/aio-task.ts';

// Tasks are ported from the intent of block/aio_task.c's users (qcow2, block-copy): a pool owned
// by one coroutine runs at most max_busy_tasks task coroutines at once.

interface SleepTask extends AioTask {
  id: string;
  /** Virtual-clock nanoseconds to sleep; 0: no yield at all. */
  ns: number;
  result: number;
  log: string[];
  /** Highest busy_tasks seen by any task of the same log. */
  seen: { maxBusy: number };
}

function* sleep_task_func(t: SleepTask): CoroutineFn<number> {
  const pool = t.pool!;
  t.seen.maxBusy = Math.max(t.seen.maxBusy, pool.busy_tasks);
  t.log.push(`start ${t.id} @${qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) - base}`);
  if (t.ns > 0) yield* qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, t.ns);
  t.log.push(`end ${t.id} @${qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) - base}`);
  return t.result;
}

let base = 0;
function task(id: string, ns: number, log: string[], seen: { maxBusy: number }, result = 0): SleepTask {
  return { func: sleep_task_func, id, ns, result, log, seen };
}

/** Runs `body` as the pool owner's coroutine, advancing the manual virtual clock in 50 ns steps. */
function runOwner(body: () => CoroutineFn<void>, steps = 40): boolean {
  let done = false;
  const co = qemu_coroutine_create(function* owner() {
    yield* body();
    done = true;
  });
  qemu_coroutine_enter(co);
  const ctx = qemu_get_aio_context();
  for (let i = 1; i <= steps && !done; i++) {
    qemu_clock_advance_virtual_time(base + i * 50);
    while (aio_poll(ctx, false)) {}
  }
  return done;
}

function withManualClock(fn: () => void): void {
  qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, true);
  base = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL);
  try {
    fn();
  } finally {
    qemu_clock_set_manual(QEMU_CLOCK_VIRTUAL, false);
  }
}

test('start_task enters the task at once; a full pool makes start_task wait for a slot (max_busy 2)', () => {
  withManualClock(() => {
    const log: string[] = [];
    const seen = { maxBusy: 0 };
    const done = runOwner(function* () {
      const pool = aio_task_pool_new(2);
      for (const t of [task('A', 300, log, seen), task('B', 100, log, seen), task('C', 100, log, seen), task('D', 50, log, seen)]) {
        yield* aio_task_pool_start_task(pool, t);
        log.push(`started ${t.id}`);
      }
      yield* aio_task_pool_wait_all(pool);
      log.push(`all done, empty=${aio_task_pool_empty(pool)}, status=${aio_task_pool_status(pool)}`);
      aio_task_pool_free(pool);
    });
    assert.ok(done);
    assert.equal(log, [
      'start A @0',
      'started A',
      'start B @0',
      'started B',
      // C waits until B (100 ns) frees a slot.
      'end B @100',
      'start C @100',
      'started C',
      // D waits until C (100..200) frees the next one.
      'end C @200',
      'start D @200',
      'started D',
      'end D @250',
      'end A @300',
      'all done, empty=true, status=0',
    ]);
    assert.is(seen.maxBusy, 2, 'busy_tasks counts the running task itself and never exceeds max_busy_tasks');
  });
});

test('never more than max_busy_tasks run at once (max_busy 3, 8 tasks)', () => {
  withManualClock(() => {
    let running = 0;
    let maxRunning = 0;
    const order: number[] = [];
    interface CountTask extends AioTask {
      n: number;
    }
    function* count_task_func(t: CountTask): CoroutineFn<number> {
      running++;
      maxRunning = Math.max(maxRunning, running);
      yield* qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 50 * (1 + (t.n % 3)));
      running--;
      order.push(t.n);
      return 0;
    }
    let busyAfterStart: number[] = [];
    const done = runOwner(function* () {
      const pool = aio_task_pool_new(3);
      for (let n = 0; n < 8; n++) {
        yield* aio_task_pool_start_task(pool, { func: count_task_func, n } as CountTask);
        busyAfterStart.push(pool.busy_tasks);
      }
      yield* aio_task_pool_wait_all(pool);
      aio_task_pool_free(pool);
    });
    assert.ok(done);
    assert.is(maxRunning, 3);
    assert.is(running, 0);
    assert.equal(busyAfterStart, [1, 2, 3, 3, 3, 3, 3, 3]);
    assert.equal([...order].sort(), [0, 1, 2, 3, 4, 5, 6, 7]);
  });
});

test('a task that finishes without yielding is done when start_task returns; wait_slot then returns at once', () => {
  withManualClock(() => {
    const log: string[] = [];
    const seen = { maxBusy: 0 };
    let ok = false;
    const co = qemu_coroutine_create(function* () {
      const pool = aio_task_pool_new(1);
      const t = task('S', 0, log, seen, 7);
      yield* aio_task_pool_start_task(pool, t);
      log.push(`returned ret=${t.ret} empty=${aio_task_pool_empty(pool)} busy=${pool.busy_tasks}`);
      yield* aio_task_pool_wait_slot(pool);
      yield* aio_task_pool_wait_all(pool);
      log.push('waited');
      aio_task_pool_free(pool);
      ok = true;
    });
    qemu_coroutine_enter(co);
    assert.ok(ok, 'nothing yielded');
    assert.equal(log, ['start S @0', 'end S @0', 'returned ret=7 empty=true busy=0', 'waited']);
  });
});

test('status is the first error by completion order, not start order; later errors do not replace it', () => {
  withManualClock(() => {
    const log: string[] = [];
    const seen = { maxBusy: 0 };
    const statuses: number[] = [];
    let p: AioTaskPool | null = null;
    const done = runOwner(function* () {
      const pool = aio_task_pool_new(4);
      p = pool;
      yield* aio_task_pool_start_task(pool, task('X', 200, log, seen, -ENOSPC));
      yield* aio_task_pool_start_task(pool, task('Y', 100, log, seen, -EIO));
      yield* aio_task_pool_start_task(pool, task('Z', 50, log, seen, 5));
      statuses.push(aio_task_pool_status(pool));
      yield* aio_task_pool_wait_one(pool);
      statuses.push(aio_task_pool_status(pool));
      yield* aio_task_pool_wait_one(pool);
      statuses.push(aio_task_pool_status(pool));
      yield* aio_task_pool_wait_one(pool);
      statuses.push(aio_task_pool_status(pool));
    });
    assert.ok(done);
    assert.equal(statuses, [0, 0, -EIO, -EIO], 'positive results are not errors; -EIO finished first');
    assert.equal(log.filter((l) => l.startsWith('end')), ['end Z @50', 'end Y @100', 'end X @200']);
    assert.ok(aio_task_pool_empty(p!));
    aio_task_pool_free(p!);
  });
});

test('aio_task_pool_status(null) is 0 (lazily created pools)', () => {
  assert.is(aio_task_pool_status(null), 0);
});

test('assertions: new outside a coroutine, wait_one with nothing running or from another coroutine, free while busy, use after free', () => {
  const isErr = (msg: string) => (e: unknown) => e instanceof QemuError && e.message === msg;
  assert.throws(() => aio_task_pool_new(1), isErr("aio_task_pool_new: Assertion 'qemu_in_coroutine()' failed"));
  withManualClock(() => {
    const errors: string[] = [];
    const seen = { maxBusy: 0 };
    const log: string[] = [];
    const done = runOwner(function* () {
      try {
        aio_task_pool_new(0);
      } catch (e) {
        errors.push((e as Error).message);
      }
      const pool = aio_task_pool_new(2);
      try {
        yield* aio_task_pool_wait_one(pool);
      } catch (e) {
        errors.push((e as Error).message);
      }
      yield* aio_task_pool_start_task(pool, task('T', 100, log, seen));
      // Another coroutine may not wait on the owner's pool.
      const other = qemu_coroutine_create(function* () {
        try {
          yield* aio_task_pool_wait_one(pool);
        } catch (e) {
          errors.push((e as Error).message);
        }
      });
      qemu_coroutine_enter(other);
      try {
        aio_task_pool_free(pool);
      } catch (e) {
        errors.push((e as Error).message);
      }
      yield* aio_task_pool_wait_all(pool);
      aio_task_pool_free(pool);
      try {
        yield* aio_task_pool_start_task(pool, task('U', 0, log, seen));
      } catch (e) {
        errors.push((e as Error).message);
      }
    });
    assert.ok(done);
    assert.equal(errors, [
      'aio_task_pool_new: max_busy_tasks must be a positive integer (got 0)',
      "aio_task_pool_wait_one: Assertion 'pool->busy_tasks > 0' failed",
      "aio_task_pool_wait_one: Assertion 'qemu_coroutine_self() == pool->main_co' failed",
      'aio_task_pool_free: 1 task(s) still running',
      'aio_task_pool_start_task: the AioTaskPool was freed',
    ]);
    assert.equal(log, ['start T @0', 'end T @100']);
  });
});

test.run();
