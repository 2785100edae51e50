/**
 * fd handlers and event-notifier handlers of a context, readiness, dispatch and external
 * clients. QEMU: util/aio-posix.c (S28-S35), include/block/aio.h (S33).
 */
import type { AioContext } from './aio-context.ts';
import { aio_notify, notifyHooks } from './aio-context.ts';
import { QemuError } from './error.ts';
import {
  aioFdSources,
  event_notifier_get_fd,
  fdReadyHook,
  type AioFdSource,
  type EventNotifier,
} from './event-notifier.ts';

/** A handler callback: receives the handler's opaque (for event notifiers, the notifier). */
export type IOHandler = (opaque: any) => void;
/** An io_poll callback: true if it found (and handled) work. */
export type AioPollFn = (opaque: any) => boolean;

const G_IO_IN = 1;
const G_IO_OUT = 4;

/** @internal QEMU's `AioHandler`. */
export class AioHandler {
  deleted = false;
  inPollList = false;
  /** The ready list this node was last put on (S27: a nested poll takes it over). */
  readyList: object | null = null;
  revents = 0;
  io_poll_begin: IOHandler | null = null;
  io_poll_end: IOHandler | null = null;
  constructor(
    readonly source: AioFdSource,
    readonly is_external: boolean,
    readonly io_read: IOHandler | null,
    readonly io_write: IOHandler | null,
    readonly io_poll: AioPollFn | null,
    readonly opaque: unknown,
  ) {}
}

function findNode(ctx: AioContext, fd: number): AioHandler | null {
  for (const n of ctx.aio_handlers) if (!n.deleted && n.source.fd === fd) return n;
  return null;
}

/** Marks `node` deleted; unlinks it now unless a walk is in progress (S29). */
function removeNode(ctx: AioContext, node: AioHandler): void {
  node.deleted = true;
  node.readyList = null;
  if (node.inPollList) {
    node.inPollList = false;
    const i = ctx.poll_aio_handlers.indexOf(node);
    if (i >= 0) ctx.poll_aio_handlers.splice(i, 1);
  }
  if (ctx.walking === 0) {
    const i = ctx.aio_handlers.indexOf(node);
    if (i >= 0) ctx.aio_handlers.splice(i, 1);
  }
  if (!ctx.aio_handlers.some((n) => !n.deleted && n.source === node.source)) node.source.contexts.delete(ctx);
}

/** @internal unlink handlers deleted during a walk (the outermost walker does it, S29). */
export function aio_free_deleted_handlers(ctx: AioContext): void {
  if (ctx.walking !== 0 || ctx.aio_handlers.length === 0) return;
  if (ctx.aio_handlers.some((n) => n.deleted)) ctx.aio_handlers = ctx.aio_handlers.filter((n) => !n.deleted);
}

/**
 * Sets, replaces or (all three callbacks null) removes the handler for `fd` in `ctx`.
 * QEMU: `aio_set_fd_handler`. `fd` is `event_notifier_get_fd(e)` or an aioco channel's.
 * Readiness is level-triggered: read-ready while the source is set, write-ready always.
 * Surprise: a handler removed or replaced by an earlier callback in the same dispatch
 * round is not called (S29); a handler with `io_poll` is busy-polled only after it has
 * fired once through normal dispatch (S35).
 */
export function aio_set_fd_handler(
  ctx: AioContext,
  fd: number,
  is_external: boolean,
  io_read: IOHandler | null,
  io_write: IOHandler | null,
  io_poll: AioPollFn | null,
  opaque?: unknown,
): void {
  const source = aioFdSources.get(fd);
  const old = findNode(ctx, fd);
  if (!io_read && !io_write && !io_poll) {
    if (old === null) return;
    if (!old.io_poll) ctx.poll_disable_cnt--;
    removeNode(ctx, old);
    aio_notify(ctx);
    return;
  }
  if (source === undefined) {
    throw new QemuError(`aio_set_fd_handler: fd ${fd} is not an aioco notifier or channel`);
  }
  const node = new AioHandler(source, !!is_external, io_read ?? null, io_write ?? null, io_poll ?? null, opaque);
  ctx.poll_disable_cnt += (io_poll ? 0 : 1) - (old !== null && !old.io_poll ? 1 : 0);
  if (old !== null) removeNode(ctx, old);
  ctx.aio_handlers.unshift(node);
  source.contexts.add(ctx);
  aio_notify(ctx);
}

/**
 * Sets `io_poll_begin`/`io_poll_end` on the existing handler for `fd`; silently nothing if
 * there is none (S31). QEMU: `aio_set_fd_poll`.
 */
export function aio_set_fd_poll(ctx: AioContext, fd: number, io_poll_begin: IOHandler | null, io_poll_end: IOHandler | null): void {
  const node = findNode(ctx, fd);
  if (node === null) return;
  node.io_poll_begin = io_poll_begin;
  node.io_poll_end = io_poll_end;
}

/**
 * Watches `e` in `ctx`: `io_read(e)` runs while it is set; `io_poll(e)` is the busy-poll
 * check. Both null removes the handler. QEMU: `aio_set_event_notifier`.
 * Surprise: `io_read` must clear `e` (event_notifier_test_and_clear) or it runs again on
 * every aio_poll (S30).
 */
export function aio_set_event_notifier(
  ctx: AioContext,
  e: EventNotifier,
  is_external: boolean,
  io_read: ((e: EventNotifier) => void) | null,
  io_poll: ((e: EventNotifier) => boolean) | null,
): void {
  aio_set_fd_handler(ctx, event_notifier_get_fd(e), is_external, io_read, null, io_poll, e);
}

