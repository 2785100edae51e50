// Persistent bitmaps in qcow2 images (qcow2-bitmap.ts) against real QEMU 7.2 tools: `info`
// lists them exactly as qemu-img does, a read-write open marks them IN_USE exactly as QEMU's
// open does (byte for byte), so `qemu-img check` finds no leak afterwards; read-only opens
// change nothing; broken directories are refused with QEMU's messages; and a failure at any
// step of the in-place directory update leaves an image qemu-img finds free of corruption.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BDRV_O_CHECK, BDRV_O_RDWR, EIO, QemuError, bdrv_open, bdrv_unref, error_set_progname } from '../../../../src/index.ts';
import type { BlockDriverState, CoroutineFn } from '../../../../src/index.ts';
import { bdrv_file } from '../../../../examples/drivers/file.ts';
import '../../../../examples/drivers/qcow2/qcow2.ts';
import { QEMU_IO, captureStderr, patch, qemuImg, run, qemuIo, qemuMissing, readAt, tempDir } from './qcow2-meta-helpers.ts';
import { root, runNodeSync } from '../../../helpers/child.ts';

const IMG = join(root, 'bin', 'aioco-img.mjs');
const IO = join(root, 'bin', 'aioco-io.mjs');
const BITMAPS_EXT = 0x23852875;

function skip(what: string): boolean {
  if (qemuMissing) console.log(`skipped (${what}): ${qemuMissing}`);
  return qemuMissing !== null;
}

