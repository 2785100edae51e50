import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync } from 'node:fs';
import {
  QemuError,
  bdrv_create,
  bdrv_find_format,
  bdrv_find_protocol,
  qemu_opt_set,
  qemu_opt_set_number,
  qemu_opts_append,
  qemu_opts_create,
  qemu_opts_do_parse,
  qemu_opts_print,
  type QemuOpts,
} from '../../../../src/index.ts';
import { qemuCheck, qemuImg, qemuIo, qemuMissing, run, tempDir } from './qcow2-meta-helpers.ts';

// Facts: qemu-block.md §5.1 (qemu-img create's "Formatting" line and messages), §6.10 (defaults
// of a 7.2 image), QEMU 7.2 qcow2_create_opts / qcow2_co_create_opts / qcow2_co_create.

const qcow2 = bdrv_find_format('qcow2')!;

/** The options qemu-img create builds: the merged qcow2 + file list, `-o`, size, -b/-F. */
function imgOpts(o: string, size: number | null, backing: [string, string] | null = null): QemuOpts {
  const list = qemu_opts_append(qemu_opts_append(null, qcow2.create_opts), bdrv_find_protocol('x.qcow2')!.create_opts);
  const opts = qemu_opts_create(list);
  if (o) qemu_opts_do_parse(opts, o);
  if (backing) {
    qemu_opt_set(opts, 'backing_file', backing[0]);
    qemu_opt_set(opts, 'backing_fmt', backing[1]);
  }
  if (size !== null) qemu_opt_set_number(opts, 'size', size);
  return opts;
}

function formatting(file: string, opts: QemuOpts): string {
  return `Formatting '${file}', fmt=qcow2 ${qemu_opts_print(opts, ' ')}`;
}

test('the Formatting line of the merged option list is exactly qemu-block.md 5.1', () => {
  const cases: [string, number, [string, string] | null, string][] = [
    ['', 67108864, null, 'cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16'],
    [
      '',
      67108864,
      ['a.qcow2', 'qcow2'],
      'cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 backing_file=a.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16',
    ],
    ['cluster_size=4k,lazy_refcounts=on,refcount_bits=8', 10485760, null, 'cluster_size=4096 extended_l2=off compression_type=zlib size=10485760 lazy_refcounts=on refcount_bits=8'],
    ['preallocation=metadata', 10485760, null, 'cluster_size=65536 extended_l2=off preallocation=metadata compression_type=zlib size=10485760 lazy_refcounts=off refcount_bits=16'],
    // Captured from qemu-img 7.2.22: every kind of option, in the list's order.
    [
      'compat=1.1,encryption=off,data_file_raw=off,nocow=off,extent_size_hint=1M,preallocation=off,encrypt.key-secret=x,encrypt.iter-time=10',
      1048576,
      ['b.qcow2', 'qcow2'],
      'encryption=off encrypt.key-secret=x encrypt.iter-time=10 cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=1048576 compat=1.1 backing_file=b.qcow2 backing_fmt=qcow2 data_file_raw=off lazy_refcounts=off refcount_bits=16 nocow=off extent_size_hint=1048576',
    ],
    ['encrypt.format=luks', 1048576, null, 'encrypt.format=luks cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16'],
  ];
  for (const [o, size, backing, want] of cases) {
    assert.is(formatting('a.qcow2', imgOpts(o, size, backing)), `Formatting 'a.qcow2', fmt=qcow2 ${want}`, o);
  }
});

test('the Formatting line equals qemu-img create\'s for option sets it prints', () => {
  if (qemuMissing) {
    console.log(`skipping: ${qemuMissing}`);
    return;
  }
  const t = tempDir();
  try {
    for (const o of ['compat=0.10', 'extended_l2=on,cluster_size=128k', 'refcount_bits=64,cluster_size=512', 'compression_type=zlib,lazy_refcounts=off']) {
      const f = t.file('f.qcow2');
      const r = qemuImg('create', '-f', 'qcow2', '-o', o, f, '3M');
      assert.is(r.code, 0);
      assert.is(formatting(f, imgOpts(o, 3145728)), r.stdout.trim(), o);
    }
  } finally {
    t.cleanup();
  }
});

function aiocoCreate(file: string, o: string, size: number, backing: [string, string] | null = null): void {
  bdrv_create(qcow2, file, imgOpts(o, size, backing));
}

