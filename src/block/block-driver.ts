/**
 * `BlockDriver`: the callbacks a driver implements, with QEMU 7.2's names and argument orders
 * (include/block/block_int-common.h), and the driver registry of block.c
 * (`bdrv_register`, `bdrv_find_format`, `bdrv_find_protocol`).
 */
import type { BlockAIOCB, BlockCompletionFunc } from '../aio/aiocb.ts';
import { QemuError } from '../aio/error.ts';
import type { CoroutineFn } from '../coroutine/coroutine.ts';
import type { BlockDriverState } from './block-driver-state.ts';
import type { PreallocMode } from './block-common.ts';
import type { QemuOpts, QemuOptsList } from './qemu-opts.ts';
import type { QEMUIOVector } from './qiov.ts';

/** Out-object of `bdrv_co_block_status` (C's `*pnum`, `*map`, `**file`). */
export interface BlockStatusOut {
  pnum: number;
  map: number;
  file: BlockDriverState | null;
}

export type { QemuOptDesc } from './qemu-opts.ts';

/** The counters of `bdrv_co_check` (QEMU: `BdrvCheckResult` with its `BlockFragInfo`). */
export interface BdrvCheckResult {
  corruptions: number;
  leaks: number;
  check_errors: number;
  corruptions_fixed: number;
  leaks_fixed: number;
  image_end_offset: number;
  bfi: { total_clusters: number; allocated_clusters: number; fragmented_clusters: number; compressed_clusters: number };
}

/** What `bdrv_get_info` reports (QEMU 7.2: `BlockDriverInfo`). */
export interface BlockDriverInfo {
  cluster_size: number;
  vm_state_offset: number;
  is_dirty: boolean;
  needs_compressed_writes: boolean;
}

/**
 * A driver's format-specific information (QEMU: the `ImageInfoSpecific` QAPI union). `data` uses
 * QAPI member names (`refcount-bits`); its key order is the order qemu-img prints.
 */
export interface ImageInfoSpecific {
  type: string;
  data: Record<string, unknown>;
}

/** One internal snapshot as `bdrv_snapshot_list` reports it (QEMU: `QEMUSnapshotInfo`). */
export interface QEMUSnapshotInfo {
  id_str: string;
  name: string;
  vm_state_size: number;
  date_sec: number;
  date_nsec: number;
  vm_clock_nsec: number;
  /** -1 when the snapshot records no instruction count. */
  icount: number;
}

/**
 * QEMU's `struct BlockDriver`. Plain callbacks (`bdrv_open`, `bdrv_file_open`, `bdrv_close`,
 * `bdrv_getlength`, `bdrv_refresh_limits`, `bdrv_probe`, `bdrv_parse_filename`) run synchronously and
 * throw QemuError where QEMU sets `errp`; every `bdrv_co_*` returns a CoroutineFn (0 or -errno);
 * `bdrv_aio_*` return a BlockAIOCB or null (null: failed synchronously, the block layer uses -EIO).
 */
export interface BlockDriver {
  format_name: string;
  protocol_name?: string;
  is_filter?: boolean;
  /** A filter whose filtered (primary) child is `backing`, not `file` (QEMU: commit/mirror top). */
  filtered_child_is_backing?: boolean;
  is_format?: boolean;
  supports_backing?: boolean;
  has_variable_length?: boolean;
  bdrv_needs_filename?: boolean;
  /** Creation options (QEMU: `create_opts`); qemu-img merges the format's and the protocol's. */
  create_opts?: QemuOptsList;
  /**
   * Option names the driver accepts (QEMU: its QemuOptsList `runtime_opts`). Options left in the
   * dictionary after open are refused with "Block protocol/format 'x' doesn't support the option 'y'".
   * Without it, `bdrv_open`/`bdrv_file_open` must delete every option they consume.
   */
  runtime_opts?: string[];

  /** Score (0-100) that `buf` (the image's first bytes) is in this format. */
  bdrv_probe?(buf: Uint8Array, buf_size: number, filename: string | null): number;
  /** Turns a filename into options (e.g. strips `prefix:`); may throw QemuError. */
  bdrv_parse_filename?(filename: string, options: Record<string, unknown>): void;
  /** Opens a format or filter node (children opened with `bdrv_open_child`). Throws QemuError. */
  bdrv_open?(bs: BlockDriverState, options: Record<string, unknown>, flags: number): void;
  /** Opens a protocol node. Throws QemuError. */
  bdrv_file_open?(bs: BlockDriverState, options: Record<string, unknown>, flags: number): void;
  bdrv_close?(bs: BlockDriverState): void;
  /** Length in bytes or -errno; the block layer rounds it up to 512 (7.2). */
  bdrv_getlength?(bs: BlockDriverState): number;
  /** Adjusts `bs.bl` after the defaults were set; may throw QemuError. */
  bdrv_refresh_limits?(bs: BlockDriverState): void;
  bdrv_attach_aio_context?(bs: BlockDriverState, new_context: import('../aio/aio-context.ts').AioContext): void;
  bdrv_detach_aio_context?(bs: BlockDriverState): void;

