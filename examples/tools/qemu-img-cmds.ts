/**
 * What every aioco-img subcommand shares (qemu-block.md section 5): QEMU 7.2 qemu-img's option
 * parsing (`getopt_long` with a leading ':' and its `unrecognized option` / `missing argument`
 * messages), `error_report` / `error_exit`, `cvtnum`, `img_open`, the progress meter
 * (util/qemu-progress.c), QMP-style pretty JSON in QDict order, and the bridge that runs a
 * subcommand's I/O as a coroutine on the host-loop-driven main context.
 */
import { withResolvers, type Operation } from 'effection';
import {
  AIO_WAIT_WHILE,
  BDRV_O_RDWR,
  QemuError,
  aio_co_enter,
  aio_co_schedule,
  blk_new_open,
  blk_set_enable_write_cache,
  qemu_coroutine_create,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_strtosz,
  type BlockBackend,
  type CoroutineFn,
} from '../../src/index.ts';
import { c_fixed } from './qemu-io-format.ts';
import { parse_cache_mode, parse_opts, type OpenSettings } from './qemu-io-cmds.ts';

/** Where a subcommand prints: stdout and stderr. */
export interface ImgIo {
  out(s: string): void;
  err(s: string): void;
}

/** QEMU's `error_report` in qemu-img: `qemu-img: <msg>` on stderr. */
export function error_report(io: ImgIo, msg: string): void {
  io.err(`qemu-img: ${msg}\n`);
}

/** QEMU's `warn_report`: `qemu-img: warning: <msg>` on stderr. */
export function warn_report(io: ImgIo, msg: string): void {
  io.err(`qemu-img: warning: ${msg}\n`);
}

/**
 * qemu-img 7.2's `error_exit`: the message, then the `Try 'qemu-img --help'` line; returns the
 * exit status 1 (QEMU exits there).
 */
export function error_exit(io: ImgIo, msg: string): number {
  error_report(io, msg);
  io.err("Try 'qemu-img --help' for more information\n");
  return 1;
}

/** A long option of `getopt_long`: its name, whether it takes an argument, the key it yields. */
export interface LongOpt {
  name: string;
  arg: boolean;
  key: string;
}

/** One parsed option: a short letter or a long option's key, and its argument. */
export interface ImgOpt {
  c: string;
  arg: string | null;
}

/**
 * glibc `getopt_long` as qemu-img 7.2 calls it (option string starting with ':', so glibc prints
 * nothing): options and operands may be mixed until `--`; long names may be abbreviated to a
 * unique prefix and take `--name=value` or `--name value`. Returns the options and operands, or
 * the exit status after QEMU's message: `unrecognized option '<argv[optind - 1]>'` (glibc's
 * optind quirk: an unknown letter inside a cluster names the previous argument) or
 * `missing argument for option '<arg>'`.
 */
export function getopt_long(
  io: ImgIo,
  argv: readonly string[],
  shortopts: string,
  longopts: readonly LongOpt[],
): { opts: ImgOpt[]; rest: string[] } | number {
  const opts: ImgOpt[] = [];
  const rest: string[] = [];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      rest.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const exact = longopts.find((l) => l.name === name);
      const cands = exact ? [exact] : longopts.filter((l) => l.name.startsWith(name));
      const l = cands.length === 1 ? cands[0]! : null;
      if (!l || (!l.arg && eq >= 0)) return error_exit(io, `unrecognized option '${a}'`);
      let arg: string | null = null;
      if (l.arg) {
        if (eq >= 0) arg = a.slice(eq + 1);
        else if (i + 1 < argv.length) arg = argv[++i]!;
        else return error_exit(io, `missing argument for option '${a}'`);
      }
      opts.push({ c: l.key, arg });
      continue;
    }
    if (a.length < 2 || a[0] !== '-') {
      rest.push(a);
      continue;
    }
    for (let k = 1; k < a.length; k++) {
      const c = a[k]!;
      const pos = c === ':' ? -1 : shortopts.indexOf(c);
      if (pos < 0) return error_exit(io, `unrecognized option '${k + 1 === a.length ? a : argv[i - 1]}'`);
      if (shortopts[pos + 1] === ':') {
        if (k + 1 < a.length) opts.push({ c, arg: a.slice(k + 1) });
        else if (i + 1 < argv.length) opts.push({ c, arg: argv[++i]! });
        else return error_exit(io, `missing argument for option '${a}'`);
        break;
      }
      opts.push({ c, arg: null });
    }
  }
  return { opts, rest };
}

/** Long options every subcommand has. */
export const HELP_OPT: LongOpt = { name: 'help', arg: false, key: 'h' };
export const OBJECT_OPT: LongOpt = { name: 'object', arg: true, key: 'object' };
export const IMAGE_OPTS_OPT: LongOpt = { name: 'image-opts', arg: false, key: 'image-opts' };
export const OUTPUT_OPT: LongOpt = { name: 'output', arg: true, key: 'output' };
export const FORCE_SHARE_OPT: LongOpt = { name: 'force-share', arg: false, key: 'U' };

