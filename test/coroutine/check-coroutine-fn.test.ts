// scripts/check-coroutine-fn.ts: the static check for the half of coroutine_fn's rules the
// type system cannot see, a coroutine_fn called and its generator dropped (DESIGN.md,
// Coroutines; QEMU's clang-based coroutine_fn checker). Fixtures live in
// test/coroutine/fixtures/, which the project's own check never scans.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  checkCoroutineFn,
  defaultFileNames,
  formatProblem,
  formatSummary,
  type Problem,
} from '../../scripts/check-coroutine-fn.ts';

const root = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
const fixture = (name: string) => path.join(root, 'test/coroutine/fixtures', name);
const DROPPED = fixture('dropped.ts');
const OK = fixture('ok.ts');
const LOOKALIKE = fixture('lookalike.ts');
const rel = (f: string) => path.relative(root, f).split(path.sep).join('/');

const msg = (name: string) => `coroutine_fn ${name} called but its generator is dropped (use yield*)`;
const at = (line: number, col: number, name: string) => `test/coroutine/fixtures/dropped.ts:${line}:${col}: ${msg(name)}`;

/** Every drop in dropped.ts, in order. */
const EXPECTED_DROPPED = [
  at(47, 5, 'this.co_reset'), // inside a method
  at(56, 3, 'qemu_co_mutex_lock'), // (a) expression statement
  at(58, 8, 'work'), // (b) void
  at(59, 14, 'work'), // (c) non-final comma operand
  at(60, 18, 'work'), // (d) const never read
  at(61, 15, 'qemu_co_sleep_ns'), // (d) let never read
  at(62, 3, 'drv.co_read'), // method through an interface
  at(63, 3, 'drv.co_flush'), // optional call
  at(64, 3, 'dev.co_reset'), // method
  at(65, 3, 'Device.co_probe'), // static method
  at(66, 3, 'raw'), // Generator<CoroutineYield, ...> spelled without the alias
  at(67, 3, 'aliased'), // a user alias of CoroutineFn
  at(68, 3, 'generic'), // generic, explicit type argument
  at(69, 4, 'work'), // parenthesised statement
  at(70, 3, 'work'), // through `as`
  at(71, 10, 'work'), // ?: true branch
  at(71, 20, 'work'), // ?: false branch
  at(72, 3, 'drv.co_read'), // comma statement, first operand
  at(72, 19, 'dev.co_reset'), // comma statement, final operand (the statement drops it)
  at(73, 8, 'work'), // for initialiser
  at(73, 23, 'work'), // for update
  at(76, 7, 'work'), // write never read afterwards (line 74's write is read on line 75)
  at(78, 3, 'qemu_coroutine_yield'), // even the yield itself
  at(83, 3, 'qemu_co_mutex_lock'), // from plain code
  at(84, 3, 'drv.co_read'), // callee text spread over two lines, a comment inside
  at(91, 23, 'qemu_co_mutex_lock'), // body of an arrow passed as a void callback (forEach)
  at(92, 22, 'work'), // likewise (setImmediate)
  at(96, 9, 'work'), // await does not drive a generator
  at(97, 11, 'work'), // through ||
  at(98, 11, 'work'), // through && (right operand)
  at(99, 12, 'work'), // through ??
  at(101, 26, 'work'), // a per-iteration const never read
  at(104, 15, 'work'), // a write whose only read precedes it, with a new binding each round
];

function runCli(args: string[]): { status: number | null; stdout: string; stderr: string; ms: number } {
  const start = performance.now();
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'scripts/check-coroutine-fn.ts', ...args], {
    cwd: root,
    encoding: 'utf8',
    timeout: 120_000,
    env: { ...process.env, FORCE_COLOR: '0' },
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, ms: performance.now() - start };
}

test('dropped.ts: every dropped generator is reported, exactly, with file:line:col and callee name', () => {
  const problems = checkCoroutineFn([DROPPED]);
  assert.equal(problems.map(formatProblem), EXPECTED_DROPPED);
  // The structured form agrees with the text.
  const first: Problem | undefined = problems[0];
  assert.equal(first, {
    file: 'test/coroutine/fixtures/dropped.ts',
    line: 47,
    column: 5,
    name: 'this.co_reset',
    message: msg('this.co_reset'),
  });
});

