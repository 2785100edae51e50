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

test.run();