/**
 * Refuses an option aioco-img does not implement (never silently ignored). Returns 1.
 */
export function not_supported(io: ImgIo, what: string): number {
  error_report(io, `${what} is not supported by aioco-img`);
  return 1;
}

/** INT64_MAX as a bigint. */
const INT64_MAX = (1n << 63n) - 1n;

/**
 * qemu-img 7.2's `cvtnum_full(name, value, min, max)`: a size with suffix, or null after QEMU's
 * messages (`Invalid <name> specified. You may use k, M, ...` / `... Must be between A and B.`).
 * Surprise: values beyond 2^53 are refused as out of range (JS numbers).
 */
export function cvtnum_full(io: ImgIo, name: string, value: string, min: bigint, max: bigint): number | null {
  const r = qemu_strtosz(value);
  if (r === 'einval') {
    error_report(io, `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for`);
    error_report(io, 'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
    return null;
  }
  if (r === 'erange' || r > max || r < min) {
    error_report(io, `Invalid ${name} specified. Must be between ${min} and ${max}.`);
    return null;
  }
  if (r > BigInt(Number.MAX_SAFE_INTEGER)) {
    error_report(io, `Invalid ${name} specified. Must be between ${min} and ${Number.MAX_SAFE_INTEGER}.`);
    return null;
  }
  return Number(r);
}

/** qemu-img's `cvtnum(name, value)`: `cvtnum_full` between 0 and INT64_MAX. */
export function cvtnum(io: ImgIo, name: string, value: string): number | null {
  return cvtnum_full(io, name, value, 0n, INT64_MAX);
}

/** `--output` value: 'human' | 'json', or null after 7.2's message. */
export function parse_output_format(io: ImgIo, arg: string): 'human' | 'json' | null {
  if (arg === 'human' || arg === 'json') return arg;
  error_report(io, '--output must be used with human or json as argument.');
  return null;
}

/**
 * qemu-img's `img_open`: opens `filename` (or, with `imageOpts`, the option string
 * `filename`, implied key `file`) with format `fmt` under a new BlockBackend, or returns null
 * after `Could not open '<name>': <reason>`. `forceShare` is accepted (aioco takes no image
 * locks, so sharing is what always happens).
 */
export function img_open(
  io: ImgIo,
  imageOpts: boolean,
  filename: string,
  fmt: string | null,
  flags: number,
  writethrough: boolean,
  options: Record<string, unknown> = {},
): BlockBackend | null {
  let opts: Record<string, unknown> = { ...options };
  let name: string | null = filename;
  if (imageOpts) {
    if (fmt !== null) {
      error_report(io, '--image-opts and --format are mutually exclusive');
      return null;
    }
    opts = { ...parse_opts(filename, 'file'), ...opts };
    name = null;
  } else if (fmt !== null) {
    opts['driver'] = fmt;
  }
  let blk: BlockBackend;
  try {
    blk = blk_new_open(name, null, opts, flags);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    error_report(io, `Could not open '${filename}': ${e.message}`);
    return null;
  }
  blk_set_enable_write_cache(blk, !writethrough);
  return blk;
}

/** Parses a cache mode into `{flags, writethrough}`, or null. QEMU: `bdrv_parse_cache_mode`. */
export function bdrv_parse_cache_mode(mode: string, flags: number): { flags: number; writethrough: boolean } | null {
  const s: OpenSettings = { flags, writethrough: false };
  if (!parse_cache_mode(mode, s)) return null;
  return { flags: s.flags, writethrough: s.writethrough };
}

/** Whether `flags` open read-write. */
export function is_rdwr(flags: number): boolean {
  return (flags & BDRV_O_RDWR) !== 0;
}



/**
 * util/qemu-progress.c: prints `    (%3.2f/100%)\r` when progress moved by more than `min_skip`
 * or reaches 0 or 100, and a final newline at the end, only when enabled. QEMU keeps the
 * values in C floats, so every step is rounded to single precision here too.
 */
export class QemuProgress {
  private current = 0;
  private last_print = 0;
  constructor(
    private readonly io: ImgIo,
    private readonly enabled: boolean,
    private readonly min_skip: number,
  ) {}

  /** `qemu_progress_print(delta, max)`: max 0 sets the value, else adds delta% of max. */
  print(delta: number, max: number): void {
    const f = Math.fround;
    let current = max === 0 ? f(delta) : f(this.current + f(f(f(delta) / 100) * max));
    if (current > 100) current = 100;
    this.current = current;
    if (current > f(this.last_print + this.min_skip) || current < f(this.last_print - this.min_skip) || current === 0 || current === 100) {
      this.last_print = current;
      if (this.enabled) this.io.out(`    (${c_fixed(current, 2)}/100%)\r`);
    }
  }

  /** `qemu_progress_end`. */
  end(): void {
    if (this.enabled) this.io.out('\n');
  }
}

/** QEMU's `tdb_hash` % QDICT_BUCKET_MAX: the bucket deciding a QDict member's output position. */
function qdict_bucket(name: string): number {
  const bytes = Buffer.from(name, 'utf8');
  let value = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) value = (value + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, value) + 12345) >>> 0) % 512;
}

