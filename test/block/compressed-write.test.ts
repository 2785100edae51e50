// Compressed writes (QEMU 7.2 block/io.c bdrv_aligned_pwritev's BDRV_REQ_WRITE_COMPRESSED
// branch and bdrv_driver_pwritev_compressed): the driver's _part callback, else the plain one
// with a sliced qiov, else -ENOTSUP.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_co_pwritev,
  bdrv_co_pwritev_part,
  bdrv_open,
  bdrv_unref,
  qemu_iovec_init_external,
  qemu_iovec_to_buf,
  BdrvChild,
  BDRV_CHILD_DATA,
  BDRV_O_RDWR,
  BDRV_REQ_FUA,
  BDRV_REQ_WRITE_COMPRESSED,
  EINVAL,
  ENOTSUP,
  EPERM,
  QEMUIOVector,
  type BlockDriver,
  type BlockDriverState,
} from '../../src/index.ts';
import { ensureRegistered, makeProto, runCo, st } from '../helpers/mem-driver.ts';

const C = BDRV_REQ_WRITE_COMPRESSED;

/** What the compressed callbacks saw: the qiov object, its size and bytes, and the offsets. */
interface Seen {
  cb: 'part' | 'plain';
  offset: number;
  bytes: number;
  qiov: QEMUIOVector;
  qiov_size: number;
  qiov_offset: number;
  data: number[];
}
const seen: Seen[] = [];
/** Answer of the compressed callbacks. */
let cret = 0;

function record(cb: Seen['cb'], bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, qiov_offset: number): void {
  const buf = new Uint8Array(bytes);
  qemu_iovec_to_buf(qiov, qiov_offset, buf, bytes);
  seen.push({ cb, offset, bytes, qiov, qiov_size: qiov.size, qiov_offset, data: [...buf] });
  st(bs).log.push(`${cb} ${offset} ${bytes}`);
}

const partDrv: BlockDriver = {
  ...makeProto('cwpart'),
  *bdrv_co_pwritev_compressed_part(bs, offset, bytes, qiov, qiov_offset) {
    record('part', bs, offset, bytes, qiov, qiov_offset);
    return cret;
  },
};
const plainDrv: BlockDriver = {
  ...makeProto('cwplain'),
  *bdrv_co_pwritev_compressed(bs, offset, bytes, qiov) {
    record('plain', bs, offset, bytes, qiov, 0);
    return cret;
  },
};
const bothDrv: BlockDriver = {
  ...makeProto('cwboth'),
  bdrv_co_pwritev_compressed_part: partDrv.bdrv_co_pwritev_compressed_part!,
  bdrv_co_pwritev_compressed: plainDrv.bdrv_co_pwritev_compressed!,
};
const noneDrv = makeProto('cwnone');
for (const d of [partDrv, plainDrv, bothDrv, noneDrv]) ensureRegistered(d);

function open(driver: string, opts: Record<string, unknown> = {}, flags = BDRV_O_RDWR): { bs: BlockDriverState; c: BdrvChild } {
  const bs = bdrv_open(null, { driver, size: 65536, ...opts }, flags);
  return { bs, c: new BdrvChild(bs, 'test', BDRV_CHILD_DATA, null, {}) };
}
/** A two-element qiov over bytes 0..n-1. */
function qiovOf(n: number, split = n >> 1): QEMUIOVector {
  const all = Uint8Array.from({ length: n }, (_, i) => (i * 7 + 1) & 0xff);
  const q = new QEMUIOVector();
  qemu_iovec_init_external(q, [all.subarray(0, split), all.subarray(split)], 2);
  return q;
}
function expected(n: number, from = 0): number[] {
  return Array.from({ length: n }, (_, i) => ((i + from) * 7 + 1) & 0xff);
}
function reset(): void {
  seen.length = 0;
  cret = 0;
}

test('_part callback: gets the caller\'s qiov and qiov_offset unchanged; the plain write path is not used', () => {
  reset();
  const { bs, c } = open('cwpart');
  const q = qiovOf(8192);
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 4096, 4096, q, 2048, C)), { done: true, ret: 0 });
  assert.is(seen.length, 1);
  assert.is(seen[0]!.qiov, q);
  assert.equal({ ...seen[0]!, qiov: null, data: null }, { cb: 'part', offset: 4096, bytes: 4096, qiov: null, qiov_size: 8192, qiov_offset: 2048, data: null });
  assert.equal(seen[0]!.data, expected(4096, 2048));
  assert.equal(st(bs).log, ['part 4096 4096'], 'no "write" entry: bdrv_co_pwritev of the driver was not called');
  bdrv_unref(bs);
});

