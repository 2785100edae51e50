/**
 * Timers bound to an AioContext, one sorted list per clock type. QEMU: util/qemu-timer.c
 * (S47-S53).
 */
import type { AioContext } from './aio-context.ts';
import { aio_notify, notifyHooks } from './aio-context.ts';
import {
  qemu_clock_get_ns,
  qemu_clock_is_enabled,
  qemu_clock_is_manual,
  type QEMUClockType,
} from './clock.ts';
import { QemuError } from './error.ts';

export const QEMU_TIMER_ATTR_EXTERNAL = 1;
export const QEMU_TIMER_ATTR_ALL = 0xffffffff;

/** A timer callback: receives the opaque given at creation. */
export type QEMUTimerCB<T = any> = (opaque: T) => void;

/** @internal one context's timers on one clock, sorted by expiry (FIFO among equals). */
export class TimerList {
  ctx: AioContext;
  clock: QEMUClockType;
  active_timers: QEMUTimer | null = null;
  constructor(ctx: AioContext, clock: QEMUClockType) {
    this.ctx = ctx;
    this.clock = clock;
  }
}

/** QEMU's `QEMUTimer`. Expiry is kept in nanoseconds; `scale` converts the API's units. */
export class QEMUTimer {
  /** @internal ns, or -1 when not pending. */ expire_time = -1;
  /** @internal */ timer_list: TimerList;
  /** @internal */ cb: QEMUTimerCB;
  /** @internal */ opaque: unknown;
  /** @internal */ scale: number;
  /** @internal */ attributes: number;
  /** @internal */ next: QEMUTimer | null = null;
  /** For messages: the callback's name. */
  name: string;
  constructor(tl: TimerList, scale: number, attributes: number, cb: QEMUTimerCB, opaque: unknown) {
    this.timer_list = tl;
    this.scale = scale;
    this.attributes = attributes;
    this.cb = cb;
    this.opaque = opaque;
    this.name = cb.name || 'anonymous';
  }
}

/**
 * Creates a timer on `ctx`'s list for clock `type`, in units of `scale` ns. QEMU:
 * `aio_timer_new`. Its callback runs in `ctx`'s aio_poll, in the timer phase, which comes
 * after BHs and fd handlers (S23).
 */
export function aio_timer_new<T>(ctx: AioContext, type: QEMUClockType, scale: number, cb: QEMUTimerCB<T>, opaque?: T): QEMUTimer {
  return aio_timer_new_with_attrs(ctx, type, scale, 0, cb, opaque);
}

/**
 * `aio_timer_new` with attributes (QEMU_TIMER_ATTR_EXTERNAL). QEMU:
 * `aio_timer_new_with_attrs`. Attributes only matter to record/replay, which aioco lacks.
 */
export function aio_timer_new_with_attrs<T>(
  ctx: AioContext,
  type: QEMUClockType,
  scale: number,
  attributes: number,
  cb: QEMUTimerCB<T>,
  opaque?: T,
): QEMUTimer {
  const tl = ctx.tlg[type];
  if (tl === undefined) throw new QemuError(`aio_timer_new: invalid clock type ${type}`);
  if (!(scale > 0)) throw new QemuError(`aio_timer_new: invalid scale ${scale}`);
  return new QEMUTimer(tl, scale, attributes, cb as QEMUTimerCB, opaque);
}

function unlink(ts: QEMUTimer): void {
  const tl = ts.timer_list;
  let pt = tl.active_timers;
  if (pt === ts) {
    tl.active_timers = ts.next;
  } else {
    while (pt !== null && pt.next !== ts) pt = pt.next;
    if (pt !== null) pt.next = ts.next;
  }
  ts.next = null;
  ts.expire_time = -1;
}

/** Inserts after every timer expiring at or before `expire`; true if it became the head. */
function insert(ts: QEMUTimer, expire: number): boolean {
  const tl = ts.timer_list;
  ts.expire_time = expire < 0 ? 0 : expire;
  let prev: QEMUTimer | null = null;
  let t = tl.active_timers;
  while (t !== null && t.expire_time <= ts.expire_time) {
    prev = t;
    t = t.next;
  }
  ts.next = t;
  if (prev === null) {
    tl.active_timers = ts;
    return true;
  }
  prev.next = ts;
  return false;
}

/** A new head means a sleeping poll must recompute its timeout (S48). */
function rearm(ts: QEMUTimer): void {
  aio_notify(ts.timer_list.ctx);
}

