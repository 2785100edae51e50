/**
 * blkdebug (examples/drivers/blkdebug.ts): filename and option parsing, the config file format,
 * the rule state machine of qemu-block.md 3.2, rule_check (sector, iotype, once, immediately) and
 * the limit overrides, observed through a BlockBackend over an in-memory child.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { fileURLToPath } from 'node:url';
import {
  aio_bh_schedule_oneshot,
  aio_poll,
  AIO_WAIT_WHILE,
  bdrv_co_block_status,
  bdrv_co_preadv,
  bdrv_co_pwritev,
  bdrv_co_debug_event,
  bdrv_debug_breakpoint,
  bdrv_debug_event,
  bdrv_debug_is_suspended,
  bdrv_debug_remove_breakpoint,
  bdrv_debug_resume,
  bdrv_open_child,
  bdrv_register,
  blk_bs,
  blk_co_flush,
  blk_co_preadv,
  blk_co_pwritev,
  blk_flush,
  blk_new_open,
  blk_pdiscard,
  blk_pread,
  blk_pwrite,
  blk_pwrite_zeroes,
  blk_unref,
  qemu_coroutine_create,
  qemu_coroutine_enter,
  qemu_get_aio_context,
  qemu_iovec_init_buf,
  strerror,
  BDRV_BLOCK_ALLOCATED,
  BDRV_BLOCK_DATA,
  BDRV_BLOCK_EOF,
  BDRV_BLOCK_OFFSET_VALID,
  BDRV_BLOCK_RAW,
  BDRV_CHILD_IMAGE,
  BDRV_O_RDWR,
  BDRV_O_UNMAP,
  EIO,
  ENOENT,
  ENOSPC,
  ENOTSUP,
  QEMUIOVector,
  QemuError,
  type BlockBackend,
  type BlockDriver,
  type BlockDriverState,
  type BlockStatusOut,
  type CoroutineFn,
} from '../../../src/index.ts';
import { bdrv_blkdebug, bdrv_blkdebug_init, blkdebug_get_state, BLKDEBUG_EVENTS } from '../../../examples/drivers/blkdebug.ts';
import { startCo, type CoResult } from '../../helpers/mem-driver.ts';
import { throwsCo } from '../../helpers/assert.ts';

const fixture = (name: string): string => fileURLToPath(new URL(`./fixtures/blkdebug-${name}.conf`, import.meta.url));

/** In-memory protocol child: 256 KiB, logs every request it receives. */
interface MemState {
  data: Uint8Array;
  log: string[];
}
const MEM_SIZE = 256 * 1024;
const mem: BlockDriver = {
  format_name: 'mem',
  protocol_name: 'mem',
  runtime_opts: ['filename'],
  bdrv_parse_filename(filename, options) {
    options['filename'] = filename;
  },
  bdrv_file_open(bs) {
    bs.opaque = { data: new Uint8Array(MEM_SIZE), log: [] } satisfies MemState;
  },
  bdrv_getlength(bs) {
    return (bs.opaque as MemState).data.length;
  },
  *bdrv_co_preadv(bs, offset, bytes, qiov) {
    const s = bs.opaque as MemState;
    s.log.push(`read ${offset} ${bytes}`);
    let pos = offset;
    for (let i = 0; i < qiov.niov; i++) {
      const e = qiov.iov[i]!;
      e.set(s.data.subarray(pos, pos + e.length));
      pos += e.length;
    }
    return 0;
  },
  *bdrv_co_pwritev(bs, offset, bytes, qiov) {
    const s = bs.opaque as MemState;
    s.log.push(`write ${offset} ${bytes}`);
    let pos = offset;
    for (let i = 0; i < qiov.niov; i++) {
      s.data.set(qiov.iov[i]!, pos);
      pos += qiov.iov[i]!.length;
    }
    return 0;
  },
  *bdrv_co_pwrite_zeroes(bs, offset, bytes) {
    const s = bs.opaque as MemState;
    s.log.push(`zero ${offset} ${bytes}`);
    s.data.fill(0, offset, offset + bytes);
    return 0;
  },
  *bdrv_co_pdiscard(bs, offset, bytes) {
    (bs.opaque as MemState).log.push(`discard ${offset} ${bytes}`);
    return 0;
  },
  *bdrv_co_flush_to_disk(bs) {
    (bs.opaque as MemState).log.push('flush');
    return 0;
  },
};

/**
 * A minimal format driver over `file` that announces guest I/O to its child the way qcow2 does
 * (`BLKDBG_EVENT(bs->file, BLKDBG_READ_AIO / WRITE_AIO)`) before forwarding it.
 */
const evfmt: BlockDriver = {
  format_name: 'evfmt',
  bdrv_open(bs, options) {
    bdrv_open_child(null, options, 'file', bs, BDRV_CHILD_IMAGE, false);
    bs.opaque = {};
  },
  bdrv_getlength(bs) {
    return bs.file!.bs.total_sectors * 512;
  },
  *bdrv_co_preadv(bs, offset, bytes, qiov, flags) {
    yield* bdrv_co_debug_event(bs.file!.bs, 'read_aio');
    return yield* bdrv_co_preadv(bs.file!, offset, bytes, qiov, flags);
  },
  *bdrv_co_pwritev(bs, offset, bytes, qiov, flags) {
    yield* bdrv_co_debug_event(bs.file!.bs, 'write_aio');
    return yield* bdrv_co_pwritev(bs.file!, offset, bytes, qiov, flags);
  },
};

