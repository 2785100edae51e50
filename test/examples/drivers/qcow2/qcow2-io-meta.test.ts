// qcow2 driver behaviour around the I/O path, checked against real QEMU 7.2: open-time
// validation messages (and that a refused open writes nothing), format information, block
// status against `qemu-img map`, compressed writes, growing, the dirty bit with lazy refcounts,
// corruption signalling, and crash consistency (SIGKILL during allocating writes).
// Facts: reference/qemu-block.md sections 5.2-5.4, 6.1-6.10.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import {
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_ZERO,
  BDRV_O_RDWR,
  BDRV_REQ_WRITE_COMPRESSED,
  BDRV_REQ_ZERO_WRITE,
  QemuError,
  bdrv_co_block_status,
  bdrv_co_truncate,
  bdrv_get_info,
  bdrv_get_specific_info,
  bdrv_image_info_specific_dump,
  bdrv_poll_co,
  blk_bs,
  blk_getlength,
  blk_new_open,
  block_driver_info_new,
  type BlockBackend,
  type BlockStatusOut,
} from '../../../../src/index.ts';
import { bdrv_qcow2, qcow2_probe } from '../../../../examples/drivers/qcow2/qcow2.ts';
import {
  aioco_read,
  blk_unref,
  first_diff,
  open_ro,
  open_rw,
  BDRV_REQ_MAY_UNMAP,
  prng,
  qemu_img,
  qemu_io,
  run_concurrently,
  skipReason,
  tmp,
  type Op,
} from './qcow2-io-helpers.ts';
import { root } from '../../../helpers/child.ts';

const MiB = 1024 * 1024;
type Tmp = ReturnType<typeof tmp>;

function create(t: Tmp, name: string, size: string, ...opts: string[]): string {
  const f = t.file(name);
  const r = qemu_img('create', '-q', '-f', 'qcow2', ...opts, f, size);
  assert.is(r.status, 0, r.stderr);
  return f;
}

/** The message aioco's open throws, or null if it opened. */
function open_error(file: string, flags: number): string | null {
  try {
    const blk = blk_new_open(file, null, { driver: 'qcow2' }, flags);
    blk_unref(blk);
    return null;
  } catch (e) {
    assert.instance(e, QemuError);
    return (e as Error).message;
  }
}

/** The reason real qemu-io gives for refusing to open `file` read-write. */
function qemu_open_error(file: string): string {
  const r = qemu_io('-f', 'qcow2', '-c', 'read 0 512', file);
  assert.is(r.status, 1);
  const prefix = `qemu-io: can't open device ${file}: `;
  assert.ok(r.stderr.startsWith(prefix), r.stderr);
  return r.stderr.slice(prefix.length).trimEnd();
}

