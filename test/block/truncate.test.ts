// Truncate (qemu-block.md 2.10; QEMU 7.2 block/io.c bdrv_co_truncate).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  bdrv_co_preadv,
  bdrv_co_truncate,
  bdrv_getlength,
  bdrv_open,
  bdrv_unref,
  qemu_get_aio_context,
  qemu_iovec_init_buf,
  BdrvChild,
  BlockDriverState,
  QEMUIOVector,
  QemuError,
  BDRV_MAX_LENGTH,
  BDRV_O_RDWR,
  BDRV_REQ_ZERO_WRITE,
  EIO,
  type PreallocMode,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, releaseAll, runCo, startCo, st } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('trp', { truncate: true }));
ensureRegistered(makeProto('trpn'));
ensureRegistered(makeProto('trpl', { truncate: true, getlength: false }));
ensureRegistered(makeFormat('trf', { truncate: true, supportsBacking: true }));
ensureRegistered(makeFormat('trfilter', { filter: true }));

function child(bs: BlockDriverState): BdrvChild {
  return new BdrvChild(bs, 'test', 0, null, {});
}
function truncate(bs: BlockDriverState, offset: number, flags = 0, prealloc: PreallocMode = 'off') {
  return runCo(() => bdrv_co_truncate(child(bs), offset, true, prealloc, flags));
}
function errMsg(r: { err?: unknown }): string {
  if (r.err === undefined) return 'no error';
  return r.err instanceof QemuError ? r.err.message : `not a QemuError: ${String(r.err)}`;
}
function open(opts: Record<string, unknown>, flags = BDRV_O_RDWR): BlockDriverState {
  return bdrv_open(null, opts, flags);
}

test('2.10 no medium: "No medium inserted"', () => {
  const bs = new BlockDriverState();
  assert.is(errMsg(truncate(bs, 0)), 'No medium inserted');
});

test('2.10 negative size: "Image size cannot be negative"', () => {
  const bs = open({ driver: 'trp' });
  assert.is(errMsg(truncate(bs, -1)), 'Image size cannot be negative');
  assert.equal(st(bs).log, []);
  bdrv_unref(bs);
});

test('2.10 size beyond BDRV_MAX_LENGTH fails the request check with its message', () => {
  const bs = open({ driver: 'trp' });
  const off = BDRV_MAX_LENGTH + 512;
  assert.is(errMsg(truncate(bs, off)), `offset(${off}) exceeds maximum(${BDRV_MAX_LENGTH})`);
  assert.equal(st(bs).log, []);
  bdrv_unref(bs);
});

test('2.10 read-only node: "Image is read-only"', () => {
  const bs = open({ driver: 'trp' }, 0);
  assert.is(errMsg(truncate(bs, 8192)), 'Image is read-only');
  assert.equal(st(bs).log, []);
  bdrv_unref(bs);
});

test('2.10 a failing length query: "Failed to get old image size: <strerror>"', () => {
  const bs = open({ driver: 'trp' });
  st(bs).lenErr = -EIO;
  assert.is(errMsg(truncate(bs, 8192)), 'Failed to get old image size: Input/output error');
  st(bs).lenErr = 0;
  bdrv_unref(bs);
});

test('2.10 driver without bdrv_co_truncate and not a filter: "Image format driver does not support resize"', () => {
  const bs = open({ driver: 'trpn' });
  assert.is(errMsg(truncate(bs, 8192)), 'Image format driver does not support resize');
  assert.is(bdrv_getlength(bs), 4096);
  bdrv_unref(bs);
});

test('2.10 flags outside supported_truncate_flags: "Block driver does not support requested flags"', () => {
  const bs = open({ driver: 'trp' });
  assert.is(errMsg(truncate(bs, 8192, BDRV_REQ_ZERO_WRITE)), 'Block driver does not support requested flags');
  assert.equal(st(bs).log, []);
  bdrv_unref(bs);
  const ok = open({ driver: 'trp', trunc_flags: BDRV_REQ_ZERO_WRITE });
  const r = truncate(ok, 8192, BDRV_REQ_ZERO_WRITE);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.equal(st(ok).log, [`truncate 8192 true off ${BDRV_REQ_ZERO_WRITE}`]);
  bdrv_unref(ok);
});

test('2.10 success refreshes the length (sector-granular) both ways', () => {
  const bs = open({ driver: 'trp' });
  let r = truncate(bs, 1000);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.is(bdrv_getlength(bs), 1024);
  r = truncate(bs, 10000, 0, 'falloc');
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.is(bdrv_getlength(bs), 10240);
  assert.is(bs.total_sectors, 20);
  assert.equal(st(bs).log, ['truncate 1000 true off 0', 'truncate 10000 true falloc 0']);
  bdrv_unref(bs);
});

