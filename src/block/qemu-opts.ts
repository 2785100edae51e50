/**
 * QemuOpts value parsing shared by drivers: sizes with binary suffixes. QEMU:
 * util/cutils.c `qemu_strtosz`, util/qemu-option.c `qemu_opt_get_size`.
 */
import { QemuError } from '../aio/error.ts';

const SIZE_SUFFIXES: Record<string, number> = { B: 0, K: 10, M: 20, G: 30, T: 40, P: 50, E: 60 };

/**
 * Parses a size: a non-negative number with an optional binary suffix (k, M, G, T, P, E;
 * powers of 1024), or hex. QEMU: `qemu_strtosz`. Returns 'einval' or 'erange' on error.
 * Surprise: a fraction needs a suffix ("1.5k"), as in QEMU.
 */
export function qemu_strtosz(value: string): bigint | 'einval' | 'erange' {
  const hex = /^[ \t\n\v\f\r]*(0[xX][0-9a-fA-F]+)$/.exec(value);
  if (hex) {
    const v = BigInt(hex[1]!);
    return v > 0xffffffffffffffffn ? 'erange' : v;
  }
  const m = /^[ \t\n\v\f\r]*([0-9]+)(\.[0-9]*)?[ \t]*([bBkKmMgGtTpPeE]?)$/.exec(value);
  if (!m) return 'einval';
  const shift = BigInt(SIZE_SUFFIXES[(m[3] || 'B').toUpperCase()]!);
  let v = BigInt(m[1]!) << shift;
  if (m[2] && m[2].length > 1) {
    if (shift === 0n) return 'einval';
    v += BigInt(Math.floor(Number('0' + m[2]) * 2 ** Number(shift)));
  }
  return v > 0xffffffffffffffffn ? 'erange' : v;
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
