// Tracked requests (QEMU 7.2 block/io.c tracked_request_begin/end, bdrv_wait_serialising_requests):
// the intrusive per-node list, the wait queue made only when a request waits, and the write
// preparation that is skipped when it has nothing to refuse or wait for.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  bdrv_co_preadv,
  bdrv_co_pwritev,
  bdrv_open,
  bdrv_unref,
  qemu_get_aio_context,
  qemu_iovec_init_buf,
  BdrvChild,
  BlockDriverState,
  QEMUIOVector,
  BDRV_O_RDWR,
  BDRV_REQ_SERIALISING,
  EPERM,
} from '../../src/index.ts';
import {
  BdrvTrackedRequest,
  BdrvTrackedRequestList,
  tracked_request_begin,
  tracked_request_end,
} from '../../src/block/tracked-request.ts';
import { ensureRegistered, makeProto, releaseOne, startCo, st } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('tqp'));

function child(bs: BlockDriverState): BdrvChild {
  return new BdrvChild(bs, 'test', 0, null, {});
}
function qiov(n: number, fill = 0): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(n).fill(fill), n);
  return q;
}
function pollSome(): void {
  for (let i = 0; i < 20 && aio_poll(qemu_get_aio_context(), false); i++) {}
}
function describe(list: BdrvTrackedRequestList): string[] {
  return [...list].map((r) => `${r.type} ${r.offset} ${r.bytes}`);
}

test('BdrvTrackedRequestList: oldest first, add is idempotent, delete says whether it removed', () => {
  const bs = new BlockDriverState();
  const list = new BdrvTrackedRequestList();
  const a = new BdrvTrackedRequest(bs, 0, 512, 'read');
  const b = new BdrvTrackedRequest(bs, 512, 512, 'write');
  const c = new BdrvTrackedRequest(bs, 1024, 512, 'discard');
  list.add(a).add(b).add(c);
  list.add(b);
  assert.equal(describe(list), ['read 0 512', 'write 512 512', 'discard 1024 512']);
  assert.is(list.size, 3);
  assert.is(list.has(b), true);

  assert.is(list.delete(b), true);
  assert.is(list.delete(b), false);
  assert.is(list.has(b), false);
  assert.equal(describe(list), ['read 0 512', 'discard 1024 512']);
  // A request in another list is not this list's to remove.
  const other = new BdrvTrackedRequestList();
  other.add(b);
  assert.is(list.delete(b), false);
  assert.is(list.add(b).size, 2, 'b stays in the list that holds it');
  assert.equal(describe(other), ['write 512 512']);

  assert.is(list.delete(c), true);
  assert.is(list.delete(a), true);
  assert.equal([describe(list), list.size], [[], 0]);
  list.add(c);
  assert.equal(describe(list), ['discard 1024 512']);
});

test('BdrvTrackedRequestList: the request being visited may be removed; the walk goes on', () => {
  const bs = new BlockDriverState();
  const list = new BdrvTrackedRequestList();
  const reqs = [0, 1, 2, 3].map((i) => new BdrvTrackedRequest(bs, i * 512, 512, 'read'));
  for (const r of reqs) list.add(r);
  const seen: number[] = [];
  for (const r of list) {
    seen.push(r.offset);
    if (r.offset % 1024 === 0) list.delete(r);
  }
  assert.equal(seen, [0, 512, 1024, 1536]);
  assert.equal(describe(list), ['read 512 512', 'read 1536 512']);
});

test('tracked_request_begin/end keep the node list; the wait queue exists only once someone waited', () => {
  const bs = bdrv_open(null, { driver: 'tqp', size: 4096 }, BDRV_O_RDWR);
  const r1 = tracked_request_begin(bs, 0, 512, 'read');
  const r2 = tracked_request_begin(bs, 512, 512, 'write');
  assert.equal(describe(bs.tracked_requests), ['read 0 512', 'write 512 512']);
  assert.equal([r1.wait_queue, r2.wait_queue], [null, null]);
  tracked_request_end(r1);
  assert.equal(describe(bs.tracked_requests), ['write 512 512']);
  assert.is(r1.wait_queue, null);
  tracked_request_end(r2);
  assert.is(bs.tracked_requests.size, 0);
  bdrv_unref(bs);
});