bdrv_register(mem);
bdrv_register(evfmt);
bdrv_blkdebug_init();

/** The blkdebug node under `blk` (the root, or the format's file). */
function blkdebugOf(blk: BlockBackend): BlockDriverState {
  const root = blk_bs(blk)!;
  return root.drv === bdrv_blkdebug ? root : root.file!.bs;
}
function memOf(blk: BlockBackend): MemState {
  return blkdebugOf(blk).file!.bs.opaque as MemState;
}

/** Opens blkdebug over `mem:x` with the given blkdebug options. */
function openBd(opts: Record<string, unknown>, flags = BDRV_O_RDWR): BlockBackend {
  return blk_new_open(null, null, { driver: 'blkdebug', 'image.driver': 'mem', 'image.filename': 'x', ...opts }, flags);
}

function openError(fn: () => unknown): string {
  try {
    const r = fn();
    if (r && typeof r === 'object' && 'root' in (r as object)) blk_unref(r as BlockBackend);
  } catch (e) {
    if (e instanceof QemuError) return e.message;
    throw e;
  }
  return '(opened)';
}

const buf = (n: number, fill = 0): Uint8Array => new Uint8Array(n).fill(fill);

/** Runs a coroutine_fn to completion on the main context and returns its result. */
function run<T>(fn: () => CoroutineFn<T>): T {
  const st: { done: boolean; v?: T } = { done: false };
  const co = qemu_coroutine_create(function* () {
    st.v = yield* fn();
    st.done = true;
  });
  qemu_coroutine_enter(co);
  AIO_WAIT_WHILE(qemu_get_aio_context(), () => !st.done);
  return st.v as T;
}

// ---------------------------------------------------------------------------------------------
// Filename syntax and options

test('filename blkdebug::IMAGE opens the image as child "image", primary child = bs.file (3.2)', () => {
  const blk = blk_new_open('blkdebug::mem:x', null, {}, BDRV_O_RDWR);
  const bs = blk_bs(blk)!;
  assert.is(bs.drv, bdrv_blkdebug);
  assert.equal(
    bs.children.map((c) => c.name),
    ['image'],
  );
  assert.is(bs.file, bs.children[0]);
  assert.is(bs.file!.bs.drv, mem);
  assert.is(blkdebug_get_state(bs), 1);
  assert.is(blk_pwrite(blk, 0, 512, buf(512, 7), 0), 0);
  assert.equal(memOf(blk).log, ['write 0 512']);
  blk_unref(blk);
});

test('filename without the second colon is refused (3.2)', () => {
  assert.is(
    openError(() => blk_new_open('blkdebug:nocolon', null, {}, BDRV_O_RDWR)),
    'blkdebug requires both config file and image path',
  );
});

test('a missing config file is refused with the errno text (3.2)', () => {
  assert.is(
    openError(() => blk_new_open('blkdebug:/nonexistent/bd.conf:mem:x', null, {}, BDRV_O_RDWR)),
    `Could not read blkdebug config file: ${strerror(2)}`,
  );
});

test('unknown blkdebug option is refused by the block layer', () => {
  assert.is(openError(() => openBd({ bogus: '1' })), "Block protocol 'blkdebug' doesn't support the option 'bogus'");
});

test('the 7.2 event list has 48 names ending with none', () => {
  assert.is(BLKDEBUG_EVENTS.length, 48);
  assert.is(BLKDEBUG_EVENTS[BLKDEBUG_EVENTS.length - 1], 'none');
  assert.ok(BLKDEBUG_EVENTS.includes('l1_grow_alloc_table'));
  assert.ok(BLKDEBUG_EVENTS.includes('pwritev_rmw_after_tail'));
});

// ---------------------------------------------------------------------------------------------
// Rule parsing errors

test('rule without event: "Missing event name for rule" (3.2)', () => {
  assert.is(openError(() => openBd({ 'inject-error.0.errno': '5' })), 'Missing event name for rule');
  assert.is(openError(() => openBd({ 'set-state.0.new_state': '2' })), 'Missing event name for rule');
});

