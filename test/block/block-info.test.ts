// What a node says about itself (QEMU 7.2 block.c bdrv_get_info, bdrv_get_specific_info,
// bdrv_get_allocated_file_size; block/qapi.c bdrv_image_info_specific_dump with dump_qobject,
// dump_qdict and dump_qlist), with an interop check against qemu-img 7.2's own text.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import {
  bdrv_attach_child,
  bdrv_get_allocated_file_size,
  bdrv_get_info,
  bdrv_get_specific_info,
  bdrv_image_info_specific_dump,
  bdrv_open,
  bdrv_unref,
  block_driver_info_new,
  BDRV_CHILD_DATA,
  BDRV_MAX_ALIGNMENT,
  EINVAL,
  EIO,
  ENOMEDIUM,
  ENOTSUP,
  QemuError,
  type BlockDriver,
  type BlockDriverInfo,
  type ImageInfoSpecific,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, st } from '../helpers/mem-driver.ts';
import { thrown } from '../helpers/assert.ts';

/** Per-node answers, keyed by node name. */
const answers = new Map<string, { info?: Partial<BlockDriverInfo>; infoRet?: number; alloc?: number; specific?: ImageInfoSpecific | null | 'throw' }>();
const of = (name: string) => answers.get(name) ?? {};

/** A protocol whose allocated size is its data length (or an answer). */
const ibp: BlockDriver = {
  ...makeProto('ibp'),
  bdrv_get_allocated_file_size(bs) {
    return of(bs.node_name).alloc ?? st(bs).data.length;
  },
};
/** A protocol without the allocated-size callback. */
const ibpn = makeProto('ibpn');
/** A format with get_info and specific info, backing support, no allocated-size callback. */
const ibf: BlockDriver = {
  ...makeFormat('ibf', { supportsBacking: true }),
  bdrv_get_info(bs, bdi) {
    const a = of(bs.node_name);
    Object.assign(bdi, a.info ?? {});
    return a.infoRet ?? 0;
  },
  bdrv_get_specific_info(bs) {
    const a = of(bs.node_name).specific;
    if (a === 'throw') throw new QemuError('specific info failed');
    return a ?? null;
  },
};
/** A format with none of the callbacks, and a filter. */
const ibfn = makeFormat('ibfn', { supportsBacking: true });
const ibfilter = makeFormat('ibfilter', { filter: true });
for (const d of [ibp, ibpn, ibf, ibfn, ibfilter]) ensureRegistered(d);

let n = 0;
function open(opts: Record<string, unknown>) {
  return bdrv_open(null, { 'node-name': `ib${++n}`, ...opts }, 0);
}

test('bdrv_get_info: the driver fills a zeroed bdi; its -errno returned; a cluster size over 1 GiB is -EINVAL', () => {
  const bs = open({ driver: 'ibf', 'file.driver': 'ibp' });
  answers.set(bs.node_name, { info: { cluster_size: 65536, is_dirty: true } });
  const bdi: BlockDriverInfo = { cluster_size: 7, vm_state_offset: 7, is_dirty: false, needs_compressed_writes: true };
  assert.is(bdrv_get_info(bs, bdi), 0);
  assert.equal(bdi, { cluster_size: 65536, vm_state_offset: 0, is_dirty: true, needs_compressed_writes: false });
  answers.set(bs.node_name, { info: { cluster_size: 512 }, infoRet: -EIO });
  assert.is(bdrv_get_info(bs, bdi), -EIO);
  answers.set(bs.node_name, { info: { cluster_size: BDRV_MAX_ALIGNMENT } });
  assert.is(bdrv_get_info(bs, bdi), 0);
  answers.set(bs.node_name, { info: { cluster_size: BDRV_MAX_ALIGNMENT * 2 } });
  assert.is(bdrv_get_info(bs, bdi), -EINVAL);
  bdrv_unref(bs);
});

