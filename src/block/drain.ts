/**
 * In-flight accounting and drained sections. QEMU: block/io.c (`bdrv_inc_in_flight`,
 * `bdrv_dec_in_flight`, `bdrv_drained_begin/end`, `bdrv_drain`, `bdrv_drain_all_begin/end`) and
 * block.c (`bdrv_try_change_aio_context`).
 */
import type { AioContext } from '../aio/aio-context.ts';
import { AIO_WAIT_WHILE, aio_wait_kick } from '../aio/aio-wait.ts';
import { aio_disable_external, aio_enable_external } from '../aio/fd-handler.ts';
import { QemuError } from '../aio/error.ts';
import { qemu_in_coroutine } from '../coroutine/coroutine.ts';
import { bdrv_all_states, BlockDriverState } from './block-driver-state.ts';

/** Counts a request on `bs`. QEMU: `bdrv_inc_in_flight`. */
export function bdrv_inc_in_flight(bs: BlockDriverState): void {
  bs.in_flight++;
}

/** Ends a request on `bs` and kicks waiters. QEMU: `bdrv_dec_in_flight` (calls `aio_wait_kick`). */
export function bdrv_dec_in_flight(bs: BlockDriverState): void {
  bs.in_flight--;
  aio_wait_kick();
}

function bdrv_parent_drained_begin(bs: BlockDriverState): void {
  for (const c of bs.parents) {
    if (c.quiesced_parent) continue;
    c.quiesced_parent = true;
    c.klass.drained_begin?.(c);
  }
}

function bdrv_parent_drained_end(bs: BlockDriverState): void {
  for (const c of bs.parents) {
    if (!c.quiesced_parent) continue;
    c.quiesced_parent = false;
    c.klass.drained_end?.(c);
  }
}

/**
 * Whether `bs` still has activity: its own requests or a busy parent. QEMU: `bdrv_drain_poll`
 * (non-recursive, as 7.2's `bdrv_drained_begin`).
 */
export function bdrv_drain_poll(bs: BlockDriverState): boolean {
  for (const c of bs.parents) if (c.klass.drained_poll?.(c)) return true;
  return bs.in_flight > 0;
}

/** @internal quiesce without polling (a parent's part of a child's drain). */
export function bdrv_do_drained_begin_quiesce(bs: BlockDriverState): void {
  if (bs.quiesce_counter++ === 0) aio_disable_external(bs.aio_context);
  bdrv_parent_drained_begin(bs);
}

/** @internal */
export function bdrv_do_drained_end_no_poll(bs: BlockDriverState): void {
  if (bs.quiesce_counter <= 0) throw new QemuError("bdrv_drained_end: Assertion 'bs->quiesce_counter > 0' failed");
  // Parents are released only when the last section of this node ends.
  if (bs.quiesce_counter === 1) bdrv_parent_drained_end(bs);
  if (--bs.quiesce_counter === 0) aio_enable_external(bs.aio_context);
}


function assertNotCoroutine(fn: string): void {
  if (qemu_in_coroutine()) {
    throw new QemuError(`${fn}: not supported inside a coroutine in aioco (QEMU would bounce through a BH); call it from plain code`);
  }
}

/**
 * Begins a drained section: quiesces `bs` and its parents (a BlockBackend parent queues new
 * requests), then polls until `bs` and its parents have no request in flight. QEMU:
 * `bdrv_drained_begin`. Sections nest. Surprise (aioco): from inside a coroutine it throws
 * QemuError (QEMU would yield to a BH in the node's context).
 */
export function bdrv_drained_begin(bs: BlockDriverState): void {
  assertNotCoroutine('bdrv_drained_begin');
  bdrv_do_drained_begin_quiesce(bs);
  AIO_WAIT_WHILE(bs.aio_context, () => bdrv_drain_poll(bs));
}

/**
 * Ends a drained section; when the last one ends, parents resume (queued BlockBackend requests
 * restart). QEMU: `bdrv_drained_end`.
 */
export function bdrv_drained_end(bs: BlockDriverState): void {
  bdrv_do_drained_end_no_poll(bs);
}

