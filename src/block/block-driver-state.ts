/**
 * `BlockDriverState` and `BdrvChild`, opening and closing nodes the way block.c does
 * (`bdrv_open`, `bdrv_open_child`, `bdrv_unref`), lengths (`bdrv_getlength`) and limits
 * (`bdrv_refresh_limits`). QEMU: block.c, block/io.c (limits), include/block/block_int-common.h.
 */
import { bdrv_extract_backing_options, bdrv_open_backing_file } from './backing.ts';
import type { AioContext } from '../aio/aio-context.ts';
import { qemu_get_aio_context } from '../aio/aio-context.ts';
import { AIO_WAIT_WHILE } from '../aio/aio-wait.ts';
import { EINVAL, ENOMEDIUM } from '../aio/errno.ts';
import { QemuError } from '../aio/error.ts';
import { aio_co_enter } from '../aio/co-schedule.ts';
import { qemu_coroutine_create, qemu_in_coroutine } from '../coroutine/coroutine.ts';
import { CoQueue } from '../coroutine/co-queue.ts';
import { IOV_MAX, qemu_iovec_init_buf, QEMUIOVector } from './qiov.ts';
import type { BlockDriver } from './block-driver.ts';
import { bdrv_find_format, bdrv_find_protocol, bdrv_drivers, path_has_protocol } from './block-driver.ts';
import {
  BDRV_MAX_ALIGNMENT,
  BDRV_O_NO_BACKING,
  BDRV_O_NO_FLUSH,
  BDRV_O_NOCACHE,
  BDRV_O_PROTOCOL,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_SECTOR_SIZE,
  block_limits_zero,
  MIN_NON_ZERO,
  type BlockLimits,
} from './block-common.ts';
import { BdrvTrackedRequestList } from './tracked-request.ts';
import { bdrv_co_preadv } from './io.ts';
import {
  bdrv_do_drained_begin_quiesce,
  bdrv_do_drained_end_no_poll,
  bdrv_drain_all_end_quiesce,
  bdrv_drain_all_new_node,
  bdrv_drain_poll,
} from './drain.ts';

/** Roles of a child (QEMU's BdrvChildRole bits). */
export const BDRV_CHILD_DATA = 1 << 0;
export const BDRV_CHILD_METADATA = 1 << 1;
export const BDRV_CHILD_FILTERED = 1 << 2;
export const BDRV_CHILD_COW = 1 << 3;
export const BDRV_CHILD_PRIMARY = 1 << 4;
/** Role of a format's `file` child: data, metadata, and the primary child (so it becomes `bs.file`). */
export const BDRV_CHILD_IMAGE = BDRV_CHILD_DATA | BDRV_CHILD_METADATA | BDRV_CHILD_PRIMARY;

/**
 * Callbacks a child's parent gives the block layer (QEMU's `BdrvChildClass`, the drain part).
 * A BlockBackend's root child and a BDS's children use them to quiesce parents during a drain.
 */
export interface BdrvChildClass {
  drained_begin?(c: BdrvChild): void;
  drained_end?(c: BdrvChild): void;
  /** True while the parent still has activity a drain must wait for. */
  drained_poll?(c: BdrvChild): boolean;
  /** Called when the child node moves to `ctx` (a BlockBackend follows its root). */
  set_aio_ctx?(c: BdrvChild, ctx: AioContext): void;
}

/** QEMU's `BdrvChild`: an edge from a parent (a BDS or a BlockBackend) to `bs`. */
export class BdrvChild {
  constructor(
    public bs: BlockDriverState,
    public name: string,
    public role: number,
    /** The parent: a BlockDriverState or a BlockBackend. */
    public opaque: unknown,
    public klass: BdrvChildClass,
  ) {}
  /** @internal whether this edge currently holds a drained section of the parent. */
  quiesced_parent = false;
}

let nodeCounter = 0;
const all_bdrv_states = new Set<BlockDriverState>();
const named_nodes = new Map<string, BlockDriverState>();

/**
 * QEMU's `BlockDriverState`: one node of the graph. `opaque` is the driver's state (C's
 * `bs->opaque`, `instance_size` bytes); children are `file`, `backing` and `children`.
 */
