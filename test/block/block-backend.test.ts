// BlockBackend (qemu-block.md 1.3, 2.2, 2.7, 2.8; QEMU 7.2 block/block-backend.c, block/io.c).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  blk_aio_flush,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_bs,
  blk_co_flush,
  blk_co_preadv,
  blk_co_pwrite_zeroes,
  blk_co_pwritev,
  blk_drain,
  blk_flush,
  blk_getlength,
  blk_new_open,
  blk_pread,
  blk_pwrite,
  blk_set_enable_write_cache,
  blk_unref,
  qemu_get_aio_context,
  qemu_iovec_init_buf,
  BlockBackend,
  QEMUIOVector,
  BDRV_O_RDWR,
  BDRV_REQ_FUA,
  BDRV_REQ_NO_WAIT,
  BDRV_REQ_SERIALISING,
  EBUSY,
  EIO,
  ENOMEDIUM,
  EPERM,
} from '../../src/index.ts';
import { ensureRegistered, makeProto, releaseAll, runCo, st } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('bbp'));

function open(opts: Record<string, unknown> = {}, flags = BDRV_O_RDWR) {
  const blk = blk_new_open(null, null, { driver: 'bbp', ...opts }, flags);
  return { blk, s: st(blk_bs(blk)!) };
}
function qiov(n: number, v = 0): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(n).fill(v), n);
  return q;
}
function pollAll(): void {
  for (let i = 0; i < 100 && aio_poll(qemu_get_aio_context(), false); i++) {}
}

test('2.2 range checks: negative bytes/offset and beyond the length are -EIO, the driver is not called', () => {
  const { blk, s } = open();
  assert.is(runCo(() => blk_co_pwrite_zeroes(blk, 0, -1, 0)).ret, -EIO);
  assert.is(runCo(() => blk_co_preadv(blk, -1, 1, qiov(1), 0)).ret, -EIO);
  assert.is(runCo(() => blk_co_preadv(blk, 4096, 1, qiov(1), 0)).ret, -EIO);
  assert.is(runCo(() => blk_co_pwritev(blk, 4000, 97, qiov(97), 0)).ret, -EIO);
  assert.is(runCo(() => blk_co_preadv(blk, 4097, 0, qiov(0), 0)).ret, -EIO);
  assert.equal(s.log, []);
  assert.is(runCo(() => blk_co_preadv(blk, 4096, 0, qiov(0), 0)).ret, 0);
  blk_unref(blk);
});

test('2.2 no medium: -ENOMEDIUM (after the bytes < 0 check), length -ENOMEDIUM, flush -ENOMEDIUM', () => {
  const blk = new BlockBackend(qemu_get_aio_context());
  assert.is(runCo(() => blk_co_pwrite_zeroes(blk, 0, -1, 0)).ret, -EIO);
  assert.is(runCo(() => blk_co_preadv(blk, -1, 1, qiov(1), 0)).ret, -ENOMEDIUM);
  assert.is(runCo(() => blk_co_preadv(blk, 0, 1, qiov(1), 0)).ret, -ENOMEDIUM);
  assert.is(runCo(() => blk_co_flush(blk)).ret, -ENOMEDIUM);
  assert.is(blk_getlength(blk), -ENOMEDIUM);
  assert.is(blk_pread(blk, 0, 1, new Uint8Array(1), 0), -ENOMEDIUM);
  assert.is(blk.in_flight, 0);
});

test('2.2 writethrough (write cache off) adds FUA: native FUA reaches the driver, else a flush follows', () => {
  let { blk, s } = open({ write_flags: BDRV_REQ_FUA });
  blk_set_enable_write_cache(blk, false);
  assert.is(blk_pwrite(blk, 0, 10, new Uint8Array(10), 0), 0);
  assert.equal(s.log, [`write 0 10 ${BDRV_REQ_FUA}`]);
  blk_unref(blk);
  ({ blk, s } = open());
  // An earlier unflushed write makes the generation differ, so the emulating flush reaches the
  // disk (7.2 flushes before the FUA write itself bumps write_gen).
  assert.is(blk_pwrite(blk, 100, 1, new Uint8Array(1), 0), 0);
  blk_set_enable_write_cache(blk, false);
  assert.is(blk_pwrite(blk, 0, 10, new Uint8Array(10), 0), 0);
  assert.equal(s.log, ['write 100 1 0', 'write 0 10 0', 'flush', 'flush done']);
  blk_set_enable_write_cache(blk, true);
  s.log.length = 0;
  assert.is(blk_pwrite(blk, 0, 10, new Uint8Array(10), 0), 0);
  assert.equal(s.log, ['write 0 10 0']);
  blk_unref(blk);
});

test('1.3 blk_aio_*: the callback runs after the submit returns, exactly once, with its opaque (sync and async)', () => {
  for (const mode of ['sync', 'bh', 'hold'] as const) {
    const { blk, s } = open({ mode });
    const order: string[] = [];
    const tag = { mode };
    blk_aio_pwritev(blk, 0, qiov(8, 1), 0, (o, ret) => order.push(`write ${(o as typeof tag).mode} ${ret}`), tag);
    order.push('returned');
    blk_aio_preadv(blk, 8192, qiov(8), 0, (o, ret) => order.push(`bad ${(o as typeof tag).mode} ${ret}`), tag);
    order.push('returned 2');
    assert.equal(order, ['returned', 'returned 2'], mode);
    if (mode === 'hold') {
      pollAll();
      assert.equal(order, ['returned', 'returned 2', 'bad hold -5']);
      assert.is(releaseAll(blk_bs(blk)!), 1);
    }
    pollAll();
    pollAll();
    // One-shot BHs run newest first (QEMU's LIFO bh_list), so the BH of the later request runs
    // before the one that resumes the earlier request.
    const expect = ['returned', 'returned 2', `bad ${mode} -5`, `write ${mode} 0`];
    assert.equal(order, expect, mode);
    assert.equal(s.log, ['write 0 8 0']);
    assert.is(blk.in_flight, 0);
    blk_unref(blk);
  }
});