function aioco(tool: string, ...args: string[]): { code: number; stdout: string; stderr: string } {
  const r = runNodeSync([tool, ...args], { timeoutMs: 30_000 });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

/** The bitmaps extension of the header: its position, bitmap count, directory size and offset. */
function bitmapsExt(file: string): { pos: number; nb: number; dir_size: number; dir_offset: number } {
  const h = Buffer.from(readAt(file, 0, 4096));
  let pos = h.readUInt32BE(100);
  for (;;) {
    const magic = h.readUInt32BE(pos);
    const len = h.readUInt32BE(pos + 4);
    if (magic === 0) throw new Error('no bitmaps extension');
    if (magic === BITMAPS_EXT) {
      return { pos, nb: h.readUInt32BE(pos + 8), dir_size: Number(h.readBigUInt64BE(pos + 16)), dir_offset: Number(h.readBigUInt64BE(pos + 24)) };
    }
    pos += 8 + ((len + 7) & ~7);
  }
}

function autoclear(file: string): bigint {
  return Buffer.from(readAt(file, 88, 8)).readBigUInt64BE(0);
}

/** Flags of every directory entry, in order. */
function dirFlags(file: string): number[] {
  const e = bitmapsExt(file);
  const dir = Buffer.from(readAt(file, e.dir_offset, e.dir_size));
  const flags: number[] = [];
  for (let pos = 0; pos < dir.length; ) {
    flags.push(dir.readUInt32BE(pos + 12));
    pos += Math.ceil((24 + dir.readUInt16BE(pos + 18) + dir.readUInt32BE(pos + 20)) / 8) * 8;
  }
  return flags;
}

/** A 64 MiB image with four bitmaps: three left IN_USE by a killed QEMU (one disabled), one not. */
function mixedImage(f: string): void {
  assert.is(qemuImg('create', '-q', '-f', 'qcow2', f, '64M').code, 0);
  assert.is(qemuImg('bitmap', '--add', f, 'a').code, 0);
  assert.is(qemuImg('bitmap', '--add', '-g', '512', '--disable', f, 'bee').code, 0);
  assert.is(qemuImg('bitmap', '--add', '-g', '2M', f, 'third').code, 0);
  // A read-write QEMU marks them IN_USE at open; SIGKILL keeps it from storing them again.
  assert.is(qemuIo(f, 'write -P 7 0 4k', 'sigraise 9').code, -1);
  assert.is(qemuImg('bitmap', '--add', '-g', '4k', f, 'fourth').code, 0);
  assert.equal(dirFlags(f), [3, 1, 3, 2]);
}

function oneBitmapImage(f: string, size = '1M'): void {
  assert.is(qemuImg('create', '-q', '-f', 'qcow2', f, size).code, 0);
  assert.is(qemuImg('bitmap', '--add', f, 'bm0').code, 0);
  assert.equal(dirFlags(f), [2]);
}

function assertInfoLikeQemu(f: string): void {
  for (const fmt of ['human', 'json']) {
    const real = qemuImg('info', `--output=${fmt}`, f);
    const mine = aioco(IMG, 'info', `--output=${fmt}`, f);
    assert.is(real.code, 0);
    assert.is(mine.stderr, real.stderr);
    assert.is(mine.stdout, real.stdout, `${fmt} info of ${f}`);
    assert.is(mine.code, 0);
  }
}

test('info lists one bitmap exactly as qemu-img (human and json)', () => {
  if (skip('info, one bitmap')) return;
  const t = tempDir();
  try {
    const f = t.file('one.qcow2');
    oneBitmapImage(f);
    assertInfoLikeQemu(f);
    const human = aioco(IMG, 'info', f).stdout;
    assert.ok(
      human.includes(
        '    lazy refcounts: false\n    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: bm0\n            granularity: 65536\n    refcount bits: 16\n',
      ),
    );
  } finally {
    t.cleanup();
  }
});

test('info lists several bitmaps with in-use/auto/no flags and other granularities as qemu-img', () => {
  if (skip('info, mixed bitmaps')) return;
  const t = tempDir();
  try {
    const f = t.file('mixed.qcow2');
    mixedImage(f);
    assertInfoLikeQemu(f);
    const data = JSON.parse(aioco(IMG, 'info', '--output=json', f).stdout)['format-specific'].data;
    assert.equal(data.bitmaps, [
      { flags: ['in-use', 'auto'], name: 'a', granularity: 65536 },
      { flags: ['in-use'], name: 'bee', granularity: 512 },
      { flags: ['in-use', 'auto'], name: 'third', granularity: 2097152 },
      { flags: ['auto'], name: 'fourth', granularity: 4096 },
    ]);
    // A disabled bitmap that is not in use has no flags at all: an empty list.
    const d = t.file('disabled.qcow2');
    assert.is(qemuImg('create', '-q', '-f', 'qcow2', d, '1M').code, 0);
    assert.is(qemuImg('bitmap', '--add', '--disable', d, 'x').code, 0);
    assertInfoLikeQemu(d);
    assert.ok(aioco(IMG, 'info', d).stdout.includes('        [0]:\n            flags:\n            name: x\n'));
    // No bitmaps: no key.
    const n = t.file('none.qcow2');
    assert.is(qemuImg('create', '-q', '-f', 'qcow2', n, '1M').code, 0);
    assertInfoLikeQemu(n);
    assert.not.ok(aioco(IMG, 'info', n).stdout.includes('bitmaps'));
  } finally {
    t.cleanup();
  }
});

test('an aioco write keeps the bitmaps, marked in-use, exactly as QEMU leaves them after a crash; qemu-img check finds no leak', () => {
  if (skip('write with bitmaps')) return;
  const t = tempDir();
  try {
    for (const build of [oneBitmapImage, mixedImage]) {
      const base = t.file('base.qcow2');
      build(base);
      const mine = t.file('mine.qcow2');
      const real = t.file('real.qcow2');
      copyFileSync(base, mine);
      copyFileSync(base, real);
      // QEMU: open read-write (marks IN_USE), killed before it could store the bitmaps.
      assert.is(qemuIo(real, 'sigraise 9').code, -1);
      // aioco: a read-write open and close (what `aioco-io -c flush` does), in process.
      bdrv_unref(bdrv_open(mine, { driver: 'qcow2' }, BDRV_O_RDWR));
      assert.ok(Buffer.from(readFileSync(mine)).equals(readFileSync(real)), `${build.name}: same bytes as QEMU's open`);
      assert.ok(dirFlags(mine).every((fl) => fl & 1));
      assert.is(autoclear(mine) & 1n, 1n);

      // Now with guest data: no leak, bitmaps listed in-use, data intact.
      copyFileSync(base, mine);
      const w = aioco(IO, '-c', 'write -P 0x5a 64k 8k', mine);
      assert.is(w.code, 0);
      const chk = qemuImg('check', mine);
      assert.is(chk.stderr, '');
      assert.is(chk.code, 0);
      assert.ok(chk.stdout.startsWith('No errors were found on the image.\n'));
      const info = JSON.parse(qemuImg('info', '--output=json', mine).stdout)['format-specific'].data;
      assert.ok(info.bitmaps.length >= 1);
      for (const bm of info.bitmaps) assert.is(bm.flags[0], 'in-use');
      assert.is(qemuIo(mine, 'read -P 0x5a 64k 8k').code, 0);
      if (build === mixedImage) assertInfoLikeQemu(mine);

      // A second write changes nothing in the header or directory: all are in use already.
      const hdr = readAt(mine, 0, 65536);
      const e = bitmapsExt(mine);
      const dir = readAt(mine, e.dir_offset, e.dir_size);
      bdrv_unref(bdrv_open(mine, { driver: 'qcow2' }, BDRV_O_RDWR));
      assert.equal(readAt(mine, 0, 65536), hdr);
      assert.equal(readAt(mine, e.dir_offset, e.dir_size), dir);

      // QEMU removes the in-use bitmap; the image stays clean.
      const name = info.bitmaps[0].name as string;
      const rm = qemuImg('bitmap', '--remove', mine, name);
      assert.is(rm.stderr, '');
      assert.is(rm.code, 0);
      const chk2 = qemuImg('check', mine);
      assert.is(chk2.code, 0);
      const after = JSON.parse(qemuImg('info', '--output=json', mine).stdout)['format-specific'].data;
      assert.equal(
        (after.bitmaps ?? []).map((b: { name: string }) => b.name),
        info.bitmaps.slice(1).map((b: { name: string }) => b.name),
      );
    }
  } finally {
    t.cleanup();
  }
});

test('read-only aioco opens (io -r, info, check) leave a bitmap image byte-identical', () => {
  if (skip('read-only opens')) return;
  const t = tempDir();
  try {
    const f = t.file('ro.qcow2');
    mixedImage(f);
    const before = readFileSync(f);
    // qemu-io's info command prints the same format-specific information, bitmaps included.
    const real = run(QEMU_IO, ['-r', '-c', 'info', f]);
    const mine = aioco(IO, '-r', '-c', 'info', '-c', 'read -P 7 0 4k', f);
    assert.is(mine.code, 0);
    assert.ok(mine.stdout.startsWith(real.stdout));
    assert.ok(real.stdout.includes('            name: bee\n            granularity: 512\n'));
    assert.is(aioco(IMG, 'info', f).code, 0);
    assert.is(aioco(IMG, 'check', f).code, 0);
    assert.ok(Buffer.from(readFileSync(f)).equals(before));
  } finally {
    t.cleanup();
  }
});

test('aioco check -r all on a bitmap image leaves qemu-img check at 0', () => {
  if (skip('check -r all')) return;
  const t = tempDir();
  try {
    const f = t.file('rep.qcow2');
    mixedImage(f);
    assert.is(qemuIo(f, 'write -P 1 0 1M').code, 0);
    const r = aioco(IMG, 'check', '-r', 'all', f);
    assert.is(r.code, 0);
    assert.ok(r.stdout.startsWith('No errors were found on the image.\n'));
    assert.equal(dirFlags(f), [3, 1, 3, 3]);
    const chk = qemuImg('check', f);
    assert.is(chk.code, 0);
    assert.is(chk.stderr, '');
  } finally {
    t.cleanup();
  }
});

test('broken bitmap directories are refused on every open with QEMU 7.2 messages, and not written', () => {
  if (skip('broken directories')) return;
  const t = tempDir();
  try {
    const u32 = (v: number) => Uint8Array.of(v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255);
    type Corrupt = (f: string, e: ReturnType<typeof bitmapsExt>) => void;
    const cases: [string, Corrupt, string][] = [
      ['reserved flag', (f, e) => patch(f, e.dir_offset + 12, u32(6)), "Bitmap 'bm0' doesn't satisfy the constraints"],
      ['granularity 2^8', (f, e) => patch(f, e.dir_offset + 17, Uint8Array.of(8)), "Bitmap 'bm0' doesn't satisfy the constraints"],
      ['type 2', (f, e) => patch(f, e.dir_offset + 16, Uint8Array.of(2)), "Bitmap 'bm0' doesn't satisfy the constraints"],
      ['name past the end', (f, e) => patch(f, e.dir_offset + 18, Uint8Array.of(0, 40)), 'Broken bitmap directory'],
      ['extra data', (f, e) => patch(f, e.dir_offset + 20, u32(8)), 'Broken bitmap directory'],
      ['count 2 in header', (f, e) => patch(f, e.pos + 8, u32(2)), 'Less bitmaps found than specified in header extension'],
      [
        'reserved bit in table entry',
        (f, e) => {
          const table = Number(Buffer.from(readAt(f, e.dir_offset, 8)).readBigUInt64BE(0));
          patch(f, table, Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 2));
        },
        "Could not read bitmap_table table from image for bitmap 'bm0': Invalid argument",
      ],
      ['table size 2', (f, e) => patch(f, e.dir_offset + 8, u32(2)), "Could not read bitmap 'bm0' from image: Invalid argument"],
    ];
    const base = t.file('base.qcow2');
    oneBitmapImage(base);
    for (const [what, corrupt, msg] of cases) {
      const f = t.file('bad.qcow2');
      copyFileSync(base, f);
      corrupt(f, bitmapsExt(f));
      const before = readFileSync(f);
      assert.is(qemuImg('info', f).stderr, `qemu-img: Could not open '${f}': ${msg}\n`, what);
      // QEMU loads bitmaps on every open but an inactive one: read-only, read-write, check.
      for (const flags of [0, BDRV_O_RDWR, BDRV_O_CHECK, BDRV_O_CHECK | BDRV_O_RDWR]) {
        let err: unknown = null;
        try {
          bdrv_unref(bdrv_open(f, { driver: 'qcow2' }, flags));
        } catch (x) {
          err = x;
        }
        assert.ok(err instanceof QemuError, `${what}: flags ${flags}`);
        assert.is((err as Error).message, msg);
      }
      assert.ok(Buffer.from(readFileSync(f)).equals(before), `${what}: unchanged`);
    }
    // The tools' wording around it, once each.
    const f = t.file('bad.qcow2');
    const r = aioco(IMG, 'info', f);
    assert.is(r.stderr, `qemu-img: Could not open '${f}': Could not read bitmap 'bm0' from image: Invalid argument\n`);
    assert.is(r.code, 1);
    const w = aioco(IO, '-c', 'write 0 512', f);
    assert.is(w.stderr, `qemu-io: can't open device ${f}: Could not read bitmap 'bm0' from image: Invalid argument\n`);
    assert.is(w.code, 1);
    // Two bitmaps named alike: refused, unless the later one is in use (QEMU skips it).
    const dup = t.file('dup.qcow2');
    assert.is(qemuImg('create', '-q', '-f', 'qcow2', dup, '1M').code, 0);
    assert.is(qemuImg('bitmap', '--add', dup, 'x').code, 0);
    assert.is(qemuImg('bitmap', '--add', dup, 'y').code, 0);
    patch(dup, bitmapsExt(dup).dir_offset + 32 + 24, Uint8Array.of(0x78));
    assert.throws(() => bdrv_open(dup, { driver: 'qcow2' }, 0), (e: Error) => e instanceof QemuError && e.message === 'Bitmap already exists: x');
    assert.is(qemuImg('info', dup).stderr, `qemu-img: Could not open '${dup}': Bitmap already exists: x\n`);
    patch(dup, bitmapsExt(dup).dir_offset + 32 + 12, u32(3));
    assertInfoLikeQemu(dup);
  } finally {
    t.cleanup();
  }
});

