import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_co_block_status,
  bdrv_co_truncate,
  bdrv_register,
  blk_bs,
  blk_getlength,
  blk_new_open,
  blk_pdiscard,
  blk_pread,
  blk_pwrite,
  blk_pwrite_zeroes,
  blk_unref,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_iovec_init_buf,
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_EOF,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_ZERO,
  BDRV_CHILD_DATA,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_PRIMARY,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_REQ_FUA,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_WRITE_COMPRESSED,
  BDRV_REQ_WRITE_UNCHANGED,
  EINVAL,
  EIO,
  ENOSPC,
  EPERM,
  QEMUIOVector,
  QemuError,
  type BlockBackend,
  type BlockDriver,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
} from '../../../src/index.ts';
import { bdrv_raw } from '../../../examples/drivers/raw.ts';
import '../../../examples/drivers/null.ts';
import { bdrv_file } from '../../../examples/drivers/file.ts';
import * as fs from 'node:fs';
import {
  bdrv_create,
  bdrv_get_allocated_file_size,
  qemu_opts_append,
  qemu_opts_create,
  qemu_opts_do_parse,
  qemu_opts_print,
  type QemuOpts,
} from '../../../src/index.ts';

// Facts: reference/qemu-block.md §3.3 (raw format), §2.11 (block status RAW passthrough).

/** In-memory protocol driver (the pattern of test/block/io.test.ts) logging what reaches it. */
interface MemState {
  data: Uint8Array;
  log: string[];
}
const cfg = { size: 4096, write_flags: 0, zero_flags: 0 };
const mem: BlockDriver = {
  format_name: 'mem',
  protocol_name: 'mem',
  runtime_opts: ['filename'],
  bdrv_parse_filename(filename, options) {
    options['filename'] = filename;
  },
  bdrv_file_open(bs) {
    bs.opaque = { data: new Uint8Array(cfg.size), log: [] } satisfies MemState;
    bs.supported_write_flags = cfg.write_flags;
    bs.supported_zero_flags = cfg.zero_flags;
  },
  bdrv_getlength(bs) {
    return (bs.opaque as MemState).data.length;
  },
  *bdrv_co_preadv(bs, offset, bytes, qiov, flags) {
    const s = bs.opaque as MemState;
    s.log.push(`read ${offset} ${bytes} ${flags}`);
    let pos = offset;
    for (let i = 0; i < qiov.niov; i++) {
      const e = qiov.iov[i]!;
      e.set(s.data.subarray(pos, pos + e.length));
      pos += e.length;
    }
    return 0;
  },
  *bdrv_co_pwritev(bs, offset, bytes, qiov, flags) {
    const s = bs.opaque as MemState;
    s.log.push(`write ${offset} ${bytes} ${flags}`);
    let pos = offset;
    for (let i = 0; i < qiov.niov; i++) {
      s.data.set(qiov.iov[i]!, pos);
      pos += qiov.iov[i]!.length;
    }
    return 0;
  },
  *bdrv_co_pwrite_zeroes(bs, offset, bytes, flags) {
    const s = bs.opaque as MemState;
    s.log.push(`zero ${offset} ${bytes} ${flags}`);
    s.data.fill(0, offset, offset + bytes);
    return 0;
  },
  *bdrv_co_pdiscard(bs, offset, bytes) {
    (bs.opaque as MemState).log.push(`discard ${offset} ${bytes}`);
    return 0;
  },
};
bdrv_register(mem);

/** A format recognised by the magic "MAGI" at offset 0: raw's probed-write guard must refuse it. */
const magic: BlockDriver = {
  format_name: 'magic',
  bdrv_probe(buf) {
    return buf.length >= 4 && String.fromCharCode(...buf.subarray(0, 4)) === 'MAGI' ? 100 : 0;
  },
};
bdrv_register(magic);

