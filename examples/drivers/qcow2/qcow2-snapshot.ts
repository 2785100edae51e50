/**
 * qcow2 internal snapshots (QEMU 7.2: block/qcow2-snapshot.c), read side only: the snapshot
 * table is read and validated at open, kept as it is, and counted by `qemu-img check`. aioco
 * never creates, applies or deletes snapshots; the table is rewritten only by `check -r all`
 * when QEMU would rewrite it (dropped oversized extra data).
 */
import {
  BDRV_FIX_ERRORS,
  EFBIG,
  EINVAL,
  QemuError,
  bdrv_co_flush,
  bdrv_co_pread,
  bdrv_co_pwrite,
  bdrv_co_pwrite_sync,
  qemu_co_mutex_lock,
  qemu_co_mutex_unlock,
  strerror,
} from '../../../src/index.ts';
import type { BdrvCheckResult, BlockDriverState, CoroutineFn } from '../../../src/index.ts';
import type { BDRVQcow2State, QCowSnapshot } from './qcow2-state.ts';
import { L1E_OFFSET_MASK, qcow2_validate_table, QCOW2_DISCARD_ALWAYS, QCOW2_DISCARD_SNAPSHOT, QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA } from './qcow2-state.ts';
import { qcow2_alloc_clusters, qcow2_error_report, qcow2_free_clusters, qcow2_pre_write_overlap_check } from './qcow2-refcount.ts';

/** Bytes of the fixed part of a snapshot table entry. QEMU: sizeof(QCowSnapshotHeader). */
export const QCOW_SNAPSHOT_HEADER_SIZE = 40;
/** Bytes of the extra data QEMU 7.2 knows (vm_state_size_large, disk_size, icount). */
export const QCOW_SNAPSHOT_EXTRA_SIZE = 24;
/** Largest snapshot table QEMU accepts. QEMU: QCOW_MAX_SNAPSHOTS_SIZE. */
export const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
/** Total snapshot L1 bytes `qcow2_read_snapshots` reads to know the inactive L2 tables. */
const INACTIVE_L2_SCAN_LIMIT = 32 * 1024 * 1024;

const TWO32 = 4294967296;

/** Forgets the snapshot list. QEMU: `qcow2_free_snapshots`. */
export function qcow2_free_snapshots(bs: BlockDriverState): void {
  const s = bs.opaque as BDRVQcow2State;
  s.snapshots = [];
  s.nb_snapshots = 0;
  s.inactive_l2_offsets = null;
}

interface ReadSnapshotsRepair {
  nb_clusters_reduced: number;
  extra_data_dropped: number;
}

