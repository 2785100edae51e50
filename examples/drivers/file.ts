/**
 * The `file` protocol driver: a host regular file, QEMU 7.2's block/file-posix.c (`bdrv_file`)
 * with `aio=threads`, written only against aioco's public API.
 *
 * Every read, write, flush, zero write and truncate runs on a worker of the thread pool of the
 * node's AioContext (`thread_pool_submit_co`) while the coroutine yields, as QEMU's
 * `raw_thread_pool_submit` does. Guest memory (`qemu_blockalign`, SharedArrayBuffer backed) is
 * read and written in place; the pool bounces ordinary memory itself.
 *
 * Importing this module registers the driver (`bdrv_register`).
 *
 * Options: `filename` (a `file:` prefix on a positional filename is stripped), `aio`
 * (`threads` only), `locking` (`auto`/`off`; `on` is refused), and the generic `read-only`,
 * `cache.direct` (O_DIRECT) and `cache.no-flush` the block layer turns into open flags.
 *
 * Differences from QEMU, all because Node offers no such system call:
 * - `locking=auto` takes no lock (QEMU uses OFD locks when the host has them) and
 *   `locking=on` is refused instead of locking.
 * - `aio=native` and `aio=io_uring` are refused; only the thread pool exists.
 * - No fallocate: zero writes are real writes of zeroes done by a worker, so a zero write with
 *   `BDRV_REQ_NO_FALLBACK` is `-ENOTSUP` (QEMU would use FALLOC_FL_ZERO_RANGE); discard is
 *   always `-ENOTSUP` (no punch-hole; the block layer ignores it); truncate supports only
 *   `prealloc=off`.
 * - No SEEK_DATA/SEEK_HOLE: block status reports the whole range as `DATA|OFFSET_VALID` with
 *   `map = offset`, `file = bs` (what QEMU answers when `want_zero` is false or lseek fails),
 *   so holes are never reported as zero.
 * - Like QEMU 7.2's `file` (unlike `host_device`), the driver has no `has_variable_length`:
 *   the length is read at open and after a truncate, so a file grown by another process keeps
 *   its old length (checked against qemu-io 7.2.22), and requests pay no fstat each.
 * - With `cache.direct=on`, `request_alignment` is 512 when a 512-byte O_DIRECT read at offset 0
 *   succeeds, else 4096 (QEMU tries more sizes and also probes memory alignment). The guest
 *   memory phase is measured once per process on the first O_DIRECT open of a file of at
 *   least 8 KiB (`guestMemoryProbePhase`), through a read-only O_DIRECT descriptor of that
 *   file that stays open for the life of the process (the probe keeps it for later slabs).
 */
import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs';
import {
  ALIGN_UP,
  BDRV_BLOCK_DATA,
  BDRV_SECTOR_SIZE,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_O_IO_URING,
  BDRV_O_NATIVE_AIO,
  BDRV_O_NOCACHE,
  BDRV_O_RDWR,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_NO_FALLBACK,
  BDRV_REQ_ZERO_WRITE,
  EINVAL,
  EIO,
  ENOTSUP,
  QemuError,
  aio_get_thread_pool,
  bdrv_get_aio_context,
  bdrv_register,
  guestMemoryProbePhase,
  qemu_get_current_aio_context,
  qemu_memalign,
  qemu_opt_get_bool_del,
  qemu_opt_get_del,
  qemu_opt_get_size_del,
  qemu_vfree,
  strerror,
  thread_pool_fdatasync,
  thread_pool_ftruncate,
  thread_pool_preadv,
  thread_pool_pwritev,
  thread_pool_submit_co,
  thread_pool_write_zeroes,
  type BlockDriver,
  type BlockDriverInfo,
  type BlockStatusOut,
  type PreallocMode,
  type QEMUIOVector,
  type BlockDriverState,
  type CoroutineFn,
  type ThreadPool,
  type QemuOpts,
  type QemuOptsList,
} from '../../src/index.ts';

