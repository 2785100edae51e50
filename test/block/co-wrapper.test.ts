// Synchronous wrappers around node-level coroutine functions (QEMU 7.2 block/block-gen.c
// generated_co_wrapper, bdrv_poll_co; block/io.c bdrv_co_pwrite_sync).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_co_pwrite_sync,
  bdrv_flush,
  bdrv_open,
  bdrv_poll_co,
  bdrv_pread,
  bdrv_pwrite,
  bdrv_pwrite_sync,
  bdrv_pwrite_zeroes,
  bdrv_try_change_aio_context,
  bdrv_unref,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_in_coroutine,
  aio_bh_schedule_oneshot,
  aio_co_wake,
  AioWaitError,
  BdrvChild,
  BDRV_CHILD_DATA,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  EIO,
  EPERM,
  QemuError,
  type BlockDriverState,
  type CoroutineFn,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, releaseAll, runCo, st } from '../helpers/mem-driver.ts';
import { drain } from '../helpers/aio.ts';
import { isQemuErr } from '../helpers/assert.ts';

ensureRegistered(makeProto('cwp'));
ensureRegistered(makeFormat('cwf'));

let n = 0;
function proto(opts: Record<string, unknown> = {}, flags = BDRV_O_RDWR): BlockDriverState {
  return bdrv_open(null, { driver: 'cwp', 'node-name': `cw${++n}`, ...opts }, flags);
}
function childOf(bs: BlockDriverState): BdrvChild {
  return new BdrvChild(bs, 'test', BDRV_CHILD_DATA, null, {});
}
function bytes(...v: number[]): Uint8Array {
  return Uint8Array.from(v);
}

test('bdrv_poll_co: returns the coroutine\'s value; the body runs in a coroutine and may yield', () => {
  const seen: string[] = [];
  const r = bdrv_poll_co(null, 'test_fn', function* (): CoroutineFn<number> {
    seen.push(`in coroutine ${qemu_in_coroutine()} ${qemu_coroutine_self().name}`);
    const co = qemu_coroutine_self();
    aio_bh_schedule_oneshot(qemu_get_aio_context(), () => {
      seen.push('bh');
      aio_co_wake(co);
    });
    yield* qemu_coroutine_yield();
    seen.push('resumed');
    return 42;
  });
  assert.is(r, 42);
  assert.equal(seen, ['in coroutine true test_fn', 'bh', 'resumed']);
  assert.is(qemu_in_coroutine(), false);
});

test('bdrv_poll_co: an exception thrown in the coroutine is rethrown to the caller, the same object', () => {
  const err = new QemuError('boom');
  const e = (() => {
    try {
      bdrv_poll_co(null, 'thrower', function* (): CoroutineFn<void> {
        const co = qemu_coroutine_self();
        aio_bh_schedule_oneshot(qemu_get_aio_context(), () => aio_co_wake(co));
        yield* qemu_coroutine_yield();
        throw err;
      });
    } catch (x) {
      return x;
    }
    return null;
  })();
  assert.is(e, err);
  // A non-Error throw value comes back too.
  assert.throws(
    () =>
      bdrv_poll_co(null, 'thrower2', function* (): CoroutineFn<void> {
        throw 7;
      }),
    (x: unknown) => x === 7,
  );
  let threw = false;
  try {
    bdrv_poll_co(null, 'thrower3', function* (): CoroutineFn<number> {
      throw undefined;
    });
  } catch (x) {
    threw = x === undefined;
  }
  assert.ok(threw, 'throw undefined is rethrown, not turned into a return');
});

test('bdrv_poll_co: called from inside a coroutine it throws QemuError naming the wrapper', () => {
  const bs = proto();
  const r = runCo(function* (): CoroutineFn<number> {
    return bdrv_pread(childOf(bs), 0, 4, new Uint8Array(4), 0);
  });
  assert.ok(r.done);
  assert.instance(r.err, QemuError);
  assert.is((r.err as Error).message, 'bdrv_pread: called from a coroutine; use the coroutine_fn form (aioco cannot block inside a coroutine)');
  assert.equal(st(bs).log, [], 'nothing reached the driver');
  bdrv_unref(bs);
});