function* qcow2_do_read_snapshots(bs: BlockDriverState, repair: ReadSnapshotsRepair | null): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  s.snapshots = [];
  if (!s.nb_snapshots) {
    s.snapshots_size = 0;
    return 0;
  }

  let offset = s.snapshots_offset;
  let table_length = 0;
  const h = new Uint8Array(QCOW_SNAPSHOT_HEADER_SIZE);
  const hv = new DataView(h.buffer);
  const extra = new Uint8Array(QCOW_SNAPSHOT_EXTRA_SIZE);
  const ev = new DataView(extra.buffer);

  const read = function* (off: number, buf: Uint8Array): CoroutineFn<void> {
    if (!buf.length) return;
    const ret = yield* bdrv_co_pread(bs.file!, off, buf.length, buf, 0);
    if (ret < 0) {
      s.snapshots = [];
      throw Object.assign(new QemuError(`Failed to read snapshot table: ${strerror(-ret)}`), { errno: ret });
    }
  };

  const dec = new TextDecoder('utf-8');
  // C strings: whatever follows a NUL byte is not part of the name.
  const cstr = (b: Uint8Array) => {
    const z = b.indexOf(0);
    return dec.decode(z < 0 ? b : b.subarray(0, z));
  };
  for (let i = 0; i < s.nb_snapshots; i++) {
    let truncate_unknown_extra_data = false;
    const pre_sn_offset = offset;
    table_length = Math.ceil(table_length / 8) * 8;
    offset = Math.ceil(offset / 8) * 8;
    yield* read(offset, h);
    offset += QCOW_SNAPSHOT_HEADER_SIZE;

    const sn: QCowSnapshot = {
      l1_table_offset: hv.getUint32(0) * TWO32 + hv.getUint32(4),
      l1_size: hv.getUint32(8),
      id_str: '',
      name: '',
      disk_size: 0,
      vm_state_size: hv.getUint32(32),
      date_sec: hv.getUint32(16),
      date_nsec: hv.getUint32(20),
      vm_clock_nsec: hv.getUint32(24) * TWO32 + hv.getUint32(28),
      icount: -1,
      extra_data_size: hv.getUint32(36),
      unknown_extra_data: null,
    };
    const id_str_size = hv.getUint16(12);
    const name_size = hv.getUint16(14);

    if (sn.extra_data_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA) {
      if (!repair) {
        s.snapshots = [];
        throw Object.assign(new QemuError(`Too much extra metadata in snapshot table entry ${i}`), {
          errno: -EFBIG,
          hint: 'You can force-remove this extra metadata with qemu-img check -r all\n',
        });
      }
      process.stderr.write(`Discarding too much extra metadata in snapshot table entry ${i} (${sn.extra_data_size} > ${QCOW_MAX_SNAPSHOT_EXTRA_DATA})\n`);
      repair.extra_data_dropped++;
      truncate_unknown_extra_data = true;
    }

    const known = Math.min(QCOW_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size);
    extra.fill(0);
    yield* read(offset, extra.subarray(0, known));
    offset += known;
    if (sn.extra_data_size >= 8) {
      sn.vm_state_size = ev.getUint32(0) * TWO32 + ev.getUint32(4);
    }
    if (sn.extra_data_size >= 16) {
      sn.disk_size = ev.getUint32(8) * TWO32 + ev.getUint32(12);
    } else {
      sn.disk_size = bs.total_sectors * 512;
    }
    if (sn.extra_data_size >= 24) {
      const hi = ev.getUint32(16);
      const lo = ev.getUint32(20);
      sn.icount = hi === 0xffffffff && lo === 0xffffffff ? -1 : hi * TWO32 + lo;
    }

    if (sn.extra_data_size > QCOW_SNAPSHOT_EXTRA_SIZE) {
      const extra_data_end = offset + sn.extra_data_size - QCOW_SNAPSHOT_EXTRA_SIZE;
      if (truncate_unknown_extra_data) sn.extra_data_size = QCOW_MAX_SNAPSHOT_EXTRA_DATA;
      const unknown = new Uint8Array(sn.extra_data_size - QCOW_SNAPSHOT_EXTRA_SIZE);
      yield* read(offset, unknown);
      sn.unknown_extra_data = unknown;
      offset = extra_data_end;
    }

    const idb = new Uint8Array(id_str_size);
    yield* read(offset, idb);
    offset += id_str_size;
    sn.id_str = cstr(idb);
    const nb = new Uint8Array(name_size);
    yield* read(offset, nb);
    offset += name_size;
    sn.name = cstr(nb);

    table_length += QCOW_SNAPSHOT_HEADER_SIZE + sn.extra_data_size + id_str_size + name_size;
    if (table_length > QCOW_MAX_SNAPSHOTS_SIZE || offset - s.snapshots_offset > 0x7fffffff) {
      if (!repair) {
        s.snapshots = [];
        throw Object.assign(new QemuError('Snapshot table is too big'), {
          errno: -EFBIG,
          hint: `You can force-remove all ${s.nb_snapshots - i} overhanging snapshots with qemu-img check -r all\n`,
        });
      }
      process.stderr.write(`Discarding ${s.nb_snapshots - i} overhanging snapshots (snapshot table is too big)\n`);
      repair.nb_clusters_reduced += s.nb_snapshots - i;
      // The rest of the table and its clusters leak; check -r all fixes that right after.
      s.nb_snapshots = i;
      offset = pre_sn_offset;
      break;
    }
    s.snapshots.push(sn);
  }
  s.snapshots_size = offset - s.snapshots_offset;
  return 0;
}

