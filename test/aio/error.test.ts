// error_report / warn_report and the program name (QEMU: util/error-report.c), and QemuError.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { QemuError, error_get_progname, error_report, error_set_progname, warn_report } from '../../src/index.ts';

/** Runs `fn` with process.stderr captured; returns what was written. */
function stderrOf(fn: () => void): string {
  const saved = process.stderr.write.bind(process.stderr);
  let err = '';
  process.stderr.write = ((s: string | Uint8Array): boolean => {
    err += String(s);
    return true;
  }) as typeof process.stderr.write;
  try {
    fn();
  } finally {
    process.stderr.write = saved;
  }
  return err;
}

test('without a program name: the message alone, one line each', () => {
  assert.is(error_get_progname(), '');
  assert.is(stderrOf(() => error_report('Could not open x')), 'Could not open x\n');
  assert.is(stderrOf(() => warn_report('bitmaps are stale')), 'warning: bitmaps are stale\n');
});

test("with qemu-img's name: `qemu-img: ` and `qemu-img: warning: ` prefixes, as QEMU prints them", () => {
  error_set_progname('qemu-img');
  assert.is(error_get_progname(), 'qemu-img');
  assert.is(stderrOf(() => error_report('Failed to flush the refcount block cache: Input/output error')), 'qemu-img: Failed to flush the refcount block cache: Input/output error\n');
  assert.is(
    stderrOf(() => warn_report('a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent')),
    'qemu-img: warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\n',
  );
  error_set_progname('');
});

test('QemuError carries the message unchanged and its name', () => {
  const e = new QemuError("Could not open 'x': No such file or directory");
  assert.is(e.name, 'QemuError');
  assert.is(e.message, "Could not open 'x': No such file or directory");
  assert.ok(e instanceof Error);
});

test.run();
