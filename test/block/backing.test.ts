// Backing files (QEMU 7.2 block.c: path_combine, bdrv_dirname, bdrv_get_full_backing_filename,
// bdrv_open_backing_file as bdrv_open_inherit calls it). Chains of real files use a test-only
// format over the real `file` driver: its image starts with a text header naming the backing
// file and format, read at open with bdrv_pread.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  bdrv_all_states,
  bdrv_dirname,
  bdrv_find_node,
  bdrv_get_full_backing_filename,
  bdrv_open,
  bdrv_open_child,
  bdrv_pread,
  bdrv_register,
  bdrv_unref,
  path_combine,
  BDRV_CHILD_COW,
  BDRV_CHILD_IMAGE,
  BDRV_CHILD_PRIMARY,
  BDRV_O_NO_BACKING,
  BDRV_O_NO_FLUSH,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  QemuError,
  type BlockDriver,
  type BlockDriverState,
} from '../../src/index.ts';
import '../../examples/drivers/file.ts';
import { ensureRegistered, makeFormat, makeProto } from '../helpers/mem-driver.ts';
import { thrown } from '../helpers/assert.ts';

const HEADER = 512;
const MAGIC = 'BKTEST1\n';

/** Flags each bkt open saw, by file name (to check what the driver's open was given). */
const openFlags = new Map<string, number>();

/** The test-only format: header "BKTEST1\nbacking=<name>\nformat=<fmt>\n" in the first 512 bytes. */
const bdrv_bkt: BlockDriver = {
  format_name: 'bktest',
  supports_backing: true,
  bdrv_probe(buf) {
    return new TextDecoder().decode(buf.subarray(0, MAGIC.length)) === MAGIC ? 100 : 0;
  },
  bdrv_open(bs, options, flags) {
    bdrv_open_child(null, options, 'file', bs, BDRV_CHILD_IMAGE | BDRV_CHILD_PRIMARY, false);
    const buf = new Uint8Array(HEADER);
    const ret = bdrv_pread(bs.file!, 0, HEADER, buf, 0);
    if (ret < 0) throw new QemuError(`Could not read header: ${ret}`);
    const text = new TextDecoder().decode(buf).replace(/\0+$/, '');
    if (!text.startsWith(MAGIC)) throw new QemuError('Image is not in bktest format');
    for (const line of text.split('\n')) {
      const eq = line.indexOf('=');
      if (eq < 0) continue;
      if (line.slice(0, eq) === 'backing') bs.backing_file = line.slice(eq + 1);
      if (line.slice(0, eq) === 'format') bs.backing_format = line.slice(eq + 1);
    }
    openFlags.set(bs.file!.bs.filename, flags);
  },
  bdrv_getlength(bs) {
    return 65536;
  },
};
bdrv_register(bdrv_bkt);

/** A format over the mem protocol whose backing name/format come from options `bf`/`bfmt`. */
const bdrv_bkopt: BlockDriver = {
  ...makeFormat('bkopt', { supportsBacking: true }),
  runtime_opts: ['bf', 'bfmt'],
};
const openFormat = bdrv_bkopt.bdrv_open!;
bdrv_bkopt.bdrv_open = (bs, options, flags) => {
  const bf = options['bf'];
  const bfmt = options['bfmt'];
  delete options['bf'];
  delete options['bfmt'];
  openFormat(bs, options, flags);
  if (typeof bf === 'string') bs.backing_file = bf;
  if (typeof bfmt === 'string') bs.backing_format = bfmt;
};
ensureRegistered(bdrv_bkopt);
ensureRegistered(makeProto('bkp'));
ensureRegistered(makeFormat('bknb'));

fs.mkdirSync('/tmp/t1-core-tests', { recursive: true });
const root = fs.mkdtempSync('/tmp/t1-core-tests/backing-');

function image(file: string, backing?: string, format?: string): string {
  const full = path.isAbsolute(file) ? file : path.join(root, file);
  fs.mkdirSync(path.dirname(full), { recursive: true });
  let text = MAGIC;
  if (backing !== undefined) text += `backing=${backing}\n`;
  if (format !== undefined) text += `format=${format}\n`;
  const buf = new Uint8Array(HEADER + 4096);
  buf.set(new TextEncoder().encode(text));
  fs.writeFileSync(full, buf);
  return full;
}

/** Nodes open now, as a sorted list of names (to compare before/after). */
function nodes(): string[] {
  return bdrv_all_states()
    .map((b) => `${b.node_name}:${b.drv?.format_name}:${b.filename}`)
    .sort();
}

