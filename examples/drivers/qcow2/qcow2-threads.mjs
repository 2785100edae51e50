// Thread-pool functions of the qcow2 driver: zlib compression of clusters (QEMU 7.2:
// block/qcow2-threads.c). They run in aioco's pool workers; buffers are SharedArrayBuffer
// views (qemu_blockalign memory), so nothing is copied across threads but the result length.
// Plain JavaScript: a worker cannot load .ts by URL.
import * as zlib from 'node:zlib';

const EIO = 5;
const ENOMEM = 12;

/**
 * Compresses `src` into `dst` as raw deflate with a 4 KiB window (QEMU: deflateInit2 with
 * windowBits -12, memLevel 9, default level and strategy). Returns the compressed length,
 * -ENOMEM when the result does not fit in `dst` (the caller then writes the cluster
 * uncompressed), -EIO on other errors. QEMU: `qcow2_zlib_compress`.
 */
export function qcow2_zlib_compress({ src, src_offset, src_len, dst, dst_offset, dst_len }) {
  let out;
  try {
    out = zlib.deflateRawSync(new Uint8Array(src, src_offset, src_len), {
      windowBits: 12,
      memLevel: 9,
      level: zlib.constants.Z_DEFAULT_COMPRESSION,
      strategy: zlib.constants.Z_DEFAULT_STRATEGY,
    });
  } catch {
    return -EIO;
  }
  if (out.length > dst_len) return -ENOMEM;
  new Uint8Array(dst, dst_offset, dst_len).set(out);
  return out.length;
}

/**
 * Inflates raw deflate data from `src` until `dst` is full; bytes after the end of the stream
 * (the rest of the last 512-byte sector) are ignored. Returns 0, or -EIO if the data does not
 * produce exactly a full `dst`. QEMU: `qcow2_zlib_decompress`.
 */
export function qcow2_zlib_decompress({ src, src_offset, src_len, dst, dst_offset, dst_len }) {
  let out;
  try {
    out = zlib.inflateRawSync(new Uint8Array(src, src_offset, src_len), {
      windowBits: 15,
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
      maxOutputLength: dst_len + 1,
    });
  } catch (e) {
    // Output past dst_len means a corrupt descriptor; any other error is bad data.
    return -EIO;
  }
  if (out.length < dst_len) return -EIO;
  new Uint8Array(dst, dst_offset, dst_len).set(out.subarray(0, dst_len));
  return 0;
}
