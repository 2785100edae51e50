/**
 * `aioco-img create` (qemu-block.md 5.1): QEMU 7.2's `img_create` and `bdrv_img_create`
 * (block.c), plus `print_block_option_help` for `-o help`, which convert shares.
 */
import type { Operation } from 'effection';
import * as path from 'node:path';
import {
  BDRV_O_NO_BACKING,
  QemuError,
  bdrv_create,
  bdrv_find_format,
  bdrv_find_protocol,
  bdrv_getlength,
  bdrv_open,
  bdrv_unref,
  path_combine,
  path_has_protocol,
  qemu_opt_get,
  qemu_opt_get_size,
  qemu_opt_set,
  qemu_opts_append,
  qemu_opts_create,
  qemu_opts_do_parse,
  qemu_opts_print,
  strerror,
  type QemuOpts,
  type QemuOptsList,
} from '../../src/index.ts';
import { HELP_OPT, OBJECT_OPT, cvtnum, error_exit, error_report, getopt_long, not_supported, type ImgIo } from './qemu-img-cmds.ts';

/**
 * Whether `list` can be joined to others with ','. QEMU: `is_valid_option_list` (not empty,
 * no leading ',', no odd run of trailing commas).
 */
export function is_valid_option_list(list: string): boolean {
  if (list === '' || list[0] === ',') return false;
  const trailing = list.length - list.replace(/,+$/, '').length;
  return trailing % 2 === 0;
}

/** Appends `-o` lists. QEMU: `accumulate_options`; null after "Invalid option list". */
export function accumulate_options(io: ImgIo, options: string | null, list: string): string | null | false {
  if (!is_valid_option_list(list)) {
    error_report(io, `Invalid option list: ${list}`);
    return false;
  }
  return options === null ? list : `${options},${list}`;
}

/** Whether an option list asks for help (`help` or `?` as an element). QEMU: `has_help_option`. */
export function has_help_option(options: string): boolean {
  return options.split(/(?<!,),(?!,)/).some((p) => p === 'help' || p === '?');
}

function opt_help_type(type: string): string {
  return type === 'bool' ? 'bool (on/off)' : type === 'string' ? 'str' : type === 'number' ? 'num' : type;
}

/**
 * `-o help`: the format's (and with a file name, the protocol's) creation options, sorted by
 * name. QEMU: `print_block_option_help` / `qemu_opts_print_help`.
 */
export function print_block_option_help(io: ImgIo, filename: string | null, fmt: string): number {
  const drv = bdrv_find_format(fmt);
  if (!drv) {
    error_report(io, `Unknown file format '${fmt}'`);
    return 1;
  }
  if (!drv.create_opts) {
    error_report(io, `Format driver '${fmt}' does not support image creation`);
    return 1;
  }
  let list: QemuOptsList = qemu_opts_append(null, drv.create_opts);
  if (filename !== null) {
    const proto = bdrv_find_protocol(filename, true);
    if (!proto) {
      error_report(io, `Unknown protocol '${filename}'`);
      return 1;
    }
    if (!proto.create_opts) {
      error_report(io, `Protocol driver '${proto.format_name}' does not support image creation`);
      return 1;
    }
    list = qemu_opts_append(list, proto.create_opts);
  }
  io.out(filename !== null ? 'Supported options:\n' : `Supported ${fmt} options:\n`);
  const lines = [...list.desc]
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .map((d) => {
      const head = `  ${d.name}=<${opt_help_type(d.type)}>`;
      return d.help ? `${head.padEnd(24)} - ${d.help}\n` : `${head}\n`;
    });
  io.out(lines.join(''));
  if (filename === null) io.out('\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n');
  return 0;
}

/** The creation options of format `fmt` on the protocol of `filename`, or a QemuError. */
export function create_opts_for(fmt: string, filename: string): QemuOptsList {
  const drv = bdrv_find_format(fmt);
  if (!drv) throw new QemuError(`Unknown file format '${fmt}'`);
  const proto = bdrv_find_protocol(filename, true);
  if (!proto) throw new QemuError(`Unknown protocol '${filename}'`);
  if (!drv.create_opts) throw new QemuError(`Format driver '${drv.format_name}' does not support image creation`);
  if (!proto.create_opts) throw new QemuError(`Protocol driver '${proto.format_name}' does not support image creation`);
  return qemu_opts_append(qemu_opts_append(null, drv.create_opts), proto.create_opts);
}

/** The backing file name as seen from `filename`'s directory. QEMU: `bdrv_get_full_backing_filename_from_filename`. */
export function full_backing_filename_from_filename(filename: string, backing: string): string {
  if (backing === '' || path.isAbsolute(backing) || path_has_protocol(backing) || filename === '') return backing;
  return path_combine(filename, backing);
}

/**
 * Creates image `filename` of format `fmt`. QEMU 7.2: `bdrv_img_create`. `size` -1 means
 * "not given" (then `-o size`, or the backing file's size). Prints the `Formatting ...` line
 * unless quiet; throws QemuError with QEMU's message and, as `hint`, the text QEMU prints after it.
 */
