/**
 * aioco-img: QEMU 7.2's qemu-img on aioco's block layer (qemu-block.md section 5), for raw and
 * qcow2 images: info, create, check, map, convert, compare, bench, resize.
 *
 *   aioco-img [-h | -V] COMMAND [command options]
 *
 * Runs under effection's main(): Ctrl-C halts the subcommand, whose I/O runs as coroutines on
 * the main AioContext driven by Node's loop (qemu_init_main_loop), so a convert stops after
 * its requests in flight and closes the target cleanly; the exit status is then 130. Drivers:
 * every module in examples/drivers/ (aioco-io's loadDrivers), qcow2 included. Options or subcommands aioco-img lacks are refused with an error naming them.
 */
import { exit, main, type Operation } from 'effection';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { bdrv_drivers, error_set_progname, qemu_init_main_loop } from '../../src/index.ts';
import { loadDrivers } from './aioco-io.ts';
import { error_exit, getopt_long, type ImgIo } from './qemu-img-cmds.ts';
import { img_info } from './qemu-img-info.ts';
import { img_create } from './qemu-img-create.ts';
import { img_check } from './qemu-img-check.ts';
import { img_map } from './qemu-img-map.ts';
import { img_compare } from './qemu-img-compare.ts';
import { img_convert } from './qemu-img-convert.ts';
import { img_bench } from './qemu-img-bench.ts';
import { img_resize } from './qemu-img-resize.ts';

/** The version line pair qemu-img prints for -V (aioco marked). */
export const QEMU_IMG_VERSION = 'qemu-img version 7.2.22 (aioco)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n';

/** A subcommand: QEMU's `img_cmd_t` (name, handler). */
export interface ImgCmd {
  name: string;
  usage: string;
  handler: (io: ImgIo, argv: readonly string[], help: () => number) => Operation<number>;
}

/** The subcommands aioco-img implements, with qemu-img 7.2's usage lines. */
export const img_cmds: readonly ImgCmd[] = [
  {
    name: 'bench',
    usage:
      'bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename',
    handler: img_bench,
  },
  { name: 'check', usage: 'check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename', handler: img_check },
  { name: 'compare', usage: 'compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2', handler: img_compare },
  {
    name: 'convert',
    usage:
      'convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename',
    handler: img_convert,
  },
  { name: 'create', usage: 'create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]', handler: img_create },
  { name: 'info', usage: 'info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename', handler: img_info },
  { name: 'map', usage: 'map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename', handler: img_map },
  { name: 'resize', usage: 'resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size', handler: img_resize },
];

/** qemu-img's help (`-h`, or `-h` given to a subcommand): usage of what aioco-img implements. */
export function help(io: ImgIo): number {
  io.out(
    QEMU_IMG_VERSION +
      'usage: qemu-img [standard options] command [command options]\nQEMU disk image utility\n\n' +
      "    '-h', '--help'       display this help and exit\n    '-V', '--version'    output version information and exit\n\n" +
      'Command syntax:\n' +
      img_cmds.map((c) => `  ${c.usage}\n`).join('') +
      '\nSupported formats: ' +
      bdrv_drivers()
        .map((d) => d.format_name)
        .sort()
        .join(' ') +
      '\n',
  );
  return 0;
}

/** The whole program (qemu-img.c `main`); returns the exit status. */
export function* aiocoImg(args: readonly string[], io: ImgIo): Operation<number> {
  // main's own options stop at the first operand ('+' in QEMU's option string).
  let i = 0;
  for (; i < args.length; i++) {
    const a = args[i]!;
    if (a === '-h' || a === '--help') return help(io);
    if (a === '-V' || a === '--version') {
      io.out(QEMU_IMG_VERSION);
      return 0;
    }
    if (a === '-T' || a === '--trace' || a.startsWith('--trace=') || (a.startsWith('-T') && a.length > 2)) {
      return error_exit(io, "option '-T' (tracing) is not supported by aioco-img");
    }
    if (a === '--') {
      i++;
      break;
    }
    if (a.startsWith('-') && a.length > 1) {
      // Reuse getopt_long's message for anything else.
      const g = getopt_long(io, ['qemu-img', a], 'hVT:', [
        { name: 'help', arg: false, key: 'h' },
        { name: 'version', arg: false, key: 'V' },
        { name: 'trace', arg: true, key: 'T' },
      ]);
      return typeof g === 'number' ? g : error_exit(io, `unrecognized option '${a}'`);
    }
    break;
  }
  if (i >= args.length) return error_exit(io, 'Not enough arguments');
  const name = args[i]!;
  const cmd = img_cmds.find((c) => c.name === name);
  if (!cmd) {
    if (['amend', 'bitmap', 'commit', 'dd', 'measure', 'snapshot', 'rebase'].includes(name)) {
      return error_exit(io, `Command '${name}' is not supported by aioco-img`);
    }
    return error_exit(io, `Command not found: ${name}`);
  }
  return yield* cmd.handler(io, args.slice(i), () => help(io));
}

/** Loads every driver, as aioco-io does (qcow2 is among them). */
export async function loadImgDrivers(): Promise<void> {
  await loadDrivers();
}

/** Runs the tool on process.argv under effection's main(). */
export async function runMain(): Promise<void> {
  // Drivers' error_report/warn_report lines carry qemu-img's name, as QEMU's do.
  error_set_progname('qemu-img');
  await loadImgDrivers();
  qemu_init_main_loop();
  await main(function* () {
    const io: ImgIo = {
      out: (s) => void process.stdout.write(s),
      err: (s) => void process.stderr.write(s),
    };
    const status = yield* aiocoImg(process.argv.slice(2), io);
    yield* exit(status);
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await runMain();
}