test('unknown event, iotype, bad errno/once/state values', () => {
  assert.is(openError(() => openBd({ 'inject-error.0.event': 'read' })), "Invalid parameter 'read'");
  // 5.2's dotted names are not 7.2 names.
  assert.is(openError(() => openBd({ 'inject-error.0.event': 'l1_grow.alloc_table' })), "Invalid parameter 'l1_grow.alloc_table'");
  assert.is(
    openError(() => openBd({ 'inject-error.0.event': 'none', 'inject-error.0.iotype': 'reads' })),
    "Invalid parameter 'reads'",
  );
  assert.is(
    openError(() => openBd({ 'inject-error.0.event': 'none', 'inject-error.0.errno': 'EIO' })),
    "Parameter 'errno' expects a number",
  );
  assert.is(
    openError(() => openBd({ 'inject-error.0.event': 'none', 'inject-error.0.once': 'maybe' })),
    "Parameter 'once' expects 'on' or 'off'",
  );
  assert.is(
    openError(() => openBd({ 'set-state.0.event': 'none', 'set-state.0.state': '1x' })),
    "Parameter 'state' expects a number",
  );
  assert.is(
    openError(() => openBd({ 'inject-error.0.event': 'none', 'inject-error.0.foo': '1' })),
    "[inject-error] section doesn't support the option 'foo'",
  );
  assert.is(
    openError(() => openBd({ 'set-state.0.event': 'none', 'set-state.0.errno': '1' })),
    "[set-state] section doesn't support the option 'errno'",
  );
});

test('config file errors: unknown group, blank-space line, key before any group, unknown key, bad number', () => {
  const open = (name: string) => openError(() => blk_new_open(`blkdebug:${fixture(name)}:mem:x`, null, {}, BDRV_O_RDWR));
  assert.is(open('bad-group'), "There is no option group 'drive'");
  assert.is(open('blank-line'), 'parse error');
  assert.is(open('no-group'), 'no group defined');
  assert.is(open('bad-key'), "Invalid parameter 'errnum'");
  assert.is(open('bad-number'), "Parameter 'new_state' expects a number");
});

// ---------------------------------------------------------------------------------------------
// The captured scenario of qemu-block.md 3.2, through blk_pread/blk_pwrite return values

function capturedScenario(blk: BlockBackend): void {
  const bd = blkdebugOf(blk);
  const m = memOf(blk);
  const got: number[] = [];
  got.push(blk_pwrite(blk, 0, 65536, buf(65536, 0x11), 0));
  assert.is(blkdebug_get_state(bd), 2, 'first write_aio only switches the state 1 -> 2');
  const r = buf(4096, 0xff);
  got.push(blk_pread(blk, 0, 4096, r, 0));
  got.push(blk_pread(blk, 0, 4096, r, 0));
  assert.equal(r, buf(4096, 0x11));
  got.push(blk_pwrite(blk, 0, 4096, buf(4096, 0x22), 0));
  got.push(blk_pwrite(blk, 65536, 4096, buf(4096, 0x22), 0));
  got.push(blk_pwrite(blk, 131072, 4096, buf(4096, 0x22), 0));
  assert.equal(got, [0, -ENOSPC, 0, -EIO, -EIO, -EIO]);
  assert.is(strerror(-got[1]!), 'No space left on device');
  // Only the first write and the second read reached the image.
  assert.equal(m.log, ['write 0 65536', 'read 0 4096']);
  // The EIO rule stays active and also breaks the flush (qemu-io's flush at close).
  assert.is(blk_flush(blk), -EIO);
  assert.equal(m.log, ['write 0 65536', 'read 0 4096']);
}

test('captured run from the config file: 0, ENOSPC once, 0, then EIO for every write and the flush (3.2)', () => {
  const blk = blk_new_open(`blkdebug:${fixture('captured')}:mem:x`, null, { driver: 'evfmt' }, BDRV_O_RDWR);
  assert.is(blk_bs(blk)!.drv, evfmt);
  capturedScenario(blk);
  blk_unref(blk);
});

test('captured run from options (numbers and booleans as JSON would give them) (3.2)', () => {
  const blk = blk_new_open(
    null,
    null,
    {
      driver: 'evfmt',
      'file.driver': 'blkdebug',
      'file.image.driver': 'mem',
      'file.image.filename': 'x',
      'file.inject-error.0.event': 'read_aio',
      'file.inject-error.0.errno': 28,
      'file.inject-error.0.once': true,
      'file.inject-error.1.event': 'write_aio',
      'file.inject-error.1.state': 2,
      'file.set-state.0.event': 'write_aio',
      'file.set-state.0.state': '1',
      'file.set-state.0.new_state': '2',
    },
    BDRV_O_RDWR,
  );
  capturedScenario(blk);
  blk_unref(blk);
});

// ---------------------------------------------------------------------------------------------
// State machine details

test('set-state rules see the old state: a 1->2 and a 2->3 rule on one event advance one step per event (3.2 rule 1)', () => {
  const blk = openBd({
    'set-state.0.event': 'l2_load',
    'set-state.0.state': 1,
    'set-state.0.new_state': 2,
    'set-state.1.event': 'l2_load',
    'set-state.1.state': 2,
    'set-state.1.new_state': 3,
  });
  const bd = blkdebugOf(blk);
  const seen: number[] = [blkdebug_get_state(bd)];
  for (let i = 0; i < 3; i++) {
    bdrv_debug_event(bd, 'l2_load');
    seen.push(blkdebug_get_state(bd));
  }
  bdrv_debug_event(bd, 'l2_update');
  seen.push(blkdebug_get_state(bd));
  assert.equal(seen, [1, 2, 3, 3, 3]);
  blk_unref(blk);

  // Declared the other way round, the 1->2 rule is processed first: still one step per event.
  const blk2 = openBd({
    'set-state.0.event': 'l2_load',
    'set-state.0.state': 2,
    'set-state.0.new_state': 3,
    'set-state.1.event': 'l2_load',
    'set-state.1.state': 1,
    'set-state.1.new_state': 2,
  });
  const bd2 = blkdebugOf(blk2);
  bdrv_debug_event(bd2, 'l2_load');
  assert.is(blkdebug_get_state(bd2), 2);
  blk_unref(blk2);
});

