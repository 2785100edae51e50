// Block status (qemu-block.md 2.11; QEMU 7.2 block/io.c bdrv_co_block_status,
// bdrv_co_common_block_status_above, bdrv_co_is_allocated).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_co_block_status,
  bdrv_co_block_status_above,
  bdrv_co_is_allocated,
  bdrv_co_pwrite_zeroes,
  bdrv_open,
  bdrv_unref,
  bdrv_find_node,
  BdrvChild,
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_EOF,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_RAW,
  BDRV_BLOCK_RECURSE,
  BDRV_BLOCK_ZERO,
  BDRV_O_RDWR,
  type BlockDriverState,
  type BlockStatusOut,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, runCo, st } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('bsp', { blockStatus: true }));
ensureRegistered(makeProto('bspn'));
ensureRegistered(makeFormat('bsf', { blockStatus: true, supportsBacking: true }));
ensureRegistered(makeFormat('bsfn'));
ensureRegistered(makeFormat('bsfilter', { filter: true }));

const DATA = BDRV_BLOCK_DATA;
const ZERO = BDRV_BLOCK_ZERO;
const OV = BDRV_BLOCK_OFFSET_VALID;
const ALLOC = BDRV_BLOCK_ALLOCATED;
const EOF = BDRV_BLOCK_EOF;

interface Res {
  ret: number;
  pnum: number;
  map: number;
  file: string | null;
}
function name(bs: BlockDriverState | null): string | null {
  return bs ? bs.node_name : null;
}
function status(bs: BlockDriverState, want_zero: boolean, offset: number, bytes: number): Res {
  const out: BlockStatusOut = { pnum: -1, map: -1, file: null };
  const r = runCo(() => bdrv_co_block_status(bs, want_zero, offset, bytes, out));
  if (r.err) throw r.err;
  return { ret: r.ret!, pnum: out.pnum, map: out.map, file: name(out.file) };
}
function above(bs: BlockDriverState, base: BlockDriverState | null, offset: number, bytes: number): Res {
  const out: BlockStatusOut = { pnum: -1, map: -1, file: null };
  const r = runCo(() => bdrv_co_block_status_above(bs, base, offset, bytes, out));
  if (r.err) throw r.err;
  return { ret: r.ret!, pnum: out.pnum, map: out.map, file: name(out.file) };
}
function allocated(bs: BlockDriverState, offset: number, bytes: number): [number, number] {
  const out = { pnum: -1 };
  const r = runCo(() => bdrv_co_is_allocated(bs, offset, bytes, out));
  if (r.err) throw r.err;
  return [r.ret!, out.pnum];
}

let n = 0;
function proto(drv: string, opts: Record<string, unknown> = {}): BlockDriverState {
  return bdrv_open(null, { driver: drv, 'node-name': `p${++n}`, ...opts }, BDRV_O_RDWR);
}

test('2.11 offset >= length is EOF with pnum 0 and does not ask the driver; bytes 0 is 0', () => {
  const bs = proto('bsp');
  assert.equal(status(bs, true, 4096, 512), { ret: EOF, pnum: 0, map: 0, file: null });
  assert.equal(status(bs, true, 9000, 1), { ret: EOF, pnum: 0, map: 0, file: null });
  assert.equal(status(bs, true, 100, 0), { ret: 0, pnum: 0, map: 0, file: null });
  assert.equal(st(bs).log, []);
  bdrv_unref(bs);
});

test('2.11 bytes are clamped to the length; the driver answer gets ALLOCATED and EOF', () => {
  const bs = proto('bsp');
  assert.equal(status(bs, true, 4000, 1000), { ret: DATA | OV | ALLOC | EOF, pnum: 96, map: 4000, file: bs.node_name });
  assert.equal(st(bs).log, ['status 1 4000 96']);
  bdrv_unref(bs);
});

