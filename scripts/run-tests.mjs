#!/usr/bin/env node
// Runs every test/**/*.test.ts in its own Node process (aioco keeps process-wide state:
// clocks, the main context, the host-loop drive), two at a time, each bounded in time,
// and ends with the plain line "N passed, M failed" summed over uvu's totals.
import { spawn } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const PER_FILE_TIMEOUT_MS = Number(process.env.AIOCO_TEST_TIMEOUT_MS ?? 180_000);
const JOBS = Number(process.env.AIOCO_TEST_JOBS ?? 2);
const filter = process.argv[2] ? new RegExp(process.argv[2]) : null;

function walk(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walk(p));
    else if (name.endsWith('.test.ts')) out.push(p);
  }
  return out;
}

const files = walk(join(root, 'test')).filter((f) => !filter || filter.test(relative(root, f)));
const strip = (s) => s.replace(/\x1b\[[0-9;]*m/g, '');

function runOne(file) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', file], {
      cwd: root,
      env: { ...process.env, FORCE_COLOR: '0' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, PER_FILE_TIMEOUT_MS);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const text = strip(out);
      const num = (label) => {
        let n = 0;
        for (const m of text.matchAll(new RegExp(`${label}:\\s+(\\d+)`, 'g'))) n += Number(m[1]);
        return n;
      };
      let total = num('Total');
      let passed = num('Passed');
      const skipped = num('Skipped');
      let note = '';
      if (timedOut) note = `timed out after ${PER_FILE_TIMEOUT_MS} ms`;
      else if (code !== 0 && total === passed) note = `exited with ${code ?? signal}`;
      if (note) {
        // A crash or hang counts as one failure on top of whatever uvu reported.
        total += 1;
      }
      if (total === 0) {
        note ||= 'ran no test';
        total = 1;
      }
      resolve({ file, text, total, passed, skipped, note });
    });
  });
}

const results = [];
let next = 0;
async function worker() {
  while (next < files.length) {
    const file = files[next++];
    const r = await runOne(file);
    results.push(r);
    const rel = relative(root, r.file);
    const failed = r.total - r.passed - r.skipped;
    process.stdout.write(`\n=== ${rel}: ${r.passed}/${r.total} passed${r.note ? ` (${r.note})` : ''}\n`);
    if (failed > 0 || r.note || process.env.AIOCO_TEST_VERBOSE) process.stdout.write(r.text);
  }
}
await Promise.all(Array.from({ length: Math.max(1, JOBS) }, worker));

let total = 0, passed = 0, skipped = 0;
for (const r of results) { total += r.total; passed += r.passed; skipped += r.skipped; }
const failed = total - passed - skipped;
process.stdout.write(`\n${files.length} test files\n`);
process.stdout.write(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`);
process.exit(failed > 0 || files.length === 0 ? 1 : 0);
