/**
 * `aioco-img check` (qemu-block.md 5.3): QEMU 7.2's `img_check`, `collect_image_check`,
 * `dump_human_image_check` and `dump_json_image_check`. Exit codes: 0 clean, 1 check not
 * completed, 2 corruptions, 3 leaks only, 63 the format has no check.
 */
import type { Operation } from 'effection';
import {
  BDRV_FIX_ERRORS,
  BDRV_FIX_LEAKS,
  BDRV_O_CHECK,
  BDRV_O_RDWR,
  ENOTSUP,
  bdrv_check_result_new,
  bdrv_co_check,
  blk_bs,
  blk_unref,
  strerror,
  type BdrvCheckResult,
  type BlockDriverState,
  type CoroutineFn,
} from '../../src/index.ts';
import {
  FORCE_SHARE_OPT,
  HELP_OPT,
  IMAGE_OPTS_OPT,
  OBJECT_OPT,
  OUTPUT_OPT,
  bdrv_parse_cache_mode,
  coTask,
  error_exit,
  error_report,
  getopt_long,
  img_open,
  not_supported,
  parse_output_format,
  qobject_to_json_pretty,
  type CoTask,
  type ImgIo,
} from './qemu-img-cmds.ts';
import { c_fixed } from './qemu-io-format.ts';

/** QEMU's `ImageCheck`: optional members only when non-zero. */
export interface ImageCheck {
  filename: string;
  format: string;
  'check-errors': number;
  'image-end-offset'?: number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

const nz = (v: number): number | undefined => (v !== 0 ? v : undefined);

/** BdrvCheckResult as QEMU's ImageCheck. QEMU: the body of `collect_image_check`. */
export function image_check_of(r: BdrvCheckResult, filename: string, format: string): ImageCheck {
  return {
    filename,
    format,
    'check-errors': r.check_errors,
    'image-end-offset': nz(r.image_end_offset),
    corruptions: nz(r.corruptions),
    leaks: nz(r.leaks),
    'corruptions-fixed': nz(r.corruptions_fixed),
    'leaks-fixed': nz(r.leaks_fixed),
    'total-clusters': nz(r.bfi.total_clusters),
    'allocated-clusters': nz(r.bfi.allocated_clusters),
    'fragmented-clusters': nz(r.bfi.fragmented_clusters),
    'compressed-clusters': nz(r.bfi.compressed_clusters),
  };
}

/** The human report. QEMU: `dump_human_image_check`. */
export function dump_human_image_check(c: ImageCheck): string {
  let s = '';
  if (!(c.corruptions || c.leaks || c['check-errors'])) {
    s += 'No errors were found on the image.\n';
  } else {
    if (c.corruptions) s += `\n${c.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (c.leaks) s += `\n${c.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (c['check-errors']) s += `\n${c['check-errors']} internal errors have occurred during the check.\n`;
  }
  const total = c['total-clusters'] ?? 0;
  const alloc = c['allocated-clusters'] ?? 0;
  if (total !== 0 && alloc !== 0) {
    s +=
      `${alloc}/${total} = ${c_fixed((alloc * 100) / total, 2)}% allocated, ` +
      `${c_fixed(((c['fragmented-clusters'] ?? 0) * 100) / alloc, 2)}% fragmented, ` +
      `${c_fixed(((c['compressed-clusters'] ?? 0) * 100) / alloc, 2)}% compressed clusters\n`;
  }
  if (c['image-end-offset']) s += `Image end offset: ${c['image-end-offset']}\n`;
  return s;
}

interface CheckTask extends CoTask {
  bs: BlockDriverState;
  fix: number;
  res: BdrvCheckResult;
}

function* check_co(t: CheckTask): CoroutineFn<number> {
  return yield* bdrv_co_check(t.bs, t.res, t.fix);
}

/** `qemu-img check [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r leaks|all] [-T src_cache] [-U] filename`. */
export function* img_check(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'hf:r:T:qU', [HELP_OPT, { name: 'format', arg: true, key: 'f' }, { name: 'repair', arg: true, key: 'r' }, OUTPUT_OPT, OBJECT_OPT, IMAGE_OPTS_OPT, FORCE_SHARE_OPT]);
  if (typeof g === 'number') return g;
  let fmt: string | null = null;
  let output: 'human' | 'json' = 'human';
  let flags = BDRV_O_CHECK;
  let fix = 0;
  let cache = 'writeback';
  let quiet = false;
  let imageOpts = false;
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'f':
        fmt = o.arg;
        break;
      case 'r':
        flags |= BDRV_O_RDWR;
        if (o.arg === 'leaks') fix = BDRV_FIX_LEAKS;
        else if (o.arg === 'all') fix = BDRV_FIX_LEAKS | BDRV_FIX_ERRORS;
        else return error_exit(io, `Unknown option value for -r (expecting 'leaks' or 'all'): ${o.arg}`);
        break;
      case 'output': {
        const v = parse_output_format(io, o.arg!);
        if (!v) return 1;
        output = v;
        break;
      }
      case 'T':
        cache = o.arg!;
        break;
      case 'q':
        quiet = true;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'U':
        break;
      case 'object':
        return not_supported(io, '--object');
    }
  }
  if (g.rest.length !== 1) return error_exit(io, 'Expecting one image file name');
  const filename = g.rest[0]!;
  const cm = bdrv_parse_cache_mode(cache, flags);
  if (!cm) {
    error_report(io, `Invalid source cache option: ${cache}`);
    return 1;
  }
  const blk = img_open(io, imageOpts, filename, fmt, cm.flags, cm.writethrough);
  if (!blk) return 1;
  const out = (s: string): void => {
    if (!quiet) io.out(s);
  };
  try {
    const bs = blk_bs(blk)!;
    const format = bs.drv?.format_name ?? '';
    const t: CheckTask = { cancelled: false, bs, fix, res: bdrv_check_result_new() };
    let ret = yield* coTask(check_co, t);
    if (ret === -ENOTSUP) {
      error_report(io, 'This image format does not support checks');
      return 63;
    }
    let check = image_check_of(t.res, filename, format);
    if (ret === 0 && (check['corruptions-fixed'] || check['leaks-fixed'])) {
      if (output === 'human') {
        out(
          'The following inconsistencies were found and repaired:\n\n' +
            `    ${t.res.leaks_fixed} leaked clusters\n    ${t.res.corruptions_fixed} corruptions\n\n` +
            'Double checking the fixed image now...\n',
        );
      }
      const fixed = { 'leaks-fixed': check['leaks-fixed'], 'corruptions-fixed': check['corruptions-fixed'] };
      const t2: CheckTask = { cancelled: false, bs, fix: 0, res: bdrv_check_result_new() };
      ret = yield* coTask(check_co, t2);
      check = { ...image_check_of(t2.res, filename, format), ...fixed };
    }
    if (ret === 0) out(output === 'human' ? dump_human_image_check(check) : qobject_to_json_pretty(check) + '\n');
    if (ret !== 0 || check['check-errors']) {
      error_report(io, ret !== 0 ? `Check failed: ${strerror(-ret)}` : 'Check failed');
      return 1;
    }
    return check.corruptions ? 2 : check.leaks ? 3 : 0;
  } finally {
    blk_unref(blk);
  }
}
