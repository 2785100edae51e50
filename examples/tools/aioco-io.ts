/**
 * aioco-io: QEMU 7.2's qemu-io on aioco's block layer (qemu-block.md section 4).
 *
 *   aioco-io [-f FMT] [-r] [-n] [-m] [-k] [-U] [-t CACHE] [-i AIO] [-d DISCARD] [--image-opts]
 *            [-c CMD]... [file]
 *
 * Refused with an error naming them (aioco lacks what they need): -s/--snapshot,
 * -C/--copy-on-read, -T/--trace, --object. Runs under effection's main() (Ctrl-C halts it; the
 * backend is drained and closed on the way out). Each command waits only for its own request;
 * between commands the tool returns to Node's loop. stdout is buffered the way C stdio buffers
 * qemu-io's (`StdoutBuffer`), so what a crash (`abort`) loses is lost here too. Drivers: every
 * module in examples/drivers/ is imported first (each registers itself on import or through its
 * exported `bdrv_<name>_init`), then the modules listed in AIOCO_IO_PRELOAD (comma-separated paths).
 */
import { exit, main, sleep, until, type Operation } from 'effection';
import { fstatSync, readdirSync } from 'node:fs';
import { isatty } from 'node:tty';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { match } from 'ts-pattern';
import { BDRV_O_NOCACHE, BDRV_O_NATIVE_AIO, BDRV_O_RDWR, BDRV_O_UNMAP, aio_poll, blk_drain, blk_get_aio_context, blk_unref, error_set_progname } from '../../src/index.ts';
import { USAGE } from './qemu-io-help.ts';
import '../drivers/qcow2/qcow2.ts';
import {
  UNSUPPORTED_WHY,
  error_report,
  openfile,
  opts_warning,
  parse_aio,
  parse_cache_mode,
  parse_discard,
  parse_opts,
  qemuio_command,
  unsupported_option,
  type OpenSettings,
  type QemuIo,
} from './qemu-io-cmds.ts';

/** Imports every driver module in examples/drivers/, then AIOCO_IO_PRELOAD's. */
export async function loadDrivers(): Promise<void> {
  const dir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../drivers');
  let files: string[] = [];
  try {
    files = readdirSync(dir).filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts')).sort();
  } catch {
    files = [];
  }
  for (const f of files) {
    const mod = (await import(pathToFileURL(path.join(dir, f)).href)) as Record<string, unknown>;
    // Drivers that do not register on import export an idempotent `bdrv_<name>_init` (blkdebug).
    for (const [k, v] of Object.entries(mod)) if (/^bdrv_\w+_init$/.test(k) && typeof v === 'function') (v as () => void)();
  }
  for (const p of (process.env['AIOCO_IO_PRELOAD'] ?? '').split(',').filter(Boolean)) {
    await import(pathToFileURL(path.resolve(p)).href);
  }
}

/** Parsed command line. */
interface Invocation {
  cmds: string[];
  format: string | null;
  imageOpts: boolean;
  readonly: boolean;
  /** `-m`. */
  misalign: boolean;
  settings: OpenSettings;
  file: string | null;
}

const LONG: Readonly<Record<string, { short: string; arg: boolean }>> = {
  object: { short: 'O', arg: true },
  'image-opts': { short: 'I', arg: false },
  cmd: { short: 'c', arg: true },
  format: { short: 'f', arg: true },
  'read-only': { short: 'r', arg: false },
  snapshot: { short: 's', arg: false },
  nocache: { short: 'n', arg: false },
  'copy-on-read': { short: 'C', arg: false },
  misalign: { short: 'm', arg: false },
  'native-aio': { short: 'k', arg: false },
  aio: { short: 'i', arg: true },
  cache: { short: 't', arg: true },
  discard: { short: 'd', arg: true },
  trace: { short: 'T', arg: true },
  'force-share': { short: 'U', arg: false },
  help: { short: 'h', arg: false },
  version: { short: 'V', arg: false },
};
const SHORT = 'hVc:d:f:rsnCmki:t:T:U';

type Outcome = { kind: 'run'; inv: Invocation } | { kind: 'exit'; status: number };

