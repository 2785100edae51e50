/**
 * Linux errno values and glibc's `strerror` texts. I/O paths return `-errno`, as QEMU does.
 */
export const EPERM = 1;
export const ENOENT = 2;
export const EIO = 5;
export const E2BIG = 7;
export const EBADF = 9;
export const EAGAIN = 11;
export const ENOMEM = 12;
export const EACCES = 13;
export const EBUSY = 16;
export const EEXIST = 17;
export const EINVAL = 22;
export const EFBIG = 27;
export const ENOSPC = 28;
export const EROFS = 30;
export const ENOTSUP = 95;
export const ENOMEDIUM = 123;
export const ECANCELED = 125;
export const EINPROGRESS = 115;
export const ETIMEDOUT = 110;
export const ESHUTDOWN = 108;

const messages: Record<number, string> = {
  0: 'Success',
  [EPERM]: 'Operation not permitted',
  [ENOENT]: 'No such file or directory',
  [EIO]: 'Input/output error',
  [E2BIG]: 'Argument list too long',
  [EBADF]: 'Bad file descriptor',
  [EAGAIN]: 'Resource temporarily unavailable',
  [ENOMEM]: 'Cannot allocate memory',
  [EACCES]: 'Permission denied',
  [EBUSY]: 'Device or resource busy',
  [EEXIST]: 'File exists',
  [EINVAL]: 'Invalid argument',
  [EFBIG]: 'File too large',
  [ENOSPC]: 'No space left on device',
  [EROFS]: 'Read-only file system',
  [ENOTSUP]: 'Operation not supported',
  [ENOMEDIUM]: 'No medium found',
  [ECANCELED]: 'Operation canceled',
  [EINPROGRESS]: 'Operation now in progress',
  [ETIMEDOUT]: 'Connection timed out',
  [ESHUTDOWN]: 'Cannot send after transport endpoint shutdown',
};

/**
 * glibc's message for `errnum`. Surprise: QEMU passes positive values (`strerror(-ret)`);
 * a negative argument is accepted here too and means the same errno.
 */
export function strerror(errnum: number): string {
  const n = Math.abs(errnum);
  return messages[n] ?? `Unknown error ${n}`;
}
