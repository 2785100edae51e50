/**
 * aioco-io: QEMU 7.2's qemu-io on aioco's block layer (qemu-block.md section 4).
 *
 *   aioco-io [-f FMT] [-r] [-n] [-t CACHE] [-i AIO] [-d DISCARD] [--image-opts] [-c CMD]... [file]
 *
 * Runs under effection's main() (Ctrl-C halts it; the backend is drained and closed on the way
 * out). Each command waits only for its own request; between commands the tool returns to
 * Node's loop. Drivers: every module in examples/drivers/ is imported first (each registers
 * itself on import or through its exported `bdrv_<name>_init`), then the modules listed in
 * AIOCO_IO_PRELOAD (comma-separated paths).
 */
import { exit, main, sleep, until, type Operation } from 'effection';
import { readdirSync } from 'node:fs';
import { createInterface } from 'node:readline';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { match } from 'ts-pattern';
import { BDRV_O_NOCACHE, BDRV_O_NATIVE_AIO, BDRV_O_RDWR, BDRV_O_UNMAP, blk_drain, blk_unref } from '../../src/index.ts';
import { USAGE } from './qemu-io-help.ts';
import {
  error_report,
  openfile,
  parse_aio,
  parse_cache_mode,
  parse_discard,
  parse_opts,
  qemuio_command,
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
      .with('s', 'C', 'm', 'U', 'T', 'O', () => null)
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

/** Reads stdin lines with qemu-io's prompt (`qemu-io> `) until EOF or `quit`. */
function* interactive(io: QemuIo, status: { failed: boolean }): Operation<void> {
  const rl = createInterface({ input: process.stdin, terminal: false });
  const it = rl[Symbol.asyncIterator]();
  try {
    for (;;) {
      io.out('qemu-io> ');
      const r = yield* until(it.next());
      if (r.done) break;
      if ((yield* qemuio_command(io, r.value)) < 0) status.failed = true;
      if (io.quit) break;
    }
  } finally {
    rl.close();
  }
}

/** The whole program; returns the exit status. */
export function* aiocoIo(args: readonly string[], io: QemuIo): Operation<number> {
  const p = parseInvocation(args, io);
  if (p.kind === 'exit') return p.status;
  const inv = p.inv;
  try {
    if (inv.file !== null) {
      let opts: Record<string, unknown> = {};
      let name: string | null = inv.file;
      if (inv.imageOpts) {
        opts = parse_opts(inv.file);
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
  await loadDrivers();
  await main(function* () {
    const io: QemuIo = {
      blk: null,
      quit: false,
      out: (s) => void process.stdout.write(s),
      err: (s) => void process.stderr.write(s),
    };
    const status = yield* aiocoIo(process.argv.slice(2), io);
    yield* exit(status);
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await runMain();
}
