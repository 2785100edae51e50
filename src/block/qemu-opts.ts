/**
 * QemuOpts value parsing shared by drivers: sizes with binary suffixes. QEMU:
 * util/cutils.c `qemu_strtosz`, util/qemu-option.c `qemu_opt_get_size`.
 */
import { QemuError } from '../aio/error.ts';

const UINT64_MAX = 0xffffffffffffffffn;
const C_SPACE = ' \t\n\v\f\r';

/** Multiplier of a size suffix (B, K, M, G, T, P, E in either case), or 0 for none. */
function suffix_mul(c: string | undefined): bigint {
  const shift = c === undefined ? -1 : 'BKMGTPE'.indexOf(c.toUpperCase());
  return c !== undefined && c.length === 1 && shift >= 0 ? 1n << BigInt(10 * shift) : 0n;
}

/**
 * C's `strtoull(s + start, &end, base)` over a JS string: leading white space and a sign
 * skipped, `0x` and `0` prefixes for base 0. Returns the value modulo 2^64 (a '-' negates), the
 * end index (`start` when nothing was converted) and whether the magnitude overflowed.
 */
function strtoull(s: string, start: number, base: 0 | 10 | 16): { v: bigint; end: number; erange: boolean } {
  let i = start;
  while (i < s.length && C_SPACE.includes(s[i]!)) i++;
  let neg = false;
  if (s[i] === '+' || s[i] === '-') {
    neg = s[i] === '-';
    i++;
  }
  let b: number = base;
  const hexPrefix = s[i] === '0' && (s[i + 1] === 'x' || s[i + 1] === 'X') && /[0-9a-fA-F]/.test(s[i + 2] ?? '');
  if ((b === 0 || b === 16) && hexPrefix) {
    b = 16;
    i += 2;
  } else if (b === 0) {
    b = s[i] === '0' ? 8 : 10;
  }
  const digits = b === 16 ? /[0-9a-fA-F]/ : b === 8 ? /[0-7]/ : /[0-9]/;
  const first = i;
  let v = 0n;
  while (i < s.length && digits.test(s[i]!)) {
    v = v * BigInt(b) + BigInt(parseInt(s[i]!, 16));
    i++;
  }
  if (i === first) return { v: 0n, end: start, erange: false };
  const erange = v > UINT64_MAX;
  if (erange) return { v: UINT64_MAX, end: i, erange };
  return { v: neg ? (-v) & UINT64_MAX : v, end: i, erange };
}

/**
 * Parses a size: a decimal number with an optional binary suffix (B, k, M, G, T, P, E in either
 * case; powers of 1024), or hex. QEMU 7.2: `qemu_strtosz`. Returns 'einval' or 'erange' on error.
 * Surprises, all QEMU's: a fraction needs a suffix other than B ("1.5k" is 1536, rounded to the
 * nearest byte with halves up; "1.5" and "1.5e3k" are invalid, "1.0" is 1), leading white space
 * and '+' are accepted but nothing may follow the suffix (not even a space, so "2 G" is invalid),
 * and a suffix after hex ("0x10k") is accepted (7.2 warns that it is deprecated; aioco is silent).
 */
export function qemu_strtosz(value: string): bigint | 'einval' | 'erange' {
  const r = strtoull(value, 0, 10);
  let end = r.end;
  let val = r.v;
  let valf = 0n;
  const out = (ret: bigint | 'einval' | 'erange') => (end < value.length ? 'einval' : ret);
  if (end === 0) return 'einval';
  if (r.erange) return out('erange');
  if (value.slice(0, end).includes('-')) return 'einval';
  if (val === 0n && (value[end] === 'x' || value[end] === 'X')) {
    const h = strtoull(value, 0, 16);
    end = h.end;
    if (h.erange) return out('erange');
    val = h.v;
    if (value[end] === '.') return 'einval';
  } else if (value[end] === '.') {
    const f = /^\.[0-9]*([eE][+-]?[0-9]+)?/.exec(value.slice(end))![0];
    if (f.length === 1) {
      // strtod converts nothing from a lone '.': QEMU skips it, so "1." and "1.k" are fine.
      end++;
    } else {
      if (/[eE]/.test(f)) return 'einval';
      end += f.length;
      // QEMU keeps the fraction as 64-bit fixed point, from the double strtod gives.
      valf = BigInt(Math.trunc(Number('0' + f) * 2 ** 64)) & UINT64_MAX;
    }
  }
  let mul = suffix_mul(value[end]);
  if (mul > 0n) end++;
  else mul = 1n;
  if (mul === 1n) {
    if (valf !== 0n) return 'einval';
    return out(val);
  }
  const frac = valf * mul;
  const res = val * mul + (frac >> 64n) + ((frac >> 63n) & 1n);
  return out(res > UINT64_MAX ? 'erange' : res);
}

