/**
 * Constants and small types of QEMU 7.2's include/block/block-common.h and block_int-common.h:
 * request flags, block-status flags, open flags, limits and size constants.
 */

/** QEMU's `BDRV_SECTOR_BITS`. */
export const BDRV_SECTOR_BITS = 9;
/** QEMU's `BDRV_SECTOR_SIZE` (512): lengths are counted in these in 7.2. */
export const BDRV_SECTOR_SIZE = 512;
/** QEMU's `BDRV_REQUEST_MAX_BYTES`: INT_MAX rounded down to a sector (2147483136). */
export const BDRV_REQUEST_MAX_BYTES = 2147483136;
/** QEMU's `BDRV_MAX_ALIGNMENT` (1 GiB): larger `request_alignment` is refused. */
export const BDRV_MAX_ALIGNMENT = 1 << 30;
/**
 * QEMU's `BDRV_MAX_LENGTH` (INT64_MAX aligned down to 1 GiB). Surprise: JS numbers are exact only
 * to 2^53, so aioco uses Number.MAX_SAFE_INTEGER aligned down to 1 GiB instead.
 */
export const BDRV_MAX_LENGTH = Math.floor(Number.MAX_SAFE_INTEGER / BDRV_MAX_ALIGNMENT) * BDRV_MAX_ALIGNMENT;
/** QEMU's `MAX_BOUNCE_BUFFER` (16 MiB): largest zero buffer the zero-write fallback uses. */
export const MAX_BOUNCE_BUFFER = 32768 << BDRV_SECTOR_BITS;
/** C's INT_MAX, the cap of `max_transfer`. */
export const INT_MAX = 0x7fffffff;

// BdrvRequestFlags (7.2 values)
/** Read: copy unallocated data from the backing chain into this node. */
export const BDRV_REQ_COPY_ON_READ = 0x1;
/** Write zeroes; no buffer. */
export const BDRV_REQ_ZERO_WRITE = 0x2;
/** Zero-write may deallocate; passed on only if the node was opened with BDRV_O_UNMAP. */
export const BDRV_REQ_MAY_UNMAP = 0x4;
/** Buffer registered with bdrv_register_buf (7.2); cleared when bouncing. */
export const BDRV_REQ_REGISTERED_BUF = 0x8;
/** Force unit access; emulated by a flush when the driver lacks it. */
export const BDRV_REQ_FUA = 0x10;
/** Compressed write. */
export const BDRV_REQ_WRITE_COMPRESSED = 0x20;
/** Write that does not change visible content. */
export const BDRV_REQ_WRITE_UNCHANGED = 0x40;
/** Serialising write: waits for and blocks overlapping requests. */
export const BDRV_REQ_SERIALISING = 0x80;
/** Fail with -ENOTSUP instead of a slow emulation. */
export const BDRV_REQ_NO_FALLBACK = 0x100;
/** With COPY_ON_READ: only populate, do not fill the qiov. */
export const BDRV_REQ_PREFETCH = 0x200;
/** With SERIALISING: -EBUSY instead of waiting. */
export const BDRV_REQ_NO_WAIT = 0x400;
/** Every valid request flag. */
export const BDRV_REQ_MASK = 0x7ff;

// Block status (include/block/block-common.h)
/** Allocation for data at the offset is tied to this layer. */
export const BDRV_BLOCK_DATA = 0x01;
/** Reads as zero. */
export const BDRV_BLOCK_ZERO = 0x02;
/** `map` and `file` give the host location. */
export const BDRV_BLOCK_OFFSET_VALID = 0x04;
/** Internal: ask `file` at `map` (passthrough drivers). */
export const BDRV_BLOCK_RAW = 0x08;
/** Content determined by this layer (set by the block layer). */
export const BDRV_BLOCK_ALLOCATED = 0x10;
/** pnum reaches the end of this layer (set by the block layer). */
export const BDRV_BLOCK_EOF = 0x20;
/** Internal: with DATA|OFFSET_VALID, ask the protocol layer for zero information. */
export const BDRV_BLOCK_RECURSE = 0x40;