test('several matching set-state rules: rules are inserted at the head, so the first declared is processed last and wins', () => {
  const blk = openBd({
    'set-state.0.event': 'cow_read',
    'set-state.0.new_state': 5,
    'set-state.1.event': 'cow_read',
    'set-state.1.new_state': 7,
  });
  const bd = blkdebugOf(blk);
  bdrv_debug_event(bd, 'cow_read');
  assert.is(blkdebug_get_state(bd), 5);
  blk_unref(blk);
});

test('an event matching inject rules replaces the active list; an event matching none keeps it (3.2 rule 1)', () => {
  const blk = openBd({
    'inject-error.0.event': 'l2_load',
    'inject-error.0.errno': 28,
    'inject-error.0.immediately': 'on',
    'inject-error.1.event': 'l2_update',
    'inject-error.1.errno': 27,
    'inject-error.1.immediately': 'on',
  });
  const bd = blkdebugOf(blk);
  const r = buf(512);
  const got: number[] = [blk_pread(blk, 0, 512, r, 0)];
  bdrv_debug_event(bd, 'l2_load');
  got.push(blk_pread(blk, 0, 512, r, 0));
  bdrv_debug_event(bd, 'cluster_free');
  got.push(blk_pread(blk, 0, 512, r, 0));
  bdrv_debug_event(bd, 'l2_update');
  got.push(blk_pread(blk, 0, 512, r, 0));
  got.push(blk_pread(blk, 0, 512, r, 0));
  assert.equal(got, [0, -ENOSPC, -ENOSPC, -27, -27]);
  assert.equal(memOf(blk).log, ['read 0 512']);
  blk_unref(blk);
});

test('rule state filter: an inject rule with state 2 is not armed while the state is 1', () => {
  const blk = openBd({
    'inject-error.0.event': 'l2_load',
    'inject-error.0.state': 2,
    'inject-error.0.immediately': true,
    'set-state.0.event': 'l2_load',
    'set-state.0.new_state': 2,
  });
  const bd = blkdebugOf(blk);
  const r = buf(512);
  bdrv_debug_event(bd, 'l2_load');
  const first = blk_pread(blk, 0, 512, r, 0);
  bdrv_debug_event(bd, 'l2_load');
  const second = blk_pread(blk, 0, 512, r, 0);
  assert.equal([first, second, blkdebug_get_state(bd)], [0, -EIO, 2]);
  blk_unref(blk);
});

// ---------------------------------------------------------------------------------------------
// rule_check: sector, iotype, once

test('event none fires at open: a sector rule fails only requests covering that sector (3.2 rule 2)', () => {
  const blk = openBd({
    'inject-error.0.event': 'none',
    'inject-error.0.iotype': 'read',
    'inject-error.0.sector': 8,
    'inject-error.0.immediately': 'on',
  });
  const r = buf(4096);
  const got = [
    blk_pread(blk, 0, 4096, r, 0),
    blk_pread(blk, 4096, 512, r, 0),
    blk_pread(blk, 2048, 4096, r, 0),
    blk_pread(blk, 4608, 512, r, 0),
    blk_pread(blk, 3584, 512, r, 0),
    blk_pwrite(blk, 4096, 512, r, 0),
  ];
  assert.equal(got, [0, -EIO, -EIO, 0, 0, 0]);
  assert.equal(memOf(blk).log, ['read 0 4096', 'read 4608 512', 'read 3584 512', 'write 4096 512']);
  blk_unref(blk);
});

test('3.2 open-time error: sector 0 read rule armed by none fails the first read with EIO', () => {
  const blk = openBd({
    'inject-error.0.event': 'none',
    'inject-error.0.iotype': 'read',
    'inject-error.0.sector': 0,
    'inject-error.0.immediately': 'on',
  });
  const r = buf(512);
  assert.equal([blk_pread(blk, 0, 512, r, 0), blk_pread(blk, 512, 512, r, 0)], [-EIO, 0]);
  blk_unref(blk);
});

test('iotype masks: default covers write/write-zeroes/discard/flush but not block-status (3.2)', () => {
  const blk = openBd({ 'inject-error.0.event': 'none', 'inject-error.0.immediately': 'on' }, BDRV_O_RDWR | BDRV_O_UNMAP);
  const bd = blkdebugOf(blk);
  const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
  const got = [
    blk_pwrite(blk, 0, 512, buf(512), 0),
    blk_pwrite_zeroes(blk, 0, 512, 0),
    blk_pdiscard(blk, 0, 512),
    run(() => bdrv_co_block_status(bd, true, 0, 4096, out)),
  ];
  const memBs = bd.file!.bs;
  // Block status is RAW passed through to the child: a protocol without the callback reports DATA.
  assert.equal(got, [-EIO, -EIO, -EIO, BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID]);
  assert.is(out.pnum, 4096);
  assert.is(out.file, memBs);
  assert.equal(memOf(blk).log, []);
  blk_unref(blk);
});