/**
 * C's `qemu_strtou64(value, NULL, 0, &n)`: decimal, `0x` hex or `0` octal, optional sign and
 * leading white space, nothing after; a '-' wraps modulo 2^64 as strtoull does.
 */
function qemu_strtou64(value: string): bigint | 'einval' | 'erange' {
  const r = strtoull(value, 0, 0);
  if (r.end === 0 || r.end < value.length) return 'einval';
  return r.erange ? 'erange' : r.v;
}

/**
 * The size option `name` of a driver's options (a number, or a string for
 * `qemu_strtosz`), or `defval` when absent. QEMU: `qemu_opt_get_size`. Throws QemuError
 * with QEMU's messages; a size beyond 2**53 is refused as out of range (JS numbers).
 */
export function qemu_opt_get_size(options: Record<string, unknown>, name: string, defval: number): number {
  const v = options[name];
  if (v === undefined || v === null) return defval;
  const bad = () => new QemuError(`Parameter '${name}' expects a non-negative number below 2^64`);
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || v < 0) throw bad();
    if (!Number.isSafeInteger(v)) throw new QemuError(`Value '${v}' is out of range for parameter '${name}'`);
    return v;
  }
  const n = qemu_strtosz(String(v));
  if (n === 'einval') throw bad();
  if (n === 'erange' || n > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new QemuError(`Value '${String(v)}' is out of range for parameter '${name}'`);
  }
  return Number(n);
}

/** One option's description in a QemuOptsList (QEMU: `QemuOptDesc`). */
export interface QemuOptDesc {
  name: string;
  type: 'string' | 'bool' | 'number' | 'size';
  help?: string;
  def_value_str?: string;
}

/**
 * A named list of option descriptions (QEMU: `QemuOptsList`), e.g. a driver's `create_opts`.
 * An empty `desc` accepts any option name (as QEMU's lists without descriptions do).
 */
export interface QemuOptsList {
  name: string;
  desc: QemuOptDesc[];
}

/** One option as given (QEMU: `QemuOpt`): the string, and the parsed value of typed options. */
export interface QemuOpt {
  name: string;
  str: string;
  desc: QemuOptDesc | null;
  value: boolean | number | null;
}

/**
 * A set of options checked against a QemuOptsList (QEMU: `QemuOpts`). Options keep the order
 * they were set in; a name may appear more than once and the last one wins.
 */
export class QemuOpts {
  readonly opts: QemuOpt[] = [];
  constructor(readonly list: QemuOptsList) {}
}

/** A new, empty option set over `list`. QEMU: `qemu_opts_create` (without id handling). */
export function qemu_opts_create(list: QemuOptsList): QemuOpts {
  return new QemuOpts(list);
}

/**
 * A list holding `dst`'s descriptions followed by those of `list` not already present. QEMU:
 * `qemu_opts_append`, which qemu-img uses to merge a format's and its protocol's create
 * options. Surprise: the first description of a name wins, so the format's default is kept;
 * the result keeps `dst`'s name ('' when `dst` is null: QEMU's NULL name).
 */