function reset(o: Partial<typeof cfg> = {}): void {
  Object.assign(cfg, { size: 4096, write_flags: 0, zero_flags: 0 }, o);
}
function openRaw(opts: Record<string, unknown>, flags = BDRV_O_RDWR): { blk: BlockBackend; bs: BlockDriverState; s: MemState } {
  const blk = blk_new_open('mem:x', null, { driver: 'raw', ...opts }, flags);
  const bs = blk_bs(blk)!;
  const s = bs.file!.bs.opaque as MemState;
  s.data.forEach((_, i) => (s.data[i] = (i >> 4) & 0xff));
  return { blk, bs, s };
}
function openErr(opts: Record<string, unknown>): string {
  try {
    blk_unref(blk_new_open('mem:x', null, { driver: 'raw', ...opts }, BDRV_O_RDWR));
  } catch (e) {
    return e instanceof QemuError ? e.message : `not QemuError: ${e}`;
  }
  return 'no error';
}
function runCo<T>(body: () => CoroutineFn<T>): T {
  const st: { v?: T; done: boolean } = { done: false };
  qemu_coroutine_enter(
    qemu_coroutine_create(function* () {
      st.v = yield* body();
      st.done = true;
    }),
  );
  assert.ok(st.done, 'coroutine finished without waiting');
  return st.v as T;
}
function qiovOf(buf: Uint8Array): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, buf.length);
  return q;
}

test('3.3 without offset/size raw is a pass-through: FILTERED child, same length, same bytes', () => {
  reset();
  const { blk, bs, s } = openRaw({});
  assert.is(bs.drv, bdrv_raw);
  assert.is(bs.file!.role, BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY);
  assert.is(blk_getlength(blk), 4096);
  const buf = new Uint8Array(100);
  assert.is(blk_pread(blk, 1000, 100, buf, 0), 0);
  assert.equal([...buf], [...s.data.subarray(1000, 1100)]);
  assert.is(blk_pwrite(blk, 10, 3, new Uint8Array([7, 8, 9]), 0), 0);
  assert.equal([...s.data.subarray(10, 13)], [7, 8, 9]);
  assert.equal(s.log, ['read 1000 100 0', 'write 10 3 0']);
  blk_unref(blk);
});

test('3.3 offset/size window: DATA child, length = size, requests shifted by offset', () => {
  reset();
  const { blk, bs, s } = openRaw({ offset: 512, size: 1024 });
  assert.is(bs.file!.role, BDRV_CHILD_DATA | BDRV_CHILD_PRIMARY);
  assert.is(blk_getlength(blk), 1024);
  const buf = new Uint8Array(1024);
  assert.is(blk_pread(blk, 0, 1024, buf, 0), 0);
  assert.equal([...buf], [...s.data.subarray(512, 1536)]);
  assert.is(blk_pwrite(blk, 1000, 24, new Uint8Array(24).fill(0xaa), 0), 0);
  assert.equal([s.data[1511], s.data[1512], s.data[1535], s.data[1536]], [(1511 >> 4) & 0xff, 0xaa, 0xaa, (1536 >> 4) & 0xff]);
  assert.equal(s.log, ['read 512 1024 0', 'write 1512 24 0']);
  blk_unref(blk);
});

test('3.3 offset alone: length is the rest of the file', () => {
  reset();
  const { blk, s } = openRaw({ offset: '1k' });
  assert.is(blk_getlength(blk), 3072);
  const buf = new Uint8Array(16);
  assert.is(blk_pread(blk, 3072 - 16, 16, buf, 0), 0);
  assert.equal([...buf], [...s.data.subarray(4080, 4096)]);
  assert.equal(s.log, ['read 4080 16 0']);
  blk_unref(blk);
});

test('3.3 zero writes and discards are forwarded with the offset added', () => {
  reset({ zero_flags: BDRV_REQ_MAY_UNMAP });
  const { blk, s } = openRaw({ offset: 512, size: 2048 }, BDRV_O_RDWR | BDRV_O_UNMAP);
  assert.is(blk_pwrite_zeroes(blk, 100, 200, BDRV_REQ_MAY_UNMAP), 0);
  assert.is(s.data[611], (611 >> 4) & 0xff);
  assert.is(s.data[612], 0);
  assert.is(s.data[811], 0);
  assert.is(s.data[812], (812 >> 4) & 0xff);
  assert.is(blk_pdiscard(blk, 1024, 512), 0);
  assert.equal(s.log, [`zero 612 200 ${BDRV_REQ_MAY_UNMAP}`, 'discard 1536 512']);
  blk_unref(blk);
});