test('iotype block-status fails only block status; blkdebug itself reports RAW|OFFSET_VALID (3.2)', () => {
  const blk = openBd({ 'inject-error.0.event': 'none', 'inject-error.0.iotype': 'block-status', 'inject-error.0.immediately': 'on' });
  const bd = blkdebugOf(blk);
  const out: BlockStatusOut = { pnum: 0, map: 0, file: null };
  assert.is(run(() => bdrv_co_block_status(bd, true, 0, 4096, out)), -EIO);
  assert.is(blk_pread(blk, 0, 512, buf(512), 0), 0);
  blk_unref(blk);

  const blk2 = openBd({});
  const bd2 = blkdebugOf(blk2);
  const direct: BlockStatusOut = { pnum: 0, map: 0, file: null };
  const ret = run(() => bdrv_blkdebug.bdrv_co_block_status!(bd2, true, 8192, 4096, direct));
  assert.is(ret, BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID);
  assert.equal([direct.pnum, direct.map, direct.file === bd2.file!.bs], [4096, 8192, true]);
  const above: BlockStatusOut = { pnum: 0, map: 0, file: null };
  assert.is(run(() => bdrv_co_block_status(bd2, true, MEM_SIZE - 4096, 4096, above)), BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_EOF);
  blk_unref(blk2);
});

test('iotype write-zeroes / discard / flush each fail only their own kind of request', () => {
  const cases: Array<[string, number[]]> = [
    ['write-zeroes', [0, -EIO, 0, 0]],
    ['discard', [0, 0, -EIO, 0]],
    ['flush', [0, 0, 0, -EIO]],
    ['write', [-EIO, 0, 0, 0]],
  ];
  for (const [iotype, expected] of cases) {
    const blk = openBd(
      { 'inject-error.0.event': 'none', 'inject-error.0.iotype': iotype, 'inject-error.0.immediately': 'on' },
      BDRV_O_RDWR | BDRV_O_UNMAP,
    );
    // Make the flush reach blkdebug: something must have been written since the last flush.
    const got = [blk_pwrite(blk, 0, 512, buf(512), 0), blk_pwrite_zeroes(blk, 512, 512, 0), blk_pdiscard(blk, 1024, 512)];
    if (iotype === 'write') blk_pwrite(blk, 4096, 512, buf(512), 0);
    got.push(blk_flush(blk));
    assert.equal(got, expected, iotype);
    blk_unref(blk);
  }
});

test('once: the rule fires once and is removed, also from its event list (3.2 rule 2)', () => {
  const blk = openBd({
    'inject-error.0.event': 'read_aio',
    'inject-error.0.errno': 28,
    'inject-error.0.once': 'on',
    'inject-error.0.immediately': 'on',
  });
  const bd = blkdebugOf(blk);
  const r = buf(512);
  bdrv_debug_event(bd, 'read_aio');
  const got = [blk_pread(blk, 0, 512, r, 0), blk_pread(blk, 0, 512, r, 0)];
  bdrv_debug_event(bd, 'read_aio');
  got.push(blk_pread(blk, 0, 512, r, 0));
  assert.equal(got, [-ENOSPC, 0, 0]);
  blk_unref(blk);
});

test('errno 0 rule matches but lets the request through', () => {
  const blk = openBd({ 'inject-error.0.event': 'none', 'inject-error.0.errno': 0, 'inject-error.0.immediately': 'on' });
  assert.is(blk_pread(blk, 0, 512, buf(512), 0), 0);
  assert.equal(memOf(blk).log, ['read 0 512']);
  blk_unref(blk);
});

// ---------------------------------------------------------------------------------------------
// immediately

function submitOrder(immediately: string): { order: string[]; polls: number } {
  const blk = openBd({ 'inject-error.0.event': 'none', 'inject-error.0.immediately': immediately });
  const ctx = qemu_get_aio_context();
  const order: string[] = [];
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf(512), 512);
  let done = false;
  const co = qemu_coroutine_create(function* () {
    const ret = yield* blk_co_preadv(blk, 0, 512, q, 0);
    order.push(`ret ${ret}`);
    done = true;
  });
  qemu_coroutine_enter(co);
  order.push('submitted');
  aio_bh_schedule_oneshot(ctx, () => order.push('bh'));
  let polls = 0;
  while (!done || polls === 0) {
    aio_poll(ctx, false);
    polls++;
    if (polls > 10) break;
  }
  blk_unref(blk);
  return { order, polls };
}

test('immediately=on: the error is returned before the submitting call returns (3.2 rule 3)', () => {
  assert.equal(submitOrder('on'), { order: ['ret -5', 'submitted', 'bh'], polls: 1 });
});

