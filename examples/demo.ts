/**
 * The core demo (`npm run demo`): coroutine_fn code moving between the main context and an
 * IOThread, sleeping on a timer, taking a CoMutex, and waking through a CoQueue, all run
 * from Node's event loop under effection's main().
 */
import { all, main } from 'effection';
import {
  CoMutex,
  CoQueue,
  QEMU_CLOCK_REALTIME,
  aio_co_reschedule_self,
  coroutineOperation,
  iothread_get_aio_context,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  qemu_co_queue_next,
  qemu_co_queue_wait,
  qemu_co_sleep_ns,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_init_main_loop,
  useIOThread,
  type AioContext,
  type CoroutineFn,
} from '../src/index.ts';

const where = () => qemu_get_current_aio_context().name;

interface Job {
  io: AioContext;
  lock: CoMutex;
  queue: CoQueue;
  log: string[];
  ready: boolean;
}

function* worker(job: Job): CoroutineFn<number> {
  job.log.push(`worker starts in '${where()}'`);
  yield* aio_co_reschedule_self(job.io);
  job.log.push(`worker now in '${where()}'`);
  yield* qemu_co_mutex_lock(job.lock);
  yield* qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 2_000_000);
  job.ready = true;
  qemu_co_queue_next(job.queue);
  qemu_co_mutex_unlock(job.lock);
  yield* aio_co_reschedule_self(qemu_get_aio_context());
  job.log.push(`worker back in '${where()}'`);
  return 42;
}

function* waiter(job: Job): CoroutineFn<string> {
  yield* aio_co_reschedule_self(job.io);
  yield* qemu_co_mutex_lock(job.lock);
  while (!job.ready) yield* qemu_co_queue_wait(job.queue, job.lock);
  qemu_co_mutex_unlock(job.lock);
  job.log.push(`waiter woken in '${where()}'`);
  return 'ok';
}

await main(function* () {
  qemu_init_main_loop();
  const t = yield* useIOThread('iothread0');
  const job: Job = { io: iothread_get_aio_context(t), lock: new CoMutex(), queue: new CoQueue(), log: [], ready: false };
  const start = performance.now();
  const [w, r] = yield* all([
    coroutineOperation(qemu_get_aio_context(), waiter, job),
    coroutineOperation(qemu_get_aio_context(), worker, job),
  ]);
  for (const line of job.log) console.log(line);
  console.log(`waiter returned '${w}', worker returned ${r} in ${(performance.now() - start).toFixed(1)} ms`);
});
