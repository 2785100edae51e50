// The `file` protocol driver (examples/drivers/file.ts) on real temporary files: opening,
// option handling and QEMU's error messages, I/O through the thread pool of the node's
// AioContext, flush, zero writes, discard, truncate, lengths, block status, O_DIRECT, and a node
// moved to an IOThread. Facts: qemu-block.md 1.6 and 3.4 (file-posix), 2.x for the core's part.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { bdrv_file, type BDRVFileState } from '../../../examples/drivers/file.ts';
import {
  AIO_WAIT_WHILE,
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_EOF,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_O_NO_FLUSH,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  EINVAL,
  EIO,
  EPERM,
  ENOTSUP,
  QEMUIOVector,
  QemuError,
  aio_co_enter,
  aio_get_thread_pool,
  bdrv_co_block_status,
  bdrv_co_truncate,
  bdrv_find_protocol,
  bdrv_get_aio_context,
  bdrv_is_read_only,
  bdrv_try_change_aio_context,
  blk_aio_flush,
  blk_aio_preadv,
  blk_aio_pwrite_zeroes,
  blk_aio_pwritev,
  blk_bs,
  blk_flush,
  blk_getlength,
  blk_new_open,
  blk_pdiscard,
  blk_pread,
  blk_pwrite,
  blk_pwrite_zeroes,
  blk_unref,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_blockalign,
  qemu_coroutine_create,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_iovec_init_buf,
  qemu_vfree,
  type AioContext,
  type BlockBackend,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
  type PreallocMode,
} from '../../../src/index.ts';

import {
  bdrv_create,
  bdrv_get_allocated_file_size,
  qemu_opt_get,
  qemu_opts_create,
  qemu_opts_do_parse,
  qemu_opts_print,
  type QemuOpts,
} from '../../../src/index.ts';

const dir = path.join('/work/main/.tmp-tests', `file-driver-${process.pid}`);
mkdirSync(dir, { recursive: true });
let fileCounter = 0;

