// What reaches the driver on block/io.c's short paths (QEMU 7.2 bdrv_co_preadv_part,
// bdrv_co_pwritev_part, bdrv_driver_preadv/pwritev): an aligned request hands the driver the
// caller's own QEMUIOVector and offset into it; only unaligned ones go through the padded copy;
// a driver without the _part callbacks gets a slice only when the request is a part of the
// vector; write flags are masked by supported_write_flags and FUA the driver lacks becomes a flush.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_co_preadv_part,
  bdrv_co_pwritev_part,
  bdrv_open,
  bdrv_register,
  bdrv_unref,
  qemu_iovec_init_buf,
  BdrvChild,
  QEMUIOVector,
  BDRV_O_RDWR,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  type BlockDriver,
  type BlockDriverState,
} from '../../src/index.ts';
import { runCo } from '../helpers/mem-driver.ts';

interface Call {
  op: string;
  offset: number;
  bytes: number;
  qiov: QEMUIOVector | null;
  qiov_offset: number;
  flags: number;
  /** The bytes the driver saw (writes), or null. */
  data: number[] | null;
}
interface FpState {
  calls: Call[];
}

function seen(qiov: QEMUIOVector, qiov_offset: number, bytes: number): number[] {
  const out: number[] = [];
  let skip = qiov_offset;
  for (let i = 0; i < qiov.niov && out.length < bytes; i++) {
    const e = qiov.iov[i]!;
    for (let j = 0; j < e.length && out.length < bytes; j++) {
      if (skip > 0) skip--;
      else out.push(e[j]!);
    }
  }
  return out;
}

function driver(name: string, part: boolean): BlockDriver {
  const log = (bs: BlockDriverState, c: Call) => (bs.opaque as FpState).calls.push(c);
  const drv: BlockDriver = {
    format_name: name,
    protocol_name: name,
    runtime_opts: ['filename', 'align', 'fua'],
    bdrv_parse_filename(filename, options) {
      options['filename'] = filename;
    },
    bdrv_file_open(bs, options) {
      bs.opaque = { calls: [] } satisfies FpState;
      bs.supported_write_flags = options['fua'] === 'on' ? BDRV_REQ_FUA : 0;
      (bs as BlockDriverState & { fpAlign: number }).fpAlign = Number(options['align'] ?? 1);
    },
    bdrv_refresh_limits(bs) {
      bs.bl.request_alignment = (bs as BlockDriverState & { fpAlign: number }).fpAlign;
    },
    bdrv_getlength() {
      return 8192;
    },
    *bdrv_co_flush_to_disk(bs) {
      log(bs, { op: 'flush', offset: 0, bytes: 0, qiov: null, qiov_offset: 0, flags: 0, data: null });
      return 0;
    },
  };
  if (part) {
    drv.bdrv_co_preadv_part = function* (bs, offset, bytes, qiov, qiov_offset, flags) {
      log(bs, { op: 'read', offset, bytes, qiov, qiov_offset, flags, data: null });
      return 0;
    };
    drv.bdrv_co_pwritev_part = function* (bs, offset, bytes, qiov, qiov_offset, flags) {
      log(bs, { op: 'write', offset, bytes, qiov, qiov_offset, flags, data: seen(qiov, qiov_offset, bytes) });
      return 0;
    };
  } else {
    drv.bdrv_co_preadv = function* (bs, offset, bytes, qiov, flags) {
      log(bs, { op: 'read', offset, bytes, qiov, qiov_offset: 0, flags, data: null });
      return 0;
    };
    drv.bdrv_co_pwritev = function* (bs, offset, bytes, qiov, flags) {
      log(bs, { op: 'write', offset, bytes, qiov, qiov_offset: 0, flags, data: seen(qiov, 0, bytes) });
      return 0;
    };
  }
  return drv;
}
bdrv_register(driver('fp-part', true));
bdrv_register(driver('fp-whole', false));

function open(drv: string, opts: Record<string, unknown> = {}) {
  const bs = bdrv_open(null, { driver: drv, ...opts }, BDRV_O_RDWR);
  return { bs, c: new BdrvChild(bs, 'test', 0, null, {}), calls: (bs.opaque as FpState).calls };
}
function vec(n: number): QEMUIOVector {
  const q = new QEMUIOVector();
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = i & 0xff;
  qemu_iovec_init_buf(q, b, n);
  return q;
}
function summary(c: Call): unknown[] {
  return [c.op, c.offset, c.bytes, c.qiov_offset, c.flags];
}

