/**
 * Image consistency checks. QEMU: `bdrv_co_check` / `bdrv_check` (block.c), used by
 * `qemu-img check` and by drivers that repair an image when it is opened.
 */
import { ENOMEDIUM, ENOTSUP } from '../aio/errno.ts';
import type { CoroutineFn } from '../coroutine/coroutine.ts';
import type { BdrvCheckResult } from './block-driver.ts';
import type { BlockDriverState } from './block-driver-state.ts';
import { bdrv_poll_co } from './co-wrapper.ts';

/** A zeroed BdrvCheckResult. */
export function bdrv_check_result_new(): BdrvCheckResult {
  return {
    corruptions: 0,
    leaks: 0,
    check_errors: 0,
    corruptions_fixed: 0,
    leaks_fixed: 0,
    image_end_offset: 0,
    bfi: { total_clusters: 0, allocated_clusters: 0, fragmented_clusters: 0, compressed_clusters: 0 },
  };
}

/**
 * Checks `bs` with its driver's `bdrv_co_check`, repairing what `fix` (BDRV_FIX_LEAKS |
 * BDRV_FIX_ERRORS) allows. QEMU: `bdrv_co_check`. `res` is zeroed before the driver runs.
 * Returns 0, -ENOMEDIUM, -ENOTSUP (the format has no check: qemu-img's exit code 63) or the
 * driver's -errno. Surprise: with -ENOMEDIUM and -ENOTSUP `res` is left as it was.
 */
export function* bdrv_co_check(bs: BlockDriverState, res: BdrvCheckResult, fix: number): CoroutineFn<number> {
  if (!bs.drv) return -ENOMEDIUM;
  if (!bs.drv.bdrv_co_check) return -ENOTSUP;
  // In place, as QEMU's memset: a caller holding `res.bfi` sees it zeroed too.
  const zero = bdrv_check_result_new();
  Object.assign(res.bfi, zero.bfi);
  Object.assign(res, { ...zero, bfi: res.bfi });
  return yield* bs.drv.bdrv_co_check(bs, res, fix);
}

/** Synchronous `bdrv_co_check`, driving the node's context. QEMU: `bdrv_check`. */
export function bdrv_check(bs: BlockDriverState, res: BdrvCheckResult, fix: number): number {
  return bdrv_poll_co(bs, 'bdrv_check', () => bdrv_co_check(bs, res, fix));
}
