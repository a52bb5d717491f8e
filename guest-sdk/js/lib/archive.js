// Part of offsite-sdk; see ../index.js.
import * as rawArchive from 'offsite:backup/archive@0.1.0';
import { host } from './error.js';

export const archive = {
  /** A gzip-compressed tar of `sources` (beneath the read roots) at `dest` in the store. */
  tarGz: (sources, dest) => host(rawArchive.tarGz, [...sources], dest),
};
