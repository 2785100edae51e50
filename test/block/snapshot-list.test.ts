// bdrv_snapshot_list (QEMU 7.2 block/snapshot.c): the driver's list, else the fallback child's
// (the primary child when no other child holds data), else -ENOTSUP; -ENOMEDIUM without a driver.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bdrv_open, bdrv_snapshot_list, ENOMEDIUM, ENOTSUP, type BlockDriver, type QEMUSnapshotInfo } from '../../src/index.ts';
import { ensureRegistered, makeFormat, makeProto } from '../helpers/mem-driver.ts';

const SN: QEMUSnapshotInfo = { id_str: '1', name: 'snap', vm_state_size: 0, date_sec: 1700000000, date_nsec: 5, vm_clock_nsec: 0, icount: -1 };

/** A protocol, a format listing one snapshot, a format without the callback, a filter. */
const slp = makeProto('slp');
const slf: BlockDriver = { ...makeFormat('slf', { supportsBacking: true }), bdrv_snapshot_list: () => [SN] };
const slfn = makeFormat('slfn', { supportsBacking: true });
const slfilter = makeFormat('slfilter', { filter: true });
for (const d of [slp, slf, slfn, slfilter]) ensureRegistered(d);

let n = 0;
const open = (opts: Record<string, unknown>) => bdrv_open(null, { 'node-name': `sl${++n}`, ...opts }, 0);

test('bdrv_snapshot_list: the driver answers', () => {
  assert.equal(bdrv_snapshot_list(open({ driver: 'slf', 'file.driver': 'slp' })), [SN]);
});

test('bdrv_snapshot_list: a node without the callback asks its primary child; none answers: -ENOTSUP', () => {
  assert.is(bdrv_snapshot_list(open({ driver: 'slfn', 'file.driver': 'slp' })), -ENOTSUP);
  assert.is(bdrv_snapshot_list(open({ driver: 'slp' })), -ENOTSUP);
  assert.equal(bdrv_snapshot_list(open({ driver: 'slfilter', 'file.driver': 'slf', 'file.file.driver': 'slp' })), [SN]);
  assert.equal(bdrv_snapshot_list(open({ driver: 'slfn', 'file.driver': 'slf', 'file.file.driver': 'slp' })), [SN], 'a format over a snapshotting node falls back to it');
});

test('bdrv_snapshot_list: a backing child is no obstacle to the fallback (COW only); no driver: -ENOMEDIUM', () => {
  const base = open({ driver: 'slf', 'file.driver': 'slp' });
  const top = open({ driver: 'slfn', 'file.driver': 'slp', backing: base.node_name });
  assert.is(bdrv_snapshot_list(top), -ENOTSUP, "the file child decides, not the backing file's snapshots");
  const gone = open({ driver: 'slp' });
  gone.drv = null;
  assert.is(bdrv_snapshot_list(gone), -ENOMEDIUM);
});

test.run();
