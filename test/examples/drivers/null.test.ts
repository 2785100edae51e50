import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  bdrv_aio_cancel,
  bdrv_co_block_status,
  bdrv_co_is_allocated,
  blk_aio_flush,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_bs,
  blk_co_flush,
  blk_co_preadv,
  blk_co_pwritev,
  blk_flush,
  blk_getlength,
  blk_new_open,
  blk_pread,
  blk_pwrite,
  blk_unref,
  qemu_aio_count_live,
  qemu_clock_get_ns,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_get_aio_context,
  qemu_in_coroutine,
  qemu_iovec_init_buf,
  AIO_WAIT_WHILE,
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_EOF,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_ZERO,
  BDRV_O_RDWR,
  BDRV_REQ_FUA,
  QEMUIOVector,
  QemuError,
  QEMU_CLOCK_REALTIME,
  type BlockBackend,
  type BlockStatusOut,
} from '../../../src/index.ts';
import { bdrv_null_aio, bdrv_null_co, null_aiocb_info } from '../../../examples/drivers/null.ts';

// Facts: reference/qemu-block.md §3.1 (null-co / null-aio), §1.1 (AIOCB ownership), §1.3 (blk_aio_*).

const ctx = qemu_get_aio_context();
function drain(): void {
  while (aio_poll(ctx, false)) {}
}
function qiovOf(buf: Uint8Array): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, buf.length);
  return q;
}
function openErr(filename: string | null, options: Record<string, unknown>): string {
  try {
    const blk = blk_new_open(filename, null, options, BDRV_O_RDWR);
    blk_unref(blk);
  } catch (e) {
    return e instanceof QemuError ? e.message : `not QemuError: ${e}`;
  }
  return 'no error';
}

