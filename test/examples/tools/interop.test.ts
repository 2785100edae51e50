/**
 * Interop: the same qemu-io command scripts run through QEMU 7.2's qemu-io (/usr/bin/qemu-io) and
 * through aioco-io on identical fresh images (issue 4; qemu-block.md 4.1-4.6). Compared after
 * qemu-iotests' _filter_qemu_io (4.5): stdout, stderr, exit status and the resulting image bytes.
 * The scripts are data in fixtures/interop-scripts.ts.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { IMG, SCRIPTS, imageBytes, type InteropScript } from './fixtures/interop-scripts.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = path.join(root, 'bin/aioco-io.mjs');
const QEMU_IO = '/usr/bin/qemu-io';
const work = path.join(root, '.tmp-tests', `interop-${process.pid}`);

/**
 * _filter_qemu_io (4.5): the timing line, the prompt, `\r`. The `-C` CSV line is not covered by
 * the iotests filter; its time and rates are replaced here too (bytes and ops are kept).
 */
function filter_qemu_io(s: string): string {
  return s
    .replace(/\r/g, '')
    .replace(/[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*\/sec and [0-9/.inf]* ops\/sec\)/g, 'X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)')
    .replace(/^([0-9]+),([0-9]+),[0-9:.]+,[0-9.inf]+,[0-9.inf]+$/gm, '$1,$2,T,RATE,OPS')
    .replace(/qemu-io> /g, '');
}

/** `rc`: the exit status, or the name of the signal that ended the process. */
interface Run { out: string; err: string; rc: number | string; image: Buffer }

/** Runs one tool on a fresh test.img in its own directory (the cwd, so printed paths agree). */
async function runTool(tool: 'qemu' | 'aioco', s: InteropScript, idx: number): Promise<Run> {
  const dir = path.join(work, `${tool}-${idx}`);
  mkdirSync(dir, { recursive: true });
  const img = path.join(dir, IMG);
  if (s.image === 'sparse') {
    // A sparse file: only the 64 KiB at 1 MiB are written, the rest are holes.
    writeFileSync(img, Buffer.alloc(0));
    const data = imageBytes('sparse').subarray(1 << 20, (1 << 20) + 65536);
    const fd = openSync(img, 'r+');
    writeSync(fd, data, 0, data.length, 1 << 20);
    ftruncateSync(fd, 4 * 1024 * 1024);
    closeSync(fd);
  } else {
    writeFileSync(img, imageBytes(s.image));
  }
  const args = [...s.cmds.flatMap((c) => ['-c', c]), ...s.args];
  const [cmd, argv] = tool === 'qemu' ? [QEMU_IO, args] : [process.execPath, [bin, ...args]];
  // argv0 `qemu-io` for qemu-io: getopt's messages name the program as invoked (from PATH).
  const child = spawn(cmd, argv, {
    cwd: dir,
    argv0: tool === 'qemu' ? 'qemu-io' : process.execPath,
    stdio: [s.stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
  });
  // A tool that dies or quits before reading all of it closes the pipe under the writer.
  child.stdin?.on('error', () => {});
  child.stdin?.end(s.stdin);
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => void (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => void (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30000);
  const rc = await new Promise<number | string>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve(code ?? signal ?? -1));
  }).finally(() => clearTimeout(timer));
  const r = { out: filter_qemu_io(stdout), err: filter_qemu_io(stderr), rc, image: readFileSync(img) };
  rmSync(dir, { recursive: true, force: true });
  return r;
}

/** Runs every script through both tools, a few at a time; results by script index. */
async function runAll(): Promise<{ real: Run; mine: Run }[]> {
  const results: { real: Run; mine: Run }[] = new Array(SCRIPTS.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < SCRIPTS.length) {
      const idx = next++;
      const s = SCRIPTS[idx]!;
      results[idx] = { real: await runTool('qemu', s, idx), mine: await runTool('aioco', s, idx) };
    }
  };
  await Promise.all([worker(), worker(), worker()]);
  return results;
}

const haveQemu = existsSync(QEMU_IO);

test('the interop suite holds at least 30 scripts with distinct names', () => {
  assert.ok(SCRIPTS.length >= 30, `${SCRIPTS.length} scripts`);
  assert.is(new Set(SCRIPTS.map((s) => s.name)).size, SCRIPTS.length);
});

test('the -C filter keeps bytes and ops and drops time and rates', () => {
  assert.is(filter_qemu_io('4096,1,0:00:00.00,152830118.279,37312.041\n'), '4096,1,T,RATE,OPS\n');
  assert.is(filter_qemu_io('4 KiB, 1 ops; 00.00 sec (13.431 MiB/sec and 3438.2457 ops/sec)\n'), '4 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n');
});

if (!haveQemu) {
  console.log(`interop: skipping ${SCRIPTS.length} qemu-io comparison scripts: ${QEMU_IO} is absent`);
} else {
  let results: { real: Run; mine: Run }[] = [];
  test.before(async () => {
    results = await runAll();
  });
  SCRIPTS.forEach((s, idx) => {
    test(`aioco-io matches qemu-io 7.2 (4.3-4.6): ${s.name}`, () => {
      const { real, mine } = results[idx]!;
      assert.is(mine.out, real.out, 'filtered stdout');
      assert.is(mine.err, real.err, 'filtered stderr');
      assert.is(mine.rc, real.rc, 'exit status or signal');
      assert.ok(mine.image.equals(real.image), 'resulting image bytes are identical');
    });
  });
}

test.after(() => rmSync(work, { recursive: true, force: true }));
test.run();
