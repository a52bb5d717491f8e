// Part of offsite-sdk; see ../index.js.
import * as rawSsh from 'offsite:backup/ssh@0.1.0';
import { host } from './error.js';

/** Stream options: `{ gzip: true, requireTail: '-- Dump completed' }`. */
function streamOptions({ gzip = false, requireTail = undefined } = {}) {
  return { gzip, requireTail };
}

export function pending(raw) {
  return { wait: () => host(() => raw.wait()) };
}

export const ssh = {
  /** Runs `argv` on `host`: `{ status, stdout (Uint8Array), stderr }`. */
  exec: (h, argv) => host(rawSsh.exec, h, [...argv]),
  execToFile: (h, argv, dest, stream) => host(rawSsh.execToFile, h, [...argv], dest, streamOptions(stream)),
  startExecToFile: (h, argv, dest, stream) =>
    pending(host(rawSsh.startExecToFile, h, [...argv], dest, streamOptions(stream))),
  /** Sends the secret on stdin as the site's [secrets] entry says. */
  execToFileWithSecret: (h, argv, dest, secret, stream) =>
    host(rawSsh.execToFileWithSecret, h, [...argv], dest, streamOptions(stream), secret, ''),
  startExecToFileWithSecret: (h, argv, dest, secret, stream) =>
    pending(host(rawSsh.startExecToFileWithSecret, h, [...argv], dest, streamOptions(stream), secret, '')),
};
