import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cvtnum, cvtstr, timestr, print_report, dump_buffer } from '../../../examples/tools/qemu-io-format.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = path.join(root, 'bin/aioco-io.mjs');
const fixture = path.join(root, 'test/examples/tools/fixtures/sync-file-driver.ts');
const QEMU_IO = '/usr/bin/qemu-io';
const work = mkdtempSync(path.join(tmpdir(), 'aioco-io-'));

/** qemu-iotests' _filter_qemu_io (common.filter): timing line, prompt. */
function filter_qemu_io(s: string): string {
  return s
    .replace(/\r/g, '')
    .replace(/[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*\/sec and [0-9/.inf]* ops\/sec\)/g, 'X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)')
    .replace(/qemu-io> /g, '');
}

interface Run { out: string; err: string; rc: number; image: Buffer }
function run(cmd: string, args: string[], img: string, env: NodeJS.ProcessEnv = process.env): Run {
  writeFileSync(img, Buffer.alloc(1 << 20));
  const r = spawnSync(cmd, args, { cwd: tmpdir(), env, encoding: 'utf8', timeout: 20000 });
  return { out: filter_qemu_io(r.stdout), err: filter_qemu_io(r.stderr), rc: r.status ?? -1, image: readFileSync(img) };
}
function aioco(cmds: string[], img: string): Run {
  const args = ['-f', 'file', ...cmds.flatMap((c) => ['-c', c]), img];
  return run(process.execPath, [bin, ...args], img, { ...process.env, AIOCO_IO_PRELOAD: fixture });
}

test('filter_qemu_io rewrites the timing line as the iotests filter does (4.5)', () => {
  assert.is(filter_qemu_io('64 KiB, 1 ops; 00.00 sec (23.057 MiB/sec and 368.9050 ops/sec)\n'), '64 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n');
  assert.is(filter_qemu_io('64 KiB, 1 ops; 0:20:10.16 (54.154901 bytes/sec and 0.0008 ops/sec)\n'), '64 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n');
});

test('cvtstr/timestr/cvtnum/dump_buffer formats (4.2, 4.3)', () => {
  assert.equal([cvtstr(65536), cvtstr(67043328), cvtstr(32), cvtstr(0), cvtstr(54.154901), cvtstr(1 << 20)], ['64 KiB', '63.938 MiB', '32 bytes', '0 bytes', '54.154901 bytes', '1 MiB']);
  assert.equal([timestr(0n, false), timestr(200_000_000n, false), timestr(1210_160_000_000n, false), timestr(0n, true)], ['00.00 sec', '00.20 sec', '0:20:10.16', '0:00:00.00']);
  assert.equal([cvtnum('4k'), cvtnum('0x10'), cvtnum('1.5k'), cvtnum('1.5'), cvtnum('abc'), cvtnum('99999999999999999999')], [4096, 16, 1536, { err: 'EINVAL' }, { err: 'EINVAL' }, { err: 'ERANGE' }]);
  assert.is(print_report('read', 1_000_000_000n, 0, 4096, 4096, 1, true), '4096,1,0:00:01.00,4096.000,1.000\n');
  assert.is(dump_buffer(new Uint8Array(20).fill(1), 0, 20), '00000000:  ' + '01 '.repeat(16) + ' ................\n00000010:  ' + '01 '.repeat(4) + ' ....\n');
});

/** Scripts whose real qemu-io output is the same across runs. */
const SCRIPTS: [string, string[]][] = [
  ['write -P then read -P', ['write -P 0xab 0 64k', 'read -P 0xab 0 64k', 'read -v 0 32']],
  ['read out of range', ['read 1M 4k', 'read 1020k 8k', 'write 1M 1', 'discard 1M 4k']],
  ['aio_write + aio_flush', ['aio_write -P 1 0 4k', 'aio_flush', 'aio_write -P 2 4k 4k', 'aio_flush', 'read -P 1 0 4k', 'read -P 2 4k 4k']],
  ['length and info', ['length', 'info', 'map', 'alloc 0', 'alloc 0 1M']],
  ['pattern mismatch', ['read -P 0x33 0 4k', 'read -P 1 -s 4 -l 8 0 8', 'read -P 0x100 0 1']],
  ['vectored', ['writev -P 0x22 192k 4k 4k', 'readv -P 0x22 192k 4k 4k']],
  ['dispatcher errors', ['foo', 'read', 'map 1', 'alloc', 'read -1 4k', 'read abc 4k', 'read 0 3G', 'write -u 0 1', 'sleep x']],
  ['zero write and help', ['write -z 64k 64k', 'write -f 0 4k', 'help read', 'help nosuch', 'close', 'length']],
];

const haveQemu = existsSync(QEMU_IO);
if (!haveQemu) console.log(`aioco-io: skipping the comparison with real qemu-io: ${QEMU_IO} is absent`);

for (const [name, cmds] of SCRIPTS) {
  test(`aioco-io matches qemu-io 7.2 after _filter_qemu_io: ${name} (4.3-4.6)`, () => {
    const mine = aioco(cmds, path.join(work, 'a.img'));
    if (!haveQemu) return;
    const real = run(QEMU_IO, ['-f', 'file', ...cmds.flatMap((c) => ['-c', c]), path.join(work, 'q.img')], path.join(work, 'q.img'));
    assert.is(mine.out, real.out);
    assert.is(mine.err, real.err);
    assert.is(mine.rc, real.rc);
    assert.ok(mine.image.equals(real.image), 'resulting images are identical');
  });
}

test('aio_write completion prints at the final drain, after later sync output (4.6)', () => {
  const r = aioco(['aio_write -P 1 0 4k', 'length'], path.join(work, 'b.img'));
  assert.is(r.out, '1 MiB\nwrote 4096/4096 bytes at offset 0\n4 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n');
  assert.is(r.rc, 0);
});

test('invocation errors: --image-opts with -f, bad cache mode, missing file (4.1)', () => {
  const img = path.join(work, 'c.img');
  const env = { ...process.env, AIOCO_IO_PRELOAD: fixture };
  const a = run(process.execPath, [bin, '--image-opts', '-f', 'raw', 'x'], img, env);
  assert.equal([a.err, a.rc], ['qemu-io: --image-opts and -f are mutually exclusive\n', 1]);
  const b = run(process.execPath, [bin, '-t', 'foo', img], img, env);
  assert.equal([b.err, b.rc], ['qemu-io: Invalid cache option: foo\n', 1]);
  const c = run(process.execPath, [bin, '-f', 'file', path.join(work, 'nonexist.raw')], img, env);
  assert.equal([c.err, c.rc], [`qemu-io: can't open device ${path.join(work, 'nonexist.raw')}: Could not open '${path.join(work, 'nonexist.raw')}': No such file or directory\n`, 1]);
});

test.after(() => rmSync(work, { recursive: true, force: true }));
test.run();
