/**
 * `aioco-img info` (qemu-block.md 5.2): QEMU 7.2's `img_info`, `collect_image_info_list`,
 * `bdrv_query_image_info` and `bdrv_image_info_dump` (block/qapi.c), and `size_to_str`
 * (util/cutils.c), which the human output uses for sizes.
 */
import type { Operation } from 'effection';
import {
  BDRV_O_NO_BACKING,
  BDRV_O_NO_IO,
  ENOMEDIUM,
  ENOTSUP,
  QemuError,
  bdrv_get_allocated_file_size,
  bdrv_get_full_backing_filename,
  bdrv_get_info,
  bdrv_get_specific_info,
  bdrv_getlength,
  bdrv_image_info_specific_dump,
  bdrv_snapshot_list,
  blk_bs,
  blk_unref,
  block_driver_info_new,
  type BlockDriverState,
  type ImageInfoSpecific,
  type QEMUSnapshotInfo,
  strerror,
} from '../../src/index.ts';
import {
  FORCE_SHARE_OPT,
  HELP_OPT,
  IMAGE_OPTS_OPT,
  OBJECT_OPT,
  OUTPUT_OPT,
  error_exit,
  error_report,
  getopt_long,
  img_open,
  not_supported,
  parse_output_format,
  qobject_to_json_pretty,
  type ImgIo,
} from './qemu-img-cmds.ts';

/** C's `%0.3g`. */
function fmt_g3(v: number): string {
  if (v === 0) return '0';
  const exp = Math.floor(Math.log10(Math.abs(Number(v.toPrecision(3)))));
  if (exp < -4 || exp >= 3) {
    const [m, e] = v.toExponential(2).split('e') as [string, string];
    const mant = m.includes('.') ? m.replace(/\.?0+$/, '') : m;
    const n = Number(e);
    return `${mant}e${n < 0 ? '-' : '+'}${String(Math.abs(n)).padStart(2, '0')}`;
  }
  const s = v.toFixed(Math.max(0, 2 - exp));
  return s.includes('.') ? s.replace(/\.?0+$/, '') : s;
}

/**
 * A size for humans: 3 significant digits and a binary unit, switching unit when the value
 * reaches 1000 of the smaller one (`64 MiB`, `1.32 MiB`, `0.977 MiB`, `0 B`). QEMU:
 * `size_to_str`. Surprise: 1000 KiB prints as `0.977 MiB`, never `1e+03 KiB`.
 */
export function size_to_str(val: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp's exponent of val / (1000 / 1024).
  const x = val / (1000 / 1024);
  const e = x === 0 ? 0 : Math.floor(Math.log2(x)) + 1;
  const i = Math.max(0, Math.floor((e - 1) / 10));
  return `${fmt_g3(val / 2 ** (i * 10))} ${suffixes[i]}B`;
}

/** QEMU's `ImageInfo` (qapi/block-core.json) with 7.2's members; absent = `has_*` false. */
export interface ImageInfo {
  filename: string;
  format: string;
  'dirty-flag'?: boolean;
  'actual-size'?: number;
  'virtual-size': number;
  'cluster-size'?: number;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: SnapshotInfo[];
  'format-specific'?: ImageInfoSpecific;
}

/** QEMU's `SnapshotInfo` (qapi/block-core.json). */
export interface SnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

/** The node's snapshots as QAPI objects, or null if it has none. QEMU: `bdrv_query_snapshot_info_list`. */
function bdrv_query_snapshot_info_list(bs: BlockDriverState): SnapshotInfo[] | null {
  const list = bdrv_snapshot_list(bs);
  if (typeof list === 'number') {
    if (list === -ENOMEDIUM || list === -ENOTSUP) return null;
    throw new QemuError(`Can't list snapshots of '${bs.filename}': ${strerror(-list)}`);
  }
  if (list.length === 0) return null;
  return list.map((sn: QEMUSnapshotInfo) => {
    const info: SnapshotInfo = {
      id: sn.id_str,
      name: sn.name,
      'vm-state-size': sn.vm_state_size,
      'date-sec': sn.date_sec,
      'date-nsec': sn.date_nsec,
      'vm-clock-sec': Math.floor(sn.vm_clock_nsec / 1e9),
      'vm-clock-nsec': sn.vm_clock_nsec % 1e9,
    };
    if (sn.icount !== -1) info.icount = sn.icount;
    return info;
  });
}