test('images are byte-identical to qemu-img create\'s for every option (and pass qemu-img check)', () => {
  if (qemuMissing) {
    console.log(`skipping: ${qemuMissing}`);
    return;
  }
  const t = tempDir();
  try {
    const size16 = 16 * 1048576 + 3 * 512; // not a multiple of the cluster size
    const optionSets = [
      '',
      'preallocation=metadata',
      'preallocation=falloc',
      'preallocation=full',
      'cluster_size=4k,lazy_refcounts=on,refcount_bits=8',
      'compat=0.10',
      'compat=v2',
      'compat=1.1',
      'extended_l2=on',
      'extended_l2=on,preallocation=metadata',
      'refcount_bits=1,cluster_size=512',
      'refcount_bits=2',
      'refcount_bits=4',
      'refcount_bits=32',
      'refcount_bits=64,cluster_size=512,preallocation=metadata',
      'cluster_size=2M,preallocation=full',
      'cluster_size=512,preallocation=falloc',
      'lazy_refcounts=on,preallocation=metadata',
    ];
    for (const o of optionSets) {
      const a = t.file('a.qcow2');
      const q = t.file('q.qcow2');
      // 512-byte clusters mean tens of thousands of allocations: a smaller image keeps this quick.
      const size = o.includes('cluster_size=512') ? 2 * 1048576 + 3 * 512 : size16;
      aiocoCreate(a, o, size);
      const args = ['create', '-q', '-f', 'qcow2'];
      if (o) args.push('-o', o);
      assert.is(qemuImg(...args, q, String(size)).code, 0, o);
      assert.is(run('/usr/bin/cmp', [a, q]).code, 0, `${o || '(defaults)'}: files differ`);
      assert.is(qemuCheck(a, '').exit, 0, o);
      const info = JSON.parse(qemuImg('info', '--output=json', a).stdout) as Record<string, unknown>;
      assert.is(info['virtual-size'], size);
    }
    // With a backing file (which must exist for qemu-img).
    const base = t.file('base.qcow2');
    aiocoCreate(base, '', 1048576);
    for (const [fmt, o] of [['qcow2', ''], ['qcow2', 'extended_l2=on,preallocation=metadata'], ['raw', 'cluster_size=64k']] as const) {
      const a = t.file('ov-a.qcow2');
      const q = t.file('ov-q.qcow2');
      aiocoCreate(a, o, 2097152, [base, fmt]);
      const args = ['create', '-q', '-f', 'qcow2', '-b', base, '-F', fmt];
      if (o) args.push('-o', o);
      assert.is(qemuImg(...args, q, '2M').code, 0);
      assert.is(run('/usr/bin/cmp', [a, q]).code, 0, `backing ${fmt} ${o}: files differ`);
      const info = JSON.parse(qemuImg('info', '--output=json', a).stdout) as Record<string, unknown>;
      assert.is(info['backing-filename'], base);
      assert.is(info['backing-filename-format'], fmt);
    }
  } finally {
    t.cleanup();
  }
});

test('created images are usable by QEMU: map and data as for its own images', () => {
  if (qemuMissing) {
    console.log(`skipping: ${qemuMissing}`);
    return;
  }
  const t = tempDir();
  try {
    for (const o of ['', 'preallocation=metadata', 'preallocation=full', 'extended_l2=on']) {
      const a = t.file('a.qcow2');
      const q = t.file('q.qcow2');
      aiocoCreate(a, o, 8 * 1048576);
      qemuImg('create', '-q', '-f', 'qcow2', ...(o ? ['-o', o] : []), q, '8M');
      for (const f of [a, q]) assert.is(qemuIo(f, 'write -P 5 1M 192k').code, 0);
      assert.is(qemuImg('map', '--output=json', a).stdout, qemuImg('map', '--output=json', q).stdout, o);
      assert.ok(!qemuIo(a, 'read -P 5 1M 192k', 'read -P 0 0 1M').stdout.includes('Pattern verification failed'));
      assert.is(qemuCheck(a, '').exit, 0);
    }
  } finally {
    t.cleanup();
  }
});