/** qemu-io.c's option loop (getopt_long with permutation). */
export function parseInvocation(args: readonly string[], io: QemuIo): Outcome {
  const inv: Invocation = {
    cmds: [],
    format: null,
    imageOpts: false,
    readonly: false,
    misalign: false,
    settings: { flags: BDRV_O_UNMAP, writethrough: true },
    file: null,
  };
  const files: string[] = [];
  const opts: { c: string; arg: string | null }[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') {
      files.push(...args.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const l = LONG[name];
      if (!l) {
        io.err(`qemu-io: unrecognized option '${a}'\n`);
        io.out(USAGE);
        return { kind: 'exit', status: 1 };
      }
      let arg: string | null = null;
      if (l.arg) {
        if (eq >= 0) arg = a.slice(eq + 1);
        else if (i + 1 < args.length) arg = args[++i]!;
        else {
          io.err(`qemu-io: option '--${name}' requires an argument\n`);
          io.out(USAGE);
          return { kind: 'exit', status: 1 };
        }
      }
      opts.push({ c: l.short, arg });
      continue;
    }
    if (a.length < 2 || a[0] !== '-') {
      files.push(a);
      continue;
    }
    for (let k = 1; k < a.length; k++) {
      const c = a[k]!;
      const pos = SHORT.indexOf(c);
      if (pos < 0 || c === ':') {
        io.err(`qemu-io: invalid option -- '${c}'\n`);
        io.out(USAGE);
        return { kind: 'exit', status: 1 };
      }
      if (SHORT[pos + 1] === ':') {
        let arg: string;
        if (k + 1 < a.length) arg = a.slice(k + 1);
        else if (i + 1 < args.length) arg = args[++i]!;
        else {
          io.err(`qemu-io: option requires an argument -- '${c}'\n`);
          io.out(USAGE);
          return { kind: 'exit', status: 1 };
        }
        opts.push({ c, arg });
        break;
      }
      opts.push({ c, arg: null });
    }
  }
  for (const o of opts) {
    const r = match(o.c)
      .with('h', (): Outcome => (io.out(USAGE), { kind: 'exit', status: 0 }))
      .with('V', (): Outcome => (io.out('qemu-io version 7.2.22 (aioco)\n'), { kind: 'exit', status: 0 }))
      .with('c', () => (inv.cmds.push(o.arg!), null))
      .with('f', () => ((inv.format = o.arg), null))
      .with('r', () => ((inv.readonly = true), null))
      .with('I', () => ((inv.imageOpts = true), null))
      .with('n', () => ((inv.settings.flags |= BDRV_O_NOCACHE), (inv.settings.writethrough = false), null))
      .with('k', () => ((inv.settings.flags |= BDRV_O_NATIVE_AIO), null))
      .with('m', () => ((inv.misalign = true), null))
      .with('U', () => ((inv.settings.force_share = true), null))
      .with('s', (): Outcome => (unsupported_option(io, '-s/--snapshot', UNSUPPORTED_WHY.snapshot), { kind: 'exit', status: 1 }))
      .with('C', (): Outcome => (unsupported_option(io, '-C/--copy-on-read', UNSUPPORTED_WHY.copy_on_read), { kind: 'exit', status: 1 }))
      .with('T', (): Outcome => (unsupported_option(io, '-T/--trace', UNSUPPORTED_WHY.trace), { kind: 'exit', status: 1 }))
      .with('O', (): Outcome => (unsupported_option(io, '--object', UNSUPPORTED_WHY.object), { kind: 'exit', status: 1 }))
      .with('d', (): Outcome | null => {
        if (parse_discard(o.arg!, inv.settings)) return null;
        error_report(io, `Invalid discard option: ${o.arg}`);
        return { kind: 'exit', status: 1 };
      })
      .with('i', (): Outcome | null => {
        if (parse_aio(o.arg!, inv.settings)) return null;
        error_report(io, `Invalid aio option: ${o.arg}`);
        return { kind: 'exit', status: 1 };
      })
      .with('t', (): Outcome | null => {
        if (parse_cache_mode(o.arg!, inv.settings)) return null;
        error_report(io, `Invalid cache option: ${o.arg}`);
        return { kind: 'exit', status: 1 };
      })
      .otherwise(() => null);
    if (r) return r;
  }
  if (files.length > 1) {
    io.out(USAGE);
    return { kind: 'exit', status: 1 };
  }
  if (inv.imageOpts && inv.format !== null) {
    error_report(io, '--image-opts and -f are mutually exclusive');
    return { kind: 'exit', status: 1 };
  }
  if (!inv.readonly) inv.settings.flags |= BDRV_O_RDWR;
  inv.file = files[0] ?? null;
  return { kind: 'run', inv };
}