export class BlockDriverState {
  drv: BlockDriver | null = null;
  /** The driver's per-node state. */
  opaque: any = null;
  file: BdrvChild | null = null;
  backing: BdrvChild | null = null;
  /** Every child, in attach order. */
  children: BdrvChild[] = [];
  /** Edges whose `bs` is this node. */
  parents: BdrvChild[] = [];
  bl: BlockLimits = block_limits_zero();
  supported_read_flags = 0;
  supported_write_flags = 0;
  supported_zero_flags = 0;
  supported_truncate_flags = 0;
  open_flags = 0;
  read_only = true;
  /** Length in 512-byte sectors (7.2 rounds byte lengths up). */
  total_sectors = 0;
  in_flight = 0;
  quiesce_counter = 0;
  /** @internal */ tracked_requests = new BdrvTrackedRequestList();
  serialising_in_flight = 0;
  write_gen = 0;
  flushed_gen = 0;
  /** @internal a flush is running; others wait on flush_queue. */ active_flush_req = false;
  /** @internal */ flush_queue = new CoQueue();
  aio_context: AioContext;
  /** Options the node was opened with (flattened, dotted keys). */
  options: Record<string, unknown> = {};
  filename = '';
  node_name = '';
  refcnt = 1;
  /** True when the format was chosen by probing. */
  probed = false;
  /** Number of copy-on-read users (always 0 in aioco for now). */
  copy_on_read = 0;
  /** Highest offset written (QEMU's wr_highest_offset). */
  wr_highest_offset = 0;
  /** The backing file name as the image stores it (QEMU: `bs->backing_file`), '' if none. */
  backing_file = '';
  /** The backing format the image stores (QEMU: `bs->backing_format`), '' if none. */
  backing_format = '';
  /** Block-status cache: last DATA region of a protocol node [offset, end). @internal */
  bsc: { offset: number; end: number } | null = null;

  constructor() {
    this.aio_context = qemu_get_aio_context();
  }
}

/**
 * Block-status cache (protocol nodes): whether `offset` lies in the cached DATA region; if so sets
 * `out.pnum` to the bytes from `offset` to the region's end. QEMU: `bdrv_bsc_is_data`.
 */
export function bdrv_bsc_is_data(bs: BlockDriverState, offset: number, out: { pnum: number }): boolean {
  const c = bs.bsc;
  if (!c || offset < c.offset || offset >= c.end) return false;
  out.pnum = c.end - offset;
  return true;
}

/** Caches `[offset, offset + bytes)` as the node's DATA region. QEMU: `bdrv_bsc_fill`. */
export function bdrv_bsc_fill(bs: BlockDriverState, offset: number, bytes: number): void {
  bs.bsc = { offset, end: offset + bytes };
}

/** Drops the cached region if it overlaps `[offset, offset + bytes)`. QEMU: `bdrv_bsc_invalidate_range`. */
export function bdrv_bsc_invalidate_range(bs: BlockDriverState, offset: number, bytes: number): void {
  const c = bs.bsc;
  if (c && offset <= c.end - 1 && c.offset <= offset + bytes - 1) bs.bsc = null;
}

/** The node named `node_name`, or null. QEMU: `bdrv_find_node`. */
export function bdrv_find_node(node_name: string): BlockDriverState | null {
  return named_nodes.get(node_name) ?? null;
}

/** The context `bs` runs in. QEMU: `bdrv_get_aio_context`. */
export function bdrv_get_aio_context(bs: BlockDriverState): AioContext {
  return bs.aio_context;
}

/** Whether `bs` is read-only. QEMU: `bdrv_is_read_only`. */
export function bdrv_is_read_only(bs: BlockDriverState): boolean {
  return bs.read_only;
}

/** Whether a medium is present (a driver is attached). QEMU: `bdrv_is_inserted` (simplified). */
export function bdrv_is_inserted(bs: BlockDriverState): boolean {
  return bs.drv !== null;
}

/** Takes a reference. QEMU: `bdrv_ref`. */
export function bdrv_ref(bs: BlockDriverState): void {
  bs.refcnt++;
}

/**
 * Drops a reference; the last one closes the node: drains it, calls the driver's `bdrv_close`,
 * detaches and unrefs its children. QEMU: `bdrv_unref` / `bdrv_close`.
 */
export function bdrv_unref(bs: BlockDriverState | null): void {
  if (!bs) return;
  if (bs.refcnt <= 0) throw new QemuError("bdrv_unref: Assertion 'bs->refcnt > 0' failed");
  if (--bs.refcnt > 0) return;
  if (!qemu_in_coroutine()) AIO_WAIT_WHILE(bs.aio_context, () => bs.in_flight > 0);
  if (bs.drv?.bdrv_close) bs.drv.bdrv_close(bs);
  for (const c of [...bs.children]) bdrv_unref_child(bs, c);
  bs.drv = null;
  bs.opaque = null;
  all_bdrv_states.delete(bs);
  bdrv_drain_all_end_quiesce(bs);
  if (named_nodes.get(bs.node_name) === bs) named_nodes.delete(bs.node_name);
}