test('invalid options fail with qemu-img\'s messages and leave no file behind', () => {
  if (qemuMissing) {
    console.log(`skipping: ${qemuMissing}`);
    return;
  }
  const t = tempDir();
  try {
    const bad = [
      'compat=1.2',
      'refcount_bits=3',
      'refcount_bits=128',
      'refcount_bits=0',
      'cluster_size=1000',
      'cluster_size=256',
      'cluster_size=4M',
      'extended_l2=on,cluster_size=4k',
      'compat=0.10,extended_l2=on',
      'compat=0.10,refcount_bits=8',
      'compat=0.10,lazy_refcounts=on',
      'compression_type=foo',
      'compat=0.10,compression_type=zstd',
      'preallocation=foo',
      'backing_fmt=qcow2',
      'data_file_raw=on',
      'encryption=on',
      'encrypt.format=aes',
      'compat=0.10,data_file=d.raw',
      'backing_file=BASE,backing_fmt=qcow2,preallocation=metadata',
    ];
    const base = t.file('base.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
    for (const tmpl of bad) {
      const o = tmpl.replace('BASE', base);
      const a = t.file('bad-a.qcow2');
      const q = t.file('bad-q.qcow2');
      const r = qemuImg('create', '-q', '-f', 'qcow2', '-o', o, q, '1M');
      assert.is(r.code, 1, o);
      const want = r.stderr.trim().replace(`qemu-img: ${q}: `, '');
      let got = '';
      try {
        aiocoCreate(a, o, 1048576);
      } catch (e) {
        assert.instance(e, QemuError);
        got = (e as Error).message;
      }
      assert.is(got, want, o);
      assert.is(existsSync(a), false, `${o}: file removed`);
      assert.is(existsSync(q), false);
    }
    // What aioco does not implement is refused cleanly, without a file.
    for (const [o, msg] of [
      ['compression_type=zstd', "aioco: qcow2 compression type 'zstd' is not supported"],
      ['data_file=d.raw', 'aioco: qcow2 images with an external data file are not supported'],
      ['encrypt.format=luks,encrypt.key-secret=sec0', 'aioco: encrypted qcow2 images are not supported'],
    ] as const) {
      const a = t.file('bad-a.qcow2');
      let got = '';
      try {
        aiocoCreate(a, o, 1048576);
      } catch (e) {
        got = (e as Error).message;
      }
      assert.is(got, msg);
      assert.is(existsSync(a), false);
    }
    // A missing size is the QAPI visitor's message.
    let got = '';
    try {
      bdrv_create(qcow2, t.file('nosize.qcow2'), imgOpts('', null));
    } catch (e) {
      got = (e as Error).message;
    }
    assert.is(got, "Parameter 'size' is missing");
  } finally {
    t.cleanup();
  }
});

test('too large for qcow2: -EFBIG exactly where QEMU\'s L1 limit is (qemu-img then says so)', () => {
  if (qemuMissing) {
    console.log(`skipping: ${qemuMissing}`);
    return;
  }
  const t = tempDir();
  try {
    // 512-byte clusters: one L1 entry maps 32 KiB; QEMU allows 4 Mi entries (32 MiB of L1).
    // (Creating an image right at the limit writes a 32 MiB L1 table and takes QEMU itself ~10 s,
    // so only the refusals are tested here.)
    const limit = 4 * 1048576 * 32768;
    const g = t.file('too-big.qcow2');
    for (const [o, size] of [['cluster_size=512', limit + 512], ['', 2 ** 62]] as const) {
      let got = '';
      try {
        aiocoCreate(g, o, size);
      } catch (e) {
        got = (e as Error).message;
      }
      assert.is(got, 'Could not create image: File too large', `${o} ${size}`);
      assert.is(existsSync(g), false);
      assert.is(qemuImg('create', '-q', '-f', 'qcow2', ...(o ? ['-o', o] : []), g, String(size)).code, 1, 'qemu-img refuses it too');
    }
  } finally {
    t.cleanup();
  }
});

test('creation consumes every qcow2 option: only the protocol\'s own are left for the file', () => {
  if (qemuMissing) {
    console.log(`skipping: ${qemuMissing}`);
    return;
  }
  const t = tempDir();
  try {
    const opts = imgOpts('cluster_size=4k,nocow=off,extent_size_hint=1M,lazy_refcounts=on,preallocation=metadata', 1048576);
    bdrv_create(qcow2, t.file('c.qcow2'), opts);
    // (bdrv_co_create_file hands the file driver a copy; what is left here went to it.)
    assert.equal(
      opts.opts.map((o) => o.name),
      ['nocow', 'extent_size_hint'],
    );
  } finally {
    t.cleanup();
  }
});

test.run();
