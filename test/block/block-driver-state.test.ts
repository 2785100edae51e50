// Opening and closing nodes (qemu-block.md 2.x, issue 4; QEMU 7.2 block.c bdrv_open_inherit,
// bdrv_open_child_bs, bdrv_lookup_bs, bdrv_assign_node_name, bdrv_unref).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  bdrv_all_states,
  bdrv_attach_child,
  bdrv_find_node,
  bdrv_getlength,
  bdrv_is_read_only,
  bdrv_open,
  bdrv_open_file_child,
  bdrv_primary_bs,
  bdrv_primary_child,
  bdrv_ref,
  bdrv_unref,
  bdrv_unref_child,
  blk_new_open,
  BlockDriverState,
  QemuError,
  BDRV_CHILD_COW,
  BDRV_CHILD_DATA,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_IMAGE,
  BDRV_CHILD_METADATA,
  BDRV_CHILD_PRIMARY,
  BDRV_O_RDWR,
  type BlockDriver,
} from '../../src/index.ts';
import { closed, ensureRegistered, makeFormat, makeProto } from '../helpers/mem-driver.ts';

ensureRegistered(makeProto('op'));
ensureRegistered(makeFormat('ofmt'));

/** Formats and filters whose open calls bdrv_open_file_child(x-image, options, 'image', bs). */
function openFileChildDriver(name: string, is_filter: boolean): BlockDriver {
  return ensureRegistered({
    format_name: name,
    is_filter,
    runtime_opts: ['x-image'],
    bdrv_open(bs, options) {
      const ret = bdrv_open_file_child((options['x-image'] as string | undefined) ?? null, options, 'image', bs);
      bs.opaque = { ret };
    },
    bdrv_getlength(bs) {
      return bdrv_getlength(bs.file!.bs);
    },
  });
}
openFileChildDriver('ofcfilter', true);
openFileChildDriver('ofcformat', false);

/** A parent node with driver `drv` (not opened) for attach tests. */
function parentWith(drv: BlockDriver): BlockDriverState {
  const p = new BlockDriverState();
  p.drv = drv;
  return p;
}

/** A fresh protocol node handed over to bdrv_attach_child (which takes the reference). */
function child(): BlockDriverState {
  return bdrv_open(null, { driver: 'op', filename: 'c' }, BDRV_O_RDWR);
}

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

// ---------------------------------------------------------------------------------------------
// bs->file and bs->backing follow the child's role (7.2 bdrv_child_cb_attach), bdrv_open_file_child

test('BDRV_CHILD_IMAGE is DATA | METADATA | PRIMARY, as in QEMU', () => {
  assert.is(BDRV_CHILD_IMAGE, BDRV_CHILD_DATA | BDRV_CHILD_METADATA | BDRV_CHILD_PRIMARY);
});

test('bdrv_open_file_child: a filter\'s primary child named image is bs.file, FILTERED|PRIMARY', () => {
  const bs = bdrv_open(null, { driver: 'ofcfilter', 'image.driver': 'op', 'image.size': 8192 }, BDRV_O_RDWR);
  assert.equal(bs.children.map((c) => [c.name, c.role]), [['image', BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY]]);
  assert.is(bs.file, bs.children[0]);
  assert.equal([bs.backing, bdrv_primary_child(bs), bdrv_primary_bs(bs), bs.opaque.ret], [null, bs.file, bs.file!.bs, 0]);
  assert.is(bdrv_getlength(bs), 8192);
  bdrv_unref(bs);
});

test('bdrv_open_file_child: a format\'s primary child is BDRV_CHILD_IMAGE; a filename works too; it is mandatory', () => {
  const bs = bdrv_open(null, { driver: 'ofcformat', 'x-image': 'op:img' }, BDRV_O_RDWR);
  assert.equal(bs.children.map((c) => [c.name, c.role]), [['image', BDRV_CHILD_IMAGE]]);
  assert.is(bs.file, bs.children[0]);
  assert.is(bs.file!.bs.drv!.format_name, 'op');
  bdrv_unref(bs);
  assert.is(msg(() => bdrv_open(null, { driver: 'ofcformat' }, BDRV_O_RDWR)), 'A block device must be specified for "image"');
});

test('bdrv_open_file_child refuses a filter whose filtered child is backing (QEMU asserts)', () => {
  const p = parentWith({ format_name: 'mirror-top-like', is_filter: true, filtered_child_is_backing: true });
  assert.is(
    msg(() => bdrv_open_file_child(null, { 'image.driver': 'op' }, 'image', p)),
    "bdrv_open_file_child: Assertion '!parent->drv->filtered_child_is_backing' failed",
  );
  assert.equal(p.children, []);
});

test('bdrv_attach_child: the role decides bs.file and bs.backing, not the name', () => {
  const fmt = parentWith({ format_name: 'f', supports_backing: true });
  const named_file = bdrv_attach_child(fmt, child(), 'file', BDRV_CHILD_DATA);
  assert.equal([fmt.file, fmt.backing], [null, null]);
  const primary = bdrv_attach_child(fmt, child(), 'data', BDRV_CHILD_IMAGE);
  const cow = bdrv_attach_child(fmt, child(), 'older', BDRV_CHILD_COW);
  assert.equal([fmt.file === primary, fmt.backing === cow], [true, true]);
  bdrv_unref_child(fmt, primary);
  bdrv_unref_child(fmt, cow);
  assert.equal([fmt.file, fmt.backing], [null, null]);
  bdrv_unref_child(fmt, named_file);

  // A filter with filtered_child_is_backing keeps its primary child in bs.backing.
  const top = parentWith({ format_name: 'top', is_filter: true, filtered_child_is_backing: true });
  const c = bdrv_attach_child(top, child(), 'backing', BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY);
  assert.equal([top.file, top.backing === c], [null, true]);
  bdrv_unref_child(top, c);
});

test('bdrv_attach_child: QEMU\'s assertions, the handed-over reference is dropped', () => {
  const fmt = parentWith({ format_name: 'f' });
  const first = bdrv_attach_child(fmt, child(), 'file', BDRV_CHILD_IMAGE);
  const second = child();
  assert.is(msg(() => bdrv_attach_child(fmt, second, 'other', BDRV_CHILD_IMAGE)), "bdrv_child_cb_attach: Assertion '!bs->file' failed");
  assert.equal([second.refcnt, second.drv, fmt.children.length], [0, null, 1]);
  assert.is(msg(() => bdrv_attach_child(fmt, child(), 'backing', BDRV_CHILD_COW)), "bdrv_child_cb_attach: Assertion 'bs->drv->supports_backing' failed");
  const filter = parentWith({ format_name: 'flt', is_filter: true });
  assert.is(
    msg(() => bdrv_attach_child(filter, child(), 'x', BDRV_CHILD_COW)),
    "bdrv_child_cb_attach: Assertion '!(child->role & BDRV_CHILD_COW)' failed",
  );
  assert.is(
    msg(() => bdrv_attach_child(filter, child(), 'x', BDRV_CHILD_FILTERED)),
    "bdrv_child_cb_attach: Assertion '!(child->role & BDRV_CHILD_FILTERED)' failed",
  );
  // A second PRIMARY child slipped in by hand: bdrv_primary_child refuses to choose.
  fmt.children.push(fmt.children[0]!);
  assert.is(msg(() => bdrv_primary_child(fmt)), "bdrv_primary_child: Assertion '!found' failed");
  fmt.children.pop();
  bdrv_unref_child(fmt, first);
});

test.run();
