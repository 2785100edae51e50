// The demo and the README's example run as users run them, in a child process, and exit
// by themselves (the host-loop drive holds Node only while there is work).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runNodeSync } from '../helpers/child.ts';

function runExample(file: string) {
  return runNodeSync(['--import', 'tsx', file], { timeoutMs: 30_000 });
}

test('README example: a coroutine moves main -> IOThread -> main and the process exits', () => {
  const r = runExample('examples/readme-example.ts');
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout, 'main -> iothread0 -> main\n');
});

test('demo: worker and waiter meet in the IOThread, then the process exits', () => {
  const r = runExample('examples/demo.ts');
  assert.is(r.status, 0, r.stderr);
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines.slice(0, 4), [
    "worker starts in 'main'",
    "worker now in 'iothread0'",
    "waiter woken in 'iothread0'",
    "worker back in 'main'",
  ]);
  assert.match(lines[4] ?? '', /^waiter returned 'ok', worker returned 42 in \d+\.\d ms$/);
});

test('npm start: aioco-io on a scratch image, then the disk moves to an IOThread and back', () => {
  const r = runExample('examples/start.ts');
  assert.is(r.status, 0, r.stderr);
  const out = r.stdout.replace(/\d\d\.\d\d sec \([^)]*\)/g, 'X sec (X)').replace(/aioco-start-\w+/g, 'aioco-start-X');
  assert.ok(out.includes('wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; X sec (X)\nread 65536/65536 bytes at offset 0\n'), out);
  assert.ok(out.includes('1 MiB (0x100000) bytes     allocated at offset 0 bytes (0x0)\n1 MiB\n'), out);
  const tail = out.slice(out.indexOf('in-process'));
  assert.equal(tail.trim().split('\n').slice(1), [
    "  write 4 KiB at 128 KiB (main): ret 0, callback ran in context 'main'",
    '  bdrv_try_change_aio_context -> iothread0: 0',
    "  read 4 KiB at 128 KiB (iothread0): ret 0, callback ran in context 'iothread0'",
    '  read back 0xcd ... 0xcd',
    '  bdrv_try_change_aio_context -> main: 0',
    "  read 4 KiB at 0 (main): ret 0, callback ran in context 'main'",
    '  read back 0xab (written by aioco-io above)',
  ]);
});

test.run();