export function qemu_opts_append(dst: QemuOptsList | null, list: QemuOptsList | null | undefined): QemuOptsList {
  const out: QemuOptsList = { name: dst?.name ?? '', desc: [...(dst?.desc ?? [])] };
  for (const d of list?.desc ?? []) if (!out.desc.some((e) => e.name === d.name)) out.desc.push(d);
  return out;
}

function find_desc(list: QemuOptsList, name: string): QemuOptDesc | null {
  return list.desc.find((d) => d.name === name) ?? null;
}

function opts_accepts_any(list: QemuOptsList): boolean {
  return list.desc.length === 0;
}

/** Parses a boolean option value. QEMU: `qapi_bool_parse` (on/off, yes/no, true/false, y/n). */
function parse_bool(name: string, value: string): boolean {
  if (value === 'on' || value === 'yes' || value === 'true' || value === 'y') return true;
  if (value === 'off' || value === 'no' || value === 'false' || value === 'n') return false;
  throw new QemuError(`Parameter '${name}' expects 'on' or 'off'`);
}

/**
 * Parses a number option. QEMU: `parse_option_number` (qemu_strtou64, base 0). The value is the
 * uint64 read as int64, which is what qemu_opts_print shows ("-1" is -1); beyond 2^53 aioco
 * refuses it with QEMU's overflow message.
 */
function parse_number(name: string, str: string): number {
  const v = qemu_strtou64(str);
  const too_large = () => new QemuError(`Value '${str}' is too large for parameter '${name}'`);
  if (v === 'erange') throw too_large();
  if (v === 'einval') throw new QemuError(`Parameter '${name}' expects a number`);
  const n = Number(BigInt.asIntN(64, v));
  if (!Number.isSafeInteger(n)) throw too_large();
  return n;
}

/** Parses a size option. QEMU: `parse_option_size`; beyond 2^53 refused as out of range (aioco). */
function parse_size(name: string, str: string): number {
  const v = qemu_strtosz(str);
  if (v === 'einval') throw new QemuError(`Parameter '${name}' expects a non-negative number below 2^64`);
  if (v === 'erange' || v > BigInt(Number.MAX_SAFE_INTEGER)) throw new QemuError(`Value '${str}' is out of range for parameter '${name}'`);
  return Number(v);
}

function parse_value(type: QemuOptDesc['type'], name: string, str: string): boolean | number | null {
  switch (type) {
    case 'bool':
      return parse_bool(name, str);
    case 'number':
      return parse_number(name, str);
    case 'size':
      return parse_size(name, str);
    default:
      return null;
  }
}

/** The description of `name`, throwing QEMU's "Invalid parameter 'x'" unless the list accepts any name. */
function opt_desc(opts: QemuOpts, name: string): QemuOptDesc | null {
  const desc = find_desc(opts.list, name);
  if (!desc && !opts_accepts_any(opts.list)) throw new QemuError(`Invalid parameter '${name}'`);
  return desc;
}

/**
 * Sets option `name` to the string `value`, validated against the list. QEMU: `qemu_opt_set`.
 * Throws QemuError "Invalid parameter 'x'" for a name the list does not describe, and QEMU's
 * type messages: "Parameter 'x' expects 'on' or 'off'", "Parameter 'x' expects a number",
 * "Value 'v' is too large for parameter 'x'", "Parameter 'x' expects a non-negative number below
 * 2^64", "Value 'v' is out of range for parameter 'x'". Nothing is set on error.
 */
export function qemu_opt_set(opts: QemuOpts, name: string, value: string): void {
  const desc = opt_desc(opts, name);
  opts.opts.push({ name, str: value, desc, value: desc ? parse_value(desc.type, name, value) : null });
}

/**
 * Sets `name` to the number `value` (string: its decimal form). QEMU: `qemu_opt_set_number`.
 * Surprise: the value is not checked against the description's type, as in QEMU.
 */
export function qemu_opt_set_number(opts: QemuOpts, name: string, value: number): void {
  const desc = opt_desc(opts, name);
  opts.opts.push({ name, str: String(value), desc, value });
}

