/**
 * The thread pool: QEMU's util/thread-pool.c (S90-S98) on worker threads.
 *
 * Each AioContext has one logical pool (request list, QUEUED/ACTIVE/DONE, completion BH,
 * `max` as the cap on its ACTIVE requests). Physical workers are one process-wide set
 * shared by all pools: it grows on demand up to the largest `max` and shrinks after 10 s
 * idle. Requests travel as fixed-layout records in shared memory (thread-pool-layout.mjs):
 * no per-request message or clone, except a user function's `arg`. A worker's DONE counts
 * as the completion BH being scheduled: every context drains the completion ring between
 * aio_notify_accept and aio_bh_poll, and a blocking wait wakes on it.
 */
import { availableParallelism } from 'node:os';
import { MessageChannel, Worker } from 'node:worker_threads';
import {
  CoroutineError,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from '../coroutine/coroutine.ts';
import { poolHooks, type AioContext, type AioContextPool } from './aio-context.ts';
import { BlockAIOCB, qemu_aio_get, qemu_aio_unref, type AIOCBInfo, type BlockCompletionFunc } from './aiocb.ts';
import { aio_bh_new, qemu_bh_cancel, qemu_bh_delete, qemu_bh_schedule, type QEMUBH } from './bh.ts';
import { aio_co_wake } from './co-schedule.ts';
import { ECANCELED, EINPROGRESS } from './errno.ts';
import { QemuError } from './error.ts';
import { realtimeNs } from './clock.ts';
import { hostLoopUpdate } from './g-source.ts';
import { qemu_memalign, qemu_vfree, slabHooks, slabOf, slabs, type Slab } from './guest-memory.ts';
import {
  CTL_INTS,
  C_COMP_RING,
  C_COMP_TAIL,
  C_IDLE,
  C_IOV,
  C_LIVE,
  C_MIN,
  C_SLOT,
  C_BOOTING,
  C_SOFT_CAP,
  C_COMP_HEAD,
  C_SHUTDOWN,
  C_SUB_HEAD,
  C_SUB_RING,
  C_SUB_SEQ,
  C_SUB_TAIL,
  C_WORKER,
  F64_COUNT,
  F_STRIDE,
  MAX_IOV,
  MAX_SLOTS,
  MAX_WORKERS,
  OP_FDATASYNC,
  OP_FSTAT_SIZE,
  OP_FSYNC,
  OP_FTRUNCATE,
  OP_NOP,
  OP_PREADV,
  OP_PWRITEV,
  OP_USER,
  OP_WRITE_ZEROES,
  SLOT_MASK,
  ST_CANCELLED,
  ST_FREE,
  ST_QUEUED,
  S_STRIDE,
  W_STRIDE,
} from './thread-pool-layout.mjs';
import { wakeBuffer } from './wake.ts';

const THREAD_QUEUED = 0;
const THREAD_ACTIVE = 1;
const THREAD_DONE = 2;

/** Arguments of the built-in read and write functions: guest memory is used in place. */
export interface ThreadPoolRwArg {
  fd: number;
  offset: number;
  iov: Uint8Array[];
}
/** Arguments of fsync, fdatasync and fstat size. */
export interface ThreadPoolFdArg {
  fd: number;
}
/** Arguments of ftruncate. */
export interface ThreadPoolTruncateArg {
  fd: number;
  length: number;
}
/** Arguments of write-zeroes. */
export interface ThreadPoolZeroesArg {
  fd: number;
  offset: number;
  length: number;
}

/**
 * QEMU's `ThreadPoolFunc`: what a worker runs. Built-ins are fixed operations; user
 * functions come from `thread_pool_func`. The type parameter is the `arg` it takes.
 */
export interface ThreadPoolFunc<A = unknown> {
  readonly op: number;
  readonly name: string;
  /** @internal user functions only */ readonly url?: string;
  /** @internal */ readonly exportName?: string;
  /** @internal id known to workers, -1 until first use */ id: number;
  /** @internal phantom for A */ readonly __arg?: (a: A) => void;
}

function builtin<A>(op: number, name: string): ThreadPoolFunc<A> {
  return Object.freeze({ op, name, id: -1 }) as ThreadPoolFunc<A>;
}

/** preadv into `iov` at `offset`; short reads are finished, reading past EOF gives zeroes; 0 or -errno. */
export const thread_pool_preadv: ThreadPoolFunc<ThreadPoolRwArg> = builtin(OP_PREADV, 'preadv');
/** pwritev from `iov` at `offset`; short writes are finished; 0 or -errno. */
export const thread_pool_pwritev: ThreadPoolFunc<ThreadPoolRwArg> = builtin(OP_PWRITEV, 'pwritev');
/** fsync(fd); 0 or -errno. */
export const thread_pool_fsync: ThreadPoolFunc<ThreadPoolFdArg> = builtin(OP_FSYNC, 'fsync');
/** fdatasync(fd); 0 or -errno. */
export const thread_pool_fdatasync: ThreadPoolFunc<ThreadPoolFdArg> = builtin(OP_FDATASYNC, 'fdatasync');
/** ftruncate(fd, length); 0 or -errno. */
export const thread_pool_ftruncate: ThreadPoolFunc<ThreadPoolTruncateArg> = builtin(OP_FTRUNCATE, 'ftruncate');
/** The file's size from fstat, or -errno. */
export const thread_pool_fstat_size: ThreadPoolFunc<ThreadPoolFdArg> = builtin(OP_FSTAT_SIZE, 'fstat-size');
/** Writes `length` zero bytes at `offset`; 0 or -errno. */
export const thread_pool_write_zeroes: ThreadPoolFunc<ThreadPoolZeroesArg> = builtin(OP_WRITE_ZEROES, 'write-zeroes');
/** Does nothing and returns 0 (for measuring the pool itself). */
export const thread_pool_nop: ThreadPoolFunc<unknown> = builtin(OP_NOP, 'nop');

/**
 * Names a user function run in the workers: the export `exportName` of the module at
 * `moduleUrl`, `(arg) => number | Promise<number>` returning 0/positive or -errno, like
 * QEMU's `ThreadPoolFunc`. aioco's own. `arg` travels by postMessage, so
 * SharedArrayBuffers in it stay shared. A `.ts` module is loaded through tsx (0.5-2 s the
 * first time in each worker). A function that throws completes with -EIO.
 */
export function thread_pool_func<A = unknown>(moduleUrl: string | URL, exportName: string): ThreadPoolFunc<A> {
  const url = String(moduleUrl);
  try {
    new URL(url);
  } catch {
    throw new QemuError(`thread_pool_func: '${url}' is not a URL (use pathToFileURL or import.meta.resolve)`);
  }
  return { op: OP_USER, name: exportName, url, exportName, id: -1 };
}

/** QEMU's `ThreadPoolElement`: the AIOCB of a pool request. */
export class ThreadPoolElement extends BlockAIOCB {
  /** @internal */ pool!: ThreadPool;
  /** @internal */ func!: ThreadPoolFunc<any>;
  /** @internal */ arg: unknown;
  /** @internal THREAD_QUEUED/ACTIVE/DONE */ state = THREAD_QUEUED;
  /** @internal */ ret = 0;
  /** @internal submission order, for S93's newest-first completion. */ seq = 0;
  /** @internal shared-memory slot, -1 while waiting in JS. */ slot = -1;
  /** @internal when it entered shared memory (REALTIME ns), for the stall check. */ submitNs = 0;
  /** @internal bounce buffers for iovecs over ordinary memory: [bounce, original] pairs. */
  bounce: Uint8Array[] | null = null;
}

function thread_pool_cancel(acb: ThreadPoolElement): void {
  acb._check();
  const pool = acb.pool;
  if (acb.state !== THREAD_QUEUED) return;
  if (acb.slot < 0) {
    const i = pool.queued.indexOf(acb);
    if (i >= 0) pool.queued.splice(i, 1);
  } else {
    if (Atomics.compareExchange(ctl, C_SLOT + acb.slot * S_STRIDE, ST_QUEUED, ST_CANCELLED) !== ST_QUEUED) return;
    // The slot is reused only after a worker has popped it (it hands it back).
    slotElems[acb.slot] = null;
    acb.slot = -1;
    pool.inShared--;
    pool.pump();
  }
  finish(acb, -ECANCELED);
}

/** The AIOCBInfo of pool requests: cancel_async cancels a QUEUED request only (S95). */
export const thread_pool_aiocb_info: AIOCBInfo<ThreadPoolElement> = {
  name: 'thread_pool_aiocb_info',
  aiocb_class: ThreadPoolElement,
  cancel_async: thread_pool_cancel,
  get_aio_context: (acb) => acb.pool.ctx,
};

// Shared memory and the process-wide workers.
const ctlSab = new SharedArrayBuffer(CTL_INTS * 4);
const f64Sab = new SharedArrayBuffer(F64_COUNT * 8);
const ctl = new Int32Array(ctlSab);
const f64 = new Float64Array(f64Sab);
const slotElems: (ThreadPoolElement | null)[] = new Array(MAX_SLOTS).fill(null);
const freeSlots: number[] = [];
for (let i = MAX_SLOTS - 1; i >= 0; i--) freeSlots.push(i);
let subTail = 0;
let compHead = 0;
let seqCounter = 0;
let genCounter = 0;

interface PoolWorker {
  id: number;
  worker: Worker;
}
const workers = new Map<number, PoolWorker>();
const freeIds: number[] = [];
let nextId = 0;
let watchdog: Worker | null = null;
const userFuncs: ThreadPoolFunc<any>[] = [];
const pendingArgs = new Map<string, unknown>();
const workerUrl = new URL('./thread-pool-worker.mjs', import.meta.url);
/** @internal tests set this to make an out-of-memory death quick. */
export const threadPoolWorkerOptions: { resourceLimits?: { maxOldGenerationSizeMb?: number } } = {};
const allPools = new Set<ThreadPool>();
process.on('exit', () => Atomics.store(ctl, C_SHUTDOWN, 1));

slabHooks.onNewSlab = (s: Slab) => {
  for (const w of workers.values()) w.worker.postMessage({ t: 'slab', id: s.id, sab: s.sab });
};

function startWatchdog(): Worker {
  const w = new Worker(new URL('./thread-pool-watchdog.mjs', import.meta.url), {
    workerData: { ctlSab, f64Sab, wakeSab: wakeBuffer },
    execArgv: [],
  });
  w.unref();
  return w;
}

function spawnWorker(): void {
  const id = freeIds.pop() ?? nextId++;
  if (id >= MAX_WORKERS) return;
  const wb = C_WORKER + id * W_STRIDE;
  Atomics.store(ctl, wb, 0);
  Atomics.store(ctl, wb + 2, 0);
  Atomics.store(ctl, wb + 3, 1);
  Atomics.store(ctl, wb + 1, 1);
  Atomics.add(ctl, C_LIVE, 1);
  Atomics.add(ctl, C_BOOTING, 1);
  watchdog ??= startWatchdog();
  const { port1, port2 } = new MessageChannel();
  const worker = new Worker(workerUrl, {
    workerData: {
      ctlSab,
      f64Sab,
      wakeSab: wakeBuffer,
      id,
      port: port1,
      slabs: slabs.map((s) => [s.id, s.sab]),
      args: [...pendingArgs],
      funcs: userFuncs.map((f) => [f.id, { url: f.url, exportName: f.exportName }]),
    },
    transferList: [port1],
    // Not the parent's --import hooks (tsx): module loading through them needs the main
    // thread's event loop, so a worker spawned while it blocks in aio_poll would not start.
    // User .ts modules are loaded through tsx's API inside the worker instead.
    execArgv: [],
    ...(threadPoolWorkerOptions.resourceLimits ? { resourceLimits: threadPoolWorkerOptions.resourceLimits } : {}),
  });
  worker.unref();
  // Errors inside the worker are reported by the worker or the watchdog; this only frees the id.
  worker.on('error', () => {});
  worker.on('exit', () => {
    workers.delete(id);
    freeIds.push(id);
    maybeGrow();
  });
  workers.set(id, { id, worker });
  watchdog.postMessage({ id, port: port2 }, [port2]);
}

function broadcast(msg: unknown): void {
  for (const w of workers.values()) w.worker.postMessage(msg);
}

function encodeIov(slot: number, iov: Uint8Array[]): void {
  const base = C_IOV + slot * MAX_IOV * 3;
  for (let i = 0; i < iov.length; i++) {
    const v = iov[i] as Uint8Array;
    ctl[base + i * 3] = slabOf(v.buffer as SharedArrayBuffer).id;
    ctl[base + i * 3 + 1] = v.byteOffset;
    ctl[base + i * 3 + 2] = v.byteLength;
  }
}

/** Iovecs over ordinary memory, or too many of them, go through one shared bounce buffer. */
function needsBounce(iov: Uint8Array[]): boolean {
  if (iov.length > MAX_IOV) return true;
  for (const v of iov) if (!(v.buffer instanceof SharedArrayBuffer)) return true;
  return false;
}

function writeRecord(elem: ThreadPoolElement, slot: number): void {
  const sb = C_SLOT + slot * S_STRIDE;
  const fb = slot * F_STRIDE;
  const func = elem.func;
  const op = func.op;
  ctl[sb + 1] = op;
  if (op === OP_USER) {
    if (func.id < 0) {
      func.id = userFuncs.length;
      userFuncs.push(func);
      broadcast({ t: 'func', id: func.id, func: { url: func.url, exportName: func.exportName } });
    }
    const gen = (genCounter = (genCounter + 1) | 0);
    ctl[sb + 4] = gen;
    ctl[sb + 5] = func.id;
    const key = `${slot}:${gen}`;
    pendingArgs.set(key, elem.arg);
    broadcast({ t: 'arg', key, arg: elem.arg });
  } else if (op !== OP_NOP) {
    const a = elem.arg as ThreadPoolRwArg & ThreadPoolZeroesArg;
    ctl[sb + 2] = a.fd;
    f64[fb] = a.offset ?? 0;
    f64[fb + 1] = a.length ?? 0;
    if (op === OP_PREADV || op === OP_PWRITEV) {
      let iov = a.iov;
      if (needsBounce(iov)) {
        let len = 0;
        for (const v of iov) len += v.byteLength;
        const b = qemu_memalign(4096, len);
        if (op === OP_PWRITEV) {
          let o = 0;
          for (const v of iov) {
            b.set(v, o);
            o += v.byteLength;
          }
        }
        elem.bounce = [b, ...iov];
        iov = [b];
      }
      ctl[sb + 3] = iov.length;
      encodeIov(slot, iov);
    }
  }
  Atomics.store(ctl, sb, ST_QUEUED);
}

function finish(elem: ThreadPoolElement, ret: number): void {
  elem.state = THREAD_DONE;
  elem.ret = ret;
  const pool = elem.pool;
  pool.done.push(elem);
  qemu_bh_schedule(pool.completion_bh);
}

/** Moves every finished request from the completion ring to its pool; true if any. */
function drainCompletions(): boolean {
  let any = false;
  for (;;) {
    const idx = C_COMP_RING + (compHead & SLOT_MASK);
    const v = Atomics.load(ctl, idx);
    if (v === 0) break;
    Atomics.store(ctl, idx, 0);
    compHead = (compHead + 1) | 0;
    any = true;
    const slot = v - 1;
    const elem = slotElems[slot];
    slotElems[slot] = null;
    Atomics.store(ctl, C_SLOT + slot * S_STRIDE, ST_FREE);
    freeSlots.push(slot);
    poolHooks.inFlight--;
    if (elem === null || elem === undefined) continue; // a cancelled slot handed back
    if (elem.func.op === OP_USER) pendingArgs.delete(`${slot}:${ctl[C_SLOT + slot * S_STRIDE + 4]}`);
    elem.slot = -1;
    const pool = elem.pool;
    pool.inShared--;
    finish(elem, f64[slot * F_STRIDE + 2] as number);
    pool.pump();
  }
  if (any) Atomics.store(ctl, C_COMP_HEAD, compHead);
  // Every poll while requests are in flight looks for stuck ones (cheap: three loads).
  if (poolHooks.inFlight !== 0) maybeGrow();
  return any;
}

/**
 * How many workers to run. QEMU spawns a thread whenever a request finds none idle, up to
 * `max` (64). On Node, workers are threads competing with the main thread for few cores:
 * 64 of them for quick jobs measured 15x slower than 2 (cold wake-ups, a starved main
 * thread). So: up to one per core at once; beyond that (up to the pools' `max`) one more
 * whenever the oldest waiting request has waited STALL_NS (all workers busy, e.g. in jobs
 * that block), at most one per SPAWN_GAP_NS. Workers above one per core leave after 1 s
 * idle, not 10 s: a loaded machine that descheduled the pool for a while should not keep
 * paying for the extra workers. Requests that wait for each other still all
 * run, as in QEMU. The check runs whenever the main thread polls, waits or returns to
 * Node's loop.
 */
const SOFT_CAP = Math.max(2, availableParallelism());
Atomics.store(ctl, C_SOFT_CAP, SOFT_CAP);
const STALL_NS = 50_000_000;
const SPAWN_GAP_NS = 1_000_000;
let lastSpawnNs = -Infinity;

/** @internal spawns if needed; returns ns until it wants to look again, -1 if never. */
function maybeGrow(): number {
  const head = Atomics.load(ctl, C_SUB_HEAD);
  const waiting = (subTail - head) | 0;
  const booting = Atomics.load(ctl, C_BOOTING);
  if (waiting <= Atomics.load(ctl, C_IDLE) + booting) return -1;
  let want = 1;
  for (const p of allPools) if (p.inShared > 0 && p.max > want) want = p.max;
  const live = Atomics.load(ctl, C_LIVE);
  if (live >= want) return -1;
  if (live < SOFT_CAP) {
    spawnWorker();
    return -1;
  }
  // Every worker still starting (~65 ms): nothing can have taken a request yet.
  if (live === booting) return STALL_NS;
  const oldest = slotElems[Atomics.load(ctl, C_SUB_RING + (head & SLOT_MASK))];
  if (oldest === null || oldest === undefined) return SPAWN_GAP_NS;
  const now = realtimeNs();
  const waited = now - oldest.submitNs;
  if (waited < STALL_NS) return STALL_NS - waited;
  if (now - lastSpawnNs < SPAWN_GAP_NS) return SPAWN_GAP_NS - (now - lastSpawnNs);
  lastSpawnNs = now;
  spawnWorker();
  return SPAWN_GAP_NS;
}

function ringPending(): boolean {
  return Atomics.load(ctl, C_COMP_RING + (compHead & SLOT_MASK)) !== 0;
}
poolHooks.ringPending = ringPending;
poolHooks.drain = drainCompletions;
poolHooks.tick = maybeGrow;

/** QEMU's `ThreadPool`: one per AioContext (aio_get_thread_pool). */
export class ThreadPool implements AioContextPool {
  /** @internal */ ctx: AioContext;
  /** @internal */ completion_bh: QEMUBH;
  /** @internal requests waiting in JS for a slot or for `max`. */ queued: ThreadPoolElement[] = [];
  /** @internal requests in shared memory (QUEUED there or ACTIVE). */ inShared = 0;
  /** @internal DONE, callback not yet run. */ done: ThreadPoolElement[] = [];
  /** @internal submitted, callback not yet run. */ count = 0;
  /** @internal */ min = 0;
  /** @internal */ max = 64;

  constructor(ctx: AioContext) {
    this.ctx = ctx;
    this.completion_bh = aio_bh_new(ctx, thread_pool_completion_bh, this);
  }

  /** @internal pushes queued requests into shared memory, up to `max` and free slots. */
  pump(): void {
    while (this.queued.length !== 0 && this.inShared < this.max && freeSlots.length !== 0) {
      const elem = this.queued.shift() as ThreadPoolElement;
      const slot = freeSlots.pop() as number;
      poolHooks.inFlight++;
      elem.slot = slot;
      elem.submitNs = realtimeNs();
      slotElems[slot] = elem;
      writeRecord(elem, slot);
      Atomics.store(ctl, C_SUB_RING + (subTail & SLOT_MASK), slot);
      subTail = (subTail + 1) | 0;
      Atomics.store(ctl, C_SUB_TAIL, subTail);
      this.inShared++;
      // A worker counts itself idle before it looks at the queue and sleeps, so with none
      // idle nobody needs waking (this notify was 40-65% of the main thread at QD32).
      if (Atomics.load(ctl, C_IDLE) !== 0) {
        Atomics.add(ctl, C_SUB_SEQ, 1);
        Atomics.notify(ctl, C_SUB_SEQ, 1);
      }
    }
    if (this.inShared !== 0) maybeGrow();
  }

  /** @internal AioContextPool */
  outstanding(): number {
    return this.count;
  }
  /** @internal AioContextPool: QEMU's thread_pool_free (S97); aio_ctx_finalize checked `count`. */
  free(): void {
    qemu_bh_delete(this.completion_bh);
    allPools.delete(this);
    updateMin();
  }
}

/** S93: newest-submitted DONE first; rescheduled before each callback for nested polls. */
function thread_pool_completion_bh(pool: ThreadPool): void {
  const bh = pool.completion_bh;
  for (;;) {
    const done = pool.done;
    if (done.length === 0) return;
    let k = 0;
    for (let i = 1; i < done.length; i++) if ((done[i] as ThreadPoolElement).seq > (done[k] as ThreadPoolElement).seq) k = i;
    const elem = done[k] as ThreadPoolElement;
    done[k] = done[done.length - 1] as ThreadPoolElement;
    done.pop();
    if (--pool.count === 0 && pool.ctx.attached) hostLoopUpdate();
    if (elem.bounce !== null) {
      const [b, ...orig] = elem.bounce as [Uint8Array, ...Uint8Array[]];
      if (elem.func.op === OP_PREADV) {
        let o = 0;
        for (const v of orig) {
          v.set(b.subarray(o, o + v.byteLength));
          o += v.byteLength;
        }
      }
      qemu_vfree(b);
      elem.bounce = null;
    }
    const cb = elem._cb;
    if (cb !== null) {
      qemu_bh_schedule(bh);
      try {
        cb(elem._opaque, elem.ret);
      } finally {
        qemu_aio_unref(elem);
      }
      qemu_bh_cancel(bh);
    } else {
      qemu_aio_unref(elem);
    }
  }
}

function updateMin(): void {
  let min = 0;
  for (const p of allPools) if (p.min > min) min = p.min;
  Atomics.store(ctl, C_MIN, min);
}

/**
 * The thread pool of `ctx`, created on first use. QEMU: `aio_get_thread_pool`.
 * Callbacks of its requests run in `ctx`, from a BH.
 */
export function aio_get_thread_pool(ctx: AioContext): ThreadPool {
  let pool = ctx.thread_pool as ThreadPool | null;
  if (pool === null) {
    pool = new ThreadPool(ctx);
    ctx.thread_pool = pool;
    allPools.add(pool);
  }
  return pool;
}

/**
 * Runs `func(arg)` on a worker; `cb(opaque, ret)` runs later in the pool's context, from
 * its completion BH. QEMU: `thread_pool_submit_aio`. Returns the AIOCB (refcount 1, owned
 * by the pool).
 * Surprises: the callback never runs before this returns; requests finished together
 * complete newest first (S93); cancelling helps only while the request is still QUEUED
 * (then ret is -ECANCELED); a running one completes with its real result. A user
 * function's `arg` that cannot be cloned throws DataCloneError here, submitting nothing.
 */
export function thread_pool_submit_aio<A>(
  pool: ThreadPool,
  func: ThreadPoolFunc<A>,
  arg: A,
  cb: BlockCompletionFunc | null,
  opaque?: unknown,
): ThreadPoolElement {
  // A user function's arg is cloned to the workers later: refuse one that cannot be now,
  // before anything is queued (DataCloneError, as postMessage would throw).
  if (func.op === OP_USER) structuredClone(arg);
  const elem = qemu_aio_get(thread_pool_aiocb_info, null, cb, opaque);
  elem.pool = pool;
  elem.func = func;
  elem.arg = arg;
  elem.seq = ++seqCounter;
  if (pool.count++ === 0 && pool.ctx.attached) hostLoopUpdate();
  pool.queued.push(elem);
  pool.pump();
  return elem;
}

interface CoSubmit {
  co: Coroutine;
  ret: number;
}
function thread_pool_co_cb(st: CoSubmit, ret: number): void {
  st.ret = ret;
  aio_co_wake(st.co);
}

/**
 * Runs `func(arg)` on a worker and returns its result in the calling coroutine. QEMU:
 * `thread_pool_submit_co`. The coroutine resumes synchronously inside the pool's
 * completion BH (S94).
 */
export function* thread_pool_submit_co<A>(pool: ThreadPool, func: ThreadPoolFunc<A>, arg: A): CoroutineFn<number> {
  if (!qemu_in_coroutine()) throw new CoroutineError("thread_pool_submit_co: Assertion 'qemu_in_coroutine()' failed");
  const st: CoSubmit = { co: qemu_coroutine_self(), ret: -EINPROGRESS };
  thread_pool_submit_aio(pool, func, arg, thread_pool_co_cb, st);
  yield* qemu_coroutine_yield();
  return st.ret;
}

/** Runs `func(arg)` on a worker and forgets it. QEMU: `thread_pool_submit`. */
export function thread_pool_submit<A>(pool: ThreadPool, func: ThreadPoolFunc<A>, arg: A): void {
  thread_pool_submit_aio(pool, func, arg, null);
}

/**
 * Sets how many workers the pool keeps (`min`) and how many of its requests may run at
 * once (`max`). QEMU 7.1: `thread_pool_update_params` (thread-pool-min/max). Applies at
 * once; with `max: 1` requests run one at a time in submission order.
 */
export function thread_pool_update_params(pool: ThreadPool, params: { min?: number; max?: number }): void {
  const min = params.min ?? pool.min;
  const max = params.max ?? pool.max;
  if (!Number.isInteger(min) || min < 0 || min > MAX_WORKERS) {
    throw new QemuError(`thread-pool-min value must be in range [0, ${MAX_WORKERS}]`);
  }
  if (!Number.isInteger(max) || max < 1 || max > MAX_WORKERS) {
    throw new QemuError(`thread-pool-max value must be in range [1, ${MAX_WORKERS}]`);
  }
  if (min > max) throw new QemuError('thread-pool-min value must be less than or equal to thread-pool-max');
  pool.min = min;
  pool.max = max;
  updateMin();
  while (Atomics.load(ctl, C_LIVE) < min) spawnWorker();
  pool.pump();
}

/** @internal completions workers have posted so far (wraps), for tests that need them all posted. */
export function threadPoolPostedCount(): number {
  return Atomics.load(ctl, C_COMP_TAIL);
}

/** @internal live physical workers (for benchmarks and tests). */
export function threadPoolWorkerCount(): number {
  return Atomics.load(ctl, C_LIVE);
}