test('3.3 requests leaving the size window: the driver refuses writes with -ENOSPC and reads with -EINVAL', () => {
  reset();
  const { blk, bs, s } = openRaw({ offset: 512, size: 1024 });
  // Through the BlockBackend the length check comes first (-EIO, nothing reaches raw).
  assert.is(blk_pread(blk, 1000, 100, new Uint8Array(100), 0), -EIO);
  assert.is(blk_pwrite(blk, 1000, 100, new Uint8Array(100), 0), -EIO);
  // Directly at the driver (a parent that bypasses the length check): raw_adjust_offset.
  const q = qiovOf(new Uint8Array(100));
  const rets = runCo(function* () {
    return [
      yield* bdrv_raw.bdrv_co_preadv!(bs, 1000, 100, q, 0),
      yield* bdrv_raw.bdrv_co_pwritev!(bs, 1000, 100, q, 0),
      yield* bdrv_raw.bdrv_co_pwrite_zeroes!(bs, 1025, 0, 0),
      yield* bdrv_raw.bdrv_co_pdiscard!(bs, 0, 1025),
      yield* bdrv_raw.bdrv_co_preadv!(bs, 924, 100, q, 0),
    ];
  });
  assert.equal(rets, [-EINVAL, -ENOSPC, -ENOSPC, -ENOSPC, 0]);
  assert.equal(s.log, ['read 1436 100 0'], 'only the in-range read reached the file');
  blk_unref(blk);
});

test('3.3 open errors: size not a multiple of 512, offset beyond the file, offset + size beyond the file', () => {
  reset();
  assert.is(openErr({ size: 1000 }), 'Specified size is not multiple of 512');
  assert.is(openErr({ offset: 8192 }), 'Offset (8192) cannot be greater than size of the containing file (4096)');
  assert.is(
    openErr({ offset: 1024, size: 4096 }),
    'The sum of offset (1024) and size (4096) has to be smaller or equal to the  actual size of the containing file (4096)',
  );
  assert.is(openErr({ size: 'lots' }), "Parameter 'size' expects a non-negative number below 2^64");
  assert.is(openErr({ foo: 1 }), "Block format 'raw' does not support the option 'foo'");
  assert.is(openErr({ offset: 4096, size: 0 }), 'no error', 'an empty window at the end is valid');
});

test('3.3 supported flags: WRITE_UNCHANGED plus what the child supports of FUA (writes) and FUA/MAY_UNMAP/NO_FALLBACK (zeroes)', () => {
  reset();
  let { blk, bs } = openRaw({});
  assert.is(bs.supported_write_flags, BDRV_REQ_WRITE_UNCHANGED);
  assert.is(bs.supported_zero_flags, BDRV_REQ_WRITE_UNCHANGED);
  assert.is(bs.supported_truncate_flags, 0);
  blk_unref(blk);
  const all = BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK | BDRV_REQ_WRITE_COMPRESSED;
  reset({ write_flags: all, zero_flags: all });
  ({ blk, bs } = openRaw({}));
  assert.is(bs.supported_write_flags, BDRV_REQ_WRITE_UNCHANGED | BDRV_REQ_FUA);
  assert.is(bs.supported_zero_flags, BDRV_REQ_WRITE_UNCHANGED | BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK);
  const s = bs.file!.bs.opaque as MemState;
  assert.is(blk_pwrite(blk, 0, 4, new Uint8Array(4), BDRV_REQ_FUA), 0);
  assert.equal(s.log, [`write 0 4 ${BDRV_REQ_FUA}`], 'FUA passed through to a child that supports it');
  blk_unref(blk);
});

