// Opening and closing nodes (qemu-block.md 2.x, issue 4; QEMU 7.2 block.c bdrv_open_inherit,
// bdrv_open_child_bs, bdrv_lookup_bs, bdrv_assign_node_name, bdrv_unref).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_all_states,
  bdrv_find_node,
  bdrv_getlength,
  bdrv_is_read_only,
  bdrv_open,
  bdrv_ref,
  bdrv_unref,
  blk_new_open,
  QemuError,
  BDRV_O_RDWR,
} from '../../src/index.ts';
import { closed, ensureRegistered, makeFormat, makeProto } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('op'));
ensureRegistered(makeFormat('ofmt'));

function msg(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    return e instanceof QemuError ? e.message : `not a QemuError: ${String(e)}`;
  }
  return 'no error';
}

test('open: driver= selects the format, dotted keys configure the file child', () => {
  const bs = bdrv_open(null, { driver: 'ofmt', 'file.driver': 'op', 'file.size': 8192, 'node-name': 'd1' }, BDRV_O_RDWR);
  assert.equal([bs.drv!.format_name, bs.file!.bs.drv!.format_name, bs.node_name], ['ofmt', 'op', 'd1']);
  assert.is(bdrv_getlength(bs), 8192);
  assert.equal(bs.children.map((c) => c.name), ['file']);
  assert.equal(bs.file!.bs.parents.map((c) => c.opaque === bs), [true]);
  bdrv_unref(bs);
});

test('open: nested objects and json:{...} filenames mean the same as dotted keys', () => {
  const a = bdrv_open(null, { driver: 'ofmt', file: { driver: 'op', size: 2048 } }, BDRV_O_RDWR);
  const b = bdrv_open('json:{"driver":"ofmt","file":{"driver":"op","size":1024}}', {}, BDRV_O_RDWR);
  assert.equal([a.drv!.format_name, bdrv_getlength(a), b.drv!.format_name, bdrv_getlength(b)], ['ofmt', 2048, 'ofmt', 1024]);
  assert.is(msg(() => bdrv_open('json:[1]', {}, 0)), 'Invalid JSON object given');
  bdrv_unref(a);
  bdrv_unref(b);
});

test('open errors: unknown driver, unknown options at format and protocol level, missing file', () => {
  assert.is(msg(() => bdrv_open(null, { driver: 'nosuch' }, 0)), "Unknown driver 'nosuch'");
  assert.is(msg(() => bdrv_open(null, { driver: 'ofmt', 'file.driver': 'op', bogus: 1 }, 0)), "Block format 'ofmt' does not support the option 'bogus'");
  assert.is(msg(() => bdrv_open(null, { driver: 'ofmt', 'file.driver': 'op', 'file.bogus': 1 }, 0)), "Block protocol 'op' doesn't support the option 'bogus'");
  assert.is(msg(() => bdrv_open(null, { driver: 'ofmt' }, 0)), 'A block device must be specified for "file"');
  assert.is(msg(() => bdrv_open(null, { driver: 'op', 'read-only': 'maybe' }, 0)), "Parameter 'read-only' expects 'on' or 'off'");
  assert.equal(bdrv_all_states(), [], 'failed opens leave no node behind');
});

test('open: node references; an unknown reference names it as device and node', () => {
  const p = bdrv_open(null, { driver: 'op', 'node-name': 'ref1' }, BDRV_O_RDWR);
  const f = bdrv_open(null, { driver: 'ofmt', file: 'ref1' }, BDRV_O_RDWR);
  assert.is(f.file!.bs, p);
  assert.is(p.refcnt, 2);
  assert.is(msg(() => bdrv_open(null, { driver: 'ofmt', file: 'nosuch' }, 0)), "Cannot find device='nosuch' nor node-name='nosuch'");
  assert.is(msg(() => blk_new_open(null, 'nosuch', {}, 0)), "Cannot find device='nosuch' nor node-name='nosuch'");
  bdrv_unref(f);
  assert.is(p.refcnt, 1);
  bdrv_unref(p);
});

test('open: a reference with extra child options is refused', () => {
  const p = bdrv_open(null, { driver: 'op', 'node-name': 'ref2' }, BDRV_O_RDWR);
  assert.is(
    msg(() => bdrv_open(null, { driver: 'ofmt', file: 'ref2', 'file.size': 512 }, 0)),
    'Cannot reference an existing block device with additional options or a new filename',
  );
  assert.is(p.refcnt, 1);
  bdrv_unref(p);
});

test('open: node names are unique and must be well formed', () => {
  const p = bdrv_open(null, { driver: 'op', 'node-name': 'n1' }, 0);
  assert.is(bdrv_find_node('n1'), p);
  assert.is(msg(() => bdrv_open(null, { driver: 'op', 'node-name': 'n1' }, 0)), "Duplicate nodes with node-name='n1'");
  assert.is(msg(() => bdrv_open(null, { driver: 'op', 'node-name': '1abc' }, 0)), "Invalid node-name: '1abc'");
  bdrv_unref(p);
  assert.is(bdrv_find_node('n1'), null);
});

test('open: read-only comes from the flags or read-only=on, and the file child inherits it', () => {
  const ro = bdrv_open(null, { driver: 'ofmt', 'file.driver': 'op' }, 0);
  const rw = bdrv_open(null, { driver: 'ofmt', 'file.driver': 'op' }, BDRV_O_RDWR);
  const opt = bdrv_open(null, { driver: 'ofmt', 'file.driver': 'op', 'read-only': 'on' }, BDRV_O_RDWR);
  assert.equal(
    [ro, rw, opt].map((bs) => [bdrv_is_read_only(bs), bdrv_is_read_only(bs.file!.bs)]),
    [
      [true, true],
      [false, false],
      [true, true],
    ],
  );
  for (const bs of [ro, rw, opt]) bdrv_unref(bs);
});

test('reference counting: the last unref closes once, releases children and the node name', () => {
  closed.length = 0;
  const bs = bdrv_open(null, { driver: 'ofmt', 'node-name': 'rc', 'file.driver': 'op', 'file.node-name': 'rcf' }, BDRV_O_RDWR);
  const file = bs.file!.bs;
  bdrv_ref(bs);
  bdrv_unref(bs);
  assert.equal([bs.refcnt, closed, bs.drv !== null], [1, [], true]);
  bdrv_unref(bs);
  assert.equal([bs.refcnt, closed, bs.drv, file.drv, file.refcnt], [0, ['rc'], null, null, 0]);
  assert.equal([bdrv_find_node('rc'), bdrv_find_node('rcf')], [null, null]);
  assert.equal(bdrv_all_states().filter((x) => x === bs || x === file), []);
  assert.is(msg(() => bdrv_unref(bs)), "bdrv_unref: Assertion 'bs->refcnt > 0' failed");
});

test.run();