function attach_assert(cond: boolean, what: string): void {
  if (!cond) throw new QemuError(`bdrv_child_cb_attach: Assertion '${what}' failed`);
}

/** Which of `file`/`backing` a new child with `role` fills, checked before anything changes. */
function bdrv_child_slot(parent: BlockDriverState, role: number): 'file' | 'backing' | null {
  const drv = parent.drv;
  if (drv?.is_filter || role & BDRV_CHILD_FILTERED) {
    // Filters (and raw acting as one) have one PRIMARY child, which is also the FILTERED one.
    attach_assert(!(role & BDRV_CHILD_COW), '!(child->role & BDRV_CHILD_COW)');
    if (!(role & BDRV_CHILD_PRIMARY)) {
      attach_assert(!(role & BDRV_CHILD_FILTERED), '!(child->role & BDRV_CHILD_FILTERED)');
      return null;
    }
    attach_assert((role & BDRV_CHILD_FILTERED) !== 0, 'child->role & BDRV_CHILD_FILTERED');
    attach_assert(parent.backing === null, '!bs->backing');
    attach_assert(parent.file === null, '!bs->file');
    return drv?.filtered_child_is_backing ? 'backing' : 'file';
  }
  if (role & BDRV_CHILD_COW) {
    attach_assert(drv?.supports_backing === true, 'bs->drv->supports_backing');
    attach_assert(!(role & BDRV_CHILD_PRIMARY), '!(child->role & BDRV_CHILD_PRIMARY)');
    attach_assert(parent.backing === null, '!bs->backing');
    return 'backing';
  }
  if (role & BDRV_CHILD_PRIMARY) {
    attach_assert(parent.file === null, '!bs->file');
    return 'file';
  }
  return null;
}

/**
 * Attaches `child_bs` to `parent` as child `name` (taking over the caller's reference).
 * QEMU: `bdrv_attach_child` with `bdrv_child_cb_attach`'s rule for `file` and `backing`: the
 * role decides, not the name. A PRIMARY child becomes `parent.file` (blkdebug's `image` too),
 * or `parent.backing` for a filter with `filtered_child_is_backing`; a COW child becomes
 * `parent.backing`. Surprise: a child named 'file' without the PRIMARY role is not `parent.file`.
 * Throws QemuError "bdrv_child_cb_attach: Assertion '...' failed" where QEMU asserts (a second
 * primary child, a COW child of a filter or of a format without `supports_backing`...).
 */
export function bdrv_attach_child(parent: BlockDriverState, child_bs: BlockDriverState, name: string, role: number): BdrvChild {
  let slot: 'file' | 'backing' | null;
  try {
    slot = bdrv_child_slot(parent, role);
  } catch (e) {
    // As on QEMU's failure path: the reference handed over is dropped.
    bdrv_unref(child_bs);
    throw e;
  }
  const c = new BdrvChild(child_bs, name, role, parent, bdsChildClass);
  parent.children.push(c);
  child_bs.parents.push(c);
  if (slot === 'file') parent.file = c;
  else if (slot === 'backing') parent.backing = c;
  // A drained child keeps its new parent quiesced too (QEMU: bdrv_replace_child_noperm).
  if (child_bs.quiesce_counter > 0) {
    c.quiesced_parent = true;
    c.klass.drained_begin?.(c);
  }
  return c;
}

/** Detaches child `c` from `parent` and drops its reference. QEMU: `bdrv_unref_child`. */
export function bdrv_unref_child(parent: BlockDriverState, c: BdrvChild): void {
  parent.children = parent.children.filter((x) => x !== c);
  c.bs.parents = c.bs.parents.filter((x) => x !== c);
  if (c.quiesced_parent) {
    c.quiesced_parent = false;
    c.klass.drained_end?.(c);
  }
  if (parent.file === c) parent.file = null;
  if (parent.backing === c) parent.backing = null;
  bdrv_unref(c.bs);
}

/** Child class for BDS parents: quiescing a child quiesces the parent node (7.2 drain). */
const bdsChildClass: BdrvChildClass = {
  drained_begin(c) {
    bdrv_do_drained_begin_quiesce(c.opaque as BlockDriverState);
  },
  drained_end(c) {
    bdrv_do_drained_end_no_poll(c.opaque as BlockDriverState);
  },
  drained_poll(c) {
    return bdrv_drain_poll(c.opaque as BlockDriverState);
  },
};


/**
 * Re-reads the length from the driver: `total_sectors = ceil(len / 512)`. QEMU:
 * `refresh_total_sectors`. Returns 0 or -errno.
 */
