// The thread pool's watchdog: holds one end of a MessageChannel per worker. When a worker
// dies in a way its own exit hook cannot see (out of memory), its end closes and the
// watchdog completes its request with -EIO through shared memory, waking the main thread
// even while that thread is blocked in aio_poll.
import { workerData, parentPort } from 'node:worker_threads';
import { C_WORKER, W_STRIDE, reclaimWorker } from './thread-pool-layout.mjs';

const ctl = new Int32Array(workerData.ctlSab);
const f64 = new Float64Array(workerData.f64Sab);
const wake = new Int32Array(workerData.wakeSab);

parentPort.on('message', ({ id, port }) => {
  port.on('message', () => {});
  port.on('close', () => reclaimWorker(ctl, f64, wake, id, 'died'));
  const ack = C_WORKER + id * W_STRIDE + 2;
  Atomics.store(ctl, ack, 1);
  Atomics.notify(ctl, ack);
});
