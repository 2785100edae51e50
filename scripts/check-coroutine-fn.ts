/**
 * aioco's coroutine_fn check (`npm run check:coroutine-fn`), the counterpart of the
 * clang-based coroutine_fn checker QEMU uses.
 *
 * A coroutine_fn is a generator function returning `CoroutineFn<T>`. Calling one only
 * creates a generator: nothing runs until it is driven with `yield*` (or handed to
 * someone who drives it). Calling it and dropping the generator compiles fine and
 * silently does nothing, so this script finds every call whose type is a coroutine_fn's
 * generator and whose value is discarded:
 *
 *   f(x);                  an expression statement
 *   void f(x);             the void operator
 *   (f(x), y)              a non-final comma operand (also for(...) initialisers/updates)
 *   const g = f(x);        a local variable (or `g = f(x)`) never read afterwards
 *   xs.forEach((x) => f(x))  the body of an arrow typed as a callback returning void
 *
 * The value is followed through parentheses, `as`/`satisfies`/`!`, `await`, the branches
 * of `?:`, the final comma operand, the operands of `||`/`??` and the right one of `&&`. Anything else that uses
 * the value (yield*, return, an argument, a property, an array element...) is fine.
 *
 * A call's type is a coroutine_fn's generator when it is the alias `CoroutineFn` declared
 * in src/coroutine/coroutine.ts, or a `Generator` whose yield type is that file's
 * `CoroutineYield` (unions and intersections containing one count too).
 *
 * Usage: node --import tsx scripts/check-coroutine-fn.ts [file.ts ...]
 * Without arguments it checks the project's files (tsconfig.json) under src/, examples/,
 * bench/ and scripts/, never test/coroutine/fixtures/ (deliberately bad code). With
 * arguments it checks exactly those files. Exit status: 0 clean, 1 problems, 2 usage.
 */
