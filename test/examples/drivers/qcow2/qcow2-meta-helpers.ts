// Shared helpers of the qcow2 metadata tests (cache, refcount, snapshot, create): real qemu-img
// runs, aioco opens and checks, and byte patches for deliberately corrupted images.
// Not a test file (the runner only runs *.test.ts).
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  BDRV_FIX_ERRORS,
  BDRV_FIX_LEAKS,
  BDRV_O_CHECK,
  BDRV_O_RDWR,
  bdrv_check,
  bdrv_check_result_new,
  bdrv_open,
  bdrv_unref,
  strerror,
  type BdrvCheckResult,
  type BlockDriverState,
} from '../../../../src/index.ts';
import '../../../../examples/drivers/file.ts';
import '../../../../examples/drivers/qcow2/qcow2.ts';
import { qcow2_set_error_report } from '../../../../examples/drivers/qcow2/qcow2-refcount.ts';

// As qemu-img's error_report does.
qcow2_set_error_report((msg) => process.stderr.write(`qemu-img: ${msg}\n`));

export const QEMU_IMG = '/usr/bin/qemu-img';
export const QEMU_IO = '/usr/bin/qemu-io';
/** Why interop tests are skipped, or null when the real tools are installed. */
export const qemuMissing: string | null = existsSync(QEMU_IMG) && existsSync(QEMU_IO) ? null : `${QEMU_IMG} or ${QEMU_IO} is missing`;

