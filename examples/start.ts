/**
 * `npm start`: a short tour of the block layer that needs no arguments. It makes a scratch
 * raw image, runs a few qemu-io commands on it through aioco-io, then opens it in-process,
 * moves the disk to an IOThread and back, doing I/O in each context, and prints what
 * happened (which context ran each completion).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  AIO_WAIT_WHILE,
  BDRV_O_RDWR,
  QEMUIOVector,
  bdrv_try_change_aio_context,
  blk_aio_preadv,
  blk_aio_pwritev,
  blk_bs,
  blk_new_open,
  blk_unref,
  iothread_create,
  iothread_destroy,
  iothread_get_aio_context,
  qemu_blockalign,
  qemu_get_aio_context,
  qemu_get_current_aio_context,
  qemu_iovec_init_buf,
  qemu_vfree,
} from '../src/index.ts';
import './drivers/file.ts';
import './drivers/raw.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'aioco-start-'));
const img = join(dir, 'disk.raw');

try {
  writeFileSync(img, Buffer.alloc(1 << 20));
  console.log(`scratch image: ${img} (1 MiB, raw)\n`);

  const cmds = ['write -P 0xab 0 64k', 'read -P 0xab 0 64k', 'write -z 64k 64k', 'map', 'length'];
  console.log(`$ aioco-io -f raw ${cmds.map((c) => `-c '${c}'`).join(' ')} disk.raw`);
  const io = spawnSync(process.execPath, [join(root, 'bin/aioco-io.mjs'), '-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), img], {
    encoding: 'utf8',
  });
  process.stdout.write(io.stdout);
  process.stderr.write(io.stderr);

  console.log('\nin-process: blk_new_open, then the disk moves to an IOThread and back');
  const blk = blk_new_open(img, null, { driver: 'raw' }, BDRV_O_RDWR);
  const bs = blk_bs(blk);
  if (bs === null) throw new Error('no root node');
  const t = iothread_create('iothread0');
  const ioctx = iothread_get_aio_context(t);
  const buf = qemu_blockalign(bs, 4096);
  const qiov = new QEMUIOVector();
  qemu_iovec_init_buf(qiov, buf, 4096);

  const run = (what: string, submit: (cb: (o: unknown, ret: number) => void) => void) => {
    let done = false;
    submit((_o, ret) => {
      console.log(`  ${what}: ret ${ret}, callback ran in context '${qemu_get_current_aio_context().name}'`);
      done = true;
    });
    AIO_WAIT_WHILE(null, () => !done);
  };

  buf.fill(0xcd);
  run('write 4 KiB at 128 KiB (main)', (cb) => blk_aio_pwritev(blk, 128 << 10, qiov, 0, cb));
  console.log(`  bdrv_try_change_aio_context -> iothread0: ${bdrv_try_change_aio_context(bs, ioctx)}`);
  buf.fill(0);
  run('read 4 KiB at 128 KiB (iothread0)', (cb) => blk_aio_preadv(blk, 128 << 10, qiov, 0, cb));
  console.log(`  read back 0x${buf[0]?.toString(16)} ... 0x${buf[4095]?.toString(16)}`);
  console.log(`  bdrv_try_change_aio_context -> main: ${bdrv_try_change_aio_context(bs, qemu_get_aio_context())}`);
  run('read 4 KiB at 0 (main)', (cb) => blk_aio_preadv(blk, 0, qiov, 0, cb));
  console.log(`  read back 0x${buf[0]?.toString(16)} (written by aioco-io above)`);

  qemu_vfree(buf);
  blk_unref(blk);
  iothread_destroy(t);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
