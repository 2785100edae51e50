// The qcow2 compression worker functions called directly (the driver runs them in the thread
// pool): raw deflate with a 4 KiB window that QEMU's zlib settings can inflate, -ENOMEM when
// the result does not fit, -EIO for bad or short input. Facts: reference/qemu-block.md 6.4.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as zlib from 'node:zlib';
// @ts-expect-error plain JavaScript module without types
import { qcow2_zlib_compress, qcow2_zlib_decompress } from '../../../../examples/drivers/qcow2/qcow2-threads.mjs';
import { prng } from '../../../helpers/prng.ts';

function sab(bytes: Uint8Array): SharedArrayBuffer {
  const b = new SharedArrayBuffer(bytes.length);
  new Uint8Array(b).set(bytes);
  return b;
}

test('compress then decompress round-trips a cluster; trailing bytes after the stream are ignored', () => {
  const src = new Uint8Array(65536);
  for (let i = 0; i < src.length; i++) src[i] = (i >> 7) & 0xff;
  const dst = new SharedArrayBuffer(65535);
  const len = qcow2_zlib_compress({ src: sab(src), src_offset: 0, src_len: 65536, dst, dst_offset: 0, dst_len: 65535 });
  assert.ok(len > 0 && len < 2000, `compressed to ${len}`);
  // zlib with windowBits -12 (what QEMU's inflateInit2 uses) reads it.
  const plain = zlib.inflateRawSync(new Uint8Array(dst, 0, len), { windowBits: 12 });
  assert.equal(new Uint8Array(plain), src);
  // Packed like qcow2 stores it: the rest of the last sector holds unrelated bytes.
  const packed = new Uint8Array(Math.ceil(len / 512) * 512).fill(0xee);
  packed.set(new Uint8Array(dst, 0, len));
  const out = new SharedArrayBuffer(65536 + 16);
  assert.is(qcow2_zlib_decompress({ src: sab(packed), src_offset: 0, src_len: packed.length, dst: out, dst_offset: 16, dst_len: 65536 }), 0);
  assert.equal(new Uint8Array(out, 16, 65536), src);
});

test('incompressible data: -ENOMEM (written uncompressed by the driver); garbage or short streams: -EIO', () => {
  const rnd = new Uint8Array(65536);
  const r = prng(7);
  for (let i = 0; i < rnd.length; i++) rnd[i] = Math.floor(r() * 256);
  const dst = new SharedArrayBuffer(65535);
  assert.is(qcow2_zlib_compress({ src: sab(rnd), src_offset: 0, src_len: 65536, dst, dst_offset: 0, dst_len: 65535 }), -12);
  const out = new SharedArrayBuffer(65536);
  assert.is(qcow2_zlib_decompress({ src: sab(rnd.subarray(0, 512)), src_offset: 0, src_len: 512, dst: out, dst_offset: 0, dst_len: 65536 }), -5);
  const small = zlib.deflateRawSync(new Uint8Array(1000), { windowBits: 12 });
  assert.is(qcow2_zlib_decompress({ src: sab(small), src_offset: 0, src_len: small.length, dst: out, dst_offset: 0, dst_len: 65536 }), -5);
});

test.run();
