/**
 * aioco-img (issue 5, qemu-block.md section 5) at unit level: qemu-img 7.2's option parsing and
 * messages, exit codes, the formatting helpers (size_to_str, %0.2f ties, QDict JSON order,
 * progress) and the copy engine's zero detection; then whole subcommands run in-process on
 * temporary raw images (no QEMU needed).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { run } from 'effection';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import {
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_OFFSET_VALID,
  EIO,
  bdrv_find_format,
  qemu_init_main_loop,
  type BdrvCheckResult,
  type BlockStatusOut,
  type CoroutineFn,
} from '../../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto } from '../../helpers/mem-driver.ts';
import { aiocoImg, loadImgDrivers } from '../../../examples/tools/aioco-img.ts';
import {
  QemuProgress,
  coTask,
  coYieldIfDue,
  cvtnum_full,
  getopt_long,
  qobject_to_json_pretty,
  type CoTask,
  type ImgIo,
} from '../../../examples/tools/qemu-img-cmds.ts';
import { bdrv_snapshot_dump, size_to_str } from '../../../examples/tools/qemu-img-info.ts';
import { has_help_option, is_valid_option_list } from '../../../examples/tools/qemu-img-create.ts';
import { compare_buffers, find_nonzero } from '../../../examples/tools/qemu-img-compare.ts';
import { is_allocated_sectors, is_allocated_sectors_min } from '../../../examples/tools/qemu-img-convert.ts';
import { dump_human_image_check, image_check_of } from '../../../examples/tools/qemu-img-check.ts';
import { entry_mergeable, type MapEntry } from '../../../examples/tools/qemu-img-map.ts';
import { c_fixed } from '../../../examples/tools/qemu-io-format.ts';

await loadImgDrivers();
qemu_init_main_loop();

const work = mkdtempSync(path.join(tmpdir(), 'aioco-img-'));

interface Captured extends ImgIo {
  o: string;
  e: string;
}
function sink(): Captured {
  const c: Captured = { o: '', e: '', out: (s) => void (c.o += s), err: (s) => void (c.e += s) };
  return c;
}

/** Runs aioco-img in-process with `args`, from the work directory. */
async function img(...args: string[]): Promise<{ rc: number; out: string; err: string }> {
  const io = sink();
  const cwd = process.cwd();
  process.chdir(work);
  try {
    const rc = await run(() => aiocoImg(args, io));
    return { rc, out: io.o, err: io.e };
  } finally {
    process.chdir(cwd);
  }
}

const TRY = "Try 'qemu-img --help' for more information\n";

test('size_to_str: %0.3g with a binary unit, switching at 1000 of the smaller unit', () => {
  assert.is(size_to_str(0), '0 B');
  assert.is(size_to_str(999), '999 B');
  assert.is(size_to_str(1000), '0.977 KiB');
  assert.is(size_to_str(69632), '68 KiB');
  assert.is(size_to_str(67108864), '64 MiB');
  assert.is(size_to_str(1380352), '1.32 MiB');
  assert.is(size_to_str(1024000), '0.977 MiB');
  assert.is(size_to_str(1023999), '1e+03 KiB');
  assert.is(size_to_str(10 * 2 ** 40), '10 TiB');
});

