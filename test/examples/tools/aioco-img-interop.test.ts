/**
 * Interop, raw images (issue 5, qemu-block.md section 5): the same qemu-img command lines run
 * through QEMU 7.2's qemu-img and through aioco-img on copies of the same fixtures; stdout,
 * stderr, exit status and resulting files compared (filters: fixtures/aioco-img-interop.ts).
 * qcow2 cases are in aioco-img-interop-qcow2.test.ts. Last, a Ctrl-C test: SIGINT during
 * `aioco-img convert -p` must exit 130 and leave a target holding a prefix of the source, a
 * qcow2 target clean for `qemu-img check`.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { QEMU_IMG, bin, haveQemu, registerCases, sh, type Case } from './fixtures/aioco-img-interop.ts';

const work = mkdtempSync(path.join(tmpdir(), 'aioco-img-interop-'));

const CASES: Case[] = [
  // raw: create
  { args: ['create', '-f', 'raw', 'n.raw', '1M'], files: ['n.raw'] },
  { args: ['create', '-f', 'raw', '-o', 'preallocation=full', 'p.raw', '1M'], files: ['p.raw'] },
  { args: ['create', '-f', 'raw', 'x.raw', '10X'] },
  { args: ['create', '-f', 'raw', 'x.raw', '99E'] },
  { args: ['create', '-f', 'nofmt', 'x', '1M'] },
  { args: ['create', '-f', 'raw', '-o', 'foo=bar', 'x', '1M'] },
  { args: ['create', '-f', 'raw', '-b', 'base', 'x', '1M'] },
  { args: ['create', '-f', 'raw', '-o', 'preallocation=bad', 'x', '1M'] },
  { args: ['create', '-f', 'raw', '-o', 'help', 'x.raw'] },
  // raw: info, check, map
  { args: ['info', 'd.raw'] },
  { args: ['info', '--output=json', '-f', 'raw', 'd.raw'] },
  { args: ['info', '--image-opts', 'driver=raw,file.filename=d.raw'] },
  { args: ['info', 'nonexist'] },
  { args: ['info', '-qZ', 'd.raw'] },
  { args: ['check', 'd.raw'] },
  { args: ['map', '-f', 'raw', 'd.raw'] },
  { args: ['map', '--output=json', '-f', 'raw', '--start-offset=4k', '--max-length=600k', 'd.raw'] },
  // raw: compare, convert, resize, bench
  { args: ['compare', '-f', 'raw', '-F', 'raw', 'd.raw', 'dcopy.raw'] },
  { args: ['compare', 'd.raw', 'dmod.raw'] },
  { args: ['compare', 'd.raw', 'nonexist'] },
  { args: ['compare', '-s', 'd.raw', 'd2m.raw'] },
  { args: ['convert', '-p', '-f', 'raw', '-O', 'raw', 'd.raw', 'c.raw'], files: ['c.raw'] },
  { args: ['convert', '-S', '100', 'd.raw', 'c.raw'] },
  { args: ['convert', '-n', '-O', 'raw', 'd2m.raw', 'd.raw'] },
  { args: ['convert', '-O', 'raw', 'd.raw', 'dcopy.raw', 'cat.raw'], files: ['cat.raw'] },
  { args: ['resize', '-f', 'raw', 'd.raw', '+1M'], files: ['d.raw'] },
  { args: ['resize', '-f', 'raw', '--shrink', 'd.raw', '-1M'], files: ['d.raw'] },
  { args: ['resize', '-f', 'raw', '--preallocation=full', 'd.raw', '+64k'], files: ['d.raw'] },
  { args: ['bench', '-c', '100', '-d', '4', '-f', 'raw', 'd.raw'] },
  { args: ['bench', '-w', '-c', '500', '-d', '8', '-S', '8k', '-o', '1M', '--pattern=0x5a', '--flush-interval=10', '-f', 'raw', 'd.raw'], files: ['d.raw'] },
  { args: ['bench', '-c', '10', '-o', '3M', '-s', '64k', '-f', 'raw', 'd.raw'] },
];

registerCases(test, CASES, work);

if (haveQemu) {
  const MiB = 1 << 20;
  const SIGINT_SIZE = 256 * MiB;

  /** A 256 MiB raw source of non-zero bytes, one value per MiB. */
  function bigSource(dir: string): string {
    const src = path.join(dir, 'big.raw');
    const fd = openSync(src, 'w');
    const chunk = Buffer.alloc(MiB);
    for (let i = 0; i < SIGINT_SIZE / MiB; i++) {
      chunk.fill((i % 255) + 1);
      writeSync(fd, chunk);
    }
    closeSync(fd);
    return src;
  }

  /** Spawns `aioco-img convert -p`, sends SIGINT once progress reaches 10 %; returns status and output. */
  async function interruptedConvert(dir: string, fmt: string, target: string): Promise<{ rc: number | null; out: string; err: string; sent: boolean }> {
    const child = spawn(process.execPath, [bin, 'convert', '-p', '-f', 'raw', '-O', fmt, 'big.raw', target], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let sent = false;
    child.stderr.setEncoding('utf8').on('data', (x: string) => void (err += x));
    child.stdout.setEncoding('utf8').on('data', (x: string) => {
      out += x;
      // Progress counts stretches claimed, before they are written: wait for 10 % (at most
      // 8 x 2 MiB of it can still be in flight) so some data has surely reached the target.
      const m = /\(([0-9.]+)\/100%\)\r$/.exec(out);
      if (!sent && m && Number(m[1]) >= 10) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 120000);
    const rc = await new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    clearTimeout(timer);
    return { rc, out, err, sent };
  }

  /** Asserts the raw file `raw` holds a prefix of `src` (whole MiBs) followed by zeroes only. */
  function assertPrefix(raw: string, src: string): void {
    const tfd = openSync(raw, 'r');
    const sfd = openSync(src, 'r');
    const tb = Buffer.alloc(MiB);
    const sb = Buffer.alloc(MiB);
    let copied = 0;
    let ended = false;
    try {
      for (let off = 0; off < SIGINT_SIZE; off += MiB) {
        const n = readSync(tfd, tb, 0, MiB, off);
        tb.fill(0, n);
        readSync(sfd, sb, 0, MiB, off);
        if (!ended && tb.equals(sb)) {
          copied++;
          continue;
        }
        ended = true;
        assert.ok(tb.every((x) => x === 0), `MiB ${off / MiB}: neither source data nor zeroes`);
      }
    } finally {
      closeSync(tfd);
      closeSync(sfd);
    }
    assert.ok(copied > 0 && copied < SIGINT_SIZE / MiB, `copied ${copied} MiB of ${SIGINT_SIZE / MiB}`);
  }

  test('Ctrl-C during convert -p: exit 130, a qcow2 target is clean (qemu-img check), a raw or qcow2 target holds a prefix of the source', async () => {
    const dir = path.join(work, 'sigint');
    mkdirSync(dir);
    const src = bigSource(dir);
    for (const [fmt, target] of [['qcow2', 't.qcow2'], ['raw', 't.raw']] as const) {
      const r = await interruptedConvert(dir, fmt, target);
      assert.ok(r.sent, `${fmt}: progress never started: ${JSON.stringify(r.out)} ${r.err}`);
      assert.is(r.rc, 130, `${fmt}: exit status (stderr: ${r.err})`);
      assert.is(r.err, '');
      assert.not.match(r.out, /\(100\.00\/100%\)/, `${fmt}: the convert was interrupted before the end`);
      if (fmt === 'qcow2') {
        const chk = spawnSync(QEMU_IMG, ['check', target], { cwd: dir, encoding: 'utf8' });
        assert.is(chk.status, 0, chk.stdout + chk.stderr);
        assert.match(chk.stdout, /^No errors were found on the image\.\n/);
        // Writes are in order: the data is a prefix of the source, the rest reads as zeroes.
        sh(QEMU_IMG, ['convert', '-O', 'raw', target, 'q.raw'], dir);
        assertPrefix(path.join(dir, 'q.raw'), src);
      } else {
        assertPrefix(path.join(dir, target), src);
      }
    }
  });
}

test.after(() => rmSync(work, { recursive: true, force: true }));

test.run();
