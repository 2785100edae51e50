/**
 * Errors that QEMU reports through `Error **errp`, and aioco's report of a wait that
 * could never end.
 */

/** What QEMU reports through `Error **errp`: the message is QEMU's. */
export class QemuError extends Error {
  override name = 'QemuError';
}

/**
 * A blocking wait (`aio_poll(ctx, true)`, `AIO_WAIT_WHILE`, ...) that nothing could ever
 * end: no BH, no timer on a running clock, no outstanding request in any context it
 * drives. QEMU would hang in ppoll; aioco throws and says why.
 */
export class AioWaitError extends Error {
  override name = 'AioWaitError';
}
