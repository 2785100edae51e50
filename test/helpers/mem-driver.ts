// In-memory block drivers shared by the block-layer tests (not a test file: the runner only runs
// *.test.ts). Each driver logs its calls in its node's state so tests can assert the exact
// requests that reached it. Per-node behaviour comes from open options (dotted keys work).
import {
  aio_bh_schedule_oneshot,
  AIO_WAIT_WHILE,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  aio_co_wake,
  bdrv_co_preadv,
  bdrv_co_pwritev,
  bdrv_getlength,
  bdrv_open_child,
  bdrv_register,
  bdrv_find_format,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_current_aio_context,
  QemuError,
  BDRV_CHILD_IMAGE,
  BDRV_CHILD_FILTERED,
  BDRV_CHILD_PRIMARY,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_OFFSET_VALID,
  type BlockDriver,
  type BlockDriverState,
  type BlockStatusOut,
  type Coroutine,
  type CoroutineFn,
} from '../../src/index.ts';

/** What a test-provided block-status function returns for one driver call. */
export interface StatusAnswer {
  ret: number;
  pnum: number;
  map?: number;
  file?: BlockDriverState | null;
}

/** Per-node state of every mem driver. */
export interface MemState {
  data: Uint8Array;
  log: string[];
  /** 'bh': requests complete from a BH; 'hold': they park until release(); 'sync': at once. */
  mode: 'sync' | 'bh' | 'hold';
  held: Coroutine[];
  /** When non-zero, bdrv_getlength returns this (a -errno). */
  lenErr: number;
  /** Replaces the default block-status answer of drivers that have the callback. */
  status: ((want_zero: boolean, offset: number, bytes: number) => StatusAnswer) | null;
  /** Virtual size of a format node (0: the file child's length). */
  vsize: number;
  /** What bdrv_co_flush_to_disk returns. */
  flushRet: number;
}

function num(v: unknown, def: number): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new QemuError(`bad number '${String(v)}'`);
  return n;
}

function newState(options: Record<string, unknown>, size: number): MemState {
  const mode = (options['mode'] as MemState['mode'] | undefined) ?? 'sync';
  return { data: new Uint8Array(size), log: [], mode, held: [], lenErr: 0, status: null, vsize: 0, flushRet: 0 };
}

/** The node's MemState. */
export function st(bs: BlockDriverState): MemState {
  return bs.opaque as MemState;
}

/** Parks or defers the running request as the node's mode says. */
export function* gate(bs: BlockDriverState): CoroutineFn<void> {
  const s = st(bs);
  if (s.mode === 'sync') return;
  const co = qemu_coroutine_self();
  if (s.mode === 'hold') {
    s.held.push(co);
  } else {
    aio_bh_schedule_oneshot(qemu_get_current_aio_context(), () => aio_co_wake(co));
  }
  yield* qemu_coroutine_yield();
}

/** Resumes the oldest held request of `bs` (returns false if none was held). */
export function releaseOne(bs: BlockDriverState): boolean {
  const co = st(bs).held.shift();
  if (!co) return false;
  aio_co_wake(co);
  return true;
}

/** Resumes every held request of `bs`, oldest first; returns how many. */
export function releaseAll(bs: BlockDriverState): number {
  let n = 0;
  while (releaseOne(bs)) n++;
  return n;
}

export interface ProtoFeatures {
  blockStatus?: boolean;
  getlength?: boolean;
  truncate?: boolean;
}

/**
 * A protocol driver `name` (filename prefix `name:`). Options: size (default 4096), align,
 * max_transfer, write_flags, zero_flags, trunc_flags, mode (sync|bh|hold).
 */