/** qemu-io's line buffer for stdin without a terminal (`fetchline_fgets`: MAXREADLINESZ 1024). */
const MAXREADLINESZ = 1024;

/**
 * The lines `fgets(line, 1024, stdin)` returns one after another: a line's `\n` is removed and
 * nothing else (`\r` and tabs stay, so `length\r` is an unknown command), a longer line comes
 * in pieces of 1023 bytes, and a last line without `\n` still counts.
 */
export async function* fgets_lines(input: AsyncIterable<Buffer | string>): AsyncGenerator<string, void, void> {
  let buf = Buffer.alloc(0);
  const max = MAXREADLINESZ - 1;
  for await (const chunk of input) {
    buf = Buffer.concat([buf, typeof chunk === 'string' ? Buffer.from(chunk) : chunk]);
    for (;;) {
      const nl = buf.indexOf(0x0a);
      if (nl >= 0 && nl < max) {
        yield buf.subarray(0, nl).toString('utf8');
        buf = buf.subarray(nl + 1);
      } else if (buf.length >= max) {
        yield buf.subarray(0, max).toString('utf8');
        buf = buf.subarray(max);
      } else break;
    }
  }
  if (buf.length > 0) yield buf.toString('utf8');
}

/**
 * Waits for the next line. qemu-io waits in `main_loop_wait`, so requests in flight complete and
 * print meanwhile: while the backend has some, its context is polled every few milliseconds.
 */
export function* next_line(io: QemuIo, it: AsyncIterator<string>): Operation<IteratorResult<string>> {
  const p = it.next();
  let res: IteratorResult<string> | null = null;
  void p.then((r) => void (res = r), () => {});
  for (;;) {
    if (io.blk) while (aio_poll(blk_get_aio_context(io.blk), false)) {}
    if (res !== null || !io.blk || io.blk.in_flight === 0) return yield* until(p);
    yield* sleep(5);
  }
}

/**
 * qemu-io's `command_loop` without a terminal: the prompt `qemu-io> ` (stdout flushed after it),
 * one command per line, until EOF (no newline then) or `quit`.
 */
function* interactive(io: QemuIo, status: { failed: boolean }): Operation<void> {
  const it = fgets_lines(process.stdin)[Symbol.asyncIterator]();
  try {
    for (;;) {
      io.out('qemu-io> ');
      io.flush?.();
      const r = yield* next_line(io, it);
      if (r.done) break;
      if ((yield* qemuio_command(io, r.value)) < 0) status.failed = true;
      if (io.quit) break;
    }
  } finally {
    // After `quit` the rest of stdin stays unread, as in qemu-io.
    process.stdin.destroy();
  }
}

/**
 * C stdio's buffering of stdout (glibc), which decides what a crash loses and how stdout and
 * stderr interleave in one pipe: to a terminal each write goes out at once (line buffering,
 * approximated), to anything else it is buffered in st_blksize bytes (BUFSIZ, 8192, at most),
 * and a write that overflows the buffer sends out the full buffer and then whole blocks of the
 * rest (`_IO_new_file_xsputn`). stderr is unbuffered. Surprise: glibc sees each printf piece,
 * this sees each `out()` string, so the block boundaries can differ by a piece.
 */
