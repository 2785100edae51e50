/**
 * `aioco-img map` (qemu-block.md 5.4): QEMU 7.2's `img_map`, `get_block_status`,
 * `entry_mergeable` and `dump_map_entry` (human: data extents only; JSON: every extent).
 */
import type { Operation } from 'effection';
import {
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_ZERO,
  bdrv_co_block_status,
  blk_bs,
  blk_getlength,
  blk_unref,
  strerror,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
} from '../../src/index.ts';
import {
  FORCE_SHARE_OPT,
  HELP_OPT,
  IMAGE_OPTS_OPT,
  OBJECT_OPT,
  OUTPUT_OPT,
  coTask,
  coYieldIfDue,
  cvtnum,
  error_exit,
  error_report,
  getopt_long,
  img_open,
  not_supported,
  parse_output_format,
  type CoTask,
  type ImgIo,
} from './qemu-img-cmds.ts';

/** QEMU's `MapEntry` (7.2: no `compressed` member). */
export interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  offset: number;
  has_offset: boolean;
  depth: number;
  present: boolean;
  filename: string | null;
}

/** A filter's child, skipped by map. QEMU: `bdrv_skip_filters`. */
function skip_filters(bs: BlockDriverState): BlockDriverState {
  let b = bs;
  while (b.drv?.is_filter && (b.file ?? b.backing)) b = (b.file ?? b.backing)!.bs;
  return b;
}

/**
 * The status of [offset, offset + bytes) looked up down the backing chain until a layer has
 * data or zeroes. QEMU: `get_block_status` (7.2). Returns -errno or 0 with `e` filled.
 */
export function* get_block_status(bs0: BlockDriverState, offset: number, bytes: number, e: MapEntry): CoroutineFn<number> {
  let bs: BlockDriverState | null = bs0;
  let depth = 0;
  let ret = 0;
  const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
  let n = bytes;
  for (;;) {
    bs = skip_filters(bs!);
    ret = yield* bdrv_co_block_status(bs, true, offset, n, out);
    if (ret < 0) return ret;
    n = out.pnum;
    if (ret & (BDRV_BLOCK_ZERO | BDRV_BLOCK_DATA)) break;
    bs = bs.backing?.bs ?? null;
    if (!bs) {
      ret = 0;
      break;
    }
    depth++;
  }
  const has_offset = (ret & BDRV_BLOCK_OFFSET_VALID) !== 0;
  Object.assign(e, {
    start: offset,
    length: n,
    data: (ret & BDRV_BLOCK_DATA) !== 0,
    zero: (ret & BDRV_BLOCK_ZERO) !== 0,
    offset: out.map,
    has_offset,
    depth,
    present: (ret & BDRV_BLOCK_ALLOCATED) !== 0,
    filename: out.file && has_offset ? out.file.filename : null,
  });
  return 0;
}

/** Whether `next` continues `curr` in one line. QEMU: `entry_mergeable`. */
export function entry_mergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false;
  if (curr.zero !== next.zero || curr.data !== next.data || curr.depth !== next.depth || curr.present !== next.present) return false;
  if ((curr.filename === null) !== (next.filename === null) || curr.has_offset !== next.has_offset) return false;
  if (curr.filename !== null && curr.filename !== next.filename) return false;
  if (curr.has_offset && curr.offset + curr.length !== next.offset) return false;
  return true;
}

const hex16 = (v: number): string => (v === 0 ? '0' : '0x' + v.toString(16)).padEnd(16);

/** One entry's output, or null after the human format's error. QEMU: `dump_map_entry`. */
export function dump_map_entry(io: ImgIo, output: 'human' | 'json', e: MapEntry, next: MapEntry | null): boolean {
  if (output === 'human') {
    if (e.data && !e.has_offset) {
      error_report(io, 'File contains external, encrypted or compressed clusters.');
      return false;
    }
    if (e.data && !e.zero) io.out(`${hex16(e.start)}${hex16(e.length)}${hex16(e.has_offset ? e.offset : 0)}${e.filename ?? ''}\n`);
    // The human form does not tell 0, ZERO and ZERO|DATA apart: merge more.
    if (next && (!next.data || next.zero)) {
      next.data = false;
      next.zero = true;
    }
    return true;
  }
  let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.has_offset) s += `, "offset": ${e.offset}`;
  s += '}';
  if (next) s += ',\n';
  io.out(s);
  return true;
}

interface MapTask extends CoTask {
  io: ImgIo;
  bs: BlockDriverState;
  start: number;
  length: number;
  output: 'human' | 'json';
}

function* map_co(t: MapTask): CoroutineFn<number> {
  const curr: MapEntry = { start: t.start, length: 0, data: false, zero: false, offset: 0, has_offset: false, depth: 0, present: false, filename: null };
  while (curr.start + curr.length < t.length) {
    yield* coYieldIfDue(t);
    if (t.cancelled) return -1;
    const offset = curr.start + curr.length;
    const next: MapEntry = { ...curr };
    const ret = yield* get_block_status(t.bs, offset, t.length - offset, next);
    if (ret < 0) {
      error_report(t.io, `Could not read file metadata: ${strerror(-ret)}`);
      return ret;
    }
    if (entry_mergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr.length > 0 && !dump_map_entry(t.io, t.output, curr, next)) return -1;
    Object.assign(curr, next);
  }
  const ok = dump_map_entry(t.io, t.output, curr, null);
  if (t.output === 'json') t.io.out(']\n');
  return ok ? 0 : -1;
}

/** `qemu-img map [-f fmt] [--image-opts] [--start-offset=o] [--max-length=l] [--output=ofmt] [-U] filename`. */
export function* img_map(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'hf:s:l:U', [
    HELP_OPT,
    { name: 'format', arg: true, key: 'f' },
    OUTPUT_OPT,
    OBJECT_OPT,
    IMAGE_OPTS_OPT,
    FORCE_SHARE_OPT,
    { name: 'start-offset', arg: true, key: 's' },
    { name: 'max-length', arg: true, key: 'l' },
  ]);
  if (typeof g === 'number') return g;
  let fmt: string | null = null;
  let output: 'human' | 'json' = 'human';
  let imageOpts = false;
  let start = 0;
  let max_length = -1;
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'f':
        fmt = o.arg;
        break;
      case 'output': {
        const v = parse_output_format(io, o.arg!);
        if (!v) return 1;
        output = v;
        break;
      }
      case 'image-opts':
        imageOpts = true;
        break;
      case 'U':
        break;
      case 's': {
        const v = cvtnum(io, 'start offset', o.arg!);
        if (v === null) return 1;
        start = v;
        break;
      }
      case 'l': {
        const v = cvtnum(io, 'max length', o.arg!);
        if (v === null) return 1;
        max_length = v;
        break;
      }
      case 'object':
        return not_supported(io, '--object');
    }
  }
  if (g.rest.length !== 1) return error_exit(io, 'Expecting one image file name');
  const filename = g.rest[0]!;
  const blk = img_open(io, imageOpts, filename, fmt, 0, false);
  if (!blk) return 1;
  try {
    io.out(output === 'human' ? `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n` : '[');
    let length = blk_getlength(blk);
    if (length < 0) {
      error_report(io, `Failed to get size for '${filename}'`);
      return 1;
    }
    if (max_length !== -1) length = Math.min(start + max_length, length);
    const ret = yield* coTask(map_co, { cancelled: false, io, bs: blk_bs(blk)!, start, length, output });
    return ret < 0 ? 1 : 0;
  } finally {
    blk_unref(blk);
  }
}