/**
 * Arms `ts` to expire at `expire_timer` nanoseconds (absolute, on its clock). QEMU:
 * `timer_mod_ns`. A negative time becomes 0. Equal deadlines fire in arming order.
 */
export function timer_mod_ns(ts: QEMUTimer, expire_timer: number): void {
  if (ts.expire_time >= 0) unlink(ts);
  if (insert(ts, expire_timer)) rearm(ts);
}

/** Arms `ts` at `expire_time` in its scale's units. QEMU: `timer_mod`. */
export function timer_mod(ts: QEMUTimer, expire_time: number): void {
  timer_mod_ns(ts, expire_time * ts.scale);
}

/**
 * Arms `ts` at `expire_timer` ns unless it is already pending earlier or at the same
 * time: it only ever moves a deadline earlier (S49). QEMU: `timer_mod_anticipate_ns`.
 */
export function timer_mod_anticipate_ns(ts: QEMUTimer, expire_timer: number): void {
  if (ts.expire_time >= 0 && ts.expire_time <= expire_timer) return;
  timer_mod_ns(ts, expire_timer);
}

/** `timer_mod_anticipate_ns` in the timer's scale's units. QEMU: `timer_mod_anticipate`. */
export function timer_mod_anticipate(ts: QEMUTimer, expire_time: number): void {
  timer_mod_anticipate_ns(ts, expire_time * ts.scale);
}

/** Disarms `ts`; a no-op if it is not pending. QEMU: `timer_del`. */
export function timer_del(ts: QEMUTimer): void {
  if (ts.expire_time >= 0) {
    const tl = ts.timer_list;
    const wasHead = tl.active_timers === ts;
    unlink(ts);
    if (wasHead) notifyHooks.hostTimersChanged(tl.ctx);
  }
}

/** Frees `ts`, disarming it first (QEMU >= 6.0, S53). QEMU: `timer_free`. */
export function timer_free(ts: QEMUTimer | null): void {
  if (ts !== null) timer_del(ts);
}

/** True iff `ts` is armed. QEMU: `timer_pending`. */
export function timer_pending(ts: QEMUTimer): boolean {
  return ts.expire_time >= 0;
}

/**
 * True if `ts`'s expiry is at or before `current_time`, given in the timer's scale's
 * units. QEMU: `timer_expired`. Surprise: as in QEMU, a timer that is not pending
 * (expiry -1) counts as expired.
 */
export function timer_expired(ts: QEMUTimer, current_time: number): boolean {
  return ts.expire_time <= current_time * ts.scale;
}

/** The expiry in ns, or -1 if not pending. QEMU: `timer_expire_time_ns`. */
export function timer_expire_time_ns(ts: QEMUTimer): number {
  return ts.expire_time;
}

/**
 * @internal Nanoseconds until the list's first timer (0 if due), -1 if none or the clock
 * is disabled. With `skipManual`, a manual clock's timers count as none.
 */
export function timerlist_deadline_ns(tl: TimerList, skipManual: boolean): number {
  const head = tl.active_timers;
  if (head === null || !qemu_clock_is_enabled(tl.clock)) return -1;
  if (skipManual && qemu_clock_is_manual(tl.clock)) return -1;
  const delta = head.expire_time - qemu_clock_get_ns(tl.clock);
  return delta <= 0 ? 0 : delta;
}

/** @internal true if the list's head expires at or before `t` ns. */
export function timerlist_due_before(tl: TimerList, t: number): boolean {
  return tl.active_timers !== null && tl.active_timers.expire_time <= t;
}

/**
 * @internal Runs the list's due timers (S50): `now` is read once; each timer is disarmed
 * before its callback, which may re-arm it; re-armed at or before `now`, it runs again
 * in the same loop. True if a callback ran. A throwing callback leaves later timers armed.
 */
export function timerlist_run_timers(tl: TimerList): boolean {
  let ts = tl.active_timers;
  if (ts === null || !qemu_clock_is_enabled(tl.clock)) return false;
  const now = qemu_clock_get_ns(tl.clock);
  let progress = false;
  while (ts !== null && ts.expire_time <= now) {
    tl.active_timers = ts.next;
    ts.next = null;
    ts.expire_time = -1;
    progress = true;
    ts.cb(ts.opaque);
    ts = tl.active_timers;
  }
  return progress;
}
