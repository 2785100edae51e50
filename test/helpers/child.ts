// Child-process runners for tests of whole programs (not a test file: the runner only runs
// *.test.ts). Every child is bounded in time.
import { spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { fileURLToPath } from 'node:url';

/** The repository root: children run from here, so `--import tsx` and relative paths resolve. */
export const root = fileURLToPath(new URL('../..', import.meta.url));

export interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Wall time from spawn to close. */
  ms: number;
}

/**
 * Runs `node ...args` (from `cwd`, the repository root by default) with FORCE_COLOR=0 and
 * collects its output; killed with SIGKILL after `timeoutMs` (then `signal` is 'SIGKILL').
 */
export function runNode(args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<ChildResult> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  return new Promise((resolve) => {
    const start = Date.now();
    const child = spawn(process.execPath, args, {
      cwd: opts.cwd ?? root,
      env: { ...process.env, FORCE_COLOR: '0' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => (stdout += b));
    child.stderr.on('data', (b: Buffer) => (stderr += b));
    const killer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(killer);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - start });
    });
  });
}

/**
 * Runs `node ...args` synchronously from the repository root with `env` (this process's by
 * default); killed after `timeoutMs`.
 */
export function runNodeSync(args: string[], opts: { timeoutMs: number; env?: NodeJS.ProcessEnv }): SpawnSyncReturns<string> {
  return spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8', timeout: opts.timeoutMs, env: opts.env ?? process.env });
}