test('bdrv_snapshot_dump: the header and one snapshot line (7.2 widths, local time)', () => {
  assert.is(bdrv_snapshot_dump(null), 'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
  const d = new Date(2026, 10, 27, 8, 10, 38);
  const line = bdrv_snapshot_dump({ id: '1', name: 'first', 'vm-state-size': 1536, 'date-sec': d.getTime() / 1000, 'date-nsec': 0, 'vm-clock-sec': 3725, 'vm-clock-nsec': 7_000_000, icount: 42 });
  assert.is(line, '1         first' + ' '.repeat(13) + '1.5 KiB 2026-11-27 08:10:38 01:02:05.007         42');
  const noIcount = bdrv_snapshot_dump({ id: '2', name: 'x', 'vm-state-size': 0, 'date-sec': d.getTime() / 1000, 'date-nsec': 0, 'vm-clock-sec': 0, 'vm-clock-nsec': 0 });
  assert.ok(noIcount.endsWith('00:00:00.000           '), JSON.stringify(noIcount));
});

test('c_fixed: %.2f rounds an exact tie to even, like glibc; other values as toFixed', () => {
  assert.is(c_fixed(3.125, 2), '3.12');
  assert.is(c_fixed(3.375, 2), '3.38');
  assert.is(c_fixed(1.66015625, 2), '1.66');
  assert.is(c_fixed(100, 2), '100.00');
  assert.is(c_fixed(0.005, 2), (0.005).toFixed(2), '0.005 is not exactly representable: no tie');
});

test('qobject_to_json_pretty: members in QDict bucket order, 4-space indentation', () => {
  const s = qobject_to_json_pretty({ filename: 'a', format: 'raw', 'dirty-flag': false, 'actual-size': 1, 'virtual-size': 2 });
  assert.is(s, '{\n    "virtual-size": 2,\n    "filename": "a",\n    "format": "raw",\n    "actual-size": 1,\n    "dirty-flag": false\n}');
  const c = qobject_to_json_pretty(image_check_of({ corruptions: 2, leaks: 0, check_errors: 0, corruptions_fixed: 0, leaks_fixed: 0, image_end_offset: 9, bfi: { total_clusters: 4, allocated_clusters: 1, fragmented_clusters: 0, compressed_clusters: 0 } }, 'c.qcow2', 'qcow2'));
  assert.is(
    c,
    '{\n    "image-end-offset": 9,\n    "total-clusters": 4,\n    "corruptions": 2,\n    "check-errors": 0,\n    "allocated-clusters": 1,\n    "filename": "c.qcow2",\n    "format": "qcow2"\n}',
  );
  assert.is(qobject_to_json_pretty([{ a: 1 }]), '[\n    {\n        "a": 1\n    }\n]');
});

test('dump_human_image_check: the summary lines and percentages', () => {
  const r = { corruptions: 0, leaks: 2, check_errors: 0, corruptions_fixed: 0, leaks_fixed: 0, image_end_offset: 1572864, bfi: { total_clusters: 1024, allocated_clusters: 17, fragmented_clusters: 0, compressed_clusters: 0 } };
  assert.is(
    dump_human_image_check(image_check_of(r, 'l', 'qcow2')),
    '\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n17/1024 = 1.66% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 1572864\n',
  );
  r.leaks = 0;
  r.bfi.allocated_clusters = 0;
  assert.is(dump_human_image_check(image_check_of(r, 'l', 'qcow2')), 'No errors were found on the image.\nImage end offset: 1572864\n');
});

test('getopt_long: permutation, abbreviations, and qemu-img 7.2 messages (argv[optind-1] quirk)', () => {
  const longs = [{ name: 'output', arg: true, key: 'output' }, { name: 'backing-chain', arg: false, key: 'bc' }];
  const io = sink();
  const g = getopt_long(io, ['info', 'x.img', '-f', 'raw', '--outp=json', '-U', '--', '-y'], 'hf:U', longs);
  assert.equal(g, { opts: [{ c: 'f', arg: 'raw' }, { c: 'output', arg: 'json' }, { c: 'U', arg: null }], rest: ['x.img', '-y'] });
  const cases: [string[], string][] = [
    [['info', '-qZ', 'x'], "qemu-img: unrecognized option 'info'\n"],
    [['info', '-Uz', 'x'], "qemu-img: unrecognized option '-Uz'\n"],
    [['info', '-f'], "qemu-img: missing argument for option '-f'\n"],
    [['info', '--output'], "qemu-img: missing argument for option '--output'\n"],
    [['info', '--backing-chain=1'], "qemu-img: unrecognized option '--backing-chain=1'\n"],
    [['info', '--bogus'], "qemu-img: unrecognized option '--bogus'\n"],
  ];
  for (const [argv, msg] of cases) {
    const e = sink();
    assert.is(getopt_long(e, argv, 'hf:U', longs), 1, argv.join(' '));
    assert.is(e.e, msg + TRY);
  }
});

test('cvtnum_full: suffixes, ranges and QEMU messages', () => {
  const io = sink();
  assert.is(cvtnum_full(io, 'image size', '1.5k', 0n, (1n << 63n) - 1n), 1536);
  assert.is(cvtnum_full(io, 'image size', '0x100', 0n, (1n << 63n) - 1n), 256);
  assert.is(io.e, '');
  assert.is(cvtnum_full(io, 'image size', '10X', 0n, 100n), null);
  assert.is(io.e, 'qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n');
  const io2 = sink();
  assert.is(cvtnum_full(io2, 'buffer size', '3G', 0n, 0x7fffffffn), null);
  assert.is(io2.e, 'qemu-img: Invalid buffer size specified. Must be between 0 and 2147483647.\n');
});

test('option lists: is_valid_option_list and has_help_option', () => {
  assert.ok(is_valid_option_list('a=1,b=2'));
  assert.ok(is_valid_option_list('a=x,,'));
  assert.not.ok(is_valid_option_list(''));
  assert.not.ok(is_valid_option_list(',x'));
  assert.not.ok(is_valid_option_list('x,'));
  assert.ok(has_help_option('help'));
  assert.ok(has_help_option('size=1M,?'));
  assert.not.ok(has_help_option('backing_file=help,,x'));
});

test('QemuProgress: prints at 0, on moves above min_skip and at 100, in single precision', () => {
  const io = sink();
  const p = new QemuProgress(io, true, 1.0);
  p.print(0, 100);
  p.print(0.5, 0);
  p.print(1.5, 0);
  p.print(3.125, 0);
  p.print(100, 0);
  p.print(100, 0);
  p.end();
  assert.is(io.o, '    (0.00/100%)\r    (1.50/100%)\r    (3.12/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n');
  const off = sink();
  const q = new QemuProgress(off, false, 1.0);
  q.print(50, 0);
  q.end();
  assert.is(off.o, '');
});

test('find_nonzero / compare_buffers: sector granularity', () => {
  const b = new Uint8Array(2048);
  assert.is(find_nonzero(b, 2048), -1);
  b[1500] = 1;
  assert.is(find_nonzero(b, 2048), 1024);
  assert.is(find_nonzero(b, 1500), -1);
  const a = new Uint8Array(2048);
  const out = { pnum: 0 };
  assert.is(compare_buffers(a, b, 2048, out), false);
  assert.is(out.pnum, 1024, 'the first two sectors are equal');
  assert.is(compare_buffers(b.subarray(1024), a.subarray(1024), 1024, out), true);
  assert.is(out.pnum, 512);
});

test('is_allocated_sectors(_min): runs of data and zeroes, alignment, small holes kept', () => {
  const S = 512;
  const buf = new Uint8Array(16 * S);
  buf.fill(1, 0, 3 * S); // sectors 0-2 data, 3-15 zero
  const out = { pnum: 0 };
  assert.is(is_allocated_sectors(buf, 0, 16, out, 0, 1), true);
  assert.is(out.pnum, 3);
  assert.is(is_allocated_sectors(buf, 0, 16, out, 0, 8), true);
  assert.is(out.pnum, 8, 'data end rounded up to the 8-sector alignment');
  assert.is(is_allocated_sectors(buf, 3 * S, 13, out, 3, 1), false);
  assert.is(out.pnum, 13);
  buf.fill(1, 5 * S, 6 * S); // a 2-sector hole at 3-4
  assert.is(is_allocated_sectors_min(buf, 0, 16, out, 8, 0, 1), true);
  assert.is(out.pnum, 6, 'a hole shorter than min counts as data');
});

test('entry_mergeable: contiguous offsets and equal flags only', () => {
  const e = (start: number, length: number, offset: number): MapEntry => ({ start, length, data: true, zero: false, offset, has_offset: true, depth: 0, present: true, filename: 'f' });
  assert.ok(entry_mergeable(e(0, 512, 100), e(512, 512, 612)));
  assert.not.ok(entry_mergeable(e(0, 512, 100), e(512, 512, 700)));
  assert.not.ok(entry_mergeable(e(0, 0, 100), e(0, 512, 100)));
  assert.not.ok(entry_mergeable(e(0, 512, 100), { ...e(512, 512, 612), depth: 1 }));
});

test('main: missing command, unknown command, unsupported command, -V', async () => {
  assert.equal(await img(), { rc: 1, out: '', err: 'qemu-img: Not enough arguments\n' + TRY });
  assert.equal(await img('foo'), { rc: 1, out: '', err: 'qemu-img: Command not found: foo\n' + TRY });
  assert.equal(await img('snapshot', '-l', 'x'), { rc: 1, out: '', err: "qemu-img: Command 'snapshot' is not supported by aioco-img\n" + TRY });
  const v = await img('-V');
  assert.is(v.rc, 0);
  assert.match(v.out, /^qemu-img version 7\.2\.22 \(aioco\)\n/);
  const h = await img('-h');
  assert.is(h.rc, 0);
  assert.match(h.out, /\n  convert \[--object objectdef\]/);
  assert.match(h.out, /Supported formats: .*\braw\b/);
});

test('create: Formatting line, file size, and the error messages of 5.1', async () => {
  assert.equal(await img('create', '-f', 'raw', 'r.raw', '1M'), { rc: 0, out: "Formatting 'r.raw', fmt=raw size=1048576\n", err: '' });
  assert.is(statSync(path.join(work, 'r.raw')).size, 1 << 20);
  assert.equal(await img('create', '-q', '-f', 'raw', 'q.raw', '1.5k'), { rc: 0, out: '', err: '' });
  assert.is(statSync(path.join(work, 'q.raw')).size, 1536);
  const cases: [string[], string][] = [
    [['create', '-f', 'raw', 'x.raw', '10X'], 'qemu-img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n'],
    [['create', '-f', 'raw', 'x.raw', '99E'], 'qemu-img: Invalid image size specified. Must be between 0 and 9223372036854775807.\n'],
    [['create', '-f', 'raw', 'x.raw'], 'qemu-img: x.raw: Image creation needs a size parameter\n'],
    [['create', '-f', 'nofmt', 'x', '1M'], "qemu-img: x: Unknown file format 'nofmt'\n"],
    [['create', '-f', 'raw', '-o', 'foo=bar', 'x', '1M'], "qemu-img: x: Invalid parameter 'foo'\n"],
    [['create', '-f', 'raw', '-o', ',x', 'x'], 'qemu-img: Invalid option list: ,x\n'],
    [['create', '-f', 'raw', '-b', 'base', 'x', '1M'], "qemu-img: x: Backing file not supported for file format 'raw'\n"],
    [['create', '-f', 'raw', '-o', 'size=1M', 'x', '2M'], 'qemu-img: x: The image size must be specified only once\n'],
    [['create', '-f', 'raw', 'x', '1M', 'extra'], 'qemu-img: Unexpected argument: extra\n' + TRY],
    [['create'], 'qemu-img: Expecting image file name\n' + TRY],
  ];
  for (const [argv, err] of cases) assert.equal(await img(...argv), { rc: 1, out: '', err }, argv.join(' '));
  const h = await img('create', '-f', 'raw', '-o', 'help');
  assert.is(h.out, 'Supported raw options:\n  size=<size>            - Virtual disk size\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n');
  assert.is(h.rc, 0);
});

test('info, check, map on a raw image; their argument errors', async () => {
  writeFileSync(path.join(work, 'd.raw'), Buffer.alloc(65536, 7));
  const i = await img('info', '-f', 'raw', 'd.raw');
  assert.match(i.out, /^image: d\.raw\nfile format: raw\nvirtual size: 64 KiB \(65536 bytes\)\ndisk size: [^\n]+\n$/);
  const j = await img('info', '--output=json', '-f', 'raw', 'd.raw');
  assert.match(j.out, /^\{\n    "virtual-size": 65536,\n    "filename": "d\.raw",\n    "format": "raw",\n    "actual-size": \d+,\n    "dirty-flag": false\n\}\n$/);
  assert.equal(await img('info', '--output=xml', 'd.raw'), { rc: 1, out: '', err: 'qemu-img: --output must be used with human or json as argument.\n' });
  assert.equal(await img('info', 'a', 'b'), { rc: 1, out: '', err: 'qemu-img: Expecting one image file name\n' + TRY });
  assert.equal(await img('info', 'nonexist'), { rc: 1, out: '', err: "qemu-img: Could not open 'nonexist': Could not open 'nonexist': No such file or directory\n" });
  assert.equal(await img('info', '--image-opts', '-f', 'raw', 'd.raw'), { rc: 1, out: '', err: 'qemu-img: --image-opts and --format are mutually exclusive\n' });
  assert.equal(await img('check', '-f', 'raw', 'd.raw'), { rc: 63, out: '', err: 'qemu-img: This image format does not support checks\n' });
  assert.equal(await img('check', '-r', 'foo', 'd.raw'), { rc: 1, out: '', err: "qemu-img: Unknown option value for -r (expecting 'leaks' or 'all'): foo\n" + TRY });
  assert.equal(await img('map', '-f', 'raw', 'd.raw'), { rc: 0, out: 'Offset          Length          Mapped to       File\n0               0x10000         0               d.raw\n', err: '' });
  assert.equal(await img('map', '--output=json', '-f', 'raw', '-s', '4k', '-l', '8k', 'd.raw'), {
    rc: 0,
    out: '[{ "start": 4096, "length": 8192, "depth": 0, "present": true, "zero": false, "data": true, "offset": 4096}]\n',
    err: '',
  });
  assert.equal(await img('map', '--start-offset=x', 'd.raw'), {
    rc: 1,
    out: '',
    err: 'qemu-img: Invalid start offset specified. You may use k, M, G, T, P or E suffixes for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n',
  });
});

test('convert and compare on raw images: data copied, zeroes left sparse, exit codes 0/1/2', async () => {
  const src = Buffer.alloc(3 << 20);
  for (let i = 0; i < src.length; i += 4096) src[i] = (i >> 12) & 0xff || 1;
  src.fill(0, 1 << 20, 2 << 20);
  writeFileSync(path.join(work, 's.raw'), src);
  const c = await img('convert', '-p', '-m', '010', '-f', 'raw', '-O', 'raw', 's.raw', 'c.raw');
  assert.is(c.rc, 0);
  assert.is(c.err, '');
  assert.ok(c.out.startsWith('    (0.00/100%)\r') && c.out.endsWith('    (100.00/100%)\r    (100.00/100%)\r\n'), JSON.stringify(c.out));
  assert.ok(readFileSync(path.join(work, 'c.raw')).equals(src));
  assert.equal(await img('compare', '-f', 'raw', '-F', 'raw', 's.raw', 'c.raw'), { rc: 0, out: 'Images are identical.\n', err: '' });
  const mod = Buffer.from(src);
  mod[(2 << 20) + 700] ^= 0xff;
  writeFileSync(path.join(work, 'm.raw'), mod);
  assert.equal(await img('compare', '-f', 'raw', '-F', 'raw', 's.raw', 'm.raw'), { rc: 1, out: `Content mismatch at offset ${(2 << 20) + 512}!\n`, err: '' });
  assert.equal(await img('compare', 's.raw', 'nonexist'), { rc: 2, out: '', err: "qemu-img: Could not open 'nonexist': Could not open 'nonexist': No such file or directory\n" });
  assert.equal(await img('compare', 's.raw'), { rc: 1, out: '', err: 'qemu-img: Expecting two image file names\n' + TRY });
  writeFileSync(path.join(work, 'short.raw'), src.subarray(0, 1 << 20));
  assert.equal(await img('compare', '-s', '-f', 'raw', '-F', 'raw', 's.raw', 'short.raw'), { rc: 1, out: 'Strict mode: Image size mismatch!\n', err: '' });
  assert.equal(await img('compare', '-f', 'raw', '-F', 'raw', 's.raw', 'short.raw'), { rc: 1, out: 'Warning: Image size mismatch!\nContent mismatch at offset 2097152!\n', err: '' });
  const errs: [string[], string][] = [
    [['convert', '-m', '17', 's.raw', 'x.raw'], 'qemu-img: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16\n'],
    [['convert', '-m', '-1', 's.raw', 'x.raw'], 'qemu-img: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16\n'],
    [['convert', '-m', 'x', 's.raw', 'x.raw'], 'qemu-img: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16\n'],
    [['convert', '-S', '100', 's.raw', 'x.raw'], 'qemu-img: Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).\n'],
    [['convert', 's.raw'], 'qemu-img: Must specify image file name\n'],
    [['convert', '-c', '-O', 'raw', 's.raw', 'x.raw'], 'qemu-img: Compression not supported for this file format\n'],
    [['convert', '-n', '-o', 'size=1M', 's.raw', 'x.raw'], 'qemu-img: -o has no effect when skipping image creation\n'],
    [['convert', '--target-is-zero', 's.raw', 'x.raw'], 'qemu-img: --target-is-zero requires use of -n flag\n'],
    [['convert', '-n', '-f', 'raw', '-O', 'raw', 's.raw', 'short.raw'], 'qemu-img: output file is smaller than input file\n'],
    [['convert', '-r', '1M', 's.raw', 'x.raw'], 'qemu-img: -r (rate limit) is not supported by aioco-img\n'],
    [['convert', '--salvage', 's.raw', 'x.raw'], 'qemu-img: --salvage is not supported by aioco-img\n'],
  ];
  for (const [argv, err] of errs) assert.equal(await img(...argv), { rc: 1, out: '', err }, argv.join(' '));
});

test('resize: +size, --shrink rule, messages; bench: output lines and option errors', async () => {
  writeFileSync(path.join(work, 'rs.raw'), Buffer.alloc(1 << 20));
  assert.equal(await img('resize', '-f', 'raw', 'rs.raw', '+1M'), { rc: 0, out: 'Image resized.\n', err: '' });
  assert.is(statSync(path.join(work, 'rs.raw')).size, 2 << 20);
  assert.equal(await img('resize', '-f', 'raw', 'rs.raw', '-1M'), {
    rc: 1,
    out: '',
    err: "qemu-img: Use the --shrink option to perform a shrink operation.\nqemu-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n",
  });
  assert.equal(await img('resize', '-f', 'raw', '--shrink', 'rs.raw', '-1M'), { rc: 0, out: 'Image resized.\n', err: '' });
  assert.is(statSync(path.join(work, 'rs.raw')).size, 1 << 20);
  assert.equal(await img('resize', '-f', 'raw', 'rs.raw', '0'), { rc: 1, out: '', err: 'qemu-img: New image size must be positive\n' });
  // The file driver grows with falloc/full by writing zeroes (no fallocate in Node): the blocks are allocated.
  writeFileSync(path.join(work, 'pre.raw'), Buffer.alloc(0));
  assert.equal(await img('resize', '-f', 'raw', '--preallocation=full', 'pre.raw', '+1M'), { rc: 0, out: 'Image resized.\n', err: '' });
  const st = statSync(path.join(work, 'pre.raw'));
  assert.is(st.size, 1 << 20);
  assert.ok(st.blocks * 512 >= 1 << 20, `allocated ${st.blocks * 512}`);
  assert.equal(await img('resize', '-f', 'raw', '--preallocation=metadata', 'pre.raw', '+1M'), { rc: 1, out: '', err: 'qemu-img: Unsupported preallocation mode: metadata\n' });
  assert.equal(await img('resize', 'rs.raw'), { rc: 1, out: '', err: 'qemu-img: Not enough arguments\n' + TRY });
  assert.equal(await img('resize', '-f', 'raw', '--preallocation=bogus', 'rs.raw', '+1M'), { rc: 1, out: '', err: "qemu-img: Invalid preallocation mode 'bogus'\n" });
  assert.equal(await img('resize', '-f', 'raw', '--preallocation=full', 'rs.raw', '1M'), { rc: 1, out: '', err: 'qemu-img: Preallocation can only be used for growing images\n' });
  assert.equal(await img('resize', '-f', 'raw', 'rs.raw', '1X'), {
    rc: 1,
    out: '',
    err: "qemu-img: Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n",
  });
  const b = await img('bench', '-c', '100', '-d', '4', '-w', '--pattern=0x5a', '--flush-interval=10', '-f', 'raw', 'rs.raw');
  assert.is(b.rc, 0);
  assert.match(b.out, /^Sending 100 write requests, 4096 bytes each, 4 in parallel \(starting at offset 0, step size 4096\)\nSending flush every 10 requests\nRun completed in \d+\.\d{3} seconds\.\n$/);
  const data = readFileSync(path.join(work, 'rs.raw'));
  assert.ok(data.subarray(0, 100 * 4096).every((x) => x === 0x5a));
  assert.ok(data.subarray(100 * 4096).every((x) => x === 0));
  const errs: [string[], string][] = [
    [['bench', '-c', '10', '--flush-interval=10', 'rs.raw'], 'qemu-img: --flush-interval is only available in write tests\n'],
    [['bench', '-w', '-d', '8', '--flush-interval=4', 'rs.raw'], "qemu-img: Flush interval can't be smaller than depth\n"],
    [['bench', '-c', 'x', 'rs.raw'], 'qemu-img: Invalid request count specified\n'],
    [['bench', '-d', '0', 'rs.raw'], 'qemu-img: Invalid queue depth specified\n'],
    [['bench', '--pattern=300', 'rs.raw'], 'qemu-img: Invalid pattern byte specified\n'],
    [['bench', '-t', 'bogus', 'rs.raw'], 'qemu-img: Invalid cache mode\n'],
    [['bench', '-i', 'bogus', 'rs.raw'], 'qemu-img: Invalid aio option: bogus\n'],
    [['bench', '-i', 'native', 'rs.raw'], 'qemu-img: -i native is not supported by aioco-img\n'],
    [['bench', '-n', 'rs.raw'], 'qemu-img: -n (native AIO) is not supported by aioco-img\n'],
  ];
  for (const [argv, err] of errs) assert.equal(await img(...argv), { rc: 1, out: '', err }, argv.join(' '));
  const based = await img('bench', '-c', '0x10', '-d', '010', '-f', 'raw', 'rs.raw');
  assert.match(based.out, /^Sending 16 read requests, 4096 bytes each, 8 in parallel /, 'strtoul base 0: hex and octal');
  const f = await img('bench', '-c', '4', '-d', '2', '-o', '1M', '-f', 'raw', 'rs.raw');
  assert.is(f.rc, 1);
  assert.is(f.err, 'qemu-img: Failed request: Input/output error\n');
});

/** Fake drivers for the exit codes real images cannot produce on demand. */
const chkAnswer: { ret: number; r: Partial<BdrvCheckResult> } = { ret: 0, r: {} };
ensureRegistered(makeProto('imgp'));
ensureRegistered({
  ...makeFormat('imgchk'),
  *bdrv_co_check(_bs, res, _fix) {
    Object.assign(res, chkAnswer.r);
    return chkAnswer.ret;
  },
});
ensureRegistered({
  ...makeFormat('imgbad'),
  *bdrv_co_block_status(bs, _want_zero, offset, bytes, out: BlockStatusOut) {
    out.pnum = bytes;
    out.map = offset;
    out.file = bs.file!.bs;
    return (bs.opaque as { failStatus?: boolean }).failStatus ? -EIO : BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
  },
  *bdrv_co_preadv() {
    return -EIO;
  },
});

test('bench halted (Ctrl-C): no more requests, no error, the image closed', async () => {
  writeFileSync(path.join(work, 'h.raw'), Buffer.alloc(1 << 20));
  const io = sink();
  const cwd = process.cwd();
  process.chdir(work);
  try {
    const task = run(() => aiocoImg(['bench', '-c', '100000000', '-d', '4', '-w', '--pattern=1', '-f', 'raw', 'h.raw'], io));
    await new Promise((r) => setTimeout(r, 200));
    await task.halt();
  } finally {
    process.chdir(cwd);
  }
  assert.is(io.o, 'Sending 100000000 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)\n');
  assert.is(io.e, '', 'no "Failed request" from completions after the halt');
  assert.ok(readFileSync(path.join(work, 'h.raw')).subarray(0, 4096).every((x) => x === 1), 'requests ran before the halt');
});

test('check exit codes 0/1/2/3 and their lines (fake driver answers)', async () => {
  const name = 'driver=imgchk,file.driver=imgp,file.size=65536';
  const run1 = (...a: string[]) => img('check', ...a, '--image-opts', name);
  chkAnswer.ret = -EIO;
  chkAnswer.r = {};
  assert.equal(await run1(), { rc: 1, out: '', err: 'qemu-img: Check failed: Input/output error\n' });
  chkAnswer.ret = 0;
  chkAnswer.r = { check_errors: 1 };
  assert.equal(await run1(), { rc: 1, out: '\n1 internal errors have occurred during the check.\n', err: 'qemu-img: Check failed\n' });
  chkAnswer.r = { corruptions: 2, leaks: 1 };
  assert.equal(await run1(), {
    rc: 2,
    out: '\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n',
    err: '',
  });
  chkAnswer.r = { leaks: 1 };
  assert.is((await run1()).rc, 3);
  assert.equal(await run1('-q'), { rc: 3, out: '', err: '' });
  chkAnswer.r = {};
  assert.equal(await run1('--output=json'), { rc: 0, out: `{\n    "check-errors": 0,\n    "filename": "${name}",\n    "format": "imgchk"\n}\n`, err: '' });
});

test('compare exit codes 3 (block status error) and 4 (read error)', async () => {
  const good = 'driver=imgchk,file.driver=imgp,file.size=65536';
  const bad = 'driver=imgbad,file.driver=imgp,file.size=65536';
  assert.equal(await img('compare', '--image-opts', good, bad), { rc: 4, out: '', err: `qemu-img: Error while reading offset 0 of ${bad}: Input/output error\n` });
  const o = await img('compare', '--image-opts', bad, good);
  assert.is(o.rc, 4);
  const io = sink();
  const rc = await run(function* () {
    // Make the status fail on the opened node: set the flag through the driver's opaque state.
    const orig = bdrv_find_format('imgbad')!.bdrv_open!;
    bdrv_find_format('imgbad')!.bdrv_open = (bs, options, flags) => {
      orig(bs, options, flags);
      (bs.opaque as { failStatus?: boolean }).failStatus = true;
    };
    try {
      return yield* aiocoImg(['compare', '--image-opts', good, bad], io);
    } finally {
      bdrv_find_format('imgbad')!.bdrv_open = orig;
    }
  });
  assert.equal({ rc, out: io.o, err: io.e }, { rc: 3, out: '', err: `qemu-img: Sector allocation test failed for ${bad}\n` });
});

interface SpinTask extends CoTask {
  steps: number;
  immediates: number;
  finished: boolean;
}

/** A loop whose steps never wait for I/O: only coYieldIfDue lets Node's loop run. */
function* spin(t: SpinTask): CoroutineFn<number> {
  const end = performance.now() + 5000;
  while (!t.cancelled && performance.now() < end) {
    yield* coYieldIfDue(t);
    t.steps++;
  }
  t.finished = true;
  return t.cancelled ? -1 : 0;
}

test('coTask + coYieldIfDue: a busy coroutine loop lets Node run, and a halt cancels and waits for it', async () => {
  const t: SpinTask = { cancelled: false, steps: 0, immediates: 0, finished: false };
  let tick = true;
  const ticker = (): void => {
    t.immediates++;
    if (tick) setImmediate(ticker);
  };
  setImmediate(ticker);
  const task = run(() => coTask(spin, t));
  // Node's loop keeps turning while the coroutine spins (it would not without the yields).
  await new Promise((r) => setTimeout(r, 150));
  assert.ok(t.immediates >= 3, `Node's loop ran ${t.immediates} times`);
  assert.ok(t.steps > 0);
  assert.is(t.finished, false, 'still spinning (its 5 s are not over): the loop ran meanwhile');
  await task.halt();
  tick = false;
  assert.is(t.cancelled, true);
  assert.is(t.finished, true, 'the halt waited for the coroutine');
  const steps = t.steps;
  await new Promise((r) => setTimeout(r, 30));
  assert.is(t.steps, steps, 'the coroutine has finished: no step after the halt returned');
});

test.after(() => rmSync(work, { recursive: true, force: true }));

test.run();