test('bdrv_get_info: -ENOTSUP without the callback (bdi untouched); a filter answers for its child; -ENOMEDIUM', () => {
  const bs = open({ driver: 'ibfn', 'file.driver': 'ibp' });
  const bdi: BlockDriverInfo = { cluster_size: 7, vm_state_offset: 7, is_dirty: true, needs_compressed_writes: true };
  assert.is(bdrv_get_info(bs, bdi), -ENOTSUP);
  assert.is(bdrv_get_info(bs.file!.bs, bdi), -ENOTSUP);
  assert.equal(bdi, { cluster_size: 7, vm_state_offset: 7, is_dirty: true, needs_compressed_writes: true });
  bdrv_unref(bs);
  const f = open({ driver: 'ibfilter', 'file.driver': 'ibf', 'file.file.driver': 'ibp' });
  answers.set(f.file!.bs.node_name, { info: { cluster_size: 4096, vm_state_offset: 1 << 20 } });
  assert.is(bdrv_get_info(f, bdi), 0);
  assert.equal(bdi, { cluster_size: 4096, vm_state_offset: 1 << 20, is_dirty: false, needs_compressed_writes: false });
  const filterOverNothing = open({ driver: 'ibfilter', 'file.driver': 'ibp' });
  assert.is(bdrv_get_info(filterOverNothing, bdi), -ENOTSUP, 'the filtered protocol has no callback');
  bdrv_unref(filterOverNothing);
  bdrv_unref(f);
  assert.is(bdrv_get_info(f, bdi), -ENOMEDIUM);
  assert.equal(block_driver_info_new(), { cluster_size: 0, vm_state_offset: 0, is_dirty: false, needs_compressed_writes: false });
});

test("bdrv_get_specific_info: the driver's answer or null; no filter forwarding; its QemuError propagates", () => {
  const bs = open({ driver: 'ibf', 'file.driver': 'ibp' });
  assert.is(bdrv_get_specific_info(bs), null);
  const info: ImageInfoSpecific = { type: 'ibf', data: { compat: '1.1' } };
  answers.set(bs.node_name, { specific: info });
  assert.is(bdrv_get_specific_info(bs), info);
  answers.set(bs.node_name, { specific: 'throw' });
  const e = thrown(() => bdrv_get_specific_info(bs));
  assert.instance(e, QemuError);
  assert.is((e as Error).message, 'specific info failed');
  assert.is(bdrv_get_specific_info(bs.file!.bs), null);
  const f = open({ driver: 'ibfilter', 'file.driver': 'ibf', 'file.file.driver': 'ibp' });
  answers.set(f.file!.bs.node_name, { specific: info });
  assert.is(bdrv_get_specific_info(f), null, 'a filter does not forward');
  bdrv_unref(f);
  bdrv_unref(bs);
  assert.is(bdrv_get_specific_info(bs), null, 'no driver');
});

test('bdrv_get_allocated_file_size: protocol callback or -ENOTSUP; a format sums data/metadata children, not backing', () => {
  const p = open({ driver: 'ibp', size: 3000 });
  assert.is(bdrv_get_allocated_file_size(p), 3000);
  const pn = open({ driver: 'ibpn' });
  assert.is(bdrv_get_allocated_file_size(pn), -ENOTSUP);
  bdrv_unref(pn);
  const base = open({ driver: 'ibfn', 'file.driver': 'ibp', 'file.size': 100000 });
  const top = open({ driver: 'ibfn', 'file.driver': 'ibp', 'file.size': 5000, backing: base.node_name });
  assert.ok(top.backing);
  assert.is(bdrv_get_allocated_file_size(base), 100000);
  assert.is(bdrv_get_allocated_file_size(top), 5000, 'the backing file is not counted');
  // A second DATA child (like a data file) is added in.
  const extra = open({ driver: 'ibp', size: 700 });
  bdrv_attach_child(top, extra, 'data-file', BDRV_CHILD_DATA);
  assert.is(bdrv_get_allocated_file_size(top), 5700);
  answers.set(extra.node_name, { alloc: -EIO });
  assert.is(bdrv_get_allocated_file_size(top), -EIO, "a child's error is returned");
  bdrv_unref(top);
  bdrv_unref(base);
  // A format over a protocol without the callback: that protocol's -ENOTSUP.
  const fn = open({ driver: 'ibfn', 'file.driver': 'ibpn' });
  assert.is(bdrv_get_allocated_file_size(fn), -ENOTSUP);
  bdrv_unref(fn);
  // A filter: its child's size.
  const f = open({ driver: 'ibfilter', 'file.driver': 'ibp', 'file.size': 1234 });
  assert.is(bdrv_get_allocated_file_size(f), 1234);
  bdrv_unref(f);
  bdrv_unref(p);
  assert.is(bdrv_get_allocated_file_size(p), -ENOMEDIUM);
});

