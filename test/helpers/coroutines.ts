// Helpers for driving coroutines in tests (not a test file: the runner only runs *.test.ts).
import { qemu_coroutine_create, qemu_coroutine_enter, qemu_coroutine_self, type Coroutine, type CoroutineFn } from '../../src/index.ts';

/** The name of the running coroutine; `fallback` when it has none. */
export function selfName(fallback?: string): string {
  return (qemu_coroutine_self().name ?? fallback) as string;
}

/** Creates a coroutine named `name` on `entry(opaque)` and enters it at once; returns it. */
export function start<A>(entry: (opaque: A) => CoroutineFn<void>, opaque: A, name: string): Coroutine {
  const co = qemu_coroutine_create(entry, opaque, name);
  qemu_coroutine_enter(co);
  return co;
}
