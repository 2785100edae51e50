#!/usr/bin/env node
// aioco-io: QEMU 7.2's qemu-io on aioco (examples/tools/aioco-io.ts), runnable from any directory.
import { register } from 'tsx/esm/api';
import { fileURLToPath } from 'node:url';

register();
const tool = fileURLToPath(new URL('../examples/tools/aioco-io.ts', import.meta.url));
const { runMain } = await import(tool);
await runMain();