/** A new temp file holding `content`; returns its path. */
function tmpFile(content: Uint8Array): string {
  const p = path.join(dir, `img${++fileCounter}.raw`);
  writeFileSync(p, content);
  return p;
}
/** Bytes i & 0xff ^ seed, so distinct files and offsets differ. */
function pattern(n: number, seed = 0): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i & 0xff) ^ seed;
  return b;
}
function fill(n: number, v: number): Uint8Array {
  return new Uint8Array(n).fill(v);
}
function bsOf(blk: BlockBackend): BlockDriverState {
  const bs = blk_bs(blk);
  if (bs === null) throw new Error('no root');
  return bs;
}
/** The message of the QemuError `f` throws (fails the test on anything else). */
function qemuErrorOf(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    if (e instanceof QemuError) return e.message;
    throw e;
  }
  assert.unreachable('expected a QemuError');
  return '';
}
/** Runs coroutine_fn `fn` in `ctx` and waits (bounded by the pool) for its result or exception. */
function runCo<T>(ctx: AioContext, fn: () => CoroutineFn<T>): { value?: T; error?: unknown } {
  const st: { done: boolean; value?: T; error?: unknown } = { done: false };
  const co = qemu_coroutine_create(function* () {
    try {
      st.value = yield* fn();
    } catch (e) {
      st.error = e;
    }
    st.done = true;
  });
  aio_co_enter(ctx, co);
  AIO_WAIT_WHILE(ctx, () => !st.done);
  return st.error === undefined ? { value: st.value as T } : { error: st.error };
}
/** The open flags of fd in this process (octal in /proc/self/fdinfo). */
function fdFlags(fd: number): number {
  const m = /flags:\s+([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  return m ? parseInt(m[1] as string, 8) : -1;
}
const LINUX_O_DIRECT = 0o40000;

test.after(() => {
  rmSync(dir, { recursive: true, force: true });
});

test('3.4 registration: importing the module registers protocol "file" for plain and file: filenames', () => {
  assert.is(bdrv_find_protocol('/some/path'), bdrv_file);
  assert.is(bdrv_find_protocol('file:/some/path'), bdrv_file);
  assert.is(bdrv_file.format_name, 'file');
  assert.is(bdrv_file.protocol_name, 'file');
});

test('3.4 blk_new_open on a path and on a file: prefix (stripped); reads see the file', () => {
  const content = pattern(4096, 0x5a);
  const p = tmpFile(content);
  for (const name of [p, `file:${p}`]) {
    const blk = blk_new_open(name, null, {}, BDRV_O_RDWR);
    const bs = bsOf(blk);
    assert.is(bs.drv, bdrv_file);
    assert.is(bs.filename, p, 'bs.filename is the parsed name, without the prefix');
    assert.is(bdrv_is_read_only(bs), false);
    const buf = new Uint8Array(4096);
    assert.is(blk_pread(blk, 0, 4096, buf, 0), 0);
    assert.equal(buf, content);
    blk_unref(blk);
  }
  // Options form: driver=file,filename=...
  const blk = blk_new_open(null, null, { driver: 'file', filename: p }, 0);
  assert.is(bsOf(blk).drv, bdrv_file);
  assert.is(bdrv_is_read_only(bsOf(blk)), true);
  blk_unref(blk);
});

test('2.3/2.4 unaligned read/write round trips (request_alignment 1 without O_DIRECT) reach the file', () => {
  const p = tmpFile(fill(8192, 0x11));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  assert.is(bsOf(blk).bl.request_alignment, 1);
  const cases: [number, number][] = [
    [0, 1],
    [1, 511],
    [100, 1000],
    [511, 2],
    [4095, 4097],
  ];
  const expect = fill(8192, 0x11);
  let seed = 1;
  for (const [off, len] of cases) {
    const data = pattern(len, seed++);
    assert.is(blk_pwrite(blk, off, len, data, 0), 0, `write ${off} ${len}`);
    expect.set(data, off);
    const back = new Uint8Array(len);
    assert.is(blk_pread(blk, off, len, back, 0), 0);
    assert.equal(back, data, `read back ${off} ${len}`);
  }
  blk_unref(blk);
  assert.equal(new Uint8Array(readFileSync(p)), expect, 'the host file holds exactly what was written');
});

test('1.6 guest memory from qemu_blockalign and multi-element qiovs are used in place by the pool', () => {
  const p = tmpFile(fill(16384, 0));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const bs = bsOf(blk);
  const a = qemu_blockalign(bs, 4096);
  const b = qemu_blockalign(bs, 1000);
  a.set(pattern(4096, 3));
  b.set(pattern(1000, 4));
  const q = new QEMUIOVector();
  q.iov = [a, b, new Uint8Array(24).fill(0xee)]; // the last element is ordinary memory
  q.niov = 3;
  q.size = 4096 + 1000 + 24;
  const done: string[] = [];
  blk_aio_pwritev(blk, 3000, q, 0, (_o, ret) => done.push(`w ${ret}`));
  AIO_WAIT_WHILE(null, () => done.length < 1);
  const r1 = qemu_blockalign(bs, 2048);
  const r2 = new Uint8Array(3072);
  const rq = new QEMUIOVector();
  rq.iov = [r1, r2];
  rq.niov = 2;
  rq.size = 5120;
  blk_aio_preadv(blk, 3000, rq, 0, (_o, ret) => done.push(`r ${ret}`));
  AIO_WAIT_WHILE(null, () => done.length < 2);
  assert.equal(done, ['w 0', 'r 0']);
  const file = new Uint8Array(readFileSync(p));
  const expect = new Uint8Array(5120);
  expect.set(pattern(4096, 3), 0);
  expect.set(pattern(1000, 4), 4096);
  expect.fill(0xee, 5096);
  assert.equal(file.subarray(3000, 8120), expect);
  assert.equal(r1, expect.subarray(0, 2048));
  assert.equal(r2, expect.subarray(2048));
  qemu_vfree(a);
  qemu_vfree(b);
  qemu_vfree(r1);
  blk_unref(blk);
});

test('1.3 blk_aio_* on the file driver: callbacks run after the submit returns, in the node context', () => {
  const p = tmpFile(fill(4096, 0x22));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const main = qemu_get_aio_context();
  const order: string[] = [];
  const cb = (name: string) => (_o: unknown, ret: number) =>
    order.push(`${name} ${ret} ${qemu_get_current_aio_context() === main ? 'main' : 'other'}`);
  const wq = new QEMUIOVector();
  qemu_iovec_init_buf(wq, fill(100, 0x33), 100);
  blk_aio_pwritev(blk, 10, wq, 0, cb('write'));
  order.push('submitted write');
  AIO_WAIT_WHILE(null, () => order.length < 2);
  blk_aio_pwrite_zeroes(blk, 50, 20, 0, cb('zeroes'));
  order.push('submitted zeroes');
  AIO_WAIT_WHILE(null, () => order.length < 4);
  blk_aio_flush(blk, cb('flush'));
  order.push('submitted flush');
  AIO_WAIT_WHILE(null, () => order.length < 6);
  const rbuf = new Uint8Array(120);
  const rq = new QEMUIOVector();
  qemu_iovec_init_buf(rq, rbuf, 120);
  blk_aio_preadv(blk, 0, rq, 0, cb('read'));
  order.push('submitted read');
  AIO_WAIT_WHILE(null, () => order.length < 8);
  assert.equal(order, [
    'submitted write',
    'write 0 main',
    'submitted zeroes',
    'zeroes 0 main',
    'submitted flush',
    'flush 0 main',
    'submitted read',
    'read 0 main',
  ]);
  const expect = fill(120, 0x22);
  expect.fill(0x33, 10, 110);
  expect.fill(0, 50, 70);
  assert.equal(rbuf, expect);
  blk_unref(blk);
});

test('2.8 flush: fdatasync reaches the driver after a write; cache.no-flush (BDRV_O_NO_FLUSH) never', () => {
  const p = tmpFile(fill(1024, 0));
  const orig = bdrv_file.bdrv_co_flush_to_disk!;
  const calls: number[] = [];
  bdrv_file.bdrv_co_flush_to_disk = function* (bs) {
    const r = yield* orig(bs);
    calls.push(r);
    return r;
  };
  try {
    let blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
    assert.is(blk_flush(blk), 0);
    assert.equal(calls, [], 'nothing written since open: no flush reaches the driver');
    assert.is(blk_pwrite(blk, 0, 4, fill(4, 1), 0), 0);
    assert.is(blk_flush(blk), 0);
    assert.equal(calls, [0], 'one fdatasync, which succeeded');
    blk_unref(blk);
    calls.length = 0;
    blk = blk_new_open(p, null, { 'cache.no-flush': 'on' }, BDRV_O_RDWR);
    assert.ok(bsOf(blk).open_flags & BDRV_O_NO_FLUSH);
    assert.is(blk_pwrite(blk, 0, 4, fill(4, 2), 0), 0);
    assert.is(blk_flush(blk), 0);
    assert.equal(calls, [], 'cache.no-flush=on: the core never calls the driver');
    blk_unref(blk);
  } finally {
    bdrv_file.bdrv_co_flush_to_disk = orig;
  }
  assert.equal([...readFileSync(p).subarray(0, 5)], [2, 2, 2, 2, 0]);
});

test('1.6/2.5 zero writes: written through the pool; NO_FALLBACK is -ENOTSUP (no fallocate in Node)', () => {
  const p = tmpFile(fill(4096, 0xff));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  assert.is(blk_pwrite_zeroes(blk, 100, 3000, 0), 0);
  assert.is(blk_pwrite_zeroes(blk, 0, 10, BDRV_REQ_NO_FALLBACK), -ENOTSUP);
  blk_unref(blk);
  const expect = fill(4096, 0xff);
  expect.fill(0, 100, 3100);
  assert.equal(new Uint8Array(readFileSync(p)), expect);
  // The driver itself (what the block layer calls) answers NO_FALLBACK with -ENOTSUP.
  const blk2 = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const bs = bsOf(blk2);
  const r = runCo(qemu_get_aio_context(), () => bdrv_file.bdrv_co_pwrite_zeroes!(bs, 0, 10, BDRV_REQ_NO_FALLBACK));
  assert.equal(r, { value: -ENOTSUP });
  blk_unref(blk2);
  assert.equal(new Uint8Array(readFileSync(p)), expect, 'nothing was written');
});

test('2.9 discard: the driver answers -ENOTSUP (no punch-hole); the block layer returns 0, data stays', () => {
  const p = tmpFile(fill(4096, 0x44));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR | BDRV_O_UNMAP);
  const bs = bsOf(blk);
  assert.equal(
    runCo(qemu_get_aio_context(), () => bdrv_file.bdrv_co_pdiscard!(bs, 0, 4096)),
    { value: -ENOTSUP },
  );
  assert.is(blk_pdiscard(blk, 0, 4096), 0);
  blk_unref(blk);
  assert.equal(new Uint8Array(readFileSync(p)), fill(4096, 0x44));
});

test('2.1 getlength is sector-granular (1000 bytes -> 1024), fixed at open as QEMU 7.2\'s file driver', () => {
  const p = tmpFile(fill(1000, 0x55));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  assert.is(blk_getlength(blk), 1024);
  const buf = fill(30, 0x99);
  assert.is(blk_pread(blk, 990, 30, buf, 0), 0);
  assert.equal(buf, new Uint8Array([...fill(10, 0x55), ...fill(20, 0)]), 'past the end of the file reads zeroes');
  // qemu-io 7.2.22 on a 1000-byte file grown to 6000 bytes by another process meanwhile:
  // `length` still says 1 KiB and `read 4000 100` fails with Input/output error.
  appendFileSync(p, fill(5000, 1));
  assert.is(blk_getlength(blk), 1024);
  assert.is(blk_pread(blk, 4000, 100, new Uint8Array(100), 0), -EIO);
  blk_unref(blk);
  const reopened = blk_new_open(p, null, {}, 0);
  assert.is(blk_getlength(reopened), 6144, 'a new open sees 6000 bytes');
  blk_unref(reopened);
});

test('2.10 truncate: ftruncate through the pool grows and shrinks; falloc/full grow by writing zeroes and never shrink, metadata refused', () => {
  const p = tmpFile(fill(1000, 0x66));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const bs = bsOf(blk);
  const child = blk.root!;
  const ctx = qemu_get_aio_context();
  const trunc = (size: number, mode: PreallocMode) => runCo(ctx, () => bdrv_co_truncate(child, size, false, mode, 0));
  assert.equal(trunc(8192, 'off'), { value: 0 });
  assert.is(readFileSync(p).length, 8192);
  assert.is(blk_getlength(blk), 8192);
  const buf = fill(200, 0x99);
  assert.is(blk_pread(blk, 900, 200, buf, 0), 0);
  assert.equal(buf, new Uint8Array([...fill(100, 0x66), ...fill(100, 0)]), 'the grown part reads as zeroes');
  assert.equal(trunc(600, 'off'), { value: 0 });
  assert.is(readFileSync(p).length, 600);
  assert.is(blk_getlength(blk), 1024);
  const r = trunc(4096, 'metadata');
  assert.ok(r.error instanceof QemuError);
  assert.is((r.error as QemuError).message, 'Unsupported preallocation mode: metadata');
  assert.is(readFileSync(p).length, 600, 'a refused truncation changes nothing');
  // QEMU's file-posix grows with falloc/full; without fallocate both write the new area's zeroes.
  assert.equal(trunc(4096, 'falloc'), { value: 0 });
  assert.equal(trunc(8192, 'full'), { value: 0 });
  const grown = readFileSync(p);
  assert.is(grown.length, 8192);
  assert.ok(grown.subarray(0, 600).every((x) => x === 0x66) && grown.subarray(600).every((x) => x === 0));
  assert.ok(statSync(p).blocks * 512 >= 8192, 'the new area is allocated');
  const shrink = trunc(600, 'full');
  assert.is((shrink.error as QemuError).message, 'Cannot use preallocation for shrinking files');
  assert.is(readFileSync(p).length, 8192, 'a refused shrink changes nothing');
  assert.equal(trunc(600, 'off'), { value: 0 });
  assert.is(bs.in_flight, 0);
  blk_unref(blk);
});

test('2.11 block status: DATA|OFFSET_VALID over the whole range, map = offset, file = bs (no SEEK_DATA)', () => {
  const p = tmpFile(fill(8192, 0)); // all zeroes, still reported as data
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const bs = bsOf(blk);
  const ctx = qemu_get_aio_context();
  const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
  // The want_zero=false query comes first: a want_zero DATA answer fills the node's
  // block-status cache (QEMU 7.2), which would then answer [4096, ...) only up to 5100.
  assert.equal(runCo(ctx, () => bdrv_co_block_status(bs, false, 4096, 10000, out)), {
    value: BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_EOF,
  });
  assert.equal(out, { pnum: 4096, map: 4096, file: bs });
  assert.equal(runCo(ctx, () => bdrv_co_block_status(bs, true, 100, 5000, out)), {
    value: BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED,
  });
  assert.equal(out, { pnum: 5000, map: 100, file: bs });
  blk_unref(blk);
});

test('read-only open (flags without BDRV_O_RDWR, or read-only=on): writes -EPERM, truncate refused', () => {
  const p = tmpFile(fill(2048, 0x77));
  for (const [opts, flags] of [
    [{}, 0],
    [{ 'read-only': 'on' }, BDRV_O_RDWR],
  ] as const) {
    const blk = blk_new_open(p, null, opts, flags);
    const bs = bsOf(blk);
    assert.is(bdrv_is_read_only(bs), true);
    assert.is(fdFlags((bs.opaque as BDRVFileState).fd) & 3, 0, 'the descriptor is O_RDONLY');
    assert.is(blk_pwrite(blk, 0, 10, fill(10, 1), 0), -EPERM);
    assert.is(blk_pwrite_zeroes(blk, 0, 10, 0), -EPERM);
    const buf = new Uint8Array(10);
    assert.is(blk_pread(blk, 0, 10, buf, 0), 0);
    assert.equal(buf, fill(10, 0x77));
    const r = runCo(qemu_get_aio_context(), () => bdrv_co_truncate(blk.root!, 4096, false, 'off', 0));
    assert.ok(r.error instanceof QemuError && r.error.message === 'Image is read-only');
    blk_unref(blk);
  }
  assert.equal(new Uint8Array(readFileSync(p)), fill(2048, 0x77));
});

test('open errors: QEMU 7.2 messages for a missing file, a directory, bad aio/locking values', () => {
  const p = tmpFile(fill(512, 0));
  const missing = path.join(dir, 'nosuch.img');
  assert.is(qemuErrorOf(() => blk_new_open(missing, null, {}, BDRV_O_RDWR)), `Could not open '${missing}': No such file or directory`);
  assert.is(
    qemuErrorOf(() => blk_new_open(null, null, { driver: 'file', filename: missing }, 0)),
    `Could not open '${missing}': No such file or directory`,
  );
  // A directory: read-write open fails in open(2); read-only opens, then is not a regular file.
  assert.is(qemuErrorOf(() => blk_new_open(dir, null, {}, BDRV_O_RDWR)), `Could not open '${dir}': Is a directory`);
  assert.is(qemuErrorOf(() => blk_new_open(dir, null, {}, 0)), `'file' driver requires '${dir}' to be a regular file`);
  assert.is(qemuErrorOf(() => blk_new_open(`file:${dir}`, null, {}, 0)), `'file' driver requires '${dir}' to be a regular file`);
  // qapi_enum_parse's message for values outside the enum.
  assert.is(qemuErrorOf(() => blk_new_open(p, null, { aio: 'foo' }, 0)), 'invalid parameter value: foo');
  assert.is(qemuErrorOf(() => blk_new_open(p, null, { locking: 'foo' }, 0)), 'invalid parameter value: foo');
  // Valid in QEMU, impossible here: refused, naming the value.
  assert.is(
    qemuErrorOf(() => blk_new_open(p, null, { aio: 'native' }, 0)),
    "aio=native is not supported by aioco's 'file' driver: only aio=threads is available",
  );
  assert.is(
    qemuErrorOf(() => blk_new_open(p, null, { aio: 'io_uring' }, 0)),
    "aio=io_uring is not supported by aioco's 'file' driver: only aio=threads is available",
  );
  assert.is(
    qemuErrorOf(() => blk_new_open(p, null, { locking: 'on' }, 0)),
    "locking=on is not supported by aioco's 'file' driver: Node.js offers no file locks (OFD or POSIX); use locking=off or locking=auto",
  );
  assert.is(
    qemuErrorOf(() => blk_new_open(p, null, { 'drop-cache': 'off' }, 0)),
    "Block protocol 'file' doesn't support the option 'drop-cache'",
  );
  assert.is(qemuErrorOf(() => blk_new_open(null, null, { driver: 'file' }, 0)), "The 'file' block driver requires a file name");
});

test('options accepted: aio=threads, locking=off and locking=auto (no lock taken)', () => {
  const p = tmpFile(fill(512, 0x12));
  for (const opts of [{ aio: 'threads' }, { locking: 'off' }, { locking: 'auto' }, { aio: 'threads', locking: 'auto' }]) {
    const blk = blk_new_open(p, null, opts, BDRV_O_RDWR);
    assert.is(blk_pwrite(blk, 0, 1, fill(1, 0x34), 0), 0);
    const b = new Uint8Array(2);
    assert.is(blk_pread(blk, 0, 2, b, 0), 0);
    assert.equal([...b], [0x34, 0x12]);
    assert.is((bsOf(blk).opaque as BDRVFileState).locking, opts.locking ?? 'auto');
    blk_unref(blk);
  }
});

test('close releases the descriptor; a failed open leaves none behind', () => {
  const p = tmpFile(fill(512, 0));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const fd = (bsOf(blk).opaque as BDRVFileState).fd;
  assert.is(readlinkSync(`/proc/self/fd/${fd}`), p);
  blk_unref(blk);
  assert.ok(!existsSync(`/proc/self/fd/${fd}`) || readlinkSync(`/proc/self/fd/${fd}`) !== p, 'fd closed');
  const before = fdsUnder(dir);
  qemuErrorOf(() => blk_new_open(dir, null, {}, 0)); // opened, then refused as not a regular file
  qemuErrorOf(() => blk_new_open(p, null, { 'drop-cache': 'off' }, 0)); // opened, refused by the core after open
  assert.equal(fdsUnder(dir), before, 'no descriptor of the test directory leaked');
});
/** This process's descriptors open on `root` or below, as "fd -> path" (sorted). */
function fdsUnder(root: string): string[] {
  const out: string[] = [];
  for (const f of readdirSync('/proc/self/fd')) {
    const target = readlinkSafe(f);
    if (target === root || target.startsWith(root + '/')) out.push(`${f} -> ${target}`);
  }
  return out.sort();
}
function readlinkSafe(f: string): string {
  try {
    return readlinkSync(`/proc/self/fd/${f}`);
  } catch {
    return '';
  }
}

test('cache.direct=on: O_DIRECT descriptor, 512/4096 alignment, unaligned I/O through the core RMW', () => {
  const content = pattern(16384, 0x0f);
  const p = tmpFile(content);
  let blk: BlockBackend;
  try {
    blk = blk_new_open(p, null, { 'cache.direct': 'on' }, BDRV_O_RDWR);
  } catch (e) {
    if (e instanceof QemuError && e.message === `Could not open '${p}': filesystem does not support O_DIRECT`) {
      console.log(`SKIP cache.direct=on round trip: ${e.message}`);
      return;
    }
    throw e;
  }
  const bs = bsOf(blk);
  const s = bs.opaque as BDRVFileState;
  assert.ok(fdFlags(s.fd) & LINUX_O_DIRECT, 'the descriptor has O_DIRECT');
  // The first O_DIRECT open of a file of >= 8 KiB measured the guest-memory phase through a
  // read-only O_DIRECT descriptor of its own, kept open (guest memory reuses it for new slabs).
  const probeFds = () =>
    fdsUnder(dir)
      .map((l) => Number(l.split(' ')[0]))
      .filter((fd) => fd !== s.fd && (fdFlags(fd) & (LINUX_O_DIRECT | 3)) === LINUX_O_DIRECT);
  const probes = probeFds();
  assert.is(probes.length, 1, 'one probe descriptor');
  const again = blk_new_open(p, null, { 'cache.direct': 'on' }, 0);
  assert.equal(probeFds().filter((fd) => fd !== (bsOf(again).opaque as BDRVFileState).fd), probes, 'probed only once');
  blk_unref(again);
  const align = bs.bl.request_alignment;
  assert.ok(align === 512 || align === 4096, `request_alignment ${align}`);
  assert.is(bs.bl.opt_mem_alignment, 4096);
  const expect = content.slice();
  const writes: [number, number][] = [
    [1, 3],
    [700, 1000],
    [4095, 2],
    [8192, 4096],
  ];
  let seed = 0x40;
  for (const [off, len] of writes) {
    const data = pattern(len, seed++);
    assert.is(blk_pwrite(blk, off, len, data, 0), 0, `write ${off} ${len}`);
    expect.set(data, off);
    const back = new Uint8Array(len);
    assert.is(blk_pread(blk, off, len, back, 0), 0);
    assert.equal(back, data);
  }
  // Guest memory from qemu_blockalign, aligned request: no padding needed.
  const g = qemu_blockalign(bs, 4096);
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, g, 4096);
  const done: number[] = [];
  blk_aio_preadv(blk, 4096, q, 0, (_o, ret) => done.push(ret));
  AIO_WAIT_WHILE(null, () => done.length < 1);
  assert.equal(done, [0]);
  assert.equal(g, expect.subarray(4096, 8192));
  qemu_vfree(g);
  assert.is(blk_flush(blk), 0);
  blk_unref(blk);
  assert.equal(new Uint8Array(readFileSync(p)), expect);
});