test('a failure at each step of marking bitmaps in use leaves no corruption, in QEMU order', () => {
  if (skip('failure at each step')) return;
  const t = tempDir();
  const drv = bdrv_file as unknown as Record<string, (...a: unknown[]) => CoroutineFn<number>>;
  const orig_pwritev = drv.bdrv_co_pwritev!;
  const orig_flush = drv.bdrv_co_flush_to_disk!;
  let ops: string[] = [];
  let budget = Infinity;
  drv.bdrv_co_pwritev = function* (bs: unknown, offset: unknown, bytes: unknown, ...rest: unknown[]) {
    if (ops.length >= budget) return -EIO;
    ops.push(`write ${offset}+${bytes}`);
    return yield* orig_pwritev(bs, offset, bytes, ...rest);
  };
  drv.bdrv_co_flush_to_disk = function* (...a: unknown[]) {
    if (ops.length >= budget) return -EIO;
    ops.push('flush');
    return yield* orig_flush(...a);
  };
  try {
    const base = t.file('base.qcow2');
    mixedImage(base);
    const e = bitmapsExt(base);
    const f = t.file('step.qcow2');

    copyFileSync(base, f);
    let bs: BlockDriverState = bdrv_open(f, { driver: 'qcow2' }, BDRV_O_RDWR);
    bdrv_unref(bs);
    const all = ops;
    assert.equal(all, ['write 0+65536', 'flush', `write ${e.dir_offset}+${e.dir_size}`, 'write 0+65536', 'flush', 'write 0+65536', 'flush']);
    assert.equal(dirFlags(f), [3, 1, 3, 3]);

    for (let k = 0; k < all.length; k++) {
      copyFileSync(base, f);
      ops = [];
      budget = k;
      let err: unknown = null;
      try {
        bs = bdrv_open(f, { driver: 'qcow2' }, BDRV_O_RDWR);
        bdrv_unref(bs);
      } catch (x) {
        err = x;
      }
      budget = Infinity;
      assert.ok(err instanceof QemuError, `step ${k}`);
      assert.ok((err as Error).message.endsWith("Can't update bitmap directory: Input/output error"), (err as Error).message);
      const chk = qemuImg('check', f);
      // Leaks (exit 3) while the autoclear bit is clear on disk; corruption (exit 2) never.
      // Between the first header write and the last one the bit is clear on disk.
      const cleared = k >= 1 && k <= 5;
      assert.is(autoclear(f) & 1n, cleared ? 0n : 1n, `step ${k}: autoclear bit`);
      assert.is(chk.code, cleared ? 3 : 0, `step ${k}: leaks only while the bit is clear`);
      // aioco opens it again: it finishes the job, or drops the stale bitmaps as QEMU would.
      // With qemu-img's program name set, the driver's warning reads as qemu-img prints it.
      error_set_progname('qemu-img');
      const reopen = captureStderr(() => bdrv_unref(bdrv_open(f, { driver: 'qcow2' }, BDRV_O_RDWR)));
      error_set_progname('');
      assert.is(
        reopen.stderr,
        cleared
          ? "qemu-img: warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
          : '',
      );
      const chk2 = qemuImg('check', f);
      assert.is(chk2.code, cleared ? 3 : 0, `step ${k} reopened`);
    }
  } finally {
    drv.bdrv_co_pwritev = orig_pwritev;
    drv.bdrv_co_flush_to_disk = orig_flush;
    t.cleanup();
  }
});

test.run();
