/**
 * Block status: which ranges are data, zero, allocated. QEMU: block/io.c
 * (`bdrv_co_block_status`, `bdrv_co_common_block_status_above`, `bdrv_co_is_allocated`).
 */
import { EIO, ENOMEDIUM } from '../aio/errno.ts';
import type { CoroutineFn } from '../coroutine/coroutine.ts';
import {
  ALIGN_DOWN,
  ALIGN_UP,
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_EOF,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_RAW,
  BDRV_BLOCK_RECURSE,
  BDRV_BLOCK_ZERO,
} from './block-common.ts';
import type { BlockStatusOut } from './block-driver.ts';
import { bdrv_bsc_fill, bdrv_bsc_is_data, bdrv_getlength, type BlockDriverState } from './block-driver-state.ts';
import { bdrv_dec_in_flight, bdrv_inc_in_flight } from './drain.ts';

/**
 * Status of `[offset, offset + bytes)` of `bs` alone: returns BDRV_BLOCK_* flags or -errno and
 * sets `out.pnum` (bytes with the same status), `out.map`, `out.file`. QEMU:
 * `bdrv_co_block_status` (7.2, static there). Rules: offset ≥ length ⇒ EOF with pnum 0; bytes 0
 * ⇒ 0; the range is clamped to the length and rounded out to request_alignment for the driver;
 * without a driver callback: DATA|ALLOCATED (+OFFSET_VALID for protocols), or RAW to `file` for
 * filters; DATA or ZERO ⇒ ALLOCATED; RAW and RECURSE ask `out.file`; map is moved to the
 * unaligned offset only with OFFSET_VALID. Nodes without children (protocols) answer from their
 * block-status cache (the last want_zero answer of exactly DATA|OFFSET_VALID) before asking the
 * driver; zero writes and discards invalidate it.
 */
export function* bdrv_co_block_status(
  bs: BlockDriverState,
  want_zero: boolean,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
): CoroutineFn<number> {
  out.pnum = 0;
  out.map = 0;
  out.file = null;
  const total_size = bdrv_getlength(bs);
  if (total_size < 0) return total_size;
  if (offset < 0 || bytes < 0) return -EIO;
  if (offset >= total_size) return BDRV_BLOCK_EOF;
  if (bytes === 0) return 0;
  const n = total_size - offset;
  if (n < bytes) bytes = n;
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  let ret: number;
  let local_map = 0;
  let local_file: BlockDriverState | null = null;
  if (!drv.bdrv_co_block_status) {
    out.pnum = bytes;
    ret = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED;
    if (offset + bytes === total_size) ret |= BDRV_BLOCK_EOF;
    if (drv.protocol_name) {
      ret |= BDRV_BLOCK_OFFSET_VALID;
      out.map = offset;
      out.file = bs;
    } else if (drv.is_filter && bs.file) {
      ret = BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID;
      local_map = offset;
      local_file = bs.file.bs;
      // fall through to the RAW handling below
      return yield* rawPassthrough(bs, want_zero, offset, bytes, out, ret, local_map, local_file, total_size);
    }
    return ret;
  }
  bdrv_inc_in_flight(bs);
  try {
    const align = bs.bl.request_alignment;
    const aligned_offset = ALIGN_DOWN(offset, align);
    const aligned_bytes = ALIGN_UP(offset + bytes, align) - aligned_offset;
    const o: BlockStatusOut = { pnum: 0, map: 0, file: null };
    // Protocol nodes (no children) keep the last DATA region seen with want_zero.
    const is_protocol_node = bs.children.length === 0;
    if (is_protocol_node && bdrv_bsc_is_data(bs, aligned_offset, o)) {
      ret = BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
      o.map = aligned_offset;
      o.file = bs;
    } else {
      ret = yield* drv.bdrv_co_block_status(bs, want_zero, aligned_offset, aligned_bytes, o);
      if (want_zero && ret === (BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID) && is_protocol_node) {
        bdrv_bsc_fill(bs, aligned_offset, o.pnum);
      }
    }
    if (ret < 0) {
      out.pnum = 0;
      out.map = o.map;
      out.file = o.file;
      return ret;
    }
    let pnum = o.pnum - (offset - aligned_offset);
    if (pnum > bytes) pnum = bytes;
    out.pnum = pnum;
    local_map = o.map;
    if (ret & BDRV_BLOCK_OFFSET_VALID) local_map += offset - aligned_offset;
    local_file = o.file;
    if (ret & BDRV_BLOCK_RAW) {
      return yield* rawPassthrough(bs, want_zero, offset, pnum, out, ret, local_map, local_file, total_size);
    }
    if (ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO)) {
      ret |= BDRV_BLOCK_ALLOCATED;
    } else if (drv.supports_backing) {
      const cow = bs.backing?.bs ?? null;
      if (!cow) ret |= BDRV_BLOCK_ZERO;
      else if (want_zero) {
        const size2 = bdrv_getlength(cow);
        if (size2 >= 0 && offset >= size2) ret |= BDRV_BLOCK_ZERO;
      }
    }
    if (want_zero && ret & BDRV_BLOCK_RECURSE && local_file && local_file !== bs && ret & BDRV_BLOCK_DATA && ret & BDRV_BLOCK_OFFSET_VALID) {
      const o2: BlockStatusOut = { pnum: 0, map: 0, file: null };
      const ret2 = yield* bdrv_co_block_status(local_file, want_zero, local_map, pnum, o2);
      if (ret2 >= 0) {
        if (ret2 & BDRV_BLOCK_EOF && (!o2.pnum || ret2 & BDRV_BLOCK_ZERO)) ret |= BDRV_BLOCK_ZERO;
        else {
          out.pnum = o2.pnum;
          ret |= ret2 & BDRV_BLOCK_ZERO;
        }
      }
    }
    ret &= ~BDRV_BLOCK_RECURSE;
    out.map = local_map;
    out.file = local_file;
    if (ret >= 0 && offset + out.pnum === total_size) ret |= BDRV_BLOCK_EOF;
    return ret;
  } finally {
    bdrv_dec_in_flight(bs);
  }
}

