// Image creation in the core (QEMU 7.2 block.c: bdrv_create, bdrv_co_create,
// bdrv_co_create_file) with test drivers, and with the real file and raw drivers.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  bdrv_co_create,
  bdrv_co_create_file,
  bdrv_create,
  bdrv_register,
  qemu_in_coroutine,
  qemu_opt_get_del,
  qemu_opt_get_size_del,
  qemu_opts_append,
  qemu_opts_create,
  qemu_opts_do_parse,
  qemu_opts_print,
  qemu_opt_set_number,
  ENOSPC,
  QemuError,
  type BlockDriver,
  type QemuOpts,
  type QemuOptsList,
} from '../../src/index.ts';
import { bdrv_file } from '../../examples/drivers/file.ts';
import { bdrv_raw } from '../../examples/drivers/raw.ts';
import { runCo } from '../helpers/mem-driver.ts';
import { thrown } from '../helpers/assert.ts';

fs.mkdirSync('/tmp/t1-core-tests', { recursive: true });
const dir = fs.mkdtempSync('/tmp/t1-core-tests/create-');
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

function errorOf(fn: () => unknown): string {
  const e = thrown(fn);
  assert.instance(e, QemuError);
  return (e as Error).message;
}

/** What the recording protocol's create saw. */
const seen: { filename: string; printed: string; inCo: boolean }[] = [];
const crp_create_opts: QemuOptsList = {
  name: 'crp-create-opts',
  desc: [
    { name: 'size', type: 'size' },
    { name: 'preallocation', type: 'string', def_value_str: 'proto-default' },
    { name: 'nocow', type: 'bool' },
  ],
};
/** A protocol `crp:` whose create records its options; `size=13` makes it return -ENOSPC. */
const crp: BlockDriver = {
  format_name: 'crp',
  protocol_name: 'crp',
  create_opts: crp_create_opts,
  *bdrv_co_create_opts(_drv, filename, opts) {
    seen.push({ filename, printed: qemu_opts_print(opts, ' '), inCo: qemu_in_coroutine() });
    if (qemu_opt_get_size_del(opts, 'size', 0) === 13) return -ENOSPC;
    if (qemu_opt_get_del(opts, 'preallocation') === 'boom') throw new QemuError('crp: boom');
    return 0;
  },
};
/** A protocol with create_opts but no create callback, and one with neither. */
const crpNoCb: BlockDriver = { format_name: 'crpnocb', protocol_name: 'crpnocb', create_opts: crp_create_opts };
const crpNone: BlockDriver = { format_name: 'crpnone', protocol_name: 'crpnone' };
/** A format that takes its own options and creates its file with the rest. */
const crf_create_opts: QemuOptsList = {
  name: 'crf-create-opts',
  desc: [
    { name: 'size', type: 'size' },
    { name: 'cluster_size', type: 'size', def_value_str: '65536' },
    { name: 'preallocation', type: 'string', def_value_str: 'fmt-default' },
  ],
};
const crfLog: string[] = [];
const crf: BlockDriver = {
  format_name: 'crf',
  create_opts: crf_create_opts,
  *bdrv_co_create_opts(_drv, filename, opts) {
    crfLog.push(`cluster_size=${qemu_opt_get_size_del(opts, 'cluster_size', 0)}`);
    return yield* bdrv_co_create_file(filename, opts);
  },
};
for (const d of [crp, crpNoCb, crpNone, crf]) bdrv_register(d);

function optsOf(list: QemuOptsList, params: string): QemuOpts {
  const o = qemu_opts_create(list);
  qemu_opts_do_parse(o, params, null);
  return o;
}

test('bdrv_create: runs the driver in a coroutine, returns 0, consumes the options it read', () => {
  seen.length = 0;
  const opts = optsOf(crp_create_opts, 'size=1M,nocow=on');
  assert.is(bdrv_create(crp, 'crp:img', opts), 0);
  assert.equal(seen, [{ filename: 'crp:img', printed: 'size=1048576 preallocation=proto-default nocow=on', inCo: true }]);
  assert.equal(opts.opts.map((o) => o.name), ['nocow'], 'size was read with _del');
});

test("bdrv_create / bdrv_co_create: QEMU's messages: no create callback; -errno without a message; the driver's own", () => {
  assert.is(errorOf(() => bdrv_create(crpNoCb, 'x', qemu_opts_create(crp_create_opts))), "Driver 'crpnocb' does not support image creation");
  assert.is(errorOf(() => bdrv_create(crpNone, 'x', qemu_opts_create(crp_create_opts))), "Driver 'crpnone' does not support image creation");
  assert.is(errorOf(() => bdrv_create(crp, 'crp:x', optsOf(crp_create_opts, 'size=13'))), 'Could not create image: No space left on device');
  assert.is(errorOf(() => bdrv_create(crp, 'crp:x', optsOf(crp_create_opts, 'preallocation=boom'))), 'crp: boom');
  // The coroutine form throws the same from inside the coroutine.
  const r = runCo(() => bdrv_co_create(crp, 'crp:x', optsOf(crp_create_opts, 'size=13')));
  assert.ok(r.done);
  assert.instance(r.err, QemuError);
  assert.is((r.err as Error).message, 'Could not create image: No space left on device');
  const ok = runCo(() => bdrv_co_create(crp, 'crp:y', optsOf(crp_create_opts, 'size=1')));
  assert.equal(ok, { done: true, ret: 0 });
});

