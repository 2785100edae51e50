/**
 * Image creation through a driver's `bdrv_co_create_opts`. QEMU: `bdrv_create`,
 * `bdrv_co_create_file` (block.c); qemu-img create and drivers creating their file child use them.
 */
import { strerror } from '../aio/errno.ts';
import { QemuError } from '../aio/error.ts';
import type { CoroutineFn } from '../coroutine/coroutine.ts';
import { bdrv_find_protocol, type BlockDriver } from './block-driver.ts';
import { bdrv_poll_co } from './co-wrapper.ts';
import { QemuOpts, qemu_opt_set, qemu_opts_create } from './qemu-opts.ts';

/**
 * Creates an image of format `drv` at `filename`, in a coroutine. QEMU: `bdrv_co_create` /
 * the body of `bdrv_create`. Throws QemuError: "Driver 'x' does not support image creation",
 * the driver's own message, or "Could not create image: <strerror>" when the driver returned
 * -errno without one. Returns 0.
 */
export function* bdrv_co_create(drv: BlockDriver, filename: string, opts: QemuOpts): CoroutineFn<number> {
  if (!drv.bdrv_co_create_opts) {
    throw new QemuError(`Driver '${drv.format_name}' does not support image creation`);
  }
  const ret = yield* drv.bdrv_co_create_opts(drv, filename, opts);
  if (ret < 0) throw new QemuError(`Could not create image: ${strerror(-ret)}`);
  return 0;
}

/**
 * Synchronous `bdrv_co_create`, driving the main loop. QEMU: `bdrv_create`. Surprise: `opts`
 * is consumed: options the driver read are deleted from it, as `qemu_opt_get_*_del` does.
 */
export function bdrv_create(drv: BlockDriver, filename: string, opts: QemuOpts): number {
  return bdrv_poll_co(null, 'bdrv_create', () => bdrv_co_create(drv, filename, opts));
}

/**
 * Creates the protocol-level file for `filename` (a host file, or `prefix:` for another
 * protocol) with the options still set in `opts`. QEMU: `bdrv_co_create_file`, which format
 * drivers call after taking their own options out with the `_del` getters. Throws QemuError
 * ("Unknown protocol 'x'", "Driver 'x' does not support image creation", "Invalid parameter
 * 'y'", the protocol driver's own).
 * Surprise, as in QEMU: only options that were set are passed (the protocol sees its own
 * defaults, not the format's), each with its last value, and one the protocol does not describe
 * is refused, so a format driver must consume every option of its own.
 */
export function* bdrv_co_create_file(filename: string, opts: QemuOpts): CoroutineFn<number> {
  const drv = bdrv_find_protocol(filename, true);
  if (!drv) throw new QemuError(`Could not create '${filename}': no protocol driver`);
  if (!drv.create_opts) {
    throw new QemuError(`Driver '${drv.format_name}' does not support image creation`);
  }
  // QEMU goes through a QDict: one entry per name, the last value, in first-set order.
  const last = new Map<string, string>();
  for (const o of opts.opts) last.set(o.name, o.str);
  const protocol_opts = qemu_opts_create(drv.create_opts);
  for (const [name, value] of last) qemu_opt_set(protocol_opts, name, value);
  return yield* bdrv_co_create(drv, filename, protocol_opts);
}