export function makeProto(name: string, f: ProtoFeatures = {}): BlockDriver {
  const drv: BlockDriver = {
    format_name: name,
    protocol_name: name,
    has_variable_length: f.getlength !== false,
    runtime_opts: ['filename', 'size', 'align', 'max_transfer', 'write_flags', 'zero_flags', 'trunc_flags', 'mode'],
    bdrv_parse_filename(filename, options) {
      options['filename'] = filename;
    },
    bdrv_file_open(bs, options) {
      const s = newState(options, num(options['size'], 4096));
      bs.opaque = s;
      bs.supported_write_flags = num(options['write_flags'], 0);
      bs.supported_zero_flags = num(options['zero_flags'], 0);
      bs.supported_truncate_flags = num(options['trunc_flags'], 0);
      (s as MemState & { align: number; mt: number }).align = num(options['align'], 1);
      (s as MemState & { align: number; mt: number }).mt = num(options['max_transfer'], 0);
      if (f.getlength === false) bs.total_sectors = Math.ceil(s.data.length / 512);
    },
    bdrv_refresh_limits(bs) {
      const s = st(bs) as MemState & { align: number; mt: number };
      bs.bl.request_alignment = s.align;
      bs.bl.max_transfer = s.mt;
    },
    *bdrv_co_preadv(bs, offset, bytes, qiov, flags) {
      const s = st(bs);
      s.log.push(`read ${offset} ${bytes} ${flags}`);
      yield* gate(bs);
      let pos = offset;
      for (let i = 0; i < qiov.niov; i++) {
        const e = qiov.iov[i]!;
        e.fill(0);
        e.set(s.data.subarray(pos, Math.min(pos + e.length, s.data.length)));
        pos += e.length;
      }
      return 0;
    },
    *bdrv_co_pwritev(bs, offset, bytes, qiov, flags) {
      const s = st(bs);
      s.log.push(`write ${offset} ${bytes} ${flags}`);
      const copy = new Uint8Array(bytes);
      let pos = 0;
      for (let i = 0; i < qiov.niov; i++) {
        copy.set(qiov.iov[i]!, pos);
        pos += qiov.iov[i]!.length;
      }
      yield* gate(bs);
      if (offset + bytes > s.data.length) {
        const d = new Uint8Array(offset + bytes);
        d.set(s.data);
        s.data = d;
      }
      s.data.set(copy, offset);
      return 0;
    },
    *bdrv_co_pwrite_zeroes(bs, offset, bytes, flags) {
      const s = st(bs);
      s.log.push(`zero ${offset} ${bytes} ${flags}`);
      s.data.fill(0, offset, offset + bytes);
      return 0;
    },
    *bdrv_co_flush_to_disk(bs) {
      const s = st(bs);
      s.log.push('flush');
      yield* gate(bs);
      s.log.push('flush done');
      return s.flushRet;
    },
    *bdrv_co_pdiscard(bs, offset, bytes) {
      st(bs).log.push(`discard ${offset} ${bytes}`);
      return 0;
    },
  };
  if (f.getlength !== false) {
    drv.bdrv_getlength = (bs) => {
      const s = st(bs);
      return s.lenErr || s.data.length;
    };
  }
  if (f.blockStatus) {
    drv.bdrv_co_block_status = function* (bs, want_zero, offset, bytes, out: BlockStatusOut) {
      const s = st(bs);
      s.log.push(`status ${want_zero ? 1 : 0} ${offset} ${bytes}`);
      if (s.status) {
        const a = s.status(want_zero, offset, bytes);
        out.pnum = a.pnum;
        out.map = a.map ?? 0;
        out.file = a.file === undefined ? null : a.file;
        return a.ret;
      }
      out.pnum = bytes;
      out.map = offset;
      out.file = bs;
      return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID;
    };
  }
  if (f.truncate) {
    drv.bdrv_co_truncate = function* (bs, offset, exact, prealloc, flags) {
      const s = st(bs);
      s.log.push(`truncate ${offset} ${exact} ${prealloc} ${flags}`);
      yield* gate(bs);
      const d = new Uint8Array(offset);
      d.set(s.data.subarray(0, Math.min(offset, s.data.length)));
      s.data = d;
      return 0;
    };
  }
  return drv;
}

/** Node names whose format driver's bdrv_close ran, in order. */
export const closed: string[] = [];

export interface FormatFeatures {
  blockStatus?: boolean;
  filter?: boolean;
  supportsBacking?: boolean;
  truncate?: boolean;
}

