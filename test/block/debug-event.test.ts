// blkdebug events and breakpoints in the core (src/block/io.ts): bdrv_co_debug_event (QEMU 8.1's
// coroutine form of 7.2's BLKDBG_EVENT), the plain bdrv_debug_event, where block/io.c announces
// its events, and the breakpoint API of block.c (bdrv_debug_breakpoint, _remove_breakpoint,
// _resume, _is_suspended) that walks down the primary children (qemu-block.md 3.2).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  aio_poll,
  bdrv_attach_child,
  bdrv_co_debug_event,
  bdrv_debug_breakpoint,
  bdrv_debug_event,
  bdrv_debug_is_suspended,
  bdrv_debug_remove_breakpoint,
  bdrv_debug_resume,
  bdrv_open,
  bdrv_ref,
  bdrv_unref,
  bdrv_unref_child,
  blk_bs,
  blk_co_flush,
  blk_co_pwritev,
  blk_new_open,
  blk_unref,
  qemu_coroutine_enter,
  qemu_coroutine_self,
  qemu_coroutine_yield,
  qemu_get_aio_context,
  qemu_iovec_init_buf,
  BlockDriverState,
  QEMUIOVector,
  QemuError,
  BDRV_CHILD_DATA,
  BDRV_CHILD_IMAGE,
  BDRV_O_RDWR,
  ENOENT,
  ENOTSUP,
  type BlockDriver,
  type Coroutine,
  type CoroutineFn,
} from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto, runCo, st, startCo } from '../helpers/mem-driver.ts';
import { throwsCo, throwsExactly } from '../helpers/assert.ts';

/** Events that make the debug drivers' hook suspend the request, and the requests suspended. */
const pauseOn = new Set<string>();
const paused: Coroutine[] = [];

/** A hook logging `event X` in the node's log; it suspends on the events in pauseOn. */
function* logEvent(bs: BlockDriverState, event: string): CoroutineFn<void> {
  const log = st(bs).log;
  log.push(`event ${event}`);
  if (!pauseOn.has(event)) return;
  paused.push(qemu_coroutine_self());
  try {
    yield* qemu_coroutine_yield();
    log.push(`resumed ${event}`);
  } finally {
    log.push(`left ${event}`);
  }
}

/** What the breakpoint callbacks of `dbgp` saw and answer. */
const calls: string[] = [];
const answer = { breakpoint: 0, remove: 0, resume: 0, suspended: true };

/** A protocol driver with the event hook and the four breakpoint callbacks. */
const dbgp = ensureRegistered({
  ...makeProto('dbgp'),
  bdrv_co_debug_event: logEvent,
  bdrv_debug_breakpoint(bs, event, tag) {
    calls.push(`breakpoint ${bs.drv!.format_name} ${event} ${tag}`);
    return answer.breakpoint;
  },
  bdrv_debug_remove_breakpoint(bs, tag) {
    calls.push(`remove ${bs.drv!.format_name} ${tag}`);
    return answer.remove;
  },
  bdrv_debug_resume(bs, tag) {
    calls.push(`resume ${bs.drv!.format_name} ${tag}`);
    return answer.resume;
  },
  bdrv_debug_is_suspended(bs, tag) {
    calls.push(`is_suspended ${bs.drv!.format_name} ${tag}`);
    return answer.suspended;
  },
});
/** A format that logs the events announced on itself. */
const dbgf = ensureRegistered({ ...makeFormat('dbgf'), bdrv_co_debug_event: logEvent });
/** Plain drivers: no hook anywhere. */
ensureRegistered(makeProto('nodbgp'));
ensureRegistered(makeFormat('nodbgf'));

function reset(): void {
  pauseOn.clear();
  paused.length = 0;
  calls.length = 0;
  Object.assign(answer, { breakpoint: 0, remove: 0, resume: 0, suspended: true });
}

function qiov512(fill: number): QEMUIOVector {
  const q = new QEMUIOVector();
  qemu_iovec_init_buf(q, new Uint8Array(512).fill(fill), 512);
  return q;
}