test('cache.direct=on on a file whose size is not a multiple of the alignment reads zeroes past EOF', () => {
  const p = tmpFile(fill(1000, 0x3c));
  let blk: BlockBackend;
  try {
    blk = blk_new_open(p, null, { 'cache.direct': 'on' }, 0);
  } catch (e) {
    if (e instanceof QemuError && e.message.endsWith('filesystem does not support O_DIRECT')) {
      console.log(`SKIP cache.direct=on short file: ${e.message}`);
      return;
    }
    throw e;
  }
  assert.is(blk_getlength(blk), 1024);
  const buf = fill(100, 0x99);
  assert.is(blk_pread(blk, 950, 74, buf, 0), 0);
  assert.equal(buf.subarray(0, 74), new Uint8Array([...fill(50, 0x3c), ...fill(24, 0)]));
  blk_unref(blk);
});

test('2.12 a node moved to an IOThread does its I/O through that context\'s pool, and back', () => {
  const p = tmpFile(fill(4096, 0));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const bs = bsOf(blk);
  const t = iothread_create('file-io');
  const ctx = iothread_get_aio_context(t);
  const main = qemu_get_aio_context();
  const name = () => (qemu_get_current_aio_context() === ctx ? 'iothread' : qemu_get_current_aio_context() === main ? 'main' : '?');
  const seen: string[] = [];
  const orig = bdrv_file.bdrv_co_pwritev!;
  // Steps the driver's coroutine_fn by hand: after its first step it has submitted to a pool and
  // yielded, so the pools' outstanding counts (ThreadPool.count) show which pool it used.
  bdrv_file.bdrv_co_pwritev = function* (b, offset, bytes, qiov, flags) {
    seen.push(`submit ${name()}`);
    const g = orig(b, offset, bytes, qiov, flags);
    let r = g.next();
    seen.push(`pools: iothread ${aio_get_thread_pool(ctx).count}, main ${aio_get_thread_pool(main).count}`);
    while (!r.done) {
      const v: unknown = yield r.value;
      r = g.next(v);
    }
    seen.push(`resume ${name()}`);
    return r.value;
  };
  try {
    assert.is(bdrv_try_change_aio_context(bs, ctx), 0);
    assert.is(bdrv_get_aio_context(bs), ctx);
    const q = new QEMUIOVector();
    qemu_iovec_init_buf(q, fill(512, 0xab), 512);
    blk_aio_pwritev(blk, 512, q, 0, (_o, ret) => seen.push(`cb ${ret} ${name()}`));
    AIO_WAIT_WHILE(null, () => seen.length < 4);
    assert.equal(seen, ['submit iothread', 'pools: iothread 1, main 0', 'resume iothread', 'cb 0 iothread']);
    seen.length = 0;
    assert.is(bdrv_try_change_aio_context(bs, main), 0);
    qemu_iovec_init_buf(q, fill(512, 0xcd), 512);
    blk_aio_pwritev(blk, 1024, q, 0, (_o, ret) => seen.push(`cb ${ret} ${name()}`));
    AIO_WAIT_WHILE(null, () => seen.length < 4);
    assert.equal(seen, ['submit main', 'pools: iothread 0, main 1', 'resume main', 'cb 0 main']);
  } finally {
    bdrv_file.bdrv_co_pwritev = orig;
    blk_unref(blk);
    iothread_destroy(t);
  }
  const file = new Uint8Array(readFileSync(p));
  assert.equal(file.subarray(512, 1536), new Uint8Array([...fill(512, 0xab), ...fill(512, 0xcd)]));
});

