// The 1 GiB data files the thread-pool and block benchmarks read and write, and their
// shared settings. Every 4 KiB block of the read file holds one non-zero byte derived
// from its index, so each read can be checked cheaply.
import * as fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const FILE_SIZE = 1 << 30;
export const BLOCK = 4096;
export const BLOCKS = FILE_SIZE / BLOCK;
export const DEPTH = 32;

/** A positive number from the environment, or `dflt`. */
export function envNumber(name: string, dflt: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return dflt;
  const x = Number(v);
  if (!Number.isFinite(x) || x <= 0) throw new Error(`bench: ${name} must be a positive number`);
  return x;
}

export function fail(what: string): never {
  throw new Error(`bench: ${what}`);
}

/** The byte every byte of block `block` of the read file holds. */
export function blockByte(block: number): number {
  return (block % 251) + 1;
}

export function dataDir(): string {
  return path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '.bench-data');
}

/** The patterned read file (BENCH_TP_FILE overrides it). */
export function readFilePath(): string {
  return process.env.BENCH_TP_FILE ?? path.join(dataDir(), 'thread-pool-1g.bin');
}

/** Whether `file` is the patterned read file (spot checks). */
export function readFileLooksRight(file: string): boolean {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return false;
  }
  try {
    if (fs.fstatSync(fd).size !== FILE_SIZE) return false;
    const b = Buffer.alloc(BLOCK);
    for (const blk of [0, 1, 12345, BLOCKS - 1]) {
      fs.readSync(fd, b, 0, BLOCK, blk * BLOCK);
      if (b[0] !== blockByte(blk) || b[BLOCK - 1] !== blockByte(blk)) return false;
    }
    return true;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Creates a 1 GiB file (atomically, by rename), every block written (no holes): with the
 * read pattern, or filled with `fillByte`.
 */
export function createFile(file: string, fillByte: number | null, log: (s: string) => void): void {
  log(`creating ${file} (1 GiB)`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  const chunk = Buffer.alloc(8 << 20, fillByte ?? 0);
  const perChunk = chunk.length / BLOCK;
  for (let c = 0; c < FILE_SIZE / chunk.length; c++) {
    if (fillByte === null) {
      for (let i = 0; i < perChunk; i++) chunk.fill(blockByte(c * perChunk + i), i * BLOCK, (i + 1) * BLOCK);
    }
    fs.writeSync(fd, chunk, 0, chunk.length, c * chunk.length);
  }
  fs.closeSync(fd);
  fs.renameSync(tmp, file);
}

/** Reads `file` through once so the page cache holds it. */
export function warmPageCache(file: string): void {
  const fd = fs.openSync(file, 'r');
  const b = Buffer.allocUnsafe(8 << 20);
  for (let pos = 0; pos < FILE_SIZE; pos += b.length) fs.readSync(fd, b, 0, b.length, pos);
  fs.closeSync(fd);
}
