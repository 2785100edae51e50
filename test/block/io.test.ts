import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_bh_schedule_oneshot,
  aio_co_wake,
  aio_poll,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_co_pwritev,
  blk_getlength,
  blk_new_open,
  blk_pread,
  blk_pwrite,
  blk_pwrite_zeroes,
  blk_flush,
  blk_pdiscard,
  blk_unref,
  blk_bs,
  bdrv_drained_begin,
  bdrv_drained_end,
  bdrv_register,
  bdrv_try_change_aio_context,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_iovec_init_buf,
  QEMUIOVector,
  QemuError,
  AIO_WAIT_WHILE,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_O_NO_FLUSH,
  BDRV_REQ_FUA,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_MAY_UNMAP,
  EIO,
  ENOTSUP,
  EPERM,
  type BlockDriver,
  type BlockDriverState,
  type Coroutine,
  type CoroutineFn,
} from '../../src/index.ts';

/** In-memory protocol driver: configurable limits and flags, a log of driver calls. */
interface MemState {
  data: Uint8Array;
  log: string[];
  /** When true, reads and writes yield once and resume from a BH (asynchronous completion). */
  async: boolean;
  zeroes: 'native' | 'enotsup' | 'none';
}
const cfg = { align: 1, max_transfer: 0, write_flags: 0, zero_flags: 0, size: 4096, discard: true };
function* later(bs: BlockDriverState): CoroutineFn<void> {
  const s = bs.opaque as MemState;
  if (!s.async) return;
  const co: Coroutine = qemu_coroutine_self();
  aio_bh_schedule_oneshot(qemu_get_current_aio_context(), () => aio_co_wake(co));
  yield* qemu_coroutine_yield();
}
const mem: BlockDriver = {
  format_name: 'mem',
  protocol_name: 'mem',
  runtime_opts: ['filename', 'async', 'zeroes'],
  bdrv_parse_filename(filename, options) {
    options['filename'] = filename;
  },
  bdrv_file_open(bs, options) {
    bs.opaque = {
      data: new Uint8Array(cfg.size),
      log: [],
      async: options['async'] === 'on',
      zeroes: (options['zeroes'] as MemState['zeroes']) ?? 'none',
    } satisfies MemState;
    bs.supported_write_flags = cfg.write_flags;
    bs.supported_zero_flags = cfg.zero_flags;
  },
  bdrv_getlength(bs) {
    return (bs.opaque as MemState).data.length;
  },
  bdrv_refresh_limits(bs) {
    bs.bl.request_alignment = cfg.align;
    bs.bl.max_transfer = cfg.max_transfer;
  },
  *bdrv_co_preadv(bs, offset, bytes, qiov, flags) {
    const s = bs.opaque as MemState;
    s.log.push(`read ${offset} ${bytes} ${flags}`);
    yield* later(bs);
    let pos = offset;
    for (let i = 0; i < qiov.niov; i++) {
      const e = qiov.iov[i]!;
      // Like file-posix: a short read past the driver's EOF is zero-filled.
      e.fill(0);
      e.set(s.data.subarray(pos, pos + e.length));
      pos += e.length;
    }
    return 0;
  },
  *bdrv_co_pwritev(bs, offset, bytes, qiov, flags) {
    const s = bs.opaque as MemState;
    s.log.push(`write ${offset} ${bytes} ${flags}`);
    // Snapshot the data before yielding so a torn RMW would be visible.
    const copy = new Uint8Array(bytes);
    let pos = 0;
    for (let i = 0; i < qiov.niov; i++) {
      copy.set(qiov.iov[i]!, pos);
      pos += qiov.iov[i]!.length;
    }
    yield* later(bs);
    s.data.set(copy, offset);
    return 0;
  },
  *bdrv_co_pwrite_zeroes(bs, offset, bytes, flags) {
    const s = bs.opaque as MemState;
    s.log.push(`zero ${offset} ${bytes} ${flags}`);
    if (s.zeroes === 'enotsup') return -ENOTSUP;
    s.data.fill(0, offset, offset + bytes);
    return 0;
  },
  *bdrv_co_flush_to_disk(bs) {
    (bs.opaque as MemState).log.push('flush');
    return 0;
  },
  *bdrv_co_pdiscard(bs, offset, bytes) {
    (bs.opaque as MemState).log.push(`discard ${offset} ${bytes}`);
    return cfg.discard ? 0 : -ENOTSUP;
  },
};
bdrv_register(mem);