function errorOf(fn: () => unknown): string {
  const e = thrown(fn);
  assert.instance(e, QemuError);
  return (e as Error).message;
}

function chain(bs: BlockDriverState): string[] {
  const out: string[] = [];
  for (let b: BlockDriverState | null = bs; b; b = b.backing?.bs ?? null) out.push(b.file ? b.file.bs.filename : b.filename);
  return out;
}

test('path_combine: QEMU rules (directory of the base, absolute names kept, protocol prefixes)', () => {
  assert.is(path_combine('/a/b/c.img', 'd.img'), '/a/b/d.img');
  assert.is(path_combine('/a/b/c.img', 'sub/d.img'), '/a/b/sub/d.img');
  assert.is(path_combine('/a/b/c.img', '../d.img'), '/a/b/../d.img');
  assert.is(path_combine('c.img', 'd.img'), 'd.img');
  assert.is(path_combine('x/c.img', 'd.img'), 'x/d.img');
  assert.is(path_combine('/a/b/', 'd.img'), '/a/b/d.img');
  assert.is(path_combine('/a/c.img', '/abs/d.img'), '/abs/d.img');
  assert.is(path_combine('/a/b/c.img', ''), '/a/b/');
  assert.is(path_combine('', 'd'), 'd');
  // A base with a protocol: the prefix is kept even without a '/'.
  assert.is(path_combine('nbd:x', 'y'), 'nbd:y');
  assert.is(path_combine('nbd:unix:/tmp/s', 'y'), 'nbd:unix:/tmp/y');
  assert.is(path_combine('null-co://', ''), 'null-co://');
  // A ':' after a '/' is no protocol.
  assert.is(path_combine('a/b:c', 'd'), 'a/d');
  // The filename's own protocol is not checked here (QEMU: callers do).
  assert.is(path_combine('/a/b.img', 'nbd:x'), '/a/nbd:x');
});

test('bdrv_dirname: through the primary child to the protocol file name; QEMU errors', () => {
  const top = image('dn/top.bkt');
  const bs = bdrv_open(top, { driver: 'bktest' }, 0);
  assert.is(bdrv_dirname(bs), path.join(root, 'dn') + '/');
  assert.is(bdrv_dirname(bs.file!.bs), path.join(root, 'dn') + '/');
  bdrv_unref(bs);
  // Any protocol's file name gives a directory.
  const p = bdrv_open('bkp:some/dir/img', { driver: 'bkp' }, 0);
  assert.is(p.filename, 'bkp:some/dir/img');
  assert.is(bdrv_dirname(p), 'bkp:some/dir/');
  bdrv_unref(p);
  const q = bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', 'node-name': 'dn-q' }, 0);
  assert.is(errorOf(() => bdrv_dirname(q)), 'Cannot generate a base directory for bkp nodes');
  bdrv_unref(q);
  assert.is(errorOf(() => bdrv_dirname(q)), "Node 'dn-q' is ejected");
});

test('bdrv_get_full_backing_filename: "" without one, absolute and protocol names kept, relative ones joined', () => {
  const bs = bdrv_open(image('fb/top.bkt'), { driver: 'bktest' }, 0);
  assert.is(bdrv_get_full_backing_filename(bs), '');
  bs.backing_file = 'base.img';
  assert.is(bdrv_get_full_backing_filename(bs), path.join(root, 'fb', 'base.img'));
  bs.backing_file = '../up/base.img';
  assert.is(bdrv_get_full_backing_filename(bs), path.join(root, 'fb') + '/../up/base.img');
  bs.backing_file = '/abs/base.img';
  assert.is(bdrv_get_full_backing_filename(bs), '/abs/base.img');
  bs.backing_file = 'nbd:localhost:10809';
  assert.is(bdrv_get_full_backing_filename(bs), 'nbd:localhost:10809');
  bdrv_unref(bs);
  // A relative name with nowhere to resolve it: bdrv_dirname's error.
  const q = bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp' }, 0);
  q.backing_file = 'x';
  assert.is(errorOf(() => bdrv_get_full_backing_filename(q)), 'Cannot generate a base directory for bkp nodes');
  bdrv_unref(q);
});

