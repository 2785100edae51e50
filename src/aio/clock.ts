/**
 * QEMU's clocks (include/qemu/timer.h, S46, S51) and aioco's manual virtual clock.
 */
import { performance } from 'node:perf_hooks';
import { QemuError } from './error.ts';

/** Monotonic host time; runs always. */
export const QEMU_CLOCK_REALTIME = 0;
/** Guest time. Follows REALTIME here (there is no VM to stop) unless put in manual mode. */
export const QEMU_CLOCK_VIRTUAL = 1;
/** Wall-clock time in epoch nanoseconds (exact to 256 ns as a JS number). */
export const QEMU_CLOCK_HOST = 2;
/** The icount warp clock; outside icount it reads as QEMU_CLOCK_VIRTUAL. */
export const QEMU_CLOCK_VIRTUAL_RT = 3;
/** One of the four clock types. */
export type QEMUClockType = 0 | 1 | 2 | 3;
/** Number of clock types; timer lists are run in this order (0..3). */
export const QEMU_CLOCK_MAX = 4;

export const SCALE_NS = 1;
export const SCALE_US = 1000;
export const SCALE_MS = 1000000;

const enabled = [true, true, true, true];
let virtualManual = false;
/** In manual mode: the clock's value. Otherwise: offset added to REALTIME. */
let virtualValue = 0;
let virtualOffset = 0;

/** Nanoseconds since process start, monotonic. */
export function realtimeNs(): number {
  return Math.round(performance.now() * 1e6);
}

/** Hooks the aio layer installs: notify contexts with timers on `type`; deadlines moved later. */
let notifyClock: (type: QEMUClockType, dueUpTo: number) => void = () => {};
let clockStopped: () => void = () => {};
/** @internal */
export function clockSetNotifyHook(fn: (type: QEMUClockType, dueUpTo: number) => void, stopped: () => void): void {
  notifyClock = fn;
  clockStopped = stopped;
}

function checkType(type: number, fn: string): asserts type is QEMUClockType {
  if (type !== 0 && type !== 1 && type !== 2 && type !== 3) {
    throw new QemuError(`${fn}: invalid clock type ${type}`);
  }
}

/**
 * The current time of `type` in nanoseconds. QEMU: `qemu_clock_get_ns`.
 * REALTIME and VIRTUAL count from process start; HOST is epoch time.
 */
export function qemu_clock_get_ns(type: QEMUClockType): number {
  switch (type) {
    case QEMU_CLOCK_REALTIME:
      return realtimeNs();
    case QEMU_CLOCK_VIRTUAL:
    case QEMU_CLOCK_VIRTUAL_RT:
      return virtualManual ? virtualValue : realtimeNs() + virtualOffset;
    case QEMU_CLOCK_HOST:
      return (performance.timeOrigin + performance.now()) * 1e6;
    default:
      checkType(type, 'qemu_clock_get_ns');
      return 0;
  }
}

/** The current time of `type` in microseconds, rounded down. QEMU: `qemu_clock_get_us`. */
export function qemu_clock_get_us(type: QEMUClockType): number {
  return Math.floor(qemu_clock_get_ns(type) / SCALE_US);
}

/** The current time of `type` in milliseconds, rounded down. QEMU: `qemu_clock_get_ms`. */
export function qemu_clock_get_ms(type: QEMUClockType): number {
  return Math.floor(qemu_clock_get_ns(type) / SCALE_MS);
}

/**
 * Enables or disables a clock. QEMU: `qemu_clock_enable`. A disabled clock has no deadline
 * and runs no timers (S51); enabling it notifies every context so waits recompute.
 * Surprise: unlike QEMU, QEMU_CLOCK_VIRTUAL starts enabled (there is no vm_start).
 */
export function qemu_clock_enable(type: QEMUClockType, on: boolean): void {
  checkType(type, 'qemu_clock_enable');
  const old = enabled[type];
  enabled[type] = on;
  if (on && !old) notifyClock(type, Infinity);
  if (!on && old) clockStopped();
}

/** @internal */
export function qemu_clock_is_enabled(type: QEMUClockType): boolean {
  return enabled[type] as boolean;
}

/** @internal true if `type` is the virtual clock (or its RT twin) in manual mode. */
export function qemu_clock_is_manual(type: QEMUClockType): boolean {
  return virtualManual && (type === QEMU_CLOCK_VIRTUAL || type === QEMU_CLOCK_VIRTUAL_RT);
}

/**
 * Puts QEMU_CLOCK_VIRTUAL in manual mode (aioco's own, for deterministic tests): from then
 * on it moves only through `qemu_clock_advance_virtual_time`. Leaving manual mode resumes
 * at REALTIME's pace from the value reached (no jump for the time spent in manual mode).
 * Surprise: a blocking wait never sleeps for a manual-clock timer; with nothing else to
 * wait for it throws AioWaitError instead of hanging.
 */
export function qemu_clock_set_manual(type: QEMUClockType, manual: boolean): void {
  checkType(type, 'qemu_clock_set_manual');
  if (type !== QEMU_CLOCK_VIRTUAL && type !== QEMU_CLOCK_VIRTUAL_RT) {
    throw new QemuError(`qemu_clock_set_manual: only QEMU_CLOCK_VIRTUAL can be manual, not clock ${type}`);
  }
  if (manual === virtualManual) return;
  if (manual) {
    virtualValue = realtimeNs() + virtualOffset;
    virtualManual = true;
    clockStopped();
  } else {
    virtualOffset = virtualValue - realtimeNs();
    virtualManual = false;
    notifyClock(QEMU_CLOCK_VIRTUAL, Infinity);
    notifyClock(QEMU_CLOCK_VIRTUAL_RT, Infinity);
  }
}

/**
 * Moves the manual QEMU_CLOCK_VIRTUAL to `dest_ns` (absolute). QEMU (qtest):
 * `qemu_clock_advance_virtual_time`. An earlier `dest_ns` is ignored: the clock never
 * goes back. Surprise: due timers do not run inside this call; their contexts are
 * notified and run them in their next aio_poll. Returns the clock's value.
 */
export function qemu_clock_advance_virtual_time(dest_ns: number): number {
  if (!virtualManual) {
    throw new QemuError('qemu_clock_advance_virtual_time: QEMU_CLOCK_VIRTUAL is not in manual mode (qemu_clock_set_manual)');
  }
  if (!Number.isFinite(dest_ns)) throw new QemuError(`qemu_clock_advance_virtual_time: invalid time ${dest_ns}`);
  if (dest_ns > virtualValue) {
    virtualValue = dest_ns;
    notifyClock(QEMU_CLOCK_VIRTUAL, dest_ns);
    notifyClock(QEMU_CLOCK_VIRTUAL_RT, dest_ns);
  }
  return virtualValue;
}

/**
 * The earlier of two timeouts where -1 means infinite. QEMU: `qemu_soonest_timeout`
 * (which compares as unsigned for the same effect).
 */
export function qemu_soonest_timeout(a: number, b: number): number {
  if (a < 0) return b;
  if (b < 0) return a;
  return a < b ? a : b;
}

/** Nanoseconds to milliseconds, rounded up; -1 stays -1. QEMU: `qemu_timeout_ns_to_ms` (S54). */
export function qemu_timeout_ns_to_ms(ns: number): number {
  if (ns < 0) return -1;
  if (ns === 0) return 0;
  return Math.min(Math.ceil(ns / SCALE_MS), 0x7fffffff);
}
