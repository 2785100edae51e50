// Guest memory (src/aio/guest-memory.ts; DESIGN.md "Thread pool", API.md): qemu_memalign
// hands out SharedArrayBuffer-backed views carved from slabs, aligned relative to each
// slab's "phase" (the offset at which real addresses are aligned: 0 until an O_DIRECT
// probe measures it); qemu_vfree makes them reusable and refuses a double free.
// Internals (slabOf, guestMemoryProbePhase, guestMemoryIsAligned) are imported only for
// what the public API cannot show: the phase, and the probe the file driver runs.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, constants, mkdirSync, mkdtempSync, openSync, readSync, rmSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qemu_memalign, qemu_vfree } from '../../src/index.ts';
import { guestMemoryIsAligned, guestMemoryProbePhase, slabOf, slabs } from '../../src/aio/guest-memory.ts';
import { isQemuErr } from '../helpers/assert.ts';

const root = fileURLToPath(new URL('../..', import.meta.url));

function phaseOf(v: Uint8Array): number {
  return slabOf(v.buffer as SharedArrayBuffer).phase;
}

/** (byteOffset - phase) is a multiple of `align`: aligned in real memory as far as known. */
function assertAligned(v: Uint8Array, align: number, what: string): void {
  const rel = v.byteOffset - phaseOf(v);
  assert.ok(rel >= 0 && rel % align === 0, `${what}: byteOffset ${v.byteOffset}, phase ${phaseOf(v)}, alignment ${align}`);
}

test('qemu_memalign returns SharedArrayBuffer-backed views of exactly the size asked, inside their buffer, aligned relative to the slab phase (0 before any probe)', () => {
  const sizes = [0, 1, 100, 511, 512, 513, 4096, 5000, 65_536, 1 << 20, (1 << 20) + 1, 3 << 20];
  const aligns = [1, 8, 512, 4096, 65_536, 1 << 20];
  for (const align of aligns) {
    for (const size of sizes) {
      const v = qemu_memalign(align, size);
      assert.ok(v instanceof Uint8Array);
      assert.ok(v.buffer instanceof SharedArrayBuffer, `size ${size}: SharedArrayBuffer-backed`);
      assert.is(v.length, size);
      assert.is(v.byteLength, size);
      assert.ok(v.byteOffset + v.byteLength <= v.buffer.byteLength);
      assert.is(phaseOf(v), 0, 'no probe has run');
      assertAligned(v, align, `qemu_memalign(${align}, ${size})`);
      qemu_vfree(v);
    }
  }
});

test('live allocations never overlap (mixed sizes and alignments)', () => {
  let seed = 7;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const live: Uint8Array[] = [];
  for (let i = 0; i < 300; i++) {
    const v = qemu_memalign(1 << (rand(13) + 1), rand(20_000));
    live.push(v);
    if (rand(4) === 0) qemu_vfree(live.splice(rand(live.length), 1)[0] as Uint8Array);
  }
  const byBuffer = new Map<ArrayBufferLike, [number, number][]>();
  for (const v of live) {
    if (v.byteLength === 0) continue;
    let l = byBuffer.get(v.buffer);
    if (l === undefined) byBuffer.set(v.buffer, (l = []));
    l.push([v.byteOffset, v.byteOffset + v.byteLength]);
  }
  for (const l of byBuffer.values()) {
    l.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < l.length; i++) {
      assert.ok((l[i] as [number, number])[0] >= (l[i - 1] as [number, number])[1], `overlap: ${JSON.stringify([l[i - 1], l[i]])}`);
    }
  }
  for (const v of live) qemu_vfree(v);
});

test('repeated 4 KiB alloc/free reuses the same memory (same buffer and byteOffset) and does not grow the slabs; contents are not cleared', () => {
  const first = qemu_memalign(4096, 4096);
  const buffer = first.buffer;
  const offset = first.byteOffset;
  first.fill(0x5a);
  qemu_vfree(first);
  const slabCount = slabs.length;
  for (let i = 0; i < 1000; i++) {
    const v = qemu_memalign(4096, 4096);
    assert.is(v.buffer, buffer);
    assert.is(v.byteOffset, offset);
    if (i === 0) assert.is(v[100], 0x5a, 'not zeroed: a reused buffer holds old data, as in C');
    qemu_vfree(v);
  }
  assert.is(slabs.length, slabCount, 'no new slab');
});

