// A thread-pool worker: takes requests from the shared submission ring, runs them, and
// posts results to the completion ring. Built-in file operations work on guest memory in
// place (views on SharedArrayBuffer slabs); user functions are loaded by URL, TypeScript
// ones through tsx. Plain JavaScript: a worker cannot load .ts by URL (DESIGN.md).
import { workerData, parentPort, receiveMessageOnPort } from 'node:worker_threads';
import * as fs from 'node:fs';
import {
  C_SUB_HEAD, C_SUB_TAIL, C_SUB_SEQ, C_IDLE, C_LIVE, C_MIN, C_SUB_RING, C_WORKER, W_STRIDE,
  C_SLOT, S_STRIDE, C_IOV, MAX_IOV, F_STRIDE, SLOT_MASK, ST_QUEUED, ST_ACTIVE, ST_DONE,
  OP_NOP, OP_PREADV, OP_PWRITEV, OP_FSYNC, OP_FDATASYNC, OP_FTRUNCATE, OP_FSTAT_SIZE,
  OP_WRITE_ZEROES, OP_USER, EIO, C_BOOTING, C_SOFT_CAP, pushCompletion, reclaimWorker,
} from './thread-pool-layout.mjs';

const { ctlSab, f64Sab, wakeSab, id } = workerData;
const ctl = new Int32Array(ctlSab);
const f64 = new Float64Array(f64Sab);
const wake = new Int32Array(wakeSab);
const wb = C_WORKER + id * W_STRIDE;
const EINVAL = 22;

const slabs = [];
for (const [sid, sab] of workerData.slabs) slabs[sid] = sab;
// slot -> [generation, arg]: a newer request in the same slot replaces an older one,
// whichever worker ran it, so this holds at most one entry per slot.
const pendingArgs = new Map();
for (const [key, arg] of workerData.args) {
  const [slot, gen] = key.split(':').map(Number);
  pendingArgs.set(slot, [gen, arg]);
}
const funcs = new Map(workerData.funcs);
const loaded = new Map();
const reportedThrow = new Set();

function handle(msg) {
  switch (msg.t) {
    case 'slab': slabs[msg.id] = msg.sab; break;
    case 'arg': {
      const [slot, gen] = msg.key.split(':').map(Number);
      pendingArgs.set(slot, [gen, msg.arg]);
      break;
    }
    case 'func': funcs.set(msg.id, msg.func); break;
  }
}
function drainPort() {
  let m;
  while ((m = receiveMessageOnPort(parentPort)) !== undefined) handle(m.message);
}

process.on('exit', () => reclaimWorker(ctl, f64, wake, id, 'exited'));

function queueEmpty() {
  return Atomics.load(ctl, C_SUB_HEAD) === Atomics.load(ctl, C_SUB_TAIL);
}

function take() {
  for (;;) {
    const h = Atomics.load(ctl, C_SUB_HEAD);
    if (h === Atomics.load(ctl, C_SUB_TAIL)) return -1;
    const slot = Atomics.load(ctl, C_SUB_RING + (h & SLOT_MASK));
    if (Atomics.compareExchange(ctl, C_SUB_HEAD, h, (h + 1) | 0) === h) return slot;
  }
}

/** Waits for work; false when this worker should exit (idle 10 s, above the minimum). */
function booted() {
  if (Atomics.compareExchange(ctl, wb + 3, 1, 0) === 1) Atomics.sub(ctl, C_BOOTING, 1);
}

function idleWait() {
  Atomics.add(ctl, C_IDLE, 1);
  booted();
  const seq = Atomics.load(ctl, C_SUB_SEQ);
  let r = 'not-equal';
  const extra = Atomics.load(ctl, C_LIVE) > Atomics.load(ctl, C_SOFT_CAP);
  if (queueEmpty()) r = Atomics.wait(ctl, C_SUB_SEQ, seq, extra ? 1000 : 10000);
  Atomics.sub(ctl, C_IDLE, 1);
  if (r !== 'timed-out' || !queueEmpty()) return true;
  const live = Atomics.sub(ctl, C_LIVE, 1) - 1;
  if (live < Atomics.load(ctl, C_MIN) || !queueEmpty()) {
    Atomics.add(ctl, C_LIVE, 1);
    return true;
  }
  // Gone for good: nobody reports an idle exit.
  Atomics.store(ctl, wb + 1, 0);
  return false;
}

