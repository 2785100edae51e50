/**
 * What a node says about itself: `bdrv_get_info`, `bdrv_get_specific_info`,
 * `bdrv_get_allocated_file_size` (block.c) and the text dump of format-specific information that
 * qemu-img info and qemu-io info print (block/qapi.c `bdrv_image_info_specific_dump`).
 */
import { EINVAL, ENOMEDIUM, ENOTSUP } from '../aio/errno.ts';
import { BDRV_MAX_ALIGNMENT } from './block-common.ts';
import type { BlockDriverInfo, ImageInfoSpecific, QEMUSnapshotInfo } from './block-driver.ts';
import { BDRV_CHILD_DATA, BDRV_CHILD_METADATA, BDRV_CHILD_FILTERED, BDRV_CHILD_PRIMARY, type BlockDriverState } from './block-driver-state.ts';

/** A zeroed BlockDriverInfo. */
export function block_driver_info_new(): BlockDriverInfo {
  return { cluster_size: 0, vm_state_offset: 0, is_dirty: false, needs_compressed_writes: false };
}

/** The child a filter forwards to (its `file`, or a FILTERED child). QEMU: `bdrv_filter_bs`. */
function bdrv_filter_bs(bs: BlockDriverState): BlockDriverState | null {
  if (!bs.drv?.is_filter) return null;
  const c = bs.file ?? bs.children.find((x) => x.role & BDRV_CHILD_FILTERED) ?? null;
  return c?.bs ?? null;
}

/**
 * Fills `bdi` from the driver (zeroed first). QEMU 7.2: `bdrv_get_info`. Filters without the
 * callback answer for their child; others give -ENOTSUP (qemu-io's `info` then prints nothing
 * more) and leave `bdi` untouched; a cluster size above BDRV_MAX_ALIGNMENT is -EINVAL.
 */
export function bdrv_get_info(bs: BlockDriverState, bdi: BlockDriverInfo): number {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  if (!drv.bdrv_get_info) {
    const f = bdrv_filter_bs(bs);
    return f ? bdrv_get_info(f, bdi) : -ENOTSUP;
  }
  Object.assign(bdi, block_driver_info_new());
  const ret = drv.bdrv_get_info(bs, bdi);
  if (ret < 0) return ret;
  if (bdi.cluster_size > BDRV_MAX_ALIGNMENT) return -EINVAL;
  return 0;
}

/**
 * The driver's format-specific information, or null when it has none. QEMU:
 * `bdrv_get_specific_info`; a driver may throw QemuError.
 */
export function bdrv_get_specific_info(bs: BlockDriverState): ImageInfoSpecific | null {
  return bs.drv?.bdrv_get_specific_info?.(bs) ?? null;
}

/**
 * Host bytes used by the node: the driver's answer, else for a filter its child's, else for a
 * format node the sum over its data, metadata and filtered children (not `backing`). QEMU 7.2:
 * `bdrv_get_allocated_file_size`; -ENOTSUP for a protocol without the callback (qemu-img info
 * then prints `disk size: unavailable`).
 */
export function bdrv_get_allocated_file_size(bs: BlockDriverState): number {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  if (drv.bdrv_get_allocated_file_size) return drv.bdrv_get_allocated_file_size(bs);
  if (drv.bdrv_file_open || drv.protocol_name) return -ENOTSUP;
  const f = bdrv_filter_bs(bs);
  if (f) return bdrv_get_allocated_file_size(f);
  let sum = 0;
  for (const c of bs.children) {
    if (!(c.role & (BDRV_CHILD_DATA | BDRV_CHILD_METADATA | BDRV_CHILD_FILTERED))) continue;
    const n = bdrv_get_allocated_file_size(c.bs);
    if (n < 0) return n;
    sum += n;
  }
  return sum;
}

/** C's `printf("%.17g", v)`, which QEMU's qnum_to_string uses for doubles. */
function format_g17(v: number): string {
  if (!Number.isFinite(v)) return Number.isNaN(v) ? 'nan' : v > 0 ? 'inf' : '-inf';
  if (v === 0) return Object.is(v, -0) ? '-0' : '0';
  const [mant, e] = v.toExponential(16).split('e') as [string, string];
  const x = Number(e);
  if (x < -4 || x >= 17) {
    const m = mant.includes('.') ? mant.replace(/0+$/, '').replace(/\.$/, '') : mant;
    return `${m}e${x < 0 ? '-' : '+'}${String(Math.abs(x)).padStart(2, '0')}`;
  }
  const fixed = v.toFixed(Math.max(0, 16 - x));
  return fixed.includes('.') ? fixed.replace(/0+$/, '').replace(/\.$/, '') : fixed;
}

/** A scalar as QEMU's dump_qobject prints it: integers in decimal, doubles as %.17g, bools true/false. */
function dump_scalar(v: unknown): string {
  if (typeof v === 'number') return Number.isInteger(v) ? String(v) : format_g17(v);
  return String(v);
}

function dump_value(indent: number, v: unknown, out: string[], head: string): void {
  const composite = v !== null && typeof v === 'object';
  if (!composite) {
    out.push(`${head} ${dump_scalar(v)}`);
    return;
  }
  out.push(head);
  if (Array.isArray(v)) {
    v.forEach((e, i) => dump_value(indent + 1, e, out, `${' '.repeat(indent * 4)}[${i}]:`));
  } else {
    for (const [k, e] of Object.entries(v as Record<string, unknown>)) {
      // An absent optional QAPI member is not in QEMU's QDict at all.
      if (e === undefined) continue;
      dump_value(indent + 1, e, out, `${' '.repeat(indent * 4)}${k.replaceAll('-', ' ')}:`);
    }
  }
}

/**
 * The lines qemu-img info prints under "Format specific information:": `data`'s members at
 * 4 spaces, dashes in names shown as spaces, nested objects and lists indented 4 more, list
 * items as `[i]:`. QEMU 7.2: `bdrv_image_info_specific_dump` (which prints; aioco returns the text,
 * each line ending in a newline).
 */
export function bdrv_image_info_specific_dump(info: ImageInfoSpecific): string {
  const out: string[] = [];
  for (const [k, v] of Object.entries(info.data)) {
    if (v !== undefined) dump_value(2, v, out, `    ${k.replaceAll('-', ' ')}:`);
  }
  return out.map((l) => l + '\n').join('');
}

/**
 * The child snapshot operations fall back to: the primary child, if no other child holds data
 * or metadata. QEMU: `bdrv_snapshot_fallback`.
 */
function bdrv_snapshot_fallback(bs: BlockDriverState): BlockDriverState | null {
  const primary = bs.children.find((c) => c.role & BDRV_CHILD_PRIMARY);
  if (!primary) return null;
  const others = bs.children.some((c) => c !== primary && c.role & (BDRV_CHILD_DATA | BDRV_CHILD_METADATA | BDRV_CHILD_FILTERED));
  return others ? null : primary.bs;
}

/**
 * The node's internal snapshots. QEMU 7.2: `bdrv_snapshot_list`: the driver's answer, else its
 * fallback child's (raw asks its file), else -ENOTSUP (qemu-img info then prints no table).
 */
export function bdrv_snapshot_list(bs: BlockDriverState): QEMUSnapshotInfo[] | number {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  if (drv.bdrv_snapshot_list) return drv.bdrv_snapshot_list(bs);
  const f = bdrv_snapshot_fallback(bs);
  return f ? bdrv_snapshot_list(f) : -ENOTSUP;
}