test('qemu_memalign refuses an alignment that is not a power of two and a size that is not a non-negative integer', () => {
  for (const a of [0, 3, 6, 12, -4, Number.NaN, 1.5, 2.5, 0.5]) {
    assert.throws(() => qemu_memalign(a, 16), isQemuErr(`qemu_memalign: alignment ${a} is not a power of two`), `alignment ${a}`);
  }
  for (const n of [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
    assert.throws(() => qemu_memalign(4096, n), isQemuErr(`qemu_memalign: invalid size ${n}`), `size ${n}`);
  }
});

test('qemu_vfree: a second free of the same buffer throws; null and views it did not hand out are ignored', () => {
  const small = qemu_memalign(512, 100);
  qemu_vfree(small);
  assert.throws(() => qemu_vfree(small), isQemuErr('qemu_vfree: buffer freed twice'));
  const big = qemu_memalign(4096, 2 << 20);
  qemu_vfree(big);
  assert.throws(() => qemu_vfree(big), isQemuErr('qemu_vfree: buffer freed twice'));
  qemu_vfree(null);
  qemu_vfree(new Uint8Array(8));
  qemu_vfree(new Uint8Array(new SharedArrayBuffer(8)));
  const whole = qemu_memalign(512, 1024);
  qemu_vfree(whole.subarray(0, 512));
  // The sub-view was ignored: the buffer is still allocated, so it can be freed once.
  qemu_vfree(whole);
  assert.throws(() => qemu_vfree(whole), isQemuErr('qemu_vfree: buffer freed twice'));
});

test('allocations above 1 MiB get their own buffer, never shared with another allocation', () => {
  const a = qemu_memalign(4096, (1 << 20) + 4096);
  const b = qemu_memalign(4096, (1 << 20) + 4096);
  const small = qemu_memalign(4096, 4096);
  assert.is.not(a.buffer, b.buffer);
  assert.is.not(a.buffer, small.buffer);
  qemu_vfree(a);
  const c = qemu_memalign(4096, (1 << 20) + 4096);
  assert.is.not(c.buffer, b.buffer);
  for (const v of [b, c, small]) qemu_vfree(v);
});

test('guestMemoryIsAligned: start and length on the alignment relative to the phase; never for ordinary memory', () => {
  const v = qemu_memalign(4096, 8192);
  assert.is(guestMemoryIsAligned(v, 4096), true);
  assert.is(guestMemoryIsAligned(v, 512), true);
  assert.is(guestMemoryIsAligned(v.subarray(512), 512), true);
  assert.is(guestMemoryIsAligned(v.subarray(512), 4096), false, 'start not 4096-aligned');
  assert.is(guestMemoryIsAligned(v.subarray(0, 1000), 512), false, 'length not a multiple');
  assert.is(guestMemoryIsAligned(v.subarray(1, 513), 512), false);
  assert.is(guestMemoryIsAligned(new Uint8Array(4096), 512), false);
  qemu_vfree(v);
});

// --- The O_DIRECT phase probe (the file driver runs it on its first cache.direct=on open) ---

function withDirectFile(fn: (fd: number) => void): void {
  const base = join(root, '.tmp-tests');
  mkdirSync(base, { recursive: true });
  const dir = mkdtempSync(join(base, 'gm-'));
  try {
    const path = join(dir, 'probe.bin');
    const data = new Uint8Array(65_536);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31) & 255;
    writeFileSync(path, data);
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDONLY | constants.O_DIRECT);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EINVAL' || code === 'EOPNOTSUPP') {
        console.log(`  skipped: the filesystem of ${base} refuses O_DIRECT (${code})`);
        return;
      }
      throw e;
    }
    try {
      fn(fd);
    } finally {
      closeSync(fd);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
    try {
      rmdirSync(base);
    } catch {
      // other tests' files are there
    }
  }
}

/** An O_DIRECT read of `v.length` bytes at 0 into `v`; true if the kernel accepted the buffer. */
function directReadOk(fd: number, v: Uint8Array): boolean {
  try {
    readSync(fd, v, 0, v.length, 0);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EINVAL') return false;
    throw e;
  }
}

test('probe: guestMemoryProbePhase measures every slab of ours; afterwards qemu_memalign(4096) buffers, old and new, take O_DIRECT reads', () => {
  withDirectFile((fd) => {
    // Allocated and freed after the probe: must not come back misaligned.
    const before = qemu_memalign(4096, 4096);
    const foreign = new Uint8Array(new SharedArrayBuffer(1 << 16));
    slabOf(foreign.buffer as SharedArrayBuffer);
    const unprobed = slabs.filter((s) => !s.phaseKnown).length;
    assert.ok(unprobed >= 2, 'slabs exist');
    const n = guestMemoryProbePhase(fd);
    assert.is(n, unprobed - 1, 'every own slab, not a SharedArrayBuffer registered from outside');
    assert.is(slabOf(foreign.buffer as SharedArrayBuffer).phaseKnown, false);
    for (const s of slabs) if (s.sab !== foreign.buffer) assert.ok(s.phaseKnown, `slab ${s.id} probed`);
    assert.is(guestMemoryProbePhase(fd), 0, 'nothing left to probe');
    for (const align of [512, 4096]) {
      const v = qemu_memalign(align, 8192);
      assertAligned(v, align, `after the probe, qemu_memalign(${align}, 8192)`);
      assert.is(directReadOk(fd, v), true, `O_DIRECT read into qemu_memalign(${align}, 8192)`);
      qemu_vfree(v);
    }
    // A slab made after the probe is probed at once (dedicated slab above 1 MiB).
    const big = qemu_memalign(4096, 2 << 20);
    assert.is(slabOf(big.buffer as SharedArrayBuffer).phaseKnown, true);
    assert.is(directReadOk(fd, big.subarray(0, 8192)), true);
    qemu_vfree(big);
    // The buffer allocated before the probe, freed now, must not be handed out misaligned.
    qemu_vfree(before);
    const again = qemu_memalign(4096, 4096);
    assertAligned(again, 4096, 'qemu_memalign(4096, 4096) after freeing a pre-probe buffer');
    assert.is(directReadOk(fd, again), true, 'O_DIRECT read into it');
    qemu_vfree(again);
  });
});

test.run();