function views(slot, niov) {
  const out = new Array(niov);
  const base = C_IOV + slot * MAX_IOV * 3;
  for (let i = 0; i < niov; i++) {
    const sid = ctl[base + i * 3];
    if (slabs[sid] === undefined) drainPort();
    const sab = slabs[sid];
    if (sab === undefined) throw Object.assign(new Error(`unknown slab ${sid}`), { errno: -EIO });
    out[i] = new Uint8Array(sab, ctl[base + i * 3 + 1], ctl[base + i * 3 + 2]);
  }
  return out;
}

function remaining(vs, skip) {
  const out = [];
  for (const v of vs) {
    if (skip >= v.length) { skip -= v.length; continue; }
    out.push(skip ? v.subarray(skip) : v);
    skip = 0;
  }
  return out;
}

function total(vs) {
  let n = 0;
  for (const v of vs) n += v.length;
  return n;
}

function preadvFull(fd, vs, pos) {
  const len = total(vs);
  let done = 0;
  while (done < len) {
    const n = vs.length === 1
      ? fs.readSync(fd, vs[0], done, len - done, pos + done)
      : fs.readvSync(fd, remaining(vs, done), pos + done);
    if (n === 0) {
      // End of file: the rest reads as zeroes, as QEMU's handle_aiocb_rw does.
      for (const v of remaining(vs, done)) v.fill(0);
      break;
    }
    done += n;
  }
  return 0;
}

function pwritevFull(fd, vs, pos) {
  const len = total(vs);
  let done = 0;
  while (done < len) {
    const n = vs.length === 1
      ? fs.writeSync(fd, vs[0], done, len - done, pos + done)
      : fs.writevSync(fd, remaining(vs, done), pos + done);
    if (n === 0) return -EINVAL;
    done += n;
  }
  return 0;
}

// O_DIRECT refuses memory that is not aligned the way the device wants, and JS cannot
// see addresses. On EINVAL the request is retried through this worker's own buffer at
// the offset where O_DIRECT accepts it (found once, by trying), as QEMU bounces
// misaligned requests: JS memory layout never causes an EINVAL.
let direct = null; // { sab, phase }
const PROBE_LEN = 8192;
function directBuffer(fd, len) {
  if (direct === null || direct.sab.byteLength < direct.phase + len) {
    const sab = new SharedArrayBuffer(Math.max(len, PROBE_LEN) + 8192);
    let phase = -1;
    let size = 0;
    try {
      size = fs.fstatSync(fd).size;
    } catch {
      size = 0;
    }
    if (size >= PROBE_LEN) {
      for (let off = 0; off < 4096; off += 8) {
        try {
          fs.readSync(fd, new Uint8Array(sab, off, PROBE_LEN), 0, PROBE_LEN, 0);
          phase = off;
          break;
        } catch {
          // not here
        }
      }
    }
    direct = { sab, phase };
  }
  return direct;
}

function rwAligned(fd, vs, pos, write) {
  try {
    return write ? pwritevFull(fd, vs, pos) : preadvFull(fd, vs, pos);
  } catch (e) {
    if (!e || e.code !== 'EINVAL') throw e;
  }
  const len = total(vs);
  const d = directBuffer(fd, len);
  // Without a measured phase (a file under 8 KiB), each offset is tried with the request itself.
  const candidates = d.phase >= 0 ? [d.phase] : Array.from({ length: 512 }, (_, i) => i * 8);
  let lastErr = null;
  for (const off of candidates) {
    const b = new Uint8Array(d.sab, off, len);
    try {
      if (write) {
        let o = 0;
        for (const v of vs) {
          b.set(v, o);
          o += v.length;
        }
        return pwritevFull(fd, [b], pos);
      }
      const r = preadvFull(fd, [b], pos);
      let o = 0;
      for (const v of vs) {
        v.set(b.subarray(o, o + v.length));
        o += v.length;
      }
      return r;
    } catch (e) {
      if (!e || e.code !== 'EINVAL') throw e;
      lastErr = e;
    }
  }
  throw lastErr;
}

let zeroes = null;
function writeZeroes(fd, pos, len) {
  zeroes ??= new Uint8Array(1 << 20);
  let done = 0;
  while (done < len) {
    const n = fs.writeSync(fd, zeroes, 0, Math.min(zeroes.length, len - done), pos + done);
    if (n === 0) return -EINVAL;
    done += n;
  }
  return 0;
}

