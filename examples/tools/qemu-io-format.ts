/**
 * qemu-io 7.2's number parsing and output formatting (qemu-block.md 4.2-4.3): `cvtnum`
 * (qemu_strtosz with a default suffix of bytes), `cvtstr`, `timestr`, `print_report`,
 * `dump_buffer`, the pattern argument, and a glibc-style `getopt` (options may follow
 * operands; messages `cmd: invalid option -- 'x'`).
 */
import { match, P } from 'ts-pattern';

/** cvtnum's failure: -EINVAL (not a number / bad suffix) or -ERANGE (too large). */
export type CvtErr = { err: 'EINVAL' | 'ERANGE' };

const SUFFIX: Readonly<Record<string, number>> = { b: 0, k: 10, m: 20, g: 30, t: 40, p: 50, e: 60 };
const INT64_MAX = (1n << 63n) - 1n;

/**
 * Parses a size the way qemu-io's `cvtnum` does: decimal, or hex with `0x` (no suffix then),
 * an optional suffix b/k/M/G/T/P/E (powers of 1024, any case), a fraction only with a suffix.
 * Surprise: values beyond 2^53 are refused with ERANGE (JS numbers), where QEMU accepts up to INT64_MAX.
 */
export function cvtnum(s: string): number | CvtErr {
  return match(/^(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)([bBkKmMgGtTpPeE]?)$/.exec(s))
    .with(null, (): CvtErr => ({ err: 'EINVAL' }))
    .with(P.array(P.string), (m): number | CvtErr => {
      const [, num, suf] = m as [string, string, string];
      const hex = /^0[xX]/.test(num);
      if (hex && suf) return { err: 'EINVAL' };
      const frac = num.includes('.');
      if (frac && !suf) return { err: 'EINVAL' };
      const shift = suf ? SUFFIX[suf.toLowerCase()]! : 0;
      let v: bigint;
      if (frac) {
        const f = Number(num) * 2 ** shift;
        if (!Number.isFinite(f) || f > Number.MAX_SAFE_INTEGER) return { err: 'ERANGE' };
        v = BigInt(Math.floor(f));
      } else {
        v = BigInt(num) << BigInt(shift);
      }
      if (v > INT64_MAX || v > BigInt(Number.MAX_SAFE_INTEGER)) return { err: 'ERANGE' };
      return Number(v);
    })
    .exhaustive();
}

/** qemu-io's `print_cvtnum_err` text for `arg`. */
export function cvtnumErr(e: CvtErr, arg: string): string {
  return match(e.err)
    .with('ERANGE', () => `Parsing error: argument too large -- ${arg}\n`)
    .with('EINVAL', () => `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${arg}\n`)
    .exhaustive();
}

/**
 * C's `%.<d>f`: like toFixed, but an exact tie rounds to even as glibc does (3.125 -> "3.12"),
 * where JavaScript rounds it up.
 */
export function c_fixed(v: number, d: number): string {
  const r = v.toFixed(d);
  if (!Number.isFinite(v)) return r;
  const long = Math.abs(v).toFixed(Math.min(100, d + 25));
  const tail = long.slice(long.indexOf('.') + 1 + d);
  if (!/^50*$/.test(tail)) return r;
  const down = (Math.sign(v) * (Math.floor(Math.abs(v) * 10 ** d) / 10 ** d)).toFixed(d);
  const last = Number(down[down.length - 1]);
  return last % 2 === 0 ? down : r;
}

/** C's `%f` (6 decimals) / `%.3f`, glibc's rounding. */
function fixed(v: number, d: number): string {
  return c_fixed(v, d);
}

/** qemu-io's `cvtstr`: `64 KiB`, `63.938 MiB`, `32 bytes`, `54.154901 bytes`. */
export function cvtstr(value: number): string {
  const units: [number, string][] = [
    [60, ' EiB'],
    [50, ' PiB'],
    [40, ' TiB'],
    [30, ' GiB'],
    [20, ' MiB'],
    [10, ' KiB'],
  ];
  let str = '';
  let suffix = ' bytes';
  const u = units.find(([sh]) => value >= 2 ** sh);
  if (u) {
    suffix = u[1];
    str = fixed(value / 2 ** u[0], 3);
  } else {
    str = fixed(value, 6);
  }
  const trim = str.indexOf('.000');
  return trim >= 0 ? str.slice(0, trim) + suffix : str + suffix;
}