test('_part driver: an aligned read or write gets the caller\'s vector and offset into it', () => {
  const { bs, c, calls } = open('fp-part', { align: 512 });
  const q = vec(2048);
  assert.equal(runCo(() => bdrv_co_preadv_part(c, 1024, 512, q, 512, 0)).ret, 0);
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 2048, 1024, q, 1024, 0)).ret, 0);
  assert.equal(calls.map(summary), [
    ['read', 1024, 512, 512, 0],
    ['write', 2048, 1024, 1024, 0],
  ]);
  assert.is(calls[0]!.qiov, q);
  assert.is(calls[1]!.qiov, q);
  assert.equal(calls[1]!.data, [...q.iov[0]!.subarray(1024, 2048)]);
  assert.equal([bs.tracked_requests.size, bs.in_flight], [0, 0]);
  bdrv_unref(bs);
});

test('_part driver: an unaligned read is widened through a padded vector; an unaligned write is RMW', () => {
  const { bs, c, calls } = open('fp-part', { align: 512 });
  const q = vec(1024);
  assert.equal(runCo(() => bdrv_co_preadv_part(c, 600, 100, q, 10, 0)).ret, 0);
  assert.equal(calls.map(summary), [['read', 512, 512, 0, 0]]);
  assert.ok(calls[0]!.qiov !== q, 'a padded vector, not the caller\'s');
  assert.is(calls[0]!.qiov!.size, 512);
  calls.length = 0;
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 600, 100, q, 10, 0)).ret, 0);
  assert.equal(calls.map(summary), [
    ['read', 512, 512, 0, 0],
    ['write', 512, 512, 0, 0],
  ]);
  assert.ok(calls[1]!.qiov !== q);
  // The driver read nothing into the padding (this driver leaves buffers alone): zeroes
  // around the caller's 100 bytes, taken from q at qiov_offset 10.
  assert.equal(calls[1]!.data, [...new Array(88).fill(0), ...q.iov[0]!.subarray(10, 110), ...new Array(324).fill(0)]);
  assert.equal([bs.tracked_requests.size, bs.serialising_in_flight, bs.in_flight], [0, 0, 0]);
  bdrv_unref(bs);
});

test('whole-vector driver: the caller\'s vector when the request is all of it, a slice when a part', () => {
  const { bs, c, calls } = open('fp-whole');
  const q = vec(1024);
  assert.equal(runCo(() => bdrv_co_preadv_part(c, 0, 1024, q, 0, 0)).ret, 0);
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 4096, 1024, q, 0, 0)).ret, 0);
  assert.is(calls[0]!.qiov, q);
  assert.is(calls[1]!.qiov, q);
  assert.equal(runCo(() => bdrv_co_preadv_part(c, 0, 300, q, 100, 0)).ret, 0);
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 0, 300, q, 100, 0)).ret, 0);
  assert.equal(runCo(() => bdrv_co_pwritev_part(c, 0, 300, q, 0, 0)).ret, 0);
  assert.equal(calls.map(summary), [
    ['read', 0, 1024, 0, 0],
    ['write', 4096, 1024, 0, 0],
    ['read', 0, 300, 0, 0],
    ['write', 0, 300, 0, 0],
    ['write', 0, 300, 0, 0],
  ]);
  for (const k of [2, 3, 4]) {
    assert.ok(calls[k]!.qiov !== q, `call ${k}: a slice`);
    assert.is(calls[k]!.qiov!.size, 300);
  }
  assert.equal(calls[3]!.data, [...q.iov[0]!.subarray(100, 400)]);
  assert.equal(calls[4]!.data, [...q.iov[0]!.subarray(0, 300)]);
  bdrv_unref(bs);
});

for (const drv of ['fp-part', 'fp-whole']) {
  test(`${drv}: write flags are masked by supported_write_flags; FUA the driver lacks becomes a flush`, () => {
    const native = open(drv, { fua: 'on' });
    const q = vec(512);
    assert.equal(runCo(() => bdrv_co_pwritev_part(native.c, 0, 512, q, 0, BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP)).ret, 0);
    assert.equal(native.calls.map(summary), [['write', 0, 512, 0, BDRV_REQ_FUA]]);
    bdrv_unref(native.bs);

    // The earlier write makes the generations differ, so the emulating flush reaches the disk
    // (7.2 flushes before the FUA write itself bumps write_gen).
    const emulated = open(drv);
    assert.equal(runCo(() => bdrv_co_pwritev_part(emulated.c, 512, 512, q, 0, BDRV_REQ_MAY_UNMAP)).ret, 0);
    assert.equal(runCo(() => bdrv_co_pwritev_part(emulated.c, 0, 512, q, 0, BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP)).ret, 0);
    assert.equal(emulated.calls.map(summary), [
      ['write', 512, 512, 0, 0],
      ['write', 0, 512, 0, 0],
      ['flush', 0, 0, 0, 0],
    ]);
    bdrv_unref(emulated.bs);
  });
}

test.run();
