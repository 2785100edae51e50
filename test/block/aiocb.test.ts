// Cancelling AIOCBs (src/block/aiocb.ts; reference qemu-block.md 1.2, S95-S96):
// bdrv_aio_cancel_async is a hint (cancel_async if the AIOCBInfo has one, else nothing);
// bdrv_aio_cancel takes a reference, asks to cancel, polls the AIOCB's context until the
// implementation has dropped its reference (so the callback has run), then drops its own.
// The AIOCB implementations here are tiny fakes completing from a BH or a timer.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  AioWaitError,
  BlockAIOCB,
  ECANCELED,
  QEMU_CLOCK_REALTIME,
  QemuError,
  SCALE_MS,
  aio_bh_schedule_oneshot,
  aio_context_new,
  aio_context_unref,
  aio_poll,
  aio_timer_new,
  bdrv_aio_cancel,
  bdrv_aio_cancel_async,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_aio_count_live,
  qemu_aio_get,
  qemu_aio_unref,
  qemu_clock_get_ms,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  timer_mod,
  type AIOCBInfo,
  type AioContext,
} from '../../src/index.ts';

const main = qemu_get_aio_context();

function drain(ctx: AioContext): void {
  for (let i = 0; i < 100 && aio_poll(ctx, false); i++);
}

/** A fake request: completes (cb then unref, as an implementation does) from a BH in `ctx`. */
class FakeAIOCB extends BlockAIOCB {
  ctx!: AioContext;
  log!: string[];
  cancelled = false;
}

/** Completes `acb` in its context: cb(opaque, ret), then the implementation's unref. */
function complete(acb: FakeAIOCB): void {
  acb.log.push(`complete in ${qemu_get_current_aio_context() === acb.ctx ? 'its ctx' : qemu_get_current_aio_context().name}`);
  const cb = acb.cb;
  if (cb) cb(acb.opaque, acb.cancelled ? -ECANCELED : 0);
  qemu_aio_unref(acb);
}

/** cancel_async that takes effect: completion with -ECANCELED from a BH in the AIOCB's context. */
const cancellingInfo: AIOCBInfo<FakeAIOCB> = {
  name: 'fake_cancelling',
  aiocb_class: FakeAIOCB,
  cancel_async(acb) {
    acb.log.push(`cancel_async refcnt ${acb.refcnt}`);
    acb.cancelled = true;
    aio_bh_schedule_oneshot(acb.ctx, complete, acb);
  },
  get_aio_context: (acb) => acb.ctx,
};

function submitFake(info: AIOCBInfo<FakeAIOCB>, ctx: AioContext, log: string[], bs: object | null = null): FakeAIOCB {
  const acb = qemu_aio_get(info, bs, (_o: unknown, ret: number) => log.push(`cb ${ret}`));
  acb.ctx = ctx;
  acb.log = log;
  return acb;
}

test('1.2: bdrv_aio_cancel_async without cancel_async does nothing: no callback, no reference taken', () => {
  const log: string[] = [];
  const acb = submitFake({ name: 'no_cancel', aiocb_class: FakeAIOCB }, main, log);
  bdrv_aio_cancel_async(acb);
  assert.equal(log, []);
  assert.is(acb.refcnt, 1);
  drain(main);
  assert.equal(log, [], 'nothing was scheduled either');
  complete(acb);
  assert.equal(log, ['complete in its ctx', 'cb 0']);
});

test('1.2: bdrv_aio_cancel_async calls cancel_async once with the AIOCB and returns before the callback runs', () => {
  drain(main);
  const log: string[] = [];
  const acb = submitFake(cancellingInfo, main, log);
  bdrv_aio_cancel_async(acb);
  log.push('returned');
  assert.equal(log, ['cancel_async refcnt 1', 'returned']);
  assert.is(aio_poll(main, false), true);
  assert.equal(log, ['cancel_async refcnt 1', 'returned', 'complete in its ctx', `cb ${-ECANCELED}`]);
  assert.throws(() => acb.refcnt, (e: unknown) => e instanceof QemuError && e.message === "BlockAIOCB used after it was freed (AIOCBInfo 'fake_cancelling')");
});

test('S96: bdrv_aio_cancel holds a reference during cancel_async and returns only after the callback ran; then the AIOCB is freed', () => {
  drain(main);
  const live = qemu_aio_count_live();
  const log: string[] = [];
  const acb = submitFake(cancellingInfo, main, log);
  bdrv_aio_cancel(acb);
  log.push('returned');
  assert.equal(log, ['cancel_async refcnt 2', 'complete in its ctx', `cb ${-ECANCELED}`, 'returned']);
  assert.is(qemu_aio_count_live(), live);
  assert.throws(() => acb.opaque, (e: unknown) => e instanceof QemuError && e.message === "BlockAIOCB used after it was freed (AIOCBInfo 'fake_cancelling')");
});

