/**
 * Guest memory: buffers for I/O, carved from large SharedArrayBuffer slabs so worker
 * threads read and write them in place. QEMU: `qemu_memalign` / `qemu_vfree` (util/oslib).
 *
 * JS cannot see addresses, but O_DIRECT needs buffers aligned in real memory. Each slab
 * has a "phase": the byte offset inside it from which O_DIRECT accepts the memory. It is
 * assumed 0 until an O_DIRECT probe measures it (`guestMemoryProbePhase`); views are handed
 * out at phase + k * alignment. Measured here: a SharedArrayBuffer starts 16 bytes past a
 * page (malloc's header), and the probe finds phase 496, i.e. alignment as fine as the
 * device requires (512 bytes on a 512-byte-sector disk): the probe cannot tell more. The
 * thread pool's workers retry an O_DIRECT EINVAL through an aligned buffer of their own,
 * so memory layout never fails a request, it only costs a copy.
 */
import { readSync } from 'node:fs';
import { QemuError } from './error.ts';

/** @internal a registered SharedArrayBuffer that workers know by id. */
export interface Slab {
  id: number;
  sab: SharedArrayBuffer;
  /** Offset from which O_DIRECT accepts the memory (0 assumed until probed). */
  phase: number;
  phaseKnown: boolean;
}

const SLAB_SIZE = 4 << 20;
const MAX_CLASS = 1 << 20;
const MIN_CLASS = 512;
/** Each slab's first 16 KiB are never handed out: the phase probe reads into them. */
const PROBE_AREA = 16384;
/** The probe's read: two pages, so it crosses a page boundary wherever it starts. */
const PROBE_LEN = 8192;
/** An O_DIRECT descriptor to probe new slabs with, once one is known. */
let probeFd = -1;

/** @internal every slab by id; workers receive each once. */
export const slabs: Slab[] = [];
const slabBySab = new WeakMap<SharedArrayBuffer, Slab>();
/** @internal called for each new slab (the thread pool sends it to its workers). */
export const slabHooks: { onNewSlab: (s: Slab) => void } = { onNewSlab: () => {} };

interface Allocation {
  slab: Slab;
  offset: number;
  cls: number; // size class, 0 for a dedicated slab
  freed: boolean;
  /** The slab's phase when this was handed out: reused only while it still holds. */
  phase: number;
}
const allocations = new WeakMap<Uint8Array, Allocation>();
const freeLists = new Map<number, { slab: Slab; offset: number }[]>();
let current: Slab | null = null;
let bump = 0;

/**
 * @internal The slab a SharedArrayBuffer belongs to, registering it on first sight, so
 * any SharedArrayBuffer-backed view (not only ours) can travel to workers by id.
 */
export function slabOf(sab: SharedArrayBuffer): Slab {
  let s = slabBySab.get(sab);
  if (s === undefined) {
    s = { id: slabs.length, sab, phase: 0, phaseKnown: false };
    slabs.push(s);
    slabBySab.set(sab, s);
    slabHooks.onNewSlab(s);
  }
  return s;
}

const ownSlabs = new WeakSet<Slab>();
function newSlab(size: number): Slab {
  const s = slabOf(new SharedArrayBuffer(size));
  ownSlabs.add(s);
  if (probeFd >= 0) probeSlab(s, probeFd);
  return s;
}

function isPow2(n: number): boolean {
  return Number.isInteger(n) && n > 0 && n <= 2 ** 30 && (n & (n - 1)) === 0;
}

/** Offset >= `from` in `slab` whose real address is a multiple of `align`. */
function alignUp(slab: Slab, from: number, align: number): number {
  const rel = from - slab.phase;
  const up = Math.ceil(rel / align) * align;
  return up + slab.phase;
}

/**
 * Allocates `size` bytes aligned to `alignment` in real memory, backed by a
 * SharedArrayBuffer. QEMU: `qemu_memalign`. Release it with `qemu_vfree`.
 * Surprises: the contents are not zeroed (a reused buffer holds old data, as in C); and
 * `byteOffset` is not necessarily a multiple of `alignment`, since alignment is of the
 * real address, which JS cannot see.
 */
