/**
 * Sleeping coroutines, QEMU 6.1's QemuCoSleep API (S83-S85). It lives in src/aio, not
 * src/coroutine, because it needs timers: the arrows point coroutine <- aio.
 */
import {
  CoroutineError,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_in_coroutine,
  type Coroutine,
  type CoroutineFn,
} from '../coroutine/coroutine.ts';
import { qemu_get_current_aio_context } from './aio-context.ts';
import { SCALE_NS, qemu_clock_get_ns, type QEMUClockType } from './clock.ts';
import { aio_co_wake } from './co-schedule.ts';
import { aio_timer_new, timer_del, timer_mod_ns } from './timer.ts';

const SLEEP_SCHEDULED = 'qemu_co_sleep_ns';

/** QEMU's `QemuCoSleep`: a handle through which a sleeping coroutine can be woken early. */
export class QemuCoSleep {
  /** @internal the sleeper, null when nobody sleeps. */
  to_wake: Coroutine | null = null;
}

/**
 * Wakes the coroutine sleeping on `w`, if any. QEMU (>= 6.1): `qemu_co_sleep_wake`.
 * Surprise: a no-op when nothing sleeps (5.2 asserted); the sleeper is woken with
 * aio_co_wake, so from plain code in its context it runs before this returns.
 */
export function qemu_co_sleep_wake(w: QemuCoSleep): void {
  const co = w.to_wake;
  w.to_wake = null;
  if (co !== null) {
    co.scheduled = null;
    aio_co_wake(co);
  }
}

/**
 * Sleeps until `qemu_co_sleep_wake(w)`, with no timer. QEMU: `qemu_co_sleep`.
 * Throws `qemu_co_sleep: Co-routine was already scheduled in '...'` if the coroutine is
 * scheduled. While it sleeps, entering or scheduling it by other means throws.
 */
export function* qemu_co_sleep(w: QemuCoSleep): CoroutineFn<void> {
  const co = qemu_coroutine_self();
  if (!qemu_in_coroutine()) throw new CoroutineError('Co-routine is yielding to no one');
  if (co.scheduled !== null) {
    throw new CoroutineError(`qemu_co_sleep: Co-routine was already scheduled in '${co.scheduled}'`);
  }
  co.scheduled = SLEEP_SCHEDULED;
  w.to_wake = co;
  yield* qemu_coroutine_yield();
}

function co_sleep_cb(w: QemuCoSleep): void {
  qemu_co_sleep_wake(w);
}

/**
 * Sleeps `ns` nanoseconds on clock `type`, or until `qemu_co_sleep_wake(w)`. QEMU:
 * `qemu_co_sleep_ns_wakeable`. The timer lives in the current context; it fires in that
 * context's timer phase, which enters the sleeper synchronously. It always yields, even
 * for `ns == 0`.
 */
export function* qemu_co_sleep_ns_wakeable(w: QemuCoSleep, type: QEMUClockType, ns: number): CoroutineFn<void> {
  const ts = aio_timer_new(qemu_get_current_aio_context(), type, SCALE_NS, co_sleep_cb, w);
  timer_mod_ns(ts, qemu_clock_get_ns(type) + ns);
  try {
    yield* qemu_co_sleep(w);
  } finally {
    timer_del(ts);
  }
}

/** Sleeps `ns` nanoseconds on clock `type`. QEMU: `qemu_co_sleep_ns`. */
export function* qemu_co_sleep_ns(type: QEMUClockType, ns: number): CoroutineFn<void> {
  yield* qemu_co_sleep_ns_wakeable(new QemuCoSleep(), type, ns);
}