/**
 * Sets `name` to the bool `value` (string: "on"/"off"). QEMU: `qemu_opt_set_bool`. Surprise: the
 * value is not checked against the description's type, as in QEMU.
 */
export function qemu_opt_set_bool(opts: QemuOpts, name: string, value: boolean): void {
  const desc = opt_desc(opts, name);
  opts.opts.push({ name, str: value ? 'on' : 'off', desc, value });
}

/** The last setting of `name`, or null. QEMU: `qemu_opt_find`. */
export function qemu_opt_find(opts: QemuOpts, name: string): QemuOpt | null {
  for (let i = opts.opts.length - 1; i >= 0; i--) if (opts.opts[i]!.name === name) return opts.opts[i]!;
  return null;
}

/**
 * The string of `name`: the last one set, else the description's default, else null. QEMU:
 * `qemu_opt_get`.
 */
export function qemu_opt_get(opts: QemuOpts, name: string): string | null {
  const opt = qemu_opt_find(opts, name);
  if (opt) return opt.str;
  return find_desc(opts.list, name)?.def_value_str ?? null;
}

/** Removes every setting of `name`. QEMU: `qemu_opt_del_all`. */
function qemu_opt_del_all(opts: QemuOpts, name: string): void {
  for (let i = opts.opts.length - 1; i >= 0; i--) if (opts.opts[i]!.name === name) opts.opts.splice(i, 1);
}

/**
 * Like `qemu_opt_get` (the last setting, else the default), and removes every setting of `name`
 * so a later check for unused options does not see it. QEMU: `qemu_opt_get_del`.
 */
export function qemu_opt_get_del(opts: QemuOpts, name: string): string | null {
  const v = qemu_opt_get(opts, name);
  qemu_opt_del_all(opts, name);
  return v;
}

/**
 * Removes the last setting of `name`: 0, or -1 when it is not set. QEMU: `qemu_opt_unset`.
 * Surprise: an earlier setting of the same name becomes visible again (the `_del` getters remove
 * all). QEMU asserts the list accepts any option; aioco does not check.
 */
export function qemu_opt_unset(opts: QemuOpts, name: string): number {
  const opt = qemu_opt_find(opts, name);
  if (!opt) return -1;
  opts.opts.splice(opts.opts.lastIndexOf(opt), 1);
  return 0;
}

/**
 * The typed value of `name`: the last setting's, else the description's default parsed as
 * `type`, else `defval`; with `del` every setting is removed. QEMU: the
 * `qemu_opt_get_{bool,number,size}_helper` functions. A setting whose description has another
 * type is a programming error: QemuError with QEMU's assertion text. One without a description
 * (a list accepting any name) is parsed as `type` here, where QEMU would assert.
 */
function typed_get(opts: QemuOpts, name: string, type: 'bool' | 'number' | 'size', defval: number | boolean, del: boolean): number | boolean {
  const opt = qemu_opt_find(opts, name);
  if (!opt) {
    const def = find_desc(opts.list, name)?.def_value_str;
    return def !== undefined ? parse_value(type, name, def)! : defval;
  }
  if (opt.desc && opt.desc.type !== type) {
    const helper = `qemu_opt_get_${type}_helper`;
    throw new QemuError(`${helper}: Assertion 'opt->desc && opt->desc->type == QEMU_OPT_${type.toUpperCase()}' failed`);
  }
  const v = opt.desc ? opt.value! : parse_value(type, name, opt.str)!;
  if (del) qemu_opt_del_all(opts, name);
  return v;
}

/** The size `name` (given, else the default string, else `defval`), removing it. QEMU: `qemu_opt_get_size_del`. */
export function qemu_opt_get_size_del(opts: QemuOpts, name: string, defval: number): number {
  return typed_get(opts, name, 'size', defval, true) as number;
}

/** The number `name`, removing it. QEMU: `qemu_opt_get_number_del`. */
export function qemu_opt_get_number_del(opts: QemuOpts, name: string, defval: number): number {
  return typed_get(opts, name, 'number', defval, true) as number;
}