/**
 * RAW: the answer is the child's at `map`; as in QEMU 7.2 (its `out:` label), EOF is then
 * judged against the node that was asked, not the child.
 */
function* rawPassthrough(
  _bs: BlockDriverState,
  want_zero: boolean,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
  _ret: number,
  map: number,
  file: BlockDriverState | null,
  total: number,
): CoroutineFn<number> {
  if (!file) return -EIO;
  let r = yield* bdrv_co_block_status(file, want_zero, map, bytes, out);
  if (r >= 0 && offset + out.pnum === total) r |= BDRV_BLOCK_EOF;
  return r;
}

/**
 * Status through the backing chain from `bs` down to (not including) `base`. QEMU:
 * `bdrv_co_common_block_status_above` with want_zero (as `bdrv_block_status_above`): `base == bs`
 * is 0 with pnum = bytes (no query); layers that are not ALLOCATED defer to the next, which
 * answers (map and file its own) for at most the bytes the layers above deferred; a layer shorter
 * than the range reads as ZERO|ALLOCATED with file = that layer. EOF only where the top layer ends.
 */
export function* bdrv_co_block_status_above(
  bs: BlockDriverState,
  base: BlockDriverState | null,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
): CoroutineFn<number> {
  if (bs === base) {
    out.pnum = bytes;
    return 0;
  }
  let ret = yield* bdrv_co_block_status(bs, true, offset, bytes, out);
  if (ret < 0 || out.pnum === 0 || ret & BDRV_BLOCK_ALLOCATED) return ret;
  const eof = ret & BDRV_BLOCK_EOF ? offset + out.pnum : 0;
  bytes = out.pnum;
  for (let p = bs.backing?.bs ?? null; p !== base && p; p = p.backing?.bs ?? null) {
    ret = yield* bdrv_co_block_status(p, true, offset, bytes, out);
    if (ret < 0) return ret;
    if (out.pnum === 0) {
      // This layer ends before offset: synthesized zeroes count as allocated here.
      out.pnum = bytes;
      out.file = p;
      ret = BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
      break;
    }
    if (ret & BDRV_BLOCK_ALLOCATED) {
      ret &= ~BDRV_BLOCK_EOF;
      break;
    }
    bytes = out.pnum;
  }
  if (offset + out.pnum === eof) ret |= BDRV_BLOCK_EOF;
  return ret;
}

/**
 * Whether `[offset, offset + bytes)` is allocated in `bs` itself: 1 or 0 (or -errno), with
 * `out.pnum` the length with that answer (0 at or past EOF). QEMU: `bdrv_co_is_allocated`
 * (want_zero false).
 */
export function* bdrv_co_is_allocated(bs: BlockDriverState, offset: number, bytes: number, out: { pnum: number }): CoroutineFn<number> {
  const o: BlockStatusOut = { pnum: 0, map: 0, file: null };
  const ret = yield* bdrv_co_block_status(bs, false, offset, bytes, o);
  if (ret < 0) return ret;
  out.pnum = o.pnum;
  return ret & BDRV_BLOCK_ALLOCATED ? 1 : 0;
}