test('bytes not matching the qiov size is -EINVAL (driver contract check)', () => {
  const p = tmpFile(fill(512, 0));
  const blk = blk_new_open(p, null, {}, BDRV_O_RDWR);
  const bs = bsOf(blk);
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(10), 10);
  const ctx = qemu_get_aio_context();
  assert.equal(runCo(ctx, () => bdrv_file.bdrv_co_preadv!(bs, 0, 20, q, 0)), { value: -EINVAL });
  assert.equal(runCo(ctx, () => bdrv_file.bdrv_co_pwritev!(bs, 0, 20, q, 0)), { value: -EINVAL });
  blk_unref(blk);
});


// --- Image creation (QEMU 7.2 file-posix.c raw_co_create_opts / raw_co_create) -----------------

mkdirSync('/tmp/t1-core-tests', { recursive: true });
const createDir = mkdtempSync('/tmp/t1-core-tests/file-create-');
test.after(() => rmSync(createDir, { recursive: true, force: true }));
let createCounter = 0;
/** A new path in createDir, optionally holding `content`. */
function createPath(content?: Uint8Array): string {
  const p = path.join(createDir, `c${++createCounter}.img`);
  if (content) writeFileSync(p, content);
  return p;
}

/** File create options parsed from `params` against the driver's create_opts. */
function createOpts(params: string): QemuOpts {
  const o = qemu_opts_create(bdrv_file.create_opts!);
  qemu_opts_do_parse(o, params, null);
  return o;
}
/** Host bytes of `p` as the driver reports them for an open node. */
function allocated(p: string): number {
  const blk = blk_new_open(p, null, {}, 0);
  try {
    return bdrv_get_allocated_file_size(bsOf(blk));
  } finally {
    blk_unref(blk);
  }
}