function open(opts: Record<string, unknown> = {}, flags = BDRV_O_RDWR) {
  const blk = blk_new_open('mem:x', null, opts, flags);
  const s = blk_bs(blk)!.opaque as MemState;
  return { blk, s };
}
function reset(o: Partial<typeof cfg> = {}) {
  Object.assign(cfg, { align: 1, max_transfer: 0, write_flags: 0, zero_flags: 0, size: 4096, discard: true }, o);
}
function pattern(n: number, v: number): Uint8Array {
  return new Uint8Array(n).fill(v);
}

test('2.3 read alignment cases: head, tail, both, none, inside one unit', () => {
  reset({ align: 512 });
  const { blk, s } = open();
  s.data.forEach((_, i) => (s.data[i] = i & 0xff));
  const cases: [number, number, string][] = [
    [0, 512, 'read 0 512 0'],
    [100, 412, 'read 0 512 0'],
    [0, 600, 'read 0 1024 0'],
    [100, 1000, 'read 0 1536 0'],
    [10, 20, 'read 0 512 0'],
  ];
  for (const [off, len, expect] of cases) {
    s.log.length = 0;
    const buf = new Uint8Array(len);
    assert.is(blk_pread(blk, off, len, buf, 0), 0);
    assert.equal(s.log, [expect]);
    assert.equal([...buf], [...s.data.subarray(off, off + len)]);
  }
  blk_unref(blk);
});

test('2.4 unaligned write is read-modify-write of head and tail units', () => {
  reset({ align: 512 });
  const { blk, s } = open();
  s.data.fill(7);
  assert.is(blk_pwrite(blk, 100, 1000, pattern(1000, 0xaa), 0), 0);
  assert.equal(s.log, ['read 0 512 0', 'read 1024 512 0', 'write 0 1536 0']);
  assert.is(s.data[99], 7);
  assert.is(s.data[100], 0xaa);
  assert.is(s.data[1099], 0xaa);
  assert.is(s.data[1100], 7);
  s.log.length = 0;
  assert.is(blk_pwrite(blk, 10, 20, pattern(20, 1), 0), 0);
  assert.equal(s.log, ['read 0 512 0', 'write 0 512 0'], 'one unit: one merged read');
  s.log.length = 0;
  assert.is(blk_pwrite(blk, 512, 512, pattern(512, 2), 0), 0);
  assert.equal(s.log, ['write 512 512 0'], 'aligned: no RMW');
  blk_unref(blk);
});

test('2.7 concurrent overlapping RMW writes in one unit do not tear', () => {
  reset({ align: 512 });
  const { blk, s } = open({ async: 'on' });
  const done: number[] = [];
  const q1 = new QEMUIOVector();
  qemu_iovec_init_buf(q1, pattern(100, 0xaa), 100);
  const q2 = new QEMUIOVector();
  qemu_iovec_init_buf(q2, pattern(100, 0xbb), 100);
  blk_aio_pwritev(blk, 0, q1, 0, (_o, ret) => done.push(ret));
  blk_aio_pwritev(blk, 200, q2, 0, (_o, ret) => done.push(ret));
  AIO_WAIT_WHILE(null, () => done.length < 2);
  assert.equal(done, [0, 0]);
  assert.is(s.data[0], 0xaa);
  assert.is(s.data[99], 0xaa);
  assert.is(s.data[200], 0xbb);
  assert.is(s.data[299], 0xbb);
  assert.equal(s.log, ['read 0 512 0', 'write 0 512 0', 'read 0 512 0', 'write 0 512 0']);
  blk_unref(blk);
});

test('2.3/2.4 max_transfer splits reads and writes; FUA only on the last emulated chunk', () => {
  reset({ max_transfer: 1024 });
  const { blk, s } = open();
  assert.is(blk_pread(blk, 0, 2500, new Uint8Array(2500), 0), 0);
  assert.equal(s.log, ['read 0 1024 0', 'read 1024 1024 0', 'read 2048 452 0']);
  // Emulated FUA flushes before write_gen moves (as 7.2's ordering): an earlier unflushed
  // write makes the generation differ so the flush reaches the driver.
  assert.is(blk_pwrite(blk, 0, 1, pattern(1, 3), 0), 0);
  s.log.length = 0;
  assert.is(blk_pwrite(blk, 0, 2500, pattern(2500, 3), BDRV_REQ_FUA), 0);
  assert.equal(s.log, ['write 0 1024 0', 'write 1024 1024 0', 'write 2048 452 0', 'flush']);
  blk_unref(blk);
});

