// Shared-memory layout of the thread pool, used by the main thread (thread-pool.ts), its
// workers (thread-pool-worker.mjs) and the watchdog (thread-pool-watchdog.mjs). Plain
// JavaScript so workers load it without a TypeScript loader.
import { writeSync } from 'node:fs';

/** Requests that can sit in shared memory at once (a power of two); more wait in JS. */
export const MAX_SLOTS = 1024;
export const SLOT_MASK = MAX_SLOTS - 1;
/** iovec elements carried inline per request; longer vectors are bounced. */
export const MAX_IOV = 64;
export const MAX_WORKERS = 256;

// Int32 control words.
export const C_SUB_HEAD = 0;
export const C_SUB_TAIL = 1;
export const C_SUB_SEQ = 2;
export const C_COMP_TAIL = 3;
export const C_IDLE = 4;
export const C_LIVE = 5;
export const C_MIN = 6;
/** Set when the process exits: workers then die quietly. */
export const C_SHUTDOWN = 7;
/** Workers spawned and not yet in their loop. */
export const C_BOOTING = 8;
/** The main thread's position in the completion ring, published after each drain. */
export const C_COMP_HEAD = 9;
/** Workers beyond this many exit after a short idle time. */
export const C_SOFT_CAP = 10;
export const C_SUB_RING = 16;
export const C_COMP_RING = C_SUB_RING + MAX_SLOTS;
/** Per worker: [current slot + 1, alive, watchdog acknowledged, booting]. */
export const C_WORKER = C_COMP_RING + MAX_SLOTS;
export const W_STRIDE = 4;
/** Per slot: [state, op, fd, niov, generation, function id, spare, spare]. */
export const C_SLOT = C_WORKER + MAX_WORKERS * W_STRIDE;
export const S_STRIDE = 8;
/** Per slot: MAX_IOV x [slab id, byte offset, length]. */
export const C_IOV = C_SLOT + MAX_SLOTS * S_STRIDE;
export const CTL_INTS = C_IOV + MAX_SLOTS * MAX_IOV * 3;
/** Per slot float64: [offset, length, result, spare]. */
export const F_STRIDE = 4;
export const F64_COUNT = MAX_SLOTS * F_STRIDE;

// Slot states.
export const ST_FREE = 0;
export const ST_QUEUED = 1;
export const ST_ACTIVE = 2;
export const ST_DONE = 3;
export const ST_CANCELLED = 4;

// Operations.
export const OP_NOP = 0;
export const OP_PREADV = 1;
export const OP_PWRITEV = 2;
export const OP_FSYNC = 3;
export const OP_FDATASYNC = 4;
export const OP_FTRUNCATE = 5;
export const OP_FSTAT_SIZE = 6;
export const OP_WRITE_ZEROES = 7;
export const OP_USER = 8;

export const EIO = 5;

/**
 * Publishes `slot` as finished and wakes the main thread, unless an earlier completion it
 * has not consumed yet already did (one wake-up per batch, not per request). The main
 * thread publishes its ring position (C_COMP_HEAD) before its last look at the ring, and
 * this stores the entry before reading that position: either the main thread sees the
 * entry, or this sees it caught up and wakes it.
 */
export function pushCompletion(ctl, wake, slot) {
  const i = Atomics.add(ctl, C_COMP_TAIL, 1);
  Atomics.store(ctl, C_COMP_RING + (i & SLOT_MASK), slot + 1);
  if (i === Atomics.load(ctl, C_COMP_HEAD)) {
    Atomics.add(wake, 0, 1);
    Atomics.notify(wake, 0);
  }
}

/**
 * A worker is gone (its exit hook, or the watchdog when the hook could not run: OOM).
 * Exactly once per worker: its request, if any, completes with -EIO, and it is reported.
 */
export function reclaimWorker(ctl, f64, wake, id, why) {
  const wb = C_WORKER + id * W_STRIDE;
  if (Atomics.compareExchange(ctl, wb + 1, 1, 0) !== 1) return false;
  Atomics.sub(ctl, C_LIVE, 1);
  if (Atomics.compareExchange(ctl, wb + 3, 1, 0) === 1) Atomics.sub(ctl, C_BOOTING, 1);
  const cur = Atomics.load(ctl, wb) - 1;
  let what = 'while idle';
  if (cur >= 0) {
    const sb = C_SLOT + cur * S_STRIDE;
    if (
      Atomics.compareExchange(ctl, sb, ST_ACTIVE, ST_DONE) === ST_ACTIVE ||
      Atomics.compareExchange(ctl, sb, ST_QUEUED, ST_DONE) === ST_QUEUED
    ) {
      f64[cur * F_STRIDE + 2] = -EIO;
      what = 'while running a request, which completes with -EIO';
      pushCompletion(ctl, wake, cur);
    }
  }
  try {
    if (Atomics.load(ctl, C_SHUTDOWN) === 0) writeSync(2, `aioco: thread pool worker ${id} ${why} ${what}; it will be replaced\n`);
  } catch {
    // stderr closed: nothing more to do.
  }
  Atomics.add(wake, 0, 1);
  Atomics.notify(wake, 0);
  return true;
}