test("API: bdrv_aio_cancel polls get_aio_context(acb)'s context (one nobody else drives)", () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const acb = submitFake(cancellingInfo, ctx, log);
  // Only ctx can complete it: polling main instead could never end (and would throw).
  bdrv_aio_cancel(acb);
  assert.equal(log, ['cancel_async refcnt 2', 'complete in its ctx', `cb ${-ECANCELED}`]);
  aio_context_unref(ctx);
});

test('API: without get_aio_context, bdrv_aio_cancel polls the context of acb.bs', () => {
  const ctx = aio_context_new();
  const log: string[] = [];
  const info: AIOCBInfo<FakeAIOCB> = { name: 'by_bs', aiocb_class: FakeAIOCB, cancel_async: cancellingInfo.cancel_async };
  const bs = { aio_context: ctx };
  const acb = submitFake(info, ctx, log, bs);
  assert.is(acb.bs, bs);
  bdrv_aio_cancel(acb);
  assert.equal(log, ['cancel_async refcnt 2', 'complete in its ctx', `cb ${-ECANCELED}`]);
  aio_context_unref(ctx);
});

test('API: with neither get_aio_context nor bs, bdrv_aio_cancel polls the main context', () => {
  drain(main);
  const log: string[] = [];
  const info: AIOCBInfo<FakeAIOCB> = { name: 'by_main', aiocb_class: FakeAIOCB, cancel_async: cancellingInfo.cancel_async };
  const acb = submitFake(info, main, log);
  bdrv_aio_cancel(acb);
  assert.equal(log, ['cancel_async refcnt 2', 'complete in its ctx', `cb ${-ECANCELED}`]);
  // A bs without a context falls back to main as well.
  const log2: string[] = [];
  const acb2 = submitFake(info, main, log2, {});
  bdrv_aio_cancel(acb2);
  assert.equal(log2, ['cancel_async refcnt 2', 'complete in its ctx', `cb ${-ECANCELED}`]);
});

test('S96: bdrv_aio_cancel without cancel_async waits for the normal completion (a 2 ms timer), which gets its real result', () => {
  drain(main);
  const log: string[] = [];
  const info: AIOCBInfo<FakeAIOCB> = { name: 'timer_done', aiocb_class: FakeAIOCB, get_aio_context: (a) => a.ctx };
  const acb = submitFake(info, main, log);
  const ts = aio_timer_new(main, QEMU_CLOCK_REALTIME, SCALE_MS, () => complete(acb));
  timer_mod(ts, qemu_clock_get_ms(QEMU_CLOCK_REALTIME) + 2);
  bdrv_aio_cancel(acb);
  log.push('returned');
  assert.equal(log, ['complete in its ctx', 'cb 0', 'returned']);
});

test('S96: bdrv_aio_cancel of a request completing in an IOThread waits for it there', () => {
  const t = iothread_create('cancel-io');
  try {
    const io = iothread_get_aio_context(t);
    const log: string[] = [];
    const acb = submitFake(cancellingInfo, io, log);
    bdrv_aio_cancel(acb);
    assert.equal(log, ['cancel_async refcnt 2', 'complete in its ctx', `cb ${-ECANCELED}`]);
  } finally {
    iothread_destroy(t);
  }
});

test('DESIGN: bdrv_aio_cancel of a request nothing will ever complete throws AioWaitError and gives its reference back', () => {
  drain(main);
  const log: string[] = [];
  const info: AIOCBInfo<FakeAIOCB> = { name: 'never', aiocb_class: FakeAIOCB, get_aio_context: (a) => a.ctx };
  const acb = submitFake(info, main, log);
  assert.throws(
    () => bdrv_aio_cancel(acb),
    (e: unknown) =>
      e instanceof AioWaitError &&
      e.message ===
        'aio_poll: this blocking wait can never end: no context it drives has a scheduled BH, an armed timer on a running clock or an outstanding request',
  );
  assert.is(acb.refcnt, 1, "bdrv_aio_cancel's reference was dropped");
  assert.equal(log, []);
  complete(acb);
  assert.equal(log, ['complete in its ctx', 'cb 0']);
});

test('1.2: bdrv_aio_cancel and bdrv_aio_cancel_async on a freed AIOCB throw the use-after-free error', () => {
  const acb = qemu_aio_get({ name: 'gone' }, null, null);
  qemu_aio_unref(acb);
  const isFreed = (e: unknown) => e instanceof QemuError && e.message === "BlockAIOCB used after it was freed (AIOCBInfo 'gone')";
  assert.throws(() => bdrv_aio_cancel_async(acb), isFreed);
  assert.throws(() => bdrv_aio_cancel(acb), isFreed);
});

test.run();