/** qemu-io's `timestr`: `%05.2f sec` below a second, else `H:MM:SS.ss`; `fixedForm` forces the latter. */
export function timestr(ns: bigint, fixedForm: boolean): string {
  const sec = Number(ns / 1_000_000_000n);
  const frac = Number(ns % 1_000_000_000n) / 1e9;
  if (fixedForm || sec > 0) {
    const h = Math.floor(sec / 3600);
    const m = Math.floor((sec % 3600) / 60);
    const s = (sec % 60) + frac;
    let ss = s.toFixed(2);
    if (ss.length < 5) ss = '0'.repeat(5 - ss.length) + ss;
    return `${h}:${String(m).padStart(2, '0')}:${ss}`;
  }
  let f = frac.toFixed(2);
  if (f.length < 5) f = '0'.repeat(5 - f.length) + f;
  return `${f} sec`;
}

function tdiv(value: number, ns: bigint): number {
  const s = Number(ns) / 1e9;
  return s === 0 ? (value === 0 ? NaN : Infinity) : value / s;
}

/** C's printf of a double with `%.3f`/`%.4f` including inf/nan. */
function cfloat(v: number, d: number): string {
  if (Number.isNaN(v)) return '-nan';
  if (!Number.isFinite(v)) return v > 0 ? 'inf' : '-inf';
  return c_fixed(v, d);
}

/** qemu-io's `print_report`: the two statistics lines, or the `-C` line. */
export function print_report(op: string, ns: bigint, offset: number, count: number, total: number, cnt: number, Cflag: boolean): string {
  const ts = timestr(ns, Cflag);
  if (Cflag) {
    return `${total},${cnt},${ts},${cfloat(tdiv(total, ns), 3)},${cfloat(tdiv(cnt, ns), 3)}\n`;
  }
  const rate = tdiv(total, ns);
  const s2 = Number.isFinite(rate) ? cvtstr(rate) : `${cfloat(rate, 3)} EiB`;
  return `${op} ${total}/${count} bytes at offset ${offset}\n${cvtstr(total)}, ${cnt} ops; ${ts} (${s2}/sec and ${cfloat(tdiv(cnt, ns), 4)} ops/sec)\n`;
}

const ALNUM = /^[0-9A-Za-z]$/;

/** qemu-io's `dump_buffer` (`read -v`). */
export function dump_buffer(buf: Uint8Array, offset: number, len: number): string {
  let out = '';
  for (let i = 0; i < len; i += 16) {
    const n = Math.min(16, len - i);
    out += (offset + i).toString(16).padStart(8, '0') + ':  ';
    let ascii = '';
    for (let j = 0; j < n; j++) {
      const b = buf[i + j]!;
      out += b.toString(16).padStart(2, '0') + ' ';
      const ch = String.fromCharCode(b);
      ascii += ALNUM.test(ch) ? ch : '.';
    }
    out += ' ' + ascii + '\n';
  }
  return out;
}

/** C's `strtol(s, &end, 0)` requiring the whole string: the value, or null. */
export function strtol0(s: string): number | null {
  const m = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(s);
  if (!m) return null;
  const body = m[2]!;
  const v = /^0[xX]/.test(body) ? parseInt(body.slice(2), 16) : body.length > 1 && body[0] === '0' ? parseInt(body, 8) : parseInt(body, 10);
  return m[1] === '-' ? -v : v;
}

/** qemu-io's `parse_pattern`: 0..255 or null (after printing the message to `out`). */
export function parse_pattern(arg: string, out: (s: string) => void): number | null {
  const v = strtol0(arg);
  if (v === null || v < 0 || v > 255) {
    out(`${arg} is not a valid pattern byte\n`);
    return null;
  }
  return v;
}

/** One parsed option: its letter and argument (null if none). */
export interface Opt {
  c: string;
  arg: string | null;
}

/**
 * glibc `getopt` with argument permutation: options (`-abc`, `-Pvalue`, `-P value`) anywhere
 * before `--`, operands kept in order. Returns null after writing glibc's message to `err`
 * on an unknown option or a missing argument.
 */
export function getopt(argv: readonly string[], optstring: string, err: (s: string) => void): { opts: Opt[]; rest: string[] } | null {
  const opts: Opt[] = [];
  const rest: string[] = [];
  const name = argv[0] ?? '';
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      rest.push(...argv.slice(i + 1));
      break;
    }
    if (a.length < 2 || a[0] !== '-') {
      rest.push(a);
      continue;
    }
    for (let k = 1; k < a.length; k++) {
      const c = a[k]!;
      const pos = c === ':' ? -1 : optstring.indexOf(c);
      if (pos < 0) {
        err(`${name}: invalid option -- '${c}'\n`);
        return null;
      }
      if (optstring[pos + 1] === ':') {
        if (k + 1 < a.length) {
          opts.push({ c, arg: a.slice(k + 1) });
        } else if (i + 1 < argv.length) {
          opts.push({ c, arg: argv[++i]! });
        } else {
          err(`${name}: option requires an argument -- '${c}'\n`);
          return null;
        }
        break;
      }
      opts.push({ c, arg: null });
    }
  }
  return { opts, rest };
}