test('create: create_opts are QEMU 7.2\'s file_create_opts (names, types, order)', () => {
  assert.equal(
    bdrv_file.create_opts!.desc.map((d) => `${d.name}:${d.type}`),
    ['size:size', 'nocow:bool', 'preallocation:string', 'extent_size_hint:size'],
  );
  assert.is(qemu_opt_get(createOpts(''), 'preallocation'), null);
});

test('create: the file gets the size asked, rounded up to 512; no size is 0; mode 0644 (umask applied)', () => {
  const sizes: [string, number][] = [
    ['', 0],
    ['size=0', 0],
    ['size=1', 512],
    ['size=1000', 1024],
    ['size=4096', 4096],
    ['size=1M', 1 << 20],
  ];
  for (const [params, want] of sizes) {
    const p = createPath();
    assert.is(bdrv_create(bdrv_file, p, createOpts(params)), 0, params);
    assert.is(statSync(p).size, want, params);
    assert.is(statSync(p).mode & 0o777, 0o644 & ~process.umask(), params);
  }
  // The file: prefix is stripped, as for opening.
  const p = createPath();
  assert.is(bdrv_create(bdrv_file, `file:${p}`, createOpts('size=512')), 0);
  assert.is(statSync(p).size, 512);
});

test('create: an existing file is reused and emptied (its old data reads as zeroes)', () => {
  const p = createPath(fill(8192, 0x5a));
  assert.is(bdrv_create(bdrv_file, p, createOpts('size=4096')), 0);
  assert.equal(new Uint8Array(readFileSync(p)), fill(4096, 0));
  const q = createPath(fill(100, 0x5a));
  assert.is(bdrv_create(bdrv_file, q, createOpts('size=1k')), 0);
  assert.equal(new Uint8Array(readFileSync(q)), fill(1024, 0));
});