for (const proto of ['null-co', 'null-aio'] as const) {
  test(`3.1 ${proto}: the filename picks the driver; default size 1 GiB; reads, writes, flush return 0`, () => {
    const blk = blk_new_open(`${proto}://`, null, {}, BDRV_O_RDWR);
    const bs = blk_bs(blk)!;
    assert.is(bs.drv, proto === 'null-co' ? bdrv_null_co : bdrv_null_aio);
    assert.is(blk_getlength(blk), 1073741824);
    assert.is(bs.supported_write_flags, BDRV_REQ_FUA);
    assert.is(blk_pwrite(blk, 4096, 512, new Uint8Array(512).fill(1), 0), 0);
    assert.is(blk_pwrite(blk, 0, 100, new Uint8Array(100), BDRV_REQ_FUA), 0);
    assert.is(blk_flush(blk), 0);
    assert.is(blk_pread(blk, 1073741824 - 512, 512, new Uint8Array(512), 0), 0);
    blk_unref(blk);
  });

  test(`3.1 ${proto}: without read-zeroes a read leaves the buffer untouched; with read-zeroes=on it is zeroed`, () => {
    let blk = blk_new_open(null, null, { driver: proto, size: 4096 }, BDRV_O_RDWR);
    const buf = new Uint8Array(1000).fill(0xab);
    assert.is(blk_pwrite(blk, 0, 1000, new Uint8Array(1000).fill(0x11), 0), 0);
    assert.is(blk_pread(blk, 0, 1000, buf, 0), 0);
    assert.equal([...buf], new Array(1000).fill(0xab), 'writes are not stored and reads do not fill');
    blk_unref(blk);
    blk = blk_new_open(null, null, { driver: proto, size: 4096, 'read-zeroes': 'on' }, BDRV_O_RDWR);
    assert.is(blk_pread(blk, 100, 1000, buf, 0), 0);
    assert.equal([...buf], new Array(1000).fill(0));
    blk_unref(blk);
  });

  test(`3.1 ${proto}: options size (with suffix), read-zeroes=off`, () => {
    const blk = blk_new_open(null, null, { driver: proto, size: '1M', 'read-zeroes': 'off' }, BDRV_O_RDWR);
    assert.is(blk_getlength(blk), 1048576);
    const buf = new Uint8Array(8).fill(0xcd);
    assert.is(blk_pread(blk, 1048576 - 8, 8, buf, 0), 0);
    assert.equal([...buf], new Array(8).fill(0xcd));
    blk_unref(blk);
  });

  test(`1.3/3.1 ${proto}: blk_aio_* callbacks run after the submit returned, with 0; AIOCBs all freed`, () => {
    const live0 = qemu_aio_count_live();
    const blk = blk_new_open(null, null, { driver: proto, size: 65536, 'read-zeroes': 'on' }, BDRV_O_RDWR);
    const order: string[] = [];
    const buf = new Uint8Array(512).fill(0xee);
    blk_aio_preadv(blk, 0, qiovOf(buf), 0, (o, ret) => order.push(`${o} ${ret} ${buf[0]}`), 'read');
    blk_aio_pwritev(blk, 512, qiovOf(new Uint8Array(512)), 0, (o, ret) => order.push(`${o} ${ret}`), 'write');
    blk_aio_flush(blk, (o, ret) => order.push(`${o} ${ret}`), 'flush');
    order.push('submitted');
    // null-co finishes inside the submit (completion deferred to a blk BH); null-aio holds its own
    // AIOCB for the read and the write while their BHs are pending. The flush does not reach the
    // driver: nothing was written yet when it started (write_gen moves when a write ends, §2.8).
    assert.is(qemu_aio_count_live(), live0 + (proto === 'null-co' ? 3 : 5));
    drain();
    // All three BHs were scheduled before one poll: they run LIFO (S13).
    assert.equal(order, ['submitted', 'flush 0', 'write 0', 'read 0 0']);
    assert.is(qemu_aio_count_live(), live0);
    blk_unref(blk);
  });

  test(`3.1 ${proto}: block status is OFFSET_VALID at map = offset in the node itself, plus ZERO with read-zeroes`, () => {
    for (const rz of [false, true]) {
      const blk = blk_new_open(null, null, { driver: proto, size: 4096, 'read-zeroes': rz }, BDRV_O_RDWR);
      const bs = blk_bs(blk)!;
      const got: unknown[] = [];
      const co = qemu_coroutine_create(function* () {
        const out: BlockStatusOut = { pnum: -1, map: -1, file: null };
        const r1 = yield* bdrv_co_block_status(bs, true, 512, 1024, out);
        got.push([r1, out.pnum, out.map, out.file === bs]);
        const r2 = yield* bdrv_co_block_status(bs, true, 1024, 8192, out);
        got.push([r2, out.pnum, out.map, out.file === bs]);
        const a = { pnum: 0 };
        got.push([yield* bdrv_co_is_allocated(bs, 0, 4096, a), a.pnum]);
      });
      qemu_coroutine_enter(co);
      const zero = rz ? BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED : 0;
      assert.equal(got, [
        [BDRV_BLOCK_OFFSET_VALID | zero, 1024, 512, true],
        [BDRV_BLOCK_OFFSET_VALID | zero | BDRV_BLOCK_EOF, 3072, 1024, true],
        [rz ? 1 : 0, 4096],
      ]);
      blk_unref(blk);
    }
  });

  test(`3.1 ${proto}: latency-ns delays each request on the realtime clock`, () => {
    const latency = 2_000_000;
    const blk = blk_new_open(null, null, { driver: proto, size: 4096, 'latency-ns': latency }, BDRV_O_RDWR);
    let t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    assert.is(blk_pread(blk, 0, 512, new Uint8Array(512), 0), 0);
    let dt = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
    assert.ok(dt >= latency && dt < 1_000_000_000, `read took ${dt} ns`);
    const order: string[] = [];
    t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
    blk_aio_pwritev(blk, 0, qiovOf(new Uint8Array(512)), 0, (_o, ret) => order.push(`write ${ret} ${qemu_in_coroutine()}`));
    order.push('submitted');
    drain();
    assert.equal(order, ['submitted'], 'not completed before the latency elapsed');
    AIO_WAIT_WHILE(null, () => order.length < 2);
    dt = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0;
    // The request finished asynchronously: the blk_aio callback runs in the request's coroutine.
    assert.equal(order, ['submitted', 'write 0 true']);
    assert.ok(dt >= latency && dt < 1_000_000_000, `write took ${dt} ns`);
    blk_unref(blk);
  });

  if (proto === 'null-co') {
    test('3.1 null-co: without latency-ns a request ends in its first entry; with it, each one sleeps', () => {
      for (const latency of [0, 1_000_000]) {
        const blk = blk_new_open(null, null, { driver: proto, size: 4096, 'read-zeroes': 'on', 'latency-ns': latency }, BDRV_O_RDWR);
        const buf = new Uint8Array(512).fill(9);
        const steps: string[] = [];
        const co = qemu_coroutine_create(function* () {
          steps.push(`read ${yield* blk_co_preadv(blk, 0, 512, qiovOf(buf), 0)} ${buf[0]} ${buf[511]}`);
          steps.push(`write ${yield* blk_co_pwritev(blk, 512, 512, qiovOf(buf), 0)}`);
          steps.push(`flush ${yield* blk_co_flush(blk)}`);
        });
        qemu_coroutine_enter(co);
        steps.push('entered');
        AIO_WAIT_WHILE(null, () => steps.length < 4);
        if (latency === 0) assert.equal(steps, ['read 0 0 0', 'write 0', 'flush 0', 'entered']);
        else assert.equal(steps, ['entered', 'read 0 0 0', 'write 0', 'flush 0']);
        blk_unref(blk);
      }
    });
  }

  test(`3.1 ${proto}: option errors carry QEMU's messages`, () => {
    assert.is(openErr(null, { driver: proto, 'latency-ns': -1 }), 'latency-ns is invalid');
    assert.is(openErr(`${proto}://x`, {}), `The only allowed filename for this driver is '${proto}://'`);
    assert.is(openErr('foo', { driver: proto }), `The only allowed filename for this driver is '${proto}://'`);
    assert.is(openErr(null, { driver: proto, 'read-zeroes': 'maybe' }), "Parameter 'read-zeroes' expects 'on' or 'off'");
    assert.is(openErr(null, { driver: proto, size: 'big' }), "Parameter 'size' expects a non-negative number below 2^64");
    assert.is(openErr(null, { driver: proto, blocks: 1 }), `Block protocol '${proto}' doesn't support the option 'blocks'`);
  });
}