test('2.12 blk_drain waits for AIO requests and their callbacks', () => {
  const { blk } = open({ mode: 'bh' });
  const done: number[] = [];
  for (let i = 0; i < 3; i++) blk_aio_preadv(blk, i * 512, qiov(512), 0, (_o, ret) => done.push(i * 10 + ret));
  assert.is(blk.in_flight, 3);
  blk_drain(blk);
  // Completions are woken by BHs, which run newest first.
  assert.equal(done, [20, 10, 0]);
  assert.is(blk.in_flight, 0);
  assert.is(blk_bs(blk)!.in_flight, 0);
  blk_unref(blk);
});

test('2.2 blk_pread/blk_pwrite return 0 (not a byte count) or -errno', () => {
  let { blk } = open();
  const buf = new Uint8Array(100);
  assert.is(blk_pwrite(blk, 0, 100, buf.fill(3), 0), 0);
  assert.is(blk_pread(blk, 0, 100, buf.fill(0), 0), 0);
  assert.is(buf[99], 3);
  assert.is(blk_pread(blk, 4000, 100, buf, 0), -EIO);
  blk_unref(blk);
  ({ blk } = open({}, 0));
  assert.is(blk_pwrite(blk, 0, 1, buf, 0), -EPERM);
  blk_unref(blk);
});

test('2.4/2.7 SERIALISING|NO_WAIT fails -EBUSY on an overlap (serialising or not), proceeds otherwise', () => {
  const { blk, s } = open({ mode: 'hold' });
  const bs = blk_bs(blk)!;
  const done: string[] = [];
  blk_aio_pwritev(blk, 0, qiov(512, 1), 0, (_o, ret) => done.push(`plain ${ret}`));
  s.mode = 'sync';
  assert.is(runCo(() => blk_co_pwritev(blk, 256, 512, qiov(512), BDRV_REQ_SERIALISING | BDRV_REQ_NO_WAIT)).ret, -EBUSY);
  assert.is(runCo(() => blk_co_pwritev(blk, 1024, 512, qiov(512), BDRV_REQ_SERIALISING | BDRV_REQ_NO_WAIT)).ret, 0);
  assert.equal(s.log, ['write 0 512 0', 'write 1024 512 0']);
  assert.is(bs.serialising_in_flight, 0);
  releaseAll(bs);
  pollAll();
  assert.equal(done, ['plain 0']);

  s.mode = 'hold';
  blk_aio_pwritev(blk, 0, qiov(512, 2), BDRV_REQ_SERIALISING, (_o, ret) => done.push(`ser ${ret}`));
  s.mode = 'sync';
  assert.is(runCo(() => blk_co_pwritev(blk, 511, 1, qiov(1), BDRV_REQ_SERIALISING | BDRV_REQ_NO_WAIT)).ret, -EBUSY);
  // Without NO_WAIT an overlapping plain read waits for the serialising write.
  blk_aio_preadv(blk, 100, qiov(10), 0, (_o, ret) => done.push(`read ${ret}`));
  pollAll();
  assert.equal(s.log, ['write 0 512 0', 'write 1024 512 0', 'write 0 512 0']);
  releaseAll(bs);
  pollAll();
  assert.equal(done, ['plain 0', 'ser 0', 'read 0']);
  assert.equal(s.log, ['write 0 512 0', 'write 1024 512 0', 'write 0 512 0', 'read 100 10 0']);
  blk_unref(blk);
});

test('2.8 concurrent flushes run one at a time in generation order; a flush with nothing new skips the disk', () => {
  const { blk, s } = open();
  const bs = blk_bs(blk)!;
  const done: string[] = [];
  assert.is(blk_pwrite(blk, 0, 1, new Uint8Array(1), 0), 0);
  s.mode = 'hold';
  blk_aio_flush(blk, (_o, ret) => done.push(`A ${ret}`));
  s.mode = 'sync';
  assert.is(blk_pwrite(blk, 1, 1, new Uint8Array(1), 0), 0);
  blk_aio_flush(blk, (_o, ret) => done.push(`B ${ret}`));
  blk_aio_flush(blk, (_o, ret) => done.push(`C ${ret}`));
  pollAll();
  assert.equal(done, []);
  assert.equal(s.log, ['write 0 1 0', 'flush', 'write 1 1 0']);
  releaseAll(bs);
  pollAll();
  assert.equal(done, ['A 0', 'B 0', 'C 0']);
  assert.equal(s.log, ['write 0 1 0', 'flush', 'write 1 1 0', 'flush done', 'flush', 'flush done']);
  assert.is(bs.flushed_gen, bs.write_gen);
  blk_unref(blk);
});

test('2.8 a failed flush does not advance flushed_gen: the next flush reaches the disk again', () => {
  const { blk, s } = open();
  assert.is(blk_pwrite(blk, 0, 1, new Uint8Array(1), 0), 0);
  s.flushRet = -EIO;
  assert.is(blk_flush(blk), -EIO);
  s.flushRet = 0;
  assert.is(blk_flush(blk), 0);
  assert.is(blk_flush(blk), 0);
  assert.equal(s.log, ['write 0 1 0', 'flush', 'flush done', 'flush', 'flush done']);
  blk_unref(blk);
});

test.run();