test('open: a relative backing name is resolved against the image directory (not the cwd), read-only, role COW', () => {
  image('rel/base.bkt');
  image('rel/sub/mid.bkt', '../base.bkt', 'bktest');
  const top = image('rel/top.bkt', 'sub/mid.bkt', 'bktest');
  const before = nodes();
  const bs = bdrv_open(top, { driver: 'bktest' }, BDRV_O_RDWR);
  assert.equal(chain(bs), [top, `${root}/rel/sub/mid.bkt`, `${root}/rel/sub/../base.bkt`]);
  assert.is(bs.backing_file, 'sub/mid.bkt');
  assert.is(bs.backing_format, 'bktest');
  const mid = bs.backing!.bs;
  assert.is(bs.backing!.role, BDRV_CHILD_COW);
  assert.is(bs.backing!.name, 'backing');
  assert.is(bs.read_only, false);
  assert.is(mid.read_only, true);
  assert.is(mid.file!.bs.read_only, true);
  assert.is(mid.backing!.bs.read_only, true);
  assert.is(mid.drv!.format_name, 'bktest');
  assert.is(mid.backing!.bs.backing, null);
  assert.is(nodes().length, before.length + 6, 'three formats, three files');
  bdrv_unref(bs);
  assert.equal(nodes(), before);
});

test('open: an image opened by a relative path gets a relative backing path in the same directory', () => {
  image('relcwd/base.bkt');
  const top = image('relcwd/top.bkt', 'base.bkt', 'bktest');
  const rel = path.relative(process.cwd(), top);
  assert.ok(!path.isAbsolute(rel));
  const bs = bdrv_open(rel, { driver: 'bktest' }, 0);
  assert.is(bs.backing!.bs.file!.bs.filename, path.join(path.dirname(rel), 'base.bkt'));
  bdrv_unref(bs);
});

test('open: absolute backing names; the stored format is used, probing otherwise', () => {
  const base = image('abs/base.bkt');
  const top = image('abs/top.bkt', base, 'bktest');
  const bs = bdrv_open(top, { driver: 'bktest' }, 0);
  assert.equal(chain(bs), [top, base]);
  bdrv_unref(bs);
  // No stored format: the backing file's format is probed (bktest's probe).
  const top2 = image('abs/top2.bkt', base);
  const bs2 = bdrv_open(top2, { driver: 'bktest' }, 0);
  assert.is(bs2.backing!.bs.drv!.format_name, 'bktest');
  assert.is(bs2.backing!.bs.probed, true);
  bdrv_unref(bs2);
});

test('open: backing.driver overrides the stored format; backing.file.filename replaces the stored name', () => {
  const base = image('ovr/base.bkt');
  const other = image('ovr/other.bkt');
  const top = image('ovr/top.bkt', 'base.bkt', 'nosuchfmt');
  assert.is(errorOf(() => bdrv_open(top, { driver: 'bktest' }, 0)), "Could not open backing file: Unknown driver 'nosuchfmt'");
  const bs = bdrv_open(top, { driver: 'bktest', 'backing.driver': 'file' }, 0);
  assert.is(bs.backing!.bs.drv!.format_name, 'file');
  assert.is(bs.backing!.bs.filename, base);
  bdrv_unref(bs);
  const bs2 = bdrv_open(top, { driver: 'bktest', 'backing.driver': 'bktest', 'backing.file.filename': other }, 0);
  assert.equal(chain(bs2), [top, other]);
  bdrv_unref(bs2);
  // Nested objects work like dotted keys.
  const bs3 = bdrv_open(top, { driver: 'bktest', backing: { driver: 'bktest', file: { filename: other } } }, 0);
  assert.equal(chain(bs3), [top, other]);
  bdrv_unref(bs3);
});

test('open: the backing inherits the parent flags but is read-only; backing.read-only=off makes it writable', () => {
  image('flags/base.bkt');
  const top = image('flags/top.bkt', 'base.bkt', 'bktest');
  const bs = bdrv_open(top, { driver: 'bktest' }, BDRV_O_RDWR | BDRV_O_NO_FLUSH | BDRV_O_UNMAP);
  const b = bs.backing!.bs;
  assert.is(b.open_flags & (BDRV_O_RDWR | BDRV_O_NO_FLUSH | BDRV_O_UNMAP), BDRV_O_NO_FLUSH | BDRV_O_UNMAP);
  assert.is(b.read_only, true);
  bdrv_unref(bs);
  const bs2 = bdrv_open(top, { driver: 'bktest', 'backing.read-only': 'off' }, BDRV_O_RDWR);
  assert.is(bs2.backing!.bs.read_only, false);
  bdrv_unref(bs2);
});