async function userFunc(fid) {
  if (!funcs.has(fid)) drainPort();
  const f = funcs.get(fid);
  if (f === undefined) throw Object.assign(new Error(`unknown function ${fid}`), { errno: -EIO });
  let fn = loaded.get(fid);
  if (fn === undefined) {
    if (/\.[mc]?ts$/.test(new URL(f.url).pathname)) {
      const { register } = await import('tsx/esm/api');
      register();
    }
    const mod = await import(f.url);
    fn = mod[f.exportName];
    if (typeof fn !== 'function') {
      throw Object.assign(new Error(`${f.url} has no exported function '${f.exportName}'`), { errno: -EIO });
    }
    loaded.set(fid, fn);
  }
  return [f, fn];
}

function takeArg(slot, gen) {
  if (pendingArgs.get(slot)?.[0] !== gen) drainPort();
  const e = pendingArgs.get(slot);
  if (e === undefined || e[0] !== gen) throw Object.assign(new Error(`no argument for request ${slot}:${gen}`), { errno: -EIO });
  pendingArgs.delete(slot);
  return e[1];
}

function run(slot) {
  const sb = C_SLOT + slot * S_STRIDE;
  const fb = slot * F_STRIDE;
  const op = ctl[sb + 1];
  const fd = ctl[sb + 2];
  switch (op) {
    case OP_NOP: return 0;
    case OP_PREADV: return rwAligned(fd, views(slot, ctl[sb + 3]), f64[fb], false);
    case OP_PWRITEV: return rwAligned(fd, views(slot, ctl[sb + 3]), f64[fb], true);
    case OP_FSYNC: fs.fsyncSync(fd); return 0;
    case OP_FDATASYNC: fs.fdatasyncSync(fd); return 0;
    case OP_FTRUNCATE: fs.ftruncateSync(fd, f64[fb + 1]); return 0;
    case OP_FSTAT_SIZE: return fs.fstatSync(fd).size;
    case OP_WRITE_ZEROES: return writeZeroes(fd, f64[fb], f64[fb + 1]);
    default: return -EINVAL;
  }
}

async function runUser(slot) {
  const sb = C_SLOT + slot * S_STRIDE;
  {
    {
      const arg = takeArg(slot, ctl[sb + 4]);
      const [f, fn] = await userFunc(ctl[sb + 5]);
      try {
        let r = fn(arg);
        if (r !== null && typeof r === 'object' && typeof r.then === 'function') r = await r;
        if (typeof r !== 'number' || !Number.isFinite(r)) {
          fs.writeSync(2, `aioco: thread pool function '${f.exportName}' returned ${String(r)}, not a number; it completes with -EINVAL\n`);
          return -EINVAL;
        }
        return r;
      } catch (e) {
        if (!reportedThrow.has(f)) {
          reportedThrow.add(f);
          fs.writeSync(2, `aioco: thread pool function '${f.exportName}' threw (it completes with -EIO): ${e && e.stack || e}\n`);
        }
        return -EIO;
      }
    }
  }
}

function errnoOf(e) {
  const n = e && typeof e.errno === 'number' ? e.errno : 0;
  return n < 0 ? n : n > 0 ? -n : -EIO;
}

async function main() {
  // The watchdog must be watching this worker before it takes a request (see reclaimWorker).
  for (let i = 0; i < 100 && Atomics.load(ctl, wb + 2) === 0; i++) Atomics.wait(ctl, wb + 2, 0, 50);
  for (;;) {
    const slot = take();
    // Counted as booting until it holds a request or is idle, so the main thread never
    // sees it as neither (and spawns one more) in between.
    if (slot >= 0) booted();
    if (slot < 0) {
      if (!idleWait()) break;
      continue;
    }
    const sb = C_SLOT + slot * S_STRIDE;
    Atomics.store(ctl, wb, slot + 1);
    if (Atomics.compareExchange(ctl, sb, ST_QUEUED, ST_ACTIVE) !== ST_QUEUED) {
      // Cancelled while queued: hand the slot back so the main thread can reuse it.
      Atomics.store(ctl, wb, 0);
      pushCompletion(ctl, wake, slot);
      continue;
    }
    let ret;
    try {
      ret = ctl[sb + 1] === OP_USER ? await runUser(slot) : run(slot);
    } catch (e) {
      ret = errnoOf(e);
    }
    f64[slot * F_STRIDE + 2] = ret;
    Atomics.store(ctl, wb, 0);
    if (Atomics.compareExchange(ctl, sb, ST_ACTIVE, ST_DONE) === ST_ACTIVE) pushCompletion(ctl, wake, slot);
  }
}

main();
