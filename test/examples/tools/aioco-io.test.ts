import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cvtnum, cvtstr, timestr, print_report, dump_buffer } from '../../../examples/tools/qemu-io-format.ts';
import { run as runOperation } from 'effection';
import { BDRV_O_RDWR, blk_unref } from '../../../src/index.ts';
import '../../../examples/drivers/file.ts';
import '../../../examples/drivers/raw.ts';
import { StdoutBuffer, fgets_lines, next_line } from '../../../examples/tools/aioco-io.ts';
import { COMMANDS, help_all, openfile, parse_opts, qemuio_command, type QemuIo } from '../../../examples/tools/qemu-io-cmds.ts';
import { EXTENDED_HELP, HELP_ALL } from '../../../examples/tools/qemu-io-help.ts';

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

// ---- truncate, reopen, abort, sigraise, help, options (qemu-block.md 4.1, 4.2) --------------

interface Crash { out: string; err: string; code: number | null; signal: NodeJS.Signals | null; image: Buffer }

/** aioco-io with the real file driver on a fresh 1 MiB image `name` in `work` (the cwd). */
function aiocoRun(args: string[], name: string, input?: string): Crash {
  writeFileSync(path.join(work, name), Buffer.alloc(1 << 20));
  const r = spawnSync(process.execPath, [bin, ...args], { cwd: work, encoding: 'utf8', timeout: 20000, input, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
  return { out: filter_qemu_io(r.stdout), err: r.stderr, code: r.status, signal: r.signal, image: readFileSync(path.join(work, name)) };
}
const WROTE_4K = (off: number): string => `wrote 4096/4096 bytes at offset ${off}\n4 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n`;

test('help lists every qemu-io 7.2 command (4.2) and matches its text; every command has its extended help', () => {
  const listed = HELP_ALL.split('\n').filter((l) => l.includes(' -- ')).map((l) => l.split(' ')[0]);
  assert.equal(COMMANDS.map((c) => c.name).sort(), [...listed].sort());
  assert.is(listed.length, 26);
  assert.is(help_all(), HELP_ALL);
  for (const c of COMMANDS) assert.ok(c.name in EXTENDED_HELP, `extended help of ${c.name}`);
  assert.ok(EXTENDED_HELP['sigraise']!.includes("'sigraise 15' - raises SIGTERM"));
});

test('-s, -C, -T and --object are refused with an error that names them, exit status 1 (API.md)', () => {
  const why = {
    s: 'aioco cannot create the temporary qcow2 overlay (bdrv_append_temp_snapshot) a snapshot needs',
    C: "aioco's block layer has no copy-on-read",
    T: 'aioco has no trace events',
    O: 'aioco has no QOM objects (secret, iothread, throttle-group)',
  };
  const cases: [string[], string][] = [
    [['-s'], `qemu-io: option '-s/--snapshot' is not supported by aioco-io: ${why.s}\n`],
    [['--snapshot'], `qemu-io: option '-s/--snapshot' is not supported by aioco-io: ${why.s}\n`],
    [['-C'], `qemu-io: option '-C/--copy-on-read' is not supported by aioco-io: ${why.C}\n`],
    [['-T', 'bdrv_*'], `qemu-io: option '-T/--trace' is not supported by aioco-io: ${why.T}\n`],
    [['--object', 'secret,id=s0,data=x'], `qemu-io: option '--object' is not supported by aioco-io: ${why.O}\n`],
  ];
  for (const [opt, err] of cases) {
    const r = aiocoRun([...opt, '-f', 'raw', '-c', 'write 0 4k', 'r.img'], 'r.img');
    assert.equal([r.out, r.err, r.code], ['', err, 1], opt.join(' '));
    assert.ok(r.image.equals(Buffer.alloc(1 << 20)), 'nothing written');
  }
  const o = aiocoRun(['-c', 'open -s -o driver=raw r.img', '-c', 'open -C -o driver=raw r.img', '-c', 'length'], 'r.img');
  assert.is(o.err, `qemu-io: option 'open -s' is not supported by aioco-io: ${why.s}\nqemu-io: option 'open -C' is not supported by aioco-io: ${why.C}\nno file open, try 'help open'\n`);
  assert.is(o.code, 1);
});

test('abort: dies of SIGABRT; buffered stdout and an unfinished aio_write are lost', () => {
  const r = aiocoRun(['-f', 'raw', '-c', 'write -P 1 0 4k', '-c', 'aio_write -P 2 64k 4k', '-c', 'abort', '-c', 'write -P 3 0 4k', 'a.img'], 'a.img');
  assert.equal([r.code, r.signal, r.out, r.err], [null, 'SIGABRT', '', '']);
  assert.ok(r.image.subarray(0, 4096).equals(Buffer.alloc(4096, 1)), 'the synchronous write is on disk');
  assert.ok(r.image.subarray(8192, 12288).equals(Buffer.alloc(4096)), 'nothing after abort ran');
});

test('sigraise 9 after aio_write: SIGKILL, stdout flushed first, the aio completion never reported', () => {
  const r = aiocoRun(['-f', 'raw', '-c', 'write -P 1 0 4k', '-c', 'aio_write -P 2 64k 4k', '-c', 'sigraise 9', '-c', 'write -P 3 8k 4k', 'k.img'], 'k.img');
  assert.equal([r.code, r.signal, r.out, r.err], [null, 'SIGKILL', WROTE_4K(0), '']);
  assert.ok(r.image.subarray(8192, 12288).equals(Buffer.alloc(4096)), 'nothing after sigraise ran');
});

test('sigraise: signals qemu-io 7.2 does not feel (PIPE, USR1, BUS, ALRM, IO, 32, 33, 65) return; SIGTERM and SIGXFSZ kill', () => {
  const ignored = ['13', '10', '7', '14', '29', '32', '33', '65', '0', '17'].map((s) => `sigraise ${s}`);
  const r = aiocoRun(['-f', 'raw', ...ignored.flatMap((c) => ['-c', c]), '-c', 'length', 's.img'], 's.img');
  assert.equal([r.code, r.signal, r.out, r.err], [0, null, '1 MiB\n', '']);
  const t = aiocoRun(['-c', 'sigraise 15', '-c', 'help quit'], 's.img');
  assert.equal([t.code, t.signal, t.out], [null, 'SIGTERM', '']);
  const x = aiocoRun(['-c', 'sigraise 25'], 's.img');
  assert.equal([x.code, x.signal], [null, 'SIGXFSZ']);
});

test('truncate -m without an offset: SIGSEGV as qemu-io 7.2 (NULL operand), stdout lost', () => {
  const r = aiocoRun(['-f', 'raw', '-c', 'write -P 1 0 4k', '-c', 'truncate -m off', 't.img'], 't.img');
  assert.equal([r.code, r.signal, r.out, r.err], [null, 'SIGSEGV', '', '']);
});

test('truncate grows and shrinks the file (sizes rounded up to sectors in length); -m metadata is refused by a file', () => {
  const r = aiocoRun(['-f', 'raw', '-c', 'truncate 2M', '-c', 'length', '-c', 't 1000', '-c', 'length', '-c', 'truncate -m falloc 2M', '-c', 'truncate -m metadata 3M', 'g.img'], 'g.img');
  assert.equal([r.out, r.err, r.code], ['2 MiB\n1 KiB\n', 'qemu-io: Unsupported preallocation mode: metadata\n', 1]);
  assert.is(r.image.length, 2 << 20);
  assert.ok(r.image.subarray(1000).equals(Buffer.alloc((2 << 20) - 1000)), 'the grown area reads as zeroes');
});

test('reopen: read-only without -r is refused while the backend may write; a named node cannot be opened again', () => {
  const a = aiocoRun(['-f', 'raw', '-c', 'reopen -o read-only=on', '-c', 'reopen -r', '-c', 'reopen -o read-only=on', '-c', 'write 0 1', 'o.img'], 'o.img');
  assert.match(a.err, /^qemu-io: Read-only block node '#block\d{3}' cannot support read-write users\nqemu-io: Block node is read-only\n$/);
  assert.is(a.code, 1);
  const b = aiocoRun(['--image-opts', '-c', 'reopen -o cache.direct=on', '-c', 'reopen -c unsafe', '-c', 'write -P 5 0 4k', 'driver=raw,node-name=fmt,file.driver=file,file.filename=o.img'], 'o.img');
  assert.is(b.err, "qemu-io: reopen: this change opens the graph again in aioco-io (its drivers cannot reopen), which cannot keep the node-name 'fmt'\n");
  assert.is(b.out, WROTE_4K(0));
  assert.ok(b.image.subarray(0, 4096).equals(Buffer.alloc(4096, 5)));
});

test('reopen -w on an image opened -r opens the graph again read-write; writes reach the file', () => {
  const r = aiocoRun(['-r', '-f', 'raw', '-c', 'write 0 1', '-c', 'reopen -w', '-c', 'write -P 7 4k 4k', '-c', 'reopen -r', '-c', 'write 0 1', '-c', 'read -P 7 4k 4k', 'w.img'], 'w.img');
  assert.is(r.err, 'qemu-io: Block node is read-only\nqemu-io: Block node is read-only\n');
  assert.is(r.out, WROTE_4K(4096) + 'read 4096/4096 bytes at offset 4096\n4 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n');
  assert.ok(r.image.subarray(4096, 8192).equals(Buffer.alloc(4096, 7)));
});

test('interactive: EOF ends after the last prompt; unknown commands keep going; status 1', () => {
  const r = aiocoRun(['-f', 'raw', 'i.img'], 'i.img', 'nosuch\nlength\r\nlength');
  assert.is(r.out, 'qemu-io> qemu-io> qemu-io> 1 MiB\nqemu-io> '.replace(/qemu-io> /g, ''));
  assert.is(r.err, 'command "nosuch" not found\ncommand "length\r" not found\n');
  assert.is(r.code, 1);
});

test('interactive: a completion prints while qemu-io waits for the next line (main_loop_wait)', async () => {
  const img = path.join(work, 'p.img');
  writeFileSync(img, Buffer.alloc(1 << 20));
  let out = '';
  const io: QemuIo = { blk: null, quit: false, out: (s) => void (out += s), err: (s) => void (out += s) };
  assert.is(openfile(io, img, { flags: BDRV_O_RDWR, writethrough: true }, { driver: 'raw' }), 0);
  let release!: (r: IteratorResult<string>) => void;
  // The next line arrives only once the completion has been printed (or after 20 s: failure).
  const line = new Promise<IteratorResult<string>>((resolve) => (release = resolve));
  const watch = setInterval(() => {
    if (out.includes('wrote 4096/4096 bytes at offset 0')) release({ value: 'length', done: false });
  }, 1);
  const guard = setTimeout(() => release({ value: 'timeout', done: false }), 20000);
  try {
    const got = await runOperation(function* () {
      assert.is(yield* qemuio_command(io, 'aio_write -P 1 0 4k'), 0);
      assert.is(out, '', 'nothing completes inside the command');
      return yield* next_line(io, { next: () => line });
    });
    assert.equal(got, { value: 'length', done: false });
    assert.is(filter_qemu_io(out), WROTE_4K(0));
  } finally {
    clearInterval(watch);
    clearTimeout(guard);
    blk_unref(io.blk!);
  }
});

test('StdoutBuffer keeps glibc full buffering: whole buffers out on overflow, the rest lost on discard', () => {
  const written: string[] = [];
  const b = new StdoutBuffer((x) => written.push(x.toString()), 8);
  b.out('abc');
  b.out('defgh');
  assert.equal(written, [], 'a full buffer is not written until more comes');
  b.out('i');
  assert.equal(written, ['abcdefgh']);
  b.out('jklmnopqrstuvwxyz0123');
  assert.equal(written, ['abcdefgh', 'ijklmnop', 'qrstuvwx']);
  b.discard();
  b.out('Z');
  b.flush();
  assert.equal(written, ['abcdefgh', 'ijklmnop', 'qrstuvwx', 'Z']);
  const u: string[] = [];
  const t = new StdoutBuffer((x) => u.push(x.toString()), 0);
  t.out('a');
  t.out('b');
  assert.equal(u, ['a', 'b'], 'unbuffered (a terminal): each write goes out');
});

test('fgets_lines: newline removed, \\r and tabs kept, 1023-byte pieces, a last line without newline', async () => {
  async function* chunks(): AsyncGenerator<Buffer> {
    yield Buffer.from('a\r\n\tb\n\nlo');
    yield Buffer.from('ng ' + 'x'.repeat(1100) + '\nend');
  }
  const lines: string[] = [];
  for await (const l of fgets_lines(chunks())) lines.push(l);
  assert.equal(lines, ['a\r', '\tb', '', 'long ' + 'x'.repeat(1018), 'x'.repeat(82), 'end']);
});

test('parse_opts: short-form booleans k=on and nok=off are reported; help and ? are not', () => {
  const warned: string[] = [];
  const o = parse_opts('driver=raw,foo,nobar,help,a=b,,c', undefined, (n, v) => warned.push(`${n}=${v}`));
  assert.equal(o, { driver: 'raw', foo: 'on', bar: 'off', help: 'on', a: 'b,c' });
  assert.equal(warned, ['foo=on', 'nobar=off']);
});

test('wait_break: where qemu-io 7.2 would wait forever (nothing can reach the breakpoint) an error, status 1', () => {
  const img = path.join(work, 'wait-break.img');
  const opts = `driver=raw,file.driver=blkdebug,file.image.driver=file,file.image.filename=${img}`;
  const r = run(process.execPath, [bin, '-c', 'wait_break A', '-c', 'break write_aio A', '-c', 'wait_break A', '-c', 'remove_break A', '--image-opts', opts], img);
  const msg = "qemu-io: wait_break: no request tagged 'A' is suspended and none can be (qemu-io 7.2 waits forever)\n";
  assert.equal([r.out, r.err, r.rc], ['', msg + msg, 1]);
});

test.after(() => rmSync(work, { recursive: true, force: true }));
test.run();