test('open: a missing backing file fails with QEMU\'s message and leaves no node open', () => {
  const top = image('miss/top.bkt', 'gone.img', 'bktest');
  const before = nodes();
  assert.is(
    errorOf(() => bdrv_open(top, { driver: 'bktest' }, BDRV_O_RDWR)),
    `Could not open backing file: Could not open '${path.join(root, 'miss', 'gone.img')}': No such file or directory`,
  );
  assert.equal(nodes(), before);
  // One level down: the message nests.
  image('miss2/mid.bkt', 'gone.img', 'bktest');
  const top2 = image('miss2/top.bkt', 'mid.bkt', 'bktest');
  assert.is(
    errorOf(() => bdrv_open(top2, { driver: 'bktest' }, 0)),
    `Could not open backing file: Could not open backing file: Could not open '${path.join(root, 'miss2', 'gone.img')}': No such file or directory`,
  );
  assert.equal(nodes(), before);
});

test('open: a self-loop and a two-image loop are refused, without hanging or leaking nodes', () => {
  const self = image('loop/self.bkt', 'self.bkt', 'bktest');
  const before = nodes();
  assert.is(errorOf(() => bdrv_open(self, { driver: 'bktest' }, 0)), "Could not open backing file: Backing file 'self.bkt' creates an infinite loop.");
  assert.equal(nodes(), before);
  const a = image('loop/a.bkt', 'b.bkt', 'bktest');
  image('loop/b.bkt', 'a.bkt', 'bktest');
  assert.is(
    errorOf(() => bdrv_open(a, { driver: 'bktest' }, BDRV_O_RDWR)),
    "Could not open backing file: Could not open backing file: Backing file 'a.bkt' creates an infinite loop.",
  );
  assert.equal(nodes(), before);
  // A different spelling of the same file (./, a symlink, an absolute path) is the same file.
  const c = image('loop/c.bkt', './c.bkt', 'bktest');
  assert.is(errorOf(() => bdrv_open(c, { driver: 'bktest' }, 0)), "Could not open backing file: Backing file './c.bkt' creates an infinite loop.");
  fs.symlinkSync(path.join(root, 'loop/d.bkt'), path.join(root, 'loop/link.bkt'));
  const d = image('loop/d.bkt', 'link.bkt', 'bktest');
  assert.is(errorOf(() => bdrv_open(d, { driver: 'bktest' }, 0)), "Could not open backing file: Backing file 'link.bkt' creates an infinite loop.");
  const e = image('loop/e.bkt', path.join(root, 'loop/e.bkt'), 'bktest');
  assert.match(errorOf(() => bdrv_open(e, { driver: 'bktest' }, 0)), /creates an infinite loop\.$/);
  assert.equal(nodes(), before);
  // After those failures nothing is left marked as being opened: a good chain opens, twice.
  const ok = image('loop/ok.bkt', 'ok-base.bkt', 'bktest');
  image('loop/ok-base.bkt');
  const bs = bdrv_open(ok, { driver: 'bktest' }, 0);
  const bs2 = bdrv_open(ok, { driver: 'bktest' }, 0);
  assert.is(bs2.backing!.bs.backing, null);
  bdrv_unref(bs2);
  bdrv_unref(bs);
  assert.equal(nodes(), before);
});

test('open: BDRV_O_NO_BACKING and backing: null open no backing file; the driver sees the flag', () => {
  image('nb/base.bkt');
  const top = image('nb/top.bkt', 'base.bkt', 'bktest');
  const bs = bdrv_open(top, { driver: 'bktest' }, BDRV_O_NO_BACKING);
  assert.is(bs.backing, null);
  assert.is(bs.backing_file, 'base.bkt');
  assert.ok(bs.open_flags & BDRV_O_NO_BACKING);
  bdrv_unref(bs);
  for (const v of [null, '']) {
    const bs2 = bdrv_open(top, { driver: 'bktest', backing: v }, 0);
    assert.is(bs2.backing, null);
    assert.ok(bs2.open_flags & BDRV_O_NO_BACKING);
    assert.ok(openFlags.get(top)! & BDRV_O_NO_BACKING, "the driver's open saw BDRV_O_NO_BACKING");
    bdrv_unref(bs2);
  }
  // Without it, the flag is clear.
  const bs3 = bdrv_open(top, { driver: 'bktest' }, 0);
  assert.is(bs3.open_flags & BDRV_O_NO_BACKING, 0);
  assert.is(openFlags.get(top)! & BDRV_O_NO_BACKING, 0);
  bdrv_unref(bs3);
  // Missing backing file but BDRV_O_NO_BACKING: opens fine.
  const bs4 = bdrv_open(image('nb/top2.bkt', 'gone.img', 'bktest'), { driver: 'bktest' }, BDRV_O_NO_BACKING);
  assert.is(bs4.backing, null);
  bdrv_unref(bs4);
});