test('plain callback: the same qiov when it is exactly the request; a slice of `bytes` otherwise', () => {
  reset();
  const { bs, c } = open('cwplain');
  const q = qiovOf(4096);
  assert.equal(runCo(() => bdrv_co_pwritev(c, 0, 4096, q, C)), { done: true, ret: 0 });
  assert.is(seen[0]!.qiov, q);
  const big = qiovOf(8192, 3000);
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 8192, 4096, big, 1024, C)), { done: true, ret: 0 });
  assert.is.not(seen[1]!.qiov, big);
  assert.is(seen[1]!.qiov_size, 4096);
  assert.equal(seen[1]!.data, expected(4096, 1024));
  // qiov_offset 0 but a larger qiov: still exactly `bytes` for the driver.
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 0, 512, big, 0, C)), { done: true, ret: 0 });
  assert.is(seen[2]!.qiov_size, 512);
  assert.equal(seen[2]!.data, expected(512));
  assert.equal(st(bs).log, ['plain 0 4096', 'plain 8192 4096', 'plain 0 512']);
  bdrv_unref(bs);
});

test('both callbacks: the _part one is used', () => {
  reset();
  const { bs, c } = open('cwboth');
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 0, 1024, qiovOf(2048), 1024, C)), { done: true, ret: 0 });
  assert.equal(st(bs).log, ['part 0 1024']);
  bdrv_unref(bs);
});

test('no compressed callback: -ENOTSUP, nothing reaches the driver, no plain write instead', () => {
  reset();
  const { bs, c } = open('cwnone');
  assert.equal(runCo(() => bdrv_co_pwritev(c, 0, 4096, qiovOf(4096), C)), { done: true, ret: -ENOTSUP });
  assert.equal(st(bs).log, []);
  assert.is(st(bs).data[0], 0);
  bdrv_unref(bs);
});

test("the driver's answer is returned (-EINVAL for a range it does not take); read-only is -EPERM first", () => {
  reset();
  const { bs, c } = open('cwpart');
  cret = -EINVAL;
  assert.equal(runCo(() => bdrv_co_pwritev(c, 100, 200, qiovOf(200), C)), { done: true, ret: -EINVAL });
  bdrv_unref(bs);
  reset();
  const ro = open('cwpart', {}, 0);
  assert.equal(runCo(() => bdrv_co_pwritev(ro.c, 0, 512, qiovOf(512), C)), { done: true, ret: -EPERM });
  assert.equal(seen, []);
  bdrv_unref(ro.bs);
});

test('max_transfer does not split a compressed write; FUA is not emulated for it', () => {
  reset();
  const { bs, c } = open('cwpart', { max_transfer: 1024 });
  assert.equal(runCo(() => bdrv_co_pwritev(c, 0, 8192, qiovOf(8192), C | BDRV_REQ_FUA)), { done: true, ret: 0 });
  assert.equal(st(bs).log, ['part 0 8192']);
  bdrv_unref(bs);
});

test('an unaligned compressed write is padded (RMW read) and the aligned range goes to the driver', () => {
  reset();
  const { bs, c } = open('cwpart', { align: 512 });
  assert.equal(runCo(() => bdrv_co_pwritev(c, 100, 200, qiovOf(200), C)), { done: true, ret: 0 });
  assert.equal(st(bs).log, ['read 0 512 0', 'part 0 512']);
  assert.equal(seen[0]!.data.slice(100, 300), expected(200));
  bdrv_unref(bs);
});

test('a compressed write counts as a write: write_gen and wr_highest_offset move', () => {
  reset();
  const { bs, c } = open('cwpart', { size: 4096 });
  const gen = bs.write_gen;
  assert.equal(runCo(() => bdrv_co_pwritev(c, 0, 1024, qiovOf(1024), C)), { done: true, ret: 0 });
  assert.is(bs.write_gen, gen + 1);
  assert.is(bs.wr_highest_offset, 1024);
  bdrv_unref(bs);
});

test.run();