test('2.11 protocol without callback: DATA|ALLOCATED|OFFSET_VALID, map = offset, file = itself', () => {
  const bs = proto('bspn');
  assert.equal(status(bs, true, 100, 200), { ret: DATA | ALLOC | OV, pnum: 200, map: 100, file: bs.node_name });
  assert.equal(status(bs, false, 4000, 500), { ret: DATA | ALLOC | OV | EOF, pnum: 96, map: 4000, file: bs.node_name });
  bdrv_unref(bs);
});

test('2.11 format without callback (not a filter): DATA|ALLOCATED, no OFFSET_VALID, no file', () => {
  const bs = bdrv_open(null, { driver: 'bsfn', 'file.driver': 'bspn' }, BDRV_O_RDWR);
  assert.equal(status(bs, true, 0, 1024), { ret: DATA | ALLOC, pnum: 1024, map: 0, file: null });
  bdrv_unref(bs);
});

test('2.11 the driver sees the request rounded out to request_alignment; pnum and map are clamped back', () => {
  const bs = proto('bsp', { align: 512 });
  const s = st(bs);
  s.status = (_wz, offset) => ({ ret: DATA | OV, pnum: 512, map: offset, file: bs });
  assert.equal(status(bs, true, 100, 200), { ret: DATA | OV | ALLOC, pnum: 200, map: 100, file: bs.node_name });
  assert.equal(status(bs, true, 600, 1000), { ret: DATA | OV | ALLOC, pnum: 424, map: 600, file: bs.node_name });
  assert.equal(s.log, ['status 1 0 512', 'status 1 512 1536']);
  bdrv_unref(bs);
});

test('2.11 map is adjusted to the unaligned offset only when OFFSET_VALID is set', () => {
  const top = bdrv_open(null, { driver: 'bsf', 'file.driver': 'bsp', 'file.align': 512 }, BDRV_O_RDWR);
  // The format inherits no alignment, so force one on the node itself.
  top.bl.request_alignment = 512;
  st(top).status = () => ({ ret: DATA, pnum: 512 });
  assert.equal(status(top, true, 100, 50), { ret: DATA | ALLOC, pnum: 50, map: 0, file: null });
  bdrv_unref(top);
});

test('2.11 DATA or ZERO from the driver adds ALLOCATED', () => {
  const top = bdrv_open(null, { driver: 'bsf', 'file.driver': 'bspn' }, BDRV_O_RDWR);
  st(top).status = () => ({ ret: ZERO, pnum: 1024 });
  assert.equal(status(top, true, 0, 1024), { ret: ZERO | ALLOC, pnum: 1024, map: 0, file: null });
  st(top).status = () => ({ ret: DATA, pnum: 4096 });
  assert.equal(status(top, true, 0, 4096), { ret: DATA | ALLOC | EOF, pnum: 4096, map: 0, file: null });
  bdrv_unref(top);
});

test('2.11 unallocated on a backing-capable format: ZERO without backing, ZERO beyond a shorter backing only with want_zero', () => {
  const nob = bdrv_open(null, { driver: 'bsf', 'file.driver': 'bspn' }, BDRV_O_RDWR);
  st(nob).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(status(nob, true, 0, 1024), { ret: ZERO, pnum: 1024, map: 0, file: null });
  assert.equal(status(nob, false, 0, 1024), { ret: ZERO, pnum: 1024, map: 0, file: null });
  bdrv_unref(nob);

  const base = proto('bspn', { size: 2048 });
  const top = bdrv_open(null, { driver: 'bsf', 'file.driver': 'bspn', backing: base.node_name }, BDRV_O_RDWR);
  st(top).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(status(top, true, 0, 1024), { ret: 0, pnum: 1024, map: 0, file: null });
  assert.equal(status(top, true, 2048, 1024), { ret: ZERO, pnum: 1024, map: 0, file: null });
  assert.equal(status(top, false, 2048, 1024), { ret: 0, pnum: 1024, map: 0, file: null });
  bdrv_unref(top);
  bdrv_unref(base);
});

test('2.11 a format without supports_backing that reports 0 stays 0', () => {
  ensureRegistered(makeFormat('bsfnb', { blockStatus: true }));
  const bs = bdrv_open(null, { driver: 'bsfnb', 'file.driver': 'bspn' }, BDRV_O_RDWR);
  st(bs).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(status(bs, true, 0, 512), { ret: 0, pnum: 512, map: 0, file: null });
  bdrv_unref(bs);
});