export function bdrv_img_create(
  io: ImgIo,
  filename: string,
  fmt: string,
  base_filename: string | null,
  base_fmt: string | null,
  options: string | null,
  img_size: number,
  flags: number,
  quiet: boolean,
): void {
  const drv = bdrv_find_format(fmt);
  const list = create_opts_for(fmt, filename);
  const opts: QemuOpts = qemu_opts_create(list);
  if (options !== null) qemu_opts_do_parse(opts, options);
  if (qemu_opt_get(opts, 'size') === null) {
    if (img_size !== -1) qemu_opt_set(opts, 'size', String(img_size));
  } else if (img_size !== -1) {
    throw new QemuError('The image size must be specified only once');
  }
  if (base_filename !== null) {
    try {
      qemu_opt_set(opts, 'backing_file', base_filename);
    } catch {
      throw new QemuError(`Backing file not supported for file format '${fmt}'`);
    }
  }
  if (base_fmt !== null) {
    try {
      qemu_opt_set(opts, 'backing_fmt', base_fmt);
    } catch {
      throw new QemuError(`Backing file format not supported for file format '${fmt}'`);
    }
  }
  const backing_file = list.desc.some((d) => d.name === 'backing_file') ? qemu_opt_get(opts, 'backing_file') : null;
  if (backing_file !== null) {
    if (backing_file === filename) throw new QemuError('Error: Trying to create an image with the same filename as the backing file');
    if (backing_file === '') throw new QemuError('Expected backing file name, got empty string');
  }
  const backing_fmt = list.desc.some((d) => d.name === 'backing_fmt') ? qemu_opt_get(opts, 'backing_fmt') : null;
  const sizeStr = qemu_opt_get(opts, 'size');
  let size = sizeStr === null ? -1 : qemu_opt_get_size({ size: sizeStr }, 'size', -1);
  if (backing_file !== null && !(flags & BDRV_O_NO_BACKING)) {
    const full = full_backing_filename_from_filename(filename, backing_file);
    let bs;
    try {
      bs = bdrv_open(full, backing_fmt !== null ? { driver: backing_fmt } : {}, 0);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      throw Object.assign(new QemuError(e.message), { hint: 'Could not open backing image.\n' });
    }
    try {
      if (backing_fmt === null) {
        throw Object.assign(new QemuError('Backing file specified without backing format'), { hint: `Detected format of ${bs.drv?.format_name ?? ''}.` });
      }
      if (size === -1) {
        size = bdrv_getlength(bs);
        if (size < 0) throw new QemuError(`Could not get size of '${backing_file}': ${strerror(-size)}`);
        qemu_opt_set(opts, 'size', String(size));
      }
    } finally {
      bdrv_unref(bs);
    }
  } else if (backing_file !== null && backing_fmt === null) {
    throw new QemuError('Backing file specified without backing format');
  }
  if (size === -1) throw new QemuError('Image creation needs a size parameter');
  if (!quiet) io.out(`Formatting '${filename}', fmt=${fmt} ${qemu_opts_print(opts, ' ')}\n`);
  try {
    bdrv_create(drv!, filename, opts);
  } catch (e) {
    if (e instanceof QemuError && /\bFile too large\b/.test(e.message)) {
      const hint = qemu_opt_get(opts, 'cluster_size') ? ' (try using a larger cluster size)' : '';
      throw new QemuError(`The image size is too large for file format '${fmt}'${hint}`);
    }
    throw e;
  }
}

/** Prints a QemuError the way `error_reportf_err(err, "<prefix>")` does, hint included. */
export function report_err(io: ImgIo, prefix: string, e: QemuError): void {
  error_report(io, `${prefix}${e.message}`);
  const hint = (e as QemuError & { hint?: string }).hint;
  if (hint) io.err(hint);
}

/** `qemu-img create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]`. */
export function* img_create(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'F:b:f:ho:qu', [HELP_OPT, OBJECT_OPT]);
  if (typeof g === 'number') return g;
  let fmt = 'raw';
  let base_fmt: string | null = null;
  let base_filename: string | null = null;
  let options: string | null = null;
  let quiet = false;
  let flags = 0;
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'F':
        base_fmt = o.arg;
        break;
      case 'b':
        base_filename = o.arg;
        break;
      case 'f':
        fmt = o.arg!;
        break;
      case 'o': {
        const r = accumulate_options(io, options, o.arg!);
        if (r === false) return 1;
        options = r;
        break;
      }
      case 'q':
        quiet = true;
        break;
      case 'u':
        flags |= BDRV_O_NO_BACKING;
        break;
      case 'object':
        return not_supported(io, '--object');
    }
  }
  const filename = g.rest[0] ?? null;
  if (options !== null && has_help_option(options)) return print_block_option_help(io, filename, fmt);
  if (filename === null) return error_exit(io, 'Expecting image file name');
  let img_size = -1;
  if (g.rest.length > 1) {
    const v = cvtnum(io, 'image size', g.rest[1]!);
    if (v === null) return 1;
    img_size = v;
  }
  if (g.rest.length > 2) return error_exit(io, `Unexpected argument: ${g.rest[2]}`);
  try {
    bdrv_img_create(io, filename, fmt, base_filename, base_fmt, options, img_size, flags, quiet);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    report_err(io, `${filename}: `, e);
    return 1;
  }
  return 0;
}