const pad2 = (n: number): string => String(n).padStart(2, '0');

/** One line of the snapshot table (null: the header). QEMU: `bdrv_snapshot_dump`. */
export function bdrv_snapshot_dump(sn: SnapshotInfo | null): string {
  if (!sn) return 'ID'.padEnd(10) + 'TAG'.padEnd(17) + 'VM SIZE'.padStart(8) + 'DATE'.padStart(20) + 'VM CLOCK'.padStart(13) + 'ICOUNT'.padStart(11);
  // Local time, as g_date_time_new_from_unix_local.
  const d = new Date(sn['date-sec'] * 1000);
  const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const secs = sn['vm-clock-sec'];
  const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(sn['vm-clock-nsec'] / 1e6) % 1000).padStart(3, '0')}`;
  const icount = sn.icount !== undefined ? String(sn.icount) : '';
  return sn.id.padEnd(9) + ' ' + sn.name.padEnd(16) + ' ' + size_to_str(sn['vm-state-size']).padStart(8) + date.padStart(20) + clock.padStart(13) + icount.padStart(11);
}

/**
 * What qemu-img info reports about one node. QEMU 7.2: `bdrv_query_image_info`. Throws
 * QemuError (the driver's specific-info or backing-name errors).
 */
export function bdrv_query_image_info(bs: BlockDriverState): ImageInfo {
  const size = bdrv_getlength(bs);
  if (size < 0) throw new QemuError(`Can't get image size '${bs.filename}'`);
  const info: ImageInfo = { filename: bs.filename, format: bs.drv?.format_name ?? '', 'virtual-size': size };
  const actual = bdrv_get_allocated_file_size(bs);
  if (actual >= 0) info['actual-size'] = actual;
  const bdi = block_driver_info_new();
  if (bdrv_get_info(bs, bdi) >= 0) {
    if (bdi.cluster_size !== 0) info['cluster-size'] = bdi.cluster_size;
    info['dirty-flag'] = bdi.is_dirty;
  }
  const spec = bdrv_get_specific_info(bs);
  if (spec) info['format-specific'] = spec;
  if (bs.backing_file) {
    info['backing-filename'] = bs.backing_file;
    try {
      info['full-backing-filename'] = bdrv_get_full_backing_filename(bs);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
    }
    if (bs.backing_format) info['backing-filename-format'] = bs.backing_format;
  }
  const snapshots = bdrv_query_snapshot_info_list(bs);
  if (snapshots) info.snapshots = snapshots;
  // Members in QAPI schema order: QDict puts a later member first within a hash bucket.
  const order: (keyof ImageInfo)[] = ['filename', 'format', 'dirty-flag', 'actual-size', 'virtual-size', 'cluster-size', 'encrypted', 'backing-filename', 'full-backing-filename', 'backing-filename-format', 'snapshots', 'format-specific'];
  const sorted: Record<string, unknown> = {};
  for (const k of order) if (info[k] !== undefined) sorted[k] = info[k];
  return sorted as unknown as ImageInfo;
}