test('2.4 native FUA is passed to the driver, not emulated', () => {
  reset({ write_flags: BDRV_REQ_FUA });
  const { blk, s } = open();
  assert.is(blk_pwrite(blk, 0, 10, pattern(10, 1), BDRV_REQ_FUA), 0);
  assert.equal(s.log, [`write 0 10 ${BDRV_REQ_FUA}`]);
  blk_unref(blk);
});

test('2.5 zero writes: native, -ENOTSUP falls back to a zero buffer, NO_FALLBACK refuses', () => {
  reset();
  let { blk, s } = open({ zeroes: 'native' });
  s.data.fill(9);
  assert.is(blk_pwrite_zeroes(blk, 0, 100, 0), 0);
  assert.equal(s.log, ['zero 0 100 0']);
  blk_unref(blk);
  ({ blk, s } = open({ zeroes: 'enotsup' }));
  s.data.fill(9);
  assert.is(blk_pwrite_zeroes(blk, 0, 100, 0), 0);
  assert.equal(s.log, ['zero 0 100 0', 'write 0 100 0']);
  assert.is(s.data[99], 0);
  assert.is(s.data[100], 9);
  s.log.length = 0;
  assert.is(blk_pwrite_zeroes(blk, 0, 100, BDRV_REQ_NO_FALLBACK), -ENOTSUP);
  assert.equal(s.log, [], 'NO_FALLBACK unsupported by the driver: refused before calling it');
  blk_unref(blk);
});

test('2.4 NO_FALLBACK on an unaligned request is -ENOTSUP', () => {
  reset({ align: 512 });
  const { blk, s } = open();
  assert.is(blk_pwrite(blk, 1, 10, pattern(10, 1), BDRV_REQ_NO_FALLBACK), -ENOTSUP);
  assert.equal(s.log, []);
  blk_unref(blk);
});

test('2.8 flush reaches the disk only when something was written since the last flush', () => {
  reset();
  const { blk, s } = open();
  assert.is(blk_flush(blk), 0);
  assert.equal(s.log, [], 'write_gen == flushed_gen at open');
  blk_pwrite(blk, 0, 1, pattern(1, 1), 0);
  assert.is(blk_flush(blk), 0);
  assert.is(blk_flush(blk), 0);
  assert.equal(s.log, ['write 0 1 0', 'flush']);
  blk_unref(blk);
});

test('2.8 BDRV_O_NO_FLUSH never flushes; read-only flush is 0', () => {
  reset();
  let { blk, s } = open({}, BDRV_O_RDWR | BDRV_O_NO_FLUSH);
  blk_pwrite(blk, 0, 1, pattern(1, 1), 0);
  assert.is(blk_flush(blk), 0);
  assert.equal(s.log, ['write 0 1 0']);
  blk_unref(blk);
  ({ blk, s } = open({}, 0));
  assert.is(blk_pwrite(blk, 0, 1, pattern(1, 1), 0), -EPERM);
  assert.is(blk_flush(blk), 0);
  assert.equal(s.log, []);
  blk_unref(blk);
});

test('2.9 discard: silently 0 without BDRV_O_UNMAP; -ENOTSUP ignored', () => {
  reset();
  let { blk, s } = open();
  assert.is(blk_pdiscard(blk, 0, 100), 0);
  assert.equal(s.log, []);
  blk_unref(blk);
  reset({ discard: false });
  ({ blk, s } = open({}, BDRV_O_RDWR | BDRV_O_UNMAP));
  assert.is(blk_pdiscard(blk, 0, 100), 0);
  assert.equal(s.log, ['discard 0 100']);
  assert.is(blk_pdiscard(blk, 4000, 200), -EIO);
  blk_unref(blk);
});

test('2.2 blk_pread/blk_pwrite return 0 or -EIO outside the length', () => {
  reset();
  const { blk } = open();
  assert.is(blk_getlength(blk), 4096);
  assert.is(blk_pread(blk, 4000, 96, new Uint8Array(96), 0), 0);
  assert.is(blk_pread(blk, 4000, 97, new Uint8Array(97), 0), -EIO);
  assert.is(blk_pwrite(blk, -1, 1, new Uint8Array(1), 0), -EIO);
  assert.is(blk_pread(blk, 4097, 0, new Uint8Array(0), 0), -EIO);
  blk_unref(blk);
});