// ---------------------------------------------------------------------------------------------
// bdrv_co_debug_event

test('bdrv_co_debug_event without a hook: one shared finished coroutine_fn, no generator per call', () => {
  reset();
  const a = bdrv_open(null, { driver: 'nodbgp', filename: 'a' }, BDRV_O_RDWR);
  const b = bdrv_open(null, { driver: 'nodbgf', 'file.driver': 'nodbgp', 'file.filename': 'b' }, BDRV_O_RDWR);
  const first = bdrv_co_debug_event(a, 'pwritev');
  assert.is(bdrv_co_debug_event(b, 'flush_to_os'), first);
  assert.is(bdrv_co_debug_event(null, 'write_aio'), first);
  assert.equal(first.next(), { done: true, value: undefined });
  assert.equal(first.next(), { done: true, value: undefined });
  // Delegating to it finishes at once, inside the enter.
  const r = startCo(function* () {
    yield* bdrv_co_debug_event(a, 'pwritev');
    yield* bdrv_co_debug_event(a, 'pwritev_done');
    return 7;
  });
  assert.equal(r, { done: true, ret: 7 });
  bdrv_unref(a);
  bdrv_unref(b);
});

test('bdrv_co_debug_event with a hook hands back the hook\'s own generator, run on the node itself', () => {
  reset();
  const bs = bdrv_open(null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  const g = bdrv_co_debug_event(bs, 'l2_load');
  assert.is.not(g, bdrv_co_debug_event(null, 'l2_load'));
  assert.equal(st(bs).log, []);
  assert.equal(g.next(), { done: true, value: undefined });
  assert.equal(st(bs).log, ['event l2_load']);
  bdrv_unref(bs);
});

test('a write announces pwritev and pwritev_done on the written node, around the driver call', () => {
  reset();
  const blk = blk_new_open(null, null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  const r = runCo(() => blk_co_pwritev(blk, 0, 512, qiov512(1), 0));
  assert.equal(r, { done: true, ret: 0 });
  assert.equal(st(blk_bs(blk)!).log, ['event pwritev', 'write 0 512 0', 'event pwritev_done']);
  blk_unref(blk);
});

test('a hook that suspends holds the request (tracked, in flight) until the coroutine is entered again', () => {
  reset();
  pauseOn.add('pwritev');
  const blk = blk_new_open(null, null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  const bs = blk_bs(blk)!;
  const r = startCo(() => blk_co_pwritev(blk, 0, 512, qiov512(9), 0));
  assert.is(r.done, false);
  assert.is(paused.length, 1);
  assert.equal(st(bs).log, ['event pwritev']);
  assert.ok(bs.in_flight > 0);
  assert.is(bs.tracked_requests.size, 1);
  // Nothing in the event loop resumes it: only an explicit enter does.
  assert.is(aio_poll(qemu_get_aio_context(), false), false);
  assert.is(r.done, false);
  assert.is(st(bs).data[0], 0);
  qemu_coroutine_enter(paused[0]!);
  assert.equal(r, { done: true, ret: 0 });
  assert.equal(st(bs).log, ['event pwritev', 'resumed pwritev', 'left pwritev', 'write 0 512 0', 'event pwritev_done']);
  assert.equal([bs.in_flight, bs.tracked_requests.size, st(bs).data[0]], [0, 0, 9]);
  blk_unref(blk);
});

test('flush announces flush_to_os and flush_to_disk on the primary child, not on the node (7.2)', () => {
  reset();
  const blk = blk_new_open(null, null, { driver: 'dbgf', 'file.driver': 'dbgp', 'file.filename': 'x' }, BDRV_O_RDWR);
  const top = blk_bs(blk)!;
  const file = top.file!.bs;
  assert.equal(runCo(() => blk_co_pwritev(blk, 0, 512, qiov512(2), 0)), { done: true, ret: 0 });
  assert.equal(runCo(() => blk_co_flush(blk)), { done: true, ret: 0 });
  assert.equal(st(top).log, ['event pwritev', 'write 0 512 0', 'event pwritev_done']);
  // The format's flush announces on its file; the file's own flush has no primary child.
  assert.equal(st(file).log, [
    'event pwritev',
    'write 0 512 0',
    'event pwritev_done',
    'event flush_to_os',
    'event flush_to_disk',
    'flush',
    'flush done',
  ]);
  // Nothing written since: flush_to_disk is skipped, flush_to_os is not.
  assert.equal(runCo(() => blk_co_flush(blk)), { done: true, ret: 0 });
  assert.equal(st(file).log.slice(7), ['event flush_to_os']);
  blk_unref(blk);
});

test('a flush suspended at flush_to_os resumes and completes', () => {
  reset();
  pauseOn.add('flush_to_os');
  const blk = blk_new_open(null, null, { driver: 'dbgf', 'file.driver': 'dbgp', 'file.filename': 'x' }, BDRV_O_RDWR);
  const file = blk_bs(blk)!.file!.bs;
  const r = startCo(() => blk_co_flush(blk));
  assert.is(r.done, false);
  assert.equal(st(file).log, ['event flush_to_os']);
  qemu_coroutine_enter(paused[0]!);
  assert.equal(r, { done: true, ret: 0 });
  assert.equal(st(file).log, ['event flush_to_os', 'resumed flush_to_os', 'left flush_to_os']);
  blk_unref(blk);
});

// ---------------------------------------------------------------------------------------------
// bdrv_debug_event (non-coroutine callers)

test('bdrv_debug_event runs the hook to its end; without a hook or node it does nothing', () => {
  reset();
  const bs = bdrv_open(null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  bdrv_debug_event(bs, 'none');
  bdrv_debug_event(null, 'none');
  assert.equal(st(bs).log, ['event none']);
  const plain = bdrv_open(null, { driver: 'nodbgp', filename: 'x' }, BDRV_O_RDWR);
  bdrv_debug_event(plain, 'none');
  assert.equal(st(plain).log, []);
  bdrv_unref(bs);
  bdrv_unref(plain);
});

test('bdrv_debug_event cannot suspend: outside a coroutine QEMU 7.2\'s abort message, the hook unwinds', () => {
  reset();
  pauseOn.add('l2_load');
  const bs = bdrv_open(null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  throwsCo(() => bdrv_debug_event(bs, 'l2_load'), 'Co-routine is yielding to no one');
  assert.equal(st(bs).log, ['event l2_load', 'left l2_load']);
  bdrv_unref(bs);
});

test('bdrv_debug_event inside a coroutine refuses to suspend for the caller and unwinds the hook', () => {
  reset();
  pauseOn.add('l2_load');
  const bs = bdrv_open(null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  const r = startCo(function* () {
    bdrv_debug_event(bs, 'l2_load');
    return 0;
  });
  assert.is(r.done, true);
  assert.instance(r.err, QemuError);
  assert.is(
    (r.err as Error).message,
    "bdrv_debug_event: event 'l2_load' suspends the request; a coroutine must use yield* bdrv_co_debug_event",
  );
  assert.equal(st(bs).log, ['event l2_load', 'left l2_load']);
  bdrv_unref(bs);
});

// ---------------------------------------------------------------------------------------------
// Breakpoint API (block.c)

test('breakpoint functions walk down the primary children to the first driver with the hook', () => {
  reset();
  const bs = bdrv_open(null, { driver: 'nodbgf', 'file.driver': 'dbgp', 'file.filename': 'x' }, BDRV_O_RDWR);
  answer.breakpoint = -ENOENT;
  answer.suspended = false;
  assert.is(bdrv_debug_breakpoint(bs, 'write_aio', 'A'), -ENOENT);
  assert.is(bdrv_debug_remove_breakpoint(bs, 'A'), 0);
  assert.is(bdrv_debug_resume(bs, 'B'), 0);
  assert.is(bdrv_debug_is_suspended(bs, 'C'), false);
  assert.equal(calls, ['breakpoint dbgp write_aio A', 'remove dbgp A', 'resume dbgp B', 'is_suspended dbgp C']);
  bdrv_unref(bs);
});

test('breakpoint functions without a debug node: -ENOTSUP, and is_suspended false', () => {
  reset();
  const bs = bdrv_open(null, { driver: 'nodbgf', 'file.driver': 'nodbgp', 'file.filename': 'x' }, BDRV_O_RDWR);
  for (const node of [bs, null]) {
    assert.equal(
      [bdrv_debug_breakpoint(node, 'write_aio', 'A'), bdrv_debug_remove_breakpoint(node, 'A'), bdrv_debug_resume(node, 'A')],
      [-ENOTSUP, -ENOTSUP, -ENOTSUP],
    );
    assert.is(bdrv_debug_is_suspended(node, 'A'), false);
  }
  bdrv_unref(bs);
});

test('resume walks past a node without a driver; the other three stop there (7.2)', () => {
  reset();
  const proto = bdrv_open(null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  const ejected = new BlockDriverState();
  bdrv_ref(proto);
  const c = bdrv_attach_child(ejected, proto, 'file', BDRV_CHILD_IMAGE);
  assert.is(ejected.file, c);
  answer.resume = -ENOENT;
  assert.is(bdrv_debug_resume(ejected, 'A'), -ENOENT);
  assert.is(bdrv_debug_breakpoint(ejected, 'write_aio', 'A'), -ENOTSUP);
  assert.is(bdrv_debug_remove_breakpoint(ejected, 'A'), -ENOTSUP);
  assert.is(bdrv_debug_is_suspended(ejected, 'A'), false);
  assert.equal(calls, ['resume dbgp A']);
  bdrv_unref_child(ejected, c);
  bdrv_unref(proto);
});

test('the walk follows the PRIMARY child only: hooks under a non-primary child are not found', () => {
  reset();
  const stub: BlockDriver = { format_name: 'stub' };
  const top = new BlockDriverState();
  top.drv = stub;
  const proto = bdrv_open(null, { driver: 'dbgp', filename: 'x' }, BDRV_O_RDWR);
  bdrv_ref(proto);
  const c = bdrv_attach_child(top, proto, 'data', BDRV_CHILD_DATA);
  assert.is(top.file, null);
  assert.is(bdrv_debug_breakpoint(top, 'write_aio', 'A'), -ENOTSUP);
  assert.is(bdrv_debug_resume(top, 'A'), -ENOTSUP);
  assert.equal(calls, []);
  bdrv_unref_child(top, c);
  bdrv_unref(proto);
});

test('a driver with bdrv_debug_breakpoint but no bdrv_debug_remove_breakpoint breaks QEMU\'s assertion', () => {
  reset();
  const half: BlockDriver = { ...makeProto('halfdbg'), bdrv_debug_breakpoint: () => 0 };
  ensureRegistered(half);
  const bs = bdrv_open(null, { driver: 'halfdbg', filename: 'x' }, BDRV_O_RDWR);
  throwsExactly(
    () => bdrv_debug_breakpoint(bs, 'write_aio', 'A'),
    QemuError,
    "bdrv_find_debug_node: Assertion 'bs->drv->bdrv_debug_remove_breakpoint' failed",
  );
  bdrv_unref(bs);
});

test('each node written announces its own pwritev events: the format\'s hook sees them, its file has no hook', () => {
  reset();
  const blk = blk_new_open(null, null, { driver: 'dbgf', 'file.driver': 'nodbgp', 'file.filename': 'x' }, BDRV_O_RDWR);
  assert.equal(runCo(() => blk_co_pwritev(blk, 512, 512, qiov512(3), 0)), { done: true, ret: 0 });
  assert.equal(st(blk_bs(blk)!).log, ['event pwritev', 'write 512 512 0', 'event pwritev_done']);
  assert.equal(st(blk_bs(blk)!.file!.bs).log, ['write 512 512 0']);
  assert.is(dbgf.bdrv_co_debug_event, logEvent);
  assert.is(dbgp.bdrv_co_debug_event, logEvent);
  blk_unref(blk);
});

test.run();