/** The driver's per-node state (QEMU's BDRVRawState, the part aioco needs). */
export interface BDRVFileState {
  fd: number;
  /** The `fs.open` flags the descriptor was opened with. */
  open_flags: number;
  /** O_DIRECT: requests must be aligned to `request_alignment`. */
  needs_alignment: boolean;
  /** Probed request alignment with O_DIRECT, 1 without. */
  request_alignment: number;
  /** The `locking` option as given (`auto` or `off`); neither takes a lock. */
  locking: 'auto' | 'off';
}

/** The option names the driver takes (QEMU's raw_runtime_opts, minus what Node cannot do). */
const file_runtime_opts = ['filename', 'aio', 'locking'];

/** glibc texts for errnos aioco's errno table lacks (Node gives libuv's wording instead). */
const extraErrnoText: Record<string, string> = {
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  EMFILE: 'Too many open files',
  ENFILE: 'Too many open files in system',
  ENXIO: 'No such device or address',
  ETXTBSY: 'Text file busy',
  ENODEV: 'No such device',
};

/** -errno of a Node system error (libuv's errno is already negative on Linux). */
function errnoOf(e: unknown): number {
  const n = (e as { errno?: unknown } | null)?.errno;
  if (typeof n === 'number' && n !== 0) return -Math.abs(n);
  return -EIO;
}

/** glibc's strerror text for a Node system error. */
function errText(e: unknown): string {
  const code = (e as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && code in extraErrnoText) return extraErrnoText[code] as string;
  return strerror(-errnoOf(e));
}

function isEinval(e: unknown): boolean {
  return (e as { code?: unknown } | null)?.code === 'EINVAL';
}

/** QEMU's qapi_enum_parse: a value outside `allowed` is "invalid parameter value: x". */
function enumOpt<T extends string>(v: unknown, allowed: readonly T[], def: T): T {
  if (v === undefined || v === null) return def;
  const s = String(v);
  if (!(allowed as readonly string[]).includes(s)) throw new QemuError(`invalid parameter value: ${s}`);
  return s as T;
}

/**
 * Opens `filename` with `flags` the way QEMU's qemu_open does, with its messages:
 * "Could not open 'x': <strerror>", and for an O_DIRECT refusal
 * "Could not open 'x': filesystem does not support O_DIRECT".
 */
function qemu_open(filename: string, flags: number): number {
  try {
    return openSync(filename, flags);
  } catch (e) {
    if (isEinval(e) && flags & constants.O_DIRECT) {
      let fd = -1;
      try {
        fd = openSync(filename, flags & ~constants.O_DIRECT);
      } catch {
        // Fall through to the first error's message.
      }
      if (fd >= 0) {
        closeSync(fd);
        throw new QemuError(`Could not open '${filename}': filesystem does not support O_DIRECT`);
      }
    }
    throw new QemuError(`Could not open '${filename}': ${errText(e)}`);
  }
}

/** Whether the guest-memory phase was measured (once per process). */
let memoryPhaseProbed = false;
const PHASE_PROBE_MIN_SIZE = 8192;

/** Measures the guest-memory phase on the first O_DIRECT open of a file of >= 8 KiB. */
function probe_memory_phase(filename: string, size: number): void {
  if (memoryPhaseProbed || size < PHASE_PROBE_MIN_SIZE) return;
  let fd: number;
  try {
    fd = openSync(filename, constants.O_RDONLY | constants.O_DIRECT);
  } catch {
    return; // Try again on a later open; workers bounce misaligned memory meanwhile.
  }
  memoryPhaseProbed = true;
  // The descriptor is deliberately never closed: guest memory remembers it to probe new slabs.
  guestMemoryProbePhase(fd);
}

/**
 * The O_DIRECT request alignment: 512 if a 512-byte read at offset 0 into aligned guest
 * memory is accepted, else 4096. QEMU: raw_probe_alignment (which tries more sizes).
 */