export function refresh_total_sectors(bs: BlockDriverState, hint: number): number {
  const drv = bs.drv;
  if (!drv) return -ENOMEDIUM;
  if (!drv.bdrv_getlength) {
    bs.total_sectors = hint;
    return 0;
  }
  const len = drv.bdrv_getlength(bs);
  if (len < 0) return len;
  bs.total_sectors = Math.ceil(len / BDRV_SECTOR_SIZE);
  return 0;
}

/**
 * Length of `bs` in bytes, or -errno. QEMU 7.2: `bdrv_getlength` = `bdrv_nb_sectors * 512`.
 * Surprise: sector-granular: a 1000-byte file is 1024 bytes long; drivers with
 * `has_variable_length` are re-asked each time.
 */
export function bdrv_getlength(bs: BlockDriverState): number {
  if (!bs.drv) return -ENOMEDIUM;
  if (bs.drv.has_variable_length) {
    const ret = refresh_total_sectors(bs, bs.total_sectors);
    if (ret < 0) return ret;
  }
  return bs.total_sectors * BDRV_SECTOR_SIZE;
}

function bdrv_merge_limits(dst: BlockLimits, src: BlockLimits): void {
  dst.pdiscard_alignment = Math.max(dst.pdiscard_alignment, src.pdiscard_alignment);
  dst.opt_transfer = Math.max(dst.opt_transfer, src.opt_transfer);
  dst.max_transfer = MIN_NON_ZERO(dst.max_transfer, src.max_transfer);
  dst.max_hw_transfer = MIN_NON_ZERO(dst.max_hw_transfer, src.max_hw_transfer);
  dst.opt_mem_alignment = Math.max(dst.opt_mem_alignment, src.opt_mem_alignment);
  dst.min_mem_alignment = Math.max(dst.min_mem_alignment, src.min_mem_alignment);
  dst.max_iov = MIN_NON_ZERO(dst.max_iov, src.max_iov);
  dst.max_hw_iov = MIN_NON_ZERO(dst.max_hw_iov, src.max_hw_iov);
}

/**
 * Recomputes `bs.bl`. QEMU: `bdrv_refresh_limits`. Resets the limits; `request_alignment` is 1 for
 * drivers with byte-based reads (`bdrv_co_preadv[_part]`, `bdrv_aio_preadv`), else 512; merges
 * transfer/memory limits of DATA/FILTERED/COW children (refreshed first); without such children
 * min_mem_alignment 512, opt_mem_alignment 4096, max_iov IOV_MAX; then the driver's hook.
 * Surprise: `request_alignment` is not inherited from children. Throws QemuError
 * "Driver requires too large request alignment".
 */
export function bdrv_refresh_limits(bs: BlockDriverState): void {
  const drv = bs.drv;
  bs.bl = block_limits_zero();
  if (!drv) return;
  bs.bl.request_alignment = drv.bdrv_co_preadv || drv.bdrv_co_preadv_part || drv.bdrv_aio_preadv ? 1 : 512;
  let have_limits = false;
  for (const c of bs.children) {
    if (c.role & (BDRV_CHILD_DATA | BDRV_CHILD_FILTERED | BDRV_CHILD_COW)) {
      bdrv_refresh_limits(c.bs);
      bdrv_merge_limits(bs.bl, c.bs.bl);
      have_limits = true;
    }
  }
  if (!have_limits) {
    bs.bl.min_mem_alignment = 512;
    bs.bl.opt_mem_alignment = 4096;
    bs.bl.max_iov = IOV_MAX;
  }
  drv.bdrv_refresh_limits?.(bs);
  if (bs.bl.request_alignment > BDRV_MAX_ALIGNMENT) {
    throw new QemuError('Driver requires too large request alignment');
  }
}

/** Flattens nested objects into dotted keys (QEMU: `qdict_flatten`). @internal */
export function qdict_flatten(options: Record<string, unknown>, prefix = '', out: Record<string, unknown> = {}): Record<string, unknown> {
  for (const [k, v] of Object.entries(options)) {
    const key = prefix + k;
    if (v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof BlockDriverState)) {
      qdict_flatten(v as Record<string, unknown>, key + '.', out);
    } else {
      out[key] = v;
    }
  }
  return out;
}

/** Removes and returns the `prefix.` sub-options of `options` (QEMU: `qdict_extract_subqdict`). @internal */
export function qdict_extract_subqdict(options: Record<string, unknown>, prefix: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const k of Object.keys(options)) {
    if (k.startsWith(prefix)) {
      out[k.slice(prefix.length)] = options[k];
      delete options[k];
    }
  }
  return out;
}

