// Part of offsite-sdk; see ../index.js.
import * as rawFiles from 'offsite:backup/files@0.1.0';
import { HostError, host } from './error.js';

/** A read-only view of the read roots; links are reported, never followed. */
export const files = {
  listDir: (path) => host(rawFiles.listDir, path),
  stat: (path) => host(rawFiles.stat, path),
  exists(path) {
    try {
      host(rawFiles.stat, path);
      return true;
    } catch (e) {
      if (e instanceof HostError && e.kind === 'not-found') return false;
      throw e;
    }
  },
  usage: (path) => host(rawFiles.usage, path),
};