test('2.10 without bdrv_getlength the new length comes from the hint offset >> 9', () => {
  const bs = open({ driver: 'trpl' });
  assert.is(bdrv_getlength(bs), 4096);
  const r = truncate(bs, 1000);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.is(bs.total_sectors, 1);
  assert.is(bdrv_getlength(bs), 512);
  bdrv_unref(bs);
});

test('2.10 a filter without the callback forwards to its filtered child', () => {
  const f = open({ driver: 'trfilter', 'file.driver': 'trp' });
  const file = f.file!.bs;
  const r = truncate(f, 8192);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.equal(st(file).log, ['truncate 8192 true off 0']);
  assert.is(bdrv_getlength(file), 8192);
  assert.is(bdrv_getlength(f), 8192);
  bdrv_unref(f);
});

test('2.10/2.7 growth is a serialising TRUNCATE request over [old, new): overlapping reads wait, others do not', () => {
  const bs = open({ driver: 'trp', mode: 'hold' });
  const c = child(bs);
  const t = startCo(() => bdrv_co_truncate(c, 8192, true, 'off', 0));
  assert.is(t.done, false);
  const reqs = [...bs.tracked_requests].map((q) => [q.type, q.offset, q.bytes, q.serialising, q.overlap_offset, q.overlap_bytes]);
  assert.equal(reqs, [['truncate', 4096, 4096, true, 4096, 4096]]);
  assert.is(bs.serialising_in_flight, 1);
  assert.is(bs.in_flight, 1);

  st(bs).mode = 'sync';
  const mk = (n: number) => {
    const q = new QEMUIOVector();
    qemu_iovec_init_buf(q, new Uint8Array(n), n);
    return q;
  };
  const inside = startCo(() => bdrv_co_preadv(c, 4000, 200, mk(200), 0));
  const outside = startCo(() => bdrv_co_preadv(c, 0, 512, mk(512), 0));
  assert.is(outside.done, true);
  assert.is(inside.done, false);
  assert.equal(st(bs).log, ['truncate 8192 true off 0', 'read 0 512 0']);

  assert.is(releaseAll(bs), 1);
  for (let i = 0; i < 10 && !inside.done; i++) aio_poll(qemu_get_aio_context(), false);
  assert.equal([t.done, t.ret, inside.done, inside.ret], [true, 0, true, 0]);
  assert.equal(st(bs).log, ['truncate 8192 true off 0', 'read 0 512 0', 'read 4000 200 0']);
  assert.is(bs.serialising_in_flight, 0);
  assert.is(bs.in_flight, 0);
  assert.is(bdrv_getlength(bs), 8192);
  bdrv_unref(bs);
});

test('2.10 truncate is not a write: write generation moves, wr_highest_offset does not', () => {
  const bs = open({ driver: 'trp' });
  const gen = bs.write_gen;
  const r = truncate(bs, 8192);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.is(bs.write_gen, gen + 1);
  assert.is(bs.wr_highest_offset, 0);
  bdrv_unref(bs);
});

test('2.10 growing over a longer backing file adds BDRV_REQ_ZERO_WRITE; a shorter one does not', () => {
  const longBase = open({ driver: 'trp', size: 16384, 'node-name': 'tr-long' });
  const top = open({ driver: 'trf', size: 4096, trunc_flags: BDRV_REQ_ZERO_WRITE, 'file.driver': 'trp', backing: 'tr-long' });
  let r = truncate(top, 8192);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.equal(st(top).log, [`truncate 8192 true off ${BDRV_REQ_ZERO_WRITE}`]);
  assert.is(bdrv_getlength(top), 8192);
  // Shrinking never adds it.
  r = truncate(top, 2048);
  assert.equal(st(top).log.slice(1), ['truncate 2048 true off 0']);
  bdrv_unref(top);
  bdrv_unref(longBase);

  const shortBase = open({ driver: 'trp', size: 1024, 'node-name': 'tr-short' });
  const top2 = open({ driver: 'trf', size: 4096, 'file.driver': 'trp', backing: 'tr-short' });
  r = truncate(top2, 8192);
  assert.equal([r.ret, r.err], [0, undefined]);
  assert.equal(st(top2).log, ['truncate 8192 true off 0']);
  bdrv_unref(top2);
  bdrv_unref(shortBase);
});

test('2.10 ZERO_WRITE added for the backing must be supported by the driver', () => {
  const base = open({ driver: 'trp', size: 16384, 'node-name': 'tr-long2' });
  const top = open({ driver: 'trf', size: 4096, 'file.driver': 'trp', backing: 'tr-long2' });
  assert.is(errMsg(truncate(top, 8192)), 'Block driver does not support requested flags');
  assert.equal(st(top).log, []);
  assert.is(bdrv_getlength(top), 4096);
  bdrv_unref(top);
  bdrv_unref(base);
});

test.run();