function optString(options: Record<string, unknown>, key: string): string | undefined {
  const v = options[key];
  if (v === undefined || v === null) return undefined;
  return String(v);
}

function optBool(v: unknown, name: string): boolean {
  if (v === true || v === 'on' || v === 'true') return true;
  if (v === false || v === 'off' || v === 'false') return false;
  throw new QemuError(`Parameter '${name}' expects 'on' or 'off'`);
}

/** Applies the generic options (read-only, cache.*, discard, node-name) to flags. */
function update_flags_from_options(options: Record<string, unknown>, flags: number): number {
  if ('read-only' in options) {
    flags = optBool(options['read-only'], 'read-only') ? flags & ~BDRV_O_RDWR : flags | BDRV_O_RDWR;
    delete options['read-only'];
  }
  if ('cache.direct' in options) {
    flags = optBool(options['cache.direct'], 'cache.direct') ? flags | BDRV_O_NOCACHE : flags & ~BDRV_O_NOCACHE;
    delete options['cache.direct'];
  }
  if ('cache.no-flush' in options) {
    flags = optBool(options['cache.no-flush'], 'cache.no-flush') ? flags | BDRV_O_NO_FLUSH : flags & ~BDRV_O_NO_FLUSH;
    delete options['cache.no-flush'];
  }
  if ('discard' in options) {
    const d = String(options['discard']);
    if (d === 'unmap' || d === 'on') flags |= BDRV_O_UNMAP;
    else if (d === 'ignore' || d === 'off') flags &= ~BDRV_O_UNMAP;
    else throw new QemuError('Invalid discard option');
    delete options['discard'];
  }
  return flags;
}

const PROBE_BUF_SIZE = 2048;

/** Reads the first bytes of `bs` synchronously, for probing. */
function probe_read(bs: BlockDriverState, buf: Uint8Array): number {
  const st = { ret: Number.NaN };
  const child = new BdrvChild(bs, 'probe', BDRV_CHILD_DATA, null, {});
  const qiov = new QEMUIOVector();
  qemu_iovec_init_buf(qiov, buf, buf.length);
  const co = qemu_coroutine_create(function* () {
    st.ret = yield* bdrv_co_preadv(child, 0, buf.length, qiov, 0);
  });
  aio_co_enter(bs.aio_context, co);
  AIO_WAIT_WHILE(bs.aio_context, () => Number.isNaN(st.ret));
  return st.ret;
}

/**
 * Picks a format for `file_bs` by content. QEMU: `find_image_format` / `bdrv_probe_all`. The
 * highest `bdrv_probe` score wins; null if no format driver probes (aioco then uses the protocol
 * node itself). Sets `*probed` semantics through the returned flag.
 */
function find_image_format(file_bs: BlockDriverState, filename: string): BlockDriver | null {
  const probers = bdrv_drivers().filter((d) => d.bdrv_probe);
  if (probers.length === 0) return null;
  const len = bdrv_getlength(file_bs);
  const size = Math.max(0, Math.min(PROBE_BUF_SIZE, len < 0 ? 0 : len));
  const buf = new Uint8Array(size);
  if (size > 0) {
    const ret = probe_read(file_bs, buf);
    if (ret < 0) throw new QemuError(`Could not read image for determining its format: ${strerrorText(ret)}`);
  }
  let best: BlockDriver | null = null;
  let score = 0;
  for (const d of probers) {
    const s = d.bdrv_probe!(buf, size, filename);
    if (s > score) {
      score = s;
      best = d;
    }
  }
  if (!best) throw new QemuError('Could not determine image format: No compatible driver found');
  return best;
}

function strerrorText(ret: number): string {
  // Imported lazily to keep this file's imports small.
  return errnoText(-ret);
}
import { strerror as errnoText } from '../aio/errno.ts';