/** Waits until `bs` is idle: begin + end. QEMU: `bdrv_drain`. */
export function bdrv_drain(bs: BlockDriverState): void {
  bdrv_drained_begin(bs);
  bdrv_drained_end(bs);
}

let drain_all_count = 0;

/**
 * Drains every node. QEMU: `bdrv_drain_all_begin`. A node opened before the matching
 * `bdrv_drain_all_end` is quiesced too (see `bdrv_drain_all_new_node`).
 */
export function bdrv_drain_all_begin(): void {
  assertNotCoroutine('bdrv_drain_all_begin');
  drain_all_count++;
  const all = bdrv_all_states();
  for (const bs of all) bdrv_do_drained_begin_quiesce(bs);
  AIO_WAIT_WHILE(null, () => all.some((bs) => bdrv_drain_poll(bs)));
}

/** Ends `bdrv_drain_all_begin`. QEMU: `bdrv_drain_all_end`. */
export function bdrv_drain_all_end(): void {
  if (drain_all_count <= 0) throw new QemuError("bdrv_drain_all_end: Assertion 'bdrv_drain_all_count > 0' failed");
  drain_all_count--;
  for (const bs of bdrv_all_states()) if (bs.quiesce_counter > 0) bdrv_do_drained_end_no_poll(bs);
}

/**
 * @internal A node that joins the graph begins one drained section per active
 * `bdrv_drain_all_begin` (QEMU: the loop in `bdrv_new`). Nothing can be in flight on it yet, so
 * this only quiesces.
 */
export function bdrv_drain_all_new_node(bs: BlockDriverState): void {
  for (let i = 0; i < drain_all_count; i++) bdrv_do_drained_begin_quiesce(bs);
}

/**
 * @internal A node that leaves the graph ends the drained sections it is still in, since
 * `bdrv_drain_all_end` will not see it. QEMU: `bdrv_drain_all_end_quiesce` (from `bdrv_close`).
 */
export function bdrv_drain_all_end_quiesce(bs: BlockDriverState): void {
  while (bs.quiesce_counter > 0) bdrv_do_drained_end_no_poll(bs);
}

/** Drains every node once. QEMU: `bdrv_drain_all`. */
export function bdrv_drain_all(): void {
  bdrv_drain_all_begin();
  bdrv_drain_all_end();
}

/** The connected graph of `bs`: its children and its BDS parents, transitively. */
function collect(bs: BlockDriverState, out: Set<BlockDriverState>): void {
  if (out.has(bs)) return;
  out.add(bs);
  for (const c of bs.children) collect(c.bs, out);
  for (const p of bs.parents) if (p.opaque instanceof BlockDriverState) collect(p.opaque, out);
}

/**
 * Moves `bs` and the whole graph connected to it (children and BDS parents, transitively; and
 * BlockBackend parents, through their child class) to `ctx`, draining first so no request is in
 * flight during the move. QEMU: `bdrv_try_change_aio_context` (7.2). Calls the drivers'
 * `bdrv_detach_aio_context` / `bdrv_attach_aio_context`. Returns 0.
 */
export function bdrv_try_change_aio_context(bs: BlockDriverState, ctx: AioContext): number {
  if (bs.aio_context === ctx) return 0;
  const nodes = new Set<BlockDriverState>();
  collect(bs, nodes);
  const list = [...nodes];
  for (const n of list) bdrv_drained_begin(n);
  try {
    for (const n of list) n.drv?.bdrv_detach_aio_context?.(n);
    for (const n of list) {
      const quiesced = n.quiesce_counter > 0;
      if (quiesced) aio_enable_external(n.aio_context);
      n.aio_context = ctx;
      if (quiesced) aio_disable_external(ctx);
      for (const p of n.parents) p.klass.set_aio_ctx?.(p, ctx);
    }
    for (const n of list) n.drv?.bdrv_attach_aio_context?.(n, ctx);
  } finally {
    for (const n of list) bdrv_drained_end(n);
  }
  return 0;
}

/** Same as `bdrv_try_change_aio_context` (QEMU 5.2's name, kept for ported code). */
export function bdrv_set_aio_context(bs: BlockDriverState, ctx: AioContext): void {
  bdrv_try_change_aio_context(bs, ctx);
}
