/**
 * A pool of concurrent coroutine tasks with a limit on how many run at once. QEMU:
 * block/aio_task.c, include/block/aio_task.h (used by qcow2 and block-copy to keep several
 * requests in flight from one coroutine).
 *
 * The pool belongs to the coroutine that created it (the "main" coroutine): only it starts
 * tasks and waits. Each task runs in its own coroutine; its `func` is a module-level
 * coroutine_fn taking the task object, which carries the request's data (QEMU embeds
 * `AioTask` at the start of a bigger struct; here the task is any object with `func`).
 */
import { QemuError } from '../aio/error.ts';
import { aio_co_wake } from '../aio/co-schedule.ts';
import {
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from '../coroutine/coroutine.ts';

/** The body of a task: a module-level coroutine_fn returning 0 or -errno. QEMU: `AioTaskFunc`. */
export type AioTaskFunc<T extends AioTask = AioTask> = (task: T) => CoroutineFn<number>;

/**
 * One task. QEMU: `AioTask`. `pool` and `ret` are set by the pool: `pool` when the task starts,
 * `ret` (the value `func` returned) when it ends.
 */
export interface AioTask {
  pool?: AioTaskPool | null;
  func: AioTaskFunc<any>;
  ret?: number;
}

/** QEMU's `AioTaskPool`. Create it with `aio_task_pool_new`. */
export class AioTaskPool {
  /** @internal the coroutine that owns the pool. */
  main_co: Coroutine;
  /** First error a task returned (0 while none did). */
  status = 0;
  max_busy_tasks: number;
  /** Tasks started and not yet finished. */
  busy_tasks = 0;
  /** @internal main_co is parked in aio_task_pool_wait_one. */
  waiting = false;
  /** @internal set by aio_task_pool_free. */
  freed = false;

  /** @internal use aio_task_pool_new. */
  constructor(main_co: Coroutine, max_busy_tasks: number) {
    this.main_co = main_co;
    this.max_busy_tasks = max_busy_tasks;
  }
}

function assertLive(fn: string, pool: AioTaskPool): void {
  if (pool.freed) throw new QemuError(`${fn}: the AioTaskPool was freed`);
}

/** The coroutine body every task runs in (QEMU: `aio_task_co`). */
function* aio_task_co(task: AioTask): CoroutineFn<void> {
  const pool = task.pool!;
  if (pool.busy_tasks >= pool.max_busy_tasks) {
    throw new QemuError("aio_task_co: Assertion 'pool->busy_tasks < pool->max_busy_tasks' failed");
  }
  pool.busy_tasks++;
  let ret: number;
  try {
    ret = yield* task.func(task);
  } finally {
    pool.busy_tasks--;
  }
  task.ret = ret;
  if (ret < 0 && pool.status === 0) pool.status = ret;
  if (pool.waiting) {
    pool.waiting = false;
    aio_co_wake(pool.main_co);
  }
}

/**
 * Creates a pool owned by the calling coroutine, running at most `max_busy_tasks` tasks at once.
 * QEMU: `aio_task_pool_new` (a coroutine_fn there; it does not yield, so it is a plain function
 * here that must be called from inside a coroutine). Throws QemuError outside a coroutine or for
 * `max_busy_tasks` < 1.
 */
export function aio_task_pool_new(max_busy_tasks: number): AioTaskPool {
  if (!qemu_in_coroutine()) throw new QemuError("aio_task_pool_new: Assertion 'qemu_in_coroutine()' failed");
  if (!Number.isSafeInteger(max_busy_tasks) || max_busy_tasks < 1) {
    throw new QemuError(`aio_task_pool_new: max_busy_tasks must be a positive integer (got ${max_busy_tasks})`);
  }
  return new AioTaskPool(qemu_coroutine_self(), max_busy_tasks);
}

/**
 * Waits until one running task finishes. QEMU: `aio_task_pool_wait_one`. Only the pool's owner
 * may wait, and only while a task is running (else QemuError, QEMU's assertions).
 */
export function* aio_task_pool_wait_one(pool: AioTaskPool): CoroutineFn<void> {
  assertLive('aio_task_pool_wait_one', pool);
  if (pool.busy_tasks <= 0) throw new QemuError("aio_task_pool_wait_one: Assertion 'pool->busy_tasks > 0' failed");
  if (!qemu_in_coroutine() || qemu_coroutine_self() !== pool.main_co) {
    throw new QemuError("aio_task_pool_wait_one: Assertion 'qemu_coroutine_self() == pool->main_co' failed");
  }
  pool.waiting = true;
  yield* qemu_coroutine_yield();
  if (pool.waiting) throw new QemuError("aio_task_pool_wait_one: Assertion '!pool->waiting' failed");
}

/** Waits, if the pool is full, until a slot frees. QEMU: `aio_task_pool_wait_slot`. */
export function* aio_task_pool_wait_slot(pool: AioTaskPool): CoroutineFn<void> {
  assertLive('aio_task_pool_wait_slot', pool);
  if (pool.busy_tasks < pool.max_busy_tasks) return;
  yield* aio_task_pool_wait_one(pool);
}

/** Waits until no task is running. QEMU: `aio_task_pool_wait_all`. */
export function* aio_task_pool_wait_all(pool: AioTaskPool): CoroutineFn<void> {
  assertLive('aio_task_pool_wait_all', pool);
  while (pool.busy_tasks > 0) yield* aio_task_pool_wait_one(pool);
}

/**
 * Starts `task` in a new coroutine, first waiting for a free slot when `max_busy_tasks` are
 * running. QEMU: `aio_task_pool_start_task`. The task's coroutine is entered at once: it runs
 * until its first yield (or to its end) before this returns. Tasks are started in call order.
 */
export function* aio_task_pool_start_task(pool: AioTaskPool, task: AioTask): CoroutineFn<void> {
  assertLive('aio_task_pool_start_task', pool);
  yield* aio_task_pool_wait_slot(pool);
  task.pool = pool;
  qemu_coroutine_enter(qemu_coroutine_create(aio_task_co, task, 'aio_task'));
}

/**
 * Releases the pool. QEMU: `aio_task_pool_free`. Surprise: throws QemuError while tasks still run
 * (QEMU would free memory they use); every later use of the pool throws.
 */
export function aio_task_pool_free(pool: AioTaskPool): void {
  assertLive('aio_task_pool_free', pool);
  if (pool.busy_tasks > 0) throw new QemuError(`aio_task_pool_free: ${pool.busy_tasks} task(s) still running`);
  pool.freed = true;
}

/**
 * The first error any finished task returned, or 0. QEMU: `aio_task_pool_status`; a null pool
 * (lazily created and never needed) is 0.
 */
export function aio_task_pool_status(pool: AioTaskPool | null): number {
  if (!pool) return 0;
  return pool.status;
}

/** Whether no task is running. QEMU: `aio_task_pool_empty`. */
export function aio_task_pool_empty(pool: AioTaskPool): boolean {
  return pool.busy_tasks === 0;
}
