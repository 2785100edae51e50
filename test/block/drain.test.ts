// Drain and in-flight accounting (qemu-block.md 2.12; QEMU 7.2 block/io.c, block.c bdrv_new).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  blk_aio_preadv,
  blk_bs,
  blk_get_aio_context,
  blk_insert_bs,
  blk_new_open,
  blk_unref,
  bdrv_drain_all,
  bdrv_drain_all_begin,
  bdrv_drain_all_end,
  bdrv_drained_begin,
  bdrv_drained_end,
  bdrv_open,
  bdrv_try_change_aio_context,
  bdrv_unref,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_iovec_init_buf,
  AIO_WAIT_WHILE,
  BlockBackend,
  QEMUIOVector,
  BDRV_O_RDWR,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, releaseAll, st } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('drp'));
ensureRegistered(makeFormat('drf'));

function qiov(n: number): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(n), n);
  return q;
}
function pollAll(): void {
  for (let i = 0; i < 100 && aio_poll(qemu_get_aio_context(), false); i++) {}
}
function openFmt(mode: string) {
  const blk = blk_new_open(null, null, { driver: 'drf', 'file.driver': 'drp', 'file.mode': mode }, BDRV_O_RDWR);
  const top = blk_bs(blk)!;
  return { blk, top, file: top.file!.bs };
}

test('2.12 in-flight accounting: blk 1, the root node 2 (backend + request), its file 1; all 0 after', () => {
  const { blk, top, file } = openFmt('hold');
  const done: number[] = [];
  blk_aio_preadv(blk, 0, qiov(512), 0, (_o, ret) => done.push(ret));
  assert.equal([blk.in_flight, top.in_flight, file.in_flight], [1, 2, 1]);
  assert.is(releaseAll(file), 1);
  pollAll();
  assert.equal(done, [0]);
  assert.equal([blk.in_flight, top.in_flight, file.in_flight], [0, 0, 0]);
  blk_unref(blk);
});

test('2.12 drained_begin waits for in-flight requests and quiesces the node and its BlockBackend', () => {
  const { blk, top, file } = openFmt('bh');
  const done: number[] = [];
  blk_aio_preadv(blk, 0, qiov(512), 0, (_o, ret) => done.push(ret));
  bdrv_drained_begin(top);
  assert.equal(done, [0]);
  assert.equal([blk.in_flight, top.in_flight, file.in_flight], [0, 0, 0]);
  assert.equal([top.quiesce_counter, blk.quiesce_counter, file.quiesce_counter], [1, 1, 0]);
  bdrv_drained_end(top);
  assert.equal([top.quiesce_counter, blk.quiesce_counter], [0, 0]);
  blk_unref(blk);
});

test('2.12 new requests park while drained (not counted in flight) and resume at drained_end', () => {
  const { blk, top, file } = openFmt('sync');
  const order: string[] = [];
  bdrv_drained_begin(top);
  blk_aio_preadv(blk, 0, qiov(8), 0, (_o, ret) => order.push(`cb ${ret}`));
  pollAll();
  assert.equal(order, []);
  assert.equal(st(file).log, []);
  assert.equal([blk.in_flight, top.in_flight], [0, 0]);
  bdrv_drained_end(top);
  order.push('end returned');
  pollAll();
  assert.equal(order, ['cb 0', 'end returned'], 'the parked request is entered directly by drained_end');
  assert.equal(st(file).log, ['read 0 8 0']);
  blk_unref(blk);
});

test('2.12 drained sections nest: requests resume only when the last one ends', () => {
  const { blk, top, file } = openFmt('sync');
  const order: string[] = [];
  bdrv_drained_begin(top);
  bdrv_drained_begin(top);
  blk_aio_preadv(blk, 0, qiov(8), 0, (_o, ret) => order.push(`cb ${ret}`));
  bdrv_drained_end(top);
  pollAll();
  assert.equal(order, []);
  assert.equal([top.quiesce_counter, blk.quiesce_counter], [1, 1]);
  bdrv_drained_end(top);
  pollAll();
  assert.equal(order, ['cb 0']);
  assert.equal(st(file).log, ['read 0 8 0']);
  blk_unref(blk);
});