test('dropped.ts: the reported lines are exactly the lines commented "dropped" (twice: two reports)', () => {
  // Keeps the fixture's comments and EXPECTED_DROPPED in step.
  const marked: number[] = [];
  readFileSync(DROPPED, 'utf8')
    .split('\n')
    .forEach((text, i) => {
      if (/\/\/ dropped twice:/.test(text)) marked.push(i + 1, i + 1);
      else if (/\/\/ dropped:/.test(text)) marked.push(i + 1);
    });
  assert.equal(
    checkCoroutineFn([DROPPED]).map((p) => p.line),
    marked,
  );
});

test('ok.ts: every legal use (yield*, return, argument, property, array, read variable, entry, kept callback result) passes', () => {
  assert.equal(checkCoroutineFn([OK]).map(formatProblem), []);
});

test('lookalike.ts: types that only share the names CoroutineFn/CoroutineYield are not coroutine_fns', () => {
  assert.equal(checkCoroutineFn([LOOKALIKE]).map(formatProblem), []);
});

test('several files: only the given files are reported, in file order', () => {
  const problems = checkCoroutineFn([OK, DROPPED, LOOKALIKE]);
  assert.equal(problems.map(formatProblem), EXPECTED_DROPPED);
});

test('the summary line', () => {
  assert.is(formatSummary(27, 0), 'coroutine_fn check: 27 files, 0 problems');
  assert.is(formatSummary(1, 1), 'coroutine_fn check: 1 file, 1 problem');
  assert.is(formatSummary(2, 25), 'coroutine_fn check: 2 files, 25 problems');
});

test('CLI on the bad fixture: prints each problem and the summary, exits 1', () => {
  const r = runCli(['test/coroutine/fixtures/dropped.ts']);
  assert.is(r.stderr, '');
  assert.is(r.stdout, [...EXPECTED_DROPPED, 'coroutine_fn check: 1 file, 33 problems', ''].join('\n'));
  assert.is(r.status, 1);
});

test('CLI on the good fixtures: exits 0', () => {
  const r = runCli(['test/coroutine/fixtures/ok.ts', 'test/coroutine/fixtures/lookalike.ts']);
  assert.is(r.stderr, '');
  assert.is(r.stdout, 'coroutine_fn check: 2 files, 0 problems\n');
  assert.is(r.status, 0);
});

test('CLI with a missing file: usage error, exit 2', () => {
  const r = runCli(['test/coroutine/fixtures/no-such-file.ts']);
  assert.is(
    r.stdout,
    'usage: node --import tsx scripts/check-coroutine-fn.ts [file.ts ...]\n' +
      'check-coroutine-fn: no such file: test/coroutine/fixtures/no-such-file.ts\n',
  );
  assert.is(r.status, 2);
});

function walkTs(dir: string): string[] {
  const out: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return out;
  }
  for (const name of names) {
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walkTs(p));
    else if (/\.[cm]?tsx?$/.test(name)) out.push(p); // what tsconfig's "include" picks up
  }
  return out;
}

test('the default run covers src/, examples/, bench/ and scripts/, and never test/', () => {
  const files = defaultFileNames().map(rel);
  const onDisk = ['src', 'examples', 'bench', 'scripts'].flatMap((d) => walkTs(path.join(root, d))).map(rel).sort();
  assert.equal(files, onDisk);
  assert.ok(files.includes('src/coroutine/coroutine.ts'));
  assert.ok(files.includes('scripts/check-coroutine-fn.ts'));
  assert.equal(
    files.filter((f) => f.startsWith('test/')),
    [],
  );
});

test('the real tree has no dropped coroutine_fn generator', () => {
  assert.equal(checkCoroutineFn(defaultFileNames()).map(formatProblem), []);
});

test('CLI on the real tree (npm run check:coroutine-fn): 0 problems, exit 0', () => {
  const r = runCli([]);
  assert.is(r.stdout, `${formatSummary(defaultFileNames().length, 0)}\n`);
  assert.is(r.stderr, '');
  assert.is(r.status, 0);
});

test.run();