function probe_request_alignment(fd: number): number {
  const buf = qemu_memalign(4096, 4096);
  try {
    readSync(fd, buf, 0, 512, 0);
    return 512;
  } catch (e) {
    return isEinval(e) ? 4096 : 512;
  } finally {
    qemu_vfree(buf);
  }
}

function state(bs: BlockDriverState): BDRVFileState {
  return bs.opaque as BDRVFileState;
}

/** QEMU's raw_thread_pool_submit: the pool of the node's current context. */
function pool(bs: BlockDriverState): ThreadPool {
  return aio_get_thread_pool(bdrv_get_aio_context(bs));
}

function file_parse_filename(filename: string, options: Record<string, unknown>): void {
  options['filename'] = filename.startsWith('file:') ? filename.slice('file:'.length) : filename;
}

function file_open(bs: BlockDriverState, options: Record<string, unknown>, flags: number): void {
  const filename = options['filename'];
  if (typeof filename !== 'string' || filename === '') {
    throw new QemuError("The 'file' block driver requires a file name");
  }
  // QEMU's bs->filename is the parsed one (without the 'file:' prefix).
  bs.filename = filename;

  const aio_default = flags & BDRV_O_NATIVE_AIO ? 'native' : flags & BDRV_O_IO_URING ? 'io_uring' : 'threads';
  const aio = enumOpt(options['aio'], ['threads', 'native', 'io_uring'] as const, aio_default);
  const locking = enumOpt(options['locking'], ['on', 'off', 'auto'] as const, 'auto');
  if (aio !== 'threads') {
    throw new QemuError(`aio=${aio} is not supported by aioco's 'file' driver: only aio=threads is available`);
  }
  if (locking === 'on') {
    throw new QemuError(
      "locking=on is not supported by aioco's 'file' driver: Node.js offers no file locks (OFD or POSIX); use locking=off or locking=auto",
    );
  }

  let open_flags = flags & BDRV_O_RDWR ? constants.O_RDWR : constants.O_RDONLY;
  const direct = (flags & BDRV_O_NOCACHE) !== 0;
  if (direct) open_flags |= constants.O_DIRECT;

  const fd = qemu_open(filename, open_flags);
  try {
    let st;
    try {
      st = fstatSync(fd);
    } catch (e) {
      throw new QemuError(`Could not stat file: ${errText(e)}`);
    }
    if (!st.isFile()) {
      throw new QemuError(`'file' driver requires '${filename}' to be a regular file`);
    }
    let request_alignment = 1;
    if (direct) {
      probe_memory_phase(filename, st.size);
      request_alignment = probe_request_alignment(fd);
    }
    bs.supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK;
    // Growing a regular file gives zeroes from the OS.
    bs.supported_truncate_flags = BDRV_REQ_ZERO_WRITE;
    bs.opaque = {
      fd,
      open_flags,
      needs_alignment: direct,
      request_alignment,
      locking,
    } satisfies BDRVFileState;
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

function file_close(bs: BlockDriverState): void {
  const s = state(bs);
  if (s.fd >= 0) {
    closeSync(s.fd);
    s.fd = -1;
  }
}

function file_getlength(bs: BlockDriverState): number {
  try {
    return fstatSync(state(bs).fd).size;
  } catch (e) {
    return errnoOf(e);
  }
}

function file_refresh_limits(bs: BlockDriverState): void {
  const s = state(bs);
  if (!s.needs_alignment) return;
  bs.bl.request_alignment = s.request_alignment;
  bs.bl.min_mem_alignment = s.request_alignment;
  bs.bl.opt_mem_alignment = Math.max(4096, s.request_alignment);
}

function* file_co_preadv(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, _flags: number): CoroutineFn<number> {
  // The block layer hands a qiov of exactly `bytes` (sliced for the driver).
  if (bytes !== qiov.size) return -EINVAL;
  const iov = qiov.iov.slice(0, qiov.niov);
  return yield* thread_pool_submit_co(pool(bs), thread_pool_preadv, { fd: state(bs).fd, offset, iov });
}

function* file_co_pwritev(bs: BlockDriverState, offset: number, bytes: number, qiov: QEMUIOVector, _flags: number): CoroutineFn<number> {
  if (bytes !== qiov.size) return -EINVAL;
  const iov = qiov.iov.slice(0, qiov.niov);
  return yield* thread_pool_submit_co(pool(bs), thread_pool_pwritev, { fd: state(bs).fd, offset, iov });
}

function* file_co_flush_to_disk(bs: BlockDriverState): CoroutineFn<number> {
  return yield* thread_pool_submit_co(pool(bs), thread_pool_fdatasync, { fd: state(bs).fd });
}

function* file_co_pwrite_zeroes(bs: BlockDriverState, offset: number, bytes: number, flags: number): CoroutineFn<number> {
  // Only writing zero buffers is possible (no fallocate): that is the fallback NO_FALLBACK forbids.
  if (flags & BDRV_REQ_NO_FALLBACK) return -ENOTSUP;
  return yield* thread_pool_submit_co(pool(bs), thread_pool_write_zeroes, { fd: state(bs).fd, offset, length: bytes });
}

function* file_co_pdiscard(_bs: BlockDriverState, _offset: number, _bytes: number): CoroutineFn<number> {
  // No fallocate(PUNCH_HOLE) in Node; the block layer treats -ENOTSUP as "nothing discarded".
  return -ENOTSUP;
}

function* file_co_truncate(
  bs: BlockDriverState,
  offset: number,
  _exact: boolean,
  prealloc: PreallocMode,
  _flags: number,
): CoroutineFn<number> {
  if (prealloc !== 'off' && prealloc !== 'falloc' && prealloc !== 'full') throw new QemuError(`Unsupported preallocation mode: ${prealloc}`);
  if (prealloc !== 'off') {
    // Growing with falloc/full allocates the new area; without fallocate both write zeroes.
    const cur = file_getlength(bs);
    if (cur < 0) throw new QemuError(`Could not stat file: ${strerror(-cur)}`);
    if (cur > offset) throw new QemuError('Cannot use preallocation for shrinking files');
    if (offset > cur) {
      const r = yield* thread_pool_submit_co(pool(bs), thread_pool_write_zeroes, { fd: state(bs).fd, offset: cur, length: offset - cur });
      if (r < 0) throw new QemuError(`Could not preallocate new data: ${strerror(-r)}`);
    }
  }
  const ret = yield* thread_pool_submit_co(pool(bs), thread_pool_ftruncate, { fd: state(bs).fd, length: offset });
  if (ret < 0) throw new QemuError(`Could not resize file: ${strerror(-ret)}`);
  return 0;
}

function* file_co_block_status(
  bs: BlockDriverState,
  _want_zero: boolean,
  offset: number,
  bytes: number,
  out: BlockStatusOut,
): CoroutineFn<number> {
  // No SEEK_DATA/SEEK_HOLE in Node: everything is data at its own offset.
  out.pnum = bytes;
  out.map = offset;
  out.file = bs;
  return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
}

/** A host file has no cluster size or dirty state: all zeroes. QEMU: file-posix's `raw_get_info`. */
function file_get_info(_bs: BlockDriverState, _bdi: BlockDriverInfo): number {
  return 0;
}

/** Host bytes the file occupies (QEMU: `raw_get_allocated_file_size`, st_blocks * 512). */
function file_get_allocated_file_size(bs: BlockDriverState): number {
  try {
    return fstatSync(state(bs).fd).blocks * 512;
  } catch (e) {
    return errnoOf(e);
  }
}

/** QEMU 7.2's file_create_opts (the options qemu-img create passes to the protocol). */
const file_create_opts: QemuOptsList = {
  name: 'file-create-opts',
  desc: [
    { name: 'size', type: 'size', help: 'Virtual disk size' },
    { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)' },
    { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
    { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable' },
  ],
};

/**
 * Creates (or reuses and empties) the host file and sizes it. QEMU: `raw_co_create_opts` /
 * `raw_co_create` of file-posix.c: "Could not create 'x': <strerror>", preallocation off, falloc
 * or full. Surprise: Node has no fallocate, so `falloc` writes zeroes like `full` (the blocks end
 * up allocated either way; it is slower).
 */
function* file_co_create_opts(_drv: BlockDriver, filename: string, opts: QemuOpts): CoroutineFn<number> {
  const p: Record<string, unknown> = {};
  file_parse_filename(filename, p);
  const name = String(p['filename']);
  const total_size = ALIGN_UP(qemu_opt_get_size_del(opts, 'size', 0), BDRV_SECTOR_SIZE);
  qemu_opt_get_bool_del(opts, 'nocow', false);
  qemu_opt_get_size_del(opts, 'extent_size_hint', 0);
  const prealloc = qemu_opt_get_del(opts, 'preallocation') ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'metadata' && prealloc !== 'falloc' && prealloc !== 'full') {
    throw new QemuError(`invalid parameter value: ${prealloc}`);
  }
  let fd: number;
  try {
    fd = openSync(name, constants.O_RDWR | constants.O_CREAT, 0o644);
  } catch (e) {
    throw new QemuError(`Could not create '${name}': ${errText(e)}`);
  }
  try {
    const ctx_pool = aio_get_thread_pool(qemu_get_current_aio_context());
    let ret = yield* thread_pool_submit_co(ctx_pool, thread_pool_ftruncate, { fd, length: 0 });
    if (prealloc === 'metadata') throw new QemuError('Unsupported preallocation mode: metadata');
    if (ret === 0 && prealloc !== 'off' && total_size > 0) {
      ret = yield* thread_pool_submit_co(ctx_pool, thread_pool_write_zeroes, { fd, offset: 0, length: total_size });
      if (ret < 0) {
        // QEMU 7.2's handle_aiocb_truncate words the two modes differently.
        const what = prealloc === 'falloc' ? 'Could not preallocate new data' : 'Could not write zeros for preallocation';
        throw new QemuError(`${what}: ${strerror(-ret)}`);
      }
    }
    if (ret === 0) ret = yield* thread_pool_submit_co(ctx_pool, thread_pool_ftruncate, { fd, length: total_size });
    if (ret < 0) throw new QemuError(`Could not resize file: ${strerror(-ret)}`);
  } finally {
    closeSync(fd);
  }
  return 0;
}

/** The `file` protocol driver (QEMU: bdrv_file). */
export const bdrv_file: BlockDriver = {
  format_name: 'file',
  protocol_name: 'file',
  bdrv_needs_filename: true,
  runtime_opts: file_runtime_opts,
  bdrv_parse_filename: file_parse_filename,
  bdrv_file_open: file_open,
  bdrv_close: file_close,
  bdrv_getlength: file_getlength,
  bdrv_refresh_limits: file_refresh_limits,
  bdrv_co_preadv: file_co_preadv,
  bdrv_co_pwritev: file_co_pwritev,
  bdrv_co_flush_to_disk: file_co_flush_to_disk,
  bdrv_co_pwrite_zeroes: file_co_pwrite_zeroes,
  bdrv_co_pdiscard: file_co_pdiscard,
  bdrv_co_truncate: file_co_truncate,
  bdrv_co_block_status: file_co_block_status,
  bdrv_get_allocated_file_size: file_get_allocated_file_size,
  bdrv_get_info: file_get_info,
  create_opts: file_create_opts,
  bdrv_co_create_opts: file_co_create_opts,
};

bdrv_register(bdrv_file);