  bdrv_co_preadv?(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number>;
  bdrv_co_preadv_part?(
    bs: BlockDriverState,
    offset: number,
    bytes: number,
    qiov: QEMUIOVector,
    qiov_offset: number,
    flags: number,
  ): CoroutineFn<number>;
  bdrv_co_pwritev?(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, flags: number): CoroutineFn<number>;
  bdrv_co_pwritev_part?(
    bs: BlockDriverState,
    offset: number,
    bytes: number,
    qiov: QEMUIOVector,
    qiov_offset: number,
    flags: number,
  ): CoroutineFn<number>;
  bdrv_co_pwrite_zeroes?(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number>;
  bdrv_co_pdiscard?(bs: BlockDriverState, offset: number, bytes: number): CoroutineFn<number>;
  bdrv_co_flush?(bs: BlockDriverState): CoroutineFn<number>;
  bdrv_co_flush_to_disk?(bs: BlockDriverState): CoroutineFn<number>;
  bdrv_co_flush_to_os?(bs: BlockDriverState): CoroutineFn<number>;
  bdrv_co_block_status?(
    bs: BlockDriverState,
    want_zero: boolean,
    offset: number,
    bytes: number,
    out: BlockStatusOut,
  ): CoroutineFn<number>;
  /** May throw QemuError (QEMU's errp) or return -errno. */
  bdrv_co_truncate?(
    bs: BlockDriverState,
    offset: number,
    exact: boolean,
    prealloc: PreallocMode,
    flags: number,
  ): CoroutineFn<number>;
  bdrv_co_drain_begin?(bs: BlockDriverState): CoroutineFn<void>;
  bdrv_co_drain_end?(bs: BlockDriverState): CoroutineFn<void>;

  bdrv_aio_preadv?(
    bs: BlockDriverState,
    offset: number,
    bytes: number,
    qiov: QEMUIOVector,
    flags: number,
    cb: BlockCompletionFunc,
    opaque: unknown,
  ): BlockAIOCB | null;
  bdrv_aio_pwritev?(
    bs: BlockDriverState,
    offset: number,
    bytes: number,
    qiov: QEMUIOVector,
    flags: number,
    cb: BlockCompletionFunc,
    opaque: unknown,
  ): BlockAIOCB | null;
  bdrv_aio_flush?(bs: BlockDriverState, cb: BlockCompletionFunc, opaque: unknown): BlockAIOCB | null;
  bdrv_aio_pdiscard?(bs: BlockDriverState, offset: number, bytes: number, cb: BlockCompletionFunc, opaque: unknown): BlockAIOCB | null;

  /**
   * Creates an image (QEMU: `bdrv_co_create_opts(drv, filename, opts, errp)`). Consumes the
   * options it knows with `qemu_opt_get_*_del`; throws QemuError or returns -errno.
   */
  bdrv_co_create_opts?(drv: BlockDriver, filename: string, opts: QemuOpts): CoroutineFn<number>;
  /** Checks (and with `fix`, repairs) the image. QEMU: `bdrv_co_check`. 0 or -errno. */
  bdrv_co_check?(bs: BlockDriverState, result: BdrvCheckResult, fix: number): CoroutineFn<number>;
  /** Fills `bdi`. QEMU 7.2: `bdrv_get_info` (not a coroutine in 7.2). 0 or -errno. */
  bdrv_get_info?(bs: BlockDriverState, bdi: BlockDriverInfo): number;
  /** Format-specific information, or null. QEMU: `bdrv_get_specific_info`; may throw QemuError. */
  bdrv_get_specific_info?(bs: BlockDriverState): ImageInfoSpecific | null;
  /** Bytes the node occupies on the host, or -errno. QEMU 7.2: `bdrv_get_allocated_file_size`. */
  bdrv_get_allocated_file_size?(bs: BlockDriverState): number;
  /** The internal snapshots, or -errno. QEMU: `bdrv_snapshot_list` (qemu-img info's snapshot table). */
  bdrv_snapshot_list?(bs: BlockDriverState): QEMUSnapshotInfo[] | number;
  /** Compressed write of whole clusters. QEMU: `bdrv_co_pwritev_compressed_part`. */
  bdrv_co_pwritev_compressed_part?(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, qiov_offset: number): CoroutineFn<number>;
  bdrv_co_pwritev_compressed?(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector): CoroutineFn<number>;
  /** Writes a new backing file name/format into the image header. QEMU: `bdrv_change_backing_file`. */
  bdrv_change_backing_file?(bs: BlockDriverState, backing_file: string | null, backing_fmt: string | null): number;
  /** Makes the image empty (all clusters unallocated). QEMU: `bdrv_make_empty`. */
  bdrv_make_empty?(bs: BlockDriverState): CoroutineFn<number>;

  /**
   * blkdebug's hook for an event announced on this node (`event` is a BlkdebugEvent name such
   * as 'pwritev_rmw_head'). A coroutine_fn so that it can suspend the request (a `suspend` rule):
   * QEMU 7.2's `bdrv_debug_event` hook yields from a plain function, which a generator cannot,
   * so aioco uses the shape QEMU 8.1 gave it (`bdrv_co_debug_event`). It yields only to suspend.
   */
  bdrv_co_debug_event?(bs: BlockDriverState, event: string): CoroutineFn<void>;
  /** Adds a `suspend` rule for `event` tagged `tag`: 0, or -ENOENT for an unknown event. */
  bdrv_debug_breakpoint?(bs: BlockDriverState, event: string, tag: string): number;
  /** Removes the `suspend` rules tagged `tag` and resumes the requests suspended with it. 0 or -errno. */
  bdrv_debug_remove_breakpoint?(bs: BlockDriverState, tag: string): number;
  /** Resumes one request suspended with `tag`: 0, or -ENOENT when there is none. */
  bdrv_debug_resume?(bs: BlockDriverState, tag: string): number;
  /** Whether a request suspended with `tag` is waiting. */
  bdrv_debug_is_suspended?(bs: BlockDriverState, tag: string): boolean;
}

const drivers: BlockDriver[] = [];

/**
 * Adds `drv` to the registry. QEMU: `bdrv_register`. Surprise: registering a second driver with the
 * same format name throws (QEMU would silently list both and find the first).
 */
export function bdrv_register(drv: BlockDriver): void {
  if (drivers.some((d) => d.format_name === drv.format_name)) {
    throw new QemuError(`bdrv_register: a driver named '${drv.format_name}' is already registered`);
  }
  drivers.push(drv);
}

/** Removes `drv` (aioco's own, for tests). Returns whether it was registered. */
export function bdrv_unregister(drv: BlockDriver): boolean {
  const i = drivers.indexOf(drv);
  if (i < 0) return false;
  drivers.splice(i, 1);
  return true;
}

/** The driver whose `format_name` is `format_name`, or null. QEMU: `bdrv_find_format`. */
export function bdrv_find_format(format_name: string): BlockDriver | null {
  return drivers.find((d) => d.format_name === format_name) ?? null;
}

/** Every registered driver, in registration order (QEMU iterates `bdrv_drivers`). */
export function bdrv_drivers(): readonly BlockDriver[] {
  return drivers;
}

/** Whether `filename` starts with a `prefix:` (no `/` before the colon). QEMU: `path_has_protocol`. */
export function path_has_protocol(filename: string): boolean {
  const colon = filename.indexOf(':');
  if (colon < 0) return false;
  const slash = filename.indexOf('/');
  return slash < 0 || colon < slash;
}

/**
 * The protocol driver for `filename`. QEMU: `bdrv_find_protocol(filename, allow_protocol_prefix)`.
 * A filename without `prefix:` (or with prefixes disallowed) is a host file: the `file` driver.
 * Throws QemuError "Unknown protocol 'x'" for an unregistered prefix. Returns null when no `file`
 * driver is registered for a plain filename.
 */
export function bdrv_find_protocol(filename: string, allow_protocol_prefix = true): BlockDriver | null {
  if (!path_has_protocol(filename) || !allow_protocol_prefix) {
    return drivers.find((d) => d.protocol_name === 'file') ?? null;
  }
  const prefix = filename.slice(0, filename.indexOf(':'));
  const drv = drivers.find((d) => d.protocol_name === prefix);
  if (drv) return drv;
  throw new QemuError(`Unknown protocol '${prefix}'`);
}