import { existsSync, realpathSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import ts from 'typescript';

/** The repository root (the parent of scripts/). */
export const repoRoot: string = path.resolve(fileURLToPath(new URL('..', import.meta.url)));

/** The directories (relative to the root) the default run covers. */
export const CHECKED_DIRS: readonly string[] = ['src', 'examples', 'bench', 'scripts'];

/** Directories (relative to the root) the default run never covers. */
export const EXCLUDED_DIRS: readonly string[] = ['test/coroutine/fixtures'];

/** Where `CoroutineFn` and `CoroutineYield` are declared, relative to the root. */
export const COROUTINE_MODULE = 'src/coroutine/coroutine.ts';

export interface Problem {
  /** Relative to the root, with forward slashes. */
  file: string;
  /** 1-based. */
  line: number;
  /** 1-based. */
  column: number;
  /** The callee's text, e.g. `qemu_co_mutex_lock` or `obj.method`. */
  name: string;
  message: string;
}

export interface CheckOptions {
  /** Root for relative file names in problems and for tsconfig.json; default: repoRoot. */
  root?: string;
  /** Compiler options; default: those of `${root}/tsconfig.json`. */
  compilerOptions?: ts.CompilerOptions;
  /** Absolute path of the module declaring CoroutineFn/CoroutineYield; default: `${root}/src/coroutine/coroutine.ts`. */
  coroutineModule?: string;
}

function toPosix(p: string): string {
  return p.split(path.sep).join('/');
}

function canonical(p: string): string {
  const abs = path.resolve(p);
  try {
    return realpathSync(abs);
  } catch {
    return abs;
  }
}

function readTsconfig(root: string): ts.ParsedCommandLine {
  const configPath = path.join(root, 'tsconfig.json');
  const read = ts.readConfigFile(configPath, ts.sys.readFile);
  if (read.error) throw new Error(ts.flattenDiagnosticMessageText(read.error.messageText, '\n'));
  return ts.parseJsonConfigFileContent(read.config, ts.sys, root, undefined, configPath);
}

/** The compiler options of `${root}/tsconfig.json`. */
export function loadCompilerOptions(root: string = repoRoot): ts.CompilerOptions {
  return readTsconfig(root).options;
}

/** The files the default run checks: tsconfig.json's files under CHECKED_DIRS, minus EXCLUDED_DIRS. */
export function defaultFileNames(root: string = repoRoot): string[] {
  const inside = (rel: string, dir: string) => rel === dir || rel.startsWith(`${dir}/`);
  return readTsconfig(root)
    .fileNames.filter((f) => {
      const rel = toPosix(path.relative(root, path.resolve(f)));
      return CHECKED_DIRS.some((d) => inside(rel, d)) && !EXCLUDED_DIRS.some((d) => inside(rel, d));
    })
    .map((f) => path.resolve(f))
    .sort();
}

/**
 * Where a call's value goes: nowhere; out of an arrow function's concise body (dropped if
 * the arrow is a void callback); into a variable (dropped if never read afterwards); or
 * somewhere that uses it.
 */
type Sink =
  | { kind: 'dropped' }
  | { kind: 'arrow'; arrow: ts.ArrowFunction }
  | { kind: 'variable'; name: ts.Identifier; write: ts.Node }
  | { kind: 'used' };

/** Climbs through the expressions that pass `node`'s value through unchanged. */
function valueCarrier(node: ts.Expression): ts.Expression {
  let n: ts.Expression = node;
  for (;;) {
    const p = n.parent;
    if (
      ts.isParenthesizedExpression(p) ||
      ts.isAsExpression(p) ||
      ts.isTypeAssertionExpression(p) ||
      ts.isNonNullExpression(p) ||
      ts.isSatisfiesExpression(p) ||
      ts.isAwaitExpression(p)
    ) {
      n = p;
      continue;
    }
    if (ts.isConditionalExpression(p) && (p.whenTrue === n || p.whenFalse === n)) {
      n = p;
      continue;
    }
    if (ts.isBinaryExpression(p)) {
      const op = p.operatorToken.kind;
      if (op === ts.SyntaxKind.CommaToken && p.right === n) {
        n = p;
        continue;
      }
      // `a || b` and `a ?? b` give either operand; `a && b` gives b (a generator is truthy).
      if (
        op === ts.SyntaxKind.BarBarToken ||
        op === ts.SyntaxKind.QuestionQuestionToken ||
        (op === ts.SyntaxKind.AmpersandAmpersandToken && p.right === n)
      ) {
        n = p;
        continue;
      }
    }
    return n;
  }
}

function skipParens(n: ts.Node): ts.Node {
  while (ts.isParenthesizedExpression(n.parent)) n = n.parent;
  return n;
}

/** The callee as written, e.g. `qemu_co_mutex_lock`, `obj.method`, `this.co_reset`, without comments or line breaks. */
function calleeName(e: ts.Expression, sf: ts.SourceFile): string {
  if (ts.isIdentifier(e) || ts.isPrivateIdentifier(e)) return e.text;
  if (e.kind === ts.SyntaxKind.ThisKeyword) return 'this';
  if (e.kind === ts.SyntaxKind.SuperKeyword) return 'super';
  if (ts.isPropertyAccessExpression(e)) {
    return `${calleeName(e.expression, sf)}${e.questionDotToken ? '?.' : '.'}${e.name.text}`;
  }
  if (ts.isElementAccessExpression(e)) {
    return `${calleeName(e.expression, sf)}${e.questionDotToken ? '?.' : ''}[${e.argumentExpression.getText(sf)}]`;
  }
  if (ts.isNonNullExpression(e)) return `${calleeName(e.expression, sf)}!`;
  return e.getText(sf).replace(/\s*\n\s*/g, '');
}

function sinkOf(call: ts.CallExpression): Sink {
  const v = valueCarrier(call);
  const p = v.parent;
  if (ts.isExpressionStatement(p) || ts.isVoidExpression(p)) return { kind: 'dropped' };
  if (ts.isBinaryExpression(p) && p.operatorToken.kind === ts.SyntaxKind.CommaToken && p.left === v) {
    return { kind: 'dropped' };
  }
  if (ts.isForStatement(p) && (p.initializer === v || p.incrementor === v)) return { kind: 'dropped' };
  if (ts.isArrowFunction(p) && p.body === v) return { kind: 'arrow', arrow: p };
  if (ts.isVariableDeclaration(p) && p.initializer === v && ts.isIdentifier(p.name)) {
    return { kind: 'variable', name: p.name, write: p };
  }
  if (ts.isBinaryExpression(p) && p.operatorToken.kind === ts.SyntaxKind.EqualsToken && p.right === v) {
    let target: ts.Node = p.left;
    while (ts.isParenthesizedExpression(target)) target = target.expression;
    if (ts.isIdentifier(target)) return { kind: 'variable', name: target, write: p };
  }
  return { kind: 'used' };
}

function isLoop(n: ts.Node): boolean {
  return ts.isIterationStatement(n, false);
}

/** The function (or source file) whose body directly contains `n`. */
function containerOf(n: ts.Node): ts.Node {
  return ts.findAncestor(n.parent, (a) => ts.isFunctionLike(a) || ts.isSourceFile(a) || ts.isClassStaticBlockDeclaration(a)) ?? n.getSourceFile();
}

class Checker {
  readonly program: ts.Program;
  readonly checker: ts.TypeChecker;
  readonly coroutineModule: string;

  constructor(program: ts.Program, coroutineModule: string) {
    this.program = program;
    this.checker = program.getTypeChecker();
    this.coroutineModule = canonical(coroutineModule);
  }

  private declaredInCoroutineModule(sym: ts.Symbol | undefined, name: string): boolean {
    if (sym === undefined || sym.name !== name) return false;
    return (sym.declarations ?? []).some((d) => canonical(d.getSourceFile().fileName) === this.coroutineModule);
  }

  /** True for `CoroutineFn<T>` and for `Generator<CoroutineYield, ...>` (also inside unions/intersections). */
  isCoroutineFnType(type: ts.Type): boolean {
    if (this.declaredInCoroutineModule(type.aliasSymbol, 'CoroutineFn')) return true;
    if (type.isUnion() || type.isIntersection()) return type.types.some((t) => this.isCoroutineFnType(t));
    if (type.flags & ts.TypeFlags.Object && (type as ts.ObjectType).objectFlags & ts.ObjectFlags.Reference) {
      const ref = type as ts.TypeReference;
      const sym = ref.target.symbol as ts.Symbol | undefined;
      if (
        sym?.name === 'Generator' &&
        (sym.declarations ?? []).some((d) => this.program.isSourceFileDefaultLibrary(d.getSourceFile()))
      ) {
        const yieldType = this.checker.getTypeArguments(ref)[0];
        if (yieldType !== undefined && this.declaredInCoroutineModule(yieldType.symbol, 'CoroutineYield')) return true;
      }
    }
    return false;
  }

  /** The variable `id` refers to, looking through shorthand properties and export specifiers. */
  private referencedSymbol(id: ts.Identifier): ts.Symbol | undefined {
    const p = id.parent;
    if (ts.isShorthandPropertyAssignment(p) && p.name === id) return this.checker.getShorthandAssignmentValueSymbol(p);
    if (ts.isExportSpecifier(p)) return this.checker.getExportSpecifierLocalTargetSymbol(p);
    return this.checker.getSymbolAtLocation(id);
  }

  /**
   * True when the local variable written by `write` is never read afterwards: no read
   * after it in the text, none in a loop around both, none in another function (a closure
   * may run later). Exported variables always count as read.
   */
  private neverReadAfter(name: ts.Identifier, write: ts.Node): boolean {
    const sym = this.checker.getSymbolAtLocation(name);
    const decl = sym?.valueDeclaration;
    if (sym === undefined || decl === undefined || !ts.isVariableDeclaration(decl)) return false;
    const stmt = decl.parent.parent;
    if (ts.isVariableStatement(stmt) && stmt.modifiers?.some((m) => m.kind === ts.SyntaxKind.ExportKeyword)) return false;
    const sf = decl.getSourceFile();
    const writeContainer = containerOf(write);
    const isVar = (decl.parent.flags & ts.NodeFlags.BlockScoped) === 0;
    const contains = (outer: ts.Node, inner: ts.Node) => inner.pos >= outer.pos && inner.end <= outer.end;
    /**
     * A read earlier in the text still comes after the write when a loop around both
     * goes round again, provided the variable outlives an iteration (declared outside
     * the loop, or a `var`).
     */
    const inLoopCarryingTheValue = (ref: ts.Node): boolean => {
      for (let a: ts.Node = write.parent; a !== writeContainer && !ts.isSourceFile(a); a = a.parent) {
        if (isLoop(a) && contains(a, ref) && (isVar || !contains(a, decl))) return true;
      }
      return false;
    };
    let read = false;
    const visit = (n: ts.Node): void => {
      if (read) return;
      if (ts.isIdentifier(n) && n.text === name.text && n !== decl.name && this.referencedSymbol(n) === sym) {
        const outer = skipParens(n);
        const isPlainWrite =
          ts.isBinaryExpression(outer.parent) &&
          outer.parent.operatorToken.kind === ts.SyntaxKind.EqualsToken &&
          outer.parent.left === outer;
        if (!isPlainWrite) {
          if (n.getStart(sf) >= write.end) read = true;
          else if (containerOf(n) !== writeContainer) read = true;
          else if (inLoopCarryingTheValue(n)) read = true;
        }
      }
      ts.forEachChild(n, visit);
    };
    visit(sf);
    return !read;
  }

  /**
   * True when the arrow function (whose concise body is the call) is typed from context
   * as a callback returning void, e.g. `list.forEach((m) => qemu_co_mutex_lock(m))`: its
   * caller ignores what it returns.
   */
  private isVoidCallback(arrow: ts.ArrowFunction): boolean {
    const contextual = this.checker.getContextualType(arrow);
    if (contextual === undefined) return false;
    const sigs = this.checker.getSignaturesOfType(this.checker.getNonNullableType(contextual), ts.SignatureKind.Call);
    return sigs.length > 0 && sigs.every((sig) => (this.checker.getReturnTypeOfSignature(sig).flags & ts.TypeFlags.Void) !== 0);
  }

  private isDropped(sink: Exclude<Sink, { kind: 'used' }>): boolean {
    switch (sink.kind) {
      case 'dropped':
        return true;
      case 'arrow':
        return this.isVoidCallback(sink.arrow);
      case 'variable':
        return this.neverReadAfter(sink.name, sink.write);
    }
  }

  check(sf: ts.SourceFile, root: string): Problem[] {
    const out: Problem[] = [];
    const file = toPosix(path.relative(root, path.resolve(sf.fileName)));
    const visit = (n: ts.Node): void => {
      if (ts.isCallExpression(n)) {
        const sink = sinkOf(n);
        if (sink.kind !== 'used' && this.isCoroutineFnType(this.checker.getTypeAtLocation(n))) {
          if (this.isDropped(sink)) {
            const start = n.getStart(sf);
            const { line, character } = sf.getLineAndCharacterOfPosition(start);
            const name = calleeName(n.expression, sf);
            out.push({
              file,
              line: line + 1,
              column: character + 1,
              name,
              message: `coroutine_fn ${name} called but its generator is dropped (use yield*)`,
            });
          }
        }
      }
      ts.forEachChild(n, visit);
    };
    visit(sf);
    return out;
  }
}

/**
 * Parsed declaration files of the default library and node_modules, which do not change
 * while we run: repeated checks in one process (the tests) parse them once.
 */
const libCache = new Map<string, ts.SourceFile>();

function cachingHost(options: ts.CompilerOptions): ts.CompilerHost {
  const host = ts.createCompilerHost(options, true);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (fileName, languageVersionOrOptions, onError, shouldCreate) => {
    const cacheable = fileName.endsWith('.d.ts') && /[\\/]node_modules[\\/]/.test(fileName);
    if (!cacheable) return getSourceFile(fileName, languageVersionOrOptions, onError, shouldCreate);
    const key = `${JSON.stringify(languageVersionOrOptions)}\0${fileName}`;
    let sf = libCache.get(key);
    if (sf === undefined) {
      sf = getSourceFile(fileName, languageVersionOrOptions, onError, shouldCreate);
      if (sf !== undefined) libCache.set(key, sf);
    }
    return sf;
  };
  return host;
}

/**
 * Checks `fileNames` (and only those; their imports are loaded for types but not
 * reported) and returns every dropped coroutine_fn call, in file then position order.
 */
export function checkCoroutineFn(fileNames: readonly string[], options: CheckOptions = {}): Problem[] {
  const root = path.resolve(options.root ?? repoRoot);
  const compilerOptions = { ...(options.compilerOptions ?? loadCompilerOptions(root)), noEmit: true };
  const coroutineModule = options.coroutineModule ?? path.join(root, COROUTINE_MODULE);
  const rootNames = fileNames.map((f) => path.resolve(f));
  const program = ts.createProgram({ rootNames, options: compilerOptions, host: cachingHost(compilerOptions) });
  const checker = new Checker(program, coroutineModule);
  const problems: Problem[] = [];
  for (const f of [...rootNames].sort()) {
    const sf = program.getSourceFile(f);
    if (sf === undefined) throw new Error(`check-coroutine-fn: cannot read ${f}`);
    problems.push(...checker.check(sf, root));
  }
  return problems;
}

/** `file:line:col: message`. */
export function formatProblem(p: Problem): string {
  return `${p.file}:${p.line}:${p.column}: ${p.message}`;
}

/** `coroutine_fn check: N files, M problems`. */
export function formatSummary(files: number, problems: number): string {
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? '' : 's'}`;
  return `coroutine_fn check: ${plural(files, 'file')}, ${plural(problems, 'problem')}`;
}

/** The command line: returns the exit status. */
export function main(argv: readonly string[], out: (line: string) => void = (l) => console.log(l)): number {
  let files: string[];
  if (argv.length > 0) {
    const missing = argv.filter((a) => !existsSync(path.resolve(a)));
    if (missing.length > 0 || argv.some((a) => a.startsWith('-'))) {
      out(`usage: node --import tsx scripts/check-coroutine-fn.ts [file.ts ...]`);
      for (const m of missing) out(`check-coroutine-fn: no such file: ${m}`);
      return 2;
    }
    files = argv.map((a) => path.resolve(a));
  } else {
    files = defaultFileNames(repoRoot);
    const co = path.join(repoRoot, COROUTINE_MODULE);
    if (!files.some((f) => canonical(f) === canonical(co))) {
      out(`check-coroutine-fn: ${COROUTINE_MODULE} is not among the checked files; cannot identify CoroutineFn`);
      return 2;
    }
  }
  const problems = checkCoroutineFn(files);
  for (const p of problems) out(formatProblem(p));
  out(formatSummary(files.length, problems.length));
  return problems.length > 0 ? 1 : 0;
}

const invokedAs = process.argv[1];
if (invokedAs !== undefined && import.meta.url === pathToFileURL(canonical(invokedAs)).href) {
  process.exitCode = main(process.argv.slice(2));
}