/** `aio_set_fd_poll` for an event notifier. QEMU: `aio_set_event_notifier_poll`. */
export function aio_set_event_notifier_poll(
  ctx: AioContext,
  e: EventNotifier,
  io_poll_begin: ((e: EventNotifier) => void) | null,
  io_poll_end: ((e: EventNotifier) => void) | null,
): void {
  aio_set_fd_poll(ctx, event_notifier_get_fd(e), io_poll_begin, io_poll_end);
}

/**
 * Stops dispatching `is_external` handlers until the matching enable. QEMU 5.2:
 * `aio_disable_external` (S33). Their events stay pending and are delivered afterwards.
 */
export function aio_disable_external(ctx: AioContext): void {
  ctx.external_disable_cnt++;
}

/** Undoes one `aio_disable_external`; the last one notifies. QEMU: `aio_enable_external`. */
export function aio_enable_external(ctx: AioContext): void {
  if (ctx.external_disable_cnt <= 0) throw new QemuError("aio_enable_external: Assertion 'old > 0' failed");
  if (--ctx.external_disable_cnt === 0) aio_notify(ctx);
}

/** True while external clients are disabled. QEMU: `aio_external_disabled`. */
export function aio_external_disabled(ctx: AioContext): boolean {
  return ctx.external_disable_cnt > 0;
}

/** True if a handler registered with `is_external` may run now. QEMU: `aio_node_check`. */
export function aio_node_check(ctx: AioContext, is_external: boolean): boolean {
  return !is_external || ctx.external_disable_cnt === 0;
}

function reventsOf(node: AioHandler): number {
  return (node.io_read !== null && node.source.readable() ? G_IO_IN : 0) | (node.io_write !== null ? G_IO_OUT : 0);
}

/**
 * @internal Phase 5 of aio_poll: the handlers ready now (QEMU's fdmon wait filling a
 * ready list). A nested poll takes nodes over from its parent's list (S27).
 */
export function aio_collect_ready(ctx: AioContext, token: object): AioHandler[] | null {
  let ready: AioHandler[] | null = null;
  for (const node of ctx.aio_handlers) {
    if (node.deleted || !aio_node_check(ctx, node.is_external)) continue;
    const revents = reventsOf(node);
    if (revents === 0) continue;
    node.revents = revents;
    node.readyList = token;
    (ready ??= []).push(node);
  }
  return ready;
}

/** @internal true if some handler of `ctx` is ready now (for waits and aio_pending). */
export function aio_has_ready_handler(ctx: AioContext): boolean {
  for (const node of ctx.aio_handlers) {
    if (!node.deleted && aio_node_check(ctx, node.is_external) && reventsOf(node) !== 0) return true;
  }
  return false;
}

/** QEMU's aio_dispatch_handler: one node with `revents`; true if a user callback ran. */
function aio_dispatch_handler(ctx: AioContext, node: AioHandler, revents: number): boolean {
  let progress = false;
  if (!node.deleted && !node.inPollList && node.io_poll !== null) {
    if (ctx.poll_started && node.io_poll_begin !== null) node.io_poll_begin(node.opaque);
    node.inPollList = true;
    ctx.poll_aio_handlers.unshift(node);
  }
  if (!node.deleted && revents & G_IO_IN && aio_node_check(ctx, node.is_external) && node.io_read !== null) {
    node.io_read(node.opaque);
    progress = true;
  }
  if (!node.deleted && revents & G_IO_OUT && aio_node_check(ctx, node.is_external) && node.io_write !== null) {
    node.io_write(node.opaque);
    progress = true;
  }
  return progress;
}

/** @internal Phase 10 of aio_poll: dispatch a ready list collected under `token`. */
export function aio_dispatch_ready_handlers(ctx: AioContext, ready: AioHandler[], token: object): boolean {
  let progress = false;
  for (const node of ready) {
    if (node.readyList !== token) continue;
    node.readyList = null;
    const revents = node.revents;
    node.revents = 0;
    if (aio_dispatch_handler(ctx, node, revents)) progress = true;
  }
  return progress;
}

/** @internal aio_dispatch's full scan of every handler (S102). */
export function aio_dispatch_handlers(ctx: AioContext): boolean {
  let progress = false;
  for (const node of ctx.aio_handlers.slice()) {
    node.readyList = null;
    if (aio_dispatch_handler(ctx, node, node.deleted ? 0 : reventsOf(node))) progress = true;
  }
  return progress;
}

/**
 * @internal QEMU's poll_set_started: io_poll_begin/io_poll_end on every poll handler, and
 * on stopping one last io_poll each "in case io_poll_end raced". True if that last
 * io_poll found work.
 */
export function poll_set_started(ctx: AioContext, started: boolean): boolean {
  if (started === ctx.poll_started) return false;
  ctx.poll_started = started;
  let progress = false;
  ctx.walking++;
  try {
    for (const node of ctx.poll_aio_handlers.slice()) {
      if (node.deleted) continue;
      const fn = started ? node.io_poll_begin : node.io_poll_end;
      if (fn !== null) fn(node.opaque);
      if (!started && (node.io_poll as AioPollFn)(node.opaque)) progress = true;
    }
  } finally {
    ctx.walking--;
    aio_free_deleted_handlers(ctx);
  }
  return progress;
}

/**
 * @internal QEMU's run_poll_handlers_once: each poll handler's io_poll; true if one found
 * work. `ctx.notified` plays the context notifier's io_poll: it ends polling, never progress.
 */
export function run_poll_handlers_once(ctx: AioContext): boolean {
  let progress = false;
  for (const node of ctx.poll_aio_handlers.slice()) {
    if (!node.deleted && aio_node_check(ctx, node.is_external) && (node.io_poll as AioPollFn)(node.opaque)) progress = true;
  }
  return progress;
}

fdReadyHook.ready = (ctx: AioContext) => {
  if (ctx.attached) notifyHooks.hostKick(ctx);
};