test('immediately=off: the request is rescheduled once; a BH queued at submit runs first, the error one poll later at most (3.2 rule 3, S13)', () => {
  assert.equal(submitOrder('off'), { order: ['submitted', 'bh', 'ret -5'], polls: 1 });
});

// ---------------------------------------------------------------------------------------------
// Limits

test('align: the child sees requests padded to the alignment (RMW for an unaligned write) (3.2)', () => {
  const blk = openBd({ align: '4k' });
  const bd = blkdebugOf(blk);
  assert.is(bd.bl.request_alignment, 4096);
  assert.is(blk_pwrite(blk, 1000, 512, buf(512, 9), 0), 0);
  assert.is(blk_pread(blk, 5000, 100, buf(100), 0), 0);
  assert.equal(memOf(blk).log, ['read 0 4096', 'write 0 4096', 'read 4096 4096']);
  assert.equal(memOf(blk).data.subarray(1000, 1512), buf(512, 9));
  assert.equal(memOf(blk).data.subarray(999, 1000), buf(1, 0));
  blk_unref(blk);
});

test('max-transfer: reads and writes are split into max-transfer chunks (3.2)', () => {
  const blk = openBd({ align: 4096, 'max-transfer': 8192 });
  assert.is(blk_pread(blk, 0, 20480, buf(20480), 0), 0);
  assert.is(blk_pwrite(blk, 0, 12288, buf(12288, 1), 0), 0);
  assert.equal(memOf(blk).log, ['read 0 8192', 'read 8192 8192', 'read 16384 4096', 'write 0 8192', 'write 8192 4096']);
  blk_unref(blk);
});

test('opt-write-zero: zero writes smaller than the zero alignment return ENOTSUP and fall back to writes', () => {
  const blk = openBd({ 'opt-write-zero': 4096 });
  assert.is(blk_pwrite_zeroes(blk, 0, 6144, 0), 0);
  assert.equal(memOf(blk).log, ['zero 0 4096', 'write 4096 2048']);
  assert.is(bdrv_blkdebug.bdrv_co_pwrite_zeroes !== undefined, true);
  const bd = blkdebugOf(blk);
  assert.is(run(() => bdrv_blkdebug.bdrv_co_pwrite_zeroes!(bd, 4096, 2048, 0)), -ENOTSUP);
  blk_unref(blk);
});

test('max-write-zero and max-discard split zero writes and discards', () => {
  const blk = openBd({ 'max-write-zero': 4096, 'max-discard': 2048 }, BDRV_O_RDWR | BDRV_O_UNMAP);
  const bd = blkdebugOf(blk);
  assert.equal(
    [bd.bl.max_pwrite_zeroes, bd.bl.max_pdiscard, bd.bl.pwrite_zeroes_alignment, bd.bl.pdiscard_alignment],
    [4096, 2048, 0, 0],
  );
  assert.is(blk_pwrite_zeroes(blk, 0, 10240, 0), 0);
  assert.is(blk_pdiscard(blk, 0, 5120), 0);
  assert.equal(memOf(blk).log, ['zero 0 4096', 'zero 4096 4096', 'zero 8192 2048', 'discard 0 2048', 'discard 2048 2048', 'discard 4096 1024']);
  blk_unref(blk);
});

test('limit validation messages (3.2)', () => {
  assert.is(openError(() => openBd({ align: 3000 })), 'Cannot meet constraints with align 3000');
  assert.is(openError(() => openBd({ align: '2G' })), 'Cannot meet constraints with align 2147483648');
  assert.is(openError(() => openBd({ align: 512, 'max-transfer': 1000 })), 'Cannot meet constraints with max-transfer 1000');
  assert.is(openError(() => openBd({ align: 512, 'opt-write-zero': 100 })), 'Cannot meet constraints with opt-write-zero 100');
  assert.is(
    openError(() => openBd({ 'opt-write-zero': 4096, 'max-write-zero': 6144 })),
    'Cannot meet constraints with max-write-zero 6144',
  );
  assert.is(openError(() => openBd({ align: 1024, 'opt-discard': 512 })), 'Cannot meet constraints with opt-discard 512');
  assert.is(openError(() => openBd({ 'opt-discard': 4096, 'max-discard': 6144 })), 'Cannot meet constraints with max-discard 6144');
  assert.is(openError(() => openBd({ align: 'big' })), "Parameter 'align' expects a non-negative number below 2^64");
  assert.is(openError(() => openBd({ align: 4096 })), '(opened)');
});

// ---------------------------------------------------------------------------------------------
// Breakpoints (3.2 rule 4): suspend rules, resume, remove_break, is_suspended

/** Collects what blkdebug prints on stdout (QEMU's printf) while `fn` runs. */
function stdoutOf(fn: () => void): string {
  const write = process.stdout.write;
  let out = '';
  process.stdout.write = ((chunk: string | Uint8Array): boolean => {
    out += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    return true;
  }) as typeof process.stdout.write;
  try {
    fn();
  } finally {
    process.stdout.write = write;
  }
  return out;
}

