// qemu_blockalign (src/block/blockalign.ts; QEMU block/io.c): a buffer aligned for I/O on
// a node: its bl.opt_mem_alignment (at least 512), or the page size (4096) without a node
// or without that limit. SharedArrayBuffer-backed, released with qemu_vfree. Alignment is
// checked relative to the slab phase (internal slabOf), 0 here since nothing probes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { QemuError, qemu_blockalign, qemu_vfree, type BlockAlignSource } from '../../src/index.ts';
import { slabOf } from '../../src/aio/guest-memory.ts';

function rel(v: Uint8Array): number {
  return v.byteOffset - slabOf(v.buffer as SharedArrayBuffer).phase;
}

function alloc(bs: BlockAlignSource | null, size: number, count: number): Uint8Array[] {
  return Array.from({ length: count }, () => qemu_blockalign(bs, size));
}

test('qemu_blockalign(null, n): SharedArrayBuffer-backed, n bytes, page (4096) aligned', () => {
  for (const n of [0, 1, 512, 4096, 10_000, 2 << 20]) {
    const v = qemu_blockalign(null, n);
    assert.ok(v.buffer instanceof SharedArrayBuffer);
    assert.is(v.length, n);
    assert.is(rel(v) % 4096, 0, `size ${n}: byteOffset ${v.byteOffset}`);
    qemu_vfree(v);
  }
});

test("qemu_blockalign(bs, n) uses bs.bl.opt_mem_alignment: 65536-aligned buffers for a node that wants 64 KiB", () => {
  const bs: BlockAlignSource = { bl: { opt_mem_alignment: 65_536 } };
  const vs = alloc(bs, 1000, 6);
  for (const v of vs) {
    assert.is(v.length, 1000);
    assert.is(rel(v) % 65_536, 0, `byteOffset ${v.byteOffset}`);
  }
  for (const v of vs) qemu_vfree(v);
});

test('qemu_blockalign with opt_mem_alignment 512 gives 512-aligned buffers that are not all page aligned (a finer alignment really is used)', () => {
  const vs = alloc({ bl: { opt_mem_alignment: 512 } }, 512, 8);
  for (const v of vs) assert.is(rel(v) % 512, 0, `byteOffset ${v.byteOffset}`);
  assert.ok(vs.some((v) => rel(v) % 4096 !== 0), `offsets ${vs.map((v) => v.byteOffset)}`);
  for (const v of vs) qemu_vfree(v);
  // The same request without a node: every one page aligned.
  const ps = alloc(null, 512, 8);
  for (const v of ps) assert.is(rel(v) % 4096, 0, `byteOffset ${v.byteOffset}`);
  for (const v of ps) qemu_vfree(v);
});

test('qemu_blockalign: an opt_mem_alignment below 512 is raised to 512; a node without one (or without bl) gets 4096', () => {
  for (const a of [1, 64, 256]) {
    const vs = alloc({ bl: { opt_mem_alignment: a } }, 100, 4);
    for (const v of vs) assert.is(rel(v) % 512, 0, `opt_mem_alignment ${a}: byteOffset ${v.byteOffset}`);
    for (const v of vs) qemu_vfree(v);
  }
  for (const bs of [{}, { bl: {} }] as BlockAlignSource[]) {
    const vs = alloc(bs, 512, 8);
    for (const v of vs) assert.is(rel(v) % 4096, 0, `${JSON.stringify(bs)}: byteOffset ${v.byteOffset}`);
    for (const v of vs) qemu_vfree(v);
  }
});

test('qemu_blockalign memory is released with qemu_vfree, reused, and a double free throws', () => {
  const v = qemu_blockalign(null, 4096);
  const [buf, off] = [v.buffer, v.byteOffset];
  qemu_vfree(v);
  const w = qemu_blockalign(null, 4096);
  assert.is(w.buffer, buf);
  assert.is(w.byteOffset, off);
  qemu_vfree(w);
  assert.throws(() => qemu_vfree(w), (e: unknown) => e instanceof QemuError && e.message === 'qemu_vfree: buffer freed twice');
});

test('qemu_blockalign passes bad sizes to qemu_memalign, which refuses them', () => {
  assert.throws(() => qemu_blockalign(null, -1), (e: unknown) => e instanceof QemuError && e.message === 'qemu_memalign: invalid size -1');
  assert.throws(
    () => qemu_blockalign({ bl: { opt_mem_alignment: 768 } }, 16),
    (e: unknown) => e instanceof QemuError && e.message === 'qemu_memalign: alignment 768 is not a power of two',
  );
});

test.run();