/** Reads every snapshot L1 table (within a budget) to know the inactive L2 tables' offsets. */
function* load_inactive_l2_offsets(bs: BlockDriverState): CoroutineFn<void> {
  const s = bs.opaque as BDRVQcow2State;
  let total = 0;
  for (const sn of s.snapshots) total += sn.l1_size * 8;
  if (total > INACTIVE_L2_SCAN_LIMIT) {
    s.inactive_l2_offsets = null;
    return;
  }
  const set = new Set<number>();
  for (const sn of s.snapshots) {
    if (!sn.l1_size || sn.l1_table_offset % s.cluster_size || sn.l1_size > QCOW_MAX_L1_SIZE / 8) continue;
    const buf = new Uint8Array(sn.l1_size * 8);
    const ret = yield* bdrv_co_pread(bs.file!, sn.l1_table_offset, buf.length, buf, 0);
    if (ret < 0) {
      s.inactive_l2_offsets = null;
      return;
    }
    const dv = new DataView(buf.buffer);
    for (let j = 0; j < sn.l1_size; j++) {
      const off = Number(dv.getBigUint64(8 * j) & L1E_OFFSET_MASK);
      if (off) set.add(off);
    }
  }
  s.inactive_l2_offsets = set;
}

/**
 * Reads and validates the snapshot table at `s.snapshots_offset` (`s.nb_snapshots` entries)
 * into `s.snapshots`. QEMU: `qcow2_read_snapshots`. Throws QemuError with QEMU's message
 * ("Too much extra metadata in snapshot table entry N", "Snapshot table is too big", "Failed to
 * read snapshot table: ...") and returns 0 otherwise. Surprise: QEMU's open skips this in check
 * mode (BDRV_O_CHECK) so that `qemu-img check` can repair a broken table.
 */
export function* qcow2_read_snapshots(bs: BlockDriverState): CoroutineFn<number> {
  yield* qcow2_do_read_snapshots(bs, null);
  yield* load_inactive_l2_offsets(bs);
  return 0;
}

/**
 * Writes the snapshot list to newly allocated clusters, points the header at it and frees the
 * old table. QEMU: `qcow2_write_snapshots`. aioco only calls it from `check -r all` (after
 * dropping oversized extra data). Surprise: the caller must not hold `s.lock` (this flushes the
 * node, which takes it); the allocation and the freeing take it. Returns 0 or -errno.
 */
