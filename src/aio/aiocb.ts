/**
 * Refcounted asynchronous I/O control blocks. QEMU: include/block/aio.h, util/aiocb.c.
 * They live in src/aio (QEMU's util/) because the thread pool returns them; cancellation
 * (`bdrv_aio_cancel*`, block/io.c) is in src/block/aiocb.ts.
 *
 * Past QEMU: an AIOCB whose last reference is gone is poisoned, and every use of it
 * throws, naming its AIOCBInfo, where QEMU would read or write freed memory.
 */
import type { AioContext } from './aio-context.ts';
import { QemuError } from './error.ts';

/** QEMU's `BlockCompletionFunc`: `ret` is 0 or positive on success, -errno on failure. */
export type BlockCompletionFunc = (opaque: any, ret: number) => void;

/** QEMU's `AIOCBInfo`, the operations of one kind of AIOCB. */
export interface AIOCBInfo<T extends BlockAIOCB = BlockAIOCB> {
  /** Best-effort cancel; the completion callback must still run exactly once. */
  cancel_async?(acb: T): void;
  /** The context whose loop completes the request (bdrv_aio_cancel polls it). */
  get_aio_context?(acb: T): AioContext;
  /** C's allocation size; ignored (kept for ported code). */
  aiocb_size?: number;
  /** A driver's own AIOCB class, created by qemu_aio_get in place of BlockAIOCB. */
  aiocb_class?: new () => T;
  /** For messages (use after free); aioco's own. */
  name?: string;
}

let live = 0;

function infoName(info: AIOCBInfo<any>): string {
  return info.name ?? info.aiocb_class?.name ?? 'anonymous AIOCBInfo';
}

/**
 * QEMU's `BlockAIOCB`. Made by `qemu_aio_get` with one reference, owned by the
 * implementation, which calls `cb(opaque, ret)` once and then `qemu_aio_unref`.
 * Surprise: after the last unref every field access throws (QEMU: use after free).
 */
export class BlockAIOCB {
  /** @internal */ _info: AIOCBInfo<any> | null = null;
  /** @internal */ _bs: object | null = null;
  /** @internal */ _cb: BlockCompletionFunc | null = null;
  /** @internal */ _opaque: unknown = undefined;
  /** @internal 0 once freed. */ _refcnt = 0;

  /** @internal */
  _check(): void {
    if (this._refcnt <= 0) {
      throw new QemuError(
        `BlockAIOCB used after it was freed (AIOCBInfo '${this._info ? infoName(this._info) : 'unknown'}')`,
      );
    }
  }
  get aiocb_info(): AIOCBInfo<any> {
    this._check();
    return this._info as AIOCBInfo<any>;
  }
  get bs(): object | null {
    this._check();
    return this._bs;
  }
  set bs(v: object | null) {
    this._check();
    this._bs = v;
  }
  get cb(): BlockCompletionFunc | null {
    this._check();
    return this._cb;
  }
  set cb(v: BlockCompletionFunc | null) {
    this._check();
    this._cb = v;
  }
  get opaque(): any {
    this._check();
    return this._opaque;
  }
  set opaque(v: any) {
    this._check();
    this._opaque = v;
  }
  get refcnt(): number {
    this._check();
    return this._refcnt;
  }
}

/**
 * Allocates an AIOCB with one reference. QEMU: `qemu_aio_get`. `bs` may be null (the
 * thread pool's AIOCBs have none). With `info.aiocb_class` the result is that class.
 */
export function qemu_aio_get<T extends BlockAIOCB = BlockAIOCB>(
  info: AIOCBInfo<T>,
  bs: object | null,
  cb: BlockCompletionFunc | null,
  opaque?: unknown,
): T {
  const acb = (info.aiocb_class ? new info.aiocb_class() : new BlockAIOCB()) as T;
  acb._info = info;
  acb._bs = bs;
  acb._cb = cb;
  acb._opaque = opaque;
  acb._refcnt = 1;
  live++;
  return acb;
}

/** Takes a reference. QEMU: `qemu_aio_ref`. Throws on a freed AIOCB. */
export function qemu_aio_ref(acb: BlockAIOCB): void {
  acb._check();
  acb._refcnt++;
}

/**
 * Drops a reference; the last one frees the AIOCB. QEMU: `qemu_aio_unref`.
 * Surprise: after the last one, any use of the AIOCB throws.
 */
export function qemu_aio_unref(acb: BlockAIOCB): void {
  acb._check();
  if (--acb._refcnt === 0) {
    live--;
    acb._cb = null;
    acb._opaque = undefined;
  }
}

/** How many AIOCBs are allocated and not yet freed (aioco's own, for leak checks). */
export function qemu_aio_count_live(): number {
  return live;
}
