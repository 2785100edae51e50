// The README's example, kept runnable: test/examples/readme-example.test.ts runs it.
import { all, main } from 'effection';
import { QEMU_CLOCK_REALTIME, aio_co_reschedule_self, coroutineOperation, iothread_get_aio_context,
  qemu_co_sleep_ns, qemu_get_aio_context, qemu_get_current_aio_context, qemu_init_main_loop,
  useIOThread, type AioContext, type CoroutineFn } from 'aioco';

function* work(io: AioContext): CoroutineFn<string> {          // a coroutine_fn
  const seen = [qemu_get_current_aio_context().name];          // 'main'
  yield* aio_co_reschedule_self(io);                           // resumes in the IOThread's BH round
  yield* qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 1_000_000);     // a timer of the IOThread's context
  seen.push(qemu_get_current_aio_context().name);              // 'iothread0'
  yield* aio_co_reschedule_self(qemu_get_aio_context());       // and back to main
  return seen.concat(qemu_get_current_aio_context().name).join(' -> ');
}

await main(function* () {
  qemu_init_main_loop();                                       // attach main to Node's loop
  const io = iothread_get_aio_context(yield* useIOThread('iothread0'));
  console.log(yield* coroutineOperation(qemu_get_aio_context(), work, io));
});                                                            // main -> iothread0 -> main
