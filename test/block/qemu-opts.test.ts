// qemu_strtosz / qemu_opt_get_size: QEMU's size syntax and messages. QemuOpts (QemuOptsList,
// qemu_opt_set/get/get_del/unset, typed getters, qemu_opts_do_parse, qemu_opts_print,
// qemu_opts_append) against QEMU 7.2's util/qemu-option.c and what qemu-img 7.2 prints.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  QemuError,
  qemu_opt_find,
  qemu_opt_get,
  qemu_opt_get_bool,
  qemu_opt_get_bool_del,
  qemu_opt_get_del,
  qemu_opt_get_number,
  qemu_opt_get_number_del,
  qemu_opt_get_size,
  qemu_opt_get_size_del,
  qemu_opt_set,
  qemu_opt_set_bool,
  qemu_opt_set_number,
  qemu_opt_unset,
  qemu_opts_append,
  qemu_opts_create,
  qemu_opts_do_parse,
  qemu_opts_print,
  qemu_strtosz,
  type QemuOptsList,
} from '../../src/index.ts';
import { isQemuErr, throwsExactly } from '../helpers/assert.ts';

test('qemu_strtosz: binary suffixes, fractions only with a suffix, hex, errors', () => {
  assert.is(qemu_strtosz('4096'), 4096n);
  assert.is(qemu_strtosz('64k'), 65536n);
  assert.is(qemu_strtosz('1M'), 1048576n);
  assert.is(qemu_strtosz('1.5k'), 1536n);
  assert.is(qemu_strtosz('2G'), 2n << 30n);
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


test('qemu_strtosz: QEMU 7.2 corner cases (checked against qemu-img 7.2 -o size=...)', () => {
  // A space before the suffix or after it makes the whole string invalid.
  assert.is(qemu_strtosz('2 G'), 'einval');
  assert.is(qemu_strtosz('4k '), 'einval');
  // Leading white space and '+' are strtoull's.
  assert.is(qemu_strtosz(' 4k'), 4096n);
  assert.is(qemu_strtosz('+4k'), 4096n);
  assert.is(qemu_strtosz('-0'), 'einval');
  // A zero fraction needs no suffix; a lone '.' is skipped.
  assert.is(qemu_strtosz('1.0'), 1n);
  assert.is(qemu_strtosz('1.'), 1n);
  assert.is(qemu_strtosz('1.k'), 1024n);
  assert.is(qemu_strtosz('0.5b'), 'einval');
  assert.is(qemu_strtosz('1b'), 1n);
  assert.is(qemu_strtosz('1B'), 1n);
  // Fractions are rounded to the nearest byte, halves up.
  assert.is(qemu_strtosz('1.0005k'), 1025n);
  assert.is(qemu_strtosz('0.00001k'), 0n);
  assert.is(qemu_strtosz('7.999999999E'), 9223372035701854336n);
  // An exponent is refused; a bare trailing 'e' is the exabyte suffix.
  assert.is(qemu_strtosz('1.5e3k'), 'einval');
  assert.is(qemu_strtosz('1.5e'), 1729382256910270464n);
  // Hex: no fraction; a suffix is deprecated but still accepted in 7.2.
  assert.is(qemu_strtosz('0x10'), 16n);
  assert.is(qemu_strtosz('0X1f'), 31n);
  assert.is(qemu_strtosz('0x10k'), 16384n);
  assert.is(qemu_strtosz('0x1.8k'), 'einval');
  assert.is(qemu_strtosz('0x'), 'einval');
  assert.is(qemu_strtosz('-0x10'), 'einval');
  // Overflow: ERANGE, unless something follows (then the string is invalid).
  assert.is(qemu_strtosz('8E'), 1n << 63n);
  assert.is(qemu_strtosz('18446744073709551615'), 18446744073709551615n);
  assert.is(qemu_strtosz('18446744073709551616'), 'erange');
  assert.is(qemu_strtosz('99999999999999999999'), 'erange');
  assert.is(qemu_strtosz('99999999999999999999k'), 'einval');
  assert.is(qemu_strtosz(''), 'einval');
  assert.is(qemu_strtosz('k'), 'einval');
  assert.is(qemu_strtosz('1kk'), 'einval');
});

/** A list shaped like qemu-img's merged qcow2+file create options (order matters for print). */
function testList(): QemuOptsList {
  return {
    name: 'test-opts',
    desc: [
      { name: 'size', type: 'size', help: 'Virtual disk size' },
      { name: 'backing_file', type: 'string' },
      { name: 'cluster_size', type: 'size', def_value_str: '65536' },
      { name: 'lazy_refcounts', type: 'bool', def_value_str: 'off' },
      { name: 'refcount_bits', type: 'number', def_value_str: '16' },
      { name: 'nocow', type: 'bool' },
    ],
  };
}

test('qemu_opt_set: stores the string and the parsed value; last setting wins; unknown names refused', () => {
  const opts = qemu_opts_create(testList());
  assert.is(opts.opts.length, 0);
  qemu_opt_set(opts, 'size', '64k');
  qemu_opt_set(opts, 'backing_file', 'a,b');
  qemu_opt_set(opts, 'lazy_refcounts', 'yes');
  qemu_opt_set(opts, 'refcount_bits', '0x10');
  qemu_opt_set(opts, 'size', '1M');
  assert.equal(
    opts.opts.map((o) => [o.name, o.str, o.value, o.desc?.type]),
    [
      ['size', '64k', 65536, 'size'],
      ['backing_file', 'a,b', null, 'string'],
      ['lazy_refcounts', 'yes', true, 'bool'],
      ['refcount_bits', '0x10', 16, 'number'],
      ['size', '1M', 1048576, 'size'],
    ],
  );
  assert.is(qemu_opt_find(opts, 'size')!.str, '1M');
  assert.is(qemu_opt_find(opts, 'nocow'), null);
  assert.is(qemu_opt_find(opts, 'bogus'), null);
  throwsExactly(() => qemu_opt_set(opts, 'bogus', '1'), QemuError, "Invalid parameter 'bogus'");
  assert.is(opts.opts.length, 5, 'nothing stored on error');
});

test("qemu_opt_set: QEMU's messages for bad bools, numbers and sizes; nothing stored on error", () => {
  const opts = qemu_opts_create(testList());
  const bad = (name: string, value: string, msg: string) => throwsExactly(() => qemu_opt_set(opts, name, value), QemuError, msg);
  bad('nocow', 'maybe', "Parameter 'nocow' expects 'on' or 'off'");
  bad('nocow', 'ON', "Parameter 'nocow' expects 'on' or 'off'");
  bad('nocow', '', "Parameter 'nocow' expects 'on' or 'off'");
  bad('refcount_bits', 'abc', "Parameter 'refcount_bits' expects a number");
  bad('refcount_bits', '', "Parameter 'refcount_bits' expects a number");
  bad('refcount_bits', '16 ', "Parameter 'refcount_bits' expects a number");
  bad('refcount_bits', '08', "Parameter 'refcount_bits' expects a number");
  bad('refcount_bits', '0x', "Parameter 'refcount_bits' expects a number");
  bad('refcount_bits', '99999999999999999999', "Value '99999999999999999999' is too large for parameter 'refcount_bits'");
  // aioco's limit: JS numbers (QEMU would accept up to 2^64-1).
  bad('refcount_bits', '9007199254740993', "Value '9007199254740993' is too large for parameter 'refcount_bits'");
  bad('cluster_size', 'x', "Parameter 'cluster_size' expects a non-negative number below 2^64");
  bad('cluster_size', '', "Parameter 'cluster_size' expects a non-negative number below 2^64");
  bad('cluster_size', '-1', "Parameter 'cluster_size' expects a non-negative number below 2^64");
  bad('cluster_size', '16E', "Value '16E' is out of range for parameter 'cluster_size'");
  bad('cluster_size', '9P', "Value '9P' is out of range for parameter 'cluster_size'");
  assert.is(opts.opts.length, 0);
});

test('qemu_opt_set: bool spellings (qapi_bool_parse); numbers are strtoull base 0 read as int64', () => {
  const opts = qemu_opts_create(testList());
  const b = (v: string) => {
    qemu_opt_set(opts, 'nocow', v);
    return qemu_opt_get_bool(opts, 'nocow', !true);
  };
  assert.equal(['on', 'yes', 'true', 'y'].map(b), [true, true, true, true]);
  assert.equal(['off', 'no', 'false', 'n'].map((v) => (qemu_opt_set(opts, 'nocow', v), qemu_opt_get_bool(opts, 'nocow', true))), [false, false, false, false]);
  const n = (v: string) => {
    qemu_opt_set(opts, 'refcount_bits', v);
    return qemu_opt_get_number(opts, 'refcount_bits', 0);
  };
  assert.equal(['16', '0x10', '020', ' 16', '+16', '0', '-1'].map(n), [16, 16, 16, 16, 16, 0, -1]);
});

test('qemu_opt_set_number / qemu_opt_set_bool: string form, value kept, name checked, type not', () => {
  const opts = qemu_opts_create(testList());
  qemu_opt_set_number(opts, 'refcount_bits', 64);
  qemu_opt_set_bool(opts, 'lazy_refcounts', true);
  qemu_opt_set_bool(opts, 'nocow', false);
  qemu_opt_set_number(opts, 'size', 4096);
  assert.equal(
    opts.opts.map((o) => [o.name, o.str, o.value]),
    [
      ['refcount_bits', '64', 64],
      ['lazy_refcounts', 'on', true],
      ['nocow', 'off', false],
      ['size', '4096', 4096],
    ],
  );
  assert.is(qemu_opt_get_number(opts, 'refcount_bits', 0), 64);
  assert.is(qemu_opt_get_bool(opts, 'lazy_refcounts', false), true);
  assert.is(qemu_opt_get_size_del(opts, 'size', 0), 4096);
  // QEMU stores the number into a string option without checking the type.
  qemu_opt_set_number(opts, 'backing_file', 7);
  assert.is(qemu_opt_get(opts, 'backing_file'), '7');
  throwsExactly(() => qemu_opt_set_number(opts, 'bogus', 1), QemuError, "Invalid parameter 'bogus'");
  throwsExactly(() => qemu_opt_set_bool(opts, 'bogus', true), QemuError, "Invalid parameter 'bogus'");
  assert.is(opts.opts.length, 4);
});

test('qemu_opt_get / qemu_opt_get_del: last setting, else the default string, else null; _del removes all', () => {
  const opts = qemu_opts_create(testList());
  assert.is(qemu_opt_get(opts, 'cluster_size'), '65536');
  assert.is(qemu_opt_get(opts, 'backing_file'), null);
  assert.is(qemu_opt_get(opts, 'bogus'), null);
  qemu_opt_set(opts, 'backing_file', 'a');
  qemu_opt_set(opts, 'size', '1k');
  qemu_opt_set(opts, 'backing_file', 'b');
  assert.is(qemu_opt_get(opts, 'backing_file'), 'b');
  assert.is(qemu_opt_get_del(opts, 'backing_file'), 'b');
  assert.equal(opts.opts.map((o) => o.name), ['size']);
  assert.is(qemu_opt_get_del(opts, 'backing_file'), null);
  assert.is(qemu_opt_get_del(opts, 'cluster_size'), '65536', 'the default, nothing to delete');
  assert.equal(opts.opts.map((o) => o.name), ['size']);
});

test('qemu_opt_unset: removes the last setting only (an earlier one shows again); -1 when unset', () => {
  const opts = qemu_opts_create({ name: 'any', desc: [] });
  qemu_opt_set(opts, 'a', '1');
  qemu_opt_set(opts, 'b', '2');
  qemu_opt_set(opts, 'a', '3');
  assert.is(qemu_opt_unset(opts, 'a'), 0);
  assert.is(qemu_opt_get(opts, 'a'), '1');
  assert.is(qemu_opt_unset(opts, 'a'), 0);
  assert.is(qemu_opt_get(opts, 'a'), null);
  assert.is(qemu_opt_unset(opts, 'a'), -1);
  assert.equal(opts.opts.map((o) => [o.name, o.str]), [['b', '2']]);
});

test('typed getters: given value, else parsed default, else defval; _del removes every setting, plain ones keep', () => {
  const opts = qemu_opts_create(testList());
  // Defaults from the description, parsed.
  assert.is(qemu_opt_get_size_del(opts, 'cluster_size', 1), 65536);
  assert.is(qemu_opt_get_bool(opts, 'lazy_refcounts', true), false);
  assert.is(qemu_opt_get_number(opts, 'refcount_bits', 1), 16);
  // No default: defval.
  assert.is(qemu_opt_get_size_del(opts, 'size', 77), 77);
  assert.is(qemu_opt_get_bool_del(opts, 'nocow', true), true);
  assert.is(qemu_opt_get_bool_del(opts, 'nocow', false), false);
  qemu_opt_set(opts, 'cluster_size', '4k');
  qemu_opt_set(opts, 'cluster_size', '2M');
  qemu_opt_set(opts, 'refcount_bits', '8');
  qemu_opt_set(opts, 'nocow', 'on');
  qemu_opt_set(opts, 'lazy_refcounts', 'on');
  assert.is(qemu_opt_get_number(opts, 'refcount_bits', 1), 8);
  assert.is(qemu_opt_get_bool(opts, 'lazy_refcounts', false), true);
  assert.equal(opts.opts.map((o) => o.name), ['cluster_size', 'cluster_size', 'refcount_bits', 'nocow', 'lazy_refcounts']);
  assert.is(qemu_opt_get_size_del(opts, 'cluster_size', 1), 2 << 20);
  assert.is(qemu_opt_get_number_del(opts, 'refcount_bits', 1), 8);
  assert.is(qemu_opt_get_bool_del(opts, 'nocow', false), true);
  assert.equal(opts.opts.map((o) => o.name), ['lazy_refcounts']);
  // After the delete the default is back.
  assert.is(qemu_opt_get_size_del(opts, 'cluster_size', 1), 65536);
  assert.is(qemu_opt_get_number_del(opts, 'refcount_bits', 1), 16);
});

test('typed getters: a setting of another type is a programming error; without descriptions the string is parsed', () => {
  const opts = qemu_opts_create(testList());
  qemu_opt_set(opts, 'backing_file', 'x');
  throwsExactly(
    () => qemu_opt_get_bool(opts, 'backing_file', false),
    QemuError,
    "qemu_opt_get_bool_helper: Assertion 'opt->desc && opt->desc->type == QEMU_OPT_BOOL' failed",
  );
  qemu_opt_set(opts, 'cluster_size', '1k');
  throwsExactly(
    () => qemu_opt_get_number(opts, 'cluster_size', 0),
    QemuError,
    "qemu_opt_get_number_helper: Assertion 'opt->desc && opt->desc->type == QEMU_OPT_NUMBER' failed",
  );
  assert.is(opts.opts.length, 2, 'nothing deleted');
  const any = qemu_opts_create({ name: 'any', desc: [] });
  qemu_opt_set(any, 'sz', '1k');
  qemu_opt_set(any, 'flag', 'yes');
  qemu_opt_set(any, 'n', '0x20');
  assert.is(qemu_opt_get_size_del(any, 'sz', 0), 1024);
  assert.is(qemu_opt_get_bool(any, 'flag', false), true);
  assert.is(qemu_opt_get_number(any, 'n', 0), 32);
  qemu_opt_set(any, 'bad', 'maybe');
  throwsExactly(() => qemu_opt_get_bool(any, 'bad', false), QemuError, "Parameter 'bad' expects 'on' or 'off'");
});

test('qemu_opts_do_parse: key=value, ",," escapes in values, bare key = on, "no" prefix = off, id skipped', () => {
  const opts = qemu_opts_create(testList());
  qemu_opts_do_parse(opts, 'size=1G,backing_file=a,,b,,,,c,lazy_refcounts,nonocow,id=foo,refcount_bits=0x20', null);
  assert.equal(
    opts.opts.map((o) => [o.name, o.str]),
    [
      ['size', '1G'],
      ['backing_file', 'a,b,,c'],
      ['lazy_refcounts', 'on'],
      ['nocow', 'off'],
      ['refcount_bits', '0x20'],
    ],
  );
  // A trailing comma ends the string; an empty value is a value.
  const o2 = qemu_opts_create(testList());
  qemu_opts_do_parse(o2, 'backing_file=,', null);
  assert.equal(o2.opts.map((o) => [o.name, o.str]), [['backing_file', '']]);
  qemu_opts_do_parse(o2, '', null);
  assert.is(o2.opts.length, 1);
});

test('qemu_opts_do_parse: "no" is stripped whatever the type, as in QEMU ("nocow" sets "cow")', () => {
  // qemu-img 7.2: `create -f raw -o nocow x 1M` fails with "Invalid parameter 'cow'".
  const opts = qemu_opts_create(testList());
  throwsExactly(() => qemu_opts_do_parse(opts, 'nocow', null), QemuError, "Invalid parameter 'cow'");
  const any = qemu_opts_create({ name: 'any', desc: [] });
  qemu_opts_do_parse(any, 'nothing,noway=1,x', null);
  assert.equal(any.opts.map((o) => [o.name, o.str]), [['thing', 'off'], ['noway', '1'], ['x', 'on']]);
  // A bare non-bool option gets "on" and its type's message.
  throwsExactly(() => qemu_opts_do_parse(qemu_opts_create(testList()), 'cluster_size', null), QemuError, "Parameter 'cluster_size' expects a non-negative number below 2^64");
});

test('qemu_opts_do_parse: firstname takes a first element without "=" (",," unescaped); later ones are flags', () => {
  const opts = qemu_opts_create(testList());
  qemu_opts_do_parse(opts, 'x,,y=z,lazy_refcounts', 'backing_file');
  assert.equal(opts.opts.map((o) => [o.name, o.str]), [['backing_file', 'x,y=z'], ['lazy_refcounts', 'on']]);
  const o2 = qemu_opts_create(testList());
  qemu_opts_do_parse(o2, 'size=1k,lazy_refcounts', 'backing_file');
  assert.equal(o2.opts.map((o) => [o.name, o.str]), [['size', '1k'], ['lazy_refcounts', 'on']]);
});

test('qemu_opts_do_parse: stops at the first bad option; earlier ones stay set', () => {
  const opts = qemu_opts_create(testList());
  assert.throws(() => qemu_opts_do_parse(opts, 'size=1k,bogus=1,nocow=on', null), isQemuErr("Invalid parameter 'bogus'"));
  assert.equal(opts.opts.map((o) => o.name), ['size']);
  assert.throws(() => qemu_opts_do_parse(opts, 'refcount_bits=x', null), isQemuErr("Parameter 'refcount_bits' expects a number"));
  assert.throws(() => qemu_opts_do_parse(opts, ',size=1', null), isQemuErr("Invalid parameter ''"));
  assert.equal(opts.opts.map((o) => o.name), ['size']);
});

test('qemu_opts_print: description order, defaults, parsed sizes/numbers, bools as given, commas doubled', () => {
  const opts = qemu_opts_create(testList());
  assert.is(qemu_opts_print(opts, ' '), 'cluster_size=65536 lazy_refcounts=off refcount_bits=16');
  qemu_opts_do_parse(opts, 'nocow=yes,backing_file=a,,b,refcount_bits=0x8,size=64k,cluster_size=2M', null);
  assert.is(qemu_opts_print(opts, ' '), 'size=65536 backing_file=a,,b cluster_size=2097152 lazy_refcounts=off refcount_bits=8 nocow=yes');
  assert.is(qemu_opts_print(opts, ','), 'size=65536,backing_file=a,,b,cluster_size=2097152,lazy_refcounts=off,refcount_bits=8,nocow=yes');
  // A negative number shows as QEMU's PRId64 shows it.
  qemu_opt_set(opts, 'refcount_bits', '-1');
  assert.match(qemu_opts_print(opts, ' '), / refcount_bits=-1 /);
  // A list without descriptions prints every setting in order.
  const any = qemu_opts_create({ name: 'any', desc: [] });
  qemu_opts_do_parse(any, 'b=1,a=x,,y,b=2', null);
  assert.is(qemu_opts_print(any, ' '), 'b=1 a=x,,y b=2');
  assert.is(qemu_opts_print(qemu_opts_create({ name: 'any', desc: [] }), ' '), '');
});

test('qemu_opts_append: dst first, then new names of list; first description of a name wins; inputs untouched', () => {
  const fmt: QemuOptsList = {
    name: 'fmt',
    desc: [
      { name: 'size', type: 'size', help: 'Virtual disk size' },
      { name: 'preallocation', type: 'string', def_value_str: 'off' },
    ],
  };
  const proto: QemuOptsList = {
    name: 'proto',
    desc: [
      { name: 'size', type: 'size', help: 'proto size' },
      { name: 'nocow', type: 'bool' },
      { name: 'preallocation', type: 'string', help: 'proto prealloc' },
    ],
  };
  const merged = qemu_opts_append(qemu_opts_append(null, fmt), proto);
  assert.equal(merged.desc.map((d) => d.name), ['size', 'preallocation', 'nocow']);
  assert.is(merged.desc[0]!.help, 'Virtual disk size');
  assert.is(merged.desc[1]!.def_value_str, 'off');
  assert.is(merged.name, '');
  assert.is(qemu_opts_append(fmt, proto).name, 'fmt');
  assert.equal(fmt.desc.map((d) => d.name), ['size', 'preallocation']);
  assert.equal(proto.desc.length, 3);
  assert.equal(qemu_opts_append(fmt, null).desc, fmt.desc);
  assert.equal(qemu_opts_append(null, undefined).desc, []);
  // Options set on the merged list go by its descriptions.
  const opts = qemu_opts_create(merged);
  qemu_opts_do_parse(opts, 'nocow=on,size=1M', null);
  assert.is(qemu_opts_print(opts, ' '), 'size=1048576 preallocation=off nocow=on');
});

test.run();