export function* qcow2_write_snapshots(bs: BlockDriverState): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const enc = new TextEncoder();
  let size = 0;
  const parts: { id: Uint8Array; name: Uint8Array }[] = [];
  for (const sn of s.snapshots) {
    const id = enc.encode(sn.id_str);
    const name = enc.encode(sn.name);
    parts.push({ id, name });
    size = Math.ceil(size / 8) * 8;
    size += QCOW_SNAPSHOT_HEADER_SIZE + Math.max(QCOW_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size) + id.length + name.length;
    if (size > QCOW_MAX_SNAPSHOTS_SIZE) return -EFBIG;
  }
  const snapshots_size = size;
  const buf = new Uint8Array(snapshots_size);
  const dv = new DataView(buf.buffer);
  let off = 0;
  s.snapshots.forEach((sn, i) => {
    off = Math.ceil(off / 8) * 8;
    dv.setBigUint64(off, BigInt(sn.l1_table_offset));
    dv.setUint32(off + 8, sn.l1_size);
    dv.setUint16(off + 12, parts[i].id.length);
    dv.setUint16(off + 14, parts[i].name.length);
    dv.setUint32(off + 16, sn.date_sec);
    dv.setUint32(off + 20, sn.date_nsec);
    dv.setBigUint64(off + 24, BigInt(sn.vm_clock_nsec));
    // A VM state too big for 32 bits reads as "disk-only" to old readers, not as a truncated size.
    dv.setUint32(off + 32, sn.vm_state_size <= 0xffffffff ? sn.vm_state_size : 0);
    dv.setUint32(off + 36, Math.max(QCOW_SNAPSHOT_EXTRA_SIZE, sn.extra_data_size));
    off += QCOW_SNAPSHOT_HEADER_SIZE;
    dv.setBigUint64(off, BigInt(sn.vm_state_size));
    dv.setBigUint64(off + 8, BigInt(sn.disk_size));
    dv.setBigUint64(off + 16, sn.icount < 0 ? 0xffffffffffffffffn : BigInt(sn.icount));
    off += QCOW_SNAPSHOT_EXTRA_SIZE;
    if (sn.extra_data_size > QCOW_SNAPSHOT_EXTRA_SIZE && sn.unknown_extra_data) {
      buf.set(sn.unknown_extra_data, off);
      off += sn.unknown_extra_data.length;
    }
    buf.set(parts[i].id, off);
    off += parts[i].id.length;
    buf.set(parts[i].name, off);
    off += parts[i].name.length;
  });

  let snapshots_offset = 0;
  if (snapshots_size > 0) {
    yield* qemu_co_mutex_lock(s.lock);
    snapshots_offset = yield* qcow2_alloc_clusters(bs, snapshots_size);
    qemu_co_mutex_unlock(s.lock);
    if (snapshots_offset < 0) return snapshots_offset;
  }
  const fail = function* (ret: number): CoroutineFn<number> {
    if (snapshots_offset > 0) {
      yield* qemu_co_mutex_lock(s.lock);
      yield* qcow2_free_clusters(bs, snapshots_offset, snapshots_size, QCOW2_DISCARD_ALWAYS);
      qemu_co_mutex_unlock(s.lock);
    }
    return ret;
  };
  let ret = yield* bdrv_co_flush(bs);
  if (ret < 0) return yield* fail(ret);
  if (snapshots_size > 0) {
    ret = yield* qcow2_pre_write_overlap_check(bs, 0, snapshots_offset, snapshots_size, false);
    if (ret < 0) return yield* fail(ret);
    ret = yield* bdrv_co_pwrite(bs.file!, snapshots_offset, snapshots_size, buf, 0);
    if (ret < 0) return yield* fail(ret);
  }
  // The new table and its refcounts must be stable before the header points at it.
  ret = yield* bdrv_co_flush(bs);
  if (ret < 0) return yield* fail(ret);
  const hdr = new Uint8Array(12);
  const hv = new DataView(hdr.buffer);
  hv.setUint32(0, s.snapshots.length);
  hv.setBigUint64(4, BigInt(snapshots_offset));
  ret = yield* bdrv_co_pwrite_sync(bs.file!, 60, 12, hdr, 0);
  if (ret < 0) return yield* fail(ret);

  yield* qemu_co_mutex_lock(s.lock);
  yield* qcow2_free_clusters(bs, s.snapshots_offset, s.snapshots_size, QCOW2_DISCARD_SNAPSHOT);
  qemu_co_mutex_unlock(s.lock);
  s.snapshots_offset = snapshots_offset;
  s.snapshots_size = snapshots_size;
  s.nb_snapshots = s.snapshots.length;
  return 0;
}

/**
 * First step of `qemu-img check`: re-reads the snapshot table pointer from the header and the
 * table itself (in repair mode dropping what QEMU drops), counting problems in `result`. QEMU:
 * `qcow2_check_read_snapshot_table`. Returns 0 or -errno.
 */