test('bdrv_co_create_file: the protocol gets the options still set (last value), its own defaults, not the format\'s', () => {
  seen.length = 0;
  crfLog.length = 0;
  const merged = qemu_opts_append(qemu_opts_append(null, crf_create_opts), crp_create_opts);
  assert.equal(merged.desc.map((d) => d.name), ['size', 'cluster_size', 'preallocation', 'nocow']);
  const opts = optsOf(merged, 'nocow=on,size=1k,cluster_size=4k,size=2k');
  assert.is(bdrv_create(crf, 'crp:a/b', opts), 0);
  assert.equal(crfLog, ['cluster_size=4096']);
  // size: the last value; preallocation unset: the protocol's default, not "fmt-default".
  assert.equal(seen, [{ filename: 'crp:a/b', printed: 'size=2048 preallocation=proto-default nocow=on', inCo: true }]);
});

test('bdrv_co_create_file: an option left unconsumed that the protocol does not know is refused (QEMU)', () => {
  seen.length = 0;
  const fmtOnly: QemuOptsList = { name: 'f', desc: [{ name: 'size', type: 'size' }, { name: 'compat', type: 'string' }] };
  const opts = optsOf(fmtOnly, 'size=1k,compat=1.1');
  const r = runCo(() => bdrv_co_create_file('crp:x', opts));
  assert.instance(r.err, QemuError);
  assert.is((r.err as Error).message, "Invalid parameter 'compat'");
  assert.equal(seen, []);
  // A bad value for the protocol's type: the protocol's message.
  const r2 = runCo(() => bdrv_co_create_file('crp:x', optsOf({ name: 'any', desc: [] }, 'nocow=maybe')));
  assert.is((r2.err as Error).message, "Parameter 'nocow' expects 'on' or 'off'");
});

test('bdrv_co_create_file: protocol lookup and support errors', () => {
  const run = (filename: string) => (runCo(() => bdrv_co_create_file(filename, qemu_opts_create({ name: 'any', desc: [] }))).err as Error).message;
  assert.is(run('nosuchproto:x'), "Unknown protocol 'nosuchproto'");
  assert.is(run('crpnone:x'), "Driver 'crpnone' does not support image creation");
  assert.is(run('crpnocb:x'), "Driver 'crpnocb' does not support image creation");
});

test('raw over file: bdrv_create makes the host file of the size asked (rounded up to 512), options printed like qemu-img', () => {
  const list = qemu_opts_append(qemu_opts_append(null, bdrv_raw.create_opts!), bdrv_file.create_opts!);
  const opts = optsOf(list, 'size=1000,preallocation=off');
  // qemu-img 7.2: "Formatting 'x', fmt=raw size=1000 preallocation=off".
  assert.is(qemu_opts_print(opts, ' '), 'size=1000 preallocation=off');
  const f = path.join(dir, 'raw1.img');
  assert.is(bdrv_create(bdrv_raw, f, opts), 0);
  assert.is(fs.statSync(f).size, 1024);
  assert.is(fs.statSync(f).mode & 0o777, 0o644 & ~process.umask());
});

test('raw over file: errors come from the file driver with QEMU\'s messages', () => {
  const list = qemu_opts_append(qemu_opts_append(null, bdrv_raw.create_opts!), bdrv_file.create_opts!);
  assert.is(errorOf(() => bdrv_create(bdrv_raw, '/nonexist/x', optsOf(list, 'size=1M'))), "Could not create '/nonexist/x': No such file or directory");
  const bad = path.join(dir, 'bad.img');
  assert.is(errorOf(() => bdrv_create(bdrv_raw, bad, optsOf(list, 'size=1M,preallocation=xyz'))), 'invalid parameter value: xyz');
  assert.is(fs.existsSync(bad), false, 'an invalid mode creates nothing');
  const meta = path.join(dir, 'meta.img');
  assert.is(errorOf(() => bdrv_create(bdrv_raw, meta, optsOf(list, 'size=1M,preallocation=metadata'))), 'Unsupported preallocation mode: metadata');
  assert.is(fs.statSync(meta).size, 0, 'as qemu-img 7.2: the file is created, empty');
});


const QEMU_IMG = '/usr/bin/qemu-img';
test('interop: -o parsing, printing and messages match qemu-img 7.2 create -f raw (raw + file options)', () => {
  if (!fs.existsSync(QEMU_IMG)) {
    console.log(`  skipped: ${QEMU_IMG} is not installed`);
    return;
  }
  const list = qemu_opts_append(qemu_opts_append(null, bdrv_raw.create_opts!), bdrv_file.create_opts!);
  const f = path.join(dir, 'interop.img');
  const cases = [
    'preallocation=off',
    'nocow=yes,extent_size_hint=1k',
    'extent_size_hint=0x10,preallocation=full',
    'nonocow,id=foo',
    'nocow=on,nocow=off',
    'nocow',
    'size=abc',
    'nocow=maybe',
    'bogus=1',
    'extent_size_hint=16E',
    'extent_size_hint=1.5',
  ];
  for (const params of cases) {
    const q = spawnSync(QEMU_IMG, ['create', '-f', 'raw', '-o', params, f, '1M'], { encoding: 'utf8' });
    let ours: string;
    try {
      const opts = qemu_opts_create(list);
      qemu_opts_do_parse(opts, params, null);
      qemu_opt_set_number(opts, 'size', 1048576);
      ours = `Formatting '${f}', fmt=raw ${qemu_opts_print(opts, ' ')}\n`;
      assert.is(q.stdout, ours, params);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      assert.is(q.stdout, '', params);
      assert.is(q.stderr.split('\n')[0], `qemu-img: ${f}: ${e.message}`, params);
    }
    fs.rmSync(f, { force: true });
  }
});

test.run();