test('3.3/2.11 block status: RAW passthrough asks the file at offset + raw offset; EOF is relative to the raw node', () => {
  reset();
  const { blk, bs } = openRaw({ offset: 512, size: 1024 });
  const file = bs.file!.bs;
  const got = runCo(function* () {
    const res: unknown[] = [];
    const out: BlockStatusOut = { pnum: -1, map: -1, file: null };
    const r1 = yield* bdrv_co_block_status(bs, true, 0, 512, out);
    res.push([r1, out.pnum, out.map, out.file === file]);
    const r2 = yield* bdrv_co_block_status(bs, true, 512, 4096, out);
    res.push([r2, out.pnum, out.map, out.file === file]);
    return res;
  });
  const data = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID;
  assert.equal(got, [
    [data, 512, 512, true],
    // [512, 1024) of raw is the end of the raw node (not of the file): QEMU adds EOF after the
    // RAW recursion (bdrv_co_block_status's `out:` label).
    [data | BDRV_BLOCK_EOF, 512, 1024, true],
  ]);
  blk_unref(blk);
});

test('3.3 raw over null-co: read-zeroes through the window, block status from the null node', () => {
  const blk = blk_new_open(null, null, { driver: 'raw', offset: 1024, 'file.driver': 'null-co', 'file.size': 8192, 'file.read-zeroes': 'on' }, BDRV_O_RDWR);
  const bs = blk_bs(blk)!;
  const nullBs = bs.file!.bs;
  assert.is(nullBs.drv!.format_name, 'null-co');
  assert.is(blk_getlength(blk), 7168);
  const buf = new Uint8Array(64).fill(0x5a);
  assert.is(blk_pread(blk, 7168 - 64, 64, buf, 0), 0);
  assert.equal([...buf], new Array(64).fill(0));
  assert.is(blk_pwrite(blk, 0, 64, buf, BDRV_REQ_FUA), 0);
  const got = runCo(function* () {
    const out: BlockStatusOut = { pnum: -1, map: -1, file: null };
    const r = yield* bdrv_co_block_status(bs, true, 0, 7168, out);
    return [r, out.pnum, out.map, out.file === nullBs];
  });
  assert.equal(got, [BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_EOF, 7168, 1024, true]);
  blk_unref(blk);
});

test('3.3 truncate: refused with a fixed size; otherwise forwarded to the file (offset added)', () => {
  reset();
  let { blk, bs } = openRaw({ size: 2048 });
  const msg = (b: BlockDriverState): string =>
    runCo(function* () {
      try {
        yield* bdrv_co_truncate(b.parents[0]!, 8192, false, 'off', 0);
      } catch (e) {
        return e instanceof QemuError ? e.message : `not QemuError: ${e}`;
      }
      return 'no error';
    });
  assert.is(msg(bs), 'Cannot resize fixed-size raw disks');
  blk_unref(blk);
  ({ blk, bs } = openRaw({ offset: 512 }));
  // The mem file has no truncate: the error now comes from the file node.
  assert.is(msg(bs), 'Image format driver does not support resize');
  blk_unref(blk);
});

test('3.3 probing: raw scores 1 and is picked for an unknown image; probed writes may not change the first sector into another format', () => {
  reset();
  assert.is(bdrv_raw.bdrv_probe!(new Uint8Array(512), 512, null), 1);
  const written: string[] = [];
  const orig = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array) => {
    written.push(String(chunk));
    return true;
  }) as typeof process.stderr.write;
  let blk: BlockBackend;
  try {
    blk = blk_new_open('mem:x', null, {}, BDRV_O_RDWR);
  } finally {
    process.stderr.write = orig;
  }
  const bs = blk_bs(blk)!;
  assert.is(bs.drv, bdrv_raw);
  assert.is(bs.probed, true);
  assert.is(bs.bl.request_alignment, 512);
  assert.equal(written, [
    "WARNING: Image format was not specified for 'mem:x' and probing guessed raw.\n" +
      '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
      "         Specify the 'raw' format explicitly to remove the restrictions.\n",
  ]);
  const s = bs.file!.bs.opaque as MemState;
  const magicBytes = new Uint8Array([0x4d, 0x41, 0x47, 0x49]);
  assert.is(blk_pwrite(blk, 0, 4, magicBytes, 0), -EPERM, 'would turn block 0 into a "magic" image');
  assert.is(s.data[0], 0);
  assert.is(blk_pwrite(blk, 4, 4, magicBytes, 0), 0, 'block 0 still probes as raw');
  assert.equal([...s.data.subarray(4, 8)], [...magicBytes]);
  assert.is(blk_pwrite(blk, 512, 4, magicBytes, 0), 0, 'beyond block 0: unrestricted');
  assert.equal(s.log, ['read 0 2048 0', 'read 0 512 0', 'read 0 512 0', 'write 0 512 0', 'read 512 512 0', 'write 512 512 0']);
  blk_unref(blk);
});