test('2.12 draining a child quiesces its parents up to the BlockBackend', () => {
  const { blk, top, file } = openFmt('sync');
  bdrv_drained_begin(file);
  assert.equal([file.quiesce_counter, top.quiesce_counter, blk.quiesce_counter], [1, 1, 1]);
  const order: number[] = [];
  blk_aio_preadv(blk, 0, qiov(8), 0, (_o, ret) => order.push(ret));
  pollAll();
  assert.equal(order, []);
  bdrv_drained_end(file);
  pollAll();
  assert.equal(order, [0]);
  assert.equal([file.quiesce_counter, top.quiesce_counter, blk.quiesce_counter], [0, 0, 0]);
  blk_unref(blk);
});

test('2.12 bdrv_drain_all waits for requests on every node', () => {
  const a = openFmt('bh');
  const b = openFmt('bh');
  const done: string[] = [];
  blk_aio_preadv(a.blk, 0, qiov(8), 0, () => done.push('a'));
  blk_aio_preadv(b.blk, 0, qiov(8), 0, () => done.push('b'));
  bdrv_drain_all();
  assert.equal(done.slice().sort(), ['a', 'b']);
  assert.equal([a.blk.in_flight, b.blk.in_flight, a.top.quiesce_counter, b.top.quiesce_counter], [0, 0, 0, 0]);
  blk_unref(a.blk);
  blk_unref(b.blk);
});

test('2.12 a node opened inside drain_all_begin is quiesced too until drain_all_end', () => {
  bdrv_drain_all_begin();
  const { blk, top, file } = openFmt('sync');
  const done: number[] = [];
  try {
    // QEMU's bdrv_new begins one drained section per active drain_all on every new node.
    assert.is(file.quiesce_counter, 1);
    assert.is(blk.quiesce_counter > 0, true);
    blk_aio_preadv(blk, 0, qiov(8), 0, (_o, ret) => done.push(ret));
    pollAll();
    assert.equal(done, []);
  } finally {
    bdrv_drain_all_end();
  }
  pollAll();
  assert.equal(done, [0]);
  assert.equal([top.quiesce_counter, file.quiesce_counter, blk.quiesce_counter], [0, 0, 0]);
  blk_unref(blk);
});

test('2.12 moving a node with its children to an IOThread moves them all; I/O then runs there', () => {
  const top = bdrv_open(null, { driver: 'drf', 'file.driver': 'drp', 'file.mode': 'bh' }, BDRV_O_RDWR);
  const file = top.file!.bs;
  const t = iothread_create('drain-move');
  const ctx = iothread_get_aio_context(t);
  try {
    assert.is(bdrv_try_change_aio_context(top, ctx), 0);
    assert.equal([top.aio_context === ctx, file.aio_context === ctx], [true, true]);
    assert.equal([top.quiesce_counter, file.quiesce_counter], [0, 0]);
    const blk = new BlockBackend(qemu_get_aio_context());
    blk_insert_bs(blk, top);
    assert.is(blk_get_aio_context(blk), ctx);
    const seen: string[] = [];
    blk_aio_preadv(blk, 0, qiov(8), 0, (_o, ret) => seen.push(`${qemu_get_current_aio_context() === ctx ? 'iothread' : 'main'} ${ret}`));
    AIO_WAIT_WHILE(null, () => seen.length < 1);
    assert.equal(seen, ['iothread 0']);
    // Detach the backend (keeping our node reference), then move the nodes back.
    blk.root!.bs.parents = blk.root!.bs.parents.filter((c) => c !== blk.root);
    blk.root = null;
    assert.is(bdrv_try_change_aio_context(top, qemu_get_aio_context()), 0);
    assert.equal([top.aio_context === qemu_get_aio_context(), file.aio_context === qemu_get_aio_context()], [true, true]);
  } finally {
    bdrv_unref(top);
    iothread_destroy(t);
  }
});

test('2.12 moving a child node moves its parent node as well (the whole connected graph)', () => {
  const top = bdrv_open(null, { driver: 'drf', 'file.driver': 'drp' }, BDRV_O_RDWR);
  const file = top.file!.bs;
  const t = iothread_create('drain-move-child');
  const ctx = iothread_get_aio_context(t);
  try {
    let ret: unknown;
    try {
      ret = bdrv_try_change_aio_context(file, ctx);
    } catch (e) {
      ret = e instanceof Error ? `${e.name}: ${e.message}` : e;
    }
    assert.is(ret, 0);
    assert.equal([top.aio_context === ctx, file.aio_context === ctx], [true, true]);
  } finally {
    if (file.aio_context !== qemu_get_aio_context()) bdrv_try_change_aio_context(top, qemu_get_aio_context());
    bdrv_unref(top);
    iothread_destroy(t);
  }
});

test.run();
