// BlockAIOCB, qemu_aio_get / qemu_aio_ref / qemu_aio_unref / qemu_aio_count_live
// (src/aio/aiocb.ts; reference qemu-block.md 1.1, DESIGN.md "AIOCBs"): one reference at
// creation, freed at zero, and any use after the free throws naming the AIOCBInfo (where
// QEMU would touch freed memory).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BlockAIOCB,
  qemu_aio_count_live,
  qemu_aio_get,
  qemu_aio_ref,
  qemu_aio_unref,
  type AIOCBInfo,
  type BlockCompletionFunc,
} from '../../src/index.ts';
import { isQemuErr } from '../helpers/assert.ts';

function freedErr(name: string) {
  return isQemuErr(`BlockAIOCB used after it was freed (AIOCBInfo '${name}')`);
}

/** Every field access and every refcount operation on a freed AIOCB throws `name`'s message. */
function assertPoisoned(acb: BlockAIOCB, name: string): void {
  const isFreed = freedErr(name);
  assert.throws(() => acb.aiocb_info, isFreed, 'aiocb_info');
  assert.throws(() => acb.bs, isFreed, 'bs');
  assert.throws(() => acb.cb, isFreed, 'cb');
  assert.throws(() => acb.opaque, isFreed, 'opaque');
  assert.throws(() => acb.refcnt, isFreed, 'refcnt');
  assert.throws(() => {
    acb.bs = {};
  }, isFreed, 'set bs');
  assert.throws(() => {
    acb.cb = () => {};
  }, isFreed, 'set cb');
  assert.throws(() => {
    acb.opaque = 1;
  }, isFreed, 'set opaque');
  assert.throws(() => qemu_aio_ref(acb), isFreed, 'qemu_aio_ref');
  assert.throws(() => qemu_aio_unref(acb), isFreed, 'qemu_aio_unref (double unref)');
}

test('1.1: qemu_aio_get without aiocb_class gives a BlockAIOCB with the fields set and one reference; it counts as live', () => {
  const live = qemu_aio_count_live();
  const info: AIOCBInfo = { name: 'plain_info' };
  const bs = { name: 'node' };
  const cb: BlockCompletionFunc = () => {};
  const opaque = { tag: 1 };
  const acb = qemu_aio_get(info, bs, cb, opaque);
  assert.ok(acb instanceof BlockAIOCB);
  assert.is(Object.getPrototypeOf(acb), BlockAIOCB.prototype);
  assert.is(acb.aiocb_info, info);
  assert.is(acb.bs, bs);
  assert.is(acb.cb, cb);
  assert.is(acb.opaque, opaque);
  assert.is(acb.refcnt, 1);
  assert.is(qemu_aio_count_live(), live + 1);
  qemu_aio_unref(acb);
  assert.is(qemu_aio_count_live(), live);
});

test('API: qemu_aio_get(info, null, cb) is accepted: bs null, opaque undefined; cb may be null', () => {
  const live = qemu_aio_count_live();
  const a = qemu_aio_get({}, null, () => {});
  assert.is(a.bs, null);
  assert.is(a.opaque, undefined);
  const b = qemu_aio_get({}, null, null, 7);
  assert.is(b.cb, null);
  assert.is(b.opaque, 7);
  assert.is(qemu_aio_count_live(), live + 2);
  qemu_aio_unref(a);
  qemu_aio_unref(b);
  assert.is(qemu_aio_count_live(), live);
});

class DriverAIOCB extends BlockAIOCB {
  sector = -1;
  done = false;
}