/** evfmt over blkdebug over mem: guest writes announce write_aio to blkdebug. */
function openEv(opts: Record<string, unknown> = {}): BlockBackend {
  return blk_new_open(null, null, { driver: 'evfmt', 'file.driver': 'blkdebug', 'file.image.driver': 'mem', 'file.image.filename': 'x', ...opts }, BDRV_O_RDWR);
}

/** Starts a 512-byte write of `fill` at `offset` in a coroutine; it may stay suspended. */
function startWrite(blk: BlockBackend, offset: number, fill: number): CoResult<number> {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, buf(512, fill), 512);
  return startCo(() => blk_co_pwritev(blk, offset, 512, q, 0));
}

test('break: a write suspends at write_aio before reaching the image; resume completes it (3.2 rule 4)', () => {
  const blk = openEv();
  const top = blk_bs(blk)!;
  let w: CoResult<number> | null = null;
  const out1 = stdoutOf(() => {
    assert.is(bdrv_debug_breakpoint(top, 'write_aio', 'A'), 0);
    w = startWrite(blk, 0, 7);
  });
  assert.is(out1, "blkdebug: Suspended request 'A'\n");
  assert.is(w!.done, false);
  assert.equal([bdrv_debug_is_suspended(top, 'A'), bdrv_debug_is_suspended(top, 'B')], [true, false]);
  assert.equal(memOf(blk).log, []);
  // Nothing else wakes it: the event loop has nothing to run.
  assert.is(aio_poll(qemu_get_aio_context(), false), false);
  assert.is(w!.done, false);
  const out2 = stdoutOf(() => assert.is(bdrv_debug_resume(top, 'A'), 0));
  assert.is(out2, "blkdebug: Resuming request 'A'\n");
  assert.equal(w!, { done: true, ret: 0 });
  assert.equal(memOf(blk).log, ['write 0 512']);
  assert.is(bdrv_debug_is_suspended(top, 'A'), false);
  blk_unref(blk);
});

test('a breakpoint fires once: the next write passes; resume of a tag nobody waits under is -ENOENT', () => {
  const blk = openEv();
  const top = blk_bs(blk)!;
  let first: CoResult<number> | null = null;
  let second: CoResult<number> | null = null;
  const out = stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    first = startWrite(blk, 0, 1);
    second = startWrite(blk, 512, 2);
  });
  assert.is(out, "blkdebug: Suspended request 'A'\n");
  assert.equal([first!.done, second!], [false, { done: true, ret: 0 }]);
  assert.equal(memOf(blk).log, ['write 512 512']);
  assert.is(bdrv_debug_resume(top, 'B'), -ENOENT);
  stdoutOf(() => bdrv_debug_resume(top, 'A'));
  assert.equal(first!, { done: true, ret: 0 });
  assert.equal(memOf(blk).log, ['write 512 512', 'write 0 512']);
  assert.is(bdrv_debug_resume(top, 'A'), -ENOENT);
  blk_unref(blk);
});

test('resume takes the latest request suspended with the tag first (list head)', () => {
  const blk = openEv();
  const top = blk_bs(blk)!;
  const ws: CoResult<number>[] = [];
  const out = stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    ws.push(startWrite(blk, 0, 1));
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    ws.push(startWrite(blk, 512, 2));
    assert.is(bdrv_debug_resume(top, 'A'), 0);
    assert.equal(memOf(blk).log, ['write 512 512']);
    assert.is(bdrv_debug_resume(top, 'A'), 0);
  });
  assert.is(out, "blkdebug: Suspended request 'A'\n".repeat(2) + "blkdebug: Resuming request 'A'\n".repeat(2));
  assert.equal(memOf(blk).log, ['write 512 512', 'write 0 512']);
  assert.equal(ws.map((w) => w.ret), [0, 0]);
  blk_unref(blk);
});

test('two breakpoints with one tag on one event suspend the request twice: two resumes needed', () => {
  const blk = openEv();
  const top = blk_bs(blk)!;
  let w: CoResult<number> | null = null;
  const out = stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    w = startWrite(blk, 0, 3);
    bdrv_debug_resume(top, 'A');
    assert.equal([w.done, bdrv_debug_is_suspended(top, 'A')], [false, true]);
    bdrv_debug_resume(top, 'A');
  });
  assert.is(out, "blkdebug: Suspended request 'A'\n".repeat(2) + "blkdebug: Resuming request 'A'\n".repeat(2));
  assert.equal(w!, { done: true, ret: 0 });
  blk_unref(blk);
});

