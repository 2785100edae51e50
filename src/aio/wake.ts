/**
 * The process-wide wake word: the one thing a blocked main thread waits on. Worker
 * threads (the thread pool) bump it and `Atomics.notify` after posting a completion;
 * a blocking wait reads it before checking for work and sleeps only while it is
 * unchanged, so no wake-up is lost between the check and the sleep.
 */

/** @internal [0] = sequence number bumped on every wake-up. */
export const wakeBuffer = new SharedArrayBuffer(8);
/** @internal */
export const wakeWord = new Int32Array(wakeBuffer);

/** @internal the current sequence number; pass it to `wakeWait`. */
export function wakeSeq(): number {
  return Atomics.load(wakeWord, 0);
}

/**
 * @internal Blocks the JS thread until the word moves past `seq` or `ms` pass (Infinity
 * for no limit). Returns at once if it has already moved.
 */
export function wakeWait(seq: number, ms: number): void {
  Atomics.wait(wakeWord, 0, seq, ms);
}

/** @internal Wakes a blocked main thread (callable from any thread holding the buffer). */
export function wakeKick(): void {
  Atomics.add(wakeWord, 0, 1);
  Atomics.notify(wakeWord, 0);
}
