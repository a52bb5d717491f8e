// Part of offsite-sdk; see ../index.js.
import * as rawScp from 'offsite:backup/scp@0.1.0';
import { host } from './error.js';
import { pending } from './ssh.js';

export const scp = {
  fetch: (h, path, dest) => host(rawScp.fetch, h, path, dest),
  startFetch: (h, path, dest) => pending(host(rawScp.startFetch, h, path, dest)),
};