function json_value(v: unknown, indent: number): string {
  const pad = '    '.repeat(indent + 1);
  const end = '    '.repeat(indent);
  if (Array.isArray(v)) {
    if (v.length === 0) return '[\n' + end + ']';
    return '[\n' + v.map((e) => pad + json_value(e, indent + 1)).join(',\n') + '\n' + end + ']';
  }
  if (v !== null && typeof v === 'object') {
    const keys = Object.keys(v as object).filter((k) => (v as Record<string, unknown>)[k] !== undefined);
    if (keys.length === 0) return '{\n' + end + '}';
    // QDict iterates bucket by bucket; inside a bucket the newest member comes first.
    const order = keys.map((k, i) => ({ k, i, b: qdict_bucket(k) })).sort((a, b) => a.b - b.b || b.i - a.i);
    return '{\n' + order.map(({ k }) => `${pad}${JSON.stringify(k)}: ${json_value((v as Record<string, unknown>)[k], indent + 1)}`).join(',\n') + '\n' + end + '}';
  }
  return JSON.stringify(v);
}

/**
 * QEMU's `qobject_to_json_pretty` of a QAPI object: 4-space indentation, members in QDict
 * (hash bucket) order, which is what qemu-img prints. Undefined members are absent (QAPI's
 * `has_*` false).
 */
export function qobject_to_json_pretty(v: unknown): string {
  return json_value(v, 0);
}

/** State of a subcommand coroutine run by `coTask`. */
export interface CoTask {
  /** Set when the operation is halted (Ctrl-C): long loops stop at their next step. */
  cancelled: boolean;
  /** performance.now() of the last return to Node's loop (coYieldIfDue). */
  lastYield?: number;
}

/** How long a coroutine loop may run without going back to Node's loop (DESIGN.md: 50 ms). */
const YIELD_EVERY_MS = 20;

/**
 * Returns to Node's loop if the loop has not run for YIELD_EVERY_MS: the coroutine reschedules
 * itself through its context's BH (which the host-loop drive dispatches from setImmediate)
 * and yields. Loops whose steps can all complete synchronously (block status answered from
 * cached metadata, zero stretches that need no write) call it so Ctrl-C is seen. A
 * synchronous AIO_WAIT_WHILE also runs that BH, so a halted task still finishes.
 */
export function* coYieldIfDue(t: CoTask): CoroutineFn<void> {
  const now = performance.now();
  if (t.lastYield === undefined) t.lastYield = now;
  if (now - t.lastYield < YIELD_EVERY_MS) return;
  aio_co_schedule(qemu_get_current_aio_context(), qemu_coroutine_self());
  yield* qemu_coroutine_yield();
  t.lastYield = performance.now();
}

interface CoTaskRun<S extends CoTask, T> {
  entry: (s: S) => CoroutineFn<T>;
  s: S;
  done: boolean;
  value: T | undefined;
  error: unknown;
  settle: (() => void) | null;
}

function* coTaskEntry<S extends CoTask, T>(r: CoTaskRun<S, T>): CoroutineFn<void> {
  try {
    r.value = yield* r.entry(r.s);
  } catch (e) {
    r.error = e;
  } finally {
    r.done = true;
    if (r.settle) setImmediate(r.settle);
  }
}

/**
 * Runs `entry(s)` as a coroutine in the main AioContext (attached to Node's loop by
 * qemu_init_main_loop) and waits for it as an effection operation, so Node's loop (and
 * SIGINT) runs while it works. If the operation is halted, `s.cancelled` is set and the
 * coroutine is waited for synchronously: it stops after the requests it has in flight, so the
 * wait is bounded by one round of I/O. aioco-img's counterpart of qemu-img's main_loop_wait loops.
 */
export function coTask<S extends CoTask, T>(entry: (s: S) => CoroutineFn<T>, s: S): Operation<T> {
  return {
    *[Symbol.iterator]() {
      const { operation, resolve } = withResolvers<void>();
      const r: CoTaskRun<S, T> = { entry, s, done: false, value: undefined, error: undefined, settle: () => resolve() };
      const ctx = qemu_get_aio_context();
      aio_co_enter(ctx, qemu_coroutine_create(coTaskEntry<S, T>, r, entry.name || 'aioco-img'));
      try {
        if (!r.done) yield* operation;
      } finally {
        r.settle = null;
        if (!r.done) {
          s.cancelled = true;
          AIO_WAIT_WHILE(ctx, () => !r.done);
        }
      }
      if (r.error !== undefined) throw r.error;
      return r.value as T;
    },
  };
}
