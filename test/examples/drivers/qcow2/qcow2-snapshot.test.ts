import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync } from 'node:fs';
import { BDRV_O_RDWR, QemuError, bdrv_open, bdrv_unref, blk_new_open, blk_pwrite, blk_unref } from '../../../../src/index.ts';
import type { BDRVQcow2State } from '../../../../examples/drivers/qcow2/qcow2-state.ts';
import { aiocoCheck, be64, patch, qemuCheck, qemuImg, qemuIo, qemuMissing, readBe64, readHeader, tempDir } from './qcow2-meta-helpers.ts';

// Facts: qemu-block.md §6.6 (snapshot table layout), QEMU 7.2 block/qcow2-snapshot.c
// (qcow2_read_snapshots' messages, qcow2_check_read_snapshot_table / _fix_snapshot_table).

function skip(name: string): boolean {
  if (qemuMissing) {
    console.log(`skipping "${name}": ${qemuMissing}`);
    return true;
  }
  return false;
}

/** A 16 MiB image with two internal snapshots made by qemu-img: "s1" and "second". */
function makeBase(t: ReturnType<typeof tempDir>): string {
  const base = t.file('s.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
  qemuIo(base, 'write -P 1 0 256k');
  assert.is(qemuImg('snapshot', '-c', 's1', base).code, 0);
  qemuIo(base, 'write -P 2 64k 64k');
  assert.is(qemuImg('snapshot', '-c', 'second', base).code, 0);
  return base;
}

function openError(file: string): string {
  try {
    bdrv_unref(bdrv_open(file, { driver: 'qcow2' }, 0));
    return '';
  } catch (e) {
    assert.instance(e, QemuError);
    return (e as Error).message;
  }
}

/** qemu-img's "Could not open 'f': <message>" without the prefix. */
function qemuOpenError(file: string): string {
  const r = qemuImg('info', file);
  const first = r.stderr.split('\n')[0] ?? '';
  return first.replace(`qemu-img: Could not open '${file}': `, '');
}

test('the snapshot table is read as qemu-img info reports it', () => {
  if (skip('read')) return;
  const t = tempDir();
  try {
    const base = makeBase(t);
    const info = JSON.parse(qemuImg('info', '--output=json', base).stdout) as { snapshots: Record<string, unknown>[] };
    const bs = bdrv_open(base, { driver: 'qcow2' }, 0);
    try {
      const s = bs.opaque as BDRVQcow2State;
      assert.is(s.nb_snapshots, 2);
      assert.is(s.snapshots.length, 2);
      const h = readHeader(base);
      assert.is(s.snapshots_offset, h.snapshots_offset);
      // Two entries: 40 + 24 + 1 + 2 = 67, padded to 72; then 40 + 24 + 1 + 6 = 71.
      assert.is(s.snapshots_size, 72 + 71);
      s.snapshots.forEach((sn, i) => {
        const q = info.snapshots[i]!;
        assert.is(sn.id_str, q['id']);
        assert.is(sn.name, q['name']);
        assert.is(sn.date_sec, q['date-sec']);
        assert.is(sn.date_nsec, q['date-nsec']);
        assert.is(sn.vm_state_size, q['vm-state-size']);
        assert.is(sn.icount, q['icount']);
        assert.is(sn.disk_size, 16 * 1048576);
        assert.is(sn.extra_data_size, 24);
        assert.is(sn.l1_size, 1);
        assert.is(sn.l1_table_offset % 65536, 0);
      });
      // The inactive L2 tables (for the overlap check) are those the snapshot L1 tables name.
      assert.equal([...s.inactive_l2_offsets!].sort((a, b) => a - b), s.snapshots.map((sn) => Number(readBe64(base, sn.l1_table_offset) & 0x00fffffffffffe00n)).sort((a, b) => a - b));
    } finally {
      bdrv_unref(bs);
    }
  } finally {
    t.cleanup();
  }
});

test('an image with snapshots is written normally: shared clusters are copied, snapshots keep their data', () => {
  if (skip('write with snapshots')) return;
  const t = tempDir();
  try {
    const base = makeBase(t);
    const blk = blk_new_open(base, null, { driver: 'qcow2' }, BDRV_O_RDWR);
    try {
      assert.is(blk_pwrite(blk, 0, 131072, new Uint8Array(131072).fill(9), 0), 0);
      assert.is(blk_pwrite(blk, 200000, 4096, new Uint8Array(4096).fill(8), 0), 0);
    } finally {
      blk_unref(blk);
    }
    const r = qemuCheck(base, '');
    assert.is(r.exit, 0, r.stderr);
    assert.is(qemuIo(base, 'read -P 9 0 128k', 'read -P 8 200000 4096', 'read -P 1 128k 64k').code, 0);
    assert.ok(!qemuIo(base, 'read -P 9 0 128k', 'read -P 8 200000 4096', 'read -P 1 128k 64k').stdout.includes('Pattern verification failed'));
    for (const [name, pattern] of [['s1', 'read -P 1 0 256k'], ['second', 'read -P 2 64k 64k']] as const) {
      const raw = t.file(`${name}.raw`);
      assert.is(qemuImg('convert', '-f', 'qcow2', '-l', `snapshot.name=${name}`, '-O', 'raw', base, raw).code, 0);
      const io = qemuIo(raw, pattern);
      assert.ok(!io.stdout.includes('Pattern verification failed'), `${name} keeps its data`);
    }
    const snaps = JSON.parse(qemuImg('info', '--output=json', base).stdout).snapshots as unknown[];
    assert.is(snaps.length, 2, 'the table is kept');
  } finally {
    t.cleanup();
  }
});

const CORRUPTIONS: Record<string, { corrupt: (f: string) => void; openError: boolean }> = {
  'too much extra data': {
    corrupt: (f) => patch(f, readHeader(f).snapshots_offset + 36, Uint8Array.of(0, 0, 0x07, 0xd0)),
    openError: true,
  },
  'unaligned snapshot L1 table': {
    corrupt: (f) => {
      const o = readHeader(f).snapshots_offset;
      patch(f, o, be64(readBe64(f, o) + 0x200n));
    },
    openError: false,
  },
  'incomplete v3 entry (no extra data)': {
    corrupt: (f) => patch(f, readHeader(f).snapshots_offset + 72 + 36, Uint8Array.of(0, 0, 0, 0)),
    openError: false,
  },
  'unaligned snapshot table': {
    corrupt: (f) => patch(f, 64, be64(0x12345n)),
    openError: true,
  },
};

test('corrupted snapshot tables: open errors and check / check -r all match qemu-img', () => {
  if (skip('corrupted snapshot tables')) return;
  const t = tempDir();
  try {
    const base = makeBase(t);
    for (const [name, c] of Object.entries(CORRUPTIONS)) {
      for (const mode of ['', 'all'] as const) {
        const a = t.file('a.qcow2');
        const q = t.file('q.qcow2');
        copyFileSync(base, a);
        c.corrupt(a);
        copyFileSync(a, q);
        const mine = openError(a);
        assert.is(mine, qemuOpenError(q), `${name}: open error`);
        assert.is(mine !== '', c.openError, name);
        const ar = aiocoCheck(a, mode);
        const qr = qemuCheck(q, mode);
        const what = `${name}, -r ${mode || '(none)'}`;
        assert.is(ar.stderr, qr.stderr, `${what}: stderr`);
        assert.equal(ar.counters, qr.counters, `${what}: counters`);
        assert.is(ar.exit, qr.exit, `${what}: exit`);
        if (mode) assert.is(qemuCheck(a, '').exit, qemuCheck(q, '').exit, `${what}: image after repair`);
      }
    }
  } finally {
    t.cleanup();
  }
});

test('check -r all drops oversized extra data and rewrites the table; the image then opens', () => {
  if (skip('repair extra data')) return;
  const t = tempDir();
  try {
    const base = makeBase(t);
    CORRUPTIONS['too much extra data']!.corrupt(base);
    const q = t.file('q.qcow2');
    copyFileSync(base, q);
    const r = aiocoCheck(base, 'all');
    assert.is(r.exit, 0);
    assert.ok(r.stderr.startsWith('Discarding too much extra metadata in snapshot table entry 0 (2000 > 1024)\n'));
    assert.is(qemuCheck(q, 'all').exit, 0);
    assert.is(openError(base), '');
    const bs = bdrv_open(base, { driver: 'qcow2' }, 0);
    try {
      const s = bs.opaque as BDRVQcow2State;
      assert.is(s.snapshots[0]!.extra_data_size, 1024);
      assert.is(s.snapshots[0]!.unknown_extra_data!.length, 1000);
    } finally {
      bdrv_unref(bs);
    }
    // The rewritten table reads back as QEMU's own repair of the same image does.
    const list = (f: string) => JSON.stringify(JSON.parse(qemuImg('info', '--output=json', f).stdout).snapshots);
    assert.is(list(base), list(q));
    assert.is(qemuCheck(base, '').exit, 0);
  } finally {
    t.cleanup();
  }
});

test.run();