export function* qcow2_check_read_snapshot_table(bs: BlockDriverState, result: BdrvCheckResult, fix: number): CoroutineFn<number> {
  const s = bs.opaque as BDRVQcow2State;
  const rep: ReadSnapshotsRepair = { nb_clusters_reduced: 0, extra_data_dropped: 0 };
  const ptr = new Uint8Array(12);
  let ret = yield* bdrv_co_pread(bs.file!, 60, 12, ptr, 0);
  if (ret < 0) {
    result.check_errors++;
    process.stderr.write(`ERROR failed to read the snapshot table pointer from the image header: ${strerror(-ret)}\n`);
    return ret;
  }
  const pv = new DataView(ptr.buffer);
  s.nb_snapshots = pv.getUint32(0);
  s.snapshots_offset = pv.getUint32(4) * TWO32 + pv.getUint32(8);

  if (s.nb_snapshots > QCOW_MAX_SNAPSHOTS && fix & BDRV_FIX_ERRORS) {
    process.stderr.write(`Discarding ${s.nb_snapshots - QCOW_MAX_SNAPSHOTS} overhanging snapshots\n`);
    rep.nb_clusters_reduced += s.nb_snapshots - QCOW_MAX_SNAPSHOTS;
    s.nb_snapshots = QCOW_MAX_SNAPSHOTS;
  }

  const err = { msg: '' };
  ret = qcow2_validate_table(
    s,
    s.snapshots_offset,
    s.nb_snapshots,
    QCOW_SNAPSHOT_HEADER_SIZE,
    QCOW_SNAPSHOT_HEADER_SIZE * QCOW_MAX_SNAPSHOTS,
    'snapshot table',
    err,
  );
  if (ret < 0) {
    result.check_errors++;
    qcow2_error_report(`ERROR ${err.msg}`);
    if (s.nb_snapshots > QCOW_MAX_SNAPSHOTS) {
      process.stderr.write(`You can force-remove all ${s.nb_snapshots - QCOW_MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all\n`);
    }
    s.snapshots_offset = 0;
    s.nb_snapshots = 0;
    s.snapshots = [];
    return ret;
  }

  try {
    yield* qcow2_do_read_snapshots(bs, fix & BDRV_FIX_ERRORS ? rep : null);
  } catch (e) {
    if (!(e instanceof QemuError)) throw e;
    result.check_errors++;
    qcow2_error_report(`ERROR failed to read the snapshot table: ${e.message}`, (e as QemuError & { hint?: string }).hint);
    s.snapshots_offset = 0;
    s.nb_snapshots = 0;
    s.snapshots = [];
    return (e as QemuError & { errno?: number }).errno ?? -EINVAL;
  }
  result.corruptions += rep.nb_clusters_reduced + rep.extra_data_dropped;

  if (rep.nb_clusters_reduced) {
    // The header must agree with s.nb_snapshots before the refcount check counts references.
    const nb = new Uint8Array(4);
    new DataView(nb.buffer).setUint32(0, s.nb_snapshots);
    ret = yield* bdrv_co_pwrite_sync(bs.file!, 60, 4, nb, 0);
    if (ret < 0) {
      result.check_errors++;
      process.stderr.write(`ERROR failed to update the snapshot count in the image header: ${strerror(-ret)}\n`);
      return ret;
    }
    result.corruptions_fixed += rep.nb_clusters_reduced;
    result.corruptions -= rep.nb_clusters_reduced;
  }

  if (s.qcow_version >= 3) {
    for (let i = 0; i < s.snapshots.length; i++) {
      if (s.snapshots[i].extra_data_size < 16) {
        result.corruptions++;
        process.stderr.write(`${fix & BDRV_FIX_ERRORS ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete\n`);
      }
    }
  }
  yield* load_inactive_l2_offsets(bs);
  return 0;
}

/**
 * Last step of `qemu-img check -r all`: rewrites the snapshot table when the snapshot check
 * found something to repair. QEMU: `qcow2_check_fix_snapshot_table`. Called with `s.lock` held,
 * which it drops while the table is written. Returns 0 or -errno.
 */
export function* qcow2_check_fix_snapshot_table(bs: BlockDriverState, result: BdrvCheckResult, fix: number): CoroutineFn<number> {
  if (result.corruptions && fix & BDRV_FIX_ERRORS) {
    const s = bs.opaque as BDRVQcow2State;
    qemu_co_mutex_unlock(s.lock);
    let ret: number;
    try {
      ret = yield* qcow2_write_snapshots(bs);
    } finally {
      yield* qemu_co_mutex_lock(s.lock);
    }
    if (ret < 0) {
      result.check_errors++;
      process.stderr.write(`ERROR failed to update snapshot table: ${strerror(-ret)}\n`);
      return ret;
    }
    result.corruptions_fixed += result.corruptions;
    result.corruptions = 0;
  }
  return 0;
}