test('create: preallocation full/falloc allocate the blocks (bdrv_get_allocated_file_size), off leaves a sparse file', () => {
  const size = 1 << 20;
  const off = createPath();
  assert.is(bdrv_create(bdrv_file, off, createOpts(`size=${size},preallocation=off`)), 0);
  for (const mode of ['full', 'falloc']) {
    const p = createPath();
    assert.is(bdrv_create(bdrv_file, p, createOpts(`size=${size},preallocation=${mode}`)), 0, mode);
    assert.is(statSync(p).size, size, mode);
    const a = allocated(p);
    assert.ok(a >= size, `${mode}: allocated ${a}`);
    assert.ok(allocated(off) < a, `off: ${allocated(off)} < ${a}`);
    assert.equal(new Uint8Array(readFileSync(p)), fill(size, 0));
  }
});

test("create: QEMU's messages: bad preallocation (nothing created), metadata (file created, empty), missing directory", () => {
  const bad = createPath();
  assert.is(qemuErrorOf(() => bdrv_create(bdrv_file, bad, createOpts('size=1M,preallocation=xyz'))), 'invalid parameter value: xyz');
  assert.is(existsSync(bad), false);
  const meta = createPath();
  assert.is(qemuErrorOf(() => bdrv_create(bdrv_file, meta, createOpts('size=1M,preallocation=metadata'))), 'Unsupported preallocation mode: metadata');
  assert.is(statSync(meta).size, 0);
  assert.is(qemuErrorOf(() => bdrv_create(bdrv_file, '/nonexist/x', createOpts('size=1M'))), "Could not create '/nonexist/x': No such file or directory");
  assert.is(qemuErrorOf(() => bdrv_create(bdrv_file, createDir, createOpts('size=1M'))), `Could not create '${createDir}': Is a directory`);
});

test('create: nocow and extent_size_hint are accepted and consumed; the options print as qemu-img prints them', () => {
  const opts = createOpts('extent_size_hint=1k,nocow=yes,size=1M');
  // qemu-img 7.2 create -f file -o extent_size_hint=1k,nocow=yes x 1M prints this tail.
  assert.is(qemu_opts_print(opts, ' '), 'size=1048576 nocow=yes extent_size_hint=1024');
  const p = createPath();
  assert.is(bdrv_create(bdrv_file, p, opts), 0);
  assert.equal(opts.opts.map((o) => o.name), [], 'every option read with _del');
  assert.is(statSync(p).size, 1 << 20);
});

test.run();