export class StdoutBuffer {
  private buf: Buffer;
  private used = 0;
  /** `size` 0: unbuffered. */
  constructor(private readonly write: (b: Buffer) => void, private readonly size: number) {
    this.buf = Buffer.alloc(size);
  }
  /** The buffering glibc gives file descriptor `fd`: 0 (unbuffered) for a terminal, else the size. */
  static sizeFor(fd: number): number {
    if (isatty(fd)) return 0;
    let blksize = 0;
    try {
      blksize = Number(fstatSync(fd).blksize);
    } catch {
      blksize = 0;
    }
    return blksize > 0 && blksize < 8192 ? blksize : 8192;
  }
  out(s: string | Uint8Array): void {
    let data = typeof s === 'string' ? Buffer.from(s, 'utf8') : Buffer.from(s.buffer, s.byteOffset, s.byteLength);
    if (this.size === 0) {
      if (data.length) this.write(data);
      return;
    }
    const n = Math.min(this.size - this.used, data.length);
    data.copy(this.buf, this.used, 0, n);
    this.used += n;
    data = data.subarray(n);
    if (data.length === 0) return;
    this.flush();
    const direct = data.length - (data.length % this.size);
    if (direct) this.write(Buffer.from(data.subarray(0, direct)));
    data.copy(this.buf, 0, direct);
    this.used = data.length - direct;
  }
  /** C's fflush(stdout). */
  flush(): void {
    if (this.used === 0) return;
    this.write(Buffer.from(this.buf.subarray(0, this.used)));
    this.used = 0;
  }
  /** What a death without exit() does to the buffer. */
  discard(): void {
    this.used = 0;
  }
}

/** The whole program; returns the exit status. */
export function* aiocoIo(args: readonly string[], io: QemuIo): Operation<number> {
  const p = parseInvocation(args, io);
  if (p.kind === 'exit') return p.status;
  const inv = p.inv;
  io.misalign = inv.misalign;
  io.imageOpts = inv.imageOpts;
  try {
    if (inv.file !== null) {
      let opts: Record<string, unknown> = {};
      let name: string | null = inv.file;
      if (inv.imageOpts) {
        opts = parse_opts(inv.file, undefined, opts_warning(io));
        name = null;
      } else if (inv.format !== null) {
        opts = { driver: inv.format };
      }
      if (openfile(io, name, inv.settings, opts)) return 1;
    }
    const status = { failed: false };
    if (inv.cmds.length > 0) {
      for (const c of inv.cmds) {
        if ((yield* qemuio_command(io, c)) < 0) status.failed = true;
        if (io.quit) break;
        // Back to Node's loop between commands (signals); the main AioContext is not attached
        // to it, so no request completes here, as between qemu-io's -c commands.
        yield* sleep(0);
      }
    } else {
      yield* interactive(io, status);
    }
    if (io.blk) blk_drain(io.blk);
    return status.failed ? 1 : 0;
  } finally {
    if (io.blk) {
      blk_unref(io.blk);
      io.blk = null;
    }
  }
}

/** Runs the tool on process.argv under effection's main(). */
export async function runMain(): Promise<void> {
  // Drivers' error_report/warn_report lines carry qemu-io's name, as QEMU's do.
  error_set_progname('qemu-io');
  await loadDrivers();
  const write = process.stdout.write.bind(process.stdout) as (b: Uint8Array) => boolean;
  const stdout = new StdoutBuffer((b) => void write(b), StdoutBuffer.sizeFor(1));
  // Drivers print on process.stdout too (blkdebug's "Suspended request"), as QEMU's printf into
  // the same C FILE: one buffer for everything, or the order of the lines would change.
  process.stdout.write = ((chunk: string | Uint8Array, enc?: unknown, cb?: unknown): boolean => {
    stdout.out(chunk);
    const done = typeof enc === 'function' ? enc : cb;
    if (typeof done === 'function') queueMicrotask(() => (done as () => void)());
    return true;
  }) as typeof process.stdout.write;
  await main(function* () {
    const io: QemuIo = {
      blk: null,
      quit: false,
      out: (s) => stdout.out(s),
      err: (s) => void process.stderr.write(s),
      flush: () => stdout.flush(),
      drop_stdout: () => stdout.discard(),
    };
    let status = 1;
    try {
      status = yield* aiocoIo(process.argv.slice(2), io);
    } finally {
      stdout.flush();
    }
    yield* exit(status);
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await runMain();
}