test('2.11 RAW passes the query to the child at map; EOF is judged against the querying node', () => {
  // A 1024-byte window at offset 1024 of a 4096-byte file (raw with offset/size).
  const top = bdrv_open(null, { driver: 'bsf', size: 1024, 'file.driver': 'bsp' }, BDRV_O_RDWR);
  const file = top.file!.bs;
  st(top).status = (_w, offset, bytes) => ({ ret: BDRV_BLOCK_RAW | OV, pnum: bytes, map: offset + 1024, file });
  assert.equal(status(top, true, 0, 1024), { ret: DATA | OV | ALLOC | EOF, pnum: 1024, map: 1024, file: file.node_name });
  assert.equal(st(file).log, ['status 1 1024 1024']);
  bdrv_unref(top);
});

test('2.11 a filter without callback is RAW|OFFSET_VALID to its filtered child', () => {
  const f = bdrv_open(null, { driver: 'bsfilter', 'file.driver': 'bsp', 'file.node-name': 'filtered' }, BDRV_O_RDWR);
  const child = f.file!.bs;
  assert.equal(status(f, true, 512, 1024), { ret: DATA | OV | ALLOC, pnum: 1024, map: 512, file: 'filtered' });
  assert.equal(st(child).log, ['status 1 512 1024']);
  bdrv_unref(f);
});

test('2.11 RECURSE asks the file for zero information (want_zero only) and is never returned', () => {
  const top = bdrv_open(null, { driver: 'bsf', 'file.driver': 'bsp' }, BDRV_O_RDWR);
  const file = top.file!.bs;
  st(top).status = (_w, offset, bytes) => ({ ret: DATA | OV | BDRV_BLOCK_RECURSE, pnum: bytes, map: offset, file });
  st(file).status = () => ({ ret: ZERO | OV, pnum: 512, map: 0, file });
  assert.equal(status(top, true, 0, 2048), { ret: DATA | ZERO | OV | ALLOC, pnum: 512, map: 0, file: file.node_name });
  assert.equal(st(file).log, ['status 1 0 2048']);
  st(file).log.length = 0;
  assert.equal(status(top, false, 0, 2048), { ret: DATA | OV | ALLOC, pnum: 2048, map: 0, file: file.node_name });
  assert.equal(st(file).log, [], 'no recursion without want_zero');
  bdrv_unref(top);
});

test('2.11 RECURSE beyond the end of the file reads as zero', () => {
  const top = bdrv_open(null, { driver: 'bsf', size: 8192, 'file.driver': 'bsp' }, BDRV_O_RDWR);
  const file = top.file!.bs;
  st(top).status = (_w, offset, bytes) => ({ ret: DATA | OV | BDRV_BLOCK_RECURSE, pnum: bytes, map: offset, file });
  assert.equal(status(top, true, 4096, 1024), { ret: DATA | ZERO | OV | ALLOC, pnum: 1024, map: 4096, file: file.node_name });
  bdrv_unref(top);
});

test('2.11 protocol nodes cache the last DATA region (want_zero answers only); zero writes invalidate it', () => {
  const bs = proto('bsp');
  const s = st(bs);
  assert.equal(status(bs, true, 0, 4096), { ret: DATA | OV | ALLOC | EOF, pnum: 4096, map: 0, file: bs.node_name });
  assert.equal(status(bs, true, 1000, 100), { ret: DATA | OV | ALLOC, pnum: 100, map: 1000, file: bs.node_name });
  assert.equal(s.log, ['status 1 0 4096'], 'second query answered from the cache');
  const c = new BdrvChild(bs, 'test', 0, null, {});
  const r = runCo(() => bdrv_co_pwrite_zeroes(c, 0, 512, 0));
  assert.is(r.ret, 0);
  assert.equal(status(bs, true, 1000, 100), { ret: DATA | OV | ALLOC, pnum: 100, map: 1000, file: bs.node_name });
  assert.equal(s.log, ['status 1 0 4096', 'zero 0 512 0', 'status 1 1000 100']);
  bdrv_unref(bs);
});

