/**
 * Buffers for a block device's I/O. QEMU: `qemu_blockalign` (block/io.c).
 */
import { qemu_memalign } from '../aio/guest-memory.ts';

/** What `qemu_blockalign` reads of a BlockDriverState: its optimal memory alignment. */
export interface BlockAlignSource {
  bl?: { opt_mem_alignment?: number };
}

/**
 * Allocates `size` bytes aligned for I/O on `bs` (its `opt_mem_alignment`, 4096 without a
 * node), backed by a SharedArrayBuffer so workers use it in place. QEMU: `qemu_blockalign`.
 * Release with `qemu_vfree`. Surprise: not zeroed; `byteOffset` need not be a multiple
 * of the alignment (it is the real address that is aligned).
 */
export function qemu_blockalign(bs: BlockAlignSource | null, size: number): Uint8Array {
  return qemu_memalign(Math.max(bs?.bl?.opt_mem_alignment ?? 4096, 512), size);
}