test('bdrv_get_allocated_file_size: a driver callback wins over summing', () => {
  const withCb: BlockDriver = { ...makeFormat('ibfcb'), bdrv_get_allocated_file_size: () => 42 };
  ensureRegistered(withCb);
  const bs = open({ driver: 'ibfcb', 'file.driver': 'ibp' });
  assert.is(bdrv_get_allocated_file_size(bs), 42);
  bdrv_unref(bs);
});

test('dump: scalars as QEMU prints them, dashes in keys as spaces, 4 spaces per level, absent members skipped', () => {
  const text = bdrv_image_info_specific_dump({
    type: 'qcow2',
    data: {
      compat: '1.1',
      'compression-type': 'zlib',
      'lazy-refcounts': false,
      'data-file': undefined,
      'refcount-bits': 16,
      corrupt: false,
      'extended-l2': true,
      empty: '',
      ratio: 0.1,
      big: -1,
    },
  });
  assert.is(
    text,
    '    compat: 1.1\n' +
      '    compression type: zlib\n' +
      '    lazy refcounts: false\n' +
      '    refcount bits: 16\n' +
      '    corrupt: false\n' +
      '    extended l2: true\n' +
      '    empty: \n' +
      '    ratio: 0.10000000000000001\n' +
      '    big: -1\n',
  );
  assert.is(bdrv_image_info_specific_dump({ type: 'x', data: {} }), '');
});

test('dump: nested objects, lists of scalars and of objects, empty lists and objects (dump_qdict/dump_qlist)', () => {
  const text = bdrv_image_info_specific_dump({
    type: 'x',
    data: {
      encrypt: { 'cipher-alg': 'aes-256', slots: [{ active: true, 'key-offset': 4096 }, { active: false }] },
      bitmaps: [{ flags: ['in-use', 'auto'], name: 'b-1' }, { flags: [], name: 'b2' }],
      nested: { deeper: { x: 1 } },
      'no-items': [],
      'no-members': {},
      'list-of-lists': [[1, 2], []],
    },
  });
  assert.is(
    text,
    [
      '    encrypt:',
      '        cipher alg: aes-256',
      '        slots:',
      '            [0]:',
      '                active: true',
      '                key offset: 4096',
      '            [1]:',
      '                active: false',
      '    bitmaps:',
      '        [0]:',
      '            flags:',
      '                [0]: in-use',
      '                [1]: auto',
      '            name: b-1',
      '        [1]:',
      '            flags:',
      '            name: b2',
      '    nested:',
      '        deeper:',
      '            x: 1',
      '    no items:',
      '    no members:',
      '    list of lists:',
      '        [0]:',
      '            [0]: 1',
      '            [1]: 2',
      '        [1]:',
      '',
    ].join('\n'),
  );
});

const QEMU_IMG = '/usr/bin/qemu-img';
test('dump: interop: the "Format specific information" text of qemu-img 7.2 info, from its JSON data', () => {
  if (!fs.existsSync(QEMU_IMG)) {
    console.log(`  skipped: ${QEMU_IMG} is not installed`);
    return;
  }
  fs.mkdirSync('/tmp/t1-core-tests', { recursive: true });
  const dir = fs.mkdtempSync('/tmp/t1-core-tests/block-info-');
  try {
    const bm = `${dir}/bm.qcow2`;
    execFileSync(QEMU_IMG, ['create', '-q', '-f', 'qcow2', bm, '1M']);
    execFileSync(QEMU_IMG, ['bitmap', '--add', bm, 'b1']);
    execFileSync(QEMU_IMG, ['bitmap', '--add', '--disable', bm, 'b-2']);
    // (A LUKS-encrypted image would add a nested object, but creating one takes qemu-img seconds.)
    const v2 = `${dir}/v2.qcow2`;
    execFileSync(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
    for (const img of [bm, v2]) {
      const human = execFileSync(QEMU_IMG, ['info', img], { encoding: 'utf8' });
      const marker = 'Format specific information:\n';
      assert.ok(human.includes(marker), human);
      const want = human.slice(human.indexOf(marker) + marker.length);
      const json = JSON.parse(execFileSync(QEMU_IMG, ['info', '--output=json', img], { encoding: 'utf8' }));
      assert.is(bdrv_image_info_specific_dump(json['format-specific'] as ImageInfoSpecific), want, img);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
