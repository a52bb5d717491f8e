#!/usr/bin/env node
// offsite-sdk-build [DIR]: bundles DIR/app.js with this SDK (esbuild; the
// offsite:backup and wasi imports stay imports) and builds the component
// for the `script` world with componentize-js, leaving DIR/NAME.wasm, NAME
// from DIR/package.json. `offsite build` runs this.
import { componentize } from '@bytecodealliance/componentize-js';
import { build } from 'esbuild';
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const dir = resolve(process.argv[2] ?? '.');
const sdk = dirname(fileURLToPath(import.meta.url));
let name = basename(dir);
try {
  name = JSON.parse(await readFile(join(dir, 'package.json'), 'utf8')).name ?? name;
} catch {}
const scratch = await mkdtemp(join(tmpdir(), 'offsite-js-'));
try {
  const bundle = join(scratch, 'app.js');
  await build({
    entryPoints: [join(dir, 'app.js')],
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    outfile: bundle,
    external: ['offsite:*', 'wasi:*'],
    logLevel: 'warning',
  });
  // componentize-js imports every interface of the world it is given, so
  // it gets the `script` world narrowed to the interfaces the bundle
  // imports: the component then imports what the script uses, as a Rust
  // one does (and `offsite check` can compare that with what it declares).
  const code = await readFile(bundle, 'utf8');
  const used = new Set([...code.matchAll(/from\s*["']offsite:backup\/([a-z-]+)@/g)].map((m) => m[1]));
  const wit = await readFile(join(sdk, 'wit', 'offsite.wit'), 'utf8');
  const narrowed = wit.replace(/(world script \{)([\s\S]*?)(\n\})/, (_, open, body, close) =>
    open + body.replace(/^\s*import ([a-z-]+);\n/gm, (line, name) => (used.has(name) ? line : '')) + close);
  const witDir = join(scratch, 'wit');
  await mkdir(witDir);
  await writeFile(join(witDir, 'offsite.wit'), narrowed);
  const { component } = await componentize({
    sourcePath: bundle,
    witPath: witDir,
    worldName: 'script',
    // A script reaches nothing but its imports: no fetch, no HTTP.
    disableFeatures: ['http', 'fetch-event'],
  });
  const out = join(dir, `${name}.wasm`);
  await writeFile(`${out}.tmp`, component);
  await rename(`${out}.tmp`, out);
  console.log(out);
} finally {
  await rm(scratch, { recursive: true, force: true });
}