test('1.1: with aiocb_class, qemu_aio_get creates the driver class (its own fields initialised) with the common fields set', () => {
  const info: AIOCBInfo<DriverAIOCB> = { aiocb_class: DriverAIOCB, aiocb_size: 64 };
  const acb = qemu_aio_get(info, null, null, 'op');
  assert.ok(acb instanceof DriverAIOCB);
  assert.ok(acb instanceof BlockAIOCB);
  assert.is(acb.sector, -1);
  assert.is(acb.done, false);
  acb.sector = 8;
  assert.is(acb.sector, 8);
  assert.is(acb.aiocb_info, info);
  assert.is(acb.opaque, 'op');
  assert.is(acb.refcnt, 1);
  // Two AIOCBs of the same info are distinct objects.
  const other = qemu_aio_get(info, null, null);
  assert.is.not(other, acb);
  qemu_aio_unref(other);
  qemu_aio_unref(acb);
});

test('1.1: setters change bs, cb and opaque while the AIOCB is live', () => {
  const acb = qemu_aio_get({ name: 'setters' }, null, null);
  const bs = {};
  const cb: BlockCompletionFunc = () => {};
  acb.bs = bs;
  acb.cb = cb;
  acb.opaque = 'x';
  assert.is(acb.bs, bs);
  assert.is(acb.cb, cb);
  assert.is(acb.opaque, 'x');
  acb.bs = null;
  acb.cb = null;
  assert.is(acb.bs, null);
  assert.is(acb.cb, null);
  qemu_aio_unref(acb);
});

test('1.1: qemu_aio_ref / qemu_aio_unref count references; the AIOCB is freed (and no longer live) only at zero', () => {
  const live = qemu_aio_count_live();
  const acb = qemu_aio_get({ name: 'counted' }, null, null);
  qemu_aio_ref(acb);
  qemu_aio_ref(acb);
  assert.is(acb.refcnt, 3);
  qemu_aio_unref(acb);
  assert.is(acb.refcnt, 2);
  assert.is(qemu_aio_count_live(), live + 1);
  qemu_aio_unref(acb);
  assert.is(acb.refcnt, 1);
  assert.is(qemu_aio_count_live(), live + 1);
  qemu_aio_unref(acb);
  assert.is(qemu_aio_count_live(), live);
  assertPoisoned(acb, 'counted');
  assert.is(qemu_aio_count_live(), live, 'a refused double unref does not change the count');
});

test("DESIGN: after the free every access throws naming the AIOCBInfo: its name, else the class's name, else 'anonymous AIOCBInfo'", () => {
  const named = qemu_aio_get({ name: 'my_info', aiocb_class: DriverAIOCB }, null, null);
  qemu_aio_unref(named);
  assertPoisoned(named, 'my_info');
  const byClass = qemu_aio_get({ aiocb_class: DriverAIOCB }, null, null);
  qemu_aio_unref(byClass);
  assertPoisoned(byClass, 'DriverAIOCB');
  const anon = qemu_aio_get({}, null, null);
  qemu_aio_unref(anon);
  assertPoisoned(anon, 'anonymous AIOCBInfo');
  // A driver class's own fields stay plain JS fields (only the common ones are guarded).
  assert.is((named as DriverAIOCB).sector, -1);
});

test("DESIGN: a BlockAIOCB that did not come from qemu_aio_get has no reference: using it throws (AIOCBInfo 'unknown')", () => {
  const live = qemu_aio_count_live();
  const raw = new BlockAIOCB();
  assertPoisoned(raw, 'unknown');
  assert.is(qemu_aio_count_live(), live);
});

test('qemu_aio_count_live counts every AIOCB made and not yet freed', () => {
  const live = qemu_aio_count_live();
  const acbs = Array.from({ length: 50 }, (_, i) => qemu_aio_get({ name: 'many' }, null, null, i));
  assert.is(qemu_aio_count_live(), live + 50);
  for (const a of acbs.slice(0, 20)) qemu_aio_unref(a);
  assert.is(qemu_aio_count_live(), live + 30);
  for (const a of acbs.slice(20)) qemu_aio_ref(a);
  for (const a of acbs.slice(20)) qemu_aio_unref(a);
  assert.is(qemu_aio_count_live(), live + 30, 'a ref/unref pair changes nothing');
  for (const a of acbs.slice(20)) qemu_aio_unref(a);
  assert.is(qemu_aio_count_live(), live);
});

test.run();