test('2.7 a read overlapping a serialising write waits on the write\'s queue and runs when the write ends', () => {
  const bs = bdrv_open(null, { driver: 'tqp', size: 4096, align: 512, mode: 'hold' }, BDRV_O_RDWR);
  const c = child(bs);
  // Unaligned: read-modify-write, serialising over [0, 512); its head read is held.
  const w = startCo(() => bdrv_co_pwritev(c, 100, 100, qiov(100, 7), 0));
  assert.equal(st(bs).log, ['read 0 512 0']);
  const wreq = bs.tracked_requests.head!;
  assert.equal([wreq.type, wreq.serialising, wreq.overlap_offset, wreq.overlap_bytes], ['write', true, 0, 512]);
  assert.is(wreq.wait_queue, null, 'nobody has waited yet');

  // Outside the range: runs at once. Inside it: waits, which makes the queue.
  st(bs).mode = 'sync';
  const outside = startCo(() => bdrv_co_preadv(c, 1024, 512, qiov(512), 0));
  assert.equal([outside.done, outside.ret], [true, 0]);
  assert.is(wreq.wait_queue, null, 'a request that did not conflict made no queue');
  const inside = startCo(() => bdrv_co_preadv(c, 0, 512, qiov(512), 0));
  assert.is(inside.done, false);
  assert.ok(wreq.wait_queue !== null && wreq.wait_queue.head !== null, 'the reader waits on the write\'s queue');
  assert.equal(describe(bs.tracked_requests), ['write 0 512', 'read 0 512']);

  // The write finishes: its head read, then its write (sync now); then the reader goes.
  assert.is(releaseOne(bs), true);
  pollSome();
  assert.equal([w.done, w.ret, inside.done, inside.ret], [true, 0, true, 0]);
  assert.equal(st(bs).log, ['read 0 512 0', 'read 1024 512 0', 'write 0 512 0', 'read 0 512 0']);
  assert.is(wreq.wait_queue!.head, null, 'the queue was emptied');
  assert.equal([bs.tracked_requests.size, bs.serialising_in_flight, bs.in_flight], [0, 0, 0]);
  assert.equal([...st(bs).data.subarray(98, 202)], [0, 0, ...new Array(100).fill(7), 0, 0]);
  bdrv_unref(bs);
});

test('2.4 write preparation still refuses read-only nodes and serialises BDRV_REQ_SERIALISING writes', () => {
  const ro = bdrv_open(null, { driver: 'tqp', size: 4096 }, 0);
  const r = startCo(() => bdrv_co_pwritev(child(ro), 0, 512, qiov(512), 0));
  assert.equal([r.done, r.ret], [true, -EPERM]);
  assert.equal(st(ro).log, []);
  assert.is(ro.tracked_requests.size, 0);
  bdrv_unref(ro);

  const bs = bdrv_open(null, { driver: 'tqp', size: 4096, mode: 'hold' }, BDRV_O_RDWR);
  const c = child(bs);
  const plain = startCo(() => bdrv_co_pwritev(c, 0, 512, qiov(512, 1), 0));
  assert.equal(st(bs).log, ['write 0 512 0']);
  // A serialising write over the held one waits before reaching the driver.
  const ser = startCo(() => bdrv_co_pwritev(c, 256, 512, qiov(512, 2), BDRV_REQ_SERIALISING));
  assert.is(ser.done, false);
  assert.equal(st(bs).log, ['write 0 512 0']);
  assert.is(bs.serialising_in_flight, 1);
  // A plain write elsewhere meets a serialising request in flight but no conflict: it goes on.
  const far = startCo(() => bdrv_co_pwritev(c, 2048, 512, qiov(512, 3), 0));
  assert.equal(st(bs).log, ['write 0 512 0', 'write 2048 512 0']);
  assert.is(releaseOne(bs), true);
  pollSome();
  assert.equal(st(bs).log, ['write 0 512 0', 'write 2048 512 0', 'write 256 512 0']);
  while (releaseOne(bs)) pollSome();
  assert.equal([plain.ret, ser.ret, far.ret], [0, 0, 0]);
  assert.equal([bs.tracked_requests.size, bs.serialising_in_flight, bs.in_flight], [0, 0, 0]);
  assert.equal([st(bs).data[0], st(bs).data[255], st(bs).data[256], st(bs).data[767], st(bs).data[768], st(bs).data[2048]], [1, 1, 2, 2, 0, 3]);
  bdrv_unref(bs);
});

test.run();