test('1.1/1.2 null-aio AIOCBs: completion from a BH, no cancel_async, bdrv_aio_cancel waits for ret 0', () => {
  assert.is(null_aiocb_info.cancel_async, undefined);
  const live0 = qemu_aio_count_live();
  const blk = blk_new_open('null-aio://', null, { 'read-zeroes': 'on' }, BDRV_O_RDWR);
  const bs = blk_bs(blk)!;
  const calls: string[] = [];
  const buf = new Uint8Array(16).fill(9);
  const acb = bdrv_null_aio.bdrv_aio_preadv!(bs, 0, 16, qiovOf(buf), 0, (o, ret) => calls.push(`${o} ${ret}`), 'op1');
  assert.ok(acb !== null);
  assert.equal(calls, [], 'never completes inside the submit');
  assert.equal([...buf], new Array(16).fill(0), 'read-zeroes fills at submit time');
  assert.is(acb!.refcnt, 1);
  bdrv_aio_cancel(acb!);
  assert.equal(calls, ['op1 0'], 'cancel cannot stop it: the callback got the real result');
  const acb2 = bdrv_null_aio.bdrv_aio_flush!(bs, (o, ret) => calls.push(`${o} ${ret}`), 'op2');
  assert.ok(acb2 !== null);
  assert.is(aio_poll(ctx, false), true);
  assert.equal(calls, ['op1 0', 'op2 0']);
  assert.is(qemu_aio_count_live(), live0);
  blk_unref(blk);
});

test('1.1 null-aio with latency: the timer completes the AIOCB and frees it', () => {
  const live0 = qemu_aio_count_live();
  const blk = blk_new_open('null-aio://', null, { 'latency-ns': '1000000' }, BDRV_O_RDWR);
  const bs = blk_bs(blk)!;
  const calls: string[] = [];
  const t0 = qemu_clock_get_ns(QEMU_CLOCK_REALTIME);
  bdrv_null_aio.bdrv_aio_pwritev!(bs, 0, 8, qiovOf(new Uint8Array(8)), 0, (o, ret) => calls.push(`${o} ${ret}`), 'w');
  assert.is(qemu_aio_count_live(), live0 + 1);
  drain();
  assert.equal(calls, []);
  AIO_WAIT_WHILE(null, () => calls.length === 0);
  assert.ok(qemu_clock_get_ns(QEMU_CLOCK_REALTIME) - t0 >= 1_000_000);
  assert.equal(calls, ['w 0']);
  assert.is(qemu_aio_count_live(), live0);
  blk_unref(blk);
});

test('1.3/S13 null-aio requests completing from BHs scheduled in one batch run LIFO', () => {
  const blk: BlockBackend = blk_new_open('null-aio://', null, {}, BDRV_O_RDWR);
  const order: number[] = [];
  for (let i = 0; i < 4; i++) {
    blk_aio_preadv(blk, i * 512, qiovOf(new Uint8Array(512)), 0, (o, ret) => order.push(ret === 0 ? o : -1), i);
  }
  AIO_WAIT_WHILE(null, () => order.length < 4);
  assert.equal(order, [3, 2, 1, 0]);
  blk_unref(blk);
});

test.run();