/** The bool `name`, removing it. QEMU: `qemu_opt_get_bool_del`. */
export function qemu_opt_get_bool_del(opts: QemuOpts, name: string, defval: boolean): boolean {
  return typed_get(opts, name, 'bool', defval, true) as boolean;
}

/** The bool `name` (kept). QEMU: `qemu_opt_get_bool`. */
export function qemu_opt_get_bool(opts: QemuOpts, name: string, defval: boolean): boolean {
  return typed_get(opts, name, 'bool', defval, false) as boolean;
}

/** The number `name` (kept). QEMU: `qemu_opt_get_number`. */
export function qemu_opt_get_number(opts: QemuOpts, name: string, defval: number): number {
  return typed_get(opts, name, 'number', defval, false) as number;
}

/**
 * Parses `k=v,k2=v2` into `opts`. QEMU: `qemu_opts_do_parse`. A value's `,,` is a literal comma;
 * `firstname` names the value of a first element without '='; any other element without '='
 * is a flag: `k` sets k=on and `nok` sets k=off. Throws QemuError as `qemu_opt_set`; options
 * before the bad one stay set, as in QEMU.
 * Surprises, all QEMU's: the `no` prefix is stripped whatever the option's type ("nocow" sets
 * "cow", refused as "Invalid parameter 'cow'" where only nocow exists); `id=...` is skipped;
 * a name ends at the first '=' or ',' (a flag's name has no `,,` escape).
 */
export function qemu_opts_do_parse(opts: QemuOpts, params: string, firstname: string | null = null): void {
  let p = 0;
  while (p < params.length) {
    let len = 0;
    while (p + len < params.length && params[p + len] !== '=' && params[p + len] !== ',') len++;
    let name: string;
    let value: string;
    if (params[p + len] !== '=') {
      if (firstname !== null) {
        name = firstname;
        [value, p] = get_opt_value(params, p);
      } else {
        name = params.slice(p, p + len);
        p += len;
        if (name.startsWith('no')) {
          name = name.slice(2);
          value = 'off';
        } else {
          value = 'on';
        }
      }
    } else {
      name = params.slice(p, p + len);
      [value, p] = get_opt_value(params, p + len + 1);
    }
    if (params[p] === ',') p++;
    firstname = null;
    if (name === 'id') continue;
    qemu_opt_set(opts, name, value);
  }
}

/** The value starting at `start` with `,,` unescaped, and the index of the ',' (or end) after it. QEMU: `get_opt_value`. */
function get_opt_value(s: string, start: number): [string, number] {
  let out = '';
  let i = start;
  while (i < s.length) {
    if (s[i] === ',') {
      if (s[i + 1] !== ',') break;
      i++;
    }
    out += s[i];
    i++;
  }
  return [out, i];
}

/**
 * The options as `name=value` in the list's description order, separated by `separator`,
 * including descriptions' defaults for unset options; commas in string values doubled; size and
 * number options that were set shown as their parsed value ("64k" as 65536), bools as given.
 * QEMU: `qemu_opts_print` (which prints; aioco returns the text). This is qemu-img create's
 * "Formatting ..." tail. Surprise: order is the list's, not the order options were given; a list
 * accepting any name prints every setting in order, repeats included.
 */
export function qemu_opts_print(opts: QemuOpts, separator: string): string {
  const parts: string[] = [];
  if (opts_accepts_any(opts.list)) {
    for (const o of opts.opts) parts.push(`${o.name}=${o.str.replaceAll(',', ',,')}`);
    return parts.join(separator);
  }
  for (const desc of opts.list.desc) {
    const opt = qemu_opt_find(opts, desc.name);
    const value = opt ? opt.str : desc.def_value_str;
    if (value === undefined) continue;
    if (desc.type === 'string') parts.push(`${desc.name}=${value.replaceAll(',', ',,')}`);
    else if ((desc.type === 'size' || desc.type === 'number') && opt) parts.push(`${desc.name}=${String(opt.value)}`);
    else parts.push(`${desc.name}=${value}`);
  }
  return parts.join(separator);
}
