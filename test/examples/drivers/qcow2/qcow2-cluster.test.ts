// Unit tests of qcow2-cluster.ts's entry helpers: L2 entry/bitmap accessors (big-endian, 8- or
// 16-byte entries) and subcluster range types (qcow2.txt's extended L2 rules). Facts:
// reference/qemu-block.md 6.4, 6.5.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  get_l2_bitmap,
  get_l2_entry,
  qcow2_get_subcluster_range_type,
  set_l2_bitmap,
  set_l2_entry,
} from '../../../../examples/drivers/qcow2/qcow2-cluster.ts';
import {
  QCOW_OFLAG_COMPRESSED,
  QCOW_OFLAG_COPIED,
  QCOW_OFLAG_SUB_ALLOC_RANGE,
  QCOW_OFLAG_SUB_ZERO_RANGE,
  QCOW_OFLAG_ZERO,
  QCow2SubclusterType,
  qcow2_get_subcluster_type,
  type BDRVQcow2State,
} from '../../../../examples/drivers/qcow2/qcow2-state.ts';

function state(subclusters: number): BDRVQcow2State {
  return { subclusters_per_cluster: subclusters, cluster_size: 65536, subcluster_size: 65536 / subclusters } as BDRVQcow2State;
}

test('get/set_l2_entry: big-endian 8-byte entries; extended entries are 16 bytes with the bitmap second', () => {
  const s = state(1);
  const slice = new Uint8Array(32);
  set_l2_entry(s, slice, 1, 0x8000000000050000n);
  assert.equal([...slice.subarray(8, 16)], [0x80, 0, 0, 0, 0, 0x05, 0, 0]);
  assert.is(get_l2_entry(s, slice, 1), 0x8000000000050000n);
  assert.is(get_l2_bitmap(s, slice, 1), 0n);
  assert.throws(() => set_l2_bitmap(s, slice, 0, 1n), /no subclusters/);

  const x = state(32);
  const ext = new Uint8Array(64);
  set_l2_entry(x, ext, 1, 0x60000n);
  set_l2_bitmap(x, ext, 1, 0x0000000100000002n);
  assert.equal([...ext.subarray(16, 32)], [0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
  assert.is(get_l2_entry(x, ext, 1), 0x60000n);
  assert.is(get_l2_bitmap(x, ext, 1), 0x0000000100000002n);
});

test('subcluster types without extended L2: the zero flag, COPIED and compressed bits', () => {
  const s = state(1);
  assert.is(qcow2_get_subcluster_type(s, 0n, 0n, 0), QCow2SubclusterType.UNALLOCATED_PLAIN);
  assert.is(qcow2_get_subcluster_type(s, QCOW_OFLAG_ZERO, 0n, 0), QCow2SubclusterType.ZERO_PLAIN);
  assert.is(qcow2_get_subcluster_type(s, 0x50000n | QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, 0n, 0), QCow2SubclusterType.ZERO_ALLOC);
  assert.is(qcow2_get_subcluster_type(s, 0x50000n | QCOW_OFLAG_COPIED, 0n, 0), QCow2SubclusterType.NORMAL);
  assert.is(qcow2_get_subcluster_type(s, 0x50000n, 0n, 0), QCow2SubclusterType.NORMAL);
  assert.is(qcow2_get_subcluster_type(s, QCOW_OFLAG_COMPRESSED | 0x5004fn, 0n, 0), QCow2SubclusterType.COMPRESSED);
  const out = { type: QCow2SubclusterType.INVALID };
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, 0n, 0, out), 1);
  assert.is(out.type, QCow2SubclusterType.NORMAL);
});

test('subcluster range types with extended L2: runs of allocated, zero and unallocated subclusters', () => {
  const s = state(32);
  const out = { type: QCow2SubclusterType.INVALID };
  const bitmap = QCOW_OFLAG_SUB_ALLOC_RANGE(0, 4) | QCOW_OFLAG_SUB_ZERO_RANGE(4, 6) | QCOW_OFLAG_SUB_ALLOC_RANGE(10, 32);
  // subclusters 0-3 allocated, 4-5 zero, 6-9 unallocated, 10-31 allocated
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, bitmap, 0, out), 4);
  assert.is(out.type, QCow2SubclusterType.NORMAL);
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, bitmap, 2, out), 2);
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, bitmap, 4, out), 2);
  assert.is(out.type, QCow2SubclusterType.ZERO_ALLOC);
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, bitmap, 6, out), 4);
  assert.is(out.type, QCow2SubclusterType.UNALLOCATED_ALLOC);
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, bitmap, 10, out), 22);
  assert.is(out.type, QCow2SubclusterType.NORMAL);
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, bitmap, 31, out), 1);
  // Without a host cluster: zero subclusters are ZERO_PLAIN, the rest UNALLOCATED_PLAIN up to the end.
  assert.is(qcow2_get_subcluster_range_type(s, 0n, QCOW_OFLAG_SUB_ZERO_RANGE(3, 5), 0, out), 3);
  assert.is(out.type, QCow2SubclusterType.UNALLOCATED_PLAIN);
  assert.is(qcow2_get_subcluster_range_type(s, 0n, QCOW_OFLAG_SUB_ZERO_RANGE(3, 5), 3, out), 2);
  assert.is(out.type, QCow2SubclusterType.ZERO_PLAIN);
  assert.is(qcow2_get_subcluster_range_type(s, 0n, QCOW_OFLAG_SUB_ZERO_RANGE(3, 5), 5, out), 27);
  // Invalid: a subcluster both allocated and zero; allocated bits without a host cluster.
  assert.is(qcow2_get_subcluster_range_type(s, 0x50000n, QCOW_OFLAG_SUB_ALLOC_RANGE(0, 1) | QCOW_OFLAG_SUB_ZERO_RANGE(0, 1), 0, out), -22);
  assert.is(out.type, QCow2SubclusterType.INVALID);
  assert.is(qcow2_get_subcluster_range_type(s, 0n, QCOW_OFLAG_SUB_ALLOC_RANGE(7, 8), 0, out), -22);
  // Compressed clusters count as one run to the end of the cluster.
  assert.is(qcow2_get_subcluster_range_type(s, QCOW_OFLAG_COMPRESSED | 0x50000n, 0n, 5, out), 27);
  assert.is(out.type, QCow2SubclusterType.COMPRESSED);
});

test.run();
