// Part of offsite-sdk; see ../index.js.
import * as rawSecrets from 'offsite:backup/secrets@0.1.0';
import { host } from './error.js';

export const secrets = {
  /** A handle to the site's secret `name`; the value is never readable. */
  open: (name) => host(rawSecrets.open, name),
};
