// `arc` in JavaScript: `offsite run arc-js.wasm --param path=beoserver` writes
// `beoserver.YYYYMMDD-HHMMSS.tgz` into the store, exactly as the Rust `arc`
// does (same name, same members: the archive is the host's).
import { Info, Param, archive, clock, exportScript, log, params } from 'offsite-sdk';

/** The last normal component: `beoserver` for `/home/u/beoserver/`. */
function defaultName(path) {
  return path.split('/').reverse().find((p) => p !== '' && p !== '.') ?? null;
}

const info = Info('arc', '0.1.0', 'Archive a file or directory as NAME.YYYYMMDD-HHMMSS.tgz', {
  params: [
    Param.required('path', 'file or directory to archive'),
    Param.optional('name', 'archive name prefix; defaults to the last component of path'),
    Param.optional('format', 'timestamp pattern (strftime)', { default: '%Y%m%d-%H%M%S' }),
  ],
  capabilities: ['archive', 'clock', 'log', 'params'],
});

function arc() {
  const path = params.require('path');
  const name = params.get('name') || defaultName(path);
  if (!name) throw new Error(`cannot derive an archive name from "${path}"; set --param name=...`);
  const stamp = clock.now().format(params.require('format'));
  const dest = `${name}.${stamp}.tgz`;
  log.info(`archiving ${path} into ${dest}`);
  const stored = archive.tarGz([path], dest);
  log.info(`${stored.path} (${stored.bytes} bytes, sha256 ${stored.sha256})`);
}

export const { describe, run } = exportScript({ info, run: arc });
