/**
 * Interop, qcow2 images (issue 5, qemu-block.md sections 5 and 6): create, info, check, map,
 * compare, convert, resize and bench through QEMU 7.2's qemu-img and through aioco-img on copies
 * of the same fixtures (made by qemu-img and qemu-io); stdout, stderr, exit status and
 * resulting images compared (filters: fixtures/aioco-img-interop.ts).
 */
import { test } from 'uvu';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { registerCases, type Case } from './fixtures/aioco-img-interop.ts';

const work = mkdtempSync(path.join(tmpdir(), 'aioco-img-interop-qcow2-'));

const CASES: Case[] = [
  // qcow2: create
  { args: ['create', '-f', 'qcow2', 'n.qcow2', '64M'], files: ['n.qcow2'] },
  { args: ['create', '-f', 'qcow2', '-o', 'cluster_size=4k,lazy_refcounts=on,refcount_bits=8', 'o.qcow2', '10M'], files: ['o.qcow2'] },
  { args: ['create', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'ov2.qcow2'], files: ['ov2.qcow2'] },
  { args: ['create', '-f', 'qcow2', '-b', 'a.qcow2', 'x.qcow2'] },
  { args: ['create', '-f', 'qcow2', '-o', 'cluster_size=3k', 'x.qcow2', '1M'] },
  { args: ['create', '-f', 'qcow2', '-o', 'preallocation=metadata', 'pm.qcow2', '10M'], files: ['pm.qcow2'] },
  // qcow2: info, check, map
  { args: ['info', 'a.qcow2'] },
  { args: ['info', '--output=json', 'a.qcow2'] },
  { args: ['info', '--backing-chain', 'ov.qcow2'] },
  { args: ['info', '--backing-chain', '--output=json', 'ov.qcow2'] },
  { args: ['info', 'v2.qcow2'] },
  { args: ['info', 'snap.qcow2'] },
  { args: ['info', '--output=json', 'snap.qcow2'] },
  { args: ['info', '--output=json', 'dirty.qcow2'] },
  { args: ['info', 'dirty.qcow2'] },
  { args: ['info', '--backing-chain', 'sub/ov3.qcow2'] },
  { args: ['create', '-f', 'qcow2', '-b', '../a.qcow2', '-F', 'qcow2', 'sub/ov4.qcow2'], files: ['sub/ov4.qcow2'] },
  { args: ['check', 'a.qcow2'] },
  { args: ['check', '--output=json', 'a.qcow2'] },
  { args: ['check', 'leak.qcow2'] },
  { args: ['check', 'c1.qcow2'] },
  { args: ['check', '-r', 'leaks', 'leak.qcow2'], images: ['leak.qcow2'], diskSizeDiffers: true },
  { args: ['check', '-r', 'all', 'c1.qcow2'], images: ['c1.qcow2'], diskSizeDiffers: true },
  { args: ['check', 'comp.qcow2'] },
  { args: ['map', 'a.qcow2'] },
  { args: ['map', '--output=json', 'a.qcow2'] },
  { args: ['map', 'ov.qcow2'] },
  { args: ['map', 'comp.qcow2'] },
  // qcow2: compare, convert, resize, bench
  { args: ['compare', 'a.qcow2', 'conv.raw'] },
  { args: ['compare', 'a.qcow2', 'conv.qcow2'] },
  { args: ['compare', '-p', 'a.qcow2', 'conv.qcow2'] },
  { args: ['compare', '-s', 'a.qcow2', 'conv.qcow2'] },
  { args: ['compare', 'z64.qcow2', 'z32.raw'] },
  { args: ['convert', '-O', 'qcow2', 'a.qcow2', 'c.qcow2'], files: ['c.qcow2'] },
  { args: ['convert', '-p', '-O', 'qcow2', 'a.qcow2', 'c.qcow2'], files: ['c.qcow2'] },
  { args: ['convert', '-c', '-O', 'qcow2', 'a.qcow2', 'c.qcow2'], files: ['c.qcow2'] },
  // Out-of-order writes allocate clusters in completion order (QEMU's layout varies too): same content, clean image.
  { args: ['convert', '-W', '-m', '16', '-O', 'qcow2', '-o', 'cluster_size=4k', 'd.raw', 'c.qcow2'], contents: ['c.qcow2'] },
  { args: ['convert', '-O', 'qcow2', '-B', 'a.qcow2', '-F', 'qcow2', 'ov.qcow2', 'c.qcow2'], files: ['c.qcow2'] },
  { args: ['convert', '-O', 'qcow2', '-B', 'a.qcow2', 'ov.qcow2', 'c.qcow2'] },
  { args: ['convert', '-n', '--target-is-zero', '-O', 'qcow2', 'a.qcow2', 'z64.qcow2'], files: ['z64.qcow2'] },
  { args: ['convert', '-O', 'raw', 'ov.qcow2', 'c.raw'], files: ['c.raw'] },
  { args: ['resize', 'a.qcow2', '128M'], files: ['a.qcow2'] },
  { args: ['resize', '-f', 'qcow2', 'a.qcow2', '-1M'] },
  { args: ['bench', '-w', '-c', '1000', '-d', '32', '--pattern=0x5a', '-f', 'qcow2', 'a.qcow2'], files: ['a.qcow2'] },
];

registerCases(test, CASES, work);

test.after(() => rmSync(work, { recursive: true, force: true }));

test.run();
