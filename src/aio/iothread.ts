/**
 * IOThreads: named contexts with their own BHs, timers, handlers, polling parameters and
 * thread pool. QEMU: iothread.c. On the one JS thread an IOThread is a context attached
 * to Node's loop that every blocking wait also drives, as its own thread would.
 */
import type { AioContext } from './aio-context.ts';
import { aio_context_new, aio_context_set_poll_params, aio_context_unref, drivenContexts } from './aio-context.ts';
import { QemuError } from './error.ts';
import { aio_get_g_source } from './g-source.ts';

/** Polling parameters of an IOThread (QEMU's object properties). */
export interface IOThreadOptions {
  /** Maximum busy-poll time in ns; QEMU's default on POSIX is 32768. 0 disables polling. */
  poll_max_ns?: number;
  /** Growth factor of poll_ns; 0 means x2. */
  poll_grow?: number;
  /** Shrink divisor of poll_ns; 0 means reset to 0. */
  poll_shrink?: number;
}

/** QEMU's `IOThread`. */
export class IOThread {
  /** @internal */ ctx: AioContext;
  constructor(readonly id: string, ctx: AioContext) {
    this.ctx = ctx;
  }
}

const iothreads = new Map<string, IOThread>();

/**
 * Creates IOThread `id` with its own context, attached to Node's loop. QEMU: `object-add
 * iothread` (iothread_create). Poll defaults are QEMU's: max 32768 ns, grow 0, shrink 0.
 * Throws `QemuError` for a duplicate id or a negative parameter.
 */
export function iothread_create(id: string, opts: IOThreadOptions = {}): IOThread {
  if (iothreads.has(id)) throw new QemuError(`Duplicate ID '${id}' for object`);
  const ctx = aio_context_new();
  ctx.name = id;
  try {
    aio_context_set_poll_params(ctx, opts.poll_max_ns ?? 32768, opts.poll_grow ?? 0, opts.poll_shrink ?? 0);
  } catch (e) {
    aio_context_unref(ctx);
    throw e;
  }
  ctx.isIOThread = true;
  drivenContexts.add(ctx);
  const t = new IOThread(id, ctx);
  iothreads.set(id, t);
  aio_get_g_source(ctx).attach();
  return t;
}

/** The IOThread's context. QEMU: `iothread_get_aio_context`. */
export function iothread_get_aio_context(t: IOThread): AioContext {
  return t.ctx;
}

/**
 * Stops IOThread `t` and drops its context. QEMU: `iothread_destroy`. Surprise: its
 * context is finalized with QEMU's checks, so a BH still scheduled, a coroutine still
 * scheduled or a timer still armed there throws (naming it) and the IOThread stays.
 */
export function iothread_destroy(t: IOThread): void {
  if (iothreads.get(t.id) !== t) throw new QemuError(`iothread_destroy: IOThread '${t.id}' does not exist`);
  const ctx = t.ctx;
  // Finalize checks come first, so a refused destroy leaves the IOThread running.
  aio_context_unref(ctx);
  iothreads.delete(t.id);
  ctx.isIOThread = false;
  drivenContexts.delete(ctx);
  aio_get_g_source(ctx).destroy();
}
