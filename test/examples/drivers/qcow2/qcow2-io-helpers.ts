// Helpers for the qcow2 I/O-path tests (not a test file: the runner only runs *.test.ts).
// Real QEMU 7.2 tools make and verify the images; aioco reads and writes them; a plain byte
// array is the reference every image is compared with.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import {
  AIO_WAIT_WHILE,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  BDRV_REQ_MAY_UNMAP,
  BDRV_REQ_WRITE_COMPRESSED,
  QEMUIOVector,
  aio_co_enter,
  blk_co_pdiscard,
  blk_co_preadv,
  blk_co_pwrite_zeroes,
  blk_co_pwritev,
  blk_flush,
  blk_get_aio_context,
  blk_new_open,
  blk_unref,
  qemu_coroutine_create,
  qemu_iovec_init_buf,
  type BlockBackend,
  type CoroutineFn,
} from '../../../../src/index.ts';
import '../../../../examples/drivers/file.ts';
import '../../../../examples/drivers/raw.ts';
import '../../../../examples/drivers/qcow2/qcow2.ts';

export const QEMU_IMG = '/usr/bin/qemu-img';
export const QEMU_IO = '/usr/bin/qemu-io';
/** Why interop tests are skipped, or null when the QEMU tools are there. */
export const skipReason: string | null =
  existsSync(QEMU_IMG) && existsSync(QEMU_IO) ? null : `skipped: ${QEMU_IMG} or ${QEMU_IO} is missing`;

export interface Run {
  status: number;
  stdout: string;
  stderr: string;
}

/** Runs a program (bounded to 60 s) and returns its exit status and output. */
export function run(cmd: string, args: string[]): Run {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}
export const qemu_img = (...args: string[]): Run => run(QEMU_IMG, args);
export const qemu_io = (...args: string[]): Run => run(QEMU_IO, args);

/** A temporary directory under os.tmpdir(), removed by `cleanup`. */
export function tmp(): { dir: string; file: (n: string) => string; cleanup: () => void } {
  const dir = mkdtempSync(path.join(tmpdir(), 'aioco-qcow2-io-'));
  return { dir, file: (n) => path.join(dir, n), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export { prng } from '../../../helpers/prng.ts';

export type Op =
  | { kind: 'write'; offset: number; bytes: number; pattern: number; constant?: boolean }
  | { kind: 'zero'; offset: number; bytes: number; flags: number }
  | { kind: 'discard'; offset: number; bytes: number }
  | { kind: 'compressed'; offset: number; bytes: number; pattern: number };

function fill(len: number, pattern: number, offset: number): Uint8Array {
  // Position-dependent bytes, so misplaced data is caught, not just wrong patterns.
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (pattern + ((offset + i) >> 9)) & 0xff;
  return b;
}

/** The data a write op puts at its range. */
export function op_data(op: Op): Uint8Array {
  if (op.kind === 'write' && op.constant) return new Uint8Array(op.bytes).fill(op.pattern);
  return 'pattern' in op ? fill(op.bytes, op.pattern, op.offset) : new Uint8Array(op.bytes);
}

function* co_op({ blk, op, res }: { blk: BlockBackend; op: Op; res: { ret: number | null } }): CoroutineFn<void> {
  const q = new QEMUIOVector();
  switch (op.kind) {
    case 'write':
    case 'compressed':
      qemu_iovec_init_buf(q, op_data(op), op.bytes);
      res.ret = yield* blk_co_pwritev(blk, op.offset, op.bytes, q, op.kind === 'compressed' ? BDRV_REQ_WRITE_COMPRESSED : 0);
      break;
    case 'zero':
      res.ret = yield* blk_co_pwrite_zeroes(blk, op.offset, op.bytes, op.flags);
      break;
    case 'discard':
      res.ret = yield* blk_co_pdiscard(blk, op.offset, op.bytes);
      break;
  }
}

/** Runs `ops` concurrently (each in its own coroutine) and returns their results in order. */
export function run_concurrently(blk: BlockBackend, ops: Op[]): number[] {
  const ctx = blk_get_aio_context(blk);
  const res = ops.map(() => ({ ret: null as number | null }));
  ops.forEach((op, i) => aio_co_enter(ctx, qemu_coroutine_create(co_op, { blk, op, res: res[i] })));
  AIO_WAIT_WHILE(ctx, () => res.some((r) => r.ret === null));
  return res.map((r) => r.ret!);
}

/** Reads `bytes` at `offset` through aioco. */
export function aioco_read(blk: BlockBackend, offset: number, bytes: number): { ret: number; buf: Uint8Array } {
  const buf = new Uint8Array(bytes);
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf, bytes);
  const st = { ret: null as number | null };
  const ctx = blk_get_aio_context(blk);
  aio_co_enter(
    ctx,
    qemu_coroutine_create(function* () {
      st.ret = yield* blk_co_preadv(blk, offset, bytes, q, 0);
    }),
  );
  AIO_WAIT_WHILE(ctx, () => st.ret === null);
  return { ret: st.ret!, buf };
}

/** Applies an op to the reference bytes (what the guest must read afterwards). */
export function apply_ref(ref: Uint8Array, op: Op): void {
  if (op.kind === 'discard') return; // callers decide whether a discard zeroes
  ref.set(op_data(op), op.offset);
}

/** First differing byte of two arrays, or -1. */
export function first_diff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Opens read-write with discard=unmap (discards and MAY_UNMAP reach the driver). */
export function open_rw(file: string, options: Record<string, unknown> = {}): BlockBackend {
  return blk_new_open(file, null, { driver: 'qcow2', ...options }, BDRV_O_RDWR | BDRV_O_UNMAP);
}
export function open_ro(file: string, options: Record<string, unknown> = {}): BlockBackend {
  return blk_new_open(file, null, { driver: 'qcow2', ...options }, 0);
}

export { blk_flush, blk_unref, readFileSync, writeFileSync, BDRV_REQ_MAY_UNMAP };