test('open: backing = a node name references that node (a new reference); errors of references', () => {
  const base = bdrv_open(null, { driver: 'bkp', 'node-name': 'bk-base' }, 0);
  const top = bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', bf: 'ignored.img', bfmt: 'nosuch', backing: 'bk-base' }, 0);
  assert.is(top.backing!.bs, base);
  assert.is(base.refcnt, 2);
  assert.is(top.backing!.role, BDRV_CHILD_COW);
  bdrv_unref(top);
  assert.is(base.refcnt, 1);
  assert.is(bdrv_find_node('bk-base'), base);
  const before = nodes();
  assert.is(
    errorOf(() => bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', backing: 'bk-base', 'backing.driver': 'bkp' }, 0)),
    'Could not open backing file: Cannot reference an existing block device with additional options or a new filename',
  );
  assert.is(errorOf(() => bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', backing: 'nope' }, 0)), "Could not open backing file: Cannot find device='nope' nor node-name='nope'");
  assert.equal(nodes(), before);
  assert.is(base.refcnt, 1);
  // aioco: the node object itself works as for `file`.
  const top2 = bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', bf: 'ignored.img', backing: base }, 0);
  assert.is(top2.backing!.bs, base);
  assert.is(base.refcnt, 2);
  bdrv_unref(top2);
  assert.is(
    errorOf(() => bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', backing: base, 'backing.driver': 'bkp' }, 0)),
    'Could not open backing file: Cannot reference an existing block device with additional options or a new filename',
  );
  assert.is(base.refcnt, 1);
  bdrv_unref(base);
});

test('open: a node given itself as backing is refused as a cycle (QEMU\'s message, no prefix), no leak', () => {
  const before = nodes();
  assert.is(
    errorOf(() => bdrv_open(null, { driver: 'bkopt', 'node-name': 'bk-self', 'file.driver': 'bkp', backing: 'bk-self' }, 0)),
    "Making 'bk-self' a backing child of 'bk-self' would create a cycle",
  );
  assert.equal(nodes(), before);
  assert.is(bdrv_find_node('bk-self'), null);
});

test('open: backing options without a stored name are used (QEMU), and fail as QEMU does when incomplete', () => {
  const before = nodes();
  assert.is(
    errorOf(() => bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', 'backing.node-name': 'zz' }, 0)),
    'Could not open backing file: Must specify either driver or file',
  );
  assert.equal(nodes(), before);
  const bs = bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', 'backing.driver': 'bkp', 'backing.node-name': 'bk-opt' }, 0);
  assert.is(bs.backing!.bs.node_name, 'bk-opt');
  assert.is(bs.backing!.bs.read_only, true);
  bdrv_unref(bs);
  // Neither a stored name nor options: no backing, and no BDRV_O_NO_BACKING either.
  const none = bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp' }, 0);
  assert.is(none.backing, null);
  assert.is(none.open_flags & BDRV_O_NO_BACKING, 0);
  bdrv_unref(none);
  assert.equal(nodes(), before);
});

test('open: a stored relative name where there is no directory: bdrv_dirname\'s error, unprefixed', () => {
  const before = nodes();
  assert.is(errorOf(() => bdrv_open(null, { driver: 'bkopt', 'file.driver': 'bkp', bf: 'rel.img' }, 0)), 'Cannot generate a base directory for bkp nodes');
  // A protocol file name gives a directory; the backing is then looked up there.
  const bs = bdrv_open('bkp:dir/img', { driver: 'bkopt', bf: 'rel.img', bfmt: 'bkopt' }, 0);
  assert.is(bs.backing!.bs.drv!.format_name, 'bkopt');
  assert.is(bs.backing!.bs.file!.bs.filename, 'bkp:dir/rel.img');
  bdrv_unref(bs);
  assert.equal(nodes(), before);
});

test("open: a format without backing support takes backing: null but refuses a backing (QEMU's message)", () => {
  const before = nodes();
  const bs = bdrv_open(null, { driver: 'bknb', 'file.driver': 'bkp', backing: null }, 0);
  assert.is(bs.backing, null);
  bdrv_unref(bs);
  const base = bdrv_open(null, { driver: 'bkp', 'node-name': 'bk-nb-base' }, 0);
  assert.is(errorOf(() => bdrv_open(null, { driver: 'bknb', 'file.driver': 'bkp', backing: 'bk-nb-base' }, 0)), "Driver doesn't support backing files");
  assert.is(errorOf(() => bdrv_open(null, { driver: 'bknb', 'file.driver': 'bkp', 'backing.driver': 'bkp' }, 0)), "Driver doesn't support backing files");
  assert.is(base.refcnt, 1);
  bdrv_unref(base);
  assert.equal(nodes(), before);
});

test.after(() => fs.rmSync(root, { recursive: true, force: true }));

test.run();
