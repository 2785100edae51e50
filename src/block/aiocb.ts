/**
 * Cancelling AIOCBs. QEMU: block/io.c `bdrv_aio_cancel`, `bdrv_aio_cancel_async`. The
 * AIOCB itself (qemu_aio_get, refcounts) is in src/aio/aiocb.ts, as QEMU's util/aiocb.c.
 */
import { qemu_get_aio_context, type AioContext } from '../aio/aio-context.ts';
import { aio_poll } from '../aio/aio-poll.ts';
import { qemu_aio_ref, qemu_aio_unref, type BlockAIOCB } from '../aio/aiocb.ts';

/**
 * Asks the implementation to cancel `acb` and returns at once. QEMU:
 * `bdrv_aio_cancel_async`. A hint only: the completion callback still runs exactly once,
 * with -ECANCELED if the cancel took effect, else with the request's real result. Without
 * `cancel_async` in its AIOCBInfo, nothing happens.
 */
export function bdrv_aio_cancel_async(acb: BlockAIOCB): void {
  const info = acb.aiocb_info;
  if (info.cancel_async) info.cancel_async(acb);
}

/**
 * Cancels `acb` and waits until its completion callback has run. QEMU: `bdrv_aio_cancel`.
 * It polls `aiocb_info.get_aio_context(acb)`, else the context of `acb.bs`, else the main
 * context (QEMU would abort there). Surprise: a request already running is not stopped;
 * this waits for it to finish (the callback gets its real result).
 */
export function bdrv_aio_cancel(acb: BlockAIOCB): void {
  qemu_aio_ref(acb);
  bdrv_aio_cancel_async(acb);
  const info = acb.aiocb_info;
  const bs = acb.bs as { aio_context?: AioContext } | null;
  const ctx = info.get_aio_context ? info.get_aio_context(acb) : bs?.aio_context ?? qemu_get_aio_context();
  try {
    while (acb.refcnt > 1) aio_poll(ctx, true);
  } finally {
    qemu_aio_unref(acb);
  }
}
