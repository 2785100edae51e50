/**
 * EventNotifier: QEMU's eventfd wrapper, as a level-triggered flag with a pseudo file
 * descriptor (util/event_notifier-posix.c). There are no real descriptors on the JS side:
 * `event_notifier_get_fd` gives a unique number that only aio_set_fd_handler understands.
 */
import type { AioContext } from './aio-context.ts';

/** @internal Something aio_set_fd_handler can watch: readable when `readable()` is true. */
export interface AioFdSource {
  readonly fd: number;
  readable(): boolean;
  /** Contexts with a handler on this source; kicked when it becomes readable. */
  contexts: Set<AioContext>;
}

/** @internal every watchable pseudo-fd by number. */
export const aioFdSources = new Map<number, AioFdSource>();
/** @internal hook set by fd-handler.ts: a source became readable in `ctx`. */
export const fdReadyHook: { ready: (ctx: AioContext) => void } = { ready: () => {} };

let nextFd = 2 ** 30;

/** QEMU's `EventNotifier`. `new EventNotifier(true)` starts set. */
export class EventNotifier implements AioFdSource {
  /** @internal */ fd = -1;
  /** @internal */ isSet = false;
  /** @internal */ contexts = new Set<AioContext>();
  constructor(active = false) {
    event_notifier_init(this, active);
  }
  /** @internal */
  readable(): boolean {
    return this.isSet;
  }
}

/**
 * (Re)initialises `e` with a fresh pseudo-fd, set iff `active`. QEMU:
 * `event_notifier_init`. Returns 0, as QEMU does on success.
 */
export function event_notifier_init(e: EventNotifier, active: boolean): number {
  if (e.fd >= 0) aioFdSources.delete(e.fd);
  e.fd = nextFd++;
  e.isSet = !!active;
  aioFdSources.set(e.fd, e);
  return 0;
}

/**
 * The pseudo-fd of `e`: a unique number >= 2**30, never a real descriptor. QEMU:
 * `event_notifier_get_fd`. Only aio_set_fd_handler accepts it.
 */
export function event_notifier_get_fd(e: EventNotifier): number {
  return e.fd;
}

/**
 * Sets `e`. QEMU: `event_notifier_set`. Every context with a handler on it is woken.
 * Surprise: it stays set (level-triggered) until `event_notifier_test_and_clear`, so a
 * read handler that does not clear it runs on every aio_poll (S30).
 */
export function event_notifier_set(e: EventNotifier): void {
  if (e.fd < 0) return;
  e.isSet = true;
  for (const ctx of e.contexts) fdReadyHook.ready(ctx);
}

/** Clears `e`, returning whether it was set. QEMU: `event_notifier_test_and_clear`. */
export function event_notifier_test_and_clear(e: EventNotifier): boolean {
  const was = e.isSet;
  e.isSet = false;
  return was;
}

/** Releases `e`'s pseudo-fd; it reads as never set afterwards. QEMU: `event_notifier_cleanup`. */
export function event_notifier_cleanup(e: EventNotifier): void {
  if (e.fd >= 0) aioFdSources.delete(e.fd);
  e.isSet = false;
  e.fd = -1;
}