// Open flags (include/block/block-common.h)
export const BDRV_O_NO_SHARE = 0x0001;
/** Open read-write. */
export const BDRV_O_RDWR = 0x0002;
export const BDRV_O_RESIZE = 0x0004;
/** Snapshot mode. */
export const BDRV_O_SNAPSHOT = 0x0008;
export const BDRV_O_TEMPORARY = 0x0010;
/** cache.direct=on (O_DIRECT). */
export const BDRV_O_NOCACHE = 0x0020;
export const BDRV_O_NATIVE_AIO = 0x0080;
/** Do not open the backing file. */
export const BDRV_O_NO_BACKING = 0x0100;
/** cache.no-flush=on (cache=unsafe): flushes never reach the disk. */
export const BDRV_O_NO_FLUSH = 0x0200;
export const BDRV_O_COPY_ON_READ = 0x0400;
export const BDRV_O_INACTIVE = 0x0800;
export const BDRV_O_CHECK = 0x1000;
export const BDRV_O_ALLOW_RDWR = 0x2000;
/** discard=unmap: discards and MAY_UNMAP reach the driver. */
export const BDRV_O_UNMAP = 0x4000;
/** Open the protocol layer only (no format probing). */
export const BDRV_O_PROTOCOL = 0x8000;
export const BDRV_O_NO_IO = 0x10000;
export const BDRV_O_AUTO_RDONLY = 0x20000;
export const BDRV_O_IO_URING = 0x40000;
/** cache.direct | cache.no-flush bits. */
export const BDRV_O_CACHE_MASK = BDRV_O_NOCACHE | BDRV_O_NO_FLUSH;

/** QEMU's `BlockLimits` (`bs->bl`); every field 0 means "no limit / default". */
export interface BlockLimits {
  request_alignment: number;
  max_pdiscard: number;
  pdiscard_alignment: number;
  max_pwrite_zeroes: number;
  pwrite_zeroes_alignment: number;
  opt_transfer: number;
  max_transfer: number;
  max_hw_transfer: number;
  max_hw_iov: number;
  min_mem_alignment: number;
  opt_mem_alignment: number;
  max_iov: number;
}

/** A zeroed BlockLimits (C's memset). */
export function block_limits_zero(): BlockLimits {
  return {
    request_alignment: 0,
    max_pdiscard: 0,
    pdiscard_alignment: 0,
    max_pwrite_zeroes: 0,
    pwrite_zeroes_alignment: 0,
    opt_transfer: 0,
    max_transfer: 0,
    max_hw_transfer: 0,
    max_hw_iov: 0,
    min_mem_alignment: 0,
    opt_mem_alignment: 0,
    max_iov: 0,
  };
}

/** QEMU's `PreallocMode`. */
export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';

/** QEMU's MIN_NON_ZERO. @internal */
export function MIN_NON_ZERO(a: number, b: number): number {
  return a === 0 ? b : b === 0 ? a : Math.min(a, b);
}
/** QEMU's QEMU_ALIGN_DOWN. @internal */
export function ALIGN_DOWN(n: number, m: number): number {
  return n - (n % m);
}
/** QEMU's QEMU_ALIGN_UP / ROUND_UP. @internal */
export function ALIGN_UP(n: number, m: number): number {
  const r = n % m;
  return r === 0 ? n : n + (m - r);
}

/** `bdrv_co_check` mode: repair leaked clusters. QEMU: `BDRV_FIX_LEAKS`. */
export const BDRV_FIX_LEAKS = 1;
/** `bdrv_co_check` mode: repair refcount errors (corruptions). QEMU: `BDRV_FIX_ERRORS`. */
export const BDRV_FIX_ERRORS = 2;
