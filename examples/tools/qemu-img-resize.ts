/**
 * `aioco-img resize` (QEMU 7.2's `img_resize`): absolute, `+size` and `-size`; shrinking needs
 * `--shrink`; `--preallocation` for growing. As in 7.2, the size is the last argument, taken
 * out before option parsing so that `-1G` is not an option.
 */
import type { Operation } from 'effection';
import {
  BDRV_O_RDWR,
  BDRV_O_RESIZE,
  QemuError,
  bdrv_co_truncate,
  blk_getlength,
  blk_unref,
  qemu_opt_get_size,
  qemu_opt_set,
  qemu_opts_create,
  strerror,
  type BlockBackend,
  type CoroutineFn,
  type PreallocMode,
} from '../../src/index.ts';
import { HELP_OPT, IMAGE_OPTS_OPT, OBJECT_OPT, coTask, error_exit, error_report, getopt_long, img_open, not_supported, warn_report, type CoTask, type ImgIo } from './qemu-img-cmds.ts';

const PREALLOC_MODES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];

interface ResizeTask extends CoTask {
  blk: BlockBackend;
  size: number;
  prealloc: PreallocMode;
}

/** QEMU's `blk_truncate` (exact=false, as 7.2's qemu-img passes): 0 or -errno; throws QemuError. */
function* resize_co(t: ResizeTask): CoroutineFn<number> {
  if (!t.blk.root) throw new QemuError('No medium inserted');
  return yield* bdrv_co_truncate(t.blk.root, t.size, false, t.prealloc, 0);
}

/** `qemu-img resize [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+|-]size`. */
export function* img_resize(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  if (argv.length < 3) {
    if (argv.slice(1).some((a) => a === '-h' || a === '--help')) return help();
    return error_exit(io, 'Not enough arguments');
  }
  let size = argv[argv.length - 1]!;
  const g = getopt_long(io, argv.slice(0, -1), 'f:hq', [
    HELP_OPT,
    OBJECT_OPT,
    IMAGE_OPTS_OPT,
    { name: 'preallocation', arg: true, key: 'preallocation' },
    { name: 'shrink', arg: false, key: 'shrink' },
  ]);
  if (typeof g === 'number') return g;
  let fmt: string | null = null;
  let quiet = false;
  let image_opts = false;
  let shrink = false;
  let prealloc: PreallocMode = 'off';
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'f':
        fmt = o.arg;
        break;
      case 'q':
        quiet = true;
        break;
      case 'image-opts':
        image_opts = true;
        break;
      case 'shrink':
        shrink = true;
        break;
      case 'preallocation':
        if (!PREALLOC_MODES.includes(o.arg as PreallocMode)) {
          error_report(io, `Invalid preallocation mode '${o.arg}'`);
          return 1;
        }
        prealloc = o.arg as PreallocMode;
        break;
      case 'object':
        return not_supported(io, '--object');
    }
  }
  if (g.rest.length !== 1) return error_exit(io, 'Expecting image file name and size');
  const filename = g.rest[0]!;
  let relative = 0;
  if (size[0] === '+') {
    relative = 1;
    size = size.slice(1);
  } else if (size[0] === '-') {
    relative = -1;
    size = size.slice(1);
  }
  let n: number;
  try {
    const param = qemu_opts_create({ name: 'resize_options', desc: [{ name: 'size', type: 'size', help: 'Virtual disk size' }] });
    qemu_opt_set(param, 'size', size);
    n = qemu_opt_get_size({ size }, 'size', 0);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    error_report(io, e.message);
    if (/expects a non-negative number/.test(e.message)) {
      io.err('Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n');
    }
    return 1;
  }
  const blk = img_open(io, image_opts, filename, fmt, BDRV_O_RDWR | BDRV_O_RESIZE, false);
  if (!blk) return 1;
  try {
    const current_size = blk_getlength(blk);
    if (current_size < 0) {
      error_report(io, `Failed to inquire current image length: ${strerror(-current_size)}`);
      return 1;
    }
    const total_size = relative ? current_size + n * relative : n;
    if (total_size <= 0) {
      error_report(io, 'New image size must be positive');
      return 1;
    }
    if (total_size <= current_size && prealloc !== 'off') {
      error_report(io, 'Preallocation can only be used for growing images');
      return 1;
    }
    if (total_size < current_size && !shrink) {
      error_report(io, 'Use the --shrink option to perform a shrink operation.');
      warn_report(
        io,
        "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
      return 1;
    }
    let ret: number;
    try {
      ret = yield* coTask(resize_co, { cancelled: false, blk, size: total_size, prealloc });
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      error_report(io, e.message);
      return 1;
    }
    if (ret < 0) {
      error_report(io, strerror(-ret));
      return 1;
    }
    if (!quiet) io.out('Image resized.\n');
    return 0;
  } finally {
    blk_unref(blk);
  }
}
