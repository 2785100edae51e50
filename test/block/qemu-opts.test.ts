// qemu_strtosz / qemu_opt_get_size: QEMU's size syntax and messages.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { QemuError, qemu_opt_get_size, qemu_strtosz } from '../../src/index.ts';

test('qemu_strtosz: binary suffixes, fractions only with a suffix, hex, errors', () => {
  assert.is(qemu_strtosz('4096'), 4096n);
  assert.is(qemu_strtosz('64k'), 65536n);
  assert.is(qemu_strtosz('1M'), 1048576n);
  assert.is(qemu_strtosz('1.5k'), 1536n);
  assert.is(qemu_strtosz('2 G'), 2n << 30n);
  assert.is(qemu_strtosz('0x200'), 512n);
  assert.is(qemu_strtosz('1.5'), 'einval');
  assert.is(qemu_strtosz('abc'), 'einval');
  assert.is(qemu_strtosz('-1'), 'einval');
  assert.is(qemu_strtosz('16E'), 'erange');
  assert.is(qemu_strtosz('0x10000000000000000'), 'erange');
});

test('qemu_opt_get_size: default when absent, numbers and strings, QEMU messages', () => {
  assert.is(qemu_opt_get_size({}, 'size', 7), 7);
  assert.is(qemu_opt_get_size({ size: null }, 'size', 7), 7);
  assert.is(qemu_opt_get_size({ size: 512 }, 'size', 0), 512);
  assert.is(qemu_opt_get_size({ size: '1G' }, 'size', 0), 1 << 30);
  const err = (opts: Record<string, unknown>, msg: string) =>
    assert.throws(() => qemu_opt_get_size(opts, 'size', 0), (e: unknown) => e instanceof QemuError && e.message === msg);
  err({ size: -1 }, "Parameter 'size' expects a non-negative number below 2^64");
  err({ size: 1.5 }, "Parameter 'size' expects a non-negative number below 2^64");
  err({ size: 'x' }, "Parameter 'size' expects a non-negative number below 2^64");
  err({ size: '16E' }, "Value '16E' is out of range for parameter 'size'");
  err({ size: 2 ** 60 }, `Value '${2 ** 60}' is out of range for parameter 'size'`);
  err({ size: '9P' }, "Value '9P' is out of range for parameter 'size'");
});

test.run();