export function qemu_memalign(alignment: number, size: number): Uint8Array {
  if (!isPow2(alignment)) throw new QemuError(`qemu_memalign: alignment ${alignment} is not a power of two`);
  if (!Number.isInteger(size) || size < 0) throw new QemuError(`qemu_memalign: invalid size ${size}`);
  const need = Math.max(size, 1);
  let cls = MIN_CLASS;
  while (cls < need || cls < alignment) cls *= 2;
  if (cls > MAX_CLASS) {
    const slab = newSlab(PROBE_AREA + Math.ceil((need + Math.max(alignment, 4096)) / 4096) * 4096);
    const offset = alignUp(slab, PROBE_AREA, alignment);
    const view = new Uint8Array(slab.sab, offset, size);
    allocations.set(view, { slab, offset, cls: 0, freed: false, phase: slab.phase });
    return view;
  }
  const list = freeLists.get(cls);
  let slab: Slab;
  let offset: number;
  const reuse = list?.pop();
  if (reuse !== undefined) {
    slab = reuse.slab;
    offset = reuse.offset;
  } else {
    if (current === null || alignUp(current, bump, cls) + cls > current.sab.byteLength) {
      current = newSlab(SLAB_SIZE);
      bump = PROBE_AREA;
    }
    slab = current;
    offset = alignUp(slab, bump, cls);
    bump = offset + cls;
  }
  const view = new Uint8Array(slab.sab, offset, size);
  allocations.set(view, { slab, offset, cls, freed: false, phase: slab.phase });
  return view;
}

/**
 * Returns memory from `qemu_memalign`/`qemu_blockalign` for reuse. QEMU: `qemu_vfree`.
 * Freeing the same buffer twice throws; other views are ignored (as `qemu_vfree(NULL)`).
 */
export function qemu_vfree(p: Uint8Array | null): void {
  if (p === null) return;
  const a = allocations.get(p);
  if (a === undefined) return;
  if (a.freed) throw new QemuError('qemu_vfree: buffer freed twice');
  a.freed = true;
  // A block placed before the slab's phase was measured is misaligned: never hand it out again.
  if (a.cls === 0 || a.phase !== a.slab.phase) return;
  let list = freeLists.get(a.cls);
  if (list === undefined) freeLists.set(a.cls, (list = []));
  list.push({ slab: a.slab, offset: a.offset });
}

/**
 * @internal True if `view` starts and ends on `align` boundaries of real memory, as far
 * as known (SharedArrayBuffer-backed only).
 */
export function guestMemoryIsAligned(view: Uint8Array, align: number): boolean {
  if (!(view.buffer instanceof SharedArrayBuffer)) return false;
  const s = slabOf(view.buffer);
  return (view.byteOffset - s.phase) % align === 0 && view.byteLength % align === 0;
}

/**
 * Finds where O_DIRECT accepts `s`'s memory: the first offset (in 8-byte steps; JS
 * buffers start wherever malloc put them, e.g. 16 bytes past a page) at which a
 * two-page O_DIRECT read succeeds. The device's rule, whatever it is (512-byte or
 * 4096-byte alignment), is then met by offsets phase + k * alignment.
 */
function probeSlab(s: Slab, fd: number): boolean {
  for (let off = 0; off < 4096; off += 8) {
    try {
      readSync(fd, new Uint8Array(s.sab, off, PROBE_LEN), 0, PROBE_LEN, 0);
      s.phase = off;
      s.phaseKnown = true;
      return true;
    } catch {
      // EINVAL: not aligned here; try the next step.
    }
  }
  return false;
}

/**
 * @internal Measures every unprobed slab's phase with O_DIRECT reads on `fd` (opened with
 * O_DIRECT on a file of at least 8 KiB, which is only read), and remembers `fd` for slabs
 * made later. Returns how many slabs were probed. The file driver calls it on its first
 * `cache.direct=on` open; until then buffers are assumed aligned at offset 0 and O_DIRECT
 * I/O must bounce when they are not.
 */
export function guestMemoryProbePhase(fd: number): number {
  let n = 0;
  for (const s of slabs) {
    if (s.phaseKnown || !ownSlabs.has(s)) continue;
    if (probeSlab(s, fd)) n++;
  }
  if (n > 0 || slabs.length === 0) probeFd = fd;
  // Free lists hold views placed before the probe: drop them rather than hand out misaligned memory.
  if (n > 0) freeLists.clear();
  return n;
}