test("bdrv_poll_co: the body runs in the node's AioContext (main for null, the IOThread's after a move)", () => {
  const here = () => bdrv_poll_co(null, 'where', function* (): CoroutineFn<string> {
    return qemu_get_current_aio_context() === qemu_get_aio_context() ? 'main' : 'other';
  });
  assert.is(here(), 'main');
  const bs = proto({ mode: 'bh' });
  const t = iothread_create('cw-io');
  const ctx = iothread_get_aio_context(t);
  try {
    assert.is(bdrv_try_change_aio_context(bs, ctx), 0);
    const where = bdrv_poll_co(bs, 'where', function* (): CoroutineFn<boolean> {
      return qemu_get_current_aio_context() === ctx;
    });
    assert.is(where, true);
    // A request that completes from a BH in the IOThread's context still finishes.
    assert.is(bdrv_pwrite(childOf(bs), 0, 2, bytes(5, 6), 0), 0);
    assert.equal([...st(bs).data.subarray(0, 2)], [5, 6]);
    assert.is(bdrv_try_change_aio_context(bs, qemu_get_aio_context()), 0);
  } finally {
    bdrv_unref(bs);
    iothread_destroy(t);
  }
});

test('bdrv_pwrite / bdrv_pread: data round trip, 0 returned, requests logged as given (sync and BH completion)', () => {
  for (const mode of ['sync', 'bh']) {
    const bs = proto({ mode });
    const c = childOf(bs);
    assert.is(bdrv_pwrite(c, 10, 3, bytes(1, 2, 3), 0), 0);
    const buf = new Uint8Array(5).fill(0xaa);
    assert.is(bdrv_pread(c, 9, 5, buf, 0), 0);
    assert.equal([...buf], [0, 1, 2, 3, 0]);
    assert.equal(st(bs).log, ['write 10 3 0', 'read 9 5 0'], mode);
    // Only `bytes` of a larger buffer are used.
    const big = new Uint8Array(8).fill(0xee);
    assert.is(bdrv_pread(c, 10, 2, big, 0), 0);
    assert.equal([...big], [1, 2, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
    bdrv_unref(bs);
  }
});

test('bdrv_pread / bdrv_pwrite: -errno from the block layer comes back as the return value', () => {
  const ro = proto({}, 0);
  assert.is(bdrv_pwrite(childOf(ro), 0, 1, bytes(1), 0), -EPERM);
  assert.equal(st(ro).log, []);
  assert.is(bdrv_pread(childOf(ro), -1, 1, new Uint8Array(1), 0), -EIO);
  assert.equal(st(ro).log, []);
  bdrv_unref(ro);
});

test('bdrv_pwrite: flags reach the driver when it supports them (FUA)', () => {
  const bs = proto({ write_flags: BDRV_REQ_FUA });
  assert.is(bdrv_pwrite(childOf(bs), 0, 4, bytes(1, 2, 3, 4), BDRV_REQ_FUA), 0);
  assert.equal(st(bs).log, [`write 0 4 ${BDRV_REQ_FUA}`]);
  bdrv_unref(bs);
});

test('bdrv_pwrite_sync: the write, then the flush, in the driver log; through a format to its file', () => {
  const bs = proto();
  assert.is(bdrv_pwrite_sync(childOf(bs), 512, 2, bytes(7, 8), 0), 0);
  assert.equal(st(bs).log, ['write 512 2 0', 'flush', 'flush done']);
  assert.equal([...st(bs).data.subarray(512, 514)], [7, 8]);

  const fmt = bdrv_open(null, { driver: 'cwf', 'file.driver': 'cwp', 'file.mode': 'bh' }, BDRV_O_RDWR);
  const file = fmt.file!.bs;
  assert.is(bdrv_pwrite_sync(childOf(fmt), 0, 1, bytes(9), 0), 0);
  assert.equal(st(fmt).log, ['write 0 1 0']);
  assert.equal(st(file).log, ['write 0 1 0', 'flush', 'flush done']);
  bdrv_unref(fmt);
  bdrv_unref(bs);
});

test('bdrv_pwrite_sync: a failed write is returned and nothing is flushed; a failed flush is returned', () => {
  const ro = proto({}, 0);
  assert.is(bdrv_pwrite_sync(childOf(ro), 0, 1, bytes(1), 0), -EPERM);
  assert.equal(st(ro).log, []);
  bdrv_unref(ro);
  const bs = proto();
  st(bs).flushRet = -EIO;
  assert.is(bdrv_pwrite_sync(childOf(bs), 0, 1, bytes(1), 0), -EIO);
  assert.equal(st(bs).log, ['write 0 1 0', 'flush', 'flush done']);
  bdrv_unref(bs);
});

test('bdrv_co_pwrite_sync: the coroutine form, write then flush, with the data written', () => {
  const bs = proto({ mode: 'bh' });
  const r = runCo(() => bdrv_co_pwrite_sync(childOf(bs), 100, 3, bytes(4, 5, 6), 0));
  assert.equal(r, { done: true, ret: 0 });
  assert.equal(st(bs).log, ['write 100 3 0', 'flush', 'flush done']);
  assert.equal([...st(bs).data.subarray(100, 103)], [4, 5, 6]);
  bdrv_unref(bs);
});

test('bdrv_pwrite_zeroes: a zero write reaches the driver; MAY_UNMAP only with BDRV_O_UNMAP', () => {
  const bs = proto({ zero_flags: BDRV_REQ_MAY_UNMAP });
  st(bs).data.fill(0xff);
  assert.is(bdrv_pwrite_zeroes(childOf(bs), 8, 8, BDRV_REQ_MAY_UNMAP), 0);
  assert.equal([...st(bs).data.subarray(6, 18)], [0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
  assert.equal(st(bs).log, ['zero 8 8 0'], 'no BDRV_O_UNMAP: MAY_UNMAP dropped');
  bdrv_unref(bs);
  const um = proto({ zero_flags: BDRV_REQ_MAY_UNMAP }, BDRV_O_RDWR | BDRV_O_UNMAP);
  assert.is(bdrv_pwrite_zeroes(childOf(um), 0, 512, BDRV_REQ_MAY_UNMAP), 0);
  assert.equal(st(um).log, [`zero 0 512 ${BDRV_REQ_MAY_UNMAP}`]);
  bdrv_unref(um);
  const ro = proto({}, 0);
  assert.is(bdrv_pwrite_zeroes(childOf(ro), 0, 512, 0), -EPERM);
  bdrv_unref(ro);
});

test('bdrv_flush: nothing to flush on a clean node; after a write the driver flushes; its error returned', () => {
  const bs = proto();
  assert.is(bdrv_flush(bs), 0);
  assert.equal(st(bs).log, []);
  assert.is(bdrv_pwrite(childOf(bs), 0, 1, bytes(1), 0), 0);
  assert.is(bdrv_flush(bs), 0);
  assert.is(bdrv_flush(bs), 0);
  assert.equal(st(bs).log, ['write 0 1 0', 'flush', 'flush done'], 'the second flush had nothing new');
  assert.is(bdrv_pwrite(childOf(bs), 0, 1, bytes(2), 0), 0);
  st(bs).flushRet = -EIO;
  assert.is(bdrv_flush(bs), -EIO);
  assert.is(bdrv_flush(bs), -EIO, 'a failed flush is retried');
  bdrv_unref(bs);
});

test('bdrv_flush: from a coroutine it throws instead of blocking', () => {
  const bs = proto();
  const r = runCo(function* (): CoroutineFn<number> {
    return bdrv_flush(bs);
  });
  assert.ok(isQemuErr('bdrv_flush: called from a coroutine; use the coroutine_fn form (aioco cannot block inside a coroutine)')(r.err));
  bdrv_unref(bs);
});


test('bdrv_pread: a request that can never complete throws AioWaitError instead of hanging; it finishes when released', () => {
  const bs = proto({ mode: 'hold' });
  const buf = new Uint8Array(4).fill(0xaa);
  st(bs).data.set([1, 2, 3, 4]);
  const e = (() => {
    try {
      bdrv_pread(childOf(bs), 0, 4, buf, 0);
    } catch (x) {
      return x;
    }
    return null;
  })();
  assert.instance(e, AioWaitError);
  assert.equal(st(bs).log, ['read 0 4 0']);
  assert.is(bs.in_flight, 1);
  assert.is(releaseAll(bs), 1);
  drain(qemu_get_aio_context());
  assert.is(bs.in_flight, 0);
  assert.equal([...buf], [1, 2, 3, 4], 'the abandoned coroutine still filled the buffer');
  bdrv_unref(bs);
});

test.run();