/** QEMU's warning when raw was probed on a writable image (printed to stderr). */
export function raw_probe_warning(filename: string): string {
  return (
    `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
    `         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n` +
    `         Specify the 'raw' format explicitly to remove the restrictions.\n`
  );
}

/** Parses `json:{...}` and merges it under `options` (existing keys win). */
function parse_json_filename(filename: string, options: Record<string, unknown>): void {
  let parsed: unknown;
  try {
    parsed = JSON.parse(filename.slice(5));
  } catch {
    throw new QemuError(`Could not parse the JSON options`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new QemuError('Invalid JSON object given');
  }
  const flat = qdict_flatten(parsed as Record<string, unknown>);
  for (const [k, v] of Object.entries(flat)) if (!(k in options)) options[k] = typeof v === 'number' || typeof v === 'boolean' ? v : v;
}

/**
 * Opens child `bdref_key` of `parent` from `filename` or the `bdref_key.*` options (removed from
 * `options`), or a node reference (`options[bdref_key]` a node name). QEMU: `bdrv_open_child`.
 * Returns null when nothing is given and `allow_none`; else throws QemuError
 * `A block device must be specified for "file"`.
 */
export function bdrv_open_child(
  filename: string | null,
  options: Record<string, unknown>,
  bdref_key: string,
  parent: BlockDriverState,
  role: number,
  allow_none: boolean,
): BdrvChild | null {
  const sub = qdict_extract_subqdict(options, bdref_key + '.');
  const ref = options[bdref_key];
  delete options[bdref_key];
  let bs: BlockDriverState;
  if (typeof ref === 'string') {
    bs = bdrv_open_reference(ref, filename, sub);
  } else if (ref instanceof BlockDriverState) {
    bdrv_ref(ref);
    bs = ref;
  } else {
    if (filename === null && Object.keys(sub).length === 0) {
      if (allow_none) return null;
      throw new QemuError(`A block device must be specified for "${bdref_key}"`);
    }
    // Children inherit the parent's flags; a format's child gets discard=unmap (block.c).
    let flags = (parent.open_flags & ~BDRV_O_PROTOCOL) | BDRV_O_UNMAP;
    if (!sub['driver'] && !(role & BDRV_CHILD_COW)) flags |= BDRV_O_PROTOCOL;
    bs = bdrv_open(filename, sub, flags);
  }
  return bdrv_attach_child(parent, bs, bdref_key, role);
}

/**
 * Opens the primary child of `parent` (named `bdref_key`: 'file' for most drivers, 'image' for
 * blkdebug), which becomes `parent.file`. QEMU: `bdrv_open_file_child`. The role is
 * FILTERED|PRIMARY for a filter, BDRV_CHILD_IMAGE otherwise; the child is mandatory
 * (`A block device must be specified for "image"`). Returns 0 as QEMU does; failures throw
 * QemuError. Surprise: a filter whose filtered child is `backing` (commit/mirror top) must not
 * use it (QEMU asserts; aioco throws).
 */
export function bdrv_open_file_child(
  filename: string | null,
  options: Record<string, unknown>,
  bdref_key: string,
  parent: BlockDriverState,
): number {
  const drv = parent.drv;
  if (drv?.filtered_child_is_backing) {
    throw new QemuError("bdrv_open_file_child: Assertion '!parent->drv->filtered_child_is_backing' failed");
  }
  const role = drv?.is_filter ? BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY : BDRV_CHILD_IMAGE;
  bdrv_open_child(filename, options, bdref_key, parent, role, false);
  return 0;
}

/**
 * The child of `bs` with the PRIMARY role (a format's `file`, a filter's filtered child), or
 * null (protocol nodes, quorum-like drivers). QEMU: `bdrv_primary_child`. Throws QemuError
 * "bdrv_primary_child: Assertion '!found' failed" if two children claim the role.
 */
export function bdrv_primary_child(bs: BlockDriverState): BdrvChild | null {
  let found: BdrvChild | null = null;
  for (const c of bs.children) {
    if (c.role & BDRV_CHILD_PRIMARY) {
      if (found) throw new QemuError("bdrv_primary_child: Assertion '!found' failed");
      found = c;
    }
  }
  return found;
}

/** The node under `bs`'s primary child, or null. QEMU: `bdrv_primary_bs`. */
export function bdrv_primary_bs(bs: BlockDriverState): BlockDriverState | null {
  return bdrv_primary_child(bs)?.bs ?? null;
}

/**
 * The node called `device` (a BlockBackend name; aioco's backends have none) or `node_name`;
 * throws QemuError "Cannot find device='X' nor node-name='Y'" when there is none. QEMU:
 * `bdrv_lookup_bs`.
 */
export function bdrv_lookup_bs(device: string | null, node_name: string | null): BlockDriverState {
  const bs = node_name !== null ? bdrv_find_node(node_name) : null;
  if (!bs) throw new QemuError(`Cannot find device='${device ?? ''}' nor node-name='${node_name ?? ''}'`);
  return bs;
}

/**
 * Opening by reference: a new reference to the existing node `reference` (looked up as device
 * and as node name). QEMU: the `reference` branch of `bdrv_open_inherit`. Throws QemuError
 * "Cannot reference an existing block device with additional options or a new filename" when
 * `filename` or any option comes with it.
 */
export function bdrv_open_reference(reference: string, filename: string | null, options: Record<string, unknown>): BlockDriverState {
  if (filename !== null || Object.keys(options).length > 0) {
    throw new QemuError('Cannot reference an existing block device with additional options or a new filename');
  }
  const bs = bdrv_lookup_bs(reference, reference);
  bdrv_ref(bs);
  return bs;
}

/**
 * Whether `id` is a well-formed user id (node name): a letter first, then letters, digits,
 * '-', '.', '_'. QEMU: `id_wellformed`.
 */
function id_wellformed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9._-]*$/.test(id);
}

/**
 * Opens a node. QEMU: `bdrv_open` (bdrv_open_inherit, bdrv_fill_options, bdrv_open_common).
 * `filename` may be null, a host file, `prefix:...` for a protocol (e.g. `null-co://`), or
 * `json:{...}`; `options` uses dotted keys (`driver`, `file.driver`, `file.filename`, ...), nested
 * objects are flattened. Without `driver`, the protocol comes from the filename and the format is
 * probed (none registered: the protocol node is returned). Errors are thrown as QemuError with
 * QEMU's messages: "Unknown driver 'x'", "Block protocol 'x' doesn't support the option 'y'",
 * "Block format 'x' does not support the option 'y'", `A block device must be specified for "file"`.
 * Surprise: `options` is not modified (a flattened copy is consumed).
 */
export function bdrv_open(filename: string | null, options: Record<string, unknown>, flags: number): BlockDriverState {
  options = qdict_flatten(options);
  if (filename !== null && filename.startsWith('json:')) {
    parse_json_filename(filename, options);
    filename = null;
  }
  if (filename === null && typeof options['filename'] === 'string' && !options['driver'] && !(flags & BDRV_O_PROTOCOL)) {
    filename = options['filename'] as string;
    delete options['filename'];
  }
  flags = update_flags_from_options(options, flags);
  const drvname = optString(options, 'driver');
  let drv: BlockDriver | null = null;
  if (drvname !== undefined) {
    drv = bdrv_find_format(drvname);
    if (!drv) throw new QemuError(`Unknown driver '${drvname}'`);
    delete options['driver'];
    if (drv.protocol_name) flags |= BDRV_O_PROTOCOL;
    else flags &= ~BDRV_O_PROTOCOL;
  } else if (flags & BDRV_O_PROTOCOL) {
    const fn = filename ?? optString(options, 'filename');
    if (fn === undefined) throw new QemuError('Must specify either driver or file');
    drv = bdrv_find_protocol(fn, true);
    if (!drv) throw new QemuError(`Unknown protocol '${fn}'`);
  }

  if (drv && (flags & BDRV_O_PROTOCOL)) {
    if (filename !== null) {
      if (drv.bdrv_parse_filename) drv.bdrv_parse_filename(filename, options);
      else options['filename'] = filename;
    }
    return bdrv_open_common(drv, filename, options, flags);
  }

  // No format given and none can be probed: the protocol node is the image (aioco: until a raw
  // driver is registered; QEMU would probe raw on top).
  if (drv === null && !bdrv_drivers().some((d) => d.bdrv_probe) && options['file'] === undefined) {
    const sub = qdict_extract_subqdict(options, 'file.');
    for (const [k, v] of Object.entries(sub)) if (!(k in options)) options[k] = v;
    return bdrv_open(filename, options, flags | BDRV_O_PROTOCOL);
  }

  // Format level: open the file child first (so it can be probed), hand it over as a reference.
  let file_bs: BlockDriverState | null = null;
  const fileSub = qdict_extract_subqdict(options, 'file.');
  const fileRef = options['file'];
  if (typeof fileRef === 'string') {
    // A reference must come alone (the 'file.' options were taken out above).
    file_bs = bdrv_open_reference(fileRef, null, fileSub);
    delete options['file'];
  } else if (fileRef instanceof BlockDriverState) {
    if (drv === null) {
      file_bs = fileRef;
      bdrv_ref(file_bs);
      delete options['file'];
    }
  } else if (filename !== null || Object.keys(fileSub).length > 0) {
    let childFlags = (flags | BDRV_O_UNMAP) & ~BDRV_O_PROTOCOL;
    if (!fileSub['driver']) childFlags |= BDRV_O_PROTOCOL;
    if (filename !== null && !fileSub['driver'] && !('filename' in fileSub) && !path_has_protocol(filename)) {
      fileSub['filename'] = filename;
      file_bs = bdrv_open(null, fileSub, childFlags);
    } else {
      file_bs = bdrv_open(fileSub['filename'] !== undefined ? null : filename, fileSub, childFlags);
    }
  } else if (drv === null) {
    throw new QemuError('Must specify either driver or file');
  }

  try {
    let probed = false;
    if (drv === null) {
      drv = find_image_format(file_bs!, filename ?? file_bs!.filename);
      if (drv === null) {
        const only = file_bs!;
        file_bs = null;
        return only;
      }
      probed = true;
    }
    if (file_bs) options['file'] = file_bs;
    // Every format node takes `backing`/`backing.*` (QEMU: bdrv_open_inherit): a driver without
    // backing support refuses them there, and `backing: null` is BDRV_O_NO_BACKING for its open.
    const backing = bdrv_extract_backing_options(options);
    if (backing.reference === null) flags |= BDRV_O_NO_BACKING;
    const bs = bdrv_open_common(drv, filename, options, flags & ~BDRV_O_PROTOCOL, probed);
    if (!(flags & BDRV_O_NO_BACKING)) {
      try {
        bdrv_open_backing_file(bs, backing.sub, backing.reference);
      } catch (e) {
        bdrv_unref(bs);
        throw e;
      }
    }
    return bs;
  } finally {
    if (file_bs) bdrv_unref(file_bs);
  }
}

function bdrv_open_common(
  drv: BlockDriver,
  filename: string | null,
  options: Record<string, unknown>,
  flags: number,
  probed = false,
): BlockDriverState {
  const bs = new BlockDriverState();
  let node_name = optString(options, 'node-name');
  delete options['node-name'];
  if (node_name !== undefined) {
    if (!id_wellformed(node_name)) throw new QemuError(`Invalid node-name: '${node_name}'`);
    if (named_nodes.has(node_name)) throw new QemuError(`Duplicate nodes with node-name='${node_name}'`);
  } else {
    node_name = `#block${String(++nodeCounter).padStart(3, '0')}`;
  }
  bs.node_name = node_name;
  bs.drv = drv;
  bs.open_flags = flags;
  bs.read_only = !(flags & BDRV_O_RDWR);
  bs.probed = probed;
  bs.options = { ...options, driver: drv.format_name };
  bs.filename = filename ?? optString(options, 'filename') ?? '';
  if (drv.bdrv_needs_filename && !bs.filename) {
    throw new QemuError(`The '${drv.format_name}' block driver requires a file name`);
  }
  const open = flags & BDRV_O_PROTOCOL ? drv.bdrv_file_open ?? drv.bdrv_open : drv.bdrv_open ?? drv.bdrv_file_open;
  named_nodes.set(node_name, bs);
  all_bdrv_states.add(bs);
  bdrv_drain_all_new_node(bs);
  try {
    if (flags & BDRV_O_PROTOCOL) {
      if (drv.runtime_opts?.includes('filename') !== true) delete options['filename'];
    }
    open?.(bs, options, flags);
    if (drv.runtime_opts) for (const k of drv.runtime_opts) delete options[k];
    if (flags & BDRV_O_PROTOCOL) delete options['filename'];
    if (!bs.filename && bs.file) bs.filename = bs.file.bs.filename;
    const r = refresh_total_sectors(bs, bs.total_sectors);
    if (r < 0) throw new QemuError(`Could not refresh total sector count: ${errnoText(-r)}`);
    bdrv_refresh_limits(bs);
    const left = Object.keys(options);
    if (left.length > 0) {
      if (flags & BDRV_O_PROTOCOL) {
        throw new QemuError(`Block protocol '${drv.format_name}' doesn't support the option '${left[0]}'`);
      }
      throw new QemuError(`Block format '${drv.format_name}' does not support the option '${left[0]}'`);
    }
  } catch (e) {
    if (bs.drv && open && bs.opaque !== null) bs.drv.bdrv_close?.(bs);
    for (const c of [...bs.children]) bdrv_unref_child(bs, c);
    bs.drv = null;
    named_nodes.delete(node_name);
    all_bdrv_states.delete(bs);
    bdrv_drain_all_end_quiesce(bs);
    throw e;
  }
  if (probed && !bs.read_only && drv.format_name === 'raw') process.stderr.write(raw_probe_warning(bs.filename));
  return bs;
}

/** Every open node (QEMU: `bdrv_next_all_states`). */
export function bdrv_all_states(): BlockDriverState[] {
  return [...all_bdrv_states];
}

/** @internal -EINVAL if `v` is not a safe non-negative integer. */
export function checkInt(v: number): number {
  return Number.isSafeInteger(v) && v >= 0 ? 0 : -EINVAL;
}
