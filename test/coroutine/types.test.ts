// The type-level half of coroutine_fn's rules (DESIGN.md, Coroutines): only a generator
// typed CoroutineFn<T> can suspend, it may yield nothing but qemu_coroutine_yield()'s
// token, it may only `yield*` other coroutine_fns, and a CoroutineEntry must return a
// coroutine_fn. The fixtures are compiled with the project's compiler options through the
// TypeScript compiler API; they are excluded from the project's own `tsc --noEmit`.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readFileSync } from 'node:fs';
import ts from 'typescript';

const root = path.resolve(fileURLToPath(new URL('../..', import.meta.url)));
const fixtures = path.join(root, 'test/coroutine/fixtures');
const TYPE_ERRORS = path.join(fixtures, 'type-errors.ts');
const OK = path.join(fixtures, 'ok.ts');
const DROPPED = path.join(fixtures, 'dropped.ts');
const LOOKALIKE = path.join(fixtures, 'lookalike.ts');

function parseTsconfig(): ts.ParsedCommandLine {
  const configPath = path.join(root, 'tsconfig.json');
  const read = ts.readConfigFile(configPath, ts.sys.readFile);
  if (read.error) throw new Error(ts.flattenDiagnosticMessageText(read.error.messageText, '\n'));
  return ts.parseJsonConfigFileContent(read.config, ts.sys, root, undefined, configPath);
}

// One program for every fixture: each file's diagnostics are its own.
const program = ts.createProgram({
  rootNames: [TYPE_ERRORS, OK, DROPPED, LOOKALIKE],
  options: { ...parseTsconfig().options, noEmit: true },
});

/** A diagnostic as `line: TSnnnn first line of message` (1-based line). */
function describe(d: ts.Diagnostic): string {
  const first = ts.flattenDiagnosticMessageText(d.messageText, '\n').split('\n')[0];
  const line = d.file !== undefined && d.start !== undefined ? d.file.getLineAndCharacterOfPosition(d.start).line + 1 : 0;
  return `${line}: TS${d.code} ${first}`;
}

function diagnosticsOf(file: string): ts.Diagnostic[] {
  const sf = program.getSourceFile(file);
  if (sf === undefined) throw new Error(`not in the program: ${file}`);
  return [...program.getSyntacticDiagnostics(sf), ...program.getSemanticDiagnostics(sf)];
}

/** Sorts `line: ...` strings by line number, then text. */
function byLine(a: string, b: string): number {
  return parseInt(a, 10) - parseInt(b, 10) || (a < b ? -1 : a > b ? 1 : 0);
}

/**
 * The expected diagnostics from the `// @error` markers: `// @error TSnnnn message` is one
 * diagnostic with that code and first message line; `// @error TSaaaa TSbbbb` lists
 * several by code only.
 */
function expectedFromMarkers(file: string): { full: string[]; codes: string[] } {
  const full: string[] = [];
  const codes: string[] = [];
  readFileSync(file, 'utf8')
    .split('\n')
    .forEach((text, i) => {
      if (text.trimStart().startsWith('//')) return;
      const m = /\s\/\/ @error ((?:TS\d+ ?)+)(.*)$/.exec(text);
      if (m === null) return;
      const list = m[1].trim().split(' ');
      const message = m[2].trim();
      if (message !== '' && list.length !== 1) throw new Error(`line ${i + 1}: a message needs exactly one code`);
      for (const code of list) {
        codes.push(`${i + 1}: ${code}`);
        if (message !== '') full.push(`${i + 1}: ${code} ${message}`);
      }
    });
  return { full, codes };
}

test('the project tsconfig excludes the fixtures but typechecks the tests next to them', () => {
  const names = parseTsconfig().fileNames.map((f) => path.relative(root, path.resolve(f)).split(path.sep).join('/'));
  assert.equal(
    names.filter((f) => f.startsWith('test/coroutine/fixtures/')),
    [],
  );
  assert.ok(names.includes('test/coroutine/types.test.ts'), 'types.test.ts is typechecked');
  assert.ok(names.includes('scripts/check-coroutine-fn.ts'), 'the check script is typechecked');
});

test('the compiler options are free of errors (no global or option diagnostics)', () => {
  assert.equal(program.getGlobalDiagnostics().map(describe), []);
  assert.equal(program.getOptionsDiagnostics().map(describe), []);
});

test('type-errors.ts: every marked line fails to compile, with the marked error, and nothing else fails', () => {
  const expected = expectedFromMarkers(TYPE_ERRORS);
  const actual = diagnosticsOf(TYPE_ERRORS).map(describe).sort(byLine);
  // Guard against the markers silently disappearing: the fixture has 13 marked lines.
  assert.is(new Set(expected.codes.map((c) => parseInt(c, 10))).size, 13);
  // Codes on exactly the marked lines, as many as marked...
  assert.equal(
    actual.map((d) => d.replace(/^(\d+: TS\d+).*$/, '$1')).sort(byLine),
    [...expected.codes].sort(byLine),
  );
  // ...and, where a marker gives the message, that message.
  const withMessage = new Set(expected.full.map((e) => parseInt(e, 10)));
  assert.equal(
    actual.filter((d) => withMessage.has(parseInt(d, 10))),
    [...expected.full].sort(byLine),
  );
});

test('type-errors.ts: bare yield, yield 42, yield* of non-coroutine_fns, a misused result, a plain function as CoroutineEntry', () => {
  // The rules the brief names, looked up by the code on their line (a readable summary of the test above).
  const text = readFileSync(TYPE_ERRORS, 'utf8').split('\n');
  const lineOf = (needle: string) => {
    const i = text.findIndex((l) => l.includes(needle));
    if (i < 0) throw new Error(`fixture line not found: ${needle}`);
    return i + 1;
  };
  const at = (line: number) =>
    diagnosticsOf(TYPE_ERRORS)
      .map(describe)
      .filter((d) => parseInt(d, 10) === line)
      .map((d) => d.slice(d.indexOf(' ') + 1));
  assert.equal(at(lineOf('  yield; //')), ["TS2322 Type 'undefined' is not assignable to type 'CoroutineYield'."]);
  assert.equal(at(lineOf('  yield 42;')), ["TS2322 Type 'number' is not assignable to type 'CoroutineYield'."]);
  assert.equal(at(lineOf('yield* [1, 2, 3];')), ["TS2322 Type 'number' is not assignable to type 'CoroutineYield'."]);
  assert.equal(at(lineOf('yield* strings();')), ["TS2322 Type 'string' is not assignable to type 'CoroutineYield'."]);
  assert.equal(at(lineOf('const s: string = yield* count();')), ["TS2322 Type 'number' is not assignable to type 'string'."]);
  assert.equal(at(lineOf('export const notAnEntry')), [
    "TS2322 Type '(n: number) => number' is not assignable to type 'CoroutineEntry<number>'.",
  ]);
  assert.equal(at(lineOf('qemu_coroutine_create((n: number)')), [
    "TS2345 Argument of type '(n: number) => void' is not assignable to parameter of type 'CoroutineEntry<1>'.",
  ]);
});

test('ok.ts, dropped.ts and lookalike.ts compile with zero diagnostics', () => {
  // dropped.ts must compile too: what it gets wrong is invisible to the type system,
  // which is why scripts/check-coroutine-fn.ts exists.
  assert.equal(diagnosticsOf(OK).map(describe), []);
  assert.equal(diagnosticsOf(DROPPED).map(describe), []);
  assert.equal(diagnosticsOf(LOOKALIKE).map(describe), []);
});

test.run();