/** The human form of one ImageInfo. QEMU 7.2: `bdrv_image_info_dump`. */
export function bdrv_image_info_dump(info: ImageInfo): string {
  let s =
    `image: ${info.filename}\n` +
    `file format: ${info.format}\n` +
    `virtual size: ${size_to_str(info['virtual-size'])} (${info['virtual-size']} bytes)\n` +
    `disk size: ${info['actual-size'] !== undefined ? size_to_str(info['actual-size']) : 'unavailable'}\n`;
  if (info.encrypted) s += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) s += `cluster_size: ${info['cluster-size']}\n`;
  if (info['dirty-flag']) s += 'cleanly shut down: no\n';
  if (info['backing-filename'] !== undefined) {
    s += `backing file: ${info['backing-filename']}`;
    if (info['full-backing-filename'] === undefined) s += ' (cannot determine actual path)';
    else if (info['full-backing-filename'] !== info['backing-filename']) s += ` (actual path: ${info['full-backing-filename']})`;
    s += '\n';
  }
  if (info['backing-filename-format'] !== undefined) s += `backing file format: ${info['backing-filename-format']}\n`;
  if (info.snapshots) s += 'Snapshot list:\n' + bdrv_snapshot_dump(null) + '\n' + info.snapshots.map((sn) => bdrv_snapshot_dump(sn) + '\n').join('');
  if (info['format-specific']) s += 'Format specific information:\n' + bdrv_image_info_specific_dump(info['format-specific']);
  return s;
}

/**
 * Opens `filename` (and with `chain`, each backing file in turn, without opening backing files
 * from the images themselves) and collects their ImageInfo, or null after the error. QEMU:
 * `collect_image_info_list`.
 */
export function collect_image_info_list(io: ImgIo, imageOpts: boolean, filename: string, fmt: string | null, chain: boolean): ImageInfo[] | null {
  const list: ImageInfo[] = [];
  const seen = new Set<string>();
  let name: string | null = filename;
  let f = fmt;
  let opts = imageOpts;
  while (name !== null) {
    if (seen.has(name)) {
      error_report(io, `Backing file '${name}' creates an infinite loop.`);
      return null;
    }
    seen.add(name);
    const blk = img_open(io, opts, name, f, BDRV_O_NO_BACKING | BDRV_O_NO_IO, false);
    if (!blk) return null;
    let info: ImageInfo;
    try {
      info = bdrv_query_image_info(blk_bs(blk)!);
    } catch (e) {
      if (!(e instanceof QemuError)) throw e;
      error_report(io, e.message);
      return null;
    } finally {
      blk_unref(blk);
    }
    list.push(info);
    name = null;
    f = null;
    opts = false;
    if (chain) {
      if (info['full-backing-filename'] !== undefined) name = info['full-backing-filename'];
      else if (info['backing-filename'] !== undefined) {
        error_report(io, `Could not determine absolute backing filename, but backing filename '${info['backing-filename']}' present`);
        return null;
      }
      if (info['backing-filename-format'] !== undefined) f = info['backing-filename-format'];
    }
  }
  return list;
}

/** `qemu-img info [-f fmt] [--image-opts] [--output=ofmt] [--backing-chain] [-U] filename`. */
export function* img_info(io: ImgIo, argv: readonly string[], help: () => number): Operation<number> {
  const g = getopt_long(io, argv, 'hf:U', [HELP_OPT, { name: 'format', arg: true, key: 'f' }, IMAGE_OPTS_OPT, { name: 'backing-chain', arg: false, key: 'backing-chain' }, FORCE_SHARE_OPT, OUTPUT_OPT, OBJECT_OPT]);
  if (typeof g === 'number') return g;
  let fmt: string | null = null;
  let output: 'human' | 'json' = 'human';
  let chain = false;
  let imageOpts = false;
  for (const o of g.opts) {
    switch (o.c) {
      case 'h':
        return help();
      case 'f':
        fmt = o.arg;
        break;
      case 'image-opts':
        imageOpts = true;
        break;
      case 'backing-chain':
        chain = true;
        break;
      case 'U':
        break;
      case 'output': {
        const v = parse_output_format(io, o.arg!);
        if (!v) return 1;
        output = v;
        break;
      }
      case 'object':
        return not_supported(io, '--object');
    }
  }
  if (g.rest.length !== 1) return error_exit(io, 'Expecting one image file name');
  const list = collect_image_info_list(io, imageOpts, g.rest[0]!, fmt, chain);
  if (!list) return 1;
  if (output === 'human') io.out(list.map(bdrv_image_info_dump).join('\n'));
  else io.out(qobject_to_json_pretty(chain ? list : list[0]) + '\n');
  return 0;
}
