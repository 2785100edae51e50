// Image checks in the core (QEMU 7.2 block.c bdrv_co_check, block-gen bdrv_check).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_check,
  bdrv_check_result_new,
  bdrv_co_check,
  bdrv_open,
  bdrv_unref,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_in_coroutine,
  aio_bh_schedule_oneshot,
  aio_co_wake,
  BDRV_FIX_ERRORS,
  BDRV_FIX_LEAKS,
  EIO,
  ENOMEDIUM,
  ENOTSUP,
  QemuError,
  type BdrvCheckResult,
  type BlockDriver,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, runCo } from '../helpers/mem-driver.ts';

const calls: string[] = [];
/** A format whose check reports what it saw, counts one leak, and yields once (BH). */
const chk: BlockDriver = {
  ...makeFormat('chkfmt'),
  *bdrv_co_check(bs, res, fix) {
    calls.push(`check ${bs.node_name} fix=${fix} inCo=${qemu_in_coroutine()} seen=${JSON.stringify(res)}`);
    const co = qemu_coroutine_self();
    aio_bh_schedule_oneshot(qemu_get_aio_context(), () => aio_co_wake(co));
    yield* qemu_coroutine_yield();
    res.leaks = 1;
    if (fix & BDRV_FIX_LEAKS) res.leaks_fixed = 1;
    res.image_end_offset = 327680;
    res.bfi.total_clusters = 16;
    res.bfi.allocated_clusters = 3;
    return (bs.opaque as { failCheck?: number }).failCheck ?? 0;
  },
};
ensureRegistered(chk);
ensureRegistered(makeProto('chkp'));
ensureRegistered(makeFormat('chknone'));

function dirty(): BdrvCheckResult {
  return {
    corruptions: 9,
    leaks: 9,
    check_errors: 9,
    corruptions_fixed: 9,
    leaks_fixed: 9,
    image_end_offset: 9,
    bfi: { total_clusters: 9, allocated_clusters: 9, fragmented_clusters: 9, compressed_clusters: 9 },
  };
}

test('bdrv_check_result_new: every counter 0', () => {
  assert.equal(bdrv_check_result_new(), {
    corruptions: 0,
    leaks: 0,
    check_errors: 0,
    corruptions_fixed: 0,
    leaks_fixed: 0,
    image_end_offset: 0,
    bfi: { total_clusters: 0, allocated_clusters: 0, fragmented_clusters: 0, compressed_clusters: 0 },
  });
  assert.is.not(bdrv_check_result_new().bfi, bdrv_check_result_new().bfi);
});

test('bdrv_check: the result is zeroed (in place, bfi too) before the driver runs, in a coroutine; fix passed', () => {
  calls.length = 0;
  const bs = bdrv_open(null, { driver: 'chkfmt', 'file.driver': 'chkp', 'node-name': 'chk1' }, 0);
  const res = dirty();
  const bfi = res.bfi;
  assert.is(bdrv_check(bs, res, BDRV_FIX_LEAKS | BDRV_FIX_ERRORS), 0);
  assert.equal(calls, [`check chk1 fix=3 inCo=true seen=${JSON.stringify(bdrv_check_result_new())}`]);
  assert.is(res.bfi, bfi, 'the same bfi object');
  assert.equal(res, {
    corruptions: 0,
    leaks: 1,
    check_errors: 0,
    corruptions_fixed: 0,
    leaks_fixed: 1,
    image_end_offset: 327680,
    bfi: { total_clusters: 16, allocated_clusters: 3, fragmented_clusters: 0, compressed_clusters: 0 },
  });
  bdrv_unref(bs);
});

test("bdrv_co_check: the driver's -errno is returned; the coroutine form gives the same", () => {
  calls.length = 0;
  const bs = bdrv_open(null, { driver: 'chkfmt', 'file.driver': 'chkp' }, 0);
  (bs.opaque as { failCheck?: number }).failCheck = -EIO;
  const res = dirty();
  const r = runCo(() => bdrv_co_check(bs, res, 0));
  assert.equal(r, { done: true, ret: -EIO });
  assert.is(res.leaks, 1);
  assert.is(res.leaks_fixed, 0, 'no BDRV_FIX_LEAKS');
  assert.is(calls.length, 1);
  bdrv_unref(bs);
});

test('bdrv_check: -ENOTSUP without the callback (format and protocol), -ENOMEDIUM without a driver; res untouched', () => {
  const fmt = bdrv_open(null, { driver: 'chknone', 'file.driver': 'chkp' }, 0);
  const res = dirty();
  assert.is(bdrv_check(fmt, res, 0), -ENOTSUP);
  assert.equal(res, dirty());
  assert.is(bdrv_check(fmt.file!.bs, res, 0), -ENOTSUP);
  bdrv_unref(fmt);
  const bs = bdrv_open(null, { driver: 'chkfmt', 'file.driver': 'chkp' }, 0);
  bdrv_unref(bs);
  assert.is(bs.drv, null);
  assert.is(bdrv_check(bs, res, 0), -ENOMEDIUM);
  assert.equal(res, dirty());
});

test('bdrv_check: from inside a coroutine it throws (use bdrv_co_check)', () => {
  const bs = bdrv_open(null, { driver: 'chkfmt', 'file.driver': 'chkp' }, 0);
  const r = runCo(function* () {
    return bdrv_check(bs, bdrv_check_result_new(), 0);
  });
  assert.instance(r.err, QemuError);
  assert.match((r.err as Error).message, /^bdrv_check: called from a coroutine/);
  bdrv_unref(bs);
});

test.run();