/**
 * A format (or filter) driver `name` on a `file` child; optional `backing` child (a node
 * reference or dotted options). Reads/writes pass through to `file` at the same offset.
 * Option `size`: the virtual size (default: the file's length).
 */
export function makeFormat(name: string, f: FormatFeatures = {}): BlockDriver {
  const drv: BlockDriver = {
    format_name: name,
    is_filter: f.filter === true,
    supports_backing: f.supportsBacking === true,
    runtime_opts: ['size', 'mode', 'trunc_flags'],
    bdrv_close(bs) {
      closed.push(bs.node_name);
    },
    bdrv_open(bs, options) {
      const s = newState(options, 0);
      s.vsize = num(options['size'], 0);
      bs.supported_truncate_flags = num(options['trunc_flags'], 0);
      bs.opaque = s;
      bdrv_open_child(null, options, 'file', bs, f.filter ? BDRV_CHILD_FILTERED | BDRV_CHILD_PRIMARY : BDRV_CHILD_IMAGE | BDRV_CHILD_PRIMARY, false);
      // The backing child (option `backing` or `backing.*`) is opened by the core after this.
    },
    bdrv_getlength(bs) {
      const s = st(bs);
      if (s.lenErr) return s.lenErr;
      return s.vsize || bdrv_getlength(bs.file!.bs);
    },
    *bdrv_co_preadv(bs, offset, bytes, qiov, flags) {
      st(bs).log.push(`read ${offset} ${bytes} ${flags}`);
      yield* gate(bs);
      return yield* bdrv_co_preadv(bs.file!, offset, bytes, qiov, flags);
    },
    *bdrv_co_pwritev(bs, offset, bytes, qiov, flags) {
      st(bs).log.push(`write ${offset} ${bytes} ${flags}`);
      yield* gate(bs);
      return yield* bdrv_co_pwritev(bs.file!, offset, bytes, qiov, flags);
    },
  };
  if (f.blockStatus) {
    drv.bdrv_co_block_status = function* (bs, want_zero, offset, bytes, out: BlockStatusOut) {
      const s = st(bs);
      s.log.push(`status ${want_zero ? 1 : 0} ${offset} ${bytes}`);
      const a = s.status ? s.status(want_zero, offset, bytes) : { ret: 0, pnum: bytes };
      out.pnum = a.pnum;
      out.map = a.map ?? 0;
      out.file = a.file === undefined ? null : a.file;
      return a.ret;
    };
  }
  if (f.truncate) {
    drv.bdrv_co_truncate = function* (bs, offset, exact, prealloc, flags) {
      const s = st(bs);
      s.log.push(`truncate ${offset} ${exact} ${prealloc} ${flags}`);
      s.vsize = offset;
      return 0;
    };
  }
  return drv;
}

/** Registers `drv` unless a driver of that name already is; returns the registered one. */
export function ensureRegistered(drv: BlockDriver): BlockDriver {
  const have = bdrv_find_format(drv.format_name);
  if (have) return have;
  bdrv_register(drv);
  return drv;
}

/** Outcome of runCo: the coroutine's return value or what it threw. */
export interface CoResult<T> {
  done: boolean;
  ret?: T;
  err?: unknown;
}

/**
 * Runs `fn` in a new coroutine entered at once and returns its (possibly still pending) result
 * object; the caller drives the loop. Exceptions are caught inside the coroutine.
 */
export function startCo<T>(fn: () => CoroutineFn<T>): CoResult<T> {
  const r: CoResult<T> = { done: false };
  const co = qemu_coroutine_create(function* () {
    try {
      r.ret = yield* fn();
    } catch (e) {
      r.err = e;
    }
    r.done = true;
  });
  qemu_coroutine_enter(co);
  return r;
}

/** Runs `fn` in a coroutine and drives the main loop until it ends (AIO_WAIT_WHILE is bounded). */
export function runCo<T>(fn: () => CoroutineFn<T>): CoResult<T> {
  const r = startCo(fn);
  AIO_WAIT_WHILE(null, () => !r.done);
  return r;
}
