#!/usr/bin/env node
// aioco-img: QEMU 7.2's qemu-img on aioco (examples/tools/aioco-img.ts), runnable from any directory.
import { register } from 'tsx/esm/api';
import { fileURLToPath } from 'node:url';

register();
const tool = fileURLToPath(new URL('../examples/tools/aioco-img.ts', import.meta.url));
const { runMain } = await import(tool);
await runMain();