function chain(topSize: number, baseSize: number) {
  const base = proto('bsp', { size: baseSize });
  const top = bdrv_open(null, { driver: 'bsf', size: topSize, 'file.driver': 'bspn', backing: base.node_name }, BDRV_O_RDWR);
  return { base, top };
}

test('2.11 block_status_above: an allocated top answers; an unallocated top defers to the backing', () => {
  const { base, top } = chain(4096, 4096);
  st(top).status = (_w, offset) => (offset < 1024 ? { ret: DATA, pnum: 1024 } : { ret: 0, pnum: 1024 });
  assert.equal(above(top, null, 0, 4096), { ret: DATA | ALLOC, pnum: 1024, map: 0, file: null });
  assert.equal(above(top, null, 1024, 3072), { ret: DATA | OV | ALLOC, pnum: 1024, map: 1024, file: base.node_name });
  assert.equal(st(base).log, ['status 1 1024 1024'], 'the backing is asked only for the top layer pnum');
  bdrv_unref(top);
  bdrv_unref(base);
});

test('2.11 block_status_above stops at base: the unallocated top answer is returned', () => {
  const { base, top } = chain(4096, 4096);
  st(top).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(above(top, base, 0, 2048), { ret: 0, pnum: 2048, map: 0, file: null });
  assert.equal(st(base).log, []);
  bdrv_unref(top);
  bdrv_unref(base);
});

test('2.11 block_status_above with base == bs: 0 and pnum = bytes without asking the driver', () => {
  const { base, top } = chain(4096, 4096);
  assert.equal(above(top, top, 0, 2048), { ret: 0, pnum: 2048, map: -1, file: null });
  assert.equal(st(top).log, []);
  bdrv_unref(top);
  bdrv_unref(base);
});

test('2.11 block_status_above: EOF of a lower layer is dropped; EOF only where the top layer ends', () => {
  const { base, top } = chain(8192, 4096);
  st(top).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(above(top, null, 0, 8192), { ret: DATA | OV | ALLOC, pnum: 4096, map: 0, file: base.node_name });
  const c2 = chain(4096, 8192);
  st(c2.top).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(above(c2.top, null, 0, 4096), { ret: DATA | OV | ALLOC | EOF, pnum: 4096, map: 0, file: c2.base.node_name });
  for (const bs of [top, base, c2.top, c2.base]) bdrv_unref(bs);
});

test('2.11 block_status_above: past the end of a short backing reads ZERO|ALLOCATED, file = that layer', () => {
  const { base, top } = chain(8192, 4096);
  st(top).status = (_w, _o, bytes) => ({ ret: 0, pnum: bytes });
  assert.equal(above(top, null, 4096, 4096), { ret: ZERO | ALLOC | EOF, pnum: 4096, map: 0, file: base.node_name });
  bdrv_unref(top);
  bdrv_unref(base);
});

test('2.11 is_allocated: ALLOCATED bit of the node alone, want_zero false; at EOF 0 with pnum 0', () => {
  const { base, top } = chain(4096, 4096);
  st(top).status = (_w, offset) => (offset < 1024 ? { ret: DATA, pnum: 1024 } : { ret: 0, pnum: 3072 });
  assert.equal(allocated(top, 0, 4096), [1, 1024]);
  assert.equal(allocated(top, 1024, 3072), [0, 3072]);
  assert.equal(allocated(top, 4096, 512), [0, 0]);
  assert.equal(st(top).log, ['status 0 0 4096', 'status 0 1024 3072']);
  assert.equal(st(base).log, [], 'the backing file is never asked');
  bdrv_unref(top);
  bdrv_unref(base);
});

test('2.11 node names used by these tests are released on close', () => {
  const bs = proto('bspn');
  const nm = bs.node_name;
  assert.is(bdrv_find_node(nm), bs);
  bdrv_unref(bs);
  assert.is(bdrv_find_node(nm), null);
});

test.run();