test('remove_break removes the rules and resumes every request with the tag; -ENOENT with no rule left (7.2 quirk)', () => {
  const blk = openEv();
  const top = blk_bs(blk)!;
  const ws: CoResult<number>[] = [];
  const out = stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    ws.push(startWrite(blk, 0, 1));
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    ws.push(startWrite(blk, 512, 2));
    bdrv_debug_breakpoint(top, 'read_aio', 'A');
    // A rule was removed (read_aio's): 0, and both writes resume, latest first.
    assert.is(bdrv_debug_remove_breakpoint(top, 'A'), 0);
  });
  assert.is(out, "blkdebug: Suspended request 'A'\n".repeat(2) + "blkdebug: Resuming request 'A'\n".repeat(2));
  assert.equal(ws.map((w) => w.ret), [0, 0]);
  assert.equal(memOf(blk).log, ['write 512 512', 'write 0 512']);
  // The read_aio rule is gone: a read is not suspended.
  assert.is(blk_pread(blk, 0, 512, buf(512), 0), 0);
  // Only a suspended request, no rule: it is resumed, yet the result is -ENOENT.
  let w: CoResult<number> | null = null;
  const out2 = stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'write_aio', 'B');
    w = startWrite(blk, 1024, 3);
    assert.is(bdrv_debug_remove_breakpoint(top, 'B'), -ENOENT);
  });
  assert.is(out2, "blkdebug: Suspended request 'B'\nblkdebug: Resuming request 'B'\n");
  assert.equal(w!, { done: true, ret: 0 });
  assert.is(bdrv_debug_remove_breakpoint(top, 'B'), -ENOENT);
  blk_unref(blk);
});

test('break on an unknown event is -ENOENT; every BlkdebugEvent name is accepted', () => {
  const blk = openBd({});
  const bd = blk_bs(blk)!;
  assert.is(bdrv_debug_breakpoint(bd, 'nosuch', 'A'), -ENOENT);
  assert.is(bdrv_debug_breakpoint(bd, 'l1_grow.alloc_table', 'A'), -ENOENT);
  for (const ev of BLKDEBUG_EVENTS) assert.is(bdrv_debug_breakpoint(bd, ev, `t-${ev}`), 0, ev);
  for (const ev of BLKDEBUG_EVENTS) assert.is(bdrv_debug_remove_breakpoint(bd, `t-${ev}`), 0, ev);
  blk_unref(blk);
});

test('block-layer events reach blkdebug: pwritev on the node itself, flush_to_os from the format above', () => {
  const blk = openEv();
  const top = blk_bs(blk)!;
  let w: CoResult<number> | null = null;
  let f: CoResult<number> | null = null;
  const out = stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'pwritev', 'P');
    w = startWrite(blk, 0, 5);
    // write_aio came first and was not stopped; the block layer's pwritev on blkdebug was.
    assert.equal([w.done, memOf(blk).log], [false, []]);
    bdrv_debug_resume(top, 'P');
    bdrv_debug_breakpoint(top, 'flush_to_os', 'F');
    f = startCo(() => blk_co_flush(blk));
    assert.equal([f.done, memOf(blk).log], [false, ['write 0 512']]);
    bdrv_debug_resume(top, 'F');
  });
  assert.is(out, ["Suspended request 'P'", "Resuming request 'P'", "Suspended request 'F'", "Resuming request 'F'"].map((l) => `blkdebug: ${l}\n`).join(''));
  assert.equal([w!, f!], [{ done: true, ret: 0 }, { done: true, ret: 0 }]);
  assert.equal(memOf(blk).log, ['write 0 512', 'flush']);
  blk_unref(blk);
});

test('the new state is applied before the request suspends', () => {
  const blk = openEv({ 'file.set-state.0.event': 'write_aio', 'file.set-state.0.new_state': 2 });
  const top = blk_bs(blk)!;
  const bd = blkdebugOf(blk);
  let w: CoResult<number> | null = null;
  stdoutOf(() => {
    bdrv_debug_breakpoint(top, 'write_aio', 'A');
    w = startWrite(blk, 0, 1);
  });
  assert.equal([w!.done, blkdebug_get_state(bd)], [false, 2]);
  stdoutOf(() => bdrv_debug_resume(top, 'A'));
  assert.equal(w!, { done: true, ret: 0 });
  blk_unref(blk);
});

test('outside a coroutine a breakpoint cannot suspend: it prints, throws QEMU\'s abort message, leaves nothing behind', () => {
  const blk = openBd({});
  const bd = blk_bs(blk)!;
  bdrv_debug_breakpoint(bd, 'l2_load', 'A');
  const out = stdoutOf(() => throwsCo(() => bdrv_debug_event(bd, 'l2_load'), 'Co-routine is yielding to no one'));
  assert.is(out, "blkdebug: Suspended request 'A'\n");
  assert.is(bdrv_debug_is_suspended(bd, 'A'), false);
  // The rule fired, so it is gone.
  assert.is(bdrv_debug_remove_breakpoint(bd, 'A'), -ENOENT);
  blk_unref(blk);
});

test('suspend rules come only from the breakpoint API: not from config files or options (7.2)', () => {
  const open = (name: string): string => openError(() => blk_new_open(`blkdebug:${fixture(name)}:mem:x`, null, {}, BDRV_O_RDWR));
  assert.is(open('suspend-group'), "There is no option group 'suspend'");
  assert.is(open('suspend-tag'), "Invalid parameter 'tag'");
  assert.is(
    openError(() => openBd({ 'suspend.0.event': 'write_aio', 'suspend.0.tag': 'A' })),
    "Block protocol 'blkdebug' doesn't support the option 'suspend.0.event'",
  );
});

test.run();