// --- Image creation (QEMU 7.2 block/raw-format.c raw_co_create_opts: the file is the image) --------

fs.mkdirSync('/tmp/t1-core-tests', { recursive: true });
const createDir = fs.mkdtempSync('/tmp/t1-core-tests/raw-create-');
test.after(() => fs.rmSync(createDir, { recursive: true, force: true }));
let createCounter = 0;

/** Options over raw's create_opts followed by file's, as qemu-img create -f raw merges them. */
function rawCreateOpts(params: string): QemuOpts {
  const o = qemu_opts_create(qemu_opts_append(qemu_opts_append(null, bdrv_raw.create_opts!), bdrv_file.create_opts!));
  qemu_opts_do_parse(o, params, null);
  return o;
}
function createErr(filename: string, opts: QemuOpts): string {
  try {
    bdrv_create(bdrv_raw, filename, opts);
  } catch (e) {
    return e instanceof QemuError ? e.message : `not QemuError: ${e}`;
  }
  return 'no error';
}

test('create: raw describes only size; merged with file, options print in qemu-img create -f raw order', () => {
  assert.equal(bdrv_raw.create_opts!.desc.map((d) => `${d.name}:${d.type}`), ['size:size']);
  // qemu-img 7.2: "Formatting 'x', fmt=raw size=1048576 nocow=yes extent_size_hint=1024".
  assert.is(qemu_opts_print(rawCreateOpts('extent_size_hint=1k,nocow=yes,size=1M'), ' '), 'size=1048576 nocow=yes extent_size_hint=1024');
});

test('create: raw hands every option to the file protocol: sizes, an existing file emptied, full preallocation', () => {
  for (const [size, want] of [
    [0, 0],
    [1000, 1024],
    [65536, 65536],
  ] as const) {
    const p = `${createDir}/r${++createCounter}.img`;
    assert.is(bdrv_create(bdrv_raw, p, rawCreateOpts(`size=${size}`)), 0);
    assert.is(fs.statSync(p).size, want);
  }
  const old = `${createDir}/r${++createCounter}.img`;
  fs.writeFileSync(old, new Uint8Array(10000).fill(7));
  assert.is(bdrv_create(bdrv_raw, old, rawCreateOpts('size=2048')), 0);
  assert.equal(new Uint8Array(fs.readFileSync(old)), new Uint8Array(2048));
  const full = `${createDir}/r${++createCounter}.img`;
  assert.is(bdrv_create(bdrv_raw, full, rawCreateOpts('size=256k,preallocation=full')), 0);
  const blk = blk_new_open(full, null, { driver: 'raw' }, 0);
  assert.is(blk_getlength(blk), 256 * 1024);
  assert.ok(bdrv_get_allocated_file_size(blk_bs(blk)!) >= 256 * 1024);
  blk_unref(blk);
});

test("create: errors are the protocol's: a protocol without creation, the file driver's messages", () => {
  assert.is(createErr('mem:x', rawCreateOpts('size=1k')), "Driver 'mem' does not support image creation");
  assert.is(createErr('/nonexist/x', rawCreateOpts('size=1k')), "Could not create '/nonexist/x': No such file or directory");
  assert.is(createErr(`${createDir}/bad.img`, rawCreateOpts('size=1k,preallocation=xyz')), 'invalid parameter value: xyz');
  assert.is(fs.existsSync(`${createDir}/bad.img`), false);
});

test.run();