/** A fresh temporary directory; `cleanup()` removes it. */
export function tempDir(): { dir: string; file: (name: string) => string; cleanup: () => void } {
  const dir = mkdtempSync(path.join(tmpdir(), 'aioco-qcow2-meta-'));
  return { dir, file: (name) => path.join(dir, name), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface ToolRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a real QEMU tool synchronously (bounded: 30 s). */
export function run(cmd: string, args: string[]): ToolRun {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  return { code: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

export function qemuImg(...args: string[]): ToolRun {
  return run(QEMU_IMG, args);
}

export function qemuIo(file: string, ...cmds: string[]): ToolRun {
  const args: string[] = [];
  for (const c of cmds) args.push('-c', c);
  return run(QEMU_IO, [...args, file]);
}

/** Writes `bytes` at `offset` of `file`. */
export function patch(file: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function readAt(file: string, offset: number, len: number): Uint8Array {
  const fd = openSync(file, 'r');
  try {
    const b = new Uint8Array(len);
    readSync(fd, b, 0, len, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

export function be64(v: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v);
  return b;
}

export function be16(v: number): Uint8Array {
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, v);
  return b;
}

export function readBe64(file: string, offset: number): bigint {
  return new DataView(readAt(file, offset, 8).buffer).getBigUint64(0);
}

/** `fix` for a qemu-img `-r` mode. */
export function fixOf(mode: '' | 'leaks' | 'all'): number {
  return mode === 'all' ? BDRV_FIX_LEAKS | BDRV_FIX_ERRORS : mode === 'leaks' ? BDRV_FIX_LEAKS : 0;
}

/** Runs `fn` with everything written to process.stderr captured (and not printed). */
export function captureStderr<T>(fn: () => T): { value: T; stderr: string } {
  const orig = process.stderr.write;
  let out = '';
  process.stderr.write = ((chunk: string | Uint8Array) => {
    out += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    return true;
  }) as typeof process.stderr.write;
  try {
    const value = fn();
    return { value, stderr: out };
  } finally {
    process.stderr.write = orig;
  }
}

/** Opens `file` as qcow2 the way `qemu-img check [-r]` does (BDRV_O_CHECK, read-write with -r). */
export function openForCheck(file: string, fix: number): BlockDriverState {
  return bdrv_open(file, { driver: 'qcow2' }, BDRV_O_CHECK | (fix ? BDRV_O_RDWR : 0));
}

/** What `qemu-img check --output=json` reports, in ImageCheck's member names. */
export interface CheckReport {
  exit: number;
  stderr: string;
  counters: Record<string, number>;
}

function toCounters(r: BdrvCheckResult, fixed: BdrvCheckResult | null): Record<string, number> {
  const c: Record<string, number> = {
    'image-end-offset': r.image_end_offset,
    'total-clusters': r.bfi.total_clusters,
    'allocated-clusters': r.bfi.allocated_clusters,
    'fragmented-clusters': r.bfi.fragmented_clusters,
    'compressed-clusters': r.bfi.compressed_clusters,
    corruptions: r.corruptions,
    leaks: r.leaks,
    'check-errors': r.check_errors,
    'leaks-fixed': fixed ? fixed.leaks_fixed : r.leaks_fixed,
    'corruptions-fixed': fixed ? fixed.corruptions_fixed : r.corruptions_fixed,
  };
  return sortedNonZero(c);
}

function exitOf(ret: number, r: BdrvCheckResult): number {
  if (ret < 0 || r.check_errors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

/**
 * aioco's equivalent of `qemu-img check [-r mode] --output=json file`: check (with repair), then,
 * when something was repaired, the re-check qemu-img does; counters as qemu-img reports them.
 */
export function aiocoCheck(file: string, mode: '' | 'leaks' | 'all'): CheckReport {
  const fix = fixOf(mode);
  const { value, stderr } = captureStderr(() => {
    const bs = openForCheck(file, fix);
    try {
      const r1 = bdrv_check_result_new();
      const ret1 = bdrv_check(bs, r1, fix);
      if (ret1 < 0) {
        // qemu-img prints no report then, only this line (exit 1).
        process.stderr.write(`qemu-img: Check failed: ${strerror(-ret1)}\n`);
        return { exit: 1, counters: {} };
      }
      if (ret1 === 0 && (r1.corruptions_fixed || r1.leaks_fixed)) {
        const r2 = bdrv_check_result_new();
        const ret2 = bdrv_check(bs, r2, 0);
        return { exit: exitOf(ret2, r2), counters: toCounters(r2, r1) };
      }
      return { exit: exitOf(ret1, r1), counters: toCounters(r1, null) };
    } finally {
      bdrv_unref(bs);
    }
  });
  return { ...value, stderr };
}

/** `counters` without zero values and the filename/format strings, keys sorted (comparable). */
export function sortedNonZero(c: Record<string, unknown>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of Object.keys(c).sort()) {
    const v = c[k];
    if (typeof v === 'number' && v !== 0) out[k] = v;
  }
  return out;
}

/** The real `qemu-img check [-r mode] --output=json file`. */
export function qemuCheck(file: string, mode: '' | 'leaks' | 'all'): CheckReport {
  const args = ['check', '--output=json'];
  if (mode) args.push('-r', mode);
  const r = qemuImg(...args, file);
  let counters: Record<string, number> = {};
  try {
    counters = sortedNonZero(JSON.parse(r.stdout) as Record<string, unknown>);
  } catch {
    // No JSON: the check failed; the exit code and stderr tell.
  }
  return { exit: r.code, stderr: r.stderr, counters };
}

/** The header fields the corruption helpers need. */
export interface HeaderInfo {
  cluster_bits: number;
  cluster_size: number;
  l1_size: number;
  l1_table_offset: number;
  refcount_table_offset: number;
  refcount_table_clusters: number;
  refcount_order: number;
  nb_snapshots: number;
  snapshots_offset: number;
  incompatible_features: bigint;
}

export function readHeader(file: string): HeaderInfo {
  const h = readAt(file, 0, 112);
  const dv = new DataView(h.buffer);
  const version = dv.getUint32(4);
  const cluster_bits = dv.getUint32(20);
  return {
    cluster_bits,
    cluster_size: 2 ** cluster_bits,
    l1_size: dv.getUint32(36),
    l1_table_offset: Number(dv.getBigUint64(40)),
    refcount_table_offset: Number(dv.getBigUint64(48)),
    refcount_table_clusters: dv.getUint32(56),
    nb_snapshots: dv.getUint32(60),
    snapshots_offset: Number(dv.getBigUint64(64)),
    incompatible_features: version >= 3 ? dv.getBigUint64(72) : 0n,
    refcount_order: version >= 3 ? dv.getUint32(96) : 4,
  };
}

/** Reads the refcount of `cluster` straight from the file (any refcount width). */
export function fileRefcount(file: string, cluster: number): bigint {
  const h = readHeader(file);
  const bits = 1 << h.refcount_order;
  const per_block = (h.cluster_size * 8) / bits;
  const rb = Number(readBe64(file, h.refcount_table_offset + 8 * Math.floor(cluster / per_block)) & ~0x1ffn);
  if (!rb) return 0n;
  const idx = cluster % per_block;
  const bitpos = idx * bits;
  if (bits >= 8) {
    const bytes = readAt(file, rb + bitpos / 8, bits / 8);
    let v = 0n;
    for (const b of bytes) v = (v << 8n) | BigInt(b);
    return v;
  }
  const byte = readAt(file, rb + Math.floor(bitpos / 8), 1)[0];
  return BigInt((byte >> (bitpos % 8)) & ((1 << bits) - 1));
}

/** Overwrites the refcount of `cluster` in the file (its refcount block must exist). */
export function setFileRefcount(file: string, cluster: number, value: bigint): void {
  const h = readHeader(file);
  const bits = 1 << h.refcount_order;
  const per_block = (h.cluster_size * 8) / bits;
  const rb = Number(readBe64(file, h.refcount_table_offset + 8 * Math.floor(cluster / per_block)) & ~0x1ffn);
  if (!rb) throw new Error(`no refcount block for cluster ${cluster}`);
  const bitpos = (cluster % per_block) * bits;
  if (bits >= 8) {
    const bytes = new Uint8Array(bits / 8);
    let v = value;
    for (let i = bytes.length - 1; i >= 0; i--) {
      bytes[i] = Number(v & 0xffn);
      v >>= 8n;
    }
    patch(file, rb + bitpos / 8, bytes);
    return;
  }
  const off = rb + Math.floor(bitpos / 8);
  let byte = readAt(file, off, 1)[0];
  const mask = ((1 << bits) - 1) << (bitpos % 8);
  byte = (byte & ~mask) | ((Number(value) << (bitpos % 8)) & mask);
  patch(file, off, Uint8Array.of(byte));
}

/** The L2 entry of guest cluster `guest_cluster` (standard 8-byte entries), or 0n. */
export function l2EntryAddr(file: string, guest_cluster: number): number {
  const h = readHeader(file);
  const l2_entries = h.cluster_size / 8;
  const l1e = readBe64(file, h.l1_table_offset + 8 * Math.floor(guest_cluster / l2_entries));
  const l2 = Number(l1e & 0x00fffffffffffe00n);
  if (!l2) throw new Error(`guest cluster ${guest_cluster} has no L2 table`);
  return l2 + 8 * (guest_cluster % l2_entries);
}
