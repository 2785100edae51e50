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

/** The program name `error_report` and `warn_report` put first; QEMU: `error_init(argv[0])`. */
let progname = '';

/**
 * Sets the name messages are prefixed with (`qemu-img`, `qemu-io`). QEMU: `error_init` /
 * `g_set_prgname`. Tools that imitate QEMU's set QEMU's name, so messages from drivers come out
 * as QEMU's tools print them. Surprise: unset, messages have no prefix at all.
 */
export function error_set_progname(name: string): void {
  progname = name;
}

/** The name set by `error_set_progname` ('' if none). QEMU: `error_get_progname`. */
export function error_get_progname(): string {
  return progname;
}

/**
 * Prints `<progname>: <msg>` and a newline on stderr. QEMU: `error_report`, for errors that go to
 * the user rather than through `Error **errp` (a driver's warnings during open, for example).
 */
export function error_report(msg: string): void {
  process.stderr.write(`${progname ? `${progname}: ` : ''}${msg}\n`);
}

/** Prints `<progname>: warning: <msg>` and a newline on stderr. QEMU: `warn_report`. */
export function warn_report(msg: string): void {
  error_report(`warning: ${msg}`);
}