function patch(file: string, edits: [number, number[]][]): void {
  const b = readFileSync(file);
  for (const [off, bytes] of edits) bytes.forEach((v, i) => (b[off + i] = v));
  writeFileSync(file, b);
}
const be32 = (v: number): number[] => [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
const be64 = (v: bigint): number[] => [...be32(Number(v >> 32n)), ...be32(Number(v & 0xffffffffn))];
const sha = (f: string): string => createHash('sha256').update(readFileSync(f)).digest('hex');

test('qcow2_probe: 100 for the magic with version >= 2, 0 otherwise', () => {
  const h = new Uint8Array(512);
  h.set([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
  assert.is(qcow2_probe(h, 512, null), 100);
  h[7] = 1;
  assert.is(qcow2_probe(h, 512, null), 0);
  h[7] = 9; // newer versions still probe as qcow2 (open refuses them)
  assert.is(qcow2_probe(h, 512, null), 100);
  h[0] = 0;
  assert.is(qcow2_probe(h, 512, null), 0);
  assert.is(bdrv_qcow2.format_name, 'qcow2');
});

if (skipReason) {
  test(skipReason, () => {});
} else {
  const bad_headers: [string, (f: string) => void][] = [
    ['bad magic', (f) => patch(f, [[0, [0, 0, 0, 0]]])],
    ['version 4', (f) => patch(f, [[4, be32(4)]])],
    ['version 1', (f) => patch(f, [[4, be32(1)]])],
    ['cluster_bits 22', (f) => patch(f, [[20, be32(22)]])],
    ['cluster_bits 8', (f) => patch(f, [[20, be32(8)]])],
    ['header_length 100', (f) => patch(f, [[100, be32(100)]])],
    ['header_length past the cluster', (f) => patch(f, [[100, be32(70000)]])],
    ['backing file offset past the cluster', (f) => patch(f, [[8, be64(0x20000n)]])],
    ['unknown incompatible bit', (f) => patch(f, [[72, be64(0x400n)]])],
    ['refcount_order 7', (f) => patch(f, [[96, be32(7)]])],
    ['no refcount table', (f) => patch(f, [[56, be32(0)]])],
    ['refcount table offset unaligned', (f) => patch(f, [[48, be64(0x10200n)]])],
    ['L1 table too small', (f) => patch(f, [[24, be64(BigInt(1024 * MiB))]])],
    ['L1 table too large', (f) => patch(f, [[36, be32(0x7fffffff)]])],
    ['L1 table offset unaligned', (f) => patch(f, [[40, be64(0x30008n)]])],
    ['snapshot table offset unaligned', (f) => patch(f, [[60, be32(1)], [64, be64(0x200n)]])],
    ['compression type 2', (f) => patch(f, [[104, [2]]])],
    ['zstd without the incompatible bit', (f) => patch(f, [[104, [1]]])],
    ['external data file bit', (f) => patch(f, [[72, be64(4n)]])],
  ];
  for (const [name, damage] of bad_headers) {
    test(`open refuses ${name} with QEMU's message and writes nothing`, () => {
      const t = tmp();
      try {
        const f = create(t, 'bad.qcow2', '64M');
        damage(f);
        const before = sha(f);
        const ours = open_error(f, BDRV_O_RDWR);
        assert.is.not(ours, null);
        assert.is(ours, qemu_open_error(f));
        assert.is(sha(f), before);
      } finally {
        t.cleanup();
      }
    });
  }

  test('runtime option errors match qemu-io --image-opts; valid options open', () => {
    const t = tmp();
    try {
      const f = create(t, 'o.qcow2', '1M');
      const v2 = create(t, 'o2.qcow2', '1M', '-o', 'compat=0.10');
      const cases: [string, string][] = [
        [f, 'overlap-check=foo'],
        [f, 'overlap-check=none,overlap-check.template=all'],
        [f, 'l2-cache-entry-size=1000'],
        [f, 'cache-size=1M,l2-cache-size=2M'],
        [f, 'cache-size=1M,l2-cache-size=512k,refcount-cache-size=512k'],
        [f, 'lazy-refcounts=maybe'],
        [v2, 'lazy-refcounts=on'],
        [f, 'pass-discard-other=on,overlap-check=constant,l2-cache-size=128k,cache-clean-interval=0'],
      ];
      for (const [file, opts] of cases) {
        const q = qemu_io('--image-opts', '-c', 'read 0 512', `driver=qcow2,file.filename=${file},${opts}`);
        const options: Record<string, unknown> = { driver: 'qcow2', 'file.filename': file };
        for (const kv of opts.split(',')) options[kv.slice(0, kv.indexOf('='))] = kv.slice(kv.indexOf('=') + 1);
        let ours: string;
        try {
          blk_unref(blk_new_open(null, null, options, BDRV_O_RDWR));
          ours = 'read 512/512 bytes at offset 0';
        } catch (e) {
          assert.instance(e, QemuError);
          ours = `qemu-io: can't open: ${(e as Error).message}`;
        }
        assert.is(ours, (q.stderr || q.stdout).split('\n')[0], opts);
      }
    } finally {
      t.cleanup();
    }
  });

  test('the corrupt bit: read-write open refused, read-only open works, info shows corrupt: true', () => {
    const t = tmp();
    try {
      const f = create(t, 'c.qcow2', '1M');
      patch(f, [[72, be64(2n)]]);
      assert.is(open_error(f, BDRV_O_RDWR), 'qcow2: Image is corrupt; cannot be opened read/write');
      const r = qemu_io('-f', 'qcow2', '-c', 'read 0 512', f);
      assert.match(r.stderr, 'qcow2: Image is corrupt; cannot be opened read/write');
      const blk = open_ro(f);
      try {
        assert.is(aioco_read(blk, 0, 4096).ret, 0);
        const info = bdrv_get_specific_info(blk_bs(blk)!)!;
        assert.is(info.data['corrupt'], true);
      } finally {
        blk_unref(blk);
      }
    } finally {
      t.cleanup();
    }
  });

  test('format-specific information matches qemu-img info (v3, v2, lazy refcounts, extended L2)', () => {
    const t = tmp();
    try {
      const cases: [string, string[]][] = [
        ['v3', []],
        ['v2', ['-o', 'compat=0.10']],
        ['lazy', ['-o', 'lazy_refcounts=on,refcount_bits=8']],
        ['extl2', ['-o', 'extended_l2=on']],
      ];
      for (const [name, opts] of cases) {
        const f = create(t, `${name}.qcow2`, '64M', ...opts);
        const blk = open_ro(f);
        try {
          const bs = blk_bs(blk)!;
          const ours = bdrv_image_info_specific_dump(bdrv_get_specific_info(bs)!);
          const q = qemu_img('info', f).stdout;
          const theirs = q.slice(q.indexOf('Format specific information:\n') + 'Format specific information:\n'.length);
          assert.is(ours, theirs, name);
          const bdi = block_driver_info_new();
          assert.is(bdrv_get_info(bs, bdi), 0);
          assert.is(bdi.cluster_size, 65536);
          assert.is(bdi.is_dirty, false);
          // vm_state_offset: the first guest offset past the L1 table's reach (l1_vm_state_index).
          assert.is(bdi.vm_state_offset, name === 'extl2' ? 256 * MiB : 512 * MiB);
        } finally {
          blk_unref(blk);
        }
      }
    } finally {
      t.cleanup();
    }
  });

  /** Depth-0 block status of the whole image in qemu-img map's JSON form. */
  function aioco_map(blk: BlockBackend): string {
    const bs = blk_bs(blk)!;
    const len = blk_getlength(blk);
    const entries: { start: number; length: number; present: boolean; zero: boolean; data: boolean; offset?: number }[] = [];
    let off = 0;
    while (off < len) {
      const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
      const ret = bdrv_poll_co(bs, 'map', () => bdrv_co_block_status(bs, true, off, len - off, out));
      assert.ok(ret >= 0);
      const e = {
        start: off,
        length: out.pnum,
        present: (ret & 0x10) !== 0,
        zero: (ret & BDRV_BLOCK_ZERO) !== 0,
        data: (ret & BDRV_BLOCK_DATA) !== 0,
        ...(ret & BDRV_BLOCK_OFFSET_VALID ? { offset: out.map } : {}),
      };
      const last = entries[entries.length - 1];
      if (
        last &&
        last.present === e.present &&
        last.zero === e.zero &&
        last.data === e.data &&
        (last.offset === undefined) === (e.offset === undefined) &&
        (e.offset === undefined || last.offset! + last.length === e.offset)
      ) {
        last.length += e.length;
      } else {
        entries.push(e);
      }
      off += out.pnum;
    }
    return (
      entries
        .map((e, i) => {
          const o = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
          return `${i ? '' : '['}{ "start": ${e.start}, "length": ${e.length}, "depth": 0, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${o}}`;
        })
        .join(',\n') + ']\n'
    );
  }

  test('block status matches qemu-img map (allocated, zero, preallocated zero, unallocated, compressed, subclusters)', () => {
    const t = tmp();
    try {
      const cases: [string, string[], string[]][] = [
        ['plain', [], ['write -P 1 0 100k', 'write -z 1M 64k', 'write -P 2 3M 4k', 'write -z -u 3M 64k', 'write -P 3 5M 64k', 'discard 5M 64k']],
        ['v2', ['-o', 'compat=0.10'], ['write -P 1 0 100k', 'write -z 1M 64k', 'write -P 2 3M 4k']],
        ['extl2', ['-o', 'extended_l2=on'], ['write -P 1 0 4k', 'write -P 2 6k 3k', 'write -z 64k 8k', 'write -P 3 130k 2k']],
        ['compressed', [], ['write -c -P 1 0 64k', 'write -c -P 2 128k 64k', 'write -P 3 256k 64k']],
      ];
      for (const [name, opts, cmds] of cases) {
        const f = create(t, `${name}.qcow2`, '8M', ...opts);
        const r = qemu_io('-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), f);
        assert.is(r.status, 0, r.stderr);
        const blk = open_ro(f);
        try {
          assert.is(aioco_map(blk), qemu_img('map', '--output=json', '-f', 'qcow2', f).stdout, name);
        } finally {
          blk_unref(blk);
        }
      }
    } finally {
      t.cleanup();
    }
  });

  test('the same writes, zero writes (with and without unmap) and discards give the same qemu-img map as qemu-io', () => {
    const t = tmp();
    try {
      const cmds = [
        'write -P 1 0 100000',
        'write -P 2 300000 5000',
        'write -z 65536 65536',
        'write -z -u 131072 65536',
        'write -z 1000000 3000',
        'discard 0 65536',
        'write -P 3 2000000 70000',
        'write -z -u 2000000 200000',
        'discard 5000000 131072',
        'write -P 4 9000000 65536',
        'write -z 9000000 65536',
        'write -P 5 9000000 512',
      ];
      const to_op = (c: string): Op => {
        const a = c.split(' ');
        if (a[0] === 'discard') return { kind: 'discard', offset: +a[1], bytes: +a[2] };
        if (a[1] === '-z') return { kind: 'zero', offset: +a[a.length - 2], bytes: +a[a.length - 1], flags: a.includes('-u') ? BDRV_REQ_MAY_UNMAP : 0 };
        return { kind: 'write', offset: +a[3], bytes: +a[4], pattern: +a[2], constant: true };
      };
      for (const opts of [[], ['-o', 'compat=0.10'], ['-o', 'cluster_size=4k'], ['-o', 'extended_l2=on']]) {
        const q = create(t, 'q.qcow2', '16M', ...opts);
        const a = create(t, 'a.qcow2', '16M', ...opts);
        const r = qemu_io('-f', 'qcow2', '-d', 'unmap', ...cmds.flatMap((c) => ['-c', c]), q);
        assert.is(r.status, 0, r.stderr);
        const blk = open_rw(a);
        try {
          for (const c of cmds) assert.equal(run_concurrently(blk, [to_op(c)]), [0], c);
        } finally {
          blk_unref(blk);
        }
        const theirs = qemu_img('map', '--output=json', '-f', 'qcow2', q).stdout;
        assert.is(qemu_img('map', '--output=json', '-f', 'qcow2', a).stdout, theirs, opts.join(' '));
        assert.is(qemu_img('check', a).status, 0);
        assert.is(qemu_img('compare', '-f', 'qcow2', '-F', 'qcow2', a, q).status, 0);
      }
    } finally {
      t.cleanup();
    }
  });

  test('header rewrite keeps unknown header fields and extensions, clears unknown autoclear bits: cluster 0 as QEMU writes it', () => {
    const t = tmp();
    try {
      const a = create(t, 'a.qcow2', '1M');
      create(t, 'back.qcow2', '1M');
      // header_length 120 (8 unknown bytes), feature table, an unknown extension, an unknown
      // autoclear bit.
      const b = readFileSync(a);
      const ft = Buffer.from(b.subarray(112, 112 + 8 + 384));
      const hdr = Buffer.alloc(4096);
      b.copy(hdr, 0, 0, 112);
      hdr.writeUInt32BE(120, 100);
      hdr.writeBigUInt64BE(0x8n, 88);
      hdr.write('ABCDEFGH', 112, 'latin1');
      ft.copy(hdr, 120);
      let o = 120 + ft.length;
      hdr.writeUInt32BE(0x12345678, o);
      hdr.writeUInt32BE(5, o + 4);
      hdr.write('hello', o + 8, 'latin1');
      o += 16;
      hdr.writeUInt32BE(0x9abcdef0, o); // a second one: QEMU writes them back in reverse order
      hdr.writeUInt32BE(9, o + 4);
      hdr.write('123456789', o + 8, 'latin1');
      o += 24;
      hdr.writeUInt32BE(0, o); // end
      hdr.copy(b, 0);
      writeFileSync(a, b);
      const q = t.file('q.qcow2');
      writeFileSync(q, b);

      const r = qemu_img('rebase', '-u', '-b', 'back.qcow2', '-F', 'qcow2', q);
      assert.is(r.status, 0, r.stderr);
      const blk = open_rw(a);
      try {
        const bs = blk_bs(blk)!;
        assert.is(bdrv_qcow2.bdrv_change_backing_file!(bs, 'back.qcow2', 'qcow2'), 0);
      } finally {
        blk_unref(blk);
      }
      const ours = readFileSync(a).subarray(0, 65536);
      const theirs = readFileSync(q).subarray(0, 65536);
      assert.is(first_diff(ours, theirs), -1);
      assert.is(ours.readBigUInt64BE(88), 0n);
      assert.is(ours.subarray(112, 120).toString('latin1'), 'ABCDEFGH');
      assert.match(qemu_img('info', a).stdout, /\nbacking file: back\.qcow2 \(actual path: .*\)\nbacking file format: qcow2\n/);
    } finally {
      t.cleanup();
    }
  });

  test('two writes into the same unallocated cluster at once: the second waits for the first allocation (one cluster, no leak)', () => {
    const t = tmp();
    try {
      const f = create(t, 'd.qcow2', '1M');
      const blk = open_rw(f);
      try {
        const rets = run_concurrently(blk, [
          { kind: 'write', offset: 0, bytes: 4096, pattern: 1, constant: true },
          { kind: 'write', offset: 8192, bytes: 4096, pattern: 2, constant: true },
          { kind: 'write', offset: 65536 + 512, bytes: 512, pattern: 3, constant: true },
          { kind: 'write', offset: 65536 + 4096, bytes: 100, pattern: 4, constant: true },
        ]);
        assert.equal(rets, [0, 0, 0, 0]);
      } finally {
        blk_unref(blk);
      }
      const chk = qemu_img('check', f);
      assert.is(chk.status, 0, chk.stdout + chk.stderr);
      // header, refcount table, refcount block, L1, L2, two data clusters
      assert.match(chk.stdout, '2/16 = 12.50% allocated');
      assert.match(chk.stdout, 'Image end offset: 458752');
      const io = qemu_io('-r', '-f', 'qcow2', '-c', 'read -P 1 0 4k', '-c', 'read -P 0 4k 4k', '-c', 'read -P 2 8k 4k', '-c', 'read -P 3 66048 512', '-c', 'read -P 4 69632 100', f);
      assert.not.match(io.stdout, 'Pattern verification failed');
      assert.is(io.status, 0);
    } finally {
      t.cleanup();
    }
  });

  test('make_empty: every cluster of the overlay is dropped, reads fall through to the backing file', () => {
    const t = tmp();
    try {
      const base = create(t, 'base.qcow2', '4M');
      qemu_io('-f', 'qcow2', '-c', 'write -P 0x31 0 4M', base);
      const ov = create(t, 'ov.qcow2', '4M', '-b', 'base.qcow2', '-F', 'qcow2');
      qemu_io('-f', 'qcow2', '-c', 'write -P 0x32 0 1M', '-c', 'write -z 2M 64k', '-c', 'write -c -P 0x33 3M 64k', ov);
      const blk = open_rw(ov);
      try {
        const bs = blk_bs(blk)!;
        assert.is(bdrv_poll_co(bs, 'make_empty', () => bdrv_qcow2.bdrv_make_empty!(bs)), 0);
        assert.is(aioco_read(blk, 0, 4 * MiB).buf.findIndex((x) => x !== 0x31), -1);
      } finally {
        blk_unref(blk);
      }
      const chk = qemu_img('check', ov);
      assert.is(chk.status, 0, chk.stdout + chk.stderr);
      assert.is(qemu_img('map', '--output=json', ov).stdout, '[{ "start": 0, "length": 4194304, "depth": 1, "present": true, "zero": false, "data": true, "offset": 327680}]\n');
    } finally {
      t.cleanup();
    }
  });

  test('compressed writes: whole clusters, uncompressible ones written normally, qemu-img agrees; -EIO on an allocated cluster, -EINVAL unaligned', () => {
    const t = tmp();
    try {
      const size = 2 * MiB;
      const f = create(t, 'w.qcow2', String(size));
      const ref = new Uint8Array(size);
      const r = prng(5);
      for (let o = 0; o < size; o += 65536) {
        if ((o >> 16) % 4 === 3) for (let i = 0; i < 65536; i++) ref[o + i] = (r() * 256) | 0;
        else for (let i = 0; i < 65536; i++) ref[o + i] = (o >> 16) + ((i >> 10) & 3);
      }
      const blk = open_rw(f);
      try {
        const ops: Op[] = [];
        for (let o = 0; o < size; o += 65536) ops.push({ kind: 'write', offset: o, bytes: 65536, pattern: 0 });
        const rets = compressed_writes(blk, ref, ops.map((o) => o.offset));
        assert.equal(rets, ops.map(() => 0));
        assert.equal(compressed_writes(blk, ref, [0]), [-5]); // -EIO: already allocated
        assert.equal(compressed_writes(blk, ref, [65536 + 512]), [-22]); // -EINVAL: unaligned
        const { ret, buf } = aioco_read(blk, 0, size);
        assert.is(ret, 0);
        assert.is(first_diff(buf, ref), -1);
      } finally {
        blk_unref(blk);
      }
      const chk = qemu_img('check', f);
      assert.is(chk.status, 0, chk.stdout + chk.stderr);
      assert.match(chk.stdout, '32/32 = 100.00% allocated');
      assert.match(chk.stdout, '75.00% compressed clusters');
      const raw = t.file('ref.raw');
      writeFileSync(raw, ref);
      assert.is(qemu_img('compare', '-f', 'qcow2', '-F', 'raw', f, raw).stdout, 'Images are identical.\n');
      const map = qemu_img('map', '--output=json', f).stdout;
      assert.match(map, '{ "start": 0, "length": 196608, "depth": 0, "present": true, "zero": false, "data": true},');
    } finally {
      t.cleanup();
    }
  });

  test('truncate grows the image (L1 table grows, header size updated); ZERO_WRITE hides a longer backing file', () => {
    const t = tmp();
    try {
      const f = create(t, 'g.qcow2', '1M');
      let blk = open_rw(f);
      try {
        const bs = blk_bs(blk)!;
        assert.is(bdrv_poll_co(bs, 't', () => bdrv_co_truncate(blk.root!, 3 * 1024 * MiB, false, 'off', 0)), 0);
        assert.is(blk_getlength(blk), 3 * 1024 * MiB);
        assert.equal(run_concurrently(blk, [{ kind: 'write', offset: 2560 * MiB + 100, bytes: 70000, pattern: 0x66, constant: true }]), [0]);
        assert.throws(() => bdrv_poll_co(bs, 't', () => bdrv_co_truncate(blk.root!, MiB, false, 'off', 0)), /cannot be shrunk/);
      } finally {
        blk_unref(blk);
      }
      const chk = qemu_img('check', f);
      assert.is(chk.status, 0, chk.stdout + chk.stderr);
      assert.match(qemu_img('info', f).stdout, 'virtual size: 3 GiB (3221225472 bytes)');
      const io = qemu_io('-r', '-f', 'qcow2', '-c', `read -P 0x66 ${2560 * MiB + 100} 70000`, '-c', `read -P 0 ${2560 * MiB + 70100} 1000`, f);
      assert.not.match(io.stdout, 'Pattern verification failed');
      assert.is(io.status, 0);

      // Overlay shorter than its backing file, grown with ZERO_WRITE: the new area reads zeroes.
      const base = create(t, 'base.qcow2', '4M');
      qemu_io('-f', 'qcow2', '-c', 'write -P 0x77 0 4M', base);
      const ov = create(t, 'ov.qcow2', '1M', '-b', 'base.qcow2', '-F', 'qcow2');
      blk = open_rw(ov);
      try {
        const bs = blk_bs(blk)!;
        assert.is(bdrv_poll_co(bs, 't', () => bdrv_co_truncate(blk.root!, 4 * MiB - 1536, false, 'off', BDRV_REQ_ZERO_WRITE)), 0);
        const { buf } = aioco_read(blk, 0, 4 * MiB - 1536);
        assert.is(buf[0], 0x77);
        assert.is(buf[MiB - 1], 0x77);
        assert.is(buf.subarray(MiB).findIndex((x) => x !== 0), -1);
      } finally {
        blk_unref(blk);
      }
      assert.is(qemu_img('check', ov).status, 0);
      const io2 = qemu_io('-r', '-f', 'qcow2', '-c', `read -P 0 ${MiB} ${3 * MiB - 1536}`, '-c', 'read -P 0x77 0 1M', ov);
      assert.not.match(io2.stdout, 'Pattern verification failed');
    } finally {
      t.cleanup();
    }
  });

  test('lazy refcounts: exit without close leaves the dirty bit; a read-write open repairs it; a clean close clears it', async () => {
    const t = tmp();
    try {
      const f = create(t, 'lazy.qcow2', '8M', '-o', 'lazy_refcounts=on');
      const r = await run_child(['exit', f]);
      assert.is(r.stdout, 'rets 0,0,0,0 flush 0\n', r.stderr);
      assert.match(qemu_img('info', f).stdout, 'cleanly shut down: no');
      const chk = qemu_img('check', f);
      assert.is(chk.status, 2, chk.stdout); // refcounts were postponed: errors, as after QEMU's crash
      assert.match(chk.stderr, 'ERROR cluster 5 refcount=0 reference=1');
      // Read-only: still dirty, data readable.
      let blk = open_ro(f);
      try {
        assert.is(bdrv_get_info_dirty(blk), true);
        assert.is(aioco_read(blk, 0, 4 * 65536).buf.findIndex((x) => x !== 0x5a), -1);
      } finally {
        blk_unref(blk);
      }
      // The repair prints QEMU's check lines (ERROR cluster 5 ..., Rebuilding refcount structure).
      const repair = capture_stderr(() => {
        blk = open_rw(f);
        try {
          assert.is(bdrv_get_info_dirty(blk), false);
        } finally {
          blk_unref(blk);
        }
      });
      assert.match(repair, 'ERROR cluster 5 refcount=0 reference=1');
      const chk2 = qemu_img('check', f);
      assert.is(chk2.status, 0, chk2.stdout + chk2.stderr);
      assert.not.match(qemu_img('info', f).stdout, 'cleanly shut down');
      // Writes with lazy refcounts set the dirty bit; closing writes refcounts and clears it.
      blk = open_rw(f);
      try {
        run_concurrently(blk, [{ kind: 'write', offset: MiB, bytes: 4096, pattern: 1 }]);
        assert.is(bdrv_get_info_dirty(blk), true);
      } finally {
        blk_unref(blk);
      }
      const chk3 = qemu_img('check', f);
      assert.is(chk3.status, 0, chk3.stdout + chk3.stderr);
      assert.not.match(qemu_img('info', f).stdout, 'cleanly shut down');
    } finally {
      t.cleanup();
    }
  });

  test('corruption: an unaligned data cluster marks the image corrupt with QEMU\'s message; the write fails with -EIO', () => {
    const t = tmp();
    try {
      const f = create(t, 'c.qcow2', '64M');
      qemu_io('-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 128k 64k', f);
      // L2 table at 0x40000, data at 0x50000 and 0x60000: make the third entry unaligned.
      patch(f, [[0x40000 + 2 * 8, be64(0x8000000000060200n)]]);
      const copy = t.file('q.qcow2');
      writeFileSync(copy, readFileSync(f));
      const q = qemu_io('-f', 'qcow2', '-c', 'write -P 3 128k 4k', copy);
      const qmsg = q.stderr.split('\n').find((l) => l.startsWith('qcow2: Marking image as corrupt'))!;
      assert.ok(qmsg, q.stderr);

      let rets: number[] = [];
      const err = capture_stderr(() => {
        const blk = open_rw(f);
        try {
          rets = run_concurrently(blk, [{ kind: 'write', offset: 128 * 1024, bytes: 4096, pattern: 3 }]);
        } finally {
          blk_unref(blk);
        }
      });
      assert.equal(rets, [-5]);
      assert.is(err.split('\n').find((l) => l.startsWith('qcow2: Marking image as corrupt')), qmsg);
      assert.match(qemu_img('info', f).stdout, 'corrupt: true');
      assert.is(open_error(f, BDRV_O_RDWR), 'qcow2: Image is corrupt; cannot be opened read/write');
      // Read-only reads of the broken cluster fail, others work.
      const ro = open_ro(f);
      try {
        assert.is(aioco_read(ro, 0, 65536).ret, 0);
      } finally {
        blk_unref(ro);
      }
    } finally {
      t.cleanup();
    }
  });

  const corruptions: [string, string[], [number, bigint][], string][] = [
    ['unaligned data cluster, read', [], [[0x40000 + 2 * 8, 0x8000000000060200n]], 'read 128k 4k'],
    ['unaligned L2 table, read', [], [[0x30000, 0x8000000000040200n]], 'read 0 4k'],
    ['unaligned L2 table, write', [], [[0x30000, 0x8000000000040200n]], 'write -P 9 0 4k'],
    ['data cluster on the L1 table, write', [], [[0x40000 + 2 * 8, 0x8000000000030000n]], 'write -P 9 128k 4k'],
    ['zero flag in a v2 image, read', ['-o', 'compat=0.10'], [[0x40000 + 2 * 8, 0x8000000000060001n]], 'read 128k 4k'],
    ['subcluster both allocated and zero, read', ['-o', 'extended_l2=on'], [[0x40000 + 2 * 16 + 8, 0x0000000100000001n]], 'read 128k 4k'],
  ];
  for (const [name, opts, edits, cmd] of corruptions) {
    test(`corruption (${name}): QEMU's "Marking image as corrupt" line, -EIO, corrupt bit set`, () => {
      const t = tmp();
      try {
        const f = create(t, 'c.qcow2', '64M', ...opts);
        qemu_io('-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 128k 64k', f);
        patch(f, edits.map(([o, v]) => [o, be64(v)]));
        const copy = t.file('q.qcow2');
        writeFileSync(copy, readFileSync(f));
        const q = qemu_io('-f', 'qcow2', '-c', cmd, copy);
        const qmsg = q.stderr.split('\n').find((l) => l.startsWith('qcow2: Marking image as corrupt'));
        assert.ok(qmsg, q.stderr + q.stdout);
        const a = cmd.split(' ');
        const n = (v: string): number => (v.endsWith('k') ? 1024 * Number(v.slice(0, -1)) : Number(v));
        const op: Op | null = a[0] === 'write' ? { kind: 'write', offset: n(a[3]), bytes: n(a[4]), pattern: 9, constant: true } : null;
        let ret = 0;
        const err = capture_stderr(() => {
          const blk = open_rw(f);
          try {
            ret = op ? run_concurrently(blk, [op])[0] : aioco_read(blk, n(a[1]), n(a[2])).ret;
          } finally {
            blk_unref(blk);
          }
        });
        assert.is(ret, -5);
        assert.is(err.split('\n').find((l) => l.startsWith('qcow2: Marking image as corrupt')), qmsg);
        if (opts.includes('compat=0.10')) {
          // v2 headers have no feature bits: the corrupt bit cannot be stored.
          assert.is(open_error(f, BDRV_O_RDWR), null);
        } else {
          assert.match(qemu_img('info', f).stdout, 'corrupt: true');
          assert.is(open_error(f, BDRV_O_RDWR), 'qcow2: Image is corrupt; cannot be opened read/write');
        }
      } finally {
        t.cleanup();
      }
    });
  }

  test('crash consistency: SIGKILL during allocating writes leaves leaks at most, never corruption', async () => {
    const t = tmp();
    try {
      for (const [i, opts] of [[], ['-o', 'cluster_size=4k'], ['-o', 'compat=0.10'], ['-o', 'extended_l2=on'], ['-o', 'cluster_size=512']].entries()) {
        const f = create(t, `k${i}.qcow2`, '64M', ...opts);
        await run_child(['loop', f], 10 + 30 * i);
        const chk = qemu_img('check', f);
        assert.ok(chk.status === 0 || chk.status === 3, `check after kill (${opts.join(' ')}): ${chk.status}\n${chk.stdout}${chk.stderr}`);
        assert.not.match(chk.stdout, /\d+ errors were found/, chk.stdout + chk.stderr);
      }
    } finally {
      t.cleanup();
    }
  });
}

/** Runs `fn` with process.stderr captured; returns what was written. */
function capture_stderr(fn: () => void): string {
  const saved = process.stderr.write.bind(process.stderr);
  let err = '';
  process.stderr.write = ((s: string | Uint8Array): boolean => {
    err += String(s);
    return true;
  }) as typeof process.stderr.write;
  try {
    fn();
  } finally {
    process.stderr.write = saved;
  }
  return err;
}

function bdrv_get_info_dirty(blk: BlockBackend): boolean {
  const bdi = block_driver_info_new();
  assert.is(bdrv_get_info(blk_bs(blk)!, bdi), 0);
  return bdi.is_dirty;
}

import {
  AIO_WAIT_WHILE,
  QEMUIOVector,
  aio_co_enter,
  blk_co_pwritev,
  blk_get_aio_context,
  qemu_coroutine_create,
  qemu_iovec_init_buf,
} from '../../../../src/index.ts';

/** Compressed writes of one cluster each from `ref` at `offsets`, all at once. */
function compressed_writes(blk: BlockBackend, ref: Uint8Array, offsets: number[]): number[] {
  const ctx = blk_get_aio_context(blk);
  const rets: (number | null)[] = offsets.map(() => null);
  offsets.forEach((o, i) =>
    aio_co_enter(
      ctx,
      qemu_coroutine_create(function* () {
        const q = new QEMUIOVector();
        qemu_iovec_init_buf(q, ref.subarray(o, o + 65536), 65536);
        rets[i] = yield* blk_co_pwritev(blk, o, 65536, q, BDRV_REQ_WRITE_COMPRESSED);
      }),
    ),
  );
  AIO_WAIT_WHILE(ctx, () => rets.some((r) => r === null));
  return rets as number[];
}

/**
 * Runs the child fixture; with `kill_after_ms` it is SIGKILLed that long after it printed
 * "ready" (its first batch of writes completed).
 */
function run_child(args: string[], kill_after_ms?: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'test/examples/drivers/qcow2/fixtures/qcow2-io-child.ts', ...args], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    const guard = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.stdout.on('data', (b: Buffer) => {
      stdout += b;
      if (kill_after_ms !== undefined && stdout.includes('ready')) setTimeout(() => child.kill('SIGKILL'), kill_after_ms);
    });
    child.stderr.on('data', (b: Buffer) => (stderr += b));
    child.on('close', (code) => {
      clearTimeout(guard);
      resolve({ code, stdout, stderr });
    });
  });
}

test.run();