test('2.1 length is sector-granular: the driver is asked for the bytes up to the rounded length', () => {
  reset({ size: 1000 });
  const { blk, s } = open();
  s.data.fill(5);
  assert.is(blk_getlength(blk), 1024);
  const buf = pattern(30, 0xff);
  assert.is(blk_pread(blk, 990, 30, buf, 0), 0);
  assert.equal([...buf], [...pattern(10, 5), ...pattern(20, 0)]);
  assert.equal(s.log, ['read 990 30 0']);
  blk_unref(blk);
});

test('1.3 blk_aio callback never runs before the submit returns (sync completion goes to a BH)', () => {
  reset();
  const { blk } = open();
  const order: string[] = [];
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(8), 8);
  blk_aio_preadv(blk, 0, q, 0, (_o, ret) => order.push(`cb ${ret}`));
  order.push('returned');
  while (aio_poll(qemu_get_aio_context(), false)) {}
  assert.equal(order, ['returned', 'cb 0']);
  blk_unref(blk);
});

test('2.12 requests submitted while drained wait until drained_end', () => {
  reset();
  const { blk, s } = open({ async: 'on' });
  const bs = blk_bs(blk)!;
  const order: string[] = [];
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(8), 8);
  blk_aio_preadv(blk, 0, q, 0, () => order.push('first'));
  bdrv_drained_begin(bs);
  order.push('drained');
  assert.is(bs.in_flight, 0);
  blk_aio_preadv(blk, 8, q, 0, () => order.push('second'));
  for (let i = 0; i < 5; i++) aio_poll(qemu_get_aio_context(), false);
  assert.equal(order, ['first', 'drained']);
  bdrv_drained_end(bs);
  AIO_WAIT_WHILE(null, () => order.length < 3);
  assert.equal(order, ['first', 'drained', 'second']);
  assert.equal(s.log, ['read 0 8 0', 'read 8 8 0']);
  blk_unref(blk);
});

test('2.12 moving a node to an IOThread completes in-flight requests first, then runs there', () => {
  reset();
  const { blk } = open({ async: 'on' });
  const bs = blk_bs(blk)!;
  const t = iothread_create('blk-io');
  const ctx = iothread_get_aio_context(t);
  const seen: string[] = [];
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(8), 8);
  blk_aio_preadv(blk, 0, q, 0, () => seen.push(qemu_get_current_aio_context() === ctx ? 'iothread' : 'main'));
  assert.is(bdrv_try_change_aio_context(bs, ctx), 0);
  assert.equal(seen, ['main']);
  assert.is(bs.aio_context, ctx);
  blk_aio_preadv(blk, 0, q, 0, () => seen.push(qemu_get_current_aio_context() === ctx ? 'iothread' : 'main'));
  AIO_WAIT_WHILE(null, () => seen.length < 2);
  assert.equal(seen, ['main', 'iothread']);
  assert.is(bdrv_try_change_aio_context(bs, qemu_get_aio_context()), 0);
  blk_unref(blk);
  iothread_destroy(t);
});

test('open errors carry QEMU messages', () => {
  const msg = (f: () => unknown) => {
    try {
      f();
    } catch (e) {
      return e instanceof QemuError ? e.message : `not QemuError: ${e}`;
    }
    return 'no error';
  };
  assert.is(msg(() => blk_new_open(null, null, { driver: 'nosuch' }, 0)), "Unknown driver 'nosuch'");
  assert.is(msg(() => blk_new_open('mem:x', null, { foo: 1 }, 0)), "Block protocol 'mem' doesn't support the option 'foo'");
  assert.is(msg(() => blk_new_open('bogus:x', null, {}, 0)), "Unknown protocol 'bogus'");
});

test('writes in a coroutine: blk_co_pwritev with MAY_UNMAP on a node without UNMAP', () => {
  reset({ zero_flags: BDRV_REQ_MAY_UNMAP });
  const { blk, s } = open({ zeroes: 'native' });
  let ret = -1;
  const co = qemu_coroutine_create(function* () {
    ret = yield* blk_co_pwritev(blk, 0, 4, null, 0x2 | BDRV_REQ_MAY_UNMAP);
  });
  qemu_coroutine_enter(co);
  assert.is(ret, 0);
  assert.equal(s.log, [`zero 0 4 ${BDRV_REQ_MAY_UNMAP}`], 'blk level passes MAY_UNMAP (only bdrv_co_pwrite_zeroes strips it)');
  blk_unref(blk);
});

test.run();
